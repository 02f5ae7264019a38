//! ~50 simulated devices (the real agent and runtime, kiln_agent::sim) against an in-process
//! `kiln serve`, with dropped connections, corrupted downloads and crashes mid-install: v1 reaches
//! every device, v2 rolls out in waves 5,25,100 and reaches every device; v3 (whose self-test
//! fails on the devices) is aborted in its first wave and every device that took it is back on
//! v2; v4 (whose inputs drift) is stopped by `max_psi 0.25` and its devices are ordered back to
//! v2. No device is ever left without a verified model.

use kiln::artifact::{write_artifact, HeaderFields};
use kiln::fleet::api::{ModelRef, RolloutRequest, RolloutState, RolloutStatus};
use kiln::fleet::client::Client;
use kiln::fleet::{RunningServer, ServerConfig};
use kiln_agent::agent::Faults;
use kiln_agent::sim::{simulate, SimOptions};
use kiln_device::testkit::{self, Spec};
use kiln_runtime::format::{Container, SectionKind};
use kiln_runtime::sections::{BaselineHead, BaselineHistogram, BaselineTensor, Manifest};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

const ADMIN: &str = "admin-token-0123456789";
const ENROLL: &str = "enroll-token-0123456789";
const MODEL: &str = "kws";
const BASE: [u32; 4] = [250, 250, 250, 250];
const DEVICES: usize = 50;

fn signing_key() -> ed25519_dalek::SigningKey {
    testkit::test_key(7)
}

