extern crate std;

use super::dsp::{smlabb, smlad, smlatt};
use super::dsp::{sxtab16, sxtb16, sxtb16_ror8};
use super::output::{OutputStage, Weights};
use super::*;
use crate::graph::{ClampI8, Requant};
use crate::kernels::arch::cases::{acc, case, fc_case, EDGE_ACCS, EDGE_MULTIPLIERS};
use crate::kernels::conv::tests::{clamp, requant, zero_point};
use crate::kernels::conv::{self, ConvGeometry, QuantizedOutput};
use proptest::prelude::*;

/// The bound on accumulators of `taps` products for input zero point `zp`.
fn max_acc(taps: usize, zp: i32) -> i64 {
    Weights::rows(&[], taps, zp).max_acc()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn conv_fast_path_is_bit_exact(c in case(false)) {
        let (fast, want) = c.run_conv(conv2d_i8);
        prop_assert_eq!(fast, want);
    }

    #[test]
    fn depthwise_fast_path_is_bit_exact(c in case(true)) {
        let (fast, want) = c.run_depthwise(depthwise_conv2d_i8);
        prop_assert_eq!(fast, want);
    }

    /// First layers of 1 to 3 channels, whose fields are spread to 4 values a tap: every tap
    /// at the end of the input (read through a copy), padding, strides and dilations.
    #[test]
    fn spread_first_layers_are_bit_exact(c in (1usize..=3, 1usize..=8, 1usize..=9, 1usize..=9, 1usize..=2, 0usize..=1, 1usize..=2)
        .prop_flat_map(|(in_c, out_c, h, w, stride, pad, dilation)| {
            let ext = 2 * dilation + 1;
            let out = |n: usize| (n + 2 * pad).saturating_sub(ext) / stride + 1;
            let (h, w) = (h.max(ext), w.max(ext));
            let g = ConvGeometry {
                batch: 1,
                in_h: h,
                in_w: w,
                in_c,
                out_h: out(h),
                out_w: out(w),
                out_c,
                filter_h: 3,
                filter_w: 3,
                filter_in_c: in_c,
                stride_h: stride,
                stride_w: stride,
                dilation_h: dilation,
                dilation_w: dilation,
                pad_top: pad,
                pad_left: pad,
                depth_multiplier: 1,
            };
            crate::kernels::arch::cases::data(g, false)
        })) {
        let (fast, want) = c.run_conv(conv2d_i8);
        prop_assert_eq!(fast, want);
    }

    /// 3x3 depthwise over rows wider than one strip tile and narrow ones, over more rows than
    /// one tile holds, both strides.
    #[test]
    fn depthwise_3x3_strip_tiles_are_bit_exact(c in (1usize..=4, prop_oneof![1usize..=3, 8usize..=14], prop_oneof![1usize..=12, 28usize..=60, 120usize..=300], 1usize..=2, 0usize..=1)
        .prop_flat_map(|(groups, h, w, stride, pad)| {
            let out = |n: usize| (n + 2 * pad).saturating_sub(3) / stride + 1;
            let g = ConvGeometry {
                batch: 1,
                in_h: h + 2,
                in_w: w + 2,
                in_c: 4 * groups,
                out_h: out(h + 2),
                out_w: out(w + 2),
                out_c: 4 * groups,
                filter_h: 3,
                filter_w: 3,
                filter_in_c: 1,
                stride_h: stride,
                stride_w: stride,
                dilation_h: 1,
                dilation_w: 1,
                pad_top: pad,
                pad_left: pad,
                depth_multiplier: 1,
            };
            crate::kernels::arch::cases::data(g, true)
        })) {
        let (fast, want) = c.run_depthwise(depthwise_conv2d_i8);
        prop_assert_eq!(fast, want);
    }

    #[test]
    fn fully_connected_fast_path_is_bit_exact(c in fc_case()) {
        let (fast, want) = c.run(fully_connected_i8);
        prop_assert_eq!(fast, want);
    }

    #[test]
    fn requantize_matches_portable(
        acc in acc(),
        r in prop_oneof![
            requant(),
            (any::<i32>(), -31i32..=2).prop_map(|(multiplier, shift)| Requant { multiplier, shift }),
            (-31i32..=0).prop_map(|shift| Requant { multiplier: i32::MIN, shift }),
        ],
        zp in zero_point(),
        clamp in clamp(),
    ) {
        prop_assert_eq!(requantize(acc, r, zp, clamp), conv::requantize(acc, r, zp, clamp));
    }

    #[test]
    fn add_sub_is_bit_exact(
        sub in any::<bool>(),
        scales in (-12.0f32..=2.0, -12.0f32..=2.0, -3.0f32..=6.0)
            .prop_map(|(a, b, d)| [a, b, a.max(b) + d]),
        zps in proptest::array::uniform3(zero_point()),
        clamp in clamp(),
        data in (256usize..=700).prop_flat_map(|n| {
            (proptest::collection::vec(any::<i8>(), n), proptest::collection::vec(any::<i8>(), n))
        }),
    ) {
        let [s0, s1, so] = scales.map(f32::exp2);
        let p = crate::kernels::quantize::add_params(s0, s1, so, clamp);
        let (a, b) = data;
        let mut got = std::vec![0i8; a.len()];
        // TFLM-shaped parameters with an output scale up to 64x the inputs' fit: the whole
        // tensor is done here.
        prop_assert_eq!(add_sub_i8(sub, &p, zps, &a, &b, &mut got), a.len());
        let rescale = |v: i8, zp: i32, r: Requant| {
            let v = (i32::from(v) - zp).wrapping_mul(1 << p.left_shift);
            crate::quant::multiply_by_quantized_multiplier_smaller_than_one(v, r.multiplier, r.shift)
        };
        for ((&g, &x), &y) in got.iter().zip(&a).zip(&b) {
            let (x, y) = (rescale(x, zps[0], p.input0), rescale(y, zps[1], p.input1));
            let raw = if sub { x.wrapping_sub(y) } else { x.wrapping_add(y) };
            let want = conv::requantize(raw, p.output, zps[2], clamp);
            prop_assert_eq!(g, want);
        }
    }

    #[test]
    fn channel_matches_portable(
        taps in prop_oneof![1usize..=16, 1usize..=2_560],
        in_zp in prop_oneof![zero_point(), -32_640i32..=32_639],
        frac in -1.0f64..=1.0,
        bias in prop_oneof![Just(None), (-1i32 << 24..=1 << 24).prop_map(Some), any::<i32>().prop_map(Some)],
        r in prop_oneof![
            requant(),
            (any::<i32>(), -31i32..=30).prop_map(|(multiplier, shift)| Requant { multiplier, shift }),
        ],
        zp in prop_oneof![zero_point(), any::<i32>()],
        clamp in clamp(),
    ) {
        // Any accumulator the kernel can produce for `taps` products; when the channel is
        // decoded, its output stage is TFLM's.
        let max = max_acc(taps, in_zp);
        let acc = (max as f64 * frac) as i32;
        let b = bias.map(|b| [b]);
        let rq = [r];
        let q = QuantizedOutput {
            input_zero_point: in_zp,
            filter_zero_point: 0,
            output_zero_point: zp,
            requant: &rq,
            clamp,
        };
        if let Some(ch) = Channel::bounded(0, b.as_ref().map(|b| &b[..]), &q, max) {
            let want = conv::requantize(acc.wrapping_add(bias.unwrap_or(0)), r, zp, clamp);
            prop_assert_eq!(ch.apply(acc, OutputStage::new(&q)), want);
            prop_assert_eq!(ch.apply(-acc, OutputStage::new(&q)),
                conv::requantize((-acc).wrapping_add(bias.unwrap_or(0)), r, zp, clamp));
        }
    }
}

