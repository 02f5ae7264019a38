//! FULLY_CONNECTED: `output[b, o] = sum_i weights[o, i] * input[b, i] + bias[o]`, weights
//! `[out_features, in_features]`, input `[batch, in_features]`, output `[batch, out_features]`.
//!
//! The int8 body follows TFLM's reference `integer_ops/fully_connected.h` exactly, including a
//! non-zero weights zero point; the float body runs the same loops in f32. The inner loop is a
//! dot product of two contiguous rows.

use super::conv::{requantize, QuantizedOutput};
use crate::graph::Activation;
use crate::kernels::{activate, Float};

/// Shape of one FULLY_CONNECTED invocation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FullyConnectedGeometry {
    /// Rows of the input and of the output.
    pub batch: usize,
    /// Input features (length of one input row and of one weights row).
    pub in_features: usize,
    /// Output features (rows of the weights, length of one output row).
    pub out_features: usize,
}

/// Checks the slice lengths against the geometry (debug builds only).
#[inline(always)]
fn debug_check<A, W, B, O>(
    g: &FullyConnectedGeometry,
    input: &[A],
    weights: &[W],
    bias: Option<&[B]>,
    output: &[O],
) {
    debug_assert_eq!(input.len(), g.batch * g.in_features);
    debug_assert_eq!(weights.len(), g.out_features * g.in_features);
    debug_assert!(bias.is_none_or(|b| b.len() == g.out_features));
    debug_assert_eq!(output.len(), g.batch * g.out_features);
}

/// int8 FULLY_CONNECTED (TFLM reference arithmetic, bit-exact).
///
/// `acc = sum_i (weights[o, i] - filter_zero_point) * (input[b, i] - input_zero_point)`, plus
/// `bias[o]`, requantized with `q.requant[o]` (or `q.requant[0]` when it has one entry), plus the
/// output zero point, clamped to `q.clamp`.
///
/// Accumulator bound: both factors are at most 255 in magnitude, so `|acc| <= 65025 *
/// in_features`, which fits `i32` for up to 33 025 input features. Beyond that (and for the bias
/// add) the sums wrap, as TFLM's do, rather than panic.
///
/// On Cortex-M4/M7 (the `dsp` target feature) this runs the DSP fast path of
/// [`super::arch::cortex_m`], which is bit-exact with the portable body; elsewhere, or with the
/// `portable-kernels` feature, the portable body.
pub fn fully_connected_i8(
    g: &FullyConnectedGeometry,
    q: &QuantizedOutput<'_>,
    input: &[i8],
    weights: &[i8],
    bias: Option<&[i32]>,
    output: &mut [i8],
) {
    #[cfg(kiln_dsp_kernels)]
    super::arch::cortex_m::fully_connected_i8(g, q, input, weights, bias, output);
    #[cfg(kiln_neon_kernels)]
    super::arch::aarch64::fully_connected_i8(g, q, input, weights, bias, output);
    #[cfg(kiln_x86_kernels)]
    super::arch::x86_64::fully_connected_i8(g, q, input, weights, bias, output);
    #[cfg(not(any(kiln_dsp_kernels, kiln_neon_kernels, kiln_x86_kernels)))]
    fully_connected_i8_portable(g, q, input, weights, bias, output);
}

/// The portable body of [`fully_connected_i8`], on every target. Fast paths are tested byte for
/// byte against it.
pub fn fully_connected_i8_portable(
    g: &FullyConnectedGeometry,
    q: &QuantizedOutput<'_>,
    input: &[i8],
    weights: &[i8],
    bias: Option<&[i32]>,
    output: &mut [i8],
) {
    debug_check(g, input, weights, bias, output);
    debug_assert!(q.requant.len() == 1 || q.requant.len() == g.out_features);
    let input_offset = -q.input_zero_point;
    let filter_offset = -q.filter_zero_point;
    let per_channel = q.requant.len() > 1;
    let n = g.in_features;
    for b in 0..g.batch {
        let x = &input[b * n..][..n];
        let out = &mut output[b * g.out_features..][..g.out_features];
        for (o, y) in out.iter_mut().enumerate() {
            let w = &weights[o * n..][..n];
            let mut acc = x.iter().zip(w).fold(0i32, |s, (&x, &w)| {
                s.wrapping_add((i32::from(w) + filter_offset) * (i32::from(x) + input_offset))
            });
            if let Some(bias) = bias {
                acc = acc.wrapping_add(bias[o]);
            }
            let r = if per_channel {
                q.requant[o]
            } else {
                q.requant[0]
            };
            *y = requantize(acc, r, q.output_zero_point, q.clamp);
        }
    }
}

