//! CONV_2D: receptive fields packed into a stack patch, every channel summed against it in one
//! `asm!` loop.

use super::dsp::{
    self, block_2x2, conv_rows, conv_rows4, expand_col, expand_pixels4, expand_taps4, smlad,
    sxtb16, sxtb16_ror8, TapOffsets,
};
use super::output::{Channel, OutputStage, Weights, CHANNELS};
use super::{offset_pair, MAX_PATCH};
use crate::kernels::conv::{self, tap_range, ConvGeometry, QuantizedOutput};

/// Word index and bit shift of patch element `k` of column `col` in a patch of `COLS` (2 or 4)
/// columns: element group `k / 4` owns words `2 COLS (k / 4) ..+ 2 COLS` = `[A col0 .. A
/// col(COLS-1), B col0 .. B col(COLS-1)]`, with `A = [v0, v2]`, `B = [v1, v3]` (low half
/// first).
#[inline(always)]
pub(super) fn slot<const COLS: usize>(k: usize, col: usize) -> (usize, u32) {
    (
        2 * COLS * (k / 4) + COLS * (k & 1) + col,
        16 * ((k >> 1) & 1) as u32,
    )
}

/// Writes the int16 `v` into patch element `k` of column `col`.
#[inline(always)]
pub(super) fn put<const COLS: usize>(buf: &mut [u32], k: usize, col: usize, v: i32) {
    let (w, s) = slot::<COLS>(k, col);
    buf[w] = (buf[w] & !(0xffff << s)) | ((v as u16 as u32) << s);
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
pub(super) fn fill_column<const COLS: usize>(
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
        return expand_col::<COLS>(&input[p * fic..][..fic], fic / 4, 4, pair, &mut buf[col..]);
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
            let at = COLS * k0 / 2 + col;
            expand_col::<COLS>(src, src.len() / 4, 4, pair, &mut buf[at..]);
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
        expand_col::<COLS>(stage, whole / 4, 4, pair, &mut buf[col..]);
        let off = -i32::from(pad);
        for (t, &v) in stage[whole..k].iter().enumerate() {
            put::<COLS>(buf, whole + t, col, i32::from(v) + off);
        }
    }
}

/// Column `col`'s field of pixel `p` (as [`fill_column`]) for a layer of 1 to 3 channels whose
/// filter rows are spread to 4 values a tap ([`spread_rows`]): each tap is one element group, read as the 4 input bytes at its
/// pixel (its channels, then the next pixel's first bytes, which meet zero weights), so a row
/// of in-image taps is one [`expand_col`] with the input's pixel stride; padding taps are zero
/// words. Taps at the very end of the input, whose word would run past it, are read through a
/// copy.
fn fill_spread<const COLS: usize>(
    g: &ConvGeometry,
    input: &[i8],
    pair: u32,
    p: usize,
    col: usize,
    buf: &mut [u32],
) {
    let px_per_image = g.out_h * g.out_w;
    let (b, rest) = (p / px_per_image, p % px_per_image);
    let (oy, ox) = (rest / g.out_w, rest % g.out_w);
    let in_y0 = (oy * g.stride_h) as isize - g.pad_top as isize;
    let in_x0 = (ox * g.stride_w) as isize - g.pad_left as isize;
    let (fx0, fx1) = tap_range(in_x0, g.dilation_w, g.filter_w, g.in_w);
    // Taps t0 .. t1 of filter row fy: zero groups.
    let zeros = |buf: &mut [u32], fy: usize, t0: usize, t1: usize| {
        let first = fy * g.filter_w;
        let (w0, w1) = (2 * COLS * (first + t0), 2 * COLS * (first + t1));
        for d in buf[w0..w1].chunks_exact_mut(2 * COLS) {
            d[col] = 0;
            d[COLS + col] = 0;
        }
    };
    let step = g.dilation_w * g.in_c;
    for fy in 0..g.filter_h {
        let iy = in_y0 + (g.dilation_h * fy) as isize;
        if iy < 0 || iy as usize >= g.in_h || fx1 == fx0 {
            zeros(buf, fy, 0, g.filter_w);
            continue;
        }
        zeros(buf, fy, 0, fx0);
        zeros(buf, fy, fx1, g.filter_w);
        let row = (b * g.in_h + iy as usize) * g.in_w;
        let first = (row + (in_x0 + (g.dilation_w * fx0) as isize) as usize) * g.in_c;
        let n = fx1 - fx0;
        // The taps whose 4 bytes lie inside the input (all but the last one to three at the
        // very end of the input).
        let whole = if first + step * (n - 1) + 4 <= input.len() {
            n
        } else if input.len() >= first + 4 {
            core::cmp::min(n, (input.len() - first - 4) / step + 1)
        } else {
            0
        };
        let at = 2 * COLS * (fy * g.filter_w + fx0) + col;
        expand_col::<COLS>(&input[first..], whole, step, pair, &mut buf[at..]);
        for t in whole..n {
            let mut word = [0i8; 4];
            for (w, &x) in word.iter_mut().zip(&input[first + step * t..]) {
                *w = x;
            }
            expand_col::<COLS>(&word, 1, 4, pair, &mut buf[at + 2 * COLS * t..]);
        }
    }
}

