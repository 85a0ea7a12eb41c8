//! The delivery of one send command: the policy the Dispatcher applies.
//!
//! Decode (poison ⇒ dead letter; a newer schema version is handed back for a while first, see
//! [`NewerVersionHold`]) → claim the notification (mark it `processing`, so a cancel from
//! then on is refused; skip it if it is already final, cancelled included) → resolve contacts →
//! render the template the notification names, if any, in the recipient's locale (a render error ⇒
//! `failed`, no retry) → hand the command back if this instance's lease on its partition ran out
//! meanwhile (see [`crate::partitions::LeaseDeadlines`]) → walk the channel chain, asking each
//! channel actor → record every attempt → `sent`, or NAK with backoff when a channel failed
//! transiently and deliveries remain, or `dead` (copied to the DLQ) after the last one, or `failed`
//! when every channel refused for good.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, message::Acker};
use bytes::Bytes;
use chrono::{DurationRound, Utc};
use herald_entities::{
    NotificationStatus, customer, delivery_attempt,
    repo::{
        self,
        customers::ContactSet,
        notifications::Claimed,
        status_batch::{NewAttempt, StatusChange},
    },
};
use herald_nats::{
    Channel, CommandDecodeError, Contacts, DeadLetterHeaders, MAX_COMMAND_BYTES, Publisher,
    SCHEMA_VERSION, SendCommand,
};
use ractor::{ActorRef, rpc::CallResult};

use crate::slot::ActorSlot;
use sea_orm::DatabaseConnection;

use crate::lease::{DeliveryPermit, InFlight, Lease};
use crate::pull::Delivery;

use crate::channel::{
    ChannelDirectory, ChannelMsg, ContactMove, NotStartedCause, OutboundMessage, ProviderError,
    SendOutcome, SendReport, WebhookSecret,
};
use crate::lookup::{ContactHolder, Recipient};
use crate::policy::{Gate, OptOut, preferences::is_critical};
use crate::retry::RetryPolicy;
use crate::status_writer::{AfterWrite, StatusRecord, StatusWriterMsg};
use crate::templates::runtime::{RuntimeTemplates, TemplateError};
use crate::templates::variables;
use crate::waiting::{Waiters, WaitingRoom};

/// How long a send may take, from the dispatcher's asking its channel actor (its wait for a
/// concurrency permit included) to the answer: a send that gets its permit too late to finish
/// within its timeout by then is not started ([`SendOutcome::NotStarted`]). Every channel
/// timeout (`channels.limits.timeout_ms`, each provider's `timeout_ms`) must stay below it, or
/// no send would start.
pub const CHANNEL_ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// How much longer than [`CHANNEL_ANSWER_TIMEOUT`] the dispatcher waits for the answer: a send
/// that started ends (its timeout included) before the deadline, so an answer missing even after
/// this is one of a send that never got its concurrency permit, and never will (it finds its
/// caller gone and is dropped unsent).
const ANSWER_GRACE: Duration = Duration::from_secs(1);

/// The status of the attempt recorded for a channel not called because it refused the
/// notification for good (`rejected`, `no_contact`) in an earlier round.
pub const REFUSED_EARLIER: &str = "refused_earlier";

/// The status of the attempt recorded for a channel the customer opted out of.
const OPTED_OUT: &str = "opted_out";

/// How long an outcome waits for a status writer being restarted (a little more than its
/// supervisor's longest restart delay) before it is dropped, its command left for redelivery.
const WRITER_RESTART_WAIT: Duration =
    Duration::from_secs(crate::engine_supervisor::RestartBackoff::MAX_DELAY.as_secs() + 1);

/// When a notification whose status changed while it was being claimed is claimed again.
const CLAIM_AGAIN_IN: Duration = Duration::from_secs(1);

/// What a delivery needs; shared by all delivery tasks.
pub struct DeliveryContext {
    /// Database pool (forgetting dead contacts).
    pub db: DatabaseConnection,
    /// Batched claims (the check before sending, which also marks the notification picked up).
    pub claims: crate::lookup::ClaimLookup,
    /// Batched reads of recipients (contacts, locale, preferences, quiet hours).
    pub recipients: crate::lookup::RecipientLookup,
    /// Batched reads of the customers holding the contacts of sends that name no customer, whose
    /// opt-outs and quiet hours those sends follow.
    pub contact_holders: crate::lookup::ContactHolderLookup,
    /// Publisher (dead letters).
    pub publisher: Publisher,
    /// Live channel actors.
    pub channels: ChannelDirectory,
    /// The status writer.
    pub status_writer: ActorSlot<StatusWriterMsg>,
    /// Retry schedule.
    pub retry: RetryPolicy,
    /// How many commands may wait for unknown customers at once, on each partition.
    pub waiting: WaitingRoom,
    /// A deferral at least this long (quiet hours, a rate limit) waits as a `scheduled`
    /// notification, its command acknowledged, rather than as a command held back in JetStream:
    /// a held-back command counts against its consumer's `max_ack_pending` until it is
    /// redelivered, so a night's worth of them would stop its partition, critical sends
    /// included. A command replayed from the dead-letter stream is held back in JetStream
    /// whatever the length: the Scheduler's republish would not carry its replay base.
    pub schedule_deferrals_after: Duration,
    /// Recipients' wishes and limits.
    pub policy: crate::policy::PolicyContext,
    /// Notifications being delivered by this process.
    pub in_flight: InFlight,
    /// Templates named by notifications, rendered before the chain is walked.
    pub templates: Arc<RuntimeTemplates>,
    /// How often a delivery walking its chain tells JetStream it is still working on the command
    /// (`AckKind::Progress`), which restarts the consumer's `ack_wait`: a third of it, so that a
    /// chain of slow channels (each up to its timeout, plus a wait for a concurrency permit)
    /// never outlasts `ack_wait` and gets the command redelivered while it is being worked on.
    /// `None` sends none.
    pub progress_every: Option<Duration>,
    /// What becomes of a command of a schema version newer than this build's.
    pub newer_version: NewerVersionHold,
}

/// A command of a schema version newer than this build's (written by an upgraded instance during
/// a rolling upgrade) is handed back to JetStream, NAKed with `delay`, for an upgraded instance to
/// take once it holds the command's partition; only its `max_deliveries`-th delivery is
/// dead-lettered as poison, acked so that it no longer blocks its partition. A command of an
/// older or unknown lower version is poison at once: no build will read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewerVersionHold {
    /// How long each hand-back waits before the command is offered again.
    pub delay: Duration,
    /// The delivery (1-based) at which the command is dead-lettered after all.
    pub max_deliveries: u64,
}

impl Default for NewerVersionHold {
    /// 20 deliveries 30 s apart: about ten minutes for the upgrade to reach the partition.
    fn default() -> Self {
        Self {
            delay: Duration::from_secs(30),
            max_deliveries: 20,
        }
    }
}

/// Delivers one command message end to end. Never panics on message content; every path ends as
/// the delivery decides: acked, NAKed or terminated at once, or recorded by the StatusWriter (which
/// acks or NAKs after writing), dead-lettered included.
pub async fn deliver(
    ctx: Arc<DeliveryContext>,
    message: jetstream::Message,
    permit: DeliveryPermit,
) {
    let started = tokio::time::Instant::now();
    let copy = Delivery::of(&message);
    let (message, acker) = message.split();
    let command = match read_command(&message.payload, copy, ctx.newer_version) {
        Ok(command) => command,
        Err(Unreadable::Newer { version, delay }) => {
            // Written by a newer build during a rolling upgrade: an upgraded instance may take
            // the partition and read it, so it is offered again rather than destroyed here.
            tracing::info!(
                version,
                delivered = copy.count,
                "command of a newer schema version; handed back for an upgraded instance"
            );
            metrics::counter!("herald_newer_version_commands_total").increment(1);
            let _ = acker.ack_with(jetstream::AckKind::Nak(Some(delay))).await;
            return;
        }
        Err(Unreadable::Poison(reason)) => {
            // The stream sequence identifies the message, so distinct poison messages are not
            // taken for duplicates of each other by the DLQ's de-duplication.
            let msg_id = format!("poison:{}", copy.sequence);
            dead_letter_poison(&ctx, &message, acker, copy.count, &reason, &msg_id).await;
            return;
        }
    };
    let Some(reservation) = ctx.in_flight.reserve(command.notification_id) else {
        // Another copy of this command (a redelivery after a NATS restart) is being worked on
        // here; its outcome decides. Come back later in case it NAKs.
        let _ = acker
            .ack_with(jetstream::AckKind::Nak(Some(Duration::from_secs(5))))
            .await;
        return;
    };
    let command_message = CommandMessage {
        notification_id: command.notification_id,
        replay_base: replay_base(&message),
        payload: message.payload,
        subject: message.subject,
        acker,
        copy,
        permit: Lease::new(permit).with_reservation(reservation),
    };
    let settle = work(&ctx, command, &command_message, started).await;
    command_message.settle(&ctx, settle).await;
}

