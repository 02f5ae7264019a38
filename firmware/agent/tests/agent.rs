//! The agent against a small in-test HTTP/1.1 server (real sockets): crash at every install
//! step, Range resume after a dropped connection, trial/confirm/revert, refusals.

use kiln_agent::agent::{Agent, AgentConfig};
use kiln_agent::api::{
    Assignment, CheckIn, CheckInResponse, DeviceEvent, EnrollResponse, ModelRef,
};
use kiln_agent::model::sha256_hex;
use kiln_device::testkit::{self, Spec};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Default)]
struct Fake {
    artifacts: Mutex<HashMap<String, Vec<u8>>>,
    assignment: Mutex<Option<Assignment>>,
    events: Mutex<Vec<DeviceEvent>>,
    /// The next artifact download sends only this many bytes, then drops the connection.
    drop_after: Mutex<Option<usize>>,
    range_requests: AtomicUsize,
}

impl Fake {
    fn assign(&self, bytes: &[u8], version: u32, rollback: bool) {
        let sha = sha256_hex(bytes);
        self.artifacts
            .lock()
            .unwrap()
            .insert(sha.clone(), bytes.to_vec());
        *self.assignment.lock().unwrap() = Some(Assignment {
            target: ModelRef {
                model: String::new(),
                version,
            },
            sha256: sha.clone(),
            size: bytes.len() as u64,
            url: format!("/api/v1/artifacts/{sha}"),
            rollout: Some(1),
            rollback,
        });
    }
    fn events(&self) -> Vec<DeviceEvent> {
        self.events.lock().unwrap().clone()
    }
}

async fn serve(fake: Arc<Fake>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let f = fake.clone();
            tokio::spawn(async move {
                let _ = handle(s, f).await;
            });
        }
    });
    format!("http://{addr}")
}

async fn handle(mut s: TcpStream, f: Arc<Fake>) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let head_end = loop {
        let mut b = [0u8; 4096];
        let n = s.read(&mut b).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&b[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.lines();
    let first = lines.next().unwrap_or("");
    let mut parts = first.split(' ');
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let mut headers = HashMap::new();
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let mut b = [0u8; 4096];
        let n = s.read(&mut b).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&b[..n]);
    }
    let reply = |status: &str, extra: &str, body: &[u8]| {
        let mut r = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(body);
        r
    };
    let out = match (method.as_str(), path.as_str()) {
        ("POST", "/api/v1/enroll") => {
            let r = EnrollResponse {
                device_id: "d1".into(),
                token: "tok".into(),
            };
            reply(
                "200 OK",
                "Content-Type: application/json\r\n",
                &serde_json::to_vec(&r).unwrap(),
            )
        }
        ("POST", "/api/v1/checkin") => {
            let c: CheckIn = serde_json::from_slice(&body).unwrap();
            f.events.lock().unwrap().extend(c.events);
            let r = CheckInResponse {
                assignment: f.assignment.lock().unwrap().clone(),
                next_checkin_s: 1,
            };
            reply(
                "200 OK",
                "Content-Type: application/json\r\n",
                &serde_json::to_vec(&r).unwrap(),
            )
        }
        ("GET", p) if p.starts_with("/api/v1/artifacts/") => {
            let sha = &p["/api/v1/artifacts/".len()..];
            let Some(art) = f.artifacts.lock().unwrap().get(sha).cloned() else {
                s.write_all(&reply("404 Not Found", "", b"{\"error\":\"no\"}"))
                    .await?;
                return Ok(());
            };
            let start: usize = headers
                .get("range")
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.trim_end_matches('-').parse().ok())
                .unwrap_or(0);
            let (status, extra) = if headers.contains_key("range") {
                f.range_requests.fetch_add(1, Ordering::SeqCst);
                (
                    "206 Partial Content",
                    format!(
                        "Content-Range: bytes {start}-{}/{}\r\n",
                        art.len() - 1,
                        art.len()
                    ),
                )
            } else {
                ("200 OK", String::new())
            };
            let mut r = reply(status, &extra, &art[start..]);
            if let Some(n) = f.drop_after.lock().unwrap().take() {
                let head_len = r.len() - (art.len() - start);
                r.truncate(head_len + n);
            }
            r
        }
        _ => reply("404 Not Found", "", b"{\"error\":\"no route\"}"),
    };
    s.write_all(&out).await?;
    s.flush().await?;
    Ok(())
}

