//! Queries, one module per table.

pub mod customers;
pub mod notifications;
pub mod status_batch;

use sea_orm::DbErr;

/// What can go wrong in a query.
#[derive(Debug, thiserror::Error)]
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
}