/// Float FULLY_CONNECTED (f32 or f16 storage, f32 arithmetic): `sum_i weights[o, i] *
/// input[b, i] + bias[o]`, then the fused `activation`. Only the final store rounds (to f16 for
/// f16 storage).
pub fn fully_connected_float<T: Float>(
    g: &FullyConnectedGeometry,
    activation: Activation,
    input: &[T],
    weights: &[T],
    bias: Option<&[T]>,
    output: &mut [T],
) {
    debug_check(g, input, weights, bias, output);
    let n = g.in_features;
    for b in 0..g.batch {
        let x = &input[b * n..][..n];
        let out = &mut output[b * g.out_features..][..g.out_features];
        for (o, y) in out.iter_mut().enumerate() {
            let w = &weights[o * n..][..n];
            let mut acc = 0.0f32;
            for (&x, &w) in x.iter().zip(w) {
                acc += x.to_f32() * w.to_f32();
            }
            if let Some(bias) = bias {
                acc += bias[o].to_f32();
            }
            *y = T::from_f32(activate(acc, activation));
        }
    }
}

/// Multiply-accumulates of one FULLY_CONNECTED invocation (for reports): `batch * in_features *
/// out_features`, saturating at `u64::MAX`.
pub fn fully_connected_macs(g: &FullyConnectedGeometry) -> u64 {
    (g.batch as u64)
        .saturating_mul(g.in_features as u64)
        .saturating_mul(g.out_features as u64)
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use crate::graph::{ClampI8, Requant};
    use crate::kernels::conv::tests::{
        activate_f64, activation, assert_close_f16, assert_close_f32, clamp, float_data, from_f16,
        reference_output, requants, to_f16, zero_point,
    };
    use half::f16;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use std::vec::Vec;

    fn geometry() -> impl Strategy<Value = FullyConnectedGeometry> {
        (1usize..=3, 1usize..=24, 1usize..=8).prop_map(|(batch, in_features, out_features)| {
            FullyConnectedGeometry {
                batch,
                in_features,
                out_features,
            }
        })
    }

    /// Naive i64 reference: transposed loop order (feature-major), exact sums.
    fn reference_i8(
        g: &FullyConnectedGeometry,
        q: &QuantizedOutput<'_>,
        input: &[i8],
        weights: &[i8],
        bias: Option<&[i32]>,
    ) -> Vec<i8> {
        let mut acc = std::vec![0i64; g.batch * g.out_features];
        for i in 0..g.in_features {
            for b in 0..g.batch {
                let x = i64::from(input[b * g.in_features + i]) - i64::from(q.input_zero_point);
                for o in 0..g.out_features {
                    let w =
                        i64::from(weights[o * g.in_features + i]) - i64::from(q.filter_zero_point);
                    acc[b * g.out_features + o] += w * x;
                }
            }
        }
        acc.iter()
            .enumerate()
            .map(|(k, &a)| {
                let o = k % g.out_features;
                let a = a + bias.map_or(0, |b| i64::from(b[o]));
                let r = q.requant[if q.requant.len() == 1 { 0 } else { o }];
                reference_output(a, r, q.output_zero_point, q.clamp)
            })
            .collect()
    }

    fn reference_f64(
        g: &FullyConnectedGeometry,
        act: Activation,
        input: &[f32],
        weights: &[f32],
        bias: Option<&[f32]>,
    ) -> Vec<f64> {
        let mut out = Vec::new();
        for b in 0..g.batch {
            for o in 0..g.out_features {
                let dot: f64 = (0..g.in_features)
                    .map(|i| {
                        f64::from(input[b * g.in_features + i])
                            * f64::from(weights[o * g.in_features + i])
                    })
                    .sum();
                out.push(activate_f64(
                    dot + bias.map_or(0.0, |b| f64::from(b[o])),
                    act,
                ));
            }
        }
        out
    }

    #[derive(Debug, Clone)]
    struct I8Case {
        g: FullyConnectedGeometry,
        input: Vec<i8>,
        weights: Vec<i8>,
        bias: Option<Vec<i32>>,
        requant: Vec<Requant>,
        zero_points: (i32, i32, i32),
        clamp: ClampI8,
    }

    fn i8_case() -> impl Strategy<Value = I8Case> {
        geometry().prop_flat_map(|g| {
            (
                Just(g),
                vec(any::<i8>(), g.batch * g.in_features),
                vec(any::<i8>(), g.out_features * g.in_features),
                proptest::option::of(vec(-100_000i32..=100_000, g.out_features)),
                requants(g.out_features),
                (
                    zero_point(),
                    prop_oneof![Just(0i32), zero_point()],
                    zero_point(),
                ),
                clamp(),
            )
                .prop_map(|(g, input, weights, bias, requant, zero_points, clamp)| {
                    I8Case {
                        g,
                        input,
                        weights,
                        bias,
                        requant,
                        zero_points,
                        clamp,
                    }
                })
        })
    }

    #[derive(Debug, Clone)]
    struct FloatCase {
        g: FullyConnectedGeometry,
        act: Activation,
        input: Vec<f32>,
        weights: Vec<f32>,
        bias: Option<Vec<f32>>,
    }

    fn float_case() -> impl Strategy<Value = FloatCase> {
        (geometry(), activation()).prop_flat_map(|(g, act)| {
            (
                Just(g),
                Just(act),
                float_data(g.batch * g.in_features),
                float_data(g.out_features * g.in_features),
                proptest::option::of(float_data(g.out_features)),
            )
                .prop_map(|(g, act, input, weights, bias)| FloatCase {
                    g,
                    act,
                    input,
                    weights,
                    bias,
                })
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn fully_connected_i8_matches_reference(c in i8_case()) {
            let (input_zero_point, filter_zero_point, output_zero_point) = c.zero_points;
            let q = QuantizedOutput {
                input_zero_point,
                filter_zero_point,
                output_zero_point,
                requant: &c.requant,
                clamp: c.clamp,
            };
            let mut out = std::vec![0i8; c.g.batch * c.g.out_features];
            fully_connected_i8(&c.g, &q, &c.input, &c.weights, c.bias.as_deref(), &mut out);
            prop_assert_eq!(out, reference_i8(&c.g, &q, &c.input, &c.weights, c.bias.as_deref()));
        }

        #[test]
        fn fully_connected_f32_matches_f64_reference(c in float_case()) {
            let mut out = std::vec![0f32; c.g.batch * c.g.out_features];
            fully_connected_float(&c.g, c.act, &c.input, &c.weights, c.bias.as_deref(), &mut out);
            assert_close_f32(&out, &reference_f64(&c.g, c.act, &c.input, &c.weights, c.bias.as_deref()));
        }

        #[test]
        fn fully_connected_f16_matches_f32_kernel(c in float_case()) {
            let (input, weights) = (to_f16(&c.input), to_f16(&c.weights));
            let bias = c.bias.as_deref().map(to_f16);
            let mut out16 = std::vec![f16::ZERO; c.g.batch * c.g.out_features];
            fully_connected_float(&c.g, c.act, &input, &weights, bias.as_deref(), &mut out16);
            let bias32 = bias.as_deref().map(from_f16);
            let mut out32 = std::vec![0f32; c.g.batch * c.g.out_features];
            fully_connected_float(&c.g, c.act, &from_f16(&input), &from_f16(&weights), bias32.as_deref(), &mut out32);
            assert_close_f16(&out16, &out32);
        }
    }

    #[test]
    fn fully_connected_i8_hand_example() {
        let g = FullyConnectedGeometry {
            batch: 2,
            in_features: 2,
            out_features: 1,
        };
        // multiplier 2^30, shift 1: x 1.0
        let requant = [Requant {
            multiplier: 1 << 30,
            shift: 1,
        }];
        let q = QuantizedOutput {
            input_zero_point: 1,
            filter_zero_point: -2,
            output_zero_point: -5,
            requant: &requant,
            clamp: ClampI8::default(),
        };
        let mut out = [0i8; 2];
        // row 0: (3+2)*(1-1) + (4+2)*(2-1) = 6, + bias 1 - 5 = 2
        // row 1: (3+2)*(-1-1) + (4+2)*(10-1) = -10 + 54 = 44, + 1 - 5 = 40
        fully_connected_i8(&g, &q, &[1, 2, -1, 10], &[3, 4], Some(&[1]), &mut out);
        assert_eq!(out, [2, 40]);
        assert_eq!(fully_connected_macs(&g), 4);
    }
}
