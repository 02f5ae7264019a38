//! LUT: int8 → int8 through a 256-entry table, `out = table[q + 128]`; and [`lut_table`], the
//! host-side builder of such tables.
//!
//! A table holds, for every int8 input, the int8 output closest to the real function of the
//! dequantized input (`quantize_out(f(dequantize_in(q)))`). That is the most exact int8 result
//! any element-wise function can have, and it costs one load per element. The host lowers int8
//! LEAKY_RELU, HARD_SIGMOID, HARD_SWISH, CLAMP and scalar-slope PRELU to it.

/// `output[i] = table[input[i] + 128]`.
pub fn lut_i8(table: &[i8; 256], input: &[i8], output: &mut [i8]) {
    debug_assert_eq!(input.len(), output.len());
    for (o, &q) in output.iter_mut().zip(input) {
        // q + 128 in 0..=255: flipping the sign bit of the two's complement byte.
        *o = table[(q as u8 ^ 0x80) as usize];
    }
}

/// Host-side builder of a [`lut_i8`] table for the real function `f`:
///
/// `table[i] = clamp(round(f(x) as f32 / out_scale) + out_zero_point, -128, 127)` with
/// `q = i - 128` and `x = in_scale as f64 * (q - in_zero_point)`: `f` is evaluated in f64, then
/// its value is quantized exactly as TFLite's `AffineQuantize` (f32 division, rounding half away
/// from zero). A NaN value of `f` maps to the zero point, infinities saturate.
pub fn lut_table(
    in_scale: f32,
    in_zero_point: i32,
    out_scale: f32,
    out_zero_point: i32,
    f: impl Fn(f64) -> f64,
) -> [i8; 256] {
    let mut table = [0i8; 256];
    for (i, t) in table.iter_mut().enumerate() {
        let q = i as i32 - 128;
        let x = in_scale as f64 * (q as i64 - in_zero_point as i64) as f64;
        let y = f(x) as f32;
        // `as i32` saturates (and maps NaN to 0).
        let v = (libm::roundf(y / out_scale) as i32).saturating_add(out_zero_point);
        *t = v.clamp(i8::MIN as i32, i8::MAX as i32) as i8;
    }
    table
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use crate::graph::UnaryFn;
    use crate::kernels::unary::unary_f64;
    use proptest::prelude::*;
    use std::vec::Vec;

    fn config() -> ProptestConfig {
        ProptestConfig {
            cases: 128,
            ..ProptestConfig::default()
        }
    }

    /// Half away from zero, in f64 (independent of `libm::roundf`).
    fn round_away(v: f64) -> f64 {
        if v >= 0.0 {
            (v + 0.5).floor()
        } else {
            -((-v + 0.5).floor())
        }
    }

    fn zero_point() -> impl Strategy<Value = i32> {
        prop_oneof![Just(-128), Just(127), Just(0), -128i32..=127]
    }

    fn function() -> impl Strategy<Value = UnaryFn> {
        prop_oneof![
            (-1.0f32..1.0).prop_map(|alpha| UnaryFn::LeakyRelu { alpha }),
            (-1.0f32..1.0, -1.0f32..1.0)
                .prop_map(|(alpha, beta)| UnaryFn::HardSigmoid { alpha, beta }),
            Just(UnaryFn::HardSwish),
            (-4.0f32..4.0, 0.0f32..4.0).prop_map(|(min, w)| UnaryFn::Clamp { min, max: min + w }),
        ]
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn lookup_is_indexing(table in proptest::collection::vec(any::<i8>(), 256),
                              input in proptest::collection::vec(any::<i8>(), 0..300)) {
            let table: [i8; 256] = table.try_into().unwrap();
            let mut out = std::vec![0i8; input.len()];
            lut_i8(&table, &input, &mut out);
            for (&q, &o) in input.iter().zip(&out) {
                prop_assert_eq!(o, table[(q as i32 + 128) as usize]);
            }
        }

        #[test]
        fn table_matches_formula_and_real(
            f in function(),
            in_scale in prop_oneof![1e-3f32..0.1, 0.1f32..1.0],
            out_scale in prop_oneof![1e-3f32..0.1, 0.1f32..1.0],
            zp_in in zero_point(),
            zp_out in zero_point(),
        ) {
            let table = lut_table(in_scale, zp_in, out_scale, zp_out, |x| unary_f64(f, x));
            let all: Vec<i8> = (-128..=127).map(|q| q as i8).collect();
            let mut out = [0i8; 256];
            lut_i8(&table, &all, &mut out);
            for (&q, &o) in all.iter().zip(&out) {
                // The direct formula, with an independent rounding.
                let x = in_scale as f64 * (q as i32 - zp_in) as f64;
                let y = unary_f64(f, x);
                let want = (round_away(((y as f32) / out_scale) as f64) + zp_out as f64)
                    .clamp(-128.0, 127.0);
                prop_assert_eq!(o as f64, want, "{:?} q={}", f, q);
                // Within half an LSB (plus f32 rounding) of the real value.
                let real = (y / out_scale as f64 + zp_out as f64).clamp(-128.0, 127.0);
                prop_assert!((o as f64 - real).abs() <= 0.5 + 1e-5 * (1.0 + real.abs()),
                    "{:?} q={} out={} real={}", f, q, o, real);
            }
        }
    }

    #[test]
    fn saturation_and_extreme_zero_points() {
        // Identity with a larger input scale saturates both ends.
        let t = lut_table(1.0, 0, 0.5, 0, |x| x);
        assert_eq!(t[0], -128); // q = -128 -> -256
        assert_eq!(t[128], 0); // q = 0
        assert_eq!(t[128 + 63], 126);
        assert_eq!(t[128 + 64], 127);
        assert_eq!(t[255], 127);
        // Zero points at the ends of the range: q = -128 is real 0 in, real 0 maps to 127 out.
        let t = lut_table(0.1, -128, 0.1, 127, |x| -x);
        assert_eq!(t[0], 127);
        assert_eq!(t[1], 126);
        assert_eq!(t[255], -128);
        // Ties round away from zero: 0.5 / 1.0 -> 1, -0.5 -> -1.
        let t = lut_table(0.5, 0, 1.0, 0, |x| x);
        assert_eq!((t[129], t[127], t[130]), (1, -1, 1));
        // Non-finite values: NaN -> zero point, infinities saturate.
        let t = lut_table(1.0, 0, 1.0, 5, |x| {
            if x < 0.0 {
                f64::NAN
            } else {
                f64::INFINITY
            }
        });
        assert_eq!((t[0], t[200]), (5, 127));
        let t = lut_table(1.0, 0, 1.0, 5, |_| f64::NEG_INFINITY);
        assert_eq!(t[17], -128);
    }
}
