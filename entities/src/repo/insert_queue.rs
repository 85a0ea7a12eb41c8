//! Group commit for new notifications.
//!
//! Every API send and every routed event stores one notification. Committed one transaction per
//! row, they queue for SQLite's single write lock: measured on 2 cores with 2,000 API sends/s
//! offered, an insert took 28–32 ms on average and the API fell behind at 1,293–1,333 sends/s
//! (with this queue, interleaved: 1,763–1,998 sends/s). An [`InsertQueue`] hands the rows to one
//! task that stores everything waiting in one statement: a commit serves every caller that
//! arrived while the previous one ran or while it waited for its turn at the [`WriteGate`], with
//! no timer, so an idle queue adds no delay. On PostgreSQL the WAL is flushed once per batch
//! instead of once per row.
//!
//! The batch's rows go in one multi-row INSERT ([`insert_together`]), not one statement per row:
//! at 2,000 API sends/s that made the wait for the store 2.5–2.9 → 1.6–2.1 ms on average (3
//! interleaved pairs), a statement's round trip to SQLite's thread being most of a small batch's
//! cost. The INSERT runs without BEGIN and COMMIT (a statement is atomic by itself), two round
//! trips fewer: HTTP p50 at 2,000 sends/s 1.9–2.4 → 1.5–1.9 ms on SQLite. Rows go in with
//! `ON CONFLICT (request_id) DO NOTHING`, so a repeated request id (also one repeated within a
//! batch) answers [`Inserted::Duplicate`] without failing the statement. If the statement fails
//! for anything but an outage ([`RepoError::is_outage`]: one row breaks another constraint, or
//! has a value the database refuses, such as a request id too long for PostgreSQL's index on it),
//! the batch is stored again row by row, so that row's caller alone gets the error. An outage
//! (the database unreachable or locked) would fail each row the same way, so every caller of the
//! batch gets it at once rather than after one timeout per row.
//!
//! The same writer clears the [`PUBLISH_PENDING`](super::schedule::PUBLISH_PENDING) mark of API
//! sends whose commands JetStream acknowledged ([`InsertQueue::confirm_published`]), gathered
//! into one UPDATE every `CONFIRM_DELAY` (or `CONFIRM_BATCH` confirmations), so the mark
//! costs a few statements a second rather than one per send. A confirmation that is lost (the
//! process died, the database failed) costs one command the Scheduler publishes again and
//! JetStream's de-duplication drops.

use std::time::Duration;

use sea_orm::DatabaseConnection;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, timeout_at};
use uuid::Uuid;

use super::notifications::{Inserted, NewNotification, insert, insert_together};
use super::schedule::confirm_published;
use crate::{RepoError, WriteGate};

/// Rows per statement (and jobs taken per round) at most; with every column a bound value, well
/// within SQLite's 32,766 and PostgreSQL's 65,535 bound values per statement.
const MAX_BATCH: usize = 256;
/// Confirmations written together at most (one UPDATE).
const CONFIRM_BATCH: usize = 500;
/// Longest a confirmation waits for others to share its UPDATE. Measured at 1,000 and 2,000 API
/// sends/s, clearing the marks of the previous batch inside every insert transaction made the
/// API's p50 about 0.5 ms and its p99 up to twice as slow; a few UPDATEs a second are not seen.
const CONFIRM_DELAY: Duration = Duration::from_millis(500);
/// Rows waiting for the writer before callers wait to hand theirs over.
const QUEUE_CAPACITY: usize = 4_096;

/// A row and where its outcome goes.
struct Pending {
    row: NewNotification,
    reply: oneshot::Sender<Result<Inserted, RepoError>>,
}

/// What the writer is asked to do.
// Most jobs are inserts: boxing them to shrink the rare confirmation would cost an allocation each.
#[allow(clippy::large_enum_variant)]
enum Job {
    /// Store a new notification.
    Insert(Pending),
    /// Clear the [`PUBLISH_PENDING`](super::schedule::PUBLISH_PENDING) mark of this notification.
    Confirm(Uuid),
}

/// Stores new notifications through one writer task that batches concurrent callers into shared
/// transactions. Cloning is cheap; the task ends when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct InsertQueue {
    sender: mpsc::Sender<Job>,
    gate: WriteGate,
}

impl InsertQueue {
    /// Starts the writer task on the current tokio runtime; its transactions take turns with
    /// the other writers of `gate`.
    pub fn start(db: DatabaseConnection, gate: WriteGate) -> Self {
        let (sender, receiver) = mpsc::channel(QUEUE_CAPACITY);
        tokio::spawn(write_batches(db, gate.clone(), receiver));
        Self { sender, gate }
    }

