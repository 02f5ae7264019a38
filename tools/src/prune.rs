//! Pruning of float graphs.
//!
//! - Unstructured: in every conv / depthwise / fully-connected weight tensor, the smallest
//!   magnitudes are set to zero until the layer reaches the target sparsity. Shapes stay; the
//!   report gives the sparsity and the size of the weights in a bitmap-sparse encoding.
//! - Structured: output channels of a conv whose output feeds (possibly through depthwise convs)
//!   exactly one other conv are removed — the filters with the smallest L1 norm — together with
//!   the matching depthwise channels and the next conv's input channels. MACs and activations
//!   really shrink. Recovery: the next conv is refitted by least squares on calibration data so
//!   that its (pre-activation) output matches the unpruned model's.

use crate::ir::{Graph, OpKind, TensorId};
use crate::lower::{dequantized, normalize, same_padding};
use crate::npy::Array;
use crate::passes::{consumers, fuse_activations};
use crate::quantize::calibrate::{samples_f32, ActivationRunner};
use anyhow::{bail, Result};
use kiln_runtime::graph::DType;
use serde::Serialize;

/// What pruning did.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct PruneReport {
    /// Weight elements before.
    pub weights_before: usize,
    /// Weight elements that are non-zero after.
    pub nonzero_after: usize,
    /// Fraction of weights that are zero after.
    pub sparsity: f64,
    /// Bytes of the f32 weights stored densely.
    pub dense_bytes: usize,
    /// Bytes of the weights in a bitmap-sparse encoding (one bit per element plus the non-zero
    /// values).
    pub compressed_bytes: usize,
    /// MACs before.
    pub macs_before: u64,
    /// MACs after.
    pub macs_after: u64,
    /// Channels removed per pruned conv (structured).
    pub channels_removed: Vec<(String, usize, usize)>,
}

fn f32_data(t: &crate::ir::Tensor) -> Result<Vec<f32>> {
    Ok(dequantized(t)?)
}

fn set_f32(t: &mut crate::ir::Tensor, v: &[f32]) {
    t.data = Some(v.iter().flat_map(|x| x.to_le_bytes()).collect());
    t.dtype = DType::F32;
}

/// MACs of a float graph (conv, depthwise, fully connected).
pub fn graph_macs(g: &Graph) -> u64 {
    g.ops
        .iter()
        .map(|op| {
            let w = op
                .inputs
                .get(1)
                .and_then(|t| *t)
                .map(|t| g.tensors[t].shape.clone())
                .unwrap_or_default();
            let out = op
                .outputs
                .first()
                .map(|&t| g.tensors[t].elements())
                .unwrap_or(0) as u64;
            match op.kind {
                OpKind::Conv2d { .. } => out * w.iter().skip(1).product::<usize>() as u64,
                OpKind::DepthwiseConv2d { .. } => {
                    out * (w.get(1).unwrap_or(&1) * w.get(2).unwrap_or(&1)) as u64
                }
                OpKind::FullyConnected { .. } => out * *w.get(1).unwrap_or(&1) as u64,
                _ => 0,
            }
        })
        .sum()
}

fn weight_ids(g: &Graph) -> Vec<TensorId> {
    g.ops
        .iter()
        .filter(|op| {
            matches!(
                op.kind,
                OpKind::Conv2d { .. }
                    | OpKind::DepthwiseConv2d { .. }
                    | OpKind::FullyConnected { .. }
            )
        })
        .filter_map(|op| op.inputs.get(1).and_then(|t| *t))
        .filter(|&t| g.tensors[t].data.is_some())
        .collect()
}

