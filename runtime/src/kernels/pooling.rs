//! AVERAGE_POOL_2D and MAX_POOL_2D over NHWC activations.
//!
//! The window of output `(b, oy, ox)` starts at input row `oy * stride_h - pad_top` (column
//! likewise) and is clipped to the image: padded cells are excluded, not counted as zeros, as in
//! TFLite. The int8 bodies follow TFLM's reference `integer_ops/pooling.h` exactly. Every body
//! walks one output pixel at a time and reduces whole contiguous channel rows per window cell.
//!
//! A window that lies entirely in the padding (impossible for TFLite's SAME/VALID geometry) has no
//! cells; TFLM would divide by zero there. These kernels define it instead: int8 average pooling
//! writes 0 clamped to the output range, float average pooling writes `activation(0)`, and max
//! pooling writes the clamped/activated starting value (`i8::MIN`; `f32::MIN`, i.e. TFLM's
//! `lowest()`, which an f16 store turns into -inf).

use super::conv::tap_range;
use crate::graph::{Activation, ClampI8};
use crate::kernels::{activate, Float};

/// Channels accumulated together by the average pools (stack accumulators: 256 bytes).
const CHUNK: usize = 64;

/// Geometry of a 2-D pooling op (all sizes in elements).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolGeometry {
    /// Batch size.
    pub batch: usize,
    /// Input height.
    pub in_h: usize,
    /// Input width.
    pub in_w: usize,
    /// Channels (the same for input and output).
    pub channels: usize,
    /// Output height.
    pub out_h: usize,
    /// Output width.
    pub out_w: usize,
    /// Window height.
    pub filter_h: usize,
    /// Window width.
    pub filter_w: usize,
    /// Vertical stride (>= 1).
    pub stride_h: usize,
    /// Horizontal stride (>= 1).
    pub stride_w: usize,
    /// Rows of padding above the input (excluded from windows).
    pub pad_top: usize,
    /// Columns of padding left of the input (excluded from windows).
    pub pad_left: usize,
}

/// Checks the slice lengths against the geometry (debug builds only).
#[inline(always)]
fn debug_check<I, O>(g: &PoolGeometry, input: &[I], output: &[O]) {
    debug_assert!(g.stride_h >= 1 && g.stride_w >= 1);
    debug_assert_eq!(input.len(), g.batch * g.in_h * g.in_w * g.channels);
    debug_assert_eq!(output.len(), g.batch * g.out_h * g.out_w * g.channels);
}

/// The clipped window of one output pixel: its image and the in-image input rows and columns.
#[derive(Clone, Copy)]
struct Window {
    /// Batch index.
    b: usize,
    /// Input rows `start..end`.
    rows: (usize, usize),
    /// Input columns `start..end`.
    cols: (usize, usize),
}

impl Window {
    /// Number of cells.
    #[inline(always)]
    fn count(&self) -> usize {
        (self.rows.1 - self.rows.0) * (self.cols.1 - self.cols.0)
    }
}

/// Calls `body(out_base, window)` for every output pixel, where `out_base` is the index of the
/// pixel's first channel in the output.
#[inline(always)]
fn for_each_window(g: &PoolGeometry, mut body: impl FnMut(usize, Window)) {
    let mut out_base = 0;
    for b in 0..g.batch {
        for oy in 0..g.out_h {
            let in_y0 = (oy * g.stride_h) as isize - g.pad_top as isize;
            let (fy0, fy1) = tap_range(in_y0, 1, g.filter_h, g.in_h);
            let rows = (
                (in_y0 + fy0 as isize) as usize,
                (in_y0 + fy1 as isize) as usize,
            );
            for ox in 0..g.out_w {
                let in_x0 = (ox * g.stride_w) as isize - g.pad_left as isize;
                let (fx0, fx1) = tap_range(in_x0, 1, g.filter_w, g.in_w);
                let cols = (
                    (in_x0 + fx0 as isize) as usize,
                    (in_x0 + fx1 as isize) as usize,
                );
                body(out_base, Window { b, rows, cols });
                out_base += g.channels;
            }
        }
    }
}

