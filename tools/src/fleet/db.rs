//! The fleet database: SQLite (a file in the data folder) by default, PostgreSQL by URL, both
//! through sqlx's `Any` driver. Queries use only what both engines share: `$N` placeholders,
//! BIGINT / DOUBLE PRECISION / TEXT columns, `INSERT … RETURNING id`. Each backend has its own
//! migration folder (`tools/migrations/sqlite`, `tools/migrations/postgres`) because id columns
//! are spelled differently.
//!
//! PostgreSQL is tested by `tools/tests/fleet_postgres.rs` (PostgreSQL 15 on loopback, started by
//! `scripts/pg-test-cluster.sh`): two `kiln serve` processes share one database through a full
//! rollout scenario. Several servers may start at once: sqlx serialises the migrations with an
//! advisory lock. Every rollout decision is a conditional `UPDATE … WHERE wave = $n AND state =
//! 'running'` inside a transaction, which is safe under PostgreSQL's default READ COMMITTED: of
//! two servers judging the same gate, the second sees zero rows changed and leaves it.

use sqlx::any::{AnyPoolOptions, AnyQueryResult};
use sqlx::AnyPool;
use std::path::Path;
use std::time::Duration;

/// Which engine a URL names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// `sqlite://…`
    Sqlite,
    /// `postgres://…` or `postgresql://…`
    Postgres,
}

impl Backend {
    /// The engine of a database URL.
    ///
    /// # Errors
    /// Another scheme.
    pub fn of(url: &str) -> anyhow::Result<Self> {
        if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else {
            anyhow::bail!(
                "database URL `{url}` is neither sqlite: nor postgres://; hint: leave --database out for SQLite in the data folder"
            )
        }
    }
}

/// The default database URL: `fleet.db` in the data folder.
pub fn default_url(data_dir: &Path) -> String {
    format!("sqlite://{}?mode=rwc", data_dir.join("fleet.db").display())
}

/// Settings of every SQLite connection. WAL lets readers (another process, a backup) run beside
/// the writer; `synchronous = NORMAL` is WAL's usual pairing: a commit is one write to the WAL
/// without an fsync, durable when the process dies (`kill -9`: the WAL is in the OS's page
/// cache) and at worst losing the last commits, never corrupting the file, on a power cut (the
/// WAL is synced at each checkpoint). With the default FULL every check-in waited for an fsync.
/// The busy timeout covers another process holding the write lock; the cache (32 MiB) holds the
/// devices, tokens and per-wave aggregates of a 10,000-device fleet.
const SQLITE_PRAGMAS: [&str; 5] = [
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = NORMAL",
    "PRAGMA busy_timeout = 10000",
    "PRAGMA cache_size = -32768",
    "PRAGMA temp_store = MEMORY",
];

/// Opens the database, applies the migrations and (SQLite) sets [`SQLITE_PRAGMAS`] on every
/// connection.
///
/// # Errors
/// The database cannot be opened or migrated.
pub async fn connect(url: &str) -> anyhow::Result<(AnyPool, Backend)> {
    use anyhow::Context as _;
    sqlx::any::install_default_drivers();
    let backend = Backend::of(url)?;
    // SQLite takes one writer at a time; a single connection keeps transactions from tripping
    // over each other (SQLITE_BUSY on lock upgrade), and a check-in is a write transaction
    // anyway. PostgreSQL gets a real pool.
    let max = match backend {
        Backend::Sqlite => 1,
        Backend::Postgres => 16,
    };
    let pool = AnyPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(30))
        .after_connect(move |conn, _meta| {
            Box::pin(async move {
                if backend == Backend::Sqlite {
                    for pragma in SQLITE_PRAGMAS {
                        sqlx::query(pragma).execute(&mut *conn).await?;
                    }
                }
                Ok(())
            })
        })
        .connect(url)
        .await
        .with_context(|| format!("cannot open the database {}", redact(url)))?;
    let migrated = match backend {
        Backend::Sqlite => sqlx::migrate!("./migrations/sqlite").run(&pool).await,
        Backend::Postgres => sqlx::migrate!("./migrations/postgres").run(&pool).await,
    };
    migrated.with_context(|| format!("cannot migrate the database {}", redact(url)))?;
    Ok((pool, backend))
}

/// The URL with any password replaced by `***`, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Rows an UPDATE touched.
pub fn affected(r: &AnyQueryResult) -> u64 {
    r.rows_affected()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("postgres://kiln:secret@db:5432/fleet"),
            "postgres://kiln:***@db:5432/fleet"
        );
        assert_eq!(redact("sqlite://x.db"), "sqlite://x.db");
    }
}