/// Why a command message cannot be delivered by this build.
enum Unreadable {
    /// Written by a newer build: handed back for `delay`, for an upgraded instance.
    Newer { version: u64, delay: Duration },
    /// Not a command any build reads (the reason): dead-lettered as poison.
    Poison(String),
}

/// Decodes a command message, within the size limit and this build's schema version (see
/// [`NewerVersionHold`]).
fn read_command(
    payload: &[u8],
    copy: Delivery,
    newer: NewerVersionHold,
) -> Result<SendCommand, Unreadable> {
    if payload.len() > MAX_COMMAND_BYTES {
        return Err(Unreadable::Poison(format!(
            "oversized command: {} bytes (limit {MAX_COMMAND_BYTES})",
            payload.len()
        )));
    }
    SendCommand::decode(payload).map_err(|err| match err {
        CommandDecodeError::UnknownVersion(version)
            if version > u64::from(SCHEMA_VERSION) && copy.count < newer.max_deliveries =>
        {
            Unreadable::Newer {
                version,
                delay: newer.delay,
            }
        }
        err => Unreadable::Poison(err.to_string()),
    })
}

/// The command message a delivery works on, and what it takes to settle it.
struct CommandMessage {
    notification_id: uuid::Uuid,
    /// See [`replay_base`].
    replay_base: i32,
    /// The command as stored, dead-lettered as it came.
    payload: Bytes,
    subject: async_nats::Subject,
    acker: Acker,
    copy: Delivery,
    permit: Lease,
}

/// How a delivery ends for its command message.
enum Settle {
    /// Acknowledged: done, nothing to record.
    Ack,
    /// Handed back to JetStream, offered again after the delay.
    Nak(Duration),
    /// Never to be delivered again.
    Term,
    /// Recorded by the StatusWriter, which then acks (`None`) or NAKs with the delay.
    Record {
        changes: Vec<StatusChange>,
        attempts: Vec<NewAttempt>,
        nak: Option<Duration>,
    },
    /// Copied to the dead-letter stream, naming the `providers` the last round called, and
    /// recorded `dead` with the `attempts` not recorded yet (see [`CommandMessage::dead_letter`]).
    Dead {
        reason: String,
        attempts: Vec<NewAttempt>,
        providers: Vec<String>,
    },
}

impl Settle {
    /// Dead after a round whose `attempts` are recorded with it.
    fn dead(reason: String, attempts: Vec<NewAttempt>) -> Self {
        let providers = called_providers(attempts.iter().map(|a| a.provider.as_str()));
        Settle::Dead {
            reason,
            attempts,
            providers,
        }
    }

    /// Records `changes` and `attempts`, then acks.
    fn record(changes: Vec<StatusChange>, attempts: Vec<NewAttempt>) -> Self {
        Settle::Record {
            changes,
            attempts,
            nak: None,
        }
    }

    /// Records `changes` and `attempts`, then NAKs with `delay`.
    fn record_then_nak(
        changes: Vec<StatusChange>,
        attempts: Vec<NewAttempt>,
        delay: Duration,
    ) -> Self {
        Settle::Record {
            changes,
            attempts,
            nak: Some(delay),
        }
    }
}

/// Decides how a readable, reserved command ends: claim it, read its recipient, apply their
/// wishes, render its template, walk its chain.
async fn work(
    ctx: &DeliveryContext,
    mut command: SendCommand,
    message: &CommandMessage,
    started: tokio::time::Instant,
) -> Settle {
    let round = match claim(ctx, &command, message).await {
        Ok(round) => round,
        Err(settle) => return settle,
    };
    let id = command.notification_id;
    if ctx.retry.is_past_last(round.number) {
        return dead_after_the_last_round(ctx, id, round, command.channels.len()).await;
    }
    let recipient = match &command.customer_id {
        Some(customer_id) => ctx.recipients.get(customer_id.clone()).await,
        None => Ok(None),
    };
    let recipient = match recipient {
        Ok(recipient) => recipient.unwrap_or_default(),
        Err(err) => {
            tracing::warn!(%id, error = %err, "cannot load the recipient; retrying later");
            let delay = ctx.retry.delay(message.copy.count, None, rand::random());
            return Settle::record_then_nak(vec![], vec![], delay);
        }
    };
    let destination = match resolve_contacts(&command, recipient.customer.as_ref()) {
        Ok(contacts) => Destination::new(contacts, recipient.customer.as_ref()),
        Err(UnknownCustomer(customer)) => {
            return unknown_customer(ctx, id, &customer, message).await;
        }
    };
    // A round of it was walked (since it was queued or replayed): the gate let it through then.
    let passed_before = round.number > 1;
    let gate = match gate(ctx, &recipient, &command, passed_before).await {
        Ok(gate) => gate,
        Err(err) => {
            tracing::warn!(%id, error = %err, "cannot read whose contacts these are; retrying later");
            let delay = ctx.retry.delay(message.copy.count, None, rand::random());
            return Settle::record_then_nak(vec![], vec![], delay);
        }
    };
    let opted_out = match gate {
        Gate::Go { opted_out } => opted_out,
        Gate::Skip { reason, opted_out } => return skipped(&command, reason, &opted_out, round),
        Gate::Defer { delay, reason } => return deferred(ctx, id, delay, reason, round),
    };
    if let Err(err) = render_template(ctx, &mut command, recipient.customer.as_ref()).await {
        return template_failed(&ctx.retry, id, err, message.copy.count);
    }
    if !message.permit.partition_held() {
        // The partition's lease deadline passed while this delivery read the database or waited
        // for the rate limiter: another instance may own the partition by now, and its rate
        // limiter would not see this send. (The token spent here errs on the safe side.) Handed
        // back with the pull loop's delay: this instance may have stopped consuming the
        // partition, and a NAK without one can be offered straight back to its gone pull request,
        // to wait out `ack_wait` there.
        metrics::counter!("herald_partition_lease_pauses_total").increment(1);
        return Settle::Nak(crate::pull::HAND_BACK_DELAY);
    }
    let refused = refused_earlier(ctx, id, round, message.replay_base).await;
    let skip = Skip {
        opted_out: &opted_out,
        refused: &refused,
    };
    let walk = with_progress(
        &message.acker,
        ctx.progress_every,
        started,
        walk_chain(
            &ctx.channels,
            &command,
            &destination,
            round,
            skip,
            CHANNEL_ANSWER_TIMEOUT,
        ),
    )
    .await;
    if let Some(customer_id) = &command.customer_id {
        update_contacts(&ctx.db, customer_id, &walk.contact_news).await;
    }
    finish(&ctx.retry, id, walk, message.copy, round)
}

/// Claims the notification (marks it `processing`): the round it is in, or how the command ends
/// when it is not to be worked on.
async fn claim(
    ctx: &DeliveryContext,
    command: &SendCommand,
    message: &CommandMessage,
) -> Result<Round, Settle> {
    let id = command.notification_id;
    match ctx.claims.get(id).await {
        Ok(Some(Claimed::Yours { attempts })) => Ok(Round::after(
            attempts,
            message.replay_base,
            command.channels.len(),
        )),
        // Cancelled, or a redelivery of a command whose outcome is written.
        Ok(Some(Claimed::Final(_))) => Err(Settle::Ack),
        Ok(Some(Claimed::Moved(status))) => {
            tracing::info!(%id, status = status.as_str(), "status changed while claiming; later");
            Err(Settle::Nak(CLAIM_AGAIN_IN))
        }
        Ok(None) => {
            // Never stored, or not accepted (the API answered 503 and removed it): sending would
            // deliver something nobody was promised.
            tracing::warn!(%id, "command for an unknown notification; dropped");
            metrics::counter!("herald_unknown_commands_total").increment(1);
            Err(Settle::Term)
        }
        Err(err) => {
            tracing::warn!(%id, error = %err, "cannot claim the notification; retrying later");
            let delay = ctx.retry.delay(message.copy.count, None, rand::random());
            Err(Settle::Nak(delay))
        }
    }
}

/// The providers named by attempts, in order, each once; `-` (no provider called) left out.
fn called_providers<'a>(providers: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut called: Vec<String> = Vec::new();
    for provider in providers.filter(|provider| *provider != "-") {
        if !called.iter().any(|known| known == provider) {
            called.push(provider.to_string());
        }
    }
    called
}

