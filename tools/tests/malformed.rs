//! Property tests: `Model::load` never panics on a damaged artifact, refuses every artifact that
//! is damaged in a way that makes it definitely invalid, and whenever it does accept one, binding
//! an arena, setting inputs, invoking and reading outputs do not panic either.
//!
//! Starting points are valid artifacts: two synthetic models built in code (f32 with random
//! weights, and int8 with a per-channel filter — always available), plus the MLPerf Tiny KWS and
//! AD int8 models converted from the shared test data when it is present.
//!
//! Three families of damage:
//! * raw: truncation, bit flips (re-sealed or not), u32 overwrites in the header, the section
//!   table or a section (re-sealed);
//! * definitely invalid, typed: the GRAPH section is decoded into `GraphHeader` / `TensorDef` /
//!   `OpDef`, one rule is broken (index out of range, cycle, overlap, huge or zero dimension,
//!   rank, bad quantization, bad requant, op count, trailing bytes, ...), re-encoded and rebuilt
//!   with a correct digest, so only the deep validation can catch it; `load` must return `Err`;
//! * arbitrary, typed: plausible field changes (offsets, lifetimes, dimensions, parameters,
//!   operands, types) that may or may not leave a valid model; no panic either way, and an
//!   accepted model is run.

mod common;

use common::{f32_data, i32_data, noise, per_tensor, t, u32_at};

use kiln::artifact::{write_artifact, AlignedBytes, HeaderFields};
use kiln::ir;
use kiln::lower::lower;
use kiln_runtime::format::{SectionKind, HEADER_LEN, SECTION_ENTRY_LEN};
use kiln_runtime::graph::{
    Activation, BufRef, DType, GraphHeader, Location, OpDef, OpKind, Quant, Requant, TensorDef,
    MAX_RANK, NO_TENSOR,
};
use kiln_runtime::model::{element_count, tensor_bytes};
use kiln_runtime::{Interpreter, Model, ModelError};
use proptest::prelude::*;
use proptest::sample::Index;
use sha2::{Digest, Sha256};
use std::sync::LazyLock;

/// Largest arena the property tests bind (a mutated header may ask for up to 4 GiB).
const ARENA_CAP: usize = 4 << 20;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Bytes.

/// Recomputes the trailer's SHA-256 after the body was edited, when the header still says where
/// the trailer is; otherwise leaves the bytes alone.
fn reseal(bytes: &mut [u8]) {
    if bytes.len() < 32 {
        return;
    }
    let body_len = u32_at(bytes, 28) as usize;
    if body_len
        .checked_add(48)
        .is_some_and(|end| end <= bytes.len())
    {
        let digest = Sha256::digest(&bytes[..body_len]);
        bytes[body_len + 16..body_len + 48].copy_from_slice(&digest);
    }
}

