//! ONNX importer end to end: real models import, lower and run on kiln-runtime, and match their
//! reference outputs (the ONNX test data of MNIST) or their TFLite twins; malformed and
//! unsupported models are refused with clear errors; a QDQ model imports as int8.

mod common;

use std::path::Path;

use kiln::import::onnx::{
    decode_tensor, import_onnx, import_onnx_model, permute, OnnxError, OnnxModel, TensorValues,
};
use kiln::import::onnx_proto as pb;
use kiln::ir::{Graph, OpKind};
use kiln::npy::Array;
use kiln::runner::{run_batch, Outputs};
use kiln_runtime::graph::DType;
use prost::Message;

fn onnx_dir(dir: &Path) -> std::path::PathBuf {
    dir.join("models/onnx")
}

/// Lowers a graph and writes a bare artifact.
fn artifact(g: &Graph) -> Vec<u8> {
    let lowered = kiln::lower::lower(g).expect("lowers");
    kiln::convert::assemble_lowered(&lowered, "onnx-test", &serde_json::json!({})).unwrap()
}

/// Runs a batch of float samples (already in the IR input layout) through an artifact.
fn run_f32(art: &[u8], shape: Vec<usize>, data: Vec<f32>) -> Vec<f32> {
    match run_batch(art, &Array::F32 { shape, data }, |_| {})
        .unwrap()
        .outputs
    {
        Outputs::F32(v) => v,
        other => panic!("expected f32 outputs, got {other:?}"),
    }
}

fn floats(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let t = decode_tensor(&std::fs::read(path).unwrap()).unwrap();
    match t.values {
        TensorValues::Float(v) => (t.shape, v),
        TensorValues::Int(_) => panic!("{} is not float", path.display()),
    }
}

fn assert_close(got: &[f32], want: &[f32], rel: f32, abs: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let mut worst = 0f32;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        assert!(
            err <= abs + rel * w.abs(),
            "{what}: element {i}: got {g}, want {w} (|diff| {err})"
        );
        worst = worst.max(err);
    }
    eprintln!("{what}: {} values agree, max |diff| {worst:e}", got.len());
}

fn argmax(row: &[f32]) -> usize {
    (0..row.len())
        .max_by(|&a, &b| row[a].total_cmp(&row[b]))
        .unwrap()
}

fn npz_u8(path: &Path, name: &str) -> (Vec<usize>, Vec<u8>) {
    let mut npz = npyz::npz::NpzArchive::open(path).unwrap();
    let x = npz.by_name(name).unwrap().unwrap();
    let shape = x.shape().iter().map(|&d| d as usize).collect();
    (shape, x.into_vec::<u8>().unwrap())
}

fn npz_labels(path: &Path) -> Vec<i64> {
    let mut npz = npyz::npz::NpzArchive::open(path).unwrap();
    npz.by_name("y")
        .unwrap()
        .unwrap()
        .into_vec::<i16>()
        .unwrap()
        .into_iter()
        .map(i64::from)
        .collect()
}

fn ops_named(g: &Graph) -> Vec<&'static str> {
    g.ops
        .iter()
        .map(|o| kiln::lower::ir_name(&o.kind))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// MNIST (ONNX model zoo, opset 8).
// ---------------------------------------------------------------------------------------------

#[test]
fn mnist_matches_its_onnx_test_data() {
    let Some(dir) = common::testdata() else {
        return;
    };
    let mdir = onnx_dir(&dir).join("mnist-8");
    let m = import_onnx_model(&std::fs::read(mdir.join("model.onnx")).unwrap()).unwrap();
    eprintln!("mnist ops: {:?}", ops_named(&m.graph));
    assert_eq!(m.input_shapes, vec![vec![1, 1, 28, 28]]);
    assert_eq!(m.input_perms, vec![vec![0, 2, 3, 1]], "4-D inputs are NHWC");
    assert_eq!(m.graph.tensors[m.graph.inputs[0]].shape, vec![1, 28, 28, 1]);
    // The flatten before the MatMul permutes the weights, not the activations.
    assert!(
        !m.graph
            .ops
            .iter()
            .any(|o| matches!(o.kind, OpKind::Transpose { .. })),
        "{:?}",
        ops_named(&m.graph)
    );
    // Bias adds are folded into the convolutions and the fully-connected layer, ReLUs fused.
    assert_eq!(
        ops_named(&m.graph),
        [
            "CONV_2D",
            "MAX_POOL_2D",
            "CONV_2D",
            "MAX_POOL_2D",
            "RESHAPE",
            "FULLY_CONNECTED"
        ]
    );
    let art = artifact(&m.graph);
    for set in 0..3 {
        let sdir = mdir.join(format!("test_data_set_{set}"));
        let (shape, x) = floats(&sdir.join("input_0.pb"));
        let nhwc = permute(&x, &shape, &m.input_perms[0]).unwrap();
        let got = run_f32(&art, vec![1, 28, 28, 1], nhwc);
        let (_, want) = floats(&sdir.join("output_0.pb"));
        assert_close(
            &got,
            &want,
            1e-4,
            1e-5,
            &format!("mnist test_data_set_{set}"),
        );
    }
}

