//! Tests for the TFLite importer: the MLPerf Tiny reference models (when the shared test data is
//! present), small models built here with `FlatBufferBuilder`, and robustness against truncated
//! and corrupted files.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use flatbuffers::{FlatBufferBuilder, WIPOffset};
use kiln::import::tflite::{import_tflite, TfliteError};
use kiln::ir::{Graph, OpKind, Padding};
use kiln_runtime::graph::{Activation, DType};

// ---------------------------------------------------------------------------------------------
// Test data.
// ---------------------------------------------------------------------------------------------

fn testdata_dir() -> PathBuf {
    match std::env::var_os("KILN_TESTDATA") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata"),
    }
}

/// The bytes of an MLPerf Tiny model, or `None` (with a note) when the test data is absent.
fn model(name: &str) -> Option<Vec<u8>> {
    let path = testdata_dir().join("models/mlperf-tiny").join(name);
    match std::fs::read(&path) {
        Ok(bytes) => Some(bytes),
        Err(_) => {
            println!("skipped: testdata not found at {}", path.display());
            None
        }
    }
}

fn import_model(name: &str) -> Option<Graph> {
    let bytes = model(name)?;
    match import_tflite(&bytes) {
        Ok(g) => Some(g),
        Err(e) => panic!("{name}: {e}"),
    }
}

fn kind_name(kind: &OpKind) -> &'static str {
    kiln::lower::ir_name(kind)
}

fn op_counts(g: &Graph) -> BTreeMap<&'static str, usize> {
    let mut counts = BTreeMap::new();
    for op in &g.ops {
        *counts.entry(kind_name(&op.kind)).or_insert(0) += 1;
    }
    counts
}

/// Structural invariants every imported graph must satisfy.
fn check_invariants(g: &Graph) {
    let n = g.tensors.len();
    for (i, op) in g.ops.iter().enumerate() {
        assert!(!op.outputs.is_empty(), "op {i} has no outputs");
        for id in op.inputs.iter().flatten().chain(&op.outputs) {
            assert!(*id < n, "op {i} references tensor {id} of {n}");
        }
    }
    for id in g.inputs.iter().chain(&g.outputs) {
        assert!(*id < n, "graph I/O references tensor {id} of {n}");
    }
    for t in &g.tensors {
        if let Some(data) = &t.data {
            assert_eq!(
                data.len(),
                t.elements() * t.dtype.size(),
                "tensor {}",
                t.name
            );
        }
        if let Some(q) = &t.quant {
            assert_eq!(q.scales.len(), q.zero_points.len(), "tensor {}", t.name);
            if q.scales.len() > 1 {
                assert_eq!(t.shape[q.axis], q.scales.len(), "tensor {}", t.name);
            }
        }
    }
}

fn io(g: &Graph) -> ((DType, Vec<usize>), (DType, Vec<usize>)) {
    assert_eq!(g.inputs.len(), 1);
    assert_eq!(g.outputs.len(), 1);
    let i = &g.tensors[g.inputs[0]];
    let o = &g.tensors[g.outputs[0]];
    ((i.dtype, i.shape.clone()), (o.dtype, o.shape.clone()))
}

