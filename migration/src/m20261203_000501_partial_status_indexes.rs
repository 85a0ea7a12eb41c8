use sea_orm_migration::prelude::*;

use crate::concurrent_index;

/// Status changes stop rewriting index entries they do not need.
///
/// A notification moves `queued → processing → sent` within a second. In SQLite every index
/// holding its `status` gets an entry deleted and another inserted at each step; in PostgreSQL an
/// update that changes an indexed column writes a new entry into every index whose condition the
/// new row meets. Three indexes held every row though their queries ask for few:
///
/// - `(customer_id, status)` served a customer's history, which needs the customer and the
///   acceptance order (ids are UUIDv7), not the status: now `(customer_id, id)`, for rows with a
///   customer. In SQLite a status change no longer touches it.
/// - `(status, scheduled_at)` served the scheduler's due scan and the stale-claim sweep: now
///   `(scheduled_at)` for `scheduled` rows and `(updated_at)` for `queued` rows. A sent
///   notification has an entry in neither.
/// - `(batch_id, status)` served a bulk send's progress: now only for rows of a bulk send.
///
/// A listing by a status operators look for (`processing`, which a notification holds for
/// moments unless it is stuck, `failed`, `dead`, `skipped`, `cancelled`) finds those rows in a
/// fourth partial index, `(status, id)`, which a sent notification has left. Measured:
/// PostgreSQL's write-ahead log per notification about −20% (`herald bench`, 50,000 for 5,000: rows
/// without a customer or a bulk send, which the old indexes held too; traffic with customers
/// saves less there); the StatusWriter's UPDATEs replayed alone on 50,000 rows, PostgreSQL 3.9 →
/// 2.7–3.1 s, SQLite 4.5 → 3.4–3.9 s.
///
/// The new indexes are built before the old ones go, each statement on its own and, on
/// PostgreSQL, `CONCURRENTLY` (outside a transaction): the table stays readable and writable
/// throughout, and every lookup has an index at every moment. An interrupted build leaves
/// PostgreSQL's index marked invalid and the migration unrecorded; the next run drops such an
/// index and builds it again.
///
/// The queries write the status into their SQL (`repo::status_is` in `herald-entities`), so both
/// databases can match these conditions in any plan; `tests/tests/query_plans.rs` checks each
/// lookup on both.
#[derive(DeriveMigrationName)]
pub struct Migration;

/// Indexes replaced, with the columns they had.
const OLD: [(&str, [Notifications; 2]); 3] = [
    (
        "idx_notifications_customer_status",
        [Notifications::CustomerId, Notifications::Status],
    ),
    (
        "idx_notifications_status_scheduled",
        [Notifications::Status, Notifications::ScheduledAt],
    ),
    (
        "idx_notifications_batch_status",
        [Notifications::BatchId, Notifications::Status],
    ),
];

/// The statuses the `(status, id)` index holds.
const WATCHED: [&str; 5] = ["processing", "failed", "dead", "skipped", "cancelled"];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let new = new_indexes();
        let names: Vec<&str> = new
            .iter()
            .filter_map(|index| index.get_index_spec().get_name())
            .collect();
        concurrent_index::drop_invalid(manager, Notifications::Table, &names).await?;
        for index in new {
            manager.create_index(index).await?;
        }
        for (name, _) in OLD {
            manager
                .drop_index(concurrent_index::drop_index(name, Notifications::Table))
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for (name, [first, second]) in OLD {
            let mut index = Index::create();
            index
                .name(name)
                .table(Notifications::Table)
                .col(first)
                .col(second)
                .if_not_exists()
                .concurrently();
            manager.create_index(index).await?;
        }
        for index in new_indexes() {
            let name = index.get_index_spec().get_name().unwrap_or_default();
            manager
                .drop_index(concurrent_index::drop_index(name, Notifications::Table))
                .await?;
        }
        Ok(())
    }

    /// `CREATE INDEX CONCURRENTLY` cannot run inside a transaction.
    fn use_transaction(&self) -> Option<bool> {
        Some(false)
    }
}

fn new_indexes() -> Vec<IndexCreateStatement> {
    use Notifications::*;
    let status = || Expr::col(Status);
    let watched = WATCHED
        .iter()
        .fold(Condition::any(), |any, s| any.add(status().eq(*s)));
    vec![
        partial(
            "idx_notifications_customer_id",
            &[CustomerId, Id],
            Expr::col(CustomerId).is_not_null().into(),
        ),
        partial(
            "idx_notifications_scheduled_due",
            &[ScheduledAt],
            status().eq("scheduled").into(),
        ),
        partial(
            "idx_notifications_queued_updated",
            &[UpdatedAt],
            status().eq("queued").into(),
        ),
        partial(
            "idx_notifications_bulk_status",
            &[BatchId, Status],
            Expr::col(BatchId).is_not_null().into(),
        ),
        partial("idx_notifications_watched", &[Status, Id], watched),
    ]
}

/// `CREATE INDEX name ON notifications (columns) WHERE condition`.
fn partial(name: &str, columns: &[Notifications], condition: Condition) -> IndexCreateStatement {
    let mut index = Index::create();
    index.name(name).table(Notifications::Table).if_not_exists();
    for column in columns {
        index.col(*column);
    }
    index.cond_where(condition).concurrently().to_owned()
}

#[derive(DeriveIden, Clone, Copy)]
enum Notifications {
    Table,
    Id,
    CustomerId,
    Status,
    ScheduledAt,
    UpdatedAt,
    BatchId,
}
