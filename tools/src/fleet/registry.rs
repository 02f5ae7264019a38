//! The registry: pushed artifacts (verified, named by their MANIFEST, stored by SHA-256, with an
//! audit row), and enrolled devices.

use super::api::{
    AuditEntry, DeviceSummary, EnrollRequest, EnrollResponse, ModelRef, ModelVersion, PushResponse,
    StageRequest, STAGES,
};
use super::store::Store;
use super::{now, random_hex, rfc3339, sha256_hex, ApiErr, ApiResult};
use crate::artifact::AlignedBytes;
use crate::signing::{key_id_hex, verify_artifact, SigningError};
use axum::http::StatusCode;
use kiln_runtime::sections::{baseline_histograms, BaselineTensor, Manifest};
use kiln_runtime::Model;
use serde::{Deserialize, Serialize};
use sqlx::AnyPool;

/// One BASELINE histogram, as the registry keeps it (JSON in `models.baseline`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    /// `input` or `output`.
    pub kind: String,
    /// Index of the graph input or output.
    pub index: u32,
    /// Reference counts per bin.
    pub counts: Vec<u64>,
}

/// What the registry reads from a verified artifact.
#[derive(Clone, Debug, PartialEq)]
pub struct ArtifactInfo {
    /// MANIFEST name.
    pub name: String,
    /// Model version.
    pub version: u32,
    /// Security counter.
    pub security_counter: u32,
    /// Target board (`""` = any).
    pub target: String,
    /// Key ids of the signatures (hex).
    pub signed_by: Vec<String>,
    /// MANIFEST JSON.
    pub lineage: serde_json::Value,
    /// BASELINE histograms.
    pub baseline: Vec<Baseline>,
}

fn refuse(message: String) -> ApiErr {
    ApiErr::new(StatusCode::UNPROCESSABLE_ENTITY, message)
}

