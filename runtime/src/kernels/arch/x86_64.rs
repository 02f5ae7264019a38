//! x86-64 AVX2 fast paths for the int8 CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED kernels,
//! bit-exact with the portable bodies.
//!
//! AVX2 is chosen at run time: [`has_avx2`] asks CPUID (and XGETBV, that the OS saves the YMM
//! registers) once and caches the answer; without AVX2, or for a shape a fast path does not
//! handle, the portable body runs. Builds with `-C target-feature=+avx2` skip the question.
//!
//! Arithmetic (see `docs/KERNELS.md`):
//!
//! - Products. Activations enter as `x - input_zero_point` and weights as `w -
//!   filter_zero_point`, both int16 (`|v| <= 255`); `VPMADDWD` multiplies int16 pairs and adds
//!   each two neighbours into int32 exactly (`2 * 255 * 255` fits). Sums then wrap modulo 2^32
//!   like the portable body's `wrapping_add`, and modular sums do not depend on their order.
//! - Padding. Taps outside the image are zeros in the im2col patch (conv) or the zero point
//!   itself (depthwise, where the offset is added once per channel as `offset * sum(w)`): both
//!   add exactly 0, as skipping them does.
//! - Output stage. `requantize8` is TFLM's `MultiplyByQuantizedMultiplier`, zero point and
//!   clamp on eight lanes: the left shift as a lane-wise shift (wrapping, as the portable
//!   `wrapping_mul(1 << left)`), the doubling high multiply as `(a * b + 2^30) >> 31` on 64-bit
//!   lanes (equal to gemmlowp's rounding for every pair but `a = b = i32::MIN`, which the entry
//!   check excludes: proof at `cortex_m::requantize`), the rounding right shift with gemmlowp's
//!   threshold. Its scalar twin for tails is `cortex_m::requantize`.
//!
//! Memory: no arena scratch (the memory plan is the same for every build); stack buffers
//! only: two im2col rows of at most [`PATCH`] int16, decoded requantization of at most
//! [`CHANNELS`] output channels, one pixel of int32 sums.

use core::arch::x86_64::*;
use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicU8, Ordering};

use super::cortex_m::requantize as requantize_scalar;
use crate::graph::Requant;
use crate::kernels::conv::{ConvGeometry, QuantizedOutput};
use crate::kernels::fully_connected::FullyConnectedGeometry;

/// Longest receptive field (`filter_h * filter_w * in_c`, rounded up to 16) a conv fast path
/// takes, and longest fully-connected input row.
pub const PATCH: usize = 4608;

/// Most output channels (conv, depthwise) or output features (fully connected) a fast path
/// takes: their requantization is decoded once per call into stack arrays.
pub const CHANNELS: usize = 1024;

/// Most filter taps (`filter_h * filter_w`) of the depthwise fast path.
const TAPS: usize = 64;

/// 0: not asked yet, 1: no AVX2, 2: AVX2, 3: AVX2 and AVX-512 VNNI with 256-bit vectors.
static LEVEL: AtomicU8 = AtomicU8::new(0);

fn level() -> u8 {
    match LEVEL.load(Ordering::Relaxed) {
        0 => {
            let l = detect();
            LEVEL.store(l, Ordering::Relaxed);
            l
        }
        l => l,
    }
}

/// True when this CPU runs AVX2 and the OS saves its registers (asked once, then cached).
pub fn has_avx2() -> bool {
    cfg!(target_feature = "avx2") || level() >= 2
}

/// True when this CPU also runs AVX-512 F / BW / VL and VNNI (`VPDPBUSD`, `VPDPWSSD`: Ice Lake
/// and later Intel cores, AMD Zen 4 and later) and the OS saves the AVX-512 state.
pub fn has_avx512_vnni() -> bool {
    level() >= 3
}

fn detect() -> u8 {
    // CPUID leaf 1: ECX bit 27 OSXSAVE (XGETBV usable), bit 28 AVX. Leaf 7: EBX bit 5 AVX2,
    // bit 16 AVX512F, bit 30 AVX512BW, bit 31 AVX512VL; ECX bit 11 AVX512_VNNI.
    let max_leaf = __cpuid(0).eax;
    if max_leaf < 7 {
        return 1;
    }
    let l1 = __cpuid(1);
    if l1.ecx & (1 << 27) == 0 || l1.ecx & (1 << 28) == 0 {
        return 1;
    }
    // SAFETY: OSXSAVE is set, so XGETBV is available and XCR0 readable.
    let xcr0 = unsafe { xgetbv0() };
    // XMM (bit 1) and YMM (bit 2) state saved by the OS.
    if xcr0 & 0b110 != 0b110 {
        return 1;
    }
    let l7 = __cpuid_count(7, 0);
    if l7.ebx & (1 << 5) == 0 {
        return 1;
    }
    // Opmask, ZMM_Hi256 and Hi16_ZMM state (bits 5-7) for EVEX-encoded instructions.
    let avx512_state = xcr0 & 0xe0 == 0xe0;
    let avx512 = [16, 30, 31].iter().all(|&bit| l7.ebx & (1 << bit) != 0);
    if avx512_state && avx512 && l7.ecx & (1 << 11) != 0 {
        3
    } else {
        2
    }
}

#[target_feature(enable = "xsave")]
unsafe fn xgetbv0() -> u64 {
    // SAFETY: the caller has checked OSXSAVE (XGETBV is available).
    unsafe { _xgetbv(0) }
}

/// `-zero_point` when every `v - zero_point` of an int8 `v` fits int16 exactly with room for
/// `VPMADDWD`'s pair sums (`|v| <= 255` for every valid model).
fn offset16(zero_point: i32) -> Option<i16> {
    let off = -i64::from(zero_point);
    (-127..=128).contains(&off).then_some(off as i16)
}

/// The requantization of up to `N` output channels `first..first + count`, one entry per channel
/// (a per-tensor requantization repeated), with the bias: the lanes [`requantize8`] loads.
/// Channel indices given to its methods are relative to `first`.
struct Decoded<const N: usize> {
    bias: [i32; N],
    left: [i32; N],
    multiplier: [i32; N],
    right: [i32; N],
    mask: [i32; N],
    zero_point: i32,
    min: i32,
    max: i32,
}

impl<const N: usize> Decoded<N> {
    fn new(q: &QuantizedOutput<'_>, bias: Option<&[i32]>, first: usize, count: usize) -> Self {
        Self::lanes(q, bias, count, |i| first + i)
    }

    /// Lanes `0..count` holding the output stage of channel `channel(lane)`.
    fn lanes(
        q: &QuantizedOutput<'_>,
        bias: Option<&[i32]>,
        count: usize,
        channel: impl Fn(usize) -> usize,
    ) -> Self {
        let mut d = Decoded {
            bias: [0; N],
            left: [0; N],
            multiplier: [0; N],
            right: [0; N],
            mask: [0; N],
            zero_point: q.output_zero_point,
            min: i32::from(q.clamp.min),
            max: i32::from(q.clamp.max),
        };
        for i in 0..count.min(N) {
            let c = channel(i);
            let r = if q.requant.len() > 1 {
                q.requant[c]
            } else {
                q.requant[0]
            };
            d.bias[i] = bias.map_or(0, |b| b[c]);
            d.left[i] = r.shift.max(0);
            d.right[i] = (-r.shift).max(0);
            d.multiplier[i] = r.multiplier;
            d.mask[i] = ((1i64 << d.right[i]) - 1) as i32;
        }
        d
    }

    /// Copies lanes 0-7 into lanes 8-15 (two pixels of 8 channels in one vector).
    fn repeat8(&mut self) {
        for a in [
            &mut self.bias,
            &mut self.left,
            &mut self.multiplier,
            &mut self.right,
            &mut self.mask,
        ] {
            a.copy_within(0..8, 8);
        }
    }

    /// Scalar output stage of channel `c` (tails): `conv::requantize` of `acc + bias`.
    #[inline(always)]
    fn one(&self, acc: i32, c: usize) -> i8 {
        let r = Requant {
            multiplier: self.multiplier[c],
            shift: self.left[c] - self.right[c],
        };
        let clamp = crate::graph::ClampI8 {
            min: self.min as i8,
            max: self.max as i8,
        };
        requantize_scalar(acc.wrapping_add(self.bias[c]), r, self.zero_point, clamp)
    }

    /// Output stage of channels `c..c + 8` for the int32 sums `acc` (bias not yet added):
    /// eight int8 in the low 64 bits.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn eight(&self, acc: __m256i, c: usize) -> __m128i {
        let lanes = |a: &[i32; N]| -> __m256i {
            let s = &a[c..c + 8];
            // SAFETY: `s` is 8 readable i32 (32 bytes); unaligned load.
            unsafe { _mm256_loadu_si256(s.as_ptr().cast()) }
        };
        let x = _mm256_add_epi32(acc, lanes(&self.bias));
        requantize8(
            x,
            lanes(&self.left),
            lanes(&self.multiplier),
            lanes(&self.right),
            lanes(&self.mask),
            self.zero_point,
            self.min,
            self.max,
        )
    }

    /// [`Decoded::eight`] on sixteen lanes with AVX-512 (channels `c..c + 16`): sixteen int8.
    /// The same arithmetic as [`requantize8`], with mask registers for the blends and compares
    /// and one saturating narrow (a no-op on clamped values) at the end.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn sixteen(&self, acc: __m512i, c: usize) -> __m128i {
        let lanes = |a: &[i32; N]| -> __m512i {
            let s = &a[c..c + 16];
            // SAFETY: `s` is 16 readable i32 (64 bytes); unaligned load.
            unsafe { _mm512_loadu_si512(s.as_ptr().cast()) }
        };
        let x = _mm512_add_epi32(acc, lanes(&self.bias));
        let v = multiply16(
            x,
            lanes(&self.left),
            lanes(&self.multiplier),
            lanes(&self.right),
            lanes(&self.mask),
        );
        let v = _mm512_add_epi32(v, _mm512_set1_epi32(self.zero_point));
        let v = _mm512_min_epi32(
            _mm512_max_epi32(v, _mm512_set1_epi32(self.min)),
            _mm512_set1_epi32(self.max),
        );
        _mm512_cvtsepi32_epi8(v)
    }

    /// Requantizes `sums[..n]` (channels `0..n`) into `out[..n]`.
    #[target_feature(enable = "avx2")]
    fn row(&self, sums: &[i32], out: &mut [i8]) {
        let n = out.len().min(sums.len());
        let mut c = 0;
        while c + 8 <= n {
            let s = &sums[c..c + 8];
            // SAFETY: `s` is 8 readable i32.
            let acc = unsafe { _mm256_loadu_si256(s.as_ptr().cast()) };
            let v = self.eight(acc, c);
            let o = &mut out[c..c + 8];
            // SAFETY: `o` is 8 writable bytes; `_mm_storel_epi64` writes exactly 8.
            unsafe { _mm_storel_epi64(o.as_mut_ptr().cast(), v) };
            c += 8;
        }
        while c < n {
            out[c] = self.one(sums[c], c);
            c += 1;
        }
    }
}

/// TFLM's `MultiplyByQuantizedMultiplier(x, multiplier, left - right)`, then the zero point and
/// the clamp, on eight int32 lanes; the results as eight int8 in the low 64 bits. `mask` is
/// `2^right - 1`. Multipliers must not be `i32::MIN`; `left`, `right` in `0..=31`.
#[target_feature(enable = "avx2")]
#[inline]
#[allow(clippy::too_many_arguments)]
fn requantize8(
    x: __m256i,
    left: __m256i,
    multiplier: __m256i,
    right: __m256i,
    mask: __m256i,
    zero_point: i32,
    min: i32,
    max: i32,
) -> __m128i {
    let shifted = multiply8(x, left, multiplier, right, mask);
    let v = _mm256_add_epi32(shifted, _mm256_set1_epi32(zero_point));
    let v = _mm256_min_epi32(
        _mm256_max_epi32(v, _mm256_set1_epi32(min)),
        _mm256_set1_epi32(max),
    );
    // Clamped to int8 already: the saturating packs change nothing.
    let w = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    _mm_packs_epi16(w, w)
}

/// TFLM's `MultiplyByQuantizedMultiplier(x, multiplier, left - right)` on eight int32 lanes.
/// `mask` is `2^right - 1`. Multipliers must not be `i32::MIN`; `left`, `right` in `0..=31`.
#[target_feature(enable = "avx2")]
#[inline]
fn multiply8(
    x: __m256i,
    left: __m256i,
    multiplier: __m256i,
    right: __m256i,
    mask: __m256i,
) -> __m256i {
    // x * 2^left, wrapping (the lane shift keeps the low 32 bits, as wrapping_mul does).
    let x = _mm256_sllv_epi32(x, left);
    // (x * m + 2^30) >> 31 on the even lanes, then on the odd lanes moved down.
    let nudge = _mm256_set1_epi64x(1 << 30);
    let even = _mm256_srli_epi64::<31>(_mm256_add_epi64(_mm256_mul_epi32(x, multiplier), nudge));
    let odd = _mm256_srli_epi64::<31>(_mm256_add_epi64(
        _mm256_mul_epi32(
            _mm256_srli_epi64::<32>(x),
            _mm256_srli_epi64::<32>(multiplier),
        ),
        nudge,
    ));
    // Low 32 bits of each 64-bit lane hold the (sign-correct) 32-bit result.
    let high = _mm256_blend_epi32::<0b1010_1010>(even, _mm256_slli_epi64::<32>(odd));
    // Rounding right shift: (x >> r) + (remainder > (mask >> 1) + (x < 0)).
    let remainder = _mm256_and_si256(high, mask);
    let negative = _mm256_cmpgt_epi32(_mm256_setzero_si256(), high);
    let threshold = _mm256_sub_epi32(_mm256_srli_epi32::<1>(mask), negative);
    let up = _mm256_cmpgt_epi32(remainder, threshold);
    _mm256_sub_epi32(_mm256_srav_epi32(high, right), up)
}

/// int8 ADD (or SUB, `sub`) of two same-shape tensors, TFLM's arithmetic (see
/// `binary::add_i8`): the first `n - n % 8` elements when the CPU has AVX2 and the parameters
/// are usual (multipliers not `i32::MIN`, input and output shifts in `-31..=0`, left shift in
/// `0..=30`); returns how many elements it wrote (0 when it did not run).
pub fn add_sub_i8(
    sub: bool,
    p: &crate::graph::BinaryParams,
    zero_points: [i32; 3],
    a: &[i8],
    b: &[i8],
    out: &mut [i8],
) -> usize {
    let usual = super::usual_add_params(p);
    if !usual || a.len() != out.len() || b.len() != out.len() || !has_avx2() {
        return 0;
    }
    if has_avx512_vnni() {
        // SAFETY: the CPU has AVX-512 F (checked just above, with VNNI).
        return unsafe { add_sub_avx512(sub, p, zero_points, a, b, out) };
    }
    // SAFETY: the CPU has AVX2 (checked just above).
    unsafe { add_sub_avx2(sub, p, zero_points, a, b, out) }
}

