//! The group-commit writer of new notifications against the suite's database (SQLite or
//! PostgreSQL, as `HERALD_TEST_DB` says): concurrent callers each get their own answer, a repeated
//! request id resolves to one row even within one batch (and a repeat whose stored row was withdrawn
//! before it read it back is stored anew), a row that breaks a constraint fails
//! alone, a new row is answered as it reads back (times as the database keeps them), an
//! unavailable database fails every waiting caller and stores nothing, a confirmed publish
//! clears the API's "not yet published" mark and nothing else, and a row whose publish failed is
//! removed only while nothing confirmed it. A row the database refuses for one of its values fails
//! alone, and a NUL byte in a row (PostgreSQL refuses it in text and JSON) is stored as U+FFFD.

use std::collections::HashMap;
use std::time::Duration;

use futures::future::join_all;
use herald_entities::repo::insert_queue::InsertQueue;
use herald_entities::repo::notifications::{Inserted, NewNotification, insert_together};
use herald_entities::repo::schedule::PUBLISH_PENDING;
use herald_entities::repo::status_batch::{self, StatusChange};
use herald_entities::{NotificationStatus, RepoError, WriteGate, notification};
use herald_tests::{DatabaseKind, DatabaseOutage, TestDatabase, migrated};
use sea_orm::{DatabaseConnection, EntityTrait, PaginatorTrait};
use uuid::Uuid;

/// How long one insert may take before the test reports it stuck.
const INSERT_TIMEOUT: Duration = Duration::from_secs(60);

fn row(request_id: Option<String>) -> NewNotification {
    herald_tests::queued_notification(request_id)
}

/// A new API send, marked as not yet published.
fn marked() -> NewNotification {
    NewNotification {
        status_reason: Some(PUBLISH_PENDING.into()),
        ..row(None)
    }
}

async fn insert_all(
    queue: &InsertQueue,
    rows: Vec<NewNotification>,
) -> Vec<Result<Inserted, RepoError>> {
    let inserts = rows.into_iter().map(|row| {
        let queue = queue.clone();
        async move {
            tokio::time::timeout(INSERT_TIMEOUT, queue.insert(row))
                .await
                .expect("an insert answers")
        }
    });
    join_all(inserts).await
}

async fn stored(db: &DatabaseConnection) -> u64 {
    notification::Entity::find()
        .count(db)
        .await
        .expect("rows counted")
}

#[tokio::test]
async fn concurrent_callers_get_one_row_per_request_id() {
    let database = TestDatabase::from_env().await.expect("test database");
    let db = migrated(database.url()).await.expect("database migrated");
    let queue = InsertQueue::start(db.clone(), WriteGate::for_url(database.url()));

    // 100 request ids, each sent three times at once (so repeats meet within one batch), and 50
    // rows without a request id.
    let mut rows: Vec<_> = (0..300)
        .map(|i| row(Some(format!("order-{}", i % 100))))
        .collect();
    rows.extend((0..50).map(|_| row(None)));
    let outcomes = insert_all(&queue, rows).await;

    let mut per_request: HashMap<String, (Vec<Uuid>, Vec<Uuid>)> = HashMap::new();
    let mut anonymous = 0;
    for outcome in outcomes {
        match outcome.expect("every insert succeeds") {
            Inserted::New(model) if model.request_id.is_none() => anonymous += 1,
            Inserted::New(model) => {
                let key = model.request_id.clone().expect("request id");
                per_request.entry(key).or_default().0.push(model.id);
            }
            Inserted::Duplicate(model) => {
                let key = model.request_id.clone().expect("request id");
                per_request.entry(key).or_default().1.push(model.id);
            }
        }
    }
    assert_eq!(anonymous, 50, "rows without a request id are all new");
    assert_eq!(per_request.len(), 100, "every request id answered");
    for (request_id, (new, duplicates)) in &per_request {
        assert_eq!(new.len(), 1, "{request_id}: exactly one caller stored it");
        assert_eq!(
            duplicates.len(),
            2,
            "{request_id}: the repeats are duplicates"
        );
        assert!(
            duplicates.iter().all(|id| *id == new[0]),
            "{request_id}: the duplicates name the stored row"
        );
    }
    assert_eq!(
        stored(&db).await,
        150,
        "one row per request id, plus the anonymous ones"
    );
}

