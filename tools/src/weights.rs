//! Weights in safetensors form, both ways.
//!
//! * [`apply_weights`] puts retrained weights into a float host graph by tensor name, so that a
//!   retrained model becomes a new version of the same graph (same ops, same shapes, new
//!   constants). The graph is changed only when the whole file is accepted.
//! * [`export_weights`] writes every constant of an artifact as a safetensors file, to inspect
//!   the weights a device really runs with (numpy, torch), optionally dequantized to f32.

use crate::artifact::AlignedBytes;
use crate::convert::sha256_hex;
use crate::ir::{self, Graph, TensorId};
use kiln_runtime::error::ModelError;
use kiln_runtime::graph::{DType, Location, OpDef, OpKind, TensorDef, NO_TENSOR};
use kiln_runtime::model::{element_count, Model};
use kiln_runtime::sections::Manifest;
use safetensors::{Dtype, SafeTensors, View};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};

/// Most names an error message lists before it says how many more there are.
const LISTED_NAMES: usize = 6;

/// Why weights could not be applied or exported. Each message says what is wrong, why, and
/// what to do, on one line.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// The bytes are not a safetensors file.
    #[error(
        "the weights file is not a valid safetensors file ({reason}); write it with safetensors \
         (torch: safetensors.torch.save_file, numpy: safetensors.numpy.save_file) and try again"
    )]
    Malformed {
        /// What the safetensors reader said.
        reason: String,
    },
    /// A tensor of the file names no constant of the graph.
    #[error(
        "weights file has tensor `{name}` but the model has no constant of that name; names the \
         model has: {known}; rename the tensor to one of them or drop it from the file"
    )]
    UnknownTensor {
        /// The file's tensor name.
        name: String,
        /// Some of the graph's constant names (truncated list).
        known: String,
    },
    /// A tensor of the file names several constants of the graph.
    #[error(
        "weights file has tensor `{name}` but the model has {count} constants of that name \
         (tensors {ids}); a name must pick exactly one constant, so this model cannot take \
         weights for it by name"
    )]
    AmbiguousName {
        /// The name.
        name: String,
        /// How many constants carry it.
        count: usize,
        /// Their tensor ids.
        ids: String,
    },
    /// Constants of the graph are absent from the file, and every one was required.
    #[error(
        "the weights file lacks {count} of the model's float constants ({names}) and every \
         constant is required; add them to the file or do not require all of them"
    )]
    Missing {
        /// How many are missing.
        count: usize,
        /// Their names (truncated list).
        names: String,
    },
    /// A tensor's shape is neither the graph's nor its accepted source-framework layout.
    #[error(
        "tensor `{name}` has shape {got} but the model expects {expected}; save it in that shape"
    )]
    Shape {
        /// The tensor name.
        name: String,
        /// The file's shape.
        got: String,
        /// The accepted shapes, described.
        expected: String,
    },
    /// A tensor's element type is not a float type kiln reads.
    #[error(
        "tensor `{name}` is {dtype} in the weights file, which kiln does not read as weights; \
         save it as F32, F16, BF16 or F64"
    )]
    Dtype {
        /// The tensor name.
        name: String,
        /// The file's dtype.
        dtype: String,
    },
    /// A value is NaN or infinite.
    #[error(
        "tensor `{name}` holds a non-finite value ({value}) at element {index}; weights must be \
         finite numbers: check the training run or the export"
    )]
    NonFinite {
        /// The tensor name.
        name: String,
        /// Element index in the file's order.
        index: usize,
        /// The value as text (NaN, inf, -inf).
        value: String,
    },
    /// A finite value does not fit the graph tensor's type (an f64 beyond f32, or beyond f16).
    #[error(
        "tensor `{name}` has value {value} at element {index}, which overflows the model's \
         {dtype} constant; rescale the weights or convert the model without --fp16"
    )]
    OutOfRange {
        /// The tensor name.
        name: String,
        /// Element index in the file's order.
        index: usize,
        /// The value as text.
        value: String,
        /// The graph tensor's type.
        dtype: &'static str,
    },
    /// The graph constant is quantized: its values come from a float model and calibration.
    #[error(
        "tensor `{name}` is {dtype} in the model, and quantized constants cannot be replaced: \
         int8 models must be re-quantized from float; apply the weights to the float model and \
         quantize it again with `kiln quantize`"
    )]
    Quantized {
        /// The tensor name.
        name: String,
        /// The graph tensor's type.
        dtype: &'static str,
    },
    /// The artifact does not validate.
    #[error(
        "the artifact is not valid ({0}); export weights only from an artifact that `kiln \
         inspect` accepts"
    )]
    Artifact(#[from] ModelError),
    /// The safetensors writer failed.
    #[error("cannot write the safetensors file ({0}); this is a bug in kiln, please report it")]
    Write(String),
}

