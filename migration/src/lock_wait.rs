//! Table changes that give way to the queries of a live PostgreSQL database.
//!
//! `ALTER TABLE` needs the table to itself (`ACCESS EXCLUSIVE`), and while it waits for that lock
//! every query on the table that comes after it queues behind it: one long transaction (a report,
//! a stuck session) holding the table would stop every API request and delivery for as long as it
//! lasts. A migration's statements therefore wait at most [`LOCK_WAIT`] for a lock; one that gives
//! up fails its migration (its transaction rolls back, nothing half done) with SQLSTATE `55P03`,
//! and the engine tries again a moment later (`herald_engine::app::migrate`), letting the queued
//! queries through in between. SQLite has one writer and takes no such table locks.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

/// How long a migration's statement waits for a lock on PostgreSQL (a `lock_timeout` value).
pub(crate) const LOCK_WAIT: &str = "3s";

/// Limits how long the statements of the migration's transaction wait for a lock (see the
/// module's documentation). Call it first in `up` and `down` of a migration that changes a table
/// in place and runs in a transaction (`SET LOCAL` ends with it).
pub(crate) async fn wait_briefly_for_locks(manager: &SchemaManager<'_>) -> Result<(), DbErr> {
    let db = manager.get_connection();
    if db.get_database_backend() == DbBackend::Postgres {
        db.execute_unprepared(&format!("SET LOCAL lock_timeout = '{LOCK_WAIT}'"))
            .await?;
    }
    Ok(())
}
