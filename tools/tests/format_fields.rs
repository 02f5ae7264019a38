//! One test per artifact field: a wrong value in the fixed header, the section table, the trailer,
//! the graph header, a tensor definition, an op definition or a prepared parameter is refused by
//! `Model::load` with the `ModelError` variant that names it — never accepted, never a panic.
//!
//! Everything here runs on two small synthetic models (int8 and f32: CONV_2D → RELU →
//! FULLY_CONNECTED → SOFTMAX) built in code, so it needs no test data.
//!
//! Container mutations edit bytes and, where the digest would otherwise be the first thing to
//! fail, re-seal the trailer (`reseal`). Graph mutations decode the GRAPH section into typed
//! `GraphHeader` / `TensorDef` / `OpDef` values, change a field, re-encode with postcard and
//! rebuild the artifact with `write_artifact`, so they reach the deep checks.

mod common;

use common::{f32_data, i32_data, noise, per_tensor, t, u32_at};
use kiln::artifact::{write_artifact, AlignedBytes, HeaderFields};
use kiln::ir;
use kiln::lower::lower;
use kiln_runtime::format::{SectionKind, HEADER_LEN, SECTION_ENTRY_LEN, TRAILER_FIXED_LEN};
use kiln_runtime::graph::{
    DType, GraphHeader, Location, OpDef, OpKind, Quant, ScratchRef, TensorDef, MAX_RANK, NO_TENSOR,
};
use kiln_runtime::{Interpreter, Model, ModelError};
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------------------------------------
// Byte helpers.

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

/// Recomputes the trailer's SHA-256 after the body was edited (body length at header offset 28;
/// the digest sits at trailer offset 16..48).
fn reseal(bytes: &mut [u8]) {
    let body_len = u32_at(bytes, 28) as usize;
    let digest = Sha256::digest(&bytes[..body_len]);
    bytes[body_len + 16..body_len + 48].copy_from_slice(&digest);
}

/// Offset of section-table entry `i`.
fn entry(i: usize) -> usize {
    HEADER_LEN + i * SECTION_ENTRY_LEN
}

fn body_len(bytes: &[u8]) -> usize {
    u32_at(bytes, 28) as usize
}

/// `Model::load` on an aligned copy.
fn load(bytes: &[u8]) -> Result<(), ModelError> {
    let aligned = AlignedBytes::new(bytes);
    Model::load(aligned.as_slice()).map(|_| ())
}

#[track_caller]
fn refused(bytes: &[u8]) -> ModelError {
    match load(bytes) {
        Ok(()) => panic!("a malformed artifact was accepted"),
        Err(e) => e,
    }
}

/// Edits a copy of `base`, re-seals it, and returns the error.
#[track_caller]
fn refused_resealed(base: &[u8], edit: impl FnOnce(&mut Vec<u8>)) -> ModelError {
    let mut b = base.to_vec();
    edit(&mut b);
    reseal(&mut b);
    refused(&b)
}

/// Edits a copy of `base` without re-sealing it, and returns the error.
#[track_caller]
fn refused_raw(base: &[u8], edit: impl FnOnce(&mut Vec<u8>)) -> ModelError {
    let mut b = base.to_vec();
    edit(&mut b);
    refused(&b)
}

#[track_caller]
fn assert_section(err: ModelError, keyword: &str) {
    assert!(
        matches!(err, ModelError::BadSection { reason } if reason.contains(keyword)),
        "expected BadSection about `{keyword}`, got {err:?}"
    );
}

#[track_caller]
fn assert_field(err: ModelError, field: &str) {
    assert!(
        matches!(err, ModelError::BadField { field: f } if f == field),
        "expected BadField `{field}`, got {err:?}"
    );
}

#[track_caller]
fn assert_tensor(err: ModelError, keyword: &str) {
    assert!(
        matches!(err, ModelError::BadTensor { reason, .. } if reason.contains(keyword)),
        "expected BadTensor about `{keyword}`, got {err:?}"
    );
}

