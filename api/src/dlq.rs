//! `/api/v1/dlq`: the dead-letter stream — list entries with their reasons, replay one, or replay
//! every entry matching a filter.
//!
//! A replay puts the notification back to `queued` (the only way out of `dead`) with a mark saying
//! its command is not yet confirmed published, republishes the original command on its partition
//! under a `Nats-Msg-Id` of this replay's own (`<id>:replay:<seq>:<token>`, so JetStream's
//! de-duplication drops it neither as the original command nor as the copy of an earlier replay
//! attempt; a concurrent replay of the same entry finds the notification no longer `dead`),
//! clears the mark and deletes the entry. If the publish fails the notification goes back to
//! `dead` and the entry stays. If the replay stops in between, the Scheduler publishes the
//! command after `scheduler.stale_claim_secs` (see [`dead_letters::PendingReplay`]).
//!
//! An event the Router gave up on (an unknown customer, a missing template) is replayed by
//! publishing it again on its subject, under `<event id>:replay:<seq>`, once the cause is mended:
//! the Router routes it as new. Rules that had made their notification find it (its id and
//! request id derive from the event), so nothing is sent twice.

use chrono::{DateTime, Utc};
use herald_entities::{
    NotificationStatus, notification,
    repo::{
        dead_letters::{self, PendingReplay},
        notifications,
    },
};
use herald_nats::{
    DeadLetter, DeadLetters, DomainEvent, MAX_COMMAND_BYTES, SendCommand, events::MAX_EVENT_BYTES,
};
use poem_openapi::{
    Enum, Object, OpenApi, Tags,
    param::{Path, Query},
    payload::Json,
};
use uuid::Uuid;

use crate::{
    ApiError, AppState,
    auth::{AdminKey, ReadKey},
    notifications::ApiChannel,
};

/// Entries listed when no limit is asked for.
const DEFAULT_LIMIT: u32 = 50;
/// Largest page of entries.
const MAX_LIMIT: u32 = 500;
/// Most entries a filtered replay handles in one call.
const MAX_REPLAY: u32 = 1_000;
/// Most entries looked at per call while filtering.
const MAX_SCAN: usize = 10_000;

#[derive(Tags)]
enum DlqTags {
    /// Dead letters: list and replay.
    DeadLetters,
}

/// One dead letter.
#[derive(Debug, Clone, Object)]
// Absent values are left out, as the spec (no `nullable`) says.
#[oai(skip_serializing_if_is_none)]
pub struct DeadLetterView {
    /// Sequence number in `NOTIFY_DLQ`; replay it with `POST /api/v1/dlq/{seq}/replay`.
    pub seq: u64,
    /// The dead-letter subject (`notify.dlq.cmd` for send commands).
    pub subject: String,
    /// Why it was dead-lettered.
    pub reason: Option<String>,
    /// The subject the message was first published on.
    pub original_subject: Option<String>,
    /// Deliveries before it was given up.
    pub deliveries: Option<u64>,
    /// When it was dead-lettered.
    pub dead_at: DateTime<Utc>,
    /// The notification, when the message is a readable send command.
    pub notification_id: Option<Uuid>,
    /// The event, when the message is a readable domain event.
    pub event_id: Option<Uuid>,
    /// Its category.
    pub category: Option<String>,
    /// Its channel chain.
    pub channels: Vec<String>,
    /// Providers called in its last round.
    pub providers: Vec<String>,
    /// Its customer.
    pub customer_id: Option<String>,
    /// Whether it can be replayed: a readable send command no larger than a dispatcher takes
    /// (640 KiB), or a readable domain event published
    /// on its type's subject, no larger than the Router routes (256 KiB), and recent enough that
    /// a copy published now leaves the `EVENTS` stream (`nats.retention.events.max_age_secs`)
    /// before the notifications it made may be deleted (`scheduler.retention_days`).
    pub replayable: bool,
}

/// A page of dead letters, oldest first.
#[derive(Debug, Clone, Object)]
// Absent values are left out, as the spec (no `nullable`) says.
#[oai(skip_serializing_if_is_none)]
pub struct DeadLetterPage {
    /// Entries.
    pub items: Vec<DeadLetterView>,
    /// Pass as `after_seq` for the next page; absent when the stream has no more.
    pub next_after_seq: Option<u64>,
}

