//! The fleet benchmark behind BENCHMARKS.md ("Fleet server"): `kiln serve` (embedded SQLite, data
//! folder on disk) in one process, `kiln simulate --devices N` in another, and this test as the
//! admin driving two rollouts and reading the server's metrics. Ignored by default (minutes of
//! both cores); run it with a release build:
//!
//! ```text
//! cargo test --release -p kiln --test fleet_bench -- --ignored --nocapture
//! KILN_BENCH_DEVICES=10000 KILN_BENCH_POLL=5 KILN_BENCH_SECS=240 cargo test --release …
//! ```
//!
//! It prints: the time for every device to enroll; rollout A (v1 to devices running nothing, one
//! wave of 100 %) and rollout B (v2 in waves 5,25,100, each gate waiting for 100 devices and 1 s)
//! from creation to every device on the version; then, with nothing to roll out, the check-ins
//! per second the server answered over `KILN_BENCH_QUIET` seconds and its request-latency
//! histogram there; and the simulator's report (check-ins per second over the whole run, the
//! devices' round-trip percentiles). No faults are injected: this measures the server.

#[path = "common/fleet.rs"]
mod fleet;

use fleet::{key_file, signed, ADMIN, ENROLL, MODEL};
use kiln::fleet::api::{ModelRef, RolloutRequest, RolloutState};
use kiln::fleet::client::Client;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rollout(version: u32, waves: &[u8], min_devices: u32) -> RolloutRequest {
    RolloutRequest {
        target: ModelRef {
            model: MODEL.into(),
            version,
        },
        cohort: None,
        waves: waves.to_vec(),
        min_devices,
        max_failure_pct: 20.0,
        max_latency_regression_pct: 1000.0,
        max_psi: 10.0,
        wave_wait_s: 1,
    }
}

