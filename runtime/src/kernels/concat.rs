//! CONCATENATION along one axis, any element type, plus [`activate_in_place`] for the fused
//! activation of float CONCATENATION.
//!
//! TFLM's int8 CONCATENATION requires every input to share the output's scale and zero point, so
//! it is a pure copy; a fused activation on int8 is expressed as the output clamp
//! (`ConcatParams::clamp`), applied separately if at all.

use super::{activate, Float};
use crate::graph::Activation;

/// Joins `inputs` along an axis. With the axis at position `k` of the shapes, `outer` is the
/// product of the dimensions before `k` (the same for every input), and each input is
/// `(data, axis_dim * inner)`: its elements per outer step (`inner` is the product of the
/// dimensions after `k`). `output` has `outer * Σ step` elements.
pub fn concatenate<T: Copy>(outer: usize, inputs: &[(&[T], usize)], output: &mut [T]) {
    debug_assert!(inputs
        .iter()
        .all(|&(data, step)| data.len() == outer * step));
    debug_assert_eq!(
        output.len(),
        outer * inputs.iter().map(|&(_, step)| step).sum::<usize>()
    );
    let mut pos = 0;
    for o in 0..outer {
        for &(data, step) in inputs {
            output[pos..pos + step].copy_from_slice(&data[o * step..(o + 1) * step]);
            pos += step;
        }
    }
}

/// Applies a fused float activation to every element of `data`, in place (f32 arithmetic).
pub fn activate_in_place<T: Float>(activation: Activation, data: &mut [T]) {
    if activation == Activation::None {
        return;
    }
    for v in data.iter_mut() {
        *v = T::from_f32(activate(v.to_f32(), activation));
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

    #[test]
    fn joins_along_middle_axis() {
        // [2,1,2] ++ [2,2,2] along axis 1 -> [2,3,2].
        let a = [1i8, 2, 3, 4];
        let b = [10i8, 11, 12, 13, 14, 15, 16, 17];
        let mut out = [0i8; 12];
        concatenate(2, &[(&a[..], 2), (&b[..], 4)], &mut out);
        assert_eq!(out, [1, 2, 10, 11, 12, 13, 3, 4, 14, 15, 16, 17]);
    }

    #[test]
    fn activation_in_place() {
        let mut v = [-2.0f32, -0.5, 0.5, 7.0];
        activate_in_place(Activation::Relu6, &mut v);
        assert_eq!(v, [0.0, 0.0, 0.5, 6.0]);
        let mut v = [-2.0f32, -0.5, 0.5, 7.0];
        activate_in_place(Activation::ReluN1To1, &mut v);
        assert_eq!(v, [-1.0, -0.5, 0.5, 1.0]);
        let mut h = [f16::from_f32(-3.0), f16::from_f32(2.5)];
        activate_in_place(Activation::Relu, &mut h);
        assert_eq!(h, [f16::ZERO, f16::from_f32(2.5)]);
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn matches_reference(
            outer in 0usize..4,
            inner in 1usize..4,
            axis_dims in proptest::collection::vec(0usize..4, 1..6),
        ) {
            // Input k holds values 1000 * k + its own flat index.
            let datas: Vec<Vec<u32>> = axis_dims
                .iter()
                .enumerate()
                .map(|(k, &d)| (0..outer * d * inner).map(|i| (1000 * k + i) as u32).collect())
                .collect();
            let inputs: Vec<(&[u32], usize)> =
                datas.iter().zip(&axis_dims).map(|(v, &d)| (&v[..], d * inner)).collect();
            let total_axis: usize = axis_dims.iter().sum();
            let mut out = std::vec![0u32; outer * total_axis * inner];
            concatenate(outer, &inputs, &mut out);
            // Reference: by output multi-index [o, a, i], find the input holding axis index a.
            for o in 0..outer {
                for a in 0..total_axis {
                    for i in 0..inner {
                        let (mut k, mut local) = (0, a);
                        while local >= axis_dims[k] {
                            local -= axis_dims[k];
                            k += 1;
                        }
                        let want = datas[k][(o * axis_dims[k] + local) * inner + i];
                        prop_assert_eq!(out[(o * total_axis + a) * inner + i], want);
                    }
                }
            }
        }
    }
}
