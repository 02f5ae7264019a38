//! ONNX (`.onnx` protobuf, default operator set, opsets 7 to 25) importer into the host IR.
//!
//! The protobuf is decoded with the hand-declared messages of [`super::onnx_proto`]; every
//! index, shape, attribute and constant is then validated as the graph is converted, so a
//! malformed or unsupported model is an [`OnnxError`], never a panic.
//!
//! # Layout
//!
//! ONNX computes in NCHW; the IR (like TFLite) in NHWC. Every ONNX value is tracked with its
//! *logical* (ONNX) shape and the permutation between its logical axes and the axes of the IR
//! tensor that holds it (`physical axis i` holds `logical axis perm[i]`):
//!
//! * 4-D activations are produced in NHWC (`perm = [0, 2, 3, 1]`), other ranks in ONNX order;
//! * a `Transpose` only changes the permutation and emits nothing; `Reshape`, `Flatten`,
//!   `Squeeze` and `Unsqueeze` emit a plain IR reshape whenever the physical element order
//!   allows it, and an IR `TRANSPOSE` is emitted only where an op really needs another order
//!   (a reshape that merges axes stored out of order, a softmax over a non-last axis, ...);
//! * a flatten of an NHWC tensor that feeds `MatMul` / `Gemm` does not transpose at all: the
//!   weights' input columns are permuted instead;
//! * axis attributes (Concat, Softmax, ReduceMean, Pad, ...) and per-channel constants are
//!   mapped through the permutation.
//!
//! **Graph inputs and outputs of rank 4 are NHWC** (`[N, H, W, C]`, like TFLite models): feed
//! images as NHWC, read 4-D outputs as NHWC. Other ranks keep the ONNX order.
//! [`OnnxModel::input_perms`] and [`OnnxModel::output_perms`] give the permutations.
//! Symbolic or zero batch dimensions of graph inputs become 1; other dynamic dimensions are
//! refused.
//!
//! # Quantized (QDQ) models
//!
//! `DequantizeLinear` of an int8 (or uint8) constant gives a quantized constant; a
//! `QuantizeLinear` → `DequantizeLinear` pair on an activation gives an int8 IR tensor (uint8
//! activations are stored as int8 with the zero point minus 128, which is exact). An op whose
//! activation inputs are all such int8 tensors and whose output goes (directly or through a
//! fusable Relu / Clip) into a `QuantizeLinear` is emitted as an int8 op; otherwise it runs in
//! float between explicit IR DEQUANTIZE / QUANTIZE ops, and [`OnnxModel::notes`] says so.
//!
//! Constant subgraphs (Shape, Gather, Cast, Concat, arithmetic on constants, ...) are folded;
//! BatchNormalization and per-channel Add / Sub / Mul / Div after a float Conv, Gemm or MatMul
//! are folded into its weights and bias, and Relu / Clip(0, 6) are fused into the op before
//! them when nothing else reads its output.

use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use kiln_runtime::graph::{Activation, DType};
use prost::Message;

use super::onnx_proto::{self as pb, attribute_type as at, data_type as dt};
use crate::ir::{Graph, Op, OpKind, Padding, QuantInfo, Tensor, TensorId};
use crate::lower::same_padding;

/// Oldest default-domain opset Kiln reads.
pub const MIN_OPSET: i64 = 7;
/// Newest default-domain opset Kiln reads. Opsets 22 to 25 only added element types (bfloat16,
/// float8, int4, int2, float4) to the ops Kiln supports, so their float and int8 semantics are
/// those of opset 21.
pub const MAX_OPSET: i64 = 25;

/// Why an ONNX model could not be imported.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    /// The file is not a well-formed ONNX model.
    #[error("malformed ONNX model: {0}")]
    Malformed(String),
    /// The model uses an operator Kiln does not import.
    #[error("unsupported ONNX op {op} (opset {opset}) at node index {index}")]
    UnsupportedOp {
        /// Operator name (`domain.Op` outside the default domain).
        op: String,
        /// Index of the node in the graph.
        index: usize,
        /// The model's default-domain opset.
        opset: i64,
    },
    /// The model's default-domain opset is outside the range Kiln reads.
    #[error("unsupported ONNX opset {0}; Kiln reads opsets 7 to 25")]
    UnsupportedOpset(i64),
    /// The model uses a feature Kiln does not support (data type, attribute value, dynamic
    /// shape, non-constant weights, ...).
    #[error("unsupported ONNX feature: {0}")]
    Unsupported(String),
}