/// The fast output stage takes every channel of the shapes real models have (so the kernels
/// above run it, not their portable fallback), and is exact on ties and extremes.
#[test]
fn channel_fits_usual_layers_and_is_exact_at_the_edges() {
    let full = ClampI8 {
        min: -128,
        max: 127,
    };
    for taps in [1, 9, 27, 40, 64, 576, 640, 1_280] {
        for shift in -21..=2 {
            for m in [1 << 30, (1 << 30) + 1, i32::MAX] {
                for zp in [-128, 0, 127] {
                    let rq = [Requant {
                        multiplier: m,
                        shift,
                    }];
                    let q = QuantizedOutput {
                        input_zero_point: -128,
                        filter_zero_point: 0,
                        output_zero_point: zp,
                        requant: &rq,
                        clamp: full,
                    };
                    let max = max_acc(taps, -128);
                    let bias = [1 << 20];
                    let ch = Channel::bounded(0, Some(&bias), &q, max);
                    let ch = ch.unwrap_or_else(|| panic!("taps {taps} shift {shift} zp {zp}"));
                    // Ties of the rounding shift and the largest accumulators.
                    let r = (-shift).max(0);
                    let tie = if r > 0 { 1i64 << (r - 1) } else { 0 };
                    let accs = [
                        max,
                        -max,
                        0,
                        1,
                        -1,
                        tie,
                        -tie,
                        tie + 1,
                        -tie - 1,
                        3 * tie,
                        -3 * tie,
                    ];
                    for acc in accs.map(|a| a.clamp(-max, max) as i32) {
                        for a in [acc, acc - (1 << 20), acc.wrapping_sub(1 << 20)] {
                            if i64::from(a).abs() > max {
                                continue;
                            }
                            let want = conv::requantize(a + (1 << 20), rq[0], zp, full);
                            assert_eq!(
                                ch.apply(a, OutputStage::new(&q)),
                                want,
                                "acc {a} m {m} shift {shift} zp {zp}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Dead filters as quantizers leave them (VWW has them: a bias of 2^30 with a shift of -27 to
/// -31, or a multiplier of 0) decode to constant channels, exact over every accumulator.
#[test]
fn dead_channels_are_constant_and_exact() {
    let clamp = ClampI8 {
        min: -128,
        max: 127,
    };
    let max = max_acc(256, -128);
    for (m, shift, b) in [
        (0, 0, 1 << 30),
        (0, 0, 12_345),
        (1_500_000_000, -27, 1 << 30),
        (1_073_741_824, -31, (1 << 30) + 128),
        (2_000_000_000, -29, -(1 << 30)),
    ] {
        for zp in [-128, -3, 100] {
            let rq = [Requant {
                multiplier: m,
                shift,
            }];
            let q = QuantizedOutput {
                input_zero_point: -128,
                filter_zero_point: 0,
                output_zero_point: zp,
                requant: &rq,
                clamp,
            };
            let ch = Channel::bounded(0, Some(&[b]), &q, max);
            let ch = ch.unwrap_or_else(|| panic!("m {m} shift {shift} bias {b}"));
            for acc in (-max..=max).step_by(4_099).chain([max]) {
                let want = conv::requantize(acc as i32 + b, rq[0], zp, clamp);
                assert_eq!(ch.apply(acc as i32, OutputStage::new(&q)), want);
            }
        }
    }
    // Not constant over its accumulators and outside the bounds: refused.
    let rq = [Requant {
        multiplier: 1,
        shift: 0,
    }];
    let q = QuantizedOutput {
        input_zero_point: 0,
        filter_zero_point: 0,
        output_zero_point: 0,
        requant: &rq,
        clamp,
    };
    assert!(Channel::bounded(0, Some(&[1 << 30]), &q, max).is_none());
    // ... unless its own weights bound it: a dead filter's accumulator is 0.
    let filter = [3i8, -7, 0, 0, 0, 0];
    let w = Weights::rows(&filter, 2, 0);
    assert!(Channel::new(0, Some(&[1 << 30, 1 << 30, 1 << 30]), &q, &w).is_none());
    let ch = Channel::new(1, Some(&[1 << 30, 1 << 30, 1 << 30]), &q, &w);
    let want = conv::requantize(1 << 30, rq[0], 0, clamp);
    assert_eq!(ch.map(|c| c.apply(0, OutputStage::new(&q))), Some(want));
}

#[test]
fn requantize_ties_and_extremes() {
    let full = ClampI8 {
        min: -128,
        max: 127,
    };
    for m in EDGE_MULTIPLIERS {
        for acc in EDGE_ACCS {
            for shift in -31..=1 {
                let r = Requant {
                    multiplier: m,
                    shift,
                };
                assert_eq!(
                    requantize(acc, r, 0, full),
                    conv::requantize(acc, r, 0, full),
                    "acc {acc} m {m} shift {shift}"
                );
            }
        }
    }
}

#[test]
fn emulated_primitives_match_the_manual() {
    // SXTB16 / ROR 8 on bytes 0x80 0x7f 0xff 0x01 (little-endian word 0x01ff7f80).
    let w = 0x01ff_7f80u32;
    assert_eq!(sxtb16(w), 0xffff_ff80); // [-128, -1]
    assert_eq!(sxtb16_ror8(w), 0x0001_007f); // [127, 1]
    assert_eq!(sxtab16(offset_pair(128), w), 0x007f_0000); // [0, 127]
    assert_eq!(smlad(0x0002_0003, 0xffff_0005, 10), 10 + 15 - 2);
    assert_eq!(smlabb(0x0002_0003, 0xffff_0005, 1), 16);
    assert_eq!(smlatt(0x0002_0003, 0xffff_0005, 1), -1);
}
