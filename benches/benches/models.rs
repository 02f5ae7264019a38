//! One inference of each MLPerf Tiny int8 model on the host, single thread, portable kernels.
//! Run: `cargo bench -p kiln-benches --bench models`.

use criterion::{criterion_group, criterion_main, Criterion};
use kiln::artifact::AlignedBytes;
use kiln_runtime::{Interpreter, Model};

fn models(c: &mut Criterion) {
    let mut group = c.benchmark_group("int8_inference");
    for (name, file) in [
        ("kws", "kws_ref_model.tflite"),
        ("resnet8", "pretrainedResnet_quant.tflite"),
        ("vww", "vww_96_int8.tflite"),
        ("ad", "ad01_int8.tflite"),
    ] {
        let Some(artifact) = kiln_benches::convert(file) else {
            eprintln!("skipped {name}: test data not found (set KILN_TESTDATA)");
            continue;
        };
        let bytes = AlignedBytes::new(&artifact);
        let model = Model::load(bytes.as_slice()).expect("valid artifact");
        let mut arena = AlignedBytes::zeroed(model.arena_bytes());
        let mut interp = Interpreter::new(model, arena.as_mut_slice()).expect("arena");
        group.bench_function(name, |b| b.iter(|| interp.invoke().expect("invoke")));
    }
    group.finish();
}

criterion_group!(benches, models);
criterion_main!(benches);
