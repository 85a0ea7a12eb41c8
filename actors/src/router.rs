//! `Router`: turns domain events into notifications. Pulls `events.>` from the `herald-router`
//! durable consumer (bounded in flight, like the Dispatcher) and routes each event as a task:
//!
//! decode (malformed, unknown version or type, a control character in a text, a `/` in an id, a
//! subject other than `events.<type>` ⇒ dead letter) → matching [`crate::rules`] →
//! for each rule: load the customer (unknown ⇒ retried on the retry schedule, as a customer may
//! be created a moment after the event that names it, then dead letter once the schedule's whole
//! wait has passed since the event was published; dead letter at once when waiting events hold
//! their share of the consumer's pending slots, [`crate::waiting`]) → render the template,
//! compiled or runtime, in the customer's locale (unknown template or render error ⇒ dead letter)
//! → store the notification under an id derived from event id and rule (a second delivery of the
//! event finds it) → publish its send command (one larger than the server's `max_payload` ⇒
//! notification removed, dead letter) → ack. A database outage or NATS failure NAKs with
//! backoff; any other database error dead-letters (it would fail every retry). Nothing is acked
//! before it is stored and published, and nothing is notified twice. The rules' dead letters are
//! published only when no rule hands the event back, just before it is acked, so a rule's failure
//! is dead-lettered once however long another rule of the event waits or retries.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::PullConsumer, message::Acker};
use bytes::Bytes;
use chrono::Utc;
use herald_entities::{
    NotificationStatus, RepoError, customer, notification,
    repo::{
        self,
        insert_queue::InsertQueue,
        notifications::{Inserted, NewNotification},
    },
};
use herald_nats::{
    Category, Channel, Contacts, Content, DeadLetterHeaders, DomainEvent, MAX_COMMAND_BYTES,
    NatsError, Publisher, SCHEMA_VERSION, SendCommand, StreamSettings, TemplateRef,
    distinct_channels,
};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use sea_orm::DatabaseConnection;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::pull::Delivery;
use crate::retry::RetryPolicy;
use crate::rules::{self, Rule};
use crate::templates::{runtime::RuntimeTemplates, variables};

use herald_nats::events::{MAX_EVENT_BYTES, router_request_id};

use crate::waiting::{Waiters, WaitingRoom};

/// The dead-letter source of events: `notify.dlq.events`.
pub const DLQ_SOURCE: &str = "events";

/// Messages of the [`Router`].
pub enum RouterMsg {
    /// Route this event (from the pull loop).
    Route(Box<jetstream::Message>, OwnedSemaphorePermit),
    /// Panic on purpose, to exercise supervision (fault injection in tests).
    Crash,
}

/// What routing needs; shared by all routing tasks.
pub struct RouterContext {
    /// Database pool (customers, notifications).
    pub db: DatabaseConnection,
    /// Stores new notifications (group commit with the API's).
    pub inserts: InsertQueue,
    /// Publisher (send commands, dead letters).
    pub publisher: Publisher,
    /// The rules in force.
    pub rules: Vec<Rule>,
    /// The templates they name: compiled, or runtime ones (shared with the dispatcher's cache).
    pub templates: Arc<RuntimeTemplates>,
    /// Chain per category for rules that name none.
    pub default_chains: HashMap<Category, Vec<Channel>>,
    /// Backoff when the database or NATS fails, and how long an unknown customer is waited for.
    pub retry: RetryPolicy,
    /// How many events may wait for unknown customers at once.
    pub waiting: WaitingRoom,
}

/// Arguments of the [`Router`].
#[derive(Clone)]
pub struct RouterArgs {
    /// The `herald-router` consumer.
    pub consumer: PullConsumer,
    /// JetStream, to bind the consumer again when pulling from it fails (it may be deleted).
    pub js: jetstream::Context,
    /// The consumer's shape, for binding it again.
    pub streams: StreamSettings,
    /// What routing needs.
    pub context: Arc<RouterContext>,
    /// In-flight bound.
    pub in_flight: Arc<Semaphore>,
    /// Cancelled when the engine stops taking messages.
    pub intake: CancellationToken,
}

