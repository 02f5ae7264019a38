//! The output stage: TFLM's requantization decoded per channel into six instructions.

use super::dsp::{self, asr, smmulr, ssat8};
use crate::graph::{ClampI8, Requant};
use crate::kernels::conv::{self, QuantizedOutput};
use crate::quant::rounding_divide_by_pot;

/// The crate's `conv::requantize` with the high multiply as one 64-bit multiply-add and a shift.
///
/// gemmlowp's `SaturatingRoundingDoublingHighMul(a, b)` (in `crate::quant`) is
/// `trunc((ab + nudge) / 2^31)` with `nudge = 2^30` for `ab >= 0` and `1 - 2^30` otherwise. For
/// `ab >= 0` the sum is non-negative and truncation is `floor((ab + 2^30) / 2^31)`. For `ab < 0`
/// the sum `v = ab + 1 - 2^30` is negative, and `trunc(v / 2^31) = floor((v + 2^31 - 1) / 2^31)
/// = floor((ab + 2^30) / 2^31)`. So both cases are `(ab + 2^30) >> 31` (arithmetic shift), which
/// fits i32 for every pair but `a = b = i32::MIN`, kept as the saturating special case. The rest
/// (left shift, rounding right shift, zero point, clamp) is `conv::requantize` verbatim.
#[inline(always)]
pub fn requantize(acc: i32, r: Requant, output_zero_point: i32, clamp: ClampI8) -> i8 {
    let left_shift = if r.shift > 0 { r.shift } else { 0 };
    let right_shift = if r.shift > 0 { 0 } else { -r.shift };
    let x = acc.wrapping_mul(1i32 << left_shift);
    let high = if x == i32::MIN && r.multiplier == i32::MIN {
        i32::MAX
    } else {
        ((i64::from(x) * i64::from(r.multiplier) + (1i64 << 30)) >> 31) as i32
    };
    let v = rounding_divide_by_pot(high, right_shift).wrapping_add(output_zero_point);
    v.max(i32::from(clamp.min)).min(i32::from(clamp.max)) as i8
}

/// Output channels whose requantization is decoded at once (a stack array of [`Channel`]s:
/// 20 bytes each).
pub(super) const CHANNELS: usize = 64;

/// One output channel's bias, requantization and output zero point, decoded once per kernel
/// call into the form the fast output stage computes in six instructions (MLA, SMMULR, two
/// ADDs with shifted operands, ASR, SSAT), bit-exact with `conv::requantize(acc + bias, ..)`
/// for every accumulator the kernel can produce.
///
/// TFLM computes `x = (acc + bias) << left` (wrapping), `h = SaturatingRoundingDoublingHighMul(x,
/// m) = floor((x m + 2^30) / 2^31)` (proof at [`requantize`]), then `RoundingDivideByPOT(h, r) =
/// floor((h + 2^(r-1) - [h < 0]) / 2^r)` for `r >= 1` and `h` for `r = 0`, adds the zero point
/// and clamps. When `|acc + bias| << left < 2^29` (checked per channel from the largest
/// accumulator the call can produce, `Weights::max_acc`), nothing wraps and:
/// - `2x` is exact and SMMULR(2x, m) `= floor((2xm + 2^31) / 2^32) = h`; `|h| <= |x|` as `|m| <=
///   2^31`;
/// - `floor((2h + 2^r - [h < 0]) / 2^(r+1))` is TFLM's rounding for every `r >= 0`: for `r = 0`
///   it is `floor(h + 1/2) = h` (`h >= 0`) and `floor(h) = h` (`h < 0`); for `r >= 1`, with `n =
///   h + 2^(r-1)`, it is `floor((n - [h < 0]/2) / 2^r)`, equal to `floor((n - [h < 0]) / 2^r)`
///   because no multiple of `2^r` lies strictly between `n - 1` and `n - 1/2`;
/// - the zero point enters as `zp * 2^(r+1)` before the shift, exactly, when `|2h| + 2^r +
///   |zp| 2^(r+1) < 2^31` (checked per channel).
///
/// Channels outside these bounds (none in real models: they need a bias near 2^29 or a scale
/// below 2^-21) make the kernel run its portable body.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct Channel {
    /// `2^(left + 1)`: the accumulator's scale.
    scale: i32,
    /// `bias * scale`, so that `acc * scale + bias` is `2x` in one multiply-add.
    bias: i32,
    multiplier: i32,
    /// `2^r + zero_point * 2^(r+1)`.
    round: i32,
    /// `r + 1`.
    shift: u32,
}