/// [`add_sub_avx2`] on sixteen lanes (AVX-512): the first `n - n % 16` elements.
#[target_feature(enable = "avx512f")]
fn add_sub_avx512(
    sub: bool,
    p: &crate::graph::BinaryParams,
    [zp_a, zp_b, zp_out]: [i32; 3],
    a: &[i8],
    b: &[i8],
    out: &mut [i8],
) -> usize {
    let lanes = |r: Requant| {
        let right = -r.shift;
        (
            _mm512_set1_epi32(r.multiplier),
            _mm512_set1_epi32(right),
            _mm512_set1_epi32(((1i64 << right) - 1) as i32),
        )
    };
    let (m0, r0, k0) = lanes(p.input0);
    let (m1, r1, k1) = lanes(p.input1);
    let (mo, ro, ko) = lanes(p.output);
    let left = _mm512_set1_epi32(p.left_shift);
    let zero = _mm512_setzero_si512();
    let (za, zb) = (_mm512_set1_epi32(zp_a), _mm512_set1_epi32(zp_b));
    let zo = _mm512_set1_epi32(zp_out);
    let (lo, hi) = (
        _mm512_set1_epi32(i32::from(p.clamp.min)),
        _mm512_set1_epi32(i32::from(p.clamp.max)),
    );
    let load16 = |s: &[i8], i: usize| {
        let v = &s[i..i + 16];
        // SAFETY: `v` is 16 readable bytes.
        _mm512_cvtepi8_epi32(unsafe { _mm_loadu_si128(v.as_ptr().cast()) })
    };
    let n = out.len() - out.len() % 16;
    // Input rescale without 64-bit products where the left shift allows (see `Rescale16`).
    let (s0, s1) = (
        Rescale16::new(p.left_shift, p.input0),
        Rescale16::new(p.left_shift, p.input1),
    );
    let mut i = 0;
    while i < n {
        let (va, vb) = (
            _mm512_sub_epi32(load16(a, i), za),
            _mm512_sub_epi32(load16(b, i), zb),
        );
        let x = match &s0 {
            Some(s) => round_shift16(s.apply(va), r0, k0),
            None => multiply16(va, left, m0, r0, k0),
        };
        let y = match &s1 {
            Some(s) => round_shift16(s.apply(vb), r1, k1),
            None => multiply16(vb, left, m1, r1, k1),
        };
        let raw = if sub {
            _mm512_sub_epi32(x, y)
        } else {
            _mm512_add_epi32(x, y)
        };
        let v = _mm512_add_epi32(multiply16(raw, zero, mo, ro, ko), zo);
        let v = _mm512_min_epi32(_mm512_max_epi32(v, lo), hi);
        let d = &mut out[i..i + 16];
        // SAFETY: `d` is 16 writable bytes.
        unsafe { _mm_storeu_si128(d.as_mut_ptr().cast(), _mm512_cvtsepi32_epi8(v)) };
        i += 16;
    }
    n
}

#[target_feature(enable = "avx2")]
fn add_sub_avx2(
    sub: bool,
    p: &crate::graph::BinaryParams,
    [zp_a, zp_b, zp_out]: [i32; 3],
    a: &[i8],
    b: &[i8],
    out: &mut [i8],
) -> usize {
    let lanes = |r: Requant| {
        let right = -r.shift;
        (
            _mm256_set1_epi32(r.multiplier),
            _mm256_set1_epi32(right),
            _mm256_set1_epi32(((1i64 << right) - 1) as i32),
        )
    };
    let (m0, r0, k0) = lanes(p.input0);
    let (m1, r1, k1) = lanes(p.input1);
    let (mo, ro, ko) = lanes(p.output);
    let left = _mm256_set1_epi32(p.left_shift);
    let zero = _mm256_setzero_si256();
    let (za, zb) = (_mm256_set1_epi32(zp_a), _mm256_set1_epi32(zp_b));
    let zo = _mm256_set1_epi32(zp_out);
    let (lo, hi) = (
        _mm256_set1_epi32(i32::from(p.clamp.min)),
        _mm256_set1_epi32(i32::from(p.clamp.max)),
    );
    let load8 = |s: &[i8], i: usize| {
        let v = &s[i..i + 8];
        // SAFETY: `v` is 8 readable bytes; `_mm_loadl_epi64` reads exactly 8.
        _mm256_cvtepi8_epi32(unsafe { _mm_loadl_epi64(v.as_ptr().cast()) })
    };
    let n = out.len() - out.len() % 8;
    let mut i = 0;
    while i < n {
        let x = multiply8(_mm256_sub_epi32(load8(a, i), za), left, m0, r0, k0);
        let y = multiply8(_mm256_sub_epi32(load8(b, i), zb), left, m1, r1, k1);
        let raw = if sub {
            _mm256_sub_epi32(x, y)
        } else {
            _mm256_add_epi32(x, y)
        };
        let v = _mm256_add_epi32(multiply8(raw, zero, mo, ro, ko), zo);
        let v = _mm256_min_epi32(_mm256_max_epi32(v, lo), hi);
        let w = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let d = &mut out[i..i + 8];
        // SAFETY: `d` is 8 writable bytes; `_mm_storel_epi64` writes exactly 8.
        unsafe { _mm_storel_epi64(d.as_mut_ptr().cast(), _mm_packs_epi16(w, w)) };
        i += 8;
    }
    n
}

/// [`multiply8`] on sixteen lanes (AVX-512): TFLM's `MultiplyByQuantizedMultiplier(x,
/// multiplier, left - right)`, with mask registers for the blends and compares. `mask` is
/// `2^right - 1`. Multipliers must not be `i32::MIN`; `left`, `right` in `0..=31`.
#[target_feature(enable = "avx512f")]
#[inline]
fn multiply16(
    x: __m512i,
    left: __m512i,
    multiplier: __m512i,
    right: __m512i,
    mask: __m512i,
) -> __m512i {
    let x = _mm512_sllv_epi32(x, left);
    let nudge = _mm512_set1_epi64(1 << 30);
    let even = _mm512_srli_epi64::<31>(_mm512_add_epi64(_mm512_mul_epi32(x, multiplier), nudge));
    let odd = _mm512_srli_epi64::<31>(_mm512_add_epi64(
        _mm512_mul_epi32(
            _mm512_srli_epi64::<32>(x),
            _mm512_srli_epi64::<32>(multiplier),
        ),
        nudge,
    ));
    let high = _mm512_mask_blend_epi32(0xaaaa, even, _mm512_slli_epi64::<32>(odd));
    round_shift16(high, right, mask)
}

/// TFLM's `SaturatingRoundingDoublingHighMul(v << left, multiplier)` for `|v| <= 255` in
/// 32-bit lanes: with `s = 31 - left`, it is `(v * m + 2^(s-1)) >> s` rounded down for either
/// sign (TFLM's nudge for negative products with its truncating division comes to the same),
/// and splitting `m = mh * 2^s + ml` makes that `v * mh + ((v * ml + 2^(s-1)) >> s)`, both
/// products inside int32 when `8 <= left <= 22`.
struct Rescale16 {
    high: __m512i,
    low: __m512i,
    half: __m512i,
    s: __m512i,
}

impl Rescale16 {
    #[target_feature(enable = "avx512f")]
    fn new(left: i32, r: Requant) -> Option<Self> {
        if !(8..=22).contains(&left) || r.multiplier < 0 {
            return None;
        }
        let s = 31 - left;
        Some(Rescale16 {
            high: _mm512_set1_epi32(r.multiplier >> s),
            low: _mm512_set1_epi32(r.multiplier & ((1 << s) - 1)),
            half: _mm512_set1_epi32(1 << (s - 1)),
            s: _mm512_set1_epi32(s),
        })
    }

    /// The high multiply of `v` (lanes in `-255..=255`).
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn apply(&self, v: __m512i) -> __m512i {
        let low = _mm512_add_epi32(_mm512_mullo_epi32(v, self.low), self.half);
        _mm512_add_epi32(
            _mm512_mullo_epi32(v, self.high),
            _mm512_srav_epi32(low, self.s),
        )
    }
}

/// TFLM's `RoundingDivideByPOT(x, right)` in 16 lanes (`mask` = `2^right - 1`).
#[target_feature(enable = "avx512f")]
#[inline]
fn round_shift16(x: __m512i, right: __m512i, mask: __m512i) -> __m512i {
    let remainder = _mm512_and_si512(x, mask);
    let negative = _mm512_cmplt_epi32_mask(x, _mm512_setzero_si512());
    let half = _mm512_srli_epi32::<1>(mask);
    let threshold = _mm512_mask_add_epi32(half, negative, half, _mm512_set1_epi32(1));
    let up = _mm512_cmpgt_epi32_mask(remainder, threshold);
    let shifted = _mm512_srav_epi32(x, right);
    _mm512_mask_add_epi32(shifted, up, shifted, _mm512_set1_epi32(1))
}

/// Sums four int32 accumulators' lanes: `[sum(a), sum(b), sum(c), sum(d)]` (wrapping).
#[target_feature(enable = "avx2")]
#[inline]
fn hsum4(a: __m256i, b: __m256i, c: __m256i, d: __m256i) -> __m128i {
    let ab = _mm256_hadd_epi32(a, b);
    let cd = _mm256_hadd_epi32(c, d);
    let abcd = _mm256_hadd_epi32(ab, cd);
    _mm_add_epi32(
        _mm256_castsi256_si128(abcd),
        _mm256_extracti128_si256::<1>(abcd),
    )
}

/// `dst[i] = src[i] + off` as int16.
#[target_feature(enable = "avx2")]
#[inline]
fn widen(src: &[i8], off: i16, dst: &mut [i16]) {
    let n = src.len().min(dst.len());
    let offv = _mm256_set1_epi16(off);
    let mut i = 0;
    while i + 16 <= n {
        let s = &src[i..i + 16];
        let d = &mut dst[i..i + 16];
        // SAFETY: `s` is 16 readable bytes, `d` 16 writable int16 (32 bytes).
        unsafe {
            let v = _mm256_cvtepi8_epi16(_mm_loadu_si128(s.as_ptr().cast()));
            _mm256_storeu_si256(d.as_mut_ptr().cast(), _mm256_add_epi16(v, offv));
        }
        i += 16;
    }
    while i < n {
        dst[i] = i16::from(src[i]) + off;
        i += 1;
    }
}

/// Sixteen weights as int16 plus `off`, from a row of at least `at + 16` bytes, or from its
/// last `row.len() - at` bytes padded with zeros.
#[target_feature(enable = "avx2")]
#[inline]
fn weights16(row: &[i8], at: usize, off: __m256i) -> __m256i {
    let v = if let Some(s) = row.get(at..at + 16) {
        // SAFETY: `s` is 16 readable bytes.
        unsafe { _mm_loadu_si128(s.as_ptr().cast()) }
    } else {
        let mut tail = [0i8; 16];
        if let Some(s) = row.get(at..) {
            tail[..s.len().min(16)].copy_from_slice(&s[..s.len().min(16)]);
        }
        // SAFETY: `tail` is 16 readable bytes.
        unsafe { _mm_loadu_si128(tail.as_ptr().cast()) }
    };
    _mm256_add_epi16(_mm256_cvtepi8_epi16(v), off)
}

/// Sixteen int16 of a patch row at `at` (the row is padded to a multiple of 16 with zeros).
#[target_feature(enable = "avx2")]
#[inline]
fn patch16(row: &[i16], at: usize) -> __m256i {
    let s = &row[at..at + 16];
    // SAFETY: `s` is 16 readable int16.
    unsafe { _mm256_loadu_si256(s.as_ptr().cast()) }
}

/// Dot products of two int16 patch rows `p0`, `p1` (length `kp`, a multiple of 16, zero
/// beyond the receptive field) with four weight rows (`k` int8 each, plus `woff`): `[row][pixel]`
/// sums.
#[target_feature(enable = "avx2")]
#[inline]
fn dot_4x2(p0: &[i16], p1: &[i16], w: [&[i8]; 4], kp: usize, woff: __m256i) -> [__m128i; 2] {
    let z = _mm256_setzero_si256();
    let (mut a0, mut a1, mut a2, mut a3) = (z, z, z, z);
    let (mut b0, mut b1, mut b2, mut b3) = (z, z, z, z);
    let mut at = 0;
    while at < kp {
        let x0 = patch16(p0, at);
        let x1 = patch16(p1, at);
        let w0 = weights16(w[0], at, woff);
        a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(x0, w0));
        b0 = _mm256_add_epi32(b0, _mm256_madd_epi16(x1, w0));
        let w1 = weights16(w[1], at, woff);
        a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(x0, w1));
        b1 = _mm256_add_epi32(b1, _mm256_madd_epi16(x1, w1));
        let w2 = weights16(w[2], at, woff);
        a2 = _mm256_add_epi32(a2, _mm256_madd_epi16(x0, w2));
        b2 = _mm256_add_epi32(b2, _mm256_madd_epi16(x1, w2));
        let w3 = weights16(w[3], at, woff);
        a3 = _mm256_add_epi32(a3, _mm256_madd_epi16(x0, w3));
        b3 = _mm256_add_epi32(b3, _mm256_madd_epi16(x1, w3));
        at += 16;
    }
    [hsum4(a0, a1, a2, a3), hsum4(b0, b1, b2, b3)]
}

/// [`dot_4x2`] for one weight row: its sums for the two patch rows.
#[target_feature(enable = "avx2")]
#[inline]
fn dot_1x2(p0: &[i16], p1: &[i16], w: &[i8], kp: usize, woff: __m256i) -> [i32; 2] {
    let z = _mm256_setzero_si256();
    let (mut a, mut b) = (z, z);
    let mut at = 0;
    while at < kp {
        let w0 = weights16(w, at, woff);
        a = _mm256_add_epi32(a, _mm256_madd_epi16(patch16(p0, at), w0));
        b = _mm256_add_epi32(b, _mm256_madd_epi16(patch16(p1, at), w0));
        at += 16;
    }
    let s = hsum4(a, b, z, z);
    [_mm_cvtsi128_si32(s), _mm_extract_epi32::<1>(s)]
}

/// Sums of every output channel for two patch rows: `sums[p][oc]`, weight rows of `k` int8
/// (`out` of them) plus `woff`.
#[target_feature(enable = "avx2")]
fn dot_rows(
    p: [&[i16]; 2],
    weights: &[i8],
    k: usize,
    kp: usize,
    out: usize,
    woff: __m256i,
    sums: &mut [[i32; CHANNELS]; 2],
) {
    let row = |o: usize| &weights[o * k..(o + 1) * k];
    let mut o = 0;
    while o + 4 <= out {
        let s = dot_4x2(
            p[0],
            p[1],
            [row(o), row(o + 1), row(o + 2), row(o + 3)],
            kp,
            woff,
        );
        for (px, v) in s.iter().enumerate() {
            let d = &mut sums[px][o..o + 4];
            // SAFETY: `d` is 4 writable int32 (16 bytes).
            unsafe { _mm_storeu_si128(d.as_mut_ptr().cast(), *v) };
        }
        o += 4;
    }
    while o < out {
        let [s0, s1] = dot_1x2(p[0], p[1], row(o), kp, woff);
        sums[0][o] = s0;
        sums[1][o] = s1;
        o += 1;
    }
}

