//! The `kiln` binary as users run it: convert, inspect (table and JSON), run, and the errors.

mod common;

use std::process::Command;

fn kiln(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("run kiln")
}

fn tmp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn convert_inspect_run_on_kws() {
    let Some(dir) = common::testdata() else {
        return;
    };
    let model = common::mlperf(&dir, "kws_ref_model.tflite");
    let golden = dir.join("golden/kws_ref_model.npz");
    let art = tmp("kws.kiln");
    let out = kiln(&[
        "convert",
        model.to_str().unwrap(),
        "-o",
        art.to_str().unwrap(),
        "--selftest",
        golden.to_str().unwrap(),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["arena_bytes"], 16000);
    assert_eq!(summary["self_tests"], 4);

    let out = kiln(&["inspect", art.to_str().unwrap(), "--json"]);
    assert!(out.status.success());
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["arena_bytes"], 16000);
    assert!(r["weights_bytes"].as_u64().unwrap() > 30_000);
    assert_eq!(r["macs"], 2_656_768);
    assert_eq!(r["ops"].as_array().unwrap().len(), 13);
    assert_eq!(r["ops"][0]["op"], "CONV_2D");
    assert_eq!(r["manifest"]["source"]["format"], "tflite");
    assert_eq!(r["name"], "kws_ref_model");

    let out = kiln(&["inspect", art.to_str().unwrap()]);
    let table = String::from_utf8_lossy(&out.stderr);
    assert!(
        table.contains("arena        16000 bytes") && table.contains("DEPTHWISE_CONV_2D"),
        "{table}"
    );

    let y = tmp("kws_out.npy");
    let out = kiln(&[
        "run",
        art.to_str().unwrap(),
        "--input",
        golden.to_str().unwrap(),
        "--output",
        y.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = std::fs::read(&y).unwrap();
    let npy = npyz::NpyFile::new(&got[..]).unwrap();
    assert_eq!(npy.shape(), &[1000, 12]);
    let got: Vec<i8> = npy.into_vec().unwrap();
    let (_, want) = kiln::npy::read_npz_i8(&golden, "output").unwrap();
    assert_eq!(got, want);
}

fn assert_one_line_error(out: &std::process::Output, needle: &str) {
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains(needle), "expected `{needle}` in: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
}

#[test]
fn errors_are_one_line_messages_not_panics() {
    assert_one_line_error(
        &kiln(&["inspect", "/nonexistent/model.kiln"]),
        "cannot read /nonexistent/model.kiln",
    );
    let junk = tmp("junk.kiln");
    std::fs::write(&junk, b"definitely not a model").unwrap();
    assert_one_line_error(
        &kiln(&["inspect", junk.to_str().unwrap()]),
        "artifact is truncated",
    );
    let junk_tflite = tmp("junk.tflite");
    std::fs::write(&junk_tflite, vec![7u8; 64]).unwrap();
    assert_one_line_error(
        &kiln(&[
            "convert",
            junk_tflite.to_str().unwrap(),
            "-o",
            tmp("x.kiln").to_str().unwrap(),
        ]),
        "malformed TFLite model",
    );
    let Some(dir) = common::testdata() else {
        return;
    };
    // A uint8 input array is refused with a hint instead of being guessed at.
    let art = tmp("ic.kiln");
    let model = common::mlperf(&dir, "pretrainedResnet_quant.tflite");
    assert!(kiln(&[
        "convert",
        model.to_str().unwrap(),
        "-o",
        art.to_str().unwrap()
    ])
    .status
    .success());
    let out = kiln(&[
        "run",
        art.to_str().unwrap(),
        "--input",
        dir.join("data/ic01.npz").to_str().unwrap(),
    ]);
    assert_one_line_error(&out, "dtype `u1`");
    // Wrong sample size.
    let out = kiln(&[
        "run",
        art.to_str().unwrap(),
        "--input",
        dir.join("golden/kws_ref_model.npz").to_str().unwrap(),
    ]);
    assert_one_line_error(&out, "not a whole number of samples");
}

#[test]
fn usage_errors_exit_2_and_help_teaches() {
    let out = kiln(&["conver"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("convert"));
    let out = kiln(&["convert", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("bit-exact") && help.contains("--selftest"),
        "{help}"
    );
}
