//! The fleet page of `kiln serve` as a person sees it: a real server process with two pushed
//! versions, two rollouts and enrolled devices, the page rendered by headless Chromium
//! (`--dump-dom`), and the rendered DOM checked for the rollouts, their waves and gates, the
//! versions and the devices. Text from the server must come out escaped.

#[path = "common/fleet.rs"]
mod fleet;

use fleet::{enroll, free_port, key_file, signed, ServeProc, ADMIN, MODEL};
use kiln::fleet::api::{CheckIn, CheckInResponse, DeviceEvent, ModelRef, RolloutRequest};
use kiln::fleet::client::Client;
use reqwest::StatusCode;
use std::io::Read as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CHROMIUM: &str = "/usr/bin/chromium";
/// A device name that would run script if the page put server text in as HTML.
const EVIL_NAME: &str = "<img src=x onerror=\"document.title='pwned'\">";

fn rollout(version: u32, waves: &[u8], wave_wait_s: u32) -> RolloutRequest {
    RolloutRequest {
        target: ModelRef {
            model: MODEL.into(),
            version,
        },
        cohort: None,
        waves: waves.to_vec(),
        min_devices: 1,
        max_failure_pct: 5.0,
        max_latency_regression_pct: 20.0,
        max_psi: 0.25,
        wave_wait_s,
    }
}

