//! Many agents in one process against a fleet server: the real agent logic and the real runtime,
//! each device with its own state directory, with injected faults.
//!
//! Faults: `drop` (requests fail, downloads drop midway and resume with Range), `corrupt`
//! (a flipped byte in a download: the SHA-256 check catches it and the device retries), `crash`
//! (an install aborts at a random step; the device restarts from its persisted state),
//! `fail_version` (that version's self-test fails on every device), `drift_version` (inference
//! traffic on that version is drawn outside the BASELINE range).

use crate::agent::{Agent, AgentConfig, Counters, Faults, LatencyHist, Rng};
use serde::Serialize;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Simulation options.
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// Board name the devices report.
    pub board: String,
    /// Keys the devices trust.
    pub trusted_keys: Vec<[u8; 32]>,
    /// Self-test fails for this version.
    pub fail_version: Option<u32>,
    /// Inputs drift on this version.
    pub drift_version: Option<u32>,
    /// Fault probabilities (`fail_selftest_version` is taken from `fail_version`).
    pub faults: Faults,
    /// How long to run.
    pub duration: Duration,
    /// Longest pause between a device's check-ins (caps the server's `next_checkin_s`).
    pub max_poll: Duration,
    /// Shortest pause.
    pub min_poll: Duration,
    /// Devices start (enroll) at random moments spread over this long, as a fleet that boots
    /// over time does, instead of all at once.
    pub ramp: Duration,
    /// Inferences a device runs per check-in cycle.
    pub inferences_per_cycle: u32,
    /// Timeline sampling period.
    pub sample_every: Duration,
    /// Where the state directories go (a temp dir when `None`).
    pub state_root: Option<PathBuf>,
    /// Seed.
    pub seed: u64,
    /// Cohort of the devices.
    pub cohort: Option<String>,
    /// PEM certificates the devices trust for an `https://` server ([`AgentConfig::ca_certs`]).
    pub ca_certs: Vec<Vec<u8>>,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            board: "sim".into(),
            trusted_keys: Vec::new(),
            fail_version: None,
            drift_version: None,
            faults: Faults::default(),
            duration: Duration::from_secs(30),
            max_poll: Duration::from_secs(2),
            min_poll: Duration::from_millis(200),
            ramp: Duration::from_secs(1),
            inferences_per_cycle: 4,
            sample_every: Duration::from_secs(1),
            state_root: None,
            seed: 1,
            cohort: None,
            ca_certs: Vec::new(),
        }
    }
}

/// Devices per running version at one moment.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Sample {
    /// Seconds since the start.
    pub t_s: f64,
    /// Version (`"none"` for no model) → devices.
    pub versions: BTreeMap<String, u64>,
}

/// What happened.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct SimReport {
    /// Devices simulated.
    pub devices: u64,
    /// Seconds run.
    pub duration_s: f64,
    /// Devices per version over time.
    pub timeline: Vec<Sample>,
    /// Devices per version at the end.
    pub final_versions: BTreeMap<String, u64>,
    /// Check-ins the server answered.
    pub checkins: u64,
    /// Answered check-ins per second over the run.
    pub checkins_per_s: f64,
    /// Check-in round trips (request sent to answer parsed), as the devices saw them.
    pub checkin_latency: LatencySummary,
    /// Confirmed installs.
    pub installs: u64,
    /// Refused artifacts.
    pub install_failures: u64,
    /// Failed self-tests (reverted).
    pub selftest_failures: u64,
    /// Ordered rollbacks installed.
    pub rollbacks: u64,
    /// Injected crashes (agent restarted from its state).
    pub crashes: u64,
    /// Downloads whose SHA-256 did not match (retried).
    pub digest_mismatches: u64,
    /// Failed HTTP requests.
    pub http_errors: u64,
    /// Downloads resumed with Range.
    pub resumed_downloads: u64,
    /// Inferences run.
    pub inferences: u64,
    /// Breaches of "a device that had a verified model always has one" (should be empty).
    pub invariant_violations: Vec<String>,
}

/// Percentiles of round-trip times, in milliseconds (each the upper bound of a bucket at most
/// 6.25 % wide, see [`LatencyHist`]).
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct LatencySummary {
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Longest.
    pub max_ms: f64,
}

impl LatencySummary {
    /// The percentiles of `h` (zeros when it is empty).
    pub fn of(h: &LatencyHist) -> Self {
        let ms = |q: f64| h.quantile_us(q).unwrap_or(0) as f64 / 1000.0;
        LatencySummary {
            p50_ms: ms(0.5),
            p90_ms: ms(0.9),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: h.max_us() as f64 / 1000.0,
        }
    }
}