/// The clamp after the output stage's saturation to int8 (skipped when it is the full range).
#[derive(Clone, Copy)]
pub(super) struct OutputStage {
    pub(super) min: i32,
    pub(super) max: i32,
    pub(super) narrow: bool,
}

impl OutputStage {
    pub(super) fn new(q: &QuantizedOutput<'_>) -> Self {
        let (min, max) = (i32::from(q.clamp.min), i32::from(q.clamp.max));
        OutputStage {
            min,
            max,
            narrow: min > -128 || max < 127,
        }
    }
}

/// Where each output channel's int8 weights lie in a kernel's filter (channel `oc`'s taps are
/// `filter[oc * step + t * stride]` for `t < taps`), and the input zero point: what bounds the
/// accumulators a call can produce.
#[derive(Clone, Copy)]
pub(super) struct Weights<'a> {
    pub(super) filter: &'a [i8],
    pub(super) taps: usize,
    pub(super) step: usize,
    pub(super) stride: usize,
    pub(super) input_zero_point: i32,
}

impl<'a> Weights<'a> {
    /// Contiguous rows of `k` weights, one per output channel (CONV_2D, FULLY_CONNECTED).
    pub(super) fn rows(filter: &'a [i8], k: usize, input_zero_point: i32) -> Self {
        Weights {
            filter,
            taps: k,
            step: k,
            stride: 1,
            input_zero_point,
        }
    }

    /// The largest `|x - input_zero_point|` of an int8 `x`.
    pub(super) fn max_x(&self) -> i64 {
        128 + i64::from(self.input_zero_point).abs()
    }

    /// A bound on `|acc|` for every channel: `taps` products of at most `max_x * 128`.
    pub(super) fn max_acc(&self) -> i64 {
        (self.taps as i64).saturating_mul(self.max_x() * 128)
    }

    /// The bound on `|acc|` for channel `oc`: `max_x * sum |w|` (0 for a dead filter).
    pub(super) fn max_acc_of(&self, oc: usize) -> i64 {
        if self.stride == 1 {
            // A contiguous row (conv, fully connected).
            let row = self.filter.get(oc * self.step..).unwrap_or(&[]);
            let row = &row[..self.taps.min(row.len())];
            let sum: i64 = row.iter().map(|&w| i64::from(w).abs()).sum();
            return sum * self.max_x();
        }
        let row = self
            .filter
            .iter()
            .skip(oc * self.step)
            .step_by(self.stride.max(1));
        let sum: i64 = row.take(self.taps).map(|&w| i64::from(w).abs()).sum();
        sum * self.max_x()
    }
}

impl Channel {
    /// Channel `oc` of `q` (per-tensor when `q.requant` has one entry) for the accumulators of
    /// `w`, or `None` when the fast output stage is not exact for it. Tries the bound shared by
    /// all channels first, then the channel's own (its weights' absolute sum).
    pub(super) fn new(
        oc: usize,
        bias: Option<&[i32]>,
        q: &QuantizedOutput<'_>,
        w: &Weights<'_>,
    ) -> Option<Self> {
        let r = *(if q.requant.len() > 1 {
            q.requant.get(oc)?
        } else {
            q.requant.first()?
        });
        let b = match bias {
            Some(b) => *b.get(oc)?,
            None => 0,
        };
        let loose = w.max_acc();
        Channel::scaled(b, r, q.output_zero_point, loose)
            .or_else(|| Channel::constant(b, r, q, loose))
            .or_else(|| {
                let tight = w.max_acc_of(oc);
                Channel::scaled(b, r, q.output_zero_point, tight)
                    .or_else(|| Channel::constant(b, r, q, tight))
            })
    }

