//! `kiln demo`: Kiln's whole job on a fresh clone, with nothing from outside the repository.
//!
//! 1. A synthetic data set is generated deterministically (seeded): 16×16×1 images of four kinds
//!    of shapes — horizontal bar, vertical bar, diagonal, ring — at random places, sizes and
//!    brightness over a noisy background.
//! 2. A small CNN is trained on it with candle on the CPU: conv 3×3 (8) → ReLU → conv 3×3 stride 2
//!    (16) → ReLU → global average → fully connected (4), Adam, seeded initialization and
//!    shuffling.
//! 3. The trained model is exported to the host IR (NCHW / OIHW → NHWC / OHWI, a SOFTMAX added)
//!    and written as a float `.kiln`.
//! 4. [`pruning_hook`]: unstructured magnitude pruning (`kiln prune`) of the trained model.
//! 5. The float graph is quantized to int8 and to fp16 by `kiln quantize`'s pipeline (calibration
//!    on training samples, accuracy measured on the test set, 1 pt accuracy gate, self-tests).
//! 6. A report: one row per artifact, and the int8 per-layer table.

use crate::artifact::{write_artifact, HeaderFields};
use crate::convert::{assemble_graph, encode_self_tests, sha256_hex};
use crate::inspect::inspect;
use crate::ir::{Graph, Op, OpKind, Padding, Tensor as IrTensor, TensorId};
use crate::lower::lower;
use crate::npy::Array;
use crate::quantize::pipeline::{self, EvalSet, LayerRow, Metric, Precision, Request};
use crate::quantize::QuantizeOptions;
use crate::runner::capture_raw;
use anyhow::{bail, Context, Result};
use candle_core::{DType as CDType, Device, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use indicatif::{ProgressBar, ProgressStyle};
use kiln_runtime::format::SectionKind;
use kiln_runtime::graph::{Activation, DType};
use kiln_runtime::sections::Manifest;
use npyz::WriterBuilder;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Image side.
pub const SIDE: usize = 16;
/// Class names, in label order.
pub const CLASSES: [&str; 4] = ["horizontal bar", "vertical bar", "diagonal", "ring"];
/// Channels of the two conv layers.
const C1: usize = 8;
const C2: usize = 16;

/// What `kiln demo` does; [`Default`] is what the command line runs.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Output folder (created if missing).
    pub out: PathBuf,
    /// Print the report as JSON on stdout instead of the tables on stderr.
    pub json: bool,
    /// Print nothing (no table, no progress bars).
    pub quiet: bool,
    /// Seed of the data, the initialization and the shuffling.
    pub seed: u64,
    /// Training images.
    pub train: usize,
    /// Test images.
    pub test: usize,
    /// Training epochs.
    pub epochs: usize,
    /// Calibration samples (the first training images).
    pub calibration: usize,
    /// Then push the int8 artifact to a simulated fleet through an embedded `kiln serve`
    /// (see [`crate::demo_fleet`]).
    pub fleet: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            out: PathBuf::from("demo-out"),
            json: false,
            quiet: false,
            seed: 2024,
            train: 2000,
            test: 500,
            epochs: 6,
            calibration: 200,
            fleet: true,
        }
    }
}

/// One row of the artifact table.
#[derive(Clone, Debug, Serialize)]
pub struct ArtifactRow {
    /// Where it was written.
    pub path: PathBuf,
    /// f32, int8 or fp16.
    pub precision: String,
    /// Top-1 accuracy on the test set, measured with kiln-runtime (0..1).
    pub accuracy: f64,
    /// Planned arena.
    pub arena_bytes: usize,
    /// WEIGHTS section.
    pub weights_bytes: usize,
    /// Whole file.
    pub artifact_bytes: usize,
    /// Multiply-accumulates of one inference.
    pub macs: u64,
    /// Self-test vectors embedded.
    pub self_tests: usize,
    /// SHA-256 of the file.
    pub sha256: String,
}

