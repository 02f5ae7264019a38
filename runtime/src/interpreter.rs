//! The interpreter: runs a validated [`Model`] over one caller-given arena.
//!
//! Every tensor view is carved out of the arena with safe slice splitting: the op's output (and
//! scratch) become `&mut` pieces and everything else stays shared, so the disjointness that
//! [`Model::load`] proved is also what the borrow checker sees. No `unsafe`, no allocation.

use crate::error::{InvokeError, ModelError};
use crate::format::ALIGN;
use crate::graph::{DType, Location, OpDef, OpKind, TensorDef, NO_TENSOR};
use crate::kernels::{self, conv::QuantizedOutput, Float};
use crate::model::{element_count, tensor_bytes, Model};
use crate::prepare::{prepare_op, requant_table, zp, Prepared};
use core::ops::Range;
use half::f16;

/// An arena buffer with the alignment the interpreter needs. Use it as a `static` or on the stack:
/// `let mut arena = Arena::<16384>::new();` then `arena.as_mut_slice()`.
#[repr(C, align(16))]
pub struct Arena<const N: usize>([u8; N]);

impl<const N: usize> Arena<N> {
    /// A zeroed arena.
    pub const fn new() -> Self {
        Arena([0; N])
    }

    /// The bytes.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

impl<const N: usize> Default for Arena<N> {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs one model in one arena. Several interpreters with separate arenas can run side by side.
pub struct Interpreter<'m, 'a> {
    model: Model<'m>,
    arena: &'a mut [u8],
}

/// The shared (read-only) parts of the arena around the mutable pieces of one op.
struct Shared<'b> {
    pieces: [(usize, &'b [u8]); 3],
}

impl<'b> Shared<'b> {
    fn get(&self, range: Range<usize>) -> Result<&'b [u8], ModelError> {
        for &(base, piece) in &self.pieces {
            if range.start >= base && range.end <= base + piece.len() {
                return Ok(&piece[range.start - base..range.end - base]);
            }
        }
        Err(ModelError::OverlappingTensors {
            a: NO_TENSOR,
            b: NO_TENSOR,
        })
    }
}

/// Splits the arena into the op's output, its scratch and the shared rest.
fn carve(
    arena: &mut [u8],
    out: Range<usize>,
    scratch: Range<usize>,
) -> Result<(Shared<'_>, &mut [u8], &mut [u8]), ModelError> {
    let overlap = ModelError::OverlappingTensors {
        a: NO_TENSOR,
        b: NO_TENSOR,
    };
    let scratch = if scratch.is_empty() {
        out.end..out.end
    } else {
        scratch
    };
    let out_first = out.start <= scratch.start;
    let (r1, r2) = if out_first {
        (out.clone(), scratch.clone())
    } else {
        (scratch.clone(), out.clone())
    };
    if r1.end > r2.start {
        return Err(overlap);
    }
    let (p0, rest) = arena.split_at_mut_checked(r1.start).ok_or(overlap)?;
    let (m1, rest) = rest.split_at_mut_checked(r1.len()).ok_or(overlap)?;
    let (p1, rest) = rest
        .split_at_mut_checked(r2.start - r1.end)
        .ok_or(overlap)?;
    let (m2, p2) = rest.split_at_mut_checked(r2.len()).ok_or(overlap)?;
    let shared = Shared {
        pieces: [(0, &*p0), (r1.end, &*p1), (r2.end, &*p2)],
    };
    Ok(if out_first {
        (shared, m1, m2)
    } else {
        (shared, m2, m1)
    })
}

fn arena_range(t: &TensorDef) -> Result<Range<usize>, ModelError> {
    match t.location {
        Location::Arena { offset, .. } => Ok(offset as usize..offset as usize + tensor_bytes(t)),
        Location::Weights(_) => Err(ModelError::BadTensor {
            index: NO_TENSOR,
            reason: "expected an arena tensor",
        }),
    }
}

fn cast<T: bytemuck::Pod>(bytes: &[u8]) -> Result<&[T], ModelError> {
    bytemuck::try_cast_slice(bytes).map_err(|_| ModelError::Misaligned { what: "tensor" })
}

fn cast_mut<T: bytemuck::Pod>(bytes: &mut [u8]) -> Result<&mut [T], ModelError> {
    bytemuck::try_cast_slice_mut(bytes).map_err(|_| ModelError::Misaligned { what: "tensor" })
}

/// Operand access for one op: constants from WEIGHTS, activations from the shared arena.
struct Operands<'x, 'm> {
    model: &'x Model<'m>,
    shared: Shared<'x>,
}

impl<'x> Operands<'x, '_> {
    fn bytes(&self, t: &TensorDef) -> Result<&'x [u8], ModelError> {
        match t.location {
            Location::Weights(_) => self.model.constant(t),
            Location::Arena { .. } => self.shared.get(arena_range(t)?),
        }
    }

