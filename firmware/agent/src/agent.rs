//! The agent's state machine: enroll once, then check in, download, verify, install, self-test,
//! confirm or revert, report.
//!
//! ```text
//! open ─► finish a pending trial ─► load the active slot (fall back to the other one)
//!   loop:
//!     enroll (once) ─► check in {running, events, telemetry}
//!       ├─ no assignment / already running it / refused before ─► sleep next_checkin_s ± jitter
//!       └─ assignment ─► download (Range resume from DIR/*.part) ─► SHA-256 ─► verify
//!            (signature, board, counter, version unless rollback) ─► write inactive slot
//!            ─► trial: self-test ─► confirm (Installed) | revert (SelfTestFailed)
//!     on errors: exponential backoff with jitter; every request has a timeout
//! ```

use crate::api::{
    Assignment, CheckIn, CheckInResponse, DeviceEvent, EnrollRequest, EnrollResponse, ModelRef,
    Telemetry, LATENCY_BUCKETS_US,
};
use crate::model::{sha256_hex, ModelFault, VerifiedModel};
use crate::store::{SlotRecord, Store, StoreError};
use kiln_runtime::sections::BaselineTensor;
use std::io::{Read, Seek, Write};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Largest artifact the agent downloads.
pub const MAX_ARTIFACT_BYTES: u64 = 256 << 20;
/// Digest mismatches of one artifact in a row before the agent reports an install failure.
pub const MAX_DIGEST_RETRIES: u32 = 5;

/// Faults injected by the simulator (all off by default).
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Probability that an HTTP request fails, or that a download connection drops per chunk.
    pub drop: f64,
    /// Probability that a download has one byte flipped.
    pub corrupt: f64,
    /// Probability that an install crashes midway (at a random step).
    pub crash: f64,
    /// A version whose self-test fails on this device.
    pub fail_selftest_version: Option<u32>,
}

/// How the agent runs.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Server base URL (`http://host:port`).
    pub server: String,
    /// Enroll token.
    pub enroll_token: String,
    /// Board name.
    pub board: String,
    /// Device name for people.
    pub name: String,
    /// Cohort.
    pub cohort: Option<String>,
    /// Trusted public keys.
    pub trusted_keys: Vec<[u8; 32]>,
    /// Timeout of a check-in or enroll request.
    pub request_timeout: Duration,
    /// Longest wait for the next bytes of a download.
    pub chunk_timeout: Duration,
    /// Shortest pause between check-ins.
    pub min_poll: Duration,
    /// Longest pause between check-ins (caps the server's `next_checkin_s` and the backoff).
    pub max_poll: Duration,
    /// Injected faults.
    pub faults: Faults,
    /// Seed of the jitter and fault generator.
    pub seed: u64,
    /// PEM files' contents whose certificates are trusted, besides the built-in roots, for an
    /// `https://` server (a private CA, or the server's self-signed certificate).
    pub ca_certs: Vec<Vec<u8>>,
}

impl AgentConfig {
    /// Defaults for a server, token, board and keys.
    pub fn new(server: &str, enroll_token: &str, board: &str, trusted_keys: Vec<[u8; 32]>) -> Self {
        AgentConfig {
            server: server.trim_end_matches('/').to_string(),
            enroll_token: enroll_token.to_string(),
            board: board.to_string(),
            name: format!("{board}-{}", std::process::id()),
            cohort: None,
            trusted_keys,
            request_timeout: Duration::from_secs(15),
            chunk_timeout: Duration::from_secs(20),
            min_poll: Duration::from_millis(200),
            max_poll: Duration::from_secs(300),
            faults: Faults::default(),
            seed: seed_from_clock(),
            ca_certs: Vec::new(),
        }
    }
}

fn seed_from_clock() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    t ^ ((std::process::id() as u64) << 32)
}

/// A small PRNG (splitmix64) for jitter and faults.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// Seeded.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    /// Next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..1`.
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// `true` with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.f64() < p
    }
    /// Uniform in `0..n` (`0` when `n == 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

