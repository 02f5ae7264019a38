//! A verified model held in memory: 16-byte aligned bytes, checked once (digest, signature by a
//! trusted key, a graph the runtime accepts), then run for self-tests and inferences.

use kiln_runtime::format::Container;
use kiln_runtime::graph::{DType, TensorDef};
use kiln_runtime::sections::{baseline_histograms, run_self_test, BaselineTensor, Manifest};
use kiln_runtime::{Interpreter, Model};
use sha2::{Digest, Sha256};

/// Why a model was refused or an inference failed (one line each).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ModelFault {
    /// The artifact is malformed or its digest does not match.
    #[error("malformed artifact: {0}")]
    Malformed(String),
    /// No trusted signature.
    #[error("signature refused: {0}")]
    Signature(String),
    /// Signed for another board.
    #[error("artifact is for board {artifact:?}, this device is {board:?}")]
    WrongBoard {
        /// The artifact's target.
        artifact: String,
        /// This board.
        board: String,
    },
    /// Self-test outputs differ.
    #[error("self-test failed ({failed} of {} cases differ)", passed + failed)]
    SelfTestFailed {
        /// Cases that matched.
        passed: u16,
        /// Cases that differed.
        failed: u16,
    },
    /// Inference failed.
    #[error("inference failed: {0}")]
    Inference(String),
    /// The input has the wrong length.
    #[error("input is {got} bytes, the model takes {want}")]
    BadInput {
        /// Bytes given.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
}

/// A baseline histogram's bin edges (real values), for binning traffic on the device.
#[derive(Debug, Clone, PartialEq)]
pub struct Bins {
    /// Which tensor.
    pub tensor: BaselineTensor,
    /// `bins + 1` ascending edges.
    pub edges: Vec<f32>,
}

impl Bins {
    /// Index of the bin `v` falls in (values outside go to the first / last bin).
    pub fn bin(&self, v: f32) -> usize {
        let bins = self.edges.len().saturating_sub(1).max(1);
        let i = self.edges.partition_point(|e| *e <= v);
        i.saturating_sub(1).min(bins - 1)
    }

    /// Number of bins.
    pub fn len(&self) -> usize {
        self.edges.len().saturating_sub(1)
    }

    /// Whether there are no bins.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A model whose digest, signature and graph were verified.
#[derive(Debug)]
pub struct VerifiedModel {
    words: Vec<u128>,
    len: usize,
    /// Model name (MANIFEST; `""` when absent).
    pub name: String,
    /// Version from the signed header.
    pub version: u32,
    /// Security counter from the signed header.
    pub counter: u32,
    /// Target board (`""` = any).
    pub target: String,
    /// SHA-256 (hex) of the whole file.
    pub sha256: String,
    /// Arena bytes the interpreter needs.
    pub arena_bytes: usize,
    /// Bytes of all inputs, concatenated.
    pub input_len: usize,
    /// BASELINE bins of the inputs and outputs.
    pub bins: Vec<Bins>,
    inputs: Vec<TensorDef>,
    outputs: Vec<TensorDef>,
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 (hex) of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn model_err(e: impl core::fmt::Debug) -> ModelFault {
    ModelFault::Malformed(format!("{e:?}"))
}

impl VerifiedModel {
    /// Verifies `bytes`: container and digest, a signature by one of `trusted`, the board (an
    /// artifact for another board is refused; `""` fits any), and the graph.
    ///
    /// # Errors
    /// [`ModelFault`].
    pub fn verify(bytes: &[u8], trusted: &[[u8; 32]], board: &str) -> Result<Self, ModelFault> {
        let mut words = vec![0u128; bytes.len().div_ceil(16)];
        words_bytes_mut(&mut words)[..bytes.len()].copy_from_slice(bytes);
        let mut m = VerifiedModel {
            words,
            len: bytes.len(),
            name: String::new(),
            version: 0,
            counter: 0,
            target: String::new(),
            sha256: sha256_hex(bytes),
            arena_bytes: 0,
            input_len: 0,
            bins: Vec::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
        };
        {
            let b = m.bytes();
            let model = Model::load(b).map_err(model_err)?;
            model
                .container()
                .verify_signatures(trusted)
                .map_err(|e| ModelFault::Signature(format!("{e:?}")))?;
            let h = model.container().header;
            let target = h.target_name().to_string();
            if !target.is_empty() && target != board {
                return Err(ModelFault::WrongBoard {
                    artifact: target,
                    board: board.to_string(),
                });
            }
            let name = Manifest::of(&model)
                .map_err(model_err)?
                .map(|mf| mf.name.to_string())
                .unwrap_or_default();
            let mut bins = Vec::new();
            baseline_histograms(&model, |h| {
                let edges = h
                    .edges
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                bins.push(Bins {
                    tensor: h.tensor,
                    edges,
                });
            })
            .map_err(model_err)?;
            let mut inputs = Vec::new();
            for &i in model.inputs() {
                inputs.push(model.tensor(i).map_err(model_err)?);
            }
            let mut outputs = Vec::new();
            for &o in model.outputs() {
                outputs.push(model.tensor(o).map_err(model_err)?);
            }
            let input_len = inputs.iter().map(kiln_runtime::model::tensor_bytes).sum();
            m = VerifiedModel {
                name,
                version: h.model_version,
                counter: h.security_counter,
                target,
                arena_bytes: model.arena_bytes(),
                input_len,
                bins,
                inputs,
                outputs,
                ..m
            };
        }
        Ok(m)
    }

