//! Fixed-point arithmetic of the TFLite int8 spec, with TFLM's exact rounding.
//!
//! These mirror `tensorflow/lite/kernels/internal/common.h` and gemmlowp's `fixedpoint.h`
//! (double rounding: a rounding doubling high multiply, then a rounding right shift), which is
//! what TFLM's reference kernels use. Fixed-point numbers are plain `i32` raws; the comment on each
//! function names the number of integer bits of its operands (`Qm` = m integer bits, 31 - m
//! fractional bits).

/// `round(a * b / 2^31)` with ties away from zero, saturating the single overflow case
/// (`i32::MIN * i32::MIN`). gemmlowp `SaturatingRoundingDoublingHighMul`.
#[inline(always)]
pub fn saturating_rounding_doubling_high_mul(a: i32, b: i32) -> i32 {
    if a == b && a == i32::MIN {
        return i32::MAX;
    }
    let ab = (a as i64) * (b as i64);
    let nudge: i64 = if ab >= 0 { 1 << 30 } else { 1 - (1 << 30) };
    // C++ `/` truncates toward zero, as Rust's does.
    ((ab + nudge) / (1i64 << 31)) as i32
}

/// `x / 2^exponent` rounded to nearest, ties away from zero. gemmlowp `RoundingDivideByPOT`.
/// `exponent` must be in `0..=31`.
#[inline(always)]
pub fn rounding_divide_by_pot(x: i32, exponent: i32) -> i32 {
    debug_assert!((0..=31).contains(&exponent));
    let mask: i32 = ((1i64 << exponent) - 1) as i32;
    let remainder = x & mask;
    let threshold = (mask >> 1) + i32::from(x < 0);
    (x >> exponent) + i32::from(remainder > threshold)
}

/// `x * multiplier * 2^(shift - 31)` with TFLM's rounding. TFLM `MultiplyByQuantizedMultiplier`.
#[inline(always)]
pub fn multiply_by_quantized_multiplier(x: i32, multiplier: i32, shift: i32) -> i32 {
    let left_shift = if shift > 0 { shift } else { 0 };
    let right_shift = if shift > 0 { 0 } else { -shift };
    rounding_divide_by_pot(
        saturating_rounding_doubling_high_mul(x.wrapping_mul(1i32 << left_shift), multiplier),
        right_shift,
    )
}

/// TFLM `MultiplyByQuantizedMultiplierSmallerThanOneExp` (`left_shift <= 0`).
#[inline(always)]
pub fn multiply_by_quantized_multiplier_smaller_than_one(
    x: i32,
    multiplier: i32,
    left_shift: i32,
) -> i32 {
    rounding_divide_by_pot(
        saturating_rounding_doubling_high_mul(x, multiplier),
        -left_shift,
    )
}

/// TFLM `MultiplyByQuantizedMultiplierGreaterThanOne` (`left_shift >= 0`).
#[inline(always)]
pub fn multiply_by_quantized_multiplier_greater_than_one(
    x: i32,
    multiplier: i32,
    left_shift: i32,
) -> i32 {
    saturating_rounding_doubling_high_mul(x.wrapping_mul(1i32 << left_shift), multiplier)
}

/// gemmlowp `SaturatingRoundingMultiplyByPOT<exponent>` for a run-time exponent in `-31..=31`.
#[inline(always)]
pub fn saturating_rounding_multiply_by_pot(x: i32, exponent: i32) -> i32 {
    if exponent > 0 {
        let threshold: i32 = ((1i64 << (31 - exponent)) - 1) as i32;
        if x > threshold {
            i32::MAX
        } else if x < -threshold {
            i32::MIN
        } else {
            x.wrapping_shl(exponent as u32)
        }
    } else if exponent < 0 {
        rounding_divide_by_pot(x, -exponent)
    } else {
        x
    }
}

/// gemmlowp `RoundingHalfSum` for `i32`: `(a + b) / 2` rounded away from zero.
#[inline(always)]
pub fn rounding_half_sum(a: i32, b: i32) -> i32 {
    let sum = a as i64 + b as i64;
    let sign = if sum >= 0 { 1 } else { -1 };
    ((sum + sign) / 2) as i32
}

/// Q0 raw of 1.0 (saturated: `i32::MAX`).
pub const Q0_ONE: i32 = i32::MAX;

/// Converts a raw with `src_bits` integer bits to one with `dst_bits`. gemmlowp `Rescale`.
#[inline(always)]
pub fn rescale(raw: i32, src_bits: i32, dst_bits: i32) -> i32 {
    saturating_rounding_multiply_by_pot(raw, src_bits - dst_bits)
}

