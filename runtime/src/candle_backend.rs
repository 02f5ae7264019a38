//! The candle backend (feature `candle`): runs an artifact on a candle [`Device`] — the CPU, or
//! a CUDA / Metal GPU when kiln-runtime is built with the `cuda` / `metal` feature.
//!
//! The portable interpreter is the reference; this backend is for hosts with an accelerator
//! (batch evaluation, serving). Every activation is held as an f32 tensor of *real* values and
//! each op is computed in f32 on the device. The artifact's storage is then imitated after every
//! op: an int8 tensor is rounded to its scale and zero point and clamped to the op's output
//! range (fake quantization), an f16 tensor is rounded to f16. Results therefore match the
//! portable int8 kernels to within a quantization step or two (the kernels round in fixed point,
//! this backend in f32) and the portable f16 kernels within f16 tolerance — see
//! `docs/NUMERICS.md`. Outputs come back as bytes in the artifact's output types, like
//! [`crate::Interpreter::output_bytes`].
//!
//! Needs std (the feature turns it on); never part of a device build.

use crate::graph::{
    Activation, ClampI8, ConvParams, DType, OpDef, OpKind, PoolParams, Quant, TensorDef, UnaryFn,
    MAX_RANK, NO_TENSOR,
};
use crate::{Model, ModelError};
use candle_core::{DType as CDType, Device, Tensor, D};
use std::string::String;
use std::vec::Vec;

/// Why the candle backend could not load or run a model.
#[derive(Debug)]
#[non_exhaustive]
pub enum CandleError {
    /// The artifact is malformed (see [`ModelError`]).
    Model(ModelError),
    /// candle refused an operation (device out of memory, a missing CUDA library, ...).
    Candle(candle_core::Error),
    /// The model uses something this backend does not run.
    Unsupported {
        /// The op.
        op: &'static str,
        /// What is missing.
        why: &'static str,
    },
    /// An input has the wrong number of bytes.
    Input {
        /// Input index.
        index: usize,
        /// Bytes the model expects.
        expected: usize,
        /// Bytes given.
        got: usize,
    },
}

impl core::fmt::Display for CandleError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            CandleError::Model(e) => write!(f, "{e}"),
            CandleError::Candle(e) => write!(
                f,
                "the candle device failed: {e}; check the device (memory, drivers) or run on the CPU"
            ),
            CandleError::Unsupported { op, why } => write!(
                f,
                "the candle backend cannot run {op}: {why}; run this model with the portable interpreter"
            ),
            CandleError::Input {
                index,
                expected,
                got,
            } => write!(
                f,
                "input {index} has {got} bytes but the model takes {expected}; give one sample in the input's type"
            ),
        }
    }
}

impl std::error::Error for CandleError {}

impl From<ModelError> for CandleError {
    fn from(e: ModelError) -> Self {
        CandleError::Model(e)
    }
}

impl From<candle_core::Error> for CandleError {
    fn from(e: candle_core::Error) -> Self {
        CandleError::Candle(e)
    }
}

type Result<T> = core::result::Result<T, CandleError>;

/// An artifact prepared for a candle device: constants dequantized and uploaded once.
pub struct CandleModel {
    device: Device,
    tensors: Vec<TensorDef>,
    ops: Vec<OpDef>,
    /// Real values of each constant tensor (`None` for activations).
    constants: Vec<Option<Tensor>>,
    /// Per-channel scales of each constant that has them (for int8 biases).
    scales: Vec<Option<Vec<f32>>>,
    /// Raw values of int32 constants (int8 biases).
    int32: Vec<Option<Vec<i32>>>,
    /// LUT ops' tables as real output values, by op index.
    tables: Vec<Option<Tensor>>,
    inputs: Vec<u16>,
    outputs: Vec<u16>,
}

