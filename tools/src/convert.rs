//! `kiln convert`: a source model → a `.kiln` artifact (GRAPH, WEIGHTS, MANIFEST, and SELFTEST
//! vectors when sample inputs are given).

use crate::artifact::{write_artifact, HeaderFields};
use crate::import::tflite::import_tflite;
use crate::lower::{lower, to_fp16, Lowered};
use crate::npy::Array;
use crate::runner::capture_raw;
use anyhow::{Context, Result};
use kiln_runtime::format::SectionKind;
use kiln_runtime::sections::{Manifest, SelfTestCase, SelfTestHead};
use sha2::{Digest, Sha256};

/// Lowercase hex of a SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// How float parts of the model are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    /// As in the source model (int8 stays int8, float stays f32).
    #[default]
    AsSource,
    /// Float weights and activations stored as f16 (f32 accumulation); int8 stays int8.
    Fp16,
}

impl Precision {
    /// Name recorded in the manifest.
    pub fn name(self) -> &'static str {
        match self {
            Precision::AsSource => "as-source",
            Precision::Fp16 => "fp16",
        }
    }
}

/// A converted model: the artifact bytes and the planner's figures.
#[derive(Clone, Debug)]
pub struct Converted {
    /// The `.kiln` file.
    pub artifact: Vec<u8>,
    /// Lowering output (arena, lower bound, section sizes).
    pub lowered: Lowered,
    /// Number of SELFTEST cases embedded.
    pub self_tests: usize,
}

/// Encodes a SELFTEST section from (raw input bytes, raw output bytes) pairs.
pub fn encode_self_tests(cases: &[(Vec<u8>, Vec<u8>)]) -> Result<Vec<u8>> {
    let count = u16::try_from(cases.len()).context("at most 65535 self-test cases")?;
    let mut out = postcard::to_allocvec(&SelfTestHead { count })?;
    for (inputs, outputs) in cases {
        out.extend(postcard::to_allocvec(&SelfTestCase { inputs, outputs })?);
    }
    Ok(out)
}

/// Lowers a host graph and writes a bare artifact (GRAPH + WEIGHTS + a MANIFEST with the name).
///
/// # Errors
/// The graph does not lower.
pub fn assemble_graph(g: &crate::ir::Graph, name: &str) -> Result<Vec<u8>> {
    assemble_graph_with_lineage(g, name, serde_json::Value::Null)
}

/// [`assemble_graph`] with lineage entries merged into the MANIFEST's JSON.
///
/// # Errors
/// The graph does not lower.
pub fn assemble_graph_with_lineage(
    g: &crate::ir::Graph,
    name: &str,
    lineage: serde_json::Value,
) -> Result<Vec<u8>> {
    let lowered = lower(g)?;
    let mut json = serde_json::json!({
        "name": name,
        "kiln_version": env!("CARGO_PKG_VERSION"),
        "arena_bytes": lowered.arena_bytes,
        "tensor_names": lowered.constant_names(g),
    });
    if let (Some(obj), serde_json::Value::Object(extra)) = (json.as_object_mut(), lineage) {
        obj.extend(extra);
    }
    let json = json.to_string();
    let manifest = postcard::to_allocvec(&Manifest { name, json: &json })?;
    assemble(&lowered, &manifest, None)
}

/// A bare artifact of an already lowered graph: GRAPH, WEIGHTS and a MANIFEST with `name` and the
/// JSON object `json` exactly as given (no lineage, no `tensor_names` unless `json` has them).
///
/// # Errors
/// The sections do not fit the format's limits.
pub fn assemble_lowered(
    lowered: &Lowered,
    name: &str,
    json: &serde_json::Value,
) -> Result<Vec<u8>> {
    let json = json.to_string();
    let manifest = postcard::to_allocvec(&Manifest { name, json: &json })?;
    assemble(lowered, &manifest, None)
}

fn assemble(lowered: &Lowered, manifest: &[u8], self_tests: Option<&[u8]>) -> Result<Vec<u8>> {
    let mut sections: Vec<(SectionKind, &[u8])> = vec![
        (SectionKind::Graph, &lowered.graph),
        (SectionKind::Weights, &lowered.weights),
        (SectionKind::Manifest, manifest),
    ];
    if let Some(s) = self_tests {
        sections.push((SectionKind::SelfTest, s));
    }
    let fields = HeaderFields {
        arena_bytes: u32::try_from(lowered.arena_bytes).context("arena larger than 4 GiB")?,
        ..Default::default()
    };
    write_artifact(fields, &sections).map_err(anyhow::Error::msg)
}

/// Converts a TFLite flatbuffer into an artifact named `name`. With `samples`, the first
/// `self_test_count` of them are run through the converted model on the host and stored with
/// their exact outputs as SELFTEST vectors, which a device re-runs after an update.
///
/// # Errors
/// The model does not import (malformed, unsupported op) or does not lower, or the samples do not
/// fit the model.
pub fn convert_tflite_with(
    source: &[u8],
    name: &str,
    samples: Option<(&Array, usize)>,
    precision: Precision,
) -> Result<Converted> {
    let graph = import_tflite(source).context("cannot import the TFLite model")?;
    convert_graph_with(graph, "tflite", source, name, samples, precision)
}

/// Converts an imported graph (`format` and `source` name and digest the original file).
///
/// # Errors
/// As [`convert_tflite_with`].
pub fn convert_graph_with(
    mut graph: crate::ir::Graph,
    format: &str,
    source: &[u8],
    name: &str,
    samples: Option<(&Array, usize)>,
    precision: Precision,
) -> Result<Converted> {
    graph = crate::lower::normalize(&graph).context("cannot prepare the model")?;
    crate::passes::fold_constants(&mut graph);
    if precision == Precision::Fp16 {
        graph = to_fp16(&graph).context("cannot store the model as f16")?;
    }
    let lowered = lower(&graph).context("cannot lower the model for the runtime")?;
    let json = serde_json::json!({
        "name": name,
        "kiln_version": env!("CARGO_PKG_VERSION"),
        "source": { "format": format, "sha256": sha256_hex(source), "bytes": source.len() },
        "conversion": { "command": "convert", "precision": precision.name() },
        "arena_bytes": lowered.arena_bytes,
        "liveness_lower_bound_bytes": lowered.liveness_lower_bound,
        "tensor_names": lowered.constant_names(&graph),
    })
    .to_string();
    let manifest = postcard::to_allocvec(&Manifest { name, json: &json })?;
    let mut artifact = assemble(&lowered, &manifest, None)?;
    let mut self_tests = 0;
    if let Some((x, count)) = samples {
        let cases = capture_raw(&artifact, x, count).context("cannot compute self-test vectors")?;
        self_tests = cases.len();
        artifact = assemble(&lowered, &manifest, Some(&encode_self_tests(&cases)?))?;
    }
    Ok(Converted {
        artifact,
        lowered,
        self_tests,
    })
}

/// Converts a TFLite flatbuffer into an artifact named `name`, without self-test vectors.
///
/// # Errors
/// As [`convert_tflite_with`].
pub fn convert_tflite(source: &[u8], name: &str) -> Result<Converted> {
    convert_tflite_with(source, name, None, Precision::AsSource)
}
