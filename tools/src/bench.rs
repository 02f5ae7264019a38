//! `kiln bench --target host`: single-thread latency of one inference on this machine.
//!
//! The input is the artifact's first SELFTEST case (real data the model was calibrated on), or
//! zeros when it has none. After warm-up runs, every run is timed on its own; the report gives
//! the median and the 99th percentile (nearest rank) in microseconds, with the model's MACs and
//! arena so that figures of different models can be compared.

use crate::artifact::AlignedBytes;
use anyhow::{bail, Context, Result};
use kiln_runtime::format::SectionKind;
use kiln_runtime::sections::{SelfTestCase, SelfTestHead};
use kiln_runtime::{Interpreter, Model};
use serde::Serialize;
use std::time::Instant;

/// Where the host bench runs the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// kiln-runtime's kernels (what devices run).
    Portable,
    /// kiln-runtime's candle backend on the CPU.
    Candle,
}

/// What `kiln bench --target host` measured.
#[derive(Clone, Debug, Serialize)]
pub struct HostBench {
    /// Always `host`.
    pub target: &'static str,
    /// The backend.
    pub backend: Backend,
    /// The int8 kernel bodies kiln-runtime runs on this CPU (`avx512-vnni`, `avx2`, `neon`,
    /// `portable`; see `kiln_runtime::kernels::arch::active`); the candle backend reports `candle`.
    pub kernels: &'static str,
    /// Timed runs.
    pub runs: usize,
    /// Median latency of one inference, microseconds.
    pub median_us: f64,
    /// 99th percentile (nearest rank), microseconds.
    pub p99_us: f64,
    /// Fastest run, microseconds.
    pub min_us: f64,
    /// Mean, microseconds.
    pub mean_us: f64,
    /// Multiply-accumulates of one inference.
    pub macs: u64,
    /// MACs per microsecond at the median (millions of MACs per second).
    pub macs_per_us: f64,
    /// Arena the artifact plans.
    pub arena_bytes: usize,
    /// Whether the input was the artifact's first self-test case (else zeros).
    pub selftest_input: bool,
    /// With `per_op`: each op's median time over a second set of `runs` inferences (portable
    /// backend only), in execution order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ops: Option<Vec<OpTime>>,
}

/// One op's share of an inference (`kiln bench --per-op`).
#[derive(Clone, Debug, Serialize)]
pub struct OpTime {
    /// Op index in execution order.
    pub index: usize,
    /// Operator name.
    pub op: &'static str,
    /// Output shape.
    pub output_shape: Vec<u32>,
    /// Multiply-accumulates.
    pub macs: u64,
    /// Median time of this op, microseconds.
    pub median_us: f64,
    /// This op's median as a fraction of the sum of all ops' medians.
    pub share: f64,
}

/// The raw input bytes of the first SELFTEST case, if the artifact has one.
fn selftest_input(model: &Model<'_>) -> Option<Vec<u8>> {
    let bytes = model.container().section(SectionKind::SelfTest)?;
    let (head, rest): (SelfTestHead, &[u8]) = postcard::take_from_bytes(bytes).ok()?;
    if head.count == 0 {
        return None;
    }
    let (case, _): (SelfTestCase<'_>, &[u8]) = postcard::take_from_bytes(rest).ok()?;
    Some(case.inputs.to_vec())
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Times `runs` inferences of `artifact` (after `runs / 10 + 3` warm-up runs), calling
/// `progress(done, total)` as it goes. With `per_op` (portable backend), `runs` more inferences
/// time each op on its own; the headline figures come from the first set, free of that
/// instrumentation.
///
/// # Errors
/// An invalid artifact, `runs == 0`, or a model the backend cannot run.
pub fn bench_host(
    artifact: &[u8],
    runs: usize,
    backend: Backend,
    per_op: bool,
    mut progress: impl FnMut(usize, usize),
) -> Result<HostBench> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    if per_op && backend == Backend::Candle {
        bail!("--per-op times kiln-runtime's own kernels; drop --backend candle");
    }
    let report = crate::inspect::inspect(artifact)?;
    let bytes = AlignedBytes::new(artifact);
    let model = Model::load(bytes.as_slice())?;
    let input = selftest_input(&model);
    let mut arena = AlignedBytes::zeroed(model.arena_bytes());
    let mut interp = Interpreter::new(model, arena.as_mut_slice())?;
    let mut at = 0;
    for i in 0..model.inputs().len() {
        let dst = interp.input_bytes_mut(i)?;
        match &input {
            Some(src) => {
                let part = src
                    .get(at..at + dst.len())
                    .context("the artifact's self-test input does not fit its graph inputs")?;
                dst.copy_from_slice(part);
            }
            None => dst.fill(0),
        }
        at += dst.len();
    }
    let inputs: Vec<Vec<u8>> = (0..model.inputs().len())
        .map(|i| interp.input_bytes_mut(i).map(|b| b.to_vec()))
        .collect::<Result<_, _>>()?;
    let candle = match backend {
        Backend::Candle => Some(kiln_runtime::candle_backend::CandleModel::new(
            &model,
            &candle_core::Device::Cpu,
        )?),
        Backend::Portable => None,
    };
    let refs: Vec<&[u8]> = inputs.iter().map(Vec::as_slice).collect();
    let mut once = || -> Result<()> {
        match &candle {
            Some(c) => {
                c.run(&refs)?;
            }
            None => interp.invoke()?,
        }
        Ok(())
    };
    let warmup = runs / 10 + 3;
    let total = warmup + runs * (1 + usize::from(per_op));
    for w in 0..warmup {
        once()?;
        progress(w + 1, total);
    }
    let mut times = Vec::with_capacity(runs);
    for r in 0..runs {
        let t = Instant::now();
        once()?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
        progress(warmup + r + 1, total);
    }
    let ops = if per_op {
        let mut per: Vec<Vec<f64>> = vec![Vec::with_capacity(runs); report.ops.len()];
        for r in 0..runs {
            let mut t = Instant::now();
            interp.invoke_observed(|index| {
                let now = Instant::now();
                if let Some(v) = per.get_mut(index) {
                    v.push((now - t).as_secs_f64() * 1e6);
                }
                t = now;
            })?;
            progress(warmup + runs + r + 1, total);
        }
        let medians: Vec<f64> = per
            .iter_mut()
            .map(|v| {
                v.sort_by(f64::total_cmp);
                percentile(v, 50.0)
            })
            .collect();
        let sum: f64 = medians.iter().sum();
        Some(
            report
                .ops
                .iter()
                .zip(&medians)
                .map(|(row, &m)| OpTime {
                    index: row.index,
                    op: row.op,
                    output_shape: row.output_shape.clone(),
                    macs: row.macs,
                    median_us: m,
                    share: if sum > 0.0 { m / sum } else { 0.0 },
                })
                .collect(),
        )
    } else {
        None
    };
    times.sort_by(f64::total_cmp);
    let median = percentile(&times, 50.0);
    Ok(HostBench {
        target: "host",
        backend,
        kernels: match backend {
            Backend::Portable => kiln_runtime::kernels::arch::active(),
            Backend::Candle => "candle",
        },
        runs,
        median_us: median,
        p99_us: percentile(&times, 99.0),
        min_us: times[0],
        mean_us: times.iter().sum::<f64>() / runs as f64,
        macs: report.macs,
        macs_per_us: if median > 0.0 {
            report.macs as f64 / median
        } else {
            0.0
        },
        arena_bytes: report.arena_bytes,
        selftest_input: input.is_some(),
        ops,
    })
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }
}