/// Training figures.
#[derive(Clone, Debug, Serialize)]
pub struct TrainingReport {
    /// Epochs run.
    pub epochs: usize,
    /// Mean cross-entropy of the last epoch.
    pub final_loss: f64,
    /// Accuracy of the candle model on the training set.
    pub train_accuracy: f64,
    /// Accuracy of the candle model on the test set.
    pub test_accuracy: f64,
    /// Trainable parameters.
    pub parameters: usize,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// Everything `kiln demo` reports.
#[derive(Clone, Debug, Serialize)]
pub struct DemoReport {
    /// Output folder.
    pub out: PathBuf,
    /// Seed.
    pub seed: u64,
    /// Class names, in label order.
    pub classes: Vec<&'static str>,
    /// Training / test / calibration images.
    pub train_samples: usize,
    /// Test images (`test.npz`).
    pub test_samples: usize,
    /// Calibration images (`calib.npz`).
    pub calibration_samples: usize,
    /// Training.
    pub training: TrainingReport,
    /// What the pruning step did (`None`: no pruning step yet).
    pub pruning: Option<serde_json::Value>,
    /// Float, int8 and fp16 artifacts.
    pub artifacts: Vec<ArtifactRow>,
    /// The int8 per-layer table.
    pub int8_layers: Vec<LayerRow>,
    /// Seconds per stage: data, training, export, int8, fp16, total.
    pub seconds: serde_json::Value,
    /// The fleet rollouts, with [`DemoOptions::fleet`].
    pub fleet: Option<crate::demo_fleet::FleetReport>,
}

// ---------------------------------------------------------------------------------------------
// Data.

/// SplitMix64: small, seeded, good enough for data and initialization.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in [lo, hi].
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }

    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-7);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }
}

/// Labelled images, `[n, 16, 16, 1]` (NHWC) in `[0, 1]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// Pixels, image after image.
    pub x: Vec<f32>,
    /// Class indices into [`CLASSES`].
    pub y: Vec<i64>,
}

impl Dataset {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// The first `n` images as a batch for kiln.
    pub fn array(&self, n: usize) -> Array {
        let n = n.min(self.len());
        Array::F32 {
            shape: vec![n, SIDE, SIDE, 1],
            data: self.x[..n * SIDE * SIDE].to_vec(),
        }
    }
}

fn draw_image(rng: &mut Rng, class: usize, img: &mut [f32]) {
    for p in img.iter_mut() {
        *p = 0.2 * rng.uniform();
    }
    let ink = 0.6 + 0.4 * rng.uniform();
    let set = |img: &mut [f32], r: i64, c: i64| {
        if (0..SIDE as i64).contains(&r) && (0..SIDE as i64).contains(&c) {
            let p = &mut img[r as usize * SIDE + c as usize];
            *p = p.max(ink);
        }
    };
    match class {
        0 | 1 => {
            let len = rng.range(6, 13);
            let thick = rng.range(1, 2);
            let across = rng.range(1, SIDE - 1 - thick) as i64;
            let along = rng.range(0, SIDE - len) as i64;
            for t in 0..thick as i64 {
                for i in 0..len as i64 {
                    if class == 0 {
                        set(img, across + t, along + i);
                    } else {
                        set(img, along + i, across + t);
                    }
                }
            }
        }
        2 => {
            let len = rng.range(6, 12) as i64;
            let thick = rng.range(1, 2) as i64;
            let down = rng.next_u64() & 1 == 0;
            let r0 = rng.range(0, SIDE - len as usize) as i64;
            let c0 = rng.range(0, SIDE - len as usize - 1) as i64;
            for i in 0..len {
                for t in 0..thick {
                    let c = if down { c0 + i } else { c0 + len - 1 - i };
                    set(img, r0 + i, c + t);
                }
            }
        }
        _ => {
            let radius = 2.5 + 2.5 * rng.uniform();
            let margin = radius + 0.5;
            let span = SIDE as f32 - 1.0 - 2.0 * margin;
            let cy = margin + span * rng.uniform();
            let cx = margin + span * rng.uniform();
            for r in 0..SIDE {
                for c in 0..SIDE {
                    let d = ((r as f32 - cy).powi(2) + (c as f32 - cx).powi(2)).sqrt();
                    if (d - radius).abs() < 0.6 {
                        set(img, r as i64, c as i64);
                    }
                }
            }
        }
    }
    for p in img.iter_mut() {
        *p = (*p + 0.05 * rng.normal()).clamp(0.0, 1.0);
    }
}