/// Verifies an artifact against the trusted keys and reads its name, version, lineage and
/// baseline.
///
/// # Errors
/// 422 when it is malformed, not signed by a trusted key, or has no MANIFEST name.
pub fn inspect_artifact(bytes: &[u8], trusted: &[[u8; 32]]) -> ApiResult<ArtifactInfo> {
    let info = verify_artifact(bytes, trusted).map_err(|e| {
        let hint = match e {
            SigningError::Signature(_) => "sign it with `kiln sign` using a key the server trusts (--trusted-key)",
            _ => "push a .kiln artifact written by `kiln convert` or `kiln quantize` and signed by `kiln sign`",
        };
        refuse(format!("artifact refused ({}): {e}; hint: {hint}", e.code()))
    })?;
    let aligned = AlignedBytes::new(bytes);
    let model = Model::load(aligned.as_slice())
        .map_err(|e| refuse(format!("artifact refused (malformed): {e}")))?;
    let manifest = Manifest::of(&model)
        .map_err(|e| refuse(format!("artifact refused (malformed): {e}")))?
        .filter(|m| !m.name.trim().is_empty())
        .ok_or_else(|| {
            refuse("artifact refused (no_name): it has no MANIFEST name; hint: write it with `kiln convert --name` or `kiln quantize`".into())
        })?;
    let lineage = serde_json::from_str(manifest.json).unwrap_or(serde_json::Value::Null);
    let mut baseline = Vec::new();
    baseline_histograms(&model, |h| {
        let (kind, index) = match h.tensor {
            BaselineTensor::Input(i) => ("input", i),
            BaselineTensor::Output(i) => ("output", i),
        };
        baseline.push(Baseline {
            kind: kind.into(),
            index: index.into(),
            counts: h
                .counts
                .chunks_exact(4)
                .map(|c| u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect(),
        });
    })
    .map_err(|e| refuse(format!("artifact refused (malformed baseline): {e}")))?;
    Ok(ArtifactInfo {
        name: manifest.name.to_string(),
        version: info.model_version,
        security_counter: info.security_counter,
        target: info.target,
        signed_by: info.signatures.iter().map(key_id_hex).collect(),
        lineage,
        baseline,
    })
}

/// Registers a pushed artifact: verify, store by digest, one `models` row and one audit row.
///
/// # Errors
/// 422 (refused artifact), 409 (the same name and version with other bytes), 500.
pub async fn push(
    pool: &AnyPool,
    store: &Store,
    trusted: &[[u8; 32]],
    who: &str,
    bytes: Vec<u8>,
) -> ApiResult<PushResponse> {
    let info = inspect_artifact(&bytes, trusted)?;
    let sha = sha256_hex(&bytes);
    let target = ModelRef {
        model: info.name.clone(),
        version: info.version,
    };
    let existing: Option<(String,)> =
        sqlx::query_as("SELECT sha256 FROM models WHERE name = $1 AND version = $2")
            .bind(&info.name)
            .bind(i64::from(info.version))
            .fetch_optional(pool)
            .await?;
    if let Some((old,)) = existing {
        if old == sha {
            return Ok(PushResponse {
                model: target,
                sha256: sha,
                existed: true,
            });
        }
        return Err(ApiErr::conflict(format!(
            "{} version {} is already registered with other bytes (sha256 {old}); hint: give the new artifact a higher version with `kiln sign --version`",
            info.name, info.version
        )));
    }
    let size = bytes.len() as i64;
    store
        .put(&sha, bytes)
        .await
        .map_err(|e| ApiErr::internal("cannot store the artifact", e))?;
    let at = now();
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO models (name, version, sha256, size, security_counter, target, signed_by, lineage, baseline, stage, pushed_by, pushed_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind(&info.name)
    .bind(i64::from(info.version))
    .bind(&sha)
    .bind(size)
    .bind(i64::from(info.security_counter))
    .bind(&info.target)
    .bind(info.signed_by.join(","))
    .bind(info.lineage.to_string())
    .bind(serde_json::to_string(&info.baseline).unwrap_or_else(|_| "[]".into()))
    .bind("registered")
    .bind(who)
    .bind(at)
    .execute(&mut *tx)
    .await
    .map_err(|e| match e {
        sqlx::Error::Database(d) if d.is_unique_violation() => ApiErr::conflict(format!(
            "{} version {} was registered at the same time by another push; push again to see which",
            info.name, info.version
        )),
        e => e.into(),
    })?;
    audit(
        &mut tx,
        who,
        "push",
        &format!(
            "{} v{} sha256 {sha} ({size} bytes)",
            info.name, info.version
        ),
    )
    .await?;
    tx.commit().await?;
    Ok(PushResponse {
        model: target,
        sha256: sha,
        existed: false,
    })
}

/// Appends an audit row.
///
/// # Errors
/// The database fails.
pub async fn audit(
    conn: &mut sqlx::AnyConnection,
    who: &str,
    action: &str,
    detail: &str,
) -> ApiResult<()> {
    sqlx::query("INSERT INTO audit (at, who, action, detail) VALUES ($1, $2, $3, $4)")
        .bind(now())
        .bind(who)
        .bind(action)
        .bind(detail)
        .execute(conn)
        .await?;
    Ok(())
}

type ModelRow = (
    String,
    i64,
    String,
    i64,
    i64,
    String,
    String,
    String,
    i64,
    String,
);

/// Every registered version, by name then version.
///
/// # Errors
/// The database fails.
pub async fn list_models(pool: &AnyPool) -> ApiResult<Vec<ModelVersion>> {
    let rows: Vec<ModelRow> = sqlx::query_as(
        "SELECT name, version, sha256, size, security_counter, signed_by, lineage, pushed_by, pushed_at, stage \
         FROM models ORDER BY name, version",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(name, version, sha256, size, counter, signed_by, lineage, pushed_by, at, stage)| {
                ModelVersion {
                    model: ModelRef {
                        model: name,
                        version: version as u32,
                    },
                    sha256,
                    size: size as u64,
                    security_counter: counter as u32,
                    signed_by: signed_by
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .collect(),
                    lineage: serde_json::from_str(&lineage).unwrap_or(serde_json::Value::Null),
                    pushed_by,
                    pushed_at: rfc3339(at),
                    stage,
                }
            },
        )
        .collect())
}

/// Enrolls a device: a random id and token; only the token's SHA-256 is kept.
///
/// # Errors
/// 400 (empty board), 500.
pub async fn enroll(pool: &AnyPool, req: &EnrollRequest) -> ApiResult<EnrollResponse> {
    if req.board.trim().is_empty() {
        return Err(ApiErr::bad_request(
            "enroll refused: `board` is empty; send the board name the device's artifacts target",
        ));
    }
    let id = format!("d-{}", random_hex(8)?);
    let token = random_hex(32)?;
    let cohort = req
        .cohort
        .clone()
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "default".into());
    sqlx::query(
        "INSERT INTO devices (id, token_sha256, name, board, cohort, agent, enrolled_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&id)
    .bind(sha256_hex(token.as_bytes()))
    .bind(&req.name)
    .bind(&req.board)
    .bind(&cohort)
    .bind(&req.agent)
    .bind(now())
    .execute(pool)
    .await?;
    Ok(EnrollResponse {
        device_id: id,
        token,
    })
}

type DeviceListRow = (
    String,
    String,
    String,
    String,
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<String>,
);

/// Every device, by id.
///
/// # Errors
/// The database fails.
pub async fn list_devices(pool: &AnyPool) -> ApiResult<Vec<DeviceSummary>> {
    let rows: Vec<DeviceListRow> = sqlx::query_as(
        "SELECT id, name, board, cohort, running_model, running_version, last_seen, last_event FROM devices ORDER BY id",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(device_id, name, board, cohort, model, version, seen, last_event)| DeviceSummary {
                device_id,
                name,
                board,
                cohort,
                running: model.zip(version).map(|(model, v)| ModelRef {
                    model,
                    version: v as u32,
                }),
                last_seen: seen.map(rfc3339),
                last_event,
            },
        )
        .collect())
}

