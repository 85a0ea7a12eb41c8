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
pub mod template;

pub use repo::RepoError;
pub use status::NotificationStatus;

use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbErr};

/// Opens a connection pool. SQLite files are created if missing and run in WAL mode with
/// `synchronous=NORMAL` (durable across process crashes, fast batched writes) and a busy timeout,
/// so readers never block the writer.
pub async fn connect(url: &str, max_connections: u32) -> Result<DatabaseConnection, DbErr> {
    let url = if url.starts_with("sqlite:") && !url.contains("mode=") {
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}mode=rwc")
    } else {
        url.to_string()
    };
    let mut options = ConnectOptions::new(url.clone());
    options.max_connections(max_connections).sqlx_logging(false);
    let db = Database::connect(options).await?;
    if url.starts_with("sqlite:") {
        for pragma in [
            "PRAGMA journal_mode=WAL",
            "PRAGMA synchronous=NORMAL",
            "PRAGMA busy_timeout=5000",
            "PRAGMA foreign_keys=ON",
        ] {
            db.execute_unprepared(pragma).await?;
        }
    }
    Ok(db)
}
