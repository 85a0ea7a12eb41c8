//! The one trait every provider implements, and what a send returns.
//!
//! A provider is a configured way to deliver on one channel (an SMTP relay, a Telegram bot, a
//! Twilio account, ...). It does the network I/O of one send and classifies the outcome; the
//! [`ChannelActor`](super::ChannelActor) around it owns timeouts, concurrency and the circuit
//! breaker. Adding a provider is one file implementing [`Provider`] plus its configuration.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use herald_nats::{Channel, Contacts, Content};
use tokio::time::Instant;
use uuid::Uuid;

/// One event of a connection that failed every send it carried at once (an SMTP connection that
/// hung or was reset under a group of messages): the failures it caused share it, so that the
/// circuit counts the event once, however many sends it failed. Unique within the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Incident(u64);

impl Incident {
    /// A new incident, unlike any other.
    pub fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        Self(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

impl Default for Incident {
    fn default() -> Self {
        Self::new()
    }
}

/// What a provider is asked to deliver.
#[derive(Debug, Clone)]
pub struct OutboundMessage {
    /// The notification's id; providers pass it as their idempotency key where they have one
    /// (SMTP Message-ID, webhook-id).
    pub notification_id: Uuid,
    /// How to reach the recipient (already merged: request contacts over stored ones).
    pub contacts: Contacts,
    /// The rendered message.
    pub content: Content,
    /// Category name, for providers that label messages.
    pub category: &'static str,
    /// The stored customer's own webhook signing secret, when it has one and the send goes to
    /// its stored webhook URL; the webhook provider signs with it instead of its own.
    pub webhook_secret: Option<WebhookSecret>,
}

/// A customer's own `whsec_…` webhook signing secret, with the one it replaced while that may
/// still sign; its `Debug` never shows either.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecret {
    current: String,
    previous: Option<(String, DateTime<Utc>)>,
}

impl WebhookSecret {
    /// Wraps a stored secret.
    pub fn new(secret: String) -> Self {
        Self {
            current: secret,
            previous: None,
        }
    }

    /// Adds the secret this one replaced at `replaced_at`, which signs alongside it during the
    /// webhook provider's rotation grace.
    pub fn replacing(mut self, previous: String, replaced_at: DateTime<Utc>) -> Self {
        self.previous = Some((previous, replaced_at));
        self
    }

    /// `customer`'s own secret, with the one it replaced and when, if it has one.
    pub fn of_customer(customer: &herald_entities::customer::Model) -> Option<Self> {
        let secret = Self::new(customer.webhook_secret.clone()?);
        Some(
            match (
                &customer.previous_webhook_secret,
                customer.webhook_secret_replaced_at,
            ) {
                (Some(previous), Some(replaced_at)) => {
                    secret.replacing(previous.clone(), replaced_at)
                }
                _ => secret,
            },
        )
    }

    /// The secret itself, to derive the signing key from.
    pub fn expose(&self) -> &str {
        &self.current
    }

    /// The secret this one replaced, and when.
    pub fn expose_previous(&self) -> Option<(&str, DateTime<Utc>)> {
        self.previous
            .as_ref()
            .map(|(secret, replaced_at)| (secret.as_str(), *replaced_at))
    }
}

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSecret")
            .field("secret", &"<redacted>")
            .field(
                "replaced_at",
                &self.previous.as_ref().map(|(_, replaced_at)| replaced_at),
            )
            .finish()
    }
}

/// A provider accepted the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The provider's id for the message, when it returns one.
    pub provider_message_id: Option<String>,
    /// Contacts the provider declared dead although the message went out (a recipient's other
    /// push tokens), to be removed from the customer.
    pub dead_contacts: Vec<String>,
    /// Contacts the provider said live on under another address, which the message went to
    /// (a Telegram group upgraded to a supergroup), to be changed on the customer.
    pub moved_contacts: Vec<ContactMove>,
}

impl Receipt {
    /// A message that went out as `provider_message_id`, with no contact found dead or moved.
    pub fn new(provider_message_id: Option<String>) -> Self {
        Self {
            provider_message_id,
            dead_contacts: Vec::new(),
            moved_contacts: Vec::new(),
        }
    }
}

/// A contact that lives on under another address: the provider said so when sent to `from`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContactMove {
    /// The address the message was sent to, which no longer works.
    pub from: String,
    /// The address the provider gave instead, which took the message.
    pub to: String,
}