/// Folds every cell of `w` into `acc` with `step`, for channels `c0 .. c0 + acc.len()`.
#[inline(always)]
fn window_reduce<T: Copy, Acc>(
    g: &PoolGeometry,
    input: &[T],
    w: Window,
    c0: usize,
    acc: &mut [Acc],
    mut step: impl FnMut(&mut Acc, T),
) {
    for iy in w.rows.0..w.rows.1 {
        for ix in w.cols.0..w.cols.1 {
            let px = &input[((w.b * g.in_h + iy) * g.in_w + ix) * g.channels + c0..][..acc.len()];
            for (a, &x) in acc.iter_mut().zip(px) {
                step(a, x);
            }
        }
    }
}

/// `acc[j] = sum of channel c0 + j over the cells of w` (int8 sums, exact). On a Cortex-M with
/// the DSP extension, channels in groups of 4 go through [`window_sum4_dsp`].
#[inline(always)]
fn window_sum_i8(g: &PoolGeometry, input: &[i8], w: Window, c0: usize, acc: &mut [i32]) {
    #[cfg(kiln_dsp_kernels)]
    if window_sum4_dsp(g, input, w, c0, acc) {
        return;
    }
    window_reduce(g, input, w, c0, acc, |a, x| {
        *a = a.wrapping_add(i32::from(x))
    });
}

/// The int8 window sums with the Cortex-M DSP primitives (emulated elsewhere, for the tests):
/// per 4 channels, two packed int16 accumulators summed by SXTAB16 over the window's cells (3
/// instructions per 4 values), exact while a window has at most 255 cells (`255 * 128 <
/// 2^15`). False, having written nothing, for other windows or channel counts.
#[cfg_attr(not(kiln_dsp_kernels), allow(dead_code))]
fn window_sum4_dsp(g: &PoolGeometry, input: &[i8], w: Window, c0: usize, acc: &mut [i32]) -> bool {
    use super::arch::cortex_m::{sxtab16, sxtab16_ror8, word};
    if !acc.len().is_multiple_of(4) || w.count() > 255 {
        return false;
    }
    let c = g.channels;
    for (j, a) in acc.chunks_exact_mut(4).enumerate() {
        let (mut even, mut odd) = (0u32, 0u32);
        for iy in w.rows.0..w.rows.1 {
            let mut at = ((w.b * g.in_h + iy) * g.in_w + w.cols.0) * c + c0 + 4 * j;
            for _ in w.cols.0..w.cols.1 {
                let v = word(&input[at..]);
                even = sxtab16(even, v);
                odd = sxtab16_ror8(odd, v);
                at += c;
            }
        }
        a[0] = i32::from(even as i16);
        a[1] = i32::from(odd as i16);
        a[2] = i32::from((even >> 16) as i16);
        a[3] = i32::from((odd >> 16) as i16);
    }
    true
}

/// int8 AVERAGE_POOL_2D (TFLM reference arithmetic, bit-exact): the sum of the in-image window
/// cells divided by their count, rounded to nearest with ties away from zero, then clamped.
/// Input and output share one scale and zero point, so no requantization happens.
///
/// Accumulator bound: `|acc| <= 128 * filter_h * filter_w`, which fits `i32` for any window of
/// fewer than 2^24 cells.
pub fn average_pool_i8(g: &PoolGeometry, clamp: ClampI8, input: &[i8], output: &mut [i8]) {
    debug_check(g, input, output);
    let (lo, hi) = (i32::from(clamp.min), i32::from(clamp.max));
    for_each_window(g, |out_base, w| {
        let count = w.count() as i32;
        let mut c0 = 0;
        while c0 < g.channels {
            let n = core::cmp::min(CHUNK, g.channels - c0);
            let mut acc_buf = [0i32; CHUNK];
            let acc = &mut acc_buf[..n];
            window_sum_i8(g, input, w, c0, acc);
            let out = &mut output[out_base + c0..][..n];
            for (o, &a) in out.iter_mut().zip(acc.iter()) {
                let avg = if count == 0 {
                    0
                } else if a > 0 {
                    (a + count / 2) / count
                } else {
                    (a - count / 2) / count
                };
                *o = avg.max(lo).min(hi) as i8;
            }
            c0 += n;
        }
    });
}

