//! `kiln serve --store s3://bucket/prefix` against a real S3-compatible server on loopback
//! (moto's `moto_server`, from PyPI: `pip install 'moto[server]'`), configured the usual way
//! through `AWS_*` variables: a signed artifact pushed with `kiln push` lands in the bucket, a
//! device downloads it (whole and by range), a restarted server still serves it, and a missing
//! bucket stops the server at start with one line. Skips with a line when `moto_server` is
//! absent (scripts/test.sh installs it).

#[path = "common/fleet.rs"]
mod fleet;

use fleet::{enroll, free_port, key_file, kiln, signed, ServeOpts, ServeProc, ADMIN, ENROLL};
use kiln::fleet::api::{CheckIn, CheckInResponse};
use object_store::ObjectStoreExt as _;
use reqwest::StatusCode;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BUCKET: &str = "kiln-artifacts";

/// `moto_server` on PATH.
fn moto_server() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("moto_server"))
        .find(|p| p.is_file())
}

/// The S3 server process, killed and reaped when dropped.
struct Moto {
    child: Child,
    url: String,
}

impl Moto {
    async fn start(bin: &Path, log: &Path) -> Moto {
        let port = free_port();
        let log_file = std::fs::File::create(log).expect("moto log");
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log"))
            .stderr(log_file)
            .spawn()
            .expect("start moto_server");
        let mut m = Moto {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let http = reqwest::Client::new();
        let t0 = Instant::now();
        loop {
            if let Ok(Some(status)) = m.child.try_wait() {
                panic!(
                    "moto_server exited early: {status}; its log:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            let up = http
                .get(format!("{}/", m.url))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if up {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "moto_server did not answer within 60 s; its log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // A bucket, as an operator would create it.
        let resp = http
            .put(format!("{}/{BUCKET}", m.url))
            .send()
            .await
            .expect("create bucket");
        assert!(resp.status().is_success(), "create bucket: {resp:?}");
        m
    }

    /// The `AWS_*` settings for this server.
    fn env(&self) -> Vec<(OsString, OsString)> {
        [
            ("AWS_ACCESS_KEY_ID", "kiln-test"),
            ("AWS_SECRET_ACCESS_KEY", "kiln-test-secret"),
            ("AWS_DEFAULT_REGION", "us-east-1"),
            ("AWS_ENDPOINT", self.url.as_str()),
            ("AWS_ALLOW_HTTP", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_an_s3_store_push_download_and_restart() {
    let Some(bin) = moto_server() else {
        eprintln!(
            "skipped: moto_server not found on PATH, the S3 store was not tested; install it with `pip install 'moto[server]==5.2.1'` (scripts/test.sh does)"
        );
        return;
    };
    let t_start = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    let key = key_file(tmp.path());
    let moto = Moto::start(&bin, &tmp.path().join("moto.log")).await;
    let opts = |store: &str| ServeOpts {
        args: vec!["--store".into(), store.into()],
        env: moto.env(),
        https_ca: None,
    };
    let store_url = format!("s3://{BUCKET}/fleet-a");
    let data = tmp.path().join("fleet");
    let port = free_port();
    let mut server = ServeProc::start_with(&data, &key, port, opts(&store_url)).await;
    let url = server.url.clone();
    eprintln!(
        "[{:5.1}s] moto and kiln serve up",
        t_start.elapsed().as_secs_f64()
    );

    // kiln push: the artifact goes to the bucket under the prefix, not to the data folder.
    let artifact = signed(1, false);
    let sha = kiln::fleet::sha256_hex(&artifact);
    let v1 = tmp.path().join("kws-v1.kiln");
    std::fs::write(&v1, &artifact).expect("write v1");
    let v1s = v1.to_str().expect("utf-8 path");
    kiln(
        &[
            "push", v1s, "--server", &url, "--token", ADMIN, "--waves", "100", "--json",
        ],
        &[],
    )
    .ok();
    let bucket = object_store::aws::AmazonS3Builder::new()
        .with_endpoint(&moto.url)
        .with_allow_http(true)
        .with_region("us-east-1")
        .with_bucket_name(BUCKET)
        .with_access_key_id("kiln-test")
        .with_secret_access_key("kiln-test-secret")
        .build()
        .expect("S3 client");
    let object = bucket
        .get(&object_store::path::Path::from(format!(
            "fleet-a/artifacts/{sha}"
        )))
        .await
        .expect("the artifact is in the bucket under the prefix")
        .bytes()
        .await
        .expect("object bytes");
    assert_eq!(object.as_ref(), &artifact[..]);
    assert!(
        !data.join("artifacts").join(&sha).exists(),
        "the artifact was written to the data folder"
    );
    let http = reqwest::Client::new();

    // A device downloads it as the agent does: whole, then a range.
    let dev = enroll(&http, &url, "s3-dev").await;
    let download = |range: Option<&'static str>| {
        let http = http.clone();
        let url = url.clone();
        let token = dev.token.clone();
        async move {
            let resp: CheckInResponse = http
                .post(format!("{url}/api/v1/checkin"))
                .bearer_auth(&token)
                .json(&CheckIn {
                    running: None,
                    events: Vec::new(),
                    telemetry: None,
                })
                .send()
                .await
                .expect("checkin")
                .json()
                .await
                .expect("checkin json");
            let a = resp.assignment.expect("v1 is assigned");
            let mut req = http.get(format!("{url}{}", a.url)).bearer_auth(&token);
            if let Some(r) = range {
                req = req.header("range", r);
            }
            let resp = req.send().await.expect("download");
            let status = resp.status();
            (
                status,
                resp.bytes().await.expect("bytes").to_vec(),
                a.sha256,
            )
        }
    };
    let (status, bytes, want) = download(None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(want, sha);
    assert_eq!(kiln::fleet::sha256_hex(&bytes), sha);
    let (status, tail, _) = download(Some("bytes=100-")).await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(tail, artifact[100..]);

    // kill -9 and a restart on the same database and bucket: still served.
    server.kill9();
    let server = ServeProc::start_with(&data, &key, port, opts(&store_url)).await;
    let (status, bytes, _) = download(None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(bytes, artifact);
    drop(server);

    // A bucket that does not exist: one line at start, exit non-zero.
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("serve")
        .arg("--data-dir")
        .arg(tmp.path().join("fleet-b"))
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", free_port()))
        .args(["--admin-token", ADMIN, "--enroll-token", ENROLL])
        .arg("--trusted-key")
        .arg(&key)
        .args(["--store", "s3://no-such-bucket/x"])
        .envs(moto.env())
        .stdin(Stdio::null())
        .output()
        .expect("kiln serve");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).trim_end().to_string();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: cannot use the store s3://no-such-bucket/x"),
        "{err}"
    );
    drop(moto);
    eprintln!("[{:5.1}s] done", t_start.elapsed().as_secs_f64());
}
