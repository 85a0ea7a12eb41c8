//! Idempotent provisioning of the streams and durable consumers of the design.
//!
//! Provisioning runs at every start-up of every instance: streams are created or updated to the
//! configured shape, consumers are created if absent and bound otherwise, so instances that start
//! together converge on the same objects.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::{self, AckPolicy, PullConsumer},
    stream::{self, RetentionPolicy, StorageType},
};

use futures::TryStreamExt;

use crate::{NatsError, subjects};

/// Shape of the streams and consumers, from configuration.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    /// Replicas per stream (1 on a single server, 3 on a cluster).
    pub replicas: usize,
    /// How long JetStream remembers a `Nats-Msg-Id` on `NOTIFY` (design: at least two minutes).
    pub dedup_window: Duration,
    /// How much of the domain events `EVENTS` keeps.
    pub events: Retention,
    /// How much of the dead letters `NOTIFY_DLQ` keeps.
    pub dead_letters: Retention,
    /// How much of the status transitions `NOTIFY_STATUS` keeps.
    pub status: Retention,
    /// How long a delivered command may stay unacknowledged before JetStream redelivers it.
    pub ack_wait: Duration,
    /// Most unacknowledged commands the dispatch consumer allows at once (across instances).
    pub max_ack_pending: i64,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            replicas: 1,
            dedup_window: Duration::from_secs(120),
            events: Retention::for_days(7),
            dead_letters: Retention::for_days(30),
            status: Retention::for_days(1),
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 20_000,
        }
    }
}

/// How much a stream keeps: messages older than `max_age` go, and the oldest go when it holds
/// more than `max_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Age limit; zero keeps messages whatever their age.
    pub max_age: Duration,
    /// Size limit; `None` keeps messages whatever their size.
    pub max_bytes: Option<u64>,
}

impl Retention {
    /// Messages kept whatever their age and size.
    pub const UNLIMITED: Retention = Retention {
        max_age: Duration::ZERO,
        max_bytes: None,
    };

    /// Messages kept for `days`, with no size limit.
    pub fn for_days(days: u64) -> Self {
        Self {
            max_age: Duration::from_secs(days * 24 * 3600),
            max_bytes: None,
        }
    }
}

/// The consumers Herald pulls from once provisioning is done. The dispatch consumers, one per
/// command partition, are bound by whichever instance holds the partition's lease
/// ([`dispatch_consumer`]).
pub struct Provisioned {
    /// `herald-router` on `EVENTS`.
    pub router: PullConsumer,
}

/// The four stream configurations of the design.
pub fn stream_configs(settings: &StreamSettings) -> [stream::Config; 4] {
    let base = |name: &str, subject: &str, retention: Retention| stream::Config {
        name: name.to_string(),
        subjects: vec![subject.to_string()],
        storage: StorageType::File,
        num_replicas: settings.replicas,
        max_age: retention.max_age,
        max_bytes: retention
            .max_bytes
            .map_or(-1, |bytes| i64::try_from(bytes).unwrap_or(i64::MAX)),
        duplicate_window: settings.dedup_window,
        ..Default::default()
    };
    [
        base(
            subjects::EVENTS_STREAM,
            subjects::EVENTS_ALL,
            settings.events,
        ),
        stream::Config {
            retention: RetentionPolicy::WorkQueue,
            // Commands are never dropped for age or size: a full server refuses new ones.
            ..base(
                subjects::NOTIFY_STREAM,
                subjects::COMMANDS_ALL,
                Retention::UNLIMITED,
            )
        },
        base(
            subjects::DLQ_STREAM,
            subjects::DLQ_ALL,
            settings.dead_letters,
        ),
        base(
            subjects::STATUS_STREAM,
            subjects::STATUS_ALL,
            settings.status,
        ),
    ]
}

