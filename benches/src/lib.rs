//! Helpers shared by Kiln's criterion benches: locating the shared test data and preparing
//! artifacts once per bench run.

use std::path::PathBuf;

/// The shared test data folder (`KILN_TESTDATA`, default `../shared/testdata` from the repo root).
pub fn testdata() -> Option<PathBuf> {
    let dir = std::env::var_os("KILN_TESTDATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata"));
    dir.join("models").is_dir().then_some(dir)
}

/// Converts an MLPerf Tiny model of the test data into artifact bytes.
pub fn convert(file: &str) -> Option<Vec<u8>> {
    let dir = testdata()?;
    let source = std::fs::read(dir.join("models/mlperf-tiny").join(file)).ok()?;
    kiln::convert::convert_tflite(&source, file)
        .ok()
        .map(|c| c.artifact)
}