#[test]
fn mnist_classifies_the_test_set() {
    let Some(dir) = common::testdata() else {
        return;
    };
    let g =
        import_onnx(&std::fs::read(onnx_dir(&dir).join("mnist-8/model.onnx")).unwrap()).unwrap();
    let art = artifact(&g);
    let data = dir.join("data/mnist_t10k.npz");
    let (shape, x) = npz_u8(&data, "x");
    let y = npz_labels(&data);
    // The model zoo's MNIST takes raw pixel values 0..255 (it normalizes internally).
    let n = shape[0];
    let out = run_f32(
        &art,
        vec![n, 28, 28, 1],
        x.iter().map(|&v| f32::from(v)).collect(),
    );
    let correct = (0..n)
        .filter(|&i| argmax(&out[i * 10..(i + 1) * 10]) as i64 == y[i])
        .count();
    let acc = correct as f64 / n as f64;
    eprintln!("mnist top-1 {correct}/{n} = {:.2} %", acc * 100.0);
    assert!(acc >= 0.988, "top-1 {acc}");
}

// ---------------------------------------------------------------------------------------------
// MLPerf Tiny float models (tflite2onnx conversions) against their TFLite twins.
// ---------------------------------------------------------------------------------------------

/// Imports `onnx`, converts `tflite`, runs both on `x` (NHWC f32 batch) and returns both outputs.
fn onnx_and_tflite(
    dir: &Path,
    onnx: &str,
    tflite: &str,
    x: &Array,
) -> (OnnxModel, Vec<f32>, Vec<f32>) {
    let m = import_onnx_model(&std::fs::read(onnx_dir(dir).join(onnx)).unwrap()).unwrap();
    eprintln!("{onnx} ops: {:?}", ops_named(&m.graph));
    let art = artifact(&m.graph);
    let Outputs::F32(got) = run_batch(&art, x, |_| {}).unwrap().outputs else {
        panic!("f32 outputs")
    };
    let tfl =
        kiln::convert::convert_tflite(&std::fs::read(common::mlperf(dir, tflite)).unwrap(), tflite)
            .unwrap();
    let Outputs::F32(want) = run_batch(&tfl.artifact, x, |_| {}).unwrap().outputs else {
        panic!("f32 outputs")
    };
    (m, got, want)
}

fn images(dir: &Path, file: &str, count: usize, scale: f32) -> (Array, Vec<i64>) {
    let path = dir.join("data").join(file);
    let (shape, x) = npz_u8(&path, "x");
    let per: usize = shape[1..].iter().product();
    let count = count.min(shape[0]);
    let data = x[..count * per]
        .iter()
        .map(|&v| f32::from(v) * scale)
        .collect();
    let mut s = shape.clone();
    s[0] = count;
    let mut y = npz_labels(&path);
    y.truncate(count);
    (Array::F32 { shape: s, data }, y)
}

#[test]
fn resnet8_matches_its_tflite_twin() {
    let Some(dir) = common::testdata() else {
        return;
    };
    let (x, y) = images(&dir, "ic01.npz", 200, 1.0);
    let (m, got, want) =
        onnx_and_tflite(&dir, "pretrainedResnet.onnx", "pretrainedResnet.tflite", &x);
    assert!(
        !m.graph
            .ops
            .iter()
            .any(|o| matches!(o.kind, OpKind::Transpose { .. })),
        "the NCHW→NHWC Transpose before the flatten vanishes"
    );
    assert_close(&got, &want, 1e-4, 1e-5, "resnet8 onnx vs tflite");
    let n = y.len();
    let top1 = |p: &[f32]| {
        (0..n)
            .filter(|&i| argmax(&p[i * 10..(i + 1) * 10]) as i64 == y[i])
            .count()
    };
    let (a, b) = (top1(&got), top1(&want));
    eprintln!("resnet8 top-1: onnx {a}/{n}, tflite {b}/{n}");
    assert!(a.abs_diff(b) * 100 <= n, "top-1 {a} vs {b}");
}

