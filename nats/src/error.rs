//! Errors of the NATS layer.

/// What can go wrong talking to NATS.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// The connection settings cannot work (refused before trying).
    #[error("invalid NATS settings: {0}")]
    Config(String),
    /// The client could not connect to the server.
    #[error("cannot connect to NATS: {0}")]
    Connect(String),
    /// A stream or consumer could not be created or read.
    #[error("cannot provision JetStream {what}: {reason}")]
    Provision {
        /// The stream or consumer concerned.
        what: String,
        /// The server's or client's reason.
        reason: String,
    },
    /// A message larger, with its headers, than the server's `max_payload`: refused by the client
    /// before it was sent, however often it is tried.
    #[error("the message on {subject} exceeds the server's max_payload: {reason}")]
    TooLarge {
        /// The subject published to.
        subject: String,
        /// The client's reason, with the sizes.
        reason: String,
    },
    /// A publish was not acknowledged by JetStream.
    #[error("JetStream did not accept the message on {subject}: {reason}")]
    Publish {
        /// The subject published to.
        subject: String,
        /// The server's or client's reason.
        reason: String,
    },
    /// JetStream acknowledged a message as a duplicate of one stored under the same
    /// `Nats-Msg-Id` within the stream's de-duplication window, and dropped it; answered only where
    /// the id was meant to be new, so that the drop would lose the message.
    #[error(
        "JetStream dropped the message as a duplicate: Nats-Msg-Id {msg_id} was stored before \
         within the stream's de-duplication window"
    )]
    Duplicate {
        /// The message id JetStream had seen.
        msg_id: String,
    },
    /// A stream or message could not be read or removed.
    #[error("cannot read JetStream {what}: {reason}")]
    Read {
        /// The stream or message concerned.
        what: String,
        /// The server's or client's reason.
        reason: String,
    },
    /// The configured number of command partitions cannot be used with this NATS: running
    /// instances use another, or commands wait on partitions it would never consume.
    #[error("nats.partitions = {configured} cannot be used here: {reason}")]
    Partitions {
        /// The configured count.
        configured: u32,
        /// What stands against it, and what to do.
        reason: String,
    },
    /// A message could not be encoded.
    #[error("cannot encode message: {0}")]
    Encode(#[from] serde_json::Error),
}
