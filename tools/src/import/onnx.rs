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

/// Largest padding Kiln accepts on one side of one dimension.
const MAX_PAD: usize = 1 << 16;
/// Largest constant (elements) that folding may create.
const MAX_FOLDED: usize = 1 << 26;

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
    perm.iter()
        .map(|&p| shape.get(p).copied().unwrap_or(1))
        .collect()
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
        let da = if i + a.len() >= r {
            a[i + a.len() - r]
        } else {
            1
        };
        let db = if i + b.len() >= r {
            b[i + b.len() - r]
        } else {
            1
        };
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
        let per_axis_ok = q.scales.len() == 1
            || (q.axis == axis && self.shape.get(axis) == Some(&q.scales.len()));
        (q.raw_ty == dt::INT8 && q.zero_points.iter().all(|&z| z == 0) && per_axis_ok).then_some(q)
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
                        let v =
                            u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
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
                return self.unsupported(format!(
                    "attribute '{}' refers to a function attribute",
                    a.name
                ));
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
        if (a.r#type != at::UNDEFINED && a.r#type != want)
            || (a.r#type == at::UNDEFINED && !present)
        {
            return self.malformed(format!(
                "attribute '{name}' has type {}, expected {want}",
                a.r#type
            ));
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
        Ok(self
            .typed(name, at::FLOATS, true)?
            .map(|a| a.floats.clone()))
    }

    fn string(&self, name: &str) -> Result<Option<String>> {
        let present = self.attr(name).is_some_and(|a| a.s.is_some());
        Ok(self
            .typed(name, at::STRING, present)?
            .map(|a| String::from_utf8_lossy(a.s.as_deref().unwrap_or_default()).into_owned()))
    }

    fn tensor(&self, name: &str) -> Result<Option<&pb::TensorProto>> {
        let present = self.attr(name).is_some_and(|a| a.t.is_some());
        Ok(self
            .typed(name, at::TENSOR, present)?
            .and_then(|a| a.t.as_ref()))
    }

    /// Name of input `i`, `None` when absent or empty.
    fn in_name(&self, i: usize) -> Option<&str> {
        self.p
            .input
            .get(i)
            .map(String::as_str)
            .filter(|s| !s.is_empty())
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
            if cx
                .values
                .insert(t.name.clone(), Value::Const(Rc::new(c)))
                .is_some()
            {
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
        if cx.g.inputs.is_empty() {
            return unsupported("the graph has no run-time inputs (it only computes constants)");
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
        self.consumers.get(name).map_or(0, Vec::len)
            + self.outputs.iter().filter(|o| *o == name).count()
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
                return n.unsupported(format!(
                    "output '{extra}' is used (Kiln computes only the first output)"
                ));
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
            _ => n.malformed(format!(
                "its {role} must be a single value, has shape {:?}",
                c.shape
            )),
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
        let shape = if c.shape.is_empty() {
            vec![1]
        } else {
            c.shape.clone()
        };
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
        Some((
            *q.scales.first()?,
            q.zero_points.first().copied().unwrap_or(0),
        ))
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
        let logical = self.in_layout(&full, &identity(shape.len()));
        let id = self.phys_reshape(logical.id, a.shape.clone());
        a.with(id, a.shape.clone(), identity(2))
    }

    /// The activation stored in physical layout `target`.
    fn in_layout(&mut self, a: &Act, target: &[usize]) -> Act {
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
                let logical = self.in_layout(&a, &identity(a.rank()));
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
                    return unsupported(format!(
                        "{what} is a constant of type {}",
                        type_name(c.ty)
                    ));
                }
                let shape = if c.shape.is_empty() {
                    vec![1]
                } else {
                    c.shape.clone()
                };
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
        a = self.in_layout(&a, &perm);
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
        if let Some(pb::type_proto::Value::TensorType(t)) =
            vi.r#type.as_ref().and_then(|t| t.value.as_ref())
        {
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
                    && declared
                        .iter()
                        .zip(&a.shape)
                        .all(|(d, &s)| d.is_none_or(|d| d == s));
                if !(fits || declared.is_empty() && a.shape.is_empty()) {
                    return malformed(format!(
                        "{what} is declared with shape {:?} but computes to {:?}",
                        s.dim
                            .iter()
                            .map(|d| match &d.value {
                                Some(pb::tensor_shape_proto::dimension::Value::DimValue(v)) =>
                                    v.to_string(),
                                Some(pb::tensor_shape_proto::dimension::Value::DimParam(p)) =>
                                    p.clone(),
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
        let mut ids: Vec<TensorId> = self
            .f16_consts
            .iter()
            .copied()
            .filter(|id| live.contains(id))
            .collect();
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
            let bytes: Vec<u8> = v
                .iter()
                .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                .collect();
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
        n.check_attrs(&[
            "value",
            "value_float",
            "value_floats",
            "value_int",
            "value_ints",
            "sparse_value",
            "value_string",
            "value_strings",
        ])?;
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
            Some(c) if c <= MAX_FOLDED => c,
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
                        out.extend_from_slice(
                            v.get(pick(o, k)..pick(o, k) + inner).unwrap_or_default(),
                        );
                    }
                }
                Const {
                    shape,
                    data: CData::F(out),
                    quant: None,
                    ..(*data).clone()
                }
            }
            CData::I(v) => {
                let mut out = Vec::with_capacity(outer * norm.len() * inner);
                for o in 0..outer {
                    for &k in &norm {
                        out.extend_from_slice(
                            v.get(pick(o, k)..pick(o, k) + inner).unwrap_or_default(),
                        );
                    }
                }
                Const {
                    shape,
                    data: CData::I(out),
                    quant: None,
                    ..(*data).clone()
                }
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
                            CData::F(v) => v
                                .iter()
                                .map(|&x| (x.trunc() as i64).clamp(lo, hi))
                                .collect(),
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
        n.check_attrs(&[
            "axis",
            "saturate",
            "block_size",
            "output_dtype",
            "precision",
        ])?;
        n.arity(2, 3)?;
        if n.int("block_size", 0)? != 0 {
            return n.unsupported("blocked quantization");
        }
        let precision = n.int("precision", 0)?;
        if precision != 0 && precision != i64::from(dt::FLOAT) {
            return n.unsupported(format!(
                "precision {}",
                type_name(i32::try_from(precision).unwrap_or(0))
            ));
        }
        let scale = self.const_in(n, 1, "scale")?;
        if !scale.is_float() {
            return n.malformed("its scale is not a float tensor");
        }
        let scales = scale.floats();
        if scales.is_empty() || scale.shape.len() > 1 {
            return n.unsupported(format!(
                "scale of shape {:?} (per-tensor or per-axis only)",
                scale.shape
            ));
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
            return n.malformed(format!(
                "output_dtype {} differs from the zero point's type {}",
                type_name(out_dtype),
                type_name(ty)
            ));
        }
        if x_ty.is_some_and(|t| t != ty) {
            return n.malformed(format!(
                "its input and zero point have different types ({} and {})",
                type_name(x_ty.unwrap_or(0)),
                type_name(ty)
            ));
        }
        if !matches!(ty, dt::INT8 | dt::UINT8 | dt::INT32) {
            return n.unsupported(format!(
                "{} quantization (Kiln quantizes to int8, and uint8 inside the graph)",
                type_name(ty)
            ));
        }
        let u8 = ty == dt::UINT8;
        let zero_points: Vec<i64> = match &zp {
            Some(z) => {
                let Some(v) = z.ints() else {
                    return n.malformed("its zero point is not an integer tensor");
                };
                if v.len() != scales.len() || z.shape.len() > 1 {
                    return n.malformed(format!(
                        "has {} scales but zero point of shape {:?}",
                        scales.len(),
                        z.shape
                    ));
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
        if through
            && matches!(node.op_type.as_str(), "Relu" | "Clip")
            && node.input.first() == Some(&input)
        {
            input = node.output.first()?.clone();
            i = single(&input)?;
            node = self.nodes.get(i)?;
        }
        if node.op_type != "QuantizeLinear"
            || !is_default_domain(&node.domain)
            || node.input.first() != Some(&input)
        {
            return None;
        }
        let n = Node {
            index: i,
            p: node,
            opset: self.opset,
        };
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
        let bytes: Vec<u8> = q
            .raw
            .iter()
            .map(|&v| (v.clamp(-128, 127) as i8) as u8)
            .collect();
        let quant = QuantInfo {
            scales: q.scales.clone(),
            zero_points: q.zero_points.clone(),
            axis: if q.scales.len() > 1 { q.axis } else { 0 },
        };
        let shape = if c.shape.is_empty() {
            vec![1]
        } else {
            c.shape.clone()
        };
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
            OpKind::Conv2d {
                activation: Activation::None,
                ..
            } | OpKind::DepthwiseConv2d {
                activation: Activation::None,
                ..
            } | OpKind::FullyConnected {
                activation: Activation::None
            }
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
            (
                matches!(o.kind, OpKind::DepthwiseConv2d { .. }),
                o.inputs.clone(),
            )
        };
        if let (Some(s), Some(Some(f))) = (scale, inputs.get(1)) {
            if let Some(data) = self.g.tensors[*f].data.as_deref() {
                let mut w = f32s(data);
                let inner = (w.len() / channels.max(1)).max(1);
                for (i, x) in w.iter_mut().enumerate() {
                    let c = if depthwise {
                        i % channels.max(1)
                    } else {
                        i / inner
                    };
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
                old.get(c).copied().unwrap_or(0.0)
                    * scale.and_then(|s| s.get(c)).copied().unwrap_or(1.0)
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
    fn window(
        &self,
        n: &Node<'_>,
        input: &[usize],
        kernel: &[usize],
        ceil_mode: bool,
    ) -> Result<Win> {
        let s = input.len();
        let strides = n.ints("strides")?.unwrap_or_else(|| vec![1; s]);
        let dilations = n.ints("dilations")?.unwrap_or_else(|| vec![1; s]);
        let pads = n.ints("pads")?;
        let auto = n.string("auto_pad")?.unwrap_or_else(|| "NOTSET".into());
        if strides.len() != s || dilations.len() != s || kernel.len() != s {
            return n.malformed(format!("strides {strides:?}, dilations {dilations:?} and kernel {kernel:?} must have {s} values"));
        }
        if pads.as_ref().is_some_and(|p| p.len() != 2 * s) {
            return n.malformed(format!(
                "pads {:?} must have {} values",
                pads.unwrap_or_default(),
                2 * s
            ));
        }
        let mut w = Win::unit();
        for i in 0..s {
            let d = if s == 1 { 1 } else { i };
            let (Ok(st), Ok(dl)) = (usize::try_from(strides[i]), usize::try_from(dilations[i]))
            else {
                return n.malformed(format!(
                    "negative stride or dilation ({strides:?}, {dilations:?})"
                ));
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
                        return n
                            .unsupported(format!("negative pads {:?}", pads.unwrap_or_default()));
                    };
                    if b.max(e) > MAX_PAD {
                        return n.unsupported(format!(
                            "pads {:?} (at most {MAX_PAD})",
                            pads.unwrap_or_default()
                        ));
                    }
                    let padded = inp.saturating_add(b).saturating_add(e);
                    if padded < eff {
                        return n.malformed(format!(
                            "window {eff} is larger than the padded input {padded}"
                        ));
                    }
                    let out = (padded - eff) / st + 1;
                    if ceil_mode {
                        let mut oc = (padded - eff).div_ceil(st) + 1;
                        if (oc - 1) * st >= inp + b {
                            oc -= 1;
                        }
                        if oc != out {
                            return n.unsupported(
                                "ceil_mode=1 where it makes the output larger than floor would",
                            );
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
                    let b = if auto == "SAME_UPPER" {
                        total / 2
                    } else {
                        total - total / 2
                    };
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
        n.check_attrs(&[
            "auto_pad",
            "dilations",
            "group",
            "kernel_shape",
            "pads",
            "strides",
        ])?;
        n.arity(2, 3)?;
        let x = self.act_in(n, 0)?;
        let w = self.const_in(n, 1, "weights")?;
        let b = self.opt_const_in(n, 2, "bias")?;
        let spatial = x.rank().saturating_sub(2);
        if !(1..=2).contains(&spatial) {
            return n.unsupported(format!(
                "a {}-D input (Kiln runs 1-D and 2-D convolutions)",
                x.rank()
            ));
        }
        if w.shape.len() != x.rank() || !w.is_float() {
            return n.malformed(format!(
                "weights of shape {:?} for an input of shape {:?}",
                w.shape, x.shape
            ));
        }
        let (nb, c, o, ci) = (x.shape[0], x.shape[1], w.shape[0], w.shape[1]);
        let k = w.shape[2..].to_vec();
        let group = usize::try_from(n.int("group", 1)?).unwrap_or(0);
        if group == 0 || c % group != 0 || o % group != 0 || ci != c / group {
            return n.malformed(format!(
                "group {group} does not fit {c} input channels, weights {:?}",
                w.shape
            ));
        }
        if let Some(ks) = n.ints("kernel_shape")? {
            if ks
                .iter()
                .map(|&v| usize::try_from(v).ok())
                .collect::<Vec<_>>()
                != k.iter().map(|&v| Some(v)).collect::<Vec<_>>()
            {
                return n.malformed(format!(
                    "kernel_shape {ks:?} differs from the weights' {k:?}"
                ));
            }
        }
        let win = self.window(n, &x.shape[2..], &k, false)?;
        let bias = match &b {
            Some(b) if b.len() != o || !b.is_float() => {
                return n.malformed(format!(
                    "bias of shape {:?} for {o} output channels",
                    b.shape
                ))
            }
            Some(b) => Some(b.floats()),
            None => None,
        };
        let out_name = n.out_name(0)?;
        let depthwise = group > 1 && group == c;
        let w4 = if spatial == 1 {
            w.reshaped(vec![o, ci, 1, k[0]])
        } else {
            (*w).clone()
        };
        let filter = if depthwise {
            w4.permuted(&[1, 2, 3, 0])
        } else {
            w4.permuted(&[0, 2, 3, 1])
        };
        let w_axis = if depthwise { 3 } else { 0 };
        let qo = if self.is_q(&x) {
            self.next_quant(out_name, true)
        } else {
            None
        };
        let qx = self.quant_of(x.id);
        let int8 = match (qo, qx, filter.int8_weights(w_axis)) {
            (Some(qo), Some(qx), Some(wq)) => Some((qo, qx, wq.scales.clone())),
            _ => None,
        };
        if int8.is_none() {
            self.note_float(n, &[&x]);
        }
        let x = if int8.is_some() {
            x
        } else {
            self.float_act(&x)
        };
        let x4 = if spatial == 1 {
            let l = x.shape[2];
            self.reshape_act(&x, &[nb, c, 1, l])
        } else {
            x
        };
        let mut x4 = self.in_layout(&x4, &[0, 2, 3, 1]);
        let padding = match win.padding() {
            Some(p) => p,
            None => {
                let shape = vec![
                    nb,
                    win.input[0] + win.begin[0] + win.end[0],
                    win.input[1] + win.begin[1] + win.end[1],
                    c,
                ];
                let out = self.derived(x4.id, "padded", shape);
                let paddings = vec![
                    [0, 0],
                    [win.begin[0], win.end[0]],
                    [win.begin[1], win.end[1]],
                    [0, 0],
                ];
                self.push(OpKind::Pad { paddings }, vec![Some(x4.id)], out);
                x4.id = out;
                Padding::Valid
            }
        };
        let base = if n.p.name.is_empty() {
            out_name.to_string()
        } else {
            n.p.name.clone()
        };
        let (filter_id, bias_id) = match &int8 {
            Some((_, qx, wscales)) => {
                let f = self.int8_tensor(&format!("{base}/filter"), &filter);
                let bid = bias
                    .as_ref()
                    .map(|bv| self.int32_bias(&format!("{base}/bias"), bv, qx.0, wscales));
                (f, bid)
            }
            None => {
                let f = self.f32_tensor(
                    &format!("{base}/filter"),
                    filter.shape.clone(),
                    &filter.floats(),
                    w.f16,
                );
                let bid = bias.as_ref().map(|bv| {
                    self.f32_tensor(
                        &format!("{base}/bias"),
                        vec![o],
                        bv,
                        b.as_ref().is_some_and(|b| b.f16),
                    )
                });
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
        let y = if spatial == 1 {
            self.reshape_act(&y, &[nb, o, win.out[1]])
        } else {
            y
        };
        self.bind(out_name, Value::Act(y))
    }

    fn op_pool(&mut self, n: &Node<'_>) -> Result<()> {
        let max = n.op() == "MaxPool";
        if max {
            n.check_attrs(&[
                "auto_pad",
                "ceil_mode",
                "dilations",
                "kernel_shape",
                "pads",
                "storage_order",
                "strides",
            ])?;
        } else {
            n.check_attrs(&[
                "auto_pad",
                "ceil_mode",
                "count_include_pad",
                "dilations",
                "kernel_shape",
                "pads",
                "strides",
            ])?;
        }
        n.arity(1, 1)?;
        let x = self.act_in(n, 0)?;
        let spatial = x.rank().saturating_sub(2);
        if !(1..=2).contains(&spatial) {
            return n.unsupported(format!(
                "a {}-D input (Kiln pools over 1 or 2 dimensions)",
                x.rank()
            ));
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
        if n.ints("dilations")?
            .is_some_and(|d| d.iter().any(|&v| v != 1))
        {
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
            && (0..2).any(|i| {
                win.out[i].saturating_sub(1) * win.stride[i] + win.kernel[i] > win.input[i]
            });
        if !max && padded && n.int("count_include_pad", 0)? != 0 {
            return n.unsupported(
                "count_include_pad=1 with padding (Kiln averages over the real cells only)",
            );
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
        let x4 = self.in_layout(&x4, &[0, 2, 3, 1]);
        let out = self.derived(x4.id, "pooled", vec![nb, win.out[0], win.out[1], c]);
        self.g.tensors[out].name = out_name.to_string();
        let (filter, stride) = (win.kernel, win.stride);
        let kind = if max {
            OpKind::MaxPool2d {
                filter,
                stride,
                padding,
                activation: Activation::None,
            }
        } else {
            OpKind::AveragePool2d {
                filter,
                stride,
                padding,
                activation: Activation::None,
            }
        };
        self.push(kind, vec![Some(x4.id)], out);
        let y = x4.with(out, vec![nb, c, win.out[0], win.out[1]], vec![0, 2, 3, 1]);
        let y = if spatial == 1 {
            self.reshape_act(&y, &[nb, c, win.out[1]])
        } else {
            y
        };
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
        let list = if from_input {
            self.ints_in(n, 1, "axes")?
        } else {
            n.ints("axes")?
        };
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
        let qo = if self.is_q(x) {
            self.next_quant(out_name, false)
        } else {
            None
        };
        if qo.is_none() {
            self.note_float(n, &[x]);
        }
        let x = if qo.is_some() {
            self.uncols(x)
        } else {
            let f = self.float_act(x);
            self.uncols(&f)
        };
        let mut phys_axes: Vec<usize> = axes
            .iter()
            .filter_map(|a| x.perm.iter().position(|p| p == a))
            .collect();
        phys_axes.sort_unstable();
        let (shape, perm) = if keep {
            let shape = x
                .shape
                .iter()
                .enumerate()
                .map(|(i, &d)| if axes.contains(&i) { 1 } else { d })
                .collect();
            (shape, x.perm.clone())
        } else {
            let shape: Vec<usize> = x
                .shape
                .iter()
                .enumerate()
                .filter(|(i, _)| !axes.contains(i))
                .map(|(_, &d)| d)
                .collect();
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
        self.push(
            OpKind::Mean {
                axes: phys_axes,
                keep_dims: keep,
            },
            vec![Some(x.id)],
            out,
        );
        Ok(Act {
            id: out,
            shape,
            perm,
            cols: None,
            deq: qo.is_some(),
            u8: false,
        })
    }

    // --- matrix products -------------------------------------------------------------------------

    fn op_gemm(&mut self, n: &Node<'_>) -> Result<()> {
        let gemm = n.op() == "Gemm";
        if gemm {
            n.check_attrs(&["alpha", "beta", "transA", "transB"])?;
            n.arity(2, 3)?;
        } else {
            n.check_attrs(&[])?;
            n.arity(2, 2)?;
        }
        let alpha = n.float("alpha", 1.0)?;
        let beta = n.float("beta", 1.0)?;
        let (ta, tb) = (n.int("transA", 0)? != 0, n.int("transB", 0)? != 0);
        let mut a = match self.value(n, 0)? {
            Value::Act(a) => a,
            Value::Const(_) if matches!(self.value(n, 1)?, Value::Act(_)) => {
                return n.unsupported("a constant first input times a run-time second input")
            }
            Value::Const(c) => self.const_act(n, &c)?,
        };
        let b = self.const_in(n, 1, "second input (the weights)")?;
        if b.shape.len() != 2 || !b.is_float() {
            return n.unsupported(format!(
                "a second input of shape {:?} (Kiln needs 2-D float weights)",
                b.shape
            ));
        }
        if (gemm && a.rank() != 2) || a.rank() < 2 {
            return n.unsupported(format!("a first input of shape {:?}", a.shape));
        }
        if ta {
            a = self.transposed(&a, &[1, 0]);
        }
        let (k, nout) = if tb {
            (b.shape[1], b.shape[0])
        } else {
            (b.shape[0], b.shape[1])
        };
        if a.shape.last() != Some(&k) {
            return n.malformed(format!(
                "inner dimensions differ: {:?} times {:?}",
                a.shape, b.shape
            ));
        }
        let mut wt = if tb {
            (*b).clone()
        } else {
            b.permuted(&[1, 0])
        };
        // C: a bias per output column, or a general addend.
        let mut bias: Option<Vec<f32>> = None;
        let mut addend: Option<Const> = None;
        let mut bias_f16 = false;
        if gemm {
            if let Some(c) = self.opt_value(n, 2)? {
                let Value::Const(c) = c else {
                    return n.unsupported("a run-time C input");
                };
                let m = a.shape[0];
                let v: Vec<f32> = c.floats().iter().map(|x| x * beta).collect();
                if broadcast(&c.shape, &[m, nout]).as_deref() != Some(&[m, nout][..]) {
                    return n.malformed(format!(
                        "C of shape {:?} does not broadcast to [{m}, {nout}]",
                        c.shape
                    ));
                }
                let per_col = c.shape.len() < 2 || c.shape[0] == 1;
                if per_col {
                    let last = c.shape.last().copied().unwrap_or(1);
                    bias = Some(if last == 1 {
                        vec![v.first().copied().unwrap_or(0.0); nout]
                    } else {
                        v
                    });
                    bias_f16 = c.f16;
                } else {
                    addend = Some(Const::float(c.shape.clone(), v));
                }
            }
        }
        let out_name = n.out_name(0)?;
        let qo = if self.is_q(&a) && addend.is_none() {
            self.next_quant(out_name, true)
        } else {
            None
        };
        let qa = self.quant_of(a.id);
        let int8 = match (qo, qa, wt.int8_weights(0)) {
            (Some(qo), Some(qa), Some(wq)) => Some((
                qo,
                qa,
                wq.scales
                    .iter()
                    .map(|s| s * alpha.abs())
                    .collect::<Vec<f32>>(),
            )),
            _ => None,
        };
        if int8.is_none() {
            self.note_float(n, &[&a]);
            a = self.float_act(&a);
        }
        if alpha < 0.0 && int8.is_some() {
            if let Some(q) = wt.quant.as_mut() {
                q.raw.iter_mut().for_each(|r| *r = (-*r).clamp(-127, 127));
            }
        }
        // Input columns stored out of order: permute the weights' columns instead of the data.
        match a.cols.clone() {
            Some(cols) => {
                let map = cols.logical_columns();
                let permute_cols = |v: &[f32]| -> Vec<f32> {
                    (0..nout)
                        .flat_map(|r| map.iter().map(move |&j| (r, j)))
                        .map(|(r, j)| v.get(r * k + j).copied().unwrap_or(0.0))
                        .collect()
                };
                let permute_raw = |v: &[i64]| -> Vec<i64> {
                    (0..nout)
                        .flat_map(|r| map.iter().map(move |&j| (r, j)))
                        .map(|(r, j)| v.get(r * k + j).copied().unwrap_or(0))
                        .collect()
                };
                wt.data = CData::F(permute_cols(&wt.floats()));
                if let Some(q) = wt.quant.as_mut() {
                    q.raw = permute_raw(&q.raw);
                }
            }
            None => {
                let id = identity(a.rank());
                a = self.in_layout(&a, &id);
            }
        }
        let base = if n.p.name.is_empty() {
            out_name.to_string()
        } else {
            n.p.name.clone()
        };
        let (w_id, b_id) = match &int8 {
            Some((_, qa, ws)) => {
                let w = self.int8_tensor(&format!("{base}/weights"), &wt);
                if let (Some(w), Some(q)) = (
                    w,
                    self.g
                        .tensors
                        .get_mut(w.unwrap_or(0))
                        .and_then(|t| t.quant.as_mut()),
                ) {
                    let _ = w;
                    q.scales.clone_from(ws);
                }
                let b = bias
                    .as_ref()
                    .map(|bv| self.int32_bias(&format!("{base}/bias"), bv, qa.0, ws));
                (w, b)
            }
            None => {
                let v: Vec<f32> = wt.floats().iter().map(|x| x * alpha).collect();
                let w = self.f32_tensor(
                    &format!("{base}/weights"),
                    vec![nout, k],
                    &v,
                    wt.f16 && alpha == 1.0,
                );
                let b = bias.as_ref().map(|bv| {
                    self.f32_tensor(
                        &format!("{base}/bias"),
                        vec![nout],
                        bv,
                        bias_f16 && beta == 1.0,
                    )
                });
                (Some(w), b)
            }
        };
        let Some(w_id) = w_id else {
            return n.malformed("int8 weights are missing");
        };
        let mut shape = a.shape.clone();
        if let Some(l) = shape.last_mut() {
            *l = nout;
        }
        let out = match &int8 {
            Some((qo, ..)) => self.q_tensor(out_name, shape.clone(), *qo),
            None => self.new_tensor(out_name, DType::F32, shape.clone(), None),
        };
        self.push(
            OpKind::FullyConnected {
                activation: Activation::None,
            },
            vec![Some(a.id), Some(w_id), b_id],
            out,
        );
        let y = Act {
            id: out,
            perm: identity(shape.len()),
            shape,
            cols: None,
            deq: int8.is_some(),
            u8: false,
        };
        let y = match addend {
            Some(c) => self.binary_const(
                n,
                OpKind::Add {
                    activation: Activation::None,
                },
                &y,
                &c,
                false,
                None,
            )?,
            None => y,
        };
        self.bind(out_name, Value::Act(y))
    }

    /// An activation with its logical axes permuted (output axis `i` is input axis `t[i]`):
    /// only the layout changes.
    fn transposed(&mut self, a: &Act, t: &[usize]) -> Act {
        let a = self.uncols(a);
        let tinv = inverse(t);
        let shape = phys_shape(&a.shape, t);
        let perm = a.perm.iter().map(|&p| tinv[p]).collect();
        a.with(a.id, shape, perm)
    }

    // --- element-wise ops ------------------------------------------------------------------------

    fn op_binary(&mut self, n: &Node<'_>) -> Result<()> {
        n.check_attrs(&[])?;
        n.arity(2, 2)?;
        let act = Activation::None;
        let kind = match n.op() {
            "Add" => OpKind::Add { activation: act },
            "Sub" => OpKind::Sub { activation: act },
            "Mul" => OpKind::Mul { activation: act },
            _ => OpKind::Div { activation: act },
        };
        let out_name = n.out_name(0)?;
        let y = match (self.value(n, 0)?, self.value(n, 1)?) {
            (Value::Const(a), Value::Const(b)) => {
                let c = fold_binary(n, &kind, &a, &b)?;
                return self.bind(out_name, Value::Const(Rc::new(c)));
            }
            (Value::Act(a), Value::Const(c)) => {
                if let Some(y) = self.fold_into_producer(&kind, &a, &c, false) {
                    y
                } else {
                    self.binary_const(n, kind, &a, &c, false, Some(out_name))?
                }
            }
            (Value::Const(c), Value::Act(a)) => {
                if let Some(y) = self.fold_into_producer(&kind, &a, &c, true) {
                    y
                } else {
                    self.binary_const(n, kind, &a, &c, true, Some(out_name))?
                }
            }
            (Value::Act(a), Value::Act(b)) => self.binary_acts(n, kind, &a, &b, out_name)?,
        };
        self.bind(out_name, Value::Act(y))
    }

    /// Folds `a op c` into the Conv / FC writing `a` when `c` is per output channel.
    fn fold_into_producer(
        &mut self,
        kind: &OpKind,
        a: &Act,
        c: &Const,
        const_first: bool,
    ) -> Option<Act> {
        let op = self.foldable(a)?;
        if broadcast(&a.shape, &c.shape).as_deref() != Some(&a.shape[..]) {
            return None;
        }
        let v = self.per_channel(a, c)?;
        let zeros = vec![0.0; v.len()];
        match (kind, const_first) {
            (OpKind::Add { .. }, _) => self.fold_affine(op, None, &v),
            (OpKind::Sub { .. }, false) => {
                self.fold_affine(op, None, &v.iter().map(|x| -x).collect::<Vec<_>>())
            }
            (OpKind::Mul { .. }, _) => self.fold_affine(op, Some(&v), &zeros),
            (OpKind::Div { .. }, false) if v.iter().all(|&x| x != 0.0) => self.fold_affine(
                op,
                Some(&v.iter().map(|x| 1.0 / x).collect::<Vec<_>>()),
                &zeros,
            ),
            _ => return None,
        }
        Some(a.clone())
    }

    /// A constant laid out to broadcast against an activation stored in layout `perm` of rank
    /// `r` (leading unit dimensions dropped).
    fn const_layout(&self, c: &Const, r: usize, perm: &[usize]) -> Const {
        let mut shape = vec![1; r.saturating_sub(c.shape.len())];
        shape.extend(&c.shape);
        let full = c.reshaped(shape).permuted(perm);
        let lead = full
            .shape
            .iter()
            .take_while(|&&d| d == 1)
            .count()
            .min(full.shape.len().saturating_sub(1));
        let s = full.shape[lead..].to_vec();
        let s = if s.is_empty() { vec![1] } else { s };
        full.reshaped(s)
    }

    fn binary_const(
        &mut self,
        n: &Node<'_>,
        kind: OpKind,
        a: &Act,
        c: &Const,
        const_first: bool,
        out_name: Option<&str>,
    ) -> Result<Act> {
        let Some(shape) = broadcast(&a.shape, &c.shape) else {
            return n.malformed(format!(
                "shapes {:?} and {:?} do not broadcast",
                a.shape, c.shape
            ));
        };
        if !c.is_float() {
            return n.unsupported(format!("a constant of type {}", type_name(c.ty)));
        }
        let int8_kind = matches!(
            kind,
            OpKind::Add { .. } | OpKind::Mul { .. } | OpKind::Sub { .. }
        );
        let qo = match out_name {
            Some(o) if int8_kind && self.is_q(a) => self.next_quant(o, true),
            _ => None,
        };
        let cq = c
            .quant
            .as_ref()
            .is_some_and(|q| q.scales.len() == 1 && q.raw_ty == dt::INT8);
        let int8 = qo.filter(|_| cq);
        if int8.is_none() {
            self.note_float(n, &[a]);
        }
        let a = if int8.is_some() {
            self.uncols(a)
        } else {
            let f = self.float_act(a);
            self.uncols(&f)
        };
        let r = shape.len();
        let (a, perm) = if a.rank() == r {
            let p = a.perm.clone();
            (a, p)
        } else {
            let mut s = vec![1; r - a.rank()];
            s.extend(&a.shape);
            let u = self.reshape_act(&a, &s);
            let p = preferred_perm(r);
            (self.in_layout(&u, &p), p)
        };
        let cl = self.const_layout(c, r, &perm);
        let name = format!("{}/operand", out_name.unwrap_or(&n.p.name));
        let c_id = match int8 {
            Some(_) => self.int8_tensor(&name, &cl),
            None => Some(self.f32_tensor(&name, cl.shape.clone(), &cl.floats(), cl.f16)),
        };
        let Some(c_id) = c_id else {
            return n.malformed("int8 operand is missing");
        };
        let phys = phys_shape(&shape, &perm);
        let oname = out_name.map_or_else(|| format!("{}/sum", n.p.name), str::to_string);
        let out = match int8 {
            Some(q) => self.q_tensor(&oname, phys, q),
            None => self.new_tensor(&oname, DType::F32, phys, None),
        };
        let inputs = if const_first {
            vec![Some(c_id), Some(a.id)]
        } else {
            vec![Some(a.id), Some(c_id)]
        };
        self.push(kind, inputs, out);
        Ok(Act {
            id: out,
            shape,
            perm,
            cols: None,
            deq: int8.is_some(),
            u8: false,
        })
    }

    fn binary_acts(
        &mut self,
        n: &Node<'_>,
        kind: OpKind,
        a: &Act,
        b: &Act,
        out_name: &str,
    ) -> Result<Act> {
        let Some(shape) = broadcast(&a.shape, &b.shape) else {
            return n.malformed(format!(
                "shapes {:?} and {:?} do not broadcast",
                a.shape, b.shape
            ));
        };
        let int8_kind = matches!(
            kind,
            OpKind::Add { .. } | OpKind::Mul { .. } | OpKind::Sub { .. }
        );
        let qo = if int8_kind && self.is_q(a) && self.is_q(b) {
            self.next_quant(out_name, true)
        } else {
            None
        };
        if qo.is_none() {
            self.note_float(n, &[a, b]);
        }
        let (a, b) = if qo.is_some() {
            (self.uncols(a), self.uncols(b))
        } else {
            let (fa, fb) = (self.float_act(a), self.float_act(b));
            (self.uncols(&fa), self.uncols(&fb))
        };
        let r = shape.len();
        let perm = if a.rank() == r {
            a.perm.clone()
        } else if b.rank() == r {
            b.perm.clone()
        } else {
            preferred_perm(r)
        };
        let mut ids = Vec::with_capacity(2);
        for x in [&a, &b] {
            let x = if x.rank() < r {
                let mut s = vec![1; r - x.rank()];
                s.extend(&x.shape);
                self.reshape_act(x, &s)
            } else {
                x.clone()
            };
            ids.push(Some(self.in_layout(&x, &perm).id));
        }
        let phys = phys_shape(&shape, &perm);
        let out = match qo {
            Some(q) => self.q_tensor(out_name, phys, q),
            None => self.new_tensor(out_name, DType::F32, phys, None),
        };
        self.push(kind, ids, out);
        Ok(Act {
            id: out,
            shape,
            perm,
            cols: None,
            deq: qo.is_some(),
            u8: false,
        })
    }

    fn op_prelu(&mut self, n: &Node<'_>) -> Result<()> {
        n.check_attrs(&[])?;
        n.arity(2, 2)?;
        let x = self.act_in(n, 0)?;
        let slope = self.const_in(n, 1, "slope")?;
        if broadcast(&x.shape, &slope.shape).as_deref() != Some(&x.shape[..]) || !slope.is_float() {
            return n.malformed(format!(
                "slope of shape {:?} does not broadcast to the input's {:?}",
                slope.shape, x.shape
            ));
        }
        self.note_float(n, &[&x]);
        let x = self.float_act(&x);
        let x = self.uncols(&x);
        let cl = self.const_layout(&slope, x.rank(), &x.perm);
        let out_name = n.out_name(0)?;
        let s_id = self.f32_tensor(
            &format!("{out_name}/slope"),
            cl.shape.clone(),
            &cl.floats(),
            cl.f16,
        );
        let phys = self.g.tensors[x.id].shape.clone();
        let out = self.new_tensor(out_name, DType::F32, phys, None);
        self.push(OpKind::PRelu, vec![Some(x.id), Some(s_id)], out);
        self.bind(out_name, Value::Act(Act { id: out, ..x }))
    }

    fn op_unary(&mut self, n: &Node<'_>) -> Result<()> {
        let op = n.op().to_string();
        match op.as_str() {
            "LeakyRelu" => n.check_attrs(&["alpha"])?,
            "HardSigmoid" => n.check_attrs(&["alpha", "beta"])?,
            "Clip" if n.opset < 11 => n.check_attrs(&["min", "max"])?,
            _ => n.check_attrs(&[])?,
        }
        if op == "Clip" && n.opset >= 11 {
            n.arity(1, 3)?;
        } else {
            n.arity(1, 1)?;
        }
        let (kind, fused) = match op.as_str() {
            "Relu" => (OpKind::Relu, Some(Activation::Relu)),
            "Sigmoid" => (OpKind::Logistic, None),
            "Tanh" => (OpKind::Tanh, None),
            "HardSwish" => (OpKind::HardSwish, None),
            "LeakyRelu" => (
                OpKind::LeakyRelu {
                    alpha: n.float("alpha", 0.01)?,
                },
                None,
            ),
            "HardSigmoid" => (
                OpKind::HardSigmoid {
                    alpha: n.float("alpha", 0.2)?,
                    beta: n.float("beta", 0.5)?,
                },
                None,
            ),
            _ => {
                let (min, max) = if n.opset < 11 {
                    (
                        n.float("min", f32::NEG_INFINITY)?,
                        n.float("max", f32::INFINITY)?,
                    )
                } else {
                    (
                        self.scalar_in(n, 1, "min")?.unwrap_or(f32::NEG_INFINITY),
                        self.scalar_in(n, 2, "max")?.unwrap_or(f32::INFINITY),
                    )
                };
                if min.is_nan() || max.is_nan() {
                    return n.malformed("min or max is NaN");
                }
                match (min, max) {
                    (0.0, f32::INFINITY) => (OpKind::Relu, Some(Activation::Relu)),
                    (0.0, 6.0) => (OpKind::Relu6, Some(Activation::Relu6)),
                    (-1.0, 1.0) => (OpKind::Clamp { min, max }, Some(Activation::ReluN1To1)),
                    _ => (OpKind::Clamp { min, max }, None),
                }
            }
        };
        let out_name = n.out_name(0)?;
        let x = match self.value(n, 0)? {
            Value::Const(c) if c.is_float() => {
                let v: Vec<f32> = c.floats().iter().map(|&v| unary_fn(&kind, v)).collect();
                let folded = Const {
                    data: CData::F(v),
                    quant: None,
                    f16: false,
                    ..(*c).clone()
                };
                return self.bind(out_name, Value::Const(Rc::new(folded)));
            }
            _ => self.act_in(n, 0)?,
        };
        if let Some(act) = fused {
            if self.fuse(&x, act) {
                return self.bind(out_name, Value::Act(x));
            }
        }
        let qo = if self.is_q(&x) {
            self.next_quant(out_name, false)
        } else {
            None
        };
        if qo.is_none() {
            self.note_float(n, &[&x]);
        }
        let x = if qo.is_some() { x } else { self.float_act(&x) };
        let phys = self.g.tensors[x.id].shape.clone();
        // int8 LOGISTIC and TANH have fixed output quantization (then requantized).
        let fixed = match kind {
            OpKind::Logistic => Some((1.0 / 256.0, -128)),
            OpKind::Tanh => Some((1.0 / 128.0, 0)),
            _ => None,
        };
        let out = match qo {
            Some(q) => self.q_tensor(out_name, phys, fixed.unwrap_or(q)),
            None => self.new_tensor(out_name, DType::F32, phys, None),
        };
        self.push(kind, vec![Some(x.id)], out);
        let mut y = Act { id: out, ..x };
        if let Some(q) = qo {
            y = self.requant(&y, q);
        }
        self.bind(out_name, Value::Act(y))
    }

    // --- shape ops -------------------------------------------------------------------------------

    fn op_reshape(&mut self, n: &Node<'_>) -> Result<()> {
        let op = n.op().to_string();
        let axes_from_input = n.opset >= 13;
        match op.as_str() {
            "Reshape" => {
                n.check_attrs(&["allowzero"])?;
                n.arity(2, 2)?;
            }
            "Flatten" => {
                n.check_attrs(&["axis"])?;
                n.arity(1, 1)?;
            }
            _ if axes_from_input => {
                n.check_attrs(&[])?;
                n.arity(1, 2)?;
            }
            _ => {
                n.check_attrs(&["axes"])?;
                n.arity(1, 1)?;
            }
        }
        let v = self.value(n, 0)?;
        let shape = match &v {
            Value::Const(c) => c.shape.clone(),
            Value::Act(a) => a.shape.clone(),
        };
        let r = shape.len();
        let count = elements(&shape).unwrap_or(0);
        let out: Vec<usize> = match op.as_str() {
            "Reshape" => {
                let Some(spec) = self.ints_in(n, 1, "shape")? else {
                    return n.malformed("has no shape input");
                };
                let allowzero = n.int("allowzero", 0)? != 0;
                let mut out = Vec::with_capacity(spec.len());
                let mut infer = None;
                for (i, &s) in spec.iter().enumerate() {
                    match s {
                        -1 if infer.is_none() => {
                            infer = Some(i);
                            out.push(1);
                        }
                        0 if !allowzero => match shape.get(i) {
                            Some(&d) => out.push(d),
                            None => {
                                return n.malformed(format!(
                                    "shape {spec:?} copies dimension {i} of a rank-{r} input"
                                ))
                            }
                        },
                        s => match usize::try_from(s) {
                            Ok(d) => out.push(d),
                            Err(_) => return n.malformed(format!("shape {spec:?}")),
                        },
                    }
                }
                if let Some(i) = infer {
                    let known = elements(&out).unwrap_or(0);
                    if known == 0 || !count.is_multiple_of(known) {
                        return n.malformed(format!(
                            "cannot infer -1 in shape {spec:?} for {count} elements"
                        ));
                    }
                    out[i] = count / known;
                }
                out
            }
            "Flatten" => {
                let a = n.int("axis", 1)?;
                let ri = i64::try_from(r).unwrap_or(i64::MAX);
                let axis = if a < 0 { a + ri } else { a };
                let Some(axis) = usize::try_from(axis).ok().filter(|&x| x <= r) else {
                    return n.malformed(format!("axis {a} is outside rank {r}"));
                };
                vec![
                    shape[..axis].iter().product(),
                    shape[axis..].iter().product(),
                ]
            }
            "Squeeze" => {
                let list = if axes_from_input {
                    self.ints_in(n, 1, "axes")?
                } else {
                    n.ints("axes")?
                };
                let axes = match list {
                    Some(l) => n.axes(&l, r)?,
                    None => (0..r).filter(|&i| shape[i] == 1).collect(),
                };
                if let Some(&a) = axes.iter().find(|&&a| shape[a] != 1) {
                    return n.malformed(format!("squeezes axis {a} of size {}", shape[a]));
                }
                (0..r)
                    .filter(|i| !axes.contains(i))
                    .map(|i| shape[i])
                    .collect()
            }
            _ => {
                let list = if axes_from_input {
                    self.ints_in(n, 1, "axes")?
                } else {
                    n.ints("axes")?
                };
                let Some(l) = list else {
                    return n.malformed("has no axes");
                };
                let axes = n.axes(&l, r + l.len())?;
                let mut rest = shape.iter();
                (0..r + l.len())
                    .map(|i| {
                        if axes.contains(&i) {
                            1
                        } else {
                            rest.next().copied().unwrap_or(1)
                        }
                    })
                    .collect()
            }
        };
        if elements(&out) != Some(count) {
            return n.malformed(format!("reshapes {shape:?} to {out:?}"));
        }
        let out_name = n.out_name(0)?;
        let y = match v {
            Value::Const(c) => Value::Const(Rc::new(c.reshaped(out))),
            Value::Act(a) => Value::Act(match self.cols_flatten(&a, &out, out_name) {
                Some(y) => y,
                None => self.reshape_act(&a, &out),
            }),
        };
        self.bind(out_name, y)
    }

    /// A flatten to `[M, K]` of a tensor stored out of order that only feeds MatMul / Gemm
    /// with constant weights: a plain reshape, the weights' columns permuted later.
    fn cols_flatten(&mut self, a: &Act, out: &[usize], out_name: &str) -> Option<Act> {
        if a.cols.is_some()
            || a.rank() < 3
            || out.len() != 2
            || a.perm.first() != Some(&0)
            || out[0] != a.shape[0]
        {
            return None;
        }
        let inner_perm: Vec<usize> = a.perm[1..].iter().map(|p| p - 1).collect();
        let inner = a.shape[1..].to_vec();
        if is_sorted(&nonunit_order(&inner, &inner_perm))
            || self.outputs.iter().any(|o| o == out_name)
        {
            return None;
        }
        let users = self.consumers.get(out_name)?;
        for &u in users {
            let p = self.nodes.get(u)?;
            let node = Node {
                index: u,
                p,
                opset: self.opset,
            };
            let ok = match p.op_type.as_str() {
                "MatMul" => true,
                "Gemm" => node.int("transA", 0).ok() == Some(0),
                _ => false,
            };
            let b_const = p
                .input
                .get(1)
                .is_some_and(|b| matches!(self.values.get(b), Some(Value::Const(_))));
            if !ok
                || !b_const
                || p.input.first().map(String::as_str) != Some(out_name)
                || p.input.get(1).map(String::as_str) == Some(out_name)
            {
                return None;
            }
        }
        let id = self.phys_reshape(a.id, out.to_vec());
        Some(Act {
            id,
            shape: out.to_vec(),
            perm: vec![0, 1],
            cols: Some(Cols {
                inner,
                perm: inner_perm,
            }),
            deq: a.deq,
            u8: a.u8,
        })
    }

    fn op_transpose(&mut self, n: &Node<'_>) -> Result<()> {
        n.check_attrs(&["perm"])?;
        n.arity(1, 1)?;
        let v = self.value(n, 0)?;
        let r = match &v {
            Value::Const(c) => c.shape.len(),
            Value::Act(a) => a.rank(),
        };
        let t: Vec<usize> = match n.ints("perm")? {
            Some(p) => p
                .iter()
                .map(|&x| usize::try_from(x).unwrap_or(usize::MAX))
                .collect(),
            None => (0..r).rev().collect(),
        };
        if !is_perm(&t, r) {
            return n.malformed(format!("perm {t:?} is not a permutation of rank {r}"));
        }
        let y = match v {
            Value::Const(c) => Value::Const(Rc::new(c.permuted(&t))),
            Value::Act(a) => Value::Act(self.transposed(&a, &t)),
        };
        self.bind(n.out_name(0)?, y)
    }

    fn op_concat(&mut self, n: &Node<'_>) -> Result<()> {
        n.check_attrs(&["axis"])?;
        if n.p.input.is_empty() {
            return n.malformed("has no inputs");
        }
        n.arity(1, usize::MAX)?;
        let vals: Vec<Value> = (0..n.p.input.len())
            .map(|i| self.value(n, i))
            .collect::<Result<_>>()?;
        let shapes: Vec<Vec<usize>> = vals
            .iter()
            .map(|v| match v {
                Value::Const(c) => c.shape.clone(),
                Value::Act(a) => a.shape.clone(),
            })
            .collect();
        let r = shapes[0].len();
        let Some(axis_attr) = n.attr("axis").map(|_| n.int("axis", 0)).transpose()? else {
            return n.malformed("has no axis");
        };
        let axis = n.axis(axis_attr, r)?;
        let mut out = shapes[0].clone();
        out[axis] = 0;
        for s in &shapes {
            if s.len() != r || (0..r).any(|d| d != axis && s[d] != shapes[0][d]) {
                return n.malformed(format!(
                    "inputs of shapes {shapes:?} do not fit along axis {axis}"
                ));
            }
            out[axis] += s[axis];
        }
        let out_name = n.out_name(0)?;
        if vals.iter().all(|v| matches!(v, Value::Const(_))) {
            let consts: Vec<Rc<Const>> = vals
                .iter()
                .filter_map(|v| {
                    if let Value::Const(c) = v {
                        Some(c.clone())
                    } else {
                        None
                    }
                })
                .collect();
            let c = fold_concat(n, &consts, axis, out)?;
            return self.bind(out_name, Value::Const(Rc::new(c)));
        }
        let acts: Vec<&Act> = vals
            .iter()
            .filter_map(|v| if let Value::Act(a) = v { Some(a) } else { None })
            .collect();
        let all_q = vals
            .iter()
            .all(|v| matches!(v, Value::Act(a) if self.is_q(a)));
        let target_q = if all_q {
            self.next_quant(out_name, false)
                .or_else(|| acts.first().and_then(|a| self.quant_of(a.id)))
        } else {
            None
        };
        if target_q.is_none() {
            self.note_float(n, &acts);
        }
        let first = acts.first().map(|a| (*a).clone());
        let perm = match first {
            Some(a) => self.uncols(&a).perm,
            None => identity(r),
        };
        let mut ids = Vec::with_capacity(vals.len());
        for v in &vals {
            let id = match v {
                Value::Const(c) => {
                    if !c.is_float() {
                        return n
                            .unsupported(format!("a constant input of type {}", type_name(c.ty)));
                    }
                    let p = c.permuted(&perm);
                    self.f32_tensor(
                        &format!("{out_name}/const"),
                        p.shape.clone(),
                        &p.floats(),
                        p.f16,
                    )
                }
                Value::Act(a) => {
                    let a = match target_q {
                        Some(q) => self.requant(a, q),
                        None => self.float_act(a),
                    };
                    self.in_layout(&a, &perm).id
                }
            };
            ids.push(Some(id));
        }
        let phys = phys_shape(&out, &perm);
        let out_id = match target_q {
            Some(q) => self.q_tensor(out_name, phys, q),
            None => self.new_tensor(out_name, DType::F32, phys, None),
        };
        let phys_axis = perm.iter().position(|&p| p == axis).unwrap_or(axis);
        self.push(
            OpKind::Concatenation {
                axis: i64::try_from(phys_axis).unwrap_or(0),
                activation: Activation::None,
            },
            ids,
            out_id,
        );
        let y = Act {
            id: out_id,
            shape: out,
            perm,
            cols: None,
            deq: target_q.is_some(),
            u8: false,
        };
        self.bind(out_name, Value::Act(y))
    }

    fn op_pad(&mut self, n: &Node<'_>) -> Result<()> {
        let from_inputs = n.opset >= 11;
        if from_inputs {
            n.check_attrs(&["mode"])?;
            n.arity(2, 4)?;
        } else {
            n.check_attrs(&["mode", "pads", "value"])?;
            n.arity(1, 1)?;
        }
        let mode = n.string("mode")?.unwrap_or_else(|| "constant".into());
        if mode != "constant" {
            return n.unsupported(format!("mode {mode:?} (Kiln pads with zeros only)"));
        }
        let x = self.act_in(n, 0)?;
        let r = x.rank();
        let (pads, value) = if from_inputs {
            let value = self.scalar_in(n, 2, "constant_value")?;
            (
                self.ints_in(n, 1, "pads")?.unwrap_or_default(),
                value.unwrap_or(0.0),
            )
        } else {
            (n.ints("pads")?.unwrap_or_default(), n.float("value", 0.0)?)
        };
        if !value.is_finite() {
            return n.unsupported(format!("constant value {value}"));
        }
        let axes: Vec<usize> = match self.ints_in(n, 3, "axes")? {
            Some(l) if from_inputs => n.axes(&l, r)?,
            _ => identity(r),
        };
        if pads.len() != 2 * axes.len() {
            return n.malformed(format!("pads {pads:?} for {} axes", axes.len()));
        }
        let mut full = vec![[0usize; 2]; r];
        for (k, &a) in axes.iter().enumerate() {
            let (Ok(b), Ok(e)) = (
                usize::try_from(pads[k]),
                usize::try_from(pads[k + axes.len()]),
            ) else {
                return n.unsupported(format!("negative pads {pads:?} (cropping)"));
            };
            if b.max(e) > MAX_PAD {
                return n.unsupported(format!("pads {pads:?} (at most {MAX_PAD})"));
            }
            full[a] = [b, e];
        }
        let out_name = n.out_name(0)?;
        let x = self.uncols(&x);
        if full.iter().all(|p| *p == [0, 0]) {
            return self.bind(out_name, Value::Act(x));
        }
        // The IR pads with zeros: pad `x - value` and add `value` back.
        let offset = Const::float(vec![], vec![value]);
        let sub = OpKind::Sub {
            activation: Activation::None,
        };
        let x = if value == 0.0 {
            x
        } else {
            self.note_float(n, &[&x]);
            let xf = self.float_act(&x);
            self.binary_const(n, sub, &xf, &offset, false, None)?
        };
        let shape: Vec<usize> = x
            .shape
            .iter()
            .zip(&full)
            .map(|(&d, p)| d + p[0] + p[1])
            .collect();
        let paddings: Vec<[usize; 2]> = x.perm.iter().map(|&p| full[p]).collect();
        let out = self.derived(x.id, "padded", phys_shape(&shape, &x.perm));
        self.g.tensors[out].name = out_name.to_string();
        self.push(OpKind::Pad { paddings }, vec![Some(x.id)], out);
        let mut y = x.with(out, shape, x.perm.clone());
        if value != 0.0 {
            let add = OpKind::Add {
                activation: Activation::None,
            };
            y = self.binary_const(n, add, &y, &offset, false, None)?;
            self.g.tensors[y.id].name = out_name.to_string();
        }
        self.bind(out_name, Value::Act(y))
    }

    fn op_softmax(&mut self, n: &Node<'_>) -> Result<()> {
        n.check_attrs(&["axis"])?;
        n.arity(1, 1)?;
        let x = self.act_in(n, 0)?;
        let x = self.uncols(&x);
        let r = x.rank();
        if r == 0 {
            return n.malformed("input is a scalar");
        }
        let legacy = n.opset < 13;
        let axis = n.axis(n.int("axis", if legacy { 1 } else { -1 })?, r)?;
        let group: Vec<usize> = if legacy {
            (axis..r).collect()
        } else {
            vec![axis]
        };
        let out_name = n.out_name(0)?;
        let qo = if self.is_q(&x) {
            self.next_quant(out_name, false)
        } else {
            None
        };
        if qo.is_none() {
            self.note_float(n, &[&x]);
        }
        let x = if qo.is_some() { x } else { self.float_act(&x) };
        // Softmax runs over the last physical axes: move the group there (in its current order).
        let mut target: Vec<usize> = x
            .perm
            .iter()
            .copied()
            .filter(|p| !group.contains(p))
            .collect();
        target.extend(x.perm.iter().copied().filter(|p| group.contains(p)));
        let x = self.in_layout(&x, &target);
        let inner: usize = group.iter().map(|&g| x.shape[g]).product();
        let total = elements(&x.shape).unwrap_or(0);
        let phys = self.g.tensors[x.id].shape.clone();
        let flat = if group.len() > 1 {
            self.phys_reshape(x.id, vec![total / inner.max(1), inner])
        } else {
            x.id
        };
        let flat_shape = self.g.tensors[flat].shape.clone();
        let out = match qo {
            Some(_) => self.q_tensor(out_name, flat_shape, (1.0 / 256.0, -128)),
            None => self.new_tensor(out_name, DType::F32, flat_shape, None),
        };
        self.push(OpKind::Softmax { beta: 1.0 }, vec![Some(flat)], out);
        let out = self.phys_reshape(out, phys);
        let mut y = Act { id: out, ..x };
        if let Some(q) = qo {
            y = self.requant(&y, q);
        }
        self.bind(out_name, Value::Act(y))
    }

    fn op_batchnorm(&mut self, n: &Node<'_>) -> Result<()> {
        n.check_attrs(&["epsilon", "momentum", "spatial", "training_mode", "is_test"])?;
        n.arity(5, 5)?;
        if n.int("training_mode", 0)? != 0 {
            return n.unsupported("training mode");
        }
        if n.int("spatial", 1)? != 1 {
            return n.unsupported("spatial=0");
        }
        let eps = n.float("epsilon", 1e-5)?;
        let x = self.act_in(n, 0)?;
        if x.rank() < 2 {
            return n.malformed(format!("input of shape {:?}", x.shape));
        }
        let c = x.shape[1];
        let mut p = Vec::with_capacity(4);
        for (i, role) in [(1, "scale"), (2, "bias"), (3, "mean"), (4, "variance")] {
            let v = self.const_in(n, i, role)?;
            if v.len() != c || !v.is_float() {
                return n.malformed(format!("{role} of shape {:?} for {c} channels", v.shape));
            }
            p.push(v.floats());
        }
        let a: Vec<f32> = (0..c).map(|i| p[0][i] / (p[3][i] + eps).sqrt()).collect();
        let b: Vec<f32> = (0..c).map(|i| p[1][i] - p[2][i] * a[i]).collect();
        let out_name = n.out_name(0)?;
        if x.perm.last() == Some(&1) {
            if let Some(op) = self.foldable(&x) {
                self.fold_affine(op, Some(&a), &b);
                return self.bind(out_name, Value::Act(x));
            }
        }
        let mut shape = vec![c];
        shape.extend(vec![1; x.rank() - 2]);
        let mul = self.binary_const(
            n,
            OpKind::Mul {
                activation: Activation::None,
            },
            &x,
            &Const::float(shape.clone(), a),
            false,
            None,
        )?;
        let y = self.binary_const(
            n,
            OpKind::Add {
                activation: Activation::None,
            },
            &mul,
            &Const::float(shape, b),
            false,
            None,
        )?;
        self.g.tensors[y.id].name = out_name.to_string();
        self.bind(out_name, Value::Act(y))
    }

    // --- quantization ----------------------------------------------------------------------------

    fn op_quantize(&mut self, n: &Node<'_>) -> Result<()> {
        let q = self.qparams(n, None)?;
        if q.u8 && q.zero_points.iter().any(|z| !(-128..=127).contains(z))
            || (!q.u8 && q.zero_points.iter().any(|z| !(-128..=127).contains(z)))
        {
            return n.malformed(format!(
                "zero points {:?} are outside the quantized type",
                q.zero_points
            ));
        }
        let out_name = n.out_name(0)?;
        let (lo, hi, shift) = if q.u8 { (0, 255, 128) } else { (-128, 127, 0) };
        match self.value(n, 0)? {
            Value::Const(c) => {
                let v = c.floats();
                let axis = if q.scales.len() > 1 {
                    n.axis(q.axis, c.shape.len())?
                } else {
                    0
                };
                if q.scales.len() > 1 && c.shape.get(axis) != Some(&q.scales.len()) {
                    return n.malformed(format!(
                        "{} scales along axis {axis} of shape {:?}",
                        q.scales.len(),
                        c.shape
                    ));
                }
                let inner: usize = c.shape.get(axis + 1..).unwrap_or_default().iter().product();
                let vals: Vec<i64> = v
                    .iter()
                    .enumerate()
                    .map(|(i, &x)| {
                        let ch = if q.scales.len() > 1 {
                            (i / inner.max(1)) % q.scales.len()
                        } else {
                            0
                        };
                        let qv =
                            (x / q.scales[ch]).round_ties_even() as i64 + q.zero_points[ch] + shift;
                        qv.clamp(lo, hi)
                    })
                    .collect();
                let ty = if q.u8 { dt::UINT8 } else { dt::INT8 };
                self.bind(
                    out_name,
                    Value::Const(Rc::new(Const::int(ty, c.shape.clone(), vals))),
                )
            }
            Value::Act(x) => {
                if q.scales.len() != 1 {
                    return n.unsupported("per-axis quantization of an activation");
                }
                let qp = (q.scales[0], q.zero_points[0]);
                let y = if self.is_q(&x) {
                    self.requant(&x, qp)
                } else if self.dtype(x.id) == DType::F32 {
                    let phys = self.g.tensors[x.id].shape.clone();
                    let id = self.q_tensor(out_name, phys, qp);
                    self.push(OpKind::Quantize, vec![Some(x.id)], id);
                    Act { id, ..x }
                } else {
                    return n.malformed("quantizes an integer tensor");
                };
                self.bind(
                    out_name,
                    Value::Act(Act {
                        deq: false,
                        u8: q.u8,
                        ..y
                    }),
                )
            }
        }
    }

    fn op_dequantize(&mut self, n: &Node<'_>) -> Result<()> {
        let out_name = n.out_name(0)?;
        match self.value(n, 0)? {
            Value::Const(c) => {
                let q = self.qparams(n, Some(c.ty))?;
                let Some(raw) = c.ints() else {
                    return n.malformed("dequantizes a float tensor");
                };
                let axis = if q.scales.len() > 1 {
                    n.axis(q.axis, c.shape.len())?
                } else {
                    0
                };
                if q.scales.len() > 1 && c.shape.get(axis) != Some(&q.scales.len()) {
                    return n.malformed(format!(
                        "{} scales along axis {axis} of shape {:?}",
                        q.scales.len(),
                        c.shape
                    ));
                }
                let shift = if q.u8 { 128 } else { 0 };
                let raw: Vec<i64> = raw.iter().map(|&r| r - shift).collect();
                let inner: usize = c.shape.get(axis + 1..).unwrap_or_default().iter().product();
                let f: Vec<f32> = raw
                    .iter()
                    .enumerate()
                    .map(|(i, &r)| {
                        let ch = if q.scales.len() > 1 {
                            (i / inner.max(1)) % q.scales.len()
                        } else {
                            0
                        };
                        q.scales[ch] * (r - q.zero_points[ch]) as f32
                    })
                    .collect();
                let raw_ty = if c.ty == dt::INT32 {
                    dt::INT32
                } else {
                    dt::INT8
                };
                let out = Const {
                    ty: dt::FLOAT,
                    shape: c.shape.clone(),
                    data: CData::F(f),
                    f16: false,
                    quant: Some(CQuant {
                        raw,
                        raw_ty,
                        scales: q.scales.clone(),
                        zero_points: q.zero_points.clone(),
                        axis,
                    }),
                };
                self.bind(out_name, Value::Const(Rc::new(out)))
            }
            Value::Act(x) => {
                if self.dtype(x.id) != DType::I8 || x.deq {
                    return n.malformed("dequantizes a float tensor");
                }
                let q = self.qparams(n, Some(if x.u8 { dt::UINT8 } else { dt::INT8 }))?;
                if q.scales.len() != 1 {
                    return n.unsupported("per-axis dequantization of an activation");
                }
                let qp = (q.scales[0], q.zero_points[0]);
                match self.quant_of(x.id) {
                    Some(have) if have == qp => {}
                    Some(have) => {
                        return n.unsupported(format!(
                            "dequantizes with scale {} and zero point {} a tensor quantized with scale {} and zero point {}",
                            qp.0, qp.1, have.0, have.1
                        ))
                    }
                    None => {
                        self.g.tensors[x.id].quant = Some(QuantInfo {
                            scales: vec![qp.0],
                            zero_points: vec![qp.1],
                            axis: 0,
                        });
                    }
                }
                self.bind(out_name, Value::Act(Act { deq: true, ..x }))
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Free helpers.
// ---------------------------------------------------------------------------------------------

/// A 2-D sliding window (1-D windows have height 1).
#[derive(Clone, Copy, Debug)]
struct Win {
    input: [usize; 2],
    kernel: [usize; 2],
    stride: [usize; 2],
    dilation: [usize; 2],
    begin: [usize; 2],
    end: [usize; 2],
    out: [usize; 2],
}

impl Win {
    fn unit() -> Win {
        Win {
            input: [1; 2],
            kernel: [1; 2],
            stride: [1; 2],
            dilation: [1; 2],
            begin: [0; 2],
            end: [0; 2],
            out: [1; 2],
        }
    }

    fn eff(&self, i: usize) -> usize {
        (self.kernel[i] - 1) * self.dilation[i] + 1
    }

    /// The IR padding that computes exactly this window, if any: VALID when no window reads
    /// padding, SAME when the output size and the top/left padding are TFLite's.
    fn padding(&self) -> Option<Padding> {
        let valid = (0..2).all(|i| {
            self.begin[i] == 0
                && self.input[i] >= self.eff(i)
                && self.out[i] == (self.input[i] - self.eff(i)) / self.stride[i] + 1
        });
        if valid {
            return Some(Padding::Valid);
        }
        let same = (0..2).all(|i| {
            self.out[i] == self.input[i].div_ceil(self.stride[i])
                && self.begin[i]
                    == same_padding(
                        Padding::Same,
                        self.stride[i],
                        self.dilation[i],
                        self.input[i],
                        self.kernel[i],
                        self.out[i],
                    )
        });
        same.then_some(Padding::Same)
    }
}

/// Type and static shape of a graph input (a dynamic batch dimension becomes 1).
fn input_type(vi: &pb::ValueInfoProto) -> Result<(i32, Vec<usize>)> {
    let name = &vi.name;
    let Some(pb::type_proto::Value::TensorType(t)) =
        vi.r#type.as_ref().and_then(|t| t.value.as_ref())
    else {
        return unsupported(format!("graph input '{name}' is not a tensor"));
    };
    let Some(shape) = &t.shape else {
        return unsupported(format!("graph input '{name}' has no shape"));
    };
    let mut dims = Vec::with_capacity(shape.dim.len());
    for (i, d) in shape.dim.iter().enumerate() {
        use pb::tensor_shape_proto::dimension::Value as D;
        match &d.value {
            Some(D::DimValue(v)) if *v > 0 => dims.push(usize::try_from(*v).unwrap_or(usize::MAX)),
            Some(D::DimValue(v)) if *v < 0 => {
                return malformed(format!("graph input '{name}' has dimension {v}"));
            }
            _ if i == 0 => dims.push(1),
            other => {
                let what = match other {
                    Some(D::DimParam(p)) => format!("'{p}'"),
                    _ => "unknown".into(),
                };
                return unsupported(format!(
                    "graph input '{name}' has a dynamic dimension {i} ({what}); only the batch \
                     dimension may be dynamic (give the model static input shapes)"
                ));
            }
        }
    }
    if elements(&dims).is_none_or(|e| e > 1 << 30) {
        return unsupported(format!(
            "graph input '{name}' of shape {dims:?} is too large"
        ));
    }
    Ok((t.elem_type, dims))
}

/// A float element-wise function, for folding constants.
fn unary_fn(kind: &OpKind, x: f32) -> f32 {
    match *kind {
        OpKind::Relu => x.max(0.0),
        OpKind::Relu6 => x.clamp(0.0, 6.0),
        OpKind::Logistic => 1.0 / (1.0 + (-x).exp()),
        OpKind::Tanh => x.tanh(),
        OpKind::HardSwish => x * (x + 3.0).clamp(0.0, 6.0) / 6.0,
        OpKind::LeakyRelu { alpha } => {
            if x >= 0.0 {
                x
            } else {
                alpha * x
            }
        }
        OpKind::HardSigmoid { alpha, beta } => (alpha * x + beta).clamp(0.0, 1.0),
        OpKind::Clamp { min, max } => x.max(min).min(max),
        _ => x,
    }
}

fn fold_binary(n: &Node<'_>, kind: &OpKind, a: &Const, b: &Const) -> Result<Const> {
    let Some(shape) = broadcast(&a.shape, &b.shape) else {
        return n.malformed(format!(
            "shapes {:?} and {:?} do not broadcast",
            a.shape, b.shape
        ));
    };
    if elements(&shape).is_none_or(|e| e > MAX_FOLDED) {
        return n.unsupported(format!("folding constants into shape {shape:?}"));
    }
    match (&a.data, &b.data) {
        (CData::I(x), CData::I(y)) => {
            if matches!(kind, OpKind::Div { .. }) && y.contains(&0) {
                return n.malformed("divides by zero");
            }
            let f = |p: i64, q: i64| match kind {
                OpKind::Add { .. } => p.wrapping_add(q),
                OpKind::Sub { .. } => p.wrapping_sub(q),
                OpKind::Mul { .. } => p.wrapping_mul(q),
                _ => p.checked_div(q).unwrap_or(0),
            };
            let v = broadcast_apply(x, &a.shape, y, &b.shape, &shape, f);
            Ok(Const::int(a.ty, shape, v))
        }
        (CData::F(x), CData::F(y)) => {
            let f = |p: f32, q: f32| match kind {
                OpKind::Add { .. } => p + q,
                OpKind::Sub { .. } => p - q,
                OpKind::Mul { .. } => p * q,
                _ => p / q,
            };
            let v = broadcast_apply(x, &a.shape, y, &b.shape, &shape, f);
            Ok(Const {
                f16: a.f16 && b.f16,
                ..Const::float(shape, v)
            })
        }
        _ => n.malformed(format!(
            "operands have different types ({} and {})",
            type_name(a.ty),
            type_name(b.ty)
        )),
    }
}

fn fold_concat(n: &Node<'_>, cs: &[Rc<Const>], axis: usize, shape: Vec<usize>) -> Result<Const> {
    let outer: usize = shape[..axis].iter().product();
    let float = cs.iter().all(|c| c.is_float());
    if !float && !cs.iter().all(|c| !c.is_float()) {
        return n.malformed("concatenates constants of different types");
    }
    let chunk = |c: &Const| -> usize { c.shape[axis..].iter().product() };
    if float {
        let mut v = Vec::new();
        for o in 0..outer {
            for c in cs {
                let k = chunk(c);
                v.extend_from_slice(c.floats().get(o * k..(o + 1) * k).unwrap_or_default());
            }
        }
        Ok(Const::float(shape, v))
    } else {
        let mut v = Vec::new();
        for o in 0..outer {
            for c in cs {
                let k = chunk(c);
                v.extend_from_slice(
                    c.ints()
                        .unwrap_or_default()
                        .get(o * k..(o + 1) * k)
                        .unwrap_or_default(),
                );
            }
        }
        Ok(Const::int(cs[0].ty, shape, v))
    }
}