/// What [`apply_weights`] did, for the manifest's lineage.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct WeightsReport {
    /// Names of the replaced constants, in the file's (sorted) order.
    pub replaced: Vec<String>,
    /// Names of the replaced constants that came in the source framework's layout (OIHW conv
    /// filters, `[C*mult, 1, kh, kw]` depthwise filters) and were transposed.
    pub transposed: Vec<String>,
    /// Lowercase hex SHA-256 of the safetensors file.
    pub sha256: String,
}

/// How a constant is used, which decides the layouts it may arrive in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// CONV_2D filter, OHWI in the graph; OIHW accepted.
    ConvFilter,
    /// DEPTHWISE_CONV_2D filter, `[1, kh, kw, C*mult]` in the graph; `[C*mult, 1, kh, kw]`
    /// accepted.
    DepthwiseFilter,
    /// FULLY_CONNECTED weights, `[out, in]` only.
    FcWeights,
    /// Anything else: the exact shape only.
    Other,
}

fn graph_roles(g: &Graph) -> HashMap<TensorId, Role> {
    let mut roles = HashMap::new();
    for op in &g.ops {
        let role = match op.kind {
            ir::OpKind::Conv2d { .. } => Role::ConvFilter,
            ir::OpKind::DepthwiseConv2d { .. } => Role::DepthwiseFilter,
            ir::OpKind::FullyConnected { .. } => Role::FcWeights,
            _ => continue,
        };
        if let Some(Some(w)) = op.inputs.get(1) {
            roles.entry(*w).or_insert(role);
        }
    }
    // A constant behind a DEQUANTIZE (f16 or int8 storage) plays its output's role.
    for op in &g.ops {
        if op.kind != ir::OpKind::Dequantize {
            continue;
        }
        if let (Some(Some(src)), Some(dst)) = (op.inputs.first(), op.outputs.first()) {
            if let Some(&role) = roles.get(dst) {
                roles.entry(*src).or_insert(role);
            }
        }
    }
    roles
}

fn shape_text(shape: &[usize]) -> String {
    let dims: Vec<String> = shape.iter().map(ToString::to_string).collect();
    format!("[{}]", dims.join(","))
}

fn name_list<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    let names: Vec<&str> = names.into_iter().collect();
    let mut text: Vec<String> = names
        .iter()
        .take(LISTED_NAMES)
        .map(|n| n.to_string())
        .collect();
    if names.len() > LISTED_NAMES {
        text.push(format!("… ({} in all)", names.len()));
    }
    if text.is_empty() {
        "none".to_string()
    } else {
        text.join(", ")
    }
}

/// The values of a float tensor of the file, widened to f64 (exact for all four types).
fn decode(name: &str, dtype: Dtype, data: &[u8]) -> Result<Vec<f64>, WeightsError> {
    Ok(match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        Dtype::F64 => data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect(),
        other => {
            return Err(WeightsError::Dtype {
                name: name.to_string(),
                dtype: other.to_string(),
            })
        }
    })
}

/// `[O, I, H, W]` → `[O, H, W, I]`.
fn oihw_to_ohwi(v: &[f64], [o, i, h, w]: [usize; 4]) -> Vec<f64> {
    let mut out = vec![0.0; v.len()];
    for oo in 0..o {
        for ii in 0..i {
            for hh in 0..h {
                for ww in 0..w {
                    out[((oo * h + hh) * w + ww) * i + ii] = v[((oo * i + ii) * h + hh) * w + ww];
                }
            }
        }
    }
    out
}

