//! Queries on `notifications` and their attempts.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, SubsecRound, Utc};
use herald_nats::{Category, SCHEMA_VERSION, SendCommand};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbErr, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
    QueryTrait, Select,
    sea_query::{OnConflict, Query, UpdateStatement},
};
use uuid::Uuid;

use super::schedule::PUBLISH_PENDING;
use super::{json_without_nul, without_nul};
use crate::{NotificationStatus, RepoError, delivery_attempt, notification};

/// A notification to store as accepted.
#[derive(Debug, Clone)]
pub struct NewNotification {
    /// Id, time-ordered (see [`crate::notification::Model::id`]).
    pub id: Uuid,
    /// The caller's idempotency key.
    pub request_id: Option<String>,
    /// The digest of the request stored under `request_id`, compared when the id is used again.
    pub request_fingerprint: Option<String>,
    /// Known customer's external id.
    pub customer_id: Option<String>,
    /// Partitioning key.
    pub recipient_key: String,
    /// Inline contacts (JSON).
    pub contacts: serde_json::Value,
    /// Category name.
    pub category: String,
    /// Channel chain (JSON array).
    pub channels: serde_json::Value,
    /// Content (JSON).
    pub content: serde_json::Value,
    /// Initial status (`queued`, or `scheduled`).
    pub status: NotificationStatus,
    /// When due, for scheduled ones.
    pub scheduled_at: Option<DateTime<Utc>>,
    /// Initial reason, such as [`super::schedule::PUBLISH_PENDING`] for an API send whose command
    /// is yet to be published.
    pub status_reason: Option<String>,
    /// Acceptance time.
    pub created_at: DateTime<Utc>,
}

/// The outcome of storing a new notification.
#[derive(Debug)]
pub enum Inserted {
    /// Stored as new.
    New(notification::Model),
    /// A notification with the same request id exists already; here it is.
    Duplicate(notification::Model),
}

/// Stores a new notification. A repeated request id is detected by the unique constraint (not by a
/// check before inserting), so concurrent duplicates resolve to one row. The conflict is skipped
/// (`ON CONFLICT (request_id) DO NOTHING`) rather than raised, so this can run inside a larger
/// transaction without aborting it on PostgreSQL. [`insert_together`] stores many at once; this
/// is its one-row case.
pub async fn insert(
    db: &impl ConnectionTrait,
    new: NewNotification,
) -> Result<Inserted, RepoError> {
    insert_together(db, vec![new])
        .await?
        .pop()
        .unwrap_or_else(|| Err(DbErr::RecordNotInserted.into()))
}

/// Stores `rows` as [`insert`] stores one, in one multi-row statement: each row's outcome, in the
/// order given. A request id stored before, or repeated within `rows` (also under the same id, as
/// a routed event handled twice at once), answers [`Inserted::Duplicate`] with the stored row,
/// read back after the statement. A row skipped for a request id whose stored row is gone by that
/// read-back (deleted in between: the API request that stored it withdrew it when its publish
/// failed) is stored again, once, in a second statement: the request id is free, as for a request
/// that came after the deletion. An `Err` means nothing was stored; an `Err` for one row means
/// that row was not stored: its repeat's stored row could not be read, or was deleted again.
/// One statement instead of one per row is what makes the API's group commit short (see
/// [`super::insert_queue`]), and it runs on its own, not in a transaction: a statement is atomic
/// by itself, and a BEGIN and a COMMIT would be two more round trips to the database inside the
/// batch writers' turn. The statement returns the ids of the rows it stored, not the rows: a new
/// row is what was written; reading the rows back (three JSON columns each) cost 3% of the
/// process's CPU at 2,000 API sends/s on SQLite.
pub async fn insert_together(
    db: &impl ConnectionTrait,
    rows: Vec<NewNotification>,
) -> Result<Vec<Result<Inserted, RepoError>>, RepoError> {
    let mut outcomes = Vec::with_capacity(rows.len());
    let mut gone = Vec::new();
    for outcome in insert_once(db, rows.into_iter().map(stored).collect()).await? {
        match outcome {
            Once::Answered(outcome) => outcomes.push(outcome),
            Once::Gone(model) => {
                gone.push((outcomes.len(), model));
                outcomes.push(Err(DbErr::RecordNotInserted.into()));
            }
        }
    }
    if gone.is_empty() {
        return Ok(outcomes);
    }
    let (at, models): (Vec<usize>, Vec<notification::Model>) = gone.into_iter().unzip();
    match insert_once(db, models).await {
        Ok(again) => {
            for (at, outcome) in at.into_iter().zip(again) {
                if let Once::Answered(outcome) = outcome {
                    outcomes[at] = outcome;
                }
            }
        }
        Err(err) => {
            for at in at {
                outcomes[at] = Err(err.clone());
            }
        }
    }
    Ok(outcomes)
}

