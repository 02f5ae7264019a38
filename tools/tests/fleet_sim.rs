//! 1000 simulated devices (the real agent and runtime, kiln_agent::sim) against an in-process
//! `kiln serve` on SQLite, with dropped connections (5 % of requests), corrupted downloads (1 %)
//! and crashes mid-install (1 %): v1 reaches every device; v2 rolls out in waves 5,25,100 and
//! reaches every device; v3 (whose self-test fails on the devices) is aborted in its first wave
//! and every device that took it is back on v2; v4 (whose inputs drift) is stopped by
//! `max_psi 0.25` and its devices are ordered back to v2. No device is ever left without a
//! runnable, verified model (the simulator checks after every cycle of every device).
//!
//! Devices poll every `POLL` (±20 % jitter) and boot over the first `POLL`, and their state
//! directories are on /dev/shm when it exists; the whole scenario takes about 40 s on two cores
//! (some 330 check-ins per second). `KILN_FLEET_SIM_DEVICES=N` runs it with N devices instead.

#[path = "common/fleet.rs"]
mod fleet;

use fleet::{signed, signing_key, ADMIN, ENROLL, MODEL};
use kiln::fleet::api::{ModelRef, RolloutRequest, RolloutState, RolloutStatus};
use kiln::fleet::client::Client;
use kiln::fleet::{RunningServer, ServerConfig};
use kiln_agent::agent::Faults;
use kiln_agent::sim::{simulate_until, SimOptions};
use kiln_device::testkit;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

const DEVICES: usize = 1000;
/// Longest pause between a device's check-ins (the server asks for 60 s; the simulator caps it).
const POLL: Duration = Duration::from_secs(3);
/// Devices a wave's gate waits for (at most the wave's size): 5 % of 1000 is about 50.
const MIN_DEVICES: u32 = 20;