#[test]
fn vww_matches_its_tflite_twin() {
    let Some(dir) = common::testdata() else {
        return;
    };
    let (x, y) = images(&dir, "vww01.npz", 100, 1.0 / 255.0);
    let (_, got, want) = onnx_and_tflite(&dir, "vww_96_float.onnx", "vww_96_float.tflite", &x);
    assert_close(&got, &want, 1e-4, 1e-5, "vww onnx vs tflite");
    let n = y.len();
    let top1 = |p: &[f32]| {
        (0..n)
            .filter(|&i| argmax(&p[i * 2..(i + 1) * 2]) as i64 == y[i])
            .count()
    };
    eprintln!(
        "vww top-1 on {n}: onnx {}, tflite {}",
        top1(&got),
        top1(&want)
    );
    assert_eq!(top1(&got), top1(&want));
}

#[test]
fn anomaly_detector_matches_its_tflite_twin() {
    let Some(dir) = common::testdata() else {
        return;
    };
    let mut npz = npyz::npz::NpzArchive::open(dir.join("data/ad01.npz")).unwrap();
    let s = npz.by_name("spectrograms").unwrap().unwrap();
    let shape: Vec<usize> = s.shape().iter().map(|&d| d as usize).collect();
    let spec = s.into_vec::<f32>().unwrap();
    let (frames, bins) = (shape[1], shape[2]);
    // Windows of 5 frames from a normal and an anomalous clip, at a few offsets.
    let mut data = Vec::new();
    let mut count = 0;
    for clip in [0, 8] {
        for start in [0, 50, 120, frames - 5] {
            let base = (clip * frames + start) * bins;
            data.extend_from_slice(&spec[base..base + 5 * bins]);
            count += 1;
        }
    }
    let x = Array::F32 {
        shape: vec![count, 640],
        data,
    };
    let (m, got, want) = onnx_and_tflite(&dir, "ad01_fp32.onnx", "ad01_fp32.tflite", &x);
    assert_eq!(
        ops_named(&m.graph)
            .iter()
            .filter(|&&o| o == "FULLY_CONNECTED")
            .count(),
        10
    );
    assert_close(&got, &want, 1e-4, 1e-5, "ad01 onnx vs tflite");
}

// ---------------------------------------------------------------------------------------------
// Models built here.
// ---------------------------------------------------------------------------------------------

fn tensor_type(elem: i32, dims: &[i64]) -> Option<pb::TypeProto> {
    Some(pb::TypeProto {
        value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
            elem_type: elem,
            shape: Some(pb::TensorShapeProto {
                dim: dims
                    .iter()
                    .map(|&d| pb::tensor_shape_proto::Dimension {
                        value: Some(pb::tensor_shape_proto::dimension::Value::DimValue(d)),
                        denotation: String::new(),
                    })
                    .collect(),
            }),
        })),
        denotation: String::new(),
    })
}

fn value_info(name: &str, elem: i32, dims: &[i64]) -> pb::ValueInfoProto {
    pb::ValueInfoProto {
        name: name.into(),
        r#type: tensor_type(elem, dims),
        doc_string: String::new(),
    }
}

fn node(
    op: &str,
    inputs: &[&str],
    outputs: &[&str],
    attrs: Vec<pb::AttributeProto>,
) -> pb::NodeProto {
    pb::NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        name: format!("{op}_{}", outputs.first().unwrap_or(&"")),
        op_type: op.into(),
        ..Default::default()
    }
    .with_attrs(attrs)
}

trait WithAttrs {
    fn with_attrs(self, a: Vec<pb::AttributeProto>) -> Self;
}

impl WithAttrs for pb::NodeProto {
    fn with_attrs(mut self, a: Vec<pb::AttributeProto>) -> Self {
        self.attribute = a;
        self
    }
}

