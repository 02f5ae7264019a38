//! Post-training quantization of a float host graph: int8 (per-channel symmetric weights,
//! asymmetric per-tensor activations, int32 biases, optional bias correction), fp16, or a mix in
//! which some ops stay float with QUANTIZE / DEQUANTIZE at the boundaries.

pub mod calibrate;
pub mod pipeline;
pub mod ranges;

use crate::ir::{Graph, Op, OpKind, QuantInfo, Tensor, TensorId};
use crate::lower::{dequantized, normalize};
use anyhow::{bail, Result};
use calibrate::Calibration;
use kiln_runtime::graph::DType;
use ranges::{estimate, int8_params, Estimator};
use std::collections::HashMap;

/// How one op computes after quantization.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpPrecision {
    /// int8 kernels (TFLM arithmetic).
    Int8,
    /// Float kernels in the graph's float type.
    Float,
}

/// Options of [`quantize_graph`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QuantizeOptions {
    /// Range estimator for activations.
    pub estimator: Estimator,
    /// Correct each conv / FC bias for the mean shift that weight quantization causes.
    pub bias_correction: bool,
    /// Storage type of the ops that stay float: F32 or F16.
    pub float_dtype: DType,
}

impl Default for QuantizeOptions {
    fn default() -> Self {
        QuantizeOptions {
            estimator: Estimator::MinMax,
            bias_correction: true,
            float_dtype: DType::F32,
        }
    }
}

/// Can this op run in int8 in kiln-runtime?
pub fn int8_capable(g: &Graph, op: &Op) -> bool {
    match &op.kind {
        OpKind::Div { .. } | OpKind::Quantize | OpKind::Dequantize => false,
        OpKind::PRelu => op
            .inputs
            .get(1)
            .and_then(|t| t.map(|t| g.tensors[t].elements() == 1))
            .unwrap_or(false),
        _ => true,
    }
}

/// Output quantization fixed by the int8 kernel, whatever the data.
fn fixed_output(kind: &OpKind) -> Option<(f32, i64)> {
    match kind {
        OpKind::Softmax { .. } | OpKind::Logistic => Some((1.0 / 256.0, -128)),
        OpKind::Tanh => Some((1.0 / 128.0, 0)),
        _ => None,
    }
}

/// Int8 ops whose output must carry their input's quantization.
fn passes_quant_through(kind: &OpKind) -> bool {
    matches!(
        kind,
        OpKind::Reshape
            | OpKind::MaxPool2d { .. }
            | OpKind::AveragePool2d { .. }
            | OpKind::Pad { .. }
            | OpKind::Transpose { .. }
    )
}

fn per_tensor(scale: f32, zp: i64) -> QuantInfo {
    QuantInfo {
        scales: vec![scale],
        zero_points: vec![zp],
        axis: 0,
    }
}

fn f32s(t: &Tensor) -> Result<Vec<f32>> {
    Ok(dequantized(t)?)
}

fn bytes_of_f32(v: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F16 => v
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
        _ => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// Symmetric per-channel int8 weights along `axis`: (quantized bytes, scales).
pub fn quantize_weights_per_channel(
    values: &[f32],
    shape: &[usize],
    axis: usize,
) -> (Vec<u8>, Vec<f32>) {
    let channels = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    let mut absmax = vec![0f32; channels];
    for (i, &v) in values.iter().enumerate() {
        let c = (i / inner) % channels;
        absmax[c] = absmax[c].max(v.abs());
    }
    let scales: Vec<f32> = absmax
        .iter()
        .map(|&m| if m > 0.0 { m / 127.0 } else { 1e-8 })
        .collect();
    let q = values
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let c = (i / inner) % channels;
            (v / scales[c]).round().clamp(-127.0, 127.0) as i8 as u8
        })
        .collect();
    (q, scales)
}

fn quantize_per_tensor(values: &[f32], scale: f32, zp: i64) -> Vec<u8> {
    values
        .iter()
        .map(|&v| ((v / scale).round() + zp as f32).clamp(-128.0, 127.0) as i8 as u8)
        .collect()
}

