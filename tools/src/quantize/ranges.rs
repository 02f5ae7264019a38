//! Range estimators: from calibration statistics to the real range an int8 activation covers.

use super::calibrate::{TensorStats, HISTOGRAM_BINS};

/// How an activation's range is chosen from its calibration statistics.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Estimator {
    /// The whole observed range.
    MinMax,
    /// The range holding this percentage of the values (the tails split evenly), e.g. 99.99.
    Percentile(f64),
    /// The clipping threshold that minimises the KL divergence between the value distribution
    /// and its 8-bit quantized version (TensorRT's entropy calibration, applied to |x|).
    Entropy,
}

impl Estimator {
    /// Name for reports and manifests.
    pub fn name(&self) -> String {
        match self {
            Estimator::MinMax => "minmax".into(),
            Estimator::Percentile(p) => format!("percentile:{p}"),
            Estimator::Entropy => "entropy".into(),
        }
    }
}

impl std::str::FromStr for Estimator {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "minmax" => Ok(Estimator::MinMax),
            "entropy" | "kl" => Ok(Estimator::Entropy),
            "percentile" => Ok(Estimator::Percentile(99.99)),
            _ => match s.strip_prefix("percentile:").map(str::parse::<f64>) {
                Some(Ok(p)) if p > 50.0 && p <= 100.0 => Ok(Estimator::Percentile(p)),
                _ => Err(format!("unknown range estimator `{s}`; use minmax, percentile[:P] (50 < P <= 100) or entropy")),
            },
        }
    }
}

fn bin_width(st: &TensorStats) -> f64 {
    (st.max as f64 - st.min as f64) / HISTOGRAM_BINS as f64
}

/// The real range `[lo, hi]` for an activation.
pub fn estimate(st: &TensorStats, estimator: Estimator) -> (f32, f32) {
    match estimator {
        Estimator::MinMax => (st.min, st.max),
        Estimator::Percentile(p) => percentile(st, p),
        Estimator::Entropy => entropy(st),
    }
}

fn percentile(st: &TensorStats, p: f64) -> (f32, f32) {
    let total: u64 = st.histogram.iter().sum();
    if total == 0 || st.max <= st.min {
        return (st.min, st.max);
    }
    let tail = ((1.0 - p / 100.0) / 2.0 * total as f64).floor() as u64;
    let w = bin_width(st);
    let mut acc = 0;
    let mut lo_bin = 0;
    for (i, &c) in st.histogram.iter().enumerate() {
        acc += c;
        if acc > tail {
            lo_bin = i;
            break;
        }
    }
    acc = 0;
    let mut hi_bin = HISTOGRAM_BINS - 1;
    for (i, &c) in st.histogram.iter().enumerate().rev() {
        acc += c;
        if acc > tail {
            hi_bin = i;
            break;
        }
    }
    let lo = if lo_bin == 0 {
        st.min
    } else {
        (st.min as f64 + lo_bin as f64 * w) as f32
    };
    let hi = if hi_bin == HISTOGRAM_BINS - 1 {
        st.max
    } else {
        (st.min as f64 + (hi_bin + 1) as f64 * w) as f32
    };
    (lo, hi)
}

/// KL divergence of `p` from `q` (both unnormalised), skipping empty bins of `p`; empty bins of
/// `q` are smoothed to a tiny mass (as MXNet and TensorRT do) so one outlier cannot make every
/// clipped candidate infinitely bad.
fn kl(p: &[f64], q: &[f64]) -> f64 {
    let (sp, sq): (f64, f64) = (p.iter().sum(), q.iter().sum());
    if sp == 0.0 || sq == 0.0 {
        return f64::INFINITY;
    }
    p.iter()
        .zip(q)
        .filter(|(&a, _)| a > 0.0)
        .map(|(&a, &b)| {
            let (a, b) = (a / sp, (b / sq).max(1e-6));
            a * (a / b).ln()
        })
        .sum()
}

