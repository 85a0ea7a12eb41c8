//! Partition leases in a JetStream key-value bucket.
//!
//! Each command partition (`notify.cmd.<n>`) is consumed by exactly one instance at a time: the
//! owner holds the key `partition.<n>` in the [`LEASE_BUCKET`] bucket. A lease is taken with
//! create-if-absent, renewed with an update that names the revision the owner last wrote (so a
//! lease that expired and was taken by someone else cannot be renewed by accident), and handed back
//! with a delete that names the revision too. The bucket's `max_age` is the lease TTL: an owner that
//! stops renewing (crashed, partitioned away) loses its keys when they age out, and the survivors
//! take the partitions over.
//!
//! The bucket's TTL changes safely while instances run: one configured with a longer TTL raises it
//! when it starts; one configured with a shorter TTL lowers it from its rounds, a halving at a
//! time ([`ttl_step`]), each once every instance has had time to follow the last. All follow the
//! one the bucket applies (read with each [`LeaseTable::view`]), so instances configured
//! differently (a rolling change of the TTL) never time their leases by a TTL the server does not
//! apply, and a lease renewed at the pace of the TTL before a step never ages out under the one
//! after it.
//!
//! Instances also keep a `member.<instance>` key fresh, so that each can compute its fair share of
//! the partitions (`ceil(partitions / members)`).
//!
//! The partition count the instances use is recorded in [`PARTITIONS_KEY`]: an instance with
//! another count is refused at start ([`LeaseTable::open`]). The record can be missing while
//! instances run (all of them cut off from NATS for longer than the TTL, the bucket lost with
//! NATS's store), and an instance started then records its own count. So every heartbeat checks
//! the record too, and never overwrites another count: an instance that finds one gives up its
//! partitions and its membership until the counts agree again ([`Heartbeat::other_partitions`]).
//!
//! Every value names the instance and a token drawn by the process that wrote it
//! (`<instance>/<token>`). An instance adopts only the leases its own process wrote (its lease
//! keeper was restarted after a panic), never one written under its name by another process: two
//! processes given one name (a shared env file) adopted each other's leases in turn and both pulled
//! the same partitions. Such a process finds the other's token on its membership record and says
//! so ([`LeaseTable::heartbeat`]). A process restarted after a crash draws a new token: its old
//! leases age out after the TTL, and it takes them again as free ones.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{
    self,
    kv::{self, CreateErrorKind, UpdateErrorKind},
};
use bytes::Bytes;
use futures::TryStreamExt;

use crate::NatsError;

/// The key-value bucket holding partition leases and instance membership.
pub const LEASE_BUCKET: &str = "herald_partitions";

/// The JetStream stream behind [`LEASE_BUCKET`] (`KV_<bucket>`).
pub const LEASE_STREAM: &str = "KV_herald_partitions";

/// Key of a partition's lease.
pub fn partition_key(partition: u32) -> String {
    format!("partition.{partition}")
}

/// Key of an instance's membership record.
pub fn member_key(instance: &str) -> String {
    format!("member.{instance}")
}

/// Key holding the number of command partitions the running instances use; written when an
/// instance joins and refreshed with every heartbeat of an instance using that count (never
/// overwritten with another), so it ages out only when every such instance has stopped.
pub const PARTITIONS_KEY: &str = "deployment.partitions";

/// The next TTL on the way from the bucket's `current` to a `wanted` shorter one: at most half as
/// long, so that a lease renewed every quarter of `current` (an instance that has not followed the
/// step yet) still has a quarter of `current` left when its next renewal comes.
pub fn ttl_step(current: Duration, wanted: Duration) -> Duration {
    wanted.max(current / 2)
}

