//! `kiln quantize` / `kiln eval` as users run them: the report, the accuracy gate, and one clear
//! line for bad calibration data.

mod common;

use kiln::npy::{write_npy, OutputData};
use std::process::Command;

fn kiln(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("run kiln")
}

fn tmp(name: &str) -> String {
    let dir = std::env::temp_dir().join(format!("kiln-qcli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name).to_string_lossy().into_owned()
}

fn one_line_error(out: &std::process::Output, needle: &str) {
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("error: ") && err.contains(needle),
        "expected `{needle}` in: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn quantize_eval_and_the_accuracy_gate() {
    let Some(dir) = common::testdata() else {
        return;
    };
    let model = common::mlperf(&dir, "pretrainedResnet.tflite");
    let data = dir.join("data/ic01.npz");
    let (model, data) = (model.to_str().unwrap(), data.to_str().unwrap());
    let out = tmp("r8.kiln");
    let o = kiln(&[
        "quantize",
        model,
        "-o",
        &out,
        "--calib",
        data,
        "--eval",
        data,
        "--selftest-count",
        "3",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let report = &r["report"];
    assert_eq!(report["self_tests"], 3);
    assert_eq!(report["layers"].as_array().unwrap().len(), 16);
    assert!(report["layers"][0]["sqnr_db"].as_f64().unwrap() > 20.0);
    assert!(report["quantized_metric"].as_f64().unwrap() > 0.8);

    let o = kiln(&["eval", &out, "--data", data, "--reference", model, "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let e: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(e["top1"].as_f64().unwrap() > 0.8);
    assert!(e["agreement"].as_f64().unwrap() > 0.9);
    assert!(e["sqnr_db"].as_f64().unwrap() > 15.0);

    // A budget the result cannot meet (it must beat the float model by 50 pt): refused, with
    // both figures, and nothing written.
    let gated = tmp("gated.kiln");
    let o = kiln(&[
        "quantize",
        model,
        "-o",
        &gated,
        "--calib",
        data,
        "--eval",
        data,
        "--max-accuracy-drop=-50",
    ]);
    one_line_error(&o, "accuracy gate");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("float model's") && err.contains("drop"),
        "{err}"
    );
    assert!(!std::path::Path::new(&gated).exists());
}

#[test]
fn bad_calibration_data_gets_one_clear_line() {
    let Some(dir) = common::testdata() else {
        return;
    };
    let model = common::mlperf(&dir, "pretrainedResnet.tflite");
    let model = model.to_str().unwrap();
    let out = tmp("bad.kiln");
    // Wrong shape: KWS features for an image model.
    let kws = dir.join("data/kws01.npz");
    let kws_f = tmp("kws_f.npy");
    write_npy(
        std::path::Path::new(&kws_f),
        &[10, 490],
        OutputData::F32(&vec![0.5; 4900]),
    )
    .unwrap();
    one_line_error(
        &kiln(&["quantize", model, "-o", &out, "--calib", &kws_f]),
        "not a whole number of samples",
    );
    // int8 data: quantization needs real values.
    one_line_error(
        &kiln(&[
            "quantize",
            model,
            "-o",
            &out,
            "--calib",
            kws.to_str().unwrap(),
        ]),
        "needs real (float) values",
    );
    // Empty set.
    let empty = tmp("empty.npy");
    write_npy(
        std::path::Path::new(&empty),
        &[0, 32, 32, 3],
        OutputData::F32(&[]),
    )
    .unwrap();
    one_line_error(
        &kiln(&["quantize", model, "-o", &out, "--calib", &empty]),
        "calibration set is empty",
    );
    // NaN.
    let mut v = vec![1.0f32; 2 * 3072];
    v[77] = f32::NAN;
    let nan = tmp("nan.npy");
    write_npy(
        std::path::Path::new(&nan),
        &[2, 32, 32, 3],
        OutputData::F32(&v),
    )
    .unwrap();
    one_line_error(
        &kiln(&["quantize", model, "-o", &out, "--calib", &nan]),
        "non-finite value",
    );
    // Unknown options are usage errors.
    let o = kiln(&[
        "quantize",
        model,
        "-o",
        &out,
        "--calib",
        &nan,
        "--precision",
        "int4",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("use int8, fp16 or auto"));
    assert!(!std::path::Path::new(&out).exists());
}

#[test]
fn weights_file_replaces_constants_and_enters_the_lineage() {
    let Some(dir) = common::testdata() else {
        return;
    };
    let model = common::mlperf(&dir, "pretrainedResnet.tflite");
    let data = dir.join("data/ic01.npz");
    let g = kiln::import::tflite::import_tflite(&std::fs::read(&model).unwrap()).unwrap();
    // One float constant, halved, under the graph's own name.
    let t = g
        .tensors
        .iter()
        .find(|t| {
            t.data.is_some() && t.dtype == kiln_runtime::graph::DType::F32 && t.shape.len() == 4
        })
        .unwrap();
    let values: Vec<u8> = t
        .data
        .as_ref()
        .unwrap()
        .chunks_exact(4)
        .flat_map(|c| (0.5 * f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_le_bytes())
        .collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, t.shape.clone(), &values)
            .unwrap();
    let bytes = safetensors::serialize([(t.name.as_str(), view)], None).unwrap();
    let w = tmp("w.safetensors");
    std::fs::write(&w, &bytes).unwrap();
    let out = tmp("rw.kiln");
    let o = kiln(&[
        "quantize",
        model.to_str().unwrap(),
        "-o",
        &out,
        "--calib",
        data.to_str().unwrap(),
        "--weights",
        &w,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report = kiln::inspect::inspect(&std::fs::read(&out).unwrap()).unwrap();
    let lineage = &report.manifest["extra"]["weights"];
    assert_eq!(lineage["sha256"], kiln::convert::sha256_hex(&bytes));
    assert_eq!(lineage["replaced"][0], t.name.as_str());
    // A weights file naming a tensor the model lacks: one clear line, nothing written.
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &[0, 0, 0, 0])
            .unwrap();
    std::fs::write(
        &w,
        safetensors::serialize([("no_such_tensor", view)], None).unwrap(),
    )
    .unwrap();
    let out2 = tmp("rw2.kiln");
    let o = kiln(&[
        "quantize",
        model.to_str().unwrap(),
        "-o",
        &out2,
        "--calib",
        data.to_str().unwrap(),
        "--weights",
        &w,
    ]);
    one_line_error(&o, "no_such_tensor");
    assert!(!std::path::Path::new(&out2).exists());
}

#[test]
fn prune_reports_scores_and_its_gate_refuses_a_large_drop() {
    let Some(dir) = common::testdata() else {
        return;
    };
    let model = common::mlperf(&dir, "pretrainedResnet.tflite");
    let data = dir.join("data/ic01.npz");
    let (model, data) = (model.to_str().unwrap(), data.to_str().unwrap());
    let out = tmp("p.kiln");
    let o = kiln(&[
        "prune",
        model,
        "-o",
        &out,
        "--sparsity",
        "0.3",
        "--eval",
        data,
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!((r["report"]["sparsity"].as_f64().unwrap() - 0.3).abs() < 0.01);
    let (before, after) = (
        r["metrics"]["unpruned"].as_f64().unwrap(),
        r["metrics"]["pruned"].as_f64().unwrap(),
    );
    assert!(before > 0.8 && after > 0.5, "{before} {after}");
    // The pruned float artifact is a valid input for quantize, and keeps its lineage.
    let report = kiln::inspect::inspect(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(report.manifest["options"]["command"], "prune");
    assert_eq!(
        report.manifest["metrics"]["pruned"].as_f64().unwrap(),
        after
    );
    // 95 % of the weights gone: refused, with both figures, nothing written.
    let gated = tmp("p95.kiln");
    let o = kiln(&[
        "prune",
        model,
        "-o",
        &gated,
        "--sparsity",
        "0.95",
        "--eval",
        data,
        "--max-accuracy-drop",
        "2",
    ]);
    one_line_error(&o, "accuracy gate: the pruned model scores");
    assert!(!std::path::Path::new(&gated).exists());
}
