//! TFLite (`.tflite` flatbuffer, schema version 3) importer into the host IR.
//!
//! The flatbuffer is read through the `flatbuffers` crate's table API, without generated code:
//! small typed wrappers over [`flatbuffers::Table`] declare the fields Kiln reads, and the same
//! declarations drive a [`flatbuffers::Verifier`] pass over the whole buffer before any field is
//! read. Malformed input is therefore an [`TfliteError`], never a panic or an out-of-bounds read.
//!
//! Only subgraph 0 is imported. Constant parameter operands (RESHAPE's shape, SQUEEZE and
//! EXPAND_DIMS axes, PAD's paddings and constant value, MEAN's axes) are folded into
//! [`OpKind`] and the tensors that serve only as such parameters are left out of the graph, so
//! [`TensorId`]s are TFLite tensor indices with those tensors skipped (order is preserved and
//! names are kept).

use std::collections::HashSet;

use flatbuffers::{
    Follow, ForwardsUOffset, InvalidFlatbuffer, Table, TableVerifier, Vector, Verifiable, Verifier,
};
use kiln_runtime::graph::{Activation, DType};

use crate::ir::{Graph, Op, OpKind, Padding, QuantInfo, Tensor, TensorId};

/// Why a TFLite model could not be imported.
#[derive(Debug, thiserror::Error)]
pub enum TfliteError {
    /// The file is not a well-formed TFLite model.
    #[error("malformed TFLite model: {0}")]
    Malformed(String),
    /// The model uses an operator Kiln has no kernel for.
    #[error("unsupported op {name} at operator index {index}")]
    UnsupportedOp {
        /// Builtin operator name (`LSTM`, `BUILTIN_<n>` when unknown) or `CUSTOM:<code>`.
        name: String,
        /// Index of the operator in subgraph 0.
        index: usize,
    },
    /// The model uses a feature Kiln does not support (tensor type, fused activation, ...).
    #[error("unsupported TFLite feature: {0}")]
    Unsupported(String),
}

type Result<T> = std::result::Result<T, TfliteError>;

fn malformed<T>(msg: impl Into<String>) -> Result<T> {
    Err(TfliteError::Malformed(msg.into()))
}

fn unsupported<T>(msg: impl Into<String>) -> Result<T> {
    Err(TfliteError::Unsupported(msg.into()))
}

// ---------------------------------------------------------------------------------------------
// Flatbuffer access: typed table wrappers whose verifier and accessors share one field list.
// ---------------------------------------------------------------------------------------------

/// Declares a wrapper over a flatbuffer table. Each field is `name: FollowType = vtable_offset`;
/// the generated [`Verifiable`] impl visits exactly those fields with exactly those types, and
/// the generated accessors read them (returning `None` when absent, so callers apply the schema
/// default). An optional `extra = path` runs additional verification (unions).
macro_rules! fb_table {
    (
        $(#[$meta:meta])*
        $name:ident {
            $($field:ident : $ty:ty = $vt:expr),* $(,)?
        }
        $(extra = $extra:path)?
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy)]
        struct $name<'a>(Table<'a>);

        impl<'a> Follow<'a> for $name<'a> {
            type Inner = $name<'a>;
            unsafe fn follow(buf: &'a [u8], loc: usize) -> Self::Inner {
                // SAFETY: forwarded contract: `loc` holds a table of this type, and (by this
                // module's construction) it has been checked by this type's verifier.
                $name(unsafe { Table::new(buf, loc) })
            }
        }

        impl<'a> Verifiable for $name<'a> {
            fn run_verifier(
                v: &mut Verifier,
                pos: usize,
            ) -> std::result::Result<(), InvalidFlatbuffer> {
                let tv = v.visit_table(pos)?;
                $(let tv = tv.visit_field::<$ty>(stringify!($field), $vt, false)?;)*
                $(let tv = $extra(tv)?;)?
                tv.finish();
                Ok(())
            }
        }

        #[allow(dead_code)]
        impl<'a> $name<'a> {
            $(
                fn $field(&self) -> Option<<$ty as Follow<'a>>::Inner> {
                    // SAFETY: wrappers are only created from a buffer that passed
                    // `flatbuffers::root`, which ran this type's verifier, and that verifier
                    // visited this field at this vtable offset with this same type.
                    unsafe { self.0.get::<$ty>($vt, None) }
                }
            )*

            /// Whether the field at vtable offset `vt` is present (without reading it).
            fn has_field(&self, vt: u16) -> bool {
                // The vtable itself was bounds-checked by `visit_table`; `VTable::get` checks
                // `vt` against the vtable's length.
                self.0.vtable().get(vt) != 0
            }
        }
    };
}

type Bytes<'a> = ForwardsUOffset<Vector<'a, u8>>;
type Ints<'a> = ForwardsUOffset<Vector<'a, i32>>;
type Tables<'a, T> = ForwardsUOffset<Vector<'a, ForwardsUOffset<T>>>;

fb_table! {
    /// `table Model`.
    Model {
        version: u32 = 4,
        operator_codes: Tables<'a, OperatorCode<'a>> = 6,
        subgraphs: Tables<'a, SubGraph<'a>> = 8,
        description: Bytes<'a> = 10,
        buffers: Tables<'a, Buffer<'a>> = 12,
    }
}

fb_table! {
    /// `table OperatorCode`.
    OperatorCode {
        deprecated_builtin_code: i8 = 4,
        custom_code: Bytes<'a> = 6,
        version: i32 = 8,
        builtin_code: i32 = 10,
    }
}

fb_table! {
    /// `table SubGraph`.
    SubGraph {
        tensors: Tables<'a, TfTensor<'a>> = 4,
        inputs: Ints<'a> = 6,
        outputs: Ints<'a> = 8,
        operators: Tables<'a, Operator<'a>> = 10,
        name: Bytes<'a> = 12,
    }
}

/// vtable offset of `Tensor.sparsity`.
const VT_TENSOR_SPARSITY: u16 = 16;

fb_table! {
    /// `table Tensor`.
    TfTensor {
        shape: Ints<'a> = 4,
        ty: i8 = 6,
        buffer: u32 = 8,
        name: Bytes<'a> = 10,
        quantization: ForwardsUOffset<QuantParams<'a>> = 12,
        is_variable: bool = 14,
    }
}

fb_table! {
    /// `table QuantizationParameters` (the `details` union is only checked for absence).
    QuantParams {
        min: ForwardsUOffset<Vector<'a, f32>> = 4,
        max: ForwardsUOffset<Vector<'a, f32>> = 6,
        scale: ForwardsUOffset<Vector<'a, f32>> = 8,
        zero_point: ForwardsUOffset<Vector<'a, i64>> = 10,
        details_type: u8 = 12,
        quantized_dimension: i32 = 16,
    }
}

fb_table! {
    /// `table Buffer`.
    Buffer {
        data: Bytes<'a> = 4,
        offset: u64 = 6,
        size: u64 = 8,
    }
}

/// vtable offsets of `Operator.builtin_options_type` and `Operator.builtin_options`.
const VT_OP_OPTIONS_TYPE: u16 = 10;
const VT_OP_OPTIONS: u16 = 12;

