//! Recent activity in numbers, for the operator dashboard: notifications per minute and status,
//! accept-to-sent latencies with their time, and provider outcomes.
//!
//! Every query here runs unchanged on SQLite and PostgreSQL: minutes are bucketed with a `CASE`
//! over bound timestamps (no `strftime`/`date_trunc`), and percentiles are left to the caller
//! over a bounded sample, as SQLite has no percentile function.

use chrono::{DateTime, Duration, Utc};
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, FromQueryResult, QueryFilter, QueryOrder,
    QuerySelect, Select,
    sea_query::{Alias, CaseStatement, Expr, ExprTrait, Order, Query, SelectStatement, UnionType},
};
use uuid::Uuid;

use crate::{NotificationStatus, RepoError, delivery_attempt, notification};

/// Most minutes one bucketing query spans (one `CASE` branch each).
pub const MAX_MINUTES: u32 = 240;

/// Notifications created in one minute with one status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MinuteCount {
    /// Minutes after the start of the window (0 is the first minute).
    pub minute: u32,
    /// The notifications' current status.
    pub status: NotificationStatus,
    /// How many.
    pub count: i64,
}

/// Counts of the notifications created in the `minutes` minutes from `from`, per minute and
/// current status (one SQL `GROUP BY`). `minutes` is capped at [`MAX_MINUTES`].
pub async fn per_minute(
    db: &impl ConnectionTrait,
    from: DateTime<Utc>,
    minutes: u32,
) -> Result<Vec<MinuteCount>, RepoError> {
    use notification::Column;
    let minutes = minutes.clamp(1, MAX_MINUTES);
    let to = from + Duration::minutes(i64::from(minutes));
    let rows = notification::Entity::find()
        .filter(Column::CreatedAt.gte(from))
        .filter(Column::CreatedAt.lt(to))
        .select_only()
        .column_as(Into::<Expr>::into(minute_of(from, minutes)), "minute")
        .column(Column::Status)
        .column_as(Expr::col(Column::Id).count(), "n")
        // By the output name: the same expression written twice would bind its timestamps twice,
        // and PostgreSQL cannot tell the two are equal.
        .group_by(Expr::col(Alias::new("minute")))
        .group_by(Column::Status)
        .into_tuple::<(i32, NotificationStatus, i64)>()
        .all(db)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(minute, status, count)| MinuteCount {
            minute: u32::try_from(minute).unwrap_or(0),
            status,
            count,
        })
        .collect())
}

/// `CASE WHEN created_at < from+1m THEN 0 WHEN created_at < from+2m THEN 1 ... ELSE last END`.
fn minute_of(from: DateTime<Utc>, minutes: u32) -> CaseStatement {
    let last = i32::try_from(minutes - 1).unwrap_or(0);
    (0..last)
        .fold(CaseStatement::new(), |case, minute| {
            let end = from + Duration::minutes(i64::from(minute) + 1);
            case.case(notification::Column::CreatedAt.lt(end), minute)
        })
        .finally(last)
}

/// When each of the most recent (at most `sample`) notifications created in `[from, to)` that a
/// provider accepted was created, and its accept-to-sent latency in milliseconds.
pub async fn latencies(
    db: &impl ConnectionTrait,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    sample: u64,
) -> Result<Vec<(DateTime<Utc>, i64)>, RepoError> {
    use notification::Column;
    let rows = notification::Entity::find()
        .filter(Column::CreatedAt.gte(from))
        .filter(Column::CreatedAt.lt(to))
        .filter(Column::SentAt.is_not_null())
        .select_only()
        .column(Column::CreatedAt)
        .column(Column::SentAt)
        .order_by_desc(Column::Id)
        .limit(sample)
        .into_tuple::<(DateTime<Utc>, Option<DateTime<Utc>>)>()
        .all(db)
        .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(created, sent)| {
            sent.map(|s| (created, Ord::max((s - created).num_milliseconds(), 0)))
        })
        .collect())
}

/// A notification waiting for its time, as the dashboard lists it: the short columns only
/// (`content` and `contacts`, up to megabytes a row, stay in the database).
#[derive(Debug, Clone, PartialEq, FromQueryResult)]
pub struct ScheduledLine {
    /// The notification's id.
    pub id: Uuid,
    /// When it is due.
    pub scheduled_at: Option<DateTime<Utc>>,
    /// Category name.
    pub category: String,
    /// The customer's external id, when addressed to a known customer.
    pub customer_id: Option<String>,
    /// The key commands are partitioned by (customer id, or the first inline contact).
    pub recipient_key: String,
    /// Channel chain (JSON array of channel names).
    pub channels: serde_json::Value,
}

/// When a notification was created and when a provider accepted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromQueryResult)]
struct Latency {
    created_at: DateTime<Utc>,
    sent_at: DateTime<Utc>,
}