    /// Channel `oc` for accumulators up to `max_acc` in magnitude (what [`Channel::new`] does
    /// with one bound; the tests' entry point).
    #[cfg(test)]
    pub(super) fn bounded(
        oc: usize,
        bias: Option<&[i32]>,
        q: &QuantizedOutput<'_>,
        max_acc: i64,
    ) -> Option<Self> {
        let r = if q.requant.len() > 1 {
            q.requant.get(oc)?
        } else {
            q.requant.first()?
        };
        let b = match bias {
            Some(b) => *b.get(oc)?,
            None => 0,
        };
        Channel::scaled(b, *r, q.output_zero_point, max_acc)
            .or_else(|| Channel::constant(b, *r, q, max_acc))
    }

    /// The channel for bias `b`, requantization `r` and output zero point `zp` when the bounds of
    /// the type's doc hold for accumulators up to `max_acc` in magnitude.
    pub(super) fn scaled(b: i32, r: Requant, zp: i32, max_acc: i64) -> Option<Self> {
        // Beyond this the bounds below could not hold (and the shifts could wrap i64).
        if !(0..1 << 31).contains(&max_acc) {
            return None;
        }
        // The usual case in 32-bit arithmetic: no left shift, `|bias| + max_acc < 2^29`, a
        // right shift of at most 21 and an int8 zero point, for which `2x + 2^r + |zp| 2^(r+1)
        // < 2^30 + 2^21 * 257 < 2^31`.
        let right = r.shift.wrapping_neg() as u32;
        if r.multiplier != i32::MIN
            && (0..=21).contains(&right)
            && (-128..=127).contains(&zp)
            && max_acc < 1 << 29
            && b.unsigned_abs() < (1 << 29) - max_acc as u32
        {
            return Some(Channel {
                scale: 2,
                bias: 2 * b,
                multiplier: r.multiplier,
                round: (1 << right) + (zp << (right + 1)),
                shift: right + 1,
            });
        }
        if r.multiplier == i32::MIN || !(-31..=30).contains(&r.shift) {
            return None;
        }
        let (left, right) = (r.shift.max(0) as u32, (-r.shift).max(0) as u32);
        let x = (i64::from(b).abs() + max_acc) << left;
        let zp = i64::from(zp);
        let rounding = (1i64 << right) + (zp.abs() << (right + 1));
        if x >= 1 << 29 || 2 * x + rounding >= 1 << 31 {
            return None;
        }
        let scale = 1i32 << (left + 1);
        Some(Channel {
            scale,
            bias: b.wrapping_mul(scale),
            multiplier: r.multiplier,
            round: ((1i64 << right) + (zp << (right + 1))) as i32,
            shift: right + 1,
        })
    }

    /// A channel whose output is the same byte for every accumulator in `-max_acc..=max_acc`, as
    /// one that multiplies by 0 and rounds to that byte; else `None`. Such channels are what
    /// quantizers make of dead filters (all weights 0, so the accumulator is 0: a multiplier of
    /// 0, or a bias near 2^30 with a scale near 2^-30), which the bounds of [`Channel::scaled`]
    /// refuse. With `x = (|bias| + max_acc) << left`: when it plus the zero point fits i32
    /// nothing wraps in TFLM's stage, which is then monotonic in the accumulator, so equal outputs
    /// at both ends mean equal outputs everywhere.
    pub(super) fn constant(
        b: i32,
        r: Requant,
        q: &QuantizedOutput<'_>,
        max_acc: i64,
    ) -> Option<Self> {
        if r.multiplier == i32::MIN
            || !(-31..=30).contains(&r.shift)
            || !(0..1 << 31).contains(&max_acc)
        {
            return None;
        }
        let x = (i64::from(b).abs() + max_acc) << r.shift.max(0);
        if x + i64::from(q.output_zero_point).abs() > i64::from(i32::MAX) {
            return None;
        }
        let at = |acc: i64| conv::requantize(acc as i32 + b, r, q.output_zero_point, q.clamp);
        let v = at(-max_acc);
        (max_acc == 0 || v == at(max_acc)).then_some(Channel {
            scale: 0,
            bias: 0,
            multiplier: 0,
            round: 2 * i32::from(v) + 1,
            shift: 1,
        })
    }