    fn tensor(&self, op: &OpDef, i: usize) -> Result<(TensorDef, &'x [u8]), ModelError> {
        let index = *op.inputs.get(i).ok_or(ModelError::BadOp {
            index: NO_TENSOR,
            reason: "missing input",
        })?;
        let t = self.model.tensor(index)?;
        let b = self.bytes(&t)?;
        Ok((t, b))
    }

    fn optional<T: bytemuck::Pod>(
        &self,
        op: &OpDef,
        i: usize,
    ) -> Result<Option<&'x [T]>, ModelError> {
        match op.inputs.get(i) {
            Some(&t) if t != NO_TENSOR => {
                let td = self.model.tensor(t)?;
                Ok(Some(cast(self.bytes(&td)?)?))
            }
            _ => Ok(None),
        }
    }
}

impl<'m, 'a> Interpreter<'m, 'a> {
    /// Binds a loaded model to an arena of at least `model.arena_bytes()` bytes, 16-byte aligned.
    ///
    /// # Errors
    /// The arena is too small or misaligned.
    pub fn new(model: Model<'m>, arena: &'a mut [u8]) -> Result<Self, ModelError> {
        if arena.len() < model.arena_bytes() {
            return Err(ModelError::ArenaTooSmall {
                needed: model.arena_bytes() as u32,
                given: arena.len(),
            });
        }
        if !(arena.as_ptr() as usize).is_multiple_of(ALIGN) {
            return Err(ModelError::Misaligned { what: "arena" });
        }
        Ok(Interpreter { model, arena })
    }