/// Seconds from now until every one of `n` devices runs `version` per rollout `id`'s status
/// (polled every 500 ms), or `None` after `limit`.
async fn converge(admin: &Client, id: i64, version: u32, n: usize, limit: Duration) -> Option<f64> {
    let t0 = Instant::now();
    let mut last = String::new();
    while t0.elapsed() < limit {
        if let Ok(s) = admin.rollout_status(id).await {
            let on = s.devices.get(&version.to_string()).copied().unwrap_or(0);
            let waves: Vec<&str> = s.waves.iter().map(|w| w.state.as_str()).collect();
            let line = format!("{on} on v{version}, {:?}, waves {waves:?}", s.state);
            if line != last {
                eprintln!("  [{:6.1}s] {line}", t0.elapsed().as_secs_f64());
                last = line;
            }
            if on == n as u64 && s.state == RolloutState::Complete {
                return Some(t0.elapsed().as_secs_f64());
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    None
}

/// `kiln_checkins_total` and the request-latency histogram (`le` → count) from `/metrics`.
async fn metrics(http: &reqwest::Client, url: &str) -> (u64, Vec<(String, u64)>) {
    let text = http
        .get(format!("{url}/metrics"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    let mut checkins = 0;
    let mut buckets = Vec::new();
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("kiln_checkins_total ") {
            checkins = v.trim().parse().unwrap_or(0);
        } else if let Some(rest) =
            line.strip_prefix("kiln_http_request_duration_seconds_bucket{le=\"")
        {
            if let Some((le, v)) = rest.split_once("\"} ") {
                buckets.push((le.to_string(), v.trim().parse().unwrap_or(0)));
            }
        }
    }
    (checkins, buckets)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
#[ignore = "a benchmark: minutes of both cores; see the module docs"]
async fn fleet_server_benchmark() {
    let n: usize = env_or("KILN_BENCH_DEVICES", 10_000);
    let poll: f64 = env_or("KILN_BENCH_POLL", 5.0);
    let secs: u64 = env_or("KILN_BENCH_SECS", 240);
    let quiet: u64 = env_or("KILN_BENCH_QUIET", 30);
    let t0 = Instant::now();
    let at = || t0.elapsed().as_secs_f64();
    let work = tempfile::tempdir().expect("tempdir");
    let key = key_file(work.path());
    let data = work.path().join("server");
    let port = fleet::free_port();
    let mut server = fleet::ServeProc::start(&data, &key, port).await;
    let url = server.url.clone();
    let admin = Client::new(&url, ADMIN).expect("client");
    for v in 1..=2 {
        admin.push(signed(v, false)).await.expect("push");
    }
    // The devices' state folders (each write fsynced) on a RAM disk when there is one: the
    // simulator's fsyncs are not the server's.
    let states = match std::path::Path::new("/dev/shm").is_dir() {
        true => tempfile::tempdir_in("/dev/shm"),
        false => tempfile::tempdir(),
    }
    .expect("state tempdir");
    let report = work.path().join("sim.json");
    let sim_log = work.path().join("sim.log");
    let mut sim = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["simulate", "--server", &url, "--enroll-token", ENROLL])
        .args(["--devices", &n.to_string(), "--max-poll", &poll.to_string()])
        .args(["--duration", &secs.to_string(), "--json", "--trusted-key"])
        .arg(&key)
        .env("TMPDIR", states.path())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&report).expect("report file"))
        .stderr(std::fs::File::create(&sim_log).expect("sim log"))
        .spawn()
        .expect("spawn kiln simulate");
    eprintln!(
        "{n} devices polling every {poll} s (±20 %) for {secs} s; server {url}, release: {}",
        !cfg!(debug_assertions)
    );

    let t_enroll = Instant::now();
    while admin.devices().await.map(|d| d.len()).unwrap_or(0) < n {
        assert!(t_enroll.elapsed() < Duration::from_secs(120), "enrollment");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!("[{:6.1}s] {n} devices enrolled", at());

    let limit = Duration::from_secs(secs / 3);
    let a = admin
        .create_rollout(&rollout(1, &[100], 100))
        .await
        .expect("rollout v1");
    let ta = converge(&admin, a, 1, n, limit).await;
    eprintln!("[{:6.1}s] rollout A (v1, one wave): {ta:?} s", at());
    let b = admin
        .create_rollout(&rollout(2, &[5, 25, 100], 100))
        .await
        .expect("rollout v2");
    let tb = converge(&admin, b, 2, n, limit).await;
    eprintln!("[{:6.1}s] rollout B (v2, waves 5,25,100): {tb:?} s", at());

    let http = reqwest::Client::new();
    let (c1, h1) = metrics(&http, &url).await;
    let tq = Instant::now();
    tokio::time::sleep(Duration::from_secs(quiet)).await;
    let (c2, h2) = metrics(&http, &url).await;
    let dt = tq.elapsed().as_secs_f64();
    eprintln!(
        "[{:6.1}s] quiet {dt:.1} s: {} check-ins, {:.0}/s; server request latency (cumulative share):",
        at(),
        c2 - c1,
        (c2 - c1) as f64 / dt
    );
    let total = h2.last().map_or(0, |b| b.1) - h1.last().map_or(0, |b| b.1);
    for ((le, v2), (_, v1)) in h2.iter().zip(&h1) {
        eprintln!(
            "    <= {le:>6} s: {:6.2} %",
            (v2 - v1) as f64 * 100.0 / total.max(1) as f64
        );
    }

    let status = sim.wait().expect("kiln simulate");
    let json = std::fs::read_to_string(&report).unwrap_or_default();
    let r: serde_json::Value = serde_json::from_str(&json).unwrap_or_else(|e| {
        panic!(
            "kiln simulate ({status}) printed no report ({e}); its log:\n{}",
            std::fs::read_to_string(&sim_log).unwrap_or_default()
        )
    });
    eprintln!(
        "[{:6.1}s] simulator: {} check-ins in {:.0} s = {:.0}/s; round trip ms {}; installs {}, http errors {}",
        at(),
        r["checkins"],
        r["duration_s"].as_f64().unwrap_or(0.0),
        r["checkins_per_s"].as_f64().unwrap_or(0.0),
        r["checkin_latency"],
        r["installs"],
        r["http_errors"]
    );
    let db = std::fs::metadata(data.join("fleet.db")).map_or(0, |m| m.len());
    eprintln!("fleet.db: {:.1} MB", db as f64 / 1e6);
    server.kill9();
    assert!(status.success(), "kiln simulate failed");
    assert!(ta.is_some() && tb.is_some(), "both rollouts converged");
}
