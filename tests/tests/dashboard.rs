//! The operator dashboard end to end: its auth boundary over plain HTTP, and the pages driven in
//! a real headless Chromium (chromedriver + fantoccini) — log in, read a telegram → email failover
//! with both attempts, replay a dead letter and watch it go out, cancel a scheduled send, and check
//! that HTML in a notification is shown as text, never run. Screenshots of every page go to
//! `target/test-artifacts/dashboard/`.
//!
//! Needs `chromium` and `chromium-driver` (`scripts/test.sh` installs them); without chromedriver
//! the browser test fails saying so. `CHROMEDRIVER` and `CHROMIUM` override the binaries' paths.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use herald_engine::Config;
use herald_tests::{
    DatabaseKind, E2E_TIMEOUT, NatsServer, SmtpSink, TestDatabase, TestHerald, eventually,
    eventually_showing, free_port, test_config,
};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use reqwest::{StatusCode, header};
use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// Script and markup an attacker might put in a notification's variables.
const INJECTION: &str = "<script>alert('xss')</script><img src=x onerror=\"alert('img');document.body.dataset.pwned=1\">";

struct World {
    nats: NatsServer,
    smtp: SmtpSink,
    db: TestDatabase,
    provider: MockServer,
    herald: TestHerald,
}

/// Herald with Telegram pointed at a local fake, two deliveries before a dead letter, and a short
/// circuit cool-down.
async fn world(tune: impl FnOnce(&mut Config)) -> World {
    let nats = NatsServer::start().await.expect("nats");
    let smtp = SmtpSink::start().await.expect("smtp");
    let db = TestDatabase::from_env().await.expect("db");
    let provider = MockServer::start().await;
    let mut config = test_config(&nats, &db, &smtp);
    config.channels.telegram = Some(herald_actors::channel::telegram::TelegramConfig {
        base_url: provider.uri(),
        bot_token: "42:TESTTOKEN".into(),
        timeout_ms: 2_000,
        ..Default::default()
    });
    config.dispatch.retry.max_deliveries = 2;
    config.channels.limits.circuit.cool_down_ms = 200;
    tune(&mut config);
    let herald = TestHerald::start(config).await.expect("herald");
    World {
        nats,
        smtp,
        db,
        provider,
        herald,
    }
}

fn email(to: &str, subject: &str) -> Value {
    json!({
        "recipient": { "email": to },
        "category": "transactional",
        "channels": ["email"],
        "content": { "subject": subject, "text": "Your order #1001 is on its way." }
    })
}

/// A browser-less client that keeps no cookies and follows no redirects.
fn raw_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
}

/// Logs in with `key` over plain HTTP; returns the status, the `Set-Cookie` header and the body.
async fn login(base: &str, key: &str) -> (StatusCode, Option<String>, String) {
    login_with(base, key, &[]).await
}

