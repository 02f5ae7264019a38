//! The fleet server end to end: a real server in this process on 127.0.0.1:0 with SQLite in a
//! temporary folder, driven over real HTTP by simulated devices written out in the tests.

use kiln::artifact::{write_artifact, HeaderFields};
use kiln::fleet::api::{
    Assignment, CheckIn, CheckInResponse, DeviceEvent, EnrollRequest, EnrollResponse, ModelRef,
    PushResponse, RolloutRequest, RolloutState, RolloutStatus, Telemetry,
};
use kiln::fleet::client::Client;
use kiln::fleet::{RunningServer, ServerConfig};
use kiln_device::testkit::{self, Spec};
use kiln_runtime::format::{Container, SectionKind};
use kiln_runtime::sections::{BaselineHead, BaselineHistogram, BaselineTensor, Manifest};
use reqwest::StatusCode;
use std::path::Path;

const ADMIN: &str = "admin-token-0123456789";
const ENROLL: &str = "enroll-token-0123456789";
const MODEL: &str = "kws";
/// Reference counts of the BASELINE histograms (4 equal-mass bins).
const BASE: [u32; 4] = [250, 250, 250, 250];

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

fn admin(url: &str) -> Client {
    Client::new(url, ADMIN).expect("client")
}

/// A simulated device: what it runs and what it will report next.
#[allow(dead_code)]
struct Device {
    id: String,
    token: String,
    running: Option<u32>,
    events: Vec<DeviceEvent>,
}

