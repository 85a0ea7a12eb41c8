//! The StatusWriter against the suite's database (SQLite or PostgreSQL, as `HERALD_TEST_DB` says):
//! a record that arrives alone is written by the next batch, one interval later, and a flush (as at
//! shutdown) writes it at once. A provider's reply with a NUL byte in it is stored with U+FFFD in
//! its place, a late failure never turns a `sent` notification `failed` (nor is it published), and
//! a batch written again (its commit unconfirmed) records each attempt once and reports the
//! changes its first commit made.

use std::time::Duration;

use herald_actors::status_writer::{
    AfterWrite, StatusRecord, StatusWriter, StatusWriterArgs, StatusWriterMsg, StatusWriterSettings,
};
use herald_entities::repo::{
    self,
    status_batch::{NewAttempt, StatusChange},
};
use herald_entities::{Checkpoints, NotificationStatus, WriteGate};
use herald_nats::{Publisher, StreamSettings};
use herald_tests::{
    NatsServer, TestDatabase, eventually, queued_notification, status_events, stored_status,
};
use ractor::{Actor, ActorRef};
use sea_orm::DatabaseConnection;
use uuid::Uuid;

/// Longest the test waits for a mark to be written, or for the writer to answer.
const WAIT: Duration = Duration::from_secs(10);

fn mark(id: Uuid) -> StatusWriterMsg {
    record(StatusChange::to(id, NotificationStatus::Processing))
}

/// A record of `change` alone.
fn record(change: StatusChange) -> StatusWriterMsg {
    StatusWriterMsg::Record(Box::new(StatusRecord {
        changes: vec![change],
        attempts: vec![],
        then: AfterWrite::Nothing,
        permit: None,
    }))
}

/// Has `writer` write what it received, and waits until it is written.
async fn flush(writer: &ActorRef<StatusWriterMsg>) {
    let flushed = ractor::call_t!(writer, StatusWriterMsg::Flush, WAIT.as_millis() as u64);
    flushed.expect("flushed");
}

async fn writer(
    database: &TestDatabase,
    nats: &NatsServer,
    flush_interval_ms: u64,
) -> ActorRef<StatusWriterMsg> {
    let client = nats.client().await.expect("NATS client");
    let args = StatusWriterArgs {
        database_url: database.url().to_owned(),
        checkpoints: Checkpoints::OnCommit,
        gate: WriteGate::for_url(database.url()),
        // Marks publish no status event: no stream is needed.
        publisher: Publisher::new(async_nats::jetstream::new(client), 8),
        settings: StatusWriterSettings {
            max_batch: 1_000,
            flush_interval_ms,
        },
    };
    let (writer, _) = Actor::spawn(None, StatusWriter, args)
        .await
        .expect("writer started");
    writer
}

#[tokio::test]
async fn a_lone_record_is_written_by_the_next_batch_or_at_once_by_a_flush() {
    let database = TestDatabase::from_env().await.expect("database");
    let nats = NatsServer::start().await.expect("nats-server");
    let mut config = herald_engine::Config::default();
    config.database.url = database.url().to_owned();
    let db = herald_engine::app::migrate(&config)
        .await
        .expect("migrated");
    let rows = vec![queued_notification(None), queued_notification(None)];
    let (alone, flushed) = (rows[0].id, rows[1].id);
    repo::notifications::insert_many(&db, rows)
        .await
        .expect("stored");

    // Nothing else arrives: the next batch, one interval later, writes the mark.
    let ticking = writer(&database, &nats, 5).await;
    ticking.cast(mark(alone)).expect("sent");
    eventually("the lone mark written", WAIT, || async {
        (stored_status(&db, alone).await == NotificationStatus::Processing).then_some(())
    })
    .await;

    // No batch would come for a minute: the flush (as at shutdown) writes the mark at once.
    let slow = writer(&database, &nats, 60_000).await;
    slow.cast(mark(flushed)).expect("sent");
    let flush = ractor::call_t!(slow, StatusWriterMsg::Flush, WAIT.as_millis() as u64);
    flush.expect("flushed");
    assert_eq!(
        stored_status(&db, flushed).await,
        NotificationStatus::Processing
    );

    ticking.stop(None);
    slow.stop(None);
}