/// The result of replaying one entry.
#[derive(Debug, Clone, Object)]
// Absent values are left out, as the spec (no `nullable`) says.
#[oai(skip_serializing_if_is_none)]
pub struct Replayed {
    /// The entry's sequence number (now deleted).
    pub seq: u64,
    /// The notification, `queued` again (a send command's entry).
    pub notification_id: Option<Uuid>,
    /// The event, published again for the Router (an event's entry).
    pub event_id: Option<Uuid>,
    /// `queued` for a notification, `republished` for an event.
    pub status: String,
}

/// What a dead letter holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "snake_case")]
pub enum DlqKind {
    /// Send commands a dispatcher gave up on (retries spent, or unreadable as a notification).
    Commands,
    /// Domain events the Router gave up on (an unknown customer, a missing template).
    Events,
}

/// Which entries to replay; filters combine with AND.
#[derive(Debug, Clone, Object)]
#[oai(deny_unknown_fields)]
pub struct ReplayFilter {
    /// `commands` (the default) or `events`: a filtered replay takes one kind.
    pub kind: Option<DlqKind>,
    /// Only commands whose chain includes this channel (not with `kind: events`).
    pub channel: Option<ApiChannel>,
    /// Only commands whose last round called this provider, e.g. `telegram`, `smtp` (not with
    /// `kind: events`).
    pub provider: Option<String>,
    /// Only entries whose reason contains this text, e.g. `unknown customer`.
    #[oai(validator(min_length = 1, max_length = 200))]
    pub reason: Option<String>,
    /// Dead-lettered at or after.
    pub from: Option<DateTime<Utc>>,
    /// Dead-lettered before.
    pub to: Option<DateTime<Utc>>,
    /// At most this many (1 to 1000, default 100).
    #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
    pub limit: Option<u32>,
    /// Only entries after this sequence number: a previous call's `next_after_seq`, to go past
    /// the entries it skipped.
    pub after_seq: Option<u64>,
}

/// An entry a filtered replay left alone.
#[derive(Debug, Clone, Object)]
pub struct ReplaySkipped {
    /// Sequence number.
    pub seq: u64,
    /// Why.
    pub reason: String,
}

/// The result of a filtered replay.
#[derive(Debug, Clone, Object)]
// Absent values are left out, as the spec (no `nullable`) says.
#[oai(skip_serializing_if_is_none)]
pub struct ReplayReport {
    /// Entries replayed.
    pub replayed: Vec<Replayed>,
    /// Matching entries left in the stream, with the reason.
    pub skipped: Vec<ReplaySkipped>,
    /// The last sequence number looked at, when more entries may follow: pass it as `after_seq`
    /// to continue past these. Absent at the end of the stream.
    pub next_after_seq: Option<u64>,
}

/// Dead-letter endpoints.
pub struct DlqApi {
    state: AppState,
}

impl DlqApi {
    /// The endpoints over the shared state.
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

#[OpenApi(prefix_path = "/api/v1", tag = "DlqTags::DeadLetters")]
impl DlqApi {
    /// List dead letters, oldest first, with the reason each was given up (scope `read`).
    /// 400: `channel` or `provider` with `kind: events`, or `to` not after `from`.
    // One parameter per documented query field, as poem-openapi declares them.
    #[allow(clippy::too_many_arguments)]
    #[oai(path = "/dlq", method = "get")]
    async fn list(
        &self,
        _auth: ReadKey,
        /// Start after this sequence number (`next_after_seq` of the previous page).
        after_seq: Query<Option<u64>>,
        /// Page size, 1 to 500 (default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "500")))]
        limit: Query<Option<u32>>,
        /// Only commands whose chain includes this channel.
        channel: Query<Option<ApiChannel>>,
        /// Only commands whose last round called this provider (e.g. `telegram`, `smtp`).
        provider: Query<Option<String>>,
        /// Dead-lettered at or after (RFC 3339).
        from: Query<Option<DateTime<Utc>>>,
        /// Dead-lettered before (RFC 3339).
        to: Query<Option<DateTime<Utc>>>,
        /// Only send commands, or only events (default: every entry).
        kind: Query<Option<DlqKind>>,
        /// Only entries whose reason contains this text, e.g. `unknown customer`.
        #[oai(validator(min_length = 1, max_length = 200))]
        reason: Query<Option<String>>,
    ) -> Result<Json<DeadLetterPage>, ApiError> {
        let limit = limit.0.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT) as usize;
        let filter = EntryFilter {
            kind: kind.0,
            channel: channel.0,
            provider: provider.0,
            reason: reason.0,
            from: from.0,
            to: to.0,
        }
        .checked()?;
        list_page(&self.state, after_seq.0, limit, &filter)
            .await
            .map(Json)
    }