/// True when the conv fast paths take this op: one group, a receptive field of at most [`PATCH`]
/// values, at most [`CHANNELS`] output channels, usual requantization, consistent lengths.
fn conv_fits(
    g: &ConvGeometry,
    q: &QuantizedOutput<'_>,
    input: &[i8],
    filter: &[i8],
    bias: Option<&[i32]>,
    output: &[i8],
) -> bool {
    let k = g.filter_h * g.filter_w * g.in_c;
    g.filter_in_c == g.in_c
        && k > 0
        && k.div_ceil(32) * 32 <= PATCH
        && g.out_c <= CHANNELS
        && super::usual_requant(q.requant)
        && offset16(q.input_zero_point).is_some()
        && input.len() == g.batch * g.in_h * g.in_w * g.in_c
        && filter.len() == g.out_c * k
        && bias.is_none_or(|b| b.len() == g.out_c)
        && output.len() == g.batch * g.out_h * g.out_w * g.out_c
        && (q.requant.len() == 1 || q.requant.len() == g.out_c)
}

/// See [`crate::kernels::conv::conv2d_i8`]: the AVX2 body when the CPU has AVX2 and the op has
/// one group, a receptive field of at most [`PATCH`] values and at most [`CHANNELS`] output
/// channels; otherwise the portable body.
pub fn conv2d_i8(
    g: &ConvGeometry,
    q: &QuantizedOutput<'_>,
    input: &[i8],
    filter: &[i8],
    bias: Option<&[i32]>,
    output: &mut [i8],
) {
    let fits = conv_fits(g, q, input, filter, bias, output);
    let k4 = (g.filter_h * g.filter_w * g.in_c).div_ceil(4) * 4;
    if fits && has_avx512_vnni() && 16 * k4 <= PACKED {
        // SAFETY: the CPU has AVX2 and AVX-512 F/VL/VNNI (checked just above).
        unsafe { conv2d_vnni512(g, q, input, filter, bias, output) }
    } else if fits && has_avx512_vnni() {
        // SAFETY: the CPU has AVX2 and AVX-512 F/VL/VNNI (checked just above).
        unsafe { conv2d_vnni(g, q, input, filter, bias, output) }
    } else if fits && has_avx2() {
        // SAFETY: the CPU has AVX2 (checked just above).
        unsafe { conv2d_avx2(g, q, input, filter, bias, output) }
    } else {
        crate::kernels::conv::conv2d_i8_portable(g, q, input, filter, bias, output)
    }
}

/// Thirty-two bytes of `s` at `at`; bytes past the end of `s` read as 0.
#[target_feature(enable = "avx2")]
#[inline]
fn load32(s: &[i8], at: usize) -> __m256i {
    if let Some(v) = s.get(at..at + 32) {
        // SAFETY: `v` is 32 readable bytes.
        unsafe { _mm256_loadu_si256(v.as_ptr().cast()) }
    } else {
        let mut tail = [0i8; 32];
        if let Some(v) = s.get(at..) {
            let n = v.len().min(32);
            tail[..n].copy_from_slice(&v[..n]);
        }
        // SAFETY: `tail` is 32 readable bytes.
        unsafe { _mm256_loadu_si256(tail.as_ptr().cast()) }
    }
}

/// Thirty-two bytes of a patch row at `at` (rows are padded to a multiple of 32).
#[target_feature(enable = "avx2")]
#[inline]
fn patch32(row: &[u8], at: usize) -> __m256i {
    let v = &row[at..at + 32];
    // SAFETY: `v` is 32 readable bytes.
    unsafe { _mm256_loadu_si256(v.as_ptr().cast()) }
}

/// The sum of a row of int8 weights (wrapping), 32 at a time with `VPDPBUSD` against ones.
#[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
fn row_sum(row: &[i8]) -> i32 {
    let ones = _mm256_set1_epi8(1);
    let mut acc = _mm256_setzero_si256();
    let mut at = 0;
    while at < row.len() {
        // Past the row's end `load32` reads zeros, which add nothing.
        acc = _mm256_dpbusd_epi32(acc, ones, load32(row, at));
        at += 32;
    }
    let z = _mm256_setzero_si256();
    _mm_cvtsi128_si32(hsum4(acc, z, z, z))
}

/// im2col of output pixel `pixel` as unsigned bytes: `x + 128` for in-image taps, `pad`
/// (`zero_point + 128`) for padding taps, 0 beyond the receptive field.
#[target_feature(enable = "avx2")]
fn im2col_u8(g: &ConvGeometry, input: &[i8], pixel: usize, pad: u8, patch: &mut [u8]) {
    let per_image = g.out_h * g.out_w;
    let (b, rest) = (pixel / per_image, pixel % per_image);
    let (oy, ox) = (rest / g.out_w, rest % g.out_w);
    let y0 = (oy * g.stride_h) as isize - g.pad_top as isize;
    let x0 = (ox * g.stride_w) as isize - g.pad_left as isize;
    let c = g.in_c;
    let flip = _mm256_set1_epi8(i8::MIN);
    let mut at = 0;
    for fy in 0..g.filter_h {
        let iy = y0 + (fy * g.dilation_h) as isize;
        for fx in 0..g.filter_w {
            let ix = x0 + (fx * g.dilation_w) as isize;
            let dst = &mut patch[at..at + c];
            if iy >= 0 && (iy as usize) < g.in_h && ix >= 0 && (ix as usize) < g.in_w {
                let from = ((b * g.in_h + iy as usize) * g.in_w + ix as usize) * c;
                let src = &input[from..from + c];
                let mut i = 0;
                while i + 32 <= c {
                    let d = &mut dst[i..i + 32];
                    // SAFETY: `src[i..i + 32]` is readable and `d` writable, 32 bytes each.
                    unsafe {
                        let v = _mm256_loadu_si256(src[i..i + 32].as_ptr().cast());
                        _mm256_storeu_si256(d.as_mut_ptr().cast(), _mm256_xor_si256(v, flip));
                    }
                    i += 32;
                }
                if i + 16 <= c {
                    let d = &mut dst[i..i + 16];
                    // SAFETY: `src[i..i + 16]` is readable and `d` writable, 16 bytes each.
                    unsafe {
                        let v = _mm_loadu_si128(src[i..i + 16].as_ptr().cast());
                        let v = _mm_xor_si128(v, _mm256_castsi256_si128(flip));
                        _mm_storeu_si128(d.as_mut_ptr().cast(), v);
                    }
                    i += 16;
                }
                for (d, &x) in dst[i..].iter_mut().zip(&src[i..]) {
                    *d = (x as u8) ^ 0x80;
                }
            } else {
                dst.fill(pad);
            }
            at += c;
        }
    }
    patch[at..].fill(0);
}

/// Pixels of one VNNI conv block: four patch rows share each weight load.
const VNNI_PIXELS: usize = 4;

/// Sums of every output channel for [`VNNI_PIXELS`] unsigned patch rows (`kp` bytes, a multiple
/// of 32, zero past the receptive field of `k` bytes): `sums[p][oc] = sum(patch * w)`, four
/// weight rows at a time (16 accumulators: AVX-512VL's 32 vector registers hold them with the
/// operands), 32 bytes per `VPDPBUSD`.
#[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
fn dot_rows_vnni(
    p: [&[u8]; VNNI_PIXELS],
    filter: &[i8],
    k: usize,
    kp: usize,
    out: usize,
    sums: &mut [[i32; CHANNELS]; VNNI_PIXELS],
) {
    let z = _mm256_setzero_si256();
    let mut o = 0;
    while o + 4 <= out {
        let base = o * k;
        // Sixteen accumulators in named variables (arrays of vectors end up on the stack).
        let (mut a0, mut a1, mut a2, mut a3) = (z, z, z, z);
        let (mut b0, mut b1, mut b2, mut b3) = (z, z, z, z);
        let (mut c0, mut c1, mut c2, mut c3) = (z, z, z, z);
        let (mut d0, mut d1, mut d2, mut d3) = (z, z, z, z);
        // Past a row's end the next row's weights meet patch zeros: they add 0. Only the last
        // rows of the filter need the bounded (copying) load.
        let direct = base + 3 * k + kp <= filter.len();
        let mut at = 0;
        while at < kp {
            let (x0, x1, x2, x3) = (
                patch32(p[0], at),
                patch32(p[1], at),
                patch32(p[2], at),
                patch32(p[3], at),
            );
            let w = |r: usize| {
                if direct {
                    let v = &filter[base + r * k + at..base + r * k + at + 32];
                    // SAFETY: `v` is 32 readable bytes.
                    unsafe { _mm256_loadu_si256(v.as_ptr().cast()) }
                } else {
                    load32(filter, base + r * k + at)
                }
            };
            let w0 = w(0);
            a0 = _mm256_dpbusd_epi32(a0, x0, w0);
            b0 = _mm256_dpbusd_epi32(b0, x1, w0);
            c0 = _mm256_dpbusd_epi32(c0, x2, w0);
            d0 = _mm256_dpbusd_epi32(d0, x3, w0);
            let w1 = w(1);
            a1 = _mm256_dpbusd_epi32(a1, x0, w1);
            b1 = _mm256_dpbusd_epi32(b1, x1, w1);
            c1 = _mm256_dpbusd_epi32(c1, x2, w1);
            d1 = _mm256_dpbusd_epi32(d1, x3, w1);
            let w2 = w(2);
            a2 = _mm256_dpbusd_epi32(a2, x0, w2);
            b2 = _mm256_dpbusd_epi32(b2, x1, w2);
            c2 = _mm256_dpbusd_epi32(c2, x2, w2);
            d2 = _mm256_dpbusd_epi32(d2, x3, w2);
            let w3 = w(3);
            a3 = _mm256_dpbusd_epi32(a3, x0, w3);
            b3 = _mm256_dpbusd_epi32(b3, x1, w3);
            c3 = _mm256_dpbusd_epi32(c3, x2, w3);
            d3 = _mm256_dpbusd_epi32(d3, x3, w3);
            at += 32;
        }
        let acc = [
            [a0, a1, a2, a3],
            [b0, b1, b2, b3],
            [c0, c1, c2, c3],
            [d0, d1, d2, d3],
        ];
        for (px, a) in acc.iter().enumerate() {
            let v = hsum4(a[0], a[1], a[2], a[3]);
            let d = &mut sums[px][o..o + 4];
            // SAFETY: `d` is 4 writable int32 (16 bytes).
            unsafe { _mm_storeu_si128(d.as_mut_ptr().cast(), v) };
        }
        o += 4;
    }
    while o < out {
        let mut acc = [z; VNNI_PIXELS];
        let mut at = 0;
        while at < kp {
            let w = load32(filter, o * k + at);
            for (a, row) in acc.iter_mut().zip(&p) {
                *a = _mm256_dpbusd_epi32(*a, patch32(row, at), w);
            }
            at += 32;
        }
        let v = hsum4(acc[0], acc[1], acc[2], acc[3]);
        let mut lanes = [0i32; 4];
        // SAFETY: `lanes` is 4 writable int32 (16 bytes).
        unsafe { _mm_storeu_si128(lanes.as_mut_ptr().cast(), v) };
        for (px, l) in lanes.iter().enumerate() {
            sums[px][o] = *l;
        }
        o += 1;
    }
}

/// Bytes of packed weights [`conv2d_vnni512`] holds on the stack: at least 16 output
/// channels' rows (receptive fields up to 2 048 values; larger ones run [`conv2d_vnni`]).
const PACKED: usize = 32_768;

/// Output channels [`conv2d_vnni512`] packs and decodes at once.
const CHUNK: usize = 64;

/// Packs `out_c` weight rows of `k` int8 for [`conv2d_vnni512`], each row's taps of `tap`
/// values spread to `tap_pad` (the extra values 0; `tap == tap_pad == k` keeps a row as it is):
/// block `b` (channels `16b..16b + 16`), group `q` (packed row bytes `4q..4q + 4`) is 64 bytes
/// at `(b * groups + q) * 64`, channel `16b + l`'s 4 bytes at `4l`. Bytes past a row or past
/// the last channel are 0. Returns each row's sum (for the zero-point correction).
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
fn pack_weights(
    filter: &[i8],
    k: usize,
    (tap, tap_pad): (usize, usize),
    out_c: usize,
    packed: &mut [i8],
    sums: &mut [i32],
) {
    let groups = (k / tap.max(1) * tap_pad).div_ceil(4);
    let blocks = out_c.div_ceil(16);
    let packed = &mut packed[..blocks * groups * 64];
    if tap == tap_pad {
        for b in 0..blocks {
            let rows = &filter[b * 16 * k..(b * 16 + (out_c - b * 16).min(16)) * k];
            let block = &mut packed[b * groups * 64..(b + 1) * groups * 64];
            let sum = pack_block(rows, k, block);
            // SAFETY: `lanes` is 64 writable bytes.
            let mut lanes = [0i32; 16];
            unsafe { _mm512_storeu_si512(lanes.as_mut_ptr().cast(), sum) };
            let n = rows.len() / k.max(1);
            sums[b * 16..b * 16 + n].copy_from_slice(&lanes[..n]);
        }
        return;
    }
    packed.fill(0);
    for (oc, row) in filter.chunks_exact(k).take(out_c).enumerate() {
        let (b, lane) = (oc / 16, oc % 16);
        // Tap `t`'s values go to packed row bytes `t * tap_pad..` (no divisions per value).
        for (t, taps) in row.chunks(tap.max(1)).enumerate() {
            for (i, &w) in taps.iter().enumerate() {
                let d = t * tap_pad + i;
                packed[(b * groups + d / 4) * 64 + lane * 4 + d % 4] = w;
            }
        }
        sums[oc] = row.iter().fold(0i32, |s, &w| s.wrapping_add(i32::from(w)));
    }
}

/// Packs one block of [`pack_weights`]: `rows` (1 to 16 rows of `k` int8) into `block`
/// (`k.div_ceil(4)` groups of 64 bytes), 16 groups at a time by a 16 x 16 transpose of 4-byte
/// words (rows past the last one are zeros). Returns the 16 rows' sums (wrapping), one a lane.
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
fn pack_block(rows: &[i8], k: usize, block: &mut [i8]) -> __m512i {
    let n = rows.len() / k.max(1);
    let full = k / 4;
    let ones = _mm512_set1_epi8(1);
    let mut sum = _mm512_setzero_si512();
    let mut q0 = 0;
    while q0 < full {
        let m = (full - q0).min(16);
        let mask = u64::MAX >> (64 - 4 * m);
        let r: [__m512i; 16] = core::array::from_fn(|l| {
            if l < n {
                let src = &rows[l * k + q0 * 4..l * k + (q0 + m) * 4];
                // SAFETY: the mask selects the `4 * m` bytes of `src`; the rest are not read.
                unsafe { _mm512_maskz_loadu_epi8(mask, src.as_ptr()) }
            } else {
                _mm512_setzero_si512()
            }
        });
        let t = transpose16(r);
        for (j, v) in t.iter().enumerate().take(m) {
            sum = _mm512_dpbusd_epi32(sum, ones, *v);
            let dst = &mut block[(q0 + j) * 64..(q0 + j + 1) * 64];
            // SAFETY: `dst` is 64 writable bytes.
            unsafe { _mm512_storeu_si512(dst.as_mut_ptr().cast(), *v) };
        }
        q0 += m;
    }
    let tail = k - full * 4;
    if tail > 0 {
        let mut last = [0i8; 64];
        let mut extra = [0i32; 16];
        for l in 0..n {
            for t in 0..tail {
                let w = rows[l * k + full * 4 + t];
                last[l * 4 + t] = w;
                extra[l] += i32::from(w);
            }
        }
        // SAFETY: `last`, `extra` and the destination are 64 bytes each.
        unsafe {
            let v = _mm512_loadu_si512(last.as_ptr().cast());
            let dst = &mut block[full * 64..full * 64 + 64];
            _mm512_storeu_si512(dst.as_mut_ptr().cast(), v);
            sum = _mm512_add_epi32(sum, _mm512_loadu_si512(extra.as_ptr().cast()));
        }
    }
    sum
}

