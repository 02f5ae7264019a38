//! QUANTIZE (float → int8, int8 → int8) and DEQUANTIZE (int8 → float), plus the host-side
//! `Prepare` math shared by several int8 ops: [`quantize_multiplier`], [`add_params`],
//! [`mul_params`] and [`activation_clamp`].
//!
//! The `Prepare` helpers use `f64` (and `f32`) arithmetic exactly as TFLM does, so that the
//! multipliers and clamps stored in an artifact are bit-identical to TFLM's. They run on the host
//! (or once at load time), never per inference.

use super::Float;
use crate::graph::{Activation, BinaryParams, ClampI8, Requant};
use crate::quant::multiply_by_quantized_multiplier;

/// Clamps an `i32` to the `i8` range.
#[inline(always)]
fn saturate_i8(v: i32) -> i8 {
    v.clamp(i8::MIN as i32, i8::MAX as i32) as i8
}

/// `round(v)` with ties away from zero, converted to `i32` (saturating; NaN → 0). This is
/// `static_cast<int32_t>(TfLiteRound(v))` for every input where the C++ is defined.
#[inline(always)]
fn round_to_i32(v: f32) -> i32 {
    libm::roundf(v) as i32
}

/// float → int8, TFLM `AffineQuantize`: `q = round(x / scale) + zero_point` (the division in
/// f32, rounding half away from zero), clamped to `[-128, 127]`.
pub fn quantize_to_i8<T: Float>(scale: f32, zero_point: i32, input: &[T], output: &mut [i8]) {
    debug_assert_eq!(input.len(), output.len());
    for (o, &x) in output.iter_mut().zip(input) {
        *o = saturate_i8(round_to_i32(x.to_f32() / scale).saturating_add(zero_point));
    }
}

/// int8 → int8, TFLM `Requantize`:
/// `out = clamp(multiply_by_quantized_multiplier(q - zp_in, m, s) + zp_out, -128, 127)`.
///
/// `requant` is [`quantize_multiplier`]`(in_scale / out_scale)`; `zero_points` are those of the
/// input and the output.
pub fn requantize_i8(requant: Requant, zero_points: [i32; 2], input: &[i8], output: &mut [i8]) {
    debug_assert_eq!(input.len(), output.len());
    let [zp_in, zp_out] = zero_points;
    for (o, &q) in output.iter_mut().zip(input) {
        let v =
            multiply_by_quantized_multiplier(q as i32 - zp_in, requant.multiplier, requant.shift);
        *o = saturate_i8(v.saturating_add(zp_out));
    }
}

/// int8 → float, TFLM `Dequantize`: `(scale as f64 * (q - zp) as f64) as f32`, then stored as `T`.
pub fn dequantize_i8<T: Float>(scale: f32, zero_point: i32, input: &[i8], output: &mut [T]) {
    debug_assert_eq!(input.len(), output.len());
    let scale = scale as f64;
    for (o, &q) in output.iter_mut().zip(input) {
        *o = T::from_f32((scale * (q as i32 - zero_point) as f64) as f32);
    }
}

/// TFLite `QuantizeMultiplier`: splits `real` into a Q31 mantissa and a power-of-two exponent,
/// `real ≈ multiplier * 2^(shift - 31)`.
///
/// `0.0` gives `(0, 0)`; the mantissa is `round(frac * 2^31)` (ties away from zero) of
/// `(frac, shift) = frexp(real)`, renormalised when it rounds up to `2^31`; exponents below `-31`
/// flush to `(0, 0)`. Host-side (`f64`) math.
pub fn quantize_multiplier(real: f64) -> Requant {
    if real == 0.0 {
        return Requant {
            multiplier: 0,
            shift: 0,
        };
    }
    let (frac, mut shift) = libm::frexp(real);
    let mut q_fixed = libm::round(frac * (1i64 << 31) as f64) as i64;
    debug_assert!(q_fixed <= 1i64 << 31);
    if q_fixed == 1i64 << 31 {
        q_fixed /= 2;
        shift += 1;
    }
    if shift < -31 {
        shift = 0;
        q_fixed = 0;
    }
    Requant {
        multiplier: q_fixed as i32,
        shift,
    }
}

