//! The fleet server (`kiln serve`) and its admin client (`kiln push`, `kiln rollout`, …).
//!
//! Layout:
//! - [`db`]: the database (SQLite by default, PostgreSQL by URL) through sqlx's `Any` driver, with
//!   per-backend migrations and portable queries (`$N` placeholders, BIGINT/DOUBLE/TEXT only).
//! - [`store`]: artifact bytes by SHA-256 in an object store (a local folder by default).
//! - [`auth`]: bearer tokens: admin, enroll, and per-device (stored as SHA-256).
//! - [`registry`]: verifying and registering pushed artifacts; devices and their check-ins.
//! - [`rollout`]: waves, gates (failures, errors, latency, PSI) and assignments. Every decision is
//!   read from and written to the database inside a transaction, so several server instances can
//!   share one database.
//! - [`server`]: the axum routes, metrics and graceful shutdown.
//! - [`web`]: the fleet page at `/` (HTML and a script built in, reading the admin API).
//! - [`client`]: the admin HTTP client behind the CLI verbs; [`cli`]: the verbs themselves.
//!
//! The wire types are [`kiln_agent::api`]; the HTTP API is described in `docs/FLEET_API.md`.

pub mod auth;
pub mod cli;
pub mod client;
pub mod db;
pub mod registry;
pub mod rollout;
pub mod server;
pub mod store;
pub mod web;

pub use kiln_agent::api;
pub use server::{RunningServer, ServerConfig};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use std::fmt::Write as _;

/// An HTTP error: a status and one line, sent as `{"error": "…"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiErr {
    /// The status.
    pub status: StatusCode,
    /// One line: what, why, what to do.
    pub message: String,
}

impl ApiErr {
    /// An error with a status.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        let message: String = message.into();
        ApiErr {
            status,
            message: message.replace('\n', " "),
        }
    }
    /// 400.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
    /// 409.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }
    /// 500, for database and store failures.
    pub fn internal(what: &str, e: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{what}: {e}; try again, and see the server's log if it persists"),
        )
    }
}

impl std::fmt::Display for ApiErr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

impl std::error::Error for ApiErr {}

impl From<sqlx::Error> for ApiErr {
    fn from(e: sqlx::Error) -> Self {
        ApiErr::internal("database error", e)
    }
}

impl IntoResponse for ApiErr {
    fn into_response(self) -> Response {
        let body = api::ApiError {
            error: self.message,
        };
        (self.status, axum::Json(body)).into_response()
    }
}

/// Result of a handler step.
pub type ApiResult<T> = Result<T, ApiErr>;

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// SHA-256 as lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(bytes))
}

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Unix seconds as RFC 3339 (UTC), e.g. `2025-01-31T12:00:00Z`.
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// 32 random bytes from the operating system, as hex.
///
/// # Errors
/// The generator fails.
pub fn random_hex(len: usize) -> Result<String, ApiErr> {
    let mut b = vec![0u8; len];
    getrandom::fill(&mut b).map_err(|e| ApiErr::internal("cannot get random bytes", e))?;
    Ok(hex(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_735_689_599), "2024-12-31T23:59:59Z");
    }
}