/// State of the [`Router`].
pub struct RouterState {
    context: Arc<RouterContext>,
    pull: JoinHandle<()>,
    /// Stops the pull loop.
    stop: CancellationToken,
    /// Cancels the pull loop when the state is dropped (also on a panic, when ractor runs no
    /// `post_stop`), so no loop outlives its router.
    _stop: DropGuard,
}

/// The router.
pub struct Router;

impl Actor for Router {
    type Msg = RouterMsg;
    type State = RouterState;
    type Arguments = RouterArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<RouterMsg>,
        args: RouterArgs,
    ) -> Result<RouterState, ActorProcessingErr> {
        let stop = args.intake.child_token();
        let (js, streams) = (args.js, args.streams);
        let pull = tokio::spawn(crate::pull::pull_loop(
            crate::pull::Pull {
                what: "events",
                consumer: Some(args.consumer),
                bind: move || {
                    let (js, streams) = (js.clone(), streams.clone());
                    async move { herald_nats::router_consumer(&js, &streams).await }
                },
                batch: None,
                gate: crate::pull::Open,
                permits: args.in_flight,
                stop: stop.clone(),
            },
            move |message, permit| match myself.cast(RouterMsg::Route(message, permit)) {
                Ok(()) => Ok(()),
                Err(ractor::MessagingErr::SendErr(RouterMsg::Route(message, _))) => Err(message),
                // Any other failure lost the message inside ractor; JetStream redelivers it.
                Err(_) => Ok(()),
            },
        ));
        Ok(RouterState {
            context: args.context,
            pull,
            _stop: stop.clone().drop_guard(),
            stop,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<RouterMsg>,
        message: RouterMsg,
        state: &mut RouterState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            RouterMsg::Route(message, permit) => {
                tokio::spawn(route(state.context.clone(), *message, permit));
            }
            RouterMsg::Crash => panic!("fault injected into router"),
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<RouterMsg>,
        state: &mut RouterState,
    ) -> Result<(), ActorProcessingErr> {
        // Stop pulling and give the loop a moment to return what it holds.
        state.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut state.pull).await;
        Ok(())
    }
}

/// Why one rule did not produce its notification.
enum Failure {
    /// Will not work however often it is tried: dead-letter with this reason.
    DeadLetter(String),
    /// May work later (database outage, NATS down): NAK with backoff.
    Retry(String),
    /// May work once time has passed (the customer is not registered yet): NAK with this delay.
    Wait(String, Duration),
}