    /// Replay one dead letter (scope `admin`): the notification goes back to `queued`, its
    /// original command is published again, and the entry is deleted. An event the Router gave
    /// up on is published again on its subject, to be routed anew (mend the cause first: create
    /// the customer or the template). 404: no such entry; 409: neither a readable send command
    /// nor a readable event, a send command larger than a dispatcher takes (640 KiB), an event
    /// that cannot be replayed (published on another type's subject, larger than the Router
    /// routes, or too old for the retention of its notifications), or its notification is no
    /// longer `dead`.
    #[oai(path = "/dlq/:seq/replay", method = "post")]
    async fn replay(&self, _auth: AdminKey, seq: Path<u64>) -> Result<Json<Replayed>, ApiError> {
        replay_one(&self.state, seq.0).await.map(Json)
    }

    /// Replay every dead letter matching a filter (scope `admin`), oldest first, at most `limit`.
    /// One kind per call: send commands (the default), or with `kind: events` the events the
    /// Router gave up on; entries of the other kind are passed over. Entries that cannot be
    /// replayed now are reported as skipped and stay; `next_after_seq` continues past them.
    /// 400: `channel` or `provider` with `kind: events`, or `to` not after `from`.
    #[oai(path = "/dlq/replay", method = "post")]
    async fn replay_matching(
        &self,
        _auth: AdminKey,
        body: Json<ReplayFilter>,
    ) -> Result<Json<ReplayReport>, ApiError> {
        let body = body.0;
        let limit = body.limit.unwrap_or(100).clamp(1, MAX_REPLAY) as usize;
        let filter = EntryFilter {
            kind: Some(body.kind.unwrap_or(DlqKind::Commands)),
            channel: body.channel,
            provider: body.provider,
            reason: body.reason,
            from: body.from,
            to: body.to,
        }
        .checked()?;
        let start = body.after_seq.unwrap_or(0).saturating_add(1);
        replay_scan(&self.state, &filter, start, limit)
            .await
            .map(Json)
    }
}

/// Replays, oldest first, up to `limit` dead letters from sequence `start` on that `filter`
/// matches, looking at no more than [`MAX_SCAN`] entries. Each is replayed as it is read, so no
/// more than one payload is held at a time (a command may take 640 KiB). Entries dead-lettered
/// after the call began are not looked at: one replayed here that fails again at once (an event
/// whose template is still missing) is left for the next call, not replayed over and over.
async fn replay_scan(
    state: &AppState,
    filter: &EntryFilter,
    start: u64,
    limit: usize,
) -> Result<ReplayReport, ApiError> {
    let stream = open_stream(state).await?;
    let last = stream.last_seq().await.map_err(unavailable)?;
    let mut report = ReplayReport {
        replayed: Vec::new(),
        skipped: Vec::new(),
        next_after_seq: None,
    };
    let mut next = start.max(1);
    let mut matched = 0;
    for _ in 0..MAX_SCAN {
        let read = stream.next_from(next).await.map_err(unavailable)?;
        let Some(letter) = read.filter(|letter| letter.seq <= last) else {
            return Ok(report);
        };
        next = letter.seq + 1;
        if !filter.matches(&letter) {
            continue;
        }
        match replay_letter(state, &stream, &letter).await? {
            Ok(replayed) => report.replayed.push(replayed),
            Err(reason) => report.skipped.push(ReplaySkipped {
                seq: letter.seq,
                reason,
            }),
        }
        matched += 1;
        if matched >= limit {
            break;
        }
    }
    report.next_after_seq = Some(next.saturating_sub(1));
    Ok(report)
}

