//! The HTTP server: axum routes over [`super::registry`] and [`super::rollout`], Prometheus
//! metrics, `Range` downloads, graceful shutdown.

use super::api::{CheckIn, EnrollRequest, RollbackRequest, RolloutRequest};
use super::auth::{self, Caller};
use super::store::Store;
use super::{db, registry, rollout, ApiErr, ApiResult};
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use sqlx::AnyPool;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Largest artifact a push may carry.
pub const MAX_ARTIFACT_BYTES: usize = 512 << 20;

/// What `kiln serve` is given.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Data folder: `fleet.db` (SQLite) and `artifacts/` unless `database` / `store` say
    /// otherwise.
    pub data_dir: PathBuf,
    /// Database URL (`sqlite://…`, `postgres://…`); `None` = SQLite in the data folder.
    pub database: Option<String>,
    /// Object store URL; `None` = `DATA/artifacts`.
    pub store: Option<String>,
    /// The admin token.
    pub admin_token: String,
    /// The enroll token.
    pub enroll_token: String,
    /// Public keys whose signatures make a pushed artifact acceptable.
    pub trusted_keys: Vec<[u8; 32]>,
}

/// `kiln serve --tls-cert CERT.pem --tls-key KEY.pem`: serve HTTPS with this certificate chain
/// (end-entity first) and its private key (PKCS#8, PKCS#1 or SEC1), both PEM.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// The certificate chain.
    pub cert: PathBuf,
    /// The private key.
    pub key: PathBuf,
}

/// The rustls server configuration for `files` (ring provider, TLS 1.2 and 1.3, ALPN h2 and
/// http/1.1).
///
/// # Errors
/// A file is missing or unreadable, holds no PEM certificate or key, or the key does not belong
/// to the certificate; one line that names the file.
pub fn tls_config(files: &TlsFiles) -> anyhow::Result<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let read = |path: &std::path::Path, flag: &str| {
        std::fs::read(path).map_err(|e| {
            anyhow::anyhow!(
                "cannot read {flag} {}: {e}; hint: give a PEM file",
                path.display()
            )
        })
    };
    let cert_pem = read(&files.cert, "--tls-cert")?;
    let certs = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            anyhow::anyhow!(
                "--tls-cert {} is not a PEM certificate file: {e}",
                files.cert.display()
            )
        })?;
    if certs.is_empty() {
        anyhow::bail!(
            "--tls-cert {} holds no `BEGIN CERTIFICATE` block; hint: give the server's certificate (chain) as PEM",
            files.cert.display()
        );
    }
    let key_pem = read(&files.key, "--tls-key")?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        anyhow::anyhow!(
            "--tls-key {} holds no PEM private key ({e}); hint: give the key of --tls-cert as PKCS#8, PKCS#1 or SEC1 PEM",
            files.key.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow::anyhow!("cannot set up TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            anyhow::anyhow!(
                "--tls-key {} does not fit --tls-cert {}: {e}; hint: give the private key of that certificate",
                files.key.display(),
                files.cert.display()
            )
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Upper bounds (seconds) of the request latency histogram.
const LATENCY_BOUNDS_S: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

#[derive(Default)]
struct Metrics {
    checkins: AtomicU64,
    pushes: AtomicU64,
    enrollments: AtomicU64,
    downloads: AtomicU64,
    download_bytes: AtomicU64,
    errors: AtomicU64,
    requests: AtomicU64,
    latency_us_sum: AtomicU64,
    latency_buckets: [AtomicU64; LATENCY_BOUNDS_S.len()],
}

struct AppState {
    pool: AnyPool,
    store: Store,
    admin_token: String,
    enroll_token: String,
    trusted: Vec<[u8; 32]>,
    metrics: Metrics,
    judged: rollout::JudgeClock,
}

type Shared = State<Arc<AppState>>;

/// A server running in this process (tests, `kiln serve`).
pub struct RunningServer {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// Whether it serves HTTPS.
    pub tls: bool,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    pool: AnyPool,
}

impl RunningServer {
    /// `http://ADDR` (`https://ADDR` with TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Stops taking requests, lets running ones finish, closes the database.
    ///
    /// # Errors
    /// The server task failed.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let r = (&mut self.task).await;
        self.pool.close().await;
        r??;
        Ok(())
    }

    /// Waits until the server ends by itself (it does not, unless it fails).
    ///
    /// # Errors
    /// The server task failed.
    pub async fn wait(self) -> anyhow::Result<()> {
        let r = self.task.await;
        self.pool.close().await;
        r??;
        Ok(())
    }
}

