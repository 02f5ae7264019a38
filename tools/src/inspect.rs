//! `kiln inspect`: what an artifact holds, for people (a table) and scripts (JSON).

use crate::artifact::AlignedBytes;
use anyhow::Result;
use kiln_runtime::format::SectionKind;
use kiln_runtime::graph::TensorDef;
use kiln_runtime::kernels::{conv, depthwise, fully_connected};
use kiln_runtime::model::Model;
use kiln_runtime::prepare::{prepare_op, Prepared};
use kiln_runtime::sections::Manifest;
use serde::Serialize;

/// One row of the per-op table.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct OpRow {
    /// Op index in execution order.
    pub index: usize,
    /// Operator name.
    pub op: &'static str,
    /// Element type of the output.
    pub dtype: &'static str,
    /// Output shape.
    pub output_shape: Vec<u32>,
    /// Multiply-accumulates.
    pub macs: u64,
    /// Bytes of constant operands (weights, bias).
    pub weights_bytes: usize,
}

/// A graph input or output.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct IoRow {
    /// Tensor index.
    pub tensor: u16,
    /// Element type.
    pub dtype: &'static str,
    /// Shape.
    pub shape: Vec<u32>,
    /// Scale, for quantized tensors.
    pub scale: Option<f32>,
    /// Zero point, for quantized tensors.
    pub zero_point: Option<i32>,
}

/// One section of the container.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct SectionRow {
    /// Kind.
    pub kind: &'static str,
    /// Bytes.
    pub bytes: usize,
}

/// Everything `kiln inspect` reports.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Report {
    /// Model name from the manifest.
    pub name: String,
    /// Format version.
    pub format_version: u16,
    /// Model version (0 until signed).
    pub model_version: u32,
    /// Security counter (0 until signed).
    pub security_counter: u32,
    /// Exact arena the interpreter needs.
    pub arena_bytes: usize,
    /// WEIGHTS section size.
    pub weights_bytes: usize,
    /// Whole artifact size.
    pub artifact_bytes: usize,
    /// Total multiply-accumulates of one inference.
    pub macs: u64,
    /// SHA-256 of the body.
    pub sha256: String,
    /// Target board the artifact was signed for (`""` = any board).
    pub target: String,
    /// Signatures in the trailer.
    pub signatures: usize,
    /// Key ids (16 hex digits) of the trailer's signatures, in order. Shown as they are: whether
    /// they verify is `kiln verify`'s job, which needs the trusted public keys.
    pub signature_key_ids: Vec<String>,
    /// Sections.
    pub sections: Vec<SectionRow>,
    /// Graph inputs.
    pub inputs: Vec<IoRow>,
    /// Graph outputs.
    pub outputs: Vec<IoRow>,
    /// Per-op table.
    pub ops: Vec<OpRow>,
    /// The manifest's JSON (lineage), or null.
    pub manifest: serde_json::Value,
}

fn io_row(index: u16, t: &TensorDef) -> IoRow {
    IoRow {
        tensor: index,
        dtype: t.dtype.name(),
        shape: t.shape.to_vec(),
        scale: t.quant.map(|q| q.scale),
        zero_point: t.quant.map(|q| q.zero_point),
    }
}

/// Multiply-accumulates of one prepared op.
pub fn op_macs(p: &Prepared) -> u64 {
    match p {
        Prepared::Conv {
            g,
            depthwise: false,
        } => conv::conv2d_macs(g),
        Prepared::Conv { g, depthwise: true } => depthwise::depthwise_conv2d_macs(g),
        Prepared::FullyConnected(g) => fully_connected::fully_connected_macs(g),
        _ => 0,
    }
}