/// Routes one event message end to end; the permit is held until it is acked or NAKed.
pub async fn route(
    ctx: Arc<RouterContext>,
    message: jetstream::Message,
    _permit: OwnedSemaphorePermit,
) {
    let copy = Delivery::of(&message);
    let sequence = copy.sequence;
    let delivered = copy.count;
    let (message, acker) = message.split();
    let poison = |reason: String| Poison {
        payload: message.payload.clone(),
        subject: message.subject.to_string(),
        delivered,
        reason,
        msg_id: format!("event-poison:{sequence}"),
    };
    if message.payload.len() > MAX_EVENT_BYTES {
        let reason = format!(
            "oversized event: {} bytes (limit {MAX_EVENT_BYTES})",
            message.payload.len()
        );
        return unreadable(&ctx, poison(reason), acker).await;
    }
    let event = match DomainEvent::decode(&message.payload) {
        Ok(event) => event,
        Err(err) => return unreadable(&ctx, poison(err.to_string()), acker).await,
    };
    if message.subject.as_str() != event.subject() {
        let reason = format!(
            "an event of type {} published on {}: its subject must be {}",
            event.event_type(),
            message.subject,
            event.subject()
        );
        return unreadable(&ctx, poison(reason), acker).await;
    }
    let data = event.data.to_json();
    let matched = rules::matching(&ctx.rules, event.event_type(), &data);
    if matched.is_empty() {
        metrics::counter!("herald_events_total", "outcome" => "unrouted").increment(1);
        // Often normal (no rule for the type, or not for this status): not a warning.
        tracing::debug!(event = %event.id, event_type = event.event_type(), "no rule routes the event; acked");
        let _ = acker.ack().await;
        return;
    }
    // The rules' dead letters go out once every rule is done with the event: were one published
    // while a later rule hands the event back (a wait for its customer, an outage), each
    // redelivery would publish it again, kept as a new entry once the de-duplication window had
    // passed (the waits and backoffs can outlast it).
    let mut dead = Vec::new();
    for rule in matched {
        match notify(&ctx, &event, &data, rule, copy).await {
            Ok(()) => {
                metrics::counter!("herald_events_total", "outcome" => "notified").increment(1);
            }
            Err(Failure::DeadLetter(reason)) => {
                // The stream message's sequence in the id: a redelivery of this message (a dead
                // letter not confirmed, an ack lost) is a duplicate the DLQ drops, while the same
                // event replayed (a new message) that fails again gets an entry of its own even
                // within the de-duplication window.
                dead.push(Poison {
                    reason: format!("rule {}: {reason}", rule.name),
                    msg_id: format!("{}:{}:dead:{sequence}", event.id, rule.name),
                    ..poison(String::new())
                });
            }
            Err(Failure::Retry(reason)) => {
                metrics::counter!("herald_events_total", "outcome" => "retried").increment(1);
                tracing::warn!(event = %event.id, rule = %rule.name, %reason, "cannot route yet; retrying");
                return nak(&ctx, acker, delivered).await;
            }
            Err(Failure::Wait(reason, delay)) => {
                metrics::counter!("herald_events_total", "outcome" => "retried").increment(1);
                tracing::info!(event = %event.id, rule = %rule.name, %reason, delay_ms = delay.as_millis() as u64, "cannot route yet; waiting");
                let _ = acker.ack_with(AckKind::Nak(Some(delay))).await;
                return;
            }
        }
    }
    for letter in dead {
        if !dead_letter(&ctx, letter).await {
            return nak(&ctx, acker, delivered).await;
        }
    }
    let _ = acker.ack().await;
}

/// Makes (or finds) the notification `rule` derives from `event` and publishes its command.
/// `copy` is the event message's delivery: an unknown customer is waited for until the retry
/// schedule's whole wait has passed since it was published.
async fn notify(
    ctx: &RouterContext,
    event: &DomainEvent,
    data: &serde_json::Value,
    rule: &Rule,
    copy: Delivery,
) -> Result<(), Failure> {
    let id = rule.notification_id(event);
    // A redelivered or re-published event: the notification exists, only its command may be
    // missing (a crash between storing and publishing).
    if let Some(existing) = repo::notifications::find(&ctx.db, id)
        .await
        .map_err(database)?
    {
        return publish_if_queued(ctx, &existing).await;
    }
    let customer_id = rule.recipient_in(data).map_err(Failure::DeadLetter)?;
    let Some(customer) = repo::customers::find_by_external_id(&ctx.db, customer_id)
        .await
        .map_err(database)?
    else {
        return Err(unknown_customer(ctx, customer_id, copy).await);
    };
    let content = render(ctx, &rule.template, event, &customer).await?;
    let command = send_command(ctx, event, rule, &customer, content);
    if let Err(len) = command.check_size() {
        return Err(Failure::DeadLetter(format!(
            "the notification rendered takes {len} bytes as a send command; the limit is \
             {MAX_COMMAND_BYTES}"
        )));
    }
    let row = new_notification(event, rule, command);
    match ctx.inserts.insert(row).await.map_err(database)? {
        Inserted::New(stored) => {
            // Accepted once stored: a redelivery finds it above and only publishes its command.
            metrics::counter!("herald_notifications_accepted_total", "source" => "event")
                .increment(1);
            publish_if_queued(ctx, &stored).await
        }
        // Stored by another instance routing the same event at the same time, which counted it.
        Inserted::Duplicate(stored) => publish_if_queued(ctx, &stored).await,
    }
}