/// `[C, 1, H, W]` → `[1, H, W, C]`.
fn chw_to_hwc(v: &[f64], [c, h, w]: [usize; 3]) -> Vec<f64> {
    let mut out = vec![0.0; v.len()];
    for cc in 0..c {
        for hh in 0..h {
            for ww in 0..w {
                out[(hh * w + ww) * c + cc] = v[(cc * h + hh) * w + ww];
            }
        }
    }
    out
}

/// Checks a file tensor's shape against the graph tensor's and brings its values into the
/// graph's layout. Returns the values and whether they were transposed.
fn to_graph_layout(
    name: &str,
    role: Role,
    expected: &[usize],
    got: &[usize],
    values: Vec<f64>,
) -> Result<(Vec<f64>, bool), WeightsError> {
    if got == expected {
        return Ok((values, false));
    }
    let bad = |expected: String| WeightsError::Shape {
        name: name.to_string(),
        got: shape_text(got),
        expected,
    };
    match (role, expected) {
        (Role::ConvFilter, &[o, h, w, i]) => {
            if got == [o, i, h, w] {
                Ok((oihw_to_ohwi(&values, [o, i, h, w]), true))
            } else {
                Err(bad(format!(
                    "{} (OHWI) or its OIHW form {}",
                    shape_text(expected),
                    shape_text(&[o, i, h, w])
                )))
            }
        }
        (Role::DepthwiseFilter, &[1, h, w, c]) => {
            if got == [c, 1, h, w] {
                Ok((chw_to_hwc(&values, [c, h, w]), true))
            } else {
                Err(bad(format!(
                    "{} ([1, kh, kw, C*mult]) or its torch form {}",
                    shape_text(expected),
                    shape_text(&[c, 1, h, w])
                )))
            }
        }
        (Role::FcWeights, &[out, inp]) => {
            let hint = if got == [inp, out] {
                " (the file looks like a Keras [in, out] kernel: transpose it)"
            } else {
                ""
            };
            Err(bad(format!(
                "{} ([out, in], as torch.nn.Linear stores it){hint}",
                shape_text(expected)
            )))
        }
        _ => Err(bad(shape_text(expected))),
    }
}

/// Converts checked f64 values into the graph tensor's little-endian bytes.
fn encode(name: &str, dtype: DType, values: &[f64]) -> Result<Vec<u8>, WeightsError> {
    let overflow = |index: usize, value: f64| WeightsError::OutOfRange {
        name: name.to_string(),
        index,
        value: format!("{value:?}"),
        dtype: dtype.name(),
    };
    match dtype {
        DType::F32 => {
            let mut out = Vec::with_capacity(values.len() * 4);
            for (i, &v) in values.iter().enumerate() {
                let x = v as f32;
                if !x.is_finite() {
                    return Err(overflow(i, v));
                }
                out.extend_from_slice(&x.to_le_bytes());
            }
            Ok(out)
        }
        DType::F16 => {
            let mut out = Vec::with_capacity(values.len() * 2);
            for (i, &v) in values.iter().enumerate() {
                let x = half::f16::from_f64(v);
                if !x.is_finite() {
                    return Err(overflow(i, v));
                }
                out.extend_from_slice(&x.to_le_bytes());
            }
            Ok(out)
        }
        DType::I8 | DType::I32 => Err(WeightsError::Quantized {
            name: name.to_string(),
            dtype: dtype.name(),
        }),
    }
}

