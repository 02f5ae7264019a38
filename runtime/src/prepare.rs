//! Per-op preparation: checks an op against its tensors (ranks, shapes, types, quantization,
//! prepared parameters) and derives the kernel geometry. Run for every op by [`Model::load`] —
//! so a model that loaded has only valid ops — and again by the interpreter before each kernel
//! call, so the kernel always receives exactly what was validated.

use crate::error::ModelError;
use crate::graph::{
    BufRef, DType, Location, OpDef, OpKind, Requant, TensorDef, UnaryFn, MAX_RANK, NO_TENSOR,
};
use crate::kernels::binary::BroadcastShapes;
use crate::kernels::conv::ConvGeometry;
use crate::kernels::fully_connected::FullyConnectedGeometry;
use crate::kernels::pooling::PoolGeometry;
use crate::kernels::transpose::TransposeGeometry;
use crate::model::{element_count, Model};
use crate::quant::requant_is_valid;

/// What the interpreter needs to run one op, derived from validated definitions.
#[derive(Clone, Copy, Debug)]
pub enum Prepared {
    /// CONV_2D or DEPTHWISE_CONV_2D.
    Conv {
        /// Geometry.
        g: ConvGeometry,
        /// Depthwise?
        depthwise: bool,
    },
    /// FULLY_CONNECTED.
    FullyConnected(FullyConnectedGeometry),
    /// ADD / SUB / MUL / DIV / PRELU (PRELU: input 0 is `x`, input 1 the slope, out == x).
    Binary(BroadcastShapes),
    /// AVERAGE_POOL_2D / MAX_POOL_2D.
    Pool(PoolGeometry),
    /// SOFTMAX over rows.
    Softmax {
        /// Number of rows.
        outer: usize,
        /// Row length.
        depth: usize,
    },
    /// One output element per input element (RESHAPE, activations, QUANTIZE, DEQUANTIZE, float
    /// unary functions, LUT).
    Elementwise {
        /// Element count.
        count: usize,
    },
    /// CONCATENATION: outer loop count (the inner sizes are read per input at run time).
    Concat {
        /// Product of the dimensions before the axis.
        outer: usize,
        /// Product of the dimensions after the axis.
        inner: usize,
    },
    /// PAD on a 4-D (left-padded) input shape.
    Pad {
        /// Input shape.
        in_shape: [usize; 4],
    },
    /// TRANSPOSE.
    Transpose(TransposeGeometry),
    /// MEAN over a mask of axes of the input shape.
    Mean {
        /// Input shape.
        in_shape: [usize; MAX_RANK],
        /// Rank of the input.
        rank: usize,
    },
}

/// The element type an op computes in (its output's, except DEQUANTIZE/QUANTIZE which convert).
pub fn op_dtype(model: &Model<'_>, op: &OpDef) -> Result<DType, ModelError> {
    Ok(model.tensor(op.output)?.dtype)
}

struct Ctx<'m, 'a> {
    model: &'m Model<'a>,
    index: u16,
}

impl Ctx<'_, '_> {
    fn err(&self, reason: &'static str) -> ModelError {
        ModelError::BadOp {
            index: self.index,
            reason,
        }
    }

    fn input(&self, op: &OpDef, i: usize) -> Result<TensorDef, ModelError> {
        match op.inputs.get(i) {
            Some(&t) if t != NO_TENSOR => self.model.tensor(t),
            _ => Err(self.err("a required input is missing")),
        }
    }

    fn optional_input(&self, op: &OpDef, i: usize) -> Result<Option<TensorDef>, ModelError> {
        match op.inputs.get(i) {
            Some(&t) if t != NO_TENSOR => Ok(Some(self.model.tensor(t)?)),
            _ => Ok(None),
        }
    }

    fn expect_inputs(&self, op: &OpDef, min: usize, max: usize) -> Result<(), ModelError> {
        let n = op.inputs.len();
        if n < min || n > max {
            return Err(self.err("wrong number of inputs"));
        }
        Ok(())
    }

