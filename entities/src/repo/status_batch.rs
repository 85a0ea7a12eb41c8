//! Batched status changes and attempt rows, written in one transaction by the StatusWriter.

use std::collections::HashSet;

use chrono::{DateTime, SecondsFormat, Utc};
use herald_nats::ids::derived_id;
use sea_orm::{
    ActiveValue::Set,
    ColumnTrait, Condition, ConnectionTrait, DatabaseConnection, DatabaseTransaction, EntityTrait,
    QueryFilter, QueryTrait, TransactionTrait,
    sea_query::{Expr, ExprTrait, Func, OnConflict, Query},
};
use uuid::Uuid;

use super::without_nul;
use crate::{NotificationStatus, RepoError, delivery_attempt, notification};

/// Rows per multi-row INSERT; well under SQLite's and PostgreSQL's bind-parameter limits.
const INSERT_CHUNK: usize = 500;

/// Longest provider message id stored, in characters: the longest a delivery receipt may name
/// (the receipt API's `max_length`), so receipts find every id they can carry.
///
/// `delivery_attempts.provider_message_id` is indexed for receipts, and PostgreSQL refuses an
/// index entry over 2,704 bytes (SQLSTATE 54000): a provider's reply with a longer id failed the
/// attempt's row, and with it the status of a message that was sent. 500 characters are at most
/// 2,000 bytes.
pub const PROVIDER_MESSAGE_ID_MAX_CHARS: usize = 500;

/// Changes of one shape share an UPDATE only if they happened within the same window of this
/// many milliseconds, so a recorded time (`sent_at`, `updated_at`) is at most this much later
/// than the change itself, however long the batch gathered.
const TIME_WINDOW_MS: i64 = 10;

/// A status to move a notification to.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusChange {
    /// The notification.
    pub id: Uuid,
    /// Its new status; applied only if the current one is in [`NotificationStatus::allowed_from`].
    pub status: NotificationStatus,
    /// Why (skipped, deferred, failed), in words.
    pub reason: Option<String>,
    /// The channel that carried it.
    pub final_channel: Option<String>,
    /// The last error.
    pub error: Option<String>,
    /// Attempts made so far, when known.
    pub attempts: Option<i32>,
    /// When a change to `scheduled` is due.
    pub scheduled_at: Option<DateTime<Utc>>,
    /// When the change happened.
    pub at: DateTime<Utc>,
}

impl StatusChange {
    /// A change to `status` now, with nothing else.
    pub fn to(id: Uuid, status: NotificationStatus) -> Self {
        Self {
            id,
            status,
            reason: None,
            final_channel: None,
            error: None,
            attempts: None,
            scheduled_at: None,
            at: Utc::now(),
        }
    }
}

/// One delivery attempt to record.
#[derive(Debug, Clone, PartialEq)]
pub struct NewAttempt {
    /// The notification.
    pub notification_id: Uuid,
    /// Number of the attempt within the notification.
    pub attempt_no: i32,
    /// Channel name.
    pub channel: String,
    /// Provider name.
    pub provider: String,
    /// Outcome (`sent`, `failed`, `rejected`, `circuit_open`, `not_started`, `no_contact`,
    /// `unavailable`, `opted_out`, `refused_earlier`).
    pub status: String,
    /// Error text.
    pub error: Option<String>,
    /// Provider's message id.
    pub provider_message_id: Option<String>,
    /// Provider latency in milliseconds.
    pub latency_ms: i64,
    /// When it finished.
    pub at: DateTime<Utc>,
}

impl NewAttempt {
    /// The attempt's row id, the same each time this attempt is written: made of its
    /// notification, its number and when it finished (so two attempts that a race gave the same
    /// number stay two rows), sorting among UUIDv7s at that time.
    pub fn id(&self) -> Uuid {
        let name = format!(
            "attempt {} {}",
            self.attempt_no,
            self.at.to_rfc3339_opts(SecondsFormat::Nanos, true)
        );
        derived_id(self.at, &self.notification_id, name.as_bytes())
    }
}

/// Which changes of a batch moved their notification (see [`apply`]), and the receipts held for
/// the notifications it recorded sent that it applied.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Applied {
    /// `moved[i]`: whether the batch's `i`-th change moved its notification.
    moved: Vec<bool>,
    /// The notifications a held receipt moved on from `sent`, as they are now.
    receipts: Vec<notification::Model>,
}