/// The input offsets of a spread layer's taps from its window's first tap, in `(fy, fx)` order.
fn tap_offsets(g: &ConvGeometry) -> Option<TapOffsets> {
    let (row, tap) = (g.dilation_h * g.in_w * g.in_c, g.dilation_w * g.in_c);
    let offsets = (0..g.filter_h).flat_map(|fy| (0..g.filter_w).map(move |fx| fy * row + fx * tap));
    TapOffsets::new(offsets)
}

/// The spread fields of pixels `p .. p + m` (m <= 4) into the four-column patch. Interior
/// windows (every tap in the image, the last tap's 4-byte word inside `input`: no padding, no
/// copy) of the pixels in `p`'s output row go all at once through [`expand_taps4`] (the other
/// columns borrow an interior window there); every other pixel then goes through
/// [`fill_spread`], which rewrites its whole column.
fn fill_spread_quad(
    g: &ConvGeometry,
    input: &[i8],
    pair: u32,
    taps: &TapOffsets,
    p: usize,
    m: usize,
    buf: &mut [u32],
) {
    let px_per_image = g.out_h * g.out_w;
    let (b, rest) = (p / px_per_image, p % px_per_image);
    let (oy, ox) = (rest / g.out_w, rest % g.out_w);
    let mut origins = [None; 4];
    let iy = (oy * g.stride_h).checked_sub(g.pad_top);
    if let Some(iy) = iy.filter(|&iy| iy + g.dilation_h * (g.filter_h - 1) < g.in_h) {
        let row = (b * g.in_h + iy) * g.in_w;
        let reach = g.dilation_w * (g.filter_w - 1);
        for (col, o) in origins.iter_mut().enumerate().take(m.min(g.out_w - ox)) {
            *o = ((ox + col) * g.stride_w)
                .checked_sub(g.pad_left)
                .filter(|&ix| ix + reach < g.in_w)
                .map(|ix| (row + ix) * g.in_c)
                .filter(|&o| o + taps.max() + 4 <= input.len());
        }
    }
    if let Some(&any) = origins.iter().flatten().next() {
        expand_taps4(input, origins.map(|o| o.unwrap_or(any)), taps, pair, buf);
    }
    for (col, o) in origins.iter().enumerate().take(m) {
        if o.is_none() {
            fill_spread::<4>(g, input, pair, p + col, col, buf);
        }
    }
}

