//! Lifting a float `.kiln` artifact back into the host IR, so that `kiln quantize` and
//! `kiln prune` can take the output of `kiln convert` or `kiln prune` as their input.
//! Quantized (int8) artifacts are refused: their float weights are gone.

use crate::ir::{Graph, Op, OpKind, Padding, QuantInfo, Tensor};
use crate::lower::same_padding;
use anyhow::{bail, Context, Result};
use kiln_runtime::graph::{DType, Location, OpKind as K, UnaryFn, NO_TENSOR};
use kiln_runtime::model::Model;

fn padding(
    pad: u16,
    stride: usize,
    dilation: usize,
    input: usize,
    filter: usize,
    output: usize,
) -> Result<Padding> {
    if pad as usize == same_padding(Padding::Same, stride, dilation, input, filter, output) {
        Ok(Padding::Same)
    } else if pad == 0 {
        Ok(Padding::Valid)
    } else {
        bail!("padding {pad} is neither SAME nor VALID")
    }
}

/// Lifts a float artifact into a graph (tensor names `t<index>`).
///
/// # Errors
/// The artifact is invalid or quantized.
pub fn import_kiln(bytes: &[u8]) -> Result<Graph> {
    let aligned = crate::artifact::AlignedBytes::new(bytes);
    let model = Model::load(aligned.as_slice()).context("not a valid .kiln artifact")?;
    let name = kiln_runtime::sections::Manifest::of(&model)?
        .map(|m| m.name.to_string())
        .unwrap_or_default();
    let mut g = Graph {
        name,
        ..Default::default()
    };
    for i in 0..model.tensor_count() {
        let t = model.tensor(i)?;
        let data = match t.location {
            Location::Weights(_) => Some(model.constant(&t)?.to_vec()),
            Location::Arena { .. } => None,
        };
        let quant = t.quant.map(|q| QuantInfo {
            scales: vec![q.scale],
            zero_points: vec![q.zero_point as i64],
            axis: 0,
        });
        if t.dtype == DType::I8 && data.is_none() {
            bail!(
                "this artifact is already quantized (int8 activations); start from the float model"
            );
        }
        g.tensors.push(Tensor {
            name: format!("t{i}"),
            dtype: t.dtype,
            shape: t.shape.iter().map(|&d| d as usize).collect(),
            data,
            quant,
        });
    }
    g.inputs = model.inputs().iter().map(|&i| i as usize).collect();
    g.outputs = model.outputs().iter().map(|&i| i as usize).collect();
    for item in model.ops() {
        let (index, op) = item?;
        let inputs: Vec<Option<usize>> = op
            .inputs
            .iter()
            .map(|&i| (i != NO_TENSOR).then_some(i as usize))
            .collect();
        let shape = |k: usize| {
            inputs
                .get(k)
                .and_then(|t| *t)
                .map(|t| g.tensors[t].shape.clone())
                .unwrap_or_default()
        };
        let out_shape = g.tensors[op.output as usize].shape.clone();
        let ctx = || format!("op {index} ({})", op.kind.name());
        let kind = match op.kind {
            K::Conv2d(p) | K::DepthwiseConv2d(p) => {
                let (x, f) = (shape(0), shape(1));
                if x.len() != 4 || f.len() != 4 || out_shape.len() != 4 {
                    bail!("{}: expected 4-D operands", ctx());
                }
                let (sh, sw, dh, dw) = (
                    p.stride_h as usize,
                    p.stride_w as usize,
                    p.dilation_h as usize,
                    p.dilation_w as usize,
                );
                let ph = padding(p.pad_top, sh, dh, x[1], f[1], out_shape[1]).with_context(ctx)?;
                let pw = padding(p.pad_left, sw, dw, x[2], f[2], out_shape[2]).with_context(ctx)?;
                if ph != pw {
                    bail!("{}: mixed SAME/VALID padding", ctx());
                }
                if matches!(op.kind, K::Conv2d(_)) {
                    OpKind::Conv2d {
                        stride: [sh, sw],
                        dilation: [dh, dw],
                        padding: ph,
                        activation: p.activation,
                    }
                } else {
                    OpKind::DepthwiseConv2d {
                        stride: [sh, sw],
                        dilation: [dh, dw],
                        padding: ph,
                        depth_multiplier: p.depth_multiplier as usize,
                        activation: p.activation,
                    }
                }
            }
            K::FullyConnected(p) => OpKind::FullyConnected {
                activation: p.activation,
            },
            K::Add(p) => OpKind::Add {
                activation: p.activation,
            },
            K::Mul(p) => OpKind::Mul {
                activation: p.activation,
            },
            K::Sub(p) => OpKind::Sub {
                activation: p.activation,
            },
            K::Div(p) => OpKind::Div {
                activation: p.activation,
            },
            K::AveragePool2d(p) | K::MaxPool2d(p) => {
                let x = shape(0);
                if x.len() != 4 || out_shape.len() != 4 {
                    bail!("{}: expected 4-D operands", ctx());
                }
                let (fh, fw, sh, sw) = (
                    p.filter_h as usize,
                    p.filter_w as usize,
                    p.stride_h as usize,
                    p.stride_w as usize,
                );
                let ph = padding(p.pad_top, sh, 1, x[1], fh, out_shape[1]).with_context(ctx)?;
                let pw = padding(p.pad_left, sw, 1, x[2], fw, out_shape[2]).with_context(ctx)?;
                if ph != pw {
                    bail!("{}: mixed SAME/VALID padding", ctx());
                }
                let (filter, stride) = ([fh, fw], [sh, sw]);
                if matches!(op.kind, K::AveragePool2d(_)) {
                    OpKind::AveragePool2d {
                        filter,
                        stride,
                        padding: ph,
                        activation: p.activation,
                    }
                } else {
                    OpKind::MaxPool2d {
                        filter,
                        stride,
                        padding: ph,
                        activation: p.activation,
                    }
                }
            }
            K::Reshape => OpKind::Reshape,
            K::Softmax(p) => OpKind::Softmax { beta: p.beta },
            K::Relu(_) => OpKind::Relu,
            K::Relu6(_) => OpKind::Relu6,
            K::Concatenation(p) => OpKind::Concatenation {
                axis: p.axis as i64,
                activation: p.activation,
            },
            K::Pad(p) => {
                let rank = shape(0).len();
                let lead = 4 - rank.min(4);
                OpKind::Pad {
                    paddings: (0..rank)
                        .map(|d| [p.before[lead + d] as usize, p.after[lead + d] as usize])
                        .collect(),
                }
            }
            K::Mean(p) => {
                let rank = shape(0).len();
                OpKind::Mean {
                    axes: (0..rank).filter(|a| p.axes & (1 << a) != 0).collect(),
                    keep_dims: out_shape.len() == rank,
                }
            }
            K::Logistic(_) => OpKind::Logistic,
            K::Tanh(_) => OpKind::Tanh,
            K::Quantize(_) => OpKind::Quantize,
            K::Dequantize => OpKind::Dequantize,
            K::Transpose(p) => OpKind::Transpose {
                perm: p.perm[..out_shape.len()]
                    .iter()
                    .map(|&v| v as usize)
                    .collect(),
            },
            K::UnaryFloat(UnaryFn::LeakyRelu { alpha }) => OpKind::LeakyRelu { alpha },
            K::UnaryFloat(UnaryFn::HardSigmoid { alpha, beta }) => {
                OpKind::HardSigmoid { alpha, beta }
            }
            K::UnaryFloat(UnaryFn::HardSwish) => OpKind::HardSwish,
            K::UnaryFloat(UnaryFn::Clamp { min, max }) => OpKind::Clamp { min, max },
            K::PRelu => OpKind::PRelu,
            K::Lut(_) => bail!(
                "{}: this artifact is already quantized; start from the float model",
                ctx()
            ),
        };
        g.ops.push(Op {
            kind,
            inputs,
            outputs: vec![op.output as usize],
        });
    }
    Ok(g)
}
