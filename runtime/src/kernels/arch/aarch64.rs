//! aarch64 NEON fast paths for int8 CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED and same-shape
//! ADD / SUB ([`add_sub_i8`]).
//!
//! Each public function has the signature of its portable kernel and returns the same bytes: it
//! handles the shapes it was written for and hands every other one to the portable body. NEON
//! is part of the aarch64 base ISA, so there is no run-time detection.
//!
//! Arithmetic. Every product is formed exactly and every sum is a wrapping 32-bit sum, which is
//! associative and commutative, so any summation order gives the portable body's wrapping sum:
//!
//! - CONV_2D and FULLY_CONNECTED multiply the raw int8 input by the int8 weights (`SMULL`: an
//!   int8 product is at most `128 * 128 = 16 384` in magnitude, exact in int16) and add adjacent
//!   int16 products into int32 lanes (`SADALP`). The input offset comes out of the sum:
//!   `sum w * (x - zp) = sum w * x - zp * sum w`, with `bias - zp * sum w` folded into one
//!   per-channel constant (wrapping). Padding taps of the patch hold `zp`, which adds
//!   `w * zp - w * zp = 0`, exactly what the portable body's skipped tap adds. When no weight of
//!   a channel chunk is `-128`, each product is at most `128 * 127 = 16 256` in magnitude, so two
//!   of them are added in int16 first (`SMULL` + `SMLAL2`: at most 32 512) before `SADALP`.
//! - DEPTHWISE_CONV_2D does the same with channels in lanes: `SMULL`/`SMULL2` of a tap's 16
//!   input bytes by its 16 weights, two taps summed in int16 when no weight is `-128`
//!   (`SMLAL`/`SMLAL2`), widened into int32 lanes (`SADDW`/`SADDW2`); `bias - zp * sum w` per
//!   channel, and padding taps read as `zp`.
//!
//! The output stage is TFLM's `MultiplyByQuantizedMultiplier` as gemmlowp's NEON code writes it,
//! four channels per vector: the left shift (`SSHL`, wrapping like `x * (1 << shift)`),
//! `SQRDMULH` (exactly `SaturatingRoundingDoublingHighMul`, saturation of `i32::MIN * i32::MIN`
//! included: both are `floor((ab + 2^30) / 2^31)`, see `cortex_m::requantize`), and the rounding
//! right shift as `SRSHL` (round half up) of `x - 1` for negative `x` when the shift is not 0
//! (saturating add), which is `RoundingDivideByPOT`'s round half away from zero; then the zero point (wrapping add) and the
//! clamp (max, then min).
//!
//! Memory: no arena scratch. CONV_2D keeps two [`MAX_PATCH`]-byte im2col patches (a pair of
//! output pixels; 1x1 filters read the input in place) and the decoded constants of up to
//! [`CHANNELS`] output channels (about 2 KB), on the stack: about 6.2 KB in all;
//! FULLY_CONNECTED the same constants; DEPTHWISE_CONV_2D the weights, window and offsets of up
//! to [`MAX_TAPS`] taps of 16 channels (2.5 KB). Shapes that do not fit run the portable body.
//!
//! `docs/KERNELS.md` has the design and the measured figures.

use core::arch::aarch64::*;

use crate::kernels::conv::{self, tap_range, ConvGeometry, QuantizedOutput};
use crate::kernels::depthwise;
use crate::kernels::fully_connected::{self, FullyConnectedGeometry};

// The public entry points rely on this to call the `#[target_feature(enable = "neon")]` bodies.
const _: () = assert!(cfg!(target_feature = "neon"), "aarch64 without NEON");

/// Most elements (`filter_h * filter_w * in_c`) of a CONV_2D patch for the fast path; the size
/// of its two stack buffers (16 bytes more each) in bytes. Covers 3x3x128, 5x5x64 and 1x1x2048
/// (1x1 filters read the input in place unless the tap is padding).
pub const MAX_PATCH: usize = 2048;

/// Output channels decoded at once (offsets, requantization and weight tails on the stack).
pub const CHANNELS: usize = 64;

/// Most taps (`filter_h * filter_w`) of the DEPTHWISE_CONV_2D fast path (weights and input of
/// 16 channels per tap on the stack: 32 bytes each).
pub const MAX_TAPS: usize = 64;

/// True when every requantization entry is in the range the vector output stage handles (shift
/// in `-31..=30`: every valid TFLite model; any multiplier, `i32::MIN` included, since `SQRDMULH`
/// saturates exactly like gemmlowp). Kernels run the portable body otherwise.
fn usual_requant(q: &QuantizedOutput<'_>) -> bool {
    !q.requant.is_empty() && q.requant.iter().all(|r| (-31..=30).contains(&r.shift))
}

/// 16 bytes as a vector.
#[inline]
#[target_feature(enable = "neon")]
fn load16(b: &[i8; 16]) -> int8x16_t {
    // SAFETY: `b` is 16 readable bytes; LD1 has no alignment requirement.
    unsafe { vld1q_s8(b.as_ptr()) }
}

/// 4 int32 as a vector.
#[inline]
#[target_feature(enable = "neon")]
fn load_i32(v: &[i32; 4]) -> int32x4_t {
    // SAFETY: `v` is 16 readable bytes; LD1 has no alignment requirement.
    unsafe { vld1q_s32(v.as_ptr()) }
}

/// The output zero point and clamp, in all lanes.
#[derive(Clone, Copy)]
struct Stage {
    zero_point: int32x4_t,
    min: int32x4_t,
    max: int32x4_t,
}

impl Stage {
    #[inline]
    #[target_feature(enable = "neon")]
    fn new(q: &QuantizedOutput<'_>) -> Self {
        Stage {
            zero_point: vdupq_n_s32(q.output_zero_point),
            min: vdupq_n_s32(i32::from(q.clamp.min)),
            max: vdupq_n_s32(i32::from(q.clamp.max)),
        }
    }
}

/// Four channels' requantization: `left` shift counts (`0..=30`), Q31 multipliers and negated
/// right shift counts (`-31..=0`).
#[derive(Clone, Copy)]
struct Requant4 {
    left: int32x4_t,
    multiplier: int32x4_t,
    right: int32x4_t,
}

/// The decoded shifts of one requantization entry: `(left, -right)`.
#[inline(always)]
fn shifts(shift: i32) -> (i32, i32) {
    (shift.max(0), shift.min(0))
}

/// `conv::requantize(acc + offset, ...)` in four lanes (see the module doc for the exactness
/// of each step).
#[inline]
#[target_feature(enable = "neon")]
fn requantize4(acc: int32x4_t, offset: int32x4_t, r: Requant4, s: Stage) -> int32x4_t {
    finish4(multiply4(vaddq_s32(acc, offset), r), s)
}

/// TFLM's `MultiplyByQuantizedMultiplier(x, multiplier, shift)` in four lanes: the left shift
/// (`SSHL`, wrapping), `SQRDMULH`, then the rounding right shift (see the module doc).
#[inline]
#[target_feature(enable = "neon")]
fn multiply4(x: int32x4_t, r: Requant4) -> int32x4_t {
    let high = vqrdmulhq_s32(vshlq_s32(x, r.left), r.multiplier);
    // -1 where high < 0 and the right shift is not 0 (the sign bit of `right` is set).
    let fixup = vshrq_n_s32::<31>(vandq_s32(high, r.right));
    vrshlq_s32(vqaddq_s32(high, fixup), r.right)
}

/// The output zero point (wrapping add), then the clamp (max, then min).
#[inline]
#[target_feature(enable = "neon")]
fn finish4(v: int32x4_t, s: Stage) -> int32x4_t {
    vminq_s32(vmaxq_s32(vaddq_s32(v, s.zero_point), s.min), s.max)
}

