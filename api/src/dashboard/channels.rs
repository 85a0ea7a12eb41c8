//! `/channels`: every provider of this instance — circuit state (and when an open one probes),
//! in-flight sends, the error rate of its attempts over the last hour, and its last failure — and
//! the command partitions this instance owns.

use chrono::{Duration, Utc};
use herald_entities::repo::activity::{self, AttemptOutcome};
use poem::{Response, web::Data};

use super::{Dashboard, html, page_error, session::Session, when};
use crate::engine_view::{ChannelView, PartitionsView};

/// The window the error rate is computed over.
const RATE_WINDOW_MINUTES: i64 = 60;

/// One provider as shown.
pub(crate) struct ChannelRow {
    pub view: ChannelView,
    /// Attempts in the window.
    pub attempts: i64,
    /// Share of them that did not succeed, e.g. `25.0 %`; `–` without attempts.
    pub error_rate: String,
    /// When an open circuit lets its next probe through, UTC; `–` while closed or half-open.
    pub probe_at: String,
}

#[derive(askama::Template)]
#[template(path = "dashboard/channels.html")]
struct ChannelsPage {
    signed_in: bool,
    session: Session,
    rows: Vec<ChannelRow>,
    partitions: PartitionsView,
    owned: String,
}

/// `GET /channels`.
#[poem::handler]
pub(crate) async fn page(
    session: Session,
    Data(dashboard): Data<&Dashboard>,
) -> poem::Result<Response> {
    let since = Utc::now() - Duration::minutes(RATE_WINDOW_MINUTES);
    let outcomes = activity::attempt_outcomes(&dashboard.state.db, since)
        .await
        .map_err(|e| page_error(e.into()))?;
    let rows = dashboard
        .state
        .engine
        .channels()
        .await
        .into_iter()
        .map(|view| row(view, &outcomes))
        .collect();
    let partitions = dashboard.state.engine.partitions();
    let owned = partitions
        .owned
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    html(&ChannelsPage {
        signed_in: true,
        session,
        rows,
        partitions,
        owned,
    })
}

fn row(view: ChannelView, outcomes: &[AttemptOutcome]) -> ChannelRow {
    let (attempts, failed) = outcomes
        .iter()
        .filter(|o| o.channel == view.state.channel && o.provider == view.state.provider)
        .fold((0, 0), |(all, failed), o| {
            let bad = if o.status == "sent" { 0 } else { o.count };
            (all + o.count, failed + bad)
        });
    ChannelRow {
        probe_at: view.state.probe_at.map_or_else(|| "–".into(), when),
        view,
        attempts,
        error_rate: error_rate(attempts, failed),
    }
}

fn error_rate(attempts: i64, failed: i64) -> String {
    if attempts == 0 {
        "–".into()
    } else {
        format!("{:.1} %", failed as f64 * 100.0 / attempts as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine_view::ChannelCircuit;

    fn outcome(provider: &str, status: &str, count: i64) -> AttemptOutcome {
        AttemptOutcome {
            channel: "telegram".into(),
            provider: provider.into(),
            status: status.into(),
            count,
        }
    }

    /// The telegram provider's view with its circuit `circuit`, probing at `probe_at`.
    fn telegram(circuit: &str, probe_at: Option<chrono::DateTime<Utc>>) -> ChannelView {
        ChannelView {
            state: ChannelCircuit {
                channel: "telegram".into(),
                provider: "telegram".into(),
                circuit: circuit.into(),
                throttled: false,
                recent_failures: 0,
                times_opened: 0,
                probe_at,
                in_flight: 0,
                sent: 0,
                failed: 0,
                refused: 0,
            },
            last_error: None,
        }
    }

    #[test]
    fn the_error_rate_counts_every_unsuccessful_outcome_of_that_provider() {
        let outcomes = [
            outcome("telegram", "sent", 3),
            outcome("telegram", "failed", 1),
            outcome("telegram", "circuit_open", 0),
            outcome("other", "failed", 9),
        ];
        let row = row(telegram("closed", None), &outcomes);
        assert_eq!(row.attempts, 4);
        assert_eq!(row.error_rate, "25.0 %");
        assert_eq!(error_rate(0, 0), "–");
        assert_eq!(row.probe_at, "–", "closed: no probe");
    }

    #[test]
    fn an_open_circuit_shows_when_it_probes() {
        let probe_at = "2026-12-06T17:05:09Z".parse().expect("a time");
        let row = row(telegram("open", Some(probe_at)), &[]);
        assert_eq!(row.probe_at, "2026-12-06 17:05:09");
    }
}