fn key() -> ed25519_dalek::SigningKey {
    testkit::test_key(7)
}

fn spec(version: u32) -> Spec {
    Spec {
        target: "pi4".into(),
        ..Spec::sized(version, 16 * 1024)
    }
}

fn cfg(server: &str) -> AgentConfig {
    let mut c = AgentConfig::new(server, "enroll", "pi4", vec![testkit::public(&key())]);
    c.request_timeout = Duration::from_secs(5);
    c.chunk_timeout = Duration::from_secs(5);
    c.seed = 3;
    c
}

fn running(a: &Agent) -> Option<u32> {
    a.running().map(|m| m.version)
}

#[tokio::test]
async fn install_confirm_then_report_installed() {
    let f = Arc::new(Fake::default());
    let url = serve(f.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut a = Agent::open(cfg(&url), dir.path()).unwrap();
    assert_eq!(running(&a), None);
    f.assign(&testkit::signed(&spec(1), &key()), 1, false);
    a.cycle().await.unwrap();
    assert_eq!(running(&a), Some(1));
    a.cycle().await.unwrap();
    assert!(f.events().contains(&DeviceEvent::Installed { version: 1 }));
    assert!(
        a.state().events.is_empty(),
        "acknowledged events are dropped"
    );
    // Inference on the running model, counted in telemetry.
    let m = a.running().unwrap();
    let out = a.shared().infer(&vec![0u8; m.input_len]).unwrap();
    assert!(!out.is_empty());
    // A restart runs the same model.
    drop(a);
    let a = Agent::open(cfg(&url), dir.path()).unwrap();
    assert_eq!(running(&a), Some(1));
}

#[tokio::test]
async fn crash_at_every_install_step_keeps_a_verified_model() {
    let f = Arc::new(Fake::default());
    let url = serve(f.clone()).await;
    let v1 = testkit::signed(&spec(1), &key());
    let v2 = testkit::signed(&spec(2), &key());
    for step in 0..=4u32 {
        let dir = tempfile::tempdir().unwrap();
        f.assign(&v1, 1, false);
        let mut a = Agent::open(cfg(&url), dir.path()).unwrap();
        a.cycle().await.unwrap();
        assert_eq!(running(&a), Some(1));
        f.assign(&v2, 2, false);
        a.crash_at(Some(step));
        let e = a.cycle().await.unwrap_err();
        assert!(e.is_crash(), "step {step}: {e}");
        drop(a);
        // Restart from the state directory: the old model, or the new one once it was staged
        // (a staged trial is finished at start-up).
        let mut a = Agent::open(cfg(&url), dir.path()).unwrap();
        let v = running(&a);
        assert!(v == Some(1) || v == Some(2), "step {step}: {v:?}");
        if step >= 3 {
            assert_eq!(v, Some(2), "step {step}");
        }
        assert!(a.state().trial.is_none());
        let m = a.running().unwrap();
        assert_eq!(m.self_test(), Ok(1));
        // And the install completes at the next check-in.
        a.cycle().await.unwrap();
        assert_eq!(running(&a), Some(2), "step {step}");
        assert_eq!(a.state().min_counter, 0);
    }
}

#[tokio::test]
async fn dropped_download_resumes_with_range() {
    let f = Arc::new(Fake::default());
    let url = serve(f.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut a = Agent::open(cfg(&url), dir.path()).unwrap();
    let v1 = testkit::signed(&spec(1), &key());
    f.assign(&v1, 1, false);
    *f.drop_after.lock().unwrap() = Some(5000);
    assert!(a.cycle().await.is_err(), "the connection drops midway");
    assert_eq!(running(&a), None);
    let part = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().ends_with(".part"))
        .expect("partial file kept");
    assert_eq!(part.metadata().unwrap().len(), 5000);
    a.cycle().await.unwrap();
    assert_eq!(running(&a), Some(1));
    assert_eq!(f.range_requests.load(Ordering::SeqCst), 1);
    assert_eq!(a.counters.resumed_downloads, 1);
}

#[tokio::test]
async fn failing_selftest_reverts_and_reports() {
    let f = Arc::new(Fake::default());
    let url = serve(f.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut a = Agent::open(cfg(&url), dir.path()).unwrap();
    f.assign(&testkit::signed(&spec(1), &key()), 1, false);
    a.cycle().await.unwrap();
    let bad = Spec {
        bad_selftest: true,
        ..spec(2)
    };
    f.assign(&testkit::signed(&bad, &key()), 2, false);
    a.cycle().await.unwrap();
    assert_eq!(running(&a), Some(1), "reverted to v1");
    a.cycle().await.unwrap();
    assert!(f
        .events()
        .contains(&DeviceEvent::SelfTestFailed { version: 2 }));
    // Not tried again while the same release is assigned.
    a.cycle().await.unwrap();
    let n = f
        .events()
        .iter()
        .filter(|e| matches!(e, DeviceEvent::SelfTestFailed { .. }))
        .count();
    assert_eq!(n, 1);
    drop(a);
    let a = Agent::open(cfg(&url), dir.path()).unwrap();
    assert_eq!(running(&a), Some(1));
}

#[tokio::test]
async fn refuses_unsigned_untrusted_wrong_board_and_downgrade() {
    let f = Arc::new(Fake::default());
    let url = serve(f.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut a = Agent::open(cfg(&url), dir.path()).unwrap();
    f.assign(&testkit::signed(&spec(2), &key()), 2, false);
    a.cycle().await.unwrap();
    assert_eq!(running(&a), Some(2));
    let cases: Vec<(Vec<u8>, u32, bool)> = vec![
        (testkit::build(&spec(3)), 3, false),
        (testkit::signed(&spec(4), &testkit::test_key(9)), 4, false),
        (
            testkit::signed(
                &Spec {
                    target: "other".into(),
                    ..spec(5)
                },
                &key(),
            ),
            5,
            false,
        ),
        (testkit::signed(&spec(1), &key()), 1, false),
    ];
    for (bytes, v, rb) in cases {
        f.assign(&bytes, v, rb);
        a.cycle().await.unwrap();
        assert_eq!(running(&a), Some(2), "v{v} refused");
        a.cycle().await.unwrap();
        assert!(
            f.events()
                .iter()
                .any(|e| matches!(e, DeviceEvent::InstallFailed { version, .. } if *version == v)),
            "v{v} reported"
        );
    }
    // An ordered rollback to v1 is taken; a lower security counter never is.
    f.assign(&testkit::signed(&spec(1), &key()), 1, true);
    a.cycle().await.unwrap();
    assert_eq!(running(&a), Some(1));
    a.cycle().await.unwrap();
    assert!(f.events().iter().any(|e| matches!(
        e,
        DeviceEvent::RolledBack {
            from: 2,
            to: 1,
            ordered: true
        }
    )));
    let hi = Spec {
        counter: 5,
        ..spec(6)
    };
    f.assign(&testkit::signed(&hi, &key()), 6, false);
    a.cycle().await.unwrap();
    assert_eq!(running(&a), Some(6));
    assert_eq!(a.state().min_counter, 5);
    f.assign(&testkit::signed(&spec(5), &key()), 5, true);
    a.cycle().await.unwrap();
    assert_eq!(running(&a), Some(6), "counter below the confirmed one");
}

#[tokio::test]
async fn inference_socket_answers() {
    let f = Arc::new(Fake::default());
    let url = serve(f.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut a = Agent::open(cfg(&url), dir.path()).unwrap();
    let sock = dir.path().join("s.sock");
    let sh = a.shared();
    let s2 = sock.clone();
    tokio::spawn(async move { kiln_agent::service::serve(&s2, sh).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = kiln_agent::service::call(&sock, &[1, 2, 3]).await.unwrap();
    assert!(r.is_err(), "no model yet");
    f.assign(&testkit::signed(&spec(1), &key()), 1, false);
    a.cycle().await.unwrap();
    let n = a.running().unwrap().input_len;
    let r = kiln_agent::service::call(&sock, &vec![0u8; n])
        .await
        .unwrap();
    assert!(r.is_ok());
    let r = kiln_agent::service::call(&sock, &[0u8; 3]).await.unwrap();
    assert!(r.unwrap_err().contains("input is 3 bytes"));
}