/// `n` images with balanced, shuffled classes, entirely determined by `seed`.
pub fn synthetic(n: usize, seed: u64) -> Dataset {
    let mut rng = Rng(seed);
    let mut y: Vec<i64> = (0..n).map(|i| (i % CLASSES.len()) as i64).collect();
    shuffle(&mut rng, &mut y);
    let mut x = vec![0f32; n * SIDE * SIDE];
    for (img, &class) in x.chunks_exact_mut(SIDE * SIDE).zip(&y) {
        draw_image(&mut rng, class as usize, img);
    }
    Dataset { x, y }
}

fn shuffle<T>(rng: &mut Rng, v: &mut [T]) {
    for i in (1..v.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

// ---------------------------------------------------------------------------------------------
// The model, in candle (NCHW, OIHW).

/// The demo CNN's parameters.
pub struct Cnn {
    /// `[8, 1, 3, 3]`.
    pub w1: Var,
    /// `[8]`.
    pub b1: Var,
    /// `[16, 8, 3, 3]`.
    pub w2: Var,
    /// `[16]`.
    pub b2: Var,
    /// `[4, 16]`.
    pub w3: Var,
    /// `[4]`.
    pub b3: Var,
}

impl Cnn {
    /// He-uniform weights and zero biases from `seed`.
    ///
    /// # Errors
    /// A candle failure.
    pub fn new(seed: u64, device: &Device) -> Result<Self> {
        let mut rng = Rng(seed ^ 0x5EED_CAFE);
        let mut he = |shape: &[usize], fan_in: usize| -> Result<Var> {
            let bound = (6.0 / fan_in as f32).sqrt();
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|_| (2.0 * rng.uniform() - 1.0) * bound)
                .collect();
            Ok(Var::from_tensor(&Tensor::from_vec(
                v,
                shape.to_vec(),
                device,
            )?)?)
        };
        let zeros = |n: usize| -> Result<Var> { Ok(Var::zeros(n, CDType::F32, device)?) };
        Ok(Cnn {
            w1: he(&[C1, 1, 3, 3], 9)?,
            b1: zeros(C1)?,
            w2: he(&[C2, C1, 3, 3], 9 * C1)?,
            b2: zeros(C2)?,
            w3: he(&[CLASSES.len(), C2], C2)?,
            b3: zeros(CLASSES.len())?,
        })
    }

    fn vars(&self) -> Vec<Var> {
        vec![
            self.w1.clone(),
            self.b1.clone(),
            self.w2.clone(),
            self.b2.clone(),
            self.w3.clone(),
            self.b3.clone(),
        ]
    }

    /// Logits `[B, 4]` of images `[B, 1, 16, 16]`.
    ///
    /// # Errors
    /// A candle failure.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = x
            .conv2d(&self.w1, 1, 1, 1, 1)?
            .broadcast_add(&self.b1.reshape((1, C1, 1, 1))?)?
            .relu()?;
        // TFLite SAME for a 3×3 stride-2 conv on an even size: the extra row and column of
        // padding go after, none before — exactly what the exported graph computes.
        let h = h.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
        let h = h
            .conv2d(&self.w2, 0, 2, 1, 1)?
            .broadcast_add(&self.b2.reshape((1, C2, 1, 1))?)?
            .relu()?;
        let pooled = h.mean((2, 3))?;
        Ok(pooled
            .matmul(&self.w3.as_tensor().t()?)?
            .broadcast_add(&self.b3)?)
    }

    /// Parameters.
    pub fn parameters(&self) -> usize {
        self.vars().iter().map(|v| v.elem_count()).sum()
    }
}

