//! `Scheduler`: turns stored intentions into commands, so they survive restarts.
//!
//! Each round (every `poll_interval_ms`, one at a time, run as a task so the mailbox never waits
//! on the database or NATS) does two things side by side, so that a bulk send never holds up due
//! notifications:
//! 1. claims due `scheduled` notifications (`scheduled → queued` by conditional UPDATE, so two
//!    instances never both take one), publishes their commands rebuilt from the row, then clears
//!    the claim mark; a failed publish gives the claim back, but one NATS refuses as larger than
//!    its `max_payload` fails the notification (no retry would publish it). A claim's command goes
//!    under a `Nats-Msg-Id` of its own, `<id>:claim:<token>` ([`release_msg_id`]), not the
//!    notification's id: a deferred notification's first command went under that, and may still
//!    be in the stream's de-duplication window (set longer by another instance, say), where
//!    JetStream would drop the release and the notification would stay `queued` unsent. Should
//!    JetStream still take a new claim's command for a duplicate, the claim is given back, to be
//!    claimed anew under another token. Claims left unconfirmed by an
//!    instance that stopped mid-way, and API sends and dead-letter replays still marked as not
//!    yet published (their request stopped between storing and publishing), are published again
//!    after `stale_claim_secs` under the id they were first published with (`Nats-Msg-Id`
//!    de-duplication drops the copy if the first one did go out, and past the window a
//!    dispatcher's claim drops a command whose notification has moved on; a replay's copy goes
//!    under its replay's id, with its attempt base). While a claim
//!    comes back full (`claim_limit`) and all of it went out, the next chunk is claimed at once,
//!    for at most `bulk_round_ms`, and the next round then starts at once: many notifications due
//!    in the same second do not wait `poll_interval_ms` per `claim_limit`. A failure ends the
//!    round as usual, so a database or NATS outage is not retried in a tight loop;
//! 2. fans out bulk sends page by page under a lease (`batches.lease_until`): a page's
//!    notifications get ids derived from the batch and recipient, are inserted (existing ids are
//!    left alone) and published, then the batch's cursor advances (the lease is renewed at the end
//!    of the insert's transaction and again with the advance, so storing a page and publishing it need each fit within
//!    the lease, not both together) — a page redone after a restart duplicates nothing. A page
//!    that fails (a publish, a read, an insert) holds the batch back for a backoff instead of the
//!    rest of the lease: its lease is cut to end 1 s later, doubled with each failure of that
//!    batch in a row (kept by this instance, forgotten on a page that goes through), at most the
//!    lease's length, so a page that keeps failing (NATS refusing, a stream full) is tried ever
//!    less often rather than every round, and is redone soon after the cause goes away.
//!    Meanwhile the batch, still `running`, shows the failures in a row and the last one as its
//!    `error`, cleared by the next page that goes through. A filter's pages hold the customers
//!    created by the time the batch was accepted. A cancelled batch (`POST
//!    /api/v1/batches/{id}/cancel`) is no longer leased, and a page in flight when the cancel
//!    lands stores nothing (its lease renewal, in the insert's transaction, fails) or, stored
//!    before, has its notifications cancelled and cannot advance the batch.
//!
//! Beside the rounds, on a task of its own (one at a time, so that it never holds up due
//! notifications), the Scheduler finishes the batch cancels that stopped half-way, their lease
//! lapsed (an instance stopped while it cancelled: a request cut short by a shutdown's grace, a
//! crash), so that the rest of a cancelled campaign does not go out (`finish_cancels`).
//!
//! Retention runs beside the rounds, on a task of its own (one at a time, so a long clean-up never
//! holds up due notifications): at most every `retention_interval_secs` it deletes the final
//! notifications older than `retention_days` (0 keeps everything), [`RETENTION_BATCH`] at a time
//! until none are left, resting between batches so that other writers get the database. Each
//! clean-up (also with `retention_days` 0) first removes the held receipts that no send will apply
//! ([`repo::receipts::drop_stranded`]) and forgets the webhook secrets replaced longer than
//! `channels.webhook.rotation_grace_secs` ago; a failure of either is logged and retention runs
//! all the same.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use herald_entities::{
    NotificationStatus, WriteGate, notification,
    repo::{
        self,
        batches::{BatchCancel, CustomerFilter},
        cancel_events::cancel_batch_announced,
        dead_letters::PendingReplay,
        status_batch::{self, StatusChange},
    },
};
use herald_nats::{
    Contacts, Publisher, SCHEMA_VERSION, SendCommand, Stored,
    batch::{BatchRecipient, BatchSpec, BatchTarget, batch_notification_id},
    release_msg_id,
};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use sea_orm::{ActiveValue::Set, DatabaseConnection};
use serde::{Deserialize, Serialize};
use tokio_util::sync::{CancellationToken, DropGuard};
use uuid::Uuid;

use crate::policy::Clock;

/// Scheduler settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct SchedulerSettings {
    /// Pause between rounds, in milliseconds.
    pub poll_interval_ms: u64,
    /// Scheduled notifications claimed at once at most (the configuration allows 1 to 10,000: a
    /// claim binds a SQL parameter per notification); while a claim comes back full, the next
    /// follows at once.
    pub claim_limit: u64,
    /// Seconds after which an unconfirmed claim or API send is published again; below
    /// `nats.dedup_window_secs`, so that the copy of a command that did go out is dropped.
    pub stale_claim_secs: u64,
    /// Recipients per bulk page.
    pub bulk_page_size: u64,
    /// Longest a round spends on bulk pages, or on claiming due notifications chunk after chunk,
    /// in milliseconds (then the next round goes on).
    pub bulk_round_ms: u64,
    /// Seconds a bulk lease lasts; renewed with every page.
    pub bulk_lease_secs: u64,
    /// Days final notifications and their attempts are kept; 0 keeps them forever.
    pub retention_days: u32,
    /// Seconds between two clean-ups.
    pub retention_interval_secs: u64,
}

