//! The candle executor against kiln-runtime's f32 kernels on the float MLPerf Tiny models: every
//! activation of a few samples, and the calibration statistics built from either source.

mod common;

use candle_core::Device;
use kiln::exec_candle::{calibrate_with_candle, CandleGraph};
use kiln::import::tflite::import_tflite;
use kiln::ir::Graph;
use kiln::npy::{read_real, Array};
use kiln::quantize::calibrate::{calibrate, ActivationRunner};
use std::time::Instant;

/// Worst error over all activations of all samples, relative to each tensor's largest
/// magnitude: `max |candle - runtime| / max |runtime|` per tensor and sample.
fn compare(name: &str, g: &Graph, samples: &[&[f32]]) -> f64 {
    let exec = CandleGraph::new(g, &Device::Cpu).expect("candle graph");
    let mut runner = ActivationRunner::new(g).expect("runtime graph");
    let mut worst = 0f64;
    let mut worst_at = String::new();
    let (mut t_candle, mut t_runtime) = (0f64, 0f64);
    let mut compared = 0;
    for (s, sample) in samples.iter().enumerate() {
        let t = Instant::now();
        let ours = exec.run_all(sample).expect("candle run");
        t_candle += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut seen = vec![false; g.tensors.len()];
        runner
            .run(sample, |id, want| {
                seen[id] = true;
                let got = ours[id]
                    .as_ref()
                    .unwrap_or_else(|| panic!("{name}: candle has no tensor {id}"));
                assert_eq!(got.len(), want.len(), "{name}: tensor {id} size");
                let scale = want.iter().fold(0f64, |m, &v| m.max(f64::from(v).abs()));
                let err = got.iter().zip(want).fold(0f64, |m, (&a, &b)| {
                    m.max((f64::from(a) - f64::from(b)).abs())
                });
                let rel = if scale > 0.0 { err / scale } else { err };
                if rel > worst {
                    worst = rel;
                    worst_at = format!("sample {s}, tensor {id} `{}`", g.tensors[id].name);
                }
                compared += 1;
            })
            .expect("runtime run");
        t_runtime += t.elapsed().as_secs_f64();
        // Both executors expose the same activations.
        for (id, v) in ours.iter().enumerate() {
            assert_eq!(v.is_some(), seen[id], "{name}: tensor {id} visibility");
        }
        let out = exec.run(sample).expect("candle output");
        assert_eq!(
            Some(&out),
            ours[g.outputs[0]].as_ref(),
            "{name}: run vs run_all"
        );
    }
    eprintln!(
        "{name}: {compared} activation tensors over {} samples, worst relative error {worst:.2e} ({worst_at}); candle {:.1} ms/sample, runtime {:.1} ms/sample",
        samples.len(),
        t_candle * 1e3 / samples.len() as f64,
        t_runtime * 1e3 / samples.len() as f64
    );
    assert!(
        worst <= 1e-4,
        "{name}: candle and kiln-runtime differ by {worst:.3e} relative at {worst_at}"
    );
    worst
}

