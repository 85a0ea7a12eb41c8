//! Writes that race another writer on the same rows, against the suite's database (SQLite or
//! PostgreSQL, as `HERALD_TEST_DB` says): retention deletes only what is still old and final when
//! it deletes, not what it read a moment before, an instance whose bulk batch lease was taken
//! over changes the batch no more, a dead push token's removal keeps what another write changed
//! meanwhile, and concurrent saves of a template each get a version of their own.

use std::time::Duration;

use chrono::{SubsecRound, Utc};
use herald_entities::repo::{
    self,
    status_batch::{NewAttempt, StatusChange},
};
use herald_entities::{NotificationStatus, delivery_attempt};
use herald_tests::{
    DatabaseKind, E2E_TIMEOUT, TestDatabase, eventually, migrated, queued_notification,
};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait, PaginatorTrait,
    QueryFilter, Statement, TransactionTrait,
};
use uuid::Uuid;

/// Returns once a writer of the test waits for a lock another transaction holds. PostgreSQL shows
/// it (a lock not granted in `pg_locks`); SQLite does not (a waiting writer sleeps in its busy
/// handler), so there the writer is awaited until it holds a connection of `db`'s pool (the test
/// holds none of it meanwhile), then given half a second more to reach the lock.
async fn a_writer_waits_for_a_lock(database: &TestDatabase, db: &DatabaseConnection) {
    if database.kind() == DatabaseKind::Sqlite {
        let pool = db.get_sqlite_connection_pool();
        eventually("the writer to take a connection", E2E_TIMEOUT, || async {
            (pool.size() as usize > pool.num_idle()).then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        return;
    }
    let waiting = Statement::from_string(
        DbBackend::Postgres,
        "SELECT count(*) AS waiting FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE NOT l.granted AND a.datname = current_database()",
    );
    eventually("a writer waiting for a lock", E2E_TIMEOUT, || async {
        let row = db.query_one_raw(waiting.clone()).await.ok()??;
        let count: i64 = row.try_get("", "waiting").ok()?;
        (count > 0).then_some(())
    })
    .await;
}

/// A dead notification replayed (`dead → queued`) between retention's read of old final rows and
/// its delete used to be deleted while its replayed command was on its way: the delete filtered
/// by id alone. The delete now repeats the status and age conditions, so the replayed
/// notification stays; the old `sent` one goes, with its attempts.
#[tokio::test]
async fn a_notification_replayed_while_retention_runs_is_kept() {
    let database = TestDatabase::from_env().await.expect("test database");
    let db = migrated(database.url()).await.expect("database migrated");
    let month_ago = Utc::now() - chrono::Duration::days(30);
    // Created when they were last changed (retention asks for both to be old).
    let old = || herald_entities::repo::notifications::NewNotification {
        created_at: month_ago,
        ..queued_notification(None)
    };
    let (dead, sent) = (old(), old());
    let (dead_id, sent_id) = (dead.id, sent.id);
    repo::notifications::insert_many(&db, vec![dead, sent])
        .await
        .expect("stored");
    let changes = [
        StatusChange {
            at: month_ago,
            ..StatusChange::to(dead_id, NotificationStatus::Dead)
        },
        StatusChange {
            at: month_ago,
            ..StatusChange::to(sent_id, NotificationStatus::Sent)
        },
    ];
    let attempt = NewAttempt {
        notification_id: sent_id,
        attempt_no: 1,
        channel: "email".into(),
        provider: "smtp".into(),
        status: "sent".into(),
        error: None,
        provider_message_id: None,
        latency_ms: 3,
        at: month_ago,
    };
    repo::status_batch::apply(&db, &changes, &[attempt])
        .await
        .expect("old final rows written");

    // A replay on another connection, not yet committed when retention reads.
    let replayer = herald_entities::connect(database.url(), 1)
        .await
        .expect("second pool");
    let replay = replayer.begin().await.expect("replay begins");
    assert!(
        repo::dead_letters::requeue_dead(
            &replay,
            dead_id,
            &repo::dead_letters::PendingReplay::new(1)
        )
        .await
        .expect("requeued"),
    );
    let purge = tokio::spawn({
        let db = db.clone();
        async move {
            let cutoff = Utc::now() - chrono::Duration::days(1);
            repo::schedule::purge_before(&db, cutoff, 100).await
        }
    });
    // Retention has read both rows and waits for the replay's lock to delete them.
    a_writer_waits_for_a_lock(&database, &db).await;
    assert!(!purge.is_finished(), "retention waits for the replay");
    replay.commit().await.expect("replay committed");
    let purged = purge
        .await
        .expect("retention ran")
        .expect("retention succeeded");
    let expected = repo::schedule::Purged {
        chosen: 2,
        removed: 1,
    };
    assert_eq!(purged, expected, "both chosen, the replayed one kept");

    let replayed = repo::notifications::find(&db, dead_id)
        .await
        .expect("read")
        .expect("the replayed notification is kept");
    assert_eq!(replayed.status, NotificationStatus::Queued);
    assert!(
        repo::notifications::find(&db, sent_id)
            .await
            .expect("read")
            .is_none(),
        "the old sent notification is gone"
    );
    let attempts = delivery_attempt::Entity::find()
        .filter(delivery_attempt::Column::NotificationId.eq(sent_id))
        .count(&db)
        .await
        .expect("attempts counted");
    assert_eq!(attempts, 0, "its attempts went with it");
}

/// A retention run whose batch held a notification replayed meanwhile went no further: it
/// stopped when a batch removed fewer than it chose, taken for the last batch, and left the old
/// notifications behind it for the next run. It now stops only when fewer are left to choose.
#[tokio::test]
async fn a_retention_run_goes_on_past_a_notification_replayed_meanwhile() {
    let database = TestDatabase::from_env().await.expect("test database");
    let db = migrated(database.url()).await.expect("database migrated");
    // The dead one is the oldest and stored first, so the first batch of one chooses it (read
    // on the index on `created_at`, or in the table's order).
    let old = |status, days| herald_entities::repo::notifications::NewNotification {
        status,
        created_at: Utc::now() - chrono::Duration::days(days),
        ..queued_notification(None)
    };
    let dead = old(NotificationStatus::Dead, 31);
    let sent = old(NotificationStatus::Sent, 30);
    let (dead_id, sent_id) = (dead.id, sent.id);
    repo::notifications::insert_many(&db, vec![dead, sent])
        .await
        .expect("stored");

    let replayer = herald_entities::connect(database.url(), 1)
        .await
        .expect("second pool");
    let replay = replayer.begin().await.expect("replay begins");
    let pending = repo::dead_letters::PendingReplay::new(1);
    assert!(
        repo::dead_letters::requeue_dead(&replay, dead_id, &pending)
            .await
            .expect("requeued"),
    );
    let purge = tokio::spawn({
        let db = db.clone();
        async move {
            let cutoff = Utc::now() - chrono::Duration::days(1);
            let stop = tokio_util::sync::CancellationToken::new();
            herald_actors::scheduler::purge(&db, cutoff, 1, &stop).await
        }
    });
    a_writer_waits_for_a_lock(&database, &db).await;
    replay.commit().await.expect("replay committed");
    let removed = purge
        .await
        .expect("retention ran")
        .expect("retention succeeded");

    assert_eq!(removed, 1, "the old sent notification went");
    assert!(
        repo::notifications::find(&db, sent_id)
            .await
            .expect("read")
            .is_none(),
        "the old sent notification behind the replayed one is gone"
    );
    let replayed = repo::notifications::find(&db, dead_id)
        .await
        .expect("read")
        .expect("the replayed notification is kept");
    assert_eq!(replayed.status, NotificationStatus::Queued);
}

/// An instance whose page outlived its lease, while another took the batch over, changed the
/// batch as if it still held it: its `advance` turned the other's `done` back into `running` with
/// its own older cursor, its `release` freed the other's lease. Each now changes nothing and says
/// so, and the holder's changes apply.
#[tokio::test]
async fn an_instance_that_lost_its_batch_lease_changes_nothing() {
    let database = TestDatabase::from_env().await.expect("test database");
    let db = migrated(database.url()).await.expect("database migrated");
    let id = Uuid::now_v7();
    let new = repo::batches::NewBatch {
        id,
        request_id: None,
        request_fingerprint: None,
        spec: serde_json::json!({}),
        total: 20,
        accepted_at: Utc::now(),
    };
    repo::batches::create(&db, new)
        .await
        .expect("batch created");

    let lease = chrono::Duration::seconds(30);
    let first_at = Utc::now();
    let first = first_at + lease;
    repo::batches::lease_next(&db, first_at, first)
        .await
        .expect("lease read")
        .expect("the first instance takes the batch");
    // Its page takes longer than the lease: the second instance takes the batch over.
    let second_at = first + chrono::Duration::seconds(1);
    let second = second_at + lease;
    let taken = repo::batches::lease_next(&db, second_at, second)
        .await
        .expect("lease read")
        .expect("the second instance takes the batch over");
    assert_eq!(taken.id, id);

    let later = second + lease;
    assert!(
        !repo::batches::advance(&db, id, first, "5", 5, false, later)
            .await
            .expect("advance ran"),
        "the first instance's page is not recorded"
    );
    assert!(
        !repo::batches::release(&db, id, first)
            .await
            .expect("release ran"),
        "nor is its release"
    );
    let batch = repo::batches::find(&db, id)
        .await
        .expect("read")
        .expect("batch");
    // PostgreSQL keeps times to the microsecond.
    assert_eq!(
        batch.lease_until.map(|at| at.trunc_subsecs(6)),
        Some(second.trunc_subsecs(6)),
        "the second instance keeps its lease"
    );
    assert_eq!(batch.cursor, None);

    assert!(
        repo::batches::advance(&db, id, second, "10", 10, false, later)
            .await
            .expect("advance ran"),
        "the holder's page is recorded"
    );
    assert!(
        repo::batches::advance(&db, id, later, "20", 20, true, later + lease)
            .await
            .expect("advance ran"),
        "the renewed lease is the holder's token"
    );
    assert!(
        !repo::batches::advance(&db, id, second, "15", 15, false, later)
            .await
            .expect("advance ran"),
        "a finished batch stays finished"
    );
    assert!(
        !repo::batches::fail(&db, id, first, "late failure")
            .await
            .expect("fail ran"),
        "nor does a lost lease fail it"
    );
    let batch = repo::batches::find(&db, id)
        .await
        .expect("read")
        .expect("batch");
    assert_eq!(batch.status, "done");
    assert_eq!(batch.published, 20);
    assert_eq!(batch.cursor.as_deref(), Some("20"));
    assert_eq!(batch.error, None);
}

/// A push token a provider declared dead was removed by reading the customer's list and writing
/// it back without the token, whatever happened in between: a token a `PUT /customers/{id}`
/// added meanwhile was lost. The write now applies only to the list it read, and reads again
/// otherwise. Here the PUT holds its write open while the removal reads, and commits before the
/// removal writes.
#[tokio::test]
async fn a_push_token_added_while_a_dead_one_is_removed_is_kept() {
    use repo::customers::{self, CustomerFields};
    let database = TestDatabase::from_env().await.expect("test database");
    let db = migrated(database.url()).await.expect("database migrated");
    let fields = |tokens: &[&str]| CustomerFields {
        push_tokens: tokens.iter().map(|t| t.to_string()).collect(),
        locale: "en".into(),
        timezone: "UTC".into(),
        ..Default::default()
    };
    customers::create(&db, "ada", fields(&["dead", "old"]))
        .await
        .expect("customer stored")
        .expect("a new customer");

    let other = herald_entities::connect(database.url(), 1)
        .await
        .expect("second pool");
    let put = other.begin().await.expect("PUT begins");
    customers::update(&put, "ada", fields(&["dead", "old", "new"]))
        .await
        .expect("PUT written")
        .expect("the customer exists");
    let removal = tokio::spawn({
        let db = db.clone();
        async move { customers::remove_push_token(&db, "ada", "dead").await }
    });
    // The removal has read the list and waits for the PUT's lock to write it.
    a_writer_waits_for_a_lock(&database, &db).await;
    assert!(!removal.is_finished(), "the removal waits for the PUT");
    put.commit().await.expect("PUT committed");
    let removed = removal
        .await
        .expect("removal ran")
        .expect("removal succeeded");
    assert!(removed, "the dead token was there to remove");

    let stored = customers::find_by_external_id(&db, "ada")
        .await
        .expect("read")
        .expect("stored");
    assert_eq!(
        customers::push_tokens(&stored),
        ["old", "new"],
        "the token the PUT added is kept, the dead one is gone"
    );
}

/// Two saves of one template variant at once both read version N and both stored N + 1: the
/// second replaced the first's sources under the same version. The version is now incremented in
/// the UPDATE itself. Here one save holds its write open while the other reads.
#[tokio::test]
async fn concurrent_saves_of_a_template_each_get_a_version() {
    use repo::templates::{self, Saved, TemplateVariant};
    let database = TestDatabase::from_env().await.expect("test database");
    let db = migrated(database.url()).await.expect("database migrated");
    let variant = |text: &str| TemplateVariant {
        code: "welcome".into(),
        locale: "en".into(),
        description: "Welcome".into(),
        category: None,
        subject: None,
        text: text.into(),
        html: None,
        short: None,
        variables: vec![],
    };
    let Saved::Created(created) = templates::save(&db, variant("v1")).await.expect("saved") else {
        panic!("a new template");
    };
    assert_eq!(created.version, 1);

    let other = herald_entities::connect(database.url(), 1)
        .await
        .expect("second pool");
    let first = other.begin().await.expect("first save begins");
    let Saved::Updated(first_saved) = templates::save(&first, variant("first"))
        .await
        .expect("first save written")
    else {
        panic!("an update");
    };
    let second = tokio::spawn({
        let db = db.clone();
        async move { templates::save(&db, variant("second")).await }
    });
    // The second save has read the variant and waits for the first's lock to write it.
    a_writer_waits_for_a_lock(&database, &db).await;
    assert!(!second.is_finished(), "the second save waits for the first");
    first.commit().await.expect("first save committed");
    let Saved::Updated(second_saved) = second
        .await
        .expect("second save ran")
        .expect("second save succeeded")
    else {
        panic!("an update");
    };
    assert_eq!(first_saved.version, 2);
    assert_eq!(
        second_saved.version, 3,
        "each save gets a version of its own"
    );

    let stored = templates::find(&db, "welcome", "en")
        .await
        .expect("read")
        .expect("stored");
    assert_eq!((stored.version, stored.text.as_str()), (3, "second"));
}

/// The API's confirmation of a send's first publish, landing late (it comes in batches) after
/// the notification died and was requeued by a replay, leaves the replay's mark: a replay that
/// then stops is still found by the Scheduler's sweep. Two requeues of one letter publish under
/// message ids of their own.
#[tokio::test]
async fn a_late_first_publish_confirmation_leaves_a_replay_s_mark() {
    use repo::dead_letters::{PendingReplay, requeue_dead};
    let database = TestDatabase::from_env().await.expect("test database");
    let db = migrated(database.url()).await.expect("database migrated");
    let row = queued_notification(None);
    let id = row.id;
    repo::notifications::insert_many(&db, vec![row])
        .await
        .expect("stored");
    repo::status_batch::apply(&db, &[StatusChange::to(id, NotificationStatus::Dead)], &[])
        .await
        .expect("dead");
    let replay = PendingReplay::new(7);
    assert_ne!(
        replay.msg_id(id),
        PendingReplay::new(7).msg_id(id),
        "each requeue of a letter has a message id of its own"
    );
    assert!(requeue_dead(&db, id, &replay).await.expect("requeued"));
    repo::schedule::confirm_published(&db, &[id])
        .await
        .expect("late confirmation");
    let stored = repo::notifications::find(&db, id)
        .await
        .expect("read")
        .expect("stored");
    assert_eq!(stored.status_reason, Some(replay.mark()), "the mark stays");
    let later = Utc::now() + chrono::Duration::seconds(1);
    let stale = repo::schedule::stale_claims(&db, later, 10)
        .await
        .expect("sweep");
    assert_eq!(
        stale.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![id],
        "the Scheduler's sweep finds the unfinished replay"
    );
    assert_eq!(PendingReplay::of(&stale[0]), Some(replay));
}
