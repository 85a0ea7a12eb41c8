//! The dispatcher's claim against the suite's database (SQLite or PostgreSQL, as `HERALD_TEST_DB`
//! says): a claim and a cancel of one notification exclude each other, one after the other and
//! racing, so a cancel that answers `cancelled` means the notification is never sent.

use herald_entities::NotificationStatus;
use herald_entities::repo::{
    self,
    notifications::Claimed,
    schedule::Cancel,
    status_batch::{self, StatusChange},
};
use std::collections::BTreeSet;

use chrono::Utc;
use herald_tests::{DatabaseKind, TestDatabase, migrated, queued_notification, stored_status};
use sea_orm::{DatabaseConnection, TransactionTrait};
use uuid::Uuid;

async fn cancel(db: &DatabaseConnection, id: Uuid) -> Cancel {
    repo::schedule::cancel(db, id, "cancelled by the test")
        .await
        .expect("cancel ran")
}

#[tokio::test]
async fn a_claim_takes_what_may_go_out_and_never_undoes_a_cancel() {
    use NotificationStatus::{Cancelled, Processing, Scheduled, Sent};
    let database = TestDatabase::from_env().await.expect("database");
    let db = migrated(database.url()).await.expect("migrated");
    let mut scheduled = queued_notification(None);
    scheduled.status = Scheduled;
    let rows = vec![
        queued_notification(None),
        queued_notification(None),
        queued_notification(None),
        scheduled,
    ];
    let ids: Vec<Uuid> = rows.iter().map(|row| row.id).collect();
    let (queued, cancelled, sent, scheduled, unknown) =
        (ids[0], ids[1], ids[2], ids[3], Uuid::now_v7());
    repo::notifications::insert_many(&db, rows)
        .await
        .expect("stored");
    status_batch::apply(&db, &[StatusChange::to(sent, Sent)], &[])
        .await
        .expect("one sent");

    assert!(matches!(cancel(&db, cancelled).await, Cancel::Cancelled(_)));
    let claimed = repo::notifications::claim(&db, &[queued, cancelled, sent, scheduled, unknown])
        .await
        .expect("claimed");
    let yours = Claimed::Yours { attempts: 0 };
    assert_eq!(claimed.get(&queued), Some(&yours));
    assert_eq!(claimed.get(&scheduled), Some(&yours));
    assert_eq!(claimed.get(&cancelled), Some(&Claimed::Final(Cancelled)));
    assert_eq!(claimed.get(&sent), Some(&Claimed::Final(Sent)));
    assert_eq!(claimed.get(&unknown), None);
    assert_eq!(stored_status(&db, queued).await, Processing);
    assert_eq!(stored_status(&db, scheduled).await, Processing);
    assert_eq!(
        stored_status(&db, cancelled).await,
        Cancelled,
        "a claim never undoes a cancel"
    );
    assert_eq!(stored_status(&db, sent).await, Sent);
    assert_eq!(
        cancel(&db, queued).await,
        Cancel::NotCancellable(Processing)
    );

    // A redelivery claims it again, with the attempts recorded meanwhile.
    let mut tried = StatusChange::to(queued, Processing);
    tried.attempts = Some(2);
    status_batch::apply(&db, &[tried], &[])
        .await
        .expect("attempts recorded");
    let again = repo::notifications::claim(&db, &[queued])
        .await
        .expect("claimed again");
    assert_eq!(again.get(&queued), Some(&Claimed::Yours { attempts: 2 }));
}

/// Cancels race one claim of all the rows: each row is either cancelled and not claimed, or
/// claimed and not cancellable — never both, never neither. A round where one side won every row
/// tested no race, so rounds repeat (on new rows) until both sides won some.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_cancels_and_a_claim_each_row_has_one_winner() {
    const ROWS: usize = 200;
    const ROUNDS: usize = 5;
    let database = TestDatabase::from_env().await.expect("database");
    let db = migrated(database.url()).await.expect("migrated");
    let mut rounds = Vec::new();
    for _ in 0..ROUNDS {
        let winners = race_cancels_and_a_claim(&db, ROWS).await;
        assert_eq!(winners.0 + winners.1, ROWS, "{winners:?}");
        rounds.push(winners);
        if winners.0 > 0 && winners.1 > 0 {
            println!("(cancelled, claimed) per round: {rounds:?}");
            return;
        }
    }
    panic!(
        "no round raced: (cancelled, claimed) per round {rounds:?}; each row's single winner \
         was not tested against the other side"
    );
}