fn devices() -> usize {
    std::env::var("KILN_FLEET_SIM_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(DEVICES)
}

async fn start(dir: &Path) -> RunningServer {
    kiln::fleet::server::start(
        ServerConfig {
            data_dir: dir.to_path_buf(),
            database: None,
            store: None,
            admin_token: ADMIN.into(),
            enroll_token: ENROLL.into(),
            trusted_keys: vec![testkit::public(&signing_key())],
        },
        "127.0.0.1:0",
    )
    .await
    .expect("server starts")
}

fn rollout(version: u32, waves: &[u8], max_psi: f64) -> RolloutRequest {
    RolloutRequest {
        target: ModelRef {
            model: MODEL.into(),
            version,
        },
        cohort: None,
        waves: waves.to_vec(),
        min_devices: MIN_DEVICES,
        max_failure_pct: 20.0,
        max_latency_regression_pct: 1000.0,
        max_psi,
        wave_wait_s: 1,
    }
}

async fn wait_done(admin: &Client, id: i64, limit: Duration) -> RolloutStatus {
    let t0 = Instant::now();
    loop {
        let s = admin.rollout_status(id).await.expect("status");
        if s.state != RolloutState::Running || t0.elapsed() > limit {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Devices per running version, as the server's device list has them.
async fn fleet_versions(admin: &Client) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for d in admin.devices().await.expect("devices") {
        let k = d
            .running
            .map_or_else(|| "none".to_string(), |r| r.version.to_string());
        *m.entry(k).or_insert(0) += 1;
    }
    m
}

/// Waits until `n` devices run `version` (per the server), or `limit` passes.
async fn wait_all_on(
    admin: &Client,
    n: usize,
    version: u32,
    limit: Duration,
) -> BTreeMap<String, u64> {
    let t0 = Instant::now();
    loop {
        let m = fleet_versions(admin).await;
        if m.get(&version.to_string()) == Some(&(n as u64)) || t0.elapsed() > limit {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_simulated_devices_v1_v2_waves_then_failing_v3_and_drifting_v4_are_stopped() {
    let n = devices();
    let t_start = Instant::now();
    let at = || t_start.elapsed().as_secs_f64();
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path()).await;
    let url = server.url();
    let admin = Client::new(&url, ADMIN).expect("client");
    for v in 1..=4 {
        admin.push(signed(v, false)).await.expect("push");
    }
    // The devices' state directories (A/B slots, state.json, each write fsynced) go to a RAM
    // disk when there is one: a thousand devices' fsyncs on a shared disk would stall the two
    // runtime threads that the server and the devices share here, and measure the disk.
    let states = match std::path::Path::new("/dev/shm").is_dir() {
        true => tempfile::tempdir_in("/dev/shm"),
        false => tempfile::tempdir(),
    }
    .expect("state tempdir");
    let opts = SimOptions {
        state_root: Some(states.path().join("devices")),
        trusted_keys: vec![testkit::public(&signing_key())],
        faults: Faults {
            drop: 0.05,
            corrupt: 0.01,
            crash: 0.01,
            ..Faults::default()
        },
        fail_version: Some(3),
        drift_version: Some(4),
        // A cap only: the test stops the devices once it has seen everything.
        duration: Duration::from_secs(600),
        max_poll: POLL,
        ramp: POLL,
        ..SimOptions::default()
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let sim_url = url.clone();
    let sim = tokio::spawn(async move {
        simulate_until(&sim_url, ENROLL, n, opts, async {
            let _ = stop_rx.await;
        })
        .await
    });
    // Every device enrolled (they boot over the first POLL).
    let t0 = Instant::now();
    while admin.devices().await.expect("devices").len() < n && t0.elapsed() < POLL * 10 {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("[{:5.1}s] {n} devices enrolled", at());
    let phase = POLL * 15;

    // v1 everywhere.
    let r1 = admin
        .create_rollout(&rollout(1, &[100], 10.0))
        .await
        .expect("rollout v1");
    let s1 = wait_done(&admin, r1, phase).await;
    assert_eq!(s1.state, RolloutState::Complete, "{s1:?}");
    let m = wait_all_on(&admin, n, 1, phase).await;
    assert_eq!(m.get("1"), Some(&(n as u64)), "v1 everywhere: {m:?}");
    eprintln!("[{:5.1}s] v1 on every device", at());

    // v2 in waves 5, 25, 100.
    let r2 = admin
        .create_rollout(&rollout(2, &[5, 25, 100], 10.0))
        .await
        .expect("rollout v2");
    let s2 = wait_done(&admin, r2, phase * 2).await;
    assert_eq!(s2.state, RolloutState::Complete, "{s2:?}");
    assert_eq!(s2.waves.len(), 3);
    assert!(
        s2.waves.iter().all(|w| w.gate.passed == Some(true)),
        "{s2:?}"
    );
    for w in &s2.waves {
        assert!(
            w.gate.reported >= MIN_DEVICES.min(w.gate.devices),
            "each gate waited for its devices: {s2:?}"
        );
    }
    let m = wait_all_on(&admin, n, 2, phase).await;
    assert_eq!(m.get("2"), Some(&(n as u64)), "v2 everywhere: {m:?}");
    eprintln!(
        "[{:5.1}s] v2 on every device (waves of {:?} devices)",
        at(),
        s2.waves.iter().map(|w| w.gate.devices).collect::<Vec<_>>()
    );

    // v3 fails its self-test on the devices: aborted in its first wave, and every device that
    // took it is back on v2.
    let r3 = admin
        .create_rollout(&rollout(3, &[5, 25, 100], 10.0))
        .await
        .expect("rollout v3");
    let s3 = wait_done(&admin, r3, phase).await;
    assert_eq!(s3.state, RolloutState::Aborted, "{s3:?}");
    assert_eq!(s3.previous, Some(2), "{s3:?}");
    assert_eq!(
        s3.waves[0].gate.passed,
        Some(false),
        "aborted in the first wave: {s3:?}"
    );
    assert!(s3.waves[0].gate.failure_pct > 20.0, "{s3:?}");
    assert!(
        s3.waves[1..].iter().all(|w| w.gate.passed.is_none()),
        "later waves never judged: {s3:?}"
    );
    let m = wait_all_on(&admin, n, 2, phase).await;
    assert_eq!(m.get("2"), Some(&(n as u64)), "back on v2 after v3: {m:?}");
    let s3 = admin.rollout_status(r3).await.expect("status v3");
    assert_eq!(s3.state, RolloutState::Aborted);
    assert_eq!(s3.devices.get("3"), None, "{s3:?}");
    assert_eq!(s3.devices.get("2"), Some(&(n as u64)), "{s3:?}");
    eprintln!("[{:5.1}s] v3 aborted, v2 on every device", at());

    // v4's inputs drift: stopped by max_psi 0.25, and its devices are ordered back to v2.
    let r4 = admin
        .create_rollout(&rollout(4, &[5, 25, 100], 0.25))
        .await
        .expect("rollout v4");
    let s4 = wait_done(&admin, r4, phase).await;
    assert_eq!(s4.state, RolloutState::Aborted, "{s4:?}");
    let reason = s4.reason.clone().unwrap_or_default();
    assert!(reason.to_lowercase().contains("psi"), "reason: {reason}");
    assert!(
        s4.waves
            .iter()
            .any(|w| w.gate.passed == Some(false) && w.gate.psi.is_some_and(|p| p > 0.25)),
        "{s4:?}"
    );
    let m = wait_all_on(&admin, n, 2, phase).await;
    assert_eq!(m.get("2"), Some(&(n as u64)), "back on v2 after v4: {m:?}");
    eprintln!("[{:5.1}s] v4 stopped by PSI, v2 on every device", at());

    let _ = stop_tx.send(());
    let report = sim.await.expect("sim task").expect("simulate");
    eprintln!(
        "[{:5.1}s] {} check-ins ({:.0}/s), round trip p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        at(),
        report.checkins,
        report.checkins_per_s,
        report.checkin_latency.p50_ms,
        report.checkin_latency.p99_ms,
        report.checkin_latency.max_ms
    );
    eprintln!(
        "installs {} selftest_failures {} rollbacks {} crashes {} digest_mismatches {} http_errors {} resumed {}",
        report.installs,
        report.selftest_failures,
        report.rollbacks,
        report.crashes,
        report.digest_mismatches,
        report.http_errors,
        report.resumed_downloads
    );
    assert!(
        report.invariant_violations.is_empty(),
        "{:?}",
        report.invariant_violations
    );
    assert!(
        report
            .timeline
            .iter()
            .skip_while(|s| s.versions.contains_key("none"))
            .all(|s| !s.versions.contains_key("none")),
        "a device lost its model: {:?}",
        report.timeline
    );
    assert!(report.selftest_failures > 0, "{report:?}");
    assert!(report.rollbacks > 0, "{report:?}");
    if n >= 500 {
        // About 2500 installs: some 25 crashes and 25 corrupted downloads are expected.
        assert!(report.crashes > 0, "crashes were injected: {report:?}");
        assert!(
            report.digest_mismatches > 0,
            "corruption was injected: {report:?}"
        );
    }
    assert_eq!(
        report.final_versions.get("2"),
        Some(&(n as u64)),
        "{report:?}"
    );
    server.stop().await.expect("stop");
}