/// Transposes 16 vectors of 16 int32: lane `l` of output `j` is lane `j` of input `l`.
#[target_feature(enable = "avx512f")]
#[inline]
fn transpose16(r: [__m512i; 16]) -> [__m512i; 16] {
    // Within each 128-bit lane: 4 x 4 transposes of rows 4a..4a + 4.
    let t: [__m512i; 16] = core::array::from_fn(|i| {
        let (a, b) = (r[(i / 2) * 2], r[(i / 2) * 2 + 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_epi32(a, b)
        } else {
            _mm512_unpackhi_epi32(a, b)
        }
    });
    // u[4a + e]: element `4i + e` of rows 4a..4a + 4 in 128-bit lane i.
    let u: [__m512i; 16] = core::array::from_fn(|i| {
        let (a, e) = (i / 4, i % 4);
        let (lo, hi) = (t[4 * a + (e / 2)], t[4 * a + 2 + (e / 2)]);
        if e % 2 == 0 {
            _mm512_unpacklo_epi64(lo, hi)
        } else {
            _mm512_unpackhi_epi64(lo, hi)
        }
    });
    core::array::from_fn(|j| {
        let (i, e) = (j / 4, j % 4);
        // Lanes i of u[e], u[4 + e], u[8 + e], u[12 + e].
        let (x0, x1, x2, x3) = (u[e], u[4 + e], u[8 + e], u[12 + e]);
        let (v, w) = if i < 2 {
            (
                _mm512_shuffle_i32x4::<0x44>(x0, x1),
                _mm512_shuffle_i32x4::<0x44>(x2, x3),
            )
        } else {
            (
                _mm512_shuffle_i32x4::<0xEE>(x0, x1),
                _mm512_shuffle_i32x4::<0xEE>(x2, x3),
            )
        };
        if i % 2 == 0 {
            _mm512_shuffle_i32x4::<0x88>(v, w)
        } else {
            _mm512_shuffle_i32x4::<0xDD>(v, w)
        }
    })
}

/// An output pixel's coordinates, stepped through the output in order (no divisions per pixel).
#[derive(Clone, Copy, Debug, Default)]
struct Pixel {
    b: usize,
    oy: usize,
    ox: usize,
}

impl Pixel {
    /// The next output pixel in NHWC order.
    fn advance(&mut self, g: &ConvGeometry) {
        self.ox += 1;
        if self.ox == g.out_w {
            self.ox = 0;
            self.oy += 1;
            if self.oy == g.out_h {
                self.oy = 0;
                self.b += 1;
            }
        }
    }
}

/// im2col of output pixel `pixel` as raw bytes: in-image taps copied, padding taps
/// `zero_point`. A filter row that lies inside the image (dilation 1 along x) is one contiguous
/// run of the input, copied at once.
fn im2col_i8(g: &ConvGeometry, input: &[i8], pixel: Pixel, zero_point: i8, patch: &mut [i8]) {
    let Pixel { b, oy, ox } = pixel;
    let y0 = (oy * g.stride_h) as isize - g.pad_top as isize;
    let x0 = (ox * g.stride_w) as isize - g.pad_left as isize;
    let c = g.in_c;
    let run = g.filter_w * c;
    let row_inside =
        g.dilation_w == 1 && x0 >= 0 && x0 as usize + g.filter_w <= g.in_w && g.filter_w > 0;
    let mut at = 0;
    for fy in 0..g.filter_h {
        let iy = y0 + (fy * g.dilation_h) as isize;
        let dst = &mut patch[at..at + run];
        if iy < 0 || iy as usize >= g.in_h {
            dst.fill(zero_point);
        } else if row_inside {
            let from = ((b * g.in_h + iy as usize) * g.in_w + x0 as usize) * c;
            dst.copy_from_slice(&input[from..from + run]);
        } else if g.dilation_w == 1 {
            // Taps `lo..hi` are in the image: padding, one run of the input, padding.
            let fw = g.filter_w as isize;
            let lo = (-x0).clamp(0, fw) as usize;
            let hi = (g.in_w as isize - x0).clamp(lo as isize, fw) as usize;
            dst[..lo * c].fill(zero_point);
            if hi > lo {
                let from =
                    ((b * g.in_h + iy as usize) * g.in_w) * c + (x0 + lo as isize) as usize * c;
                dst[lo * c..hi * c].copy_from_slice(&input[from..from + (hi - lo) * c]);
            }
            dst[hi * c..].fill(zero_point);
        } else {
            for (fx, tap) in dst.chunks_exact_mut(c.max(1)).enumerate() {
                let ix = x0 + (fx * g.dilation_w) as isize;
                if ix >= 0 && (ix as usize) < g.in_w {
                    let from = ((b * g.in_h + iy as usize) * g.in_w + ix as usize) * c;
                    tap.copy_from_slice(&input[from..from + c]);
                } else {
                    tap.fill(zero_point);
                }
            }
        }
        at += run;
    }
}

/// The input offset of output pixel `pixel`'s receptive field when all of it lies inside the
/// image (its first filter row's first tap); `None` when a tap reads padding.
fn in_image(g: &ConvGeometry, pixel: Pixel) -> Option<usize> {
    let Pixel { b, oy, ox } = pixel;
    let y0 = (oy * g.stride_h).checked_sub(g.pad_top)?;
    let x0 = (ox * g.stride_w).checked_sub(g.pad_left)?;
    let y_end = y0 + (g.filter_h.max(1) - 1) * g.dilation_h;
    let x_end = x0 + (g.filter_w.max(1) - 1) * g.dilation_w;
    (y_end < g.in_h && x_end < g.in_w).then(|| ((b * g.in_h + y0) * g.in_w + x0) * g.in_c)
}

/// Output pixels of one [`conv2d_vnni512`] block.
const PIXELS_512: usize = 8;

/// CONV_2D with 512-bit `VPDPBUSD`. The packed weights (see [`pack_weights`]; one 64-byte load =
/// 4 consecutive weights of 16 channels) stay signed and the activations are the unsigned
/// operand, `x + 128`: strip rows are stored that way, other layouts (input rows, in-image runs,
/// patch copies; padding taps hold the zero point, bytes past the field 0) get their top bits
/// flipped after the broadcast of 4 bytes. So a sum is `sum(w * (x + 128))`, and TFLM's
/// `sum(w * (x - zero_point))` is that minus `(zero_point + 128) * sum(w)`, taken off the bias
/// once per channel: no per-pixel sums. Tiles of 8 pixels by 16 or 32 channels: per 4 input
/// bytes one or two weight loads and 8 or 16 `VPDPBUSD` (512 MACs each 8). Products are at most
/// `255 * 128` and four of them fit int32; sums wrap like the portable body's.
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
fn conv2d_vnni512(
    g: &ConvGeometry,
    q: &QuantizedOutput<'_>,
    input: &[i8],
    filter: &[i8],
    bias: Option<&[i32]>,
    output: &mut [i8],
) {
    conv2d_vnni512_layout(g, q, input, filter, bias, output, true)
}

/// [`conv2d_vnni512`], with (`strips`) or without strip rows (tests reach the other layouts).
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
fn conv2d_vnni512_layout(
    g: &ConvGeometry,
    q: &QuantizedOutput<'_>,
    input: &[i8],
    filter: &[i8],
    bias: Option<&[i32]>,
    output: &mut [i8],
    strips: bool,
) {
    let strip = if strips && !reads_input_rows(g) {
        strip_row(g)
    } else {
        None
    };
    let args = (g, q, input, filter, bias);
    // Input rows and strips are read in place: no patch.
    if strip.is_some() || reads_input_rows(g) {
        conv2d_vnni512_with::<0>(args, output, strip)
    } else {
        conv2d_vnni512_with::<{ PIXELS_512 * PATCH_512 }>(args, output, strip)
    }
}

/// The operands of a CONV_2D: geometry, quantization, input, filter, bias.
type ConvArgs<'a, 'q> = (
    &'a ConvGeometry,
    &'a QuantizedOutput<'q>,
    &'a [i8],
    &'a [i8],
    Option<&'a [i32]>,
);

/// [`conv2d_vnni512`] with a patch of `P` bytes and [`PACKED`] bytes of packed weights on the
/// stack: sized for the largest layer, zeroed only as far as this one uses them (8 patch rows,
/// at most `CHUNK` channels' packed rows; see `conv2d_vnni512_in`).
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
fn conv2d_vnni512_with<const P: usize>(
    (g, q, input, filter, bias): ConvArgs<'_, '_>,
    output: &mut [i8],
    strip: Option<(usize, usize)>,
) {
    let k4 = match strip {
        Some((_, per_pixel)) => g.filter_h * g.filter_w * per_pixel,
        None => g.filter_h * g.filter_w * g.in_c,
    }
    .div_ceil(4)
        * 4;
    let mut patch = MaybeUninit::<[i8; P]>::uninit();
    let mut packed = MaybeUninit::<[i8; PACKED]>::uninit();
    let patch = zeroed(&mut patch, PIXELS_512 * patch_stride(g));
    let packed = zeroed(&mut packed, CHUNK * k4);
    conv2d_vnni512_in((g, q, input, filter, bias), output, packed, patch, strip)
}

/// Longest receptive field of [`conv2d_vnni512`] (values, rounded up to 4): 16 channels' packed
/// rows fit [`PACKED`].
const PATCH_512: usize = PACKED / 16;

/// Bytes between two rows of the [`conv2d_vnni512`] patch: the receptive field rounded up to
/// 32, so that each row's sum runs over whole 32-byte vectors (the bytes past the field are 0).
fn patch_stride(g: &ConvGeometry) -> usize {
    (g.filter_h * g.filter_w * g.in_c).div_ceil(32) * 32
}

/// True when the receptive field of output pixel `p` is input pixel `p`'s channels, in place:
/// a 1x1 filter, stride 1, no padding, and whole groups of 4 channels.
fn reads_input_rows(g: &ConvGeometry) -> bool {
    g.filter_h == 1
        && g.filter_w == 1
        && g.stride_h == 1
        && g.stride_w == 1
        && g.pad_top == 0
        && g.pad_left == 0
        && g.in_h == g.out_h
        && g.in_w == g.out_w
        && g.in_c.is_multiple_of(4)
}

/// Bytes of the strip rows of [`conv2d_vnni512`].
const STRIP: usize = 16_384;

/// Whether [`conv2d_vnni512`] reads the layer from *strip rows*: padded copies of the input rows
/// its filter rows read (the zero point in place of padding), so that every output pixel reads
/// its receptive field in place, one filter row at a time. A filter row must be whole groups of
/// 4 bytes: it is when `filter_w * in_c` is a multiple of 4 (then only for output rows of at
/// least a tile's 8 pixels), and first layers of 1 to 3 channels get each pixel's channels
/// spread to 4 bytes (the rest 0). Returns the strip row length and the bytes per strip pixel.
fn strip_row(g: &ConvGeometry) -> Option<(usize, usize)> {
    let per_pixel = if (g.filter_w * g.in_c).is_multiple_of(4) {
        // Tiles stay within an output row: rows narrower than a tile leave lanes idle, where
        // the implicit layout (tiles across rows) does not.
        if g.out_w < PIXELS_512 {
            return None;
        }
        g.in_c
    } else if (1..=3).contains(&g.in_c) {
        4
    } else {
        return None;
    };
    let row = row_span(g) * per_pixel;
    let fits = g.dilation_w == 1
        && g.filter_h * row <= STRIP
        && 16 * g.filter_h * g.filter_w * per_pixel <= PACKED;
    fits.then_some((row, per_pixel))
}

/// Fills strip row `row` (see [`strip_row`], `per_pixel` bytes a pixel) from input row `iy` of
/// image `b` (`None`: a row of padding) with activations made unsigned, `x + 128` (the byte
/// `x ^ 0x80`): strip pixel `x` is input pixel `x - pad_left`, its channels then zeros up to
/// `per_pixel` bytes; pixels outside the image hold the zero point (plus 128) in their channels.
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl")]
fn fill_strip(
    g: &ConvGeometry,
    input: &[i8],
    (b, iy): (usize, Option<usize>),
    zp: i8,
    per_pixel: usize,
    row: &mut [i8],
) {
    let c = g.in_c;
    let zp = zp ^ i8::MIN;
    let span = row.len() / per_pixel;
    // Strip pixels `first..last` are in the image.
    let first = g.pad_left.min(span);
    let last = (g.pad_left + g.in_w).min(span).max(first);
    let line = iy.map(|iy| &input[(b * g.in_h + iy) * g.in_w * c..][..g.in_w * c]);
    if per_pixel == c {
        // The row as it is, the zero point around it.
        match line {
            Some(line) => {
                row[..first * c].fill(zp);
                copy_flipped(&line[..(last - first) * c], &mut row[first * c..last * c]);
                row[last * c..].fill(zp);
            }
            None => row.fill(zp),
        }
        return;
    }
    let pad: [i8; 4] = core::array::from_fn(|k| if k < c { zp } else { 0 });
    let pattern = _mm512_set1_epi32(i32::from_ne_bytes(pad.map(|b| b as u8)));
    for part in row.chunks_mut(64) {
        let mask = u64::MAX >> (64 - part.len());
        // SAFETY: the mask selects the bytes of `part`; the others are not written.
        unsafe { _mm512_mask_storeu_epi8(part.as_mut_ptr(), mask, pattern) };
    }
    let Some(line) = line else { return };
    // Four pixels at a time: 4c input bytes (masked load) spread by one byte shuffle.
    let control: [i8; 16] = core::array::from_fn(|j| {
        let (pixel, ch) = (j / 4, j % 4);
        if ch < c {
            (pixel * c + ch) as i8
        } else {
            -1
        }
    });
    let flip: [i8; 16] = core::array::from_fn(|j| if j % 4 < c { i8::MIN } else { 0 });
    // SAFETY: `control` and `flip` are 16 readable bytes.
    let (control, flip) = unsafe {
        (
            _mm_loadu_si128(control.as_ptr().cast()),
            _mm_loadu_si128(flip.as_ptr().cast()),
        )
    };
    let mask = (1u16 << (4 * c)) - 1;
    let mut x = first;
    while x + 4 <= last {
        let src = &line[(x - g.pad_left) * c..][..4 * c];
        let dst = &mut row[x * 4..x * 4 + 16];
        // SAFETY: the mask selects the `4 * c` bytes of `src` (masked-off bytes are not read);
        // `dst` is 16 writable bytes.
        unsafe {
            let v = _mm_maskz_loadu_epi8(mask, src.as_ptr());
            let spread = _mm_xor_si128(_mm_shuffle_epi8(v, control), flip);
            _mm_storeu_si128(dst.as_mut_ptr().cast(), spread);
        }
        x += 4;
    }
    while x < last {
        let src = &line[(x - g.pad_left) * c..][..c];
        copy_flipped(src, &mut row[x * 4..x * 4 + c]);
        x += 1;
    }
}

/// Copies `src` into `dst` (as long) with each byte's top bit flipped (`x + 128` as unsigned).
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl")]
fn copy_flipped(src: &[i8], dst: &mut [i8]) {
    assert_eq!(src.len(), dst.len());
    let flip = _mm512_set1_epi8(i8::MIN);
    for (s, d) in src.chunks(64).zip(dst.chunks_mut(64)) {
        let mask = u64::MAX >> (64 - s.len());
        // SAFETY: the mask selects the bytes of `s` and `d` (same length); masked-off bytes are
        // neither read nor written.
        unsafe {
            let v = _mm512_maskz_loadu_epi8(mask, s.as_ptr());
            _mm512_mask_storeu_epi8(d.as_mut_ptr(), mask, _mm512_xor_si512(v, flip));
        }
    }
}

/// The sums of one [`conv2d_vnni512`] tile: 8 pixels by `C` blocks of 16 channels (blocks
/// `w[c * groups * 64..]`, see [`pack_weights`]). Pixel `i`'s run `s` of `seg_groups` groups of
/// 4 bytes is at `base[i] + s * step[i] + seg_off[s]`. `U`: the activations are stored
/// unsigned (`x + 128`); otherwise signed, and flipped after each broadcast.
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
fn tile_sums<const C: usize, const U: bool>(
    w: &[i8],
    groups: usize,
    seg_groups: usize,
    (base, step, seg_off): (&[*const i8; PIXELS_512], &[usize; PIXELS_512], &[usize]),
) -> [[__m512i; PIXELS_512]; C] {
    assert!(w.len() >= C * groups * 64 && seg_groups > 0);
    let flip = _mm512_set1_epi8(i8::MIN);
    let wp = w.as_ptr();
    if C == 1 {
        // One block: two sets of 8 accumulators (even and odd groups) so that 16 sums are in
        // flight, as with two blocks.
        let mut acc = [[_mm512_setzero_si512(); PIXELS_512]; 2];
        for sgm in 0..groups / seg_groups {
            let off = seg_off.get(sgm).copied().unwrap_or(0);
            // SAFETY: as in the general loop below.
            let r: [*const [u8; 4]; PIXELS_512] =
                core::array::from_fn(|i| unsafe { base[i].add(sgm * step[i] + off).cast() });
            let mut j = 0;
            while j < seg_groups {
                let pair = (seg_groups - j).min(2);
                for (h, set) in acc.iter_mut().enumerate().take(pair) {
                    let q = sgm * seg_groups + j + h;
                    // SAFETY: as in the general loop below.
                    let wv = unsafe { _mm512_loadu_si512(wp.add(q * 64).cast()) };
                    for (i, a) in set.iter_mut().enumerate() {
                        // SAFETY: as in the general loop below.
                        let bytes = unsafe { r[i].add(j + h).read_unaligned() };
                        let x = _mm512_set1_epi32(i32::from_le_bytes(bytes));
                        let x = if U { x } else { _mm512_xor_si512(x, flip) };
                        *a = _mm512_dpbusd_epi32(*a, x, wv);
                    }
                }
                j += pair;
            }
        }
        return core::array::from_fn(|_| {
            core::array::from_fn(|i| _mm512_add_epi32(acc[0][i], acc[1][i]))
        });
    }
    let mut acc = [[_mm512_setzero_si512(); PIXELS_512]; C];
    for sgm in 0..groups / seg_groups {
        let off = seg_off.get(sgm).copied().unwrap_or(0);
        // SAFETY (for the reads below): run `sgm` of each pixel holds `4 * seg_groups` readable
        // bytes (a patch row's part, an in-image run of the input, or a strip row's part; see
        // the callers), read unaligned 4 at a time with `j < seg_groups`; weight group `q` of
        // block `c` is 64 bytes at `(c * groups + q) * 64 < w.len()` (asserted above).
        let r: [*const [u8; 4]; PIXELS_512] =
            core::array::from_fn(|i| unsafe { base[i].add(sgm * step[i] + off).cast() });
        for j in 0..seg_groups {
            let q = sgm * seg_groups + j;
            let wv: [__m512i; C] = core::array::from_fn(|c| unsafe {
                _mm512_loadu_si512(wp.add((c * groups + q) * 64).cast())
            });
            for i in 0..PIXELS_512 {
                let x =
                    unsafe { _mm512_set1_epi32(i32::from_le_bytes(r[i].add(j).read_unaligned())) };
                let x = if U { x } else { _mm512_xor_si512(x, flip) };
                for c in 0..C {
                    acc[c][i] = _mm512_dpbusd_epi32(acc[c][i], x, wv[c]);
                }
            }
        }
    }
    acc
}

/// The body of [`conv2d_vnni512`]; `strip` = [`strip_row`] when strip rows are used.
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
fn conv2d_vnni512_in(
    (g, q, input, filter, bias): ConvArgs<'_, '_>,
    output: &mut [i8],
    packed: &mut [i8],
    patch: &mut [i8],
    strip: Option<(usize, usize)>,
) {
    let k = g.filter_h * g.filter_w * g.in_c;
    let stride = patch_stride(g);
    let direct = reads_input_rows(g);
    // Every pixel read in place from strip rows where they fit.
    let strip_len = if direct { None } else { strip };
    // Otherwise, filter rows of whole groups of 4 (contiguous in the input): pixels whose
    // receptive field lies inside the image are read in place, one run per filter row; others
    // from the patch.
    let implicit = !direct
        && strip_len.is_none()
        && g.dilation_w == 1
        && (g.filter_w * g.in_c).is_multiple_of(4);
    // Packed rows: taps of `in_c` values spread to the strip's bytes per pixel.
    let (tap, tap_pad, kp) = match strip_len {
        Some((_, per_pixel)) => (g.in_c, per_pixel, g.filter_h * g.filter_w * per_pixel),
        None => (k, k, k),
    };
    let groups = kp.div_ceil(4);
    let k4 = groups * 4;
    let (segments, seg_groups) = if implicit || strip_len.is_some() {
        (g.filter_h, groups / g.filter_h)
    } else {
        (1, groups)
    };
    debug_assert_eq!(segments * seg_groups, groups);
    let row_step = g.dilation_h * g.in_w * g.in_c;
    let mut interior = [None::<usize>; PIXELS_512];
    let two_pixels = g.out_c == 8;
    let chunk = (packed.len() / k4 / 16 * 16).min(CHUNK);
    let mut sums = [0i32; CHUNK];
    let zp = q.input_zero_point as i8;
    let pixels = g.batch * g.out_h * g.out_w;
    let z = _mm512_setzero_si512();
    let mut first = 0;
    while first < g.out_c {
        let count = (g.out_c - first).min(chunk);
        // Strip rows hold unsigned activations (`x + 128`); other layouts are flipped as read.
        let unsigned_x = strip_len.is_some();
        pack_weights(
            &filter[first * k..(first + count) * k],
            k,
            (tap, tap_pad),
            count,
            packed,
            &mut sums,
        );
        let blocks = count.div_ceil(16);
        let mut d = Decoded::<CHUNK>::new(q, bias, first, count);
        // sum(w * (x - zp)) = sum(w * (x + 128)) - (zp + 128) * sum(w).
        let zp_off = q.input_zero_point + 128;
        for (b, &sum) in d.bias.iter_mut().zip(&sums).take(count) {
            *b = b.wrapping_sub(zp_off.wrapping_mul(sum));
        }
        if two_pixels {
            d.repeat8();
        }
        let packed: &[i8] = packed;
        // One tile: pixels `p..p + n` (consecutive), each one's receptive field as `segments`
        // runs of `seg_groups` groups of 4 bytes, run `s` of pixel `i` at `base[i] + s *
        // step[i] + seg_off[s]` (`seg_off` empty: 0).
        let tile =
            |p: usize,
             n: usize,
             (base, step, seg_off): (&[*const i8; PIXELS_512], &[usize; PIXELS_512], &[usize]),
             output: &mut [i8]| {
                // Two blocks (32 channels) a pass where there are: 16 accumulators hide
                // `VPDPBUSD`'s latency and each broadcast feeds two of them.
                let mut b = 0;
                while b < blocks {
                    let runs = (base, step, seg_off);
                    let w = &packed[b * groups * 64..];
                    let pair: [[__m512i; PIXELS_512]; 2] = match (blocks - b >= 2, unsigned_x) {
                        (true, true) => tile_sums::<2, true>(w, groups, seg_groups, runs),
                        (true, false) => tile_sums::<2, false>(w, groups, seg_groups, runs),
                        (false, true) => {
                            [tile_sums::<1, true>(w, groups, seg_groups, runs)[0], [z; 8]]
                        }
                        (false, false) => [
                            tile_sums::<1, false>(w, groups, seg_groups, runs)[0],
                            [z; 8],
                        ],
                    };
                    let done = (blocks - b).min(2);
                    for (b, accs) in (b..b + done).zip(pair) {
                        let c = b * 16;
                        let width = (count - c).min(16);
                        if two_pixels {
                            // 8 channels: pixels i and i + 1 share one output stage and one store.
                            for i in (0..n).step_by(2) {
                                let (lo, hi) = (accs[i], accs[i + 1]);
                                // Lanes 8-15 take the second pixel's lanes 0-7.
                                let hi = _mm512_shuffle_i32x4::<0b0100_0100>(hi, hi);
                                let v = d.sixteen(_mm512_mask_blend_epi32(0xff00, lo, hi), 0);
                                let at = (p + i) * 8;
                                let bytes = if i + 1 < n { 16 } else { 8 };
                                store16(v, &mut output[at..at + bytes]);
                            }
                            continue;
                        }
                        for (i, acc) in accs.into_iter().enumerate().take(n) {
                            let v = d.sixteen(acc, c);
                            let at = (p + i) * g.out_c + first + c;
                            store16(v, &mut output[at..at + width]);
                        }
                    }
                    b += done;
                }
            };
        if let Some((row_len, per_pixel)) = strip_len {
            let mut strip = MaybeUninit::<[i8; STRIP]>::uninit();
            let strip = zeroed(&mut strip, g.filter_h * row_len);
            // Strip rows cached across output rows (the filter-row count of them).
            let fh = g.filter_h;
            let mut slot_of = [0usize; TAPS];
            let mut seg_off = [0usize; TAPS];
            for b in 0..g.batch {
                let mut slots = RowSlots::new(fh);
                for oy in 0..g.out_h {
                    slots.assign(g, oy, &mut slot_of, |s, iy| {
                        let row = &mut strip[s * row_len..(s + 1) * row_len];
                        fill_strip(g, input, (b, iy), zp, per_pixel, row);
                    });
                    let row_start = (b * g.out_h + oy) * g.out_w;
                    // Run `r` of pixel `i` is strip row `slot_of[r]` at the pixel's offset.
                    for (o, s) in seg_off.iter_mut().zip(&slot_of).take(fh) {
                        *o = s * row_len;
                    }
                    let pixel_bytes = g.stride_w * per_pixel;
                    let mut ox0 = 0;
                    while ox0 < g.out_w {
                        let n = (g.out_w - ox0).min(PIXELS_512);
                        let mut base = [strip.as_ptr(); PIXELS_512];
                        for (i, base) in base.iter_mut().enumerate() {
                            let at = (ox0 + i).min(g.out_w - 1) * pixel_bytes;
                            *base = strip[at..].as_ptr();
                        }
                        let step = [0usize; PIXELS_512];
                        tile(row_start + ox0, n, (&base, &step, &seg_off[..fh]), output);
                        ox0 += PIXELS_512;
                    }
                }
            }
        } else {
            let mut p = 0;
            let mut cursor = Pixel::default();
            if direct {
                // Every pixel's field is its input row (`k == k4`): all inside `input`.
                assert!(k4 == k && pixels * k <= input.len());
            }
            while p < pixels {
                let n = (pixels - p).min(PIXELS_512);
                if direct {
                    // Rows past the last pixel repeat it (their results are not stored).
                    let base: [*const i8; PIXELS_512] = core::array::from_fn(|i| {
                        // SAFETY: `(p + i).min(pixels - 1) * k + k <= input.len()` (asserted).
                        unsafe { input.as_ptr().add((p + i).min(pixels - 1) * k) }
                    });
                    tile(p, n, (&base, &[k; PIXELS_512], &[]), output);
                    p += PIXELS_512;
                    continue;
                }
                let rows: [&[i8]; PIXELS_512] = {
                    // Rows past the last pixel repeat it (their results are not stored).
                    let mut at = cursor;
                    for (i, row) in patch.chunks_exact_mut(stride).take(PIXELS_512).enumerate() {
                        interior[i] = if implicit { in_image(g, at) } else { None };
                        // In-image fields are read in place; the others copied (bytes
                        // `k..stride` stay 0 from the buffer's creation).
                        if interior[i].is_none() {
                            im2col_i8(g, input, at, zp, &mut row[..k]);
                        }
                        if p + i + 1 < pixels {
                            at.advance(g);
                        }
                    }
                    cursor = at;
                    core::array::from_fn(|i| &patch[i * stride..i * stride + k4])
                };
                let mut base: [*const i8; PIXELS_512] = rows.map(|r| r.as_ptr());
                let mut step = [seg_groups * 4; PIXELS_512];
                for (i, inner) in interior.iter().enumerate().take(PIXELS_512) {
                    if let Some(at) = inner {
                        base[i] = input[*at..].as_ptr();
                        step[i] = row_step;
                    }
                }
                tile(p, n, (&base, &step, &[]), output);
                p += PIXELS_512;
            }
        }
        first += count;
    }
}

/// CONV_2D with `VPDPBUSD` (unsigned activations times signed weights, four products per
/// int32 lane). Activations enter as `x + 128` (padding taps as `zero_point + 128`), so each
/// sum exceeds TFLM's `sum(w * (x - zero_point))` by `(zero_point + 128) * sum(w)`, which is
/// taken off the bias once per channel. Products (at most 255 * 128) and four of them fit
/// int32; sums wrap like the portable body's.
#[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
fn conv2d_vnni(
    g: &ConvGeometry,
    q: &QuantizedOutput<'_>,
    input: &[i8],
    filter: &[i8],
    bias: Option<&[i32]>,
    output: &mut [i8],
) {
    let k = g.filter_h * g.filter_w * g.in_c;
    let kp = k.div_ceil(32) * 32;
    let pad = (q.input_zero_point + 128) as u8;
    let mut d = Decoded::<CHANNELS>::new(q, bias, 0, g.out_c);
    for oc in 0..g.out_c {
        let corr = (q.input_zero_point + 128).wrapping_mul(row_sum(&filter[oc * k..(oc + 1) * k]));
        d.bias[oc] = d.bias[oc].wrapping_sub(corr);
    }
    let mut patch = [[0u8; PATCH]; VNNI_PIXELS];
    let mut sums = [[0i32; CHANNELS]; VNNI_PIXELS];
    let pixels = g.batch * g.out_h * g.out_w;
    let mut p = 0;
    while p < pixels {
        // A last block of fewer pixels repeats the last one (computed, not stored twice).
        let px = |i: usize| (p + i).min(pixels - 1);
        for (i, row) in patch.iter_mut().enumerate() {
            im2col_u8(g, input, px(i), pad, &mut row[..kp]);
        }
        let [r0, r1, r2, r3] = &patch;
        dot_rows_vnni(
            [&r0[..kp], &r1[..kp], &r2[..kp], &r3[..kp]],
            filter,
            k,
            kp,
            g.out_c,
            &mut sums,
        );
        for (i, sum) in sums.iter().enumerate().take(pixels - p) {
            let at = px(i) * g.out_c;
            d.row(&sum[..g.out_c], &mut output[at..at + g.out_c]);
        }
        p += VNNI_PIXELS;
    }
}

/// im2col of output pixel `pixel` (`b * out_h * out_w + oy * out_w + ox`) into `patch`:
/// `x - zero_point` for in-image taps, 0 for padding taps and beyond the receptive field.
#[target_feature(enable = "avx2")]
fn im2col(g: &ConvGeometry, input: &[i8], pixel: usize, off: i16, patch: &mut [i16]) {
    let per_image = g.out_h * g.out_w;
    let (b, rest) = (pixel / per_image, pixel % per_image);
    let (oy, ox) = (rest / g.out_w, rest % g.out_w);
    let y0 = (oy * g.stride_h) as isize - g.pad_top as isize;
    let x0 = (ox * g.stride_w) as isize - g.pad_left as isize;
    let c = g.in_c;
    let mut at = 0;
    for fy in 0..g.filter_h {
        let iy = y0 + (fy * g.dilation_h) as isize;
        for fx in 0..g.filter_w {
            let ix = x0 + (fx * g.dilation_w) as isize;
            let dst = &mut patch[at..at + c];
            if iy >= 0 && (iy as usize) < g.in_h && ix >= 0 && (ix as usize) < g.in_w {
                let src = ((b * g.in_h + iy as usize) * g.in_w + ix as usize) * c;
                widen(&input[src..src + c], off, dst);
            } else {
                dst.fill(0);
            }
            at += c;
        }
    }
    patch[at..].fill(0);
}

#[target_feature(enable = "avx2")]
fn conv2d_avx2(
    g: &ConvGeometry,
    q: &QuantizedOutput<'_>,
    input: &[i8],
    filter: &[i8],
    bias: Option<&[i32]>,
    output: &mut [i8],
) {
    let off = offset16(q.input_zero_point).unwrap_or(0);
    let k = g.filter_h * g.filter_w * g.in_c;
    let kp = k.div_ceil(16) * 16;
    let d = Decoded::<CHANNELS>::new(q, bias, 0, g.out_c);
    let mut patch = [[0i16; PATCH]; 2];
    let mut sums = [[0i32; CHANNELS]; 2];
    let pixels = g.batch * g.out_h * g.out_w;
    let zero = _mm256_setzero_si256();
    let mut p = 0;
    while p < pixels {
        let second = (p + 1).min(pixels - 1);
        let [row0, row1] = &mut patch;
        im2col(g, input, p, off, &mut row0[..kp]);
        im2col(g, input, second, off, &mut row1[..kp]);
        dot_rows(
            [&row0[..kp], &row1[..kp]],
            filter,
            k,
            kp,
            g.out_c,
            zero,
            &mut sums,
        );
        for (i, px) in [p, second].into_iter().enumerate().take(pixels - p) {
            d.row(
                &sums[i][..g.out_c],
                &mut output[px * g.out_c..(px + 1) * g.out_c],
            );
        }
        p += 2;
    }
}

/// See [`crate::kernels::fully_connected::fully_connected_i8`]: the AVX2 body when the CPU has
/// AVX2 and the op has at most [`PATCH`] input and [`CHANNELS`] output features; otherwise the
/// portable body.
pub fn fully_connected_i8(
    g: &FullyConnectedGeometry,
    q: &QuantizedOutput<'_>,
    input: &[i8],
    weights: &[i8],
    bias: Option<&[i32]>,
    output: &mut [i8],
) {
    let n = g.in_features;
    let fits = n > 0
        && n.div_ceil(16) * 16 <= PATCH
        && g.out_features <= CHANNELS
        && super::usual_requant(q.requant)
        && offset16(q.input_zero_point).is_some()
        && offset16(q.filter_zero_point).is_some()
        && input.len() == g.batch * n
        && weights.len() == g.out_features * n
        && bias.is_none_or(|b| b.len() == g.out_features)
        && output.len() == g.batch * g.out_features
        && (q.requant.len() == 1 || q.requant.len() == g.out_features);
    if fits && has_avx2() {
        // SAFETY: the CPU has AVX2 (checked just above).
        unsafe { fully_connected_avx2(g, q, input, weights, bias, output) }
    } else {
        crate::kernels::fully_connected::fully_connected_i8_portable(
            g, q, input, weights, bias, output,
        )
    }
}

#[target_feature(enable = "avx2")]
fn fully_connected_avx2(
    g: &FullyConnectedGeometry,
    q: &QuantizedOutput<'_>,
    input: &[i8],
    weights: &[i8],
    bias: Option<&[i32]>,
    output: &mut [i8],
) {
    let n = g.in_features;
    let np = n.div_ceil(16) * 16;
    let off = offset16(q.input_zero_point).unwrap_or(0);
    let woff = _mm256_set1_epi16(offset16(q.filter_zero_point).unwrap_or(0));
    let d = Decoded::<CHANNELS>::new(q, bias, 0, g.out_features);
    let mut rows = [[0i16; PATCH]; 2];
    let mut sums = [[0i32; CHANNELS]; 2];
    let mut b = 0;
    while b < g.batch {
        let second = (b + 1).min(g.batch - 1);
        for (row, r) in rows.iter_mut().zip([b, second]) {
            widen(&input[r * n..(r + 1) * n], off, &mut row[..n]);
            row[n..np].fill(0);
        }
        let [row0, row1] = &rows;
        dot_rows(
            [&row0[..np], &row1[..np]],
            weights,
            n,
            np,
            g.out_features,
            woff,
            &mut sums,
        );
        for (i, r) in [b, second].into_iter().enumerate().take(g.batch - b) {
            d.row(
                &sums[i][..g.out_features],
                &mut output[r * g.out_features..(r + 1) * g.out_features],
            );
        }
        b += 2;
    }
}

/// See [`crate::kernels::depthwise::depthwise_conv2d_i8`]: the AVX2 body when the CPU has AVX2
/// and the op has a depth multiplier of 1, at most `TAPS` (64) filter taps and [`CHANNELS`]
/// channels; otherwise the portable body.
pub fn depthwise_conv2d_i8(
    g: &ConvGeometry,
    q: &QuantizedOutput<'_>,
    input: &[i8],
    filter: &[i8],
    bias: Option<&[i32]>,
    output: &mut [i8],
) {
    let taps = g.filter_h * g.filter_w;
    let fits = g.depth_multiplier == 1
        && g.in_c == g.out_c
        && taps > 0
        && taps <= TAPS
        && g.out_c <= CHANNELS
        && super::usual_requant(q.requant)
        && offset16(q.input_zero_point).is_some()
        && input.len() == g.batch * g.in_h * g.in_w * g.in_c
        && filter.len() == taps * g.out_c
        && bias.is_none_or(|b| b.len() == g.out_c)
        && output.len() == g.batch * g.out_h * g.out_w * g.out_c
        && (q.requant.len() == 1 || q.requant.len() == g.out_c);
    if fits && has_avx512_vnni() && dw512_fits(g) {
        // SAFETY: the CPU has AVX2 and AVX-512 F/BW/VL/VNNI (checked just above).
        unsafe { depthwise_vnni512(g, q, input, filter, bias, output) }
    } else if fits && has_avx2() {
        // SAFETY: the CPU has AVX2 (checked just above).
        unsafe { depthwise_avx2(g, q, input, filter, bias, output) }
    } else {
        crate::kernels::depthwise::depthwise_conv2d_i8_portable(g, q, input, filter, bias, output)
    }
}

/// Channels [`depthwise_vnni512`] decodes at once (its output stage holds them all).
const DW512_CHANNELS: usize = 256;

/// Weight vectors [`depthwise_vnni512`] holds: blocks of 16 channels x filter rows x pairs of
/// horizontal taps.
const DW512_WEIGHTS: usize = 128;

/// Widened rows [`depthwise_vnni512`] may hold (int16 pairs as int32, over all filter rows): the
/// largest of its three stack buffers (the others are a quarter and an eighth of it).
const DW512_PAIRS: usize = 12_288;

/// Bytes of the int8 padded row [`depthwise_vnni512`] widens from.
const DW512_ROW: usize = 8_192;

// The large tier's buffer holds any padded row `dw512_fits` admits.
const _: () = assert!(DW512_PAIRS >= DW512_ROW);

/// Input pixels a filter row spans over a whole output row (padding included): the width of
/// the padded rows of [`depthwise_vnni512`] and of the strip rows of [`conv2d_vnni512`].
fn row_span(g: &ConvGeometry) -> usize {
    (g.out_w.max(1) - 1) * g.stride_w + (g.filter_w.max(1) - 1) * g.dilation_w + 1
}

/// How [`depthwise_vnni512`] lays out its lanes: 16 consecutive bytes of an output row (the
/// channels of `16 / c` neighbouring pixels) when the stride along x is 1 and `c` divides 16;
/// otherwise 16 channels of one pixel.
fn dw512_packs_pixels(g: &ConvGeometry) -> bool {
    g.stride_w == 1 && g.out_c < 16 && 16 % g.out_c == 0
}

/// Elements of one widened row of [`depthwise_vnni512`] (one int32 per padded-row byte, 16 more
/// for a last vector of fewer lanes).
fn dw512_row_elements(g: &ConvGeometry) -> usize {
    (row_span(g) * g.out_c).div_ceil(16) * 16 + 16
}

/// Whether [`depthwise_vnni512`] takes the layer: its channels, weights and rows fit its stack
/// buffers.
fn dw512_fits(g: &ConvGeometry) -> bool {
    let c = g.out_c;
    if c == 0 || c > DW512_CHANNELS || g.out_w == 0 || g.filter_w == 0 || g.filter_h == 0 {
        return false;
    }
    let blocks = if dw512_packs_pixels(g) {
        1
    } else {
        c.div_ceil(16)
    };
    let elements = dw512_row_elements(g);
    blocks * g.filter_h * g.filter_w.div_ceil(2) <= DW512_WEIGHTS
        && g.filter_h * elements <= DW512_PAIRS
        && elements + g.dilation_w * c + 16 <= DW512_ROW
}

/// Depthwise, depth multiplier 1, with 512-bit `VPDPWSSD` and no shuffles in the inner loop.
///
/// Each input row a filter row reads is widened once into a *pair row*: for every byte `f` of
/// the padded row (the zero point left and right of the image; rows above and below it are all
/// zero point), the int16 pair `(x[f], x[f + dilation * c])`: a value and its right-hand
/// neighbour's, the two inputs of horizontal taps `2j` and `2j + 1`. A lane's taps `2j, 2j + 1` of
/// filter row `r` are then one int32 of pair row `r` at the lane's offset plus `2j * dilation *
/// c`, and one `VPDPWSSD` against the weights `(w[r][2j], w[r][2j + 1])` (0 past the filter) adds
/// both products: a 3x3 filter is 6 loads and 6 `VPDPWSSD` per 16 outputs. Pair rows are cached
/// across output rows (filter-row count of them), so with stride 1 each input row is widened
/// once. Lanes are 16 channels of one pixel, or, for a stride of 1 along x and fewer than 16
/// channels dividing 16, 16 consecutive bytes of the output row (several pixels at once). Sums
/// are `sum(w * x)`; the input offset enters once per channel as `-zero_point * sum(w)` with the
/// bias (padding holds the zero point, so each tap adds `w * (x - zero_point)` as TFLM's does).
/// Lanes past the channels compute garbage that is never stored.
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
fn depthwise_vnni512(
    g: &ConvGeometry,
    q: &QuantizedOutput<'_>,
    input: &[i8],
    filter: &[i8],
    bias: Option<&[i32]>,
    output: &mut [i8],
) {
    // The output stage decoded for as many lanes as the layer has (the table is zeroed per
    // call); the row buffers are zeroed only as far as the layer uses them.
    if dw512_packs_pixels(g) || g.out_c <= 64 {
        depthwise_vnni512_with::<DW512_PAIRS, 64>(g, q, input, filter, bias, output)
    } else {
        depthwise_vnni512_with::<DW512_PAIRS, DW512_CHANNELS>(g, q, input, filter, bias, output)
    }
}

/// [`depthwise_vnni512`] with `P` int32 of pair rows (and `P` bytes of padded row) on the stack
/// and the output stage of `N` lanes.
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
fn depthwise_vnni512_with<const P: usize, const N: usize>(
    g: &ConvGeometry,
    q: &QuantizedOutput<'_>,
    input: &[i8],
    filter: &[i8],
    bias: Option<&[i32]>,
    output: &mut [i8],
) {
    let c = g.out_c;
    let (fh, fw) = (g.filter_h, g.filter_w);
    let pairs_w = fw.div_ceil(2);
    let packs = dw512_packs_pixels(g);
    let blocks = if packs { 1 } else { c.div_ceil(16) };
    let lanes = blocks * 16;
    // Output stage per lane (lane `l` of block `l / 16`).
    let lane_channel = |blk: usize, lane: usize| {
        if packs {
            lane % c
        } else {
            blk * 16 + lane
        }
    };
    let mut d = Decoded::<N>::lanes(q, bias, lanes.min(N), |l| {
        lane_channel(l / 16, l % 16).min(c - 1)
    });
    // A block's weights of filter row `r`, column `x` (16 lanes; lanes past the channels and
    // columns past the filter are 0).
    let tap_weights = |blk: usize, r: usize, x: usize| -> __m128i {
        if x >= fw {
            return _mm_setzero_si128();
        }
        let row = &filter[(r * fw + x) * c..(r * fw + x + 1) * c];
        if packs {
            let v: [i8; 16] = core::array::from_fn(|lane| row[lane % c]);
            // SAFETY: `v` is 16 readable bytes.
            unsafe { _mm_loadu_si128(v.as_ptr().cast()) }
        } else {
            let n = (c - blk * 16).min(16);
            let mask = (1u32 << n).wrapping_sub(1) as u16;
            // SAFETY: the mask selects bytes `blk * 16..blk * 16 + n` of `row`; masked-off bytes
            // are not read (AVX-512BW) and load as 0.
            unsafe { _mm_maskz_loadu_epi8(mask, row.as_ptr().add(blk * 16)) }
        }
    };
    // Weights (block, filter row, pair of columns) as int16 pairs, and -zero_point * sum(w) per
    // lane into the bias.
    let mut weights = MaybeUninit::<[__m512i; DW512_WEIGHTS]>::uninit();
    let weights = zeroed(&mut weights, blocks * fh * pairs_w);
    let offset = _mm512_set1_epi32(-q.input_zero_point);
    for blk in 0..blocks {
        let mut sum = _mm512_setzero_si512();
        for r in 0..fh {
            for j in 0..pairs_w {
                let (w0, w1) = (tap_weights(blk, r, 2 * j), tap_weights(blk, r, 2 * j + 1));
                sum = _mm512_add_epi32(sum, _mm512_cvtepi8_epi32(w0));
                sum = _mm512_add_epi32(sum, _mm512_cvtepi8_epi32(w1));
                let (lo, hi) = (_mm_unpacklo_epi8(w0, w1), _mm_unpackhi_epi8(w0, w1));
                weights[(blk * fh + r) * pairs_w + j] =
                    _mm512_cvtepi8_epi16(_mm256_set_m128i(hi, lo));
            }
        }
        let at = &mut d.bias[blk * 16..blk * 16 + 16];
        // SAFETY: `at` is 16 readable and writable i32.
        unsafe {
            let b = _mm512_loadu_si512(at.as_ptr().cast());
            let b = _mm512_add_epi32(b, _mm512_mullo_epi32(sum, offset));
            _mm512_storeu_si512(at.as_mut_ptr().cast(), b);
        }
    }
    let span = row_span(g);
    let elements = dw512_row_elements(g);
    let partner = g.dilation_w * c;
    let zp = q.input_zero_point as i8;
    let row_bytes = g.in_w * c;
    let mut pair_rows = MaybeUninit::<Align64<[i32; P]>>::uninit();
    // SAFETY: `Align64<T>` is `repr(C)` with one field: a `T` at offset 0; the cast keeps the
    // buffer's address and size.
    let pair_rows = unsafe { &mut *pair_rows.as_mut_ptr().cast::<MaybeUninit<[i32; P]>>() };
    let pair_rows = zeroed(pair_rows, fh * elements);
    // P bytes: the large tier's P is above DW512_ROW; the small one is chosen only when the
    // padded row fits it.
    let mut padded = MaybeUninit::<[i8; P]>::uninit();
    let padded = zeroed(&mut padded, elements + partner + 16);
    let mut slot_of = [0usize; TAPS];
    for b in 0..g.batch {
        let mut slots = RowSlots::new(fh);
        for oy in 0..g.out_h {
            slots.assign(g, oy, &mut slot_of, |s, iy| {
                // The padded row, then its pairs.
                let pad = &mut padded[..elements + partner + 16];
                pad.fill(zp);
                if let Some(iy) = iy {
                    let from = (b * g.in_h + iy) * row_bytes;
                    let dst_at = g.pad_left * c;
                    let n = row_bytes.min((span * c).saturating_sub(dst_at));
                    pad[dst_at..dst_at + n].copy_from_slice(&input[from..from + n]);
                }
                let slot = &mut pair_rows[s * elements..(s + 1) * elements];
                for (f, out) in (0..elements).step_by(16).zip(slot.chunks_exact_mut(16)) {
                    let (x0, x1) = (&pad[f..f + 16], &pad[f + partner..f + partner + 16]);
                    // SAFETY: `x0`, `x1` are 16 readable bytes; `out` is 16 writable i32.
                    unsafe {
                        let x0 = _mm_loadu_si128(x0.as_ptr().cast());
                        let x1 = _mm_loadu_si128(x1.as_ptr().cast());
                        let (lo, hi) = (_mm_unpacklo_epi8(x0, x1), _mm_unpackhi_epi8(x0, x1));
                        let v = _mm512_cvtepi8_epi16(_mm256_set_m128i(hi, lo));
                        _mm512_storeu_si512(out.as_mut_ptr().cast(), v);
                    }
                }
            });
            let out_row = &mut output[(b * g.out_h + oy) * g.out_w * c..][..g.out_w * c];
            let mut rows: [&[i32]; TAPS] = [&[]; TAPS];
            for (r, row) in rows.iter_mut().enumerate().take(fh) {
                *row = &pair_rows[slot_of[r] * elements..(slot_of[r] + 1) * elements];
            }
            let rows = &rows[..fh];
            let lay = Dw512Row {
                weights,
                d: &d,
                partner,
                pairs_w,
                blocks,
                step: if packs { 0 } else { g.stride_w * c },
                c,
            };
            if fh == 3 && pairs_w == 2 {
                lay.run::<3, 2>(rows, out_row);
            } else {
                lay.run::<0, 0>(rows, out_row);
            }
        }
    }
}

/// One output row of [`depthwise_vnni512`]: what its inner loop needs.
struct Dw512Row<'a, const N: usize> {
    weights: &'a [__m512i],
    d: &'a Decoded<N>,
    /// Pair-row elements between horizontal taps `2j` and `2j + 2` (half of it).
    partner: usize,
    pairs_w: usize,
    blocks: usize,
    /// Padded-row bytes between output pixels; 0: lanes are 16 consecutive output bytes.
    step: usize,
    c: usize,
}

