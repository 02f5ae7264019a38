//! DEPTHWISE_CONV_2D: NHWC activations, filter `[1, filter_h, filter_w, out_c]` with
//! `out_c = in_c * depth_multiplier`; output channel `oc = ic * depth_multiplier + m` reads only
//! input channel `ic`.
//!
//! The int8 body follows TFLM's reference `integer_ops/depthwise_conv.h` exactly (same per-output
//! sum, bias, requantization, zero point and clamp as CONV_2D). Both bodies walk one output pixel
//! at a time and keep up to `CHUNK` output-channel accumulators on the stack, so each in-image
//! tap is one pass over a contiguous filter row (and, for `depth_multiplier == 1`, a contiguous
//! input row).

use super::conv::{requantize, tap_range, ConvGeometry, QuantizedOutput};
use crate::graph::Activation;
use crate::kernels::{activate, Float};

/// Output channels accumulated together (stack accumulators: 256 bytes).
const CHUNK: usize = 64;

/// Checks the slice lengths against the geometry (debug builds only).
#[inline(always)]
fn debug_check<A, F, B, O>(
    g: &ConvGeometry,
    input: &[A],
    filter: &[F],
    bias: Option<&[B]>,
    output: &[O],
) {
    debug_assert!(g.stride_h >= 1 && g.stride_w >= 1 && g.dilation_h >= 1 && g.dilation_w >= 1);
    debug_assert!(g.depth_multiplier >= 1 && g.out_c == g.in_c * g.depth_multiplier);
    debug_assert_eq!(input.len(), g.batch * g.in_h * g.in_w * g.in_c);
    debug_assert_eq!(filter.len(), g.filter_h * g.filter_w * g.out_c);
    debug_assert!(bias.is_none_or(|b| b.len() == g.out_c));
    debug_assert_eq!(output.len(), g.batch * g.out_h * g.out_w * g.out_c);
}

/// Adds one tap's contribution to the accumulators of output channels `oc0 .. oc0 + acc.len()`:
/// `acc[j] += mac(input_px[(oc0 + j) / dm], filter_row[j])`.
#[inline(always)]
fn accumulate_tap<A: Copy, W: Copy, Acc>(
    acc: &mut [Acc],
    input_px: &[A],
    filter_row: &[W],
    oc0: usize,
    dm: usize,
    mac: impl Fn(&mut Acc, A, W),
) {
    if dm == 1 {
        let x = &input_px[oc0..][..acc.len()];
        for ((a, &x), &w) in acc.iter_mut().zip(x).zip(filter_row) {
            mac(a, x, w);
        }
    } else {
        let (mut ic, mut m) = (oc0 / dm, oc0 % dm);
        for (a, &w) in acc.iter_mut().zip(filter_row) {
            mac(a, input_px[ic], w);
            m += 1;
            if m == dm {
                m = 0;
                ic += 1;
            }
        }
    }
}

/// Runs `body(acc, out_base, oc0)` for every output pixel and channel chunk after summing the
/// in-image taps into `acc` (`acc.len()` channels starting at `oc0`; the pixel's output starts at
/// `out_base`).
#[inline(always)]
fn for_each_chunk<A: Copy, W: Copy, Acc: Copy>(
    g: &ConvGeometry,
    input: &[A],
    filter: &[W],
    zero: Acc,
    mac: impl Fn(&mut Acc, A, W) + Copy,
    mut body: impl FnMut(&[Acc], usize, usize),
) {
    let dm = g.depth_multiplier;
    let mut out_base = 0;
    for b in 0..g.batch {
        for oy in 0..g.out_h {
            let in_y0 = (oy * g.stride_h) as isize - g.pad_top as isize;
            let (fy0, fy1) = tap_range(in_y0, g.dilation_h, g.filter_h, g.in_h);
            for ox in 0..g.out_w {
                let in_x0 = (ox * g.stride_w) as isize - g.pad_left as isize;
                let (fx0, fx1) = tap_range(in_x0, g.dilation_w, g.filter_w, g.in_w);
                let mut oc0 = 0;
                while oc0 < g.out_c {
                    let n = core::cmp::min(CHUNK, g.out_c - oc0);
                    let mut acc_buf = [zero; CHUNK];
                    let acc = &mut acc_buf[..n];
                    for fy in fy0..fy1 {
                        let iy = (in_y0 + (g.dilation_h * fy) as isize) as usize;
                        let in_row = (b * g.in_h + iy) * g.in_w;
                        for fx in fx0..fx1 {
                            let ix = (in_x0 + (g.dilation_w * fx) as isize) as usize;
                            let input_px = &input[(in_row + ix) * g.in_c..][..g.in_c];
                            let filter_row = &filter[(fy * g.filter_w + fx) * g.out_c + oc0..][..n];
                            accumulate_tap(acc, input_px, filter_row, oc0, dm, mac);
                        }
                    }
                    body(acc, out_base, oc0);
                    oc0 += n;
                }
                out_base += g.out_c;
            }
        }
    }
}