    /// The model.
    pub fn model(&self) -> &Model<'m> {
        &self.model
    }

    fn io_tensor(&self, list: &[u16], i: usize) -> Result<TensorDef, InvokeError> {
        let index = *list.get(i).ok_or(InvokeError::NoSuchTensor { index: i })?;
        Ok(self.model.tensor(index)?)
    }

    /// Definition (type, shape, quantization) of graph input `i`.
    ///
    /// # Errors
    /// No such input.
    pub fn input_info(&self, i: usize) -> Result<TensorDef, InvokeError> {
        self.io_tensor(self.model.inputs(), i)
    }

    /// Definition of graph output `i`.
    ///
    /// # Errors
    /// No such output.
    pub fn output_info(&self, i: usize) -> Result<TensorDef, InvokeError> {
        self.io_tensor(self.model.outputs(), i)
    }

    /// Raw bytes of graph input `i`, to fill in place.
    ///
    /// # Errors
    /// No such input.
    pub fn input_bytes_mut(&mut self, i: usize) -> Result<&mut [u8], InvokeError> {
        let t = self.input_info(i)?;
        let r = arena_range(&t)?;
        Ok(&mut self.arena[r])
    }

    /// Raw bytes of graph output `i`.
    ///
    /// # Errors
    /// No such output.
    pub fn output_bytes(&self, i: usize) -> Result<&[u8], InvokeError> {
        let t = self.output_info(i)?;
        let r = arena_range(&t)?;
        Ok(&self.arena[r])
    }

    /// Sets an int8 input from raw quantized values.
    ///
    /// # Errors
    /// No such input, not int8, or wrong length.
    pub fn set_input_i8(&mut self, i: usize, data: &[i8]) -> Result<(), InvokeError> {
        let t = self.input_info(i)?;
        if t.dtype != DType::I8 {
            return Err(InvokeError::TypeMismatch);
        }
        let n = element_count(&t);
        if data.len() != n {
            return Err(InvokeError::LengthMismatch {
                expected: n,
                given: data.len(),
            });
        }
        self.input_bytes_mut(i)?
            .copy_from_slice(bytemuck::cast_slice(data));
        Ok(())
    }

    /// Sets an input from real values: quantized at the edge with the input's own parameters for
    /// int8 inputs (TFLM's rounding), narrowed for f16, copied for f32.
    ///
    /// # Errors
    /// No such input or wrong length.
    pub fn set_input_f32(&mut self, i: usize, data: &[f32]) -> Result<(), InvokeError> {
        let t = self.input_info(i)?;
        let n = element_count(&t);
        if data.len() != n {
            return Err(InvokeError::LengthMismatch {
                expected: n,
                given: data.len(),
            });
        }
        let dst = self.input_bytes_mut(i)?;
        match t.dtype {
            DType::I8 => {
                let q = t.quant.ok_or(InvokeError::TypeMismatch)?;
                kernels::quantize::quantize_to_i8(
                    q.scale,
                    q.zero_point,
                    data,
                    bytemuck::cast_slice_mut(dst),
                );
            }
            DType::F32 => dst.copy_from_slice(bytemuck::cast_slice(data)),
            DType::F16 => {
                for (d, &v) in cast_mut::<f16>(dst)?.iter_mut().zip(data) {
                    *d = f16::from_f32(v);
                }
            }
            DType::I32 => return Err(InvokeError::TypeMismatch),
        }
        Ok(())
    }

    /// The raw int8 values of output `i`.
    ///
    /// # Errors
    /// No such output or not int8.
    pub fn output_i8(&self, i: usize) -> Result<&[i8], InvokeError> {
        if self.output_info(i)?.dtype != DType::I8 {
            return Err(InvokeError::TypeMismatch);
        }
        Ok(bytemuck::cast_slice(self.output_bytes(i)?))
    }

    /// Output `i` as real values (dequantized for int8, widened for f16) into `out`.
    ///
    /// # Errors
    /// No such output or wrong length.
    pub fn output_f32(&self, i: usize, out: &mut [f32]) -> Result<(), InvokeError> {
        let t = self.output_info(i)?;
        let n = element_count(&t);
        if out.len() != n {
            return Err(InvokeError::LengthMismatch {
                expected: n,
                given: out.len(),
            });
        }
        let src = self.output_bytes(i)?;
        match t.dtype {
            DType::I8 => {
                let q = t.quant.ok_or(InvokeError::TypeMismatch)?;
                kernels::quantize::dequantize_i8(
                    q.scale,
                    q.zero_point,
                    bytemuck::cast_slice(src),
                    out,
                );
            }
            DType::F32 => out.copy_from_slice(cast::<f32>(src)?),
            DType::F16 => {
                for (o, v) in out.iter_mut().zip(cast::<f16>(src)?) {
                    *o = v.to_f32();
                }
            }
            DType::I32 => return Err(InvokeError::TypeMismatch),
        }
        Ok(())
    }

    /// Runs every op once.
    ///
    /// # Errors
    /// Only if the model is inconsistent, which [`Model::load`] rules out.
    pub fn invoke(&mut self) -> Result<(), InvokeError> {
        self.invoke_observed(|_| {})
    }

    /// [`Interpreter::invoke`], calling `after_op(index)` when op `index` has run (for per-op
    /// timing or tracing; the output of that op can be read from the arena at that moment).
    ///
    /// # Errors
    /// As [`Interpreter::invoke`].
    pub fn invoke_observed(&mut self, mut after_op: impl FnMut(usize)) -> Result<(), InvokeError> {
        let model = self.model;
        let ops = model.ops();
        for item in ops {
            let (index, op) = item?;
            let prepared = prepare_op(&model, index, &op)?;
            run_op(&model, &op, &prepared, self.arena)?;
            after_op(usize::from(index));
        }
        Ok(())
    }
}