/// int8 MAX_POOL_2D (TFLM reference): the largest in-image window cell (starting from
/// `i8::MIN`), then clamped.
pub fn max_pool_i8(g: &PoolGeometry, clamp: ClampI8, input: &[i8], output: &mut [i8]) {
    debug_check(g, input, output);
    for_each_window(g, |out_base, w| {
        let out = &mut output[out_base..][..g.channels];
        out.fill(i8::MIN);
        window_reduce(g, input, w, 0, out, |m, x| *m = (*m).max(x));
        for o in out.iter_mut() {
            *o = (*o).max(clamp.min).min(clamp.max);
        }
    });
}

/// Float AVERAGE_POOL_2D (f32 or f16 storage, f32 arithmetic): the f32 sum of the in-image window
/// cells divided by their count, then the fused `activation`.
pub fn average_pool_float<T: Float>(
    g: &PoolGeometry,
    activation: Activation,
    input: &[T],
    output: &mut [T],
) {
    debug_check(g, input, output);
    for_each_window(g, |out_base, w| {
        let count = w.count() as f32;
        let mut c0 = 0;
        while c0 < g.channels {
            let n = core::cmp::min(CHUNK, g.channels - c0);
            let mut acc_buf = [0.0f32; CHUNK];
            let acc = &mut acc_buf[..n];
            window_reduce(g, input, w, c0, acc, |a, x: T| *a += x.to_f32());
            let out = &mut output[out_base + c0..][..n];
            for (o, &a) in out.iter_mut().zip(acc.iter()) {
                let avg = if count == 0.0 { 0.0 } else { a / count };
                *o = T::from_f32(activate(avg, activation));
            }
            c0 += n;
        }
    });
}

