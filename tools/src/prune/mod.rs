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

use crate::distill::DistillOptions;
use crate::exec_candle::CandleGraph;
use crate::ir::{Graph, OpKind, TensorId};
use crate::lower::{dequantized, normalize, same_padding};
use crate::npy::Array;
use crate::passes::{consumers, fuse_activations};
use crate::quantize::calibrate::samples_f32;
use anyhow::{anyhow, bail, Result};
use candle_core::{DType as CDType, Device, Tensor};
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

/// Cholesky factor `L` (row-major, lower) of `A + ridge·I` for a symmetric positive definite
/// `A`; `None` if it is not positive definite.
fn cholesky(a: &[f64], n: usize, ridge: f64) -> Option<Vec<f64>> {
    let mut l = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let (li, lj) = (&l[i * n..i * n + j], &l[j * n..j * n + j]);
            let dot: f64 = li.iter().zip(lj).map(|(a, b)| a * b).sum();
            let s = a[i * n + j] + if i == j { ridge } else { 0.0 } - dot;
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
    Some(l)
}

/// Solves `L Lᵀ x = b` with a factor from [`cholesky`].
fn cho_solve(l: &[f64], b: &[f64], n: usize) -> Vec<f64> {
    let mut y = vec![0f64; n];
    for i in 0..n {
        let s: f64 = l[i * n..i * n + i].iter().zip(&y).map(|(a, b)| a * b).sum();
        y[i] = (b[i] - s) / l[i * n + i];
    }
    let mut x = vec![0f64; n];
    for i in (0..n).rev() {
        let s: f64 = (i + 1..n).map(|k| l[k * n + i] * x[k]).sum();
        x[i] = (y[i] - s) / l[i * n + i];
    }
    x
}

/// Solves `(A + ridge·I) x = b` for a symmetric positive definite `A` (Cholesky).
#[cfg(test)]
fn solve_spd(a: &[f64], b: &[f64], n: usize, ridge: f64) -> Option<Vec<f64>> {
    Some(cho_solve(&cholesky(a, n, ridge)?, b, n))
}

/// Calibration samples used by the structured search and the least-squares refits.
const MAX_SAMPLES: usize = 128;

/// Runs a batch through `g` with candle and returns the tail input of each chain and the logits
/// (the input of a final SOFTMAX, else the output). Models that do not run batched are run one
/// sample at a time.
fn observe(g: &Graph, chains: &[Chain], x: &Tensor) -> Result<(Vec<Tensor>, Tensor)> {
    let exec = CandleGraph::new(g, &Device::Cpu)?;
    let wanted: Vec<TensorId> = chains
        .iter()
        .map(|c| g.ops[c.tail].inputs[0].unwrap_or(usize::MAX))
        .chain([exec.logits_id()])
        .collect();
    let pick = |env: Vec<Option<Tensor>>| -> Result<Vec<Tensor>> {
        wanted
            .iter()
            .map(|&t| {
                env.get(t)
                    .cloned()
                    .flatten()
                    .ok_or_else(|| anyhow!("activation {t} is never written"))
            })
            .collect()
    };
    let mut got = match exec.activations_batch(x) {
        Ok(env) => pick(env)?,
        Err(_) => {
            let mut parts: Vec<Vec<Tensor>> = vec![Vec::new(); wanted.len()];
            for s in 0..x.dim(0)? {
                for (p, t) in parts
                    .iter_mut()
                    .zip(pick(exec.activations_batch(&x.narrow(0, s, 1)?)?)?)
                {
                    p.push(t);
                }
            }
            parts
                .iter()
                .map(|p| Ok(Tensor::cat(p, 0)?))
                .collect::<Result<Vec<_>>>()?
        }
    };
    let logits = got.pop().ok_or_else(|| anyhow!("no logits"))?;
    Ok((got, logits))
}

