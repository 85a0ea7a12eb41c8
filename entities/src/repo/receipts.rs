//! Provider delivery receipts: `sent → delivered`, or `failed` on a bounce; held while the send
//! may be under way, and applied when it is recorded.

use chrono::{DateTime, Utc};
use herald_nats::{Channel, SCHEMA_VERSION, StatusEvent};
use sea_orm::{
    ActiveValue::Set,
    ColumnTrait, ConnectionTrait, DatabaseConnection, DatabaseTransaction, EntityTrait,
    FromQueryResult, QueryFilter, QueryResult, QuerySelect, QueryTrait, TransactionTrait,
    sea_query::{Expr, OnConflict, Query},
};
use uuid::Uuid;

use super::{status_batch::status_among, without_nul};
use crate::{NotificationStatus, RepoError, delivery_attempt, held_receipt, notification};

/// Notifications per lookup of held receipts; well under the bind-parameter limits.
const HELD_CHUNK: usize = 500;

/// The attempt status of a message a provider accepted.
const SENT: &str = "sent";

/// The status event of a receipt's move of `row` (now `delivered` or `failed`): dated when the
/// notification moved, so that a repeated receipt publishes the same event, whether it was applied
/// on arrival or held and applied when the send was recorded. `channel` is the receipt's own, for a
/// row that names none.
pub fn receipt_event(row: &notification::Model, channel: Option<Channel>) -> StatusEvent {
    StatusEvent {
        v: SCHEMA_VERSION,
        notification_id: row.id,
        status: row.status.as_str().to_string(),
        channel: row
            .final_channel
            .as_deref()
            .and_then(Channel::parse)
            .or(channel),
        error: row
            .error
            .clone()
            .filter(|_| row.status == NotificationStatus::Failed),
        at: row.updated_at,
    }
}

/// What a receipt did.
#[derive(Debug, Clone, PartialEq)]
pub enum ReceiptOutcome {
    /// The notification moved to the receipt's status; here it is now.
    Applied(notification::Model),
    /// It already had that status from an earlier receipt (a repeat); nothing changed.
    Unchanged(notification::Model),
    /// It is not sent yet, and no send of it is under way (`scheduled`): nothing changed.
    NotYetSent(notification::Model),
    /// Its send may be under way or done but not yet recorded (`queued`, `processing`): the
    /// receipt is held and applied, under the same rules, when the send is recorded (see
    /// [`apply`]); here is the notification as it stands. A repeat is held again (once).
    Held(notification::Model),
    /// Its send may be under way, and a receipt from the same provider with another status is
    /// held for it already: here it is; nothing changed. (Receipts from several providers are
    /// held side by side: failover may have handed the message to more than one.)
    HeldOther(held_receipt::Model),
    /// It ended (`failed`, `skipped`, `cancelled`, `dead`) without any provider accepting it, so
    /// no receipt is about it; nothing changed.
    NeverSent(notification::Model),
    /// It was sent, but not by the receipt's provider: here are the providers that accepted it
    /// (normally one); nothing changed.
    SentByOther(Vec<String>),
    /// It was sent by the receipt's provider, but its status does not allow the move (already
    /// `delivered` and now reported bounced, or already `failed` and now reported delivered);
    /// nothing changed.
    NotAllowed(notification::Model),
    /// No such notification.
    NotFound,
}

/// The notification a provider's message id names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageIdMatch {
    /// No successful attempt of the provider returned that id.
    None,
    /// The one notification whose successful attempt(s) of the provider returned that id.
    One(Uuid),
    /// Successful attempts of the provider for several notifications returned that id (provider
    /// ids need not be unique: an SMTP relay's reply text, a Telegram `message_id` is unique only
    /// per chat), so it does not say which one the receipt is about.
    Several,
}

/// The notification whose successful attempt on `provider` returned `provider_message_id`, if
/// exactly one did.
pub async fn find_by_provider_message_id(
    db: &impl ConnectionTrait,
    provider: &str,
    provider_message_id: &str,
) -> Result<MessageIdMatch, RepoError> {
    let sent_as = || {
        delivery_attempt::Entity::find()
            .select_only()
            .column(delivery_attempt::Column::NotificationId)
            .filter(delivery_attempt::Column::ProviderMessageId.eq(provider_message_id))
            .filter(delivery_attempt::Column::Provider.eq(provider))
            .filter(delivery_attempt::Column::Status.eq(SENT))
    };
    // Two lookups that each stop at the first row, rather than a DISTINCT over every attempt
    // with a reply text that a relay gives to all messages.
    let Some(first) = sent_as().into_tuple::<Uuid>().one(db).await? else {
        return Ok(MessageIdMatch::None);
    };
    let another = sent_as()
        .filter(delivery_attempt::Column::NotificationId.ne(first))
        .into_tuple::<Uuid>()
        .one(db)
        .await?;
    Ok(match another {
        Some(_) => MessageIdMatch::Several,
        None => MessageIdMatch::One(first),
    })
}

