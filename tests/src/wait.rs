//! Bounded waits: the one primitive every end-to-end test uses to wait for an
//! external system (a database row, an HTTP endpoint, a server port) to reach a state.

use std::future::Future;
use std::net::{Ipv4Addr, TcpListener};
use std::time::Duration;

use anyhow::Context as _;
use tokio::time::Instant;

/// First pause between two polls of [`eventually`].
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
/// Longest pause between two polls of [`eventually`].
const MAX_BACKOFF: Duration = Duration::from_millis(200);

/// Polls `check` until it returns `Some(value)` and returns that value.
///
/// Pauses between polls start at 10 ms and double up to 200 ms. A single poll that
/// is still running at the deadline is abandoned.
///
/// # Panics
///
/// When `timeout` elapses first, with a message naming `what` and the time waited,
/// so a failing test says what it was waiting for. [`eventually_showing`] also says
/// what the last poll saw.
pub async fn eventually<F, Fut, T>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    poll_until(what, timeout, || {
        let polled = check();
        async move { polled.await.ok_or(None) }
    })
    .await
}

/// Like [`eventually`], for a `check` that describes what it saw when the state is not reached
/// yet: `Ok(value)` ends the wait, `Err(seen)` polls again.
///
/// # Panics
///
/// When `timeout` elapses first, with a message naming `what`, the time waited and the last
/// `seen` (from the last poll that finished), so a failing test shows how far the system got.
pub async fn eventually_showing<F, Fut, T>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    poll_until(what, timeout, || {
        let polled = check();
        async move { polled.await.map_err(Some) }
    })
    .await
}

/// The loop of [`eventually`] and [`eventually_showing`]: `Err(Some(seen))` is a poll that
/// describes its state, `Err(None)` one that does not.
async fn poll_until<F, Fut, T>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Option<String>>>,
{
    let started = Instant::now();
    let deadline = started + timeout;
    let mut backoff = FIRST_BACKOFF;
    let mut polls = 0_u32;
    let mut last_seen = None;
    loop {
        polls += 1;
        match tokio::time::timeout_at(deadline, check()).await {
            Ok(Ok(value)) => return value,
            Ok(Err(seen)) => last_seen = seen.or(last_seen),
            Err(_) => break,
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        tokio::time::sleep(backoff.min(deadline - now)).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    let seen = last_seen.map_or_else(String::new, |seen| format!("; last seen: {seen}"));
    panic!(
        "timed out after {:.2?} (limit {timeout:?}, {polls} polls) waiting for {what}{seen}",
        started.elapsed()
    );
}

/// Returns a TCP port on 127.0.0.1 that was free a moment ago.
///
/// The port is released before returning, so another process may take it in between:
/// callers that bind it should retry with a new port when the bind fails.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .context("binding 127.0.0.1:0 to find a free port")?;
    Ok(listener
        .local_addr()
        .context("reading the address of a listener on 127.0.0.1:0")?
        .port())
}
