//! Calibration: run the float graph on sample inputs and record, for every activation, the
//! statistics the range estimators and bias correction need.
//!
//! The float graph is lowered with every activation kept alive ([`LowerOptions::keep_all_alive`])
//! and run by kiln-runtime's f32 kernels, so each intermediate tensor can be read after `invoke`.
//! Two passes over the data: the first finds each tensor's range, the second fills a fixed-bin
//! histogram over that range (for the percentile and entropy estimators) and per-channel means.

use crate::artifact::{write_artifact, AlignedBytes, HeaderFields};
use crate::ir::{Graph, TensorId};
use crate::lower::{lower_with, LowerOptions};
use crate::npy::Array;
use anyhow::{bail, Context, Result};
use kiln_runtime::format::SectionKind;
use kiln_runtime::graph::{DType, Location};
use kiln_runtime::model::{element_count, Model};
use kiln_runtime::Interpreter;

/// Bins of the calibration histograms.
pub const HISTOGRAM_BINS: usize = 2048;

/// What calibration learned about one activation tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorStats {
    /// Smallest value seen.
    pub min: f32,
    /// Largest value seen.
    pub max: f32,
    /// Histogram of values over `[min, max]` in [`HISTOGRAM_BINS`] equal bins.
    pub histogram: Vec<u64>,
    /// Mean of each channel (last axis) over all samples and positions.
    pub channel_means: Vec<f64>,
}

/// Statistics of every activation of the graph (indexed by host-IR tensor id).
#[derive(Clone, Debug, Default)]
pub struct Calibration {
    /// Per tensor; `None` for constants and unused tensors.
    pub tensors: Vec<Option<TensorStats>>,
    /// Number of samples seen.
    pub samples: usize,
}

#[derive(Clone, Copy, Debug)]
struct Activation {
    id: TensorId,
    offset: usize,
    count: usize,
    dtype: DType,
    scale: f32,
    zero_point: i32,
}

/// A graph ready to run with all its intermediates readable as real values (int8 dequantized,
/// f16 widened).
pub struct ActivationRunner {
    artifact: AlignedBytes,
    arena: AlignedBytes,
    /// Every activation: IR tensor id, arena offset, element count, type and int8 quantization.
    activations: Vec<Activation>,
    scratch: Vec<f32>,
    input_elements: usize,
}

impl ActivationRunner {
    /// Lowers a float graph for calibration.
    ///
    /// # Errors
    /// The graph is not float, has several inputs, or does not lower.
    pub fn new(g: &Graph) -> Result<Self> {
        if g.inputs.len() != 1 {
            bail!(
                "calibration handles models with one input; this one has {}",
                g.inputs.len()
            );
        }
        let lowered = lower_with(
            g,
            &LowerOptions {
                keep_all_alive: true,
            },
        )?;
        let bytes = write_artifact(
            HeaderFields {
                arena_bytes: lowered.arena_bytes as u32,
                ..Default::default()
            },
            &[
                (SectionKind::Graph, &lowered.graph),
                (SectionKind::Weights, &lowered.weights),
            ],
        )
        .map_err(anyhow::Error::msg)?;
        let artifact = AlignedBytes::new(&bytes);
        let model =
            Model::load(artifact.as_slice()).context("the calibration graph does not load")?;
        let mut activations = Vec::new();
        for (id, idx) in lowered.tensor_index.iter().enumerate() {
            let Some(idx) = idx else { continue };
            let t = model.tensor(*idx)?;
            if let Location::Arena { offset, .. } = t.location {
                if t.dtype == DType::I32 {
                    bail!(
                        "tensor `{}` is int32, which has no real value",
                        g.tensors[id].name
                    );
                }
                activations.push(Activation {
                    id,
                    offset: offset as usize,
                    count: element_count(&t),
                    dtype: t.dtype,
                    scale: t.quant.map_or(1.0, |q| q.scale),
                    zero_point: t.quant.map_or(0, |q| q.zero_point),
                });
            }
        }
        let input_elements = g.tensors[g.inputs[0]].elements();
        let arena = AlignedBytes::zeroed(model.arena_bytes());
        Ok(ActivationRunner {
            artifact,
            arena,
            activations,
            input_elements,
            scratch: Vec::new(),
        })
    }

    /// Elements of one input sample.
    pub fn input_elements(&self) -> usize {
        self.input_elements
    }

    /// Runs one sample and calls `visit(tensor id, values)` for every activation.
    ///
    /// # Errors
    /// The sample has the wrong size.
    pub fn run(&mut self, sample: &[f32], mut visit: impl FnMut(TensorId, &[f32])) -> Result<()> {
        // The digest was checked in `new`; re-validating the structure is cheap, hashing a
        // megabyte of weights per sample is not.
        let container = kiln_runtime::format::Container::parse_structure(self.artifact.as_slice())?;
        let model = Model::from_container(container)?;
        {
            let mut interp = Interpreter::new(model, self.arena.as_mut_slice())?;
            interp.set_input_f32(0, sample)?;
            interp.invoke()?;
        }
        let arena = self.arena.as_slice();
        for a in &self.activations {
            let bytes = &arena[a.offset..a.offset + a.count * a.dtype.size()];
            match a.dtype {
                DType::F32 => visit(a.id, bytemuck::cast_slice(bytes)),
                DType::F16 => {
                    self.scratch.clear();
                    self.scratch.extend(
                        bytes
                            .chunks_exact(2)
                            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
                    );
                    visit(a.id, &self.scratch);
                }
                DType::I8 => {
                    self.scratch.clear();
                    self.scratch.extend(
                        bytes
                            .iter()
                            .map(|&b| a.scale * ((b as i8) as i32 - a.zero_point) as f32),
                    );
                    visit(a.id, &self.scratch);
                }
                DType::I32 => {}
            }
        }
        Ok(())
    }
}