/// A receipt to apply: what a provider reported of a notification.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Receipt<'a> {
    /// The provider that reported it.
    pub provider: &'a str,
    /// The status it moves the notification to: `delivered`, or `failed` on a bounce.
    pub status: NotificationStatus,
    /// Why, in words.
    pub reason: &'a str,
    /// The provider's error, as kept.
    pub error: Option<&'a str>,
    /// When it happened, by the provider's clock (no later than now).
    pub at: DateTime<Utc>,
}

/// The statuses of a notification whose send may be under way, or done but not yet recorded:
/// a receipt for one is held ([`ReceiptOutcome::Held`]). `queued` too, as the StatusWriter may
/// write the move to `processing` in the same batch as the one to `sent`.
const SEND_UNDER_WAY: [NotificationStatus; 2] =
    [NotificationStatus::Queued, NotificationStatus::Processing];

/// Applies `receipt` to notification `id`: moves it to the receipt's status if it is `sent` and
/// the receipt's provider is the one that accepted it, or holds the receipt while its send may be
/// under way.
///
/// A receipt is about a message a provider accepted, so it applies only to a notification
/// recorded sent (`sent_at` set, which only the move to `sent` does), and only when it comes from
/// the provider whose successful attempt is recorded: a bounce applied earlier would end a queued
/// or scheduled notification `failed` unsent, or one whose `sent` is still on its way to the
/// database `failed` without its channel and time; one from another provider is about some other
/// message. An attempt is written in the transaction that records its notification's status, so
/// a notification recorded sent has its successful attempt recorded.
///
/// But a fast provider's receipt can beat the record of the send (the StatusWriter writes `sent`
/// a few milliseconds after the provider answered, longer under load), and providers do not send
/// again a receipt refused with a 4xx. So a receipt for a notification still `queued` or
/// `processing` is kept in `held_receipts` ([`ReceiptOutcome::Held`]) and applied, under these
/// same rules, in the transaction that records the send ([`super::status_batch::apply`]). The
/// hold takes the notification's row first (a no-op UPDATE, conditional on its status), so a
/// concurrent move to `sent` on another instance either waits for the hold and then finds it, or
/// went first, and the receipt is then applied here as to any sent notification.
///
/// The move itself is one conditional UPDATE (from `sent` only), so concurrent or repeated
/// receipts cannot move it backwards.
///
/// The change is dated `at`, but no earlier than the send (`sent_at`, or `updated_at` while still
/// `sent`): a provider's zero time, a replayed webhook or a clock behind would date it before
/// `sent_at`, and retention, which counts from `updated_at`, would purge the row at its next run.
pub async fn apply(
    db: &DatabaseConnection,
    id: Uuid,
    receipt: &Receipt<'_>,
) -> Result<ReceiptOutcome, RepoError> {
    let Some(mut before) = notification::Entity::find_by_id(id).one(db).await? else {
        return Ok(ReceiptOutcome::NotFound);
    };
    if before.sent_at.is_none() {
        if let Some(outcome) = hold(db, &before, receipt).await? {
            return Ok(outcome);
        }
        // It moved meanwhile (recorded sent, or ended): decided on as it is now.
        let Some(now) = notification::Entity::find_by_id(id).one(db).await? else {
            return Ok(ReceiptOutcome::NotFound);
        };
        before = now;
    }
    if before.sent_at.is_none() {
        return Ok(if before.status.is_final() {
            ReceiptOutcome::NeverSent(before)
        } else {
            ReceiptOutcome::NotYetSent(before)
        });
    }
    move_sent(db, &before, receipt).await
}