impl Default for SchedulerSettings {
    fn default() -> Self {
        Self {
            poll_interval_ms: 1_000,
            claim_limit: 500,
            stale_claim_secs: 30,
            bulk_page_size: 500,
            bulk_round_ms: 5_000,
            bulk_lease_secs: 60,
            retention_days: 0,
            retention_interval_secs: 3_600,
        }
    }
}

/// Messages of the [`Scheduler`].
pub enum SchedulerMsg {
    /// Time for a round (internal).
    Tick,
    /// A round finished (internal); `more` when it left due notifications behind (its last claim
    /// was full), so the next round starts at once instead of after `poll_interval_ms`.
    RoundDone {
        /// Due notifications are left: start the next round at once.
        more: bool,
    },
    /// Run a round now and reply once a round that started after this request is done (tests,
    /// operations): when a round is running, another follows it at once.
    RunNow(RpcReplyPort<()>),
    /// A retention clean-up finished (internal).
    PurgeDone,
    /// A look for batch cancels that stopped half-way finished (internal).
    CancelsDone,
}

/// Final notifications retention deletes per statement.
pub const RETENTION_BATCH: u64 = 1_000;

/// Arguments of the [`Scheduler`].
#[derive(Clone)]
pub struct SchedulerArgs {
    /// Database pool.
    pub db: DatabaseConnection,
    /// Publisher of commands.
    pub publisher: Publisher,
    /// Settings.
    pub settings: SchedulerSettings,
    /// Wall clock (what is due).
    pub clock: Clock,
    /// The engine's turns for batch writes on SQLite, which finishing a batch cancel takes as the
    /// API's cancel does ([`WriteGate`]).
    pub write_gate: WriteGate,
    /// Seconds a replaced webhook secret signs beside its successor
    /// (`channels.webhook.rotation_grace_secs`): each clean-up forgets the ones replaced longer
    /// ago.
    pub webhook_rotation_grace_secs: u64,
}

/// State of the [`Scheduler`].
pub struct SchedulerState {
    args: SchedulerArgs,
    running: bool,
    /// Answered when the running round is done: it started after their request.
    waiters: Vec<RpcReplyPort<()>>,
    /// Asked while a round was running: answered after the next one.
    next_waiters: Vec<RpcReplyPort<()>>,
    /// A `Tick` is on its way. Only a round's end sends one, and only when none is on its way, so
    /// one chain of ticks exists however many rounds `RunNow` adds.
    tick_pending: bool,
    last_retention: Option<Instant>,
    /// Failed bulk pages in a row, per batch (shared with the round's task).
    backoff: Arc<Mutex<BulkBackoff>>,
    /// A retention clean-up is running.
    purging: bool,
    /// Batch cancels that stopped half-way are being finished ([`start_finishing_cancels`]).
    finishing_cancels: bool,
    /// Asked for while that ran: once more when it is done (it may have looked too early).
    finish_cancels_again: bool,
    stop: CancellationToken,
    /// Cancels a running round or clean-up if the actor dies.
    _guard: DropGuard,
}

/// The scheduler.
pub struct Scheduler;

impl Actor for Scheduler {
    type Msg = SchedulerMsg;
    type State = SchedulerState;
    type Arguments = SchedulerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SchedulerArgs,
    ) -> Result<SchedulerState, ActorProcessingErr> {
        let _ = myself.cast(SchedulerMsg::Tick);
        let stop = CancellationToken::new();
        Ok(SchedulerState {
            args,
            running: false,
            waiters: Vec::new(),
            next_waiters: Vec::new(),
            tick_pending: true,
            last_retention: None,
            backoff: Arc::default(),
            purging: false,
            finishing_cancels: false,
            finish_cancels_again: false,
            _guard: stop.clone().drop_guard(),
            stop,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: SchedulerMsg,
        state: &mut SchedulerState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SchedulerMsg::Tick => {
                state.tick_pending = false;
                start_purge(&myself, state);
                start_finishing_cancels(&myself, state);
                start_round(&myself, state);
            }
            SchedulerMsg::RunNow(reply) => {
                start_purge(&myself, state);
                start_finishing_cancels(&myself, state);
                if state.running {
                    // The running round may have read the database before the caller's change.
                    state.next_waiters.push(reply);
                } else {
                    state.waiters.push(reply);
                    start_round(&myself, state);
                }
            }
            SchedulerMsg::PurgeDone => state.purging = false,
            SchedulerMsg::CancelsDone => {
                state.finishing_cancels = false;
                if std::mem::take(&mut state.finish_cancels_again) {
                    start_finishing_cancels(&myself, state);
                }
            }
            SchedulerMsg::RoundDone { more } => {
                state.running = false;
                for waiter in state.waiters.drain(..) {
                    let _ = waiter.send(());
                }
                if !state.next_waiters.is_empty() {
                    state.waiters = std::mem::take(&mut state.next_waiters);
                    start_round(&myself, state);
                } else if more {
                    // Its end sends the tick if none is on its way.
                    start_round(&myself, state);
                } else if !state.tick_pending {
                    state.tick_pending = true;
                    let interval =
                        Duration::from_millis(state.args.settings.poll_interval_ms.max(10));
                    myself.send_after(interval, || SchedulerMsg::Tick);
                }
            }
        }
        Ok(())
    }
}

