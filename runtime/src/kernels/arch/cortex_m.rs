//! Cortex-M4/M7 DSP fast paths for int8 CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED.
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
//! Memory: no arena scratch. CONV_2D keeps one stack buffer of [`MAX_PATCH`] words (2 560 bytes):
//! the receptive fields of two output pixels, expanded to int16 with the offset added (an im2col
//! of two columns only), plus the decoded requantization of up to 64 output channels (1 536
//! bytes) and their raw sums for the two pixels (512 bytes). FULLY_CONNECTED uses a buffer of
//! [`MAX_PATCH`] words for one input row; DEPTHWISE_CONV_2D 76 bytes of packed 3x3 weights and a
//! 36-byte border patch. Shapes whose patch or row does not fit run the portable body.
//!
//! The output stage (`Channel`) is TFLM's requantization with the per-channel work done once
//! per call; the few loops that matter most are single `asm!` blocks (`block_2x2`, `window3x3`,
//! `row3`), each with its reads checked against slices just before it. docs/KERNELS.md has the
//! design and the figures.
//!
//! On targets without the DSP extension the primitives below are plain Rust with the
//! instructions' semantics, so the host tests exercise this file's layout and loop logic too.

use crate::graph::{ClampI8, Requant};
use crate::kernels::conv::{self, tap_range, ConvGeometry, QuantizedOutput};
use crate::kernels::depthwise;
use crate::kernels::fully_connected::{self, FullyConnectedGeometry};
use crate::quant::rounding_divide_by_pot;

/// Most int16 elements one CONV_2D patch (`filter_h * filter_w * filter_in_c`) may have for the
/// fast path; also the stack buffer's size in words (two columns of int16 = one word per
/// element). Covers 3x3x64 (ResNet-8) and 1x1x640. A multiple of 4.
pub const MAX_PATCH: usize = 640;

/// Most input features of the FULLY_CONNECTED fast path (one row of int16 in [`MAX_PATCH`]
/// words).
pub const MAX_FC_FEATURES: usize = 2 * MAX_PATCH;

/// The DSP instructions used, one function each, and the few loops written as one `asm!` block.
mod dsp {
    /// The packed weights of one 3x3 depthwise window for 4 channels (`words[2t]` = SXTB16,
    /// `words[2t + 1]` = SXTB16 ROR #8 of tap `t`'s 4 weights, taps in row-major order), and
    /// `row`, the input's row stride in bytes. `repr(C)`: the `asm!` window reads `row` at byte
    /// offset 72.
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    pub struct Window3x3 {
        pub words: [u32; 18],
        pub row: u32,
    }

    #[cfg(kiln_arm_dsp)]
    pub use self::asm_impl::*;
    #[cfg(not(kiln_arm_dsp))]
    pub use self::emulated::*;

    /// The real instructions. Every block below is a single ARMv7E-M DSP instruction over
    /// general-purpose registers only: it reads its `in` operands, writes its one `lateout`
    /// operand, touches no memory and no stack (`nomem, nostack`) and has no side effect other
    /// than the sticky Q flag where noted, so it is `pure`. The `reg` class never hands out SP
    /// or PC, for which these encodings are UNPREDICTABLE. `kiln_arm_dsp` (set by `build.rs` for
    /// ARMv7E-M targets and for `+dsp` builds) guarantees the instructions exist on the core.
    #[cfg(kiln_arm_dsp)]
    mod asm_impl {
        use core::arch::asm;

        /// SXTB16: `[sext(x.byte0), sext(x.byte2)]` as two int16 halves.
        #[inline(always)]
        pub fn sxtb16(x: u32) -> u32 {
            let d: u32;
            // SAFETY: one register-only instruction (see the module doc); SXTB16 leaves the
            // flags alone, hence `preserves_flags`.
            unsafe {
                asm!("sxtb16 {d}, {x}", d = lateout(reg) d, x = in(reg) x,
                     options(pure, nomem, nostack, preserves_flags));
            }
            d
        }

        /// SXTB16 with ROR #8: `[sext(x.byte1), sext(x.byte3)]`.
        #[inline(always)]
        pub fn sxtb16_ror8(x: u32) -> u32 {
            let d: u32;
            // SAFETY: as for `sxtb16`; the rotation is part of the operand encoding.
            unsafe {
                asm!("sxtb16 {d}, {x}, ror #8", d = lateout(reg) d, x = in(reg) x,
                     options(pure, nomem, nostack, preserves_flags));
            }
            d
        }

        /// SXTAB16: `[a.lo + sext(x.byte0), a.hi + sext(x.byte2)]`, each half modulo 2^16.
        #[inline(always)]
        pub fn sxtab16(a: u32, x: u32) -> u32 {
            let d: u32;
            // SAFETY: one register-only instruction; no flags are changed.
            unsafe {
                asm!("sxtab16 {d}, {a}, {x}", d = lateout(reg) d, a = in(reg) a, x = in(reg) x,
                     options(pure, nomem, nostack, preserves_flags));
            }
            d
        }

        /// SXTAB16 with ROR #8: `[a.lo + sext(x.byte1), a.hi + sext(x.byte3)]`.
        #[inline(always)]
        pub fn sxtab16_ror8(a: u32, x: u32) -> u32 {
            let d: u32;
            // SAFETY: one register-only instruction; no flags are changed.
            unsafe {
                asm!("sxtab16 {d}, {a}, {x}, ror #8", d = lateout(reg) d, a = in(reg) a,
                     x = in(reg) x, options(pure, nomem, nostack, preserves_flags));
            }
            d
        }

        /// SMLAD: `acc + a.lo * b.lo + a.hi * b.hi` (signed halves), modulo 2^32.
        #[inline(always)]
        pub fn smlad(a: u32, b: u32, acc: i32) -> i32 {
            let d: i32;
            // SAFETY: one register-only instruction. On signed overflow it sets the sticky Q
            // flag (and wraps), so `preserves_flags` is not claimed; nothing reads Q.
            unsafe {
                asm!("smlad {d}, {a}, {b}, {acc}", d = lateout(reg) d, a = in(reg) a,
                     b = in(reg) b, acc = in(reg) acc, options(pure, nomem, nostack));
            }
            d
        }

        /// SMLABB: `acc + a.lo * b.lo` (signed halves), modulo 2^32.
        #[inline(always)]
        pub fn smlabb(a: u32, b: u32, acc: i32) -> i32 {
            let d: i32;
            // SAFETY: as for `smlad` (may set Q, wraps).
            unsafe {
                asm!("smlabb {d}, {a}, {b}, {acc}", d = lateout(reg) d, a = in(reg) a,
                     b = in(reg) b, acc = in(reg) acc, options(pure, nomem, nostack));
            }
            d
        }