/// The last round was walked and recorded, but its dead letter could not be published then (see
/// [`CommandMessage::dead_letter`]): it is published now, with the providers that round called and
/// its last error, read back from its recorded attempts ([`last_round`]), as it would have been
/// at once. If they cannot be read, it goes out without them rather than wait.
async fn dead_after_the_last_round(
    ctx: &DeliveryContext,
    id: uuid::Uuid,
    round: Round,
    chain_len: usize,
) -> Settle {
    let attempts = match repo::notifications::find_with_attempts(&ctx.db, id).await {
        Ok(found) => found.map(|(_, attempts)| attempts).unwrap_or_default(),
        Err(err) => {
            tracing::warn!(%id, error = %err, "cannot read the last round's attempts");
            vec![]
        }
    };
    let (providers, error) = last_round(&attempts, round.first_attempt_no, chain_len);
    let rounds = round.number - 1;
    let reason = match error {
        Some(error) => {
            format!("gave up after {rounds} rounds: {error} (dead-lettered on a later delivery)")
        }
        None => format!("gave up after {rounds} rounds (dead-lettered on a later delivery)"),
    };
    Settle::Dead {
        reason,
        attempts: vec![],
        providers,
    }
}

/// The providers the last round of a delivery called and its last error, from the `recorded`
/// attempts of a chain of `chain_len` channels: the last `chain_len` of them, since every failed
/// round records one attempt per channel (as [`Round::after`] counts). A channel the customer
/// opted out of is not an error, as in [`walk_chain`].
fn last_round(
    attempts: &[delivery_attempt::Model],
    recorded: u64,
    chain_len: usize,
) -> (Vec<String>, Option<&str>) {
    let after = recorded.saturating_sub(chain_len as u64);
    let last: Vec<_> = attempts
        .iter()
        .filter(|attempt| u64::try_from(attempt.attempt_no).unwrap_or(0) > after)
        .collect();
    let error = last
        .iter()
        .rev()
        .filter(|attempt| attempt.status != OPTED_OUT)
        .find_map(|attempt| attempt.error.as_deref());
    let providers = called_providers(last.iter().map(|attempt| attempt.provider.as_str()));
    (providers, error)
}

impl CommandMessage {
    /// Ends the delivery as `settle` says.
    async fn settle(self, ctx: &DeliveryContext, settle: Settle) {
        match settle {
            Settle::Ack => {
                let _ = self.acker.ack().await;
            }
            Settle::Nak(delay) => {
                let _ = self
                    .acker
                    .ack_with(jetstream::AckKind::Nak(Some(delay)))
                    .await;
            }
            Settle::Term => {
                let _ = self.acker.ack_with(jetstream::AckKind::Term).await;
            }
            Settle::Record {
                changes,
                attempts,
                nak,
            } => {
                let then = match nak {
                    Some(delay) => AfterWrite::Nak(self.acker, delay),
                    None => AfterWrite::Ack(self.acker),
                };
                write(ctx, changes, attempts, then, Some(self.permit)).await;
            }
            Settle::Dead {
                reason,
                attempts,
                providers,
            } => self.dead_letter(ctx, reason, attempts, &providers).await,
        }
    }
}

/// The attempts recorded before a command was replayed from the dead-letter stream (its
/// [`HEADER_REPLAY_BASE`](herald_nats::subjects::HEADER_REPLAY_BASE)); 0 for any other command.
fn replay_base(message: &async_nats::Message) -> i32 {
    message
        .headers
        .as_ref()
        .and_then(|headers| headers.get(herald_nats::subjects::HEADER_REPLAY_BASE))
        .and_then(|value| value.as_str().parse().ok())
        .unwrap_or(0)
}

/// Which pass over the channel chain a delivery is. JetStream's delivery count also counts
/// deliveries that never reached the chain (rate-limit and quiet-hours deferrals, database
/// outages), so rounds are counted from the attempts recorded: every failed round records one
/// attempt per channel of the chain. A replayed command counts only the attempts made since its
/// replay, so it gets every round again; its attempts are still numbered on from the last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Round {
    /// 1 for the first pass.
    number: u64,
    /// Attempt numbers of this round start after this one.
    first_attempt_no: u64,
    /// Whether the command was replayed from the dead-letter stream: its rounds count from the
    /// replay only as long as its own message (which carries where they start) is delivered.
    replayed: bool,
}

impl Round {
    fn after(attempts_recorded: i32, replay_base: i32, chain_len: usize) -> Self {
        let recorded = u64::try_from(attempts_recorded).unwrap_or(0);
        let since_replay = u64::try_from(attempts_recorded.saturating_sub(replay_base))
            .unwrap_or(0)
            .min(recorded);
        Round {
            number: since_replay.div_ceil(chain_len.max(1) as u64) + 1,
            first_attempt_no: recorded,
            replayed: replay_base > 0,
        }
    }
}

/// Records a notification the policy stopped (`skipped`, with the channels the customer opted
/// out of as attempts), with the reason, so "why was this not sent?" has an answer.
fn skipped(command: &SendCommand, reason: String, opted_out: &[OptOut], round: Round) -> Settle {
    metrics::counter!("herald_notifications_skipped_total").increment(1);
    let first_no = round.first_attempt_no;
    let attempts: Vec<NewAttempt> = opted_out
        .iter()
        .enumerate()
        .map(|(index, opt_out)| opted_out_attempt(command, opt_out, first_no + index as u64 + 1))
        .collect();
    let change = StatusChange {
        reason: Some(reason),
        attempts: attempts.last().map(|a| a.attempt_no),
        ..StatusChange::to(command.notification_id, NotificationStatus::Skipped)
    };
    Settle::record(vec![change], attempts)
}

/// Holds a notification the policy deferred (quiet hours, a rate limit) for `delay`, with the
/// reason: NAKed with the delay, still `processing`, or, when the hold is long, `scheduled` and
/// acked (see [`DeliveryContext::schedule_deferrals_after`]).
fn deferred(
    ctx: &DeliveryContext,
    id: uuid::Uuid,
    delay: Duration,
    reason: String,
    round: Round,
) -> Settle {
    metrics::counter!("herald_notifications_deferred_total").increment(1);
    tracing::debug!(%id, delay_ms = delay.as_millis() as u64, %reason, "held back");
    // A replayed command keeps its message: the Scheduler's republish of a scheduled
    // notification would not carry its replay base, and its retries would be gone.
    let long = delay >= ctx.schedule_deferrals_after && !round.replayed;
    let (change, nak) = match long.then(|| due_after(delay)).flatten() {
        Some(due) => (
            StatusChange {
                scheduled_at: Some(due),
                ..StatusChange::to(id, NotificationStatus::Scheduled)
            },
            None,
        ),
        _ => (
            StatusChange::to(id, NotificationStatus::Processing),
            Some(delay),
        ),
    };
    let change = StatusChange {
        reason: Some(reason),
        ..change
    };
    Settle::Record {
        changes: vec![change],
        attempts: vec![],
        nak,
    }
}

/// When a hold of `delay` from now ends, rounded up to the second: holds that end together
/// (quiet hours in one time zone) share one UPDATE in a StatusWriter batch.
fn due_after(delay: Duration) -> Option<chrono::DateTime<Utc>> {
    let end = Utc::now() + chrono::Duration::from_std(delay).ok()?;
    end.duration_round_up(chrono::TimeDelta::seconds(1)).ok()
}

/// The attempt recorded for a channel skipped because it was opted out of.
fn opted_out_attempt(command: &SendCommand, opt_out: &OptOut, attempt_no: u64) -> NewAttempt {
    NewAttempt {
        notification_id: command.notification_id,
        attempt_no: attempt_no.min(i32::MAX as u64) as i32,
        channel: opt_out.channel.as_str().to_string(),
        provider: "-".into(),
        status: OPTED_OUT.into(),
        error: Some(opt_out.words(command.category)),
        provider_message_id: None,
        latency_ms: 0,
        at: Utc::now(),
    }
}

/// A command for a customer id nobody stored, with no contacts of its own for its chain.
struct UnknownCustomer(String);

/// A command for a customer that does not exist (yet), with no contacts of its own: held back
/// for the retry schedule's delay (see [`RetryPolicy::wait`]), recorded `processing` with the
/// reason, since a customer may be registered a moment after the send that names it, as the
/// Router waits for an event's; dead-lettered once the schedule's whole wait has passed since the
/// command was published. Not a [`Gate::Defer`]: a long one would become `scheduled` and come back
/// as a new message, published later, so it would wait for ever. A waiting command holds a
/// pending slot of its partition's consumer, so it is dead-lettered at once, saying why, when
/// waiting commands hold their share of them ([`crate::waiting`]).
async fn unknown_customer(
    ctx: &DeliveryContext,
    id: uuid::Uuid,
    customer: &str,
    message: &CommandMessage,
) -> Settle {
    let unknown = format!("unknown customer {customer:?} and no contacts given");
    let waiters = herald_nats::subjects::command_partition(&message.subject)
        .map(|partition| Waiters::Commands { partition });
    let delay = match ctx
        .waiting
        .may_wait(&ctx.retry, waiters, message.copy)
        .await
    {
        Ok(delay) => delay,
        Err(refused) => return Settle::dead(format!("{unknown} ({refused})"), vec![]),
    };
    let change = StatusChange {
        reason: Some(format!(
            "waiting for customer {customer:?} to exist (no contacts given); again in {:.1} s",
            delay.as_secs_f64()
        )),
        ..StatusChange::to(id, NotificationStatus::Processing)
    };
    Settle::record_then_nak(vec![change], vec![], delay)
}

