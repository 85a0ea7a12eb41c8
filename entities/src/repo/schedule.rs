//! The Scheduler's queries: claiming due scheduled notifications, republishing commands that were
//! never confirmed published, cancelling, and retention.

use chrono::{DateTime, SubsecRound, Utc};
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, DbBackend, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, QueryTrait, Select, TransactionSession, TransactionTrait, UpdateMany,
    sea_query::{
        CaseStatement, Expr, ExprTrait, LockBehavior, LockType, PgFunc, Query, SelectStatement,
        SimpleExpr, UpdateStatement,
    },
};
use uuid::Uuid;

use super::{receipts::drop_held_of_unsent, status_batch::status_among};
use crate::{NotificationStatus, RepoError, WriteGate, batch, notification};

/// Prefix of the `status_reason` of a notification claimed by a Scheduler and not yet confirmed
/// published; followed by the claim's token.
pub const CLAIM_PREFIX: &str = "claimed by scheduler ";

/// The `status_reason` an API send is stored with until its command is confirmed published. A
/// request that stops in between (the process dies, or NATS and the database fail together)
/// leaves the mark, and the Scheduler publishes the command after `stale_claim_secs` like a stale
/// claim.
pub const PUBLISH_PENDING: &str = "stored; command not yet confirmed published";

/// Prefix of the `status_reason` of a notification requeued by a dead-letter replay whose command
/// is not yet confirmed published; followed by the replay's key, which names the command's
/// `Nats-Msg-Id` (see [`super::dead_letters::PendingReplay`]). A replay that stops in between
/// leaves the mark, and the Scheduler publishes the command after `stale_claim_secs` under that
/// id, with the replay's attempt base.
pub const REPLAY_PENDING_PREFIX: &str = "replay not yet confirmed published: ";

/// The `status_reason` a replayed notification keeps once its command is confirmed published
/// (until its delivery sets another).
pub const REPLAYED: &str = "replayed from the dead-letter stream";

/// `status_reason` marks a command that may not have been published: a Scheduler's claim, an API
/// send awaiting its confirmation, or a dead-letter replay awaiting its own.
fn unconfirmed() -> Condition {
    first_publish_unconfirmed().add(replay_pending())
}

/// `status_reason` marks a command that may not have been published: a Scheduler's claim
/// (published under the claim's own `Nats-Msg-Id`, see `herald_nats::publish::release_msg_id`),
/// or an API send awaiting its confirmation (published under the notification's id).
fn first_publish_unconfirmed() -> Condition {
    Condition::any()
        .add(notification::Column::StatusReason.starts_with(CLAIM_PREFIX))
        .add(notification::Column::StatusReason.eq(PUBLISH_PENDING))
}

/// `status_reason` marks a dead-letter replay whose command is not yet confirmed published.
fn replay_pending() -> Condition {
    Condition::all().add(notification::Column::StatusReason.starts_with(REPLAY_PENDING_PREFIX))
}

/// `status_reason` without an unconfirmed-publish mark, for a dispatcher's `processing` change
/// (the command evidently arrived): a replay's mark becomes [`REPLAYED`], the other marks go; any
/// other reason, such as a deferral's, is kept.
pub(crate) fn reason_without_publish_mark() -> SimpleExpr {
    CaseStatement::new()
        .case(replay_pending(), Expr::value(REPLAYED))
        .case(unconfirmed(), Expr::value(Option::<String>::None))
        .finally(Expr::col(notification::Column::StatusReason))
        .into()
}

/// `status_reason` without the mark of an unconfirmed first command, once that command is
/// published again (a repeated API request). A replay's mark stays: the command under the
/// notification's id says nothing of the replay's, which confirms itself.
pub(crate) fn reason_without_first_publish_mark() -> SimpleExpr {
    CaseStatement::new()
        .case(
            first_publish_unconfirmed(),
            Expr::value(Option::<String>::None),
        )
        .finally(Expr::col(notification::Column::StatusReason))
        .into()
}

/// What a Scheduler's claim of due notifications took.
#[derive(Debug)]
pub struct DueClaim {
    /// The notifications claimed: `queued` now, marked with the claim's token.
    pub rows: Vec<notification::Model>,
    /// The claim found `limit` due notifications: more may be due, whether it took them all or
    /// another instance's claim took some of them first.
    pub full: bool,
}

