//! `/api/v1/notifications` (GET) and `/api/v1/notifications/stats`: history with filters and
//! cursor pagination, and delivery statistics over a time range. The list's operation is declared
//! with the send's, in [`crate::notifications`], as they share a path.

use chrono::{DateTime, Duration, Utc};
use herald_entities::{
    NotificationStatus, notification,
    repo::history::{self as repo, HistoryFilter},
};
use herald_nats::{Category, Channel};
use poem_openapi::{Enum, Object, OpenApi, Tags, param::Query, payload::Json};
use uuid::Uuid;

use crate::{
    ApiError, AppState,
    auth::ReadKey,
    cursor,
    notifications::{ApiCategory, ApiChannel},
    validate::plain_text,
};

/// Page size when none is asked for.
pub const DEFAULT_LIMIT: u32 = 50;
/// Largest page size.
pub const MAX_LIMIT: u32 = 500;
/// Most delivery latencies the percentiles are computed over (the most recent ones).
pub const LATENCY_SAMPLE: u64 = 10_000;

#[derive(Tags)]
pub(crate) enum HistoryTags {
    /// Notification history and statistics.
    History,
}

/// A notification status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename = "Status", rename_all = "lowercase")]
pub enum ApiStatus {
    /// Accepted, not yet picked up.
    Queued,
    /// Waiting for its time.
    Scheduled,
    /// Being delivered; retries keep it here.
    Processing,
    /// A provider accepted it.
    Sent,
    /// The provider confirmed delivery.
    Delivered,
    /// Failed on every channel, or bounced.
    Failed,
    /// Not sent on purpose.
    Skipped,
    /// Cancelled.
    Cancelled,
    /// Gave up after the last retry; in the dead-letter stream.
    Dead,
}

impl From<ApiStatus> for NotificationStatus {
    fn from(s: ApiStatus) -> Self {
        match s {
            ApiStatus::Queued => Self::Queued,
            ApiStatus::Scheduled => Self::Scheduled,
            ApiStatus::Processing => Self::Processing,
            ApiStatus::Sent => Self::Sent,
            ApiStatus::Delivered => Self::Delivered,
            ApiStatus::Failed => Self::Failed,
            ApiStatus::Skipped => Self::Skipped,
            ApiStatus::Cancelled => Self::Cancelled,
            ApiStatus::Dead => Self::Dead,
        }
    }
}

/// Every status, in lifecycle order.
const ALL_STATUSES: [NotificationStatus; 9] = [
    NotificationStatus::Queued,
    NotificationStatus::Scheduled,
    NotificationStatus::Processing,
    NotificationStatus::Sent,
    NotificationStatus::Delivered,
    NotificationStatus::Failed,
    NotificationStatus::Skipped,
    NotificationStatus::Cancelled,
    NotificationStatus::Dead,
];

/// A notification in a history listing (without its attempts; read one for those).
#[derive(Debug, Clone, Object)]
// Absent values are left out, as the spec (no `nullable`) says.
#[oai(skip_serializing_if_is_none)]
pub struct NotificationSummary {
    /// Id.
    pub id: Uuid,
    /// The caller's request id.
    pub request_id: Option<String>,
    /// Customer external id.
    pub customer_id: Option<String>,
    /// Category.
    pub category: String,
    /// Channel chain.
    pub channels: Vec<String>,
    /// Current status.
    pub status: String,
    /// Why it is in this status, in words.
    pub status_reason: Option<String>,
    /// The channel that carried it.
    pub final_channel: Option<String>,
    /// Delivery attempts made.
    pub attempts: i32,
    /// Last error.
    pub error: Option<String>,
    /// When it was accepted.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// When a provider accepted it.
    pub sent_at: Option<DateTime<Utc>>,
}

