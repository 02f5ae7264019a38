//! MEAN over any set of axes (a bit mask), int8 and float.
//!
//! The output layout is the input's with the reduced axes collapsed to 1 (TFLite `keep_dims`
//! layout; without `keep_dims` the element order is the same, only the shape differs).
//!
//! int8 follows TFLM `reference_integer_ops::Mean`, generalised from the H/W axes of a 4-D tensor
//! to any axes: `acc = Σ (q - zp_in)` over the reduced elements (i32),
//! `acc = multiply_by_quantized_multiplier(acc, requant)` with
//! `requant = quantize_multiplier(in_scale / out_scale)`, then the division by the element count
//! `n`, rounded half away from zero (`(acc ± n/2) / n`), then `+ zp_out` and a clamp to i8.
//!
//! Note: the `1/n` factor is *not* part of [`MeanParams::requant`]: `requant` is
//! `in_scale / out_scale` only, and the kernel divides by `n`, as TFLM does.

use super::quantize::quantize_multiplier;
use super::Float;
use crate::graph::{MeanParams, MAX_RANK};
use crate::quant::multiply_by_quantized_multiplier;

/// The input viewed as alternating kept/reduced dimension groups: `(extent, element stride)` of
/// the kept dimensions and of the reduced ones, outermost first, with size-1 dimensions dropped
/// and neighbouring dimensions of the same kind merged.
struct Plan {
    kept: [(usize, usize); MAX_RANK],
    n_kept: usize,
    reduced: [(usize, usize); MAX_RANK],
    n_reduced: usize,
    /// Number of input elements per output element.
    count: usize,
}

fn plan(in_shape: &[usize], axes: u8) -> Plan {
    debug_assert!(in_shape.len() <= MAX_RANK);
    debug_assert!(in_shape.len() >= 8 || (axes as u32) >> in_shape.len() == 0);
    let mut p = Plan {
        kept: [(1, 0); MAX_RANK],
        n_kept: 0,
        reduced: [(1, 0); MAX_RANK],
        n_reduced: 0,
        count: 1,
    };
    // Walk from the innermost dimension so that strides accumulate; merge with the previous
    // (inner) group of the same kind when the two are adjacent in memory.
    let mut stride = 1;
    let mut last_reduced: Option<bool> = None;
    for d in (0..in_shape.len()).rev() {
        let n = in_shape[d];
        if n == 1 {
            continue;
        }
        let reduce = axes & (1 << d) != 0;
        let (groups, len) = if reduce {
            (&mut p.reduced, &mut p.n_reduced)
        } else {
            (&mut p.kept, &mut p.n_kept)
        };
        if last_reduced == Some(reduce) {
            groups[*len - 1].0 *= n;
        } else {
            groups[*len] = (n, stride);
            *len += 1;
        }
        if reduce {
            p.count *= n;
        }
        last_reduced = Some(reduce);
        stride *= n;
    }
    // Groups were collected innermost first; the walks want outermost first.
    p.kept[..p.n_kept].reverse();
    p.reduced[..p.n_reduced].reverse();
    p
}

/// Calls `f(offset)` for every element offset of the grid `dims` (outermost first), in order.
#[inline(always)]
fn walk(dims: &[(usize, usize)], mut f: impl FnMut(usize)) {
    let Some((&(n, step), outer)) = dims.split_last() else {
        f(0);
        return;
    };
    let mut idx = [0usize; MAX_RANK];
    let mut base = 0usize;
    loop {
        for i in 0..n {
            f(base + i * step);
        }
        let mut d = outer.len();
        loop {
            if d == 0 {
                return;
            }
            d -= 1;
            idx[d] += 1;
            base += outer[d].1;
            if idx[d] < outer[d].0 {
                break;
            }
            base -= outer[d].1 * outer[d].0;
            idx[d] = 0;
        }
    }
}

