//! Herald's SeaORM entities and the queries on them.
//!
//! Entities are the database's shape; wire types (NATS envelopes, API bodies) live elsewhere and are
//! converted at the edges (a stored notification's send command is rebuilt in one place,
//! [`repo::notifications::send_command`], for the Router, the scheduler and the API). Queries are
//! grouped per table in [`repo`].

pub mod api_key;
pub mod batch;
pub mod checkpoint;
pub mod customer;
pub mod dashboard_logout;
pub mod delivery_attempt;
pub mod held_receipt;
pub mod notification;
pub mod order;
pub mod outage;
pub mod outbox_event;
pub mod preference;
pub mod quiet_hours;
pub mod repo;
pub mod status;
pub mod template;
pub mod write_gate;

pub use checkpoint::{Checkpointer, Checkpoints};
pub use repo::RepoError;
pub use status::NotificationStatus;
pub use write_gate::WriteGate;

use std::time::Duration;

use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{ConnectOptions, Database, DatabaseConnection, DbErr};

/// How long a SQLite statement waits for another connection's write lock.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// A pooled connection idle this long is tested (pinged) before it is handed out again.
///
/// sqlx tests every PostgreSQL connection when it is given back (a ping, off the caller's path;
/// SQLite's are not, their pools turn `test_on_release` off) and, by default, again every time it
/// is taken: a round trip, on the caller's path, before each query or transaction (to SQLite's
/// worker thread, or to the PostgreSQL server). A connection that failed while in use is closed by
/// the test on release; one taken again within this time skips the test before use. Only a
/// connection left idle longer (which a server restart or a firewall may have cut meanwhile) is
/// tested before use.
pub const PING_WHEN_IDLE_FOR: Duration = Duration::from_secs(1);

/// Longest a query waits for a pooled connection. When the server is unreachable every new
/// connection is refused and the pool keeps trying until this passes: the caller then gets an
/// error it can act on (the API a 503, the StatusWriter a retry that keeps its messages in
/// progress) instead of hanging for sqlx's default 30 s, as long as JetStream's default ack wait.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens a connection pool. SQLite files are created if missing and run in WAL mode with
/// `synchronous=NORMAL` (durable across process crashes, fast batched writes) and a busy timeout,
/// so readers never block the writer. A query waits at most [`ACQUIRE_TIMEOUT`] for a connection.
pub async fn connect(url: &str, max_connections: u32) -> Result<DatabaseConnection, DbErr> {
    connect_with(url, max_connections, Checkpoints::OnCommit).await
}

/// Like [`connect`], with SQLite's log checkpointed as `checkpoints` says: a long-running engine
/// opens its pools with [`Checkpoints::Background`] and runs a [`Checkpointer`].
pub async fn connect_with(
    url: &str,
    max_connections: u32,
    checkpoints: Checkpoints,
) -> Result<DatabaseConnection, DbErr> {
    let mut options = options(url, max_connections, checkpoints, TempStore::Default);
    options.test_before_acquire_if_idle_for(PING_WHEN_IDLE_FOR);
    Database::connect(options).await
}

/// The pool of a batch writer (the StatusWriter): like [`connect_with`], but on PostgreSQL it opens no
/// connection until the first query needs one, so it succeeds while the server is down (on SQLite
/// sea-orm opens one at once to read the library's version), and SQLite keeps its temporary data
/// in memory. The pool's connections and upkeep belong to the runtime it is created on (see
/// [`repo::writer_thread::WriterThread`]).
///
/// Each multi-row statement of a batch transaction keeps a statement journal (to undo itself
/// alone); beyond 64 KiB SQLite moves it to a temporary file, which cost an open, writes and a
/// close per statement, about a tenth of the SQLite worker threads' time in a profile. A batch is
/// bounded (`status_writer.max_batch` records), and so is its journal. Other pools keep SQLite's
/// default, under which a large sort (an index built by a migration, an unindexed `GROUP BY`)
/// spills to disk instead of growing in memory.
pub async fn connect_batch_writer(
    url: &str,
    max_connections: u32,
    checkpoints: Checkpoints,
) -> Result<DatabaseConnection, DbErr> {
    let mut options = options(url, max_connections, checkpoints, TempStore::Memory);
    options
        .connect_lazy(true)
        .test_before_acquire_if_idle_for(PING_WHEN_IDLE_FOR);
    Database::connect(options).await
}