fb_table! {
    /// `table Operator`. `builtin_options` is read through [`Operator::options`] only.
    Operator {
        opcode_index: u32 = 4,
        inputs: Ints<'a> = 6,
        outputs: Ints<'a> = 8,
        builtin_options_type: u8 = VT_OP_OPTIONS_TYPE,
    }
    extra = verify_builtin_options
}

/// An options table that is a member of the `BuiltinOptions` union.
trait OptionsTable<'a>: Follow<'a, Inner = Self> + Verifiable + Sized + 'a {
    /// Its discriminant in `BuiltinOptions`.
    const UNION_TYPE: u8;
    /// Its schema name, for messages.
    const NAME: &'static str;
}

macro_rules! options_tables {
    ($($name:ident = $tag:expr),* $(,)?) => {
        $(impl<'a> OptionsTable<'a> for $name<'a> {
            const UNION_TYPE: u8 = $tag;
            const NAME: &'static str = stringify!($name);
        })*

        /// Verifies `builtin_options` as the table its `builtin_options_type` names, for the
        /// options types this importer reads. Other variants are never read, so not verified.
        fn verify_builtin_options<'v, 'o, 'b>(
            mut tv: TableVerifier<'v, 'o, 'b>,
        ) -> std::result::Result<TableVerifier<'v, 'o, 'b>, InvalidFlatbuffer> {
            let tag = match tv.deref(VT_OP_OPTIONS_TYPE)? {
                Some(pos) => tv.verifier().get_u8(pos)?,
                None => 0,
            };
            if let Some(pos) = tv.deref(VT_OP_OPTIONS)? {
                $(if tag == $tag {
                    <ForwardsUOffset<$name>>::run_verifier(tv.verifier(), pos)?;
                })*
            }
            Ok(tv)
        }
    };
}

options_tables! {
    Conv2DOptions = 1,
    DepthwiseConv2DOptions = 2,
    Pool2DOptions = 5,
    FullyConnectedOptions = 8,
    SoftmaxOptions = 9,
    ConcatenationOptions = 10,
    AddOptions = 11,
    MulOptions = 21,
    ReducerOptions = 27,
}

impl<'a> Operator<'a> {
    /// The builtin options, if present and of type `T`. A different options type is an error
    /// (reading it as `T` would be meaningless); absent options give `None` (schema defaults).
    fn options<T: OptionsTable<'a>>(&self, what: &dyn Fn() -> String) -> Result<Option<T>> {
        let tag = self.builtin_options_type().unwrap_or(0);
        if tag == 0 || !self.has_field(VT_OP_OPTIONS) {
            return Ok(None);
        }
        if tag != T::UNION_TYPE {
            return malformed(format!(
                "{} has builtin options of union type {tag}, expected {} ({})",
                what(),
                T::NAME,
                T::UNION_TYPE
            ));
        }
        // SAFETY: `verify_builtin_options` verified the value at this offset as `T`, because the
        // discriminant equals `T::UNION_TYPE` (checked just above).
        Ok(unsafe { self.0.get::<ForwardsUOffset<T>>(VT_OP_OPTIONS, None) })
    }
}

fb_table! {
    /// `table Conv2DOptions`.
    Conv2DOptions {
        padding: i8 = 4,
        stride_w: i32 = 6,
        stride_h: i32 = 8,
        fused_activation_function: i8 = 10,
        dilation_w_factor: i32 = 12,
        dilation_h_factor: i32 = 14,
    }
}

fb_table! {
    /// `table DepthwiseConv2DOptions`.
    DepthwiseConv2DOptions {
        padding: i8 = 4,
        stride_w: i32 = 6,
        stride_h: i32 = 8,
        depth_multiplier: i32 = 10,
        fused_activation_function: i8 = 12,
        dilation_w_factor: i32 = 14,
        dilation_h_factor: i32 = 16,
    }
}

fb_table! {
    /// `table Pool2DOptions`.
    Pool2DOptions {
        padding: i8 = 4,
        stride_w: i32 = 6,
        stride_h: i32 = 8,
        filter_width: i32 = 10,
        filter_height: i32 = 12,
        fused_activation_function: i8 = 14,
    }
}

fb_table! {
    /// `table FullyConnectedOptions`.
    FullyConnectedOptions {
        fused_activation_function: i8 = 4,
        weights_format: i8 = 6,
        keep_num_dims: bool = 8,
    }
}

fb_table! {
    /// `table SoftmaxOptions`.
    SoftmaxOptions {
        beta: f32 = 4,
    }
}

fb_table! {
    /// `table ConcatenationOptions`.
    ConcatenationOptions {
        axis: i32 = 4,
        fused_activation_function: i8 = 6,
    }
}

fb_table! {
    /// `table AddOptions`.
    AddOptions {
        fused_activation_function: i8 = 4,
    }
}

fb_table! {
    /// `table MulOptions`.
    MulOptions {
        fused_activation_function: i8 = 4,
    }
}

fb_table! {
    /// `table ReducerOptions`.
    ReducerOptions {
        keep_dims: bool = 4,
    }
}

/// `opts.field()`, or the schema default when the options table or the field is absent.
macro_rules! opt {
    ($opts:expr, $field:ident, $default:expr) => {
        $opts.and_then(|t| t.$field()).unwrap_or($default)
    };
}

/// Vector of tables as a Rust `Vec` (absent → empty).
fn table_vec<'a, T: Follow<'a, Inner = T> + 'a>(
    v: Option<Vector<'a, ForwardsUOffset<T>>>,
) -> Vec<T> {
    v.map(|v| v.iter().collect()).unwrap_or_default()
}

/// Vector of ints as a Rust `Vec` (absent → empty).
fn int_vec(v: Option<Vector<'_, i32>>) -> Vec<i32> {
    v.map(|v| v.iter().collect()).unwrap_or_default()
}

/// A flatbuffer string read as bytes, decoded leniently.
fn string(v: Option<Vector<'_, u8>>) -> String {
    v.map(|v| String::from_utf8_lossy(v.bytes()).into_owned())
        .unwrap_or_default()
}

/// One line describing a verifier failure.
fn describe_invalid(e: &InvalidFlatbuffer) -> String {
    let text = e.to_string();
    let parts: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    parts.join(", ")
}

// ---------------------------------------------------------------------------------------------
// Schema enums.
// ---------------------------------------------------------------------------------------------

mod op {
    pub const ADD: i32 = 0;
    pub const AVERAGE_POOL_2D: i32 = 1;
    pub const CONCATENATION: i32 = 2;
    pub const CONV_2D: i32 = 3;
    pub const DEPTHWISE_CONV_2D: i32 = 4;
    pub const DEQUANTIZE: i32 = 6;
    pub const FULLY_CONNECTED: i32 = 9;
    pub const LOGISTIC: i32 = 14;
    pub const MAX_POOL_2D: i32 = 17;
    pub const MUL: i32 = 18;
    pub const RELU: i32 = 19;
    pub const RELU6: i32 = 21;
    pub const RESHAPE: i32 = 22;
    pub const SOFTMAX: i32 = 25;
    pub const TANH: i32 = 28;
    pub const CUSTOM: i32 = 32;
    pub const PAD: i32 = 34;
    pub const MEAN: i32 = 40;
    pub const SQUEEZE: i32 = 43;
    pub const PADV2: i32 = 60;
    pub const EXPAND_DIMS: i32 = 70;
    pub const QUANTIZE: i32 = 114;
}