/// The low bytes of two vectors of clamped int32 (each already in int8 range).
#[inline]
#[target_feature(enable = "neon")]
fn narrow8(lo: int32x4_t, hi: int32x4_t) -> int8x8_t {
    vmovn_s16(vcombine_s16(vmovn_s32(lo), vmovn_s32(hi)))
}

/// `acc + x . w` over 16 int8 pairs into 4 int32 lanes. `PAIRED`: no weight is `-128`, so two
/// products (each at most 16 256 in magnitude) add exactly in int16 before widening.
#[inline]
#[target_feature(enable = "neon")]
fn mac16<const PAIRED: bool>(acc: int32x4_t, x: int8x16_t, w: int8x16_t) -> int32x4_t {
    let lo = vmull_s8(vget_low_s8(x), vget_low_s8(w));
    if PAIRED {
        vpadalq_s16(acc, vmlal_high_s8(lo, x, w))
    } else {
        vpadalq_s16(vpadalq_s16(acc, lo), vmull_high_s8(x, w))
    }
}

/// The raw sums of two patches against four weight rows: lane `j` of result `p` is
/// `x_p . w_j`. `x` and the rows are whole 16-byte blocks of equal count.
#[inline]
#[target_feature(enable = "neon")]
fn dot4x2<const PAIRED: bool>(x: [&[[i8; 16]]; 2], w: [&[[i8; 16]]; 4]) -> [int32x4_t; 2] {
    let z = vdupq_n_s32(0);
    let (mut a0, mut a1, mut a2, mut a3) = (z, z, z, z);
    let (mut b0, mut b1, mut b2, mut b3) = (z, z, z, z);
    let blocks = x[0]
        .iter()
        .zip(x[1])
        .zip(w[0])
        .zip(w[1])
        .zip(w[2])
        .zip(w[3]);
    for (((((x0, x1), w0), w1), w2), w3) in blocks {
        let (x0, x1) = (load16(x0), load16(x1));
        let (w0, w1, w2, w3) = (load16(w0), load16(w1), load16(w2), load16(w3));
        a0 = mac16::<PAIRED>(a0, x0, w0);
        a1 = mac16::<PAIRED>(a1, x0, w1);
        a2 = mac16::<PAIRED>(a2, x0, w2);
        a3 = mac16::<PAIRED>(a3, x0, w3);
        b0 = mac16::<PAIRED>(b0, x1, w0);
        b1 = mac16::<PAIRED>(b1, x1, w1);
        b2 = mac16::<PAIRED>(b2, x1, w2);
        b3 = mac16::<PAIRED>(b3, x1, w3);
    }
    [
        vpaddq_s32(vpaddq_s32(a0, a1), vpaddq_s32(a2, a3)),
        vpaddq_s32(vpaddq_s32(b0, b1), vpaddq_s32(b2, b3)),
    ]
}

/// Up to [`CHANNELS`] output channels of a CONV_2D or FULLY_CONNECTED, decoded once per kernel
/// call and applied to every pair of patches: `sum w * patch` for 4 channels and 2 patches at a
/// time, then the output stage.
struct Chunk {
    /// First output channel.
    oc0: usize,
    /// Channels (`4..=CHANNELS`).
    n: usize,
    /// `bias - zp * sum w` (wrapping) per channel.
    offset: [i32; CHANNELS],
    left: [i32; CHANNELS],
    multiplier: [i32; CHANNELS],
    right: [i32; CHANNELS],
    /// The weight rows' last `k % 16` bytes, zero-padded.
    tail: [[i8; 16]; CHANNELS],
    /// No weight of the chunk is `-128` (see [`mac16`]).
    paired: bool,
}

/// The size of the channel chunk starting `remaining` channels before the end: at most
/// [`CHANNELS`], and never leaving fewer than 4 for the last one (`remaining >= 4`).
fn chunk_len(remaining: usize) -> usize {
    if remaining <= CHANNELS {
        remaining
    } else if remaining - CHANNELS < 4 {
        remaining - 4
    } else {
        CHANNELS
    }
}

/// The 4-channel group starting at `j` of a chunk of `n >= 4` channels, moved back so that it
/// ends at the chunk's last channel at most (the last group recomputes a few channels, which
/// writes the same bytes again).
#[inline(always)]
fn group(j: usize, n: usize) -> usize {
    core::cmp::min(j, n - 4)
}

impl Chunk {
    /// Decodes channels `oc0 .. oc0 + n` (`4 <= n <= CHANNELS`) of rows of `k` weights each.
    #[allow(clippy::too_many_arguments)]
    fn decode(
        &mut self,
        oc0: usize,
        n: usize,
        k: usize,
        weights: &[i8],
        bias: Option<&[i32]>,
        q: &QuantizedOutput<'_>,
        zp: i32,
    ) {
        debug_assert!((4..=CHANNELS).contains(&n));
        self.oc0 = oc0;
        self.n = n;
        self.paired = true;
        let whole = k & !15;
        let rows = weights[oc0 * k..][..n * k].chunks_exact(k);
        for (j, w) in rows.enumerate() {
            let oc = oc0 + j;
            // SAFETY: NEON is part of the aarch64 base ISA.
            let (sum, has_min) = unsafe { row_stats(w) };
            self.paired &= !has_min;
            let r = q.requant[if q.requant.len() > 1 { oc } else { 0 }];
            let (left, right) = shifts(r.shift);
            self.offset[j] = bias.map_or(0, |b| b[oc]).wrapping_sub(zp.wrapping_mul(sum));
            self.left[j] = left;
            self.multiplier[j] = r.multiplier;
            self.right[j] = right;
            self.tail[j] = [0; 16];
            self.tail[j][..k - whole].copy_from_slice(&w[whole..]);
        }
    }

    /// Writes the chunk's outputs for two patches of `k` bytes each (the raw input, padding
    /// taps holding the input zero point; a patch slice may run on past `k`, those bytes are
    /// ignored) into `out0` and `out1`, the output rows of the
    /// patches' pixels (all channels); `out1` is `None` when the second patch only fills the
    /// pair (its results are dropped).
    #[inline]
    #[target_feature(enable = "neon")]
    fn run(
        &self,
        patches: [&[i8]; 2],
        k: usize,
        weights: &[i8],
        s: Stage,
        out0: &mut [i8],
        out1: Option<&mut [i8]>,
    ) {
        if self.paired {
            self.run_with::<true>(patches, k, weights, s, out0, out1);
        } else {
            self.run_with::<false>(patches, k, weights, s, out0, out1);
        }
    }