fn fill_sparsity(g: &Graph, report: &mut PruneReport) -> Result<()> {
    let (mut total, mut nonzero, mut compressed) = (0, 0, 0);
    for t in weight_ids(g) {
        let v = f32_data(&g.tensors[t])?;
        let nz = v.iter().filter(|&&x| x != 0.0).count();
        total += v.len();
        nonzero += nz;
        compressed += v.len().div_ceil(8) + 4 * nz;
    }
    report.nonzero_after = nonzero;
    report.sparsity = if total == 0 {
        0.0
    } else {
        1.0 - nonzero as f64 / total as f64
    };
    report.dense_bytes = 4 * total;
    report.compressed_bytes = compressed;
    report.macs_after = graph_macs(g);
    Ok(())
}

/// Zeroes the smallest-magnitude `sparsity` fraction of each weight tensor.
///
/// # Errors
/// `sparsity` outside `[0, 1)` or a graph that is not float.
pub fn prune_unstructured(g: &Graph, sparsity: f64) -> Result<(Graph, PruneReport)> {
    if !(0.0..1.0).contains(&sparsity) {
        bail!("sparsity must be in [0, 1), got {sparsity}");
    }
    let mut g = normalize(g)?;
    let mut report = PruneReport {
        macs_before: graph_macs(&g),
        ..Default::default()
    };
    for t in weight_ids(&g) {
        let mut v = f32_data(&g.tensors[t])?;
        report.weights_before += v.len();
        let k = (v.len() as f64 * sparsity).floor() as usize;
        if k == 0 {
            continue;
        }
        let mut mags: Vec<f32> = v.iter().map(|x| x.abs()).collect();
        mags.sort_by(f32::total_cmp);
        let threshold = mags[k - 1];
        let mut zeroed = 0;
        for x in v.iter_mut() {
            if x.abs() <= threshold && zeroed < k {
                *x = 0.0;
                zeroed += 1;
            }
        }
        set_f32(&mut g.tensors[t], &v);
    }
    fill_sparsity(&g, &mut report)?;
    Ok((g, report))
}

/// A prunable chain: conv `head` → depthwise convs `middle` → conv `tail`, each intermediate
/// tensor read only by the next op.
#[derive(Clone, Debug)]
struct Chain {
    head: usize,
    middle: Vec<usize>,
    tail: usize,
}

fn find_chains(g: &Graph) -> Vec<Chain> {
    let uses = consumers(g);
    let consumer_of = |t: TensorId| {
        g.ops
            .iter()
            .position(|o| o.inputs.first() == Some(&Some(t)))
    };
    let mut chains = Vec::new();
    for (h, op) in g.ops.iter().enumerate() {
        let OpKind::Conv2d { .. } = op.kind else {
            continue;
        };
        let filter = op.inputs.get(1).and_then(|t| *t).map(|t| &g.tensors[t]);
        let input = op.inputs.first().and_then(|t| *t).map(|t| &g.tensors[t]);
        // Grouped convs keep their channel coupling: only plain convs are heads.
        if let (Some(f), Some(i)) = (filter, input) {
            if f.shape.get(3) != i.shape.get(3) {
                continue;
            }
        }
        let mut t = op.outputs[0];
        let mut middle = Vec::new();
        loop {
            if uses[t] != 1 || g.outputs.contains(&t) {
                break;
            }
            let Some(c) = consumer_of(t) else { break };
            match &g.ops[c].kind {
                OpKind::DepthwiseConv2d {
                    depth_multiplier, ..
                } if *depth_multiplier <= 1 => {
                    let w = g.ops[c]
                        .inputs
                        .get(1)
                        .and_then(|t| *t)
                        .map(|t| &g.tensors[t]);
                    let inp = &g.tensors[t];
                    if w.map(|w| w.shape.get(3)) != Some(inp.shape.get(3)) {
                        break;
                    }
                    middle.push(c);
                    t = g.ops[c].outputs[0];
                }
                OpKind::Conv2d { .. } => {
                    let w = g.ops[c]
                        .inputs
                        .get(1)
                        .and_then(|t| *t)
                        .map(|t| &g.tensors[t]);
                    if w.map(|w| w.shape.get(3)) == Some(g.tensors[t].shape.get(3)) {
                        chains.push(Chain {
                            head: h,
                            middle,
                            tail: c,
                        });
                    }
                    break;
                }
                _ => break,
            }
        }
    }
    chains
}

