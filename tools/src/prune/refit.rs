//! Least-squares refits of a conv against the unpruned model: the normal equations of its
//! input patches, gathered and multiplied with candle.

use crate::ir::{OpKind, Padding};
use crate::lower::same_padding;
use anyhow::Result;
use candle_core::{DType as CDType, Tensor};

/// Geometry of a conv being refitted (shapes of the unpruned model).
pub(super) struct ConvGeometry {
    pub in_shape: Vec<usize>,
    pub out_shape: Vec<usize>,
    /// OHWI filter shape of the unpruned model.
    pub w_shape: Vec<usize>,
    pub stride: [usize; 2],
    pub dilation: [usize; 2],
    pub padding: Padding,
}

impl ConvGeometry {
    /// The geometry of a plain conv, `None` for any other op.
    pub fn of(
        kind: &OpKind,
        in_shape: &[usize],
        out_shape: &[usize],
        w_shape: &[usize],
    ) -> Option<Self> {
        let OpKind::Conv2d {
            stride,
            dilation,
            padding,
            ..
        } = *kind
        else {
            return None;
        };
        Some(Self {
            in_shape: in_shape.to_vec(),
            out_shape: out_shape.to_vec(),
            w_shape: w_shape.to_vec(),
            stride,
            dilation,
            padding,
        })
    }

    /// Filter taps (`kh·kw`).
    pub fn taps(&self) -> usize {
        self.w_shape[1] * self.w_shape[2]
    }
}

/// Rows of a least-squares problem drawn from the calibration activations.
const REFIT_ROWS: usize = 8192;

/// Normal equations of a conv refit. The rows are the conv's input patches in the graph as it
/// is now (`x_now`, every channel, then a constant for the bias) at evenly sampled output
/// positions; the targets are the unpruned conv's pre-activation outputs there (`x_orig`
/// through `w`, `b`) plus `correction` (same shape as the output) when given — the drift of a
/// residual branch that the refitted conv should make up for. Returns `AᵀA` (`n x n`), `AᵀY`
/// (one row of `n` per output channel) and `n = taps·channels + 1`.
pub(super) fn normal_equations(
    x_now: &Tensor,
    x_orig: &Tensor,
    w: &[f32],
    b: &[f32],
    geo: &ConvGeometry,
    correction: Option<&Tensor>,
) -> Result<(Vec<f64>, Vec<f64>, usize)> {
    let (in_shape, out_shape, w_shape) = (&geo.in_shape, &geo.out_shape, &geo.w_shape);
    let (stride, dilation, padding) = (geo.stride, geo.dilation, geo.padding);
    let (ih, iw, ic) = (in_shape[1], in_shape[2], w_shape[3]);
    let (oh, ow) = (out_shape[1], out_shape[2]);
    let (oc, kh, kw) = (w_shape[0], w_shape[1], w_shape[2]);
    let (samples, ic_now) = (x_orig.dim(0)?, x_now.dim(3)?);
    let pad_t = same_padding(padding, stride[0], dilation[0], ih, kh, oh) as isize;
    let pad_l = same_padding(padding, stride[1], dilation[1], iw, kw, ow) as isize;
    let taps = kh * kw;
    // Cell indices of each sampled position's patch (u32::MAX reads zero: padding).
    let total = samples * oh * ow;
    let step = (total / REFIT_ROWS).max(1);
    let mut ids = Vec::with_capacity(total.div_ceil(step) * taps);
    let mut positions = Vec::with_capacity(total.div_ceil(step));
    for i in (step - 1..total).step_by(step) {
        positions.push(u32::try_from(i)?);
        let (s, p) = (i / (oh * ow), i % (oh * ow));
        let (oy, ox) = (p / ow, p % ow);
        for fy in 0..kh {
            for fx in 0..kw {
                let y = (oy * stride[0]) as isize - pad_t + (fy * dilation[0]) as isize;
                let xx = (ox * stride[1]) as isize - pad_l + (fx * dilation[1]) as isize;
                let inside = y >= 0 && (y as usize) < ih && xx >= 0 && (xx as usize) < iw;
                ids.push(if inside {
                    u32::try_from((s * ih + y as usize) * iw + xx as usize)?
                } else {
                    u32::MAX
                });
            }
        }
    }
    let rows = positions.len();
    let dev = x_now.device();
    let ids = Tensor::from_vec(ids, rows * taps, dev)?;
    let a = x_now
        .reshape((samples * ih * iw, ic_now))?
        .index_select(&ids, 0)?
        .reshape((rows, taps * ic_now))?;
    let a = Tensor::cat(&[a, Tensor::ones((rows, 1), CDType::F32, dev)?], 1)?;
    let full = x_orig
        .reshape((samples * ih * iw, ic))?
        .index_select(&ids, 0)?
        .reshape((rows, taps * ic))?;
    let w = Tensor::from_slice(w, (oc, taps * ic), dev)?;
    let b = Tensor::from_slice(b, oc, dev)?;
    let mut y = full.matmul(&w.t()?)?.broadcast_add(&b)?;
    if let Some(c) = correction {
        let positions = Tensor::from_vec(positions, rows, dev)?;
        y = (y + c.reshape((total, oc))?.index_select(&positions, 0)?)?;
    }
    // f32 products (candle's f32 gemm is the optimized one), solved in f64.
    let f64s = |t: Tensor| -> Result<Vec<f64>> {
        Ok(t.flatten_all()?.to_dtype(CDType::F64)?.to_vec1::<f64>()?)
    };
    let ata = f64s(a.t()?.matmul(&a)?)?;
    let aty = f64s(y.t()?.matmul(&a)?)?;
    Ok((ata, aty, taps * ic_now + 1))
}