/// Moves `model` version `version` to `stage` inside `tx`: a version entering `production`
/// sends the model's other production versions to `archived`. Writes an audit row. Returns
/// whether the version exists.
///
/// # Errors
/// The database fails.
pub async fn set_stage_in(
    conn: &mut sqlx::AnyConnection,
    who: &str,
    model: &str,
    version: i64,
    stage: &str,
) -> ApiResult<bool> {
    let changed = sqlx::query("UPDATE models SET stage = $1 WHERE name = $2 AND version = $3")
        .bind(stage)
        .bind(model)
        .bind(version)
        .execute(&mut *conn)
        .await?;
    if changed.rows_affected() == 0 {
        return Ok(false);
    }
    if stage == "production" {
        sqlx::query(
            "UPDATE models SET stage = 'archived' WHERE name = $1 AND version <> $2 AND stage = 'production'",
        )
        .bind(model)
        .bind(version)
        .execute(&mut *conn)
        .await?;
    }
    audit(
        conn,
        who,
        "stage",
        &format!("{model} v{version} -> {stage}"),
    )
    .await?;
    Ok(true)
}

/// `POST /api/v1/models/stage`.
///
/// # Errors
/// 400 (unknown stage), 404 (no such version), 500.
pub async fn set_stage(pool: &AnyPool, who: &str, req: &StageRequest) -> ApiResult<()> {
    if !STAGES.contains(&req.stage.as_str()) {
        return Err(ApiErr::bad_request(format!(
            "unknown stage {:?}; use one of {}",
            req.stage,
            STAGES.join(", ")
        )));
    }
    let mut tx = pool.begin().await?;
    let found = set_stage_in(
        &mut tx,
        who,
        &req.target.model,
        i64::from(req.target.version),
        &req.stage,
    )
    .await?;
    if !found {
        return Err(ApiErr::not_found(format!(
            "{} version {} is not registered; `kiln models` lists what is",
            req.target.model, req.target.version
        )));
    }
    tx.commit().await?;
    Ok(())
}

/// The newest `limit` audit rows, newest first.
///
/// # Errors
/// The database fails.
pub async fn list_audit(pool: &AnyPool, limit: i64) -> ApiResult<Vec<AuditEntry>> {
    let rows: Vec<(i64, String, String, String)> =
        sqlx::query_as("SELECT at, who, action, detail FROM audit ORDER BY id DESC LIMIT $1")
            .bind(limit)
            .fetch_all(pool)
            .await?;
    Ok(rows
        .into_iter()
        .map(|(at, who, action, detail)| AuditEntry {
            at: rfc3339(at),
            who,
            action,
            detail,
        })
        .collect())
}