/// True for a layer of 1 to 3 channels whose filter rows, spread to 4 values a tap, fit
/// [`SPREAD_WEIGHTS`] and whose spread patch fits the four-pixel path.
fn spreads(g: &ConvGeometry) -> bool {
    let (fic, taps) = (g.filter_in_c, g.filter_h * g.filter_w);
    (1..4).contains(&fic)
        && fic == g.in_c
        && g.out_c * taps * 4 <= SPREAD_WEIGHTS
        && 8 * taps <= MAX_PATCH
}

/// The filter rows of a layer that [`spreads`], 4 values a tap (its weights, then zeros), for
/// [`fill_spread`]'s fields.
fn spread_rows(g: &ConvGeometry, filter: &[i8]) -> [i8; SPREAD_WEIGHTS] {
    let mut out = [0i8; SPREAD_WEIGHTS];
    let fic = g.filter_in_c;
    for (o, w) in out.chunks_exact_mut(4).zip(filter.chunks_exact(fic)) {
        o[..fic].copy_from_slice(w);
    }
    out
}

/// `dst.copy_from_slice(src)` for the few bytes of one filter row of a first layer (3x3x3 rows
/// are 9, 10x4x1 rows 4): word moves and a byte tail.
#[inline(always)]
pub(super) fn copy_short(dst: &mut [i8], src: &[i8]) {
    let mut d = dst.chunks_exact_mut(4);
    let mut s = src.chunks_exact(4);
    for (d, s) in (&mut d).zip(&mut s) {
        d.copy_from_slice(s);
    }
    for (d, &s) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *d = s;
    }
}

/// The last 1 to 3 weights of a filter row as a group's packed halves `(A, B)`, zeros for the
/// missing elements: the patch's tail group holds stale halves there (loop state overwrites
/// them), which a zero weight cancels exactly.
#[inline(always)]
fn tail_weights(tail: &[i8]) -> (u32, u32) {
    let byte = |i: usize| tail.get(i).map_or(0, |&w| w as u8);
    let w = u32::from_le_bytes([byte(0), byte(1), byte(2), 0]);
    (sxtb16(w), sxtb16_ror8(w))
}

