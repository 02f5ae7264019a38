//! The graph schema stored in an artifact's GRAPH section.
//!
//! These types are shared by the reader (here) and the writer (in `kiln`, the host tool): both sides
//! serialize them with postcard, so the schema cannot drift. See `docs/FORMAT.md` for the byte layout.
//!
//! Everything a kernel needs that would take floating-point work to derive (requantization
//! multipliers and shifts, activation clamps, explicit padding) is computed once on the host and
//! stored here, the way TFLM's `Prepare` computes it once; the device only validates and uses it.

use serde::{Deserialize, Serialize};

/// Largest tensor rank the runtime supports.
pub const MAX_RANK: usize = 6;
/// Most inputs one op may have (CONCATENATION is the op that needs many).
pub const MAX_OP_INPUTS: usize = 16;
/// Most graph inputs or outputs.
pub const MAX_GRAPH_IO: usize = 8;
/// Largest number of tensors a graph may declare (indices are `u16`).
pub const MAX_TENSORS: usize = 4096;
/// Largest number of ops a graph may declare.
pub const MAX_OPS: usize = 4096;

/// Element type of a tensor.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// Quantized 8-bit signed integer (asymmetric activations, symmetric weights).
    I8,
    /// 32-bit signed integer (int8 biases).
    I32,
    /// IEEE binary32.
    F32,
    /// IEEE binary16 (storage); arithmetic in f32.
    F16,
}

impl DType {
    /// Size in bytes of one element.
    pub const fn size(self) -> usize {
        match self {
            DType::I8 => 1,
            DType::F16 => 2,
            DType::I32 | DType::F32 => 4,
        }
    }

    /// Short lower-case name, as used in reports.
    pub const fn name(self) -> &'static str {
        match self {
            DType::I8 => "int8",
            DType::I32 => "int32",
            DType::F32 => "f32",
            DType::F16 => "f16",
        }
    }
}

/// A byte range inside the WEIGHTS section.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BufRef {
    /// Offset from the start of the WEIGHTS section, in bytes.
    pub offset: u32,
    /// Length in bytes.
    pub len: u32,
}

/// Where a tensor's bytes live.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Location {
    /// A constant, read in place from the WEIGHTS section.
    Weights(BufRef),
    /// An activation at this byte offset in the arena, alive from op `first` (the op that writes
    /// it; 0 for graph inputs, ops are numbered from 1) to op `last` (the last op that reads it;
    /// `op_count + 1` for graph outputs). The reader checks these lifetimes against the ops and
    /// refuses two tensors that are alive at the same time and overlap in the arena.
    Arena {
        /// Byte offset in the arena.
        offset: u32,
        /// Op (numbered from 1) that writes this tensor; 0 for a graph input.
        first: u16,
        /// Last op (numbered from 1) that reads this tensor; `op_count + 1` for a graph output.
        last: u16,
    },
}

/// Quantization parameters of a tensor: `real = scale * (q - zero_point)`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct Quant {
    /// Per-tensor scale (for per-channel tensors, the scale of channel 0).
    pub scale: f32,
    /// Per-tensor zero point (per-channel tensors are symmetric: 0).
    pub zero_point: i32,
    /// Per-channel scales: `f32` little-endian values in WEIGHTS, one per slice along `axis`.
    pub per_channel: Option<PerChannel>,
}

/// Per-channel quantization (weights only; symmetric, zero point 0).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct PerChannel {
    /// The quantized dimension.
    pub axis: u8,
    /// `f32` scales, one per channel.
    pub scales: BufRef,
}

/// Shape of a tensor (NHWC for 4-D activations, OHWI for conv filters, 1HWC for depthwise).
pub type Shape = heapless::Vec<u32, MAX_RANK>;

/// One entry of the tensor table. Each is postcard-encoded into a fixed-size slot so that the
/// reader finds tensor `i` in O(1) without allocating.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TensorDef {
    /// Element type.
    pub dtype: DType,
    /// Dimensions, outermost first.
    pub shape: Shape,
    /// Where the bytes are.
    pub location: Location,
    /// Quantization, required for `I8` activations and weights.
    pub quant: Option<Quant>,
}