/// A page of dead letters matching `filter`, oldest first, after sequence `after_seq`; shared by
/// the API and the dashboard.
pub(crate) async fn list_page(
    state: &AppState,
    after_seq: Option<u64>,
    limit: usize,
    filter: &EntryFilter,
) -> Result<DeadLetterPage, ApiError> {
    let start = after_seq.unwrap_or(0).saturating_add(1);
    let (items, next) = open_stream(state)
        .await?
        .page(start, limit, MAX_SCAN, |l| {
            filter.matches(&l).then(|| view(&l, Kept::of(state)))
        })
        .await
        .map_err(unavailable)?;
    Ok(DeadLetterPage {
        items,
        next_after_seq: next.map(|n| n.saturating_sub(1)),
    })
}

/// Replays the entry `seq`; shared by the API and the dashboard. 404: no such entry; 409: not
/// replayable, or its notification is no longer `dead`.
pub(crate) async fn replay_one(state: &AppState, seq: u64) -> Result<Replayed, ApiError> {
    let stream = open_stream(state).await?;
    let Some(letter) = stream.get(seq).await.map_err(unavailable)? else {
        return Err(ApiError::not_found(format!("no dead letter {seq}")));
    };
    replay_letter(state, &stream, &letter)
        .await?
        .map_err(ApiError::conflict)
}

async fn open_stream(state: &AppState) -> Result<DeadLetters, ApiError> {
    DeadLetters::open(state.publisher.jetstream())
        .await
        .map_err(unavailable)
}

/// Replays one entry: `Ok(Err(why))` when it cannot be replayed.
async fn replay_letter(
    state: &AppState,
    stream: &DeadLetters,
    letter: &DeadLetter,
) -> Result<Result<Replayed, String>, ApiError> {
    let command = match SendCommand::decode(&letter.payload) {
        Ok(command) => command,
        Err(err) => match DomainEvent::decode(&letter.payload) {
            Ok(event) => {
                if let Some(why) = unreplayable_event(letter, &event, Kept::of(state), Utc::now()) {
                    return Ok(Err(why));
                }
                return replay_event(state, stream, letter, &event).await.map(Ok);
            }
            Err(_) => return Ok(Err(format!("not a replayable send command: {err}"))),
        },
    };
    if let Some(why) = unreplayable_command(letter) {
        return Ok(Err(why));
    }
    let id = command.notification_id;
    let Some(row) = notifications::find(&state.db, id).await? else {
        return Ok(Err(format!("notification {id} is not stored")));
    };
    let replay = PendingReplay::new(letter.seq);
    if !dead_letters::requeue_dead(&state.db, id, &replay).await? {
        return Ok(Err(format!(
            "notification {id} is {}, not dead",
            row.status.as_str()
        )));
    }
    if let Err(why) = publish_replay(state, letter, &row, &replay).await? {
        return Ok(Err(why));
    }
    if let Err(err) = stream.delete(letter.seq).await {
        // Replayed all the same; the stale entry's notification is no longer dead, so a
        // second replay of it is refused.
        tracing::warn!(%id, seq = letter.seq, error = %err, "cannot delete a replayed dead letter");
    }
    metrics::counter!("herald_dlq_replayed_total").increment(1);
    Ok(Ok(Replayed {
        seq: letter.seq,
        notification_id: Some(id),
        event_id: None,
        status: "queued".into(),
    }))
}

/// Publishes the command of `row`, requeued for `replay`, and clears the replay's mark. When the
/// publish fails, puts the notification back to `dead` (503), unless a dispatcher has claimed it
/// meanwhile (the command was stored although its acknowledgement was lost) or it was cancelled
/// meanwhile (`Ok(Err(why))`: nothing was replayed).
async fn publish_replay(
    state: &AppState,
    letter: &DeadLetter,
    row: &notification::Model,
    replay: &PendingReplay,
) -> Result<Result<(), String>, ApiError> {
    let id = row.id;
    let published = state
        .publisher
        .republish_command(
            &row.recipient_key,
            letter.payload.clone(),
            &replay.msg_id(id),
            row.attempts,
        )
        .await;
    if let Err(err) = published {
        tracing::warn!(%id, error = %err, "cannot republish a dead letter");
        let back = row.status_reason.as_deref().unwrap_or("dead");
        // If this fails too, the notification keeps the replay's mark and the Scheduler
        // publishes its command later.
        if dead_letters::return_to_dead(&state.db, id, replay, back).await? {
            return Err(unavailable(err));
        }
        let now = notifications::find(&state.db, id)
            .await?
            .map(|row| row.status);
        if now == Some(NotificationStatus::Cancelled) {
            return Ok(Err(format!(
                "notification {id} was cancelled while it was being replayed"
            )));
        }
        tracing::info!(%id, "the replayed command arrived after all");
    } else if let Err(err) = dead_letters::confirm_replayed(&state.db, id, replay).await {
        // Replayed all the same: the Scheduler publishes the command again under the same
        // `Nats-Msg-Id`, which JetStream drops as a duplicate, and clears the mark.
        tracing::warn!(%id, error = %err, "cannot confirm a replayed command");
    }
    Ok(Ok(()))
}