/// Claims up to `limit` scheduled notifications due at `now`, the soonest due: moves them
/// `scheduled → queued`, marked with a fresh token (the rows come back in no particular order). Two instances claiming at once each get only
/// the rows their own UPDATE moved.
///
/// On PostgreSQL one UPDATE takes the due rows no other transaction holds (`FOR UPDATE SKIP
/// LOCKED`) and returns them: instances claiming together take rows of their own, so a burst of
/// due notifications (quiet hours ending) goes out at the pace of all of them. Reading the due ids
/// first had every instance read the same ones; all but one then waited for the winner's rows,
/// moved none, and took their rounds for done until their next poll. SQLite has one writer: the
/// due ids are read, then moved while still `scheduled`, and read back by the token
/// ([`claimed`]); a claim whose rows another instance's claim moved first still counts as
/// [`DueClaim::full`] when it found `limit`, so that its Scheduler goes on at once.
pub async fn claim_due(
    db: &impl ConnectionTrait,
    now: DateTime<Utc>,
    limit: u64,
) -> Result<DueClaim, RepoError> {
    let token = format!("{CLAIM_PREFIX}{}", Uuid::new_v4());
    if db.get_database_backend() == DbBackend::Postgres {
        let unlocked = due(now, limit)
            .lock_with_behavior(LockType::Update, LockBehavior::SkipLocked)
            .into_query();
        let rows = mark_claimed(now, &token)
            .filter(id_among_once(unlocked))
            .exec_with_returning(db)
            .await?;
        let full = rows.len() as u64 >= Ord::max(limit, 1);
        return Ok(DueClaim { rows, full });
    }
    let due: Vec<Uuid> = due(now, limit).into_tuple().all(db).await?;
    if due.is_empty() {
        return Ok(DueClaim {
            rows: Vec::new(),
            full: false,
        });
    }
    mark_claimed(now, &token)
        .filter(notification::Column::Id.is_in(due.iter().copied()))
        .exec(db)
        .await?;
    Ok(DueClaim {
        rows: claimed(&due, &token).all(db).await?,
        full: due.len() as u64 >= Ord::max(limit, 1),
    })
}

/// A claim's move of the `scheduled` rows it is narrowed to: `queued`, marked `token`.
fn mark_claimed(now: DateTime<Utc>, token: &str) -> UpdateMany<notification::Entity> {
    notification::Entity::update_many()
        .col_expr(
            notification::Column::Status,
            Expr::value(NotificationStatus::Queued),
        )
        .col_expr(notification::Column::StatusReason, Expr::value(token))
        .col_expr(notification::Column::UpdatedAt, Expr::value(now))
        .filter(notification::Column::Status.eq(NotificationStatus::Scheduled))
}

/// The rows among `ids` that the claim marked `token` moved: [`claim_due`]'s read-back, found by
/// primary key (`status_reason` has no index, and on PostgreSQL a bound status keeps a generic
/// plan off the partial status indexes). Public so that tests can check how databases plan it.
pub fn claimed(ids: &[Uuid], token: &str) -> Select<notification::Entity> {
    notification::Entity::find()
        .filter(notification::Column::Id.is_in(ids.iter().copied()))
        .filter(notification::Column::StatusReason.eq(token))
}

/// The ids of up to `limit` scheduled notifications due at `now`, soonest first: the scan behind
/// [`claim_due`] (on PostgreSQL with its rows locked, skipping those others hold); public so that
/// tests can check how databases plan it.
pub fn due(now: DateTime<Utc>, limit: u64) -> Select<notification::Entity> {
    notification::Entity::find()
        .select_only()
        .column(notification::Column::Id)
        .filter(super::status_is(NotificationStatus::Scheduled))
        .filter(notification::Column::ScheduledAt.lte(now))
        .order_by_asc(notification::Column::ScheduledAt)
        .limit(limit)
}

