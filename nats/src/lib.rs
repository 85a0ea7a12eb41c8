//! Herald's NATS layer.
//!
//! Everything that knows a subject name, a stream's shape or the bytes of a message lives here:
//! [`subjects`] names the subjects, [`streams`] provisions the JetStream streams and durable
//! consumers of the design idempotently, [`envelope`] defines the versioned wire messages, and
//! [`publish`] publishes them with `Nats-Msg-Id` so JetStream de-duplicates repeats.

pub mod batch;
pub mod dead_letters;
pub mod envelope;
pub mod error;
pub mod events;
pub mod leases;
pub mod publish;
pub mod streams;
pub mod subjects;

pub use dead_letters::{DeadLetter, DeadLetters};
pub use envelope::{
    Category, Channel, CommandDecodeError, Contacts, Content, SCHEMA_VERSION, SendCommand,
    StatusEvent, TemplateRef,
};
pub use error::NatsError;
pub use events::{DomainEvent, EventData, EventDecodeError};
pub use leases::{Held, LeaseTable, LeaseView};
pub use publish::{DeadLetterHeaders, Publisher};
pub use streams::{
    Provisioned, Retention, StreamSettings, check_command_partitions, dispatch_consumer, provision,
};

/// Connects to NATS with a client name and unlimited reconnects, so the engine rides out a
/// restart of the server instead of failing. `urls` may list several servers of a cluster,
/// separated by commas.
pub async fn connect(urls: &str, client_name: &str) -> Result<async_nats::Client, NatsError> {
    async_nats::ConnectOptions::new()
        .name(client_name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connect(server_list(urls))
        .await
        .map_err(|e| NatsError::Connect(e.to_string()))
}

/// `"nats://a:4222, nats://b:4222"` → `["nats://a:4222", "nats://b:4222"]`.
fn server_list(urls: &str) -> Vec<&str> {
    urls.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use async_nats::ToServerAddrs;

    #[test]
    fn a_comma_separated_list_names_every_server() {
        let list = super::server_list("nats://n1:4222, nats://n2:4222,,nats://n3:4222");
        assert_eq!(list, ["nats://n1:4222", "nats://n2:4222", "nats://n3:4222"]);
        assert_eq!(list.to_server_addrs().map(|a| a.count()).unwrap_or(0), 3);
    }
}