/// Opens the database and store and starts serving HTTP on `listen` (`127.0.0.1:0` picks a
/// port).
///
/// # Errors
/// Bad configuration, the database or store cannot be opened, or the address cannot be bound.
pub async fn start(config: ServerConfig, listen: &str) -> anyhow::Result<RunningServer> {
    start_with_tls(config, listen, None).await
}

/// As [`start`], serving HTTPS when `tls` is given.
///
/// # Errors
/// As [`start`], and the certificate or key cannot be loaded ([`tls_config`]).
pub async fn start_with_tls(
    config: ServerConfig,
    listen: &str,
    tls: Option<&TlsFiles>,
) -> anyhow::Result<RunningServer> {
    use anyhow::Context as _;
    // TLS files first: a bad certificate should not leave a half-created data folder behind.
    let tls_config = tls.map(tls_config).transpose()?;
    if config.admin_token.len() < 8 || config.enroll_token.len() < 8 {
        anyhow::bail!("--admin-token and --enroll-token need at least 8 characters each; hint: use long random strings");
    }
    if config.admin_token == config.enroll_token {
        anyhow::bail!("--admin-token and --enroll-token must differ");
    }
    if config.trusted_keys.is_empty() {
        anyhow::bail!("no --trusted-key given: the server would refuse every push; hint: pass the .pub file of the key that signs your artifacts");
    }
    std::fs::create_dir_all(&config.data_dir).with_context(|| {
        format!(
            "cannot create the data folder {}",
            config.data_dir.display()
        )
    })?;
    let url = config
        .database
        .clone()
        .unwrap_or_else(|| db::default_url(&config.data_dir));
    let (pool, _backend) = db::connect(&url).await?;
    let store = match &config.store {
        Some(u) => {
            let store = Store::from_url(u)?;
            store.check(u).await?;
            store
        }
        None => Store::local(&config.data_dir.join("artifacts"))?,
    };
    let state = Arc::new(AppState {
        pool: pool.clone(),
        store,
        admin_token: config.admin_token,
        enroll_token: config.enroll_token,
        trusted: config.trusted_keys,
        metrics: Metrics::default(),
        judged: rollout::JudgeClock::default(),
    });
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    let app = router(state);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = match tls_config {
        None => tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await
        }),
        Some(tls) => {
            let std_listener = listener
                .into_std()
                .with_context(|| format!("cannot listen on {listen}"))?;
            let tls = axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(tls));
            let handle = axum_server::Handle::new();
            let server = axum_server::from_tcp_rustls(std_listener, tls)
                .with_context(|| format!("cannot listen on {listen}"))?
                .handle(handle.clone());
            tokio::spawn(async move {
                let _ = rx.await;
                handle.graceful_shutdown(Some(GRACEFUL_SHUTDOWN));
            });
            tokio::spawn(server.serve(app.into_make_service()))
        }
    };
    Ok(RunningServer {
        addr,
        tls: tls.is_some(),
        stop: Some(tx),
        task,
        pool,
    })
}

/// How long requests may run on after a TLS server is told to stop.
const GRACEFUL_SHUTDOWN: std::time::Duration = std::time::Duration::from_secs(30);

/// `kiln serve`: runs until SIGTERM or Ctrl-C, then shuts down gracefully.
///
/// # Errors
/// As [`start`].
pub async fn serve_until_signal(
    config: ServerConfig,
    listen: &str,
    tls: Option<&TlsFiles>,
) -> anyhow::Result<()> {
    let server = start_with_tls(config, listen, tls).await?;
    eprintln!("kiln serve: listening on {}", server.url());
    shutdown_signal().await;
    eprintln!("kiln serve: shutting down");
    server.stop().await
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route(
            "/api/v1/models",
            post(push)
                .layer(DefaultBodyLimit::max(MAX_ARTIFACT_BYTES))
                .get(models),
        )
        .route("/api/v1/models/stage", post(set_stage))
        .route("/api/v1/audit", get(audit_log))
        .route("/api/v1/enroll", post(enroll))
        .route("/api/v1/devices", get(devices))
        .route("/api/v1/checkin", post(checkin))
        .route("/api/v1/artifacts/{sha256}", get(artifact))
        .route("/api/v1/rollouts", post(create_rollout).get(list_rollouts))
        .route("/api/v1/rollouts/{id}", get(rollout_status))
        .route("/api/v1/rollouts/{id}/{action}", post(rollout_action))
        .route("/api/v1/rollback", post(rollback))
        .merge(super::web::routes())
        .fallback(|| async {
            ApiErr::not_found("no such endpoint; see docs/FLEET_API.md for the API")
        })
        .method_not_allowed_fallback(|| async {
            ApiErr::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this endpoint; see docs/FLEET_API.md",
            )
        })
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

