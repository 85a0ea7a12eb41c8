//! Reading notification history: filtered, cursor-paginated listing and the numbers behind the
//! stats endpoint.

use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, EntityTrait, FromQueryResult, QueryFilter, QueryOrder,
    QuerySelect, QueryTrait, Select,
    sea_query::{Alias, Asterisk, Expr, ExprTrait, Order, Query, SelectStatement, UnionType},
};
use uuid::Uuid;

use crate::{NotificationStatus, RepoError, notification};

/// Which notifications to list. Every filter is optional; they combine with AND.
#[derive(Debug, Clone, Default)]
pub struct HistoryFilter {
    /// The customer's external id.
    pub customer_id: Option<String>,
    /// Current status.
    pub status: Option<NotificationStatus>,
    /// The channel that carried it (`final_channel`).
    pub channel: Option<String>,
    /// Category name.
    pub category: Option<String>,
    /// Accepted at or after this time.
    pub created_from: Option<DateTime<Utc>>,
    /// Accepted before this time.
    pub created_to: Option<DateTime<Utc>>,
}

impl HistoryFilter {
    fn apply(&self, mut query: Select<notification::Entity>) -> Select<notification::Entity> {
        use notification::Column;
        if let Some(customer) = &self.customer_id {
            query = query.filter(Column::CustomerId.eq(customer.as_str()));
        }
        if let Some(status) = self.status {
            query = query.filter(super::status_is(status));
        }
        if let Some(channel) = &self.channel {
            query = query.filter(Column::FinalChannel.eq(channel.as_str()));
        }
        if let Some(category) = &self.category {
            query = query.filter(Column::Category.eq(category.as_str()));
        }
        if let Some(from) = self.created_from {
            query = query.filter(Column::CreatedAt.gte(from));
        }
        if let Some(to) = self.created_to {
            query = query.filter(Column::CreatedAt.lt(to));
        }
        query
    }
}

/// Up to `limit` notifications matching `filter`, newest first (ids begin with the time a
/// notification was accepted: see `herald_nats::ids`), starting after the notification `after` of a previous page.
pub async fn list(
    db: &impl ConnectionTrait,
    filter: &HistoryFilter,
    after: Option<Uuid>,
    limit: u64,
) -> Result<Vec<notification::Model>, RepoError> {
    Ok(page(filter, after, limit).all(db).await?)
}

/// The query behind [`list`] (public so that tests can check how databases plan it).
pub fn page(
    filter: &HistoryFilter,
    after: Option<Uuid>,
    limit: u64,
) -> Select<notification::Entity> {
    let mut query = filter.apply(notification::Entity::find());
    if let Some(after) = after {
        query = query.filter(notification::Column::Id.lt(after));
    }
    query.order_by_desc(notification::Column::Id).limit(limit)
}

/// How many characters of a notification's subject (or text) the feed shows.
pub const FEED_SUBJECT_CHARS: u32 = 80;

/// One notification as the dashboard's feed lists it: the short columns only, and the start of
/// its subject read out of `content` by the database. `content` (text and HTML, each up to
/// 256 KiB) and `contacts` never leave the database for the feed.
#[derive(Debug, Clone, PartialEq, FromQueryResult)]
pub struct FeedLine {
    /// The notification's id.
    pub id: Uuid,
    /// When it was accepted.
    pub created_at: DateTime<Utc>,
    /// Current status.
    pub status: NotificationStatus,
    /// The channel that carried it.
    pub final_channel: Option<String>,
    /// Channel chain (JSON array of channel names).
    pub channels: serde_json::Value,
    /// Category name.
    pub category: String,
    /// The customer's external id, when addressed to a known customer.
    pub customer_id: Option<String>,
    /// The key commands are partitioned by (customer id, or the first inline contact).
    pub recipient_key: String,
    /// Why it is in its status.
    pub status_reason: Option<String>,
    /// The first [`FEED_SUBJECT_CHARS`] characters of the subject, else of the text; `None`
    /// when neither is given (a templated send).
    pub subject: Option<String>,
    /// The code of the template named instead of content.
    pub template_code: Option<String>,
    /// The template's locale, when named.
    pub template_locale: Option<String>,
}

impl FeedLine {
    /// Who the feed shows it was for: the customer id, else the recipient key (its first inline
    /// contact). The value [`feed_page`]'s `shown_as` matches.
    pub fn shown_as(&self) -> &str {
        self.customer_id.as_deref().unwrap_or(&self.recipient_key)
    }
}

/// Up to `limit` notifications matching `filter` and, when given, shown as `shown_as` (see
/// [`FeedLine::shown_as`]), newest first, as the dashboard's feed lists them.
pub async fn feed(
    db: &impl ConnectionTrait,
    filter: &HistoryFilter,
    shown_as: Option<&str>,
    limit: u64,
) -> Result<Vec<FeedLine>, RepoError> {
    let query = feed_page(filter, shown_as, limit);
    Ok(
        FeedLine::find_by_statement(db.get_database_backend().build(&query))
            .all(db)
            .await?,
    )
}