impl Applied {
    /// Whether the batch's `index`-th change moved its notification.
    pub fn moved(&self, index: usize) -> bool {
        self.moved.get(index).copied().unwrap_or(false)
    }

    /// The changes among `changes` (the batch, as given to [`apply`]) that moved their
    /// notification, in order.
    pub fn moved_changes<'a>(
        &'a self,
        changes: &'a [StatusChange],
    ) -> impl Iterator<Item = &'a StatusChange> + 'a {
        changes
            .iter()
            .enumerate()
            .filter_map(|(i, change)| self.moved(i).then_some(change))
    }

    /// The notifications that a receipt held until their send was recorded moved on from `sent`
    /// (to `delivered` or `failed`) in the batch's transaction, as they are now.
    pub fn receipts(&self) -> &[notification::Model] {
        &self.receipts
    }
}

impl From<Vec<bool>> for Applied {
    /// `moved[i]`: whether the batch's `i`-th change moved its notification (for a stand-in of
    /// the database).
    fn from(moved: Vec<bool>) -> Self {
        Self {
            moved,
            receipts: Vec::new(),
        }
    }
}

/// `changes` as [`apply`] writes them: each with `at` set to the time its UPDATE stamps the row
/// with (`updated_at`, and `sent_at` for `sent`), which is the latest time among the changes it
/// shares that UPDATE with, so up to 10 ms later than its own. A `processing`
/// change that a later one of the same notification replaces is not written and keeps its time.
///
/// Changes of a batch whose outcome is unknown, applied again apart from each other (a record at
/// a time, after the batch as a whole failed), must be given as this: [`apply_again`] recognises
/// a change the batch made by the time the batch stamped it with, which a change alone or among
/// others would not be stamped with.
pub fn as_stamped(changes: &[StatusChange]) -> Vec<StatusChange> {
    let mut stamped = changes.to_vec();
    for group in plan(changes) {
        for index in group.indexes {
            stamped[index].at = group.at;
        }
    }
    stamped
}

/// Writes attempts and applies status changes in one transaction, in the order given, and tells
/// which changes moved their notification. Receipts held for a notification it records `sent`
/// (a provider's receipt that beat this record) are applied in the same transaction
/// ([`Applied::receipts`]); those held for one it ends otherwise (`failed`, `skipped`, `dead`,
/// `cancelled`) are dropped, as no send of it will be recorded to apply them. A NUL in the text of
/// an attempt (a provider's reply) is stored as U+FFFD, which PostgreSQL takes.
///
/// A change the transition rules refuse ([`NotificationStatus::allowed_from`]: a late failure of
/// a second delivery after the first recorded `sent`) changes nothing and did not move; nor did a
/// `processing` change that a later change of the same notification in the batch replaces. An
/// UPDATE that changed as many rows as it names moved them all, the usual case; one that changed
/// fewer is undone to a savepoint and done again reporting its rows (`RETURNING id`).
///
/// Applying the same changes and attempts again changes nothing more: an attempt's id is derived
/// from it ([`NewAttempt::id`]) and an attempt already stored is skipped, so a batch whose commit
/// went through unconfirmed (the connection lost during `COMMIT`), written again, records each
/// attempt once. Write such a batch again with [`apply_again`], not this: here its changes would
/// count as refused.
pub async fn apply(
    db: &DatabaseConnection,
    changes: &[StatusChange],
    attempts: &[NewAttempt],
) -> Result<Applied, RepoError> {
    apply_batch(db, changes, attempts, false).await
}

/// [`apply`] for a batch written again because the outcome of the earlier write is unknown (an
/// outage during it, maybe after its `COMMIT` went through): a change counts as moved also when
/// its notification already holds exactly what this batch wrote (its status, stamped with this
/// batch's time for it), so the status events of a commit that went through unconfirmed are
/// published after all, under the same ids (JetStream drops those that were out already). A `sent`
/// whose held receipt that commit applied (the notification now `delivered` or `failed`, sent at
/// this batch's time) counts as moved, and the receipt's move is reported again
/// ([`Applied::receipts`]).
pub async fn apply_again(
    db: &DatabaseConnection,
    changes: &[StatusChange],
    attempts: &[NewAttempt],
) -> Result<Applied, RepoError> {
    apply_batch(db, changes, attempts, true).await
}