/// What a database error means for the event: an outage (or the writer stopping with the
/// process) passes, so the event is retried; any other refusal (a constraint, text the database
/// cannot hold, a row it cannot read) would fail every retry, and the router's consumer has no
/// delivery limit, so the event is dead-lettered with the error as its reason, replayable once the
/// cause is mended.
fn database(err: RepoError) -> Failure {
    if err.is_outage() || matches!(err, RepoError::WriterStopped) {
        Failure::Retry(err.to_string())
    } else {
        Failure::DeadLetter(err.to_string())
    }
}

/// What an event for a customer Herald does not know gets: a wait on the retry schedule (the
/// producer may create the customer a moment after publishing the event), or a dead letter once
/// the schedule's whole wait has passed since the event was published (replayable once the
/// customer exists). Deliveries handed back for other reasons (a database outage) do not shorten
/// the wait. A waiting event holds a pending slot of the router's consumer, so it is dead-lettered
/// at once, saying why, when waiting events hold their share of them ([`crate::waiting`]).
async fn unknown_customer(ctx: &RouterContext, customer_id: &str, copy: Delivery) -> Failure {
    let reason = format!("unknown customer {customer_id:?}");
    match ctx
        .waiting
        .may_wait(&ctx.retry, Some(Waiters::Events), copy)
        .await
    {
        Ok(delay) => Failure::Wait(reason, delay),
        Err(refused) => Failure::DeadLetter(format!("{reason} ({refused})")),
    }
}

/// Renders the template `code` for `event` in `customer`'s locale. An unknown template or one that
/// cannot render dead-letters the event (once the template is created or mended, the dead letter
/// can be replayed); runtime templates that cannot be read are retried.
async fn render(
    ctx: &RouterContext,
    code: &str,
    event: &DomainEvent,
    customer: &customer::Model,
) -> Result<Content, Failure> {
    let reference = TemplateRef {
        code: code.to_string(),
        variables: variables::from_event(event, customer),
        locale: None,
    };
    ctx.templates
        .render(&reference, Some(&customer.locale))
        .await
        .map_err(|err| {
            if err.is_transient() {
                Failure::Retry(err.to_string())
            } else {
                Failure::DeadLetter(err.to_string())
            }
        })
}

/// The channel chain of `rule`'s notifications: its own, else its category's default, else email;
/// a channel named twice is walked once, at its first place, as the API's chains are.
fn chain_of(rule: &Rule, default_chains: &HashMap<Category, Vec<Channel>>) -> Vec<Channel> {
    let configured = rule
        .channels
        .as_ref()
        .or_else(|| default_chains.get(&rule.category));
    distinct_channels(
        configured
            .map_or(&[Channel::Email][..], Vec::as_slice)
            .iter()
            .copied(),
    )
}

/// The send command for `rule`'s notification of `event`, addressed to `customer`.
fn send_command(
    ctx: &RouterContext,
    event: &DomainEvent,
    rule: &Rule,
    customer: &customer::Model,
    content: Content,
) -> SendCommand {
    let channels = chain_of(rule, &ctx.default_chains);
    SendCommand {
        v: SCHEMA_VERSION,
        notification_id: rule.notification_id(event),
        customer_id: Some(customer.external_id.clone()),
        contacts: Contacts::default(),
        category: rule.category,
        channels,
        content,
        created_at: Utc::now(),
    }
}