/// When each of up to `per_minute` notifications created in each of the `minutes` minutes from
/// `from` that a provider accepted was created, and its accept-to-sent latency in milliseconds:
/// the latest created in each minute. Every minute gets its sample however busy the others
/// were, and the rows read stay bounded (`minutes × per_minute`) however busy they all were.
/// `minutes` is capped at [`MAX_MINUTES`].
pub async fn latencies_per_minute(
    db: &impl ConnectionTrait,
    from: DateTime<Utc>,
    minutes: u32,
    per_minute: u64,
) -> Result<Vec<(DateTime<Utc>, i64)>, RepoError> {
    let query = latencies_per_minute_query(from, minutes, per_minute);
    let rows = Latency::find_by_statement(db.get_database_backend().build(&query))
        .all(db)
        .await?;
    Ok(rows
        .into_iter()
        .map(
            |Latency {
                 created_at,
                 sent_at,
             }| {
                let ms = (sent_at - created_at).num_milliseconds();
                (created_at, Ord::max(ms, 0))
            },
        )
        .collect())
}

/// The query behind [`latencies_per_minute`]: one `SELECT … ORDER BY created_at DESC LIMIT n`
/// per minute (each a range of `idx_notifications_created_at`, read from its end), joined by
/// `UNION ALL`. Each is wrapped in a subquery, as SQLite takes no `LIMIT` on a compound
/// statement's parts.
pub fn latencies_per_minute_query(
    from: DateTime<Utc>,
    minutes: u32,
    per_minute: u64,
) -> SelectStatement {
    use notification::Column;
    let minutes = minutes.clamp(1, MAX_MINUTES);
    let minute = |index: u32| {
        let start = from + Duration::minutes(i64::from(index));
        let sends = Query::select()
            .columns([Column::CreatedAt, Column::SentAt])
            .from(notification::Entity)
            .and_where(Expr::col(Column::CreatedAt).gte(start))
            .and_where(Expr::col(Column::CreatedAt).lt(start + Duration::minutes(1)))
            .and_where(Expr::col(Column::SentAt).is_not_null())
            .order_by(Column::CreatedAt, Order::Desc)
            .limit(per_minute)
            .to_owned();
        Query::select()
            .columns([Column::CreatedAt, Column::SentAt])
            .from_subquery(sends, Alias::new(format!("minute_{index}")))
            .to_owned()
    };
    (1..minutes).fold(minute(0), |mut all, index| {
        all.union(UnionType::All, minute(index));
        all
    })
}

/// Up to `limit` notifications waiting for their time, soonest due first.
pub async fn scheduled(
    db: &impl ConnectionTrait,
    limit: u64,
) -> Result<Vec<ScheduledLine>, RepoError> {
    Ok(scheduled_query(limit)
        .into_model::<ScheduledLine>()
        .all(db)
        .await?)
}

/// The query behind [`scheduled`]: the columns of a [`ScheduledLine`], read from
/// `idx_notifications_scheduled_at_id` in its order (`scheduled_at, id`), so that the page is
/// taken without sorting the rows due at the same moment.
pub fn scheduled_query(limit: u64) -> Select<notification::Entity> {
    use notification::Column;
    notification::Entity::find()
        .filter(super::status_is(NotificationStatus::Scheduled))
        .order_by_asc(Column::ScheduledAt)
        .order_by_asc(Column::Id)
        .limit(limit)
        .select_only()
        .columns([
            Column::Id,
            Column::ScheduledAt,
            Column::Category,
            Column::CustomerId,
            Column::RecipientKey,
            Column::Channels,
        ])
}

/// Delivery attempts of one provider with one outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptOutcome {
    /// Channel name.
    pub channel: String,
    /// Provider name.
    pub provider: String,
    /// Attempt status (`sent`, `failed`, `rejected`, ...).
    pub status: String,
    /// How many.
    pub count: i64,
}

/// The count of [`attempt_outcomes`]: attempts since `since` (found in
/// `idx_delivery_attempts_created_at`) grouped by channel, provider and status.
pub fn attempt_outcomes_query(since: DateTime<Utc>) -> Select<delivery_attempt::Entity> {
    use delivery_attempt::Column;
    delivery_attempt::Entity::find()
        .filter(Column::CreatedAt.gte(since))
        .select_only()
        .column(Column::Channel)
        .column(Column::Provider)
        .column(Column::Status)
        .column_as(Expr::col(Column::Id).count(), "n")
        .group_by(Column::Channel)
        .group_by(Column::Provider)
        .group_by(Column::Status)
}

/// Attempts finished at or after `since`, per channel, provider and outcome.
pub async fn attempt_outcomes(
    db: &impl ConnectionTrait,
    since: DateTime<Utc>,
) -> Result<Vec<AttemptOutcome>, RepoError> {
    let rows = attempt_outcomes_query(since)
        .into_tuple::<(String, String, String, i64)>()
        .all(db)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(channel, provider, status, count)| AttemptOutcome {
            channel,
            provider,
            status,
            count,
        })
        .collect())
}