/// A migrated test database holding one `queued` notification, and its id.
async fn one_queued_notification() -> (TestDatabase, DatabaseConnection, Uuid) {
    let database = TestDatabase::from_env().await.expect("test database");
    let db = herald_tests::migrated(database.url())
        .await
        .expect("migrated");
    let row = queued_notification(None);
    let id = row.id;
    repo::notifications::insert(&db, row).await.expect("stored");
    (database, db, id)
}

/// A Telegram 500 whose body held a NUL byte: PostgreSQL refuses NUL in text (22021), so the
/// whole batch failed, row by row too, and the notification stayed `processing`. The NUL is
/// stored as U+FFFD, in the status change and in the attempt alike.
#[tokio::test]
async fn a_nul_in_a_provider_reply_is_stored_as_a_replacement_character() {
    let (_database, db, id) = one_queued_notification().await;

    let change = StatusChange {
        error: Some("HTTP 500: {\"ok\":false}\0".into()),
        reason: Some("every channel refused\0".into()),
        final_channel: Some("tele\0gram".into()),
        attempts: Some(1),
        ..StatusChange::to(id, NotificationStatus::Failed)
    };
    let attempt = NewAttempt {
        notification_id: id,
        attempt_no: 1,
        channel: "telegram\0".into(),
        provider: "telegram\0".into(),
        status: "failed\0".into(),
        error: Some("HTTP 500: {\"ok\":false}\0".into()),
        provider_message_id: Some("\0".into()),
        latency_ms: 12,
        at: chrono::Utc::now(),
    };
    repo::status_batch::apply(&db, &[change], &[attempt])
        .await
        .expect("the batch is written");

    let (stored, attempts) = repo::notifications::find_with_attempts(&db, id)
        .await
        .expect("read")
        .expect("stored");
    assert_eq!(stored.status, NotificationStatus::Failed);
    assert_eq!(
        stored.error.as_deref(),
        Some("HTTP 500: {\"ok\":false}\u{FFFD}")
    );
    assert_eq!(
        stored.status_reason.as_deref(),
        Some("every channel refused\u{FFFD}")
    );
    assert_eq!(stored.final_channel.as_deref(), Some("tele\u{FFFD}gram"));
    let [attempt] = attempts.as_slice() else {
        panic!("one attempt: {attempts:?}");
    };
    assert_eq!(attempt.channel, "telegram\u{FFFD}");
    assert_eq!(attempt.provider, "telegram\u{FFFD}");
    assert_eq!(attempt.status, "failed\u{FFFD}");
    assert_eq!(
        attempt.error.as_deref(),
        Some("HTTP 500: {\"ok\":false}\u{FFFD}")
    );
    assert_eq!(attempt.provider_message_id.as_deref(), Some("\u{FFFD}"));
}

/// A redelivered command's dispatcher result (a failure on another channel, say) arrives after
/// the first delivery recorded `sent`: the notification stays `sent`. Only a receipt's bounce
/// moves `sent` to `failed`, with its own UPDATE.
#[tokio::test]
async fn a_late_failure_never_turns_sent_into_failed() {
    let (_database, db, id) = one_queued_notification().await;

    let sent = StatusChange {
        final_channel: Some("email".into()),
        ..StatusChange::to(id, NotificationStatus::Sent)
    };
    repo::status_batch::apply(&db, &[sent], &[])
        .await
        .expect("sent written");
    let failed = StatusChange {
        error: Some("550 mailbox unavailable".into()),
        reason: Some("every channel refused permanently".into()),
        ..StatusChange::to(id, NotificationStatus::Failed)
    };
    repo::status_batch::apply(&db, &[failed], &[])
        .await
        .expect("the late failure is a no-op, not an error");

    let stored = repo::notifications::find(&db, id)
        .await
        .expect("read")
        .expect("stored");
    assert_eq!(stored.status, NotificationStatus::Sent);
    assert_eq!(stored.error, None);
    assert_eq!(stored.final_channel.as_deref(), Some("email"));
}