/// Replaces constants of a float graph by the tensors of a safetensors file with the same names:
/// a retrained model becomes a new version of the same graph.
///
/// Every tensor of the file must name exactly one constant of the graph. Values may be F32, F16,
/// BF16 or F64; they are converted to the graph tensor's type (f32 in float graphs, f16 for f16
/// constants). The shape must be the graph's, or the same tensor in the source framework's
/// layout: an OIHW conv filter for an OHWI one, a `[C*mult, 1, kh, kw]` depthwise filter for a
/// `[1, kh, kw, C*mult]` one (both transposed here). Where the two layouts have the same shape
/// (e.g. `[8,3,3,3]`), the file is taken to be in the graph's layout. Fully-connected weights are
/// accepted as `[out, in]` only. With `require_all`, every float constant of the graph must be
/// in the file.
///
/// The graph is changed only if the whole file is accepted.
///
/// # Errors
/// The first problem found, checking the file's tensors in name order, then (with
/// `require_all`) the missing constants; see [`WeightsError`].
pub fn apply_weights(
    g: &mut Graph,
    safetensors_bytes: &[u8],
    require_all: bool,
) -> Result<WeightsReport, WeightsError> {
    let file =
        SafeTensors::deserialize(safetensors_bytes).map_err(|e| WeightsError::Malformed {
            reason: e.to_string(),
        })?;
    let mut by_name: HashMap<&str, Vec<TensorId>> = HashMap::new();
    for (id, t) in g.tensors.iter().enumerate() {
        if t.data.is_some() {
            by_name.entry(t.name.as_str()).or_default().push(id);
        }
    }
    let roles = graph_roles(g);
    let mut tensors = file.tensors();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));

    let mut updates: Vec<(TensorId, Vec<u8>)> = Vec::with_capacity(tensors.len());
    let mut report = WeightsReport {
        sha256: sha256_hex(safetensors_bytes),
        ..Default::default()
    };
    for (name, view) in &tensors {
        let id = match by_name.get(name.as_str()).map(Vec::as_slice) {
            Some(&[id]) => id,
            Some(ids) => {
                let list: Vec<String> = ids.iter().map(ToString::to_string).collect();
                return Err(WeightsError::AmbiguousName {
                    name: name.clone(),
                    count: ids.len(),
                    ids: list.join(", "),
                });
            }
            None => {
                return Err(WeightsError::UnknownTensor {
                    name: name.clone(),
                    known: name_list(
                        g.tensors
                            .iter()
                            .filter(|t| t.data.is_some())
                            .map(|t| t.name.as_str()),
                    ),
                })
            }
        };
        let target = &g.tensors[id];
        if matches!(target.dtype, DType::I8 | DType::I32) {
            return Err(WeightsError::Quantized {
                name: name.clone(),
                dtype: target.dtype.name(),
            });
        }
        let values = decode(name, view.dtype(), view.data())?;
        if let Some((index, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(WeightsError::NonFinite {
                name: name.clone(),
                index,
                value: format!("{v:?}"),
            });
        }
        let role = roles.get(&id).copied().unwrap_or(Role::Other);
        let (values, transposed) =
            to_graph_layout(name, role, &target.shape, view.shape(), values)?;
        updates.push((id, encode(name, target.dtype, &values)?));
        report.replaced.push(name.clone());
        if transposed {
            report.transposed.push(name.clone());
        }
    }
    if require_all {
        let present: HashSet<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
        let missing: Vec<&str> = g
            .tensors
            .iter()
            .filter(|t| t.data.is_some() && matches!(t.dtype, DType::F32 | DType::F16))
            .map(|t| t.name.as_str())
            .filter(|n| !present.contains(n))
            .collect();
        if !missing.is_empty() {
            return Err(WeightsError::Missing {
                count: missing.len(),
                names: name_list(missing),
            });
        }
    }
    for (id, data) in updates {
        g.tensors[id].data = Some(data);
    }
    Ok(report)
}

