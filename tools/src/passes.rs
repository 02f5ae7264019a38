//! Graph passes on the host IR: constant folding and activation fusion.

use crate::exec_candle::CandleGraph;
use crate::ir::{Graph, Op, OpKind, TensorId};
use kiln_runtime::graph::{Activation, DType};

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

/// Folds every op whose inputs are all f32 constants into a constant: the op runs once on the
/// host, in f32, and its output tensor takes the values. Exporters leave such ops behind (a
/// weight scaled by a constant, a bias built from two, a reshaped constant); folded, they cost
/// nothing on the device and the quantizer sees plain weights. Ops run in graph order, so a chain
/// of constant ops folds in one call. An op whose output is a graph output stays, and so does an
/// op the host executor cannot run (the runtime runs it, as before). Returns the number folded.
pub fn fold_constants(g: &mut Graph) -> usize {
    let mut folded = 0;
    let mut kept = Vec::with_capacity(g.ops.len());
    for op in std::mem::take(&mut g.ops) {
        match constant_result(g, &op) {
            Some(values) => {
                let out = &mut g.tensors[op.outputs[0]];
                out.data = Some(values.iter().flat_map(|v| v.to_le_bytes()).collect());
                out.quant = None;
                folded += 1;
            }
            None => kept.push(op),
        }
    }
    g.ops = kept;
    folded
}

