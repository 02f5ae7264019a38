//! Running an artifact over a batch of samples on the host with kiln-runtime.

use crate::artifact::AlignedBytes;
use crate::npy::Array;
use anyhow::{bail, Result};
use kiln_runtime::graph::DType;
use kiln_runtime::interpreter::Interpreter;
use kiln_runtime::model::{element_count, Model};

/// Outputs of a batch, batch first, in the model's output type.
#[derive(Clone, Debug, PartialEq)]
pub enum Outputs {
    /// int8 outputs.
    I8(Vec<i8>),
    /// f32 outputs.
    F32(Vec<f32>),
    /// f16 outputs.
    F16(Vec<half::f16>),
}

/// The batch's outputs and their shape (batch first).
#[derive(Clone, Debug, PartialEq)]
pub struct BatchResult {
    /// Shape: `[batch, ...output shape without its leading 1]`.
    pub shape: Vec<usize>,
    /// Values.
    pub outputs: Outputs,
}

/// Runs the first `count` samples and returns, for each, the raw bytes the interpreter saw at its
/// inputs and produced at its outputs (the SELFTEST vectors of the artifact).
///
/// # Errors
/// As [`run_batch`].
pub fn capture_raw(
    artifact: &[u8],
    input: &Array,
    count: usize,
) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let bytes = AlignedBytes::new(artifact);
    let model = Model::load(bytes.as_slice())?;
    let mut arena = AlignedBytes::zeroed(model.arena_bytes());
    let mut interp = Interpreter::new(model, arena.as_mut_slice())?;
    let per_in = check_batch(&interp, input)?;
    let batch = input.len() / per_in;
    let mut cases = Vec::new();
    for s in 0..batch.min(count) {
        set_sample(&mut interp, input, s, per_in)?;
        let raw_in = interp.input_bytes_mut(0)?.to_vec();
        interp.invoke()?;
        cases.push((raw_in, interp.output_bytes(0)?.to_vec()));
    }
    Ok(cases)
}

fn check_batch(interp: &Interpreter<'_, '_>, input: &Array) -> Result<usize> {
    let model = interp.model();
    if model.inputs().len() != 1 || model.outputs().len() != 1 {
        bail!(
            "the model has {} inputs and {} outputs; kiln handles models with one of each here",
            model.inputs().len(),
            model.outputs().len()
        );
    }
    let in_t = interp.input_info(0)?;
    let per_in = element_count(&in_t);
    if input.is_empty() || !input.len().is_multiple_of(per_in) {
        bail!(
            "input has shape {:?} ({} values), which is not a whole number of samples of the model's input shape {:?}\nhint: pass the samples batch first",
            input.shape(),
            input.len(),
            in_t.shape.as_slice()
        );
    }
    Ok(per_in)
}

fn set_sample(
    interp: &mut Interpreter<'_, '_>,
    input: &Array,
    s: usize,
    per_in: usize,
) -> Result<()> {
    match input {
        Array::I8 { data, .. } => {
            let dtype = interp.input_info(0)?.dtype;
            if dtype != DType::I8 {
                bail!("the input file holds int8 values but the model's input is {}; pass real (float) values", dtype.name());
            }
            interp.set_input_i8(0, &data[s * per_in..(s + 1) * per_in])?;
        }
        Array::F32 { data, .. } => interp.set_input_f32(0, &data[s * per_in..(s + 1) * per_in])?,
    }
    Ok(())
}

/// Runs every sample of `input` through the model (one input, one output), calling `progress`
/// after each sample.
///
/// # Errors
/// The artifact is invalid, or the input does not fit the model.
pub fn run_batch(
    artifact: &[u8],
    input: &Array,
    progress: impl FnMut(usize),
) -> Result<BatchResult> {
    run_batch_on(artifact, input, progress, |interp| {
        interp.invoke()?;
        Ok(interp.output_bytes(0)?.to_vec())
    })
}

/// [`run_batch`] on kiln-runtime's candle backend (CPU here; a GPU when kiln is built with
/// kiln-runtime's `cuda` or `metal` feature). Inputs are converted to the model's input type
/// exactly as the portable interpreter converts them; int8 models are computed in f32 with
/// fake quantization (see docs/NUMERICS.md), so their outputs may differ from the portable
/// kernels' by a quantization step or two.
///
/// # Errors
/// As [`run_batch`], or an op the candle backend does not run.
pub fn run_batch_candle(
    artifact: &[u8],
    input: &Array,
    progress: impl FnMut(usize),
) -> Result<BatchResult> {
    let bytes = AlignedBytes::new(artifact);
    let model = Model::load(bytes.as_slice())?;
    let exec = kiln_runtime::candle_backend::CandleModel::new(&model, &candle_core::Device::Cpu)?;
    run_batch_on(artifact, input, progress, |interp| {
        let raw_in = interp.input_bytes_mut(0)?.to_vec();
        Ok(exec.run(&[&raw_in])?.remove(0))
    })
}

/// The batch loop: each sample is set on the portable interpreter's input (converted to the
/// input's type), then `step` produces the raw output bytes.
fn run_batch_on(
    artifact: &[u8],
    input: &Array,
    mut progress: impl FnMut(usize),
    mut step: impl FnMut(&mut Interpreter<'_, '_>) -> Result<Vec<u8>>,
) -> Result<BatchResult> {
    let bytes = AlignedBytes::new(artifact);
    let model = Model::load(bytes.as_slice())?;
    let mut arena = AlignedBytes::zeroed(model.arena_bytes());
    let mut interp = Interpreter::new(model, arena.as_mut_slice())?;
    let per_in = check_batch(&interp, input)?;
    let out_t = interp.output_info(0)?;
    let per_out = element_count(&out_t);
    let batch = input.len() / per_in;
    let mut outputs = match out_t.dtype {
        DType::I8 => Outputs::I8(Vec::with_capacity(batch * per_out)),
        DType::F32 => Outputs::F32(Vec::with_capacity(batch * per_out)),
        DType::F16 => Outputs::F16(Vec::with_capacity(batch * per_out)),
        DType::I32 => bail!("int32 model outputs are not supported"),
    };
    for s in 0..batch {
        set_sample(&mut interp, input, s, per_in)?;
        let raw = step(&mut interp)?;
        match &mut outputs {
            Outputs::I8(v) => v.extend(raw.iter().map(|&b| b as i8)),
            Outputs::F32(v) => v.extend(
                raw.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            ),
            Outputs::F16(v) => v.extend(
                raw.chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]])),
            ),
        }
        progress(s + 1);
    }
    let mut shape = vec![batch];
    let dims: Vec<usize> = out_t.shape.iter().map(|&d| d as usize).collect();
    shape.extend(if dims.first() == Some(&1) && dims.len() > 1 {
        &dims[1..]
    } else {
        &dims[..]
    });
    Ok(BatchResult { shape, outputs })
}