/// Holds `receipt` for `row`, a notification not recorded sent, if its send may be under way
/// ([`SEND_UNDER_WAY`]): `None` when it is not (any more), and nothing was held.
async fn hold(
    db: &DatabaseConnection,
    row: &notification::Model,
    receipt: &Receipt<'_>,
) -> Result<Option<ReceiptOutcome>, RepoError> {
    if !SEND_UNDER_WAY.contains(&row.status) {
        return Ok(None);
    }
    let txn = db.begin().await?;
    // Takes the row until the commit, if the send is still under way: the move to `sent` (an
    // UPDATE of this row) waits for it, and then finds the held receipt.
    let taken = notification::Entity::update_many()
        .col_expr(
            notification::Column::UpdatedAt,
            Expr::col(notification::Column::UpdatedAt),
        )
        .filter(notification::Column::Id.eq(row.id))
        .filter(status_among(&SEND_UNDER_WAY))
        .filter(notification::Column::SentAt.is_null())
        .exec(&txn)
        .await?
        .rows_affected;
    if taken == 0 {
        txn.rollback().await?;
        return Ok(None);
    }
    let provider = without_nul(receipt.provider.to_string());
    held_receipt::Entity::insert(held_receipt::ActiveModel {
        notification_id: Set(row.id),
        provider: Set(provider.clone()),
        status: Set(receipt.status),
        reason: Set(without_nul(receipt.reason.to_string())),
        error: Set(receipt.error.map(|error| without_nul(error.to_string()))),
        at: Set(receipt.at),
        received_at: Set(Utc::now()),
    })
    .on_conflict(
        OnConflict::columns([
            held_receipt::Column::NotificationId,
            held_receipt::Column::Provider,
        ])
        .do_nothing()
        .to_owned(),
    )
    .exec_without_returning(&txn)
    .await?;
    let held = held_receipt::Entity::find_by_id((row.id, provider))
        .one(&txn)
        .await?;
    txn.commit().await?;
    Ok(held.map(|held| {
        if held.status == receipt.status {
            ReceiptOutcome::Held(row.clone())
        } else {
            ReceiptOutcome::HeldOther(held)
        }
    }))
}

/// The move of `before`, a notification recorded sent, to `receipt`'s status: one conditional
/// UPDATE (from `sent` only) that answers the row it moved, if the receipt's provider is one that
/// accepted the message. Only a move that did not apply reads the notification again.
async fn move_sent(
    db: &impl ConnectionTrait,
    before: &notification::Model,
    receipt: &Receipt<'_>,
) -> Result<ReceiptOutcome, RepoError> {
    let id = before.id;
    let providers: Vec<String> = delivery_attempt::Entity::find()
        .select_only()
        .column(delivery_attempt::Column::Provider)
        .distinct()
        .filter(delivery_attempt::Column::NotificationId.eq(id))
        .filter(delivery_attempt::Column::Status.eq(SENT))
        .into_tuple()
        .all(db)
        .await?;
    if !providers.iter().any(|p| p == receipt.provider) {
        return Ok(ReceiptOutcome::SentByOther(providers));
    }
    let at = sent_floor(before).map_or(receipt.at, |floor| receipt.at.max(floor));
    let mut update = notification::Entity::update_many()
        .col_expr(notification::Column::Status, Expr::value(receipt.status))
        .col_expr(
            notification::Column::StatusReason,
            Expr::value(receipt.reason),
        )
        .col_expr(notification::Column::UpdatedAt, Expr::value(at))
        .filter(notification::Column::Id.eq(id))
        .filter(notification::Column::Status.eq(NotificationStatus::Sent));
    if let Some(error) = receipt.error {
        update = update.col_expr(notification::Column::Error, Expr::value(error));
    }
    match update.exec_with_returning(db).await?.pop() {
        Some(now) => Ok(ReceiptOutcome::Applied(now)),
        None => outcome_as_now(db, id, receipt).await,
    }
}

/// The outcome of a move of notification `id` by `receipt` that did not apply (it was no longer
/// `sent`), with the notification as it is now.
async fn outcome_as_now(
    db: &impl ConnectionTrait,
    id: Uuid,
    receipt: &Receipt<'_>,
) -> Result<ReceiptOutcome, RepoError> {
    let Some(now) = notification::Entity::find_by_id(id).one(db).await? else {
        return Ok(ReceiptOutcome::NotFound);
    };
    // Sent, a notification leaves `sent` only by a receipt: having the receipt's status, it had
    // this receipt (or its like) before.
    Ok(if now.status == receipt.status {
        ReceiptOutcome::Unchanged(now)
    } else {
        ReceiptOutcome::NotAllowed(now)
    })
}