/// int8 DEPTHWISE_CONV_2D (TFLM reference arithmetic, bit-exact).
///
/// `input` is `[batch, in_h, in_w, in_c]`, `filter` `[1, filter_h, filter_w, out_c]` (symmetric:
/// `q.filter_zero_point` must be 0 and is ignored), `bias` `[out_c]`, `output`
/// `[batch, out_h, out_w, out_c]`, with `out_c = in_c * g.depth_multiplier` (`g.filter_in_c` is
/// 1 and unused).
///
/// Accumulator bound: each term is `filter * (input - input_zero_point)`, at most
/// `128 * 255 = 32640` in magnitude, so `|acc| <= 32640 * filter_h * filter_w`, which fits `i32`
/// for windows of up to 65 793 taps. Beyond that (and for the bias add) the sums wrap, as
/// TFLM's do, rather than panic.
///
/// On Cortex-M4/M7 (the `dsp` target feature) this runs the DSP fast path of
/// [`super::arch::cortex_m`], which is bit-exact with the portable body; elsewhere, or with the
/// `portable-kernels` feature, the portable body.
pub fn depthwise_conv2d_i8(
    g: &ConvGeometry,
    q: &QuantizedOutput<'_>,
    input: &[i8],
    filter: &[i8],
    bias: Option<&[i32]>,
    output: &mut [i8],
) {
    #[cfg(kiln_dsp_kernels)]
    super::arch::cortex_m::depthwise_conv2d_i8(g, q, input, filter, bias, output);
    #[cfg(kiln_neon_kernels)]
    super::arch::aarch64::depthwise_conv2d_i8(g, q, input, filter, bias, output);
    #[cfg(kiln_x86_kernels)]
    super::arch::x86_64::depthwise_conv2d_i8(g, q, input, filter, bias, output);
    #[cfg(not(any(kiln_dsp_kernels, kiln_neon_kernels, kiln_x86_kernels)))]
    depthwise_conv2d_i8_portable(g, q, input, filter, bias, output);
}

/// The portable body of [`depthwise_conv2d_i8`], on every target. Fast paths are tested byte for
/// byte against it.
pub fn depthwise_conv2d_i8_portable(
    g: &ConvGeometry,
    q: &QuantizedOutput<'_>,
    input: &[i8],
    filter: &[i8],
    bias: Option<&[i32]>,
    output: &mut [i8],
) {
    debug_check(g, input, filter, bias, output);
    debug_assert!(q.requant.len() == 1 || q.requant.len() == g.out_c);
    debug_assert_eq!(q.filter_zero_point, 0);
    let input_offset = -q.input_zero_point;
    let per_channel = q.requant.len() > 1;
    let mac = move |a: &mut i32, x: i8, w: i8| {
        *a = a.wrapping_add((i32::from(x) + input_offset) * i32::from(w));
    };
    for_each_chunk(g, input, filter, 0i32, mac, |acc, out_base, oc0| {
        let out = &mut output[out_base + oc0..][..acc.len()];
        for (j, (o, &a)) in out.iter_mut().zip(acc).enumerate() {
            let oc = oc0 + j;
            let a = match bias {
                Some(bias) => a.wrapping_add(bias[oc]),
                None => a,
            };
            let r = if per_channel {
                q.requant[oc]
            } else {
                q.requant[0]
            };
            *o = requantize(a, r, q.output_zero_point, q.clamp);
        }
    });
}

