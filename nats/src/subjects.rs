//! Subject and stream names, and the partitioning of send commands by recipient.

/// Stream of domain events from producers (`events.>`).
pub const EVENTS_STREAM: &str = "EVENTS";
/// Work-queue stream of send commands (`notify.cmd.>`).
pub const NOTIFY_STREAM: &str = "NOTIFY";
/// Stream of dead letters (`notify.dlq.>`).
pub const DLQ_STREAM: &str = "NOTIFY_DLQ";
/// Stream of status transitions for observers (`notify.status.>`).
pub const STATUS_STREAM: &str = "NOTIFY_STATUS";

/// Every stream Herald provisions.
pub const ALL_STREAMS: [&str; 4] = [EVENTS_STREAM, NOTIFY_STREAM, DLQ_STREAM, STATUS_STREAM];

/// Wildcard of all domain events.
pub const EVENTS_ALL: &str = "events.>";
/// Wildcard of all send commands.
pub const COMMANDS_ALL: &str = "notify.cmd.>";
/// Wildcard of all dead letters.
pub const DLQ_ALL: &str = "notify.dlq.>";
/// Wildcard of all status transitions.
pub const STATUS_ALL: &str = "notify.status.>";

/// Durable consumer of the router on [`EVENTS_STREAM`].
pub const ROUTER_CONSUMER: &str = "herald-router";
/// The single dispatch consumer of releases before partition leases; removed at provisioning.
pub const LEGACY_DISPATCH_CONSUMER: &str = "herald-dispatch";
/// Subjects on which instances announce that a provider's circuit opened
/// (`herald.circuit.<channel>`, [`circuit_subject`]) or is held open by a throttle of the whole
/// account (`herald.circuit.<channel>.held`, [`circuit_held_subject`]); core NATS, not persisted.
pub const CIRCUIT_ALL: &str = "herald.circuit.>";

/// Durable consumer of one command partition on [`NOTIFY_STREAM`]: `herald-dispatch-<n>`.
pub fn dispatch_consumer(partition: u32) -> String {
    format!("herald-dispatch-{partition}")
}

/// Subject of the announcement that a circuit of `channel` opened.
pub fn circuit_subject(channel: &str) -> String {
    format!("herald.circuit.{channel}")
}

/// Subject of the announcement that a circuit of `channel` is held open by a throttle of the
/// whole account. Instances older than it listen on `herald.circuit.*` and do not hear it: they
/// would take it for an opening, held at least their cool-down.
pub fn circuit_held_subject(channel: &str) -> String {
    format!("herald.circuit.{channel}.held")
}

/// Header naming why a message was dead-lettered.
pub const HEADER_DLQ_REASON: &str = "Herald-Dlq-Reason";
/// Header naming the subject a dead letter was first published on.
pub const HEADER_DLQ_ORIGINAL_SUBJECT: &str = "Herald-Original-Subject";
/// Header naming the providers called in the last round of a dead-lettered command,
/// comma-separated.
pub const HEADER_DLQ_PROVIDERS: &str = "Herald-Providers";
/// Header carrying how many times the message had been delivered when it was dead-lettered.
pub const HEADER_DLQ_DELIVERIES: &str = "Herald-Deliveries";
/// Header of a command replayed from the dead-letter stream: the delivery attempts its
/// notification had recorded by then. Its rounds over the channel chain count from there, so a
/// replay gets the whole retry schedule again.
pub const HEADER_REPLAY_BASE: &str = "Herald-Replay-Base";

/// Subject a domain event of `event_type` is published on: `events.<type>`.
pub fn event_subject(event_type: &str) -> String {
    format!("events.{event_type}")
}

/// Subject of the send commands of one partition: `notify.cmd.<partition>`.
pub fn command_subject(partition: u32) -> String {
    format!("notify.cmd.{partition}")
}

/// The most send-command partitions a deployment may have (`nats.partitions`).
pub const MAX_PARTITIONS: u32 = 1024;

/// The partition a command subject names (`notify.cmd.<partition>`), if it names one any
/// deployment could have: written as Herald writes it (`notify.cmd.7`, not `notify.cmd.007`,
/// which no consumer's filter matches) and below [`MAX_PARTITIONS`].
pub fn command_partition(subject: &str) -> Option<u32> {
    let written = subject.strip_prefix("notify.cmd.")?;
    let partition: u32 = written.parse().ok()?;
    (partition < MAX_PARTITIONS && partition.to_string() == written).then_some(partition)
}

/// Subject a status transition is published on: `notify.status.<status>`.
pub fn status_subject(status: &str) -> String {
    format!("notify.status.{status}")
}

/// Subject a dead letter is published on: `notify.dlq.<source>`, where source names the consumer
/// that gave up on it (`cmd` for send commands, `events` for domain events).
pub fn dlq_subject(source: &str) -> String {
    format!("notify.dlq.{source}")
}

/// The partition a recipient's commands go to, stable across processes and releases
/// (FNV-1a; `std`'s hasher is randomly seeded per process and would move users between partitions).
pub fn partition_for(recipient_key: &str, partitions: u32) -> u32 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = recipient_key
        .bytes()
        .fold(OFFSET, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME));
    (hash % u64::from(partitions.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_is_stable_and_in_range() {
        // Fixed expectations: a change here would move users between partitions on upgrade.
        assert_eq!(
            partition_for("customer-42", 8),
            partition_for("customer-42", 8)
        );
        assert_eq!(partition_for("", 8), 0xcbf2_9ce4_8422_2325_u64 as u32 % 8);
        for key in ["a", "b", "customer-1", "x@example.com"] {
            assert!(partition_for(key, 8) < 8);
        }
        assert_eq!(
            partition_for("anything", 0),
            0,
            "zero partitions is treated as one"
        );
    }

    #[test]
    fn partitions_spread_recipients() {
        let mut counts = [0u32; 8];
        for i in 0..8000 {
            counts[partition_for(&format!("customer-{i}"), 8) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn subjects_have_the_designed_shape() {
        assert_eq!(command_subject(3), "notify.cmd.3");
        assert_eq!(command_partition("notify.cmd.3"), Some(3));
        assert_eq!(command_partition("notify.cmd.x"), None);
        assert_eq!(command_partition("notify.dlq.cmd"), None);
        assert_eq!(command_partition("notify.cmd.1023"), Some(1023));
        // Subjects no consumer's filter (`notify.cmd.<n>`) matches, or beyond any deployment.
        assert_eq!(command_partition("notify.cmd.007"), None);
        assert_eq!(command_partition("notify.cmd.+7"), None);
        assert_eq!(command_partition("notify.cmd.1024"), None);
        assert_eq!(status_subject("sent"), "notify.status.sent");
        assert_eq!(dlq_subject("cmd"), "notify.dlq.cmd");
    }
}
