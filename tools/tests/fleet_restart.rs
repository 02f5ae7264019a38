//! `kill -9` of the real `kiln serve` process in the middle of a rollout, then a restart on the
//! same data folder: the registry, the devices (and their tokens), the rollout's state, wave and
//! judged gates survive, and the rollout carries on to complete. A second `kill -9` lands while
//! every device checks in as fast as it can; after the restart the server's view of each device
//! matches what it reports. Devices are simulated by direct HTTP check-ins.

#[path = "common/fleet.rs"]
mod fleet;

use fleet::{free_port, key_file, signed, ADMIN, ENROLL, MODEL};

use kiln::fleet::api::{
    Assignment, CheckIn, CheckInResponse, DeviceEvent, EnrollRequest, EnrollResponse, ModelRef,
    RolloutRequest, RolloutState, Telemetry,
};
use kiln::fleet::client::Client;
use reqwest::StatusCode;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const DEVICES: usize = 20;

/// A `kiln serve` child process, killed (SIGKILL) and reaped when dropped.
struct ServeProc {
    child: Option<Child>,
    url: String,
}

impl ServeProc {
    /// Starts `kiln serve` on `data_dir` at `port` and waits until it answers.
    async fn start(data_dir: &Path, key_file: &Path, port: u16) -> ServeProc {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data_dir.with_extension("log"))
            .expect("server log");
        let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--admin-token")
            .arg(ADMIN)
            .arg("--enroll-token")
            .arg(ENROLL)
            .arg("--trusted-key")
            .arg(key_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn kiln serve");
        let mut p = ServeProc {
            child: Some(child),
            url: format!("http://127.0.0.1:{port}"),
        };
        p.wait_ready().await;
        p
    }

    async fn wait_ready(&mut self) {
        let t0 = Instant::now();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("http client");
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!("kiln serve exited early: {status}");
                }
            }
            let ok = http
                .get(format!("{}/api/v1/models", self.url))
                .bearer_auth(ADMIN)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "kiln serve did not answer within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL (`Child::kill`), then reap.
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ServeProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

struct Device {
    id: String,
    token: String,
    running: Option<u32>,
    events: Vec<DeviceEvent>,
}

async fn enroll(http: &reqwest::Client, url: &str, name: &str) -> Device {
    let resp = http
        .post(format!("{url}/api/v1/enroll"))
        .bearer_auth(ENROLL)
        .json(&EnrollRequest {
            name: name.into(),
            board: "linux-arm64".into(),
            cohort: None,
            agent: "test".into(),
        })
        .send()
        .await
        .expect("enroll");
    assert_eq!(resp.status(), StatusCode::CREATED);
    let e: EnrollResponse = resp.json().await.expect("enroll json");
    Device {
        id: e.device_id,
        token: e.token,
        running: None,
        events: Vec::new(),
    }
}

fn telemetry(version: u32) -> Telemetry {
    let mut latency = vec![0u64; 17];
    latency[3] = 100;
    Telemetry {
        version,
        inferences: 400,
        errors: 0,
        latency_us: latency,
        input_hist: vec![vec![100, 100, 100, 100]],
        output_hist: vec![vec![100, 100, 100, 100]],
    }
}

impl Device {
    /// One check-in; an assignment is downloaded, checked and "installed" at once.
    async fn cycle(&mut self, http: &reqwest::Client, url: &str) -> Option<Assignment> {
        let body = CheckIn {
            running: self.running.map(|version| ModelRef {
                model: MODEL.into(),
                version,
            }),
            events: std::mem::take(&mut self.events),
            telemetry: self.running.map(telemetry),
        };
        let resp = http
            .post(format!("{url}/api/v1/checkin"))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .expect("checkin");
        assert_eq!(resp.status(), StatusCode::OK, "device {}", self.id);
        let r: CheckInResponse = resp.json().await.expect("checkin json");
        let a = r.assignment?;
        let bytes = http
            .get(format!("{url}{}", a.url))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("download")
            .bytes()
            .await
            .expect("bytes");
        assert_eq!(kiln::fleet::sha256_hex(&bytes), a.sha256);
        self.events.push(DeviceEvent::Installed {
            version: a.target.version,
        });
        self.running = Some(a.target.version);
        Some(a)
    }
}

