//! `StatusWriter`: batches status changes and attempt rows into one transaction, and only then
//! acknowledges (or NAKs) the JetStream messages they belong to — nothing is acked before its
//! status is written.
//!
//! A batch is flushed when it reaches `max_batch` records or `flush_interval_ms` after its first
//! record; while a flush is in flight the next batch gathers (group commit), and it is flushed when
//! it is full or its first record is an interval old, not as soon as the previous flush ends
//! (`next_flush_in`). The flush runs as a task, so the mailbox keeps taking records during a slow
//! write. If the database is unreachable the flush retries with backoff and tells JetStream the
//! messages are still in progress, so they are neither redelivered (and resent) nor acked;
//! in-flight permits stay held, which pauses the consumer until the database is back.
//!
//! A batch's status events are published on a task of their own, so that the next batch never
//! waits for NATS; a [`StatusWriterMsg::Flush`] (shutdown) answers once they are out too, within
//! [`PUBLISH_WAIT`], so that a stopping process does not drop events whose statuses it committed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{AckKind, message::Acker};
use herald_entities::{
    Checkpoints, NotificationStatus, RepoError, WriteGate,
    repo::receipts,
    repo::status_batch::{self, Applied, NewAttempt, StatusChange},
    repo::writer_thread::WriterThread,
};
use herald_nats::{Channel, Publisher, SCHEMA_VERSION, StatusEvent};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use sea_orm::DatabaseConnection;
use serde::{Deserialize, Serialize};

/// Batching limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct StatusWriterSettings {
    /// Records per transaction at most.
    pub max_batch: usize,
    /// Longest a record waits for its batch to fill, in milliseconds.
    pub flush_interval_ms: u64,
}

impl Default for StatusWriterSettings {
    fn default() -> Self {
        Self {
            max_batch: 1_000,
            flush_interval_ms: 5,
        }
    }
}

/// What to tell JetStream once the record is written.
pub enum AfterWrite {
    /// Nothing: no JetStream message waits for this record.
    Nothing,
    /// Acknowledge: the message is done.
    Ack(Acker),
    /// Redeliver after the delay (retry with backoff).
    Nak(Acker, Duration),
}

/// Everything one delivery step wants written.
pub struct StatusRecord {
    /// Status changes, applied in order.
    pub changes: Vec<StatusChange>,
    /// Attempt rows.
    pub attempts: Vec<NewAttempt>,
    /// The JetStream follow-up.
    pub then: AfterWrite,
    /// The delivery's in-flight permit and reservation, released once the record is written and
    /// acked.
    pub permit: Option<crate::lease::Lease>,
}

/// Messages of the [`StatusWriter`].
pub enum StatusWriterMsg {
    /// Write this record.
    Record(Box<StatusRecord>),
    /// The batch timer fired (internal).
    Tick,
    /// A flush finished (internal).
    Written,
    /// Reply once everything received so far is written and its status events are published, or
    /// after [`PUBLISH_WAIT`] those still unpublished are logged and counted (shutdown).
    Flush(RpcReplyPort<()>),
}

/// Longest a flush waits for the status events still being published once everything is written.
pub const PUBLISH_WAIT: Duration = Duration::from_secs(5);

/// Connections in the StatusWriter's own pool: one transaction at a time, and one spare.
const WRITER_CONNECTIONS: u32 = 2;

/// Arguments of the [`StatusWriter`].
#[derive(Clone)]
pub struct StatusWriterArgs {
    /// The database to write to. The StatusWriter opens its own small pool on its
    /// [`WriterThread`], so that its connections belong to that thread's runtime.
    pub database_url: String,
    /// Who checkpoints an SQLite log (see [`herald_entities::checkpoint`]).
    pub checkpoints: Checkpoints,
    /// Whose turn it is to write (shared with the API's inserts; see [`WriteGate`]).
    pub gate: WriteGate,
    /// Publisher for `notify.status.*`.
    pub publisher: Publisher,
    /// Batching limits.
    pub settings: StatusWriterSettings,
}

/// State of the [`StatusWriter`].
pub struct StatusWriterState {
    args: StatusWriterArgs,
    /// Where and through which pool the batch transactions run.
    writer: BatchWriter,
    pending: Vec<StatusRecord>,
    flushing: bool,
    /// When the oldest record in `pending` arrived.
    oldest_pending: Option<Instant>,
    tick_scheduled: bool,
    waiters: Vec<RpcReplyPort<()>>,
    /// The status events being published.
    publishing: Publishing,
}

