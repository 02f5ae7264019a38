//! How long `kiln quantize` takes: ResNet-8 (float TFLite) to int8 with 100 calibration samples
//! (calibration, quantization, lowering, self-tests and baseline; no evaluation set).
//! Run: `cargo bench -p kiln-benches --bench quantize`.

use criterion::{criterion_group, criterion_main, Criterion};
use kiln::npy::{read_real, Array};
use kiln::quantize::pipeline::{quantize, Precision, Request};

fn quantize_resnet8(c: &mut Criterion) {
    let Some(dir) = kiln_benches::testdata() else {
        eprintln!("skipped: test data not found (set KILN_TESTDATA)");
        return;
    };
    let model = dir.join("models/mlperf-tiny/pretrainedResnet.tflite");
    let Array::F32 { data, .. } = read_real(&dir.join("data/ic01.npz"), None, None).expect("ic01")
    else {
        panic!("float samples expected")
    };
    let calib = Array::F32 {
        shape: vec![100, 32, 32, 3],
        data: data[..100 * 3072].to_vec(),
    };
    let (graph, _, _) = kiln::import::import_file(&model).expect("import");
    let mut group = c.benchmark_group("quantize");
    group.sample_size(10);
    group.bench_function("resnet8_int8_100_samples", |b| {
        b.iter(|| {
            let req = Request {
                selftest_count: 4,
                ..Request::new("resnet8", graph.clone(), &calib, Precision::Int8)
            };
            quantize(req, |_, _, _| {}).expect("quantize")
        })
    });
    group.finish();
}

criterion_group!(benches, quantize_resnet8);
criterion_main!(benches);
