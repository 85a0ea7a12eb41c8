//! Dashboard sessions: log in with an admin API key, a signed cookie, CSRF tokens, log out.
//!
//! The cookie holds a random session id, the key's id and lookup prefix (never its secret), the
//! expiry and a random CSRF token, signed with the dashboard's key so it cannot be forged or
//! altered. Every request checks the expiry, that the key is still unrevoked and admin, so
//! revoking the key ends its sessions (within the key cache period), and that the session was not
//! logged out: a logout records the session id in the database (`dashboard_logouts`), so a copy
//! of the cookie stops working too, on every instance sharing the database, at once.

use chrono::{DateTime, Utc};
use herald_entities::repo::dashboard_logouts;
use poem::{
    FromRequest, Request, RequestBody, Response,
    web::{
        Data, Form,
        cookie::{Cookie, CookieJar, SameSite},
    },
};
use rand::TryRngCore;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Dashboard, html, page_error, render, see_other};
use crate::{
    ApiError,
    auth::{Scope, constant_time_eq, split_token},
};

/// Name of the session cookie.
const COOKIE: &str = "herald_session";
/// Random bytes of a CSRF token.
const CSRF_BYTES: usize = 32;
/// How long a logout is remembered after its cookie expired: the clocks of instances sharing the
/// database may differ, and a cookie is refused as expired by the clock of the instance it reaches.
const LOGOUT_KEPT_AFTER_EXPIRY: chrono::Duration = chrono::Duration::hours(1);

/// What the signed cookie carries.
#[derive(Debug, Serialize, Deserialize)]
struct SessionCookie {
    /// The session's random id, recorded at logout.
    session_id: Uuid,
    /// The API key logged in with.
    key_id: Uuid,
    /// Its lookup prefix (empty when authentication is disabled).
    prefix: String,
    /// Its name, shown in the header.
    name: String,
    /// Unix time the session ends.
    expires: i64,
    /// The token every form must send back.
    csrf: String,
}

/// A logged-in operator; taking it as a handler parameter makes the page require a session
/// (without one the browser is sent to the login page).
pub(crate) struct Session {
    /// The session's id.
    id: Uuid,
    /// When its cookie expires.
    expires: DateTime<Utc>,
    /// The API key's name.
    pub name: String,
    /// The CSRF token forms must carry.
    pub csrf: String,
}

impl Session {
    /// Refuses a form whose CSRF token is not this session's (403).
    pub fn check_csrf(&self, form: &CsrfForm) -> poem::Result<()> {
        if constant_time_eq(form.csrf.as_bytes(), self.csrf.as_bytes()) {
            Ok(())
        } else {
            Err(page_error(ApiError::forbidden(
                "the form's CSRF token is missing or stale; reload the page and try again",
            )))
        }
    }
}

/// The body of every mutating form.
#[derive(Debug, Deserialize)]
pub(crate) struct CsrfForm {
    /// The session's CSRF token.
    #[serde(default)]
    pub csrf: String,
}

impl<'a> FromRequest<'a> for Session {
    async fn from_request(req: &'a Request, _body: &mut RequestBody) -> poem::Result<Self> {
        let Some(dashboard) = req.data::<Dashboard>() else {
            return Err(page_error(ApiError::internal(
                &"no dashboard attached to the route",
            )));
        };
        let to_login = || poem::Error::from_response(see_other("/login"));
        let Some(cookie) = req.cookie().signed().get(COOKIE) else {
            return Err(to_login());
        };
        let Ok(data) = cookie.value::<SessionCookie>() else {
            return Err(to_login());
        };
        let Some(expires) = DateTime::from_timestamp(data.expires, 0).filter(|at| *at > Utc::now())
        else {
            return Err(to_login());
        };
        let usable = dashboard
            .state
            .auth
            .still_grants(&data.prefix, data.key_id, Scope::Admin)
            .await
            .map_err(page_error)?;
        if !usable {
            return Err(to_login());
        }
        let logged_out = dashboard_logouts::is_logged_out(&dashboard.state.db, data.session_id)
            .await
            .map_err(|err| page_error(err.into()))?;
        if logged_out {
            return Err(to_login());
        }
        Ok(Session {
            id: data.session_id,
            expires,
            name: data.name,
            csrf: data.csrf,
        })
    }
}

