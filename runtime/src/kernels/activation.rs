//! Element-wise activations: RELU / RELU6, LOGISTIC and TANH, int8 (TFLM's fixed-point reference
//! arithmetic) and float; plus [`sigmoid_params`], the host-side `Prepare` of int8 LOGISTIC/TANH.

use super::Float;
use crate::graph::{ClampI8, Requant, SigmoidParams};
use crate::quant::{self, multiply_by_quantized_multiplier, rounding_divide_by_pot};

/// Integer bits of the fixed-point input of LOGISTIC and TANH (TFLM `kInputIntegerBits`).
const INPUT_INTEGER_BITS: i32 = 4;

/// int8 RELU / RELU6 (TFLM `ReluQuantized`):
/// `out = clamp(zp_out + multiply_by_quantized_multiplier(q - zp_in, requant), clamp.min, clamp.max)`.
///
/// `requant` is `quantize_multiplier(in_scale / out_scale)`, `clamp` the output range of the
/// activation (`activation_clamp(Relu or Relu6, out_scale, zp_out)`), `zero_points` those of the
/// input and the output.
pub fn relu_i8(
    requant: Requant,
    clamp: ClampI8,
    zero_points: [i32; 2],
    input: &[i8],
    output: &mut [i8],
) {
    debug_assert_eq!(input.len(), output.len());
    let [zp_in, zp_out] = zero_points;
    let (lo, hi) = (clamp.min as i32, clamp.max as i32);
    for (o, &q) in output.iter_mut().zip(input) {
        let v = zp_out.wrapping_add(multiply_by_quantized_multiplier(
            q as i32 - zp_in,
            requant.multiplier,
            requant.shift,
        ));
        *o = v.max(lo).min(hi) as i8;
    }
}

/// Float RELU (`max = None`) or RELU6 (`max = Some(6.0)`): `min(max(x, 0), max)`. A NaN input
/// stays NaN, as in TFLM.
pub fn relu_float<T: Float>(max: Option<f32>, input: &[T], output: &mut [T]) {
    debug_assert_eq!(input.len(), output.len());
    match max {
        None => {
            for (o, &x) in output.iter_mut().zip(input) {
                let v = x.to_f32();
                *o = T::from_f32(if v < 0.0 { 0.0 } else { v });
            }
        }
        Some(hi) => {
            for (o, &x) in output.iter_mut().zip(input) {
                let v = x.to_f32();
                *o = T::from_f32(if v > hi {
                    hi
                } else if v < 0.0 {
                    0.0
                } else {
                    v
                });
            }
        }
    }
}

/// Shared body of int8 LOGISTIC and TANH: saturate outside the input radius, otherwise rescale
/// to Q4 and apply `f` (which maps the Q4 raw to the output before clamping).
#[inline(always)]
fn sigmoid_like_i8(
    p: &SigmoidParams,
    input_zero_point: i32,
    input: &[i8],
    output: &mut [i8],
    f: impl Fn(i32) -> i32,
) {
    debug_assert_eq!(input.len(), output.len());
    let radius = p.input_range_radius;
    for (o, &q) in output.iter_mut().zip(input) {
        let x = q as i32 - input_zero_point;
        *o = if x <= -radius {
            i8::MIN
        } else if x >= radius {
            i8::MAX
        } else {
            let q4 = multiply_by_quantized_multiplier(x, p.input_multiplier, p.input_left_shift);
            f(q4).clamp(i8::MIN as i32, i8::MAX as i32) as i8
        };
    }
}

/// int8 LOGISTIC, TFLM `reference_integer_ops::Logistic`. The output has scale 1/256 and zero
/// point -128. Parameters come from [`sigmoid_params`] of the input scale.
///
/// With `x = q - zp_in`: `x <= -radius` → -128; `x >= radius` → 127; otherwise
/// `q4 = multiply_by_quantized_multiplier(x, input_multiplier, input_left_shift)` (Q4),
/// `r = logistic(q4)` (Q0) and `out = clamp(rounding_divide_by_pot(r, 23) - 128)`.
pub fn logistic_i8(p: &SigmoidParams, input_zero_point: i32, input: &[i8], output: &mut [i8]) {
    sigmoid_like_i8(p, input_zero_point, input, output, |q4| {
        rounding_divide_by_pot(quant::logistic(q4, INPUT_INTEGER_BITS), 31 - 8) - 128
    });
}

