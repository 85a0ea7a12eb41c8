//! Migrations applied by several instances at once.

use std::time::Duration;

use herald_tests::TestDatabase;

/// Instances of a cluster started together each apply pending migrations on start
/// (`database.migrate_on_start`); all of them must come up.
#[tokio::test]
async fn instances_migrating_one_database_at_once_all_succeed() {
    let db = TestDatabase::from_env().await.expect("database");
    let mut config = herald_engine::Config::default();
    config.database.url = db.url().to_string();
    let runs = (0..4).map(|_| {
        let config = config.clone();
        tokio::spawn(async move { herald_engine::app::migrate(&config).await.map(|_| ()) })
    });
    // Bounded: instances that wait for each other forever must fail the test, not hang it.
    let outcomes = tokio::time::timeout(Duration::from_secs(120), futures::future::join_all(runs))
        .await
        .expect("the instances finished migrating within 120 s (did they wait for each other?)");
    for (i, run) in outcomes.into_iter().enumerate() {
        let outcome = run.expect("joined");
        if let Err(err) = outcome {
            panic!("instance {i} did not start: {err:#}");
        }
    }
}

/// An SQLite URL may escape characters of its path (`%20` for a space), as sqlx decodes them:
/// the folder Herald creates and the migration lock beside the file are at the decoded path, the
/// one sqlx opens.
#[tokio::test]
async fn an_escaped_sqlite_path_is_created_and_locked_where_sqlx_opens_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = herald_engine::Config::default();
    config.database.url = format!(
        "sqlite://{}/new%20folder/herald%20data.db?mode=rwc",
        dir.path().display()
    );
    herald_engine::app::migrate(&config)
        .await
        .expect("migrated at the decoded path");
    let folder = dir.path().join("new folder");
    assert!(folder.join("herald data.db").is_file(), "the database file");
    assert!(
        folder.join("herald data.db-migrations.lock").is_file(),
        "the migration lock beside it"
    );
    assert!(
        !dir.path().join("new%20folder").exists(),
        "no folder named with the escape"
    );
}

/// `m20261206_000801` lets quiet hours go without a time zone of their own, keeping the rows
/// stored before; rolled back, the ones without take their customer's zone (UTC without a
/// customer) and the column is required again.
#[tokio::test]
async fn quiet_hours_time_zones_become_optional_and_back() {
    use herald_entities::{customer, quiet_hours};
    use herald_migration::{Migrator, MigratorTrait};
    use sea_orm::{ActiveValue::Set, ConnectionTrait, EntityTrait};

    let db = TestDatabase::from_env().await.expect("database");
    let conn = herald_tests::migrated(db.url()).await.expect("migrated");
    let night = |customer: &str, timezone: Option<&str>| quiet_hours::ActiveModel {
        customer_id: Set(customer.to_string()),
        starts: Set("22:00".into()),
        ends: Set("07:00".into()),
        timezone: Set(timezone.map(str::to_string)),
        updated_at: Set(chrono::Utc::now()),
    };
    let now = chrono::Utc::now();
    customer::Entity::insert(customer::ActiveModel {
        id: Set(uuid::Uuid::now_v7()),
        external_id: Set("ada".into()),
        name: Set(None),
        email: Set(None),
        phone: Set(None),
        telegram_chat_id: Set(None),
        push_tokens: Set(serde_json::json!([])),
        webhook_url: Set(None),
        webhook_secret: Set(None),
        previous_webhook_secret: Set(None),
        webhook_secret_replaced_at: Set(None),
        locale: Set("en".into()),
        timezone: Set("Asia/Tokyo".into()),
        created_at: Set(now),
        updated_at: Set(now),
    })
    .exec_without_returning(&conn)
    .await
    .expect("customer stored");
    for row in [
        night("ada", None),
        night("bob", None),
        night("cyd", Some("Europe/Berlin")),
    ] {
        quiet_hours::Entity::insert(row)
            .exec_without_returning(&conn)
            .await
            .expect("quiet hours stored");
    }
    let zones = |conn: sea_orm::DatabaseConnection| async move {
        let mut rows: Vec<(String, Option<String>)> = quiet_hours::Entity::find()
            .all(&conn)
            .await
            .expect("read")
            .into_iter()
            .map(|q| (q.customer_id, q.timezone))
            .collect();
        rows.sort();
        rows
    };

    // Back to before `m20261206_000801` (and whatever came after it).
    let migrations = Migrator::migrations();
    let position = migrations
        .iter()
        .position(|m| m.name() == "m20261206_000801_quiet_hours_follow_customer_timezone")
        .expect("the quiet hours migration");
    let steps = u32::try_from(migrations.len() - position).expect("a few migrations");
    Migrator::down(&conn, Some(steps))
        .await
        .expect("rolled back");
    let own = |zone: &str| Some(zone.to_string());
    assert_eq!(
        zones(conn.clone()).await,
        [
            ("ada".into(), own("Asia/Tokyo")),
            ("bob".into(), own("UTC")),
            ("cyd".into(), own("Europe/Berlin")),
        ]
    );
    let without = conn
        .execute_unprepared(
            "INSERT INTO quiet_hours (customer_id, starts, ends, updated_at) \
             VALUES ('dan', '22:00', '07:00', '2026-01-01')",
        )
        .await;
    assert!(without.is_err(), "a zone is required again");

    Migrator::up(&conn, None).await.expect("migrated again");
    assert_eq!(zones(conn.clone()).await.len(), 3, "every row kept");
    quiet_hours::Entity::insert(night("dan", None))
        .exec_without_returning(&conn)
        .await
        .expect("a night without a zone of its own");
}