fn ints_attr(name: &str, v: &[i64]) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_type::INTS,
        ints: v.to_vec(),
        ..Default::default()
    }
}

fn f32_init(name: &str, dims: &[i64], v: &[f32]) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: pb::data_type::FLOAT,
        float_data: v.to_vec(),
        ..Default::default()
    }
}

fn int_init(name: &str, ty: i32, dims: &[i64], v: &[i64]) -> pb::TensorProto {
    let raw: Vec<u8> = match ty {
        pb::data_type::INT8 => v.iter().map(|&x| x as i8 as u8).collect(),
        pb::data_type::UINT8 => v.iter().map(|&x| x as u8).collect(),
        pb::data_type::INT32 => v.iter().flat_map(|&x| (x as i32).to_le_bytes()).collect(),
        _ => v.iter().flat_map(|&x| x.to_le_bytes()).collect(),
    };
    pb::TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: ty,
        raw_data: raw,
        ..Default::default()
    }
}

fn model(opset: i64, graph: pb::GraphProto) -> Vec<u8> {
    pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: opset,
        }],
        producer_name: "kiln-test".into(),
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec()
}

fn relu_graph(op: &str) -> pb::GraphProto {
    pb::GraphProto {
        node: vec![
            node("Relu", &["x"], &["r"], vec![]),
            node("Relu", &["r"], &["s"], vec![]),
            node("Relu", &["s"], &["t"], vec![]),
            node("Relu", &["t"], &["u"], vec![]),
            node(op, &["u"], &["y"], vec![]),
        ],
        name: "g".into(),
        input: vec![value_info("x", pb::data_type::FLOAT, &[1, 4])],
        output: vec![value_info("y", pb::data_type::FLOAT, &[1, 4])],
        ..Default::default()
    }
}