/// Why a provider did not accept the message. The class decides what the dispatcher does next.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// The recipient has no contact for this channel: next channel at once; not a provider fault
    /// (does not count against the circuit).
    #[error("recipient has no {0} contact")]
    MissingContact(Channel),
    /// Worth retrying later: timeouts, connection errors, 5xx, a 429 of no known scope.
    #[error("transient: {reason}")]
    Transient {
        /// What happened.
        reason: String,
        /// How long the provider asked us to wait (Retry-After, `retry_after`).
        retry_after: Option<Duration>,
        /// Contacts the provider declared dead on the way (a recipient's other push tokens), to
        /// be removed from the customer whatever becomes of the message.
        dead_contacts: Vec<String>,
        /// The one event of a connection this failure shares with the other sends it carried (an
        /// SMTP connection that hung or reset under a group of messages), if it was one: the
        /// circuit counts such an event once, not once per message.
        incident: Option<Incident>,
    },
    /// The provider limits the sends to this recipient (Telegram's flood control of a chat):
    /// worth retrying later, after `retry_after`, like a transient error, but it says nothing of
    /// the provider, so it does not count against its circuit (one busy chat must not stop the
    /// sends to everyone).
    #[error("throttled: {reason}")]
    Throttled {
        /// What happened.
        reason: String,
        /// How long the provider asked us to wait.
        retry_after: Option<Duration>,
        /// Contacts the provider declared dead on the way, as for
        /// [`Transient`](Self::Transient).
        dead_contacts: Vec<String>,
    },
    /// The provider limits the sends of the whole account (a bot's global message rate, a
    /// project's sender quota, an account's API concurrency): worth retrying later like a
    /// throttle of one recipient, but every other send would be refused alike until `retry_after`
    /// passes, so the channel holds all its sends until then (refused at once, as while its
    /// circuit is open, without calling the provider). Not a sign the provider is down: it does
    /// not count toward the circuit's failure threshold.
    #[error("account throttled: {reason}")]
    AccountThrottled {
        /// What happened.
        reason: String,
        /// How long the provider asked us to wait.
        retry_after: Option<Duration>,
        /// Contacts the provider declared dead on the way, as for
        /// [`Transient`](Self::Transient).
        dead_contacts: Vec<String>,
    },
    /// Not sent: a connection to the provider (the SMTP pool's) came free for the send only when
    /// too little of its timeout was left, so nothing reached the provider. Worth retrying later,
    /// but it says nothing of the provider, whose connections were busy with other sends (which
    /// answer for it, failures included): it neither counts against the circuit nor, as a
    /// half-open probe's result, closes it. The channel actor answers it as
    /// [`SendOutcome::NotStarted`](super::SendOutcome::NotStarted).
    #[error("{reason}")]
    NoConnection {
        /// What happened.
        reason: String,
    },
    /// Will not succeed on retry: bad address, rejected content, other 4xx.
    #[error("permanent: {reason}")]
    Permanent {
        /// What happened.
        reason: String,
        /// Push tokens, chat ids or addresses the provider declared dead, to be removed from the
        /// customer.
        dead_contacts: Vec<String>,
    },
    /// Will not succeed on retry, found before anything reached the provider: an address that
    /// does not parse, a request that cannot be built. Handled like [`Permanent`](Self::Permanent)
    /// (and worded alike), but it says nothing of the provider either way: it neither counts
    /// against its circuit nor, as a half-open probe's result, closes it.
    #[error("permanent: {reason}")]
    Unsendable {
        /// What is wrong with the message.
        reason: String,
    },
}

impl ProviderError {
    /// A transient error without a provider-given delay.
    pub fn transient(reason: impl Into<String>) -> Self {
        Self::transient_after(reason, None)
    }

    /// A transient error, with the wait the provider asked for if it did, and no dead contact.
    pub fn transient_after(reason: impl Into<String>, retry_after: Option<Duration>) -> Self {
        Self::Transient {
            reason: reason.into(),
            retry_after,
            dead_contacts: Vec::new(),
            incident: None,
        }
    }

    /// The same error as part of `incident`, if it is transient (the only kind counted against a
    /// circuit): one event of a connection that failed every send it carried.
    pub fn in_incident(mut self, incident: Incident) -> Self {
        if let Self::Transient {
            incident: shared, ..
        } = &mut self
        {
            *shared = Some(incident);
        }
        self
    }

    /// The connection event this failure is part of, if it is one (see
    /// [`in_incident`](Self::in_incident)).
    pub fn incident(&self) -> Option<Incident> {
        match self {
            Self::Transient { incident, .. } => *incident,
            _ => None,
        }
    }

    /// A throttle of this recipient, with the wait the provider asked for if it did, and no dead
    /// contact.
    pub fn throttled(reason: impl Into<String>, retry_after: Option<Duration>) -> Self {
        Self::Throttled {
            reason: reason.into(),
            retry_after,
            dead_contacts: Vec::new(),
        }
    }

    /// A throttle of the whole account, with the wait the provider asked for if it did, and no
    /// dead contact.
    pub fn account_throttled(reason: impl Into<String>, retry_after: Option<Duration>) -> Self {
        Self::AccountThrottled {
            reason: reason.into(),
            retry_after,
            dead_contacts: Vec::new(),
        }
    }

    /// A permanent error without a dead contact.
    pub fn permanent(reason: impl Into<String>) -> Self {
        Self::Permanent {
            reason: reason.into(),
            dead_contacts: Vec::new(),
        }
    }

    /// A message that cannot be sent as it is, found before anything reached the provider.
    pub fn unsendable(reason: impl Into<String>) -> Self {
        Self::Unsendable {
            reason: reason.into(),
        }
    }