/// An owned tensor for the safetensors writer.
struct OwnedTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &OwnedTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }

    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn f32s(data: &[u8]) -> Vec<f32> {
    data.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn f32_bytes(values: impl IntoIterator<Item = f32>) -> Vec<u8> {
    values.into_iter().flat_map(f32::to_le_bytes).collect()
}

/// Quantization of one artifact tensor, expanded: one (scale, zero point) per slice along `axis`
/// (a single entry for per-tensor).
struct Scales {
    scales: Vec<f64>,
    zero_points: Vec<i32>,
    axis: usize,
}

impl Scales {
    fn of(model: &Model<'_>, t: &TensorDef) -> Result<Option<Self>, WeightsError> {
        let Some(q) = t.quant else {
            return Ok(None);
        };
        Ok(Some(match q.per_channel {
            Some(pc) => {
                let scales: Vec<f64> = f32s(model.weights_range(pc.scales)?)
                    .into_iter()
                    .map(f64::from)
                    .collect();
                Scales {
                    zero_points: vec![0; scales.len()],
                    scales,
                    axis: pc.axis as usize,
                }
            }
            None => Scales {
                scales: vec![f64::from(q.scale)],
                zero_points: vec![q.zero_point],
                axis: 0,
            },
        }))
    }

    /// The (scale, zero point) of element `i` of a tensor of shape `shape`.
    fn at(&self, shape: &[usize], i: usize) -> (f64, i32) {
        if self.scales.len() == 1 {
            return (self.scales[0], self.zero_points[0]);
        }
        let inner: usize = shape.iter().skip(self.axis + 1).product();
        let dim = shape.get(self.axis).copied().unwrap_or(1).max(1);
        let c = (i / inner.max(1)) % dim;
        (self.scales[c], self.zero_points[c])
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "scale": self.scales,
            "zero_point": self.zero_points,
            "axis": self.axis,
        })
    }
}

/// The scale of an int32 bias: input scale × weight scale (per output channel) of the op that
/// consumes it, as the int8 kernels use it.
fn bias_scales(
    model: &Model<'_>,
    defs: &[TensorDef],
    op: &OpDef,
) -> Result<Option<Scales>, WeightsError> {
    let get = |pos: usize| {
        op.inputs
            .get(pos)
            .filter(|&&i| i != NO_TENSOR)
            .and_then(|&i| defs.get(i as usize))
    };
    let (Some(input), Some(weights)) = (get(0), get(1)) else {
        return Ok(None);
    };
    let (Some(iq), Some(ws)) = (input.quant, Scales::of(model, weights)?) else {
        return Ok(None);
    };
    let si = f64::from(iq.scale);
    let scales: Vec<f64> = ws.scales.iter().map(|&sw| si * sw).collect();
    Ok(Some(Scales {
        zero_points: vec![0; scales.len()],
        scales,
        axis: 0,
    }))
}

/// Per-tensor names from the MANIFEST's optional `tensor_names` array (one entry per artifact
/// tensor, a string or null).
fn manifest_names(model: &Model<'_>) -> (Option<String>, Vec<Option<String>>) {
    let count = model.tensor_count() as usize;
    let Ok(Some(m)) = Manifest::of(model) else {
        return (None, vec![None; count]);
    };
    let names = serde_json::from_str::<serde_json::Value>(m.json)
        .ok()
        .and_then(|j| j.get("tensor_names").and_then(|n| n.as_array()).cloned())
        .filter(|a| a.len() == count)
        .map(|a| {
            a.iter()
                .map(|v| v.as_str().filter(|s| !s.is_empty()).map(str::to_string))
                .collect()
        })
        .unwrap_or_else(|| vec![None; count]);
    (Some(m.name.to_string()), names)
}

