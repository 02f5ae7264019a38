//! `kiln quantize` on the real float models: calibrate on the first half of a set, score on the
//! second half, float and quantized in the same run (figures printed for BENCHMARKS.md).

mod common;

use kiln::npy::{read_labels, read_real, Array};
use kiln::quantize::pipeline::{quantize, EvalSet, Metric, Precision, Quantized, Request};
use kiln::quantize::ranges::Estimator;
use kiln::quantize::QuantizeOptions;
use std::ops::Range;
use std::path::{Path, PathBuf};

fn take(x: &Array, range: std::ops::Range<usize>) -> Array {
    let Array::F32 { shape, data } = x else {
        panic!("float samples expected")
    };
    let per: usize = shape[1..].iter().product();
    let mut s = shape.clone();
    s[0] = range.len();
    Array::F32 {
        shape: s,
        data: data[range.start * per..range.end * per].to_vec(),
    }
}

struct Case {
    model: PathBuf,
    calib: Array,
    eval: Array,
    labels: Vec<i64>,
    metric: Metric,
}

/// A labelled set split into calibration and evaluation ranges.
fn case(
    model: PathBuf,
    data: &Path,
    u8_scale: Option<f32>,
    calib: Range<usize>,
    eval: Range<usize>,
) -> Case {
    let x = read_real(data, None, u8_scale).unwrap();
    let y = read_labels(data).unwrap();
    Case {
        model,
        calib: take(&x, calib),
        labels: y[eval.clone()].to_vec(),
        eval: take(&x, eval),
        metric: Metric::Top1,
    }
}

fn run(case: &Case, precision: Precision, estimator: Estimator) -> Quantized {
    try_run(case, precision, estimator, None).expect("quantize")
}

fn try_run(
    case: &Case,
    precision: Precision,
    estimator: Estimator,
    budget: Option<f64>,
) -> anyhow::Result<Quantized> {
    let (graph, format, source) = kiln::import::import_file(&case.model).expect("import");
    let req = Request {
        name: "test".into(),
        graph,
        source: serde_json::json!({ "format": format, "sha256": kiln::convert::sha256_hex(&source) }),
        calib: &case.calib,
        calib_sha256: "calib".into(),
        precision,
        options: QuantizeOptions {
            estimator,
            ..Default::default()
        },
        eval: Some(EvalSet {
            x: &case.eval,
            y: &case.labels,
            metric: case.metric,
            sha256: "eval".into(),
        }),
        max_accuracy_drop: budget,
        selftest_count: 2,
        extra: serde_json::Value::Null,
    };
    quantize(req, |_, _, _| {})
}

fn check(name: &str, case: &Case, estimator: Estimator) {
    let q8 = run(case, Precision::Int8, estimator);
    let q16 = run(case, Precision::Fp16, estimator);
    let (f, i8m, f16m) = (
        q8.report.float_metric.unwrap(),
        q8.report.quantized_metric.unwrap(),
        q16.report.quantized_metric.unwrap(),
    );
    eprintln!(
        "{name}: float {:.2} %, int8 {:.2} % ({:+.2} pt), fp16 {:.2} % ({:+.2} pt), int8 arena {} B, weights {} B",
        f * 100.0,
        i8m * 100.0,
        (i8m - f) * 100.0,
        f16m * 100.0,
        (f16m - f) * 100.0,
        q8.report.arena_bytes,
        q8.report.weights_bytes
    );
    assert!(
        i8m >= f - 0.005,
        "{name}: int8 {i8m} is more than 0.5 pt below float {f}"
    );
    assert!(
        f16m >= f - 0.001,
        "{name}: fp16 {f16m} is more than 0.1 pt below float {f}"
    );
    assert_eq!(q8.report.int8_mac_fraction, 1.0);
    // The artifacts load, and their self-tests pass on the host runtime.
    for q in [&q8, &q16] {
        let bytes = kiln::artifact::AlignedBytes::new(&q.artifact);
        let model = kiln_runtime::Model::load(bytes.as_slice()).unwrap();
        let mut arena = kiln::artifact::AlignedBytes::zeroed(model.arena_bytes());
        let mut interp = kiln_runtime::Interpreter::new(model, arena.as_mut_slice()).unwrap();
        let r = kiln_runtime::sections::run_self_test(&mut interp).unwrap();
        assert_eq!((r.passed, r.failed), (2, 0));
        let mut hist = 0;
        kiln_runtime::sections::baseline_histograms(&model, |_| hist += 1).unwrap();
        assert_eq!(hist, 2, "input and output baselines");
    }
}