fn images(d: &Dataset, idx: &[usize], device: &Device) -> Result<(Tensor, Tensor)> {
    let px = SIDE * SIDE;
    let mut x = Vec::with_capacity(idx.len() * px);
    let mut y = Vec::with_capacity(idx.len());
    for &i in idx {
        x.extend_from_slice(&d.x[i * px..(i + 1) * px]);
        y.push(d.y[i] as u32);
    }
    // NHWC with one channel has the same memory order as NCHW.
    Ok((
        Tensor::from_vec(x, (idx.len(), 1, SIDE, SIDE), device)?,
        Tensor::from_vec(y, idx.len(), device)?,
    ))
}

/// Accuracy of the candle model on a data set.
///
/// # Errors
/// A candle failure.
pub fn accuracy(model: &Cnn, d: &Dataset, device: &Device) -> Result<f64> {
    let mut hits = 0usize;
    let all: Vec<usize> = (0..d.len()).collect();
    for chunk in all.chunks(250) {
        let (x, y) = images(d, chunk, device)?;
        let pred = model.forward(&x)?.argmax(D::Minus1)?;
        hits += pred
            .eq(&y)?
            .to_dtype(CDType::F32)?
            .sum_all()?
            .to_scalar::<f32>()? as usize;
    }
    Ok(hits as f64 / d.len().max(1) as f64)
}