/// Agent errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The request did not complete (connection, timeout, dropped).
    #[error("http: {0}")]
    Http(String),
    /// The server answered with an error status.
    #[error("server answered {status}: {body}")]
    Status {
        /// Status code.
        status: u16,
        /// Body (one line).
        body: String,
    },
    /// A downloaded artifact does not hash to the assignment's SHA-256.
    #[error("downloaded bytes do not match the assignment's SHA-256")]
    Digest,
    /// The state directory failed (or an injected crash).
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl AgentError {
    /// Whether this is an injected crash (the agent must be restarted from its state).
    pub fn is_crash(&self) -> bool {
        matches!(self, AgentError::Store(StoreError::Crash(_)))
    }
}

fn http_err(e: reqwest::Error) -> AgentError {
    AgentError::Http(e.to_string())
}

/// Telemetry collected since the last acknowledged check-in.
#[derive(Clone, Debug, Default)]
struct Window {
    t: Telemetry,
}

impl Window {
    fn for_model(m: Option<&VerifiedModel>) -> Self {
        let mut t = Telemetry {
            version: m.map(|m| m.version).unwrap_or(0),
            latency_us: vec![0; LATENCY_BUCKETS_US.len() + 1],
            ..Telemetry::default()
        };
        if let Some(m) = m {
            for b in &m.bins {
                let v = vec![0u64; b.len()];
                match b.tensor {
                    BaselineTensor::Input(i) => put(&mut t.input_hist, i as usize, v),
                    BaselineTensor::Output(i) => put(&mut t.output_hist, i as usize, v),
                }
            }
        }
        Window { t }
    }

    fn merge(&mut self, o: &Telemetry) {
        if o.version != self.t.version {
            return;
        }
        self.t.inferences += o.inferences;
        self.t.errors += o.errors;
        add(&mut self.t.latency_us, &o.latency_us);
        for (a, b) in self.t.input_hist.iter_mut().zip(&o.input_hist) {
            add(a, b);
        }
        for (a, b) in self.t.output_hist.iter_mut().zip(&o.output_hist) {
            add(a, b);
        }
    }
}

fn put(v: &mut Vec<Vec<u64>>, i: usize, h: Vec<u64>) {
    if v.len() <= i {
        v.resize(i + 1, Vec::new());
    }
    v[i] = h;
}

fn add(a: &mut [u64], b: &[u64]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

/// What the inference service and the agent share: the model in service and the telemetry
/// window.
#[derive(Debug, Default)]
pub struct Shared {
    model: RwLock<Option<Arc<VerifiedModel>>>,
    window: Mutex<Window>,
}

impl Shared {
    /// The model in service.
    pub fn model(&self) -> Option<Arc<VerifiedModel>> {
        self.model.read().map(|g| g.clone()).unwrap_or(None)
    }

    fn set_model(&self, m: Option<Arc<VerifiedModel>>) {
        if let Ok(mut w) = self.window.lock() {
            *w = Window::for_model(m.as_deref());
        }
        if let Ok(mut g) = self.model.write() {
            *g = m;
        }
    }

    fn take_window(&self) -> Option<Telemetry> {
        let m = self.model();
        let mut w = self.window.lock().ok()?;
        let fresh = Window::for_model(m.as_deref());
        let old = std::mem::replace(&mut *w, fresh);
        (old.t.inferences > 0 || old.t.errors > 0).then_some(old.t)
    }

    fn restore_window(&self, t: Telemetry) {
        if let Ok(mut w) = self.window.lock() {
            w.merge(&t);
        }
    }

    /// Runs one inference on the model in service and records it in the telemetry window
    /// (latency, errors, input and output histograms over the BASELINE bins).
    ///
    /// # Errors
    /// No model, a wrong input length, or the interpreter failed.
    pub fn infer(&self, input: &[u8]) -> Result<Vec<u8>, ModelFault> {
        let Some(m) = self.model() else {
            return Err(ModelFault::Inference("no model in service".into()));
        };
        let t0 = Instant::now();
        let r = m.infer(input);
        let us = t0.elapsed().as_micros() as u64;
        let Ok(mut w) = self.window.lock() else {
            return r;
        };
        if w.t.version != m.version {
            *w = Window::for_model(Some(&m));
        }
        w.t.inferences += 1;
        match &r {
            Err(_) => w.t.errors += 1,
            Ok(out) => {
                let b = LATENCY_BUCKETS_US.partition_point(|&u| u < us);
                if let Some(c) = w.t.latency_us.get_mut(b) {
                    *c += 1;
                }
                for bins in &m.bins {
                    let (vals, hist) = match bins.tensor {
                        BaselineTensor::Input(i) => (
                            m.real_values(input, false, i as usize),
                            w.t.input_hist.get_mut(i as usize),
                        ),
                        BaselineTensor::Output(i) => (
                            m.real_values(out, true, i as usize),
                            w.t.output_hist.get_mut(i as usize),
                        ),
                    };
                    if let (Some(vals), Some(hist)) = (vals, hist) {
                        for v in vals {
                            if let Some(c) = hist.get_mut(bins.bin(v)) {
                                *c += 1;
                            }
                        }
                    }
                }
            }
        }
        r
    }
}

/// Round-trip times in microseconds, in log-linear buckets: exact below 32 µs, then 16 buckets
/// per doubling, so a bucket is at most 1/16 (6.25 %) of its lower bound wide. Used by the
/// simulator for check-in latency percentiles.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LatencyHist {
    counts: Vec<u64>,
    max_us: u64,
}