#[test]
fn resnet8_tflite_int8_and_fp16_keep_accuracy() {
    let Some(dir) = common::testdata() else {
        return;
    };
    let case = case(
        common::mlperf(&dir, "pretrainedResnet.tflite"),
        &dir.join("data/ic01.npz"),
        None,
        0..100,
        100..200,
    );
    check("ResNet-8 (tflite)", &case, Estimator::MinMax);
}

#[test]
fn vww_tflite_int8_and_fp16_keep_accuracy() {
    let Some(dir) = common::testdata() else {
        return;
    };
    let case = case(
        common::mlperf(&dir, "vww_96_float.tflite"),
        &dir.join("data/vww01.npz"),
        Some(1.0 / 255.0),
        0..250,
        250..500,
    );
    check("VWW (tflite)", &case, Estimator::MinMax);
}

#[test]
fn kws_hybrid_int8_and_fp16_keep_accuracy() {
    let Some(dir) = common::testdata() else {
        return;
    };
    let data = dir.join("data/kws01.npz");
    // kws01 holds features already quantized with the int8 model's input parameters; the
    // hybrid (float-input) model takes their real values.
    let Array::I8 { shape, data: q } = kiln::npy::read_input(&data).unwrap() else {
        panic!("int8 features")
    };
    let real: Vec<f32> = q
        .iter()
        .map(|&v| 0.584_702_9 * (v as i32 - 83) as f32)
        .collect();
    let x = Array::F32 { shape, data: real };
    let y = read_labels(&data).unwrap();
    let case = Case {
        model: common::mlperf(&dir, "kws_ref_model_float32.tflite"),
        calib: take(&x, 0..500),
        eval: take(&x, 500..1000),
        labels: y[500..].to_vec(),
        metric: Metric::Top1,
    };
    check("KWS (hybrid tflite)", &case, Estimator::MinMax);
}

#[test]
fn anomaly_detection_int8_auc() {
    let Some(dir) = common::testdata() else {
        return;
    };
    let data = dir.join("data/ad01.npz");
    let Array::F32 { shape, data: clips } = read_real(&data, Some("spectrograms"), None).unwrap()
    else {
        panic!()
    };
    let y = read_labels(&data).unwrap();
    let (frames, mels) = (shape[1], shape[2]);
    let per_clip = frames * mels;
    let half = frames / 2;
    // The set is 16 clips (8 normal, 8 anomalous): calibrate on windows (every 2nd position) of
    // the first half of every clip's frames, score each clip on the second half.
    let mut cal = Vec::new();
    let mut eval = Vec::new();
    for c in 0..shape[0] {
        let clip = &clips[c * per_clip..(c + 1) * per_clip];
        for w in (0..=half - 5).step_by(2) {
            cal.extend_from_slice(&clip[w * mels..(w + 5) * mels]);
        }
        eval.extend_from_slice(&clip[half * mels..]);
    }
    let n_cal = cal.len() / 640;
    let case = Case {
        model: common::mlperf(&dir, "ad01_fp32.tflite"),
        calib: Array::F32 {
            shape: vec![n_cal, 640],
            data: cal,
        },
        eval: Array::F32 {
            shape: vec![shape[0], frames - half, mels],
            data: eval,
        },
        labels: y,
        metric: Metric::Auc,
    };
    let q = run(&case, Precision::Int8, Estimator::MinMax);
    let (f, qa) = (
        q.report.float_metric.unwrap(),
        q.report.quantized_metric.unwrap(),
    );
    eprintln!("AD (tflite): float AUC {f:.3}, int8 AUC {qa:.3}");
    assert!(qa >= 0.84, "int8 AUC {qa} below 0.84 (float {f})");
}

#[test]
fn quantizing_twice_gives_identical_bytes_and_the_manifest_names_the_inputs() {
    let Some(dir) = common::testdata() else {
        return;
    };
    let case = case(
        common::mlperf(&dir, "pretrainedResnet.tflite"),
        &dir.join("data/ic01.npz"),
        None,
        0..20,
        100..120,
    );
    let a = run(&case, Precision::Int8, Estimator::Entropy);
    let b = run(&case, Precision::Int8, Estimator::Entropy);
    assert_eq!(a.artifact, b.artifact, "quantization is not reproducible");
    let report = kiln::inspect::inspect(&a.artifact).unwrap();
    let source = std::fs::read(&case.model).unwrap();
    assert_eq!(
        report.manifest["source"]["sha256"],
        kiln::convert::sha256_hex(&source)
    );
    assert_eq!(report.manifest["calibration"]["sha256"], "calib");
    assert_eq!(report.manifest["calibration"]["estimator"], "entropy");
    assert!(report.manifest["metrics"]["quantized"].as_f64().is_some());
}