/// Claims, API sends and dead-letter replays that were never confirmed published (the instance
/// stopped between storing and publishing) and are older than `before`. Publishing them again is
/// safe: `Nats-Msg-Id` de-duplication drops a command that did go out (a replay's under the id its
/// replay published it with, see [`super::dead_letters::PendingReplay::of`]), and a processed one
/// is no longer `queued` with its mark.
pub async fn stale_claims(
    db: &impl ConnectionTrait,
    before: DateTime<Utc>,
    limit: u64,
) -> Result<Vec<notification::Model>, RepoError> {
    Ok(stale(before, limit).all(db).await?)
}

/// The query behind [`stale_claims`] (public so that tests can check how databases plan it).
///
/// Every mark is a `status_reason`, so `status_reason IS NOT NULL` changes nothing it finds; it
/// is written out so that both databases serve the query from `idx_notifications_queued_marked`
/// (queued rows with a reason), which leaves out the queued rows without one: a bulk send's
/// fan-out, the router's notifications, API sends whose command is confirmed published. Without
/// it, a backlog of those older than `before` was read whole on every poll. The oldest come
/// first, in that index's order: `idx_notifications_queued` (every queued row, by id) would
/// serve the conditions too, and PostgreSQL found the two alike on a small table; only the
/// marked index gives this order without a sort.
pub fn stale(before: DateTime<Utc>, limit: u64) -> Select<notification::Entity> {
    notification::Entity::find()
        .filter(super::status_is(NotificationStatus::Queued))
        .filter(notification::Column::StatusReason.is_not_null())
        .filter(unconfirmed())
        .filter(notification::Column::UpdatedAt.lt(before))
        .order_by_asc(notification::Column::UpdatedAt)
        .limit(limit)
}

/// Confirms that the first commands of claimed notifications or API sends are published: clears
/// the mark (unless a dispatcher has moved them on already). A replay's mark is left alone: it is
/// confirmed by [`super::dead_letters::confirm_replayed`], as a late confirmation of the first
/// command (the API's are gathered for a moment) says nothing of the replay's.
///
/// On PostgreSQL, rows a concurrent transaction holds are skipped (`FOR UPDATE SKIP LOCKED`): that
/// is a dispatcher's claim moving them to `processing`, or the StatusWriter moving them on, and
/// either clears the mark itself. Waiting for them deadlocked against its multi-row UPDATEs (each
/// locks rows in its own order), and the 1 s until PostgreSQL broke the deadlock stalled every
/// insert behind the confirmation. SQLite has one writer and no row locks.
pub async fn confirm_published(db: &impl ConnectionTrait, ids: &[Uuid]) -> Result<(), RepoError> {
    for chunk in ids.chunks(500) {
        let marked = Condition::all()
            .add(notification::Column::Id.is_in(chunk.to_vec()))
            .add(status_among(&[NotificationStatus::Queued]))
            .add(first_publish_unconfirmed());
        let rows = match db.get_database_backend() {
            DbBackend::Postgres => Condition::all().add(
                notification::Column::Id.in_subquery(
                    Query::select()
                        .column(notification::Column::Id)
                        .from(notification::Entity)
                        .cond_where(marked)
                        .lock_with_behavior(LockType::Update, LockBehavior::SkipLocked)
                        .to_owned(),
                ),
            ),
            _ => marked,
        };
        notification::Entity::update_many()
            .col_expr(
                notification::Column::StatusReason,
                Expr::value(Option::<String>::None),
            )
            .filter(rows)
            .exec(db)
            .await?;
    }
    Ok(())
}

/// Gives claimed notifications back (their publish failed): `queued → scheduled`, to be claimed
/// again on a later poll. API sends among `ids` keep their mark and stay `queued`: the next round
/// finds them stale again.
pub async fn unclaim(db: &impl ConnectionTrait, ids: &[Uuid]) -> Result<(), RepoError> {
    for chunk in ids.chunks(500) {
        notification::Entity::update_many()
            .col_expr(
                notification::Column::Status,
                Expr::value(NotificationStatus::Scheduled),
            )
            .col_expr(
                notification::Column::StatusReason,
                Expr::value("publishing failed; will retry"),
            )
            .filter(notification::Column::Id.is_in(chunk.to_vec()))
            .filter(status_among(&[NotificationStatus::Queued]))
            .filter(notification::Column::StatusReason.starts_with(CLAIM_PREFIX))
            .exec(db)
            .await?;
    }
    Ok(())
}

