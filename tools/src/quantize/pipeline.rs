//! `kiln quantize` end to end: float graph + calibration data → a self-testing artifact with its
//! lineage (MANIFEST), golden vectors (SELFTEST) and drift baseline (BASELINE), optionally gated
//! on accuracy and with `auto` mixed precision.

use super::calibrate::{calibrate, samples_f32, Calibration};
use super::ranges::Estimator;
use super::{int8_capable, quantize_graph, OpPrecision, QuantizeOptions};
use crate::artifact::{write_artifact, HeaderFields};
use crate::convert::encode_self_tests;
use crate::eval::{anomaly_scores, auc, run_real, top1};
use crate::ir::{Graph, OpKind};
use crate::lower::{lower, normalize, to_fp16, Lowered};
use crate::npy::Array;
use crate::passes::{fold_constants, fuse_activations};
use crate::runner::capture_raw;
use anyhow::{bail, Context, Result};
use kiln_runtime::format::SectionKind;
use kiln_runtime::graph::DType;
use kiln_runtime::sections::{BaselineHead, BaselineHistogram, BaselineTensor, Manifest};
use serde::Serialize;

/// Target precision of `kiln quantize`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Precision {
    /// Every op that can runs in int8.
    Int8,
    /// f16 weights and activations, f32 accumulation.
    Fp16,
    /// int8 except the fewest, most sensitive ops kept in fp16 that keep the accuracy drop within
    /// the budget (in percentage points).
    Auto,
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "int8" => Ok(Precision::Int8),
            "fp16" => Ok(Precision::Fp16),
            "auto" => Ok(Precision::Auto),
            _ => Err(format!("unknown precision `{s}`; use int8, fp16 or auto")),
        }
    }
}

/// How accuracy is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    /// Fraction of samples whose argmax is the label.
    Top1,
    /// ROC AUC of the reconstruction error of clips (`[clips, frames, mels]`), for autoencoders.
    Auc,
}

impl std::str::FromStr for Metric {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "top1" => Ok(Metric::Top1),
            "auc" => Ok(Metric::Auc),
            _ => Err(format!("unknown metric `{s}`; use top1 or auc")),
        }
    }
}

/// A labelled evaluation set.
pub struct EvalSet<'a> {
    /// Samples (batch first; for AUC, clips `[n, frames, mels]`).
    pub x: &'a Array,
    /// Labels.
    pub y: &'a [i64],
    /// Metric.
    pub metric: Metric,
    /// SHA-256 of the file it came from.
    pub sha256: String,
}

/// Everything `kiln quantize` needs.
pub struct Request<'a> {
    /// Model name for the manifest.
    pub name: String,
    /// The float graph.
    pub graph: Graph,
    /// Lineage of the source model: format and SHA-256.
    pub source: serde_json::Value,
    /// Calibration samples (real values, batch first).
    pub calib: &'a Array,
    /// SHA-256 of the calibration file.
    pub calib_sha256: String,
    /// Target precision.
    pub precision: Precision,
    /// Quantizer options (estimator, bias correction).
    pub options: QuantizeOptions,
    /// Evaluation set, for the report, the accuracy gate and `auto`.
    pub eval: Option<EvalSet<'a>>,
    /// Largest accepted accuracy drop in percentage points (needs `eval`).
    pub max_accuracy_drop: Option<f64>,
    /// Self-test vectors to embed (taken from the calibration samples).
    pub selftest_count: usize,
    /// Extra lineage entries (options of the command line, weights file digests, ...).
    pub extra: serde_json::Value,
}

impl<'a> Request<'a> {
    /// A request with no lineage, default quantizer options, no evaluation set or gate and one
    /// self-test vector; set the other fields with struct update syntax.
    pub fn new(name: &str, graph: Graph, calib: &'a Array, precision: Precision) -> Self {
        Request {
            name: name.into(),
            graph,
            source: serde_json::Value::Null,
            calib,
            calib_sha256: String::new(),
            precision,
            options: QuantizeOptions::default(),
            eval: None,
            max_accuracy_drop: None,
            selftest_count: 1,
            extra: serde_json::Value::Null,
        }
    }
}