#[track_caller]
fn assert_op(err: ModelError, keyword: &str) {
    assert!(
        matches!(err, ModelError::BadOp { reason, .. } if reason.contains(keyword)),
        "expected BadOp about `{keyword}`, got {err:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Synthetic models.

// Tensor indices in the lowered artifact (graph inputs first, then in op order).
const T_INPUT: u16 = 0;
const T_FILTER: u16 = 1;
const T_CONV_OUT: u16 = 3;
const T_RELU_OUT: u16 = 4;
const T_FC_OUT: u16 = 7;
const T_OUTPUT: u16 = 8;

/// CONV_2D (3x3, 2 → 4 channels, VALID) → RELU → FULLY_CONNECTED (144 → 5) → SOFTMAX.
/// int8 with a per-channel filter, or f32.
fn synthetic_graph(int8: bool) -> ir::Graph {
    let conv = ir::OpKind::Conv2d {
        stride: [1, 1],
        dilation: [1, 1],
        padding: ir::Padding::Valid,
        activation: kiln_runtime::graph::Activation::None,
    };
    let fc = ir::OpKind::FullyConnected {
        activation: kiln_runtime::graph::Activation::None,
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
                Some(noise(72, 1)),
                Some(ir::QuantInfo {
                    scales: vec![0.01, 0.02, 0.015, 0.03],
                    zero_points: vec![0; 4],
                    axis: 0,
                }),
            ),
            t("bias", DType::I32, &[4], Some(i32_data(4, 2)), None),
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
                Some(noise(720, 3)),
                per_tensor(0.02, 0),
            ),
            t("fc_b", DType::I32, &[5], Some(i32_data(5, 4)), None),
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
                Some(f32_data(72, 1)),
                None,
            ),
            t("bias", DType::F32, &[4], Some(f32_data(4, 2)), None),
            t("conv", DType::F32, &[1, 6, 6, 4], None, None),
            t("relu", DType::F32, &[1, 6, 6, 4], None, None),
            t("fc_w", DType::F32, &[5, 144], Some(f32_data(720, 3)), None),
            t("fc_b", DType::F32, &[5], Some(f32_data(5, 4)), None),
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

fn synthetic_artifact(int8: bool) -> Vec<u8> {
    let lowered = lower(&synthetic_graph(int8)).expect("lower the synthetic graph");
    kiln::convert::assemble_lowered(&lowered, "synthetic", &serde_json::json!({})).unwrap()
}

fn base() -> Vec<u8> {
    synthetic_artifact(true)
}

// ---------------------------------------------------------------------------------------------
// A decoded artifact whose graph can be edited field by field and re-encoded.

#[derive(Clone, Debug)]
struct Art {
    fields: HeaderFields,
    /// All sections in table order; the GRAPH entry is re-encoded on build.
    sections: Vec<(SectionKind, Vec<u8>)>,
    header: GraphHeader,
    tensors: Vec<TensorDef>,
    /// Raw bytes to store in a tensor slot instead of the typed definition.
    raw_slots: Vec<Option<Vec<u8>>>,
    ops: Vec<OpDef>,
    /// Bytes after the last op.
    tail: Vec<u8>,
    /// Keep this `tensor_slot` instead of the smallest one that fits.
    fixed_slot: Option<u16>,
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
                let at = entry(i);
                let kind = SectionKind::from_u32(u32_at(bytes, at)).unwrap();
                let (off, len) = (
                    u32_at(bytes, at + 4) as usize,
                    u32_at(bytes, at + 8) as usize,
                );
                (kind, bytes[off..off + len].to_vec())
            })
            .collect();
        let graph = &sections
            .iter()
            .find(|(k, _)| *k == SectionKind::Graph)
            .unwrap()
            .1;
        let (header, rest): (GraphHeader, &[u8]) = postcard::take_from_bytes(graph).unwrap();
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
            fixed_slot: None,
        }
    }

    fn graph_bytes(&self) -> Vec<u8> {
        let slots: Vec<Vec<u8>> = self
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| match self.raw_slots.get(i) {
                Some(Some(raw)) => raw.clone(),
                _ => postcard::to_allocvec(t).unwrap(),
            })
            .collect();
        let fit = slots
            .iter()
            .map(Vec::len)
            .max()
            .unwrap_or(4)
            .max(4)
            .next_multiple_of(4);
        let mut header = self.header.clone();
        header.tensor_slot = self.fixed_slot.unwrap_or(fit as u16);
        let slot = header.tensor_slot as usize;
        let mut out = postcard::to_allocvec(&header).unwrap();
        for s in &slots {
            let start = out.len();
            out.extend_from_slice(&s[..s.len().min(slot)]);
            out.resize(start + slot, 0);
        }
        for op in &self.ops {
            out.extend_from_slice(&postcard::to_allocvec(op).unwrap());
        }
        out.extend_from_slice(&self.tail);
        out
    }

    fn build(&self) -> Vec<u8> {
        let graph = self.graph_bytes();
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

    fn tensor(&mut self, i: u16) -> &mut TensorDef {
        &mut self.tensors[i as usize]
    }

    fn quant(&mut self, i: u16) -> &mut Quant {
        self.tensors[i as usize].quant.as_mut().unwrap()
    }

    fn arena_of(&mut self, i: u16) -> (&mut u32, &mut u16, &mut u16) {
        match &mut self.tensors[i as usize].location {
            Location::Arena {
                offset,
                first,
                last,
            } => (offset, first, last),
            Location::Weights(_) => panic!("tensor {i} is a constant"),
        }
    }

    /// The conv op's per-channel requant table offset in WEIGHTS.
    fn conv_requant_offset(&self) -> usize {
        match self.ops[0].kind {
            OpKind::Conv2d(p) => p.requant.offset as usize,
            k => panic!("op 0 is {}", k.name()),
        }
    }
}

/// Decodes the int8 base, applies `edit`, rebuilds (with a correct digest) and returns the error.
#[track_caller]
fn graph_refused(edit: impl FnOnce(&mut Art)) -> ModelError {
    let mut art = Art::decode(&base());
    edit(&mut art);
    refused(&art.build())
}

// ---------------------------------------------------------------------------------------------
// Positive controls.

#[test]
fn synthetic_models_load_and_run() {
    for int8 in [true, false] {
        let bytes = AlignedBytes::new(&synthetic_artifact(int8));
        let model = Model::load(bytes.as_slice()).expect("the synthetic model loads");
        assert_eq!(model.tensor_count(), 9);
        assert_eq!(model.op_count(), 4);
        let mut arena = AlignedBytes::zeroed(model.arena_bytes());
        let mut interp = Interpreter::new(model, arena.as_mut_slice()).unwrap();
        interp.set_input_f32(0, &[0.25; 128]).unwrap();
        interp.invoke().unwrap();
        let mut out = [0f32; 5];
        interp.output_f32(0, &mut out).unwrap();
        let sum: f32 = out.iter().sum();
        assert!((sum - 1.0).abs() < 0.05, "softmax sums to {sum}");
    }
}

#[test]
fn decode_and_rebuild_is_the_identity() {
    for int8 in [true, false] {
        let bytes = synthetic_artifact(int8);
        let art = Art::decode(&bytes);
        assert_eq!(art.build(), bytes);
        assert!(matches!(
            art.tensors[T_INPUT as usize].location,
            Location::Arena { first: 0, .. }
        ));
        assert!(matches!(
            art.tensors[T_FILTER as usize].location,
            Location::Weights(_)
        ));
        assert_eq!(art.ops[0].output, T_CONV_OUT);
        assert_eq!(art.ops[1].output, T_RELU_OUT);
        assert_eq!(art.ops[2].output, T_FC_OUT);
        assert_eq!(art.ops[3].output, T_OUTPUT);
    }
    let mut b = base();
    reseal(&mut b);
    assert_eq!(b, base(), "re-sealing an intact artifact changes nothing");
}

// ---------------------------------------------------------------------------------------------
// Fixed header.

#[test]
fn header_magic() {
    for i in 0..4 {
        let err = refused_resealed(&base(), |b| b[i] ^= 0x20);
        assert!(matches!(err, ModelError::BadMagic), "{err:?}");
    }
}

