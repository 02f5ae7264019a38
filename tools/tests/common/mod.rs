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
