//! DEPTHWISE_CONV_2D: 3x3 filters over int16 strips of input rows, others tap by tap.

use super::dsp::{dw_row3x3, expand_row, row3, smlabb, smlatt, sxtab16, sxtab16_ror8};
use super::dsp::{sxtb16, sxtb16_ror8, Window3x3};
use super::output::{Channel, OutputStage, Weights};
use super::{input_offset, offset_pair, word};
use crate::kernels::conv::{tap_range, ConvGeometry, QuantizedOutput};
use crate::kernels::depthwise;

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
    // Other filters: channels in groups of 4 (outer loop: their requantization decoded once),
    // then every output pixel with 4 accumulators in registers over its in-image taps.
    let mut ch = [Channel::default(); 4];
    let mut c0 = 0;
    while c0 < c {
        if !Channel::fill(&mut ch, c0, bias, q, &w) {
            // Outputs written so far are rewritten, all of them, by the portable body.
            return depthwise::depthwise_conv2d_i8_portable(g, q, input, filter, bias, output);
        }
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
pub(super) fn depthwise_3x3(
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