/// `chromium --headless --dump-dom URL` with a fresh profile; the DOM after the page settled
/// (10 s of virtual time; network fetches hold virtual time back until they finish).
fn dump_dom(url: &str, profile: &Path) -> String {
    let mut child = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(["--virtual-time-budget=10000", "--dump-dom", url])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium");
    let mut stdout = child.stdout.take().expect("chromium stdout");
    let mut stderr = child.stderr.take().expect("chromium stderr");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let t0 = Instant::now();
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        if t0.elapsed() > Duration::from_secs(90) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "chromium did not finish within 90 s; its stderr:\n{}",
                err.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let dom = out.join().unwrap_or_default();
    let log = err.join().unwrap_or_default();
    assert!(
        status.success() && dom.contains("</html>"),
        "chromium failed ({status}); stderr:\n{log}\nstdout:\n{dom}"
    );
    dom
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_page_shows_rollouts_waves_versions_and_devices_in_headless_chromium() {
    let t_start = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    let key = key_file(tmp.path());
    let server = ServeProc::start(&tmp.path().join("fleet"), &key, free_port()).await;
    let url = server.url.clone();
    let http = reqwest::Client::new();

    // The page and its script need no token (they hold no data); the API behind them does.
    for path in ["/", "/ui"] {
        let resp = http.get(format!("{url}{path}")).send().await.expect("page");
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        let h = resp.headers();
        assert_eq!(
            h.get("content-type").and_then(|v| v.to_str().ok()),
            Some("text/html; charset=utf-8")
        );
        let csp = h
            .get("content-security-policy")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        assert!(csp.contains("script-src 'self'"), "{csp}");
        let body = resp.text().await.expect("page body");
        assert!(body.contains("<script src=\"/ui/app.js\">"), "{body}");
    }
    let js = http
        .get(format!("{url}/ui/app.js"))
        .send()
        .await
        .expect("script");
    assert_eq!(js.status(), StatusCode::OK);
    let js = js.text().await.expect("script body");
    assert!(
        !js.contains("innerHTML"),
        "the script must not put server text in as HTML"
    );
    let resp = http
        .get(format!("{url}/api/v1/rollouts"))
        .send()
        .await
        .expect("rollouts without a token");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    // A device enrolls, takes v1 through a one-wave rollout and confirms it; another device
    // with a hostile name enrolls; v2 starts in waves 50,100 and stays in its first wave.
    let admin = Client::new(&url, ADMIN).expect("client");
    let dev = enroll(&http, &url, "web-dev-1").await;
    let evil = enroll(&http, &url, EVIL_NAME).await;
    admin.push(signed(1, false)).await.expect("push v1");
    let r1 = admin
        .create_rollout(&rollout(1, &[100], 0))
        .await
        .expect("rollout v1");
    let checkin = |running: Option<u32>, events: Vec<DeviceEvent>| {
        let http = http.clone();
        let url = url.clone();
        let token = dev.token.clone();
        async move {
            let resp = http
                .post(format!("{url}/api/v1/checkin"))
                .bearer_auth(&token)
                .json(&CheckIn {
                    running: running.map(|version| ModelRef {
                        model: MODEL.into(),
                        version,
                    }),
                    events,
                    telemetry: None,
                })
                .send()
                .await
                .expect("checkin");
            assert_eq!(resp.status(), StatusCode::OK);
            resp.json::<CheckInResponse>().await.expect("checkin json")
        }
    };
    let a = checkin(None, Vec::new())
        .await
        .assignment
        .expect("v1 is assigned");
    assert_eq!(a.target.version, 1);
    let bytes = http
        .get(format!("{url}{}", a.url))
        .bearer_auth(&dev.token)
        .send()
        .await
        .expect("download")
        .bytes()
        .await
        .expect("artifact bytes");
    assert_eq!(kiln::fleet::sha256_hex(&bytes), a.sha256);
    checkin(Some(1), vec![DeviceEvent::Installed { version: 1 }]).await;
    let s1 = admin.rollout_status(r1).await.expect("status v1");
    assert_eq!(
        serde_json::to_value(s1.state).expect("state"),
        "complete",
        "{s1:?}"
    );
    admin.push(signed(2, false)).await.expect("push v2");
    let r2 = admin
        .create_rollout(&rollout(2, &[50, 100], 3600))
        .await
        .expect("rollout v2");
    let list = admin.rollouts().await.expect("rollout list");
    assert_eq!(
        list.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![r2, r1],
        "newest first"
    );

    if !Path::new(CHROMIUM).exists() {
        eprintln!(
            "skipped: {CHROMIUM} not found, the page was not rendered; install it with `apt-get install chromium` (scripts/test.sh does)"
        );
        return;
    }

    // With the token in the address: everything is drawn.
    let dom = dump_dom(
        &format!("{url}/#token={ADMIN}"),
        &tmp.path().join("profile-1"),
    );
    let has = |s: &str| assert!(dom.contains(s), "the page lacks {s:?}:\n{dom}");
    has(&format!("id=\"rollout-{r2}\""));
    has(&format!("rollout {r2}: "));
    has(&format!("rollout {r1}: "));
    has("data-state=\"running\"");
    has("data-state=\"complete\"");
    has("kws v2");
    has("(from v1)");
    has("waves: 50, 100 %");
    // The running wave's gate figures, and the judged one of v1.
    has("data-wave=\"1\"");
    has("data-wave=\"2\"");
    has(">pending<");
    has(">pass<");
    has("devices by version: v1: 1");
    // Versions.
    has(">v1<");
    has(">v2<");
    has(&kiln::fleet::sha256_hex(&signed(1, false))[..16]);
    // Devices, and the hostile name as text.
    has(&format!("data-device=\"{}\"", dev.device_id));
    has(">web-dev-1<");
    has(&format!("data-device=\"{}\"", evil.device_id));
    has("&lt;img src=x onerror=");
    assert!(!dom.contains("<img"), "server text became HTML:\n{dom}");
    assert!(!dom.contains("pwned</title>"), "script ran:\n{dom}");
    // The token left the address and is not written into the page.
    assert!(!dom.contains(ADMIN), "the token is in the page:\n{dom}");
    has("2 rollouts, 2 versions, 2 devices");

    // KILN_WEB_SCREENSHOT=FILE.png: also a picture of the page, to look at.
    if let Some(png) = std::env::var_os("KILN_WEB_SCREENSHOT") {
        let status = Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--window-size=1400,1300",
                "--virtual-time-budget=10000",
                "--hide-scrollbars",
            ])
            .arg(format!(
                "--user-data-dir={}",
                tmp.path().join("profile-shot").display()
            ))
            .arg(format!("--screenshot={}", Path::new(&png).display()))
            .arg(format!("{url}/#token={ADMIN}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("chromium screenshot");
        assert!(status.success(), "chromium --screenshot failed: {status}");
    }

    // Without a token: the form, and no data.
    let dom = dump_dom(&format!("{url}/ui"), &tmp.path().join("profile-2"));
    assert!(dom.contains("Enter the admin token"), "{dom}");
    assert!(!dom.contains(&dev.device_id), "{dom}");
    // A wrong token: the server's refusal, shown as text, and the form again.
    let dom = dump_dom(
        &format!("{url}/#token=not-the-admin-token"),
        &tmp.path().join("profile-3"),
    );
    assert!(dom.contains("The server refused the token"), "{dom}");
    assert!(dom.contains("401"), "{dom}");
    assert!(!dom.contains(&dev.device_id), "{dom}");
    drop(server);
    eprintln!("[{:5.1}s] done", t_start.elapsed().as_secs_f64());
}
