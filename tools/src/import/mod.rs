//! Model importers into the host IR.

pub mod kiln;
pub mod onnx;
pub mod onnx_proto;
pub mod tflite;

use crate::ir::Graph;
use anyhow::{bail, Context, Result};
use std::path::Path;

/// Imports a model file by its extension: `.tflite`, `.onnx`, or a float `.kiln`. Returns the
/// graph, the source format's name and the file's bytes.
///
/// # Errors
/// Unknown extension, unreadable file, or an import error (named with the file).
pub fn import_file(path: &Path) -> Result<(Graph, &'static str, Vec<u8>)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let graph = match ext.as_str() {
        "tflite" => tflite::import_tflite(&bytes)
            .with_context(|| format!("cannot import {}", path.display()))?,
        "onnx" => onnx::import_onnx(&bytes)
            .with_context(|| format!("cannot import {}", path.display()))?,
        "kiln" => kiln::import_kiln(&bytes)
            .with_context(|| format!("cannot import {}", path.display()))?,
        _ => bail!(
            "{} is not a model kiln can read (by its extension)\nhint: pass a .tflite, .onnx or float .kiln file",
            path.display()
        ),
    };
    Ok((graph, ext_name(&ext), bytes))
}

fn ext_name(ext: &str) -> &'static str {
    match ext {
        "tflite" => "tflite",
        "onnx" => "onnx",
        "kiln" => "kiln",
        _ => "unknown",
    }
}