/// A batch whose `COMMIT` went through while the connection broke is an outage to the
/// StatusWriter, which writes the batch again: every attempt in it used to be inserted a second
/// time, under a fresh id. Written again, the batch leaves one row per attempt, and two attempts
/// that share a number (a race between two deliveries) stay two rows.
#[tokio::test]
async fn a_batch_written_again_records_each_attempt_once() {
    let database = TestDatabase::from_env().await.expect("test database");
    let db = herald_tests::migrated(database.url())
        .await
        .expect("migrated");
    let (first, second) = (queued_notification(None), queued_notification(None));
    let (first_id, second_id) = (first.id, second.id);
    repo::notifications::insert_many(&db, vec![first, second])
        .await
        .expect("stored");
    let now = chrono::Utc::now();
    let attempt = |notification_id: Uuid, attempt_no: i32, channel: &str, millis: i64| NewAttempt {
        notification_id,
        attempt_no,
        channel: channel.into(),
        provider: channel.into(),
        status: "failed".into(),
        error: Some("timed out".into()),
        provider_message_id: None,
        latency_ms: 30,
        at: now + chrono::Duration::milliseconds(millis),
    };
    let attempts = [
        attempt(first_id, 1, "email", 0),
        attempt(first_id, 2, "sms", 5),
        attempt(second_id, 1, "email", 7),
    ];
    let changes = [
        StatusChange {
            attempts: Some(2),
            ..StatusChange::to(first_id, NotificationStatus::Sent)
        },
        StatusChange {
            attempts: Some(1),
            ..StatusChange::to(second_id, NotificationStatus::Sent)
        },
    ];
    for _ in 0..2 {
        repo::status_batch::apply(&db, &changes, &attempts)
            .await
            .expect("the batch is written");
    }
    let stored = |id| {
        let db = db.clone();
        async move {
            let (_, attempts) = repo::notifications::find_with_attempts(&db, id)
                .await
                .expect("read")
                .expect("stored");
            let mut numbers: Vec<(i32, String)> = attempts
                .into_iter()
                .map(|a| (a.attempt_no, a.channel))
                .collect();
            numbers.sort();
            numbers
        }
    };
    assert_eq!(
        stored(first_id).await,
        [(1, "email".to_string()), (2, "sms".to_string())],
        "one row per attempt of the first notification"
    );
    assert_eq!(stored(second_id).await, [(1, "email".to_string())]);

    // Another attempt numbered 1 of the second notification, finished later: a second row.
    let raced = attempt(second_id, 1, "email", 9);
    repo::status_batch::apply(&db, &[], std::slice::from_ref(&raced))
        .await
        .expect("written");
    assert_eq!(
        stored(second_id).await.len(),
        2,
        "a distinct attempt is kept"
    );
}