async fn track(State(s): Shared, req: Request, next: Next) -> Response {
    let t = Instant::now();
    let resp = next.run(req).await;
    let secs = t.elapsed().as_secs_f64();
    let m = &s.metrics;
    m.requests.fetch_add(1, Ordering::Relaxed);
    m.latency_us_sum
        .fetch_add((secs * 1e6) as u64, Ordering::Relaxed);
    for (b, bound) in m.latency_buckets.iter().zip(LATENCY_BOUNDS_S) {
        if secs <= bound {
            b.fetch_add(1, Ordering::Relaxed);
        }
    }
    if resp.status().is_client_error() || resp.status().is_server_error() {
        m.errors.fetch_add(1, Ordering::Relaxed);
    }
    resp
}

fn body_of(body: Result<Bytes, BytesRejection>) -> ApiResult<Bytes> {
    body.map_err(|e| ApiErr::new(e.status(), e.body_text()))
}

fn json_of<T: serde::de::DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> ApiResult<T> {
    let b = body_of(body)?;
    serde_json::from_slice(&b).map_err(|e| {
        ApiErr::bad_request(format!(
            "request body is not the expected JSON: {e}; see docs/FLEET_API.md"
        ))
    })
}

async fn metrics(State(s): Shared, headers: HeaderMap) -> ApiResult<Response> {
    auth::admin(&headers, &s.admin_token, &s.enroll_token, &s.pool).await?;
    let m = &s.metrics;
    let mut out = String::new();
    let counters = [
        ("kiln_checkins_total", "Device check-ins.", &m.checkins),
        (
            "kiln_pushes_total",
            "Artifacts pushed (registered).",
            &m.pushes,
        ),
        (
            "kiln_enrollments_total",
            "Devices enrolled.",
            &m.enrollments,
        ),
        (
            "kiln_artifact_downloads_total",
            "Artifact downloads (including ranges).",
            &m.downloads,
        ),
        (
            "kiln_artifact_download_bytes_total",
            "Artifact bytes served.",
            &m.download_bytes,
        ),
        (
            "kiln_http_errors_total",
            "Responses with a 4xx or 5xx status.",
            &m.errors,
        ),
    ];
    for (name, help, v) in counters {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            v.load(Ordering::Relaxed)
        );
    }
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, COUNT(*) FROM rollouts GROUP BY state")
            .fetch_all(&s.pool)
            .await?;
    let _ = writeln!(
        out,
        "# HELP kiln_rollouts Rollouts by state.\n# TYPE kiln_rollouts gauge"
    );
    for st in ["running", "paused", "complete", "aborted", "superseded"] {
        let n = rows.iter().find(|(k, _)| k == st).map_or(0, |(_, n)| *n);
        let _ = writeln!(out, "kiln_rollouts{{state=\"{st}\"}} {n}");
    }
    let (devices,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM devices")
        .fetch_one(&s.pool)
        .await?;
    let _ = writeln!(
        out,
        "# HELP kiln_devices Enrolled devices.\n# TYPE kiln_devices gauge\nkiln_devices {devices}"
    );
    let name = "kiln_http_request_duration_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} HTTP request latency.\n# TYPE {name} histogram"
    );
    for (b, bound) in m.latency_buckets.iter().zip(LATENCY_BOUNDS_S) {
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"{bound}\"}} {}",
            b.load(Ordering::Relaxed)
        );
    }
    let count = m.requests.load(Ordering::Relaxed);
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
    let _ = writeln!(
        out,
        "{name}_sum {}\n{name}_count {count}",
        m.latency_us_sum.load(Ordering::Relaxed) as f64 / 1e6
    );
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}