#[tokio::test]
async fn rows_stored_together_answer_each_repeat_with_the_stored_row() {
    let database = TestDatabase::from_env().await.expect("test database");
    let db = migrated(database.url()).await.expect("database migrated");
    let earlier = row(Some("earlier".into()));
    insert_together(&db, vec![earlier.clone()])
        .await
        .expect("earlier row stored");

    // The same routed event handled twice at once: the same id and request id, twice in one
    // statement (nothing else in the batch names that request id); a row stored before; a row
    // without a request id.
    let routed = row(Some("event:1:rule".into()));
    let anonymous = row(None);
    let batch = vec![
        routed.clone(),
        routed.clone(),
        row(Some("earlier".into())),
        anonymous.clone(),
    ];
    let outcomes: Vec<Inserted> = insert_together(&db, batch)
        .await
        .expect("the batch is stored")
        .into_iter()
        .map(|outcome| outcome.expect("every row is answered"))
        .collect();

    let answered: Vec<(bool, Uuid)> = outcomes
        .iter()
        .map(|outcome| match outcome {
            Inserted::New(model) => (true, model.id),
            Inserted::Duplicate(model) => (false, model.id),
        })
        .collect();
    assert_eq!(
        answered,
        vec![
            (true, routed.id),
            (false, routed.id),
            (false, earlier.id),
            (true, anonymous.id),
        ],
        "(new, id) of each row, in order"
    );

    // A repeat under a new id answers the stored row too.
    let mut retried = row(Some("event:1:rule".into()));
    retried.id = Uuid::now_v7();
    let outcome = insert_together(&db, vec![retried])
        .await
        .expect("the repeat is answered")
        .pop()
        .expect("one outcome")
        .expect("the repeat finds the stored row");
    assert!(
        matches!(&outcome, Inserted::Duplicate(model) if model.id == routed.id),
        "a repeat under a new id names the stored row: {outcome:?}"
    );
    assert_eq!(stored(&db).await, 3, "earlier, routed and anonymous");
}

/// Two sends with one request id race while the first one's publish fails: the second's INSERT
/// is skipped for the first one's row, which the first then withdraws before the second reads it
/// back. The second is stored anew, as if it had come after the withdrawal (it used to fail:
/// `RecordNotInserted`, answered 500). A trigger stands in for the first request's withdrawal,
/// removing its row when another row of the same statement is stored: after the repeat was
/// skipped (it comes first in the statement), before its read-back.
#[tokio::test]
async fn a_repeat_whose_stored_row_is_withdrawn_before_its_read_back_is_stored_anew() {
    use sea_orm::ConnectionTrait;
    let database = TestDatabase::from_env().await.expect("test database");
    let db = migrated(database.url()).await.expect("database migrated");
    let withdrawn = NewNotification {
        request_id: Some("raced".into()),
        ..marked()
    };
    insert_together(&db, vec![withdrawn.clone()])
        .await
        .expect("the first request's row stored");
    let withdraw = match database.kind() {
        DatabaseKind::Postgres => vec![
            "CREATE FUNCTION test_withdraw() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN DELETE FROM notifications WHERE request_id = 'raced'; RETURN NULL; END $$",
            "CREATE TRIGGER test_withdraw AFTER INSERT ON notifications FOR EACH ROW \
             WHEN (NEW.request_id = 'other') EXECUTE FUNCTION test_withdraw()",
        ],
        DatabaseKind::Sqlite => vec![
            "CREATE TRIGGER test_withdraw AFTER INSERT ON notifications \
             WHEN NEW.request_id = 'other' \
             BEGIN DELETE FROM notifications WHERE request_id = 'raced'; END",
        ],
    };
    for sql in withdraw {
        db.execute_unprepared(sql).await.expect("trigger installed");
    }

    let repeat = NewNotification {
        request_id: Some("raced".into()),
        ..marked()
    };
    let other = row(Some("other".into()));
    let outcomes = insert_together(&db, vec![repeat.clone(), other])
        .await
        .expect("the statement ran");
    let answered = match &outcomes[0] {
        Ok(Inserted::New(model)) => model.id,
        outcome => {
            panic!("the repeat is stored anew once the row it repeated is gone: {outcome:?}")
        }
    };
    assert_eq!(answered, repeat.id, "the repeat's own row");
    assert!(
        matches!(&outcomes[1], Ok(Inserted::New(_))),
        "the other row: {:?}",
        outcomes[1]
    );
    let under_id = herald_entities::repo::notifications::find_by_request_id(&db, "raced")
        .await
        .expect("read")
        .map(|model| model.id);
    assert_eq!(
        under_id,
        Some(repeat.id),
        "one row under the request id: the repeat's, not the withdrawn one"
    );
    assert_eq!(stored(&db).await, 2, "the repeat and the other row");
}

