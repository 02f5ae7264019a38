//! Knowledge distillation with candle on the CPU: a float student (e.g. a structurally pruned
//! model) is trained to reproduce its teacher (the unpruned model) from a few calibration
//! samples.
//!
//! Few samples carry little signal on their own, so each training step draws a fresh batch of
//! **augmented** samples and lets the teacher label them, online:
//!
//! | augmentation (NHWC images) | what |
//! |---|---|
//! | shift | random crop of the image padded by `shift` cells (zeros), i.e. a shift of up to ±`shift` |
//! | flip | horizontal mirror, one image in two |
//! | mix | with probability `mix`, the image is combined with another one: cutmix (a random box pasted) or mixup (a random blend), one in two |
//!
//! Mixed images are not of any class, but the teacher's answer to them is informative (the
//! data-free distillation literature relies on it). The loss has two parts:
//!
//! - the logits: KL divergence between the teacher's and the student's softmax at temperature
//!   `T`, times `T²`;
//! - the features: every activation that keeps its name and shape in the student (for a
//!   structurally pruned model: all but the pruned convs' outputs, e.g. each residual block's
//!   output) is pulled towards the teacher's, mean squared error relative to the teacher's mean
//!   square, averaged over those tensors, times `feature_weight`. Such layer-wise targets are
//!   far denser than ten logits per sample.
//!
//! Every conv / depthwise / fully-connected weight and bias is trained with Adam; each tensor's
//! step is `lr` times its RMS (weights on raw 0..255 inputs and on normalized activations move
//! alike), with a cosine decay to zero. Everything is seeded: a run is deterministic.

use crate::exec_candle::CandleGraph;
use crate::ir::{Graph, TensorId};
use crate::lower::normalize;
use crate::npy::Array;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor, D};
use serde::Serialize;

/// How [`distill`] trains.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DistillOptions {
    /// Training steps (0: no training).
    pub steps: usize,
    /// Adam step, relative to each weight tensor's RMS.
    pub lr: f64,
    /// Samples per step.
    pub batch: usize,
    /// Softmax temperature of the logit loss.
    pub temperature: f64,
    /// Weight of the feature loss against the logit loss (0: logits only).
    pub feature_weight: f64,
    /// Probability that a sample is mixed with another (cutmix or mixup).
    pub mix: f64,
    /// Largest random shift, in cells, of an image sample.
    pub shift: usize,
    /// Seed of the augmentation and the batches.
    pub seed: u64,
}

impl Default for DistillOptions {
    fn default() -> Self {
        DistillOptions {
            steps: 0,
            lr: 1e-3,
            batch: 32,
            temperature: 4.0,
            feature_weight: 1.0,
            mix: 0.5,
            shift: 4,
            seed: 0x6b69_6c6e,
        }
    }
}

/// A small deterministic generator (SplitMix64) for the augmentation and the batches.
pub(crate) struct SplitMix(pub(crate) u64);

impl SplitMix {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`0` for `n == 0`).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// Uniform in `[0, 1)`.
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One NHWC image (`h x w x c`), optionally mirrored horizontally and shifted by `(dy, dx)`
/// cells, the uncovered border filled with zeros.
fn shifted(img: &[f32], [h, w, c]: [usize; 3], flip: bool, dy: isize, dx: isize, out: &mut [f32]) {
    out.fill(0.0);
    for y in 0..h {
        let sy = y as isize - dy;
        if sy < 0 || sy >= h as isize {
            continue;
        }
        for x in 0..w {
            let mut sx = x as isize - dx;
            if sx < 0 || sx >= w as isize {
                continue;
            }
            if flip {
                sx = w as isize - 1 - sx;
            }
            let (d, s) = ((y * w + x) * c, ((sy as usize) * w + sx as usize) * c);
            out[d..d + c].copy_from_slice(&img[s..s + c]);
        }
    }
}

