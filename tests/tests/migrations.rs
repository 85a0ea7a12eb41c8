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