#[tokio::test]
async fn a_new_row_is_answered_as_it_reads_back() {
    let database = TestDatabase::from_env().await.expect("test database");
    let db = migrated(database.url()).await.expect("database migrated");
    // Times finer than PostgreSQL keeps (nanoseconds).
    let mut new = row(Some("read back".into()));
    new.created_at = "2026-12-05T10:00:00.123456789Z".parse().expect("time");
    new.scheduled_at = Some("2026-12-06T08:30:00.987654321Z".parse().expect("time"));
    let answered = match insert_together(&db, vec![new])
        .await
        .expect("stored")
        .pop()
        .expect("one outcome")
        .expect("the row is answered")
    {
        Inserted::New(model) => model,
        other => panic!("a new row: {other:?}"),
    };
    let read = notification::Entity::find_by_id(answered.id)
        .one(&db)
        .await
        .expect("read back");
    assert_eq!(Some(answered), read, "the answer is the stored row");
}

#[tokio::test]
async fn a_row_that_breaks_a_constraint_fails_alone() {
    let database = TestDatabase::from_env().await.expect("test database");
    let db = migrated(database.url()).await.expect("database migrated");
    let queue = InsertQueue::start(db.clone(), WriteGate::for_url(database.url()));
    let first = row(Some("first".into()));
    let taken_id = first.id;
    assert!(matches!(
        queue.insert(first).await.expect("first stored"),
        Inserted::New(_)
    ));

    // A different request id under an id already taken: a primary key violation, not a repeat.
    let mut clash = row(Some("clash".into()));
    clash.id = taken_id;
    let mut rows: Vec<_> = (0..20).map(|i| row(Some(format!("fine-{i}")))).collect();
    rows.insert(10, clash);
    let outcomes = insert_all(&queue, rows).await;

    let (failed, fine): (Vec<_>, Vec<_>) = outcomes.into_iter().partition(Result::is_err);
    assert_eq!(failed.len(), 1, "only the clashing row fails");
    assert!(
        fine.iter()
            .all(|outcome| matches!(outcome, Ok(Inserted::New(_)))),
        "the other rows are stored"
    );
    match &failed[0] {
        Err(RepoError::Db(err)) => assert!(err.sql_err().is_some(), "a constraint error: {err}"),
        other => panic!("expected a database error, got {other:?}"),
    }
    assert_eq!(stored(&db).await, 21);
}

/// On PostgreSQL a request id longer than a B-tree index entry may be (about 2.7 kB) is refused
/// with 54000 program_limit_exceeded: no constraint violation, yet one row's fault. It used to
/// fail every caller of the batch; now the batch is stored again row by row and that row alone
/// fails. SQLite stores the row.
#[tokio::test]
async fn a_row_the_database_refuses_for_a_value_fails_alone() {
    let database = TestDatabase::from_env().await.expect("test database");
    let db = migrated(database.url()).await.expect("database migrated");
    let queue = InsertQueue::start(db.clone(), WriteGate::for_url(database.url()));

    let oversized: String = (0..400)
        .map(|_| Uuid::new_v4().simple().to_string())
        .collect();
    let mut rows: Vec<_> = (0..20).map(|i| row(Some(format!("fine-{i}")))).collect();
    rows.insert(10, row(Some(oversized)));
    let outcomes = insert_all(&queue, rows).await;

    let (failed, fine): (Vec<_>, Vec<_>) = outcomes.into_iter().partition(Result::is_err);
    let expected_failures = match database.kind() {
        DatabaseKind::Postgres => 1,
        DatabaseKind::Sqlite => 0,
    };
    assert_eq!(failed.len(), expected_failures, "{failed:?}");
    assert!(
        fine.iter()
            .all(|outcome| matches!(outcome, Ok(Inserted::New(_)))),
        "the other rows are stored"
    );
    assert_eq!(stored(&db).await, fine.len() as u64);
}