/// The request's contacts over the stored customer's.
fn resolve_contacts(
    command: &SendCommand,
    customer: Option<&customer::Model>,
) -> Result<Contacts, UnknownCustomer> {
    let Some(customer_id) = &command.customer_id else {
        return Ok(command.contacts.clone());
    };
    match customer {
        Some(customer) => Ok(command.contacts.clone().or(&stored_contacts(customer))),
        None if command
            .channels
            .iter()
            .any(|c| command.contacts.reaches(*c)) =>
        {
            Ok(command.contacts.clone())
        }
        None => Err(UnknownCustomer(customer_id.clone())),
    }
}

/// The policy's gate for `command`: by its customer's wishes, and by those of the customers
/// holding the contacts it gives beyond that customer's own (for a send that names no customer,
/// all of its contacts) on the channels of its chain; `Err` when these cannot be read.
async fn gate(
    ctx: &DeliveryContext,
    recipient: &Recipient,
    command: &SendCommand,
    passed_before: bool,
) -> Result<Gate, String> {
    let holders = if is_critical(command.category) {
        // No opt-out or quiet hours hold a critical category back: no one's wishes are read.
        Vec::new()
    } else {
        let others = match &recipient.customer {
            Some(customer) => chain_contacts(command).not_held_by(customer),
            None => chain_contacts(command),
        };
        contact_holders(ctx, others).await?
    };
    let policy = &ctx.policy;
    Ok(match command.customer_id {
        Some(_) => crate::policy::gate(policy, recipient, &holders, command, passed_before).await,
        None => crate::policy::gate_contacts(policy, &holders, command, passed_before).await,
    })
}

/// The customers with stored wishes holding the contacts of `set`. None are read when it holds
/// none.
async fn contact_holders(
    ctx: &DeliveryContext,
    set: ContactSet,
) -> Result<Vec<ContactHolder>, String> {
    if set.is_empty() {
        return Ok(Vec::new());
    }
    Ok(ctx.contact_holders.get(set).await?.unwrap_or_default())
}

/// The contacts `command` itself gives (not those of its stored customer) on the channels of its
/// chain.
fn chain_contacts(command: &SendCommand) -> ContactSet {
    let on = |channel: Channel| command.channels.contains(&channel);
    let contacts = &command.contacts;
    ContactSet {
        email: contacts.email.clone().filter(|_| on(Channel::Email)),
        phone: contacts.phone.clone().filter(|_| on(Channel::Sms)),
        telegram_chat_id: contacts
            .telegram_chat_id
            .clone()
            .filter(|_| on(Channel::Telegram)),
        push_tokens: if on(Channel::Push) {
            contacts.push_tokens.clone()
        } else {
            Vec::new()
        },
        webhook_url: contacts
            .webhook_url
            .clone()
            .filter(|_| on(Channel::Webhook)),
    }
}

/// Where a send goes: the contacts, and the stored customer's own webhook signing secret.
#[derive(Debug, Clone, Default)]
struct Destination {
    /// The request's contacts over the stored customer's.
    contacts: Contacts,
    /// The customer's own secret, only for its stored webhook URL: a URL the send named instead
    /// is not the endpoint the secret was registered for, and gets the global secret.
    webhook_secret: Option<WebhookSecret>,
}

impl Destination {
    /// `contacts` (already merged), with `customer`'s webhook secret, and the one it replaced, if
    /// they reach its webhook URL.
    fn new(contacts: Contacts, customer: Option<&customer::Model>) -> Self {
        let webhook_secret = customer
            .filter(|c| c.webhook_url.is_some() && c.webhook_url == contacts.webhook_url)
            .and_then(WebhookSecret::of_customer);
        Self {
            contacts,
            webhook_secret,
        }
    }
}

/// Replaces the command's template reference, if it has one, by the rendered content: in the
/// stored customer's locale, with their id and name among the variables unless the send gave them.
async fn render_template(
    ctx: &DeliveryContext,
    command: &mut SendCommand,
    customer: Option<&customer::Model>,
) -> Result<(), TemplateError> {
    if let Some(reference) = &mut command.content.template {
        if let Some(customer) = customer {
            variables::add_customer(&mut reference.variables, customer);
        }
        let locale = customer.map(|customer| customer.locale.as_str());
        command.content = ctx.templates.render(reference, locale).await?;
    }
    Ok(())
}

/// A template that cannot render: `failed` with the reason (a retry would render the same), or a
/// NAK with backoff when the template could not be read.
fn template_failed(
    retry: &RetryPolicy,
    id: uuid::Uuid,
    err: TemplateError,
    delivered: u64,
) -> Settle {
    if err.is_transient() {
        tracing::warn!(%id, error = %err, "cannot read the template; retrying later");
        let delay = retry.delay(delivered, None, rand::random());
        return Settle::record_then_nak(vec![], vec![], delay);
    }
    tracing::info!(%id, error = %err, "template did not render; failed");
    metrics::counter!("herald_notifications_failed_total").increment(1);
    metrics::counter!("herald_template_errors_total").increment(1);
    let change = StatusChange {
        error: Some(err.to_string()),
        reason: Some(err.to_string()),
        ..StatusChange::to(id, NotificationStatus::Failed)
    };
    Settle::record(vec![change], vec![])
}

/// A stored customer's contacts in wire form.
pub fn stored_contacts(customer: &customer::Model) -> Contacts {
    Contacts {
        email: customer.email.clone(),
        phone: customer.phone.clone(),
        telegram_chat_id: customer.telegram_chat_id.clone(),
        push_tokens: serde_json::from_value(customer.push_tokens.clone()).unwrap_or_default(),
        webhook_url: customer.webhook_url.clone(),
    }
}

/// What a provider said of a contact it was given, for the stored customer.
enum ContactNews {
    /// Gone for good (an unregistered push token, a chat that blocked the bot): forget it.
    Dead(String),
    /// Lives on under another address (a Telegram group upgraded to a supergroup): change it.
    Moved(ContactMove),
}

/// Applies what providers said of the recipient's contacts to the stored customer (only where
/// it still holds the contact they were given), so later notifications neither try dead ones
/// again nor take a detour to moved ones. Failures are logged: the delivery outcome does not
/// depend on this, and the next send learns the news again.
async fn update_contacts(
    db: &DatabaseConnection,
    customer_id: &str,
    news: &[(Channel, ContactNews)],
) {
    use repo::customers;
    for (channel, news) in news {
        let (result, counter, done) = match (news, channel) {
            (ContactNews::Dead(token), Channel::Push) => (
                customers::remove_push_token(db, customer_id, token).await,
                "herald_contacts_forgotten_total",
                "forgot a contact the provider declared dead",
            ),
            (ContactNews::Dead(chat), Channel::Telegram) => (
                customers::clear_telegram_chat_id(db, customer_id, chat).await,
                "herald_contacts_forgotten_total",
                "forgot a contact the provider declared dead",
            ),
            (ContactNews::Dead(url), Channel::Webhook) => (
                customers::clear_webhook_url(db, customer_id, url).await,
                "herald_contacts_forgotten_total",
                "forgot a contact the provider declared dead",
            ),
            (ContactNews::Moved(ContactMove { from, to }), Channel::Telegram) => (
                customers::move_telegram_chat_id(db, customer_id, from, to).await,
                "herald_contacts_moved_total",
                "moved a contact to where the provider said it moved",
            ),
            _ => continue,
        };
        match result {
            Ok(true) => {
                metrics::counter!(counter, "channel" => channel.as_str()).increment(1);
                tracing::info!(customer_id, %channel, "{done}");
            }
            Ok(false) => {}
            Err(err) => {
                tracing::warn!(customer_id, %channel, error = %err, "cannot update a contact")
            }
        }
    }
}

/// The result of walking the chain once.
struct Walk {
    attempts: Vec<NewAttempt>,
    sent_on: Option<Channel>,
    /// What providers said of the contacts they were given, for the stored customer.
    contact_news: Vec<(Channel, ContactNews)>,
    /// Some channel failed in a way that may pass later (a transient error or a throttle, an
    /// open circuit, a send queue too long to start).
    retryable: bool,
    /// Some provider was called (or may have been: a channel actor that stopped before it
    /// answered).
    called: bool,
    retry_after: Option<Duration>,
    last_error: Option<String>,
}