/// One row of the per-layer report.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct LayerRow {
    /// Op index in the float graph.
    pub index: usize,
    /// Operator name.
    pub op: &'static str,
    /// int8 or fp16 / f32.
    pub precision: String,
    /// Multiply-accumulates.
    pub macs: u64,
    /// Parameters (weights and biases).
    pub params: usize,
    /// Bytes of the op's output activation in the result.
    pub output_bytes: usize,
    /// SQNR of the op's output against the float model, over the first calibration samples
    /// (dB; infinite when identical).
    pub sqnr_db: f64,
}

/// Per-op output SQNR of `q` against the float graph `g` (same activation ids) over `samples`.
fn layer_sqnr(g: &Graph, q: &Graph, x: &[f32], per: usize, samples: usize) -> Result<Vec<f64>> {
    let mut fr = super::calibrate::ActivationRunner::new(g)?;
    let mut qr = super::calibrate::ActivationRunner::new(q)?;
    let mut signal = vec![0f64; g.tensors.len()];
    let mut noise = vec![0f64; g.tensors.len()];
    let mut reference: Vec<Vec<f32>> = vec![Vec::new(); g.tensors.len()];
    for s in 0..samples {
        let sample = &x[s * per..(s + 1) * per];
        fr.run(sample, |id, v| reference[id] = v.to_vec())?;
        qr.run(sample, |id, v| {
            if let Some(r) = reference.get(id).filter(|r| r.len() == v.len()) {
                for (&a, &b) in r.iter().zip(v) {
                    signal[id] += (a as f64).powi(2);
                    noise[id] += (a as f64 - b as f64).powi(2);
                }
            }
        })?;
    }
    Ok(g.ops
        .iter()
        .map(|op| {
            let id = op.outputs[0];
            if noise[id] == 0.0 {
                f64::INFINITY
            } else {
                10.0 * (signal[id] / noise[id]).log10()
            }
        })
        .collect())
}

/// What `kiln quantize` reports.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Float metric on the evaluation set.
    pub float_metric: Option<f64>,
    /// Quantized metric on the evaluation set.
    pub quantized_metric: Option<f64>,
    /// Metric name.
    pub metric: Option<Metric>,
    /// Planned arena of the result.
    pub arena_bytes: usize,
    /// WEIGHTS bytes of the result.
    pub weights_bytes: usize,
    /// Artifact size.
    pub artifact_bytes: usize,
    /// Share of MACs computed in int8.
    pub int8_mac_fraction: f64,
    /// Per-layer table.
    pub layers: Vec<LayerRow>,
    /// Self-test vectors embedded.
    pub self_tests: usize,
}

/// The result of `kiln quantize`.
pub struct Quantized {
    /// The artifact (not written when the gate refused it).
    pub artifact: Vec<u8>,
    /// The report.
    pub report: Report,
}

fn layer_macs(g: &Graph, op: &crate::ir::Op) -> u64 {
    let shape = |i: usize| {
        op.inputs
            .get(i)
            .and_then(|t| t.map(|t| g.tensors[t].shape.clone()))
            .unwrap_or_default()
    };
    let out: usize = op
        .outputs
        .first()
        .map(|&t| g.tensors[t].elements())
        .unwrap_or(0);
    match op.kind {
        OpKind::Conv2d { .. } => {
            let f = shape(1);
            (out * f.iter().skip(1).product::<usize>()) as u64
        }
        OpKind::DepthwiseConv2d { .. } => {
            let f = shape(1);
            (out * f.get(1).unwrap_or(&1) * f.get(2).unwrap_or(&1)) as u64
        }
        OpKind::FullyConnected { .. } => {
            let w = shape(1);
            (out * w.get(1).unwrap_or(&1)) as u64
        }
        _ => 0,
    }
}

/// Measures the metric of an artifact on the evaluation set.
///
/// # Errors
/// The artifact does not run on the data.
pub fn measure(artifact: &[u8], eval: &EvalSet<'_>) -> Result<f64> {
    match eval.metric {
        Metric::Top1 => {
            let (out, per) = run_real(artifact, eval.x, |_, _| {})?;
            Ok(top1(&out, per, eval.y))
        }
        Metric::Auc => {
            let Array::F32 { shape, data } = eval.x else {
                bail!("AUC needs real-valued clips")
            };
            let scores = anomaly_scores(artifact, data, shape)?;
            Ok(auc(&scores, eval.y))
        }
    }
}

