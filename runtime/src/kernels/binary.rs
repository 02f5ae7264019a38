//! ADD, SUB, MUL, DIV and PRELU with NumPy broadcasting: int8 (TFLM reference arithmetic) for
//! ADD, SUB and MUL; float for all five.
//!
//! Equal shapes take a flat loop. Otherwise the shapes are simplified (size-1 output dimensions
//! dropped, neighbouring dimensions that broadcast the same way merged) and the output is walked
//! row by row: an odometer over the outer dimensions and a tight loop over the innermost one, in
//! which each input advances by 1 or, where it is broadcast, stays put (stride 0).

use super::{activate, Float};
use crate::graph::{Activation, BinaryParams, MAX_RANK};
use crate::quant::{
    multiply_by_quantized_multiplier, multiply_by_quantized_multiplier_smaller_than_one,
};

/// Shapes of a broadcasting binary op, right-aligned and left-padded with 1 to `MAX_RANK`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BroadcastShapes {
    /// Shape of input 0.
    pub a: [usize; MAX_RANK],
    /// Shape of input 1.
    pub b: [usize; MAX_RANK],
    /// Shape of the output.
    pub out: [usize; MAX_RANK],
}

/// Right-aligns `shape` into a `MAX_RANK` array padded with 1 on the left.
fn pad_shape(shape: &[usize]) -> Option<[usize; MAX_RANK]> {
    if shape.len() > MAX_RANK {
        return None;
    }
    let mut padded = [1; MAX_RANK];
    padded[MAX_RANK - shape.len()..].copy_from_slice(shape);
    Some(padded)
}

impl BroadcastShapes {
    /// Builds from unpadded shapes (outermost first). `None` if a rank exceeds `MAX_RANK`, if
    /// `a` and `b` are not broadcast-compatible, or if `out` is not exactly their broadcast result
    /// (same rank as the larger input; each dimension equal to the non-1 input dimension).
    pub fn new(a: &[usize], b: &[usize], out: &[usize]) -> Option<Self> {
        if out.len() != a.len().max(b.len()) {
            return None;
        }
        let (pa, pb, po) = (pad_shape(a)?, pad_shape(b)?, pad_shape(out)?);
        for i in 0..MAX_RANK {
            let want = if pa[i] == pb[i] || pb[i] == 1 {
                pa[i]
            } else if pa[i] == 1 {
                pb[i]
            } else {
                return None;
            };
            if po[i] != want {
                return None;
            }
        }
        Some(BroadcastShapes {
            a: pa,
            b: pb,
            out: po,
        })
    }

    /// Number of elements of input 0.
    pub fn a_len(&self) -> usize {
        self.a.iter().product()
    }

    /// Number of elements of input 1.
    pub fn b_len(&self) -> usize {
        self.b.iter().product()
    }

    /// Number of elements of the output.
    pub fn out_len(&self) -> usize {
        self.out.iter().product()
    }
}

/// The output walk after simplification: `rank` dimensions of extent `ext`, and the element
/// strides of both inputs along each (0 where broadcast).
struct Walk {
    rank: usize,
    ext: [usize; MAX_RANK],
    stride_a: [usize; MAX_RANK],
    stride_b: [usize; MAX_RANK],
}

fn plan(s: &BroadcastShapes) -> Walk {
    let mut w = Walk {
        rank: 0,
        ext: [1; MAX_RANK],
        stride_a: [0; MAX_RANK],
        stride_b: [0; MAX_RANK],
    };
    let mut full_a = [false; MAX_RANK];
    let mut full_b = [false; MAX_RANK];
    for i in 0..MAX_RANK {
        if s.out[i] == 1 {
            continue;
        }
        let (fa, fb) = (s.a[i] != 1, s.b[i] != 1);
        if w.rank > 0 && full_a[w.rank - 1] == fa && full_b[w.rank - 1] == fb {
            w.ext[w.rank - 1] *= s.out[i];
        } else {
            w.ext[w.rank] = s.out[i];
            full_a[w.rank] = fa;
            full_b[w.rank] = fb;
            w.rank += 1;
        }
    }
    let (mut acc_a, mut acc_b) = (1, 1);
    for d in (0..w.rank).rev() {
        if full_a[d] {
            w.stride_a[d] = acc_a;
            acc_a *= w.ext[d];
        }
        if full_b[d] {
            w.stride_b[d] = acc_b;
            acc_b *= w.ext[d];
        }
    }
    w
}

