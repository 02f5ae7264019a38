//! Per-kernel latency on shapes taken from the MLPerf Tiny models: each int8 kernel as it
//! dispatches on this machine (`fast`: the x86-64 AVX2 / AVX-512 VNNI or aarch64 NEON fast path
//! where the CPU has one, see `kernels::arch::active`) beside its portable body (`portable`).
//! Run: `cargo bench -p kiln-benches --bench kernels`.

use criterion::{criterion_group, criterion_main, Criterion};
use kiln_runtime::graph::{ClampI8, Requant};
use kiln_runtime::kernels::conv::{conv2d_i8, conv2d_i8_portable, ConvGeometry, QuantizedOutput};
use kiln_runtime::kernels::depthwise::{depthwise_conv2d_i8, depthwise_conv2d_i8_portable};
use kiln_runtime::kernels::fully_connected::{
    fully_connected_i8, fully_connected_i8_portable, FullyConnectedGeometry,
};
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
    let fast = kiln_runtime::kernels::arch::active();
    let mut g = c.benchmark_group("conv2d_i8/kws_pointwise_1x1x64");
    g.bench_function(format!("fast ({fast})"), |b| {
        b.iter(|| conv2d_i8(&pw, &q, black_box(&input), &filter, Some(&bias), &mut out))
    });
    g.bench_function("portable", |b| {
        b.iter(|| conv2d_i8_portable(&pw, &q, black_box(&input), &filter, Some(&bias), &mut out))
    });
    g.finish();
    // ResNet-8 first residual block conv: 32x32x16 -> 32x32x16, 3x3, SAME.
    let r8 = ConvGeometry {
        in_h: 32,
        in_w: 32,
        in_c: 16,
        out_h: 32,
        out_w: 32,
        out_c: 16,
        filter_h: 3,
        filter_w: 3,
        filter_in_c: 16,
        pad_top: 1,
        pad_left: 1,
        ..pw
    };
    let (r8_in, r8_filter) = (pattern(32 * 32 * 16, 6), pattern(16 * 9 * 16, 7));
    let r8_q = QuantizedOutput {
        requant: &requant[..16],
        ..q
    };
    let mut r8_out = vec![0i8; 32 * 32 * 16];
    let mut g = c.benchmark_group("conv2d_i8/resnet8_3x3x16x16");
    g.bench_function(format!("fast ({fast})"), |b| {
        b.iter(|| {
            conv2d_i8(
                &r8,
                &r8_q,
                black_box(&r8_in),
                &r8_filter,
                Some(&bias[..16]),
                &mut r8_out,
            )
        })
    });
    g.bench_function("portable", |b| {
        b.iter(|| {
            conv2d_i8_portable(
                &r8,
                &r8_q,
                black_box(&r8_in),
                &r8_filter,
                Some(&bias[..16]),
                &mut r8_out,
            )
        })
    });
    g.finish();
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
    let mut g = c.benchmark_group("depthwise_i8/kws_3x3x64");
    g.bench_function(format!("fast ({fast})"), |b| {
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
    g.bench_function("portable", |b| {
        b.iter(|| {
            depthwise_conv2d_i8_portable(
                &dw,
                &q,
                black_box(&input),
                &dw_filter,
                Some(&bias),
                &mut out,
            )
        })
    });
    g.finish();
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
    let mut g = c.benchmark_group("fully_connected_i8/ad_640x128");
    g.bench_function(format!("fast ({fast})"), |b| {
        b.iter(|| fully_connected_i8(&fc, &fq, black_box(&fin), &fw, Some(&fb), &mut fout))
    });
    g.bench_function("portable", |b| {
        b.iter(|| fully_connected_i8_portable(&fc, &fq, black_box(&fin), &fw, Some(&fb), &mut fout))
    });
    g.finish();
}

criterion_group!(benches, kernels);
criterion_main!(benches);