/// Logs in as [`login`] does, with `headers` (a browser's fetch metadata and `Origin`).
async fn login_with(
    base: &str,
    key: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, Option<String>, String) {
    let mut request = raw_client().post(format!("{base}/login"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request
        .form(&[("api_key", key)])
        .send()
        .await
        .expect("POST /login");
    let status = response.status();
    let cookie = response
        .headers()
        .get(header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    (status, cookie, response.text().await.unwrap_or_default())
}

/// GETs `path` with the session cookie (`name=value` part of a `Set-Cookie`).
async fn get_page(base: &str, path: &str, cookie: Option<&str>) -> reqwest::Response {
    let mut request = raw_client().get(format!("{base}{path}"));
    if let Some(cookie) = cookie {
        request = request.header(header::COOKIE, cookie);
    }
    request.send().await.expect("GET page")
}

/// POSTs a form to `path` with the session cookie.
async fn post_form(base: &str, path: &str, cookie: &str, form: &[(&str, &str)]) -> StatusCode {
    raw_client()
        .post(format!("{base}{path}"))
        .header(header::COOKIE, cookie)
        .form(form)
        .send()
        .await
        .expect("POST form")
        .status()
}

fn location(response: &reqwest::Response) -> String {
    response
        .headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// The CSRF token in a page's forms.
fn csrf_in(html: &str) -> String {
    let start = html
        .find("name=\"csrf\" value=\"")
        .map(|i| i + "name=\"csrf\" value=\"".len())
        .unwrap_or_else(|| panic!("no CSRF field in the page: {html}"));
    html[start..].chars().take_while(|c| *c != '"').collect()
}

/// Login CSRF: another site's page must not make a browser post the attacker's admin key to
/// `/login` and so log it into the attacker's session. A login, or any form, that the browser says
/// comes from another site (`Sec-Fetch-Site`, else `Origin`) is refused as an HTML page, with no
/// session cookie; the browser's same-origin login and a login without those headers still work.
#[tokio::test]
async fn forms_posted_from_another_site_are_refused_the_login_too() {
    let w = world(|_| {}).await;
    let base = w.herald.base().to_string();
    let key = w.herald.admin_key();
    let cross_site: [&[(&str, &str)]; 4] = [
        &[
            ("sec-fetch-site", "cross-site"),
            ("origin", "https://evil.example"),
        ],
        &[
            ("sec-fetch-site", "same-site"),
            ("origin", "https://sub.evil.example"),
        ],
        &[("sec-fetch-site", "cross-site"), ("origin", &base)],
        &[("origin", "https://evil.example")],
    ];
    for headers in cross_site {
        let (status, cookie, body) = login_with(&base, key, headers).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{headers:?}: {body}");
        assert!(cookie.is_none(), "{headers:?}: no session: {cookie:?}");
        assert!(body.contains("cross-origin request refused"), "{body}");
    }
    let refused = raw_client()
        .post(format!("{base}/login"))
        .header("sec-fetch-site", "cross-site")
        .form(&[("api_key", key)])
        .send()
        .await
        .expect("POST /login");
    let headers = refused.headers();
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or_default());
    assert_eq!(
        content_type,
        Some("text/html; charset=utf-8"),
        "an HTML error page"
    );
    assert!(
        headers.contains_key(header::CONTENT_SECURITY_POLICY),
        "{headers:?}"
    );

    let same_origin: [&[(&str, &str)]; 4] = [
        &[("sec-fetch-site", "same-origin"), ("origin", &base)],
        &[("sec-fetch-site", "none")],
        &[("origin", &base)],
        &[],
    ];
    for headers in same_origin {
        let (status, cookie, body) = login_with(&base, key, headers).await;
        assert_eq!(status, StatusCode::SEE_OTHER, "{headers:?}: {body}");
        assert!(cookie.is_some(), "{headers:?}: a session");
    }

    // A session's own form, with its CSRF token, posted from another site: refused too.
    let (_, cookie, _) = login(&base, key).await;
    let cookie = cookie.expect("a session cookie");
    let cookie = cookie.split(';').next().expect("name=value").to_string();
    let feed = get_page(&base, "/?refresh=off", Some(&cookie)).await;
    let csrf = csrf_in(&feed.text().await.expect("feed page"));
    let logout = raw_client()
        .post(format!("{base}/logout"))
        .header(header::COOKIE, &cookie)
        .header("sec-fetch-site", "cross-site")
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .expect("POST /logout");
    assert_eq!(logout.status(), StatusCode::FORBIDDEN);
    assert!(
        !logout.headers().contains_key(header::SET_COOKIE),
        "the session stays"
    );
    w.herald.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn pages_need_a_session_from_an_admin_key_and_forms_need_its_csrf_token() {
    let w = world(|_| {}).await;
    let base = w.herald.base().to_string();
    let id = uuid::Uuid::now_v7();
    for path in [
        "/".to_string(),
        "/channels".into(),
        "/dead-letters".into(),
        "/scheduled".into(),
        format!("/notifications/{id}"),
    ] {
        let response = get_page(&base, &path, None).await;
        assert_eq!(response.status(), StatusCode::SEE_OTHER, "{path}");
        assert_eq!(location(&response), "/login", "{path}");
    }
    let forged = get_page(&base, "/", Some("herald_session=%7B%22key_id%22%3A1%7D")).await;
    assert_eq!(forged.status(), StatusCode::SEE_OTHER, "an unsigned cookie");

    let (status, cookie, body) = login(&base, "hk_nope").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(cookie.is_none(), "no session for a wrong key");
    assert!(body.contains("unknown or revoked API key"), "{body}");
    let reader = herald_engine::apikey::create(w.herald.db(), "reader", "send,read")
        .await
        .expect("key")
        .token;
    let (status, cookie, body) = login(&base, &reader).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(cookie.is_none(), "no session for a key without admin");
    assert!(body.contains("admin"), "{body}");

    let (status, set_cookie, _) = login(&base, w.herald.admin_key()).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let set_cookie = set_cookie.expect("a session cookie");
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age="] {
        assert!(
            set_cookie.contains(attribute),
            "{attribute} in {set_cookie}"
        );
    }
    assert!(
        !set_cookie.contains("Secure"),
        "Secure is off unless configured"
    );
    assert!(
        !set_cookie.contains(&w.herald.admin_key()[20..]),
        "the key's secret never goes into the cookie"
    );
    let cookie = set_cookie
        .split(';')
        .next()
        .expect("name=value")
        .to_string();
    let feed = get_page(&base, "/", Some(&cookie)).await;
    assert_eq!(feed.status(), StatusCode::OK);
    let csp = feed
        .headers()
        .get(header::CONTENT_SECURITY_POLICY)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    let feed = feed.text().await.expect("feed");
    assert!(
        feed.contains("http-equiv=\"refresh\""),
        "the feed reloads itself"
    );
    let csrf = csrf_in(&feed);
    let still = get_page(&base, "/?refresh=off&status=dead", Some(&cookie)).await;
    let still = still.text().await.expect("feed");
    assert!(
        !still.contains("http-equiv=\"refresh\""),
        "?refresh=off stops it"
    );
    assert!(
        still.contains("<option value=\"dead\" selected>"),
        "the filter is kept"
    );
    let bad_filter = get_page(&base, "/?status=lost", Some(&cookie)).await;
    assert_eq!(bad_filter.status(), StatusCode::BAD_REQUEST);
    assert!(
        bad_filter.text().await.expect("page").contains("no status"),
        "an HTML page says what was wrong"
    );
    let mut tampered = cookie.clone();
    tampered.pop();
    tampered.push(if cookie.ends_with('A') { 'B' } else { 'A' });
    assert_eq!(
        get_page(&base, "/", Some(&tampered)).await.status(),
        StatusCode::SEE_OTHER,
        "an altered cookie is no session"
    );

    // A send naming a template is shown by its template (it is rendered at delivery).
    let templated = w
        .herald
        .send_accepted(&json!({
            "recipient": { "email": "ada@example.com" },
            "category": "transactional",
            "channels": ["email"],
            "template": { "code": "order_placed", "locale": "de",
                          "variables": { "order_number": "1001", "total": "42.00 EUR" } }
        }))
        .await;
    let detail = get_page(&base, &format!("/notifications/{templated}"), Some(&cookie)).await;
    let detail = detail.text().await.expect("detail");
    assert!(
        detail.contains("template order_placed, locale de"),
        "the template is named: {detail}"
    );
    let feed = get_page(&base, "/?refresh=off", Some(&cookie)).await;
    let feed = feed.text().await.expect("feed");
    assert!(
        feed.contains("template order_placed"),
        "the feed names it too: {feed}"
    );

    // Forms without the session's CSRF token are refused and change nothing.
    let mut later = email("ada@example.com", "Later");
    later["scheduled_at"] = json!((chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339());
    let scheduled = w.herald.send_accepted(&later).await;
    let cancel = format!("/scheduled/{scheduled}/cancel");
    assert_eq!(
        post_form(&base, &cancel, &cookie, &[]).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        post_form(&base, &cancel, &cookie, &[("csrf", "0123")]).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        post_form(&base, "/dead-letters/1/replay", &cookie, &[]).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        post_form(&base, "/logout", &cookie, &[]).await,
        StatusCode::FORBIDDEN
    );
    let (_, still) = w
        .herald
        .get(&format!("/api/v1/notifications/{scheduled}"))
        .await;
    assert_eq!(still["status"], "scheduled");
    assert_eq!(
        post_form(&base, &cancel, &cookie, &[("csrf", &csrf)]).await,
        StatusCode::SEE_OTHER
    );
    let (_, cancelled) = w
        .herald
        .get(&format!("/api/v1/notifications/{scheduled}"))
        .await;
    assert_eq!(cancelled["status"], "cancelled");
    assert!(
        cancelled["status_reason"]
            .as_str()
            .unwrap_or_default()
            .contains("dashboard"),
        "{cancelled}"
    );

    // The API, docs and probes are where they were.
    for path in [
        "/health",
        "/api/openapi.json",
        "/metrics",
        "/api/v1/channels",
    ] {
        let (status, _) = w.herald.get(path).await;
        assert_eq!(status, StatusCode::OK, "{path}");
    }
    let (status, _) = w
        .herald
        .request_with_key(reqwest::Method::GET, "/api/v1/channels", None, None)
        .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "a session is no API credential"
    );

    // Revoking the key ends its sessions (within the key cache period).
    let (prefix, _) = herald_api::auth::split_token(w.herald.admin_key()).expect("key shape");
    herald_entities::repo::api_keys::revoke(w.herald.db(), prefix)
        .await
        .expect("revoke");
    eventually("the revoked key's session to end", E2E_TIMEOUT, || async {
        (get_page(&base, "/", Some(&cookie)).await.status() == StatusCode::SEE_OTHER).then_some(())
    })
    .await;
    w.herald.shutdown().await.expect("shutdown");
}

/// The `name=value` part of a session's `Set-Cookie`.
fn session_cookie(set_cookie: Option<String>) -> String {
    set_cookie
        .expect("a session cookie")
        .split(';')
        .next()
        .expect("name=value")
        .to_string()
}

/// Logging out ends the session in Herald, not only in the browser: a copy of its cookie taken
/// before the logout opens no page and posts no form after it. Another session of the same key
/// goes on, and logging in again works.
#[tokio::test]
async fn logging_out_ends_the_session_for_every_copy_of_its_cookie() {
    let w = world(|_| {}).await;
    let base = w.herald.base().to_string();
    let key = w.herald.admin_key();
    let (_, set_cookie, _) = login(&base, key).await;
    let copied = session_cookie(set_cookie);
    let (_, set_cookie, _) = login(&base, key).await;
    let other = session_cookie(set_cookie);
    let feed = get_page(&base, "/?refresh=off", Some(&copied)).await;
    assert_eq!(feed.status(), StatusCode::OK);
    let csrf = csrf_in(&feed.text().await.expect("feed page"));

    let logout = raw_client()
        .post(format!("{base}/logout"))
        .header(header::COOKIE, &copied)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .expect("POST /logout");
    assert_eq!(logout.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&logout), "/login");
    assert!(
        logout.headers().contains_key(header::SET_COOKIE),
        "the browser is told to delete its cookie"
    );

    for path in ["/?refresh=off", "/channels", "/dead-letters", "/scheduled"] {
        let response = get_page(&base, path, Some(&copied)).await;
        assert_eq!(
            response.status(),
            StatusCode::SEE_OTHER,
            "{path}: a copy of a logged-out session's cookie opens nothing"
        );
        assert_eq!(location(&response), "/login", "{path}");
    }
    let mut later = email("ada@example.com", "Later");
    later["scheduled_at"] = json!((chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339());
    let scheduled = w.herald.send_accepted(&later).await;
    assert_eq!(
        post_form(
            &base,
            &format!("/scheduled/{scheduled}/cancel"),
            &copied,
            &[("csrf", &csrf)]
        )
        .await,
        StatusCode::SEE_OTHER,
        "sent to the login page"
    );
    let (_, still) = w
        .herald
        .get(&format!("/api/v1/notifications/{scheduled}"))
        .await;
    assert_eq!(still["status"], "scheduled", "the form changed nothing");

    let response = get_page(&base, "/?refresh=off", Some(&other)).await;
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "the other session goes on"
    );
    let (_, set_cookie, _) = login(&base, key).await;
    let again = session_cookie(set_cookie);
    let response = get_page(&base, "/?refresh=off", Some(&again)).await;
    assert_eq!(response.status(), StatusCode::OK, "a new login works");
    w.herald.shutdown().await.expect("shutdown");
}

/// A chromedriver child process in a process group of its own, with the Chromium it starts:
/// the whole group is killed on drop, so a test that panics leaves no browser behind (killing
/// chromedriver alone orphaned Chromium).
struct ChromeDriver {
    _child: tokio::process::Child,
    /// The process group: chromedriver's pid.
    group: Pid,
    /// Its standard error, read when it fails to start.
    _log: tempfile::NamedTempFile,
    url: String,
}

impl ChromeDriver {
    /// Starts chromedriver and waits until it is ready.
    ///
    /// # Panics
    ///
    /// When it cannot be started, exits before it is ready (with its exit status and standard
    /// error), or is not ready within [`E2E_TIMEOUT`] (with the last answer).
    async fn start() -> ChromeDriver {
        let binary =
            std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".into());
        let port = free_port().expect("free port");
        let log = tempfile::NamedTempFile::new().expect("a file for chromedriver's stderr");
        let mut child = tokio::process::Command::new(&binary)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(log.reopen().expect("chromedriver's stderr file"))
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start chromedriver ({binary}): {e}. Install Debian's `chromium` and \
                     `chromium-driver` (scripts/test.sh does), or set CHROMEDRIVER"
                )
            });
        let pid = child.id().expect("a running chromedriver has a pid");
        let group = Pid::from_raw(i32::try_from(pid).expect("a pid fits an i32"));
        let url = format!("http://127.0.0.1:{port}");
        let status = format!("{url}/status");
        eventually_showing("chromedriver to answer /status", E2E_TIMEOUT, || {
            let exited = child.try_wait();
            let status = &status;
            let (binary, log) = (&binary, &log);
            async move {
                if let Ok(Some(exit)) = exited {
                    let stderr = std::fs::read_to_string(log.path()).unwrap_or_default();
                    panic!("chromedriver ({binary}) exited with {exit}; stderr:\n{stderr}");
                }
                let response = reqwest::get(status).await.map_err(|e| e.to_string())?;
                let body: Value = response.json().await.map_err(|e| e.to_string())?;
                (body["value"]["ready"] == true)
                    .then_some(())
                    .ok_or_else(|| body.to_string())
            }
        })
        .await;
        ChromeDriver {
            _child: child,
            group,
            _log: log,
            url,
        }
    }

    async fn browser(&self) -> Client {
        let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                         "--disable-gpu", "--window-size=1400,1000"]
            }),
        );
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&self.url)
            .await
            .expect("a headless Chromium session")
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        // Gone already is fine: the group was empty.
        let _ = killpg(self.group, Signal::SIGKILL);
    }
}