fn start_round(myself: &ActorRef<SchedulerMsg>, state: &mut SchedulerState) {
    if state.running {
        return;
    }
    state.running = true;
    let args = state.args.clone();
    let backoff = state.backoff.clone();
    let stop = state.stop.clone();
    let mut done = WhenDone(
        myself.clone(),
        Some(SchedulerMsg::RoundDone { more: false }),
    );
    tokio::spawn(async move {
        tokio::select! {
            _ = stop.cancelled() => {}
            more = round(&args, &backoff) => done.1 = Some(SchedulerMsg::RoundDone { more }),
        }
        drop(done);
    });
}

/// Tells the scheduler a task of its ended when dropped (with the message it holds then): when it
/// finished, and also when it panicked, so that one bad round or clean-up cannot stop every later
/// one.
struct WhenDone(ActorRef<SchedulerMsg>, Option<SchedulerMsg>);

impl Drop for WhenDone {
    fn drop(&mut self) {
        if let Some(message) = self.1.take() {
            let _ = self.0.cast(message);
        }
    }
}

/// Starts finishing the batch cancels that stopped half-way ([`finish_cancels`]) on a task of
/// its own, every tick beside the round; while that task runs, once more after it.
fn start_finishing_cancels(myself: &ActorRef<SchedulerMsg>, state: &mut SchedulerState) {
    if state.finishing_cancels {
        state.finish_cancels_again = true;
        return;
    }
    state.finishing_cancels = true;
    let args = state.args.clone();
    let done = WhenDone(myself.clone(), Some(SchedulerMsg::CancelsDone));
    tokio::spawn(async move {
        finish_cancels(&args).await;
        drop(done);
    });
}

/// Starts a clean-up on a task of its own when one is due and none is running: every
/// `retention_interval_secs`, the removal of stranded held receipts
/// ([`repo::receipts::drop_stranded`]) and of the webhook secrets whose rotation grace is over
/// ([`forget_replaced_secrets`]), then retention ([`purge`]) when `retention_days` is set.
/// A failed removal is logged (a failed removal of held receipts also counted,
/// `herald_held_receipts_sweep_failures_total`) and costs the rest nothing.
fn start_purge(myself: &ActorRef<SchedulerMsg>, state: &mut SchedulerState) {
    let settings = state.args.settings;
    let due = !state.purging
        && state
            .last_retention
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(settings.retention_interval_secs));
    if !due {
        return;
    }
    state.purging = true;
    state.last_retention = Some(Instant::now());
    let args = state.args.clone();
    let stop = state.stop.clone();
    let done = WhenDone(myself.clone(), Some(SchedulerMsg::PurgeDone));
    tokio::spawn(async move {
        if let Err(err) = repo::receipts::drop_stranded(&args.db).await {
            tracing::warn!(error = %err, "scheduler: clean-up of held receipts failed");
            metrics::counter!("herald_held_receipts_sweep_failures_total").increment(1);
        }
        forget_replaced_secrets(&args).await;
        if settings.retention_days > 0 {
            retain(&args, settings.retention_days, &stop).await;
        }
        drop(done);
    });
}

/// Forgets the webhook secrets replaced longer than `webhook_rotation_grace_secs` ago
/// ([`repo::customers::forget_replaced_webhook_secrets`]): they sign nothing any more. A failure
/// is logged; the next clean-up tries again.
async fn forget_replaced_secrets(args: &SchedulerArgs) {
    let grace = crate::channel::webhook::rotation_grace(args.webhook_rotation_grace_secs);
    // A grace too long to subtract from now keeps every replaced secret.
    let Some(cutoff) = (args.clock)().checked_sub_signed(grace) else {
        return;
    };
    match repo::customers::forget_replaced_webhook_secrets(&args.db, cutoff).await {
        Ok(0) => {}
        Ok(forgotten) => tracing::info!(
            forgotten,
            "scheduler: forgot the webhook secrets replaced longer than their rotation grace ago"
        ),
        Err(err) => {
            tracing::warn!(error = %err, "scheduler: clean-up of replaced webhook secrets failed");
        }
    }
}

/// Deletes the final notifications older than `days` ([`purge`]), logging and counting what went.
async fn retain(args: &SchedulerArgs, days: u32, stop: &CancellationToken) {
    let cutoff = (args.clock)() - chrono::Duration::days(i64::from(days));
    match purge(&args.db, cutoff, RETENTION_BATCH, stop).await {
        Ok(0) => {}
        Ok(removed) => {
            tracing::info!(removed, %cutoff, "retention: removed old notifications");
            metrics::counter!("herald_retention_removed_total").increment(removed);
        }
        Err(err) => tracing::warn!(error = %err, "scheduler: retention clean-up failed"),
    }
}

/// A round: releases due notifications and fans out bulk sends side by side, so a long bulk page
/// never holds up due notifications. Answers whether due notifications are left (see
/// [`release_all_due`]).
async fn round(args: &SchedulerArgs, backoff: &Mutex<BulkBackoff>) -> bool {
    let bulk = async {
        if let Err(err) = fan_out(args, backoff).await {
            tracing::warn!(error = %err, "scheduler: bulk fan-out failed");
        }
    };
    tokio::join!(release_all_due(args), bulk).0
}

/// How many batch cancels that stopped half-way a round finishes at most.
const CANCELS_PER_ROUND: u64 = 4;

