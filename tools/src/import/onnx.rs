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

// ---------------------------------------------------------------------------------------------
// Values and nodes.
// ---------------------------------------------------------------------------------------------

/// Physical column order of a 2-D `[M, K]` value made by flattening an `[M, inner...]` tensor
/// stored out of logical order: physical columns run over `inner` permuted by `perm`.
#[derive(Clone, Debug, PartialEq)]
struct Cols {
    /// Logical shape of the flattened axes.
    inner: Vec<usize>,
    /// Physical order of the flattened axes (indices into `inner`).
    perm: Vec<usize>,
}

impl Cols {
    /// For each physical column, its logical column.
    fn logical_columns(&self) -> Vec<usize> {
        let k = elements(&self.inner).unwrap_or(0);
        let idx: Vec<usize> = (0..k).collect();
        permute_unchecked(&idx, &self.inner, &self.perm)
    }
}

/// An ONNX value held by an IR tensor.
#[derive(Clone, Debug)]
struct Act {
    id: TensorId,
    /// Logical (ONNX) shape.
    shape: Vec<usize>,
    /// Physical axis `i` holds logical axis `perm[i]`.
    perm: Vec<usize>,
    /// Set for a flatten whose columns are physically permuted (then `perm` is `[0, 1]`).
    cols: Option<Cols>,
    /// The IR tensor is int8 and this (float) value is its dequantization.
    deq: bool,
    /// The ONNX value is uint8 (stored as int8, offset by -128).
    u8: bool,
}

impl Act {
    fn rank(&self) -> usize {
        self.shape.len()
    }

    fn with(&self, id: TensorId, shape: Vec<usize>, perm: Vec<usize>) -> Act {
        Act {
            id,
            shape,
            perm,
            cols: None,
            ..self.clone()
        }
    }
}

#[derive(Clone, Debug)]
enum Value {
    Const(Rc<Const>),
    Act(Act),
}

/// Quantization parameters of a QuantizeLinear / DequantizeLinear node, in int8 terms.
#[derive(Clone, Debug, PartialEq)]
struct QParams {
    scales: Vec<f32>,
    zero_points: Vec<i64>,
    /// Logical axis of per-axis parameters, as written (may be negative).
    axis: i64,
    /// The quantized type is uint8 (zero points shifted by -128).
    u8: bool,
}

/// One node being converted, with checked accessors.
struct Node<'a> {
    index: usize,
    p: &'a pb::NodeProto,
    opset: i64,
}