/// `m20261206_001001` gives batches a unique request id: any number of batches go without one,
/// and a repeated one is refused by the index itself, so a repeat stores nothing whoever asks.
#[tokio::test]
async fn batch_request_ids_are_unique_when_given() {
    use herald_entities::repo::batches::{self, Created, NewBatch};
    use sea_orm::ConnectionTrait;

    let db = TestDatabase::from_env().await.expect("database");
    let conn = herald_tests::migrated(db.url()).await.expect("migrated");
    let new = |request_id: Option<&str>| NewBatch {
        id: uuid::Uuid::now_v7(),
        request_id: request_id.map(str::to_string),
        request_fingerprint: None,
        spec: serde_json::json!({}),
        total: 1,
        accepted_at: chrono::Utc::now(),
    };
    for request_id in [None, None, Some("r-1")] {
        let created = batches::create(&conn, new(request_id))
            .await
            .expect("stored");
        assert!(
            matches!(created, Created::New(_)),
            "{request_id:?}: {created:?}"
        );
    }
    match batches::create(&conn, new(Some("r-1")))
        .await
        .expect("read")
    {
        Created::Duplicate(first) => assert_eq!(first.request_id.as_deref(), Some("r-1")),
        other => panic!("a repeat answers the first batch, not {other:?}"),
    }
    let raw = conn
        .execute_unprepared(
            "INSERT INTO batches (id, request_id, status, spec, total, published, created_at, \
             updated_at) VALUES ('00000000-0000-7000-8000-000000000001', 'r-1', 'pending', '{}', \
             1, 0, '2026-12-06T00:00:00Z', '2026-12-06T00:00:00Z')",
        )
        .await;
    let refused = raw.expect_err("a repeated request id is refused");
    assert!(
        matches!(
            refused.sql_err(),
            Some(sea_orm::SqlErr::UniqueConstraintViolation(_))
        ),
        "by the unique index: {refused}"
    );
}

/// `m20261122_000102` adds `notifications.batch_id`, then indexes it. On SQLite it ran in no
/// transaction: a run that failed (or stopped) after the `ALTER TABLE` left the column without
/// the migration recorded, and every later start failed on "duplicate column name". It now runs
/// in one transaction, so the failed run leaves nothing and the next one applies it whole.
/// PostgreSQL runs migrations in a transaction unasked.
#[tokio::test]
async fn a_failed_bulk_batches_migration_can_run_again() {
    use herald_migration::{Migrator, MigratorTrait};
    use sea_orm::ConnectionTrait;

    let db = TestDatabase::from_env().await.expect("database");
    if db.kind() != herald_tests::DatabaseKind::Sqlite {
        eprintln!(
            "skipped on {:?}: it runs migrations in a transaction unasked",
            db.kind()
        );
        return;
    }
    let conn = herald_entities::connect(db.url(), 1)
        .await
        .expect("connected");
    let position = Migrator::migrations()
        .iter()
        .position(|m| m.name() == "m20261122_000102_create_batches")
        .expect("the bulk batches migration");
    let before = u32::try_from(position).expect("a few migrations");
    Migrator::up(&conn, Some(before))
        .await
        .expect("migrated up to it");
    // Its last statement fails after the `ALTER TABLE`: a table has the name of its index, which
    // SQLite refuses even with `IF NOT EXISTS`.
    let obstacle = "idx_notifications_batch_status";
    conn.execute_unprepared(&format!("CREATE TABLE {obstacle} (n INTEGER)"))
        .await
        .expect("obstacle created");
    Migrator::up(&conn, Some(1))
        .await
        .expect_err("the index cannot be created");
    conn.execute_unprepared(&format!("DROP TABLE {obstacle}"))
        .await
        .expect("obstacle dropped");
    Migrator::up(&conn, None)
        .await
        .expect("the migration, run again, and every later one applied");
    conn.execute_unprepared("SELECT batch_id FROM notifications")
        .await
        .expect("notifications.batch_id exists");
}