/// Applies the receipts held for `sent`, notifications just moved to `sent` in `txn` (see
/// [`apply`]), under the usual rules, and deletes them: the notifications they moved, as they are
/// now. Of the receipts held for one notification (one per provider), the one from the provider
/// whose attempt is recorded `sent` applies; the others (another provider accepted the message)
/// are dropped, and logged.
///
/// A held receipt that cannot be applied (unreadable, or refused by the database) never costs
/// the batch its `sent`: each is applied under a savepoint, and one that fails other than by an
/// outage is undone, dropped, logged and counted (`herald_held_receipts_dropped_total`). An
/// outage fails the batch, as any of its statements would.
///
/// Run only when something is held ([`any_held`]): each chunk of `sent` takes its held receipts
/// with one `DELETE … RETURNING` ([`take_held`]).
pub(crate) async fn apply_held(
    txn: &DatabaseTransaction,
    sent: &[Uuid],
) -> Result<Vec<notification::Model>, RepoError> {
    let mut moved = Vec::new();
    for row in take_held(txn, sent).await? {
        match held_receipt::Model::from_query_result(&row, "") {
            Ok(held) => moved.extend(apply_one_held(txn, &held).await?),
            Err(error) => dropped(&error.into(), None),
        }
    }
    Ok(moved)
}

/// Whether any receipt is held at all: one read of at most one row. Nearly always none is, and a
/// batch that reads this once skips every other statement about held receipts.
pub(crate) async fn any_held(db: &impl ConnectionTrait) -> Result<bool, RepoError> {
    let one = held_receipt::Entity::find()
        .select_only()
        .column(held_receipt::Column::NotificationId)
        .limit(1)
        .into_tuple::<Uuid>()
        .one(db)
        .await?;
    Ok(one.is_some())
}

/// Deletes the receipts held for `ids`, one `DELETE … RETURNING` per chunk of them, and answers
/// the rows deleted.
async fn take_held(db: &impl ConnectionTrait, ids: &[Uuid]) -> Result<Vec<QueryResult>, RepoError> {
    let mut rows = Vec::new();
    for chunk in ids.chunks(HELD_CHUNK) {
        let take = held_receipt::Entity::delete_many()
            .filter(held_receipt::Column::NotificationId.is_in(chunk.iter().copied()));
        rows.extend(delete_returning(db, take).await?);
    }
    Ok(rows)
}

/// Runs `take`, a DELETE of held receipts, and answers the rows it deleted, whole.
async fn delete_returning(
    db: &impl ConnectionTrait,
    take: sea_orm::DeleteMany<held_receipt::Entity>,
) -> Result<Vec<QueryResult>, RepoError> {
    let mut take = take.into_query();
    take.returning_all();
    Ok(db.query_all(&take).await?)
}

/// Applies `held`, already taken from `held_receipts`, under a savepoint of `txn`: the
/// notification it moved, as it is now. One that does not apply, or fails other than by an
/// outage, is dropped (logged); an outage is an error.
async fn apply_one_held(
    txn: &DatabaseTransaction,
    held: &held_receipt::Model,
) -> Result<Option<notification::Model>, RepoError> {
    let savepoint = txn.begin().await?;
    let outcome = match apply_held_receipt(&savepoint, held).await {
        Ok(outcome) => outcome,
        Err(error) if error.is_outage() => return Err(error),
        Err(error) => {
            savepoint.rollback().await?;
            dropped(&error, Some(held));
            return Ok(None);
        }
    };
    savepoint.commit().await?;
    Ok(match outcome {
        ReceiptOutcome::Applied(row) => Some(row),
        outcome => {
            tracing::warn!(
                id = %held.notification_id,
                provider = %held.provider,
                ?outcome,
                "a receipt held until the send was recorded does not apply to it"
            );
            None
        }
    })
}

/// Applies `held` to its notification in `txn`.
async fn apply_held_receipt(
    txn: &DatabaseTransaction,
    held: &held_receipt::Model,
) -> Result<ReceiptOutcome, RepoError> {
    let Some(row) = notification::Entity::find_by_id(held.notification_id)
        .one(txn)
        .await?
    else {
        return Ok(ReceiptOutcome::NotFound);
    };
    let receipt = Receipt {
        provider: &held.provider,
        status: held.status,
        reason: &held.reason,
        error: held.error.as_deref(),
        at: held.at,
    };
    move_sent(txn, &row, &receipt).await
}

/// Why a held receipt was dropped unapplied: the `reason` label of
/// `herald_held_receipts_dropped_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DropReason {
    /// It could not be applied when the send was recorded (unreadable, or refused by the
    /// database).
    Error,
    /// Its notification ended without being sent (`failed`, `skipped`, `cancelled`, `dead`).
    Unsent,
    /// The clean-up found it stranded: its notification final ([`drop_stranded`]).
    Stranded,
}

impl DropReason {
    /// The label value.
    fn as_str(self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::Unsent => "unsent",
            Self::Stranded => "stranded",
        }
    }
}