/// Fused activation of float ops (int8 ops carry their clamp in [`Requant`] form instead).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Activation {
    /// No clamp.
    #[default]
    None,
    /// max(x, 0).
    Relu,
    /// clamp(x, -1, 1).
    ReluN1To1,
    /// clamp(x, 0, 6).
    Relu6,
}

/// A fixed-point multiplier as TFLite defines it: `real ≈ multiplier * 2^(shift - 31)`, with
/// `multiplier` in `[2^30, 2^31)` (or 0 for a zero scale) and `shift` in `[-31, 30]`.
#[derive(
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Default,
    bytemuck::Pod,
    bytemuck::Zeroable,
)]
#[repr(C)]
pub struct Requant {
    /// Q31 mantissa.
    pub multiplier: i32,
    /// Power-of-two exponent (positive = left shift).
    pub shift: i32,
}

/// Output clamp of an int8 op, in the output's quantized domain (fused activation folded in).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClampI8 {
    /// Lowest output value.
    pub min: i8,
    /// Highest output value.
    pub max: i8,
}

impl Default for ClampI8 {
    fn default() -> Self {
        ClampI8 {
            min: -128,
            max: 127,
        }
    }
}

/// Parameters shared by CONV_2D and DEPTHWISE_CONV_2D.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConvParams {
    /// Vertical stride.
    pub stride_h: u16,
    /// Horizontal stride.
    pub stride_w: u16,
    /// Vertical dilation.
    pub dilation_h: u16,
    /// Horizontal dilation.
    pub dilation_w: u16,
    /// Rows of implicit zero padding above the input (SAME/VALID resolved on the host).
    pub pad_top: u16,
    /// Columns of implicit zero padding left of the input.
    pub pad_left: u16,
    /// Output channels per input channel (depthwise only; 1 for CONV_2D).
    pub depth_multiplier: u16,
    /// Fused activation (float kernels).
    pub activation: Activation,
    /// int8: per-output-channel [`Requant`] array in WEIGHTS (`len = 8 * out_channels`).
    pub requant: BufRef,
    /// int8: output clamp.
    pub clamp: ClampI8,
}

/// Parameters of FULLY_CONNECTED.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FullyConnectedParams {
    /// Fused activation (float kernels).
    pub activation: Activation,
    /// int8: per-tensor (1 entry) or per-output-channel [`Requant`] array in WEIGHTS.
    pub requant: BufRef,
    /// int8: output clamp.
    pub clamp: ClampI8,
}

/// Parameters of AVERAGE_POOL_2D and MAX_POOL_2D.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PoolParams {
    /// Window height.
    pub filter_h: u16,
    /// Window width.
    pub filter_w: u16,
    /// Vertical stride.
    pub stride_h: u16,
    /// Horizontal stride.
    pub stride_w: u16,
    /// Rows of padding above (padded cells are excluded from the window, as TFLite does).
    pub pad_top: u16,
    /// Columns of padding on the left.
    pub pad_left: u16,
    /// Fused activation (float kernels).
    pub activation: Activation,
    /// int8: output clamp.
    pub clamp: ClampI8,
}

/// Parameters of ADD and MUL (int8 arithmetic follows TFLM's reference kernels).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BinaryParams {
    /// Fused activation (float kernels).
    pub activation: Activation,
    /// int8 ADD: left shift applied to both inputs before rescaling (TFLM uses 20).
    pub left_shift: i32,
    /// int8 ADD: rescale of input 0. Unused by MUL.
    pub input0: Requant,
    /// int8 ADD: rescale of input 1. Unused by MUL.
    pub input1: Requant,
    /// int8: rescale to the output.
    pub output: Requant,
    /// int8: output clamp.
    pub clamp: ClampI8,
}

/// Parameters of SOFTMAX.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Default)]
pub struct SoftmaxParams {
    /// Float: the exponent's scale.
    pub beta: f32,
    /// int8: input rescale multiplier (TFLM `PreprocessSoftmaxScaling`).
    pub input_multiplier: i32,
    /// int8: input rescale left shift.
    pub input_left_shift: i32,
    /// int8: differences below this are treated as -infinity.
    pub diff_min: i32,
}

