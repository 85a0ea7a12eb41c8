//! Queries on `batches`, and the customer pages a batch's filter selects.

use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait, PaginatorTrait,
    QueryFilter, QueryOrder, QuerySelect, Select, TransactionTrait,
    sea_query::{Expr, ExprTrait, Func, OnConflict},
};
use uuid::Uuid;

use super::schedule::{
    CANCEL_CHUNK, CancelledChunk, batch_has_cancellable, cancel_batch_chunk, cancel_batch_leftovers,
};
use crate::{NotificationStatus, RepoError, WriteGate, batch, customer, notification};

/// A bulk send to store.
#[derive(Debug, Clone)]
pub struct NewBatch {
    /// Its id; the notification ids of the batch are derived from it.
    pub id: Uuid,
    /// The caller's idempotency key.
    pub request_id: Option<String>,
    /// The digest of the request stored under `request_id`, compared when the id is used again.
    pub request_fingerprint: Option<String>,
    /// What to send and to whom.
    pub spec: serde_json::Value,
    /// Recipients in the batch.
    pub total: i64,
    /// When it was accepted: its `created_at`, and for a filter the latest creation time of the
    /// customers it selects (those counted in `total`).
    pub accepted_at: DateTime<Utc>,
}

/// The outcome of storing a new batch.
#[derive(Debug)]
pub enum Created {
    /// Stored as new, `pending`.
    New(batch::Model),
    /// A batch with the same request id exists already (nothing was stored); here it is.
    Duplicate(batch::Model),
}