/// `BuiltinOperator` names, indexed by code.
const BUILTIN_NAMES: [&str; 162] = [
    "ADD",
    "AVERAGE_POOL_2D",
    "CONCATENATION",
    "CONV_2D",
    "DEPTHWISE_CONV_2D",
    "DEPTH_TO_SPACE",
    "DEQUANTIZE",
    "EMBEDDING_LOOKUP",
    "FLOOR",
    "FULLY_CONNECTED",
    "HASHTABLE_LOOKUP",
    "L2_NORMALIZATION",
    "L2_POOL_2D",
    "LOCAL_RESPONSE_NORMALIZATION",
    "LOGISTIC",
    "LSH_PROJECTION",
    "LSTM",
    "MAX_POOL_2D",
    "MUL",
    "RELU",
    "RELU_N1_TO_1",
    "RELU6",
    "RESHAPE",
    "RESIZE_BILINEAR",
    "RNN",
    "SOFTMAX",
    "SPACE_TO_DEPTH",
    "SVDF",
    "TANH",
    "CONCAT_EMBEDDINGS",
    "SKIP_GRAM",
    "CALL",
    "CUSTOM",
    "EMBEDDING_LOOKUP_SPARSE",
    "PAD",
    "UNIDIRECTIONAL_SEQUENCE_RNN",
    "GATHER",
    "BATCH_TO_SPACE_ND",
    "SPACE_TO_BATCH_ND",
    "TRANSPOSE",
    "MEAN",
    "SUB",
    "DIV",
    "SQUEEZE",
    "UNIDIRECTIONAL_SEQUENCE_LSTM",
    "STRIDED_SLICE",
    "BIDIRECTIONAL_SEQUENCE_RNN",
    "EXP",
    "TOPK_V2",
    "SPLIT",
    "LOG_SOFTMAX",
    "DELEGATE",
    "BIDIRECTIONAL_SEQUENCE_LSTM",
    "CAST",
    "PRELU",
    "MAXIMUM",
    "ARG_MAX",
    "MINIMUM",
    "LESS",
    "NEG",
    "PADV2",
    "GREATER",
    "GREATER_EQUAL",
    "LESS_EQUAL",
    "SELECT",
    "SLICE",
    "SIN",
    "TRANSPOSE_CONV",
    "SPARSE_TO_DENSE",
    "TILE",
    "EXPAND_DIMS",
    "EQUAL",
    "NOT_EQUAL",
    "LOG",
    "SUM",
    "SQRT",
    "RSQRT",
    "SHAPE",
    "POW",
    "ARG_MIN",
    "FAKE_QUANT",
    "REDUCE_PROD",
    "REDUCE_MAX",
    "PACK",
    "LOGICAL_OR",
    "ONE_HOT",
    "LOGICAL_AND",
    "LOGICAL_NOT",
    "UNPACK",
    "REDUCE_MIN",
    "FLOOR_DIV",
    "REDUCE_ANY",
    "SQUARE",
    "ZEROS_LIKE",
    "FILL",
    "FLOOR_MOD",
    "RANGE",
    "RESIZE_NEAREST_NEIGHBOR",
    "LEAKY_RELU",
    "SQUARED_DIFFERENCE",
    "MIRROR_PAD",
    "ABS",
    "SPLIT_V",
    "UNIQUE",
    "CEIL",
    "REVERSE_V2",
    "ADD_N",
    "GATHER_ND",
    "COS",
    "WHERE",
    "RANK",
    "ELU",
    "REVERSE_SEQUENCE",
    "MATRIX_DIAG",
    "QUANTIZE",
    "MATRIX_SET_DIAG",
    "ROUND",
    "HARD_SWISH",
    "IF",
    "WHILE",
    "NON_MAX_SUPPRESSION_V4",
    "NON_MAX_SUPPRESSION_V5",
    "SCATTER_ND",
    "SELECT_V2",
    "DENSIFY",
    "SEGMENT_SUM",
    "BATCH_MATMUL",
    "PLACEHOLDER_FOR_GREATER_OP_CODES",
    "CUMSUM",
    "CALL_ONCE",
    "BROADCAST_TO",
    "RFFT2D",
    "CONV_3D",
    "IMAG",
    "REAL",
    "COMPLEX_ABS",
    "HASHTABLE",
    "HASHTABLE_FIND",
    "HASHTABLE_IMPORT",
    "HASHTABLE_SIZE",
    "REDUCE_ALL",
    "CONV_3D_TRANSPOSE",
    "VAR_HANDLE",
    "READ_VARIABLE",
    "ASSIGN_VARIABLE",
    "BROADCAST_ARGS",
    "RANDOM_STANDARD_NORMAL",
    "BUCKETIZE",
    "RANDOM_UNIFORM",
    "MULTINOMIAL",
    "GELU",
    "DYNAMIC_UPDATE_SLICE",
    "RELU_0_TO_1",
    "UNSORTED_SEGMENT_PROD",
    "UNSORTED_SEGMENT_MAX",
    "UNSORTED_SEGMENT_SUM",
    "ATAN2",
    "UNSORTED_SEGMENT_MIN",
    "SIGN",
    "BITCAST",
    "BITWISE_XOR",
    "RIGHT_SHIFT",
];

/// The schema name of builtin operator `code` (`BUILTIN_<n>` when unknown).
pub fn builtin_op_name(code: i32) -> String {
    usize::try_from(code)
        .ok()
        .and_then(|c| BUILTIN_NAMES.get(c))
        .map_or_else(|| format!("BUILTIN_{code}"), |s| (*s).to_string())
}

mod tensor_type {
    pub const FLOAT32: i8 = 0;
    pub const FLOAT16: i8 = 1;
    pub const INT32: i8 = 2;
    pub const INT64: i8 = 4;
    pub const INT8: i8 = 9;
}

/// `TensorType` names, indexed by value.
const TENSOR_TYPE_NAMES: [&str; 19] = [
    "FLOAT32",
    "FLOAT16",
    "INT32",
    "UINT8",
    "INT64",
    "STRING",
    "BOOL",
    "INT16",
    "COMPLEX64",
    "INT8",
    "FLOAT64",
    "COMPLEX128",
    "UINT64",
    "RESOURCE",
    "VARIANT",
    "UINT32",
    "UINT16",
    "INT4",
    "BFLOAT16",
];

fn tensor_type_name(ty: i8) -> String {
    usize::try_from(ty)
        .ok()
        .and_then(|t| TENSOR_TYPE_NAMES.get(t))
        .map_or_else(|| format!("TYPE_{ty}"), |s| (*s).to_string())
}

