//! Weights in safetensors form: `apply_weights` (retrained weights into a float graph, by name)
//! and `export_weights` / `kiln export-weights` (an artifact's constants, optionally dequantized).

mod common;

use kiln::convert::{assemble_graph, convert_tflite};
use kiln::ir::{self, Graph, OpKind, Padding, QuantInfo, Tensor};
use kiln::npy::Array;
use kiln::runner::{run_batch, Outputs};
use kiln::weights::{apply_weights, export_weights, WeightsError};
use kiln_runtime::graph::{Activation, DType};
use safetensors::{Dtype, SafeTensors, View};
use std::borrow::Cow;
use std::collections::HashMap;

// ---------------------------------------------------------------------------------------------
// Helpers

/// An owned tensor for `safetensors::serialize`.
struct T {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &T {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn f32_t(shape: &[usize], values: &[f32]) -> T {
    assert_eq!(shape.iter().product::<usize>(), values.len());
    T {
        dtype: Dtype::F32,
        shape: shape.to_vec(),
        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

fn file<S: AsRef<str>>(tensors: &[(S, T)]) -> Vec<u8> {
    safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_ref(), t)), None).unwrap()
}

fn f32s(data: &[u8]) -> Vec<f32> {
    data.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn err_text(r: Result<kiln::weights::WeightsReport, WeightsError>) -> String {
    let e = r.expect_err("expected an error").to_string();
    assert!(!e.contains('\n'), "one line: {e}");
    e
}

fn assert_has(text: &str, fragment: &str) {
    assert!(
        text.contains(fragment),
        "message does not contain `{fragment}`:\n{text}"
    );
}

fn constant(name: &str, shape: &[usize], values: &[f32]) -> Tensor {
    Tensor {
        name: name.into(),
        dtype: DType::F32,
        shape: shape.to_vec(),
        data: Some(bytes(values)),
        quant: None,
    }
}

fn activation(name: &str, shape: &[usize]) -> Tensor {
    Tensor {
        name: name.into(),
        dtype: DType::F32,
        shape: shape.to_vec(),
        data: None,
        quant: None,
    }
}

fn ramp(n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| (i as f32 - n as f32 / 2.0) * scale)
        .collect()
}

/// input [1,4,4,3] → CONV_2D (filter `conv.w` [4,2,2,3] OHWI, bias `conv.b`) → DEPTHWISE_CONV_2D
/// (`dw.w` [1,3,3,4], `dw.b`) → RESHAPE [1,64] → FULLY_CONNECTED (`fc.w` [5,64], `fc.b`).
fn small_graph() -> Graph {
    let tensors = vec![
        activation("input", &[1, 4, 4, 3]),
        constant("conv.w", &[4, 2, 2, 3], &ramp(48, 0.01)),
        constant("conv.b", &[4], &[0.1, -0.1, 0.2, 0.0]),
        activation("conv.out", &[1, 4, 4, 4]),
        constant("dw.w", &[1, 3, 3, 4], &ramp(36, 0.02)),
        constant("dw.b", &[4], &[0.0; 4]),
        activation("dw.out", &[1, 4, 4, 4]),
        activation("flat", &[1, 64]),
        constant("fc.w", &[5, 64], &ramp(320, 0.001)),
        constant("fc.b", &[5], &[0.5; 5]),
        activation("fc.out", &[1, 5]),
    ];
    let conv = |k| OpKind::Conv2d {
        stride: [1, 1],
        dilation: [1, 1],
        padding: Padding::Same,
        activation: k,
    };
    Graph {
        name: "small".into(),
        tensors,
        ops: vec![
            ir::Op {
                kind: conv(Activation::Relu),
                inputs: vec![Some(0), Some(1), Some(2)],
                outputs: vec![3],
            },
            ir::Op {
                kind: OpKind::DepthwiseConv2d {
                    stride: [1, 1],
                    dilation: [1, 1],
                    padding: Padding::Same,
                    depth_multiplier: 1,
                    activation: Activation::None,
                },
                inputs: vec![Some(3), Some(4), Some(5)],
                outputs: vec![6],
            },
            ir::Op {
                kind: OpKind::Reshape,
                inputs: vec![Some(6)],
                outputs: vec![7],
            },
            ir::Op {
                kind: OpKind::FullyConnected {
                    activation: Activation::None,
                },
                inputs: vec![Some(7), Some(8), Some(9)],
                outputs: vec![10],
            },
        ],
        inputs: vec![0],
        outputs: vec![10],
    }
}

fn values_of(g: &Graph, name: &str) -> Vec<f32> {
    let t = g.tensors.iter().find(|t| t.name == name).unwrap();
    f32s(t.data.as_ref().unwrap())
}

fn run_f32(artifact: &[u8], x: &Array) -> Vec<f32> {
    match run_batch(artifact, x, |_| {}).unwrap().outputs {
        Outputs::F32(v) => v,
        other => panic!("expected f32 outputs, got {other:?}"),
    }
}

/// An artifact of `lowered` whose MANIFEST has no `tensor_names` (as older artifacts and other
/// writers have it): the export then names tensors by artifact position.
fn unnamed(lowered: &kiln::lower::Lowered, name: &str) -> Vec<u8> {
    kiln::convert::assemble_lowered(lowered, name, &serde_json::json!({ "name": name })).unwrap()
}

fn resnet() -> Option<(Vec<u8>, Graph)> {
    let dir = common::testdata()?;
    let path = common::mlperf(&dir, "pretrainedResnet.tflite");
    let source = std::fs::read(&path).unwrap();
    let (g, format, _) = kiln::import::import_file(&path).unwrap();
    assert_eq!(format, "tflite");
    Some((source, g))
}

/// Float constants of a graph whose names are unique (the ones `apply_weights` can address).
fn unique_float_constants(g: &Graph) -> Vec<usize> {
    let mut count: HashMap<&str, usize> = HashMap::new();
    for t in g.tensors.iter().filter(|t| t.data.is_some()) {
        *count.entry(t.name.as_str()).or_default() += 1;
    }
    (0..g.tensors.len())
        .filter(|&i| {
            let t = &g.tensors[i];
            t.data.is_some() && t.dtype == DType::F32 && count[t.name.as_str()] == 1
        })
        .collect()
}

fn conv_filters(g: &Graph) -> Vec<usize> {
    g.ops
        .iter()
        .filter(|op| matches!(op.kind, OpKind::Conv2d { .. }))
        .filter_map(|op| op.inputs.get(1).copied().flatten())
        .collect()
}

fn cifar_like_input() -> Array {
    let data: Vec<f32> = (0..2 * 32 * 32 * 3)
        .map(|i| ((i * 37 + 11) % 256) as f32)
        .collect();
    Array::F32 {
        shape: vec![2, 32, 32, 3],
        data,
    }
}

// ---------------------------------------------------------------------------------------------
// apply_weights on a real model

#[test]
fn resnet_weights_by_graph_names_change_the_model() {
    let Some((_, g0)) = resnet() else {
        return;
    };
    let ids = unique_float_constants(&g0);
    assert!(ids.len() > 10, "ResNet-8 has named float constants");
    let filters = conv_filters(&g0);
    assert!(!filters.is_empty());

    // The same values: a no-op that still replaces every constant.
    let same: Vec<(String, T)> = ids
        .iter()
        .map(|&i| {
            let t = &g0.tensors[i];
            (
                t.name.clone(),
                f32_t(&t.shape, &f32s(t.data.as_ref().unwrap())),
            )
        })
        .collect();
    let same_file = file(&same);
    let mut g1 = g0.clone();
    let report = apply_weights(&mut g1, &same_file, true).unwrap();
    assert_eq!(report.replaced.len(), ids.len());
    assert!(report.transposed.is_empty());
    assert_eq!(report.sha256, kiln::convert::sha256_hex(&same_file));
    assert_eq!(g1.tensors, g0.tensors);

    // Retrained: every conv filter halved, every other constant kept.
    let halved: Vec<(&str, T)> = ids
        .iter()
        .map(|&i| {
            let t = &g0.tensors[i];
            let mut v = f32s(t.data.as_ref().unwrap());
            if filters.contains(&i) {
                v.iter_mut().for_each(|x| *x *= 0.5);
            }
            (t.name.as_str(), f32_t(&t.shape, &v))
        })
        .collect();
    let halved_file = file(&halved);
    let mut g2 = g0.clone();
    let report = apply_weights(&mut g2, &halved_file, true).unwrap();
    assert_eq!(report.replaced.len(), ids.len());
    for &i in &ids {
        let want: Vec<f32> = f32s(g0.tensors[i].data.as_ref().unwrap())
            .into_iter()
            .map(|x| if filters.contains(&i) { x * 0.5 } else { x })
            .collect();
        assert_eq!(f32s(g2.tensors[i].data.as_ref().unwrap()), want);
        assert_eq!(g2.tensors[i].shape, g0.tensors[i].shape);
        assert_eq!(g2.tensors[i].dtype, DType::F32);
    }

    // Lowering and running work, and the outputs change (unchanged weights: bit-identical).
    let x = cifar_like_input();
    let a0 = assemble_graph(&g0, "resnet8").unwrap();
    let a1 = assemble_graph(&g1, "resnet8").unwrap();
    let a2 = assemble_graph(&g2, "resnet8").unwrap();
    let (y0, y1, y2) = (run_f32(&a0, &x), run_f32(&a1, &x), run_f32(&a2, &x));
    assert_eq!(y0, y1);
    assert_eq!(y0.len(), y2.len());
    assert!(y2.iter().all(|v| v.is_finite()));
    let diff: f32 = y0.iter().zip(&y2).map(|(a, b)| (a - b).abs()).sum();
    assert!(diff > 1e-3, "halving the conv filters changes the outputs");
}

#[test]
fn exported_weights_scaled_and_renamed_apply_to_the_graph() {
    let Some((source, g)) = resnet() else {
        return;
    };
    let converted = convert_tflite(&source, "resnet8").unwrap();
    let exported = export_weights(&unnamed(&converted.lowered, "resnet8"), false).unwrap();
    let st = SafeTensors::deserialize(&exported).unwrap();

    // Artifact tensor index → graph tensor.
    let mut host_of: HashMap<usize, usize> = HashMap::new();
    for (h, a) in converted.lowered.tensor_index.iter().enumerate() {
        if let Some(a) = a {
            host_of.insert(*a as usize, h);
        }
    }
    let index_of = |name: &str| -> usize {
        name[1..]
            .split('_')
            .next()
            .unwrap()
            .parse()
            .unwrap_or_else(|_| panic!("`{name}` is t{{index}}..."))
    };

    // The export holds every constant, bit for bit, under t{index}_{op}_{role}.
    let constants = g.tensors.iter().filter(|t| t.data.is_some()).count();
    assert_eq!(st.len(), constants);
    let mut convs = 0;
    for (name, view) in st.tensors() {
        let host = &g.tensors[host_of[&index_of(&name)]];
        assert_eq!(view.dtype(), Dtype::F32, "{name}");
        assert_eq!(view.shape(), host.shape.as_slice(), "{name}");
        assert_eq!(view.data(), host.data.as_deref().unwrap(), "{name}");
        if name.ends_with("_CONV_2D_weights") {
            convs += 1;
        }
        assert!(
            name.ends_with("_weights") || name.ends_with("_bias") || name.ends_with("_operand"),
            "{name}"
        );
    }
    assert_eq!(convs, conv_filters(&g).len());

    // The export's names are artifact positions, not the model's names.
    let mut untouched = g.clone();
    let e = err_text(apply_weights(&mut untouched, &exported, false));
    assert_has(&e, "weights file has tensor `t");
    assert_has(
        &e,
        "but the model has no constant of that name; names the model has: ",
    );
    assert_eq!(untouched.tensors, g.tensors);

    // Scale the conv weights by 0.5, rename to the graph's names, apply.
    let mut renamed: Vec<(String, T)> = Vec::new();
    for (name, view) in st.tensors() {
        let mut v = f32s(view.data());
        if name.ends_with("_CONV_2D_weights") {
            v.iter_mut().for_each(|x| *x *= 0.5);
        }
        let host = host_of[&index_of(&name)];
        renamed.push((g.tensors[host].name.clone(), f32_t(view.shape(), &v)));
    }
    let new_file = file(&renamed);
    let mut g2 = g.clone();
    let report = apply_weights(&mut g2, &new_file, false).unwrap();
    assert_eq!(report.replaced.len(), constants);
    for &i in &conv_filters(&g) {
        let want: Vec<f32> = f32s(g.tensors[i].data.as_ref().unwrap())
            .iter()
            .map(|x| x * 0.5)
            .collect();
        assert_eq!(f32s(g2.tensors[i].data.as_ref().unwrap()), want);
    }
    let x = cifar_like_input();
    let y0 = run_f32(&converted.artifact, &x);
    let y2 = run_f32(&assemble_graph(&g2, "resnet8").unwrap(), &x);
    assert_ne!(y0, y2);
}

#[test]
fn converted_artifacts_name_their_constants_so_the_export_applies_back() {
    let Some((source, g)) = resnet() else {
        return;
    };
    // `convert` writes the model's constant names into the MANIFEST (`tensor_names`).
    let artifact = convert_tflite(&source, "resnet8").unwrap().artifact;
    let exported = export_weights(&artifact, false).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&exported).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!(meta["model"], "resnet8");
    let constants = g.tensors.iter().filter(|t| t.data.is_some()).count();
    assert_eq!(
        unique_float_constants(&g).len(),
        constants,
        "ResNet-8 names are unique"
    );
    for name in SafeTensors::deserialize(&exported).unwrap().names() {
        assert!(
            g.tensors.iter().any(|t| t.name == *name),
            "{name} is a graph name"
        );
    }
    // Export → apply round trip by name: every constant replaced, the graph unchanged.
    let mut g2 = g.clone();
    let report = apply_weights(&mut g2, &exported, true).unwrap();
    assert_eq!(report.replaced.len(), constants);
    assert_eq!(g2.tensors, g.tensors);
}