impl<const N: usize> Dw512Row<'_, N> {
    /// Computes and stores `out_row` from the pair rows of its filter rows. `FH` / `PW` (filter
    /// rows, pairs of columns) fixed at compile time for the common 3x3 filter, or 0: from
    /// `rows.len()` and `self.pairs_w`.
    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
    fn run<const FH: usize, const PW: usize>(&self, rows: &[&[i32]], out_row: &mut [i8]) {
        let fh = if FH > 0 { FH } else { rows.len() };
        let pw = if PW > 0 { PW } else { self.pairs_w };
        let rows = &rows[..fh];
        let partner = self.partner;
        // Two accumulators (even and odd filter rows) halve the dependency chain.
        let vector = |at: usize, blk: usize| -> __m512i {
            let w = &self.weights[blk * fh * pw..(blk + 1) * fh * pw];
            let term = |r: usize, j: usize, acc: __m512i| {
                let x = &rows[r][at + 2 * j * partner..][..16];
                // SAFETY: `x` is 16 readable i32.
                let x = unsafe { _mm512_loadu_si512(x.as_ptr().cast()) };
                _mm512_dpwssd_epi32(acc, x, w[r * pw + j])
            };
            let (mut even, mut odd) = (_mm512_setzero_si512(), _mm512_setzero_si512());
            for r in (0..fh).step_by(2) {
                for j in 0..pw {
                    even = term(r, j, even);
                    if r + 1 < fh {
                        odd = term(r + 1, j, odd);
                    }
                }
            }
            _mm512_add_epi32(even, odd)
        };
        if self.step == 0 {
            let mut f = 0;
            while f < out_row.len() {
                let v = self.d.sixteen(vector(f, 0), 0);
                store16(v, &mut out_row[f..]);
                f += 16;
            }
        } else {
            let c = self.c;
            for (ox, px) in out_row.chunks_exact_mut(c).enumerate() {
                let at = ox * self.step;
                for blk in 0..self.blocks {
                    let v = self.d.sixteen(vector(at + blk * 16, blk), blk * 16);
                    store16(v, &mut px[blk * 16..]);
                }
            }
        }
    }
}

