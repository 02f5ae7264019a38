//! The admin HTTP client behind `kiln push`, `kiln rollout`, `kiln rollback`, `kiln models` and
//! `kiln devices` (reqwest with rustls).

use super::api::{
    ApiError, DeviceSummary, ModelVersion, PushResponse, RollbackRequest, RolloutRequest,
    RolloutStatus, RolloutSummary,
};
use anyhow::{anyhow, Context as _, Result};
use serde::de::DeserializeOwned;
use std::time::Duration;

/// A client for one server and token.
#[derive(Clone, Debug)]
pub struct Client {
    base: String,
    token: String,
    http: reqwest::Client,
}

#[derive(serde::Deserialize)]
struct Created {
    rollout: i64,
}

impl Client {
    /// A client for `server` (e.g. `http://fleet:8080`) with `token`.
    ///
    /// # Errors
    /// The HTTP client cannot be built.
    pub fn new(server: &str, token: &str) -> Result<Self> {
        Self::with_ca_cert(server, token, None)
    }

    /// As [`Client::new`], also trusting the CA certificate(s) in the PEM file `ca_cert` (for a
    /// server with a private CA or a self-signed certificate).
    ///
    /// # Errors
    /// The file cannot be read or holds no PEM certificate; the HTTP client cannot be built.
    pub fn with_ca_cert(
        server: &str,
        token: &str,
        ca_cert: Option<&std::path::Path>,
    ) -> Result<Self> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(300));
        if let Some(path) = ca_cert {
            for cert in ca_certificates(path)? {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder.build().context("cannot build the HTTP client")?;
        Ok(Client {
            base: server.trim_end_matches('/').to_string(),
            token: token.to_string(),
            http,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> Result<T> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| anyhow!("cannot reach the server {}: {}; hint: check --server (or KILN_SERVER) and that `kiln serve` runs (for https with a private CA, --ca-cert)", self.base, chain(&e)))?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .with_context(|| format!("the server {} dropped the answer", self.base))?;
        if !status.is_success() {
            let msg = serde_json::from_slice::<ApiError>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).trim().to_string());
            return Err(anyhow!("the server refused ({status}): {msg}"));
        }
        serde_json::from_slice(&bytes)
            .with_context(|| format!("the server's answer ({status}) is not the expected JSON"))
    }

    /// Registers an artifact.
    ///
    /// # Errors
    /// Refused (unsigned, untrusted, no name, conflicting version) or unreachable.
    pub async fn push(&self, artifact: Vec<u8>) -> Result<PushResponse> {
        self.send(
            self.http
                .post(self.url("/api/v1/models"))
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(artifact),
        )
        .await
    }

    /// Starts a rollout; its id.
    ///
    /// # Errors
    /// Refused or unreachable.
    pub async fn create_rollout(&self, req: &RolloutRequest) -> Result<i64> {
        let c: Created = self
            .send(self.http.post(self.url("/api/v1/rollouts")).json(req))
            .await?;
        Ok(c.rollout)
    }

    /// The newest rollouts, newest first.
    ///
    /// # Errors
    /// Refused or unreachable.
    pub async fn rollouts(&self) -> Result<Vec<RolloutSummary>> {
        self.send(self.http.get(self.url("/api/v1/rollouts"))).await
    }

    /// A rollout's status.
    ///
    /// # Errors
    /// Refused or unreachable.
    pub async fn rollout_status(&self, id: i64) -> Result<RolloutStatus> {
        self.send(self.http.get(self.url(&format!("/api/v1/rollouts/{id}"))))
            .await
    }

    /// `pause`, `resume` or `abort`.
    ///
    /// # Errors
    /// Refused or unreachable.
    pub async fn rollout_action(&self, id: i64, action: &str) -> Result<RolloutStatus> {
        self.send(
            self.http
                .post(self.url(&format!("/api/v1/rollouts/{id}/{action}"))),
        )
        .await
    }

    /// Orders a model's devices back to a version; the id of the rollback.
    ///
    /// # Errors
    /// Refused or unreachable.
    pub async fn rollback(&self, req: &RollbackRequest) -> Result<i64> {
        let c: Created = self
            .send(self.http.post(self.url("/api/v1/rollback")).json(req))
            .await?;
        Ok(c.rollout)
    }

    /// Registered versions.
    ///
    /// # Errors
    /// Refused or unreachable.
    pub async fn models(&self) -> Result<Vec<ModelVersion>> {
        self.send(self.http.get(self.url("/api/v1/models"))).await
    }

    /// Enrolled devices.
    ///
    /// # Errors
    /// Refused or unreachable.
    pub async fn devices(&self) -> Result<Vec<DeviceSummary>> {
        self.send(self.http.get(self.url("/api/v1/devices"))).await
    }

    /// Moves a registered version to a stage.
    ///
    /// # Errors
    /// Refused (unknown stage, no such version) or unreachable.
    pub async fn set_stage(&self, req: &super::api::StageRequest) -> Result<()> {
        let _: serde_json::Value = self
            .send(self.http.post(self.url("/api/v1/models/stage")).json(req))
            .await?;
        Ok(())
    }

    /// The newest `limit` audit rows, newest first.
    ///
    /// # Errors
    /// Refused or unreachable.
    pub async fn audit(&self, limit: u32) -> Result<Vec<super::api::AuditEntry>> {
        self.send(
            self.http
                .get(self.url(&format!("/api/v1/audit?limit={limit}"))),
        )
        .await
    }
}

/// The certificates of a PEM file, for `--ca-cert` (`KILN_CA_CERT`).
///
/// # Errors
/// The file cannot be read, or it holds no valid PEM certificate.
pub fn ca_certificates(path: &std::path::Path) -> Result<Vec<reqwest::Certificate>> {
    let pem = std::fs::read(path).map_err(|e| {
        anyhow!(
            "cannot read --ca-cert {}: {e}; hint: give the PEM file of the CA (or self-signed certificate) the server's certificate comes from",
            path.display()
        )
    })?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .ok()
        .filter(|c| !c.is_empty())
        .ok_or_else(|| {
            anyhow!(
                "--ca-cert {} holds no PEM certificate; hint: give a file with a `BEGIN CERTIFICATE` block",
                path.display()
            )
        })?;
    Ok(certs)
}

/// An error and its causes on one line (reqwest's own text leaves out why a request failed,
/// e.g. the certificate the server presented is not trusted).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out.replace('\n', " ")
}
