#!/usr/bin/env bash
# One int8 inference on a Cortex-M4 under QEMU (mps2-an386): guest instructions, MACs, MACs per
# instruction, arena, stack and code bytes, for the portable kernels and the DSP fast paths side
# by side. Every inference counted is checked byte for byte against TFLM's golden output.
#
#   ./scripts/bench-m4.sh [--json] [--samples N] [MODEL.tflite ...]
#
# Default models: MLPerf Tiny KWS, ResNet-8 and VWW int8 from KILN_TESTDATA (default
# ../shared/testdata), with their golden samples from $KILN_TESTDATA/golden/<stem>.npz.
# Each model is converted with `kiln convert` (KILN_BIN=path uses a prebuilt kiln instead of
# `cargo run -p kiln`), embedded with its first N golden samples (default 4) in firmware/bench-m4,
# built twice (DSP fast paths: thumbv7em-none-eabihf; portable: the same with the `portable`
# feature) and run in three modes of each image:
#   base   load + interpreter + input set, no inference      } instructions = infer - base
#   infer  the same plus one invoke, output compared to TFLM }   (QEMU TCG plugin benches/qemu-insn)
#   check  stack painted, all N samples run and compared, high-water mark printed (stack_bytes)
# Reported per model and variant: instructions, macs (from kiln convert), macs_per_instruction,
# arena_bytes (artifact header), stack_bytes (one invoke, below main's frame), code_bytes (.text
# of the whole image: runtime, cortex-m-rt, semihosting). --json prints one JSON object per row.
# KILN_BENCH_CPU / KILN_BENCH_MACHINE pick another core (cortex-m7 / mps2-an500: same image).
# This is the measuring half of `kiln bench --target qemu-cortex-m4`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export KILN_TESTDATA="${KILN_TESTDATA:-$ROOT/../shared/testdata}"
TARGET=thumbv7em-none-eabihf
CPU="${KILN_BENCH_CPU:-cortex-m4}"
MACHINE="${KILN_BENCH_MACHINE:-mps2-an386}"
json=0
samples=4
models=()
while (($#)); do
  case $1 in
    --json) json=1 ;;
    --samples) samples=${2:?--samples needs a count}; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) models+=("$1") ;;
  esac
  shift
