use sea_orm_migration::prelude::*;

use crate::concurrent_index;

/// The Scheduler's stale-claim sweep reads only queued rows that carry a `status_reason`.
///
/// Every release round (each `scheduler.poll_interval_ms`) the Scheduler looks for claims, API
/// sends and dead-letter replays never confirmed published: `queued` rows changed before
/// `stale_claim_secs` ago whose `status_reason` carries one of their marks. It found them in
/// `idx_notifications_queued_updated` (`updated_at` of every queued row), which also holds the
/// rows without a reason: a bulk send's fan-out, the router's notifications, API sends once their
/// command is confirmed published. With a backlog of such rows older than `stale_claim_secs` the
/// sweep read every one of them, each poll, to find the few marked (its `LIMIT` stops only once
/// it has found that many).
///
/// `idx_notifications_queued_marked` (`updated_at` of queued rows with a `status_reason`) holds
/// only rows the sweep may want, and replaces `idx_notifications_queued_updated`, which served no
/// other lookup: a row fanned out or routed is inserted into no index of queued rows any more.
/// The sweep writes `status_reason IS NOT NULL` into its SQL (`repo::schedule::stale` in
/// `herald-entities`) so that both databases can match the index's condition;
/// `tests/tests/query_plans.rs` checks that both do.
///
/// Built as in `m20261203_000501`: the new index first, then the old one dropped, each on its
/// own and concurrently on PostgreSQL (outside a transaction), after dropping what an
/// interrupted run left invalid.
#[derive(DeriveMigrationName)]
pub struct Migration;

/// The index of the stale-claim sweep.
const MARKED: &str = "idx_notifications_queued_marked";
/// The index it replaces (from `m20261203_000501`).
const QUEUED: &str = "idx_notifications_queued_updated";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let marked = Index::create()
            .col(Notifications::UpdatedAt)
            .cond_where(
                Condition::all()
                    .add(Expr::col(Notifications::Status).eq("queued"))
                    .add(Expr::col(Notifications::StatusReason).is_not_null()),
            )
            .to_owned();
        concurrent_index::create(manager, Notifications::Table, MARKED, marked).await?;
        manager
            .drop_index(concurrent_index::drop_index(QUEUED, Notifications::Table))
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let queued = Index::create()
            .col(Notifications::UpdatedAt)
            .cond_where(Expr::col(Notifications::Status).eq("queued"))
            .to_owned();
        concurrent_index::create(manager, Notifications::Table, QUEUED, queued).await?;
        manager
            .drop_index(concurrent_index::drop_index(MARKED, Notifications::Table))
            .await
    }

    /// `CREATE INDEX CONCURRENTLY` cannot run inside a transaction.
    fn use_transaction(&self) -> Option<bool> {
        Some(false)
    }
}

#[derive(DeriveIden, Clone, Copy)]
enum Notifications {
    Table,
    Status,
    StatusReason,
    UpdatedAt,
}
