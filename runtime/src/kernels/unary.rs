//! Float element-wise functions ([`UnaryFn`]): LEAKY_RELU, HARD_SIGMOID, HARD_SWISH and CLAMP,
//! computed in f32 for f32 and f16 storage. Their int8 forms are lowered to a [`lut`](super::lut)
//! on the host, with [`unary_f64`] as the real function.

use super::Float;
use crate::graph::UnaryFn;

/// `v` limited to `[lo, hi]` by comparisons, so that a NaN `v` stays NaN (unlike `f32::max`)
/// and nothing panics.
#[inline(always)]
fn clip(v: f32, lo: f32, hi: f32) -> f32 {
    if v < lo {
        lo
    } else if v > hi {
        hi
    } else {
        v
    }
}

/// Applies `f` to every element, loading to f32 and storing back once.
#[inline(always)]
fn map<T: Float>(input: &[T], output: &mut [T], f: impl Fn(f32) -> f32) {
    debug_assert_eq!(input.len(), output.len());
    for (o, &x) in output.iter_mut().zip(input) {
        *o = T::from_f32(f(x.to_f32()));
    }
}

/// Float element-wise function, in f32 arithmetic:
///
/// - `LeakyRelu { alpha }`: `x >= 0 ? x : alpha * x`;
/// - `HardSigmoid { alpha, beta }`: `clamp(alpha * x + beta, 0, 1)` (ONNX HardSigmoid);
/// - `HardSwish`: `x * clamp(x + 3, 0, 6) / 6` (multiplied first, then divided, as TFLite's
///   reference);
/// - `Clamp { min, max }`: `clamp(x, min, max)`.
///
/// NaN inputs give NaN. Parameters are finite and `min <= max` (checked by `prepare`).
pub fn unary_float<T: Float>(f: UnaryFn, input: &[T], output: &mut [T]) {
    match f {
        UnaryFn::LeakyRelu { alpha } => {
            map(input, output, |x| if x >= 0.0 { x } else { alpha * x })
        }
        UnaryFn::HardSigmoid { alpha, beta } => {
            map(input, output, |x| clip(alpha * x + beta, 0.0, 1.0))
        }
        UnaryFn::HardSwish => map(input, output, |x| x * clip(x + 3.0, 0.0, 6.0) / 6.0),
        UnaryFn::Clamp { min, max } => map(input, output, |x| clip(x, min, max)),
    }
}