/// The pool of the writers that take turns at a [`WriteGate`] on the engine's runtime (the
/// [`InsertQueue`](repo::insert_queue::InsertQueue), the dispatcher's claims). On SQLite it is
/// one connection of their own: SQLite drops a connection's page cache whenever another
/// connection has committed, so writers taking turns on `main`'s connections read back nearly
/// every page they touched, from the log or the file, at the start of each transaction. Sharing
/// one connection (they never write at the same time), they find the pages of each other's last
/// transactions still cached. A writer that stops waiting for its turn
/// ([`LONGEST_WAIT`](write_gate::LONGEST_WAIT)) waits for the connection instead, until the writer
/// holding it is done. On PostgreSQL, whose pages are cached by the server, it is `main`.
pub async fn connect_gated_writers(
    main: &DatabaseConnection,
    url: &str,
    checkpoints: Checkpoints,
) -> Result<DatabaseConnection, DbErr> {
    if is_sqlite(url) {
        connect_with(url, 1, checkpoints).await
    } else {
        Ok(main.clone())
    }
}

/// A single PostgreSQL session for state that lives as long as the session, such as an advisory
/// lock: the pool never closes it for idleness or age (sqlx's defaults close a connection idle
/// for 10 minutes or older than 30), and never quietly replaces it (no test before each use, no
/// minimum number of connections), so a statement after the session was lost fails instead of
/// running on a new session without the lock.
pub async fn connect_session(url: &str) -> Result<DatabaseConnection, DbErr> {
    let mut options = options(url, 1, Checkpoints::OnCommit, TempStore::Default);
    options
        .idle_timeout(None)
        .max_lifetime(None)
        .test_before_acquire(false);
    Database::connect(options).await
}

/// Whether `url` names an SQLite database.
pub fn is_sqlite(url: &str) -> bool {
    url.starts_with("sqlite:")
}

/// The database file an SQLite URL names (`sqlite://PATH` or `sqlite:PATH`, options after `?`),
/// with `%` escapes decoded as sqlx decodes them (`my%20data.db` is `my data.db`); `None` for an
/// in-memory database (`:memory:`, `mode=memory`) and for other databases.
pub fn sqlite_file(url: &str) -> Option<std::path::PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let (path, options) = rest.split_once('?').unwrap_or((rest, ""));
    let in_memory = path.trim_start_matches('/') == ":memory:"
        || options.split('&').any(|option| option == "mode=memory");
    let decoded = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
    (!path.is_empty() && !in_memory).then(|| std::path::PathBuf::from(decoded.as_ref()))
}

/// Whether `url` names an in-memory SQLite database.
pub fn is_in_memory_sqlite(url: &str) -> bool {
    is_sqlite(url) && sqlite_file(url).is_none()
}

/// Where an SQLite connection keeps temporary data (statement journals, sorts).
#[derive(Debug, Clone, Copy)]
enum TempStore {
    /// SQLite's default: in files, once past a small size.
    Default,
    /// In memory (`temp_store=memory`).
    Memory,
}

/// Whether SQLite connections are pinged when given back to their pool (sqlx always does; the
/// option is Herald's, `vendor/sqlx-core/HERALD.md`). Off: such a ping is a round trip to the
/// connection's worker thread at every release, and that thread runs every command in the order it
/// was sent (a transaction dropped unfinished is rolled back before the next user's first
/// command), so it finds nothing to wait for. Measured at 2,000 API sends/s on SQLite, three
/// interleaved pairs: the bench process's CPU per request 569 / 557 / 561 → 519 / 526 / 526 µs,
/// HTTP p99 6.60 / 6.54 / 5.71 → 5.59 / 5.05 / 5.75 ms. PostgreSQL pools keep the ping, which
/// drains what a cancelled query left on the wire (off, the same API load measured no faster).
const RELEASE_TEST_ON_SQLITE: bool = false;