/// Finishes the cancels of batches that stopped half-way, their lease lapsed
/// ([`repo::batches::unfinished_cancels`]): each taken first ([`repo::batches::take_cancel`], so
/// that one instance does it), then cancelled as `POST /api/v1/batches/{id}/cancel` does (chunk
/// by chunk, with the request's reason and `cancelled` events), and logged. A failure is logged
/// and leaves the batch to a later round, once the lease lapses again.
async fn finish_cancels(args: &SchedulerArgs) {
    let now = (args.clock)();
    let batches = match repo::batches::unfinished_cancels(&args.db, now, CANCELS_PER_ROUND).await {
        Ok(batches) => batches,
        Err(err) => {
            tracing::warn!(error = %err, "scheduler: looking for unfinished batch cancels failed");
            return;
        }
    };
    for batch in batches {
        if let Err(err) = finish_cancel(args, batch).await {
            tracing::warn!(%batch, error = %err, "scheduler: finishing a batch cancel failed");
        }
    }
}

/// Takes the cancel of `batch` that stopped half-way and finishes it, unless another instance
/// took it first.
async fn finish_cancel(
    args: &SchedulerArgs,
    batch: Uuid,
) -> Result<(), herald_entities::RepoError> {
    // The clock read again: the batch before this one may have taken a while.
    if !repo::batches::take_cancel(&args.db, batch, (args.clock)()).await? {
        return Ok(());
    }
    let (db, gate, publisher) = (&args.db, &args.write_gate, &args.publisher);
    if let BatchCancel::Cancelled { notifications, .. } =
        cancel_batch_announced(db, gate, publisher, batch).await?
    {
        tracing::warn!(
            %batch,
            notifications,
            "finished a batch cancel that had stopped half-way"
        );
    }
    Ok(())
}

/// Releases due notifications `claim_limit` at a time while each claim comes back full and all
/// of it went out, for at most `bulk_round_ms`: 100k notifications due in the same second go out
/// without waiting `poll_interval_ms` between chunks. Answers whether more are left when the time
/// is up; a failure (the database, NATS) ends it with `false`, so the next round waits its turn.
async fn release_all_due(args: &SchedulerArgs) -> bool {
    let started = Instant::now();
    let budget = Duration::from_millis(args.settings.bulk_round_ms);
    loop {
        match release_due(args).await {
            Ok(true) if started.elapsed() < budget => tokio::task::yield_now().await,
            Ok(more) => return more,
            Err(err) => {
                tracing::warn!(error = %err, "scheduler: releasing due notifications failed");
                return false;
            }
        }
    }
}

/// Releases up to `claim_limit` due notifications, and as many stale claims. Answers whether more
/// may be left and the next chunk may go at once: a claim came back full (or found as many due,
/// some taken first by another instance's claim), and every command was published (one NATS did
/// not take is tried again after `poll_interval_ms`, not at once).
async fn release_due(args: &SchedulerArgs) -> Result<bool, String> {
    let now = (args.clock)();
    let limit = args.settings.claim_limit;
    let claim = repo::schedule::claim_due(&args.db, now, limit)
        .await
        .map_err(|e| e.to_string())?;
    let mut rows = claim.rows;
    let stale_before = now - chrono::Duration::seconds(args.settings.stale_claim_secs as i64);
    let stale = repo::schedule::stale_claims(&args.db, stale_before, limit)
        .await
        .map_err(|e| e.to_string())?;
    let full = claim.full || stale.len() as u64 >= limit.max(1);
    // Claimed now, then claimed (or stored, or requeued) by earlier rounds and left unconfirmed.
    let claimed_now = rows.len();
    rows.extend(stale);
    if rows.is_empty() {
        // Another instance's claim may have taken every row this one found.
        return Ok(full);
    }
    let mut unpublishable = Vec::new();
    let mut commands = Vec::new();
    for (index, row) in rows.iter().enumerate() {
        match repo::notifications::send_command(row).map_err(|e| e.to_string()) {
            Ok(command) => commands.push(Outgoing {
                key: row.recipient_key.clone(),
                command,
                release: Release::of(row, index < claimed_now),
            }),
            Err(reason) => unpublishable.push(failure(
                row.id,
                format!("scheduled notification unreadable: {reason}"),
                reason,
            )),
        }
    }
    fail(args, &unpublishable).await?;
    let published = publish_all(&args.publisher, &commands).await;
    metrics::counter!("herald_scheduled_released_total").increment(published.done.len() as u64);
    confirm(args, &commands, &published.done)
        .await
        .map_err(|e| e.to_string())?;
    let all_out = published.failed.is_empty();
    if !all_out {
        tracing::warn!(
            failed = published.failed.len(),
            first_reason = published.failed_reason.as_deref().unwrap_or_default(),
            "scheduler: could not publish; will retry"
        );
        repo::schedule::unclaim(&args.db, &published.failed)
            .await
            .map_err(|e| e.to_string())?;
    }
    fail_too_large(args, published.too_large).await?;
    Ok(full && all_out)
}

/// Fails the notifications whose commands NATS refused as larger than its `max_payload`.
async fn fail_too_large(args: &SchedulerArgs, refused: Vec<(Uuid, String)>) -> Result<(), String> {
    let changes: Vec<StatusChange> = refused
        .into_iter()
        .map(|(id, reason)| {
            tracing::warn!(%id, %reason, "scheduler: command larger than NATS takes; failed");
            failure(
                id,
                format!(
                    "larger than the NATS server takes ({reason}): send less, or raise the \
                     server's max_payload"
                ),
                reason,
            )
        })
        .collect();
    fail(args, &changes).await
}