/// Parameters of LOGISTIC and TANH for int8 (TFLM's fixed-point reference).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SigmoidParams {
    /// Inputs with `|q - zero_point| > range_radius` saturate.
    pub input_range_radius: i32,
    /// Input rescale multiplier.
    pub input_multiplier: i32,
    /// Input rescale left shift.
    pub input_left_shift: i32,
}

/// Parameters of MEAN.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MeanParams {
    /// Bit mask of reduced axes (bit i = axis i).
    pub axes: u8,
    /// int8: `input_scale / output_scale`; the kernel divides the rescaled sum by the element
    /// count with TFLM's rounding.
    pub requant: Requant,
}

/// Parameters of standalone int8 RELU / RELU6 (TFLM `ReluQuantized`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ActivationParams {
    /// int8: `input_scale / output_scale`.
    pub requant: Requant,
    /// int8: output clamp (zero point .. zero point + 6/scale for RELU6).
    pub clamp: ClampI8,
}

/// Parameters of PAD: padding before and after each of the (up to 4, NHWC) dimensions.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PadParams {
    /// Elements added before each dimension.
    pub before: [u32; 4],
    /// Elements added after each dimension.
    pub after: [u32; 4],
}

/// Parameters of QUANTIZE (float or int8 input → int8 output).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct QuantizeParams {
    /// int8 → int8 requantization.
    pub requant: Requant,
}

/// Parameters of CONCATENATION.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConcatParams {
    /// Axis along which the inputs are joined.
    pub axis: u8,
    /// int8: output clamp (fused activation).
    pub clamp: ClampI8,
    /// Fused activation (float kernels).
    pub activation: Activation,
}

/// What an op does.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub enum OpKind {
    /// inputs: input, filter, \[bias\]; output.
    Conv2d(ConvParams),
    /// inputs: input, filter (1,H,W,C*M), \[bias\]; output.
    DepthwiseConv2d(ConvParams),
    /// inputs: input, weights (out, in), \[bias\]; output.
    FullyConnected(FullyConnectedParams),
    /// Element-wise sum with NumPy broadcasting.
    Add(BinaryParams),
    /// Element-wise product with NumPy broadcasting.
    Mul(BinaryParams),
    /// Average over each window.
    AveragePool2d(PoolParams),
    /// Maximum over each window.
    MaxPool2d(PoolParams),
    /// Same bytes, new shape (also SQUEEZE / EXPAND_DIMS). In place when planned so.
    Reshape,
    /// Softmax over the last axis.
    Softmax(SoftmaxParams),
    /// max(x, 0).
    Relu(ActivationParams),
    /// clamp(x, 0, 6).
    Relu6(ActivationParams),
    /// Join along an axis.
    Concatenation(ConcatParams),
    /// Zero padding (the zero point for int8).
    Pad(PadParams),
    /// Mean over the axes in the mask.
    Mean(MeanParams),
    /// 1 / (1 + e^-x).
    Logistic(SigmoidParams),
    /// tanh(x).
    Tanh(SigmoidParams),
    /// float → int8 or int8 → int8 (requantize).
    Quantize(QuantizeParams),
    /// int8 → float.
    Dequantize,
    /// Element-wise difference with NumPy broadcasting (int8: TFLM's SUB arithmetic, the
    /// parameters as for ADD).
    Sub(BinaryParams),
    /// Element-wise quotient with NumPy broadcasting (float only).
    Div(BinaryParams),
    /// Permutes the dimensions (any element type).
    Transpose(TransposeParams),
    /// A float element-wise function (LeakyRelu, HardSigmoid, HardSwish, Clamp, ...).
    UnaryFloat(UnaryFn),
    /// int8 → int8 through a 256-entry table in WEIGHTS (`table[q + 128]`), computed on the
    /// host as `quantize_out(f(dequantize_in(q)))`: the most exact int8 result of any
    /// element-wise function.
    Lut(BufRef),
    /// `x < 0 ? slope * x : x`, slope broadcast from the second input (float only).
    PRelu,
}

