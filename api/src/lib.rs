//! Herald's HTTP façade: an OpenAPI service (poem-openapi) that validates requests, stores
//! notifications, publishes commands to NATS, and reads status from the database. It never calls a
//! provider.
//!
//! Routes: `/api/v1/...` (see [`notifications`]), `/health`, `/metrics`, Swagger UI at `/api/docs`,
//! the spec at `/api/openapi.json`, and the operator dashboard's pages at `/` (see [`dashboard`]).

pub mod auth;
mod body_limit;
pub mod bulk;
pub mod channels;
mod cross_origin;
mod cursor;
pub mod customers;
pub mod dashboard;
pub mod dlq;
pub mod engine_view;
pub mod error;
pub mod fingerprint;
pub mod health;
pub mod history;
mod host_check;
pub mod idempotency;
pub mod notifications;
pub mod orders;
pub mod preferences;
pub mod receipts;
pub mod state;
pub mod templates;
pub mod twilio;
pub mod validate;

use std::sync::Arc;

use poem::{Endpoint, EndpointExt, IntoEndpoint, Route, get};
use poem_openapi::OpenApiService;

use cross_origin::CrossOriginProtection;
pub use error::{ApiError, ErrorBody};
pub use state::AppState;

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// The OpenAPI service: all documented endpoints.
pub fn openapi_service(
    state: AppState,
    server_url: &str,
) -> OpenApiService<impl poem_openapi::OpenApi + use<>, ()> {
    OpenApiService::new(
        (
            notifications::NotificationsApi::new(state.clone()),
            preferences::PreferencesApi::new(state.clone()),
            bulk::BulkApi::new(state.clone()),
            channels::ChannelsApi::new(state.clone()),
            history::HistoryApi::new(state.clone()),
            receipts::ReceiptsApi::new(state.clone()),
            twilio::TwilioApi::new(state.clone()),
            dlq::DlqApi::new(state.clone()),
            customers::CustomersApi::new(state.clone()),
            orders::OrdersApi::new(state.clone()),
            templates::TemplatesApi::new(state.clone()),
            health::HealthApi::new(state),
        ),
        "Herald",
        env!("CARGO_PKG_VERSION"),
    )
    .description(
        "Herald turns API calls and domain events into delivered notifications over email, \
         Telegram, SMS, push and webhooks, with failover, retries and a dead-letter stream.",
    )
    .server(server_url)
}

/// The whole HTTP application.
pub fn app(state: AppState, server_url: &str) -> impl Endpoint + use<> {
    let metrics = state.metrics.clone();
    let publisher = state.publisher.clone();
    let auth = state.auth.clone();
    let auth_enabled = auth.enabled();
    let allowed_hosts = (!auth_enabled).then(|| {
        let twilio = state
            .twilio_status
            .as_ref()
            .map(|callbacks| callbacks.url());
        Arc::new(host_check::AllowedHosts::new(
            std::iter::once(server_url).chain(twilio),
        ))
    });
    let pages = state.clone();
    let service = openapi_service(state, server_url);
    let docs = service.swagger_ui();
    let spec = service.spec_endpoint();
    // Browsers send no bearer key by themselves, so with authentication on another site's page
    // can make a browser send only requests that fail with 401; with it off, any request acts as
    // admin, so the API refuses those a browser sends from another site.
    let api = service.into_endpoint().with_if(
        !auth_enabled,
        CrossOriginProtection::new(server_url, Into::into),
    );
    let route = Route::new().nest(
        "/",
        dashboard::with_feed_at_root(api, pages.clone(), server_url),
    );
    dashboard::mount(route, pages, server_url)
        .nest("/api/docs", docs)
        .at("/api/openapi.json", spec)
        .at(
            "/metrics",
            get(poem::endpoint::make(move |_| {
                let metrics = metrics.clone();
                let publisher = publisher.clone();
                async move {
                    health::record_queue_depth(&publisher).await;
                    match &metrics {
                        Some(handle) => handle.render(),
                        None => String::new(),
                    }
                }
            })),
        )
        .around(|next, req| body_limit::limit_body(next, req, MAX_BODY_BYTES))
        .around(move |next, req| auth::fill_when_disabled(next, req, auth_enabled))
        // With authentication off every request acts as admin: a page of another site whose name
        // rebinds to this machine must not reach Herald, so only loopback hosts and Herald's own
        // are served.
        .around(move |next, req| {
            let allowed = allowed_hosts.clone();
            async move {
                match &allowed {
                    Some(allowed) => host_check::refuse_other_hosts(next, req, allowed).await,
                    None => next.call(req).await,
                }
            }
        })
        .data(auth)
        .catch_all_error(error::render_error)
}