impl Node<'_> {
    fn op(&self) -> &str {
        &self.p.op_type
    }

    fn what(&self) -> String {
        if self.p.name.is_empty() {
            format!("node {} ({})", self.index, self.p.op_type)
        } else {
            format!("node {} ({} '{}')", self.index, self.p.op_type, self.p.name)
        }
    }

    fn malformed<T>(&self, msg: impl std::fmt::Display) -> Result<T> {
        malformed(format!("{}: {msg}", self.what()))
    }

    fn unsupported<T>(&self, msg: impl std::fmt::Display) -> Result<T> {
        unsupported(format!("{}: {msg}", self.what()))
    }

    fn attr(&self, name: &str) -> Option<&pb::AttributeProto> {
        self.p.attribute.iter().find(|a| a.name == name)
    }

    /// Refuses attributes outside `allowed` (so none is silently ignored).
    fn check_attrs(&self, allowed: &[&str]) -> Result<()> {
        for a in &self.p.attribute {
            if !a.ref_attr_name.is_empty() {
                return self.unsupported(format!("attribute '{}' refers to a function attribute", a.name));
            }
            if !allowed.contains(&a.name.as_str()) {
                return self.unsupported(format!("attribute '{}'", a.name));
            }
        }
        Ok(())
    }

    fn typed(&self, name: &str, want: i32, present: bool) -> Result<Option<&pb::AttributeProto>> {
        let Some(a) = self.attr(name) else {
            return Ok(None);
        };
        if (a.r#type != at::UNDEFINED && a.r#type != want) || (a.r#type == at::UNDEFINED && !present) {
            return self.malformed(format!("attribute '{name}' has type {}, expected {want}", a.r#type));
        }
        Ok(Some(a))
    }

    fn int(&self, name: &str, default: i64) -> Result<i64> {
        let present = self.attr(name).is_some_and(|a| a.i.is_some());
        Ok(match self.typed(name, at::INT, present)? {
            Some(a) => a.i.unwrap_or(default),
            None => default,
        })
    }

    fn float(&self, name: &str, default: f32) -> Result<f32> {
        let present = self.attr(name).is_some_and(|a| a.f.is_some());
        Ok(match self.typed(name, at::FLOAT, present)? {
            Some(a) => a.f.unwrap_or(default),
            None => default,
        })
    }

    fn ints(&self, name: &str) -> Result<Option<Vec<i64>>> {
        Ok(self.typed(name, at::INTS, true)?.map(|a| a.ints.clone()))
    }

    fn floats(&self, name: &str) -> Result<Option<Vec<f32>>> {
        Ok(self.typed(name, at::FLOATS, true)?.map(|a| a.floats.clone()))
    }

    fn string(&self, name: &str) -> Result<Option<String>> {
        let present = self.attr(name).is_some_and(|a| a.s.is_some());
        Ok(self
            .typed(name, at::STRING, present)?
            .map(|a| String::from_utf8_lossy(a.s.as_deref().unwrap_or_default()).into_owned()))
    }

    fn tensor(&self, name: &str) -> Result<Option<&pb::TensorProto>> {
        let present = self.attr(name).is_some_and(|a| a.t.is_some());
        Ok(self.typed(name, at::TENSOR, present)?.and_then(|a| a.t.as_ref()))
    }

    /// Name of input `i`, `None` when absent or empty.
    fn in_name(&self, i: usize) -> Option<&str> {
        self.p.input.get(i).map(String::as_str).filter(|s| !s.is_empty())
    }

    fn out_name(&self, i: usize) -> Result<&str> {
        match self.p.output.get(i).map(String::as_str) {
            Some(s) if !s.is_empty() => Ok(s),
            _ => self.malformed(format!("output {i} is missing")),
        }
    }

    fn arity(&self, min_in: usize, max_in: usize) -> Result<()> {
        let n = self.p.input.len();
        if n < min_in || n > max_in {
            return self.malformed(format!(
                "has {n} inputs, expected {}",
                if min_in == max_in {
                    min_in.to_string()
                } else {
                    format!("{min_in} to {max_in}")
                }
            ));
        }
        if self.p.output.is_empty() {
            return self.malformed("has no outputs");
        }
        Ok(())
    }

    /// A negative axis counts from the end; must end up in `0..rank`.
    fn axis(&self, a: i64, rank: usize) -> Result<usize> {
        let r = i64::try_from(rank).unwrap_or(i64::MAX);
        let v = if a < 0 { a + r } else { a };
        match usize::try_from(v) {
            Ok(v) if v < rank => Ok(v),
            _ => self.malformed(format!("axis {a} is outside rank {rank}")),
        }
    }

    fn axes(&self, list: &[i64], rank: usize) -> Result<Vec<usize>> {
        let mut out = Vec::with_capacity(list.len());
        for &a in list {
            let v = self.axis(a, rank)?;
            if out.contains(&v) {
                return self.malformed(format!("axis {a} is repeated"));
            }
            out.push(v);
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------
// The converter.
// ---------------------------------------------------------------------------------------------

struct Cx<'a> {
    nodes: &'a [pb::NodeProto],
    opset: i64,
    g: Graph,
    values: HashMap<String, Value>,
    /// Node indices consuming each value (one entry per input edge).
    consumers: HashMap<String, Vec<usize>>,
    /// Graph output names (with multiplicity).
    outputs: Vec<String>,
    /// Pending ONNX uses of each IR tensor, through any value it holds.
    pending: HashMap<TensorId, usize>,
    /// IR ops reading each tensor.
    readers: HashMap<TensorId, usize>,
    /// IR op writing each tensor.
    producer: HashMap<TensorId, usize>,
    graph_inputs: HashSet<TensorId>,
    /// int8 tensor → its dequantization.
    deq_cache: HashMap<TensorId, TensorId>,
    /// (tensor, physical layout) → tensor in that layout.
    layout_cache: HashMap<(TensorId, Vec<usize>), TensorId>,
    /// Float constants stored as float16 in the file.
    f16_consts: HashSet<TensorId>,
    notes: Vec<String>,
}

impl<'a> Cx<'a> {
    fn convert(graph: &'a pb::GraphProto, opset: i64) -> Result<OnnxModel> {
        let mut consumers: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, n) in graph.node.iter().enumerate() {
            for name in n.input.iter().filter(|s| !s.is_empty()) {
                consumers.entry(name.clone()).or_default().push(i);
            }
        }
        let mut cx = Cx {
            nodes: &graph.node,
            opset,
            g: Graph {
                name: graph.name.clone(),
                ..Graph::default()
            },
            values: HashMap::new(),
            consumers,
            outputs: graph.output.iter().map(|o| o.name.clone()).collect(),
            pending: HashMap::new(),
            readers: HashMap::new(),
            producer: HashMap::new(),
            graph_inputs: HashSet::new(),
            deq_cache: HashMap::new(),
            layout_cache: HashMap::new(),
            f16_consts: HashSet::new(),
            notes: Vec::new(),
        };

        for t in &graph.initializer {
            if t.name.is_empty() {
                return malformed("an initializer has no name");
            }
            let c = read_tensor(t, "initializer")?;
            if cx.values.insert(t.name.clone(), Value::Const(Rc::new(c))).is_some() {
                return malformed(format!("two initializers are named '{}'", t.name));
            }
        }

        let mut input_shapes = Vec::new();
        let mut input_perms = Vec::new();
        for vi in &graph.input {
            if cx.values.contains_key(&vi.name) {
                continue; // an initializer: a constant
            }
            let (ty, shape) = input_type(vi)?;
            let dtype = match ty {
                dt::FLOAT => DType::F32,
                dt::INT8 => DType::I8,
                other => {
                    return unsupported(format!(
                        "graph input '{}' is {} (Kiln reads float32 inputs, or int8 inputs of \
                         quantized models)",
                        vi.name,
                        type_name(other)
                    ))
                }
            };
            let perm = preferred_perm(shape.len());
            let id = cx.new_tensor(&vi.name, dtype, phys_shape(&shape, &perm), None);
            cx.g.inputs.push(id);
            cx.graph_inputs.insert(id);
            input_shapes.push(shape.clone());
            input_perms.push(perm.clone());
            let act = Act {
                id,
                shape,
                perm,
                cols: None,
                deq: false,
                u8: false,
            };
            cx.bind(&vi.name, Value::Act(act))?;
        }
        if cx.g.inputs.is_empty() && graph.node.is_empty() && graph.output.is_empty() {
            return malformed("the graph is empty");
        }

        for (index, p) in graph.node.iter().enumerate() {
            let n = Node { index, p, opset };
            cx.node(&n)?;
        }

        let mut output_shapes = Vec::new();
        let mut output_perms = Vec::new();
        for vi in &graph.output {
            let (shape, perm) = cx.graph_output(vi)?;
            output_shapes.push(shape);
            output_perms.push(perm);
        }
        for &id in &cx.g.inputs {
            let t = &cx.g.tensors[id];
            if t.dtype == DType::I8 && t.quant.is_none() {
                return unsupported(format!(
                    "int8 graph input '{}' is not dequantized by a DequantizeLinear, so its \
                     quantization is unknown",
                    t.name
                ));
            }
        }
        cx.finish();
        Ok(OnnxModel {
            graph: cx.g,
            input_shapes,
            input_perms,
            output_shapes,
            output_perms,
            notes: cx.notes,
        })
    }

    // --- bookkeeping -------------------------------------------------------------------------

    fn new_tensor(
        &mut self,
        name: &str,
        dtype: DType,
        shape: Vec<usize>,
        quant: Option<QuantInfo>,
    ) -> TensorId {
        self.g.tensors.push(Tensor {
            name: name.to_string(),
            dtype,
            shape,
            data: None,
            quant,
        });
        self.g.tensors.len() - 1
    }

    fn const_tensor(
        &mut self,
        name: &str,
        dtype: DType,
        shape: Vec<usize>,
        data: Vec<u8>,
        quant: Option<QuantInfo>,
    ) -> TensorId {
        self.g.tensors.push(Tensor {
            name: name.to_string(),
            dtype,
            shape,
            data: Some(data),
            quant,
        });
        self.g.tensors.len() - 1
    }

    /// A float constant tensor (`f16`: the values came from float16 storage).
    fn f32_tensor(&mut self, name: &str, shape: Vec<usize>, v: &[f32], f16: bool) -> TensorId {
        let id = self.const_tensor(name, DType::F32, shape, f32_bytes(v), None);
        if f16 {
            self.f16_consts.insert(id);
        }
        id
    }

    fn push(&mut self, kind: OpKind, inputs: Vec<Option<TensorId>>, out: TensorId) -> usize {
        for &t in inputs.iter().flatten() {
            *self.readers.entry(t).or_default() += 1;
        }
        self.g.ops.push(Op {
            kind,
            inputs,
            outputs: vec![out],
        });
        let index = self.g.ops.len() - 1;
        self.producer.insert(out, index);
        index
    }

    /// Number of pending ONNX uses of a value name.
    fn uses(&self, name: &str) -> usize {
        self.consumers.get(name).map_or(0, Vec::len) + self.outputs.iter().filter(|o| *o == name).count()
    }

    fn bind(&mut self, name: &str, v: Value) -> Result<()> {
        if let Value::Act(a) = &v {
            let uses = self.uses(name);
            *self.pending.entry(a.id).or_default() += uses;
        }
        if self.values.insert(name.to_string(), v).is_some() {
            return malformed(format!("value '{name}' is defined twice"));
        }
        Ok(())
    }

    /// Whether an IR tensor is read by nothing but the current node (so the op writing it may
    /// be changed).
    fn private(&self, id: TensorId) -> bool {
        self.pending.get(&id).copied().unwrap_or(0) == 0
            && self.readers.get(&id).copied().unwrap_or(0) == 0
            && !self.graph_inputs.contains(&id)
    }

    fn node(&mut self, n: &Node<'_>) -> Result<()> {
        // This node's uses of its inputs are no longer pending.
        for name in n.p.input.iter().filter(|s| !s.is_empty()) {
            if let Some(Value::Act(a)) = self.values.get(name) {
                let id = a.id;
                if let Some(p) = self.pending.get_mut(&id) {
                    *p = p.saturating_sub(1);
                }
            }
        }
        // Extra outputs this importer does not produce must be unused.
        let produced = match n.op() {
            "Dropout" | "MaxPool" | "BatchNormalization" => 1,
            _ => n.p.output.len(),
        };
        for extra in n.p.output.iter().skip(produced).filter(|s| !s.is_empty()) {
            if self.uses(extra) > 0 {
                return n.unsupported(format!("output '{extra}' is used (Kiln computes only the first output)"));
            }
        }
        match n.op() {
            "Constant" => self.op_constant(n),
            "ConstantOfShape" => self.op_constant_of_shape(n),
            "Identity" | "Dropout" => self.op_identity(n),
            "Shape" => self.op_shape(n),
            "Gather" => self.op_gather(n),
            "Cast" => self.op_cast(n),
            "Conv" => self.op_conv(n),
            "Gemm" | "MatMul" => self.op_gemm(n),
            "Add" | "Sub" | "Mul" | "Div" => self.op_binary(n),
            "PRelu" => self.op_prelu(n),
            "Relu" | "Sigmoid" | "Tanh" | "LeakyRelu" | "HardSigmoid" | "HardSwish" | "Clip" => {
                self.op_unary(n)
            }
            "MaxPool" | "AveragePool" => self.op_pool(n),
            "GlobalAveragePool" => self.op_global_pool(n),
            "ReduceMean" => self.op_reduce_mean(n),
            "Reshape" | "Flatten" | "Squeeze" | "Unsqueeze" => self.op_reshape(n),
            "Transpose" => self.op_transpose(n),
            "Concat" => self.op_concat(n),
            "Pad" => self.op_pad(n),
            "Softmax" => self.op_softmax(n),
            "BatchNormalization" => self.op_batchnorm(n),
            "QuantizeLinear" => self.op_quantize(n),
            "DequantizeLinear" => self.op_dequantize(n),
            other => Err(OnnxError::UnsupportedOp {
                op: other.to_string(),
                index: n.index,
                opset: self.opset,
            }),
        }
    }

    // --- inputs --------------------------------------------------------------------------------

    fn value(&self, n: &Node<'_>, i: usize) -> Result<Value> {
        let Some(name) = n.in_name(i) else {
            return n.malformed(format!("input {i} is missing"));
        };
        match self.values.get(name) {
            Some(v) => Ok(v.clone()),
            None => n.malformed(format!(
                "input '{name}' is not a graph input, an initializer or the output of an earlier node"
            )),
        }
    }

    fn opt_value(&self, n: &Node<'_>, i: usize) -> Result<Option<Value>> {
        if n.in_name(i).is_none() {
            return Ok(None);
        }
        self.value(n, i).map(Some)
    }

    fn const_in(&self, n: &Node<'_>, i: usize, role: &str) -> Result<Rc<Const>> {
        match self.value(n, i)? {
            Value::Const(c) => Ok(c),
            Value::Act(_) => n.unsupported(format!(
                "its {role} '{}' is computed at run time; Kiln needs it to be a constant \
                 (an initializer or a Constant node)",
                n.in_name(i).unwrap_or_default()
            )),
        }
    }

    fn opt_const_in(&self, n: &Node<'_>, i: usize, role: &str) -> Result<Option<Rc<Const>>> {
        if n.in_name(i).is_none() {
            return Ok(None);
        }
        self.const_in(n, i, role).map(Some)
    }

    /// Integer constant input (shape, axes, pads, ...).
    fn ints_in(&self, n: &Node<'_>, i: usize, role: &str) -> Result<Option<Vec<i64>>> {
        let Some(c) = self.opt_const_in(n, i, role)? else {
            return Ok(None);
        };
        match c.ints() {
            Some(v) if c.shape.len() <= 1 => Ok(Some(v.to_vec())),
            _ => n.malformed(format!("its {role} must be a 1-D integer tensor")),
        }
    }

    /// A scalar float constant input.
    fn scalar_in(&self, n: &Node<'_>, i: usize, role: &str) -> Result<Option<f32>> {
        let Some(c) = self.opt_const_in(n, i, role)? else {
            return Ok(None);
        };
        let v = c.floats();
        match v.as_slice() {
            [x] => Ok(Some(*x)),
            _ => n.malformed(format!("its {role} must be a single value, has shape {:?}", c.shape)),
        }
    }

    /// An activation input (a constant data input becomes an IR constant tensor in ONNX order).
    fn act_in(&mut self, n: &Node<'_>, i: usize) -> Result<Act> {
        match self.value(n, i)? {
            Value::Act(a) => {
                if a.u8 && !a.deq {
                    return n.unsupported("it reads uint8 values (only through DequantizeLinear)");
                }
                Ok(a)
            }
            Value::Const(c) => self.const_act(n, &c),
        }
    }

    fn const_act(&mut self, n: &Node<'_>, c: &Const) -> Result<Act> {
        if !c.is_float() {
            return n.unsupported(format!(
                "it computes on a constant of type {} (Kiln computes in float32 and int8)",
                type_name(c.ty)
            ));
        }
        let shape = if c.shape.is_empty() { vec![1] } else { c.shape.clone() };
        let name = format!("{}/const", n.p.name);
        let id = self.f32_tensor(&name, shape.clone(), &c.floats(), c.f16);
        Ok(Act {
            id,
            perm: identity(c.shape.len()),
            shape: c.shape.clone(),
            cols: None,
            deq: false,
            u8: false,
        })
    }

    fn dtype(&self, id: TensorId) -> DType {
        self.g.tensors.get(id).map_or(DType::F32, |t| t.dtype)
    }

    fn quant_of(&self, id: TensorId) -> Option<(f32, i64)> {
        let q = self.g.tensors.get(id)?.quant.as_ref()?;
        Some((*q.scales.first()?, q.zero_points.first().copied().unwrap_or(0)))
    }

    /// Whether an activation is an int8 tensor standing for its float dequantization.
    fn is_q(&self, a: &Act) -> bool {
        a.deq && self.dtype(a.id) == DType::I8
    }

    /// The activation in float (emits a DEQUANTIZE for int8 ones).
    fn float_act(&mut self, a: &Act) -> Act {
        if !self.is_q(a) {
            return a.clone();
        }
        let id = match self.deq_cache.get(&a.id) {
            Some(&id) => id,
            None => {
                let t = &self.g.tensors[a.id];
                let (name, shape) = (format!("{}/dequantized", t.name), t.shape.clone());
                let id = self.new_tensor(&name, DType::F32, shape, None);
                self.push(OpKind::Dequantize, vec![Some(a.id)], id);
                self.deq_cache.insert(a.id, id);
                id
            }
        };
        Act {
            id,
            deq: false,
            u8: false,
            ..a.clone()
        }
    }

    fn note_float(&mut self, n: &Node<'_>, inputs: &[&Act]) {
        if inputs.iter().any(|a| self.is_q(a)) {
            self.notes.push(format!(
                "{} runs in float: its output is not quantized by a QuantizeLinear, or its \
                 operands cannot be int8",
                n.what()
            ));
        }
    }

    // --- layout ----------------------------------------------------------------------------------

    /// A new activation tensor like `like` (same type and quantization) with a physical shape.
    fn derived(&mut self, like: TensorId, suffix: &str, shape: Vec<usize>) -> TensorId {
        let (name, dtype, quant) = {
            let t = &self.g.tensors[like];
            (format!("{}/{suffix}", t.name), t.dtype, t.quant.clone())
        };
        self.new_tensor(&name, dtype, shape, quant)
    }

    /// Physical reshape of an activation's tensor (no op when the shape is already that).
    fn phys_reshape(&mut self, id: TensorId, shape: Vec<usize>) -> TensorId {
        if self.g.tensors[id].shape == shape {
            return id;
        }
        let out = self.derived(id, "reshaped", shape);
        self.push(OpKind::Reshape, vec![Some(id)], out);
        out
    }

    /// A cols-flattened activation in logical column order.
    fn uncols(&mut self, a: &Act) -> Act {
        let Some(cols) = a.cols.clone() else {
            return a.clone();
        };
        let m = a.shape.first().copied().unwrap_or(1);
        let mut shape = vec![m];
        shape.extend(&cols.inner);
        let mut perm = vec![0];
        perm.extend(cols.perm.iter().map(|p| p + 1));
        let id = self.phys_reshape(a.id, phys_shape(&shape, &perm));
        let full = a.with(id, shape.clone(), perm);
        let logical = self.to_layout(&full, &identity(shape.len()));
        let id = self.phys_reshape(logical.id, a.shape.clone());
        a.with(id, a.shape.clone(), identity(2))
    }

    /// The activation stored in physical layout `target`.
    fn to_layout(&mut self, a: &Act, target: &[usize]) -> Act {
        let a = self.uncols(a);
        if a.perm == target {
            return a;
        }
        let key = (a.id, target.to_vec());
        if let Some(&id) = self.layout_cache.get(&key) {
            return a.with(id, a.shape.clone(), target.to_vec());
        }
        let shape = phys_shape(&a.shape, target);
        let id = if nonunit_order(&a.shape, &a.perm) == nonunit_order(&a.shape, target) {
            self.phys_reshape(a.id, shape)
        } else {
            let inv = inverse(&a.perm);
            let perm: Vec<usize> = target.iter().map(|&t| inv[t]).collect();
            let out = self.derived(a.id, "transposed", shape);
            self.push(OpKind::Transpose { perm }, vec![Some(a.id)], out);
            out
        };
        self.layout_cache.insert(key, id);
        a.with(id, a.shape.clone(), target.to_vec())
    }

    /// A reshape of an activation to logical shape `out` (sizes already checked). Emits a plain
    /// IR reshape when the physical order allows, a transpose otherwise.
    fn reshape_act(&mut self, a: &Act, out: &[usize]) -> Act {
        let a = self.uncols(a);
        let r = out.len();
        let in_order = nonunit_order(&a.shape, &a.perm);
        let candidates: Vec<Vec<usize>>;
        let want: Vec<usize>;
        if is_sorted(&in_order) {
            candidates = vec![preferred_perm(r), identity(r)];
            want = (0..r).filter(|&i| out[i] != 1).collect();
        } else {
            let in_nonunit: Vec<usize> = (0..a.rank()).filter(|&i| a.shape[i] != 1).collect();
            let out_nonunit: Vec<usize> = (0..r).filter(|&i| out[i] != 1).collect();
            let in_sizes: Vec<usize> = in_nonunit.iter().map(|&i| a.shape[i]).collect();
            let out_sizes: Vec<usize> = out_nonunit.iter().map(|&i| out[i]).collect();
            if in_sizes != out_sizes {
                // Axes stored out of order are merged or split: go through ONNX order.
                let logical = self.to_layout(&a, &identity(a.rank()));
                return self.reshape_act(&logical, out);
            }
            want = in_order
                .iter()
                .filter_map(|ax| in_nonunit.iter().position(|x| x == ax))
                .filter_map(|k| out_nonunit.get(k).copied())
                .collect();
            let mut constructed: Vec<usize> = (0..r).filter(|&i| out[i] == 1).collect();
            constructed.extend(&want);
            candidates = vec![preferred_perm(r), identity(r), constructed];
        }
        let perm = candidates
            .into_iter()
            .find(|p| nonunit_order(out, p) == want)
            .unwrap_or_else(|| identity(r));
        let id = self.phys_reshape(a.id, phys_shape(out, &perm));
        a.with(id, out.to_vec(), perm)
    }

    // --- graph outputs and clean-up --------------------------------------------------------------

    fn graph_output(&mut self, vi: &pb::ValueInfoProto) -> Result<(Vec<usize>, Vec<usize>)> {
        let name = &vi.name;
        let Some(v) = self.values.get(name).cloned() else {
            return malformed(format!("graph output '{name}' is not produced by any node"));
        };
        let what = format!("graph output '{name}'");
        let mut a = match v {
            Value::Act(a) => a,
            Value::Const(c) => {
                if !c.is_float() {
                    return unsupported(format!("{what} is a constant of type {}", type_name(c.ty)));
                }
                let shape = if c.shape.is_empty() { vec![1] } else { c.shape.clone() };
                let id = self.f32_tensor(&format!("{name}/const"), shape, &c.floats(), false);
                Act {
                    id,
                    shape: c.shape.clone(),
                    perm: identity(c.shape.len()),
                    cols: None,
                    deq: false,
                    u8: false,
                }
            }
        };
        if a.u8 {
            return unsupported(format!(
                "{what} is uint8 (Kiln's quantized outputs are int8; end the graph with a \
                 DequantizeLinear or quantize to int8)"
            ));
        }
        if a.deq {
            a = self.float_act(&a);
        }
        let perm = preferred_perm(a.rank());
        a = self.to_layout(&a, &perm);
        // Each output needs its own tensor written by an op.
        let needs_copy = self.g.tensors[a.id].data.is_some()
            || self.graph_inputs.contains(&a.id)
            || self.g.outputs.contains(&a.id);
        if needs_copy {
            let shape = self.g.tensors[a.id].shape.clone();
            let out = self.derived(a.id, "output", shape);
            self.g.tensors[out].data = None;
            self.g.tensors[out].name = name.clone();
            self.push(OpKind::Reshape, vec![Some(a.id)], out);
            a.id = out;
        }
        // Check the declared shape, where there is one.
        if let Some(pb::type_proto::Value::TensorType(t)) = vi.r#type.as_ref().and_then(|t| t.value.as_ref()) {
            if let Some(s) = &t.shape {
                let declared: Vec<Option<usize>> = s
                    .dim
                    .iter()
                    .map(|d| match d.value {
                        Some(pb::tensor_shape_proto::dimension::Value::DimValue(v)) if v > 0 => {
                            usize::try_from(v).ok()
                        }
                        _ => None,
                    })
                    .collect();
                let fits = declared.len() == a.shape.len()
                    && declared.iter().zip(&a.shape).all(|(d, &s)| d.is_none_or(|d| d == s));
                if !fits && !(declared.is_empty() && a.shape.is_empty()) {
                    return malformed(format!(
                        "{what} is declared with shape {:?} but computes to {:?}",
                        s.dim
                            .iter()
                            .map(|d| match &d.value {
                                Some(pb::tensor_shape_proto::dimension::Value::DimValue(v)) => v.to_string(),
                                Some(pb::tensor_shape_proto::dimension::Value::DimParam(p)) => p.clone(),
                                None => "?".into(),
                            })
                            .collect::<Vec<_>>(),
                        a.shape
                    ));
                }
            }
        }
        self.g.outputs.push(a.id);
        Ok((a.shape.clone(), perm))
    }

    /// Drops ops whose results nothing uses, and stores float16-origin constants as f16 again.
    fn finish(&mut self) {
        let mut live: HashSet<TensorId> = self.g.outputs.iter().copied().collect();
        let mut keep = vec![false; self.g.ops.len()];
        for (i, op) in self.g.ops.iter().enumerate().rev() {
            if op.outputs.iter().any(|o| live.contains(o)) {
                keep[i] = true;
                live.extend(op.inputs.iter().flatten().copied());
            }
        }
        let ops = std::mem::take(&mut self.g.ops);
        self.g.ops = ops
            .into_iter()
            .zip(keep)
            .filter_map(|(op, k)| k.then_some(op))
            .collect();

        // float16 constants: the IR keeps them as f16 with a constant DEQUANTIZE (which lowering
        // folds), as TFLite stores float16 weights, when the values still fit exactly.
        let mut ids: Vec<TensorId> = self.f16_consts.iter().copied().filter(|id| live.contains(id)).collect();
        ids.sort_unstable();
        let mut deqs = Vec::new();
        for id in ids {
            let Some(data) = self.g.tensors[id].data.clone() else {
                continue;
            };
            let v = f32s(&data);
            if !v.iter().all(|&x| f16_exact(x)) {
                continue;
            }
            let bytes: Vec<u8> = v.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect();
            let t = &self.g.tensors[id];
            let half_t = Tensor {
                name: format!("{}/f16", t.name),
                dtype: DType::F16,
                shape: t.shape.clone(),
                data: Some(bytes),
                quant: None,
            };
            self.g.tensors.push(half_t);
            let src = self.g.tensors.len() - 1;
            self.g.tensors[id].data = None;
            deqs.push(Op {
                kind: OpKind::Dequantize,
                inputs: vec![Some(src)],
                outputs: vec![id],
            });
        }
        if !deqs.is_empty() {
            deqs.append(&mut self.g.ops);
            self.g.ops = deqs;
        }
    }

    // --- constant-producing and shape ops --------------------------------------------------------

    fn op_constant(&mut self, n: &Node<'_>) -> Result<()> {
        n.check_attrs(&["value", "value_float", "value_floats", "value_int", "value_ints", "sparse_value", "value_string", "value_strings"])?;
        n.arity(0, 0)?;
        let set: Vec<&str> = n.p.attribute.iter().map(|a| a.name.as_str()).collect();
        if set.len() != 1 {
            return n.malformed(format!("needs exactly one value attribute, has {set:?}"));
        }
        let c = if let Some(t) = n.tensor("value")? {
            read_tensor(t, &format!("{} value", n.what()))?
        } else if n.attr("value_float").is_some() {
            Const::float(vec![], vec![n.float("value_float", 0.0)?])
        } else if let Some(v) = n.floats("value_floats")? {
            Const::float(vec![v.len()], v)
        } else if n.attr("value_int").is_some() {
            Const::int(dt::INT64, vec![], vec![n.int("value_int", 0)?])
        } else if let Some(v) = n.ints("value_ints")? {
            Const::int(dt::INT64, vec![v.len()], v)
        } else {
            return n.unsupported(format!("value attribute '{}'", set.first().unwrap_or(&"")));
        };
        self.bind(n.out_name(0)?, Value::Const(Rc::new(c)))
    }

    fn op_constant_of_shape(&mut self, n: &Node<'_>) -> Result<()> {
        n.check_attrs(&["value"])?;
        n.arity(1, 1)?;
        let Some(dims) = self.ints_in(n, 0, "shape")? else {
            return n.malformed("has no shape input");
        };
        let mut shape = Vec::new();
        for d in dims {
            match usize::try_from(d) {
                Ok(d) => shape.push(d),
                Err(_) => return n.malformed(format!("has negative dimension {d}")),
            }
        }
        let count = match elements(&shape) {
            Some(c) if c <= 1 << 28 => c,
            _ => return n.unsupported(format!("shape {shape:?} is too large")),
        };
        let value = match n.tensor("value")? {
            Some(t) => read_tensor(t, "value")?,
            None => Const::float(vec![1], vec![0.0]),
        };
        if value.len() != 1 {
            return n.malformed("value must have one element");
        }
        let c = match &value.data {
            CData::F(v) => Const::float(shape, vec![v[0]; count]),
            CData::I(v) => Const::int(value.ty, shape, vec![v[0]; count]),
        };
        self.bind(n.out_name(0)?, Value::Const(Rc::new(c)))
    }

    fn op_identity(&mut self, n: &Node<'_>) -> Result<()> {
        if n.op() == "Dropout" {
            n.check_attrs(&["ratio", "seed", "is_test"])?;
            n.arity(1, 3)?;
            if n.opset < 7 && n.int("is_test", 0)? == 0 {
                return n.unsupported("training mode");
            }
            if let Some(c) = self.opt_const_in(n, 2, "training_mode")? {
                if c.ints().is_some_and(|v| v.iter().any(|&x| x != 0)) {
                    return n.unsupported("training mode");
                }
            } else if n.in_name(2).is_some() {
                return n.unsupported("a run-time training_mode");
            }
        } else {
            n.check_attrs(&[])?;
            n.arity(1, 1)?;
        }
        let v = self.value(n, 0)?;
        self.bind(n.out_name(0)?, v)
    }

    fn op_shape(&mut self, n: &Node<'_>) -> Result<()> {
        n.check_attrs(&["start", "end"])?;
        n.arity(1, 1)?;
        let shape = match self.value(n, 0)? {
            Value::Const(c) => c.shape.clone(),
            Value::Act(a) => a.shape.clone(),
        };
        let r = i64::try_from(shape.len()).unwrap_or(i64::MAX);
        let clampi = |v: i64| -> usize {
            let v = if v < 0 { v + r } else { v };
            usize::try_from(v.clamp(0, r)).unwrap_or(0)
        };
        let start = clampi(n.int("start", 0)?);
        let end = clampi(n.int("end", r)?);
        let dims: Vec<i64> = shape
            .get(start..end.max(start))
            .unwrap_or_default()
            .iter()
            .map(|&d| i64::try_from(d).unwrap_or(i64::MAX))
            .collect();
        let c = Const::int(dt::INT64, vec![dims.len()], dims);
        self.bind(n.out_name(0)?, Value::Const(Rc::new(c)))
    }

    fn op_gather(&mut self, n: &Node<'_>) -> Result<()> {
        n.check_attrs(&["axis"])?;
        n.arity(2, 2)?;
        let data = self.const_in(n, 0, "data")?;
        let idx = self.const_in(n, 1, "indices")?;
        let r = data.shape.len();
        if r == 0 {
            return n.malformed("gathers from a scalar");
        }
        let axis = n.axis(n.int("axis", 0)?, r)?;
        let Some(indices) = idx.ints() else {
            return n.malformed("indices must be integers");
        };
        let dim = data.shape[axis];
        let mut norm = Vec::with_capacity(indices.len());
        for &i in indices {
            let d = i64::try_from(dim).unwrap_or(i64::MAX);
            let v = if i < 0 { i + d } else { i };
            match usize::try_from(v) {
                Ok(v) if v < dim => norm.push(v),
                _ => return n.malformed(format!("index {i} is outside dimension {dim}")),
            }
        }
        let outer: usize = data.shape[..axis].iter().product();
        let inner: usize = data.shape[axis + 1..].iter().product();
        let mut shape = data.shape[..axis].to_vec();
        shape.extend(&idx.shape);
        shape.extend(&data.shape[axis + 1..]);
        let pick = |o: usize, k: usize| (o * dim + k) * inner;
        let c = match &data.data {
            CData::F(v) => {
                let mut out = Vec::with_capacity(outer * norm.len() * inner);
                for o in 0..outer {
                    for &k in &norm {
                        out.extend_from_slice(v.get(pick(o, k)..pick(o, k) + inner).unwrap_or_default());
                    }
                }
                Const { shape, data: CData::F(out), quant: None, ..(*data).clone() }
            }
            CData::I(v) => {
                let mut out = Vec::with_capacity(outer * norm.len() * inner);
                for o in 0..outer {
                    for &k in &norm {
                        out.extend_from_slice(v.get(pick(o, k)..pick(o, k) + inner).unwrap_or_default());
                    }
                }
                Const { shape, data: CData::I(out), quant: None, ..(*data).clone() }
            }
        };
        self.bind(n.out_name(0)?, Value::Const(Rc::new(c)))
    }

    fn op_cast(&mut self, n: &Node<'_>) -> Result<()> {
        n.check_attrs(&["to", "saturate", "round_mode"])?;
        n.arity(1, 1)?;
        let to = i32::try_from(n.int("to", 0)?).unwrap_or(0);
        let v = self.value(n, 0)?;
        let out = match v {
            Value::Const(c) => {
                let (lo, hi): (i64, i64) = match to {
                    dt::UINT8 => (0, 255),
                    dt::INT8 => (-128, 127),
                    dt::INT16 => (-32768, 32767),
                    dt::UINT16 => (0, 65535),
                    dt::INT32 => (i32::MIN.into(), i32::MAX.into()),
                    _ => (i64::MIN, i64::MAX),
                };
                let c2 = match to {
                    dt::FLOAT | dt::FLOAT16 => Const {
                        ty: dt::FLOAT,
                        shape: c.shape.clone(),
                        data: CData::F(c.floats()),
                        f16: c.f16 || to == dt::FLOAT16,
                        quant: None,
                    },
                    dt::BOOL => Const::int(
                        to,
                        c.shape.clone(),
                        c.floats().iter().map(|&x| i64::from(x != 0.0)).collect(),
                    ),
                    dt::INT64 | dt::INT32 | dt::INT16 | dt::INT8 | dt::UINT8 | dt::UINT16 => {
                        let v: Vec<i64> = match &c.data {
                            // Float → int truncates toward zero; out-of-range is undefined in ONNX.
                            CData::F(v) => v.iter().map(|&x| (x.trunc() as i64).clamp(lo, hi)).collect(),
                            CData::I(v) => v.iter().map(|&x| x.clamp(lo, hi)).collect(),
                        };
                        Const::int(to, c.shape.clone(), v)
                    }
                    other => return n.unsupported(format!("a cast to {}", type_name(other))),
                };
                Value::Const(Rc::new(c2))
            }
            Value::Act(a) => {
                if to != dt::FLOAT || a.u8 || (self.dtype(a.id) == DType::I8 && !a.deq) {
                    return n.unsupported(format!(
                        "a run-time cast to {} (Kiln computes in float32)",
                        type_name(to)
                    ));
                }
                Value::Act(a)
            }
        };
        self.bind(n.out_name(0)?, out)
    }

    // --- quantization helpers --------------------------------------------------------------------

    /// Parameters of a QuantizeLinear / DequantizeLinear node. `x_ty` is the quantized type of
    /// a DequantizeLinear's input.
    fn qparams(&self, n: &Node<'_>, x_ty: Option<i32>) -> Result<QParams> {
        n.check_attrs(&["axis", "saturate", "block_size", "output_dtype", "precision"])?;
        n.arity(2, 3)?;
        if n.int("block_size", 0)? != 0 {
            return n.unsupported("blocked quantization");
        }
        let precision = n.int("precision", 0)?;
        if precision != 0 && precision != i64::from(dt::FLOAT) {
            return n.unsupported(format!("precision {}", type_name(i32::try_from(precision).unwrap_or(0))));
        }
        let scale = self.const_in(n, 1, "scale")?;
        if !scale.is_float() {
            return n.malformed("its scale is not a float tensor");
        }
        let scales = scale.floats();
        if scales.is_empty() || scale.shape.len() > 1 {
            return n.unsupported(format!("scale of shape {:?} (per-tensor or per-axis only)", scale.shape));
        }
        if let Some(s) = scales.iter().find(|s| !s.is_finite() || **s <= 0.0) {
            return n.malformed(format!("scale {s} is not a positive number"));
        }
        let zp = self.opt_const_in(n, 2, "zero point")?;
        let out_dtype = i32::try_from(n.int("output_dtype", 0)?).unwrap_or(-1);
        let ty = match (&zp, x_ty) {
            (Some(z), _) => z.ty,
            (None, Some(t)) => t,
            (None, None) if out_dtype != 0 => out_dtype,
            (None, None) => dt::UINT8,
        };
        if out_dtype != 0 && out_dtype != ty {
            return n.malformed(format!("output_dtype {} differs from the zero point's type {}", type_name(out_dtype), type_name(ty)));
        }
        if x_ty.is_some_and(|t| t != ty) {
            return n.malformed(format!("its input and zero point have different types ({} and {})", type_name(x_ty.unwrap_or(0)), type_name(ty)));
        }
        if !matches!(ty, dt::INT8 | dt::UINT8 | dt::INT32) {
            return n.unsupported(format!("{} quantization (Kiln quantizes to int8, and uint8 inside the graph)", type_name(ty)));
        }
        let u8 = ty == dt::UINT8;
        let zero_points: Vec<i64> = match &zp {
            Some(z) => {
                let Some(v) = z.ints() else {
                    return n.malformed("its zero point is not an integer tensor");
                };
                if v.len() != scales.len() || z.shape.len() > 1 {
                    return n.malformed(format!("has {} scales but zero point of shape {:?}", scales.len(), z.shape));
                }
                v.iter().map(|&z| if u8 { z - 128 } else { z }).collect()
            }
            None => vec![if u8 { -128 } else { 0 }; scales.len()],
        };
        Ok(QParams {
            scales,
            zero_points,
            axis: n.int("axis", 1)?,
            u8,
        })
    }

    /// The per-tensor (scale, zero point) a QuantizeLinear applies to value `name`, read ahead:
    /// `name`'s only use is a QuantizeLinear's data input (or, with `through`, a Relu / Clip
    /// whose only use is).
    fn next_quant(&self, name: &str, through: bool) -> Option<(f32, i64)> {
        let single = |v: &str| -> Option<usize> {
            if self.outputs.iter().any(|o| o == v) {
                return None;
            }
            match self.consumers.get(v).map(Vec::as_slice) {
                Some([i]) => Some(*i),
                _ => None,
            }
        };
        let mut i = single(name)?;
        let mut node = self.nodes.get(i)?;
        let mut input = name.to_string();
        if through && matches!(node.op_type.as_str(), "Relu" | "Clip") && node.input.first() == Some(&input) {
            input = node.output.first()?.clone();
            i = single(&input)?;
            node = self.nodes.get(i)?;
        }
        if node.op_type != "QuantizeLinear" || !is_default_domain(&node.domain) || node.input.first() != Some(&input) {
            return None;
        }
        let n = Node { index: i, p: node, opset: self.opset };
        let q = self.qparams(&n, None).ok()?;
        if q.scales.len() != 1 || q.zero_points.iter().any(|z| !(-128..=127).contains(z)) {
            return None;
        }
        Some((q.scales[0], q.zero_points[0]))
    }

    fn q_tensor(&mut self, name: &str, shape: Vec<usize>, q: (f32, i64)) -> TensorId {
        let quant = QuantInfo {
            scales: vec![q.0],
            zero_points: vec![q.1],
            axis: 0,
        };
        self.new_tensor(name, DType::I8, shape, Some(quant))
    }

    /// An int8 activation requantized to `q` (an IR QUANTIZE when its quantization differs).
    fn requant(&mut self, a: &Act, q: (f32, i64)) -> Act {
        if self.quant_of(a.id) == Some(q) {
            return a.clone();
        }
        let (name, shape) = {
            let t = &self.g.tensors[a.id];
            (format!("{}/requantized", t.name), t.shape.clone())
        };
        let id = self.q_tensor(&name, shape, q);
        self.push(OpKind::Quantize, vec![Some(a.id)], id);
        Act { id, ..a.clone() }
    }

    /// An int8 constant tensor from a dequantized constant's storage.
    fn int8_tensor(&mut self, name: &str, c: &Const) -> Option<TensorId> {
        let q = c.quant.as_ref().filter(|q| q.raw_ty == dt::INT8)?;
        let bytes: Vec<u8> = q.raw.iter().map(|&v| (v.clamp(-128, 127) as i8) as u8).collect();
        let quant = QuantInfo {
            scales: q.scales.clone(),
            zero_points: q.zero_points.clone(),
            axis: if q.scales.len() > 1 { q.axis } else { 0 },
        };
        let shape = if c.shape.is_empty() { vec![1] } else { c.shape.clone() };
        Some(self.const_tensor(name, DType::I8, shape, bytes, Some(quant)))
    }

    /// An int32 bias for an int8 op: `round(bias / (input_scale * weight_scale[c]))`.
    fn int32_bias(&mut self, name: &str, bias: &[f32], s_in: f32, w_scales: &[f32]) -> TensorId {
        let v: Vec<u8> = bias
            .iter()
            .enumerate()
            .flat_map(|(c, &b)| {
                let sw = w_scales.get(c).or(w_scales.first()).copied().unwrap_or(1.0);
                let q = (f64::from(b) / (f64::from(s_in) * f64::from(sw))).round();
                (q.clamp(f64::from(i32::MIN), f64::from(i32::MAX)) as i32).to_le_bytes()
            })
            .collect();
        self.const_tensor(name, DType::I32, vec![bias.len()], v, None)
    }

    // --- fusion ----------------------------------------------------------------------------------

    /// Fuses a RELU-like activation into the op writing `a`, when nothing else reads it.
    fn fuse(&mut self, a: &Act, act: Activation) -> bool {
        if a.cols.is_some() || !self.private(a.id) || (self.dtype(a.id) == DType::I8 && !a.deq) {
            return false;
        }
        let Some(&op) = self.producer.get(&a.id) else {
            return false;
        };
        match &mut self.g.ops[op].kind {
            OpKind::Conv2d { activation, .. }
            | OpKind::DepthwiseConv2d { activation, .. }
            | OpKind::FullyConnected { activation }
            | OpKind::Add { activation }
            | OpKind::Mul { activation }
            | OpKind::AveragePool2d { activation, .. }
            | OpKind::MaxPool2d { activation, .. }
                if *activation == Activation::None =>
            {
                *activation = act;
                true
            }
            _ => false,
        }
    }

    /// The float Conv / depthwise conv / FullyConnected writing `a`, when its weights and bias
    /// may be changed (nothing else reads its output, no fused activation).
    fn foldable(&self, a: &Act) -> Option<usize> {
        if a.cols.is_some() || a.deq || self.dtype(a.id) != DType::F32 || !self.private(a.id) {
            return None;
        }
        let &op = self.producer.get(&a.id)?;
        let o = self.g.ops.get(op)?;
        let ok = matches!(
            o.kind,
            OpKind::Conv2d { activation: Activation::None, .. }
                | OpKind::DepthwiseConv2d { activation: Activation::None, .. }
                | OpKind::FullyConnected { activation: Activation::None }
        );
        let f = o.inputs.get(1).copied().flatten()?;
        let t = self.g.tensors.get(f)?;
        (ok && t.dtype == DType::F32 && t.data.is_some()).then_some(op)
    }

    /// A constant as one value per channel of `a` (its last physical axis), when it broadcasts
    /// against `a` that way.
    fn per_channel(&self, a: &Act, c: &Const) -> Option<Vec<f32>> {
        let r = a.rank();
        if c.shape.len() > r || a.cols.is_some() {
            return None;
        }
        let ch = *a.perm.last()?;
        let n = *a.shape.get(ch)?;
        for (k, &d) in c.shape.iter().enumerate() {
            let axis = r - c.shape.len() + k;
            if d != 1 && !(axis == ch && d == n) {
                return None;
            }
        }
        let v = c.floats();
        match v.len() {
            1 => Some(vec![v[0]; n]),
            l if l == n => Some(v),
            _ => None,
        }
    }

    /// Folds `y * scale + shift` (per output channel) into op `op`'s weights and bias.
    fn fold_affine(&mut self, op: usize, scale: Option<&[f32]>, shift: &[f32]) {
        let channels = shift.len();
        let (depthwise, inputs) = {
            let o = &self.g.ops[op];
            (matches!(o.kind, OpKind::DepthwiseConv2d { .. }), o.inputs.clone())
        };
        if let (Some(s), Some(Some(f))) = (scale, inputs.get(1)) {
            if let Some(data) = self.g.tensors[*f].data.as_deref() {
                let mut w = f32s(data);
                let inner = (w.len() / channels.max(1)).max(1);
                for (i, x) in w.iter_mut().enumerate() {
                    let c = if depthwise { i % channels.max(1) } else { i / inner };
                    *x *= s.get(c).copied().unwrap_or(1.0);
                }
                self.g.tensors[*f].data = Some(f32_bytes(&w));
            }
        }
        let bias_id = inputs.get(2).copied().flatten();
        let old = bias_id
            .and_then(|b| self.g.tensors[b].data.as_deref().map(f32s))
            .unwrap_or_else(|| vec![0.0; channels]);
        let new: Vec<f32> = (0..channels)
            .map(|c| {
                old.get(c).copied().unwrap_or(0.0) * scale.and_then(|s| s.get(c)).copied().unwrap_or(1.0)
                    + shift[c]
            })
            .collect();
        match bias_id {
            Some(b) => self.g.tensors[b].data = Some(f32_bytes(&new)),
            None => {
                let name = format!("{}/bias", self.g.tensors[self.g.ops[op].outputs[0]].name);
                let b = self.f32_tensor(&name, vec![channels], &new, false);
                let o = &mut self.g.ops[op];
                o.inputs.resize(2, None);
                o.inputs.push(Some(b));
                *self.readers.entry(b).or_default() += 1;
            }
        }
    }

    // --- convolution and pooling -----------------------------------------------------------------

    /// Output size and padding of a sliding window op over 1 or 2 spatial dimensions (1-D is
    /// mapped to a 2-D window of height 1).
    fn window(&self, n: &Node<'_>, input: &[usize], kernel: &[usize], ceil_mode: bool) -> Result<Win> {
        let s = input.len();
        let strides = n.ints("strides")?.unwrap_or_else(|| vec![1; s]);
        let dilations = n.ints("dilations")?.unwrap_or_else(|| vec![1; s]);
        let pads = n.ints("pads")?;
        let auto = n.string("auto_pad")?.unwrap_or_else(|| "NOTSET".into());
        if strides.len() != s || dilations.len() != s || kernel.len() != s {
            return n.malformed(format!("strides {strides:?}, dilations {dilations:?} and kernel {kernel:?} must have {s} values"));
        }
        if pads.as_ref().is_some_and(|p| p.len() != 2 * s) {
            return n.malformed(format!("pads {:?} must have {} values", pads.unwrap_or_default(), 2 * s));
        }
        let mut w = Win::unit();
        for i in 0..s {
            let d = if s == 1 { 1 } else { i };
            let (Ok(st), Ok(dl)) = (usize::try_from(strides[i]), usize::try_from(dilations[i])) else {
                return n.malformed(format!("negative stride or dilation ({strides:?}, {dilations:?})"));
            };
            let (k, inp) = (kernel[i], input[i]);
            if st == 0 || dl == 0 || k == 0 {
                return n.malformed(format!("strides {strides:?}, dilations {dilations:?} and kernel {kernel:?} must be positive"));
            }
            let eff = (k - 1).saturating_mul(dl).saturating_add(1);
            let (b, e, out) = match auto.as_str() {
                "NOTSET" | "" => {
                    let (pb, pe) = pads.as_ref().map_or((0, 0), |p| (p[i], p[i + s]));
                    let (Ok(b), Ok(e)) = (usize::try_from(pb), usize::try_from(pe)) else {
                        return n.unsupported(format!("negative pads {:?}", pads.unwrap_or_default()));
                    };
                    let padded = inp.saturating_add(b).saturating_add(e);
                    if padded < eff {
                        return n.malformed(format!("window {eff} is larger than the padded input {padded}"));
                    }
                    let out = (padded - eff) / st + 1;
                    if ceil_mode {
                        let mut oc = (padded - eff).div_ceil(st) + 1;
                        if (oc - 1) * st >= inp + b {
                            oc -= 1;
                        }
                        if oc != out {
                            return n.unsupported("ceil_mode=1 where it makes the output larger than floor would");
                        }
                    }
                    (b, e, out)
                }
                "VALID" => {
                    if inp < eff {
                        return n.malformed(format!("window {eff} is larger than the input {inp}"));
                    }
                    (0, 0, (inp - eff) / st + 1)
                }
                "SAME_UPPER" | "SAME_LOWER" => {
                    let out = inp.div_ceil(st);
                    let total = ((out.max(1) - 1) * st + eff).saturating_sub(inp);
                    let b = if auto == "SAME_UPPER" { total / 2 } else { total - total / 2 };
                    (b, total - b, out)
                }
                other => return n.malformed(format!("auto_pad {other:?}")),
            };
            w.input[d] = inp;
            w.kernel[d] = k;
            w.stride[d] = st;
            w.dilation[d] = dl;
            w.begin[d] = b;
            w.end[d] = e;
            w.out[d] = out;
        }
        Ok(w)
    }

    fn op_conv(&mut self, n: &Node<'_>) -> Result<()> {
        n.check_attrs(&["auto_pad", "dilations", "group", "kernel_shape", "pads", "strides"])?;
        n.arity(2, 3)?;
        let x = self.act_in(n, 0)?;
        let w = self.const_in(n, 1, "weights")?;
        let b = self.opt_const_in(n, 2, "bias")?;
        let spatial = x.rank().saturating_sub(2);
        if !(1..=2).contains(&spatial) {
            return n.unsupported(format!("a {}-D input (Kiln runs 1-D and 2-D convolutions)", x.rank()));
        }
        if w.shape.len() != x.rank() || !w.is_float() {
            return n.malformed(format!("weights of shape {:?} for an input of shape {:?}", w.shape, x.shape));
        }
        let (nb, c, o, ci) = (x.shape[0], x.shape[1], w.shape[0], w.shape[1]);
        let k = w.shape[2..].to_vec();
        let group = usize::try_from(n.int("group", 1)?).unwrap_or(0);
        if group == 0 || c % group != 0 || o % group != 0 || ci != c / group {
            return n.malformed(format!("group {group} does not fit {c} input channels, weights {:?}", w.shape));
        }
        if let Some(ks) = n.ints("kernel_shape")? {
            if ks.iter().map(|&v| usize::try_from(v).ok()).collect::<Vec<_>>() != k.iter().map(|&v| Some(v)).collect::<Vec<_>>() {
                return n.malformed(format!("kernel_shape {ks:?} differs from the weights' {k:?}"));
            }
        }
        let win = self.window(n, &x.shape[2..], &k, false)?;
        let bias = match &b {
            Some(b) if b.len() != o || !b.is_float() => {
                return n.malformed(format!("bias of shape {:?} for {o} output channels", b.shape))
            }
            Some(b) => Some(b.floats()),
            None => None,
        };
        let out_name = n.out_name(0)?;
        let depthwise = group > 1 && group == c;
        let w4 = if spatial == 1 { w.reshaped(vec![o, ci, 1, k[0]]) } else { (*w).clone() };
        let filter = if depthwise { w4.permuted(&[1, 2, 3, 0]) } else { w4.permuted(&[0, 2, 3, 1]) };
        let w_axis = if depthwise { 3 } else { 0 };
        let qo = if self.is_q(&x) { self.next_quant(out_name, true) } else { None };
        let qx = self.quant_of(x.id);
        let int8 = match (qo, qx, filter.int8_weights(w_axis)) {
            (Some(qo), Some(qx), Some(wq)) => Some((qo, qx, wq.scales.clone())),
            _ => None,
        };
        if int8.is_none() {
            self.note_float(n, &[&x]);
        }
        let x = if int8.is_some() { x } else { self.float_act(&x) };
        let x4 = if spatial == 1 {
            let l = x.shape[2];
            self.reshape_act(&x, &[nb, c, 1, l])
        } else {
            x
        };
        let mut x4 = self.to_layout(&x4, &[0, 2, 3, 1]);
        let padding = match win.padding() {
            Some(p) => p,
            None => {
                let shape = vec![nb, win.input[0] + win.begin[0] + win.end[0], win.input[1] + win.begin[1] + win.end[1], c];
                let out = self.derived(x4.id, "padded", shape);
                let paddings = vec![[0, 0], [win.begin[0], win.end[0]], [win.begin[1], win.end[1]], [0, 0]];
                self.push(OpKind::Pad { paddings }, vec![Some(x4.id)], out);
                x4.id = out;
                Padding::Valid
            }
        };
        let base = if n.p.name.is_empty() { out_name.to_string() } else { n.p.name.clone() };
        let (filter_id, bias_id) = match &int8 {
            Some((_, qx, wscales)) => {
                let f = self.int8_tensor(&format!("{base}/filter"), &filter);
                let bid = bias.as_ref().map(|bv| self.int32_bias(&format!("{base}/bias"), bv, qx.0, wscales));
                (f, bid)
            }
            None => {
                let f = self.f32_tensor(&format!("{base}/filter"), filter.shape.clone(), &filter.floats(), w.f16);
                let bid = bias.as_ref().map(|bv| self.f32_tensor(&format!("{base}/bias"), vec![o], bv, b.as_ref().is_some_and(|b| b.f16)));
                (Some(f), bid)
            }
        };
        let Some(filter_id) = filter_id else {
            return n.malformed("int8 weights are missing");
        };
        let phys = vec![nb, win.out[0], win.out[1], o];
        let out = match &int8 {
            Some((qo, ..)) => self.q_tensor(out_name, phys, *qo),
            None => self.new_tensor(out_name, DType::F32, phys, None),
        };
        let kind = if depthwise {
            OpKind::DepthwiseConv2d {
                stride: win.stride,
                dilation: win.dilation,
                padding,
                depth_multiplier: o / c.max(1),
                activation: Activation::None,
            }
        } else {
            OpKind::Conv2d {
                stride: win.stride,
                dilation: win.dilation,
                padding,
                activation: Activation::None,
            }
        };
        self.push(kind, vec![Some(x4.id), Some(filter_id), bias_id], out);
        let y = Act {
            id: out,
            shape: vec![nb, o, win.out[0], win.out[1]],
            perm: vec![0, 2, 3, 1],
            cols: None,
            deq: int8.is_some(),
            u8: false,
        };
        let y = if spatial == 1 { self.reshape_act(&y, &[nb, o, win.out[1]]) } else { y };
        self.bind(out_name, Value::Act(y))
    }

    fn op_pool(&mut self, n: &Node<'_>) -> Result<()> {
        let max = n.op() == "MaxPool";
        if max {
            n.check_attrs(&["auto_pad", "ceil_mode", "dilations", "kernel_shape", "pads", "storage_order", "strides"])?;
        } else {
            n.check_attrs(&["auto_pad", "ceil_mode", "count_include_pad", "dilations", "kernel_shape", "pads", "strides"])?;
        }
        n.arity(1, 1)?;
        let x = self.act_in(n, 0)?;
        let spatial = x.rank().saturating_sub(2);
        if !(1..=2).contains(&spatial) {
            return n.unsupported(format!("a {}-D input (Kiln pools over 1 or 2 dimensions)", x.rank()));
        }
        let Some(ks) = n.ints("kernel_shape")? else {
            return n.malformed("has no kernel_shape");
        };
        let mut kernel = Vec::with_capacity(ks.len());
        for &k in &ks {
            match usize::try_from(k) {
                Ok(k) if k > 0 => kernel.push(k),
                _ => return n.malformed(format!("kernel_shape {ks:?}")),
            }
        }
        if n.ints("dilations")?.is_some_and(|d| d.iter().any(|&v| v != 1)) {
            return n.unsupported("dilated pooling");
        }
        let ceil_mode = n.int("ceil_mode", 0)? != 0;
        let win = self.window(n, &x.shape[2..], &kernel, ceil_mode)?;
        let Some(padding) = win.padding() else {
            return n.unsupported(format!(
                "pads {:?} / auto_pad that are neither VALID nor SAME as TFLite pads (extra cell at \
                 the end); pooling cannot take an explicit pad",
                n.ints("pads")?.unwrap_or_default()
            ));
        };
        // Whether some window reaches past the input.
        let padded = padding == Padding::Same
            && (0..2).any(|i| (win.out[i] - 1) * win.stride[i] + win.kernel[i] > win.input[i]);
        if !max && padded && n.int("count_include_pad", 0)? != 0 {
            return n.unsupported("count_include_pad=1 with padding (Kiln averages over the real cells only)");
        }
        let (nb, c) = (x.shape[0], x.shape[1]);
        let out_name = n.out_name(0)?;
        let int8 = self.is_q(&x) && (max || self.next_quant(out_name, true).is_some());
        if !int8 {
            self.note_float(n, &[&x]);
        }
        let x = if int8 { x } else { self.float_act(&x) };
        let x4 = if spatial == 1 {
            let l = x.shape[2];
            self.reshape_act(&x, &[nb, c, 1, l])
        } else {
            x
        };
        let x4 = self.to_layout(&x4, &[0, 2, 3, 1]);
        let out = self.derived(x4.id, "pooled", vec![nb, win.out[0], win.out[1], c]);
        self.g.tensors[out].name = out_name.to_string();
        let (filter, stride) = (win.kernel, win.stride);
        let kind = if max {
            OpKind::MaxPool2d { filter, stride, padding, activation: Activation::None }
        } else {
            OpKind::AveragePool2d { filter, stride, padding, activation: Activation::None }
        };
        self.push(kind, vec![Some(x4.id)], out);
        let y = x4.with(out, vec![nb, c, win.out[0], win.out[1]], vec![0, 2, 3, 1]);
        let y = if spatial == 1 { self.reshape_act(&y, &[nb, c, win.out[1]]) } else { y };
        self.bind(out_name, Value::Act(y))
    }

    fn op_global_pool(&mut self, n: &Node<'_>) -> Result<()> {
        n.check_attrs(&[])?;
        n.arity(1, 1)?;
        let x = self.act_in(n, 0)?;
        if x.rank() < 3 {
            return n.malformed(format!("input of shape {:?}", x.shape));
        }
        let axes: Vec<usize> = (2..x.rank()).collect();
        let y = self.mean(n, &x, &axes, true)?;
        self.bind(n.out_name(0)?, Value::Act(y))
    }

    fn op_reduce_mean(&mut self, n: &Node<'_>) -> Result<()> {
        let from_input = n.opset >= 18;
        if from_input {
            n.check_attrs(&["keepdims", "noop_with_empty_axes"])?;
            n.arity(1, 2)?;
        } else {
            n.check_attrs(&["axes", "keepdims"])?;
            n.arity(1, 1)?;
        }
        let x = self.act_in(n, 0)?;
        let list = if from_input { self.ints_in(n, 1, "axes")? } else { n.ints("axes")? };
        let keep = n.int("keepdims", 1)? != 0;
        let mut axes = match list {
            Some(l) if !l.is_empty() => n.axes(&l, x.rank())?,
            _ => {
                if n.int("noop_with_empty_axes", 0)? != 0 {
                    return self.bind(n.out_name(0)?, Value::Act(x));
                }
                identity(x.rank())
            }
        };
        axes.sort_unstable();
        let y = self.mean(n, &x, &axes, keep)?;
        self.bind(n.out_name(0)?, Value::Act(y))
    }

    /// MEAN over logical axes, in the activation's current layout.
    fn mean(&mut self, n: &Node<'_>, x: &Act, axes: &[usize], keep: bool) -> Result<Act> {
        let out_name = n.out_name(0)?;
        let qo = if self.is_q(x) { self.next_quant(out_name, false) } else { None };
        if qo.is_none() {
            self.note_float(n, &[x]);
        }
        let x = if qo.is_some() { self.uncols(x) } else { let f = self.float_act(x); self.uncols(&f) };
        let mut phys_axes: Vec<usize> = axes.iter().filter_map(|a| x.perm.iter().position(|p| p == a)).collect();
        phys_axes.sort_unstable();
        let (shape, perm) = if keep {
            let shape = x.shape.iter().enumerate().map(|(i, &d)| if axes.contains(&i) { 1 } else { d }).collect();
            (shape, x.perm.clone())
        } else {
            let shape: Vec<usize> = x.shape.iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, &d)| d).collect();
            let perm: Vec<usize> = x
                .perm
                .iter()
                .filter(|p| !axes.contains(p))
                .map(|&p| p - axes.iter().filter(|&&a| a < p).count())
                .collect();
            (shape, perm)
        };
        let phys = phys_shape(&shape, &perm);
        let out = match qo {
            Some(q) => self.q_tensor(out_name, phys, q),
            None => self.new_tensor(out_name, DType::F32, phys, None),
        };
        self.push(OpKind::Mean { axes: phys_axes, keep_dims: keep }, vec![Some(x.id)], out);
        Ok(Act {
            id: out,
            shape,
            perm,
            cols: None,
            deq: qo.is_some(),
            u8: false,
        })
    }