/// Sub-buckets per doubling in [`LatencyHist`] (a power of two).
const HIST_SUB: u64 = 16;
const HIST_SUB_BITS: u32 = HIST_SUB.trailing_zeros();

impl LatencyHist {
    fn index(us: u64) -> usize {
        if us < 2 * HIST_SUB {
            return us as usize;
        }
        // `msb >= HIST_SUB_BITS + 1`, so `shift >= 1` and `sub` is in `0..HIST_SUB`.
        let msb = 63 - us.leading_zeros();
        let shift = msb - HIST_SUB_BITS;
        let sub = (us >> shift) - HIST_SUB;
        (HIST_SUB * u64::from(shift + 1) + sub) as usize
    }

    /// The largest value that falls in bucket `i`.
    fn upper(i: usize) -> u64 {
        let i = i as u64;
        if i < 2 * HIST_SUB {
            return i;
        }
        let shift = (i / HIST_SUB - 1) as u32;
        let lower = (HIST_SUB + i % HIST_SUB) << shift;
        lower + (1u64 << shift) - 1
    }

    /// Counts one round trip.
    pub fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = Self::index(us);
        if self.counts.len() <= i {
            self.counts.resize(i + 1, 0);
        }
        self.counts[i] += 1;
        self.max_us = self.max_us.max(us);
    }

    /// Adds another histogram's counts.
    pub fn merge(&mut self, o: &LatencyHist) {
        if self.counts.len() < o.counts.len() {
            self.counts.resize(o.counts.len(), 0);
        }
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        self.max_us = self.max_us.max(o.max_us);
    }

    /// Round trips counted.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The longest round trip, µs.
    pub fn max_us(&self) -> u64 {
        self.max_us
    }

    /// The `q`-quantile (`0..=1`) in µs: the upper bound of the bucket it falls in (so at most
    /// 6.25 % above the true value), capped at the maximum seen. `None` when empty.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(Self::upper(i).min(self.max_us));
            }
        }
        Some(self.max_us)
    }
}

/// Counters of what an agent did (for the simulator's report).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Check-ins the server answered (2xx).
    pub checkins: u64,
    /// Their round-trip times (request sent to answer parsed).
    pub checkin_latency: LatencyHist,
    /// Confirmed installs.
    pub installs: u64,
    /// Refused artifacts (verification, policy).
    pub install_failures: u64,
    /// Self-tests that failed (reverted).
    pub selftest_failures: u64,
    /// Ordered rollbacks installed.
    pub rollbacks: u64,
    /// Downloads whose SHA-256 did not match.
    pub digest_mismatches: u64,
    /// Failed HTTP requests.
    pub http_errors: u64,
    /// Download requests that resumed from bytes on disk.
    pub resumed_downloads: u64,
}

