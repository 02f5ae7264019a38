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
