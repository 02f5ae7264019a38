//! The fleet server's HTTP API: JSON bodies under `/api/v1`, shared by the server (`kiln serve`),
//! the CLI client and the agent. See `docs/FLEET_API.md`.
//!
//! Authentication: `Authorization: Bearer TOKEN` on every call. Three kinds of token:
//! - the **admin token** (`kiln serve --admin-token`): registry, rollouts, device listing;
//! - the **enroll token** (`--enroll-token`): only `POST /api/v1/enroll`;
//! - a **device token**, issued at enrollment (stored hashed on the server): only the device's own
//!   check-in and artifact downloads.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `POST /api/v1/enroll` (enroll token).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// A name for people (unique per fleet is not required).
    pub name: String,
    /// Board name (matched against artifacts' target board).
    pub board: String,
    /// Cohort the device belongs to (rollouts may target one); `None` = "default".
    pub cohort: Option<String>,
    /// Agent version string.
    pub agent: String,
}

/// Answer to [`EnrollRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollResponse {
    /// The device's id (server-assigned).
    pub device_id: String,
    /// The device's credential for every later call. Shown once.
    pub token: String,
}

/// A model version, as devices and people name it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ModelRef {
    /// Model name (from the artifact's MANIFEST).
    pub model: String,
    /// Version (from the signed header).
    pub version: u32,
}

/// What happened on the device since its last check-in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DeviceEvent {
    /// The version was installed, passed its self-test and is confirmed.
    Installed {
        /// The version.
        version: u32,
    },
    /// Download or verification failed (signature, digest, size, board).
    InstallFailed {
        /// The version.
        version: u32,
        /// One line.
        reason: String,
    },
    /// The self-test failed; the device reverted to its previous model.
    SelfTestFailed {
        /// The version.
        version: u32,
    },
    /// The device went back to the previous version by itself (crash loop, health) or as
    /// ordered.
    RolledBack {
        /// The version it left.
        from: u32,
        /// The version it runs now.
        to: u32,
        /// Whether the server ordered it.
        ordered: bool,
    },
}

/// Telemetry of one reporting window (since the previous check-in).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Telemetry {
    /// The version the figures are for.
    pub version: u32,
    /// Inferences run.
    pub inferences: u64,
    /// Inferences that failed.
    pub errors: u64,
    /// Latency histogram: counts per bucket of [`LATENCY_BUCKETS_US`] (last bucket = above).
    pub latency_us: Vec<u64>,
    /// Per model input: counts in the BASELINE's bins for that input.
    pub input_hist: Vec<Vec<u64>>,
    /// Per model output: counts in the BASELINE's bins for that output.
    pub output_hist: Vec<Vec<u64>>,
}

/// Upper bounds (µs) of the latency buckets; one more bucket counts everything above.
pub const LATENCY_BUCKETS_US: [u64; 16] = [
    50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000,
    1_000_000, 2_000_000, 5_000_000,
];

/// `POST /api/v1/checkin` (device token).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CheckIn {
    /// The model version in service, if any.
    pub running: Option<ModelRef>,
    /// Events since the last acknowledged check-in.
    pub events: Vec<DeviceEvent>,
    /// Telemetry since the last acknowledged check-in.
    pub telemetry: Option<Telemetry>,
}

/// What the server wants the device to run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// The model version to run.
    pub target: ModelRef,
    /// SHA-256 (hex) of the whole artifact file.
    pub sha256: String,
    /// Artifact length in bytes.
    pub size: u64,
    /// Where to download it (relative to the server URL); supports `Range`.
    pub url: String,
    /// The rollout this assignment belongs to, if any.
    pub rollout: Option<i64>,
    /// Whether this is an ordered rollback to an earlier version (the device may go back in
    /// version only when this is set).
    pub rollback: bool,
}

/// Answer to [`CheckIn`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckInResponse {
    /// What to run; `None` = keep what you run.
    pub assignment: Option<Assignment>,
    /// Seconds until the next check-in (the agent adds jitter).
    pub next_checkin_s: u32,
}

/// `POST /api/v1/models` (admin): the body is the signed artifact; the answer:
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushResponse {
    /// Registered model and version.
    pub model: ModelRef,
    /// SHA-256 (hex) of the artifact.
    pub sha256: String,
    /// Whether this exact artifact was already registered.
    pub existed: bool,
}

/// `POST /api/v1/rollouts` (admin).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutRequest {
    /// The version to roll out (must be registered).
    pub target: ModelRef,
    /// Cohort; `None` = every device.
    pub cohort: Option<String>,
    /// Cumulative percentages of devices per wave, increasing, ending at 100.
    pub waves: Vec<u8>,
    /// Devices of a wave that must have reported on the new version before its gate is judged.
    pub min_devices: u32,
    /// Gate: most install + self-test failures, in % of the wave's devices.
    pub max_failure_pct: f64,
    /// Gate: most p50 latency regression against the previous version, in %.
    pub max_latency_regression_pct: f64,
    /// Gate: most PSI of any input or output histogram against the BASELINE.
    pub max_psi: f64,
    /// Seconds a wave runs before its gate is judged.
    pub wave_wait_s: u32,
}

