//! The fleet on a real PostgreSQL: a private cluster on loopback (scripts/pg-test-cluster.sh),
//! two `kiln serve` processes sharing it and one artifact folder, and simulated devices (the real
//! agent, kiln_agent::sim, with dropped connections, corrupted downloads and crashes) split between
//! the two servers: v1 reaches every device, v2 rolls out in waves 5,25,100 to Complete, v3 (its
//! self-test fails on the devices) is aborted in its first wave and v4 (drifting inputs) by its PSI
//! gate, both with every device back on v2; both servers report the same rollouts and devices.
//!
//! 1000 devices, as in fleet_sim (the scenario): 500 per server, polling every 3 s
//! (±20 %), drop=0.05, corrupt=0.01, crash=0.01. The whole test takes 45–55 s on two cores
//! (PostgreSQL, two debug-built servers and the devices sharing them, some 300 check-ins per
//! second): the full fleet fits well within the ~3 minutes this test may take, so it
//! runs all of it rather than a sample (concurrent check-ins on both servers then contend for
//! the per-wave aggregate rows, which a small fleet barely does).
//!
//! Skipped, with a message, when no PostgreSQL binaries are found under
//! /usr/lib/postgresql/*/bin (scripts/test.sh installs them: apt `postgresql`).

use kiln::artifact::{write_artifact, HeaderFields};
use kiln::fleet::api::{ModelRef, RolloutRequest, RolloutState, RolloutStatus};
use kiln::fleet::client::Client;
use kiln_agent::agent::Faults;
use kiln_agent::sim::{simulate_until, SimOptions};
use kiln_device::testkit::{self, Spec};
use kiln_runtime::format::{Container, SectionKind};
use kiln_runtime::sections::{BaselineHead, BaselineHistogram, BaselineTensor, Manifest};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ADMIN: &str = "admin-token-0123456789";
const ENROLL: &str = "enroll-token-0123456789";
const MODEL: &str = "kws";
const BASE: [u32; 4] = [250, 250, 250, 250];
/// Devices per server.
const PER_SERVER: usize = 500;
const DEVICES: usize = 2 * PER_SERVER;
/// Longest pause between a device's check-ins (±20 % jitter).
const POLL: Duration = Duration::from_secs(3);
/// Devices a wave's gate waits for (at most the wave's size): 5 % of 1000 is about 50.
const MIN_DEVICES: u32 = 20;

fn signing_key() -> ed25519_dalek::SigningKey {
    testkit::test_key(7)
}