/// The result of a cancel request.
#[derive(Debug, Clone, PartialEq)]
pub enum Cancel {
    /// Cancelled now.
    Cancelled(Box<notification::Model>),
    /// No such notification.
    NotFound,
    /// Too late (or already final): its current status.
    NotCancellable(NotificationStatus),
}

/// Cancels a notification that is `scheduled`, or `queued` and not yet picked up by a dispatcher,
/// and drops, in the same transaction, the receipts held for it (see
/// `receipts::drop_held_of_unsent`).
pub async fn cancel(
    db: &(impl ConnectionTrait + TransactionTrait),
    id: Uuid,
    reason: &str,
) -> Result<Cancel, RepoError> {
    let moved = cancel_one(db, id, reason, Utc::now()).await?;
    match notification::Entity::find_by_id(id).one(db).await? {
        None => Ok(Cancel::NotFound),
        Some(row) if moved => Ok(Cancel::Cancelled(Box::new(row))),
        Some(row) => Ok(Cancel::NotCancellable(row.status)),
    }
}

/// How many notifications of a batch one statement of [`cancel_batch_chunk`] cancels at most: a
/// transaction short enough that the other writers (on SQLite the StatusWriter, the API's inserts,
/// the Scheduler's claims) get their turns between two of them.
pub const CANCEL_CHUNK: u64 = 1_000;

/// Notifications one statement cancelled, with the time it recorded for them.
#[derive(Debug, Clone, PartialEq)]
pub struct CancelledChunk {
    /// The notifications it moved to `cancelled`.
    pub ids: Vec<Uuid>,
    /// Their `updated_at`: when they were cancelled, in whole microseconds as both databases
    /// store it.
    pub at: DateTime<Utc>,
}

/// Cancels up to `limit` notifications of batch `batch_id` that are still cancellable (as
/// [`cancel`] decides: `scheduled`, or `queued` and not yet picked up), recording `reason`, in one
/// statement ([`cancel_chunk_query`]) that answers the ids it moved. A notification a dispatcher
/// picked up before the statement ran is `processing` and stays as it is. On PostgreSQL the
/// statement passes over rows another transaction holds (see [`cancel_chunk_query`]): an empty
/// answer means none of the batch's notifications was still cancellable, or those left were held
/// at that moment ([`cancel_batch_leftovers`] waits for them). The receipts held for the
/// notifications it cancels are dropped in the same transaction (a savepoint, when `db` is a
/// transaction).
pub async fn cancel_batch_chunk(
    db: &(impl ConnectionTrait + TransactionTrait),
    batch_id: Uuid,
    reason: &str,
    limit: u64,
) -> Result<CancelledChunk, RepoError> {
    let at = Utc::now().trunc_subsecs(6);
    let query = cancel_chunk_query(db.get_database_backend(), batch_id, reason, at, limit);
    let txn = db.begin().await?;
    let mut ids = Vec::new();
    for row in txn.query_all(&query).await? {
        ids.push(row.try_get_by_index::<Uuid>(0)?);
    }
    drop_held_of_unsent(&txn, &ids).await?;
    txn.commit().await?;
    Ok(CancelledChunk { ids, at })
}