/// Row buffers that the filter rows of consecutive output rows share (conv strip rows,
/// depthwise pair rows): which input row (`None`: a row of padding) each of the filter-row
/// count of slots holds, so that each input row is prepared once while it is in use.
struct RowSlots {
    held: [Option<Option<usize>>; TAPS],
    n: usize,
}

impl RowSlots {
    /// `n` empty slots (`n` = filter rows, at most [`TAPS`]).
    fn new(n: usize) -> Self {
        RowSlots {
            held: [None; TAPS],
            n: n.min(TAPS),
        }
    }

    /// The input row filter row `r` of output row `oy` reads (`None`: outside the image).
    fn wanted(g: &ConvGeometry, oy: usize, r: usize) -> Option<usize> {
        let iy = (oy * g.stride_h + r * g.dilation_h).checked_sub(g.pad_top);
        iy.filter(|&iy| iy < g.in_h)
    }

    /// Sets `slot_of[r]` to the slot holding the row filter row `r` of output row `oy` reads
    /// ([`RowSlots::wanted`]), calling `fill(slot, row)` for rows not held yet, into slots no
    /// filter row of this output row needs. (Rows are computed, not listed: a list of
    /// [`TAPS`] entries cost a 1 KB copy per output row.)
    fn assign(
        &mut self,
        g: &ConvGeometry,
        oy: usize,
        slot_of: &mut [usize; TAPS],
        mut fill: impl FnMut(usize, Option<usize>),
    ) {
        let n = self.n;
        let wanted = |r: usize| Self::wanted(g, oy, r);
        for (r, slot) in slot_of.iter_mut().enumerate().take(n) {
            let want = wanted(r);
            if let Some(s) = (0..n).find(|&s| self.held[s] == Some(want)) {
                *slot = s;
                continue;
            }
            let s = (0..n)
                .find(|&s| self.held[s].is_none_or(|h| !(0..n).any(|r| wanted(r) == h)))
                .unwrap_or(r);
            fill(s, want);
            self.held[s] = Some(want);
            *slot = s;
        }
    }
}

