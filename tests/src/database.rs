//! A fresh, empty database per test: a SQLite file in a temporary directory or a
//! uniquely named database on the local PostgreSQL server.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Output;

use anyhow::{Context as _, bail};
use tempfile::TempDir;
use tokio::process::Command;

/// Environment variable choosing the backend of [`TestDatabase::from_env`]:
/// `sqlite` (default) or `postgres`.
pub const DB_KIND_ENV: &str = "HERALD_TEST_DB";
/// Environment variable overriding the PostgreSQL host: a socket directory
/// (default `/var/run/postgresql`) or a host name.
pub const PG_HOST_ENV: &str = "HERALD_TEST_PG_HOST";
/// Environment variable overriding the PostgreSQL user (default `root`).
pub const PG_USER_ENV: &str = "HERALD_TEST_PG_USER";
/// The maintenance database the harness connects to for CREATE/DROP DATABASE.
const ADMIN_DATABASE: &str = "postgres";

/// Which backend a [`TestDatabase`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatabaseKind {
    /// A SQLite file.
    Sqlite,
    /// A database on a PostgreSQL server.
    Postgres,
}

impl fmt::Display for DatabaseKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        })
    }
}

/// Where and as whom the harness reaches PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgServer {
    /// A Unix socket directory (starts with `/`) or a host name.
    pub host: String,
    /// The role to connect as.
    pub user: String,
}

impl PgServer {
    /// `$HERALD_TEST_PG_HOST` / `$HERALD_TEST_PG_USER`, defaulting to the local
    /// server's socket directory and `root`.
    pub fn from_env() -> Self {
        let var = |name: &str, default: &str| {
            std::env::var(name)
                .ok()
                .filter(|value| !value.is_empty())
                .unwrap_or_else(|| default.to_owned())
        };
        Self {
            host: var(PG_HOST_ENV, "/var/run/postgresql"),
            user: var(PG_USER_ENV, "root"),
        }
    }

    /// The connection URL of database `name` on this server.
    pub fn url(&self, name: &str) -> String {
        if self.host.starts_with('/') {
            // sea-orm parses the URL and needs a host; sqlx then takes the socket from `host=`.
            format!(
                "postgres://{}@localhost/{name}?host={}",
                self.user, self.host
            )
        } else {
            format!("postgres://{}@{}/{name}", self.user, self.host)
        }
    }

    /// Runs `sql` with `psql` against the maintenance database and returns its
    /// unaligned, tuples-only output (one row per line, trimmed).
    pub async fn admin_query(&self, sql: &str) -> anyhow::Result<String> {
        let output = Command::new("psql")
            .args(self.psql_args(sql))
            .kill_on_drop(true)
            .output()
            .await
            .context("running psql (is the postgresql-client package installed?)")?;
        self.check(sql, output)
    }

    /// Like [`PgServer::admin_query`], blocking the thread (for `Drop`).
    fn admin_query_blocking(&self, sql: &str) -> anyhow::Result<String> {
        let output = std::process::Command::new("psql")
            .args(self.psql_args(sql))
            .output()
            .context("running psql")?;
        self.check(sql, output)
    }

    fn psql_args(&self, sql: &str) -> Vec<String> {
        [
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            &self.host,
            "-U",
            &self.user,
            "-d",
            ADMIN_DATABASE,
            "-c",
            sql,
        ]
        .map(str::to_owned)
        .to_vec()
    }

    fn check(&self, sql: &str, output: Output) -> anyhow::Result<String> {
        if !output.status.success() {
            bail!(
                "psql -h {} -U {} -d {ADMIN_DATABASE} -c {sql:?} failed ({}): {}",
                self.host,
                self.user,
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }
}

/// What keeps a test database alive.
#[derive(Debug)]
enum Backing {
    /// The directory holding the SQLite file; removed on drop.
    Sqlite { _dir: TempDir, path: PathBuf },
    /// The PostgreSQL database; dropped on drop.
    Postgres { server: PgServer, name: String },
}

/// A fresh, empty database that exists as long as this value.
///
/// The schema is not created here: the application runs its migrations on it.
#[derive(Debug)]
pub struct TestDatabase {
    url: String,
    backing: Backing,
}

impl TestDatabase {
    /// A new SQLite database file `herald.db` in a new temporary directory, URL
    /// `sqlite:///…/herald.db`. The file is created empty, so connecting works with or
    /// without `?mode=rwc`.
    pub async fn sqlite() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("herald-sqlite-")
            .tempdir()
            .context("creating a temporary directory for SQLite")?;
        let path = dir.path().join("herald.db");
        tokio::fs::File::create(&path)
            .await
            .with_context(|| format!("creating {}", path.display()))?;
        let url = format!("sqlite://{}", path.display());
        Ok(Self {
            url,
            backing: Backing::Sqlite { _dir: dir, path },
        })
    }

    /// A new database `herald_test_<uuid>` on the PostgreSQL server named by
    /// `$HERALD_TEST_PG_HOST` / `$HERALD_TEST_PG_USER` (default: the local server's
    /// Unix socket as `root`). It is dropped, with its connections, on drop.
    pub async fn postgres() -> anyhow::Result<Self> {
        let server = PgServer::from_env();
        let name = format!("herald_test_{}", uuid::Uuid::new_v4().simple());
        server
            .admin_query(&format!("CREATE DATABASE \"{name}\""))
            .await
            .context("creating a PostgreSQL test database")?;
        Ok(Self {
            url: server.url(&name),
            backing: Backing::Postgres { server, name },
        })
    }

    /// [`TestDatabase::sqlite`] or [`TestDatabase::postgres`] as `$HERALD_TEST_DB`
    /// says (`sqlite`, the default, or `postgres`), so one suite runs on both.
    pub async fn from_env() -> anyhow::Result<Self> {
        let choice = std::env::var(DB_KIND_ENV).unwrap_or_default();
        match choice.to_ascii_lowercase().as_str() {
            "" | "sqlite" => Self::sqlite().await,
            "postgres" | "postgresql" | "pg" => Self::postgres().await,
            other => bail!("{DB_KIND_ENV}={other:?}: expected `sqlite` or `postgres`"),
        }
    }

    /// The connection URL for the application (`sqlite:///…` or `postgres://…`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Which backend this database runs on.
    pub fn kind(&self) -> DatabaseKind {
        match self.backing {
            Backing::Sqlite { .. } => DatabaseKind::Sqlite,
            Backing::Postgres { .. } => DatabaseKind::Postgres,
        }
    }

    /// The SQLite file, for a SQLite database.
    pub fn sqlite_path(&self) -> Option<&Path> {
        match &self.backing {
            Backing::Sqlite { path, .. } => Some(path),
            Backing::Postgres { .. } => None,
        }
    }

    /// The database name, for a PostgreSQL database.
    pub fn postgres_name(&self) -> Option<&str> {
        match &self.backing {
            Backing::Sqlite { .. } => None,
            Backing::Postgres { name, .. } => Some(name),
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Backing::Postgres { server, name } = &self.backing {
            // Best effort: a leftover herald_test_* database is harmless but noisy.
            let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
            if let Err(error) = server.admin_query_blocking(&sql) {
                tracing::warn!(error = %format!("{error:#}"), "dropping test database {name}");
            }
        }
    }
}

/// A pool on the database at `url` with every migration applied, as `herald serve` applies them
/// at start-up.
pub async fn migrated(url: &str) -> anyhow::Result<sea_orm::DatabaseConnection> {
    let mut config = herald_engine::Config::default();
    config.database.url = url.to_string();
    herald_engine::app::migrate(&config).await
}