fn options(
    url: &str,
    max_connections: u32,
    checkpoints: Checkpoints,
    temp: TempStore,
) -> ConnectOptions {
    let url = if is_sqlite(url) && !url.contains("mode=") {
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}mode=rwc")
    } else {
        url.to_string()
    };
    let mut options = ConnectOptions::new(url);
    options
        .max_connections(max_connections)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .sqlx_logging(false)
        .map_sqlx_sqlite_pool_opts(|pool| pool.test_on_release(RELEASE_TEST_ON_SQLITE))
        // Pragmas such as `synchronous` hold per connection: they are set on every connection
        // the pool opens (a `PRAGMA` statement would reach only the one connection running it).
        .map_sqlx_sqlite_opts(move |sqlite| {
            let sqlite = sqlite
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(SQLITE_BUSY_TIMEOUT)
                .foreign_keys(true);
            let sqlite = match temp {
                TempStore::Default => sqlite,
                TempStore::Memory => sqlite.pragma("temp_store", "memory"),
            };
            match checkpoints {
                Checkpoints::OnCommit => sqlite,
                Checkpoints::Background => sqlite.pragma("wal_autocheckpoint", "0").pragma(
                    "journal_size_limit",
                    checkpoint::JOURNAL_SIZE_LIMIT.to_string(),
                ),
            }
        });
    options
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_urls_name_their_file_or_memory() {
        let file = |url| {
            let path = sqlite_file(url)?;
            Some(path.to_str().expect("UTF-8").to_owned())
        };
        assert_eq!(
            file("sqlite://data/herald.db?mode=rwc").as_deref(),
            Some("data/herald.db")
        );
        assert_eq!(
            file("sqlite:data/herald.db").as_deref(),
            Some("data/herald.db")
        );
        assert_eq!(
            file("sqlite:///var/lib/herald.db").as_deref(),
            Some("/var/lib/herald.db")
        );
        assert_eq!(
            file("sqlite://data/my%20data%3F.db?mode=rwc").as_deref(),
            Some("data/my data?.db"),
            "escapes decoded as sqlx decodes them"
        );
        for memory in [
            "sqlite::memory:",
            "sqlite://:memory:",
            "sqlite://shared?mode=memory&cache=shared",
        ] {
            assert_eq!(file(memory), None, "{memory}");
            assert!(is_in_memory_sqlite(memory), "{memory}");
        }
        assert!(!is_in_memory_sqlite("sqlite://data/herald.db"));
        assert!(!is_in_memory_sqlite("postgres://db/herald"));
        assert_eq!(file("postgres://db/herald"), None);
    }

    #[tokio::test]
    async fn gated_writers_share_one_sqlite_connection_of_their_own() {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("herald.db").display());
        let main = connect(&url, 8).await.expect("main pool");
        let writers = connect_gated_writers(&main, &url, Checkpoints::OnCommit)
            .await
            .expect("writers' pool");
        let max = |db: &DatabaseConnection| {
            db.get_sqlite_connection_pool()
                .options()
                .get_max_connections()
        };
        assert_eq!(max(&writers), 1);
        assert_eq!(max(&main), 8, "the main pool is left as it was");
    }

    /// Without the ping on release, a transaction dropped unfinished is still rolled back before
    /// the next user of its connection runs anything: the connection's worker thread keeps order.
    #[tokio::test]
    async fn sqlite_connections_go_back_untested_and_in_order() {
        use sea_orm::{ConnectionTrait, TransactionTrait};
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("herald.db").display());
        let db = connect(&url, 1).await.expect("pool");
        let options = db.get_sqlite_connection_pool().options();
        assert!(
            !options.get_test_on_release(),
            "SQLite pools skip the release ping"
        );
        let run = |sql: &'static str| db.execute_unprepared(sql);
        run("CREATE TABLE t (n INTEGER PRIMARY KEY)")
            .await
            .expect("table");

        let dropped = db.begin().await.expect("begin");
        dropped
            .execute_unprepared("INSERT INTO t VALUES (1)")
            .await
            .expect("insert 1");
        drop(dropped);
        run("INSERT INTO t VALUES (2)")
            .await
            .expect("insert 2 on the same connection");
        let next = db.begin().await.expect("a new top-level transaction");
        next.execute_unprepared("INSERT INTO t VALUES (3)")
            .await
            .expect("insert 3");
        next.commit().await.expect("commit");

        let rows = db
            .query_all_raw(sea_orm::Statement::from_string(
                db.get_database_backend(),
                "SELECT n FROM t ORDER BY n",
            ))
            .await
            .expect("select");
        let numbers: Vec<i64> = rows
            .iter()
            .map(|row| row.try_get("", "n").expect("n"))
            .collect();
        assert_eq!(
            numbers,
            [2, 3],
            "the dropped transaction's row is gone, the others stay"
        );
    }
}