/// Why the dead-lettered send command is not replayed, if it is not: larger than a dispatcher
/// takes ([`MAX_COMMAND_BYTES`], a constant of the build, not a setting). A dispatcher
/// dead-letters such a command as poison at once and leaves its notification as it was (`queued`,
/// never `dead`); replayed, the same bytes would only be dead-lettered again.
fn unreplayable_command(letter: &DeadLetter) -> Option<String> {
    (letter.payload.len() > MAX_COMMAND_BYTES).then(|| {
        format!(
            "the send command is {} bytes, larger than a dispatcher takes ({MAX_COMMAND_BYTES} \
             bytes): replayed, it would be dead-lettered again; not replayable, send a smaller \
             notification instead",
            letter.payload.len()
        )
    })
}

/// Whether the dead-lettered `event` was published on its own subject, `events.<type>` (or the
/// letter does not say where): one published on another type's subject was dead-lettered for
/// that, and replaying it on its own would route what its producer could not publish.
fn on_its_subject(letter: &DeadLetter, event: &DomainEvent) -> bool {
    letter
        .original_subject
        .as_deref()
        .is_none_or(|subject| subject == event.subject())
}

/// How long what an event's replay depends on is kept; `None` keeps it for ever.
#[derive(Debug, Clone, Copy)]
struct Kept {
    /// Final notifications (`scheduler.retention_days`).
    notifications: Option<chrono::Duration>,
    /// Events in the `EVENTS` stream (`nats.retention.events.max_age_secs`).
    events: Option<chrono::Duration>,
}

impl Kept {
    fn of(state: &AppState) -> Self {
        Self {
            notifications: state.retention,
            events: state.events_max_age,
        }
    }
}

/// Why the dead-lettered `event` is not replayed at `now`, if it is not: published on another
/// type's subject, larger than the Router routes (it would be dead-lettered again), or too old
/// ([`outlived_retention`]).
fn unreplayable_event(
    letter: &DeadLetter,
    event: &DomainEvent,
    kept: Kept,
    now: DateTime<Utc>,
) -> Option<String> {
    if !on_its_subject(letter, event) {
        return Some(format!(
            "the event of type {} was published on {}, not on {}: not replayable",
            event.event_type(),
            letter.original_subject.as_deref().unwrap_or_default(),
            event.subject()
        ));
    }
    if letter.payload.len() > MAX_EVENT_BYTES {
        return Some(format!(
            "the event is {} bytes, larger than the Router routes ({MAX_EVENT_BYTES} bytes): \
             replayed, it would be dead-lettered again; not replayable, publish a smaller event \
             instead",
            letter.payload.len()
        ));
    }
    outlived_retention(routed_since(letter, event), now, kept)
}

/// The earliest its notifications may have been made: when the event occurred, if before it was
/// dead-lettered. The Router makes the notifications of an event's other rules when it first
/// routes it, which can be long before the dead letter (it waits out its retry schedule for an
/// unknown customer first).
fn routed_since(letter: &DeadLetter, event: &DomainEvent) -> DateTime<Utc> {
    letter.at.min(event.occurred_at)
}