/// Creates or updates the streams and creates or binds the durable consumers.
pub async fn provision(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<Provisioned, NatsError> {
    create_streams(js, settings).await?;
    remove_legacy_dispatch_consumer(js).await?;
    let router = router_consumer(js, settings).await?;
    Ok(Provisioned { router })
}

/// Creates Herald's streams, or updates them to `settings`.
async fn create_streams(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<(), NatsError> {
    for config in stream_configs(settings) {
        let name = config.name.clone();
        js.create_or_update_stream(config)
            .await
            .map_err(|e| NatsError::Provision {
                what: format!("stream {name}"),
                reason: e.to_string(),
            })?;
    }
    Ok(())
}

/// Refuses `partitions` when commands wait on partitions at or beyond it (`notify.cmd.<n>`,
/// `n >= partitions`): the count was lowered while they waited, and no instance using it would
/// ever deliver them. Messages on subjects no deployment's partitions use (`notify.cmd.007`,
/// `notify.cmd.99999`: published by hand or by another program, not by Herald) refuse nothing;
/// they are logged as a warning, with how to remove them.
pub async fn check_command_partitions(
    js: &jetstream::Context,
    partitions: u32,
) -> Result<(), NatsError> {
    let read_error = |e: &dyn std::fmt::Display| NatsError::Read {
        what: format!("stream {}", subjects::NOTIFY_STREAM),
        reason: e.to_string(),
    };
    // The subject listing is a stream info request of its own: no need for `get_stream`'s.
    let stream = js
        .get_stream_no_info(subjects::NOTIFY_STREAM)
        .await
        .map_err(|e| read_error(&e))?;
    let (commands, strays): (Vec<_>, Vec<_>) = stream
        .info_with_subjects(subjects::COMMANDS_ALL)
        .await
        .map_err(|e| read_error(&e))?
        .try_collect::<Vec<(String, usize)>>()
        .await
        .map_err(|e| read_error(&e))?
        .into_iter()
        .filter(|(_, count)| *count > 0)
        .partition(|(subject, _)| subjects::command_partition(subject).is_some());
    for (subject, count) in strays {
        tracing::warn!(
            subject,
            count,
            "messages wait on a subject no Herald partition uses; nothing will deliver them \
             (remove them with `nats stream purge {} --subject {subject}`)",
            subjects::NOTIFY_STREAM
        );
    }
    let waiting: BTreeMap<u32, usize> = commands
        .into_iter()
        .filter_map(|(subject, count)| Some((subjects::command_partition(&subject)?, count)))
        .filter(|&(partition, _)| partition >= partitions)
        .collect();
    let (Some((&first, _)), Some((&last, _))) =
        (waiting.first_key_value(), waiting.last_key_value())
    else {
        return Ok(());
    };
    let commands: usize = waiting.values().sum();
    Err(NatsError::Partitions {
        configured: partitions,
        reason: format!(
            "{commands} commands wait on partitions {first} to {last}, which no instance using \
             it would deliver; keep nats.partitions = {} until they are delivered",
            last + 1
        ),
    })
}

/// Creates or binds the router's durable consumer (`herald-router` on `events.>`).
pub async fn router_consumer(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<PullConsumer, NatsError> {
    durable(
        js,
        subjects::EVENTS_STREAM,
        subjects::ROUTER_CONSUMER,
        subjects::EVENTS_ALL,
        settings,
    )
    .await
}

/// The pending slots of a durable consumer at one reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingSlots {
    /// Messages delivered and not acknowledged yet (`num_ack_pending`): being worked on, or handed
    /// back to wait for a later delivery.
    pub taken: u64,
    /// The consumer's `max_ack_pending`; `None` when it has no limit.
    pub limit: Option<u64>,
}

/// Reads how many of the pending slots of the durable consumer `consumer` of `stream` are taken
/// (one consumer info request; the consumer's own figures, across every instance that pulls from
/// it).
pub async fn pending_slots(
    js: &jetstream::Context,
    stream: &str,
    consumer: &str,
) -> Result<PendingSlots, NatsError> {
    let read_error = |e: &dyn std::fmt::Display| NatsError::Read {
        what: format!("consumer {consumer}"),
        reason: e.to_string(),
    };
    let info = js
        .get_stream_no_info(stream)
        .await
        .map_err(|e| read_error(&e))?
        .consumer_info(consumer)
        .await
        .map_err(|e| read_error(&e))?;
    Ok(PendingSlots {
        taken: info.num_ack_pending as u64,
        limit: u64::try_from(info.config.max_ack_pending)
            .ok()
            .filter(|&limit| limit > 0),
    })
}

/// Creates or binds the durable consumer of one command partition (`herald-dispatch-<n>` on
/// `notify.cmd.<n>`). Partition filters do not overlap, as a work-queue stream requires.
pub async fn dispatch_consumer(
    js: &jetstream::Context,
    partition: u32,
    settings: &StreamSettings,
) -> Result<PullConsumer, NatsError> {
    durable(
        js,
        subjects::NOTIFY_STREAM,
        &subjects::dispatch_consumer(partition),
        &subjects::command_subject(partition),
        settings,
    )
    .await
}

/// Deletes the single `herald-dispatch` consumer of releases before partition leases: its filter
/// (`notify.cmd.>`) overlaps the per-partition consumers, which a work-queue stream refuses.
async fn remove_legacy_dispatch_consumer(js: &jetstream::Context) -> Result<(), NatsError> {
    let stream =
        js.get_stream(subjects::NOTIFY_STREAM)
            .await
            .map_err(|e| NatsError::Provision {
                what: format!("stream {}", subjects::NOTIFY_STREAM),
                reason: e.to_string(),
            })?;
    if stream
        .consumer_info(subjects::LEGACY_DISPATCH_CONSUMER)
        .await
        .is_ok()
    {
        tracing::info!("removing the legacy herald-dispatch consumer (now one per partition)");
        stream
            .delete_consumer(subjects::LEGACY_DISPATCH_CONSUMER)
            .await
            .map_err(|e| NatsError::Provision {
                what: format!("consumer {}", subjects::LEGACY_DISPATCH_CONSUMER),
                reason: e.to_string(),
            })?;
    }
    Ok(())
}

async fn durable(
    js: &jetstream::Context,
    stream_name: &str,
    durable_name: &str,
    filter: &str,
    settings: &StreamSettings,
) -> Result<PullConsumer, NatsError> {
    let failed = |e: &dyn std::fmt::Display| NatsError::Provision {
        what: format!("consumer {durable_name} on {stream_name}"),
        reason: e.to_string(),
    };
    let stream = match js.get_stream(stream_name).await {
        Err(err) if is_stream_not_found(&err) => {
            // Lost with the server's store (a NATS without a persistent volume restarted, an R1
            // stream's node is gone): every instance would wait for it for ever, and sends would
            // fail, until one restarted. What the stream held is lost; say so loudly.
            tracing::error!(
                stream = stream_name,
                "stream missing: creating Herald's streams again (messages it held are lost)"
            );
            create_streams(js, settings).await?;
            js.get_stream(stream_name).await.map_err(|e| failed(&e))?
        }
        got => got.map_err(|e| failed(&e))?,
    };
    // Read first only to tell what changes: the create below also updates.
    let before = stream
        .consumer_info(durable_name)
        .await
        .ok()
        .map(|info| (info.config.ack_wait, info.config.max_ack_pending));
    let wanted = (settings.ack_wait, settings.max_ack_pending);
    // Create or update: an existing consumer takes the configured `ack_wait` and
    // `max_ack_pending` (both editable), rather than keeping those it was created with.
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(durable_name.to_string()),
            filter_subject: filter.to_string(),
            ack_policy: AckPolicy::Explicit,
            ack_wait: settings.ack_wait,
            // Herald counts attempts itself (delivery count) and dead-letters after its own
            // maximum, so JetStream never silently drops a message.
            max_deliver: -1,
            max_ack_pending: settings.max_ack_pending,
            ..Default::default()
        })
        .await
        .map_err(|e| failed(&e))?;
    if let Some((ack_wait, max_ack_pending)) = before
        && (ack_wait, max_ack_pending) != wanted
    {
        tracing::info!(
            consumer = durable_name,
            stream = stream_name,
            ack_wait_secs_was = ack_wait.as_secs(),
            ack_wait_secs = settings.ack_wait.as_secs(),
            max_ack_pending_was = max_ack_pending,
            max_ack_pending = settings.max_ack_pending,
            "consumer settings changed"
        );
    }
    Ok(consumer)
}

/// Whether `err` says the stream does not exist.
fn is_stream_not_found(err: &jetstream::context::GetStreamError) -> bool {
    matches!(
        err.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(js_err)
            if js_err.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_limits_stream_keeps_what_its_retention_says_and_commands_are_never_dropped() {
        let settings = StreamSettings {
            dead_letters: Retention {
                max_age: Duration::ZERO,
                max_bytes: Some(1 << 30),
            },
            ..StreamSettings::default()
        };
        let [events, commands, dead_letters, status] = stream_configs(&settings);
        assert_eq!(events.max_age, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(events.max_bytes, -1, "no size limit");
        assert_eq!(
            dead_letters.max_age,
            Duration::ZERO,
            "kept whatever their age"
        );
        assert_eq!(dead_letters.max_bytes, 1 << 30);
        assert_eq!(status.max_age, Duration::from_secs(24 * 3600));
        assert_eq!(commands.retention, RetentionPolicy::WorkQueue);
        assert_eq!((commands.max_age, commands.max_bytes), (Duration::ZERO, -1));
    }
}