/// Who holds what, as read from the bucket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseView {
    /// Partition → owning instance.
    pub owners: BTreeMap<u32, String>,
    /// Partition → revision of its lease key.
    pub revisions: BTreeMap<u32, u64>,
    /// Live instances (their membership keys have not aged out).
    pub members: Vec<String>,
    /// The lease TTL the bucket applies: its `max_age`, as the instances raised or lowered it.
    pub ttl: Duration,
    /// Partitions whose lease this process wrote (its name and its token).
    pub mine: BTreeSet<u32>,
}

/// The instance name in a lease or membership value (`<instance>/<token>`, or a bare name as
/// written before tokens).
pub fn owner_name(value: &str) -> &str {
    value.rsplit_once('/').map_or(value, |(name, _)| name)
}

/// A lease held by this instance: the revision it last wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// The partition.
    pub partition: u32,
    /// The key's revision as this instance last wrote it.
    pub revision: u64,
}

/// What a [`LeaseTable::heartbeat`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// Another live process wrote this instance's membership record since this one's last
    /// heartbeat: two processes run under one instance name.
    pub shared_name: bool,
    /// The partition count the deployment records, when it is not this instance's: another
    /// instance started with it while the record was missing (every instance cut off from NATS
    /// for longer than the TTL, the bucket lost with NATS's store). This instance wrote nothing:
    /// it must consume no partition until the counts agree again.
    pub other_partitions: Option<u32>,
}

/// Handle on the lease bucket for one instance.
#[derive(Clone)]
pub struct LeaseTable {
    js: jetstream::Context,
    store: kv::Store,
    instance: String,
    /// Drawn when this process opened the table; written beside the name in every value.
    token: String,
    /// Revision of this process's last write of its membership record (0: none yet).
    member_revision: Arc<AtomicU64>,
    /// Revision of this process's last write of the partition count record (0: none yet).
    count_revision: Arc<AtomicU64>,
    partitions: u32,
    replicas: usize,
    /// The TTL the bucket had once this instance opened it.
    opened_ttl: Duration,
}

impl LeaseTable {
    /// Creates the bucket if absent (TTL `ttl`, `replicas` copies) and binds to it as `instance`,
    /// an instance that spreads commands over `partitions` partitions. An existing bucket's TTL is
    /// raised to `ttl` at once, never lowered here: a shorter one is approached a step at a time
    /// by the caller ([`ttl_step`], [`LeaseTable::set_ttl`]). Refused
    /// ([`NatsError::Partitions`]) while running instances use another count: they would put one
    /// user's commands on two partitions, owned by two instances.
    pub async fn open(
        js: &jetstream::Context,
        instance: &str,
        ttl: Duration,
        replicas: usize,
        partitions: u32,
    ) -> Result<LeaseTable, NatsError> {
        // The bucket's stream is created the way a key-value bucket's is, but through the stream
        // API: it updates the TTL when the configuration changes, and it works on servers whose
        // account-info answer this client cannot parse (nats-server 2.9).
        let current = match js.get_stream(LEASE_STREAM).await {
            Ok(stream) => stream.cached_info().config.max_age,
            Err(e) if is_stream_not_found(&e) => Duration::ZERO,
            Err(e) => return Err(provision_error(e)),
        };
        let opened_ttl = ttl.max(current);
        js.create_or_update_stream(bucket_stream(opened_ttl, replicas))
            .await
            .map_err(provision_error)?;
        let store = js
            .get_key_value(LEASE_BUCKET)
            .await
            .map_err(provision_error)?;
        let table = LeaseTable {
            js: js.clone(),
            store,
            instance: instance.to_string(),
            token: uuid::Uuid::new_v4().simple().to_string(),
            member_revision: Arc::new(AtomicU64::new(0)),
            count_revision: Arc::new(AtomicU64::new(0)),
            partitions,
            replicas,
            opened_ttl,
        };
        table.join_partition_count().await?;
        Ok(table)
    }