fn run_op(
    model: &Model<'_>,
    op: &OpDef,
    prepared: &Prepared,
    arena: &mut [u8],
) -> Result<(), ModelError> {
    let out_t = model.tensor(op.output)?;
    let out_range = arena_range(&out_t)?;
    // RESHAPE planned in place: nothing to do.
    if matches!(op.kind, OpKind::Reshape) {
        let in_t = model.tensor(op.inputs[0])?;
        if let Location::Arena { .. } = in_t.location {
            if arena_range(&in_t)? == out_range {
                return Ok(());
            }
        }
    }
    let scratch = op.scratch.offset as usize..op.scratch.offset as usize + op.scratch.len as usize;
    let (shared, out, _scratch) = carve(arena, out_range, scratch)?;
    let x = Operands { model, shared };
    match out_t.dtype {
        DType::I8 => run_i8(&x, op, prepared, &out_t, bytemuck::cast_slice_mut(out)),
        DType::F32 => run_float::<f32>(&x, op, prepared, cast_mut(out)?),
        DType::F16 => run_float::<f16>(&x, op, prepared, cast_mut(out)?),
        DType::I32 => Err(ModelError::BadOp {
            index: NO_TENSOR,
            reason: "int32 outputs are not supported",
        }),
    }
}

fn run_i8(
    x: &Operands<'_, '_>,
    op: &OpDef,
    prepared: &Prepared,
    out_t: &TensorDef,
    out: &mut [i8],
) -> Result<(), ModelError> {
    use kernels::*;
    let (in_t, in_b) = x.tensor(op, 0)?;
    let input: &[i8] = bytemuck::cast_slice(in_b);
    let zp_in = zp(&in_t);
    let zp_out = zp(out_t);
    match (&op.kind, prepared) {
        (OpKind::Conv2d(p) | OpKind::DepthwiseConv2d(p), Prepared::Conv { g, depthwise }) => {
            let (_, f) = x.tensor(op, 1)?;
            let bias = x.optional::<i32>(op, 2)?;
            let q = QuantizedOutput {
                input_zero_point: zp_in,
                filter_zero_point: 0,
                output_zero_point: zp_out,
                requant: requant_table(x.model, p.requant)?,
                clamp: p.clamp,
            };
            if *depthwise {
                depthwise::depthwise_conv2d_i8(g, &q, input, bytemuck::cast_slice(f), bias, out);
            } else {
                conv::conv2d_i8(g, &q, input, bytemuck::cast_slice(f), bias, out);
            }
        }
        (OpKind::FullyConnected(p), Prepared::FullyConnected(g)) => {
            let (w_t, w) = x.tensor(op, 1)?;
            let bias = x.optional::<i32>(op, 2)?;
            let q = QuantizedOutput {
                input_zero_point: zp_in,
                filter_zero_point: zp(&w_t),
                output_zero_point: zp_out,
                requant: requant_table(x.model, p.requant)?,
                clamp: p.clamp,
            };
            fully_connected::fully_connected_i8(g, &q, input, bytemuck::cast_slice(w), bias, out);
        }
        (OpKind::Add(p) | OpKind::Sub(p) | OpKind::Mul(p), Prepared::Binary(s)) => {
            let (b_t, b) = x.tensor(op, 1)?;
            let zps = [zp_in, zp(&b_t), zp_out];
            let b: &[i8] = bytemuck::cast_slice(b);
            match op.kind {
                OpKind::Add(_) => binary::add_i8(s, p, zps, input, b, out),
                OpKind::Sub(_) => binary::sub_i8(s, p, zps, input, b, out),
                _ => binary::mul_i8(s, p, zps, input, b, out),
            }
        }
        (OpKind::Transpose(_), Prepared::Transpose(g)) => transpose::transpose(g, input, out),
        (OpKind::Lut(table), _) => {
            let bytes: &[i8] = bytemuck::cast_slice(x.model.weights_range(*table)?);
            let table = <&[i8; 256]>::try_from(bytes).map_err(|_| ModelError::BadOp {
                index: NO_TENSOR,
                reason: "LUT table must be exactly 256 bytes",
            })?;
            lut::lut_i8(table, input, out)
        }
        (OpKind::AveragePool2d(p), Prepared::Pool(g)) => {
            pooling::average_pool_i8(g, p.clamp, input, out)
        }
        (OpKind::MaxPool2d(p), Prepared::Pool(g)) => pooling::max_pool_i8(g, p.clamp, input, out),
        (OpKind::Reshape, _) => out.copy_from_slice(input),
        (OpKind::Softmax(p), Prepared::Softmax { outer, depth }) => {
            softmax::softmax_i8(p, *outer, *depth, input, out)
        }
        (OpKind::Relu(p) | OpKind::Relu6(p), _) => {
            activation::relu_i8(p.requant, p.clamp, [zp_in, zp_out], input, out)
        }
        (OpKind::Logistic(p), _) => activation::logistic_i8(p, zp_in, input, out),
        (OpKind::Tanh(p), _) => activation::tanh_i8(p, zp_in, input, out),
        (OpKind::Concatenation(_), Prepared::Concat { outer, inner }) => {
            concat_op::<i8>(x, op, *outer, *inner, out)?
        }
        (OpKind::Pad(p), Prepared::Pad { in_shape }) => {
            pad::pad(*in_shape, p, zp_out as i8, input, out)
        }
        (OpKind::Mean(p), Prepared::Mean { in_shape, rank }) => {
            mean::mean_i8(&in_shape[..*rank], p.axes, p, [zp_in, zp_out], input, out)
        }
        (OpKind::Quantize(p), _) => match in_t.dtype {
            DType::I8 => quantize::requantize_i8(p.requant, [zp_in, zp_out], input, out),
            DType::F32 => {
                let q = out_t.quant.ok_or(ModelError::BadOp {
                    index: NO_TENSOR,
                    reason: "QUANTIZE output has no quantization",
                })?;
                quantize::quantize_to_i8(q.scale, q.zero_point, cast::<f32>(in_b)?, out)
            }
            DType::F16 => {
                let q = out_t.quant.ok_or(ModelError::BadOp {
                    index: NO_TENSOR,
                    reason: "QUANTIZE output has no quantization",
                })?;
                quantize::quantize_to_i8(q.scale, q.zero_point, cast::<f16>(in_b)?, out)
            }
            DType::I32 => {
                return Err(ModelError::BadOp {
                    index: NO_TENSOR,
                    reason: "QUANTIZE from int32",
                })
            }
        },
        _ => {
            return Err(ModelError::BadOp {
                index: NO_TENSOR,
                reason: "op has no int8 kernel",
            })
        }
    }
    Ok(())
}