/// The change of notification `id` to `failed`, with `reason` shown and `error` recorded.
fn failure(id: Uuid, reason: String, error: String) -> StatusChange {
    StatusChange {
        reason: Some(reason),
        error: Some(error),
        ..StatusChange::to(id, NotificationStatus::Failed)
    }
}

/// Fails the notifications no publish can send (unreadable, or larger than NATS takes), and
/// publishes their status events.
async fn fail(args: &SchedulerArgs, changes: &[StatusChange]) -> Result<(), String> {
    if changes.is_empty() {
        return Ok(());
    }
    let applied = status_batch::apply(&args.db, changes, &[])
        .await
        .map_err(|e| e.to_string())?;
    use crate::status_writer::{moved_events, publish_events};
    publish_events(&args.publisher, moved_events(&applied, changes));
    Ok(())
}

/// A command to publish.
struct Outgoing {
    /// Its recipient's key (the partition).
    key: String,
    command: SendCommand,
    /// Which publish of the command this is, and so its `Nats-Msg-Id`.
    release: Release,
}

/// Which publish of a command an [`Outgoing`] is: what its `Nats-Msg-Id` is, and whether
/// JetStream may have stored that id before.
enum Release {
    /// The notification's first command, under the notification's id: a bulk page's, or an API
    /// send's left unconfirmed (a copy that did go out is a duplicate JetStream drops).
    First,
    /// A Scheduler's claim of a notification come due (scheduled, or deferred): under
    /// [`release_msg_id`] with the claim's token, never the notification's id, which its first
    /// command (an API send's, before a deferral) may still hold in the de-duplication window.
    Claim {
        /// The claim's token, from its mark.
        token: String,
        /// Claimed in this round, so never published before: JetStream taking it for a duplicate
        /// would drop it unseen, and it is given back to be claimed anew (under a new token). A
        /// stale claim's copy is published again under the same id so that it is dropped if
        /// the first one went out.
        fresh: bool,
    },
    /// A dead-letter replay's command, left unconfirmed: as its replay published it.
    Replay(Replay),
}

impl Release {
    /// The publish `row`'s command is, read from its mark; `fresh` when this round claimed it.
    fn of(row: &notification::Model, fresh: bool) -> Self {
        if let Some(pending) = PendingReplay::of(row) {
            return Release::Replay(Replay {
                pending,
                attempts_before: row.attempts,
            });
        }
        match row
            .status_reason
            .as_deref()
            .and_then(|reason| reason.strip_prefix(repo::schedule::CLAIM_PREFIX))
        {
            Some(token) => Release::Claim {
                token: token.to_string(),
                fresh,
            },
            None => Release::First,
        }
    }
}

/// How an unconfirmed replay's command goes out again: as its replay published it.
struct Replay {
    /// The replay, whose `Nats-Msg-Id` the command goes under: the notification's own id may
    /// still be in the de-duplication window of its first command.
    pending: PendingReplay,
    /// The attempts recorded before the replay: its rounds count from there.
    attempts_before: i32,
}

impl Outgoing {
    /// A first publish of `command`.
    fn new(key: String, command: SendCommand) -> Self {
        Self {
            key,
            command,
            release: Release::First,
        }
    }

    async fn publish(&self, publisher: &Publisher) -> Result<(), herald_nats::NatsError> {
        let id = self.command.notification_id;
        match &self.release {
            Release::First => publisher.publish_command(&self.key, &self.command).await,
            Release::Claim { token, fresh } => {
                let msg_id = release_msg_id(id, token);
                let stored = publisher
                    .publish_command_as(&self.key, &self.command, &msg_id)
                    .await?;
                claim_published(*fresh, stored, msg_id).inspect_err(|_| {
                    tracing::warn!(%id, "scheduler: JetStream dropped a new release as a duplicate; given back");
                })
            }
            Release::Replay(replay) => {
                let payload = self.command.encode()?;
                let msg_id = replay.pending.msg_id(id);
                publisher
                    .republish_command(&self.key, payload, &msg_id, replay.attempts_before)
                    .await
            }
        }
    }
}

/// Whether a claim's command under `msg_id` is out, from what JetStream did with it: stored, or
/// a duplicate of a stale claim's (its first publish got out). A new claim's taken for a
/// duplicate was dropped, and confirming the claim would leave the notification `queued` with no
/// command: that is an error, so that the claim is given back.
fn claim_published(
    fresh: bool,
    stored: Stored,
    msg_id: String,
) -> Result<(), herald_nats::NatsError> {
    match (fresh, stored) {
        (true, Stored::Duplicate) => Err(herald_nats::NatsError::Duplicate { msg_id }),
        _ => Ok(()),
    }
}

/// Clears the marks of the `published` commands among `commands`: a replay's by its own mark, the
/// others together.
async fn confirm(
    args: &SchedulerArgs,
    commands: &[Outgoing],
    published: &[Uuid],
) -> Result<(), repo::RepoError> {
    let published: HashSet<&Uuid> = published.iter().collect();
    let mut first = Vec::with_capacity(published.len());
    for outgoing in commands {
        let id = outgoing.command.notification_id;
        if !published.contains(&id) {
            continue;
        }
        match &outgoing.release {
            Release::Replay(replay) => {
                repo::dead_letters::confirm_replayed(&args.db, id, &replay.pending).await?
            }
            Release::First | Release::Claim { .. } => first.push(id),
        }
    }
    repo::schedule::confirm_published(&args.db, &first).await
}