/// `out[i] = f(a[ia], b[ib])` over the broadcast output.
#[inline(always)]
fn broadcast_apply<A: Copy, B: Copy, O>(
    s: &BroadcastShapes,
    a: &[A],
    b: &[B],
    out: &mut [O],
    f: impl Fn(A, B) -> O,
) {
    debug_assert_eq!(a.len(), s.a_len());
    debug_assert_eq!(b.len(), s.b_len());
    debug_assert_eq!(out.len(), s.out_len());
    if s.a == s.b {
        for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
            *o = f(x, y);
        }
        return;
    }
    if out.is_empty() {
        return;
    }
    let w = plan(s);
    if w.rank == 0 {
        out[0] = f(a[0], b[0]);
        return;
    }
    let inner = w.rank - 1;
    let n = w.ext[inner];
    let (step_a, step_b) = (w.stride_a[inner], w.stride_b[inner]);
    let mut idx = [0usize; MAX_RANK];
    let (mut ia, mut ib) = (0usize, 0usize);
    for row in out.chunks_exact_mut(n) {
        match (step_a, step_b) {
            (1, 0) => {
                let y = b[ib];
                for (o, &x) in row.iter_mut().zip(&a[ia..ia + n]) {
                    *o = f(x, y);
                }
            }
            (0, 1) => {
                let x = a[ia];
                for (o, &y) in row.iter_mut().zip(&b[ib..ib + n]) {
                    *o = f(x, y);
                }
            }
            _ => {
                // Both inputs advance (the planner never leaves a dimension where both are
                // broadcast).
                debug_assert_eq!((step_a, step_b), (1, 1));
                for ((o, &x), &y) in row.iter_mut().zip(&a[ia..ia + n]).zip(&b[ib..ib + n]) {
                    *o = f(x, y);
                }
            }
        }
        // Advance the odometer over the outer dimensions.
        let mut d = inner;
        while d > 0 {
            d -= 1;
            idx[d] += 1;
            ia += w.stride_a[d];
            ib += w.stride_b[d];
            if idx[d] < w.ext[d] {
                break;
            }
            ia -= w.stride_a[d] * w.ext[d];
            ib -= w.stride_b[d] * w.ext[d];
            idx[d] = 0;
        }
    }
}

/// Shared body of int8 ADD and SUB (`SUB = true` subtracts the scaled input 1).
#[inline(always)]
fn add_sub_i8<const SUB: bool>(
    s: &BroadcastShapes,
    p: &BinaryParams,
    zero_points: [i32; 3],
    a: &[i8],
    b: &[i8],
    out: &mut [i8],
) {
    let [zp_a, zp_b, zp_out] = zero_points;
    debug_assert!((0..31).contains(&p.left_shift));
    debug_assert!(p.input0.shift <= 0 && p.input1.shift <= 0 && p.output.shift <= 0);
    let scale = 1i32 << p.left_shift;
    let (lo, hi) = (p.clamp.min as i32, p.clamp.max as i32);
    let (m0, s0) = (p.input0.multiplier, p.input0.shift);
    let (m1, s1) = (p.input1.multiplier, p.input1.shift);
    let (mo, so) = (p.output.multiplier, p.output.shift);
    let f = |x: i8, y: i8| {
        let x = multiply_by_quantized_multiplier_smaller_than_one(
            (x as i32 - zp_a).wrapping_mul(scale),
            m0,
            s0,
        );
        let y = multiply_by_quantized_multiplier_smaller_than_one(
            (y as i32 - zp_b).wrapping_mul(scale),
            m1,
            s1,
        );
        let raw = if SUB {
            x.wrapping_sub(y)
        } else {
            x.wrapping_add(y)
        };
        let raw =
            multiply_by_quantized_multiplier_smaller_than_one(raw, mo, so).wrapping_add(zp_out);
        raw.max(lo).min(hi) as i8
    };
    if s.a != s.b {
        broadcast_apply(s, a, b, out, f);
        return;
    }
    // Same shapes: the x86-64 / aarch64 fast path (bit-exact) takes what it can, whole blocks
    // of 8 / 16; the Cortex-M one all of it (tables of the two rescales) or nothing.
    #[cfg(kiln_x86_kernels)]
    let done = super::arch::x86_64::add_sub_i8(SUB, p, zero_points, a, b, out);
    #[cfg(kiln_neon_kernels)]
    let done = super::arch::aarch64::add_sub_i8(SUB, p, zero_points, a, b, out);
    #[cfg(kiln_dsp_kernels)]
    let done = super::arch::cortex_m::add_sub_i8(SUB, p, zero_points, a, b, out);
    #[cfg(not(any(kiln_x86_kernels, kiln_neon_kernels, kiln_dsp_kernels)))]
    let done = 0;
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b).skip(done) {
        *o = f(x, y);
    }
}

/// int8 ADD, TFLM `reference_integer_ops` `AddElementwise` arithmetic, with broadcasting.
///
/// For each pair: `x = (q - zp) * 2^left_shift`, rescaled by `input0` / `input1` with
/// `multiply_by_quantized_multiplier_smaller_than_one`; the sum is rescaled by `output` the same
/// way, offset by the output zero point and clamped to `p.clamp`. `zero_points` are those of
/// input 0, input 1 and the output. Parameters come from
/// [`add_params`](super::quantize::add_params).
pub fn add_i8(
    s: &BroadcastShapes,
    p: &BinaryParams,
    zero_points: [i32; 3],
    a: &[i8],
    b: &[i8],
    out: &mut [i8],
) {
    add_sub_i8::<false>(s, p, zero_points, a, b, out);
}

