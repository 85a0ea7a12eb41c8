//! `/notifications/{id}`: one notification — status and the reason for it, the failover story
//! (every attempt: channel, provider, outcome, error, latency), the rendered content and the raw
//! payload.

use herald_entities::repo::notifications as repo;
use poem::{
    Response,
    web::{Data, Path},
};
use serde_json::Value;
use uuid::Uuid;

use super::{Dashboard, html, page_error, session::Session, when};
use crate::{ApiError, notifications::view};

/// One attempt as shown.
pub(crate) struct AttemptRow {
    pub attempt_no: i32,
    pub channel: String,
    pub provider: String,
    pub status: String,
    pub ok: bool,
    pub error: String,
    pub latency_ms: i64,
    pub at: String,
}

#[derive(askama::Template)]
#[template(path = "dashboard/detail.html")]
struct DetailPage {
    signed_in: bool,
    session: Session,
    id: String,
    status: String,
    status_reason: String,
    error: String,
    category: String,
    customer: String,
    chain: String,
    final_channel: String,
    created: String,
    sent: String,
    scheduled: String,
    /// `telegram ✗ → email ✓`.
    story: String,
    attempts: Vec<AttemptRow>,
    /// The template a send named, rendered only at delivery (empty for rendered content).
    template: String,
    subject: String,
    text: String,
    short: String,
    html_body: String,
    payload: String,
    cancellable: bool,
}

/// `GET /notifications/{id}`.
#[poem::handler]
pub(crate) async fn page(
    session: Session,
    Data(dashboard): Data<&Dashboard>,
    Path(id): Path<String>,
) -> poem::Result<Response> {
    let id = Uuid::parse_str(&id)
        .map_err(|_| page_error(ApiError::invalid("id", "not a notification id")))?;
    let Some((row, attempts)) = repo::find_with_attempts(&dashboard.state.db, id)
        .await
        .map_err(|e| page_error(e.into()))?
    else {
        return Err(page_error(ApiError::not_found(format!(
            "no notification {id}"
        ))));
    };
    let content = row.content.clone();
    let recipient = row
        .customer_id
        .clone()
        .unwrap_or_else(|| row.recipient_key.clone());
    let payload = serde_json::json!({
        "contacts": row.contacts,
        "content": row.content,
    });
    let cancellable = matches!(
        row.status,
        herald_entities::NotificationStatus::Scheduled
            | herald_entities::NotificationStatus::Queued
    );
    let n = view(row, attempts);
    let attempts: Vec<AttemptRow> = n
        .attempts
        .into_iter()
        .map(|a| AttemptRow {
            ok: a.status == "sent",
            attempt_no: a.attempt_no,
            channel: a.channel,
            provider: a.provider,
            status: a.status,
            error: a.error.unwrap_or_default(),
            latency_ms: a.latency_ms,
            at: when(a.at),
        })
        .collect();
    let text_of = |field: &str| {
        content
            .get(field)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    html(&DetailPage {
        signed_in: true,
        session,
        id: n.id.to_string(),
        status: n.status,
        status_reason: n.status_reason.unwrap_or_default(),
        error: n.error.unwrap_or_default(),
        category: n.category,
        customer: recipient,
        chain: n.channels.join(" → "),
        final_channel: n.final_channel.unwrap_or_default(),
        created: when(n.created_at),
        sent: n.sent_at.map(when).unwrap_or_default(),
        scheduled: n.scheduled_at.map(when).unwrap_or_default(),
        story: story(&attempts),
        attempts,
        template: template_of(&content).unwrap_or_default(),
        subject: text_of("subject"),
        text: text_of("text"),
        short: text_of("short"),
        html_body: text_of("html"),
        payload: serde_json::to_string_pretty(&payload).unwrap_or_default(),
        cancellable,
    })
}

/// The template stored content names (`order_placed, locale de`), if it names one: a send with
/// a template is stored so and rendered at each delivery, its variables in the payload.
fn template_of(content: &Value) -> Option<String> {
    let template = content.get("template")?;
    let code = template.get("code")?.as_str()?;
    Some(template_label(
        code,
        template.get("locale").and_then(Value::as_str),
    ))
}

/// `template order_placed, locale de` (or without the locale when none is named).
pub(crate) fn template_label(code: &str, locale: Option<&str>) -> String {
    match locale {
        Some(locale) => format!("template {code}, locale {locale}"),
        None => format!("template {code}"),
    }
}

/// The failover story in one line: each attempt's channel with ✓ or ✗, in order.
fn story(attempts: &[AttemptRow]) -> String {
    attempts
        .iter()
        .map(|a| format!("{} {}", a.channel, if a.ok { "✓" } else { "✗" }))
        .collect::<Vec<_>>()
        .join(" → ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(channel: &str, ok: bool) -> AttemptRow {
        AttemptRow {
            attempt_no: 1,
            channel: channel.into(),
            provider: channel.into(),
            status: if ok { "sent" } else { "failed" }.into(),
            ok,
            error: String::new(),
            latency_ms: 3,
            at: String::new(),
        }
    }

    #[test]
    fn the_story_reads_in_attempt_order() {
        assert_eq!(
            story(&[attempt("telegram", false), attempt("email", true)]),
            "telegram ✗ → email ✓"
        );
        assert_eq!(story(&[]), "");
    }
}