#[test]
fn oihw_conv_filters_and_torch_depthwise_filters_are_transposed() {
    // Synthetic graph: O=4, H=W=2, I=3 → OIHW [4,3,2,2]; depthwise [1,3,3,4] ← [4,1,3,3].
    let g0 = small_graph();
    let ohwi = values_of(&g0, "conv.w");
    let (o, h, w, i) = (4, 2, 2, 3);
    let mut oihw = vec![0.0f32; ohwi.len()];
    for oo in 0..o {
        for hh in 0..h {
            for ww in 0..w {
                for ii in 0..i {
                    oihw[((oo * i + ii) * h + hh) * w + ww] =
                        ohwi[((oo * h + hh) * w + ww) * i + ii];
                }
            }
        }
    }
    let hwc = values_of(&g0, "dw.w");
    let (kh, kw, c) = (3, 3, 4);
    let mut chw = vec![0.0f32; hwc.len()];
    for hh in 0..kh {
        for ww in 0..kw {
            for cc in 0..c {
                chw[(cc * kh + hh) * kw + ww] = hwc[(hh * kw + ww) * c + cc];
            }
        }
    }
    // Give the graph other values first, so that the check sees the transposed file values.
    let mut g = g0.clone();
    for t in &mut g.tensors {
        if let Some(d) = &mut t.data {
            d.iter_mut().for_each(|b| *b = 0);
        }
    }
    let f = file(&[
        ("conv.w", f32_t(&[4, 3, 2, 2], &oihw)),
        ("dw.w", f32_t(&[4, 1, 3, 3], &chw)),
    ]);
    let report = apply_weights(&mut g, &f, false).unwrap();
    assert_eq!(report.replaced, ["conv.w", "dw.w"]);
    assert_eq!(report.transposed, ["conv.w", "dw.w"]);
    assert_eq!(values_of(&g, "conv.w"), ohwi);
    assert_eq!(values_of(&g, "dw.w"), hwc);
    assert_eq!(g.tensors[1].shape, [4, 2, 2, 3]);

    // In the graph's own layout nothing is transposed.
    let mut g2 = g0.clone();
    let f = file(&[("conv.w", f32_t(&[4, 2, 2, 3], &ohwi))]);
    let report = apply_weights(&mut g2, &f, false).unwrap();
    assert!(report.transposed.is_empty());
    assert_eq!(g2.tensors, g0.tensors);
}

