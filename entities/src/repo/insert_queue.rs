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

use sea_orm::{DatabaseConnection, TransactionTrait};
use tokio::sync::{mpsc, oneshot};

use super::notifications::{Inserted, NewNotification, insert};
use crate::RepoError;

/// Rows per transaction at most.
const MAX_BATCH: usize = 256;
/// Rows waiting for the writer before callers wait to hand theirs over.
const QUEUE_CAPACITY: usize = 4_096;

/// A row and where its outcome goes.
struct Pending {
    row: NewNotification,
    reply: oneshot::Sender<Result<Inserted, RepoError>>,
}

/// Stores new notifications through one writer task that batches concurrent callers into shared
/// transactions. Cloning is cheap; the task ends when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct InsertQueue {
    sender: mpsc::Sender<Pending>,
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
            .send(Pending { row, reply })
            .await
            .map_err(|_| RepoError::WriterStopped)?;
        outcome.await.map_err(|_| RepoError::WriterStopped)?
    }
}

/// The writer task: every round takes what is waiting (at least one row) and stores it.
async fn write_batches(db: DatabaseConnection, mut receiver: mpsc::Receiver<Pending>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while receiver.recv_many(&mut batch, MAX_BATCH).await > 0 {
        match store_together(&db, &batch).await {
            Ok(outcomes) => {
                for (pending, outcome) in batch.drain(..).zip(outcomes) {
                    let _ = pending.reply.send(Ok(outcome));
                }
            }
            Err(err) if one_row_at_fault(&err) => {
                for pending in batch.drain(..) {
                    let _ = pending.reply.send(insert(&db, pending.row).await);
                }
            }
            Err(err) => {
                for pending in batch.drain(..) {
                    let _ = pending.reply.send(Err(err.clone()));
                }
            }
        }
    }
}

/// Stores the rows of `batch` in one transaction; their outcomes in the same order.
async fn store_together(
    db: &DatabaseConnection,
    batch: &[Pending],
) -> Result<Vec<Inserted>, RepoError> {
    let txn = db.begin().await?;
    let mut outcomes = Vec::with_capacity(batch.len());
    for pending in batch {
        outcomes.push(insert(&txn, pending.row.clone()).await?);
    }
    txn.commit().await?;
    Ok(outcomes)
}

/// Whether `err` is a constraint one row broke (the others may be fine on their own).
fn one_row_at_fault(err: &RepoError) -> bool {
    matches!(err, RepoError::Db(db) if db.sql_err().is_some())
}
