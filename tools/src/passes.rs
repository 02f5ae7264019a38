//! Graph passes on the host IR: dead-code removal and activation fusion.

use crate::ir::{Graph, OpKind, TensorId};
use kiln_runtime::graph::Activation;

/// Number of ops reading each tensor.
pub fn consumers(g: &Graph) -> Vec<usize> {
    let mut n = vec![0; g.tensors.len()];
    for op in &g.ops {
        for t in op.inputs.iter().flatten() {
            if let Some(c) = n.get_mut(*t) {
                *c += 1;
            }
        }
    }
    n
}

fn activation_slot(kind: &mut OpKind) -> Option<&mut Activation> {
    match kind {
        OpKind::Conv2d { activation, .. }
        | OpKind::DepthwiseConv2d { activation, .. }
        | OpKind::FullyConnected { activation }
        | OpKind::Add { activation }
        | OpKind::Sub { activation }
        | OpKind::Mul { activation }
        | OpKind::AveragePool2d { activation, .. }
        | OpKind::MaxPool2d { activation, .. } => Some(activation),
        _ => None,
    }
}

fn as_activation(kind: &OpKind) -> Option<Activation> {
    match kind {
        OpKind::Relu => Some(Activation::Relu),
        OpKind::Relu6 => Some(Activation::Relu6),
        OpKind::Clamp { min, max } if *min == 0.0 && *max == 6.0 => Some(Activation::Relu6),
        OpKind::Clamp { min, max } if *min == -1.0 && *max == 1.0 => Some(Activation::ReluN1To1),
        _ => None,
    }
}

/// Fuses a standalone RELU / RELU6 / RELU_N1_TO_1 into the op that produces its input, when that
/// op has no activation yet and its output feeds nothing else. Returns the number fused.
pub fn fuse_activations(g: &mut Graph) -> usize {
    let mut fused = 0;
    loop {
        let uses = consumers(g);
        let mut found = None;
        for (i, op) in g.ops.iter().enumerate() {
            let (Some(act), Some(Some(input))) = (as_activation(&op.kind), op.inputs.first())
            else {
                continue;
            };
            if uses[*input] != 1 || g.outputs.contains(input) {
                continue;
            }
            if let Some(p) = g.ops.iter().position(|o| o.outputs.first() == Some(input)) {
                let mut kind = g.ops[p].kind.clone();
                if let Some(slot) = activation_slot(&mut kind) {
                    if *slot == Activation::None {
                        found = Some((i, p, act));
                        break;
                    }
                }
            }
        }
        let Some((i, p, act)) = found else { break };
        let out: TensorId = g.ops[i].outputs[0];
        if let Some(slot) = activation_slot(&mut g.ops[p].kind) {
            *slot = act;
        }
        g.ops[p].outputs[0] = out;
        g.ops.remove(i);
        fused += 1;
    }
    fused
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Op, Tensor};
    use kiln_runtime::graph::DType;

    fn t(name: &str) -> Tensor {
        Tensor {
            name: name.into(),
            dtype: DType::F32,
            shape: vec![1, 4],
            data: None,
            quant: None,
        }
    }

    #[test]
    fn relu_after_fc_is_fused_but_not_when_shared() {
        let mut g = Graph {
            name: "g".into(),
            tensors: vec![t("x"), t("w"), t("y"), t("z"), t("u")],
            ops: vec![
                Op {
                    kind: OpKind::FullyConnected {
                        activation: Activation::None,
                    },
                    inputs: vec![Some(0), Some(1)],
                    outputs: vec![2],
                },
                Op {
                    kind: OpKind::Relu,
                    inputs: vec![Some(2)],
                    outputs: vec![3],
                },
            ],
            inputs: vec![0],
            outputs: vec![3],
        };
        assert_eq!(fuse_activations(&mut g), 1);
        assert_eq!(g.ops.len(), 1);
        assert_eq!(g.ops[0].outputs, vec![3]);
        assert_eq!(
            g.ops[0].kind,
            OpKind::FullyConnected {
                activation: Activation::Relu
            }
        );

        // The pre-activation value is also a graph output: no fusion.
        let mut g2 = Graph {
            name: "g".into(),
            tensors: vec![t("x"), t("w"), t("y"), t("z"), t("u")],
            ops: vec![
                Op {
                    kind: OpKind::FullyConnected {
                        activation: Activation::None,
                    },
                    inputs: vec![Some(0), Some(1)],
                    outputs: vec![2],
                },
                Op {
                    kind: OpKind::Relu6,
                    inputs: vec![Some(2)],
                    outputs: vec![3],
                },
            ],
            inputs: vec![0],
            outputs: vec![2, 3],
        };
        assert_eq!(fuse_activations(&mut g2), 0);
    }
}
