//! `/dead-letters`: the dead-letter stream with the reason each entry was given up, and a replay
//! button per replayable entry (the API's replay, as a CSRF-protected form).

use poem::{
    Response,
    web::{Data, Form, Path, Query},
};

use super::{
    Dashboard, html, page_error, see_other,
    session::{CsrfForm, Session},
    when,
};
use crate::dlq::{self, DeadLetterView, EntryFilter};

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
}

/// Where a page of entries starts.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct PageQuery {
    /// After this sequence number (the previous page's last).
    after: Option<u64>,
}

/// `GET /dead-letters[?after=<seq>]`: the oldest entries first, a page at a time.
#[poem::handler]
pub(crate) async fn page(
    session: Session,
    Data(dashboard): Data<&Dashboard>,
    Query(query): Query<PageQuery>,
) -> poem::Result<Response> {
    let filter = EntryFilter::default();
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
