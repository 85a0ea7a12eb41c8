//! Circuit announcements between instances.
//!
//! Circuit state stays per instance, but when a provider's circuit opens on one instance it says
//! so on `herald.circuit.<channel>` (core NATS: fire and forget, not persisted). The other
//! instances open their circuit for that provider at once instead of each paying its own
//! failure threshold against a provider that is down, and for as long as the announcing circuit
//! stays open (longer than the cool-down when the provider asked for a longer wait with its
//! Retry-After; within each instance's own cool-down and cap); each then probes on its own. A
//! circuit held open because the provider throttles the whole account (the instances share the
//! account) is announced alike, as held, on `herald.circuit.<channel>.held` (which older
//! instances do not listen to): the others hold theirs for the same wait, without counting it as
//! an opening, rather than each calling the provider until it is refused too. An
//! announcement is only a hint: a lost one costs a few failed (or throttled) sends, nothing else.

use std::time::Duration;

use async_nats::Client;
use futures::StreamExt;
use herald_nats::{Channel, subjects};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{ChannelDirectory, ChannelMsg};

/// The message on `herald.circuit.<channel>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CircuitOpened {
    /// The instance whose circuit opened.
    pub instance: String,
    /// The provider.
    pub provider: String,
    /// How long the announcing instance's circuit stays open, in milliseconds. Absent from the
    /// announcements of instances older than this field: the receiver then uses its cool-down.
    #[serde(default)]
    pub open_for_ms: Option<u64>,
    /// Whether it is held open because the provider throttles the whole account, rather than
    /// opened by failures (announced on the `.held` subject). Absent (false) from the
    /// announcements of openings.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub throttled: bool,
}

/// Publishes this instance's circuit openings.
#[derive(Clone)]
pub struct CircuitAnnouncer {
    client: Client,
    instance: String,
}

impl CircuitAnnouncer {
    /// An announcer for `instance` over `client`.
    pub fn new(client: Client, instance: String) -> Self {
        Self { client, instance }
    }

    /// Says that `provider`'s circuit (on `channel`) just opened here, for `open_for`.
    pub fn opened(&self, channel: Channel, provider: &str, open_for: Duration) {
        self.announce(channel, provider, open_for, false);
    }

    /// Says that `provider`'s circuit (on `channel`) is held open here for `held_for` because
    /// the provider throttles the whole account.
    pub fn held(&self, channel: Channel, provider: &str, held_for: Duration) {
        self.announce(channel, provider, held_for, true);
    }

    fn announce(&self, channel: Channel, provider: &str, open_for: Duration, throttled: bool) {
        let message = CircuitOpened {
            instance: self.instance.clone(),
            provider: provider.to_string(),
            open_for_ms: Some(u64::try_from(open_for.as_millis()).unwrap_or(u64::MAX)),
            throttled,
        };
        let Ok(payload) = serde_json::to_vec(&message) else {
            return;
        };
        let client = self.client.clone();
        let subject = if throttled {
            subjects::circuit_held_subject(channel.as_str())
        } else {
            subjects::circuit_subject(channel.as_str())
        };
        tokio::spawn(async move {
            if let Err(err) = client.publish(subject, payload.into()).await {
                tracing::debug!(error = %err, "cannot announce an open circuit");
            }
        });
    }
}

/// Listens for other instances' announcements and opens the matching local circuits, until `stop`.
pub async fn listen(
    client: Client,
    instance: String,
    directory: ChannelDirectory,
    stop: CancellationToken,
) {
    let mut announcements = match client.subscribe(subjects::CIRCUIT_ALL).await {
        Ok(subscription) => subscription,
        Err(err) => {
            tracing::warn!(error = %err, "cannot listen for circuit announcements");
            return;
        }
    };
    loop {
        let message = tokio::select! {
            _ = stop.cancelled() => return,
            next = announcements.next() => match next {
                Some(message) => message,
                None => return,
            },
        };
        // `herald.circuit.<channel>`, or `herald.circuit.<channel>.held`.
        let Some(channel) = message
            .subject
            .as_str()
            .split('.')
            .nth(2)
            .and_then(Channel::parse)
        else {
            continue;
        };
        let Ok(opened) = serde_json::from_slice::<CircuitOpened>(&message.payload) else {
            tracing::debug!(subject = %message.subject, "ignoring a malformed circuit announcement");
            continue;
        };
        if opened.instance == instance {
            continue;
        }
        if let Some(actor) = directory.get(channel) {
            let _ = actor.cast(ChannelMsg::PeerOpened {
                provider: opened.provider,
                open_for: opened.open_for_ms.map(Duration::from_millis),
                throttled: opened.throttled,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_are_small_json() {
        let message = CircuitOpened {
            instance: "a-1".into(),
            provider: "telegram".into(),
            open_for_ms: Some(120_000),
            throttled: false,
        };
        let json = serde_json::to_string(&message).expect("encodes");
        assert_eq!(
            json,
            r#"{"instance":"a-1","provider":"telegram","open_for_ms":120000}"#
        );
        assert_eq!(
            serde_json::from_str::<CircuitOpened>(&json).expect("decodes"),
            message
        );
        let held = CircuitOpened {
            throttled: true,
            ..message
        };
        let json = serde_json::to_string(&held).expect("encodes");
        assert_eq!(
            json,
            r#"{"instance":"a-1","provider":"telegram","open_for_ms":120000,"throttled":true}"#
        );
        assert_eq!(
            serde_json::from_str::<CircuitOpened>(&json).expect("decodes"),
            held
        );
    }

    #[test]
    fn announcements_of_older_instances_still_decode() {
        let old = r#"{"instance":"a-1","provider":"telegram"}"#;
        let decoded = serde_json::from_str::<CircuitOpened>(old).expect("decodes");
        assert_eq!(decoded.open_for_ms, None);
        assert!(!decoded.throttled);
        assert_eq!(decoded.provider, "telegram");
    }
}