#[test]
fn refuses_garbage_truncated_and_unsupported_models() {
    // Garbage and truncation.
    assert!(matches!(import_onnx(b""), Err(OnnxError::Malformed(_))));
    assert!(matches!(
        import_onnx(b"\x08\x07\x12\xff\xff\xff\xff\x0f"),
        Err(OnnxError::Malformed(_))
    ));
    let good = model(13, relu_graph("Relu"));
    assert!(import_onnx(&good).is_ok());
    for cut in [1, good.len() / 3, good.len() / 2, good.len() - 1] {
        let e = import_onnx(&good[..cut]).unwrap_err();
        assert!(matches!(e, OnnxError::Malformed(_)), "cut at {cut}: {e}");
    }
    let junk: Vec<u8> = (0..4000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    assert!(import_onnx(&junk).is_err());

    // An unsupported op, named with its opset and node index.
    let e = import_onnx(&model(13, relu_graph("Foo"))).unwrap_err();
    assert_eq!(
        e.to_string(),
        "unsupported ONNX op Foo (opset 13) at node index 4"
    );
    assert!(matches!(
        e,
        OnnxError::UnsupportedOp {
            index: 4,
            opset: 13,
            ..
        }
    ));

    // Opsets outside the range.
    let e = import_onnx(&model(6, relu_graph("Relu"))).unwrap_err();
    assert!(matches!(e, OnnxError::UnsupportedOpset(6)), "{e}");
    assert!(
        e.to_string()
            .starts_with("unsupported ONNX opset 6; Kiln reads opsets 7 to"),
        "{e}"
    );

    // Ops of other domains.
    let mut g = relu_graph("Relu");
    g.node[2].domain = "com.microsoft".into();
    let e = import_onnx(&model(13, g)).unwrap_err();
    assert!(e.to_string().contains("com.microsoft.Relu"), "{e}");

    // Dynamic non-batch dimensions.
    let mut g = relu_graph("Relu");
    if let Some(pb::type_proto::Value::TensorType(t)) =
        g.input[0].r#type.as_mut().and_then(|t| t.value.as_mut())
    {
        t.shape.as_mut().unwrap().dim[1].value = Some(
            pb::tensor_shape_proto::dimension::Value::DimParam("width".into()),
        );
    }
    let e = import_onnx(&model(13, g)).unwrap_err();
    assert!(matches!(e, OnnxError::Unsupported(_)), "{e}");
    assert!(e.to_string().contains("dynamic dimension 1"), "{e}");

    // A dynamic batch dimension becomes 1.
    let mut g = relu_graph("Relu");
    if let Some(pb::type_proto::Value::TensorType(t)) =
        g.input[0].r#type.as_mut().and_then(|t| t.value.as_mut())
    {
        t.shape.as_mut().unwrap().dim[0].value = Some(
            pb::tensor_shape_proto::dimension::Value::DimParam("N".into()),
        );
    }
    let m = import_onnx_model(&model(13, g)).unwrap();
    assert_eq!(m.input_shapes, vec![vec![1, 4]]);

    // A node reading a value nobody produces.
    let mut g = relu_graph("Relu");
    g.node[1].input[0] = "nowhere".into();
    let e = import_onnx(&model(13, g)).unwrap_err();
    assert!(matches!(e, OnnxError::Malformed(_)), "{e}");

    // float64 weights.
    let mut g = relu_graph("Relu");
    g.initializer.push(pb::TensorProto {
        name: "w".into(),
        dims: vec![1],
        data_type: pb::data_type::DOUBLE,
        double_data: vec![1.0],
        ..Default::default()
    });
    let e = import_onnx(&model(13, g)).unwrap_err();
    assert!(e.to_string().contains("float64"), "{e}");
}

/// A small QDQ network: int8 conv (per-channel weights, int32 bias) + fused ReLU, int8 global
/// average pool, float output.
fn qdq_model() -> (Vec<u8>, Vec<f32>, Vec<f32>) {
    let (c_in, c_out) = (3usize, 4usize);
    let w: Vec<i64> = (0..c_out * c_in * 9)
        .map(|i| ((i * 37 % 255) as i64) - 127)
        .collect();
    let w_scales: Vec<f32> = (0..c_out).map(|o| 0.002 + 0.001 * o as f32).collect();
    let bias: Vec<i64> = (0..c_out as i64).map(|o| 50 * o - 60).collect();
    let (s_x, s_y, s_p) = (0.02f32, 0.05f32, 0.04f32);
    let bias_scales: Vec<f32> = w_scales.iter().map(|s| s * s_x).collect();
    let g = pb::GraphProto {
        node: vec![
            node("QuantizeLinear", &["x", "sx", "zx"], &["xq"], vec![]),
            node("DequantizeLinear", &["xq", "sx", "zx"], &["xd"], vec![]),
            node(
                "DequantizeLinear",
                &["w", "sw", "zw"],
                &["wd"],
                vec![pb::AttributeProto {
                    name: "axis".into(),
                    r#type: pb::attribute_type::INT,
                    i: Some(0),
                    ..Default::default()
                }],
            ),
            node(
                "DequantizeLinear",
                &["b", "sb", "zb"],
                &["bd"],
                vec![pb::AttributeProto {
                    name: "axis".into(),
                    r#type: pb::attribute_type::INT,
                    i: Some(0),
                    ..Default::default()
                }],
            ),
            node(
                "Conv",
                &["xd", "wd", "bd"],
                &["c"],
                vec![
                    ints_attr("pads", &[1, 1, 1, 1]),
                    ints_attr("kernel_shape", &[3, 3]),
                ],
            ),
            node("Relu", &["c"], &["r"], vec![]),
            node("QuantizeLinear", &["r", "sy", "zy"], &["rq"], vec![]),
            node("DequantizeLinear", &["rq", "sy", "zy"], &["rd"], vec![]),
            node("GlobalAveragePool", &["rd"], &["p"], vec![]),
            node("QuantizeLinear", &["p", "sp", "zp"], &["pq"], vec![]),
            node("DequantizeLinear", &["pq", "sp", "zp"], &["y"], vec![]),
        ],
        name: "qdq".into(),
        initializer: vec![
            f32_init("sx", &[], &[s_x]),
            int_init("zx", pb::data_type::UINT8, &[], &[128]),
            int_init(
                "w",
                pb::data_type::INT8,
                &[c_out as i64, c_in as i64, 3, 3],
                &w,
            ),
            f32_init("sw", &[c_out as i64], &w_scales),
            int_init("zw", pb::data_type::INT8, &[c_out as i64], &vec![0; c_out]),
            int_init("b", pb::data_type::INT32, &[c_out as i64], &bias),
            f32_init("sb", &[c_out as i64], &bias_scales),
            int_init("zb", pb::data_type::INT32, &[c_out as i64], &vec![0; c_out]),
            f32_init("sy", &[], &[s_y]),
            int_init("zy", pb::data_type::INT8, &[], &[-100]),
            f32_init("sp", &[], &[s_p]),
            int_init("zp", pb::data_type::INT8, &[], &[-90]),
        ],
        input: vec![value_info(
            "x",
            pb::data_type::FLOAT,
            &[1, c_in as i64, 6, 6],
        )],
        output: vec![value_info(
            "y",
            pb::data_type::FLOAT,
            &[1, c_out as i64, 1, 1],
        )],
        ..Default::default()
    };
    let wf: Vec<f32> = w
        .iter()
        .enumerate()
        .map(|(i, &q)| q as f32 * w_scales[i / (c_in * 9)])
        .collect();
    let bf: Vec<f32> = bias
        .iter()
        .zip(&bias_scales)
        .map(|(&q, s)| q as f32 * s)
        .collect();
    (model(13, g), wf, bf)
}

#[test]
fn qdq_model_imports_as_int8() {
    let (bytes, wf, bf) = qdq_model();
    let m = import_onnx_model(&bytes).unwrap();
    let g = &m.graph;
    eprintln!("qdq ops: {:?}; notes {:?}", ops_named(g), m.notes);
    assert_eq!(ops_named(g), ["QUANTIZE", "CONV_2D", "MEAN", "DEQUANTIZE"]);
    assert!(m.notes.is_empty(), "{:?}", m.notes);
    let conv = &g.ops[1];
    assert!(matches!(
        conv.kind,
        OpKind::Conv2d {
            activation: kiln_runtime::graph::Activation::Relu,
            ..
        }
    ));
    let t = |i: usize| &g.tensors[conv.inputs[i].unwrap()];
    assert_eq!(t(0).dtype, DType::I8);
    assert_eq!(
        t(0).quant.as_ref().unwrap().zero_points,
        vec![0],
        "uint8 zero point 128 → int8 0"
    );
    assert_eq!(t(1).dtype, DType::I8);
    assert_eq!(t(1).shape, vec![4, 3, 3, 3], "OHWI");
    assert_eq!(t(1).quant.as_ref().unwrap().scales.len(), 4);
    assert_eq!(t(1).quant.as_ref().unwrap().axis, 0);
    assert_eq!(t(2).dtype, DType::I32);
    assert_eq!(g.tensors[conv.outputs[0]].dtype, DType::I8);

    // Numbers: against a float reference of the same (dequantized) network.
    let art = artifact(g);
    let x: Vec<f32> = (0..3 * 36)
        .map(|i| ((i * 29 % 97) as f32 / 97.0 - 0.4) * 2.0)
        .collect();
    let nhwc = permute(&x, &[1, 3, 6, 6], &[0, 2, 3, 1]).unwrap();
    let got = run_f32(&art, vec![1, 6, 6, 3], nhwc);
    let xq: Vec<f32> = x
        .iter()
        .map(|&v| ((v / 0.02).round_ties_even().clamp(-128.0, 127.0)) * 0.02)
        .collect();
    let mut want = vec![0f32; 4];
    for (o, w_o) in want.iter_mut().enumerate() {
        let mut sum = 0f32;
        for yy in 0..6i64 {
            for xx in 0..6i64 {
                let mut acc = bf[o];
                for c in 0..3 {
                    for ky in 0..3i64 {
                        for kx in 0..3i64 {
                            let (iy, ix) = (yy + ky - 1, xx + kx - 1);
                            if (0..6).contains(&iy) && (0..6).contains(&ix) {
                                acc += xq[(c * 36) + (iy * 6 + ix) as usize]
                                    * wf[((o * 3 + c) * 3 + ky as usize) * 3 + kx as usize];
                            }
                        }
                    }
                }
                let r = acc.max(0.0);
                sum += ((r / 0.05).round() + -100.0).clamp(-128.0, 127.0) * 0.05 - -100.0 * 0.05;
            }
        }
        *w_o = sum / 36.0;
    }
    eprintln!("qdq got {got:?} want {want:?}");
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() <= 0.04 + 1e-6, "{got:?} vs {want:?}");
    }
}

