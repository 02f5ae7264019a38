//! Lowering: host IR → the artifact's GRAPH and WEIGHTS sections, with every int8 parameter
//! prepared the way TFLM's `Prepare` computes it, and the arena planned.

use crate::ir::{self, Graph, Padding, TensorId};
use crate::plan::{self, Buffer};
use kiln_runtime::format::ALIGN;
use kiln_runtime::graph::{
    self as rg, ActivationParams, BufRef, ClampI8, ConcatParams, ConvParams, DType,
    FullyConnectedParams, GraphHeader, Location, MeanParams, OpDef, OpKind, PadParams, PerChannel,
    PoolParams, Quant, QuantizeParams, Requant, ScratchRef, TensorDef, UnaryFn, NO_TENSOR,
};
use kiln_runtime::kernels::transpose::TransposeGeometry;
use kiln_runtime::kernels::{activation, lut, mean, quantize, softmax, unary};

/// Why a graph could not be lowered. Messages name the op and say what to do.
#[derive(Debug, thiserror::Error)]
pub enum LowerError {
    /// An op's operands are not what the runtime supports.
    #[error("op {index} ({name}): {reason}")]
    Op {
        /// Op index in the source graph.
        index: usize,
        /// Op name.
        name: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The graph as a whole is not supported.
    #[error("{0}")]
    Graph(String),
}

/// The lowered model and the figures the reports need.
#[derive(Clone, Debug)]
pub struct Lowered {
    /// GRAPH section bytes.
    pub graph: Vec<u8>,
    /// WEIGHTS section bytes.
    pub weights: Vec<u8>,
    /// Planned arena bytes.
    pub arena_bytes: usize,
    /// Most bytes alive at any one step (no plan can use less).
    pub liveness_lower_bound: usize,
    /// Artifact tensor index of each host-IR tensor (`None` for tensors no op uses).
    pub tensor_index: Vec<Option<u16>>,
}

/// Options of [`lower_with`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LowerOptions {
    /// Keep every activation alive to the end (no reuse), so that all intermediate tensors can
    /// be read after `invoke` — used by calibration and per-layer reports, never for devices.
    pub keep_all_alive: bool,
}

impl Lowered {
    /// The MANIFEST's `tensor_names`: one entry per artifact tensor, the source model's name of
    /// each constant (weights, biases, operands) and `null` for activations, so that `kiln
    /// export-weights` writes the model's own names and its output applies back by name with
    /// `--weights`. `g` is the graph this was lowered from.
    pub fn constant_names(&self, g: &Graph) -> serde_json::Value {
        let count = self.tensor_index.iter().flatten().count();
        let mut names = vec![serde_json::Value::Null; count];
        for (h, a) in self.tensor_index.iter().enumerate() {
            let (Some(a), Some(t)) = (a, g.tensors.get(h)) else {
                continue;
            };
            if t.data.is_some() && !t.name.is_empty() {
                if let Some(slot) = names.get_mut(usize::from(*a)) {
                    *slot = t.name.clone().into();
                }
            }
        }
        names.into()
    }
}

struct WeightsBuilder {
    bytes: Vec<u8>,
}

impl WeightsBuilder {
    fn push(&mut self, data: &[u8]) -> BufRef {
        while !self.bytes.len().is_multiple_of(ALIGN) {
            self.bytes.push(0);
        }
        let offset = self.bytes.len() as u32;
        self.bytes.extend_from_slice(data);
        BufRef {
            offset,
            len: data.len() as u32,
        }
    }

    fn push_requants(&mut self, r: &[Requant]) -> BufRef {
        self.push(bytemuck::cast_slice(r))
    }
}

/// Host-side preparation: folds constant DEQUANTIZE ops and dequantizes int8 weights of float
/// ops (hybrid models), so every op computes in one type.
pub fn normalize(g: &Graph) -> Result<Graph, LowerError> {
    let mut g = g.clone();
    // Constant DEQUANTIZE (f16 or int8 weights feeding float ops): fold into an f32 constant.
    let mut ops = Vec::with_capacity(g.ops.len());
    for op in std::mem::take(&mut g.ops) {
        if op.kind == ir::OpKind::Dequantize {
            if let (Some(Some(src)), Some(&dst)) = (op.inputs.first(), op.outputs.first()) {
                if g.tensors[*src].data.is_some() {
                    let values = dequantized(&g.tensors[*src])?;
                    let t = &mut g.tensors[dst];
                    t.data = Some(f32_bytes(&values));
                    t.dtype = DType::F32;
                    t.quant = None;
                    continue;
                }
            }
        }
        ops.push(op);
    }
    g.ops = ops;
    // Hybrid ops: float activations with int8 constant weights → f32 weights.
    for op in &g.ops {
        let Some(&out) = op.outputs.first() else {
            continue;
        };
        if g.tensors[out].dtype != DType::F32 {
            continue;
        }
        for inp in op.inputs.iter().flatten() {
            let t = &g.tensors[*inp];
            if t.data.is_some() && t.dtype == DType::I8 {
                let values = dequantized(t)?;
                let t = &mut g.tensors[*inp];
                t.data = Some(f32_bytes(&values));
                t.dtype = DType::F32;
                t.quant = None;
            }
        }
    }
    Ok(g)
}