/// Stores a new batch as `pending`. A repeated request id is detected by the unique index (not
/// by a check before inserting), so concurrent repeats resolve to one batch; the conflict is
/// skipped (`ON CONFLICT (request_id) DO NOTHING`) and the batch stored first is read back.
pub async fn create(db: &impl ConnectionTrait, new: NewBatch) -> Result<Created, RepoError> {
    let now = new.accepted_at;
    let model = batch::Model {
        id: new.id,
        request_id: new.request_id,
        request_fingerprint: new.request_fingerprint,
        status: "pending".into(),
        spec: new.spec,
        total: new.total,
        published: 0,
        cursor: None,
        lease_until: None,
        error: None,
        created_at: now,
        updated_at: now,
    };
    let inserted = batch::Entity::insert(batch::ActiveModel::from(model.clone()))
        .on_conflict(
            OnConflict::column(batch::Column::RequestId)
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(db)
        .await?;
    if inserted == 1 {
        return Ok(Created::New(model));
    }
    // Skipped: only a request id can conflict (the id is new), and it is there.
    let existing = match &model.request_id {
        Some(request_id) => find_by_request_id(db, request_id).await?,
        None => None,
    };
    existing
        .map(Created::Duplicate)
        .ok_or_else(|| DbErr::RecordNotInserted.into())
}

/// The batch with this id.
pub async fn find(db: &impl ConnectionTrait, id: Uuid) -> Result<Option<batch::Model>, RepoError> {
    Ok(batch::Entity::find_by_id(id).one(db).await?)
}

/// The batch stored under this request id.
pub async fn find_by_request_id(
    db: &impl ConnectionTrait,
    request_id: &str,
) -> Result<Option<batch::Model>, RepoError> {
    Ok(batch::Entity::find()
        .filter(batch::Column::RequestId.eq(request_id))
        .one(db)
        .await?)
}

/// How many of the batch's notifications are in each status.
pub async fn status_counts(
    db: &impl ConnectionTrait,
    id: Uuid,
) -> Result<Vec<(NotificationStatus, i64)>, RepoError> {
    Ok(progress(id).into_tuple().all(db).await?)
}

/// The query behind [`status_counts`] (public so that tests can check how databases plan it).
pub fn progress(id: Uuid) -> Select<notification::Entity> {
    notification::Entity::find()
        .select_only()
        .column(notification::Column::Status)
        .column_as(notification::Column::Id.count(), "n")
        .filter(notification::Column::BatchId.eq(id))
        .group_by(notification::Column::Status)
}

/// Takes the lease of an unfinished batch nobody holds (or whose holder's lease ran out) until
/// `until`. The conditional UPDATE makes two instances never take one batch at once. `until` is
/// the holder's token: [`advance`], [`release`] and [`fail`] change the batch only while its
/// `lease_until` is still the one the holder set, so an instance whose lease ran out while it
/// worked, and was taken over, changes nothing.
pub async fn lease_next(
    db: &impl ConnectionTrait,
    now: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<Option<batch::Model>, RepoError> {
    let free = || {
        sea_orm::Condition::any()
            .add(batch::Column::LeaseUntil.is_null())
            .add(batch::Column::LeaseUntil.lt(now))
    };
    let candidates = batch::Entity::find()
        .filter(batch::Column::Status.is_in(["pending", "running"]))
        .filter(free())
        .order_by_asc(batch::Column::CreatedAt)
        .limit(4)
        .all(db)
        .await?;
    for candidate in candidates {
        // The status again: a batch cancelled since it was read stays cancelled.
        let taken = batch::Entity::update_many()
            .col_expr(batch::Column::LeaseUntil, Expr::value(until))
            .col_expr(batch::Column::Status, Expr::value("running"))
            .filter(batch::Column::Id.eq(candidate.id))
            .filter(batch::Column::Status.is_in(["pending", "running"]))
            .filter(free())
            .exec(db)
            .await?;
        if taken.rows_affected == 1 {
            return find(db, candidate.id).await;
        }
    }
    Ok(None)
}

/// Stores notifications of a page of the batch `id` whose lease `held` the caller holds, all or
/// none, and then renews the lease to end at `until()` (read once the rows are written: the
/// holder's token from then on); rows whose id exists already (a page redone after a restart, or
/// by another instance) are left as they are. Returns how many rows were new and the renewed
/// lease, or `None` when the lease is no longer `held` (it ran out and
/// another instance took the batch, or the batch was cancelled): then nothing is stored, and the
/// caller must stop.
///
/// The renewal is in the insert's transaction, so a cancel ([`cancel`]) either comes first and
/// the page stores nothing, or comes after and finds the page's notifications to cancel: on
/// PostgreSQL the two UPDATEs of the batch row wait for each other, and the cancel's UPDATE of
/// the notifications reads them once the page is committed.
pub async fn insert_page(
    db: &DatabaseConnection,
    id: Uuid,
    held: DateTime<Utc>,
    until: impl FnOnce() -> DateTime<Utc>,
    rows: Vec<notification::ActiveModel>,
) -> Result<Option<(u64, DateTime<Utc>)>, RepoError> {
    // One transaction: a page that fails half-way stores nothing, so whoever redoes it finds
    // every row it inserts new, and the count of new rows counts each notification once.
    let txn = db.begin().await?;
    let mut inserted = 0;
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        let chunk: Vec<notification::ActiveModel> = rows.by_ref().take(500).collect();
        inserted += notification::Entity::insert_many(chunk)
            .on_conflict(
                OnConflict::column(notification::Column::Id)
                    .do_nothing()
                    .to_owned(),
            )
            .exec_without_returning(&txn)
            .await?;
    }
    let until = until();
    if !renew(&txn, id, held, until).await? {
        txn.rollback().await?;
        return Ok(None);
    }
    txn.commit().await?;
    Ok(Some((inserted, until)))
}

/// Records a finished page of the batch whose lease `held` the caller holds (the `lease_until` it
/// set, by [`lease_next`] or its last [`advance`]): the new cursor, the running count, the lease
/// renewed until `lease_until`, which is the holder's token from then on, and `done` when it was
/// the last page, and the `error` of pages that failed before cleared. `false` when the lease is
/// no longer `held`: it ran out and another instance took the batch, which goes on from the cursor
/// it read; the caller must stop.
pub async fn advance(
    db: &impl ConnectionTrait,
    id: Uuid,
    held: DateTime<Utc>,
    cursor: &str,
    published: i64,
    done: bool,
    lease_until: DateTime<Utc>,
) -> Result<bool, RepoError> {
    let updated = batch::Entity::update_many()
        .col_expr(batch::Column::Cursor, Expr::value(cursor))
        .col_expr(batch::Column::Published, Expr::value(published))
        .col_expr(
            batch::Column::Status,
            Expr::value(if done { "done" } else { "running" }),
        )
        .col_expr(
            batch::Column::LeaseUntil,
            Expr::value((!done).then_some(lease_until)),
        )
        .col_expr(batch::Column::Error, Expr::value(Option::<String>::None))
        .col_expr(batch::Column::UpdatedAt, Expr::value(Utc::now()))
        .filter(batch::Column::Id.eq(id))
        .filter(batch::Column::Status.eq("running"))
        .filter(batch::Column::LeaseUntil.eq(held))
        .exec(db)
        .await?;
    Ok(updated.rows_affected > 0)
}

/// Gives up the lease `held` of a batch still in progress, so the next round anywhere takes it at
/// once. `false` when the lease was no longer `held` (see [`advance`]); the batch is left alone.
pub async fn release(
    db: &impl ConnectionTrait,
    id: Uuid,
    held: DateTime<Utc>,
) -> Result<bool, RepoError> {
    set_lease(db, id, held, None).await
}

/// Renews the lease `held` of a batch still in progress to end at `until`, mid-page (its
/// notifications stored, their publishes to come). `false` when the lease was no longer `held`
/// (see [`advance`]); the batch is left alone.
pub async fn renew(
    db: &impl ConnectionTrait,
    id: Uuid,
    held: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<bool, RepoError> {
    set_lease(db, id, held, Some(until)).await
}

/// Holds the batch back after a failed page: its lease `held` is shortened or lengthened to end
/// at `until`, so that no round anywhere takes it before then (the page rests before it is tried
/// again), and `error` says why, for the batch's view while it stays `running` ([`advance`]
/// clears it). `false` when the lease was no longer `held` (see [`advance`]); the batch is left
/// alone.
pub async fn hold(
    db: &impl ConnectionTrait,
    id: Uuid,
    held: DateTime<Utc>,
    until: DateTime<Utc>,
    error: &str,
) -> Result<bool, RepoError> {
    let updated = lease_update(id, held, Some(until))
        .col_expr(batch::Column::Error, Expr::value(error))
        .col_expr(batch::Column::UpdatedAt, Expr::value(Utc::now()))
        .exec(db)
        .await?;
    Ok(updated.rows_affected > 0)
}

/// Sets the lease `held` of a batch still in progress to `until` (`None`: free).
async fn set_lease(
    db: &impl ConnectionTrait,
    id: Uuid,
    held: DateTime<Utc>,
    until: Option<DateTime<Utc>>,
) -> Result<bool, RepoError> {
    let updated = lease_update(id, held, until).exec(db).await?;
    Ok(updated.rows_affected > 0)
}

/// The UPDATE setting the lease `held` of a batch still in progress to `until`.
fn lease_update(
    id: Uuid,
    held: DateTime<Utc>,
    until: Option<DateTime<Utc>>,
) -> sea_orm::UpdateMany<batch::Entity> {
    batch::Entity::update_many()
        .col_expr(batch::Column::LeaseUntil, Expr::value(until))
        .filter(batch::Column::Id.eq(id))
        .filter(batch::Column::Status.eq("running"))
        .filter(batch::Column::LeaseUntil.eq(held))
}

/// Marks the batch whose lease `held` the caller holds failed, with the reason. `false` when the
/// lease was no longer `held` (see [`advance`]); the batch is left alone.
pub async fn fail(
    db: &impl ConnectionTrait,
    id: Uuid,
    held: DateTime<Utc>,
    error: &str,
) -> Result<bool, RepoError> {
    let updated = batch::Entity::update_many()
        .col_expr(batch::Column::Status, Expr::value("failed"))
        .col_expr(batch::Column::Error, Expr::value(error))
        .col_expr(
            batch::Column::LeaseUntil,
            Expr::value(Option::<DateTime<Utc>>::None),
        )
        .col_expr(batch::Column::UpdatedAt, Expr::value(Utc::now()))
        .filter(batch::Column::Id.eq(id))
        .filter(batch::Column::LeaseUntil.eq(held))
        .exec(db)
        .await?;
    Ok(updated.rows_affected > 0)
}

/// The result of cancelling a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum BatchCancel {
    /// Cancelled now: the batch as it is (`cancelled`), and how many of its notifications were
    /// cancelled with it.
    Cancelled {
        /// The batch, now `cancelled`.
        batch: Box<batch::Model>,
        /// Its notifications cancelled by this request.
        notifications: u64,
    },
    /// No such batch.
    NotFound,
    /// Already `failed`, or `done` or `cancelled` with none of its notifications left to cancel:
    /// its status.
    NotCancellable(String),
}

/// The reason a batch cancel records on the notifications it cancels: asked for by
/// `POST /api/v1/batches/{id}/cancel` (and, for one that stopped half-way, finished by the
/// Scheduler with the same words, see [`unfinished_cancels`]).
pub const CANCELLED_BY_REQUEST: &str = "batch cancelled by API request";

/// How long a batch cancel's lease lasts (`lease_until` of a `cancelled` batch): renewed with each
/// of its transactions, and cleared when it is done; one that lapsed is a cancel that stopped
/// half-way.
const CANCEL_LEASE: chrono::TimeDelta = chrono::TimeDelta::seconds(15);

/// Up to `limit` batches whose cancel stopped half-way: `cancelled`, their cancel's lease lapsed
/// by `now` (its instance stopped, or the database failed, between two of its transactions).
/// Cancels of instances older than the lease leave none, and are not found.
pub async fn unfinished_cancels(
    db: &impl ConnectionTrait,
    now: DateTime<Utc>,
    limit: u64,
) -> Result<Vec<Uuid>, RepoError> {
    Ok(batch::Entity::find()
        .select_only()
        .column(batch::Column::Id)
        .filter(batch::Column::Status.eq("cancelled"))
        .filter(batch::Column::LeaseUntil.lt(now))
        .limit(limit)
        .into_tuple()
        .all(db)
        .await?)
}

/// Takes the lapsed lease of the cancel of batch `id` (see [`unfinished_cancels`]) at `now`, for
/// its 15 s lease: whether this caller got it (another instance may have been first).
pub async fn take_cancel(
    db: &impl ConnectionTrait,
    id: Uuid,
    now: DateTime<Utc>,
) -> Result<bool, RepoError> {
    let taken = cancel_lease(id, Some(now + CANCEL_LEASE))
        .filter(batch::Column::LeaseUntil.lt(now))
        .exec(db)
        .await?;
    Ok(taken.rows_affected == 1)
}

/// The UPDATE setting the lease of the cancel of batch `id`, while it is `cancelled`, to `until`
/// (`None`: the cancel is done).
fn cancel_lease(id: Uuid, until: Option<DateTime<Utc>>) -> sea_orm::UpdateMany<batch::Entity> {
    batch::Entity::update_many()
        .col_expr(batch::Column::LeaseUntil, Expr::value(until))
        .filter(batch::Column::Id.eq(id))
        .filter(batch::Column::Status.eq("cancelled"))
}

/// Renews the lease of the cancel of batch `id` for [`CANCEL_LEASE`] from now.
async fn renew_cancel(db: &impl ConnectionTrait, id: Uuid) -> Result<(), RepoError> {
    cancel_lease(id, Some(Utc::now() + CANCEL_LEASE))
        .exec(db)
        .await?;
    Ok(())
}

/// Clears the lease of the cancel of batch `id`: it is done.
async fn end_cancel(db: &impl ConnectionTrait, id: Uuid) -> Result<(), RepoError> {
    cancel_lease(id, None).exec(db).await?;
    Ok(())
}

/// Cancels batch `id`: a `pending` or `running` one stops its fan-out (it becomes `cancelled` and
/// its fan-out's lease gives way to the cancel's, so no round takes it and a page in flight
/// stores nothing more, see [`insert_page`], or changes it, see [`advance`]); a `done` one (every
/// notification created and queued), or a `cancelled` one whose cancel stopped half-way, becomes
/// (or stays) `cancelled` only when some of its notifications were still cancellable. Either way its
/// notifications still cancellable (`scheduled`, or `queued` and not yet picked up) are
/// cancelled with `reason`.
///
/// They are cancelled [`CANCEL_CHUNK`] at a time, each chunk a
/// transaction of its own taken in a turn of `gate`, so that a batch of any size never holds the
/// database (SQLite's single writer) for long: the batch's own change goes in the first one, and
/// `committed` is handed each chunk as soon as it is committed, even when a later one fails. A
/// notification a dispatcher picks up between two chunks is `processing` and goes out. On
/// PostgreSQL a chunk passes over the rows other transactions hold ([`cancel_batch_chunk`]);
/// once the chunks find none left, those still cancellable are cancelled one at a time
/// ([`cancel_batch_leftovers`], handed to `committed` as a last chunk).
///
/// While it runs, the batch holds the cancel's lease (15 s, renewed with each
/// transaction and cleared at the end): a cancel that stops half-way (its process stopped, the
/// database failed) leaves it to lapse, and the Scheduler finishes it ([`unfinished_cancels`]).
pub async fn cancel(
    db: &DatabaseConnection,
    gate: &WriteGate,
    id: Uuid,
    reason: &str,
    mut committed: impl FnMut(CancelledChunk),
) -> Result<BatchCancel, RepoError> {
    let first = match cancel_first_chunk(db, gate, id, reason).await? {
        Ok(first) => first,
        Err(refused) => return Ok(refused),
    };
    let mut notifications = 0;
    let mut chunk = first;
    while !chunk.ids.is_empty() {
        notifications += chunk.ids.len() as u64;
        committed(chunk);
        let _turn = gate.enter().await;
        let txn = db.begin().await?;
        renew_cancel(&txn, id).await?;
        chunk = cancel_batch_chunk(&txn, id, reason, CANCEL_CHUNK).await?;
        txn.commit().await?;
    }
    let leftovers = cancel_batch_leftovers(db, gate, id, reason).await?;
    if !leftovers.ids.is_empty() {
        notifications += leftovers.ids.len() as u64;
        committed(leftovers);
    }
    let _turn = gate.enter().await;
    end_cancel(db, id).await?;
    let batch = find(db, id)
        .await?
        .ok_or(DbErr::RecordNotFound(id.to_string()))?;
    Ok(BatchCancel::Cancelled {
        batch: Box::new(batch),
        notifications,
    })
}

/// The first transaction of [`cancel`]: the batch's change and its first chunk of notifications,
/// or why the batch is not cancelled (nothing changed).
async fn cancel_first_chunk(
    db: &DatabaseConnection,
    gate: &WriteGate,
    id: Uuid,
    reason: &str,
) -> Result<Result<CancelledChunk, BatchCancel>, RepoError> {
    let _turn = gate.enter().await;
    let txn = db.begin().await?;
    let stopped = set_cancelled(&txn, id, &["pending", "running"]).await?;
    if !stopped {
        match find(&txn, id).await? {
            None => return Ok(Err(BatchCancel::NotFound)),
            Some(batch) if !["done", "cancelled"].contains(&batch.status.as_str()) => {
                return Ok(Err(BatchCancel::NotCancellable(batch.status)));
            }
            Some(_) => {}
        }
    }
    let first = cancel_batch_chunk(&txn, id, reason, CANCEL_CHUNK).await?;
    if !stopped {
        // An empty first chunk may have passed over rows other transactions hold (PostgreSQL):
        // the batch is cancellable while some are left, for the leftovers to cancel.
        let left = !first.ids.is_empty() || batch_has_cancellable(&txn, id).await?;
        if !left || !set_cancelled(&txn, id, &["done", "cancelled"]).await? {
            txn.rollback().await?;
            let status = find(db, id)
                .await?
                .map_or_else(|| "done".into(), |b| b.status);
            if status == "cancelled" {
                // Nothing left: whatever cancel of it stopped half-way has nothing to finish.
                end_cancel(db, id).await?;
            }
            return Ok(Err(BatchCancel::NotCancellable(status)));
        }
    }
    txn.commit().await?;
    Ok(Ok(first))
}

/// Marks batch `id` `cancelled`, if its status is one of `from`, its lease (the fan-out's, if
/// it had one) now the cancel's ([`CANCEL_LEASE`]).
async fn set_cancelled(
    db: &impl ConnectionTrait,
    id: Uuid,
    from: &[&str],
) -> Result<bool, RepoError> {
    let updated = batch::Entity::update_many()
        .col_expr(batch::Column::Status, Expr::value("cancelled"))
        .col_expr(
            batch::Column::LeaseUntil,
            Expr::value(Some(Utc::now() + CANCEL_LEASE)),
        )
        .col_expr(batch::Column::UpdatedAt, Expr::value(Utc::now()))
        .filter(batch::Column::Id.eq(id))
        .filter(batch::Column::Status.is_in(from.iter().copied()))
        .exec(db)
        .await?;
    Ok(updated.rows_affected > 0)
}

/// A filter over customers for a bulk send.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CustomerFilter {
    /// Only customers whose locale is this language tag or one under it, in any case: `de`
    /// selects `de`, `de-DE` and `de-AT`; `de-DE` selects `de-DE` (RFC 4647 basic filtering).
    pub locale: Option<String>,
    /// Only customers whose external id starts with this.
    pub external_id_prefix: Option<String>,
    /// Only customers created at or before this: when the batch was accepted, so that its
    /// fan-out reaches those counted in its `total`, not customers created since.
    pub created_by: Option<DateTime<Utc>>,
}