/// Bytes per element, for types with a fixed element size.
fn tensor_type_size(ty: i8) -> Option<usize> {
    Some(match ty {
        3 | 6 | 9 => 1,       // UINT8, BOOL, INT8
        1 | 7 | 16 | 18 => 2, // FLOAT16, INT16, UINT16, BFLOAT16
        0 | 2 | 15 => 4,      // FLOAT32, INT32, UINT32
        4 | 8 | 10 | 12 => 8, // INT64, COMPLEX64, FLOAT64, UINT64
        11 => 16,             // COMPLEX128
        _ => return None,
    })
}

fn dtype_of(ty: i8) -> Option<DType> {
    match ty {
        tensor_type::FLOAT32 => Some(DType::F32),
        tensor_type::FLOAT16 => Some(DType::F16),
        tensor_type::INT32 => Some(DType::I32),
        tensor_type::INT8 => Some(DType::I8),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Import.
// ---------------------------------------------------------------------------------------------

/// A TFLite tensor after structural validation (dtype not yet checked).
struct RawTensor<'b> {
    name: String,
    ty: i8,
    shape: Vec<usize>,
    data: Option<&'b [u8]>,
    quant: Option<QuantInfo>,
}

impl RawTensor<'_> {
    fn elements(&self) -> usize {
        // Checked not to overflow when the tensor was read.
        self.shape.iter().product()
    }
}

/// A TFLite operator with its operator code resolved.
struct RawOp<'a> {
    code: i32,
    inputs: Vec<i32>,
    outputs: Vec<i32>,
    table: Operator<'a>,
}

/// Converts a `.tflite` file into the host IR.
///
/// Verifies the whole flatbuffer first, then validates indices, shapes, buffers and
/// quantization as it converts; every problem is an error, never a panic.
pub fn import_tflite(bytes: &[u8]) -> Result<Graph> {
    if bytes.len() < 8 {
        return malformed(format!(
            "file is {} bytes, too short for a flatbuffer header",
            bytes.len()
        ));
    }
    if bytes.get(4..8) != Some(b"TFL3".as_slice()) {
        return malformed(format!(
            "file identifier is {:?}, expected \"TFL3\"",
            String::from_utf8_lossy(&bytes[4..8])
        ));
    }
    let model = flatbuffers::root::<Model>(bytes).map_err(|e| {
        TfliteError::Malformed(format!(
            "flatbuffer verification failed: {}",
            describe_invalid(&e)
        ))
    })?;

    let version = model.version().unwrap_or(0);
    if version != 3 {
        return unsupported(format!(
            "schema version {version} (only version 3 is supported)"
        ));
    }

    let subgraphs = table_vec(model.subgraphs());
    let subgraph = match subgraphs.as_slice() {
        [] => return malformed("model has no subgraphs"),
        [sg] => *sg,
        more => {
            return unsupported(format!(
                "model has {} subgraphs (only single-subgraph models are supported)",
                more.len()
            ))
        }
    };

    // Operator codes → (effective builtin code, custom code).
    let codes: Vec<(i32, String)> = table_vec(model.operator_codes())
        .iter()
        .map(|c| {
            let deprecated = i32::from(c.deprecated_builtin_code().unwrap_or(0));
            let builtin = c.builtin_code().unwrap_or(0);
            (deprecated.max(builtin), string(c.custom_code()))
        })
        .collect();

    // Resolve every operator's code and reject unsupported ops before looking at tensors, so a
    // model with an unsupported op reports the op rather than, say, one of its tensor types.
    let mut ops = Vec::new();
    for (index, table) in table_vec(subgraph.operators()).into_iter().enumerate() {
        let opcode_index = table.opcode_index().unwrap_or(0);
        let Some((code, custom)) = usize::try_from(opcode_index)
            .ok()
            .and_then(|i| codes.get(i))
        else {
            return malformed(format!(
                "operator {index} references operator code {opcode_index} but the model has {} \
                 operator codes",
                codes.len()
            ));
        };
        if *code == op::CUSTOM {
            return Err(TfliteError::UnsupportedOp {
                name: format!("CUSTOM:{custom}"),
                index,
            });
        }
        if !is_supported(*code) {
            return Err(TfliteError::UnsupportedOp {
                name: builtin_op_name(*code),
                index,
            });
        }
        ops.push(RawOp {
            code: *code,
            inputs: int_vec(table.inputs()),
            outputs: int_vec(table.outputs()),
            table,
        });
    }

    let buffers = table_vec(model.buffers());
    let tf_tensors = table_vec(subgraph.tensors());
    let mut raw = Vec::with_capacity(tf_tensors.len());
    for (i, t) in tf_tensors.iter().enumerate() {
        raw.push(read_tensor(bytes, &buffers, i, t)?);
    }

    let graph_inputs = tensor_indices(&int_vec(subgraph.inputs()), raw.len(), "graph input")?;
    let graph_outputs = tensor_indices(&int_vec(subgraph.outputs()), raw.len(), "graph output")?;

    // Which tensors serve only as folded parameters (and so are not emitted)?
    let n = raw.len();
    let mut param_use = vec![false; n];
    let mut other_use = vec![false; n];
    for &i in graph_inputs.iter().chain(&graph_outputs) {
        other_use[i] = true;
    }
    for (index, o) in ops.iter().enumerate() {
        let params = param_positions(o.code);
        for (pos, &t) in o.inputs.iter().enumerate() {
            if t == -1 {
                continue; // absent optional input
            }
            let Some(t) = usize::try_from(t).ok().filter(|&t| t < n) else {
                return malformed(format!(
                    "operator {index} ({}) input {pos} references tensor {t} but the subgraph \
                     has {n} tensors",
                    builtin_op_name(o.code)
                ));
            };
            if params.contains(&pos) {
                param_use[t] = true;
            } else {
                other_use[t] = true;
            }
        }
        for (pos, &t) in o.outputs.iter().enumerate() {
            let Some(t) = usize::try_from(t).ok().filter(|&t| t < n) else {
                return malformed(format!(
                    "operator {index} ({}) output {pos} references tensor {t} but the subgraph \
                     has {n} tensors",
                    builtin_op_name(o.code)
                ));
            };
            other_use[t] = true;
        }
    }

    // Emit tensors. Buffers may be shared between tensors, so bound the total copied constant
    // data: a hostile file could otherwise point many tensors at one large buffer.
    let copy_limit = bytes.len().saturating_mul(4);
    let mut copied = 0usize;
    let mut ids: Vec<Option<TensorId>> = vec![None; n];
    let mut tensors = Vec::with_capacity(n);
    for (i, t) in raw.iter().enumerate() {
        if param_use[i] && !other_use[i] {
            continue;
        }
        copied = copied.saturating_add(t.data.map_or(0, <[u8]>::len));
        if copied > copy_limit {
            return malformed(format!(
                "constant tensors reference more than {copy_limit} bytes of buffer data in a \
                 {}-byte file",
                bytes.len()
            ));
        }
        let Some(dtype) = dtype_of(t.ty) else {
            return unsupported(format!(
                "tensor {i} '{}' has type {}, which Kiln does not support",
                t.name,
                tensor_type_name(t.ty)
            ));
        };
        if let (Some(q), DType::I8) = (&t.quant, dtype) {
            if let Some(zp) = q.zero_points.iter().find(|z| !(-128..=127).contains(*z)) {
                return malformed(format!(
                    "tensor {i} '{}' is int8 but has zero point {zp}",
                    t.name
                ));
            }
        }
        ids[i] = Some(tensors.len());
        tensors.push(Tensor {
            name: t.name.clone(),
            dtype,
            shape: t.shape.clone(),
            data: t.data.map(<[u8]>::to_vec),
            quant: t.quant.clone(),
        });
    }

    let ctx = Ctx {
        raw: &raw,
        ids: &ids,
    };
    let mut ir_ops = Vec::with_capacity(ops.len());
    for (index, o) in ops.iter().enumerate() {
        ir_ops.push(ctx.convert_op(index, o)?);
    }

    let map_io = |list: &[usize]| -> Vec<TensorId> {
        // Graph I/O tensors are never parameter-only, so they were all emitted.
        list.iter().filter_map(|&i| ids[i]).collect()
    };
    let graph = Graph {
        name: {
            let name = string(subgraph.name());
            if name.is_empty() {
                string(model.description())
            } else {
                name
            }
        },
        inputs: map_io(&graph_inputs),
        outputs: map_io(&graph_outputs),
        tensors,
        ops: ir_ops,
    };
    check_execution_order(&graph)?;
    Ok(graph)
}

