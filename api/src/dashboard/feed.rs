//! `/`: the activity feed — the latest notifications with filters, reloading itself every few
//! seconds (a `<meta http-equiv="refresh">`, so no JavaScript), under throughput and latency plots
//! of the last hour.

use chrono::Utc;
use herald_entities::{
    NotificationStatus,
    repo::{
        activity,
        history::{self, FeedLine, HistoryFilter},
    },
};
use herald_nats::{Category, Channel};
use poem::{
    Response,
    web::{Data, Query},
};
use sea_orm::Iterable;
use serde::Deserialize;

use super::{
    Dashboard, html, page_error,
    plots::{self, MinuteRow, Plot, Window},
    session::Session,
    when,
};
use crate::{ApiError, validate::plain_text};

/// Notifications listed.
const FEED_SIZE: u64 = 100;
/// Minutes plotted.
const PLOT_MINUTES: u32 = 60;
/// Sends per minute whose latencies make the minute's percentiles (the latest accepted in it).
const LATENCY_PER_MINUTE: u64 = 200;

/// The feed's query: filters (empty means any) and the auto-refresh switch.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct FeedQuery {
    #[serde(default)]
    status: String,
    #[serde(default)]
    channel: String,
    #[serde(default)]
    category: String,
    #[serde(default)]
    customer: String,
    /// `off` stops the automatic reload.
    #[serde(default)]
    refresh: String,
}

/// One row of the feed.
pub(crate) struct FeedRow {
    pub id: String,
    pub created: String,
    pub status: &'static str,
    pub channel: String,
    pub category: String,
    pub customer: String,
    pub subject: String,
    /// Why it is in its status (skipped, deferred, dead), shortened.
    pub reason: String,
}

#[derive(askama::Template)]
#[template(path = "dashboard/feed.html")]
struct FeedPage {
    signed_in: bool,
    session: Session,
    query: FeedQuery,
    refresh_secs: Option<u32>,
    /// The query string that toggles the refresh, filters kept.
    toggle_refresh: String,
    statuses: Vec<&'static str>,
    channels: Vec<&'static str>,
    categories: Vec<&'static str>,
    rows: Vec<FeedRow>,
    throughput: Plot,
    latency: Plot,
    minutes: Vec<MinuteRow>,
}

/// `GET /`.
#[poem::handler]
pub(crate) async fn page(
    session: Session,
    Data(dashboard): Data<&Dashboard>,
    Query(query): Query<FeedQuery>,
) -> poem::Result<Response> {
    let (filter, customer) = filter(&query).map_err(page_error)?;
    let db = &dashboard.state.db;
    let rows = history::feed(db, &filter, customer.as_deref(), FEED_SIZE)
        .await
        .map_err(|e| page_error(e.into()))?;
    let window = Window::ending(Utc::now(), PLOT_MINUTES);
    let counts = activity::per_minute(db, window.start, PLOT_MINUTES)
        .await
        .map_err(|e| page_error(e.into()))?;
    let latencies =
        activity::latencies_per_minute(db, window.start, PLOT_MINUTES, LATENCY_PER_MINUTE)
            .await
            .map_err(|e| page_error(e.into()))?;
    let per_minute = plots::grouped(&window, &counts);
    let percentiles = plots::percentiles(&window, &latencies);
    let refresh_on = query.refresh != "off";
    html(&FeedPage {
        signed_in: true,
        toggle_refresh: toggle_refresh(&query, refresh_on),
        refresh_secs: refresh_on.then_some(dashboard.settings.refresh_secs.max(1)),
        session,
        statuses: NotificationStatus::iter().map(|s| s.as_str()).collect(),
        channels: Channel::ALL.iter().map(|c| c.as_str()).collect(),
        categories: Category::ALL.iter().map(|c| c.as_str()).collect(),
        rows: rows.into_iter().map(row).collect(),
        throughput: plots::throughput(&window, &per_minute),
        latency: plots::latency(&window, &percentiles),
        minutes: plots::rows(&window, &per_minute, &percentiles),
        query,
    })
}

