//! TRANSPOSE: permutes the dimensions of a tensor of any element type (int8, f32, f16; rank ≤ 6).
//!
//! Output dimension `i` is input dimension `perm[i]`. The output is written in order while the
//! input is read through permuted strides. Before walking, size-1 dimensions are dropped and
//! neighbouring output dimensions that are also neighbours (in the same order) in the input are
//! merged, so e.g. NHWC → NCHW becomes a 3-D walk over `[N, C, H·W]` and an identity permutation
//! a single copy. The walk is an odometer over the outer dimensions and a tight loop over the
//! innermost one (a slice copy where its input stride is 1). No allocation.

use crate::graph::MAX_RANK;

/// Validated geometry of a TRANSPOSE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransposeGeometry {
    /// Number of dimensions (0..=`MAX_RANK`).
    pub rank: usize,
    /// Input shape (the first `rank` entries; the rest are 1).
    pub in_shape: [usize; MAX_RANK],
    /// Output dimension `i` is input dimension `perm[i]` (the first `rank` entries; the rest are
    /// 0).
    pub perm: [usize; MAX_RANK],
}

impl TransposeGeometry {
    /// Builds from the input shape (outermost first) and the permutation. `None` if the rank
    /// exceeds `MAX_RANK`, `perm` has a different length, or `perm` is not a permutation of
    /// `0..rank`.
    pub fn new(in_shape: &[usize], perm: &[usize]) -> Option<Self> {
        let rank = in_shape.len();
        if rank > MAX_RANK || perm.len() != rank {
            return None;
        }
        let mut seen = [false; MAX_RANK];
        for &p in perm {
            if p >= rank || seen[p] {
                return None;
            }
            seen[p] = true;
        }
        let mut g = TransposeGeometry {
            rank,
            in_shape: [1; MAX_RANK],
            perm: [0; MAX_RANK],
        };
        g.in_shape[..rank].copy_from_slice(in_shape);
        g.perm[..rank].copy_from_slice(perm);
        Some(g)
    }

    /// The output shape (the first `rank` entries; the rest are 1).
    pub fn out_shape(&self) -> [usize; MAX_RANK] {
        let mut out = [1; MAX_RANK];
        for (o, &p) in out.iter_mut().zip(&self.perm[..self.rank]) {
            *o = self.in_shape[p];
        }
        out
    }

    /// Number of elements (of the input and of the output).
    pub fn len(&self) -> usize {
        self.in_shape[..self.rank].iter().product()
    }