        /// SMLATT: `acc + a.hi * b.hi` (signed halves), modulo 2^32.
        #[inline(always)]
        pub fn smlatt(a: u32, b: u32, acc: i32) -> i32 {
            let d: i32;
            // SAFETY: as for `smlad` (may set Q, wraps).
            unsafe {
                asm!("smlatt {d}, {a}, {b}, {acc}", d = lateout(reg) d, a = in(reg) a,
                     b = in(reg) b, acc = in(reg) acc, options(pure, nomem, nostack));
            }
            d
        }

        /// The 2x2 CONV_2D block: sums `x.len() / 4` element groups of two packed columns `x`
        /// (`[A col0, A col1, B col0, B col1]` per group) against two int8 weight rows, as
        /// `[w0 . col0, w0 . col1, w1 . col0, w1 . col1]`.
        #[inline(always)]
        pub fn block_2x2(x: &[u32], w0: &[i8], w1: &[i8]) -> [i32; 4] {
            let groups = x.len() / 4;
            // The loop below reads exactly these ranges (panics here, before any read, if a
            // caller passed short rows).
            let (x, w0, w1) = (&x[..4 * groups], &w0[..4 * groups], &w1[..4 * groups]);
            let (mut a00, mut a01, mut a10, mut a11) = (0i32, 0i32, 0i32, 0i32);
            if groups == 0 {
                return [0; 4];
            }
            let end = x.as_ptr_range().end;
            // SAFETY: the loop runs `groups` times (x advances 16 bytes per pass from
            // `x.as_ptr()` to `end`, `groups >= 1`); each pass reads the 4 words x[4g..4g + 4]
            // (LDRD needs word alignment: `x` is a `[u32]`) and the 4 bytes w0[4g..4g + 4] and
            // w1[4g..4g + 4] (LDR, unaligned allowed on ARMv7-M), all inside the slices above.
            // It writes only its register operands: the accumulators, the three pointers
            // (discarded) and four scratch registers (`out`, so distinct from every input). It
            // clobbers the flags (CMP; SMLAD may set Q), uses no stack and writes no memory.
            unsafe {
                asm!(
                    "2:",
                    "ldr    {u0}, [{w0}], #4",
                    "sxtb16 {u1}, {u0}",
                    "sxtb16 {u0}, {u0}, ror #8",
                    "ldrd   {t0}, {t1}, [{x}]",
                    "smlad  {a00}, {t0}, {u1}, {a00}",
                    "smlad  {a01}, {t1}, {u1}, {a01}",
                    "ldrd   {t0}, {t1}, [{x}, #8]",
                    "smlad  {a00}, {t0}, {u0}, {a00}",
                    "smlad  {a01}, {t1}, {u0}, {a01}",
                    "ldr    {u0}, [{w1}], #4",
                    "sxtb16 {u1}, {u0}",
                    "sxtb16 {u0}, {u0}, ror #8",
                    "smlad  {a10}, {t0}, {u0}, {a10}",
                    "smlad  {a11}, {t1}, {u0}, {a11}",
                    "ldrd   {t0}, {t1}, [{x}], #16",
                    "smlad  {a10}, {t0}, {u1}, {a10}",
                    "smlad  {a11}, {t1}, {u1}, {a11}",
                    "cmp    {x}, {end}",
                    "bne    2b",
                    a00 = inout(reg) a00,
                    a01 = inout(reg) a01,
                    a10 = inout(reg) a10,
                    a11 = inout(reg) a11,
                    x = inout(reg) x.as_ptr() => _,
                    w0 = inout(reg) w0.as_ptr() => _,
                    w1 = inout(reg) w1.as_ptr() => _,
                    end = in(reg) end,
                    t0 = out(reg) _,
                    t1 = out(reg) _,
                    u0 = out(reg) _,
                    u1 = out(reg) _,
                    options(nostack, readonly),
                );
            }
            [a00, a01, a10, a11]
        }

        /// Three depthwise taps of one filter row for 4 channels: `acc[j] += (x[t * step + j] +
        /// off) * w[t * step + j]` for taps `t` in 0..3 and channels `j` in 0..4, `pair` =
        /// `off` in both halves. `x` and `w` start at the first tap's 4 channels; `step` (the
        /// channel count, the distance between horizontally adjacent taps in both) is at least 4.
        #[inline(always)]
        pub fn row3(acc: &mut [i32; 4], x: &[i8], w: &[i8], step: usize, pair: u32) {
            // The reads below: bytes [t * step, t * step + 4) of x and w for t in 0..3 (panics
            // here, before any read, if a slice is shorter).
            let _ = (&x[2 * step..][..4], &w[2 * step..][..4]);
            let [mut a0, mut a1, mut a2, mut a3] = *acc;
            // SAFETY: reads the three 4-byte words at x, x + step, x + 2 * step and the same
            // offsets of w (LDR, unaligned allowed on ARMv7-M; register offset with LSL #1 is
            // 2 * step), all inside the slices checked above. Writes only the accumulators and
            // four scratch registers (`out`: distinct from every input); SMLABB/SMLATT may set
            // the sticky Q flag (flags not preserved); no stack, no memory writes.
            unsafe {
                asm!(
                    "ldr     {t0}, [{x}]",
                    "ldr     {t1}, [{w}]",
                    "sxtab16 {t2}, {pair}, {t0}",
                    "sxtab16 {t0}, {pair}, {t0}, ror #8",
                    "sxtb16  {t3}, {t1}",
                    "sxtb16  {t1}, {t1}, ror #8",
                    "smlabb  {a0}, {t2}, {t3}, {a0}",
                    "smlatt  {a2}, {t2}, {t3}, {a2}",
                    "smlabb  {a1}, {t0}, {t1}, {a1}",
                    "smlatt  {a3}, {t0}, {t1}, {a3}",
                    "ldr     {t0}, [{x}, {step}]",
                    "ldr     {t1}, [{w}, {step}]",
                    "sxtab16 {t2}, {pair}, {t0}",
                    "sxtab16 {t0}, {pair}, {t0}, ror #8",
                    "sxtb16  {t3}, {t1}",
                    "sxtb16  {t1}, {t1}, ror #8",
                    "smlabb  {a0}, {t2}, {t3}, {a0}",
                    "smlatt  {a2}, {t2}, {t3}, {a2}",
                    "smlabb  {a1}, {t0}, {t1}, {a1}",
                    "smlatt  {a3}, {t0}, {t1}, {a3}",
                    "ldr     {t0}, [{x}, {step}, lsl #1]",
                    "ldr     {t1}, [{w}, {step}, lsl #1]",
                    "sxtab16 {t2}, {pair}, {t0}",
                    "sxtab16 {t0}, {pair}, {t0}, ror #8",
                    "sxtb16  {t3}, {t1}",
                    "sxtb16  {t1}, {t1}, ror #8",
                    "smlabb  {a0}, {t2}, {t3}, {a0}",
                    "smlatt  {a2}, {t2}, {t3}, {a2}",
                    "smlabb  {a1}, {t0}, {t1}, {a1}",
                    "smlatt  {a3}, {t0}, {t1}, {a3}",
                    a0 = inout(reg) a0,
                    a1 = inout(reg) a1,
                    a2 = inout(reg) a2,
                    a3 = inout(reg) a3,
                    x = in(reg) x.as_ptr(),
                    w = in(reg) w.as_ptr(),
                    step = in(reg) step,
                    pair = in(reg) pair,
                    t0 = out(reg) _,
                    t1 = out(reg) _,
                    t2 = out(reg) _,
                    t3 = out(reg) _,
                    options(nostack, readonly),
                );
            }
            *acc = [a0, a1, a2, a3];
        }

