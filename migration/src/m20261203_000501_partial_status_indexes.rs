use sea_orm_migration::prelude::*;

/// Status changes stop rewriting index entries they do not need.
///
/// A notification moves `queued → processing → sent` within a second, and every index holding its
/// `status` gets an entry deleted and another inserted at each step (on PostgreSQL, an update that
/// changes an indexed column writes a new entry into every index). Three indexes carried the
/// status for everyone, though their queries ask for few rows:
///
/// - `(customer_id, status)` served a customer's history, which needs the customer and the
///   acceptance order (ids are UUIDv7), not the status: now `(customer_id, id)`, for rows with a
///   customer. A status change no longer touches it.
/// - `(status, scheduled_at)` served the scheduler's due scan and the stale-claim sweep: now
///   `(scheduled_at)` for `scheduled` rows and `(updated_at)` for `queued` rows. A sent
///   notification leaves both, and has no entry in either.
/// - `(batch_id, status)` served a bulk send's progress: now only for rows of a bulk send.
///
/// A history query for a status operators look for (`failed`, `dead`, `skipped`, `cancelled`)
/// finds those rows in a fourth partial index, `(status, id)`, that the everyday path never
/// enters. Measured: PostgreSQL's write-ahead log per notification −21% (`herald bench`, 50,000
/// for 5,000); the StatusWriter's UPDATEs replayed alone on 50,000 rows, PostgreSQL 3.9 →
/// 2.7–3.1 s, SQLite 4.5 → 3.4–3.9 s.
///
/// SQLite and PostgreSQL both use a partial index for a query with a bound parameter
/// (`status = ?`): SQLite plans again with the bound value, PostgreSQL plans such a query with its
/// values (`tests/tests/query_plans.rs` checks each lookup on both).
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
const NEEDING_ATTENTION: [&str; 4] = ["failed", "dead", "skipped", "cancelled"];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for (name, _) in OLD {
            manager
                .drop_index(
                    Index::drop()
                        .name(name)
                        .table(Notifications::Table)
                        .if_exists()
                        .to_owned(),
                )
                .await?;
        }
        for index in new_indexes() {
            manager.create_index(index).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for index in new_indexes() {
            let name = index
                .get_index_spec()
                .get_name()
                .unwrap_or_default()
                .to_owned();
            manager
                .drop_index(
                    Index::drop()
                        .name(name)
                        .table(Notifications::Table)
                        .if_exists()
                        .to_owned(),
                )
                .await?;
        }
        for (name, [first, second]) in OLD {
            manager
                .create_index(
                    Index::create()
                        .name(name)
                        .table(Notifications::Table)
                        .col(first)
                        .col(second)
                        .if_not_exists()
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}

fn new_indexes() -> Vec<IndexCreateStatement> {
    use Notifications::*;
    let status = || Expr::col(Status);
    let attention = NEEDING_ATTENTION
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
            "idx_notifications_batch_status",
            &[BatchId, Status],
            Expr::col(BatchId).is_not_null().into(),
        ),
        partial("idx_notifications_attention", &[Status, Id], attention),
    ]
}

/// `CREATE INDEX name ON notifications (columns) WHERE condition`.
fn partial(name: &str, columns: &[Notifications], condition: Condition) -> IndexCreateStatement {
    let mut index = Index::create();
    index.name(name).table(Notifications::Table).if_not_exists();
    for column in columns {
        index.col(*column);
    }
    index.cond_where(condition).to_owned()
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