/// Float MAX_POOL_2D (f32 or f16 storage): the largest in-image window cell (starting from
/// `f32::MIN`, TFLM's `lowest()`; NaN cells are skipped as `std::max` skips them), then the fused
/// `activation`.
pub fn max_pool_float<T: Float>(
    g: &PoolGeometry,
    activation: Activation,
    input: &[T],
    output: &mut [T],
) {
    debug_check(g, input, output);
    for_each_window(g, |out_base, w| {
        let mut c0 = 0;
        while c0 < g.channels {
            let n = core::cmp::min(CHUNK, g.channels - c0);
            let mut acc_buf = [f32::MIN; CHUNK];
            let acc = &mut acc_buf[..n];
            window_reduce(g, input, w, c0, acc, |m, x: T| {
                let x = x.to_f32();
                if *m < x {
                    *m = x;
                }
            });
            let out = &mut output[out_base + c0..][..n];
            for (o, &m) in out.iter_mut().zip(acc.iter()) {
                *o = T::from_f32(activate(m, activation));
            }
            c0 += n;
        }
    });
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use crate::kernels::conv::tests::{
        activate_f64, activation, assert_close_f16, assert_close_f32, axis, clamp, float_data,
        from_f16, to_f16,
    };
    use half::f16;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use std::vec::Vec;

    proptest! {
        /// The Cortex-M window sums (emulated primitives here) equal the plain sums, for every
        /// window they take (at most 255 cells, channels in fours).
        #[test]
        fn dsp_window_sums_are_exact(
            (g, input) in (1usize..=16, 1usize..=20, 1usize..=6).prop_flat_map(|(h, w, groups)| {
                let g = PoolGeometry {
                    batch: 1, in_h: h, in_w: w, channels: 4 * groups, out_h: 1, out_w: 1,
                    filter_h: h, filter_w: w, stride_h: 1, stride_w: 1, pad_top: 0, pad_left: 0,
                };
                (Just(g), vec(any::<i8>(), h * w * 4 * groups))
            }),
        ) {
            let w = Window { b: 0, rows: (0, g.in_h), cols: (0, g.in_w) };
            let mut want = std::vec![0i32; g.channels];
            window_reduce(&g, &input, w, 0, &mut want, |a, x| *a += i32::from(x));
            let mut got = std::vec![0i32; g.channels];
            let took = window_sum4_dsp(&g, &input, w, 0, &mut got);
            prop_assert_eq!(took, g.in_h * g.in_w <= 255);
            if took {
                prop_assert_eq!(got, want);
            }
        }
    }

    fn geometry(max_channels: usize) -> impl Strategy<Value = PoolGeometry> {
        (1usize..=2, axis(1), axis(1), 1usize..=max_channels).prop_map(|(batch, h, w, channels)| {
            PoolGeometry {
                batch,
                in_h: h.input,
                in_w: w.input,
                channels,
                out_h: h.output,
                out_w: w.output,
                filter_h: h.filter,
                filter_w: w.filter,
                stride_h: h.stride,
                stride_w: w.stride,
                pad_top: h.pad,
                pad_left: w.pad,
            }
        })
    }

    fn input_len(g: &PoolGeometry) -> usize {
        g.batch * g.in_h * g.in_w * g.channels
    }

    fn output_len(g: &PoolGeometry) -> usize {
        g.batch * g.out_h * g.out_w * g.channels
    }

    /// The in-image cells of every output element's window, in output order, with per-cell signed
    /// bounds tests.
    fn windows<T: Copy>(g: &PoolGeometry, input: &[T]) -> Vec<Vec<T>> {
        let mut all = Vec::new();
        for b in 0..g.batch {
            for oy in 0..g.out_h {
                for ox in 0..g.out_w {
                    for c in 0..g.channels {
                        let mut cells = Vec::new();
                        for fy in 0..g.filter_h {
                            for fx in 0..g.filter_w {
                                let iy = (oy * g.stride_h + fy) as i64 - g.pad_top as i64;
                                let ix = (ox * g.stride_w + fx) as i64 - g.pad_left as i64;
                                if iy >= 0 && ix >= 0 && iy < g.in_h as i64 && ix < g.in_w as i64 {
                                    cells.push(
                                        input[((b * g.in_h + iy as usize) * g.in_w + ix as usize)
                                            * g.channels
                                            + c],
                                    );
                                }
                            }
                        }
                        all.push(cells);
                    }
                }
            }
        }
        all
    }

    fn clamp_i64(v: i64, clamp: ClampI8) -> i8 {
        v.max(i64::from(clamp.min)).min(i64::from(clamp.max)) as i8
    }

    /// Average rounded half away from zero, as an exact rational: `sign * floor((2|s| + n) / 2n)`.
    fn reference_average_i8(g: &PoolGeometry, clamp: ClampI8, input: &[i8]) -> Vec<i8> {
        windows(g, input)
            .iter()
            .map(|cells| {
                let n = cells.len() as i64;
                let s: i64 = cells.iter().map(|&v| i64::from(v)).sum();
                let avg = if n == 0 {
                    0
                } else {
                    s.signum() * ((2 * s.abs() + n) / (2 * n))
                };
                clamp_i64(avg, clamp)
            })
            .collect()
    }

    fn reference_max_i8(g: &PoolGeometry, clamp: ClampI8, input: &[i8]) -> Vec<i8> {
        windows(g, input)
            .iter()
            .map(|cells| {
                clamp_i64(
                    cells.iter().map(|&v| i64::from(v)).max().unwrap_or(-128),
                    clamp,
                )
            })
            .collect()
    }

    fn reference_average_f64(g: &PoolGeometry, act: Activation, input: &[f32]) -> Vec<f64> {
        windows(g, input)
            .iter()
            .map(|cells| {
                activate_f64(
                    cells.iter().map(|&v| f64::from(v)).sum::<f64>() / cells.len() as f64,
                    act,
                )
            })
            .collect()
    }

    fn reference_max_f64(g: &PoolGeometry, act: Activation, input: &[f32]) -> Vec<f64> {
        windows(g, input)
            .iter()
            .map(|cells| {
                activate_f64(
                    cells.iter().map(|&v| f64::from(v)).fold(f64::MIN, f64::max),
                    act,
                )
            })
            .collect()
    }

    fn i8_case(max_channels: usize) -> impl Strategy<Value = (PoolGeometry, ClampI8, Vec<i8>)> {
        (geometry(max_channels), clamp())
            .prop_flat_map(|(g, clamp)| (Just(g), Just(clamp), vec(any::<i8>(), input_len(&g))))
    }

    /// Up to 100 channels: chunked accumulators are covered too.
    fn float_case() -> impl Strategy<Value = (PoolGeometry, Activation, Vec<f32>)> {
        (geometry(100), activation())
            .prop_flat_map(|(g, act)| (Just(g), Just(act), float_data(input_len(&g))))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn average_pool_i8_matches_reference((g, clamp, input) in i8_case(5)) {
            let mut out = std::vec![0i8; output_len(&g)];
            average_pool_i8(&g, clamp, &input, &mut out);
            prop_assert_eq!(out, reference_average_i8(&g, clamp, &input));
        }

        /// More channels than one accumulator chunk (64).
        #[test]
        fn average_pool_i8_matches_reference_across_chunks((g, clamp, input) in i8_case(150)) {
            let mut out = std::vec![0i8; output_len(&g)];
            average_pool_i8(&g, clamp, &input, &mut out);
            prop_assert_eq!(out, reference_average_i8(&g, clamp, &input));
        }

        #[test]
        fn max_pool_i8_matches_reference((g, clamp, input) in i8_case(5)) {
            let mut out = std::vec![0i8; output_len(&g)];
            max_pool_i8(&g, clamp, &input, &mut out);
            prop_assert_eq!(out, reference_max_i8(&g, clamp, &input));
        }

        #[test]
        fn pool_f32_matches_f64_reference((g, act, input) in float_case()) {
            let mut out = std::vec![0f32; output_len(&g)];
            average_pool_float(&g, act, &input, &mut out);
            assert_close_f32(&out, &reference_average_f64(&g, act, &input));
            max_pool_float(&g, act, &input, &mut out);
            assert_close_f32(&out, &reference_max_f64(&g, act, &input));
        }

        #[test]
        fn pool_f16_matches_f32_kernel((g, act, input) in float_case()) {
            let input16 = to_f16(&input);
            let input32 = from_f16(&input16);
            let mut out16 = std::vec![f16::ZERO; output_len(&g)];
            let mut out32 = std::vec![0f32; output_len(&g)];
            average_pool_float(&g, act, &input16, &mut out16);
            average_pool_float(&g, act, &input32, &mut out32);
            assert_close_f16(&out16, &out32);
            max_pool_float(&g, act, &input16, &mut out16);
            max_pool_float(&g, act, &input32, &mut out32);
            assert_close_f16(&out16, &out32);
        }
    }

    fn single(in_h: usize, in_w: usize, filter: usize, pad: usize, out: usize) -> PoolGeometry {
        PoolGeometry {
            batch: 1,
            in_h,
            in_w,
            channels: 1,
            out_h: out,
            out_w: out,
            filter_h: filter,
            filter_w: filter,
            stride_h: 1,
            stride_w: 1,
            pad_top: pad,
            pad_left: pad,
        }
    }

    #[test]
    fn average_pool_i8_rounds_half_away_from_zero() {
        let g = PoolGeometry {
            filter_w: 2,
            ..single(1, 2, 1, 0, 1)
        };
        let mut out = [0i8];
        average_pool_i8(&g, ClampI8::default(), &[1, 2], &mut out);
        assert_eq!(out, [2]); // 1.5 -> 2
        average_pool_i8(&g, ClampI8::default(), &[-1, -2], &mut out);
        assert_eq!(out, [-2]); // -1.5 -> -2
        average_pool_i8(&g, ClampI8 { min: -1, max: 127 }, &[-1, -2], &mut out);
        assert_eq!(out, [-1]);
    }

    #[test]
    fn windows_entirely_in_padding_are_defined() {
        // 1x1 input, 1x1 window, pad 1: output (0, 0) sees only padding.
        let g = single(1, 1, 1, 1, 2);
        let clamp = ClampI8 { min: 5, max: 100 };
        let mut out = [0i8; 4];
        average_pool_i8(&g, clamp, &[50], &mut out);
        assert_eq!(out, [5, 5, 5, 50]);
        max_pool_i8(&g, ClampI8::default(), &[50], &mut out);
        assert_eq!(out, [-128, -128, -128, 50]);
        let mut outf = [1.0f32; 4];
        average_pool_float(&g, Activation::None, &[3.0f32], &mut outf);
        assert_eq!(outf, [0.0, 0.0, 0.0, 3.0]);
        max_pool_float(&g, Activation::Relu, &[3.0f32], &mut outf);
        assert_eq!(outf, [0.0, 0.0, 0.0, 3.0]);
    }
}
