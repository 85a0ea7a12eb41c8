//! One migrator at a time per database. Instances of a cluster started together each apply
//! pending migrations (`database.migrate_on_start`); without a lock they raced, and every one but
//! the first failed to start on a duplicate migration record or table. The lock is held while
//! migrating and released afterwards; an instance that finds it taken waits, then finds nothing
//! left to apply.
//!
//! PostgreSQL: a session advisory lock, tried until it is free, on a session that the pool never
//! closes for idleness or age nor quietly replaces ([`herald_entities::connect_session`]); the
//! migrations run on that same session, so if it is lost (the server or the network closed it),
//! the migration's next statement fails instead of going on without the lock (the next run
//! finishes the job). SQLite: an exclusive lock on the file
//! `<database>-migrations.lock` beside the database. An in-memory SQLite database has one user.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use herald_migration::{Migrator, MigratorTrait};
use sea_orm::{ConnectionTrait, DatabaseConnection};

/// The advisory lock key ("heraldmg" in ASCII).
const ADVISORY_KEY: i64 = 0x6865_7261_6c64_6d67;

/// How often a waiting instance tries the PostgreSQL lock again. It polls rather than blocks in
/// `pg_advisory_lock`: a blocked call is a statement in progress, and the holder's
/// `CREATE INDEX CONCURRENTLY` waits for every statement in progress to end, so the two waited for
/// each other through the client, where no deadlock detector sees them (found by the test).
const RETRY_EVERY: Duration = Duration::from_millis(250);

/// How long, in all, [`apply_giving_way`] keeps trying migrations that gave up waiting for a
/// table lock before start-up fails.
const GIVE_WAY_FOR: Duration = Duration::from_secs(600);

/// The longest pause between two such tries.
const LONGEST_PAUSE: Duration = Duration::from_secs(30);

/// Applies pending migrations on `db`. A migration that gave up waiting for a table lock on
/// PostgreSQL (another transaction held the table; see `herald_migration`'s `lock_wait`: it waits
/// 3 s at most, so that the queries queued behind it are not held up longer) rolled back whole;
/// it is tried again after a pause, 1 s doubling to 30 s, for up to 10 minutes.
pub async fn apply_giving_way(db: &DatabaseConnection) -> Result<(), sea_orm::DbErr> {
    let started = std::time::Instant::now();
    let mut pause = Duration::from_secs(1);
    loop {
        match Migrator::up(db, None).await {
            Err(err)
                if herald_entities::outage::is_lock_timeout(&err)
                    && started.elapsed() + pause < GIVE_WAY_FOR =>
            {
                tracing::warn!(
                    error = %err,
                    retry_in_ms = pause.as_millis() as u64,
                    "a migration gave up waiting for a table lock another transaction holds, so as \
                     not to hold up the queries queued behind it; trying again"
                );
                metrics::counter!("herald_migration_lock_waits_total").increment(1);
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(LONGEST_PAUSE);
            }
            applied => return applied,
        }
    }
}

/// A held migration lock; [`MigrationLock::release`] gives it back (dropping it does too, when
/// the connection or file closes).
pub enum MigrationLock {
    /// A PostgreSQL session holding the advisory lock.
    Postgres(DatabaseConnection),
    /// The locked lock file.
    Sqlite(File),
    /// Nothing to lock (an in-memory database has one user).
    NotNeeded,
}

impl MigrationLock {
    /// Takes the lock of the database at `url`, waiting while another migrator holds it.
    pub async fn acquire(url: &str) -> anyhow::Result<Self> {
        if let Some(path) = herald_entities::sqlite_file(url) {
            crate::app::ensure_sqlite_dir(url)?;
            return lock_file(lock_file_path(&path)).await;
        }
        if herald_entities::is_sqlite(url) {
            return Ok(Self::NotNeeded);
        }
        let session = herald_entities::connect_session(url)
            .await
            .with_context(|| {
                format!(
                    "cannot open a session on {} for the migration lock",
                    crate::app::redact(url)
                )
            })?;
        let mut waited = false;
        while !advisory(&session, "pg_try_advisory_lock").await? {
            if !waited {
                tracing::info!("another instance is migrating the database; waiting for it");
                waited = true;
            }
            tokio::time::sleep(RETRY_EVERY).await;
        }
        Ok(Self::Postgres(session))
    }

    /// The session to migrate on, when the lock belongs to one (PostgreSQL).
    pub fn session(&self) -> Option<&DatabaseConnection> {
        match self {
            Self::Postgres(session) => Some(session),
            Self::Sqlite(_) | Self::NotNeeded => None,
        }
    }

    /// Gives the lock back.
    pub async fn release(self) {
        match self {
            Self::Postgres(session) => {
                // Closing the session releases the lock in any case.
                match advisory(&session, "pg_advisory_unlock").await {
                    Ok(true) => {}
                    Ok(false) => tracing::error!(
                        "the migration lock was no longer held when migrating ended: the session \
                         holding it was lost"
                    ),
                    Err(err) => tracing::warn!(error = %err, "cannot release the migration lock"),
                }
                let _ = session.close().await;
            }
            Self::Sqlite(file) => {
                let _ = file.unlock();
            }
            Self::NotNeeded => {}
        }
    }
}

/// Calls `function(ADVISORY_KEY)`, which answers a boolean.
async fn advisory(session: &DatabaseConnection, function: &str) -> anyhow::Result<bool> {
    let row = session
        .query_one_raw(sea_orm::Statement::from_string(
            session.get_database_backend(),
            format!("SELECT {function}({ADVISORY_KEY}) AS held"),
        ))
        .await
        .with_context(|| format!("{function} failed"))?;
    let held: Option<bool> = row.map(|r| r.try_get("", "held")).transpose()?;
    Ok(held == Some(true))
}

/// Locks `path` exclusively, creating it if missing; waits (off the runtime's threads) while
/// another migrator holds it.
async fn lock_file(path: PathBuf) -> anyhow::Result<MigrationLock> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open the migration lock {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => return Ok(MigrationLock::Sqlite(file)),
        Err(TryLockError::WouldBlock) => {
            tracing::info!(lock = %path.display(), "another process is migrating the database; waiting for it");
        }
        Err(TryLockError::Error(err)) => {
            return Err(err).with_context(|| format!("cannot lock {}", path.display()));
        }
    }
    tokio::task::spawn_blocking(move || {
        file.lock()
            .with_context(|| format!("cannot lock {}", path.display()))
            .map(|()| MigrationLock::Sqlite(file))
    })
    .await?
}

fn lock_file_path(database: &Path) -> PathBuf {
    let mut name = database.as_os_str().to_owned();
    name.push("-migrations.lock");
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_file_sits_beside_the_database_file() {
        assert_eq!(
            lock_file_path(Path::new("data/herald.db")),
            PathBuf::from("data/herald.db-migrations.lock")
        );
    }
}