/// Loads an aligned copy; if it loads, binds an arena of `arena_bytes`, sets every input,
/// invokes and reads every output. Returns what `load` returned.
fn load_and_run(bytes: &[u8], input_seed: u64) -> Result<(), ModelError> {
    let aligned = AlignedBytes::new(bytes);
    let model = Model::load(aligned.as_slice())?;
    if model.arena_bytes() > ARENA_CAP {
        return Ok(());
    }
    let mut arena = AlignedBytes::zeroed(model.arena_bytes());
    let mut interp = Interpreter::new(model, arena.as_mut_slice())
        .expect("an aligned arena of exactly arena_bytes is accepted");
    for i in 0..model.inputs().len() {
        let info = interp.input_info(i).expect("input info of a loaded model");
        let data: Vec<f32> = noise(element_count(&info), input_seed + i as u64)
            .into_iter()
            .map(|b| (b as f32 - 128.0) / 16.0)
            .collect();
        let _ = interp.set_input_f32(i, &data);
    }
    let _ = interp.invoke();
    for i in 0..model.outputs().len() {
        let info = interp
            .output_info(i)
            .expect("output info of a loaded model");
        let mut out = vec![0f32; element_count(&info)];
        let _ = interp.output_f32(i, &mut out);
        let _ = interp.output_bytes(i);
    }
    // Asking for an input or output that does not exist is an error, not a panic.
    assert!(interp.input_info(model.inputs().len()).is_err());
    assert!(interp.output_info(model.outputs().len()).is_err());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Starting points.

/// CONV_2D (3x3, 2 → 4 channels) → RELU → FULLY_CONNECTED (144 → 5) → SOFTMAX, int8 with a
/// per-channel filter or f32; weights from `seed`.
fn synthetic_graph(int8: bool, seed: u64) -> ir::Graph {
    let conv = ir::OpKind::Conv2d {
        stride: [1, 1],
        dilation: [1, 1],
        padding: ir::Padding::Valid,
        activation: Activation::None,
    };
    let fc = ir::OpKind::FullyConnected {
        activation: Activation::None,
    };
    let tensors = if int8 {
        vec![
            t(
                "input",
                DType::I8,
                &[1, 8, 8, 2],
                None,
                per_tensor(0.05, -3),
            ),
            t(
                "filter",
                DType::I8,
                &[4, 3, 3, 2],
                Some(noise(72, seed)),
                Some(ir::QuantInfo {
                    scales: vec![0.01, 0.02, 0.015, 0.03],
                    zero_points: vec![0; 4],
                    axis: 0,
                }),
            ),
            t("bias", DType::I32, &[4], Some(i32_data(4, seed + 1)), None),
            t("conv", DType::I8, &[1, 6, 6, 4], None, per_tensor(0.1, -10)),
            t(
                "relu",
                DType::I8,
                &[1, 6, 6, 4],
                None,
                per_tensor(0.1, -128),
            ),
            t(
                "fc_w",
                DType::I8,
                &[5, 144],
                Some(noise(720, seed + 2)),
                per_tensor(0.02, 0),
            ),
            t("fc_b", DType::I32, &[5], Some(i32_data(5, seed + 3)), None),
            t("fc", DType::I8, &[1, 5], None, per_tensor(0.2, 3)),
            t(
                "prob",
                DType::I8,
                &[1, 5],
                None,
                per_tensor(1.0 / 256.0, -128),
            ),
        ]
    } else {
        vec![
            t("input", DType::F32, &[1, 8, 8, 2], None, None),
            t(
                "filter",
                DType::F32,
                &[4, 3, 3, 2],
                Some(f32_data(72, seed)),
                None,
            ),
            t("bias", DType::F32, &[4], Some(f32_data(4, seed + 1)), None),
            t("conv", DType::F32, &[1, 6, 6, 4], None, None),
            t("relu", DType::F32, &[1, 6, 6, 4], None, None),
            t(
                "fc_w",
                DType::F32,
                &[5, 144],
                Some(f32_data(720, seed + 2)),
                None,
            ),
            t("fc_b", DType::F32, &[5], Some(f32_data(5, seed + 3)), None),
            t("fc", DType::F32, &[1, 5], None, None),
            t("prob", DType::F32, &[1, 5], None, None),
        ]
    };
    let op = |kind, inputs: &[usize], output| ir::Op {
        kind,
        inputs: inputs.iter().map(|&i| Some(i)).collect(),
        outputs: vec![output],
    };
    ir::Graph {
        name: "synthetic".into(),
        tensors,
        ops: vec![
            op(conv, &[0, 1, 2], 3),
            op(ir::OpKind::Relu, &[3], 4),
            op(fc, &[4, 5, 6], 7),
            op(ir::OpKind::Softmax { beta: 1.0 }, &[7], 8),
        ],
        inputs: vec![0],
        outputs: vec![8],
    }
}

fn synthetic_artifact(int8: bool, seed: u64) -> Vec<u8> {
    let lowered = lower(&synthetic_graph(int8, seed)).expect("lower the synthetic graph");
    write_artifact(
        HeaderFields {
            arena_bytes: lowered.arena_bytes as u32,
            ..Default::default()
        },
        &[
            (SectionKind::Graph, &lowered.graph),
            (SectionKind::Weights, &lowered.weights),
        ],
    )
    .unwrap()
}

/// Valid artifacts that do not depend on the case: synthetic int8, and the real models when the
/// test data is there.
static FIXED_BASES: LazyLock<Vec<(String, Vec<u8>)>> = LazyLock::new(|| {
    let mut bases = vec![("synthetic int8".to_string(), synthetic_artifact(true, 7))];
    if let Some(dir) = common::testdata() {
        for name in ["kws_ref_model.tflite", "ad01_int8.tflite"] {
            let source = std::fs::read(common::mlperf(&dir, name)).expect("read the model");
            let converted = kiln::convert::convert_tflite(&source, name).expect("convert");
            bases.push((name.to_string(), converted.artifact));
        }
    }
    for (name, bytes) in &bases {
        assert!(
            load_and_run(bytes, 0).is_ok(),
            "starting point {name} does not load"
        );
    }
    bases
});

/// Which valid artifact a case starts from: the f32 synthetic model with weights from a seed,
/// or one of the fixed bases.
#[derive(Clone, Debug)]
enum Base {
    Float(u64),
    Fixed(Index),
}

fn base_strategy() -> impl Strategy<Value = Base> {
    prop_oneof![
        1 => any::<u64>().prop_map(Base::Float),
        3 => any::<Index>().prop_map(Base::Fixed),
    ]
}

impl Base {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Base::Float(seed) => synthetic_artifact(false, *seed),
            Base::Fixed(i) => FIXED_BASES[i.index(FIXED_BASES.len())].1.clone(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A decoded artifact whose graph is edited field by field and re-encoded.

#[derive(Clone, Debug)]
struct Art {
    fields: HeaderFields,
    sections: Vec<(SectionKind, Vec<u8>)>,
    header: GraphHeader,
    tensors: Vec<TensorDef>,
    raw_slots: Vec<Option<Vec<u8>>>,
    ops: Vec<OpDef>,
    tail: Vec<u8>,
}

impl Art {
    fn decode(bytes: &[u8]) -> Art {
        let count = u32_at(bytes, 12) as usize;
        let fields = HeaderFields {
            model_version: u32_at(bytes, 16),
            security_counter: u32_at(bytes, 20),
            arena_bytes: u32_at(bytes, 24),
        };
        let sections: Vec<(SectionKind, Vec<u8>)> = (0..count)
            .map(|i| {
                let at = HEADER_LEN + i * SECTION_ENTRY_LEN;
                let kind = SectionKind::from_u32(u32_at(bytes, at)).unwrap();
                let (off, len) = (
                    u32_at(bytes, at + 4) as usize,
                    u32_at(bytes, at + 8) as usize,
                );
                (kind, bytes[off..off + len].to_vec())
            })
            .collect();
        let graph = sections
            .iter()
            .find(|(k, _)| *k == SectionKind::Graph)
            .unwrap()
            .1
            .clone();
        let (header, rest): (GraphHeader, &[u8]) = postcard::take_from_bytes(&graph).unwrap();
        let slot = header.tensor_slot as usize;
        let n = header.tensor_count as usize;
        let tensors = (0..n)
            .map(|i| {
                postcard::take_from_bytes::<TensorDef>(&rest[i * slot..(i + 1) * slot])
                    .unwrap()
                    .0
            })
            .collect();
        let mut rest = &rest[n * slot..];
        let mut ops = Vec::new();
        for _ in 0..header.op_count {
            let (op, r): (OpDef, &[u8]) = postcard::take_from_bytes(rest).unwrap();
            ops.push(op);
            rest = r;
        }
        let tail = rest.to_vec();
        Art {
            fields,
            sections,
            raw_slots: vec![None; n],
            header,
            tensors,
            ops,
            tail,
        }
    }

    fn build(&self) -> Vec<u8> {
        let slots: Vec<Vec<u8>> = self
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| match &self.raw_slots[i] {
                Some(raw) => raw.clone(),
                None => postcard::to_allocvec(t).unwrap(),
            })
            .collect();
        let slot = slots
            .iter()
            .map(Vec::len)
            .max()
            .unwrap_or(4)
            .max(4)
            .next_multiple_of(4);
        let mut header = self.header.clone();
        header.tensor_slot = slot as u16;
        let mut graph = postcard::to_allocvec(&header).unwrap();
        for s in &slots {
            let start = graph.len();
            graph.extend_from_slice(s);
            graph.resize(start + slot, 0);
        }
        for op in &self.ops {
            graph.extend_from_slice(&postcard::to_allocvec(op).unwrap());
        }
        graph.extend_from_slice(&self.tail);
        let sections: Vec<(SectionKind, &[u8])> = self
            .sections
            .iter()
            .map(|(k, b)| {
                if *k == SectionKind::Graph {
                    (*k, graph.as_slice())
                } else {
                    (*k, b.as_slice())
                }
            })
            .collect();
        write_artifact(self.fields, &sections).unwrap()
    }

    fn weights_mut(&mut self) -> &mut Vec<u8> {
        &mut self
            .sections
            .iter_mut()
            .find(|(k, _)| *k == SectionKind::Weights)
            .unwrap()
            .1
    }

    /// Indices of the tensors satisfying `f`.
    fn tensors_where(&self, f: impl Fn(&TensorDef) -> bool) -> Vec<usize> {
        (0..self.tensors.len())
            .filter(|&i| f(&self.tensors[i]))
            .collect()
    }

    fn arena_end(&self) -> u64 {
        self.tensors
            .iter()
            .filter_map(|t| match t.location {
                Location::Arena { offset, .. } => Some(offset as u64 + tensor_bytes(t) as u64),
                Location::Weights(_) => None,
            })
            .max()
            .unwrap_or(0)
    }
}

fn pick<T: Copy>(i: &Index, v: &[T]) -> Option<T> {
    (!v.is_empty()).then(|| v[i.index(v.len())])
}

fn is_arena(t: &TensorDef) -> bool {
    matches!(t.location, Location::Arena { .. })
}

/// The requant table of an int8 conv-like op, if it has one.
fn requant_table(op: &OpDef) -> Option<BufRef> {
    match op.kind {
        OpKind::Conv2d(p) | OpKind::DepthwiseConv2d(p) => Some(p.requant),
        OpKind::FullyConnected(p) => Some(p.requant),
        _ => None,
    }
    .filter(|r| r.len > 0)
}

/// The in-line requant of an int8 op that `prepare` checks, if it has one.
fn inline_requant(op: &mut OpDef) -> Option<&mut Requant> {
    match &mut op.kind {
        OpKind::Relu(p) | OpKind::Relu6(p) => Some(&mut p.requant),
        OpKind::Add(p) | OpKind::Mul(p) => Some(&mut p.output),
        OpKind::Mean(p) => Some(&mut p.requant),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Raw damage.

#[derive(Clone, Debug)]
enum Raw {
    /// Keep only a prefix.
    Truncate(Index),
    /// Flip bits anywhere; re-seal or not.
    Flip {
        bits: Vec<(Index, u8)>,
        reseal: bool,
    },
    /// Overwrite a u32 in the header or section table (re-sealed).
    HeaderWord { at: Index, value: u32 },
    /// Overwrite a u32 in one section (re-sealed).
    SectionWord {
        section: Index,
        at: Index,
        value: u32,
    },
    /// Flip bits in the GRAPH section only (re-sealed): reaches the decoder every time.
    GraphFlip(Vec<(Index, u8)>),
    /// Append or insert garbage (re-sealed).
    Insert { at: Index, bytes: Vec<u8> },
}

fn interesting_u32() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0u32),
        Just(1),
        Just(16),
        Just(0x7FFF_FFFF),
        Just(0x8000_0000),
        Just(u32::MAX),
        Just(u32::MAX - 15),
        0u32..4096,
        any::<u32>(),
    ]
}

fn raw_strategy() -> impl Strategy<Value = Raw> {
    prop_oneof![
        1 => any::<Index>().prop_map(Raw::Truncate),
        3 => (
            prop::collection::vec((any::<Index>(), 0u8..8), 1..8),
            any::<bool>()
        )
            .prop_map(|(bits, reseal)| Raw::Flip { bits, reseal }),
        2 => (any::<Index>(), interesting_u32())
            .prop_map(|(at, value)| Raw::HeaderWord { at, value }),
        3 => (any::<Index>(), any::<Index>(), interesting_u32()).prop_map(
            |(section, at, value)| Raw::SectionWord { section, at, value }
        ),
        4 => prop::collection::vec((any::<Index>(), 0u8..8), 1..4).prop_map(Raw::GraphFlip),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..40))
            .prop_map(|(at, bytes)| Raw::Insert { at, bytes }),
    ]
}

