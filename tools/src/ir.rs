//! The host IR: a graph of tensors and ops as importers produce it, before lowering to an
//! artifact. Shapes are NHWC for 4-D activations; conv filters are OHWI, depthwise filters 1HWC,
//! fully-connected weights [out, in] — the TFLite conventions.

use kiln_runtime::graph::{Activation, DType};

/// Index of a tensor in [`Graph::tensors`].
pub type TensorId = usize;

/// A whole model.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    /// Human-readable model name.
    pub name: String,
    /// All tensors: activations and constants.
    pub tensors: Vec<Tensor>,
    /// Ops in a valid execution order.
    pub ops: Vec<Op>,
    /// Graph inputs.
    pub inputs: Vec<TensorId>,
    /// Graph outputs.
    pub outputs: Vec<TensorId>,
}

/// A tensor of the host graph.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    /// Name from the source model.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Constant contents (little-endian elements), `None` for activations.
    pub data: Option<Vec<u8>>,
    /// Quantization, for quantized tensors.
    pub quant: Option<QuantInfo>,
}

impl Tensor {
    /// Number of elements.
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Affine quantization: `real = scale * (q - zero_point)`, per tensor or per slice along `axis`.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantInfo {
    /// One scale per tensor, or one per channel.
    pub scales: Vec<f32>,
    /// One zero point per tensor, or one per channel.
    pub zero_points: Vec<i64>,
    /// The quantized dimension (for per-channel).
    pub axis: usize,
}

/// SAME or VALID, as TFLite defines them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Padding {
    /// Output size = ceil(input / stride); padding split with the extra cell at the end.
    Same,
    /// No padding.
    Valid,
}

/// What an op computes, with its semantic (not yet lowered) parameters.
#[derive(Clone, Debug, PartialEq)]
pub enum OpKind {
    /// inputs: input, filter (OHWI), optional bias.
    Conv2d {
        /// [h, w]
        stride: [usize; 2],
        /// [h, w]
        dilation: [usize; 2],
        /// SAME or VALID.
        padding: Padding,
        /// Fused activation.
        activation: Activation,
    },
    /// inputs: input, filter (1HWC), optional bias.
    DepthwiseConv2d {
        /// [h, w]
        stride: [usize; 2],
        /// [h, w]
        dilation: [usize; 2],
        /// SAME or VALID.
        padding: Padding,
        /// Output channels per input channel.
        depth_multiplier: usize,
        /// Fused activation.
        activation: Activation,
    },
    /// inputs: input, weights [out, in], optional bias.
    FullyConnected {
        /// Fused activation.
        activation: Activation,
    },
    /// Broadcasting add.
    Add {
        /// Fused activation.
        activation: Activation,
    },
    /// Broadcasting multiply.
    Mul {
        /// Fused activation.
        activation: Activation,
    },
    /// Average pooling.
    AveragePool2d {
        /// [h, w]
        filter: [usize; 2],
        /// [h, w]
        stride: [usize; 2],
        /// SAME or VALID.
        padding: Padding,
        /// Fused activation.
        activation: Activation,
    },
    /// Max pooling.
    MaxPool2d {
        /// [h, w]
        filter: [usize; 2],
        /// [h, w]
        stride: [usize; 2],
        /// SAME or VALID.
        padding: Padding,
        /// Fused activation.
        activation: Activation,
    },
    /// RESHAPE, SQUEEZE and EXPAND_DIMS: the output tensor's shape is the new shape.
    Reshape,
    /// Softmax over the last axis.
    Softmax {
        /// Exponent scale.
        beta: f32,
    },
    /// Standalone RELU.
    Relu,
    /// Standalone RELU6.
    Relu6,
    /// Join inputs along `axis` (negative counts from the end).
    Concatenation {
        /// Axis.
        axis: i64,
        /// Fused activation.
        activation: Activation,
    },
    /// Constant padding: `paddings[d] = [before, after]`.
    Pad {
        /// Per-dimension padding.
        paddings: Vec<[usize; 2]>,
    },
    /// Mean over `axes` (non-negative).
    Mean {
        /// Reduced axes.
        axes: Vec<usize>,
        /// Whether reduced axes stay as size 1.
        keep_dims: bool,
    },
    /// 1 / (1 + e^-x).
    Logistic,
    /// tanh.
    Tanh,
    /// float → int8, or int8 → int8 requantization.
    Quantize,
    /// int8 (or f16 constant) → float.
    Dequantize,
    /// Broadcasting subtraction.
    Sub {
        /// Fused activation.
        activation: Activation,
    },
    /// Broadcasting division (float).
    Div {
        /// Fused activation.
        activation: Activation,
    },
    /// Permute dimensions: output dim `i` is input dim `perm[i]`.
    Transpose {
        /// The permutation.
        perm: Vec<usize>,
    },
    /// `x >= 0 ? x : alpha * x`.
    LeakyRelu {
        /// Negative slope.
        alpha: f32,
    },
    /// `x < 0 ? slope * x : x`; inputs: x, slope (broadcast).
    PRelu,
    /// `clamp(alpha * x + beta, 0, 1)`.
    HardSigmoid {
        /// Slope.
        alpha: f32,
        /// Offset.
        beta: f32,
    },
    /// `x * clamp(x + 3, 0, 6) / 6`.
    HardSwish,
    /// `clamp(x, min, max)` (ONNX Clip that is not a RELU / RELU6 / RELU_N1_TO_1).
    Clamp {
        /// Lower bound.
        min: f32,
        /// Upper bound.
        max: f32,
    },
}

/// One op: its kind, inputs (`None` for an absent optional input) and outputs.
#[derive(Clone, Debug, PartialEq)]
pub struct Op {
    /// What it computes.
    pub kind: OpKind,
    /// Input tensors; only the tensor operands (parameters such as PAD's paddings or MEAN's axes
    /// are folded into `kind` by the importer).
    pub inputs: Vec<Option<TensorId>>,
    /// Output tensors.
    pub outputs: Vec<TensorId>,
}