/// Two deliveries of one notification at once (a command redelivered while its first delivery
/// still ran): the first records `sent`; the second's late failure is refused by the database, yet
/// its `failed` event used to be published all the same, so that observers saw `sent`, then
/// `failed`, for a notification stored `sent`. Only the changes the database made are published.
#[tokio::test]
async fn a_change_the_database_refused_is_not_published() {
    let (database, db, id) = one_queued_notification().await;
    let other = queued_notification(None);
    let other_id = other.id;
    repo::notifications::insert(&db, other)
        .await
        .expect("stored");
    let nats = NatsServer::start().await.expect("nats-server");
    let js = async_nats::jetstream::new(nats.client().await.expect("NATS client"));
    herald_nats::provision(&js, &StreamSettings::default())
        .await
        .expect("streams provisioned");
    // Batches are written when flushed, never on their own.
    let writer = writer(&database, &nats, 60_000).await;

    writer
        .cast(record(StatusChange {
            final_channel: Some("email".into()),
            ..StatusChange::to(id, NotificationStatus::Sent)
        }))
        .expect("sent");
    flush(&writer).await;
    eventually("the sent event", WAIT, || async {
        (status_events(&nats, "sent", id).await.len() == 1).then_some(())
    })
    .await;

    // The late failure, and in the same batch after it another notification's change: the batch's
    // events are published in order by one task, so once the other's is stored, the failure's
    // would be too.
    writer
        .cast(record(StatusChange {
            error: Some("550 mailbox unavailable".into()),
            reason: Some("every channel refused permanently".into()),
            ..StatusChange::to(id, NotificationStatus::Failed)
        }))
        .expect("sent");
    writer
        .cast(record(StatusChange {
            reason: Some("opted out".into()),
            ..StatusChange::to(other_id, NotificationStatus::Skipped)
        }))
        .expect("sent");
    flush(&writer).await;
    eventually("the other notification's skipped event", WAIT, || async {
        (status_events(&nats, "skipped", other_id).await.len() == 1).then_some(())
    })
    .await;
    assert_eq!(stored_status(&db, id).await, NotificationStatus::Sent);
    let failed = status_events(&nats, "failed", id).await;
    assert!(
        failed.is_empty(),
        "the refused failure of a notification stored sent was published: {failed:?}"
    );
    writer.stop(None);
}

/// What a batch reports it changed: a change the transition rules refuse did not move its
/// notification. Written again after its commit went through unconfirmed
/// ([`repo::status_batch::apply_again`]), a batch reports the changes that commit made, so their
/// events are published after all (under their first ids, which JetStream drops if they got out);
/// not a like change of another batch.
#[tokio::test]
async fn a_batch_reports_the_changes_it_made_also_when_written_again() {
    use repo::status_batch::{apply, apply_again};
    let (_database, db, id) = one_queued_notification().await;
    let sent = StatusChange {
        final_channel: Some("email".into()),
        ..StatusChange::to(id, NotificationStatus::Sent)
    };
    let batch = std::slice::from_ref(&sent);
    let moved = |result: Result<repo::status_batch::Applied, _>| {
        result.expect("the batch is written").moved(0)
    };
    assert!(moved(apply(&db, batch, &[]).await), "queued → sent");
    assert!(
        moved(apply_again(&db, batch, &[]).await),
        "written again, the batch's own change counts"
    );
    assert!(
        !moved(apply(&db, batch, &[]).await),
        "applied anew, the same change is refused (sent → sent)"
    );
    let another_delivery = StatusChange {
        at: sent.at + chrono::Duration::milliseconds(250),
        ..sent.clone()
    };
    assert!(
        !moved(apply_again(&db, &[another_delivery], &[]).await),
        "another delivery's `sent` is not this batch's"
    );
    let late_failure = StatusChange {
        error: Some("timed out".into()),
        ..StatusChange::to(id, NotificationStatus::Failed)
    };
    assert!(!moved(
        apply(&db, std::slice::from_ref(&late_failure), &[]).await
    ));
    assert!(!moved(apply_again(&db, &[late_failure], &[]).await));
    let stored = repo::notifications::find(&db, id)
        .await
        .expect("read")
        .expect("stored");
    assert_eq!(stored.status, NotificationStatus::Sent);
    assert_eq!(stored.error, None);
}