/// Stores `rows` queued notifications, races a cancel of each against one claim of them all,
/// checks each row has exactly one winner and returns how many the cancels and the claim won.
async fn race_cancels_and_a_claim(db: &DatabaseConnection, rows: usize) -> (usize, usize) {
    let stored: Vec<_> = (0..rows).map(|_| queued_notification(None)).collect();
    let ids: Vec<Uuid> = stored.iter().map(|row| row.id).collect();
    repo::notifications::insert_many(db, stored)
        .await
        .expect("stored");

    let cancels: Vec<_> = ids
        .iter()
        .map(|&id| {
            let db = db.clone();
            tokio::spawn(async move { (id, cancel(&db, id).await) })
        })
        .collect();
    let claim = {
        let (db, ids) = (db.clone(), ids.clone());
        tokio::spawn(async move { repo::notifications::claim(&db, &ids).await })
    };
    let claimed = claim.await.expect("joined").expect("claimed");
    let mut winners = (0, 0);
    for cancel in cancels {
        let (id, outcome) = cancel.await.expect("joined");
        match (outcome, claimed.get(&id)) {
            (Cancel::Cancelled(_), Some(Claimed::Final(NotificationStatus::Cancelled))) => {
                winners.0 += 1;
            }
            (
                Cancel::NotCancellable(NotificationStatus::Processing),
                Some(Claimed::Yours { .. }),
            ) => winners.1 += 1,
            (outcome, claim) => panic!("{id}: cancel {outcome:?} and claim {claim:?}"),
        }
    }
    winners
}

/// Stores `count` scheduled notifications due a minute ago.
async fn due_notifications(db: &DatabaseConnection, count: usize) -> Vec<Uuid> {
    let rows: Vec<_> = (0..count)
        .map(|_| {
            let mut row = queued_notification(None);
            row.status = NotificationStatus::Scheduled;
            row.scheduled_at = Some(Utc::now() - chrono::Duration::minutes(1));
            row
        })
        .collect();
    let ids = rows.iter().map(|row| row.id).collect();
    repo::notifications::insert_many(db, rows)
        .await
        .expect("stored");
    ids
}

/// The ids a Scheduler's claim of due notifications took.
fn claimed_ids(claim: repo::schedule::DueClaim) -> BTreeSet<Uuid> {
    claim.rows.into_iter().map(|row| row.id).collect()
}

/// Two Schedulers claiming the same due notifications at once each take rows of their own: on
/// PostgreSQL the second claim, made while the first one's transaction still holds its rows,
/// skips them and takes the next ones instead of waiting for them and claiming none (which
/// released a burst of due notifications at one instance's pace). SQLite has a single writer:
/// its claims take turns, and the second takes the rows the first left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_due_claims_take_disjoint_rows() {
    let database = TestDatabase::from_env().await.expect("database");
    let db = migrated(database.url()).await.expect("migrated");
    let due: BTreeSet<Uuid> = due_notifications(&db, 4).await.into_iter().collect();
    let now = Utc::now();

    let (first, second) = match database.kind() {
        DatabaseKind::Postgres => {
            let txn = db.begin().await.expect("transaction");
            let first = repo::schedule::claim_due(&txn, now, 2)
                .await
                .expect("first claim");
            let mut second = {
                let db = db.clone();
                tokio::spawn(async move { repo::schedule::claim_due(&db, now, 2).await })
            };
            // The second claim must not wait for the first one's rows; one that does is let go
            // (the first committed) after a bound, to show what it then claims.
            let bound = std::time::Duration::from_secs(10);
            let second = match tokio::time::timeout(bound, &mut second).await {
                Ok(done) => {
                    txn.commit().await.expect("first claim committed");
                    done
                }
                Err(_) => {
                    txn.commit().await.expect("first claim committed");
                    second.await
                }
            };
            (first, second.expect("joined").expect("second claim"))
        }
        DatabaseKind::Sqlite => {
            let first = repo::schedule::claim_due(&db, now, 2)
                .await
                .expect("first claim");
            let second = repo::schedule::claim_due(&db, now, 2)
                .await
                .expect("second claim");
            (first, second)
        }
    };
    let (first, second) = (claimed_ids(first), claimed_ids(second));
    assert_eq!(first.len(), 2, "the first claim took {first:?} of {due:?}");
    assert_eq!(
        second.len(),
        2,
        "the second claim, made while the first held its rows, took {second:?} of {due:?} \
         (the first took {first:?})"
    );
    assert!(first.is_disjoint(&second), "{first:?} and {second:?}");
    assert!(first.union(&second).all(|id| due.contains(id)));
    let rest = repo::schedule::claim_due(&db, Utc::now(), 2)
        .await
        .expect("third claim");
    assert_eq!(claimed_ids(rest), BTreeSet::new(), "all four were claimed");
}