/// Event variables rendered into a notification's content skip the API's NUL check: PostgreSQL
/// refuses `\u0000` in jsonb (22P05) and NUL in text (22021). Every NUL of the row, in its strings
/// and in the strings and keys of its JSON, is stored as U+FFFD, and the answer is the stored row.
#[tokio::test]
async fn a_nul_in_a_new_row_is_stored_as_a_replacement_character() {
    let database = TestDatabase::from_env().await.expect("test database");
    let db = migrated(database.url()).await.expect("database migrated");
    let queue = InsertQueue::start(db.clone(), WriteGate::for_url(database.url()));

    let new = NewNotification {
        customer_id: Some("cust\0omer".into()),
        recipient_key: "ada\0@example.com".into(),
        contacts: serde_json::json!({"email": "ada@example.com\0"}),
        channels: serde_json::json!(["email\0"]),
        content: serde_json::json!({
            "text": "Order \0 shipped",
            "data": {"note\0": ["a\0b", 1, null, {"deep": "\0"}]},
        }),
        status_reason: Some(format!("{PUBLISH_PENDING}\0")),
        ..row(Some("request\0id".into()))
    };
    let id = new.id;
    let answered = match queue.insert(new).await.expect("stored") {
        Inserted::New(model) => model,
        other => panic!("expected a new row, got {other:?}"),
    };
    let read = notification::Entity::find_by_id(id)
        .one(&db)
        .await
        .expect("read back")
        .expect("stored");
    assert_eq!(answered, read, "the answer is the stored row");
    assert_eq!(read.request_id.as_deref(), Some("request\u{FFFD}id"));
    assert_eq!(read.customer_id.as_deref(), Some("cust\u{FFFD}omer"));
    assert_eq!(read.recipient_key, "ada\u{FFFD}@example.com");
    assert_eq!(
        read.contacts,
        serde_json::json!({"email": "ada@example.com\u{FFFD}"})
    );
    assert_eq!(read.channels, serde_json::json!(["email\u{FFFD}"]));
    assert_eq!(
        read.content,
        serde_json::json!({
            "text": "Order \u{FFFD} shipped",
            "data": {"note\u{FFFD}": ["a\u{FFFD}b", 1, null, {"deep": "\u{FFFD}"}]},
        })
    );
    assert_eq!(
        read.status_reason,
        Some(format!("{PUBLISH_PENDING}\u{FFFD}"))
    );
}

#[tokio::test]
async fn an_unavailable_database_fails_every_waiting_caller_and_stores_nothing() {
    let database = TestDatabase::from_env().await.expect("test database");
    let mut outage = DatabaseOutage::new(&database).await.expect("outage setup");
    let db = migrated(outage.url()).await.expect("database migrated");
    let queue = InsertQueue::start(db.clone(), WriteGate::for_url(outage.url()));

    outage.begin().await.expect("outage begins");
    let rows: Vec<_> = (0..10).map(|i| row(Some(format!("during-{i}")))).collect();
    let outcomes = insert_all(&queue, rows).await;
    for outcome in &outcomes {
        assert!(
            matches!(outcome, Err(RepoError::Db(_))),
            "an insert during the outage fails: {outcome:?}"
        );
    }
    outage.end().await.expect("outage ends");

    let after = queue
        .insert(row(Some("after".into())))
        .await
        .expect("stored after the outage");
    assert!(matches!(after, Inserted::New(_)));
    assert_eq!(stored(&db).await, 1, "nothing of the outage was stored");
}

async fn reason(db: &DatabaseConnection, id: Uuid) -> Option<String> {
    notification::Entity::find_by_id(id)
        .one(db)
        .await
        .expect("row read")
        .expect("row exists")
        .status_reason
}