async fn apply_batch(
    db: &DatabaseConnection,
    changes: &[StatusChange],
    attempts: &[NewAttempt],
    again: bool,
) -> Result<Applied, RepoError> {
    let txn = db.begin().await?;
    for chunk in attempts.chunks(INSERT_CHUNK) {
        let rows = chunk.iter().map(|a| delivery_attempt::ActiveModel {
            id: Set(a.id()),
            notification_id: Set(a.notification_id),
            attempt_no: Set(a.attempt_no),
            channel: Set(without_nul(a.channel.clone())),
            provider: Set(without_nul(a.provider.clone())),
            status: Set(without_nul(a.status.clone())),
            error: Set(a.error.clone().map(without_nul)),
            provider_message_id: Set(a.provider_message_id.clone().map(stored_message_id)),
            latency_ms: Set(a.latency_ms),
            created_at: Set(a.at),
        });
        delivery_attempt::Entity::insert_many(rows)
            .on_conflict(
                OnConflict::column(delivery_attempt::Column::Id)
                    .do_nothing()
                    .to_owned(),
            )
            .exec_without_returning(&txn)
            .await?;
    }
    let mut applied = Applied::from(vec![false; changes.len()]);
    let mut sent_already = Vec::new();
    for group in plan(changes) {
        for (ids, indexes) in group
            .ids
            .chunks(INSERT_CHUNK)
            .zip(group.indexes.chunks(INSERT_CHUNK))
        {
            let moved = group.shape.apply_to(&txn, group.at, ids, again).await?;
            for (id, &index) in ids.iter().zip(indexes) {
                applied.moved[index] = moved.as_ref().is_none_or(|moved| moved.contains(id));
                if again && !applied.moved[index] && group.shape.status == NotificationStatus::Sent
                {
                    sent_already.push((group.at, *id, index));
                }
            }
        }
    }
    let sent: Vec<Uuid> = applied
        .moved_changes(changes)
        .filter(|change| change.status == NotificationStatus::Sent)
        .map(|change| change.id)
        .collect();
    let ended: Vec<Uuid> = applied
        .moved_changes(changes)
        .filter(|change| change.status.is_final() && !change.status.is_sent())
        .map(|change| change.id)
        .collect();
    // One read for both: nearly always nothing is held.
    if !(sent.is_empty() && ended.is_empty()) && super::receipts::any_held(&txn).await? {
        applied.receipts = super::receipts::apply_held(&txn, &sent).await?;
        super::receipts::drop_held_of_ended(&txn, &ended).await?;
    }
    for (at, id, index) in sent_already {
        if let Some(row) = moved_on_by_held_receipt(&txn, at, id).await? {
            applied.moved[index] = true;
            applied.receipts.push(row);
        }
    }
    txn.commit().await?;
    Ok(applied)
}

/// For a batch written again ([`apply_again`]): notification `id` as it is now, if this batch's
/// `sent` (at `at`) went through in the earlier, unconfirmed commit and a held receipt it applied
/// there moved it on (to `delivered` or `failed`); the status no longer shows the `sent`, and the
/// held receipt is gone. Rare (a lost `COMMIT`), so a read per such change.
async fn moved_on_by_held_receipt(
    txn: &DatabaseTransaction,
    at: DateTime<Utc>,
    id: Uuid,
) -> Result<Option<notification::Model>, RepoError> {
    Ok(notification::Entity::find_by_id(id)
        .filter(notification::Column::SentAt.eq(at))
        .filter(status_among(&[
            NotificationStatus::Delivered,
            NotificationStatus::Failed,
        ]))
        .one(txn)
        .await?)
}

/// A provider's message id as stored: without NUL, cut to [`PROVIDER_MESSAGE_ID_MAX_CHARS`]
/// characters.
fn stored_message_id(mut id: String) -> String {
    if let Some((end, _)) = id.char_indices().nth(PROVIDER_MESSAGE_ID_MAX_CHARS) {
        id.truncate(end);
    }
    without_nul(id)
}