        /// One interior 3x3 depthwise window for 4 channels: `acc[j] = sum over taps (fy, fx)
        /// of (x[fy * w.row + fx * step + j] + off) * weight`, with the weights pre-packed in `w`.
        #[inline(always)]
        pub fn window3x3(x: &[i8], w: &super::Window3x3, step: usize, pair: u32) -> [i32; 4] {
            // The reads below: 4 bytes at fy * row + fx * step for fy, fx in 0..3 (panics here,
            // before any read, if `x` is shorter than the last of them).
            let _ = &x[2 * w.row as usize + 2 * step..][..4];
            let (mut a0, mut a1, mut a2, mut a3) = (0i32, 0i32, 0i32, 0i32);
            // SAFETY: reads the 9 input words checked above (row base advanced by `w.row`,
            // read from the struct at offset 72, which is the value the check used; LDR allows
            // unaligned addresses on ARMv7-M) and words 0..19 of `w` (LDRD needs word alignment:
            // `w` is `repr(C)` of u32). Writes only the accumulators, the row pointer (discarded)
            // and four scratch registers (`out`: distinct from every input); SMLABB/SMLATT may
            // set the sticky Q flag; no stack, no memory writes.
            unsafe {
                asm!(
                    "ldr     {t0}, [{x}]",
                    "ldrd    {u0}, {u1}, [{w}, #0]",
                    "sxtab16 {t1}, {pair}, {t0}",
                    "sxtab16 {t0}, {pair}, {t0}, ror #8",
                    "smlabb  {a0}, {t1}, {u0}, {a0}",
                    "smlatt  {a2}, {t1}, {u0}, {a2}",
                    "smlabb  {a1}, {t0}, {u1}, {a1}",
                    "smlatt  {a3}, {t0}, {u1}, {a3}",
                    "ldr     {t0}, [{x}, {step}]",
                    "ldrd    {u0}, {u1}, [{w}, #8]",
                    "sxtab16 {t1}, {pair}, {t0}",
                    "sxtab16 {t0}, {pair}, {t0}, ror #8",
                    "smlabb  {a0}, {t1}, {u0}, {a0}",
                    "smlatt  {a2}, {t1}, {u0}, {a2}",
                    "smlabb  {a1}, {t0}, {u1}, {a1}",
                    "smlatt  {a3}, {t0}, {u1}, {a3}",
                    "ldr     {t0}, [{x}, {step}, lsl #1]",
                    "ldrd    {u0}, {u1}, [{w}, #16]",
                    "sxtab16 {t1}, {pair}, {t0}",
                    "sxtab16 {t0}, {pair}, {t0}, ror #8",
                    "smlabb  {a0}, {t1}, {u0}, {a0}",
                    "smlatt  {a2}, {t1}, {u0}, {a2}",
                    "smlabb  {a1}, {t0}, {u1}, {a1}",
                    "smlatt  {a3}, {t0}, {u1}, {a3}",
                    "ldr     {u0}, [{w}, #72]",
                    "add     {x}, {x}, {u0}",
                    "ldr     {t0}, [{x}]",
                    "ldrd    {u0}, {u1}, [{w}, #24]",
                    "sxtab16 {t1}, {pair}, {t0}",
                    "sxtab16 {t0}, {pair}, {t0}, ror #8",
                    "smlabb  {a0}, {t1}, {u0}, {a0}",
                    "smlatt  {a2}, {t1}, {u0}, {a2}",
                    "smlabb  {a1}, {t0}, {u1}, {a1}",
                    "smlatt  {a3}, {t0}, {u1}, {a3}",
                    "ldr     {t0}, [{x}, {step}]",
                    "ldrd    {u0}, {u1}, [{w}, #32]",
                    "sxtab16 {t1}, {pair}, {t0}",
                    "sxtab16 {t0}, {pair}, {t0}, ror #8",
                    "smlabb  {a0}, {t1}, {u0}, {a0}",
                    "smlatt  {a2}, {t1}, {u0}, {a2}",
                    "smlabb  {a1}, {t0}, {u1}, {a1}",
                    "smlatt  {a3}, {t0}, {u1}, {a3}",
                    "ldr     {t0}, [{x}, {step}, lsl #1]",
                    "ldrd    {u0}, {u1}, [{w}, #40]",
                    "sxtab16 {t1}, {pair}, {t0}",
                    "sxtab16 {t0}, {pair}, {t0}, ror #8",
                    "smlabb  {a0}, {t1}, {u0}, {a0}",
                    "smlatt  {a2}, {t1}, {u0}, {a2}",
                    "smlabb  {a1}, {t0}, {u1}, {a1}",
                    "smlatt  {a3}, {t0}, {u1}, {a3}",
                    "ldr     {u0}, [{w}, #72]",
                    "add     {x}, {x}, {u0}",
                    "ldr     {t0}, [{x}]",
                    "ldrd    {u0}, {u1}, [{w}, #48]",
                    "sxtab16 {t1}, {pair}, {t0}",
                    "sxtab16 {t0}, {pair}, {t0}, ror #8",
                    "smlabb  {a0}, {t1}, {u0}, {a0}",
                    "smlatt  {a2}, {t1}, {u0}, {a2}",
                    "smlabb  {a1}, {t0}, {u1}, {a1}",
                    "smlatt  {a3}, {t0}, {u1}, {a3}",
                    "ldr     {t0}, [{x}, {step}]",
                    "ldrd    {u0}, {u1}, [{w}, #56]",
                    "sxtab16 {t1}, {pair}, {t0}",
                    "sxtab16 {t0}, {pair}, {t0}, ror #8",
                    "smlabb  {a0}, {t1}, {u0}, {a0}",
                    "smlatt  {a2}, {t1}, {u0}, {a2}",
                    "smlabb  {a1}, {t0}, {u1}, {a1}",
                    "smlatt  {a3}, {t0}, {u1}, {a3}",
                    "ldr     {t0}, [{x}, {step}, lsl #1]",
                    "ldrd    {u0}, {u1}, [{w}, #64]",
                    "sxtab16 {t1}, {pair}, {t0}",
                    "sxtab16 {t0}, {pair}, {t0}, ror #8",
                    "smlabb  {a0}, {t1}, {u0}, {a0}",
                    "smlatt  {a2}, {t1}, {u0}, {a2}",
                    "smlabb  {a1}, {t0}, {u1}, {a1}",
                    "smlatt  {a3}, {t0}, {u1}, {a3}",
                    a0 = inout(reg) a0,
                    a1 = inout(reg) a1,
                    a2 = inout(reg) a2,
                    a3 = inout(reg) a3,
                    x = inout(reg) x.as_ptr() => _,
                    w = in(reg) w as *const super::Window3x3,
                    step = in(reg) step,
                    pair = in(reg) pair,
                    t0 = out(reg) _,
                    t1 = out(reg) _,
                    u0 = out(reg) _,
                    u1 = out(reg) _,
                    options(nostack, readonly),
                );
            }
            [a0, a1, a2, a3]
        }
    }