/// [`cancel_batch_chunk`]'s statement: `UPDATE notifications SET status = 'cancelled' … WHERE id
/// IN (SELECT id FROM notifications WHERE batch_id = ? AND status IN ('scheduled', 'queued')
/// LIMIT ?) AND status IN ('scheduled', 'queued') RETURNING id` (on PostgreSQL `id =
/// ANY(ARRAY(SELECT … LIMIT ? FOR UPDATE SKIP LOCKED))`, read once: see `id_among_once`). The
/// inner read finds the rows in the `(batch_id, status)` index; the outer condition is checked
/// again on each row as it is changed (PostgreSQL re-reads a row another transaction changed
/// meanwhile). Public so that tests can check how databases plan it.
///
/// On PostgreSQL the inner read locks the rows it chooses and passes over those another
/// transaction holds (`FOR UPDATE SKIP LOCKED`), so the statement never waits for a row lock.
/// Waiting could deadlock: it would lock the batch's rows one after another in the index's order
/// while a dispatcher's claim ([`super::notifications::claim`]) or the StatusWriter, each one
/// statement changing many rows, locks some of the same rows in its own order; each would end up
/// holding a row the other waits for. A row passed over is most often being claimed (becoming
/// `processing`, past cancelling); the others are cancelled by a later chunk or by
/// [`cancel_batch_leftovers`]. SQLite has one writer and no row locks.
pub fn cancel_chunk_query(
    backend: DbBackend,
    batch_id: Uuid,
    reason: &str,
    at: DateTime<Utc>,
    limit: u64,
) -> UpdateStatement {
    let mut chosen = Query::select()
        .column(notification::Column::Id)
        .from(notification::Entity)
        .cond_where(
            Condition::all()
                .add(notification::Column::BatchId.eq(batch_id))
                .add(cancellable()),
        )
        .limit(limit)
        .to_owned();
    let which = if backend == DbBackend::Postgres {
        chosen.lock_with_behavior(LockType::Update, LockBehavior::SkipLocked);
        id_among_once(chosen)
    } else {
        notification::Column::Id.in_subquery(chosen)
    };
    let mut update = cancel_where(reason, at, which).into_query();
    update.returning(Query::returning().column(notification::Column::Id));
    update
}

/// `id = ANY(ARRAY(chosen))`, for PostgreSQL: the `LIMIT … FOR UPDATE SKIP LOCKED` read `chosen`
/// runs once, before the UPDATE it picks rows for. As `id IN (chosen)`, a semi-join, it may run
/// again for each row updated, find the rows it locked already updated, pass over them and lock
/// the next ones: a claim of 2 took 4.
fn id_among_once(chosen: SelectStatement) -> SimpleExpr {
    let once = PgFunc::any(Expr::cust_with_expr(
        "ARRAY $1",
        Expr::SubQuery(None, Box::new(chosen.into())),
    ));
    ExprTrait::eq(Expr::col(notification::Column::Id), once)
}

/// Whether some notification of batch `batch_id` is still cancellable (a plain read: it takes no
/// lock and waits for none).
pub async fn batch_has_cancellable(
    db: &impl ConnectionTrait,
    batch_id: Uuid,
) -> Result<bool, RepoError> {
    Ok(batch_cancellable_ids(batch_id)
        .limit(1)
        .into_tuple::<Uuid>()
        .one(db)
        .await?
        .is_some())
}

/// The ids of the notifications of batch `batch_id` still cancellable.
fn batch_cancellable_ids(batch_id: Uuid) -> Select<notification::Entity> {
    notification::Entity::find()
        .select_only()
        .column(notification::Column::Id)
        .filter(notification::Column::BatchId.eq(batch_id))
        .filter(cancellable())
}

/// Cancels, one at a time, the notifications of batch `batch_id` still cancellable once its
/// chunks ([`cancel_batch_chunk`]) find none: on PostgreSQL those the chunks passed over because
/// another transaction held them. Each cancel is a transaction of its own that changes one
/// notification, waiting for its lock if need be, then deletes the receipts held for it: it locks
/// the notification before its receipts, as holding a receipt does, so it cannot take part in a
/// deadlock. A row whose holder made it `processing` meanwhile is left as it is. On SQLite there
/// is normally none left; each cancel is taken in a turn of `gate`.
pub async fn cancel_batch_leftovers(
    db: &(impl ConnectionTrait + TransactionTrait),
    gate: &WriteGate,
    batch_id: Uuid,
    reason: &str,
) -> Result<CancelledChunk, RepoError> {
    let left: Vec<Uuid> = batch_cancellable_ids(batch_id).into_tuple().all(db).await?;
    let at = Utc::now().trunc_subsecs(6);
    let mut ids = Vec::new();
    for id in left {
        let _turn = gate.enter().await;
        if cancel_one(db, id, reason, at).await? {
            ids.push(id);
        }
    }
    Ok(CancelledChunk { ids, at })
}

