//! One writer at a time for an engine's batch writers on SQLite, taking turns without polling.
//!
//! SQLite lets one connection write at a time. A connection that finds the write lock taken
//! retries from its busy handler, which sleeps between tries (1, 2, 5, 10 ms, …), so a writer
//! that arrives just after another began waits a whole sleep step after the lock came free. The
//! API's inserts ([`InsertQueue`](crate::repo::insert_queue::InsertQueue)) and the StatusWriter's
//! batches meet that way all the time. Through a [`WriteGate`] they queue in the process instead,
//! in arrival order, and the next one starts as soon as the previous one committed. Every other
//! writer (the scheduler, the outbox relay, cancels, other processes and other engines on the same
//! file) still meets them at SQLite's lock. A writer that waited [`LONGEST_WAIT`] for its turn
//! (the one before it stuck behind such a writer's lock) goes ahead without it, so the gate never
//! adds to SQLite's own busy timeout more than that. PostgreSQL locks rows, not the database, so
//! its gate is open.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, OwnedMutexGuard};

/// Longest a writer waits for its turn before it goes ahead and meets SQLite's lock instead.
pub const LONGEST_WAIT: Duration = Duration::from_secs(1);

/// A shared turn for batch write transactions; cloning shares it.
#[derive(Debug, Clone, Default)]
pub struct WriteGate {
    turn: Option<Arc<Mutex<()>>>,
}

/// Held while a write transaction runs; the next writer's turn comes when it is dropped.
#[derive(Debug)]
pub struct Turn {
    _guard: Option<OwnedMutexGuard<()>>,
}

impl WriteGate {
    /// A gate for the database at `url`: one turn at a time on SQLite, open on anything else.
    pub fn for_url(url: &str) -> Self {
        Self {
            turn: crate::is_sqlite(url).then(|| Arc::new(Mutex::new(()))),
        }
    }

    /// Waits for this writer's turn: at once if the gate is open, at most [`LONGEST_WAIT`].
    pub async fn enter(&self) -> Turn {
        let guard = match &self.turn {
            Some(turn) => tokio::time::timeout(LONGEST_WAIT, turn.clone().lock_owned())
                .await
                .ok(),
            None => None,
        };
        Turn { _guard: guard }
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;

    #[tokio::test]
    async fn sqlite_writers_take_turns_and_the_next_enters_when_the_first_is_done() {
        let gate = WriteGate::for_url("sqlite://herald.db");
        let first = gate.enter().await;
        let mut second = Box::pin(gate.enter());
        assert!(
            (&mut second).now_or_never().is_none(),
            "entered during another's turn"
        );
        drop(first);
        assert!(
            second.now_or_never().is_some(),
            "not let in after the turn ended"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_writer_kept_waiting_too_long_goes_ahead_without_its_turn() {
        let gate = WriteGate::for_url("sqlite://herald.db");
        let _stuck = gate.enter().await;
        let late = gate.enter().await;
        assert!(
            late._guard.is_none(),
            "should have gone ahead without a turn"
        );
    }

    #[tokio::test]
    async fn the_postgres_gate_is_open() {
        let gate = WriteGate::for_url("postgres://herald@localhost/herald");
        let _first = gate.enter().await;
        assert!(gate.enter().now_or_never().is_some());
    }
}