#[test]
fn resnet8_onnx_int8_and_fp16_keep_accuracy() {
    let Some(dir) = common::testdata() else {
        return;
    };
    let case = case(
        dir.join("models/onnx/pretrainedResnet.onnx"),
        &dir.join("data/ic01.npz"),
        None,
        0..100,
        100..200,
    );
    check("ResNet-8 (onnx)", &case, Estimator::MinMax);
}

#[test]
fn mnist_onnx_int8_and_fp16_keep_accuracy() {
    let Some(dir) = common::testdata() else {
        return;
    };
    let case = case(
        dir.join("models/onnx/mnist-8/model.onnx"),
        &dir.join("data/mnist_t10k.npz"),
        None,
        0..1000,
        1000..10_000,
    );
    check("MNIST (onnx)", &case, Estimator::MinMax);
}

#[test]
fn auto_precision_builds_mixed_int8_fp16_graphs() {
    let Some(dir) = common::testdata() else {
        return;
    };
    let case = case(
        common::mlperf(&dir, "pretrainedResnet.tflite"),
        &dir.join("data/ic01.npz"),
        None,
        0..20,
        100..140,
    );
    let (graph, _, _) = kiln::import::import_file(&case.model).unwrap();
    let run_auto = |budget: f64| try_run(&case, Precision::Auto, Estimator::MinMax, Some(budget));
    // A generous budget: everything stays int8.
    let easy = run_auto(5.0).unwrap();
    assert_eq!(easy.report.int8_mac_fraction, 1.0);
    // An impossible budget (beat the float model by 10 pt): every mix is tried, the fp16
    // fallback is measured, and the gate refuses it.
    let err = run_auto(-10.0)
        .err()
        .expect("an impossible budget is refused")
        .to_string();
    assert!(err.contains("accuracy gate"), "{err}");

    // A mixed graph: int8 everywhere except two layers kept in fp16, with QUANTIZE / DEQUANTIZE
    // at the boundaries; it lowers, runs and stays close to the float model.
    let mut g = kiln::lower::normalize(&graph).unwrap();
    kiln::passes::fuse_activations(&mut g);
    let calib = kiln::quantize::calibrate::calibrate(&g, &case.calib, |_, _| {}).unwrap();
    let mut precisions = vec![kiln::quantize::OpPrecision::Int8; g.ops.len()];
    precisions[1] = kiln::quantize::OpPrecision::Float;
    precisions[g.ops.len() - 2] = kiln::quantize::OpPrecision::Float;
    let opts = QuantizeOptions {
        float_dtype: kiln_runtime::graph::DType::F16,
        ..Default::default()
    };
    let mixed = kiln::quantize::quantize_graph(&g, &calib, &precisions, &opts).unwrap();
    let kinds: Vec<&str> = mixed
        .ops
        .iter()
        .map(|op| kiln::lower::ir_name(&op.kind))
        .collect();
    assert!(
        kinds.contains(&"QUANTIZE") && kinds.contains(&"DEQUANTIZE"),
        "{kinds:?}"
    );
    let art = kiln::convert::assemble_graph(&mixed, "mixed").unwrap();
    let eval = EvalSet {
        x: &case.eval,
        y: &case.labels,
        metric: Metric::Top1,
        sha256: String::new(),
    };
    let m = kiln::quantize::pipeline::measure(&art, &eval).unwrap();
    let f =
        kiln::quantize::pipeline::measure(&kiln::convert::assemble_graph(&g, "f").unwrap(), &eval)
            .unwrap();
    eprintln!("mixed int8/fp16: top-1 {m:.3}, float {f:.3}");
    assert!(m >= f - 0.05, "mixed {m} vs float {f}");
}