async fn push(
    State(s): Shared,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    auth::admin(&headers, &s.admin_token, &s.enroll_token, &s.pool).await?;
    let bytes = body_of(body)?;
    let r = registry::push(&s.pool, &s.store, &s.trusted, "admin", bytes.to_vec()).await?;
    s.metrics.pushes.fetch_add(1, Ordering::Relaxed);
    let status = if r.existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(r)).into_response())
}

async fn models(State(s): Shared, headers: HeaderMap) -> ApiResult<Response> {
    auth::admin(&headers, &s.admin_token, &s.enroll_token, &s.pool).await?;
    Ok(Json(registry::list_models(&s.pool).await?).into_response())
}

async fn set_stage(
    State(s): Shared,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    auth::admin(&headers, &s.admin_token, &s.enroll_token, &s.pool).await?;
    let req: super::api::StageRequest = json_of(body)?;
    registry::set_stage(&s.pool, "admin", &req).await?;
    Ok(Json(serde_json::json!({ "model": req.target, "stage": req.stage })).into_response())
}

/// `GET /api/v1/audit?limit=N` (default 100, at most 10 000), newest first.
async fn audit_log(
    State(s): Shared,
    headers: HeaderMap,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> ApiResult<Response> {
    auth::admin(&headers, &s.admin_token, &s.enroll_token, &s.pool).await?;
    let mut limit = 100i64;
    for pair in query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=') {
            Some(("limit", v)) => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=10_000).contains(n))
                    .ok_or_else(|| {
                        ApiErr::bad_request(format!("limit={v} is not a count from 1 to 10000"))
                    })?;
            }
            _ => {
                return Err(ApiErr::bad_request(format!(
                    "unknown query parameter {pair:?}; the audit log takes limit=N"
                )))
            }
        }
    }
    Ok(Json(registry::list_audit(&s.pool, limit).await?).into_response())
}

async fn enroll(
    State(s): Shared,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    auth::enroll(&headers, &s.enroll_token, &s.admin_token)?;
    let req: EnrollRequest = json_of(body)?;
    let r = registry::enroll(&s.pool, &req).await?;
    s.metrics.enrollments.fetch_add(1, Ordering::Relaxed);
    Ok((StatusCode::CREATED, Json(r)).into_response())
}

async fn devices(State(s): Shared, headers: HeaderMap) -> ApiResult<Response> {
    auth::admin(&headers, &s.admin_token, &s.enroll_token, &s.pool).await?;
    Ok(Json(registry::list_devices(&s.pool).await?).into_response())
}

async fn checkin(
    State(s): Shared,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    // The body is parsed before a database connection is taken, the credential refused first.
    let req: ApiResult<CheckIn> = json_of(body);
    let mut conn = s.pool.acquire().await?;
    let dev = auth::device(&headers, &mut *conn, &s.admin_token, &s.enroll_token).await?;
    let r = rollout::checkin(&mut conn, &s.judged, &dev, &req?).await?;
    s.metrics.checkins.fetch_add(1, Ordering::Relaxed);
    Ok(Json(r).into_response())
}

/// A parsed `Range: bytes=…` header (one range).
fn parse_range(v: &str, size: u64) -> Option<std::ops::Range<u64>> {
    let spec = v.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    let r = if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        size.saturating_sub(n)..size
    } else {
        let start: u64 = a.parse().ok()?;
        let end = if b.is_empty() {
            size
        } else {
            b.parse::<u64>().ok()?.saturating_add(1).min(size)
        };
        start..end
    };
    (r.start < r.end && r.end <= size).then_some(r)
}

