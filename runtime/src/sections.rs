//! Layouts of the MANIFEST and SELFTEST sections, and the on-device self-test.

use crate::error::{InvokeError, ModelError};
use crate::interpreter::Interpreter;
use crate::model::Model;
use serde::{Deserialize, Serialize};

/// The MANIFEST section: a name the device can show, and the full lineage as JSON for hosts.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Manifest<'a> {
    /// Model name.
    pub name: &'a str,
    /// Lineage and metrics as a JSON object (source digests, options, tool version, metrics).
    pub json: &'a str,
}

impl<'a> Manifest<'a> {
    /// Decodes the MANIFEST section of a model, if it has one.
    ///
    /// # Errors
    /// The section does not decode.
    pub fn of(model: &Model<'a>) -> Result<Option<Self>, ModelError> {
        match model
            .container()
            .section(crate::format::SectionKind::Manifest)
        {
            None => Ok(None),
            Some(b) => postcard::from_bytes(b)
                .map(Some)
                .map_err(|_| ModelError::Decode { what: "manifest" }),
        }
    }
}

/// Head of the SELFTEST section; `count` [`SelfTestCase`]s follow.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct SelfTestHead {
    /// Number of cases.
    pub count: u16,
}

/// One self-test case: the raw bytes of every graph input, concatenated in input order, and the
/// exact raw bytes every graph output must have.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct SelfTestCase<'a> {
    /// Input bytes.
    pub inputs: &'a [u8],
    /// Expected output bytes.
    pub outputs: &'a [u8],
}

/// Result of running the SELFTEST vectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SelfTestReport {
    /// Cases whose outputs matched bit for bit.
    pub passed: u16,
    /// Cases that differed.
    pub failed: u16,
}

/// Runs every SELFTEST case and compares outputs bit for bit. A model without the section
/// reports zero cases.
///
/// # Errors
/// The section is malformed (sizes do not match the graph's inputs and outputs).
pub fn run_self_test(interp: &mut Interpreter<'_, '_>) -> Result<SelfTestReport, InvokeError> {
    let model = *interp.model();
    let Some(bytes) = model
        .container()
        .section(crate::format::SectionKind::SelfTest)
    else {
        return Ok(SelfTestReport::default());
    };
    let bad = ModelError::Decode { what: "self-test" };
    let (head, mut rest): (SelfTestHead, &[u8]) =
        postcard::take_from_bytes(bytes).map_err(|_| bad)?;
    let mut report = SelfTestReport::default();
    for _ in 0..head.count {
        let (case, r): (SelfTestCase<'_>, &[u8]) =
            postcard::take_from_bytes(rest).map_err(|_| bad)?;
        rest = r;
        let mut at = 0;
        for i in 0..model.inputs().len() {
            let dst = interp.input_bytes_mut(i)?;
            let src = case.inputs.get(at..at + dst.len()).ok_or(bad)?;
            dst.copy_from_slice(src);
            at += dst.len();
        }
        if at != case.inputs.len() {
            return Err(bad.into());
        }
        interp.invoke()?;
        let mut at = 0;
        let mut same = true;
        for i in 0..model.outputs().len() {
            let got = interp.output_bytes(i)?;
            let want = case.outputs.get(at..at + got.len()).ok_or(bad)?;
            same &= got == want;
            at += got.len();
        }
        if at != case.outputs.len() {
            return Err(bad.into());
        }
        if same {
            report.passed += 1;
        } else {
            report.failed += 1;
        }
    }
    Ok(report)
}

/// Head of the BASELINE section; `count` [`BaselineHistogram`]s follow.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct BaselineHead {
    /// Number of histograms.
    pub count: u8,
}

/// Which graph tensor a baseline histogram describes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BaselineTensor {
    /// Graph input `n`.
    Input(u8),
    /// Graph output `n`.
    Output(u8),
}

/// A fixed-bin histogram of a graph input or output over the calibration data, in real
/// (dequantized) values: `edges` holds `bins + 1` little-endian f32 bin edges chosen on the host
/// (equal-mass on the calibration data), `counts` holds `bins` little-endian u32 counts. Devices
/// bin their own traffic with the same edges; the fleet server compares the two (PSI).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct BaselineHistogram<'a> {
    /// The tensor.
    pub tensor: BaselineTensor,
    /// Bin edges, f32 LE, ascending.
    pub edges: &'a [u8],
    /// Counts, u32 LE.
    pub counts: &'a [u8],
}

/// Iterates the histograms of the BASELINE section of a model (none when absent).
///
/// # Errors
/// The section does not decode, or a histogram's edges and counts disagree.
pub fn baseline_histograms<'a>(
    model: &Model<'a>,
    mut visit: impl FnMut(BaselineHistogram<'a>),
) -> Result<usize, ModelError> {
    let Some(bytes) = model
        .container()
        .section(crate::format::SectionKind::Baseline)
    else {
        return Ok(0);
    };
    let bad = ModelError::Decode { what: "baseline" };
    let (head, mut rest): (BaselineHead, &[u8]) =
        postcard::take_from_bytes(bytes).map_err(|_| bad)?;
    for _ in 0..head.count {
        let (h, r): (BaselineHistogram<'a>, &[u8]) =
            postcard::take_from_bytes(rest).map_err(|_| bad)?;
        rest = r;
        if h.edges.len() % 4 != 0 || h.counts.len() % 4 != 0 || h.edges.len() != h.counts.len() + 4
        {
            return Err(bad);
        }
        visit(h);
    }
    Ok(head.count as usize)
}