/// Where screenshots go: `target/test-artifacts/dashboard/`.
fn artifacts() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("test-artifacts").join("dashboard");
    std::fs::create_dir_all(&dir).expect("artifact directory");
    dir
}

/// Publishes `payload` on the dead-letter stream with `reason`, as a consumer giving up does.
async fn dead_letter(nats: &NatsServer, source: &str, reason: &str, payload: Vec<u8>) {
    let js = async_nats::jetstream::new(nats.client().await.expect("nats client"));
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(herald_nats::subjects::HEADER_DLQ_REASON, reason);
    js.publish_with_headers(
        herald_nats::subjects::dlq_subject(source),
        headers,
        payload.into(),
    )
    .await
    .expect("publish")
    .await
    .expect("stored");
}

/// The dead-letters page shows one kind of entry, or those whose reason contains a text, and its
/// next page's link keeps the filter.
#[tokio::test]
async fn dead_letters_are_filtered_by_kind_and_reason() {
    let w = world(|_| {}).await;
    let base = w.herald.base().to_string();
    let event = |id: uuid::Uuid, customer: &str| {
        json!({"v": 1, "id": id, "type": "orders.created", "occurred_at": "2026-12-06T10:00:00Z",
               "data": {"customer_id": customer, "order_number": "7001", "total_minor": 100,
                        "currency": "EUR"}})
        .to_string()
        .into_bytes()
    };
    let (late, broken) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    dead_letter(
        &w.nats,
        "events",
        "rule order_placed: unknown customer \"c-late\"",
        event(late, "c-late"),
    )
    .await;
    dead_letter(
        &w.nats,
        "events",
        "rule order_placed: template order_note does not exist",
        event(broken, "c-ok"),
    )
    .await;
    let command = herald_tests::email_command(uuid::Uuid::now_v7(), "ada@example.com", "Hello");
    let notification = command.notification_id.to_string();
    dead_letter(
        &w.nats,
        "cmd",
        "gave up after 2 rounds: unknown customer",
        command.encode().expect("encoded").to_vec(),
    )
    .await;
    let (_, cookie, _) = login(&base, w.herald.admin_key()).await;
    let cookie = cookie.expect("a session cookie");
    let cookie = cookie.split(';').next().expect("name=value").to_string();
    let page = |path: &'static str| {
        let (base, cookie) = (base.clone(), cookie.clone());
        async move {
            let response = get_page(&base, path, Some(&cookie)).await;
            (response.status(), response.text().await.unwrap_or_default())
        }
    };

    let (status, all) = page("/dead-letters").await;
    assert_eq!(status, StatusCode::OK);
    for shown in [late.to_string(), broken.to_string(), notification.clone()] {
        assert!(all.contains(&shown), "{shown} without a filter");
    }
    let (status, events) = page("/dead-letters?kind=events&reason=unknown+customer").await;
    assert_eq!(status, StatusCode::OK);
    assert!(events.contains(&late.to_string()), "{events}");
    assert!(!events.contains(&broken.to_string()), "another reason");
    assert!(!events.contains(&notification), "a command");
    assert!(
        events.contains(r#"<option value="events" selected>"#),
        "the form shows the filter"
    );
    let (_, commands) = page("/dead-letters?kind=commands").await;
    assert!(commands.contains(&notification), "{commands}");
    assert!(!commands.contains(&late.to_string()), "an event");
    // Refusals are pages like the others: HTML, with the security headers.
    for bad in [
        "/dead-letters?kind=orders",
        "/dead-letters?after=abc",
        "/notifications/not-a-uuid",
    ] {
        let response = get_page(&base, bad, Some(&cookie)).await;
        let status = response.status();
        assert!(status.is_client_error(), "{bad}: {status}");
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|value| value.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        assert!(
            header("content-type").starts_with("text/html"),
            "{bad}: {}",
            header("content-type")
        );
        assert!(
            header("content-security-policy").contains("frame-ancestors 'none'"),
            "{bad}: no CSP"
        );
        assert_eq!(header("cache-control"), "no-store", "{bad}");
    }
    w.herald.shutdown().await.expect("shutdown");
}

