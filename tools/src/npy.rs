//! Reading model inputs from `.npy` / `.npz` and writing outputs as `.npy`.

use anyhow::{anyhow, bail, Context, Result};
use npyz::WriterBuilder;
use std::path::Path;

/// A batch of samples read from a file: batch first.
#[derive(Clone, Debug, PartialEq)]
pub enum Array {
    /// Raw int8 values (already quantized).
    I8 {
        /// Shape, batch first.
        shape: Vec<usize>,
        /// Values.
        data: Vec<i8>,
    },
    /// Real values (quantized at the model's input edge when the model is int8).
    F32 {
        /// Shape, batch first.
        shape: Vec<usize>,
        /// Values.
        data: Vec<f32>,
    },
}

impl Array {
    /// The shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            Array::I8 { shape, .. } | Array::F32 { shape, .. } => shape,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Array::I8 { data, .. } => data.len(),
            Array::F32 { data, .. } => data.len(),
        }
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The numpy type code of an array (`i1`, `f4`, `u1`, ...), without byte-order marks.
fn type_code<R: std::io::Read>(npy: &npyz::NpyFile<R>) -> String {
    npy.dtype()
        .descr()
        .trim_matches('\'')
        .trim_start_matches(['<', '|', '='])
        .to_string()
}

/// Decodes an array. `uint8` is read as real values times `u8_scale` when that is given, and
/// refused otherwise (it is ambiguous for an int8 model).
fn from_npy<R: std::io::Read>(
    npy: npyz::NpyFile<R>,
    what: &str,
    u8_scale: Option<f32>,
) -> Result<Array> {
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let data = match (type_code(&npy).as_str(), u8_scale) {
        ("i1", _) => Array::I8 { shape, data: npy.into_vec::<i8>()? },
        ("f4", _) => Array::F32 { shape, data: npy.into_vec::<f32>()? },
        ("f8", _) => Array::F32 { shape, data: npy.into_vec::<f64>()?.into_iter().map(|v| v as f32).collect() },
        ("f2", _) => Array::F32 { shape, data: npy.into_vec::<half::f16>()?.into_iter().map(|v| v.to_f32()).collect() },
        ("u1", Some(s)) => Array::F32 { shape, data: npy.into_vec::<u8>()?.into_iter().map(|v| v as f32 * s).collect() },
        (other, _) => bail!(
            "{what} has dtype `{other}`; kiln reads int8 (raw quantized values) or float (real values)\nhint: convert it with numpy first, e.g. `x.astype(np.float32)` or `(x.astype(np.int16) - 128).astype(np.int8)`"
        ),
    };
    Ok(data)
}

/// Reads an `.npy`, or the first of `names` found in an `.npz`.
fn read_named(path: &Path, names: &[&str], u8_scale: Option<f32>) -> Result<Array> {
    let shown = path.display();
    if path.extension().and_then(|e| e.to_str()) == Some("npz") {
        let mut npz = npyz::npz::NpzArchive::open(path)
            .with_context(|| format!("cannot open {shown} as .npz"))?;
        for n in names {
            if let Some(npy) = npz
                .by_name(n)
                .with_context(|| format!("cannot read array `{n}` of {shown}"))?
            {
                return from_npy(npy, &format!("array `{n}` of {shown}"), u8_scale);
            }
        }
        let have: Vec<String> = npz.array_names().map(str::to_string).collect();
        let wanted: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
        bail!(
            "{shown} has no array named {} (it has: {})\nhint: save the samples as `x`, batch first",
            wanted.join(" or "),
            have.join(", ")
        )
    } else {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {shown}"))?;
        let npy = npyz::NpyFile::new(&bytes[..])
            .with_context(|| format!("{shown} is not a valid .npy file"))?;
        from_npy(npy, &shown.to_string(), u8_scale)
    }
}

/// Reads samples as real values for quantization and evaluation: like [`read_input`], but a
/// `uint8` array (images) is accepted as real values, multiplied by `u8_scale` (e.g. 1/255) when
/// given. Without `name`, an `.npz`'s `x`, `input` or `spectrograms` is read.
pub fn read_real(path: &Path, name: Option<&str>, u8_scale: Option<f32>) -> Result<Array> {
    let names = match name {
        Some(n) => vec![n],
        None => vec!["x", "input", "spectrograms"],
    };
    read_named(path, &names, Some(u8_scale.unwrap_or(1.0)))
}

/// Reads integer class labels (array `y` of an `.npz`).
pub fn read_labels(path: &Path) -> Result<Vec<i64>> {
    let mut npz = npyz::npz::NpzArchive::open(path)
        .with_context(|| format!("cannot open {} as .npz", path.display()))?;
    let npy = npz.by_name("y")?.ok_or_else(|| {
        anyhow!(
            "{} has no labels array `y`\nhint: store the class indices as `y`",
            path.display()
        )
    })?;
    Ok(match type_code(&npy).as_str() {
        "i1" => npy.into_vec::<i8>()?.into_iter().map(i64::from).collect(),
        "u1" => npy.into_vec::<u8>()?.into_iter().map(i64::from).collect(),
        "i2" => npy.into_vec::<i16>()?.into_iter().map(i64::from).collect(),
        "i4" => npy.into_vec::<i32>()?.into_iter().map(i64::from).collect(),
        "i8" => npy.into_vec::<i64>()?,
        other => bail!(
            "labels `y` of {} have dtype `{other}`; use integer class indices",
            path.display()
        ),
    })
}

/// Reads the input batch: an `.npy`, or the array `x` (else `input`) of an `.npz`.
pub fn read_input(path: &Path) -> Result<Array> {
    read_named(path, &["x", "input"], None)
}

/// Reads a named array of an `.npz` as int8 (for golden files).
pub fn read_npz_i8(path: &Path, name: &str) -> Result<(Vec<usize>, Vec<i8>)> {
    let mut npz = npyz::npz::NpzArchive::open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let npy = npz
        .by_name(name)?
        .ok_or_else(|| anyhow!("{} has no array `{name}`", path.display()))?;
    match from_npy(npy, name, None)? {
        Array::I8 { shape, data } => Ok((shape, data)),
        Array::F32 { .. } => bail!("array `{name}` of {} is not int8", path.display()),
    }
}

/// Output data to write, in the model's output type.
pub enum OutputData<'a> {
    /// int8.
    I8(&'a [i8]),
    /// f32.
    F32(&'a [f32]),
    /// f16.
    F16(&'a [half::f16]),
}

fn write_typed<T: npyz::AutoSerialize + Copy>(
    w: impl std::io::Write,
    shape: &[u64],
    data: &[T],
) -> Result<()> {
    let mut wr = npyz::WriteOptions::new()
        .default_dtype()
        .shape(shape)
        .writer(w)
        .begin_nd()?;
    wr.extend(data.iter().copied())?;
    wr.finish()?;
    Ok(())
}

/// Writes an `.npy` with the given shape.
pub fn write_npy(path: &Path, shape: &[usize], data: OutputData<'_>) -> Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let shape: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    let w = std::io::BufWriter::new(file);
    match data {
        OutputData::I8(d) => write_typed(w, &shape, d),
        OutputData::F32(d) => write_typed(w, &shape, d),
        OutputData::F16(d) => write_typed(w, &shape, d),
    }
}
