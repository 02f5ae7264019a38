//! int8 ADD / SUB of same-shaped tensors through rescale tables.

use super::dsp::ssat8;
use super::output::Channel;
use crate::graph::Requant;

/// int8 ADD / SUB of two same-shaped tensors (`sub`: input 1 subtracted), Cortex-M body:
/// bit-exact with `binary::add_i8` / `sub_i8`. Returns how many leading elements it wrote (all
/// of them, or 0 when the parameters are outside its bounds and the caller runs the portable
/// loop).
///
/// Each input's rescale (`(q - zp) << left_shift`, then TFLM's multiply by a multiplier smaller
/// than one) depends on one int8 value only, so it is computed once for all 256 values into a
/// table per input (2 KB of stack, 512 evaluations of the portable arithmetic per call); per
/// element: two byte loads, two table loads, an add and the `Channel` output stage for the
/// sum, whose bound is the tables' largest entries.
pub fn add_sub_i8(
    sub: bool,
    p: &crate::graph::BinaryParams,
    zero_points: [i32; 3],
    a: &[i8],
    b: &[i8],
    out: &mut [i8],
) -> usize {
    use crate::quant::multiply_by_quantized_multiplier_smaller_than_one as rescale;
    let [zp_a, zp_b, zp_out] = zero_points;
    let n = out.len().min(a.len()).min(b.len());
    if !(0..31).contains(&p.left_shift)
        || p.input0.shift > 0
        || p.input1.shift > 0
        || p.output.shift > 0
        || n < 256
    {
        return 0;
    }
    let table = |zp: i32, r: Requant, negate: bool| {
        let mut t = [0i32; 256];
        let mut max = 0i64;
        for (v, e) in t.iter_mut().enumerate() {
            let x = i32::from(v as u8 as i8);
            let y = rescale(
                (x - zp).wrapping_mul(1 << p.left_shift),
                r.multiplier,
                r.shift,
            );
            *e = if negate { y.wrapping_neg() } else { y };
            max = max.max(i64::from(*e).abs());
        }
        (t, max)
    };
    let (ta, max_a) = table(zp_a, p.input0, false);
    let (tb, max_b) = table(zp_b, p.input1, sub);
    // `ta[x] + tb[y]` is TFLM's raw sum when it cannot wrap; the output stage is a channel
    // without bias for sums up to that bound, with the zero point folded in or, when the
    // rescale's shift is too long for that (outputs much coarser than the inputs), added after.
    let max = max_a + max_b;
    let ch = Channel::scaled(0, p.output, zp_out, max)
        .map(|ch| (ch, 0))
        .or_else(|| Channel::scaled(0, p.output, 0, max).map(|ch| (ch, zp_out)));
    let (ch, zp_after) = match ch {
        Some(ch) => ch,
        None => return 0,
    };
    let clamp = |v: i32| v.max(i32::from(p.clamp.min)).min(i32::from(p.clamp.max)) as i8;
    let each = out[..n].iter_mut().zip(&a[..n]).zip(&b[..n]);
    for ((o, &x), &y) in each {
        let sum = ta[usize::from(x as u8)].wrapping_add(tb[usize::from(y as u8)]);
        *o = clamp(ssat8(ch.unsaturated(sum) + zp_after));
    }
    n
}