/// The output of `op` when all its inputs are f32 constants, computed by a one-op graph whose
/// input is the op's first operand; `None` when the op does not qualify or does not run.
fn constant_result(g: &Graph, op: &Op) -> Option<Vec<f32>> {
    let (&[out], Some(Some(first))) = (op.outputs.as_slice(), op.inputs.first()) else {
        return None;
    };
    let is_f32_constant = |t: TensorId| {
        g.tensors
            .get(t)
            .is_some_and(|t| t.data.is_some() && t.dtype == DType::F32)
    };
    if g.outputs.contains(&out)
        || g.tensors.get(out)?.dtype != DType::F32
        || !op.inputs.iter().flatten().all(|&t| is_f32_constant(t))
    {
        return None;
    }
    // The one-op graph: its own copies of the operands, the first one as the graph input.
    let mut one = Graph {
        name: "constant".into(),
        ..Graph::default()
    };
    let mut ids: Vec<TensorId> = Vec::new();
    let mut local = |t: TensorId, one: &mut Graph| -> TensorId {
        if let Some(i) = ids.iter().position(|&x| x == t) {
            return i;
        }
        ids.push(t);
        one.tensors.push(g.tensors[t].clone());
        one.tensors.len() - 1
    };
    let input = local(*first, &mut one);
    let sample = crate::lower::dequantized(&one.tensors[input]).ok()?;
    one.tensors[input].data = None;
    let inputs = op
        .inputs
        .iter()
        .map(|t| t.map(|t| local(t, &mut one)))
        .collect();
    let output = local(out, &mut one);
    one.ops.push(Op {
        kind: op.kind.clone(),
        inputs,
        outputs: vec![output],
    });
    one.inputs = vec![input];
    one.outputs = vec![output];
    let values = CandleGraph::new(&one, &candle_core::Device::Cpu)
        .and_then(|exec| exec.run(&sample))
        .ok()?;
    (values.len() == g.tensors[out].elements()).then_some(values)
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
    use crate::ir::Tensor;

    fn t(name: &str) -> Tensor {
        Tensor {
            name: name.into(),
            dtype: DType::F32,
            shape: vec![1, 4],
            data: None,
            quant: None,
        }
    }

    fn constant(name: &str, shape: &[usize], values: &[f32]) -> Tensor {
        Tensor {
            name: name.into(),
            dtype: DType::F32,
            shape: shape.to_vec(),
            data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
            quant: None,
        }
    }

    fn values(t: &Tensor) -> Vec<f32> {
        crate::lower::dequantized(t).unwrap()
    }

    /// x [1,4] -> FC(w, b) -> y, where w = w0 * scale and b = (b1 + b2) - b3: a chain of three
    /// constant ops, as an exporter may leave them.
    fn fc_with_constant_subgraphs() -> Graph {
        let w0: Vec<f32> = (0..12).map(|i| i as f32 * 0.25 - 1.0).collect();
        let act = |name: &str, shape: &[usize]| Tensor {
            name: name.into(),
            dtype: DType::F32,
            shape: shape.to_vec(),
            data: None,
            quant: None,
        };
        let op = |kind: OpKind, inputs: &[usize], output: usize| Op {
            kind,
            inputs: inputs.iter().map(|&i| Some(i)).collect(),
            outputs: vec![output],
        };
        let none = Activation::None;
        Graph {
            name: "g".into(),
            tensors: vec![
                act("x", &[1, 4]),                        // 0
                constant("w0", &[3, 4], &w0),             // 1
                constant("scale", &[1], &[0.5]),          // 2
                act("w", &[3, 4]),                        // 3
                constant("b1", &[3], &[1.0, 2.0, 3.0]),   // 4
                constant("b2", &[3], &[0.5, 0.5, 0.5]),   // 5
                act("b12", &[3]),                         // 6
                constant("b3", &[3], &[0.25, 0.0, -1.0]), // 7
                act("b", &[3]),                           // 8
                act("y", &[1, 3]),                        // 9
            ],
            ops: vec![
                op(OpKind::Mul { activation: none }, &[1, 2], 3),
                op(OpKind::Add { activation: none }, &[4, 5], 6),
                op(OpKind::Sub { activation: none }, &[6, 7], 8),
                op(OpKind::FullyConnected { activation: none }, &[0, 3, 8], 9),
            ],
            inputs: vec![0],
            outputs: vec![9],
        }
    }

    #[test]
    fn constant_ops_fold_into_constants_and_the_model_computes_the_same() {
        let g0 = fc_with_constant_subgraphs();
        let mut g = g0.clone();
        assert_eq!(fold_constants(&mut g), 3);
        assert_eq!(g.ops.len(), 1);
        assert!(matches!(g.ops[0].kind, OpKind::FullyConnected { .. }));
        let w0 = values(&g.tensors[1]);
        let w: Vec<f32> = w0.iter().map(|v| v * 0.5).collect();
        assert_eq!(values(&g.tensors[3]), w);
        assert_eq!(values(&g.tensors[8]), [1.25, 2.5, 4.5]);
        // Unfolded, the FC's weights are not constants and the graph does not run; folded, it
        // computes x·wᵀ + b on the host executor and in the runtime.
        let x = [0.5f32, -1.0, 2.0, 0.25];
        let cpu = candle_core::Device::Cpu;
        assert!(CandleGraph::new(&g0, &cpu).is_err());
        let want: Vec<f32> = (0..3)
            .map(|o| (0..4).map(|i| x[i] * w[o * 4 + i]).sum::<f32>() + [1.25, 2.5, 4.5][o])
            .collect();
        let after = CandleGraph::new(&g, &cpu).unwrap().run(&x).unwrap();
        for (a, b) in after.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-5, "{a} vs {b}");
        }
        let artifact = crate::convert::assemble_graph(&g, "folded").unwrap();
        let input = crate::npy::Array::F32 {
            shape: vec![1, 4],
            data: x.to_vec(),
        };
        let run = crate::runner::run_batch(&artifact, &input, |_| {}).unwrap();
        let crate::runner::Outputs::F32(y) = run.outputs else {
            panic!("f32 outputs expected")
        };
        for (a, b) in y.iter().zip(&after) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
        }
        // A second call finds nothing left to fold.
        assert_eq!(fold_constants(&mut g), 0);

        // `kiln quantize` folds first: the unfolded graph quantizes to a one-layer int8 model.
        use crate::quantize::pipeline::{quantize, Precision, Request};
        let calib = crate::npy::Array::F32 {
            shape: vec![8, 4],
            data: (0..32).map(|i| (i % 7) as f32 * 0.5 - 1.5).collect(),
        };
        let q = quantize(Request::new("g", g0, &calib, Precision::Int8), |_, _, _| {}).unwrap();
        assert_eq!(q.report.layers.len(), 1);
        assert_eq!(q.report.layers[0].precision, "int8");
    }

    #[test]
    fn graph_outputs_and_non_f32_operands_are_not_folded() {
        // The constant op's result is also a graph output: it stays an op.
        let mut g = fc_with_constant_subgraphs();
        g.outputs.push(8);
        assert_eq!(fold_constants(&mut g), 2);
        assert_eq!(g.ops.len(), 2);
        assert!(matches!(g.ops[0].kind, OpKind::Sub { .. }));
        // An int8 constant operand is the quantizer's business, not this pass's.
        let mut g = fc_with_constant_subgraphs();
        g.tensors[2].dtype = DType::I8;
        g.tensors[2].data = Some(vec![1]);
        assert_eq!(fold_constants(&mut g), 2);
        assert!(matches!(g.ops[0].kind, OpKind::Mul { .. }));
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