    /// Decodes channels `oc0 .. oc0 + out.len()` into `out`; false when one does not fit the
    /// fast output stage (the caller then runs its portable body).
    #[must_use]
    #[inline(always)]
    pub(super) fn fill(
        out: &mut [Channel],
        oc0: usize,
        bias: Option<&[i32]>,
        q: &QuantizedOutput<'_>,
        w: &Weights<'_>,
    ) -> bool {
        for (j, c) in out.iter_mut().enumerate() {
            match Channel::new(oc0 + j, bias, q, w) {
                Some(ch) => *c = ch,
                None => return false,
            }
        }
        true
    }

    /// The output of accumulator `acc` (bias not yet added) saturated to int8, before the clamp:
    /// `conv::requantize(acc + bias, ...)` without the clamp, for every accumulator of its
    /// kernel call (see the type's doc).
    #[inline(always)]
    pub(super) fn saturated(&self, acc: i32) -> i32 {
        ssat8(self.unsaturated(acc))
    }

    /// [`Channel::saturated`] before the saturation.
    #[inline(always)]
    pub(super) fn unsaturated(&self, acc: i32) -> i32 {
        let x2 = acc.wrapping_mul(self.scale).wrapping_add(self.bias);
        let h = smmulr(x2, self.multiplier);
        asr(
            self.round.wrapping_add(h << 1).wrapping_add(h >> 31),
            self.shift,
        )
    }

    /// The output byte of accumulator `acc`: exactly `conv::requantize(acc + bias, ...)`.
    #[inline(always)]
    pub(super) fn apply(&self, acc: i32, o: OutputStage) -> i8 {
        o.clamp(self.saturated(acc))
    }
}

impl OutputStage {
    /// TFLM's clamp (max, then min) of a value already in int8 range.
    #[inline(always)]
    pub(super) fn clamp(self, v: i32) -> i8 {
        v.max(self.min).min(self.max) as i8
    }

    /// `out0[j]` and `out1[j]` from channel `j`'s two sums `sums[j]` (two pixels), the
    /// channel's parameters loaded once for both.
    #[inline(always)]
    pub(super) fn store_two(
        self,
        out0: &mut [i8],
        out1: &mut [i8],
        sums: &[[i32; 2]],
        channels: &[Channel],
    ) {
        if self.narrow {
            let each = out0.iter_mut().zip(out1.iter_mut()).zip(sums).zip(channels);
            for (((o0, o1), s), ch) in each {
                *o0 = self.clamp(ch.saturated(s[0]));
                *o1 = self.clamp(ch.saturated(s[1]));
            }
        } else {
            dsp::store_two(out0, out1, sums, channels);
        }
    }

    /// Depthwise outputs of 4 channels over consecutive pixels: `out[p * c + k] =
    /// channels[k].apply(sums[p][k])` for `k < 4`, `p < sums.len()`.
    #[inline(always)]
    pub(super) fn store_lanes(
        self,
        out: &mut [i8],
        c: usize,
        sums: &[[i32; 4]],
        channels: &[Channel],
    ) {
        let Some(last) = sums.len().checked_sub(1) else {
            return;
        };
        let out = &mut out[..last * c + 4];
        for (k, ch) in channels.iter().enumerate().take(4) {
            if self.narrow {
                let each = out[k..].iter_mut().step_by(c).zip(sums.iter());
                for (o, s) in each {
                    *o = self.clamp(ch.saturated(s[k]));
                }
            } else {
                dsp::store_lane(&mut out[k..], c, sums, k, ch);
            }
        }
    }

    /// `out[j]` from channel `j`'s sum, the `j`-th of `sums`.
    #[inline(always)]
    pub(super) fn store_each(
        self,
        out: &mut [i8],
        sums: impl Iterator<Item = i32>,
        channels: &[Channel],
    ) {
        for ((o, a), ch) in out.iter_mut().zip(sums).zip(channels) {
            *o = self.clamp(ch.saturated(a));
        }
    }

    /// `out[j] = channels[j].apply(acc[j])` for the shortest of the three; the clamp's test is
    /// made once, not per byte.
    #[inline(always)]
    pub(super) fn store(self, out: &mut [i8], acc: &[i32], channels: &[Channel]) {
        let each = out.iter_mut().zip(acc).zip(channels);
        if self.narrow {
            for ((o, &a), ch) in each {
                *o = self.clamp(ch.saturated(a));
            }
        } else {
            for ((o, &a), ch) in each {
                *o = ch.saturated(a) as i8;
            }
        }
    }
}