type Result<T> = std::result::Result<T, OnnxError>;

fn malformed<T>(msg: impl Into<String>) -> Result<T> {
    Err(OnnxError::Malformed(msg.into()))
}

fn unsupported<T>(msg: impl Into<String>) -> Result<T> {
    Err(OnnxError::Unsupported(msg.into()))
}

/// An imported model: the IR graph and how its inputs and outputs relate to the ONNX ones.
#[derive(Clone, Debug)]
pub struct OnnxModel {
    /// The host IR.
    pub graph: Graph,
    /// ONNX shape of each graph input.
    pub input_shapes: Vec<Vec<usize>>,
    /// For each graph input, the permutation from its ONNX shape to the IR input's shape: IR
    /// dimension `i` is ONNX dimension `perm[i]` (`[0, 2, 3, 1]` for 4-D inputs, identity
    /// otherwise). Feed `permute(onnx_data, onnx_shape, perm)`.
    pub input_perms: Vec<Vec<usize>>,
    /// ONNX shape of each graph output.
    pub output_shapes: Vec<Vec<usize>>,
    /// For each graph output, the permutation from its ONNX shape to the IR output's shape
    /// (as for inputs). Undo it with [`inverse_perm`].
    pub output_perms: Vec<Vec<usize>>,
    /// Remarks about the conversion (parts of a quantized model left in float, ...).
    pub notes: Vec<String>,
}

/// Imports an ONNX model into the host IR. See the module documentation for the layout
/// conventions (4-D inputs and outputs are NHWC).
///
/// # Errors
/// The file is malformed, or uses an op, opset, type or feature Kiln does not support.
pub fn import_onnx(bytes: &[u8]) -> Result<Graph> {
    import_onnx_model(bytes).map(|m| m.graph)
}

/// Imports an ONNX model, with the layouts of its inputs and outputs.
///
/// # Errors
/// As [`import_onnx`].
pub fn import_onnx_model(bytes: &[u8]) -> Result<OnnxModel> {
    let model = pb::ModelProto::decode(bytes)
        .map_err(|e| OnnxError::Malformed(format!("not an ONNX protobuf: {e}")))?;
    let opset = default_opset(&model)?;
    let Some(graph) = model.graph.as_ref() else {
        return malformed("the model has no graph");
    };
    // Report unsupported ops before anything else about the model.
    for (index, node) in graph.node.iter().enumerate() {
        let default_domain = is_default_domain(&node.domain);
        if !default_domain || !SUPPORTED_OPS.contains(&node.op_type.as_str()) {
            return Err(OnnxError::UnsupportedOp {
                op: if default_domain {
                    node.op_type.clone()
                } else {
                    format!("{}.{}", node.domain, node.op_type)
                },
                index,
                opset,
            });
        }
    }
    if !graph.sparse_initializer.is_empty() {
        return unsupported("sparse initializers");
    }
    Cx::convert(graph, opset)
}

fn is_default_domain(d: &str) -> bool {
    d.is_empty() || d == "ai.onnx"
}

fn default_opset(model: &pb::ModelProto) -> Result<i64> {
    let mut found = None;
    for o in &model.opset_import {
        if is_default_domain(&o.domain) {
            if found.is_some_and(|v| v != o.version) {
                return malformed("the model imports the default opset twice");
            }
            found = Some(o.version);
        }
    }
    let Some(v) = found else {
        return malformed("the model imports no default-domain opset");
    };
    if !(MIN_OPSET..=MAX_OPSET).contains(&v) {
        return Err(OnnxError::UnsupportedOpset(v));
    }
    Ok(v)
}

/// The operators Kiln imports (default domain).
const SUPPORTED_OPS: &[&str] = &[
    "Add",
    "AveragePool",
    "BatchNormalization",
    "Cast",
    "Clip",
    "Concat",
    "Constant",
    "ConstantOfShape",
    "Conv",
    "DequantizeLinear",
    "Div",
    "Dropout",
    "Flatten",
    "Gather",
    "Gemm",
    "GlobalAveragePool",
    "HardSigmoid",
    "HardSwish",
    "Identity",
    "LeakyRelu",
    "MatMul",
    "MaxPool",
    "Mul",
    "PRelu",
    "Pad",
    "QuantizeLinear",
    "ReduceMean",
    "Relu",
    "Reshape",
    "Shape",
    "Sigmoid",
    "Softmax",
    "Squeeze",
    "Sub",
    "Tanh",
    "Transpose",
    "Unsqueeze",
];