/// exp(a) for a in [-1/4, 0), Q0 in and out. gemmlowp
/// `exp_on_interval_between_negative_one_quarter_and_0_excl`.
fn exp_on_interval_between_negative_one_quarter_and_0_excl(a: i32) -> i32 {
    const CONSTANT_TERM: i32 = 1_895_147_668; // exp(-1/8)
    const CONSTANT_1_OVER_3: i32 = 715_827_883;
    let mul = saturating_rounding_doubling_high_mul;
    let x = a.wrapping_add(1 << 28); // + 1/8
    let x2 = mul(x, x);
    let x3 = mul(x2, x);
    let x4 = mul(x2, x2);
    let x4_over_4 = saturating_rounding_multiply_by_pot(x4, -2);
    let poly = saturating_rounding_multiply_by_pot(
        mul(x4_over_4.wrapping_add(x3), CONSTANT_1_OVER_3).wrapping_add(x2),
        -1,
    );
    CONSTANT_TERM.wrapping_add(mul(CONSTANT_TERM, x.wrapping_add(poly)))
}

/// exp(a) for a <= 0; `a` has `integer_bits` integer bits, the result is Q0.
/// gemmlowp `exp_on_negative_values`.
pub fn exp_on_negative_values(a: i32, integer_bits: i32) -> i32 {
    debug_assert!((0..=30).contains(&integer_bits));
    let fractional_bits = 31 - integer_bits;
    let one_quarter: i32 = 1 << (fractional_bits - 2);
    let mask = one_quarter - 1;
    let a_mod_quarter_minus_one_quarter = (a & mask).wrapping_sub(one_quarter);
    let mut result = exp_on_interval_between_negative_one_quarter_and_0_excl(rescale(
        a_mod_quarter_minus_one_quarter,
        integer_bits,
        0,
    ));
    let remainder = a_mod_quarter_minus_one_quarter.wrapping_sub(a);
    // exp(-2^k) for k = -2..=4, as Q0.
    const BARREL: [(i32, i32); 7] = [
        (-2, 1_672_461_947),
        (-1, 1_302_514_674),
        (0, 790_015_084),
        (1, 290_630_308),
        (2, 39_332_535),
        (3, 720_401),
        (4, 242),
    ];
    for (exponent, multiplier) in BARREL {
        if integer_bits > exponent {
            let shift = fractional_bits + exponent;
            if remainder & (1i32 << shift) != 0 {
                result = saturating_rounding_doubling_high_mul(result, multiplier);
            }
        }
    }
    if integer_bits > 5 {
        let clamp = -(1i32 << (36 - integer_bits)); // -32.0
        if a < clamp {
            result = 0;
        }
    }
    if a == 0 {
        result = Q0_ONE;
    }
    result
}

/// Newton-Raphson iterations shared by the two divisions below; returns x ≈ 1/(1+a) as Q2.
fn newton_reciprocal_q2(half_denominator: i32) -> i32 {
    const C48_OVER_17: i32 = 1_515_870_810;
    const NEG_32_OVER_17: i32 = -1_010_580_540;
    const Q2_ONE: i32 = 1 << 29;
    let mul = saturating_rounding_doubling_high_mul;
    let mut x = C48_OVER_17.wrapping_add(mul(half_denominator, NEG_32_OVER_17));
    for _ in 0..3 {
        let half_denominator_times_x = mul(half_denominator, x);
        let one_minus = Q2_ONE.wrapping_sub(half_denominator_times_x);
        x = x.wrapping_add(rescale(mul(x, one_minus), 4, 2));
    }
    x
}

/// 1 / (1 + a) for a in [0, 1], Q0 in and out. gemmlowp `one_over_one_plus_x_for_x_in_0_1`.
pub fn one_over_one_plus_x_for_x_in_0_1(a: i32) -> i32 {
    let half_denominator = rounding_half_sum(a, Q0_ONE);
    let x = newton_reciprocal_q2(half_denominator);
    // ExactMulByPot<-1> turns Q2 into Q1 without touching the raw; then Rescale<0>.
    rescale(x, 1, 0)
}

/// (1 - a) / (1 + a) for a in [0, 1], Q0 in and out. gemmlowp
/// `one_minus_x_over_one_plus_x_for_x_in_0_1`.
pub fn one_minus_x_over_one_plus_x_for_x_in_0_1(a: i32) -> i32 {
    let half_denominator = rounding_half_sum(a, Q0_ONE);
    let x = newton_reciprocal_q2(half_denominator);
    rescale(x.wrapping_sub(1 << 29), 2, 0)
}

/// Logistic of a value with `integer_bits` integer bits; Q0 result. gemmlowp `logistic`.
pub fn logistic(a: i32, integer_bits: i32) -> i32 {
    if a == 0 {
        return 1 << 30;
    }
    let abs = if a > 0 { a } else { a.wrapping_neg() };
    let positive =
        one_over_one_plus_x_for_x_in_0_1(exp_on_negative_values(abs.wrapping_neg(), integer_bits));
    if a > 0 {
        positive
    } else {
        Q0_ONE.wrapping_sub(positive)
    }
}

