//! Database outages on demand, one honest way per backend:
//!
//! - PostgreSQL: Herald connects through a [`TcpProxy`] in front of the server. An outage closes
//!   the proxy's listening socket (new connections are refused, as when the server is down) and
//!   drops every established connection (pooled connections die mid-use).
//! - SQLite: another connection holds the database's write lock (`BEGIN EXCLUSIVE`), as a
//!   maintenance job or a second process would. Herald's writes wait out their busy timeout and
//!   fail with `database is locked`; reads go on (WAL mode), so the database is unwritable rather
//!   than unreachable.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use sea_orm::sqlx::{Connection as _, Executor as _, PgConnection, SqliteConnection};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::task::{JoinHandle, JoinSet};

use crate::{DatabaseKind, PgServer, TestDatabase};

/// A database whose availability the test controls.
pub struct DatabaseOutage {
    url: String,
    fault: Fault,
}

enum Fault {
    Postgres(TcpProxy),
    Sqlite {
        url: String,
        lock: Option<SqliteConnection>,
    },
}

impl DatabaseOutage {
    /// Prepares outages of `db`; Herald must use [`DatabaseOutage::url`] to be affected.
    pub async fn new(db: &TestDatabase) -> anyhow::Result<Self> {
        match db.kind() {
            DatabaseKind::Sqlite => Ok(Self {
                url: db.url().to_owned(),
                fault: Fault::Sqlite {
                    url: db.url().to_owned(),
                    lock: None,
                },
            }),
            DatabaseKind::Postgres => {
                let server = PgServer::from_env();
                let name = db.postgres_name().context("a PostgreSQL database name")?;
                let proxy = TcpProxy::start(Upstream::of(&server)).await?;
                Ok(Self {
                    url: format!("postgres://{}@{}/{name}", server.user, proxy.addr()),
                    fault: Fault::Postgres(proxy),
                })
            }
        }
    }

    /// The URL Herald connects with: through the proxy for PostgreSQL, the file for SQLite.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Makes the database unavailable to Herald until [`DatabaseOutage::end`].
    pub async fn begin(&mut self) -> anyhow::Result<()> {
        match &mut self.fault {
            Fault::Postgres(proxy) => {
                proxy.cut().await;
                Ok(())
            }
            Fault::Sqlite { url, lock } => {
                if lock.is_some() {
                    bail!("the SQLite outage has already begun");
                }
                let mut connection = SqliteConnection::connect(url)
                    .await
                    .context("opening a second SQLite connection")?;
                // Waits (busy timeout) for Herald's current write transaction, then holds the lock.
                connection
                    .execute("BEGIN EXCLUSIVE")
                    .await
                    .context("taking the SQLite write lock")?;
                *lock = Some(connection);
                Ok(())
            }
        }
    }

    /// Makes the database available again.
    pub async fn end(&mut self) -> anyhow::Result<()> {
        match &mut self.fault {
            Fault::Postgres(proxy) => proxy.restore().await,
            Fault::Sqlite { lock, .. } => {
                let mut connection = lock.take().context("no SQLite outage to end")?;
                connection
                    .execute("ROLLBACK")
                    .await
                    .context("releasing the SQLite write lock")?;
                connection
                    .close()
                    .await
                    .context("closing the lock holder")?;
                Ok(())
            }
        }
    }
}

/// Holds writes to `notifications` up without failing them, as a long transaction of another
/// client would: on SQLite the write lock (`BEGIN IMMEDIATE` on a second connection; Herald's
/// writes wait up to their 5 s busy timeout), on PostgreSQL `LOCK TABLE notifications IN SHARE
/// MODE` in an open transaction (writes wait, reads go on).
pub enum WriteHold {
    /// The SQLite connection holding the write lock.
    Sqlite(SqliteConnection),
    /// The PostgreSQL connection holding the table lock.
    Postgres(PgConnection),
}