/// Simulation errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// The state directories could not be made.
    #[error("state directory: {0}")]
    Io(#[from] std::io::Error),
    /// An agent could not start.
    #[error("device {device}: {reason}")]
    Agent {
        /// Index.
        device: usize,
        /// Why.
        reason: String,
    },
}

#[derive(Default)]
struct Board {
    versions: Vec<Option<u32>>,
    counters: Counters,
    crashes: u64,
    inferences: u64,
    violations: Vec<String>,
}

fn add(a: &mut Counters, b: &Counters) {
    a.checkins += b.checkins;
    a.checkin_latency.merge(&b.checkin_latency);
    a.installs += b.installs;
    a.install_failures += b.install_failures;
    a.selftest_failures += b.selftest_failures;
    a.rollbacks += b.rollbacks;
    a.digest_mismatches += b.digest_mismatches;
    a.http_errors += b.http_errors;
    a.resumed_downloads += b.resumed_downloads;
}

fn census(versions: &[Option<u32>]) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for v in versions {
        let k = v.map_or_else(|| "none".to_string(), |v| v.to_string());
        *m.entry(k).or_insert(0) += 1;
    }
    m
}

/// Runs `n` devices against `server` for `opts.duration`.
///
/// # Errors
/// The state directories cannot be created, or an agent cannot open its state.
pub async fn simulate(
    server: &str,
    enroll_token: &str,
    n: usize,
    opts: SimOptions,
) -> Result<SimReport, SimError> {
    simulate_until(server, enroll_token, n, opts, std::future::pending()).await
}