#[tokio::test]
async fn a_confirmed_publish_clears_the_mark_and_nothing_else() {
    let database = TestDatabase::from_env().await.expect("test database");
    let db = migrated(database.url()).await.expect("database migrated");
    let queue = InsertQueue::start(db.clone(), WriteGate::for_url(database.url()));
    let (confirmed, unconfirmed, deferred) = (marked(), marked(), row(None));
    let ids = (confirmed.id, unconfirmed.id, deferred.id);
    let deferred = NewNotification {
        status_reason: Some("quiet hours until 07:00".into()),
        ..deferred
    };
    insert_all(&queue, vec![confirmed, unconfirmed, deferred]).await;

    queue.confirm_published(ids.0);
    queue.confirm_published(ids.2);
    // Both confirmations share one UPDATE, written within a moment.
    herald_tests::eventually(
        "the confirmed mark to be cleared",
        INSERT_TIMEOUT,
        || async { reason(&db, ids.0).await.is_none().then_some(()) },
    )
    .await;
    assert_eq!(
        reason(&db, ids.1).await.as_deref(),
        Some(PUBLISH_PENDING),
        "an unconfirmed send keeps its mark"
    );
    assert_eq!(
        reason(&db, ids.2).await.as_deref(),
        Some("quiet hours until 07:00"),
        "a confirmation clears only the mark"
    );

    // A dispatcher picking a command up proves it was published: `processing` clears the mark,
    // but keeps another reason.
    let changes = [
        StatusChange::to(ids.1, NotificationStatus::Processing),
        StatusChange::to(ids.2, NotificationStatus::Processing),
    ];
    status_batch::apply(&db, &changes, &[])
        .await
        .expect("changes written");
    assert_eq!(reason(&db, ids.1).await, None, "processing clears the mark");
    assert_eq!(
        reason(&db, ids.2).await.as_deref(),
        Some("quiet hours until 07:00"),
        "processing keeps another reason"
    );
}

/// A send whose publish failed removes its row, unless a repeat of the request published the
/// command meanwhile and answered with it: whichever of the two writes first decides.
#[tokio::test]
async fn a_failed_publish_removes_its_row_unless_a_repeat_confirmed_it_first() {
    use herald_entities::repo::notifications::{confirm_published_now, delete_unpublished};
    let database = TestDatabase::from_env().await.expect("test database");
    let db = migrated(database.url()).await.expect("database migrated");
    let queue = InsertQueue::start(db.clone(), WriteGate::for_url(database.url()));
    let (repeated, abandoned) = (marked(), marked());
    let ids = (repeated.id, abandoned.id);
    insert_all(&queue, vec![repeated, abandoned]).await;

    assert!(confirm_published_now(&db, ids.0).await.expect("confirmed"));
    assert!(
        !delete_unpublished(&db, ids.0).await.expect("delete ran"),
        "a confirmed row is reported not deleted"
    );
    assert_eq!(
        reason(&db, ids.0).await,
        None,
        "the confirmed row stays, unmarked"
    );

    assert!(
        delete_unpublished(&db, ids.1).await.expect("deleted"),
        "the removal is reported"
    );
    let gone = notification::Entity::find_by_id(ids.1)
        .one(&db)
        .await
        .expect("read");
    assert!(
        gone.is_none(),
        "an unconfirmed row whose publish failed is removed"
    );
    assert!(
        !confirm_published_now(&db, ids.1).await.expect("ran"),
        "a repeat learns that the row is gone"
    );
}

/// A send whose publish reported a failure although its command got out (the acknowledgement
/// lost) finds its row claimed by a dispatcher: the row stays, and the removal reports that it
/// removed nothing, so that the request is answered as accepted, not as "nothing was accepted".
#[tokio::test]
async fn a_failed_publish_does_not_remove_a_row_a_dispatcher_claimed() {
    use herald_entities::repo::notifications::{claim, delete_unpublished};
    let database = TestDatabase::from_env().await.expect("test database");
    let db = migrated(database.url()).await.expect("database migrated");
    let queue = InsertQueue::start(db.clone(), WriteGate::for_url(database.url()));
    let sent = marked();
    let id = sent.id;
    insert_all(&queue, vec![sent]).await;
    claim(&db, &[id]).await.expect("claimed");

    assert!(
        !delete_unpublished(&db, id).await.expect("delete ran"),
        "a claimed row is reported not deleted"
    );
    let kept = notification::Entity::find_by_id(id)
        .one(&db)
        .await
        .expect("read")
        .expect("the claimed row stays");
    assert_eq!(kept.status, NotificationStatus::Processing);
}