/// Draws one augmented sample from `data` (`n` samples of `per` values) into `out`.
fn draw(
    data: &[f32],
    per: usize,
    image: Option<[usize; 3]>,
    o: &DistillOptions,
    rng: &mut SplitMix,
    out: &mut [f32],
    scratch: &mut [f32],
) {
    let n = data.len() / per;
    let sample = |i: usize| &data[i * per..(i + 1) * per];
    let Some(hwc) = image else {
        out.copy_from_slice(sample(rng.below(n)));
        return;
    };
    let s = o.shift as isize;
    let one = |rng: &mut SplitMix, out: &mut [f32]| {
        let img = sample(rng.below(n));
        let flip = rng.below(2) == 1;
        let dy = rng.below(2 * o.shift + 1) as isize - s;
        let dx = rng.below(2 * o.shift + 1) as isize - s;
        shifted(img, hwc, flip, dy, dx, out);
    };
    one(rng, out);
    if rng.unit() >= o.mix {
        return;
    }
    one(rng, scratch);
    let lambda = rng.unit() as f32;
    if rng.below(2) == 0 {
        for (a, b) in out.iter_mut().zip(scratch.iter()) {
            *a = lambda * *a + (1.0 - lambda) * b;
        }
    } else {
        // Cutmix: a box of about (1 - lambda) of the area comes from the other image.
        let [h, w, c] = hwc;
        let side = (1.0 - lambda).sqrt();
        let (bh, bw) = (
            ((h as f32 * side) as usize).min(h),
            ((w as f32 * side) as usize).min(w),
        );
        let (y0, x0) = (rng.below(h - bh + 1), rng.below(w - bw + 1));
        for y in y0..y0 + bh {
            let row = (y * w + x0) * c..(y * w + x0 + bw) * c;
            out[row.clone()].copy_from_slice(&scratch[row]);
        }
    }
}

/// Activations of the student paired with the teacher's: same name, same shape, produced by an
/// op (not the input), not the logits nor the graph output.
fn feature_pairs(student: &Graph, teacher: &Graph, skip: &[TensorId]) -> Vec<(TensorId, TensorId)> {
    let mut pairs = Vec::new();
    for op in &student.ops {
        for &s in &op.outputs {
            let st = &student.tensors[s];
            if skip.contains(&s) || st.data.is_some() {
                continue;
            }
            let found = teacher
                .ops
                .iter()
                .flat_map(|o| o.outputs.iter())
                .find(|&&t| {
                    let tt = &teacher.tensors[t];
                    tt.name == st.name && tt.shape == st.shape && tt.data.is_none()
                });
            if let Some(&t) = found {
                pairs.push((s, t));
            }
        }
    }
    pairs
}

/// Trains the conv, depthwise and fully-connected weights and biases of `student` (a float
/// graph, e.g. a pruned `teacher`) to reproduce `teacher` on augmented copies of the samples `x`
/// (in the model's input layout, as calibration data), and returns `student` (normalized) with
/// the trained weights. See the module documentation for the augmentation and the loss.
/// `progress(done, steps)` follows the steps.
///
/// # Errors
/// The data does not fit the models, the models have several inputs or outputs or logits of
/// different shapes, an op the candle executor does not run, or a shape whose first dimension is
/// not a batch of 1.
pub fn distill(
    student: &Graph,
    teacher: &Graph,
    x: &Array,
    o: &DistillOptions,
    progress: impl FnMut(usize, usize),
) -> Result<Graph> {
    distill_some(student, teacher, x, o, None, progress)
}