done
if ((${#models[@]} == 0)); then
  d="$KILN_TESTDATA/models/mlperf-tiny"
  models=("$d/kws_ref_model.tflite" "$d/pretrainedResnet_quant.tflite" "$d/vww_96_int8.tflite")
fi
for m in "${models[@]}"; do
  if [ ! -f "$m" ]; then
    echo "skipped: $m not found (set KILN_TESTDATA)" >&2
    exit 0
  fi
done
for tool in cargo gcc python3 qemu-system-arm arm-none-eabi-size; do
  command -v "$tool" >/dev/null || { echo "error: $tool is required (apt: gcc qemu-system-arm binutils-arm-none-eabi python3-numpy)" >&2; exit 1; }
done
python3 -c 'import numpy' 2>/dev/null || { echo "error: python3 needs numpy to read the golden .npz files (pip install numpy)" >&2; exit 1; }

mkdir -p target/qemu-insn
plugin="$ROOT/target/qemu-insn/insn.so"
benches/qemu-insn/build.sh "$plugin"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
kiln() {
  local out
  if [ -n "${KILN_BIN:-}" ]; then
    out=$("$KILN_BIN" "$@" 2>"$work/kiln.err") || { cat "$work/kiln.err" >&2; echo "error: kiln $1 failed" >&2; exit 1; }
  else
    out=$(nice -n 10 cargo run -q -p kiln -- "$@" 2>"$work/kiln.err") || { cat "$work/kiln.err" >&2; echo "error: kiln $1 failed" >&2; exit 1; }
  fi
  printf '%s' "$out"
}

target_dir="$ROOT/target/bench-m4"
elf="$target_dir/$TARGET/release/kiln-bench-m4"

qemu() {
  local mode=$1 image=$2
  shift 2
  timeout 300 qemu-system-arm -cpu "$CPU" -machine "$MACHINE" -nographic -monitor none \
    -semihosting-config "enable=on,target=native,arg=$mode" -kernel "$image" "$@"
}

# Instructions executed by one run of IMAGE in MODE; fails unless the image exits 0.
count() {
  local mode=$1 image=$2 log="$work/plugin.log" rc=0
  rm -f "$log"
  qemu "$mode" "$image" -plugin "$plugin" -d plugin -D "$log" || rc=$?
  if ((rc != 0)); then
    echo "error: $(basename "$image") mode $mode exited with status $rc (124: timed out)" >&2
    return 1
  fi
  sed -n 's/^insns: //p' "$log"
}

rows=()
for m in "${models[@]}"; do
  name=$(basename "$m" .tflite)
  golden="$KILN_TESTDATA/golden/$name.npz"
  [ -f "$golden" ] || { echo "error: no golden outputs at $golden" >&2; exit 1; }
  summary=$(kiln convert "$m" -o "$work/$name.kiln" --json)
  macs=$(printf '%s' "$summary" | python3 -c 'import json,sys; print(json.load(sys.stdin)["macs"])')
  python3 - "$golden" "$samples" "$work/$name" <<'PY'
import sys, numpy as np
d = np.load(sys.argv[1]); n = int(sys.argv[2])
x, y = d["input"][:n], d["output"][:n]
if x.dtype != np.int8 or y.dtype != np.int8 or len(x) < n:
    sys.exit(f"error: {sys.argv[1]} needs {n} int8 samples")
open(sys.argv[3] + ".in", "wb").write(x.tobytes()); open(sys.argv[3] + ".out", "wb").write(y.tobytes())
PY
  for variant in portable dsp; do
    features=()
    [ "$variant" = portable ] && features=(--features portable)
    (cd firmware/bench-m4 && KILN_BENCH_MODEL="$work/$name.kiln" KILN_BENCH_INPUT="$work/$name.in" \
      KILN_BENCH_OUTPUT="$work/$name.out" KILN_BENCH_SAMPLES="$samples" CARGO_TARGET_DIR="$target_dir" \
      nice -n 10 cargo build -q --release --target "$TARGET" "${features[@]}")
    image="$work/$name-$variant.elf"
    cp "$elf" "$image"
    base=$(count base "$image")
    infer=$(count infer "$image")
    check=$(qemu check "$image") || { echo "$check" >&2; echo "error: $name ($variant): outputs differ from TFLM's" >&2; exit 1; }
    stack=$(printf '%s\n' "$check" | sed -n 's/^stack_bytes: //p')
    arena=$(printf '%s\n' "$check" | sed -n 's/^arena_bytes: //p')
    exact=$(printf '%s\n' "$check" | sed -n 's/^samples: //p')
    code=$(arm-none-eabi-size -A "$image" | awk '$1 == ".text" {print $2}')
    insns=$((infer - base))
    mpi=$(python3 -c "print(f'{$macs / $insns:.3f}')")
    if ((json)); then
      rows+=("{\"model\":\"$name\",\"target\":\"qemu-$CPU\",\"kernels\":\"$variant\",\"instructions\":$insns,\"macs\":$macs,\"macs_per_instruction\":$mpi,\"arena_bytes\":$arena,\"stack_bytes\":$stack,\"code_bytes\":$code,\"bit_exact_samples\":${exact%% *}}")
    else
      rows+=("$(printf '%-24s %-9s %12d %11d %8s %9d %8d %9d  %s' "$name" "$variant" "$insns" "$macs" "$mpi" "$arena" "$stack" "$code" "$exact")")
    fi
  done
done

if ((json)); then
  printf '%s\n' "${rows[@]}"
else
  echo
  echo "One int8 inference on $CPU (QEMU $MACHINE), guest instructions = infer - base run of the same image"
  printf '%-24s %-9s %12s %11s %8s %9s %8s %9s  %s\n' model kernels instructions macs mac/insn arena_B stack_B code_B "TFLM bit-exact"
  printf '%s\n' "${rows[@]}"
fi
