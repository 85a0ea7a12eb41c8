//! Queries, one module per table.

pub mod activity;
pub mod api_keys;
pub mod batches;
pub mod customers;
pub mod dead_letters;
pub mod history;
pub mod insert_queue;
pub mod notifications;
pub mod orders;
pub mod outbox;
pub mod preferences;
pub mod receipts;
pub mod schedule;
pub mod send_history;
pub mod status_batch;
pub mod templates;
pub mod writer_thread;

use sea_orm::DbErr;

/// What can go wrong in a query.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RepoError {
    /// The database refused or could not be reached.
    #[error("database error: {0}")]
    Db(#[from] DbErr),
    /// A JSON column could not be encoded or decoded.
    #[error("invalid JSON in column {column}: {reason}")]
    Json {
        /// The column concerned.
        column: &'static str,
        /// The decoder's reason.
        reason: String,
    },
    /// The [`insert_queue::InsertQueue`]'s writer task or a [`writer_thread::WriterThread`] is
    /// gone (the process is shutting down).
    #[error("the database writer has stopped")]
    WriterStopped,
}