/// Real-valued samples of a batch (int8 arrays are refused: calibration needs real values).
pub fn samples_f32(x: &Array) -> Result<&[f32]> {
    match x {
        Array::F32 { data, .. } => {
            if let Some(i) = data.iter().position(|v| !v.is_finite()) {
                bail!("calibration data holds a non-finite value ({}) at flat index {i}\nhint: clean the data first", data[i]);
            }
            Ok(data)
        }
        Array::I8 { .. } => bail!(
            "calibration data is int8, but quantization needs real (float) values\nhint: pass the samples as float32, as the float model takes them"
        ),
    }
}

/// Runs the calibration samples through the float graph (kiln-runtime's f32 kernels) and
/// collects [`Calibration`].
///
/// # Errors
/// The data does not fit the model, is empty, or holds NaN / infinity.
pub fn calibrate(g: &Graph, x: &Array, progress: impl FnMut(usize, usize)) -> Result<Calibration> {
    let mut runner = ActivationRunner::new(g)?;
    let per = runner.input_elements();
    calibrate_with(
        g,
        x,
        per,
        |sample, visit| runner.run(sample, |id, v| visit(id, v)),
        progress,
    )
}

/// The calibration algorithm of `quantize::calibrate::calibrate` over any activation source:
/// `run(sample, visit)` must call `visit(tensor id, values)` for every activation of one sample.
///
/// This mirrors `calibrate` line for line (two passes: min/max, then histogram over
/// [`HISTOGRAM_BINS`] bins and per-channel means in f64), so both sources give bit-identical
/// statistics when they give identical activations.
///
/// # Errors
/// The data does not fit the model, is empty, or holds NaN / infinity; or `run` fails.
pub fn calibrate_with(
    g: &Graph,
    x: &Array,
    per: usize,
    mut run: impl FnMut(&[f32], &mut dyn FnMut(TensorId, &[f32])) -> Result<()>,
    mut progress: impl FnMut(usize, usize),
) -> Result<Calibration> {
    let data = samples_f32(x)?;
    if data.is_empty() {
        bail!("the calibration set is empty\nhint: pass at least one sample (a few hundred are typical)");
    }
    if per == 0 || !data.len().is_multiple_of(per) {
        bail!(
            "calibration data has shape {:?}, which is not a whole number of samples of {} values (the model's input)\nhint: pass the samples batch first, shaped like the model's input",
            x.shape(),
            per
        );
    }
    let n = data.len() / per;
    let total = 2 * n;
    // Pass 1: ranges.
    let mut ranges: Vec<Option<(f32, f32)>> = vec![None; g.tensors.len()];
    for s in 0..n {
        run(&data[s * per..(s + 1) * per], &mut |id, v| {
            let (lo, hi) = v
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| {
                    (lo.min(x), hi.max(x))
                });
            let r = ranges[id].get_or_insert((lo, hi));
            r.0 = r.0.min(lo);
            r.1 = r.1.max(hi);
        })?;
        progress(s + 1, total);
    }
    // Pass 2: histograms and channel means.
    let mut stats: Vec<Option<TensorStats>> = ranges
        .iter()
        .enumerate()
        .map(|(id, r)| {
            r.map(|(min, max)| TensorStats {
                min,
                max,
                histogram: vec![0; HISTOGRAM_BINS],
                channel_means: vec![0.0; g.tensors[id].shape.last().copied().unwrap_or(1).max(1)],
            })
        })
        .collect();
    for s in 0..n {
        run(&data[s * per..(s + 1) * per], &mut |id, v| {
            let Some(st) = stats[id].as_mut() else { return };
            let width = (st.max - st.min) as f64;
            for &x in v {
                let bin = if width > 0.0 {
                    (((x - st.min) as f64 / width) * HISTOGRAM_BINS as f64) as usize
                } else {
                    0
                };
                st.histogram[bin.min(HISTOGRAM_BINS - 1)] += 1;
            }
            let c = st.channel_means.len();
            for (i, &x) in v.iter().enumerate() {
                st.channel_means[i % c] += x as f64;
            }
        })?;
        progress(n + s + 1, total);
    }
    for st in stats.iter_mut().flatten() {
        let count: u64 = st.histogram.iter().sum();
        let per_channel = count as f64 / st.channel_means.len() as f64;
        if per_channel > 0.0 {
            st.channel_means.iter_mut().for_each(|m| *m /= per_channel);
        }
    }
    Ok(Calibration {
        tensors: stats,
        samples: n,
    })
}