/// Host-side `Prepare` of int8 ADD, exactly as TFLM: `left_shift = 20`,
/// `twice_max = 2 * max(s0, s1)`, `input0 = quantize_multiplier(s0 / twice_max)`,
/// `input1 = quantize_multiplier(s1 / twice_max)`,
/// `output = quantize_multiplier(twice_max / (2^20 * s_out))`; all in `f64` from the `f32` scales.
///
/// `clamp` is the output clamp (see [`activation_clamp`]); `activation` is left at
/// [`Activation::None`] (it only matters to float kernels).
pub fn add_params(s0: f32, s1: f32, s_out: f32, clamp: ClampI8) -> BinaryParams {
    const LEFT_SHIFT: i32 = 20;
    let (s0, s1, s_out) = (s0 as f64, s1 as f64, s_out as f64);
    let twice_max = 2.0 * if s0 > s1 { s0 } else { s1 };
    BinaryParams {
        activation: Activation::None,
        left_shift: LEFT_SHIFT,
        input0: quantize_multiplier(s0 / twice_max),
        input1: quantize_multiplier(s1 / twice_max),
        output: quantize_multiplier(twice_max / ((1i64 << LEFT_SHIFT) as f64 * s_out)),
        clamp,
    }
}

/// Host-side `Prepare` of int8 MUL, exactly as TFLM: `output = quantize_multiplier(s0 * s1 / s_out)`
/// in `f64`. The ADD-only fields (`left_shift`, `input0`, `input1`) are zero.
pub fn mul_params(s0: f32, s1: f32, s_out: f32, clamp: ClampI8) -> BinaryParams {
    BinaryParams {
        activation: Activation::None,
        left_shift: 0,
        input0: Requant::default(),
        input1: Requant::default(),
        output: quantize_multiplier(s0 as f64 * s1 as f64 / s_out as f64),
        clamp,
    }
}