/// The batching writer.
pub struct StatusWriter;

impl Actor for StatusWriter {
    type Msg = StatusWriterMsg;
    type State = StatusWriterState;
    type Arguments = StatusWriterArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: StatusWriterArgs,
    ) -> Result<StatusWriterState, ActorProcessingErr> {
        let writer =
            BatchWriter::start(&args.database_url, args.checkpoints, args.gate.clone()).await?;
        Ok(StatusWriterState {
            args,
            writer,
            pending: Vec::new(),
            flushing: false,
            oldest_pending: None,
            tick_scheduled: false,
            waiters: Vec::new(),
            publishing: Publishing::default(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: StatusWriterMsg,
        state: &mut StatusWriterState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            StatusWriterMsg::Record(record) => {
                if state.pending.is_empty() {
                    state.oldest_pending = Some(Instant::now());
                }
                state.pending.push(*record);
                if state.pending.len() >= state.args.settings.max_batch {
                    start_flush(&myself, state);
                } else if !state.flushing {
                    schedule_tick(&myself, state);
                }
            }
            StatusWriterMsg::Tick => {
                state.tick_scheduled = false;
                start_flush(&myself, state);
            }
            StatusWriterMsg::Written => {
                state.flushing = false;
                let waiting = Waiting {
                    pending: state.pending.len(),
                    oldest_waited: state.oldest_pending.map(|oldest| oldest.elapsed()),
                    drain: !state.waiters.is_empty(),
                };
                match next_flush_in(&state.args.settings, &waiting) {
                    Some(Duration::ZERO) => start_flush(&myself, state),
                    Some(wait) => schedule_tick_in(&myself, state, wait),
                    None => {}
                }
            }
            StatusWriterMsg::Flush(reply) => {
                state.waiters.push(reply);
                start_flush(&myself, state);
            }
        }
        if !state.flushing && state.pending.is_empty() && !state.waiters.is_empty() {
            answer_when_published(std::mem::take(&mut state.waiters), &state.publishing);
        }
        Ok(())
    }
}

/// The batch transactions' thread and their pool, which lives on that thread's runtime (see
/// [`WriterThread`]: a transaction's statements are sent as soon as the previous one is done,
/// however busy the main runtime is).
#[derive(Clone)]
struct BatchWriter {
    db: DatabaseConnection,
    thread: WriterThread,
    gate: WriteGate,
}

impl BatchWriter {
    /// Starts the thread and creates the pool there, lazily: a PostgreSQL server that is down
    /// delays the first batch (which rides it out) rather than the actor's start.
    async fn start(
        database_url: &str,
        checkpoints: Checkpoints,
        gate: WriteGate,
    ) -> Result<Self, ActorProcessingErr> {
        let thread = WriterThread::start("herald-status-db")?;
        let url = database_url.to_owned();
        let db = thread
            .run(async move {
                Ok(
                    herald_entities::connect_batch_writer(&url, WRITER_CONNECTIONS, checkpoints)
                        .await?,
                )
            })
            .await?;
        Ok(Self { db, thread, gate })
    }
}

/// Where the batches are written: the database, through a [`BatchWriter`] (a stand-in in tests).
trait Store: Sync {
    /// Applies `changes` and `attempts` in one transaction; `again` when an earlier try's outcome
    /// is unknown ([`status_batch::apply_again`]).
    fn apply(
        &self,
        changes: &Arc<[StatusChange]>,
        attempts: &Arc<[NewAttempt]>,
        again: bool,
    ) -> impl Future<Output = Result<Applied, RepoError>> + Send;
}

impl Store for BatchWriter {
    /// Runs the transaction on the thread, in the gate's turn.
    async fn apply(
        &self,
        changes: &Arc<[StatusChange]>,
        attempts: &Arc<[NewAttempt]>,
        again: bool,
    ) -> Result<Applied, RepoError> {
        let (db, changes, attempts) = (self.db.clone(), changes.clone(), attempts.clone());
        let gate = self.gate.clone();
        self.thread
            .run(async move {
                let _turn = gate.enter().await;
                match again {
                    false => status_batch::apply(&db, &changes, &attempts).await,
                    true => status_batch::apply_again(&db, &changes, &attempts).await,
                }
            })
            .await
    }
}

/// Flushes one interval from now, unless a flush is already due then.
fn schedule_tick(myself: &ActorRef<StatusWriterMsg>, state: &mut StatusWriterState) {
    let interval = Duration::from_millis(state.args.settings.flush_interval_ms);
    schedule_tick_in(myself, state, interval);
}

/// Flushes after `wait`, unless a flush is already due by then.
fn schedule_tick_in(
    myself: &ActorRef<StatusWriterMsg>,
    state: &mut StatusWriterState,
    wait: Duration,
) {
    if !state.tick_scheduled {
        state.tick_scheduled = true;
        myself.send_after(wait, || StatusWriterMsg::Tick);
    }
}

/// What a flush that just ended finds waiting.
struct Waiting {
    /// Records arrived meanwhile.
    pending: usize,
    /// How long the oldest of them has waited.
    oldest_waited: Option<Duration>,
    /// Whether someone waits for everything to be written (shutdown).
    drain: bool,
}

/// How long after a flush ended the next one should start (`None`: nothing to write): at once when
/// the batch is full, everything is to be written, or the oldest record has waited an interval;
/// otherwise when it will have. Under steady load this paces flushes an interval apart instead of
/// back to back, so the write turn ([`WriteGate`]) is free most of the time for the API's inserts,
/// which a caller waits for, and each batch carries more records for its fixed cost.
fn next_flush_in(settings: &StatusWriterSettings, waiting: &Waiting) -> Option<Duration> {
    let interval = Duration::from_millis(settings.flush_interval_ms);
    if waiting.pending == 0 {
        return None;
    }
    if waiting.pending >= settings.max_batch || waiting.drain {
        return Some(Duration::ZERO);
    }
    Some(interval.saturating_sub(waiting.oldest_waited.unwrap_or(interval)))
}

fn start_flush(myself: &ActorRef<StatusWriterMsg>, state: &mut StatusWriterState) {
    if state.flushing || state.pending.is_empty() {
        return;
    }
    let take = state.pending.len().min(state.args.settings.max_batch);
    let batch: Vec<StatusRecord> = state.pending.drain(..take).collect();
    // What stays (beyond `max_batch`) keeps the time of the batch's first record.
    if state.pending.is_empty() {
        state.oldest_pending = None;
    }
    state.flushing = true;
    let args = state.args.clone();
    let writer = state.writer.clone();
    let written = WhenWritten(myself.clone());
    let publishing = state.publishing.clone();
    tokio::spawn(async move {
        let publish = |events| publishing.publish(&args.publisher, events);
        write_batch(&writer, batch, &publish).await;
        drop(written);
    });
}

/// Tells the writer its flush is over when dropped: when the batch is written, and also when
/// the flush panicked (its messages, never acknowledged, are redelivered), so that one bad
/// batch cannot stop every later one.
struct WhenWritten(ActorRef<StatusWriterMsg>);

impl Drop for WhenWritten {
    fn drop(&mut self) {
        let _ = self.0.cast(StatusWriterMsg::Written);
    }
}

/// Writes a batch, then settles its messages and has `publish` publish the status events of the
/// changes that moved their notification (not of those the transition rules refused: a second
/// delivery's late failure after the first recorded `sent`). Rides out database outages; a record
/// that fails on its own (not an outage) is isolated so it cannot block the others.
async fn write_batch(
    store: &impl Store,
    batch: Vec<StatusRecord>,
    publish: &(impl Fn(WriteEvents) + Sync),
) {
    let started = std::time::Instant::now();
    let changes: Arc<[StatusChange]> = batch.iter().flat_map(|r| r.changes.clone()).collect();
    let attempts: Arc<[NewAttempt]> = batch.iter().flat_map(|r| r.attempts.clone()).collect();
    let mut unknown = false;
    let applied = match apply_riding_outages(store, &changes, &attempts, &batch, &mut unknown).await
    {
        Ok(applied) => applied,
        Err(err) => {
            tracing::warn!(error = %err, unknown, "batch write failed; writing its records one by one");
            // A try may have committed unseen: each record is written as that commit wrote it,
            // so that the changes it made are recognised as moved.
            let written = if unknown {
                status_batch::as_stamped(&changes)
            } else {
                changes.to_vec()
            };
            write_one_by_one(store, batch, &written, unknown, publish).await;
            return;
        }
    };
    metrics::histogram!("herald_status_batch_seconds").record(started.elapsed().as_secs_f64());
    metrics::histogram!("herald_status_batch_records").record(batch.len() as f64);
    let events = moved_events(&applied, &changes);
    for record in batch {
        settle(record).await;
    }
    publish(events);
}

/// Applies `changes` and `attempts` in one transaction. While the database is unavailable it
/// retries with backoff and tells JetStream that the messages of `records` are still in progress;
/// any other error is returned. A retry may follow a commit that went through unconfirmed, so it
/// counts the changes that commit made as moved ([`status_batch::apply_again`]); `unknown` is set
/// from the first outage on (a caller that sets it beforehand has every try count them).
async fn apply_riding_outages(
    store: &impl Store,
    changes: &Arc<[StatusChange]>,
    attempts: &Arc<[NewAttempt]>,
    records: &[StatusRecord],
    unknown: &mut bool,
) -> Result<Applied, RepoError> {
    let mut delay = Duration::from_millis(100);
    loop {
        match store.apply(changes, attempts, *unknown).await {
            Err(err) if err.is_outage() => {
                tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "database unavailable; holding {} records", records.len());
                metrics::counter!("herald_status_write_retries_total").increment(1);
                for record in records {
                    keep_in_progress(&record.then).await;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
                *unknown = true;
            }
            result => return result,
        }
    }
}

/// Writes the records of a batch that failed as a whole one at a time: record by record, the
/// changes of `written` (the batch's, in order, as [`write_batch`] wants them written), counting
/// those an earlier try made as moved when that try's outcome is `unknown`. Each record's events
/// are those of its own changes.
async fn write_one_by_one(
    store: &impl Store,
    batch: Vec<StatusRecord>,
    written: &[StatusChange],
    unknown: bool,
    publish: &(impl Fn(WriteEvents) + Sync),
) {
    let mut rest = written;
    for record in batch {
        let (own, after) = rest.split_at(record.changes.len().min(rest.len()));
        rest = after;
        let records = std::slice::from_ref(&record);
        let changes: Arc<[StatusChange]> = own.into();
        let attempts: Arc<[NewAttempt]> = record.attempts.as_slice().into();
        let mut again = unknown;
        match apply_riding_outages(store, &changes, &attempts, records, &mut again).await {
            Ok(applied) => {
                let events = moved_events(&applied, &record.changes);
                settle(record).await;
                publish(events);
            }
            Err(RepoError::WriterStopped) => {
                // Nothing was decided: unacknowledged, this record and the rest are redelivered.
                tracing::error!("the status writer's thread is gone; records left for redelivery");
                return;
            }
            Err(err) => {
                // Not an outage: this record cannot be written as it is (e.g. a command for a
                // notification that was never stored). Redelivering would only repeat the send, so
                // the message is terminated and the fault is made loud.
                tracing::error!(error = %err, ids = ?record.changes.iter().map(|c| c.id).collect::<Vec<_>>(), "status record rejected by the database; message terminated");
                metrics::counter!("herald_status_records_rejected_total").increment(1);
                if let AfterWrite::Ack(acker) | AfterWrite::Nak(acker, _) = &record.then {
                    let _ = acker.ack_with(AckKind::Term).await;
                }
            }
        }
    }
}

async fn keep_in_progress(then: &AfterWrite) {
    if let AfterWrite::Ack(acker) | AfterWrite::Nak(acker, _) = then {
        let _ = acker.ack_with(AckKind::Progress).await;
    }
}

async fn settle(record: StatusRecord) {
    let result = match &record.then {
        AfterWrite::Nothing => Ok(()),
        AfterWrite::Ack(acker) => acker.ack().await,
        AfterWrite::Nak(acker, delay) => acker.ack_with(AckKind::Nak(Some(*delay))).await,
    };
    if let Err(err) = result {
        // The status is written; a lost ack only means a redelivery, which the dispatcher
        // recognises by the stored final status.
        tracing::warn!(error = %err, "could not acknowledge a written message");
    }
    drop(record.permit);
}

/// The status events of a write, in the order they are published.
#[derive(Debug, Default)]
pub(crate) struct WriteEvents {
    /// Those of the changes that moved their notification.
    moved: Vec<StatusEvent>,
    /// Those of the receipts held for them that the write applied: published once the others are
    /// acknowledged, for a receipt's move is dated no earlier than the send's, often at the same
    /// microsecond, and an observer reading the stream in order must see `sent` before
    /// `delivered`.
    receipts: Vec<StatusEvent>,
}

impl WriteEvents {
    fn len(&self) -> usize {
        self.moved.len() + self.receipts.len()
    }

    /// All of them, in the order they are published.
    #[cfg(test)]
    fn into_vec(self) -> Vec<StatusEvent> {
        let mut all = self.moved;
        all.extend(self.receipts);
        all
    }
}

/// The status events of the changes among `changes` that moved their notification, and those of
/// the receipts held for them that the write applied.
pub(crate) fn moved_events(applied: &Applied, changes: &[StatusChange]) -> WriteEvents {
    WriteEvents {
        moved: applied
            .moved_changes(changes)
            .filter_map(status_event)
            .collect(),
        receipts: applied
            .receipts()
            .iter()
            .map(|row| receipts::receipt_event(row, None))
            .collect(),
    }
}

fn status_event(change: &StatusChange) -> Option<StatusEvent> {
    use NotificationStatus::*;
    matches!(
        change.status,
        Sent | Delivered | Failed | Skipped | Dead | Cancelled
    )
    .then(|| StatusEvent {
        v: SCHEMA_VERSION,
        notification_id: change.id,
        status: change.status.as_str().to_string(),
        channel: change.final_channel.as_deref().and_then(Channel::parse),
        error: change.error.clone(),
        at: change.at,
    })
}

/// Publishes `events` for observers, on a task of its own so that the next batch does not wait
/// for their acknowledgements; a failed publish is logged and counted
/// ([`Publisher::publish_statuses`]).
pub(crate) fn publish_events(publisher: &Publisher, events: WriteEvents) {
    publish_then(publisher, events, ());
}

/// Publishes `events` on a task of its own (the receipts' after the others are acknowledged),
/// dropping `done` when the task ends.
fn publish_then(publisher: &Publisher, events: WriteEvents, done: impl Send + 'static) {
    if events.len() == 0 {
        return;
    }
    let publisher = publisher.clone();
    tokio::spawn(async move {
        publisher.publish_statuses(&events.moved).await;
        publisher.publish_statuses(&events.receipts).await;
        drop(done);
    });
}

/// The status events being published, counted so that a flush can wait for them.
#[derive(Clone, Default)]
struct Publishing(Arc<tokio::sync::watch::Sender<usize>>);

/// Takes its events off the count when their publishing task ends (or panics).
struct Published(Arc<tokio::sync::watch::Sender<usize>>, usize);

impl Drop for Published {
    fn drop(&mut self) {
        self.0.send_modify(|count| *count -= self.1);
    }
}

impl Publishing {
    /// Publishes `events` as [`publish_events`] does, counting them until their task ends.
    fn publish(&self, publisher: &Publisher, events: WriteEvents) {
        let count = events.len();
        if count == 0 {
            return;
        }
        self.0.send_modify(|publishing| *publishing += count);
        publish_then(publisher, events, Published(self.0.clone(), count));
    }

    /// Waits until no event is being published, for `within` at most; answers how many still are.
    async fn settled(&self, within: Duration) -> usize {
        let mut count = self.0.subscribe();
        let settled = tokio::time::timeout(within, count.wait_for(|&count| count == 0))
            .await
            .is_ok();
        if settled { 0 } else { *count.borrow() }
    }
}

/// Answers `waiters` once the events being published are out, or after [`PUBLISH_WAIT`], logging
/// and counting (`herald_status_events_left_unpublished_total`) those that are not: a stopping
/// process drops them.
fn answer_when_published(waiters: Vec<RpcReplyPort<()>>, publishing: &Publishing) {
    let publishing = publishing.clone();
    tokio::spawn(async move {
        let left = publishing.settled(PUBLISH_WAIT).await;
        if left > 0 {
            tracing::warn!(
                left,
                "status events still unpublished after {PUBLISH_WAIT:?}; a stop drops them"
            );
            metrics::counter!("herald_status_events_left_unpublished_total").increment(left as u64);
        }
        for waiter in waiters {
            let _ = waiter.send(());
        }
    });
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, VecDeque};
    use std::sync::Mutex;

    use chrono::{DateTime, Utc};
    use sea_orm::{DbErr, RuntimeErr};
    use uuid::Uuid;

    use super::*;

    /// What the stand-in database does with a try.
    enum Try {
        /// Commits, but the reply is lost: an outage to the writer.
        CommitUnseen,
        /// Refuses the whole batch (not an outage).
        Refuse,
    }

    /// A database of notification statuses that applies changes as [`status_batch::apply`] and
    /// [`status_batch::apply_again`] promise: a change moves a row whose status allows it, and
    /// again also one that holds exactly it (its status, stamped with its batch's time for it).
    #[derive(Default)]
    struct StandIn {
        rows: Mutex<HashMap<Uuid, (NotificationStatus, DateTime<Utc>)>>,
        /// How the next tries go; then every try commits and is seen.
        tries: Mutex<VecDeque<Try>>,
    }

    impl StandIn {
        fn commit(&self, changes: &[StatusChange], again: bool) -> Applied {
            let mut rows = self.rows.lock().expect("rows");
            let moved = status_batch::as_stamped(changes)
                .into_iter()
                .map(|change| {
                    let row = rows.get(&change.id).copied();
                    let allowed = row
                        .is_some_and(|(status, _)| change.status.allowed_from().contains(&status));
                    let moved = allowed || (again && row == Some((change.status, change.at)));
                    if moved {
                        rows.insert(change.id, (change.status, change.at));
                    }
                    moved
                })
                .collect::<Vec<bool>>();
            Applied::from(moved)
        }
    }

    impl Store for StandIn {
        async fn apply(
            &self,
            changes: &Arc<[StatusChange]>,
            _attempts: &Arc<[NewAttempt]>,
            again: bool,
        ) -> Result<Applied, RepoError> {
            let next = self.tries.lock().expect("tries").pop_front();
            match next {
                Some(Try::CommitUnseen) => {
                    self.commit(changes, again);
                    Err(DbErr::Conn(RuntimeErr::Internal("connection reset".into())).into())
                }
                Some(Try::Refuse) => Err(DbErr::Custom("refused".into()).into()),
                None => Ok(self.commit(changes, again)),
            }
        }
    }

    fn sent(id: Uuid, millis: i64) -> StatusRecord {
        // On a 10 ms window's start: changes a few ms apart share an UPDATE.
        let base = DateTime::from_timestamp_millis(1_790_000_000_000).expect("valid instant");
        StatusRecord {
            changes: vec![StatusChange {
                at: base + chrono::Duration::milliseconds(millis),
                final_channel: Some("email".into()),
                ..StatusChange::to(id, NotificationStatus::Sent)
            }],
            attempts: vec![],
            then: AfterWrite::Nothing,
            permit: None,
        }
    }

    /// A batch's commit went through unseen (the connection dropped), and the retry failed on its
    /// own (not an outage): its records, written one by one, found their rows holding their
    /// changes already, which the transition rules refuse (`sent → sent`), so the events of that
    /// commit were never published. Written one by one as that commit wrote them, and counted as
    /// it made them, they are.
    #[tokio::test]
    async fn a_batch_committed_unseen_then_written_one_by_one_publishes_its_events() {
        let (first, second) = (Uuid::now_v7(), Uuid::now_v7());
        let store = StandIn::default();
        for id in [first, second] {
            let queued = (NotificationStatus::Queued, Utc::now());
            store.rows.lock().expect("rows").insert(id, queued);
        }
        store
            .tries
            .lock()
            .expect("tries")
            .extend([Try::CommitUnseen, Try::Refuse]);
        let published = Mutex::new(Vec::new());
        let publish =
            |events: WriteEvents| published.lock().expect("events").extend(events.into_vec());

        write_batch(&store, vec![sent(first, 1), sent(second, 4)], &publish).await;

        let published = published.into_inner().expect("events");
        let mut events: Vec<(Uuid, &str)> = published
            .iter()
            .map(|event| (event.notification_id, event.status.as_str()))
            .collect();
        events.sort();
        let mut expected = vec![(first, "sent"), (second, "sent")];
        expected.sort();
        assert_eq!(events, expected, "the events of the unseen commit");
    }

    fn waiting(pending: usize, oldest_waited_ms: u64) -> Waiting {
        Waiting {
            pending,
            oldest_waited: Some(Duration::from_millis(oldest_waited_ms)),
            drain: false,
        }
    }

    #[test]
    fn after_a_flush_the_next_waits_until_its_oldest_record_is_an_interval_old() {
        let settings = StatusWriterSettings {
            max_batch: 100,
            flush_interval_ms: 5,
        };
        let after = |waiting: Waiting| next_flush_in(&settings, &waiting);
        assert_eq!(after(waiting(10, 2)), Some(Duration::from_millis(3)));
        assert_eq!(after(waiting(10, 5)), Some(Duration::ZERO));
        assert_eq!(after(waiting(10, 40)), Some(Duration::ZERO), "overdue");
        assert_eq!(after(waiting(100, 0)), Some(Duration::ZERO), "full");
        let draining = Waiting {
            drain: true,
            ..waiting(1, 0)
        };
        assert_eq!(after(draining), Some(Duration::ZERO), "shutdown waits");
        assert_eq!(after(waiting(0, 0)), None, "nothing to write");
    }
}
