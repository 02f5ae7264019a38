#!/usr/bin/env bash
# Kiln's test suite: what CI runs (.ci/run calls this), and what you run before you push.
#
#   ./scripts/test.sh
#
# Installs what it needs on a fresh Debian machine (apt: qemu-system-arm, binutils-arm-none-eabi,
# gcc-aarch64-linux-gnu, qemu-user, postgresql, chromium; pip: onnx, moto[server]; rustup targets through rust-toolchain.toml), then: formatting,
# clippy, the workspace tests (kernels, format, planner, importers, TFLM golden bit-exactness,
# malformed-artifact proptests, signing, the update state machine and protocol, the QEMU board),
# no_std builds for thumbv7em-none-eabihf and thumbv6m-none-eabi, the power-cut walk, the runtime
# and device tests on aarch64 under qemu-aarch64, a proof that no allocator is linked, and the
# runtime's SELFTEST vectors run bit-exact on a Cortex-M4 under QEMU (KWS on both Cortex-M builds,
# ResNet-8 and VWW with the DSP fast paths), and the fast paths bit for bit against the portable
# kernels on the M4 (firmware/kernel-check).
# Test data is read from KILN_TESTDATA (default ../shared/testdata); tests that need it say
# "skipped" when it is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export KILN_TESTDATA="${KILN_TESTDATA:-$ROOT/../shared/testdata}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