/// Cancels notification `id` at `at` if it is cancellable and drops, in the same transaction, the
/// receipts held for it: whether it was cancelled.
async fn cancel_one(
    db: &impl TransactionTrait,
    id: Uuid,
    reason: &str,
    at: DateTime<Utc>,
) -> Result<bool, RepoError> {
    let txn = db.begin().await?;
    let moved = cancel_where(reason, at, notification::Column::Id.eq(id))
        .exec(&txn)
        .await?
        .rows_affected
        > 0;
    if moved {
        drop_held_of_unsent(&txn, &[id]).await?;
    }
    txn.commit().await?;
    Ok(moved)
}

/// The statuses a notification may be cancelled from (`scheduled`, `queued`; a dispatcher that
/// picked one up made it `processing`).
fn cancellable() -> Condition {
    Condition::all().add(
        notification::Column::Status.is_in(NotificationStatus::Cancelled.allowed_from().to_vec()),
    )
}

/// The UPDATE cancelling the notifications `which` selects among those still cancellable: those
/// whose status may become `cancelled` ([`cancellable`]), stamping them `at`.
fn cancel_where(
    reason: &str,
    at: DateTime<Utc>,
    which: impl sea_orm::sea_query::IntoCondition,
) -> sea_orm::UpdateMany<notification::Entity> {
    notification::Entity::update_many()
        .col_expr(
            notification::Column::Status,
            Expr::value(NotificationStatus::Cancelled),
        )
        .col_expr(notification::Column::StatusReason, Expr::value(reason))
        .col_expr(notification::Column::UpdatedAt, Expr::value(at))
        .filter(which)
        .filter(cancellable())
}

/// Final notifications last changed before `cutoff`, as [`purge_before`] reads and deletes them.
///
/// A notification is changed no earlier than it is created, so `created_at < cutoff` holds for
/// every such row; written out, it lets the database find them in `idx_notifications_created_at`
/// among the rows older than the retention (which retention keeps few) instead of reading the
/// whole table. A row created by one instance a moment (clock skew) after another recorded its
/// change waits for the next run.
fn old_and_final(cutoff: DateTime<Utc>) -> Condition {
    use NotificationStatus::*;
    Condition::all()
        .add(
            notification::Column::Status.is_in([Sent, Delivered, Failed, Skipped, Cancelled, Dead]),
        )
        .add(notification::Column::UpdatedAt.lt(cutoff))
        .add(notification::Column::CreatedAt.lt(cutoff))
}

/// The ids of up to `limit` final notifications last changed before `cutoff`: retention's read.
pub fn purge_query(cutoff: DateTime<Utc>, limit: u64) -> Select<notification::Entity> {
    notification::Entity::find()
        .select_only()
        .column(notification::Column::Id)
        .filter(old_and_final(cutoff))
        .limit(limit)
}

/// What one [`purge_before`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Purged {
    /// Notifications its read chose (at most its `limit`).
    pub chosen: u64,
    /// Notifications it deleted: those chosen that were still old and final.
    pub removed: u64,
}

/// Deletes up to `limit` final notifications last changed before `cutoff`, with their attempts
/// (`ON DELETE CASCADE`), and finished batches (done, failed, cancelled) older than `cutoff`. Returns how many notifications
/// it chose and how many went. The DELETE repeats the conditions of the read that chose them, so
/// a notification that moved meanwhile (a dead letter replayed to `queued`) is kept: fewer
/// removed than chosen does not mean that fewer are left.
pub async fn purge_before(
    db: &impl ConnectionTrait,
    cutoff: DateTime<Utc>,
    limit: u64,
) -> Result<Purged, RepoError> {
    let ids: Vec<Uuid> = purge_query(cutoff, limit).into_tuple().all(db).await?;
    let chosen = ids.len() as u64;
    let mut removed = 0;
    if !ids.is_empty() {
        removed = notification::Entity::delete_many()
            .filter(notification::Column::Id.is_in(ids))
            .filter(old_and_final(cutoff))
            .exec(db)
            .await?
            .rows_affected;
    }
    batch::Entity::delete_many()
        .filter(batch::Column::Status.is_in(["done", "failed", "cancelled"]))
        .filter(batch::Column::UpdatedAt.lt(cutoff))
        .exec(db)
        .await?;
    Ok(Purged { chosen, removed })
}