/// Rollout states.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Waves are advancing.
    Running,
    /// Held by an admin: no new devices are assigned.
    Paused,
    /// Every wave passed.
    Complete,
    /// A gate failed (or an admin aborted): devices that took it are ordered back.
    Aborted,
    /// A newer rollout (or a rollback) of the same model took over before this one finished;
    /// it no longer decides anything.
    Superseded,
}

/// One gate's figures.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GateFigures {
    /// Devices in the wave.
    pub devices: u32,
    /// Devices that reported on the new version.
    pub reported: u32,
    /// Install and self-test failures.
    pub failures: u32,
    /// Failures in % of the wave's devices that tried.
    pub failure_pct: f64,
    /// Inference errors / inferences on the new version.
    pub error_rate: f64,
    /// p50 latency on the new version (µs).
    pub latency_p50_us: Option<f64>,
    /// p50 latency on the previous version (µs).
    pub previous_latency_p50_us: Option<f64>,
    /// Latency regression in %.
    pub latency_regression_pct: Option<f64>,
    /// Highest PSI over inputs and outputs against the artifact's BASELINE.
    pub psi: Option<f64>,
    /// Whether the gate passed (`None` while it is still collecting).
    pub passed: Option<bool>,
    /// Why it failed, one line.
    pub reason: Option<String>,
}

/// One wave.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WaveStatus {
    /// 0-based index.
    pub index: u32,
    /// Cumulative percentage of devices.
    pub pct: u8,
    /// `pending`, `running`, `passed`, `failed`.
    pub state: String,
    /// The gate's figures.
    pub gate: GateFigures,
}

/// `GET /api/v1/rollouts/{id}` (admin).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutStatus {
    /// Rollout id.
    pub id: i64,
    /// Target version.
    pub target: ModelRef,
    /// The version devices go back to when it aborts.
    pub previous: Option<u32>,
    /// State.
    pub state: RolloutState,
    /// Why it was aborted, if it was.
    pub reason: Option<String>,
    /// Devices per running version of this model (version as a string key, for JSON).
    pub devices: BTreeMap<String, u64>,
    /// The waves.
    pub waves: Vec<WaveStatus>,
}

/// A rollout, as `GET /api/v1/rollouts` (admin) lists it, newest first (no gate is judged for
/// the list: `GET /api/v1/rollouts/{id}` does that and gives the waves).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutSummary {
    /// Rollout id.
    pub id: i64,
    /// `rollout` or `rollback`.
    pub kind: String,
    /// Target version.
    pub target: ModelRef,
    /// The version devices go back to when it aborts.
    pub previous: Option<u32>,
    /// Cohort; `None` = every device.
    pub cohort: Option<String>,
    /// State.
    pub state: RolloutState,
    /// The current wave (0-based).
    pub wave: u32,
    /// Cumulative percentages per wave.
    pub waves: Vec<u8>,
    /// Why it was aborted, if it was.
    pub reason: Option<String>,
    /// When it was created (RFC 3339).
    pub created_at: String,
}

/// `POST /api/v1/rollback` (admin): every device of the model (in the cohort) goes to `to`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackRequest {
    /// Model name.
    pub model: String,
    /// The version to go back to (must be registered).
    pub to: u32,
    /// Cohort; `None` = every device.
    pub cohort: Option<String>,
}

/// A device, as `GET /api/v1/devices` (admin) lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSummary {
    /// Id.
    pub device_id: String,
    /// Name.
    pub name: String,
    /// Board.
    pub board: String,
    /// Cohort.
    pub cohort: String,
    /// The version in service.
    pub running: Option<ModelRef>,
    /// Last check-in, RFC 3339.
    pub last_seen: Option<String>,
    /// Last event, one line.
    pub last_event: Option<String>,
}

/// A registered version, as `GET /api/v1/models` (admin) lists it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelVersion {
    /// Model and version.
    pub model: ModelRef,
    /// SHA-256 (hex) of the artifact.
    pub sha256: String,
    /// Bytes.
    pub size: u64,
    /// Security counter.
    pub security_counter: u32,
    /// Signing key ids (hex).
    pub signed_by: Vec<String>,
    /// Lineage: the MANIFEST's JSON.
    pub lineage: serde_json::Value,
    /// Who pushed it (from the token's name) and when (RFC 3339).
    pub pushed_by: String,
    /// When.
    pub pushed_at: String,
    /// Stage: `registered` (pushed), `staging`, `production` (a rollout of it completed, or
    /// set by hand), `rejected` (a rollout of it was aborted) or `archived` (replaced in
    /// production).
    #[serde(default)]
    pub stage: String,
}

/// The stages a registered version can be in (see [`ModelVersion::stage`]).
pub const STAGES: [&str; 5] = [
    "registered",
    "staging",
    "production",
    "rejected",
    "archived",
];

/// `POST /api/v1/models/stage`: move a version to a stage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageRequest {
    /// Model and version.
    pub target: ModelRef,
    /// One of [`STAGES`].
    pub stage: String,
}

/// One row of the audit log (`GET /api/v1/audit`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// When (RFC 3339).
    pub at: String,
    /// Who (the credential's name).
    pub who: String,
    /// What: `push`, `rollout`, `pause`, `resume`, `abort`, `rollback`, `stage`, ...
    pub action: String,
    /// Details.
    pub detail: String,
}

/// Every error body: `{"error": "one line: what, why, what to do"}` with a 4xx/5xx status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// One line.
    pub error: String,
}