/// The real function of `f` in f64 (host side: the int8 lookup tables are built from it).
pub fn unary_f64(f: UnaryFn, x: f64) -> f64 {
    let clip = |v: f64, lo: f64, hi: f64| {
        if v < lo {
            lo
        } else if v > hi {
            hi
        } else {
            v
        }
    };
    match f {
        UnaryFn::LeakyRelu { alpha } => {
            if x >= 0.0 {
                x
            } else {
                alpha as f64 * x
            }
        }
        UnaryFn::HardSigmoid { alpha, beta } => clip(alpha as f64 * x + beta as f64, 0.0, 1.0),
        UnaryFn::HardSwish => x * clip(x + 3.0, 0.0, 6.0) / 6.0,
        UnaryFn::Clamp { min, max } => clip(x, min as f64, max as f64),
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
            cases: 128,
            ..ProptestConfig::default()
        }
    }

    /// Independent references, written from the op definitions in f64.
    fn reference(f: UnaryFn, x: f64) -> f64 {
        match f {
            UnaryFn::LeakyRelu { alpha } => x.max(0.0) + (alpha as f64) * x.min(0.0),
            UnaryFn::HardSigmoid { alpha, beta } => {
                (alpha as f64 * x + beta as f64).clamp(0.0, 1.0)
            }
            UnaryFn::HardSwish => {
                if x <= -3.0 {
                    0.0
                } else if x >= 3.0 {
                    x
                } else {
                    x * (x + 3.0) / 6.0
                }
            }
            UnaryFn::Clamp { min, max } => x.min(max as f64).max(min as f64),
        }
    }

    fn unary_fn() -> impl Strategy<Value = UnaryFn> {
        prop_oneof![
            (-2.0f32..2.0).prop_map(|alpha| UnaryFn::LeakyRelu { alpha }),
            (-1.0f32..1.0, -1.0f32..1.0)
                .prop_map(|(alpha, beta)| UnaryFn::HardSigmoid { alpha, beta }),
            Just(UnaryFn::HardSigmoid {
                alpha: 0.2,
                beta: 0.5
            }),
            Just(UnaryFn::HardSwish),
            (-10.0f32..10.0, 0.0f32..10.0)
                .prop_map(|(min, w)| UnaryFn::Clamp { min, max: min + w }),
            Just(UnaryFn::Clamp { min: 0.0, max: 0.0 }),
        ]
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn float_matches_reference(
            f in unary_fn(),
            xs in proptest::collection::vec(prop_oneof![-20.0f32..20.0, -3.5f32..3.5], 0..64),
        ) {
            let n = xs.len();
            let mut out = std::vec![0f32; n];
            unary_float(f, &xs, &mut out);
            for (&x, &o) in xs.iter().zip(&out) {
                let want = reference(f, x as f64);
                // A few f32 roundings of operands of magnitude up to |x| (and |beta|).
                // (HardSigmoid's `alpha * x + beta` may cancel: 3e-7 absolute covers its two
                // roundings for results in [0, 1].)
                let tol = 1e-5 * want.abs() + 3e-7;
                prop_assert!((o as f64 - want).abs() <= tol, "{:?}({}) = {}, want {}", f, x, o, want);
                // The host-side f64 function agrees with the reference.
                let host = unary_f64(f, x as f64);
                prop_assert!((host - want).abs() <= 1e-12 * (1.0 + want.abs()), "{:?}({})", f, x);
            }
            // f16 storage: the f32 result on the f16-rounded inputs, rounded once to f16.
            let xh: Vec<f16> = xs.iter().map(|&v| f16::from_f32(v)).collect();
            let xf: Vec<f32> = xh.iter().map(|v| v.to_f32()).collect();
            let mut out_h = std::vec![f16::ZERO; n];
            unary_float(f, &xh, &mut out_h);
            unary_float(f, &xf, &mut out);
            for i in 0..n {
                prop_assert_eq!(out_h[i], f16::from_f32(out[i]));
                // ... so within half an f16 ulp (2^-11 relative, or 2^-25 absolute near zero)
                // of the exact function on those inputs.
                let want = reference(f, xf[i] as f64);
                let tol = want.abs() * (1.0 / 2048.0 + 1e-5) + 4e-7;
                prop_assert!((out_h[i].to_f32() as f64 - want).abs() <= tol, "{:?}({})", f, xf[i]);
            }
        }
    }

    #[test]
    fn edge_values() {
        let xs = [-4.0f32, -3.0, -1.5, -0.0, 0.0, 1.5, 3.0, 4.0, f32::NAN];
        let mut out = [0f32; 9];
        unary_float(UnaryFn::HardSwish, &xs, &mut out);
        assert_eq!(&out[..8], &[0.0, 0.0, -0.375, 0.0, 0.0, 1.125, 3.0, 4.0]);
        assert!(out[8].is_nan());
        unary_float(UnaryFn::LeakyRelu { alpha: 0.5 }, &xs, &mut out);
        assert_eq!(&out[..8], &[-2.0, -1.5, -0.75, 0.0, 0.0, 1.5, 3.0, 4.0]);
        assert!(out[8].is_nan());
        unary_float(
            UnaryFn::HardSigmoid {
                alpha: 0.25,
                beta: 0.5,
            },
            &xs,
            &mut out,
        );
        assert_eq!(&out[..8], &[0.0, 0.0, 0.125, 0.5, 0.5, 0.875, 1.0, 1.0]);
        assert!(out[8].is_nan());
        unary_float(
            UnaryFn::Clamp {
                min: -1.0,
                max: 2.0,
            },
            &xs,
            &mut out,
        );
        assert_eq!(&out[..8], &[-1.0, -1.0, -1.0, 0.0, 0.0, 1.5, 2.0, 2.0]);
        assert!(out[8].is_nan());
        // Infinities saturate.
        let mut o = [0f32; 2];
        unary_float(
            UnaryFn::Clamp {
                min: -1.0,
                max: 2.0,
            },
            &[f32::NEG_INFINITY, f32::INFINITY],
            &mut o,
        );
        assert_eq!(o, [-1.0, 2.0]);
    }
}
