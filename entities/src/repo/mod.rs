//! Queries, one module per table.

pub mod activity;
pub mod api_keys;
pub mod batches;
pub mod cancel_events;
pub mod customers;
pub mod dashboard_logouts;
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

impl RepoError {
    /// Whether the database refused a text of the query as one it cannot hold: PostgreSQL's
    /// `character_not_in_repertoire` (SQLSTATE 22021: a NUL character, or bytes invalid in the
    /// database's encoding) and `untranslatable_character` (22P05: a character its encoding lacks,
    /// or `\u0000` in `jsonb`). The request that carried the text is at fault, not the database.
    pub fn is_unstorable_text(&self) -> bool {
        use sea_orm::{RuntimeErr, sqlx};
        let RepoError::Db(
            DbErr::Exec(RuntimeErr::SqlxError(cause)) | DbErr::Query(RuntimeErr::SqlxError(cause)),
        ) = self
        else {
            return false;
        };
        match cause.as_ref() {
            sqlx::Error::Database(db) => db
                .code()
                .is_some_and(|code| matches!(code.as_ref(), "22021" | "22P05")),
            _ => false,
        }
    }
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

/// `text` with every NUL character replaced by U+FFFD, the replacement character.
///
/// PostgreSQL refuses NUL in text (SQLSTATE 22021) and `\u0000` in `jsonb` (22P05); SQLite stores
/// them. Text that reaches a write without the API's check for NUL (a provider's reply copied into
/// an error, an event's variables rendered into content) would fail the whole statement on
/// PostgreSQL, and with it every row of its batch. Replaced, it is stored alike on both.
pub(crate) fn without_nul(text: String) -> String {
    if text.contains('\0') {
        text.replace('\0', "\u{FFFD}")
    } else {
        text
    }
}

/// `value` with [`without_nul`] applied to every string in it, object keys included; returned as
/// it is (not rebuilt) when it has no NUL.
pub(crate) fn json_without_nul(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    fn has_nul(value: &Value) -> bool {
        match value {
            Value::String(text) => text.contains('\0'),
            Value::Array(items) => items.iter().any(has_nul),
            Value::Object(map) => map
                .iter()
                .any(|(key, value)| key.contains('\0') || has_nul(value)),
            Value::Null | Value::Bool(_) | Value::Number(_) => false,
        }
    }
    fn replace(value: Value) -> Value {
        match value {
            Value::String(text) => Value::String(without_nul(text)),
            Value::Array(items) => Value::Array(items.into_iter().map(replace).collect()),
            Value::Object(map) => Value::Object(
                map.into_iter()
                    .map(|(key, value)| (without_nul(key), replace(value)))
                    .collect(),
            ),
            other => other,
        }
    }
    if has_nul(&value) {
        replace(value)
    } else {
        value
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn nul_characters_are_replaced_in_text_and_in_json() {
        assert_eq!(without_nul("a\0b\0".into()), "a\u{FFFD}b\u{FFFD}");
        assert_eq!(without_nul("plain".into()), "plain");
        assert_eq!(
            json_without_nul(json!({"k\0": ["x\0", 1, null, true, {"deep": "\0"}], "n": 2})),
            json!({"k\u{FFFD}": ["x\u{FFFD}", 1, null, true, {"deep": "\u{FFFD}"}], "n": 2})
        );
        let clean = json!({"text": "Your order shipped.", "n": [1, 2]});
        assert_eq!(json_without_nul(clean.clone()), clean);
    }
}