#[test]
fn transposes_vanish_and_layouts_follow() {
    // NCHW input → Transpose to NHWC → Relu → Transpose back → Softmax over channels.
    let g = pb::GraphProto {
        node: vec![
            node(
                "Transpose",
                &["x"],
                &["t"],
                vec![ints_attr("perm", &[0, 2, 3, 1])],
            ),
            node("Relu", &["t"], &["r"], vec![]),
            node(
                "Transpose",
                &["r"],
                &["u"],
                vec![ints_attr("perm", &[0, 3, 1, 2])],
            ),
            node(
                "ReduceMean",
                &["u"],
                &["y"],
                vec![ints_attr("axes", &[2, 3])],
            ),
        ],
        name: "t".into(),
        input: vec![value_info("x", pb::data_type::FLOAT, &[1, 3, 4, 5])],
        output: vec![value_info("y", pb::data_type::FLOAT, &[1, 3, 1, 1])],
        ..Default::default()
    };
    let m = import_onnx_model(&model(13, g)).unwrap();
    assert_eq!(ops_named(&m.graph), ["RELU", "MEAN"]);
    let mean = &m.graph.ops[1];
    assert_eq!(
        mean.kind,
        OpKind::Mean {
            axes: vec![1, 2],
            keep_dims: true
        }
    );
    assert_eq!(m.output_perms, vec![vec![0, 2, 3, 1]]);
}