/// A batch whose outcome is unknown, written again a record at a time (after the batch failed as
/// a whole): a record's change is recognised as the batch's when given as the batch stamped it
/// ([`repo::status_batch::as_stamped`]: two changes sharing an UPDATE both carry its time, the
/// later one's), not at its own time. A notification changed twice in the batch (`processing`,
/// then `sent`) reports its `sent`, the change that has an event (`processing` has none, and the
/// batch skipped it).
#[tokio::test]
async fn changes_written_again_apart_are_recognised_as_the_batch_stamped_them() {
    use repo::status_batch::{apply, apply_again, as_stamped};
    let (_database, db, first) = one_queued_notification().await;
    let second = queued_notification(None);
    let second_id = second.id;
    repo::notifications::insert(&db, second)
        .await
        .expect("stored");
    // On a 10 ms window's start: changes a few milliseconds later share an UPDATE.
    let window = chrono::Utc::now().timestamp_millis() / 10 * 10;
    let now = chrono::DateTime::from_timestamp_millis(window).expect("valid instant");
    let change = |id, status, millis| StatusChange {
        at: now + chrono::Duration::milliseconds(millis),
        final_channel: Some("email".into()),
        ..StatusChange::to(id, status)
    };
    let batch = [
        change(first, NotificationStatus::Processing, 0),
        change(first, NotificationStatus::Sent, 1),
        change(second_id, NotificationStatus::Sent, 2),
    ];
    let moved = |result: Result<repo::status_batch::Applied, _>, index| {
        result.expect("written").moved(index)
    };
    let applied = apply(&db, &batch, &[]).await.expect("the batch is written");
    assert!(applied.moved(1) && applied.moved(2), "{applied:?}");
    let stamped = as_stamped(&batch);
    assert_eq!(stamped[1].at, batch[2].at, "the two sent share an UPDATE");
    assert!(
        moved(apply_again(&db, &stamped[..2], &[]).await, 1),
        "the first record's sent, as the batch stamped it"
    );
    assert!(
        moved(apply_again(&db, &stamped[2..], &[]).await, 0),
        "the second record's sent, as the batch stamped it"
    );
    assert!(
        !moved(apply_again(&db, &batch[..2], &[]).await, 1),
        "at its own time the first sent is not the batch's"
    );
    assert!(
        moved(apply_again(&db, &stamped, &[]).await, 1),
        "the whole batch again reports the sent of the notification it changed twice"
    );
}

/// A flush (as at shutdown) answers once the status events of what it wrote are published, not
/// as soon as they are written: it used to answer at once, and the process, stopping, exited with
/// the publishes in flight, so that observers never saw the `sent` of a notification stored
/// `sent`. Here NATS is frozen while the batch is written: the flush waits until it is back and
/// the event is stored.
#[tokio::test]
async fn a_flush_answers_once_the_events_of_what_it_wrote_are_published() {
    let (database, db, id) = one_queued_notification().await;
    let nats = NatsServer::start().await.expect("nats-server");
    let js = async_nats::jetstream::new(nats.client().await.expect("NATS client"));
    herald_nats::provision(&js, &StreamSettings::default())
        .await
        .expect("streams provisioned");
    // Batches are written when flushed, never on their own.
    let writer = writer(&database, &nats, 60_000).await;

    nats.freeze().expect("SIGSTOP");
    writer
        .cast(record(StatusChange {
            final_channel: Some("email".into()),
            ..StatusChange::to(id, NotificationStatus::Sent)
        }))
        .expect("sent");
    let mut flushing = {
        let writer = writer.clone();
        tokio::spawn(async move { flush(&writer).await })
    };
    eventually("the sent status written", WAIT, || async {
        (stored_status(&db, id).await == NotificationStatus::Sent).then_some(())
    })
    .await;
    // Written, but its event cannot be published while NATS is frozen: the flush must not answer.
    let answered_early = tokio::time::timeout(Duration::from_secs(1), &mut flushing)
        .await
        .is_ok();
    nats.resume().expect("SIGCONT");
    assert!(
        !answered_early,
        "the flush answered while the sent event was not published"
    );
    flushing.await.expect("the flush ran");
    assert_eq!(
        status_events(&nats, "sent", id).await.len(),
        1,
        "the sent event is stored by the time the flush answers"
    );
    writer.stop(None);
}

