//! `kiln convert`: a source model → a `.kiln` artifact (GRAPH, WEIGHTS, MANIFEST).

use crate::artifact::{write_artifact, HeaderFields};
use crate::import::tflite::import_tflite;
use crate::lower::{lower, Lowered};
use anyhow::{Context, Result};
use kiln_runtime::format::SectionKind;
use kiln_runtime::sections::Manifest;
use sha2::{Digest, Sha256};

/// Lowercase hex of a SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A converted model: the artifact bytes and the planner's figures.
#[derive(Clone, Debug)]
pub struct Converted {
    /// The `.kiln` file.
    pub artifact: Vec<u8>,
    /// Lowering output (arena, lower bound, section sizes).
    pub lowered: Lowered,
}

/// Converts a TFLite flatbuffer into an artifact named `name`.
///
/// # Errors
/// The model does not import (malformed, unsupported op) or does not lower.
pub fn convert_tflite(source: &[u8], name: &str) -> Result<Converted> {
    let graph = import_tflite(source).context("cannot import the TFLite model")?;
    let lowered = lower(&graph).context("cannot lower the model for the runtime")?;
    let json = serde_json::json!({
        "name": name,
        "kiln_version": env!("CARGO_PKG_VERSION"),
        "source": { "format": "tflite", "sha256": sha256_hex(source), "bytes": source.len() },
        "conversion": { "command": "convert", "quantization": "as in source" },
        "arena_bytes": lowered.arena_bytes,
        "liveness_lower_bound_bytes": lowered.liveness_lower_bound,
    })
    .to_string();
    let manifest = postcard::to_allocvec(&Manifest { name, json: &json })?;
    let artifact = write_artifact(
        HeaderFields {
            arena_bytes: u32::try_from(lowered.arena_bytes).context("arena larger than 4 GiB")?,
            ..Default::default()
        },
        &[
            (SectionKind::Graph, &lowered.graph),
            (SectionKind::Weights, &lowered.weights),
            (SectionKind::Manifest, &manifest),
        ],
    )
    .map_err(anyhow::Error::msg)?;
    Ok(Converted { artifact, lowered })
}