/// A row's outcome of one statement of [`insert_together`].
enum Once {
    /// Stored, or skipped and answered with the row stored under its request id (or the error
    /// reading it).
    Answered(Result<Inserted, RepoError>),
    /// Skipped for its request id, whose stored row was gone by the read-back.
    Gone(notification::Model),
}

/// Stores `models` in one statement, skipping repeated request ids, and reads back the rows stored
/// under the request ids of those skipped: each row's outcome, in the order given.
async fn insert_once(
    db: &impl ConnectionTrait,
    models: Vec<notification::Model>,
) -> Result<Vec<Once>, RepoError> {
    if models.is_empty() {
        return Ok(Vec::new());
    }
    let mut inserted: HashSet<Uuid> = notification::Entity::insert_many(
        models
            .iter()
            .map(|model| notification::ActiveModel::from(model.clone())),
    )
    .on_conflict(skip_repeats())
    .exec_with_returning_keys(db)
    .await?
    .into_iter()
    .collect();
    // A returned id answers the first row with it (a row under the same id again would have
    // broken the primary key); every other row was skipped for its request id.
    let rows: Vec<(bool, notification::Model)> = models
        .into_iter()
        .map(|model| (inserted.remove(&model.id), model))
        .collect();
    let skipped: Vec<&str> = rows
        .iter()
        .filter(|(new, _)| !new)
        .filter_map(|(_, model)| model.request_id.as_deref())
        .collect();
    let existing = find_many_by_request_id(db, skipped).await;
    Ok(rows
        .into_iter()
        .map(|(new, model)| match (new, &existing) {
            (true, _) => Once::Answered(Ok(Inserted::New(model))),
            (false, Ok(existing)) => {
                match model.request_id.as_ref().and_then(|id| existing.get(id)) {
                    Some(stored) => Once::Answered(Ok(Inserted::Duplicate(stored.clone()))),
                    None => Once::Gone(model),
                }
            }
            (false, Err(err)) => Once::Answered(Err(err.clone())),
        })
        .collect())
}

/// The notification stored under this request id.
pub async fn find_by_request_id(
    db: &impl ConnectionTrait,
    request_id: &str,
) -> Result<Option<notification::Model>, RepoError> {
    let mut found = find_many_by_request_id(db, vec![request_id]).await?;
    Ok(found.remove(request_id))
}

/// The stored notifications with these request ids, by request id.
async fn find_many_by_request_id(
    db: &impl ConnectionTrait,
    request_ids: Vec<&str>,
) -> Result<HashMap<String, notification::Model>, RepoError> {
    if request_ids.is_empty() {
        return Ok(HashMap::new());
    }
    Ok(notification::Entity::find()
        .filter(notification::Column::RequestId.is_in(request_ids))
        .all(db)
        .await?
        .into_iter()
        .filter_map(|model| Some((model.request_id.clone()?, model)))
        .collect())
}

/// `ON CONFLICT (request_id) DO NOTHING`: a repeated request id is skipped, not an error.
fn skip_repeats() -> OnConflict {
    OnConflict::column(notification::Column::RequestId)
        .do_nothing()
        .to_owned()
}

/// Rebuilds the send command of a stored notification (to publish it again, or when it is due).
pub fn send_command(row: &notification::Model) -> Result<SendCommand, RepoError> {
    let category = Category::parse(&row.category).ok_or_else(|| RepoError::Json {
        column: "category",
        reason: format!("unknown category {:?}", row.category),
    })?;
    Ok(SendCommand {
        v: SCHEMA_VERSION,
        notification_id: row.id,
        customer_id: row.customer_id.clone(),
        contacts: json_column("contacts", &row.contacts)?,
        category,
        channels: json_column("channels", &row.channels)?,
        content: json_column("content", &row.content)?,
        created_at: row.created_at,
    })
}

fn json_column<T: serde::de::DeserializeOwned>(
    column: &'static str,
    value: &serde_json::Value,
) -> Result<T, RepoError> {
    serde_json::from_value(value.clone()).map_err(|e| RepoError::Json {
        column,
        reason: e.to_string(),
    })
}

