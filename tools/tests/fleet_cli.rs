//! The admin verbs of `kiln` (push, rollout status|pause|resume|abort, rollback, models,
//! devices) as a user runs them, against a real `kiln serve` process: `--json` output on stdout,
//! and errors as one line on stderr with a non-zero exit.

#[path = "common/fleet.rs"]
mod fleet;

use fleet::{free_port, key_file, signed, unsigned, ADMIN, ENROLL, MODEL};

use kiln::fleet::api::{EnrollRequest, EnrollResponse};
use reqwest::StatusCode;
use serde_json::Value;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

/// What a `kiln` run gave.
struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Out {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.stdout))
    }
    /// A failure: non-zero exit, nothing on stdout, one line on stderr; returns it.
    fn error_line(&self) -> &str {
        assert!(!self.ok, "expected a failure, got: {}", self.stdout);
        assert!(self.stdout.trim().is_empty(), "stdout: {}", self.stdout);
        let line = self.stderr.trim_end();
        assert_eq!(line.lines().count(), 1, "one line on stderr: {line:?}");
        assert!(line.starts_with("error: "), "{line}");
        line
    }
}

/// Runs `kiln ARGS… --server URL --token TOKEN`.
fn kiln(url: &str, token: &str, args: &[&str]) -> Out {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .args(["--server", url, "--token", token])
        .env_remove("KILN_SERVER")
        .env_remove("KILN_TOKEN")
        .stdin(Stdio::null())
        .output()
        .expect("run kiln");
    Out {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn ok(o: Out) -> Out {
    assert!(o.ok, "kiln failed: {}", o.stderr);
    o
}

fn state_of(url: &str, id: i64) -> String {
    let s = ok(kiln(
        url,
        ADMIN,
        &["rollout", "status", &id.to_string(), "--json"],
    ))
    .json();
    s["state"].as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_verbs_against_a_running_server() {
    let t_start = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    let key = key_file(tmp.path());
    let server = ServeProc::start(&tmp.path().join("fleet"), &key, free_port()).await;
    let url = server.url.clone();
    let v1 = tmp.path().join("kws-v1.kiln");
    let v2 = tmp.path().join("kws-v2.kiln");
    let plain = tmp.path().join("kws-unsigned.kiln");
    std::fs::write(&v1, signed(1, false)).expect("write v1");
    std::fs::write(&v2, signed(2, false)).expect("write v2");
    std::fs::write(&plain, unsigned(3, false)).expect("write unsigned");
    let v1s = v1.to_str().expect("utf-8 path");
    let v2s = v2.to_str().expect("utf-8 path");

    // Two devices enroll (over HTTP, as the agent does).
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for i in 0..2 {
        let resp = http
            .post(format!("{url}/api/v1/enroll"))
            .bearer_auth(ENROLL)
            .json(&EnrollRequest {
                name: format!("dev-{i}"),
                board: "linux-arm64".into(),
                cohort: None,
                agent: "test".into(),
            })
            .send()
            .await
            .expect("enroll");
        assert_eq!(resp.status(), StatusCode::CREATED);
        let e: EnrollResponse = resp.json().await.expect("enroll json");
        ids.push(e.device_id);
    }

    // push --json prints {"rollout": ID}.
    let p1 = ok(kiln(
        &url,
        ADMIN,
        &["push", v1s, "--waves", "100", "--json"],
    ))
    .json();
    let r1 = p1["rollout"].as_i64().unwrap_or_else(|| panic!("{p1}"));
    assert_eq!(p1.as_object().map(serde_json::Map::len), Some(1), "{p1}");
    let p2 = ok(kiln(
        &url,
        ADMIN,
        &[
            "push",
            v2s,
            "--waves",
            "5,25,100",
            "--wave-wait",
            "3600",
            "--min-devices",
            "20",
            "--max-psi",
            "0.2",
            "--json",
        ],
    ))
    .json();
    let r2 = p2["rollout"].as_i64().unwrap_or_else(|| panic!("{p2}"));
    assert!(r2 > r1);
    // Pushing the same bytes again is fine ("already registered") and starts a new rollout.
    let again = ok(kiln(&url, ADMIN, &["push", v2s, "--json"]));
    assert!(
        again.stderr.contains("already registered"),
        "{}",
        again.stderr
    );
    let r3 = again.json()["rollout"].as_i64().expect("rollout id");
    assert!(r3 > r2);
    assert_eq!(state_of(&url, r2), "superseded");

    // rollout status --json: state, devices, waves with gate figures.
    let s = ok(kiln(
        &url,
        ADMIN,
        &["rollout", "status", &r3.to_string(), "--json"],
    ))
    .json();
    assert_eq!(s["state"], "running", "{s}");
    assert_eq!(s["id"], r3);
    assert_eq!(s["target"]["model"], MODEL);
    assert_eq!(s["target"]["version"], 2);
    assert!(s["devices"].is_object(), "{s}");
    let waves = s["waves"].as_array().expect("waves");
    assert_eq!(
        waves.iter().map(|w| w["pct"].as_u64()).collect::<Vec<_>>(),
        vec![Some(5), Some(25), Some(100)]
    );
    for w in waves {
        let g = &w["gate"];
        for k in [
            "devices",
            "reported",
            "failure_pct",
            "error_rate",
            "psi",
            "passed",
        ] {
            assert!(g.get(k).is_some(), "gate figure {k}: {w}");
        }
    }
    // Without --json: the table on stderr, nothing on stdout.
    let table = ok(kiln(&url, ADMIN, &["rollout", "status", &r3.to_string()]));
    assert!(table.stdout.trim().is_empty(), "{}", table.stdout);
    assert!(table.stderr.contains("WAVE"), "{}", table.stderr);

    // pause | resume | abort, and what each state refuses.
    let r3s = r3.to_string();
    ok(kiln(&url, ADMIN, &["rollout", "pause", &r3s]));
    assert_eq!(state_of(&url, r3), "paused");
    let e = kiln(&url, ADMIN, &["rollout", "pause", &r3s]);
    assert!(e.error_line().contains("409"), "{}", e.stderr);
    ok(kiln(&url, ADMIN, &["rollout", "resume", &r3s]));
    assert_eq!(state_of(&url, r3), "running");
    let e = kiln(&url, ADMIN, &["rollout", "resume", &r3s]);
    assert!(e.error_line().contains("409"), "{}", e.stderr);
    ok(kiln(&url, ADMIN, &["rollout", "abort", &r3s]));
    assert_eq!(state_of(&url, r3), "aborted");
    for action in ["pause", "resume", "abort"] {
        let e = kiln(&url, ADMIN, &["rollout", action, &r3s]);
        assert!(e.error_line().contains("409"), "{action}: {}", e.stderr);
    }

    // rollback --model --to.
    let rb = ok(kiln(
        &url,
        ADMIN,
        &["rollback", "--model", MODEL, "--to", "1", "--json"],
    ))
    .json();
    let rb = rb["rollout"].as_i64().unwrap_or_else(|| panic!("{rb}"));
    let s = ok(kiln(
        &url,
        ADMIN,
        &["rollout", "status", &rb.to_string(), "--json"],
    ))
    .json();
    assert_eq!(s["target"]["version"], 1, "{s}");
    assert_eq!(s["state"], "complete", "{s}");
    let e = kiln(&url, ADMIN, &["rollback", "--model", MODEL, "--to", "9"]);
    assert!(e.error_line().contains("not registered"), "{}", e.stderr);

    // models --json and devices --json.
    let m = ok(kiln(&url, ADMIN, &["models", "--json"])).json();
    let m = m.as_array().expect("models array");
    assert_eq!(m.len(), 2, "{m:?}");
    let mut versions: Vec<_> = m
        .iter()
        .map(|x| (x["model"]["model"].clone(), x["model"]["version"].as_u64()))
        .collect();
    versions.sort_by_key(|v| v.1);
    assert_eq!(
        versions,
        vec![(Value::from(MODEL), Some(1)), (Value::from(MODEL), Some(2))]
    );
    for x in m {
        assert_eq!(x["sha256"].as_str().map(str::len), Some(64), "{x}");
    }
    let d = ok(kiln(&url, ADMIN, &["devices", "--json"])).json();
    let d = d.as_array().expect("devices array");
    let mut listed: Vec<String> = d
        .iter()
        .filter_map(|x| x["device_id"].as_str().map(String::from))
        .collect();
    listed.sort();
    ids.sort();
    assert_eq!(listed, ids);
    assert!(d.iter().all(|x| x["running"].is_null()), "{d:?}");
    let table = ok(kiln(&url, ADMIN, &["devices"]));
    assert!(table.stdout.trim().is_empty(), "{}", table.stdout);
    assert!(table.stderr.contains("dev-1"), "{}", table.stderr);

    // Errors: one line on stderr, non-zero exit.
    let e = kiln(
        &url,
        ADMIN,
        &["push", plain.to_str().expect("utf-8"), "--json"],
    );
    assert!(e.error_line().contains("unsigned"), "{}", e.stderr);
    let e = kiln(&url, ADMIN, &["rollout", "status", "9999", "--json"]);
    assert!(e.error_line().contains("404"), "{}", e.stderr);
    let e = kiln(&url, "wrong-token", &["models", "--json"]);
    assert!(e.error_line().contains("401"), "{}", e.stderr);
    let e = kiln(&url, ENROLL, &["devices", "--json"]);
    assert!(e.error_line().contains("403"), "{}", e.stderr);
    let e = kiln(&url, ADMIN, &["push", "/nonexistent/m.kiln", "--json"]);
    assert!(
        e.error_line().contains("/nonexistent/m.kiln"),
        "{}",
        e.stderr
    );
    let e = kiln(&url, ADMIN, &["push", v1s, "--waves", "50,20", "--json"]);
    assert!(e.error_line().contains("waves"), "{}", e.stderr);
    let e = kiln(
        &format!("http://127.0.0.1:{}", free_port()),
        ADMIN,
        &["models", "--json"],
    );
    assert!(e.error_line().contains("cannot reach"), "{}", e.stderr);
    drop(server);
    eprintln!("[{:5.1}s] done", t_start.elapsed().as_secs_f64());
}