/// Rewrites a float graph into one where each op computes in `precisions[i]`.
///
/// # Errors
/// The graph is not float, an op marked int8 cannot run in int8, or calibration misses a tensor.
pub fn quantize_graph(
    g: &Graph,
    calib: &Calibration,
    precisions: &[OpPrecision],
    opts: &QuantizeOptions,
) -> Result<Graph> {
    let g = normalize(g)?;
    if precisions.len() != g.ops.len() {
        bail!(
            "internal: {} precisions for {} ops",
            precisions.len(),
            g.ops.len()
        );
    }
    for (i, op) in g.ops.iter().enumerate() {
        if precisions[i] == OpPrecision::Int8 && !int8_capable(&g, op) {
            bail!(
                "op {i} ({}) cannot run in int8",
                crate::lower::ir_name(&op.kind)
            );
        }
    }
    // Activation ranges.
    let range = |id: TensorId| -> Result<(f32, f32)> {
        match calib.tensors.get(id).and_then(|s| s.as_ref()) {
            // Graph inputs keep their whole range: clipping the data itself is never wanted.
            Some(st) if g.inputs.contains(&id) => Ok(estimate(st, Estimator::MinMax)),
            Some(st) => Ok(estimate(st, opts.estimator)),
            None => bail!(
                "calibration saw no values for tensor `{}`",
                g.tensors[id].name
            ),
        }
    };
    let mut ranges: HashMap<TensorId, (f32, f32)> = HashMap::new();
    for (i, op) in g.ops.iter().enumerate() {
        if precisions[i] == OpPrecision::Int8 && matches!(op.kind, OpKind::Concatenation { .. }) {
            // Concatenation shares one quantization between its inputs and its output.
            let mut lo = range(op.outputs[0])?.0;
            let mut hi = range(op.outputs[0])?.1;
            for t in op.inputs.iter().flatten() {
                if g.tensors[*t].data.is_none() {
                    let r = range(*t)?;
                    lo = lo.min(r.0);
                    hi = hi.max(r.1);
                }
            }
            for t in op.inputs.iter().flatten().chain(&op.outputs) {
                ranges.insert(*t, (lo, hi));
            }
        }
    }
    let mut act_q: HashMap<TensorId, (f32, i64)> = HashMap::new();
    let q_of = |id: TensorId, act_q: &mut HashMap<TensorId, (f32, i64)>| -> Result<(f32, i64)> {
        if let Some(q) = act_q.get(&id) {
            return Ok(*q);
        }
        let (lo, hi) = match ranges.get(&id) {
            Some(r) => *r,
            None => range(id)?,
        };
        let q = int8_params(lo, hi);
        act_q.insert(id, q);
        Ok(q)
    };
    for &i in &g.inputs {
        q_of(i, &mut act_q)?;
    }
    for (i, op) in g.ops.iter().enumerate() {
        if precisions[i] != OpPrecision::Int8 {
            continue;
        }
        let out = op.outputs[0];
        if let Some(q) = fixed_output(&op.kind) {
            act_q.insert(out, q);
        } else if passes_quant_through(&op.kind) {
            if let Some(Some(inp)) = op.inputs.first() {
                let q = q_of(*inp, &mut act_q)?;
                act_q.insert(out, q);
            }
        } else {
            q_of(out, &mut act_q)?;
        }
    }

    // Float tensors read by int8 ops get a QUANTIZE: they need parameters too.
    for (i, op) in g.ops.iter().enumerate() {
        if precisions[i] == OpPrecision::Int8 {
            for t in op.inputs.iter().flatten() {
                if g.tensors[*t].data.is_none() {
                    q_of(*t, &mut act_q)?;
                }
            }
        }
    }

    // Representation of each activation: the precision of its producer; graph inputs follow
    // their first consumer.
    let mut is_int8: Vec<bool> = vec![false; g.tensors.len()];
    for &inp in &g.inputs {
        if let Some(i) = g.ops.iter().position(|o| o.inputs.contains(&Some(inp))) {
            is_int8[inp] = precisions[i] == OpPrecision::Int8;
        }
    }
    for (i, op) in g.ops.iter().enumerate() {
        is_int8[op.outputs[0]] = precisions[i] == OpPrecision::Int8;
    }

    let float = opts.float_dtype;
    let mut out = Graph {
        name: g.name.clone(),
        tensors: Vec::with_capacity(g.tensors.len()),
        ops: Vec::new(),
        inputs: g.inputs.clone(),
        outputs: g.outputs.clone(),
    };
    // Activations keep their ids; constants are re-created per use.
    for (id, t) in g.tensors.iter().enumerate() {
        let mut nt = t.clone();
        if t.data.is_none() {
            if is_int8[id] {
                let (s, z) = q_of(id, &mut act_q)?;
                nt.dtype = DType::I8;
                nt.quant = Some(per_tensor(s, z));
            } else {
                nt.dtype = float;
                nt.quant = None;
            }
        }
        out.tensors.push(nt);
    }
    let mut converted: HashMap<(TensorId, bool), TensorId> = HashMap::new();
    let uses = crate::passes::consumers(&g);
    for (i, op) in g.ops.iter().enumerate() {
        let int8 = precisions[i] == OpPrecision::Int8;
        let mut inputs = Vec::with_capacity(op.inputs.len());
        for (slot, input) in op.inputs.iter().enumerate() {
            let Some(t) = *input else {
                inputs.push(None);
                continue;
            };
            let src = &g.tensors[t];
            if src.data.is_some() {
                let shared = uses[t] > 1;
                inputs.push(Some(constant_for(
                    &g,
                    &mut out,
                    op,
                    (i, slot, shared),
                    t,
                    int8,
                    float,
                    &act_q,
                    calib,
                    opts,
                )?));
                continue;
            }
            if is_int8[t] == int8 {
                inputs.push(Some(t));
                continue;
            }
            let id = *converted.entry((t, int8)).or_insert_with(|| {
                let mut nt = src.clone();
                nt.name = format!(
                    "{}/{}",
                    src.name,
                    if int8 { "quantized" } else { "dequantized" }
                );
                if int8 {
                    let (s, z) = act_q.get(&t).copied().unwrap_or((1.0, 0));
                    nt.dtype = DType::I8;
                    nt.quant = Some(per_tensor(s, z));
                } else {
                    nt.dtype = float;
                    nt.quant = None;
                }
                out.tensors.push(nt);
                let id = out.tensors.len() - 1;
                out.ops.push(Op {
                    kind: if int8 {
                        OpKind::Quantize
                    } else {
                        OpKind::Dequantize
                    },
                    inputs: vec![Some(t)],
                    outputs: vec![id],
                });
                id
            });
            if int8 && !act_q.contains_key(&t) {
                bail!("calibration has no range for `{}`", src.name);
            }
            inputs.push(Some(id));
        }
        out.ops.push(Op {
            kind: op.kind.clone(),
            inputs,
            outputs: op.outputs.clone(),
        });
    }
    Ok(out)
}

