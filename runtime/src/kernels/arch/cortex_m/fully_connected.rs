//! FULLY_CONNECTED: the input row packed once, weight rows in pairs.

use super::dsp::{smlad, sxtab16, sxtab16_ror8, sxtb16, sxtb16_ror8};
use super::output::{Channel, OutputStage, Weights, CHANNELS};
use super::{input_offset, offset_pair, word, MAX_FC_FEATURES, MAX_PATCH};
use crate::kernels::conv::QuantizedOutput;
use crate::kernels::fully_connected::{self, FullyConnectedGeometry};

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
        Some(off) if q.filter_zero_point == 0 && n <= MAX_FC_FEATURES && g.out_features > 0 => off,
        _ => {
            return fully_connected::fully_connected_i8_portable(g, q, input, weights, bias, output)
        }
    };
    let pair = offset_pair(off);
    let w = Weights::rows(weights, n, q.input_zero_point);
    let whole = 4 * (n / 4);
    let outs = g.out_features;
    let stage = OutputStage::new(q);
    let mut buf = [0u32; MAX_PATCH];
    let mut channels = [Channel::default(); CHANNELS];
    // Outputs in chunks of CHANNELS, their output stage decoded once for every batch row.
    let mut o_lo = 0;
    while o_lo < outs {
        let m = core::cmp::min(CHANNELS, outs - o_lo);
        let channels = &mut channels[..m];
        if !Channel::fill(channels, o_lo, bias, q, &w) {
            // Outputs written so far are rewritten, all of them, by the portable body.
            return fully_connected::fully_connected_i8_portable(
                g, q, input, weights, bias, output,
            );
        }
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
            let out = &mut output[b * outs + o_lo..][..m];
            let mut o = 0;
            while o < m {
                let o1 = if o + 1 < m { o + 1 } else { o };
                let w0 = &weights[(o_lo + o) * n..][..n];
                let w1 = &weights[(o_lo + o1) * n..][..n];
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
                out[o] = channels[o].apply(a0, stage);
                if o1 != o {
                    out[o1] = channels[o1].apply(a1, stage);
                }
                o += 2;
            }
        }
        o_lo += m;
    }
}
