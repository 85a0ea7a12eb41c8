//! One migrator at a time per database. Instances of a cluster started together each apply
//! pending migrations (`database.migrate_on_start`); without a lock they raced, and every one but
//! the first failed to start on a duplicate migration record or table. The lock is held while
//! migrating and released afterwards; an instance that finds it taken waits, then finds nothing
//! left to apply.
//!
//! PostgreSQL: a session advisory lock, tried until it is free, on a session that the pool never
//! closes for idleness or age; the migrations run on that same session, so if it is lost (the
//! server or the network closed it), so is the migration in progress, and no other instance
//! migrates beside it (the next run finishes the job). SQLite: an exclusive lock on the file
//! `<database>-migrations.lock` beside the database. An in-memory SQLite database has one user.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use sea_orm::{ConnectionTrait, DatabaseConnection};

/// The advisory lock key ("heraldmg" in ASCII).
const ADVISORY_KEY: i64 = 0x6865_7261_6c64_6d67;

/// How often a waiting instance tries the PostgreSQL lock again. It polls rather than blocks in
/// `pg_advisory_lock`: a blocked call is a statement in progress, and the holder's
/// `CREATE INDEX CONCURRENTLY` waits for every statement in progress to end, so the two waited for
/// each other through the client, where no deadlock detector sees them (found by the test).
const RETRY_EVERY: Duration = Duration::from_millis(250);

/// A held migration lock; [`MigrationLock::release`] gives it back (dropping it does too, when
/// the connection or file closes).
pub enum MigrationLock {
    /// A PostgreSQL session holding the advisory lock.
    Postgres(DatabaseConnection),
    /// The locked lock file.
    Sqlite(File),
    /// Nothing to lock.
    None,
}

impl MigrationLock {
    /// Takes the lock of the database at `url`, waiting while another migrator holds it.
    pub async fn acquire(url: &str) -> anyhow::Result<Self> {
        if let Some(path) = sqlite_path(url) {
            crate::app::ensure_sqlite_dir(url)?;
            return lock_file(lock_file_path(path)).await;
        }
        if herald_entities::is_sqlite(url) {
            return Ok(Self::None);
        }
        let session = herald_entities::connect_session(url)
            .await
            .context("cannot open a session for the migration lock")?;
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
            Self::Sqlite(_) | Self::None => None,
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
            Self::None => {}
        }
    }
}

/// Calls `function(ADVISORY_KEY)`, which answers a boolean.
async fn advisory(session: &DatabaseConnection, function: &str) -> anyhow::Result<bool> {
    let row = session
        .query_one_raw(sea_orm::Statement::from_string(
            session.get_database_backend(),
            format!("SELECT {function}({ADVISORY_KEY})::text AS held"),
        ))
        .await
        .with_context(|| format!("{function} failed"))?;
    let held: Option<String> = row.map(|r| r.try_get("", "held")).transpose()?;
    Ok(held.as_deref() == Some("true"))
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

/// The file of an `sqlite://PATH[?options]` or `sqlite:PATH[?options]` URL, read as sqlx reads
/// it; `None` for an in-memory database and for other databases.
pub(crate) fn sqlite_path(url: &str) -> Option<&Path> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let (path, options) = rest.split_once('?').unwrap_or((rest, ""));
    let in_memory = path == ":memory:" || options.split('&').any(|o| o == "mode=memory");
    (!path.is_empty() && !in_memory).then(|| Path::new(path))
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
    fn the_lock_file_sits_beside_the_database() {
        let path = sqlite_path("sqlite://data/herald.db?mode=rwc").expect("a file");
        assert_eq!(path, Path::new("data/herald.db"));
        assert_eq!(
            lock_file_path(path),
            PathBuf::from("data/herald.db-migrations.lock")
        );
        assert_eq!(
            sqlite_path("sqlite:data/herald.db"),
            Some(Path::new("data/herald.db"))
        );
        assert_eq!(
            sqlite_path("sqlite:///var/lib/herald/herald.db"),
            Some(Path::new("/var/lib/herald/herald.db"))
        );
        assert_eq!(sqlite_path("sqlite::memory:"), None);
        assert_eq!(sqlite_path("sqlite://:memory:"), None);
        assert_eq!(
            sqlite_path("sqlite://shared?mode=memory&cache=shared"),
            None
        );
        assert_eq!(sqlite_path("postgres://db/herald"), None);
    }
}
