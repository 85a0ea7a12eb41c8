//! The operator dashboard: server-rendered pages (askama) at `/`, beside `/api/v1`.
//!
//! Pages: the activity feed with throughput and latency plots (`/`), a notification with every
//! delivery attempt (`/notifications/{id}`), providers and their circuits (`/channels`), dead
//! letters with replay (`/dead-letters`) and scheduled sends with cancel (`/scheduled`).
//!
//! Operators log in by pasting an admin API key; the session lives in a signed, HttpOnly,
//! SameSite=Strict cookie (`herald_session`). Mutating actions are POST forms carrying the session's
//! CSRF token; before that, every POST (the login form's too) that a browser sends from another
//! site's page is refused (see `cross_origin`). Every page reads without JavaScript; askama escapes
//! all data, and a Content-Security-Policy forbids scripts as a second line of defence.

mod channels;
mod dead_letters;
mod detail;
mod feed;
mod plots;
mod scheduled;
mod session;

use std::sync::Arc;
use std::time::Duration;

use askama::Template;
use poem::{
    Endpoint, EndpointExt, IntoEndpoint, IntoResponse, Response, Route, get,
    http::{StatusCode, header},
    middleware::{CookieJarManager, SetHeader},
    post,
    web::cookie::CookieKey,
};

use crate::{ApiError, AppState, cross_origin::CrossOriginProtection};

/// Path of the stylesheet.
const CSS_PATH: &str = "/assets/dashboard.css";
/// The stylesheet, served from the binary.
const CSS: &str = include_str!("../../assets/dashboard.css");
/// No scripts at all; styles, images and frames only from this origin (the HTML preview is a
/// sandboxed `srcdoc` frame).
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; style-src 'self'; img-src 'self' data:; \
     frame-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Dashboard settings.
#[derive(Clone)]
pub struct DashboardSettings {
    /// How long a login lasts.
    pub session_ttl: Duration,
    /// Mark the session cookie `Secure` (serve the dashboard behind TLS).
    pub secure_cookie: bool,
    /// The key session cookies are signed with ([`cookie_key`]).
    pub cookie_key: CookieKey,
    /// Seconds between automatic reloads of the activity feed.
    pub refresh_secs: u32,
}

impl Default for DashboardSettings {
    fn default() -> Self {
        Self {
            session_ttl: Duration::from_secs(12 * 3600),
            secure_cookie: false,
            cookie_key: CookieKey::generate(),
            refresh_secs: 10,
        }
    }
}

/// A session secret shorter than 32 bytes.
#[derive(Debug, thiserror::Error)]
#[error("dashboard.session_secret must be at least 32 bytes")]
pub struct WeakSecret;

/// The key session cookies are signed with: derived from `secret` (at least 32 bytes; the same
/// on every instance, so sessions survive restarts and load balancing), or random when `None`
/// (sessions end when the process does).
pub fn cookie_key(secret: Option<&str>) -> Result<CookieKey, WeakSecret> {
    match secret {
        Some(secret) if secret.len() < 32 => Err(WeakSecret),
        Some(secret) => Ok(CookieKey::derive_from(secret.as_bytes())),
        None => Ok(CookieKey::generate()),
    }
}

/// What every page handler reads.
#[derive(Clone)]
pub(crate) struct Dashboard {
    state: AppState,
    settings: Arc<DashboardSettings>,
    /// Refuses forms another site's page makes a browser post (login included).
    protection: CrossOriginProtection,
}

/// Serves the activity feed at `/` in front of `root`, the endpoint nested at `/` (the API).
///
/// A route for `/` beside an endpoint nested at `/` is never chosen by poem's router (the nest's
/// catch-all wins), so the feed is picked here by path instead.
/// `server_url` is Herald's public URL, an origin the pages' forms may be sent from.
pub fn with_feed_at_root<E>(
    root: E,
    state: AppState,
    server_url: &str,
) -> impl Endpoint<Output = Response> + use<E>
where
    E: IntoEndpoint,
    E::Endpoint: 'static,
{
    let feed = Arc::new(page(&Dashboard::new(state, server_url), get(feed::page)));
    root.into_endpoint().around(move |next, req| {
        let feed = feed.clone();
        async move {
            if req.uri().path() == "/" {
                feed.call(req).await.map(IntoResponse::into_response)
            } else {
                next.call(req).await.map(IntoResponse::into_response)
            }
        }
    })
}