    fn requants(&self, r: BufRef, channels: usize) -> Result<(), ModelError> {
        let bytes = self
            .model
            .weights_range(r)
            .map_err(|_| self.err("requant table lies outside WEIGHTS"))?;
        if !r.offset.is_multiple_of(4) {
            return Err(self.err("requant table is misaligned"));
        }
        if bytes.len() != 8 && bytes.len() != 8 * channels {
            return Err(self.err("requant table must have 1 or one-per-channel entries"));
        }
        for e in bytes.chunks_exact(8) {
            let m = i32::from_le_bytes([e[0], e[1], e[2], e[3]]);
            let s = i32::from_le_bytes([e[4], e[5], e[6], e[7]]);
            if !requant_is_valid(m, s) {
                return Err(self.err("requant multiplier or shift out of range"));
            }
        }
        Ok(())
    }

    fn requant(&self, r: Requant) -> Result<(), ModelError> {
        if requant_is_valid(r.multiplier, r.shift) {
            Ok(())
        } else {
            Err(self.err("requant multiplier or shift out of range"))
        }
    }
}

/// The per-channel requant table of an int8 op, cast in place.
pub fn requant_table<'a>(model: &Model<'a>, r: BufRef) -> Result<&'a [Requant], ModelError> {
    let bytes = model.weights_range(r)?;
    bytemuck::try_cast_slice(bytes).map_err(|_| ModelError::Misaligned {
        what: "requant table",
    })
}

fn dims(t: &TensorDef) -> impl Iterator<Item = usize> + '_ {
    t.shape.iter().map(|&d| d as usize)
}

fn dim4(ctx: &Ctx<'_, '_>, t: &TensorDef) -> Result<[usize; 4], ModelError> {
    if t.shape.len() != 4 {
        return Err(ctx.err("expected a 4-D tensor"));
    }
    Ok([
        t.shape[0] as usize,
        t.shape[1] as usize,
        t.shape[2] as usize,
        t.shape[3] as usize,
    ])
}

fn is_float(d: DType) -> bool {
    matches!(d, DType::F32 | DType::F16)
}

/// Checks that the op's tensors are int8 throughout or one float type throughout.
fn same_compute_type(ctx: &Ctx<'_, '_>, ts: &[&TensorDef]) -> Result<DType, ModelError> {
    let d = ts[0].dtype;
    if !(d == DType::I8 || is_float(d)) || ts.iter().any(|t| t.dtype != d) {
        return Err(ctx.err("tensors must all be int8, all f32 or all f16"));
    }
    Ok(d)
}

fn in_arena(ctx: &Ctx<'_, '_>, t: &TensorDef) -> Result<(), ModelError> {
    match t.location {
        Location::Arena { .. } => Ok(()),
        Location::Weights(_) => Err(ctx.err("activation operand must live in the arena")),
    }
}

fn constant(ctx: &Ctx<'_, '_>, t: &TensorDef) -> Result<(), ModelError> {
    match t.location {
        Location::Weights(_) => Ok(()),
        Location::Arena { .. } => Err(ctx.err("weights operand must be a constant")),
    }
}

fn zero_point(t: &TensorDef) -> i32 {
    t.quant.map_or(0, |q| q.zero_point)
}

fn bias_ok(
    ctx: &Ctx<'_, '_>,
    bias: &Option<TensorDef>,
    dtype: DType,
    channels: usize,
) -> Result<(), ModelError> {
    if let Some(b) = bias {
        constant(ctx, b)?;
        let want = if dtype == DType::I8 {
            DType::I32
        } else {
            dtype
        };
        if b.dtype != want {
            return Err(ctx.err("bias type must be int32 for int8 ops and match float ops"));
        }
        if element_count(b) != channels {
            return Err(ctx.err("bias length must equal the output channels"));
        }
    }
    Ok(())
}

/// Broadcast shapes of a binary op's two inputs and output.
fn broadcast(
    ctx: &Ctx<'_, '_>,
    a: &TensorDef,
    b: &TensorDef,
    out: &TensorDef,
) -> Result<BroadcastShapes, ModelError> {
    let mut sa = [0usize; MAX_RANK];
    let mut sb = [0usize; MAX_RANK];
    let mut so = [0usize; MAX_RANK];
    for (dst, t) in [(&mut sa, a), (&mut sb, b), (&mut so, out)] {
        for (d, s) in dst.iter_mut().zip(dims(t)) {
            *d = s;
        }
    }
    BroadcastShapes::new(
        &sa[..a.shape.len()],
        &sb[..b.shape.len()],
        &so[..out.shape.len()],
    )
    .ok_or(ctx.err("input shapes do not broadcast to the output shape"))
}

