//! Publishing with JetStream acknowledgement and `Nats-Msg-Id` de-duplication.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use async_nats::{HeaderMap, jetstream};
use bytes::Bytes;
use futures::future::join_all;

use crate::{NatsError, SendCommand, StatusEvent, subjects};

/// What a dead letter says about itself, in its headers.
#[derive(Debug, Clone, Copy)]
pub struct DeadLetterHeaders<'a> {
    /// The consumer that gave up (`cmd`, `events`): the subject is `notify.dlq.<source>`.
    pub source: &'a str,
    /// Where the message was first published.
    pub original_subject: &'a str,
    /// How many times it had been delivered.
    pub deliveries: u64,
    /// Why it is dead.
    pub reason: &'a str,
    /// Providers called in the last round (commands only).
    pub providers: &'a [String],
}

/// The partition count send commands are spread by, shared by every clone: this instance's
/// `nats.partitions`, or, while the deployment records another (the instance stands aside, see
/// [`crate::Heartbeat::other_partitions`]), the recorded one, so that a command this instance
/// publishes goes where the instances of the recorded count consume it, on the partition their
/// own commands for the same recipient go to. Cheap to clone and to read.
#[derive(Debug, Clone)]
pub struct CommandPartitions {
    configured: u32,
    current: Arc<AtomicU32>,
}

impl CommandPartitions {
    /// Spreads by `configured` (at least 1) until told to follow another count.
    pub fn new(configured: u32) -> Self {
        let configured = configured.max(1);
        Self {
            configured,
            current: Arc::new(AtomicU32::new(configured)),
        }
    }

    /// The count commands are spread by now.
    pub fn current(&self) -> u32 {
        self.current.load(Ordering::Relaxed)
    }

    /// This instance's own count (`nats.partitions`).
    pub fn configured(&self) -> u32 {
        self.configured
    }

    /// Spreads by `recorded`, the count the deployment records, from now on; answers whether it
    /// does. A count no Herald instance can run with (0, above [`subjects::MAX_PARTITIONS`]:
    /// written by hand) is not followed: nothing would consume the partitions it names, while
    /// commands on this instance's own wait for it to take its partitions again (the record,
    /// refreshed by nobody, ages out).
    pub fn follow(&self, recorded: u32) -> bool {
        let valid = (1..=subjects::MAX_PARTITIONS).contains(&recorded);
        self.current.store(
            if valid { recorded } else { self.configured },
            Ordering::Relaxed,
        );
        valid
    }

    /// Spreads by this instance's own count again (the counts agree).
    pub fn restore(&self) {
        self.current.store(self.configured, Ordering::Relaxed);
    }

    /// The subject of the send commands for `recipient_key`, by the current count.
    fn command_subject(&self, recipient_key: &str) -> String {
        subjects::command_subject(subjects::partition_for(recipient_key, self.current()))
    }
}

/// How many notifications a warning about status events not published names (it counts them
/// all).
const LOGGED_IDS: usize = 20;

/// Publishes Herald's messages on JetStream. Cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    js: jetstream::Context,
    partitions: CommandPartitions,
}

impl Publisher {
    /// A publisher over `js` that spreads send commands over `partitions` subjects (or the
    /// count [`Publisher::command_partitions`] is told to follow).
    pub fn new(js: jetstream::Context, partitions: u32) -> Self {
        Self {
            js,
            partitions: CommandPartitions::new(partitions),
        }
    }

    /// The JetStream context underneath.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// The partition count send commands are spread by, shared with every clone of this
    /// publisher: the lease keeper has it follow the deployment's recorded count while that
    /// differs from this instance's.
    pub fn command_partitions(&self) -> &CommandPartitions {
        &self.partitions
    }

    /// Publishes a send command on its recipient's partition (by [`CommandPartitions::current`]),
    /// with the notification id as
    /// `Nats-Msg-Id`, and waits until JetStream has stored it. The notification's first command
    /// (an API send, an event's, a bulk page's) goes this way: the same command published again
    /// (a repeated request, a redelivered event, a page redone) is a duplicate JetStream drops
    /// within its window, which is no loss, so this answers `Ok` for it too.
    pub async fn publish_command(
        &self,
        recipient_key: &str,
        command: &SendCommand,
    ) -> Result<(), NatsError> {
        let id = command.notification_id.to_string();
        self.publish_command_as(recipient_key, command, &id)
            .await
            .map(|_| ())
    }

