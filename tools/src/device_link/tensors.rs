//! Samples in, outputs out, for `kiln infer --serial`: turns an input array into the raw bytes
//! `Infer` carries, and the raw bytes the device answers into an array to save.
//!
//! A device's `Info` gives only the byte lengths of the model's inputs and outputs, not their
//! types, so there are two modes:
//! * **raw** (no artifact at hand): an int8 array is sent as its bytes, a float array as f32
//!   little-endian bytes; each sample must be exactly `input_len` bytes. Outputs are saved as
//!   int8, shape `[n, output_len]`: the exact bytes (reinterpret them with numpy's `.view()` when
//!   the model's output is f32 or f16).
//! * **typed** (`--model`, the artifact the device runs): samples are converted as `kiln run`
//!   does (float values quantized at an int8 model's input with its scale and zero point), and
//!   outputs are saved in the model's output type and shape, batch first.

use crate::artifact::AlignedBytes;
use crate::npy::{Array, OutputData};
use anyhow::{bail, Context, Result};
use half::f16;
use kiln_runtime::graph::{DType, TensorDef};
use kiln_runtime::interpreter::Interpreter;
use kiln_runtime::model::{element_count, Model};

/// Which samples of the input file to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Selection {
    /// The file must hold exactly one sample.
    Single,
    /// Sample `i` (from 0).
    Index(usize),
    /// Every sample.
    All,
}

/// Outputs to save: shape (batch first) and values.
#[derive(Clone, Debug, PartialEq)]
pub struct Outputs {
    /// Shape, batch first.
    pub shape: Vec<usize>,
    /// Values in the saved type.
    pub data: OutputValues,
}

/// Output values.
#[derive(Clone, Debug, PartialEq)]
pub enum OutputValues {
    /// int8 (also the raw bytes of outputs of unknown type).
    I8(Vec<i8>),
    /// f32.
    F32(Vec<f32>),
    /// f16.
    F16(Vec<f16>),
}

impl Outputs {
    /// The values as [`crate::npy::write_npy`] takes them.
    pub fn data(&self) -> OutputData<'_> {
        match &self.data {
            OutputValues::I8(v) => OutputData::I8(v),
            OutputValues::F32(v) => OutputData::F32(v),
            OutputValues::F16(v) => OutputData::F16(v),
        }
    }

    /// numpy's name of the saved type.
    pub fn dtype(&self) -> &'static str {
        match self.data {
            OutputValues::I8(_) => "int8",
            OutputValues::F32(_) => "float32",
            OutputValues::F16(_) => "float16",
        }
    }
}

/// The artifact the device runs, loaded on the host to learn its input and output types.
pub struct TypedModel {
    bytes: AlignedBytes,
    /// The artifact's model version.
    pub version: u32,
}

impl TypedModel {
    /// Loads and checks an artifact (one input, one output).
    ///
    /// # Errors
    /// The artifact is invalid or has several inputs or outputs.
    pub fn new(artifact: &[u8]) -> Result<TypedModel> {
        let bytes = AlignedBytes::new(artifact);
        let model = Model::load(bytes.as_slice()).context("not a valid Kiln artifact")?;
        if model.inputs().len() != 1 || model.outputs().len() != 1 {
            bail!(
                "the model has {} inputs and {} outputs; typed inference handles one of each (leave --model out to send and save raw bytes)",
                model.inputs().len(),
                model.outputs().len()
            );
        }
        let version = model.container().header.model_version;
        Ok(TypedModel { bytes, version })
    }

    fn with_interpreter<T>(
        &self,
        f: impl FnOnce(&mut Interpreter<'_, '_>) -> Result<T>,
    ) -> Result<T> {
        let model = Model::load(self.bytes.as_slice())?;
        let mut arena = AlignedBytes::zeroed(model.arena_bytes());
        let mut interp = Interpreter::new(model, arena.as_mut_slice())?;
        f(&mut interp)
    }

    fn io(&self) -> Result<(TensorDef, TensorDef)> {
        self.with_interpreter(|i| Ok((i.input_info(0)?, i.output_info(0)?)))
    }
}

fn pick(batch: usize, selection: Selection, shape: &[usize]) -> Result<Vec<usize>> {
    match selection {
        Selection::All => Ok((0..batch).collect()),
        Selection::Index(i) if i < batch => Ok(vec![i]),
        Selection::Index(i) => bail!(
            "--index {i} is out of range: the input (shape {shape:?}) holds {batch} sample(s)"
        ),
        Selection::Single if batch == 1 => Ok(vec![0]),
        Selection::Single => bail!(
            "the input (shape {shape:?}) holds {batch} samples: pass --index I for one of them or --all for every one"
        ),
    }
}

/// Splits `x` into the raw `Infer` inputs of the selected samples. `input_len` is the device
/// model's input size in bytes; `model` switches to typed conversion.
///
/// # Errors
/// The array does not hold whole samples of the model's input, a wrong type, a bad index.
pub fn samples(
    x: &Array,
    input_len: usize,
    selection: Selection,
    model: Option<&TypedModel>,
) -> Result<Vec<Vec<u8>>> {
    match model {
        None => raw_samples(x, input_len, selection),
        Some(m) => typed_samples(x, input_len, selection, m),
    }
}