/// `m20261206_001101` gives notifications and batches a nullable request fingerprint: rows
/// without one are stored as before, a fingerprint is kept, and rolled back and migrated again
/// the rows stay, without one (a request repeating theirs is taken for a repeat).
#[tokio::test]
async fn request_fingerprints_are_optional_and_roll_back() {
    use herald_entities::repo::{
        batches::{self, Created, NewBatch},
        notifications::{self, Inserted},
    };
    use herald_migration::{Migrator, MigratorTrait};
    use sea_orm::EntityTrait;

    let db = TestDatabase::from_env().await.expect("database");
    let conn = herald_tests::migrated(db.url()).await.expect("migrated");
    let batch = |request_id: &str, fingerprint: Option<&str>| NewBatch {
        id: uuid::Uuid::now_v7(),
        request_id: Some(request_id.to_string()),
        request_fingerprint: fingerprint.map(str::to_string),
        spec: serde_json::json!({}),
        total: 1,
        accepted_at: chrono::Utc::now(),
    };
    let notification =
        |request_id: &str, fingerprint: Option<&str>| notifications::NewNotification {
            request_fingerprint: fingerprint.map(str::to_string),
            ..herald_tests::queued_notification(Some(request_id.to_string()))
        };
    for (request_id, fingerprint) in [("r-1", Some("v1:abc")), ("r-2", None)] {
        let created = batches::create(&conn, batch(request_id, fingerprint))
            .await
            .expect("batch stored");
        let Created::New(stored) = created else {
            panic!("{request_id}: a new batch, not {created:?}");
        };
        assert_eq!(stored.request_fingerprint.as_deref(), fingerprint);
        notifications::insert(&conn, notification(request_id, fingerprint))
            .await
            .expect("notification stored");
    }
    let repeat = notifications::insert(&conn, notification("r-1", Some("v1:other")))
        .await
        .expect("read back");
    let Inserted::Duplicate(first) = repeat else {
        panic!("the stored row answers a repeated request id, not {repeat:?}");
    };
    assert_eq!(
        first.request_fingerprint.as_deref(),
        Some("v1:abc"),
        "the first row's, unchanged"
    );

    // Back to before `m20261206_001101` (and whatever came after it).
    let migrations = Migrator::migrations();
    let position = migrations
        .iter()
        .position(|m| m.name() == "m20261206_001101_request_fingerprints")
        .expect("the fingerprints migration");
    let steps = u32::try_from(migrations.len() - position).expect("a few migrations");
    Migrator::down(&conn, Some(steps))
        .await
        .expect("rolled back");
    Migrator::up(&conn, None).await.expect("migrated again");
    let rows = herald_entities::batch::Entity::find()
        .all(&conn)
        .await
        .expect("batches read");
    assert_eq!(rows.len(), 2, "every batch kept");
    assert!(
        rows.iter().all(|b| b.request_fingerprint.is_none()),
        "{rows:?}"
    );
    let rows = herald_entities::notification::Entity::find()
        .all(&conn)
        .await
        .expect("notifications read");
    assert_eq!(rows.len(), 2, "every notification kept");
    assert!(
        rows.iter().all(|n| n.request_fingerprint.is_none()),
        "{rows:?}"
    );
}