/// Validates the artifact (as a device would) and builds the report.
///
/// # Errors
/// The artifact is invalid.
pub fn inspect(artifact: &[u8]) -> Result<Report> {
    let bytes = AlignedBytes::new(artifact);
    let model = Model::load(bytes.as_slice())?;
    let c = model.container();
    let manifest = Manifest::of(&model)?;
    let mut ops = Vec::new();
    let mut total_macs = 0;
    for item in model.ops() {
        let (index, op) = item?;
        let prepared = prepare_op(&model, index, &op)?;
        let macs = op_macs(&prepared);
        total_macs += macs;
        let out = model.tensor(op.output)?;
        let mut weights_bytes = 0;
        for &i in op
            .inputs
            .iter()
            .filter(|&&i| i != kiln_runtime::graph::NO_TENSOR)
        {
            let t = model.tensor(i)?;
            if let Ok(b) = model.constant(&t) {
                weights_bytes += b.len();
            }
        }
        ops.push(OpRow {
            index: index as usize,
            op: op.kind.name(),
            dtype: out.dtype.name(),
            output_shape: out.shape.to_vec(),
            macs,
            weights_bytes,
        });
    }
    let sections = [
        SectionKind::Graph,
        SectionKind::Weights,
        SectionKind::Manifest,
        SectionKind::SelfTest,
        SectionKind::Baseline,
    ]
    .into_iter()
    .filter_map(|k| {
        c.section(k).map(|s| SectionRow {
            kind: k.name(),
            bytes: s.len(),
        })
    })
    .collect();
    let mut inputs = Vec::new();
    for &i in model.inputs() {
        inputs.push(io_row(i, &model.tensor(i)?));
    }
    let mut outputs = Vec::new();
    for &i in model.outputs() {
        outputs.push(io_row(i, &model.tensor(i)?));
    }
    Ok(Report {
        name: manifest.map(|m| m.name.to_string()).unwrap_or_default(),
        format_version: kiln_runtime::format::FORMAT_VERSION,
        model_version: c.header.model_version,
        security_counter: c.header.security_counter,
        arena_bytes: model.arena_bytes(),
        weights_bytes: model.weights().len(),
        artifact_bytes: artifact.len(),
        macs: total_macs,
        sha256: c.digest.iter().map(|b| format!("{b:02x}")).collect(),
        target: c.header.target_name().to_string(),
        signatures: c.signature_count(),
        signature_key_ids: c
            .signatures()
            .map(|r| kiln_runtime::signature::KeyIdHex(r.key_id).to_string())
            .collect(),
        sections,
        inputs,
        outputs,
        ops,
        manifest: manifest
            .and_then(|m| serde_json::from_str(m.json).ok())
            .unwrap_or(serde_json::Value::Null),
    })
}

fn shape_str(s: &[u32]) -> String {
    format!(
        "[{}]",
        s.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
    )
}

/// The report as text for people.
pub fn render(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "model        {}",
        if r.name.is_empty() {
            "(unnamed)"
        } else {
            &r.name
        }
    );
    let _ = writeln!(
        s,
        "version      {} (security counter {}, {} signature(s))",
        r.model_version, r.security_counter, r.signatures
    );
    let _ = writeln!(
        s,
        "target       {}",
        if r.target.is_empty() {
            "any board"
        } else {
            &r.target
        }
    );
    let _ = writeln!(
        s,
        "signed by    {}",
        if r.signature_key_ids.is_empty() {
            "nobody (unsigned: `kiln sign` it before devices will take it)".to_string()
        } else {
            r.signature_key_ids
                .iter()
                .map(|k| format!("key {k}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    let _ = writeln!(s, "arena        {} bytes", r.arena_bytes);
    let _ = writeln!(s, "weights      {} bytes", r.weights_bytes);
    let _ = writeln!(s, "artifact     {} bytes", r.artifact_bytes);
    let _ = writeln!(s, "MACs         {}", r.macs);
    let _ = writeln!(s, "sha256       {}", r.sha256);
    for (label, rows) in [("input ", &r.inputs), ("output", &r.outputs)] {
        for io in rows {
            let q = match (io.scale, io.zero_point) {
                (Some(sc), Some(z)) => format!(" scale {sc:e} zero point {z}"),
                _ => String::new(),
            };
            let _ = writeln!(
                s,
                "{label}       tensor {} {} {}{q}",
                io.tensor,
                io.dtype,
                shape_str(&io.shape)
            );
        }
    }
    let _ = writeln!(
        s,
        "\n{:>4}  {:<18} {:<6} {:<18} {:>12} {:>10}",
        "#", "op", "type", "output", "MACs", "weights"
    );
    for o in &r.ops {
        let _ = writeln!(
            s,
            "{:>4}  {:<18} {:<6} {:<18} {:>12} {:>10}",
            o.index,
            o.op,
            o.dtype,
            shape_str(&o.output_shape),
            o.macs,
            o.weights_bytes
        );
    }
    if !r.manifest.is_null() {
        let _ = writeln!(
            s,
            "\nmanifest\n{}",
            serde_json::to_string_pretty(&r.manifest).unwrap_or_default()
        );
    }
    s
}