/// Stores many new notifications in multi-row INSERTs (bulk and bench paths; no request ids).
pub async fn insert_many(
    db: &impl ConnectionTrait,
    rows: Vec<NewNotification>,
) -> Result<(), RepoError> {
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        let chunk: Vec<notification::ActiveModel> = rows.by_ref().take(500).map(active).collect();
        notification::Entity::insert_many(chunk)
            .exec_without_returning(db)
            .await?;
    }
    Ok(())
}

fn active(new: NewNotification) -> notification::ActiveModel {
    stored(new).into()
}

/// The row `new` is stored as. Times are kept to the microsecond, as PostgreSQL stores them, and
/// a NUL in its text or JSON (an event's variable rendered into content) becomes U+FFFD, which
/// PostgreSQL takes, so the row is the same whether it was written or read back, on either
/// database.
fn stored(new: NewNotification) -> notification::Model {
    let created_at = new.created_at.trunc_subsecs(6);
    notification::Model {
        id: new.id,
        request_id: new.request_id.map(without_nul),
        request_fingerprint: new.request_fingerprint,
        customer_id: new.customer_id.map(without_nul),
        recipient_key: without_nul(new.recipient_key),
        contacts: json_without_nul(new.contacts),
        category: without_nul(new.category),
        channels: json_without_nul(new.channels),
        content: json_without_nul(new.content),
        status: new.status,
        status_reason: new.status_reason.map(without_nul),
        scheduled_at: new.scheduled_at.map(|at| at.trunc_subsecs(6)),
        final_channel: None,
        attempts: 0,
        error: None,
        created_at,
        updated_at: created_at,
        sent_at: None,
        batch_id: None,
    }
}

/// The notification with this id, if any.
pub async fn find(
    db: &impl ConnectionTrait,
    id: Uuid,
) -> Result<Option<notification::Model>, RepoError> {
    Ok(notification::Entity::find_by_id(id).one(db).await?)
}

/// The second read of [`claim`]: id and status of `ids`, those it did not claim.
pub fn status_query(ids: &[Uuid]) -> Select<notification::Entity> {
    notification::Entity::find()
        .select_only()
        .column(notification::Column::Id)
        .column(notification::Column::Status)
        .filter(notification::Column::Id.is_in(ids.iter().copied()))
}

/// What a claim found for one notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claimed {
    /// Marked `processing` by this claim: deliver it. `attempts` were recorded before.
    Yours {
        /// Delivery attempts recorded so far (the highest attempt number).
        attempts: i32,
    },
    /// Already final (`cancelled`, or sent or given up by an earlier delivery): never send it.
    Final(NotificationStatus),
    /// Not final, yet not claimed: its status changed between the claim and the read of what the
    /// claim left (a dead letter requeued meanwhile, say). Claim it again later.
    Moved(NotificationStatus),
}

/// The claim's statement: `UPDATE notifications SET status = 'processing' … WHERE id IN (ids)
/// AND status IN ('queued', 'scheduled', 'processing') RETURNING id, attempts`.
pub fn claim_query(at: DateTime<Utc>, ids: &[Uuid]) -> UpdateStatement {
    let mut update = super::status_batch::processing_update(at, ids).into_query();
    update.returning(
        Query::returning().columns([notification::Column::Id, notification::Column::Attempts]),
    );
    update
}

