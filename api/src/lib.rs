//! Herald's HTTP façade: an OpenAPI service (poem-openapi) that validates requests, stores
//! notifications, publishes commands to NATS, and reads status from the database. It never calls a
//! provider.
//!
//! Routes: `/api/v1/...` (see [`notifications`]), `/health`, `/metrics`, Swagger UI at `/api/docs`,
//! the spec at `/api/openapi.json`.

mod body_limit;
pub mod channels;
pub mod engine_view;
pub mod error;
pub mod health;
pub mod notifications;
pub mod state;

use poem::{Endpoint, EndpointExt, Route, get};
use poem_openapi::OpenApiService;

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
            channels::ChannelsApi::new(state.clone()),
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
    let service = openapi_service(state, server_url);
    let docs = service.swagger_ui();
    let spec = service.spec_endpoint();
    Route::new()
        .nest("/", service)
        .nest("/api/docs", docs)
        .at("/api/openapi.json", spec)
        .at(
            "/metrics",
            get(poem::endpoint::make_sync(move |_| match &metrics {
                Some(handle) => handle.render(),
                None => String::new(),
            })),
        )
        .around(|next, req| body_limit::limit_body(next, req, MAX_BODY_BYTES))
        .catch_all_error(error::render_error)
}
