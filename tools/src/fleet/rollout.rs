//! Rollouts: waves, gates and assignments.
//!
//! Nothing here keeps state in the process: every decision reads the database and every change is
//! written inside a transaction with an optimistic condition (`UPDATE rollouts … WHERE id = $1
//! AND wave = $2 AND state = 'running'`), so several servers may share one database and judge
//! the same gate at once: one wins, the others see zero rows changed and move on.
//!
//! Wave membership: a device's bucket for a rollout is `SHA-256("{device}/{rollout}") mod 100`;
//! it is in wave `i` when `bucket < waves[i]`, and it is offered the new version when it is in the
//! rollout's current wave (waves are cumulative).
//!
//! Gates read per-wave aggregates, not the telemetry: `rollout_devices` holds each device's first
//! wave and whether it reported on the new version or failed it, `rollout_stats` the telemetry
//! summed per first wave. A check-in adds to them in its transaction (a few rows), so judging a
//! gate reads one count over the rollout's devices and a few dozen sums, however large the fleet.
//! A server judges a rollout from check-ins at most every [`JUDGE_EVERY`] ([`JudgeClock`]).

use super::api::{
    Assignment, CheckIn, CheckInResponse, DeviceEvent, GateFigures, ModelRef, RollbackRequest,
    RolloutRequest, RolloutState, RolloutStatus, RolloutSummary, Telemetry, WaveStatus,
    LATENCY_BUCKETS_US,
};
use super::auth::DeviceRow;
use super::registry::{audit, Baseline};
use super::{now, ApiErr, ApiResult};
use sha2::Digest as _;
use sqlx::{AnyConnection, AnyPool, Connection as _, Row as _};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Seconds between check-ins that the server asks for.
pub const CHECKIN_INTERVAL_S: u32 = 60;
/// PSI's floor for empty bins (both sides), so `ln(a/e)` stays finite.
pub const PSI_EPSILON: f64 = 1e-4;
/// How often one server judges the gate of a large wave on behalf of check-ins (status reads
/// always judge).
pub const JUDGE_EVERY: Duration = Duration::from_millis(500);
/// Waves of up to this many devices are judged at every check-in; a gate's count over the
/// wave's devices is then a few dozen index entries.
pub const JUDGE_ALWAYS_UP_TO: u32 = 100;

/// When this server last judged each rollout for a check-in, and how many devices its wave
/// had. It paces judging, so a busy fleet does not count a large wave at every check-in; it
/// decides nothing (every decision is read from and written to the database), so servers
/// sharing a database each keep their own.
#[derive(Debug, Default)]
pub struct JudgeClock {
    last: Mutex<HashMap<i64, (Instant, u32)>>,
}

impl JudgeClock {
    /// Whether rollout `id` is due for judging: its wave was small when last judged, or
    /// [`JUDGE_EVERY`] has passed since.
    pub fn due(&self, id: i64) -> bool {
        let Ok(last) = self.last.lock() else {
            return true;
        };
        last.get(&id).is_none_or(|(at, devices)| {
            *devices <= JUDGE_ALWAYS_UP_TO || at.elapsed() >= JUDGE_EVERY
        })
    }

    /// Notes that rollout `id` was judged now, over a wave of `devices`.
    pub fn judged(&self, id: i64, devices: u32) {
        if let Ok(mut last) = self.last.lock() {
            last.insert(id, (Instant::now(), devices));
        }
    }
}

/// A rollout row.
#[derive(Clone, Debug, PartialEq)]
pub struct Rollout {
    /// Id.
    pub id: i64,
    /// `rollout` or `rollback`.
    pub kind: String,
    /// Model name.
    pub model: String,
    /// Target version.
    pub version: i64,
    /// The version devices go back to.
    pub previous: Option<i64>,
    /// Cohort (`None` = every device).
    pub cohort: Option<String>,
    /// Cumulative percentages.
    pub waves: Vec<u8>,
    /// Gate: devices that must report.
    pub min_devices: i64,
    /// Gate: failures in %.
    pub max_failure_pct: f64,
    /// Gate: latency regression in %.
    pub max_latency_regression_pct: f64,
    /// Gate: PSI.
    pub max_psi: f64,
    /// Gate: seconds a wave runs at least.
    pub wave_wait_s: i64,
    /// `running`, `paused`, `complete`, `aborted`, `superseded`.
    pub state: String,
    /// Current wave.
    pub wave: i64,
    /// When the current wave started.
    pub wave_started_at: i64,
    /// Why it stopped.
    pub reason: Option<String>,
    /// When it was created.
    pub created_at: i64,
}

const ROLLOUT_COLUMNS: &str = "id, kind, model, version, previous, cohort, waves, min_devices, max_failure_pct, \
     max_latency_regression_pct, max_psi, wave_wait_s, state, wave, wave_started_at, reason, created_at";

fn rollout_from(row: &sqlx::any::AnyRow) -> Result<Rollout, sqlx::Error> {
    let waves: String = row.try_get("waves")?;
    Ok(Rollout {
        id: row.try_get("id")?,
        kind: row.try_get("kind")?,
        model: row.try_get("model")?,
        version: row.try_get("version")?,
        previous: row.try_get("previous")?,
        cohort: row.try_get("cohort")?,
        waves: waves.split(',').filter_map(|w| w.parse().ok()).collect(),
        min_devices: row.try_get("min_devices")?,
        max_failure_pct: row.try_get("max_failure_pct")?,
        max_latency_regression_pct: row.try_get("max_latency_regression_pct")?,
        max_psi: row.try_get("max_psi")?,
        wave_wait_s: row.try_get("wave_wait_s")?,
        state: row.try_get("state")?,
        wave: row.try_get("wave")?,
        wave_started_at: row.try_get("wave_started_at")?,
        reason: row.try_get("reason")?,
        created_at: row.try_get("created_at")?,
    })
}

async fn load(conn: &mut AnyConnection, id: i64) -> ApiResult<Option<Rollout>> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.as_ref().map(rollout_from).transpose()?)
}

fn cohort_matches(rollout_cohort: &Option<String>, device_cohort: &str) -> bool {
    rollout_cohort.as_deref().is_none_or(|c| c == device_cohort)
}

