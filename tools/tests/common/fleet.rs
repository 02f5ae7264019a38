//! Shared helpers of the fleet tests that drive a real `kiln serve` process: signed testkit
//! artifacts with a MANIFEST and a BASELINE, the server process (plain or HTTPS, with extra
//! arguments and environment), free ports, enrollment, and running `kiln` verbs.
//!
//! Include with `#[path = "common/fleet.rs"] mod fleet;`.
#![allow(dead_code)]

use kiln::artifact::{write_artifact, HeaderFields};
use kiln::fleet::api::{EnrollRequest, EnrollResponse};
use kiln_device::testkit::{self, Spec};
use kiln_runtime::format::{Container, SectionKind};
use kiln_runtime::sections::{BaselineHead, BaselineHistogram, BaselineTensor, Manifest};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ADMIN: &str = "admin-token-0123456789";
pub const ENROLL: &str = "enroll-token-0123456789";
pub const MODEL: &str = "kws";
/// Reference counts of the BASELINE histograms (4 equal-mass bins).
pub const BASE: [u32; 4] = [250, 250, 250, 250];

pub fn signing_key() -> ed25519_dalek::SigningKey {
    testkit::test_key(7)
}

/// A testkit artifact with a MANIFEST (name `kws`) and a BASELINE (input 0 and output 0),
/// unsigned, security counter 1 (so a release may be rolled back).
pub fn unsigned(version: u32, bad_selftest: bool) -> Vec<u8> {
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

/// [`unsigned`], signed by [`signing_key`].
pub fn signed(version: u32, bad_selftest: bool) -> Vec<u8> {
    testkit::sign(&unsigned(version, bad_selftest), &[&signing_key()])
}

/// A free loopback port: bind port 0, note the port, release it.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// The trusted public key file for `kiln serve --trusted-key`.
pub fn key_file(dir: &Path) -> PathBuf {
    let p = dir.join("release.pub");
    std::fs::write(
        &p,
        kiln::signing::public_key_text(&testkit::public(&signing_key())),
    )
    .expect("write key");
    p
}

/// How to start `kiln serve` beyond the defaults.
#[derive(Default)]
pub struct ServeOpts {
    /// More arguments (`--store …`, `--tls-cert …`).
    pub args: Vec<OsString>,
    /// More environment (`AWS_…`).
    pub env: Vec<(OsString, OsString)>,
    /// HTTPS: the CA (PEM) that the readiness probe trusts; `None` = plain HTTP.
    pub https_ca: Option<Vec<u8>>,
}

/// A `kiln serve` child process, killed (SIGKILL) and reaped when dropped.
pub struct ServeProc {
    child: Option<Child>,
    pub url: String,
    pub log: PathBuf,
    http: reqwest::Client,
}

impl ServeProc {
    /// Starts `kiln serve` on `data_dir` at `port` (plain HTTP) and waits until it answers.
    pub async fn start(data_dir: &Path, key_file: &Path, port: u16) -> ServeProc {
        Self::start_with(data_dir, key_file, port, ServeOpts::default()).await
    }

    /// Starts `kiln serve` with `opts` and waits until it answers.
    pub async fn start_with(
        data_dir: &Path,
        key_file: &Path,
        port: u16,
        opts: ServeOpts,
    ) -> ServeProc {
        let log = data_dir.with_extension("log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
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
            .args(&opts.args)
            .envs(opts.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn kiln serve");
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(10));
        let scheme = match &opts.https_ca {
            Some(pem) => {
                builder = builder.add_root_certificate(
                    reqwest::Certificate::from_pem(pem).expect("CA certificate parses"),
                );
                "https"
            }
            None => "http",
        };
        let mut p = ServeProc {
            child: Some(child),
            url: format!("{scheme}://127.0.0.1:{port}"),
            log,
            http: builder.build().expect("http client"),
        };
        p.wait_ready().await;
        p
    }

    /// A client that trusts what the server presents (its CA for HTTPS).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    async fn wait_ready(&mut self) {
        let t0 = Instant::now();
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!(
                        "kiln serve exited early: {status}; its log:\n{}",
                        std::fs::read_to_string(&self.log).unwrap_or_default()
                    );
                }
            }
            let ok = self
                .http
                .get(format!("{}/api/v1/models", self.url))
                .bearer_auth(ADMIN)
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "kiln serve did not answer within 30 s; its log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL (`Child::kill`), then reap.
    pub fn kill9(&mut self) {
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

/// Enrolls a device (as the agent does); its id and token.
pub async fn enroll(http: &reqwest::Client, url: &str, name: &str) -> EnrollResponse {
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
    assert_eq!(resp.status(), reqwest::StatusCode::CREATED);
    resp.json().await.expect("enroll json")
}

/// What a `kiln` run gave.
pub struct Out {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    /// Stdout as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.stdout))
    }

    /// A failure: non-zero exit, nothing on stdout, one line on stderr; returns it.
    pub fn error_line(&self) -> &str {
        assert!(!self.ok, "expected a failure, got: {}", self.stdout);
        assert!(self.stdout.trim().is_empty(), "stdout: {}", self.stdout);
        let line = self.stderr.trim_end();
        assert_eq!(line.lines().count(), 1, "one line on stderr: {line:?}");
        assert!(line.starts_with("error: "), "{line}");
        line
    }

    /// Asserts success; itself.
    pub fn ok(self) -> Out {
        assert!(self.ok, "kiln failed: {}", self.stderr);
        self
    }
}

/// Runs `kiln ARGS…` with `env` (and no inherited KILN_* settings).
pub fn kiln(args: &[&str], env: &[(&str, &str)]) -> Out {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env_remove("KILN_SERVER")
        .env_remove("KILN_TOKEN")
        .env_remove("KILN_CA_CERT")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run kiln");
    Out {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