fn is_supported(code: i32) -> bool {
    matches!(
        code,
        op::ADD
            | op::AVERAGE_POOL_2D
            | op::CONCATENATION
            | op::CONV_2D
            | op::DEPTHWISE_CONV_2D
            | op::DEQUANTIZE
            | op::FULLY_CONNECTED
            | op::LOGISTIC
            | op::MAX_POOL_2D
            | op::MUL
            | op::RELU
            | op::RELU6
            | op::RESHAPE
            | op::SOFTMAX
            | op::TANH
            | op::PAD
            | op::PADV2
            | op::MEAN
            | op::SQUEEZE
            | op::EXPAND_DIMS
            | op::QUANTIZE
    )
}

/// Input positions that are constant parameters folded into the op kind.
fn param_positions(code: i32) -> &'static [usize] {
    match code {
        op::RESHAPE | op::EXPAND_DIMS | op::MEAN => &[1],
        op::PAD | op::PADV2 => &[1, 2],
        _ => &[],
    }
}

fn tensor_indices(list: &[i32], n: usize, what: &str) -> Result<Vec<usize>> {
    list.iter()
        .map(|&t| match usize::try_from(t) {
            Ok(i) if i < n => Ok(i),
            _ => malformed(format!(
                "{what} references tensor {t} but the subgraph has {n} tensors"
            )),
        })
        .collect()
}

/// Reads and structurally validates tensor `i`.
fn read_tensor<'b>(
    bytes: &'b [u8],
    buffers: &[Buffer<'b>],
    i: usize,
    t: &TfTensor<'b>,
) -> Result<RawTensor<'b>> {
    let name = string(t.name());
    let ty = t.ty().unwrap_or(0);
    if t.has_field(VT_TENSOR_SPARSITY) {
        return unsupported(format!("tensor {i} '{name}' is sparse"));
    }
    if t.is_variable().unwrap_or(false) {
        return unsupported(format!("tensor {i} '{name}' is a variable tensor"));
    }

    let dims = int_vec(t.shape());
    let mut shape = Vec::with_capacity(dims.len());
    let mut elements: usize = 1;
    for &d in &dims {
        let Ok(d) = usize::try_from(d) else {
            if d == -1 {
                return unsupported(format!(
                    "tensor {i} '{name}' has a dynamic dimension in shape {dims:?}"
                ));
            }
            return malformed(format!("tensor {i} '{name}' has negative dimension {d}"));
        };
        elements = elements.checked_mul(d).ok_or_else(|| {
            TfliteError::Malformed(format!("tensor {i} '{name}' shape {dims:?} is too large"))
        })?;
        shape.push(d);
    }

    let buffer_index = t.buffer().unwrap_or(0);
    let Some(buffer) = usize::try_from(buffer_index)
        .ok()
        .and_then(|b| buffers.get(b))
    else {
        return malformed(format!(
            "tensor {i} '{name}' references buffer {buffer_index} but the model has {} buffers",
            buffers.len()
        ));
    };
    let data = buffer_data(bytes, buffer, buffer_index)?;
    let data = (!data.is_empty()).then_some(data);
    if let (Some(data), Some(size)) = (data, tensor_type_size(ty)) {
        let expected = elements.checked_mul(size);
        if expected != Some(data.len()) {
            return malformed(format!(
                "tensor {i} '{name}' of type {} and shape {dims:?} needs {} bytes but buffer \
                 {buffer_index} holds {}",
                tensor_type_name(ty),
                expected.map_or_else(|| "too many".to_string(), |e| e.to_string()),
                data.len()
            ));
        }
    }

    let quant = match t.quantization() {
        Some(q) => read_quant(q, i, &name, &shape)?,
        None => None,
    };
    Ok(RawTensor {
        name,
        ty,
        shape,
        data,
        quant,
    })
}

/// The bytes of a buffer: inline `data`, or `size` bytes at file `offset` for models that keep
/// their buffers outside the flatbuffer (`offset` 0 and 1 mean "not set").
fn buffer_data<'b>(bytes: &'b [u8], buffer: &Buffer<'b>, index: u32) -> Result<&'b [u8]> {
    let inline = buffer.data().map_or(&[][..], |d| d.bytes());
    let offset = buffer.offset().unwrap_or(0);
    let size = buffer.size().unwrap_or(0);
    if offset <= 1 {
        return Ok(inline);
    }
    if !inline.is_empty() {
        return malformed(format!(
            "buffer {index} has both inline data and an external offset"
        ));
    }
    let range = usize::try_from(offset).ok().and_then(|start| {
        let end = start.checked_add(usize::try_from(size).ok()?)?;
        bytes.get(start..end)
    });
    range.ok_or_else(|| {
        TfliteError::Malformed(format!(
            "buffer {index} refers to {size} bytes at file offset {offset} but the file is {} \
             bytes",
            bytes.len()
        ))
    })
}

