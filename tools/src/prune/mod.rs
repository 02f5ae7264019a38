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

mod linalg;
mod refit;

use crate::distill::DistillOptions;
use crate::exec_candle::CandleGraph;
use crate::ir::{Graph, OpKind, TensorId};
use crate::lower::{dequantized, normalize};
use crate::npy::Array;
use crate::passes::{consumers, fold_constants, fuse_activations};
use crate::quantize::calibrate::samples_f32;
use anyhow::{anyhow, bail, Result};
use candle_core::{Device, Tensor};
use kiln_runtime::graph::{Activation, DType};
use refit::{normal_equations, ConvGeometry};
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
    /// The other input of the residual ADD that the tail's output (with no activation of its
    /// own) feeds, if any: the tail's refit then also makes up for that branch's drift.
    residual: Option<TensorId>,
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
                            residual: residual_of(g, c, &uses),
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

/// The other input of the ADD that conv `tail`'s output alone feeds, when `tail` has no
/// activation of its own and that input is an activation of the same shape.
fn residual_of(g: &Graph, tail: usize, uses: &[usize]) -> Option<TensorId> {
    let OpKind::Conv2d {
        activation: Activation::None,
        ..
    } = g.ops[tail].kind
    else {
        return None;
    };
    let out = *g.ops[tail].outputs.first()?;
    if uses[out] != 1 || g.outputs.contains(&out) {
        return None;
    }
    let add = g.ops.iter().find(|o| o.inputs.contains(&Some(out)))?;
    let OpKind::Add { .. } = add.kind else {
        return None;
    };
    let other: Vec<TensorId> = add
        .inputs
        .iter()
        .flatten()
        .copied()
        .filter(|&t| t != out)
        .collect();
    match other[..] {
        [r] if g.tensors[r].data.is_none() && g.tensors[r].shape == g.tensors[out].shape => Some(r),
        _ => None,
    }
}

/// Channel steps of the allocation search (sixteenths of a conv's output channels).
const STEPS: usize = 16;

/// Calibration samples used by the structured search and the least-squares refits.
const MAX_SAMPLES: usize = 128;