/// Stores a held receipt from `provider` moving notification `id` to `status` (any text, as a
/// row of another version could hold), as the receipt API holds one that beats the send.
async fn hold_receipt(db: &DatabaseConnection, id: Uuid, provider: &str, status: &str) {
    use sea_orm::{ConnectionTrait as _, sea_query::Query};
    let now = chrono::Utc::now();
    let insert = Query::insert()
        .into_table("held_receipts")
        .columns([
            "notification_id",
            "provider",
            "status",
            "reason",
            "error",
            "at",
            "received_at",
        ])
        .values_panic([
            id.into(),
            provider.into(),
            status.into(),
            "delivery confirmed".into(),
            Option::<String>::None.into(),
            now.into(),
            now.into(),
        ])
        .to_owned();
    db.execute(&insert).await.expect("held receipt stored");
}

/// The `sent` record of notification `id` by `provider`, and its successful attempt.
fn sent_by(id: Uuid, provider: &str) -> (StatusChange, NewAttempt) {
    let change = StatusChange {
        final_channel: Some("email".into()),
        attempts: Some(1),
        ..StatusChange::to(id, NotificationStatus::Sent)
    };
    let attempt = NewAttempt {
        notification_id: id,
        attempt_no: 1,
        channel: "email".into(),
        provider: provider.into(),
        status: "sent".into(),
        error: None,
        provider_message_id: None,
        latency_ms: 5,
        at: change.at,
    };
    (change, attempt)
}

/// A receipt held until the send is recorded is applied in the transaction that records it: one
/// that could not be applied (here one naming a status no notification has) failed the whole
/// batch, row by row too, and the `sent` was never written (the notification stayed
/// `processing`). It is now dropped, with a warning, and the batch, and the other held receipts
/// in it, are written.
#[tokio::test]
async fn a_held_receipt_that_cannot_be_applied_does_not_cost_the_send() {
    let (_database, db, broken) = one_queued_notification().await;
    let good = queued_notification(None);
    let good_id = good.id;
    repo::notifications::insert(&db, good)
        .await
        .expect("stored");
    hold_receipt(&db, broken, "smtp", "bogus").await;
    hold_receipt(&db, good_id, "smtp", "delivered").await;

    let (broken_sent, broken_attempt) = sent_by(broken, "smtp");
    let (good_sent, good_attempt) = sent_by(good_id, "smtp");
    let applied = repo::status_batch::apply(
        &db,
        &[broken_sent, good_sent],
        &[broken_attempt, good_attempt],
    )
    .await
    .expect("the batch is written");

    assert_eq!(stored_status(&db, broken).await, NotificationStatus::Sent);
    assert_eq!(
        stored_status(&db, good_id).await,
        NotificationStatus::Delivered
    );
    let moved: Vec<Uuid> = applied.receipts().iter().map(|row| row.id).collect();
    assert_eq!(moved, vec![good_id]);
}

/// A batch written again after an unconfirmed commit that had applied a held receipt: the
/// notification is `delivered` and the held receipt gone, so the retry recognised neither the
/// `sent` (no longer the status) nor the receipt, and published neither event. The `sent` now
/// counts as moved when the row was sent at this batch's time, and the receipt's move is
/// reported again (its event has the same id, so JetStream drops a copy that was out already).
#[tokio::test]
async fn a_batch_written_again_reports_the_held_receipt_its_first_commit_applied() {
    let (_database, db, id) = one_queued_notification().await;
    hold_receipt(&db, id, "smtp", "delivered").await;
    let (sent, attempt) = sent_by(id, "smtp");
    let changes = [sent];
    let attempts = [attempt];
    let first = repo::status_batch::apply(&db, &changes, &attempts)
        .await
        .expect("the batch is written");
    assert!(first.moved(0));
    assert_eq!(first.receipts().len(), 1);

    let again = repo::status_batch::apply_again(&db, &changes, &attempts)
        .await
        .expect("the batch is written again");
    assert!(again.moved(0), "the sent counts as made by this batch");
    assert_eq!(again.receipts(), first.receipts());
    assert_eq!(stored_status(&db, id).await, NotificationStatus::Delivered);
}

/// How many receipts are held for notification `id`.
async fn held_for(db: &DatabaseConnection, id: Uuid) -> u64 {
    use herald_entities::held_receipt;
    use sea_orm::{ColumnTrait as _, EntityTrait as _, PaginatorTrait as _, QueryFilter as _};
    held_receipt::Entity::find()
        .filter(held_receipt::Column::NotificationId.eq(id))
        .count(db)
        .await
        .expect("held receipts counted")
}