/// tanh of a value with `integer_bits` integer bits; Q0 result. gemmlowp `tanh`.
pub fn tanh(a: i32, integer_bits: i32) -> i32 {
    if a == 0 {
        return 0;
    }
    let n = if a < 0 { a } else { a.wrapping_neg() };
    // neg_tanh_on_negative_values: ExactMulByPot<1> gives one more integer bit, same raw.
    let t = one_minus_x_over_one_plus_x_for_x_in_0_1(exp_on_negative_values(n, integer_bits + 1));
    if a < 0 {
        t.wrapping_neg()
    } else {
        t
    }
}

/// `1 / x` for a Q`x_integer_digits` value, as a Q0 raw plus the number of bits above unit.
/// TFLM `GetReciprocal`.
pub fn get_reciprocal(x: i32, x_integer_digits: i32) -> (i32, i32) {
    let headroom_plus_one = (x as u32).leading_zeros() as i32;
    let num_bits_over_unit = x_integer_digits - headroom_plus_one;
    let shifted_sum_minus_one =
        ((x as u32).wrapping_shl(headroom_plus_one as u32)).wrapping_sub(1u32 << 31) as i32;
    (
        one_over_one_plus_x_for_x_in_0_1(shifted_sum_minus_one),
        num_bits_over_unit,
    )
}

/// Is this a valid TFLite quantized multiplier (`[2^30, 2^31)` or 0) with a shift the kernels
/// can apply (`-31..=30`)?
pub const fn requant_is_valid(multiplier: i32, shift: i32) -> bool {
    (multiplier == 0 || multiplier >= (1 << 30)) && shift >= -31 && shift <= 30
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to_f(raw: i32, integer_bits: i32) -> f64 {
        raw as f64 / (1u64 << (31 - integer_bits)) as f64
    }

    #[test]
    fn doubling_high_mul_rounds_and_saturates() {
        assert_eq!(
            saturating_rounding_doubling_high_mul(i32::MIN, i32::MIN),
            i32::MAX
        );
        assert_eq!(
            saturating_rounding_doubling_high_mul(1 << 30, 1 << 30),
            1 << 29
        );
        assert_eq!(
            saturating_rounding_doubling_high_mul(-(1 << 30), 1 << 30),
            -(1 << 29)
        );
        // 3 * 2^30 / 2^31 = 1.5 -> 2; gemmlowp nudges negatives by 1 - 2^30, so -1.5 -> -1
        assert_eq!(saturating_rounding_doubling_high_mul(3, 1 << 30), 2);
        assert_eq!(saturating_rounding_doubling_high_mul(-3, 1 << 30), -1);
    }

    #[test]
    fn rounding_divide_ties_away_from_zero() {
        assert_eq!(rounding_divide_by_pot(5, 1), 3);
        assert_eq!(rounding_divide_by_pot(-5, 1), -3);
        assert_eq!(rounding_divide_by_pot(4, 1), 2);
        assert_eq!(rounding_divide_by_pot(-7, 2), -2);
        assert_eq!(rounding_divide_by_pot(i32::MIN, 31), -1);
        assert_eq!(rounding_divide_by_pot(123, 0), 123);
    }

    #[test]
    fn quantized_multiplier_matches_real_product() {
        // 0.75 = 0.75 * 2^0 -> multiplier 0.75 * 2^31, shift 0
        let m = (0.75f64 * (1u64 << 31) as f64) as i32;
        assert_eq!(multiply_by_quantized_multiplier(1000, m, 0), 750);
        assert_eq!(multiply_by_quantized_multiplier(1000, m, -2), 188); // 187.5 -> 188
        assert_eq!(multiply_by_quantized_multiplier(-1000, m, -2), -188);
        assert_eq!(multiply_by_quantized_multiplier(1000, m, 2), 3000);
    }

    #[test]
    fn exp_logistic_tanh_are_close_to_real() {
        for i in 0..200 {
            let x = -(i as f64) * 0.05; // 0 .. -10
            let raw = (x * (1 << 26) as f64) as i32; // Q5
            let e = to_f(exp_on_negative_values(raw, 5), 0);
            assert!((e - x.exp()).abs() < 1e-6, "exp({x}) = {e}");
            let raw4 = (x * (1 << 27) as f64) as i32; // Q4
            let l = to_f(logistic(raw4, 4), 0);
            assert!(
                (l - 1.0 / (1.0 + (-x).exp())).abs() < 1e-6,
                "logistic({x}) = {l}"
            );
            let t = to_f(tanh(raw4, 4), 0);
            assert!((t - x.tanh()).abs() < 1e-6, "tanh({x}) = {t}");
        }
    }

    #[test]
    fn reciprocal_is_close_to_real() {
        for v in [1.0f64, 1.5, 2.0, 3.7, 100.0, 4095.0] {
            let raw = (v * (1 << 19) as f64) as i32; // Q12
            let (r, bits) = get_reciprocal(raw, 12);
            let got = to_f(r, 0) / 2f64.powi(bits);
            assert!((got - 1.0 / v).abs() / (1.0 / v) < 1e-6, "1/{v} = {got}");
        }
    }
}