fn shape_of(t: &TensorDef) -> Vec<usize> {
    t.shape.iter().map(|&d| d as usize).collect()
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Real values of the raw bytes of a tensor (`scales`: per-channel scales along `axis`).
fn real_values(t: &TensorDef, bytes: &[u8], scales: Option<(&[f32], usize)>) -> Result<Vec<f32>> {
    let quant = t.quant.unwrap_or(Quant {
        scale: 1.0,
        zero_point: 0,
        per_channel: None,
    });
    let shape = shape_of(t);
    let scale_at = |i: usize| -> f32 {
        match scales {
            Some((s, axis)) => {
                let inner: usize = shape[axis + 1..].iter().product();
                let c = (i / inner.max(1)) % shape[axis].max(1);
                s.get(c).copied().unwrap_or(quant.scale)
            }
            None => quant.scale,
        }
    };
    Ok(match t.dtype {
        DType::F32 => f32s(bytes),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::I8 => bytes
            .iter()
            .enumerate()
            .map(|(i, &b)| scale_at(i) * (f32::from(b as i8) - quant.zero_point as f32))
            .collect(),
        DType::I32 => bytes
            .chunks_exact(4)
            .enumerate()
            .map(|(i, c)| {
                let q = i32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                scale_at(i) * (q as f32 - quant.zero_point as f32)
            })
            .collect(),
    })
}

impl CandleModel {
    /// Prepares `model` for `device`: decodes the graph and uploads every constant's real
    /// values.
    ///
    /// # Errors
    /// A malformed model, an op this backend does not run, or a device failure.
    pub fn new(model: &Model<'_>, device: &Device) -> Result<Self> {
        let tensors: Vec<TensorDef> = (0..model.tensor_count())
            .map(|i| model.tensor(i))
            .collect::<core::result::Result<_, _>>()?;
        let ops: Vec<OpDef> = model
            .ops()
            .map(|r| r.map(|(_, op)| op))
            .collect::<core::result::Result<_, _>>()?;
        let mut scales = Vec::with_capacity(tensors.len());
        for t in &tensors {
            scales.push(match t.quant.and_then(|q| q.per_channel) {
                Some(pc) => Some(f32s(model.weights_range(pc.scales)?)),
                None => None,
            });
        }
        let mut constants = Vec::with_capacity(tensors.len());
        for (t, s) in tensors.iter().zip(&scales) {
            constants.push(match t.location {
                crate::graph::Location::Weights(_) if t.dtype != DType::I32 => {
                    let axis = t.quant.and_then(|q| q.per_channel).map(|p| p.axis as usize);
                    let per = s.as_deref().zip(axis);
                    let v = real_values(t, model.constant(t)?, per)?;
                    Some(Tensor::from_vec(v, shape_of(t), device)?)
                }
                _ => None,
            });
        }
        let mut int32 = Vec::with_capacity(tensors.len());
        for t in &tensors {
            int32.push(match t.location {
                crate::graph::Location::Weights(_) if t.dtype == DType::I32 => Some(
                    model
                        .constant(t)?
                        .chunks_exact(4)
                        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                ),
                _ => None,
            });
        }
        let mut tables = Vec::with_capacity(ops.len());
        for op in &ops {
            tables.push(match op.kind {
                OpKind::Lut(r) => {
                    let out = &tensors[op.output as usize];
                    let q = out.quant.unwrap_or(Quant {
                        scale: 1.0,
                        zero_point: 0,
                        per_channel: None,
                    });
                    let v: Vec<f32> = model
                        .weights_range(r)?
                        .iter()
                        .map(|&b| q.scale * (f32::from(b as i8) - q.zero_point as f32))
                        .collect();
                    Some(Tensor::from_vec(v, 256, device)?)
                }
                _ => None,
            });
        }
        Ok(CandleModel {
            device: device.clone(),
            tensors,
            ops,
            constants,
            scales,
            int32,
            tables,
            inputs: model.inputs().to_vec(),
            outputs: model.outputs().to_vec(),
        })
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs one sample: `inputs` are the raw bytes of each graph input in its type (as
    /// [`crate::Interpreter::input_bytes_mut`] takes them); returns each output's raw bytes.
    ///
    /// # Errors
    /// Inputs of the wrong size, or a device failure.
    pub fn run(&self, inputs: &[&[u8]]) -> Result<Vec<Vec<u8>>> {
        let mut env: Vec<Option<Tensor>> = self.constants.clone();
        for (index, &t) in self.inputs.iter().enumerate() {
            let def = &self.tensors[t as usize];
            let expected = crate::model::tensor_bytes(def);
            let got = inputs.get(index).map_or(0, |b| b.len());
            if got != expected {
                return Err(CandleError::Input {
                    index,
                    expected,
                    got,
                });
            }
            let v = real_values(def, inputs[index], None)?;
            env[t as usize] = Some(Tensor::from_vec(v, shape_of(def), &self.device)?);
        }
        for (i, op) in self.ops.iter().enumerate() {
            let y = self.op(i, op, &env)?;
            let out = &self.tensors[op.output as usize];
            let y = y.reshape(shape_of(out))?;
            env[op.output as usize] = Some(store(&y, out, clamp_of(&op.kind))?);
        }
        self.outputs
            .iter()
            .map(|&t| {
                let def = &self.tensors[t as usize];
                let y = env[t as usize]
                    .as_ref()
                    .ok_or(CandleError::Model(ModelError::BadOp {
                        index: NO_TENSOR,
                        reason: "graph output never written",
                    }))?;
                to_bytes(y, def)
            })
            .collect()
    }

    fn input(&self, env: &[Option<Tensor>], op: &OpDef, k: usize) -> Result<Tensor> {
        let t = op.inputs.get(k).copied().unwrap_or(NO_TENSOR);
        env.get(t as usize)
            .and_then(|x| x.clone())
            .ok_or(CandleError::Model(ModelError::BadOp {
                index: NO_TENSOR,
                reason: "input tensor not computed",
            }))
    }

    /// Real values of op input `k` that is an optional bias: int8 biases (int32) are scaled
    /// by the input scale times each filter channel's scale.
    fn bias(&self, env: &[Option<Tensor>], op: &OpDef, channels: usize) -> Result<Option<Tensor>> {
        let Some(&b) = op.inputs.get(2).filter(|&&b| b != NO_TENSOR) else {
            return Ok(None);
        };
        let def = &self.tensors[b as usize];
        if def.dtype != DType::I32 {
            return Ok(Some(self.input(env, op, 2)?));
        }
        let input_scale = self.tensors[op.inputs[0] as usize]
            .quant
            .map_or(1.0, |q| q.scale);
        let w = op.inputs[1] as usize;
        let w_scales: Vec<f32> = match &self.scales[w] {
            Some(s) => s.clone(),
            None => {
                let s = self.tensors[w].quant.map_or(1.0, |q| q.scale);
                std::vec![s; channels]
            }
        };
        let raw = self.int32[b as usize].as_deref().unwrap_or(&[]);
        let v: Vec<f32> = raw
            .iter()
            .enumerate()
            .map(|(i, &q)| q as f32 * input_scale * w_scales.get(i).copied().unwrap_or(1.0))
            .collect();
        Ok(Some(Tensor::from_vec(v, channels, &self.device)?))
    }

    fn op(&self, index: usize, op: &OpDef, env: &[Option<Tensor>]) -> Result<Tensor> {
        let x = || self.input(env, op, 0);
        let out = &self.tensors[op.output as usize];
        Ok(match op.kind {
            OpKind::Conv2d(p) => {
                let w = self.input(env, op, 1)?; // OHWI
                let w = w.permute((0, 3, 1, 2))?.contiguous()?;
                let y = conv(&x()?, &w, &p, out, 1)?;
                let y = match self.bias(env, op, out.shape[3] as usize)? {
                    Some(b) => y.broadcast_add(&b)?,
                    None => y,
                };
                activation(&y, p.activation)?
            }
            OpKind::DepthwiseConv2d(p) => {
                let w = self.input(env, op, 1)?; // 1HWC
                let channels = w.dim(3)?;
                let w = w.permute((3, 0, 1, 2))?.contiguous()?; // (C*M, 1, kh, kw)
                let groups = x()?.dim(3)?;
                let y = conv(&x()?, &w, &p, out, groups)?;
                let y = match self.bias(env, op, channels)? {
                    Some(b) => y.broadcast_add(&b)?,
                    None => y,
                };
                activation(&y, p.activation)?
            }
            OpKind::FullyConnected(p) => {
                let w = self.input(env, op, 1)?; // (out, in)
                let (o, i) = w.dims2()?;
                let x = x()?;
                let rows = x.elem_count() / i.max(1);
                let y = x.reshape((rows, i))?.matmul(&w.t()?)?;
                let y = match self.bias(env, op, o)? {
                    Some(b) => y.broadcast_add(&b)?,
                    None => y,
                };
                activation(&y, p.activation)?
            }
            OpKind::Add(p) => {
                activation(&x()?.broadcast_add(&self.input(env, op, 1)?)?, p.activation)?
            }
            OpKind::Sub(p) => {
                activation(&x()?.broadcast_sub(&self.input(env, op, 1)?)?, p.activation)?
            }
            OpKind::Mul(p) => {
                activation(&x()?.broadcast_mul(&self.input(env, op, 1)?)?, p.activation)?
            }
            OpKind::Div(p) => {
                activation(&x()?.broadcast_div(&self.input(env, op, 1)?)?, p.activation)?
            }
            OpKind::AveragePool2d(p) => activation(&pool(&x()?, &p, out, false)?, p.activation)?,
            OpKind::MaxPool2d(p) => activation(&pool(&x()?, &p, out, true)?, p.activation)?,
            OpKind::Reshape | OpKind::Dequantize | OpKind::Quantize(_) => x()?,
            OpKind::Softmax(p) => {
                let beta = if p.beta == 0.0 { 1.0 } else { p.beta };
                softmax_last_dim(&(x()? * f64::from(beta))?)?
            }
            OpKind::Relu(_) => x()?.relu()?,
            OpKind::Relu6(_) => x()?.clamp(0f32, 6f32)?,
            OpKind::Concatenation(p) => {
                let parts: Vec<Tensor> = (0..op.inputs.len())
                    .filter(|&k| op.inputs[k] != NO_TENSOR)
                    .map(|k| self.input(env, op, k))
                    .collect::<Result<_>>()?;
                activation(&Tensor::cat(&parts, p.axis as usize)?, p.activation)?
            }
            OpKind::Pad(p) => {
                let mut y = x()?;
                for d in 0..y.rank().min(4) {
                    y = y.pad_with_zeros(d, p.before[d] as usize, p.after[d] as usize)?;
                }
                y
            }
            OpKind::Mean(p) => {
                let mut y = x()?;
                for d in (0..y.rank()).rev() {
                    if p.axes & (1 << d) != 0 {
                        y = y.mean_keepdim(d)?;
                    }
                }
                y
            }
            OpKind::Logistic(_) => sigmoid(&x()?)?,
            OpKind::Tanh(_) => x()?.tanh()?,
            OpKind::Transpose(p) => {
                let x = x()?;
                let perm: Vec<usize> = p.perm[..x.rank().min(MAX_RANK)]
                    .iter()
                    .map(|&d| d as usize)
                    .collect();
                x.permute(perm)?.contiguous()?
            }
            OpKind::UnaryFloat(f) => unary(&x()?, f)?,
            OpKind::PRelu => {
                let x = x()?;
                let slope = self.input(env, op, 1)?;
                (x.relu()? + x.minimum(0f32)?.broadcast_mul(&slope)?)?
            }
            OpKind::Lut(_) => {
                let table = self.tables[index]
                    .as_ref()
                    .ok_or(CandleError::Unsupported {
                        op: "LUT",
                        why: "table missing",
                    })?;
                let input = &self.tensors[op.inputs[0] as usize];
                let q = input.quant.ok_or(CandleError::Unsupported {
                    op: "LUT",
                    why: "input not quantized",
                })?;
                let x = x()?;
                let idx = ((&x / f64::from(q.scale))?.round()? + f64::from(q.zero_point + 128))?
                    .clamp(0f32, 255f32)?
                    .to_dtype(CDType::U32)?;
                let flat = idx.flatten_all()?;
                table.index_select(&flat, 0)?.reshape(x.shape())?
            }
        })
    }
}

/// Output clamp of an int8 op, if it has one.
fn clamp_of(kind: &OpKind) -> Option<ClampI8> {
    match kind {
        OpKind::Conv2d(p) | OpKind::DepthwiseConv2d(p) => Some(p.clamp),
        OpKind::FullyConnected(p) => Some(p.clamp),
        OpKind::Add(p) | OpKind::Sub(p) | OpKind::Mul(p) => Some(p.clamp),
        OpKind::AveragePool2d(p) | OpKind::MaxPool2d(p) => Some(p.clamp),
        OpKind::Relu(p) | OpKind::Relu6(p) => Some(p.clamp),
        OpKind::Concatenation(p) => Some(p.clamp),
        _ => None,
    }
}

/// The tensor as the artifact stores it: int8 → rounded to the grid and clamped; f16 → f16.
fn store(y: &Tensor, def: &TensorDef, clamp: Option<ClampI8>) -> Result<Tensor> {
    Ok(match def.dtype {
        DType::I8 => {
            let q = def.quant.unwrap_or(Quant {
                scale: 1.0,
                zero_point: 0,
                per_channel: None,
            });
            let c = clamp.unwrap_or_default();
            let (scale, zp) = (f64::from(q.scale), f64::from(q.zero_point));
            let grid = ((y / scale)?.round()? + zp)?.clamp(f32::from(c.min), f32::from(c.max))?;
            ((grid - zp)? * scale)?
        }
        DType::F16 => y.to_dtype(CDType::F16)?.to_dtype(CDType::F32)?,
        DType::F32 | DType::I32 => y.clone(),
    })
}

/// Raw bytes of a stored tensor in the artifact's type.
fn to_bytes(y: &Tensor, def: &TensorDef) -> Result<Vec<u8>> {
    let v: Vec<f32> = y.flatten_all()?.to_dtype(CDType::F32)?.to_vec1()?;
    Ok(match def.dtype {
        DType::I8 => {
            let q = def.quant.map_or((1.0, 0), |q| (q.scale, q.zero_point));
            v.iter()
                .map(|&x| ((x / q.0).round() as i32 + q.1).clamp(-128, 127) as i8 as u8)
                .collect()
        }
        DType::F16 => v
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
        DType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::I32 => v.iter().flat_map(|&x| (x as i32).to_le_bytes()).collect(),
    })
}

fn activation(y: &Tensor, a: Activation) -> Result<Tensor> {
    Ok(match a {
        Activation::None => y.clone(),
        Activation::Relu => y.relu()?,
        Activation::ReluN1To1 => y.clamp(-1f32, 1f32)?,
        Activation::Relu6 => y.clamp(0f32, 6f32)?,
    })
}

fn unary(x: &Tensor, f: UnaryFn) -> Result<Tensor> {
    Ok(match f {
        UnaryFn::LeakyRelu { alpha } => (x.relu()? + (x.minimum(0f32)? * f64::from(alpha))?)?,
        UnaryFn::HardSigmoid { alpha, beta } => x
            .affine(f64::from(alpha), f64::from(beta))?
            .clamp(0f32, 1f32)?,
        UnaryFn::HardSwish => (x * (x + 3.0)?.clamp(0f32, 6f32)?)?.affine(1.0 / 6.0, 0.0)?,
        UnaryFn::Clamp { min, max } => x.clamp(min, max)?,
    })
}

/// Zero padding of an NCHW tensor so that a window op with `pad_top`/`pad_left` yields `oh x
/// ow`; the bottom and right padding is what the output size needs (negative = crop).
fn pad_nchw(
    x: &Tensor,
    (pad_top, pad_left): (usize, usize),
    (oh, ow): (usize, usize),
    (kh, kw): (usize, usize),
    (sh, sw): (usize, usize),
    value: f32,
) -> Result<Tensor> {
    let (_, _, ih, iw) = x.dims4()?;
    let need_h = (oh.saturating_sub(1)) * sh + kh;
    let need_w = (ow.saturating_sub(1)) * sw + kw;
    let mut y = x.clone();
    let fit = |y: Tensor, dim: usize, before: usize, have: usize, need: usize| -> Result<Tensor> {
        let total = have + before;
        let y = if before > 0 {
            pad_value(&y, dim, before, 0, value)?
        } else {
            y
        };
        Ok(if total < need {
            pad_value(&y, dim, 0, need - total, value)?
        } else if total > need {
            y.narrow(dim, 0, need)?
        } else {
            y
        })
    };
    y = fit(y, 2, pad_top, ih, need_h)?;
    y = fit(y, 3, pad_left, iw, need_w)?;
    Ok(y)
}

fn pad_value(x: &Tensor, dim: usize, before: usize, after: usize, value: f32) -> Result<Tensor> {
    if value == 0.0 {
        return Ok(x.pad_with_zeros(dim, before, after)?);
    }
    let mut parts = Vec::with_capacity(3);
    let mut shape = x.dims().to_vec();
    if before > 0 {
        shape[dim] = before;
        parts.push(Tensor::full(value, shape.clone(), x.device())?);
    }
    parts.push(x.clone());
    if after > 0 {
        shape[dim] = after;
        parts.push(Tensor::full(value, shape, x.device())?);
    }
    Ok(Tensor::cat(&parts, dim)?)
}

/// A conv over an NHWC input with an OIHW filter (dilation folded into the window size).
fn conv(x: &Tensor, w: &Tensor, p: &ConvParams, out: &TensorDef, groups: usize) -> Result<Tensor> {
    let (kh, kw) = (w.dim(2)?, w.dim(3)?);
    let (dh, dw) = (p.dilation_h.max(1) as usize, p.dilation_w.max(1) as usize);
    let (sh, sw) = (p.stride_h.max(1) as usize, p.stride_w.max(1) as usize);
    if dh != dw {
        return Err(CandleError::Unsupported {
            op: "CONV_2D",
            why: "different vertical and horizontal dilations",
        });
    }
    let (oh, ow) = (out.shape[1] as usize, out.shape[2] as usize);
    let xn = x.permute((0, 3, 1, 2))?.contiguous()?;
    let xn = pad_nchw(
        &xn,
        (p.pad_top as usize, p.pad_left as usize),
        (oh, ow),
        ((kh - 1) * dh + 1, (kw - 1) * dw + 1),
        (sh, sw),
        0.0,
    )?;
    let y = if sh == sw {
        xn.conv2d(w, 0, sh, dh, groups)?
    } else {
        // candle takes one stride: convolve at stride 1 and subsample.
        let y = xn.conv2d(w, 0, 1, dh, groups)?;
        let rows: Vec<u32> = (0..oh).map(|r| (r * sh) as u32).collect();
        let cols: Vec<u32> = (0..ow).map(|c| (c * sw) as u32).collect();
        let rows = Tensor::from_vec(rows, oh, y.device())?;
        let cols = Tensor::from_vec(cols, ow, y.device())?;
        y.index_select(&rows, 2)?.index_select(&cols, 3)?
    };
    Ok(y.narrow(2, 0, oh)?
        .narrow(3, 0, ow)?
        .permute((0, 2, 3, 1))?
        .contiguous()?)
}

/// Average or max pooling over an NHWC input; padded cells are left out of the window.
fn pool(x: &Tensor, p: &PoolParams, out: &TensorDef, max: bool) -> Result<Tensor> {
    let (kh, kw) = (p.filter_h.max(1) as usize, p.filter_w.max(1) as usize);
    let (sh, sw) = (p.stride_h.max(1) as usize, p.stride_w.max(1) as usize);
    let (oh, ow) = (out.shape[1] as usize, out.shape[2] as usize);
    let pads = (p.pad_top as usize, p.pad_left as usize);
    let xn = x.permute((0, 3, 1, 2))?.contiguous()?;
    let y = if max {
        let xn = pad_nchw(&xn, pads, (oh, ow), (kh, kw), (sh, sw), f32::MIN)?;
        xn.max_pool2d_with_stride((kh, kw), (sh, sw))?
    } else {
        let padded = pad_nchw(&xn, pads, (oh, ow), (kh, kw), (sh, sw), 0.0)?;
        let ones = Tensor::ones(xn.dims(), CDType::F32, xn.device())?.narrow(1, 0, 1)?;
        let ones = pad_nchw(&ones, pads, (oh, ow), (kh, kw), (sh, sw), 0.0)?;
        let sum = padded.avg_pool2d_with_stride((kh, kw), (sh, sw))?;
        let count = ones.avg_pool2d_with_stride((kh, kw), (sh, sw))?;
        sum.broadcast_div(&count)?
    };
    Ok(y.narrow(2, 0, oh)?
        .narrow(3, 0, ow)?
        .permute((0, 2, 3, 1))?
        .contiguous()?)
}

fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

fn sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

/// A one-line description of the backend's device, for reports.
pub fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => String::from("cpu"),
        Device::Cuda(_) => String::from("cuda"),
        Device::Metal(_) => String::from("metal"),
    }
}
