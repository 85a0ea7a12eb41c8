//! The lookups that must not scan `notifications` (or `delivery_attempts`) are planned on their
//! indexes, against the suite's database (SQLite or PostgreSQL, as `HERALD_TEST_DB` says).
//!
//! Status changes keep most rows out of the partial indexes on `notifications` (migrations
//! `m20261203_000501`, `m20261204_000601`, `m20261204_000701`, `m20261207_001401`,
//! `m20261207_001501` and `m20261207_001901`), so a query is served by one only if the database
//! can tell that its rows all satisfy the index's condition, with the values bound as the
//! application binds them. On PostgreSQL the plans are generic ones, made without the bound
//! values, as a prepared statement may switch to after five runs; and since PostgreSQL prefers to
//! read an empty table whole, sequential scans are off: the plan still reads the table whole when
//! no index can serve. The migrations are also rolled back and applied again.

use chrono::{Duration, Utc};
use herald_entities::NotificationStatus;
use herald_entities::repo::{
    activity, batches, customers, history, notifications, outbox, schedule, send_history,
};
use herald_tests::{DatabaseKind, TestDatabase, migrated};
use sea_orm::sea_query::{PostgresQueryBuilder, QueryBuilder, SelectStatement};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, QueryTrait, Statement,
    StatementBuilder, TransactionTrait,
};
use uuid::Uuid;