/// Stores every f32 tensor of a (normalized) float graph as f16: constants are rounded to
/// nearest even, activations (graph inputs and outputs included) become f16; kernels still
/// accumulate in f32. int8 graphs are returned unchanged.
pub fn to_fp16(g: &Graph) -> Result<Graph, LowerError> {
    let mut g = normalize(g)?;
    for t in &mut g.tensors {
        if t.dtype != DType::F32 {
            continue;
        }
        if let Some(data) = &t.data {
            let values = dequantized(t)?;
            debug_assert_eq!(values.len() * 4, data.len());
            t.data = Some(
                values
                    .iter()
                    .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                    .collect(),
            );
        }
        t.dtype = DType::F16;
    }
    Ok(g)
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Real values of a constant tensor (int8 dequantized per tensor or per channel, f16 widened).
pub fn dequantized(t: &ir::Tensor) -> Result<Vec<f32>, LowerError> {
    let data = t
        .data
        .as_deref()
        .ok_or_else(|| LowerError::Graph(format!("tensor `{}` is not a constant", t.name)))?;
    Ok(match t.dtype {
        DType::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::F16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::I32 => data
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32)
            .collect(),
        DType::I8 => {
            let q = t.quant.as_ref().ok_or_else(|| {
                LowerError::Graph(format!("int8 tensor `{}` has no quantization", t.name))
            })?;
            let inner: usize = t.shape.iter().skip(q.axis + 1).product();
            let channels = t.shape.get(q.axis).copied().unwrap_or(1);
            data.iter()
                .enumerate()
                .map(|(i, &v)| {
                    let c = if q.scales.len() > 1 {
                        (i / inner.max(1)) % channels.max(1)
                    } else {
                        0
                    };
                    let zp = q
                        .zero_points
                        .get(c)
                        .or(q.zero_points.first())
                        .copied()
                        .unwrap_or(0);
                    q.scales[c.min(q.scales.len() - 1)] * ((v as i8) as i64 - zp) as f32
                })
                .collect()
        }
    })
}

/// TFLM `ComputePaddingWithOffset`: padding before (top/left) for SAME; 0 for VALID.
pub fn same_padding(
    padding: Padding,
    stride: usize,
    dilation: usize,
    input: usize,
    filter: usize,
    output: usize,
) -> usize {
    match padding {
        Padding::Valid => 0,
        Padding::Same => {
            let effective = (filter - 1) * dilation + 1;
            let total =
                ((output as i64 - 1) * stride as i64 + effective as i64 - input as i64).max(0);
            (total / 2) as usize
        }
    }
}

/// Lowers a (normalized) graph into GRAPH and WEIGHTS bytes with a planned arena.
///
/// # Errors
/// An op or tensor the runtime cannot run, named with its index.
pub fn lower(g: &Graph) -> Result<Lowered, LowerError> {
    lower_with(g, &LowerOptions::default())
}