/// The login page.
#[derive(askama::Template)]
#[template(path = "dashboard/login.html")]
struct LoginPage {
    signed_in: bool,
    error: Option<String>,
}

/// `GET /login`.
#[poem::handler]
pub(crate) fn login_form() -> poem::Result<Response> {
    html(&LoginPage {
        signed_in: false,
        error: None,
    })
}

/// The login form.
#[derive(Debug, Deserialize)]
pub(crate) struct LoginForm {
    #[serde(default)]
    api_key: String,
}

/// `POST /login`: verifies the key as the API does (admin scope) and starts a session.
#[poem::handler]
pub(crate) async fn login(
    Data(dashboard): Data<&Dashboard>,
    jar: &CookieJar,
    Form(form): Form<LoginForm>,
) -> poem::Result<Response> {
    let token = form.api_key.trim();
    let principal = match dashboard.state.auth.authorize(token, Scope::Admin).await {
        Ok(principal) => principal,
        Err(err @ (ApiError::Unauthorized(_) | ApiError::Forbidden(_))) => {
            let (status, body) = err.status_and_body();
            return render(
                &LoginPage {
                    signed_in: false,
                    error: Some(body.message.clone()),
                },
                status,
            );
        }
        Err(other) => return Err(page_error(other)),
    };
    let csrf = random_token().map_err(|err| page_error(ApiError::internal(&err)))?;
    let settings = &dashboard.settings;
    let ttl =
        chrono::Duration::from_std(settings.session_ttl).unwrap_or(chrono::Duration::hours(12));
    let data = SessionCookie {
        session_id: Uuid::new_v4(),
        key_id: principal.key_id,
        prefix: split_token(token)
            .map(|(prefix, _)| prefix.to_string())
            .unwrap_or_default(),
        name: principal.name,
        expires: (Utc::now() + ttl).timestamp(),
        csrf,
    };
    let mut cookie = Cookie::new(COOKIE, &data);
    cookie.set_http_only(true);
    cookie.set_same_site(SameSite::Strict);
    cookie.set_secure(settings.secure_cookie);
    cookie.set_path("/");
    cookie.set_max_age(settings.session_ttl);
    jar.signed().add(cookie);
    tracing::info!(key_id = %data.key_id, "dashboard login");
    Ok(see_other("/"))
}

/// `POST /logout`: ends the session, for every copy of its cookie (see the module's
/// documentation), and deletes the cookie in the browser.
#[poem::handler]
pub(crate) async fn logout(
    Data(dashboard): Data<&Dashboard>,
    session: Session,
    jar: &CookieJar,
    Form(form): Form<CsrfForm>,
) -> poem::Result<Response> {
    session.check_csrf(&form)?;
    dashboard_logouts::record(
        &dashboard.state.db,
        session.id,
        session.expires,
        Utc::now() - LOGOUT_KEPT_AFTER_EXPIRY,
    )
    .await
    .map_err(|err| page_error(err.into()))?;
    tracing::info!(session_id = %session.id, "dashboard logout");
    let mut removal = Cookie::named(COOKIE);
    removal.set_path("/");
    removal.make_removal();
    jar.add(removal);
    Ok(see_other("/login"))
}

fn random_token() -> Result<String, rand::rand_core::OsError> {
    let mut bytes = [0u8; CSRF_BYTES];
    rand::rngs::OsRng.try_fill_bytes(&mut bytes)?;
    Ok(hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use poem::http::StatusCode;

    use super::*;

    #[test]
    fn csrf_tokens_are_random_and_compared_whole() {
        let a = random_token().expect("randomness");
        let b = random_token().expect("randomness");
        assert_eq!(a.len(), CSRF_BYTES * 2);
        assert_ne!(a, b);
        let session = Session {
            id: Uuid::new_v4(),
            expires: Utc::now(),
            name: "ops".into(),
            csrf: a.clone(),
        };
        assert!(session.check_csrf(&CsrfForm { csrf: a.clone() }).is_ok());
        assert!(session.check_csrf(&CsrfForm { csrf: b }).is_err());
        assert!(
            session
                .check_csrf(&CsrfForm {
                    csrf: String::new()
                })
                .is_err()
        );
        let err = session
            .check_csrf(&CsrfForm {
                csrf: a[..10].to_string(),
            })
            .unwrap_err();
        assert_eq!(err.status(), StatusCode::FORBIDDEN);
    }
}
