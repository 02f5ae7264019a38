#!/usr/bin/env bash
# Kiln's main job end to end on its defaults: convert the MLPerf Tiny int8 models from
# ../shared/testdata (KILN_TESTDATA) into .kiln artifacts with self-test vectors, show what each
# needs (arena, flash, MACs), run each on its golden inputs with the device runtime, and compare
# with TFLM's reference outputs bit for bit.
#
#   ./scripts/demo.sh            # artifacts and outputs go to ./demo-out
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${KILN_TESTDATA:-$(pwd)/../shared/testdata}"
OUT="${KILN_DEMO_OUT:-$(pwd)/demo-out}"
if [ ! -d "$DATA/models/mlperf-tiny" ]; then
  echo "error: test data not found at $DATA" >&2
  echo "hint: set KILN_TESTDATA to the folder holding models/mlperf-tiny and golden/" >&2
  exit 1
fi
mkdir -p "$OUT"
cargo build -q --release -p kiln
KILN=./target/release/kiln
printf '%-24s %8s %10s %12s %10s %s\n' model arena weights MACs samples "bit-exact with TFLM"
for m in kws_ref_model pretrainedResnet_quant vww_96_int8 ad01_int8; do
  $KILN convert "$DATA/models/mlperf-tiny/$m.tflite" -o "$OUT/$m.kiln" --selftest "$DATA/golden/$m.npz" --json >"$OUT/$m.convert.json"
  $KILN inspect "$OUT/$m.kiln" --json >"$OUT/$m.inspect.json"
  $KILN run "$OUT/$m.kiln" --input "$DATA/golden/$m.npz" --output "$OUT/$m.out.npy" 2>/dev/null
  python3 - "$OUT" "$m" "$DATA" <<'PY'
import json, sys, struct
out, m, data = sys.argv[1:]
r = json.load(open(f"{out}/{m}.inspect.json"))
# Compare the .npy written by `kiln run` with the golden outputs without numpy: both are int8.
def npy_payload(raw):
    hlen = struct.unpack('<H', raw[8:10])[0]
    return raw[10 + hlen:]
import zipfile
with zipfile.ZipFile(f"{data}/golden/{m}.npz") as z:
    golden = npy_payload(z.read("output.npy"))
mine = npy_payload(open(f"{out}/{m}.out.npy", "rb").read())
per = r["outputs"][0]["shape"][-1]
n = len(golden) // per
same = sum(golden[i*per:(i+1)*per] == mine[i*per:(i+1)*per] for i in range(n))
print(f"{m:<24} {r['arena_bytes']:>8} {r['weights_bytes']:>10} {r['macs']:>12} {n:>10} {same}/{n}")
PY
done
echo "artifacts, reports and outputs are in $OUT"