/// Keeps `keep` channels along `axis` of a constant.
fn keep_channels(t: &mut crate::ir::Tensor, axis: usize, keep: &[usize]) -> Result<()> {
    let v = f32_data(t)?;
    let shape = t.shape.clone();
    let inner: usize = shape[axis + 1..].iter().product();
    let outer: usize = shape[..axis].iter().product();
    let c = shape[axis];
    let mut out = Vec::with_capacity(outer * keep.len() * inner);
    for o in 0..outer {
        for &k in keep {
            let at = (o * c + k) * inner;
            out.extend_from_slice(&v[at..at + inner]);
        }
    }
    t.shape[axis] = keep.len();
    set_f32(t, &out);
    Ok(())
}

/// Solves `(A + ridge·I) x = b` for a symmetric positive definite `A` (Cholesky).
fn solve_spd(a: &[f64], b: &[f64], n: usize, ridge: f64) -> Option<Vec<f64>> {
    let mut l = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let mut s = a[i * n + j] + if i == j { ridge } else { 0.0 };
            for k in 0..j {
                s -= l[i * n + k] * l[j * n + k];
            }
            if i == j {
                if s <= 0.0 {
                    return None;
                }
                l[i * n + i] = s.sqrt();
            } else {
                l[i * n + j] = s / l[j * n + j];
            }
        }
    }
    let mut y = vec![0f64; n];
    for i in 0..n {
        let s: f64 = (0..i).map(|k| l[i * n + k] * y[k]).sum();
        y[i] = (b[i] - s) / l[i * n + i];
    }
    let mut x = vec![0f64; n];
    for i in (0..n).rev() {
        let s: f64 = (i + 1..n).map(|k| l[k * n + i] * x[k]).sum();
        x[i] = (y[i] - s) / l[i * n + i];
    }
    Some(x)
}

/// Tail inputs of every chain and the graph output, per calibration sample, concatenated.
fn observe(
    g: &Graph,
    chains: &[Chain],
    data: &[f32],
    per: usize,
    n: usize,
) -> Result<(Vec<Vec<f32>>, Vec<f32>)> {
    let mut runner = ActivationRunner::new(g)?;
    let tail_inputs: Vec<TensorId> = chains
        .iter()
        .map(|c| g.ops[c.tail].inputs[0].unwrap_or(usize::MAX))
        .collect();
    // Damage is measured before a final SOFTMAX (on the logits), where errors are not squashed.
    let out = match g.ops.last() {
        Some(op) if matches!(op.kind, OpKind::Softmax { .. }) => {
            op.inputs[0].unwrap_or(g.outputs[0])
        }
        _ => g.outputs[0],
    };
    let mut acts: Vec<Vec<f32>> = vec![Vec::new(); chains.len()];
    let mut outputs = Vec::new();
    for s in 0..n {
        runner.run(&data[s * per..(s + 1) * per], |id, v| {
            for (k, &t) in tail_inputs.iter().enumerate() {
                if t == id {
                    acts[k].extend_from_slice(v);
                }
            }
            if id == out {
                outputs.extend_from_slice(v);
            }
        })?;
    }
    Ok((acts, outputs))
}