/// The new values of a status change; changes with equal shapes share one UPDATE.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Shape {
    status: NotificationStatus,
    reason: Option<String>,
    final_channel: Option<String>,
    error: Option<String>,
    attempts: Option<i32>,
    scheduled_at: Option<DateTime<Utc>>,
}

impl Shape {
    fn of(change: &StatusChange) -> Self {
        Self {
            status: change.status,
            reason: change.reason.clone().map(without_nul),
            final_channel: change.final_channel.clone().map(without_nul),
            error: change.error.clone().map(without_nul),
            attempts: change.attempts,
            scheduled_at: change.scheduled_at,
        }
    }

    /// Applies this shape to `ids` in `txn` ([`Shape::update_where`]) and answers which rows it
    /// moved: `None` for all of them. An UPDATE that changed as many rows as it names moved them
    /// all, the usual case; one that changed fewer is undone (to a savepoint) and done again
    /// reporting its rows (`RETURNING id`, which measured 6% more CPU per notification in the
    /// bench when every UPDATE did it).
    async fn apply_to(
        &self,
        txn: &DatabaseTransaction,
        at: DateTime<Utc>,
        ids: &[Uuid],
        again: bool,
    ) -> Result<Option<HashSet<Uuid>>, RepoError> {
        let first = txn.begin().await?;
        let updated = self.update_where(at, ids, again).exec(&first).await?;
        if updated.rows_affected == ids.len() as u64 {
            first.commit().await?;
            return Ok(None);
        }
        first.rollback().await?;
        let mut update = self.update_where(at, ids, again).into_query();
        update.returning(Query::returning().column(notification::Column::Id));
        let mut moved = HashSet::with_capacity(ids.len());
        for row in txn.query_all(&update).await? {
            moved.insert(row.try_get_by_index::<Uuid>(0)?);
        }
        Ok(Some(moved))
    }

    /// `UPDATE notifications SET … WHERE id IN (ids) AND status IN (allowed_from)`.
    fn update(&self, at: DateTime<Utc>, ids: &[Uuid]) -> sea_orm::UpdateMany<notification::Entity> {
        self.update_where(at, ids, false)
    }

    /// [`Shape::update`]; `again` (the batch written again, see [`apply_again`]) also takes the
    /// rows that hold this very change already: `… OR (status = new status AND updated_at = at)`.
    fn update_where(
        &self,
        at: DateTime<Utc>,
        ids: &[Uuid],
        again: bool,
    ) -> sea_orm::UpdateMany<notification::Entity> {
        let allowed = status_among(self.status.allowed_from());
        let mut update = notification::Entity::update_many()
            .col_expr(notification::Column::Status, Expr::value(self.status))
            .col_expr(notification::Column::UpdatedAt, Expr::value(at))
            .filter(notification::Column::Id.is_in(ids.to_vec()));
        update = match again {
            false => update.filter(allowed),
            true => update.filter(
                Condition::any().add(allowed).add(
                    Condition::all()
                        .add(status_among(&[self.status]))
                        .add(notification::Column::UpdatedAt.eq(at)),
                ),
            ),
        };
        match &self.reason {
            Some(reason) => {
                update = update.col_expr(notification::Column::StatusReason, Expr::value(reason));
            }
            // A deferral's or a retry's reason is history once the notification went out.
            None if self.status.is_sent() => {
                update = update.col_expr(
                    notification::Column::StatusReason,
                    Expr::value(Option::<String>::None),
                );
            }
            // The command arrived, so a mark saying it might not have is obsolete.
            None if self.status == NotificationStatus::Processing => {
                update = update.col_expr(
                    notification::Column::StatusReason,
                    super::schedule::reason_without_publish_mark(),
                );
            }
            None => {}
        }
        if let Some(channel) = &self.final_channel {
            update = update.col_expr(notification::Column::FinalChannel, Expr::value(channel));
        }
        match &self.error {
            Some(error) => {
                update = update.col_expr(notification::Column::Error, Expr::value(error));
            }
            // The error of a round that failed is history once the notification went out (each
            // attempt keeps its own).
            None if self.status.is_sent() => {
                update = update.col_expr(
                    notification::Column::Error,
                    Expr::value(Option::<String>::None),
                );
            }
            None => {}
        }
        if let Some(attempts) = self.attempts {
            update = update.col_expr(notification::Column::Attempts, Expr::value(attempts));
        }
        if let Some(due) = self.scheduled_at {
            update = update.col_expr(notification::Column::ScheduledAt, Expr::value(due));
        }
        if self.status == NotificationStatus::Sent {
            update = update.col_expr(notification::Column::SentAt, Expr::value(at));
        }
        update
    }
}