    /// Publishes a send command on its recipient's partition under `msg_id` (the Scheduler's
    /// release of a notification come due goes under [`release_msg_id`], not the notification's
    /// id: its first command may still be in the de-duplication window), waits until JetStream has
    /// stored it, and answers whether JetStream took it for a duplicate and dropped it.
    pub async fn publish_command_as(
        &self,
        recipient_key: &str,
        command: &SendCommand,
        msg_id: &str,
    ) -> Result<Stored, NatsError> {
        let subject = self.partitions.command_subject(recipient_key);
        self.publish_with_id(subject, msg_id, HeaderMap::new(), command.encode()?)
            .await
    }

    /// What the server connected last takes of a send command as the Publisher publishes it
    /// ([`Publisher::publish_command`], [`Publisher::publish_command_as`] with a
    /// [`release_msg_id`]): its `max_payload`, and the headers the command goes with.
    pub fn command_room(&self) -> CommandRoom {
        CommandRoom {
            max_payload: self.js.client().max_payload(),
            headers: command_headers_len(),
        }
    }

    /// Publishes an existing command's bytes again on its recipient's partition (a replay from
    /// the dead-letter stream) under a new `Nats-Msg-Id`: the original id may still be in the
    /// de-duplication window, where JetStream would drop the replay silently. `attempts_before`
    /// (the attempts its notification has recorded) goes along as
    /// [`subjects::HEADER_REPLAY_BASE`].
    pub async fn republish_command(
        &self,
        recipient_key: &str,
        payload: Bytes,
        msg_id: &str,
        attempts_before: i32,
    ) -> Result<(), NatsError> {
        let subject = self.partitions.command_subject(recipient_key);
        let mut headers = HeaderMap::new();
        headers.insert(subjects::HEADER_REPLAY_BASE, attempts_before.to_string());
        self.publish_with_id(subject, msg_id, headers, payload)
            .await
            .map(|_| ())
    }

    /// Publishes a domain event's bytes on `subject` with the event id as `Nats-Msg-Id`, and waits
    /// until JetStream has stored it; publishing the same event again within the de-duplication
    /// window is a no-op, so an outbox may re-publish freely.
    pub async fn publish_event(
        &self,
        subject: &str,
        event_id: &str,
        payload: Bytes,
    ) -> Result<(), NatsError> {
        self.publish_with_id(subject.to_string(), event_id, HeaderMap::new(), payload)
            .await
            .map(|_| ())
    }

    /// Publishes a status transition for observers, its `Nats-Msg-Id` the notification, the
    /// status and the transition's time in µs: the same transition published again (a batch
    /// written again after an unconfirmed commit, a repeated receipt) is a duplicate that
    /// JetStream drops within its window, while a new transition to the same status (`dead` again
    /// after a dead-letter replay) is stored.
    pub async fn publish_status(&self, event: &StatusEvent) -> Result<(), NatsError> {
        let id = status_event_id(event);
        let payload = Bytes::from(serde_json::to_vec(event)?);
        self.publish_with_id(
            subjects::status_subject(&event.status),
            &id,
            HeaderMap::new(),
            payload,
        )
        .await
        .map(|_| ())
    }

    /// Publishes `events` ([`Self::publish_status`]) all at once: each awaits its own
    /// acknowledgement, none waits for another's. An event not published is counted in
    /// `herald_status_events_unpublished_total` (by status) and the failures are logged in one
    /// line naming the notifications of the first 20 (in the caller's span, which says
    /// whose events they are): in a NATS outage a batch of thousands fails whole.
    /// The transitions stand either way; answers how many events were not published.
    pub async fn publish_statuses(&self, events: &[StatusEvent]) -> usize {
        let results = join_all(events.iter().map(|event| self.publish_status(event))).await;
        let mut unpublished = Vec::new();
        let mut last_error = None;
        for (event, result) in events.iter().zip(results) {
            if let Err(err) = result {
                metrics::counter!("herald_status_events_unpublished_total", "status" => event.status.clone())
                    .increment(1);
                unpublished.push(event.notification_id);
                last_error = Some(err);
            }
        }
        if let Some(error) = last_error {
            let named = &unpublished[..unpublished.len().min(LOGGED_IDS)];
            tracing::warn!(
                count = unpublished.len(),
                ids = ?named,
                %error,
                "status events not published (the ids of the first {} of them)",
                named.len()
            );
        }
        unpublished.len()
    }

