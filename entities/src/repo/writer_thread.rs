//! A thread of its own for a serial database writer (the StatusWriter's batches).
//!
//! A batch transaction is a chain of statements, and each one is awaited: on SQLite sqlx runs it
//! on the connection's worker thread and wakes the waiting task when it is done; on PostgreSQL the
//! task waits for the server's reply on its socket. On a busy runtime the woken task queues behind
//! every other ready task before it can send the next statement, so a writer that everything else
//! waits for spent most of its time in that queue rather than in the database. On a
//! single-threaded runtime of its own the writer is polled as soon as its statement is done.
//!
//! A PostgreSQL connection's socket belongs to the runtime that opened it, so a writer on this
//! thread uses a pool created here ([`WriterThread::run`] with
//! [`connect_batch_writer`](crate::connect_batch_writer)), not the main runtime's.

use std::future::Future;
use std::sync::Arc;

use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;

use super::RepoError;

/// A current-thread tokio runtime on a dedicated OS thread. Cloning shares it; the thread ends
/// when the last clone is dropped (work still running on it is cancelled).
#[derive(Clone, Debug)]
pub struct WriterThread {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    handle: Handle,
    /// Dropping it ends the thread's `block_on`.
    _stop: oneshot::Sender<()>,
}

impl WriterThread {
    /// Starts the thread, named `name` (visible in `top -H` and profiles). The runtime is built
    /// on the new thread, so it is never dropped inside the caller's async context.
    pub fn start(name: &str) -> std::io::Result<Self> {
        let (stop, stopped) = oneshot::channel::<()>();
        let (started, handle) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let runtime = match Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => runtime,
                    Err(err) => {
                        let _ = started.send(Err(err));
                        return;
                    }
                };
                let _ = started.send(Ok(runtime.handle().clone()));
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        let handle = handle.recv().map_err(|_| {
            std::io::Error::other("the writer thread ended before its runtime ran")
        })??;
        Ok(Self {
            inner: Arc::new(Inner {
                handle,
                _stop: stop,
            }),
        })
    }

    /// Runs `work` on the thread and returns its result. A panic in `work` resumes here;
    /// [`RepoError::WriterStopped`] if the thread ended before `work` finished.
    pub async fn run<T, F>(&self, work: F) -> Result<T, RepoError>
    where
        F: Future<Output = Result<T, RepoError>> + Send + 'static,
        T: Send + 'static,
    {
        match self.inner.handle.spawn(work).await {
            Ok(result) => result,
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(_) => Err(RepoError::WriterStopped),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_runs_on_the_named_thread_and_returns_its_result() {
        let thread = WriterThread::start("test-writer").expect("thread");
        let name = thread
            .run(async { Ok(std::thread::current().name().map(str::to_owned)) })
            .await
            .expect("ran");
        assert_eq!(name.as_deref(), Some("test-writer"));
        let refused = thread
            .run(async { Err::<(), _>(RepoError::WriterStopped) })
            .await;
        assert!(matches!(refused, Err(RepoError::WriterStopped)));
    }
}
