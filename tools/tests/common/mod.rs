//! Shared helpers of the integration tests: where the shared test data lives.
#![allow(dead_code)]

use std::path::PathBuf;

/// The shared test data folder (`KILN_TESTDATA`, default `../shared/testdata` from the repo root),
/// or `None` (after saying so) when it is absent.
pub fn testdata() -> Option<PathBuf> {
    let dir = std::env::var_os("KILN_TESTDATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata"));
    if dir.join("models").is_dir() {
        Some(dir)
    } else {
        eprintln!(
            "skipped: test data not found at {} (set KILN_TESTDATA)",
            dir.display()
        );
        None
    }
}

/// Path of an MLPerf Tiny model.
pub fn mlperf(dir: &std::path::Path, file: &str) -> PathBuf {
    dir.join("models/mlperf-tiny").join(file)
}

// Small builders shared by the artifact tests (format_fields.rs, malformed.rs).

use kiln::ir;
use kiln_runtime::graph::DType;

/// Deterministic pseudo-random bytes (xorshift), so the models are the same on every run.
pub fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        })
        .collect()
}

/// `n` deterministic f32 values in [-1, 1), little-endian.
pub fn f32_data(n: usize, seed: u64) -> Vec<u8> {
    noise(n, seed)
        .into_iter()
        .flat_map(|b| ((b as f32 - 127.5) / 128.0).to_le_bytes())
        .collect()
}

/// `n` deterministic int32 values (multiples of 16 in [-2048, 2032]), little-endian.
pub fn i32_data(n: usize, seed: u64) -> Vec<u8> {
    noise(n, seed)
        .into_iter()
        .flat_map(|b| ((b as i32 - 128) * 16).to_le_bytes())
        .collect()
}

/// Per-tensor quantization parameters.
pub fn per_tensor(scale: f32, zero_point: i64) -> Option<ir::QuantInfo> {
    Some(ir::QuantInfo {
        scales: vec![scale],
        zero_points: vec![zero_point],
        axis: 0,
    })
}

/// A host-IR tensor.
pub fn t(
    name: &str,
    dtype: DType,
    shape: &[usize],
    data: Option<Vec<u8>>,
    quant: Option<ir::QuantInfo>,
) -> ir::Tensor {
    ir::Tensor {
        name: name.into(),
        dtype,
        shape: shape.to_vec(),
        data,
        quant,
    }
}

/// The little-endian u32 at `at`.
pub fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
