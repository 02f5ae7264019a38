//! Small signed artifacts for the simulator, the power-cut walk and tests (host only, feature
//! `std`). A model here is one f32 FULLY_CONNECTED layer whose weight count sets the artifact size;
//! its SELFTEST vector is computed by running the model with kiln-runtime, and can be spoiled on
//! purpose to get a model whose self-test fails on the device.

use ed25519_dalek::{Signer, SigningKey};
use kiln_runtime::format::{SectionKind, TARGET_LEN};
use kiln_runtime::graph::{
    Activation, BufRef, ClampI8, DType, FullyConnectedParams, GraphHeader, Location, OpDef, OpKind,
    ScratchRef, TensorDef,
};
use kiln_runtime::sections::{SelfTestCase, SelfTestHead};
use kiln_runtime::signature::key_id;
use kiln_runtime::writer::{append_signed_trailer, body_digest, write_artifact, HeaderFields};
use kiln_runtime::{Interpreter, Model};
use std::string::{String, ToString};
use std::vec;
use std::vec::Vec;

/// What to build.
#[derive(Clone, Debug)]
pub struct Spec {
    /// Model version stamped into the header.
    pub version: u32,
    /// Security counter.
    pub counter: u32,
    /// Target board (`""` = any).
    pub target: String,
    /// Output features of the layer (the artifact is about `out_features * 256` bytes).
    pub out_features: u32,
    /// Write a wrong expected output, so the self-test fails on the device.
    pub bad_selftest: bool,
}

impl Spec {
    /// A model of about `bytes` bytes.
    pub fn sized(version: u32, bytes: u32) -> Self {
        Spec {
            version,
            counter: 0,
            target: String::new(),
            out_features: (bytes / (IN * 4)).max(1),
            bad_selftest: false,
        }
    }
}

const IN: u32 = 64;

/// A signing key from a fixed seed (tests only).
pub fn test_key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn shape(dims: &[u32]) -> kiln_runtime::graph::Shape {
    dims.iter().copied().collect()
}

fn encode(weights: &[u8], out: u32, selftest: Option<&[u8]>, fields: HeaderFields) -> Vec<u8> {
    let out_offset = (IN * 4).next_multiple_of(16);
    let tensors = [
        TensorDef {
            dtype: DType::F32,
            shape: shape(&[1, IN]),
            location: Location::Arena {
                offset: 0,
                first: 0,
                last: 1,
            },
            quant: None,
        },
        TensorDef {
            dtype: DType::F32,
            shape: shape(&[out, IN]),
            location: Location::Weights(BufRef {
                offset: 0,
                len: weights.len() as u32,
            }),
            quant: None,
        },
        TensorDef {
            dtype: DType::F32,
            shape: shape(&[1, out]),
            location: Location::Arena {
                offset: out_offset,
                first: 1,
                last: 2,
            },
            quant: None,
        },
    ];
    let op = OpDef {
        kind: OpKind::FullyConnected(FullyConnectedParams {
            activation: Activation::None,
            requant: BufRef::default(),
            clamp: ClampI8 {
                min: -128,
                max: 127,
            },
        }),
        inputs: [0u16, 1].into_iter().collect(),
        output: 2,
        scratch: ScratchRef::default(),
    };
    let slots: Vec<Vec<u8>> = tensors
        .iter()
        .map(|t| postcard::to_allocvec(t).unwrap_or_default())
        .collect();
    let slot = slots
        .iter()
        .map(Vec::len)
        .max()
        .unwrap_or(4)
        .next_multiple_of(4);
    let header = GraphHeader {
        tensor_count: 3,
        tensor_slot: slot as u16,
        op_count: 1,
        inputs: [0u16].into_iter().collect(),
        outputs: [2u16].into_iter().collect(),
    };
    let mut graph = postcard::to_allocvec(&header).unwrap_or_default();
    for s in slots {
        let start = graph.len();
        graph.extend_from_slice(&s);
        graph.resize(start + slot, 0);
    }
    graph.extend_from_slice(&postcard::to_allocvec(&op).unwrap_or_default());
    let fields = HeaderFields {
        arena_bytes: out_offset + out * 4,
        ..fields
    };
    let mut sections: Vec<(SectionKind, &[u8])> = vec![
        (SectionKind::Graph, &graph),
        (SectionKind::Weights, weights),
    ];
    if let Some(st) = selftest {
        sections.push((SectionKind::SelfTest, st));
    }
    write_artifact(fields, &sections).unwrap_or_default()
}