/// The notification row of `command`, which `rule` made from `event`.
fn new_notification(event: &DomainEvent, rule: &Rule, command: SendCommand) -> NewNotification {
    let recipient_key = command.customer_id.clone().unwrap_or_default();
    NewNotification {
        id: command.notification_id,
        // The event and rule are the idempotency key, like a caller's request id.
        request_id: Some(router_request_id(event.id, &rule.name)),
        // Only the API's requests have fingerprints: an event's key is its own.
        request_fingerprint: None,
        customer_id: command.customer_id,
        recipient_key,
        contacts: serde_json::json!({}),
        category: command.category.as_str().into(),
        channels: serde_json::json!(command.channels),
        content: serde_json::to_value(&command.content).unwrap_or_default(),
        status: NotificationStatus::Queued,
        scheduled_at: None,
        // A redelivered event publishes a command that never went out; no mark is needed.
        status_reason: None,
        created_at: command.created_at,
    }
}

/// Publishes the stored notification's command while it is as the Router stored it
/// ([`awaits_first_command`]); otherwise something else has its command in hand. JetStream's
/// `Nats-Msg-Id` de-duplication and the dispatcher's claim (which drops a command whose
/// notification is final) make a second publish of the Router's own command harmless.
async fn publish_if_queued(ctx: &RouterContext, row: &notification::Model) -> Result<(), Failure> {
    if !awaits_first_command(row) {
        return Ok(());
    }
    let command = repo::notifications::send_command(row)
        .map_err(|e| Failure::DeadLetter(format!("notification {}: {e}", row.id)))?;
    match ctx
        .publisher
        .publish_command(&row.recipient_key, &command)
        .await
    {
        Ok(()) => Ok(()),
        Err(err @ NatsError::TooLarge { .. }) => Err(too_large(ctx, row, &err).await),
        Err(err) => Err(Failure::Retry(err.to_string())),
    }
}

/// Whether `row` is as the Router stored it, `queued` with no `status_reason` and never
/// scheduled, so that its first command may not have been published (the Router stopped between
/// storing and publishing). Any other `queued` notification has a command in hand elsewhere: a
/// dead-letter replay's (marked until confirmed, then "replayed …"; published with the replay's
/// attempt base, which a copy under the notification's own id would lack, so that copy would find
/// the replay's rounds spent and give the notification up unsent), or the Scheduler's release of
/// a deferred notification (`scheduled_at` set; its claim mark is cleared once confirmed).
fn awaits_first_command(row: &notification::Model) -> bool {
    row.status == NotificationStatus::Queued
        && row.status_reason.is_none()
        && row.scheduled_at.is_none()
}

/// What a command the NATS server refuses as larger than its `max_payload` gets (a server set
/// below Herald's own limit, [`MAX_COMMAND_BYTES`]): it would be refused on every retry, and the
/// router's consumer has no delivery limit, so the event is dead-lettered. The notification is
/// removed first (no dispatcher has it: JetStream never got its command), so that a replay, once
/// the server takes larger messages or the template makes smaller ones, renders it anew; the
/// event's other notifications are found by their ids then and not sent again.
async fn too_large(ctx: &RouterContext, row: &notification::Model, err: &NatsError) -> Failure {
    if let Err(err) = repo::notifications::delete_unsent(&ctx.db, row.id).await {
        return database(err);
    }
    Failure::DeadLetter(format!(
        "{err} (Herald's own limit for a send command is {MAX_COMMAND_BYTES} bytes): raise the \
         server's max_payload or make the template's output smaller, then replay"
    ))
}

/// A message to dead-letter.
struct Poison {
    payload: Bytes,
    subject: String,
    delivered: u64,
    reason: String,
    msg_id: String,
}