fn entropy(st: &TensorStats) -> (f32, f32) {
    let absmax = st.max.abs().max(st.min.abs()) as f64;
    if absmax == 0.0 {
        return (st.min, st.max);
    }
    // Re-bin |x| into HISTOGRAM_BINS bins over [0, absmax].
    let w = bin_width(st);
    let mut abs = vec![0f64; HISTOGRAM_BINS];
    for (i, &c) in st.histogram.iter().enumerate() {
        let center = (st.min as f64 + (i as f64 + 0.5) * w).abs();
        let b = ((center / absmax) * HISTOGRAM_BINS as f64) as usize;
        abs[b.min(HISTOGRAM_BINS - 1)] += c as f64;
    }
    // The spike of exact zeros after a RELU says nothing about where to clip and dominates the
    // divergence: leave the first bin out.
    abs[0] = 0.0;
    // Levels available to one side of an asymmetric int8 range that straddles 0, or all 256 when
    // the tensor is one-signed.
    let levels = if st.min >= 0.0 || st.max <= 0.0 {
        256
    } else {
        128
    };
    let mut best = (f64::INFINITY, HISTOGRAM_BINS);
    let start = levels.min(HISTOGRAM_BINS);
    for i in (start..=HISTOGRAM_BINS).step_by(16) {
        let mut p: Vec<f64> = abs[..i].to_vec();
        let outliers: f64 = abs[i..].iter().sum();
        if let Some(last) = p.last_mut() {
            *last += outliers;
        }
        // Quantize the unclipped bins (outliers left out, as TensorRT does) into `levels`
        // buckets and expand back over the non-empty bins.
        let mut q = vec![0f64; i];
        let per = i as f64 / levels as f64;
        for l in 0..levels {
            let a = (l as f64 * per).floor() as usize;
            let b = (((l + 1) as f64 * per).floor() as usize).min(i).max(a + 1);
            let slice = &abs[a..b.min(i)];
            let total: f64 = slice.iter().sum();
            let nonzero = p[a..b].iter().filter(|&&v| v > 0.0).count();
            if nonzero > 0 {
                for k in a..b {
                    if p[k] > 0.0 {
                        q[k] = total / nonzero as f64;
                    }
                }
            }
        }
        let d = kl(&p, &q);
        if d < best.0 {
            best = (d, i);
        }
    }
    let t = (best.1 as f64 / HISTOGRAM_BINS as f64 * absmax) as f32;
    (st.min.max(-t), st.max.min(t))
}

/// Asymmetric int8 parameters covering `[lo, hi]` (widened to include 0, as the TFLite spec
/// requires an exactly representable zero): `(scale, zero_point)`.
pub fn int8_params(lo: f32, hi: f32) -> (f32, i64) {
    let lo = lo.min(0.0) as f64;
    let mut hi = hi.max(0.0) as f64;
    if hi - lo < 1e-8 {
        hi = lo + 1e-8;
    }
    let scale = (hi - lo) / 255.0;
    let zp = (-128.0 - lo / scale).round().clamp(-128.0, 127.0) as i64;
    (scale as f32, zp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(values: &[f32]) -> TensorStats {
        let min = values.iter().copied().fold(f32::INFINITY, f32::min);
        let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut histogram = vec![0u64; HISTOGRAM_BINS];
        for &v in values {
            let b = (((v - min) / (max - min)) * HISTOGRAM_BINS as f32) as usize;
            histogram[b.min(HISTOGRAM_BINS - 1)] += 1;
        }
        TensorStats {
            min,
            max,
            histogram,
            channel_means: vec![0.0],
        }
    }

    #[test]
    fn int8_params_cover_the_range_and_zero() {
        let (s, z) = int8_params(-1.0, 3.0);
        assert!((s - 4.0 / 255.0).abs() < 1e-7);
        assert_eq!(z, -64);
        let (s, z) = int8_params(0.0, 6.0);
        assert_eq!(z, -128);
        assert!((s * 255.0 - 6.0).abs() < 1e-5);
        let (_, z) = int8_params(2.0, 3.0); // widened to [0, 3]
        assert_eq!(z, -128);
    }

    #[test]
    fn percentile_and_entropy_clip_outliers_minmax_does_not() {
        // 10 000 values in [0, 1] and one outlier at 100.
        let mut v: Vec<f32> = (0..10_000).map(|i| i as f32 / 10_000.0).collect();
        v.push(100.0);
        let st = stats(&v);
        assert_eq!(estimate(&st, Estimator::MinMax), (0.0, 100.0));
        let (_, hi) = estimate(&st, Estimator::Percentile(99.9));
        assert!(hi < 2.0, "percentile kept the outlier: {hi}");
        let (_, hi) = estimate(&st, Estimator::Entropy);
        assert!(hi < 20.0, "entropy kept the outlier: {hi}");
    }

    #[test]
    fn entropy_keeps_a_uniform_range() {
        let v: Vec<f32> = (0..100_000).map(|i| (i % 1000) as f32 / 1000.0).collect();
        let (lo, hi) = estimate(&stats(&v), Estimator::Entropy);
        assert_eq!(lo, 0.0);
        assert!(hi > 0.9, "entropy clipped a uniform distribution to {hi}");
    }

    #[test]
    fn estimators_parse() {
        assert_eq!(
            "percentile:99.9".parse::<Estimator>(),
            Ok(Estimator::Percentile(99.9))
        );
        assert!("percentile:20".parse::<Estimator>().is_err());
        assert_eq!("entropy".parse::<Estimator>(), Ok(Estimator::Entropy));
    }
}
