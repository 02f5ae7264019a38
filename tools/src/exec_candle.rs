//! A second executor of the host IR, on candle-core: float graphs run in f32 on any candle
//! [`Device`] (the CPU in tests), independently of kiln-runtime's kernels.
//!
//! It serves as a reference for the runtime's float path (two implementations that agree), and as
//! a faster activation source for calibration on machines with an accelerator
//! ([`calibrate_with_candle`]).
//!
//! # Layouts
//!
//! Every activation is kept in its **IR layout** (NHWC for 4-D tensors, exactly the IR shape), so
//! that the ops that do not care about space (concatenation on an axis, mean over axes, pad,
//! transpose, reshape, broadcasting arithmetic, softmax over the last axis) use the IR's axes as
//! they are. Only the spatial ops — conv, depthwise conv and pooling — permute their input to
//! NCHW, call candle's NCHW kernel, and permute the result back to NHWC. Weights are converted
//! once, when the [`CandleGraph`] is built: conv filters OHWI → OIHW, depthwise filters
//! `[1, kh, kw, C*m]` → `[C*m, 1, kh, kw]` (a grouped conv with one group per input channel),
//! fully-connected weights `[out, in]` → `[in, out]` (so the op is one matmul).
//!
//! TFLite semantics that candle does not have natively are built from candle ops: SAME padding
//! is explicit (possibly asymmetric) zero padding before a VALID candle conv; average pooling
//! excludes padded cells from the average (candle's average is rescaled by
//! `window / in-image cells`); max pooling pads with `f32::MIN`; non-square strides run at stride
//! 1 and subsample, non-square dilations materialize the dilated kernel.

use crate::ir::{Graph, OpKind, Padding, TensorId};
use crate::lower::{dequantized, ir_name, normalize, same_padding};
use crate::npy::Array;
use crate::quantize::calibrate::Calibration;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType as CDType, Device, Tensor, Var};
use kiln_runtime::graph::{Activation, DType};

/// Element-wise binary operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
}

/// One op, prepared: weights converted and uploaded, padding computed.
#[derive(Debug)]
enum Step {
    Conv {
        /// OIHW (depthwise: `[C*m, 1, kh, kw]`), dilation already applied when non-square.
        kernel: Tensor,
        /// `[1, O, 1, 1]`.
        bias: Option<Tensor>,
        /// top, bottom, left, right.
        pad: [usize; 4],
        stride: [usize; 2],
        /// Square dilation passed to candle (1 when the kernel was dilated here).
        dilation: usize,
        groups: usize,
        act: Activation,
    },
    /// A conv (one group) or a depthwise conv (multiplier 1) in NHWC as a gather and a matmul,
    /// so that training runs on gemm: the input `[n, h, w, c]`, seen as `[n, h*w, c]`, is
    /// gathered at `ids` (for each output position, each filter tap: the input cell, or
    /// `u32::MAX` for padding, which reads zero) into `[n*oh*ow, taps*c]`, times the filter.
    Gather {
        /// `oh * ow * taps` cell indices.
        ids: Tensor,
        /// Conv: the OHWI filter as `[o, taps*c]`; depthwise: `[taps, c]`.
        weights: Tensor,
        /// `[o]`.
        bias: Option<Tensor>,
        /// Filter taps (`kh * kw`).
        taps: usize,
        depthwise: bool,
        act: Activation,
    },
    FullyConnected {
        /// `[in, out]`.
        weights_t: Tensor,
        bias: Option<Tensor>,
        act: Activation,
    },
    Binary {
        op: BinOp,
        act: Activation,
    },
    Pool {
        max: bool,
        filter: [usize; 2],
        stride: [usize; 2],
        /// top, bottom, left, right.
        pad: [usize; 4],
        /// `window / in-image cells` per output position (`[1, 1, oh, ow]`), for average pooling
        /// with padding.
        rescale: Option<Tensor>,
        act: Activation,
    },
    Reshape,
    Softmax {
        beta: f32,
    },
    Relu,
    Relu6,
    Concatenation {
        axis: usize,
        act: Activation,
    },
    Pad {
        paddings: Vec<[usize; 2]>,
    },
    Mean {
        axes: Vec<usize>,
    },
    Logistic,
    Tanh,
    Transpose {
        perm: Vec<usize>,
    },
    LeakyRelu {
        alpha: f32,
    },
    PRelu,
    HardSigmoid {
        alpha: f32,
        beta: f32,
    },
    HardSwish,
    Clamp {
        min: f32,
        max: f32,
    },
}

#[derive(Debug)]
struct PreparedOp {
    index: usize,
    name: &'static str,
    step: Step,
    /// Activation (or generic constant) operands the step reads, in order; weights of conv / FC
    /// live in the step.
    inputs: Vec<TensorId>,
    output: TensorId,
    out_shape: Vec<usize>,
}

/// A normalized float host graph with its weights on a candle device, ready to run one sample
/// at a time.
#[derive(Debug)]
pub struct CandleGraph {
    device: Device,
    tensors: usize,
    input: TensorId,
    input_shape: Vec<usize>,
    output: TensorId,
    /// Constants read by generic ops (binary operands, concat parts, PRELU slopes), IR layout.
    constants: Vec<Option<Tensor>>,
    ops: Vec<PreparedOp>,
    /// Trainable weights (only for [`CandleGraph::new_trainable`]).
    params: Vec<Param>,
}

/// Layout of a trainable weight on the device, relative to its IR tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ParamLayout {
    /// Conv filter OIHW (IR: OHWI).
    ConvOihw,
    /// Depthwise filter `[C, 1, kh, kw]` (IR: `[1, kh, kw, C]`).
    DepthwiseC1hw,
    /// Fully-connected weights `[in, out]` (IR: `[out, in]`).
    FcTransposed,
    /// A bias, any shape holding the IR's values in order.
    Flat,
}