/// A constant operand prepared for input `slot` of op `op_index` (a fresh tensor in `out`);
/// `shared`: other ops read the constant too.
#[allow(clippy::too_many_arguments)]
fn constant_for(
    g: &Graph,
    out: &mut Graph,
    op: &Op,
    (op_index, slot, shared): (usize, usize, bool),
    t: TensorId,
    int8: bool,
    float: DType,
    act_q: &HashMap<TensorId, (f32, i64)>,
    calib: &Calibration,
    opts: &QuantizeOptions,
) -> Result<TensorId> {
    let src = &g.tensors[t];
    let values = f32s(src)?;
    let mut nt = src.clone();
    nt.quant = None;
    if !int8 {
        nt.dtype = float;
        nt.data = Some(bytes_of_f32(&values, float));
    } else {
        let weight_axis = match op.kind {
            OpKind::Conv2d { .. } | OpKind::FullyConnected { .. } => Some(0),
            OpKind::DepthwiseConv2d { .. } => Some(3),
            _ => None,
        };
        let input_q = op
            .inputs
            .first()
            .and_then(|i| *i)
            .and_then(|i| act_q.get(&i).copied());
        match (weight_axis, slot) {
            (Some(axis), 1) => {
                if src.shape.len() <= axis {
                    bail!(
                        "op {op_index}: weights `{}` have rank {}",
                        src.name,
                        src.shape.len()
                    );
                }
                let (q, scales) = quantize_weights_per_channel(&values, &src.shape, axis);
                nt.dtype = DType::I8;
                nt.data = Some(q);
                nt.quant = Some(QuantInfo {
                    zero_points: vec![0; scales.len()],
                    scales,
                    axis,
                });
            }
            (Some(axis), 2) => {
                // int32 bias with scale input_scale * weight_scale[c], corrected for the mean
                // shift that weight quantization causes.
                let w = &g.tensors[op.inputs[1]
                    .ok_or_else(|| anyhow::anyhow!("op {op_index}: missing weights"))?];
                let wv = f32s(w)?;
                let (wq, w_scales) = quantize_weights_per_channel(&wv, &w.shape, axis);
                let (s_in, _) = input_q
                    .ok_or_else(|| anyhow::anyhow!("op {op_index}: input has no quantization"))?;
                let mut bias: Vec<f64> = values.iter().map(|&b| b as f64).collect();
                if opts.bias_correction {
                    let input =
                        op.inputs[0].and_then(|i| calib.tensors.get(i).and_then(|s| s.as_ref()));
                    if let Some(st) = input {
                        let shift = weight_error_mean(
                            &op.kind,
                            &wv,
                            &wq,
                            &w_scales,
                            &w.shape,
                            &st.channel_means,
                        );
                        for (b, d) in bias.iter_mut().zip(shift) {
                            *b -= d;
                        }
                    }
                }
                let q: Vec<u8> = bias
                    .iter()
                    .enumerate()
                    .flat_map(|(c, &b)| {
                        let s = s_in as f64 * w_scales[c.min(w_scales.len() - 1)] as f64;
                        ((b / s).round().clamp(i32::MIN as f64, i32::MAX as f64) as i32)
                            .to_le_bytes()
                    })
                    .collect();
                nt.dtype = DType::I32;
                nt.data = Some(q);
            }
            _ => {
                // Other constant operands: per-tensor int8; a concatenation's constants use the
                // shared quantization of the op.
                let (s, z) = if matches!(op.kind, OpKind::Concatenation { .. }) {
                    act_q
                        .get(&op.outputs[0])
                        .copied()
                        .unwrap_or_else(|| int8_params(0.0, 1.0))
                } else {
                    let lo = values.iter().copied().fold(0f32, f32::min);
                    let hi = values.iter().copied().fold(0f32, f32::max);
                    int8_params(lo, hi)
                };
                nt.dtype = DType::I8;
                nt.data = Some(quantize_per_tensor(&values, s, z));
                nt.quant = Some(per_tensor(s, z));
            }
        }
    }
    // A constant read by several ops (`shared`) is quantized for each of them: the copies are
    // told apart by the op's index. A constant read once keeps its source name, so that an
    // exported artifact's weights apply back to the float model by name.
    if shared {
        nt.name = format!("{}#{op_index}", src.name);
    }
    out.tensors.push(nt);
    Ok(out.tensors.len() - 1)
}