/// The UPDATE that marks `ids` `processing` (those whose status allows it), as a batched
/// `processing` change would.
pub(crate) fn processing_update(
    at: DateTime<Utc>,
    ids: &[Uuid],
) -> sea_orm::UpdateMany<notification::Entity> {
    Shape::of(&StatusChange::to(
        Uuid::nil(),
        NotificationStatus::Processing,
    ))
    .update(at, ids)
}

/// `status IN (allowed)`, written so that no index on `status` can serve it.
///
/// Without statistics on a table that grows by the second, SQLite's and PostgreSQL's planners
/// preferred the `(status, scheduled_at)` index over the primary key for `id IN (…500 ids) AND
/// status IN (…)`, and so scanned every queued and processing row for each batch: a batch took
/// longer the longer the backlog (with 30,000 queued rows, a 500-row change took 23.5 ms in
/// SQLite instead of 7.5 ms). Behind `COALESCE` the condition is only checked on the rows the
/// primary key finds. That index is gone (migration `m20261203_000501`), but the partial indexes
/// on status that replaced it could tempt a planner the same way.
pub(crate) fn status_among(allowed: &[NotificationStatus]) -> Expr {
    Expr::expr(Func::coalesce([
        Expr::col(notification::Column::Status),
        Expr::val(""),
    ]))
    .is_in(allowed.iter().map(|status| status.as_str()))
}

/// One UPDATE: a shape applied to several notifications.
#[derive(Debug)]
struct UpdateGroup {
    /// Which of its notifications' changes this is (0 = first in the batch).
    round: usize,
    shape: Shape,
    /// The latest change time in the group (all within [`TIME_WINDOW_MS`]).
    at: DateTime<Utc>,
    ids: Vec<Uuid>,
    /// Where each of `ids`' change is in the batch.
    indexes: Vec<usize>,
}