/// What became of a round's publishes.
#[derive(Debug, Default)]
struct Published {
    /// Published.
    done: Vec<Uuid>,
    /// Not published, for now (NATS unavailable): tried again.
    failed: Vec<Uuid>,
    /// Why the first of `failed` was not published.
    failed_reason: Option<String>,
    /// Refused as larger than the server's `max_payload`, with the client's reason: no retry
    /// can publish them.
    too_large: Vec<(Uuid, String)>,
}

/// Publishes commands concurrently (acks pipelined).
async fn publish_all(publisher: &Publisher, commands: &[Outgoing]) -> Published {
    let results =
        futures::future::join_all(commands.iter().map(|outgoing| outgoing.publish(publisher)))
            .await;
    let mut published = Published::default();
    for (outgoing, result) in commands.iter().zip(results) {
        let id = outgoing.command.notification_id;
        match result {
            Ok(()) => published.done.push(id),
            Err(herald_nats::NatsError::TooLarge { reason, .. }) => {
                published.too_large.push((id, reason))
            }
            Err(err) => {
                published.failed.push(id);
                published
                    .failed_reason
                    .get_or_insert_with(|| err.to_string());
            }
        }
    }
    published
}

/// How long a bulk batch rests after its first failed page in a row; doubled with each further
/// one.
const BULK_BACKOFF: Duration = Duration::from_secs(1);

/// Failed pages in a row of the bulk batches this instance worked on.
#[derive(Debug, Default)]
struct BulkBackoff {
    failures: HashMap<Uuid, u32>,
}

impl BulkBackoff {
    /// Counts a failed page of `batch` and answers the failures in a row and how long the batch
    /// rests: [`BULK_BACKOFF`], doubled with each failure in a row, at most `longest`.
    fn failed(&mut self, batch: Uuid, longest: Duration) -> (u32, Duration) {
        let failures = self.failures.entry(batch).or_insert(0);
        *failures = failures.saturating_add(1);
        (
            *failures,
            crate::retry::doubling(BULK_BACKOFF, *failures, longest),
        )
    }

    /// Forgets the failures of `batch`: a page of it went through (or it is finished).
    fn succeeded(&mut self, batch: Uuid) {
        self.failures.remove(&batch);
    }
}

/// Takes the next bulk batch whose lease is free and fans it out ([`pages`]). A failed page is
/// logged here, and the batch is held back for the backoff of [`BulkBackoff`].
async fn fan_out(args: &SchedulerArgs, backoff: &Mutex<BulkBackoff>) -> Result<(), String> {
    let started = Instant::now();
    let lease = chrono::Duration::seconds(args.settings.bulk_lease_secs.max(5) as i64);
    let now = (args.clock)();
    // The lease this instance holds: the batch is changed only while it is still the stored one.
    let mut held = now + lease;
    let Some(mut batch) = repo::batches::lease_next(&args.db, now, held)
        .await
        .map_err(|e| e.to_string())?
    else {
        return Ok(());
    };
    let spec: BatchSpec = match serde_json::from_value(batch.spec.clone()) {
        Ok(spec) => spec,
        Err(err) => {
            let reason = format!("unreadable batch: {err}");
            repo::batches::fail(&args.db, batch.id, held, &reason)
                .await
                .map_err(|e| e.to_string())?;
            return Err(reason);
        }
    };
    let cursor = batch.cursor.clone();
    let fanned = pages(args, &spec, &mut batch, &mut held, started).await;
    let (failures, rest, error) = {
        let mut backoff = backoff
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if fanned.is_ok() || batch.cursor != cursor {
            backoff.succeeded(batch.id);
        }
        let Err(error) = &fanned else {
            return Ok(());
        };
        let (failures, rest) = backoff.failed(batch.id, lease.to_std().unwrap_or(BULK_BACKOFF));
        (failures, rest, error)
    };
    metrics::counter!("herald_bulk_page_failures_total").increment(1);
    tracing::warn!(batch = %batch.id, %error, failures, retry_in_ms = rest.as_millis() as u64, "scheduler: bulk page failed; the batch rests");
    // Hold the batch back for the backoff, not the rest of the lease: the page is redone soon
    // after the cause goes away (here or on another instance; ids make redoing it harmless), and
    // not every round while it lasts.
    let until = (args.clock)() + chrono::Duration::from_std(rest).unwrap_or(lease);
    // Shown on the batch, which stays `running`, until a page goes through.
    let shown = failing(failures, error);
    if let Err(err) = repo::batches::hold(&args.db, batch.id, held, until, &shown).await {
        tracing::warn!(batch = %batch.id, error = %err, "scheduler: bulk lease not shortened");
    }
    Ok(())
}

/// What a batch whose pages fail shows as its `error`: the failures in a row and the last one.
fn failing(failures: u32, error: &str) -> String {
    let pages = if failures == 1 { "page" } else { "pages" };
    format!("{failures} failed {pages} in a row; the last: {error}")
}

