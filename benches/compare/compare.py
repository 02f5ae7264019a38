#!/usr/bin/env python3
"""Side-by-side single-thread latency of Kiln, LiteRT and ONNX Runtime on the MLPerf Tiny models.

Run through scripts/compare-runtimes.sh, which builds the release `kiln`, makes a virtual
environment with pinned ai-edge-litert / onnxruntime / numpy and calls this file.

For each model (KWS, ResNet-8, VWW) on the same input (the first TFLM golden sample):
- Kiln int8: `kiln convert` of the int8 .tflite, timed by `kiln bench --json` (kiln-runtime's
  kernels as a device build runs them: on x86-64 the AVX2 / AVX-512 VNNI fast paths when the CPU
  has them; the table says which),
  and the float model on kiln-runtime's candle backend (`--backend candle`, f32).
- LiteRT int8: ai_edge_litert.interpreter.Interpreter(num_threads=1) on the int8 .tflite.
- ONNX Runtime int8: the float .onnx quantized statically by onnxruntime.quantization (QDQ,
  per-channel weights, calibrated on the first 50 samples of the data set), one thread; and the
  float .onnx itself. KWS has no ONNX model in the test data: its ONNX columns are empty.
- tract (the Rust crate tract-onnx, benches/compare/tract, single-threaded): the same float .onnx
  and the same QDQ .onnx, optimized by tract (`into_optimized`); "—" where tract refuses a model.

Every runtime does the same number of warm-up runs and timed runs; medians and p99 (nearest
rank) in microseconds. Prints a Markdown table; with --write FILE, replaces the part of FILE
between `<!-- compare:begin -->` and `<!-- compare:end -->` with it.
"""

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np


def percentile(sorted_us, p):
    rank = max(1, min(len(sorted_us), math.ceil(p / 100.0 * len(sorted_us))))
    return sorted_us[rank - 1]


def timed(fn, runs, warmup):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t) / 1000.0)
    out.sort()
    return {"median_us": percentile(out, 50), "p99_us": percentile(out, 99)}


def litert(path, x, runs, warmup):
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=path, num_threads=1)
    it.allocate_tensors()
    inp = it.get_input_details()[0]
    it.set_tensor(inp["index"], x.reshape(inp["shape"]).astype(inp["dtype"]))

    return timed(it.invoke, runs, warmup)


def ort_session(path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def ort_run(path, x, runs, warmup):
    s = ort_session(path)
    inp = s.get_inputs()[0]
    feed = {inp.name: x.reshape([d if isinstance(d, int) else 1 for d in inp.shape]).astype(np.float32)}
    return timed(lambda: s.run(None, feed), runs, warmup)


def ort_quantize(src, dst, calib):
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)

    import onnx
    from onnx import version_converter

    m = onnx.load(src)
    opset = max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < 13:
        # Per-channel QDQ needs DequantizeLinear's axis (opset 13).
        m = version_converter.convert_version(m, 13)
        src = dst + ".opset13.onnx"
        onnx.save(m, src)
    s = ort_session(src)
    inp = s.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in inp.shape]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{inp.name: c.reshape(shape).astype(np.float32)} for c in calib])

        def get_next(self):
            return next(self.it, None)

    quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)