/// int8 TANH, TFLM `reference_integer_ops::Tanh`. The output has scale 1/128 and zero point 0.
/// Parameters come from [`sigmoid_params`] of the input scale.
///
/// Same radius tests as [`logistic_i8`]; otherwise `r = tanh(q4)` (Q0) and
/// `out = clamp(rounding_divide_by_pot(r, 24))`.
pub fn tanh_i8(p: &SigmoidParams, input_zero_point: i32, input: &[i8], output: &mut [i8]) {
    sigmoid_like_i8(p, input_zero_point, input, output, |q4| {
        rounding_divide_by_pot(quant::tanh(q4, INPUT_INTEGER_BITS), 31 - 7)
    });
}

/// `1 / (1 + e^-x)` in f32, without overflow and accurate (relatively) for large negative `x`.
#[inline(always)]
fn logistic_f32(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + libm::expf(-x))
    } else {
        let e = libm::expf(x);
        e / (1.0 + e)
    }
}

/// Float LOGISTIC, `1 / (1 + e^-x)` computed in f32.
pub fn logistic_float<T: Float>(input: &[T], output: &mut [T]) {
    debug_assert_eq!(input.len(), output.len());
    for (o, &x) in output.iter_mut().zip(input) {
        *o = T::from_f32(logistic_f32(x.to_f32()));
    }
}

/// Float TANH, computed in f32 with `libm::tanhf`.
pub fn tanh_float<T: Float>(input: &[T], output: &mut [T]) {
    debug_assert_eq!(input.len(), output.len());
    for (o, &x) in output.iter_mut().zip(input) {
        *o = T::from_f32(libm::tanhf(x.to_f32()));
    }
}