/// Adds the dashboard's pages other than `/` ([`with_feed_at_root`]) to `route`; `server_url` is
/// Herald's public URL, an origin the pages' forms may be sent from.
pub fn mount(route: Route, state: AppState, server_url: &str) -> Route {
    let dashboard = Dashboard::new(state, server_url);
    route
        .at(
            "/login",
            page(&dashboard, get(session::login_form).post(session::login)),
        )
        .at("/logout", page(&dashboard, post(session::logout)))
        .at("/notifications/:id", page(&dashboard, get(detail::page)))
        .at("/channels", page(&dashboard, get(channels::page)))
        .at("/dead-letters", page(&dashboard, get(dead_letters::page)))
        .at(
            "/dead-letters/:seq/replay",
            page(&dashboard, post(dead_letters::replay)),
        )
        .at("/scheduled", page(&dashboard, get(scheduled::page)))
        .at(
            "/scheduled/:id/cancel",
            page(&dashboard, post(scheduled::cancel)),
        )
        .at(CSS_PATH, get(stylesheet))
}

impl Dashboard {
    fn new(state: AppState, server_url: &str) -> Self {
        let settings = state.dashboard.clone();
        Dashboard {
            state,
            settings,
            protection: CrossOriginProtection::new(server_url, page_error),
        }
    }
}

/// A page endpoint: cross-site forms refused, cookies signed with the session key, errors as HTML
/// pages, security headers (on error pages too: `SetHeader` adds them to successful answers
/// only), the dashboard data.
fn page(dashboard: &Dashboard, ep: poem::RouteMethod) -> impl Endpoint + use<> {
    ep.with(dashboard.protection.clone())
        .with(CookieJarManager::with_key(
            dashboard.settings.cookie_key.clone(),
        ))
        .around(|ep, req| async move { Ok(errors_as_pages(ep.call(req).await)) })
        .with(security_headers())
        .data(dashboard.clone())
}

/// A page's answer, its error as an HTML page: the page's own (`page_error`), else one made from
/// the error (a query string or path that did not parse, a method the route has not).
fn errors_as_pages<R: IntoResponse>(answer: poem::Result<R>) -> Response {
    match answer {
        Ok(response) => response.into_response(),
        Err(err) if err.is_from_response() => err.into_response(),
        Err(err) => {
            let status = err.status();
            let message = if status.is_server_error() {
                tracing::error!(error = %err, "dashboard page failed");
                "internal error; see the server log".to_string()
            } else {
                err.to_string()
            };
            error_page(status, message)
        }
    }
}

fn security_headers() -> SetHeader {
    SetHeader::new()
        .overriding(header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY)
        .overriding(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .overriding(header::REFERRER_POLICY, "same-origin")
        .overriding(header::CACHE_CONTROL, "no-store")
}

#[poem::handler]
fn stylesheet() -> Response {
    Response::builder()
        .content_type("text/css; charset=utf-8")
        .header(header::CACHE_CONTROL, "public, max-age=3600")
        .body(CSS)
}

/// Renders a page template as a 200 HTML response.
pub(crate) fn html(page: &impl Template) -> poem::Result<Response> {
    render(page, StatusCode::OK)
}

fn render(page: &impl Template, status: StatusCode) -> poem::Result<Response> {
    match page.render() {
        Ok(body) => Ok(Response::builder()
            .status(status)
            .content_type("text/html; charset=utf-8")
            .body(body)),
        Err(err) => Err(poem::Error::from_response(plain_error(&err))),
    }
}

fn plain_error(err: &dyn std::fmt::Display) -> Response {
    tracing::error!(error = %err, "cannot render a dashboard page");
    Response::builder()
        .status(StatusCode::INTERNAL_SERVER_ERROR)
        .content_type("text/plain; charset=utf-8")
        .body("internal error; see the server log")
}

/// A page saying what went wrong.
#[derive(Template)]
#[template(path = "dashboard/error.html")]
struct ErrorPage {
    signed_in: bool,
    status: u16,
    title: String,
    message: String,
}

/// Turns an API error into an HTML error page with the same status.
pub(crate) fn page_error(err: ApiError) -> poem::Error {
    let (status, body) = err.status_and_body();
    poem::Error::from_response(error_page(status, body.message.clone()))
}

/// An HTML page saying what went wrong, with `status`.
fn error_page(status: StatusCode, message: String) -> Response {
    let page = ErrorPage {
        signed_in: true,
        status: status.as_u16(),
        title: status.canonical_reason().unwrap_or("Error").to_string(),
        message,
    };
    render(&page, status).unwrap_or_else(|err| err.into_response())
}

/// A `303 See Other` to `location`, the answer to a successful form POST.
pub(crate) fn see_other(location: &str) -> Response {
    poem::web::Redirect::see_other(location).into_response()
}

/// Formats a time for tables: `2025-01-31 14:05:09`, UTC.
pub(crate) fn when(at: chrono::DateTime<chrono::Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S").to_string()
}