/// Removes `remove` output channels of the chain's head (those carrying the least energy into
/// the tail), the matching depthwise channels, and refits the tail: its rows come from `x_now`
/// (the tail's input in the graph as it is now) and its targets from the unpruned model's input
/// `x_orig` and weights `original`.
fn prune_chain(
    g: &mut Graph,
    original: &Graph,
    chain: &Chain,
    x_now: &Tensor,
    x_orig: &Tensor,
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
    let energy: Vec<f32> = x_now.sqr()?.sum((0, 1, 2))?.to_vec1()?;
    let mut weight = vec![0f64; ic];
    for (i, &v) in w_now.iter().enumerate() {
        weight[i % ic] += (v as f64) * (v as f64);
    }
    let mut order: Vec<(f64, usize)> = (0..oc)
        .map(|c| (energy.get(c).copied().unwrap_or(0.0) as f64 * weight[c], c))
        .collect();
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
    let refit = refit_conv(x_now, x_orig, &w_orig, &b_orig, &geometry, &keep)?;

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
/// squared error of the model's logits on the calibration samples) is measured at every step
/// of 1/8 of its channels, and the steps with the least damage per MAC saved are taken first.
/// Each chain's next conv is then refitted by least squares, in order, against the unpruned
/// model's outputs. At most 128 calibration samples are used.
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

/// How [`prune_structured_with`] prunes and recovers.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct StructuredOptions {
    /// Fraction of the model's MACs to remove, in `[0, 1)`.
    pub mac_fraction: f64,
    /// Channels to remove from each prunable chain, in graph order, instead of the allocation
    /// search (`mac_fraction` is then ignored).
    pub remove: Option<Vec<usize>>,
    /// Distill every weight, not only those of the pruned convs.
    pub train_all: bool,
    /// Recovery by distillation after the least-squares refit (`steps == 0`: none).
    pub distill: DistillOptions,
}

/// [`prune_structured`], then, when `distill_steps > 0`, recovery by knowledge distillation with
/// the default [`DistillOptions`] (see [`prune_structured_with`]).
///
/// # Errors
/// As [`prune_structured_with`].
pub fn prune_structured_distilled(
    g: &Graph,
    mac_fraction: f64,
    calib: &Array,
    distill_steps: usize,
    progress: impl FnMut(usize, usize),
) -> Result<(Graph, PruneReport)> {
    let options = StructuredOptions {
        mac_fraction,
        remove: None,
        train_all: false,
        distill: DistillOptions {
            steps: distill_steps,
            ..Default::default()
        },
    };
    prune_structured_with(g, &options, calib, progress)
}

