//! The Prometheus recorder behind `GET /metrics`: every `metrics::histogram!` is exposed as a
//! Prometheus histogram (`_bucket{le=…}`, `_sum`, `_count`), never as a summary. Summaries are
//! quantiles computed by one process: they cannot be added up across Herald's instances, and
//! `histogram_quantile()` finds nothing in them.

use std::time::Duration;

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

/// Upper bounds, in seconds, of the buckets of every histogram whose name ends in `_seconds`
/// (provider latency, the API's send stages, StatusWriter batches, lease rounds, SQLite
/// checkpoints): from half a millisecond (an API stage, a local sink) to a minute, the longest a
/// channel may take before the dispatcher stops waiting for it
/// ([`CHANNEL_ANSWER_TIMEOUT`](herald_actors::delivery::CHANNEL_ANSWER_TIMEOUT)).
pub const SECONDS_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Upper bounds of the buckets of `herald_smtp_group_messages` (messages per SMTP write), up to
/// the largest group the SMTP pool sends,
/// [`MAX_GROUP`](herald_actors::channel::smtp_pool::MAX_GROUP).
pub const SMTP_GROUP_BUCKETS: [f64; 7] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

/// Upper bounds of the buckets of every other histogram, counts of things
/// (`herald_status_batch_records`: records per StatusWriter batch, 1,000 at most by default).
pub const COUNT_BUCKETS: [f64; 14] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1_000.0, 2_000.0, 5_000.0, 10_000.0,
    20_000.0,
];

/// A Prometheus builder with the buckets above: `_seconds` histograms get
/// [`SECONDS_BUCKETS`], `herald_smtp_group_messages` [`SMTP_GROUP_BUCKETS`], and any other
/// histogram [`COUNT_BUCKETS`], so that none is rendered as a summary.
///
/// # Errors
///
/// [`BuildError::EmptyBucketsOrQuantiles`] if a bucket list were empty (they are constants that
/// are not).
pub fn builder() -> Result<PrometheusBuilder, BuildError> {
    PrometheusBuilder::new()
        .set_buckets(&COUNT_BUCKETS)?
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)?
        .set_buckets_for_metric(
            Matcher::Full("herald_smtp_group_messages".into()),
            &SMTP_GROUP_BUCKETS,
        )
}

/// How often [`spawn_upkeep`] folds the samples recorded since into the histograms.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Folds recorded histogram samples into their buckets every [`UPKEEP_INTERVAL`], on a thread of
/// its own for the life of the process. A recorder made with `build_recorder` (Herald serves
/// `/metrics` itself) keeps every sample until a scrape renders it: an instance nobody scrapes
/// grew by each notification's samples for ever.
pub fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_INTERVAL);
                handle.run_upkeep();
            }
        });
    if let Err(err) = spawned {
        tracing::warn!(error = %err, "cannot start the metrics upkeep thread; histogram samples are folded only when /metrics is scraped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Renders what `record` records through a recorder made by [`builder`].
    fn render(record: impl FnOnce()) -> String {
        let recorder = builder()
            .expect("the bucket constants are not empty")
            .build_recorder();
        metrics::with_local_recorder(&recorder, record);
        recorder.handle().render()
    }

    #[test]
    fn the_largest_buckets_are_the_largest_values() {
        assert_eq!(
            SMTP_GROUP_BUCKETS.last().copied(),
            Some(herald_actors::channel::smtp_pool::MAX_GROUP as f64)
        );
        assert_eq!(
            SECONDS_BUCKETS.last().copied(),
            Some(herald_actors::delivery::CHANNEL_ANSWER_TIMEOUT.as_secs_f64())
        );
    }

    #[test]
    fn every_histogram_is_a_prometheus_histogram() {
        let text = render(|| {
            metrics::histogram!("herald_attempt_seconds", "channel" => "email").record(0.003);
            metrics::histogram!("herald_status_batch_records").record(120.0);
            metrics::histogram!("herald_smtp_group_messages").record(3.0);
        });
        assert!(!text.contains("summary"), "{text}");
        assert!(!text.contains("quantile"), "{text}");
        for name in [
            "herald_attempt_seconds",
            "herald_status_batch_records",
            "herald_smtp_group_messages",
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} histogram")),
                "{name} is a histogram: {text}"
            );
            assert!(text.contains(&format!("{name}_sum")), "{text}");
            assert!(text.contains(&format!("{name}_count")), "{text}");
        }
        // Seconds buckets for a duration, the label kept on every bucket.
        assert!(
            text.contains("herald_attempt_seconds_bucket{channel=\"email\",le=\"0.005\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("herald_attempt_seconds_bucket{channel=\"email\",le=\"0.0025\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("herald_attempt_seconds_bucket{channel=\"email\",le=\"+Inf\"} 1"),
            "{text}"
        );
        // Count buckets for counts.
        assert!(
            text.contains("herald_status_batch_records_bucket{le=\"200\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("herald_status_batch_records_bucket{le=\"100\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("herald_smtp_group_messages_bucket{le=\"4\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("herald_smtp_group_messages_bucket{le=\"64\"} 1"),
            "{text}"
        );
        assert!(
            !text.contains("herald_smtp_group_messages_bucket{le=\"20000\"}"),
            "{text}"
        );
    }
}