/// The database's plan for `query` (a SELECT, or an UPDATE as the claim), one line per step.
async fn plan(
    txn: &DatabaseTransaction,
    kind: DatabaseKind,
    query: &impl StatementBuilder,
) -> String {
    let backend = txn.get_database_backend();
    let statement = query.build(&backend);
    let values = statement.values.map(|v| v.0).unwrap_or_default();
    let explained = match kind {
        DatabaseKind::Sqlite => Statement::from_sql_and_values(
            backend,
            format!("EXPLAIN QUERY PLAN {}", statement.sql),
            values,
        ),
        DatabaseKind::Postgres => {
            // Through a prepared statement, so that `plan_cache_mode` applies: a plain EXPLAIN
            // plans with the values it is given.
            txn.execute_unprepared(&format!("PREPARE herald_plan AS {}", statement.sql))
                .await
                .expect("statement prepared");
            let arguments: Vec<String> = values
                .iter()
                .map(|value| PostgresQueryBuilder.value_to_string(value))
                .collect();
            Statement::from_string(
                backend,
                format!("EXPLAIN EXECUTE herald_plan({})", arguments.join(", ")),
            )
        }
    };
    let rows = txn.query_all_raw(explained).await.expect("plan read");
    if kind == DatabaseKind::Postgres {
        txn.execute_unprepared("DEALLOCATE herald_plan")
            .await
            .expect("statement deallocated");
    }
    let column = match kind {
        DatabaseKind::Sqlite => "detail",
        DatabaseKind::Postgres => "QUERY PLAN",
    };
    rows.iter()
        .map(|row| row.try_get::<String>("", column).expect("plan line"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Whether `plan` names `index` as a whole name: `idx_notifications_queued` is not found in a plan
/// that reads `idx_notifications_queued_marked`.
fn names_index(plan: &str, index: &str) -> bool {
    let is_name_char = |c: char| c.is_ascii_alphanumeric() || c == '_';
    plan.match_indices(index).any(|(at, _)| {
        !plan[..at].ends_with(is_name_char) && !plan[at + index.len()..].starts_with(is_name_char)
    })
}

/// Asserts that the database plans `query` on `index`; `what` names the lookup in the failure.
async fn assert_planned_on(
    txn: &DatabaseTransaction,
    kind: DatabaseKind,
    query: &impl StatementBuilder,
    index: &str,
    what: &str,
) {
    let plan = plan(txn, kind, query).await;
    assert!(
        names_index(&plan, index),
        "{what} is not planned on {index}:\n{plan}"
    );
}

/// Asserts that `query` is planned on `index` on a connection opened now.
async fn assert_planned_afresh(
    url: &str,
    kind: DatabaseKind,
    query: &impl StatementBuilder,
    index: &str,
    what: &str,
) {
    let (_db, txn) = planning(url, kind).await;
    assert_planned_on(&txn, kind, query, index, what).await;
    txn.rollback().await.expect("planning transaction ended");
}

/// The scheduler's scan for due notifications.
fn due_scan() -> SelectStatement {
    schedule::due(Utc::now(), 100).into_query()
}

/// The scheduler's sweep for claims, API sends and replays never confirmed published.
fn stale_sweep() -> SelectStatement {
    schedule::stale(Utc::now() - Duration::seconds(30), 100).into_query()
}

/// A starting rate limiter's read of its user's recent sends.
fn histories() -> SelectStatement {
    let users = ["ada@example.com".to_string()];
    let cutoffs = [("marketing".to_string(), Utc::now() - Duration::days(1))];
    send_history::sent_since_query(&users, &cutoffs).into_query()
}

/// The first page of delivered notifications, of all customers.
fn delivered_listing() -> SelectStatement {
    let filter = history::HistoryFilter {
        status: Some(NotificationStatus::Delivered),
        ..Default::default()
    };
    history::page(&filter, None, 50).into_query()
}

/// The first page of queued notifications, of all customers.
fn queued_listing() -> SelectStatement {
    let filter = history::HistoryFilter {
        status: Some(NotificationStatus::Queued),
        ..Default::default()
    };
    history::page(&filter, None, 50).into_query()
}

/// A page of scheduled notifications, of all customers, newest first: the first, or the one after
/// `after`.
fn scheduled_listing(after: Option<Uuid>) -> SelectStatement {
    let filter = history::HistoryFilter {
        status: Some(NotificationStatus::Scheduled),
        ..Default::default()
    };
    history::page(&filter, after, 50).into_query()
}

/// Asserts that `query`, a listing of scheduled notifications newest first, is read from
/// `idx_notifications_scheduled_id` in its order: not from the index of the scheduled rows in the
/// order they are due, sorted, nor by a walk of the table.
async fn assert_scheduled_listed_in_order(
    txn: &DatabaseTransaction,
    kind: DatabaseKind,
    query: &SelectStatement,
    what: &str,
) {
    let plan = plan(txn, kind, query).await;
    assert!(
        names_index(&plan, "idx_notifications_scheduled_id")
            && !plan.contains("TEMP B-TREE")
            && !plan.contains("Sort"),
        "{what} is not read in the order of idx_notifications_scheduled_id:\n{plan}"
    );
}

/// The dashboard's `/scheduled` page.
fn scheduled_page() -> SelectStatement {
    activity::scheduled_query(51).into_query()
}

/// The first page of one category's notifications, of all customers.
fn category_listing() -> SelectStatement {
    let filter = history::HistoryFilter {
        category: Some("marketing".into()),
        ..Default::default()
    };
    history::page(&filter, None, 50).into_query()
}

/// A later page of the notifications one channel carried, of all customers.
fn channel_listing() -> SelectStatement {
    let filter = history::HistoryFilter {
        channel: Some("sms".into()),
        ..Default::default()
    };
    history::page(&filter, Some(Uuid::now_v7()), 50).into_query()
}

/// The dashboard's provider outcomes of the last hour (its `/channels` page).
fn attempt_outcomes() -> SelectStatement {
    activity::attempt_outcomes_query(Utc::now() - Duration::hours(1)).into_query()
}

/// A connection opened now, in a transaction that (on PostgreSQL) makes generic plans without
/// sequential scans.
///
/// SQLite explains a query with the schema its connection last read, and a pooled connection may
/// have read it before the latest migration ran.
async fn planning(url: &str, kind: DatabaseKind) -> (DatabaseConnection, DatabaseTransaction) {
    let db = herald_entities::connect(url, 1)
        .await
        .expect("database opened");
    let txn = db.begin().await.expect("transaction");
    if kind == DatabaseKind::Postgres {
        txn.execute_unprepared(
            "SET LOCAL enable_seqscan = off; SET LOCAL plan_cache_mode = force_generic_plan",
        )
        .await
        .expect("sequential scans off, generic plans");
    }
    (db, txn)
}

#[tokio::test]
async fn lookups_that_must_not_scan_notifications_use_their_indexes() {
    let database = TestDatabase::from_env().await.expect("test database");
    let kind = database.kind();
    migrated(database.url()).await.expect("database migrated");
    let (_db, txn) = planning(database.url(), kind).await;
    let now = Utc::now();

    let due = schedule::due(now, 100).into_query();
    assert_planned_on(
        &txn,
        kind,
        &due,
        "idx_notifications_scheduled_at_id",
        "the due scan",
    )
    .await;

    // Oldest first, in the marked index's order: `idx_notifications_queued` (every queued row)
    // would serve its conditions too, and read a backlog of unmarked rows whole.
    let sweep_plan = plan(&txn, kind, &stale_sweep()).await;
    assert!(
        names_index(&sweep_plan, "idx_notifications_queued_marked")
            && !sweep_plan.contains("TEMP B-TREE")
            && !sweep_plan.contains("Sort"),
        "the stale-claim sweep is not read in the order of idx_notifications_queued_marked:\n\
         {sweep_plan}"
    );

    for status in [
        NotificationStatus::Processing,
        NotificationStatus::Failed,
        NotificationStatus::Dead,
        NotificationStatus::Skipped,
        NotificationStatus::Cancelled,
    ] {
        let filter = history::HistoryFilter {
            status: Some(status),
            ..Default::default()
        };
        let listed = history::page(&filter, None, 50);
        let what = format!("listing {status:?}");
        assert_planned_on(
            &txn,
            kind,
            &listed.into_query(),
            "idx_notifications_watched",
            &what,
        )
        .await;
    }

    let index = "idx_notifications_delivered";
    assert_planned_on(&txn, kind, &delivered_listing(), index, "listing Delivered").await;
    let index = "idx_notifications_queued";
    assert_planned_on(&txn, kind, &queued_listing(), index, "listing Queued").await;
    let what = "listing Scheduled";
    assert_scheduled_listed_in_order(&txn, kind, &scheduled_listing(None), what).await;
    let what = "a later page of Scheduled";
    let later = scheduled_listing(Some(Uuid::now_v7()));
    assert_scheduled_listed_in_order(&txn, kind, &later, what).await;

    let index = "idx_notifications_category";
    assert_planned_on(&txn, kind, &category_listing(), index, "listing a category").await;
    let index = "idx_notifications_final_channel";
    assert_planned_on(&txn, kind, &channel_listing(), index, "listing a channel").await;

    let filter = history::HistoryFilter {
        customer_id: Some("customer-1".into()),
        status: Some(NotificationStatus::Sent),
        ..Default::default()
    };
    let customer = history::page(&filter, Some(Uuid::now_v7()), 50);
    let index = "idx_notifications_customer_id";
    assert_planned_on(
        &txn,
        kind,
        &customer.into_query(),
        index,
        "a customer's history",
    )
    .await;

    let ids = [Uuid::now_v7(), Uuid::now_v7()];
    let index = match kind {
        DatabaseKind::Sqlite => "sqlite_autoindex_notifications_1",
        DatabaseKind::Postgres => "notifications_pkey",
    };
    let claim = notifications::claim_query(now, &ids);
    assert_planned_on(&txn, kind, &claim, index, "the claim before sending").await;
    let statuses = notifications::status_query(&ids).into_query();
    let what = "the claim's read of what it left";
    assert_planned_on(&txn, kind, &statuses, index, what).await;
    let token = format!("{}{}", schedule::CLAIM_PREFIX, Uuid::now_v7());
    let claimed = schedule::claimed(&ids, &token).into_query();
    let what = "the scheduler's read-back of its claim";
    assert_planned_on(&txn, kind, &claimed, index, what).await;

    let users = ["ada@example.com".to_string(), "bob@example.com".to_string()];
    let cutoffs = [
        ("marketing".to_string(), now - Duration::days(1)),
        ("transactional".to_string(), now - Duration::minutes(1)),
    ];
    let histories = send_history::sent_since_query(&users, &cutoffs).into_query();
    let index = "idx_notifications_recipient_sent_at";
    let what = "the send histories of starting rate limiters";
    assert_planned_on(&txn, kind, &histories, index, what).await;

    let progress = batches::progress(Uuid::now_v7());
    let index = "idx_notifications_bulk_status";
    assert_planned_on(
        &txn,
        kind,
        &progress.into_query(),
        index,
        "a bulk send's progress",
    )
    .await;
    let reason = "batch cancelled by API request";
    let cancel = schedule::cancel_chunk_query(
        txn.get_database_backend(),
        Uuid::now_v7(),
        reason,
        now,
        1_000,
    );
    let what = "a batch cancel's choice of its next chunk";
    assert_planned_on(&txn, kind, &cancel, index, what).await;

    // A filter bulk send's page walks the customers by external id from its cursor; the
    // conditions (creation time included) only sort out the rows it meets.
    let filter = batches::CustomerFilter {
        locale: Some("de".into()),
        external_id_prefix: None,
        created_by: Some(now),
    };
    let page = batches::customers_page_query(&filter, Some("c-1"), 500).into_query();
    let index = match kind {
        DatabaseKind::Sqlite => "sqlite_autoindex_customers_2 (external_id>?)",
        DatabaseKind::Postgres => "customers_external_id_key",
    };
    let what = "a filter bulk send's page of customers";
    assert_planned_on(&txn, kind, &page, index, what).await;

    // Searched by time, not read whole: PostgreSQL without sequential scans would rather walk
    // a whole index than the table.
    let (index, range) = match kind {
        DatabaseKind::Sqlite => ("idx_delivery_attempts_created_at", "(created_at>?)"),
        DatabaseKind::Postgres => ("idx_delivery_attempts_created_at", "(created_at >= $1)"),
    };
    let what = "the dashboard's provider outcomes";
    assert_planned_on(&txn, kind, &attempt_outcomes(), index, what).await;
    assert_planned_on(&txn, kind, &attempt_outcomes(), range, what).await;

    // Made before every immediate publish of an order's event; the outbox keeps a day of rows.
    let waiting = outbox::others_waiting_query("order:1001", Uuid::now_v7()).into_query();
    let index = "idx_outbox_events_unpublished_key";
    let what = "the orders API's check for an older event of the order";
    assert_planned_on(&txn, kind, &waiting, index, what).await;
    let latest = outbox::waiting_dates_query("order:1001").into_query();
    let what = "the outbox's date for an order's next event";
    assert_planned_on(&txn, kind, &latest, index, what).await;

    let retention = schedule::purge_query(now - Duration::days(30), 1_000).into_query();
    let (index, range) = match kind {
        DatabaseKind::Sqlite => ("idx_notifications_created_at", "(created_at<?)"),
        DatabaseKind::Postgres => ("idx_notifications_created_at", "Index Cond: (created_at <"),
    };
    let what = "retention's read of old final notifications";
    assert_planned_on(&txn, kind, &retention, index, what).await;
    assert_planned_on(&txn, kind, &retention, range, what).await;
}

#[tokio::test]
async fn the_partial_indexes_migrations_roll_back_and_forward() {
    use herald_migration::MigratorTrait;
    let database = TestDatabase::from_env().await.expect("test database");
    let kind = database.kind();
    let db = migrated(database.url()).await.expect("database migrated");

    // Back to before the first of the three partial-index migrations (and whatever came after).
    let migrations = herald_migration::Migrator::migrations();
    let first = migrations
        .iter()
        .position(|m| m.name() == "m20261203_000501_partial_status_indexes")
        .expect("the first partial-index migration");
    herald_migration::Migrator::down(&db, Some((migrations.len() - first) as u32))
        .await
        .expect("the three partial-index migrations rolled back");
    let url = database.url();
    let old = "idx_notifications_status_scheduled";
    assert_planned_afresh(url, kind, &due_scan(), old, "the due scan, rolled back").await;
    let old = "idx_notifications_recipient_sent";
    let what = "the send histories, rolled back";
    assert_planned_afresh(url, kind, &histories(), old, what).await;
    if kind == DatabaseKind::Postgres {
        // What an interrupted `CREATE INDEX CONCURRENTLY` leaves: the index, marked invalid.
        for (index, column) in [
            ("idx_notifications_scheduled_due", "scheduled_at"),
            ("idx_notifications_recipient_sent_at", "sent_at"),
            ("idx_notifications_delivered", "id"),
            ("idx_notifications_category", "category"),
            ("idx_notifications_queued_marked", "updated_at"),
            ("idx_notifications_inline_recipient", "recipient_key"),
            ("idx_notifications_scheduled_at_id", "scheduled_at"),
            ("idx_notifications_queued", "id"),
            ("idx_notifications_scheduled_id", "id"),
        ] {
            db.execute_unprepared(&format!(
                "CREATE INDEX {index} ON notifications ({column}); \
                 UPDATE pg_index SET indisvalid = false WHERE indexrelid = '{index}'::regclass"
            ))
            .await
            .expect("an invalid index left behind");
        }
        db.execute_unprepared(
            "CREATE INDEX idx_delivery_attempts_created_at ON delivery_attempts (created_at); \
             UPDATE pg_index SET indisvalid = false \
             WHERE indexrelid = 'idx_delivery_attempts_created_at'::regclass",
        )
        .await
        .expect("an invalid index left behind");
        db.execute_unprepared(
            "CREATE INDEX idx_customers_email_lower ON customers (email); \
             UPDATE pg_index SET indisvalid = false \
             WHERE indexrelid = 'idx_customers_email_lower'::regclass",
        )
        .await
        .expect("an invalid index left behind");
    }

    herald_migration::Migrator::up(&db, None)
        .await
        .expect("migrated forward again");
    let new = "idx_notifications_scheduled_at_id";
    assert_planned_afresh(url, kind, &due_scan(), new, "the due scan, migrated again").await;
    let what = "the dashboard's scheduled notifications, migrated again";
    assert_planned_afresh(url, kind, &scheduled_page(), new, what).await;
    let new = "idx_notifications_queued";
    let what = "listing Queued, migrated again";
    assert_planned_afresh(url, kind, &queued_listing(), new, what).await;
    let (_db, txn) = planning(url, kind).await;
    let what = "listing Scheduled, migrated again";
    assert_scheduled_listed_in_order(&txn, kind, &scheduled_listing(None), what).await;
    txn.rollback().await.expect("planning transaction ended");
    let new = "idx_notifications_inline_recipient";
    let what = "the feed of one customer, migrated again";
    assert_planned_afresh(url, kind, &feed(Some("ada@example.com")), new, what).await;
    let new = "idx_notifications_recipient_sent_at";
    let what = "the send histories, migrated again";
    assert_planned_afresh(url, kind, &histories(), new, what).await;
    let new = "idx_notifications_delivered";
    let what = "listing Delivered, migrated again";
    assert_planned_afresh(url, kind, &delivered_listing(), new, what).await;
    let new = "idx_notifications_category";
    let what = "listing a category, migrated again";
    assert_planned_afresh(url, kind, &category_listing(), new, what).await;
    let new = "idx_notifications_final_channel";
    let what = "listing a channel, migrated again";
    assert_planned_afresh(url, kind, &channel_listing(), new, what).await;
    let new = "idx_notifications_queued_marked";
    let what = "the stale-claim sweep, migrated again";
    assert_planned_afresh(url, kind, &stale_sweep(), new, what).await;
    let new = "idx_delivery_attempts_created_at";
    let what = "the provider outcomes, migrated again";
    assert_planned_afresh(url, kind, &attempt_outcomes(), new, what).await;
    let new = match kind {
        DatabaseKind::Sqlite => "idx_customers_email_lower",
        DatabaseKind::Postgres => "idx_customers_email_folded",
    };
    let what = "the lookup of whose contacts a send names, migrated again";
    assert_planned_afresh(url, kind, &contact_lookup(kind), new, what).await;
}

/// The dashboard's feed, of all customers or of one: `customer` is what its customer column
/// shows (a customer id, else the first inline contact).
fn feed(customer: Option<&str>) -> SelectStatement {
    history::feed_page(&history::HistoryFilter::default(), customer, 100)
}

/// The dashboard's pages reload themselves every few seconds: their queries read the rows they
/// show from an index, in its order, not the whole table sorted.
#[tokio::test]
async fn the_dashboards_refreshing_queries_use_their_indexes() {
    let database = TestDatabase::from_env().await.expect("test database");
    let kind = database.kind();
    migrated(database.url()).await.expect("database migrated");
    let (_db, txn) = planning(database.url(), kind).await;
    let now = Utc::now();

    // `/scheduled`: the notifications waiting for their time, soonest due first, read in the
    // index's order (`scheduled_at, id`): a bulk send scheduled for one moment is not sorted whole
    // before the page is taken.
    let scheduled_plan = plan(&txn, kind, &scheduled_page()).await;
    assert!(
        names_index(&scheduled_plan, "idx_notifications_scheduled_at_id")
            && !scheduled_plan.contains("TEMP B-TREE")
            && !scheduled_plan.contains("Sort"),
        "the dashboard's scheduled notifications are not read in the order of \
         idx_notifications_scheduled_at_id:\n{scheduled_plan}"
    );

    // `/`'s latency plot: one range of the creation-time index per minute, read from its end.
    let minutes = 3;
    let latencies = activity::latencies_per_minute_query(now - Duration::minutes(3), minutes, 200);
    let latency_plan = plan(&txn, kind, &latencies).await;
    let wanted: &[&str] = match kind {
        DatabaseKind::Sqlite => {
            &["USING INDEX idx_notifications_created_at (created_at>? AND created_at<?)"]
        }
        DatabaseKind::Postgres => &[
            "Index Scan Backward using idx_notifications_created_at",
            "Index Cond: ((created_at >= ",
        ],
    };
    for wanted in wanted {
        assert_eq!(
            latency_plan.matches(wanted).count(),
            minutes as usize,
            "each minute of the latency plot is not a range of idx_notifications_created_at \
             ({wanted:?}):\n{latency_plan}"
        );
    }
    assert!(
        !latency_plan.contains("TEMP B-TREE") && !latency_plan.contains("Sort"),
        "a minute of the latency plot is sorted, not read in the index's order:\n{latency_plan}"
    );

    // `/`'s feed: the newest notifications, walked newest first on the primary key until the
    // page is full (a filter by status, channel or category has its own index, checked above).
    let pkey = match kind {
        DatabaseKind::Sqlite => "SCAN notifications USING INDEX sqlite_autoindex_notifications_1",
        DatabaseKind::Postgres => "Index Scan Backward using notifications_pkey",
    };
    let feed_plan = plan(&txn, kind, &feed(None)).await;
    assert!(
        feed_plan.contains(pkey)
            && !feed_plan.contains("TEMP B-TREE")
            && !feed_plan.contains("Sort"),
        "the feed is not walked newest first on the primary key:\n{feed_plan}"
    );

    // The feed filtered by `queued` (rows on their way, few when all is well).
    let filter = history::HistoryFilter {
        status: Some(NotificationStatus::Queued),
        ..Default::default()
    };
    let queued = history::feed_page(&filter, None, 100);
    let what = "the feed of queued notifications";
    assert_planned_on(&txn, kind, &queued, "idx_notifications_queued", what).await;

    // And by `scheduled` (rows waiting for their time, newest first as the feed is).
    let filter = history::HistoryFilter {
        status: Some(NotificationStatus::Scheduled),
        ..Default::default()
    };
    let scheduled = history::feed_page(&filter, None, 100);
    let what = "the feed of scheduled notifications";
    assert_scheduled_listed_in_order(&txn, kind, &scheduled, what).await;

    // The feed of one customer (or inline contact): a page of each half of the customer column
    // from its index, merged, as `history::feed_page` says; the table is not walked until the
    // page is full (the whole table for one with fewer than a page of notifications).
    let one_plan = plan(&txn, kind, &feed(Some("customer-1"))).await;
    let (halves, walks): (&[&str], &[&str]) = match kind {
        DatabaseKind::Sqlite => (
            &[
                "SEARCH notifications USING INDEX idx_notifications_customer_id (customer_id=?)",
                "SEARCH notifications USING INDEX idx_notifications_inline_recipient (recipient_key=?)",
            ],
            &["SCAN notifications"],
        ),
        DatabaseKind::Postgres => (
            &[
                "idx_notifications_customer_id",
                "idx_notifications_inline_recipient",
            ],
            &["notifications_pkey", "Seq Scan"],
        ),
    };
    assert!(
        halves.iter().all(|half| names_index(&one_plan, half))
            && !walks.iter().any(|walk| one_plan.contains(walk)),
        "the feed of one customer is not read from idx_notifications_customer_id and \
         idx_notifications_inline_recipient:\n{one_plan}"
    );
}

/// The lookup of the customers holding two sends' contacts (one with a contact of each kind).
fn contact_lookup(kind: DatabaseKind) -> SelectStatement {
    let backend = match kind {
        DatabaseKind::Sqlite => DbBackend::Sqlite,
        DatabaseKind::Postgres => DbBackend::Postgres,
    };
    let sets = [
        customers::ContactSet {
            email: Some("Ada@Example.com".into()),
            phone: Some("+4915112345678".into()),
            telegram_chat_id: Some("4711".into()),
            push_tokens: vec!["token-1".into(), "token-2".into()],
            webhook_url: Some("https://hooks.example.com/ada".into()),
        },
        customers::ContactSet {
            email: Some("grace@example.com".into()),
            ..Default::default()
        },
    ];
    customers::with_wishes_holding_query(backend, &sets)
        .expect("contacts to look up")
        .into_query()
}

/// A send that names contacts looks up, at every delivery, the customers holding them (whose
/// opt-outs it follows): each kind of contact is found on its index on both databases (push
/// tokens on SQLite in `customer_push_tokens`; before, SQLite walked every customer with stored
/// wishes for them), and `customers` is not read whole.
#[tokio::test]
async fn the_lookup_of_whose_contacts_a_send_names_uses_the_contact_indexes() {
    let database = TestDatabase::from_env().await.expect("test database");
    let kind = database.kind();
    migrated(database.url()).await.expect("database migrated");
    let (_db, txn) = planning(database.url(), kind).await;
    let lookup_plan = plan(&txn, kind, &contact_lookup(kind)).await;
    let (indexes, walk): (&[&str], &str) = match kind {
        DatabaseKind::Sqlite => (
            &[
                "idx_customers_email_lower",
                "idx_customers_phone (phone=?)",
                "idx_customers_telegram_chat_id (telegram_chat_id=?)",
                "idx_customers_webhook_url (webhook_url=?)",
                "idx_customer_push_tokens_token (token=?)",
            ],
            "SCAN customers",
        ),
        DatabaseKind::Postgres => (
            &[
                "idx_customers_email_folded",
                "idx_customers_phone",
                "idx_customers_telegram_chat_id",
                "idx_customers_webhook_url",
                "idx_customers_push_tokens",
            ],
            "Seq Scan on customers",
        ),
    };
    let missing: Vec<&&str> = indexes
        .iter()
        .filter(|index| !lookup_plan.contains(*index))
        .collect();
    assert!(
        missing.is_empty() && !lookup_plan.contains(walk),
        "the customers holding a send's contacts are not found on the contact indexes \
         (missing {missing:?}):\n{lookup_plan}"
    );
    txn.rollback().await.expect("planning transaction ended");
}

/// The clean-up's forgetting of webhook secrets replaced over their rotation grace ago finds them
/// on `idx_customers_webhook_secret_replaced_at` (`m20261207_003101`), not by reading every
/// customer.
#[tokio::test]
async fn the_clean_up_finds_replaced_webhook_secrets_on_their_index() {
    let database = TestDatabase::from_env().await.expect("test database");
    let kind = database.kind();
    migrated(database.url()).await.expect("database migrated");
    let forget = customers::forget_replaced_webhook_secrets_query(Utc::now()).into_query();
    assert_planned_afresh(
        database.url(),
        kind,
        &forget,
        "idx_customers_webhook_secret_replaced_at",
        "the clean-up's forgetting of replaced webhook secrets",
    )
    .await;
}