    /// Copies a message to the dead-letter stream with its reason and origin in headers. A message
    /// that with these headers would exceed the server's `max_payload` (the dead letter would be
    /// refused, and the message handed back for ever) is left out: the dead letter has an empty
    /// payload and its reason begins by saying so, with the message's size.
    pub async fn publish_dead_letter(
        &self,
        letter: &DeadLetterHeaders<'_>,
        payload: Bytes,
        msg_id: &str,
    ) -> Result<(), NatsError> {
        let mut headers = HeaderMap::new();
        if !letter.providers.is_empty() {
            headers.insert(
                subjects::HEADER_DLQ_PROVIDERS,
                header_safe(&letter.providers.join(",")).as_str(),
            );
        }
        headers.insert(
            subjects::HEADER_DLQ_ORIGINAL_SUBJECT,
            header_safe(letter.original_subject).as_str(),
        );
        headers.insert(
            subjects::HEADER_DLQ_DELIVERIES,
            letter.deliveries.to_string().as_str(),
        );
        // The reason is at most 512 characters; room for it, then for the message if it fits.
        let room = self.js.client().max_payload().saturating_sub(
            wire_len(&headers)
                + HEADER_LINE
                + subjects::HEADER_DLQ_REASON.len()
                + 512
                + HEADER_LINE
                + AsRef::<str>::as_ref(&async_nats::header::NATS_MESSAGE_ID).len()
                + msg_id.len(),
        );
        let (reason, payload) = if payload.len() <= room {
            (header_safe(letter.reason), payload)
        } else {
            let left_out = format!(
                "the message ({} bytes) is left out: with its headers it exceeds the server's \
                 max_payload; {}",
                payload.len(),
                letter.reason
            );
            (header_safe(&left_out), Bytes::new())
        };
        headers.insert(subjects::HEADER_DLQ_REASON, reason.as_str());
        self.publish_with_id(
            subjects::dlq_subject(letter.source),
            msg_id,
            headers,
            payload,
        )
        .await
        .map(|_| ())
    }

    /// Whether the client is connected to a server right now.
    pub fn is_connected(&self) -> bool {
        self.js.client().connection_state() == async_nats::connection::State::Connected
    }

    /// Publishes `payload` under `msg_id` and waits for JetStream's acknowledgement, which says
    /// whether it was stored or dropped as a duplicate.
    async fn publish_with_id(
        &self,
        subject: String,
        msg_id: &str,
        mut headers: HeaderMap,
        payload: Bytes,
    ) -> Result<Stored, NatsError> {
        headers.insert(async_nats::header::NATS_MESSAGE_ID, msg_id);
        let failed = |reason: String| NatsError::Publish {
            subject: subject.clone(),
            reason,
        };
        // While disconnected the client would buffer the message and send it after reconnecting,
        // possibly long after the caller was told it failed. Refuse at once instead.
        if !self.is_connected() {
            return Err(failed("not connected to NATS".into()));
        }
        self.js
            .publish_with_headers(subject.clone(), headers, payload)
            .await
            .map_err(|e| match e.kind() {
                jetstream::context::PublishErrorKind::MaxPayloadExceeded => NatsError::TooLarge {
                    subject: subject.clone(),
                    reason: e.to_string(),
                },
                _ => failed(e.to_string()),
            })?
            .await
            .map_err(|e| failed(e.to_string()))
            .map(|ack| match ack.duplicate {
                true => Stored::Duplicate,
                false => Stored::New,
            })
    }
}

/// What JetStream did with a message it acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Stored now.
    New,
    /// Dropped: a message with the same `Nats-Msg-Id` was stored within the stream's
    /// de-duplication window (`PubAck.duplicate`). No loss when that message is this one published
    /// before; a loss when the id was meant to be new.
    Duplicate,
}

/// The `Nats-Msg-Id` of the command a Scheduler publishes for notification `id` under its claim
/// `claim` (the token of the claim's mark): `<id>:claim:<claim>`. Each claim, so each time a
/// scheduled or deferred notification comes due, has an id of its own, never the notification's:
/// its first command, published under that, may still be in the stream's de-duplication window
/// (a window set longer by another instance, a hold shorter than it), where JetStream would drop
/// the release. The same claim published again (its instance stopped before confirming it, and
/// the stale sweep publishes it) has the same id, and that copy is dropped.
pub fn release_msg_id(id: uuid::Uuid, claim: &str) -> String {
    format!("{id}:claim:{claim}")
}