def kiln_bench(kiln, model, runs, backend):
    out = subprocess.run([kiln, "bench", model, "--runs", str(runs), "--backend", backend, "--json"],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def tract_run(tract, path, x, runs, warmup, tmp):
    """tract's latency on an ONNX model via benches/compare/tract, or None if tract fails."""
    raw = os.path.join(tmp, "tract-input.f32")
    x.astype("<f4").tofile(raw)
    out = subprocess.run([tract, path, raw, str(runs), str(warmup)], capture_output=True, text=True)
    if out.returncode != 0:
        print(f"tract on {os.path.basename(path)}: {out.stderr.strip()}", file=sys.stderr)
        return None
    return json.loads(out.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kiln", required=True)
    ap.add_argument("--tract", help="the kiln-compare-tract binary (benches/compare/tract)")
    ap.add_argument("--testdata", required=True)
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--write")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every runtime this many times, interleaved, and keep each one's "
                         "round with the lowest median (a shared machine's noise only adds time)")
    a = ap.parse_args()
    mt = os.path.join(a.testdata, "models", "mlperf-tiny")
    models = [
        ("KWS", "kws_ref_model.tflite", "kws_ref_model_float32.tflite", None, "kws_ref_model.npz", None),
        ("ResNet-8", "pretrainedResnet_quant.tflite", "pretrainedResnet.tflite", "pretrainedResnet.onnx",
         "pretrainedResnet_quant.npz", ("ic01.npz", 1 / 255.0)),
        ("VWW", "vww_96_int8.tflite", "vww_96_float.tflite", "vww_96_float.onnx", "vww_96_int8.npz",
         ("vww01.npz", 1 / 255.0)),
    ]
    warmup = max(10, a.runs // 10)
    rows = []
    tmp = tempfile.mkdtemp(prefix="kiln-compare-")
    for name, int8, flt, onnx, golden, data in models:
        g = np.load(os.path.join(a.testdata, "golden", golden))
        x8 = g["input"][0]
        row = {"model": name}
        kiln_int8 = os.path.join(tmp, name + "-int8.kiln")
        subprocess.run([a.kiln, "convert", os.path.join(mt, int8), "-o", kiln_int8], check=True,
                       capture_output=True)
        kiln_f32 = os.path.join(tmp, name + "-f32.kiln")
        subprocess.run([a.kiln, "convert", os.path.join(mt, flt), "-o", kiln_f32], check=True,
                       capture_output=True)
        if onnx:
            path = os.path.join(a.testdata, "models", "onnx", onnx)
            d = np.load(os.path.join(a.testdata, "data", data[0]))
            xs = d["x"].astype(np.float32) * data[1]
            q = os.path.join(tmp, name + "-qdq.onnx")
            ort_quantize(path, q, xs[:50])

        def keep(key, result):
            if key not in row or result["median_us"] < row[key]["median_us"]:
                row[key] = result

        for _ in range(max(1, a.rounds)):
            keep("kiln", kiln_bench(a.kiln, kiln_int8, a.runs, "portable"))
            keep("candle", kiln_bench(a.kiln, kiln_f32, max(20, a.runs // 5), "candle"))
            keep("litert", litert(os.path.join(mt, int8), x8, a.runs, warmup))
            if onnx:
                keep("ort_int8", ort_run(q, xs[0], a.runs, warmup))
                keep("ort_f32", ort_run(path, xs[0], a.runs, warmup))
                if a.tract:
                    keep("tract_f32", tract_run(a.tract, path, xs[0], a.runs, warmup, tmp))
                    keep("tract_int8", tract_run(a.tract, q, xs[0], a.runs, warmup, tmp))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)

    def cell(r, k, f="median_us"):
        v = r.get(k)
        return "—" if v is None else f"{v[f]:.0f}"

    def ratio(r, k):
        v = r.get(k)
        return "—" if v is None else f"{r['kiln']['median_us'] / v['median_us']:.2f}"

    import ai_edge_litert
    import onnxruntime
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [
        f"Measured {datetime.date.today().isoformat()} on {cpu} ({os.cpu_count()} cores), one thread "
        f"each, {a.runs} timed runs after {warmup} warm-up runs"
        f"{f', best of {a.rounds} interleaved rounds (the round with the lowest median, per runtime)' if a.rounds > 1 else ''}"
        f", median / p99 in µs, the first golden "
        f"sample as input (`scripts/compare-runtimes.sh`). ai-edge-litert {getattr(ai_edge_litert, '__version__', '?')}, "
        f"onnxruntime {onnxruntime.__version__}, numpy {np.__version__}; load average when it started: "
        f"{os.getloadavg()[0]:.2f}. Kiln's int8 kernels here: {rows[0]['kiln'].get('kernels', '?') if rows and rows[0].get('kiln') else '?'}.",
        "",
        "| model | Kiln int8 | LiteRT int8 | ORT int8 (QDQ) | ORT f32 | tract int8 (QDQ) | tract f32 | Kiln candle f32 | Kiln / LiteRT | Kiln / ORT int8 | Kiln / tract int8 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {cell(r, 'kiln')} / {cell(r, 'kiln', 'p99_us')} | {cell(r, 'litert')} / "
            f"{cell(r, 'litert', 'p99_us')} | {cell(r, 'ort_int8')} | {cell(r, 'ort_f32')} | "
            f"{cell(r, 'tract_int8')} | {cell(r, 'tract_f32')} | {cell(r, 'candle')} | "
            f"{ratio(r, 'litert')} | {ratio(r, 'ort_int8')} | {ratio(r, 'tract_int8')} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if a.write:
        with open(a.write) as f:
            text = f.read()
        begin, end = "<!-- compare:begin -->", "<!-- compare:end -->"
        if begin not in text or end not in text:
            sys.exit(f"{a.write} has no {begin} ... {end} markers; add them where the table goes")
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        with open(a.write, "w") as f:
            f.write(head + begin + "\n" + table + end + tail)


if __name__ == "__main__":
    main()
