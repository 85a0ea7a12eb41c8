//! One writer at a time for this process's batch writers on SQLite, taking turns without polling.
//!
//! SQLite lets one connection write at a time. A connection that finds the write lock taken
//! retries from its busy handler, which sleeps between tries (1, 2, 5, 10 ms, …), so a writer
//! that arrives just after another began waits a whole sleep step after the lock came free. The
//! API's inserts ([`InsertQueue`](crate::repo::insert_queue::InsertQueue)) and the StatusWriter's
//! batches meet that way all the time. Through a [`WriteGate`] they queue in the process instead,
//! in arrival order, and the next one starts as soon as the previous one committed. Writers of
//! other processes, and this process's occasional writers, still meet at SQLite's lock.
//! PostgreSQL locks rows, not the database, so its gate is open.

use std::sync::Arc;

use tokio::sync::{Mutex, OwnedMutexGuard};

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
            turn: url.starts_with("sqlite:").then(|| Arc::new(Mutex::new(()))),
        }
    }

    /// Waits for this writer's turn (at once if the gate is open).
    pub async fn enter(&self) -> Turn {
        let guard = match &self.turn {
            Some(turn) => Some(turn.clone().lock_owned().await),
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

    #[tokio::test]
    async fn the_postgres_gate_is_open() {
        let gate = WriteGate::for_url("postgres://herald@localhost/herald");
        let _first = gate.enter().await;
        assert!(gate.enter().now_or_never().is_some());
    }
}