/// Turns the normal equations into those of a ridge regression toward `prior` (the conv's
/// current features, `outputs` rows of `n`): `λ = strength ·` the mean diagonal of `AᵀA` is
/// added to the diagonal and `λ·prior` to `AᵀY`. With few samples this keeps the refit from
/// fitting their noise; it never pulls toward zero.
pub(super) fn shrink_toward(
    ata: &mut [f64],
    aty: &mut [f64],
    n: usize,
    prior: &[f64],
    strength: f64,
) {
    let scale = (0..n).map(|i| ata[i * n + i]).sum::<f64>() / n as f64;
    let lambda = strength.max(1e-6) * scale.max(1e-12);
    for i in 0..n {
        ata[i * n + i] += lambda;
    }
    for (a, p) in aty.iter_mut().zip(prior) {
        *a += lambda * p;
    }
}

/// A conv's filter (OHWI) and bias as least-squares features: per output, `taps·channels`
/// weights then the bias.
pub(super) fn to_features(filter: &[f32], bias: &[f32]) -> Vec<f64> {
    let outputs = bias.len();
    let per = filter.len() / outputs.max(1);
    (0..outputs)
        .flat_map(|o| {
            filter[o * per..(o + 1) * per]
                .iter()
                .chain([&bias[o]])
                .map(|&v| f64::from(v))
        })
        .collect()
}

/// Splits solved features (`taps·channels` weights then a bias, per output) into an OHWI filter
/// over the channels `keep` and a bias.
pub(super) fn to_filter(
    w: &[f64],
    n: usize,
    taps: usize,
    channels: usize,
    keep: &[usize],
) -> (Vec<f32>, Vec<f32>) {
    let outputs = w.len() / n;
    let mut filter = Vec::with_capacity(outputs * taps * keep.len());
    let mut bias = Vec::with_capacity(outputs);
    for o in 0..outputs {
        for t in 0..taps {
            for &c in keep {
                filter.push(w[o * n + t * channels + c] as f32);
            }
        }
        bias.push(w[o * n + n - 1] as f32);
    }
    (filter, bias)
}