/// `auto` with layers that int8 cannot carry: MNIST with one output channel of its second conv
/// scaled down by 100 and the classifier's weights for that channel scaled up by as much (the
/// float function is unchanged; ReLU and max-pooling commute with a positive scale). In int8
/// that channel's activations round to nothing in the per-tensor range, and its classifier
/// weights take each row's whole per-channel range so that the other weights round away:
/// all-int8 loses far more than the budget, fp16 carries both, and `auto` keeps the fewest
/// layers in fp16 and the rest in int8 within a 0.5 pt budget.
#[test]
fn auto_keeps_a_fragile_layer_in_fp16_and_the_rest_in_int8() {
    let Some(dir) = common::testdata() else {
        return;
    };
    let model = dir.join("models/onnx/mnist-8/model.onnx");
    let case = case(
        model.clone(),
        &dir.join("data/mnist_t10k.npz"),
        None,
        0..300,
        1000..3000,
    );
    let (mut graph, format, source) = kiln::import::import_file(&model).expect("import");
    let f32s = |t: &kiln::ir::Tensor| -> Vec<f32> {
        t.data
            .as_ref()
            .expect("constant")
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let set = |t: &mut kiln::ir::Tensor, v: &[f32]| {
        t.data = Some(v.iter().flat_map(|x| x.to_le_bytes()).collect());
    };
    let convs: Vec<usize> = (0..graph.ops.len())
        .filter(|&i| matches!(graph.ops[i].kind, kiln::ir::OpKind::Conv2d { .. }))
        .collect();
    let fc = (0..graph.ops.len())
        .find(|&i| matches!(graph.ops[i].kind, kiln::ir::OpKind::FullyConnected { .. }))
        .expect("a fully-connected classifier");
    let conv = convs[1];
    let alpha = 100f32;
    let (w, b) = (
        graph.ops[conv].inputs[1].expect("filter"),
        graph.ops[conv].inputs[2].expect("bias"),
    );
    let per_oc: usize = graph.tensors[w].shape[1..].iter().product();
    let mut wv = f32s(&graph.tensors[w]);
    wv[..per_oc].iter_mut().for_each(|v| *v /= alpha);
    set(&mut graph.tensors[w], &wv);
    let mut bv = f32s(&graph.tensors[b]);
    bv[0] /= alpha;
    set(&mut graph.tensors[b], &bv);
    let channels = graph.tensors[w].shape[0];
    let fw = graph.ops[fc].inputs[1].expect("weights");
    let features = graph.tensors[fw].shape[1];
    let mut fv = f32s(&graph.tensors[fw]);
    for (i, v) in fv.iter_mut().enumerate() {
        if (i % features) % channels == 0 {
            *v *= alpha;
        }
    }
    set(&mut graph.tensors[fw], &fv);

    let quantize_with = |precision: Precision, budget: Option<f64>| {
        quantize(
            Request {
                name: "fragile".into(),
                graph: graph.clone(),
                source: serde_json::json!({ "format": format, "sha256": kiln::convert::sha256_hex(&source) }),
                calib: &case.calib,
                calib_sha256: "calib".into(),
                precision,
                options: QuantizeOptions::default(),
                eval: Some(EvalSet {
                    x: &case.eval,
                    y: &case.labels,
                    metric: case.metric,
                    sha256: "eval".into(),
                }),
                max_accuracy_drop: budget,
                selftest_count: 1,
                extra: serde_json::Value::Null,
            },
            |_, _, _| {},
        )
    };
    let plain = run(&case, Precision::Int8, Estimator::MinMax);
    let int8 = quantize_with(Precision::Int8, None).expect("int8");
    let float = int8.report.float_metric.expect("float metric");
    let all_int8 = int8.report.quantized_metric.expect("int8 metric");
    assert!(
        (float - plain.report.float_metric.expect("float")).abs() < 0.001,
        "the rescaled float model must score as the original: {float}"
    );
    let fp16 = quantize_with(Precision::Fp16, None)
        .expect("fp16")
        .report
        .quantized_metric
        .expect("fp16 metric");
    assert!(fp16 >= float - 0.001, "fp16 carries it: {fp16} vs {float}");
    let auto = quantize_with(Precision::Auto, Some(0.5)).expect("auto within 0.5 pt");
    let mixed = auto.report.quantized_metric.expect("auto metric");
    let fp16_layers: Vec<String> = auto
        .report
        .layers
        .iter()
        .filter(|l| l.precision != "int8")
        .map(|l| format!("{} {}", l.index, l.op))
        .collect();
    eprintln!(
        "fragile MNIST: float {:.2} %, all-int8 {:.2} %, auto {:.2} % with {:.1} % of MACs in int8 (fp16: {fp16_layers:?})",
        float * 100.0,
        all_int8 * 100.0,
        mixed * 100.0,
        auto.report.int8_mac_fraction * 100.0
    );
    assert!(
        all_int8 < float - 0.005,
        "all-int8 should fail the 0.5 pt budget: {all_int8} vs {float}"
    );
    assert!(mixed >= float - 0.005, "auto {mixed} vs float {float}");
    assert!(
        auto.report.int8_mac_fraction > 0.0 && auto.report.int8_mac_fraction < 1.0,
        "a true mix: {}",
        auto.report.int8_mac_fraction
    );
    assert!(
        auto.report.int8_mac_fraction >= 0.9,
        "the fewest layers in fp16: {fp16_layers:?}"
    );
}
