//! `kiln demo` end to end in a temporary folder: the artifacts exist, load, pass their
//! self-tests, and the int8 model keeps the float model's accuracy.

use kiln::artifact::AlignedBytes;
use kiln::demo::{run, DemoOptions};
use kiln_runtime::{Interpreter, Model};
use std::time::Instant;

#[test]
fn demo_trains_quantizes_and_writes_self_testing_artifacts() {
    let out = std::env::temp_dir().join(format!("kiln-demo-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let t = Instant::now();
    let report = run(&DemoOptions {
        out: out.clone(),
        quiet: true,
        ..Default::default()
    })
    .expect("demo");
    eprintln!(
        "demo: {:.1} s in all ({}), training {:.1} s, candle test accuracy {:.2} %",
        t.elapsed().as_secs_f64(),
        report.seconds,
        report.training.seconds,
        report.training.test_accuracy * 100.0
    );
    eprint!("{}", kiln::demo::render(&report));

    for file in [
        "demo-float.kiln",
        "demo-int8.kiln",
        "demo-fp16.kiln",
        "test.npz",
        "calib.npz",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    assert_eq!(report.artifacts.len(), 3);
    for a in &report.artifacts {
        let bytes = std::fs::read(&a.path).unwrap();
        assert_eq!(bytes.len(), a.artifact_bytes);
        let aligned = AlignedBytes::new(&bytes);
        let model = Model::load(aligned.as_slice())
            .unwrap_or_else(|e| panic!("{}: {e:?}", a.path.display()));
        assert_eq!(model.arena_bytes(), a.arena_bytes);
        let mut arena = AlignedBytes::zeroed(model.arena_bytes());
        let mut interp = Interpreter::new(model, arena.as_mut_slice()).unwrap();
        let r = kiln_runtime::sections::run_self_test(&mut interp).unwrap();
        assert_eq!((r.passed, r.failed), (4, 0), "{}", a.path.display());
        assert!(a.macs > 0);
    }

    // Accuracy, measured again from the files with the test set written next to them.
    let test = out.join("test.npz");
    let x = kiln::npy::read_real(&test, None, None).unwrap();
    let y = kiln::npy::read_labels(&test).unwrap();
    assert_eq!(y.len(), report.test_samples);
    let set = kiln::quantize::pipeline::EvalSet {
        x: &x,
        y: &y,
        metric: kiln::quantize::pipeline::Metric::Top1,
        sha256: String::new(),
    };
    let acc = |precision: &str| {
        let a = report
            .artifacts
            .iter()
            .find(|a| a.precision == precision)
            .unwrap();
        let measured =
            kiln::quantize::pipeline::measure(&std::fs::read(&a.path).unwrap(), &set).unwrap();
        assert_eq!(measured, a.accuracy, "{precision}: reported vs measured");
        measured
    };
    let (float, int8, fp16) = (acc("f32"), acc("int8"), acc("fp16"));
    assert!(int8 >= 0.90, "int8 accuracy {int8}");
    assert!(
        int8 >= float - 0.01,
        "int8 {int8} is more than 1 pt below float {float}"
    );
    assert!(fp16 >= float - 0.01, "fp16 {fp16} vs float {float}");
    // The float artifact is the trained candle model after 15 % magnitude pruning: close to it.
    assert!(
        (float - report.training.test_accuracy).abs() <= 0.05,
        "float artifact {float} vs candle {}",
        report.training.test_accuracy
    );
    let pruning = report.pruning.as_ref().expect("the demo prunes");
    assert!((pruning["sparsity"].as_f64().unwrap() - 0.15).abs() < 0.01);
    assert_eq!(report.int8_layers.len(), 5);
    assert!(report.int8_layers.iter().all(|l| l.precision == "int8"));

    // Lineage: the quantized artifacts name the float artifact's digest.
    let float_sha = &report.artifacts[0].sha256;
    for a in &report.artifacts[1..] {
        let bytes = AlignedBytes::new(&std::fs::read(&a.path).unwrap());
        let model = Model::load(bytes.as_slice()).unwrap();
        let m = model
            .container()
            .section(kiln_runtime::format::SectionKind::Manifest)
            .expect("manifest");
        let (manifest, _): (kiln_runtime::sections::Manifest<'_>, _) =
            postcard::take_from_bytes(m).unwrap();
        let json: serde_json::Value = serde_json::from_str(manifest.json).unwrap();
        assert_eq!(json["source"]["format"], "kiln-demo");
        assert_eq!(json["source"]["sha256"], float_sha.as_str());
    }

    // The fleet: v1 and v2 complete, v3 (self-test fails on the devices) stopped in its first
    // wave, every device back on v2 and never without a verified model.
    let fleet = report.fleet.as_ref().expect("the fleet part ran");
    let states: Vec<_> = fleet.rollouts.iter().map(|r| r.state).collect();
    use kiln::fleet::api::RolloutState::{Aborted, Complete};
    assert_eq!(states, [Complete, Complete, Aborted], "{fleet:?}");
    let v3 = &fleet.rollouts[2];
    assert_eq!(v3.waves[0].gate.passed, Some(false), "{v3:?}");
    assert!(v3.waves[1..].iter().all(|w| w.gate.passed.is_none()));
    assert_eq!(
        fleet.final_versions.get("2"),
        Some(&(kiln::demo_fleet::DEVICES as u64)),
        "{fleet:?}"
    );
    assert!(fleet.selftest_failures > 0);
    let stages: Vec<(u32, &str)> = fleet.stages.iter().map(|(v, s)| (*v, s.as_str())).collect();
    assert_eq!(
        stages,
        [(1, "archived"), (2, "production"), (3, "rejected")],
        "the registry follows the rollouts"
    );
    assert!(fleet.invariant_violations.is_empty(), "{fleet:?}");
    assert!(out.join("demo-signing.pub").is_file());
    let _ = std::fs::remove_dir_all(&out);
}