    #[inline]
    #[target_feature(enable = "neon")]
    fn run_with<const PAIRED: bool>(
        &self,
        patches: [&[i8]; 2],
        k: usize,
        weights: &[i8],
        s: Stage,
        out0: &mut [i8],
        mut out1: Option<&mut [i8]>,
    ) {
        let whole = k & !15;
        let x = patches.map(|p| blocks(p, whole));
        // The tails: 16 bytes from `whole` on, read in place when the patch has them (the
        // bytes past `k` meet the zero padding of the weight tails and add 0), else copied.
        let has_tail = whole < k;
        let mut copies = [[0i8; 16]; 2];
        let mut xt: [&[[i8; 16]]; 2] = [&[], &[]];
        if has_tail {
            for (c, p) in copies.iter_mut().zip(patches) {
                if p.len() < whole + 16 {
                    c[..k - whole].copy_from_slice(&p[whole..k]);
                }
            }
            for ((t, c), p) in xt.iter_mut().zip(copies.iter()).zip(patches) {
                *t = match p[whole..].first_chunk::<16>() {
                    Some(b) => core::slice::from_ref(b),
                    None => core::slice::from_ref(c),
                };
            }
        }
        let n = self.n;
        let out0 = &mut out0[self.oc0..][..n];
        let weights = &weights[self.oc0 * k..][..n * k];
        let mut j = 0;
        while j < n {
            let j0 = group(j, n);
            let rows = &weights[j0 * k..][..4 * k];
            let (r0, rows) = rows.split_at(k);
            let (r1, rows) = rows.split_at(k);
            let (r2, r3) = rows.split_at(k);
            let rows = [r0, r1, r2, r3].map(|r| blocks(r, whole));
            let mut sums = dot4x2::<PAIRED>(x, rows);
            if has_tail {
                let t = &self.tail[j0..][..4];
                let tails = dot4x2::<PAIRED>(xt, [&t[0..1], &t[1..2], &t[2..3], &t[3..4]]);
                sums = [vaddq_s32(sums[0], tails[0]), vaddq_s32(sums[1], tails[1])];
            }
            let r = Requant4 {
                left: load_i32(head4(&self.left[j0..])),
                multiplier: load_i32(head4(&self.multiplier[j0..])),
                right: load_i32(head4(&self.right[j0..])),
            };
            let offset = load_i32(head4(&self.offset[j0..]));
            let v0 = requantize4(sums[0], offset, r, s);
            store4(&mut out0[j0..], v0);
            if let Some(out1) = out1.as_deref_mut() {
                let v1 = requantize4(sums[1], offset, r, s);
                store4(&mut out1[self.oc0 + j0..], v1);
            }
            j = j0 + 4;
        }
    }
}

/// The first `whole` bytes of `r` (a multiple of 16) as 16-byte blocks.
#[inline(always)]
fn blocks(r: &[i8], whole: usize) -> &[[i8; 16]] {
    r[..whole].as_chunks::<16>().0
}

/// The wrapping sum of `w` and whether it holds `-128`, 16 bytes per step.
#[inline]
#[target_feature(enable = "neon")]
fn row_stats(w: &[i8]) -> (i32, bool) {
    let (blocks, rest) = w.as_chunks::<16>();
    let (mut acc, mut low) = (vdupq_n_s32(0), vdupq_n_s8(0));
    for b in blocks {
        let v = load16(b);
        // Pairs of int8 sum exactly in int16, then add into int32 lanes (wrapping).
        acc = vpadalq_s16(acc, vpaddlq_s8(v));
        low = vminq_s8(low, v);
    }
    let (mut sum, mut min) = (vaddvq_s32(acc), vminvq_s8(low));
    for &v in rest {
        sum = sum.wrapping_add(i32::from(v));
        min = min.min(v);
    }
    (sum, min == i8::MIN)
}

/// Stores the low bytes of the 4 lanes of `v` (each in int8 range) to `out[..4]`.
#[inline]
#[target_feature(enable = "neon")]
fn store4(out: &mut [i8], v: int32x4_t) {
    let bytes = vget_lane_u32::<0>(vreinterpret_u32_s8(narrow8(v, v))).to_le_bytes();
    if let Some(out) = out.first_chunk_mut::<4>() {
        *out = bytes.map(|b| b as i8);
    }
}

/// The first 4 entries of `s`.
#[inline(always)]
fn head4(s: &[i32]) -> &[i32; 4] {
    match s.first_chunk::<4>() {
        Some(a) => a,
        None => panic!("fewer than 4 decoded channels"),
    }
}

impl Default for Chunk {
    fn default() -> Self {
        Chunk {
            oc0: 0,
            n: 0,
            offset: [0; CHANNELS],
            left: [0; CHANNELS],
            multiplier: [0; CHANNELS],
            right: [0; CHANNELS],
            tail: [[0; 16]; CHANNELS],
            paired: false,
        }
    }
}

/// Copies the receptive field of output pixel `(b, oy, ox)` into `buf` in the filter's
/// `(fy, fx, c)` order, with `zp` for padding taps.
#[inline(always)]
fn fill_patch(
    g: &ConvGeometry,
    input: &[i8],
    zp: i8,
    (b, oy, ox): (usize, usize, usize),
    buf: &mut [i8],
) {
    let c = g.in_c;
    let in_y0 = (oy * g.stride_h) as isize - g.pad_top as isize;
    let in_x0 = (ox * g.stride_w) as isize - g.pad_left as isize;
    let (fy0, fy1) = tap_range(in_y0, g.dilation_h, g.filter_h, g.in_h);
    let (fx0, fx1) = tap_range(in_x0, g.dilation_w, g.filter_w, g.in_w);
    let row_len = g.filter_w * c;
    for fy in 0..g.filter_h {
        let dst = &mut buf[fy * row_len..][..row_len];
        if fy < fy0 || fy >= fy1 || fx0 == fx1 {
            dst.fill(zp);
            continue;
        }
        let iy = (in_y0 + (g.dilation_h * fy) as isize) as usize;
        let in_row = (b * g.in_h + iy) * g.in_w;
        if fx0 > 0 {
            dst[..fx0 * c].fill(zp);
        }
        if fx1 < g.filter_w {
            dst[fx1 * c..].fill(zp);
        }
        let ix0 = (in_x0 + (g.dilation_w * fx0) as isize) as usize;
        if g.dilation_w == 1 {
            // The in-image taps of the row are contiguous in the input.
            let n = (fx1 - fx0) * c;
            dst[fx0 * c..][..n].copy_from_slice(&input[(in_row + ix0) * c..][..n]);
        } else {
            for fx in fx0..fx1 {
                let ix = ix0 + g.dilation_w * (fx - fx0);
                dst[fx * c..][..c].copy_from_slice(&input[(in_row + ix) * c..][..c]);
            }
        }
    }
}

/// The patch of output pixel `(b, oy, ox)` (`k` bytes, then up to 16 more that the caller
/// ignores): the input itself for a 1x1 filter whose tap is in the image, else `buf` (`k + 16`
/// bytes) filled by [`fill_patch`].
#[inline(always)]
fn patch<'a>(
    g: &ConvGeometry,
    input: &'a [i8],
    zp: i8,
    (b, oy, ox): (usize, usize, usize),
    buf: &'a mut [i8],
) -> &'a [i8] {
    let k = g.filter_h * g.filter_w * g.in_c;
    debug_assert_eq!(buf.len(), k + 16);
    if g.filter_h == 1 && g.filter_w == 1 {
        let iy = (oy * g.stride_h) as isize - g.pad_top as isize;
        let ix = (ox * g.stride_w) as isize - g.pad_left as isize;
        if iy >= 0 && (iy as usize) < g.in_h && ix >= 0 && (ix as usize) < g.in_w {
            let at = ((b * g.in_h + iy as usize) * g.in_w + ix as usize) * k;
            let end = core::cmp::min(at + k + 16, input.len());
            return &input[at..end];
        }
    }
    fill_patch(g, input, zp, (b, oy, ox), &mut buf[..k]);
    buf
}

/// Output pixel coordinates `(b, oy, ox)` in NHWC order.
#[derive(Clone, Copy)]
struct Pixel(usize, usize, usize);

impl Pixel {
    /// The pixel after this one in an output of `out_h` x `out_w`.
    #[inline(always)]
    fn next(self, out_h: usize, out_w: usize) -> Pixel {
        let Pixel(b, oy, ox) = self;
        if ox + 1 < out_w {
            Pixel(b, oy, ox + 1)
        } else if oy + 1 < out_h {
            Pixel(b, oy + 1, 0)
        } else {
            Pixel(b + 1, 0, 0)
        }
    }
}