fn artifact_of(lowered: &Lowered, sections: &[(SectionKind, &[u8])]) -> Result<Vec<u8>> {
    let mut all: Vec<(SectionKind, &[u8])> = vec![
        (SectionKind::Graph, &lowered.graph),
        (SectionKind::Weights, &lowered.weights),
    ];
    all.extend_from_slice(sections);
    write_artifact(
        HeaderFields {
            arena_bytes: lowered.arena_bytes as u32,
            ..Default::default()
        },
        &all,
    )
    .map_err(anyhow::Error::msg)
}

fn bare(g: &Graph) -> Result<(Lowered, Vec<u8>)> {
    let lowered = lower(g)?;
    let a = artifact_of(&lowered, &[])?;
    Ok((lowered, a))
}

/// Equal-mass histogram of `values`: `bins + 1` ascending edges and the counts.
pub fn equal_mass_histogram(values: &mut [f32], bins: usize) -> (Vec<f32>, Vec<u32>) {
    values.sort_by(f32::total_cmp);
    let n = values.len();
    let mut edges: Vec<f32> = Vec::with_capacity(bins + 1);
    if n == 0 {
        return (vec![0.0, 1.0], vec![0]);
    }
    edges.push(values[0]);
    for b in 1..bins {
        let v = values[(b * n / bins).min(n - 1)];
        if v > *edges.last().unwrap_or(&f32::NEG_INFINITY) {
            edges.push(v);
        }
    }
    let top = values[n - 1];
    if top > *edges.last().unwrap_or(&f32::NEG_INFINITY) {
        edges.push(top);
    } else {
        edges.push(top + f32::EPSILON.max(top.abs() * 1e-6));
    }
    let mut counts = vec![0u32; edges.len() - 1];
    for &v in values.iter() {
        // Bin i holds edges[i] <= v < edges[i+1]; the top edge is inclusive.
        let i = edges
            .partition_point(|&e| e <= v)
            .saturating_sub(1)
            .min(counts.len() - 1);
        counts[i] += 1;
    }
    (edges, counts)
}

/// Encodes the BASELINE section from (tensor, values) pairs.
pub fn encode_baseline(parts: &mut [(BaselineTensor, Vec<f32>)], bins: usize) -> Result<Vec<u8>> {
    let mut out = postcard::to_allocvec(&BaselineHead {
        count: u8::try_from(parts.len()).context("too many baseline histograms")?,
    })?;
    for (tensor, values) in parts.iter_mut() {
        let (edges, counts) = equal_mass_histogram(values, bins);
        let e: Vec<u8> = edges.iter().flat_map(|v| v.to_le_bytes()).collect();
        let c: Vec<u8> = counts.iter().flat_map(|v| v.to_le_bytes()).collect();
        out.extend(postcard::to_allocvec(&BaselineHistogram {
            tensor: *tensor,
            edges: &e,
            counts: &c,
        })?);
    }
    Ok(out)
}

