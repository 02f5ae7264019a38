//! SOFTMAX over the last axis: int8 (TFLM `reference_ops::Softmax`, quantized path; output scale
//! 1/256, zero point -128) and float; plus [`softmax_params`], the host-side `Prepare` math.

use super::quantize::quantize_multiplier;
use super::Float;
use crate::graph::SoftmaxParams;
use crate::quant::{
    exp_on_negative_values, get_reciprocal, multiply_by_quantized_multiplier_greater_than_one,
    rescale, rounding_divide_by_pot, saturating_rounding_doubling_high_mul,
};

/// Integer bits of the rescaled input differences (TFLM `kScaledDiffIntegerBits`).
const SCALED_DIFF_INTEGER_BITS: i32 = 5;
/// Integer bits of the sum of exponentials (TFLM `kAccumulationIntegerBits`).
const ACCUMULATION_INTEGER_BITS: i32 = 12;

/// int8 SOFTMAX over rows of `depth` elements (`outer` rows), TFLM's quantized reference
/// arithmetic. The output has scale 1/256 and zero point -128; parameters come from
/// [`softmax_params`].
///
/// Per row: `max` = largest input; for each element with `diff = q - max >= diff_min`,
/// `e = exp_on_negative_values(multiply_by_quantized_multiplier_greater_than_one(diff, ...))`
/// (Q5 in, Q0 out) and the Q12 sum of `e` gives, via `get_reciprocal`, a Q0 scale and a bit count
/// `k`; the output is `clamp(rounding_divide_by_pot(scale * e, k + 23) - 128)`. Elements below
/// `diff_min` output -128.
pub fn softmax_i8(p: &SoftmaxParams, outer: usize, depth: usize, input: &[i8], output: &mut [i8]) {
    debug_assert_eq!(input.len(), outer * depth);
    debug_assert_eq!(output.len(), outer * depth);
    if depth == 0 {
        return;
    }
    // The rescaled difference (Q5), or None below `diff_min`.
    let rescaled = |diff: i32| -> Option<i32> {
        if diff < p.diff_min {
            None
        } else {
            Some(multiply_by_quantized_multiplier_greater_than_one(
                diff,
                p.input_multiplier,
                p.input_left_shift,
            ))
        }
    };
    for (row_in, row_out) in input
        .chunks_exact(depth)
        .zip(output.chunks_exact_mut(depth))
        .take(outer)
    {
        let max = row_in.iter().copied().max().unwrap_or(i8::MIN) as i32;
        let mut sum_of_exps: i32 = 0; // Q12
        for &q in row_in {
            if let Some(x) = rescaled(q as i32 - max) {
                let e = exp_on_negative_values(x, SCALED_DIFF_INTEGER_BITS);
                sum_of_exps = sum_of_exps.wrapping_add(rescale(e, 0, ACCUMULATION_INTEGER_BITS));
            }
        }
        let (shifted_scale, num_bits_over_unit) =
            get_reciprocal(sum_of_exps, ACCUMULATION_INTEGER_BITS);
        let exponent = num_bits_over_unit + 31 - 8;
        for (o, &q) in row_out.iter_mut().zip(row_in) {
            *o = match rescaled(q as i32 - max) {
                Some(x) => {
                    let e = exp_on_negative_values(x, SCALED_DIFF_INTEGER_BITS);
                    // Rows of >= 512 similar logits push the shift past 31, where TFLM's C++
                    // shift is undefined; the Q0 product is below 2^31 <= 2^(exponent - 1), so
                    // the exact rounded quotient is 0.
                    let unsat = if exponent > 31 {
                        0
                    } else {
                        rounding_divide_by_pot(
                            saturating_rounding_doubling_high_mul(shifted_scale, e),
                            exponent,
                        )
                    };
                    (unsat - 128).clamp(i8::MIN as i32, i8::MAX as i32) as i8
                }
                None => i8::MIN,
            };
        }
    }
}