/// [`lower`] with options.
///
/// # Errors
/// As [`lower`].
pub fn lower_with(g: &Graph, options: &LowerOptions) -> Result<Lowered, LowerError> {
    let g = normalize(g)?;
    // Tensors in use, in a stable order: graph inputs, then op order.
    let mut used: Vec<TensorId> = Vec::new();
    let mut map = vec![None::<u16>; g.tensors.len()];
    let mut add = |t: TensorId, used: &mut Vec<TensorId>| -> Result<(), LowerError> {
        if t >= map.len() {
            return Err(LowerError::Graph(format!("tensor id {t} out of range")));
        }
        if map[t].is_none() {
            map[t] = Some(
                u16::try_from(used.len())
                    .map_err(|_| LowerError::Graph("more than 65535 tensors".into()))?,
            );
            used.push(t);
        }
        Ok(())
    };
    for &t in &g.inputs {
        add(t, &mut used)?;
    }
    for op in &g.ops {
        for t in op.inputs.iter().flatten() {
            add(*t, &mut used)?;
        }
        for &t in &op.outputs {
            add(t, &mut used)?;
        }
    }
    for &t in &g.outputs {
        add(t, &mut used)?;
    }
    let idx = |t: TensorId| map[t].unwrap_or(NO_TENSOR);

    let mut weights = WeightsBuilder { bytes: Vec::new() };
    // Tensor definitions (arena offsets filled in after planning).
    let mut defs: Vec<TensorDef> = Vec::with_capacity(used.len());
    for &t in &used {
        let src = &g.tensors[t];
        let shape: rg::Shape = src
            .shape
            .iter()
            .map(|&d| u32::try_from(d).unwrap_or(u32::MAX))
            .collect::<heapless::Vec<u32, { rg::MAX_RANK }>>();
        if shape.len() != src.shape.len() {
            return Err(LowerError::Graph(format!(
                "tensor `{}` has rank {} (at most {})",
                src.name,
                src.shape.len(),
                rg::MAX_RANK
            )));
        }
        let quant = match (&src.quant, src.dtype) {
            (Some(q), DType::I8) if !q.scales.is_empty() => {
                let per_channel = if q.scales.len() > 1 {
                    if q.zero_points.iter().any(|&z| z != 0) {
                        return Err(LowerError::Graph(format!(
                            "tensor `{}`: per-channel quantization must be symmetric",
                            src.name
                        )));
                    }
                    Some(PerChannel {
                        axis: q.axis as u8,
                        scales: weights.push(&f32_bytes(&q.scales)),
                    })
                } else {
                    None
                };
                Some(Quant {
                    scale: q.scales[0],
                    zero_point: q.zero_points.first().copied().unwrap_or(0) as i32,
                    per_channel,
                })
            }
            (None, DType::I8) => {
                return Err(LowerError::Graph(format!(
                    "int8 tensor `{}` has no quantization",
                    src.name
                )))
            }
            _ => None,
        };
        let location = match &src.data {
            Some(d) => Location::Weights(weights.push(d)),
            None => Location::Arena {
                offset: 0,
                first: 0,
                last: 0,
            },
        };
        defs.push(TensorDef {
            dtype: src.dtype,
            shape,
            location,
            quant,
        });
    }

    // Ops.
    let mut ops: Vec<OpDef> = Vec::with_capacity(g.ops.len());
    for (index, op) in g.ops.iter().enumerate() {
        let kind = lower_op(&g, index, op, &mut weights)?;
        let mut inputs = heapless::Vec::new();
        for t in op.inputs.iter().take(lowered_input_count(&kind, op)) {
            inputs
                .push(t.map_or(NO_TENSOR, idx))
                .map_err(|_| LowerError::Op {
                    index,
                    name: kind.name(),
                    reason: "too many inputs".into(),
                })?;
        }
        let &[out] = op.outputs.as_slice() else {
            return Err(LowerError::Op {
                index,
                name: kind.name(),
                reason: "ops must have exactly one output".into(),
            });
        };
        ops.push(OpDef {
            kind,
            inputs,
            output: idx(out),
            scratch: ScratchRef::default(),
        });
    }

    // Lifetimes (steps: 0 = before op 1, i = op i, n+1 = after the last op).
    let n = ops.len() as u16;
    let mut first = vec![u16::MAX; defs.len()];
    let mut last = vec![0u16; defs.len()];
    for &t in &g.inputs {
        first[idx(t) as usize] = 0;
    }
    for (i, op) in ops.iter().enumerate() {
        let step = i as u16 + 1;
        for &inp in op.inputs.iter().filter(|&&t| t != NO_TENSOR) {
            last[inp as usize] = last[inp as usize].max(step);
        }
        first[op.output as usize] = step;
        last[op.output as usize] = last[op.output as usize].max(step);
    }
    for &t in &g.outputs {
        last[idx(t) as usize] = n + 1;
    }
    if options.keep_all_alive {
        last.iter_mut().for_each(|l| *l = n + 1);
    }
    // In-place RESHAPE: the output joins its input's buffer when the input dies there.
    let mut group: Vec<usize> = (0..defs.len()).collect();
    for (i, op) in ops.iter().enumerate() {
        if let OpKind::Reshape = op.kind {
            let (inp, out) = (op.inputs[0] as usize, op.output as usize);
            if matches!(defs[inp].location, Location::Arena { .. }) && last[inp] == i as u16 + 1 {
                group[out] = group[inp];
            }
        }
    }
    let mut buffers: Vec<Buffer> = Vec::new();
    let mut buffer_of = vec![usize::MAX; defs.len()];
    for t in 0..defs.len() {
        if !matches!(defs[t].location, Location::Arena { .. }) {
            continue;
        }
        if first[t] == u16::MAX {
            return Err(LowerError::Graph(format!(
                "tensor `{}` is read but never written",
                g.tensors[used[t]].name
            )));
        }
        let root = group[t];
        let size = kiln_runtime::model::tensor_bytes(&defs[t]);
        if root != t {
            let b = &mut buffers[buffer_of[root]];
            b.last = b.last.max(last[t]);
            buffer_of[t] = buffer_of[root];
        } else {
            buffer_of[t] = buffers.len();
            buffers.push(Buffer {
                size,
                first: first[t],
                last: last[t],
            });
        }
    }
    let p = plan::plan(&buffers, ALIGN);
    for t in 0..defs.len() {
        if let Location::Arena { .. } = defs[t].location {
            defs[t].location = Location::Arena {
                offset: p.offsets[buffer_of[t]] as u32,
                first: first[t],
                last: last[t],
            };
        }
    }

    // Serialize.
    let mut slots = Vec::with_capacity(defs.len());
    for d in &defs {
        slots.push(
            postcard::to_allocvec(d)
                .map_err(|e| LowerError::Graph(format!("encoding a tensor: {e}")))?,
        );
    }
    let slot = slots
        .iter()
        .map(Vec::len)
        .max()
        .unwrap_or(4)
        .max(4)
        .next_multiple_of(4);
    let header = GraphHeader {
        tensor_count: defs.len() as u16,
        tensor_slot: slot as u16,
        op_count: n,
        inputs: g
            .inputs
            .iter()
            .map(|&t| idx(t))
            .collect::<heapless::Vec<u16, { rg::MAX_GRAPH_IO }>>(),
        outputs: g
            .outputs
            .iter()
            .map(|&t| idx(t))
            .collect::<heapless::Vec<u16, { rg::MAX_GRAPH_IO }>>(),
    };
    if header.inputs.len() != g.inputs.len() || header.outputs.len() != g.outputs.len() {
        return Err(LowerError::Graph(format!(
            "at most {} graph inputs and outputs are supported",
            rg::MAX_GRAPH_IO
        )));
    }
    let mut graph = postcard::to_allocvec(&header)
        .map_err(|e| LowerError::Graph(format!("encoding the graph: {e}")))?;
    for s in slots {
        let start = graph.len();
        graph.extend_from_slice(&s);
        graph.resize(start + slot, 0);
    }
    for op in &ops {
        graph.extend_from_slice(
            &postcard::to_allocvec(op)
                .map_err(|e| LowerError::Graph(format!("encoding an op: {e}")))?,
        );
    }
    Ok(Lowered {
        graph,
        weights: weights.bytes,
        arena_bytes: p.arena_bytes,
        liveness_lower_bound: plan::liveness_lower_bound(&buffers),
        tensor_index: map,
    })
}