/// True for a 1x1 conv with stride 1 and no padding: output pixel `p` reads input pixel `p`.
pub(super) fn pointwise(g: &ConvGeometry) -> bool {
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
/// elements, an int8 input zero point, any stride, dilation and padding (1x1, 3x3 and the
/// rest), every output channel within the fast output stage's bounds. Patches of up to
/// `MAX_PATCH / 2` elements go four output pixels at a time ([`conv_by_four`]), larger ones two
/// ([`conv_by_two`]); patch tails of fewer than 4 elements are one more SMLAD pair against
/// zero-padded weights.
pub fn conv2d_i8(
    g: &ConvGeometry,
    q: &QuantizedOutput<'_>,
    input: &[i8],
    filter: &[i8],
    bias: Option<&[i32]>,
    output: &mut [i8],
) {
    let k = g.filter_h * g.filter_w * g.filter_in_c;
    // Padding taps hold the zero point as an int8 (true of every int8 tensor).
    let pad = match i8::try_from(q.input_zero_point) {
        Ok(pad) if g.filter_in_c == g.in_c && k <= MAX_PATCH && k > 0 && g.out_c > 0 => pad,
        _ => return conv::conv2d_i8_portable(g, q, input, filter, bias, output),
    };
    let pair = offset_pair(-i32::from(pad));
    debug_assert_eq!(filter.len(), g.out_c * k);
    debug_assert_eq!(output.len(), g.batch * g.out_h * g.out_w * g.out_c);
    // A first layer of 1 to 3 channels whose weights fit SPREAD_WEIGHTS: taps as whole element
    // groups (4 values each, zero weights after its channels).
    let taps = if spreads(g) { tap_offsets(g) } else { None };
    let spread_buf: [i8; SPREAD_WEIGHTS];
    let (rows, k) = if taps.is_some() {
        spread_buf = spread_rows(g, filter);
        let taps = g.filter_h * g.filter_w;
        (&spread_buf[..g.out_c * taps * 4], 4 * taps)
    } else {
        (filter, k)
    };
    let weights = Weights::rows(rows, k, q.input_zero_point);
    let cx = ConvCall {
        g,
        q,
        input,
        filter,
        bias,
        pad,
        pair,
        weights,
        rows,
        k,
        taps,
    };
    if 2 * k <= MAX_PATCH {
        conv_by_four(&cx, output)
    } else {
        conv_by_two(&cx, output)
    }
}

/// Bytes of spread first-layer weights kept on the stack (VWW's 3x3x3 by 8 channels take 288,
/// ResNet-8's by 16 take 576).
const SPREAD_WEIGHTS: usize = 640;

/// One CONV_2D call's operands, checked by [`conv2d_i8`]: `pad` is the input zero point as an
/// int8, `pair` the offset `-pad` in both int16 halves.
pub(super) struct ConvCall<'a> {
    g: &'a ConvGeometry,
    q: &'a QuantizedOutput<'a>,
    input: &'a [i8],
    filter: &'a [i8],
    bias: Option<&'a [i32]>,
    pad: i8,
    pair: u32,
    /// The bound of the accumulators, over `rows`.
    weights: Weights<'a>,
    /// The filter rows the fast path reads (`filter`, or its spread copy), `k` values each.
    rows: &'a [i8],
    k: usize,
    /// A first layer of 1 to 3 channels whose fields are spread to 4 values a tap
    /// ([`fill_spread`], [`fill_spread_quad`]): its taps' input offsets.
    taps: Option<TapOffsets>,
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
/// channel against them (13 instructions per 16 MACs), the patch tail (fewer than 4 elements)
/// is one SMLAD pair per column and `store_four` (full-range clamp) or
/// [`OutputStage::store_each`] requantizes. A last group of fewer than 4 pixels leaves stale
/// columns, whose sums are unused.
#[inline(never)]
pub(super) fn conv_by_four(cx: &ConvCall<'_>, output: &mut [i8]) {
    let ConvCall {
        g,
        q,
        input,
        bias,
        pad,
        pair,
        rows: filter,
        k,
        ref taps,
        ..
    } = *cx;
    let pixels = g.batch * g.out_h * g.out_w;
    let out_c = g.out_c;
    let whole = 4 * (k / 4);
    let stage = OutputStage::new(q);
    // A 1x1 layer whose fields are whole input pixels of whole element groups.
    let whole_pixels = taps.is_none() && g.filter_in_c.is_multiple_of(4) && pointwise(g);
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
            if let Some(taps) = taps {
                fill_spread_quad(g, input, pair, taps, p, m, &mut buf);
            } else if whole_pixels && m == 4 {
                let fic = g.filter_in_c;
                expand_pixels4(&input[p * fic..], fic, fic / 4, pair, &mut buf);
            } else {
                for col in 0..m {
                    let (px, b) = (p + col, &mut buf);
                    fill_column::<4>(g, input, pad, pair, px, col, b, &mut field);
                }
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
                    let (wa, wb) = tail_weights(&row[whole..]);
                    for (col, a) in s.iter_mut().enumerate() {
                        *a = smlad(tail_words[4 + col], wb, smlad(tail_words[col], wa, *a));
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
pub(super) fn conv_by_two(cx: &ConvCall<'_>, output: &mut [i8]) {
    let ConvCall {
        g,
        q,
        input,
        bias,
        pad,
        pair,
        rows: filter,
        k,
        ..
    } = *cx;
    // Spread first layers have patches of at most `MAX_PATCH / 2` (`spreads`): four pixels.
    debug_assert!(cx.taps.is_none(), "spread layers go four pixels at a time");
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
                let b = &mut buf;
                fill_column::<2>(g, input, pad, pair, p + 1, 1, b, &mut field);
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
                    let (wa, wb) = tail_weights(&row[whole..]);
                    for (col, a) in s.iter_mut().enumerate() {
                        *a = smlad(tail_words[2 + col], wb, smlad(tail_words[col], wa, *a));
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