impl Walk {
    /// Notes contacts `channel`'s provider declared dead.
    fn dead(&mut self, channel: Channel, contacts: &[String]) {
        let dead = contacts.iter().cloned().map(ContactNews::Dead);
        self.contact_news.extend(dead.map(|news| (channel, news)));
    }

    /// Notes contacts `channel`'s provider said moved.
    fn moved(&mut self, channel: Channel, moves: &[ContactMove]) {
        let moved = moves.iter().cloned().map(ContactNews::Moved);
        self.contact_news.extend(moved.map(|news| (channel, news)));
    }
}

/// The channels of the chain a walk does not call.
#[derive(Clone, Copy)]
struct Skip<'a> {
    /// The notification's category is opted out of on these.
    opted_out: &'a [OptOut],
    /// These refused the notification for good in an earlier round (by channel name).
    refused: &'a HashSet<String>,
}

/// The channels that refused the notification for good in an earlier round since its last replay
/// from the dead-letter stream, if any: none in the first round, which reads nothing for it.
/// A failed read costs only provider calls, so it is logged and the whole chain walked.
async fn refused_earlier(
    ctx: &DeliveryContext,
    id: uuid::Uuid,
    round: Round,
    replay_base: i32,
) -> HashSet<String> {
    if round.number <= 1 {
        return HashSet::new();
    }
    match repo::notifications::refused_channels(&ctx.db, id, replay_base.max(0)).await {
        Ok(refused) => refused,
        Err(err) => {
            tracing::warn!(%id, error = %err, "cannot read earlier refusals; calling all");
            HashSet::new()
        }
    }
}

async fn walk_chain(
    channels: &ChannelDirectory,
    command: &SendCommand,
    destination: &Destination,
    round: Round,
    skip: Skip<'_>,
    answer_within: Duration,
) -> Walk {
    let mut walk = Walk {
        attempts: Vec::new(),
        sent_on: None,
        contact_news: Vec::new(),
        retryable: false,
        called: false,
        retry_after: None,
        last_error: None,
    };
    let first_no = round.first_attempt_no;
    for (index, &channel) in command.channels.iter().enumerate() {
        let attempt_no = (first_no + index as u64 + 1).min(i32::MAX as u64) as i32;
        let attempt =
            |provider: &str, status: &str, error: Option<String>, report: Option<&SendReport>| {
                NewAttempt {
                    notification_id: command.notification_id,
                    attempt_no,
                    channel: channel.as_str().to_string(),
                    provider: provider.to_string(),
                    status: status.to_string(),
                    error,
                    provider_message_id: report.and_then(|r| match &r.outcome {
                        SendOutcome::Accepted(receipt) => receipt.provider_message_id.clone(),
                        _ => None,
                    }),
                    latency_ms: report.map_or(0, |r| r.latency.as_millis() as i64),
                    at: Utc::now(),
                }
            };
        if let Some(opt_out) = skip.opted_out.iter().find(|o| o.channel == channel) {
            walk.attempts.push(opted_out_attempt(
                command,
                opt_out,
                u64::from(attempt_no as u32),
            ));
            continue;
        }
        if skip.refused.contains(channel.as_str()) {
            // Called again it would refuse again: a provider call, a `rejected` attempt and a
            // failure against its circuit for nothing. The attempt still counts in the round.
            let error = format!("{channel} refused this notification for good in an earlier round");
            walk.attempts
                .push(attempt("-", REFUSED_EARLIER, Some(error.clone()), None));
            walk.last_error = Some(error);
            continue;
        }
        let Some((actor, provider)) = channels.serving(channel) else {
            let error = format!("no provider configured for {channel}");
            walk.attempts
                .push(attempt("-", "unavailable", Some(error.clone()), None));
            walk.last_error = Some(error);
            continue;
        };
        if !destination.contacts.reaches(channel) {
            let error = ProviderError::MissingContact(channel).to_string();
            walk.attempts
                .push(attempt("-", "no_contact", Some(error.clone()), None));
            walk.last_error = Some(error);
            continue;
        }
        let report = ask_channel((&actor, &provider), command, destination, answer_within).await;
        walk.called |= !matches!(
            report.outcome,
            SendOutcome::CircuitOpen { .. } | SendOutcome::NotStarted { .. }
        );
        // Dead whether the notification is sent, retried, fails over or fails.
        walk.dead(channel, report.outcome.dead_contacts());
        let (status, error) = match &report.outcome {
            SendOutcome::Accepted(receipt) => {
                walk.moved(channel, &receipt.moved_contacts);
                ("sent", None)
            }
            SendOutcome::CircuitOpen { cool_down_left } => {
                walk.retryable = true;
                walk.retry_after = walk.retry_after.max(Some(*cool_down_left));
                ("circuit_open", Some(format!("{channel} circuit open")))
            }
            SendOutcome::NotStarted { retry_in, cause } => {
                walk.retryable = true;
                walk.retry_after = walk.retry_after.max(Some(*retry_in));
                let why = match cause {
                    NotStartedCause::QueueTooLong => "its send queue was too long",
                    NotStartedCause::ActorFailed => "its channel actor failed while it waited",
                    NotStartedCause::NoConnection => {
                        "no connection to its provider was free in time"
                    }
                    NotStartedCause::HeldForProbe => {
                        "it waited for its circuit's probe until too late to start"
                    }
                };
                ("not_started", Some(format!("{channel} not started: {why}")))
            }
            // A `NoConnection` is answered `NotStarted` by its channel actor; were it to come as
            // a failure, it would be retried like one.
            SendOutcome::Failed(
                err @ (ProviderError::Transient { .. }
                | ProviderError::Throttled { .. }
                | ProviderError::AccountThrottled { .. }
                | ProviderError::NoConnection { .. }),
            ) => {
                walk.retryable = true;
                walk.retry_after = walk.retry_after.max(err.retry_after());
                ("failed", Some(err.to_string()))
            }
            SendOutcome::Failed(err @ ProviderError::MissingContact(_)) => {
                ("no_contact", Some(err.to_string()))
            }
            SendOutcome::Failed(
                err @ (ProviderError::Permanent { .. } | ProviderError::Unsendable { .. }),
            ) => ("rejected", Some(err.to_string())),
        };
        metrics::counter!("herald_attempts_total", "channel" => channel.as_str(), "status" => status)
            .increment(1);
        metrics::histogram!("herald_attempt_seconds", "channel" => channel.as_str())
            .record(report.latency.as_secs_f64());
        walk.attempts.push(attempt(
            &report.provider,
            status,
            error.clone(),
            Some(&report),
        ));
        if error.is_none() {
            walk.sent_on = Some(channel);
            break;
        }
        walk.last_error = error;
    }
    walk
}

/// Runs `work` (a walk of the chain), telling JetStream every `every`, counted from `started`
/// (when the delivery took the command), that the command is still being worked on. A walk that
/// starts after `every` has passed (a slow claim, a template render) tells it at once.
async fn with_progress<F: Future>(
    acker: &Acker,
    every: Option<Duration>,
    started: tokio::time::Instant,
    work: F,
) -> F::Output {
    let mut work = std::pin::pin!(work);
    let Some(every) = every.filter(|every| !every.is_zero()) else {
        return work.await;
    };
    let mut ticks = tokio::time::interval_at(started + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            output = &mut work => return output,
            _ = ticks.tick() => {
                metrics::counter!("herald_command_progress_total").increment(1);
                if let Err(err) = acker.ack_with(jetstream::AckKind::Progress).await {
                    tracing::debug!(error = %err, "cannot extend a command's ack deadline");
                }
            }
        }
    }
}