/// int8 CONV_2D, NEON body: bit-exact with [`conv::conv2d_i8_portable`].
///
/// Handled: `groups == 1`, at least 4 output channels, an input zero point in int8 range, and a
/// patch (`filter_h * filter_w * in_c`) of at most [`MAX_PATCH`] elements. Output channels go
/// in chunks of at most [`CHANNELS`] (constants decoded once), pixels in pairs inside; the two
/// patches (raw int8, the zero point in padding taps) are matched against 4 weight rows at a
/// time: per 16 patch bytes, 2 patch loads, 4 weight loads
/// and 24 (or 32 when a weight is `-128`) multiply/accumulate instructions for 128 MACs.
pub fn conv2d_i8(
    g: &ConvGeometry,
    q: &QuantizedOutput<'_>,
    input: &[i8],
    filter: &[i8],
    bias: Option<&[i32]>,
    output: &mut [i8],
) {
    // SAFETY: NEON is part of the aarch64 base ISA (the `neon` target feature is always
    // enabled on aarch64 targets), so the `#[target_feature(enable = "neon")]` body can run.
    unsafe { conv_neon(g, q, input, filter, bias, output) }
}

#[target_feature(enable = "neon")]
fn conv_neon(
    g: &ConvGeometry,
    q: &QuantizedOutput<'_>,
    input: &[i8],
    filter: &[i8],
    bias: Option<&[i32]>,
    output: &mut [i8],
) {
    let k = g.filter_h * g.filter_w * g.filter_in_c;
    let zp = match i8::try_from(q.input_zero_point) {
        Ok(zp)
            if g.filter_in_c == g.in_c
                && k > 0
                && g.out_c >= 4
                && k <= MAX_PATCH
                && usual_requant(q) =>
        {
            zp
        }
        _ => return conv::conv2d_i8_portable(g, q, input, filter, bias, output),
    };
    debug_assert_eq!(filter.len(), g.out_c * k);
    debug_assert_eq!(input.len(), g.batch * g.in_h * g.in_w * g.in_c);
    debug_assert_eq!(output.len(), g.batch * g.out_h * g.out_w * g.out_c);
    let stage = Stage::new(q);
    let pixels = g.batch * g.out_h * g.out_w;
    let mut bufs = [[0i8; MAX_PATCH + 16]; 2];
    let [buf0, buf1] = &mut bufs;
    let len = k + 16;
    let (buf0, buf1) = (&mut buf0[..len], &mut buf1[..len]);
    let mut chunk = Chunk::default();
    let mut oc0 = 0;
    while oc0 < g.out_c {
        let n = chunk_len(g.out_c - oc0);
        chunk.decode(oc0, n, k, filter, bias, q, i32::from(zp));
        let (mut p, mut px) = (0, Pixel(0, 0, 0));
        while p < pixels {
            let pair = p + 1 < pixels;
            let px1 = px.next(g.out_h, g.out_w);
            let x0 = patch(g, input, zp, (px.0, px.1, px.2), buf0);
            let x1 = if pair {
                patch(g, input, zp, (px1.0, px1.1, px1.2), buf1)
            } else {
                x0
            };
            px = px1.next(g.out_h, g.out_w);
            let rows = &mut output[p * g.out_c..][..if pair { 2 } else { 1 } * g.out_c];
            let (out0, out1) = rows.split_at_mut(g.out_c);
            let out1 = if pair { Some(out1) } else { None };
            chunk.run([x0, x1], k, filter, stage, out0, out1);
            p += 2;
        }
        oc0 += n;
    }
}

/// Channels per depthwise group: 16, or 8 for layers with fewer than 16 channels.
const fn lanes(wide: bool) -> usize {
    if wide {
        16
    } else {
        8
    }
}

/// The group's input bytes at `p` (16, or 8 in the low half when not `WIDE`).
///
/// # Safety
/// `p` must point to [`lanes`]`(WIDE)` readable bytes.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn load_lanes<const WIDE: bool>(p: *const i8) -> int8x16_t {
    if WIDE {
        // SAFETY: the caller guarantees 16 readable bytes; LD1 has no alignment requirement.
        unsafe { vld1q_s8(p) }
    } else {
        // SAFETY: the caller guarantees 8 readable bytes; LD1 has no alignment requirement.
        vcombine_s8(unsafe { vld1_s8(p) }, vdup_n_s8(0))
    }
}

/// Adds int16 products to the group's int32 lanes: `lo` to lanes 0..8, `hi` to 8..16 (`WIDE`).
#[inline]
#[target_feature(enable = "neon")]
fn widen_add<const WIDE: bool>(acc: &mut [int32x4_t; 4], lo: int16x8_t, hi: int16x8_t) {
    acc[0] = vaddw_s16(acc[0], vget_low_s16(lo));
    acc[1] = vaddw_high_s16(acc[1], lo);
    if WIDE {
        acc[2] = vaddw_s16(acc[2], vget_low_s16(hi));
        acc[3] = vaddw_high_s16(acc[3], hi);
    }
}

/// `acc += sum_t x[t] * w[t]` per lane over the taps (raw int8 operands; int16 products, exact:
/// at most 16 384 in magnitude). `PAIRED`: no weight is `-128`, so two taps' products (each at
/// most 16 256) add in int16 before widening.
#[inline]
#[target_feature(enable = "neon")]
fn mac_taps<const WIDE: bool, const PAIRED: bool>(
    acc: &mut [int32x4_t; 4],
    x: &[int8x16_t],
    w: &[int8x16_t],
) {
    let zero = vdupq_n_s16(0);
    let mut singles = (x, w);
    if PAIRED {
        let (xp, xr) = x.as_chunks::<2>();
        let (wp, wr) = w.as_chunks::<2>();
        for (x, w) in xp.iter().zip(wp) {
            let lo = vmull_s8(vget_low_s8(x[0]), vget_low_s8(w[0]));
            let lo = vmlal_s8(lo, vget_low_s8(x[1]), vget_low_s8(w[1]));
            let hi = if WIDE {
                vmlal_high_s8(vmull_high_s8(x[0], w[0]), x[1], w[1])
            } else {
                zero
            };
            widen_add::<WIDE>(acc, lo, hi);
        }
        singles = (xr, wr);
    }
    for (&x, &w) in singles.0.iter().zip(singles.1) {
        let lo = vmull_s8(vget_low_s8(x), vget_low_s8(w));
        let hi = if WIDE { vmull_high_s8(x, w) } else { zero };
        widen_add::<WIDE>(acc, lo, hi);
    }
}

/// The output range `lo..hi` (within `0..out`) of output columns (or rows) whose whole window
/// `origin ..= origin + span` (`origin = o * stride - pad`) lies inside `0..extent`.
fn interior(out: usize, stride: usize, pad: usize, extent: usize, span: usize) -> (usize, usize) {
    // origin >= 0  <=>  o >= ceil(pad / stride)
    let lo = pad.div_ceil(stride);
    // origin + span <= extent - 1  <=>  o * stride <= extent + pad - span - 1
    let hi = match (extent + pad).checked_sub(span + 1) {
        Some(room) => room / stride + 1,
        None => 0,
    };
    let hi = core::cmp::min(hi, out);
    (core::cmp::min(lo, hi), hi)
}