fn u16_of(v: usize, index: usize, name: &'static str, what: &str) -> Result<u16, LowerError> {
    u16::try_from(v).map_err(|_| LowerError::Op {
        index,
        name,
        reason: format!("{what} {v} is too large"),
    })
}

struct OpCtx<'g> {
    g: &'g Graph,
    index: usize,
    op: &'g ir::Op,
    name: &'static str,
}

impl<'g> OpCtx<'g> {
    fn err(&self, reason: impl Into<String>) -> LowerError {
        LowerError::Op {
            index: self.index,
            name: self.name,
            reason: reason.into(),
        }
    }

    fn input(&self, i: usize) -> Result<&'g ir::Tensor, LowerError> {
        match self.op.inputs.get(i) {
            Some(Some(t)) => self
                .g
                .tensors
                .get(*t)
                .ok_or_else(|| self.err("input id out of range")),
            _ => Err(self.err(format!("input {i} is missing"))),
        }
    }

    fn output(&self) -> Result<&'g ir::Tensor, LowerError> {
        let t = *self
            .op
            .outputs
            .first()
            .ok_or_else(|| self.err("no output"))?;
        self.g
            .tensors
            .get(t)
            .ok_or_else(|| self.err("output id out of range"))
    }

    /// (scale, zero point) of an int8 tensor.
    fn q(&self, t: &ir::Tensor) -> Result<(f32, i32), LowerError> {
        let q = t
            .quant
            .as_ref()
            .ok_or_else(|| self.err(format!("int8 tensor `{}` has no quantization", t.name)))?;
        Ok((
            q.scales[0],
            q.zero_points.first().copied().unwrap_or(0) as i32,
        ))
    }

    fn is_int8(&self) -> Result<bool, LowerError> {
        Ok(self.output()?.dtype == DType::I8)
    }

    fn clamp(&self, act: rg::Activation) -> Result<ClampI8, LowerError> {
        if !self.is_int8()? {
            return Ok(ClampI8::default());
        }
        let (s, z) = self.q(self.output()?)?;
        Ok(quantize::activation_clamp(act, s, z))
    }
}