/// Element types for which all-zero bytes are a value (see [`zeroed`]).
trait Zeroable: Copy {}
impl Zeroable for i8 {}
impl Zeroable for i32 {}
impl Zeroable for __m512i {}

/// The first `len` elements of `buf` (at most `N`), zeroed: a stack buffer sized for the
/// largest layer then costs a layer only what it uses (zeroing all of a 32 KB buffer took more
/// time than packing a small layer's weights).
fn zeroed<T: Zeroable, const N: usize>(buf: &mut MaybeUninit<[T; N]>, len: usize) -> &mut [T] {
    let len = len.min(N);
    let p = buf.as_mut_ptr().cast::<T>();
    // SAFETY: `p` points to `N >= len` elements of `T` owned by `buf`, which the slice borrows
    // mutably; the first `len` are written with zero bytes, a value of every `Zeroable` type,
    // before the slice over them is made.
    unsafe {
        core::ptr::write_bytes(p, 0, len);
        core::slice::from_raw_parts_mut(p, len)
    }
}

/// A buffer on a 64-byte boundary (whole cache lines for 512-bit loads).
#[repr(C, align(64))]
struct Align64<T>(T);

/// Stores the first `min(16, dst.len())` bytes of `v` into `dst`: a plain store, or a masked one
/// (slower on some cores) for fewer than 16 bytes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
fn store16(v: __m128i, dst: &mut [i8]) {
    if dst.len() >= 16 {
        // SAFETY: `dst` has at least 16 writable bytes.
        unsafe { _mm_storeu_si128(dst.as_mut_ptr().cast(), v) };
        return;
    }
    let mask = (1u32 << dst.len()).wrapping_sub(1) as u16;
    // SAFETY: the mask selects bytes `0..dst.len()` of `dst`; masked-off bytes are not written.
    unsafe { _mm_mask_storeu_epi8(dst.as_mut_ptr(), mask, v) };
}

/// Sixteen int8 at `at` of `s` as int16; bytes past the end of `s` read as 0.
#[target_feature(enable = "avx2")]
#[inline]
fn load16(s: &[i8], at: usize) -> __m256i {
    let v = if let Some(v) = s.get(at..at + 16) {
        // SAFETY: `v` is 16 readable bytes.
        unsafe { _mm_loadu_si128(v.as_ptr().cast()) }
    } else {
        let mut tail = [0i8; 16];
        if let Some(v) = s.get(at..) {
            let n = v.len().min(16);
            tail[..n].copy_from_slice(&v[..n]);
        }
        // SAFETY: `tail` is 16 readable bytes.
        unsafe { _mm_loadu_si128(tail.as_ptr().cast()) }
    };
    _mm256_cvtepi8_epi16(v)
}

/// Interleaved int16 weights of the depthwise fast path held on the stack at once (blocks of
/// 16 channels times tap pairs): 8 KB, four blocks of the largest filter ([`TAPS`] taps).
const DW_WEIGHTS: usize = 128;

/// Blocks of 16 channels the depthwise fast path prepares at once (their requantization
/// decoded, their weights interleaved).
const DW_BLOCKS: usize = 4;