/// Runs `n` devices against `server` until `stop` resolves or `opts.duration` passes, whichever
/// comes first (a test stops the fleet as soon as it has seen what it waited for).
///
/// # Errors
/// The state directories cannot be created, or an agent cannot open its state.
pub async fn simulate_until(
    server: &str,
    enroll_token: &str,
    n: usize,
    opts: SimOptions,
    stop: impl Future<Output = ()>,
) -> Result<SimReport, SimError> {
    let temp;
    let root = match &opts.state_root {
        Some(r) => {
            std::fs::create_dir_all(r)?;
            r.clone()
        }
        None => {
            temp = tempfile::tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let board = Arc::new(Mutex::new(Board {
        versions: vec![None; n],
        ..Board::default()
    }));
    let start = Instant::now();
    let deadline = start + opts.duration;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::with_capacity(n);
    let mut ramp_rng = Rng::new(opts.seed ^ 0x5EED_7A3B);
    for i in 0..n {
        let mut cfg =
            AgentConfig::new(server, enroll_token, &opts.board, opts.trusted_keys.clone());
        cfg.name = format!("sim-{i:05}");
        cfg.cohort = opts.cohort.clone();
        cfg.ca_certs = opts.ca_certs.clone();
        cfg.faults = Faults {
            fail_selftest_version: opts.fail_version,
            ..opts.faults.clone()
        };
        cfg.max_poll = opts.max_poll;
        cfg.min_poll = opts.min_poll;
        cfg.request_timeout = Duration::from_secs(10);
        cfg.chunk_timeout = Duration::from_secs(10);
        cfg.seed = opts.seed.wrapping_mul(1_000_003).wrapping_add(i as u64);
        let dir = root.join(format!("dev-{i:05}"));
        let agent = Agent::open(cfg.clone(), &dir).map_err(|e| SimError::Agent {
            device: i,
            reason: e.to_string(),
        })?;
        let board = board.clone();
        let run = Run {
            deadline,
            stop: stop_rx.clone(),
            drift: opts.drift_version,
            per_cycle: opts.inferences_per_cycle,
            delay: opts.ramp.mul_f64(ramp_rng.f64()),
        };
        tasks.push(tokio::spawn(async move {
            device(i, agent, cfg, dir, board, run).await
        }));
    }
    let mut timeline = Vec::new();
    tokio::pin!(stop);
    loop {
        if let Ok(b) = board.lock() {
            timeline.push(Sample {
                t_s: start.elapsed().as_secs_f64(),
                versions: census(&b.versions),
            });
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::select! {
            () = &mut stop => break,
            () = tokio::time::sleep(opts.sample_every.min(deadline.saturating_duration_since(Instant::now()))) => {}
        }
    }
    let _ = stop_tx.send(true);
    for t in tasks {
        // Each device stops at the signal or the deadline (plus at most one bounded request).
        let _ = tokio::time::timeout(Duration::from_secs(60), t).await;
    }
    let duration_s = start.elapsed().as_secs_f64();
    let b = board.lock().map_err(|_| SimError::Agent {
        device: 0,
        reason: "a device task panicked".into(),
    })?;
    Ok(SimReport {
        devices: n as u64,
        duration_s,
        final_versions: census(&b.versions),
        checkins: b.counters.checkins,
        checkins_per_s: b.counters.checkins as f64 / duration_s.max(1e-9),
        checkin_latency: LatencySummary::of(&b.counters.checkin_latency),
        timeline,
        installs: b.counters.installs,
        install_failures: b.counters.install_failures,
        selftest_failures: b.counters.selftest_failures,
        rollbacks: b.counters.rollbacks,
        crashes: b.crashes,
        digest_mismatches: b.counters.digest_mismatches,
        http_errors: b.counters.http_errors,
        resumed_downloads: b.counters.resumed_downloads,
        inferences: b.inferences,
        invariant_violations: b.violations.clone(),
    })
}

/// How one simulated device runs.
struct Run {
    deadline: Instant,
    stop: tokio::sync::watch::Receiver<bool>,
    drift: Option<u32>,
    per_cycle: u32,
    /// Pause before the first check-in.
    delay: Duration,
}

impl Run {
    /// Sleeps `d` (cut short by the deadline); `false` when the device must stop.
    async fn sleep(&mut self, d: Duration) -> bool {
        let left = self.deadline.saturating_duration_since(Instant::now());
        tokio::select! {
            _ = self.stop.wait_for(|s| *s) => return false,
            () = tokio::time::sleep(d.min(left)) => {}
        }
        Instant::now() < self.deadline && !*self.stop.borrow()
    }
}

async fn device(
    i: usize,
    mut agent: Agent,
    cfg: AgentConfig,
    dir: PathBuf,
    board: Arc<Mutex<Board>>,
    mut run: Run,
) {
    let mut rng = Rng::new(cfg.seed ^ 0xD1F7);
    let mut had_model = agent.running().is_some();
    let mut failures = 0u32;
    let mut inferences = 0u64;
    let (drift, per_cycle) = (run.drift, run.per_cycle);
    let mut go = run.sleep(run.delay).await;
    while go {
        let r = agent.cycle().await;
        let mut crashed = false;
        let pause = match r {
            Ok(asked) => {
                failures = 0;
                agent.pause(asked)
            }
            Err(e) if e.is_crash() => {
                crashed = true;
                Duration::ZERO
            }
            Err(_) => {
                failures = failures.saturating_add(1);
                agent.backoff(failures)
            }
        };
        if crashed {
            // Restart from the persisted state, as after a power cut.
            let counters = agent.counters.clone();
            drop(agent);
            if let Ok(mut b) = board.lock() {
                add(&mut b.counters, &counters);
                b.crashes += 1;
            }
            match Agent::open(cfg.clone(), &dir) {
                Ok(a) => agent = a,
                Err(e) => {
                    if let Ok(mut b) = board.lock() {
                        b.violations
                            .push(format!("device {i}: cannot restart: {e}"));
                    }
                    return;
                }
            }
        }
        let running = agent.running();
        if had_model && running.is_none() {
            if let Ok(mut b) = board.lock() {
                b.violations
                    .push(format!("device {i}: no verified model after having one"));
            }
        }
        had_model |= running.is_some();
        if let Some(m) = &running {
            let (lo, hi) = m.input_range().unwrap_or((-1.0, 1.0));
            let (lo, hi) = if drift == Some(m.version) {
                let w = (hi - lo).max(1e-3);
                (hi + 0.5 * w, hi + 1.5 * w)
            } else {
                (lo, hi)
            };
            let shared = agent.shared();
            for _ in 0..per_cycle {
                let input = m.make_input(lo, hi, || rng.f64() as f32);
                let _ = shared.infer(&input);
                inferences += 1;
            }
        }
        if let Ok(mut b) = board.lock() {
            if let Some(v) = b.versions.get_mut(i) {
                *v = running.as_ref().map(|m| m.version);
            }
        }
        go = run.sleep(pause).await;
    }
    if let Ok(mut b) = board.lock() {
        add(&mut b.counters, &agent.counters);
        b.inferences += inferences;
    }
}