#[test]
fn oihw_filters_of_resnet_give_the_same_model() {
    let Some((_, g0)) = resnet() else {
        return;
    };
    let mut tensors: Vec<(String, T)> = Vec::new();
    for &id in &conv_filters(&g0) {
        let t = &g0.tensors[id];
        let [o, h, w, i] = t.shape[..] else {
            panic!("4-D filter")
        };
        if [o, i, h, w] == [o, h, w, i] {
            continue; // ambiguous: taken in the graph's layout
        }
        let v = f32s(t.data.as_ref().unwrap());
        let mut oihw = vec![0.0f32; v.len()];
        for oo in 0..o {
            for hh in 0..h {
                for ww in 0..w {
                    for ii in 0..i {
                        oihw[((oo * i + ii) * h + hh) * w + ww] =
                            v[((oo * h + hh) * w + ww) * i + ii];
                    }
                }
            }
        }
        tensors.push((t.name.clone(), f32_t(&[o, i, h, w], &oihw)));
    }
    assert!(!tensors.is_empty());
    let f = file(&tensors);
    let mut g = g0.clone();
    let report = apply_weights(&mut g, &f, false).unwrap();
    assert_eq!(report.transposed.len(), tensors.len());
    assert_eq!(g.tensors, g0.tensors);
}

