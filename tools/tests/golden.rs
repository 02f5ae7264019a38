//! Bit-exactness with TFLM: every MLPerf Tiny int8 model, converted by `kiln convert` and run by
//! kiln-runtime, must reproduce the outputs of TFLM's reference kernels on 100 % of the golden
//! samples. Also checks that the planned arena stays within 10 % of the liveness lower bound.

mod common;

use kiln::npy::{read_npz_i8, Array};
use kiln::runner::{run_batch, Outputs};

struct Case {
    model: &'static str,
    golden: &'static str,
    samples: usize,
    /// The activation-liveness lower bound stated in the issue.
    lower_bound: usize,
}

const CASES: [Case; 4] = [
    Case {
        model: "kws_ref_model.tflite",
        golden: "kws_ref_model.npz",
        samples: 1000,
        lower_bound: 16_000,
    },
    Case {
        model: "pretrainedResnet_quant.tflite",
        golden: "pretrainedResnet_quant.npz",
        samples: 200,
        lower_bound: 49_152,
    },
    Case {
        model: "vww_96_int8.tflite",
        golden: "vww_96_int8.npz",
        samples: 500,
        lower_bound: 55_296,
    },
    Case {
        model: "ad01_int8.tflite",
        golden: "ad01_int8.npz",
        samples: 240,
        lower_bound: 768,
    },
];

fn check(case: &Case) {
    let Some(dir) = common::testdata() else {
        return;
    };
    let source = std::fs::read(common::mlperf(&dir, case.model)).expect("read model");
    let converted = kiln::convert::convert_tflite(&source, case.model).expect("convert");
    let report = kiln::inspect::inspect(&converted.artifact).expect("inspect");
    assert!(
        report.arena_bytes as f64 <= case.lower_bound as f64 * 1.10,
        "{}: arena {} is more than 10 % above the lower bound {}",
        case.model,
        report.arena_bytes,
        case.lower_bound
    );
    assert_eq!(
        converted.lowered.liveness_lower_bound, case.lower_bound,
        "{}: liveness lower bound",
        case.model
    );

    let golden = dir.join("golden").join(case.golden);
    let (in_shape, input) = read_npz_i8(&golden, "input").expect("golden input");
    let (out_shape, expected) = read_npz_i8(&golden, "output").expect("golden output");
    assert_eq!(in_shape[0], case.samples);
    let result = run_batch(
        &converted.artifact,
        &Array::I8 {
            shape: in_shape,
            data: input,
        },
        |_| {},
    )
    .expect("run");
    assert_eq!(result.shape, out_shape);
    let Outputs::I8(got) = result.outputs else {
        panic!("{}: int8 model gave non-int8 outputs", case.model)
    };
    let per = expected.len() / case.samples;
    let mismatched: Vec<usize> = (0..case.samples)
        .filter(|&s| got[s * per..(s + 1) * per] != expected[s * per..(s + 1) * per])
        .collect();
    assert!(
        mismatched.is_empty(),
        "{}: {} of {} samples differ from TFLM (first: {:?})",
        case.model,
        mismatched.len(),
        case.samples,
        &mismatched[..mismatched.len().min(10)]
    );
    eprintln!(
        "{}: {} of {} samples bit-exact with TFLM, arena {} B",
        case.model, case.samples, case.samples, report.arena_bytes
    );
}

#[test]
fn kws_is_bit_exact_with_tflm() {
    check(&CASES[0]);
}

#[test]
fn resnet8_is_bit_exact_with_tflm() {
    check(&CASES[1]);
}

#[test]
fn vww_is_bit_exact_with_tflm() {
    check(&CASES[2]);
}

#[test]
fn anomaly_detection_is_bit_exact_with_tflm() {
    check(&CASES[3]);
}