async fn screenshot(browser: &Client, name: &str, db: &TestDatabase) {
    let png = browser.screenshot().await.expect("screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot of {name}");
    let file = artifacts().join(format!("{name}-{}.png", db.kind()));
    std::fs::write(&file, png).expect("screenshot written");
}

/// The text of the element `css`, once the page shows it (a page still loading after a click
/// may answer with a stale element first).
async fn text_of(browser: &Client, css: &str) -> String {
    eventually(&format!("{css} on the page"), E2E_TIMEOUT, || async {
        browser
            .find(Locator::Css(css))
            .await
            .ok()?
            .text()
            .await
            .ok()
    })
    .await
}

/// The texts of every element `css`, once the page shows `n` of them.
async fn texts_of(browser: &Client, css: &str, n: usize) -> Vec<String> {
    eventually(&format!("{n} × {css} on the page"), E2E_TIMEOUT, || async {
        let mut texts = Vec::new();
        for element in browser.find_all(Locator::Css(css)).await.ok()? {
            texts.push(element.text().await.ok()?);
        }
        (texts.len() == n).then_some(texts)
    })
    .await
}

async fn path_of(browser: &Client) -> String {
    browser.current_url().await.expect("url").path().to_string()
}

/// Marks the page the browser shows now, so that `wait_path` waits for the page a click leads to
/// even when that is the same path again (a form that returns to its own list).
async fn mark_page(browser: &Client) {
    browser
        .execute("window.heraldLeftBehind = true; return null;", vec![])
        .await
        .expect("page marked");
}