/// Trains the CNN with Adam (batch 32); `progress(step, steps, loss)` after every step.
///
/// # Errors
/// A candle failure.
pub fn train(
    d: &Dataset,
    epochs: usize,
    seed: u64,
    device: &Device,
    mut progress: impl FnMut(usize, usize, f64),
) -> Result<(Cnn, f64)> {
    const BATCH: usize = 32;
    let model = Cnn::new(seed, device)?;
    let mut opt = AdamW::new(
        model.vars(),
        ParamsAdamW {
            lr: 0.01,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let mut rng = Rng(seed ^ 0x05A1_1E55);
    let mut order: Vec<usize> = (0..d.len()).collect();
    let per_epoch = d.len().div_ceil(BATCH);
    let steps = epochs * per_epoch;
    let mut last_loss = f64::NAN;
    for epoch in 0..epochs {
        shuffle(&mut rng, &mut order);
        // Step decay: the last third of training at a tenth of the rate.
        if epoch == epochs - epochs / 3 {
            opt.set_learning_rate(0.001);
        }
        let mut total = 0.0;
        for (b, idx) in order.chunks(BATCH).enumerate() {
            let (x, y) = images(d, idx, device)?;
            let loss = candle_nn::loss::cross_entropy(&model.forward(&x)?, &y)?;
            opt.backward_step(&loss)?;
            let l = f64::from(loss.to_scalar::<f32>()?);
            total += l * idx.len() as f64;
            progress(epoch * per_epoch + b + 1, steps, l);
        }
        last_loss = total / d.len().max(1) as f64;
    }
    Ok((model, last_loss))
}

// ---------------------------------------------------------------------------------------------
// Export.

fn f32_tensor(name: &str, shape: &[usize], values: &[f32]) -> IrTensor {
    IrTensor {
        name: name.into(),
        dtype: DType::F32,
        shape: shape.to_vec(),
        data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        quant: None,
    }
}

fn activation(name: &str, shape: &[usize]) -> IrTensor {
    IrTensor {
        name: name.into(),
        dtype: DType::F32,
        shape: shape.to_vec(),
        data: None,
        quant: None,
    }
}

fn values(v: &Var) -> Result<Vec<f32>> {
    Ok(v.as_tensor().flatten_all()?.to_vec1::<f32>()?)
}

/// OIHW (candle) → OHWI (the IR).
fn ohwi(v: &Var) -> Result<Vec<f32>> {
    Ok(v.as_tensor()
        .permute((0, 2, 3, 1))?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// The trained model as a float host graph: NHWC activations, OHWI filters, FC `[out, in]`, a
/// SOFTMAX at the end.
///
/// # Errors
/// A candle failure.
pub fn export(model: &Cnn) -> Result<Graph> {
    let k = CLASSES.len();
    // Ids: 0 input; 1-3 conv1 filter, bias, output; 4-6 conv2; 7 mean; 8-10 dense; 11 softmax.
    let tensors = vec![
        activation("input", &[1, SIDE, SIDE, 1]),
        f32_tensor("conv1/filter", &[C1, 3, 3, 1], &ohwi(&model.w1)?),
        f32_tensor("conv1/bias", &[C1], &values(&model.b1)?),
        activation("conv1/relu", &[1, SIDE, SIDE, C1]),
        f32_tensor("conv2/filter", &[C2, 3, 3, C1], &ohwi(&model.w2)?),
        f32_tensor("conv2/bias", &[C2], &values(&model.b2)?),
        activation("conv2/relu", &[1, SIDE / 2, SIDE / 2, C2]),
        activation("global_average", &[1, C2]),
        f32_tensor("dense/weights", &[k, C2], &values(&model.w3)?),
        f32_tensor("dense/bias", &[k], &values(&model.b3)?),
        activation("logits", &[1, k]),
        activation("probabilities", &[1, k]),
    ];
    let conv = |stride: usize| OpKind::Conv2d {
        stride: [stride, stride],
        dilation: [1, 1],
        padding: Padding::Same,
        activation: Activation::Relu,
    };
    let op = |kind: OpKind, inputs: &[Option<TensorId>], output: TensorId| Op {
        kind,
        inputs: inputs.to_vec(),
        outputs: vec![output],
    };
    Ok(Graph {
        name: "kiln-demo".into(),
        tensors,
        ops: vec![
            op(conv(1), &[Some(0), Some(1), Some(2)], 3),
            op(conv(2), &[Some(3), Some(4), Some(5)], 6),
            op(
                OpKind::Mean {
                    axes: vec![1, 2],
                    keep_dims: false,
                },
                &[Some(6)],
                7,
            ),
            op(
                OpKind::FullyConnected {
                    activation: Activation::None,
                },
                &[Some(7), Some(8), Some(9)],
                10,
            ),
            op(OpKind::Softmax { beta: 1.0 }, &[Some(10)], 11),
        ],
        inputs: vec![0],
        outputs: vec![11],
    })
}

// ---------------------------------------------------------------------------------------------
// PRUNING HOOK.

/// **Pruning hook.** The float graph between training (export) and quantization passes through
/// here; `kiln prune` (tools/src/prune.rs) is to be called from this function once it exposes a
/// `prune(...)` entry point, with `calib` for its recovery step. It returns the graph to quantize
/// and, for the report, what pruning did.
///
/// # Errors
/// Pruning errors.
pub fn pruning_hook(g: Graph, calib: &Array) -> Result<(Graph, Option<serde_json::Value>)> {
    let _ = calib;
    // Magnitude pruning of 15 % of every weight tensor (the model is tiny: structured pruning
    // would take most of its capacity).
    let (pruned, report) = crate::prune::prune_unstructured(&g, 0.15)?;
    Ok((
        pruned,
        Some(
            serde_json::json!({ "method": "unstructured magnitude", "sparsity": report.sparsity, "dense_bytes": report.dense_bytes, "bitmap_sparse_bytes": report.compressed_bytes }),
        ),
    ))
}

// ---------------------------------------------------------------------------------------------
// Files.

fn write_npz(path: &Path, x: &Array, y: &[i64]) -> Result<()> {
    let Array::F32 { shape, data } = x else {
        bail!("internal: float images expected");
    };
    let mut npz = npyz::npz::NpzWriter::create(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    // Stored (as numpy's `savez`) with a fixed timestamp, so the file — and the digests the
    // quantized artifacts record — depend on the data only.
    let options = npyz::zip::write::FileOptions::default()
        .compression_method(npyz::zip::CompressionMethod::Stored)
        .last_modified_time(npyz::zip::DateTime::default());
    let shape64: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    let mut w = npz
        .array::<f32>("x", options)?
        .default_dtype()
        .shape(&shape64)
        .begin_nd()?;
    w.extend(data.iter().copied())?;
    w.finish()?;
    let mut w = npz
        .array::<i64>("y", options)?
        .default_dtype()
        .shape(&[y.len() as u64])
        .begin_nd()?;
    w.extend(y.iter().copied())?;
    w.finish()?;
    Ok(())
}

/// The float artifact: GRAPH, WEIGHTS, a MANIFEST and SELFTEST vectors from `selftest`.
fn float_artifact(
    g: &Graph,
    selftest: &Array,
    count: usize,
    mut json: serde_json::Value,
) -> Result<Vec<u8>> {
    // The bare artifact computes the self-test outputs; the final one adds them.
    let bare = assemble_graph(g, "kiln-demo-float")?;
    let cases = capture_raw(&bare, selftest, count)?;
    let lowered = lower(g)?;
    if let Some(obj) = json.as_object_mut() {
        obj.insert("tensor_names".into(), lowered.constant_names(g));
    }
    let manifest = postcard::to_allocvec(&Manifest {
        name: "kiln-demo-float",
        json: &json.to_string(),
    })?;
    let selftest = encode_self_tests(&cases)?;
    write_artifact(
        HeaderFields {
            arena_bytes: u32::try_from(lowered.arena_bytes).context("arena larger than 4 GiB")?,
            ..Default::default()
        },
        &[
            (SectionKind::Graph, &lowered.graph),
            (SectionKind::Weights, &lowered.weights),
            (SectionKind::Manifest, &manifest),
            (SectionKind::SelfTest, &selftest),
        ],
    )
    .map_err(anyhow::Error::msg)
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

fn bar(len: u64, what: &str, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(len);
    b.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} (eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    b.set_message(what.to_string());
    b
}

fn row(path: PathBuf, precision: &str, bytes: &[u8], accuracy: f64) -> Result<ArtifactRow> {
    let r = inspect(bytes)?;
    let model_bytes = crate::artifact::AlignedBytes::new(bytes);
    let model = kiln_runtime::Model::load(model_bytes.as_slice())?;
    let mut self_tests = 0;
    if let Some(s) = model.container().section(SectionKind::SelfTest) {
        let (head, _): (kiln_runtime::sections::SelfTestHead, _) =
            postcard::take_from_bytes(s).context("self-test section")?;
        self_tests = head.count as usize;
    }
    Ok(ArtifactRow {
        path,
        precision: precision.into(),
        accuracy,
        arena_bytes: r.arena_bytes,
        weights_bytes: r.weights_bytes,
        artifact_bytes: r.artifact_bytes,
        macs: r.macs,
        self_tests,
        sha256: sha256_hex(bytes),
    })
}

/// The report for people.
pub fn render(r: &DemoReport) -> String {
    let mut s = String::new();
    let t = &r.training;
    s += &format!(
        "trained a {}-parameter CNN on {} synthetic {SIDE}x{SIDE} images ({}) in {:.1} s: loss {:.3}, train {:.1} %, test {:.1} %\n",
        t.parameters,
        r.train_samples,
        r.classes.join(", "),
        t.seconds,
        t.final_loss,
        t.train_accuracy * 100.0,
        t.test_accuracy * 100.0
    );
    if let Some(p) = &r.pruning {
        s += &format!("pruning: {p}\n");
    }
    s += "\nint8 per-layer table:\n";
    s += &format!(
        "{:>4}  {:<18} {:<6} {:>10} {:>8} {:>9} {:>9}\n",
        "#", "op", "type", "MACs", "params", "output B", "SQNR dB"
    );
    for l in &r.int8_layers {
        s += &format!(
            "{:>4}  {:<18} {:<6} {:>10} {:>8} {:>9} {:>9.1}\n",
            l.index, l.op, l.precision, l.macs, l.params, l.output_bytes, l.sqnr_db
        );
    }
    s += &format!(
        "\n{:<22} {:<9} {:>9} {:>9} {:>10} {:>10} {:>9}\n",
        "artifact", "precision", "accuracy", "arena B", "weights B", "file B", "MACs"
    );
    for a in &r.artifacts {
        let name = a
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        s += &format!(
            "{:<22} {:<9} {:>8.2}% {:>9} {:>10} {:>10} {:>9}\n",
            name,
            a.precision,
            a.accuracy * 100.0,
            a.arena_bytes,
            a.weights_bytes,
            a.artifact_bytes,
            a.macs
        );
    }
    let int8 = r.artifacts.iter().find(|a| a.precision == "int8");
    s += &format!(
        "\naccuracy on the {} test images is measured with kiln-runtime, the runtime devices use.\nnext: kiln inspect {}   ·   kiln eval {} --data {}\n",
        r.test_samples,
        int8.map(|a| a.path.display().to_string()).unwrap_or_default(),
        int8.map(|a| a.path.display().to_string()).unwrap_or_default(),
        r.out.join("test.npz").display()
    );
    if let Some(f) = &r.fleet {
        s += &crate::demo_fleet::render(f);
    }
    s
}

/// Runs the whole demo: data, training, export, quantization, files in `opts.out`, and the
/// report (tables on stderr, or JSON on stdout with `opts.json`; nothing with `opts.quiet`).
///
/// # Errors
/// The output folder cannot be written, or a stage fails (a quantized model losing more than
/// 1 pt of accuracy is refused by the gate).
pub fn run(opts: &DemoOptions) -> Result<DemoReport> {
    let started = Instant::now();
    if opts.train < CLASSES.len() || opts.test < CLASSES.len() || opts.epochs == 0 {
        bail!("the demo needs at least one image per class and one epoch");
    }
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("cannot create {}", opts.out.display()))?;
    let device = Device::Cpu;

    // (a) Data.
    let t = Instant::now();
    let train_set = synthetic(opts.train, opts.seed);
    let test_set = synthetic(opts.test, opts.seed.wrapping_add(1));
    let calib = train_set.array(opts.calibration.max(1));
    let test_x = test_set.array(test_set.len());
    let test_path = opts.out.join("test.npz");
    let calib_path = opts.out.join("calib.npz");
    write_npz(&test_path, &test_x, &test_set.y)?;
    write_npz(
        &calib_path,
        &calib,
        &train_set.y[..calib.shape()[0].min(train_set.len())],
    )?;
    let t_data = t.elapsed().as_secs_f64();

    // (b) Training.
    let t = Instant::now();
    let b = bar(0, "training", opts.quiet);
    let (model, final_loss) = train(
        &train_set,
        opts.epochs,
        opts.seed,
        &device,
        |step, steps, loss| {
            b.set_length(steps as u64);
            b.set_position(step as u64);
            b.set_message(format!("training (loss {loss:.3})"));
        },
    )?;
    b.finish_and_clear();
    let training = TrainingReport {
        epochs: opts.epochs,
        final_loss,
        train_accuracy: accuracy(&model, &train_set, &device)?,
        test_accuracy: accuracy(&model, &test_set, &device)?,
        parameters: model.parameters(),
        seconds: t.elapsed().as_secs_f64(),
    };

    // (c) Export, and the float artifact.
    let t = Instant::now();
    let (graph, pruning) = pruning_hook(export(&model)?, &calib)?;
    let eval_sha256 = sha256_hex(&std::fs::read(&test_path)?);
    let calib_sha256 = sha256_hex(&std::fs::read(&calib_path)?);
    let float_json = serde_json::json!({
        "name": "kiln-demo-float",
        "kiln_version": env!("CARGO_PKG_VERSION"),
        "source": { "format": "kiln-demo", "seed": opts.seed, "epochs": opts.epochs, "train_samples": opts.train },
        "pruning": pruning,
    });
    let float_bytes = float_artifact(&graph, &calib, 4, float_json)?;
    let float_path = opts.out.join("demo-float.kiln");
    write(&float_path, &float_bytes)?;
    let eval = EvalSet {
        x: &test_x,
        y: &test_set.y,
        metric: Metric::Top1,
        sha256: eval_sha256.clone(),
    };
    let float_accuracy = pipeline::measure(&float_bytes, &eval)?;
    let t_export = t.elapsed().as_secs_f64();

    // (d) Quantization.
    let source = serde_json::json!({ "format": "kiln-demo", "sha256": sha256_hex(&float_bytes) });
    let mut rows = vec![row(float_path, "f32", &float_bytes, float_accuracy)?];
    let mut int8_layers = Vec::new();
    let mut int8_artifact = Vec::new();
    let mut seconds = vec![
        ("data", t_data),
        ("training", training.seconds),
        ("export", t_export),
    ];
    for (precision, name, file) in [
        (Precision::Int8, "int8", "demo-int8.kiln"),
        (Precision::Fp16, "fp16", "demo-fp16.kiln"),
    ] {
        let t = Instant::now();
        let b = bar(0, name, opts.quiet);
        let q = pipeline::quantize(
            Request {
                name: format!("kiln-demo-{name}"),
                graph: graph.clone(),
                source: source.clone(),
                calib: &calib,
                calib_sha256: calib_sha256.clone(),
                precision,
                options: QuantizeOptions::default(),
                eval: Some(EvalSet {
                    x: &test_x,
                    y: &test_set.y,
                    metric: Metric::Top1,
                    sha256: eval_sha256.clone(),
                }),
                max_accuracy_drop: Some(1.0),
                selftest_count: 4,
                extra: serde_json::json!({ "demo": { "seed": opts.seed, "epochs": opts.epochs } }),
            },
            |what, done, total| {
                b.set_message(format!("{name}: {what}"));
                b.set_length(total as u64);
                b.set_position(done as u64);
            },
        )
        .with_context(|| format!("cannot quantize the demo model to {name}"))?;
        b.finish_and_clear();
        let path = opts.out.join(file);
        write(&path, &q.artifact)?;
        let acc = q
            .report
            .quantized_metric
            .context("internal: no quantized accuracy")?;
        rows.push(row(path, name, &q.artifact, acc)?);
        if precision == Precision::Int8 {
            int8_layers = q.report.layers.clone();
            int8_artifact = q.artifact.clone();
        }
        seconds.push((name, t.elapsed().as_secs_f64()));
    }
    // (e) The fleet: sign, push, roll out to simulated devices, and a rollback.
    let fleet = if opts.fleet {
        let t = Instant::now();
        let b = bar(0, "fleet", opts.quiet);
        b.enable_steady_tick(Duration::from_millis(200));
        let report = crate::demo_fleet::run(&int8_artifact, "kiln-demo-int8", &opts.out, |what| {
            b.set_message(what.to_string())
        })
        .context("the demo fleet failed")?;
        b.finish_and_clear();
        seconds.push(("fleet", t.elapsed().as_secs_f64()));
        Some(report)
    } else {
        None
    };
    seconds.push(("total", started.elapsed().as_secs_f64()));

    let report = DemoReport {
        out: opts.out.clone(),
        seed: opts.seed,
        classes: CLASSES.to_vec(),
        train_samples: opts.train,
        test_samples: opts.test,
        calibration_samples: calib.shape()[0],
        training,
        pruning,
        artifacts: rows,
        int8_layers,
        fleet,
        seconds: serde_json::Value::Object(
            seconds
                .into_iter()
                .map(|(k, v)| (k.to_string(), serde_json::json!(v)))
                .collect(),
        ),
    };
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if !opts.quiet {
        eprint!("{}", render(&report));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_is_deterministic_and_balanced() {
        let a = synthetic(40, 7);
        assert_eq!(a, synthetic(40, 7));
        assert_ne!(a.x, synthetic(40, 8).x);
        for c in 0..CLASSES.len() as i64 {
            assert_eq!(a.y.iter().filter(|&&y| y == c).count(), 10);
        }
        assert!(a.x.iter().all(|v| (0.0..=1.0).contains(v)));
    }

    #[test]
    fn export_matches_the_candle_model() {
        let device = Device::Cpu;
        let model = Cnn::new(3, &device).unwrap();
        let d = synthetic(4, 1);
        let g = export(&model).unwrap();
        let exec = crate::exec_candle::CandleGraph::new(&g, &device).unwrap();
        let (x, _) = images(&d, &[0, 1, 2, 3], &device).unwrap();
        let logits = model.forward(&x).unwrap();
        let want = candle_nn::ops::softmax_last_dim(&logits)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (i, w) in want.iter().enumerate() {
            let got = exec
                .run(&d.x[i * SIDE * SIDE..(i + 1) * SIDE * SIDE])
                .unwrap();
            for (a, b) in got.iter().zip(w) {
                assert!((a - b).abs() < 1e-5, "{got:?} vs {w:?}");
            }
        }
    }
}
