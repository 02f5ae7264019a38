//! kiln-runtime's candle backend (feature `candle`) on the CPU, against the portable
//! interpreter on the same artifacts: an fp16 and an f32 ResNet-8 within f16 and f32 tolerance;
//! the MLPerf Tiny int8 models (computed in f32 with fake quantization, not bit-exact: the
//! fixed-point rounding of each layer differs by up to a step, and a final softmax magnifies it)
//! with the same top-1 on nearly every sample and a fraction of a step apart on average.

mod common;

use kiln::artifact::AlignedBytes;
use kiln::npy::{read_npz_i8, read_real, Array};
use kiln::quantize::pipeline::{quantize, Precision, Request};
use kiln::runner::{run_batch, Outputs};
use kiln_runtime::candle_backend::CandleModel;
use kiln_runtime::graph::DType;
use kiln_runtime::Model;

/// Outputs of every sample through the candle backend, as f32 real values or raw int8.
fn candle_outputs(artifact: &[u8], samples: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let bytes = AlignedBytes::new(artifact);
    let model = Model::load(bytes.as_slice()).expect("load");
    let exec = CandleModel::new(&model, &candle_core::Device::Cpu).expect("candle model");
    samples
        .iter()
        .map(|s| exec.run(&[s]).expect("run").remove(0))
        .collect()
}

fn argmax<T: PartialOrd + Copy>(v: &[T]) -> usize {
    (0..v.len())
        .max_by(|&a, &b| v[a].partial_cmp(&v[b]).unwrap_or(std::cmp::Ordering::Equal))
        .unwrap_or(0)
}

/// int8 models: portable (= TFLM golden) vs candle.
fn int8_case(model: &str, golden: &str, samples: usize, max_mean_lsb: f64, min_agree: f64) {
    let Some(dir) = common::testdata() else {
        return;
    };
    let source = std::fs::read(common::mlperf(&dir, model)).expect("model");
    let artifact = kiln::convert::convert_tflite(&source, model)
        .expect("convert")
        .artifact;
    let (shape, input) = read_npz_i8(&dir.join("golden").join(golden), "input").expect("golden");
    let per: usize = shape[1..].iter().product();
    let n = samples.min(shape[0]);
    let portable = run_batch(
        &artifact,
        &Array::I8 {
            shape: [vec![n], shape[1..].to_vec()].concat(),
            data: input[..n * per].to_vec(),
        },
        |_| {},
    )
    .expect("portable");
    let Outputs::I8(want) = portable.outputs else {
        panic!("int8 outputs expected")
    };
    let inputs: Vec<Vec<u8>> = input[..n * per]
        .chunks(per)
        .map(|s| s.iter().map(|&v| v as u8).collect())
        .collect();
    let got = candle_outputs(&artifact, &inputs);
    let per_out = want.len() / n;
    let (mut worst, mut agree, mut total) = (0i32, 0usize, 0i64);
    for (s, g) in got.iter().enumerate() {
        let w = &want[s * per_out..(s + 1) * per_out];
        let g: Vec<i8> = g.iter().map(|&b| b as i8).collect();
        for (a, b) in w.iter().zip(&g) {
            let d = (i32::from(*a) - i32::from(*b)).abs();
            worst = worst.max(d);
            total += i64::from(d);
        }
        agree += usize::from(argmax(w) == argmax(&g));
    }
    let agreement = agree as f64 / n as f64;
    let mean = total as f64 / want.len() as f64;
    eprintln!(
        "{model}: {n} samples, candle vs portable int8: mean {mean:.3} LSB, max {worst} LSB, top-1 agreement {:.1} %",
        agreement * 100.0
    );
    assert!(mean <= max_mean_lsb, "{model}: {mean} LSB apart on average");
    assert!(agreement >= min_agree, "{model}: agreement {agreement}");
}

#[test]
fn kws_int8_on_candle_matches_the_portable_kernels() {
    int8_case("kws_ref_model.tflite", "kws_ref_model.npz", 200, 1.0, 0.97);
}

