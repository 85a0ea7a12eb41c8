//! `/scheduled`: notifications waiting for their time, soonest first, each with a cancel button
//! (the API's cancel, as a CSRF-protected form).

use herald_entities::repo::activity;
use poem::{
    Response,
    web::{Data, Form, Path},
};
use uuid::Uuid;

use super::{
    Dashboard, html, page_error, see_other,
    session::{CsrfForm, Session},
    when,
};
use crate::{ApiError, notifications};

/// Scheduled notifications listed.
const PAGE_SIZE: u64 = 500;

/// One scheduled notification as shown.
pub(crate) struct ScheduledRow {
    pub id: String,
    pub due: String,
    pub category: String,
    pub customer: String,
    pub chain: String,
}

#[derive(askama::Template)]
#[template(path = "dashboard/scheduled.html")]
struct ScheduledPage {
    signed_in: bool,
    session: Session,
    rows: Vec<ScheduledRow>,
    /// Whether more are scheduled than listed.
    more: bool,
}

/// `GET /scheduled`.
#[poem::handler]
pub(crate) async fn page(
    session: Session,
    Data(dashboard): Data<&Dashboard>,
) -> poem::Result<Response> {
    // One more than shown, to tell whether more follow.
    let mut rows = activity::scheduled(&dashboard.state.db, PAGE_SIZE + 1)
        .await
        .map_err(|e| page_error(e.into()))?;
    let more = rows.len() as u64 > PAGE_SIZE;
    rows.truncate(PAGE_SIZE as usize);
    let rows = rows
        .into_iter()
        .map(|n| ScheduledRow {
            id: n.id.to_string(),
            due: n.scheduled_at.map(when).unwrap_or_default(),
            category: n.category,
            customer: n.customer_id.unwrap_or(n.recipient_key),
            chain: serde_json::from_value::<Vec<String>>(n.channels)
                .unwrap_or_default()
                .join(" → "),
        })
        .collect();
    html(&ScheduledPage {
        signed_in: true,
        session,
        rows,
        more,
    })
}

/// `POST /scheduled/{id}/cancel`: cancels and returns to the list.
#[poem::handler]
pub(crate) async fn cancel(
    session: Session,
    Data(dashboard): Data<&Dashboard>,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> poem::Result<Response> {
    session.check_csrf(&form)?;
    let id = Uuid::parse_str(&id)
        .map_err(|_| page_error(ApiError::invalid("id", "not a notification id")))?;
    let reason = format!("cancelled from the dashboard by {}", session.name);
    notifications::cancel(&dashboard.state, id, &reason)
        .await
        .map_err(page_error)?;
    Ok(see_other("/scheduled"))
}