/// The rollout that decides what a device of `model` runs: the newest one for the model whose
/// cohort includes the device (superseded ones never decide).
async fn governing(
    conn: &mut AnyConnection,
    model: &str,
    cohort: &str,
) -> ApiResult<Option<Rollout>> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE model = $1 AND state <> 'superseded' \
         AND (cohort IS NULL OR cohort = $2) ORDER BY id DESC LIMIT 1"
    )))
    .bind(model)
    .bind(cohort)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.as_ref().map(rollout_from).transpose()?)
}

/// The model a device is about: what it runs, else the newest rollout of its cohort.
async fn model_of(conn: &mut AnyConnection, device: &DeviceRow) -> ApiResult<Option<String>> {
    if let Some(m) = &device.running_model {
        return Ok(Some(m.clone()));
    }
    let row: Option<(String,)> = sqlx::query_as(
        "SELECT model FROM rollouts WHERE state <> 'superseded' AND (cohort IS NULL OR cohort = $1) \
         ORDER BY id DESC LIMIT 1",
    )
    .bind(&device.cohort)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(|(m,)| m))
}

/// A device's bucket (0..100) for a rollout.
pub fn bucket(device_id: &str, rollout_id: i64) -> u8 {
    let d = sha2::Sha256::digest(format!("{device_id}/{rollout_id}").as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    (u64::from_le_bytes(b) % 100) as u8
}

fn in_wave(r: &Rollout, device_id: &str, wave: i64) -> bool {
    let pct = usize::try_from(wave)
        .ok()
        .and_then(|w| r.waves.get(w))
        .copied()
        .unwrap_or(0);
    bucket(device_id, r.id) < pct
}

/// The first wave that includes a device: the smallest `i` with `bucket < waves[i]` (the
/// number of waves when none does, which valid waves ending at 100 rule out).
fn first_wave(waves: &[u8], rollout_id: i64, device_id: &str) -> i64 {
    let b = bucket(device_id, rollout_id);
    waves.iter().position(|&p| b < p).unwrap_or(waves.len()) as i64
}

/// Rows per multi-row INSERT (at most 5 parameters each, well under both engines' limits).
const ROWS_PER_INSERT: usize = 200;

/// Enters the fleet's devices (of the model or running nothing, in the cohort) in
/// `rollout_devices` with their first wave; a device already running the version counts as
/// reported. Idempotent.
async fn enlist(conn: &mut AnyConnection, r: &Rollout) -> ApiResult<()> {
    let devices: Vec<(String, String, Option<String>, Option<i64>)> = sqlx::query_as(
        "SELECT id, cohort, running_model, running_version FROM devices WHERE running_model = $1 OR running_model IS NULL",
    )
    .bind(&r.model)
    .fetch_all(&mut *conn)
    .await?;
    let rows: Vec<(String, i64, i64)> = devices
        .into_iter()
        .filter(|(_, cohort, _, _)| cohort_matches(&r.cohort, cohort))
        .map(|(id, _, m, v)| {
            let runs = m.as_deref() == Some(r.model.as_str()) && v == Some(r.version);
            let wave = first_wave(&r.waves, r.id, &id);
            (id, wave, i64::from(runs))
        })
        .collect();
    for chunk in rows.chunks(ROWS_PER_INSERT) {
        let mut sql = String::from(
            "INSERT INTO rollout_devices (rollout_id, device_id, wave, reported, failed) VALUES ",
        );
        for i in 0..chunk.len() {
            let p = 2 + 3 * i;
            let sep = if i == 0 { "" } else { ", " };
            let _ = write!(sql, "{sep}($1, ${p}, ${}, ${}, 0)", p + 1, p + 2);
        }
        sql.push_str(" ON CONFLICT (rollout_id, device_id) DO NOTHING");
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(r.id);
        for (id, wave, reported) in chunk {
            q = q.bind(id.clone()).bind(*wave).bind(*reported);
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

fn validate(req: &RolloutRequest) -> ApiResult<()> {
    let w = &req.waves;
    let increasing = w.windows(2).all(|p| p[0] < p[1]);
    if w.is_empty() || !increasing || w.last() != Some(&100) || w[0] == 0 {
        return Err(ApiErr::bad_request(format!(
            "waves {w:?} refused: give increasing cumulative percentages from 1 to 100 that end at 100, e.g. 5,25,100"
        )));
    }
    let limits = [
        ("max_failure_pct", req.max_failure_pct),
        ("max_latency_regression_pct", req.max_latency_regression_pct),
        ("max_psi", req.max_psi),
    ];
    for (name, v) in limits {
        if !(v.is_finite() && v >= 0.0) {
            return Err(ApiErr::bad_request(format!(
                "{name} = {v} refused: give a finite number of 0 or more"
            )));
        }
    }
    Ok(())
}

async fn registered(conn: &mut AnyConnection, target: &ModelRef) -> ApiResult<()> {
    let found: Option<(i64,)> =
        sqlx::query_as("SELECT id FROM models WHERE name = $1 AND version = $2")
            .bind(&target.model)
            .bind(i64::from(target.version))
            .fetch_optional(&mut *conn)
            .await?;
    match found {
        Some(_) => Ok(()),
        None => Err(ApiErr::not_found(format!(
            "{} version {} is not registered; hint: push it first with `kiln push`",
            target.model, target.version
        ))),
    }
}

/// The version the fleet (in this cohort) runs before a new rollout: the newest completed rollout
/// of the model, else the version most devices of the model run.
async fn base_version(
    conn: &mut AnyConnection,
    model: &str,
    cohort: &Option<String>,
    exclude: i64,
) -> ApiResult<Option<i64>> {
    let done: Vec<(i64, Option<String>)> = sqlx::query_as(
        "SELECT version, cohort FROM rollouts WHERE model = $1 AND state = 'complete' ORDER BY id DESC",
    )
    .bind(model)
    .fetch_all(&mut *conn)
    .await?;
    let fits = |c: &Option<String>| c.is_none() || c == cohort;
    if let Some((v, _)) = done.into_iter().find(|(v, c)| *v != exclude && fits(c)) {
        return Ok(Some(v));
    }
    let running: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT running_version, COUNT(*) FROM devices WHERE running_model = $1 AND running_version IS NOT NULL GROUP BY running_version ORDER BY COUNT(*) DESC",
    )
    .bind(model)
    .fetch_all(&mut *conn)
    .await?;
    Ok(running.into_iter().map(|(v, _)| v).find(|v| *v != exclude))
}

async fn supersede(
    conn: &mut AnyConnection,
    r_model: &str,
    cohort: &Option<String>,
    id: i64,
) -> ApiResult<()> {
    let older: Vec<(i64, Option<String>)> = sqlx::query_as(
        "SELECT id, cohort FROM rollouts WHERE model = $1 AND id < $2 AND state IN ('running', 'paused')",
    )
    .bind(r_model)
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    for (old, c) in older {
        if cohort.is_none() || c == *cohort {
            sqlx::query(
                "UPDATE rollouts SET state = 'superseded', reason = $1 WHERE id = $2 AND state IN ('running', 'paused')",
            )
            .bind(format!("superseded by rollout {id}"))
            .bind(old)
            .execute(&mut *conn)
            .await?;
        }
    }
    Ok(())
}

async fn insert_rollout(
    conn: &mut AnyConnection,
    kind: &str,
    req: &RolloutRequest,
    previous: Option<i64>,
    state: &str,
    who: &str,
) -> ApiResult<i64> {
    let waves: Vec<String> = req.waves.iter().map(u8::to_string).collect();
    let at = now();
    let (id,): (i64,) = sqlx::query_as(
        "INSERT INTO rollouts (kind, model, version, previous, cohort, waves, min_devices, max_failure_pct, \
         max_latency_regression_pct, max_psi, wave_wait_s, state, wave, wave_started_at, created_by, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16) RETURNING id",
    )
    .bind(kind)
    .bind(&req.target.model)
    .bind(i64::from(req.target.version))
    .bind(previous)
    .bind(req.cohort.clone())
    .bind(waves.join(","))
    .bind(i64::from(req.min_devices))
    .bind(req.max_failure_pct)
    .bind(req.max_latency_regression_pct)
    .bind(req.max_psi)
    .bind(i64::from(req.wave_wait_s))
    .bind(state)
    .bind(0i64)
    .bind(at)
    .bind(who)
    .bind(at)
    .fetch_one(&mut *conn)
    .await?;
    Ok(id)
}

/// Creates a rollout (and supersedes older running ones of the model in the cohort).
///
/// # Errors
/// 400 (bad waves or limits), 404 (version not registered), 500.
pub async fn create(pool: &AnyPool, who: &str, req: &RolloutRequest) -> ApiResult<i64> {
    validate(req)?;
    let mut tx = pool.begin().await?;
    registered(&mut tx, &req.target).await?;
    let previous = base_version(
        &mut tx,
        &req.target.model,
        &req.cohort,
        i64::from(req.target.version),
    )
    .await?;
    let id = insert_rollout(&mut tx, "rollout", req, previous, "running", who).await?;
    supersede(&mut tx, &req.target.model, &req.cohort, id).await?;
    if let Some(r) = load(&mut tx, id).await? {
        enlist(&mut tx, &r).await?;
    }
    audit(
        &mut tx,
        who,
        "rollout",
        &format!(
            "rollout {id}: {} v{} waves {:?} cohort {}",
            req.target.model,
            req.target.version,
            req.waves,
            req.cohort.as_deref().unwrap_or("(all)")
        ),
    )
    .await?;
    tx.commit().await?;
    Ok(id)
}

/// Orders every device of the model (in the cohort) to `to`: a rollback "rollout" that is
/// complete at once.
///
/// # Errors
/// 404 (version not registered), 500.
pub async fn rollback(pool: &AnyPool, who: &str, req: &RollbackRequest) -> ApiResult<i64> {
    let target = ModelRef {
        model: req.model.clone(),
        version: req.to,
    };
    let as_rollout = RolloutRequest {
        target: target.clone(),
        cohort: req.cohort.clone(),
        waves: vec![100],
        min_devices: 0,
        max_failure_pct: 100.0,
        max_latency_regression_pct: 0.0,
        max_psi: 0.0,
        wave_wait_s: 0,
    };
    let mut tx = pool.begin().await?;
    registered(&mut tx, &target).await?;
    let id = insert_rollout(&mut tx, "rollback", &as_rollout, None, "complete", who).await?;
    supersede(&mut tx, &req.model, &req.cohort, id).await?;
    audit(
        &mut tx,
        who,
        "rollback",
        &format!(
            "rollout {id}: every device of {} (cohort {}) back to v{}",
            req.model,
            req.cohort.as_deref().unwrap_or("(all)"),
            req.to
        ),
    )
    .await?;
    tx.commit().await?;
    Ok(id)
}

/// `pause`, `resume` or `abort` by an admin.
///
/// # Errors
/// 404 (no such rollout or action), 409 (the state does not allow it), 500.
pub async fn act(pool: &AnyPool, who: &str, id: i64, action: &str) -> ApiResult<RolloutStatus> {
    let (sql, from) = match action {
        "pause" => (
            "UPDATE rollouts SET state = 'paused' WHERE id = $1 AND state = 'running'",
            "running",
        ),
        "resume" => (
            "UPDATE rollouts SET state = 'running' WHERE id = $1 AND state = 'paused'",
            "paused",
        ),
        "abort" => (
            "UPDATE rollouts SET state = 'aborted', reason = 'aborted by an admin' WHERE id = $1 AND state IN ('running', 'paused')",
            "running or paused",
        ),
        other => {
            return Err(ApiErr::not_found(format!(
                "no action `{other}`: use pause, resume or abort"
            )))
        }
    };
    let mut tx = pool.begin().await?;
    let Some(r) = load(&mut tx, id).await? else {
        return Err(ApiErr::not_found(format!("no rollout {id}")));
    };
    let done = sqlx::query(sql).bind(id).execute(&mut *tx).await?;
    if done.rows_affected() == 0 {
        return Err(ApiErr::conflict(format!(
            "cannot {action} rollout {id}: it is {}, and {action} needs it {from}",
            r.state
        )));
    }
    audit(&mut tx, who, action, &format!("rollout {id}")).await?;
    tx.commit().await?;
    status(pool, id).await
}

// ---------------------------------------------------------------------------------------------
// Check-ins.

const MAX_EVENTS: usize = 256;
const MAX_BINS: usize = 4096;
const MAX_HISTOGRAMS: usize = 64;
/// Most bins over all of a window's input and output histograms.
const MAX_TOTAL_BINS: usize = 4096;
/// Largest count in one window (inferences, a bin): 2⁴⁰, so sums over millions of windows
/// stay far from `i64::MAX`.
const MAX_WINDOW_COUNT: u64 = 1 << 40;

fn check_telemetry(t: &Telemetry) -> ApiResult<()> {
    let hists = || t.input_hist.iter().chain(&t.output_hist);
    let too_big = t.latency_us.len() > LATENCY_BUCKETS_US.len() + 1
        || t.input_hist.len() > MAX_HISTOGRAMS
        || t.output_hist.len() > MAX_HISTOGRAMS
        || hists().any(|h| h.len() > MAX_BINS)
        || hists().map(Vec::len).sum::<usize>() > MAX_TOTAL_BINS
        || t.errors > t.inferences
        || t.inferences > MAX_WINDOW_COUNT
        || hists()
            .flatten()
            .chain(&t.latency_us)
            .any(|&c| c > MAX_WINDOW_COUNT);
    if too_big {
        return Err(ApiErr::bad_request(format!(
            "telemetry refused: at most {} latency buckets, {MAX_HISTOGRAMS} histograms of {MAX_BINS} bins ({MAX_TOTAL_BINS} in all), counts up to {MAX_WINDOW_COUNT}, and errors <= inferences",
            LATENCY_BUCKETS_US.len() + 1
        )));
    }
    Ok(())
}

fn event_row(e: &DeviceEvent) -> (&'static str, u32, String) {
    match e {
        DeviceEvent::Installed { version } => {
            ("installed", *version, format!("installed v{version}"))
        }
        DeviceEvent::InstallFailed { version, reason } => (
            "install_failed",
            *version,
            format!("install of v{version} failed: {reason}"),
        ),
        DeviceEvent::SelfTestFailed { version } => (
            "selftest_failed",
            *version,
            format!("self-test of v{version} failed"),
        ),
        DeviceEvent::RolledBack { from, to, ordered } => (
            if *ordered {
                "rolled_back_ordered"
            } else {
                "rolled_back_self"
            },
            *from,
            format!(
                "rolled back from v{from} to v{to}{}",
                if *ordered {
                    " as ordered"
                } else {
                    " by itself"
                }
            ),
        ),
    }
}

/// Whether an event kind counts as a failure of the version at a gate.
fn is_failure(kind: &str) -> bool {
    matches!(
        kind,
        "install_failed" | "selftest_failed" | "rolled_back_self"
    )
}

/// What a check-in adds to `rollout_stats` for rollout `r`: `(series, bin, n)`, non-zero counts
/// only, sorted (the order in which concurrent check-ins lock the rows).
fn stats_of(r: &Rollout, t: &Telemetry) -> Vec<(String, i64, i64)> {
    fn hist(out: &mut Vec<(String, i64, i64)>, series: &str, h: &[u64]) {
        for (bin, &c) in h.iter().enumerate() {
            if c > 0 {
                out.push((series.to_string(), bin as i64, count(c)));
            }
        }
    }
    let mut out = Vec::new();
    let v = i64::from(t.version);
    if v == r.version {
        for (series, c) in [("inferences", t.inferences), ("errors", t.errors)] {
            if c > 0 {
                out.push((series.to_string(), 0, count(c)));
            }
        }
        hist(&mut out, "latency", &t.latency_us);
        for (i, h) in t.input_hist.iter().enumerate() {
            hist(&mut out, &format!("input:{i}"), h);
        }
        for (i, h) in t.output_hist.iter().enumerate() {
            hist(&mut out, &format!("output:{i}"), h);
        }
    } else if Some(v) == r.previous {
        hist(&mut out, "prev_latency", &t.latency_us);
    }
    out.sort();
    out
}

fn count(c: u64) -> i64 {
    i64::try_from(c).unwrap_or(i64::MAX)
}

/// Adds a check-in to the aggregates of the running rollout `r` that governs the device: its
/// row in `rollout_devices` (reported / failed only ever go from 0 to 1) and its telemetry in
/// `rollout_stats`.
async fn tally(
    conn: &mut AnyConnection,
    r: &Rollout,
    device_id: &str,
    body: &CheckIn,
) -> ApiResult<()> {
    let v = r.version;
    let mut reported = body
        .running
        .as_ref()
        .is_some_and(|m| m.model == r.model && i64::from(m.version) == v);
    let mut failed = false;
    for e in &body.events {
        let (kind, version, _) = event_row(e);
        if i64::from(version) == v {
            reported = true;
            failed |= is_failure(kind);
        }
    }
    reported |= body
        .telemetry
        .as_ref()
        .is_some_and(|t| i64::from(t.version) == v);
    let wave = first_wave(&r.waves, r.id, device_id);
    sqlx::query(
        "INSERT INTO rollout_devices (rollout_id, device_id, wave, reported, failed) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (rollout_id, device_id) DO UPDATE SET \
         reported = CASE WHEN excluded.reported > rollout_devices.reported THEN excluded.reported ELSE rollout_devices.reported END, \
         failed = CASE WHEN excluded.failed > rollout_devices.failed THEN excluded.failed ELSE rollout_devices.failed END \
         WHERE excluded.reported > rollout_devices.reported OR excluded.failed > rollout_devices.failed",
    )
    .bind(r.id)
    .bind(device_id)
    .bind(wave)
    .bind(i64::from(reported))
    .bind(i64::from(failed))
    .execute(&mut *conn)
    .await?;
    let stats = body
        .telemetry
        .as_ref()
        .map(|t| stats_of(r, t))
        .unwrap_or_default();
    for chunk in stats.chunks(ROWS_PER_INSERT) {
        let mut sql =
            String::from("INSERT INTO rollout_stats (rollout_id, wave, series, bin, n) VALUES ");
        for i in 0..chunk.len() {
            let p = 3 + 3 * i;
            let sep = if i == 0 { "" } else { ", " };
            let _ = write!(sql, "{sep}($1, $2, ${p}, ${}, ${})", p + 1, p + 2);
        }
        sql.push_str(
            " ON CONFLICT (rollout_id, wave, series, bin) DO UPDATE SET n = rollout_stats.n + excluded.n",
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(r.id).bind(wave);
        for (series, bin, n) in chunk {
            q = q.bind(series.clone()).bind(*bin).bind(*n);
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

/// Writes what a check-in says: the device's row, its events (and blocks), its telemetry
/// window.
async fn record(
    conn: &mut AnyConnection,
    dev: &DeviceRow,
    model: &str,
    body: &CheckIn,
    at: i64,
) -> ApiResult<()> {
    let last_event = body.events.last().map(|e| event_row(e).2);
    sqlx::query(
        "UPDATE devices SET last_seen = $1, running_model = $2, running_version = $3, last_event = COALESCE($4, last_event) WHERE id = $5",
    )
    .bind(at)
    .bind(dev.running_model.clone())
    .bind(dev.running_version)
    .bind(last_event)
    .bind(&dev.id)
    .execute(&mut *conn)
    .await?;
    // The newest rollout of the model (any cohort or state): what a block is recorded against.
    let mut latest: Option<i64> = None;
    for e in &body.events {
        let (kind, version, detail) = event_row(e);
        sqlx::query(
            "INSERT INTO device_events (device_id, at, kind, model, version, detail) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&dev.id)
        .bind(at)
        .bind(kind)
        .bind(model)
        .bind(i64::from(version))
        .bind(detail)
        .execute(&mut *conn)
        .await?;
        if matches!(kind, "selftest_failed" | "rolled_back_self") {
            let rollout_id = match latest {
                Some(id) => id,
                None => {
                    let row: Option<(i64,)> = sqlx::query_as(
                        "SELECT id FROM rollouts WHERE model = $1 ORDER BY id DESC LIMIT 1",
                    )
                    .bind(model)
                    .fetch_optional(&mut *conn)
                    .await?;
                    *latest.insert(row.map_or(0, |(id,)| id))
                }
            };
            sqlx::query(
                "INSERT INTO blocked (device_id, model, version, rollout_id, at) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (device_id, model, version) DO UPDATE SET rollout_id = excluded.rollout_id, at = excluded.at",
            )
            .bind(&dev.id)
            .bind(model)
            .bind(i64::from(version))
            .bind(rollout_id)
            .bind(at)
            .execute(&mut *conn)
            .await?;
        }
    }
    if let Some(t) = &body.telemetry {
        sqlx::query(
            "INSERT INTO telemetry (device_id, model, version, at, inferences, errors, latency, input_hist, output_hist) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&dev.id)
        .bind(model)
        .bind(i64::from(t.version))
        .bind(at)
        .bind(count(t.inferences))
        .bind(count(t.errors))
        .bind(json(&t.latency_us))
        .bind(json(&t.input_hist))
        .bind(json(&t.output_hist))
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Records a check-in (running version, events, telemetry, and the governing rollout's
/// aggregates) in one transaction, judges that rollout's gate when it is due on this server
/// ([`JudgeClock`]), and answers with the device's assignment. Everything runs on `conn`, so a
/// check-in waits for a connection once.
///
/// # Errors
/// 400 (too many events, oversized telemetry), 500.
pub async fn checkin(
    conn: &mut AnyConnection,
    clock: &JudgeClock,
    device: &DeviceRow,
    body: &CheckIn,
) -> ApiResult<CheckInResponse> {
    if body.events.len() > MAX_EVENTS {
        return Err(ApiErr::bad_request(format!(
            "check-in refused: more than {MAX_EVENTS} events; send them over several check-ins"
        )));
    }
    if let Some(t) = &body.telemetry {
        check_telemetry(t)?;
    }
    let at = now();
    let mut dev = device.clone();
    if let Some(r) = &body.running {
        dev.running_model = Some(r.model.clone());
        dev.running_version = Some(i64::from(r.version));
    }
    let model = model_of(conn, &dev).await?.unwrap_or_default();
    let mut gov = if model.is_empty() {
        None
    } else {
        governing(conn, &model, &dev.cohort).await?
    };
    // Aggregates only while a gate may still read them.
    let tallied = gov
        .as_ref()
        .filter(|r| r.kind == "rollout" && (r.state == "running" || r.state == "paused"));
    if body.events.is_empty() && tallied.is_none() {
        // The common check-in (nothing new, no rollout in flight) writes two independent rows:
        // each statement commits by itself, two round trips fewer than BEGIN … COMMIT.
        record(conn, &dev, &model, body, at).await?;
    } else {
        let mut tx = conn.begin().await?;
        record(&mut tx, &dev, &model, body, at).await?;
        if let Some(r) = tallied {
            tally(&mut tx, r, &dev.id, body).await?;
        }
        tx.commit().await?;
    }

    if let Some(r) = gov
        .as_ref()
        .filter(|r| r.kind == "rollout" && r.state == "running")
    {
        if clock.due(r.id) {
            let (changed, devices) = judge_counted(conn, r.id).await?;
            clock.judged(r.id, devices);
            if changed {
                gov = governing(conn, &model, &dev.cohort).await?;
            }
        }
    }
    let assignment = match gov {
        Some(r) => offer(conn, &dev, &model, &r).await?,
        None => None,
    };
    Ok(CheckInResponse {
        assignment,
        next_checkin_s: CHECKIN_INTERVAL_S,
    })
}

/// JSON of a value, for TEXT columns.
fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "[]".into())
}

/// What the device should run now, if it should change.
///
/// # Errors
/// The database fails.
pub async fn assignment(
    conn: &mut AnyConnection,
    dev: &DeviceRow,
) -> ApiResult<Option<Assignment>> {
    let Some(model) = model_of(conn, dev).await? else {
        return Ok(None);
    };
    let Some(r) = governing(conn, &model, &dev.cohort).await? else {
        return Ok(None);
    };
    offer(conn, dev, &model, &r).await
}

/// What rollout `r` (governing the device for `model`) has the device run, if it should change.
async fn offer(
    conn: &mut AnyConnection,
    dev: &DeviceRow,
    model: &str,
    r: &Rollout,
) -> ApiResult<Option<Assignment>> {
    let running = dev
        .running_version
        .filter(|_| dev.running_model.as_deref() == Some(model));
    let (desired, ordered_back) = match (r.kind.as_str(), r.state.as_str()) {
        ("rollback", _) => (Some(r.version), running.is_some_and(|v| v > r.version)),
        (_, "complete") => (Some(r.version), false),
        (_, "running") if in_wave(r, &dev.id, r.wave) => (Some(r.version), false),
        (_, "paused") if running == Some(r.version) => (Some(r.version), false),
        (_, "aborted") => (r.previous, running == Some(r.version)),
        _ => (r.previous, false),
    };
    let Some(desired) = desired else {
        return Ok(None);
    };
    if running == Some(desired) || (!ordered_back && running.is_some_and(|v| v > desired)) {
        return Ok(None);
    }
    let blocked: Option<(i64,)> = sqlx::query_as(
        "SELECT rollout_id FROM blocked WHERE device_id = $1 AND model = $2 AND version = $3",
    )
    .bind(&dev.id)
    .bind(model)
    .bind(desired)
    .fetch_optional(&mut *conn)
    .await?;
    if blocked.is_some_and(|(b,)| b >= r.id) && !ordered_back {
        return Ok(None);
    }
    let found: Option<(String, i64, String)> =
        sqlx::query_as("SELECT sha256, size, target FROM models WHERE name = $1 AND version = $2")
            .bind(model)
            .bind(desired)
            .fetch_optional(&mut *conn)
            .await?;
    let Some((sha256, size, target)) = found else {
        return Ok(None);
    };
    if !target.is_empty() && target != dev.board {
        return Ok(None);
    }
    Ok(Some(Assignment {
        target: ModelRef {
            model: model.to_string(),
            version: desired as u32,
        },
        url: format!("/api/v1/artifacts/{sha256}"),
        sha256,
        size: size as u64,
        rollout: Some(r.id),
        rollback: ordered_back,
    }))
}

// ---------------------------------------------------------------------------------------------
// Gates.

/// Population stability index of `actual` against `expected` counts (same bins): the sum over
/// bins of `(a − e) · ln(a / e)` of the two normalized histograms, each bin floored at
/// [`PSI_EPSILON`]. `None` when either side is empty or the bin counts differ.
pub fn psi(expected: &[u64], actual: &[u64]) -> Option<f64> {
    if expected.len() != actual.len() || expected.is_empty() {
        return None;
    }
    let te: u64 = expected.iter().sum();
    let ta: u64 = actual.iter().sum();
    if te == 0 || ta == 0 {
        return None;
    }
    Some(
        expected
            .iter()
            .zip(actual)
            .map(|(&e, &a)| {
                let e = (e as f64 / te as f64).max(PSI_EPSILON);
                let a = (a as f64 / ta as f64).max(PSI_EPSILON);
                (a - e) * (a / e).ln()
            })
            .sum(),
    )
}

/// The median of a latency histogram over [`LATENCY_BUCKETS_US`] (linear within a bucket; the
/// overflow bucket is taken as twice the last bound wide).
pub fn p50_us(counts: &[u64]) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let half = total as f64 / 2.0;
    let mut seen = 0.0;
    let mut lo = 0.0;
    for (i, &c) in counts.iter().enumerate() {
        let hi = LATENCY_BUCKETS_US.get(i).map_or(lo * 2.0, |&b| b as f64);
        let c = c as f64;
        if c > 0.0 && seen + c >= half {
            return Some(lo + (hi - lo) * ((half - seen) / c));
        }
        seen += c;
        lo = hi;
    }
    Some(lo)
}

/// Adds `n` at `bin`, growing `acc` as needed.
fn add_at(acc: &mut Vec<u64>, bin: usize, n: u64) {
    if acc.len() <= bin {
        acc.resize(bin + 1, 0);
    }
    acc[bin] = acc[bin].saturating_add(n);
}

struct Judged {
    figures: GateFigures,
    ready: bool,
}

/// The gate figures of wave `wave` (cumulative) of rollout `r`, from its aggregates.
async fn figures(conn: &mut AnyConnection, r: &Rollout, wave: i64) -> ApiResult<Judged> {
    let count_sql = "SELECT COUNT(*), COUNT(CASE WHEN reported <> 0 THEN 1 END), COUNT(CASE WHEN failed <> 0 THEN 1 END) \
         FROM rollout_devices WHERE rollout_id = $1 AND wave <= $2";
    let mut counts: (i64, i64, i64) = sqlx::query_as(count_sql)
        .bind(r.id)
        .bind(wave)
        .fetch_one(&mut *conn)
        .await?;
    let any: Option<(i64,)> = if counts.0 == 0 {
        sqlx::query_as("SELECT wave FROM rollout_devices WHERE rollout_id = $1 LIMIT 1")
            .bind(r.id)
            .fetch_optional(&mut *conn)
            .await?
    } else {
        Some((0,))
    };
    if any.is_none() {
        // A rollout created before the aggregates existed, or when the fleet was empty.
        enlist(conn, r).await?;
        counts = sqlx::query_as(count_sql)
            .bind(r.id)
            .bind(wave)
            .fetch_one(&mut *conn)
            .await?;
    }
    let (n, reported_n, failures) = counts;
    let rows: Vec<(i64, String, i64, i64)> =
        sqlx::query_as("SELECT wave, series, bin, n FROM rollout_stats WHERE rollout_id = $1")
            .bind(r.id)
            .fetch_all(&mut *conn)
            .await?;
    let (mut inferences, mut errors) = (0u64, 0u64);
    let mut latency = Vec::new();
    // The previous version's latency: on the wave's devices, and on all the rollout's devices.
    let (mut previous_same, mut previous_all) = (Vec::new(), Vec::new());
    let mut inputs: Vec<Vec<u64>> = Vec::new();
    let mut outputs: Vec<Vec<u64>> = Vec::new();
    for (w, series, bin, c) in rows {
        let (Ok(bin), Ok(c)) = (usize::try_from(bin), u64::try_from(c)) else {
            continue;
        };
        if bin >= MAX_BINS {
            continue;
        }
        if series == "prev_latency" {
            add_at(&mut previous_all, bin, c);
            if w <= wave {
                add_at(&mut previous_same, bin, c);
            }
            continue;
        }
        if w > wave {
            continue;
        }
        let hist = |prefix: &str| {
            series
                .strip_prefix(prefix)
                .and_then(|i| i.parse::<usize>().ok())
                .filter(|&i| i < MAX_HISTOGRAMS)
        };
        match series.as_str() {
            "inferences" => inferences = inferences.saturating_add(c),
            "errors" => errors = errors.saturating_add(c),
            "latency" => add_at(&mut latency, bin, c),
            _ => {
                let (side, i) = match (hist("input:"), hist("output:")) {
                    (Some(i), _) => (&mut inputs, i),
                    (_, Some(i)) => (&mut outputs, i),
                    _ => continue,
                };
                if side.len() <= i {
                    side.resize(i + 1, Vec::new());
                }
                add_at(&mut side[i], bin, c);
            }
        }
    }
    let previous_p50 = if r.previous.is_some() {
        p50_us(&previous_same).or_else(|| p50_us(&previous_all))
    } else {
        None
    };
    let baseline: Option<(String,)> =
        sqlx::query_as("SELECT baseline FROM models WHERE name = $1 AND version = $2")
            .bind(&r.model)
            .bind(r.version)
            .fetch_optional(&mut *conn)
            .await?;
    let baseline: Vec<Baseline> = baseline
        .and_then(|(b,)| serde_json::from_str(&b).ok())
        .unwrap_or_default();
    let psi_max = baseline
        .iter()
        .filter_map(|b| {
            let side = if b.kind == "input" { &inputs } else { &outputs };
            // Trailing empty bins are not stored: pad to the BASELINE's bins.
            let mut a = side.get(b.index as usize)?.clone();
            if a.len() < b.counts.len() {
                a.resize(b.counts.len(), 0);
            }
            psi(&b.counts, &a)
        })
        .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));

    let n = u32::try_from(n).unwrap_or(u32::MAX);
    let reported_n = u32::try_from(reported_n).unwrap_or(u32::MAX);
    let failures = u32::try_from(failures).unwrap_or(u32::MAX);
    let failure_pct = if reported_n == 0 {
        0.0
    } else {
        f64::from(failures) * 100.0 / f64::from(reported_n)
    };
    let error_rate = if inferences == 0 {
        0.0
    } else {
        errors as f64 / inferences as f64
    };
    let p50 = p50_us(&latency);
    let regression = match (p50, previous_p50) {
        (Some(new), Some(old)) if old > 0.0 => Some((new - old) / old * 100.0),
        _ => None,
    };
    let needed = (r.min_devices.max(0) as u32).min(n);
    let ready = reported_n >= needed && now() >= r.wave_started_at + r.wave_wait_s;
    let mut reason = None;
    if failure_pct > r.max_failure_pct {
        reason = Some(format!(
            "failures {failure_pct:.1}% > {:.1}% ({failures} of {reported_n} devices failed to install or self-test)",
            r.max_failure_pct
        ));
    } else if error_rate * 100.0 > r.max_failure_pct {
        reason = Some(format!(
            "inference errors {:.2}% > {:.1}% ({errors} of {inferences})",
            error_rate * 100.0,
            r.max_failure_pct
        ));
    } else if let Some(reg) = regression.filter(|reg| *reg > r.max_latency_regression_pct) {
        reason = Some(format!(
            "p50 latency regressed {reg:.1}% > {:.1}% ({:.0} us against {:.0} us)",
            r.max_latency_regression_pct,
            p50.unwrap_or(0.0),
            previous_p50.unwrap_or(0.0)
        ));
    } else if let Some(p) = psi_max.filter(|p| *p > r.max_psi) {
        reason = Some(format!(
            "drift: PSI {p:.3} > {:.3} against the artifact's BASELINE",
            r.max_psi
        ));
    }
    let passed = ready.then_some(reason.is_none());
    Ok(Judged {
        figures: GateFigures {
            devices: n,
            reported: reported_n,
            failures,
            failure_pct,
            error_rate,
            latency_p50_us: p50,
            previous_latency_p50_us: previous_p50,
            latency_regression_pct: regression,
            psi: psi_max,
            passed,
            reason: if ready { reason } else { None },
        },
        ready,
    })
}

/// Judges the current wave's gate of a running rollout, and advances, completes or aborts it;
/// `true` when this call changed it. Safe to call from any number of servers at once.
///
/// # Errors
/// The database fails.
pub async fn judge(conn: &mut AnyConnection, id: i64) -> ApiResult<bool> {
    Ok(judge_counted(conn, id).await?.0)
}

/// [`judge`], and the number of devices in the judged wave.
async fn judge_counted(conn: &mut AnyConnection, id: i64) -> ApiResult<(bool, u32)> {
    let mut tx = conn.begin().await?;
    let Some(r) = load(&mut tx, id).await? else {
        return Ok((false, 0));
    };
    if r.state != "running" || r.kind != "rollout" {
        return Ok((false, 0));
    }
    let j = figures(&mut tx, &r, r.wave).await?;
    let devices = j.figures.devices;
    if !j.ready {
        tx.commit().await?;
        return Ok((false, devices));
    }
    let passed = j.figures.passed == Some(true);
    let last = r.wave + 1 >= r.waves.len() as i64;
    let at = now();
    let changed = if !passed {
        let reason = format!(
            "wave {} gate failed: {}",
            r.wave + 1,
            j.figures.reason.clone().unwrap_or_default()
        );
        sqlx::query(
            "UPDATE rollouts SET state = 'aborted', reason = $1 WHERE id = $2 AND wave = $3 AND state = 'running'",
        )
        .bind(reason)
        .bind(id)
        .bind(r.wave)
        .execute(&mut *tx)
        .await?
    } else if last {
        sqlx::query(
            "UPDATE rollouts SET state = 'complete' WHERE id = $1 AND wave = $2 AND state = 'running'",
        )
        .bind(id)
        .bind(r.wave)
        .execute(&mut *tx)
        .await?
    } else {
        sqlx::query(
            "UPDATE rollouts SET wave = $1, wave_started_at = $2 WHERE id = $3 AND wave = $4 AND state = 'running'",
        )
        .bind(r.wave + 1)
        .bind(at)
        .bind(id)
        .bind(r.wave)
        .execute(&mut *tx)
        .await?
    };
    if changed.rows_affected() == 0 {
        // Another server judged it first.
        return Ok((false, devices));
    }
    // The registry follows: a completed rollout puts its version in production, an aborted one
    // marks it rejected (unless it is in production already).
    if !passed {
        sqlx::query(
            "UPDATE models SET stage = 'rejected' WHERE name = $1 AND version = $2 AND stage <> 'production'",
        )
        .bind(&r.model)
        .bind(r.version)
        .execute(&mut *tx)
        .await?;
    } else if last {
        super::registry::set_stage_in(&mut tx, "rollout", &r.model, r.version, "production")
            .await?;
    }
    sqlx::query(
        "INSERT INTO rollout_gates (rollout_id, wave, passed, figures, at) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(id)
    .bind(r.wave)
    .bind(i64::from(passed))
    .bind(serde_json::to_string(&j.figures).unwrap_or_default())
    .bind(at)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok((true, devices))
}

fn state_of(s: &str) -> RolloutState {
    match s {
        "running" => RolloutState::Running,
        "paused" => RolloutState::Paused,
        "complete" => RolloutState::Complete,
        "superseded" => RolloutState::Superseded,
        _ => RolloutState::Aborted,
    }
}

/// The newest `limit` rollouts, newest first, without judging gates.
///
/// # Errors
/// 500.
pub async fn list(pool: &AnyPool, limit: i64) -> ApiResult<Vec<RolloutSummary>> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {ROLLOUT_COLUMNS} FROM rollouts ORDER BY id DESC LIMIT $1"
    )))
    .bind(limit)
    .fetch_all(pool)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        let r = rollout_from(row)?;
        out.push(RolloutSummary {
            id: r.id,
            target: ModelRef {
                model: r.model,
                version: r.version as u32,
            },
            kind: r.kind,
            previous: r.previous.map(|p| p as u32),
            cohort: r.cohort,
            state: state_of(&r.state),
            wave: r.wave as u32,
            waves: r.waves,
            reason: r.reason,
            created_at: super::rfc3339(r.created_at),
        });
    }
    Ok(out)
}

/// A rollout's status (its gate judged first).
///
/// # Errors
/// 404 (no such rollout), 500.
pub async fn status(pool: &AnyPool, id: i64) -> ApiResult<RolloutStatus> {
    let mut conn = pool.acquire().await?;
    judge(&mut conn, id).await?;
    let Some(r) = load(&mut conn, id).await? else {
        return Err(ApiErr::not_found(format!("no rollout {id}")));
    };
    let gates: Vec<(i64, i64, String)> = sqlx::query_as(
        "SELECT wave, passed, figures FROM rollout_gates WHERE rollout_id = $1 ORDER BY wave",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    let judged: HashMap<i64, (bool, GateFigures)> = gates
        .into_iter()
        .map(|(w, p, f)| (w, (p != 0, serde_json::from_str(&f).unwrap_or_default())))
        .collect();
    let mut waves = Vec::new();
    for (i, pct) in r.waves.iter().enumerate() {
        let i64i = i as i64;
        let (state, gate) = match judged.get(&i64i) {
            Some((true, g)) => ("passed", g.clone()),
            Some((false, g)) => ("failed", g.clone()),
            None if i64i == r.wave && (r.state == "running" || r.state == "paused") => {
                ("running", figures(&mut conn, &r, i64i).await?.figures)
            }
            None if i64i < r.wave => ("passed", GateFigures::default()),
            None => ("pending", GateFigures::default()),
        };
        waves.push(WaveStatus {
            index: i as u32,
            pct: *pct,
            state: state.into(),
            gate,
        });
    }
    let counts: Vec<(Option<i64>, i64)> = sqlx::query_as(
        "SELECT running_version, COUNT(*) FROM devices WHERE running_model = $1 GROUP BY running_version",
    )
    .bind(&r.model)
    .fetch_all(&mut *conn)
    .await?;
    let devices: BTreeMap<String, u64> = counts
        .into_iter()
        .filter_map(|(v, n)| v.map(|v| (v.to_string(), n as u64)))
        .collect();
    Ok(RolloutStatus {
        id,
        target: ModelRef {
            model: r.model.clone(),
            version: r.version as u32,
        },
        previous: r.previous.map(|p| p as u32),
        state: state_of(&r.state),
        reason: r.reason.clone(),
        devices,
        waves,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psi_is_zero_for_equal_shapes_and_grows_with_drift() {
        assert_eq!(
            psi(&[10, 20, 30], &[1, 2, 3]).map(|p| p.abs() < 1e-12),
            Some(true)
        );
        let small = psi(&[25, 25, 25, 25], &[27, 24, 25, 24]).unwrap_or(f64::NAN);
        let big = psi(&[25, 25, 25, 25], &[0, 0, 10, 90]).unwrap_or(f64::NAN);
        assert!(small < 0.01, "{small}");
        assert!(big > 1.0, "{big}");
        assert_eq!(psi(&[1, 2], &[1, 2, 3]), None);
        assert_eq!(psi(&[0, 0], &[1, 2]), None);
    }

    #[test]
    fn p50_interpolates_within_the_bucket() {
        // 10 samples in (100, 200] µs: the median is the bucket's middle.
        let mut h = vec![0u64; 17];
        h[2] = 10;
        assert_eq!(p50_us(&h), Some(150.0));
        assert_eq!(p50_us(&[0, 0]), None);
    }

    #[test]
    fn buckets_are_stable_and_spread() {
        assert_eq!(bucket("d-1", 7), bucket("d-1", 7));
        let under_50 = (0..1000)
            .filter(|i| bucket(&format!("d-{i}"), 1) < 50)
            .count();
        assert!((400..600).contains(&under_50), "{under_50}");
    }
}