impl CustomerFilter {
    fn condition(&self) -> sea_orm::Condition {
        let mut condition = sea_orm::Condition::all();
        if let Some(locale) = &self.locale {
            let tag = locale.to_ascii_lowercase();
            let stored = || Expr::expr(Func::lower(Expr::col(customer::Column::Locale)));
            condition = condition.add(
                sea_orm::Condition::any()
                    .add(stored().eq(tag.as_str()))
                    .add(begins_with(stored(), &format!("{tag}-"))),
            );
        }
        if let Some(prefix) = &self.external_id_prefix {
            condition = condition.add(begins_with(Expr::col(customer::Column::ExternalId), prefix));
        }
        if let Some(created_by) = self.created_by {
            condition = condition.add(customer::Column::CreatedAt.lte(created_by));
        }
        condition
    }
}

/// `value` begins with `prefix`, character for character, on both databases. Not `LIKE
/// 'prefix%'`: that reads a `_` or `%` in the prefix as a wildcard (`acme_` would select
/// `acme-2`), and SQLite's `LIKE` ignores the case of ASCII letters (`ACME_3`).
fn begins_with(value: Expr, prefix: &str) -> Expr {
    let length = i32::try_from(prefix.chars().count()).unwrap_or(i32::MAX);
    Expr::expr(Func::cust("substr").arg(value).arg(1).arg(length)).eq(prefix)
}

/// How many customers the filter selects.
pub async fn count_customers(
    db: &impl ConnectionTrait,
    filter: &CustomerFilter,
) -> Result<i64, RepoError> {
    let n = customer::Entity::find()
        .filter(filter.condition())
        .count(db)
        .await?;
    Ok(i64::try_from(n).unwrap_or(i64::MAX))
}

/// The next page of customers the filter selects, by external id after `after` (keyset paging:
/// stable while customers are added, and cheap at any depth).
pub async fn customers_page(
    db: &impl ConnectionTrait,
    filter: &CustomerFilter,
    after: Option<&str>,
    limit: u64,
) -> Result<Vec<customer::Model>, RepoError> {
    Ok(customers_page_query(filter, after, limit).all(db).await?)
}

/// The query behind [`customers_page`] (public so that tests can check how databases plan it).
pub fn customers_page_query(
    filter: &CustomerFilter,
    after: Option<&str>,
    limit: u64,
) -> Select<customer::Entity> {
    let mut query = customer::Entity::find().filter(filter.condition());
    if let Some(after) = after {
        query = query.filter(customer::Column::ExternalId.gt(after));
    }
    query
        .order_by_asc(customer::Column::ExternalId)
        .limit(limit)
}