/// On PostgreSQL a migration that changes a table in place (`m20261206_001101`'s `ALTER TABLE
/// notifications`) waits at most a few seconds for the table: while it waits, every query on the
/// table queues behind it, so a long transaction (a report) holding the table would otherwise hold
/// up every API request and delivery for as long as it lasts. The migration gives way and is tried
/// again, and is applied once the transaction has ended. SQLite takes no such table locks.
#[tokio::test]
async fn a_migration_waiting_for_a_table_does_not_hold_up_its_queries() {
    use herald_migration::{Migrator, MigratorTrait};
    use herald_tests::DatabaseKind;
    use sea_orm::{ConnectionTrait, TransactionTrait};

    let db = TestDatabase::from_env().await.expect("database");
    if db.kind() != DatabaseKind::Postgres {
        return;
    }
    let conn = herald_tests::migrated(db.url()).await.expect("migrated");
    let migrations = Migrator::migrations();
    let position = migrations
        .iter()
        .position(|m| m.name() == "m20261206_001101_request_fingerprints")
        .expect("the fingerprints migration");
    let steps = u32::try_from(migrations.len() - position).expect("a few migrations");
    Migrator::down(&conn, Some(steps))
        .await
        .expect("rolled back");

    // A long transaction that has read the table holds it (ACCESS SHARE) until it ends.
    let report = conn.begin().await.expect("transaction");
    report
        .execute_unprepared("SELECT count(*) FROM notifications")
        .await
        .expect("read");
    let mut config = herald_engine::Config::default();
    config.database.url = db.url().to_string();
    let migrating =
        tokio::spawn(async move { herald_engine::app::migrate(&config).await.map(|_| ()) });
    let observer = herald_entities::connect(db.url(), 1)
        .await
        .expect("observer");
    herald_tests::eventually(
        "the migration waiting for the table",
        herald_tests::E2E_TIMEOUT,
        || async {
            let waiting = observer
                .query_one_raw(sea_orm::Statement::from_string(
                    sea_orm::DbBackend::Postgres,
                    "SELECT count(*) AS n FROM pg_locks WHERE NOT granted \
                 AND relation = 'notifications'::regclass AND mode = 'AccessExclusiveLock'",
                ))
                .await
                .expect("pg_locks read")
                .and_then(|row| row.try_get::<i64>("", "n").ok());
            (waiting > Some(0)).then_some(())
        },
    )
    .await;

    // A query meanwhile (an API request, a delivery) gets through while the report still runs.
    let query = observer.execute_unprepared("SELECT count(*) FROM notifications");
    tokio::time::timeout(Duration::from_secs(15), query)
        .await
        .expect("a query on the table was held up behind the waiting migration")
        .expect("read");
    assert!(
        !migrating.is_finished(),
        "the migration cannot be applied while the report holds the table"
    );

    report.commit().await.expect("report ended");
    tokio::time::timeout(Duration::from_secs(60), migrating)
        .await
        .expect("the migration was applied within 60 s of the report's end")
        .expect("joined")
        .expect("migrated");
    observer
        .execute_unprepared("SELECT request_fingerprint FROM notifications LIMIT 1")
        .await
        .expect("the migration's column exists");
}

/// `m20261207_001201` gives outbox rows an ordering key: an order's event still unpublished at
/// the upgrade gets its order's key from its payload (so an event of the order stored after the
/// upgrade does not overtake it), a published one none, as nothing waits for it.
#[tokio::test]
async fn unpublished_order_events_get_their_ordering_key_on_upgrade() {
    use herald_migration::{Migrator, MigratorTrait};
    use sea_orm::{ConnectionTrait, EntityTrait};

    let db = TestDatabase::from_env().await.expect("database");
    let conn = herald_tests::migrated(db.url()).await.expect("migrated");
    let migrations = Migrator::migrations();
    let position = migrations
        .iter()
        .position(|m| m.name() == "m20261207_001201_outbox_ordering_key")
        .expect("the ordering key migration");
    let steps = u32::try_from(migrations.len() - position).expect("a few migrations");
    Migrator::down(&conn, Some(steps))
        .await
        .expect("rolled back");
    // SQLite keeps a UUID as 16 bytes.
    let sqlite = conn.get_database_backend() == sea_orm::DbBackend::Sqlite;
    let row = |n: u8, published: &str| {
        let id = match sqlite {
            true => format!("X'0000000000007000800000000000000{n}'"),
            false => format!("'00000000-0000-7000-8000-00000000000{n}'"),
        };
        let payload = format!(
            r#"{{"v": 1, "type": "orders.status_changed", "data": {{"order_number": "100{n}", "status": "paid"}}}}"#
        );
        format!(
            "({id}, 'events.orders.status_changed', '{payload}', '2026-12-06T00:00:00Z', \
             {published})"
        )
    };
    conn.execute_unprepared(&format!(
        "INSERT INTO outbox_events (id, subject, payload, created_at, published_at) VALUES {}, {}",
        row(1, "NULL"),
        row(2, "'2026-12-06T00:00:01Z'")
    ))
    .await
    .expect("outbox rows stored");
    Migrator::up(&conn, None).await.expect("migrated again");
    let mut rows = herald_entities::outbox_event::Entity::find()
        .all(&conn)
        .await
        .expect("outbox read");
    rows.sort_by_key(|row| row.id);
    let keys: Vec<Option<&str>> = rows.iter().map(|r| r.ordering_key.as_deref()).collect();
    assert_eq!(keys, [Some("order:1001"), None], "{rows:?}");
}