fn raw_samples(x: &Array, input_len: usize, selection: Selection) -> Result<Vec<Vec<u8>>> {
    let (elem, kind) = match x {
        Array::I8 { .. } => (1, "int8"),
        Array::F32 { .. } => (4, "float32"),
    };
    let per = input_len / elem;
    if per == 0 || !input_len.is_multiple_of(elem) || x.is_empty() || !x.len().is_multiple_of(per) {
        bail!(
            "the input holds {} {kind} values (shape {:?}), which is not a whole number of samples of the device model's {input_len}-byte input: pass {kind} samples of {} values, int8 values for an int8 model, or give --model so kiln can convert",
            x.len(),
            x.shape(),
            input_len as f64 / elem as f64
        );
    }
    let picked = pick(x.len() / per, selection, x.shape())?;
    Ok(picked
        .into_iter()
        .map(|s| match x {
            Array::I8 { data, .. } => {
                bytemuck::cast_slice::<i8, u8>(&data[s * per..(s + 1) * per]).to_vec()
            }
            Array::F32 { data, .. } => data[s * per..(s + 1) * per]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        })
        .collect())
}

fn typed_samples(
    x: &Array,
    input_len: usize,
    selection: Selection,
    model: &TypedModel,
) -> Result<Vec<Vec<u8>>> {
    model.with_interpreter(|interp| {
        let t = interp.input_info(0)?;
        let per = element_count(&t);
        if x.is_empty() || per == 0 || !x.len().is_multiple_of(per) {
            bail!(
                "the input has shape {:?} ({} values), which is not a whole number of samples of the model's input shape {:?}: pass the samples batch first",
                x.shape(),
                x.len(),
                t.shape.as_slice()
            );
        }
        let picked = pick(x.len() / per, selection, x.shape())?;
        let mut out = Vec::with_capacity(picked.len());
        for s in picked {
            match x {
                Array::I8 { data, .. } => {
                    if t.dtype != DType::I8 {
                        bail!(
                            "the input holds int8 values but the model's input is {}: pass real (float) values",
                            t.dtype.name()
                        );
                    }
                    interp.set_input_i8(0, &data[s * per..(s + 1) * per])?;
                }
                Array::F32 { data, .. } => interp.set_input_f32(0, &data[s * per..(s + 1) * per])?,
            }
            let bytes = interp.input_bytes_mut(0)?.to_vec();
            if bytes.len() != input_len {
                bail!(
                    "the model's input is {} bytes but the device's model takes {input_len}: --model is not the model the device runs",
                    bytes.len()
                );
            }
            out.push(bytes);
        }
        Ok(out)
    })
}

/// Stacks the devices' raw outputs: int8 `[n, output_len]` in raw mode, the model's output type
/// and shape (batch first) in typed mode.
///
/// # Errors
/// An output of the wrong length, an unsupported output type.
pub fn outputs(raw: &[Vec<u8>], output_len: usize, model: Option<&TypedModel>) -> Result<Outputs> {
    if let Some(bad) = raw.iter().find(|o| o.len() != output_len) {
        bail!(
            "the device returned {} output bytes where its model has {output_len}: the firmware misreports its model",
            bad.len()
        );
    }
    let bytes: Vec<u8> = raw.concat();
    let Some(model) = model else {
        return Ok(Outputs {
            shape: vec![raw.len(), output_len],
            data: OutputValues::I8(bytemuck::cast_slice::<u8, i8>(&bytes).to_vec()),
        });
    };
    let (_, t) = model.io()?;
    let mut shape = vec![raw.len()];
    let dims: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
    shape.extend(if dims.first() == Some(&1) && dims.len() > 1 {
        &dims[1..]
    } else {
        &dims[..]
    });
    let data = match t.dtype {
        DType::I8 => OutputValues::I8(bytemuck::cast_slice::<u8, i8>(&bytes).to_vec()),
        DType::F32 => OutputValues::F32(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        DType::F16 => OutputValues::F16(
            bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]))
                .collect(),
        ),
        other => bail!(
            "the model's output is {}, which kiln does not save; leave --model out to save the raw bytes",
            other.name()
        ),
    };
    if element_count(&t) * raw.len() != data_len(&data) {
        bail!(
            "the model's output is {} values but the device returned {output_len} bytes: --model is not the model the device runs",
            element_count(&t)
        );
    }
    Ok(Outputs { shape, data })
}

fn data_len(d: &OutputValues) -> usize {
    match d {
        OutputValues::I8(v) => v.len(),
        OutputValues::F32(v) => v.len(),
        OutputValues::F16(v) => v.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_samples_split_by_bytes() {
        let x = Array::I8 {
            shape: vec![3, 4],
            data: (0..12).map(|v| v as i8 - 6).collect(),
        };
        let s = samples(&x, 4, Selection::All, None).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[1], vec![254, 255, 0, 1]);
        assert_eq!(samples(&x, 4, Selection::Index(2), None).unwrap().len(), 1);
        assert!(samples(&x, 4, Selection::Index(3), None).is_err());
        let e = samples(&x, 4, Selection::Single, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--index") && e.contains("--all"), "{e}");
        assert!(samples(&x, 5, Selection::All, None).is_err());
        let f = Array::F32 {
            shape: vec![1, 2],
            data: vec![1.0, -2.0],
        };
        let s = samples(&f, 8, Selection::Single, None).unwrap();
        assert_eq!(s[0][..4], 1.0f32.to_le_bytes());
        assert!(samples(&f, 2, Selection::Single, None).is_err());
    }

    #[test]
    fn raw_outputs_are_int8_rows() {
        let o = outputs(&[vec![1, 255], vec![2, 3]], 2, None).unwrap();
        assert_eq!(o.shape, vec![2, 2]);
        assert_eq!(o.data, OutputValues::I8(vec![1, -1, 2, 3]));
        assert!(outputs(&[vec![1]], 2, None).is_err());
    }
}
