//! Evaluation: run an artifact over a labelled set and score it (top-1, AUC), and compare it
//! with a reference model (agreement, SQNR).

use crate::artifact::AlignedBytes;
use crate::npy::Array;
use anyhow::{bail, Result};
use kiln_runtime::model::{element_count, Model};
use kiln_runtime::Interpreter;

/// Runs every sample (batch first) and returns the outputs as real values (dequantized for
/// int8), `per_sample` values each.
///
/// # Errors
/// The artifact is invalid or the data does not fit its input.
pub fn run_real(
    artifact: &[u8],
    x: &Array,
    mut progress: impl FnMut(usize, usize),
) -> Result<(Vec<f32>, usize)> {
    let bytes = AlignedBytes::new(artifact);
    let model = Model::load(bytes.as_slice())?;
    let mut arena = AlignedBytes::zeroed(model.arena_bytes());
    let mut interp = Interpreter::new(model, arena.as_mut_slice())?;
    let per_in = element_count(&interp.input_info(0)?);
    let per_out = element_count(&interp.output_info(0)?);
    if x.is_empty() || !x.len().is_multiple_of(per_in) {
        bail!(
            "data has shape {:?}, which is not a whole number of samples of the model's input ({} values)\nhint: pass the samples batch first",
            x.shape(),
            per_in
        );
    }
    let n = x.len() / per_in;
    let mut out = vec![0f32; n * per_out];
    for s in 0..n {
        match x {
            Array::I8 { data, .. } => {
                interp.set_input_i8(0, &data[s * per_in..(s + 1) * per_in])?
            }
            Array::F32 { data, .. } => {
                interp.set_input_f32(0, &data[s * per_in..(s + 1) * per_in])?
            }
        }
        interp.invoke()?;
        interp.output_f32(0, &mut out[s * per_out..(s + 1) * per_out])?;
        progress(s + 1, n);
    }
    Ok((out, per_out))
}

/// Index of the largest value.
pub fn argmax(row: &[f32]) -> usize {
    (0..row.len())
        .max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a)))
        .unwrap_or(0)
}

/// Fraction of rows whose argmax equals the label.
pub fn top1(outputs: &[f32], per: usize, labels: &[i64]) -> f64 {
    let n = (outputs.len() / per.max(1)).min(labels.len());
    if n == 0 {
        return 0.0;
    }
    let hits = (0..n)
        .filter(|&i| argmax(&outputs[i * per..(i + 1) * per]) as i64 == labels[i])
        .count();
    hits as f64 / n as f64
}

/// Fraction of rows where two models pick the same class.
pub fn agreement(a: &[f32], b: &[f32], per: usize) -> f64 {
    let n = a.len().min(b.len()) / per.max(1);
    if n == 0 {
        return 0.0;
    }
    (0..n)
        .filter(|&i| argmax(&a[i * per..(i + 1) * per]) == argmax(&b[i * per..(i + 1) * per]))
        .count() as f64
        / n as f64
}

/// Signal-to-quantization-noise ratio of `test` against `reference`, in dB.
pub fn sqnr_db(reference: &[f32], test: &[f32]) -> f64 {
    let signal: f64 = reference.iter().map(|&v| (v as f64).powi(2)).sum();
    let noise: f64 = reference
        .iter()
        .zip(test)
        .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
        .sum();
    if noise == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (signal / noise).log10()
    }
}

/// Area under the ROC curve of `scores` (higher = more anomalous) for binary `labels` (1 =
/// positive); ties count half.
pub fn auc(scores: &[f64], labels: &[i64]) -> f64 {
    let pos: Vec<f64> = scores
        .iter()
        .zip(labels)
        .filter(|(_, &l)| l != 0)
        .map(|(&s, _)| s)
        .collect();
    let neg: Vec<f64> = scores
        .iter()
        .zip(labels)
        .filter(|(_, &l)| l == 0)
        .map(|(&s, _)| s)
        .collect();
    if pos.is_empty() || neg.is_empty() {
        return f64::NAN;
    }
    let mut wins = 0.0;
    for &p in &pos {
        for &n in &neg {
            wins += if p > n {
                1.0
            } else if p == n {
                0.5
            } else {
                0.0
            };
        }
    }
    wins / (pos.len() * neg.len()) as f64
}

/// Anomaly scores of clips `[clips, frames, mels]` for an autoencoder whose input is `window`
/// consecutive frames: the mean squared reconstruction error over every window of each clip.
///
/// # Errors
/// The model's input is not a whole number of frames.
pub fn anomaly_scores(artifact: &[u8], clips: &[f32], shape: &[usize]) -> Result<Vec<f64>> {
    let &[n, frames, mels] = shape else {
        bail!("anomaly data must be [clips, frames, mels], got {shape:?}");
    };
    let bytes = AlignedBytes::new(artifact);
    let model = Model::load(bytes.as_slice())?;
    let mut arena = AlignedBytes::zeroed(model.arena_bytes());
    let mut interp = Interpreter::new(model, arena.as_mut_slice())?;
    let per = element_count(&interp.input_info(0)?);
    if !per.is_multiple_of(mels) || per / mels > frames {
        bail!("the model takes {per} values, which is not a whole number of {mels}-value frames of these clips");
    }
    let window = per / mels;
    let mut out = vec![0f32; element_count(&interp.output_info(0)?)];
    let mut scores = Vec::with_capacity(n);
    for c in 0..n {
        let clip = &clips[c * frames * mels..(c + 1) * frames * mels];
        let mut total = 0.0;
        let windows = frames - window + 1;
        for w in 0..windows {
            let x = &clip[w * mels..w * mels + per];
            interp.set_input_f32(0, x)?;
            interp.invoke()?;
            interp.output_f32(0, &mut out)?;
            total += x
                .iter()
                .zip(&out)
                .map(|(&a, &b)| ((a - b) as f64).powi(2))
                .sum::<f64>()
                / per as f64;
        }
        scores.push(total / windows as f64);
    }
    Ok(scores)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_on_known_values() {
        assert_eq!(top1(&[0.1, 0.9, 0.8, 0.2], 2, &[1, 1]), 0.5);
        assert_eq!(auc(&[0.9, 0.8, 0.1, 0.2], &[1, 1, 0, 0]), 1.0);
        assert_eq!(auc(&[0.1, 0.2, 0.9, 0.8], &[1, 1, 0, 0]), 0.0);
        assert_eq!(auc(&[0.5, 0.5], &[1, 0]), 0.5);
        assert!((sqnr_db(&[1.0, 1.0], &[1.1, 0.9]) - 20.0).abs() < 1e-4);
        assert_eq!(
            agreement(&[1.0, 0.0, 0.0, 1.0], &[2.0, 1.0, 1.0, 0.0], 2),
            0.5
        );
    }
}