/// `n` queued notifications of bulk send `batch` (any id: nothing ties it to a row), each with a
/// receipt held for it.
async fn queued_with_held_receipts(db: &DatabaseConnection, n: usize, batch: Uuid) -> Vec<Uuid> {
    use herald_entities::notification;
    use sea_orm::{ColumnTrait as _, EntityTrait as _, QueryFilter as _, sea_query::Expr};
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        let row = queued_notification(None);
        ids.push(row.id);
        repo::notifications::insert(db, row).await.expect("stored");
        hold_receipt(db, ids[ids.len() - 1], "smtp", "delivered").await;
    }
    notification::Entity::update_many()
        .col_expr(notification::Column::BatchId, Expr::value(batch))
        .filter(notification::Column::Id.is_in(ids.clone()))
        .exec(db)
        .await
        .expect("batch set");
    ids
}

/// A receipt held for a notification that then ends without being sent (`failed`, `dead`,
/// `skipped` by the StatusWriter, `cancelled` by a cancel or a bulk cancel's chunk and leftovers)
/// stayed in `held_receipts` for ever, so that the one-row check of every batch with a `sent`
/// found something held, and each such batch paid the lookups of held receipts. It is now
/// dropped in the transaction that ends the notification; one held for a notification still under
/// way stays.
#[tokio::test]
async fn a_held_receipt_of_a_notification_that_ends_unsent_is_dropped() {
    use repo::schedule;
    let (database, db, waiting) = one_queued_notification().await;
    let batch = Uuid::now_v7();
    let ids = queued_with_held_receipts(&db, 7, batch).await;
    hold_receipt(&db, waiting, "smtp", "delivered").await;
    let [failed, dead, skipped, cancelled, ..] = ids[..] else {
        unreachable!("7 notifications")
    };

    let ended = [
        StatusChange::to(failed, NotificationStatus::Failed),
        StatusChange::to(dead, NotificationStatus::Dead),
        StatusChange::to(skipped, NotificationStatus::Skipped),
    ];
    let applied = repo::status_batch::apply(&db, &ended, &[])
        .await
        .expect("the batch is written");
    assert!((0..3).all(|i| applied.moved(i)), "{applied:?}");
    let outcome = schedule::cancel(&db, cancelled, "cancelled by the test")
        .await
        .expect("cancel ran");
    assert!(
        matches!(outcome, schedule::Cancel::Cancelled(_)),
        "{outcome:?}"
    );
    let chunk = schedule::cancel_batch_chunk(&db, batch, "batch cancelled", 2)
        .await
        .expect("a chunk cancelled");
    let gate = WriteGate::for_url(database.url());
    let leftovers = schedule::cancel_batch_leftovers(&db, &gate, batch, "batch cancelled")
        .await
        .expect("leftovers cancelled");
    assert_eq!(
        (chunk.ids.len(), leftovers.ids.len()),
        (2, 1),
        "the chunk cancels 2 of the batch's 3 still queued, the leftovers the last"
    );

    let mut lingering = Vec::new();
    for (id, how) in ids.iter().zip([
        "failed",
        "dead",
        "skipped",
        "cancelled",
        "bulk chunk",
        "bulk chunk",
        "bulk leftover",
    ]) {
        if held_for(&db, *id).await > 0 {
            lingering.push(how);
        }
    }
    assert!(
        lingering.is_empty(),
        "receipts still held for the notifications ended so: {lingering:?}"
    );
    assert_eq!(
        held_for(&db, waiting).await,
        1,
        "the receipt held for a notification still queued stays"
    );
}