/// Per-channel checks for the int8 models' conv, depthwise and fully-connected weights.
fn check_int8_weights(g: &Graph) {
    for (i, op) in g.ops.iter().enumerate() {
        let weights = match op.kind {
            OpKind::Conv2d { .. }
            | OpKind::DepthwiseConv2d { .. }
            | OpKind::FullyConnected { .. } => &g.tensors[op.inputs[1].expect("weights")],
            _ => continue,
        };
        assert_eq!(weights.dtype, DType::I8, "op {i}");
        assert!(weights.data.is_some(), "op {i} weights are constant");
        let q = weights.quant.as_ref().expect("quantized weights");
        assert!(
            q.zero_points.iter().all(|&z| z == 0),
            "op {i}: symmetric weights"
        );
        match op.kind {
            OpKind::Conv2d { .. } => {
                assert_eq!(q.axis, 0, "op {i}");
                assert_eq!(
                    q.scales.len(),
                    weights.shape[0],
                    "op {i}: one scale per output channel"
                );
            }
            OpKind::DepthwiseConv2d { .. } => {
                assert_eq!(q.axis, 3, "op {i}");
                assert_eq!(
                    q.scales.len(),
                    weights.shape[3],
                    "op {i}: one scale per channel"
                );
            }
            _ => assert_eq!(q.scales.len(), 1, "op {i}: per-tensor FC weights"),
        }
        if let Some(bias) = op.inputs.get(2).copied().flatten() {
            let bias = &g.tensors[bias];
            assert_eq!(bias.dtype, DType::I32, "op {i}");
            assert_eq!(
                bias.elements(),
                weights.shape[if q.axis == 3 { 3 } else { 0 }]
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reference models.
// ---------------------------------------------------------------------------------------------

#[test]
fn kws_int8() {
    let Some(g) = import_model("kws_ref_model.tflite") else {
        return;
    };
    check_invariants(&g);
    let expected: BTreeMap<_, _> = [
        ("CONV_2D", 5),
        ("DEPTHWISE_CONV_2D", 4),
        ("AVERAGE_POOL_2D", 1),
        ("RESHAPE", 1),
        ("FULLY_CONNECTED", 1),
        ("SOFTMAX", 1),
    ]
    .into_iter()
    .collect();
    assert_eq!(op_counts(&g), expected);
    assert_eq!(
        io(&g),
        ((DType::I8, vec![1, 49, 10, 1]), (DType::I8, vec![1, 12]))
    );

    assert_eq!(
        g.ops[0].kind,
        OpKind::Conv2d {
            stride: [2, 2],
            dilation: [1, 1],
            padding: Padding::Same,
            activation: Activation::Relu,
        }
    );
    assert_eq!(g.tensors[g.ops[0].inputs[1].unwrap()].shape, [64, 10, 4, 1]);
    match &g.ops[1].kind {
        OpKind::DepthwiseConv2d {
            stride,
            padding,
            depth_multiplier,
            ..
        } => {
            assert_eq!(*stride, [1, 1]);
            assert_eq!(*padding, Padding::Same);
            assert_eq!(*depth_multiplier, 1);
        }
        other => panic!("op 1 is {other:?}"),
    }
    let pool = g
        .ops
        .iter()
        .find(|op| kind_name(&op.kind) == "AVERAGE_POOL_2D")
        .unwrap();
    assert_eq!(
        pool.kind,
        OpKind::AveragePool2d {
            filter: [25, 5],
            stride: [25, 5],
            padding: Padding::Valid,
            activation: Activation::None,
        }
    );
    // RESHAPE keeps only its data input: the shape operand is folded away and not emitted.
    let reshape = g.ops.iter().find(|op| op.kind == OpKind::Reshape).unwrap();
    assert_eq!(reshape.inputs.len(), 1);
    assert_eq!(g.tensors[reshape.outputs[0]].shape, [1, 64]);
    assert!(g
        .tensors
        .iter()
        .all(|t| t.dtype != DType::I32 || t.shape.len() == 1 && t.data.is_some()));
    assert_eq!(g.ops.last().unwrap().kind, OpKind::Softmax { beta: 1.0 });
    check_int8_weights(&g);

    let input_q = g.tensors[g.inputs[0]].quant.as_ref().unwrap();
    assert_eq!(input_q.scales.len(), 1);
    let output_q = g.tensors[g.outputs[0]].quant.as_ref().unwrap();
    assert_eq!(output_q.zero_points, [-128]);
    assert_eq!(output_q.scales, [1.0 / 256.0]);
}

#[test]
fn kws_hybrid_float32() {
    let Some(g) = import_model("kws_ref_model_float32.tflite") else {
        return;
    };
    check_invariants(&g);
    assert_eq!(
        io(&g),
        ((DType::F32, vec![1, 49, 10, 1]), (DType::F32, vec![1, 12]))
    );
    assert_eq!(g.ops.len(), 13);
    let conv = &g.ops[0];
    assert!(matches!(
        conv.kind,
        OpKind::Conv2d {
            stride: [2, 2],
            padding: Padding::Same,
            ..
        }
    ));
    let weights = &g.tensors[conv.inputs[1].unwrap()];
    assert_eq!(weights.dtype, DType::I8);
    let q = weights
        .quant
        .as_ref()
        .expect("hybrid weights carry a scale");
    assert_eq!(q.scales.len(), 1);
    let bias = &g.tensors[conv.inputs[2].unwrap()];
    assert_eq!(bias.dtype, DType::F32);
    assert!(bias.quant.is_none());
    // Activations stay float and unquantized.
    assert!(g.ops.iter().all(|op| op
        .outputs
        .iter()
        .all(|&o| g.tensors[o].dtype == DType::F32 && g.tensors[o].quant.is_none())));
}

fn check_resnet(g: &Graph, dtype: DType) {
    check_invariants(g);
    let expected: BTreeMap<_, _> = [
        ("CONV_2D", 9),
        ("ADD", 3),
        ("AVERAGE_POOL_2D", 1),
        ("RESHAPE", 1),
        ("FULLY_CONNECTED", 1),
        ("SOFTMAX", 1),
    ]
    .into_iter()
    .collect();
    assert_eq!(op_counts(g), expected);
    assert_eq!(io(g), ((dtype, vec![1, 32, 32, 3]), (dtype, vec![1, 10])));
    let strides: Vec<[usize; 2]> = g
        .ops
        .iter()
        .filter_map(|op| match op.kind {
            OpKind::Conv2d { stride, .. } => Some(stride),
            _ => None,
        })
        .collect();
    assert_eq!(strides.iter().filter(|s| **s == [2, 2]).count(), 4);
    for op in g
        .ops
        .iter()
        .filter(|op| matches!(op.kind, OpKind::Add { .. }))
    {
        assert_eq!(
            op.kind,
            OpKind::Add {
                activation: Activation::Relu
            }
        );
        assert_eq!(op.inputs.len(), 2);
        assert!(op
            .inputs
            .iter()
            .all(|i| g.tensors[i.unwrap()].data.is_none()));
    }
}

#[test]
fn resnet_int8_and_float() {
    if let Some(g) = import_model("pretrainedResnet_quant.tflite") {
        check_resnet(&g, DType::I8);
        check_int8_weights(&g);
    }
    if let Some(g) = import_model("pretrainedResnet.tflite") {
        check_resnet(&g, DType::F32);
        assert!(g
            .tensors
            .iter()
            .all(|t| t.dtype == DType::F32 && t.quant.is_none()));
    }
}

#[test]
fn vww_int8_and_float() {
    for (name, dtype) in [
        ("vww_96_int8.tflite", DType::I8),
        ("vww_96_float.tflite", DType::F32),
    ] {
        let Some(g) = import_model(name) else {
            continue;
        };
        check_invariants(&g);
        let expected: BTreeMap<_, _> = [
            ("CONV_2D", 14),
            ("DEPTHWISE_CONV_2D", 13),
            ("AVERAGE_POOL_2D", 1),
            ("RESHAPE", 1),
            ("FULLY_CONNECTED", 1),
            ("SOFTMAX", 1),
        ]
        .into_iter()
        .collect();
        assert_eq!(op_counts(&g), expected, "{name}");
        assert_eq!(
            io(&g),
            ((dtype, vec![1, 96, 96, 3]), (dtype, vec![1, 2])),
            "{name}"
        );
        if dtype == DType::I8 {
            check_int8_weights(&g);
        }
    }
}

#[test]
fn anomaly_detection_int8_and_float() {
    for (name, dtype) in [
        ("ad01_int8.tflite", DType::I8),
        ("ad01_fp32.tflite", DType::F32),
    ] {
        let Some(g) = import_model(name) else {
            continue;
        };
        check_invariants(&g);
        assert_eq!(
            op_counts(&g),
            [("FULLY_CONNECTED", 10)].into_iter().collect(),
            "{name}"
        );
        assert_eq!(
            io(&g),
            ((dtype, vec![1, 640]), (dtype, vec![1, 640])),
            "{name}"
        );
        let relus = g
            .ops
            .iter()
            .filter(|op| {
                op.kind
                    == OpKind::FullyConnected {
                        activation: Activation::Relu,
                    }
            })
            .count();
        assert_eq!(relus, 9, "{name}");
        if dtype == DType::I8 {
            check_int8_weights(&g);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Small models built in code.
// ---------------------------------------------------------------------------------------------

const FLOAT32: i8 = 0;
const UINT8: i8 = 3;
const INT32: i8 = 2;
const INT64: i8 = 4;
const INT8: i8 = 9;

const ADD: i32 = 0;
const CONV_2D: i32 = 3;
const DEPTHWISE_CONV_2D: i32 = 4;
const FULLY_CONNECTED: i32 = 9;
const LSTM: i32 = 16;
const RELU: i32 = 19;
const RESHAPE: i32 = 22;
const CUSTOM: i32 = 32;
const PAD: i32 = 34;
const MEAN: i32 = 40;
const SQUEEZE: i32 = 43;
const PADV2: i32 = 60;
const EXPAND_DIMS: i32 = 70;

/// A scalar field value in an options table.
#[derive(Clone, Copy)]
enum Field {
    I8(i8),
    I32(i32),
    Bool(bool),
}

#[derive(Clone)]
struct TensorSpec {
    name: &'static str,
    ty: i8,
    shape: Vec<i32>,
    buffer: u32,
    /// scales, zero points, quantized dimension.
    quant: Option<(Vec<f32>, Vec<i64>, i32)>,
}

fn tensor(name: &'static str, ty: i8, shape: &[i32], buffer: u32) -> TensorSpec {
    TensorSpec {
        name,
        ty,
        shape: shape.to_vec(),
        buffer,
        quant: None,
    }
}

#[derive(Clone)]
struct OpSpec {
    opcode: u32,
    inputs: Vec<i32>,
    outputs: Vec<i32>,
    /// Union type and (vtable offset, value) fields of the options table.
    options: Option<(u8, Vec<(u16, Field)>)>,
}

fn op(opcode: u32, inputs: &[i32], outputs: &[i32]) -> OpSpec {
    OpSpec {
        opcode,
        inputs: inputs.to_vec(),
        outputs: outputs.to_vec(),
        options: None,
    }
}

fn with_options(mut o: OpSpec, ty: u8, fields: &[(u16, Field)]) -> OpSpec {
    o.options = Some((ty, fields.to_vec()));
    o
}

#[derive(Clone)]
enum BufferSpec {
    Inline(Vec<u8>),
    /// Stored after the flatbuffer, referenced by offset and size.
    External(Vec<u8>),
}

#[derive(Clone)]
struct ModelSpec {
    version: u32,
    /// (builtin code, custom code)
    codes: Vec<(i32, Option<&'static str>)>,
    tensors: Vec<TensorSpec>,
    ops: Vec<OpSpec>,
    inputs: Vec<i32>,
    outputs: Vec<i32>,
    buffers: Vec<BufferSpec>,
    subgraphs: usize,
}

impl ModelSpec {
    fn new(codes: &[i32]) -> Self {
        ModelSpec {
            version: 3,
            codes: codes.iter().map(|&c| (c, None)).collect(),
            tensors: vec![],
            ops: vec![],
            inputs: vec![0],
            outputs: vec![],
            buffers: vec![BufferSpec::Inline(vec![])],
            subgraphs: 1,
        }
    }

    /// Adds an inline buffer and returns its index.
    fn buffer(&mut self, data: Vec<u8>) -> u32 {
        self.buffers.push(BufferSpec::Inline(data));
        u32::try_from(self.buffers.len() - 1).unwrap()
    }

    fn build(&self) -> Vec<u8> {
        // External buffers go after the flatbuffer; its length does not depend on the offset
        // values, so build once to measure, then again with the real offsets.
        let probe = self.build_flatbuffer(&[]);
        let mut offsets = Vec::new();
        let mut tail = Vec::new();
        let base = probe.len().next_multiple_of(16);
        for b in &self.buffers {
            if let BufferSpec::External(data) = b {
                offsets.push((base + tail.len()) as u64);
                tail.extend_from_slice(data);
                tail.resize(tail.len().next_multiple_of(16), 0);
            }
        }
        let mut bytes = self.build_flatbuffer(&offsets);
        assert_eq!(bytes.len(), probe.len());
        bytes.resize(base, 0);
        bytes.extend_from_slice(&tail);
        bytes
    }

    fn build_flatbuffer(&self, external_offsets: &[u64]) -> Vec<u8> {
        let mut fbb = FlatBufferBuilder::new();
        let mut next_external = 0;
        let mut buffers = Vec::new();
        for b in &self.buffers {
            let off = match b {
                BufferSpec::Inline(data) => {
                    let v = (!data.is_empty()).then(|| fbb.create_vector(data));
                    let t = fbb.start_table();
                    if let Some(v) = v {
                        fbb.push_slot_always(4, v);
                    }
                    fbb.end_table(t)
                }
                BufferSpec::External(data) => {
                    let offset = external_offsets
                        .get(next_external)
                        .copied()
                        .unwrap_or(1 << 40);
                    next_external += 1;
                    let t = fbb.start_table();
                    fbb.push_slot_always::<u64>(6, offset);
                    fbb.push_slot_always::<u64>(8, data.len() as u64);
                    fbb.end_table(t)
                }
            };
            buffers.push(off);
        }
        let buffers = fbb.create_vector(&buffers);

        let mut codes = Vec::new();
        for (code, custom) in &self.codes {
            let custom = custom.map(|c| fbb.create_string(c));
            let t = fbb.start_table();
            fbb.push_slot_always::<i8>(4, (*code).min(127) as i8);
            if let Some(c) = custom {
                fbb.push_slot_always(6, c);
            }
            fbb.push_slot_always::<i32>(8, 1);
            fbb.push_slot_always::<i32>(10, *code);
            codes.push(fbb.end_table(t));
        }
        let codes = fbb.create_vector(&codes);

        let mut subgraphs = Vec::new();
        for _ in 0..self.subgraphs {
            let sg = self.build_subgraph(&mut fbb);
            subgraphs.push(sg);
        }
        let subgraphs = fbb.create_vector(&subgraphs);
        let description = fbb.create_string("built by tflite_import.rs");

        let t = fbb.start_table();
        fbb.push_slot_always::<u32>(4, self.version);
        fbb.push_slot_always(6, codes);
        fbb.push_slot_always(8, subgraphs);
        fbb.push_slot_always(10, description);
        fbb.push_slot_always(12, buffers);
        let model = fbb.end_table(t);
        fbb.finish(model, Some("TFL3"));
        fbb.finished_data().to_vec()
    }

    fn build_subgraph(
        &self,
        fbb: &mut FlatBufferBuilder<'static>,
    ) -> WIPOffset<flatbuffers::TableFinishedWIPOffset> {
        let mut tensors = Vec::new();
        for ts in &self.tensors {
            let shape = fbb.create_vector(&ts.shape);
            let name = fbb.create_string(ts.name);
            let quant = ts.quant.as_ref().map(|(scales, zps, dim)| {
                let scales = fbb.create_vector(scales);
                let zps = fbb.create_vector(zps);
                let t = fbb.start_table();
                fbb.push_slot_always(8, scales);
                fbb.push_slot_always(10, zps);
                fbb.push_slot_always::<i32>(16, *dim);
                fbb.end_table(t)
            });
            let t = fbb.start_table();
            fbb.push_slot_always(4, shape);
            fbb.push_slot_always::<i8>(6, ts.ty);
            fbb.push_slot_always::<u32>(8, ts.buffer);
            fbb.push_slot_always(10, name);
            if let Some(q) = quant {
                fbb.push_slot_always(12, q);
            }
            tensors.push(fbb.end_table(t));
        }
        let tensors = fbb.create_vector(&tensors);

        let mut ops = Vec::new();
        for o in &self.ops {
            let inputs = fbb.create_vector(&o.inputs);
            let outputs = fbb.create_vector(&o.outputs);
            let options = o.options.as_ref().map(|(ty, fields)| {
                let t = fbb.start_table();
                for (vt, f) in fields {
                    match *f {
                        Field::I8(v) => fbb.push_slot_always::<i8>(*vt, v),
                        Field::I32(v) => fbb.push_slot_always::<i32>(*vt, v),
                        Field::Bool(v) => fbb.push_slot_always::<bool>(*vt, v),
                    }
                }
                (*ty, fbb.end_table(t))
            });
            let t = fbb.start_table();
            fbb.push_slot_always::<u32>(4, o.opcode);
            fbb.push_slot_always(6, inputs);
            fbb.push_slot_always(8, outputs);
            if let Some((ty, options)) = options {
                fbb.push_slot_always::<u8>(10, ty);
                fbb.push_slot_always(12, options);
            }
            ops.push(fbb.end_table(t));
        }
        let ops = fbb.create_vector(&ops);
        let inputs = fbb.create_vector(&self.inputs);
        let outputs = fbb.create_vector(&self.outputs);
        let name = fbb.create_string("main");

        let t = fbb.start_table();
        fbb.push_slot_always(4, tensors);
        fbb.push_slot_always(6, inputs);
        fbb.push_slot_always(8, outputs);
        fbb.push_slot_always(10, ops);
        fbb.push_slot_always(12, name);
        fbb.end_table(t)
    }
}

fn i32_bytes(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn i64_bytes(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// in [1,4] f32 → op → out [1,4] f32, with one operator code.
fn unary_model(code: i32) -> ModelSpec {
    let mut m = ModelSpec::new(&[code]);
    m.tensors = vec![
        tensor("in", FLOAT32, &[1, 4], 0),
        tensor("out", FLOAT32, &[1, 4], 0),
    ];
    m.ops = vec![op(0, &[0], &[1])];
    m.outputs = vec![1];
    m
}

// Conv2DOptions vtable offsets.
const PADDING: u16 = 4;
const STRIDE_W: u16 = 6;
const STRIDE_H: u16 = 8;
const CONV_ACT: u16 = 10;

/// A small int8 model: CONV_2D (per-channel weights) → RELU → RESHAPE → FULLY_CONNECTED.
fn int8_model() -> ModelSpec {
    let mut m = ModelSpec::new(&[CONV_2D, RELU, RESHAPE, FULLY_CONNECTED]);
    let w = m.buffer((0..2 * 3 * 3).map(|i| i as u8).collect());
    let b = m.buffer(i32_bytes(&[5, -5]));
    let shape = m.buffer(i32_bytes(&[1, -1]));
    let fc_w = m.buffer(vec![1; 3 * 8]);
    let act_q = Some((vec![0.5], vec![-3], 0));
    m.tensors = vec![
        TensorSpec {
            quant: act_q.clone(),
            ..tensor("in", INT8, &[1, 4, 4, 1], 0)
        },
        TensorSpec {
            quant: Some((vec![0.1, 0.2], vec![0, 0], 0)),
            ..tensor("conv/w", INT8, &[2, 3, 3, 1], w)
        },
        TensorSpec {
            quant: Some((vec![0.05, 0.1], vec![0, 0], 0)),
            ..tensor("conv/b", INT32, &[2], b)
        },
        TensorSpec {
            quant: act_q.clone(),
            ..tensor("conv/out", INT8, &[1, 2, 2, 2], 0)
        },
        TensorSpec {
            quant: act_q.clone(),
            ..tensor("relu/out", INT8, &[1, 2, 2, 2], 0)
        },
        tensor("reshape/shape", INT32, &[2], shape),
        TensorSpec {
            quant: act_q.clone(),
            ..tensor("reshape/out", INT8, &[1, 8], 0)
        },
        TensorSpec {
            quant: Some((vec![0.01], vec![0], 0)),
            ..tensor("fc/w", INT8, &[3, 8], fc_w)
        },
        TensorSpec {
            quant: act_q,
            ..tensor("out", INT8, &[1, 3], 0)
        },
    ];
    m.ops = vec![
        with_options(
            op(0, &[0, 1, 2], &[3]),
            1,
            &[
                (PADDING, Field::I8(1)),
                (STRIDE_W, Field::I32(1)),
                (STRIDE_H, Field::I32(2)),
            ],
        ),
        op(1, &[3], &[4]),
        op(2, &[4, 5], &[6]),
        op(3, &[6, 7, -1], &[8]),
    ];
    m.outputs = vec![8];
    m
}

fn err(m: &ModelSpec) -> TfliteError {
    match import_tflite(&m.build()) {
        Ok(_) => panic!("expected an error"),
        Err(e) => {
            let text = e.to_string();
            assert!(!text.contains('\n'), "multi-line message: {text}");
            e
        }
    }
}

#[test]
fn builds_and_imports_small_int8_model() {
    let g = import_tflite(&int8_model().build()).unwrap();
    check_invariants(&g);
    assert_eq!(g.name, "main");
    // The RESHAPE shape operand is folded and left out.
    assert_eq!(g.tensors.len(), 8);
    assert!(g.tensors.iter().all(|t| t.name != "reshape/shape"));
    assert_eq!(
        g.ops[0].kind,
        OpKind::Conv2d {
            stride: [2, 1],
            dilation: [1, 1],
            padding: Padding::Valid,
            activation: Activation::None,
        }
    );
    assert_eq!(g.ops[0].inputs, [Some(0), Some(1), Some(2)]);
    let w = &g.tensors[1];
    assert_eq!(w.quant.as_ref().unwrap().scales, [0.1, 0.2]);
    assert_eq!(w.data.as_deref(), Some(&(0..18).collect::<Vec<u8>>()[..]));
    assert_eq!(g.ops[1].kind, OpKind::Relu);
    assert_eq!(g.ops[2].kind, OpKind::Reshape);
    assert_eq!(g.ops[2].inputs, [Some(4)]);
    assert_eq!(
        g.ops[3].kind,
        OpKind::FullyConnected {
            activation: Activation::None
        }
    );
    assert_eq!(g.ops[3].inputs, [Some(5), Some(6), None]);
    assert_eq!(g.tensors[g.outputs[0]].name, "out");
    assert_eq!(g.tensors[0].quant.as_ref().unwrap().zero_points, [-3]);
}

#[test]
fn unsupported_builtin_op_message() {
    let e = err(&unary_model(LSTM));
    assert_eq!(e.to_string(), "unsupported op LSTM at operator index 0");
    assert!(matches!(e, TfliteError::UnsupportedOp { ref name, index: 0 } if name == "LSTM"));

    let e = err(&unary_model(300));
    assert_eq!(
        e.to_string(),
        "unsupported op BUILTIN_300 at operator index 0"
    );
}

#[test]
fn unsupported_custom_op_message() {
    let mut m = ModelSpec::new(&[]);
    m.codes = vec![(RELU, None), (CUSTOM, Some("foo"))];
    m.tensors = vec![
        tensor("in", FLOAT32, &[1, 4], 0),
        tensor("mid", FLOAT32, &[1, 4], 0),
        tensor("out", FLOAT32, &[1, 4], 0),
    ];
    m.ops = vec![op(0, &[0], &[1]), op(1, &[1], &[2])];
    m.outputs = vec![2];
    assert_eq!(
        err(&m).to_string(),
        "unsupported op CUSTOM:foo at operator index 1"
    );
}

#[test]
fn pad_folds_int64_paddings_and_checks_constant_value() {
    let mut m = ModelSpec::new(&[PAD]);
    let pads = m.buffer(i64_bytes(&[0, 0, 1, 2, 3, 0, 0, 0]));
    let q = Some((vec![0.5], vec![-3], 0));
    m.tensors = vec![
        TensorSpec {
            quant: q.clone(),
            ..tensor("in", INT8, &[1, 2, 2, 1], 0)
        },
        tensor("paddings", INT64, &[4, 2], pads),
        TensorSpec {
            quant: q.clone(),
            ..tensor("out", INT8, &[1, 5, 5, 1], 0)
        },
    ];
    m.ops = vec![op(0, &[0, 1], &[2])];
    m.outputs = vec![2];
    let g = import_tflite(&m.build()).unwrap();
    check_invariants(&g);
    assert_eq!(g.tensors.len(), 2, "the paddings tensor is not emitted");
    assert_eq!(
        g.ops[0].kind,
        OpKind::Pad {
            paddings: vec![[0, 0], [1, 2], [3, 0], [0, 0]]
        }
    );
    assert_eq!(g.ops[0].inputs, [Some(0)]);
    assert_eq!(g.ops[0].outputs, [1]);

    // PADV2 with the input's zero point as its value is plain zero padding.
    let mut v2 = m.clone();
    v2.codes = vec![(PADV2, None)];
    let zp = v2.buffer(vec![(-3i8) as u8]);
    v2.tensors.push(TensorSpec {
        quant: q,
        ..tensor("value", INT8, &[], zp)
    });
    v2.ops = vec![op(0, &[0, 1, 3], &[2])];
    let g = import_tflite(&v2.build()).unwrap();
    assert!(matches!(g.ops[0].kind, OpKind::Pad { .. }));
    assert_eq!(g.tensors.len(), 2);

    // Any other value is not supported.
    let mut bad = v2.clone();
    bad.buffers[zp as usize] = BufferSpec::Inline(vec![7]);
    let e = err(&bad);
    assert!(matches!(e, TfliteError::Unsupported(_)), "{e}");
    assert!(e.to_string().contains("pads with constant 7"), "{e}");

    // Paddings must be constant.
    let mut dynamic = m.clone();
    dynamic.tensors[1].buffer = 0;
    dynamic.tensors[1].ty = INT32;
    dynamic.inputs = vec![0, 1];
    let e = err(&dynamic);
    assert!(e.to_string().contains("non-constant paddings"), "{e}");

    // ... non-negative, and [rank, 2].
    let mut negative = m.clone();
    negative.buffers[pads as usize] = BufferSpec::Inline(i64_bytes(&[0, 0, -1, 2, 3, 0, 0, 0]));
    assert!(matches!(err(&negative), TfliteError::Malformed(_)));
    let mut wrong_shape = m.clone();
    wrong_shape.tensors[1].shape = vec![2, 4];
    assert!(err(&wrong_shape).to_string().contains("expected [4, 2]"));
}

#[test]
fn mean_normalizes_axes() {
    let mut m = ModelSpec::new(&[MEAN]);
    let axes = m.buffer(i32_bytes(&[-2, 1, -3]));
    m.tensors = vec![
        tensor("in", FLOAT32, &[1, 5, 5, 8], 0),
        tensor("axes", INT32, &[3], axes),
        tensor("out", FLOAT32, &[1, 1, 1, 8], 0),
    ];
    m.ops = vec![with_options(
        op(0, &[0, 1], &[2]),
        27,
        &[(4, Field::Bool(true))],
    )];
    m.outputs = vec![2];
    let g = import_tflite(&m.build()).unwrap();
    assert_eq!(
        g.ops[0].kind,
        OpKind::Mean {
            axes: vec![1, 2],
            keep_dims: true
        }
    );
    assert_eq!(g.ops[0].inputs, [Some(0)]);
    assert_eq!(g.tensors.len(), 2);

    let mut out_of_range = m.clone();
    out_of_range.buffers[axes as usize] = BufferSpec::Inline(i32_bytes(&[1, 2, -5]));
    assert!(err(&out_of_range).to_string().contains("axis -5"));
}

#[test]
fn squeeze_and_expand_dims_become_reshape() {
    let mut m = ModelSpec::new(&[SQUEEZE, EXPAND_DIMS]);
    let axis = m.buffer(i32_bytes(&[0]));
    m.tensors = vec![
        tensor("in", FLOAT32, &[1, 1, 4], 0),
        tensor("squeezed", FLOAT32, &[1, 4], 0),
        tensor("axis", INT32, &[1], axis),
        tensor("out", FLOAT32, &[1, 1, 4], 0),
    ];
    m.ops = vec![op(0, &[0], &[1]), op(1, &[1, 2], &[3])];
    m.outputs = vec![3];
    let g = import_tflite(&m.build()).unwrap();
    assert_eq!(g.ops.len(), 2);
    assert!(g
        .ops
        .iter()
        .all(|o| o.kind == OpKind::Reshape && o.inputs.len() == 1));
    assert_eq!(g.tensors.len(), 3);

    let mut bad = m.clone();
    bad.tensors[3].shape = vec![1, 2, 4];
    assert!(err(&bad)
        .to_string()
        .contains("different number of elements"));
}

#[test]
fn depthwise_multiplier_is_derived_when_unset() {
    let mut m = ModelSpec::new(&[DEPTHWISE_CONV_2D]);
    let w = m.buffer(f32_bytes(&[0.5; 3 * 3 * 4]));
    m.tensors = vec![
        tensor("in", FLOAT32, &[1, 4, 4, 2], 0),
        tensor("w", FLOAT32, &[1, 3, 3, 4], w),
        tensor("out", FLOAT32, &[1, 4, 4, 4], 0),
    ];
    m.ops = vec![with_options(
        op(0, &[0, 1, -1], &[2]),
        2,
        &[
            (STRIDE_W, Field::I32(1)),
            (STRIDE_H, Field::I32(1)),
            (12, Field::I8(3)),
        ],
    )];
    m.outputs = vec![2];
    let g = import_tflite(&m.build()).unwrap();
    assert_eq!(
        g.ops[0].kind,
        OpKind::DepthwiseConv2d {
            stride: [1, 1],
            dilation: [1, 1],
            padding: Padding::Same,
            depth_multiplier: 2,
            activation: Activation::Relu6,
        }
    );
    assert_eq!(g.ops[0].inputs, [Some(0), Some(1), None]);

    // An explicit multiplier that contradicts the shapes is an error.
    let mut bad = m.clone();
    bad.ops[0]
        .options
        .as_mut()
        .unwrap()
        .1
        .push((10, Field::I32(3)));
    assert!(err(&bad).to_string().contains("depth_multiplier 3"));
}

#[test]
fn external_buffers_are_read_from_the_file() {
    let mut m = int8_model();
    let data: Vec<u8> = (0..18).map(|i| 100 + i as u8).collect();
    m.buffers[1] = BufferSpec::External(data.clone());
    let bytes = m.build();
    let g = import_tflite(&bytes).unwrap();
    assert_eq!(g.tensors[1].data.as_deref(), Some(&data[..]));

    // Pointing past the end of the file is an error, not a panic.
    let e = import_tflite(&bytes[..bytes.len() - 16]).unwrap_err();
    assert!(e.to_string().contains("file offset"), "{e}");
}

#[test]
fn structural_errors() {
    // Buffer index out of range.
    let mut m = int8_model();
    m.tensors[1].buffer = 99;
    let e = err(&m);
    assert_eq!(
        e.to_string(),
        "malformed TFLite model: tensor 1 'conv/w' references buffer 99 but the model has 5 buffers"
    );

    // Buffer size disagrees with the shape.
    let mut m = int8_model();
    m.tensors[1].shape = vec![2, 3, 3, 2];
    assert!(err(&m)
        .to_string()
        .contains("needs 36 bytes but buffer 1 holds 18"));

    // Tensor index out of range in an operator.
    let mut m = int8_model();
    m.ops[1].inputs = vec![42];
    assert!(err(&m).to_string().contains("references tensor 42"));
    m.ops[1].inputs = vec![-2];
    assert!(err(&m).to_string().contains("input 0 references tensor -2"));

    // A required input given as -1.
    let mut m = int8_model();
    m.ops[0].inputs[1] = -1;
    assert!(err(&m).to_string().contains("missing required input 1"));

    // Opcode index out of range.
    let mut m = int8_model();
    m.ops[2].opcode = 9;
    assert!(err(&m).to_string().contains("operator code 9"));

    // Per-channel scales must match the quantized dimension.
    let mut m = int8_model();
    m.tensors[1].quant = Some((vec![0.1, 0.2, 0.3], vec![0, 0, 0], 0));
    assert!(err(&m).to_string().contains("3 quantization scales"));
    let mut m = int8_model();
    m.tensors[1].quant = Some((vec![0.1, 0.2], vec![0], 0));
    assert!(err(&m).to_string().contains("but 1 zero points"));

    // Ops out of execution order.
    let mut m = int8_model();
    m.ops.swap(1, 2);
    assert!(err(&m)
        .to_string()
        .contains("before any operator produces it"));

    // Options of the wrong type for the op.
    let mut m = int8_model();
    m.ops[0].options.as_mut().unwrap().0 = 11;
    assert!(err(&m).to_string().contains("expected Conv2DOptions"));

    // Missing options: stride defaults to 0, which is invalid.
    let mut m = int8_model();
    m.ops[0].options = None;
    assert!(err(&m).to_string().contains("stride_h 0"));

    // Not a TFLite file.
    let mut bytes = int8_model().build();
    bytes[4..8].copy_from_slice(b"ABCD");
    assert!(import_tflite(&bytes)
        .unwrap_err()
        .to_string()
        .contains("file identifier"));
}

#[test]
fn unsupported_features() {
    let unsupported = |m: &ModelSpec, needle: &str| {
        let e = err(m);
        assert!(matches!(e, TfliteError::Unsupported(_)), "{e}");
        assert!(e.to_string().contains(needle), "{e} (expected {needle:?})");
    };

    let mut m = int8_model();
    m.tensors[0].ty = UINT8;
    unsupported(&m, "tensor 0 'in' has type UINT8");

    let mut m = int8_model();
    m.tensors[3].shape = vec![-1, 2, 2, 2];
    unsupported(&m, "dynamic dimension");

    let mut m = int8_model();
    m.ops[0]
        .options
        .as_mut()
        .unwrap()
        .1
        .push((CONV_ACT, Field::I8(4)));
    unsupported(&m, "fused activation TANH on operator 0 (CONV_2D)");

    let mut m = int8_model();
    m.subgraphs = 2;
    unsupported(&m, "2 subgraphs");

    let mut m = int8_model();
    m.version = 2;
    unsupported(&m, "schema version 2");

    // Fused activation on ADD through AddOptions.
    let mut m = ModelSpec::new(&[ADD]);
    m.tensors = vec![
        tensor("a", FLOAT32, &[1, 4], 0),
        tensor("b", FLOAT32, &[1, 4], 0),
        tensor("out", FLOAT32, &[1, 4], 0),
    ];
    m.inputs = vec![0, 1];
    m.ops = vec![with_options(op(0, &[0, 1], &[2]), 11, &[(4, Field::I8(5))])];
    m.outputs = vec![2];
    unsupported(&m, "SIGN_BIT");
    m.ops[0].options = Some((11, vec![(4, Field::I8(1))]));
    let g = import_tflite(&m.build()).unwrap();
    assert_eq!(
        g.ops[0].kind,
        OpKind::Add {
            activation: Activation::Relu
        }
    );
}

// ---------------------------------------------------------------------------------------------
// Robustness: truncated and corrupted files give errors, never panics.
// ---------------------------------------------------------------------------------------------

/// xorshift64*: a small deterministic generator for the mutation tests.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Imports `bytes`, turning a panic into a test failure that says which input caused it.
fn import_no_panic(bytes: &[u8], what: &dyn Fn() -> String) -> Result<Graph, TfliteError> {
    match catch_unwind(AssertUnwindSafe(|| import_tflite(bytes))) {
        Ok(result) => result,
        Err(_) => panic!("import_tflite panicked on {}", what()),
    }
}

/// Every prefix (at `stride`, plus the last 64) and `mutations` random single-byte changes.
fn fuzz(bytes: &[u8], stride: usize, mutations: usize, seed: u64) -> (usize, usize) {
    for len in (0..bytes.len())
        .step_by(stride)
        .chain(bytes.len().saturating_sub(64)..bytes.len())
    {
        let r = import_no_panic(&bytes[..len], &|| format!("a {len}-byte prefix"));
        if len < 32 {
            assert!(r.is_err(), "a {len}-byte prefix imported");
        }
    }
    let mut rng = Rng(seed);
    let (mut ok, mut errs) = (0, 0);
    let mut mutated = bytes.to_vec();
    for _ in 0..mutations {
        let pos = rng.below(bytes.len());
        let value = match rng.below(4) {
            0 => 0,
            1 => 0xff,
            2 => bytes[pos] ^ (1 << rng.below(8)),
            _ => rng.next() as u8,
        };
        mutated[pos] = value;
        match import_no_panic(&mutated, &|| format!("byte {pos} set to {value:#04x}")) {
            Ok(g) => {
                check_invariants(&g);
                ok += 1;
            }
            Err(e) => {
                assert!(!e.to_string().contains('\n'), "multi-line message: {e}");
                errs += 1;
            }
        }
        mutated[pos] = bytes[pos];
    }
    (ok, errs)
}

#[test]
fn truncated_and_mutated_reference_model_never_panics() {
    let Some(bytes) = model("kws_ref_model.tflite") else {
        return;
    };
    let (ok, errs) = fuzz(&bytes, 7, 2000, 0x9e37_79b9_7f4a_7c15);
    println!("kws mutations: {ok} imported, {errs} rejected");
}

#[test]
fn mutated_small_models_never_panic() {
    for (i, m) in [int8_model(), {
        let mut m = int8_model();
        m.buffers[1] = BufferSpec::External((0..18).collect());
        m
    }]
    .iter()
    .enumerate()
    {
        let bytes = m.build();
        let (ok, errs) = fuzz(&bytes, 1, 3000, 0x1234_5678 + i as u64);
        println!("small model {i}: {ok} imported, {errs} rejected");
        assert!(errs > 0);
        // Exhaustively: every byte set to 0x00, 0xff and 0x80.
        let mut mutated = bytes.clone();
        for pos in 0..bytes.len() {
            for value in [0x00, 0xff, 0x80] {
                mutated[pos] = value;
                let _ = import_no_panic(&mutated, &|| format!("byte {pos} set to {value:#04x}"));
            }
            mutated[pos] = bytes[pos];
        }
    }
}