fn read_quant(
    q: QuantParams<'_>,
    i: usize,
    name: &str,
    shape: &[usize],
) -> Result<Option<QuantInfo>> {
    if q.details_type().unwrap_or(0) != 0 {
        return unsupported(format!(
            "tensor {i} '{name}' uses custom quantization details"
        ));
    }
    let scales: Vec<f32> = q.scale().map(|v| v.iter().collect()).unwrap_or_default();
    if scales.is_empty() {
        // min/max only (or nothing): not quantized as far as Kiln is concerned.
        return Ok(None);
    }
    if let Some(s) = scales.iter().find(|s| !s.is_finite() || **s < 0.0) {
        return malformed(format!(
            "tensor {i} '{name}' has invalid quantization scale {s}"
        ));
    }
    let mut zero_points: Vec<i64> = q
        .zero_point()
        .map(|v| v.iter().collect())
        .unwrap_or_default();
    if zero_points.is_empty() {
        zero_points = vec![0; scales.len()];
    }
    if zero_points.len() != scales.len() {
        return malformed(format!(
            "tensor {i} '{name}' has {} quantization scales but {} zero points",
            scales.len(),
            zero_points.len()
        ));
    }
    let dim = q.quantized_dimension().unwrap_or(0);
    let axis = usize::try_from(dim)
        .ok()
        .filter(|&a| a < shape.len().max(1));
    let axis = if scales.len() == 1 {
        axis.unwrap_or(0)
    } else {
        let Some(axis) = axis.filter(|&a| a < shape.len()) else {
            return malformed(format!(
                "tensor {i} '{name}' is quantized along dimension {dim} but has rank {}",
                shape.len()
            ));
        };
        if shape[axis] != scales.len() {
            return malformed(format!(
                "tensor {i} '{name}' has {} quantization scales but dimension {axis} of shape \
                 {shape:?} is {}",
                scales.len(),
                shape[axis]
            ));
        }
        axis
    };
    Ok(Some(QuantInfo {
        scales,
        zero_points,
        axis,
    }))
}

/// Shared state for converting operators.
struct Ctx<'r, 'b> {
    raw: &'r [RawTensor<'b>],
    ids: &'r [Option<TensorId>],
}

/// One operator being converted: index, name and operand lists, with checked accessors.
struct OpRef<'o> {
    index: usize,
    name: String,
    inputs: &'o [i32],
    outputs: &'o [i32],
    /// Number of tensors in the subgraph: accessors only return indices below it.
    tensors: usize,
}

impl OpRef<'_> {
    fn what(&self) -> String {
        format!("operator {} ({})", self.index, self.name)
    }

    fn arity(&self, inputs: std::ops::RangeInclusive<usize>, outputs: usize) -> Result<()> {
        if !inputs.contains(&self.inputs.len()) {
            let want = if inputs.start() == inputs.end() {
                inputs.start().to_string()
            } else if *inputs.end() == usize::MAX {
                format!("at least {}", inputs.start())
            } else {
                format!("{} to {}", inputs.start(), inputs.end())
            };
            return malformed(format!(
                "{} has {} inputs, expected {want}",
                self.what(),
                self.inputs.len()
            ));
        }
        if self.outputs.len() != outputs {
            return malformed(format!(
                "{} has {} outputs, expected {outputs}",
                self.what(),
                self.outputs.len()
            ));
        }
        Ok(())
    }

    /// TFLite index of optional input `pos` (`None` when absent or -1; other negative or
    /// out-of-range indices were rejected when parameter uses were collected).
    fn opt_input(&self, pos: usize) -> Option<usize> {
        self.inputs
            .get(pos)
            .and_then(|&t| usize::try_from(t).ok())
            .filter(|&t| t < self.tensors)
    }

    fn input(&self, pos: usize) -> Result<usize> {
        self.opt_input(pos).ok_or_else(|| {
            TfliteError::Malformed(format!("{} is missing required input {pos}", self.what()))
        })
    }

    fn output(&self, pos: usize) -> Result<usize> {
        let t = self.outputs.get(pos).and_then(|&t| usize::try_from(t).ok());
        t.filter(|&t| t < self.tensors).ok_or_else(|| {
            TfliteError::Malformed(format!("{} is missing output {pos}", self.what()))
        })
    }
}

fn activation(code: i8, what: &dyn Fn() -> String) -> Result<Activation> {
    match code {
        0 => Ok(Activation::None),
        1 => Ok(Activation::Relu),
        2 => Ok(Activation::ReluN1To1),
        3 => Ok(Activation::Relu6),
        4 => unsupported(format!("fused activation TANH on {}", what())),
        5 => unsupported(format!("fused activation SIGN_BIT on {}", what())),
        other => malformed(format!("{} has unknown fused activation {other}", what())),
    }
}

fn padding(code: i8, what: &dyn Fn() -> String) -> Result<Padding> {
    match code {
        0 => Ok(Padding::Same),
        1 => Ok(Padding::Valid),
        other => malformed(format!("{} has unknown padding {other}", what())),
    }
}

/// A stride, dilation or filter size: must be positive.
fn positive(v: i32, field: &str, what: &dyn Fn() -> String) -> Result<usize> {
    match usize::try_from(v) {
        Ok(v) if v > 0 => Ok(v),
        _ => malformed(format!(
            "{} has {field} {v}, which must be positive",
            what()
        )),
    }
}

