//! The fleet part of `kiln demo`: the demo's int8 artifact is signed and pushed to an embedded
//! `kiln serve`, and a fleet of simulated devices (the real agent and runtime, in this process)
//! takes it: v1 everywhere, v2 in waves, then a v3 whose self-test fails on the devices is
//! stopped in its first wave and every device that took it goes back to v2 by itself or when
//! ordered.

use crate::fleet::api::{ModelRef, RolloutRequest, RolloutState, RolloutStatus};
use crate::fleet::client::Client;
use crate::fleet::server::{start, ServerConfig};
use crate::signing::{generate_key, sign_artifact, write_key_pair};
use anyhow::{bail, Context, Result};
use kiln_agent::agent::Faults;
use kiln_agent::sim::{simulate, SimOptions};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// What the fleet did.
#[derive(Clone, Debug, Serialize)]
pub struct FleetReport {
    /// Simulated devices.
    pub devices: usize,
    /// Each rollout: version, waves, final state, gate figures.
    pub rollouts: Vec<RolloutStatus>,
    /// Devices per running version at the end (the server's view).
    pub final_versions: BTreeMap<String, u64>,
    /// Each version's registry stage at the end (rollouts move them: complete → production,
    /// the previous production version → archived, aborted → rejected).
    pub stages: BTreeMap<u32, String>,
    /// Confirmed installs, failed self-tests and ordered rollbacks on the devices.
    pub installs: u64,
    /// Self-tests that failed on devices (each reverted to the previous model).
    pub selftest_failures: u64,
    /// Rollbacks the server ordered and the devices installed.
    pub rollbacks: u64,
    /// Injected faults the devices got through: crashes mid-install, bad download bytes.
    pub crashes: u64,
    /// Downloads whose SHA-256 did not match (re-fetched).
    pub digest_mismatches: u64,
    /// "A device that had a verified model always has one": breaches (empty).
    pub invariant_violations: Vec<String>,
    /// Seconds.
    pub seconds: f64,
}

const ADMIN: &str = "demo-admin-token";
const ENROLL: &str = "demo-enroll-token";

/// Devices in the demo fleet.
pub const DEVICES: usize = 24;

/// Runs the fleet scenario with `int8` (an unsigned artifact) in `out/fleet`.
///
/// # Errors
/// The server cannot start, or the scenario does not end as it should.
pub fn run(
    int8: &[u8],
    model: &str,
    out: &Path,
    mut progress: impl FnMut(&str),
) -> Result<FleetReport> {
    let started = Instant::now();
    let dir = out.join("fleet");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let key = generate_key()?;
    write_key_pair(&out.join("demo-signing"), &key, true)?;
    let public = key.verifying_key().to_bytes();
    // One security counter for every version: a device never goes below the counter it
    // confirmed, so a release that may be rolled back must not raise it.
    let versions: Vec<Vec<u8>> = (1..=3)
        .map(|v| sign_artifact(int8, &key, v, 1, None).map_err(anyhow::Error::from))
        .collect::<Result<_>>()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let server = start(
            ServerConfig {
                data_dir: dir.join("server"),
                database: None,
                store: None,
                admin_token: ADMIN.into(),
                enroll_token: ENROLL.into(),
                trusted_keys: vec![public],
            },
            "127.0.0.1:0",
        )
        .await
        .context("cannot start the embedded fleet server")?;
        let url = server.url();
        let admin = Client::new(&url, ADMIN)?;
        for v in versions {
            admin.push(v).await.context("push to the demo fleet")?;
        }
        let opts = SimOptions {
            trusted_keys: vec![public],
            faults: Faults {
                drop: 0.02,
                corrupt: 0.01,
                crash: 0.02,
                ..Faults::default()
            },
            fail_version: Some(3),
            duration: Duration::from_secs(28),
            max_poll: Duration::from_millis(700),
            min_poll: Duration::from_millis(200),
            state_root: Some(dir.join("devices")),
            ..SimOptions::default()
        };
        let sim_url = url.clone();
        let sim = tokio::spawn(async move { simulate(&sim_url, ENROLL, DEVICES, opts).await });
        let mut rollouts = Vec::new();
        progress("fleet: v1 to every device");
        rollouts.push(roll(&admin, model, 1, &[100], Duration::from_secs(12)).await?);
        wait_all_on(&admin, 1, Duration::from_secs(8)).await?;
        progress("fleet: v2 in waves 25, 100");
        rollouts.push(roll(&admin, model, 2, &[25, 100], Duration::from_secs(12)).await?);
        wait_all_on(&admin, 2, Duration::from_secs(8)).await?;
        progress("fleet: v3, whose self-test fails on the devices");
        rollouts.push(roll(&admin, model, 3, &[25, 100], Duration::from_secs(12)).await?);
        let final_versions = wait_all_on(&admin, 2, Duration::from_secs(8)).await?;
        let stages = admin
            .models()
            .await?
            .into_iter()
            .map(|m| (m.model.version, m.stage))
            .collect();
        progress("fleet: waiting for the simulated devices to stop");
        let report = sim
            .await
            .context("the device simulation stopped")?
            .context("the device simulation failed")?;
        server.stop().await?;
        let states: Vec<RolloutState> = rollouts.iter().map(|r| r.state).collect();
        if states
            != [
                RolloutState::Complete,
                RolloutState::Complete,
                RolloutState::Aborted,
            ]
        {
            bail!("the demo fleet's rollouts ended {states:?}, not complete, complete, aborted");
        }
        Ok(FleetReport {
            devices: DEVICES,
            rollouts,
            final_versions,
            stages,
            installs: report.installs,
            selftest_failures: report.selftest_failures,
            rollbacks: report.rollbacks,
            crashes: report.crashes,
            digest_mismatches: report.digest_mismatches,
            invariant_violations: report.invariant_violations,
            seconds: started.elapsed().as_secs_f64(),
        })
    })
}