// ---------------------------------------------------------------------------------------------
// Public helpers: tensors and permutations.
// ---------------------------------------------------------------------------------------------

/// Values of a decoded `TensorProto`.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorValues {
    /// FLOAT and FLOAT16 values (widened to f32).
    Float(Vec<f32>),
    /// Integer and BOOL values (widened to i64).
    Int(Vec<i64>),
}

/// A decoded `TensorProto` (such as the `input_0.pb` / `output_0.pb` files of ONNX test data).
#[derive(Clone, Debug, PartialEq)]
pub struct TensorData {
    /// Tensor name.
    pub name: String,
    /// ONNX element type (`TensorProto.DataType`).
    pub data_type: i32,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Values, row-major.
    pub values: TensorValues,
}

/// Decodes a serialized `TensorProto`.
///
/// # Errors
/// Malformed protobuf, inconsistent sizes, or an element type Kiln does not read.
pub fn decode_tensor(bytes: &[u8]) -> Result<TensorData> {
    let t = pb::TensorProto::decode(bytes)
        .map_err(|e| OnnxError::Malformed(format!("not a TensorProto: {e}")))?;
    let c = read_tensor(&t, "tensor")?;
    Ok(TensorData {
        name: t.name.clone(),
        data_type: t.data_type,
        shape: c.shape.clone(),
        values: match &c.data {
            CData::F(v) => TensorValues::Float(v.clone()),
            CData::I(v) => TensorValues::Int(v.clone()),
        },
    })
}

/// Permutes a row-major array: output dimension `i` is input dimension `perm[i]`. `None` when
/// `perm` is not a permutation of the rank or `data` does not have `shape`'s element count.
pub fn permute<T: Copy>(data: &[T], shape: &[usize], perm: &[usize]) -> Option<Vec<T>> {
    if !is_perm(perm, shape.len()) || elements(shape) != Some(data.len()) {
        return None;
    }
    Some(permute_unchecked(data, shape, perm))
}

/// The inverse of a permutation (`None` if `perm` is not one).
pub fn inverse_perm(perm: &[usize]) -> Option<Vec<usize>> {
    if !is_perm(perm, perm.len()) {
        return None;
    }
    Some(inverse(perm))
}

fn is_perm(perm: &[usize], rank: usize) -> bool {
    let mut seen = vec![false; rank];
    perm.len() == rank
        && perm.iter().all(|&p| match seen.get_mut(p) {
            Some(s) if !*s => {
                *s = true;
                true
            }
            _ => false,
        })
}

/// Inverse of a valid permutation.
fn inverse(perm: &[usize]) -> Vec<usize> {
    let mut inv = vec![0; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        if let Some(slot) = inv.get_mut(p) {
            *slot = i;
        }
    }
    inv
}

fn elements(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
}

/// Row-major strides of a shape.
fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// [`permute`] for arguments already known to be consistent.
fn permute_unchecked<T: Copy>(data: &[T], shape: &[usize], perm: &[usize]) -> Vec<T> {
    let rank = shape.len();
    if rank == 0 || data.is_empty() {
        return data.to_vec();
    }
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let in_strides = strides(shape);
    let step: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
    let mut out = Vec::with_capacity(data.len());
    let mut idx = vec![0usize; rank];
    let mut off = 0usize;
    for _ in 0..data.len() {
        if let Some(&v) = data.get(off) {
            out.push(v);
        }
        let mut d = rank;
        while d > 0 {
            d -= 1;
            idx[d] += 1;
            off += step[d];
            if idx[d] < out_shape[d] {
                break;
            }
            off -= step[d] * out_shape[d];
            idx[d] = 0;
        }
    }
    out
}

fn identity(rank: usize) -> Vec<usize> {
    (0..rank).collect()
}