impl Ctx<'_, '_> {
    /// Tensor `t`; `OpRef` accessors only hand out indices below `raw.len()`.
    fn tensor(&self, t: usize) -> &RawTensor<'_> {
        &self.raw[t]
    }

    /// The IR id of TFLite tensor `t`, which must have been emitted.
    fn id(&self, t: usize, o: &OpRef<'_>) -> Result<TensorId> {
        self.ids.get(t).copied().flatten().ok_or_else(|| {
            TfliteError::Malformed(format!(
                "{} uses tensor {t}, which is only a folded parameter elsewhere",
                o.what()
            ))
        })
    }

    fn rank(&self, t: usize, want: usize, role: &str, o: &OpRef<'_>) -> Result<()> {
        let shape = &self.tensor(t).shape;
        if shape.len() != want {
            return malformed(format!(
                "{} {role} '{}' has shape {shape:?}, expected rank {want}",
                o.what(),
                self.tensor(t).name
            ));
        }
        Ok(())
    }

    /// The elements of a constant int32/int64 tensor.
    fn const_ints(&self, t: usize, role: &str, o: &OpRef<'_>) -> Result<Vec<i64>> {
        let tensor = self.tensor(t);
        let Some(data) = tensor.data else {
            return unsupported(format!(
                "{} has a non-constant {role} tensor '{}'",
                o.what(),
                tensor.name
            ));
        };
        // Lengths were checked against the shape when the tensor was read.
        match tensor.ty {
            tensor_type::INT32 => Ok(data
                .chunks_exact(4)
                .map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect()),
            tensor_type::INT64 => Ok(data
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect()),
            other => malformed(format!(
                "{} {role} tensor '{}' has type {}, expected INT32 or INT64",
                o.what(),
                tensor.name,
                tensor_type_name(other)
            )),
        }
    }

    fn convert_op(&self, index: usize, raw: &RawOp<'_>) -> Result<Op> {
        let o = OpRef {
            index,
            name: builtin_op_name(raw.code),
            inputs: &raw.inputs,
            outputs: &raw.outputs,
            tensors: self.raw.len(),
        };
        let what = || o.what();
        let table = &raw.table;
        let data_inputs = |positions: std::ops::Range<usize>| -> Result<Vec<Option<TensorId>>> {
            positions
                .map(|p| o.opt_input(p).map(|t| self.id(t, &o)).transpose())
                .collect()
        };

        let (kind, inputs) = match raw.code {
            op::CONV_2D => {
                o.arity(2..=3, 1)?;
                let (input, filter) = (o.input(0)?, o.input(1)?);
                self.rank(input, 4, "input", &o)?;
                self.rank(filter, 4, "filter", &o)?;
                self.rank(o.output(0)?, 4, "output", &o)?;
                let opts = table.options::<Conv2DOptions>(&what)?;
                let kind = OpKind::Conv2d {
                    stride: [
                        positive(opt!(opts, stride_h, 0), "stride_h", &what)?,
                        positive(opt!(opts, stride_w, 0), "stride_w", &what)?,
                    ],
                    dilation: [
                        positive(opt!(opts, dilation_h_factor, 1), "dilation_h_factor", &what)?,
                        positive(opt!(opts, dilation_w_factor, 1), "dilation_w_factor", &what)?,
                    ],
                    padding: padding(opt!(opts, padding, 0), &what)?,
                    activation: activation(opt!(opts, fused_activation_function, 0), &what)?,
                };
                (kind, data_inputs(0..3)?)
            }
            op::DEPTHWISE_CONV_2D => {
                o.arity(2..=3, 1)?;
                let (input, filter) = (o.input(0)?, o.input(1)?);
                self.rank(input, 4, "input", &o)?;
                self.rank(filter, 4, "filter", &o)?;
                self.rank(o.output(0)?, 4, "output", &o)?;
                let opts = table.options::<DepthwiseConv2DOptions>(&what)?;
                let in_c = self.tensor(input).shape[3];
                let filter_c = self.tensor(filter).shape[3];
                let derived = (in_c > 0 && filter_c.is_multiple_of(in_c)).then(|| filter_c / in_c);
                let depth_multiplier = match (opt!(opts, depth_multiplier, 0), derived) {
                    (0, Some(m)) if m > 0 => m,
                    (m, Some(d)) if usize::try_from(m) == Ok(d) && d > 0 => d,
                    (m, _) => {
                        return malformed(format!(
                            "{} has depth_multiplier {m} but {in_c} input channels and {filter_c} \
                             filter channels",
                            o.what()
                        ))
                    }
                };
                let kind = OpKind::DepthwiseConv2d {
                    stride: [
                        positive(opt!(opts, stride_h, 0), "stride_h", &what)?,
                        positive(opt!(opts, stride_w, 0), "stride_w", &what)?,
                    ],
                    dilation: [
                        positive(opt!(opts, dilation_h_factor, 1), "dilation_h_factor", &what)?,
                        positive(opt!(opts, dilation_w_factor, 1), "dilation_w_factor", &what)?,
                    ],
                    padding: padding(opt!(opts, padding, 0), &what)?,
                    depth_multiplier,
                    activation: activation(opt!(opts, fused_activation_function, 0), &what)?,
                };
                (kind, data_inputs(0..3)?)
            }
            op::FULLY_CONNECTED => {
                o.arity(2..=3, 1)?;
                o.input(0)?;
                self.rank(o.input(1)?, 2, "weights", &o)?;
                let opts = table.options::<FullyConnectedOptions>(&what)?;
                let format = opt!(opts, weights_format, 0);
                if format != 0 {
                    return unsupported(format!(
                        "weights format {format} (only DEFAULT) on {}",
                        o.what()
                    ));
                }
                let kind = OpKind::FullyConnected {
                    activation: activation(opt!(opts, fused_activation_function, 0), &what)?,
                };
                (kind, data_inputs(0..3)?)
            }
            op::ADD | op::MUL => {
                o.arity(2..=2, 1)?;
                o.input(0)?;
                o.input(1)?;
                let kind = if raw.code == op::ADD {
                    let opts = table.options::<AddOptions>(&what)?;
                    OpKind::Add {
                        activation: activation(opt!(opts, fused_activation_function, 0), &what)?,
                    }
                } else {
                    let opts = table.options::<MulOptions>(&what)?;
                    OpKind::Mul {
                        activation: activation(opt!(opts, fused_activation_function, 0), &what)?,
                    }
                };
                (kind, data_inputs(0..2)?)
            }
            op::AVERAGE_POOL_2D | op::MAX_POOL_2D => {
                o.arity(1..=1, 1)?;
                self.rank(o.input(0)?, 4, "input", &o)?;
                self.rank(o.output(0)?, 4, "output", &o)?;
                let opts = table.options::<Pool2DOptions>(&what)?;
                let filter = [
                    positive(opt!(opts, filter_height, 0), "filter_height", &what)?,
                    positive(opt!(opts, filter_width, 0), "filter_width", &what)?,
                ];
                let stride = [
                    positive(opt!(opts, stride_h, 0), "stride_h", &what)?,
                    positive(opt!(opts, stride_w, 0), "stride_w", &what)?,
                ];
                let padding = padding(opt!(opts, padding, 0), &what)?;
                let activation = activation(opt!(opts, fused_activation_function, 0), &what)?;
                let kind = if raw.code == op::AVERAGE_POOL_2D {
                    OpKind::AveragePool2d {
                        filter,
                        stride,
                        padding,
                        activation,
                    }
                } else {
                    OpKind::MaxPool2d {
                        filter,
                        stride,
                        padding,
                        activation,
                    }
                };
                (kind, data_inputs(0..1)?)
            }
            op::RESHAPE | op::SQUEEZE | op::EXPAND_DIMS => {
                match raw.code {
                    op::RESHAPE => o.arity(1..=2, 1)?,
                    op::SQUEEZE => o.arity(1..=1, 1)?,
                    _ => o.arity(2..=2, 1)?,
                }
                let (input, output) = (o.input(0)?, o.output(0)?);
                let (a, b) = (self.tensor(input), self.tensor(output));
                if a.elements() != b.elements() {
                    return malformed(format!(
                        "{} reshapes {:?} to {:?}, which has a different number of elements",
                        o.what(),
                        a.shape,
                        b.shape
                    ));
                }
                (OpKind::Reshape, data_inputs(0..1)?)
            }
            op::SOFTMAX => {
                o.arity(1..=1, 1)?;
                o.input(0)?;
                let opts = table.options::<SoftmaxOptions>(&what)?;
                let beta = opt!(opts, beta, 0.0);
                if !beta.is_finite() {
                    return malformed(format!("{} has beta {beta}", o.what()));
                }
                (OpKind::Softmax { beta }, data_inputs(0..1)?)
            }
            op::RELU | op::RELU6 | op::LOGISTIC | op::TANH | op::QUANTIZE | op::DEQUANTIZE => {
                o.arity(1..=1, 1)?;
                o.input(0)?;
                let kind = match raw.code {
                    op::RELU => OpKind::Relu,
                    op::RELU6 => OpKind::Relu6,
                    op::LOGISTIC => OpKind::Logistic,
                    op::TANH => OpKind::Tanh,
                    op::QUANTIZE => OpKind::Quantize,
                    _ => OpKind::Dequantize,
                };
                (kind, data_inputs(0..1)?)
            }
            op::CONCATENATION => {
                o.arity(1..=usize::MAX, 1)?;
                for p in 0..o.inputs.len() {
                    o.input(p)?;
                }
                let opts = table.options::<ConcatenationOptions>(&what)?;
                let axis = i64::from(opt!(opts, axis, 0));
                let rank = i64::try_from(self.tensor(o.output(0)?).shape.len()).unwrap_or(i64::MAX);
                if axis < -rank || axis >= rank {
                    return malformed(format!(
                        "{} has axis {axis} but its output has rank {rank}",
                        o.what()
                    ));
                }
                let kind = OpKind::Concatenation {
                    axis,
                    activation: activation(opt!(opts, fused_activation_function, 0), &what)?,
                };
                (kind, data_inputs(0..o.inputs.len())?)
            }
            op::PAD | op::PADV2 => {
                o.arity(2..=3, 1)?;
                let input = o.input(0)?;
                let rank = self.tensor(input).shape.len();
                let pads_t = o.input(1)?;
                let values = self.const_ints(pads_t, "paddings", &o)?;
                if self.tensor(pads_t).shape != [rank, 2] {
                    return malformed(format!(
                        "{} paddings have shape {:?}, expected [{rank}, 2]",
                        o.what(),
                        self.tensor(pads_t).shape
                    ));
                }
                let mut paddings = Vec::with_capacity(rank);
                for pair in values.chunks_exact(2) {
                    let (Ok(before), Ok(after)) =
                        (usize::try_from(pair[0]), usize::try_from(pair[1]))
                    else {
                        return malformed(format!("{} has negative padding {pair:?}", o.what()));
                    };
                    paddings.push([before, after]);
                }
                if let Some(value_t) = o.opt_input(2) {
                    self.check_pad_value(input, value_t, &o)?;
                }
                (OpKind::Pad { paddings }, data_inputs(0..1)?)
            }
            op::MEAN => {
                o.arity(2..=2, 1)?;
                let input = o.input(0)?;
                let rank = self.tensor(input).shape.len();
                let mut axes = Vec::new();
                for a in self.const_ints(o.input(1)?, "axes", &o)? {
                    let r = i64::try_from(rank).unwrap_or(i64::MAX);
                    let norm = if a < 0 { a + r } else { a };
                    match usize::try_from(norm) {
                        Ok(n) if n < rank => axes.push(n),
                        _ => {
                            return malformed(format!(
                                "{} has axis {a} but its input has rank {rank}",
                                o.what()
                            ))
                        }
                    }
                }
                axes.sort_unstable();
                axes.dedup();
                let opts = table.options::<ReducerOptions>(&what)?;
                let keep_dims = opt!(opts, keep_dims, false);
                (OpKind::Mean { axes, keep_dims }, data_inputs(0..1)?)
            }
            // `is_supported` admitted only the codes above.
            other => {
                return Err(TfliteError::UnsupportedOp {
                    name: builtin_op_name(other),
                    index,
                })
            }
        };

        let outputs = (0..o.outputs.len())
            .map(|p| self.id(o.output(p)?, &o))
            .collect::<Result<Vec<_>>>()?;
        Ok(Op {
            kind,
            inputs,
            outputs,
        })
    }

    /// PADV2's constant value must be the input's zero (its zero point when quantized).
    fn check_pad_value(&self, input: usize, value_t: usize, o: &OpRef<'_>) -> Result<()> {
        let value = self.tensor(value_t);
        let Some(data) = value.data else {
            return unsupported(format!("{} has a non-constant pad value", o.what()));
        };
        if value.elements() != 1 {
            return malformed(format!(
                "{} pad value has shape {:?}, expected a single element",
                o.what(),
                value.shape
            ));
        }
        let zero_point = self
            .tensor(input)
            .quant
            .as_ref()
            .and_then(|q| q.zero_points.first().copied())
            .unwrap_or(0);
        let (is_zero, shown) = match (value.ty, data) {
            (tensor_type::INT8, [b]) => (i64::from(*b as i8) == zero_point, (*b as i8).to_string()),
            (tensor_type::INT32, [a, b, c, d]) => {
                let v = i32::from_le_bytes([*a, *b, *c, *d]);
                (i64::from(v) == zero_point, v.to_string())
            }
            (tensor_type::FLOAT32, [a, b, c, d]) => {
                let v = f32::from_le_bytes([*a, *b, *c, *d]);
                (v == 0.0, v.to_string())
            }
            (tensor_type::FLOAT16, [a, b]) => {
                let bits = u16::from_le_bytes([*a, *b]);
                (bits & 0x7fff == 0, format!("f16 bits {bits:#06x}"))
            }
            (ty, _) => {
                return unsupported(format!(
                    "{} has a pad value of type {}",
                    o.what(),
                    tensor_type_name(ty)
                ))
            }
        };
        if !is_zero {
            return unsupported(format!(
                "{} pads with constant {shown}, not the input's zero (only zero padding is \
                 supported)",
                o.what()
            ));
        }
        Ok(())
    }
}