fn concat_op<T: bytemuck::Pod>(
    x: &Operands<'_, '_>,
    op: &OpDef,
    outer: usize,
    inner: usize,
    out: &mut [T],
) -> Result<(), ModelError> {
    let mut parts: heapless::Vec<(&[T], usize), { crate::graph::MAX_OP_INPUTS }> =
        heapless::Vec::new();
    for i in 0..op.inputs.len() {
        let (t, b) = x.tensor(op, i)?;
        let axis_len = element_count(&t) / outer.max(1) / inner.max(1);
        parts
            .push((cast(b)?, axis_len * inner))
            .map_err(|_| ModelError::BadOp {
                index: NO_TENSOR,
                reason: "too many inputs",
            })?;
    }
    kernels::concat::concatenate(outer, &parts, out);
    Ok(())
}

fn run_float<T: Float>(
    x: &Operands<'_, '_>,
    op: &OpDef,
    prepared: &Prepared,
    out: &mut [T],
) -> Result<(), ModelError> {
    use kernels::*;
    let (in_t, in_b) = x.tensor(op, 0)?;
    if let OpKind::Dequantize = op.kind {
        let q = in_t.quant.ok_or(ModelError::BadOp {
            index: NO_TENSOR,
            reason: "DEQUANTIZE input has no quantization",
        })?;
        quantize::dequantize_i8(q.scale, q.zero_point, bytemuck::cast_slice(in_b), out);
        return Ok(());
    }
    let input: &[T] = cast(in_b)?;
    match (&op.kind, prepared) {
        (OpKind::Conv2d(p) | OpKind::DepthwiseConv2d(p), Prepared::Conv { g, depthwise }) => {
            let (_, f) = x.tensor(op, 1)?;
            let bias = x.optional::<T>(op, 2)?;
            if *depthwise {
                depthwise::depthwise_conv2d_float(g, p.activation, input, cast(f)?, bias, out);
            } else {
                conv::conv2d_float(g, p.activation, input, cast(f)?, bias, out);
            }
        }
        (OpKind::FullyConnected(p), Prepared::FullyConnected(g)) => {
            let (_, w) = x.tensor(op, 1)?;
            let bias = x.optional::<T>(op, 2)?;
            fully_connected::fully_connected_float(g, p.activation, input, cast(w)?, bias, out);
        }
        (OpKind::Add(p), Prepared::Binary(s)) => {
            binary::add_float(s, p.activation, input, cast(x.tensor(op, 1)?.1)?, out)
        }
        (OpKind::Mul(p), Prepared::Binary(s)) => {
            binary::mul_float(s, p.activation, input, cast(x.tensor(op, 1)?.1)?, out)
        }
        (OpKind::Sub(p), Prepared::Binary(s)) => {
            binary::sub_float(s, p.activation, input, cast(x.tensor(op, 1)?.1)?, out)
        }
        (OpKind::Div(p), Prepared::Binary(s)) => {
            binary::div_float(s, p.activation, input, cast(x.tensor(op, 1)?.1)?, out)
        }
        (OpKind::PRelu, Prepared::Binary(s)) => {
            binary::prelu_float(s, input, cast(x.tensor(op, 1)?.1)?, out)
        }
        (OpKind::Transpose(_), Prepared::Transpose(g)) => transpose::transpose(g, input, out),
        (OpKind::UnaryFloat(f), _) => unary::unary_float(*f, input, out),
        (OpKind::AveragePool2d(p), Prepared::Pool(g)) => {
            pooling::average_pool_float(g, p.activation, input, out)
        }
        (OpKind::MaxPool2d(p), Prepared::Pool(g)) => {
            pooling::max_pool_float(g, p.activation, input, out)
        }
        (OpKind::Reshape, _) => out.copy_from_slice(input),
        (OpKind::Softmax(p), Prepared::Softmax { outer, depth }) => {
            softmax::softmax_float(p.beta, *outer, *depth, input, out)
        }
        (OpKind::Relu(_), _) => activation::relu_float(None, input, out),
        (OpKind::Relu6(_), _) => activation::relu_float(Some(6.0), input, out),
        (OpKind::Logistic(_), _) => activation::logistic_float(input, out),
        (OpKind::Tanh(_), _) => activation::tanh_float(input, out),
        (OpKind::Concatenation(p), Prepared::Concat { outer, inner }) => {
            concat_op::<T>(x, op, *outer, *inner, out)?;
            concat::activate_in_place(p.activation, out);
        }
        (OpKind::Pad(p), Prepared::Pad { in_shape }) => {
            pad::pad(*in_shape, p, T::from_f32(0.0), input, out)
        }
        (OpKind::Mean(p), Prepared::Mean { in_shape, rank }) => {
            mean::mean_float(&in_shape[..*rank], p.axes, input, out)
        }
        _ => {
            return Err(ModelError::BadOp {
                index: NO_TENSOR,
                reason: "op has no float kernel",
            })
        }
    }
    Ok(())
}
