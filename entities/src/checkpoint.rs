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
//!
//! SQLite starts writing the log from its beginning again only when a writer finds every page of
//! it copied and no reader in it. Under steady load that moment rarely comes: a commit lands while
//! a checkpoint runs, or a read is under way, and the log grows on (to 465 MB over 200,000
//! notifications in 16 s, where SQLite's own checkpoints let it grow to 34 MB). So once the log
//! holds more than [`LARGE_LOG_PAGES`], a passive checkpoint is followed by a second one in a turn
//! of the batch writers' [`WriteGate`]: it copies the little committed during the first, no batch
//! commit lands meanwhile, and the next batch writer starts the log from its beginning again. (A
//! `TRUNCATE` checkpoint in that turn held the writers for 20–60 ms each time, and the API's p95
//! at 2,000 requests/s went from 4 to 40 ms.) [`JOURNAL_SIZE_LIMIT`] then shrinks the file.
//!
//! A checkpoint copies every page changed since the one before, once however often it changed,
//! so under heavy writes frequent checkpoints copy the same pages again and again. Each round is
//! therefore followed by a rest [`REST_PER_ROUND`] times as long as the round took: light loads
//! keep their small checkpoints every [`CHECKPOINT_INTERVAL`], heavy ones get fewer, larger ones
//! (at most [`LONGEST_INTERVAL`] apart).

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, Statement};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::WriteGate;

/// How often the [`Checkpointer`] copies the log into the database file while its rounds are
/// short. Often and little at a time: a checkpoint's writes and `fsync` slow the commits that meet
/// them, and smaller ones slow fewer (at 2,000 API sends a second, 50 ms instead of 250 ms took
/// about 0.5 ms off the p99, throughput unchanged; 1 s added 1–2 ms).
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(50);

/// How many times as long as a round took the [`Checkpointer`] waits before the next one (when
/// that is longer than [`CHECKPOINT_INTERVAL`]). At 2,000 API sends a second a round takes about 3
/// ms, so nothing changes there. Via NATS as fast as the engine goes, 100,000 notifications for
/// 10,000 recipients ran at 13,563–16,144 /s instead of 12,547–14,466 /s (six interleaved rounds
/// on 2 cores, means +5%; the bench process's CPU 91 instead of 97 µs per notification, with
/// rounds up to 1 s apart); 9 measured the same.
pub const REST_PER_ROUND: u32 = 4;

/// Longest wait from one checkpoint round's start to the next, however long rounds take; it bounds
/// how long the log grows between them. 300,000 notifications for 30,000 as fast as the engine
/// goes, four interleaved pairs: 1 s 10,412–12,559 /s with the log file peaking at 129–156 MB,
/// 500 ms 11,237–13,101 /s (means +7%) at 74–91 MB (rounds of 60 ms on average, 230 ms apart),
/// 250 ms within the noise of 500 ms at 41–65 MB; every 50 ms, 42 MB.
pub const LONGEST_INTERVAL: Duration = Duration::from_millis(500);

/// A log larger than this (16 MiB of 4 KiB pages) is checkpointed again in a writers' turn.
pub const LARGE_LOG_PAGES: i64 = 4_000;

/// Bytes SQLite leaves of the log file when it starts the log again (`journal_size_limit`).
pub const JOURNAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

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
    /// Starts checkpointing the SQLite database at `url`, whose batch writers take turns at
    /// `gate`; `None` for other databases, which have no write-ahead log of this kind.
    pub async fn start(url: &str, gate: WriteGate) -> Result<Option<Self>, DbErr> {
        if !crate::is_sqlite(url) {
            return Ok(None);
        }
        let db = crate::connect(url, 1).await?;
        let task = tokio::spawn(run(move || checkpoint(db.clone()), gate));
        Ok(Some(Self { task }))
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Takes a passive checkpoint every [`CHECKPOINT_INTERVAL`] or, once rounds take longer, after
/// a rest in proportion ([`interval_after`]), and a second one in a writers' turn when the log
/// is large. A failure is counted and logged (once until a checkpoint succeeds again), and the
/// next round tries again; until then the log grows, and nothing else is affected. A round that
/// panics is counted as a restart (`herald_actor_restarts_total{actor="checkpointer"}`) and the
/// next round runs as usual: without checkpoints the log would grow without bound.
async fn run<C, F>(checkpoint: C, gate: WriteGate)
where
    C: Fn() -> F,
    F: Future<Output = Result<Logged, DbErr>>,
{
    let mut state = RoundState::default();
    let mut next = Instant::now();
    loop {
        tokio::time::sleep_until(next).await;
        let started = Instant::now();
        let round = AssertUnwindSafe(round(&checkpoint, &gate, &mut state))
            .catch_unwind()
            .await;
        next = started + interval_after(started.elapsed());
        if round.is_err() {
            metrics::counter!("herald_actor_restarts_total", "actor" => "checkpointer")
                .increment(1);
            tracing::error!("an SQLite checkpoint round panicked; checkpointing goes on");
            state = RoundState::default();
        }
    }
}

/// From the start of a round that took `took` to the start of the next: the round and its rest
/// ([`REST_PER_ROUND`]), within [`CHECKPOINT_INTERVAL`] and [`LONGEST_INTERVAL`].
fn interval_after(took: Duration) -> Duration {
    (took * (REST_PER_ROUND + 1)).clamp(CHECKPOINT_INTERVAL, LONGEST_INTERVAL)
}

/// What one checkpoint round leaves for the next.
#[derive(Debug, Default)]
struct RoundState {
    /// The log was over [`LARGE_LOG_PAGES`] at the last checkpoint.
    large: bool,
    /// The last checkpoint failed (its failure is logged once).
    failing: bool,
}

async fn round<C, F>(checkpoint: &C, gate: &WriteGate, state: &mut RoundState)
where
    C: Fn() -> F,
    F: Future<Output = Result<Logged, DbErr>>,
{
    let started = Instant::now();
    let mut result = checkpoint().await;
    if state.large && result.is_ok() {
        // What was committed during that one, copied while no batch commit lands: the log is
        // then all copied, and the next batch writer starts it from its beginning again.
        let _turn = gate.enter().await;
        result = checkpoint().await;
    }
    match result {
        // Another connection is checkpointing (another engine on the same file): its turn.
        Ok(Logged { busy: true, .. }) => {}
        Ok(logged) => {
            state.failing = false;
            state.large = logged.pages > LARGE_LOG_PAGES;
            metrics::histogram!("herald_sqlite_checkpoint_seconds")
                .record(started.elapsed().as_secs_f64());
            metrics::gauge!("herald_sqlite_wal_pages").set(logged.pages.max(0) as f64);
        }
        Err(err) => {
            metrics::counter!("herald_sqlite_checkpoint_failures_total").increment(1);
            if !state.failing {
                tracing::warn!(error = %err, "SQLite checkpoint failed; retrying");
            }
            state.failing = true;
        }
    }
}

/// What a checkpoint found in the log (-1 each when the database is not in WAL mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Logged {
    /// Another connection's checkpoint was running: nothing was done.
    busy: bool,
    /// Pages in the log.
    pages: i64,
    /// Of those, pages now copied into the database file.
    copied: i64,
}