/// Turns a batch of changes into few UPDATEs without changing the outcome:
/// - a `processing` change followed in the same batch by another change of the same notification
///   is dropped (the later one overwrites it anyway);
/// - the remaining changes are grouped by round (a notification's first, second, … change in the
///   batch, so each notification's changes still apply in order), by shape and by
///   [`TIME_WINDOW_MS`] window of their time; a group's time is its latest change's. Without the
///   window a batch gathered during a slow flush stamped its first sends with its last send's
///   time, seconds late under load.
fn plan(changes: &[StatusChange]) -> Vec<UpdateGroup> {
    use std::collections::HashMap;
    let mut last_index: HashMap<Uuid, usize> = HashMap::new();
    for (i, change) in changes.iter().enumerate() {
        last_index.insert(change.id, i);
    }
    let mut round_of: HashMap<Uuid, usize> = HashMap::new();
    let mut groups: Vec<UpdateGroup> = Vec::new();
    let mut index_of: HashMap<(usize, Shape, i64), usize> = HashMap::new();
    for (i, change) in changes.iter().enumerate() {
        let superseded = change.status == NotificationStatus::Processing
            && last_index.get(&change.id).is_some_and(|&last| last > i);
        if superseded {
            continue;
        }
        let round = round_of.entry(change.id).or_insert(0);
        let window = change.at.timestamp_millis().div_euclid(TIME_WINDOW_MS);
        let key = (*round, Shape::of(change), window);
        *round += 1;
        match index_of.get(&key) {
            Some(&g) => {
                groups[g].at = Ord::max(groups[g].at, change.at);
                groups[g].ids.push(change.id);
                groups[g].indexes.push(i);
            }
            None => {
                index_of.insert(key.clone(), groups.len());
                groups.push(UpdateGroup {
                    round: key.0,
                    shape: key.1,
                    at: change.at,
                    ids: vec![change.id],
                    indexes: vec![i],
                });
            }
        }
    }
    groups.sort_by_key(|group| group.round);
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_provider_message_id_is_stored_cut_to_whole_characters() {
        let max = PROVIDER_MESSAGE_ID_MAX_CHARS;
        let short = "SM1".to_string();
        assert_eq!(stored_message_id(short.clone()), short);
        let exact = "a".repeat(max);
        assert_eq!(stored_message_id(exact.clone()), exact);
        // Two-byte characters: a cut by bytes would split one, or keep half as many.
        let long = "é".repeat(max + 1);
        let stored = stored_message_id(long);
        assert_eq!(stored.chars().count(), max);
        assert_eq!(stored, "é".repeat(max));
        assert_eq!(stored_message_id("a\0b".into()), "a\u{FFFD}b");
    }

    fn change(id: Uuid, status: NotificationStatus) -> StatusChange {
        at(id, status, 0)
    }

    /// A change at `millis` past a fixed instant (on a window boundary).
    fn at(id: Uuid, status: NotificationStatus, millis: i64) -> StatusChange {
        let base = DateTime::from_timestamp_millis(1_790_000_000_000).expect("valid instant");
        StatusChange {
            at: base + chrono::Duration::milliseconds(millis),
            ..StatusChange::to(id, status)
        }
    }

    #[test]
    fn processing_followed_by_a_final_status_is_one_update() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let changes = vec![
            change(a, NotificationStatus::Processing),
            change(b, NotificationStatus::Processing),
            change(a, NotificationStatus::Sent),
            change(b, NotificationStatus::Sent),
        ];
        let plan = plan(&changes);
        assert_eq!(plan.len(), 1, "{plan:?}");
        assert_eq!(plan[0].shape.status, NotificationStatus::Sent);
        assert_eq!(plan[0].ids, vec![a, b]);
    }

    #[test]
    fn different_values_are_different_updates_and_order_per_notification_is_kept() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let mut failed = change(b, NotificationStatus::Failed);
        failed.error = Some("550".into());
        let changes = vec![
            change(a, NotificationStatus::Sent),
            failed,
            change(a, NotificationStatus::Delivered),
        ];
        let plan = plan(&changes);
        assert_eq!(plan.len(), 3);
        let position = |status| plan.iter().position(|p| p.shape.status == status).unwrap();
        assert!(position(NotificationStatus::Sent) < position(NotificationStatus::Delivered));
    }

    #[test]
    fn changes_far_apart_in_time_keep_their_own_times() {
        let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let changes = vec![
            at(a, NotificationStatus::Sent, 0),
            at(b, NotificationStatus::Sent, TIME_WINDOW_MS - 1),
            at(c, NotificationStatus::Sent, 2_000),
        ];
        let plan = plan(&changes);
        assert_eq!(plan.len(), 2, "{plan:?}");
        assert_eq!(plan[0].ids, vec![a, b]);
        assert_eq!(plan[0].at, changes[1].at);
        assert_eq!(plan[1].ids, vec![c]);
        assert_eq!(plan[1].at, changes[2].at);
    }

    #[test]
    fn changes_sharing_an_update_are_stamped_with_its_time() {
        let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let changes = vec![
            at(a, NotificationStatus::Processing, 0),
            at(a, NotificationStatus::Sent, 1),
            at(b, NotificationStatus::Sent, 4),
            at(c, NotificationStatus::Sent, 2_000),
        ];
        let stamped = as_stamped(&changes);
        let times: Vec<_> = stamped.iter().map(|change| change.at).collect();
        assert_eq!(
            times,
            [changes[0].at, changes[2].at, changes[2].at, changes[3].at],
            "a and b share an UPDATE stamped with b's time; the replaced processing keeps its own"
        );
        let unstamped: Vec<_> = stamped
            .into_iter()
            .zip(&changes)
            .map(|(change, original)| StatusChange {
                at: original.at,
                ..change
            })
            .collect();
        assert_eq!(unstamped, changes, "only the times change");
    }

    #[test]
    fn a_lone_processing_change_is_kept() {
        let a = Uuid::now_v7();
        let plan = plan(&[change(a, NotificationStatus::Processing)]);
        assert_eq!(plan.len(), 1);
        assert_eq!(plan[0].shape.status, NotificationStatus::Processing);
    }
}
