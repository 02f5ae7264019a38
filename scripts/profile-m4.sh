#!/usr/bin/env bash
# Where one int8 inference's guest instructions go on a Cortex-M4 under QEMU, per function.
#
#   ./scripts/profile-m4.sh [--portable] [--top N] [--golden SAMPLES.npz] MODEL.tflite|MODEL.kiln
#
# Builds firmware/bench-m4 with the model and its first golden sample embedded (debug info on,
# in target/profile-m4), runs its `base` and `infer` modes under qemu-system-arm with the
# instruction-counting plugin counting per address (benches/qemu-insn, pcs=), and prints the
# difference (the inference) per function symbol and per inlined function < caller
# (benches/qemu-insn/profile.py). The `infer` run checks the output against the golden one.
# A .tflite model is converted with `kiln convert` (KILN_BIN=path uses a prebuilt kiln). The
# sample (int8 `input` and `output` arrays) comes from --golden, by default
# $KILN_TESTDATA/golden/<model stem>.npz. scripts/bench-m4.sh gives the totals broken down here.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export KILN_TESTDATA="${KILN_TESTDATA:-$ROOT/../shared/testdata}"
features=()
top=25
model=
golden=
while (($#)); do
  case $1 in
    --portable) features=(--features portable) ;;
    --top) top=${2:?--top needs a count}; shift ;;
    --golden) golden=${2:?--golden needs an .npz file}; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) model=$1 ;;
  esac
  shift
done
[ -n "$model" ] || { echo "usage: scripts/profile-m4.sh [--portable] [--top N] [--golden SAMPLES.npz] MODEL.tflite|MODEL.kiln" >&2; exit 2; }
[ -f "$model" ] || { echo "error: $model not found" >&2; exit 1; }
for tool in cargo gcc python3 qemu-system-arm arm-none-eabi-nm arm-none-eabi-addr2line; do
  command -v "$tool" >/dev/null || { echo "error: $tool is required (apt: gcc qemu-system-arm binutils-arm-none-eabi python3-numpy)" >&2; exit 1; }
done

mkdir -p target/qemu-insn
plugin="$ROOT/target/qemu-insn/insn.so"
benches/qemu-insn/build.sh "$plugin"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

name=$(basename "$model")
name=${name%.*}
golden=${golden:-$KILN_TESTDATA/golden/$name.npz}
[ -f "$golden" ] || { echo "error: no golden samples at $golden (pass --golden SAMPLES.npz)" >&2; exit 1; }
python3 -c 'import numpy' 2>/dev/null || { echo "error: python3 needs numpy to read $golden (pip install numpy)" >&2; exit 1; }
case $model in
  *.kiln) cp "$model" "$work/m.kiln" ;;
  *)
    if [ -n "${KILN_BIN:-}" ]; then
      "$KILN_BIN" convert "$model" -o "$work/m.kiln" >/dev/null
    else
      nice -n 10 cargo run -q -p kiln -- convert "$model" -o "$work/m.kiln" >/dev/null
    fi
    ;;
esac
python3 - "$golden" "$work/m" <<'PY'
import sys, numpy as np
d = np.load(sys.argv[1])
x, y = d["input"][:1], d["output"][:1]
if x.dtype != np.int8 or y.dtype != np.int8 or len(x) < 1:
    sys.exit(f"error: {sys.argv[1]} needs int8 input and output samples")
open(sys.argv[2] + ".in", "wb").write(x.tobytes())
open(sys.argv[2] + ".out", "wb").write(y.tobytes())
PY
target_dir="$ROOT/target/profile-m4"
(cd firmware/bench-m4 && KILN_BENCH_MODEL="$work/m.kiln" KILN_BENCH_INPUT="$work/m.in" \
  KILN_BENCH_OUTPUT="$work/m.out" KILN_BENCH_SAMPLES=1 CARGO_TARGET_DIR="$target_dir" CARGO_PROFILE_RELEASE_DEBUG=true \
  nice -n 10 cargo build -q --release --target thumbv7em-none-eabihf "${features[@]}")
image="$work/image.elf"
cp "$target_dir/thumbv7em-none-eabihf/release/kiln-bench-m4" "$image"
for mode in base infer; do
  timeout 600 qemu-system-arm -cpu cortex-m4 -machine mps2-an386 -nographic -monitor none \
    -semihosting-config "enable=on,target=native,arg=$mode" -kernel "$image" \
    -plugin "$plugin,pcs=$work/$mode.pcs" >/dev/null \
    || { echo "error: the $mode run failed (status $?; in infer mode: output differs from TFLM's)" >&2; exit 1; }
done
echo "$name on cortex-m4 (QEMU mps2-an386)${features:+, portable kernels}"
python3 benches/qemu-insn/profile.py "$image" "$work/base.pcs" "$work/infer.pcs" --inline --top "$top"