#[test]
fn header_format_version() {
    for v in [0u16, 2, u16::MAX] {
        let err = refused_resealed(&base(), |b| put_u16(b, 4, v));
        assert!(
            matches!(err, ModelError::UnsupportedFormatVersion { found } if found == v),
            "{err:?}"
        );
    }
}

#[test]
fn header_len() {
    for v in [0u16, 48, 63, 65, 128] {
        assert_field(
            refused_resealed(&base(), |b| put_u16(b, 6, v)),
            "header_len",
        );
    }
}

#[test]
fn header_flags() {
    for v in [1u32, 0x8000_0000] {
        assert_field(refused_resealed(&base(), |b| put_u32(b, 8, v)), "flags");
    }
}

#[test]
fn header_section_count_zero_and_seventeen() {
    for v in [0u32, 17, u32::MAX] {
        assert_field(
            refused_resealed(&base(), |b| put_u32(b, 12, v)),
            "section_count",
        );
    }
}

#[test]
fn header_section_count_larger_than_the_table() {
    // One more entry than written: the table now covers the first section's bytes.
    let base = base();
    let count = u32_at(&base, 12);
    assert!(matches!(
        refused_resealed(&base, |b| put_u32(b, 12, count + 1)),
        ModelError::BadSection { .. }
    ));
    assert!(matches!(
        refused_resealed(&base, |b| put_u32(b, 12, 16)),
        ModelError::BadSection { .. }
    ));
    // A body too short for the table the header declares.
    let mut tiny = vec![0u8; 80];
    tiny[0..4].copy_from_slice(b"KILN");
    put_u16(&mut tiny, 4, 1);
    put_u16(&mut tiny, 6, 64);
    put_u32(&mut tiny, 12, 16);
    put_u32(&mut tiny, 28, 80);
    tiny.extend_from_slice(b"KTRL");
    tiny.extend_from_slice(&(TRAILER_FIXED_LEN as u32).to_le_bytes());
    tiny.extend_from_slice(&[0; 40]);
    reseal(&mut tiny);
    assert_section(refused(&tiny), "section table runs past the body");
}

#[test]
fn header_reserved_bytes() {
    for at in [48usize, 55, 56, 63] {
        assert_field(refused_resealed(&base(), |b| b[at] = 1), "reserved");
    }
}

/// Writes `name` into the header's target field (bytes 32..48), zero padded.
fn put_target(b: &mut [u8], name: &[u8]) {
    b[32..48].fill(0);
    b[32..32 + name.len()].copy_from_slice(name);
}

#[test]
fn header_target_board() {
    // Upper case, non-ASCII, characters outside [a-z0-9._-], a control byte.
    for name in [
        &b"Board"[..],
        b"STM32",
        "caf\u{e9}".as_bytes(),
        b"\xff",
        b"a b",
        b"a/b",
        b"a:b",
        b"\x01",
    ] {
        assert_field(refused_resealed(&base(), |b| put_target(b, name)), "target");
    }
    // Non-zero bytes after the name's terminating zero.
    for (name, at) in [(&b"abc"[..], 36usize), (b"abc", 47), (b"", 40), (b"", 47)] {
        assert_field(
            refused_resealed(&base(), |b| {
                put_target(b, name);
                b[at] = b'x';
            }),
            "target",
        );
    }
    // Valid names load and read back; all zero means any board.
    for name in ["mps2-an386", "a", "sixteen-chars.01", "x_y.z-9"] {
        let mut b = base();
        put_target(&mut b, name.as_bytes());
        reseal(&mut b);
        let aligned = AlignedBytes::new(&b);
        let model = Model::load(aligned.as_slice()).expect(name);
        assert_eq!(model.container().header.target_name(), name);
    }
    let aligned = AlignedBytes::new(&base());
    let model = Model::load(aligned.as_slice()).unwrap();
    assert_eq!(model.container().header.target_name(), "");
}

#[test]
fn header_truncated() {
    for len in [0usize, 1, 4, 31, 63] {
        let err = refused(&base()[..len]);
        assert!(
            matches!(err, ModelError::Truncated { what: "header" }),
            "{len}: {err:?}"
        );
    }
}

#[test]
fn header_body_len_unaligned() {
    let base = base();
    let n = body_len(&base) as u32;
    for v in [n + 1, n - 1, n + 8] {
        assert_field(refused_raw(&base, |b| put_u32(b, 28, v)), "body_len");
    }
}

#[test]
fn header_body_len_too_small() {
    for v in [0u32, 16, 64] {
        assert_field(refused_raw(&base(), |b| put_u32(b, 28, v)), "body_len");
    }
}

#[test]
fn header_body_len_beyond_the_file() {
    let base = base();
    let n = base.len() as u32;
    for v in [
        n.next_multiple_of(16),
        n.next_multiple_of(16) + 16,
        0xFFFF_FFF0,
    ] {
        let err = refused_raw(&base, |b| put_u32(b, 28, v));
        assert!(
            matches!(err, ModelError::Truncated { what: "trailer" }),
            "{v}: {err:?}"
        );
    }
}