/// Claims `ids` for delivery: each that may still go out (`queued`, `scheduled` or `processing`)
/// is marked `processing` in one statement ([`claim_query`]), so a cancel that comes after the
/// claim finds it picked up, and a claim after a cancel finds it `cancelled`. Every one of `ids`
/// that exists has an answer; the rest are unknown.
///
/// On SQLite the caller holds the write turn.
pub async fn claim(
    db: &impl ConnectionTrait,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, Claimed>, RepoError> {
    let mut found = HashMap::with_capacity(ids.len());
    for row in db.query_all(&claim_query(Utc::now(), ids)).await? {
        let (id, attempts): (Uuid, i32) = row.try_get_many_by_index()?;
        found.insert(id, Claimed::Yours { attempts });
    }
    if found.len() < ids.len() {
        let rest: Vec<Uuid> = ids
            .iter()
            .filter(|id| !found.contains_key(id))
            .copied()
            .collect();
        let statuses: Vec<(Uuid, NotificationStatus)> =
            status_query(&rest).into_tuple().all(db).await?;
        for (id, status) in statuses {
            let claimed = match status.is_final() {
                true => Claimed::Final(status),
                false => Claimed::Moved(status),
            };
            found.insert(id, claimed);
        }
    }
    Ok(found)
}

/// Statuses of an attempt on a channel that refused the notification for good: the provider
/// rejected it permanently, or the recipient has no contact on that channel.
pub const REFUSED_FOR_GOOD: [&str; 2] = ["rejected", "no_contact"];

/// The channels that refused notification `id` for good ([`REFUSED_FOR_GOOD`]) in its attempts
/// numbered after `after_attempt_no`: a later round of its delivery does not call them again.
pub async fn refused_channels(
    db: &impl ConnectionTrait,
    id: Uuid,
    after_attempt_no: i32,
) -> Result<HashSet<String>, RepoError> {
    let channels: Vec<String> = delivery_attempt::Entity::find()
        .select_only()
        .column(delivery_attempt::Column::Channel)
        .distinct()
        .filter(delivery_attempt::Column::NotificationId.eq(id))
        .filter(delivery_attempt::Column::AttemptNo.gt(after_attempt_no))
        .filter(delivery_attempt::Column::Status.is_in(REFUSED_FOR_GOOD))
        .into_tuple()
        .all(db)
        .await?;
    Ok(channels.into_iter().collect())
}

/// The notification and its attempts in the order they were made.
pub async fn find_with_attempts(
    db: &impl ConnectionTrait,
    id: Uuid,
) -> Result<Option<(notification::Model, Vec<delivery_attempt::Model>)>, RepoError> {
    let Some(found) = find(db, id).await? else {
        return Ok(None);
    };
    let attempts = delivery_attempt::Entity::find()
        .filter(delivery_attempt::Column::NotificationId.eq(id))
        .order_by_asc(delivery_attempt::Column::AttemptNo)
        .all(db)
        .await?;
    Ok(Some((found, attempts)))
}

/// Removes a notification that was stored but could not be published, so the caller's retry with
/// the same request id is accepted afresh rather than answered with a notification that never went
/// out. Only while it is `queued` with its [`PUBLISH_PENDING`] mark: a repeat of the request that
/// published the command meanwhile has cleared the mark ([`confirm_published_now`]) and answered
/// with this notification, which must then stay; so must one a dispatcher has claimed (its
/// command got out although the publish reported a failure: the acknowledgement was lost) or a
/// Scheduler has claimed to publish it.
///
/// `true` when it removed the notification; `false` when it was not there to remove in that
/// state: it stays and is going out (or went), and the request must be answered as accepted.
pub async fn delete_unpublished(db: &impl ConnectionTrait, id: Uuid) -> Result<bool, RepoError> {
    delete_queued(db, id, Some(PUBLISH_PENDING)).await
}

/// Removes a notification the Router stored whose command the NATS server refuses as larger than
/// its `max_payload`, so that a replay of the event renders it anew. Only while it is `queued`
/// without a `status_reason`, as the Router stores it: no dispatcher has claimed it and nothing
/// has marked it since. `true` when it removed the notification.
pub async fn delete_unsent(db: &impl ConnectionTrait, id: Uuid) -> Result<bool, RepoError> {
    delete_queued(db, id, None).await
}

/// Removes notification `id` while it is `queued` with `status_reason` (`None`: without one);
/// `true` when it did.
async fn delete_queued(
    db: &impl ConnectionTrait,
    id: Uuid,
    status_reason: Option<&str>,
) -> Result<bool, RepoError> {
    let reason = notification::Column::StatusReason;
    let deleted = notification::Entity::delete_many()
        .filter(notification::Column::Id.eq(id))
        .filter(notification::Column::Status.eq(NotificationStatus::Queued))
        .filter(status_reason.map_or(reason.is_null(), |marked| reason.eq(marked)))
        .exec(db)
        .await?;
    Ok(deleted.rows_affected > 0)
}

/// Clears notification `id`'s unconfirmed-publish mark at once, after a repeated request
/// published its command again. `false` when the notification is gone: the request that stored
/// it removed it after its own publish failed ([`delete_unpublished`]), so the repeat must not
/// answer with it.
pub async fn confirm_published_now(db: &impl ConnectionTrait, id: Uuid) -> Result<bool, RepoError> {
    let updated = notification::Entity::update_many()
        .col_expr(
            notification::Column::StatusReason,
            super::schedule::reason_without_first_publish_mark(),
        )
        .filter(notification::Column::Id.eq(id))
        .exec(db)
        .await?;
    Ok(updated.rows_affected > 0)
}