/// Writes every constant tensor of an artifact as a safetensors file.
///
/// The artifact is validated first, as a device would. Tensors are named by the MANIFEST's
/// `tensor_names` where it has them, and otherwise `t{index}_{op}_{role}` after the first op that
/// reads them (`t12_CONV_2D_weights`, `t13_CONV_2D_bias`, `t40_ADD_operand`), or `t{index}` for a
/// constant no op reads. Types are kept (I8, I32, F32, F16) and the quantization of int8 tensors
/// and int32 biases is recorded in the `quantization` metadata entry (JSON). With `dequantize`,
/// int8 tensors become F32 `scale * (q - zero_point)` (per channel along the quantized axis),
/// int32 biases of CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED become F32 `q * input_scale *
/// weight_scale` (per output channel), and f16 tensors become F32; an int32 constant that is no
/// such bias has no known scale and stays I32.
///
/// # Errors
/// The artifact does not validate ([`WeightsError::Artifact`]).
pub fn export_weights(artifact: &[u8], dequantize: bool) -> Result<Vec<u8>, WeightsError> {
    let aligned = AlignedBytes::new(artifact);
    let model = Model::load(aligned.as_slice())?;
    let defs = (0..model.tensor_count())
        .map(|i| model.tensor(i))
        .collect::<Result<Vec<_>, _>>()?;
    let ops = model
        .ops()
        .map(|r| r.map(|(_, op)| op))
        .collect::<Result<Vec<_>, _>>()?;
    // The first op that reads each tensor, and at which input position.
    let mut consumer: Vec<Option<(usize, usize)>> = vec![None; defs.len()];
    for (k, op) in ops.iter().enumerate() {
        for (pos, &t) in op.inputs.iter().enumerate() {
            if let Some(slot) = consumer.get_mut(t as usize) {
                slot.get_or_insert((k, pos));
            }
        }
    }
    let (model_name, given) = manifest_names(&model);

    let mut used: HashSet<String> = HashSet::new();
    let mut tensors: Vec<(String, OwnedTensor)> = Vec::new();
    let mut quantization = BTreeMap::new();
    for (i, t) in defs.iter().enumerate() {
        if !matches!(t.location, Location::Weights(_)) {
            continue;
        }
        let consumed = consumer[i].map(|(k, pos)| (&ops[k], pos));
        let generated = match consumed {
            Some((op, pos)) => {
                let weighted = matches!(
                    op.kind,
                    OpKind::Conv2d(_) | OpKind::DepthwiseConv2d(_) | OpKind::FullyConnected(_)
                );
                let role = match pos {
                    1 if weighted => "weights",
                    2 if weighted => "bias",
                    _ => "operand",
                };
                format!("t{i}_{}_{role}", op.kind.name())
            }
            None => format!("t{i}"),
        };
        let name = match &given[i] {
            Some(n) if !used.contains(n) => n.clone(),
            _ => generated,
        };
        used.insert(name.clone());

        let raw = model.constant(t)?;
        let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
        let scales = match t.dtype {
            DType::I8 => Scales::of(&model, t)?,
            DType::I32 => match consumed {
                Some((op, 2)) => bias_scales(&model, &defs, op)?,
                _ => None,
            },
            _ => None,
        };
        let (dtype, data) = match (t.dtype, dequantize, &scales) {
            (DType::I8, true, Some(s)) => (
                Dtype::F32,
                f32_bytes(raw.iter().enumerate().map(|(k, &q)| {
                    let (scale, zp) = s.at(&shape, k);
                    scale as f32 * ((q as i8) as i32 - zp) as f32
                })),
            ),
            (DType::I32, true, Some(s)) => (
                Dtype::F32,
                f32_bytes(raw.chunks_exact(4).enumerate().map(|(k, c)| {
                    let q = i32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    let (scale, _) = s.at(&shape, k);
                    (f64::from(q) * scale) as f32
                })),
            ),
            (DType::F16, true, _) => (
                Dtype::F32,
                f32_bytes(
                    raw.chunks_exact(2)
                        .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
                ),
            ),
            (DType::I8, _, _) => (Dtype::I8, raw.to_vec()),
            (DType::I32, _, _) => (Dtype::I32, raw.to_vec()),
            (DType::F32, _, _) => (Dtype::F32, raw.to_vec()),
            (DType::F16, _, _) => (Dtype::F16, raw.to_vec()),
        };
        if let (Some(s), Dtype::I8 | Dtype::I32) = (&scales, dtype) {
            quantization.insert(name.clone(), s.json());
        }
        debug_assert_eq!(data.len(), element_count(t) * dtype.bitsize() / 8);
        tensors.push((name, OwnedTensor { dtype, shape, data }));
    }

    let mut metadata = HashMap::from([
        ("format".to_string(), "kiln-weights".to_string()),
        (
            "kiln_version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        ),
        ("artifact_sha256".to_string(), sha256_hex(artifact)),
        ("dequantized".to_string(), dequantize.to_string()),
    ]);
    if let Some(n) = model_name {
        metadata.insert("model".to_string(), n);
    }
    if !quantization.is_empty() {
        metadata.insert(
            "quantization".to_string(),
            serde_json::Value::from(serde_json::Map::from_iter(quantization)).to_string(),
        );
    }
    safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
        .map_err(|e| WeightsError::Write(e.to_string()))
}
