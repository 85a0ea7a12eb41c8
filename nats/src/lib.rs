//! Herald's NATS layer.
//!
//! Everything that knows a subject name, a stream's shape or the bytes of a message lives here:
//! [`subjects`] names the subjects, [`streams`] provisions the JetStream streams and durable
//! consumers of the design idempotently, [`envelope`] defines the versioned wire messages, and
//! [`publish`] publishes them with `Nats-Msg-Id` so JetStream de-duplicates repeats.

pub mod batch;
pub mod connect;
pub mod dead_letters;
pub mod envelope;
pub mod error;
pub mod events;
pub mod ids;
pub mod json_strings;
pub mod leases;
pub mod net;
pub mod providers;
pub mod publish;
pub mod streams;
pub mod subjects;
mod versioned;
pub mod webhook_secret;

pub use connect::{Connection, NatsAuth, NatsTls, connect};
pub use dead_letters::{DeadLetter, DeadLetters};
pub use envelope::{
    Category, Channel, CommandDecodeError, Contacts, Content, MAX_COMMAND_BYTES, SCHEMA_VERSION,
    SendCommand, StatusEvent, TemplateRef, distinct_channels,
};
pub use error::NatsError;
pub use events::{DomainEvent, EventData, EventDecodeError};
pub use leases::{Heartbeat, Held, LeaseTable, LeaseView, ttl_step};
pub use publish::{
    CommandPartitions, CommandRoom, DeadLetterHeaders, Publisher, Stored, notification_of_msg_id,
    release_msg_id,
};
pub use streams::{
    PendingSlots, Provisioned, Retention, StreamSettings, check_command_partitions,
    dispatch_consumer, pending_slots, provision, router_consumer,
};