fn lower_op(
    g: &Graph,
    index: usize,
    op: &ir::Op,
    w: &mut WeightsBuilder,
) -> Result<OpKind, LowerError> {
    let name = ir_name(&op.kind);
    let c = OpCtx { g, index, op, name };
    let int8 = c.is_int8()?;
    Ok(match &op.kind {
        ir::OpKind::Conv2d {
            stride,
            dilation,
            padding,
            activation: act,
        }
        | ir::OpKind::DepthwiseConv2d {
            stride,
            dilation,
            padding,
            activation: act,
            ..
        } => {
            let depthwise = matches!(op.kind, ir::OpKind::DepthwiseConv2d { .. });
            let (input, filter, out) = (c.input(0)?, c.input(1)?, c.output()?);
            if input.shape.len() != 4 || filter.shape.len() != 4 || out.shape.len() != 4 {
                return Err(c.err("input, filter and output must be 4-D"));
            }
            let pad_top = same_padding(
                *padding,
                stride[0],
                dilation[0],
                input.shape[1],
                filter.shape[1],
                out.shape[1],
            );
            let pad_left = same_padding(
                *padding,
                stride[1],
                dilation[1],
                input.shape[2],
                filter.shape[2],
                out.shape[2],
            );
            let out_c = out.shape[3];
            let depth_multiplier = if depthwise {
                match op.kind {
                    ir::OpKind::DepthwiseConv2d {
                        depth_multiplier, ..
                    } if depth_multiplier > 0 => depth_multiplier,
                    _ => out_c / input.shape[3].max(1),
                }
            } else {
                1
            };
            let requant = if int8 {
                w.push_requants(&conv_requants(&c, input, filter, out, out_c)?)
            } else {
                BufRef::default()
            };
            let p = ConvParams {
                stride_h: u16_of(stride[0], index, name, "stride")?,
                stride_w: u16_of(stride[1], index, name, "stride")?,
                dilation_h: u16_of(dilation[0], index, name, "dilation")?,
                dilation_w: u16_of(dilation[1], index, name, "dilation")?,
                pad_top: u16_of(pad_top, index, name, "padding")?,
                pad_left: u16_of(pad_left, index, name, "padding")?,
                depth_multiplier: u16_of(depth_multiplier, index, name, "depth multiplier")?,
                activation: *act,
                requant,
                clamp: c.clamp(*act)?,
            };
            if depthwise {
                OpKind::DepthwiseConv2d(p)
            } else {
                OpKind::Conv2d(p)
            }
        }
        ir::OpKind::FullyConnected { activation: act } => {
            let (input, weights, out) = (c.input(0)?, c.input(1)?, c.output()?);
            let out_f = weights.shape.first().copied().unwrap_or(0);
            let requant = if int8 {
                w.push_requants(&conv_requants(&c, input, weights, out, out_f)?)
            } else {
                BufRef::default()
            };
            OpKind::FullyConnected(FullyConnectedParams {
                activation: *act,
                requant,
                clamp: c.clamp(*act)?,
            })
        }
        ir::OpKind::Add { activation: act } | ir::OpKind::Mul { activation: act } => {
            let is_add = matches!(op.kind, ir::OpKind::Add { .. });
            let mut p = rg::BinaryParams {
                activation: *act,
                ..Default::default()
            };
            if int8 {
                let (s0, _) = c.q(c.input(0)?)?;
                let (s1, _) = c.q(c.input(1)?)?;
                let (so, _) = c.q(c.output()?)?;
                let clamp = c.clamp(*act)?;
                p = if is_add {
                    quantize::add_params(s0, s1, so, clamp)
                } else {
                    quantize::mul_params(s0, s1, so, clamp)
                };
                p.activation = *act;
            }
            if is_add {
                OpKind::Add(p)
            } else {
                OpKind::Mul(p)
            }
        }
        ir::OpKind::AveragePool2d {
            filter,
            stride,
            padding,
            activation: act,
        }
        | ir::OpKind::MaxPool2d {
            filter,
            stride,
            padding,
            activation: act,
        } => {
            let (input, out) = (c.input(0)?, c.output()?);
            if input.shape.len() != 4 || out.shape.len() != 4 {
                return Err(c.err("input and output must be 4-D"));
            }
            let p = PoolParams {
                filter_h: u16_of(filter[0], index, name, "filter")?,
                filter_w: u16_of(filter[1], index, name, "filter")?,
                stride_h: u16_of(stride[0], index, name, "stride")?,
                stride_w: u16_of(stride[1], index, name, "stride")?,
                pad_top: u16_of(
                    same_padding(
                        *padding,
                        stride[0],
                        1,
                        input.shape[1],
                        filter[0],
                        out.shape[1],
                    ),
                    index,
                    name,
                    "padding",
                )?,
                pad_left: u16_of(
                    same_padding(
                        *padding,
                        stride[1],
                        1,
                        input.shape[2],
                        filter[1],
                        out.shape[2],
                    ),
                    index,
                    name,
                    "padding",
                )?,
                activation: *act,
                clamp: c.clamp(*act)?,
            };
            if matches!(op.kind, ir::OpKind::AveragePool2d { .. }) {
                OpKind::AveragePool2d(p)
            } else {
                OpKind::MaxPool2d(p)
            }
        }
        ir::OpKind::Reshape => OpKind::Reshape,
        ir::OpKind::Softmax { beta } => {
            let mut p = rg::SoftmaxParams {
                beta: *beta,
                ..Default::default()
            };
            if int8 {
                let (s, _) = c.q(c.input(0)?)?;
                p = softmax::softmax_params(*beta, s);
            }
            OpKind::Softmax(p)
        }
        ir::OpKind::Relu | ir::OpKind::Relu6 => {
            let relu6 = matches!(op.kind, ir::OpKind::Relu6);
            let mut p = ActivationParams::default();
            if int8 {
                let (si, _) = c.q(c.input(0)?)?;
                let (so, _) = c.q(c.output()?)?;
                p.requant = quantize::quantize_multiplier(si as f64 / so as f64);
                p.clamp = c.clamp(if relu6 {
                    rg::Activation::Relu6
                } else {
                    rg::Activation::Relu
                })?;
            }
            if relu6 {
                OpKind::Relu6(p)
            } else {
                OpKind::Relu(p)
            }
        }
        ir::OpKind::Logistic | ir::OpKind::Tanh => {
            let p = if int8 {
                activation::sigmoid_params(c.q(c.input(0)?)?.0)
            } else {
                rg::SigmoidParams::default()
            };
            if matches!(op.kind, ir::OpKind::Logistic) {
                OpKind::Logistic(p)
            } else {
                OpKind::Tanh(p)
            }
        }
        ir::OpKind::Concatenation {
            axis,
            activation: act,
        } => {
            let rank = c.output()?.shape.len() as i64;
            let a = if *axis < 0 { axis + rank } else { *axis };
            if !(0..rank).contains(&a) {
                return Err(c.err(format!("axis {axis} is outside rank {rank}")));
            }
            OpKind::Concatenation(ConcatParams {
                axis: a as u8,
                clamp: c.clamp(*act)?,
                activation: *act,
            })
        }
        ir::OpKind::Pad { paddings } => {
            if paddings.len() > 4 {
                return Err(c.err("PAD supports up to 4-D tensors"));
            }
            let lead = 4 - paddings.len();
            let mut p = PadParams::default();
            for (d, [b, a]) in paddings.iter().enumerate() {
                p.before[lead + d] = u32::try_from(*b).map_err(|_| c.err("padding too large"))?;
                p.after[lead + d] = u32::try_from(*a).map_err(|_| c.err("padding too large"))?;
            }
            OpKind::Pad(p)
        }
        ir::OpKind::Mean { axes, .. } => {
            let mut mask = 0u8;
            for &a in axes {
                if a >= 8 {
                    return Err(c.err(format!("axis {a} is too large")));
                }
                mask |= 1 << a;
            }
            let p = if int8 {
                let (si, _) = c.q(c.input(0)?)?;
                let (so, _) = c.q(c.output()?)?;
                mean::mean_params(si, so, mask)
            } else {
                MeanParams {
                    axes: mask,
                    requant: Requant::default(),
                }
            };
            OpKind::Mean(p)
        }
        ir::OpKind::Quantize => {
            let input = c.input(0)?;
            let mut p = QuantizeParams::default();
            if input.dtype == DType::I8 {
                let (si, _) = c.q(input)?;
                let (so, _) = c.q(c.output()?)?;
                p.requant = quantize::quantize_multiplier(si as f64 / so as f64);
            }
            OpKind::Quantize(p)
        }
        ir::OpKind::Dequantize => OpKind::Dequantize,
        ir::OpKind::Sub { activation: act } => {
            let mut p = rg::BinaryParams {
                activation: *act,
                ..Default::default()
            };
            if int8 {
                // TFLM prepares int8 SUB exactly as ADD.
                let (s0, _) = c.q(c.input(0)?)?;
                let (s1, _) = c.q(c.input(1)?)?;
                let (so, _) = c.q(c.output()?)?;
                p = quantize::add_params(s0, s1, so, c.clamp(*act)?);
                p.activation = *act;
            }
            OpKind::Sub(p)
        }
        ir::OpKind::Div { activation: act } => {
            if int8 {
                return Err(c.err("int8 DIV is not supported; keep this op in float"));
            }
            OpKind::Div(rg::BinaryParams {
                activation: *act,
                ..Default::default()
            })
        }
        ir::OpKind::Transpose { perm } => OpKind::Transpose(transpose_params(&c, perm)?),
        ir::OpKind::LeakyRelu { alpha } => unary_op(&c, w, UnaryFn::LeakyRelu { alpha: *alpha })?,
        ir::OpKind::HardSigmoid { alpha, beta } => unary_op(
            &c,
            w,
            UnaryFn::HardSigmoid {
                alpha: *alpha,
                beta: *beta,
            },
        )?,
        ir::OpKind::HardSwish => unary_op(&c, w, UnaryFn::HardSwish)?,
        ir::OpKind::Clamp { min, max } => unary_op(
            &c,
            w,
            UnaryFn::Clamp {
                min: *min,
                max: *max,
            },
        )?,
        ir::OpKind::PRelu => prelu_op(&c, w)?,
    })
}