/// E[(W_q - W) x] per output channel, with x replaced by its per-channel calibration mean
/// (spatial stationarity; border padding ignored).
fn weight_error_mean(
    kind: &OpKind,
    w: &[f32],
    wq: &[u8],
    scales: &[f32],
    shape: &[usize],
    means: &[f64],
) -> Vec<f64> {
    let err = |i: usize, c: usize| -> f64 { (wq[i] as i8) as f64 * scales[c] as f64 - w[i] as f64 };
    match kind {
        OpKind::DepthwiseConv2d { .. } => {
            let oc = shape[3];
            let mult = (oc / means.len().max(1)).max(1);
            let mut d = vec![0f64; oc];
            for (i, _) in w.iter().enumerate() {
                let c = i % oc;
                d[c] += err(i, c) * means.get(c / mult).copied().unwrap_or(0.0);
            }
            d
        }
        _ => {
            // Conv OHWI and FC [out, in]: the last axis is the input channel. A grouped conv
            // (the input has `groups` times the filter's channels) reads, for output channel c,
            // the input channels of c's group.
            let oc = shape[0];
            let inner: usize = shape[1..].iter().product();
            let ic = *shape.last().unwrap_or(&1);
            let groups = if ic > 0 && means.len() > ic && means.len().is_multiple_of(ic) {
                means.len() / ic
            } else {
                1
            };
            let per_group = (oc / groups).max(1);
            let mut d = vec![0f64; oc];
            for (i, _) in w.iter().enumerate() {
                let c = i / inner;
                let m = if means.len() >= ic {
                    means
                        .get((c / per_group) * ic + i % ic)
                        .copied()
                        .unwrap_or(0.0)
                } else {
                    0.0
                };
                d[c] += err(i, c) * m;
            }
            d
        }
    }
}

#[cfg(test)]
mod grouped_bias_tests {
    /// Bias correction of a grouped conv uses each group's own input means.
    #[test]
    fn weight_error_mean_of_a_grouped_conv_reads_each_groups_inputs() {
        use super::weight_error_mean;
        // 2 groups, 1 output channel each, 1x1 filter over 2 input channels per group.
        let w = [0.30f32, -0.20, 0.10, 0.40];
        let scales = [0.01f32, 0.01];
        let wq: Vec<u8> = w
            .iter()
            .zip([0, 0, 1, 1])
            .map(|(&v, c)| ((v / scales[c]).round() as i8 + 1) as u8)
            .collect();
        let means = [1.0, 2.0, 10.0, 20.0];
        let kind = crate::ir::OpKind::Conv2d {
            stride: [1, 1],
            dilation: [1, 1],
            padding: crate::ir::Padding::Valid,
            activation: kiln_runtime::graph::Activation::None,
        };
        let d = weight_error_mean(&kind, &w, &wq, &scales, &[2, 1, 1, 2], &means);
        // Each quantized weight is one step (0.01) above the float weight.
        assert!((d[0] - 0.01 * (1.0 + 2.0)).abs() < 1e-6, "{d:?}");
        assert!((d[1] - 0.01 * (10.0 + 20.0)).abs() < 1e-6, "{d:?}");
    }
}