/// The history filter the query asks for, and the customer column's value asked for (a
/// customer id or an inline contact, as the feed shows them); 400 naming a value that is not
/// one.
fn filter(query: &FeedQuery) -> Result<(HistoryFilter, Option<String>), ApiError> {
    let status = match given(&query.status) {
        Some(name) => Some(
            NotificationStatus::iter()
                .find(|s| s.as_str() == name)
                .ok_or_else(|| ApiError::invalid("status", format!("no status {name:?}")))?,
        ),
        None => None,
    };
    let channel = match given(&query.channel) {
        Some(name) => Some(
            Channel::parse(name)
                .ok_or_else(|| ApiError::invalid("channel", format!("no channel {name:?}")))?
                .as_str()
                .to_string(),
        ),
        None => None,
    };
    let category = match given(&query.category) {
        Some(name) => Some(
            Category::parse(name)
                .ok_or_else(|| ApiError::invalid("category", format!("no category {name:?}")))?
                .as_str()
                .to_string(),
        ),
        None => None,
    };
    let customer = given(&query.customer).map(str::to_string);
    if let Some(customer) = &customer {
        plain_text("customer", customer)?;
    }
    let filter = HistoryFilter {
        status,
        channel,
        category,
        ..HistoryFilter::default()
    };
    Ok((filter, customer))
}

/// The trimmed value, `None` when empty.
fn given(value: &str) -> Option<&str> {
    Some(value.trim()).filter(|s| !s.is_empty())
}

/// `?status=..&...&refresh=off` (or without `refresh` to turn it back on).
fn toggle_refresh(query: &FeedQuery, refresh_on: bool) -> String {
    let mut pairs = vec![
        ("status", query.status.as_str()),
        ("channel", query.channel.as_str()),
        ("category", query.category.as_str()),
        ("customer", query.customer.as_str()),
    ];
    if refresh_on {
        pairs.push(("refresh", "off"));
    }
    let encoded = pairs
        .into_iter()
        .filter(|(_, value)| !value.is_empty())
        .map(|(name, value)| format!("{name}={}", urlencode(value)))
        .collect::<Vec<_>>()
        .join("&");
    format!("?{encoded}")
}

fn urlencode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

fn row(n: FeedLine) -> FeedRow {
    let customer = n.shown_as().to_string();
    let subject = n
        .subject
        .filter(|s| !s.is_empty())
        .or_else(|| {
            n.template_code
                .map(|code| super::detail::template_label(&code, n.template_locale.as_deref()))
        })
        .unwrap_or_default();
    FeedRow {
        id: n.id.to_string(),
        created: when(n.created_at),
        status: n.status.as_str(),
        channel: n.final_channel.unwrap_or_else(|| {
            serde_json::from_value::<Vec<String>>(n.channels)
                .unwrap_or_default()
                .join(" → ")
        }),
        category: n.category,
        customer,
        subject: subject.chars().take(80).collect(),
        reason: n
            .status_reason
            .unwrap_or_default()
            .chars()
            .take(80)
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_and_refuse_unknown_values() {
        let query = FeedQuery {
            status: "dead".into(),
            channel: " telegram ".into(),
            customer: "cust-1".into(),
            ..FeedQuery::default()
        };
        let (filter, customer) = filter(&query).expect("valid");
        assert_eq!(filter.status, Some(NotificationStatus::Dead));
        assert_eq!(filter.channel.as_deref(), Some("telegram"));
        assert_eq!(filter.category, None);
        assert_eq!(
            filter.customer_id, None,
            "matched as shown, not as a customer id"
        );
        assert_eq!(customer.as_deref(), Some("cust-1"));
        let bad = FeedQuery {
            status: "lost".into(),
            ..FeedQuery::default()
        };
        assert!(matches!(filter_err(&bad), ApiError::BadRequest(_)));
    }

    fn filter_err(query: &FeedQuery) -> ApiError {
        filter(query).expect_err("invalid")
    }

    #[test]
    fn the_refresh_toggle_keeps_the_filters_encoded() {
        let query = FeedQuery {
            customer: "a&b c".into(),
            ..FeedQuery::default()
        };
        assert_eq!(
            toggle_refresh(&query, true),
            "?customer=a%26b%20c&refresh=off"
        );
        assert_eq!(toggle_refresh(&query, false), "?customer=a%26b%20c");
    }
}