#[test]
fn torch_layout_depthwise_filters_of_kws_give_the_same_model() {
    let Some(dir) = common::testdata() else {
        return;
    };
    let path = common::mlperf(&dir, "kws_ref_model_float32.tflite");
    let (g0, _, _) = kiln::import::import_file(&path).unwrap();
    let mut tensors: Vec<(String, T)> = Vec::new();
    for op in &g0.ops {
        if !matches!(op.kind, OpKind::DepthwiseConv2d { .. }) {
            continue;
        }
        let t = &g0.tensors[op.inputs[1].unwrap()];
        let [1, kh, kw, c] = t.shape[..] else {
            panic!("depthwise filter is [1, kh, kw, C]")
        };
        let v = f32s(t.data.as_ref().unwrap());
        let mut chw = vec![0.0f32; v.len()];
        for hh in 0..kh {
            for ww in 0..kw {
                for cc in 0..c {
                    chw[(cc * kh + hh) * kw + ww] = v[(hh * kw + ww) * c + cc];
                }
            }
        }
        tensors.push((t.name.clone(), f32_t(&[c, 1, kh, kw], &chw)));
    }
    assert!(tensors.len() >= 4, "DS-CNN has depthwise convolutions");
    let mut g = g0.clone();
    let report = apply_weights(&mut g, &file(&tensors), false).unwrap();
    assert_eq!(report.transposed.len(), tensors.len());
    assert_eq!(g.tensors, g0.tensors);
}