/// Runs a batch through `g` with candle and returns the activations `ids` and the logits (the
/// input of a final SOFTMAX, else the output). Models that do not run batched are run one
/// sample at a time.
fn observe(g: &Graph, ids: &[TensorId], x: &Tensor) -> Result<(Vec<Tensor>, Tensor)> {
    let exec = CandleGraph::new(g, &Device::Cpu)?;
    let wanted: Vec<TensorId> = ids.iter().copied().chain([exec.logits_id()]).collect();
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

/// The activations a chain's refits read: the head's input, the tail's input and the residual.
struct ChainActs {
    head_in: Tensor,
    tail_in: Tensor,
    residual: Option<Tensor>,
}

fn chain_ids(g: &Graph, chain: &Chain) -> Vec<TensorId> {
    let input = |op: usize| g.ops[op].inputs[0].unwrap_or(usize::MAX);
    [input(chain.head), input(chain.tail)]
        .into_iter()
        .chain(chain.residual)
        .collect()
}

fn chain_acts(chain: &Chain, got: &mut impl Iterator<Item = Tensor>) -> Result<ChainActs> {
    let mut next = || got.next().ok_or_else(|| anyhow!("missing activation"));
    Ok(ChainActs {
        head_in: next()?,
        tail_in: next()?,
        residual: chain.residual.map(|_| next()).transpose()?,
    })
}

/// Weights and bias of conv `op` in `g` as f32 (a missing bias reads as zeros).
fn conv_params(g: &Graph, op: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let w = g.ops[op].inputs[1].ok_or_else(|| anyhow!("conv without a filter"))?;
    let b = match g.ops[op].inputs.get(2).and_then(|t| *t) {
        Some(b) => f32_data(&g.tensors[b])?,
        None => vec![0.0; g.tensors[w].shape[0]],
    };
    Ok((f32_data(&g.tensors[w])?, b))
}

/// Sets the bias of conv `op`, adding a bias tensor if it has none.
fn set_bias(g: &mut Graph, op: usize, values: &[f32]) {
    match g.ops[op].inputs.get(2).and_then(|t| *t) {
        Some(b) => set_f32(&mut g.tensors[b], values),
        None => {
            let w = g.ops[op].inputs[1].unwrap_or(usize::MAX);
            g.tensors.push(crate::ir::Tensor {
                name: format!("{}/refit_bias", g.tensors[w].name),
                dtype: DType::F32,
                shape: vec![values.len()],
                data: None,
                quant: None,
            });
            let id = g.tensors.len() - 1;
            set_f32(&mut g.tensors[id], values);
            let op = &mut g.ops[op];
            op.inputs.resize(3, None);
            op.inputs[2] = Some(id);
        }
    }
}

/// The refit geometry of conv `op` (shapes of the unpruned model).
fn geometry(original: &Graph, op: usize) -> Result<ConvGeometry> {
    let o = &original.ops[op];
    let shape = |t: Option<TensorId>| -> Result<Vec<usize>> {
        let t = t.ok_or_else(|| anyhow!("conv without an input"))?;
        Ok(original.tensors[t].shape.clone())
    };
    ConvGeometry::of(
        &o.kind,
        &shape(o.inputs[0])?,
        &shape(o.outputs.first().copied())?,
        &shape(o.inputs.get(1).and_then(|t| *t))?,
    )
    .ok_or_else(|| anyhow!("only plain convs are refitted"))
}

/// How a chain is pruned: its channels in the order they go, and the tail's refitted features
/// (`taps·channels` weights and a bias per output) after each number of removals asked for.
struct ChainFit {
    order: Vec<usize>,
    channels: usize,
    taps: usize,
    n: usize,
    weights: Vec<(usize, Vec<f64>)>,
}

/// Prepares pruning `chain` in `g`: when the head's input has drifted from the unpruned
/// model's (an earlier chain was pruned), the head is refitted in place by least squares to the
/// unpruned head's output. Then the tail's least-squares problem — its input patches in `g`
/// against the unpruned tail's output, plus the drift of the residual branch it is added to —
/// is solved, and channels are removed greedily by group Optimal Brain Surgeon, which picks the
/// channel whose loss the others make up for best and refits them exactly. `counts` are the
/// numbers of removed channels whose refitted weights are kept.
fn fit_chain(
    g: &mut Graph,
    original: &Graph,
    chain: &Chain,
    x: &Tensor,
    orig: &ChainActs,
    counts: &[usize],
    shrink: f64,
) -> Result<ChainFit> {
    let ids = chain_ids(g, chain);
    let (now, _) = observe(g, &ids[..1], x)?;
    let drift = (&now[0] - &orig.head_in)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    if drift > 0.0 {
        let geo = geometry(original, chain.head)?;
        let (w, b) = conv_params(original, chain.head)?;
        let (mut ata, mut aty, n) = normal_equations(&now[0], &orig.head_in, &w, &b, &geo, None)?;
        let (w_now, b_now) = conv_params(g, chain.head)?;
        refit::shrink_toward(
            &mut ata,
            &mut aty,
            n,
            &refit::to_features(&w_now, &b_now),
            shrink,
        );
        let l = linalg::cholesky(&ata, n, 0.0)
            .ok_or_else(|| anyhow!("the refit of a pruned conv's input layer is singular"))?;
        let solved: Vec<f64> = aty
            .chunks(n)
            .flat_map(|row| linalg::cho_solve(&l, row, n))
            .collect();
        let channels = now[0].dim(3)?;
        let all: Vec<usize> = (0..channels).collect();
        let (filter, bias) = refit::to_filter(&solved, n, geo.taps(), channels, &all);
        let hw = g.ops[chain.head].inputs[1].unwrap_or(usize::MAX);
        set_f32(&mut g.tensors[hw], &filter);
        set_bias(g, chain.head, &bias);
    }
    let (now, _) = observe(g, &ids[1..], x)?;
    let correction = match (&orig.residual, now.get(1)) {
        (Some(r_orig), Some(r_now)) => Some((r_orig - r_now)?),
        _ => None,
    };
    let geo = geometry(original, chain.tail)?;
    let (w, b) = conv_params(original, chain.tail)?;
    let (mut ata, mut aty, n) =
        normal_equations(&now[0], &orig.tail_in, &w, &b, &geo, correction.as_ref())?;
    let (w_now, b_now) = conv_params(g, chain.tail)?;
    refit::shrink_toward(
        &mut ata,
        &mut aty,
        n,
        &refit::to_features(&w_now, &b_now),
        shrink,
    );
    let mut h_inv = linalg::spd_inverse(&ata, n, 0.0)
        .ok_or_else(|| anyhow!("the refit of a pruned conv's consumer is singular"))?;
    let mut solved: Vec<f64> = aty
        .chunks(n)
        .flat_map(|row| {
            (0..n)
                .map(|i| (0..n).map(|j| h_inv[i * n + j] * row[j]).sum::<f64>())
                .collect::<Vec<_>>()
        })
        .collect();
    let channels = now[0].dim(3)?;
    let taps = geo.taps();
    let mut alive = vec![true; channels];
    let mut order = Vec::new();
    let mut wanted = counts.to_vec();
    wanted.sort_unstable();
    wanted.dedup();
    let mut weights = Vec::with_capacity(wanted.len());
    for count in wanted {
        if count > order.len() {
            let more = count - order.len();
            order.extend(
                linalg::remove_channels_obs(&mut h_inv, &mut solved, n, taps, &mut alive, more)
                    .into_iter()
                    .map(|(c, _)| c),
            );
        }
        if order.len() == count {
            weights.push((count, solved.clone()));
        }
    }
    Ok(ChainFit {
        order,
        channels,
        taps,
        n,
        weights,
    })
}

/// Removes the first `count` channels of `fit` from the chain's head (and its depthwise convs)
/// and writes the tail's refitted weights; with `count == 0` only the refit. Returns the head's
/// name, its channels and how many were removed.
fn apply_chain(
    g: &mut Graph,
    chain: &Chain,
    fit: &ChainFit,
    count: usize,
) -> Result<(String, usize, usize)> {
    let w = fit
        .weights
        .iter()
        .find(|(c, _)| *c == count)
        .map(|(_, w)| w)
        .ok_or_else(|| anyhow!("no refit for {count} removed channels"))?;
    let removed = &fit.order[..count];
    let keep: Vec<usize> = (0..fit.channels).filter(|c| !removed.contains(c)).collect();
    let (filter, bias) = refit::to_filter(w, fit.n, fit.taps, fit.channels, &keep);
    let hw = g.ops[chain.head].inputs[1].unwrap_or(usize::MAX);
    if count > 0 {
        keep_channels(&mut g.tensors[hw], 0, &keep)?;
        if let Some(b) = g.ops[chain.head].inputs.get(2).and_then(|t| *t) {
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
    }
    let tw = g.ops[chain.tail].inputs[1].unwrap_or(usize::MAX);
    g.tensors[tw].shape[3] = keep.len();
    set_f32(&mut g.tensors[tw], &filter);
    set_bias(g, chain.tail, &bias);
    Ok((g.tensors[hw].name.clone(), fit.channels, count))
}

/// Removes output channels of prunable conv chains until `mac_fraction` of the model's MACs is
/// gone. How many channels each chain loses is chosen greedily: each chain's damage (relative
/// squared error of the model's logits on the calibration samples) is measured at every step
/// of 1/16 of its channels, and the steps with the least damage per MAC saved are taken first.
/// Which channels go, and the refit of the convs around them, come from least squares against
/// the unpruned model (see `fit_chain`). At most 128 calibration samples are used.
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
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StructuredOptions {
    /// Fraction of the model's MACs to remove, in `[0, 1)`.
    pub mac_fraction: f64,
    /// Channels to remove from each prunable chain, in graph order, instead of the allocation
    /// search (`mac_fraction` is then ignored).
    pub remove: Option<Vec<usize>>,
    /// Distill every weight, not only those of the pruned convs.
    pub train_all: bool,
    /// Strength of the refits' pull toward the current weights (a fraction of the mean
    /// diagonal of the normal equations; see [`StructuredOptions::DEFAULT_SHRINK`]).
    pub shrink: f64,
    /// Also refit on the calibration samples mirrored left to right (images).
    pub flip: bool,
    /// Recovery by distillation after the least-squares refit (`steps == 0`: none).
    pub distill: DistillOptions,
}

impl StructuredOptions {
    /// The default pull of the refits toward the current weights.
    pub const DEFAULT_SHRINK: f64 = 1e-4;
}

impl Default for StructuredOptions {
    fn default() -> Self {
        Self {
            mac_fraction: 0.0,
            remove: None,
            train_all: false,
            shrink: Self::DEFAULT_SHRINK,
            flip: false,
            distill: DistillOptions::default(),
        }
    }
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
        distill: DistillOptions {
            steps: distill_steps,
            ..Default::default()
        },
        ..Default::default()
    };
    prune_structured_with(g, &options, calib, progress)
}

/// Channel counts each chain may lose in the allocation search.
fn step_counts(channels: usize) -> Vec<usize> {
    let mut counts: Vec<usize> = (1..STEPS - 1).map(|s| channels * s / STEPS).collect();
    counts.retain(|&c| c > 0 && c < channels);
    counts.dedup();
    counts
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
    fold_constants(&mut g);
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
    let mut x = Tensor::from_slice(&data[..n * per], batch_shape.as_slice(), &Device::Cpu)?;
    if options.flip && x.rank() == 4 {
        let w = x.dim(2)?;
        let reversed = Tensor::from_vec((0..w as u32).rev().collect::<Vec<_>>(), w, &Device::Cpu)?;
        x = Tensor::cat(&[&x, &x.index_select(&reversed, 2)?], 0)?;
    }
    let ids: Vec<TensorId> = chains.iter().flat_map(|c| chain_ids(&g, c)).collect();
    let (got, reference) = observe(&g, &ids, &x)?;
    let mut got = got.into_iter();
    let acts: Vec<ChainActs> = chains
        .iter()
        .map(|c| chain_acts(c, &mut got))
        .collect::<Result<_>>()?;
    let energy = reference.sqr()?.sum_all()?.to_scalar::<f32>()?.max(1e-30) as f64;
    let damage_of = |candidate: &Graph| -> Result<f64> {
        let (_, out) = observe(candidate, &[], &x)?;
        Ok((out - &reference)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64 / energy)
    };
    let channels: Vec<usize> = chains
        .iter()
        .map(|c| g.tensors[g.ops[c.head].inputs[1].unwrap_or(usize::MAX)].shape[0])
        .collect();
    let original = g.clone();
    let search_steps: usize = match options.remove {
        Some(_) => 0,
        None => channels.iter().map(|&c| step_counts(c).len()).sum(),
    };
    let all = search_steps + chains.len() + distill_steps;
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
            // Damage and MACs saved of each chain alone at each step (entry 0: untouched).
            let mut table: Vec<Vec<(usize, f64, u64)>> = Vec::with_capacity(chains.len());
            let mut done = 0;
            for (k, chain) in chains.iter().enumerate() {
                let counts = step_counts(channels[k]);
                let mut base = g.clone();
                let fit = fit_chain(
                    &mut base,
                    &original,
                    chain,
                    &x,
                    &acts[k],
                    &counts,
                    options.shrink,
                )?;
                let mut row = vec![(0, 0.0, 0)];
                for &count in &counts {
                    let mut candidate = base.clone();
                    apply_chain(&mut candidate, chain, &fit, count)?;
                    row.push((
                        count,
                        damage_of(&candidate)?,
                        report.macs_before - graph_macs(&candidate),
                    ));
                    done += 1;
                    progress(done, all);
                }
                table.push(row);
            }
            // Greedy allocation.
            let target = (report.macs_before as f64 * mac_fraction).ceil() as u64;
            let mut steps = vec![0usize; chains.len()];
            let saved = |steps: &[usize]| -> u64 {
                steps.iter().enumerate().map(|(k, &s)| table[k][s].2).sum()
            };
            while saved(&steps) < target {
                let best = (0..chains.len())
                    .filter(|&k| steps[k] + 1 < table[k].len())
                    .map(|k| {
                        let (_, d0, m0) = table[k][steps[k]];
                        let (_, d1, m1) = table[k][steps[k] + 1];
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
            // The last steps may overshoot: give back the costliest steps the target does not need.
            loop {
                let undo = (0..chains.len())
                    .filter(|&k| steps[k] > 0)
                    .filter(|&k| {
                        let mut fewer = steps.clone();
                        fewer[k] -= 1;
                        saved(&fewer) >= target
                    })
                    .max_by(|&a, &b| {
                        let gain = |k: usize| table[k][steps[k]].1 - table[k][steps[k] - 1].1;
                        gain(a).total_cmp(&gain(b))
                    });
                match undo {
                    Some(k) => steps[k] -= 1,
                    None => break,
                }
            }
            steps
                .iter()
                .enumerate()
                .map(|(k, &s)| table[k][s].0)
                .collect()
        }
    };
    // Apply in graph order, each chain refitted on the partially pruned model's activations;
    // chains that lose nothing are still refitted once something upstream was pruned.
    let mut pruned_upstream = false;
    for (k, chain) in chains.iter().enumerate() {
        let remove = removes[k];
        if remove > 0 || pruned_upstream {
            let fit = fit_chain(
                &mut g,
                &original,
                chain,
                &x,
                &acts[k],
                &[remove],
                options.shrink,
            )?;
            let r = apply_chain(&mut g, chain, &fit, remove)?;
            if remove > 0 {
                report.channels_removed.push(r);
                pruned_upstream = true;
            }
        }
        progress(search_steps + k + 1, all);
    }
    if distill_steps > 0 {
        let before = search_steps + chains.len();
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
