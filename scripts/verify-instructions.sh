#!/usr/bin/env bash
# Guest instructions a Cortex-M4 spends verifying a signed artifact: Container::parse (structure
# checks + SHA-256 of the body) and verify_signatures (Ed25519), counted under QEMU with the
# TCG plugin in benches/qemu-insn.
#
#   ./scripts/verify-instructions.sh [MODEL.tflite ...]
#
# Default models: MLPerf Tiny KWS int8 and VWW int8 from KILN_TESTDATA (default ../shared/testdata).
# Each is converted, signed with a fresh key, embedded in firmware/verify-bench and run in five
# modes of the same image: base (startup + exit only), structure, hash (= Container::parse),
# verify (parse + verify_signatures) and tampered (a flipped signature bit must be refused).
# Every run must exit 0, so a count is only reported for a verification that succeeded.
# Reported: verify − base, split into structure, SHA-256 (hash − structure) and Ed25519
# (verify − hash: key-id lookup + one verify_strict).
# KILN_VERIFY_PROFILE=release-size measures the opt-level "s" build instead of opt-level 3.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export KILN_TESTDATA="${KILN_TESTDATA:-$ROOT/../shared/testdata}"
PROFILE="${KILN_VERIFY_PROFILE:-release}"
TARGET=thumbv7em-none-eabihf

for tool in cargo gcc qemu-system-arm arm-none-eabi-nm arm-none-eabi-size; do
  command -v "$tool" >/dev/null || { echo "error: $tool is required (apt: gcc qemu-system-arm binutils-arm-none-eabi)"; exit 1; }
done

if (($#)); then
  models=("$@")
else
  models=("$KILN_TESTDATA/models/mlperf-tiny/kws_ref_model.tflite" "$KILN_TESTDATA/models/mlperf-tiny/vww_96_int8.tflite")
fi
for m in "${models[@]}"; do
  if [ ! -f "$m" ]; then
    echo "skipped: $m not found (set KILN_TESTDATA)"
    exit 0
  fi
done

mkdir -p target/qemu-insn
plugin="$ROOT/target/qemu-insn/insn.so"
benches/qemu-insn/build.sh "$plugin"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The CLI's messages are shown only when it fails.
kiln() {
  local out
  out=$(nice -n 10 cargo run -q -p kiln -- "$@" 2>&1) || { echo "$out" >&2; echo "error: kiln $1 failed" >&2; exit 1; }
}
kiln keygen -o "$work/k"

target_dir="$ROOT/target/verify-bench"
elf="$target_dir/$TARGET/$PROFILE/kiln-verify-bench"

# Instructions executed by one run of the image in MODE; fails unless the image exits 0.
count() {
  local mode=$1 log="$work/plugin-$1.log" rc=0
  rm -f "$log"
  timeout 20 qemu-system-arm -cpu cortex-m4 -machine mps2-an386 -nographic -monitor none \
    -semihosting-config "enable=on,target=native,arg=$mode" -kernel "$elf" \
    -plugin "$plugin" -d plugin -D "$log" || rc=$?
  if ((rc != 0)); then
    echo "error: mode $mode exited with status $rc (124: timed out)" >&2
    return 1
  fi
  sed -n 's/^insns: //p' "$log"
}

rows=()
for m in "${models[@]}"; do
  name=$(basename "$m" .tflite)
  kiln convert "$m" -o "$work/$name.kiln"
  kiln sign "$work/$name.kiln" --key "$work/k.key" --version 1 -o "$work/$name.signed.kiln"
  (cd firmware/verify-bench && KILN_VERIFY_MODEL="$work/$name.signed.kiln" KILN_VERIFY_PUBKEY="$work/k.pub" \
    CARGO_TARGET_DIR="$target_dir" nice -n 10 cargo build -q --profile "$PROFILE" --target "$TARGET")
  base=$(count base)
  structure=$(count structure)
  hash=$(count hash)
  verify=$(count verify)
  count tampered >/dev/null
  bytes=$(stat -c %s "$work/$name.signed.kiln")
  src_bytes=$(stat -c %s "$m")
  sha=$((hash - structure))
  rows+=("$(printf '%-24s %9d %9d %12d %10d %12d %12d %10d' "$name" "$src_bytes" "$bytes" $((verify - base)) \
    $((structure - base)) "$sha" $((verify - hash)) $((sha * 1024 / bytes)))")
done

echo
echo "Guest instructions to verify a signed artifact on a Cortex-M4 (QEMU mps2-an386, profile $PROFILE):"
echo "verify = Container::parse + verify_signatures, minus a baseline run of the same image"
printf '%-24s %9s %9s %12s %10s %12s %12s %10s\n' artifact "src bytes" "bytes" verify structure SHA-256 Ed25519 "SHA/KB"
for r in "${rows[@]}"; do echo "$r"; done

# Code size of the last image: .text split by symbol (after LTO, inlined code counts for its caller).
text=$(arm-none-eabi-size -A "$elf" | awk '$1 == ".text" {print $2}')
arm-none-eabi-nm --size-sort -C -S -t d "$elf" | awk -v text="$text" '
  $3 ~ /^[tT]$/ { size = $2 + 0; name = $0; sub(/^[^ ]+ [^ ]+ [^ ]+ /, "", name)
    if (name ~ /^<?sha2::/) sha += size
    else if (name ~ /ed25519|curve25519|subtle::/) ed += size }
  END { printf "\n.text %d B: sha2 %d B, ed25519 + curve25519 (+ subtle) %d B, rest %d B\n", text, sha, ed, text - sha - ed }'