    /// The instructions' semantics in plain Rust (ARMv7-M ARM, A7.7), for other targets.
    #[cfg(not(kiln_arm_dsp))]
    #[allow(dead_code)]
    mod emulated {
        #[inline(always)]
        fn lo(x: u32) -> i32 {
            i32::from(x as u16 as i16)
        }
        #[inline(always)]
        fn hi(x: u32) -> i32 {
            i32::from((x >> 16) as u16 as i16)
        }
        #[inline(always)]
        fn pack(lo: u32, hi: u32) -> u32 {
            (lo & 0xffff) | (hi << 16)
        }

        pub fn sxtb16(x: u32) -> u32 {
            pack(x as u8 as i8 as u32, (x >> 16) as u8 as i8 as u32)
        }
        pub fn sxtb16_ror8(x: u32) -> u32 {
            sxtb16(x.rotate_right(8))
        }
        pub fn sxtab16(a: u32, x: u32) -> u32 {
            let s = sxtb16(x);
            pack(
                (lo(a) as u32).wrapping_add(lo(s) as u32),
                (hi(a) as u32).wrapping_add(hi(s) as u32),
            )
        }
        pub fn sxtab16_ror8(a: u32, x: u32) -> u32 {
            sxtab16(a, x.rotate_right(8))
        }
        pub fn smlad(a: u32, b: u32, acc: i32) -> i32 {
            acc.wrapping_add(lo(a) * lo(b)).wrapping_add(hi(a) * hi(b))
        }
        pub fn smlabb(a: u32, b: u32, acc: i32) -> i32 {
            acc.wrapping_add(lo(a) * lo(b))
        }
        pub fn smlatt(a: u32, b: u32, acc: i32) -> i32 {
            acc.wrapping_add(hi(a) * hi(b))
        }

        /// One interior 3x3 depthwise window (see the `asm!` version).
        pub fn window3x3(x: &[i8], w: &super::Window3x3, step: usize, pair: u32) -> [i32; 4] {
            let mut acc = [0i32; 4];
            for t in 0..9 {
                let at = (t / 3) * w.row as usize + (t % 3) * step;
                let xv = &x[at..][..4];
                let xv = u32::from_le_bytes([xv[0] as u8, xv[1] as u8, xv[2] as u8, xv[3] as u8]);
                let (xa, xb) = (sxtab16(pair, xv), sxtab16_ror8(pair, xv));
                let (wa, wb) = (w.words[2 * t], w.words[2 * t + 1]);
                acc[0] = smlabb(xa, wa, acc[0]);
                acc[2] = smlatt(xa, wa, acc[2]);
                acc[1] = smlabb(xb, wb, acc[1]);
                acc[3] = smlatt(xb, wb, acc[3]);
            }
            acc
        }

        /// Three depthwise taps of one filter row (see the `asm!` version).
        pub fn row3(acc: &mut [i32; 4], x: &[i8], w: &[i8], step: usize, pair: u32) {
            for t in 0..3 {
                let xv = &x[t * step..][..4];
                let wv = &w[t * step..][..4];
                let xv = u32::from_le_bytes([xv[0] as u8, xv[1] as u8, xv[2] as u8, xv[3] as u8]);
                let wv = u32::from_le_bytes([wv[0] as u8, wv[1] as u8, wv[2] as u8, wv[3] as u8]);
                let (xa, xb) = (sxtab16(pair, xv), sxtab16_ror8(pair, xv));
                let (wa, wb) = (sxtb16(wv), sxtb16_ror8(wv));
                acc[0] = smlabb(xa, wa, acc[0]);
                acc[2] = smlatt(xa, wa, acc[2]);
                acc[1] = smlabb(xb, wb, acc[1]);
                acc[3] = smlatt(xb, wb, acc[3]);
            }
        }

        /// The 2x2 CONV_2D block (see the `asm!` version), group by group.
        pub fn block_2x2(x: &[u32], w0: &[i8], w1: &[i8]) -> [i32; 4] {
            let mut a = [0i32; 4];
            for ((x, w0), w1) in x
                .chunks_exact(4)
                .zip(w0.chunks_exact(4))
                .zip(w1.chunks_exact(4))
            {
                let w0 = u32::from_le_bytes([w0[0] as u8, w0[1] as u8, w0[2] as u8, w0[3] as u8]);
                let w1 = u32::from_le_bytes([w1[0] as u8, w1[1] as u8, w1[2] as u8, w1[3] as u8]);
                for (r, w) in [(0, w0), (2, w1)] {
                    let (wa, wb) = (sxtb16(w), sxtb16_ror8(w));
                    a[r] = smlad(x[2], wb, smlad(x[0], wa, a[r]));
                    a[r + 1] = smlad(x[3], wb, smlad(x[1], wa, a[r + 1]));
                }
            }
            a
        }
    }
}

use dsp::{
    block_2x2, row3, smlabb, smlad, smlatt, sxtab16, sxtab16_ror8, sxtb16, sxtb16_ror8, window3x3,
    Window3x3,
};

