//! `kiln bench --target host`: real timings of a real model, as JSON, with the figures
//! consistent with each other and with `kiln inspect`; bad arguments get one clear line.

mod common;

use std::process::Command;

fn kiln(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("run kiln")
}

#[test]
fn bench_reports_median_and_p99_of_a_real_model() {
    let Some(dir) = common::testdata() else {
        return;
    };
    let out = tempfile::tempdir().expect("tempdir");
    let model = out.path().join("kws.kiln");
    let source = common::mlperf(&dir, "kws_ref_model.tflite");
    let convert = kiln(&[
        "convert",
        source.to_str().expect("path"),
        "-o",
        model.to_str().expect("path"),
    ]);
    assert!(convert.status.success(), "{convert:?}");
    for backend in ["portable", "candle"] {
        let run = kiln(&[
            "bench",
            model.to_str().expect("path"),
            "--runs",
            "20",
            "--backend",
            backend,
            "--json",
        ]);
        assert!(run.status.success(), "{run:?}");
        let r: serde_json::Value = serde_json::from_slice(&run.stdout).expect("json");
        let (median, p99, min) = (
            r["median_us"].as_f64().expect("median_us"),
            r["p99_us"].as_f64().expect("p99_us"),
            r["min_us"].as_f64().expect("min_us"),
        );
        eprintln!("KWS {backend}: median {median:.1} us, p99 {p99:.1} us");
        assert!(min > 0.0 && min <= median && median <= p99, "{r}");
        assert_eq!(r["runs"], 20);
        assert_eq!(r["backend"], backend);
        assert_eq!(r["macs"], 2_656_768, "KWS MACs as kiln inspect counts them");
        assert_eq!(r["arena_bytes"], 16_000);
    }
}

#[test]
fn bench_refuses_bad_arguments_with_one_line() {
    let out = tempfile::tempdir().expect("tempdir");
    let missing = out.path().join("missing.kiln");
    let run = kiln(&["bench", missing.to_str().expect("path")]);
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("missing.kiln"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let garbage = out.path().join("garbage.kiln");
    std::fs::write(&garbage, b"KILN not really").expect("write");
    let run = kiln(&["bench", garbage.to_str().expect("path"), "--runs", "0"]);
    assert!(!run.status.success());
    let run = kiln(&["bench", garbage.to_str().expect("path")]);
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!err.contains("panicked"), "{err}");
}