/// Starts a rollout of `version` and waits until it is no longer running.
async fn roll(
    admin: &Client,
    model: &str,
    version: u32,
    waves: &[u8],
    limit: Duration,
) -> Result<RolloutStatus> {
    let id = admin
        .create_rollout(&RolloutRequest {
            target: ModelRef {
                model: model.into(),
                version,
            },
            cohort: None,
            waves: waves.to_vec(),
            min_devices: 1,
            max_failure_pct: 20.0,
            max_latency_regression_pct: 1000.0,
            // The simulated devices feed uniform noise, not the demo's images: no drift gate.
            max_psi: 100.0,
            wave_wait_s: 1,
        })
        .await
        .with_context(|| format!("cannot start the rollout of v{version}"))?;
    let t0 = Instant::now();
    loop {
        let s = admin.rollout_status(id).await?;
        if s.state != RolloutState::Running {
            return Ok(s);
        }
        if t0.elapsed() > limit {
            bail!(
                "the rollout of v{version} is still running after {} s",
                limit.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until every device runs `version` per the server (or `limit` passes); returns the
/// devices per version.
async fn wait_all_on(
    admin: &Client,
    version: u32,
    limit: Duration,
) -> Result<BTreeMap<String, u64>> {
    let t0 = Instant::now();
    loop {
        let mut m = BTreeMap::new();
        for d in admin.devices().await? {
            let k = d
                .running
                .map_or_else(|| "none".to_string(), |r| r.version.to_string());
            *m.entry(k).or_insert(0u64) += 1;
        }
        if m.get(&version.to_string()) == Some(&(DEVICES as u64)) || t0.elapsed() > limit {
            return Ok(m);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The fleet part of the demo's tables.
pub fn render(r: &FleetReport) -> String {
    let mut s = format!(
        "\nfleet: {} simulated devices (the real agent and runtime; dropped connections, corrupted downloads and crashes injected), embedded kiln serve\n",
        r.devices
    );
    s += &format!(
        "{:>8}  {:>7}  {:>9}  {:<10} {}\n",
        "rollout", "version", "waves", "state", "gate of each wave"
    );
    for ro in &r.rollouts {
        let waves: Vec<String> = ro.waves.iter().map(|w| w.pct.to_string()).collect();
        let gates: Vec<String> = ro
            .waves
            .iter()
            .map(|w| {
                let verdict = match w.gate.passed {
                    Some(true) => "passed",
                    Some(false) => "FAILED",
                    None => "not judged",
                };
                format!(
                    "{}%: {verdict} ({} of {} failed)",
                    w.pct, w.gate.failures, w.gate.devices
                )
            })
            .collect();
        s += &format!(
            "{:>8}  {:>7}  {:>9}  {:<10} {}\n",
            ro.id,
            format!("v{}", ro.target.version),
            waves.join(","),
            format!("{:?}", ro.state).to_lowercase(),
            gates.join("; ")
        );
        if let Some(reason) = &ro.reason {
            s += &format!("{:>30}{reason}\n", "");
        }
    }
    let now: Vec<String> = r
        .final_versions
        .iter()
        .map(|(v, n)| format!("v{v}: {n}"))
        .collect();
    let stages: Vec<String> = r.stages.iter().map(|(v, s)| format!("v{v} {s}")).collect();
    s += &format!("registry: {}\n", stages.join(", "));
    s += &format!(
        "devices now: {} · installs {} · self-test failures reverted {} · ordered rollbacks {} · crashes survived {} · corrupted downloads refetched {} · devices ever without a verified model: {}\n",
        now.join(", "),
        r.installs,
        r.selftest_failures,
        r.rollbacks,
        r.crashes,
        r.digest_mismatches,
        r.invariant_violations.len()
    );
    s
}
