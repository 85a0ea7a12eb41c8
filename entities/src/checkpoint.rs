//! Checkpoints of an SQLite write-ahead log, taken off the commit path.
//!
//! In WAL mode SQLite copies the log back into the database file (a checkpoint) inside whichever
//! commit finds the log over 1,000 pages. That commit then takes several times as long: with the
//! StatusWriter's batches, one commit in ten took 17–35 ms instead of the usual 2 ms, and every
//! delivery acked by that batch waited for it. An engine on SQLite therefore opens its pools with
//! [`Checkpoints::Background`] (automatic checkpoints off) and runs a [`Checkpointer`]: a task on
//! a connection of its own that takes a `PASSIVE` checkpoint every [`CHECKPOINT_INTERVAL`]. A
//! passive checkpoint never waits for readers or writers; what it cannot copy yet is copied by the
//! next one.

use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, Statement};
use tokio::task::JoinHandle;

/// How often the [`Checkpointer`] copies the log into the database file.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(250);

/// Who checkpoints an SQLite write-ahead log. PostgreSQL ignores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Checkpoints {
    /// SQLite, inside the commit that finds the log over 1,000 pages (SQLite's default). For
    /// short-lived pools and processes without a [`Checkpointer`].
    #[default]
    OnCommit,
    /// A [`Checkpointer`] of this process; commits never stop to checkpoint.
    Background,
}

/// A running background checkpoint task; it stops when this is dropped.
#[derive(Debug)]
pub struct Checkpointer {
    task: JoinHandle<()>,
}

impl Checkpointer {
    /// Starts checkpointing the SQLite database at `url`; `None` for other databases, which have
    /// no write-ahead log of this kind.
    pub async fn start(url: &str) -> Result<Option<Self>, DbErr> {
        if !url.starts_with("sqlite:") {
            return Ok(None);
        }
        let db = crate::connect(url, 1).await?;
        let task = tokio::spawn(run(db));
        Ok(Some(Self { task }))
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Takes a passive checkpoint every [`CHECKPOINT_INTERVAL`]; a failure is logged and the next
/// round tries again (until then the log grows, and nothing else is affected).
async fn run(db: DatabaseConnection) {
    let mut ticks = tokio::time::interval(CHECKPOINT_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let started = Instant::now();
        match checkpoint(&db).await {
            Ok(logged) => {
                metrics::histogram!("herald_sqlite_checkpoint_seconds")
                    .record(started.elapsed().as_secs_f64());
                metrics::gauge!("herald_sqlite_wal_pages").set(logged.pages as f64);
            }
            Err(err) => tracing::warn!(error = %err, "SQLite checkpoint failed; retrying"),
        }
    }
}

/// What a checkpoint found in the log (-1 each when the database is not in WAL mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Logged {
    /// Pages in the log.
    pages: i64,
    /// Of those, pages now copied into the database file.
    copied: i64,
}

/// One `PASSIVE` checkpoint.
async fn checkpoint(db: &DatabaseConnection) -> Result<Logged, DbErr> {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "PRAGMA wal_checkpoint(PASSIVE)",
        ))
        .await?
        .ok_or_else(|| DbErr::Custom("wal_checkpoint returned no row".into()))?;
    // The row is (busy, pages in the log, pages checkpointed).
    Ok(Logged {
        pages: row.try_get_by_index(1)?,
        copied: row.try_get_by_index(2)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `transactions` commits of about 250 pages each, then checkpoints by hand.
    async fn pages_logged_after_writes(checkpoints: Checkpoints, transactions: usize) -> Logged {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/c.db", dir.path().display());
        let db = crate::connect_with(&url, 1, checkpoints)
            .await
            .expect("open");
        db.execute_unprepared("CREATE TABLE t (x BLOB)")
            .await
            .expect("create");
        for _ in 0..transactions {
            db.execute_unprepared("INSERT INTO t VALUES (randomblob(1000000))")
                .await
                .expect("write");
        }
        checkpoint(&db).await.expect("checkpoint")
    }

    #[tokio::test]
    async fn commits_of_background_pools_leave_the_log_to_the_checkpointer() {
        // Over 1,000 pages: SQLite's own checkpoint would have copied and restarted the log.
        let background = pages_logged_after_writes(Checkpoints::Background, 6).await;
        assert!(background.pages >= 1_400, "{background:?}");
        assert_eq!(background.copied, background.pages, "{background:?}");

        let on_commit = pages_logged_after_writes(Checkpoints::OnCommit, 6).await;
        assert!(on_commit.pages < 1_000, "{on_commit:?}");
    }

    #[tokio::test]
    async fn there_is_no_checkpointer_for_postgres() {
        let none = Checkpointer::start("postgres://nobody@localhost:1/none")
            .await
            .expect("nothing to open");
        assert!(none.is_none());
    }
}
