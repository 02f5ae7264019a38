//! A validated model: the container, the graph header, the tensor table and the op list, all
//! borrowed from the artifact bytes. [`Model::load`] checks everything once; afterwards the
//! interpreter may trust every index, range and parameter.

use crate::error::ModelError;
use crate::format::{Container, SectionKind, ALIGN};
use crate::graph::{
    DType, GraphHeader, Location, OpDef, TensorDef, MAX_OPS, MAX_TENSORS, NO_TENSOR,
};
use crate::prepare::prepare_op;

/// Largest tensor slot the reader accepts.
const MAX_TENSOR_SLOT: usize = 256;
/// Largest tensor (bytes) the reader accepts; keeps all offset math far from overflow.
pub const MAX_TENSOR_BYTES: u64 = 1 << 30;

/// A validated, zero-copy view of an artifact.
#[derive(Clone, Copy, Debug)]
pub struct Model<'a> {
    container: Container<'a>,
    tensor_count: u16,
    tensor_slot: usize,
    op_count: u16,
    tensors: &'a [u8],
    ops: &'a [u8],
    weights: &'a [u8],
    inputs: [u16; crate::graph::MAX_GRAPH_IO],
    input_count: u8,
    outputs: [u16; crate::graph::MAX_GRAPH_IO],
    output_count: u8,
}

impl<'a> Model<'a> {
    /// Parses and validates an artifact: container and digest, every tensor, every op (shapes,
    /// types, quantization, prepared parameters), lifetimes and the arena plan.
    ///
    /// # Errors
    /// The first rule that fails, as a [`ModelError`].
    pub fn load(bytes: &'a [u8]) -> Result<Self, ModelError> {
        if !(bytes.as_ptr() as usize).is_multiple_of(ALIGN) {
            return Err(ModelError::Misaligned { what: "artifact" });
        }
        Self::from_container(Container::parse(bytes)?)
    }

    /// Validates the graph of an already-parsed container.
    ///
    /// # Errors
    /// The first rule that fails.
    pub fn from_container(container: Container<'a>) -> Result<Self, ModelError> {
        let graph = container
            .section(SectionKind::Graph)
            .ok_or(ModelError::BadSection {
                reason: "GRAPH section is missing",
            })?;
        let weights = container
            .section(SectionKind::Weights)
            .ok_or(ModelError::BadSection {
                reason: "WEIGHTS section is missing",
            })?;
        let (gh, rest): (GraphHeader, &[u8]) =
            postcard::take_from_bytes(graph).map_err(|_| ModelError::Decode {
                what: "graph header",
            })?;
        let tensor_count = gh.tensor_count;
        if tensor_count as usize > MAX_TENSORS {
            return Err(ModelError::BadField {
                field: "tensor_count",
            });
        }
        if gh.op_count as usize > MAX_OPS {
            return Err(ModelError::BadField { field: "op_count" });
        }
        let slot = gh.tensor_slot as usize;
        if !(4..=MAX_TENSOR_SLOT).contains(&slot) {
            return Err(ModelError::BadField {
                field: "tensor_slot",
            });
        }
        let table_len = slot * tensor_count as usize;
        let (tensors, ops) = rest
            .split_at_checked(table_len)
            .ok_or(ModelError::Truncated {
                what: "tensor table",
            })?;
        if gh.inputs.is_empty() || gh.outputs.is_empty() {
            return Err(ModelError::BadField {
                field: "graph inputs/outputs",
            });
        }
        let mut inputs = [0u16; crate::graph::MAX_GRAPH_IO];
        inputs[..gh.inputs.len()].copy_from_slice(&gh.inputs);
        let mut outputs = [0u16; crate::graph::MAX_GRAPH_IO];
        outputs[..gh.outputs.len()].copy_from_slice(&gh.outputs);
        let model = Model {
            container,
            tensor_count,
            tensor_slot: slot,
            op_count: gh.op_count,
            tensors,
            ops,
            weights,
            inputs,
            input_count: gh.inputs.len() as u8,
            outputs,
            output_count: gh.outputs.len() as u8,
        };
        model.validate()?;
        Ok(model)
    }