/// Float DEPTHWISE_CONV_2D (f32 or f16 storage, f32 arithmetic): the loop nest of
/// [`depthwise_conv2d_i8`] with `sum(input * filter) + bias`, then the fused `activation`. Only
/// the final store rounds (to f16 for f16 storage).
pub fn depthwise_conv2d_float<T: Float>(
    g: &ConvGeometry,
    activation: Activation,
    input: &[T],
    filter: &[T],
    bias: Option<&[T]>,
    output: &mut [T],
) {
    debug_check(g, input, filter, bias, output);
    let mac = |a: &mut f32, x: T, w: T| *a += x.to_f32() * w.to_f32();
    for_each_chunk(g, input, filter, 0.0f32, mac, |acc, out_base, oc0| {
        let out = &mut output[out_base + oc0..][..acc.len()];
        for (j, (o, &a)) in out.iter_mut().zip(acc).enumerate() {
            let a = match bias {
                Some(bias) => a + bias[oc0 + j].to_f32(),
                None => a,
            };
            *o = T::from_f32(activate(a, activation));
        }
    });
}

/// Multiply-accumulates of one DEPTHWISE_CONV_2D invocation (for reports): every filter tap of
/// every output element, padding taps included (`batch * out_h * out_w * out_c * filter_h *
/// filter_w`), saturating at `u64::MAX`.
pub fn depthwise_conv2d_macs(g: &ConvGeometry) -> u64 {
    [g.batch, g.out_h, g.out_w, g.out_c, g.filter_h, g.filter_w]
        .iter()
        .fold(1u64, |m, &d| m.saturating_mul(d as u64))
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use crate::graph::{ClampI8, Requant};
    use crate::kernels::conv::tests::{
        activate_f64, activation, assert_close_f16, assert_close_f32, axis, clamp, float_data,
        from_f16, materialize_padded, reference_output, requants, to_f16, zero_point,
    };
    use half::f16;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use std::vec::Vec;

    fn geometry(max_in_c: usize) -> impl Strategy<Value = ConvGeometry> {
        (1usize..=2, axis(2), axis(2), 1usize..=max_in_c, 1usize..=3).prop_map(
            |(batch, h, w, in_c, dm)| ConvGeometry {
                batch,
                in_h: h.input,
                in_w: w.input,
                in_c,
                out_h: h.output,
                out_w: w.output,
                out_c: in_c * dm,
                filter_h: h.filter,
                filter_w: w.filter,
                filter_in_c: 1,
                stride_h: h.stride,
                stride_w: w.stride,
                dilation_h: h.dilation,
                dilation_w: w.dilation,
                pad_top: h.pad,
                pad_left: w.pad,
                depth_multiplier: dm,
            },
        )
    }

    fn input_len(g: &ConvGeometry) -> usize {
        g.batch * g.in_h * g.in_w * g.in_c
    }

    fn output_len(g: &ConvGeometry) -> usize {
        g.batch * g.out_h * g.out_w * g.out_c
    }

    /// Naive depthwise conv over the zero-point-padded input, in i64, iterating input channel and
    /// multiplier explicitly.
    fn reference_i8(
        g: &ConvGeometry,
        q: &QuantizedOutput<'_>,
        input: &[i8],
        filter: &[i8],
        bias: Option<&[i32]>,
    ) -> Vec<i8> {
        let zp = q.input_zero_point;
        let widened: Vec<i32> = input.iter().map(|&v| i32::from(v)).collect();
        let (padded, ph, pw) = materialize_padded(g, &widened, zp);
        let mut out = std::vec![0i8; output_len(g)];
        for b in 0..g.batch {
            for oy in 0..g.out_h {
                for ox in 0..g.out_w {
                    for ic in 0..g.in_c {
                        for m in 0..g.depth_multiplier {
                            let oc = ic * g.depth_multiplier + m;
                            let mut acc: i64 = 0;
                            for fy in 0..g.filter_h {
                                for fx in 0..g.filter_w {
                                    let py = oy * g.stride_h + fy * g.dilation_h;
                                    let px = ox * g.stride_w + fx * g.dilation_w;
                                    let v = padded[((b * ph + py) * pw + px) * g.in_c + ic];
                                    let w = filter[(fy * g.filter_w + fx) * g.out_c + oc];
                                    acc += i64::from(w) * i64::from(v - zp);
                                }
                            }
                            acc += bias.map_or(0, |b| i64::from(b[oc]));
                            let r = q.requant[if q.requant.len() == 1 { 0 } else { oc }];
                            out[((b * g.out_h + oy) * g.out_w + ox) * g.out_c + oc] =
                                reference_output(acc, r, q.output_zero_point, q.clamp);
                        }
                    }
                }
            }
        }
        out
    }

    /// Naive float depthwise conv in f64 with per-tap signed bounds tests.
    fn reference_f64(
        g: &ConvGeometry,
        act: Activation,
        input: &[f32],
        filter: &[f32],
        bias: Option<&[f32]>,
    ) -> Vec<f64> {
        let mut out = Vec::new();
        for b in 0..g.batch {
            for oy in 0..g.out_h {
                for ox in 0..g.out_w {
                    for oc in 0..g.out_c {
                        let ic = oc / g.depth_multiplier;
                        let mut acc = 0.0f64;
                        for fy in 0..g.filter_h {
                            for fx in 0..g.filter_w {
                                let iy =
                                    (oy * g.stride_h + fy * g.dilation_h) as i64 - g.pad_top as i64;
                                let ix = (ox * g.stride_w + fx * g.dilation_w) as i64
                                    - g.pad_left as i64;
                                if (0..g.in_h as i64).contains(&iy)
                                    && (0..g.in_w as i64).contains(&ix)
                                {
                                    let v = input[((b * g.in_h + iy as usize) * g.in_w
                                        + ix as usize)
                                        * g.in_c
                                        + ic];
                                    let w = filter[(fy * g.filter_w + fx) * g.out_c + oc];
                                    acc += f64::from(v) * f64::from(w);
                                }
                            }
                        }
                        acc += bias.map_or(0.0, |b| f64::from(b[oc]));
                        out.push(activate_f64(acc, act));
                    }
                }
            }
        }
        out
    }

    #[derive(Debug, Clone)]
    struct I8Case {
        g: ConvGeometry,
        input: Vec<i8>,
        filter: Vec<i8>,
        bias: Option<Vec<i32>>,
        requant: Vec<Requant>,
        input_zp: i32,
        output_zp: i32,
        clamp: ClampI8,
    }

    fn i8_case(max_in_c: usize) -> impl Strategy<Value = I8Case> {
        geometry(max_in_c).prop_flat_map(|g| {
            (
                Just(g),
                vec(any::<i8>(), input_len(&g)),
                vec(any::<i8>(), g.filter_h * g.filter_w * g.out_c),
                proptest::option::of(vec(-100_000i32..=100_000, g.out_c)),
                requants(g.out_c),
                zero_point(),
                zero_point(),
                clamp(),
            )
                .prop_map(
                    |(g, input, filter, bias, requant, input_zp, output_zp, clamp)| I8Case {
                        g,
                        input,
                        filter,
                        bias,
                        requant,
                        input_zp,
                        output_zp,
                        clamp,
                    },
                )
        })
    }

    fn run_i8_case(c: &I8Case) -> Result<(), TestCaseError> {
        let q = QuantizedOutput {
            input_zero_point: c.input_zp,
            filter_zero_point: 0,
            output_zero_point: c.output_zp,
            requant: &c.requant,
            clamp: c.clamp,
        };
        let mut out = std::vec![0i8; output_len(&c.g)];
        depthwise_conv2d_i8(&c.g, &q, &c.input, &c.filter, c.bias.as_deref(), &mut out);
        prop_assert_eq!(
            out,
            reference_i8(&c.g, &q, &c.input, &c.filter, c.bias.as_deref())
        );
        Ok(())
    }

    #[derive(Debug, Clone)]
    struct FloatCase {
        g: ConvGeometry,
        act: Activation,
        input: Vec<f32>,
        filter: Vec<f32>,
        bias: Option<Vec<f32>>,
    }

    /// Up to 30 input channels (90 outputs): chunked accumulators are covered too.
    fn float_case() -> impl Strategy<Value = FloatCase> {
        (geometry(30), activation()).prop_flat_map(|(g, act)| {
            (
                Just(g),
                Just(act),
                float_data(input_len(&g)),
                float_data(g.filter_h * g.filter_w * g.out_c),
                proptest::option::of(float_data(g.out_c)),
            )
                .prop_map(|(g, act, input, filter, bias)| FloatCase {
                    g,
                    act,
                    input,
                    filter,
                    bias,
                })
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn depthwise_i8_matches_padded_reference(c in i8_case(5)) {
            run_i8_case(&c)?;
        }

        /// More channels than one accumulator chunk (64), with depth multipliers 1-3, so chunks
        /// start in the middle of an input channel's multiplier run.
        #[test]
        fn depthwise_i8_matches_reference_across_chunks(c in i8_case(50)) {
            run_i8_case(&c)?;
        }

        #[test]
        fn depthwise_f32_matches_f64_reference(c in float_case()) {
            let mut out = std::vec![0f32; output_len(&c.g)];
            depthwise_conv2d_float(&c.g, c.act, &c.input, &c.filter, c.bias.as_deref(), &mut out);
            assert_close_f32(&out, &reference_f64(&c.g, c.act, &c.input, &c.filter, c.bias.as_deref()));
        }

        #[test]
        fn depthwise_f16_matches_f32_kernel(c in float_case()) {
            let (input, filter) = (to_f16(&c.input), to_f16(&c.filter));
            let bias = c.bias.as_deref().map(to_f16);
            let mut out16 = std::vec![f16::ZERO; output_len(&c.g)];
            depthwise_conv2d_float(&c.g, c.act, &input, &filter, bias.as_deref(), &mut out16);
            let bias32 = bias.as_deref().map(from_f16);
            let mut out32 = std::vec![0f32; output_len(&c.g)];
            depthwise_conv2d_float(&c.g, c.act, &from_f16(&input), &from_f16(&filter), bias32.as_deref(), &mut out32);
            assert_close_f16(&out16, &out32);
        }
    }

    #[test]
    fn depthwise_i8_hand_example() {
        // 1x1x2x2 input (two pixels, two channels), 1x2 filter, depth multiplier 2, VALID.
        let g = ConvGeometry {
            batch: 1,
            in_h: 1,
            in_w: 2,
            in_c: 2,
            out_h: 1,
            out_w: 1,
            out_c: 4,
            filter_h: 1,
            filter_w: 2,
            filter_in_c: 1,
            stride_h: 1,
            stride_w: 1,
            dilation_h: 1,
            dilation_w: 1,
            pad_top: 0,
            pad_left: 0,
            depth_multiplier: 2,
        };
        // multiplier 2^30, shift 1: x 1.0
        let requant = [Requant {
            multiplier: 1 << 30,
            shift: 1,
        }];
        let q = QuantizedOutput {
            input_zero_point: 0,
            filter_zero_point: 0,
            output_zero_point: 0,
            requant: &requant,
            clamp: ClampI8 { min: -128, max: 20 },
        };
        // pixel 0 = [1, 2], pixel 1 = [3, 4]; filter tap 0 = [1, 2, 3, 4], tap 1 = [5, 6, 7, 8]
        // oc0 (ic 0): 1*1 + 3*5 = 16; oc1 (ic 0): 1*2 + 3*6 = 20; oc2 (ic 1): 2*3 + 4*7 = 34 -> 20;
        // oc3 (ic 1): 2*4 + 4*8 = 40 -> 20
        let mut out = [0i8; 4];
        depthwise_conv2d_i8(
            &g,
            &q,
            &[1, 2, 3, 4],
            &[1, 2, 3, 4, 5, 6, 7, 8],
            None,
            &mut out,
        );
        assert_eq!(out, [16, 20, 20, 20]);
        assert_eq!(depthwise_conv2d_macs(&g), 8);
    }
}