/// The first four int8 of `b` as one little-endian word: one unaligned LDR on ARMv7-M (which
/// allows unaligned word loads; LLVM does not merge four byte loads into one by itself).
#[inline(always)]
fn word(b: &[i8]) -> u32 {
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
/// 24 bytes each).
const CHANNELS: usize = 64;

/// One output channel's bias and requantization, decoded once per kernel call and applied to
/// every output of the channel: [`requantize`] with the left shift as a multiplier, and the
/// rounding right shift's mask prepared. Only for [`super::usual_requant`] parameters.
#[derive(Clone, Copy, Default)]
struct Channel {
    /// `bias * scale` (wrapping): `(acc + bias) * scale` is `acc * scale + bias * scale` modulo
    /// 2^32, one multiply-add.
    bias_scaled: i32,
    /// `2^left_shift` (wrapping: `i32::MIN` for 31), so that `acc * scale` is TFLM's
    /// `acc * (1 << left_shift)`.
    scale: i32,
    multiplier: i32,
    right: u32,
    mask: i32,
    half: i32,
}

/// The output stage shared by all channels: zero point and clamp.
#[derive(Clone, Copy)]
struct OutputStage {
    zero_point: i32,
    min: i32,
    max: i32,
}

impl OutputStage {
    fn new(q: &QuantizedOutput<'_>) -> Self {
        OutputStage {
            zero_point: q.output_zero_point,
            min: i32::from(q.clamp.min),
            max: i32::from(q.clamp.max),
        }
    }
}

impl Channel {
    /// Channel `oc` of `q` (per-tensor when `q.requant` has one entry); `q` must pass
    /// [`super::usual_requant`].
    fn new(oc: usize, bias: Option<&[i32]>, q: &QuantizedOutput<'_>) -> Self {
        let r = if q.requant.len() > 1 {
            q.requant[oc]
        } else {
            q.requant[0]
        };
        debug_assert!(r.multiplier != i32::MIN && (-31..=30).contains(&r.shift));
        let right = (-r.shift).clamp(0, 31) as u32;
        let mask = ((1u64 << right) - 1) as i32;
        let scale = 1i32.wrapping_shl(r.shift.clamp(0, 31) as u32);
        Channel {
            bias_scaled: bias.map_or(0, |b| b[oc]).wrapping_mul(scale),
            scale,
            multiplier: r.multiplier,
            right,
            mask,
            half: mask >> 1,
        }
    }

    /// Decodes channels `oc0 .. oc0 + out.len()` into `out`.
    fn fill(out: &mut [Channel], oc0: usize, bias: Option<&[i32]>, q: &QuantizedOutput<'_>) {
        for (j, c) in out.iter_mut().enumerate() {
            *c = Channel::new(oc0 + j, bias, q);
        }
    }

    /// The output byte of accumulator `acc` (bias not yet added): exactly
    /// `conv::requantize(acc + bias, ...)`. `high` is [`requantize`]'s high multiply (the
    /// multiplier is not `i32::MIN`, so it never saturates); the rounding right shift is
    /// `crate::quant::rounding_divide_by_pot` with its mask precomputed (`threshold = half +
    /// (high < 0)`).
    #[inline(always)]
    fn apply(&self, acc: i32, o: OutputStage) -> i8 {
        let x = acc.wrapping_mul(self.scale).wrapping_add(self.bias_scaled);
        let high = ((i64::from(x) * i64::from(self.multiplier) + (1i64 << 30)) >> 31) as i32;
        let threshold = self.half - (high >> 31);
        let v = (high >> self.right) + i32::from((high & self.mask) > threshold);
        v.wrapping_add(o.zero_point).max(o.min).min(o.max) as i8
    }
}

/// Word index and bit shift of patch element `k` of column `col` (0 or 1) in the two-column
/// buffer: element group `k / 4` owns words `4 * (k / 4) ..+ 4` = `[A col0, A col1, B col0,
/// B col1]`, with `A = [v0, v2]`, `B = [v1, v3]` (low half first).
#[inline(always)]
fn slot(k: usize, col: usize) -> (usize, u32) {
    (4 * (k / 4) + 2 * (k & 1) + col, 16 * ((k >> 1) & 1) as u32)
}

/// Writes the int16 `v` into patch element `k` of column `col`.
#[inline(always)]
fn put(buf: &mut [u32], k: usize, col: usize, v: i32) {
    let (w, s) = slot(k, col);
    buf[w] = (buf[w] & !(0xffff << s)) | ((v as u16 as u32) << s);
}

/// Reads patch element `k` of column `col`.
#[inline(always)]
fn get(buf: &[u32], k: usize, col: usize) -> i32 {
    let (w, s) = slot(k, col);
    i32::from((buf[w] >> s) as u16 as i16)
}

/// Fills column `col` of `buf` with the receptive field of flattened output pixel `p`, in the
/// filter's `(fy, fx, c)` order, as `x - input_zero_point` (0 for padding taps).
#[allow(clippy::too_many_arguments)]
fn fill_column(g: &ConvGeometry, input: &[i8], off: i32, p: usize, col: usize, buf: &mut [u32]) {
    let fic = g.filter_in_c;
    let px_per_image = g.out_h * g.out_w;
    let (b, rest) = (p / px_per_image, p % px_per_image);
    let (oy, ox) = (rest / g.out_w, rest % g.out_w);
    let in_y0 = (oy * g.stride_h) as isize - g.pad_top as isize;
    let in_x0 = (ox * g.stride_w) as isize - g.pad_left as isize;
    let pair = offset_pair(off);
    let mut k0 = 0;
    // Staging of the generic path: `staged` elements of the group starting at element `group`.
    let (mut stage, mut staged, mut group) = ([0i32; 4], 0usize, 0usize);
    for fy in 0..g.filter_h {
        let iy = in_y0 + (g.dilation_h * fy) as isize;
        for fx in 0..g.filter_w {
            let ix = in_x0 + (g.dilation_w * fx) as isize;
            let inside = iy >= 0 && (iy as usize) < g.in_h && ix >= 0 && (ix as usize) < g.in_w;
            let x = if inside {
                let at = ((b * g.in_h + iy as usize) * g.in_w + ix as usize) * g.in_c;
                Some(&input[at..][..fic])
            } else {
                None
            };
            if fic.is_multiple_of(4) {
                // k0 is a multiple of 4: whole element groups, words k0 .. k0 + fic.
                let dst = buf[k0..k0 + fic].chunks_exact_mut(4);
                match x {
                    Some(x) => {
                        for (d, x4) in dst.zip(x.chunks_exact(4)) {
                            let w = word(x4);
                            d[col] = sxtab16(pair, w);
                            d[2 + col] = sxtab16_ror8(pair, w);
                        }
                    }
                    None => {
                        for d in dst {
                            d[col] = 0;
                            d[2 + col] = 0;
                        }
                    }
                }
            } else {
                // Channel counts that are not a multiple of 4 (first layers: 1 or 3): elements
                // are staged 4 at a time and stored as their two packed words.
                let mut emit = |v: i32| {
                    stage[staged] = v;
                    staged += 1;
                    if staged == 4 {
                        buf[group + col] = pack(stage[0], stage[2]);
                        buf[group + 2 + col] = pack(stage[1], stage[3]);
                        group += 4;
                        staged = 0;
                    }
                };
                match x {
                    Some(x) => x.iter().for_each(|&v| emit(i32::from(v) + off)),
                    None => (0..fic).for_each(|_| emit(0)),
                }
            }
            k0 += fic;
        }
    }
    // The last, partial group (patch length not a multiple of 4): element by element.
    for (j, &v) in stage[..staged].iter().enumerate() {
        put(buf, group + j, col, v);
    }
}

/// Two int16 values as one word, `lo` in the low half.
#[inline(always)]
fn pack(lo: i32, hi: i32) -> u32 {
    (lo as u32 & 0xffff) | ((hi as u32) << 16)
}

/// int8 CONV_2D, Cortex-M DSP body: bit-exact with [`conv::conv2d_i8_portable`].
///
/// Handled: `groups == 1`, patch (`filter_h * filter_w * in_c`) of at most [`MAX_PATCH`]
/// elements, any stride, dilation and padding (1x1, 3x3 and the rest). Output pixels go in pairs
/// (over the flattened batch, rows and columns); for each pair the two patches are packed into
/// the stack buffer, then every pair of output channels runs a 2x2 block: per 4 patch elements,
/// 2 weight loads, 4 SXTB16 and 8 SMLAD on the 4 packed input words (16 MACs). An odd last pixel
/// or channel runs the same block with its partner's results dropped; patch tails of fewer than
/// 4 elements are summed one by one.
pub fn conv2d_i8(
    g: &ConvGeometry,
    q: &QuantizedOutput<'_>,
    input: &[i8],
    filter: &[i8],
    bias: Option<&[i32]>,
    output: &mut [i8],
) {
    let k = g.filter_h * g.filter_w * g.filter_in_c;
    let off = match input_offset(q.input_zero_point) {
        Some(off)
            if g.filter_in_c == g.in_c
                && k <= MAX_PATCH
                && k > 0
                && g.out_c > 0
                && super::usual_requant(q.requant) =>
        {
            off
        }
        _ => return conv::conv2d_i8_portable(g, q, input, filter, bias, output),
    };
    debug_assert_eq!(filter.len(), g.out_c * k);
    debug_assert_eq!(output.len(), g.batch * g.out_h * g.out_w * g.out_c);
    let pixels = g.batch * g.out_h * g.out_w;
    let out_c = g.out_c;
    let whole = 4 * (k / 4);
    let stage = OutputStage::new(q);
    let mut buf = [0u32; MAX_PATCH];
    let mut channels = [Channel::default(); CHANNELS];
    let (mut acc, mut acc1) = ([0i32; CHANNELS], [0i32; CHANNELS]);
    // Output channels in chunks of CHANNELS (their requantization decoded once); each chunk
    // walks all pixel pairs (re-packing a pair's patches costs far less than its MACs).
    let mut oc_lo = 0;
    while oc_lo < out_c {
        let n = core::cmp::min(CHANNELS, out_c - oc_lo);
        let channels = &mut channels[..n];
        Channel::fill(channels, oc_lo, bias, q);
        let mut p = 0;
        while p < pixels {
            let two = p + 1 < pixels;
            fill_column(g, input, off, p, 0, &mut buf);
            if two {
                fill_column(g, input, off, p + 1, 1, &mut buf);
            }
            let body = &buf[..whole];
            let base = p * out_c + oc_lo;
            // Weight rows of this chunk in pairs; raw sums go to `acc` (column 0) and `acc1`
            // (column 1), requantized below.
            let rows = &filter[oc_lo * k..(oc_lo + n) * k];
            let tail = |w0: &[i8], w1: &[i8], mut a: [i32; 4]| {
                for t in whole..k {
                    let (x0, x1) = (get(&buf, t, 0), get(&buf, t, 1));
                    let (v0, v1) = (i32::from(w0[t]), i32::from(w1[t]));
                    a[0] = a[0].wrapping_add(x0 * v0);
                    a[1] = a[1].wrapping_add(x1 * v0);
                    a[2] = a[2].wrapping_add(x0 * v1);
                    a[3] = a[3].wrapping_add(x1 * v1);
                }
                a
            };
            let mut pairs = rows.chunks_exact(2 * k);
            for ((w01, s0), s1) in (&mut pairs)
                .zip(acc.chunks_exact_mut(2))
                .zip(acc1.chunks_exact_mut(2))
            {
                let (w0, w1) = w01.split_at(k);
                let [a00, a01, a10, a11] = tail(w0, w1, block_2x2(body, w0, w1));
                s0[0] = a00;
                s0[1] = a10;
                s1[0] = a01;
                s1[1] = a11;
            }
            // An odd last channel runs the block with itself as the partner.
            let last = pairs.remainder();
            if !last.is_empty() {
                let [a00, a01, _, _] = tail(last, last, block_2x2(body, last, last));
                acc[n - 1] = a00;
                acc1[n - 1] = a01;
            }
            let out = &mut output[base..][..n];
            for ((o, &a), ch) in out.iter_mut().zip(&acc[..n]).zip(channels.iter()) {
                *o = ch.apply(a, stage);
            }
            if two {
                let out = &mut output[base + out_c..][..n];
                for ((o, &a), ch) in out.iter_mut().zip(&acc1[..n]).zip(channels.iter()) {
                    *o = ch.apply(a, stage);
                }
            }
            p += 2;
        }
        oc_lo += n;
    }
}

/// int8 DEPTHWISE_CONV_2D, Cortex-M DSP body: bit-exact with
/// [`depthwise::depthwise_conv2d_i8_portable`].
///
/// Handled: `depth_multiplier == 1` with a channel count that is a multiple of 4. For each output
/// pixel and each 4 channels, 4 accumulators stay in registers over the in-image taps (padding
/// taps are skipped, as in the portable body); per tap: 2 word loads, 2 SXTAB16 (input + offset),
/// 2 SXTB16 (weights), SMLABB/SMLATT for the 4 channels.
pub fn depthwise_conv2d_i8(
    g: &ConvGeometry,
    q: &QuantizedOutput<'_>,
    input: &[i8],
    filter: &[i8],
    bias: Option<&[i32]>,
    output: &mut [i8],
) {
    let off = match input_offset(q.input_zero_point) {
        Some(off)
            if g.depth_multiplier == 1
                && g.in_c.is_multiple_of(4)
                && g.out_c == g.in_c
                && super::usual_requant(q.requant) =>
        {
            off
        }
        _ => return depthwise::depthwise_conv2d_i8_portable(g, q, input, filter, bias, output),
    };
    debug_assert_eq!(filter.len(), g.filter_h * g.filter_w * g.out_c);
    let pair = offset_pair(off);
    let c = g.in_c;
    let stage = OutputStage::new(q);
    let (xs, ws) = (g.dilation_w * c, c);
    // 3x3 windows without dilation whose 9 taps are all in the image run the unrolled window
    // with weights packed once per 4 channels; the others sum their in-image taps row by row.
    // `window3` needs the input zero point as an int8 (the value of a padding tap): true for
    // every int8 tensor.
    let pad_word = i8::try_from(-off)
        .ok()
        .map(|zp| u32::from(zp as u8) * 0x0101_0101);
    let window3 = g.filter_h == 3
        && g.filter_w == 3
        && g.dilation_h == 1
        && g.dilation_w == 1
        && g.in_w * c <= u32::MAX as usize
        && pad_word.is_some();
    if let (true, Some(fill)) = (window3, pad_word) {
        return depthwise_3x3(g, input, filter, bias, q, output, pair, fill);
    }
    // Other filters: channels in groups of 4 (outer loop: their requantization decoded once),
    // then every output pixel with 4 accumulators in registers over its in-image taps.
    let mut c0 = 0;
    while c0 < c {
        let ch = [0, 1, 2, 3].map(|j| Channel::new(c0 + j, bias, q));
        let mut out_at = c0;
        for b in 0..g.batch {
            for oy in 0..g.out_h {
                let in_y0 = (oy * g.stride_h) as isize - g.pad_top as isize;
                let (fy0, fy1) = tap_range(in_y0, g.dilation_h, g.filter_h, g.in_h);
                for ox in 0..g.out_w {
                    let in_x0 = (ox * g.stride_w) as isize - g.pad_left as isize;
                    let (fx0, fx1) = tap_range(in_x0, g.dilation_w, g.filter_w, g.in_w);
                    let (mut a0, mut a1, mut a2, mut a3) = (0i32, 0i32, 0i32, 0i32);
                    // All three taps of a row in the image, adjacent: the unrolled row.
                    let row_of_3 = fx1 - fx0 == 3 && g.dilation_w == 1;
                    if fx1 > fx0 {
                        let ix0 = (in_x0 + (g.dilation_w * fx0) as isize) as usize;
                        for fy in fy0..fy1 {
                            let iy = (in_y0 + (g.dilation_h * fy) as isize) as usize;
                            let x_row = &input[((b * g.in_h + iy) * g.in_w + ix0) * c + c0..];
                            let w_row = &filter[(fy * g.filter_w + fx0) * c + c0..];
                            if row_of_3 {
                                let mut acc = [a0, a1, a2, a3];
                                row3(&mut acc, x_row, w_row, c, pair);
                                [a0, a1, a2, a3] = acc;
                                continue;
                            }
                            for (x, w) in x_row.chunks(xs).zip(w_row.chunks(ws)).take(fx1 - fx0) {
                                let (x, w) = (word(x), word(w));
                                let (xa, xb) = (sxtab16(pair, x), sxtab16_ror8(pair, x));
                                let (wa, wb) = (sxtb16(w), sxtb16_ror8(w));
                                a0 = smlabb(xa, wa, a0);
                                a2 = smlatt(xa, wa, a2);
                                a1 = smlabb(xb, wb, a1);
                                a3 = smlatt(xb, wb, a3);
                            }
                        }
                    }
                    let out = &mut output[out_at..][..4];
                    out[0] = ch[0].apply(a0, stage);
                    out[1] = ch[1].apply(a1, stage);
                    out[2] = ch[2].apply(a2, stage);
                    out[3] = ch[3].apply(a3, stage);
                    out_at += c;
                }
            }
        }
        c0 += 4;
    }
}

/// Channels of the 3x3 depthwise path decoded at once (their [`Channel`]s and two packed
/// windows per 4 channels: 24 + 2 * 76 / 4 = 62 bytes of stack per channel).
const DW_CHANNELS: usize = 32;

/// The 3x3 depthwise path (no dilation, `depth_multiplier == 1`, channels a multiple of 4):
/// channels in chunks of [`DW_CHANNELS`] whose weights are packed and requantization decoded
/// once; every output pixel (outer loop) then runs [`window3x3`] for each 4 channels, straight
/// from the input when the window lies inside it, else over a 3x3 patch holding the in-image
/// taps and `pad` (the input zero point in all 4 bytes) elsewhere, which adds exactly 0.
#[allow(clippy::too_many_arguments)]
fn depthwise_3x3(
    g: &ConvGeometry,
    input: &[i8],
    filter: &[i8],
    bias: Option<&[i32]>,
    q: &QuantizedOutput<'_>,
    output: &mut [i8],
    pair: u32,
    pad: u32,
) {
    let c = g.in_c;
    let stage = OutputStage::new(q);
    let mut channels = [Channel::default(); DW_CHANNELS];
    let mut windows = [Window3x3::default(); DW_CHANNELS / 4];
    let mut patch_windows = [Window3x3::default(); DW_CHANNELS / 4];
    let mut c_lo = 0;
    while c_lo < c {
        let n = core::cmp::min(DW_CHANNELS, c - c_lo);
        Channel::fill(&mut channels[..n], c_lo, bias, q);
        for (j, (win, pwin)) in windows[..n / 4]
            .iter_mut()
            .zip(patch_windows[..n / 4].iter_mut())
            .enumerate()
        {
            let c0 = c_lo + 4 * j;
            for t in 0..9 {
                let w = word(&filter[t * c + c0..]);
                win.words[2 * t] = sxtb16(w);
                win.words[2 * t + 1] = sxtb16_ror8(w);
            }
            win.row = (g.in_w * c) as u32;
            *pwin = Window3x3 { row: 12, ..*win };
        }
        let mut out_at = c_lo;
        for b in 0..g.batch {
            for oy in 0..g.out_h {
                let in_y0 = (oy * g.stride_h) as isize - g.pad_top as isize;
                let (fy0, fy1) = tap_range(in_y0, 1, 3, g.in_h);
                for ox in 0..g.out_w {
                    let in_x0 = (ox * g.stride_w) as isize - g.pad_left as isize;
                    let (fx0, fx1) = tap_range(in_x0, 1, 3, g.in_w);
                    let out = &mut output[out_at..][..n];
                    let groups = out
                        .chunks_exact_mut(4)
                        .zip(channels[..n].chunks_exact(4))
                        .enumerate();
                    if fy1 - fy0 == 3 && fx1 - fx0 == 3 {
                        let at = ((b * g.in_h + in_y0 as usize) * g.in_w + in_x0 as usize) * c;
                        let x = &input[at + c_lo..];
                        for (j, (o, ch)) in groups {
                            let acc = window3x3(&x[4 * j..], &windows[j], c, pair);
                            for ((o, ch), a) in o.iter_mut().zip(ch).zip(acc) {
                                *o = ch.apply(a, stage);
                            }
                        }
                    } else {
                        for (j, (o, ch)) in groups {
                            let c0 = c_lo + 4 * j;
                            let mut patch = [pad; 9];
                            for fy in fy0..fy1 {
                                let iy = (in_y0 + fy as isize) as usize;
                                let row = ((b * g.in_h + iy) * g.in_w) as isize + in_x0;
                                for fx in fx0..fx1 {
                                    let at = (row + fx as isize) as usize * c + c0;
                                    patch[fy * 3 + fx] = word(&input[at..]);
                                }
                            }
                            let bytes: &[i8] = bytemuck::cast_slice(&patch);
                            let acc = window3x3(bytes, &patch_windows[j], 4, pair);
                            for ((o, ch), a) in o.iter_mut().zip(ch).zip(acc) {
                                *o = ch.apply(a, stage);
                            }
                        }
                    }
                    out_at += c;
                }
            }
        }
        c_lo += n;
    }
}

/// int8 FULLY_CONNECTED, Cortex-M DSP body: bit-exact with
/// [`fully_connected::fully_connected_i8_portable`].
///
/// Handled: symmetric weights (`filter_zero_point == 0`) and at most [`MAX_FC_FEATURES`] input
/// features. Each input row is packed once (int16 with the offset added); then rows of the
/// weights go in pairs: per 4 features, 2 weight loads, 4 SXTB16 and 4 SMLAD (8 MACs).
pub fn fully_connected_i8(
    g: &FullyConnectedGeometry,
    q: &QuantizedOutput<'_>,
    input: &[i8],
    weights: &[i8],
    bias: Option<&[i32]>,
    output: &mut [i8],
) {
    let n = g.in_features;
    let off = match input_offset(q.input_zero_point) {
        Some(off)
            if q.filter_zero_point == 0
                && n <= MAX_FC_FEATURES
                && g.out_features > 0
                && super::usual_requant(q.requant) =>
        {
            off
        }
        _ => {
            return fully_connected::fully_connected_i8_portable(g, q, input, weights, bias, output)
        }
    };
    let pair = offset_pair(off);
    let whole = 4 * (n / 4);
    let outs = g.out_features;
    let stage = OutputStage::new(q);
    let mut buf = [0u32; MAX_PATCH];
    for b in 0..g.batch {
        let x = &input[b * n..][..n];
        // Group j of 4 features -> words 2j (A) and 2j + 1 (B).
        for (d, x4) in buf.chunks_exact_mut(2).zip(x.chunks_exact(4)) {
            let w = word(x4);
            d[0] = sxtab16(pair, w);
            d[1] = sxtab16_ror8(pair, w);
        }
        let packed = &buf[..whole / 2];
        let tail = &x[whole..];
        let out = &mut output[b * outs..][..outs];
        let mut o = 0;
        while o < outs {
            let o1 = if o + 1 < outs { o + 1 } else { o };
            let w0 = &weights[o * n..][..n];
            let w1 = &weights[o1 * n..][..n];
            let (mut a0, mut a1) = (0i32, 0i32);
            for ((x, w0), w1) in packed
                .chunks_exact(2)
                .zip(w0.chunks_exact(4))
                .zip(w1.chunks_exact(4))
            {
                let (w0, w1) = (word(w0), word(w1));
                a0 = smlad(x[0], sxtb16(w0), a0);
                a0 = smlad(x[1], sxtb16_ror8(w0), a0);
                a1 = smlad(x[0], sxtb16(w1), a1);
                a1 = smlad(x[1], sxtb16_ror8(w1), a1);
            }
            for (j, &xv) in tail.iter().enumerate() {
                let xv = i32::from(xv) + off;
                a0 = a0.wrapping_add(xv * i32::from(w0[whole + j]));
                a1 = a1.wrapping_add(xv * i32::from(w1[whole + j]));
            }
            out[o] = Channel::new(o, bias, q).apply(a0, stage);
            if o1 != o {
                out[o1] = Channel::new(o1, bias, q).apply(a1, stage);
            }
            o += 2;
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use crate::kernels::arch::cases::{acc, case, fc_case, EDGE_ACCS, EDGE_MULTIPLIERS};
    use crate::kernels::conv::tests::{clamp, requant, zero_point};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn conv_fast_path_is_bit_exact(c in case(false)) {
            let (fast, want) = c.run_conv(conv2d_i8);
            prop_assert_eq!(fast, want);
        }

        #[test]
        fn depthwise_fast_path_is_bit_exact(c in case(true)) {
            let (fast, want) = c.run_depthwise(depthwise_conv2d_i8);
            prop_assert_eq!(fast, want);
        }

        #[test]
        fn fully_connected_fast_path_is_bit_exact(c in fc_case()) {
            let (fast, want) = c.run(fully_connected_i8);
            prop_assert_eq!(fast, want);
        }

        #[test]
        fn requantize_matches_portable(
            acc in acc(),
            r in prop_oneof![
                requant(),
                (any::<i32>(), -31i32..=2).prop_map(|(multiplier, shift)| Requant { multiplier, shift }),
                (-31i32..=0).prop_map(|shift| Requant { multiplier: i32::MIN, shift }),
            ],
            zp in zero_point(),
            clamp in clamp(),
        ) {
            prop_assert_eq!(requantize(acc, r, zp, clamp), conv::requantize(acc, r, zp, clamp));
        }

        #[test]
        fn channel_matches_portable(
            acc in acc(),
            bias in prop_oneof![Just(None), any::<i32>().prop_map(Some)],
            r in prop_oneof![
                requant(),
                (any::<i32>(), -31i32..=30).prop_map(|(multiplier, shift)| Requant { multiplier, shift }),
            ],
            zp in zero_point(),
            clamp in clamp(),
        ) {
            prop_assume!(r.multiplier != i32::MIN);
            let b = bias.map(|b| [b]);
            let rq = [r];
            let q = QuantizedOutput {
                input_zero_point: 0,
                filter_zero_point: 0,
                output_zero_point: zp,
                requant: &rq,
                clamp,
            };
            let want = conv::requantize(acc.wrapping_add(bias.unwrap_or(0)), r, zp, clamp);
            let got = Channel::new(0, b.as_ref().map(|b| &b[..]), &q).apply(acc, OutputStage::new(&q));
            prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn requantize_ties_and_extremes() {
        let full = ClampI8 {
            min: -128,
            max: 127,
        };
        for m in EDGE_MULTIPLIERS {
            for acc in EDGE_ACCS {
                for shift in -31..=1 {
                    let r = Requant {
                        multiplier: m,
                        shift,
                    };
                    assert_eq!(
                        requantize(acc, r, 0, full),
                        conv::requantize(acc, r, 0, full),
                        "acc {acc} m {m} shift {shift}"
                    );
                }
            }
        }
    }

    #[test]
    fn emulated_primitives_match_the_manual() {
        // SXTB16 / ROR 8 on bytes 0x80 0x7f 0xff 0x01 (little-endian word 0x01ff7f80).
        let w = 0x01ff_7f80u32;
        assert_eq!(sxtb16(w), 0xffff_ff80); // [-128, -1]
        assert_eq!(sxtb16_ror8(w), 0x0001_007f); // [127, 1]
        assert_eq!(sxtab16(offset_pair(128), w), 0x007f_0000); // [0, 127]
        assert_eq!(smlad(0x0002_0003, 0xffff_0005, 10), 10 + 15 - 2);
        assert_eq!(smlabb(0x0002_0003, 0xffff_0005, 1), 16);
        assert_eq!(smlatt(0x0002_0003, 0xffff_0005, 1), -1);
    }
}