step() { printf '\n==> %s\n' "$*"; }
need_apt=()
command -v qemu-system-arm >/dev/null || need_apt+=(qemu-system-arm)
command -v arm-none-eabi-nm >/dev/null || need_apt+=(binutils-arm-none-eabi)
command -v aarch64-linux-gnu-gcc >/dev/null || need_apt+=(gcc-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null || need_apt+=(qemu-user)
# PostgreSQL's server binaries (Debian layout) for tools/tests/fleet_postgres.rs (scripts/pg-test-cluster.sh).
compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null && compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || need_apt+=(postgresql)
# Headless Chromium renders the fleet page in tools/tests/fleet_web.rs.
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
if ((${#need_apt[@]})); then
  step "installing ${need_apt[*]} (apt)"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
for tool in cargo rustup qemu-system-arm arm-none-eabi-nm aarch64-linux-gnu-gcc qemu-aarch64; do
  command -v "$tool" >/dev/null || { echo "error: $tool is required but missing; install it (see README.md)"; exit 1; }
done
# rust-toolchain.toml pins the toolchain and lists the targets; make sure they are present.
rustup show active-toolchain >/dev/null
rustup target add thumbv7em-none-eabihf thumbv6m-none-eabi aarch64-unknown-linux-gnu >/dev/null 2>&1 || true

# The ONNX backend node tests ship in the onnx wheel (1.22.0 is the last that has them).
if ! python3 -c "import onnx, sys; sys.exit(0 if onnx.__version__ == '1.22.0' else 1)" 2>/dev/null; then
  step "installing onnx==1.22.0 (pip) for the ONNX backend node tests"
  python3 -m pip install -q --disable-pip-version-check onnx==1.22.0 || echo "warning: pip could not install onnx==1.22.0; the ONNX node tests will say skipped"
fi

# An S3-compatible server for tools/tests/fleet_s3.rs (`kiln serve --store s3://...`).
if ! command -v moto_server >/dev/null || ! python3 -c "import moto, sys; sys.exit(0 if moto.__version__ == '5.2.1' else 1)" 2>/dev/null; then
  step "installing moto[server]==5.2.1 (pip) for the S3 store test"
  python3 -m pip install -q --disable-pip-version-check 'moto[server]==5.2.1' || echo "warning: pip could not install moto[server]==5.2.1; the S3 store test will say skipped"
fi

if [ -d "$KILN_TESTDATA/models" ]; then
  echo "test data: $KILN_TESTDATA"
else
  echo "warning: test data not found at $KILN_TESTDATA: golden and model tests will be skipped"
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo test --workspace"
cargo test --workspace

step "kiln-runtime and kiln-device build for Cortex-M with no default features (no allocator)"
for target in thumbv7em-none-eabihf thumbv6m-none-eabi; do
  cargo build -p kiln-runtime -p kiln-device --no-default-features --target "$target"
done

step "power-cut walk: every flash operation of every update scenario, cut and torn"
cargo run -q --release -p kiln-device --features std --example power_cut

step "runtime, device and agent tests on aarch64 Linux (cross-built, run under qemu-aarch64)"
cargo test -q -p kiln-runtime -p kiln-device -p kiln-agent --features kiln-device/std --target aarch64-unknown-linux-gnu

if [ -d "$KILN_TESTDATA/models" ]; then
  step "bare-metal check: KWS self-tests on a Cortex-M4 under QEMU, no allocator linked"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  cargo run -q -p kiln -- convert "$KILN_TESTDATA/models/mlperf-tiny/kws_ref_model.tflite" -o "$work/kws.kiln" \
    --selftest "$KILN_TESTDATA/golden/kws_ref_model.npz" --selftest-count 4
  for target in thumbv7em-none-eabihf thumbv6m-none-eabi; do
    (cd firmware/runtime-check && KILN_CHECK_MODEL="$work/kws.kiln" CARGO_TARGET_DIR="$ROOT/target/firmware" \
      cargo build -q --release --target "$target")
    elf="$ROOT/target/firmware/$target/release/kiln-runtime-check"
    if arm-none-eabi-nm -C "$elf" | grep -E '__rust_alloc|__rg_alloc|__rust_no_alloc_shim|alloc::alloc'; then
      echo "error: $target image links an allocator symbol (listed above); kiln-runtime must not allocate"
      exit 1
    fi
    echo "$target: no allocator symbols; $(arm-none-eabi-size "$elf" | tail -1 | awk '{print ".text " $1 " B, .bss " $3 " B"}')"
    timeout 120 qemu-system-arm -cpu cortex-m4 -machine mps2-an386 -nographic -monitor none \
      -semihosting-config enable=on,target=native -kernel "$elf"
  done
fi

step "Cortex-M4 DSP fast paths vs the portable kernels under QEMU: seeded random and MLPerf Tiny shapes, bit for bit"
(cd firmware/kernel-check && CARGO_TARGET_DIR="$ROOT/target/firmware" cargo build -q --release --target thumbv7em-none-eabihf)
timeout 120 qemu-system-arm -cpu cortex-m4 -machine mps2-an386 -nographic -monitor none \
  -semihosting-config enable=on,target=native -kernel "$ROOT/target/firmware/thumbv7em-none-eabihf/release/kiln-kernel-check"
if [ -d "$KILN_TESTDATA/models" ]; then
  step "ResNet-8 and VWW self-tests (TFLM-exact outputs) with the DSP fast paths on a Cortex-M4 under QEMU"
  for m in pretrainedResnet_quant vww_96_int8; do
    cargo run -q -p kiln -- convert "$KILN_TESTDATA/models/mlperf-tiny/$m.tflite" -o "$work/$m.kiln" \
      --selftest "$KILN_TESTDATA/golden/$m.npz" --selftest-count 2
    (cd firmware/runtime-check && KILN_CHECK_MODEL="$work/$m.kiln" CARGO_TARGET_DIR="$ROOT/target/firmware" \
      cargo build -q --release --target thumbv7em-none-eabihf)
    timeout 120 qemu-system-arm -cpu cortex-m4 -machine mps2-an386 -nographic -monitor none \
      -semihosting-config enable=on,target=native -kernel "$ROOT/target/firmware/thumbv7em-none-eabihf/release/kiln-runtime-check"
  done
fi

if [ -f fuzz/Cargo.toml ]; then
  step "fuzz targets type-check"
  (cd fuzz && CARGO_TARGET_DIR="$ROOT/target/fuzz-check" cargo check -q)
fi

step "all checks passed"