    /// The same error with its reason passed through `change` (a recipient without a contact has
    /// no reason and stays as it is).
    pub fn map_reason(mut self, change: impl FnOnce(String) -> String) -> Self {
        match &mut self {
            Self::Transient { reason, .. }
            | Self::Throttled { reason, .. }
            | Self::AccountThrottled { reason, .. }
            | Self::Permanent { reason, .. }
            | Self::NoConnection { reason }
            | Self::Unsendable { reason } => *reason = change(std::mem::take(reason)),
            Self::MissingContact(_) => {}
        }
        self
    }

    /// Whether this outcome is the provider's fault and counts as a failure for its circuit.
    pub fn counts_against_circuit(&self) -> bool {
        matches!(self, Self::Transient { .. })
    }

    /// Whether the provider refused this send because the whole account is over its rate limit,
    /// so that every send of the channel waits (see [`AccountThrottled`](Self::AccountThrottled)).
    pub fn throttles_account(&self) -> bool {
        matches!(self, Self::AccountThrottled { .. })
    }

    /// Whether the send got as far as the provider (which answered, or failed to), so that its
    /// outcome says something of the provider: not when the recipient had no contact for the
    /// channel, no connection to the provider was free in time, or the message could not be sent
    /// as it is.
    pub fn reached_provider(&self) -> bool {
        !matches!(
            self,
            Self::MissingContact(_) | Self::NoConnection { .. } | Self::Unsendable { .. }
        )
    }

    /// The wait the provider asked for, if it did (Retry-After, `retry_after`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Transient { retry_after, .. }
            | Self::Throttled { retry_after, .. }
            | Self::AccountThrottled { retry_after, .. } => *retry_after,
            Self::MissingContact(_)
            | Self::Permanent { .. }
            | Self::NoConnection { .. }
            | Self::Unsendable { .. } => None,
        }
    }

    /// Contacts the provider declared dead, to be removed from the customer: a failure may name
    /// some whether or not it is retried (the dead push tokens of a recipient whose other device
    /// failed for now).
    pub fn dead_contacts(&self) -> &[String] {
        match self {
            Self::Transient { dead_contacts, .. }
            | Self::Throttled { dead_contacts, .. }
            | Self::AccountThrottled { dead_contacts, .. }
            | Self::Permanent { dead_contacts, .. } => dead_contacts,
            Self::MissingContact(_) | Self::NoConnection { .. } | Self::Unsendable { .. } => &[],
        }
    }
}

/// A configured way to deliver on one channel.
pub trait Provider: Send + Sync + 'static {
    /// The channel this provider delivers on.
    fn channel(&self) -> Channel;

    /// The provider's configured name (e.g. `smtp`, `telegram`), recorded on every attempt.
    fn name(&self) -> &str;

    /// Sends one message, answering by `deadline` (the send's start plus
    /// `channels.limits.timeout_ms`, after which the [`ChannelActor`](super::ChannelActor) drops
    /// the future and reports a timeout). A send of more than one step (a token fetched first, a
    /// name resolved first, a second request) spends only what is left of the time to `deadline`
    /// on each, and fails with a reason naming the step that ran it out. Implementations do not
    /// retry; they classify the outcome.
    fn send<'a>(
        &'a self,
        message: &'a OutboundMessage,
        deadline: Instant,
    ) -> BoxFuture<'a, Result<Receipt, ProviderError>>;

    /// Whether a failed send says something about the provider as a whole, and so counts
    /// against its circuit (announced to every instance). A provider whose every recipient names
    /// an endpoint of their own (webhooks) answers `false`: one customer's broken receiver must
    /// not stop the sends to everyone else's.
    fn one_endpoint(&self) -> bool {
        true
    }
}

/// The time left until `deadline`; zero once it has passed.
pub(crate) fn time_left(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// [`Provider::send`] with time to spare: the deadline of provider tests that do not test it.
    pub(crate) trait SendNow {
        /// Sends `message` with a deadline a minute away.
        fn send_now<'a>(
            &'a self,
            message: &'a OutboundMessage,
        ) -> BoxFuture<'a, Result<Receipt, ProviderError>>;
    }

    impl<P: Provider> SendNow for P {
        fn send_now<'a>(
            &'a self,
            message: &'a OutboundMessage,
        ) -> BoxFuture<'a, Result<Receipt, ProviderError>> {
            self.send(message, Instant::now() + Duration::from_secs(60))
        }
    }

    /// A message with every contact set, for provider tests.
    pub(crate) fn outbound() -> OutboundMessage {
        OutboundMessage {
            notification_id: Uuid::now_v7(),
            contacts: Contacts {
                email: Some("ada@example.com".into()),
                phone: Some("+4915112345678".into()),
                telegram_chat_id: Some("4242".into()),
                push_tokens: vec!["device-token-1".into()],
                webhook_url: None,
            },
            content: Content {
                subject: Some("Order shipped".into()),
                text: "Your order #1001 is on its way.".into(),
                html: None,
                short: Some("Order #1001 shipped".into()),
                template: None,
            },
            category: "transactional",
            webhook_secret: None,
        }
    }
}