/// [`distill`], training only the weights and biases among `trainable` (IR tensor ids of
/// `student`) when given.
///
/// # Errors
/// As [`distill`].
pub fn distill_some(
    student: &Graph,
    teacher: &Graph,
    x: &Array,
    o: &DistillOptions,
    trainable: Option<&[TensorId]>,
    mut progress: impl FnMut(usize, usize),
) -> Result<Graph> {
    let device = Device::Cpu;
    let mut out = normalize(student)?;
    if o.steps == 0 {
        return Ok(out);
    }
    if o.batch == 0
        || o.temperature.is_nan()
        || o.temperature <= 0.0
        || !(0.0..=1.0).contains(&o.mix)
    {
        bail!(
            "distillation needs a batch > 0, a temperature > 0 and a mix probability in [0, 1] (got {}, {}, {})",
            o.batch,
            o.temperature,
            o.mix
        );
    }
    let teacher = normalize(teacher)?;
    let t_exec = CandleGraph::new(&teacher, &device)?;
    let s_exec = CandleGraph::new_trainable(&out, &device)?;
    let data = crate::quantize::calibrate::samples_f32(x)?;
    let per = s_exec.input_elements();
    if per != t_exec.input_elements() {
        bail!(
            "the student takes {per} input values, the teacher {}",
            t_exec.input_elements()
        );
    }
    if data.is_empty() || !data.len().is_multiple_of(per) {
        bail!(
            "the data has shape {:?}, which is not a whole number of samples of the model's input ({per} values)",
            x.shape()
        );
    }
    let shape = s_exec.input_shape().to_vec();
    let image = (shape.len() == 4).then(|| [shape[1], shape[2], shape[3]]);
    let (s_logits, t_logits) = (s_exec.logits_id(), t_exec.logits_id());
    let pairs = if o.feature_weight > 0.0 {
        feature_pairs(&out, &teacher, &[s_logits, out.outputs[0]])
    } else {
        Vec::new()
    };
    use candle_nn::Optimizer;
    let mut opts = Vec::new();
    for (id, var) in s_exec.vars_by_tensor() {
        if trainable.is_some_and(|t| !t.contains(&id)) {
            continue;
        }
        let rms = var
            .as_tensor()
            .sqr()?
            .mean_all()?
            .sqrt()?
            .to_scalar::<f32>()? as f64;
        let scale = if rms > 0.0 { rms } else { 1e-3 };
        let opt = candle_nn::AdamW::new(
            vec![var],
            candle_nn::ParamsAdamW {
                lr: o.lr * scale,
                weight_decay: 0.0,
                ..Default::default()
            },
        )?;
        opts.push((opt, scale));
    }
    let mut rng = SplitMix(o.seed);
    let mut batch_shape = shape.clone();
    batch_shape[0] = o.batch;
    let mut buf = vec![0f32; o.batch * per];
    let mut scratch = vec![0f32; per];
    let temp = o.temperature;
    for step in 0..o.steps {
        for b in 0..o.batch {
            draw(
                data,
                per,
                image,
                o,
                &mut rng,
                &mut buf[b * per..(b + 1) * per],
                &mut scratch,
            );
        }
        let xb = Tensor::from_slice(&buf, batch_shape.as_slice(), &device)?;
        let t_env = t_exec.activations_batch(&xb)?;
        let s_env = s_exec.activations_batch(&xb)?;
        let get = |env: &[Option<Tensor>], id: TensorId| -> Result<Tensor> {
            env.get(id)
                .cloned()
                .flatten()
                .ok_or_else(|| anyhow::anyhow!("activation {id} is never written"))
        };
        let (ys, yt) = (get(&s_env, s_logits)?, get(&t_env, t_logits)?);
        if ys.dims() != yt.dims() {
            bail!(
                "the student's logits are {:?}, the teacher's {:?}",
                ys.dims(),
                yt.dims()
            );
        }
        let ys = ys.flatten_from(1)?;
        let yt = yt.flatten_from(1)?;
        let log_s = candle_nn::ops::log_softmax(&(ys / temp)?, D::Minus1)?;
        let log_t = candle_nn::ops::log_softmax(&(yt / temp)?, D::Minus1)?;
        let kl = (log_t.exp()? * (log_t - log_s)?)?
            .sum_all()?
            .affine(temp * temp / o.batch as f64, 0.0)?;
        let mut loss = kl;
        if !pairs.is_empty() {
            let mut features = Vec::with_capacity(pairs.len());
            for &(s, t) in &pairs {
                let (fs, ft) = (get(&s_env, s)?, get(&t_env, t)?);
                let norm = ft.sqr()?.mean_all()?.to_scalar::<f32>()?.max(1e-12) as f64;
                features.push(((fs - &ft)?.sqr()?.mean_all()? / norm)?);
            }
            let features = Tensor::stack(&features, 0)?.mean_all()?;
            loss = (loss + (features * o.feature_weight)?)?;
        }
        let grads = loss.backward()?;
        let decay = 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / o.steps as f64).cos());
        for (opt, scale) in &mut opts {
            opt.set_learning_rate(o.lr * *scale * decay);
            opt.step(&grads)?;
        }
        progress(step + 1, o.steps);
    }
    s_exec.write_weights(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shift_and_flip_move_cells() {
        // 2x3x1 image, flipped and shifted one cell right.
        let img = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let mut out = [9.0; 6];
        shifted(&img, [2, 3, 1], true, 0, 1, &mut out);
        assert_eq!(out, [0.0, 3.0, 2.0, 0.0, 6.0, 5.0]);
    }

    #[test]
    fn draws_are_seeded() {
        let data: Vec<f32> = (0..4 * 8 * 8 * 3).map(|v| v as f32).collect();
        let o = DistillOptions::default();
        let run = || {
            let mut rng = SplitMix(o.seed);
            let (mut out, mut scratch) = (vec![0f32; 192], vec![0f32; 192]);
            for _ in 0..5 {
                draw(
                    &data,
                    192,
                    Some([8, 8, 3]),
                    &o,
                    &mut rng,
                    &mut out,
                    &mut scratch,
                );
            }
            out
        };
        assert_eq!(run(), run());
    }
}