async fn enroll(http: &reqwest::Client, url: &str, name: &str, cohort: Option<&str>) -> Device {
    let resp = http
        .post(format!("{url}/api/v1/enroll"))
        .bearer_auth(ENROLL)
        .json(&EnrollRequest {
            name: name.into(),
            board: "linux-arm64".into(),
            cohort: cohort.map(String::from),
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

/// How a device's telemetry looks.
#[derive(Clone, Copy, PartialEq)]
enum Health {
    Good,
    Drifting,
}

fn telemetry(version: u32, health: Health) -> Telemetry {
    let mut latency = vec![0u64; 17];
    latency[3] = 100; // 200..500 µs
    let hist = match health {
        Health::Good => vec![100, 100, 100, 100],
        Health::Drifting => vec![0, 0, 5, 395],
    };
    Telemetry {
        version,
        inferences: 400,
        errors: 0,
        latency_us: latency,
        input_hist: vec![vec![100, 100, 100, 100]],
        output_hist: vec![hist],
    }
}

impl Device {
    async fn checkin(
        &mut self,
        http: &reqwest::Client,
        url: &str,
        health: Health,
    ) -> Option<Assignment> {
        let body = CheckIn {
            running: self.running.map(|version| ModelRef {
                model: MODEL.into(),
                version,
            }),
            events: std::mem::take(&mut self.events),
            telemetry: self.running.map(|v| telemetry(v, health)),
        };
        let resp = http
            .post(format!("{url}/api/v1/checkin"))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .expect("checkin");
        assert_eq!(resp.status(), StatusCode::OK);
        let r: CheckInResponse = resp.json().await.expect("checkin json");
        r.assignment
    }

    /// Downloads an assignment and installs it (or fails its self-test when `fails`).
    async fn take(&mut self, http: &reqwest::Client, url: &str, a: &Assignment, fails: bool) {
        let resp = http
            .get(format!("{url}{}", a.url))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("download");
        assert_eq!(resp.status(), StatusCode::OK);
        let bytes = resp.bytes().await.expect("bytes");
        assert_eq!(bytes.len() as u64, a.size);
        assert_eq!(kiln::fleet::sha256_hex(&bytes), a.sha256);
        let v = a.target.version;
        if fails {
            self.events.push(DeviceEvent::SelfTestFailed { version: v });
        } else {
            if a.rollback {
                if let Some(from) = self.running {
                    self.events.push(DeviceEvent::RolledBack {
                        from,
                        to: v,
                        ordered: true,
                    });
                }
            } else {
                self.events.push(DeviceEvent::Installed { version: v });
            }
            self.running = Some(v);
        }
    }
}

fn quick(version: u32, waves: &[u8], min_devices: u32) -> RolloutRequest {
    RolloutRequest {
        target: ModelRef {
            model: MODEL.into(),
            version,
        },
        cohort: None,
        waves: waves.to_vec(),
        min_devices,
        max_failure_pct: 10.0,
        max_latency_regression_pct: 50.0,
        max_psi: 0.25,
        wave_wait_s: 0,
    }
}

/// 20 devices on v1 (pushed and rolled out to everyone in one wave).
async fn fleet_on_v1(http: &reqwest::Client, url: &str) -> Vec<Device> {
    let c = admin(url);
    c.push(signed(1, false)).await.expect("push v1");
    let id = c
        .create_rollout(&quick(1, &[100], 1))
        .await
        .expect("rollout v1");
    let mut devices = Vec::new();
    for i in 0..20 {
        devices.push(enroll(http, url, &format!("dev-{i}"), None).await);
    }
    for d in &mut devices {
        let a = d
            .checkin(http, url, Health::Good)
            .await
            .expect("v1 assigned");
        assert_eq!(a.target.version, 1);
        d.take(http, url, &a, false).await;
        assert_eq!(d.checkin(http, url, Health::Good).await, None);
    }
    let s = c.rollout_status(id).await.expect("status");
    assert_eq!(s.state, RolloutState::Complete, "{s:?}");
    devices
}

/// One round: every device checks in and takes what it is assigned.
async fn round(
    http: &reqwest::Client,
    url: &str,
    devices: &mut [Device],
    health: Health,
    fails: impl Fn(&Assignment) -> bool,
) -> usize {
    let mut taken = 0;
    for d in devices.iter_mut() {
        if let Some(a) = d.checkin(http, url, health).await {
            d.take(http, url, &a, fails(&a)).await;
            taken += 1;
        }
    }
    taken
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_every_endpoint_refuses_missing_wrong_and_other_credentials() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path()).await;
    let url = server.url();
    let http = reqwest::Client::new();
    let pushed = admin(&url).push(signed(1, false)).await.expect("push");
    let dev = enroll(&http, &url, "a", Some("other")).await;
    let endpoints: Vec<(&str, String)> = vec![
        ("GET", "/metrics".into()),
        ("POST", "/api/v1/models".into()),
        ("GET", "/api/v1/models".into()),
        ("POST", "/api/v1/enroll".into()),
        ("GET", "/api/v1/devices".into()),
        ("POST", "/api/v1/checkin".into()),
        ("GET", format!("/api/v1/artifacts/{}", pushed.sha256)),
        ("POST", "/api/v1/rollouts".into()),
        ("GET", "/api/v1/rollouts".into()),
        ("GET", "/api/v1/rollouts/1".into()),
        ("POST", "/api/v1/rollouts/1/pause".into()),
        ("POST", "/api/v1/rollback".into()),
    ];
    for (method, path) in &endpoints {
        let req = |token: Option<&str>| {
            let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
            let r = http.request(m, format!("{url}{path}")).body("{}");
            match token {
                Some(t) => r.bearer_auth(t),
                None => r,
            }
        };
        for token in [None, Some("not-a-token")] {
            let resp = req(token).send().await.expect("send");
            assert_eq!(
                resp.status(),
                StatusCode::UNAUTHORIZED,
                "{method} {path} {token:?}"
            );
            let body: serde_json::Value = resp.json().await.expect("json error");
            assert!(body["error"].as_str().is_some_and(|e| !e.contains('\n')));
        }
        let admin_only =
            !path.contains("checkin") && !path.contains("enroll") && !path.contains("artifacts");
        if admin_only {
            let resp = req(Some(&dev.token)).send().await.expect("send");
            assert_eq!(
                resp.status(),
                StatusCode::FORBIDDEN,
                "{method} {path} with a device token"
            );
        }
        if path.contains("checkin") || path.contains("artifacts") {
            for t in [ENROLL] {
                let resp = req(Some(t)).send().await.expect("send");
                assert_eq!(
                    resp.status(),
                    StatusCode::FORBIDDEN,
                    "{method} {path} with {t}"
                );
            }
        }
        if path.contains("enroll") {
            let resp = req(Some(ADMIN)).send().await.expect("send");
            assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        }
    }
    // Another device's artifact: this device (cohort "other") is assigned nothing.
    let resp = http
        .get(format!("{url}/api/v1/artifacts/{}", pushed.sha256))
        .bearer_auth(&dev.token)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    // Unknown endpoints answer JSON too.
    let resp = http.get(format!("{url}/nope")).send().await.expect("send");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert!(resp.json::<serde_json::Value>().await.is_ok());
    server.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_refuses_unsigned_untrusted_and_nameless_artifacts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path()).await;
    let url = server.url();
    let http = reqwest::Client::new();
    let stranger = testkit::test_key(9);
    let nameless = testkit::signed(
        &Spec {
            version: 3,
            counter: 0,
            target: String::new(),
            out_features: 2,
            bad_selftest: false,
        },
        &signing_key(),
    );
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("unsigned", unsigned(1, false), "unsigned"),
        (
            "untrusted",
            testkit::sign(&unsigned(1, false), &[&stranger]),
            "untrusted",
        ),
        ("garbage", b"not an artifact".to_vec(), "truncated"),
        ("nameless", nameless, "no_name"),
    ];
    for (what, bytes, code) in cases {
        let resp = http
            .post(format!("{url}/api/v1/models"))
            .bearer_auth(ADMIN)
            .body(bytes)
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY, "{what}");
        let body: serde_json::Value = resp.json().await.expect("json");
        let e = body["error"].as_str().unwrap_or_default();
        assert!(e.contains(code) && !e.contains('\n'), "{what}: {e}");
    }
    let c = admin(&url);
    let first: PushResponse = c.push(signed(1, false)).await.expect("push");
    assert!(!first.existed);
    assert!(c.push(signed(1, false)).await.expect("again").existed);
    let models = c.models().await.expect("models");
    assert_eq!(models.len(), 1);
    assert_eq!(models[0].model.model, MODEL);
    assert_eq!(models[0].lineage["source_sha256"], "test");
    assert_eq!(models[0].pushed_by, "admin");
    server.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_checkin_assignment_and_range_download_with_resume() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path()).await;
    let url = server.url();
    let http = reqwest::Client::new();
    let c = admin(&url);
    let artifact = signed(1, false);
    c.push(artifact.clone()).await.expect("push");
    c.create_rollout(&quick(1, &[100], 1))
        .await
        .expect("rollout");
    let mut d = enroll(&http, &url, "a", None).await;
    let a = d
        .checkin(&http, &url, Health::Good)
        .await
        .expect("assigned");
    assert_eq!(a.target.version, 1);
    assert!(!a.rollback);
    // Download the first 100 bytes, then resume from there.
    let get = |range: String| {
        http.get(format!("{url}{}", a.url))
            .bearer_auth(&d.token)
            .header("Range", range)
            .send()
    };
    let head = get("bytes=0-99".into()).await.expect("range");
    assert_eq!(head.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        head.headers()["content-range"],
        format!("bytes 0-99/{}", artifact.len()).as_str()
    );
    let mut got = head.bytes().await.expect("bytes").to_vec();
    let tail = get("bytes=100-".into()).await.expect("resume");
    assert_eq!(tail.status(), StatusCode::PARTIAL_CONTENT);
    got.extend_from_slice(&tail.bytes().await.expect("bytes"));
    assert_eq!(got, artifact);
    let bad = get(format!("bytes={}-", artifact.len()))
        .await
        .expect("416");
    assert_eq!(bad.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    d.take(&http, &url, &a, false).await;
    assert_eq!(d.checkin(&http, &url, Health::Good).await, None);
    let devices = c.devices().await.expect("devices");
    assert_eq!(devices[0].running.as_ref().map(|r| r.version), Some(1));
    assert!(devices[0].last_seen.is_some());
    server.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_advances_through_waves_to_complete() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path()).await;
    let url = server.url();
    let http = reqwest::Client::new();
    let mut devices = fleet_on_v1(&http, &url).await;
    let c = admin(&url);
    c.push(signed(2, false)).await.expect("push v2");
    let id = c
        .create_rollout(&quick(2, &[5, 25, 100], 1))
        .await
        .expect("rollout");
    let mut seen_waves = Vec::new();
    for _ in 0..10 {
        round(&http, &url, &mut devices, Health::Good, |_| false).await;
        let s = c.rollout_status(id).await.expect("status");
        seen_waves.push(s.waves.iter().filter(|w| w.state == "passed").count());
        if s.state == RolloutState::Complete {
            break;
        }
    }
    // Let every device catch up.
    round(&http, &url, &mut devices, Health::Good, |_| false).await;
    round(&http, &url, &mut devices, Health::Good, |_| false).await;
    let s: RolloutStatus = c.rollout_status(id).await.expect("status");
    assert_eq!(
        s.state,
        RolloutState::Complete,
        "{s:?} after {seen_waves:?}"
    );
    assert!(s.waves.iter().all(|w| w.state == "passed"), "{s:?}");
    assert!(
        seen_waves.windows(2).all(|w| w[0] <= w[1]),
        "{seen_waves:?}"
    );
    assert_eq!(s.devices.get("2"), Some(&20), "{s:?}");
    assert!(devices.iter().all(|d| d.running == Some(2)));
    server.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selftest_failures_abort_the_first_wave_and_order_devices_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path()).await;
    let url = server.url();
    let http = reqwest::Client::new();
    let mut devices = fleet_on_v1(&http, &url).await;
    let c = admin(&url);
    c.push(signed(2, true)).await.expect("push v2");
    let id = c
        .create_rollout(&quick(2, &[50, 100], 4))
        .await
        .expect("rollout");
    // The first device to get v2 installs it fine; the others fail its self-test.
    let mut first = true;
    for d in devices.iter_mut() {
        if let Some(a) = d.checkin(&http, &url, Health::Good).await {
            assert_eq!(a.target.version, 2);
            d.take(&http, &url, &a, !first).await;
            first = false;
        }
    }
    assert!(!first, "nobody was in the first wave");
    for d in devices.iter_mut() {
        d.checkin(&http, &url, Health::Good).await;
    }
    let s = c.rollout_status(id).await.expect("status");
    assert_eq!(s.state, RolloutState::Aborted, "{s:?}");
    assert_eq!(s.waves[0].state, "failed");
    assert!(
        s.reason.as_deref().unwrap_or_default().contains("failures"),
        "{s:?}"
    );
    // The device that took v2 is ordered back to v1; those that failed stay on v1.
    let mut ordered_back = 0;
    for d in devices.iter_mut() {
        match d.checkin(&http, &url, Health::Good).await {
            Some(a) => {
                assert!(a.rollback && a.target.version == 1, "{a:?}");
                d.take(&http, &url, &a, false).await;
                ordered_back += 1;
            }
            None => assert_eq!(d.running, Some(1)),
        }
    }
    assert_eq!(ordered_back, 1);
    assert!(devices.iter().all(|d| d.running == Some(1)));
    server.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_trips_max_psi() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path()).await;
    let url = server.url();
    let http = reqwest::Client::new();
    let mut devices = fleet_on_v1(&http, &url).await;
    let c = admin(&url);
    c.push(signed(2, false)).await.expect("push v2");
    let id = c
        .create_rollout(&quick(2, &[50, 100], 3))
        .await
        .expect("rollout");
    for _ in 0..3 {
        round(&http, &url, &mut devices, Health::Drifting, |_| false).await;
    }
    let s = c.rollout_status(id).await.expect("status");
    assert_eq!(s.state, RolloutState::Aborted, "{s:?}");
    let psi = s.waves[0].gate.psi.unwrap_or(0.0);
    assert!(psi > 0.25, "{s:?}");
    assert!(
        s.reason.as_deref().unwrap_or_default().contains("PSI"),
        "{s:?}"
    );
    server.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_state_survives_a_server_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path()).await;
    let url = server.url();
    let http = reqwest::Client::new();
    let mut devices = fleet_on_v1(&http, &url).await;
    let c = admin(&url);
    c.push(signed(2, false)).await.expect("push v2");
    let id = c
        .create_rollout(&quick(2, &[50, 100], 3))
        .await
        .expect("rollout");
    round(&http, &url, &mut devices, Health::Good, |_| false).await;
    let before = c.rollout_status(id).await.expect("status");
    assert_eq!(before.state, RolloutState::Running);
    server.stop().await.expect("stop");

    // A new server on the same data folder (another port): the rollout carries on.
    let server = start(dir.path()).await;
    let url = server.url();
    let c = admin(&url);
    let after = c.rollout_status(id).await.expect("status");
    assert_eq!(after.target, before.target);
    assert_eq!(after.devices, before.devices);
    for _ in 0..6 {
        round(&http, &url, &mut devices, Health::Good, |_| false).await;
    }
    let s = c.rollout_status(id).await.expect("status");
    assert_eq!(s.state, RolloutState::Complete, "{s:?}");
    assert!(devices.iter().all(|d| d.running == Some(2)));
    assert_eq!(c.models().await.expect("models").len(), 2);
    server.stop().await.expect("stop");
}