/// A trainable weight: the variable and the IR tensor it came from.
#[derive(Debug)]
struct Param {
    var: Var,
    ir: TensorId,
    layout: ParamLayout,
}

/// Wraps a prepared weight as a trainable variable when `params` is given.
fn param(
    t: Tensor,
    ir: TensorId,
    layout: ParamLayout,
    params: &mut Option<&mut Vec<Param>>,
) -> Result<Tensor> {
    match params {
        Some(p) => {
            let var = Var::from_tensor(&t.contiguous()?)?;
            let t = var.as_tensor().clone();
            p.push(Param { var, ir, layout });
            Ok(t)
        }
        None => Ok(t),
    }
}

fn op_err(index: usize, name: &str, reason: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("op {index} ({name}): {reason}")
}

/// (before, after) padding of one spatial dimension, TFLite's SAME (extra cell after) or VALID.
fn pad_pair(
    padding: Padding,
    stride: usize,
    dilation: usize,
    input: usize,
    filter: usize,
    output: usize,
) -> (usize, usize) {
    match padding {
        Padding::Valid => (0, 0),
        Padding::Same => {
            let before = same_padding(padding, stride, dilation, input, filter, output);
            let effective = (filter - 1) * dilation + 1;
            let total = ((output.max(1) - 1) * stride + effective).saturating_sub(input);
            (before, total.saturating_sub(before))
        }
    }
}

fn activate(x: Tensor, act: Activation) -> candle_core::Result<Tensor> {
    match act {
        Activation::None => Ok(x),
        Activation::Relu => x.relu(),
        Activation::ReluN1To1 => x.clamp(-1f32, 1f32),
        Activation::Relu6 => x.clamp(0f32, 6f32),
    }
}

/// Pads `dim` of `t` with `before` / `after` cells of `value`.
fn pad_value(
    t: &Tensor,
    dim: usize,
    before: usize,
    after: usize,
    value: f32,
) -> candle_core::Result<Tensor> {
    if before == 0 && after == 0 {
        return Ok(t.clone());
    }
    if value == 0.0 {
        return t.pad_with_zeros(dim, before, after);
    }
    let mut parts = Vec::with_capacity(3);
    let mut dims = t.dims().to_vec();
    if before > 0 {
        dims[dim] = before;
        parts.push(Tensor::full(value, dims.clone(), t.device())?);
    }
    parts.push(t.clone());
    if after > 0 {
        dims[dim] = after;
        parts.push(Tensor::full(value, dims, t.device())?);
    }
    Tensor::cat(&parts, dim)
}

/// Keeps every `step`-th index of `dim` (for non-square strides).
fn subsample(t: &Tensor, dim: usize, step: usize) -> candle_core::Result<Tensor> {
    if step == 1 {
        return Ok(t.clone());
    }
    let n = t.dim(dim)?;
    let idx: Vec<u32> = (0..n).step_by(step).map(|i| i as u32).collect();
    let len = idx.len();
    let idx = Tensor::from_vec(idx, len, t.device())?;
    t.index_select(&idx, dim)
}

/// Cuts the spatial dims of an NCHW tensor to `[h, w]` (candle's floor arithmetic can give a
/// larger output than the IR when padding is VALID with leftovers; never a smaller one).
fn fit_spatial(t: Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (_, _, th, tw) = t.dims4()?;
    if th < h || tw < w {
        bail!("computed a {th}x{tw} output where the graph says {h}x{w}");
    }
    let t = if th > h { t.narrow(2, 0, h)? } else { t };
    Ok(if tw > w { t.narrow(3, 0, w)? } else { t })
}

impl CandleGraph {
    /// Uploads a float graph (normalized first: constant DEQUANTIZE folded, hybrid weights
    /// dequantized) to `device`.
    ///
    /// # Errors
    /// The graph has several inputs or outputs, an activation that is not f32, or an op this
    /// executor does not run (named with its index).
    pub fn new(g: &Graph, device: &Device) -> Result<Self> {
        Self::build(g, device, false)
    }

    /// As [`CandleGraph::new`], with the conv, depthwise and fully-connected weights and biases
    /// held as trainable [`Var`]s (see [`crate::distill`]). Tensor ids are those of the graph (normalizing
    /// keeps them), so the trained weights can be written back with
    /// [`CandleGraph::write_weights`].
    ///
    /// # Errors
    /// As [`CandleGraph::new`].
    pub fn new_trainable(g: &Graph, device: &Device) -> Result<Self> {
        Self::build(g, device, true)
    }

    /// The trainable variables (empty unless built by [`CandleGraph::new_trainable`]).
    pub fn vars(&self) -> Vec<Var> {
        self.params.iter().map(|p| p.var.clone()).collect()
    }

    /// The trainable variables with the IR tensor each one holds.
    pub fn vars_by_tensor(&self) -> Vec<(TensorId, Var)> {
        self.params.iter().map(|p| (p.ir, p.var.clone())).collect()
    }

    /// Writes the current values of the trainable weights into `g` (the graph this executor was
    /// built from, or its normalized form), in the IR's layouts, as f32.
    ///
    /// # Errors
    /// A weight whose shape no longer matches the graph's tensor.
    pub fn write_weights(&self, g: &mut Graph) -> Result<()> {
        for p in &self.params {
            let t = p.var.as_tensor();
            let ir = match p.layout {
                ParamLayout::ConvOihw => t.permute((0, 2, 3, 1))?,
                ParamLayout::DepthwiseC1hw => t.permute((1, 2, 3, 0))?,
                ParamLayout::FcTransposed => t.t()?,
                ParamLayout::Flat => t.clone(),
            };
            let v = ir.flatten_all()?.to_vec1::<f32>()?;
            let dst = g
                .tensors
                .get_mut(p.ir)
                .ok_or_else(|| anyhow!("weight tensor {} is not in the graph", p.ir))?;
            if p.layout != ParamLayout::Flat && ir.dims() != dst.shape.as_slice() {
                bail!(
                    "weight `{}` is {:?} in the graph, {:?} trained",
                    dst.name,
                    dst.shape,
                    ir.dims()
                );
            }
            if v.len() != dst.elements() {
                bail!(
                    "weight `{}` has {} values in the graph, {} trained",
                    dst.name,
                    dst.elements(),
                    v.len()
                );
            }
            dst.data = Some(v.iter().flat_map(|x| x.to_le_bytes()).collect());
            dst.dtype = DType::F32;
            dst.quant = None;
        }
        Ok(())
    }