/// Byte flips, truncations and splices of valid models: every result is an import error or a
/// graph, never a panic.
#[test]
fn mutated_models_never_panic() {
    let mut models = vec![model(13, relu_graph("Relu")), qdq_model().0];
    if let Some(dir) = common::testdata() {
        models.push(std::fs::read(onnx_dir(&dir).join("mnist-8/model.onnx")).unwrap());
    }
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut imported = 0;
    for m in &models {
        for _ in 0..300 {
            let mut b = m.clone();
            match next() % 3 {
                0 => {
                    for _ in 0..1 + next() % 4 {
                        let i = (next() % b.len() as u64) as usize;
                        b[i] ^= 1 << (next() % 8);
                    }
                }
                1 => {
                    let i = (next() % b.len() as u64) as usize;
                    b[i] = (next() % 256) as u8;
                }
                _ => b.truncate((next() % b.len() as u64) as usize),
            }
            if let Ok(g) = import_onnx(&b) {
                imported += 1;
                // Whatever imports must also lower or be refused cleanly.
                let _ = kiln::lower::lower(&g);
            }
        }
    }
    eprintln!(
        "{imported} of {} mutated models still imported",
        models.len() * 300
    );
}

#[test]
fn float16_weights_stay_float16() {
    let w: Vec<f32> = vec![0.5, -1.25, 2.0, 0.125, -0.75, 3.5, 1.0, -2.0];
    let bits: Vec<u8> = w
        .iter()
        .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
        .collect();
    let g = pb::GraphProto {
        node: vec![
            node(
                "Cast",
                &["w16"],
                &["w"],
                vec![pb::AttributeProto {
                    name: "to".into(),
                    r#type: pb::attribute_type::INT,
                    i: Some(i64::from(pb::data_type::FLOAT)),
                    ..Default::default()
                }],
            ),
            node("MatMul", &["x", "w"], &["y"], vec![]),
        ],
        name: "f16".into(),
        initializer: vec![pb::TensorProto {
            name: "w16".into(),
            dims: vec![4, 2],
            data_type: pb::data_type::FLOAT16,
            raw_data: bits,
            ..Default::default()
        }],
        input: vec![value_info("x", pb::data_type::FLOAT, &[1, 4])],
        output: vec![value_info("y", pb::data_type::FLOAT, &[1, 2])],
        ..Default::default()
    };
    let g = import_onnx(&model(13, g)).unwrap();
    assert!(g
        .tensors
        .iter()
        .any(|t| t.dtype == DType::F16 && t.data.is_some()));
    assert_eq!(ops_named(&g), ["DEQUANTIZE", "FULLY_CONNECTED"]);
    let x = vec![1.0f32, 2.0, -1.0, 0.5];
    let got = run_f32(&artifact(&g), vec![1, 4], x.clone());
    let want: Vec<f32> = (0..2)
        .map(|j| (0..4).map(|k| x[k] * w[k * 2 + j]).sum())
        .collect();
    assert_close(&got, &want, 1e-6, 1e-6, "f16 weights");
}
