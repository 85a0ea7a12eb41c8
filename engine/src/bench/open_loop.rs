//! Open-loop HTTP load: `POST /api/v1/notifications` at a fixed request rate, scheduled by the
//! clock rather than by the previous answer.
//!
//! A closed-loop client (send, wait, send) slows down when the server does and so never measures
//! the requests it did not send meanwhile — coordinated omission. Here request `i` is due at
//! `start + i / rate` whatever happened before, runs as its own task, and its latency is counted
//! from when it was *due*, so a stall shows up in the percentiles of every request it delayed.
//! At most `--concurrency` requests are on the wire at once (as many pooled connections, like a
//! fleet of clients with keep-alive); a request that finds them all busy waits, and that wait is
//! part of its latency. Without the cap a stalled server would be hit by a connection storm that
//! exhausts file descriptors and measures the client instead.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;

use super::Percentiles;
use super::load::{Recipients, http_body};

/// A request that has not answered within this counts as an error (`timeout`).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What the HTTP calls of an open-loop run saw.
#[derive(Debug, Serialize)]
pub struct HttpReport {
    /// The rate requests were scheduled at, per second.
    pub target_rate_per_sec: f64,
    /// Requests sent.
    pub requests: u64,
    /// Requests answered `202 Accepted`.
    pub accepted: u64,
    /// Requests that failed, by cause (`status 503`, `timeout`, `connect`, …).
    pub errors: BTreeMap<String, u64>,
    /// Requests answered per second over the run (from the first due time to the last answer).
    pub achieved_rate_per_sec: f64,
    /// Latency of every request, due time → answer, in milliseconds.
    pub latency_ms: Percentiles,
}

/// One request's outcome: its latency from its due time and its error, if any.
type Outcome = (Duration, Option<String>);

/// Sends `count` requests to `{base_url}/api/v1/notifications` at `rate` per second over one
/// pooled HTTP client with at most `connections` requests in flight; answers when the last one has
/// answered.
pub async fn send_at_rate(
    base_url: &str,
    count: u64,
    recipients: Recipients,
    rate: f64,
    connections: usize,
) -> anyhow::Result<HttpReport> {
    anyhow::ensure!(rate > 0.0, "--rate must be positive");
    let wire = Arc::new(Semaphore::new(connections.max(1)));
    let http = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()?;
    let url = format!("{base_url}/api/v1/notifications");
    let (outcomes, mut results) = mpsc::unbounded_channel::<Outcome>();
    let started = Instant::now();
    let schedule = tokio::spawn(async move {
        for i in 0..count {
            let due = started + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due).await;
            let request = http.post(&url).json(&http_body(i, recipients));
            let outcomes = outcomes.clone();
            let wire = wire.clone();
            tokio::spawn(async move {
                let error = match wire.acquire_owned().await {
                    Ok(_on_the_wire) => classify(request.send().await),
                    Err(_) => Some("client closed".into()),
                };
                let _ = outcomes.send((due.elapsed(), error));
            });
        }
    });
    let mut histogram = Histogram::<u64>::new(3)?;
    let mut errors = BTreeMap::new();
    let mut answered = 0u64;
    // Every sender (the scheduler's and each request's clone) is gone once the last request has
    // answered, which ends this loop.
    while let Some((latency, error)) = results.recv().await {
        answered += 1;
        histogram.record((latency.as_micros() as u64).max(1))?;
        if let Some(error) = error {
            *errors.entry(error).or_insert(0) += 1;
        }
    }
    schedule.await?;
    let seconds = started.elapsed().as_secs_f64();
    let failed: u64 = errors.values().sum();
    Ok(HttpReport {
        target_rate_per_sec: rate,
        requests: answered,
        accepted: answered - failed,
        errors,
        achieved_rate_per_sec: answered as f64 / seconds,
        latency_ms: Percentiles::from_micros(&histogram),
    })
}

/// `None` for `202 Accepted`, else a short cause to count.
fn classify(response: reqwest::Result<reqwest::Response>) -> Option<String> {
    match response {
        Ok(r) if r.status() == reqwest::StatusCode::ACCEPTED => None,
        Ok(r) => Some(format!("status {}", r.status().as_u16())),
        Err(e) if e.is_timeout() => Some("timeout".into()),
        Err(e) if e.is_connect() => Some("connect".into()),
        Err(_) => Some("transport".into()),
    }
}

/// A one-line rendering of the report.
pub fn describe(r: &HttpReport) -> String {
    let errors = if r.errors.is_empty() {
        "no errors".to_string()
    } else {
        r.errors
            .iter()
            .map(|(cause, n)| format!("{n} × {cause}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "{} requests at {:.0}/s (target {:.0}/s), {} accepted, {errors}",
        r.requests, r.achieved_rate_per_sec, r.target_rate_per_sec, r.accepted
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_listed_by_cause() {
        let report = HttpReport {
            target_rate_per_sec: 100.0,
            requests: 10,
            accepted: 7,
            errors: BTreeMap::from([("status 503".to_string(), 2), ("timeout".to_string(), 1)]),
            achieved_rate_per_sec: 99.6,
            latency_ms: Percentiles {
                p50: 1.0,
                p95: 2.0,
                p99: 3.0,
                max: 4.0,
            },
        };
        assert_eq!(
            describe(&report),
            "10 requests at 100/s (target 100/s), 7 accepted, 2 × status 503, 1 × timeout"
        );
    }
}
