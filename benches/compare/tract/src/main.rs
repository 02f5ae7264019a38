//! tract's latency on an ONNX model, one thread, for `benches/compare/compare.py`.
//!
//! `kiln-compare-tract MODEL.onnx INPUT.f32 RUNS WARMUP` loads the model with tract-onnx, fixes
//! its input to the model's shape (symbolic dimensions as 1), optimizes it, feeds the raw
//! little-endian f32 values of INPUT.f32 `WARMUP` times, then times `RUNS` runs and prints
//! `{"median_us": …, "p99_us": …, "min_us": …}` on stdout. Any failure (an op tract does not
//! support, a wrong input size) is one line on stderr and exit status 1.

use anyhow::{bail, Result};
use std::process::ExitCode;
use std::time::Instant;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

fn run(args: &[String]) -> Result<String> {
    let [_, model, input, runs, warmup] = args else {
        bail!("usage: kiln-compare-tract MODEL.onnx INPUT.f32 RUNS WARMUP");
    };
    let runs: usize = runs.parse()?;
    let warmup: usize = warmup.parse()?;
    if runs == 0 {
        bail!("RUNS must be at least 1");
    }
    let raw = std::fs::read(input)?;
    let data: Vec<f32> = raw
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let mut graph = tract_onnx::onnx().model_for_path(model)?;
    let fact = graph.input_fact(0)?.clone();
    let shape: Vec<usize> = fact
        .shape
        .dims()
        .map(|d| {
            d.concretize()
                .and_then(|d| d.as_i64())
                .and_then(|d| usize::try_from(d).ok())
                .filter(|&d| d > 0)
                .unwrap_or(1)
        })
        .collect();
    let elements: usize = shape.iter().product();
    if elements != data.len() {
        bail!(
            "{input} holds {} values, the model's input {shape:?} takes {elements}",
            data.len()
        );
    }
    graph.set_input_fact(0, f32::fact(&shape).into())?;
    let plan = graph.into_optimized()?.into_runnable()?;
    let x: Tensor = tract_ndarray::ArrayD::from_shape_vec(shape, data)?.into();
    for _ in 0..warmup {
        plan.run(tvec!(x.clone().into()))?;
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        plan.run(tvec!(x.clone().into()))?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    let at = |p: f64| times[((p / 100.0 * runs as f64).ceil() as usize).clamp(1, runs) - 1];
    Ok(format!(
        "{{\"median_us\": {:.3}, \"p99_us\": {:.3}, \"min_us\": {:.3}}}",
        at(50.0),
        at(99.0),
        times[0]
    ))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    match run(&args) {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: tract: {e:#}");
            ExitCode::FAILURE
        }
    }
}