async fn artifact(
    State(s): Shared,
    headers: HeaderMap,
    UrlPath(sha256): UrlPath<String>,
) -> ApiResult<Response> {
    let caller = auth::admin_or_device(&headers, &s.pool, &s.admin_token, &s.enroll_token).await?;
    let found: Option<(i64,)> = sqlx::query_as("SELECT size FROM models WHERE sha256 = $1")
        .bind(&sha256)
        .fetch_optional(&s.pool)
        .await?;
    let Some((size,)) = found else {
        return Err(ApiErr::not_found(format!(
            "no artifact with sha256 {sha256}"
        )));
    };
    if let Caller::Device(dev) = &caller {
        let mut conn = s.pool.acquire().await?;
        let assigned = rollout::assignment(&mut conn, dev).await?;
        let running: Option<(String,)> = match (&dev.running_model, dev.running_version) {
            (Some(m), Some(v)) => {
                sqlx::query_as("SELECT sha256 FROM models WHERE name = $1 AND version = $2")
                    .bind(m)
                    .bind(v)
                    .fetch_optional(&mut *conn)
                    .await?
            }
            _ => None,
        };
        let ok =
            assigned.is_some_and(|a| a.sha256 == sha256) || running.is_some_and(|(r,)| r == sha256);
        if !ok {
            return Err(ApiErr::new(
                StatusCode::FORBIDDEN,
                "forbidden: this artifact is not assigned to this device; check in for your assignment",
            ));
        }
    }
    let size = size as u64;
    let (status, range) = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        None => (StatusCode::OK, 0..size),
        Some(v) => match parse_range(v, size) {
            Some(r) => (StatusCode::PARTIAL_CONTENT, r),
            None => {
                let mut resp = ApiErr::new(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    format!("range `{v}` is not satisfiable for {size} bytes; ask for one range inside the file"),
                )
                .into_response();
                if let Ok(h) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    resp.headers_mut().insert(header::CONTENT_RANGE, h);
                }
                return Ok(resp);
            }
        },
    };
    let bytes = s
        .store
        .get_range(&sha256, range.clone())
        .await
        .map_err(|e| ApiErr::internal("cannot read the artifact from the store", e))?;
    s.metrics.downloads.fetch_add(1, Ordering::Relaxed);
    s.metrics
        .download_bytes
        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
    let mut resp = Response::new(Body::from(bytes));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if status == StatusCode::PARTIAL_CONTENT {
        let cr = format!("bytes {}-{}/{size}", range.start, range.end - 1);
        if let Ok(v) = HeaderValue::from_str(&cr) {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    Ok(resp)
}

async fn create_rollout(
    State(s): Shared,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    auth::admin(&headers, &s.admin_token, &s.enroll_token, &s.pool).await?;
    let req: RolloutRequest = json_of(body)?;
    let id = rollout::create(&s.pool, "admin", &req).await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({ "rollout": id })),
    )
        .into_response())
}

/// Most rollouts `GET /api/v1/rollouts` lists (the newest).
const ROLLOUT_LIST_LIMIT: i64 = 200;

async fn list_rollouts(State(s): Shared, headers: HeaderMap) -> ApiResult<Response> {
    auth::admin(&headers, &s.admin_token, &s.enroll_token, &s.pool).await?;
    Ok(Json(rollout::list(&s.pool, ROLLOUT_LIST_LIMIT).await?).into_response())
}

fn rollout_id(id: &str) -> ApiResult<i64> {
    id.parse()
        .map_err(|_| ApiErr::bad_request(format!("rollout id `{id}` is not a number")))
}

async fn rollout_status(
    State(s): Shared,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Response> {
    auth::admin(&headers, &s.admin_token, &s.enroll_token, &s.pool).await?;
    let id = rollout_id(&id)?;
    Ok(Json(rollout::status(&s.pool, id).await?).into_response())
}

async fn rollout_action(
    State(s): Shared,
    headers: HeaderMap,
    UrlPath((id, action)): UrlPath<(String, String)>,
) -> ApiResult<Response> {
    auth::admin(&headers, &s.admin_token, &s.enroll_token, &s.pool).await?;
    let id = rollout_id(&id)?;
    Ok(Json(rollout::act(&s.pool, "admin", id, &action).await?).into_response())
}

async fn rollback(
    State(s): Shared,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    auth::admin(&headers, &s.admin_token, &s.enroll_token, &s.pool).await?;
    let req: RollbackRequest = json_of(body)?;
    let id = rollout::rollback(&s.pool, "admin", &req).await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({ "rollout": id })),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some(0..10));
        assert_eq!(parse_range("bytes=90-", 100), Some(90..100));
        assert_eq!(parse_range("bytes=-10", 100), Some(90..100));
        assert_eq!(parse_range("bytes=95-200", 100), Some(95..100));
        assert_eq!(parse_range("bytes=100-", 100), None);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), None);
        assert_eq!(parse_range("items=0-1", 100), None);
    }
}