#[test]
fn f16_bf16_and_f64_files_are_converted_to_the_graph_type() {
    let mut g = small_graph();
    let b: [f32; 4] = [0.25, -1.5, 3.0, 0.125];
    let f16: Vec<u8> = b
        .iter()
        .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
        .collect();
    let bf16: Vec<u8> = b
        .iter()
        .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
        .collect();
    let f64b: Vec<u8> = [0.1f64, 0.2, 0.3, 0.4, 0.5]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let f = file(&[
        (
            "conv.b",
            T {
                dtype: Dtype::F16,
                shape: vec![4],
                data: f16,
            },
        ),
        (
            "dw.b",
            T {
                dtype: Dtype::BF16,
                shape: vec![4],
                data: bf16,
            },
        ),
        (
            "fc.b",
            T {
                dtype: Dtype::F64,
                shape: vec![5],
                data: f64b,
            },
        ),
    ]);
    apply_weights(&mut g, &f, false).unwrap();
    assert_eq!(values_of(&g, "conv.b"), b);
    assert_eq!(values_of(&g, "dw.b"), b);
    assert_eq!(
        values_of(&g, "fc.b"),
        [0.1f64, 0.2, 0.3, 0.4, 0.5].map(|v| v as f32)
    );

    // An f16 constant of the graph (as `--fp16` stores it) stays f16.
    let mut g16 = kiln::lower::to_fp16(&small_graph()).unwrap();
    let f = file(&[("conv.b", f32_t(&[4], &b))]);
    apply_weights(&mut g16, &f, false).unwrap();
    let t = g16.tensors.iter().find(|t| t.name == "conv.b").unwrap();
    assert_eq!(t.dtype, DType::F16);
    let got: Vec<f32> = t
        .data
        .as_ref()
        .unwrap()
        .chunks_exact(2)
        .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect();
    assert_eq!(got, b);
}

// ---------------------------------------------------------------------------------------------
// apply_weights errors: one line each, and the graph is left as it was

#[test]
fn malformed_file_is_refused() {
    let mut g = small_graph();
    let e = err_text(apply_weights(&mut g, b"not a safetensors file", false));
    assert_has(&e, "the weights file is not a valid safetensors file (");
    assert_has(&e, "safetensors.torch.save_file");
    let e = err_text(apply_weights(&mut g, &[], false));
    assert_has(&e, "the weights file is not a valid safetensors file (");
    assert_eq!(g.tensors, small_graph().tensors);
}

#[test]
fn unknown_name_lists_the_model_names() {
    let mut g = small_graph();
    let f = file(&[("conv.weight", f32_t(&[4], &[0.0; 4]))]);
    let e = err_text(apply_weights(&mut g, &f, false));
    assert_has(
        &e,
        "weights file has tensor `conv.weight` but the model has no constant of that name; names \
         the model has: conv.w, conv.b, dw.w, dw.b, fc.w, fc.b; rename the tensor",
    );

    // Long lists are truncated.
    let mut big = small_graph();
    for k in 0..20 {
        big.tensors
            .push(constant(&format!("extra{k}"), &[1], &[0.0]));
    }
    let e = err_text(apply_weights(&mut big, &f, false));
    assert_has(
        &e,
        "names the model has: conv.w, conv.b, dw.w, dw.b, fc.w, fc.b, … (26 in all)",
    );
    assert!(!e.contains("extra19"));
}

#[test]
fn missing_constants_are_an_error_only_when_all_are_required() {
    let mut g = small_graph();
    let f = file(&[("conv.b", f32_t(&[4], &[1.0; 4]))]);
    let e = err_text(apply_weights(&mut g, &f, true));
    assert_has(
        &e,
        "the weights file lacks 5 of the model's float constants (conv.w, dw.w, dw.b, fc.w, \
         fc.b) and every constant is required",
    );
    assert_eq!(g.tensors, small_graph().tensors, "nothing applied");
    let report = apply_weights(&mut g, &f, false).unwrap();
    assert_eq!(report.replaced, ["conv.b"]);
    assert_eq!(values_of(&g, "conv.b"), [1.0; 4]);
}