/// The layout the IR prefers for a tensor of this rank: NHWC for 4-D, ONNX order otherwise.
fn preferred_perm(rank: usize) -> Vec<usize> {
    if rank == 4 {
        vec![0, 2, 3, 1]
    } else {
        identity(rank)
    }
}

fn phys_shape(shape: &[usize], perm: &[usize]) -> Vec<usize> {
    perm.iter().map(|&p| shape.get(p).copied().unwrap_or(1)).collect()
}

/// Logical axes of the non-unit dimensions, in physical order.
fn nonunit_order(shape: &[usize], perm: &[usize]) -> Vec<usize> {
    perm.iter()
        .copied()
        .filter(|&a| shape.get(a).is_some_and(|&d| d != 1))
        .collect()
}

fn is_sorted(v: &[usize]) -> bool {
    v.windows(2).all(|w| w[0] < w[1])
}

/// NumPy broadcast of two shapes.
fn broadcast(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let r = a.len().max(b.len());
    let mut out = Vec::with_capacity(r);
    for i in 0..r {
        let da = if i + a.len() >= r { a[i + a.len() - r] } else { 1 };
        let db = if i + b.len() >= r { b[i + b.len() - r] } else { 1 };
        out.push(if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return None;
        });
    }
    Some(out)
}

/// Element-wise `f(a, b)` with NumPy broadcasting to `out` (the shapes must broadcast to it).
fn broadcast_apply<T: Copy>(
    a: &[T],
    sa: &[usize],
    b: &[T],
    sb: &[usize],
    out: &[usize],
    f: impl Fn(T, T) -> T,
) -> Vec<T> {
    let r = out.len();
    let bstrides = |s: &[usize]| -> Vec<usize> {
        let st = strides(s);
        (0..r)
            .map(|i| {
                if i + s.len() < r {
                    0
                } else {
                    let k = i + s.len() - r;
                    if s[k] == 1 {
                        0
                    } else {
                        st[k]
                    }
                }
            })
            .collect()
    };
    let (ta, tb) = (bstrides(sa), bstrides(sb));
    let n = elements(out).unwrap_or(0);
    let mut res = Vec::with_capacity(n);
    let mut idx = vec![0usize; r];
    let (mut oa, mut ob) = (0usize, 0usize);
    for _ in 0..n {
        if let (Some(&x), Some(&y)) = (a.get(oa), b.get(ob)) {
            res.push(f(x, y));
        }
        let mut d = r;
        while d > 0 {
            d -= 1;
            idx[d] += 1;
            oa += ta[d];
            ob += tb[d];
            if idx[d] < out[d] {
                break;
            }
            oa -= ta[d] * out[d];
            ob -= tb[d] * out[d];
            idx[d] = 0;
        }
    }
    res
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn f16_exact(v: f32) -> bool {
    let h = half::f16::from_f32(v).to_f32();
    h == v || (h.is_nan() && v.is_nan())
}

// ---------------------------------------------------------------------------------------------
// Constants.
// ---------------------------------------------------------------------------------------------

/// Constant data, widened.
#[derive(Clone, Debug)]
enum CData {
    F(Vec<f32>),
    I(Vec<i64>),
}

/// Quantized storage of a constant that is the output of `DequantizeLinear`.
#[derive(Clone, Debug)]
struct CQuant {
    /// Raw values in int8 terms (uint8 shifted by -128) or int32.
    raw: Vec<i64>,
    /// `INT8` (uint8 included, shifted) or `INT32`.
    raw_ty: i32,
    scales: Vec<f32>,
    /// Zero points in the same terms as `raw`.
    zero_points: Vec<i64>,
    /// Logical axis of per-channel parameters.
    axis: usize,
}

/// An ONNX constant value.
#[derive(Clone, Debug)]
struct Const {
    /// ONNX element type of the value (`FLOAT` for dequantized constants).
    ty: i32,
    shape: Vec<usize>,
    data: CData,
    /// Stored as float16 in the file (emitted as f16 when its values still fit exactly).
    f16: bool,
    /// Quantized storage, when the value came from `DequantizeLinear`.
    quant: Option<CQuant>,
}

impl Const {
    fn float(shape: Vec<usize>, v: Vec<f32>) -> Const {
        Const {
            ty: dt::FLOAT,
            shape,
            data: CData::F(v),
            f16: false,
            quant: None,
        }
    }

    fn int(ty: i32, shape: Vec<usize>, v: Vec<i64>) -> Const {
        Const {
            ty,
            shape,
            data: CData::I(v),
            f16: false,
            quant: None,
        }
    }

    fn len(&self) -> usize {
        match &self.data {
            CData::F(v) => v.len(),
            CData::I(v) => v.len(),
        }
    }

    fn is_float(&self) -> bool {
        matches!(self.data, CData::F(_))
    }

    fn floats(&self) -> Vec<f32> {
        match &self.data {
            CData::F(v) => v.clone(),
            CData::I(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }

    fn ints(&self) -> Option<&[i64]> {
        match &self.data {
            CData::I(v) => Some(v),
            CData::F(_) => None,
        }
    }

    /// The same values with the dimensions permuted (quantization axis follows).
    fn permuted(&self, perm: &[usize]) -> Const {
        let shape = phys_shape(&self.shape, perm);
        let data = match &self.data {
            CData::F(v) => CData::F(permute_unchecked(v, &self.shape, perm)),
            CData::I(v) => CData::I(permute_unchecked(v, &self.shape, perm)),
        };
        let quant = self.quant.as_ref().map(|q| CQuant {
            raw: permute_unchecked(&q.raw, &self.shape, perm),
            axis: perm.iter().position(|&p| p == q.axis).unwrap_or(0),
            ..q.clone()
        });
        Const {
            shape,
            data,
            quant,
            ..self.clone()
        }
    }

    /// The same values with a new shape of the same element count.
    fn reshaped(&self, shape: Vec<usize>) -> Const {
        let quant = self.quant.as_ref().and_then(|q| {
            // Per-tensor quantization survives any reshape; per-channel ones lose their axis.
            (q.scales.len() == 1).then(|| CQuant {
                axis: 0,
                ..q.clone()
            })
        });
        Const {
            shape,
            quant,
            ..self.clone()
        }
    }

    /// Whether this constant is int8-quantized symmetric weights (per tensor or per `axis`).
    fn int8_weights(&self, axis: usize) -> Option<&CQuant> {
        let q = self.quant.as_ref()?;
        let per_axis_ok = q.scales.len() == 1 || (q.axis == axis && self.shape.get(axis) == Some(&q.scales.len()));
        (q.raw_ty == dt::INT8 && q.zero_points.iter().all(|&z| z == 0) && per_axis_ok)
            .then_some(q)
    }
}

/// Reads a `TensorProto` into a constant.
fn read_tensor(t: &pb::TensorProto, what: &str) -> Result<Const> {
    let name = &t.name;
    if t.data_location == pb::DATA_LOCATION_EXTERNAL || !t.external_data.is_empty() {
        return unsupported(format!(
            "{what} '{name}' keeps its data in an external file (save the model with the data \
             embedded)"
        ));
    }
    let mut shape = Vec::with_capacity(t.dims.len());
    for &d in &t.dims {
        let Ok(d) = usize::try_from(d) else {
            return malformed(format!("{what} '{name}' has negative dimension {d}"));
        };
        shape.push(d);
    }
    let Some(n) = elements(&shape) else {
        return malformed(format!("{what} '{name}' shape {:?} is too large", t.dims));
    };
    let raw = &t.raw_data;
    let size = match t.data_type {
        dt::FLOAT | dt::INT32 | dt::UINT32 => 4,
        dt::UINT8 | dt::INT8 | dt::BOOL => 1,
        dt::UINT16 | dt::INT16 | dt::FLOAT16 => 2,
        dt::INT64 | dt::UINT64 => 8,
        dt::DOUBLE => {
            return unsupported(format!(
                "{what} '{name}' is float64 (Kiln reads float32 models, with float16 constants)"
            ))
        }
        other => {
            return unsupported(format!(
                "{what} '{name}' has element type {} ",
                type_name(other)
            ))
        }
    };
    let check = |count: usize, field: &str| -> Result<()> {
        if count != n {
            return malformed(format!(
                "{what} '{name}' of shape {shape:?} has {count} values in {field}, expected {n}"
            ));
        }
        Ok(())
    };
    let data = if !raw.is_empty() || n == 0 {
        if Some(raw.len()) != n.checked_mul(size) {
            return malformed(format!(
                "{what} '{name}' of type {} and shape {shape:?} needs {} bytes of raw data but has {}",
                type_name(t.data_type),
                n.saturating_mul(size),
                raw.len()
            ));
        }
        match t.data_type {
            dt::FLOAT => CData::F(f32s(raw)),
            dt::FLOAT16 => CData::F(
                raw.chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            ),
            dt::UINT8 | dt::BOOL => CData::I(raw.iter().map(|&b| i64::from(b)).collect()),
            dt::INT8 => CData::I(raw.iter().map(|&b| i64::from(b as i8)).collect()),
            dt::UINT16 => CData::I(
                raw.chunks_exact(2)
                    .map(|c| i64::from(u16::from_le_bytes([c[0], c[1]])))
                    .collect(),
            ),
            dt::INT16 => CData::I(
                raw.chunks_exact(2)
                    .map(|c| i64::from(i16::from_le_bytes([c[0], c[1]])))
                    .collect(),
            ),
            dt::INT32 => CData::I(
                raw.chunks_exact(4)
                    .map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                    .collect(),
            ),
            dt::UINT32 => CData::I(
                raw.chunks_exact(4)
                    .map(|c| i64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                    .collect(),
            ),
            dt::INT64 => CData::I(
                raw.chunks_exact(8)
                    .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                    .collect(),
            ),
            _ => CData::I(
                raw.chunks_exact(8)
                    .map(|c| {
                        let v = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
                        i64::try_from(v).unwrap_or(i64::MAX)
                    })
                    .collect(),
            ),
        }
    } else {
        match t.data_type {
            dt::FLOAT => {
                check(t.float_data.len(), "float_data")?;
                CData::F(t.float_data.clone())
            }
            dt::FLOAT16 => {
                check(t.int32_data.len(), "int32_data")?;
                CData::F(
                    t.int32_data
                        .iter()
                        .map(|&b| half::f16::from_bits(b as u16).to_f32())
                        .collect(),
                )
            }
            dt::INT64 => {
                check(t.int64_data.len(), "int64_data")?;
                CData::I(t.int64_data.clone())
            }
            dt::UINT32 | dt::UINT64 => {
                check(t.uint64_data.len(), "uint64_data")?;
                CData::I(
                    t.uint64_data
                        .iter()
                        .map(|&v| i64::try_from(v).unwrap_or(i64::MAX))
                        .collect(),
                )
            }
            ty => {
                check(t.int32_data.len(), "int32_data")?;
                let v: Vec<i64> = t.int32_data.iter().map(|&v| i64::from(v)).collect();
                let (lo, hi) = match ty {
                    dt::UINT8 => (0, 255),
                    dt::INT8 => (-128, 127),
                    dt::BOOL => (0, 1),
                    dt::UINT16 => (0, 65535),
                    dt::INT16 => (-32768, 32767),
                    _ => (i64::from(i32::MIN), i64::from(i32::MAX)),
                };
                if let Some(bad) = v.iter().find(|&&x| x < lo || x > hi) {
                    return malformed(format!(
                        "{what} '{name}' of type {} holds value {bad}",
                        type_name(ty)
                    ));
                }
                CData::I(v)
            }
        }
    };
    Ok(Const {
        ty: t.data_type,
        shape,
        data,
        f16: t.data_type == dt::FLOAT16,
        quant: None,
    })
}

fn type_name(ty: i32) -> String {
    let name = match ty {
        dt::FLOAT => "float32",
        dt::UINT8 => "uint8",
        dt::INT8 => "int8",
        dt::UINT16 => "uint16",
        dt::INT16 => "int16",
        dt::INT32 => "int32",
        dt::INT64 => "int64",
        dt::STRING => "string",
        dt::BOOL => "bool",
        dt::FLOAT16 => "float16",
        dt::DOUBLE => "float64",
        dt::UINT32 => "uint32",
        dt::UINT64 => "uint64",
        14 => "complex64",
        15 => "complex128",
        dt::BFLOAT16 => "bfloat16",
        17 => "float8e4m3fn",
        18 => "float8e4m3fnuz",
        19 => "float8e5m2",
        20 => "float8e5m2fnuz",
        21 => "uint4",
        22 => "int4",
        23 => "float4e2m1",
        24 => "float8e8m0",
        25 => "uint2",
        26 => "int2",
        _ => return format!("type {ty}"),
    };
    name.to_string()
}