/// int8 MEAN over the axes in `axes` (bit `i` = axis `i` of `in_shape`), TFLM's arithmetic (see
/// the module docs). `p.requant` is `quantize_multiplier(in_scale / out_scale)` (see
/// [`mean_params`]); `zero_points` are those of the input and the output. `p.axes` is not read:
/// `axes` is.
pub fn mean_i8(
    in_shape: &[usize],
    axes: u8,
    p: &MeanParams,
    zero_points: [i32; 2],
    input: &[i8],
    output: &mut [i8],
) {
    debug_assert_eq!(input.len(), in_shape.iter().product::<usize>());
    let [zp_in, zp_out] = zero_points;
    let plan = plan(in_shape, axes);
    debug_assert_eq!(output.len() * plan.count, input.len());
    // A zero-size reduction (never in a validated model) yields the zero point, not a panic.
    let n = (plan.count as i32).max(1);
    let reduced = &plan.reduced[..plan.n_reduced];
    let mut out_iter = output.iter_mut();
    walk(&plan.kept[..plan.n_kept], |base| {
        let mut acc: i32 = 0;
        walk(reduced, |off| {
            acc = acc.wrapping_add(input[base + off] as i32 - zp_in)
        });
        let acc = multiply_by_quantized_multiplier(acc, p.requant.multiplier, p.requant.shift);
        let acc = if acc > 0 {
            (acc + n / 2) / n
        } else {
            (acc - n / 2) / n
        };
        let v = acc
            .wrapping_add(zp_out)
            .clamp(i8::MIN as i32, i8::MAX as i32) as i8;
        if let Some(o) = out_iter.next() {
            *o = v;
        }
    });
}

/// Float MEAN over the axes in `axes` (bit `i` = axis `i` of `in_shape`): an f32 sum of the
/// reduced elements divided by their count.
pub fn mean_float<T: Float>(in_shape: &[usize], axes: u8, input: &[T], output: &mut [T]) {
    debug_assert_eq!(input.len(), in_shape.iter().product::<usize>());
    let plan = plan(in_shape, axes);
    debug_assert_eq!(output.len() * plan.count, input.len());
    let n = plan.count as f32;
    let reduced = &plan.reduced[..plan.n_reduced];
    let mut out_iter = output.iter_mut();
    walk(&plan.kept[..plan.n_kept], |base| {
        let mut acc = 0f32;
        walk(reduced, |off| acc += input[base + off].to_f32());
        if let Some(o) = out_iter.next() {
            *o = T::from_f32(acc / n);
        }
    });
}