/// Asks `actor` to send the command through its provider, named `provider`: the provider the
/// report names when the actor does not answer (the provider was not called, or may have been).
async fn ask_channel(
    (actor, provider): (&ActorRef<ChannelMsg>, &str),
    command: &SendCommand,
    destination: &Destination,
    answer_within: Duration,
) -> SendReport {
    let outbound = OutboundMessage {
        notification_id: command.notification_id,
        contacts: destination.contacts.clone(),
        content: command.content.clone(),
        category: command.category.as_str(),
        webhook_secret: destination.webhook_secret.clone(),
    };
    let answer_by = std::time::Instant::now() + answer_within;
    let send = |reply| ChannelMsg::Send {
        message: Box::new(outbound),
        answer_by,
        reply,
    };
    match actor.call(send, Some(answer_within + ANSWER_GRACE)).await {
        Ok(CallResult::Success(report)) => report,
        // The actor is alive (a stopped one refuses or drops the request: the arms below) and
        // answers a started send by `answer_by`: this send is still queued for a concurrency
        // permit, and once it has one it finds this caller gone and is dropped. Nothing was sent,
        // and the queue it waited in was at least this long.
        Ok(CallResult::Timeout) => SendReport {
            provider: provider.to_string(),
            outcome: SendOutcome::NotStarted {
                retry_in: answer_within,
                cause: NotStartedCause::QueueTooLong,
            },
            latency: Duration::ZERO,
        },
        // The actor stopped (or failed, to be restarted by its supervisor), or the request was
        // dropped unanswered: a fault, not a queue, counted as a failed call so that it uses up
        // retries like one.
        Ok(CallResult::SenderError) | Err(_) => SendReport {
            provider: provider.to_string(),
            outcome: SendOutcome::Failed(ProviderError::transient(
                "channel actor stopped before answering",
            )),
            latency: Duration::ZERO,
        },
    }
}

/// How a walk of the chain ends: `sent`; a NAK with backoff while rounds remain and some channel
/// may take it later; `dead` after the last round; `failed` when every channel refused for good.
fn finish(retry: &RetryPolicy, id: uuid::Uuid, walk: Walk, copy: Delivery, round: Round) -> Settle {
    let attempts_made = walk.attempts.last().map(|a| a.attempt_no);
    if let Some(channel) = walk.sent_on {
        metrics::counter!("herald_notifications_sent_total", "channel" => channel.as_str())
            .increment(1);
        let change = StatusChange {
            final_channel: Some(channel.as_str().to_string()),
            attempts: attempts_made,
            ..StatusChange::to(id, NotificationStatus::Sent)
        };
        return Settle::record(vec![change], walk.attempts);
    }
    let error = walk
        .last_error
        .clone()
        .unwrap_or_else(|| "empty channel chain".into());
    if walk.retryable && !walk.called && !retry.counts_pass_without_calls(copy.count) {
        wait_for_circuits(retry, id, walk.retry_after, error, round)
    } else if walk.retryable && !retry.is_last(round.number) {
        let delay = retry.delay(round.number, walk.retry_after, rand::random());
        tracing::info!(%id, round = round.number, delay_ms = delay.as_millis() as u64, %error, "no channel took it; retrying later");
        let change = StatusChange {
            error: Some(error),
            attempts: attempts_made,
            reason: Some(format!("retrying in {} s", delay.as_secs())),
            ..StatusChange::to(id, NotificationStatus::Processing)
        };
        Settle::record_then_nak(vec![change], walk.attempts, delay)
    } else if walk.retryable {
        Settle::dead(
            format!("gave up after {} rounds: {error}", round.number),
            walk.attempts,
        )
    } else {
        metrics::counter!("herald_notifications_failed_total").increment(1);
        let change = StatusChange {
            error: Some(error),
            attempts: attempts_made,
            reason: Some(
                "every channel refused permanently or could not reach the recipient".into(),
            ),
            ..StatusChange::to(id, NotificationStatus::Failed)
        };
        Settle::record(vec![change], walk.attempts)
    }
}

/// A pass that called no provider (every circuit open, or every send queue too long): retried
/// without counting as a round, after the circuits' cool-down at least (while a circuit's probe is
/// out, until the probe's result is due; with jitter past it, see
/// [`RetryPolicy::delay`], so that the notifications waiting for one circuit do not all come back
/// at the instant it lets one probe through), and without attempts
/// recorded (nothing was tried), so that a provider outage does not use up the retries. The
/// retry policy's `max_deliveries_while_open` bounds how long this goes on.
fn wait_for_circuits(
    retry: &RetryPolicy,
    id: uuid::Uuid,
    retry_after: Option<Duration>,
    error: String,
    round: Round,
) -> Settle {
    let delay = retry.delay(round.number, retry_after, rand::random());
    tracing::info!(%id, round = round.number, delay_ms = delay.as_millis() as u64, %error, "no provider could be called; waiting");
    let change = StatusChange {
        error: Some(error),
        reason: Some(format!(
            "no provider could be called (circuit open or send queue full); again in {} s, \
             not counted as a retry",
            delay.as_secs()
        )),
        ..StatusChange::to(id, NotificationStatus::Processing)
    };
    Settle::record_then_nak(vec![change], vec![], delay)
}

impl CommandMessage {
    /// Copies the command to the DLQ, then records `dead` and acks. If the DLQ cannot be reached
    /// the command is NAKed instead, so it is neither lost nor acked without its dead letter.
    ///
    /// The dead letter's `Nats-Msg-Id` names the notification and the stream message that died: a
    /// redelivery of that message dead-letters it again as a duplicate JetStream drops, while a
    /// replayed command that dies again (a new message) gets a dead letter of its own even within
    /// the duplicate window, rather than being `dead` with nothing left to replay.
    async fn dead_letter(
        self,
        ctx: &DeliveryContext,
        reason: String,
        attempts: Vec<NewAttempt>,
        providers: &[String],
    ) {
        let id = self.notification_id;
        let published = ctx
            .publisher
            .publish_dead_letter(
                &DeadLetterHeaders {
                    source: "cmd",
                    original_subject: &self.subject,
                    deliveries: self.copy.count,
                    reason: &reason,
                    providers,
                },
                self.payload,
                &format!("{id}:dead:{}", self.copy.sequence),
            )
            .await;
        let attempts_made = attempts.last().map(|a| a.attempt_no);
        let (change, then) = match published {
            Err(err) => {
                tracing::warn!(%id, error = %err, "cannot dead-letter; retrying later");
                // The attempts count with the rounds they end, so the next delivery finds the
                // last round walked and only dead-letters, rather than call the providers all
                // over again.
                let change = StatusChange {
                    attempts: attempts_made,
                    reason: Some(format!(
                        "{reason}; cannot dead-letter yet ({err}), again in 5 s"
                    )),
                    ..StatusChange::to(id, NotificationStatus::Processing)
                };
                (change, AfterWrite::Nak(self.acker, Duration::from_secs(5)))
            }
            Ok(()) => {
                metrics::counter!("herald_notifications_dead_total").increment(1);
                let change = StatusChange {
                    error: Some(reason.clone()),
                    reason: Some(reason),
                    attempts: attempts_made,
                    ..StatusChange::to(id, NotificationStatus::Dead)
                };
                (change, AfterWrite::Ack(self.acker))
            }
        };
        write(ctx, vec![change], attempts, then, Some(self.permit)).await;
    }
}

/// A message that is not a command this build can read: to the DLQ with the reason, then acked so
/// it never blocks the stream. Its notification, when the message names one (see
/// [`poisoned_notification`]), is recorded `dead` with the reason before the ack, so that it does
/// not stay `queued` for ever with nothing left to deliver it.
async fn dead_letter_poison(
    ctx: &DeliveryContext,
    message: &async_nats::Message,
    acker: Acker,
    delivered: u64,
    reason: &str,
    msg_id: &str,
) {
    tracing::warn!(subject = %message.subject, %reason, "poison message; dead-lettering");
    metrics::counter!("herald_poison_messages_total", "consumer" => "dispatch").increment(1);
    let published = ctx
        .publisher
        .publish_dead_letter(
            &DeadLetterHeaders {
                source: "cmd",
                original_subject: &message.subject,
                deliveries: delivered,
                reason,
                providers: &[],
            },
            message.payload.clone(),
            msg_id,
        )
        .await;
    let settled = match (published, poisoned_notification(message)) {
        (Ok(()), Some(id)) => {
            metrics::counter!("herald_notifications_dead_total").increment(1);
            let reason = format!("poison command: {reason}");
            let change = StatusChange {
                error: Some(reason.clone()),
                reason: Some(reason),
                ..StatusChange::to(id, NotificationStatus::Dead)
            };
            write(ctx, vec![change], vec![], AfterWrite::Ack(acker), None).await;
            return;
        }
        (Ok(()), None) => acker.ack().await,
        (Err(_), _) => {
            acker
                .ack_with(jetstream::AckKind::Nak(Some(Duration::from_secs(5))))
                .await
        }
    };
    if let Err(err) = settled {
        tracing::warn!(error = %err, "cannot settle poison message");
    }
}

/// The notification a command message stands for, read from its `Nats-Msg-Id`
/// ([`herald_nats::notification_of_msg_id`]), for a message whose payload cannot be read.
fn poisoned_notification(message: &async_nats::Message) -> Option<uuid::Uuid> {
    let msg_id = message
        .headers
        .as_ref()?
        .get(async_nats::header::NATS_MESSAGE_ID)?;
    herald_nats::notification_of_msg_id(msg_id.as_str())
}

