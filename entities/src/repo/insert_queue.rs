//! Group commit for new notifications.
//!
//! Every API send and every routed event stores one notification. Committed one transaction per
//! row, they queue for SQLite's single write lock: measured on 2 cores with 2,000 API sends/s
//! offered, an insert took 28–32 ms on average and the API fell behind at 1,293–1,333 sends/s
//! (with this queue, interleaved: 1,763–1,998 sends/s). An [`InsertQueue`] hands the rows to one
//! task that stores everything waiting in one transaction: a commit serves every caller that
//! arrived while the previous one ran, with no timer, so an idle queue adds no delay. On
//! PostgreSQL the WAL is flushed once per batch instead of once per row.
//!
//! Each row is inserted with `ON CONFLICT (request_id) DO NOTHING`, so a repeated request id
//! (also one repeated within a batch) answers [`Inserted::Duplicate`] without aborting the
//! transaction. If one row breaks another constraint, the batch is stored again row by row, so
//! that row's caller alone gets the error. Any other failure (the database unreachable or locked)
//! would fail each row the same way, so every caller of the batch gets it at once rather than
//! after one timeout per row.
//!
//! The same writer clears the [`PUBLISH_PENDING`](super::schedule::PUBLISH_PENDING) mark of API
//! sends whose commands JetStream acknowledged ([`InsertQueue::confirm_published`]), in the
//! transaction of the next rows (or on their own after [`CONFIRM_DELAY`]), so under load the mark
//! costs no commit of its own. A confirmation that is lost (the process died, the database
//! failed) costs one command the Scheduler publishes again and JetStream's de-duplication drops.

use std::time::Duration;

use sea_orm::{DatabaseConnection, TransactionTrait};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, timeout_at};
use uuid::Uuid;

use super::notifications::{Inserted, NewNotification, insert};
use super::schedule::confirm_published;
use crate::RepoError;

/// Rows (and confirmations) per transaction at most.
const MAX_BATCH: usize = 256;
/// Longest a confirmation waits for new rows to share their transaction before it is written on
/// its own. Without the wait, the confirmations of each batch, arriving while the writer was
/// idle, took a write transaction of their own.
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
}

impl InsertQueue {
    /// Starts the writer task on the current tokio runtime.
    pub fn start(db: DatabaseConnection) -> Self {
        let (sender, receiver) = mpsc::channel(QUEUE_CAPACITY);
        tokio::spawn(write_batches(db, receiver));
        Self { sender }
    }

    /// Stores `row` as [`insert`] does, sharing a transaction with the rows of concurrent callers.
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
    /// cleared with the next transaction. Never waits: when the queue is full the confirmation is
    /// dropped, and the Scheduler's republish of the still-marked row is a duplicate JetStream
    /// drops.
    pub fn confirm_published(&self, id: Uuid) {
        let _ = self.sender.try_send(Job::Confirm(id));
    }
}

/// The writer task: every round takes what is waiting (at least one job) and stores it.
/// Confirmations wait up to [`CONFIRM_DELAY`] for rows to share a transaction with.
async fn write_batches(db: DatabaseConnection, mut receiver: mpsc::Receiver<Job>) {
    let mut jobs = Vec::with_capacity(MAX_BATCH);
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut confirmed = Vec::with_capacity(MAX_BATCH);
    let mut confirm_by = None;
    loop {
        let received = match confirm_by {
            None => receiver.recv_many(&mut jobs, MAX_BATCH).await,
            // `recv_many` is cancel safe: a timeout loses no job.
            Some(deadline) => {
                match timeout_at(deadline, receiver.recv_many(&mut jobs, MAX_BATCH)).await {
                    Ok(received) => received,
                    Err(_) => {
                        let _ = confirm_published(&db, &confirmed).await;
                        confirmed.clear();
                        confirm_by = None;
                        continue;
                    }
                }
            }
        };
        if received == 0 {
            let _ = confirm_published(&db, &confirmed).await;
            return;
        }
        for job in jobs.drain(..) {
            match job {
                Job::Insert(pending) => batch.push(pending),
                Job::Confirm(id) => confirmed.push(id),
            }
        }
        if batch.is_empty() && confirmed.len() < MAX_BATCH {
            confirm_by.get_or_insert_with(|| Instant::now() + CONFIRM_DELAY);
            continue;
        }
        store_and_answer(&db, &mut batch, &confirmed).await;
        confirmed.clear();
        confirm_by = None;
    }
}

/// Stores `batch` with `confirmed` and answers each row's caller; empties `batch`.
async fn store_and_answer(db: &DatabaseConnection, batch: &mut Vec<Pending>, confirmed: &[Uuid]) {
    match store_together(db, batch, confirmed).await {
        Ok(outcomes) => {
            for (pending, outcome) in batch.drain(..).zip(outcomes) {
                let _ = pending.reply.send(Ok(outcome));
            }
        }
        Err(err) if one_row_at_fault(&err) => {
            for pending in batch.drain(..) {
                let _ = pending.reply.send(insert(db, pending.row).await);
            }
            // Not a confirmation's fault (they break no constraint): they go on their own.
            let _ = confirm_published(db, confirmed).await;
        }
        Err(err) => {
            for pending in batch.drain(..) {
                let _ = pending.reply.send(Err(err.clone()));
            }
        }
    }
}

/// Stores the rows of `batch` and clears the marks of `confirmed` in one transaction; the rows'
/// outcomes in the same order.
async fn store_together(
    db: &DatabaseConnection,
    batch: &[Pending],
    confirmed: &[Uuid],
) -> Result<Vec<Inserted>, RepoError> {
    let txn = db.begin().await?;
    let mut outcomes = Vec::with_capacity(batch.len());
    for pending in batch {
        outcomes.push(insert(&txn, pending.row.clone()).await?);
    }
    confirm_published(&txn, confirmed).await?;
    txn.commit().await?;
    Ok(outcomes)
}

/// Whether `err` is a constraint one row broke (the others may be fine on their own).
fn one_row_at_fault(err: &RepoError) -> bool {
    matches!(err, RepoError::Db(db) if db.sql_err().is_some())
}