/// Output clamp of a fused activation in the quantized domain (TFLM
/// `CalculateActivationRangeQuantized` for int8): with `quantize(f) = zero_point + round(f / scale)`
/// (f32 division, ties away from zero),
/// `None` → `[-128, 127]`, `Relu` → `[max(-128, quantize(0)), 127]`,
/// `Relu6` → `[max(-128, quantize(0)), min(127, quantize(6))]`,
/// `ReluN1To1` → `[max(-128, quantize(-1)), min(127, quantize(1))]`.
///
/// Each bound is also kept inside the `i8` range (TFLM would only ever see such values for a
/// zero point outside `[-128, 127]`).
pub fn activation_clamp(activation: Activation, scale: f32, zero_point: i32) -> ClampI8 {
    let quantize = |f: f32| zero_point.saturating_add(round_to_i32(f / scale));
    let (lo, hi) = match activation {
        Activation::None => (i8::MIN as i32, i8::MAX as i32),
        Activation::Relu => (quantize(0.0).max(i8::MIN as i32), i8::MAX as i32),
        Activation::Relu6 => (
            quantize(0.0).max(i8::MIN as i32),
            quantize(6.0).min(i8::MAX as i32),
        ),
        Activation::ReluN1To1 => (
            quantize(-1.0).max(i8::MIN as i32),
            quantize(1.0).min(i8::MAX as i32),
        ),
    };
    ClampI8 {
        min: saturate_i8(lo),
        max: saturate_i8(hi),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    extern crate std;

    use super::*;
    use half::f16;
    use proptest::prelude::*;
    use std::vec::Vec;

    /// Independent i64 model of `saturating_rounding_doubling_high_mul` (without the single
    /// saturating case): `round(a * b / 2^31)` with ties toward +infinity, which is what
    /// gemmlowp's nudge (`2^30` for a non-negative product, `1 - 2^30` for a negative one, then a
    /// truncating division) amounts to.
    pub(crate) fn naive_high_mul(a: i64, b: i64) -> i64 {
        (a * b + (1i64 << 30)).div_euclid(1i64 << 31)
    }

    /// Independent model of `rounding_divide_by_pot`: `v / 2^e` to nearest, ties away from zero.
    pub(crate) fn naive_div_pot(v: i64, e: i32) -> i64 {
        let d = 1i64 << e;
        let (q, r) = (v.div_euclid(d), v.rem_euclid(d));
        if 2 * r > d || (2 * r == d && v >= 0) {
            q + 1
        } else {
            q
        }
    }

    /// Independent model of `multiply_by_quantized_multiplier`.
    pub(crate) fn naive_mbqm(x: i64, m: i32, shift: i32) -> i64 {
        naive_div_pot(naive_high_mul(x << shift.max(0), m as i64), (-shift).max(0))
    }

    fn config() -> ProptestConfig {
        ProptestConfig {
            cases: 64,
            ..ProptestConfig::default()
        }
    }

    /// `round(x)` with ties away from zero, in f64, as an independent reference.
    fn round_away(x: f64) -> f64 {
        if x >= 0.0 {
            (x + 0.5).floor()
        } else {
            -((-x + 0.5).floor())
        }
    }

    #[test]
    fn quantize_multiplier_known_values() {
        assert_eq!(
            quantize_multiplier(0.0),
            Requant {
                multiplier: 0,
                shift: 0
            }
        );
        assert_eq!(
            quantize_multiplier(0.5),
            Requant {
                multiplier: 1 << 30,
                shift: 0
            }
        );
        assert_eq!(
            quantize_multiplier(1.0),
            Requant {
                multiplier: 1 << 30,
                shift: 1
            }
        );
        assert_eq!(
            quantize_multiplier(0.75),
            Requant {
                multiplier: 3 << 29,
                shift: 0
            }
        );
        assert_eq!(
            quantize_multiplier(3.0),
            Requant {
                multiplier: 3 << 29,
                shift: 2
            }
        );
        // Rounds up to 2^31: renormalised.
        let just_below_one = 1.0 - 1e-12;
        assert_eq!(
            quantize_multiplier(just_below_one),
            Requant {
                multiplier: 1 << 30,
                shift: 1
            }
        );
        // Below 2^-32: flushed to zero.
        assert_eq!(
            quantize_multiplier(1e-10),
            Requant {
                multiplier: 0,
                shift: 0
            }
        );
        // Just inside: shift -31 is kept.
        let r = quantize_multiplier(0.75 * 2f64.powi(-31));
        assert_eq!(
            r,
            Requant {
                multiplier: 3 << 29,
                shift: -31
            }
        );
        // Ties go away from zero: frac * 2^31 = 2^30 + 0.5.
        let tie = (2f64.powi(30) + 0.5) / 2f64.powi(31);
        assert_eq!(
            quantize_multiplier(tie),
            Requant {
                multiplier: (1 << 30) + 1,
                shift: 0
            }
        );
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn quantize_multiplier_round_trips(mantissa in 0.5f64..1.0, exp in -30i32..30) {
            let real = mantissa * 2f64.powi(exp);
            let r = quantize_multiplier(real);
            prop_assert!(crate::quant::requant_is_valid(r.multiplier, r.shift), "{:?}", r);
            let back = r.multiplier as f64 * 2f64.powi(r.shift - 31);
            prop_assert!(((back - real) / real).abs() <= 2f64.powi(-30), "{} -> {:?} -> {}", real, r, back);
        }

        #[test]
        fn quantize_matches_reference(
            scale in 1e-3f32..1.0,
            zp in -128i32..=127,
            xs in proptest::collection::vec(-200.0f32..200.0, 0..40),
        ) {
            let mut out = std::vec![0i8; xs.len()];
            quantize_to_i8(scale, zp, &xs, &mut out);
            for (&x, &o) in xs.iter().zip(&out) {
                let q = round_away((x / scale) as f64) + zp as f64;
                let want = q.clamp(-128.0, 127.0) as i8;
                prop_assert_eq!(o, want, "x={} scale={} zp={}", x, scale, zp);
            }
            // f16 input: same as converting to f32 first.
            let xh: Vec<f16> = xs.iter().map(|&x| f16::from_f32(x)).collect();
            let xf: Vec<f32> = xh.iter().map(|x| x.to_f32()).collect();
            let mut out_h = std::vec![0i8; xs.len()];
            let mut out_f = std::vec![0i8; xs.len()];
            quantize_to_i8(scale, zp, &xh, &mut out_h);
            quantize_to_i8(scale, zp, &xf, &mut out_f);
            prop_assert_eq!(out_h, out_f);
        }

        #[test]
        fn requantize_matches_reference(
            in_scale in 1e-3f32..1.0,
            out_scale in 1e-3f32..1.0,
            zps in (-128i32..=127, -128i32..=127),
            qs in proptest::collection::vec(any::<i8>(), 0..64),
        ) {
            let r = quantize_multiplier(in_scale as f64 / out_scale as f64);
            let mut out = std::vec![0i8; qs.len()];
            requantize_i8(r, [zps.0, zps.1], &qs, &mut out);
            for (&q, &o) in qs.iter().zip(&out) {
                let v = naive_mbqm(q as i64 - zps.0 as i64, r.multiplier, r.shift);
                let want = (v + zps.1 as i64).clamp(-128, 127) as i8;
                prop_assert_eq!(o, want, "q={}", q);
                // And within 1 LSB of the real rescale.
                let real = (q as f64 - zps.0 as f64) * in_scale as f64 / out_scale as f64 + zps.1 as f64;
                prop_assert!((o as f64 - real.clamp(-128.0, 127.0)).abs() <= 1.0, "q={} real={}", q, real);
            }
        }

        #[test]
        fn dequantize_matches_reference(
            scale in 1e-4f32..10.0,
            zp in -128i32..=127,
            qs in proptest::collection::vec(any::<i8>(), 0..64),
        ) {
            let mut out = std::vec![0f32; qs.len()];
            dequantize_i8(scale, zp, &qs, &mut out);
            let mut out_h = std::vec![f16::ZERO; qs.len()];
            dequantize_i8(scale, zp, &qs, &mut out_h);
            for i in 0..qs.len() {
                let want = scale as f64 * (qs[i] as f64 - zp as f64);
                prop_assert!((out[i] as f64 - want).abs() <= want.abs() * 1e-7, "{} vs {}", out[i], want);
                prop_assert_eq!(out_h[i], f16::from_f32(out[i]));
            }
        }
    }

    #[test]
    fn quantize_rounds_half_away_and_saturates() {
        let xs = [
            0.5f32,
            -0.5,
            1.5,
            -1.5,
            2.5,
            1e9,
            -1e9,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ];
        let mut out = [0i8; 10];
        quantize_to_i8(1.0, 0, &xs, &mut out);
        assert_eq!(out, [1, -1, 2, -2, 3, 127, -128, 127, -128, 0]);
        let mut out = [0i8; 10];
        quantize_to_i8(1.0, -128, &xs, &mut out);
        assert_eq!(
            out,
            [-127, -128, -126, -128, -125, 127, -128, 127, -128, -128]
        );
        quantize_to_i8(1.0, 127, &xs, &mut out);
        assert_eq!(out, [127, 126, 127, 125, 127, 127, -128, 127, -128, 127]);
    }

    #[test]
    fn requantize_saturates_at_both_ends() {
        let r = quantize_multiplier(4.0);
        let mut out = [0i8; 3];
        requantize_i8(r, [0, 0], &[-128, 100, 3], &mut out);
        assert_eq!(out, [-128, 127, 12]);
        requantize_i8(r, [-128, 127], &[-128, -127, 127], &mut out);
        assert_eq!(out, [127, 127, 127]);
        requantize_i8(r, [127, 0], &[127, 126, -128], &mut out);
        assert_eq!(out, [0, -4, -128]);
    }

    #[test]
    fn add_and_mul_params_match_tflm_prepare() {
        let p = add_params(0.5, 0.25, 0.125, ClampI8::default());
        assert_eq!(p.left_shift, 20);
        assert_eq!(
            p.input0,
            Requant {
                multiplier: 1 << 30,
                shift: 0
            }
        ); // 0.5
        assert_eq!(
            p.input1,
            Requant {
                multiplier: 1 << 30,
                shift: -1
            }
        ); // 0.25
           // 1 / (2^20 * 0.125) = 2^-17 = 0.5 * 2^-16
        assert_eq!(
            p.output,
            Requant {
                multiplier: 1 << 30,
                shift: -16
            }
        );
        let p = mul_params(
            0.5,
            0.25,
            0.1,
            ClampI8 {
                min: -100,
                max: 100,
            },
        );
        assert_eq!(
            p.output,
            quantize_multiplier(0.5f32 as f64 * 0.25f32 as f64 / 0.1f32 as f64)
        );
        assert_eq!(
            p.clamp,
            ClampI8 {
                min: -100,
                max: 100
            }
        );
    }

    #[test]
    fn activation_clamps() {
        use Activation::*;
        assert_eq!(
            activation_clamp(None, 0.1, 5),
            ClampI8 {
                min: -128,
                max: 127
            }
        );
        assert_eq!(activation_clamp(Relu, 0.1, 5), ClampI8 { min: 5, max: 127 });
        assert_eq!(
            activation_clamp(Relu, 0.1, -128),
            ClampI8 {
                min: -128,
                max: 127
            }
        );
        // 6 / 0.05 = 120 (f32 division: 119.99999 or 120.00001, rounds to 120).
        assert_eq!(
            activation_clamp(Relu6, 0.05, -128),
            ClampI8 { min: -128, max: -8 }
        );
        assert_eq!(
            activation_clamp(Relu6, 0.05, 10),
            ClampI8 { min: 10, max: 127 }
        );
        assert_eq!(
            activation_clamp(Relu6, 6.0 / 255.0, 127),
            ClampI8 { min: 127, max: 127 }
        );
        assert_eq!(
            activation_clamp(ReluN1To1, 0.01, 0),
            ClampI8 {
                min: -100,
                max: 100
            }
        );
        assert_eq!(
            activation_clamp(ReluN1To1, 1.0 / 256.0, 0),
            ClampI8 {
                min: -128,
                max: 127
            }
        );
        // 1 / 0.4 = 2.5 rounds away from zero to 3.
        assert_eq!(
            activation_clamp(ReluN1To1, 0.4, 0),
            ClampI8 { min: -3, max: 3 }
        );
    }
}
