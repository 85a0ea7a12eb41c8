//! Herald's SeaORM entities and the queries on them.
//!
//! Entities are the database's shape; wire types (NATS envelopes, API bodies) live elsewhere and are
//! converted at the edges. Queries are grouped per table in [`repo`].

pub mod api_key;
pub mod batch;
pub mod customer;
pub mod delivery_attempt;
pub mod notification;
pub mod order;
pub mod outbox_event;
pub mod preference;
pub mod quiet_hours;
pub mod repo;
pub mod status;

pub use repo::RepoError;
pub use status::NotificationStatus;

use std::time::Duration;

use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{ConnectOptions, Database, DatabaseConnection, DbErr};

/// How long an SQLite statement waits for a competing writer before failing with "locked".
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens a connection pool. SQLite files are created if missing and run in WAL mode with
/// `synchronous=NORMAL` (durable across process crashes, fast batched writes), foreign keys on and
/// a busy timeout, so readers never block the writer.
///
/// These are per-connection settings, so they go into the connect options that every pooled
/// connection is opened with: a `PRAGMA` run on the pool reaches one connection only, and the
/// others would commit with `synchronous=FULL` (an fsync per transaction).
pub async fn connect(url: &str, max_connections: u32) -> Result<DatabaseConnection, DbErr> {
    let url = if url.starts_with("sqlite:") && !url.contains("mode=") {
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}mode=rwc")
    } else {
        url.to_string()
    };
    let mut options = ConnectOptions::new(url);
    options
        .max_connections(max_connections)
        .sqlx_logging(false)
        .map_sqlx_sqlite_opts(|sqlite| {
            sqlite
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(SQLITE_BUSY_TIMEOUT)
                .foreign_keys(true)
        });
    Database::connect(options).await
}