/// int8 DEPTHWISE_CONV_2D, NEON body: bit-exact with
/// [`depthwise::depthwise_conv2d_i8_portable`].
///
/// Handled: `depth_multiplier == 1`, at least 8 channels, at most [`MAX_TAPS`] taps, an input
/// zero point in int8 range. Channels go 16 per group (8 for layers of 8 to 15 channels; NHWC
/// keeps them contiguous); a channel count that is not a multiple of the group ends with the
/// group ending at the last channel (a few recomputed). Per group: weights loaded and
/// `bias - zp * sum w` and the requantization decoded once; then every output pixel multiplies
/// its window (the zero point for padding taps) by the weights in int8, two taps per int16 sum
/// (interior 3x3 windows unrolled, weights in registers: 10 instructions per 2 taps of 16
/// channels) and requantizes the group's outputs at once.
pub fn depthwise_conv2d_i8(
    g: &ConvGeometry,
    q: &QuantizedOutput<'_>,
    input: &[i8],
    filter: &[i8],
    bias: Option<&[i32]>,
    output: &mut [i8],
) {
    let c = g.in_c;
    let taps = g.filter_h * g.filter_w;
    let zp = match i8::try_from(q.input_zero_point) {
        Ok(zp)
            if g.depth_multiplier == 1
                && g.out_c == c
                && c >= 8
                && taps > 0
                && taps <= MAX_TAPS
                && usual_requant(q) =>
        {
            zp
        }
        _ => return depthwise::depthwise_conv2d_i8_portable(g, q, input, filter, bias, output),
    };
    let paired = !filter.contains(&i8::MIN);
    // SAFETY: NEON is part of the aarch64 base ISA (the `neon` target feature is always
    // enabled on aarch64 targets), so the `#[target_feature(enable = "neon")]` bodies can run.
    unsafe {
        match (c >= 16, paired) {
            (true, true) => depthwise_neon::<true, true>(g, q, zp, input, filter, bias, output),
            (true, false) => depthwise_neon::<true, false>(g, q, zp, input, filter, bias, output),
            (false, true) => depthwise_neon::<false, true>(g, q, zp, input, filter, bias, output),
            (false, false) => depthwise_neon::<false, false>(g, q, zp, input, filter, bias, output),
        }
    }
}

/// [`depthwise_conv2d_i8`] for a checked op, in groups of [`lanes`]`(WIDE)` channels
/// (`in_c >= lanes(WIDE)`); `PAIRED`: no weight is `-128` (see [`mac_taps`]).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "neon")]
fn depthwise_neon<const WIDE: bool, const PAIRED: bool>(
    g: &ConvGeometry,
    q: &QuantizedOutput<'_>,
    zp: i8,
    input: &[i8],
    filter: &[i8],
    bias: Option<&[i32]>,
    output: &mut [i8],
) {
    let c = g.in_c;
    let l = lanes(WIDE);
    let taps = g.filter_h * g.filter_w;
    debug_assert!(c >= l && (1..=MAX_TAPS).contains(&taps));
    debug_assert_eq!(filter.len(), taps * c);
    debug_assert_eq!(input.len(), g.batch * g.in_h * g.in_w * c);
    debug_assert_eq!(output.len(), g.batch * g.out_h * g.out_w * c);
    let stage = Stage::new(q);
    let zp16 = vdupq_n_s8(zp);
    let (fh, fw) = (g.filter_h, g.filter_w);
    let (x_lo, x_hi) = interior(
        g.out_w,
        g.stride_w,
        g.pad_left,
        g.in_w,
        (fw - 1) * g.dilation_w,
    );
    let (y_lo, y_hi) = interior(
        g.out_h,
        g.stride_h,
        g.pad_top,
        g.in_h,
        (fh - 1) * g.dilation_h,
    );
    let row = g.in_w * c;
    // Offsets of the taps from the window's top-left input byte (interior pixels), increasing.
    let mut tap_at = [0usize; MAX_TAPS];
    for (t, at) in tap_at[..taps].iter_mut().enumerate() {
        *at = (t / fw) * g.dilation_h * row + (t % fw) * g.dilation_w * c;
    }
    let span = tap_at[taps - 1] + l;
    let mut w = [vdupq_n_s8(0); MAX_TAPS];
    let mut x = [vdupq_n_s8(0); MAX_TAPS];
    let mut c0 = 0;
    loop {
        let cg = core::cmp::min(c0, c - l);
        let mut wsum = [0i32; 16];
        for (t, w) in w[..taps].iter_mut().enumerate() {
            let f = &filter[t * c + cg..][..l];
            for (s, &v) in wsum.iter_mut().zip(f) {
                *s += i32::from(v);
            }
            // SAFETY: `f` is `l = lanes(WIDE)` readable bytes.
            *w = unsafe { load_lanes::<WIDE>(f.as_ptr()) };
        }
        let (mut off, mut left, mut mult, mut right) =
            ([0i32; 16], [0i32; 16], [0i32; 16], [0i32; 16]);
        for j in 0..l {
            let oc = cg + j;
            let r = q.requant[if q.requant.len() > 1 { oc } else { 0 }];
            (left[j], right[j]) = shifts(r.shift);
            mult[j] = r.multiplier;
            // sum w * (x - zp) = sum w * x - zp * sum w, padding taps holding x = zp.
            off[j] = bias
                .map_or(0, |b| b[oc])
                .wrapping_sub(i32::from(zp).wrapping_mul(wsum[j]));
        }
        let quarter = |a: &[i32; 16], h: usize| load_i32(head4(&a[4 * h..]));
        let offs = [0, 1, 2, 3].map(|h| quarter(&off, h));
        let rq = [0, 1, 2, 3].map(|h| Requant4 {
            left: quarter(&left, h),
            multiplier: quarter(&mult, h),
            right: quarter(&right, h),
        });
        // 9-tap filters (3x3): the taps as fixed-size copies (fully unrolled, weights in
        // registers).
        let three = match (tap_at.first_chunk::<9>(), w.first_chunk::<9>()) {
            (Some(&t9), Some(&w9)) if taps == 9 => Some((t9, w9)),
            _ => None,
        };
        let mut out_at = cg;
        for b in 0..g.batch {
            for oy in 0..g.out_h {
                let in_y0 = (oy * g.stride_h) as isize - g.pad_top as isize;
                let (fy0, fy1) = tap_range(in_y0, g.dilation_h, fh, g.in_h);
                let y_inside = oy >= y_lo && oy < y_hi;
                for ox in 0..g.out_w {
                    let in_x0 = (ox * g.stride_w) as isize - g.pad_left as isize;
                    let z = vdupq_n_s32(0);
                    let mut acc = [z; 4];
                    if y_inside && ox >= x_lo && ox < x_hi {
                        let at = ((b * g.in_h + in_y0 as usize) * g.in_w + in_x0 as usize) * c + cg;
                        let win = &input[at..][..span];
                        let p = win.as_ptr();
                        // SAFETY (both loads): `t + l <= tap_at[taps - 1] + l = win.len()` for
                        // every tap offset `t` (they increase with the tap index), so the bytes
                        // read lie inside `win`.
                        if let Some((t9, w9)) = &three {
                            let x9 = t9.map(|t| unsafe { load_lanes::<WIDE>(p.add(t)) });
                            mac_taps::<WIDE, PAIRED>(&mut acc, &x9, w9);
                        } else {
                            for (x, &t) in x[..taps].iter_mut().zip(&tap_at[..taps]) {
                                *x = unsafe { load_lanes::<WIDE>(p.add(t)) };
                            }
                            mac_taps::<WIDE, PAIRED>(&mut acc, &x[..taps], &w[..taps]);
                        }
                    } else if let Some((_, w9)) = &three {
                        // Border window of 9 taps: in-image taps loaded, the others the zero
                        // point.
                        let (fx0, fx1) = tap_range(in_x0, g.dilation_w, fw, g.in_w);
                        let mut x9 = [zp16; 9];
                        for fy in fy0..fy1 {
                            let iy = (in_y0 + (g.dilation_h * fy) as isize) as usize;
                            let in_row = (b * g.in_h + iy) * g.in_w;
                            for fx in fx0..fx1 {
                                let ix = (in_x0 + (g.dilation_w * fx) as isize) as usize;
                                let v = &input[(in_row + ix) * c + cg..][..l];
                                // SAFETY: `v` is `l` readable bytes.
                                x9[fy * fw + fx] = unsafe { load_lanes::<WIDE>(v.as_ptr()) };
                            }
                        }
                        mac_taps::<WIDE, PAIRED>(&mut acc, &x9, w9);
                    } else {
                        let (fx0, fx1) = tap_range(in_x0, g.dilation_w, fw, g.in_w);
                        x[..taps].fill(zp16);
                        for fy in fy0..fy1 {
                            let iy = (in_y0 + (g.dilation_h * fy) as isize) as usize;
                            let in_row = (b * g.in_h + iy) * g.in_w;
                            for fx in fx0..fx1 {
                                let ix = (in_x0 + (g.dilation_w * fx) as isize) as usize;
                                let v = &input[(in_row + ix) * c + cg..][..l];
                                // SAFETY: `v` is `l` readable bytes.
                                x[fy * fw + fx] = unsafe { load_lanes::<WIDE>(v.as_ptr()) };
                            }
                        }
                        mac_taps::<WIDE, PAIRED>(&mut acc, &x[..taps], &w[..taps]);
                    }
                    let out = &mut output[out_at..][..l];
                    let lo = narrow8(
                        requantize4(acc[0], offs[0], rq[0], stage),
                        requantize4(acc[1], offs[1], rq[1], stage),
                    );
                    if WIDE {
                        let hi = narrow8(
                            requantize4(acc[2], offs[2], rq[2], stage),
                            requantize4(acc[3], offs[3], rq[3], stage),
                        );
                        // SAFETY: `out` is 16 writable bytes; ST1 has no alignment requirement.
                        unsafe { vst1q_s8(out.as_mut_ptr(), vcombine_s8(lo, hi)) };
                    } else {
                        // SAFETY: `out` is 8 writable bytes; ST1 has no alignment requirement.
                        unsafe { vst1_s8(out.as_mut_ptr(), lo) };
                    }
                    out_at += c;
                }
            }
        }
        if cg + l >= c {
            break;
        }
        c0 += l;
    }
}