#[test]
fn misshaped_tensors_name_the_accepted_shapes() {
    let mut g = small_graph();
    let f = file(&[("conv.w", f32_t(&[4, 2, 2, 2], &[0.0; 32]))]);
    let e = err_text(apply_weights(&mut g, &f, false));
    assert_has(
        &e,
        "tensor `conv.w` has shape [4,2,2,2] but the model expects [4,2,2,3] (OHWI) or its OIHW \
         form [4,3,2,2]; save it in that shape",
    );
    let f = file(&[("dw.w", f32_t(&[4, 3, 3], &[0.0; 36]))]);
    let e = err_text(apply_weights(&mut g, &f, false));
    assert_has(
        &e,
        "tensor `dw.w` has shape [4,3,3] but the model expects [1,3,3,4] ([1, kh, kw, C*mult]) \
         or its torch form [4,1,3,3]",
    );
    let f = file(&[("fc.w", f32_t(&[64, 5], &[0.0; 320]))]);
    let e = err_text(apply_weights(&mut g, &f, false));
    assert_has(
        &e,
        "tensor `fc.w` has shape [64,5] but the model expects [5,64] ([out, in], as \
         torch.nn.Linear stores it) (the file looks like a Keras [in, out] kernel: transpose it)",
    );
    let f = file(&[("fc.b", f32_t(&[1, 5], &[0.0; 5]))]);
    let e = err_text(apply_weights(&mut g, &f, false));
    assert_has(
        &e,
        "tensor `fc.b` has shape [1,5] but the model expects [5]; save it in that shape",
    );
    assert_eq!(g.tensors, small_graph().tensors);
}