/// One device agent.
#[derive(Debug)]
pub struct Agent {
    cfg: AgentConfig,
    store: Store,
    http: reqwest::Client,
    shared: Arc<Shared>,
    rng: Rng,
    digest_failures: (String, u32),
    /// What it did.
    pub counters: Counters,
}

impl Agent {
    /// Opens the state directory and recovers: a pending trial is finished (self-test, then
    /// confirm or revert), then the active slot is loaded and verified; if it fails, the other
    /// slot takes over when it verifies.
    ///
    /// # Errors
    /// The state directory is unusable, or the HTTP client cannot be built.
    pub fn open(cfg: AgentConfig, dir: &Path) -> Result<Self, AgentError> {
        let store = Store::open(dir)?;
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(30));
        for pem in &cfg.ca_certs {
            for cert in reqwest::Certificate::from_pem_bundle(pem).map_err(http_err)? {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder.build().map_err(http_err)?;
        let rng = Rng::new(cfg.seed);
        let mut a = Agent {
            cfg,
            store,
            http,
            shared: Arc::new(Shared::default()),
            rng,
            digest_failures: (String::new(), 0),
            counters: Counters::default(),
        };
        a.recover()?;
        Ok(a)
    }

    /// The shared model and telemetry (for the inference service).
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// The persisted state.
    pub fn state(&self) -> &crate::store::State {
        self.store.state()
    }

    /// The model in service.
    pub fn running(&self) -> Option<Arc<VerifiedModel>> {
        self.shared.model()
    }

    /// Sets the step at which the next install crashes (tests, simulator).
    pub fn crash_at(&mut self, step: Option<u32>) {
        self.store.crash_at = step;
    }

    fn load_slot(&self, slot: u8) -> Option<VerifiedModel> {
        let rec = self.store.state().slots.get(slot as usize)?.clone()?;
        let bytes = self.store.read_slot(slot)?;
        if sha256_hex(&bytes) != rec.sha256 {
            return None;
        }
        VerifiedModel::verify(&bytes, &self.cfg.trusted_keys, &self.cfg.board).ok()
    }

    fn self_test(&self, m: &VerifiedModel) -> Result<(), ModelFault> {
        if self.cfg.faults.fail_selftest_version == Some(m.version) {
            return Err(ModelFault::SelfTestFailed {
                passed: 0,
                failed: 1,
            });
        }
        m.self_test().map(|_| ())
    }

    fn recover(&mut self) -> Result<(), AgentError> {
        self.store.clean_tmp();
        if let Some(trial) = self.store.state().trial.clone() {
            let prev = self.store.state().active_record().map(|r| r.version);
            match self.load_slot(trial.slot) {
                Some(m) => self.finish_trial(m, trial.rollback, prev)?,
                None => {
                    let version = self.store.state().slots[trial.slot as usize & 1]
                        .as_ref()
                        .map(|r| r.version)
                        .unwrap_or(0);
                    self.store.revert(DeviceEvent::InstallFailed {
                        version,
                        reason: "the trial slot does not verify after a restart".into(),
                    })?;
                }
            }
        }
        let active = self.store.state().active;
        let mut model = active.and_then(|a| self.load_slot(a));
        if model.is_none() {
            if let Some(a) = active {
                // The active file does not verify: fall back to the other slot if it does.
                let other = 1 - (a & 1);
                let min = self.store.state().min_counter;
                if let Some(m) = self.load_slot(other).filter(|m| m.counter >= min) {
                    let from = self
                        .store
                        .state()
                        .active_record()
                        .map(|r| r.version)
                        .unwrap_or(0);
                    let to = m.version;
                    self.store.update(|s| {
                        s.slots[a as usize & 1] = None;
                        s.active = Some(other);
                        s.push_event(DeviceEvent::RolledBack {
                            from,
                            to,
                            ordered: false,
                        });
                    })?;
                    model = Some(m);
                }
            }
        }
        self.shared.set_model(model.map(Arc::new));
        Ok(())
    }

    /// Self-tests a staged model and confirms or reverts it.
    fn finish_trial(
        &mut self,
        m: VerifiedModel,
        rollback: bool,
        prev: Option<u32>,
    ) -> Result<(), AgentError> {
        match self.self_test(&m) {
            Ok(()) => {
                let mut events = vec![DeviceEvent::Installed { version: m.version }];
                if rollback {
                    events.push(DeviceEvent::RolledBack {
                        from: prev.unwrap_or(0),
                        to: m.version,
                        ordered: true,
                    });
                    self.counters.rollbacks += 1;
                }
                self.store.confirm(events)?;
                self.counters.installs += 1;
                self.shared.set_model(Some(Arc::new(m)));
            }
            Err(_) => {
                self.counters.selftest_failures += 1;
                self.store
                    .revert(DeviceEvent::SelfTestFailed { version: m.version })?;
            }
        }
        Ok(())
    }

    fn url(&self, path: &str) -> String {
        if path.starts_with("http://") || path.starts_with("https://") {
            path.to_string()
        } else if path.starts_with('/') {
            format!("{}{path}", self.cfg.server)
        } else {
            format!("{}/{path}", self.cfg.server)
        }
    }

    fn maybe_drop(&mut self) -> Result<(), AgentError> {
        if self.rng.chance(self.cfg.faults.drop) {
            self.counters.http_errors += 1;
            return Err(AgentError::Http("injected: connection dropped".into()));
        }
        Ok(())
    }

    async fn post<Req: serde::Serialize, Resp: serde::de::DeserializeOwned>(
        &mut self,
        path: &str,
        token: &str,
        body: &Req,
    ) -> Result<Resp, AgentError> {
        self.maybe_drop()?;
        let r = self
            .http
            .post(self.url(path))
            .bearer_auth(token)
            .timeout(self.cfg.request_timeout)
            .json(body)
            .send()
            .await
            .map_err(|e| {
                self.counters.http_errors += 1;
                http_err(e)
            })?;
        let status = r.status();
        if !status.is_success() {
            let body = r.text().await.unwrap_or_default();
            return Err(AgentError::Status {
                status: status.as_u16(),
                body: body
                    .lines()
                    .next()
                    .unwrap_or("")
                    .chars()
                    .take(200)
                    .collect(),
            });
        }
        r.json().await.map_err(http_err)
    }

    /// Enrolls when the state has no device token yet.
    ///
    /// # Errors
    /// HTTP or the state directory.
    pub async fn enroll(&mut self) -> Result<(), AgentError> {
        if self.store.state().token.is_some() {
            return Ok(());
        }
        let req = EnrollRequest {
            name: self.cfg.name.clone(),
            board: self.cfg.board.clone(),
            cohort: self.cfg.cohort.clone(),
            agent: concat!("kiln-agent/", env!("CARGO_PKG_VERSION")).to_string(),
        };
        let tok = self.cfg.enroll_token.clone();
        let r: EnrollResponse = self.post("/api/v1/enroll", &tok, &req).await?;
        self.store.update(|s| {
            s.device_id = Some(r.device_id);
            s.token = Some(r.token);
        })?;
        Ok(())
    }

    /// One cycle: enroll if needed, check in, act on the assignment. Returns the pause the
    /// server asked for.
    ///
    /// # Errors
    /// HTTP, the state directory, or an injected crash ([`AgentError::is_crash`]).
    pub async fn cycle(&mut self) -> Result<Duration, AgentError> {
        self.enroll().await?;
        let token = self.store.state().token.clone().unwrap_or_default();
        let running = self.running().map(|m| ModelRef {
            model: m.name.clone(),
            version: m.version,
        });
        let events = self.store.state().events.clone();
        let telemetry = self.shared.take_window();
        let body = CheckIn {
            running,
            events,
            telemetry: telemetry.clone(),
        };
        let sent = body.events.len();
        let t0 = Instant::now();
        let resp: CheckInResponse = match self.post("/api/v1/checkin", &token, &body).await {
            Ok(r) => {
                self.counters.checkins += 1;
                self.counters.checkin_latency.record(t0.elapsed());
                r
            }
            Err(e) => {
                if let Some(t) = telemetry {
                    self.shared.restore_window(t);
                }
                if let AgentError::Status { status: 401, .. } = e {
                    // The server forgot us (or the token was revoked): enroll again next time.
                    self.store.update(|s| s.token = None)?;
                }
                return Err(e);
            }
        };
        if sent > 0 {
            self.store.update(|s| {
                let n = sent.min(s.events.len());
                s.events.drain(..n);
            })?;
        }
        if let Some(a) = resp.assignment {
            self.apply(&a, &token).await?;
        }
        Ok(Duration::from_secs(resp.next_checkin_s as u64))
    }

    fn refuse(&mut self, a: &Assignment, reason: String) -> Result<(), AgentError> {
        self.refuse_as(a, a.sha256.clone(), reason)
    }

    fn refuse_as(&mut self, a: &Assignment, sha: String, reason: String) -> Result<(), AgentError> {
        self.counters.install_failures += 1;
        let version = a.target.version;
        self.store.update(|s| {
            s.refuse(&sha);
            s.push_event(DeviceEvent::InstallFailed { version, reason });
        })?;
        Ok(())
    }

    /// Acts on an assignment: nothing when it already runs or was refused before; otherwise
    /// download, verify, stage, trial, confirm or revert.
    ///
    /// # Errors
    /// HTTP and digest errors (retried at the next check-in), the state directory, an injected
    /// crash. Refusals are not errors: they become events.
    pub async fn apply(&mut self, a: &Assignment, token: &str) -> Result<(), AgentError> {
        let running = self.running();
        if running.as_ref().is_some_and(|m| m.sha256 == a.sha256) {
            return Ok(());
        }
        // Refused for good, or refused as a downgrade and still not ordered as a rollback.
        let downgrade_key = format!("{}:downgrade", a.sha256);
        if self
            .store
            .state()
            .refused
            .iter()
            .any(|s| *s == a.sha256 || (!a.rollback && *s == downgrade_key))
        {
            return Ok(());
        }
        let active_version = running.as_ref().map(|m| m.version);
        if let Some(v) = active_version {
            if a.target.version <= v && !a.rollback {
                return self.refuse_as(
                    a,
                    downgrade_key,
                    format!("version {} is not newer than {v}", a.target.version),
                );
            }
        }
        if a.size > MAX_ARTIFACT_BYTES {
            return self.refuse(a, format!("artifact of {} bytes is too large", a.size));
        }
        // An ordered rollback to the model still in the inactive slot needs no download.
        let inactive = self.store.inactive_slot();
        let reuse = self.store.state().slots[inactive as usize]
            .as_ref()
            .filter(|r| r.sha256 == a.sha256)
            .and_then(|_| self.store.read_slot(inactive))
            .filter(|b| sha256_hex(b) == a.sha256);
        let bytes = match reuse {
            Some(b) => b,
            None => self.download(a, token).await?,
        };
        let m = match VerifiedModel::verify(&bytes, &self.cfg.trusted_keys, &self.cfg.board) {
            Ok(m) => m,
            Err(e) => return self.refuse(a, e.to_string()),
        };
        let min = self.store.state().min_counter;
        if m.counter < min {
            return self.refuse(a, format!("security counter {} is below {min}", m.counter));
        }
        if m.version != a.target.version {
            return self.refuse(
                a,
                format!(
                    "artifact is version {}, the assignment says {}",
                    m.version, a.target.version
                ),
            );
        }
        if let Some(v) = active_version {
            if m.version <= v && !a.rollback {
                return self.refuse(a, format!("version {} is not newer than {v}", m.version));
            }
        }
        if self.rng.chance(self.cfg.faults.crash) {
            self.store.crash_at = Some(self.rng.below(5) as u32);
        }
        let record = SlotRecord {
            model: m.name.clone(),
            version: m.version,
            counter: m.counter,
            sha256: m.sha256.clone(),
        };
        let r = self.stage_and_trial(&bytes, record, m, a.rollback, active_version);
        self.store.crash_at = None;
        r?;
        let _ = std::fs::remove_file(self.store.part_path(&a.sha256));
        Ok(())
    }

    fn stage_and_trial(
        &mut self,
        bytes: &[u8],
        record: SlotRecord,
        m: VerifiedModel,
        rollback: bool,
        prev: Option<u32>,
    ) -> Result<(), AgentError> {
        self.store.stage(bytes, record, rollback)?;
        self.finish_trial(m, rollback, prev)
    }

    /// Downloads an artifact into `DIR/download-SHA.part`, resuming from the bytes already there
    /// with an HTTP `Range` request, and checks its SHA-256.
    ///
    /// # Errors
    /// HTTP (the partial file stays for the next try) or a digest mismatch (the file is removed).
    pub async fn download(&mut self, a: &Assignment, token: &str) -> Result<Vec<u8>, AgentError> {
        let part = self.store.part_path(&a.sha256);
        self.store.clean(Some(&part));
        let ioe = |e: std::io::Error| {
            AgentError::Store(StoreError::Io {
                what: "download",
                path: part.clone(),
                source: e,
            })
        };
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&part)
            .map_err(ioe)?;
        let mut have = file.metadata().map_err(ioe)?.len();
        if have > a.size {
            file.set_len(0).map_err(ioe)?;
            have = 0;
        }
        if have < a.size {
            self.maybe_drop()?;
            if have > 0 {
                self.counters.resumed_downloads += 1;
            }
            let mut req = self
                .http
                .get(self.url(&a.url))
                .bearer_auth(token)
                .timeout(self.cfg.chunk_timeout.max(Duration::from_secs(1)) * 30);
            if have > 0 {
                req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
            }
            let mut resp = req.send().await.map_err(|e| {
                self.counters.http_errors += 1;
                http_err(e)
            })?;
            match resp.status().as_u16() {
                206 => {
                    let start = resp
                        .headers()
                        .get(reqwest::header::CONTENT_RANGE)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix("bytes "))
                        .and_then(|v| v.split('-').next())
                        .and_then(|v| v.parse::<u64>().ok());
                    if start != Some(have) {
                        file.set_len(0).map_err(ioe)?;
                        return Err(AgentError::Http("bad Content-Range; restarting".into()));
                    }
                }
                200 => {
                    file.set_len(0).map_err(ioe)?;
                    have = 0;
                }
                416 => {
                    file.set_len(0).map_err(ioe)?;
                    return Err(AgentError::Status {
                        status: 416,
                        body: "range not satisfiable; restarting".into(),
                    });
                }
                s => {
                    let body = resp.text().await.unwrap_or_default();
                    return Err(AgentError::Status {
                        status: s,
                        body: body
                            .lines()
                            .next()
                            .unwrap_or("")
                            .chars()
                            .take(200)
                            .collect(),
                    });
                }
            }
            file.seek(std::io::SeekFrom::Start(have)).map_err(ioe)?;
            let corrupt = self.rng.chance(self.cfg.faults.corrupt);
            let corrupt_at = have + self.rng.below(a.size - have);
            while have < a.size {
                let chunk = tokio::time::timeout(self.cfg.chunk_timeout, resp.chunk())
                    .await
                    .map_err(|_| AgentError::Http("download stalled".into()))?
                    .map_err(|e| {
                        self.counters.http_errors += 1;
                        http_err(e)
                    })?;
                let Some(chunk) = chunk else {
                    break;
                };
                let mut chunk = chunk.to_vec();
                let n = chunk.len() as u64;
                if have + n > a.size {
                    file.set_len(0).map_err(ioe)?;
                    return Err(AgentError::Http("server sent more than the size".into()));
                }
                if corrupt && (have..have + n).contains(&corrupt_at) {
                    if let Some(b) = chunk.get_mut((corrupt_at - have) as usize) {
                        *b ^= 0x5a;
                    }
                }
                let drop_now = self.rng.chance(self.cfg.faults.drop / 4.0);
                let keep = if drop_now {
                    chunk.len() / 2
                } else {
                    chunk.len()
                };
                file.write_all(&chunk[..keep]).map_err(ioe)?;
                have += keep as u64;
                if drop_now {
                    let _ = file.sync_data();
                    self.counters.http_errors += 1;
                    return Err(AgentError::Http("injected: connection dropped".into()));
                }
            }
            file.sync_data().map_err(ioe)?;
            if have < a.size {
                return Err(AgentError::Http(format!(
                    "connection closed after {have} of {} bytes",
                    a.size
                )));
            }
        }
        let mut bytes = Vec::with_capacity(a.size as usize);
        file.seek(std::io::SeekFrom::Start(0)).map_err(ioe)?;
        file.read_to_end(&mut bytes).map_err(ioe)?;
        if sha256_hex(&bytes) != a.sha256.to_ascii_lowercase() {
            drop(file);
            let _ = std::fs::remove_file(&part);
            self.counters.digest_mismatches += 1;
            if self.digest_failures.0 == a.sha256 {
                self.digest_failures.1 += 1;
            } else {
                self.digest_failures = (a.sha256.clone(), 1);
            }
            if self.digest_failures.1 >= MAX_DIGEST_RETRIES {
                self.digest_failures.1 = 0;
                let version = a.target.version;
                self.store.update(|s| {
                    s.push_event(DeviceEvent::InstallFailed {
                        version,
                        reason: "downloaded bytes do not match the SHA-256, again".into(),
                    })
                })?;
            }
            return Err(AgentError::Digest);
        }
        Ok(bytes)
    }

    /// The pause before the next check-in: the server's (clamped to the configured bounds),
    /// ±20 % jitter.
    pub fn pause(&mut self, asked: Duration) -> Duration {
        let d = asked.clamp(self.cfg.min_poll, self.cfg.max_poll);
        let j = 0.8 + 0.4 * self.rng.f64();
        d.mul_f64(j)
    }

    /// The pause after `failures` errors in a row: exponential from `min_poll`, capped at
    /// `max_poll`, with full jitter on the upper half.
    pub fn backoff(&mut self, failures: u32) -> Duration {
        let base = self.cfg.min_poll.max(Duration::from_millis(100));
        let d = base
            .saturating_mul(1u32 << failures.min(16))
            .min(self.cfg.max_poll);
        d.mul_f64(0.5 + 0.5 * self.rng.f64())
    }

    /// Runs until `stop` resolves: check in, sleep, repeat; backs off on errors.
    ///
    /// # Errors
    /// Only an injected crash (the caller restarts the agent from its state directory).
    pub async fn run(
        &mut self,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<(), AgentError> {
        tokio::pin!(stop);
        let mut failures = 0u32;
        loop {
            let pause = match self.cycle().await {
                Ok(asked) => {
                    failures = 0;
                    self.pause(asked)
                }
                Err(e) if e.is_crash() => return Err(e),
                Err(e) => {
                    failures = failures.saturating_add(1);
                    eprintln!("kiln-agent: {e}");
                    self.backoff(failures)
                }
            };
            tokio::select! {
                _ = &mut stop => return Ok(()),
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::LatencyHist;
    use std::time::Duration;

    #[test]
    fn latency_buckets_are_contiguous_and_narrow() {
        let mut prev_upper = None;
        for i in 0..600 {
            let up = LatencyHist::upper(i);
            if let Some(p) = prev_upper {
                assert_eq!(LatencyHist::index(p + 1), i, "bucket {i} starts after {p}");
            }
            assert_eq!(LatencyHist::index(up), i);
            let lower = prev_upper.map_or(0, |p| p + 1);
            assert!(
                (up - lower) * 16 <= lower.max(16),
                "bucket {i}: {lower}..={up}"
            );
            prev_upper = Some(up);
        }
    }

    #[test]
    fn latency_quantiles() {
        let mut h = LatencyHist::default();
        assert_eq!(h.quantile_us(0.5), None);
        for ms in 1..=100u64 {
            h.record(Duration::from_millis(ms));
        }
        let p50 = h.quantile_us(0.5).unwrap_or(0);
        let p99 = h.quantile_us(0.99).unwrap_or(0);
        assert!((50_000..=53_125).contains(&p50), "{p50}");
        assert!((99_000..=100_000).contains(&p99), "{p99}");
        assert_eq!(h.quantile_us(1.0), Some(100_000));
        let mut m = LatencyHist::default();
        m.merge(&h);
        m.merge(&h);
        assert_eq!(m.count(), 200);
        assert_eq!(m.quantile_us(0.5), h.quantile_us(0.5));
    }
}