/// The query behind [`feed`]: [`page`]'s, reading only the columns of a [`FeedLine`].
///
/// The subject comes from `content ->> 'subject'` (else `'text'`), cut to
/// [`FEED_SUBJECT_CHARS`] characters by `substr`: SQLite (3.38 and later) and PostgreSQL both
/// read JSON with `->`/`->>` and count `substr` in characters.
///
/// A customer id or an inline contact in `shown_as` asks for what the feed's customer column
/// shows: `customer_id = ?`, or `customer_id IS NULL AND recipient_key = ?`. Each half is a page
/// of its own, newest first from its index (`idx_notifications_customer_id`,
/// `idx_notifications_inline_recipient`), and the two pages are merged by `UNION ALL` into the
/// newest `limit`; each half is wrapped in a subquery, as SQLite takes no `LIMIT` on a compound
/// statement's parts. One condition joining the halves by `OR` would be read from both indexes
/// too, but every row of the customer sorted before the page is taken.
pub fn feed_page(filter: &HistoryFilter, shown_as: Option<&str>, limit: u64) -> SelectStatement {
    use notification::Column;
    let Some(shown) = shown_as else {
        return feed_columns(page(filter, None, limit)).into_query();
    };
    let half = |name: &str, condition: Condition| {
        let rows = feed_columns(page(filter, None, limit).filter(condition)).into_query();
        Query::select()
            .column(Asterisk)
            .from_subquery(rows, Alias::new(name))
            .to_owned()
    };
    let by_contact = Condition::all()
        .add(Column::CustomerId.is_null())
        .add(Column::RecipientKey.eq(shown));
    half(
        "by_customer",
        Condition::all().add(Column::CustomerId.eq(shown)),
    )
    .union(UnionType::All, half("by_contact", by_contact))
    .order_by(Column::Id, Order::Desc)
    .limit(limit)
    .to_owned()
}

/// `query` reading only the columns of a [`FeedLine`].
fn feed_columns(query: Select<notification::Entity>) -> Select<notification::Entity> {
    use notification::Column;
    let subject = format!(
        "substr(coalesce(content ->> 'subject', content ->> 'text'), 1, {FEED_SUBJECT_CHARS})"
    );
    query
        .select_only()
        .columns([
            Column::Id,
            Column::CreatedAt,
            Column::Status,
            Column::FinalChannel,
            Column::Channels,
            Column::Category,
            Column::CustomerId,
            Column::RecipientKey,
            Column::StatusReason,
        ])
        .column_as(Expr::cust(subject), "subject")
        .column_as(
            Expr::cust("(content -> 'template') ->> 'code'"),
            "template_code",
        )
        .column_as(
            Expr::cust("(content -> 'template') ->> 'locale'"),
            "template_locale",
        )
}

/// Counts of notifications created in a time range.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatusCounts {
    /// Notifications per status.
    pub by_status: Vec<(NotificationStatus, i64)>,
    /// Notifications per (carrying channel, status), for those a channel carried.
    pub by_channel: Vec<(String, NotificationStatus, i64)>,
}

/// Counts per status and per carrying channel of the notifications created in `[from, to)`.
pub async fn counts(
    db: &impl ConnectionTrait,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<StatusCounts, RepoError> {
    use notification::Column;
    let range = HistoryFilter {
        created_from: Some(from),
        created_to: Some(to),
        ..HistoryFilter::default()
    };
    let by_status = range
        .apply(notification::Entity::find())
        .select_only()
        .column(Column::Status)
        .column_as(Expr::col(Column::Id).count(), "n")
        .group_by(Column::Status)
        .into_tuple::<(NotificationStatus, i64)>()
        .all(db)
        .await?;
    let by_channel = range
        .apply(notification::Entity::find())
        .filter(Column::FinalChannel.is_not_null())
        .select_only()
        .column(Column::FinalChannel)
        .column(Column::Status)
        .column_as(Expr::col(Column::Id).count(), "n")
        .group_by(Column::FinalChannel)
        .group_by(Column::Status)
        .into_tuple::<(String, NotificationStatus, i64)>()
        .all(db)
        .await?;
    Ok(StatusCounts {
        by_status,
        by_channel,
    })
}

/// Delivery latencies (`sent_at - created_at`, milliseconds) of the most recent notifications
/// created in `[from, to)` that a provider accepted, at most `sample` of them. Percentiles are
/// computed by the caller over this bounded sample: SQLite has no percentile function, and a
/// bounded sample keeps the cost flat however large the range.
pub async fn latency_sample(
    db: &impl ConnectionTrait,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    sample: u64,
) -> Result<Vec<i64>, RepoError> {
    let latencies = super::activity::latencies(db, from, to, sample).await?;
    Ok(latencies.into_iter().map(|(_, ms)| ms).collect())
}
