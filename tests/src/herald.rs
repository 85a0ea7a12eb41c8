//! Herald itself, started in-process on port 0 against the harness's real servers, with a small
//! HTTP client for its API.

use std::time::Duration;

use anyhow::Context;
use herald_engine::{Config, Herald, config::SmtpSecurity};
use herald_entities::NotificationStatus;
use reqwest::StatusCode;
use serde_json::Value;

use crate::{NatsServer, SmtpSink, TestDatabase, eventually_showing};

/// How long end-to-end waits last before failing.
pub const E2E_TIMEOUT: Duration = Duration::from_secs(30);

/// A configuration for a test: HTTP on a free port, the given NATS and database, email to the SMTP
/// sink over plain TCP, fast retries and short circuit cool-downs so failure paths finish quickly.
pub fn test_config(nats: &NatsServer, db: &TestDatabase, smtp: &SmtpSink) -> Config {
    let mut config = Config::default();
    config.http.bind = "127.0.0.1:0".into();
    config.nats.url = nats.url();
    config.database.url = db.url().to_string();
    config.channels.email.smtp_host = Some(smtp.host().to_string());
    config.channels.email.smtp_port = Some(smtp.port());
    config.channels.email.security = SmtpSecurity::None;
    config.channels.email.from = "Shop <shop@example.com>".into();
    config.channels.email.timeout_ms = 5_000;
    config.dispatch.retry.base_delay_ms = 200;
    config.dispatch.retry.max_delay_ms = 1_000;
    config.dispatch.shutdown_grace_secs = 5;
    // A revoked key stops working within a second, so tests need not wait long.
    config.auth.cache_ttl_secs = 1;
    config
}

/// A running Herald and a client for its API.
pub struct TestHerald {
    herald: Option<Herald>,
    base: String,
    /// Sends the admin key on every request.
    http: reqwest::Client,
    /// Sends no key.
    anonymous: reqwest::Client,
    admin_key: String,
    db: sea_orm::DatabaseConnection,
    /// How long [`TestHerald::shutdown`] may take: the grace period and 30 s for the rest.
    shutdown_limit: Duration,
}