impl WriteHold {
    /// Takes the lock on `db` (after Herald's current write transaction, if any).
    pub async fn take(db: &TestDatabase) -> anyhow::Result<Self> {
        match db.kind() {
            DatabaseKind::Sqlite => {
                let mut connection = SqliteConnection::connect(db.url()).await?;
                connection.execute("BEGIN IMMEDIATE").await?;
                Ok(Self::Sqlite(connection))
            }
            DatabaseKind::Postgres => {
                let mut connection = PgConnection::connect(db.url()).await?;
                connection.execute("BEGIN").await?;
                connection
                    .execute("LOCK TABLE notifications IN SHARE MODE")
                    .await?;
                Ok(Self::Postgres(connection))
            }
        }
    }

    /// Lets the waiting writes through.
    pub async fn release(self) -> anyhow::Result<()> {
        match self {
            Self::Sqlite(mut connection) => {
                connection.execute("ROLLBACK").await?;
                connection.close().await?;
            }
            Self::Postgres(mut connection) => {
                connection.execute("ROLLBACK").await?;
                connection.close().await?;
            }
        }
        Ok(())
    }
}

/// Where a [`TcpProxy`] forwards to.
#[derive(Debug, Clone)]
pub enum Upstream {
    /// A Unix socket, e.g. `/var/run/postgresql/.s.PGSQL.5432`.
    Unix(PathBuf),
    /// A TCP address, e.g. `db.internal:5432`.
    Tcp(String),
}

impl Upstream {
    /// The PostgreSQL server `server` listens on: its socket in a socket directory, or port 5432
    /// of a host name.
    pub fn of(server: &PgServer) -> Self {
        if server.host.starts_with('/') {
            Self::Unix(PathBuf::from(&server.host).join(".s.PGSQL.5432"))
        } else {
            Self::Tcp(format!("{}:5432", server.host))
        }
    }
}

/// A TCP proxy on `127.0.0.1` that can be cut (listener closed, connections dropped) and restored
/// on the same port.
pub struct TcpProxy {
    addr: SocketAddr,
    upstream: Upstream,
    serving: Option<JoinHandle<()>>,
}

impl TcpProxy {
    /// Starts forwarding from a free port on `127.0.0.1` to `upstream`.
    pub async fn start(upstream: Upstream) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the proxy")?;
        let addr = listener.local_addr().context("proxy address")?;
        let serving = Some(tokio::spawn(serve(listener, upstream.clone())));
        Ok(Self {
            addr,
            upstream,
            serving,
        })
    }

    /// The proxy's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes the listener (connections are refused) and every established connection.
    pub async fn cut(&mut self) {
        if let Some(serving) = self.serving.take() {
            serving.abort();
            // The task owns the listener and the connections: they are closed once it is gone.
            let _ = serving.await;
        }
    }

    /// Listens again on the same port.
    pub async fn restore(&mut self) -> anyhow::Result<()> {
        if self.serving.is_some() {
            return Ok(());
        }
        let listener = TcpListener::bind(self.addr)
            .await
            .with_context(|| format!("re-binding the proxy on {}", self.addr))?;
        self.serving = Some(tokio::spawn(serve(listener, self.upstream.clone())));
        Ok(())
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        if let Some(serving) = self.serving.take() {
            serving.abort();
        }
    }
}

/// Accepts connections and pipes each to the upstream; dropping this future closes them all.
async fn serve(listener: TcpListener, upstream: Upstream) {
    let mut pipes = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    pipes.spawn(pipe(client, upstream.clone()));
                }
                Err(err) => tracing::warn!(error = %err, "proxy accept failed"),
            },
            Some(_) = pipes.join_next(), if !pipes.is_empty() => {}
        }
    }
}

async fn pipe(mut client: TcpStream, upstream: Upstream) {
    let result = match upstream {
        Upstream::Unix(path) => match UnixStream::connect(&path).await {
            Ok(mut server) => tokio::io::copy_bidirectional(&mut client, &mut server)
                .await
                .map(drop),
            Err(err) => Err(err),
        },
        Upstream::Tcp(addr) => match TcpStream::connect(&addr).await {
            Ok(mut server) => tokio::io::copy_bidirectional(&mut client, &mut server)
                .await
                .map(drop),
            Err(err) => Err(err),
        },
    };
    if let Err(err) = result {
        tracing::debug!(error = %err, "proxied connection ended");
    }
}
