//! Cortex-M4/M7 DSP fast paths for int8 CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED and ADD/SUB
//! (and the int8 average pool's window sums).
//!
//! Each public function has the signature of its portable kernel and returns the same bytes: it
//! handles the shapes it was written for and hands every other one to the portable body.
//!
//! Arithmetic: every int8 product `(x - input_zero_point) * w` is formed from 16-bit halves
//! (`|x - zp| <= 255`, `|w| <= 128`: exact in i16 and in the 32-bit product) and summed with
//! wrapping 32-bit adds (SMLAD, SMLABB and SMLATT wrap modulo 2^32; they only set the sticky Q
//! flag). Wrapping addition is associative and commutative, so any summation order gives the
//! portable body's wrapping sum exactly. Padding taps contribute 0 in both: the portable body
//! skips them, the fast paths multiply a weight by a zero (conv: a zero in the packed patch;
//! depthwise border windows: the zero point, to which the offset is added).
//!
//! Packed layout ("reordered pairs", as CMSIS-NN's `read_and_pad_reordered`): four int8 values
//! `v0 v1 v2 v3` in one little-endian word become two words of int16 pairs, `A = [v0, v2]`
//! (SXTB16) and `B = [v1, v3]` (SXTB16 with ROR #8). When weights and activations are packed
//! the same way, `SMLAD(A_x, A_w) + SMLAD(B_x, B_w)` is the 4-term dot product. SXTAB16 adds the
//! input offset `-zp` to both halves in the same instruction.
//!
//! Memory: no arena scratch. The kernels keep their buffers on the stack (about 8.5 KB at most):
//! CONV_2D a packed patch of up to four receptive fields, the decoded output stage of up to 64
//! channels and their raw sums; DEPTHWISE_CONV_2D an int16 strip of input rows and a tile's sums;
//! FULLY_CONNECTED one packed input row; ADD two 256-entry rescale tables. Shapes whose patch or
//! row does not fit run the portable body.
//!
//! Modules: `dsp` the instructions (one function each, `asm!` on the core, plain Rust with
//! the same semantics elsewhere) and the loops written as single `asm!` blocks; `output` the
//! output stage (`Channel`: TFLM's requantization in six instructions, exact by per-channel
//! bounds, proofs at the type); `conv`, `depthwise`, `fully_connected`, `add` the kernels.
//! docs/KERNELS.md has the design and the figures.
//!
//! On targets without the DSP extension the primitives below are plain Rust with the
//! instructions' semantics, so the host tests exercise these modules' layout and loop logic too.

mod add;
mod conv;
mod depthwise;
mod dsp;
mod fully_connected;
mod output;
#[cfg(test)]
mod tests;

pub use add::add_sub_i8;
pub use conv::conv2d_i8;
pub use depthwise::depthwise_conv2d_i8;
pub use fully_connected::fully_connected_i8;
pub use output::requantize;

/// SXTAB16 and its ROR #8 form (for other kernels' Cortex-M paths, e.g. the int8 pools).
pub(crate) use dsp::{sxtab16, sxtab16_ror8};
/// The output stage's per-channel form, which the `asm!` output loops read word by word.
use output::Channel;

/// Most int16 elements one CONV_2D patch (`filter_h * filter_w * filter_in_c`) may have for the
/// fast path; also the stack buffer's size in words (two columns of int16 = one word per
/// element). Covers 3x3x64 (ResNet-8) and 1x1x640. A multiple of 4.
pub const MAX_PATCH: usize = 640;

/// Most input features of the FULLY_CONNECTED fast path (one row of int16 in [`MAX_PATCH`]
/// words).
pub const MAX_FC_FEATURES: usize = 2 * MAX_PATCH;

/// The first four int8 of `b` as one little-endian word: one unaligned LDR on ARMv7-M (which
/// allows unaligned word loads; LLVM does not merge four byte loads into one by itself).
#[inline(always)]
pub(crate) fn word(b: &[i8]) -> u32 {
    debug_assert!(b.len() >= 4, "word() needs 4 bytes");
    match b.first_chunk::<4>() {
        // SAFETY: `c` is 4 readable bytes; `read_unaligned` has no alignment requirement.
        Some(c) => u32::from_le(unsafe { core::ptr::read_unaligned(c.as_ptr().cast::<u32>()) }),
        None => 0, // never taken: every caller passes at least 4 elements
    }
}

/// The input offset `-zero_point` when every `x - zero_point` of an int8 `x` fits i16 (so the
/// packed halves never wrap), else `None` (the caller runs the portable body).
#[inline(always)]
fn input_offset(zero_point: i32) -> Option<i32> {
    let off = -i64::from(zero_point);
    (-32_640..=32_639).contains(&off).then_some(off as i32)
}

/// `off` in both int16 halves (the SXTAB16 addend).
#[inline(always)]
fn offset_pair(off: i32) -> u32 {
    (off as u16 as u32) * 0x0001_0001
}