    /// The artifact bytes (16-byte aligned).
    pub fn bytes(&self) -> &[u8] {
        &words_bytes(&self.words)[..self.len]
    }

    fn with_interpreter<T>(
        &self,
        f: impl FnOnce(&mut Interpreter<'_, '_>) -> Result<T, ModelFault>,
    ) -> Result<T, ModelFault> {
        // Verified at construction: skip re-hashing the body.
        let c = Container::parse_structure(self.bytes()).map_err(model_err)?;
        let model = Model::from_container(c).map_err(model_err)?;
        let mut arena = vec![0u128; self.arena_bytes.div_ceil(16).max(1)];
        let arena = &mut words_bytes_mut(&mut arena)[..self.arena_bytes];
        let mut interp = Interpreter::new(model, arena).map_err(model_err)?;
        f(&mut interp)
    }

    /// Runs the SELFTEST vectors.
    ///
    /// # Errors
    /// [`ModelFault::SelfTestFailed`] when an output differs, or the section is malformed.
    pub fn self_test(&self) -> Result<u16, ModelFault> {
        self.with_interpreter(|interp| {
            let r = run_self_test(interp).map_err(|e| ModelFault::Inference(format!("{e:?}")))?;
            if r.failed > 0 {
                return Err(ModelFault::SelfTestFailed {
                    passed: r.passed,
                    failed: r.failed,
                });
            }
            Ok(r.passed)
        })
    }

    /// Runs one inference: `input` is the raw bytes of every input, concatenated; the answer is
    /// the raw bytes of every output, concatenated.
    ///
    /// # Errors
    /// Wrong input length, or the interpreter failed.
    pub fn infer(&self, input: &[u8]) -> Result<Vec<u8>, ModelFault> {
        if input.len() != self.input_len {
            return Err(ModelFault::BadInput {
                got: input.len(),
                want: self.input_len,
            });
        }
        let n_in = self.inputs.len();
        let n_out = self.outputs.len();
        self.with_interpreter(|interp| {
            let inf = |e: kiln_runtime::InvokeError| ModelFault::Inference(format!("{e:?}"));
            let mut at = 0;
            for i in 0..n_in {
                let dst = interp.input_bytes_mut(i).map_err(inf)?;
                let n = dst.len();
                let src = input.get(at..at + n).ok_or(ModelFault::BadInput {
                    got: input.len(),
                    want: at + n,
                })?;
                dst.copy_from_slice(src);
                at += n;
            }
            interp.invoke().map_err(inf)?;
            let mut out = Vec::new();
            for o in 0..n_out {
                out.extend_from_slice(interp.output_bytes(o).map_err(inf)?);
            }
            Ok(out)
        })
    }

    /// Real values of input `i` (or output `i` when `output`) in `bytes` (the concatenation as
    /// [`Self::infer`] takes or gives it); `None` for tensors that are not f32/f16/int8.
    pub fn real_values(&self, bytes: &[u8], output: bool, i: usize) -> Option<Vec<f32>> {
        let defs = if output { &self.outputs } else { &self.inputs };
        let mut at = 0;
        for d in defs.iter().take(i) {
            at += kiln_runtime::model::tensor_bytes(d);
        }
        let d = defs.get(i)?;
        let b = bytes.get(at..at + kiln_runtime::model::tensor_bytes(d))?;
        match d.dtype {
            DType::F32 => Some(
                b.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            DType::I8 => {
                let q = d.quant?;
                Some(
                    b.iter()
                        .map(|&v| (v as i8 as i32 - q.zero_point) as f32 * q.scale)
                        .collect(),
                )
            }
            _ => None,
        }
    }

    /// Input bytes with every value drawn from `[lo, hi)` by `next` (uniform in `0..1`), encoded
    /// in each input's dtype. Used by the simulator for traffic.
    pub fn make_input(&self, lo: f32, hi: f32, mut next: impl FnMut() -> f32) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.input_len);
        for d in &self.inputs {
            let n = kiln_runtime::model::element_count(d);
            for _ in 0..n {
                let v = lo + (hi - lo) * next();
                match (d.dtype, d.quant) {
                    (DType::I8, Some(q)) if q.scale > 0.0 => {
                        let x = (v / q.scale).round() as i32 + q.zero_point;
                        out.push(x.clamp(-128, 127) as i8 as u8);
                    }
                    (DType::F32, _) => out.extend_from_slice(&v.to_le_bytes()),
                    _ => out.extend(core::iter::repeat_n(
                        0u8,
                        kiln_runtime::model::tensor_bytes(d) / n.max(1),
                    )),
                }
            }
        }
        out.resize(self.input_len, 0);
        out
    }

    /// The BASELINE range of input 0 (first and last edge), if the model has one.
    pub fn input_range(&self) -> Option<(f32, f32)> {
        let b = self
            .bins
            .iter()
            .find(|b| b.tensor == BaselineTensor::Input(0))?;
        Some((*b.edges.first()?, *b.edges.last()?))
    }
}

fn words_bytes(w: &[u128]) -> &[u8] {
    bytemuck::cast_slice(w)
}

fn words_bytes_mut(w: &mut [u128]) -> &mut [u8] {
    bytemuck::cast_slice_mut(w)
}