    fn build(g: &Graph, device: &Device, trainable: bool) -> Result<Self> {
        let g = normalize(g)?;
        let mut params = Vec::new();
        let (&[input], &[output]) = (g.inputs.as_slice(), g.outputs.as_slice()) else {
            bail!(
                "the candle executor runs graphs with one input and one output; this one has {} and {}",
                g.inputs.len(),
                g.outputs.len()
            );
        };
        let mut constants: Vec<Option<Tensor>> = vec![None; g.tensors.len()];
        let mut ops = Vec::with_capacity(g.ops.len());
        for (index, op) in g.ops.iter().enumerate() {
            let name = ir_name(&op.kind);
            let &[out] = op.outputs.as_slice() else {
                return Err(op_err(index, name, "ops must have exactly one output"));
            };
            let out_t = g
                .tensors
                .get(out)
                .ok_or_else(|| op_err(index, name, "output id out of range"))?;
            if out_t.dtype != DType::F32 {
                return Err(op_err(
                    index,
                    name,
                    format!(
                        "output `{}` is {:?}; the candle executor runs float (f32) graphs — pass the float model, not a quantized one",
                        out_t.name, out_t.dtype
                    ),
                ));
            }
            let prepared = prepare(
                &g,
                op,
                device,
                &mut constants,
                &mut trainable.then_some(&mut params),
            )
            .with_context(|| format!("op {index} ({name})"))?;
            ops.push(PreparedOp {
                index,
                name,
                step: prepared.0,
                inputs: prepared.1,
                output: out,
                out_shape: out_t.shape.clone(),
            });
        }
        let in_t = &g.tensors[input];
        if in_t.dtype != DType::F32 {
            bail!(
                "the graph input `{}` is {:?}; the candle executor runs float (f32) graphs",
                in_t.name,
                in_t.dtype
            );
        }
        Ok(CandleGraph {
            device: device.clone(),
            tensors: g.tensors.len(),
            input,
            input_shape: in_t.shape.clone(),
            output,
            constants,
            ops,
            params,
        })
    }

    /// Elements of one input sample.
    pub fn input_elements(&self) -> usize {
        self.input_shape.iter().product()
    }

    /// Runs one sample (IR layout, NHWC for images) and returns the graph output (IR layout).
    ///
    /// # Errors
    /// The sample has the wrong size, or a candle op fails.
    pub fn run(&self, input: &[f32]) -> Result<Vec<f32>> {
        let env = self.execute(input)?;
        let out = env[self.output]
            .as_ref()
            .ok_or_else(|| anyhow!("the graph output is never written"))?;
        Ok(out.flatten_all()?.to_vec1::<f32>()?)
    }

