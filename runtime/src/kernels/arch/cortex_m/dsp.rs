//! The DSP instructions the fast paths use, one function each, and the loops written as one
//! `asm!` block: on ARMv7E-M (`kiln_arm_dsp`) the instructions themselves, elsewhere plain Rust
//! with their semantics (so that the host tests run the layout and loop logic).

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

/// Most taps of a [`TapOffsets`] table (a spread first layer's patch of 8 words per tap and
/// column pair fits `MAX_PATCH`).
pub const MAX_TAPS: usize = super::MAX_PATCH / 8;

/// The input offsets of a filter's taps from its window's first tap, in patch order, and the
/// largest of them (so a reader checks one bound per window, not one per tap).
#[derive(Clone, Copy)]
pub struct TapOffsets {
    offsets: [u32; MAX_TAPS],
    len: usize,
    max: usize,
}

impl TapOffsets {
    /// The offsets `offsets`, or None if there are more than [`MAX_TAPS`] or none.
    pub fn new(offsets: impl Iterator<Item = usize>) -> Option<Self> {
        let mut t = TapOffsets {
            offsets: [0; MAX_TAPS],
            len: 0,
            max: 0,
        };
        for o in offsets {
            *t.offsets.get_mut(t.len)? = u32::try_from(o).ok()?;
            t.len += 1;
            t.max = t.max.max(o);
        }
        (t.len > 0).then_some(t)
    }

    /// The offsets in patch order.
    pub fn offsets(&self) -> &[u32] {
        &self.offsets[..self.len]
    }

    /// The largest offset.
    pub fn max(&self) -> usize {
        self.max
    }
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