async fn write(
    ctx: &DeliveryContext,
    changes: Vec<StatusChange>,
    attempts: Vec<NewAttempt>,
    then: AfterWrite,
    permit: Option<Lease>,
) {
    let record = StatusRecord {
        changes,
        attempts,
        then,
        permit,
    };
    let message = StatusWriterMsg::Record(Box::new(record));
    if !ctx
        .status_writer
        .cast_within(message, WRITER_RESTART_WAIT)
        .await
    {
        // The message stays unacked and JetStream redelivers it: sent again, if it was sent.
        tracing::warn!("status writer unavailable; message left for redelivery");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chrono::Utc;

    use herald_entities::NotificationStatus;
    use herald_nats::Channel;

    use super::{
        Delivery, Destination, NewerVersionHold, Round, Settle, Skip, Unreadable, Walk, due_after,
        finish, last_round, read_command, walk_chain,
    };
    use crate::retry::RetryPolicy;

    #[test]
    fn rounds_count_recorded_attempts_not_deliveries() {
        assert_eq!(
            Round::after(0, 0, 3),
            Round {
                number: 1,
                first_attempt_no: 0,
                replayed: false,
            }
        );
        let third = Round::after(6, 0, 3);
        assert_eq!((third.number, third.first_attempt_no), (3, 6));
        assert_eq!(
            Round::after(4, 0, 3).number,
            3,
            "a partial round counts as a round"
        );
        assert_eq!(Round::after(-1, 0, 0).number, 1, "nonsense counts as none");
    }

    #[test]
    fn a_long_hold_is_due_on_the_whole_second_after_it_ends() {
        use chrono::Timelike;
        let before = Utc::now();
        let due = due_after(Duration::from_millis(1_500)).expect("a time");
        assert_eq!(due.nanosecond(), 0, "{due}");
        assert!(
            due >= before + chrono::Duration::milliseconds(1_500),
            "{due}"
        );
        assert!(
            due <= Utc::now() + chrono::Duration::milliseconds(2_500),
            "{due}"
        );
        assert_eq!(due_after(Duration::MAX), None, "no time that far");
    }

    #[test]
    fn a_replayed_command_counts_its_rounds_from_the_replay() {
        let first = Round::after(12, 12, 2);
        assert_eq!((first.number, first.first_attempt_no), (1, 12));
        assert!(first.replayed && !Round::after(12, 0, 2).replayed);
        assert_eq!(Round::after(14, 12, 2).number, 2);
        assert_eq!(Round::after(3, 12, 2).number, 1, "a base past the attempts");
        assert_eq!(
            Round::after(4, -5, 2).number,
            3,
            "a negative base counts as none"
        );
    }

    /// A walk that ended with `attempts` attempts (attempt numbers from 1), retryable or not.
    fn walk(attempts: usize, retryable: bool, called: bool) -> Walk {
        let attempt = |no: usize| herald_entities::repo::status_batch::NewAttempt {
            notification_id: uuid::Uuid::nil(),
            attempt_no: no as i32,
            channel: "email".into(),
            provider: format!("smtp-{no}"),
            status: "failed".into(),
            error: Some("down".into()),
            provider_message_id: None,
            latency_ms: 1,
            at: Utc::now(),
        };
        Walk {
            attempts: (1..=attempts).map(attempt).collect(),
            sent_on: None,
            contact_news: vec![],
            retryable,
            called,
            retry_after: None,
            last_error: Some("down".into()),
        }
    }

    fn copy(count: u64) -> Delivery {
        Delivery {
            count,
            sequence: 7,
            published: std::time::SystemTime::now(),
        }
    }

    /// The status a settle records, and whether it NAKs.
    fn recorded(settle: &Settle) -> (NotificationStatus, Option<i32>, bool) {
        match settle {
            Settle::Record {
                changes,
                nak,
                attempts,
            } => {
                assert_eq!(changes.len(), 1, "one status change");
                let attempt_no = attempts.last().map(|a| a.attempt_no);
                assert_eq!(changes[0].attempts, attempt_no, "counts what it records");
                (changes[0].status, attempt_no, nak.is_some())
            }
            _ => panic!("expected a record"),
        }
    }

    #[test]
    fn a_walk_ends_sent_retried_dead_or_failed_by_its_round_and_failures() {
        let retry = RetryPolicy {
            max_deliveries: 3,
            ..RetryPolicy::default()
        };
        let id = uuid::Uuid::nil();
        let mut sent = walk(2, true, true);
        sent.sent_on = Some(Channel::Email);
        assert_eq!(
            recorded(&finish(&retry, id, sent, copy(1), Round::after(0, 0, 2))),
            (NotificationStatus::Sent, Some(2), false)
        );
        let round = |number| Round {
            number,
            first_attempt_no: 0,
            replayed: false,
        };
        assert_eq!(
            recorded(&finish(&retry, id, walk(2, true, true), copy(1), round(2))),
            (NotificationStatus::Processing, Some(2), true),
            "a transient failure before the last round is retried with its attempts"
        );
        assert!(
            matches!(
                finish(&retry, id, walk(2, true, true), copy(9), round(3)),
                Settle::Dead { reason, attempts, providers }
                    if reason.starts_with("gave up after 3 rounds: down") && attempts.len() == 2
                        && providers == ["smtp-1", "smtp-2"]
            ),
            "the last round's transient failure is dead"
        );
        assert_eq!(
            recorded(&finish(&retry, id, walk(2, false, true), copy(1), round(1))),
            (NotificationStatus::Failed, Some(2), false),
            "refused for good in the first round: failed, not retried"
        );
    }

    #[test]
    fn a_pass_that_called_no_provider_waits_without_counting_until_its_limit() {
        let retry = RetryPolicy {
            max_deliveries: 3,
            max_deliveries_while_open: 10,
            ..RetryPolicy::default()
        };
        let id = uuid::Uuid::nil();
        let last_round = Round {
            number: 3,
            first_attempt_no: 4,
            replayed: false,
        };
        assert_eq!(
            recorded(&finish(
                &retry,
                id,
                walk(0, true, false),
                copy(9),
                last_round
            )),
            (NotificationStatus::Processing, None, true),
            "every circuit open in the last round: waits, nothing recorded"
        );
        assert!(
            matches!(
                finish(&retry, id, walk(0, true, false), copy(10), last_round),
                Settle::Dead { .. }
            ),
            "from max_deliveries_while_open on, such a pass counts"
        );
    }

    /// How long a test waits for an event; also how long a walk that must not give up waits
    /// for a channel's answer.
    const WAIT: Duration = Duration::from_secs(30);

    /// An email provider that reports each send as it starts and answers once the test opens
    /// its gate.
    struct Gated {
        started: tokio::sync::mpsc::UnboundedSender<uuid::Uuid>,
        gate: std::sync::Arc<tokio::sync::Semaphore>,
    }

    impl crate::channel::Provider for Gated {
        fn channel(&self) -> Channel {
            Channel::Email
        }

        fn name(&self) -> &str {
            "gated"
        }

        fn send<'a>(
            &'a self,
            message: &'a crate::channel::OutboundMessage,
            _deadline: tokio::time::Instant,
        ) -> futures::future::BoxFuture<
            'a,
            Result<crate::channel::Receipt, crate::channel::ProviderError>,
        > {
            Box::pin(async move {
                let _ = self.started.send(message.notification_id);
                self.gate.acquire().await.expect("gate open").forget();
                Ok(crate::channel::Receipt::new(None))
            })
        }
    }

    /// The arguments of a channel actor over a [`Gated`] provider with one concurrency permit;
    /// the ids of the sends that reach it, and the gate that lets them through.
    fn gated() -> (
        crate::channel::ChannelArgs,
        tokio::sync::mpsc::UnboundedReceiver<uuid::Uuid>,
        std::sync::Arc<tokio::sync::Semaphore>,
    ) {
        let (started, starts) = tokio::sync::mpsc::unbounded_channel();
        let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
        let provider = Gated {
            started,
            gate: gate.clone(),
        };
        let settings = crate::channel::ChannelSettings {
            concurrency: 1,
            ..Default::default()
        };
        let args = crate::channel::ChannelArgs::new(std::sync::Arc::new(provider), settings, None);
        (args, starts, gate)
    }

    /// A command for `ada@example.com` over email alone.
    fn email_command() -> herald_nats::SendCommand {
        herald_nats::SendCommand {
            v: herald_nats::SCHEMA_VERSION,
            notification_id: uuid::Uuid::now_v7(),
            customer_id: None,
            contacts: herald_nats::Contacts {
                email: Some("ada@example.com".into()),
                ..Default::default()
            },
            category: herald_nats::Category::Transactional,
            channels: vec![Channel::Email],
            content: herald_nats::Content {
                subject: Some("Order shipped".into()),
                text: "Your order #1001 is on its way.".into(),
                ..Default::default()
            },
            created_at: Utc::now(),
        }
    }

    /// The first round's walk of `command`'s chain, each channel's answer awaited `answer_within`.
    async fn walk_first_round(
        channels: &crate::channel::ChannelDirectory,
        command: &herald_nats::SendCommand,
        answer_within: Duration,
    ) -> Walk {
        let refused = std::collections::HashSet::new();
        let skip = Skip {
            opted_out: &[],
            refused: &refused,
        };
        let round = Round::after(0, 0, command.channels.len());
        walk_chain(
            channels,
            command,
            &Destination::new(command.contacts.clone(), None),
            round,
            skip,
            answer_within,
        )
        .await
    }

    #[tokio::test]
    async fn a_send_still_queued_when_the_dispatcher_stops_waiting_is_not_started_and_uses_no_retry()
     {
        use ractor::Actor;

        let (args, mut starts, gate) = gated();
        let directory = crate::channel::ChannelDirectory::default();
        let (supervisor, _) = Actor::spawn(
            None,
            crate::channel::ChannelSupervisor,
            crate::channel::ChannelSupervisorArgs {
                channels: vec![args],
                directory: directory.clone(),
            },
        )
        .await
        .expect("channel supervisor starts");

        // A first notification takes the channel's only permit and holds it at the provider.
        let first = email_command();
        let first_walk = tokio::spawn({
            let (directory, first) = (directory.clone(), first.clone());
            async move { walk_first_round(&directory, &first, WAIT).await }
        });
        let sending = tokio::time::timeout(WAIT, starts.recv()).await;
        assert_eq!(
            sending.expect("the first send starts"),
            Some(first.notification_id)
        );

        // A second one queues for the permit until the dispatcher stops waiting for its answer.
        let second = email_command();
        let walk = walk_first_round(&directory, &second, Duration::from_millis(200)).await;
        let statuses: Vec<&str> = walk.attempts.iter().map(|a| a.status.as_str()).collect();
        assert_eq!(statuses, ["not_started"], "{:?}", walk.attempts);
        assert_eq!(
            walk.attempts[0].provider, "gated",
            "the channel's provider, though its actor did not answer"
        );
        assert!(
            !walk.called,
            "a send that never got its permit called no provider"
        );
        assert!(walk.retryable);
        assert!(
            walk.retry_after >= Some(Duration::from_millis(200)),
            "not retried sooner than the queue it waited in: {:?}",
            walk.retry_after
        );
        // Such a pass uses up no retry, even when it is the last round the policy allows.
        let retry = RetryPolicy {
            max_deliveries: 1,
            ..RetryPolicy::default()
        };
        let round = Round::after(0, 0, 1);
        assert_eq!(
            recorded(&finish(
                &retry,
                second.notification_id,
                walk,
                copy(1),
                round
            )),
            (NotificationStatus::Processing, None, true),
            "waits for the queue, nothing recorded, not dead"
        );

        // Nothing of the second send went out: once the first is through, the permit passes
        // the abandoned send by and goes to a third.
        gate.add_permits(2);
        let first_walk = tokio::time::timeout(WAIT, first_walk)
            .await
            .expect("the first walk ends")
            .expect("walk task");
        assert_eq!(first_walk.sent_on, Some(Channel::Email));
        let third = email_command();
        let third_walk = walk_first_round(&directory, &third, WAIT).await;
        assert_eq!(third_walk.sent_on, Some(Channel::Email));
        let sends: Vec<uuid::Uuid> = std::iter::from_fn(|| starts.try_recv().ok()).collect();
        assert_eq!(
            sends,
            [third.notification_id],
            "only the third send reached the provider after the first"
        );
        supervisor.stop(None);
    }

    #[tokio::test]
    async fn a_channel_actor_that_stopped_is_a_failed_attempt_that_counts() {
        use ractor::Actor;

        let (args, _starts, _gate) = gated();
        let (actor, handle) = Actor::spawn(None, crate::channel::ChannelActor, args)
            .await
            .expect("channel actor starts");
        actor.stop(None);
        tokio::time::timeout(WAIT, handle)
            .await
            .expect("the channel actor stops")
            .expect("actor task");
        let directory = crate::channel::ChannelDirectory::default();
        directory.set(Channel::Email, "gated", actor);

        let walk = walk_first_round(&directory, &email_command(), WAIT).await;
        let statuses: Vec<&str> = walk.attempts.iter().map(|a| a.status.as_str()).collect();
        assert_eq!(statuses, ["failed"], "{:?}", walk.attempts);
        assert_eq!(
            walk.attempts[0].provider, "gated",
            "the provider that may have been called"
        );
        assert!(walk.retryable && walk.called, "counted as a round");
        assert_eq!(
            walk.last_error.as_deref(),
            Some("transient: channel actor stopped before answering")
        );
    }

    #[test]
    fn notifications_waiting_on_the_same_open_circuit_come_back_spread_out() {
        let retry = RetryPolicy::default();
        let cool_down_left = Duration::from_secs(15);
        let delays: Vec<Duration> = (0..50)
            .map(|_| {
                let mut waiting = walk(0, true, false);
                waiting.retry_after = Some(cool_down_left);
                match finish(
                    &retry,
                    uuid::Uuid::nil(),
                    waiting,
                    copy(1),
                    Round::after(0, 0, 1),
                ) {
                    Settle::Record {
                        nak: Some(delay),
                        attempts,
                        ..
                    } if attempts.is_empty() => delay,
                    _ => panic!("expected a wait that records no attempt"),
                }
            })
            .collect();
        // The first round's schedule ceiling is base_delay_ms, 2 s.
        let latest = cool_down_left + Duration::from_secs(2);
        assert!(
            delays.iter().all(|d| *d >= cool_down_left && *d <= latest),
            "not within [{cool_down_left:?}, {latest:?}]: {delays:?}"
        );
        let mut distinct = delays.clone();
        distinct.sort();
        distinct.dedup();
        assert!(
            distinct.len() > 1,
            "50 notifications come back at the same instant: {delays:?}"
        );
    }

    #[test]
    fn the_last_round_names_its_providers_once_and_its_last_error_not_an_opt_out() {
        let attempt = |no: i32, provider: &str, status: &str, error: Option<&str>| {
            herald_entities::delivery_attempt::Model {
                id: uuid::Uuid::nil(),
                notification_id: uuid::Uuid::nil(),
                attempt_no: no,
                channel: "email".into(),
                provider: provider.into(),
                status: status.into(),
                error: error.map(str::to_string),
                provider_message_id: None,
                latency_ms: 1,
                created_at: Utc::now(),
            }
        };
        let attempts = [
            // Round 1 of a chain of three.
            attempt(1, "twilio", "failed", Some("round one")),
            attempt(2, "-", "opted_out", Some("opted out of email")),
            attempt(3, "fcm", "failed", Some("round one too")),
            // Round 2, the last (a fourth channel's attempt 7 only for the second call, as if the
            // chain were four long).
            attempt(4, "twilio", "failed", Some("503 from twilio")),
            attempt(5, "fcm", "failed", Some("fcm down")),
            attempt(6, "twilio", "failed", None),
            attempt(7, "-", "opted_out", Some("opted out of push")),
        ];
        let (providers, error) = last_round(&attempts[..6], 6, 3);
        assert_eq!(providers, ["twilio", "fcm"], "each once, in order");
        assert_eq!(error, Some("fcm down"), "the last error the round met");
        let (providers, error) = last_round(&attempts, 7, 4);
        assert_eq!(providers, ["twilio", "fcm"]);
        assert_eq!(error, Some("fcm down"), "an opt-out is no error");
        assert_eq!(last_round(&[], 0, 3), (vec![], None));
    }

    #[test]
    fn a_command_this_build_cannot_read_is_poison_unless_a_newer_build_may() {
        let hold = NewerVersionHold {
            delay: Duration::from_secs(30),
            max_deliveries: 3,
        };
        let newer = br#"{"v":999}"#;
        assert!(matches!(
            read_command(newer, copy(2), hold),
            Err(Unreadable::Newer { version: 999, delay }) if delay == hold.delay
        ));
        assert!(
            matches!(
                read_command(newer, copy(3), hold),
                Err(Unreadable::Poison(_))
            ),
            "its last delivery is dead-lettered"
        );
        assert!(matches!(
            read_command(b"not json", copy(1), hold),
            Err(Unreadable::Poison(_))
        ));
        let oversized = vec![b' '; herald_nats::MAX_COMMAND_BYTES + 1];
        assert!(matches!(
            read_command(&oversized, copy(1), hold),
            Err(Unreadable::Poison(reason)) if reason.starts_with("oversized command")
        ));
    }
}