/// Copies the message to the dead-letter stream; `false` when that failed.
async fn dead_letter(ctx: &RouterContext, letter: Poison) -> bool {
    tracing::warn!(subject = %letter.subject, reason = %letter.reason, "event dead-lettered");
    metrics::counter!("herald_events_total", "outcome" => "dead_letter").increment(1);
    match ctx
        .publisher
        .publish_dead_letter(
            &DeadLetterHeaders {
                source: DLQ_SOURCE,
                original_subject: &letter.subject,
                deliveries: letter.delivered,
                reason: &letter.reason,
                providers: &[],
            },
            letter.payload,
            &letter.msg_id,
        )
        .await
    {
        Ok(()) => true,
        Err(err) => {
            tracing::warn!(error = %err, "cannot dead-letter an event; retrying later");
            false
        }
    }
}

/// Dead-letters a message that is not a readable event (malformed, oversized, of an unknown
/// version or type), counted as the dispatcher counts its unreadable commands.
async fn unreadable(ctx: &RouterContext, letter: Poison, acker: Acker) {
    let delivered = letter.delivered;
    if dead_letter(ctx, letter).await {
        metrics::counter!("herald_poison_messages_total", "consumer" => "router").increment(1);
        let _ = acker.ack().await;
    } else {
        nak(ctx, acker, delivered).await;
    }
}

async fn nak(ctx: &RouterContext, acker: Acker, delivered: u64) {
    let delay = ctx.retry.delay(delivered, None, rand::random());
    let _ = acker.ack_with(AckKind::Nak(Some(delay))).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(channels: Option<Vec<Channel>>) -> Rule {
        let mut rule = rules::default_rules().remove(0);
        rule.channels = channels;
        rule
    }

    #[test]
    fn a_channel_named_twice_in_a_chain_is_walked_once() {
        use Channel::{Email, Sms, Telegram};
        let own = rule(Some(vec![Email, Sms, Email]));
        assert_eq!(chain_of(&own, &HashMap::new()), [Email, Sms]);
        let defaults = HashMap::from([(own.category, vec![Telegram, Email, Telegram])]);
        assert_eq!(chain_of(&rule(None), &defaults), [Telegram, Email]);
        assert_eq!(chain_of(&rule(None), &HashMap::new()), [Email]);
    }

    /// A notification as the Router stores it, with `status` and `status_reason`.
    fn stored(status: NotificationStatus, reason: Option<&str>) -> notification::Model {
        let now = Utc::now();
        notification::Model {
            id: uuid::Uuid::now_v7(),
            request_id: None,
            request_fingerprint: None,
            customer_id: Some("c-1".into()),
            recipient_key: "c-1".into(),
            contacts: serde_json::json!({}),
            category: "transactional".into(),
            channels: serde_json::json!(["email"]),
            content: serde_json::json!({}),
            status,
            status_reason: reason.map(Into::into),
            scheduled_at: None,
            final_channel: None,
            attempts: 0,
            error: None,
            created_at: now,
            updated_at: now,
            sent_at: None,
            batch_id: None,
        }
    }

    /// Only a notification as the Router stored it gets its command published again by a
    /// re-routed event; one a replay or the Scheduler requeued has its command published by them.
    #[test]
    fn only_a_notification_as_the_router_stored_it_awaits_its_first_command() {
        use NotificationStatus::{Processing, Queued};
        use herald_entities::repo::{dead_letters::PendingReplay, schedule};
        assert!(awaits_first_command(&stored(Queued, None)));
        assert!(!awaits_first_command(&stored(Processing, None)));
        let replay = PendingReplay::new(7).mark();
        for reason in [replay.as_str(), schedule::REPLAYED, schedule::CLAIM_PREFIX] {
            assert!(
                !awaits_first_command(&stored(Queued, Some(reason))),
                "{reason}"
            );
        }
        // Deferred, then released by the Scheduler, whose claim mark was cleared once confirmed.
        let released = notification::Model {
            scheduled_at: Some(Utc::now()),
            ..stored(Queued, None)
        };
        assert!(!awaits_first_command(&released));
    }
}