    /// The output stage of one accumulator in `$v` (with `Channel`'s 5 words in r0-r3 and r8,
    /// `$t` scratch): MLA, SMMULR, the rounding and zero point in two ADDs, ASR, SSAT; `$v`
    /// ends as the saturated int8 value (see `Channel`).
    macro_rules! requant {
        ($v:literal, $t:literal) => {
            concat!(
                "mla    ",
                $v,
                ", ",
                $v,
                ", r0, r1\n",
                "smmulr ",
                $v,
                ", ",
                $v,
                ", r2\n",
                "add    ",
                $t,
                ", r3, ",
                $v,
                ", lsl #1\n",
                "add    ",
                $v,
                ", ",
                $t,
                ", ",
                $v,
                ", asr #31\n",
                "asr    ",
                $v,
                ", ",
                $v,
                ", r8\n",
                "ssat   ",
                $v,
                ", #8, ",
                $v,
                "\n",
            )
        };
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
                requant!("{s}", "{t}"),
                "strb   {s}, [{o0}], #1",
                "ldr    {s}, [{sums}], #4",
                requant!("{s}", "{t}"),
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
    /// 5 words loaded once (LDM), two bytes a pass: 9.5 instructions per output byte.
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
        // before any, if out is shorter, the offset overflows or the lane is not one of 4).
        let last = (n - 1)
            .checked_mul(stride)
            .expect("output offset overflows");
        let _ = (&out[last], &sums[n - 1][lane]);
        let first = sums[0][lane..].as_ptr();
        let end = first.wrapping_add(4 * n);
        // SAFETY: per window p (`s` advances 16 bytes per window from `&sums[0][lane]` to
        // `end`, n >= 1 windows: one alone first when n is odd, then two a pass; `o` by
        // `stride` per window from `out.as_mut_ptr()`): reads sums[p][lane] and writes
        // out[p * stride], inside the slices checked above; reads the channel's 5 words
        // (`Channel` is `repr(C)`, word-aligned). Registers: r0-r3 and r8 (the channel), the
        // pointers (discarded), the stride, two scratch registers; flags clobbered (CMP, Q).
        // No stack.
        unsafe {
            asm!(
                "ldm    {ch}, {{r0, r1, r2, r3, r8}}",
                "cmp    {t}, #0",
                "beq    2f",
                "ldr    {v}, [{s}], #16",
                requant!("{v}", "{t}"),
                "strb   {v}, [{o}]",
                "add    {o}, {o}, {st}",
                "cmp    {s}, {end}",
                "beq    3f",
                "2:",
                "ldr    {v}, [{s}], #16",
                requant!("{v}", "{t}"),
                "strb   {v}, [{o}]",
                "ldr    {v}, [{s}], #16",
                requant!("{v}", "{t}"),
                "strb   {v}, [{o}, {st}]",
                "add    {o}, {o}, {st}, lsl #1",
                "cmp    {s}, {end}",
                "bne    2b",
                "3:",
                ch = in(reg) ch as *const super::super::Channel,
                s = inout(reg) first => _,
                o = inout(reg) out.as_mut_ptr() => _,
                st = in(reg) stride,
                end = in(reg) end,
                v = out(reg) _,
                t = inout(reg) n & 1 => _,
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

    /// `groups` groups of 4 int8 values of `src`, `step` bytes apart, into one column of a conv
    /// patch of `COLS` (2 or 4) columns: `dst[2 COLS j] = SXTAB16(pair, x_j)`, `dst[2 COLS j +
    /// COLS] = SXTAB16(pair, x_j ROR 8)` for the little-endian word `x_j = src[step j..step j +
    /// 4]` (the other columns' words are left alone).
    #[inline(always)]
    pub fn expand_col<const COLS: usize>(
        src: &[i8],
        groups: usize,
        step: usize,
        pair: u32,
        dst: &mut [u32],
    ) {
        if groups == 0 {
            return;
        }
        // The accesses below: src[..step * (groups - 1) + 4] and dst[..2 * COLS * groups - COLS
        // + 1] (panics here, before any, if a slice is shorter).
        let _ = (
            &src[..step * (groups - 1) + 4],
            &dst[..2 * COLS * (groups - 1) + COLS + 1],
        );
        let end = dst.as_mut_ptr().wrapping_add(2 * COLS * groups);
        // SAFETY: per group j (`d` advances 8 COLS bytes per pass from `dst.as_mut_ptr()`
        // to `end`, groups >= 1 passes): reads src[step j..step j + 4] (LDR, unaligned allowed
        // on ARMv7-M) and writes dst[2 COLS j] and dst[2 COLS j + COLS] (STR, word-aligned),
        // all inside the slices checked above. Registers: the two pointers (discarded), two
        // scratch registers; flags clobbered (CMP). No stack. Contiguous groups (`step == 4`)
        // load with a post-increment, others add the step.
        macro_rules! expand_asm {
            ($($load:expr),+) => {
                asm!(
                    "2:",
                    $($load,)+
                    "sxtab16 {a}, {pair}, {v}",
                    "sxtab16 {v}, {pair}, {v}, ror #8",
                    "str     {v}, [{d}, #{b}]",
                    "str     {a}, [{d}], #{next}",
                    "cmp     {d}, {end}",
                    "bne     2b",
                    s = inout(reg) src.as_ptr() => _,
                    d = inout(reg) dst.as_mut_ptr() => _,
                    step = in(reg) step,
                    pair = in(reg) pair,
                    end = in(reg) end,
                    v = out(reg) _,
                    a = out(reg) _,
                    b = const 4 * COLS,
                    next = const 8 * COLS,
                    options(nostack),
                )
            };
        }
        unsafe {
            if step == 4 {
                expand_asm!("ldr     {v}, [{s}], #4", "/* {step} */");
            } else {
                expand_asm!("ldr     {v}, [{s}]", "add     {s}, {s}, {step}");
            }
        }
    }

    /// One column of a four-column patch group: the word that `$load` puts in `{v}` becomes
    /// its A half (`SXTAB16`, stored at byte offset `$a` from `{d}`) and B half (`ROR 8`, at
    /// `$b`).
    macro_rules! patch_column {
        ($load:literal, $a:literal, $b:literal) => {
            concat!(
                $load,
                "\n",
                "sxtab16 {a}, {pair}, {v}\n",
                "sxtab16 {v}, {pair}, {v}, ror #8\n",
                "str     {a}, [{d}, #",
                $a,
                "]\n",
                "str     {v}, [{d}, #",
                $b,
                "]\n",
            )
        };
    }

    /// The fields of four output pixels of a spread first layer, every tap one element group:
    /// for tap `t` and column `c`, the little-endian word `x = src[origins[c] + off_t..+ 4]`
    /// becomes `dst[8 t + c] = SXTAB16(pair, x)` and `dst[8 t + 4 + c] = SXTAB16(pair, x ROR
    /// 8)` (the four-column patch layout of [`conv_rows4`]). Per tap: one load of its offset,
    /// per column one load, two SXTAB16 and two stores, 23 instructions with the loop.
    #[inline(always)]
    pub fn expand_taps4(
        src: &[i8],
        origins: [usize; 4],
        taps: &super::TapOffsets,
        pair: u32,
        dst: &mut [u32],
    ) {
        let offsets = taps.offsets();
        // The accesses below: src[origin + off..+ 4] for every column and tap (off <= max),
        // dst[..8 * taps] (panics here, before any, if one is outside).
        for o in origins {
            let _ = &src[o..o + taps.max() + 4];
        }
        let dst = &mut dst[..8 * offsets.len()];
        let end = dst.as_mut_ptr_range().end;
        let base = src.as_ptr();
        // SAFETY: per tap t (`tab` advances 4 bytes per pass over `offsets`, `d` 32 bytes
        // from `dst.as_mut_ptr()` to `end`, len >= 1 passes): reads offsets[t] (LDR, aligned
        // u32) and the word at `src + origins[c] + offsets[t]` (LDR, unaligned allowed on
        // ARMv7-M), inside `src` by the checks above; writes dst[8t..8t + 8] (STR,
        // word-aligned). Registers: the pointers (discarded), the column bases, four scratch;
        // flags clobbered (CMP). No stack.
        unsafe {
            asm!(
                "2:",
                "ldr     {o}, [{tab}], #4",
                "ldr     {v}, [{s0}, {o}]",
                "sxtab16 {a0}, {pair}, {v}",
                "sxtab16 {v}, {pair}, {v}, ror #8",
                "str     {v}, [{d}, #16]",
                patch_column!("ldr     {v}, [{s1}, {o}]", "4", "20"),
                patch_column!("ldr     {v}, [{s2}, {o}]", "8", "24"),
                patch_column!("ldr     {v}, [{s3}, {o}]", "12", "28"),
                "str     {a0}, [{d}], #32",
                "cmp     {d}, {end}",
                "bne     2b",
                tab = inout(reg) offsets.as_ptr() => _,
                d = inout(reg) dst.as_mut_ptr() => _,
                end = in(reg) end,
                pair = in(reg) pair,
                s0 = in(reg) base.wrapping_add(origins[0]),
                s1 = in(reg) base.wrapping_add(origins[1]),
                s2 = in(reg) base.wrapping_add(origins[2]),
                s3 = in(reg) base.wrapping_add(origins[3]),
                o = out(reg) _,
                v = out(reg) _,
                a = out(reg) _,
                a0 = out(reg) _,
                options(nostack),
            );
        }
    }

    /// The fields of four consecutive pixels of a 1x1 layer (`stride` bytes each, the
    /// input's channel count): for group `j` and column `c`, the little-endian word `x =
    /// src[c stride + 4j..+ 4]` becomes `dst[8j + c] = SXTAB16(pair, x)` and `dst[8j + 4 +
    /// c] = SXTAB16(pair, x ROR 8)` (the four-column patch layout of [`conv_rows4`]). 22
    /// instructions per group of the four pixels.
    #[inline(always)]
    pub fn expand_pixels4(src: &[i8], stride: usize, groups: usize, pair: u32, dst: &mut [u32]) {
        if groups == 0 {
            return;
        }
        // The accesses below: src[..3 * stride + 4 * groups], dst[..8 * groups] (panics here,
        // before any, if a slice is shorter or the span overflows).
        let span = stride
            .checked_mul(3)
            .and_then(|s| s.checked_add(groups.checked_mul(4)?));
        let src = &src[..span.expect("pixel span overflows")];
        let dst = &mut dst[..8 * groups];
        let end = dst.as_mut_ptr_range().end;
        // SAFETY: per group j (`d` advances 32 bytes per pass from `dst.as_mut_ptr()` to
        // `end`, groups >= 1 passes; `s0` and `s3` 4 bytes from src and src + 3 stride):
        // reads the words at src + c stride + 4j, c < 4 (LDR, unaligned allowed), writes
        // dst[8j..8j + 8] (STR, word-aligned); all inside the slices checked above.
        // Registers: the pointers (discarded), the stride and offset, two scratch; flags
        // clobbered (CMP). No stack.
        unsafe {
            asm!(
                "2:",
                patch_column!("ldr     {v}, [{s0}, {st}]", "4", "20"),
                patch_column!("ldr     {v}, [{s0}, {st}, lsl #1]", "8", "24"),
                patch_column!("ldr     {v}, [{s3}], #4", "12", "28"),
                "ldr     {v}, [{s0}], #4",
                "sxtab16 {a}, {pair}, {v}",
                "sxtab16 {v}, {pair}, {v}, ror #8",
                "str     {v}, [{d}, #16]",
                "str     {a}, [{d}], #32",
                "cmp     {d}, {end}",
                "bne     2b",
                s0 = inout(reg) src.as_ptr() => _,
                s3 = inout(reg) src.as_ptr().wrapping_add(3 * stride) => _,
                d = inout(reg) dst.as_mut_ptr() => _,
                st = in(reg) stride,
                end = in(reg) end,
                pair = in(reg) pair,
                v = out(reg) _,
                a = out(reg) _,
                options(nostack),
            );
        }
    }

    /// Element groups in [`conv_rows4`]'s unrolled chain.
    const CHAIN: usize = 16;
    /// Bytes of one element group's code in the chain: 13 instructions, all 32-bit encodings
    /// (the `asm!` checks the chain's length).
    const GROUP_BYTES: usize = 52;

    /// One element group of [`conv_rows4`]: the weight word and its two SXTB16 halves
    /// against the A and B words of the four columns (13 instructions for 16 MACs).
    macro_rules! rows4_group {
        () => {
            concat!(
                "ldr.w   {u}, [{w}], #4\n",
                "sxtb16  {a}, {u}\n",
                "sxtb16  {u}, {u}, ror #8\n",
                "ldmia.w {x}!, {{r4, r5, r8, r9}}\n",
                "smlad   r0, r4, {a}, r0\n",
                "smlad   r1, r5, {a}, r1\n",
                "smlad   r2, r8, {a}, r2\n",
                "smlad   r3, r9, {a}, r3\n",
                "ldmia.w {x}!, {{r4, r5, r8, r9}}\n",
                "smlad   r0, r4, {u}, r0\n",
                "smlad   r1, r5, {u}, r1\n",
                "smlad   r2, r8, {u}, r2\n",
                "smlad   r3, r9, {u}, r3\n",
            )
        };
    }

    /// One output channel against a packed four-pixel patch, for every channel of `rows`
    /// in one loop: for channel `c` in `0..sums.len()`, `sums[c] = [w . col0, w . col1,
    /// w . col2, w . col3]` over the patch's `groups` element groups (`[A col0..col3, B
    /// col0..col3]` per group) with `w = rows[ck..]`. Per 4 patch elements: one weight
    /// word, its two SXTB16 halves, two LDM of 4 patch words, 8 SMLAD (16 MACs in 13
    /// instructions). The groups run as an unrolled chain of [`CHAIN`]: each channel enters
    /// it part-way (computed jump) so that the first pass sums `groups % CHAIN` groups (or a
    /// whole chain), then whole chains; no loop counter per group. `patch` holds the groups'
    /// `8 * groups` words and, after them, 4 words of loop state that this writes: the
    /// patch's bytes, `k - 4 * groups`, and the sums' cursor and end.
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
        // The first pass's groups (1..=CHAIN) and the chain bytes it skips; +1: the Thumb
        // bit of the entry address (LDR PC interworks).
        let first = (groups - 1) % CHAIN + 1;
        let skip = (CHAIN - first) * GROUP_BYTES + 1;
        // SAFETY: per channel, the chain reads the 8 * groups patch words from
        // `body.as_ptr()` to `end` (LDM, word-aligned): the first pass `first` groups, each
        // further pass CHAIN, until `x == end` (checked after each pass: groups - first is
        // a multiple of CHAIN); and 4 * groups bytes of the channel's row (LDR, unaligned
        // allowed); w then moves to the next row (`+ k - 4 * groups`). The entry is the
        // chain's start plus `skip` bytes: every group is GROUP_BYTES of code (the `.ifne`
        // below fails the build otherwise), so it is the first instruction of group
        // CHAIN - first. It reads and writes the 4 state words at `end` (inside `patch`),
        // writes 16 bytes per channel to `sums[c]` through the cursor (STM of r0-r3 in
        // register order), stopping at the sums' end (n >= 1). Stack: 8 bytes (the patch
        // end and the entry), pushed and popped here. Registers: r0-r5, r8, r9 (sums, patch
        // words), the pointers (discarded), two scratch registers; flags clobbered (CMP, Q).
        unsafe {
            asm!(
                "str     {a}, [sp, #-8]!",
                "adr.w   {a}, 6f",
                "add     {u}, {u}, {a}",
                "str     {u}, [sp, #4]",
                "movs    r0, #0",
                "movs    r1, #0",
                "movs    r2, #0",
                "movs    r3, #0",
                "ldr     pc, [sp, #4]",
                ".p2align 2",
                "6:",
                rows4_group!(), rows4_group!(), rows4_group!(), rows4_group!(),
                rows4_group!(), rows4_group!(), rows4_group!(), rows4_group!(),
                rows4_group!(), rows4_group!(), rows4_group!(), rows4_group!(),
                rows4_group!(), rows4_group!(), rows4_group!(), rows4_group!(),
                "7:",
                ".ifne (7b - 6b) - {chain_bytes}",
                ".error \"conv_rows4: a chain group is not GROUP_BYTES bytes of code\"",
                ".endif",
                "ldr     {a}, [sp]",
                "cmp     {x}, {a}",
                "bne     6b",
                "ldrd    r4, r5, [{x}, #8]",
                "stmia   r4!, {{r0, r1, r2, r3}}",
                "str     r4, [{x}, #8]",
                "cmp     r4, r5",
                "beq     4f",
                "ldrd    r4, r5, [{x}]",
                "sub     {x}, {x}, r4",
                "add     {w}, {w}, r5",
                "movs    r0, #0",
                "movs    r1, #0",
                "movs    r2, #0",
                "movs    r3, #0",
                "ldr     pc, [sp, #4]",
                "4:",
                "add     sp, sp, #8",
                x = inout(reg) body.as_ptr() => _,
                w = inout(reg) rows.as_ptr() => _,
                a = inout(reg) end => _,
                u = inout(reg) skip => _,
                chain_bytes = const CHAIN * GROUP_BYTES,
                out("r0") _,
                out("r1") _,
                out("r2") _,
                out("r3") _,
                out("r4") _,
                out("r5") _,
                out("r8") _,
                out("r9") _,
            );
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
                requant!("{s}", "{t}"),
                "strb   {s}, [{o}, {st}]",
                "ldr    {s}, [{sums}, #8]",
                requant!("{s}", "{t}"),
                "strb   {s}, [{o}, {st}, lsl #1]",
                "ldr    {s}, [{sums}, #12]",
                requant!("{s}", "{t}"),
                "add    {t}, {o}, {st}, lsl #1",
                "strb   {s}, [{t}, {st}]",
                "ldr    {s}, [{sums}], #16",
                requant!("{s}", "{t}"),
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
        step: usize,
        pair: u32,
        dst: &mut [u32],
    ) {
        for j in 0..groups {
            let x = &src[step * j..][..4];
            let x = u32::from_le_bytes([x[0] as u8, x[1] as u8, x[2] as u8, x[3] as u8]);
            dst[2 * COLS * j] = sxtab16(pair, x);
            dst[2 * COLS * j + COLS] = sxtab16_ror8(pair, x);
        }
    }

    /// The fields of four pixels of a spread first layer (see the `asm!` version).
    pub fn expand_taps4(
        src: &[i8],
        origins: [usize; 4],
        taps: &super::TapOffsets,
        pair: u32,
        dst: &mut [u32],
    ) {
        for o in origins {
            let _ = &src[o..o + taps.max() + 4];
        }
        for (t, &off) in taps.offsets().iter().enumerate() {
            for (c, &o) in origins.iter().enumerate() {
                let x = &src[o + off as usize..][..4];
                let x = u32::from_le_bytes([x[0] as u8, x[1] as u8, x[2] as u8, x[3] as u8]);
                dst[8 * t + c] = sxtab16(pair, x);
                dst[8 * t + 4 + c] = sxtab16_ror8(pair, x);
            }
        }
    }

    /// The fields of four consecutive pixels of a 1x1 layer (see the `asm!` version).
    pub fn expand_pixels4(src: &[i8], stride: usize, groups: usize, pair: u32, dst: &mut [u32]) {
        if groups == 0 {
            return;
        }
        let src = &src[..3 * stride + 4 * groups];
        for c in 0..4 {
            expand_col::<4>(&src[c * stride..], groups, 4, pair, &mut dst[c..]);
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
        if sums.is_empty() || groups == 0 {
            sums.fill([0; 4]);
            return;
        }
        assert!(4 * groups <= k, "patch groups exceed the filter rows");
        let _ = (&rows[..sums.len() * k], &patch[..8 * groups + 4]);
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
        // The asm version leaves its loop state in these words: so does its twin.
        patch[8 * groups..8 * groups + 4].fill(0xdead_beef);
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
        // The asm version's checks.
        assert!(
            w.row.is_multiple_of(8) && w.advance.is_multiple_of(8),
            "strip offsets must be word pairs"
        );
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
        if sums.is_empty() || groups == 0 {
            sums.fill([0; 4]);
            return;
        }
        assert!(4 * groups <= k, "patch groups exceed the filter rows");
        let _ = (&rows[..2 * sums.len() * k], &patch[..4 * groups + 5]);
        let body = &patch[..4 * groups];
        for (p, s) in sums.iter_mut().enumerate() {
            let w0 = &rows[2 * p * k..][..4 * groups];
            let w1 = &rows[(2 * p + 1) * k..][..4 * groups];
            *s = block_2x2(body, w0, w1);
        }
        // The asm version leaves its loop state in these words: so does its twin.
        patch[4 * groups..4 * groups + 5].fill(0xdead_beef);
    }

    /// The full-range output stage of two pixels (see the `asm!` version).
    pub fn store_two(
        out0: &mut [i8],
        out1: &mut [i8],
        sums: &[[i32; 2]],
        channels: &[super::super::Channel],
    ) {
        // The asm version's checks.
        let n = channels.len();
        let (out0, out1, sums) = (&mut out0[..n], &mut out1[..n], &sums[..n]);
        let each = out0.iter_mut().zip(out1.iter_mut()).zip(sums).zip(channels);
        for (((o0, o1), s), ch) in each {
            *o0 = ch.saturated(s[0]) as i8;
            *o1 = ch.saturated(s[1]) as i8;
        }
    }

    /// The 2x2 CONV_2D block (see the `asm!` version), group by group.
    pub fn block_2x2(x: &[u32], w0: &[i8], w1: &[i8]) -> [i32; 4] {
        // The asm version's checks.
        let groups = x.len() / 4;
        let (x, w0, w1) = (&x[..4 * groups], &w0[..4 * groups], &w1[..4 * groups]);
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
