//! PAD: constant padding of a (left-padded to) 4-D tensor, any element type.
//!
//! The fill value is the output zero point for int8 (TFLite pads with the quantized zero) and
//! `0.0` for float.

use crate::graph::PadParams;

/// Output shape of [`pad`]: `before + in_shape + after` per dimension.
pub fn padded_shape(in_shape: [usize; 4], p: &PadParams) -> [usize; 4] {
    core::array::from_fn(|d| p.before[d] as usize + in_shape[d] + p.after[d] as usize)
}

/// Pads `input` (shape `in_shape`, 4-D, left-padded with 1) with `fill`: `p.before[d]` elements
/// before and `p.after[d]` after each dimension `d`. `output` has shape
/// [`padded_shape`]`(in_shape, p)`.
pub fn pad<T: Copy>(in_shape: [usize; 4], p: &PadParams, fill: T, input: &[T], output: &mut [T]) {
    let out_shape = padded_shape(in_shape, p);
    debug_assert_eq!(input.len(), in_shape.iter().product::<usize>());
    debug_assert_eq!(output.len(), out_shape.iter().product::<usize>());
    let before: [usize; 4] = core::array::from_fn(|d| p.before[d] as usize);
    let row = out_shape[3];
    if row == 0 {
        return;
    }
    // Walk the output one innermost row at a time; rows whose outer index falls in the padding
    // are all fill, the others are fill + an input row + fill.
    let (c_before, c_in) = (before[3], in_shape[3]);
    let mut in_rows = input.chunks_exact(c_in.max(1));
    let mut rows = output.chunks_exact_mut(row);
    for b in 0..out_shape[0] {
        let b_in = b.wrapping_sub(before[0]) < in_shape[0];
        for h in 0..out_shape[1] {
            let h_in = b_in && h.wrapping_sub(before[1]) < in_shape[1];
            for w in 0..out_shape[2] {
                let w_in = h_in && w.wrapping_sub(before[2]) < in_shape[2];
                let Some(dst) = rows.next() else {
                    return;
                };
                if w_in {
                    dst[..c_before].fill(fill);
                    if c_in > 0 {
                        if let Some(src) = in_rows.next() {
                            dst[c_before..c_before + c_in].copy_from_slice(src);
                        }
                    }
                    dst[c_before + c_in..].fill(fill);
                } else {
                    dst.fill(fill);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use proptest::prelude::*;
    use std::vec::Vec;

    fn config() -> ProptestConfig {
        ProptestConfig {
            cases: 64,
            ..ProptestConfig::default()
        }
    }

    #[test]
    fn small_example() {
        // [1,1,2,2] padded by one column on each side and one row below.
        let p = PadParams {
            before: [0, 0, 1, 0],
            after: [0, 1, 1, 0],
        };
        let mut out = [0i8; 16];
        pad([1, 1, 2, 2], &p, -128, &[1, 2, 3, 4], &mut out);
        #[rustfmt::skip]
        assert_eq!(out, [
            -128, -128, 1, 2, 3, 4, -128, -128,
            -128, -128, -128, -128, -128, -128, -128, -128,
        ]);
        // Channel padding.
        let p = PadParams {
            before: [0, 0, 0, 1],
            after: [0, 0, 0, 2],
        };
        let mut out = [9f32; 10];
        pad([1, 1, 2, 2], &p, 0.0, &[1.0, 2.0, 3.0, 4.0], &mut out);
        assert_eq!(out, [0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 3.0, 4.0, 0.0, 0.0]);
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn matches_reference(
            in_shape in proptest::array::uniform4(0usize..4),
            before in proptest::array::uniform4(0u32..3),
            after in proptest::array::uniform4(0u32..3),
            fill in any::<i8>(),
        ) {
            let p = PadParams { before, after };
            let out_shape = padded_shape(in_shape, &p);
            let n_in: usize = in_shape.iter().product();
            let input: Vec<i16> = (0..n_in as i16).map(|i| i + 1000).collect();
            let mut out = std::vec![0i16; out_shape.iter().product()];
            pad(in_shape, &p, fill as i16, &input, &mut out);
            let mut i = 0;
            for b in 0..out_shape[0] {
                for h in 0..out_shape[1] {
                    for w in 0..out_shape[2] {
                        for c in 0..out_shape[3] {
                            let idx = [b, h, w, c];
                            let inside = (0..4).all(|d| {
                                idx[d] >= before[d] as usize && idx[d] - (before[d] as usize) < in_shape[d]
                            });
                            let want = if inside {
                                let s: [usize; 4] = core::array::from_fn(|d| idx[d] - before[d] as usize);
                                input[((s[0] * in_shape[1] + s[1]) * in_shape[2] + s[2]) * in_shape[3] + s[3]]
                            } else {
                                fill as i16
                            };
                            prop_assert_eq!(out[i], want, "at {:?}", idx);
                            i += 1;
                        }
                    }
                }
            }
        }
    }
}