/// How many of the IR op's inputs the lowered op reads: a LUT reads only its input (the constant
/// slope of an int8 PRELU is folded into the table).
fn lowered_input_count(kind: &OpKind, op: &ir::Op) -> usize {
    match kind {
        OpKind::Lut(_) => 1,
        _ => op.inputs.len(),
    }
}

/// TRANSPOSE: the permutation, checked against the input and output shapes.
fn transpose_params(c: &OpCtx<'_>, perm: &[usize]) -> Result<rg::TransposeParams, LowerError> {
    let (input, out) = (c.input(0)?, c.output()?);
    if input.shape.len() > rg::MAX_RANK {
        return Err(c.err(format!(
            "rank {} is above the runtime's {}",
            input.shape.len(),
            rg::MAX_RANK
        )));
    }
    let g = TransposeGeometry::new(&input.shape, perm).ok_or_else(|| {
        c.err(format!(
            "perm {perm:?} is not a permutation of the {} input axes",
            input.shape.len()
        ))
    })?;
    if out.shape[..] != g.out_shape()[..input.shape.len()] {
        return Err(c.err(format!(
            "output shape {:?} is not the input shape {:?} permuted by {perm:?}",
            out.shape, input.shape
        )));
    }
    if input.dtype == DType::I8 && c.q(input)? != c.q(out)? {
        return Err(c.err("int8 TRANSPOSE needs the same quantization on input and output"));
    }
    let mut p = rg::TransposeParams::default();
    for (d, &v) in p.perm.iter_mut().zip(perm) {
        *d = v as u8;
    }
    Ok(p)
}