    /// True when the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `output[o] = input[i]` where the output multi-index `o` and the input multi-index `i` satisfy
/// `i[perm[d]] = o[d]` for every output dimension `d`. Both slices hold `g.len()` elements.
pub fn transpose<T: Copy>(g: &TransposeGeometry, input: &[T], output: &mut [T]) {
    debug_assert_eq!(input.len(), g.len());
    debug_assert_eq!(output.len(), g.len());
    if output.is_empty() {
        return;
    }
    // Row-major input strides.
    let mut in_stride = [0usize; MAX_RANK];
    let mut acc = 1;
    for d in (0..g.rank).rev() {
        in_stride[d] = acc;
        acc *= g.in_shape[d];
    }
    // The output dimensions in order with their input strides: size-1 dimensions dropped, and a
    // dimension merged into the previous (outer) one when the outer stride is exactly the inner
    // stride times the inner extent (the two are contiguous in the input too).
    let mut ext = [1usize; MAX_RANK];
    let mut stride = [0usize; MAX_RANK];
    let mut rank = 0;
    for &p in &g.perm[..g.rank] {
        let (e, s) = (g.in_shape[p], in_stride[p]);
        if e == 1 {
            continue;
        }
        if rank > 0 && stride[rank - 1] == s * e {
            ext[rank - 1] *= e;
            stride[rank - 1] = s;
        } else {
            ext[rank] = e;
            stride[rank] = s;
            rank += 1;
        }
    }
    if rank == 0 {
        output[0] = input[0];
        return;
    }
    let inner = rank - 1;
    let (n, step) = (ext[inner], stride[inner]);
    let mut idx = [0usize; MAX_RANK];
    let mut base = 0usize;
    for row in output.chunks_exact_mut(n) {
        if step == 1 {
            row.copy_from_slice(&input[base..base + n]);
        } else {
            for (o, &v) in row.iter_mut().zip(input[base..].iter().step_by(step)) {
                *o = v;
            }
        }
        // Advance the odometer over the outer dimensions.
        let mut d = inner;
        while d > 0 {
            d -= 1;
            idx[d] += 1;
            base += stride[d];
            if idx[d] < ext[d] {
                break;
            }
            base -= stride[d] * ext[d];
            idx[d] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use half::f16;
    use proptest::prelude::*;
    use std::vec::Vec;

    fn config() -> ProptestConfig {
        ProptestConfig {
            cases: 256,
            ..ProptestConfig::default()
        }
    }

    /// The definition: decode every output index, map it back to the input, read.
    fn naive<T: Copy + Default>(shape: &[usize], perm: &[usize], input: &[T]) -> Vec<T> {
        let rank = shape.len();
        let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
        let total: usize = shape.iter().product();
        let mut out = std::vec![T::default(); total];
        let mut oi = std::vec![0usize; rank];
        let mut ii = std::vec![0usize; rank];
        for (flat, o) in out.iter_mut().enumerate() {
            let mut rem = flat;
            for d in (0..rank).rev() {
                oi[d] = rem % out_shape[d];
                rem /= out_shape[d];
            }
            for d in 0..rank {
                ii[perm[d]] = oi[d];
            }
            let src = ii.iter().zip(shape).fold(0, |acc, (&i, &n)| acc * n + i);
            *o = input[src];
        }
        out
    }

    fn shape_and_perm() -> impl Strategy<Value = (Vec<usize>, Vec<usize>)> {
        (0usize..=MAX_RANK).prop_flat_map(|rank| {
            (
                proptest::collection::vec(1usize..=4, rank),
                Just((0..rank).collect::<Vec<usize>>()).prop_shuffle(),
            )
        })
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn matches_definition((shape, perm) in shape_and_perm(), seed in any::<u32>()) {
            let g = TransposeGeometry::new(&shape, &perm).unwrap();
            let n = g.len();
            let out_shape = g.out_shape();
            for (d, &p) in perm.iter().enumerate() {
                prop_assert_eq!(out_shape[d], shape[p]);
            }
            // Distinct values, so any misplaced element shows.
            let input: Vec<u32> = (0..n as u32).map(|i| i.wrapping_mul(2_654_435_761) ^ seed).collect();
            let mut out = std::vec![0u32; n];
            transpose(&g, &input, &mut out);
            prop_assert_eq!(&out, &naive(&shape, &perm, &input));

            // The element types the runtime stores: int8, f32 and f16.
            let i8s: Vec<i8> = input.iter().map(|&v| v as i8).collect();
            let mut out8 = std::vec![0i8; n];
            transpose(&g, &i8s, &mut out8);
            prop_assert_eq!(&out8, &naive(&shape, &perm, &i8s));
            let f32s: Vec<f32> = input.iter().map(|&v| v as f32).collect();
            let mut outf = std::vec![0f32; n];
            transpose(&g, &f32s, &mut outf);
            prop_assert_eq!(&outf, &naive(&shape, &perm, &f32s));
            let f16s: Vec<f16> = input.iter().map(|&v| f16::from_bits(v as u16)).collect();
            let mut outh = std::vec![f16::ZERO; n];
            transpose(&g, &f16s, &mut outh);
            let want: Vec<u16> = naive(&shape, &perm, &f16s).iter().map(|v| v.to_bits()).collect();
            let got: Vec<u16> = outh.iter().map(|v| v.to_bits()).collect();
            prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn every_rank_with_its_reversal() {
        for rank in 1..=MAX_RANK {
            let shape: Vec<usize> = (0..rank).map(|d| d + 2).collect();
            let perm: Vec<usize> = (0..rank).rev().collect();
            let g = TransposeGeometry::new(&shape, &perm).unwrap();
            let input: Vec<u16> = (0..g.len() as u16).collect();
            let mut out = std::vec![0u16; g.len()];
            transpose(&g, &input, &mut out);
            assert_eq!(out, naive(&shape, &perm, &input), "rank {rank}");
        }
    }

    #[test]
    fn listed_cases() {
        // 2x3 matrix transpose.
        let g = TransposeGeometry::new(&[2, 3], &[1, 0]).unwrap();
        let mut out = [0u8; 6];
        transpose(&g, &[1, 2, 3, 4, 5, 6], &mut out);
        assert_eq!(out, [1, 4, 2, 5, 3, 6]);
        // NHWC → NCHW.
        let g = TransposeGeometry::new(&[1, 2, 2, 3], &[0, 3, 1, 2]).unwrap();
        let input: Vec<u8> = (0..12).collect();
        let mut out = [0u8; 12];
        transpose(&g, &input, &mut out);
        assert_eq!(out, [0, 3, 6, 9, 1, 4, 7, 10, 2, 5, 8, 11]);
        assert_eq!(&g.out_shape()[..4], &[1, 3, 2, 2]);
        // Identity, size-1 only, and rank 0.
        let g = TransposeGeometry::new(&[2, 1, 3], &[0, 1, 2]).unwrap();
        let mut out = [0u8; 6];
        transpose(&g, &[1, 2, 3, 4, 5, 6], &mut out);
        assert_eq!(out, [1, 2, 3, 4, 5, 6]);
        let g = TransposeGeometry::new(&[1, 1], &[1, 0]).unwrap();
        let mut out = [0u8; 1];
        transpose(&g, &[9], &mut out);
        assert_eq!(out, [9]);
        let g = TransposeGeometry::new(&[], &[]).unwrap();
        transpose(&g, &[7], &mut out);
        assert_eq!(out, [7]);
    }

    #[test]
    fn geometry_validation() {
        assert!(TransposeGeometry::new(&[2, 3], &[0, 0]).is_none());
        assert!(TransposeGeometry::new(&[2, 3], &[0, 2]).is_none());
        assert!(TransposeGeometry::new(&[2, 3], &[0]).is_none());
        assert!(TransposeGeometry::new(&[2, 3], &[1, 0, 2]).is_none());
        assert!(TransposeGeometry::new(&[1; 7], &[0, 1, 2, 3, 4, 5, 6]).is_none());
        assert!(TransposeGeometry::new(&[1; 6], &[5, 4, 3, 2, 1, 0]).is_some());
    }
}
