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
//! per call; the few loops that matter most are single `asm!` blocks (`block_2x2`, `dw_row3x3`,
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
    /// `words[2t + 1]` = SXTB16 ROR #8 of tap `t`'s 4 weights, taps in row-major order), `row`,
    /// the strip's row stride in bytes, and `advance`, the bytes from one window to the next.
    /// `repr(C)`: the `asm!` row reads `row` at byte offset 72 and `advance` at 76.
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    pub struct Window3x3 {
        pub words: [u32; 18],
        pub row: u32,
        pub advance: u32,
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

        /// SMMULR: `(a * b + 2^31) >> 32`, the rounded high word of the 64-bit product.
        #[inline(always)]
        pub fn smmulr(a: i32, b: i32) -> i32 {
            let d: i32;
            // SAFETY: one register-only instruction; no flags are changed.
            unsafe {
                asm!("smmulr {d}, {a}, {b}", d = lateout(reg) d, a = in(reg) a, b = in(reg) b,
                     options(pure, nomem, nostack, preserves_flags));
            }
            d
        }

        /// ASR by a register: `x >> s` (arithmetic) for `s` in `0..=31`, without the `& 31` that
        /// Rust's `>>` adds.
        #[inline(always)]
        pub fn asr(x: i32, s: u32) -> i32 {
            let d: i32;
            // SAFETY: one register-only instruction (ASR without S leaves the flags alone).
            unsafe {
                asm!("asr {d}, {x}, {s}", d = lateout(reg) d, x = in(reg) x, s = in(reg) s,
                     options(pure, nomem, nostack, preserves_flags));
            }
            d
        }

        /// SSAT #8: `x` clamped to `-128..=127`.
        #[inline(always)]
        pub fn ssat8(x: i32) -> i32 {
            let d: i32;
            // SAFETY: one register-only instruction; it may set the sticky Q flag, nothing
            // else, so `preserves_flags` is not claimed.
            unsafe {
                asm!("ssat {d}, #8, {x}", d = lateout(reg) d, x = in(reg) x,
                     options(pure, nomem, nostack));
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

        /// Every pair of output channels against one packed two-pixel patch, in one loop: for
        /// pair `p` in `0..sums.len()`, `sums[p] = [w0 . col0, w0 . col1, w1 . col0, w1 .
        /// col1]` over the patch's `groups` element groups (as [`block_2x2`]), with `w0 =
        /// rows[2pk..]`, `w1 = rows[(2p + 1)k..]`. `patch` holds the groups' `4 * groups` words
        /// and, after them, 5 words of loop state that this writes (so that 12 registers
        /// suffice): the patch's bytes, `k - 4 * groups`, `k`, and the sums' cursor and end.
        #[inline(always)]
        pub fn conv_rows(
            patch: &mut [u32],
            groups: usize,
            rows: &[i8],
            k: usize,
            sums: &mut [[i32; 4]],
        ) {
            let pairs = sums.len();
            if pairs == 0 || groups == 0 {
                sums.fill([0; 4]);
                return;
            }
            // The reads below: patch words 0..4 * groups + 5, and bytes [2pk, 2pk + 4 * groups)
            // and [(2p + 1)k, (2p + 1)k + 4 * groups) of `rows` for p < pairs (panics here,
            // before any access, if a slice is shorter or the groups exceed a row).
            assert!(4 * groups <= k, "patch groups exceed the filter rows");
            let _ = (&rows[..2 * pairs * k], &patch[..4 * groups + 5]);
            let sums_range = sums.as_mut_ptr_range();
            let (body, state) = patch.split_at_mut(4 * groups);
            state[0] = (16 * groups) as u32;
            state[1] = (k - 4 * groups) as u32;
            state[2] = k as u32;
            state[3] = sums_range.start as u32;
            state[4] = sums_range.end as u32;
            let end = state.as_mut_ptr();
            // SAFETY: per pair, the inner loop reads the 4 * groups patch words from
            // `body.as_ptr()` to `end` (LDRD, word-aligned) and 4 * groups bytes of each of the
            // pair's two rows (LDR, unaligned allowed), all checked above; w0 and w1 then move
            // to the next pair's rows (`+ k - 4 * groups` and `+ k`). It reads and writes the
            // 5 state words at `end` (inside `patch`) and writes 16 bytes per pair to
            // `sums[p]` through the cursor (STM of r0-r3 in register order), stopping at the
            // sums' end (pairs >= 1). Registers: r0-r3 (sums), the pointers (discarded), four
            // scratch registers; flags clobbered (CMP, Q). No stack.
            unsafe {
                asm!(
                    "3:",
                    "movs   r0, #0",
                    "movs   r1, #0",
                    "movs   r2, #0",
                    "movs   r3, #0",
                    "2:",
                    "ldr    {u0}, [{w0}], #4",
                    "sxtb16 {u1}, {u0}",
                    "sxtb16 {u0}, {u0}, ror #8",
                    "ldrd   {t0}, {t1}, [{x}]",
                    "smlad  r0, {t0}, {u1}, r0",
                    "smlad  r1, {t1}, {u1}, r1",
                    "ldrd   {t0}, {t1}, [{x}, #8]",
                    "smlad  r0, {t0}, {u0}, r0",
                    "smlad  r1, {t1}, {u0}, r1",
                    "ldr    {u0}, [{w1}], #4",
                    "sxtb16 {u1}, {u0}",
                    "sxtb16 {u0}, {u0}, ror #8",
                    "smlad  r2, {t0}, {u0}, r2",
                    "smlad  r3, {t1}, {u0}, r3",
                    "ldrd   {t0}, {t1}, [{x}], #16",
                    "smlad  r2, {t0}, {u1}, r2",
                    "smlad  r3, {t1}, {u1}, r3",
                    "cmp    {x}, {end}",
                    "bne    2b",
                    "ldrd   {t0}, {t1}, [{end}, #12]",
                    "stmia  {t0}!, {{r0, r1, r2, r3}}",
                    "str    {t0}, [{end}, #12]",
                    "cmp    {t0}, {t1}",
                    "beq    4f",
                    "ldr    {t0}, [{end}]",
                    "sub    {x}, {end}, {t0}",
                    "ldrd   {t0}, {t1}, [{end}, #4]",
                    "add    {w0}, {w1}, {t0}",
                    "add    {w1}, {w0}, {t1}",
                    "b      3b",
                    "4:",
                    x = inout(reg) body.as_ptr() => _,
                    w0 = inout(reg) rows.as_ptr() => _,
                    w1 = inout(reg) rows.as_ptr().wrapping_add(k) => _,
                    end = in(reg) end,
                    t0 = out(reg) _,
                    t1 = out(reg) _,
                    u0 = out(reg) _,
                    u1 = out(reg) _,
                    out("r0") _,
                    out("r1") _,
                    out("r2") _,
                    out("r3") _,
                    options(nostack),
                );
            }
        }

        /// The output stage of two pixels over full-range channels (no clamp besides int8):
        /// `out0[j] = saturated(channels[j], sums[j][0])`, `out1[j]` likewise with `sums[j][1]`,
        /// per channel one LDM of its 5 words (the `Channel` layout: scale, bias, multiplier,
        /// round, shift) and 8 instructions per output byte.
        #[inline(always)]
        pub fn store_two(
            out0: &mut [i8],
            out1: &mut [i8],
            sums: &[[i32; 2]],
            channels: &[super::super::Channel],
        ) {
            let n = channels.len();
            if n == 0 {
                return;
            }
            // The accesses below: n elements of each slice (panics here, before any, if one is
            // shorter).
            let (out0, out1, sums) = (&mut out0[..n], &mut out1[..n], &sums[..n]);
            let end = channels.as_ptr_range().end;
            // SAFETY: per channel j (`ch` advances 20 bytes per pass from `channels.as_ptr()`
            // to `end`, n >= 1 passes): reads the channel's 5 words (`Channel` is `repr(C)`, 5
            // u32/i32 fields, word-aligned) and sums[j] (two words), writes out0[j] and out1[j];
            // all inside the slices checked above. Registers: r0-r3 and r8 (the channel), the
            // pointers (discarded), two scratch registers; flags clobbered (CMP, Q). No stack.
            unsafe {
                asm!(
                    "2:",
                    "ldm    {ch}!, {{r0, r1, r2, r3, r8}}",
                    "ldr    {s}, [{sums}], #4",
                    "mla    {s}, {s}, r0, r1",
                    "smmulr {s}, {s}, r2",
                    "add    {t}, r3, {s}, lsl #1",
                    "add    {s}, {t}, {s}, asr #31",
                    "asr    {s}, {s}, r8",
                    "ssat   {s}, #8, {s}",
                    "strb   {s}, [{o0}], #1",
                    "ldr    {s}, [{sums}], #4",
                    "mla    {s}, {s}, r0, r1",
                    "smmulr {s}, {s}, r2",
                    "add    {t}, r3, {s}, lsl #1",
                    "add    {s}, {t}, {s}, asr #31",
                    "asr    {s}, {s}, r8",
                    "ssat   {s}, #8, {s}",
                    "strb   {s}, [{o1}], #1",
                    "cmp    {ch}, {end}",
                    "bne    2b",
                    ch = inout(reg) channels.as_ptr() => _,
                    sums = inout(reg) sums.as_ptr() => _,
                    o0 = inout(reg) out0.as_mut_ptr() => _,
                    o1 = inout(reg) out1.as_mut_ptr() => _,
                    end = in(reg) end,
                    s = out(reg) _,
                    t = out(reg) _,
                    out("r0") _,
                    out("r1") _,
                    out("r2") _,
                    out("r3") _,
                    out("r8") _,
                    options(nostack),
                );
            }
        }

        /// The full-range output stage of one channel over a row of depthwise windows:
        /// `out[p * stride] = saturated(ch, sums[p][lane])` for `p < sums.len()`, the channel's
        /// 5 words loaded once (LDM), 10 instructions per output byte.
        #[inline(always)]
        pub fn store_lane(
            out: &mut [i8],
            stride: usize,
            sums: &[[i32; 4]],
            lane: usize,
            ch: &super::super::Channel,
        ) {
            let n = sums.len();
            if n == 0 {
                return;
            }
            // The accesses below: out[(p * stride)] for p < n, sums[..n][lane] (panics here,
            // before any, if out is shorter or the lane is not one of 4).
            let _ = (&out[(n - 1) * stride], &sums[n - 1][lane]);
            let first = sums[0][lane..].as_ptr();
            let end = first.wrapping_add(4 * n);
            // SAFETY: per window p (`s` advances 16 bytes per pass from `&sums[0][lane]` to
            // `end`, n >= 1 passes; `o` by `stride` from `out.as_mut_ptr()`): reads sums[p][lane]
            // and writes out[p * stride], inside the slices checked above; reads the channel's
            // 5 words (`Channel` is `repr(C)`, word-aligned). Registers: r0-r3 and r8 (the
            // channel), the pointers (discarded), two scratch registers; flags clobbered (CMP,
            // Q). No stack.
            unsafe {
                asm!(
                    "ldm    {ch}, {{r0, r1, r2, r3, r8}}",
                    "2:",
                    "ldr    {v}, [{s}], #16",
                    "mla    {v}, {v}, r0, r1",
                    "smmulr {v}, {v}, r2",
                    "add    {t}, r3, {v}, lsl #1",
                    "add    {v}, {t}, {v}, asr #31",
                    "asr    {v}, {v}, r8",
                    "ssat   {v}, #8, {v}",
                    "strb   {v}, [{o}]",
                    "add    {o}, {o}, {st}",
                    "cmp    {s}, {end}",
                    "bne    2b",
                    ch = in(reg) ch as *const super::super::Channel,
                    s = inout(reg) first => _,
                    o = inout(reg) out.as_mut_ptr() => _,
                    st = in(reg) stride,
                    end = in(reg) end,
                    v = out(reg) _,
                    t = out(reg) _,
                    out("r0") _,
                    out("r1") _,
                    out("r2") _,
                    out("r3") _,
                    out("r8") _,
                    options(nostack),
                );
            }
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

        /// `n = dst.len() / 2` pixels of 4 channels, `c` bytes apart in `src`, expanded into
        /// the int16 strip layout: `dst[2i] = SXTAB16(pair, x_i)`, `dst[2i + 1] = SXTAB16(pair,
        /// x_i ROR 8)` for the little-endian word `x_i` at `src[i * c..]`.
        #[inline(always)]
        pub fn expand_row(src: &[i8], c: usize, pair: u32, dst: &mut [u32]) {
            let n = dst.len() / 2;
            if n == 0 {
                return;
            }
            // The reads below: 4 bytes at i * c for i < n (panics here, before any read, if the
            // last lies outside `src`).
            let _ = &src[(n - 1) * c..][..4];
            let end = dst[..2 * n].as_mut_ptr_range().end;
            // SAFETY: reads the n words checked above (LDR, unaligned allowed on ARMv7-M) and
            // writes dst[0..2n] (STRD, word-aligned: `dst` is `[u32]`; `d` advances 8 bytes
            // per pass from `dst.as_mut_ptr()` to `end`, n >= 1 passes). Registers: the two
            // pointers (discarded), three scratch registers; flags clobbered (CMP).
            unsafe {
                asm!(
                    "2:",
                    "ldr     {v}, [{s}]",
                    "add     {s}, {s}, {c}",
                    "sxtab16 {a}, {pair}, {v}",
                    "sxtab16 {v}, {pair}, {v}, ror #8",
                    "strd    {a}, {v}, [{d}], #8",
                    "cmp     {d}, {end}",
                    "bne     2b",
                    s = inout(reg) src.as_ptr() => _,
                    d = inout(reg) dst.as_mut_ptr() => _,
                    c = in(reg) c,
                    pair = in(reg) pair,
                    end = in(reg) end,
                    v = out(reg) _,
                    a = out(reg) _,
                    options(nostack),
                );
            }
        }

        /// `groups` groups of 4 int8 values of `src` into one column of a conv patch of `COLS`
        /// (2 or 4) columns: `dst[2 COLS j] = SXTAB16(pair, x_j)`, `dst[2 COLS j + COLS] =
        /// SXTAB16(pair, x_j ROR 8)` for the little-endian word `x_j = src[4j..4j + 4]` (the
        /// other columns' words are left alone).
        #[inline(always)]
        pub fn expand_col<const COLS: usize>(
            src: &[i8],
            groups: usize,
            pair: u32,
            dst: &mut [u32],
        ) {
            if groups == 0 {
                return;
            }
            // The accesses below: src[..4 * groups] and dst[..2 * COLS * groups - COLS + 1]
            // (panics here, before any, if a slice is shorter).
            let _ = (
                &src[..4 * groups],
                &dst[..2 * COLS * (groups - 1) + COLS + 1],
            );
            let end = dst.as_mut_ptr().wrapping_add(2 * COLS * groups);
            // SAFETY: per group j (`d` advances 8 COLS bytes per pass from `dst.as_mut_ptr()`
            // to `end`, groups >= 1 passes): reads src[4j..4j + 4] (LDR, unaligned allowed on
            // ARMv7-M) and writes dst[2 COLS j] and dst[2 COLS j + COLS] (STR, word-aligned),
            // all inside the slices checked above. Registers: the two pointers (discarded), two
            // scratch registers; flags clobbered (CMP). No stack.
            unsafe {
                asm!(
                    "2:",
                    "ldr     {v}, [{s}], #4",
                    "sxtab16 {a}, {pair}, {v}",
                    "sxtab16 {v}, {pair}, {v}, ror #8",
                    "str     {v}, [{d}, #{b}]",
                    "str     {a}, [{d}], #{step}",
                    "cmp     {d}, {end}",
                    "bne     2b",
                    s = inout(reg) src.as_ptr() => _,
                    d = inout(reg) dst.as_mut_ptr() => _,
                    pair = in(reg) pair,
                    end = in(reg) end,
                    v = out(reg) _,
                    a = out(reg) _,
                    b = const 4 * COLS,
                    step = const 8 * COLS,
                    options(nostack),
                );
            }
        }

        /// One element group of [`conv_rows4`]'s inner loop: the weight word's two SXTB16
        /// halves against the A and B words of the four columns.
        macro_rules! rows4_group {
            () => {
                concat!(
                    "ldr    {u}, [{w}]\n",
                    "sxtb16 {u}, {u}\n",
                    "ldm    {x}!, {{r4, r5, r8, r9}}\n",
                    "smlad  r0, r4, {u}, r0\n",
                    "smlad  r1, r5, {u}, r1\n",
                    "smlad  r2, r8, {u}, r2\n",
                    "smlad  r3, r9, {u}, r3\n",
                    "ldr    {u}, [{w}], #4\n",
                    "sxtb16 {u}, {u}, ror #8\n",
                    "ldm    {x}!, {{r4, r5, r8, r9}}\n",
                    "smlad  r0, r4, {u}, r0\n",
                    "smlad  r1, r5, {u}, r1\n",
                    "smlad  r2, r8, {u}, r2\n",
                    "smlad  r3, r9, {u}, r3\n",
                )
            };
        }

        /// [`conv_rows4`]'s loop over channels with `$group` (one or two element groups) as
        /// the inner loop's body.
        macro_rules! rows4_asm {
            ($body:expr, $rows:expr, $end:expr, $($group:expr),+) => {
                asm!(
                    "3:",
                    "movs   r0, #0",
                    "movs   r1, #0",
                    "movs   r2, #0",
                    "movs   r3, #0",
                    "2:",
                    $($group,)+
                    "cmp    {x}, {end}",
                    "bne    2b",
                    "ldrd   r4, r5, [{end}, #8]",
                    "stmia  r4!, {{r0, r1, r2, r3}}",
                    "str    r4, [{end}, #8]",
                    "cmp    r4, r5",
                    "beq    4f",
                    "ldrd   r4, r5, [{end}]",
                    "sub    {x}, {end}, r4",
                    "add    {w}, {w}, r5",
                    "b      3b",
                    "4:",
                    x = inout(reg) $body.as_ptr() => _,
                    w = inout(reg) $rows.as_ptr() => _,
                    end = in(reg) $end,
                    u = out(reg) _,
                    out("r0") _,
                    out("r1") _,
                    out("r2") _,
                    out("r3") _,
                    out("r4") _,
                    out("r5") _,
                    out("r8") _,
                    out("r9") _,
                    options(nostack),
                )
            };
        }

        /// One output channel against a packed four-pixel patch, for every channel of `rows`
        /// in one loop: for channel `c` in `0..sums.len()`, `sums[c] = [w . col0, w . col1,
        /// w . col2, w . col3]` over the patch's `groups` element groups (`[A col0..col3, B
        /// col0..col3]` per group) with `w = rows[ck..]`. Per 4 patch elements: the weight word
        /// loaded twice (once per SXTB16 half: no register is left to keep it), two LDM of 4
        /// patch words, 8 SMLAD (16 MACs in 16 instructions). `patch` holds the groups' `8 *
        /// groups` words and, after them, 4 words of loop state that this writes: the patch's
        /// bytes, `k - 4 * groups`, and the sums' cursor and end.
        #[inline(always)]
        pub fn conv_rows4(
            patch: &mut [u32],
            groups: usize,
            rows: &[i8],
            k: usize,
            sums: &mut [[i32; 4]],
        ) {
            let n = sums.len();
            if n == 0 || groups == 0 {
                sums.fill([0; 4]);
                return;
            }
            // The reads below: patch words 0..8 * groups + 4 and bytes [ck, ck + 4 * groups)
            // of `rows` for c < n (panics here, before any access, if a slice is shorter or the
            // groups exceed a row).
            assert!(4 * groups <= k, "patch groups exceed the filter rows");
            let _ = (&rows[..n * k], &patch[..8 * groups + 4]);
            let sums_range = sums.as_mut_ptr_range();
            let (body, state) = patch.split_at_mut(8 * groups);
            state[0] = (32 * groups) as u32;
            state[1] = (k - 4 * groups) as u32;
            state[2] = sums_range.start as u32;
            state[3] = sums_range.end as u32;
            let end = state.as_mut_ptr();
            // SAFETY: per channel, the inner loop reads the 8 * groups patch words from
            // `body.as_ptr()` to `end` (LDM, word-aligned) and 4 * groups bytes of the
            // channel's row (LDR, unaligned allowed), all checked above; w then moves to the
            // next row (`+ k - 4 * groups`). It reads and writes the 4 state words at `end`
            // (inside `patch`) and writes 16 bytes per channel to `sums[c]` through the cursor
            // (STM of r0-r3 in register order), stopping at the sums' end (n >= 1). Registers:
            // r0-r5, r8, r9 (sums, patch words), the pointers (discarded), one scratch
            // register; flags clobbered (CMP, Q). No stack. The two loops differ only in how many
            // groups one pass of the inner loop sums (two when their count is even).
            unsafe {
                if groups.is_multiple_of(2) {
                    rows4_asm!(body, rows, end, rows4_group!(), rows4_group!());
                } else {
                    rows4_asm!(body, rows, end, rows4_group!());
                }
            }
        }

        /// The output stage of four pixels over full-range channels (no clamp besides int8):
        /// for channel `j`, `out[q * stride + j] = saturated(channels[j], sums[j][q])`, q < 4;
        /// per channel one LDM of its 5 words and 8 instructions per output byte.
        #[inline(always)]
        pub fn store_four(
            out: &mut [i8],
            stride: usize,
            sums: &[[i32; 4]],
            channels: &[super::super::Channel],
        ) {
            let n = channels.len();
            if n == 0 {
                return;
            }
            // The accesses below: out[..3 * stride + n], sums[..n] (panics here, before any, if
            // a slice is shorter).
            assert!(stride >= n, "pixels overlap");
            let (out, sums) = (&mut out[..3 * stride + n], &sums[..n]);
            let end = channels.as_ptr_range().end;
            // SAFETY: per channel j (`ch` advances 20 bytes per pass from `channels.as_ptr()`
            // to `end`, n >= 1 passes; `o` from `out.as_mut_ptr()` by 1): reads the channel's 5
            // words (`Channel` is `repr(C)`, 5 u32/i32 fields, word-aligned) and sums[j] (4
            // words), writes out[j + q * stride] for q < 4; all inside the slices checked
            // above. Registers: r0-r3 and r8 (the channel), the pointers (discarded), the
            // strides, two scratch registers; flags clobbered (CMP, Q). No stack.
            unsafe {
                asm!(
                    "2:",
                    "ldm    {ch}!, {{r0, r1, r2, r3, r8}}",
                    "ldr    {s}, [{sums}, #4]",
                    "mla    {s}, {s}, r0, r1",
                    "smmulr {s}, {s}, r2",
                    "add    {t}, r3, {s}, lsl #1",
                    "add    {s}, {t}, {s}, asr #31",
                    "asr    {s}, {s}, r8",
                    "ssat   {s}, #8, {s}",
                    "strb   {s}, [{o}, {st}]",
                    "ldr    {s}, [{sums}, #8]",
                    "mla    {s}, {s}, r0, r1",
                    "smmulr {s}, {s}, r2",
                    "add    {t}, r3, {s}, lsl #1",
                    "add    {s}, {t}, {s}, asr #31",
                    "asr    {s}, {s}, r8",
                    "ssat   {s}, #8, {s}",
                    "strb   {s}, [{o}, {st}, lsl #1]",
                    "ldr    {s}, [{sums}, #12]",
                    "mla    {s}, {s}, r0, r1",
                    "smmulr {s}, {s}, r2",
                    "add    {t}, r3, {s}, lsl #1",
                    "add    {s}, {t}, {s}, asr #31",
                    "asr    {s}, {s}, r8",
                    "ssat   {s}, #8, {s}",
                    "add    {t}, {o}, {st}, lsl #1",
                    "strb   {s}, [{t}, {st}]",
                    "ldr    {s}, [{sums}], #16",
                    "mla    {s}, {s}, r0, r1",
                    "smmulr {s}, {s}, r2",
                    "add    {t}, r3, {s}, lsl #1",
                    "add    {s}, {t}, {s}, asr #31",
                    "asr    {s}, {s}, r8",
                    "ssat   {s}, #8, {s}",
                    "strb   {s}, [{o}], #1",
                    "cmp    {ch}, {end}",
                    "bne    2b",
                    ch = inout(reg) channels.as_ptr() => _,
                    sums = inout(reg) sums.as_ptr() => _,
                    o = inout(reg) out.as_mut_ptr() => _,
                    st = in(reg) stride,
                    end = in(reg) end,
                    s = out(reg) _,
                    t = out(reg) _,
                    out("r0") _,
                    out("r1") _,
                    out("r2") _,
                    out("r3") _,
                    out("r8") _,
                    options(nostack),
                );
            }
        }

        /// A row of 3x3 depthwise windows for 4 channels over an int16 strip: for window `p` in
        /// `0..acc.len()`, `acc[p][j] = sum over taps (fy, fx) of strip value * weight`, the
        /// strip holding per column the two packed words `[A, B]` of 4 channels (`x - zp`, as
        /// SXTAB16 and SXTAB16 ROR #8 make them), rows `w.row` bytes apart, window `p` starting
        /// `p * w.advance` bytes in. Per window: 9 LDRD of input, 9 LDRD of weights, 36
        /// SMULxy/SMLAxy, one STM of the 4 sums.
        #[inline(always)]
        pub fn dw_row3x3(strip: &[u32], w: &super::Window3x3, acc: &mut [[i32; 4]]) {
            let n = acc.len();
            if n == 0 {
                return;
            }
            // The reads below: for each window p, 2 words at byte offsets p * advance + fy * row
            // + 8 * fx (fy, fx < 3) of `strip` (panics here, before any read, if the last
            // window's last word lies outside it; offsets grow with p, fy and fx). `advance` and
            // `row` are multiples of 8 (checked), so every LDRD is word-aligned.
            assert!(
                w.row.is_multiple_of(8) && w.advance.is_multiple_of(8),
                "strip offsets must be word pairs"
            );
            let last = (n - 1) * w.advance as usize + 2 * w.row as usize + 16;
            let _ = &strip[last / 4..][..2];
            let end = acc.as_mut_ptr_range().end;
            // SAFETY: reads the strip words checked above and words 0..20 of `w` (`repr(C)`,
            // word-aligned); writes the 4 sums of window p to acc[p] (STM of r0-r3 in register
            // order = a0..a3; `out` advances 16 bytes per window from `acc.as_mut_ptr()` to
            // `end`, n >= 1 passes). Registers: r0-r3 (sums, discarded), the pointers (`x`,
            // `out` advanced, discarded), four scratch registers; flags clobbered (CMP, Q).
            unsafe {
                asm!(
                    "2:",
                    "ldrd    {t0}, {t1}, [{x}]",
                    "ldrd    {u0}, {u1}, [{w}, #0]",
                    "smulbb  r0, {t0}, {u0}",
                    "smultt  r2, {t0}, {u0}",
                    "smulbb  r1, {t1}, {u1}",
                    "smultt  r3, {t1}, {u1}",
                    "ldrd    {t0}, {t1}, [{x}, #8]",
                    "ldrd    {u0}, {u1}, [{w}, #8]",
                    "smlabb  r0, {t0}, {u0}, r0",
                    "smlatt  r2, {t0}, {u0}, r2",
                    "smlabb  r1, {t1}, {u1}, r1",
                    "smlatt  r3, {t1}, {u1}, r3",
                    "ldrd    {t0}, {t1}, [{x}, #16]",
                    "ldrd    {u0}, {u1}, [{w}, #16]",
                    "smlabb  r0, {t0}, {u0}, r0",
                    "smlatt  r2, {t0}, {u0}, r2",
                    "smlabb  r1, {t1}, {u1}, r1",
                    "smlatt  r3, {t1}, {u1}, r3",
                    "ldr     {u0}, [{w}, #72]",
                    "add     {x}, {x}, {u0}",
                    "ldrd    {t0}, {t1}, [{x}]",
                    "ldrd    {u0}, {u1}, [{w}, #24]",
                    "smlabb  r0, {t0}, {u0}, r0",
                    "smlatt  r2, {t0}, {u0}, r2",
                    "smlabb  r1, {t1}, {u1}, r1",
                    "smlatt  r3, {t1}, {u1}, r3",
                    "ldrd    {t0}, {t1}, [{x}, #8]",
                    "ldrd    {u0}, {u1}, [{w}, #32]",
                    "smlabb  r0, {t0}, {u0}, r0",
                    "smlatt  r2, {t0}, {u0}, r2",
                    "smlabb  r1, {t1}, {u1}, r1",
                    "smlatt  r3, {t1}, {u1}, r3",
                    "ldrd    {t0}, {t1}, [{x}, #16]",
                    "ldrd    {u0}, {u1}, [{w}, #40]",
                    "smlabb  r0, {t0}, {u0}, r0",
                    "smlatt  r2, {t0}, {u0}, r2",
                    "smlabb  r1, {t1}, {u1}, r1",
                    "smlatt  r3, {t1}, {u1}, r3",
                    "ldr     {u0}, [{w}, #72]",
                    "add     {x}, {x}, {u0}",
                    "ldrd    {t0}, {t1}, [{x}]",
                    "ldrd    {u0}, {u1}, [{w}, #48]",
                    "smlabb  r0, {t0}, {u0}, r0",
                    "smlatt  r2, {t0}, {u0}, r2",
                    "smlabb  r1, {t1}, {u1}, r1",
                    "smlatt  r3, {t1}, {u1}, r3",
                    "ldrd    {t0}, {t1}, [{x}, #8]",
                    "ldrd    {u0}, {u1}, [{w}, #56]",
                    "smlabb  r0, {t0}, {u0}, r0",
                    "smlatt  r2, {t0}, {u0}, r2",
                    "smlabb  r1, {t1}, {u1}, r1",
                    "smlatt  r3, {t1}, {u1}, r3",
                    "ldrd    {t0}, {t1}, [{x}, #16]",
                    "ldrd    {u0}, {u1}, [{w}, #64]",
                    "smlabb  r0, {t0}, {u0}, r0",
                    "smlatt  r2, {t0}, {u0}, r2",
                    "smlabb  r1, {t1}, {u1}, r1",
                    "smlatt  r3, {t1}, {u1}, r3",
                    "ldrd    {u0}, {u1}, [{w}, #72]",
                    "sub     {x}, {x}, {u0}, lsl #1",
                    "add     {x}, {x}, {u1}",
                    "stmia   {out}!, {{r0, r1, r2, r3}}",
                    "cmp     {out}, {end}",
                    "bne     2b",
                    x = inout(reg) strip.as_ptr() => _,
                    w = in(reg) w as *const super::Window3x3,
                    out = inout(reg) acc.as_mut_ptr() => _,
                    end = in(reg) end,
                    t0 = out(reg) _,
                    t1 = out(reg) _,
                    u0 = out(reg) _,
                    u1 = out(reg) _,
                    out("r0") _,
                    out("r1") _,
                    out("r2") _,
                    out("r3") _,
                    options(nostack),
                );
            }
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
        pub fn smmulr(a: i32, b: i32) -> i32 {
            ((i64::from(a) * i64::from(b) + (1i64 << 31)) >> 32) as i32
        }
        pub fn ssat8(x: i32) -> i32 {
            x.clamp(-128, 127)
        }
        pub fn asr(x: i32, s: u32) -> i32 {
            x >> s
        }

        /// Groups of 4 values expanded into one patch column (see the `asm!` version).
        pub fn expand_col<const COLS: usize>(
            src: &[i8],
            groups: usize,
            pair: u32,
            dst: &mut [u32],
        ) {
            for j in 0..groups {
                let x = &src[4 * j..][..4];
                let x = u32::from_le_bytes([x[0] as u8, x[1] as u8, x[2] as u8, x[3] as u8]);
                dst[2 * COLS * j] = sxtab16(pair, x);
                dst[2 * COLS * j + COLS] = sxtab16_ror8(pair, x);
            }
        }

        /// Every output channel against one four-pixel patch (see the `asm!` version).
        pub fn conv_rows4(
            patch: &mut [u32],
            groups: usize,
            rows: &[i8],
            k: usize,
            sums: &mut [[i32; 4]],
        ) {
            assert!(4 * groups <= k, "patch groups exceed the filter rows");
            for (c, s) in sums.iter_mut().enumerate() {
                let w = &rows[c * k..][..4 * groups];
                *s = [0; 4];
                for (x, w) in patch[..8 * groups].chunks_exact(8).zip(w.chunks_exact(4)) {
                    let w = u32::from_le_bytes([w[0] as u8, w[1] as u8, w[2] as u8, w[3] as u8]);
                    let (wa, wb) = (sxtb16(w), sxtb16_ror8(w));
                    for q in 0..4 {
                        s[q] = smlad(x[4 + q], wb, smlad(x[q], wa, s[q]));
                    }
                }
            }
        }

        /// The full-range output stage of one channel over a row (see the `asm!` version).
        pub fn store_lane(
            out: &mut [i8],
            stride: usize,
            sums: &[[i32; 4]],
            lane: usize,
            ch: &super::super::Channel,
        ) {
            for (p, s) in sums.iter().enumerate() {
                out[p * stride] = ch.saturated(s[lane]) as i8;
            }
        }

        /// The full-range output stage of four pixels (see the `asm!` version).
        pub fn store_four(
            out: &mut [i8],
            stride: usize,
            sums: &[[i32; 4]],
            channels: &[super::super::Channel],
        ) {
            assert!(stride >= channels.len(), "pixels overlap");
            for (j, (s, ch)) in sums.iter().zip(channels).enumerate() {
                for (q, &a) in s.iter().enumerate() {
                    out[q * stride + j] = ch.saturated(a) as i8;
                }
            }
        }

        /// Pixels expanded into the strip layout (see the `asm!` version).
        pub fn expand_row(src: &[i8], c: usize, pair: u32, dst: &mut [u32]) {
            for (i, d) in dst.chunks_exact_mut(2).enumerate() {
                let x = &src[i * c..][..4];
                let x = u32::from_le_bytes([x[0] as u8, x[1] as u8, x[2] as u8, x[3] as u8]);
                d[0] = sxtab16(pair, x);
                d[1] = sxtab16_ror8(pair, x);
            }
        }

        /// A row of 3x3 depthwise windows over an int16 strip (see the `asm!` version).
        pub fn dw_row3x3(strip: &[u32], w: &super::Window3x3, acc: &mut [[i32; 4]]) {
            for (p, a) in acc.iter_mut().enumerate() {
                *a = [0; 4];
                for t in 0..9 {
                    let at = (p * w.advance as usize + (t / 3) * w.row as usize) / 4 + 2 * (t % 3);
                    let (xa, xb) = (strip[at], strip[at + 1]);
                    let (wa, wb) = (w.words[2 * t], w.words[2 * t + 1]);
                    a[0] = smlabb(xa, wa, a[0]);
                    a[2] = smlatt(xa, wa, a[2]);
                    a[1] = smlabb(xb, wb, a[1]);
                    a[3] = smlatt(xb, wb, a[3]);
                }
            }
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

        /// Every pair of output channels against one patch (see the `asm!` version).
        pub fn conv_rows(
            patch: &mut [u32],
            groups: usize,
            rows: &[i8],
            k: usize,
            sums: &mut [[i32; 4]],
        ) {
            assert!(4 * groups <= k, "patch groups exceed the filter rows");
            let body = &patch[..4 * groups];
            for (p, s) in sums.iter_mut().enumerate() {
                let w0 = &rows[2 * p * k..][..4 * groups];
                let w1 = &rows[(2 * p + 1) * k..][..4 * groups];
                *s = block_2x2(body, w0, w1);
            }
        }

        /// The full-range output stage of two pixels (see the `asm!` version).
        pub fn store_two(
            out0: &mut [i8],
            out1: &mut [i8],
            sums: &[[i32; 2]],
            channels: &[super::super::Channel],
        ) {
            let each = out0.iter_mut().zip(out1.iter_mut()).zip(sums).zip(channels);
            for (((o0, o1), s), ch) in each {
                *o0 = ch.saturated(s[0]) as i8;
                *o1 = ch.saturated(s[1]) as i8;
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

/// SXTAB16 and its ROR #8 form (for other kernels' Cortex-M paths, e.g. the int8 pools).
pub(crate) use dsp::{sxtab16, sxtab16_ror8};

use dsp::{
    asr, block_2x2, conv_rows, conv_rows4, dw_row3x3, expand_col, expand_row, row3, smlabb, smlad,
    smlatt, smmulr, ssat8, sxtb16, sxtb16_ror8, Window3x3,
};

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
const CHANNELS: usize = 64;

/// One output channel's bias, requantization and output zero point, decoded once per kernel
/// call into the form the fast output stage computes in six instructions (MLA, SMMULR, two
/// ADDs with shifted operands, ASR, SSAT), bit-exact with `conv::requantize(acc + bias, ..)`
/// for every accumulator the kernel can produce.
///
/// TFLM computes `x = (acc + bias) << left` (wrapping), `h = SaturatingRoundingDoublingHighMul(x,
/// m) = floor((x m + 2^30) / 2^31)` (proof at [`requantize`]), then `RoundingDivideByPOT(h, r) =
/// floor((h + 2^(r-1) - [h < 0]) / 2^r)` for `r >= 1` and `h` for `r = 0`, adds the zero point
/// and clamps. When `|acc + bias| << left < 2^29` (checked per channel from the largest
/// accumulator the call can produce, [`max_acc`]), nothing wraps and:
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
pub struct Channel {
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
struct OutputStage {
    min: i32,
    max: i32,
    narrow: bool,
}

impl OutputStage {
    fn new(q: &QuantizedOutput<'_>) -> Self {
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
struct Weights<'a> {
    filter: &'a [i8],
    taps: usize,
    step: usize,
    stride: usize,
    input_zero_point: i32,
}

impl Weights<'_> {
    /// The largest `|x - input_zero_point|` of an int8 `x`.
    fn max_x(&self) -> i64 {
        128 + i64::from(self.input_zero_point).abs()
    }

    /// A bound on `|acc|` for every channel: `taps` products of at most `max_x * 128`.
    fn max_acc(&self) -> i64 {
        (self.taps as i64).saturating_mul(self.max_x() * 128)
    }

    /// The bound on `|acc|` for channel `oc`: `max_x * sum |w|` (0 for a dead filter).
    fn max_acc_of(&self, oc: usize) -> i64 {
        if self.stride == 1 {
            // A contiguous row (conv, fully connected): |w| <= 128, so an i32 sum holds 2^24 taps.
            let row = self.filter.get(oc * self.step..).unwrap_or(&[]);
            let row = &row[..self.taps.min(row.len())];
            let sum: i32 = row.iter().map(|&w| i32::from(w).abs()).sum();
            return i64::from(sum) * self.max_x();
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
    fn new(
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
    fn bounded(
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
    fn scaled(b: i32, r: Requant, zp: i32, max_acc: i64) -> Option<Self> {
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
    /// refuse. With `x = (|bias| + max_acc) << left`: when it plus the zero point fits i32 nothing
    /// wraps in TFLM's stage, which is then monotonic in the accumulator, so equal outputs at both ends mean
    /// equal outputs everywhere.
    fn constant(b: i32, r: Requant, q: &QuantizedOutput<'_>, max_acc: i64) -> Option<Self> {
        if r.multiplier == i32::MIN || !(-31..=30).contains(&r.shift) {
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

    /// True when every one of the `n` channels fits the fast output stage ([`Channel::new`]).
    fn all_fit(n: usize, bias: Option<&[i32]>, q: &QuantizedOutput<'_>, w: &Weights<'_>) -> bool {
        (0..n).all(|oc| Channel::new(oc, bias, q, w).is_some())
    }

    /// Decodes channels `oc0 .. oc0 + out.len()` into `out`; false when one does not fit the
    /// fast output stage (the caller then runs its portable body).
    #[must_use]
    fn fill(
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

    /// Channel `oc` (after [`Channel::all_fit`]).
    fn decode(oc: usize, bias: Option<&[i32]>, q: &QuantizedOutput<'_>, w: &Weights<'_>) -> Self {
        Channel::new(oc, bias, q, w).unwrap_or_default()
    }

    /// The output of accumulator `acc` (bias not yet added) saturated to int8, before the clamp:
    /// `conv::requantize(acc + bias, ...)` without the clamp, for every accumulator of its
    /// kernel call (see the type's doc).
    #[inline(always)]
    fn saturated(&self, acc: i32) -> i32 {
        ssat8(self.unsaturated(acc))
    }

    /// [`Channel::saturated`] before the saturation.
    #[inline(always)]
    fn unsaturated(&self, acc: i32) -> i32 {
        let x2 = acc.wrapping_mul(self.scale).wrapping_add(self.bias);
        let h = smmulr(x2, self.multiplier);
        asr(
            self.round.wrapping_add(h << 1).wrapping_add(h >> 31),
            self.shift,
        )
    }

    /// The output byte of accumulator `acc`: exactly `conv::requantize(acc + bias, ...)`.
    #[inline(always)]
    fn apply(&self, acc: i32, o: OutputStage) -> i8 {
        o.clamp(self.saturated(acc))
    }
}

impl OutputStage {
    /// TFLM's clamp (max, then min) of a value already in int8 range.
    #[inline(always)]
    fn clamp(self, v: i32) -> i8 {
        v.max(self.min).min(self.max) as i8
    }

    /// `out0[j]` and `out1[j]` from channel `j`'s two sums `sums[j]` (two pixels), the
    /// channel's parameters loaded once for both.
    #[inline(always)]
    fn store_two(self, out0: &mut [i8], out1: &mut [i8], sums: &[[i32; 2]], channels: &[Channel]) {
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
    fn store_lanes(self, out: &mut [i8], c: usize, sums: &[[i32; 4]], channels: &[Channel]) {
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
    fn store_each(self, out: &mut [i8], sums: impl Iterator<Item = i32>, channels: &[Channel]) {
        for ((o, a), ch) in out.iter_mut().zip(sums).zip(channels) {
            *o = self.clamp(ch.saturated(a));
        }
    }

    /// `out[j] = channels[j].apply(acc[j])` for the shortest of the three; the clamp's test is
    /// made once, not per byte.
    #[inline(always)]
    fn store(self, out: &mut [i8], acc: &[i32], channels: &[Channel]) {
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

/// Word index and bit shift of patch element `k` of column `col` in a patch of `COLS` (2 or 4)
/// columns: element group `k / 4` owns words `2 COLS (k / 4) ..+ 2 COLS` = `[A col0 .. A
/// col(COLS-1), B col0 .. B col(COLS-1)]`, with `A = [v0, v2]`, `B = [v1, v3]` (low half
/// first).
#[inline(always)]
fn slot<const COLS: usize>(k: usize, col: usize) -> (usize, u32) {
    (
        2 * COLS * (k / 4) + COLS * (k & 1) + col,
        16 * ((k >> 1) & 1) as u32,
    )
}

/// Writes the int16 `v` into patch element `k` of column `col`.
#[inline(always)]
fn put<const COLS: usize>(buf: &mut [u32], k: usize, col: usize, v: i32) {
    let (w, s) = slot::<COLS>(k, col);
    buf[w] = (buf[w] & !(0xffff << s)) | ((v as u16 as u32) << s);
}

/// Reads patch element `k` of column `col`.
#[inline(always)]
fn get<const COLS: usize>(buf: &[u32], k: usize, col: usize) -> i32 {
    let (w, s) = slot::<COLS>(k, col);
    i32::from((buf[w] >> s) as u16 as i16)
}

/// Fills column `col` of `buf` with the receptive field of flattened output pixel `p`, in the
/// filter's `(fy, fx, c)` order, as `x - input_zero_point` (0 for padding taps). `pad` is the
/// input zero point as an int8 (a padding tap's value), `pair` the offset in both halves.
///
/// Filter rows are runs: padding taps left and right, and the in-image taps, which are one
/// contiguous run of the input when there is no dilation (else one run per tap). With a channel
/// count that is a multiple of 4, every run is whole element groups and goes straight into the
/// patch ([`expand_col`]; padding as zero words); otherwise (first layers: 1 or 3 channels) the
/// field is first gathered as bytes in `stage` (padding as `pad`) and expanded at the end, its
/// last `k % 4` elements one by one.
#[allow(clippy::too_many_arguments)]
fn fill_column<const COLS: usize>(
    g: &ConvGeometry,
    input: &[i8],
    pad: i8,
    pair: u32,
    p: usize,
    col: usize,
    buf: &mut [u32],
    stage: &mut [i8],
) {
    let fic = g.filter_in_c;
    let k = g.filter_h * g.filter_w * fic;
    let direct = fic.is_multiple_of(4);
    if direct && pointwise(g) {
        // Pixel p's field is its input pixel, whole.
        return expand_col::<COLS>(&input[p * fic..][..fic], fic / 4, pair, &mut buf[col..]);
    }
    let px_per_image = g.out_h * g.out_w;
    let (b, rest) = (p / px_per_image, p % px_per_image);
    let (oy, ox) = (rest / g.out_w, rest % g.out_w);
    let in_y0 = (oy * g.stride_h) as isize - g.pad_top as isize;
    let in_x0 = (ox * g.stride_w) as isize - g.pad_left as isize;
    let (fx0, fx1) = tap_range(in_x0, g.dilation_w, g.filter_w, g.in_w);
    // Elements `k0 .. k0 + n` of the field: padding, or the values of `src`.
    let padding = |buf: &mut [u32], stage: &mut [i8], k0: usize, n: usize| {
        if direct {
            let (w0, w1) = (COLS * k0 / 2, COLS * (k0 + n) / 2);
            for d in buf[w0..w1].chunks_exact_mut(2 * COLS) {
                d[col] = 0;
                d[COLS + col] = 0;
            }
        } else {
            stage[k0..k0 + n].fill(pad);
        }
    };
    let run = |buf: &mut [u32], stage: &mut [i8], k0: usize, src: &[i8]| {
        if direct {
            expand_col::<COLS>(src, src.len() / 4, pair, &mut buf[COLS * k0 / 2 + col..]);
        } else {
            copy_short(&mut stage[k0..k0 + src.len()], src);
        }
    };
    let row_len = g.filter_w * fic;
    for fy in 0..g.filter_h {
        let k0 = fy * row_len;
        let iy = in_y0 + (g.dilation_h * fy) as isize;
        if iy < 0 || iy as usize >= g.in_h || fx1 == fx0 {
            padding(buf, stage, k0, row_len);
            continue;
        }
        let row = (b * g.in_h + iy as usize) * g.in_w;
        let ix = |fx: usize| (in_x0 + (g.dilation_w * fx) as isize) as usize;
        padding(buf, stage, k0, fx0 * fic);
        if g.dilation_w == 1 {
            let src = &input[(row + ix(fx0)) * g.in_c..][..(fx1 - fx0) * fic];
            run(buf, stage, k0 + fx0 * fic, src);
        } else {
            for fx in fx0..fx1 {
                let src = &input[(row + ix(fx)) * g.in_c..][..fic];
                run(buf, stage, k0 + fx * fic, src);
            }
        }
        padding(buf, stage, k0 + fx1 * fic, (g.filter_w - fx1) * fic);
    }
    if !direct {
        let whole = 4 * (k / 4);
        expand_col::<COLS>(stage, whole / 4, pair, &mut buf[col..]);
        let off = -i32::from(pad);
        for (t, &v) in stage[whole..k].iter().enumerate() {
            put::<COLS>(buf, whole + t, col, i32::from(v) + off);
        }
    }
}

/// `dst.copy_from_slice(src)` for the few bytes of one filter row of a first layer (3x3x3 rows
/// are 9, 10x4x1 rows 4): word moves and a byte tail.
#[inline(always)]
fn copy_short(dst: &mut [i8], src: &[i8]) {
    let mut d = dst.chunks_exact_mut(4);
    let mut s = src.chunks_exact(4);
    for (d, s) in (&mut d).zip(&mut s) {
        d.copy_from_slice(s);
    }
    for (d, &s) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *d = s;
    }
}

/// True for a 1x1 conv with stride 1 and no padding: output pixel `p` reads input pixel `p`.
fn pointwise(g: &ConvGeometry) -> bool {
    g.filter_h == 1
        && g.filter_w == 1
        && g.stride_h == 1
        && g.stride_w == 1
        && g.pad_top == 0
        && g.pad_left == 0
        && g.in_h == g.out_h
        && g.in_w == g.out_w
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
    let w = Weights {
        filter,
        taps: k,
        step: k,
        stride: 1,
        input_zero_point: q.input_zero_point,
    };
    // Padding taps hold the zero point as an int8 (true of every int8 tensor).
    let pad = match i8::try_from(q.input_zero_point) {
        Ok(pad) if g.filter_in_c == g.in_c && k <= MAX_PATCH && k > 0 && g.out_c > 0 => pad,
        _ => return conv::conv2d_i8_portable(g, q, input, filter, bias, output),
    };
    let pair = offset_pair(-i32::from(pad));
    debug_assert_eq!(filter.len(), g.out_c * k);
    debug_assert_eq!(output.len(), g.batch * g.out_h * g.out_w * g.out_c);
    let cx = ConvCall {
        g,
        q,
        input,
        filter,
        bias,
        pad,
        pair,
        weights: w,
    };
    if 2 * k <= MAX_PATCH {
        conv_by_four(&cx, output)
    } else {
        conv_by_two(&cx, output)
    }
}

/// One CONV_2D call's operands, checked by [`conv2d_i8`]: `pad` is the input zero point as an
/// int8, `pair` the offset `-pad` in both int16 halves.
struct ConvCall<'a> {
    g: &'a ConvGeometry,
    q: &'a QuantizedOutput<'a>,
    input: &'a [i8],
    filter: &'a [i8],
    bias: Option<&'a [i32]>,
    pad: i8,
    pair: u32,
    weights: Weights<'a>,
}

impl ConvCall<'_> {
    /// The portable body over the whole output (after a channel that does not fit the fast
    /// output stage; it rewrites every output).
    fn portable(&self, output: &mut [i8]) {
        let ConvCall {
            g,
            q,
            input,
            filter,
            bias,
            ..
        } = *self;
        conv::conv2d_i8_portable(g, q, input, filter, bias, output);
    }
}

/// CONV_2D with output pixels in fours (patches of at most `MAX_PATCH / 2` elements: the four
/// columns take two words per element): per chunk of [`CHANNELS`] output channels and per four
/// pixels, the four receptive fields are packed into the stack patch, [`conv_rows4`] sums every
/// channel against them (16 instructions per 16 MACs), the patch tail (fewer than 4 elements) is
/// summed one by one and [`store_four`] (full-range clamp) or [`OutputStage::store_each`]
/// requantizes. A last group of fewer than 4 pixels leaves stale columns, whose sums are unused.
/// [`store_four`]: dsp::store_four
#[inline(never)]
fn conv_by_four(cx: &ConvCall<'_>, output: &mut [i8]) {
    let ConvCall {
        g,
        q,
        input,
        filter,
        bias,
        pad,
        pair,
        ..
    } = *cx;
    let k = g.filter_h * g.filter_w * g.filter_in_c;
    let pixels = g.batch * g.out_h * g.out_w;
    let out_c = g.out_c;
    let whole = 4 * (k / 4);
    let stage = OutputStage::new(q);
    // The patch (four columns: 8 words per element group, the tail's group included) and, after
    // the whole groups, `conv_rows4`'s 4 words of loop state; the byte staging of one receptive
    // field whose channel count is not a multiple of 4.
    let mut buf = [0u32; MAX_PATCH + 8];
    let mut field = [0i8; MAX_PATCH / 2];
    let mut channels = [Channel::default(); CHANNELS];
    let mut sums = [[0i32; 4]; CHANNELS];
    let mut oc_lo = 0;
    while oc_lo < out_c {
        let n = core::cmp::min(CHANNELS, out_c - oc_lo);
        let channels = &mut channels[..n];
        if !Channel::fill(channels, oc_lo, bias, q, &cx.weights) {
            return cx.portable(output);
        }
        let rows = &filter[oc_lo * k..(oc_lo + n) * k];
        let sums = &mut sums[..n];
        let mut p = 0;
        while p < pixels {
            let m = core::cmp::min(4, pixels - p);
            for col in 0..m {
                fill_column::<4>(g, input, pad, pair, p + col, col, &mut buf, &mut field);
            }
            // The packed words of a patch tail (fewer than 4 elements), which `conv_rows4`'s
            // state overwrites.
            let mut tail_words = [0u32; 8];
            if whole < k {
                tail_words.copy_from_slice(&buf[2 * whole..2 * whole + 8]);
            }
            conv_rows4(&mut buf, k / 4, rows, k, sums);
            if whole < k {
                for (s, row) in sums.iter_mut().zip(rows.chunks_exact(k)) {
                    for (t, &v) in row[whole..].iter().enumerate() {
                        let v = i32::from(v);
                        for (col, a) in s.iter_mut().enumerate() {
                            *a = a.wrapping_add(get::<4>(&tail_words, t, col) * v);
                        }
                    }
                }
            }
            let base = p * out_c + oc_lo;
            if m == 4 && !stage.narrow {
                dsp::store_four(&mut output[base..][..3 * out_c + n], out_c, sums, channels);
            } else {
                for col in 0..m {
                    let each = sums.iter().map(|s| s[col]);
                    stage.store_each(&mut output[base + col * out_c..][..n], each, channels);
                }
            }
            p += 4;
        }
        oc_lo += n;
    }
}

/// CONV_2D with output pixels in pairs (patches of up to [`MAX_PATCH`] elements: two words per
/// element group and column): per chunk of [`CHANNELS`] output channels and per two pixels,
/// [`conv_rows`] sums every pair of channels against the two packed fields (a 2x2 block: 19
/// instructions per 16 MACs); an odd last channel runs the block with itself as the partner.
#[inline(never)]
fn conv_by_two(cx: &ConvCall<'_>, output: &mut [i8]) {
    let ConvCall {
        g,
        q,
        input,
        filter,
        bias,
        pad,
        pair,
        ..
    } = *cx;
    let k = g.filter_h * g.filter_w * g.filter_in_c;
    let pixels = g.batch * g.out_h * g.out_w;
    let out_c = g.out_c;
    let whole = 4 * (k / 4);
    let stage = OutputStage::new(q);
    // The patch (two columns) and, after it, `conv_rows`'s 5 words of loop state; the byte
    // staging of one receptive field whose channel count is not a multiple of 4.
    let mut buf = [0u32; MAX_PATCH + 5];
    let mut field = [0i8; MAX_PATCH];
    let mut channels = [Channel::default(); CHANNELS];
    // Raw sums of a chunk's channels, `[col0, col1]` each (`conv_rows` writes them per pair of
    // channels as `[ch0 col0, ch0 col1, ch1 col0, ch1 col1]`, the same bytes).
    let mut sums = [[0i32; 2]; CHANNELS];
    // Output channels in chunks of CHANNELS (their requantization decoded once); each chunk
    // walks all pixel pairs (re-packing a pair's patches costs far less than its MACs).
    let mut oc_lo = 0;
    while oc_lo < out_c {
        let n = core::cmp::min(CHANNELS, out_c - oc_lo);
        let channels = &mut channels[..n];
        if !Channel::fill(channels, oc_lo, bias, q, &cx.weights) {
            return cx.portable(output);
        }
        let rows = &filter[oc_lo * k..(oc_lo + n) * k];
        let pairs = n / 2;
        let mut p = 0;
        while p < pixels {
            let two = p + 1 < pixels;
            fill_column::<2>(g, input, pad, pair, p, 0, &mut buf, &mut field);
            if two {
                fill_column::<2>(g, input, pad, pair, p + 1, 1, &mut buf, &mut field);
            }
            // The packed words of a patch tail (fewer than 4 elements), which `conv_rows`'s
            // state overwrites.
            let mut tail_words = [0u32; 4];
            if whole < k {
                tail_words.copy_from_slice(&buf[whole..whole + 4]);
            }
            let paired: &mut [[i32; 4]] = bytemuck::cast_slice_mut(&mut sums[..2 * pairs]);
            conv_rows(&mut buf, k / 4, rows, k, paired);
            if pairs < n.div_ceil(2) {
                // An odd last channel: the 2x2 block with itself as the partner.
                let last = &rows[(n - 1) * k..][..k];
                let [a0, a1, _, _] = block_2x2(&buf[..whole], last, last);
                sums[n - 1] = [a0, a1];
            }
            if whole < k {
                for (s, row) in sums[..n].iter_mut().zip(rows.chunks_exact(k)) {
                    for (t, &v) in row[whole..].iter().enumerate() {
                        let v = i32::from(v);
                        s[0] = s[0].wrapping_add(get::<2>(&tail_words, t, 0) * v);
                        s[1] = s[1].wrapping_add(get::<2>(&tail_words, t, 1) * v);
                    }
                }
            }
            let base = p * out_c + oc_lo;
            if two {
                let (out0, out1) = output[base..][..out_c + n].split_at_mut(out_c);
                stage.store_two(&mut out0[..n], out1, &sums[..n], channels);
            } else {
                let sums0 = sums[..n].iter().map(|s| s[0]);
                stage.store_each(&mut output[base..][..n], sums0, channels);
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
    let w = Weights {
        filter,
        taps: g.filter_h * g.filter_w,
        step: 1,
        stride: g.out_c,
        input_zero_point: q.input_zero_point,
    };
    let off = match input_offset(q.input_zero_point) {
        Some(off) if g.depth_multiplier == 1 && g.in_c.is_multiple_of(4) && g.out_c == g.in_c => {
            off
        }
        _ => return depthwise::depthwise_conv2d_i8_portable(g, q, input, filter, bias, output),
    };
    debug_assert_eq!(filter.len(), g.filter_h * g.filter_w * g.out_c);
    let pair = offset_pair(off);
    let c = g.in_c;
    let stage = OutputStage::new(q);
    let (xs, ws) = (g.dilation_w * c, c);
    // 3x3 filters without dilation run rows of windows over int16 strips; the others sum their
    // in-image taps row by row.
    let window3 = g.filter_h == 3 && g.filter_w == 3 && g.dilation_h == 1 && g.dilation_w == 1;
    if window3 {
        return depthwise_3x3(g, input, filter, bias, q, output, pair, &w);
    }
    if !Channel::all_fit(g.out_c, bias, q, &w) {
        return depthwise::depthwise_conv2d_i8_portable(g, q, input, filter, bias, output);
    }
    // Other filters: channels in groups of 4 (outer loop: their requantization decoded once),
    // then every output pixel with 4 accumulators in registers over its in-image taps.
    let mut c0 = 0;
    while c0 < c {
        let ch = [0, 1, 2, 3].map(|j| Channel::decode(c0 + j, bias, q, &w));
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
                    stage.store(&mut output[out_at..][..4], &[a0, a1, a2, a3], &ch);
                    out_at += c;
                }
            }
        }
        c0 += 4;
    }
}

/// Channels of the 3x3 depthwise path decoded at once (their [`Channel`]s and packed windows:
/// 20 + 80 / 4 = 40 bytes of stack per channel).
const DW_CHANNELS: usize = 32;

/// Words of the 3x3 depthwise path's strip (2 048 bytes of stack): input rows of 4 channels
/// as int16, two words per column, at most [`STRIP_COLS`] columns a row.
const STRIP_WORDS: usize = 512;

/// Columns of one strip row at most (three rows of them always fit); wider outputs go in tiles.
const STRIP_COLS: usize = 64;

/// Output pixels whose raw sums are kept at once (16 bytes each): one strip row's at least
/// (`STRIP_COLS - 2`), a whole tile's when the output is one column tile and they fit.
const STRIP_WINDOWS: usize = 128;

/// The 3x3 depthwise path (no dilation, `depth_multiplier == 1`, channels a multiple of 4):
/// channels in chunks of [`DW_CHANNELS`] whose weights are packed and requantization decoded
/// once; then per 4 channels and tile of output rows and columns, the input rows the tile's
/// windows read are expanded once into a strip of int16 `x - zp` (two words per column, as the
/// conv patch; padding columns and rows hold 0, which adds exactly 0), and per output row
/// [`dw_row3x3`] sums every window in one `asm!` loop and the output stage runs per channel over
/// the row's sums: one code path for interior and border pixels. A tile is as many output rows
/// as the strip holds input rows for (all of them for small feature maps).
#[allow(clippy::too_many_arguments)]
fn depthwise_3x3(
    g: &ConvGeometry,
    input: &[i8],
    filter: &[i8],
    bias: Option<&[i32]>,
    q: &QuantizedOutput<'_>,
    output: &mut [i8],
    pair: u32,
    weights: &Weights<'_>,
) {
    let c = g.in_c;
    let stage = OutputStage::new(q);
    // Output columns per tile (their windows read `(tile_w - 1) * stride + 3` columns) and
    // output rows per tile (their windows read `(tile_h - 1) * stride + 3` rows of those).
    let tile_w = core::cmp::min(g.out_w, (STRIP_COLS - 3) / g.stride_w + 1);
    let cols = (tile_w.max(1) - 1) * g.stride_w + 3;
    let tile_h = (STRIP_WORDS / (2 * cols) - 3) / g.stride_h + 1;
    // One column tile: a tile's outputs are consecutive pixels, so its rows' sums are kept
    // together and requantized at once (as many rows as the sums hold).
    let one_tile = tile_w == g.out_w;
    let tile_h = if one_tile {
        tile_h.min(STRIP_WINDOWS / tile_w).max(1)
    } else {
        tile_h
    };
    let row_words = 2 * cols;
    let mut channels = [Channel::default(); DW_CHANNELS];
    let mut windows = [Window3x3::default(); DW_CHANNELS / 4];
    let mut strip = [0u32; STRIP_WORDS];
    let mut sums = [[0i32; 4]; STRIP_WINDOWS];
    let mut c_lo = 0;
    while c_lo < c {
        let n = core::cmp::min(DW_CHANNELS, c - c_lo);
        if !Channel::fill(&mut channels[..n], c_lo, bias, q, weights) {
            // Outputs written so far are rewritten, all of them, by the portable body.
            return depthwise::depthwise_conv2d_i8_portable(g, q, input, filter, bias, output);
        }
        for (j, win) in windows[..n / 4].iter_mut().enumerate() {
            let c0 = c_lo + 4 * j;
            for t in 0..9 {
                let w = word(&filter[t * c + c0..]);
                win.words[2 * t] = sxtb16(w);
                win.words[2 * t + 1] = sxtb16_ror8(w);
            }
            win.row = (4 * row_words) as u32;
            win.advance = (8 * g.stride_w) as u32;
        }
        for (j, (win, ch)) in windows[..n / 4]
            .iter()
            .zip(channels[..n].chunks_exact(4))
            .enumerate()
        {
            let c0 = c_lo + 4 * j;
            for b in 0..g.batch {
                let mut oy0 = 0;
                while oy0 < g.out_h {
                    let oy1 = core::cmp::min(g.out_h, oy0 + tile_h);
                    let rows = (oy1 - oy0 - 1) * g.stride_h + 3;
                    let iy0 = (oy0 * g.stride_h) as isize - g.pad_top as isize;
                    let mut ox0 = 0;
                    while ox0 < g.out_w {
                        let ox1 = core::cmp::min(g.out_w, ox0 + tile_w);
                        let used = (ox1 - ox0 - 1) * g.stride_w + 3;
                        let ix0 = (ox0 * g.stride_w) as isize - g.pad_left as isize;
                        // Columns ix0 .. ix0 + used: padding left and right of the image.
                        let lo = (-ix0).clamp(0, used as isize) as usize;
                        let hi = (g.in_w as isize - ix0).clamp(lo as isize, used as isize);
                        let hi = hi as usize;
                        let strip_rows = strip.chunks_exact_mut(row_words).take(rows);
                        for (fy, row) in strip_rows.enumerate() {
                            let row = &mut row[..2 * used];
                            let iy = iy0 + fy as isize;
                            if iy < 0 || iy as usize >= g.in_h {
                                row.fill(0);
                                continue;
                            }
                            // Padding columns: zero from the strip's start when the output
                            // is one column tile (no expansion ever writes them then).
                            if !one_tile {
                                row[..2 * lo].fill(0);
                                row[2 * hi..].fill(0);
                            }
                            if hi > lo {
                                let base = (b * g.in_h + iy as usize) * g.in_w;
                                let at = (base + (ix0 + lo as isize) as usize) * c + c0;
                                expand_row(&input[at..], c, pair, &mut row[2 * lo..2 * hi]);
                            }
                        }
                        let tw = ox1 - ox0;
                        for oy in oy0..oy1 {
                            let first = (oy - oy0) * g.stride_h * row_words;
                            let at = if one_tile { (oy - oy0) * tw } else { 0 };
                            dw_row3x3(&strip[first..], win, &mut sums[at..at + tw]);
                            if !one_tile {
                                let out_row = ((b * g.out_h + oy) * g.out_w + ox0) * c + c0;
                                stage.store_lanes(&mut output[out_row..], c, &sums[..tw], ch);
                            }
                        }
                        if one_tile {
                            let out_tile = (b * g.out_h + oy0) * g.out_w * c + c0;
                            let n = (oy1 - oy0) * tw;
                            stage.store_lanes(&mut output[out_tile..], c, &sums[..n], ch);
                        }
                        ox0 = ox1;
                    }
                    oy0 = oy1;
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
                && Channel::all_fit(g.out_features, bias, q, &fc_weights(weights, n, q)) =>
        {
            off
        }
        _ => {
            return fully_connected::fully_connected_i8_portable(g, q, input, weights, bias, output)
        }
    };
    let pair = offset_pair(off);
    let w = fc_weights(weights, n, q);
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
            out[o] = Channel::decode(o, bias, q, &w).apply(a0, stage);
            if o1 != o {
                out[o1] = Channel::decode(o1, bias, q, &w).apply(a1, stage);
            }
            o += 2;
        }
    }
}

/// int8 ADD / SUB of two same-shaped tensors (`sub`: input 1 subtracted), Cortex-M body:
/// bit-exact with `binary::add_i8` / `sub_i8`. Returns how many leading elements it wrote (all
/// of them, or 0 when the parameters are outside its bounds and the caller runs the portable
/// loop).
///
/// Each input's rescale (`(q - zp) << left_shift`, then TFLM's multiply by a multiplier smaller
/// than one) depends on one int8 value only, so it is computed once for all 256 values into a
/// table per input (2 KB of stack, 512 evaluations of the portable arithmetic per call); per
/// element: two byte loads, two table loads, an add and the [`Channel`] output stage for the
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

/// The [`Weights`] of a FULLY_CONNECTED: rows of `n` features.
fn fc_weights<'a>(weights: &'a [i8], n: usize, q: &QuantizedOutput<'_>) -> Weights<'a> {
    Weights {
        filter: weights,
        taps: n,
        step: n,
        stride: 1,
        input_zero_point: q.input_zero_point,
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use crate::kernels::arch::cases::{acc, case, fc_case, EDGE_ACCS, EDGE_MULTIPLIERS};
    use crate::kernels::conv::tests::{clamp, requant, zero_point};
    use proptest::prelude::*;

    /// The bound on accumulators of `taps` products for input zero point `zp`.
    fn max_acc(taps: usize, zp: i32) -> i64 {
        let w = Weights {
            filter: &[],
            taps,
            step: 0,
            stride: 1,
            input_zero_point: zp,
        };
        w.max_acc()
    }

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

        /// 3x3 depthwise over rows wider than one strip tile and narrow ones, over more rows than
        /// one tile holds, both strides.
        #[test]
        fn depthwise_3x3_strip_tiles_are_bit_exact(c in (1usize..=4, prop_oneof![1usize..=3, 8usize..=14], prop_oneof![1usize..=12, 28usize..=60, 120usize..=300], 1usize..=2, 0usize..=1)
            .prop_flat_map(|(groups, h, w, stride, pad)| {
                let out = |n: usize| (n + 2 * pad).saturating_sub(3) / stride + 1;
                let g = ConvGeometry {
                    batch: 1,
                    in_h: h + 2,
                    in_w: w + 2,
                    in_c: 4 * groups,
                    out_h: out(h + 2),
                    out_w: out(w + 2),
                    out_c: 4 * groups,
                    filter_h: 3,
                    filter_w: 3,
                    filter_in_c: 1,
                    stride_h: stride,
                    stride_w: stride,
                    dilation_h: 1,
                    dilation_w: 1,
                    pad_top: pad,
                    pad_left: pad,
                    depth_multiplier: 1,
                };
                crate::kernels::arch::cases::data(g, true)
            })) {
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
        fn add_sub_is_bit_exact(
            sub in any::<bool>(),
            scales in (-12.0f32..=2.0, -12.0f32..=2.0, -3.0f32..=6.0)
                .prop_map(|(a, b, d)| [a, b, a.max(b) + d]),
            zps in proptest::array::uniform3(zero_point()),
            clamp in clamp(),
            data in (256usize..=700).prop_flat_map(|n| {
                (proptest::collection::vec(any::<i8>(), n), proptest::collection::vec(any::<i8>(), n))
            }),
        ) {
            let [s0, s1, so] = scales.map(f32::exp2);
            let p = crate::kernels::quantize::add_params(s0, s1, so, clamp);
            let (a, b) = data;
            let mut got = std::vec![0i8; a.len()];
            // TFLM-shaped parameters with an output scale up to 64x the inputs' fit: the whole
            // tensor is done here.
            prop_assert_eq!(add_sub_i8(sub, &p, zps, &a, &b, &mut got), a.len());
            let rescale = |v: i8, zp: i32, r: Requant| {
                let v = (i32::from(v) - zp).wrapping_mul(1 << p.left_shift);
                crate::quant::multiply_by_quantized_multiplier_smaller_than_one(v, r.multiplier, r.shift)
            };
            for ((&g, &x), &y) in got.iter().zip(&a).zip(&b) {
                let (x, y) = (rescale(x, zps[0], p.input0), rescale(y, zps[1], p.input1));
                let raw = if sub { x.wrapping_sub(y) } else { x.wrapping_add(y) };
                let want = conv::requantize(raw, p.output, zps[2], clamp);
                prop_assert_eq!(g, want);
            }
        }

        #[test]
        fn channel_matches_portable(
            taps in prop_oneof![1usize..=16, 1usize..=2_560],
            in_zp in prop_oneof![zero_point(), -32_640i32..=32_639],
            frac in -1.0f64..=1.0,
            bias in prop_oneof![Just(None), (-1i32 << 24..=1 << 24).prop_map(Some), any::<i32>().prop_map(Some)],
            r in prop_oneof![
                requant(),
                (any::<i32>(), -31i32..=30).prop_map(|(multiplier, shift)| Requant { multiplier, shift }),
            ],
            zp in prop_oneof![zero_point(), any::<i32>()],
            clamp in clamp(),
        ) {
            // Any accumulator the kernel can produce for `taps` products; when the channel is
            // decoded, its output stage is TFLM's.
            let max = max_acc(taps, in_zp);
            let acc = (max as f64 * frac) as i32;
            let b = bias.map(|b| [b]);
            let rq = [r];
            let q = QuantizedOutput {
                input_zero_point: in_zp,
                filter_zero_point: 0,
                output_zero_point: zp,
                requant: &rq,
                clamp,
            };
            if let Some(ch) = Channel::bounded(0, b.as_ref().map(|b| &b[..]), &q, max) {
                let want = conv::requantize(acc.wrapping_add(bias.unwrap_or(0)), r, zp, clamp);
                prop_assert_eq!(ch.apply(acc, OutputStage::new(&q)), want);
                prop_assert_eq!(ch.apply(-acc, OutputStage::new(&q)),
                    conv::requantize((-acc).wrapping_add(bias.unwrap_or(0)), r, zp, clamp));
            }
        }
    }

    /// The fast output stage takes every channel of the shapes real models have (so the kernels
    /// above run it, not their portable fallback), and is exact on ties and extremes.
    #[test]
    fn channel_fits_usual_layers_and_is_exact_at_the_edges() {
        let full = ClampI8 {
            min: -128,
            max: 127,
        };
        for taps in [1, 9, 27, 40, 64, 576, 640, 1_280] {
            for shift in -21..=2 {
                for m in [1 << 30, (1 << 30) + 1, i32::MAX] {
                    for zp in [-128, 0, 127] {
                        let rq = [Requant {
                            multiplier: m,
                            shift,
                        }];
                        let q = QuantizedOutput {
                            input_zero_point: -128,
                            filter_zero_point: 0,
                            output_zero_point: zp,
                            requant: &rq,
                            clamp: full,
                        };
                        let max = max_acc(taps, -128);
                        let bias = [1 << 20];
                        let ch = Channel::bounded(0, Some(&bias), &q, max);
                        let ch = ch.unwrap_or_else(|| panic!("taps {taps} shift {shift} zp {zp}"));
                        // Ties of the rounding shift and the largest accumulators.
                        let r = (-shift).max(0);
                        let tie = if r > 0 { 1i64 << (r - 1) } else { 0 };
                        let accs = [
                            max,
                            -max,
                            0,
                            1,
                            -1,
                            tie,
                            -tie,
                            tie + 1,
                            -tie - 1,
                            3 * tie,
                            -3 * tie,
                        ];
                        for acc in accs.map(|a| a.clamp(-max, max) as i32) {
                            for a in [acc, acc - (1 << 20), acc.wrapping_sub(1 << 20)] {
                                if i64::from(a).abs() > max {
                                    continue;
                                }
                                let want = conv::requantize(a + (1 << 20), rq[0], zp, full);
                                assert_eq!(
                                    ch.apply(a, OutputStage::new(&q)),
                                    want,
                                    "acc {a} m {m} shift {shift} zp {zp}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// Dead filters as quantizers leave them (VWW has them: a bias of 2^30 with a shift of -27 to
    /// -31, or a multiplier of 0) decode to constant channels, exact over every accumulator.
    #[test]
    fn dead_channels_are_constant_and_exact() {
        let clamp = ClampI8 {
            min: -128,
            max: 127,
        };
        let max = max_acc(256, -128);
        for (m, shift, b) in [
            (0, 0, 1 << 30),
            (0, 0, 12_345),
            (1_500_000_000, -27, 1 << 30),
            (1_073_741_824, -31, (1 << 30) + 128),
            (2_000_000_000, -29, -(1 << 30)),
        ] {
            for zp in [-128, -3, 100] {
                let rq = [Requant {
                    multiplier: m,
                    shift,
                }];
                let q = QuantizedOutput {
                    input_zero_point: -128,
                    filter_zero_point: 0,
                    output_zero_point: zp,
                    requant: &rq,
                    clamp,
                };
                let ch = Channel::bounded(0, Some(&[b]), &q, max);
                let ch = ch.unwrap_or_else(|| panic!("m {m} shift {shift} bias {b}"));
                for acc in (-max..=max).step_by(4_099).chain([max]) {
                    let want = conv::requantize(acc as i32 + b, rq[0], zp, clamp);
                    assert_eq!(ch.apply(acc as i32, OutputStage::new(&q)), want);
                }
            }
        }
        // Not constant over its accumulators and outside the bounds: refused.
        let rq = [Requant {
            multiplier: 1,
            shift: 0,
        }];
        let q = QuantizedOutput {
            input_zero_point: 0,
            filter_zero_point: 0,
            output_zero_point: 0,
            requant: &rq,
            clamp,
        };
        assert!(Channel::bounded(0, Some(&[1 << 30]), &q, max).is_none());
        // ... unless its own weights bound it: a dead filter's accumulator is 0.
        let filter = [3i8, -7, 0, 0, 0, 0];
        let w = Weights {
            filter: &filter,
            taps: 2,
            step: 2,
            stride: 1,
            input_zero_point: 0,
        };
        assert!(Channel::new(0, Some(&[1 << 30, 1 << 30, 1 << 30]), &q, &w).is_none());
        let ch = Channel::new(1, Some(&[1 << 30, 1 << 30, 1 << 30]), &q, &w);
        let want = conv::requantize(1 << 30, rq[0], 0, clamp);
        assert_eq!(ch.map(|c| c.apply(0, OutputStage::new(&q))), Some(want));
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