/// Removes `remove` output channels of the chain's head (those carrying the least energy into
/// the tail), the matching depthwise channels, and refits the tail: its rows come from `x_now`
/// (the tail's input in the graph as it is now) and its targets from the unpruned model's input
/// `x_orig` and weights `original`.
fn prune_chain(
    g: &mut Graph,
    original: &Graph,
    chain: &Chain,
    x_now: &[f32],
    x_orig: &[f32],
    remove: usize,
) -> Result<Option<(String, usize, usize)>> {
    let head = &g.ops[chain.head];
    let (hw, hb) = (
        head.inputs[1].unwrap_or(usize::MAX),
        head.inputs.get(2).and_then(|t| *t),
    );
    let oc = g.tensors[hw].shape[0];
    if remove == 0 || remove >= oc {
        return Ok(None);
    }
    let tail = g.ops[chain.tail].clone();
    let tw = tail.inputs[1].unwrap_or(usize::MAX);
    let tb = tail.inputs.get(2).and_then(|t| *t);
    let w_now = f32_data(&g.tensors[tw])?;
    let w_orig = f32_data(&original.tensors[tw])?;
    let b_orig: Vec<f32> = match tb {
        Some(b) => f32_data(&original.tensors[b])?,
        None => vec![0.0; original.tensors[tw].shape[0]],
    };
    let in_shape = g.tensors[tail.inputs[0].unwrap_or(usize::MAX)]
        .shape
        .clone();
    let out_shape = g.tensors[tail.outputs[0]].shape.clone();
    let w_shape = g.tensors[tw].shape.clone();
    let w_orig_shape = original.tensors[tw].shape.clone();
    let OpKind::Conv2d {
        stride,
        dilation,
        padding,
        ..
    } = tail.kind
    else {
        return Ok(None);
    };
    // Keep the channels that carry the most energy into the tail's output:
    // E[x_c^2] * sum over the tail's filters of w[.., c]^2.
    let ic = in_shape[3];
    let mut energy = vec![0f64; ic];
    for (i, &v) in x_now.iter().enumerate() {
        energy[i % ic] += (v as f64) * (v as f64);
    }
    let mut weight = vec![0f64; ic];
    for (i, &v) in w_now.iter().enumerate() {
        weight[i % ic] += (v as f64) * (v as f64);
    }
    let mut order: Vec<(f64, usize)> = (0..oc).map(|c| (energy[c] * weight[c], c)).collect();
    order.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut keep: Vec<usize> = order[..oc - remove].iter().map(|&(_, c)| c).collect();
    keep.sort_unstable();
    let geometry = TailGeometry {
        in_shape: &in_shape,
        out_shape: &out_shape,
        w_shape: &w_orig_shape,
        stride,
        dilation,
        padding,
    };
    let refit = refit_conv(x_now, ic, x_orig, &w_orig, &b_orig, &geometry, &keep);

    keep_channels(&mut g.tensors[hw], 0, &keep)?;
    if let Some(b) = hb {
        keep_channels(&mut g.tensors[b], 0, &keep)?;
    }
    let mut t = g.ops[chain.head].outputs[0];
    g.tensors[t].shape[3] = keep.len();
    for &m in &chain.middle {
        let mw = g.ops[m].inputs[1].unwrap_or(usize::MAX);
        keep_channels(&mut g.tensors[mw], 3, &keep)?;
        if let Some(b) = g.ops[m].inputs.get(2).and_then(|t| *t) {
            keep_channels(&mut g.tensors[b], 0, &keep)?;
        }
        t = g.ops[m].outputs[0];
        g.tensors[t].shape[3] = keep.len();
    }
    match refit {
        Some((w_new, b_new)) => {
            let mut shape = w_shape.clone();
            shape[3] = keep.len();
            g.tensors[tw].shape = shape;
            set_f32(&mut g.tensors[tw], &w_new);
            match tb {
                Some(b) => set_f32(&mut g.tensors[b], &b_new),
                None => {
                    g.tensors.push(crate::ir::Tensor {
                        name: format!("{}/refit_bias", g.tensors[tw].name),
                        dtype: DType::F32,
                        shape: vec![b_new.len()],
                        data: None,
                        quant: None,
                    });
                    let id = g.tensors.len() - 1;
                    set_f32(&mut g.tensors[id], &b_new);
                    let tail_op = &mut g.ops[chain.tail];
                    tail_op.inputs.resize(3, None);
                    tail_op.inputs[2] = Some(id);
                }
            }
        }
        None => keep_channels(&mut g.tensors[tw], 3, &keep)?,
    }
    Ok(Some((g.tensors[hw].name.clone(), oc, remove)))
}