/// int8 SUB, TFLM's reference `SubElementwise` / `BroadcastQuantSubSlow` arithmetic, with
/// broadcasting: exactly [`add_i8`] with the rescaled input 1 subtracted instead of added
/// (`raw = scaled0 - scaled1`). TFLM prepares SUB exactly as ADD (`left_shift = 20`, inputs
/// rescaled by `s / (2 * max(s0, s1))`, output by `2 * max(s0, s1) / (2^20 * s_out)`), so the
/// parameters come from [`add_params`](super::quantize::add_params) too.
pub fn sub_i8(
    s: &BroadcastShapes,
    p: &BinaryParams,
    zero_points: [i32; 3],
    a: &[i8],
    b: &[i8],
    out: &mut [i8],
) {
    add_sub_i8::<true>(s, p, zero_points, a, b, out);
}

/// int8 MUL, TFLM `reference_integer_ops` `Mul` arithmetic, with broadcasting:
/// `out = clamp(zp_out + multiply_by_quantized_multiplier((a - zp_a) * (b - zp_b), output))`.
/// `zero_points` are those of input 0, input 1 and the output. Parameters come from
/// [`mul_params`](super::quantize::mul_params).
pub fn mul_i8(
    s: &BroadcastShapes,
    p: &BinaryParams,
    zero_points: [i32; 3],
    a: &[i8],
    b: &[i8],
    out: &mut [i8],
) {
    let [zp_a, zp_b, zp_out] = zero_points;
    let (lo, hi) = (p.clamp.min as i32, p.clamp.max as i32);
    let (mo, so) = (p.output.multiplier, p.output.shift);
    broadcast_apply(s, a, b, out, |x: i8, y: i8| {
        let prod = (x as i32 - zp_a).wrapping_mul(y as i32 - zp_b);
        let raw = multiply_by_quantized_multiplier(prod, mo, so).wrapping_add(zp_out);
        raw.max(lo).min(hi) as i8
    });
}

/// Float ADD with broadcasting and a fused activation (f32 arithmetic).
pub fn add_float<T: Float>(
    s: &BroadcastShapes,
    activation: Activation,
    a: &[T],
    b: &[T],
    out: &mut [T],
) {
    broadcast_apply(s, a, b, out, |x: T, y: T| {
        T::from_f32(activate(x.to_f32() + y.to_f32(), activation))
    });
}

/// Float MUL with broadcasting and a fused activation (f32 arithmetic).
pub fn mul_float<T: Float>(
    s: &BroadcastShapes,
    activation: Activation,
    a: &[T],
    b: &[T],
    out: &mut [T],
) {
    broadcast_apply(s, a, b, out, |x: T, y: T| {
        T::from_f32(activate(x.to_f32() * y.to_f32(), activation))
    });
}

/// Float SUB (`a - b`) with broadcasting and a fused activation (f32 arithmetic).
pub fn sub_float<T: Float>(
    s: &BroadcastShapes,
    activation: Activation,
    a: &[T],
    b: &[T],
    out: &mut [T],
) {
    broadcast_apply(s, a, b, out, |x: T, y: T| {
        T::from_f32(activate(x.to_f32() - y.to_f32(), activation))
    });
}

/// Float DIV (`a / b`) with broadcasting and a fused activation (f32 arithmetic, IEEE semantics:
/// a zero divisor gives ±infinity or NaN, as in TFLite's float kernel).
pub fn div_float<T: Float>(
    s: &BroadcastShapes,
    activation: Activation,
    a: &[T],
    b: &[T],
    out: &mut [T],
) {
    broadcast_apply(s, a, b, out, |x: T, y: T| {
        T::from_f32(activate(x.to_f32() / y.to_f32(), activation))
    });
}