/// Why an event whose notifications may date from `at` ([`routed_since`]) is not routed again at
/// `now`: the Router finds the notifications the event's other rules made by their ids so as to
/// make each once, and those may be deleted from `at` + `kept.notifications`. A copy published now
/// stays in the `EVENTS` stream until `now` + `kept.events`; a Router consumer recreated before then
/// (it reads the stream from its start) would route it again, after they were deleted, and send
/// them a second time. So the copy must be gone first: `now - at + kept.events` below
/// `kept.notifications`. With events kept for ever only the notifications' age counts: the event's
/// first copy stays in the stream as long (the warning at start says so).
fn outlived_retention(at: DateTime<Utc>, now: DateTime<Utc>, kept: Kept) -> Option<String> {
    let notifications = kept.notifications?;
    let events = kept.events.unwrap_or_default();
    let needed = (now - at).checked_add(&events);
    if needed.is_some_and(|needed| needed < notifications) {
        return None;
    }
    let mut why = format!(
        "the event's notifications may date from {} ({} ago, when it occurred or was \
         dead-lettered) and are kept {} (scheduler.retention_days), so they may be deleted from {}",
        instant(at),
        span(now - at),
        span(notifications),
        at.checked_add_signed(notifications)
            .map_or_else(|| "never".into(), instant),
    );
    if kept.events.is_some() {
        why.push_str(&format!(
            "; a copy published now stays in the EVENTS stream {} \
             (nats.retention.events.max_age_secs = {}), until {}",
            span(events),
            events.num_seconds(),
            now.checked_add_signed(events)
                .map_or_else(|| "for ever".into(), instant),
        ));
    }
    why.push_str(
        ": routed again after they were deleted (a recreated Router consumer reads the stream \
         from its start), it would send them twice; publish a new event instead",
    );
    Some(why)
}