    /// Runs one sample and returns every activation (the input, each op's output) in IR layout,
    /// indexed by IR tensor id; `None` for constants and unused tensors.
    ///
    /// # Errors
    /// As [`CandleGraph::run`].
    pub fn run_all(&self, input: &[f32]) -> Result<Vec<Option<Vec<f32>>>> {
        self.execute(input)?
            .into_iter()
            .map(|t| {
                t.map(|t| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) })
                    .transpose()
            })
            .collect()
    }

    /// Runs one sample and calls `visit(id, values)` for every activation, in execution order
    /// (the input first).
    ///
    /// # Errors
    /// As [`CandleGraph::run`].
    pub fn visit(&self, input: &[f32], mut visit: impl FnMut(TensorId, &[f32])) -> Result<()> {
        let env = self.execute(input)?;
        let mut order = vec![self.input];
        order.extend(self.ops.iter().map(|op| op.output));
        for id in order {
            if let Some(t) = &env[id] {
                visit(id, &t.flatten_all()?.to_vec1::<f32>()?);
            }
        }
        Ok(())
    }

    fn execute(&self, input: &[f32]) -> Result<Vec<Option<Tensor>>> {
        let per = self.input_elements();
        if input.len() != per {
            bail!(
                "the sample has {} values; the model's input {:?} takes {per}",
                input.len(),
                self.input_shape
            );
        }
        let x = Tensor::from_slice(input, self.input_shape.clone(), &self.device)?;
        self.execute_batch(x, 1)
    }

    /// The shape of one input sample (IR layout, first dimension 1).
    pub fn input_shape(&self) -> &[usize] {
        &self.input_shape
    }

    /// The tensor id of the logits: the input of a final SOFTMAX, else the graph output.
    pub fn logits_id(&self) -> TensorId {
        match self.ops.last() {
            Some(op) if matches!(op.step, Step::Softmax { .. }) && op.output == self.output => {
                op.inputs[0]
            }
            _ => self.output,
        }
    }

    /// Runs `n` samples at once (`[n, ...]`, each sample in IR layout) and returns the logits
    /// (the input of a final SOFTMAX, else the output) as `[n, ...]`, differentiable with
    /// respect to the trainable weights.
    ///
    /// # Errors
    /// The graph's first dimension is not a batch of 1, or a candle op fails.
    pub fn logits_batch(&self, x: &Tensor) -> Result<Tensor> {
        let n = x.dim(0)?;
        let env = self.execute_batch(x.clone(), n)?;
        env[self.logits_id()]
            .clone()
            .ok_or_else(|| anyhow!("the logits are never written"))
    }

    /// Runs `n` samples at once (`[n, ...]`) and returns every activation (the input, each op's
    /// output) as `[n, ...]` candle tensors indexed by IR tensor id, differentiable with respect
    /// to the trainable weights; `None` for constants and unused tensors.
    ///
    /// # Errors
    /// As [`CandleGraph::logits_batch`].
    pub fn activations_batch(&self, x: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let n = x.dim(0)?;
        self.execute_batch(x.clone(), n)
    }

    /// With `n > 1`, every activation's first dimension (which must be 1 in the graph) is the
    /// batch.
    fn execute_batch(&self, x: Tensor, n: usize) -> Result<Vec<Option<Tensor>>> {
        let batched = |shape: &[usize]| -> Result<Vec<usize>> {
            let mut s = shape.to_vec();
            if n != 1 {
                match s.first_mut() {
                    Some(d) if *d == 1 => *d = n,
                    _ => bail!("cannot run a batch of {n}: an activation has shape {shape:?}, whose first dimension is not 1"),
                }
            }
            Ok(s)
        };
        let in_shape = batched(&self.input_shape)?;
        let mut env: Vec<Option<Tensor>> = vec![None; self.tensors];
        env[self.input] = Some(x.reshape(in_shape)?);
        for op in &self.ops {
            let out_shape = batched(&op.out_shape)?;
            let mut args = Vec::with_capacity(op.inputs.len());
            for &t in &op.inputs {
                let v = env[t]
                    .as_ref()
                    .or(self.constants[t].as_ref())
                    .ok_or_else(|| {
                        op_err(
                            op.index,
                            op.name,
                            format!("input tensor {t} is never written"),
                        )
                    })?;
                args.push(v);
            }
            let out = self
                .step(op, &args, &out_shape)
                .map_err(|e| op_err(op.index, op.name, e))?;
            if out.dims() != out_shape.as_slice() {
                return Err(op_err(
                    op.index,
                    op.name,
                    format!(
                        "computed shape {:?}, the graph says {:?}",
                        out.dims(),
                        out_shape
                    ),
                ));
            }
            env[op.output] = Some(out.contiguous()?);
        }
        Ok(env)
    }

    fn step(&self, op: &PreparedOp, args: &[&Tensor], out_shape: &[usize]) -> Result<Tensor> {
        let x = args[0];
        Ok(match &op.step {
            Step::Conv {
                kernel,
                bias,
                pad,
                stride,
                dilation,
                groups,
                act,
            } => {
                let nchw = x.permute((0, 3, 1, 2))?;
                let nchw = pad_value(&nchw, 2, pad[0], pad[1], 0.0)?;
                let nchw = pad_value(&nchw, 3, pad[2], pad[3], 0.0)?.contiguous()?;
                let y = if stride[0] == stride[1] {
                    nchw.conv2d(kernel, 0, stride[0], *dilation, *groups)?
                } else {
                    let y = nchw.conv2d(kernel, 0, 1, *dilation, *groups)?;
                    subsample(&subsample(&y, 2, stride[0])?, 3, stride[1])?
                };
                let y = fit_spatial(y, out_shape[1], out_shape[2])?;
                let y = match bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                };
                activate(y, *act)?.permute((0, 2, 3, 1))?
            }
            Step::Gather {
                ids,
                weights,
                bias,
                taps,
                depthwise,
                act,
            } => {
                let (n, h, w, c) = x.dims4()?;
                let (oh, ow, oc) = (out_shape[1], out_shape[2], out_shape[3]);
                let cols = x.reshape((n, h * w, c))?.index_select(ids, 1)?;
                let y = if *depthwise {
                    cols.reshape((n * oh * ow, *taps, c))?
                        .broadcast_mul(weights)?
                        .sum(1)?
                } else {
                    cols.reshape((n * oh * ow, taps * c))?
                        .matmul(&weights.t()?)?
                };
                let y = y.reshape((n, oh, ow, oc))?;
                let y = match bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                };
                activate(y, *act)?
            }
            Step::FullyConnected {
                weights_t,
                bias,
                act,
            } => {
                let (inner, _) = weights_t.dims2()?;
                let rows = x.elem_count() / inner.max(1);
                if rows * inner != x.elem_count() {
                    bail!(
                        "input of {} values is not a whole number of {inner}-value rows",
                        x.elem_count()
                    );
                }
                let y = x.reshape((rows, inner))?.matmul(weights_t)?;
                let y = match bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                };
                activate(y, *act)?.reshape(out_shape)?
            }
            Step::Binary { op: bin, act } => {
                let b = args[1];
                let y = match bin {
                    BinOp::Add => x.broadcast_add(b)?,
                    BinOp::Sub => x.broadcast_sub(b)?,
                    BinOp::Mul => x.broadcast_mul(b)?,
                    BinOp::Div => x.broadcast_div(b)?,
                };
                activate(y, *act)?
            }
            Step::Pool {
                max,
                filter,
                stride,
                pad,
                rescale,
                act,
            } => {
                let fill = if *max { f32::MIN } else { 0.0 };
                let nchw = x.permute((0, 3, 1, 2))?;
                let nchw = pad_value(&nchw, 2, pad[0], pad[1], fill)?;
                let nchw = pad_value(&nchw, 3, pad[2], pad[3], fill)?.contiguous()?;
                let window = (filter[0], filter[1]);
                let strides = (stride[0], stride[1]);
                let y = if *max {
                    nchw.max_pool2d_with_stride(window, strides)?
                } else {
                    nchw.avg_pool2d_with_stride(window, strides)?
                };
                let y = fit_spatial(y, out_shape[1], out_shape[2])?;
                let y = match rescale {
                    Some(r) => y.broadcast_mul(r)?,
                    None => y,
                };
                activate(y, *act)?.permute((0, 2, 3, 1))?
            }
            Step::Reshape => x.reshape(out_shape)?,
            Step::Softmax { beta } => {
                let last = x.rank().saturating_sub(1);
                let max = x.max_keepdim(last)?;
                let e = (x.broadcast_sub(&max)? * f64::from(*beta))?.exp()?;
                let sum = e.sum_keepdim(last)?;
                e.broadcast_div(&sum)?
            }
            Step::Relu => x.relu()?,
            Step::Relu6 => x.clamp(0f32, 6f32)?,
            Step::Concatenation { axis, act } => activate(Tensor::cat(args, *axis)?, *act)?,
            Step::Pad { paddings } => {
                let mut y = x.clone();
                for (d, [b, a]) in paddings.iter().enumerate() {
                    y = pad_value(&y, d, *b, *a, 0.0)?;
                }
                y
            }
            Step::Mean { axes } => x.mean_keepdim(axes.clone())?.reshape(out_shape)?,
            Step::Logistic => (x.neg()?.exp()? + 1.0)?.recip()?,
            Step::Tanh => x.tanh()?,
            Step::Transpose { perm } => x.permute(perm.clone())?,
            Step::LeakyRelu { alpha } => {
                let neg = (x * f64::from(*alpha))?;
                x.ge(0f32)?.where_cond(x, &neg)?
            }
            Step::PRelu => {
                let neg = x.broadcast_mul(args[1])?;
                let x = x.broadcast_as(neg.shape())?;
                x.lt(0f32)?.where_cond(&neg, &x)?
            }
            Step::HardSigmoid { alpha, beta } => x
                .affine(f64::from(*alpha), f64::from(*beta))?
                .clamp(0f32, 1f32)?,
            Step::HardSwish => {
                let gate = x.affine(1.0, 3.0)?.clamp(0f32, 6f32)?;
                (x.mul(&gate)? / 6.0)?
            }
            Step::Clamp { min, max } => x.clamp(*min, *max)?,
        })
    }
}