/// One page of history.
#[derive(Debug, Clone, Object)]
// Absent values are left out, as the spec (no `nullable`) says.
#[oai(skip_serializing_if_is_none)]
pub struct NotificationPage {
    /// Notifications, newest first.
    pub items: Vec<NotificationSummary>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// Notifications in one status.
#[derive(Debug, Clone, Object)]
pub struct StatusCount {
    /// Status.
    pub status: String,
    /// Notifications in it.
    pub count: i64,
}

/// What one channel carried.
#[derive(Debug, Clone, Object)]
pub struct ChannelCount {
    /// Channel.
    pub channel: String,
    /// Carried and not (yet) confirmed.
    pub sent: i64,
    /// Carried and confirmed by a receipt.
    pub delivered: i64,
    /// Carried, then reported bounced or failed by a receipt.
    pub failed: i64,
}

/// Delivery latency: from acceptance (`created_at`) to a provider accepting it (`sent_at`).
#[derive(Debug, Clone, Object)]
// Absent values are left out, as the spec (no `nullable`) says.
#[oai(skip_serializing_if_is_none)]
pub struct LatencyStats {
    /// Notifications the percentiles are computed over: the most recent sent ones of the range,
    /// at most 10 000.
    pub sample_size: u64,
    /// Median, milliseconds.
    pub p50_ms: Option<i64>,
    /// 95th percentile, milliseconds.
    pub p95_ms: Option<i64>,
}

/// Statistics of the notifications accepted in `[from, to)`.
#[derive(Debug, Clone, Object)]
// Absent values are left out, as the spec (no `nullable`) says.
#[oai(skip_serializing_if_is_none)]
pub struct Stats {
    /// Start of the range (inclusive).
    pub from: DateTime<Utc>,
    /// End of the range (exclusive).
    pub to: DateTime<Utc>,
    /// Notifications accepted in the range.
    pub total: i64,
    /// Per status, every status listed.
    pub by_status: Vec<StatusCount>,
    /// Per channel that carried notifications.
    pub by_channel: Vec<ChannelCount>,
    /// (sent + delivered) / (sent + delivered + failed + dead); absent when none finished.
    /// Skipped and cancelled notifications are left out: they were not meant to go out.
    pub success_rate: Option<f64>,
    /// Delivery latency percentiles.
    pub latency: LatencyStats,
}

/// The filters and page of `GET /api/v1/notifications`, as received.
#[derive(Debug)]
pub(crate) struct ListQuery {
    pub customer_id: Option<String>,
    pub status: Option<ApiStatus>,
    pub channel: Option<ApiChannel>,
    pub category: Option<ApiCategory>,
    pub created_from: Option<DateTime<Utc>>,
    pub created_to: Option<DateTime<Utc>>,
    pub cursor: Option<String>,
    pub limit: Option<u32>,
}

/// A page of `GET /api/v1/notifications`. Its operation is declared with the send's
/// (`NotificationsApi`): the spec lists each API's paths apart, and two under one path would be
/// one key twice, of which a JSON reader keeps one.
pub(crate) async fn list(state: &AppState, query: ListQuery) -> Result<NotificationPage, ApiError> {
    if let Some(id) = &query.customer_id {
        plain_text("customer_id", id)?;
    }
    if let (Some(from), Some(to)) = (query.created_from, query.created_to)
        && from > to
    {
        return Err(ApiError::invalid(
            "created_to",
            "created_to must not be before created_from",
        ));
    }
    let after = match query.cursor.as_deref() {
        Some(c) => Some(cursor::decode(c).ok_or_else(|| {
            ApiError::invalid("cursor", "not a cursor from this API; use next_cursor")
        })?),
        None => None,
    };
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    let filter = HistoryFilter {
        customer_id: query.customer_id,
        status: query.status.map(Into::into),
        channel: query.channel.map(|c| Channel::from(c).as_str().to_string()),
        category: query
            .category
            .map(|c| Category::from(c).as_str().to_string()),
        created_from: query.created_from,
        created_to: query.created_to,
    };
    let mut rows = repo::list(&state.db, &filter, after, u64::from(limit) + 1).await?;
    let next_cursor = if rows.len() > limit as usize {
        rows.truncate(limit as usize);
        rows.last().map(|row| cursor::encode(row.id))
    } else {
        None
    };
    Ok(NotificationPage {
        items: rows.into_iter().map(summary).collect(),
        next_cursor,
    })
}

/// History endpoints.
pub struct HistoryApi {
    state: AppState,
}

impl HistoryApi {
    /// The endpoints over the shared state.
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

#[OpenApi(prefix_path = "/api/v1", tag = "HistoryTags::History")]
impl HistoryApi {
    /// Delivery statistics over a time range (default: the last 24 hours).
    ///
    /// Counts are exact (SQL `GROUP BY`). Latency percentiles are computed over the most recent
    /// 10 000 sent notifications of the range (`latency.sample_size` says how many), so the cost
    /// stays flat however long the range.
    #[oai(path = "/notifications/stats", method = "get")]
    async fn stats(
        &self,
        _auth: ReadKey,
        /// Start (inclusive, RFC 3339); default: 24 hours before `to`.
        from: Query<Option<DateTime<Utc>>>,
        /// End (exclusive, RFC 3339); default: now.
        to: Query<Option<DateTime<Utc>>>,
    ) -> Result<Json<Stats>, ApiError> {
        let to_given = to.0.is_some();
        let to = to.0.unwrap_or_else(Utc::now);
        let from = match from.0 {
            Some(from) => from,
            None => to
                .checked_sub_signed(Duration::hours(24))
                .ok_or_else(|| ApiError::invalid("to", "to is out of range"))?,
        };
        if from > to {
            // Name the parameter the caller sent: with `to` left out, it is `from` that is wrong.
            return Err(if to_given {
                ApiError::invalid("to", "to must not be before from")
            } else {
                ApiError::invalid("from", "from must not be after to, which defaults to now")
            });
        }
        let counts = repo::counts(&self.state.db, from, to).await?;
        let latencies = repo::latency_sample(&self.state.db, from, to, LATENCY_SAMPLE).await?;
        Ok(Json(stats(from, to, counts, latencies)))
    }
}

fn stats(
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    counts: repo::StatusCounts,
    mut latencies: Vec<i64>,
) -> Stats {
    let count_of = |status: NotificationStatus| {
        counts
            .by_status
            .iter()
            .filter(|(s, _)| *s == status)
            .map(|(_, n)| *n)
            .sum::<i64>()
    };
    let ok = count_of(NotificationStatus::Sent) + count_of(NotificationStatus::Delivered);
    let finished = ok + count_of(NotificationStatus::Failed) + count_of(NotificationStatus::Dead);
    let mut by_channel: Vec<ChannelCount> = Vec::new();
    for (channel, status, n) in &counts.by_channel {
        let index = match by_channel.iter().position(|c| &c.channel == channel) {
            Some(i) => i,
            None => {
                by_channel.push(ChannelCount {
                    channel: channel.clone(),
                    sent: 0,
                    delivered: 0,
                    failed: 0,
                });
                by_channel.len() - 1
            }
        };
        let entry = &mut by_channel[index];
        match status {
            NotificationStatus::Sent => entry.sent += n,
            NotificationStatus::Delivered => entry.delivered += n,
            NotificationStatus::Failed => entry.failed += n,
            _ => {}
        }
    }
    by_channel.sort_by(|a, b| a.channel.cmp(&b.channel));
    latencies.sort_unstable();
    Stats {
        from,
        to,
        total: counts.by_status.iter().map(|(_, n)| n).sum(),
        by_status: ALL_STATUSES
            .into_iter()
            .map(|status| StatusCount {
                status: status.as_str().into(),
                count: count_of(status),
            })
            .collect(),
        by_channel,
        success_rate: (finished > 0).then(|| ok as f64 / finished as f64),
        latency: LatencyStats {
            sample_size: latencies.len() as u64,
            p50_ms: percentile(&latencies, 50),
            p95_ms: percentile(&latencies, 95),
        },
    }
}

/// Nearest-rank percentile of sorted values.
pub(crate) fn percentile(sorted: &[i64], p: u32) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (u64::from(p) * sorted.len() as u64).div_ceil(100).max(1);
    sorted.get(rank as usize - 1).copied()
}

fn summary(row: notification::Model) -> NotificationSummary {
    NotificationSummary {
        id: row.id,
        request_id: row.request_id,
        customer_id: row.customer_id,
        category: row.category,
        channels: serde_json::from_value(row.channels).unwrap_or_default(),
        status: row.status.as_str().into(),
        status_reason: row.status_reason,
        final_channel: row.final_channel,
        attempts: row.attempts,
        error: row.error,
        created_at: row.created_at,
        updated_at: row.updated_at,
        sent_at: row.sent_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        assert_eq!(percentile(&[], 50), None);
        assert_eq!(percentile(&[7], 95), Some(7));
        let values: Vec<i64> = (1..=100).collect();
        assert_eq!(percentile(&values, 50), Some(50));
        assert_eq!(percentile(&values, 95), Some(95));
        assert_eq!(percentile(&[10, 20, 30], 50), Some(20));
    }

    #[test]
    fn stats_add_up() {
        let counts = repo::StatusCounts {
            by_status: vec![
                (NotificationStatus::Sent, 6),
                (NotificationStatus::Delivered, 2),
                (NotificationStatus::Failed, 1),
                (NotificationStatus::Dead, 1),
                (NotificationStatus::Skipped, 5),
            ],
            by_channel: vec![
                ("email".into(), NotificationStatus::Sent, 6),
                ("email".into(), NotificationStatus::Delivered, 2),
                ("email".into(), NotificationStatus::Failed, 1),
            ],
        };
        let now = Utc::now();
        let s = stats(now, now, counts, vec![30, 10, 20]);
        assert_eq!(s.total, 15);
        assert_eq!(s.by_status.len(), 9);
        assert_eq!(s.success_rate, Some(0.8));
        assert_eq!(s.by_channel.len(), 1);
        assert_eq!(
            (
                s.by_channel[0].sent,
                s.by_channel[0].delivered,
                s.by_channel[0].failed
            ),
            (6, 2, 1)
        );
        assert_eq!(s.latency.p50_ms, Some(20));
        assert_eq!(s.latency.sample_size, 3);
    }
}
