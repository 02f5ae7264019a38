//! Per-kernel latency of the portable int8 bodies on shapes taken from the MLPerf Tiny models.
//! Run: `cargo bench -p kiln-benches --bench kernels`.

use criterion::{criterion_group, criterion_main, Criterion};
use kiln_runtime::graph::{ClampI8, Requant};
use kiln_runtime::kernels::conv::{conv2d_i8, ConvGeometry, QuantizedOutput};
use kiln_runtime::kernels::depthwise::depthwise_conv2d_i8;
use kiln_runtime::kernels::fully_connected::{fully_connected_i8, FullyConnectedGeometry};
use std::hint::black_box;

fn pattern(n: usize, seed: u32) -> Vec<i8> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (s >> 24) as i8
        })
        .collect()
}

fn kernels(c: &mut Criterion) {
    let requant = vec![
        Requant {
            multiplier: 1 << 30,
            shift: -8
        };
        64
    ];
    let q = QuantizedOutput {
        input_zero_point: -3,
        filter_zero_point: 0,
        output_zero_point: 5,
        requant: &requant,
        clamp: ClampI8::default(),
    };
    // KWS pointwise conv: 25x5x64 -> 25x5x64, 1x1.
    let pw = ConvGeometry {
        batch: 1,
        in_h: 25,
        in_w: 5,
        in_c: 64,
        out_h: 25,
        out_w: 5,
        out_c: 64,
        filter_h: 1,
        filter_w: 1,
        filter_in_c: 64,
        stride_h: 1,
        stride_w: 1,
        dilation_h: 1,
        dilation_w: 1,
        pad_top: 0,
        pad_left: 0,
        depth_multiplier: 1,
    };
    let (input, filter, bias) = (
        pattern(25 * 5 * 64, 1),
        pattern(64 * 64, 2),
        vec![100i32; 64],
    );
    let mut out = vec![0i8; 25 * 5 * 64];
    c.bench_function("conv2d_i8/kws_pointwise_1x1x64", |b| {
        b.iter(|| conv2d_i8(&pw, &q, black_box(&input), &filter, Some(&bias), &mut out))
    });
    // KWS depthwise: 25x5x64, 3x3, SAME.
    let dw = ConvGeometry {
        filter_h: 3,
        filter_w: 3,
        filter_in_c: 1,
        pad_top: 1,
        pad_left: 1,
        ..pw
    };
    let dw_filter = pattern(9 * 64, 3);
    c.bench_function("depthwise_i8/kws_3x3x64", |b| {
        b.iter(|| {
            depthwise_conv2d_i8(
                &dw,
                &q,
                black_box(&input),
                &dw_filter,
                Some(&bias),
                &mut out,
            )
        })
    });
    // AD fully connected: 640 -> 128.
    let fc = FullyConnectedGeometry {
        batch: 1,
        in_features: 640,
        out_features: 128,
    };
    let fc_requant = [Requant {
        multiplier: 1 << 30,
        shift: -8,
    }];
    let fq = QuantizedOutput {
        requant: &fc_requant,
        ..q
    };
    let (fin, fw, fb) = (pattern(640, 4), pattern(640 * 128, 5), vec![0i32; 128]);
    let mut fout = vec![0i8; 128];
    c.bench_function("fully_connected_i8/ad_640x128", |b| {
        b.iter(|| fully_connected_i8(&fc, &fq, black_box(&fin), &fw, Some(&fb), &mut fout))
    });
}

criterion_group!(benches, kernels);
criterion_main!(benches);
