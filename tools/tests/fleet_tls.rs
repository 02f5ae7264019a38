//! `kiln serve --tls-cert/--tls-key` over rustls, with a self-signed certificate made here
//! (rcgen): bad certificate and key files are refused with one line; a real HTTPS request
//! trusting the certificate; `kiln push --ca-cert` and `KILN_CA_CERT`; a client that does not
//! trust it is refused; and the device agent (with its CA set, and `kiln simulate --ca-cert`)
//! enrolls and installs a release over HTTPS.

#[path = "common/fleet.rs"]
mod fleet;

use fleet::{free_port, key_file, kiln, signed, ServeOpts, ServeProc, ADMIN, ENROLL};
use kiln_agent::agent::{Agent, AgentConfig};
use kiln_device::testkit;
use reqwest::StatusCode;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A self-signed certificate for 127.0.0.1 and localhost: (certificate PEM, key PEM).
fn self_signed() -> (String, String) {
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".into()])
        .expect("rcgen certificate");
    (ck.cert.pem(), ck.signing_key.serialize_pem())
}

/// `kiln serve` with `tls_args` must fail at once with one `error:` line naming what is wrong.
fn refused(data: &Path, key: &Path, tls_args: &[&str]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("serve")
        .arg("--data-dir")
        .arg(data)
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", free_port()))
        .args(["--admin-token", ADMIN, "--enroll-token", ENROLL])
        .arg("--trusted-key")
        .arg(key)
        .args(tls_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kiln serve");
    let t0 = Instant::now();
    while child.try_wait().ok().flatten().is_none() {
        if t0.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("kiln serve {tls_args:?} kept running; it should have refused");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("kiln serve output");
    assert!(!out.status.success(), "{tls_args:?} was accepted");
    let err = String::from_utf8_lossy(&out.stderr).trim_end().to_string();
    assert_eq!(err.lines().count(), 1, "one line for {tls_args:?}: {err}");
    assert!(err.starts_with("error: "), "{err}");
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_serve_push_with_ca_cert_and_an_agent_over_tls() {
    let t_start = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    let key = key_file(tmp.path());
    let (cert_pem, key_pem) = self_signed();
    let (_, other_key_pem) = self_signed();
    let cert = tmp.path().join("server.crt");
    let tls_key = tmp.path().join("server.key");
    let other_key = tmp.path().join("other.key");
    let garbage = tmp.path().join("garbage.pem");
    std::fs::write(&cert, &cert_pem).expect("write cert");
    std::fs::write(&tls_key, &key_pem).expect("write key");
    std::fs::write(&other_key, &other_key_pem).expect("write other key");
    std::fs::write(&garbage, "not a certificate\n").expect("write garbage");
    let s = |p: &Path| p.to_str().expect("utf-8 path").to_string();

    // Refusals: one line each, naming the file.
    let data = tmp.path().join("refused");
    let e = refused(
        &data,
        &key,
        &[
            "--tls-cert",
            "/nonexistent/c.pem",
            "--tls-key",
            &s(&tls_key),
        ],
    );
    assert!(e.contains("/nonexistent/c.pem"), "{e}");
    let e = refused(
        &data,
        &key,
        &["--tls-cert", &s(&cert), "--tls-key", "/nonexistent/k.pem"],
    );
    assert!(e.contains("/nonexistent/k.pem"), "{e}");
    let e = refused(
        &data,
        &key,
        &["--tls-cert", &s(&garbage), "--tls-key", &s(&tls_key)],
    );
    assert!(
        e.contains("garbage.pem") && e.contains("CERTIFICATE"),
        "{e}"
    );
    let e = refused(
        &data,
        &key,
        &["--tls-cert", &s(&cert), "--tls-key", &s(&garbage)],
    );
    assert!(
        e.contains("garbage.pem") && e.contains("private key"),
        "{e}"
    );
    let e = refused(
        &data,
        &key,
        &["--tls-cert", &s(&cert), "--tls-key", &s(&other_key)],
    );
    assert!(e.contains("does not fit"), "{e}");

    // The HTTPS server.
    let port = free_port();
    let server = ServeProc::start_with(
        &tmp.path().join("fleet"),
        &key,
        port,
        ServeOpts {
            args: vec![
                "--tls-cert".into(),
                cert.clone().into(),
                "--tls-key".into(),
                tls_key.clone().into(),
            ],
            https_ca: Some(cert_pem.clone().into_bytes()),
            ..ServeOpts::default()
        },
    )
    .await;
    let url = server.url.clone();
    assert!(url.starts_with("https://"), "{url}");

    // A real request over HTTPS, trusting the certificate.
    let resp = server
        .http()
        .get(format!("{url}/api/v1/models"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("https request");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.text().await.expect("body"), "[]");
    let page = server
        .http()
        .get(format!("{url}/"))
        .send()
        .await
        .expect("page over https");
    assert_eq!(page.status(), StatusCode::OK);
    // A client that does not trust the certificate is refused in the handshake, and plain
    // HTTP to the HTTPS port gets no answer.
    let untrusting = reqwest::Client::new();
    let e = untrusting
        .get(format!("{url}/api/v1/models"))
        .send()
        .await
        .expect_err("an untrusted certificate must be refused");
    assert!(e.is_connect(), "{e:?}");
    let plain = untrusting
        .get(format!("http://127.0.0.1:{port}/api/v1/models"))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(
        plain.as_ref().map_or(true, |r| !r.status().is_success()),
        "plain HTTP was served: {plain:?}"
    );

    // kiln push --ca-cert, then the other verbs with KILN_CA_CERT.
    let v1 = tmp.path().join("kws-v1.kiln");
    std::fs::write(&v1, signed(1, false)).expect("write v1");
    let pushed = kiln(
        &[
            "push",
            &s(&v1),
            "--server",
            &url,
            "--token",
            ADMIN,
            "--ca-cert",
            &s(&cert),
            "--waves",
            "100",
            "--wave-wait",
            "0",
            "--json",
        ],
        &[],
    )
    .ok()
    .json();
    let r1 = pushed["rollout"]
        .as_i64()
        .unwrap_or_else(|| panic!("{pushed}"));
    let models = kiln(
        &["models", "--server", &url, "--token", ADMIN, "--json"],
        &[("KILN_CA_CERT", &s(&cert))],
    )
    .ok()
    .json();
    assert_eq!(models[0]["model"]["version"], 1, "{models}");
    // Without the CA: one line that says the server could not be reached, and why.
    let e = kiln(
        &["models", "--server", &url, "--token", ADMIN, "--json"],
        &[],
    );
    let line = e.error_line();
    assert!(line.contains("cannot reach"), "{line}");
    assert!(
        line.to_lowercase().contains("certificate") || line.contains("UnknownIssuer"),
        "{line}"
    );
    // A --ca-cert that is not a certificate.
    let e = kiln(
        &[
            "models",
            "--server",
            &url,
            "--token",
            ADMIN,
            "--ca-cert",
            &s(&garbage),
        ],
        &[],
    );
    assert!(e.error_line().contains("garbage.pem"), "{}", e.stderr);

    // The device agent, trusting the certificate, enrolls and installs v1 over HTTPS.
    let mut cfg = AgentConfig::new(
        &url,
        ENROLL,
        "linux-arm64",
        vec![testkit::public(&fleet::signing_key())],
    );
    cfg.ca_certs.push(cert_pem.into_bytes());
    cfg.max_poll = Duration::from_millis(200);
    let mut agent = Agent::open(cfg, &tmp.path().join("agent")).expect("agent opens");
    agent.enroll().await.expect("enroll over https");
    let t0 = Instant::now();
    while agent.running().map(|m| m.version) != Some(1) {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the agent did not install v1 over HTTPS within 30 s"
        );
        let _ = agent.cycle().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = agent.cycle().await; // reports `installed`
    let status = kiln(
        &[
            "rollout",
            "status",
            &r1.to_string(),
            "--server",
            &url,
            "--token",
            ADMIN,
            "--ca-cert",
            &s(&cert),
            "--json",
        ],
        &[],
    )
    .ok()
    .json();
    assert_eq!(status["devices"]["1"], 1, "{status}");

    // kiln simulate --ca-cert: three simulated devices (the same agent) over HTTPS.
    let sim = kiln(
        &[
            "simulate",
            "--server",
            &url,
            "--enroll-token",
            ENROLL,
            "--devices",
            "3",
            "--trusted-key",
            &s(&key),
            "--ca-cert",
            &s(&cert),
            "--duration",
            "4",
            "--max-poll",
            "0.5",
            "--json",
        ],
        &[],
    )
    .ok()
    .json();
    assert_eq!(sim["final_versions"]["1"], 3, "{sim}");
    drop(server);
    eprintln!("[{:5.1}s] done", t_start.elapsed().as_secs_f64());
}
