#!/usr/bin/env bash
# Kiln beside LiteRT, ONNX Runtime and tract on the MLPerf Tiny models, one thread each, same inputs:
#
#   ./scripts/compare-runtimes.sh [--runs N] [--write BENCHMARKS.md]
#
# Builds the release `kiln`, makes a virtual environment in target/compare-venv with pinned
# ai-edge-litert / onnxruntime / numpy from PyPI, and runs benches/compare/compare.py (which says
# what is measured and how). Needs KILN_TESTDATA (default ../shared/testdata).
set -euo pipefail
cd "$(dirname "$0")/.."
export KILN_TESTDATA="${KILN_TESTDATA:-$(pwd)/../shared/testdata}"
[ -d "$KILN_TESTDATA/models/mlperf-tiny" ] || { echo "error: no MLPerf Tiny models under $KILN_TESTDATA (set KILN_TESTDATA)"; exit 1; }
command -v python3 >/dev/null || { echo "error: python3 is required"; exit 1; }
cargo build --release -q -p kiln
# tract (its own workspace: a large dependency the test suite does not need).
CARGO_TARGET_DIR=target/compare-tract cargo build --release -q --manifest-path benches/compare/tract/Cargo.toml
venv=target/compare-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q ai-edge-litert==2.3.0 onnxruntime==1.32.0 numpy==2.4.6 onnx==1.22.0
fi
exec "$venv/bin/python" benches/compare/compare.py --kiln target/release/kiln \
  --tract target/compare-tract/release/kiln-compare-tract --testdata "$KILN_TESTDATA" "$@"