/// Builds an unsigned artifact for `spec` (version and counter stamped, target set).
///
/// # Panics
/// Only on a bug in this module (the model it builds is always valid).
pub fn build(spec: &Spec) -> Vec<u8> {
    let out = spec.out_features;
    let mut weights = Vec::with_capacity((out * IN * 4) as usize);
    for i in 0..out * IN {
        let v = ((i.wrapping_mul(2_654_435_761) ^ spec.version) % 2001) as f32 / 1000.0 - 1.0;
        weights.extend_from_slice(&v.to_le_bytes());
    }
    let fields = HeaderFields {
        model_version: spec.version,
        security_counter: spec.counter,
        arena_bytes: 0,
    };
    // Run the model once to get the exact expected output of the self-test input.
    let plain = crate::testkit::aligned(&encode(&weights, out, None, fields));
    let input: Vec<u8> = (0..IN)
        .flat_map(|i| ((i as f32 - 31.5) / 32.0).to_le_bytes())
        .collect();
    let model = Model::load(plain.as_slice()).expect("testkit model loads");
    let mut arena = vec![0u8; model.arena_bytes() + 16];
    let off = arena.as_ptr().align_offset(16);
    let mut interp =
        Interpreter::new(model, &mut arena[off..off + model.arena_bytes()]).expect("interpreter");
    interp
        .input_bytes_mut(0)
        .expect("input")
        .copy_from_slice(&input);
    interp.invoke().expect("invoke");
    let mut expected = interp.output_bytes(0).expect("output").to_vec();
    if spec.bad_selftest {
        expected[0] ^= 0x40;
    }
    let mut st = postcard::to_allocvec(&SelfTestHead { count: 1 }).unwrap_or_default();
    st.extend_from_slice(
        &postcard::to_allocvec(&SelfTestCase {
            inputs: &input,
            outputs: &expected,
        })
        .unwrap_or_default(),
    );
    let mut bytes = encode(&weights, out, Some(&st), fields);
    set_target(&mut bytes, &spec.target);
    bytes
}

fn body_len(bytes: &[u8]) -> usize {
    u32::from_le_bytes([bytes[28], bytes[29], bytes[30], bytes[31]]) as usize
}

fn set_target(bytes: &mut Vec<u8>, target: &str) {
    let n = target.len().min(TARGET_LEN);
    bytes[32..32 + TARGET_LEN].fill(0);
    bytes[32..32 + n].copy_from_slice(&target.as_bytes()[..n]);
    let body = body_len(bytes);
    bytes.truncate(body);
    append_signed_trailer(bytes, &[]);
}

/// Signs an artifact with each key (replacing any signatures).
pub fn sign(bytes: &[u8], keys: &[&SigningKey]) -> Vec<u8> {
    let body = body_len(bytes);
    let mut out = bytes[..body].to_vec();
    let digest = body_digest(&out);
    let sigs: Vec<([u8; 8], [u8; 64])> = keys
        .iter()
        .map(|k| {
            (
                key_id(k.verifying_key().as_bytes()),
                k.sign(&digest).to_bytes(),
            )
        })
        .collect();
    append_signed_trailer(&mut out, &sigs);
    out
}

/// Builds and signs.
pub fn signed(spec: &Spec, key: &SigningKey) -> Vec<u8> {
    sign(&build(spec), &[key])
}

/// A 16-byte aligned copy (what the runtime needs to load an artifact on the host).
pub fn aligned(bytes: &[u8]) -> Aligned {
    let mut words = vec![0u128; bytes.len().div_ceil(16)];
    bytemuck::cast_slice_mut::<u128, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
    Aligned {
        words,
        len: bytes.len(),
    }
}

/// Bytes at a 16-byte aligned address.
pub struct Aligned {
    words: Vec<u128>,
    len: usize,
}

impl Aligned {
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &bytemuck::cast_slice::<u128, u8>(&self.words)[..self.len]
    }
}

/// A key's public half.
pub fn public(key: &SigningKey) -> [u8; 32] {
    key.verifying_key().to_bytes()
}

/// Human name of a spec, for reports.
pub fn describe(spec: &Spec) -> String {
    let mut s = "v".to_string();
    s.push_str(&spec.version.to_string());
    s
}