/// A graph with every op kind the executor supports (and SAME padding, dilation, depth
/// multipliers, broadcasting, negative axes), random weights; needs no test data.
fn op_zoo() -> Graph {
    use kiln::ir::{Op, OpKind, Padding, Tensor};
    use kiln_runtime::graph::{Activation, DType};
    let mut seed = 0x1234_5678u64;
    let mut rand = move |n: usize, lo: f32, hi: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                lo + (hi - lo) * ((seed >> 40) as f32 / (1u64 << 24) as f32)
            })
            .collect()
    };
    let mut tensors: Vec<Tensor> = Vec::new();
    let mut t = |shape: &[usize], data: Option<Vec<f32>>| -> usize {
        tensors.push(Tensor {
            name: format!("t{}", tensors.len()),
            dtype: DType::F32,
            shape: shape.to_vec(),
            data: data.map(|v| v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            quant: None,
        });
        tensors.len() - 1
    };
    let x = t(&[1, 6, 6, 2], None);
    let w0 = t(&[3, 3, 3, 2], Some(rand(54, -0.5, 0.5)));
    let b0 = t(&[3], Some(rand(3, -0.2, 0.2)));
    let a = t(&[1, 6, 6, 3], None);
    let w1 = t(&[1, 3, 3, 4], Some(rand(36, -0.5, 0.5)));
    let b1 = t(&[4], Some(rand(4, -0.2, 0.2)));
    let b = t(&[1, 3, 3, 4], None);
    let avg = t(&[1, 6, 6, 3], None);
    let relu = t(&[1, 6, 6, 3], None);
    let sum = t(&[1, 6, 6, 3], None);
    let maxp = t(&[1, 3, 3, 3], None);
    let cat = t(&[1, 3, 3, 7], None);
    let pad = t(&[1, 4, 4, 7], None);
    let tr = t(&[1, 7, 4, 4], None);
    let mean = t(&[1, 7, 1, 4], None);
    let leaky = t(&[1, 7, 1, 4], None);
    let slope = t(&[4], Some(vec![0.1, -0.3, 0.5, 2.0]));
    let prelu = t(&[1, 7, 1, 4], None);
    let c1 = t(&[1], Some(vec![0.25]));
    let sub = t(&[1, 7, 1, 4], None);
    let c4 = t(&[4], Some(vec![0.5, -2.0, 1.5, 3.0]));
    let div = t(&[1, 7, 1, 4], None);
    let hswish = t(&[1, 7, 1, 4], None);
    let hsig = t(&[1, 7, 1, 4], None);
    let mul = t(&[1, 7, 1, 4], None);
    let clamp = t(&[1, 7, 1, 4], None);
    let logistic = t(&[1, 7, 1, 4], None);
    let tanh = t(&[1, 7, 1, 4], None);
    let relu6 = t(&[1, 7, 1, 4], None);
    let flat = t(&[1, 28], None);
    let wf = t(&[5, 28], Some(rand(140, -0.5, 0.5)));
    let bf = t(&[5], Some(rand(5, -0.2, 0.2)));
    let fc = t(&[1, 5], None);
    let c5 = t(&[5], Some(rand(5, -1.0, 1.0)));
    let add = t(&[1, 5], None);
    let out = t(&[1, 5], None);
    let op = |kind: OpKind, inputs: &[usize], output: usize| Op {
        kind,
        inputs: inputs.iter().map(|&i| Some(i)).collect(),
        outputs: vec![output],
    };
    let none = Activation::None;
    let ops = vec![
        op(
            OpKind::Conv2d {
                stride: [1, 1],
                dilation: [2, 2],
                padding: Padding::Same,
                activation: none,
            },
            &[x, w0, b0],
            a,
        ),
        op(
            OpKind::DepthwiseConv2d {
                stride: [2, 2],
                dilation: [1, 1],
                padding: Padding::Same,
                depth_multiplier: 2,
                activation: Activation::ReluN1To1,
            },
            &[x, w1, b1],
            b,
        ),
        op(
            OpKind::AveragePool2d {
                filter: [3, 3],
                stride: [1, 1],
                padding: Padding::Same,
                activation: none,
            },
            &[a],
            avg,
        ),
        op(OpKind::Relu, &[avg], relu),
        op(OpKind::Add { activation: none }, &[relu, a], sum),
        op(
            OpKind::MaxPool2d {
                filter: [3, 3],
                stride: [2, 2],
                padding: Padding::Same,
                activation: none,
            },
            &[sum],
            maxp,
        ),
        op(
            OpKind::Concatenation {
                axis: -1,
                activation: Activation::Relu,
            },
            &[b, maxp],
            cat,
        ),
        op(
            OpKind::Pad {
                paddings: vec![[0, 0], [1, 0], [0, 1], [0, 0]],
            },
            &[cat],
            pad,
        ),
        op(
            OpKind::Transpose {
                perm: vec![0, 3, 1, 2],
            },
            &[pad],
            tr,
        ),
        op(
            OpKind::Mean {
                axes: vec![2],
                keep_dims: true,
            },
            &[tr],
            mean,
        ),
        op(OpKind::LeakyRelu { alpha: 0.2 }, &[mean], leaky),
        op(OpKind::PRelu, &[leaky, slope], prelu),
        op(OpKind::Sub { activation: none }, &[prelu, c1], sub),
        op(OpKind::Div { activation: none }, &[sub, c4], div),
        op(OpKind::HardSwish, &[div], hswish),
        op(
            OpKind::HardSigmoid {
                alpha: 0.2,
                beta: 0.5,
            },
            &[hswish],
            hsig,
        ),
        op(OpKind::Mul { activation: none }, &[hsig, div], mul),
        op(
            OpKind::Clamp {
                min: -0.3,
                max: 0.4,
            },
            &[mul],
            clamp,
        ),
        op(OpKind::Logistic, &[clamp], logistic),
        op(OpKind::Tanh, &[logistic], tanh),
        op(OpKind::Relu6, &[tanh], relu6),
        op(OpKind::Reshape, &[relu6], flat),
        op(
            OpKind::FullyConnected {
                activation: Activation::Relu6,
            },
            &[flat, wf, bf],
            fc,
        ),
        op(OpKind::Add { activation: none }, &[fc, c5], add),
        op(OpKind::Softmax { beta: 0.7 }, &[add], out),
    ];
    Graph {
        name: "zoo".into(),
        tensors,
        ops,
        inputs: vec![x],
        outputs: vec![out],
    }
}

#[test]
fn every_supported_op_matches_runtime() {
    let g = op_zoo();
    let per = g.tensors[g.inputs[0]].elements();
    let mut seed = 99u64;
    let data: Vec<f32> = (0..3 * per)
        .map(|_| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            4.0 * ((seed >> 40) as f32 / (1u64 << 24) as f32) - 2.0
        })
        .collect();
    compare("op zoo", &g, &split(&data, per, 3));
}