/// An f32 constant of the graph as a host vector.
fn constant(g: &Graph, id: TensorId) -> Result<Vec<f32>> {
    Ok(dequantized(&g.tensors[id])?)
}

/// Uploads a constant in IR layout.
fn upload(g: &Graph, id: TensorId, device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        constant(g, id)?,
        g.tensors[id].shape.clone(),
        device,
    )?)
}

type Prepared = (Step, Vec<TensorId>);

/// Converts one op: weights to candle layouts, padding to explicit amounts.
fn prepare(
    g: &Graph,
    op: &crate::ir::Op,
    device: &Device,
    constants: &mut [Option<Tensor>],
    params: &mut Option<&mut Vec<Param>>,
) -> Result<Prepared> {
    let input = |i: usize| -> Result<TensorId> {
        match op.inputs.get(i) {
            Some(Some(t)) if *t < g.tensors.len() => Ok(*t),
            Some(Some(t)) => bail!("input tensor id {t} out of range"),
            _ => bail!("input {i} is missing"),
        }
    };
    let optional = |i: usize| -> Option<TensorId> { op.inputs.get(i).copied().flatten() };
    let out = &g.tensors[op.outputs[0]];
    // Generic operands: activations, or constants uploaded in IR layout.
    let generic = |ids: Vec<TensorId>, constants: &mut [Option<Tensor>]| -> Result<Vec<TensorId>> {
        for &t in &ids {
            if g.tensors[t].data.is_some() && constants[t].is_none() {
                constants[t] = Some(upload(g, t, device)?);
            }
        }
        Ok(ids)
    };
    let need_activation = |t: TensorId| -> Result<()> {
        if g.tensors[t].data.is_some() {
            bail!(
                "input `{}` is a constant; the candle executor expects an activation here",
                g.tensors[t].name
            );
        }
        Ok(())
    };
    let step = match &op.kind {
        OpKind::Conv2d {
            stride,
            dilation,
            padding,
            activation,
        }
        | OpKind::DepthwiseConv2d {
            stride,
            dilation,
            padding,
            activation,
            ..
        } => {
            let depthwise = matches!(op.kind, OpKind::DepthwiseConv2d { .. });
            let (x, f) = (input(0)?, input(1)?);
            need_activation(x)?;
            let (xs, fs) = (&g.tensors[x].shape, &g.tensors[f].shape);
            if xs.len() != 4 || fs.len() != 4 || out.shape.len() != 4 {
                bail!("input, filter and output must be 4-D (NHWC, OHWI)");
            }
            if g.tensors[f].data.is_none() {
                bail!("the filter must be a constant");
            }
            if stride.contains(&0) || dilation.contains(&0) {
                bail!("stride and dilation must be positive");
            }
            let (kh, kw) = (fs[1], fs[2]);
            let c_in = xs[3];
            // To OIHW.
            let mut kernel = Tensor::from_vec(constant(g, f)?, fs.clone(), device)?;
            let groups = if depthwise {
                // [1, kh, kw, C*m] → [C*m, 1, kh, kw]; one group per input channel.
                if fs[3] != out.shape[3] || !fs[3].is_multiple_of(c_in.max(1)) {
                    bail!(
                        "depthwise filter {fs:?} does not match input channels {c_in} and output channels {}",
                        out.shape[3]
                    );
                }
                if let OpKind::DepthwiseConv2d {
                    depth_multiplier, ..
                } = op.kind
                {
                    if depth_multiplier > 0 && fs[3] != c_in * depth_multiplier {
                        bail!(
                            "depthwise filter {fs:?} is not [1, h, w, {c_in} * {depth_multiplier}]"
                        );
                    }
                }
                kernel = kernel.permute((3, 0, 1, 2))?.contiguous()?;
                c_in
            } else {
                // OHWI → OIHW.
                if fs[3] == 0 || !c_in.is_multiple_of(fs[3]) {
                    bail!("filter {fs:?} does not divide the {c_in} input channels");
                }
                kernel = kernel.permute((0, 3, 1, 2))?.contiguous()?;
                c_in / fs[3]
            };
            let (top, bottom) = pad_pair(*padding, stride[0], dilation[0], xs[1], kh, out.shape[1]);
            let (left, right) = pad_pair(*padding, stride[1], dilation[1], xs[2], kw, out.shape[2]);
            if (!depthwise && groups == 1) || (depthwise && fs[3] == c_in) {
                // The gathered form (see `Step::Gather`).
                let (oh, ow) = (out.shape[1], out.shape[2]);
                let (ih, iw) = (xs[1] as isize, xs[2] as isize);
                let mut ids = Vec::with_capacity(oh * ow * kh * kw);
                for oy in 0..oh {
                    for ox in 0..ow {
                        for fy in 0..kh {
                            for fx in 0..kw {
                                let y = (oy * stride[0] + fy * dilation[0]) as isize - top as isize;
                                let x = (ox * stride[1] + fx * dilation[1]) as isize - left as isize;
                                ids.push(if (0..ih).contains(&y) && (0..iw).contains(&x) {
                                    u32::try_from(y * iw + x)?
                                } else {
                                    u32::MAX
                                });
                            }
                        }
                    }
                }
                let len = ids.len();
                let ids = Tensor::from_vec(ids, len, device)?;
                let w = constant(g, f)?;
                let weights = if depthwise {
                    Tensor::from_vec(w, (kh * kw, c_in), device)?
                } else {
                    Tensor::from_vec(w, (fs[0], kh * kw * c_in), device)?
                };
                let weights = param(weights, f, ParamLayout::Flat, params)?;
                let bias = match optional(2) {
                    Some(b) => {
                        let v = constant(g, b)?;
                        if v.len() != out.shape[3] {
                            bail!("bias has {} values for {} channels", v.len(), out.shape[3]);
                        }
                        let t = Tensor::from_vec(v, out.shape[3], device)?;
                        Some(param(t, b, ParamLayout::Flat, params)?)
                    }
                    None => None,
                };
                return Ok((
                    Step::Gather {
                        ids,
                        weights,
                        bias,
                        taps: kh * kw,
                        depthwise,
                        act: *activation,
                    },
                    vec![x],
                ));
            }
            let square = dilation[0] == dilation[1];
            if square {
                let layout = if depthwise {
                    ParamLayout::DepthwiseC1hw
                } else {
                    ParamLayout::ConvOihw
                };
                kernel = param(kernel, f, layout, params)?;
            } else {
                // The dilated kernel is derived: such a filter stays fixed.
                kernel = dilate(&kernel, *dilation)?;
            }
            let bias = match optional(2) {
                Some(b) => {
                    let v = constant(g, b)?;
                    if v.len() != out.shape[3] {
                        bail!("bias has {} values for {} channels", v.len(), out.shape[3]);
                    }
                    let t = Tensor::from_vec(v, (1, out.shape[3], 1, 1), device)?;
                    Some(param(t, b, ParamLayout::Flat, params)?)
                }
                None => None,
            };
            return Ok((
                Step::Conv {
                    kernel,
                    bias,
                    pad: [top, bottom, left, right],
                    stride: *stride,
                    dilation: if square { dilation[0] } else { 1 },
                    groups,
                    act: *activation,
                },
                vec![x],
            ));
        }
        OpKind::FullyConnected { activation } => {
            let (x, w) = (input(0)?, input(1)?);
            let ws = &g.tensors[w].shape;
            if ws.len() != 2 || g.tensors[w].data.is_none() {
                bail!("weights must be a constant [out, in]");
            }
            let weights_t = Tensor::from_vec(constant(g, w)?, (ws[0], ws[1]), device)?
                .t()?
                .contiguous()?;
            let weights_t = param(weights_t, w, ParamLayout::FcTransposed, params)?;
            let bias = match optional(2) {
                Some(b) => Some(param(
                    Tensor::from_vec(constant(g, b)?, ws[0], device)?,
                    b,
                    ParamLayout::Flat,
                    params,
                )?),
                None => None,
            };
            let inputs = generic(vec![x], constants)?;
            return Ok((
                Step::FullyConnected {
                    weights_t,
                    bias,
                    act: *activation,
                },
                inputs,
            ));
        }
        OpKind::Add { activation } => binary(BinOp::Add, *activation),
        OpKind::Sub { activation } => binary(BinOp::Sub, *activation),
        OpKind::Mul { activation } => binary(BinOp::Mul, *activation),
        OpKind::Div { activation } => binary(BinOp::Div, *activation),
        OpKind::AveragePool2d {
            filter,
            stride,
            padding,
            activation,
        }
        | OpKind::MaxPool2d {
            filter,
            stride,
            padding,
            activation,
        } => {
            let max = matches!(op.kind, OpKind::MaxPool2d { .. });
            let x = input(0)?;
            need_activation(x)?;
            let xs = &g.tensors[x].shape;
            if xs.len() != 4 || out.shape.len() != 4 {
                bail!("input and output must be 4-D (NHWC)");
            }
            if filter.contains(&0) || stride.contains(&0) {
                bail!("filter and stride must be positive");
            }
            let (top, bottom) = pad_pair(*padding, stride[0], 1, xs[1], filter[0], out.shape[1]);
            let (left, right) = pad_pair(*padding, stride[1], 1, xs[2], filter[1], out.shape[2]);
            let rescale = if !max && top + bottom + left + right > 0 {
                // TFLite divides by the in-image cells of each window, candle by the window.
                let (oh, ow) = (out.shape[1], out.shape[2]);
                let cells = |o: usize, s: usize, pad: usize, f: usize, n: usize| -> usize {
                    let start = (o * s) as i64 - pad as i64;
                    let lo = start.max(0);
                    let hi = (start + f as i64).min(n as i64);
                    (hi - lo).max(0) as usize
                };
                let window = (filter[0] * filter[1]) as f32;
                let mut r = Vec::with_capacity(oh * ow);
                for oy in 0..oh {
                    for ox in 0..ow {
                        let n = cells(oy, stride[0], top, filter[0], xs[1])
                            * cells(ox, stride[1], left, filter[1], xs[2]);
                        r.push(if n == 0 { 0.0 } else { window / n as f32 });
                    }
                }
                Some(Tensor::from_vec(r, (1, 1, oh, ow), device)?)
            } else {
                None
            };
            return Ok((
                Step::Pool {
                    max,
                    filter: *filter,
                    stride: *stride,
                    pad: [top, bottom, left, right],
                    rescale,
                    act: *activation,
                },
                vec![x],
            ));
        }
        OpKind::Reshape => Step::Reshape,
        OpKind::Softmax { beta } => Step::Softmax { beta: *beta },
        OpKind::Relu => Step::Relu,
        OpKind::Relu6 => Step::Relu6,
        OpKind::Concatenation { axis, activation } => {
            let rank = out.shape.len() as i64;
            let a = if *axis < 0 { axis + rank } else { *axis };
            if !(0..rank).contains(&a) {
                bail!("axis {axis} is outside rank {rank}");
            }
            let ids = (0..op.inputs.len())
                .map(input)
                .collect::<Result<Vec<_>>>()?;
            let inputs = generic(ids, constants)?;
            return Ok((
                Step::Concatenation {
                    axis: a as usize,
                    act: *activation,
                },
                inputs,
            ));
        }
        OpKind::Pad { paddings } => Step::Pad {
            paddings: paddings.clone(),
        },
        OpKind::Mean { axes, .. } => Step::Mean { axes: axes.clone() },
        OpKind::Logistic => Step::Logistic,
        OpKind::Tanh => Step::Tanh,
        OpKind::Transpose { perm } => Step::Transpose { perm: perm.clone() },
        OpKind::LeakyRelu { alpha } => Step::LeakyRelu { alpha: *alpha },
        OpKind::PRelu => {
            let inputs = generic(vec![input(0)?, input(1)?], constants)?;
            return Ok((Step::PRelu, inputs));
        }
        OpKind::HardSigmoid { alpha, beta } => Step::HardSigmoid {
            alpha: *alpha,
            beta: *beta,
        },
        OpKind::HardSwish => Step::HardSwish,
        OpKind::Clamp { min, max } => Step::Clamp {
            min: *min,
            max: *max,
        },
        OpKind::Quantize | OpKind::Dequantize => bail!(
            "the candle executor runs float graphs; {} of activations is not supported (quantize after calibrating, not before)",
            ir_name(&op.kind)
        ),
    };
    let ids = match step {
        Step::Binary { .. } => vec![input(0)?, input(1)?],
        _ => vec![input(0)?],
    };
    let inputs = generic(ids, constants)?;
    Ok((step, inputs))
}