/// The notification a send command's `Nats-Msg-Id` names, as Herald publishes commands: the
/// notification id alone (its first command), before `:claim:…` ([`release_msg_id`]) or before
/// `:replay:…` (a dead-letter replay). `None` for an id published otherwise.
pub fn notification_of_msg_id(msg_id: &str) -> Option<uuid::Uuid> {
    let id = msg_id.split_once(':').map_or(msg_id, |(id, _)| id);
    uuid::Uuid::parse_str(id).ok()
}

/// How large a send command the NATS server takes (and a domain event: its `Nats-Msg-Id`, the
/// event id, is shorter than a command's, so an event within it fits too): the client refuses a
/// message whose payload and headers together exceed the server's `max_payload` (`TooLarge`),
/// however often it is tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandRoom {
    /// The server's `max_payload`, in bytes (from its `INFO`; a reconnect reads it anew).
    pub max_payload: usize,
    /// The bytes a command's headers take on the wire at most (its `Nats-Msg-Id`, as long as a
    /// Scheduler's release's).
    pub headers: usize,
}

impl CommandRoom {
    /// The longest send command, in bytes, that fits beside its headers.
    pub fn max_command(&self) -> usize {
        self.max_payload.saturating_sub(self.headers)
    }

    /// Why a send command of `len` bytes does not fit, with the sizes; `None` when it does.
    pub fn refusal(&self, len: usize) -> Option<String> {
        self.refusal_as(len, "a send command")
    }

    /// Why `what` (`a send command`, `an event`) of `len` bytes does not fit, with the sizes;
    /// `None` when it does.
    pub fn refusal_as(&self, len: usize, what: &str) -> Option<String> {
        let total = len + self.headers;
        (total > self.max_payload).then(|| {
            format!(
                "{len} bytes as {what}, {total} with its headers, above the server's max_payload \
                 of {} bytes",
                self.max_payload
            )
        })
    }
}

/// Bytes the headers of a send command take on the wire at most, first published or released by
/// the Scheduler: its `Nats-Msg-Id`, a release's ([`release_msg_id`], a claim's token being a
/// UUID), which is longer than the notification id. A command accepted as fitting fits when due.
fn command_headers_len() -> usize {
    *COMMAND_HEADERS_LEN
}

/// [`command_headers_len`], counted once: the API asks for it with every send.
static COMMAND_HEADERS_LEN: std::sync::LazyLock<usize> = std::sync::LazyLock::new(|| {
    let mut headers = HeaderMap::new();
    let nil = uuid::Uuid::nil();
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        release_msg_id(nil, &nil.to_string()).as_str(),
    );
    wire_len(&headers)
});

/// A status event's `Nats-Msg-Id`: `{notification}:{status}:{when, in microseconds since the
/// epoch}`. The time of the transition tells two transitions of a notification to the same status
/// apart (it died, was replayed, died again), and is the same each time one transition is
/// published.
fn status_event_id(event: &StatusEvent) -> String {
    format!(
        "{}:{}:{}",
        event.notification_id,
        event.status,
        event.at.timestamp_micros()
    )
}

/// Bytes a header line takes besides its name and value (`<name>: <value>\r\n`).
const HEADER_LINE: usize = 4;

/// Bytes `headers` take on the wire: `NATS/1.0\r\n`, a line per value, and a closing `\r\n`.
fn wire_len(headers: &HeaderMap) -> usize {
    headers.iter().fold(12, |len, (name, values)| {
        len + values
            .iter()
            .map(|value| AsRef::<str>::as_ref(name).len() + value.as_str().len() + HEADER_LINE)
            .sum::<usize>()
    })
}