/// A float element-wise function: `UnaryFloat` for float tensors, a LUT of it for int8.
fn unary_op(c: &OpCtx<'_>, w: &mut WeightsBuilder, f: UnaryFn) -> Result<OpKind, LowerError> {
    let finite = match f {
        UnaryFn::LeakyRelu { alpha } => alpha.is_finite(),
        UnaryFn::HardSigmoid { alpha, beta } => alpha.is_finite() && beta.is_finite(),
        UnaryFn::HardSwish => true,
        UnaryFn::Clamp { min, max } => min.is_finite() && max.is_finite(),
    };
    if !finite {
        return Err(c.err(format!("parameters must be finite: {f:?}")));
    }
    if let UnaryFn::Clamp { min, max } = f {
        if min > max {
            return Err(c.err(format!("min {min} is above max {max}")));
        }
    }
    if !c.is_int8()? {
        return Ok(OpKind::UnaryFloat(f));
    }
    Ok(OpKind::Lut(lut_for(c, w, |x| unary::unary_f64(f, x))?))
}

/// PRELU: as is for float tensors; for int8 a LUT when the slope is one constant value (a scalar,
/// or a tensor whose elements are all equal).
fn prelu_op(c: &OpCtx<'_>, w: &mut WeightsBuilder) -> Result<OpKind, LowerError> {
    if !c.is_int8()? {
        return Ok(OpKind::PRelu);
    }
    let slope = c.input(1)?;
    let Some(data) = &slope.data else {
        return Err(c.err("int8 PRELU needs a constant slope"));
    };
    // Real slope values, in f64 for per-tensor int8 (the usual case), else as dequantized.
    let values: Vec<f64> = match &slope.quant {
        Some(q) if slope.dtype == DType::I8 && q.scales.len() == 1 => {
            let zp = q.zero_points.first().copied().unwrap_or(0);
            data.iter()
                .map(|&v| q.scales[0] as f64 * ((v as i8) as i64 - zp) as f64)
                .collect()
        }
        _ => dequantized(slope)?.into_iter().map(f64::from).collect(),
    };
    let Some(&a) = values.first() else {
        return Err(c.err("PRELU slope is empty"));
    };
    if values.iter().any(|&v| v != a) {
        return Err(c.err("int8 PRELU with per-channel slopes is not supported yet"));
    }
    let prelu = move |x: f64| if x < 0.0 { a * x } else { x };
    Ok(OpKind::Lut(lut_for(c, w, prelu)?))
}