impl Device {
    /// One check-in that tolerates a server that is gone: events are kept until a check-in is
    /// answered, and an assignment is installed only once its download checks out.
    async fn try_cycle(&mut self, http: &reqwest::Client, url: &str) -> Result<(), String> {
        let body = CheckIn {
            running: self.running.map(|version| ModelRef {
                model: MODEL.into(),
                version,
            }),
            events: self.events.clone(),
            telemetry: self.running.map(telemetry),
        };
        let resp = http
            .post(format!("{url}/api/v1/checkin"))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if resp.status() != StatusCode::OK {
            return Err(format!("check-in: {}", resp.status()));
        }
        let r: CheckInResponse = resp.json().await.map_err(|e| e.to_string())?;
        self.events.clear();
        let Some(a) = r.assignment else {
            return Ok(());
        };
        let resp = http
            .get(format!("{url}{}", a.url))
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if resp.status() != StatusCode::OK {
            return Err(format!("download: {}", resp.status()));
        }
        let bytes = resp.bytes().await.map_err(|e| e.to_string())?;
        if kiln::fleet::sha256_hex(&bytes) != a.sha256 {
            return Err("digest mismatch".into());
        }
        self.events.push(DeviceEvent::Installed {
            version: a.target.version,
        });
        self.running = Some(a.target.version);
        Ok(())
    }
}

fn rollout(version: u32, waves: &[u8], wave_wait_s: u32) -> RolloutRequest {
    RolloutRequest {
        target: ModelRef {
            model: MODEL.into(),
            version,
        },
        cohort: None,
        waves: waves.to_vec(),
        min_devices: 1,
        max_failure_pct: 10.0,
        max_latency_regression_pct: 50.0,
        max_psi: 0.25,
        wave_wait_s,
    }
}