fn binary(op: BinOp, act: Activation) -> Step {
    Step::Binary { op, act }
}

/// An OIHW kernel with `dilation - 1` zeros between taps (for non-square dilations, which
/// candle's conv2d cannot express).
fn dilate(kernel: &Tensor, dilation: [usize; 2]) -> Result<Tensor> {
    let (o, i, kh, kw) = kernel.dims4()?;
    let (eh, ew) = ((kh - 1) * dilation[0] + 1, (kw - 1) * dilation[1] + 1);
    let src = kernel.flatten_all()?.to_vec1::<f32>()?;
    let mut dst = vec![0f32; o * i * eh * ew];
    for oi in 0..o * i {
        for y in 0..kh {
            for x in 0..kw {
                dst[(oi * eh + y * dilation[0]) * ew + x * dilation[1]] =
                    src[(oi * kh + y) * kw + x];
            }
        }
    }
    Ok(Tensor::from_vec(dst, (o, i, eh, ew), kernel.device())?.to_dtype(CDType::F32)?)
}

/// [`crate::quantize::calibrate::calibrate`] with the activations computed by candle on the
/// CPU: the same two passes (ranges, then histograms over those ranges and per-channel
/// means), producing the same [`Calibration`].
///
/// # Errors
/// As `calibrate`: the data does not fit the model, is empty, or holds NaN / infinity; or the
/// graph has an op the candle executor does not run.
pub fn calibrate_with_candle(
    g: &Graph,
    x: &Array,
    progress: impl FnMut(usize, usize),
) -> Result<Calibration> {
    calibrate_on(g, x, &Device::Cpu, progress)
}