/// Channel steps of the allocation search (eighths of a conv's output channels).
const STEPS: usize = 8;

/// Removes output channels of prunable conv chains until `mac_fraction` of the model's MACs is
/// gone. How many channels each chain loses is chosen greedily: each chain's damage (relative
/// squared error of the model's output on the calibration samples) is measured at every step
/// of 1/8 of its channels, and the steps with the least damage per MAC saved are taken first.
/// Each chain's next conv is then refitted by least squares, in order, against the unpruned
/// model's outputs.
///
/// # Errors
/// No prunable chain, a fraction outside `[0, 1)`, a target no allocation reaches, or
/// calibration data that does not fit the model.
pub fn prune_structured(
    g: &Graph,
    mac_fraction: f64,
    calib: &Array,
    progress: impl FnMut(usize, usize),
) -> Result<(Graph, PruneReport)> {
    prune_structured_distilled(g, mac_fraction, calib, 0, progress)
}

/// Adam learning rate of the distillation step of [`prune_structured_distilled`].
pub const DISTILL_LR: f64 = 3e-3;

/// [`prune_structured`], then, when `distill_steps > 0`, recovery by knowledge distillation:
/// every conv / depthwise / fully-connected weight of the pruned model is trained for
/// `distill_steps` steps so that its logits match the unpruned model's on the calibration data
/// (see [`crate::exec_candle::distill`]). `progress(done, total)` covers both phases.
///
/// # Errors
/// As [`prune_structured`]; or an op the candle executor does not run (when distilling).
pub fn prune_structured_distilled(
    g: &Graph,
    mac_fraction: f64,
    calib: &Array,
    distill_steps: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<(Graph, PruneReport)> {
    if !(0.0..1.0).contains(&mac_fraction) {
        bail!("sparsity must be in [0, 1), got {mac_fraction}");
    }
    let mut g = normalize(g)?;
    fuse_activations(&mut g);
    let mut report = PruneReport {
        macs_before: graph_macs(&g),
        ..Default::default()
    };
    report.weights_before = weight_ids(&g)
        .iter()
        .map(|&t| g.tensors[t].elements())
        .sum();
    let chains = find_chains(&g);
    if chains.is_empty() {
        bail!("no conv in this model can lose output channels (each must feed exactly one conv, possibly through depthwise convs)\nhint: use unstructured pruning (without --structured)");
    }
    let data = samples_f32(calib)?;
    let per = g.tensors[g.inputs[0]].elements();
    if data.is_empty() || !data.len().is_multiple_of(per) {
        bail!("calibration data has shape {:?}, which is not a whole number of samples of the model's input ({per} values)", calib.shape());
    }
    let n = (data.len() / per).min(64);
    let (acts, reference) = observe(&g, &chains, data, per, n)?;
    let energy: f64 = reference
        .iter()
        .map(|&v| (v as f64).powi(2))
        .sum::<f64>()
        .max(1e-30);
    let damage_of = |candidate: &Graph| -> Result<f64> {
        let (_, out) = observe(candidate, &[], data, per, n)?;
        Ok(out
            .iter()
            .zip(&reference)
            .map(|(&a, &b)| ((a - b) as f64).powi(2))
            .sum::<f64>()
            / energy)
    };
    let channels: Vec<usize> = chains
        .iter()
        .map(|c| g.tensors[g.ops[c.head].inputs[1].unwrap_or(usize::MAX)].shape[0])
        .collect();
    // Damage and MACs saved of each chain alone at each step.
    let total_steps = chains.len() * (STEPS - 2);
    let mut table = vec![vec![(0.0f64, 0u64); STEPS - 1]; chains.len()];
    let mut done = 0;
    for (k, chain) in chains.iter().enumerate() {
        for (step, entry) in table[k].iter_mut().enumerate().skip(1) {
            let remove = channels[k] * step / STEPS;
            let mut candidate = g.clone();
            prune_chain(&mut candidate, &g, chain, &acts[k], &acts[k], remove)?;
            *entry = (
                damage_of(&candidate)?,
                report.macs_before - graph_macs(&candidate),
            );
            done += 1;
            progress(done, total_steps + chains.len() + distill_steps);
        }
    }
    // Greedy allocation.
    let target = (report.macs_before as f64 * mac_fraction).ceil() as u64;
    let mut steps = vec![0usize; chains.len()];
    let saved =
        |steps: &[usize]| -> u64 { steps.iter().enumerate().map(|(k, &s)| table[k][s].1).sum() };
    while saved(&steps) < target {
        let best = (0..chains.len())
            .filter(|&k| steps[k] + 1 < STEPS - 1)
            .map(|k| {
                let (d0, m0) = table[k][steps[k]];
                let (d1, m1) = table[k][steps[k] + 1];
                (
                    (d1 - d0).max(0.0) / (m1.saturating_sub(m0)).max(1) as f64,
                    k,
                )
            })
            .min_by(|a, b| a.0.total_cmp(&b.0));
        match best {
            Some((_, k)) => steps[k] += 1,
            None => bail!(
                "cannot remove {:.0} % of the MACs by pruning channels (at most {:.0} % here)\nhint: ask for less",
                mac_fraction * 100.0,
                saved(&steps) as f64 / report.macs_before as f64 * 100.0
            ),
        }
    }
    // Apply in order, refitting each tail on the partially pruned model's activations.
    let original = g.clone();
    let all = total_steps + chains.len() + distill_steps;
    for (k, chain) in chains.iter().enumerate() {
        let remove = channels[k] * steps[k] / STEPS;
        if remove > 0 {
            let (now, _) = observe(&g, std::slice::from_ref(chain), data, per, n)?;
            if let Some(r) = prune_chain(&mut g, &original, chain, &now[0], &acts[k], remove)? {
                report.channels_removed.push(r);
            }
        }
        progress(total_steps + k + 1, all);
    }
    if distill_steps > 0 {
        let before = total_steps + chains.len();
        g = crate::exec_candle::distill(
            &g,
            &original,
            calib,
            distill_steps,
            DISTILL_LR,
            |d, _| progress(before + d, all),
        )?;
    }
    fill_sparsity(&g, &mut report)?;
    Ok((g, report))
}

/// Geometry of the conv being refitted (shapes of the unpruned model).
struct TailGeometry<'a> {
    in_shape: &'a [usize],
    out_shape: &'a [usize],
    w_shape: &'a [usize],
    stride: [usize; 2],
    dilation: [usize; 2],
    padding: crate::ir::Padding,
}

