//! Model importers into the host IR.

pub mod tflite;

use crate::ir::Graph;
use anyhow::{bail, Context, Result};
use std::path::Path;

/// Imports a model file by its extension: `.tflite` (and `.onnx` where supported). Returns the
/// graph and the source format's name.
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
        _ => bail!(
            "{} is not a model kiln can read (by its extension)\nhint: pass a .tflite file",
            path.display()
        ),
    };
    Ok((graph, ext_name(&ext), bytes))
}

fn ext_name(ext: &str) -> &'static str {
    match ext {
        "tflite" => "tflite",
        "onnx" => "onnx",
        _ => "unknown",
    }
}
pub mod onnx;
pub mod onnx_proto;