/// A held receipt that no send will apply, left behind by an earlier version (its notification
/// `cancelled`, or `sent` without it), stayed for ever: retention deleted it only with its
/// notification, and never while retention was off. The clean-up now removes it, and keeps the one
/// held for a notification that may still be sent.
#[tokio::test]
async fn the_clean_up_removes_held_receipts_that_no_send_will_apply() {
    use repo::schedule;
    let (_database, db, waiting) = one_queued_notification().await;
    let rows = [queued_notification(None), queued_notification(None)];
    let [cancelled, sent] = [rows[0].id, rows[1].id];
    for row in rows {
        repo::notifications::insert(&db, row).await.expect("stored");
    }
    schedule::cancel(&db, cancelled, "cancelled by the test")
        .await
        .expect("cancelled");
    let (sent_change, attempt) = sent_by(sent, "smtp");
    repo::status_batch::apply(&db, &[sent_change], &[attempt])
        .await
        .expect("sent");
    // As an earlier version left them.
    for id in [waiting, cancelled, sent] {
        hold_receipt(&db, id, "smtp", "delivered").await;
    }

    let removed = repo::receipts::drop_stranded(&db)
        .await
        .expect("the clean-up ran");
    assert_eq!(
        removed, 2,
        "the receipts held for the cancelled and the sent one"
    );

    assert_eq!(
        held_for(&db, cancelled).await,
        0,
        "held for a cancelled one"
    );
    assert_eq!(held_for(&db, sent).await, 0, "held for a sent one");
    assert_eq!(held_for(&db, waiting).await, 1, "held for a queued one");
    assert_eq!(stored_status(&db, sent).await, NotificationStatus::Sent);
}

/// A held receipt dropped because its notification failed, whose row does not read (on SQLite, a
/// provider stored as a BLOB, as a hand edit could leave): decoding the `DELETE … RETURNING` row
/// failed the whole batch, the `failed` with it. It is now dropped and counted all the same.
#[tokio::test]
async fn an_unreadable_held_receipt_never_costs_the_batch_its_failure() {
    use sea_orm::ConnectionTrait as _;
    let (database, db, id) = one_queued_notification().await;
    if database.kind() != herald_tests::DatabaseKind::Sqlite {
        eprintln!("skipped: only SQLite stores a BLOB in a text column");
        return;
    }
    hold_receipt(&db, id, "smtp", "delivered").await;
    db.execute_unprepared("UPDATE held_receipts SET provider = X'00ff'")
        .await
        .expect("provider made a BLOB");
    let failed = StatusChange {
        reason: Some("every channel refused".into()),
        ..StatusChange::to(id, NotificationStatus::Failed)
    };
    repo::status_batch::apply(&db, &[failed], &[])
        .await
        .expect("the batch is written");

    assert_eq!(stored_status(&db, id).await, NotificationStatus::Failed);
    assert_eq!(held_for(&db, id).await, 0, "the held receipt is dropped");
}

/// A held receipt applied when the send is recorded reports the notification as the database
/// holds it (the row is no longer read back after the move: the move is applied to the row read
/// before it), a bounce with its error too.
#[tokio::test]
async fn a_held_receipt_applied_reports_the_notification_as_stored() {
    use sea_orm::{ConnectionTrait as _, sea_query::Query};
    let (_database, db, id) = one_queued_notification().await;
    hold_receipt(&db, id, "smtp", "failed").await;
    let with_error = Query::update()
        .table("held_receipts")
        .value("error", "550 5.1.1 mailbox unknown")
        .value("reason", "bounced (smtp)")
        .to_owned();
    db.execute(&with_error).await.expect("held receipt changed");
    let (sent, attempt) = sent_by(id, "smtp");
    let applied = repo::status_batch::apply(&db, &[sent], &[attempt])
        .await
        .expect("the batch is written");

    let stored = repo::notifications::find(&db, id)
        .await
        .expect("read")
        .expect("stored");
    assert_eq!(applied.receipts(), std::slice::from_ref(&stored));
    assert_eq!(stored.status, NotificationStatus::Failed);
    assert_eq!(stored.error.as_deref(), Some("550 5.1.1 mailbox unknown"));
    assert_eq!(held_for(&db, id).await, 0, "the applied receipt is gone");
}