/// Least-squares refit of a conv that lost input channels: on sampled output positions, the
/// new weights over the kept channels (and a bias) minimise the squared error to the original
/// pre-activation output. Returns `None` if the system is singular.
fn refit_conv(
    x_now: &[f32],
    ic_now: usize,
    x_orig: &[f32],
    w: &[f32],
    b: &[f32],
    geo: &TailGeometry<'_>,
    keep: &[usize],
) -> Option<(Vec<f32>, Vec<f32>)> {
    let (in_shape, out_shape, w_shape) = (geo.in_shape, geo.out_shape, geo.w_shape);
    let (stride, dilation, padding) = (geo.stride, geo.dilation, geo.padding);
    let (ih, iw, ic) = (in_shape[1], in_shape[2], w_shape[3]);
    let (oh, ow) = (out_shape[1], out_shape[2]);
    let (oc, kh, kw) = (w_shape[0], w_shape[1], w_shape[2]);
    let samples = x_orig.len() / (ih * iw * ic);
    let pad_t = same_padding(padding, stride[0], dilation[0], ih, kh, oh) as isize;
    let pad_l = same_padding(padding, stride[1], dilation[1], iw, kw, ow) as isize;
    let kc = keep.len();
    let n = kh * kw * kc + 1;
    let mut ata = vec![0f64; n * n];
    let mut aty = vec![0f64; n * oc];
    // A deterministic subsample of positions keeps the system small and the refit fast.
    let positions = oh * ow;
    let step = (positions * samples / 4096).max(1);
    let mut row = vec![0f64; n];
    let mut full = vec![0f64; kh * kw * ic];
    let mut now = vec![0f64; kh * kw * ic_now];
    let mut idx = 0usize;
    for s in 0..samples {
        for p in 0..positions {
            idx += 1;
            if !idx.is_multiple_of(step) {
                continue;
            }
            let (oy, ox) = (p / ow, p % ow);
            let img = &x_orig[s * ih * iw * ic..(s + 1) * ih * iw * ic];
            let img_now = &x_now[s * ih * iw * ic_now..(s + 1) * ih * iw * ic_now];
            for fy in 0..kh {
                for fx in 0..kw {
                    let y = (oy * stride[0]) as isize - pad_t + (fy * dilation[0]) as isize;
                    let xx = (ox * stride[1]) as isize - pad_l + (fx * dilation[1]) as isize;
                    let inside = y >= 0 && (y as usize) < ih && xx >= 0 && (xx as usize) < iw;
                    for c in 0..ic {
                        full[(fy * kw + fx) * ic + c] = if inside {
                            img[((y as usize) * iw + xx as usize) * ic + c] as f64
                        } else {
                            0.0
                        };
                    }
                    for c in 0..ic_now {
                        now[(fy * kw + fx) * ic_now + c] = if inside {
                            img_now[((y as usize) * iw + xx as usize) * ic_now + c] as f64
                        } else {
                            0.0
                        };
                    }
                }
            }
            for t in 0..kh * kw {
                for (j, &c) in keep.iter().enumerate() {
                    row[t * kc + j] = now[t * ic_now + c];
                }
            }
            row[n - 1] = 1.0;
            for i in 0..n {
                if row[i] == 0.0 {
                    continue;
                }
                for j in 0..=i {
                    ata[i * n + j] += row[i] * row[j];
                }
            }
            for o in 0..oc {
                let target: f64 = b[o] as f64
                    + full
                        .iter()
                        .zip(&w[o * kh * kw * ic..(o + 1) * kh * kw * ic])
                        .map(|(&a, &ww)| a * ww as f64)
                        .sum::<f64>();
                for i in 0..n {
                    aty[o * n + i] += row[i] * target;
                }
            }
        }
    }
    for i in 0..n {
        for j in 0..i {
            ata[j * n + i] = ata[i * n + j];
        }
    }
    let scale = (0..n).map(|i| ata[i * n + i]).sum::<f64>() / n as f64;
    let ridge = 1e-4 * scale.max(1e-12);
    let mut w_new = vec![0f32; oc * kh * kw * kc];
    let mut b_new = vec![0f32; oc];
    for o in 0..oc {
        let sol = solve_spd(&ata, &aty[o * n..(o + 1) * n], n, ridge)?;
        for t in 0..kh * kw {
            for j in 0..kc {
                w_new[o * kh * kw * kc + t * kc + j] = sol[t * kc + j] as f32;
            }
        }
        b_new[o] = sol[n - 1] as f32;
    }
    Some((w_new, b_new))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cholesky_solves_a_small_system() {
        // [[4, 2], [2, 3]] x = [2, 1] -> x = [0.5, 0]
        let x = solve_spd(&[4.0, 2.0, 2.0, 3.0], &[2.0, 1.0], 2, 0.0).unwrap();
        assert!((x[0] - 0.5).abs() < 1e-12 && x[1].abs() < 1e-12);
    }
}