/// Fans out `batch` page by page while this instance holds its lease `held` (renewed after each
/// page's insert and again once it is published), until it is done, the lease is lost, or the
/// round's budget is spent. On an error the caller holds the batch back for a backoff.
async fn pages(
    args: &SchedulerArgs,
    spec: &BatchSpec,
    batch: &mut herald_entities::batch::Model,
    held: &mut chrono::DateTime<Utc>,
    started: Instant,
) -> Result<(), String> {
    let budget = Duration::from_millis(args.settings.bulk_round_ms);
    let lease = chrono::Duration::seconds(args.settings.bulk_lease_secs.max(5) as i64);
    loop {
        let (page, cursor) =
            next_page(args, spec, batch.created_at, batch.cursor.as_deref()).await?;
        let done = (page.len() as u64) < args.settings.bulk_page_size.max(1);
        let created_at = Utc::now();
        let mut rows = Vec::with_capacity(page.len());
        let mut commands = Vec::with_capacity(page.len());
        for recipient in page {
            let command = SendCommand {
                v: SCHEMA_VERSION,
                notification_id: batch_notification_id(batch.id, batch.created_at, &recipient.key),
                customer_id: recipient.customer_id,
                contacts: recipient.contacts,
                category: spec.category,
                channels: spec.channels.clone(),
                content: spec.content.for_recipient(&recipient.variables),
                created_at,
            };
            rows.push(row_for(&command, &recipient.key, batch.id));
            commands.push(Outgoing::new(recipient.key, command));
        }
        // Renewed with the insert, before the publishes too, not only once the page is done: a
        // page whose insert and publishes together outlast the lease would otherwise be taken
        // over and redone by another instance, round after round, and never advance. In the
        // insert's transaction, so that a batch cancelled meanwhile gets no page stored.
        let renewal = || (args.clock)() + lease;
        let Some((new, renewed)) =
            repo::batches::insert_page(&args.db, batch.id, *held, renewal, rows)
                .await
                .map_err(|e| e.to_string())?
        else {
            tracing::warn!(batch = %batch.id, "bulk batch lease lost to another instance, or the batch was cancelled");
            return Ok(());
        };
        *held = renewed;
        // Counted when stored: the rows of a page redone (after a failed publish, or by another
        // instance that took the batch) exist already and are not new.
        metrics::counter!("herald_notifications_accepted_total", "source" => "bulk").increment(new);
        let published = publish_all(&args.publisher, &commands).await;
        if !published.failed.is_empty() {
            return Err(format!(
                "batch {}: {} commands not published: {}",
                batch.id,
                published.failed.len(),
                published.failed_reason.unwrap_or_default()
            ));
        }
        // Not sent, ever: failed, and the batch goes on.
        fail_too_large(args, published.too_large).await?;
        let published = published.done;
        let count = batch.published + published.len() as i64;
        let now = (args.clock)();
        let cursor = cursor.unwrap_or_else(|| batch.cursor.clone().unwrap_or_default());
        let renewed = now + lease;
        let advanced =
            repo::batches::advance(&args.db, batch.id, *held, &cursor, count, done, renewed)
                .await
                .map_err(|e| e.to_string())?;
        if !advanced {
            // The page outlived the lease and another instance took the batch: it goes on from
            // the cursor it read (this page's notifications are stored and published under the
            // same ids, so redoing it is harmless). Or the batch was cancelled: the cancel
            // cancelled this page's notifications, and a dispatcher drops their commands.
            tracing::warn!(batch = %batch.id, "bulk batch lease lost to another instance, or the batch was cancelled");
            return Ok(());
        }
        *held = renewed;
        metrics::counter!("herald_bulk_published_total").increment(published.len() as u64);
        batch.published = count;
        batch.cursor = Some(cursor);
        if done {
            tracing::info!(batch = %batch.id, published = count, "bulk fan-out finished");
            return Ok(());
        }
        if started.elapsed() >= budget {
            // Let the next round (here or on another instance) go on at once.
            return repo::batches::release(&args.db, batch.id, *held)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string());
        }
    }
}

/// The recipients after `cursor`, and the cursor after them (`None` for an empty page). A filter
/// selects the customers created by `accepted_at`, when the batch was accepted (and counted).
async fn next_page(
    args: &SchedulerArgs,
    spec: &BatchSpec,
    accepted_at: chrono::DateTime<Utc>,
    cursor: Option<&str>,
) -> Result<(Vec<BatchRecipient>, Option<String>), String> {
    let size = args.settings.bulk_page_size.max(1);
    match &spec.target {
        BatchTarget::Recipients { recipients } => {
            let from: usize = cursor.and_then(|c| c.parse().ok()).unwrap_or(0);
            let to = (from + size as usize).min(recipients.len());
            let page = recipients.get(from..to).unwrap_or_default().to_vec();
            Ok((page, Some(to.to_string())))
        }
        BatchTarget::Filter {
            locale,
            external_id_prefix,
        } => {
            let filter = CustomerFilter {
                locale: locale.clone(),
                external_id_prefix: external_id_prefix.clone(),
                created_by: Some(accepted_at),
            };
            let customers = repo::batches::customers_page(&args.db, &filter, cursor, size)
                .await
                .map_err(|e| e.to_string())?;
            let next = customers.last().map(|c| c.external_id.clone());
            let page = customers
                .into_iter()
                .map(|c| BatchRecipient {
                    key: c.external_id.clone(),
                    customer_id: Some(c.external_id),
                    contacts: Contacts::default(),
                    variables: Default::default(),
                })
                .collect();
            Ok((page, next))
        }
    }
}

fn row_for(command: &SendCommand, key: &str, batch_id: Uuid) -> notification::ActiveModel {
    notification::ActiveModel {
        id: Set(command.notification_id),
        request_id: Set(None),
        request_fingerprint: Set(None),
        customer_id: Set(command.customer_id.clone()),
        recipient_key: Set(key.to_string()),
        contacts: Set(serde_json::to_value(&command.contacts).unwrap_or_default()),
        category: Set(command.category.as_str().to_string()),
        channels: Set(serde_json::to_value(&command.channels).unwrap_or_default()),
        content: Set(serde_json::to_value(&command.content).unwrap_or_default()),
        status: Set(NotificationStatus::Queued),
        status_reason: Set(None),
        scheduled_at: Set(None),
        final_channel: Set(None),
        attempts: Set(0),
        error: Set(None),
        created_at: Set(command.created_at),
        updated_at: Set(command.created_at),
        sent_at: Set(None),
        batch_id: Set(Some(batch_id)),
    }
}