    /// The turns its transactions take: for other writers of the API that should take turns with
    /// them (a batch cancel's chunks).
    pub fn gate(&self) -> &WriteGate {
        &self.gate
    }

    /// Stores `row` as [`insert`] does, sharing a statement with the rows of concurrent callers.
    pub async fn insert(&self, row: NewNotification) -> Result<Inserted, RepoError> {
        let (reply, outcome) = oneshot::channel();
        self.sender
            .send(Job::Insert(Pending { row, reply }))
            .await
            .map_err(|_| RepoError::WriterStopped)?;
        outcome.await.map_err(|_| RepoError::WriterStopped)?
    }

    /// Records that the command of `id`, stored with the
    /// [`PUBLISH_PENDING`](super::schedule::PUBLISH_PENDING) mark, is published; the mark is
    /// cleared within `CONFIRM_DELAY`. Never waits: when the queue is full the confirmation is
    /// dropped, and the Scheduler's republish of the still-marked row is a duplicate JetStream
    /// drops.
    pub fn confirm_published(&self, id: Uuid) {
        let _ = self.sender.try_send(Job::Confirm(id));
    }
}

/// The writer task: every round takes what is waiting (at least one job) and stores the rows.
/// Confirmations are gathered and written together once [`CONFIRM_BATCH`] are waiting or the
/// oldest has waited [`CONFIRM_DELAY`].
async fn write_batches(db: DatabaseConnection, gate: WriteGate, mut receiver: mpsc::Receiver<Job>) {
    let mut jobs = Vec::with_capacity(MAX_BATCH);
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut confirmed = Vec::with_capacity(CONFIRM_BATCH);
    let mut confirm_by = None;
    loop {
        let wait = receiver.recv_many(&mut jobs, MAX_BATCH);
        let received = match confirm_by {
            None => Some(wait.await),
            // `recv_many` is cancel safe: a timeout loses no job.
            Some(deadline) => timeout_at(deadline, wait).await.ok(),
        };
        for job in jobs.drain(..) {
            sort(job, &mut batch, &mut confirmed);
        }
        if !batch.is_empty() {
            let _turn = gate.enter().await;
            take_waiting(&mut receiver, &mut batch, &mut confirmed);
            store_and_answer(&db, &mut batch).await;
        }
        let closed = received == Some(0);
        if !confirmed.is_empty() {
            let deadline = *confirm_by.get_or_insert_with(|| Instant::now() + CONFIRM_DELAY);
            if closed || confirmed.len() >= CONFIRM_BATCH || Instant::now() >= deadline {
                let _turn = gate.enter().await;
                let _ = confirm_published(&db, &confirmed).await;
                confirmed.clear();
                confirm_by = None;
            }
        }
        if closed {
            return;
        }
    }
}

/// Moves the jobs that arrived while the batch waited for its turn into it (up to [`MAX_BATCH`]
/// rows): they share its statement instead of waiting for the next turn.
fn take_waiting(
    receiver: &mut mpsc::Receiver<Job>,
    batch: &mut Vec<Pending>,
    confirmed: &mut Vec<Uuid>,
) {
    while batch.len() < MAX_BATCH {
        match receiver.try_recv() {
            Ok(job) => sort(job, batch, confirmed),
            Err(_) => return,
        }
    }
}

/// Puts a row to store into `batch`, a confirmation into `confirmed`.
fn sort(job: Job, batch: &mut Vec<Pending>, confirmed: &mut Vec<Uuid>) {
    match job {
        Job::Insert(pending) => batch.push(pending),
        Job::Confirm(id) => confirmed.push(id),
    }
}

/// Stores `batch` and answers each row's caller; empties `batch`.
async fn store_and_answer(db: &DatabaseConnection, batch: &mut Vec<Pending>) {
    match store_together(db, batch).await {
        Ok(outcomes) => {
            for (pending, outcome) in batch.drain(..).zip(outcomes) {
                let _ = pending.reply.send(outcome);
            }
        }
        Err(err) if !err.is_outage() => {
            for pending in batch.drain(..) {
                let _ = pending.reply.send(insert(db, pending.row).await);
            }
        }
        Err(err) => {
            for pending in batch.drain(..) {
                let _ = pending.reply.send(Err(err.clone()));
            }
        }
    }
}

/// Stores the rows of `batch` in one statement; their outcomes in the same order.
async fn store_together(
    db: &DatabaseConnection,
    batch: &[Pending],
) -> Result<Vec<Result<Inserted, RepoError>>, RepoError> {
    let rows = batch.iter().map(|pending| pending.row.clone()).collect();
    insert_together(db, rows).await
}