    /// The container (header fields, sections, digest, signatures).
    pub fn container(&self) -> &Container<'a> {
        &self.container
    }

    /// Exact arena size in bytes.
    pub fn arena_bytes(&self) -> usize {
        self.container.header.arena_bytes as usize
    }

    /// The WEIGHTS section.
    pub fn weights(&self) -> &'a [u8] {
        self.weights
    }

    /// Number of tensors.
    pub fn tensor_count(&self) -> u16 {
        self.tensor_count
    }

    /// Number of ops.
    pub fn op_count(&self) -> u16 {
        self.op_count
    }

    /// Graph input tensor indices.
    pub fn inputs(&self) -> &[u16] {
        &self.inputs[..self.input_count as usize]
    }

    /// Graph output tensor indices.
    pub fn outputs(&self) -> &[u16] {
        &self.outputs[..self.output_count as usize]
    }

    /// Decodes tensor `index`.
    ///
    /// # Errors
    /// Out of range or undecodable (never for a tensor of a loaded model).
    pub fn tensor(&self, index: u16) -> Result<TensorDef, ModelError> {
        if index >= self.tensor_count {
            return Err(ModelError::BadTensor {
                index,
                reason: "index out of range",
            });
        }
        let at = index as usize * self.tensor_slot;
        let slot = self
            .tensors
            .get(at..at + self.tensor_slot)
            .ok_or(ModelError::Truncated {
                what: "tensor table",
            })?;
        let (t, _) =
            postcard::take_from_bytes::<TensorDef>(slot).map_err(|_| ModelError::BadTensor {
                index,
                reason: "slot does not decode",
            })?;
        Ok(t)
    }

    /// The ops in execution order.
    pub fn ops(&self) -> OpIter<'a> {
        OpIter {
            rest: self.ops,
            remaining: self.op_count,
            index: 0,
        }
    }

    /// Bytes of a constant tensor, in place in WEIGHTS.
    ///
    /// # Errors
    /// The tensor is not a constant.
    pub fn constant(&self, t: &TensorDef) -> Result<&'a [u8], ModelError> {
        match t.location {
            Location::Weights(r) => {
                let start = r.offset as usize;
                self.weights
                    .get(start..start + r.len as usize)
                    .ok_or(ModelError::Truncated { what: "weights" })
            }
            Location::Arena { .. } => Err(ModelError::BadTensor {
                index: NO_TENSOR,
                reason: "expected a constant",
            }),
        }
    }

    /// A range of WEIGHTS (prepared parameters such as per-channel multipliers).
    ///
    /// # Errors
    /// The range is outside WEIGHTS.
    pub fn weights_range(&self, r: crate::graph::BufRef) -> Result<&'a [u8], ModelError> {
        let start = r.offset as usize;
        let end = start
            .checked_add(r.len as usize)
            .ok_or(ModelError::Truncated { what: "weights" })?;
        self.weights
            .get(start..end)
            .ok_or(ModelError::Truncated { what: "weights" })
    }

    fn validate(&self) -> Result<(), ModelError> {
        let arena = self.arena_bytes() as u64;
        let last_op = self.op_count + 1;
        // 1. Every tensor on its own.
        for i in 0..self.tensor_count {
            let t = self.tensor(i)?;
            validate_tensor(i, &t, self.weights, arena, last_op)?;
        }
        // 2. Graph inputs and outputs.
        for &i in self.inputs() {
            match self.tensor(i)?.location {
                Location::Arena { first: 0, .. } => {}
                _ => {
                    return Err(ModelError::BadTensor {
                        index: i,
                        reason: "graph input must be an arena tensor written before op 1",
                    })
                }
            }
        }
        for &i in self.outputs() {
            match self.tensor(i)?.location {
                Location::Arena { last, .. } if last == last_op => {}
                _ => {
                    return Err(ModelError::BadTensor {
                        index: i,
                        reason: "graph output must stay alive after the last op",
                    })
                }
            }
        }
        // 3. Every op: decodes, inputs are alive, output is born here, parameters are valid.
        let mut count = 0u16;
        let mut iter = self.ops();
        for item in iter.by_ref() {
            let (index, op) = item?;
            let step = index + 1;
            for &inp in op.inputs.iter() {
                if inp == NO_TENSOR {
                    continue;
                }
                let t = self.tensor(inp).map_err(|_| ModelError::BadOp {
                    index,
                    reason: "input tensor index out of range",
                })?;
                if let Location::Arena { first, last, .. } = t.location {
                    if !(first < step && step <= last) {
                        return Err(ModelError::BadOp {
                            index,
                            reason: "reads a tensor outside its lifetime (cycle or bad plan)",
                        });
                    }
                }
            }
            let out = self.tensor(op.output).map_err(|_| ModelError::BadOp {
                index,
                reason: "output tensor index out of range",
            })?;
            match out.location {
                Location::Arena { first, .. } if first == step => {}
                _ => {
                    return Err(ModelError::BadOp {
                        index,
                        reason: "output must be an arena tensor first written by this op",
                    })
                }
            }
            if op.inputs.contains(&op.output) {
                return Err(ModelError::BadOp {
                    index,
                    reason: "op reads its own output",
                });
            }
            let s = op.scratch;
            if (s.offset as u64 + s.len as u64) > arena {
                return Err(ModelError::BadOp {
                    index,
                    reason: "scratch lies outside the arena",
                });
            }
            prepare_op(self, index, &op)?;
            count += 1;
        }
        if count != self.op_count || !iter.rest.is_empty() {
            return Err(ModelError::BadField { field: "op_count" });
        }
        // 4. Exactly one tensor is born at each op (so every read tensor was really written).
        let mut born = 0u32;
        for i in 0..self.tensor_count {
            if let Location::Arena { first, .. } = self.tensor(i)?.location {
                if first >= 1 && first <= self.op_count {
                    born += 1;
                }
            }
        }
        if born != self.op_count as u32 {
            return Err(ModelError::BadField {
                field: "tensor lifetimes",
            });
        }
        // 5. The memory plan: tensors alive at the same time must not share bytes, except the
        //    in-place alias of a RESHAPE (same offset and size, input dies where output is born).
        self.validate_plan()
    }

    fn validate_plan(&self) -> Result<(), ModelError> {
        for a in 0..self.tensor_count {
            let ta = self.tensor(a)?;
            let Location::Arena {
                offset: oa,
                first: fa,
                last: la,
            } = ta.location
            else {
                continue;
            };
            let size_a = tensor_bytes(&ta) as u64;
            for b in (a + 1)..self.tensor_count {
                let tb = self.tensor(b)?;
                let Location::Arena {
                    offset: ob,
                    first: fb,
                    last: lb,
                } = tb.location
                else {
                    continue;
                };
                let size_b = tensor_bytes(&tb) as u64;
                let alive_together = fa <= lb && fb <= la;
                let share_bytes =
                    (oa as u64) < ob as u64 + size_b && (ob as u64) < oa as u64 + size_a;
                if alive_together && share_bytes && !self.is_reshape_alias(a, &ta, b, &tb)? {
                    return Err(ModelError::OverlappingTensors { a, b });
                }
            }
        }
        // Scratch must not touch anything alive during its op.
        let iter = self.ops();
        for item in iter {
            let (index, op) = item?;
            if op.scratch.len == 0 {
                continue;
            }
            let step = index + 1;
            let (s0, s1) = (
                op.scratch.offset as u64,
                op.scratch.offset as u64 + op.scratch.len as u64,
            );
            for t in 0..self.tensor_count {
                let td = self.tensor(t)?;
                if let Location::Arena {
                    offset,
                    first,
                    last,
                } = td.location
                {
                    let (t0, t1) = (offset as u64, offset as u64 + tensor_bytes(&td) as u64);
                    if first <= step && step <= last && s0 < t1 && t0 < s1 {
                        return Err(ModelError::BadOp {
                            index,
                            reason: "scratch overlaps a live tensor",
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Is (a, b) a RESHAPE planned in place: one is the other's input, same offset and size,
    /// and the input dies at the op that gives birth to the output?
    fn is_reshape_alias(
        &self,
        a: u16,
        ta: &TensorDef,
        b: u16,
        tb: &TensorDef,
    ) -> Result<bool, ModelError> {
        let (
            Location::Arena {
                offset: oa,
                first: fa,
                last: la,
            },
            Location::Arena {
                offset: ob,
                first: fb,
                last: lb,
            },
        ) = (ta.location, tb.location)
        else {
            return Ok(false);
        };
        if oa != ob || tensor_bytes(ta) != tensor_bytes(tb) {
            return Ok(false);
        }
        // The consumer/producer pair: the input's last use is the output's birth.
        let (input, output, step) = if la == fb {
            (a, b, fb)
        } else if lb == fa {
            (b, a, fa)
        } else {
            return Ok(false);
        };
        if step == 0 || step > self.op_count {
            return Ok(false);
        }
        let iter = self.ops();
        for item in iter {
            let (index, op) = item?;
            if index + 1 == step {
                return Ok(matches!(op.kind, crate::graph::OpKind::Reshape)
                    && op.output == output
                    && op.inputs.first() == Some(&input));
            }
        }
        Ok(false)
    }
}

/// Bytes of a tensor's data (validated tensors never overflow).
pub fn tensor_bytes(t: &TensorDef) -> usize {
    element_count(t) * t.dtype.size()
}

/// Number of elements of a tensor (1 for a scalar).
pub fn element_count(t: &TensorDef) -> usize {
    t.shape.iter().map(|&d| d as usize).product()
}

fn validate_tensor(
    index: u16,
    t: &TensorDef,
    weights: &[u8],
    arena: u64,
    last_op: u16,
) -> Result<(), ModelError> {
    let bad = |reason| ModelError::BadTensor { index, reason };
    let mut elements: u64 = 1;
    for &d in t.shape.iter() {
        if d == 0 {
            return Err(bad("a dimension is zero"));
        }
        elements = elements
            .checked_mul(d as u64)
            .ok_or(bad("element count overflows"))?;
        if elements > MAX_TENSOR_BYTES {
            return Err(bad("tensor is larger than 1 GiB"));
        }
    }
    let bytes = elements * t.dtype.size() as u64;
    if bytes > MAX_TENSOR_BYTES {
        return Err(bad("tensor is larger than 1 GiB"));
    }
    match t.location {
        Location::Weights(r) => {
            if r.len as u64 != bytes {
                return Err(bad("constant length does not match its shape"));
            }
            if !(r.offset as usize).is_multiple_of(ALIGN) {
                return Err(bad("constant is not 16-byte aligned in WEIGHTS"));
            }
            if r.offset as u64 + r.len as u64 > weights.len() as u64 {
                return Err(bad("constant lies outside WEIGHTS"));
            }
        }
        Location::Arena {
            offset,
            first,
            last,
        } => {
            if !(offset as usize).is_multiple_of(t.dtype.size().max(4)) && t.dtype != DType::I8 {
                return Err(bad("arena offset is not aligned for its type"));
            }
            if offset as u64 + bytes > arena {
                return Err(bad("tensor lies outside the arena"));
            }
            if first > last || last > last_op {
                return Err(bad("lifetime is invalid"));
            }
        }
    }
    if let Some(q) = t.quant {
        if !(q.scale.is_finite() && q.scale > 0.0) {
            return Err(bad("quantization scale is not a positive finite number"));
        }
        if t.dtype == DType::I8 && !(-128..=127).contains(&q.zero_point) {
            return Err(bad("int8 zero point is outside [-128, 127]"));
        }
        if let Some(pc) = q.per_channel {
            let axis = pc.axis as usize;
            let dim = *t
                .shape
                .get(axis)
                .ok_or(bad("per-channel axis is beyond the rank"))? as u64;
            if pc.scales.len as u64 != dim * 4 {
                return Err(bad("per-channel scale count does not match the axis"));
            }
            if q.zero_point != 0 {
                return Err(bad("per-channel quantization must be symmetric"));
            }
            let start = pc.scales.offset as usize;
            if !start.is_multiple_of(4) {
                return Err(bad("per-channel scales are misaligned"));
            }
            let raw = start
                .checked_add(pc.scales.len as usize)
                .and_then(|end| weights.get(start..end))
                .ok_or(bad("per-channel scales lie outside WEIGHTS"))?;
            for c in raw.chunks_exact(4) {
                let s = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                if !(s.is_finite() && s > 0.0) {
                    return Err(bad("a per-channel scale is not a positive finite number"));
                }
            }
        }
    } else if t.dtype == DType::I8 {
        return Err(bad("int8 tensor has no quantization"));
    }
    Ok(())
}

/// Iterator over the ops of a model: yields `(index, op)` or the decode error.
#[derive(Clone, Debug)]
pub struct OpIter<'a> {
    rest: &'a [u8],
    remaining: u16,
    index: u16,
}

impl Iterator for OpIter<'_> {
    type Item = Result<(u16, OpDef), ModelError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        match postcard::take_from_bytes::<OpDef>(self.rest) {
            Ok((op, rest)) => {
                self.rest = rest;
                self.remaining -= 1;
                let i = self.index;
                self.index += 1;
                Some(Ok((i, op)))
            }
            Err(_) => {
                self.remaining = 0;
                Some(Err(ModelError::BadOp {
                    index: self.index,
                    reason: "does not decode",
                }))
            }
        }
    }
}