fn model(dir: &std::path::Path, file: &str) -> Graph {
    let bytes = std::fs::read(common::mlperf(dir, file)).expect("model file");
    import_tflite(&bytes).expect("import")
}

fn f32s(x: &Array) -> &[f32] {
    match x {
        Array::F32 { data, .. } => data,
        Array::I8 { .. } => panic!("float samples expected"),
    }
}

fn split(data: &[f32], per: usize, n: usize) -> Vec<&[f32]> {
    data.chunks_exact(per).take(n).collect()
}

#[test]
fn resnet8_matches_runtime_on_every_activation() {
    let Some(dir) = common::testdata() else {
        return;
    };
    let g = model(&dir, "pretrainedResnet.tflite");
    let x = read_real(&dir.join("data/ic01.npz"), None, None).unwrap();
    let per = g.tensors[g.inputs[0]].elements();
    compare("ResNet-8", &g, &split(f32s(&x), per, 3));
}

#[test]
fn vww_matches_runtime_on_every_activation() {
    let Some(dir) = common::testdata() else {
        return;
    };
    let g = model(&dir, "vww_96_float.tflite");
    let x = read_real(&dir.join("data/vww01.npz"), None, Some(1.0 / 255.0)).unwrap();
    let per = g.tensors[g.inputs[0]].elements();
    compare("VWW", &g, &split(f32s(&x), per, 2));
}

#[test]
fn anomaly_autoencoder_matches_runtime_on_every_activation() {
    let Some(dir) = common::testdata() else {
        return;
    };
    let g = model(&dir, "ad01_fp32.tflite");
    let x = read_real(&dir.join("data/ad01.npz"), Some("spectrograms"), None).unwrap();
    let per = g.tensors[g.inputs[0]].elements();
    assert_eq!(per, 640);
    // 640-value windows (5 frames of 128 mels) at a few places of the first clips.
    let data = f32s(&x);
    let samples: Vec<&[f32]> = [0usize, 128 * 37, 128 * 190, 128 * 700]
        .iter()
        .filter(|&&o| o + per <= data.len())
        .map(|&o| &data[o..o + per])
        .collect();
    assert!(samples.len() >= 3);
    compare("AD01", &g, &samples);
}

#[test]
fn calibration_with_candle_matches_runtime_calibration() {
    let Some(dir) = common::testdata() else {
        return;
    };
    let g = model(&dir, "pretrainedResnet.tflite");
    let Array::F32 { shape, data } = read_real(&dir.join("data/ic01.npz"), None, None).unwrap()
    else {
        panic!("float samples expected")
    };
    let per: usize = shape[1..].iter().product();
    let mut s = shape.clone();
    s[0] = 10;
    let x = Array::F32 {
        shape: s,
        data: data[..10 * per].to_vec(),
    };
    let t = Instant::now();
    let want = calibrate(&g, &x, |_, _| {}).unwrap();
    let t_runtime = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let got = calibrate_with_candle(&g, &x, |_, _| {}).unwrap();
    let t_candle = t.elapsed().as_secs_f64();
    assert_eq!(got.samples, want.samples);
    assert_eq!(got.tensors.len(), want.tensors.len());
    let close = |a: f32, b: f32| (a - b).abs() <= 1e-5 * a.abs().max(b.abs()).max(1e-3);
    let mut worst = 0f64;
    let mut tensors = 0;
    for (id, (a, b)) in got.tensors.iter().zip(&want.tensors).enumerate() {
        let (Some(a), Some(b)) = (a, b) else {
            assert_eq!(
                a.is_some(),
                b.is_some(),
                "tensor {id}: statistics in only one"
            );
            continue;
        };
        tensors += 1;
        for (x, y) in [(a.min, b.min), (a.max, b.max)] {
            assert!(
                close(x, y),
                "tensor {id} `{}`: range {}..{} (candle) vs {}..{} (runtime)",
                g.tensors[id].name,
                a.min,
                a.max,
                b.min,
                b.max
            );
            worst = worst.max(f64::from((x - y).abs() / x.abs().max(y.abs()).max(1e-3)));
        }
        assert_eq!(a.histogram.len(), b.histogram.len());
        assert_eq!(
            a.histogram.iter().sum::<u64>(),
            b.histogram.iter().sum::<u64>()
        );
        assert_eq!(a.channel_means.len(), b.channel_means.len());
        let scale = b.channel_means.iter().fold(0f64, |m, v| m.max(v.abs()));
        for (x, y) in a.channel_means.iter().zip(&b.channel_means) {
            assert!(
                (x - y).abs() <= 1e-4 * scale.max(1e-6),
                "tensor {id}: channel mean {x} vs {y}"
            );
        }
    }
    eprintln!(
        "ResNet-8 calibration, 10 samples: {tensors} tensors, worst range difference {worst:.2e} relative; runtime {t_runtime:.2} s, candle {t_candle:.2} s"
    );
}