/// Parameters of TRANSPOSE: output dimension `i` is input dimension `perm[i]`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TransposeParams {
    /// The permutation (the first `rank` entries are used).
    pub perm: [u8; MAX_RANK],
}

/// A float element-wise function.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub enum UnaryFn {
    /// `x >= 0 ? x : alpha * x`.
    LeakyRelu {
        /// Slope for negative inputs.
        alpha: f32,
    },
    /// `clamp(alpha * x + beta, 0, 1)`.
    HardSigmoid {
        /// Slope.
        alpha: f32,
        /// Offset.
        beta: f32,
    },
    /// `x * clamp(x + 3, 0, 6) / 6`.
    HardSwish,
    /// `clamp(x, min, max)`.
    Clamp {
        /// Lower bound.
        min: f32,
        /// Upper bound.
        max: f32,
    },
}

impl OpKind {
    /// The TFLite-style operator name, used in reports and errors.
    pub const fn name(&self) -> &'static str {
        match self {
            OpKind::Conv2d(_) => "CONV_2D",
            OpKind::DepthwiseConv2d(_) => "DEPTHWISE_CONV_2D",
            OpKind::FullyConnected(_) => "FULLY_CONNECTED",
            OpKind::Add(_) => "ADD",
            OpKind::Mul(_) => "MUL",
            OpKind::AveragePool2d(_) => "AVERAGE_POOL_2D",
            OpKind::MaxPool2d(_) => "MAX_POOL_2D",
            OpKind::Reshape => "RESHAPE",
            OpKind::Softmax(_) => "SOFTMAX",
            OpKind::Relu(_) => "RELU",
            OpKind::Relu6(_) => "RELU6",
            OpKind::Concatenation(_) => "CONCATENATION",
            OpKind::Pad(_) => "PAD",
            OpKind::Mean(_) => "MEAN",
            OpKind::Logistic(_) => "LOGISTIC",
            OpKind::Tanh(_) => "TANH",
            OpKind::Quantize(_) => "QUANTIZE",
            OpKind::Dequantize => "DEQUANTIZE",
            OpKind::Sub(_) => "SUB",
            OpKind::Div(_) => "DIV",
            OpKind::Transpose(_) => "TRANSPOSE",
            OpKind::UnaryFloat(UnaryFn::LeakyRelu { .. }) => "LEAKY_RELU",
            OpKind::UnaryFloat(UnaryFn::HardSigmoid { .. }) => "HARD_SIGMOID",
            OpKind::UnaryFloat(UnaryFn::HardSwish) => "HARD_SWISH",
            OpKind::UnaryFloat(UnaryFn::Clamp { .. }) => "CLAMP",
            OpKind::Lut(_) => "LUT",
            OpKind::PRelu => "PRELU",
        }
    }
}

/// Sentinel tensor index meaning "no tensor" (an absent optional input such as a bias).
pub const NO_TENSOR: u16 = u16::MAX;

/// One op of the graph, in execution order.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct OpDef {
    /// What it computes, with its prepared parameters.
    pub kind: OpKind,
    /// Input tensor indices ([`NO_TENSOR`] for an absent optional input).
    pub inputs: heapless::Vec<u16, MAX_OP_INPUTS>,
    /// Output tensor index.
    pub output: u16,
    /// Kernel scratch in the arena (length 0 when the kernel needs none).
    pub scratch: ScratchRef,
}

/// A kernel's scratch region in the arena, alive only while its op runs.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ScratchRef {
    /// Byte offset in the arena.
    pub offset: u32,
    /// Length in bytes.
    pub len: u32,
}

/// The fixed part at the start of the GRAPH section (postcard-encoded).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct GraphHeader {
    /// Number of tensor slots that follow.
    pub tensor_count: u16,
    /// Size of one tensor slot in bytes (each holds one postcard `TensorDef`, zero padded).
    pub tensor_slot: u16,
    /// Number of ops after the tensor table.
    pub op_count: u16,
    /// Graph input tensor indices.
    pub inputs: heapless::Vec<u16, MAX_GRAPH_IO>,
    /// Graph output tensor indices.
    pub outputs: heapless::Vec<u16, MAX_GRAPH_IO>,
}