/// Counts a held receipt dropped unapplied, for `reason`.
fn count_dropped(reason: DropReason) {
    metrics::counter!("herald_held_receipts_dropped_total", "reason" => reason.as_str())
        .increment(1);
}

/// Logs and counts a held receipt dropped because it could not be applied (`held`, if it could
/// be read).
fn dropped(error: &RepoError, held: Option<&held_receipt::Model>) {
    count_dropped(DropReason::Error);
    tracing::error!(
        id = ?held.map(|held| held.notification_id),
        provider = ?held.map(|held| &held.provider),
        %error,
        "a receipt held until the send was recorded could not be applied; dropped"
    );
}

/// Deletes the receipts held for `ended`, notifications that `txn` just moved to a final status
/// other than `sent` (`failed`, `skipped`, `cancelled`, `dead`): no send of theirs will be
/// recorded to apply them. Each is logged and counted (`herald_held_receipts_dropped_total`,
/// `reason="unsent"`). Run in the transaction of the move: a hold either committed before the move
/// (which waits for the row it took) and is deleted here, or comes after it and finds the
/// notification no longer under way, and holds nothing.
///
/// Nearly always nothing is held: one read of at most one row says so ([`any_held`]), and nothing
/// else is done. A batch that has read it already calls [`drop_held_of_ended`].
pub(crate) async fn drop_held_of_unsent(
    txn: &impl ConnectionTrait,
    ended: &[Uuid],
) -> Result<(), RepoError> {
    if ended.is_empty() || !any_held(txn).await? {
        return Ok(());
    }
    drop_held_of_ended(txn, ended).await
}

/// [`drop_held_of_unsent`] without its check that anything is held: each chunk of `ended` takes
/// its held receipts with one `DELETE … RETURNING` ([`take_held`]).
pub(crate) async fn drop_held_of_ended(
    txn: &impl ConnectionTrait,
    ended: &[Uuid],
) -> Result<(), RepoError> {
    log_dropped(&take_held(txn, ended).await?, DropReason::Unsent);
    Ok(())
}

/// Deletes the held receipts that no send will apply: those whose notification is
/// final (`sent` or later, or ended unsent), each logged and counted
/// (`herald_held_receipts_dropped_total`, `reason="stranded"`). Answers how many went.
///
/// The moves that end a notification drop its held receipts themselves (`apply_held`,
/// `drop_held_of_unsent`); this removes those that something else left behind (an earlier
/// version, a row changed by hand), so that none lingers for ever and keeps the cheap check
/// (`any_held`) from saying that nothing is held. A receipt held for a notification that may
/// still be sent (`queued`, `scheduled`, `processing`) is kept. Run by the retention clean-up.
pub async fn drop_stranded(db: &impl ConnectionTrait) -> Result<u64, RepoError> {
    use sea_orm::sea_query::ExprTrait;
    if !any_held(db).await? {
        return Ok(0);
    }
    let may_apply = Query::select()
        .expr(Expr::val(1))
        .from(notification::Entity)
        .and_where(
            Expr::col((notification::Entity, notification::Column::Id))
                .equals((held_receipt::Entity, held_receipt::Column::NotificationId)),
        )
        .and_where(
            Expr::col((notification::Entity, notification::Column::Status))
                .is_in(NotificationStatus::NOT_FINAL.map(|status| status.as_str())),
        )
        .to_owned();
    let take = held_receipt::Entity::delete_many().filter(Expr::exists(may_apply).not());
    Ok(log_dropped(
        &delete_returning(db, take).await?,
        DropReason::Stranded,
    ))
}

/// Logs and counts each of `rows`, held receipts just deleted, as dropped for `reason`; answers
/// how many. Reading a row is best-effort: one that does not read is logged without its
/// notification or provider, and counted all the same, so that an odd row never costs the
/// statement that deleted it (a batch its `sent`).
fn log_dropped(rows: &[QueryResult], reason: DropReason) -> u64 {
    for row in rows {
        let id = row.try_get::<Uuid>("", "notification_id").ok();
        let provider = row.try_get::<String>("", "provider").ok();
        count_dropped(reason);
        tracing::warn!(
            ?id,
            ?provider,
            reason = reason.as_str(),
            "a receipt held until the send was recorded will never apply; dropped"
        );
    }
    rows.len() as u64
}

/// The earliest time a receipt may date a change of `row`: when it was sent (its `updated_at`
/// while still `sent`, which the move to `sent` set).
fn sent_floor(row: &notification::Model) -> Option<DateTime<Utc>> {
    let updated = (row.status == NotificationStatus::Sent).then_some(row.updated_at);
    row.sent_at.max(updated)
}