async fn round(http: &reqwest::Client, url: &str, devices: &mut [Device]) {
    for d in devices.iter_mut() {
        d.cycle(http, url).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_rollout_then_restart_loses_nothing_and_the_rollout_completes() {
    let t_start = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("fleet");
    let key = key_file(tmp.path());
    let port = free_port();
    let mut server = ServeProc::start(&data, &key, port).await;
    let url = server.url.clone();
    let http = reqwest::Client::new();
    let admin = Client::new(&url, ADMIN).expect("client");
    admin.push(signed(1, false)).await.expect("push v1");
    admin.push(signed(2, false)).await.expect("push v2");

    // v1 everywhere.
    let r1 = admin
        .create_rollout(&rollout(1, &[100], 0))
        .await
        .expect("rollout v1");
    let mut devices = Vec::new();
    for i in 0..DEVICES {
        devices.push(enroll(&http, &url, &format!("dev-{i}")).await);
    }
    round(&http, &url, &mut devices).await;
    round(&http, &url, &mut devices).await;
    assert!(devices.iter().all(|d| d.running == Some(1)));
    assert_eq!(
        admin.rollout_status(r1).await.expect("status").state,
        RolloutState::Complete
    );

    // v2 in waves 10, 50, 100 with 2 s per wave: run until the first wave passed.
    let r2 = admin
        .create_rollout(&rollout(2, &[10, 50, 100], 2))
        .await
        .expect("rollout v2");
    let t0 = Instant::now();
    loop {
        round(&http, &url, &mut devices).await;
        let s = admin.rollout_status(r2).await.expect("status");
        assert_eq!(s.state, RolloutState::Running, "{s:?}");
        if s.waves[0].gate.passed == Some(true) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "{s:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Let the second wave's devices take v2, so the kill lands mid-rollout with mixed versions.
    round(&http, &url, &mut devices).await;
    round(&http, &url, &mut devices).await;
    let models_before = admin.models().await.expect("models");
    let devices_before = admin.devices().await.expect("devices");
    let status_before = admin.rollout_status(r2).await.expect("status");
    let r1_before = admin.rollout_status(r1).await.expect("status");
    assert_eq!(
        status_before.state,
        RolloutState::Running,
        "{status_before:?}"
    );
    let on_v2 = devices.iter().filter(|d| d.running == Some(2)).count();
    assert!(on_v2 > 0 && on_v2 < DEVICES, "mid-rollout: {on_v2} on v2");

    // kill -9 and restart on the same data folder and port.
    server.kill9();
    assert!(
        http.get(format!("{url}/api/v1/models"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .is_err(),
        "the server is gone"
    );
    let t_restart = Instant::now();
    let mut server = ServeProc::start(&data, &key, port).await;
    eprintln!(
        "[{:5.1}s] restarted in {:.2}s",
        t_start.elapsed().as_secs_f64(),
        t_restart.elapsed().as_secs_f64()
    );

    // Nothing lost: registry, devices, both rollouts (state, wave, previous, judged gates).
    assert_eq!(admin.models().await.expect("models"), models_before);
    let devices_after = admin.devices().await.expect("devices");
    assert_eq!(devices_after.len(), DEVICES);
    for (a, b) in devices_after.iter().zip(&devices_before) {
        assert_eq!(
            (&a.device_id, &a.name, &a.running, &a.last_event),
            (&b.device_id, &b.name, &b.running, &b.last_event)
        );
    }
    assert_eq!(admin.rollout_status(r1).await.expect("status"), r1_before);
    let status_after = admin.rollout_status(r2).await.expect("status");
    assert_eq!(status_after.state, status_before.state);
    assert_eq!(status_after.target, status_before.target);
    assert_eq!(status_after.previous, Some(1));
    assert_eq!(status_after.devices, status_before.devices);
    assert_eq!(status_after.waves.len(), 3);
    assert_eq!(
        status_after.waves[0], status_before.waves[0],
        "judged gate kept"
    );
    assert_eq!(status_after.waves[0].gate.passed, Some(true));
    // The artifacts survived too (a device downloads what it runs).
    let sha2 = models_before
        .iter()
        .find(|m| m.model.version == 2)
        .map(|m| m.sha256.clone())
        .expect("v2 registered");
    let resp = http
        .get(format!("{url}/api/v1/artifacts/{sha2}"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("artifact");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        kiln::fleet::sha256_hex(&resp.bytes().await.expect("bytes")),
        sha2
    );

    // A second kill -9, this time while every device checks in as fast as it can.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (stop, http, url) = (stop.clone(), http.clone(), url.clone());
        tokio::spawn(async move {
            let (mut answered, mut failed) = (0u32, 0u32);
            while !stop.load(Ordering::Relaxed) {
                for d in devices.iter_mut() {
                    match d.try_cycle(&http, &url).await {
                        Ok(()) => answered += 1,
                        Err(_) => failed += 1,
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (devices, answered, failed)
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    server.kill9();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut server = ServeProc::start(&data, &key, port).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut devices, answered, failed) = load.await.expect("load task");
    eprintln!(
        "[{:5.1}s] killed under load: {answered} check-ins answered, {failed} failed",
        t_start.elapsed().as_secs_f64()
    );
    assert!(
        answered > 0 && failed > 0,
        "{answered} answered, {failed} failed"
    );
    assert_eq!(admin.models().await.expect("models"), models_before);
    assert_eq!(admin.rollout_status(r1).await.expect("status"), r1_before);
    let s = admin.rollout_status(r2).await.expect("status");
    assert!(
        matches!(s.state, RolloutState::Running | RolloutState::Complete),
        "{s:?}"
    );
    assert_eq!(s.waves[0], status_before.waves[0], "judged gate kept");
    // What the server has of each device is what the device reported at its last check-in.
    round(&http, &url, &mut devices).await;
    let reported: Vec<Option<u32>> = devices.iter().map(|d| d.running).collect();
    round(&http, &url, &mut devices).await;
    let listed = admin.devices().await.expect("devices");
    assert_eq!(listed.len(), DEVICES);
    for (d, r) in devices.iter().zip(&reported) {
        let row = listed
            .iter()
            .find(|x| x.device_id == d.id)
            .expect("device kept");
        assert_eq!(row.running.as_ref().map(|m| m.version), *r, "{}", d.id);
    }

    // Device tokens still work and the rollout carries on to complete.
    let t0 = Instant::now();
    loop {
        round(&http, &url, &mut devices).await;
        let s = admin.rollout_status(r2).await.expect("status");
        if s.state == RolloutState::Complete {
            break;
        }
        assert_eq!(s.state, RolloutState::Running, "{s:?}");
        assert!(t0.elapsed() < Duration::from_secs(30), "{s:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    round(&http, &url, &mut devices).await;
    assert!(
        devices.iter().all(|d| d.running == Some(2)),
        "all on v2: {:?}",
        devices
            .iter()
            .map(|d| (d.id.as_str(), d.running))
            .collect::<Vec<_>>()
    );
    let s = admin.rollout_status(r2).await.expect("status");
    assert_eq!(s.devices.get("2"), Some(&(DEVICES as u64)), "{s:?}");
    assert!(s.waves.iter().all(|w| w.gate.passed == Some(true)), "{s:?}");
    server.kill9();
    eprintln!("[{:5.1}s] done", t_start.elapsed().as_secs_f64());
}