    /// Records this instance's partition count where none is, or checks it against the one
    /// recorded by running instances.
    async fn join_partition_count(&self) -> Result<(), NatsError> {
        let read_error = |e: &dyn std::fmt::Display| NatsError::Read {
            what: format!("key {PARTITIONS_KEY} of bucket {LEASE_BUCKET}"),
            reason: e.to_string(),
        };
        match self
            .store
            .create(PARTITIONS_KEY, self.partitions_value())
            .await
        {
            Ok(revision) => {
                self.count_revision.store(revision, Ordering::Relaxed);
                return Ok(());
            }
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(NatsError::Publish {
                    subject: PARTITIONS_KEY.to_string(),
                    reason: e.to_string(),
                });
            }
        }
        let recorded = self
            .store
            .get(PARTITIONS_KEY)
            .await
            .map_err(|e| read_error(&e))?;
        // Aged out since (every instance stopped), or not a number (written by hand): no
        // running instance stands against this count, and this instance's heartbeat rewrites it.
        let Some(live) = recorded.and_then(|v| parse_count(&v)) else {
            return Ok(());
        };
        if live == self.partitions {
            return Ok(());
        }
        Err(NatsError::Partitions {
            configured: self.partitions,
            reason: format!(
                "running instances use {live}, and one user's commands must stay on one \
                 partition; to change the count, stop every instance, wait for the lease TTL to \
                 pass, and start them all with the new one"
            ),
        })
    }

    /// This instance's name.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The TTL the bucket had once this instance opened it: the configured one, or an existing
    /// bucket's longer one.
    pub fn opened_ttl(&self) -> Duration {
        self.opened_ttl
    }

    /// Sets the bucket's TTL (its `max_age`). Lower it by [`ttl_step`]s only.
    pub async fn set_ttl(&self, ttl: Duration) -> Result<(), NatsError> {
        self.js
            .update_stream(bucket_stream(ttl, self.replicas))
            .await
            .map(|_| ())
            .map_err(provision_error)
    }

    /// Creates the bucket again, with TTL `ttl`, if it is gone: lost with the server's store (a
    /// NATS without a persistent volume restarted, an R1 bucket's node is gone) or removed by
    /// hand (`nats kv rm`). Every lease and membership record went with it. Answers whether it
    /// was gone and this call created it (or another instance did, with the same configuration,
    /// at the same moment).
    ///
    /// Called when a lease operation failed: the server says whether the bucket exists, which the
    /// failed operation's error does not tell reliably (a write to a missing bucket fails with
    /// "no responders", as one does while JetStream is unavailable). Several instances may find
    /// it gone at once: the create is refused only for a bucket that exists with another
    /// configuration (one created by an instance with another TTL), and that one is kept as it
    /// is, its TTL followed like any other.
    pub async fn restore(&self, ttl: Duration) -> Result<bool, NatsError> {
        match self.js.get_stream(LEASE_STREAM).await {
            Ok(_) => return Ok(false),
            Err(e) if is_stream_not_found(&e) => {}
            Err(e) => return Err(provision_error(e)),
        }
        match self
            .js
            .create_stream(bucket_stream(ttl, self.replicas))
            .await
        {
            Ok(_) => Ok(true),
            Err(e)
                if matches!(
                    e.kind(),
                    jetstream::context::CreateStreamErrorKind::JetStream(err)
                        if err.error_code() == jetstream::ErrorCode::STREAM_NAME_EXIST
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(provision_error(e)),
        }
    }

    /// Takes the partition if nobody holds it; `None` if somebody does.
    pub async fn try_acquire(&self, partition: u32) -> Result<Option<Held>, NatsError> {
        // A write expecting no earlier revision of the key first, as the client's create-if-absent
        // does, but any other failure of it is the answer: the client's create then looks the
        // key up, a direct get the server does not answer while the bucket is missing, and waits
        // out the request timeout (10 s) where this write failed at once.
        match self
            .store
            .update(partition_key(partition), self.owner_value(), 0)
            .await
        {
            Ok(revision) => {
                return Ok(Some(Held {
                    partition,
                    revision,
                }));
            }
            // The key has a revision: held, or handed back (a delete marker, which the create
            // writes over).
            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => {}
            Err(e) => return Err(lease_error(partition, e)),
        }
        match self
            .store
            .create(partition_key(partition), self.owner_value())
            .await
        {
            Ok(revision) => Ok(Some(Held {
                partition,
                revision,
            })),
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(lease_error(partition, e)),
        }
    }

    /// Renews a held lease; `None` if it was lost (it aged out and someone else wrote the key).
    pub async fn renew(&self, held: Held) -> Result<Option<Held>, NatsError> {
        match self
            .store
            .update(
                partition_key(held.partition),
                self.owner_value(),
                held.revision,
            )
            .await
        {
            Ok(revision) => Ok(Some(Held { revision, ..held })),
            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(e) => Err(lease_error(held.partition, e)),
        }
    }

    /// Hands a lease back at once (graceful shutdown, rebalancing). A lease that was already lost
    /// is left to its new owner.
    pub async fn release(&self, held: Held) -> Result<(), NatsError> {
        self.store
            .delete_expect_revision(partition_key(held.partition), Some(held.revision))
            .await
            .or_else(|e| {
                // A newer revision means another instance owns it now: nothing to hand back.
                if e.to_string().contains("wrong last sequence") {
                    Ok(())
                } else {
                    Err(lease_error(held.partition, e))
                }
            })
    }

    /// Checks the partition count the deployment records against this instance's, and, when they
    /// agree, refreshes the record and this instance's membership record (see [`Heartbeat`]).
    ///
    /// The count is never overwritten: it is created where none is (aged out, or lost with the
    /// bucket), and refreshed with an update naming the revision just read. An instance that finds
    /// another count recorded writes nothing, not even its membership, which ages out: it must
    /// stop consuming partitions (another instance started with that count while the record was
    /// missing, and one user's commands would otherwise go to two partitions with two owners).
    pub async fn heartbeat(&self) -> Result<Heartbeat, NatsError> {
        if let Some(recorded) = self.refresh_partition_count().await? {
            return Ok(Heartbeat {
                shared_name: false,
                other_partitions: Some(recorded),
            });
        }
        Ok(Heartbeat {
            shared_name: self.refresh_membership().await?,
            other_partitions: None,
        })
    }

    /// Creates or refreshes the partition count record when it is this instance's; answers the
    /// recorded count when it is another.
    async fn refresh_partition_count(&self) -> Result<Option<u32>, NatsError> {
        let publish_error = |e: &dyn std::fmt::Display| NatsError::Publish {
            subject: PARTITIONS_KEY.to_string(),
            reason: e.to_string(),
        };
        let read_error = |e: &dyn std::fmt::Display| NatsError::Read {
            what: format!("key {PARTITIONS_KEY} of bucket {LEASE_BUCKET}"),
            reason: e.to_string(),
        };
        // First a write naming the revision this process last wrote: it refreshes the record when
        // nobody wrote it since (a lone instance: one request), and, as a write, fails at once
        // when the bucket is gone, where a read waits out the request timeout.
        let last = self.count_revision.load(Ordering::Relaxed);
        match self
            .store
            .update(PARTITIONS_KEY, self.partitions_value(), last)
            .await
        {
            Ok(revision) => {
                self.count_revision.store(revision, Ordering::Relaxed);
                return Ok(None);
            }
            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => {}
            Err(e) => return Err(publish_error(&e)),
        }
        // Written since (by another instance, with this count or not), aged out, or lost with
        // the bucket. Two tries: the record may change between the read and the write (another
        // instance refreshed it, or created it where none was); the second read sees the change.
        for _ in 0..2 {
            let entry = self
                .store
                .entry(PARTITIONS_KEY)
                .await
                .map_err(|e| read_error(&e))?
                .filter(|entry| entry.operation == kv::Operation::Put);
            let written = match entry {
                Some(entry) => {
                    match parse_count(&entry.value) {
                        Some(recorded) if recorded != self.partitions => {
                            return Ok(Some(recorded));
                        }
                        // This count, or not a number (written by hand): refreshed, or replaced
                        // as an instance that starts now would.
                        _ => {}
                    }
                    self.store
                        .update(PARTITIONS_KEY, self.partitions_value(), entry.revision)
                        .await
                        .map_err(|e| {
                            (e.kind() != UpdateErrorKind::WrongLastRevision)
                                .then(|| publish_error(&e))
                        })
                }
                // Absent (aged out, lost with the bucket) or deleted: this instance records its
                // count, as one that starts now would.
                None => self
                    .store
                    .create(PARTITIONS_KEY, self.partitions_value())
                    .await
                    .map_err(|e| {
                        (e.kind() != CreateErrorKind::AlreadyExists).then(|| publish_error(&e))
                    }),
            };
            match written {
                Ok(revision) => {
                    self.count_revision.store(revision, Ordering::Relaxed);
                    return Ok(None);
                }
                Err(Some(err)) => return Err(err),
                // Changed since the read: read it again.
                Err(None) => {}
            }
        }
        // Changed under both tries: other instances refresh it at the same moment. Read once
        // more; a record of this count is as good as this instance's write.
        let recorded = self
            .store
            .get(PARTITIONS_KEY)
            .await
            .map_err(|e| read_error(&e))?
            .and_then(|value| parse_count(&value));
        Ok(recorded.filter(|&recorded| recorded != self.partitions))
    }

    /// Refreshes this instance's membership record. Answers `true` when another live process
    /// wrote it since this one's last heartbeat: two processes run under one instance name.
    async fn refresh_membership(&self) -> Result<bool, NatsError> {
        let publish_error = |key: &str, e: &dyn std::fmt::Display| NatsError::Publish {
            subject: key.to_string(),
            reason: e.to_string(),
        };
        let key = member_key(&self.instance);
        let last = self.member_revision.load(Ordering::Relaxed);
        let mut shared = false;
        if last != 0 {
            match self.store.update(&key, self.owner_value(), last).await {
                Ok(revision) => {
                    self.member_revision.store(revision, Ordering::Relaxed);
                    return Ok(false);
                }
                // Written since (or aged out, when this process stalled past the TTL).
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => {
                    let entry = self
                        .store
                        .entry(&key)
                        .await
                        .map_err(|e| publish_error(&key, &e))?;
                    shared = entry.is_some_and(|entry| {
                        entry.operation == kv::Operation::Put && entry.value != self.owner_value()
                    });
                }
                Err(e) => return Err(publish_error(&key, &e)),
            }
        }
        let revision = self
            .store
            .put(key.as_str(), self.owner_value())
            .await
            .map_err(|e| publish_error(&key, &e))?;
        self.member_revision.store(revision, Ordering::Relaxed);
        Ok(shared)
    }

    /// Removes this instance's membership record (graceful shutdown).
    pub async fn leave(&self) -> Result<(), NatsError> {
        self.store
            .delete(member_key(&self.instance))
            .await
            .map_err(|e| NatsError::Publish {
                subject: member_key(&self.instance),
                reason: e.to_string(),
            })
    }

    /// Reads every live lease and membership record.
    ///
    /// The keys are listed from the stream's info (one request) and read with direct gets, all at
    /// once. The key-value `keys()` listing runs an ordered consumer that waits for the entries
    /// it counted when it was created, and entries age out here all the time: under load a round
    /// waited 16 s for it (measured with a 3 s TTL), holding up this instance's renewals.
    pub async fn view(&self) -> Result<LeaseView, NatsError> {
        let read_error = |e: &dyn std::fmt::Display| NatsError::Read {
            what: format!("key-value bucket {LEASE_BUCKET}"),
            reason: e.to_string(),
        };
        let prefix = &self.store.prefix;
        let listing = self
            .store
            .stream
            .info_with_subjects(format!("{prefix}>"))
            .await
            .map_err(|e| read_error(&e))?;
        let ttl = listing.info.config.max_age;
        let keys: Vec<String> = listing
            .map_ok(|(subject, _)| subject)
            .try_collect::<Vec<String>>()
            .await
            .map_err(|e| read_error(&e))?
            .into_iter()
            .filter_map(|subject| subject.strip_prefix(prefix.as_str()).map(str::to_owned))
            .collect();
        let entries =
            futures::future::try_join_all(keys.iter().map(|key| self.store.entry(key.as_str())))
                .await
                .map_err(|e| read_error(&e))?;
        let mut view = LeaseView {
            ttl,
            ..LeaseView::default()
        };
        let mine = self.owner_value();
        for (key, entry) in keys.iter().zip(entries) {
            // A key handed back leaves a delete marker; a key may also age out after listing.
            let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
                continue;
            };
            let value = String::from_utf8_lossy(&entry.value);
            if let Some(instance) = key.strip_prefix("member.") {
                view.members.push(instance.to_string());
            } else if let Some(partition) = key
                .strip_prefix("partition.")
                .and_then(|p| p.parse::<u32>().ok())
            {
                if entry.value == mine {
                    view.mine.insert(partition);
                }
                view.owners
                    .insert(partition, owner_name(&value).to_string());
                view.revisions.insert(partition, entry.revision);
            }
        }
        view.members.sort();
        Ok(view)
    }

    fn owner_value(&self) -> Bytes {
        Bytes::from(format!("{}/{}", self.instance, self.token))
    }

    fn partitions_value(&self) -> Bytes {
        Bytes::from(self.partitions.to_string())
    }
}