/// int8 FULLY_CONNECTED, NEON body: bit-exact with
/// [`fully_connected::fully_connected_i8_portable`].
///
/// Handled: symmetric weights (`filter_zero_point == 0`), at least 4 outputs and an input zero
/// point in int8 range. The CONV_2D machinery with input rows as the patches (in pairs) and
/// weight rows as the filters: 4 outputs at a time, 16 features per step.
pub fn fully_connected_i8(
    g: &FullyConnectedGeometry,
    q: &QuantizedOutput<'_>,
    input: &[i8],
    weights: &[i8],
    bias: Option<&[i32]>,
    output: &mut [i8],
) {
    // SAFETY: NEON is part of the aarch64 base ISA (the `neon` target feature is always
    // enabled on aarch64 targets), so the `#[target_feature(enable = "neon")]` body can run.
    unsafe { fully_connected_neon(g, q, input, weights, bias, output) }
}

#[target_feature(enable = "neon")]
fn fully_connected_neon(
    g: &FullyConnectedGeometry,
    q: &QuantizedOutput<'_>,
    input: &[i8],
    weights: &[i8],
    bias: Option<&[i32]>,
    output: &mut [i8],
) {
    let n = g.in_features;
    let outs = g.out_features;
    let zp = match i8::try_from(q.input_zero_point) {
        Ok(zp) if q.filter_zero_point == 0 && n > 0 && outs >= 4 && usual_requant(q) => zp,
        _ => {
            return fully_connected::fully_connected_i8_portable(g, q, input, weights, bias, output)
        }
    };
    debug_assert_eq!(weights.len(), outs * n);
    debug_assert_eq!(input.len(), g.batch * n);
    let stage = Stage::new(q);
    let mut chunk = Chunk::default();
    let mut o0 = 0;
    while o0 < outs {
        let m = chunk_len(outs - o0);
        chunk.decode(o0, m, n, weights, bias, q, i32::from(zp));
        let mut b = 0;
        while b < g.batch {
            let pair = b + 1 < g.batch;
            // Each row with up to 16 bytes after it (ignored, see `Chunk::run`).
            let row = |b: usize| &input[b * n..core::cmp::min((b + 1) * n + 16, input.len())];
            let x0 = row(b);
            let x1 = if pair { row(b + 1) } else { x0 };
            let rows = &mut output[b * outs..][..if pair { 2 } else { 1 } * outs];
            let (out0, out1) = rows.split_at_mut(outs);
            let out1 = if pair { Some(out1) } else { None };
            chunk.run([x0, x1], n, weights, stage, out0, out1);
            b += 2;
        }
        o0 += m;
    }
}

/// int8 ADD (`sub == false`) or SUB of two same-shape tensors, NEON body for
/// `binary::add_sub_i8`: writes `out[..n]` for the largest multiple `n` of 16 not above
/// `out.len()` and returns `n` (the caller finishes the rest), or returns 0 and writes nothing
/// when the parameters are not the usual ones (multipliers not `i32::MIN`, rescale shifts in
/// `-31..=0`, left shift in `0..=30`, input zero points in int8 range) or the lengths differ.
///
/// Bit-exact with TFLM's `AddElementwise` / `SubElementwise` arithmetic, 16 elements per step:
/// `q - zp` widened exactly (`SSUBL`: at most 255 in magnitude, int16), then to int32 lanes;
/// each input rescaled by [`multiply4`] with the left shift (`SSHL` wraps like the reference's
/// `x * (1 << left_shift)`), which is `MultiplyByQuantizedMultiplierSmallerThanOneExp` of the
/// shifted value; the wrapping sum (or difference), the output rescale (left shift 0), the
/// zero point (wrapping add) and the clamp, as in [`requantize4`]; then narrowed (the values
/// are in int8 range, so the plain narrowing `XTN` is exact).
pub fn add_sub_i8(
    sub: bool,
    p: &crate::graph::BinaryParams,
    zero_points: [i32; 3],
    a: &[i8],
    b: &[i8],
    out: &mut [i8],
) -> usize {
    let usual = super::usual_add_params(p);
    let [zp_a, zp_b, zp_out] = zero_points;
    let (Ok(zp_a), Ok(zp_b)) = (i8::try_from(zp_a), i8::try_from(zp_b)) else {
        return 0;
    };
    if !usual || a.len() != out.len() || b.len() != out.len() {
        return 0;
    }
    // SAFETY: NEON is part of the aarch64 base ISA (the module's const assertion), so the
    // `#[target_feature(enable = "neon")]` bodies can run.
    unsafe {
        if sub {
            add_sub_neon::<true>(p, (zp_a, zp_b, zp_out), a, b, out)
        } else {
            add_sub_neon::<false>(p, (zp_a, zp_b, zp_out), a, b, out)
        }
    }
}