/// A testkit artifact with a MANIFEST (name `kws`) and a BASELINE, signed by the trusted key.
/// Every version carries security counter 1, so the ordered rollbacks to v2 are allowed (a
/// device never accepts a counter below one it has confirmed).
fn signed(version: u32) -> Vec<u8> {
    let spec = Spec {
        version,
        counter: 1,
        target: String::new(),
        out_features: 4,
        bad_selftest: false,
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
    let plain = write_artifact(
        HeaderFields {
            model_version: version,
            security_counter: 1,
            arena_bytes: c.header.arena_bytes,
        },
        &sections,
    )
    .expect("write artifact");
    testkit::sign(&plain, &[&signing_key()])
}

/// Whether PostgreSQL's server binaries are installed (Debian layout).
fn postgres_installed() -> bool {
    std::fs::read_dir("/usr/lib/postgresql")
        .map(|versions| {
            versions.flatten().any(|v| {
                let bin = v.path().join("bin");
                bin.join("initdb").is_file() && bin.join("pg_ctl").is_file()
            })
        })
        .unwrap_or(false)
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/pg-test-cluster.sh")
}

/// A free loopback port (bound, read, released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The private cluster; stopped (and its folder deleted) when dropped, also on panic.
struct Cluster {
    dir: PathBuf,
    url: String,
}

impl Cluster {
    fn start(dir: &Path) -> Cluster {
        let port = free_port();
        let out = Command::new("bash")
            .arg(script())
            .arg("start")
            .arg(dir)
            .arg(port.to_string())
            .output()
            .expect("run scripts/pg-test-cluster.sh");
        assert!(
            out.status.success(),
            "pg-test-cluster.sh start failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let url = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(url.starts_with("postgres://"), "cluster URL: {url}");
        Cluster {
            dir: dir.to_path_buf(),
            url,
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

/// A `kiln serve` process; killed when dropped, also on panic.
struct Server {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Server {
    fn start(work: &Path, name: &str, database: &str, store: &Path, key: &Path) -> Server {
        let port = free_port();
        let data = work.join(name);
        std::fs::create_dir_all(&data).expect("data dir");
        let log = work.join(format!("{name}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("serve")
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--database")
            .arg(database)
            .arg("--store")
            .arg(format!("file://{}", store.display()))
            .arg("--admin-token")
            .arg(ADMIN)
            .arg("--enroll-token")
            .arg(ENROLL)
            .arg("--trusted-key")
            .arg(key)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).expect("log"))
            .stderr(
                std::fs::File::options()
                    .append(true)
                    .open(&log)
                    .expect("log"),
            )
            .spawn()
            .expect("spawn kiln serve");
        Server {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the server answers HTTP (any status: /metrics wants the admin token).
    async fn ready(&mut self) {
        let http = reqwest::Client::new();
        let t0 = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("kiln serve exited with {status}:\n{}", self.log());
            }
            if http
                .get(format!("{}/metrics", self.url))
                .send()
                .await
                .is_ok()
            {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "kiln serve did not answer within 60 s:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

/// Polls a rollout, alternating between the servers, until it leaves `running`.
async fn wait_done(admins: &[Client; 2], id: i64, limit: Duration) -> RolloutStatus {
    let t0 = Instant::now();
    let mut i = 0;
    loop {
        let s = admins[i % 2].rollout_status(id).await.expect("status");
        i += 1;
        if s.state != RolloutState::Running || t0.elapsed() > limit {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Devices per running version, as a server's device list has them.
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

/// Waits until every device runs `version` as both servers see it, or `limit` passes.
async fn wait_all_on(admins: &[Client; 2], version: u32, limit: Duration) -> BTreeMap<String, u64> {
    let t0 = Instant::now();
    let all = Some(&(DEVICES as u64));
    loop {
        let a = fleet_versions(&admins[0]).await;
        let b = fleet_versions(&admins[1]).await;
        let key = version.to_string();
        if (a.get(&key) == all && b.get(&key) == all) || t0.elapsed() > limit {
            assert_eq!(a, b, "both servers list the same devices");
            return a;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The rollout as each server reports it: the same, from the one database.
async fn same_status(admins: &[Client; 2], id: i64) -> RolloutStatus {
    let a = admins[0].rollout_status(id).await.expect("status a");
    let b = admins[1].rollout_status(id).await.expect("status b");
    assert_eq!(
        serde_json::to_value(&a).expect("json"),
        serde_json::to_value(&b).expect("json"),
        "both servers report the same status"
    );
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_on_postgres_v1_v2_waves_then_failing_v3_and_drifting_v4_are_stopped() {
    if !postgres_installed() {
        eprintln!(
            "skipped: no PostgreSQL binaries under /usr/lib/postgresql/*/bin (apt-get install postgresql; scripts/test.sh installs it)"
        );
        return;
    }
    let t0 = Instant::now();
    let work = tempfile::tempdir().expect("tempdir");
    let cluster = Cluster::start(&work.path().join("pg"));
    eprintln!(
        "[{:5.1}s] postgres at {}",
        t0.elapsed().as_secs_f64(),
        cluster.url
    );

    let key = work.path().join("trusted.pub");
    std::fs::write(
        &key,
        kiln::signing::public_key_text(&testkit::public(&signing_key())),
    )
    .expect("write key");
    let store = work.path().join("artifacts");
    std::fs::create_dir_all(&store).expect("store");
    // Both start at once: the migrations must cope with a concurrent start.
    let mut a = Server::start(work.path(), "a", &cluster.url, &store, &key);
    let mut b = Server::start(work.path(), "b", &cluster.url, &store, &key);
    a.ready().await;
    b.ready().await;
    let admins = [
        Client::new(&a.url, ADMIN).expect("client"),
        Client::new(&b.url, ADMIN).expect("client"),
    ];
    // Pushed to one server or the other: one registry.
    for v in 1..=4 {
        admins[v as usize % 2].push(signed(v)).await.expect("push");
    }
    let models = admins[0].models().await.expect("models");
    assert_eq!(models.len(), 4, "{models:?}");
    eprintln!(
        "[{:5.1}s] two servers up, v1..v4 pushed",
        t0.elapsed().as_secs_f64()
    );

    // Half the devices check in with one server, half with the other. Their state directories
    // (each write fsynced) go to a RAM disk when there is one, as in fleet_sim.
    let states = match Path::new("/dev/shm").is_dir() {
        true => tempfile::tempdir_in("/dev/shm"),
        false => tempfile::tempdir(),
    }
    .expect("state tempdir");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let sim = |url: String, seed: u64| {
        let opts = SimOptions {
            state_root: Some(states.path().join(format!("devices-{seed}"))),
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
            seed,
            ..SimOptions::default()
        };
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            simulate_until(&url, ENROLL, PER_SERVER, opts, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
        })
    };
    let sim_a = sim(a.url.clone(), 1);
    let sim_b = sim(b.url.clone(), 2);
    let t_enroll = Instant::now();
    while admins[0].devices().await.expect("devices").len() < DEVICES
        && t_enroll.elapsed() < POLL * 10
    {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        admins[1].devices().await.expect("devices").len(),
        DEVICES,
        "both servers' devices are in the one database"
    );
    eprintln!(
        "[{:5.1}s] {DEVICES} devices enrolled",
        t0.elapsed().as_secs_f64()
    );
    let phase = POLL * 15;

    // v1 everywhere.
    let r1 = admins[1]
        .create_rollout(&rollout(1, &[100], 10.0))
        .await
        .expect("rollout v1");
    let s1 = wait_done(&admins, r1, phase).await;
    assert_eq!(s1.state, RolloutState::Complete, "{s1:?}");
    let m = wait_all_on(&admins, 1, phase).await;
    assert_eq!(m.get("1"), Some(&(DEVICES as u64)), "v1 everywhere: {m:?}");
    eprintln!("[{:5.1}s] v1 on every device", t0.elapsed().as_secs_f64());

    // v2 in waves 5, 25, 100.
    let r2 = admins[0]
        .create_rollout(&rollout(2, &[5, 25, 100], 10.0))
        .await
        .expect("rollout v2");
    let s2 = wait_done(&admins, r2, phase * 2).await;
    assert_eq!(
        s2.state,
        RolloutState::Complete,
        "{s2:?}\nserver a:\n{}\nserver b:\n{}",
        a.log(),
        b.log()
    );
    assert_eq!(s2.waves.len(), 3, "{s2:?}");
    assert!(
        s2.waves.iter().all(|w| w.gate.passed == Some(true)),
        "{s2:?}"
    );
    let m = wait_all_on(&admins, 2, phase).await;
    assert_eq!(m.get("2"), Some(&(DEVICES as u64)), "v2 everywhere: {m:?}");
    let s2 = same_status(&admins, r2).await;
    assert_eq!(s2.state, RolloutState::Complete);
    assert_eq!(s2.devices.get("2"), Some(&(DEVICES as u64)), "{s2:?}");
    eprintln!("[{:5.1}s] v2 on every device", t0.elapsed().as_secs_f64());

    // v3 fails its self-test on the devices: aborted in its first wave, and every device that
    // took it is back on v2.
    let r3 = admins[1]
        .create_rollout(&rollout(3, &[5, 25, 100], 10.0))
        .await
        .expect("rollout v3");
    let s3 = wait_done(&admins, r3, phase).await;
    assert_eq!(s3.state, RolloutState::Aborted, "{s3:?}");
    assert_eq!(s3.previous, Some(2), "{s3:?}");
    assert_eq!(
        s3.waves[0].gate.passed,
        Some(false),
        "aborted in the first wave: {s3:?}"
    );
    let m = wait_all_on(&admins, 2, phase).await;
    assert_eq!(
        m.get("2"),
        Some(&(DEVICES as u64)),
        "back on v2 after v3: {m:?}"
    );
    let s3 = same_status(&admins, r3).await;
    assert_eq!(s3.state, RolloutState::Aborted);
    assert_eq!(s3.devices.get("3"), None, "{s3:?}");
    eprintln!(
        "[{:5.1}s] v3 aborted, v2 on every device",
        t0.elapsed().as_secs_f64()
    );

    // v4's inputs drift: stopped by max_psi 0.25, and its devices are ordered back to v2.
    let r4 = admins[0]
        .create_rollout(&rollout(4, &[5, 25, 100], 0.25))
        .await
        .expect("rollout v4");
    let s4 = wait_done(&admins, r4, phase).await;
    assert_eq!(s4.state, RolloutState::Aborted, "{s4:?}");
    let reason = s4.reason.clone().unwrap_or_default();
    assert!(reason.to_lowercase().contains("psi"), "reason: {reason}");
    let m = wait_all_on(&admins, 2, phase).await;
    if m.get("2") != Some(&(DEVICES as u64)) {
        let s4 = admins[0].rollout_status(r4).await.expect("status v4");
        let devices = admins[0].devices().await.expect("devices");
        panic!("back on v2 after v4: {m:?}\n{s4:?}\n{devices:#?}");
    }
    same_status(&admins, r4).await;
    eprintln!(
        "[{:5.1}s] v4 stopped by PSI, v2 on every device",
        t0.elapsed().as_secs_f64()
    );

    let _ = stop_tx.send(true);
    let ra = sim_a.await.expect("sim a").expect("simulate a");
    let rb = sim_b.await.expect("sim b").expect("simulate b");
    for r in [&ra, &rb] {
        eprintln!(
            "{} check-ins ({:.0}/s), round trip p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; installs {} selftest_failures {} rollbacks {} crashes {} digest_mismatches {}",
            r.checkins,
            r.checkins_per_s,
            r.checkin_latency.p50_ms,
            r.checkin_latency.p99_ms,
            r.checkin_latency.max_ms,
            r.installs,
            r.selftest_failures,
            r.rollbacks,
            r.crashes,
            r.digest_mismatches
        );
        assert!(
            r.invariant_violations.is_empty(),
            "{:?}",
            r.invariant_violations
        );
        assert_eq!(
            r.final_versions.get("2"),
            Some(&(PER_SERVER as u64)),
            "{r:?}"
        );
    }
    // What the servers counted, and what PostgreSQL logged as errors (deadlocks, bad SQL).
    let http = reqwest::Client::new();
    for server in [&a, &b] {
        let metrics = http
            .get(format!("{}/metrics", server.url))
            .bearer_auth(ADMIN)
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text");
        let counts: Vec<&str> = metrics
            .lines()
            .filter(|l| l.starts_with("kiln_checkins_total") || l.starts_with("kiln_http_errors"))
            .collect();
        eprintln!("{}: {counts:?}", server.url);
    }
    let pg_log =
        std::fs::read_to_string(cluster.dir.join("cluster/postgres.log")).unwrap_or_default();
    let pg_errors: Vec<&str> = pg_log.lines().filter(|l| l.contains("ERROR:")).collect();
    eprintln!("PostgreSQL errors: {}", pg_errors.len());
    for l in pg_errors.iter().take(20) {
        eprintln!("  {l}");
    }
    assert!(
        !pg_log.contains("deadlock detected"),
        "PostgreSQL detected a deadlock:\n{pg_log}"
    );
    eprintln!("two servers on PostgreSQL: done in {:?}", t0.elapsed());
    drop(a);
    drop(b);
    drop(cluster);
}