/// The stream behind the lease bucket: one value per key, entries aging out after `ttl`.
fn bucket_stream(ttl: Duration, replicas: usize) -> jetstream::stream::Config {
    jetstream::stream::Config {
        name: LEASE_STREAM.to_string(),
        description: Some("Herald partition leases and instance membership".to_string()),
        subjects: vec![format!("$KV.{LEASE_BUCKET}.>")],
        max_messages_per_subject: 1,
        max_age: ttl,
        storage: jetstream::stream::StorageType::File,
        num_replicas: replicas.max(1),
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: jetstream::stream::DiscardPolicy::New,
        ..Default::default()
    }
}

/// The partition count in a [`PARTITIONS_KEY`] value; `None` when it is not a number.
fn parse_count(value: &[u8]) -> Option<u32> {
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// The bucket could not be created, read or changed.
fn provision_error(e: impl std::fmt::Display) -> NatsError {
    NatsError::Provision {
        what: format!("key-value bucket {LEASE_BUCKET}"),
        reason: e.to_string(),
    }
}

/// Whether the bucket does not exist yet.
fn is_stream_not_found(e: &jetstream::context::GetStreamError) -> bool {
    matches!(
        e.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(err)
            if err.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

fn lease_error(partition: u32, e: impl std::fmt::Display) -> NatsError {
    NatsError::Publish {
        subject: partition_key(partition),
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_stream_is_the_buckets() {
        assert_eq!(LEASE_STREAM, format!("KV_{LEASE_BUCKET}"));
        assert_eq!(bucket_stream(Duration::from_secs(1), 1).name, LEASE_STREAM);
    }

    #[test]
    fn a_shorter_ttl_is_approached_by_halvings() {
        let s = Duration::from_secs;
        assert_eq!(ttl_step(s(10), s(1)), s(5));
        assert_eq!(ttl_step(s(5), s(1)), Duration::from_millis(2_500));
        assert_eq!(
            ttl_step(s(2), s(1)),
            s(1),
            "the last step lands on the wanted TTL"
        );
        assert_eq!(ttl_step(s(10), s(7)), s(7), "less than half: at once");
    }
}