/// The section-table entries (kind, offset, length) that lie inside `bytes`, as far as the
/// (possibly damaged) header says.
fn table(bytes: &[u8]) -> Vec<(u32, usize, usize)> {
    if bytes.len() < HEADER_LEN {
        return Vec::new();
    }
    let count = (u32_at(bytes, 12) as usize).min(16);
    (0..count)
        .map(|i| HEADER_LEN + i * SECTION_ENTRY_LEN)
        .filter(|&at| at + SECTION_ENTRY_LEN <= bytes.len())
        .map(|at| {
            (
                u32_at(bytes, at),
                u32_at(bytes, at + 4) as usize,
                u32_at(bytes, at + 8) as usize,
            )
        })
        .filter(|&(_, off, len)| off.checked_add(len).is_some_and(|end| end <= bytes.len()))
        .collect()
}

fn apply_raw(bytes: &mut Vec<u8>, m: &Raw) {
    if bytes.len() < HEADER_LEN {
        return;
    }
    match m {
        Raw::Truncate(i) => bytes.truncate(i.index(bytes.len())),
        Raw::Flip { bits, reseal: r } => {
            for (i, bit) in bits {
                let at = i.index(bytes.len());
                bytes[at] ^= 1 << bit;
            }
            if *r {
                reseal(bytes);
            }
        }
        Raw::HeaderWord { at, value } => {
            let count = (u32_at(bytes, 12) as usize).min(16);
            let end = (HEADER_LEN + count * SECTION_ENTRY_LEN).min(bytes.len());
            let at = at.index(end - 3);
            bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
            reseal(bytes);
        }
        Raw::SectionWord { section, at, value } => {
            let sections = table(bytes);
            if let Some((_, off, len)) = pick(section, &sections) {
                if len >= 4 {
                    let at = off + at.index(len - 3);
                    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
                }
            }
            reseal(bytes);
        }
        Raw::GraphFlip(bits) => {
            let graph = table(bytes)
                .into_iter()
                .find(|&(k, _, len)| k == SectionKind::Graph as u32 && len > 0);
            if let Some((_, off, len)) = graph {
                for (i, bit) in bits {
                    bytes[off + i.index(len)] ^= 1 << bit;
                }
            }
            reseal(bytes);
        }
        Raw::Insert { at, bytes: extra } => {
            let at = at.index(bytes.len() + 1);
            bytes.splice(at..at, extra.iter().copied());
            reseal(bytes);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Definitely invalid typed damage: each must make `load` fail.

#[derive(Clone, Debug)]
enum BadFloat {
    Zero,
    Negative(f32),
    NaN,
    Infinite,
}

impl BadFloat {
    fn value(&self) -> f32 {
        match self {
            BadFloat::Zero => 0.0,
            BadFloat::Negative(v) => -v.abs() - f32::MIN_POSITIVE,
            BadFloat::NaN => f32::NAN,
            BadFloat::Infinite => f32::INFINITY,
        }
    }
}

fn bad_float() -> impl Strategy<Value = BadFloat> {
    prop_oneof![
        Just(BadFloat::Zero),
        any::<f32>().prop_map(BadFloat::Negative),
        Just(BadFloat::NaN),
        Just(BadFloat::Infinite),
    ]
}

/// A requant entry the kernels cannot take: multiplier in (0, 2^30) or negative, or a shift
/// outside [-31, 30].
fn bad_requant() -> impl Strategy<Value = (Option<i32>, Option<i32>)> {
    prop_oneof![
        (1i32..(1 << 30)).prop_map(|m| (Some(m), None)),
        (i32::MIN..0).prop_map(|m| (Some(m), None)),
        (31i32..=i32::MAX).prop_map(|s| (None, Some(s))),
        (i32::MIN..-31).prop_map(|s| (None, Some(s))),
    ]
}

#[derive(Clone, Debug)]
enum Invalid {
    OpIndexOutOfRange {
        op: Index,
        slot: Index,
        beyond: u16,
    },
    GraphIoOutOfRange {
        output: bool,
        beyond: u16,
    },
    GraphInputConstant(Index),
    Cycle(Index, Index),
    LifetimeFirstLater {
        op: Index,
        input: Index,
        later: u16,
    },
    Overlap(Index),
    ArenaTooSmall(Index),
    WeightsOffsetOutOfRange {
        tensor: Index,
        offset: u32,
    },
    ArenaOffsetOutOfRange {
        tensor: Index,
        past: u32,
    },
    HugeDim {
        tensor: Index,
        dim: Index,
        value: u32,
    },
    ZeroDim {
        tensor: Index,
        dim: Index,
    },
    RankTooLarge {
        tensor: Index,
        rank: usize,
    },
    BadScale {
        tensor: Index,
        value: BadFloat,
    },
    BadZeroPoint {
        tensor: Index,
        zero_point: i32,
    },
    PerChannelCount {
        tensor: Index,
        delta: i8,
    },
    PerChannelValue {
        tensor: Index,
        channel: Index,
        value: BadFloat,
    },
    RequantTable {
        op: Index,
        entry: Index,
        bad: (Option<i32>, Option<i32>),
    },
    RequantInline {
        op: Index,
        bad: (Option<i32>, Option<i32>),
    },
    OpCount(i16),
    TrailingGarbage(Vec<u8>),
    MissingQuant(Index),
}

fn invalid_strategy() -> impl Strategy<Value = Invalid> {
    let idx = any::<Index>;
    prop_oneof![
        (idx(), idx(), 0u16..1000).prop_map(|(op, slot, beyond)| Invalid::OpIndexOutOfRange {
            op,
            slot,
            beyond
        }),
        (any::<bool>(), any::<u16>())
            .prop_map(|(output, beyond)| Invalid::GraphIoOutOfRange { output, beyond }),
        idx().prop_map(Invalid::GraphInputConstant),
        (idx(), idx()).prop_map(|(a, b)| Invalid::Cycle(a, b)),
        (idx(), idx(), 0u16..8).prop_map(|(op, input, later)| Invalid::LifetimeFirstLater {
            op,
            input,
            later
        }),
        idx().prop_map(Invalid::Overlap),
        idx().prop_map(Invalid::ArenaTooSmall),
        (idx(), any::<u32>())
            .prop_map(|(tensor, offset)| Invalid::WeightsOffsetOutOfRange { tensor, offset }),
        (idx(), any::<u32>())
            .prop_map(|(tensor, past)| Invalid::ArenaOffsetOutOfRange { tensor, past }),
        (idx(), idx(), (1u32 << 30) + 1..=u32::MAX)
            .prop_map(|(tensor, dim, value)| Invalid::HugeDim { tensor, dim, value }),
        (idx(), idx()).prop_map(|(tensor, dim)| Invalid::ZeroDim { tensor, dim }),
        (idx(), MAX_RANK + 1..MAX_RANK + 4)
            .prop_map(|(tensor, rank)| Invalid::RankTooLarge { tensor, rank }),
        (idx(), bad_float()).prop_map(|(tensor, value)| Invalid::BadScale { tensor, value }),
        (idx(), prop_oneof![128i32..=i32::MAX, i32::MIN..-128])
            .prop_map(|(tensor, zero_point)| Invalid::BadZeroPoint { tensor, zero_point }),
        (idx(), any::<i8>().prop_filter("nonzero", |d| *d != 0))
            .prop_map(|(tensor, delta)| Invalid::PerChannelCount { tensor, delta }),
        (idx(), idx(), bad_float()).prop_map(|(tensor, channel, value)| {
            Invalid::PerChannelValue {
                tensor,
                channel,
                value,
            }
        }),
        (idx(), idx(), bad_requant()).prop_map(|(op, entry, bad)| Invalid::RequantTable {
            op,
            entry,
            bad
        }),
        (idx(), bad_requant()).prop_map(|(op, bad)| Invalid::RequantInline { op, bad }),
        any::<i16>()
            .prop_filter("nonzero", |d| *d != 0)
            .prop_map(Invalid::OpCount),
        prop::collection::vec(any::<u8>(), 1..32).prop_map(Invalid::TrailingGarbage),
        idx().prop_map(Invalid::MissingQuant),
    ]
}

/// Applies `m` if the model has what it needs; otherwise a zero dimension on the first graph
/// input (always possible, always invalid). Returns a description of what was done.
fn apply_invalid(a: &mut Art, m: &Invalid) -> String {
    if let Some(done) = try_invalid(a, m) {
        return done;
    }
    if let Some(i) = a.tensors.iter().position(|t| !t.shape.is_empty()) {
        a.tensors[i].shape[0] = 0;
        format!("fallback: zero dimension on tensor {i}")
    } else {
        a.tail.push(0);
        "fallback: a byte after the ops".into()
    }
}

impl Invalid {
    /// Still definitely invalid after arbitrary tweaks? Swapping two ops or dropping ops can
    /// turn an already-broken plan back into a consistent one, so those two only count on an
    /// intact model.
    fn survives_tweaks(&self) -> bool {
        !matches!(self, Invalid::Cycle(..)) && !matches!(self, Invalid::OpCount(d) if *d < 0)
    }
}

fn try_invalid(a: &mut Art, m: &Invalid) -> Option<String> {
    let n = a.tensors.len();
    match m {
        Invalid::OpIndexOutOfRange { op, slot, beyond } => {
            let k = op.index(a.ops.len().max(1));
            let op = a.ops.get_mut(k)?;
            let bad = (n as u16).saturating_add(*beyond).min(NO_TENSOR - 1);
            let s = slot.index(op.inputs.len() + 1);
            if s == op.inputs.len() {
                op.output = bad;
            } else {
                op.inputs[s] = bad;
            }
            Some(format!("op {k} operand {s} = {bad}"))
        }
        Invalid::GraphIoOutOfRange { output, beyond } => {
            let bad = (n as u16).saturating_add(*beyond % (u16::MAX - n as u16 + 1));
            if *output {
                a.header.outputs[0] = bad;
            } else {
                a.header.inputs[0] = bad;
            }
            Some(format!("graph io = {bad}"))
        }
        Invalid::GraphInputConstant(i) => {
            let c = pick(i, &a.tensors_where(|t| !is_arena(t)))?;
            a.header.inputs[0] = c as u16;
            Some(format!("graph input = constant {c}"))
        }
        Invalid::Cycle(i, j) => {
            if a.ops.len() < 2 {
                return None;
            }
            let i = i.index(a.ops.len());
            let mut j = j.index(a.ops.len() - 1);
            if j >= i {
                j += 1;
            }
            a.ops.swap(i, j);
            Some(format!("swap ops {i} and {j}"))
        }
        Invalid::LifetimeFirstLater { op, input, later } => {
            let k = op.index(a.ops.len().max(1));
            let inputs: Vec<u16> = a
                .ops
                .get(k)?
                .inputs
                .iter()
                .copied()
                .filter(|&t| t != NO_TENSOR && is_arena(&a.tensors[t as usize]))
                .collect();
            let t = pick(input, &inputs)?;
            if let Location::Arena { first, .. } = &mut a.tensors[t as usize].location {
                *first = (k as u16 + 1).saturating_add(*later);
            }
            Some(format!("tensor {t} read by op {k} born later"))
        }
        Invalid::Overlap(i) => {
            // Pairs alive together (an op's arena input and its output), not a RESHAPE alias.
            let mut pairs = Vec::new();
            for op in &a.ops {
                if matches!(op.kind, OpKind::Reshape) {
                    continue;
                }
                for &inp in op.inputs.iter() {
                    if inp != NO_TENSOR && is_arena(&a.tensors[inp as usize]) && inp != op.output {
                        pairs.push((inp, op.output));
                    }
                }
            }
            let (x, y) = pick(i, &pairs)?;
            let Location::Arena { offset, .. } = a.tensors[x as usize].location else {
                return None;
            };
            if let Location::Arena { offset: o, .. } = &mut a.tensors[y as usize].location {
                *o = offset;
            }
            Some(format!("tensor {y} moved onto {x}"))
        }
        Invalid::ArenaTooSmall(i) => {
            let end = a.arena_end();
            if end == 0 {
                return None;
            }
            let new = i.index(end as usize) as u32;
            a.fields.arena_bytes = new;
            Some(format!("arena_bytes {new} < {end}"))
        }
        Invalid::WeightsOffsetOutOfRange { tensor, offset } => {
            let c = pick(tensor, &a.tensors_where(|t| !is_arena(t)))?;
            let wlen = a.weights_mut().len() as u32;
            let Location::Weights(r) = &mut a.tensors[c].location else {
                return None;
            };
            // Past the end of WEIGHTS by at least one byte.
            let min = wlen.saturating_sub(r.len).saturating_add(1);
            r.offset = min.saturating_add(offset % (u32::MAX - min + 1));
            Some(format!("constant {c} at {}", r.offset))
        }
        Invalid::ArenaOffsetOutOfRange { tensor, past } => {
            let t = pick(tensor, &a.tensors_where(is_arena))?;
            let size = tensor_bytes(&a.tensors[t]) as u64;
            let arena = a.fields.arena_bytes as u64;
            let min = (arena + 1).saturating_sub(size);
            let off = min + *past as u64 % (u32::MAX as u64 - min + 1);
            if let Location::Arena { offset, .. } = &mut a.tensors[t].location {
                *offset = off as u32;
            }
            Some(format!("activation {t} at {off}"))
        }
        Invalid::HugeDim { tensor, dim, value } => {
            let t = pick(tensor, &a.tensors_where(|t| !t.shape.is_empty()))?;
            let d = dim.index(a.tensors[t].shape.len());
            a.tensors[t].shape[d] = *value;
            Some(format!("tensor {t} dim {d} = {value}"))
        }
        Invalid::ZeroDim { tensor, dim } => {
            let t = pick(tensor, &a.tensors_where(|t| !t.shape.is_empty()))?;
            let d = dim.index(a.tensors[t].shape.len());
            a.tensors[t].shape[d] = 0;
            Some(format!("tensor {t} dim {d} = 0"))
        }
        Invalid::RankTooLarge { tensor, rank } => {
            #[derive(serde::Serialize)]
            struct WideTensorDef<'a> {
                dtype: DType,
                shape: &'a [u32],
                location: Location,
                quant: Option<Quant>,
            }
            let i = tensor.index(n.max(1));
            let t = a.tensors.get(i)?.clone();
            let mut shape = t.shape.to_vec();
            while shape.len() < *rank {
                shape.insert(0, 1);
            }
            a.raw_slots[i] = Some(
                postcard::to_allocvec(&WideTensorDef {
                    dtype: t.dtype,
                    shape: &shape,
                    location: t.location,
                    quant: t.quant,
                })
                .unwrap(),
            );
            Some(format!("tensor {i} rank {rank}"))
        }
        Invalid::BadScale { tensor, value } => {
            let t = pick(tensor, &a.tensors_where(|t| t.quant.is_some()))?;
            a.tensors[t].quant.as_mut()?.scale = value.value();
            Some(format!("tensor {t} scale {value:?}"))
        }
        Invalid::BadZeroPoint { tensor, zero_point } => {
            let t = pick(
                tensor,
                &a.tensors_where(|t| t.dtype == DType::I8 && t.quant.is_some()),
            )?;
            a.tensors[t].quant.as_mut()?.zero_point = *zero_point;
            Some(format!("tensor {t} zero point {zero_point}"))
        }
        Invalid::PerChannelCount { tensor, delta } => {
            let t = pick(
                tensor,
                &a.tensors_where(|t| t.quant.is_some_and(|q| q.per_channel.is_some())),
            )?;
            let pc = a.tensors[t].quant.as_mut()?.per_channel.as_mut()?;
            pc.scales.len = (pc.scales.len as i64 + 4 * *delta as i64).max(0) as u32;
            Some(format!("tensor {t} per-channel bytes {}", pc.scales.len))
        }
        Invalid::PerChannelValue {
            tensor,
            channel,
            value,
        } => {
            let t = pick(
                tensor,
                &a.tensors_where(|t| t.quant.is_some_and(|q| q.per_channel.is_some())),
            )?;
            let scales = a.tensors[t].quant?.per_channel?.scales;
            let c = channel.index((scales.len as usize / 4).max(1));
            let at = scales.offset as usize + 4 * c;
            let w = a.weights_mut();
            if at + 4 > w.len() {
                return None;
            }
            w[at..at + 4].copy_from_slice(&value.value().to_le_bytes());
            Some(format!("tensor {t} channel {c} scale {value:?}"))
        }
        Invalid::RequantTable { op, entry, bad } => {
            let tables: Vec<BufRef> = a
                .ops
                .iter()
                .filter(|o| a.tensors[o.output as usize].dtype == DType::I8)
                .filter_map(requant_table)
                .collect();
            let r = pick(op, &tables)?;
            let e = entry.index((r.len as usize / 8).max(1));
            let at = r.offset as usize + 8 * e;
            let w = a.weights_mut();
            if at + 8 > w.len() {
                return None;
            }
            if let Some(m) = bad.0 {
                w[at..at + 4].copy_from_slice(&m.to_le_bytes());
            }
            if let Some(s) = bad.1 {
                w[at + 4..at + 8].copy_from_slice(&s.to_le_bytes());
            }
            Some(format!("requant table entry {e} = {bad:?}"))
        }
        Invalid::RequantInline { op, bad } => {
            let candidates: Vec<usize> = (0..a.ops.len())
                .filter(|&k| {
                    a.tensors[a.ops[k].output as usize].dtype == DType::I8
                        && a.ops[k].inputs.first().is_some_and(|&i| {
                            a.tensors
                                .get(i as usize)
                                .is_some_and(|t| t.dtype == DType::I8)
                        })
                        && inline_requant(&mut a.ops[k].clone()).is_some()
                })
                .collect();
            let k = pick(op, &candidates)?;
            let r = inline_requant(&mut a.ops[k])?;
            if let Some(m) = bad.0 {
                r.multiplier = m;
            }
            if let Some(s) = bad.1 {
                r.shift = s;
            }
            Some(format!("op {k} requant = {bad:?}"))
        }
        Invalid::OpCount(delta) => {
            let new = (a.header.op_count as i32 + *delta as i32).clamp(0, u16::MAX as i32);
            if new == a.header.op_count as i32 {
                return None;
            }
            // Fewer: drop the ops too (their outputs' lifetimes no longer fit); more: only the
            // count changes.
            a.header.op_count = new as u16;
            if (new as usize) < a.ops.len() {
                a.ops.truncate(new as usize);
            }
            Some(format!("op_count {new}"))
        }
        Invalid::TrailingGarbage(bytes) => {
            a.tail.extend_from_slice(bytes);
            Some(format!("{} bytes after the ops", bytes.len()))
        }
        Invalid::MissingQuant(i) => {
            let t = pick(i, &a.tensors_where(|t| t.dtype == DType::I8))?;
            a.tensors[t].quant = None;
            Some(format!("int8 tensor {t} without quantization"))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Arbitrary typed changes: may or may not leave a valid model.

#[derive(Clone, Debug)]
enum Tweak {
    ArenaOffset {
        tensor: Index,
        offset: Index,
    },
    Lifetime {
        tensor: Index,
        first: u16,
        last: u16,
    },
    Dim {
        tensor: Index,
        dim: Index,
        value: u32,
    },
    Dtype {
        tensor: Index,
        dtype: u8,
    },
    Operand {
        op: Index,
        slot: Index,
        tensor: Index,
    },
    ConvParams {
        op: Index,
        field: u8,
        value: u16,
    },
    PoolParams {
        op: Index,
        field: u8,
        value: u16,
    },
    Scratch {
        op: Index,
        offset: Index,
        len: u16,
    },
    ArenaBytes(Index),
    Quant {
        tensor: Index,
        scale: f32,
        zero_point: i8,
    },
    RequantEntry {
        op: Index,
        entry: Index,
        multiplier: i32,
        shift: i8,
    },
    OpKindSwap {
        op: Index,
        kind: u8,
    },
    GraphIo {
        output: bool,
        tensor: Index,
    },
}

fn tweak_strategy() -> impl Strategy<Value = Tweak> {
    let idx = any::<Index>;
    // Weighted towards changes that often leave a valid model, so the interpreter runs.
    prop_oneof![
        1 => (idx(), idx()).prop_map(|(tensor, offset)| Tweak::ArenaOffset { tensor, offset }),
        1 => (idx(), 0u16..8, 0u16..8).prop_map(|(tensor, first, last)| Tweak::Lifetime {
            tensor,
            first,
            last
        }),
        1 => (idx(), idx(), 1u32..20)
            .prop_map(|(tensor, dim, value)| Tweak::Dim { tensor, dim, value }),
        1 => (idx(), 0u8..4).prop_map(|(tensor, dtype)| Tweak::Dtype { tensor, dtype }),
        1 => (idx(), idx(), idx())
            .prop_map(|(op, slot, tensor)| Tweak::Operand { op, slot, tensor }),
        3 => (idx(), 0u8..7, 0u16..12).prop_map(|(op, field, value)| Tweak::ConvParams {
            op,
            field,
            value
        }),
        2 => (idx(), 0u8..6, 0u16..12).prop_map(|(op, field, value)| Tweak::PoolParams {
            op,
            field,
            value
        }),
        2 => (idx(), idx(), 0u16..256)
            .prop_map(|(op, offset, len)| Tweak::Scratch { op, offset, len }),
        2 => idx().prop_map(Tweak::ArenaBytes),
        3 => (idx(), 1e-4f32..10.0, any::<i8>()).prop_map(|(tensor, scale, zero_point)| {
            Tweak::Quant {
                tensor,
                scale,
                zero_point,
            }
        }),
        3 => (
            idx(),
            idx(),
            prop_oneof![Just(0i32), (1i32 << 30)..=i32::MAX],
            -31i8..=30
        )
            .prop_map(|(op, entry, multiplier, shift)| Tweak::RequantEntry {
                op,
                entry,
                multiplier,
                shift
            }),
        2 => (idx(), 0u8..8).prop_map(|(op, kind)| Tweak::OpKindSwap { op, kind }),
        1 => (any::<bool>(), idx()).prop_map(|(output, tensor)| Tweak::GraphIo { output, tensor }),
    ]
}

fn apply_tweak(a: &mut Art, m: &Tweak) {
    let n = a.tensors.len();
    let n_ops = a.ops.len();
    match m {
        Tweak::ArenaOffset { tensor, offset } => {
            let arena = a.fields.arena_bytes as usize + 64;
            if let Some(t) = pick(tensor, &a.tensors_where(is_arena)) {
                if let Location::Arena { offset: o, .. } = &mut a.tensors[t].location {
                    // Keep the alignment most of the time so other rules get a chance.
                    *o = (offset.index(arena) as u32) & !3;
                }
            }
        }
        Tweak::Lifetime {
            tensor,
            first,
            last,
        } => {
            if let Some(t) = pick(tensor, &a.tensors_where(is_arena)) {
                if let Location::Arena {
                    first: f, last: l, ..
                } = &mut a.tensors[t].location
                {
                    *f = *first;
                    *l = *last;
                }
            }
        }
        Tweak::Dim { tensor, dim, value } => {
            if let Some(t) = pick(tensor, &a.tensors_where(|t| !t.shape.is_empty())) {
                let d = dim.index(a.tensors[t].shape.len());
                a.tensors[t].shape[d] = *value;
            }
        }
        Tweak::Dtype { tensor, dtype } => {
            let i = tensor.index(n);
            a.tensors[i].dtype = [DType::I8, DType::I32, DType::F32, DType::F16][*dtype as usize];
        }
        Tweak::Operand { op, slot, tensor } => {
            if n_ops > 0 {
                let o = &mut a.ops[op.index(n_ops)];
                let s = slot.index(o.inputs.len() + 1);
                let t = tensor.index(n) as u16;
                if s == o.inputs.len() {
                    o.output = t;
                } else {
                    o.inputs[s] = t;
                }
            }
        }
        Tweak::ConvParams { op, field, value } => {
            let convs: Vec<usize> = (0..n_ops)
                .filter(|&k| {
                    matches!(
                        a.ops[k].kind,
                        OpKind::Conv2d(_) | OpKind::DepthwiseConv2d(_)
                    )
                })
                .collect();
            if let Some(k) = pick(op, &convs) {
                if let OpKind::Conv2d(p) | OpKind::DepthwiseConv2d(p) = &mut a.ops[k].kind {
                    *[
                        &mut p.stride_h,
                        &mut p.stride_w,
                        &mut p.dilation_h,
                        &mut p.dilation_w,
                        &mut p.pad_top,
                        &mut p.pad_left,
                        &mut p.depth_multiplier,
                    ][*field as usize] = *value;
                }
            }
        }
        Tweak::PoolParams { op, field, value } => {
            let pools: Vec<usize> = (0..n_ops)
                .filter(|&k| {
                    matches!(
                        a.ops[k].kind,
                        OpKind::AveragePool2d(_) | OpKind::MaxPool2d(_)
                    )
                })
                .collect();
            if let Some(k) = pick(op, &pools) {
                if let OpKind::AveragePool2d(p) | OpKind::MaxPool2d(p) = &mut a.ops[k].kind {
                    *[
                        &mut p.filter_h,
                        &mut p.filter_w,
                        &mut p.stride_h,
                        &mut p.stride_w,
                        &mut p.pad_top,
                        &mut p.pad_left,
                    ][*field as usize] = *value;
                }
            }
        }
        Tweak::Scratch { op, offset, len } => {
            if n_ops > 0 {
                let arena = a.fields.arena_bytes as usize + 1;
                a.ops[op.index(n_ops)].scratch = kiln_runtime::graph::ScratchRef {
                    offset: offset.index(arena) as u32,
                    len: *len as u32,
                };
            }
        }
        Tweak::ArenaBytes(i) => {
            let end = a.arena_end() as usize;
            a.fields.arena_bytes = i.index(end + 256) as u32;
        }
        Tweak::Quant {
            tensor,
            scale,
            zero_point,
        } => {
            if let Some(t) = pick(tensor, &a.tensors_where(|t| t.quant.is_some())) {
                let q = a.tensors[t].quant.as_mut().unwrap();
                q.scale = *scale;
                if q.per_channel.is_none() {
                    q.zero_point = *zero_point as i32;
                }
            }
        }
        Tweak::RequantEntry {
            op,
            entry,
            multiplier,
            shift,
        } => {
            let tables: Vec<BufRef> = a.ops.iter().filter_map(requant_table).collect();
            if let Some(r) = pick(op, &tables) {
                let e = entry.index((r.len as usize / 8).max(1));
                let at = r.offset as usize + 8 * e;
                let w = a.weights_mut();
                if at + 8 <= w.len() {
                    w[at..at + 4].copy_from_slice(&multiplier.to_le_bytes());
                    w[at + 4..at + 8].copy_from_slice(&(*shift as i32).to_le_bytes());
                }
            }
        }
        Tweak::OpKindSwap { op, kind } => {
            if n_ops > 0 {
                let o = &mut a.ops[op.index(n_ops)];
                o.kind = match kind {
                    0 => OpKind::Reshape,
                    1 => OpKind::Dequantize,
                    2 => OpKind::Relu(Default::default()),
                    3 => OpKind::Relu6(Default::default()),
                    4 => OpKind::Logistic(Default::default()),
                    5 => OpKind::Tanh(Default::default()),
                    6 => OpKind::Quantize(Default::default()),
                    _ => OpKind::Softmax(kiln_runtime::graph::SoftmaxParams {
                        beta: 1.0,
                        ..Default::default()
                    }),
                };
            }
        }
        Tweak::GraphIo { output, tensor } => {
            let t = tensor.index(n) as u16;
            if *output {
                a.header.outputs[0] = t;
            } else {
                a.header.inputs[0] = t;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Properties.

proptest! {
    #![proptest_config(config())]

    /// Raw damage: never a panic; an accepted artifact runs without a panic.
    #[test]
    fn raw_damage_never_panics(
        base in base_strategy(),
        damage in prop::collection::vec(raw_strategy(), 1..3),
        seed in any::<u64>(),
    ) {
        let mut bytes = base.bytes();
        for d in &damage {
            apply_raw(&mut bytes, d);
        }
        let _ = load_and_run(&bytes, seed);
    }

    /// Definitely invalid typed damage: always refused.
    #[test]
    fn invalid_graphs_are_refused(base in base_strategy(), damage in invalid_strategy()) {
        let mut art = Art::decode(&base.bytes());
        let what = apply_invalid(&mut art, &damage);
        let bytes = art.build();
        let result = load_and_run(&bytes, 0);
        prop_assert!(result.is_err(), "accepted after: {}", what);
    }

    /// Arbitrary typed changes (several at once): never a panic; accepted models run.
    #[test]
    fn tweaked_graphs_never_panic(
        base in base_strategy(),
        tweaks in prop::collection::vec(tweak_strategy(), 1..3),
        seed in any::<u64>(),
    ) {
        let mut art = Art::decode(&base.bytes());
        for t in &tweaks {
            apply_tweak(&mut art, t);
        }
        let _ = load_and_run(&art.build(), seed);
    }

    /// Typed damage on top of a few arbitrary changes is still refused.
    #[test]
    fn invalid_after_tweaks_is_refused(
        base in base_strategy(),
        tweaks in prop::collection::vec(tweak_strategy(), 0..3),
        damage in invalid_strategy().prop_filter("stays invalid after tweaks", Invalid::survives_tweaks),
    ) {
        let mut art = Art::decode(&base.bytes());
        for t in &tweaks {
            apply_tweak(&mut art, t);
        }
        let what = apply_invalid(&mut art, &damage);
        prop_assert!(load_and_run(&art.build(), 0).is_err(), "accepted after {:?} and {}", tweaks, what);
    }
}

#[test]
fn starting_points_load_and_run() {
    assert!(!FIXED_BASES.is_empty());
    for seed in 0..4 {
        assert!(load_and_run(&synthetic_artifact(false, seed), seed).is_ok());
    }
    for (name, bytes) in FIXED_BASES.iter() {
        let art = Art::decode(bytes);
        assert_eq!(
            &art.build(),
            bytes,
            "{name}: decode + rebuild is the identity"
        );
    }
}

#[test]
fn every_prefix_is_refused() {
    // Every strict prefix of a valid artifact is an error (and never a panic).
    let bytes = synthetic_artifact(true, 7);
    for len in 0..bytes.len() {
        assert!(
            load_and_run(&bytes[..len], 0).is_err(),
            "prefix {len} accepted"
        );
    }
}

/// With `KILN_FUZZ_SEEDS=DIR`, writes the starting points as `.kiln` files into DIR, to seed the
/// cargo-fuzz corpus (see `fuzz/README.md`). Does nothing otherwise.
#[test]
fn dump_fuzz_seeds() {
    let Some(dir) = std::env::var_os("KILN_FUZZ_SEEDS") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    std::fs::create_dir_all(&dir).expect("create the seed folder");
    let mut seeds = vec![("synthetic-f32".to_string(), synthetic_artifact(false, 1))];
    seeds.extend(FIXED_BASES.iter().cloned());
    for (name, bytes) in seeds {
        let file = dir.join(format!("{}.kiln", name.replace([' ', '.'], "-")));
        std::fs::write(&file, bytes).expect("write a seed");
    }
}

/// int8 SOFTMAX over a row of 512 or more near-equal values: the Q12 sum of exponentials
/// reaches 2^28, `get_reciprocal` reports 9+ bits over unit and the final rounding shift is 32 or
/// more. Regression test: that once panicked in debug builds and gave 127 for every class in
/// release; the kernel now rounds such quotients to 0 (the exact result).
#[test]
fn softmax_int8_wide_flat_row() {
    let q = |scale, zp| per_tensor(scale, zp);
    for depth in [512usize, 1000, 4096] {
        let g = ir::Graph {
            name: "softmax".into(),
            tensors: vec![
                t("x", DType::I8, &[1, depth], None, q(0.1, 0)),
                t("y", DType::I8, &[1, depth], None, q(1.0 / 256.0, -128)),
            ],
            ops: vec![ir::Op {
                kind: ir::OpKind::Softmax { beta: 1.0 },
                inputs: vec![Some(0)],
                outputs: vec![1],
            }],
            inputs: vec![0],
            outputs: vec![1],
        };
        let lowered = lower(&g).unwrap();
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
        .unwrap();
        let aligned = AlignedBytes::new(&bytes);
        let model = Model::load(aligned.as_slice()).unwrap();
        let mut arena = AlignedBytes::zeroed(model.arena_bytes());
        let mut interp = Interpreter::new(model, arena.as_mut_slice()).unwrap();
        interp.set_input_i8(0, &vec![0; depth]).unwrap();
        interp.invoke().unwrap();
        // Every class has probability 1/depth < 1/256: the output is the zero point.
        assert!(
            interp.output_i8(0).unwrap().iter().all(|&v| v == -128),
            "depth {depth}"
        );
    }
}