/// Waits until the browser shows `expected` on a page loaded after the last `mark_page` (after a
/// form submission navigates).
async fn wait_path(browser: &Client, expected: &str) {
    eventually(
        &format!("the browser to show a new page at {expected}"),
        E2E_TIMEOUT,
        || async {
            let marked = browser
                .execute("return window.heraldLeftBehind === true;", vec![])
                .await
                .ok()?;
            (marked == json!(false) && path_of(browser).await == expected).then_some(())
        },
    )
    .await;
}

/// Asserts the page holds no element or alert the injected HTML could have made.
async fn assert_nothing_injected(browser: &Client, page: &str) {
    let injected = browser
        .execute(
            "return {scripts: document.querySelectorAll('script').length, \
                     images: document.querySelectorAll('img').length, \
                     pwned: document.body.dataset.pwned || null};",
            vec![],
        )
        .await
        .expect("DOM query");
    assert_eq!(
        injected,
        json!({"scripts": 0, "images": 0, "pwned": null}),
        "injected markup became DOM on {page}"
    );
    assert!(
        browser.get_alert_text().await.is_err(),
        "an alert fired on {page}"
    );
}

#[tokio::test]
async fn operators_read_failovers_replay_dead_letters_and_see_html_as_text() {
    let w = world(|_| {}).await;
    let driver = ChromeDriver::start().await;
    Mock::given(method("POST"))
        .and(path("/bot42:TESTTOKEN/sendMessage"))
        .respond_with(ResponseTemplate::new(500).set_body_string("internal error"))
        .mount(&w.provider)
        .await;
    let failover = w
        .herald
        .send_accepted(&json!({
            "recipient": { "email": "ada@example.com", "telegram_chat_id": "4242" },
            "category": "transactional",
            "channels": ["telegram", "email"],
            "content": { "subject": "Order shipped", "text": "Your order #1001 is on its way." }
        }))
        .await;
    let hostile = w
        .herald
        .send_accepted(&json!({
            "request_id": INJECTION,
            "recipient": { "email": "eve@example.com" },
            "category": "transactional",
            "channels": ["email"],
            "content": { "subject": INJECTION, "text": INJECTION, "html": INJECTION }
        }))
        .await;
    w.herald.wait_status(&failover, "sent").await;
    w.herald.wait_status(&hostile, "sent").await;
    w.smtp.wait_for_count(2, E2E_TIMEOUT).await.expect("mails");
    // With the SMTP server down, a third notification runs out of deliveries.
    w.smtp.set_pause(true);
    let doomed = w
        .herald
        .send_accepted(&email("carol@example.com", "Invoice"))
        .await;
    w.herald.wait_status(&doomed, "dead").await;
    w.smtp.set_pause(false);
    let base = w.herald.base().to_string();
    let browser = driver.browser().await;

    // Log in.
    browser.goto(&format!("{base}/")).await.expect("open");
    assert_eq!(path_of(&browser).await, "/login", "sent to the login page");
    screenshot(&browser, "login", &w.db).await;
    let form = browser
        .form(Locator::Css("form.login"))
        .await
        .expect("login form");
    form.set_by_name("api_key", w.herald.admin_key())
        .await
        .expect("key typed");
    mark_page(&browser).await;
    form.submit().await.expect("login submitted");
    wait_path(&browser, "/").await;
    let feed = text_of(&browser, "table.feed").await;
    assert!(feed.contains("Order shipped"), "{feed}");
    assert!(feed.contains("dead"), "{feed}");
    screenshot(&browser, "feed", &w.db).await;
    assert_nothing_injected(&browser, "the feed").await;
    let bars = browser
        .find_all(Locator::Css("svg.plot rect"))
        .await
        .expect("bars");
    assert!(!bars.is_empty(), "the throughput plot has bars");

    // The failover, read at a glance.
    mark_page(&browser).await;
    browser
        .find(Locator::Css(&format!(
            "a[href='/notifications/{failover}']"
        )))
        .await
        .expect("the failover is listed")
        .click()
        .await
        .expect("opened");
    wait_path(&browser, &format!("/notifications/{failover}")).await;
    assert_eq!(text_of(&browser, "#story").await, "telegram ✗ → email ✓");
    assert_eq!(text_of(&browser, "#final-channel").await, "email");
    let attempts = texts_of(&browser, "#attempts tr.attempt", 2).await;
    let (first, second) = (&attempts[0], &attempts[1]);
    assert!(
        first.contains("telegram") && first.contains("failed") && first.contains("500"),
        "{first}"
    );
    assert!(
        second.contains("email") && second.contains("sent"),
        "{second}"
    );
    assert!(
        !browser
            .source()
            .await
            .expect("source")
            .contains("TESTTOKEN"),
        "the bot token never shows"
    );
    screenshot(&browser, "detail", &w.db).await;

    // Hostile HTML is shown as text, never run.
    browser
        .goto(&format!("{base}/notifications/{hostile}"))
        .await
        .expect("open");
    assert_eq!(text_of(&browser, "#subject").await, INJECTION);
    assert_eq!(text_of(&browser, "#text").await, INJECTION);
    assert_nothing_injected(&browser, "the detail page").await;
    screenshot(&browser, "escaped", &w.db).await;

    // Providers.
    browser
        .goto(&format!("{base}/channels"))
        .await
        .expect("open");
    let channels = text_of(&browser, "#channels").await;
    assert!(
        channels.contains("telegram") && channels.contains("email"),
        "{channels}"
    );
    assert!(
        channels.contains("500"),
        "telegram's last failure: {channels}"
    );
    let partitions = text_of(&browser, "#partitions").await;
    assert!(
        partitions.contains("8 of 8 partitions: 0, 1, 2, 3, 4, 5, 6, 7"),
        "a lone instance owns every partition: {partitions}"
    );
    screenshot(&browser, "channels", &w.db).await;

    // Replay the dead letter and watch it go out.
    browser
        .goto(&format!("{base}/dead-letters"))
        .await
        .expect("open");
    let letters = text_of(&browser, "#dead-letters").await;
    assert!(letters.contains(&doomed), "{letters}");
    assert!(letters.contains("gave up after 2 rounds"), "{letters}");
    screenshot(&browser, "dead-letters", &w.db).await;
    mark_page(&browser).await;
    browser
        .find(Locator::Css("#dead-letters button"))
        .await
        .expect("a replay button")
        .click()
        .await
        .expect("replayed");
    wait_path(&browser, &format!("/notifications/{doomed}")).await;
    eventually(
        "the replayed notification to show sent",
        E2E_TIMEOUT,
        || async {
            browser.refresh().await.ok()?;
            let status = browser.find(Locator::Css("#status")).await.ok()?;
            (status.text().await.ok()? == "sent").then_some(())
        },
    )
    .await;
    let mails = w.smtp.wait_for_count(3, E2E_TIMEOUT).await.expect("mail");
    assert!(
        mails
            .iter()
            .any(|m| m.to.iter().any(|to| to.contains("carol@example.com"))),
        "the replay reached the SMTP server"
    );
    screenshot(&browser, "replayed", &w.db).await;
    browser
        .goto(&format!("{base}/dead-letters"))
        .await
        .expect("open");
    assert!(
        !text_of(&browser, "#dead-letters").await.contains(&doomed),
        "the replayed entry is gone"
    );

    // Cancel a scheduled send.
    let mut later = email("dan@example.com", "Later");
    later["scheduled_at"] = json!((chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339());
    let scheduled = w.herald.send_accepted(&later).await;
    browser
        .goto(&format!("{base}/scheduled"))
        .await
        .expect("open");
    assert!(text_of(&browser, "#scheduled").await.contains(&scheduled));
    screenshot(&browser, "scheduled", &w.db).await;
    mark_page(&browser).await;
    browser
        .find(Locator::Css("#scheduled button"))
        .await
        .expect("a cancel button")
        .click()
        .await
        .expect("cancelled");
    wait_path(&browser, "/scheduled").await;
    assert!(!text_of(&browser, "#scheduled").await.contains(&scheduled));
    w.herald.wait_status(&scheduled, "cancelled").await;

    // Log out.
    mark_page(&browser).await;
    browser
        .find(Locator::Css("form.account button"))
        .await
        .expect("log out button")
        .click()
        .await
        .expect("logged out");
    wait_path(&browser, "/login").await;
    browser.goto(&format!("{base}/")).await.expect("open");
    assert_eq!(path_of(&browser).await, "/login", "the session ended");

    browser.close().await.expect("browser closed");
    w.herald.shutdown().await.expect("shutdown");
}

/// The plots' per-minute query buckets by minute on this database (SQLite or PostgreSQL).
#[tokio::test]
async fn notifications_are_counted_per_minute_and_status() {
    use herald_entities::{
        NotificationStatus,
        repo::{activity, notifications},
    };
    let w = world(|_| {}).await;
    let start = chrono::DateTime::parse_from_rfc3339("2025-03-01T10:00:00Z")
        .expect("time")
        .with_timezone(&chrono::Utc);
    let at = |seconds: i64| start + chrono::Duration::seconds(seconds);
    let stored = [
        (at(-1), NotificationStatus::Queued),
        (at(0), NotificationStatus::Queued),
        (at(59), NotificationStatus::Queued),
        (at(5 * 60 + 30), NotificationStatus::Scheduled),
        (at(5 * 60 + 31), NotificationStatus::Queued),
        (at(59 * 60 + 59), NotificationStatus::Queued),
        (at(60 * 60), NotificationStatus::Queued),
    ];
    for (created_at, status) in stored {
        let row = notifications::NewNotification {
            id: uuid::Uuid::now_v7(),
            request_id: None,
            request_fingerprint: None,
            customer_id: None,
            recipient_key: "ada@example.com".into(),
            contacts: json!({}),
            category: "transactional".into(),
            channels: json!(["email"]),
            content: json!({"text": "hi"}),
            status,
            scheduled_at: None,
            status_reason: None,
            created_at,
        };
        notifications::insert(w.herald.db(), row)
            .await
            .expect("stored");
    }
    let mut counts: Vec<_> = activity::per_minute(w.herald.db(), start, 60)
        .await
        .expect("counts")
        .into_iter()
        .map(|c| (c.minute, c.status, c.count))
        .collect();
    counts.sort_by_key(|(minute, status, _)| (*minute, status.as_str()));
    assert_eq!(
        counts,
        vec![
            (0, NotificationStatus::Queued, 2),
            (5, NotificationStatus::Queued, 1),
            (5, NotificationStatus::Scheduled, 1),
            (59, NotificationStatus::Queued, 1),
        ],
        "the window is [start, start + 60 min), one bucket per minute"
    );
    w.herald.shutdown().await.expect("shutdown");
}

/// Stores `content` and `contacts` (JSON texts) into notification `id` as they are, past the
/// application's encoder.
async fn store_raw_json(
    db: &TestDatabase,
    herald: &TestHerald,
    id: &str,
    content: &str,
    contacts: &str,
) {
    use sea_orm::{ConnectionTrait, Statement};
    let id = uuid::Uuid::parse_str(id).expect("notification id");
    let sql = match db.kind() {
        DatabaseKind::Sqlite => "UPDATE notifications SET content = ?, contacts = ? WHERE id = ?",
        DatabaseKind::Postgres => {
            "UPDATE notifications SET content = CAST($1 AS json), contacts = CAST($2 AS json) \
             WHERE id = $3"
        }
    };
    let db = herald.db();
    let done = db
        .execute_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            sql,
            [content.into(), contacts.into(), id.into()],
        ))
        .await
        .expect("row updated");
    assert_eq!(done.rows_affected(), 1, "notification {id} updated");
}