/// Deletes every final notification last changed before `cutoff`, with its attempts, `batch` at a
/// time until fewer than `batch` were left to choose, and returns how many went. Between two
/// batches it rests as long as the last one took (at least [`PURGE_REST_MIN`], at most
/// [`PURGE_REST_MAX`]): on SQLite each DELETE holds the only write lock, so other writers get it
/// at least half the time. Stops after the current batch once `stop` is cancelled (the engine is stopping).
pub async fn purge(
    db: &DatabaseConnection,
    cutoff: chrono::DateTime<Utc>,
    batch: u64,
    stop: &CancellationToken,
) -> Result<u64, repo::RepoError> {
    let batch = batch.max(1);
    let mut total = 0u64;
    while !stop.is_cancelled() {
        let started = Instant::now();
        let purged = repo::schedule::purge_before(db, cutoff, batch).await?;
        total += purged.removed;
        // Fewer chosen than asked for: none are left. Fewer removed only says that some chosen
        // changed meanwhile; more may be left behind them.
        if purged.chosen < batch {
            break;
        }
        let rest = started.elapsed().clamp(PURGE_REST_MIN, PURGE_REST_MAX);
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(rest) => {}
        }
    }
    Ok(total)
}

/// Shortest rest between two retention batches.
pub const PURGE_REST_MIN: Duration = Duration::from_millis(10);
/// Longest rest between two retention batches.
pub const PURGE_REST_MAX: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    fn row(status: NotificationStatus, reason: Option<String>) -> notification::Model {
        let now = Utc::now();
        notification::Model {
            id: Uuid::now_v7(),
            request_id: None,
            request_fingerprint: None,
            customer_id: None,
            recipient_key: "ada".into(),
            contacts: serde_json::json!({}),
            category: "transactional".into(),
            channels: serde_json::json!(["email"]),
            content: serde_json::json!({ "text": "Hello." }),
            status,
            status_reason: reason,
            scheduled_at: None,
            final_channel: None,
            attempts: 2,
            error: None,
            created_at: now,
            updated_at: now,
            sent_at: None,
            batch_id: None,
        }
    }

    #[test]
    fn a_claim_goes_under_its_token_and_other_marks_under_their_first_id() {
        let token = Uuid::new_v4().to_string();
        let claimed = row(
            NotificationStatus::Queued,
            Some(format!("{}{token}", repo::schedule::CLAIM_PREFIX)),
        );
        for fresh in [true, false] {
            match Release::of(&claimed, fresh) {
                Release::Claim {
                    token: read,
                    fresh: read_fresh,
                } => {
                    assert_eq!((read.as_str(), read_fresh), (token.as_str(), fresh));
                    // The stale sweep reads the same mark: the same id as the claim's first publish.
                    assert_eq!(
                        release_msg_id(claimed.id, &read),
                        format!("{}:claim:{token}", claimed.id)
                    );
                }
                _ => panic!("a claim's mark is a claim"),
            }
        }
        let api = row(
            NotificationStatus::Queued,
            Some(repo::schedule::PUBLISH_PENDING.into()),
        );
        assert!(matches!(Release::of(&api, false), Release::First));
        let pending = PendingReplay::new(7);
        let replayed = row(NotificationStatus::Queued, Some(pending.mark()));
        match Release::of(&replayed, false) {
            Release::Replay(replay) => {
                assert_eq!(replay.pending, pending);
                assert_eq!(replay.attempts_before, 2);
            }
            _ => panic!("a replay's mark is a replay"),
        }
    }

    #[test]
    fn only_a_new_claim_taken_for_a_duplicate_is_not_published() {
        let msg_id = || "id:claim:token".to_string();
        match claim_published(true, Stored::Duplicate, msg_id()) {
            Err(herald_nats::NatsError::Duplicate { msg_id }) => {
                assert_eq!(msg_id, "id:claim:token")
            }
            other => panic!("a new claim dropped as a duplicate: {other:?}"),
        }
        assert!(claim_published(true, Stored::New, msg_id()).is_ok());
        assert!(
            claim_published(false, Stored::Duplicate, msg_id()).is_ok(),
            "a stale claim's copy of a command that got out"
        );
        assert!(claim_published(false, Stored::New, msg_id()).is_ok());
    }

    #[test]
    fn a_failing_batch_rests_twice_as_long_each_time_up_to_the_lease_until_a_page_goes_through() {
        let mut backoff = BulkBackoff::default();
        let (batch, other) = (Uuid::now_v7(), Uuid::now_v7());
        let lease = Duration::from_secs(60);
        let rests: Vec<(u32, u64)> = (0..8)
            .map(|_| backoff.failed(batch, lease))
            .map(|(failures, rest)| (failures, rest.as_secs()))
            .collect();
        assert_eq!(
            rests,
            [
                (1, 1),
                (2, 2),
                (3, 4),
                (4, 8),
                (5, 16),
                (6, 32),
                (7, 60),
                (8, 60)
            ]
        );
        assert_eq!(
            backoff.failed(other, lease),
            (1, BULK_BACKOFF),
            "each batch its own"
        );
        backoff.succeeded(batch);
        assert_eq!(backoff.failed(batch, lease), (1, BULK_BACKOFF), "reset");
        let many = (0..100).map(|_| backoff.failed(batch, lease)).last();
        assert_eq!(many, Some((101, lease)), "no overflow");
    }
}