#[test]
fn header_body_len_inside_the_body() {
    // Points the trailer into the sections: the bytes there are not a trailer.
    let base = base();
    let n = body_len(&base) as u32;
    let err = refused_raw(&base, |b| put_u32(b, 28, n - 16));
    assert!(
        matches!(
            err,
            ModelError::BadField { .. } | ModelError::BadSection { .. }
        ),
        "{err:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Section table.

#[test]
fn section_unknown_kind() {
    for kind in [0u32, 6, 99, u32::MAX] {
        assert_section(
            refused_resealed(&base(), |b| put_u32(b, entry(1), kind)),
            "unknown section kind",
        );
    }
}

#[test]
fn section_misaligned_offset() {
    for delta in [1u32, 4, 8, 15] {
        assert_section(
            refused_resealed(&base(), |b| {
                let off = u32_at(b, entry(1) + 4);
                put_u32(b, entry(1) + 4, off + delta);
            }),
            "aligned",
        );
    }
}

#[test]
fn section_offset_inside_the_header_or_table() {
    let base = base();
    let count = u32_at(&base, 12) as usize;
    for off in [0u32, 16, 48, 64, (entry(count) - 16) as u32] {
        assert_section(
            refused_resealed(&base, |b| put_u32(b, entry(0) + 4, off)),
            "outside the body",
        );
    }
}

#[test]
fn section_end_beyond_the_body() {
    let base = base();
    let n = body_len(&base) as u32;
    // Length past the body, offset past the body, and an offset + length that wraps in u32.
    assert_section(
        refused_resealed(&base, |b| put_u32(b, entry(1) + 8, n)),
        "outside the body",
    );
    assert_section(
        refused_resealed(&base, |b| put_u32(b, entry(1) + 4, n)),
        "outside the body",
    );
    assert!(matches!(
        refused_resealed(&base, |b| {
            put_u32(b, entry(1) + 4, 0xFFFF_FFF0);
            put_u32(b, entry(1) + 8, 0x20);
        }),
        ModelError::BadSection { .. }
    ));
    let last = u32_at(&base, 12) as usize - 1;
    assert_section(
        refused_resealed(&base, |b| {
            let len = u32_at(b, entry(last) + 8);
            put_u32(b, entry(last) + 8, len + 64);
        }),
        "outside the body",
    );
}

#[test]
fn section_overlapping() {
    let base = base();
    // WEIGHTS moved onto GRAPH.
    assert_section(
        refused_resealed(&base, |b| {
            let graph_off = u32_at(b, entry(0) + 4);
            put_u32(b, entry(1) + 4, graph_off);
        }),
        "overlap",
    );
    // GRAPH grown into WEIGHTS.
    assert_section(
        refused_resealed(&base, |b| {
            let len = u32_at(b, entry(0) + 8);
            put_u32(b, entry(0) + 8, len + 32);
        }),
        "overlap",
    );
}

#[test]
fn section_duplicate_kind() {
    assert_section(
        refused_resealed(&base(), |b| {
            put_u32(b, entry(2), SectionKind::Weights as u32)
        }),
        "twice",
    );
}

#[test]
fn section_missing_graph() {
    assert_section(
        refused_resealed(&base(), |b| {
            put_u32(b, entry(0), SectionKind::SelfTest as u32)
        }),
        "GRAPH section is missing",
    );
    // Also when the table simply has one entry fewer.
    let art = Art::decode(&base());
    let only_weights = write_artifact(
        art.fields,
        &[(SectionKind::Weights, art.sections[1].1.as_slice())],
    )
    .unwrap();
    assert_section(refused(&only_weights), "GRAPH section is missing");
}

#[test]
fn section_missing_weights() {
    assert_section(
        refused_resealed(&base(), |b| {
            put_u32(b, entry(1), SectionKind::Baseline as u32)
        }),
        "WEIGHTS section is missing",
    );
}

#[test]
fn section_reserved_nonzero() {
    for i in 0..3 {
        assert_section(
            refused_resealed(&base(), |b| put_u32(b, entry(i) + 12, 1)),
            "reserved",
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Trailer.

#[test]
fn trailer_magic() {
    let base = base();
    let at = body_len(&base);
    assert_field(refused_raw(&base, |b| b[at] = b'X'), "trailer magic");
}

#[test]
fn trailer_length() {
    let base = base();
    let at = body_len(&base) + 4;
    for v in [0u32, 47, 49, 48 + 72, u32::MAX] {
        assert_field(refused_raw(&base, |b| put_u32(b, at, v)), "trailer length");
    }
}

#[test]
fn trailer_reserved() {
    let base = base();
    let at = body_len(&base) + 12;
    assert_field(
        refused_raw(&base, |b| put_u32(b, at, 1)),
        "trailer reserved",
    );
}

#[test]
fn trailer_signature_count_over_eight() {
    let base = base();
    let at = body_len(&base);
    for count in [9u32, 1000, u32::MAX] {
        let err = refused_raw(&base, |b| {
            put_u32(b, at + 8, count);
            // A trailer length consistent with the count, where it fits in a u32.
            let len = 48u64 + count as u64 * 72;
            put_u32(b, at + 4, len.min(u32::MAX as u64) as u32);
            b.resize(at + (len as usize).min(48 + 9 * 72), 0);
        });
        assert_field(err, "trailer length");
    }
}

#[test]
fn trailer_signatures_missing() {
    // Says one signature, carries none.
    let base = base();
    let at = body_len(&base);
    let err = refused_raw(&base, |b| {
        put_u32(b, at + 4, 48 + 72);
        put_u32(b, at + 8, 1);
    });
    assert!(
        matches!(err, ModelError::Truncated { what: "trailer" }),
        "{err:?}"
    );
}

#[test]
fn trailer_extra_bytes_after_it() {
    for extra in [1usize, 16, 72] {
        let err = refused_raw(&base(), |b| b.extend(std::iter::repeat_n(0, extra)));
        assert_field(err, "file length");
    }
}

#[test]
fn trailer_truncated() {
    let base = base();
    let n = body_len(&base);
    for len in [n, n + 1, n + 16, n + 47, base.len() - 1] {
        let err = refused(&base[..len]);
        assert!(
            matches!(err, ModelError::Truncated { what: "trailer" }),
            "{len}: {err:?}"
        );
    }
}

#[test]
fn digest_mismatch_on_one_flipped_body_bit() {
    let base = base();
    let n = body_len(&base);
    // The model version (a free header field), the graph, the weights, the manifest, padding.
    let graph_off = u32_at(&base, entry(0) + 4) as usize;
    let weights_off = u32_at(&base, entry(1) + 4) as usize;
    let manifest_off = u32_at(&base, entry(2) + 4) as usize;
    for at in [
        16usize,
        24,
        graph_off + 3,
        weights_off + 5,
        manifest_off,
        n - 1,
    ] {
        for bit in [0, 7] {
            let err = refused_raw(&base, |b| b[at] ^= 1 << bit);
            assert!(
                matches!(err, ModelError::DigestMismatch),
                "byte {at} bit {bit}: {err:?}"
            );
        }
    }
}

#[test]
fn digest_mismatch_on_a_wrong_digest() {
    let base = base();
    let at = body_len(&base) + 16;
    for i in [0usize, 31] {
        let err = refused_raw(&base, |b| b[at + i] ^= 0x80);
        assert!(matches!(err, ModelError::DigestMismatch), "{err:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Buffers.

#[test]
fn misaligned_artifact_buffer() {
    let base = base();
    let mut shifted = vec![0u8];
    shifted.extend_from_slice(&base);
    let aligned = AlignedBytes::new(&shifted);
    let err = Model::load(&aligned.as_slice()[1..]).unwrap_err();
    assert!(
        matches!(err, ModelError::Misaligned { what: "artifact" }),
        "{err:?}"
    );
    // Every other misalignment too.
    for skip in 2..16 {
        let mut shifted = vec![0u8; skip];
        shifted.extend_from_slice(&base);
        let aligned = AlignedBytes::new(&shifted);
        assert!(matches!(
            Model::load(&aligned.as_slice()[skip..]),
            Err(ModelError::Misaligned { .. })
        ));
    }
}

#[test]
fn arena_too_small() {
    let bytes = AlignedBytes::new(&base());
    let model = Model::load(bytes.as_slice()).unwrap();
    let need = model.arena_bytes();
    for given in [0, 1, need - 1] {
        let mut arena = AlignedBytes::zeroed(given);
        let err = Interpreter::new(model, arena.as_mut_slice())
            .err()
            .expect("a short arena was accepted");
        assert!(
            matches!(err, ModelError::ArenaTooSmall { needed, given: g } if needed as usize == need && g == given),
            "{err:?}"
        );
    }
    let mut arena = AlignedBytes::zeroed(need);
    assert!(Interpreter::new(model, arena.as_mut_slice()).is_ok());
}

#[test]
fn arena_misaligned() {
    let bytes = AlignedBytes::new(&base());
    let model = Model::load(bytes.as_slice()).unwrap();
    let need = model.arena_bytes();
    for skip in [1usize, 4, 8, 15] {
        let mut arena = AlignedBytes::zeroed(need + 16);
        let err = Interpreter::new(model, &mut arena.as_mut_slice()[skip..skip + need])
            .err()
            .expect("a misaligned arena was accepted");
        assert!(
            matches!(err, ModelError::Misaligned { what: "arena" }),
            "{err:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Graph header.

#[test]
fn graph_header_does_not_decode() {
    let mut art = Art::decode(&base());
    art.sections[0].1 = vec![0xFF; 12];
    let graph = art.sections[0].1.clone();
    let bytes = write_artifact(
        art.fields,
        &[
            (SectionKind::Graph, graph.as_slice()),
            (SectionKind::Weights, art.sections[1].1.as_slice()),
        ],
    )
    .unwrap();
    let err = refused(&bytes);
    assert!(
        matches!(
            err,
            ModelError::Decode {
                what: "graph header"
            }
        ),
        "{err:?}"
    );
    // An empty GRAPH section.
    let bytes = write_artifact(
        art.fields,
        &[
            (SectionKind::Graph, &[][..]),
            (SectionKind::Weights, art.sections[1].1.as_slice()),
        ],
    )
    .unwrap();
    assert!(matches!(refused(&bytes), ModelError::Decode { .. }));
}

#[test]
fn graph_tensor_slot_out_of_range() {
    for slot in [0u16, 3, 257, u16::MAX] {
        let err = graph_refused(|a| a.fixed_slot = Some(slot));
        assert_field(err, "tensor_slot");
    }
}

#[test]
fn graph_tensor_count_beyond_the_table() {
    // More slots declared than the section holds.
    let err = graph_refused(|a| {
        a.header.tensor_count = 200;
    });
    assert!(
        matches!(
            err,
            ModelError::Truncated {
                what: "tensor table"
            }
        ),
        "{err:?}"
    );
    assert_field(
        graph_refused(|a| a.header.tensor_count = 5000),
        "tensor_count",
    );
    assert_field(graph_refused(|a| a.header.op_count = 5000), "op_count");
}

#[test]
fn graph_without_inputs_or_outputs() {
    assert_field(
        graph_refused(|a| a.header.inputs.clear()),
        "graph inputs/outputs",
    );
    assert_field(
        graph_refused(|a| a.header.outputs.clear()),
        "graph inputs/outputs",
    );
}

#[test]
fn graph_input_or_output_index_out_of_range() {
    for i in [9u16, 100, NO_TENSOR] {
        assert!(matches!(
            graph_refused(|a| a.header.inputs[0] = i),
            ModelError::BadTensor { .. }
        ));
        assert!(matches!(
            graph_refused(|a| a.header.outputs[0] = i),
            ModelError::BadTensor { .. }
        ));
    }
}

#[test]
fn graph_input_that_is_a_constant() {
    assert_tensor(
        graph_refused(|a| a.header.inputs[0] = T_FILTER),
        "graph input must be an arena tensor",
    );
    // An activation written by an op is no graph input either.
    assert_tensor(
        graph_refused(|a| {
            a.header.inputs.push(T_CONV_OUT).unwrap();
        }),
        "graph input must be an arena tensor",
    );
}

#[test]
fn graph_output_that_dies_early() {
    assert_tensor(
        graph_refused(|a| a.header.outputs[0] = T_FC_OUT),
        "graph output must stay alive",
    );
    assert_tensor(
        graph_refused(|a| a.header.outputs[0] = T_FILTER),
        "graph output must stay alive",
    );
}

// ---------------------------------------------------------------------------------------------
// Ops: indices, order, lifetimes, counts.

#[test]
fn op_tensor_index_out_of_range() {
    for bad in [9u16, 1000, NO_TENSOR - 1] {
        assert_op(
            graph_refused(|a| a.ops[1].inputs[0] = bad),
            "input tensor index out of range",
        );
        assert_op(
            graph_refused(|a| a.ops[2].output = bad),
            "output tensor index out of range",
        );
    }
    // NO_TENSOR for a required input is "missing", not "absent optional".
    assert_op(
        graph_refused(|a| a.ops[0].inputs[1] = NO_TENSOR),
        "required input is missing",
    );
}

#[test]
fn op_cycle_by_swapping_two_ops() {
    for (i, j) in [(0usize, 1usize), (1, 2), (0, 3)] {
        let err = graph_refused(|a| a.ops.swap(i, j));
        assert!(
            matches!(err, ModelError::BadOp { .. }),
            "{i}<->{j}: {err:?}"
        );
    }
}

#[test]
fn op_reads_a_tensor_before_it_is_written() {
    // The RELU (op 2) reads the conv output; say the conv output is born at op 2 too.
    assert_op(
        graph_refused(|a| *a.arena_of(T_CONV_OUT).1 = 2),
        "output must be an arena tensor first written by this op",
    );
    // ... or that it died before op 2 reads it.
    assert_op(
        graph_refused(|a| *a.arena_of(T_CONV_OUT).2 = 1),
        "outside its lifetime",
    );
    // An op reading its own output.
    assert_op(
        graph_refused(|a| a.ops[1].inputs[0] = T_RELU_OUT),
        "outside its lifetime",
    );
}

#[test]
fn op_output_that_is_a_constant() {
    assert_op(
        graph_refused(|a| a.ops[1].output = T_FILTER),
        "output must be an arena tensor",
    );
}

#[test]
fn op_count_larger_than_the_ops_present() {
    let err = graph_refused(|a| {
        a.header.op_count += 1;
        // Keep the graph output alive to the new last step, so the op list is what fails.
        *a.arena_of(T_OUTPUT).2 += 1;
    });
    assert_op(err, "does not decode");
    // Without the lifetime fix, the output lifetime no longer matches op_count.
    assert!(matches!(
        graph_refused(|a| a.header.op_count += 1),
        ModelError::BadTensor { .. }
    ));
}

#[test]
fn op_trailing_garbage_after_the_ops() {
    for tail in [vec![0u8], vec![0xAA; 7], vec![0; 64]] {
        let err = graph_refused(|a| a.tail = tail.clone());
        assert_field(err, "op_count");
    }
}

#[test]
fn op_does_not_decode() {
    let err = graph_refused(|a| {
        a.ops.truncate(3);
        a.tail = vec![0xFF; 3];
    });
    assert_op(err, "does not decode");
}

#[test]
fn tensor_born_at_an_op_that_does_not_write_it() {
    // An extra activation claiming to be written by op 1, out of everyone's way.
    let err = graph_refused(|a| {
        let end = a.fields.arena_bytes.next_multiple_of(16);
        a.fields.arena_bytes = end + 64;
        a.header.tensor_count += 1;
        a.tensors.push(TensorDef {
            dtype: DType::F32,
            shape: heapless::Vec::from_slice(&[4]).unwrap(),
            location: Location::Arena {
                offset: end,
                first: 1,
                last: 2,
            },
            quant: None,
        });
        a.raw_slots.push(None);
    });
    assert_field(err, "tensor lifetimes");
}

// ---------------------------------------------------------------------------------------------
// The arena plan.

#[test]
fn overlapping_live_tensors() {
    // The RELU's input and output are alive together at op 2: put them on the same bytes.
    let err = graph_refused(|a| {
        let off = *a.arena_of(T_CONV_OUT).0;
        *a.arena_of(T_RELU_OUT).0 = off;
    });
    assert!(
        matches!(err, ModelError::OverlappingTensors { .. }),
        "{err:?}"
    );
    // Partly overlapping.
    let err = graph_refused(|a| {
        let off = *a.arena_of(T_CONV_OUT).0;
        let relu = *a.arena_of(T_RELU_OUT).0;
        *a.arena_of(T_RELU_OUT).0 = if relu > off { off + 16 } else { off - 16 };
    });
    assert!(
        matches!(err, ModelError::OverlappingTensors { .. }),
        "{err:?}"
    );
}

#[test]
fn arena_bytes_smaller_than_a_tensor_end() {
    let art = Art::decode(&base());
    let mut max_end = 0u32;
    for t in &art.tensors {
        if let Location::Arena { offset, .. } = t.location {
            max_end = max_end.max(offset + kiln_runtime::model::tensor_bytes(t) as u32);
        }
    }
    for arena in [0, max_end / 2, max_end - 1] {
        assert_tensor(
            graph_refused(|a| a.fields.arena_bytes = arena),
            "outside the arena",
        );
    }
    // An offset past the end of the arena.
    assert_tensor(
        graph_refused(|a| *a.arena_of(T_OUTPUT).0 = u32::MAX - 15),
        "outside the arena",
    );
}

#[test]
fn arena_offset_misaligned_for_its_type() {
    let mut art = Art::decode(&synthetic_artifact(false));
    if let Location::Arena { offset, .. } = &mut art.tensors[T_RELU_OUT as usize].location {
        *offset += 2;
    }
    assert_tensor(refused(&art.build()), "not aligned");
}

#[test]
fn scratch_outside_the_arena_or_over_a_live_tensor() {
    assert_op(
        graph_refused(|a| {
            a.ops[0].scratch = ScratchRef {
                offset: a.fields.arena_bytes - 8,
                len: 64,
            }
        }),
        "scratch lies outside the arena",
    );
    assert_op(
        graph_refused(|a| {
            let off = *a.arena_of(T_INPUT).0;
            a.ops[0].scratch = ScratchRef {
                offset: off,
                len: 16,
            }
        }),
        "scratch overlaps a live tensor",
    );
}

// ---------------------------------------------------------------------------------------------
// Tensor definitions.

#[test]
fn tensor_huge_dimension() {
    for dim in [u32::MAX, 1 << 31, (1 << 30) + 1] {
        assert_tensor(
            graph_refused(|a| a.tensor(T_CONV_OUT).shape[1] = dim),
            "larger than 1 GiB",
        );
    }
    // Every dimension huge: the element count would overflow u64.
    let err = graph_refused(|a| {
        for d in a.tensor(T_CONV_OUT).shape.iter_mut() {
            *d = u32::MAX;
        }
    });
    assert!(
        matches!(err, ModelError::BadTensor { index: 3, .. }),
        "{err:?}"
    );
    // A constant whose shape no longer matches its bytes.
    assert_tensor(
        graph_refused(|a| a.tensor(T_FILTER).shape[0] = u32::MAX),
        "larger than 1 GiB",
    );
}

#[test]
fn tensor_dimension_zero() {
    for i in [T_INPUT, T_FILTER, T_CONV_OUT, T_OUTPUT] {
        for d in [0usize, 1] {
            assert_tensor(
                graph_refused(|a| a.tensor(i).shape[d] = 0),
                "dimension is zero",
            );
        }
    }
}

#[test]
fn tensor_rank_too_large() {
    #[derive(serde::Serialize)]
    struct WideTensorDef<'a> {
        dtype: DType,
        shape: &'a [u32],
        location: Location,
        quant: Option<Quant>,
    }
    let err = graph_refused(|a| {
        let t = a.tensors[T_CONV_OUT as usize].clone();
        let mut shape: Vec<u32> = t.shape.to_vec();
        while shape.len() <= MAX_RANK {
            shape.insert(0, 1);
        }
        a.raw_slots[T_CONV_OUT as usize] = Some(
            postcard::to_allocvec(&WideTensorDef {
                dtype: t.dtype,
                shape: &shape,
                location: t.location,
                quant: t.quant,
            })
            .unwrap(),
        );
    });
    assert_tensor(err, "does not decode");
}

#[test]
fn tensor_slot_garbage() {
    let err = graph_refused(|a| a.raw_slots[T_RELU_OUT as usize] = Some(vec![0xFF; 8]));
    assert_tensor(err, "does not decode");
}

#[test]
fn tensor_constant_outside_or_misaligned_in_weights() {
    let set = |a: &mut Art, f: &dyn Fn(&mut kiln_runtime::graph::BufRef)| {
        if let Location::Weights(r) = &mut a.tensor(T_FILTER).location {
            f(r);
        }
    };
    assert_tensor(
        graph_refused(|a| set(a, &|r| r.offset = u32::MAX - 15)),
        "outside WEIGHTS",
    );
    assert_tensor(
        graph_refused(|a| set(a, &|r| r.offset += 4)),
        "not 16-byte aligned",
    );
    assert_tensor(
        graph_refused(|a| set(a, &|r| r.len += 1)),
        "length does not match",
    );
    // A constant where an activation must be, and the other way round.
    assert_op(
        graph_refused(|a| a.ops[0].inputs[0] = T_FILTER),
        "activation operand must live in the arena",
    );
    assert_op(
        graph_refused(|a| a.ops[0].inputs[1] = T_INPUT),
        "weights operand must be a constant",
    );
}

// ---------------------------------------------------------------------------------------------
// Quantization.

#[test]
fn quant_scale_not_positive_finite() {
    for scale in [
        0.0f32,
        -0.0,
        -0.1,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
    ] {
        for i in [T_INPUT, T_FILTER, T_RELU_OUT] {
            assert_tensor(
                graph_refused(|a| a.quant(i).scale = scale),
                "scale is not a positive finite number",
            );
        }
    }
}

#[test]
fn quant_zero_point_outside_int8() {
    for zp in [200, 128, -129, i32::MIN, i32::MAX] {
        assert_tensor(
            graph_refused(|a| a.quant(T_RELU_OUT).zero_point = zp),
            "zero point",
        );
    }
}

#[test]
fn quant_missing_on_an_int8_tensor() {
    assert_tensor(
        graph_refused(|a| a.tensor(T_CONV_OUT).quant = None),
        "no quantization",
    );
}

#[test]
fn quant_per_channel_scale_count_mismatch() {
    for delta in [-4i64, 4, -16, 1] {
        assert_tensor(
            graph_refused(|a| {
                let pc = a.quant(T_FILTER).per_channel.as_mut().unwrap();
                pc.scales.len = (pc.scales.len as i64 + delta) as u32;
            }),
            "per-channel scale count",
        );
    }
    // An axis beyond the rank.
    assert_tensor(
        graph_refused(|a| a.quant(T_FILTER).per_channel.as_mut().unwrap().axis = 4),
        "beyond the rank",
    );
    // Nonzero zero point with per-channel scales.
    assert_tensor(
        graph_refused(|a| a.quant(T_FILTER).zero_point = 1),
        "symmetric",
    );
}

#[test]
fn quant_per_channel_scales_outside_weights() {
    assert_tensor(
        graph_refused(|a| {
            a.quant(T_FILTER)
                .per_channel
                .as_mut()
                .unwrap()
                .scales
                .offset = u32::MAX - 3
        }),
        "outside WEIGHTS",
    );
    assert_tensor(
        graph_refused(|a| {
            a.quant(T_FILTER)
                .per_channel
                .as_mut()
                .unwrap()
                .scales
                .offset += 2
        }),
        "misaligned",
    );
}

#[test]
fn quant_per_channel_scale_values() {
    for bad in [0.0f32, -1.0, f32::NAN, f32::INFINITY] {
        for channel in [0usize, 3] {
            let err = graph_refused(|a| {
                let at = a.quant(T_FILTER).per_channel.unwrap().scales.offset as usize;
                let w = a.weights_mut();
                w[at + 4 * channel..at + 4 * channel + 4].copy_from_slice(&bad.to_le_bytes());
            });
            assert_tensor(err, "per-channel scale is not a positive finite number");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Prepared op parameters.

#[test]
fn requant_multiplier_below_two_to_the_thirty() {
    for m in [1i32, (1 << 30) - 1, -1, i32::MIN] {
        let err = graph_refused(|a| {
            let at = a.conv_requant_offset();
            a.weights_mut()[at..at + 4].copy_from_slice(&m.to_le_bytes());
        });
        assert_op(err, "requant multiplier or shift out of range");
    }
}

#[test]
fn requant_shift_out_of_range() {
    for s in [31i32, 40, -32, i32::MAX, i32::MIN] {
        for channel in [0usize, 3] {
            let err = graph_refused(|a| {
                let at = a.conv_requant_offset() + 8 * channel + 4;
                a.weights_mut()[at..at + 4].copy_from_slice(&s.to_le_bytes());
            });
            assert_op(err, "requant multiplier or shift out of range");
        }
    }
}

#[test]
fn requant_table_outside_weights_or_wrong_length() {
    let edit = |f: fn(&mut kiln_runtime::graph::BufRef)| {
        move |a: &mut Art| {
            if let OpKind::Conv2d(p) = &mut a.ops[0].kind {
                f(&mut p.requant);
            }
        }
    };
    assert_op(
        graph_refused(edit(|r| r.offset = u32::MAX - 7)),
        "outside WEIGHTS",
    );
    assert_op(graph_refused(edit(|r| r.offset += 2)), "misaligned");
    assert_op(graph_refused(edit(|r| r.len = 16)), "1 or one-per-channel");
    assert_op(graph_refused(edit(|r| r.len = 0)), "1 or one-per-channel");
}

#[test]
fn op_geometry_and_clamp() {
    let conv = |f: fn(&mut kiln_runtime::graph::ConvParams)| {
        move |a: &mut Art| {
            if let OpKind::Conv2d(p) = &mut a.ops[0].kind {
                f(p);
            }
        }
    };
    assert_op(graph_refused(conv(|p| p.stride_h = 0)), "inconsistent");
    assert_op(graph_refused(conv(|p| p.dilation_w = 0)), "dilation");
    assert_op(graph_refused(conv(|p| p.stride_w = 3)), "inconsistent");
    assert_op(graph_refused(conv(|p| p.pad_top = 9)), "inconsistent");
    assert_op(
        graph_refused(conv(|p| p.depth_multiplier = 2)),
        "conv filter",
    );
    assert_op(
        graph_refused(conv(|p| {
            p.clamp.min = 10;
            p.clamp.max = -10;
        })),
        "clamp",
    );
    // Wrong kind of op for the tensors.
    assert_op(
        graph_refused(|a| a.ops[1].kind = OpKind::Dequantize),
        "DEQUANTIZE",
    );
    // Wrong operand count.
    assert_op(
        graph_refused(|a| a.ops[1].inputs.push(T_FILTER).unwrap()),
        "wrong number of inputs",
    );
}

#[test]
fn softmax_int8_output_quantization() {
    assert_op(
        graph_refused(|a| a.quant(T_OUTPUT).zero_point = 0),
        "scale 1/256",
    );
    for shift in [-1, 32, i32::MAX] {
        assert_op(
            graph_refused(|a| {
                if let OpKind::Softmax(p) = &mut a.ops[3].kind {
                    p.input_left_shift = shift;
                }
            }),
            "softmax input scaling",
        );
    }
    assert_op(
        graph_refused(|a| {
            if let OpKind::Softmax(p) = &mut a.ops[3].kind {
                p.diff_min = 1;
            }
        }),
        "softmax input scaling",
    );
}

// ---------------------------------------------------------------------------------------------
// Parameters that would overflow an int8 kernel's i32 arithmetic.

fn single_op_artifact(
    kind: ir::OpKind,
    input: ir::Tensor,
    output: ir::Tensor,
    edit: impl FnOnce(&mut Art),
) -> Vec<u8> {
    let g = ir::Graph {
        name: "single".into(),
        tensors: vec![input, output],
        ops: vec![ir::Op {
            kind,
            inputs: vec![Some(0)],
            outputs: vec![1],
        }],
        inputs: vec![0],
        outputs: vec![1],
    };
    let lowered = lower(&g).expect("lower");
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
    let mut art = Art::decode(&bytes);
    edit(&mut art);
    art.build()
}

/// Loads and runs with every input element set to `fill`.
fn run_filled(bytes: &[u8], fill: i8) -> Result<(), ModelError> {
    let aligned = AlignedBytes::new(bytes);
    let model = Model::load(aligned.as_slice())?;
    let mut arena = AlignedBytes::zeroed(model.arena_bytes());
    let mut interp = Interpreter::new(model, arena.as_mut_slice())?;
    let n = kiln_runtime::model::element_count(&interp.input_info(0).unwrap());
    interp.set_input_i8(0, &vec![fill; n]).unwrap();
    interp.invoke().unwrap();
    Ok(())
}

#[test]
fn mean_int8_requant_that_overflows_the_accumulator() {
    // MEAN over 16 elements: |sum| <= 255 * 16, scaled by 2^shift, plus 8 for the rounding.
    let mean = |zp: i64, shift: i32| {
        single_op_artifact(
            ir::OpKind::Mean {
                axes: vec![1, 2],
                keep_dims: false,
            },
            t("x", DType::I8, &[1, 4, 4, 2], None, per_tensor(0.1, zp)),
            t("y", DType::I8, &[1, 2], None, per_tensor(0.1, 0)),
            |a| {
                if let OpKind::Mean(p) = &mut a.ops[0].kind {
                    p.requant.multiplier = i32::MAX;
                    p.requant.shift = shift;
                }
            },
        )
    };
    // 4080 * 2^19 + 8 < 2^31: accepted, and the extreme sums run without overflow.
    for zp in [-128, 127] {
        for fill in [-128, 127] {
            run_filled(&mean(zp, 19), fill).expect("shift 19 loads and runs");
        }
    }
    // 4080 * 2^20 >= 2^31: refused (it used to load and then overflow `acc - n / 2`).
    for shift in [20, 30] {
        assert_op(refused(&mean(0, shift)), "int8 mean overflows");
    }
}

#[test]
fn average_pool_int8_window_too_large_for_the_sum() {
    // One window over the whole image: the i32 sum of `cells` values in [-128, 127], plus half
    // of `cells`, must fit: 128.5 * cells <= 2^31, i.e. cells <= 16_711_935.
    let pool = |w: usize| {
        single_op_artifact(
            ir::OpKind::AveragePool2d {
                filter: [4096, w],
                stride: [1, 1],
                padding: ir::Padding::Valid,
                activation: kiln_runtime::graph::Activation::None,
            },
            t("x", DType::I8, &[1, 4096, w, 1], None, per_tensor(0.1, 0)),
            t("y", DType::I8, &[1, 1, 1, 1], None, per_tensor(0.1, 0)),
            |_| {},
        )
    };
    // 4096 * 4080 = 16_711_680 cells: accepted, and the extreme sums do not overflow.
    let ok = pool(4080);
    for fill in [-128, 127] {
        run_filled(&ok, fill).expect("the largest window loads and runs");
    }
    // 4096 * 4081 cells: refused (it used to overflow `a - count / 2` on an all -128 input).
    assert_op(refused(&pool(4081)), "too large for an i32 sum");
}