/// A testkit artifact with a MANIFEST (name `kws`) and a BASELINE (input 0 and output 0),
/// unsigned. Every version carries security counter 1: a device never accepts a counter below
/// the one it confirmed (anti-rollback), so a release that may be rolled back must not raise it.
fn unsigned(version: u32, bad_selftest: bool) -> Vec<u8> {
    let spec = Spec {
        version,
        counter: 1,
        target: String::new(),
        out_features: 4,
        bad_selftest,
    };
    let plain = testkit::build(&spec);
    let c = Container::parse(&plain).expect("testkit artifact parses");
    let lineage = format!("{{\"source_sha256\":\"test\",\"version\":{version}}}");
    let manifest = postcard::to_allocvec(&Manifest {
        name: MODEL,
        json: &lineage,
    })
    .expect("manifest");
    let edges: Vec<u8> = [-1.0f32, -0.5, 0.0, 0.5, 1.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let counts: Vec<u8> = BASE.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut baseline = postcard::to_allocvec(&BaselineHead { count: 2 }).expect("baseline");
    for tensor in [BaselineTensor::Input(0), BaselineTensor::Output(0)] {
        baseline.extend(
            postcard::to_allocvec(&BaselineHistogram {
                tensor,
                edges: &edges,
                counts: &counts,
            })
            .expect("histogram"),
        );
    }
    let mut sections: Vec<(SectionKind, &[u8])> = Vec::new();
    for kind in [
        SectionKind::Graph,
        SectionKind::Weights,
        SectionKind::SelfTest,
    ] {
        sections.push((kind, c.section(kind).expect("testkit section")));
    }
    sections.push((SectionKind::Manifest, &manifest));
    sections.push((SectionKind::Baseline, &baseline));
    write_artifact(
        HeaderFields {
            model_version: version,
            security_counter: 1,
            arena_bytes: c.header.arena_bytes,
        },
        &sections,
    )
    .expect("write artifact")
}

fn signed(version: u32, bad_selftest: bool) -> Vec<u8> {
    testkit::sign(&unsigned(version, bad_selftest), &[&signing_key()])
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
        min_devices: 1,
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

/// Waits until every enrolled device runs `version` (per the server), or `limit` passes.
async fn wait_all_on(admin: &Client, version: u32, limit: Duration) -> BTreeMap<String, u64> {
    let t0 = Instant::now();
    loop {
        let m = fleet_versions(admin).await;
        if m.get(&version.to_string()) == Some(&(DEVICES as u64)) || t0.elapsed() > limit {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_simulated_devices_v1_v2_waves_then_failing_v3_and_drifting_v4_are_stopped() {
    let t_start = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path()).await;
    let url = server.url();
    let admin = Client::new(&url, ADMIN).expect("client");
    for v in 1..=4 {
        admin.push(signed(v, false)).await.expect("push");
    }
    let opts = SimOptions {
        trusted_keys: vec![testkit::public(&signing_key())],
        faults: Faults {
            drop: 0.05,
            corrupt: 0.01,
            crash: 0.05,
            ..Faults::default()
        },
        fail_version: Some(3),
        drift_version: Some(4),
        duration: Duration::from_secs(50),
        max_poll: Duration::from_secs(1),
        ..SimOptions::default()
    };
    let sim_url = url.clone();
    let sim = tokio::spawn(async move { simulate(&sim_url, ENROLL, DEVICES, opts).await });
    tokio::time::sleep(Duration::from_secs(3)).await;

    // v1 everywhere.
    let r1 = admin
        .create_rollout(&rollout(1, &[100], 10.0))
        .await
        .expect("rollout v1");
    let s1 = wait_done(&admin, r1, Duration::from_secs(20)).await;
    assert_eq!(s1.state, RolloutState::Complete, "{s1:?}");
    let m = wait_all_on(&admin, 1, Duration::from_secs(15)).await;
    assert_eq!(m.get("1"), Some(&(DEVICES as u64)), "v1 everywhere: {m:?}");
    eprintln!(
        "[{:5.1}s] v1 on every device",
        t_start.elapsed().as_secs_f64()
    );

    // v2 in waves 5, 25, 100.
    let r2 = admin
        .create_rollout(&rollout(2, &[5, 25, 100], 10.0))
        .await
        .expect("rollout v2");
    let s2 = wait_done(&admin, r2, Duration::from_secs(30)).await;
    assert_eq!(s2.state, RolloutState::Complete, "{s2:?}");
    assert_eq!(s2.waves.len(), 3);
    assert!(
        s2.waves.iter().all(|w| w.gate.passed == Some(true)),
        "{s2:?}"
    );
    let m = wait_all_on(&admin, 2, Duration::from_secs(15)).await;
    assert_eq!(m.get("2"), Some(&(DEVICES as u64)), "v2 everywhere: {m:?}");
    eprintln!(
        "[{:5.1}s] v2 on every device",
        t_start.elapsed().as_secs_f64()
    );

    // v3 fails its self-test on the devices: aborted in its first wave (20 % of 50 devices, so
    // the first wave is never empty), and every device that took it is back on v2.
    let r3 = admin
        .create_rollout(&rollout(3, &[20, 60, 100], 10.0))
        .await
        .expect("rollout v3");
    let s3 = wait_done(&admin, r3, Duration::from_secs(20)).await;
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
    let m = wait_all_on(&admin, 2, Duration::from_secs(15)).await;
    assert_eq!(
        m.get("2"),
        Some(&(DEVICES as u64)),
        "back on v2 after v3: {m:?}"
    );
    let s3 = admin.rollout_status(r3).await.expect("status v3");
    assert_eq!(s3.state, RolloutState::Aborted);
    assert_eq!(s3.devices.get("3"), None, "{s3:?}");
    assert_eq!(s3.devices.get("2"), Some(&(DEVICES as u64)), "{s3:?}");
    eprintln!(
        "[{:5.1}s] v3 aborted, v2 on every device",
        t_start.elapsed().as_secs_f64()
    );

    // v4's inputs drift: stopped by max_psi 0.25, and its devices are ordered back to v2.
    let r4 = admin
        .create_rollout(&rollout(4, &[20, 60, 100], 0.25))
        .await
        .expect("rollout v4");
    let s4 = wait_done(&admin, r4, Duration::from_secs(20)).await;
    assert_eq!(s4.state, RolloutState::Aborted, "{s4:?}");
    let reason = s4.reason.clone().unwrap_or_default();
    assert!(reason.to_lowercase().contains("psi"), "reason: {reason}");
    assert!(
        s4.waves
            .iter()
            .any(|w| w.gate.passed == Some(false) && w.gate.psi.is_some_and(|p| p > 0.25)),
        "{s4:?}"
    );
    let m = wait_all_on(&admin, 2, Duration::from_secs(15)).await;
    assert_eq!(
        m.get("2"),
        Some(&(DEVICES as u64)),
        "back on v2 after v4: {m:?}"
    );
    eprintln!(
        "[{:5.1}s] v4 stopped by PSI, v2 on every device",
        t_start.elapsed().as_secs_f64()
    );

    let report = sim.await.expect("sim task").expect("simulate");
    eprintln!(
        "[{:5.1}s] {}",
        t_start.elapsed().as_secs_f64(),
        serde_json::to_string(&report.final_versions).unwrap_or_default()
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
    assert_eq!(
        report.final_versions.get("2"),
        Some(&(DEVICES as u64)),
        "{report:?}"
    );
    server.stop().await.expect("stop");
}