/// A time in an explanation, to the second.
fn instant(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A length of time in an explanation: days, hours and minutes.
fn span(length: chrono::Duration) -> String {
    let minutes = length.num_minutes();
    format!(
        "{} d {} h {} min",
        minutes / (24 * 60),
        minutes % (24 * 60) / 60,
        minutes % 60
    )
}

/// Publishes a dead-lettered event again on its subject, then deletes the entry.
async fn replay_event(
    state: &AppState,
    stream: &DeadLetters,
    letter: &DeadLetter,
    event: &DomainEvent,
) -> Result<Replayed, ApiError> {
    let msg_id = format!("{}:replay:{}", event.id, letter.seq);
    state
        .publisher
        .publish_event(&event.subject(), &msg_id, letter.payload.clone())
        .await
        .map_err(unavailable)?;
    if let Err(err) = stream.delete(letter.seq).await {
        // Replayed all the same; replaying the stale entry again routes the event again, which
        // makes nothing twice.
        tracing::warn!(event = %event.id, seq = letter.seq, error = %err, "cannot delete a replayed dead letter");
    }
    metrics::counter!("herald_dlq_replayed_total").increment(1);
    Ok(Replayed {
        seq: letter.seq,
        notification_id: None,
        event_id: Some(event.id),
        status: "republished".into(),
    })
}

/// Which dead letters to list or replay; filters combine with AND.
#[derive(Debug, Default)]
pub(crate) struct EntryFilter {
    /// One kind of entry only; every entry when absent (unless a channel is asked for).
    kind: Option<DlqKind>,
    channel: Option<ApiChannel>,
    provider: Option<String>,
    reason: Option<String>,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
}

impl EntryFilter {
    /// Entries of one `kind` (every kind when `None`) whose reason contains `reason`, if given.
    pub(crate) fn of(kind: Option<DlqKind>, reason: Option<String>) -> Self {
        Self {
            kind,
            reason,
            ..Self::default()
        }
    }

    /// The filter, or 400 when it asks events for what only send commands have, or for a time
    /// range that holds nothing (which would scan up to [`MAX_SCAN`] entries to find none).
    fn checked(self) -> Result<Self, ApiError> {
        if let (Some(from), Some(to)) = (self.from, self.to)
            && from >= to
        {
            return Err(ApiError::invalid("to", "to must be after from"));
        }
        if self.kind == Some(DlqKind::Events) {
            let only_commands = "filters send commands only; events have no channels or providers";
            if self.channel.is_some() {
                return Err(ApiError::invalid("channel", only_commands));
            }
            if self.provider.is_some() {
                return Err(ApiError::invalid("provider", only_commands));
            }
        }
        Ok(self)
    }

    /// Whether `letter` is selected: its headers, then what its payload holds (decoded only
    /// when the filter asks about it).
    fn matches(&self, letter: &DeadLetter) -> bool {
        if !self.matches_headers(letter) {
            return false;
        }
        match (self.kind, self.channel) {
            (Some(DlqKind::Events), _) => DomainEvent::decode(&letter.payload)
                .is_ok_and(|event| on_its_subject(letter, &event)),
            (Some(DlqKind::Commands), _) | (None, Some(_)) => self.matches_command(letter),
            (None, None) => true,
        }
    }

    /// The dead-lettering time, the providers tried and the reason.
    fn matches_headers(&self, letter: &DeadLetter) -> bool {
        let in_time = self.from.is_none_or(|from| letter.at >= from)
            && self.to.is_none_or(|to| letter.at < to);
        let tried = self
            .provider
            .as_ref()
            .is_none_or(|provider| letter.providers.iter().any(|p| p == provider));
        let because = self.reason.as_deref().is_none_or(|wanted| {
            letter
                .reason
                .as_deref()
                .is_some_and(|reason| reason.contains(wanted))
        });
        in_time && tried && because
    }

    /// A send command whose chain includes the channel asked for, if any.
    fn matches_command(&self, letter: &DeadLetter) -> bool {
        SendCommand::decode(&letter.payload).is_ok_and(|command| {
            self.channel
                .is_none_or(|channel| command.channels.contains(&channel.into()))
        })
    }
}

fn view(letter: &DeadLetter, kept: Kept) -> DeadLetterView {
    let command = SendCommand::decode(&letter.payload).ok();
    let event = command
        .is_none()
        .then(|| DomainEvent::decode(&letter.payload).ok())
        .flatten();
    DeadLetterView {
        seq: letter.seq,
        subject: letter.subject.clone(),
        reason: letter.reason.clone(),
        original_subject: letter.original_subject.clone(),
        deliveries: letter.deliveries,
        dead_at: letter.at,
        notification_id: command.as_ref().map(|c| c.notification_id),
        category: command.as_ref().map(|c| c.category.as_str().to_string()),
        channels: command
            .as_ref()
            .map(|c| {
                c.channels
                    .iter()
                    .map(|ch| ch.as_str().to_string())
                    .collect()
            })
            .unwrap_or_default(),
        customer_id: command.as_ref().and_then(|c| c.customer_id.clone()),
        providers: letter.providers.clone(),
        event_id: event.as_ref().map(|e| e.id),
        replayable: (command.is_some() && unreplayable_command(letter).is_none())
            || event
                .as_ref()
                .is_some_and(|event| unreplayable_event(letter, event, kept, Utc::now()).is_none()),
    }
}

fn unavailable(err: herald_nats::NatsError) -> ApiError {
    tracing::warn!(error = %err, "dead-letter stream unavailable");
    ApiError::unavailable("the dead-letter stream is unavailable; retry later")
}

#[cfg(test)]
mod filter_tests {
    use super::*;

    fn letter(providers: &[&str]) -> DeadLetter {
        DeadLetter {
            seq: 1,
            subject: "notify.dlq.cmd".into(),
            reason: Some("gave up".into()),
            original_subject: Some("notify.cmd.1".into()),
            deliveries: Some(3),
            providers: providers.iter().map(|p| p.to_string()).collect(),
            at: Utc::now(),
            payload: Default::default(),
        }
    }

    #[test]
    fn the_provider_filter_matches_providers_tried() {
        let filter = |provider: Option<&str>| EntryFilter {
            provider: provider.map(str::to_string),
            ..EntryFilter::default()
        };
        assert!(filter(None).matches(&letter(&[])));
        assert!(filter(Some("telegram")).matches(&letter(&["telegram", "smtp"])));
        assert!(!filter(Some("twilio")).matches(&letter(&["telegram", "smtp"])));
        assert!(!filter(Some("telegram")).matches(&letter(&[])));
    }

    #[test]
    fn the_reason_filter_matches_text_within_the_reason() {
        let filter = |reason: &str| EntryFilter {
            reason: Some(reason.into()),
            ..EntryFilter::default()
        };
        assert!(filter("gave").matches(&letter(&[])));
        assert!(filter("gave up").matches(&letter(&[])));
        assert!(!filter("unknown customer").matches(&letter(&[])));
        let without_reason = DeadLetter {
            reason: None,
            ..letter(&[])
        };
        assert!(!filter("gave").matches(&without_reason));
    }

    #[test]
    fn events_cannot_be_filtered_by_what_only_commands_have() {
        let events = |channel: Option<ApiChannel>, provider: Option<&str>| EntryFilter {
            kind: Some(DlqKind::Events),
            channel,
            provider: provider.map(str::to_string),
            ..EntryFilter::default()
        };
        assert!(events(None, None).checked().is_ok());
        assert!(events(Some(ApiChannel::Email), None).checked().is_err());
        assert!(events(None, Some("smtp")).checked().is_err());
        let commands = EntryFilter {
            kind: Some(DlqKind::Commands),
            channel: Some(ApiChannel::Email),
            provider: Some("smtp".into()),
            ..EntryFilter::default()
        };
        assert!(commands.checked().is_ok());
    }
}

#[cfg(test)]
mod retention_tests {
    use super::*;

    /// Notifications kept `notifications` days, events `events` days (`None`: for ever).
    fn kept(notifications: Option<i64>, events: Option<i64>) -> Kept {
        Kept {
            notifications: notifications.map(chrono::Duration::days),
            events: events.map(chrono::Duration::days),
        }
    }

    #[test]
    fn an_event_dead_lettered_longer_ago_than_notifications_are_kept_is_not_routed_again() {
        let now = Utc::now();
        let week = kept(Some(7), None);
        let why = outlived_retention(now - chrono::Duration::days(10), now, week)
            .expect("ten days ago, seven kept");
        assert!(
            why.contains("10 d 0 h 0 min ago") && why.contains("are kept 7 d 0 h 0 min"),
            "{why}"
        );
        assert!(outlived_retention(now - chrono::Duration::days(7), now, week).is_some());
        assert!(
            outlived_retention(now - chrono::Duration::days(6), now, week).is_none(),
            "its notifications are all still stored, and the event's first copy stays as long"
        );
        assert!(
            outlived_retention(now - chrono::Duration::days(400), now, kept(None, Some(7)))
                .is_none(),
            "notifications kept for ever"
        );
    }

    /// A copy replayed now stays in `EVENTS` for the stream's age limit: it must be gone before
    /// the notifications the event made may be deleted.
    #[test]
    fn a_replayed_event_must_leave_the_stream_before_its_notifications_are_deleted() {
        let now = Utc::now();
        let kept = kept(Some(14), Some(7));
        let why = outlived_retention(now - chrono::Duration::days(7), now, kept)
            .expect("seven days ago, a copy kept seven more, notifications fourteen");
        assert!(
            why.contains("7 d 0 h 0 min ago")
                && why.contains("are kept 14 d 0 h 0 min")
                && why.contains("max_age_secs = 604800")
                && why.contains(&instant(now + chrono::Duration::days(7))),
            "names the numbers: {why}"
        );
        assert!(
            outlived_retention(
                now - chrono::Duration::days(7) + chrono::Duration::minutes(1),
                now,
                kept
            )
            .is_none(),
            "gone a minute before its notifications may be deleted"
        );
        assert!(
            outlived_retention(
                now,
                now,
                super::Kept {
                    notifications: Some(chrono::Duration::days(7)),
                    events: Some(chrono::Duration::MAX),
                }
            )
            .is_some(),
            "an age limit too large to add is refused, not overflowed"
        );
    }

    /// The Router made the notifications of an event's other rules when it first routed it, which
    /// can be long before its dead letter: their age counts from the event's `occurred_at` when
    /// that is earlier.
    #[test]
    fn an_event_that_occurred_before_it_was_dead_lettered_counts_from_then() {
        let now = Utc::now();
        let letter = |at| DeadLetter {
            seq: 1,
            subject: "dlq.events".into(),
            reason: Some("unknown customer".into()),
            original_subject: Some("events.customers.created".into()),
            deliveries: Some(1),
            providers: Vec::new(),
            at,
            payload: Default::default(),
        };
        let event_at = |occurred_at| DomainEvent {
            occurred_at,
            ..DomainEvent::new(herald_nats::EventData::CustomerCreated(
                herald_nats::events::CustomerCreated {
                    customer_id: "c-1".into(),
                    name: None,
                },
            ))
        };
        let event = event_at(now - chrono::Duration::days(8));
        let week = kept(Some(7), None);
        let dead_lettered_yesterday = letter(now - chrono::Duration::days(1));
        assert!(
            outlived_retention(routed_since(&dead_lettered_yesterday, &event), now, week).is_some(),
            "occurred eight days ago, seven kept"
        );
        let future = event_at(now + chrono::Duration::days(30));
        assert_eq!(
            routed_since(&dead_lettered_yesterday, &future),
            dead_lettered_yesterday.at,
            "an occurred_at after the dead letter counts for nothing"
        );
    }
}
