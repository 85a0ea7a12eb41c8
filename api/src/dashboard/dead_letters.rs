//! `/dead-letters`: the dead-letter stream with the reason each entry was given up, and a replay
//! button per replayable entry (the API's replay, as a CSRF-protected form).

use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use poem::{
    Response,
    web::{Data, Form, Path, Query},
};

use super::{
    Dashboard, html, page_error, see_other,
    session::{CsrfForm, Session},
    when,
};
use crate::dlq::{self, DeadLetterView, DlqKind, EntryFilter};

/// Entries listed.
const PAGE_SIZE: usize = 200;

/// One entry as shown.
pub(crate) struct LetterRow {
    pub view: DeadLetterView,
    pub dead_at: String,
    pub notification: String,
}

#[derive(askama::Template)]
#[template(path = "dashboard/dead_letters.html")]
struct DeadLettersPage {
    signed_in: bool,
    session: Session,
    rows: Vec<LetterRow>,
    /// The sequence number the next page starts after, when there is one.
    next_after: Option<u64>,
    /// The kind shown: `commands`, `events`, or empty for both.
    kind: String,
    /// The text the reasons shown contain, or empty.
    reason: String,
    /// The filter as query parameters, for the next page's link (`&kind=…&reason=…`).
    filter_query: String,
}

/// Where a page of entries starts, and which entries it shows.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct PageQuery {
    /// After this sequence number (the previous page's last).
    after: Option<u64>,
    /// `commands` or `events`; both when absent or empty.
    #[serde(default)]
    kind: String,
    /// Only entries whose reason contains this text.
    #[serde(default)]
    reason: String,
}

impl PageQuery {
    /// The kind asked for, or `400` for one there is not.
    fn kind(&self) -> poem::Result<Option<DlqKind>> {
        match self.kind.as_str() {
            "" => Ok(None),
            "commands" => Ok(Some(DlqKind::Commands)),
            "events" => Ok(Some(DlqKind::Events)),
            other => Err(poem::Error::from_string(
                format!("kind must be commands or events, not {other:?}"),
                poem::http::StatusCode::BAD_REQUEST,
            )),
        }
    }

    /// The filter as query parameters after `after`, percent-encoded.
    fn filter_query(&self) -> String {
        let mut query = String::new();
        for (name, value) in [("kind", &self.kind), ("reason", &self.reason)] {
            if !value.is_empty() {
                let encoded = utf8_percent_encode(value, NON_ALPHANUMERIC);
                query.push_str(&format!("&{name}={encoded}"));
            }
        }
        query
    }
}

/// `GET /dead-letters[?after=<seq>][&kind=commands|events][&reason=<text>]`: the oldest entries
/// first, a page at a time, of one kind or both, and only those whose reason contains the text.
#[poem::handler]
pub(crate) async fn page(
    session: Session,
    Data(dashboard): Data<&Dashboard>,
    Query(query): Query<PageQuery>,
) -> poem::Result<Response> {
    let reason = Some(query.reason.trim().to_string()).filter(|r| !r.is_empty());
    let filter = EntryFilter::of(query.kind()?, reason);
    let page = dlq::list_page(&dashboard.state, query.after, PAGE_SIZE, &filter)
        .await
        .map_err(page_error)?;
    let rows = page
        .items
        .into_iter()
        .map(|view| LetterRow {
            dead_at: when(view.dead_at),
            notification: view
                .notification_id
                .map(|id| id.to_string())
                .unwrap_or_default(),
            view,
        })
        .collect();
    html(&DeadLettersPage {
        signed_in: true,
        session,
        rows,
        next_after: page.next_after_seq,
        filter_query: query.filter_query(),
        kind: query.kind,
        reason: query.reason,
    })
}

/// `POST /dead-letters/{seq}/replay`: replays the entry and shows its notification (the list,
/// for an event).
#[poem::handler]
pub(crate) async fn replay(
    session: Session,
    Data(dashboard): Data<&Dashboard>,
    Path(seq): Path<u64>,
    Form(form): Form<CsrfForm>,
) -> poem::Result<Response> {
    session.check_csrf(&form)?;
    let replayed = dlq::replay_one(&dashboard.state, seq)
        .await
        .map_err(page_error)?;
    tracing::info!(seq, notification = ?replayed.notification_id, event = ?replayed.event_id, "dead letter replayed from the dashboard");
    Ok(see_other(&replayed.notification_id.map_or_else(
        || "/dead-letters".to_string(),
        |id| format!("/notifications/{id}"),
    )))
}
