//! The registry's stages and audit log through a real `kiln serve` and the `kiln` CLI: a pushed
//! version is `registered`; `kiln stage` moves it, and a version entering production sends the
//! previous production version to `archived`; unknown stages and versions are refused with one
//! line; `kiln audit` shows who did what, newest first, and only to the admin.

#[path = "common/fleet.rs"]
mod fleet;

use fleet::{free_port, key_file, kiln, signed, ServeProc, ADMIN, ENROLL, MODEL};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stages_and_the_audit_log() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let key = key_file(tmp.path());
    let server = ServeProc::start(&tmp.path().join("fleet"), &key, free_port()).await;
    let url = server.url.clone();
    let conn = ["--server", url.as_str(), "--token", ADMIN];
    for v in 1..=2 {
        let path = tmp.path().join(format!("kws-v{v}.kiln"));
        std::fs::write(&path, signed(v, false)).expect("write");
        let pushed = server
            .http()
            .post(format!("{url}/api/v1/models"))
            .bearer_auth(ADMIN)
            .body(std::fs::read(&path).expect("read"))
            .send()
            .await
            .expect("push");
        assert!(pushed.status().is_success(), "{pushed:?}");
    }
    let stages = |out: serde_json::Value| -> Vec<(u64, String)> {
        out.as_array()
            .expect("array")
            .iter()
            .map(|m| {
                (
                    m["model"]["version"].as_u64().expect("version"),
                    m["stage"].as_str().expect("stage").to_string(),
                )
            })
            .collect()
    };
    let models = |args: &[&str]| {
        kiln(&[&["models", "--json"][..], args].concat(), &[])
            .ok()
            .json()
    };
    assert_eq!(
        stages(models(&conn)),
        [(1, "registered".into()), (2, "registered".into())]
    );

    let stage = |v: &str, s: &str| {
        kiln(
            &[
                &["stage", "--model", MODEL, "--version", v, s][..],
                &conn[..],
            ]
            .concat(),
            &[],
        )
    };
    stage("1", "production").ok();
    stage("2", "staging").ok();
    assert_eq!(
        stages(models(&conn)),
        [(1, "production".into()), (2, "staging".into())]
    );
    stage("2", "production").ok();
    assert_eq!(
        stages(models(&conn)),
        [(1, "archived".into()), (2, "production".into())],
        "the previous production version is archived"
    );

    // Refusals: an unknown stage (clap lists the stages), a version that is not registered.
    let bad = stage("2", "prod");
    assert!(!bad.ok);
    assert!(bad.stderr.contains("production"), "{}", bad.stderr);
    let missing = stage("9", "staging");
    assert!(!missing.ok);
    assert!(
        missing.error_line().contains("not registered"),
        "{}",
        missing.stderr
    );

    // The audit log: newest first, with the pushes and the stage moves.
    let audit = kiln(
        &[&["audit", "--json", "--limit", "10"][..], &conn[..]].concat(),
        &[],
    )
    .ok()
    .json();
    let actions: Vec<&str> = audit
        .as_array()
        .expect("array")
        .iter()
        .map(|r| r["action"].as_str().expect("action"))
        .collect();
    assert_eq!(
        actions,
        ["stage", "stage", "stage", "push", "push"],
        "{audit}"
    );
    assert_eq!(audit[0]["detail"], format!("{MODEL} v2 -> production"));
    assert!(audit[0]["at"].as_str().is_some_and(|a| a.contains('T')));

    // Only the admin reads it.
    let http = server.http();
    for (token, want) in [(None, 401), (Some(ENROLL), 403), (Some("wrong"), 401)] {
        let mut req = http.get(format!("{url}/api/v1/audit"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let status = req.send().await.expect("audit").status();
        assert_eq!(status.as_u16(), want, "token {token:?}");
    }
    let bad_limit = http
        .get(format!("{url}/api/v1/audit?limit=0"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("audit");
    assert_eq!(bad_limit.status().as_u16(), 400);
}