/// One `PASSIVE` checkpoint: it copies what it can without waiting for anyone.
async fn checkpoint(db: DatabaseConnection) -> Result<Logged, DbErr> {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "PRAGMA wal_checkpoint(PASSIVE)",
        ))
        .await?
        .ok_or_else(|| DbErr::Custom("wal_checkpoint returned no row".into()))?;
    // The row is (busy, pages in the log, pages checkpointed).
    Ok(Logged {
        busy: row.try_get_by_index::<i64>(0)? != 0,
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
        checkpoint(db).await.expect("checkpoint")
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

    #[tokio::test(start_paused = true)]
    async fn a_round_that_panics_does_not_stop_the_checkpoints() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let checkpoint = move || {
            let call = counted.fetch_add(1, Ordering::SeqCst);
            async move {
                assert!(call != 0, "the first checkpoint panics");
                Ok(Logged {
                    busy: false,
                    pages: 10,
                    copied: 10,
                })
            }
        };
        let task = tokio::spawn(run(checkpoint, WriteGate::default()));
        tokio::time::sleep(CHECKPOINT_INTERVAL * 4).await;
        assert!(!task.is_finished(), "the checkpointer ended");
        assert!(
            calls.load(Ordering::SeqCst) >= 4,
            "rounds after the panic: {}",
            calls.load(Ordering::SeqCst)
        );
        task.abort();
    }

    #[test]
    fn a_long_round_is_followed_by_a_rest_in_proportion_within_bounds() {
        let ms = Duration::from_millis;
        assert_eq!(interval_after(ms(3)), CHECKPOINT_INTERVAL, "short rounds");
        assert_eq!(
            interval_after(ms(30)),
            ms(150),
            "the round and four times its time"
        );
        assert_eq!(
            interval_after(ms(400)),
            LONGEST_INTERVAL,
            "however long rounds take"
        );
    }

    /// Checkpoint rounds started within `span` when each checkpoint takes `took`.
    async fn rounds_in(span: Duration, took: Duration) -> usize {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let checkpoint = move || {
            counted.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(took).await;
                Ok(Logged {
                    busy: false,
                    pages: 10,
                    copied: 10,
                })
            }
        };
        let task = tokio::spawn(run(checkpoint, WriteGate::default()));
        tokio::time::sleep(span).await;
        task.abort();
        calls.load(Ordering::SeqCst)
    }

    #[tokio::test(start_paused = true)]
    async fn longer_checkpoints_come_less_often() {
        let span = Duration::from_millis(1_025);
        let quick = rounds_in(span, Duration::from_millis(1)).await;
        let slow = rounds_in(span, Duration::from_millis(40)).await;
        // One at once, then one per interval.
        assert_eq!(
            quick,
            1 + 20,
            "rounds of 1 ms: every {CHECKPOINT_INTERVAL:?}"
        );
        assert_eq!(slow, 1 + 5, "rounds of 40 ms: every 200 ms");
    }

    #[tokio::test]
    async fn there_is_no_checkpointer_for_postgres() {
        let none = Checkpointer::start("postgres://nobody@localhost:1/none", WriteGate::default())
            .await
            .expect("nothing to open");
        assert!(none.is_none());
    }
}