/// Float SOFTMAX over rows of `depth` elements (`outer` rows):
/// `exp(beta * (x - max)) / sum(exp(beta * (x - max)))`, computed in f32 (the exponentials are
/// computed twice rather than stored, so f16 outputs are rounded only once).
pub fn softmax_float<T: Float>(
    beta: f32,
    outer: usize,
    depth: usize,
    input: &[T],
    output: &mut [T],
) {
    debug_assert_eq!(input.len(), outer * depth);
    debug_assert_eq!(output.len(), outer * depth);
    if depth == 0 {
        return;
    }
    for (row_in, row_out) in input
        .chunks_exact(depth)
        .zip(output.chunks_exact_mut(depth))
        .take(outer)
    {
        let max = row_in.iter().fold(f32::NEG_INFINITY, |m, &x| {
            let x = x.to_f32();
            if x > m {
                x
            } else {
                m
            }
        });
        let exp = |x: T| libm::expf((x.to_f32() - max) * beta);
        let sum: f32 = row_in.iter().map(|&x| exp(x)).sum();
        let inv = 1.0 / sum;
        for (o, &x) in row_out.iter_mut().zip(row_in) {
            *o = T::from_f32(exp(x) * inv);
        }
    }
}

/// Host-side `Prepare` of SOFTMAX, as TFLM `PreprocessSoftmaxScaling` +
/// `CalculateInputRadius` with 5 integer bits (f64 math):
/// `real = min(beta * input_scale * 2^26, 2^31 - 1)`,
/// `(input_multiplier, input_left_shift) = quantize_multiplier(real)` and
/// `diff_min = -floor(31 * 2^26 / 2^input_left_shift)` (saturated to `i32`). `beta` is kept
/// for the float kernel.
///
/// TFLM rejects `beta * input_scale < 2^-26` (a negative left shift); this function does not
/// check it, the caller should.
pub fn softmax_params(beta: f32, input_scale: f32) -> SoftmaxParams {
    let max_real_multiplier = (1i64 << 31) as f64 - 1.0;
    let scaled =
        beta as f64 * input_scale as f64 * (1i64 << (31 - SCALED_DIFF_INTEGER_BITS)) as f64;
    let real = if scaled < max_real_multiplier {
        scaled
    } else {
        max_real_multiplier
    };
    let r = quantize_multiplier(real);
    let radius = libm::floor(libm::ldexp(
        ((1i64 << SCALED_DIFF_INTEGER_BITS) - 1) as f64
            * (1i64 << (31 - SCALED_DIFF_INTEGER_BITS)) as f64,
        -r.shift,
    ));
    SoftmaxParams {
        beta,
        input_multiplier: r.multiplier,
        input_left_shift: r.shift,
        diff_min: -(radius as i32),
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use half::f16;
    use proptest::prelude::*;
    use std::vec::Vec;

    fn config() -> ProptestConfig {
        ProptestConfig {
            cases: 64,
            ..ProptestConfig::default()
        }
    }

    /// f64 softmax of one row of reals.
    fn softmax_f64(xs: &[f64]) -> Vec<f64> {
        let max = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = xs.iter().map(|&x| (x - max).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|v| v / s).collect()
    }

    #[test]
    fn params_known_values() {
        // 0.1f32 * 2^26 = 6710886.5 -> frexp exponent 23.
        let p = softmax_params(1.0, 0.1);
        assert_eq!(p.input_left_shift, 23);
        assert_eq!(p.input_multiplier, (13421773i64 << 7) as i32);
        assert_eq!(p.diff_min, -248); // -floor(31 * 2^26 / 2^23)
        assert_eq!(p.beta, 1.0);
        // Scale 1: real = 2^26 -> (2^30, 27), diff_min = -floor(31 / 2) = -15.
        let p = softmax_params(1.0, 1.0);
        assert_eq!(
            (p.input_multiplier, p.input_left_shift, p.diff_min),
            (1 << 30, 27, -15)
        );
        // Capped at 2^31 - 1, which quantizes to (2^31 - 1, 31): only the row maximum survives.
        let p = softmax_params(1.0, 64.0);
        assert_eq!(
            (p.input_multiplier, p.input_left_shift, p.diff_min),
            (i32::MAX, 31, 0)
        );
    }

    #[test]
    fn known_rows() {
        let p = softmax_params(1.0, 0.1);
        let mut out = [0i8; 4];
        // Equal inputs: 64/256 each.
        softmax_i8(&p, 1, 4, &[5, 5, 5, 5], &mut out);
        assert_eq!(out, [-64; 4]);
        // One element: probability 1 saturates to 127.
        let mut one = [0i8; 1];
        softmax_i8(&p, 1, 1, &[-128], &mut one);
        assert_eq!(one, [127]);
        // Far below the maximum (diff < diff_min = -248 is impossible in int8 at this scale, but
        // exp(-25.5) rounds to nothing).
        softmax_i8(&p, 1, 4, &[127, -128, -128, -128], &mut out);
        assert_eq!(out, [127, -128, -128, -128]);
        // Input scale 0.5 over five consecutive codes (the Android NN softmax_quant8_2 example,
        // shifted from uint8 to int8): 256 * softmax([0.5, 1, 1.5, 2, 2.5]) - 128.
        let p = softmax_params(1.0, 0.5);
        let mut out = [0i8; 10];
        softmax_i8(
            &p,
            2,
            5,
            &[-127, -126, -125, -124, -123, 127, 126, 125, 124, 123],
            &mut out,
        );
        assert_eq!(out, [-113, -104, -88, -61, -18, -18, -61, -88, -104, -113]);
        let mut out = [0i8; 4];
        // A huge input scale: only the maximum is kept, and ties share.
        let p = softmax_params(1.0, 64.0);
        softmax_i8(&p, 1, 4, &[3, 7, 7, -1], &mut out);
        assert_eq!(out, [-128, 0, 0, -128]);
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn int8_close_to_real_softmax(
            scale in prop_oneof![Just(1.0f32 / 16.0), Just(0.1f32), 0.01f32..0.5],
            beta in prop_oneof![Just(1.0f32), 0.25f32..2.0],
            zp in prop_oneof![Just(-128), Just(127), -128i32..=127],
            (outer, depth, data) in (1usize..4, 1usize..12).prop_flat_map(|(o, d)| {
                (Just(o), Just(d), proptest::collection::vec(any::<i8>(), o * d))
            }),
        ) {
            let p = softmax_params(beta, scale);
            let mut out = std::vec![0i8; data.len()];
            softmax_i8(&p, outer, depth, &data, &mut out);
            for (row_in, row_out) in data.chunks(depth).zip(out.chunks(depth)) {
                let reals: Vec<f64> =
                    row_in.iter().map(|&q| beta as f64 * scale as f64 * (q as i32 - zp) as f64).collect();
                let want = softmax_f64(&reals);
                let mut total = 0i32;
                for (&o, &w) in row_out.iter().zip(&want) {
                    let w = (w * 256.0 - 128.0).clamp(-128.0, 127.0);
                    prop_assert!((o as f64 - w).abs() <= 1.5, "{:?} -> {:?}: {} vs {}", row_in, row_out, o, w);
                    total += o as i32 + 128;
                }
                prop_assert!((total - 256).unsigned_abs() as usize <= depth + 1, "{:?} -> {:?}", row_in, row_out);
            }
        }

        #[test]
        fn float_matches_reference(
            beta in prop_oneof![Just(1.0f32), 0.1f32..3.0],
            (outer, depth, data) in (1usize..4, 1usize..16).prop_flat_map(|(o, d)| {
                (Just(o), Just(d), proptest::collection::vec(-10.0f32..10.0, o * d))
            }),
        ) {
            let mut out = std::vec![0f32; data.len()];
            softmax_float(beta, outer, depth, &data, &mut out);
            for (row_in, row_out) in data.chunks(depth).zip(out.chunks(depth)) {
                let reals: Vec<f64> = row_in.iter().map(|&x| beta as f64 * x as f64).collect();
                let want = softmax_f64(&reals);
                for (&o, &w) in row_out.iter().zip(&want) {
                    prop_assert!((o as f64 - w).abs() <= 1e-5 * w, "{} vs {}", o, w);
                }
            }
            // f16 storage: the f32 result on the f16-rounded inputs, rounded once to f16.
            let xh: Vec<f16> = data.iter().map(|&v| f16::from_f32(v)).collect();
            let xf: Vec<f32> = xh.iter().map(|v| v.to_f32()).collect();
            let mut out_h = std::vec![f16::ZERO; data.len()];
            softmax_float(beta, outer, depth, &xh, &mut out_h);
            softmax_float(beta, outer, depth, &xf, &mut out);
            for i in 0..data.len() {
                prop_assert_eq!(out_h[i], f16::from_f32(out[i]));
            }
        }
    }
}