/// Host-side `Prepare` of MEAN: `requant = quantize_multiplier(in_scale / out_scale)` in f64
/// (the `1/n` is applied by the kernel), and `axes` stored as given.
pub fn mean_params(in_scale: f32, out_scale: f32, axes: u8) -> MeanParams {
    MeanParams {
        axes,
        requant: quantize_multiplier(in_scale as f64 / out_scale as f64),
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use crate::kernels::quantize::tests::naive_mbqm;
    use half::f16;
    use proptest::prelude::*;
    use std::vec::Vec;

    fn config() -> ProptestConfig {
        ProptestConfig {
            cases: 64,
            ..ProptestConfig::default()
        }
    }

    /// For every input element, the flat index of the output element it contributes to, by
    /// decoding the multi-index and zeroing the reduced axes.
    fn out_index_of(in_shape: &[usize], axes: u8) -> Vec<usize> {
        let total: usize = in_shape.iter().product();
        let mut res = Vec::with_capacity(total);
        for flat in 0..total {
            let mut rem = flat;
            let mut idx = std::vec![0usize; in_shape.len()];
            for d in (0..in_shape.len()).rev() {
                idx[d] = rem % in_shape[d];
                rem /= in_shape[d];
            }
            let mut o = 0;
            for d in 0..in_shape.len() {
                let (n, i) = if axes & (1 << d) != 0 {
                    (1, 0)
                } else {
                    (in_shape[d], idx[d])
                };
                o = o * n + i;
            }
            res.push(o);
        }
        res
    }

    fn shape_and_axes() -> impl Strategy<Value = (Vec<usize>, u8)> {
        (0usize..=MAX_RANK)
            .prop_flat_map(|rank| {
                (
                    proptest::collection::vec(1usize..=4, rank),
                    0u8..(1u8 << rank),
                )
            })
            .prop_filter("at most 512 elements", |(s, _)| {
                s.iter().product::<usize>() <= 512
            })
    }

    #[test]
    fn common_shapes() {
        // NHWC mean over H and W: per-channel average.
        let shape = [1, 2, 3, 2];
        let input: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let mut out = [0f32; 2];
        mean_float(&shape, 0b0110, &input, &mut out);
        assert_eq!(out, [5.0, 6.0]);
        // Over the last axis.
        let mut out = [0f32; 6];
        mean_float(&shape, 0b1000, &input, &mut out);
        assert_eq!(out, [0.5, 2.5, 4.5, 6.5, 8.5, 10.5]);
        // Over everything, and over nothing.
        let mut all = [0f32; 1];
        mean_float(&shape, 0b1111, &input, &mut all);
        assert_eq!(all, [5.5]);
        let mut none = [0f32; 12];
        mean_float(&shape, 0, &input, &mut none);
        assert_eq!(&none[..], &input[..]);
        // int8 identity scale: rounding of the division is half away from zero.
        let p = mean_params(0.5, 0.5, 0b1);
        let mut out = [0i8; 3];
        mean_i8(&[2, 3], 0b1, &p, [0, 0], &[1, -1, 2, 0, -2, 5], &mut out);
        assert_eq!(out, [1, -2, 4]); // 0.5 -> 1, -1.5 -> -2, 3.5 -> 4
                                     // Saturation and extreme zero points.
        let p = mean_params(1.0, 0.25, 0b10);
        let mut out = [0i8; 2];
        mean_i8(
            &[2, 2],
            0b10,
            &p,
            [-128, 127],
            &[-128, -126, 127, 127],
            &mut out,
        );
        assert_eq!(out, [127, 127]);
        mean_i8(
            &[2, 2],
            0b10,
            &p,
            [127, -128],
            &[127, 126, -128, -128],
            &mut out,
        );
        assert_eq!(out, [-128, -128]);
        let p = mean_params(1.0, 1.0, 0b10);
        mean_i8(
            &[2, 2],
            0b10,
            &p,
            [-128, -128],
            &[-128, -126, 127, 127],
            &mut out,
        );
        assert_eq!(out, [-127, 127]);
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn int8_matches_spec_and_real(
            (shape, axes, data) in shape_and_axes().prop_flat_map(|(s, a)| {
                let n: usize = s.iter().product();
                (Just(s), Just(a), proptest::collection::vec(any::<i8>(), n))
            }),
            in_scale in 0.01f32..0.2,
            out_scale in 0.01f32..0.2,
            zp_in in prop_oneof![Just(-128), Just(127), -128i32..=127],
            zp_out in prop_oneof![Just(-128), Just(127), -128i32..=127],
        ) {
            let p = mean_params(in_scale, out_scale, axes);
            let map = out_index_of(&shape, axes);
            let n_out = map.iter().max().map_or(0, |&m| m + 1);
            let count = (data.len() / n_out.max(1)) as i64;
            let mut out = std::vec![0i8; n_out];
            mean_i8(&shape, axes, &p, [zp_in, zp_out], &data, &mut out);
            let mut sums = std::vec![0i64; n_out];
            for (i, &q) in data.iter().enumerate() {
                sums[map[i]] += q as i64 - zp_in as i64;
            }
            for o in 0..n_out {
                let acc = naive_mbqm(sums[o], p.requant.multiplier, p.requant.shift);
                // Division rounded half away from zero, written independently.
                let (q, r) = (acc.abs() / count, acc.abs() % count);
                let mag = if 2 * r >= count { q + 1 } else { q };
                let want = (acc.signum() * mag + zp_out as i64).clamp(-128, 127) as i8;
                prop_assert_eq!(out[o], want, "o {}", o);
                let real = in_scale as f64 * sums[o] as f64 / count as f64 / out_scale as f64 + zp_out as f64;
                prop_assert!((out[o] as f64 - real.clamp(-128.0, 127.0)).abs() <= 1.0, "{} vs {}", out[o], real);
            }
        }

        #[test]
        fn float_matches_reference(
            (shape, axes, data) in shape_and_axes().prop_flat_map(|(s, a)| {
                let n: usize = s.iter().product();
                (Just(s), Just(a), proptest::collection::vec(-100.0f32..100.0, n))
            }),
        ) {
            let map = out_index_of(&shape, axes);
            let n_out = map.iter().max().map_or(0, |&m| m + 1);
            let count = data.len() / n_out.max(1);
            let mut out = std::vec![0f32; n_out];
            mean_float(&shape, axes, &data, &mut out);
            let (mut sums, mut mags) = (std::vec![0f64; n_out], std::vec![0f64; n_out]);
            for (i, &x) in data.iter().enumerate() {
                sums[map[i]] += x as f64;
                mags[map[i]] += (x as f64).abs();
            }
            for o in 0..n_out {
                let want = sums[o] / count as f64;
                // f32 summation: error relative to the mean magnitude.
                let tol = 1e-5 * mags[o] / count as f64 + 1e-30;
                prop_assert!((out[o] as f64 - want).abs() <= tol, "{} vs {}", out[o], want);
            }
            // f16 storage vs f32 on the same rounded inputs: one final rounding.
            let xh: Vec<f16> = data.iter().map(|&v| f16::from_f32(v)).collect();
            let xf: Vec<f32> = xh.iter().map(|v| v.to_f32()).collect();
            let mut out_h = std::vec![f16::ZERO; n_out];
            mean_float(&shape, axes, &xh, &mut out_h);
            mean_float(&shape, axes, &xf, &mut out);
            for o in 0..n_out {
                prop_assert_eq!(out_h[o], f16::from_f32(out[o]));
            }
        }
    }
}