/// The 256-byte int8 table of the real function `f` for this op's input and output
/// quantization, pushed to WEIGHTS.
fn lut_for(
    c: &OpCtx<'_>,
    w: &mut WeightsBuilder,
    f: impl Fn(f64) -> f64,
) -> Result<BufRef, LowerError> {
    let (input, out) = (c.input(0)?, c.output()?);
    if input.dtype != DType::I8 {
        return Err(c.err("an int8 output needs an int8 input"));
    }
    let (si, zi) = c.q(input)?;
    let (so, zo) = c.q(out)?;
    let table = lut::lut_table(si, zi, so, zo, f);
    Ok(w.push(bytemuck::cast_slice(&table)))
}

/// Per-output-channel requantization of a conv-like int8 op, as TFLM computes it:
/// `input_scale * filter_scale[c] / output_scale` in double, then `QuantizeMultiplier`.
fn conv_requants(
    c: &OpCtx<'_>,
    input: &ir::Tensor,
    filter: &ir::Tensor,
    out: &ir::Tensor,
    channels: usize,
) -> Result<Vec<Requant>, LowerError> {
    let (si, _) = c.q(input)?;
    let (so, _) = c.q(out)?;
    let fq = filter
        .quant
        .as_ref()
        .ok_or_else(|| c.err("int8 weights have no quantization"))?;
    if fq.scales.len() != 1 && fq.scales.len() != channels {
        return Err(c.err(format!(
            "weights have {} scales for {} output channels",
            fq.scales.len(),
            channels
        )));
    }
    Ok(fq
        .scales
        .iter()
        .map(|&sf| quantize::quantize_multiplier(si as f64 * sf as f64 / so as f64))
        .collect())
}

/// The TFLite-style name of a host op.
pub fn ir_name(k: &ir::OpKind) -> &'static str {
    match k {
        ir::OpKind::Conv2d { .. } => "CONV_2D",
        ir::OpKind::DepthwiseConv2d { .. } => "DEPTHWISE_CONV_2D",
        ir::OpKind::FullyConnected { .. } => "FULLY_CONNECTED",
        ir::OpKind::Add { .. } => "ADD",
        ir::OpKind::Mul { .. } => "MUL",
        ir::OpKind::AveragePool2d { .. } => "AVERAGE_POOL_2D",
        ir::OpKind::MaxPool2d { .. } => "MAX_POOL_2D",
        ir::OpKind::Reshape => "RESHAPE",
        ir::OpKind::Softmax { .. } => "SOFTMAX",
        ir::OpKind::Relu => "RELU",
        ir::OpKind::Relu6 => "RELU6",
        ir::OpKind::Concatenation { .. } => "CONCATENATION",
        ir::OpKind::Pad { .. } => "PAD",
        ir::OpKind::Mean { .. } => "MEAN",
        ir::OpKind::Logistic => "LOGISTIC",
        ir::OpKind::Tanh => "TANH",
        ir::OpKind::Quantize => "QUANTIZE",
        ir::OpKind::Dequantize => "DEQUANTIZE",
        ir::OpKind::Sub { .. } => "SUB",
        ir::OpKind::Div { .. } => "DIV",
        ir::OpKind::Transpose { .. } => "TRANSPOSE",
        ir::OpKind::LeakyRelu { .. } => "LEAKY_RELU",
        ir::OpKind::PRelu => "PRELU",
        ir::OpKind::HardSigmoid { .. } => "HARD_SIGMOID",
        ir::OpKind::HardSwish => "HARD_SWISH",
        ir::OpKind::Clamp { .. } => "CLAMP",
    }
}