/// [`calibrate_with_candle`] on a chosen candle device.
///
/// # Errors
/// As [`calibrate_with_candle`].
pub fn calibrate_on(
    g: &Graph,
    x: &Array,
    device: &Device,
    progress: impl FnMut(usize, usize),
) -> Result<Calibration> {
    let exec = CandleGraph::new(g, device)?;
    crate::quantize::calibrate::calibrate_with(
        g,
        x,
        exec.input_elements(),
        |sample, visit| exec.visit(sample, visit),
        progress,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Op, Tensor as IrTensor};

    fn act(name: &str, shape: &[usize]) -> IrTensor {
        IrTensor {
            name: name.into(),
            dtype: DType::F32,
            shape: shape.to_vec(),
            data: None,
            quant: None,
        }
    }

    fn konst(name: &str, shape: &[usize], v: &[f32]) -> IrTensor {
        IrTensor {
            data: Some(v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            ..act(name, shape)
        }
    }

    #[test]
    fn average_pool_excludes_padding() {
        // 2x2 input, 2x2 SAME pool at stride 1: the corner windows hold 4, 2, 2, 1 real cells.
        let g = Graph {
            name: "pool".into(),
            tensors: vec![act("x", &[1, 2, 2, 1]), act("y", &[1, 2, 2, 1])],
            ops: vec![Op {
                kind: OpKind::AveragePool2d {
                    filter: [2, 2],
                    stride: [1, 1],
                    padding: Padding::Same,
                    activation: Activation::None,
                },
                inputs: vec![Some(0)],
                outputs: vec![1],
            }],
            inputs: vec![0],
            outputs: vec![1],
        };
        let e = CandleGraph::new(&g, &Device::Cpu).unwrap();
        let y = e.run(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!(y, vec![2.5, 3.0, 3.5, 4.0]);
    }

    #[test]
    fn asymmetric_stride_and_dilation_conv() {
        // 5x5x1 input, 3x3 filter of ones, stride [2, 1], dilation [1, 2], VALID.
        let x: Vec<f32> = (0..25).map(|v| v as f32).collect();
        let g = Graph {
            name: "conv".into(),
            tensors: vec![
                act("x", &[1, 5, 5, 1]),
                konst("w", &[1, 3, 3, 1], &[1.0; 9]),
                act("y", &[1, 2, 1, 1]),
            ],
            ops: vec![Op {
                kind: OpKind::Conv2d {
                    stride: [2, 1],
                    dilation: [1, 2],
                    padding: Padding::Valid,
                    activation: Activation::None,
                },
                inputs: vec![Some(0), Some(1), None],
                outputs: vec![2],
            }],
            inputs: vec![0],
            outputs: vec![2],
        };
        let e = CandleGraph::new(&g, &Device::Cpu).unwrap();
        let y = e.run(&x).unwrap();
        // Rows {0,1,2} / {2,3,4}, columns {0,2,4}.
        let want = |r0: usize| -> f32 {
            (r0..r0 + 3)
                .flat_map(|r| [0, 2, 4].map(|c| (r * 5 + c) as f32))
                .sum()
        };
        assert_eq!(y, vec![want(0), want(2)]);
    }

    #[test]
    fn gathered_conv_gradient_matches_finite_differences() {
        // 5x5x2 input, 3x3x2 -> 3 conv, SAME, stride 2, bias, then a depthwise 3x3 (VALID).
        let x: Vec<f32> = (0..50).map(|v| ((v * 7 % 11) as f32 - 5.0) / 5.0).collect();
        let w: Vec<f32> = (0..54)
            .map(|v| ((v * 5 % 13) as f32 - 6.0) / 10.0)
            .collect();
        let dw: Vec<f32> = (0..27).map(|v| ((v * 3 % 7) as f32 - 3.0) / 4.0).collect();
        let g = Graph {
            name: "conv".into(),
            tensors: vec![
                act("x", &[1, 5, 5, 2]),
                konst("w", &[3, 3, 3, 2], &w),
                konst("b", &[3], &[0.1, -0.2, 0.3]),
                act("y", &[1, 3, 3, 3]),
                konst("dw", &[1, 3, 3, 3], &dw),
                act("z", &[1, 1, 1, 3]),
            ],
            ops: vec![
                Op {
                    kind: OpKind::Conv2d {
                        stride: [2, 2],
                        dilation: [1, 1],
                        padding: Padding::Same,
                        activation: Activation::None,
                    },
                    inputs: vec![Some(0), Some(1), Some(2)],
                    outputs: vec![3],
                },
                Op {
                    kind: OpKind::DepthwiseConv2d {
                        stride: [1, 1],
                        dilation: [1, 1],
                        padding: Padding::Valid,
                        depth_multiplier: 1,
                        activation: Activation::None,
                    },
                    inputs: vec![Some(3), Some(4), None],
                    outputs: vec![5],
                },
            ],
            inputs: vec![0],
            outputs: vec![5],
        };
        let loss = |g: &Graph| -> f64 {
            let e = CandleGraph::new(g, &Device::Cpu).unwrap();
            e.run(&x).unwrap().iter().map(|v| (*v as f64).powi(2)).sum()
        };
        let e = CandleGraph::new_trainable(&g, &Device::Cpu).unwrap();
        let t = Tensor::from_slice(&x, (1, 5, 5, 2), &Device::Cpu).unwrap();
        let l = e
            .logits_batch(&t)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = l.backward().unwrap();
        for (id, var) in e.vars_by_tensor() {
            let grad: Vec<f32> = grads
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let base = dequantized(&g.tensors[id]).unwrap();
            for (i, &want) in grad.iter().enumerate() {
                let mut h = g.clone();
                let mut v = base.clone();
                v[i] += 1e-2;
                h.tensors[id].data = Some(v.iter().flat_map(|x| x.to_le_bytes()).collect());
                let numeric = (loss(&h) - loss(&g)) / 1e-2;
                assert!(
                    (numeric - want as f64).abs() <= 2e-2 * numeric.abs().max(1.0),
                    "tensor {id} element {i}: {numeric} vs {want}"
                );
            }
        }
    }

    #[test]
    fn unsupported_op_is_named() {
        let g = Graph {
            name: "q".into(),
            tensors: vec![act("x", &[1, 4]), act("y", &[1, 4])],
            ops: vec![Op {
                kind: OpKind::Quantize,
                inputs: vec![Some(0)],
                outputs: vec![1],
            }],
            inputs: vec![0],
            outputs: vec![1],
        };
        let e = CandleGraph::new(&g, &Device::Cpu).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("op 0 (QUANTIZE)"), "{msg}");
    }
}