/// Depthwise, depth multiplier 1. Channels in blocks of 16, one int16 lane each; taps in pairs
/// interleaved (`VPUNPCKLWD` / `VPUNPCKHWD`) so that one `VPMADDWD` adds two taps' products per
/// channel. The interleaved weights of as many blocks as [`DW_WEIGHTS`] holds are prepared once;
/// then for each output pixel the taps' input offsets are found once and every block runs.
/// Out-of-image taps read the zero point, and the input offset enters once per channel as
/// `-zero_point * sum(w)`: in-image or not, each tap adds `w * (x - zero_point)`. A last block of
/// fewer than 16 channels computes all 16 lanes and stores only its own (the other lanes read
/// neighbouring values or zeros).
#[target_feature(enable = "avx2")]
fn depthwise_avx2(
    g: &ConvGeometry,
    q: &QuantizedOutput<'_>,
    input: &[i8],
    filter: &[i8],
    bias: Option<&[i32]>,
    output: &mut [i8],
) {
    let c = g.out_c;
    let taps = g.filter_h * g.filter_w;
    let pairs = taps.div_ceil(2);
    let offv = _mm256_set1_epi32(-q.input_zero_point);
    let zpv = _mm256_set1_epi16(q.input_zero_point as i16);
    let zero = _mm256_setzero_si256();
    let blocks = c.div_ceil(16);
    let group = (DW_WEIGHTS / pairs).clamp(1, DW_BLOCKS);
    // Each tap's offset from the window's corner (no division in the pixel loop).
    let (mut tap_dy, mut tap_dx) = ([0isize; TAPS], [0isize; TAPS]);
    for t in 0..taps {
        tap_dy[t] = ((t / g.filter_w) * g.dilation_h) as isize;
        tap_dx[t] = ((t % g.filter_w) * g.dilation_w) as isize;
    }
    const PADDING: usize = usize::MAX;
    let mut at = [PADDING; TAPS];
    let mut wpairs = [[zero; 2]; DW_WEIGHTS];
    let mut base = [[zero; 2]; DW_BLOCKS];
    let mut first = 0;
    while first < blocks {
        let last = (first + group).min(blocks);
        let d = Decoded::<{ DW_BLOCKS * 16 }>::new(
            q,
            bias,
            first * 16,
            ((last * 16).min(c)) - first * 16,
        );
        for blk in first..last {
            let c0 = blk * 16;
            let (mut sum_lo, mut sum_hi) = (zero, zero);
            for pi in 0..pairs {
                let t0 = 2 * pi;
                let w0 = load16(filter, t0 * c + c0);
                let w1 = if t0 + 1 < taps {
                    load16(filter, (t0 + 1) * c + c0)
                } else {
                    zero
                };
                // Lanes [0-3 | 8-11] and [4-7 | 12-15] of (w_t, w_t+1).
                let wp = [_mm256_unpacklo_epi16(w0, w1), _mm256_unpackhi_epi16(w0, w1)];
                let ones = _mm256_set1_epi16(1);
                sum_lo = _mm256_add_epi32(sum_lo, _mm256_madd_epi16(wp[0], ones));
                sum_hi = _mm256_add_epi32(sum_hi, _mm256_madd_epi16(wp[1], ones));
                wpairs[(blk - first) * pairs + pi] = wp;
            }
            // -zero_point * sum(w), in the interleaved lane order.
            base[blk - first] = [
                _mm256_mullo_epi32(sum_lo, offv),
                _mm256_mullo_epi32(sum_hi, offv),
            ];
        }
        for b in 0..g.batch {
            for oy in 0..g.out_h {
                let y0 = (oy * g.stride_h) as isize - g.pad_top as isize;
                for ox in 0..g.out_w {
                    let x0 = (ox * g.stride_w) as isize - g.pad_left as isize;
                    // Input offset of each tap's channel 0, or `PADDING`.
                    for (t, a) in at.iter_mut().enumerate().take(taps) {
                        let (iy, ix) = (y0 + tap_dy[t], x0 + tap_dx[t]);
                        let inside =
                            iy >= 0 && (iy as usize) < g.in_h && ix >= 0 && (ix as usize) < g.in_w;
                        *a = if inside {
                            ((b * g.in_h + iy as usize) * g.in_w + ix as usize) * c
                        } else {
                            PADDING
                        };
                    }
                    let o = ((b * g.out_h + oy) * g.out_w + ox) * c;
                    for blk in first..last {
                        let c0 = blk * 16;
                        let [mut lo, mut hi] = base[blk - first];
                        let tap = |t: usize| match at[t] {
                            PADDING => zpv,
                            a => load16(input, a + c0),
                        };
                        for pi in 0..pairs {
                            let t0 = 2 * pi;
                            let x0v = tap(t0);
                            let x1v = if t0 + 1 < taps { tap(t0 + 1) } else { zero };
                            let wp = wpairs[(blk - first) * pairs + pi];
                            lo = _mm256_add_epi32(
                                lo,
                                _mm256_madd_epi16(_mm256_unpacklo_epi16(x0v, x1v), wp[0]),
                            );
                            hi = _mm256_add_epi32(
                                hi,
                                _mm256_madd_epi16(_mm256_unpackhi_epi16(x0v, x1v), wp[1]),
                            );
                        }
                        // Back to channel order: lo = [0-3 | 8-11], hi = [4-7 | 12-15].
                        let local = c0 - first * 16;
                        let v0 = d.eight(_mm256_permute2x128_si256::<0x20>(lo, hi), local);
                        let v1 = d.eight(_mm256_permute2x128_si256::<0x31>(lo, hi), local + 8);
                        let width = (c - c0).min(16);
                        if width == 16 {
                            let dst = &mut output[o + c0..o + c0 + 16];
                            // SAFETY: `dst` is 16 writable bytes; each store writes 8.
                            unsafe {
                                _mm_storel_epi64(dst.as_mut_ptr().cast(), v0);
                                _mm_storel_epi64(dst.as_mut_ptr().add(8).cast(), v1);
                            }
                        } else {
                            let mut block = [0i8; 16];
                            // SAFETY: `block` is 16 writable bytes; each store writes 8.
                            unsafe {
                                _mm_storel_epi64(block.as_mut_ptr().cast(), v0);
                                _mm_storel_epi64(block.as_mut_ptr().add(8).cast(), v1);
                            }
                            output[o + c0..o + c0 + width].copy_from_slice(&block[..width]);
                        }
                    }
                }
            }
        }
        first = last;
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use crate::graph::ClampI8;
    use crate::kernels::arch::cases::{acc, case, fc_case, Case};
    use crate::kernels::conv;
    use crate::kernels::conv::tests::{clamp, requant, zero_point};
    use proptest::collection::vec;
    use proptest::prelude::*;

    /// A kernel body with the conv / depthwise signature.
    type Body =
        unsafe fn(&ConvGeometry, &QuantizedOutput<'_>, &[i8], &[i8], Option<&[i32]>, &mut [i8]);

    /// Runs `body` on `c` and checks its output against `want` (the portable body's).
    ///
    /// # Safety
    /// The CPU has the features `body` is compiled for.
    unsafe fn same_as(c: &Case, want: &[i8], what: &str, body: Body) {
        let mut got = std::vec![0i8; c.out_len()];
        // SAFETY: the caller checked the CPU features.
        unsafe {
            body(
                &c.g,
                &c.q(),
                &c.input,
                &c.filter,
                c.bias.as_deref(),
                &mut got,
            )
        };
        assert_eq!(got, want, "{what}");
    }

    /// The packed 512-bit conv body without strip rows (implicit im2col and patch copies), as
    /// layers too wide for strips run it.
    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
    fn conv2d_vnni512_no_strips(
        g: &ConvGeometry,
        q: &QuantizedOutput<'_>,
        input: &[i8],
        filter: &[i8],
        bias: Option<&[i32]>,
        output: &mut [i8],
    ) {
        conv2d_vnni512_layout(g, q, input, filter, bias, output, false)
    }

    fn conv_both(c: &Case) -> (std::vec::Vec<i8>, std::vec::Vec<i8>) {
        let (fast, want) = c.run_conv(conv2d_i8);
        // On a VNNI machine the dispatch runs the VNNI body: check the others too.
        if has_avx2() && conv_fits(&c.g, &c.q(), &c.input, &c.filter, c.bias.as_deref(), &fast) {
            // SAFETY (each call): the CPU features checked in the enclosing conditions.
            unsafe { same_as(c, &want, "AVX2 body", conv2d_avx2) };
            let k4 = (c.g.filter_h * c.g.filter_w * c.g.in_c).div_ceil(4) * 4;
            if has_avx512_vnni() && 16 * k4 <= PACKED {
                unsafe {
                    same_as(
                        c,
                        &want,
                        "VNNI 512 without strips",
                        conv2d_vnni512_no_strips,
                    )
                };
            }
            if has_avx512_vnni() {
                // The unpacked VNNI body (layers too large for the packed one).
                unsafe { same_as(c, &want, "unpacked VNNI body", conv2d_vnni) };
            }
        }
        (fast, want)
    }

    fn depthwise_both(c: &Case) -> (std::vec::Vec<i8>, std::vec::Vec<i8>) {
        let (fast, want) = c.run_depthwise(depthwise_conv2d_i8);
        // On an AVX-512 VNNI machine the dispatch may run the 512-bit body: check the AVX2 one
        // (and the 512-bit one where it applies) directly too.
        let usual = super::super::usual_requant(&c.requant)
            && offset16(c.zps.0).is_some()
            && c.g.filter_h * c.g.filter_w <= TAPS;
        if usual && has_avx2() {
            // SAFETY (each call): the CPU features checked in the enclosing conditions.
            unsafe { same_as(c, &want, "AVX2 depthwise body", depthwise_avx2) };
            if has_avx512_vnni() && dw512_fits(&c.g) {
                unsafe { same_as(c, &want, "512-bit depthwise body", depthwise_vnni512) };
            }
        }
        (fast, want)
    }

    /// A deterministic case of the given shape (MLPerf Tiny layer shapes), data from a seed.
    fn shaped(g: ConvGeometry, dw: bool, seed: u64) -> Case {
        let mut s = seed;
        let mut next = move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as u32
        };
        let filter_len = g.out_c * g.filter_h * g.filter_w * g.filter_in_c;
        let input = (0..g.batch * g.in_h * g.in_w * g.in_c)
            .map(|_| next() as i8)
            .collect();
        let filter = (0..filter_len).map(|_| next() as i8).collect();
        let bias = Some(
            (0..g.out_c)
                .map(|_| (next() % 20_000) as i32 - 10_000)
                .collect(),
        );
        let requant = (0..g.out_c)
            .map(|_| Requant {
                multiplier: (1 << 30) + (next() % (1 << 30)) as i32,
                shift: -((next() % 10) as i32) - 6,
            })
            .collect();
        let _ = dw;
        Case {
            g,
            input,
            filter,
            bias,
            requant,
            zps: (-((next() % 256) as i32 - 128), (next() % 256) as i32 - 128),
            clamp: ClampI8 {
                min: -128,
                max: 127,
            },
        }
    }

    fn geometry(
        in_hw: usize,
        in_c: usize,
        out_c: usize,
        f: usize,
        stride: usize,
        dw: bool,
    ) -> ConvGeometry {
        let pad = f / 2;
        let out = (in_hw + 2 * pad - f) / stride + 1;
        ConvGeometry {
            batch: 1,
            in_h: in_hw,
            in_w: in_hw,
            in_c,
            out_h: out,
            out_w: out,
            out_c,
            filter_h: f,
            filter_w: f,
            filter_in_c: if dw { 1 } else { in_c },
            stride_h: stride,
            stride_w: stride,
            dilation_h: 1,
            dilation_w: 1,
            pad_top: pad,
            pad_left: pad,
            depth_multiplier: 1,
        }
    }

    #[test]
    fn this_machine_runs_the_avx2_bodies_when_it_can() {
        // Informational on machines without AVX2: the portable body is then what runs.
        std::eprintln!("AVX2: {}", has_avx2());
    }

    #[test]
    fn mlperf_tiny_shapes_are_bit_exact() {
        // ResNet-8, VWW and KWS layer shapes (conv, pointwise, strided, depthwise).
        let convs = [
            geometry(32, 3, 16, 3, 1, false),
            geometry(32, 16, 16, 3, 1, false),
            geometry(32, 16, 32, 3, 2, false),
            geometry(16, 16, 32, 1, 2, false),
            geometry(8, 64, 64, 3, 1, false),
            geometry(12, 128, 256, 1, 1, false),
            geometry(25, 64, 64, 1, 1, false),
        ];
        for (i, g) in convs.into_iter().enumerate() {
            let c = shaped(g, false, i as u64);
            let (fast, want) = conv_both(&c);
            assert_eq!(fast, want, "conv {g:?}");
        }
        let dws = [
            geometry(48, 8, 8, 3, 1, true),
            geometry(48, 16, 16, 3, 2, true),
            geometry(12, 128, 128, 3, 1, true),
            geometry(25, 64, 64, 3, 1, true),
            geometry(6, 40, 40, 3, 2, true),
        ];
        for (i, g) in dws.into_iter().enumerate() {
            let c = shaped(g, true, 100 + i as u64);
            let (fast, want) = depthwise_both(&c);
            assert_eq!(fast, want, "depthwise {g:?}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn conv_fast_path_is_bit_exact(c in case(false)) {
            let (fast, want) = conv_both(&c);
            prop_assert_eq!(fast, want);
        }

        #[test]
        fn packed_weights_are_the_rows_transposed(
            (k, out_c, filter) in (1usize..200, 1usize..40)
                .prop_flat_map(|(k, n)| (Just(k), Just(n), vec(any::<i8>(), k * n))),
        ) {
            prop_assume!(has_avx512_vnni());
            let groups = k.div_ceil(4);
            let blocks = out_c.div_ceil(16);
            let mut packed = std::vec![0x55i8; blocks * groups * 64 + 64];
            let mut sums = [0i32; 40];
            // SAFETY: the CPU has AVX-512 VNNI (checked above).
            unsafe { pack_weights(&filter, k, (k, k), out_c, &mut packed, &mut sums) };
            for b in 0..blocks {
                for q in 0..groups {
                    for lane in 0..16 {
                        for t in 0..4 {
                            let (oc, i) = (b * 16 + lane, q * 4 + t);
                            let w = if oc < out_c && i < k { filter[oc * k + i] } else { 0 };
                            prop_assert_eq!(packed[(b * groups + q) * 64 + lane * 4 + t], w);
                        }
                    }
                }
            }
            prop_assert!(packed[blocks * groups * 64..].iter().all(|&b| b == 0x55));
            for oc in 0..out_c {
                let want: i32 = filter[oc * k..(oc + 1) * k].iter().map(|&w| i32::from(w)).sum();
                prop_assert_eq!(sums[oc], want);
            }
        }

        #[test]
        fn add_rescale_without_wide_products_is_tflms(
            left in 8i32..=22,
            multiplier in 0i32..=i32::MAX,
            right in 0i32..=31,
        ) {
            prop_assume!(has_avx512_vnni());
            let r = Requant { multiplier, shift: -right };
            // SAFETY: the CPU has AVX-512 F (checked above, with VNNI).
            let s = unsafe { Rescale16::new(left, r) };
            let s = s.expect("in range");
            let mask = ((1i64 << right) - 1) as i32;
            for v0 in (-255i32..=255).step_by(16) {
                let v: [i32; 16] = core::array::from_fn(|i| (v0 + i as i32).min(255));
                let mut got = [0i32; 16];
                // SAFETY: as above; `v` and `got` are 16 int32.
                unsafe {
                    let x = s.apply(_mm512_loadu_si512(v.as_ptr().cast()));
                    let x = round_shift16(x, _mm512_set1_epi32(right), _mm512_set1_epi32(mask));
                    _mm512_storeu_si512(got.as_mut_ptr().cast(), x);
                }
                for (v, got) in v.iter().zip(got) {
                    let high = crate::quant::saturating_rounding_doubling_high_mul(v << left, multiplier);
                    let want = crate::quant::rounding_divide_by_pot(high, right);
                    prop_assert_eq!(got, want, "v {} left {} m {} right {}", v, left, multiplier, right);
                }
            }
        }

        #[test]
        fn depthwise_fast_path_is_bit_exact(c in case(true)) {
            let (fast, want) = depthwise_both(&c);
            prop_assert_eq!(fast, want);
        }

        #[test]
        fn fully_connected_fast_path_is_bit_exact(c in fc_case()) {
            let (fast, want) = c.run(fully_connected_i8);
            prop_assert_eq!(fast, want);
        }

        #[test]
        fn add_and_sub_bodies_match_the_scalar_kernel(
            (a, b) in (0usize..100).prop_flat_map(|n| (vec(any::<i8>(), n), vec(any::<i8>(), n))),
            scales in (0.002f32..0.2, 0.002f32..0.2, 0.002f32..0.2),
            zps in (zero_point(), zero_point(), zero_point()),
            clamp in clamp(),
            sub in any::<bool>(),
        ) {
            if !has_avx2() {
                return Ok(());
            }
            let p = crate::kernels::quantize::add_params(scales.0, scales.1, scales.2, clamp);
            let zp = [zps.0, zps.1, zps.2];
            // The scalar kernel, one element at a time (too short for any fast path).
            let one = crate::kernels::binary::BroadcastShapes::new(&[1], &[1], &[1]).unwrap();
            let want: std::vec::Vec<i8> = a.iter().zip(&b).map(|(&x, &y)| {
                let mut o = [0i8];
                if sub {
                    crate::kernels::binary::sub_i8(&one, &p, zp, &[x], &[y], &mut o);
                } else {
                    crate::kernels::binary::add_i8(&one, &p, zp, &[x], &[y], &mut o);
                }
                o[0]
            }).collect();
            let mut out = std::vec![0i8; a.len()];
            // SAFETY: AVX2 checked above.
            let n = unsafe { add_sub_avx2(sub, &p, zp, &a, &b, &mut out) };
            prop_assert_eq!(&out[..n], &want[..n], "AVX2 body");
            if has_avx512_vnni() {
                let mut out = std::vec![0i8; a.len()];
                // SAFETY: AVX-512 checked just above.
                let n = unsafe { add_sub_avx512(sub, &p, zp, &a, &b, &mut out) };
                prop_assert_eq!(&out[..n], &want[..n], "AVX-512 body");
            }
        }

        #[test]
        fn eight_lane_output_stage_matches_portable(
            acc in vec(acc(), 8),
            rs in vec(prop_oneof![
                requant(),
                (any::<i32>(), -31i32..=30).prop_map(|(multiplier, shift)| Requant { multiplier, shift }),
            ], 8),
            zp in zero_point(),
            clamp in clamp(),
        ) {
            prop_assume!(rs.iter().all(|r| r.multiplier != i32::MIN));
            if !has_avx2() {
                return Ok(());
            }
            let q = QuantizedOutput {
                input_zero_point: 0,
                filter_zero_point: 0,
                output_zero_point: zp,
                requant: &rs,
                clamp,
            };
            let d = Decoded::<8>::new(&q, None, 0, 8);
            let mut got = [0i8; 8];
            // SAFETY: AVX2 checked above.
            unsafe { d.row(&acc, &mut got) };
            for i in 0..8 {
                prop_assert_eq!(got[i], conv::requantize(acc[i], rs[i], zp, clamp), "lane {}", i);
            }
        }
    }
}