/// Checks that ops are in a valid execution order: every op input is a constant, a graph input
/// or the output of an earlier op, and every tensor has at most one producer.
fn check_execution_order(g: &Graph) -> Result<()> {
    let mut available: HashSet<TensorId> = g.inputs.iter().copied().collect();
    available.extend(
        g.tensors
            .iter()
            .enumerate()
            .filter(|(_, t)| t.data.is_some())
            .map(|(i, _)| i),
    );
    for (index, op) in g.ops.iter().enumerate() {
        for &t in op.inputs.iter().flatten() {
            if !available.contains(&t) {
                return malformed(format!(
                    "operator {index} reads tensor '{}' before any operator produces it",
                    g.tensors[t].name
                ));
            }
        }
        for &t in &op.outputs {
            if !available.insert(t) {
                return malformed(format!(
                    "operator {index} writes tensor '{}', which is already a constant, a graph \
                     input or another operator's output",
                    g.tensors[t].name
                ));
            }
        }
    }
    for &t in &g.outputs {
        if !available.contains(&t) {
            return malformed(format!(
                "graph output '{}' is never produced",
                g.tensors[t].name
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_names() {
        assert_eq!(builtin_op_name(0), "ADD");
        assert_eq!(builtin_op_name(16), "LSTM");
        assert_eq!(builtin_op_name(114), "QUANTIZE");
        assert_eq!(builtin_op_name(126), "BATCH_MATMUL");
        assert_eq!(builtin_op_name(161), "RIGHT_SHIFT");
        assert_eq!(builtin_op_name(500), "BUILTIN_500");
        assert_eq!(builtin_op_name(-3), "BUILTIN_-3");
    }

    #[test]
    fn rejects_short_and_foreign_files() {
        assert!(matches!(import_tflite(b""), Err(TfliteError::Malformed(_))));
        assert!(matches!(
            import_tflite(b"\0\0\0\0TFL"),
            Err(TfliteError::Malformed(_))
        ));
        assert!(matches!(
            import_tflite(b"\x08\0\0\0ONNX\0\0\0\0"),
            Err(TfliteError::Malformed(_))
        ));
        // A valid but empty root table.
        let e = import_tflite(b"\x08\0\0\0TFL3\0\0\0\0").unwrap_err();
        assert!(!e.to_string().contains('\n'), "{e}");
    }
}
