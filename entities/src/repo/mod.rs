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

/// `status = '<status>'`, with the name written into the SQL rather than bound.
///
/// Partial indexes on `notifications` hold the rows of a few statuses (migration
/// `m20261203_000501`), and a database uses one only where it can tell from the query that every
/// row it wants meets the index's condition. With the status bound as a parameter, SQLite can tell
/// only by planning again with the bound value, and PostgreSQL only in a plan made for that
/// value, not in the generic plan it may switch a prepared statement to; with the name in the SQL,
/// both can always. The name comes from a fixed set, never from outside.
pub(crate) fn status_is(status: crate::NotificationStatus) -> sea_orm::sea_query::Expr {
    use sea_orm::sea_query::{Expr, ExprTrait};
    Expr::col(crate::notification::Column::Status).eq(Expr::Constant(status.as_str().into()))
}