/// (scale, zero point) of a tensor, for comparing the quantization of two int8 tensors.
fn scale_zp(t: &TensorDef) -> Option<(f32, i32)> {
    t.quant.map(|q| (q.scale, q.zero_point))
}

fn window_ok(input: usize, output: usize, stride: usize, pad: usize, extent: u64) -> bool {
    // The first window starts inside the padded input and every window starts before the end.
    // (u64: dimensions up to 2^30 times strides up to 2^16 overflow a 32-bit usize.)
    let (input, output, stride, pad) = (input as u64, output as u64, stride as u64, pad as u64);
    stride >= 1 && pad < extent.max(1) && output >= 1 && (output - 1) * stride < input + pad
}

/// Validates op `index` and derives its kernel geometry.
///
/// # Errors
/// [`ModelError::BadOp`] naming the first rule that fails.
pub fn prepare_op(model: &Model<'_>, index: u16, op: &OpDef) -> Result<Prepared, ModelError> {
    let ctx = Ctx { model, index };
    let out = model.tensor(op.output)?;
    in_arena(&ctx, &out)?;
    match op.kind {
        OpKind::Conv2d(p) | OpKind::DepthwiseConv2d(p) => {
            let depthwise = matches!(op.kind, OpKind::DepthwiseConv2d(_));
            ctx.expect_inputs(op, 2, 3)?;
            let input = ctx.input(op, 0)?;
            let filter = ctx.input(op, 1)?;
            let bias = ctx.optional_input(op, 2)?;
            in_arena(&ctx, &input)?;
            constant(&ctx, &filter)?;
            let dtype = same_compute_type(&ctx, &[&input, &filter, &out])?;
            let [n, h, w, c] = dim4(&ctx, &input)?;
            let [fo, fh, fw, fi] = dim4(&ctx, &filter)?;
            let [on, oh, ow, oc] = dim4(&ctx, &out)?;
            let (stride_h, stride_w) = (p.stride_h as usize, p.stride_w as usize);
            let (dil_h, dil_w) = (p.dilation_h as usize, p.dilation_w as usize);
            if dil_h == 0 || dil_w == 0 {
                return Err(ctx.err("dilation must be at least 1"));
            }
            if on != n {
                return Err(ctx.err("output batch differs from input batch"));
            }
            let (filter_in_c, depth_multiplier) = if depthwise {
                let dm = p.depth_multiplier as usize;
                if fo != 1 || dm == 0 || fi != oc || oc != c * dm {
                    return Err(
                        ctx.err("depthwise filter must be [1, h, w, in_c * depth_multiplier]")
                    );
                }
                (1, dm)
            } else {
                if fo != oc
                    || fi == 0
                    || c % fi != 0
                    || oc % (c / fi) != 0
                    || p.depth_multiplier > 1
                {
                    return Err(ctx.err("conv filter must be [out_c, h, w, in_c / groups]"));
                }
                (fi, 1)
            };
            let ext_h = (fh as u64 - 1) * dil_h as u64 + 1;
            let ext_w = (fw as u64 - 1) * dil_w as u64 + 1;
            if !window_ok(h, oh, stride_h, p.pad_top as usize, ext_h)
                || !window_ok(w, ow, stride_w, p.pad_left as usize, ext_w)
            {
                return Err(ctx.err("output size, stride and padding are inconsistent"));
            }
            bias_ok(&ctx, &bias, dtype, oc)?;
            if dtype == DType::I8 {
                ctx.requants(p.requant, oc)?;
                if p.clamp.min > p.clamp.max {
                    return Err(ctx.err("clamp min is above max"));
                }
                if let Some(q) = filter.quant {
                    if q.zero_point != 0 {
                        return Err(ctx.err("int8 conv weights must be symmetric (zero point 0)"));
                    }
                }
            }
            let g = ConvGeometry {
                batch: n,
                in_h: h,
                in_w: w,
                in_c: c,
                out_h: oh,
                out_w: ow,
                out_c: oc,
                filter_h: fh,
                filter_w: fw,
                filter_in_c,
                stride_h,
                stride_w,
                dilation_h: dil_h,
                dilation_w: dil_w,
                pad_top: p.pad_top as usize,
                pad_left: p.pad_left as usize,
                depth_multiplier,
            };
            Ok(Prepared::Conv { g, depthwise })
        }
        OpKind::FullyConnected(p) => {
            ctx.expect_inputs(op, 2, 3)?;
            let input = ctx.input(op, 0)?;
            let weights = ctx.input(op, 1)?;
            let bias = ctx.optional_input(op, 2)?;
            in_arena(&ctx, &input)?;
            constant(&ctx, &weights)?;
            let dtype = same_compute_type(&ctx, &[&input, &weights, &out])?;
            if weights.shape.len() != 2 {
                return Err(ctx.err("weights must be [out_features, in_features]"));
            }
            let (out_f, in_f) = (weights.shape[0] as usize, weights.shape[1] as usize);
            let n_in = element_count(&input);
            if !n_in.is_multiple_of(in_f) {
                return Err(ctx.err("input size is not a multiple of in_features"));
            }
            let batch = n_in / in_f;
            if element_count(&out) as u64 != batch as u64 * out_f as u64
                || dims(&out).last() != Some(out_f)
            {
                return Err(ctx.err("output shape must be [batch, out_features]"));
            }
            bias_ok(&ctx, &bias, dtype, out_f)?;
            if dtype == DType::I8 {
                ctx.requants(p.requant, out_f)?;
                if p.clamp.min > p.clamp.max {
                    return Err(ctx.err("clamp min is above max"));
                }
            }
            Ok(Prepared::FullyConnected(FullyConnectedGeometry {
                batch,
                in_features: in_f,
                out_features: out_f,
            }))
        }
        OpKind::Add(p) | OpKind::Sub(p) | OpKind::Mul(p) | OpKind::Div(p) => {
            ctx.expect_inputs(op, 2, 2)?;
            let a = ctx.input(op, 0)?;
            let b = ctx.input(op, 1)?;
            let dtype = same_compute_type(&ctx, &[&a, &b, &out])?;
            let s = broadcast(&ctx, &a, &b, &out)?;
            if dtype == DType::I8 {
                if matches!(op.kind, OpKind::Div(_)) {
                    return Err(ctx.err("int8 DIV is not supported (float only)"));
                }
                ctx.requant(p.output)?;
                if matches!(op.kind, OpKind::Add(_) | OpKind::Sub(_)) {
                    ctx.requant(p.input0)?;
                    ctx.requant(p.input1)?;
                    if p.input0.shift > 0
                        || p.input1.shift > 0
                        || p.output.shift > 0
                        || !(0..=22).contains(&p.left_shift)
                    {
                        return Err(ctx.err("ADD/SUB rescale shifts out of range"));
                    }
                }
                if p.clamp.min > p.clamp.max {
                    return Err(ctx.err("clamp min is above max"));
                }
            }
            Ok(Prepared::Binary(s))
        }
        OpKind::AveragePool2d(p) | OpKind::MaxPool2d(p) => {
            ctx.expect_inputs(op, 1, 1)?;
            let input = ctx.input(op, 0)?;
            same_compute_type(&ctx, &[&input, &out])?;
            let [n, h, w, c] = dim4(&ctx, &input)?;
            let [on, oh, ow, oc] = dim4(&ctx, &out)?;
            let (fh, fw) = (p.filter_h as usize, p.filter_w as usize);
            if on != n || oc != c || fh == 0 || fw == 0 {
                return Err(
                    ctx.err("pool output must keep batch and channels; filter must be non-empty")
                );
            }
            if !window_ok(h, oh, p.stride_h as usize, p.pad_top as usize, fh as u64)
                || !window_ok(w, ow, p.stride_w as usize, p.pad_left as usize, fw as u64)
            {
                return Err(ctx.err("output size, stride and padding are inconsistent"));
            }
            // The int8 average sums up to `cells` values of [-128, 127] and adds half the count
            // before dividing, in i32: keep that from overflowing.
            let cells = fh.min(h) as u64 * fw.min(w) as u64;
            if matches!(op.kind, OpKind::AveragePool2d(_))
                && input.dtype == DType::I8
                && 128 * cells + cells / 2 > 1 << 31
            {
                return Err(ctx.err("int8 average pool window is too large for an i32 sum"));
            }
            if input.dtype == DType::I8 && (input.quant != out.quant || p.clamp.min > p.clamp.max) {
                return Err(ctx.err("int8 pooling needs identical input and output quantization"));
            }
            Ok(Prepared::Pool(PoolGeometry {
                batch: n,
                in_h: h,
                in_w: w,
                channels: c,
                out_h: oh,
                out_w: ow,
                filter_h: fh,
                filter_w: fw,
                stride_h: p.stride_h as usize,
                stride_w: p.stride_w as usize,
                pad_top: p.pad_top as usize,
                pad_left: p.pad_left as usize,
            }))
        }
        OpKind::Reshape => {
            ctx.expect_inputs(op, 1, 1)?;
            let input = ctx.input(op, 0)?;
            if input.dtype != out.dtype || element_count(&input) != element_count(&out) {
                return Err(ctx.err("reshape must keep the type and the element count"));
            }
            if input.dtype == DType::I8
                && input.quant.map(|q| (q.scale, q.zero_point))
                    != out.quant.map(|q| (q.scale, q.zero_point))
            {
                return Err(ctx.err("reshape must keep the quantization"));
            }
            Ok(Prepared::Elementwise {
                count: element_count(&out),
            })
        }
        OpKind::Softmax(p) => {
            ctx.expect_inputs(op, 1, 1)?;
            let input = ctx.input(op, 0)?;
            let dtype = same_compute_type(&ctx, &[&input, &out])?;
            if input.shape != out.shape || input.shape.is_empty() {
                return Err(ctx.err("softmax output must have the input's shape"));
            }
            if dtype == DType::I8 {
                let q = out
                    .quant
                    .ok_or(ctx.err("int8 softmax output needs quantization"))?;
                if q.zero_point != -128 || q.scale != 1.0 / 256.0 {
                    return Err(
                        ctx.err("int8 softmax output must have scale 1/256 and zero point -128")
                    );
                }
                if !(0..=31).contains(&p.input_left_shift)
                    || !requant_is_valid(p.input_multiplier, 0)
                    || p.diff_min > 0
                {
                    return Err(ctx.err("softmax input scaling out of range"));
                }
            } else if !p.beta.is_finite() {
                return Err(ctx.err("softmax beta is not finite"));
            }
            let depth = *input.shape.last().unwrap_or(&1) as usize;
            Ok(Prepared::Softmax {
                outer: element_count(&input) / depth,
                depth,
            })
        }
        OpKind::Relu(p) | OpKind::Relu6(p) => {
            ctx.expect_inputs(op, 1, 1)?;
            let input = ctx.input(op, 0)?;
            let dtype = same_compute_type(&ctx, &[&input, &out])?;
            if input.shape != out.shape {
                return Err(ctx.err("activation output must have the input's shape"));
            }
            if dtype == DType::I8 {
                ctx.requant(p.requant)?;
                if p.clamp.min > p.clamp.max {
                    return Err(ctx.err("clamp min is above max"));
                }
            }
            Ok(Prepared::Elementwise {
                count: element_count(&out),
            })
        }
        OpKind::Logistic(p) | OpKind::Tanh(p) => {
            ctx.expect_inputs(op, 1, 1)?;
            let input = ctx.input(op, 0)?;
            let dtype = same_compute_type(&ctx, &[&input, &out])?;
            if input.shape != out.shape {
                return Err(ctx.err("activation output must have the input's shape"));
            }
            if dtype == DType::I8 {
                if !requant_is_valid(p.input_multiplier, p.input_left_shift)
                    || p.input_range_radius < 0
                {
                    return Err(ctx.err("sigmoid input scaling out of range"));
                }
                let q = out.quant.ok_or(ctx.err("int8 output needs quantization"))?;
                let logistic = matches!(op.kind, OpKind::Logistic(_));
                let ok = if logistic {
                    q.scale == 1.0 / 256.0 && q.zero_point == -128
                } else {
                    q.scale == 1.0 / 128.0 && q.zero_point == 0
                };
                if !ok {
                    return Err(ctx
                        .err("int8 LOGISTIC needs output scale 1/256, zp -128; TANH 1/128, zp 0"));
                }
            }
            Ok(Prepared::Elementwise {
                count: element_count(&out),
            })
        }
        OpKind::Concatenation(p) => {
            if op.inputs.is_empty() {
                return Err(ctx.err("concatenation needs inputs"));
            }
            let axis = p.axis as usize;
            let rank = out.shape.len();
            if axis >= rank {
                return Err(ctx.err("concatenation axis is beyond the rank"));
            }
            let mut total = 0u64;
            for i in 0..op.inputs.len() {
                let t = ctx.input(op, i)?;
                if t.dtype != out.dtype || t.shape.len() != rank {
                    return Err(
                        ctx.err("concatenation inputs must match the output's type and rank")
                    );
                }
                for d in 0..rank {
                    if d != axis && t.shape[d] != out.shape[d] {
                        return Err(ctx.err("concatenation inputs differ outside the axis"));
                    }
                }
                if t.dtype == DType::I8
                    && t.quant.map(|q| (q.scale, q.zero_point))
                        != out.quant.map(|q| (q.scale, q.zero_point))
                {
                    return Err(
                        ctx.err("int8 concatenation needs identical quantization on all inputs")
                    );
                }
                total += t.shape[axis] as u64;
            }
            if total != out.shape[axis] as u64 {
                return Err(ctx.err("concatenation sizes do not add up to the output"));
            }
            let outer = dims(&out).take(axis).product();
            let inner = dims(&out).skip(axis + 1).product();
            Ok(Prepared::Concat { outer, inner })
        }
        OpKind::Pad(p) => {
            ctx.expect_inputs(op, 1, 1)?;
            let input = ctx.input(op, 0)?;
            if input.dtype != out.dtype
                || input.shape.len() != out.shape.len()
                || input.shape.len() > 4
            {
                return Err(ctx.err("pad supports up to 4-D tensors of one type"));
            }
            if input.dtype == DType::I8 && input.quant != out.quant {
                return Err(ctx.err("int8 pad needs identical input and output quantization"));
            }
            let lead = 4 - input.shape.len();
            let mut in_shape = [1usize; 4];
            for (d, s) in dims(&input).enumerate() {
                in_shape[lead + d] = s;
            }
            for (d, &size) in in_shape.iter().enumerate() {
                let o = if d < lead {
                    1
                } else {
                    out.shape[d - lead] as u64
                };
                let want = size as u64 + p.before[d] as u64 + p.after[d] as u64;
                if o != want || (d < lead && (p.before[d] != 0 || p.after[d] != 0)) {
                    return Err(ctx.err("pad output shape does not match the paddings"));
                }
            }
            Ok(Prepared::Pad { in_shape })
        }
        OpKind::Mean(p) => {
            ctx.expect_inputs(op, 1, 1)?;
            let input = ctx.input(op, 0)?;
            same_compute_type(&ctx, &[&input, &out])?;
            let rank = input.shape.len();
            if p.axes == 0 || (rank < 8 && p.axes >> rank != 0) {
                return Err(ctx.err("mean axes are empty or beyond the rank"));
            }
            let kept: usize = dims(&input)
                .enumerate()
                .filter(|(i, _)| p.axes & (1 << i) == 0)
                .map(|(_, d)| d)
                .product();
            if element_count(&out) != kept {
                return Err(ctx.err("mean output size does not match the kept axes"));
            }
            if input.dtype == DType::I8 {
                ctx.requant(p.requant)?;
                // The kernel sums `q - zero_point` (|.| <= 255) over the reduced elements,
                // rescales by the requant and adds half the count before dividing, all in i32
                // (TFLM's arithmetic): keep that from overflowing.
                let count: u64 = dims(&input)
                    .enumerate()
                    .filter(|(i, _)| p.axes & (1 << i) != 0)
                    .map(|(_, d)| d as u64)
                    .product();
                let rescaled = ((255 * count) as u128) << p.requant.shift.max(0);
                if rescaled + (count / 2) as u128 >= 1 << 31 {
                    return Err(
                        ctx.err("int8 mean overflows i32 for its element count and requant")
                    );
                }
            }
            let mut in_shape = [1usize; MAX_RANK];
            for (d, s) in dims(&input).enumerate() {
                in_shape[d] = s;
            }
            Ok(Prepared::Mean { in_shape, rank })
        }
        OpKind::Quantize(p) => {
            ctx.expect_inputs(op, 1, 1)?;
            let input = ctx.input(op, 0)?;
            if out.dtype != DType::I8 || !(input.dtype == DType::I8 || is_float(input.dtype)) {
                return Err(ctx.err("QUANTIZE converts float or int8 to int8"));
            }
            if element_count(&input) != element_count(&out) {
                return Err(ctx.err("QUANTIZE must keep the element count"));
            }
            if input.dtype == DType::I8 {
                ctx.requant(p.requant)?;
            }
            Ok(Prepared::Elementwise {
                count: element_count(&out),
            })
        }
        OpKind::Dequantize => {
            ctx.expect_inputs(op, 1, 1)?;
            let input = ctx.input(op, 0)?;
            if input.dtype != DType::I8
                || !is_float(out.dtype)
                || element_count(&input) != element_count(&out)
            {
                return Err(ctx.err("DEQUANTIZE converts int8 to float, keeping the element count"));
            }
            Ok(Prepared::Elementwise {
                count: element_count(&out),
            })
        }
        OpKind::Transpose(p) => {
            ctx.expect_inputs(op, 1, 1)?;
            let input = ctx.input(op, 0)?;
            let dtype = same_compute_type(&ctx, &[&input, &out])?;
            let rank = input.shape.len();
            let mut in_shape = [0usize; MAX_RANK];
            for (d, s) in in_shape.iter_mut().zip(dims(&input)) {
                *d = s;
            }
            let mut perm = [0usize; MAX_RANK];
            for (d, &v) in perm.iter_mut().zip(&p.perm) {
                *d = v as usize;
            }
            let g = TransposeGeometry::new(&in_shape[..rank], &perm[..rank])
                .ok_or(ctx.err("transpose perm is not a permutation of the input's axes"))?;
            let want = g.out_shape();
            if out.shape.len() != rank || dims(&out).zip(want).any(|(o, w)| o != w) {
                return Err(ctx.err("transpose output shape is not the permuted input shape"));
            }
            if dtype == DType::I8 && scale_zp(&input) != scale_zp(&out) {
                return Err(ctx.err("int8 transpose needs identical input and output quantization"));
            }
            Ok(Prepared::Transpose(g))
        }
        OpKind::UnaryFloat(f) => {
            ctx.expect_inputs(op, 1, 1)?;
            let input = ctx.input(op, 0)?;
            let dtype = same_compute_type(&ctx, &[&input, &out])?;
            if !is_float(dtype) {
                return Err(ctx.err("float unary functions need f32 or f16 tensors (int8: LUT)"));
            }
            if input.shape != out.shape {
                return Err(ctx.err("activation output must have the input's shape"));
            }
            let finite = match f {
                UnaryFn::LeakyRelu { alpha } => alpha.is_finite(),
                UnaryFn::HardSigmoid { alpha, beta } => alpha.is_finite() && beta.is_finite(),
                UnaryFn::HardSwish => true,
                UnaryFn::Clamp { min, max } => min.is_finite() && max.is_finite(),
            };
            if !finite {
                return Err(ctx.err("unary function parameter is not finite"));
            }
            if let UnaryFn::Clamp { min, max } = f {
                if min > max {
                    return Err(ctx.err("clamp min is above max"));
                }
            }
            Ok(Prepared::Elementwise {
                count: element_count(&out),
            })
        }
        OpKind::Lut(table) => {
            ctx.expect_inputs(op, 1, 1)?;
            let input = ctx.input(op, 0)?;
            if input.dtype != DType::I8 || out.dtype != DType::I8 {
                return Err(ctx.err("LUT maps int8 to int8"));
            }
            if element_count(&input) != element_count(&out) {
                return Err(ctx.err("LUT must keep the element count"));
            }
            model
                .weights_range(table)
                .map_err(|_| ctx.err("LUT table lies outside WEIGHTS"))?;
            if table.len != 256 {
                return Err(ctx.err("LUT table must be exactly 256 bytes"));
            }
            Ok(Prepared::Elementwise {
                count: element_count(&out),
            })
        }
        OpKind::PRelu => {
            ctx.expect_inputs(op, 2, 2)?;
            let x = ctx.input(op, 0)?;
            let slope = ctx.input(op, 1)?;
            let dtype = same_compute_type(&ctx, &[&x, &slope, &out])?;
            if !is_float(dtype) {
                return Err(ctx.err("PRELU needs f32 or f16 tensors (int8: LUT)"));
            }
            if x.shape != out.shape {
                return Err(ctx.err("PRELU output must have the input's shape"));
            }
            Ok(Prepared::Binary(broadcast(&ctx, &x, &slope, &out)?))
        }
    }
}

/// Zero point of a tensor (0 when unquantized).
pub fn zp(t: &TensorDef) -> i32 {
    zero_point(t)
}
