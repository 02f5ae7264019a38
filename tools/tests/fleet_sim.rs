//! ~50 simulated devices (the real agent and runtime, kiln_agent::sim) against an in-process
//! `kiln serve`, with dropped connections, corrupted downloads and crashes mid-install: v1 reaches
//! every device, v2 rolls out in waves 5,25,100 and reaches every device; no device is ever left
//! without a verified model.

use kiln::artifact::{write_artifact, HeaderFields};
use kiln::fleet::api::{ModelRef, RolloutRequest, RolloutState};
use kiln::fleet::client::Client;
use kiln::fleet::{RunningServer, ServerConfig};
use kiln_agent::agent::Faults;
use kiln_agent::sim::{simulate, SimOptions};
use kiln_device::testkit::{self, Spec};
use kiln_runtime::format::{Container, SectionKind};
use kiln_runtime::sections::{BaselineHead, BaselineHistogram, BaselineTensor, Manifest};
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
/// unsigned.
fn unsigned(version: u32, bad_selftest: bool) -> Vec<u8> {
    let spec = Spec {
        version,
        counter: version,
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
            security_counter: version,
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

fn rollout(version: u32, waves: &[u8]) -> RolloutRequest {
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
        max_psi: 10.0,
        wave_wait_s: 1,
    }
}

async fn wait_complete(admin: &Client, id: i64, limit: Duration) -> RolloutState {
    let t0 = Instant::now();
    loop {
        let s = admin.rollout_status(id).await.expect("status");
        if s.state != RolloutState::Running || t0.elapsed() > limit {
            return s.state;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_simulated_devices_take_v1_then_v2_in_waves_with_faults() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path()).await;
    let url = server.url();
    let admin = Client::new(&url, ADMIN).expect("client");
    admin.push(signed(1, false)).await.expect("push v1");
    admin.push(signed(2, false)).await.expect("push v2");
    let opts = SimOptions {
        trusted_keys: vec![testkit::public(&signing_key())],
        faults: Faults {
            drop: 0.05,
            corrupt: 0.01,
            crash: 0.05,
            ..Faults::default()
        },
        duration: Duration::from_secs(50),
        max_poll: Duration::from_secs(1),
        ..SimOptions::default()
    };
    let sim_url = url.clone();
    let sim = tokio::spawn(async move { simulate(&sim_url, ENROLL, DEVICES, opts).await });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let r1 = admin
        .create_rollout(&rollout(1, &[100]))
        .await
        .expect("rollout v1");
    assert_eq!(
        wait_complete(&admin, r1, Duration::from_secs(20)).await,
        RolloutState::Complete
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let r2 = admin
        .create_rollout(&rollout(2, &[5, 25, 100]))
        .await
        .expect("rollout v2");
    assert_eq!(
        wait_complete(&admin, r2, Duration::from_secs(30)).await,
        RolloutState::Complete
    );
    let report = sim.await.expect("sim task").expect("simulate");
    eprintln!(
        "{}",
        serde_json::to_string_pretty(&report.final_versions).unwrap_or_default()
    );
    assert!(
        report.invariant_violations.is_empty(),
        "{:?}",
        report.invariant_violations
    );
    assert_eq!(
        report.final_versions.get("2"),
        Some(&(DEVICES as u64)),
        "{report:?}"
    );
    server.stop().await.expect("stop");
}