#[test]
fn non_finite_and_overflowing_values_are_refused() {
    let mut g = small_graph();
    let f = file(&[("conv.b", f32_t(&[4], &[0.0, 1.0, 2.0, f32::NAN]))]);
    let e = err_text(apply_weights(&mut g, &f, false));
    assert_has(
        &e,
        "tensor `conv.b` holds a non-finite value (NaN) at element 3; weights must be finite",
    );
    let f = file(&[(
        "fc.b",
        f32_t(&[5], &[f32::NEG_INFINITY, 0.0, 0.0, 0.0, 0.0]),
    )]);
    let e = err_text(apply_weights(&mut g, &f, false));
    assert_has(
        &e,
        "tensor `fc.b` holds a non-finite value (-inf) at element 0",
    );

    let f = file(&[(
        "dw.b",
        T {
            dtype: Dtype::F64,
            shape: vec![4],
            data: [0.0f64, 1e300, 0.0, 0.0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        },
    )]);
    let e = err_text(apply_weights(&mut g, &f, false));
    assert_has(
        &e,
        "tensor `dw.b` has value 1e300 at element 1, which overflows the model's f32 constant",
    );
    let mut g16 = kiln::lower::to_fp16(&small_graph()).unwrap();
    let before = g16.tensors.clone();
    let f = file(&[("dw.b", f32_t(&[4], &[0.0, 0.0, 70000.0, 0.0]))]);
    let e = err_text(apply_weights(&mut g16, &f, false));
    assert_has(
        &e,
        "tensor `dw.b` has value 70000.0 at element 2, which overflows the model's f16 constant",
    );
    assert_eq!(g16.tensors, before);
    assert_eq!(g.tensors, small_graph().tensors);
}

#[test]
fn unsupported_file_types_are_refused() {
    let mut g = small_graph();
    let f = file(&[(
        "conv.b",
        T {
            dtype: Dtype::I32,
            shape: vec![4],
            data: vec![0; 16],
        },
    )]);
    let e = err_text(apply_weights(&mut g, &f, false));
    assert_has(
        &e,
        "tensor `conv.b` is I32 in the weights file, which kiln does not read as weights; save it \
         as F32, F16, BF16 or F64",
    );
}

#[test]
fn int8_constants_cannot_be_replaced() {
    let mut g = small_graph();
    let w = &mut g.tensors[1];
    w.dtype = DType::I8;
    w.data = Some(vec![1; 48]);
    w.quant = Some(QuantInfo {
        scales: vec![0.1; 4],
        zero_points: vec![0; 4],
        axis: 0,
    });
    g.tensors[2].dtype = DType::I32;
    g.tensors[2].data = Some(vec![0; 16]);
    let before = g.tensors.clone();
    let f = file(&[("conv.w", f32_t(&[4, 2, 2, 3], &[0.5; 48]))]);
    let e = err_text(apply_weights(&mut g, &f, false));
    assert_has(
        &e,
        "tensor `conv.w` is int8 in the model, and quantized constants cannot be replaced: int8 \
         models must be re-quantized from float; apply the weights to the float model and \
         quantize it again with `kiln quantize`",
    );
    let f = file(&[("conv.b", f32_t(&[4], &[0.5; 4]))]);
    let e = err_text(apply_weights(&mut g, &f, false));
    assert_has(
        &e,
        "tensor `conv.b` is int32 in the model, and quantized constants",
    );
    assert_eq!(g.tensors, before);
}

#[test]
fn ambiguous_names_are_refused() {
    let mut g = small_graph();
    g.tensors[5].name = "dw.w".into();
    let f = file(&[("dw.w", f32_t(&[1, 3, 3, 4], &[0.0; 36]))]);
    let e = err_text(apply_weights(&mut g, &f, false));
    assert_has(
        &e,
        "weights file has tensor `dw.w` but the model has 2 constants of that name (tensors 4, 5)",
    );
}

#[test]
fn a_bad_tensor_leaves_the_graph_as_it_was() {
    let mut g = small_graph();
    let f = file(&[
        ("conv.b", f32_t(&[4], &[9.0; 4])),
        ("fc.b", f32_t(&[4], &[9.0; 4])),
    ]);
    let e = err_text(apply_weights(&mut g, &f, false));
    assert_has(&e, "tensor `fc.b` has shape [4]");
    assert_eq!(g.tensors, small_graph().tensors);
}

// ---------------------------------------------------------------------------------------------
// export_weights

#[test]
fn dequantized_int8_export_is_scale_times_q_minus_zero_point_per_channel() {
    let Some(dir) = common::testdata() else {
        return;
    };
    let path = common::mlperf(&dir, "kws_ref_model.tflite");
    let source = std::fs::read(&path).unwrap();
    let (g, _, _) = kiln::import::import_file(&path).unwrap();
    let converted = convert_tflite(&source, "kws").unwrap();
    let artifact = unnamed(&converted.lowered, "kws");
    let raw = export_weights(&artifact, false).unwrap();
    let deq = export_weights(&artifact, true).unwrap();
    let raw_st = SafeTensors::deserialize(&raw).unwrap();
    let deq_st = SafeTensors::deserialize(&deq).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&raw).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!(meta["format"], "kiln-weights");
    assert_eq!(meta["kiln_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(meta["dequantized"], "false");
    let quantization: serde_json::Value = serde_json::from_str(&meta["quantization"]).unwrap();
    let (_, dmeta) = SafeTensors::read_metadata(&deq).unwrap();
    assert_eq!(dmeta.metadata().as_ref().unwrap()["dequantized"], "true");

    let by_index = |st: &SafeTensors<'_>, a: u16| -> String {
        let prefix = format!("t{a}_");
        st.names()
            .into_iter()
            .find(|n| n.starts_with(&prefix) || **n == format!("t{a}"))
            .unwrap_or_else(|| panic!("no tensor for artifact index {a}"))
            .to_string()
    };
    let mut per_channel = 0;
    let mut int8 = 0;
    for (h, t) in g.tensors.iter().enumerate() {
        let (Some(data), Some(a)) = (&t.data, converted.lowered.tensor_index[h]) else {
            continue;
        };
        let name = by_index(&deq_st, a);
        let view = deq_st.tensor(&name).unwrap();
        let raw_view = raw_st.tensor(&name).unwrap();
        assert_eq!(view.shape(), t.shape.as_slice());
        assert_eq!(
            raw_view.data(),
            data.as_slice(),
            "{name}: raw export is the constant"
        );
        assert_eq!(view.dtype(), Dtype::F32, "{name}: dequantized");
        let got = f32s(view.data());
        match t.dtype {
            DType::I8 => {
                int8 += 1;
                let q = t.quant.as_ref().unwrap();
                if q.scales.len() > 1 {
                    per_channel += 1;
                }
                assert_eq!(raw_view.dtype(), Dtype::I8);
                assert!(quantization.get(&name).is_some(), "{name} has its scales");
                // scale * (q - zp), per channel along the quantized axis.
                let inner: usize = t.shape[q.axis + 1..].iter().product();
                let want: Vec<f32> = data
                    .iter()
                    .enumerate()
                    .map(|(k, &v)| {
                        let c = if q.scales.len() > 1 {
                            (k / inner) % t.shape[q.axis]
                        } else {
                            0
                        };
                        q.scales[c] * ((v as i8) as i64 - q.zero_points[c]) as f32
                    })
                    .collect();
                assert_eq!(got, want, "{name}");
                assert_eq!(got, kiln::lower::dequantized(t).unwrap(), "{name}");
            }
            DType::I32 => {
                assert_eq!(raw_view.dtype(), Dtype::I32);
                let op = g
                    .ops
                    .iter()
                    .find(|op| op.inputs.get(2).copied().flatten() == Some(h))
                    .expect("int32 constants are biases");
                let si = g.tensors[op.inputs[0].unwrap()]
                    .quant
                    .as_ref()
                    .unwrap()
                    .scales[0];
                let wq = g.tensors[op.inputs[1].unwrap()].quant.as_ref().unwrap();
                for (k, c) in data.chunks_exact(4).enumerate() {
                    let q = i32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    let sw = wq.scales[if wq.scales.len() > 1 { k } else { 0 }];
                    let want = q as f64 * si as f64 * sw as f64;
                    assert!(
                        (got[k] as f64 - want).abs() <= want.abs() * 1e-6,
                        "{name}[{k}]: {} vs {want}",
                        got[k]
                    );
                }
            }
            other => panic!("int8 KWS has a {other:?} constant"),
        }
    }
    assert!(
        int8 > 5 && per_channel > 5,
        "KWS has per-channel int8 weights"
    );
}

#[test]
fn f16_artifact_exports_f16_and_dequantizes_to_f32() {
    let g = kiln::lower::to_fp16(&small_graph()).unwrap();
    let artifact = assemble_graph(&g, "small16").unwrap();
    let raw = SafeTensors::deserialize(&export_weights(&artifact, false).unwrap())
        .map(|st| {
            st.tensors()
                .into_iter()
                .map(|(n, v)| (n, (v.dtype(), v.data().to_vec())))
                .collect::<HashMap<_, _>>()
        })
        .unwrap();
    let deq_bytes = export_weights(&artifact, true).unwrap();
    let deq = SafeTensors::deserialize(&deq_bytes).unwrap();
    assert_eq!(raw.len(), 6);
    let mut names: Vec<&String> = raw.keys().collect();
    names.sort();
    // The MANIFEST names the constants (`tensor_names`), so the export uses the graph's names.
    assert_eq!(names, ["conv.b", "conv.w", "dw.b", "dw.w", "fc.b", "fc.w"]);
    for (name, (dtype, data)) in &raw {
        assert_eq!(*dtype, Dtype::F16);
        let v = deq.tensor(name).unwrap();
        assert_eq!(v.dtype(), Dtype::F32);
        let want: Vec<f32> = data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect();
        assert_eq!(f32s(v.data()), want);
    }
}

#[test]
fn invalid_artifact_is_refused() {
    let e = export_weights(b"KILN but not really", false)
        .unwrap_err()
        .to_string();
    assert_has(&e, "the artifact is not valid (");
    assert_has(
        &e,
        "export weights only from an artifact that `kiln inspect` accepts",
    );
}

#[test]
fn cli_export_weights_writes_a_safetensors_file() {
    let dir = std::env::temp_dir().join(format!("kiln-weights-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let model = dir.join("small.kiln");
    let out = dir.join("small.safetensors");
    std::fs::write(&model, assemble_graph(&small_graph(), "small").unwrap()).unwrap();
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["export-weights"])
        .arg(&model)
        .arg("-o")
        .arg(&out)
        .arg("--dequantize")
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let bytes = std::fs::read(&out).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.len(), 6);
    let w = st.tensor("conv.w").unwrap();
    assert_eq!(w.shape(), [4, 2, 2, 3]);
    assert_eq!(f32s(w.data()), values_of(&small_graph(), "conv.w"));
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(meta.metadata().as_ref().unwrap()["model"], "small");

    // A bad artifact: one line of error, non-zero exit.
    std::fs::write(&model, b"garbage").unwrap();
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["export-weights"])
        .arg(&model)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.starts_with("error: cannot export the weights of "),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn quantized_export_dequantizes_to_the_float_models_names_and_values() {
    use kiln::npy::read_real;
    use kiln::quantize::pipeline::{quantize, Precision, Request};
    let Some((_, g)) = resnet() else {
        return;
    };
    let dir = common::testdata().unwrap();
    let Array::F32 { shape, data } = read_real(&dir.join("data/ic01.npz"), None, None).unwrap()
    else {
        panic!("float samples expected")
    };
    let per: usize = shape[1..].iter().product();
    let calib = Array::F32 {
        shape: vec![8, shape[1], shape[2], shape[3]],
        data: data[..8 * per].to_vec(),
    };
    let q = quantize(
        Request::new("r8", g.clone(), &calib, Precision::Int8),
        |_, _, _| {},
    )
    .unwrap();
    // An int8 artifact exported with --dequantize carries the float model's names, so a user can
    // inspect it, edit it and apply it back to the float model by name.
    let exported = export_weights(&q.artifact, true).unwrap();
    let file = SafeTensors::deserialize(&exported).unwrap();
    let mut g2 = g.clone();
    let report = apply_weights(&mut g2, &exported, true).unwrap();
    assert_eq!(report.replaced.len(), file.names().len());
    let filters = conv_filters(&g);
    assert!(!filters.is_empty());
    for &f in &filters {
        let t = &g.tensors[f];
        assert!(
            report.replaced.contains(&t.name),
            "conv filter {} came back by name",
            t.name
        );
        // Per-channel symmetric int8: each value within half a step of the float original.
        let (a, b) = (
            f32s(t.data.as_ref().unwrap()),
            f32s(g2.tensors[f].data.as_ref().unwrap()),
        );
        let per_out = a.len() / t.shape[0];
        for (o, (ra, rb)) in a.chunks(per_out).zip(b.chunks(per_out)).enumerate() {
            let step = ra.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            for (x, y) in ra.iter().zip(rb) {
                assert!(
                    (x - y).abs() <= step * 0.5001 + 1e-7,
                    "{} channel {o}: {x} came back as {y}",
                    t.name
                );
            }
        }
    }
}