/// `q - zp` of 16 bytes as four int32 vectors (elements 0-3, 4-7, 8-11, 12-15), exact.
#[inline]
#[target_feature(enable = "neon")]
fn offset16(q: int8x16_t, zp: int8x16_t) -> [int32x4_t; 4] {
    let lo = vsubl_s8(vget_low_s8(q), vget_low_s8(zp));
    let hi = vsubl_high_s8(q, zp);
    [
        vmovl_s16(vget_low_s16(lo)),
        vmovl_high_s16(lo),
        vmovl_s16(vget_low_s16(hi)),
        vmovl_high_s16(hi),
    ]
}

#[target_feature(enable = "neon")]
fn add_sub_neon<const SUB: bool>(
    p: &crate::graph::BinaryParams,
    (zp_a, zp_b, zp_out): (i8, i8, i32),
    a: &[i8],
    b: &[i8],
    out: &mut [i8],
) -> usize {
    let rescale = |r: crate::graph::Requant, left: i32| Requant4 {
        left: vdupq_n_s32(left),
        multiplier: vdupq_n_s32(r.multiplier),
        right: vdupq_n_s32(r.shift),
    };
    let (ra, rb) = (
        rescale(p.input0, p.left_shift),
        rescale(p.input1, p.left_shift),
    );
    let ro = rescale(p.output, 0);
    let stage = Stage {
        zero_point: vdupq_n_s32(zp_out),
        min: vdupq_n_s32(i32::from(p.clamp.min)),
        max: vdupq_n_s32(i32::from(p.clamp.max)),
    };
    let (za, zb) = (vdupq_n_s8(zp_a), vdupq_n_s8(zp_b));
    let (xs, _) = a.as_chunks::<16>();
    let (ys, _) = b.as_chunks::<16>();
    let (os, _) = out.as_chunks_mut::<16>();
    let n = os.len();
    for ((x, y), o) in xs.iter().zip(ys).zip(os.iter_mut()) {
        let x = offset16(load16(x), za);
        let y = offset16(load16(y), zb);
        let v: [int32x4_t; 4] = core::array::from_fn(|j| {
            let (x, y) = (multiply4(x[j], ra), multiply4(y[j], rb));
            let raw = if SUB {
                vsubq_s32(x, y)
            } else {
                vaddq_s32(x, y)
            };
            finish4(multiply4(raw, ro), stage)
        });
        let lo = vmovn_high_s32(vmovn_s32(v[0]), v[1]);
        let hi = vmovn_high_s32(vmovn_s32(v[2]), v[3]);
        // SAFETY: `o` is 16 writable bytes; ST1 has no alignment requirement.
        unsafe { vst1q_s8(o.as_mut_ptr(), vmovn_high_s16(vmovn_s16(lo), hi)) };
    }
    16 * n
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use crate::graph::{BinaryParams, ClampI8, Requant};
    use crate::kernels::arch::cases::{
        acc, case, data, fc_case, Case, EDGE_ACCS, EDGE_MULTIPLIERS,
    };
    use crate::kernels::conv::tests::{clamp, requant, zero_point};
    use crate::quant::multiply_by_quantized_multiplier_smaller_than_one;
    use proptest::collection::vec;
    use proptest::prelude::*;

    fn check_conv(c: &Case) -> Result<(), TestCaseError> {
        let (fast, want) = c.run_conv(conv2d_i8);
        prop_assert_eq!(fast, want);
        Ok(())
    }

    fn check_depthwise(c: &Case) -> Result<(), TestCaseError> {
        let (fast, want) = c.run_depthwise(depthwise_conv2d_i8);
        prop_assert_eq!(fast, want);
        Ok(())
    }

    /// A SAME-padded conv (or depthwise, `dw`) geometry, batch 1: input `in_hw`, filter `f`,
    /// stride `s` on both axes.
    pub fn same(
        in_hw: (usize, usize),
        in_c: usize,
        out_c: usize,
        f: (usize, usize),
        s: usize,
        dw: bool,
    ) -> ConvGeometry {
        let out = |i: usize| i.div_ceil(s);
        let pad = |i: usize, f: usize| ((out(i) - 1) * s + f).saturating_sub(i) / 2;
        ConvGeometry {
            batch: 1,
            in_h: in_hw.0,
            in_w: in_hw.1,
            in_c,
            out_h: out(in_hw.0),
            out_w: out(in_hw.1),
            out_c,
            filter_h: f.0,
            filter_w: f.1,
            filter_in_c: if dw { 1 } else { in_c },
            stride_h: s,
            stride_w: s,
            dilation_h: 1,
            dilation_w: 1,
            pad_top: pad(in_hw.0, f.0),
            pad_left: pad(in_hw.1, f.1),
            depth_multiplier: 1,
        }
    }

    /// MLPerf Tiny-like conv layers (KWS DS-CNN, ResNet-8, VWW MobileNet; spatial sizes cut
    /// down to keep the emulated run short).
    fn mlperf_conv() -> impl Strategy<Value = Case> {
        prop_oneof![
            Just(same((49, 10), 1, 64, (10, 4), 2, false)),
            Just(same((13, 5), 64, 64, (1, 1), 1, false)),
            Just(same((12, 12), 3, 16, (3, 3), 1, false)),
            Just(same((12, 12), 16, 16, (3, 3), 1, false)),
            Just(same((12, 12), 16, 32, (3, 3), 2, false)),
            Just(same((8, 8), 32, 64, (3, 3), 2, false)),
            Just(same((8, 8), 16, 32, (1, 1), 2, false)),
            Just(same((24, 24), 3, 8, (3, 3), 2, false)),
            Just(same((6, 6), 128, 256, (1, 1), 1, false)),
            Just(same((3, 3), 256, 256, (1, 1), 1, false)),
        ]
        .prop_flat_map(|g| data(g, false))
    }

    /// MLPerf Tiny-like depthwise layers (KWS and VWW).
    fn mlperf_depthwise() -> impl Strategy<Value = Case> {
        prop_oneof![
            Just(same((13, 5), 64, 64, (3, 3), 1, true)),
            Just(same((24, 24), 8, 8, (3, 3), 1, true)),
            Just(same((12, 12), 16, 16, (3, 3), 2, true)),
            Just(same((6, 6), 64, 64, (3, 3), 2, true)),
            Just(same((3, 3), 256, 256, (3, 3), 1, true)),
            Just(same((10, 7), 24, 24, (9, 1), 1, true)),
            Just(same((7, 10), 20, 20, (1, 9), 2, true)),
            Just(same((9, 9), 12, 12, (5, 5), 1, true)),
        ]
        .prop_flat_map(|g| data(g, true))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn conv_neon_is_bit_exact(c in case(false)) {
            check_conv(&c)?;
        }

        #[test]
        fn depthwise_neon_is_bit_exact(c in case(true)) {
            check_depthwise(&c)?;
        }

        #[test]
        fn fully_connected_neon_is_bit_exact(c in fc_case()) {
            let (fast, want) = c.run(fully_connected_i8);
            prop_assert_eq!(fast, want);
        }

        /// Same-shape ADD / SUB against TFLM's arithmetic: lengths around the 16-element
        /// blocks, any usual parameters (multipliers of either sign and extreme ones, shifts
        /// over their whole range, small right shifts often, so that rounding ties occur).
        #[test]
        fn add_sub_neon_matches_reference(
            (a, b) in (0usize..80).prop_flat_map(|n| (vec(any::<i8>(), n), vec(any::<i8>(), n))),
            sub in any::<bool>(),
            p in binary_params(),
            zps in (zero_point(), zero_point(), prop_oneof![zero_point(), any::<i32>()]),
        ) {
            let zps = [zps.0, zps.1, zps.2];
            let mut got = std::vec![0i8; a.len()];
            let done = add_sub_i8(sub, &p, zps, &a, &b, &mut got);
            prop_assert_eq!(done, a.len() & !15);
            for i in 0..done {
                let want = add_sub_reference(sub, &p, zps, a[i], b[i]);
                prop_assert_eq!(got[i], want, "element {} of {}", i, a.len());
            }
        }

        #[test]
        fn requantize4_matches_portable(
            acc in proptest::array::uniform4(acc()),
            offset in proptest::array::uniform4(prop_oneof![Just(0i32), any::<i32>()]),
            r in proptest::array::uniform4(prop_oneof![
                requant(),
                (any::<i32>(), -31i32..=30).prop_map(|(multiplier, shift)| Requant { multiplier, shift }),
                (-31i32..=30).prop_map(|shift| Requant { multiplier: i32::MIN, shift }),
            ]),
            zp in zero_point(),
            clamp in clamp(),
        ) {
            let got = requantize_lanes(acc, offset, r, zp, clamp);
            for j in 0..4 {
                let want = conv::requantize(acc[j].wrapping_add(offset[j]), r[j], zp, clamp);
                prop_assert_eq!(got[j], i32::from(want), "lane {}", j);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn conv_neon_matches_on_mlperf_shapes(c in mlperf_conv()) {
            check_conv(&c)?;
        }

        #[test]
        fn depthwise_neon_matches_on_mlperf_shapes(c in mlperf_depthwise()) {
            check_depthwise(&c)?;
        }
    }

    /// [`requantize4`] on plain arrays: lane `j` requantizes `acc[j] + offset[j]` with `r[j]`.
    fn requantize_lanes(
        acc: [i32; 4],
        offset: [i32; 4],
        r: [Requant; 4],
        zp: i32,
        clamp: ClampI8,
    ) -> [i32; 4] {
        #[target_feature(enable = "neon")]
        fn lanes(
            acc: [i32; 4],
            offset: [i32; 4],
            r: [Requant; 4],
            zp: i32,
            clamp: ClampI8,
        ) -> [i32; 4] {
            let q = QuantizedOutput {
                input_zero_point: 0,
                filter_zero_point: 0,
                output_zero_point: zp,
                requant: &r,
                clamp,
            };
            let rq = Requant4 {
                left: load_i32(&r.map(|r| shifts(r.shift).0)),
                multiplier: load_i32(&r.map(|r| r.multiplier)),
                right: load_i32(&r.map(|r| shifts(r.shift).1)),
            };
            let v = requantize4(load_i32(&acc), load_i32(&offset), rq, Stage::new(&q));
            let mut got = [0i32; 4];
            // SAFETY: `got` is 16 writable bytes; ST1 has no alignment requirement.
            unsafe { vst1q_s32(got.as_mut_ptr(), v) };
            got
        }
        // SAFETY: NEON is always enabled on aarch64 (see the module's const assertion).
        unsafe { lanes(acc, offset, r, zp, clamp) }
    }

    #[test]
    fn requantize4_ties_and_extremes() {
        let full = ClampI8 {
            min: -128,
            max: 127,
        };
        for m in EDGE_MULTIPLIERS {
            for shift in -31..=30 {
                let r = Requant {
                    multiplier: m,
                    shift,
                };
                for a in EDGE_ACCS.windows(4) {
                    let acc = [a[0], a[1], a[2], a[3]];
                    let got = requantize_lanes(acc, [0; 4], [r; 4], 0, full);
                    for j in 0..4 {
                        assert_eq!(
                            got[j],
                            i32::from(conv::requantize(acc[j], r, 0, full)),
                            "acc {} m {m} shift {shift}",
                            acc[j]
                        );
                    }
                }
            }
        }
    }

    /// TFLM's int8 ADD / SUB of one pair, as `binary::add_sub_i8`'s scalar closure.
    fn add_sub_reference(sub: bool, p: &BinaryParams, zps: [i32; 3], x: i8, y: i8) -> i8 {
        let rescale = |v: i8, zp: i32, r: Requant| {
            let v = (i32::from(v) - zp).wrapping_mul(1 << p.left_shift);
            multiply_by_quantized_multiplier_smaller_than_one(v, r.multiplier, r.shift)
        };
        let (x, y) = (rescale(x, zps[0], p.input0), rescale(y, zps[1], p.input1));
        let raw = if sub {
            x.wrapping_sub(y)
        } else {
            x.wrapping_add(y)
        };
        let v = multiply_by_quantized_multiplier_smaller_than_one(
            raw,
            p.output.multiplier,
            p.output.shift,
        )
        .wrapping_add(zps[2]);
        v.clamp(i32::from(p.clamp.min), i32::from(p.clamp.max)) as i8
    }

    /// ADD / SUB parameters the fast path takes: TFLM's left shift 20 or any in `0..=30`,
    /// rescales with any multiplier but `i32::MIN` and shifts in `-31..=0` (often `-3..=0`).
    fn binary_params() -> impl Strategy<Value = BinaryParams> {
        let rescale = || {
            (
                prop_oneof![
                    (1i32 << 30)..=i32::MAX,
                    (i32::MIN + 1)..=i32::MAX,
                    Just(i32::MAX),
                    Just(i32::MIN + 1),
                ],
                prop_oneof![-3i32..=0, -31i32..=0],
            )
                .prop_map(|(multiplier, shift)| Requant { multiplier, shift })
        };
        (
            prop_oneof![Just(20i32), 0i32..=30],
            rescale(),
            rescale(),
            rescale(),
            clamp(),
        )
            .prop_map(|(left_shift, input0, input1, output, clamp)| BinaryParams {
                left_shift,
                input0,
                input1,
                output,
                clamp,
                ..BinaryParams::default()
            })
    }

    #[test]
    fn add_sub_neon_leaves_unusual_parameters_to_the_caller() {
        let usual = BinaryParams {
            left_shift: 20,
            input0: Requant {
                multiplier: 1 << 30,
                shift: 0,
            },
            input1: Requant {
                multiplier: 1 << 30,
                shift: -1,
            },
            output: Requant {
                multiplier: 1 << 30,
                shift: -18,
            },
            clamp: ClampI8 {
                min: -128,
                max: 127,
            },
            ..BinaryParams::default()
        };
        let (a, b) = ([1i8; 40], [-3i8; 40]);
        let mut out = [0i8; 40];
        assert_eq!(add_sub_i8(false, &usual, [0; 3], &a, &b, &mut out), 32);
        let min = Requant {
            multiplier: i32::MIN,
            shift: -1,
        };
        let positive = Requant {
            multiplier: 1 << 30,
            shift: 1,
        };
        let unusual: [(BinaryParams, [i32; 3]); 7] = [
            (
                BinaryParams {
                    left_shift: 31,
                    ..usual
                },
                [0; 3],
            ),
            (
                BinaryParams {
                    left_shift: -1,
                    ..usual
                },
                [0; 3],
            ),
            (
                BinaryParams {
                    input0: min,
                    ..usual
                },
                [0; 3],
            ),
            (
                BinaryParams {
                    output: min,
                    ..usual
                },
                [0; 3],
            ),
            (
                BinaryParams {
                    input1: positive,
                    ..usual
                },
                [0; 3],
            ),
            (usual, [128, 0, 0]),
            (usual, [0, -129, 0]),
        ];
        for (p, zps) in unusual {
            let mut out = [7i8; 40];
            assert_eq!(
                add_sub_i8(true, &p, zps, &a, &b, &mut out),
                0,
                "{p:?} {zps:?}"
            );
            assert_eq!(out, [7i8; 40]);
        }
        assert_eq!(add_sub_i8(false, &usual, [0; 3], &a, &b[..39], &mut out), 0);
    }
}
