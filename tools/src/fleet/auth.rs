//! Bearer tokens. Three kinds: the admin token and the enroll token (given to `kiln serve`), and
//! one token per device, issued at enrollment and stored only as its SHA-256.

use super::{sha256_hex, ApiErr, ApiResult};
use axum::http::{HeaderMap, StatusCode};
use sqlx::AnyPool;

/// Who is calling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// The admin token.
    Admin,
    /// A device, by id.
    Device(DeviceRow),
}

/// The device fields the handlers need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceRow {
    /// Id.
    pub id: String,
    /// Board.
    pub board: String,
    /// Cohort.
    pub cohort: String,
    /// Running model name.
    pub running_model: Option<String>,
    /// Running version.
    pub running_version: Option<i64>,
}

/// The bearer token of a request.
///
/// # Errors
/// 401 when there is none.
pub fn bearer(headers: &HeaderMap) -> ApiResult<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            ApiErr::new(
                StatusCode::UNAUTHORIZED,
                "missing credential: send `Authorization: Bearer TOKEN`",
            )
        })
}

/// Equal in time independent of where the strings differ.
pub fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn wrong() -> ApiErr {
    ApiErr::new(
        StatusCode::UNAUTHORIZED,
        "wrong credential: the token is not known to this server",
    )
}

/// Requires the admin token.
///
/// # Errors
/// 401 (missing or wrong), 403 (the enroll token or a device's token).
pub async fn admin(
    headers: &HeaderMap,
    admin_token: &str,
    enroll_token: &str,
    pool: &AnyPool,
) -> ApiResult<()> {
    let t = bearer(headers)?;
    if same(t, admin_token) {
        return Ok(());
    }
    if same(t, enroll_token) {
        return Err(ApiErr::new(
            StatusCode::FORBIDDEN,
            "forbidden: this call needs the admin token, not the enroll token",
        ));
    }
    if find_device(pool, t).await?.is_some() {
        return Err(ApiErr::new(
            StatusCode::FORBIDDEN,
            "forbidden: this call needs the admin token, not a device's",
        ));
    }
    Err(wrong())
}

/// Requires the enroll token.
///
/// # Errors
/// 401 (missing or wrong), 403 (admin or device token).
pub fn enroll(headers: &HeaderMap, enroll_token: &str, admin_token: &str) -> ApiResult<()> {
    let t = bearer(headers)?;
    if same(t, enroll_token) {
        return Ok(());
    }
    if same(t, admin_token) {
        return Err(ApiErr::new(
            StatusCode::FORBIDDEN,
            "forbidden: enrollment needs the enroll token",
        ));
    }
    Err(wrong())
}

/// Requires a device token, looked up on `db` (the pool, or a connection the caller holds).
///
/// # Errors
/// 401 (missing or wrong), 403 (the admin or enroll token).
pub async fn device<'e, E>(
    headers: &HeaderMap,
    db: E,
    admin_token: &str,
    enroll_token: &str,
) -> ApiResult<DeviceRow>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    let t = bearer(headers)?;
    if same(t, admin_token) || same(t, enroll_token) {
        return Err(ApiErr::new(
            StatusCode::FORBIDDEN,
            "forbidden: this call needs a device token (from POST /api/v1/enroll)",
        ));
    }
    find_device(db, t).await?.ok_or_else(wrong)
}

/// Admin or device.
///
/// # Errors
/// 401 (missing or wrong), 403 (the enroll token).
pub async fn admin_or_device(
    headers: &HeaderMap,
    pool: &AnyPool,
    admin_token: &str,
    enroll_token: &str,
) -> ApiResult<Caller> {
    let t = bearer(headers)?;
    if same(t, admin_token) {
        return Ok(Caller::Admin);
    }
    device(headers, pool, admin_token, enroll_token)
        .await
        .map(Caller::Device)
}

/// The device whose token this is.
///
/// # Errors
/// The database fails.
pub async fn find_device<'e, E>(db: E, token: &str) -> ApiResult<Option<DeviceRow>>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    type Row = (String, String, String, Option<String>, Option<i64>);
    let row: Option<Row> = sqlx::query_as(
        "SELECT id, board, cohort, running_model, running_version FROM devices WHERE token_sha256 = $1",
    )
    .bind(sha256_hex(token.as_bytes()))
    .fetch_optional(db)
    .await?;
    Ok(row.map(
        |(id, board, cohort, running_model, running_version)| DeviceRow {
            id,
            board,
            cohort,
            running_model,
            running_version,
        },
    ))
}