/// Float PRELU: `out = x < 0 ? slope * x : x` (f32 arithmetic), `slope` (input 1) broadcast to
/// `x` (input 0). The output has `x`'s shape (`s.out == s.a`, checked by `prepare`). A NaN input
/// stays NaN.
pub fn prelu_float<T: Float>(s: &BroadcastShapes, x: &[T], slope: &[T], out: &mut [T]) {
    debug_assert_eq!(s.a, s.out);
    broadcast_apply(s, x, slope, out, |x: T, a: T| {
        let v = x.to_f32();
        T::from_f32(if v < 0.0 { a.to_f32() * v } else { v })
    });
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use crate::graph::ClampI8;
    use crate::kernels::quantize::tests::{naive_div_pot, naive_high_mul, naive_mbqm};
    use crate::kernels::quantize::{activation_clamp, add_params, mul_params};
    use half::f16;
    use proptest::prelude::*;
    use std::vec::Vec;

    fn config() -> ProptestConfig {
        ProptestConfig {
            cases: 64,
            ..ProptestConfig::default()
        }
    }

    /// Index into `shape` (right-aligned against `out`) of the output element with multi-index
    /// `oi`: the straightforward definition of broadcasting.
    fn src_index(shape: &[usize], out: &[usize], oi: &[usize]) -> usize {
        let off = out.len() - shape.len();
        let mut idx = 0;
        for (d, &n) in shape.iter().enumerate() {
            let i = if n == 1 { 0 } else { oi[off + d] };
            idx = idx * n + i;
        }
        idx
    }

    /// Calls `f(out_flat, a_flat, b_flat)` for every output element, by decoding multi-indices.
    fn for_each_naive(
        a: &[usize],
        b: &[usize],
        out: &[usize],
        mut f: impl FnMut(usize, usize, usize),
    ) {
        let total: usize = out.iter().product();
        let mut oi = std::vec![0usize; out.len()];
        for flat in 0..total {
            let mut rem = flat;
            for d in (0..out.len()).rev() {
                oi[d] = rem % out[d];
                rem /= out[d];
            }
            f(flat, src_index(a, out, &oi), src_index(b, out, &oi));
        }
    }

    /// A broadcast-compatible triple: an output shape of rank 0..=5 and two inputs that keep or
    /// set to 1 each dimension, each possibly dropping leading dimensions.
    fn shapes() -> impl Strategy<Value = (Vec<usize>, Vec<usize>, Vec<usize>)> {
        (0usize..=5)
            .prop_flat_map(|rank| {
                (
                    proptest::collection::vec(1usize..=4, rank),
                    proptest::collection::vec(any::<bool>(), rank),
                    proptest::collection::vec(any::<bool>(), rank),
                    0..=rank,
                    0..=rank,
                )
            })
            .prop_map(|(out, ka, kb, da, db)| {
                let a: Vec<usize> = out
                    .iter()
                    .zip(&ka)
                    .map(|(&n, &k)| if k { n } else { 1 })
                    .collect();
                let b: Vec<usize> = out
                    .iter()
                    .zip(&kb)
                    .map(|(&n, &k)| if k { n } else { 1 })
                    .collect();
                // Drop leading dims of one input only, so that the output rank stays the max.
                let (a, b) = if da <= db {
                    (a[da..].to_vec(), b)
                } else {
                    (a, b[db..].to_vec())
                };
                // The output: broadcast of what is left.
                let rank = a.len().max(b.len());
                let pa: Vec<usize> = core::iter::repeat_n(1, rank - a.len())
                    .chain(a.iter().copied())
                    .collect();
                let pb: Vec<usize> = core::iter::repeat_n(1, rank - b.len())
                    .chain(b.iter().copied())
                    .collect();
                let out = pa.iter().zip(&pb).map(|(&x, &y)| x.max(y)).collect();
                (a, b, out)
            })
    }

    fn i8_data(len: usize) -> impl Strategy<Value = Vec<i8>> {
        proptest::collection::vec(any::<i8>(), len)
    }

    #[test]
    fn broadcast_shapes_validation() {
        assert!(BroadcastShapes::new(&[2, 3, 4], &[4], &[2, 3, 4]).is_some());
        assert!(BroadcastShapes::new(&[2, 1, 4], &[1, 3, 1], &[2, 3, 4]).is_some());
        assert!(BroadcastShapes::new(&[], &[5], &[5]).is_some());
        assert!(BroadcastShapes::new(&[], &[], &[]).is_some());
        assert!(BroadcastShapes::new(&[0, 3], &[1, 3], &[0, 3]).is_some());
        assert!(BroadcastShapes::new(&[2, 3], &[3, 3], &[3, 3]).is_none());
        assert!(BroadcastShapes::new(&[2, 3], &[3], &[2, 1]).is_none());
        assert!(BroadcastShapes::new(&[2, 3], &[3], &[1, 2, 3]).is_none());
        assert!(BroadcastShapes::new(&[2, 3], &[3], &[3]).is_none());
        assert!(BroadcastShapes::new(&[0, 3], &[2, 3], &[0, 3]).is_none());
        assert!(BroadcastShapes::new(&[1; 7], &[1], &[1; 7]).is_none());
        let s = BroadcastShapes::new(&[2, 1, 4], &[3, 1], &[2, 3, 4]).unwrap();
        assert_eq!(s.a, [1, 1, 1, 2, 1, 4]);
        assert_eq!(s.b, [1, 1, 1, 1, 3, 1]);
        assert_eq!(s.out, [1, 1, 1, 2, 3, 4]);
        assert_eq!((s.a_len(), s.b_len(), s.out_len()), (8, 3, 24));
    }

    /// The spec of int8 ADD in i64, with independent rounding helpers.
    fn naive_add(p: &BinaryParams, zp: [i32; 3], x: i8, y: i8) -> i8 {
        let smaller = |v: i64, m: i32, s: i32| naive_div_pot(naive_high_mul(v, m as i64), -s);
        let x = smaller(
            (x as i64 - zp[0] as i64) << p.left_shift,
            p.input0.multiplier,
            p.input0.shift,
        );
        let y = smaller(
            (y as i64 - zp[1] as i64) << p.left_shift,
            p.input1.multiplier,
            p.input1.shift,
        );
        let v = smaller(x + y, p.output.multiplier, p.output.shift) + zp[2] as i64;
        v.clamp(p.clamp.min as i64, p.clamp.max as i64) as i8
    }

    /// The spec of int8 SUB in i64: ADD's with the rescaled input 1 subtracted.
    fn naive_sub(p: &BinaryParams, zp: [i32; 3], x: i8, y: i8) -> i8 {
        let smaller = |v: i64, m: i32, s: i32| naive_div_pot(naive_high_mul(v, m as i64), -s);
        let x = smaller(
            (x as i64 - zp[0] as i64) << p.left_shift,
            p.input0.multiplier,
            p.input0.shift,
        );
        let y = smaller(
            (y as i64 - zp[1] as i64) << p.left_shift,
            p.input1.multiplier,
            p.input1.shift,
        );
        let v = smaller(x - y, p.output.multiplier, p.output.shift) + zp[2] as i64;
        v.clamp(p.clamp.min as i64, p.clamp.max as i64) as i8
    }

    fn naive_mul(p: &BinaryParams, zp: [i32; 3], x: i8, y: i8) -> i8 {
        let prod = (x as i64 - zp[0] as i64) * (y as i64 - zp[1] as i64);
        let v = naive_mbqm(prod, p.output.multiplier, p.output.shift) + zp[2] as i64;
        v.clamp(p.clamp.min as i64, p.clamp.max as i64) as i8
    }

    /// Scales and zero points of a binary op: three scales and three zero points.
    fn quant() -> impl Strategy<Value = ([f32; 3], [i32; 3])> {
        (
            (0.002f32..0.2, 0.002f32..0.2, 0.002f32..0.2),
            (
                prop_oneof![Just(-128), Just(127), -128i32..=127],
                prop_oneof![Just(-128), Just(127), -128i32..=127],
                prop_oneof![Just(-128), Just(127), -128i32..=127],
            ),
        )
            .prop_map(|(s, z)| ([s.0, s.1, s.2], [z.0, z.1, z.2]))
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn add_i8_matches_spec_and_real(
            (sa, sb, so, a, b) in shapes().prop_flat_map(|(sa, sb, so)| {
                let (la, lb): (usize, usize) = (sa.iter().product(), sb.iter().product());
                (Just(sa), Just(sb), Just(so), i8_data(la), i8_data(lb))
            }),
            (scales, zp) in quant(),
            act in prop_oneof![Just(Activation::None), Just(Activation::Relu), Just(Activation::Relu6)],
        ) {
            let s = BroadcastShapes::new(&sa, &sb, &so).unwrap();
            let clamp = activation_clamp(act, scales[2], zp[2]);
            let p = add_params(scales[0], scales[1], scales[2], clamp);
            let mut out = std::vec![0i8; s.out_len()];
            add_i8(&s, &p, zp, &a, &b, &mut out);
            let mut bad = None;
            for_each_naive(&sa, &sb, &so, |o, ia, ib| {
                let want = naive_add(&p, zp, a[ia], b[ib]);
                let real = (scales[0] as f64 * (a[ia] as i32 - zp[0]) as f64
                    + scales[1] as f64 * (b[ib] as i32 - zp[1]) as f64)
                    / scales[2] as f64
                    + zp[2] as f64;
                let real = real.clamp(clamp.min as f64, clamp.max as f64);
                if out[o] != want || (out[o] as f64 - real).abs() > 1.0 {
                    bad = Some((o, out[o], want, real));
                }
            });
            prop_assert!(bad.is_none(), "{:?} {:?}", bad, p);
        }

        /// Same shapes, long rows: the path fast kernels take (x86-64: eight lanes at a time).
        #[test]
        fn add_and_sub_of_same_shapes_match_spec(
            (a, b) in (0usize..200).prop_flat_map(|n| (i8_data(n), i8_data(n))),
            (scales, zp) in quant(),
            act in prop_oneof![Just(Activation::None), Just(Activation::Relu), Just(Activation::Relu6)],
        ) {
            let n = a.len();
            let s = BroadcastShapes::new(&[n], &[n], &[n]).unwrap();
            let clamp = activation_clamp(act, scales[2], zp[2]);
            let p = add_params(scales[0], scales[1], scales[2], clamp);
            let (mut sum, mut diff) = (std::vec![0i8; n], std::vec![0i8; n]);
            add_i8(&s, &p, zp, &a, &b, &mut sum);
            sub_i8(&s, &p, zp, &a, &b, &mut diff);
            for i in 0..n {
                prop_assert_eq!(sum[i], naive_add(&p, zp, a[i], b[i]), "add at {}", i);
                prop_assert_eq!(diff[i], naive_sub(&p, zp, a[i], b[i]), "sub at {}", i);
            }
        }

        #[test]
        fn sub_i8_matches_spec_and_real(
            (sa, sb, so, a, b) in shapes().prop_flat_map(|(sa, sb, so)| {
                let (la, lb): (usize, usize) = (sa.iter().product(), sb.iter().product());
                (Just(sa), Just(sb), Just(so), i8_data(la), i8_data(lb))
            }),
            (scales, zp) in quant(),
            act in prop_oneof![Just(Activation::None), Just(Activation::Relu), Just(Activation::Relu6)],
        ) {
            let s = BroadcastShapes::new(&sa, &sb, &so).unwrap();
            let clamp = activation_clamp(act, scales[2], zp[2]);
            let p = add_params(scales[0], scales[1], scales[2], clamp);
            let mut out = std::vec![0i8; s.out_len()];
            sub_i8(&s, &p, zp, &a, &b, &mut out);
            let mut bad = None;
            for_each_naive(&sa, &sb, &so, |o, ia, ib| {
                let want = naive_sub(&p, zp, a[ia], b[ib]);
                let real = (scales[0] as f64 * (a[ia] as i32 - zp[0]) as f64
                    - scales[1] as f64 * (b[ib] as i32 - zp[1]) as f64)
                    / scales[2] as f64
                    + zp[2] as f64;
                let real = real.clamp(clamp.min as f64, clamp.max as f64);
                if out[o] != want || (out[o] as f64 - real).abs() > 1.0 {
                    bad = Some((o, out[o], want, real));
                }
            });
            prop_assert!(bad.is_none(), "{:?} {:?}", bad, p);
        }

        #[test]
        fn mul_i8_matches_spec_and_real(
            (sa, sb, so, a, b) in shapes().prop_flat_map(|(sa, sb, so)| {
                let (la, lb): (usize, usize) = (sa.iter().product(), sb.iter().product());
                (Just(sa), Just(sb), Just(so), i8_data(la), i8_data(lb))
            }),
            (scales, zp) in quant(),
        ) {
            let s = BroadcastShapes::new(&sa, &sb, &so).unwrap();
            let p = mul_params(scales[0], scales[1], scales[2], ClampI8::default());
            let mut out = std::vec![0i8; s.out_len()];
            mul_i8(&s, &p, zp, &a, &b, &mut out);
            let mut bad = None;
            for_each_naive(&sa, &sb, &so, |o, ia, ib| {
                let want = naive_mul(&p, zp, a[ia], b[ib]);
                let real = scales[0] as f64 * (a[ia] as i32 - zp[0]) as f64
                    * scales[1] as f64 * (b[ib] as i32 - zp[1]) as f64
                    / scales[2] as f64
                    + zp[2] as f64;
                if out[o] != want || (out[o] as f64 - real.clamp(-128.0, 127.0)).abs() > 1.0 {
                    bad = Some((o, out[o], want, real));
                }
            });
            prop_assert!(bad.is_none(), "{:?} {:?}", bad, p);
        }

        #[test]
        fn float_matches_reference(
            (sa, sb, so, a, b) in shapes().prop_flat_map(|(sa, sb, so)| {
                let (la, lb): (usize, usize) = (sa.iter().product(), sb.iter().product());
                (Just(sa), Just(sb), Just(so),
                 proptest::collection::vec(-100.0f32..100.0, la),
                 proptest::collection::vec(-100.0f32..100.0, lb))
            }),
            act in prop_oneof![Just(Activation::None), Just(Activation::Relu),
                               Just(Activation::Relu6), Just(Activation::ReluN1To1)],
        ) {
            let s = BroadcastShapes::new(&sa, &sb, &so).unwrap();
            let n = s.out_len();
            let clamp = |v: f64| match act {
                Activation::None => v,
                Activation::Relu => v.max(0.0),
                Activation::Relu6 => v.clamp(0.0, 6.0),
                Activation::ReluN1To1 => v.clamp(-1.0, 1.0),
            };
            let (mut sum, mut prod) = (std::vec![0f32; n], std::vec![0f32; n]);
            add_float(&s, act, &a, &b, &mut sum);
            mul_float(&s, act, &a, &b, &mut prod);
            let mut bad = None;
            for_each_naive(&sa, &sb, &so, |o, ia, ib| {
                let (x, y) = (a[ia] as f64, b[ib] as f64);
                // One f32 rounding of the exact result, up to 1e-5 relative of the operands.
                let tol_sum = 1e-5 * (x.abs() + y.abs()) + 1e-30;
                let tol_prod = 1e-5 * (x * y).abs() + 1e-30;
                if (sum[o] as f64 - clamp(x + y)).abs() > tol_sum
                    || (prod[o] as f64 - clamp(x * y)).abs() > tol_prod
                {
                    bad = Some((o, sum[o], prod[o], x, y));
                }
            });
            prop_assert!(bad.is_none(), "{:?}", bad);

            // f16 storage: same inputs rounded to f16; compare with the f32 path on those inputs.
            let ah: Vec<f16> = a.iter().map(|&v| f16::from_f32(v)).collect();
            let bh: Vec<f16> = b.iter().map(|&v| f16::from_f32(v)).collect();
            let af: Vec<f32> = ah.iter().map(|v| v.to_f32()).collect();
            let bf: Vec<f32> = bh.iter().map(|v| v.to_f32()).collect();
            let (mut sum_h, mut prod_h) = (std::vec![f16::ZERO; n], std::vec![f16::ZERO; n]);
            add_float(&s, act, &ah, &bh, &mut sum_h);
            mul_float(&s, act, &ah, &bh, &mut prod_h);
            add_float(&s, act, &af, &bf, &mut sum);
            mul_float(&s, act, &af, &bf, &mut prod);
            for i in 0..n {
                // The f16 result is the f32 result rounded once to f16 (exactly).
                prop_assert_eq!(sum_h[i], f16::from_f32(sum[i]));
                prop_assert_eq!(prod_h[i], f16::from_f32(prod[i]));
            }
        }
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn sub_div_prelu_float_match_reference(
            (sa, sb, so, a, b) in shapes().prop_flat_map(|(sa, sb, so)| {
                let (la, lb): (usize, usize) = (sa.iter().product(), sb.iter().product());
                (Just(sa), Just(sb), Just(so),
                 proptest::collection::vec(-100.0f32..100.0, la),
                 proptest::collection::vec(-100.0f32..100.0, lb))
            }),
            act in prop_oneof![Just(Activation::None), Just(Activation::Relu),
                               Just(Activation::Relu6), Just(Activation::ReluN1To1)],
        ) {
            // Divisors away from zero.
            let b: Vec<f32> = b.iter().map(|&v| if v.abs() < 1e-3 { 0.5 } else { v }).collect();
            let s = BroadcastShapes::new(&sa, &sb, &so).unwrap();
            let n = s.out_len();
            let clamp = |v: f64| match act {
                Activation::None => v,
                Activation::Relu => v.max(0.0),
                Activation::Relu6 => v.clamp(0.0, 6.0),
                Activation::ReluN1To1 => v.clamp(-1.0, 1.0),
            };
            let (mut diff, mut quot) = (std::vec![0f32; n], std::vec![0f32; n]);
            sub_float(&s, act, &a, &b, &mut diff);
            div_float(&s, act, &a, &b, &mut quot);
            let mut bad = None;
            for_each_naive(&sa, &sb, &so, |o, ia, ib| {
                let (x, y) = (a[ia] as f64, b[ib] as f64);
                let tol_diff = 1e-5 * (x.abs() + y.abs()) + 1e-30;
                let tol_quot = 1e-5 * (x / y).abs() + 1e-30;
                if (diff[o] as f64 - clamp(x - y)).abs() > tol_diff
                    || (quot[o] as f64 - clamp(x / y)).abs() > tol_quot
                {
                    bad = Some((o, diff[o], quot[o], x, y));
                }
            });
            prop_assert!(bad.is_none(), "{:?}", bad);

            // PRELU: x has the output shape, the slope is `b`'s shape broadcast into it.
            let sp = BroadcastShapes::new(&so, &sb, &so).unwrap();
            let x: Vec<f32> = (0..n).map(|i| a[i % a.len().max(1)] - 7.0 * (i % 3) as f32).collect();
            let mut pre = std::vec![0f32; n];
            prelu_float(&sp, &x, &b, &mut pre);
            let mut bad = None;
            for_each_naive(&so, &sb, &so, |o, ix, ib| {
                let (v, k) = (x[ix] as f64, b[ib] as f64);
                let want = if v < 0.0 { k * v } else { v };
                if (pre[o] as f64 - want).abs() > 1e-5 * want.abs() + 1e-30 {
                    bad = Some((o, pre[o], want));
                }
            });
            prop_assert!(bad.is_none(), "{:?}", bad);

            // f16 storage: the f32 result on the f16-rounded inputs, rounded once to f16.
            let to_h = |v: &[f32]| -> Vec<f16> { v.iter().map(|&v| f16::from_f32(v)).collect() };
            let to_f = |v: &[f16]| -> Vec<f32> { v.iter().map(|v| v.to_f32()).collect() };
            let (ah, bh, xh) = (to_h(&a), to_h(&b), to_h(&x));
            let (af, bf, xf) = (to_f(&ah), to_f(&bh), to_f(&xh));
            let mut outs_h = [std::vec![f16::ZERO; n], std::vec![f16::ZERO; n], std::vec![f16::ZERO; n]];
            let mut outs_f = [std::vec![0f32; n], std::vec![0f32; n], std::vec![0f32; n]];
            sub_float(&s, act, &ah, &bh, &mut outs_h[0]);
            div_float(&s, act, &ah, &bh, &mut outs_h[1]);
            prelu_float(&sp, &xh, &bh, &mut outs_h[2]);
            sub_float(&s, act, &af, &bf, &mut outs_f[0]);
            div_float(&s, act, &af, &bf, &mut outs_f[1]);
            prelu_float(&sp, &xf, &bf, &mut outs_f[2]);
            for (h, f) in outs_h.iter().zip(&outs_f) {
                for i in 0..n {
                    // NaN (0/0 cannot happen: divisors are non-zero in f16 too, |b| >= 1e-3).
                    prop_assert_eq!(h[i], f16::from_f32(f[i]));
                }
            }
        }
    }

    #[test]
    fn sub_int8_saturation_and_extreme_zero_points() {
        let s = BroadcastShapes::new(&[4], &[4], &[4]).unwrap();
        let p = add_params(1.0, 1.0, 1.0, ClampI8::default());
        let mut out = [0i8; 4];
        sub_i8(
            &s,
            &p,
            [0, 0, 0],
            &[127, -128, 3, -3],
            &[-128, 127, 4, -4],
            &mut out,
        );
        assert_eq!(out, [127, -128, -1, 1]);
        // Zero points -128 / 127 on the inputs, -128 on the output:
        // out = -128 + (a + 128) - (b - 127).
        sub_i8(
            &s,
            &p,
            [-128, 127, -128],
            &[-128, -128, 127, -100],
            &[127, -128, -128, 126],
            &mut out,
        );
        assert_eq!(out, [-128, 127, 127, -99]);
        // out = 127 + (a - 127) - (b + 128) = a - b - 128.
        sub_i8(
            &s,
            &p,
            [127, -128, 127],
            &[127, 127, 0, -128],
            &[-128, -127, -128, 127],
            &mut out,
        );
        assert_eq!(out, [127, 126, 0, -128]);
        // Broadcast a scalar subtrahend, different scales.
        let s = BroadcastShapes::new(&[2, 2], &[], &[2, 2]).unwrap();
        let p = add_params(0.5, 0.25, 0.5, ClampI8::default());
        sub_i8(&s, &p, [0, 0, 0], &[10, 20, -10, 0], &[8], &mut out);
        // real = 0.5 * a - 0.25 * 8 = 0.5 * a - 2 -> out = a - 4
        assert_eq!(out, [6, 16, -14, -4]);
    }

    #[test]
    fn listed_broadcast_cases() {
        let run = |sa: &[usize], sb: &[usize], so: &[usize]| {
            let s = BroadcastShapes::new(sa, sb, so).unwrap();
            let a: Vec<f32> = (0..s.a_len()).map(|i| i as f32).collect();
            let b: Vec<f32> = (0..s.b_len()).map(|i| 100.0 * i as f32).collect();
            let mut out = std::vec![0f32; s.out_len()];
            add_float(&s, Activation::None, &a, &b, &mut out);
            out
        };
        // [2,3,4] + [4]
        let out = run(&[2, 3, 4], &[4], &[2, 3, 4]);
        assert_eq!(out.len(), 24);
        for (i, &v) in out.iter().enumerate() {
            assert_eq!(v, i as f32 + 100.0 * (i % 4) as f32);
        }
        // [2,1,4] + [1,3,1]
        let out = run(&[2, 1, 4], &[1, 3, 1], &[2, 3, 4]);
        for n in 0..2 {
            for h in 0..3 {
                for c in 0..4 {
                    assert_eq!(
                        out[(n * 3 + h) * 4 + c],
                        (n * 4 + c) as f32 + 100.0 * h as f32
                    );
                }
            }
        }
        // scalar on either side
        assert_eq!(run(&[], &[3], &[3]), [0.0, 100.0, 200.0]);
        assert_eq!(run(&[3], &[1], &[3]), [0.0, 1.0, 2.0]);
        assert_eq!(run(&[], &[], &[]), [0.0]);
        // [2,3,1] * [2,1,5]: a outer product per batch
        let s = BroadcastShapes::new(&[2, 3, 1], &[2, 1, 5], &[2, 3, 5]).unwrap();
        let a: Vec<f32> = (1..=6).map(|i| i as f32).collect();
        let b: Vec<f32> = (1..=10).map(|i| i as f32).collect();
        let mut out = [0f32; 30];
        mul_float(&s, Activation::None, &a, &b, &mut out);
        for n in 0..2 {
            for h in 0..3 {
                for w in 0..5 {
                    assert_eq!(out[(n * 3 + h) * 5 + w], a[n * 3 + h] * b[n * 5 + w]);
                }
            }
        }
    }

    #[test]
    fn int8_saturation_and_extreme_zero_points() {
        // ADD: 127 + 127 at scale 1 saturates high, -128 + -128 saturates low.
        let s = BroadcastShapes::new(&[4], &[4], &[4]).unwrap();
        let p = add_params(1.0, 1.0, 1.0, ClampI8::default());
        let mut out = [0i8; 4];
        add_i8(
            &s,
            &p,
            [0, 0, 0],
            &[127, -128, 3, -3],
            &[127, -128, 4, -4],
            &mut out,
        );
        assert_eq!(out, [127, -128, 7, -7]);
        // Zero points -128 (inputs) and 127 (output): real = (q + 128) * 2, out = real + 127.
        add_i8(
            &s,
            &p,
            [-128, -128, 127],
            &[-128, -127, -128, 0],
            &[-128, -128, -127, 0],
            &mut out,
        );
        assert_eq!(out, [127, 127, 127, 127]);
        add_i8(
            &s,
            &p,
            [127, 127, -128],
            &[127, 126, 0, -128],
            &[127, 127, 0, -128],
            &mut out,
        );
        assert_eq!(out, [-128, -128, -128, -128]);
        add_i8(
            &s,
            &p,
            [127, 127, 127],
            &[127, 126, 120, -128],
            &[127, 127, 125, 127],
            &mut out,
        );
        assert_eq!(out, [127, 126, 118, -128]);
        // A fused RELU6 clamp is honoured.
        let p6 = add_params(0.1, 0.1, 0.1, activation_clamp(Activation::Relu6, 0.1, 0));
        add_i8(
            &s,
            &p6,
            [0, 0, 0],
            &[50, -50, 10, 0],
            &[50, -20, 20, 0],
            &mut out,
        );
        assert_eq!(out, [60, 0, 30, 0]);
        // MUL saturates both ways.
        let p = mul_params(1.0, 1.0, 1.0, ClampI8::default());
        mul_i8(
            &s,
            &p,
            [0, 0, 0],
            &[100, -100, 5, -6],
            &[100, 100, 5, 7],
            &mut out,
        );
        assert_eq!(out, [127, -128, 25, -42]);
        mul_i8(
            &s,
            &p,
            [-128, -128, -128],
            &[-128, -127, -118, -100],
            &[5, -127, -118, -100],
            &mut out,
        );
        assert_eq!(out, [-128, -127, -28, 127]);
    }
}