#[test]
fn resnet8_int8_on_candle_matches_the_portable_kernels() {
    int8_case(
        "pretrainedResnet_quant.tflite",
        "pretrainedResnet_quant.npz",
        100,
        2.0,
        0.97,
    );
}

#[test]
fn vww_int8_on_candle_matches_the_portable_kernels() {
    int8_case("vww_96_int8.tflite", "vww_96_int8.npz", 40, 2.5, 0.95);
}

/// Float artifacts: f32 as imported, and fp16 from `kiln quantize --precision fp16`.
#[test]
fn resnet8_f32_and_fp16_on_candle_match_the_portable_kernels() {
    let Some(dir) = common::testdata() else {
        return;
    };
    let source = std::fs::read(common::mlperf(&dir, "pretrainedResnet.tflite")).expect("model");
    let graph = kiln::import::tflite::import_tflite(&source).expect("import");
    let x = read_real(&dir.join("data/ic01.npz"), None, None).expect("data");
    let Array::F32 { shape, data } = &x else {
        panic!("float samples expected")
    };
    let per: usize = shape[1..].iter().product();
    let n = 20;
    let calib = Array::F32 {
        shape: [vec![n], shape[1..].to_vec()].concat(),
        data: data[..n * per].to_vec(),
    };
    let f32_artifact = kiln::convert::convert_tflite(&source, "r8")
        .expect("convert")
        .artifact;
    let fp16_artifact = quantize(
        Request::new("r8", graph, &calib, Precision::Fp16),
        |_, _, _| {},
    )
    .expect("quantize")
    .artifact;
    for (precision, artifact, rel_tol) in [
        ("f32", f32_artifact, 1e-4f32),
        ("fp16", fp16_artifact, 2e-2f32),
    ] {
        let bytes = AlignedBytes::new(&artifact);
        let model = Model::load(bytes.as_slice()).expect("load");
        let in_dtype = model.tensor(model.inputs()[0]).expect("input").dtype;
        let out_dtype = model.tensor(model.outputs()[0]).expect("output").dtype;
        let inputs: Vec<Vec<u8>> = data[..n * per]
            .chunks(per)
            .map(|s| match in_dtype {
                DType::F16 => s
                    .iter()
                    .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                    .collect(),
                _ => s.iter().flat_map(|v| v.to_le_bytes()).collect(),
            })
            .collect();
        let portable = run_batch(&artifact, &calib, |_| {}).expect("portable");
        let want: Vec<f32> = match portable.outputs {
            Outputs::F32(v) => v,
            Outputs::F16(v) => v.iter().map(|h| h.to_f32()).collect(),
            Outputs::I8(_) => panic!("float outputs expected"),
        };
        let got: Vec<f32> = candle_outputs(&artifact, &inputs)
            .iter()
            .flat_map(|b| match out_dtype {
                DType::F16 => b
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect::<Vec<_>>(),
                _ => b
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            })
            .collect();
        assert_eq!(got.len(), want.len());
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let scale = want.iter().map(|v| v.abs()).fold(0f32, f32::max);
        eprintln!(
            "ResNet-8 {precision}: candle vs portable max |diff| {worst:.2e} (outputs up to {scale:.2})"
        );
        assert!(worst <= rel_tol * scale.max(1e-3), "{precision}: {worst}");
    }
}

/// A wrong-sized input is an error, not a panic.
#[test]
fn wrong_input_size_is_refused() {
    let Some(dir) = common::testdata() else {
        return;
    };
    let source = std::fs::read(common::mlperf(&dir, "kws_ref_model.tflite")).expect("model");
    let artifact = kiln::convert::convert_tflite(&source, "kws")
        .expect("convert")
        .artifact;
    let bytes = AlignedBytes::new(&artifact);
    let model = Model::load(bytes.as_slice()).expect("load");
    let exec = CandleModel::new(&model, &candle_core::Device::Cpu).expect("candle model");
    let err = exec.run(&[&[0u8; 3]]).expect_err("refused");
    assert!(err.to_string().contains("input 0 has 3 bytes"), "{err}");
}