/// The feed and the scheduled list read only the columns they show: `content` (text and HTML,
/// up to 256 KiB each) and `contacts` stay in the database, the subject read out of `content`
/// there. Structurally: rows whose `content` and `contacts` the application cannot decode
/// (a number JSON allows but no `f64` holds) are still listed, with their subject; a page
/// loading whole rows answers 500.
#[tokio::test]
async fn the_feed_and_the_scheduled_list_read_only_the_columns_they_show() {
    use herald_entities::notification;
    use sea_orm::EntityTrait;
    let w = world(|_| {}).await;
    let base = w.herald.base().to_string();
    let (_, cookie, _) = login(&base, w.herald.admin_key()).await;
    let cookie = cookie.expect("a session cookie");
    let cookie = cookie.split(';').next().expect("name=value").to_string();

    let sent = w
        .herald
        .send_accepted(&email("probe@example.com", "Probe subject"))
        .await;
    w.herald.wait_status(&sent, "sent").await;
    let mut later = email("later@example.com", "Later subject");
    later["scheduled_at"] = json!((chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339());
    let scheduled = w.herald.send_accepted(&later).await;
    w.herald.wait_status(&scheduled, "scheduled").await;
    for (id, subject, to) in [
        (&sent, "Probe subject", "probe@example.com"),
        (&scheduled, "Later subject", "later@example.com"),
    ] {
        let content = format!(r#"{{"subject":"{subject}","text":"Hello","size":1e999}}"#);
        let contacts = format!(r#"{{"email":"{to}","size":1e999}}"#);
        store_raw_json(&w.db, &w.herald, id, &content, &contacts).await;
        let id = uuid::Uuid::parse_str(id).expect("id");
        let whole = notification::Entity::find_by_id(id)
            .one(w.herald.db())
            .await;
        assert!(
            whole.is_err(),
            "the probe must be a row the application cannot load whole: {whole:?}"
        );
    }

    let feed = get_page(&base, "/?refresh=off", Some(&cookie)).await;
    assert_eq!(feed.status(), StatusCode::OK, "the feed loaded whole rows");
    let feed = feed.text().await.expect("feed");
    assert!(feed.contains(&sent), "the sent one is listed: {feed}");
    assert!(feed.contains("Probe subject"), "with its subject: {feed}");
    let list = get_page(&base, "/scheduled", Some(&cookie)).await;
    assert_eq!(list.status(), StatusCode::OK, "the list loaded whole rows");
    let list = list.text().await.expect("scheduled");
    assert!(
        list.contains(&scheduled),
        "the scheduled one is listed: {list}"
    );
    assert!(
        list.contains("later@example.com"),
        "with its recipient: {list}"
    );
    w.herald.shutdown().await.expect("shutdown");
}

/// The feed's customer filter matches what its customer column shows: the customer id, else
/// the notification's first inline contact.
#[tokio::test]
async fn the_feed_filters_on_the_customer_column_as_shown() {
    let w = world(|_| {}).await;
    let base = w.herald.base().to_string();
    let (_, cookie, _) = login(&base, w.herald.admin_key()).await;
    let cookie = cookie.expect("a session cookie");
    let cookie = cookie.split(';').next().expect("name=value").to_string();
    let (status, created) = w
        .herald
        .post(
            "/api/v1/customers",
            &json!({ "id": "mia", "email": "mia@example.com" }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");

    let inline = w
        .herald
        .send_accepted(&email("inline@example.com", "Inline"))
        .await;
    let other = w
        .herald
        .send_accepted(&email("other@example.com", "Other"))
        .await;
    let mut to_mia = email("ignored@example.com", "To Mia");
    to_mia["recipient"] = json!({ "customer_id": "mia" });
    let customer = w.herald.send_accepted(&to_mia).await;
    for id in [&inline, &other, &customer] {
        w.herald.wait_status(id, "sent").await;
    }

    let page = |filter: &'static str| {
        let (base, cookie) = (base.clone(), cookie.clone());
        async move {
            let path = format!("/?refresh=off&customer={filter}");
            let response = get_page(&base, &path, Some(&cookie)).await;
            assert_eq!(response.status(), StatusCode::OK, "{path}");
            response.text().await.expect("feed")
        }
    };
    let by_contact = page("inline%40example.com").await;
    assert!(
        by_contact.contains(&inline),
        "a notification shown as inline@example.com is found by it: {by_contact}"
    );
    assert!(
        !by_contact.contains(&other) && !by_contact.contains(&customer),
        "only it: {by_contact}"
    );
    let by_customer = page("mia").await;
    assert!(
        by_customer.contains(&customer),
        "a customer's notification is found by the customer id: {by_customer}"
    );
    assert!(
        !by_customer.contains(&inline) && !by_customer.contains(&other),
        "only it: {by_customer}"
    );
    w.herald.shutdown().await.expect("shutdown");
}

/// Every minute of the last hour gets its latency points, however many sends later minutes
/// had: 10,001 sends stored, one 50 minutes ago (7,777 ms from accept to sent) and 10,000 a
/// minute ago; the latency table shows the first one's minute.
#[tokio::test]
async fn every_minute_of_the_hour_gets_its_latency() {
    use herald_entities::{NotificationStatus, notification};
    use sea_orm::{EntityTrait, IntoActiveModel, TransactionTrait};
    let w = world(|_| {}).await;
    let base = w.herald.base().to_string();
    let (_, cookie, _) = login(&base, w.herald.admin_key()).await;
    let cookie = cookie.expect("a session cookie");
    let cookie = cookie.split(';').next().expect("name=value").to_string();

    let now = chrono::Utc::now();
    let row = |created_at: chrono::DateTime<chrono::Utc>, latency_ms: i64| notification::Model {
        // Time-ordered ids, as Herald's: the early one is the smallest.
        id: uuid::Uuid::now_v7(),
        request_id: None,
        request_fingerprint: None,
        customer_id: None,
        recipient_key: "load@example.com".into(),
        contacts: json!({ "email": "load@example.com" }),
        category: "transactional".into(),
        channels: json!(["email"]),
        content: json!({ "subject": "Load", "text": "Hello" }),
        status: NotificationStatus::Sent,
        status_reason: None,
        scheduled_at: None,
        final_channel: Some("email".into()),
        attempts: 1,
        error: None,
        created_at,
        updated_at: created_at,
        sent_at: Some(created_at + chrono::Duration::milliseconds(latency_ms)),
        batch_id: None,
    };
    let early = row(now - chrono::Duration::minutes(50), 7_777);
    let busy = now - chrono::Duration::minutes(1);
    let rows: Vec<_> = std::iter::once(early)
        .chain((0..10_000).map(|_| row(busy, 120)))
        .map(IntoActiveModel::into_active_model)
        .collect();
    let txn = w.herald.db().begin().await.expect("transaction");
    for chunk in rows.chunks(1_000) {
        notification::Entity::insert_many(chunk.to_vec())
            .exec_without_returning(&txn)
            .await
            .expect("rows stored");
    }
    txn.commit().await.expect("stored");

    let feed = get_page(&base, "/?refresh=off", Some(&cookie)).await;
    assert_eq!(feed.status(), StatusCode::OK);
    let feed = feed.text().await.expect("feed");
    assert!(
        feed.contains("<td>7777</td><td>7777</td>"),
        "the minute 50 minutes ago has its p50 and p95: {}",
        &feed[feed.find("The numbers per minute").unwrap_or(0)
            ..feed.find("Latest notifications").unwrap_or(feed.len())]
    );
    assert!(
        feed.contains("<td>120</td><td>120</td>"),
        "and the busy minute its own"
    );
    w.herald.shutdown().await.expect("shutdown");
}