/// Header values are one line of visible ASCII; reasons and subjects from outside may not be.
fn header_safe(value: &str) -> String {
    value
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .take(512)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{
        CommandPartitions, CommandRoom, command_headers_len, header_safe, notification_of_msg_id,
        release_msg_id, status_event_id,
    };
    use crate::{SCHEMA_VERSION, StatusEvent};

    #[test]
    fn a_status_event_id_tells_transitions_apart_not_publications() {
        let at = chrono::DateTime::from_timestamp_micros(1_790_000_000_123_456).expect("instant");
        let dead = |at| StatusEvent {
            v: SCHEMA_VERSION,
            notification_id: uuid::Uuid::nil(),
            status: "dead".into(),
            channel: None,
            error: Some("timed out".into()),
            at,
        };
        assert_eq!(
            status_event_id(&dead(at)),
            "00000000-0000-0000-0000-000000000000:dead:1790000000123456"
        );
        assert_eq!(
            status_event_id(&dead(at)),
            status_event_id(&dead(at)),
            "one transition published twice"
        );
        assert_ne!(
            status_event_id(&dead(at)),
            status_event_id(&dead(at + chrono::Duration::seconds(30))),
            "dead again after a replay"
        );
    }

    #[test]
    fn a_command_fits_when_it_and_a_release_message_id_header_are_within_max_payload() {
        let wire = "NATS/1.0\r\nNats-Msg-Id: 00000000-0000-0000-0000-000000000000:claim:\
                    00000000-0000-0000-0000-000000000000\r\n\r\n";
        assert_eq!(
            command_headers_len(),
            wire.len(),
            "as the client counts them"
        );
        let room = CommandRoom {
            max_payload: 65_536,
            headers: command_headers_len(),
        };
        assert_eq!(room.max_command(), 65_536 - wire.len());
        assert_eq!(room.refusal(room.max_command()), None);
        let refusal = room.refusal(room.max_command() + 1).expect("one byte over");
        assert!(
            refusal.contains(&(room.max_command() + 1).to_string())
                && refusal.contains("65537")
                && refusal.contains("max_payload of 65536"),
            "{refusal}"
        );
    }

    #[test]
    fn a_release_has_an_id_of_its_own_the_same_for_one_claim() {
        let id = uuid::Uuid::now_v7();
        let (claim, next) = (
            uuid::Uuid::new_v4().to_string(),
            uuid::Uuid::new_v4().to_string(),
        );
        let release = release_msg_id(id, &claim);
        assert_eq!(release, format!("{id}:claim:{claim}"));
        assert_eq!(notification_of_msg_id(&release), Some(id));
        assert_eq!(notification_of_msg_id(&id.to_string()), Some(id));
        assert_eq!(
            notification_of_msg_id(&format!("{id}:replay:7:t")),
            Some(id)
        );
        assert_eq!(notification_of_msg_id("poison:12"), None);
        assert_ne!(release, id.to_string(), "not the first command's id");
        assert_eq!(
            release,
            release_msg_id(id, &claim),
            "one claim published again"
        );
        assert_ne!(
            release,
            release_msg_id(id, &next),
            "the next time it comes due"
        );
    }

    #[test]
    fn command_partitions_follow_a_valid_recorded_count_until_restored() {
        let partitions = CommandPartitions::new(16);
        let shared = partitions.clone();
        let key = (0..)
            .map(|n| format!("customer-{n}"))
            .find(|key| crate::subjects::partition_for(key, 16) >= 8)
            .expect("a key beyond 8 partitions");
        assert_eq!(
            partitions.command_subject(&key),
            crate::subjects::command_subject(crate::subjects::partition_for(&key, 16))
        );
        assert!(shared.follow(8), "followed by every clone");
        assert_eq!((partitions.current(), partitions.configured()), (8, 16));
        assert_eq!(
            partitions.command_subject(&key),
            crate::subjects::command_subject(crate::subjects::partition_for(&key, 8)),
            "the recorded count's partition for the key"
        );
        for invalid in [0, crate::subjects::MAX_PARTITIONS + 1] {
            assert!(!shared.follow(invalid), "{invalid} is no count to follow");
            assert_eq!(partitions.current(), 16);
        }
        shared.follow(8);
        shared.restore();
        assert_eq!(partitions.current(), 16);
        assert_eq!(CommandPartitions::new(0).current(), 1);
    }

    #[test]
    fn header_values_are_single_line_ascii() {
        assert_eq!(header_safe("bad\r\nInjected: x"), "bad??Injected: x");
        assert_eq!(header_safe("caf\u{e9}"), "caf?");
        assert_eq!(header_safe(&"x".repeat(600)).len(), 512);
    }
}