/// Runs the whole quantization.
///
/// # Errors
/// Bad data, an unsupported graph, or the accuracy gate refusing the result (the error says both
/// figures).
pub fn quantize(
    req: Request<'_>,
    mut progress: impl FnMut(&str, usize, usize),
) -> Result<Quantized> {
    let mut g = normalize(&req.graph)?;
    fold_constants(&mut g);
    fuse_activations(&mut g);
    if g.inputs.len() != 1 || g.outputs.len() != 1 {
        bail!("kiln quantize handles models with one input and one output");
    }
    let calib_data = samples_f32(req.calib)?;
    let per = g.tensors[g.inputs[0]].elements();
    if let Some(e) = &req.eval {
        if req.max_accuracy_drop.is_some() && e.y.is_empty() {
            bail!("the evaluation set has no labels `y`");
        }
    }
    if req.max_accuracy_drop.is_some() && req.eval.is_none() {
        bail!("--max-accuracy-drop needs --eval DATA.npz to measure the drop");
    }
    if req.precision == Precision::Auto && req.eval.is_none() {
        bail!("--precision auto needs --eval DATA.npz to measure each layer's effect on accuracy");
    }
    let weighted: Vec<usize> = (0..g.ops.len())
        .filter(|&i| layer_macs(&g, &g.ops[i]) > 0)
        .collect();

    // The float reference.
    let (_, float_art) = bare(&g)?;
    let float_metric = match &req.eval {
        Some(e) => Some(measure(&float_art, e).context("cannot evaluate the float model")?),
        None => None,
    };

    // The quantized graph.
    let calib: Option<Calibration> = if req.precision == Precision::Fp16 {
        None
    } else {
        Some(calibrate(&g, req.calib, |done, total| {
            progress("calibrating", done, total)
        })?)
    };
    let all_int8: Vec<OpPrecision> = g
        .ops
        .iter()
        .map(|op| {
            if int8_capable(&g, op) {
                OpPrecision::Int8
            } else {
                OpPrecision::Float
            }
        })
        .collect();
    let mixed_opts = QuantizeOptions {
        float_dtype: DType::F16,
        ..req.options
    };
    let (qgraph, precisions) = match req.precision {
        Precision::Fp16 => (to_fp16(&g)?, vec![OpPrecision::Float; g.ops.len()]),
        Precision::Int8 => {
            let c = calib.as_ref().context("internal: no calibration")?;
            (
                quantize_graph(&g, c, &all_int8, &req.options)?,
                all_int8.clone(),
            )
        }
        Precision::Auto => {
            let c = calib.as_ref().context("internal: no calibration")?;
            let eval = req.eval.as_ref().context("internal: no eval")?;
            let budget = req.max_accuracy_drop.unwrap_or(0.1) / 100.0;
            let fm = float_metric.unwrap_or(0.0);
            let q = quantize_graph(&g, c, &all_int8, &mixed_opts)?;
            let m = measure(&bare(&q)?.1, eval)?;
            if fm - m <= budget {
                (q, all_int8.clone())
            } else {
                // Sensitivity: the metric with one weighted layer kept in fp16.
                let mut gains: Vec<(f64, usize)> = Vec::new();
                for (k, &i) in weighted.iter().enumerate() {
                    progress("sensitivity", k + 1, weighted.len());
                    let mut p = all_int8.clone();
                    p[i] = OpPrecision::Float;
                    let qi = quantize_graph(&g, c, &p, &mixed_opts)?;
                    gains.push((measure(&bare(&qi)?.1, eval)? - m, i));
                }
                gains.sort_by(|a, b| b.0.total_cmp(&a.0));
                let mut chosen = None;
                for k in 1..=gains.len() {
                    let mut p = all_int8.clone();
                    for &(_, i) in &gains[..k] {
                        p[i] = OpPrecision::Float;
                    }
                    let qk = quantize_graph(&g, c, &p, &mixed_opts)?;
                    if fm - measure(&bare(&qk)?.1, eval)? <= budget {
                        chosen = Some((qk, p));
                        break;
                    }
                }
                match chosen {
                    Some(found) => found,
                    None => (to_fp16(&g)?, vec![OpPrecision::Float; g.ops.len()]),
                }
            }
        }
    };
    let (lowered, bare_q) = bare(&qgraph)?;
    let quantized_metric = match &req.eval {
        Some(e) => Some(measure(&bare_q, e).context("cannot evaluate the quantized model")?),
        None => None,
    };
    if let (Some(limit), Some(f), Some(q)) = (req.max_accuracy_drop, float_metric, quantized_metric)
    {
        let drop = (f - q) * 100.0;
        if drop > limit {
            bail!(
                "accuracy gate: the quantized model scores {:.2} % against the float model's {:.2} % (drop {:.2} pt > --max-accuracy-drop {limit} pt); no artifact written\nhint: try --estimator percentile or entropy, more calibration data, or --precision auto",
                q * 100.0,
                f * 100.0,
                drop
            );
        }
    }

    // SELFTEST from the first calibration samples, BASELINE from all of them.
    let cases = capture_raw(&bare_q, req.calib, req.selftest_count)?;
    let selftest = encode_self_tests(&cases)?;
    let n = (calib_data.len() / per).min(512);
    let sub = Array::F32 {
        shape: vec![n, per],
        data: calib_data[..n * per].to_vec(),
    };
    let (outs, _) = run_real(&bare_q, &sub, |_, _| {})?;
    let baseline = encode_baseline(
        &mut [
            (BaselineTensor::Input(0), sub_values(&sub)),
            (BaselineTensor::Output(0), outs),
        ],
        16,
    )?;

    let total_macs: u64 = g.ops.iter().map(|op| layer_macs(&g, op)).sum();
    let int8_macs: u64 = g
        .ops
        .iter()
        .zip(&precisions)
        .filter(|(_, p)| **p == OpPrecision::Int8)
        .map(|(op, _)| layer_macs(&g, op))
        .sum();
    let sqnr = layer_sqnr(
        &g,
        &qgraph,
        calib_data,
        per,
        (calib_data.len() / per).min(8),
    )?;
    let float_name = if req.precision == Precision::Fp16 || req.precision == Precision::Auto {
        "fp16"
    } else {
        "f32"
    };
    let layers: Vec<LayerRow> = g
        .ops
        .iter()
        .enumerate()
        .map(|(i, op)| LayerRow {
            index: i,
            op: crate::lower::ir_name(&op.kind),
            precision: if precisions[i] == OpPrecision::Int8 {
                "int8".into()
            } else {
                float_name.into()
            },
            macs: layer_macs(&g, op),
            params: op
                .inputs
                .iter()
                .flatten()
                .filter(|&&t| g.tensors[t].data.is_some())
                .map(|&t| g.tensors[t].elements())
                .sum(),
            output_bytes: qgraph.tensors[op.outputs[0]].elements()
                * qgraph.tensors[op.outputs[0]].dtype.size(),
            sqnr_db: sqnr[i],
        })
        .collect();
    let metric = req.eval.as_ref().map(|e| e.metric);
    let manifest_json = serde_json::json!({
        "name": req.name,
        "kiln_version": env!("CARGO_PKG_VERSION"),
        "source": req.source,
        "calibration": {
            "sha256": req.calib_sha256,
            "samples": calib_data.len() / per,
            "estimator": req.options.estimator.name(),
        },
        "options": {
            "precision": format!("{:?}", req.precision).to_lowercase(),
            "bias_correction": req.options.bias_correction,
            "max_accuracy_drop": req.max_accuracy_drop,
            "selftest_count": req.selftest_count,
        },
        "extra": req.extra,
        "metrics": {
            "metric": metric,
            "eval_sha256": req.eval.as_ref().map(|e| e.sha256.clone()),
            "eval_samples": req.eval.as_ref().map(|e| e.y.len()),
            "float": float_metric,
            "quantized": quantized_metric,
        },
        "precision_per_op": layers.iter().map(|l| l.precision.clone()).collect::<Vec<_>>(),
        "arena_bytes": lowered.arena_bytes,
        "tensor_names": lowered.constant_names(&qgraph),
    })
    .to_string();
    let manifest = postcard::to_allocvec(&Manifest {
        name: &req.name,
        json: &manifest_json,
    })?;
    let artifact = artifact_of(
        &lowered,
        &[
            (SectionKind::Manifest, &manifest),
            (SectionKind::SelfTest, &selftest),
            (SectionKind::Baseline, &baseline),
        ],
    )?;
    Ok(Quantized {
        report: Report {
            float_metric,
            quantized_metric,
            metric,
            arena_bytes: lowered.arena_bytes,
            weights_bytes: lowered.weights.len(),
            artifact_bytes: artifact.len(),
            int8_mac_fraction: if total_macs == 0 {
                0.0
            } else {
                int8_macs as f64 / total_macs as f64
            },
            layers,
            self_tests: cases.len(),
        },
        artifact,
    })
}

fn sub_values(x: &Array) -> Vec<f32> {
    match x {
        Array::F32 { data, .. } => data.clone(),
        Array::I8 { data, .. } => data.iter().map(|&v| v as f32).collect(),
    }
}

/// Default options for the command line.
pub fn options(estimator: Estimator, bias_correction: bool) -> QuantizeOptions {
    QuantizeOptions {
        estimator,
        bias_correction,
        float_dtype: DType::F32,
    }
}