impl TestHerald {
    /// Starts Herald with `config`.
    ///
    /// # Panics
    ///
    /// When it has not started within twice [`E2E_TIMEOUT`]: the engine waits for NATS and the
    /// database as long as it takes, so a test would otherwise hang.
    pub async fn start(config: Config) -> anyhow::Result<TestHerald> {
        crate::init_tracing();
        herald_engine::app::process_init();
        let database_url = config.database.url.clone();
        let shutdown_limit =
            Duration::from_secs(config.dispatch.shutdown_grace_secs) + Duration::from_secs(30);
        let limit = 2 * E2E_TIMEOUT;
        let herald = tokio::time::timeout(limit, Herald::start(config))
            .await
            .unwrap_or_else(|_| {
                panic!("herald did not start within {limit:?} (NATS or the database unreachable?)")
            })
            .context("herald did not start")?;
        let base = format!("http://{}", herald.http_addr());
        // The database is migrated by now; an admin key goes on every request of `http`.
        let db = herald_entities::connect(&database_url, 2)
            .await
            .context("test database")?;
        let admin_key = herald_engine::apikey::create(&db, "test admin", "admin")
            .await?
            .token;
        let mut headers = reqwest::header::HeaderMap::new();
        let mut bearer = reqwest::header::HeaderValue::from_str(&format!("Bearer {admin_key}"))
            .context("key as header")?;
        bearer.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, bearer);
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .default_headers(headers)
            .build()
            .context("http client")?;
        let anonymous = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .context("http client")?;
        Ok(TestHerald {
            herald: Some(herald),
            base,
            http,
            anonymous,
            admin_key,
            db,
            shutdown_limit,
        })
    }

    /// The admin key `http()` sends.
    pub fn admin_key(&self) -> &str {
        &self.admin_key
    }

    /// A connection to Herald's database.
    pub fn db(&self) -> &sea_orm::DatabaseConnection {
        &self.db
    }

    /// An HTTP client that sends no key.
    pub fn anonymous(&self) -> &reqwest::Client {
        &self.anonymous
    }

    /// Sends `method path` with `key` (none when `None`) and an optional JSON body; returns the
    /// status and the JSON body.
    pub async fn request_with_key(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&str>,
        body: Option<&Value>,
    ) -> (StatusCode, Value) {
        let mut request = self
            .anonymous
            .request(method.clone(), format!("{}{path}", self.base));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path} failed: {e}"));
        let status = response.status();
        let json = response.json().await.unwrap_or(Value::Null);
        (status, json)
    }

    /// The running application.
    pub fn app(&self) -> &Herald {
        self.herald
            .as_ref()
            .expect("herald is running until shutdown")
    }

    /// Base URL, e.g. `http://127.0.0.1:41234`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The HTTP client.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// `POST /api/v1/notifications`; returns the status and the JSON body.
    pub async fn send(&self, body: &Value) -> (StatusCode, Value) {
        self.post("/api/v1/notifications", body).await
    }

    /// POSTs JSON to a path; returns the status and the JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let key = Some(self.admin_key.as_str());
        self.request_with_key(reqwest::Method::POST, path, key, Some(body))
            .await
    }

    /// PUTs a JSON body to a path; returns the status and the JSON body.
    pub async fn put(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let key = Some(self.admin_key.as_str());
        self.request_with_key(reqwest::Method::PUT, path, key, Some(body))
            .await
    }

    /// GETs a path; returns the status and the JSON body.
    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        let key = Some(self.admin_key.as_str());
        self.request_with_key(reqwest::Method::GET, path, key, None)
            .await
    }

    /// The text of `GET /metrics` (Prometheus exposition format).
    pub async fn metrics_text(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .and_then(|response| response.error_for_status())
            .unwrap_or_else(|e| panic!("GET /metrics failed: {e}"))
            .text()
            .await
            .expect("metrics text")
    }

    /// The sum of the samples of metric `name` in `/metrics` that carry every label of `labels`
    /// (0 when there are none).
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let text = self.metrics_text().await;
        let wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        text.lines()
            .filter(|line| line.split([' ', '{']).next() == Some(name))
            .filter(|line| {
                let labels = line
                    .split_once('{')
                    .and_then(|(_, rest)| rest.split_once('}'))
                    .map_or("", |(labels, _)| labels);
                wanted.iter().all(|w| labels.split(',').any(|l| l == w))
            })
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Sends and asserts 202; returns the notification id.
    pub async fn send_accepted(&self, body: &Value) -> String {
        let (status, json) = self.send(body).await;
        assert_eq!(status, StatusCode::ACCEPTED, "send not accepted: {json}");
        json["id"].as_str().expect("id in answer").to_string()
    }

    /// Like [`TestHerald::send_accepted`], owning its body (for `join_all`).
    pub async fn send_accepted_owned(&self, body: Value) -> String {
        self.send_accepted(&body).await
    }

    /// Waits until the notification reaches `status`; returns its JSON.
    ///
    /// # Panics
    ///
    /// At once when it reached another final status from which `status` cannot follow (only a
    /// receipt moves `sent` on, to `delivered` or `failed`), and when [`E2E_TIMEOUT`] elapses;
    /// both with the status, reason, error and attempts last seen.
    pub async fn wait_status(&self, id: &str, status: &str) -> Value {
        let path = format!("/api/v1/notifications/{id}");
        eventually_showing(
            &format!("notification {id} to become {status}"),
            E2E_TIMEOUT,
            || async {
                let (answer, json) = self.get(&path).await;
                if json["status"] == status {
                    return Ok(json);
                }
                let seen = format!("{answer} {}", outcome(&json));
                if settled_elsewhere(&json, status) {
                    panic!("notification {id} became final without becoming {status}: {seen}");
                }
                Err(seen)
            },
        )
        .await
    }

    /// Graceful shutdown.
    ///
    /// # Panics
    ///
    /// When it has not finished within the grace period and 30 s more.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let Some(herald) = self.herald.take() else {
            return Ok(());
        };
        let limit = self.shutdown_limit;
        tokio::time::timeout(limit, herald.shutdown())
            .await
            .unwrap_or_else(|_| panic!("herald did not shut down within {limit:?}"))
    }
}

/// Whether the notification `json` has a final status other than `wanted` that `wanted` cannot
/// follow: only a receipt moves `sent` on, to `delivered` or `failed`. (A DLQ replay moves `dead`
/// back to `queued`, but before it answers: waits start after it.)
fn settled_elsewhere(json: &Value, wanted: &str) -> bool {
    let Ok(now) = serde_json::from_value::<NotificationStatus>(json["status"].clone()) else {
        return false;
    };
    let by_receipt = now == NotificationStatus::Sent && matches!(wanted, "delivered" | "failed");
    now.is_final() && now.as_str() != wanted && !by_receipt
}

/// The parts of a notification's JSON that say how it fared.
fn outcome(json: &Value) -> Value {
    if json.get("status").is_none() {
        return json.clone();
    }
    serde_json::json!({
        "status": json["status"],
        "status_reason": json["status_reason"],
        "error": json["error"],
        "attempts": json["attempts"],
    })
}
