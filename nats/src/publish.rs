//! Publishing with JetStream acknowledgement and `Nats-Msg-Id` de-duplication.

use async_nats::{HeaderMap, jetstream};
use bytes::Bytes;

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

/// Publishes Herald's messages on JetStream. Cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    js: jetstream::Context,
    partitions: u32,
}

impl Publisher {
    /// A publisher over `js` that spreads send commands over `partitions` subjects.
    pub fn new(js: jetstream::Context, partitions: u32) -> Self {
        Self {
            js,
            partitions: partitions.max(1),
        }
    }

    /// The JetStream context underneath.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// Number of command partitions.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// Publishes a send command on its recipient's partition, with the notification id as
    /// `Nats-Msg-Id`, and waits until JetStream has stored it.
    pub async fn publish_command(
        &self,
        recipient_key: &str,
        command: &SendCommand,
    ) -> Result<(), NatsError> {
        let subject =
            subjects::command_subject(subjects::partition_for(recipient_key, self.partitions));
        let id = command.notification_id.to_string();
        self.publish_with_id(subject, &id, HeaderMap::new(), command.encode()?)
            .await
    }

    /// What the server connected last takes of a send command as [`Publisher::publish_command`]
    /// publishes it: its `max_payload`, and the headers the command goes with.
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
        let subject =
            subjects::command_subject(subjects::partition_for(recipient_key, self.partitions));
        let mut headers = HeaderMap::new();
        headers.insert(subjects::HEADER_REPLAY_BASE, attempts_before.to_string());
        self.publish_with_id(subject, msg_id, headers, payload)
            .await
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
    }

    /// Whether the client is connected to a server right now.
    pub fn is_connected(&self) -> bool {
        self.js.client().connection_state() == async_nats::connection::State::Connected
    }

    async fn publish_with_id(
        &self,
        subject: String,
        msg_id: &str,
        mut headers: HeaderMap,
        payload: Bytes,
    ) -> Result<(), NatsError> {
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
            .map_err(|e| failed(e.to_string()))?;
        Ok(())
    }
}

/// How large a send command (or a domain event: its `Nats-Msg-Id` is a UUID too) the NATS server
/// takes: the client refuses a message whose payload and headers together exceed the server's
/// `max_payload` (`TooLarge`), however often it is tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandRoom {
    /// The server's `max_payload`, in bytes (from its `INFO`; a reconnect reads it anew).
    pub max_payload: usize,
    /// The bytes a command's headers take on the wire (its `Nats-Msg-Id`).
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

/// Bytes the headers of a send command take on the wire: its `Nats-Msg-Id`, the notification id.
fn command_headers_len() -> usize {
    let mut headers = HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        uuid::Uuid::nil().to_string().as_str(),
    );
    wire_len(&headers)
}

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
    use super::{CommandRoom, command_headers_len, header_safe, status_event_id};
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
    fn a_command_fits_when_it_and_its_message_id_header_are_within_max_payload() {
        let wire = "NATS/1.0\r\nNats-Msg-Id: 00000000-0000-0000-0000-000000000000\r\n\r\n";
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
    fn header_values_are_single_line_ascii() {
        assert_eq!(header_safe("bad\r\nInjected: x"), "bad??Injected: x");
        assert_eq!(header_safe("caf\u{e9}"), "caf?");
        assert_eq!(header_safe(&"x".repeat(600)).len(), 512);
    }
}