/// [`prune_structured`], then, when `options.distill.steps > 0`, recovery by knowledge
/// distillation: the pruned model is trained to reproduce the unpruned model on augmented
/// calibration samples (see [`crate::distill`]). `progress(done, total)` covers both phases.
///
/// # Errors
/// As [`prune_structured`]; or an op the candle executor does not run.
pub fn prune_structured_with(
    g: &Graph,
    options: &StructuredOptions,
    calib: &Array,
    mut progress: impl FnMut(usize, usize),
) -> Result<(Graph, PruneReport)> {
    let mac_fraction = options.mac_fraction;
    let distill_steps = options.distill.steps;
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
    let in_shape = g.tensors[g.inputs[0]].shape.clone();
    let per: usize = in_shape.iter().product();
    if data.is_empty() || !data.len().is_multiple_of(per) {
        bail!("calibration data has shape {:?}, which is not a whole number of samples of the model's input ({per} values)", calib.shape());
    }
    let n = (data.len() / per).min(MAX_SAMPLES);
    let mut batch_shape = in_shape;
    match batch_shape.first_mut() {
        Some(d) if *d == 1 => *d = n,
        _ => batch_shape.insert(0, n),
    }
    let x = Tensor::from_slice(&data[..n * per], batch_shape.as_slice(), &Device::Cpu)?;
    let (acts, reference) = observe(&g, &chains, &x)?;
    let energy = reference.sqr()?.sum_all()?.to_scalar::<f32>()?.max(1e-30) as f64;
    let damage_of = |candidate: &Graph| -> Result<f64> {
        let (_, out) = observe(candidate, &[], &x)?;
        Ok((out - &reference)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64 / energy)
    };
    let channels: Vec<usize> = chains
        .iter()
        .map(|c| g.tensors[g.ops[c.head].inputs[1].unwrap_or(usize::MAX)].shape[0])
        .collect();
    let total_steps = if options.remove.is_some() {
        0
    } else {
        chains.len() * (STEPS - 2)
    };
    let all = total_steps + chains.len() + distill_steps;
    let removes: Vec<usize> = match &options.remove {
        Some(r) => {
            if r.len() != chains.len() || r.iter().zip(&channels).any(|(&r, &c)| r >= c) {
                bail!(
                    "channels to remove {r:?} do not fit the {} prunable convs with {channels:?} channels",
                    chains.len()
                );
            }
            r.clone()
        }
        None => {
            // Damage and MACs saved of each chain alone at each step.
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
                    progress(done, all);
                }
            }
            // Greedy allocation.
            let target = (report.macs_before as f64 * mac_fraction).ceil() as u64;
            let mut steps = vec![0usize; chains.len()];
            let saved = |steps: &[usize]| -> u64 {
                steps.iter().enumerate().map(|(k, &s)| table[k][s].1).sum()
            };
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
            steps
                .iter()
                .zip(&channels)
                .map(|(&s, &c)| c * s / STEPS)
                .collect()
        }
    };
    // Apply in order, refitting each tail on the partially pruned model's activations.
    let original = g.clone();
    for (k, chain) in chains.iter().enumerate() {
        let remove = removes[k];
        if remove > 0 {
            let (now, _) = observe(&g, std::slice::from_ref(chain), &x)?;
            if let Some(r) = prune_chain(&mut g, &original, chain, &now[0], &acts[k], remove)? {
                report.channels_removed.push(r);
            }
        }
        progress(total_steps + k + 1, all);
    }
    if distill_steps > 0 {
        let before = total_steps + chains.len();
        let mut chain_weights = Vec::new();
        for c in &chains {
            for &o in std::iter::once(&c.head).chain(&c.middle).chain([&c.tail]) {
                chain_weights.extend(g.ops[o].inputs.iter().skip(1).flatten());
            }
        }
        let only = (!options.train_all).then_some(chain_weights.as_slice());
        g = crate::distill::distill_some(&g, &original, calib, &options.distill, only, |d, _| {
            progress(before + d, all)
        })?;
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

/// Rows of the tail's least-squares problems drawn from the calibration activations.
const REFIT_ROWS: usize = 8192;

/// Normal equations of a conv refit: the rows are the tail's input patches (`x_now`, channels
/// `keep`, plus a constant for the bias) at evenly sampled output positions; the targets are the
/// unpruned tail's pre-activation outputs there (`x_orig` through `w`, `b`). Returns `AᵀA`
/// (`n x n`), `AᵀY` (one row of `n` per output channel) and `n`. The patches are gathered and
/// multiplied with candle.
fn normal_equations(
    x_now: &Tensor,
    x_orig: &Tensor,
    w: &[f32],
    b: &[f32],
    geo: &TailGeometry<'_>,
    keep: &[usize],
) -> Result<(Vec<f64>, Vec<f64>, usize)> {
    let (in_shape, out_shape, w_shape) = (geo.in_shape, geo.out_shape, geo.w_shape);
    let (stride, dilation, padding) = (geo.stride, geo.dilation, geo.padding);
    let (ih, iw, ic) = (in_shape[1], in_shape[2], w_shape[3]);
    let (oh, ow) = (out_shape[1], out_shape[2]);
    let (oc, kh, kw) = (w_shape[0], w_shape[1], w_shape[2]);
    let (samples, ic_now) = (x_orig.dim(0)?, x_now.dim(3)?);
    let pad_t = same_padding(padding, stride[0], dilation[0], ih, kh, oh) as isize;
    let pad_l = same_padding(padding, stride[1], dilation[1], iw, kw, ow) as isize;
    let taps = kh * kw;
    // Cell indices of each sampled position's patch (u32::MAX reads zero: padding).
    let total = samples * oh * ow;
    let step = (total / REFIT_ROWS).max(1);
    let mut ids = Vec::with_capacity(total.div_ceil(step) * taps);
    for i in (step - 1..total).step_by(step) {
        let (s, p) = (i / (oh * ow), i % (oh * ow));
        let (oy, ox) = (p / ow, p % ow);
        for fy in 0..kh {
            for fx in 0..kw {
                let y = (oy * stride[0]) as isize - pad_t + (fy * dilation[0]) as isize;
                let xx = (ox * stride[1]) as isize - pad_l + (fx * dilation[1]) as isize;
                let inside = y >= 0 && (y as usize) < ih && xx >= 0 && (xx as usize) < iw;
                ids.push(if inside {
                    u32::try_from((s * ih + y as usize) * iw + xx as usize)?
                } else {
                    u32::MAX
                });
            }
        }
    }
    let rows = ids.len() / taps;
    let dev = x_now.device();
    let ids = Tensor::from_vec(ids, rows * taps, dev)?;
    let keep_ids: Vec<u32> = keep.iter().map(|&c| c as u32).collect();
    let kc = keep.len();
    let keep_ids = Tensor::from_vec(keep_ids, kc, dev)?;
    let a = x_now
        .reshape((samples * ih * iw, ic_now))?
        .index_select(&keep_ids, 1)?
        .index_select(&ids, 0)?
        .reshape((rows, taps * kc))?;
    let a = Tensor::cat(&[a, Tensor::ones((rows, 1), CDType::F32, dev)?], 1)?;
    let full = x_orig
        .reshape((samples * ih * iw, ic))?
        .index_select(&ids, 0)?
        .reshape((rows, taps * ic))?;
    let w = Tensor::from_slice(w, (oc, taps * ic), dev)?;
    let b = Tensor::from_slice(b, oc, dev)?;
    let y = full.matmul(&w.t()?)?.broadcast_add(&b)?;
    // f32 products (candle's f32 gemm is the optimized one), solved in f64.
    let f64s = |t: Tensor| -> Result<Vec<f64>> {
        Ok(t.flatten_all()?.to_dtype(CDType::F64)?.to_vec1::<f64>()?)
    };
    let ata = f64s(a.t()?.matmul(&a)?)?;
    let aty = f64s(y.t()?.matmul(&a)?)?;
    Ok((ata, aty, taps * kc + 1))
}

/// Least-squares refit of a conv that lost input channels: on sampled output positions, the
/// new weights over the kept channels (and a bias) minimise the squared error to the original
/// pre-activation output (with a small ridge). `None` if the system is singular.
#[allow(clippy::type_complexity)]
fn refit_conv(
    x_now: &Tensor,
    x_orig: &Tensor,
    w: &[f32],
    b: &[f32],
    geo: &TailGeometry<'_>,
    keep: &[usize],
) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
    let (ata, aty, n) = normal_equations(x_now, x_orig, w, b, geo, keep)?;
    let (oc, taps, kc) = (geo.w_shape[0], geo.w_shape[1] * geo.w_shape[2], keep.len());
    let scale = (0..n).map(|i| ata[i * n + i]).sum::<f64>() / n as f64;
    let Some(l) = cholesky(&ata, n, 1e-4 * scale.max(1e-12)) else {
        return Ok(None);
    };
    let mut w_new = vec![0f32; oc * taps * kc];
    let mut b_new = vec![0f32; oc];
    for o in 0..oc {
        let sol = cho_solve(&l, &aty[o * n..(o + 1) * n], n);
        for t in 0..taps {
            for j in 0..kc {
                w_new[o * taps * kc + t * kc + j] = sol[t * kc + j] as f32;
            }
        }
        b_new[o] = sol[n - 1] as f32;
    }
    Ok(Some((w_new, b_new)))
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