/// Host-side `Prepare` of int8 LOGISTIC and TANH, exactly as TFLM (f64 math):
/// `m = input_scale * 2^27`, `(frac, exp) = frexp(m)`, `input_multiplier = round(frac * 2^31)`
/// (ties away from zero), `input_left_shift = exp`, and
/// `input_range_radius = floor(15 * 2^27 / 2^input_left_shift)` (saturated to `i32`).
///
/// For `input_scale >= 8` the radius is 0 and every input saturates (as in TFLM); the multiplier
/// is then never used.
pub fn sigmoid_params(input_scale: f32) -> SigmoidParams {
    let m = input_scale as f64 * (1i64 << (31 - INPUT_INTEGER_BITS)) as f64;
    let (frac, left_shift) = libm::frexp(m);
    // `frac` has at most 24 significant bits (an f32 times a power of two), so this is exact and
    // below 2^31.
    let multiplier = libm::round(frac * (1i64 << 31) as f64) as i32;
    // TFLM `CalculateInputRadius`: a division by 2^left_shift, exact as a scaling by 2^-left_shift.
    let max_input_rescaled = libm::ldexp(
        ((1i64 << INPUT_INTEGER_BITS) - 1) as f64 * (1i64 << (31 - INPUT_INTEGER_BITS)) as f64,
        -left_shift,
    );
    SigmoidParams {
        input_range_radius: libm::floor(max_input_rescaled) as i32,
        input_multiplier: multiplier,
        input_left_shift: left_shift,
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use crate::graph::Activation;
    use crate::kernels::quantize::tests::naive_mbqm;
    use crate::kernels::quantize::{activation_clamp, quantize_multiplier};
    use half::f16;
    use proptest::prelude::*;
    use std::vec::Vec;

    fn config() -> ProptestConfig {
        ProptestConfig {
            cases: 64,
            ..ProptestConfig::default()
        }
    }

    fn all_i8() -> [i8; 256] {
        core::array::from_fn(|i| (i as i32 - 128) as i8)
    }

    const SCALES: [f32; 8] = [0.001, 0.01, 0.02, 0.0625, 0.1, 0.123, 0.25, 0.5];

    /// Round half away from zero, clamped to i8.
    fn round_i8(v: f64) -> i32 {
        let r = if v >= 0.0 {
            (v + 0.5).floor()
        } else {
            -((-v + 0.5).floor())
        };
        r.clamp(-128.0, 127.0) as i32
    }

    #[test]
    fn sigmoid_params_known_values() {
        // 0.5 * 2^27 = 2^26 = 0.5 * 2^27 -> multiplier 2^30, shift 27, radius 15.
        assert_eq!(
            sigmoid_params(0.5),
            SigmoidParams {
                input_range_radius: 15,
                input_multiplier: 1 << 30,
                input_left_shift: 27
            }
        );
        // 0.1f32 * 2^27 = 13421773.0 (0.1f32 is 13421773 * 2^-27) -> frexp exponent 24.
        let p = sigmoid_params(0.1);
        assert_eq!(p.input_left_shift, 24);
        assert_eq!(p.input_multiplier, (13421773i64 << 7) as i32);
        assert_eq!(p.input_range_radius, 120); // floor(15 * 2^27 / 2^24)
                                               // Tiny scales: radius saturates rather than wrapping.
        assert_eq!(sigmoid_params(1e-10).input_range_radius, i32::MAX);
        // Huge scales: radius 0, everything saturates.
        assert_eq!(sigmoid_params(8.0).input_range_radius, 0);
    }

    #[test]
    fn logistic_i8_within_one_lsb_of_real() {
        for &scale in &SCALES {
            for zp in [-128, -20, 0, 37, 127] {
                let p = sigmoid_params(scale);
                let input = all_i8();
                let mut out = [0i8; 256];
                logistic_i8(&p, zp, &input, &mut out);
                for (&q, &o) in input.iter().zip(&out) {
                    let x = scale as f64 * (q as i32 - zp) as f64;
                    let want = round_i8(256.0 / (1.0 + (-x).exp()) - 128.0);
                    assert!(
                        (o as i32 - want).abs() <= 1,
                        "scale {scale} zp {zp} q {q}: {o} vs {want}"
                    );
                }
                // Monotone non-decreasing in q.
                assert!(
                    out.windows(2).all(|w| w[0] <= w[1]),
                    "scale {scale} zp {zp}"
                );
            }
        }
    }

    #[test]
    fn tanh_i8_within_one_lsb_of_real() {
        for &scale in &SCALES {
            for zp in [-128, -20, 0, 37, 127] {
                let p = sigmoid_params(scale);
                let input = all_i8();
                let mut out = [0i8; 256];
                tanh_i8(&p, zp, &input, &mut out);
                for (&q, &o) in input.iter().zip(&out) {
                    let x = scale as f64 * (q as i32 - zp) as f64;
                    let want = round_i8(128.0 * x.tanh());
                    assert!(
                        (o as i32 - want).abs() <= 1,
                        "scale {scale} zp {zp} q {q}: {o} vs {want}"
                    );
                }
                assert!(
                    out.windows(2).all(|w| w[0] <= w[1]),
                    "scale {scale} zp {zp}"
                );
                // Odd symmetry around the zero point (where both sides exist), up to the
                // rounding of the input rescale (ties toward +infinity) and 127 vs -128.
                for d in 0..=255 {
                    let (hi, lo) = (zp + d, zp - d);
                    if (-128..=127).contains(&hi) && (-128..=127).contains(&lo) {
                        let (a, b) = (
                            out[(hi + 128) as usize] as i32,
                            out[(lo + 128) as usize] as i32,
                        );
                        assert!((a + b).abs() <= 1, "scale {scale} zp {zp} d {d}: {a} {b}");
                    }
                }
            }
        }
    }

    #[test]
    fn logistic_and_tanh_saturate_outside_radius() {
        let p = sigmoid_params(0.1); // radius 120
        let mut out = [0i8; 4];
        logistic_i8(&p, 0, &[-128, -120, 120, 127], &mut out);
        assert_eq!(out, [-128, -128, 127, 127]);
        tanh_i8(&p, 0, &[-128, -120, 120, 127], &mut out);
        assert_eq!(out, [-128, -128, 127, 127]);
        logistic_i8(&p, 0, &[0, 0, 0, 0], &mut out);
        assert_eq!(out, [0; 4]);
        tanh_i8(&p, 0, &[0, 0, 0, 0], &mut out);
        assert_eq!(out, [0; 4]);
        // Scale 8: radius 0, every input saturates (input 0 goes low, as in TFLM).
        let p = sigmoid_params(8.0);
        logistic_i8(&p, 0, &[-1, 0, 1, 127], &mut out);
        assert_eq!(out, [-128, -128, 127, 127]);
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn relu_i8_matches_spec(
            in_scale in 0.005f32..0.5,
            out_scale in 0.005f32..0.5,
            zp_in in prop_oneof![Just(-128), Just(127), -128i32..=127],
            zp_out in prop_oneof![Just(-128), Just(127), -128i32..=127],
            six in any::<bool>(),
        ) {
            let act = if six { Activation::Relu6 } else { Activation::Relu };
            let r = quantize_multiplier(in_scale as f64 / out_scale as f64);
            let clamp = activation_clamp(act, out_scale, zp_out);
            let input = all_i8();
            let mut out = [0i8; 256];
            relu_i8(r, clamp, [zp_in, zp_out], &input, &mut out);
            for (&q, &o) in input.iter().zip(&out) {
                let v = naive_mbqm(q as i64 - zp_in as i64, r.multiplier, r.shift) + zp_out as i64;
                let want = v.max(clamp.min as i64).min(clamp.max as i64) as i8;
                prop_assert_eq!(o, want, "q {}", q);
                // Within 1 LSB of the real RELU / RELU6.
                let x = in_scale as f64 * (q as i32 - zp_in) as f64;
                let y = if six { x.clamp(0.0, 6.0) } else { x.max(0.0) };
                let real = (y / out_scale as f64 + zp_out as f64).clamp(-128.0, 127.0);
                prop_assert!((o as f64 - real).abs() <= 1.0, "q {}: {} vs {}", q, o, real);
            }
        }

        #[test]
        fn float_activations_match_reference(xs in proptest::collection::vec(-30.0f32..30.0, 0..64)) {
            let n = xs.len();
            let (mut relu, mut relu6, mut sig, mut th) =
                (std::vec![0f32; n], std::vec![0f32; n], std::vec![0f32; n], std::vec![0f32; n]);
            relu_float(None, &xs, &mut relu);
            relu_float(Some(6.0), &xs, &mut relu6);
            logistic_float(&xs, &mut sig);
            tanh_float(&xs, &mut th);
            for i in 0..n {
                let x = xs[i] as f64;
                prop_assert_eq!(relu[i] as f64, x.max(0.0));
                prop_assert_eq!(relu6[i] as f64, x.clamp(0.0, 6.0));
                let s = 1.0 / (1.0 + (-x).exp());
                prop_assert!((sig[i] as f64 - s).abs() <= 1e-5 * s, "logistic({}) = {} vs {}", x, sig[i], s);
                let t = x.tanh();
                prop_assert!((th[i] as f64 - t).abs() <= 1e-5 * t.abs() + 1e-30, "tanh({}) = {} vs {}", x, th[i], t);
            }

            // f16 storage vs f32 on the same (f16-rounded) inputs: the f16 result is the f32
            // result rounded once, so within half an f16 ulp (2^-11 relative) of it.
            let xh: Vec<f16> = xs.iter().map(|&v| f16::from_f32(v)).collect();
            let xf: Vec<f32> = xh.iter().map(|v| v.to_f32()).collect();
            let (mut sig_h, mut th_h, mut relu_h) =
                (std::vec![f16::ZERO; n], std::vec![f16::ZERO; n], std::vec![f16::ZERO; n]);
            logistic_float(&xh, &mut sig_h);
            tanh_float(&xh, &mut th_h);
            relu_float(Some(6.0), &xh, &mut relu_h);
            logistic_float(&xf, &mut sig);
            tanh_float(&xf, &mut th);
            relu_float(Some(6.0), &xf, &mut relu6);
            for i in 0..n {
                prop_assert!((sig_h[i].to_f32() - sig[i]).abs() <= sig[i].abs() * 4.9e-4 + 3e-8);
                prop_assert!((th_h[i].to_f32() - th[i]).abs() <= th[i].abs() * 4.9e-4 + 3e-8);
                prop_assert_eq!(relu_h[i].to_f32(), relu6[i]);
            }
        }
    }

    #[test]
    fn float_logistic_extremes() {
        let xs = [
            -200.0f32,
            -88.0,
            0.0,
            88.0,
            200.0,
            f32::NEG_INFINITY,
            f32::INFINITY,
        ];
        let mut out = [0f32; 7];
        logistic_float(&xs, &mut out);
        assert_eq!(out[0], 0.0);
        assert!((out[1] as f64 - (-88f64).exp()).abs() <= 1e-5 * (-88f64).exp());
        assert_eq!(&out[2..], &[0.5, 1.0, 1.0, 0.0, 1.0]);
        let mut out = [0f32; 7];
        tanh_float(&xs, &mut out);
        assert_eq!(out, [-1.0, -1.0, 0.0, 1.0, 1.0, -1.0, 1.0]);
        let mut r = [0f32; 3];
        relu_float(Some(6.0), &[f32::NAN, -0.5, 7.0], &mut r);
        assert!(r[0].is_nan());
        assert_eq!(&r[1..], &[0.0, 6.0]);
    }
}
