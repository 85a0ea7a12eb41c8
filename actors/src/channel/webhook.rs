//! Signed HTTP webhooks per [Standard Webhooks](https://www.standardwebhooks.com/).
//!
//! Each notification is `POST`ed as JSON to the recipient's `webhook_url` with three headers:
//! `webhook-id` (the notification id: the same on every retry, so receivers can drop repeats),
//! `webhook-timestamp` (unix seconds) and `webhook-signature`
//! (`v1,` + base64 of HMAC-SHA256 over `{id}.{timestamp}.{body}`). Receivers verify with any
//! Standard Webhooks library, or with [`verify`].
//!
//! While a secret is being rotated, the header lists one signature per secret, space-separated,
//! the current secret's first (Standard Webhooks allows several for this): the global
//! `previous_secrets` alongside `secret`, and a customer's replaced `webhook_secret` alongside its
//! new one for `rotation_grace_secs` after the replacement. A receiver holding either secret
//! verifies the webhook, so it can switch secrets without refusing any.
//!
//! A `webhook_url` comes from API callers, so by default Herald refuses to POST to internal
//! addresses (loopback, private, link-local such as cloud metadata endpoints, unique-local): an
//! IP-literal or a host that resolves only to such addresses fails permanently, and the client's
//! resolver drops internal addresses at connect time too, so a name that changes its answer in
//! between (DNS rebinding) cannot reach them. `allow_private_targets` lifts this for deployments
//! (and tests) that deliver inside their own network.
//!
//! Webhooks never go through a proxy: `HTTP_PROXY`, `HTTPS_PROXY` and `ALL_PROXY` in Herald's
//! environment (which reqwest follows by default, and the other providers still do) are ignored
//! here. A proxy resolves the receiver's name itself, past the resolver above, so it would reach
//! internal addresses the check refuses (or, with a proxy of the internal network, every webhook
//! would fail as one to an internal address).

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use chrono::{DateTime, SecondsFormat, Utc};
use futures::future::BoxFuture;
use herald_nats::Channel;
/// Whether an address counts as internal; shared with the API, which refuses such webhook URLs
/// up front.
pub use herald_nats::net::is_internal;
use hmac::{Hmac, Mac};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::time::Instant;

use herald_nats::webhook_secret::{self, SecretError};

use super::http;
use super::provider::time_left;
use super::{OutboundMessage, Provider, ProviderError, Receipt};

type HmacSha256 = Hmac<Sha256>;

/// Webhook provider configuration.
#[derive(Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct WebhookConfig {
    /// Signing secret: `whsec_` followed by the base64 of a key of at least 24 bytes.
    /// Not serialised: `herald config` omits it.
    #[serde(skip_serializing)]
    pub secret: String,
    /// What one send may take, in milliseconds: resolving its URL's host for the internal-address
    /// check, then the request in what is left.
    pub timeout_ms: u64,
    /// Whether webhooks may go to internal addresses (loopback, private, link-local).
    pub allow_private_targets: bool,
    /// Secrets `secret` replaced, each checked as `secret` is, that sign alongside it while
    /// receivers move to the new one. Not serialised either. Read from a list or from one text
    /// holding them separated by commas or whitespace.
    #[serde(skip_serializing, deserialize_with = "one_or_many_secrets")]
    pub previous_secrets: Vec<String>,
    /// How long, in seconds, a customer's replaced `webhook_secret` signs alongside the new one.
    pub rotation_grace_secs: u64,
}

/// Reads `previous_secrets` from a list of texts or from one text, split on commas and
/// whitespace (as `HERALD_CHANNELS__WEBHOOK__PREVIOUS_SECRETS=whsec_…` gives it, without
/// brackets). What it refuses is named by its kind only, never by its value: a secret must not
/// reach an error message, and so the logs.
fn one_or_many_secrets<'de, D>(deserializer: D) -> Result<Vec<String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    deserializer.deserialize_any(SecretsVisitor)
}

/// The [`serde::de::Visitor`] of [`one_or_many_secrets`].
struct SecretsVisitor;

impl<'de> serde::de::Visitor<'de> for SecretsVisitor {
    type Value = Vec<String>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a list of secrets, or one text of secrets separated by commas or spaces")
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
        Ok(text
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|secret| !secret.is_empty())
            .map(str::to_string)
            .collect())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut secrets = Vec::new();
        while let Some(SecretText(secret)) = seq.next_element()? {
            secrets.push(secret);
        }
        Ok(secrets)
    }
}

/// One secret in a `previous_secrets` list: a text, refused without naming what was found.
struct SecretText(String);

impl<'de> Deserialize<'de> for SecretText {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)
            .map(SecretText)
            .map_err(|_| serde::de::Error::custom("each previous secret must be a text"))
    }
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            secret: String::new(),
            timeout_ms: 10_000,
            allow_private_targets: false,
            previous_secrets: Vec::new(),
            rotation_grace_secs: 86_400,
        }
    }
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("secret", &"<redacted>")
            .field("timeout_ms", &self.timeout_ms)
            .field("allow_private_targets", &self.allow_private_targets)
            .field(
                "previous_secrets",
                &format_args!("<{} redacted>", self.previous_secrets.len()),
            )
            .field("rotation_grace_secs", &self.rotation_grace_secs)
            .finish()
    }
}

impl WebhookConfig {
    /// Refuses what [`WebhookProvider::new`] refuses (a bad secret, a client that cannot be
    /// built), by building the provider and dropping it, so that a start refuses them before it
    /// connects to anything. Needs a process-wide rustls crypto provider installed.
    pub fn check(&self) -> Result<(), WebhookConfigError> {
        WebhookProvider::new(String::new(), self.clone()).map(drop)
    }
}

/// Why a webhook provider could not be built from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum WebhookConfigError {
    /// The secret is not a Standard Webhooks signing secret.
    #[error("channels.webhook.secret {0}")]
    Secret(#[from] SecretError),
    /// One of the previous secrets (by its place in the list, from 0) is not one.
    #[error("channels.webhook.previous_secrets[{index}] {error}")]
    PreviousSecret {
        /// Its place in the list.
        index: usize,
        /// What is wrong with it.
        error: SecretError,
    },
    /// The HTTP client could not be built.
    #[error("channels.webhook: cannot build the HTTP client: {0}")]
    Client(String),
}

/// Decodes a `whsec_…` secret into the HMAC key (see [`herald_nats::webhook_secret`]).
pub fn decode_secret(secret: &str) -> Result<Vec<u8>, WebhookConfigError> {
    Ok(webhook_secret::decode(secret)?)
}

fn mac(secret: &[u8], id: &str, timestamp: i64, body: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The `webhook-signature` value for a message: `v1,` + base64(HMAC-SHA256(secret,
/// `{id}.{timestamp}.{body}`)). `secret` is the decoded key (see [`decode_secret`]).
pub fn sign(secret: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let tag = mac(secret, id, timestamp, body).finalize().into_bytes();
    format!("v1,{}", BASE64.encode(tag))
}

/// Whether a `webhook-signature` header holds a valid `v1` signature for the message. The header
/// may list several space-separated signatures (during key rotation); one valid one suffices.
/// Comparison is constant-time.
///
/// This checks the signature only: receivers should also reject a `webhook-timestamp` too far
/// from their clock (Standard Webhooks suggests five minutes) to stop replays.
pub fn verify(secret: &[u8], id: &str, timestamp: i64, body: &[u8], signatures: &str) -> bool {
    signatures.split_whitespace().any(|signature| {
        let Some(encoded) = signature.strip_prefix("v1,") else {
            return false;
        };
        let Ok(tag) = BASE64.decode(encoded) else {
            return false;
        };
        mac(secret, id, timestamp, body).verify_slice(&tag).is_ok()
    })
}

/// Resolves host names to their public addresses only, so a connection never reaches an internal
/// one whatever the name answered earlier.
struct PublicAddresses;

impl reqwest::dns::Resolve for PublicAddresses {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let public: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|addr| !is_internal(addr.ip()))
                .collect();
            if public.is_empty() {
                return Err(format!("{host} resolves only to internal addresses").into());
            }
            Ok(Box::new(public.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Fails permanently when `url`'s host is an internal address or a name that resolves only to
/// internal addresses. A name that cannot be resolved now is left to the request (and its retries);
/// one not resolved by `by` (a DNS server that drops the queries) fails transiently, saying so,
/// rather than holding the send until it is cut off.
async fn refuse_internal(url: &url::Url, by: Instant) -> Result<(), ProviderError> {
    refuse_internal_with(url, by, |host| async move {
        let addrs = tokio::net::lookup_host((host.as_str(), 0)).await?;
        Ok(addrs.map(|addr| addr.ip()).collect())
    })
    .await
}

/// [`refuse_internal`], resolving a host name with `lookup`.
async fn refuse_internal_with<F, Fut>(
    url: &url::Url,
    by: Instant,
    lookup: F,
) -> Result<(), ProviderError>
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = std::io::Result<Vec<IpAddr>>>,
{
    let internal = match url.host() {
        Some(url::Host::Ipv4(ip)) => is_internal(IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => is_internal(IpAddr::V6(ip)),
        Some(url::Host::Domain(host)) => {
            let asked = Instant::now();
            match tokio::time::timeout_at(by, lookup(host.to_string())).await {
                Err(_) => {
                    return Err(ProviderError::transient(format!(
                        "resolving the webhook URL host {host} timed out after {} ms",
                        asked.elapsed().as_millis()
                    )));
                }
                Ok(Ok(ips)) => !ips.is_empty() && ips.into_iter().all(is_internal),
                Ok(Err(_)) => false,
            }
        }
        None => false,
    };
    if internal {
        return Err(ProviderError::unsendable(format!(
            "webhook URL host {} is an internal address; set channels.webhook.allow_private_targets to allow it",
            url.host_str().unwrap_or_default()
        )));
    }
    Ok(())
}

/// Delivers notifications as signed webhooks.
pub struct WebhookProvider {
    name: String,
    client: reqwest::Client,
    /// `secret`'s key, then those of `previous_secrets`: what signs a webhook without a
    /// customer's own secret.
    keys: Vec<Vec<u8>>,
    /// `rotation_grace_secs`.
    rotation_grace: chrono::TimeDelta,
    allow_private_targets: bool,
    /// `timeout_ms`: what one send may take, the check of its URL's host included.
    timeout: Duration,
}

impl std::fmt::Debug for WebhookProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookProvider")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl WebhookProvider {
    /// Builds the provider; fails on a missing or malformed secret. Needs a process-wide rustls
    /// crypto provider installed.
    pub fn new(name: String, config: WebhookConfig) -> Result<Self, WebhookConfigError> {
        let mut keys = vec![decode_secret(&config.secret)?];
        for (index, secret) in config.previous_secrets.iter().enumerate() {
            let key = webhook_secret::decode(secret)
                .map_err(|error| WebhookConfigError::PreviousSecret { index, error })?;
            keys.push(key);
        }
        // A redirected POST turns into a GET on most redirects and would reach a URL the customer
        // did not register: redirects are failures, as in other webhook senders. No proxy from
        // the environment: it would resolve the receiver's name past `PublicAddresses`.
        let mut builder = http::client_builder(config.timeout_ms)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy();
        if !config.allow_private_targets {
            builder = builder.dns_resolver(PublicAddresses);
        }
        let client = http::build_client(builder).map_err(WebhookConfigError::Client)?;
        Ok(Self {
            name,
            client,
            keys,
            rotation_grace: rotation_grace(config.rotation_grace_secs),
            allow_private_targets: config.allow_private_targets,
            timeout: Duration::from_millis(config.timeout_ms),
        })
    }

    /// Sends `message` by `deadline`, and within `timeout_ms`, the check of its URL's host
    /// included.
    async fn deliver(
        &self,
        message: &OutboundMessage,
        deadline: Instant,
    ) -> Result<Receipt, ProviderError> {
        let url = message
            .contacts
            .webhook_url
            .as_deref()
            .ok_or(ProviderError::MissingContact(Channel::Webhook))?;
        let parsed = url::Url::parse(url)
            .map_err(|e| ProviderError::unsendable(format!("invalid webhook URL: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(ProviderError::unsendable(format!(
                "webhook URL scheme {:?} is not http or https",
                parsed.scheme()
            )));
        }
        // The whole send stays within `timeout_ms` and the send's deadline: the request has what
        // the check left.
        let by = deadline.min(Instant::now() + self.timeout);
        if !self.allow_private_targets {
            refuse_internal(&parsed, by).await?;
        }
        let left = time_left(by);
        let now = Utc::now();
        let id = message.notification_id.to_string();
        let body = payload(message, now);
        let timestamp = now.timestamp();
        let mut signature = String::new();
        for key in self.keys_for(message, now)?.iter() {
            if !signature.is_empty() {
                signature.push(' ');
            }
            signature.push_str(&sign(key, &id, timestamp, &body));
        }
        let response = self
            .client
            .post(parsed)
            .timeout(left)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await
            .map_err(http::request_error)?;
        let status = response.status();
        if status.is_success() {
            return Ok(Receipt::new(None));
        }
        // The receiver's body is not read: it is not ours to store, and could be anything.
        Err(classify(status, http::retry_after(response.headers()), url))
    }
}

impl WebhookProvider {
    /// The keys that sign `message` at `now`, the current one first: its customer's own secret
    /// and the one that secret replaced while in its grace, else the provider's. A stored secret
    /// that does not decode (the API checks it as `channels.webhook.secret` is checked) is
    /// refused for good rather than replaced by the global key the receiver does not expect.
    fn keys_for<'a>(
        &'a self,
        message: &OutboundMessage,
        now: DateTime<Utc>,
    ) -> Result<Cow<'a, [Vec<u8>]>, ProviderError> {
        let Some(secret) = &message.webhook_secret else {
            return Ok(Cow::Borrowed(&self.keys));
        };
        let malformed = |_| ProviderError::unsendable("the customer's webhook_secret is malformed");
        let mut keys = vec![decode_secret(secret.expose()).map_err(malformed)?];
        if let Some((previous, replaced_at)) = secret.expose_previous()
            && now - replaced_at < self.rotation_grace
        {
            keys.push(decode_secret(previous).map_err(malformed)?);
        }
        Ok(Cow::Owned(keys))
    }
}

/// `rotation_grace_secs` as a [`chrono::TimeDelta`]; one beyond its range (some 292 million
/// years) is its largest. The webhook provider and the clean-up that forgets replaced secrets
/// (see [`crate::scheduler`]) both read the grace so.
pub fn rotation_grace(secs: u64) -> chrono::TimeDelta {
    i64::try_from(secs)
        .ok()
        .and_then(chrono::TimeDelta::try_seconds)
        .unwrap_or(chrono::TimeDelta::MAX)
}

/// The JSON body: `{"type": "notification.<category>", "timestamp", "data": {...}}`.
fn payload(message: &OutboundMessage, now: DateTime<Utc>) -> Vec<u8> {
    let body = serde_json::json!({
        "type": format!("notification.{}", message.category),
        "timestamp": now.to_rfc3339_opts(SecondsFormat::Millis, true),
        "data": {
            "notification_id": message.notification_id,
            "subject": message.content.subject,
            "text": message.content.text,
        },
    });
    body.to_string().into_bytes()
}

fn classify(status: StatusCode, retry_after: Option<Duration>, url: &str) -> ProviderError {
    let reason = format!("webhook receiver answered HTTP {status}");
    if status == StatusCode::GONE {
        ProviderError::Permanent {
            reason,
            dead_contacts: vec![url.to_string()],
        }
    } else if status.is_redirection() {
        ProviderError::permanent(format!("{reason}; redirects are not followed"))
    } else {
        http::status_error(status, reason, retry_after)
    }
}

impl Provider for WebhookProvider {
    fn channel(&self) -> Channel {
        Channel::Webhook
    }

    fn name(&self) -> &str {
        &self.name
    }

    /// Every recipient names an endpoint of their own.
    fn one_endpoint(&self) -> bool {
        false
    }

    fn send<'a>(
        &'a self,
        message: &'a OutboundMessage,
        deadline: Instant,
    ) -> BoxFuture<'a, Result<Receipt, ProviderError>> {
        Box::pin(self.deliver(message, deadline))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::WebhookSecret;
    use crate::channel::provider::tests::SendNow;
    use crate::channel::provider::tests::outbound;
    use wiremock::matchers::{header, header_exists, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    /// The Standard Webhooks example secret (a 24-byte key).
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    /// Two more, to rotate between.
    const OTHER_SECRET: &str = "whsec_c2hvcC1hIHJvdGF0ZXMgdG8gdGhpcyBuZXcga2V5";
    const THIRD_SECRET: &str = "whsec_YSBnbG9iYWwgc2VjcmV0IHNpbmNlIHJlcGxhY2Vk";

    fn provider(timeout_ms: u64) -> WebhookProvider {
        let _ = rustls::crypto::ring::default_provider().install_default();
        WebhookProvider::new(
            "webhook".into(),
            WebhookConfig {
                secret: SECRET.into(),
                timeout_ms,
                // The receivers here are local mock servers.
                allow_private_targets: true,
                ..WebhookConfig::default()
            },
        )
        .unwrap()
    }

    fn message(url: Option<String>) -> OutboundMessage {
        let mut message = outbound();
        message.contacts.webhook_url = url;
        message
    }

    async fn reply_with(template: ResponseTemplate) -> (MockServer, OutboundMessage) {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/hooks/herald"))
            .respond_with(template)
            .expect(1)
            .mount(&server)
            .await;
        let msg = message(Some(format!("{}/hooks/herald", server.uri())));
        (server, msg)
    }

    #[test]
    fn signatures_match_the_standard_webhooks_test_vector() {
        // The vector published with the Standard Webhooks reference libraries; also checked with
        // python3's hmac module.
        let key = decode_secret(SECRET).unwrap();
        let id = "msg_p5jXN8AQM9LWM0D4loKWxJek";
        let body = br#"{"test": 2432232314}"#;
        let expected = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
        assert_eq!(sign(&key, id, 1_614_265_330, body), expected);
        assert!(verify(&key, id, 1_614_265_330, body, expected));
        assert!(verify(
            &key,
            id,
            1_614_265_330,
            body,
            &format!("v1,bm9wZQ== v2,xyz {expected}")
        ));
        assert!(!verify(&key, id, 1_614_265_331, body, expected));
        assert!(!verify(&key, id, 1_614_265_330, b"{\"test\": 1}", expected));
        assert!(!verify(&key, id, 1_614_265_330, body, "v1,not base64!"));
        assert!(!verify(&key, id, 1_614_265_330, body, ""));
    }

    #[test]
    fn invalid_secrets_are_rejected_at_construction() {
        let build = |secret: &str| {
            WebhookProvider::new(
                "webhook".into(),
                WebhookConfig {
                    secret: secret.into(),
                    timeout_ms: 1_000,
                    ..WebhookConfig::default()
                },
            )
        };
        assert!(matches!(
            build(""),
            Err(WebhookConfigError::Secret(SecretError::Prefix))
        ));
        assert!(matches!(
            build("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            Err(WebhookConfigError::Secret(SecretError::Prefix))
        ));
        assert!(matches!(
            build("whsec_not*base64"),
            Err(WebhookConfigError::Secret(SecretError::Encoding(_)))
        ));
        assert!(matches!(
            build("whsec_c2hvcnQ="),
            Err(WebhookConfigError::Secret(SecretError::TooShort(5)))
        ));
        let previous = |previous: &[&str]| {
            WebhookProvider::new(
                "webhook".into(),
                WebhookConfig {
                    secret: SECRET.into(),
                    previous_secrets: previous.iter().map(|s| s.to_string()).collect(),
                    ..WebhookConfig::default()
                },
            )
        };
        let error = previous(&[OTHER_SECRET, "whsec_c2hvcnQ="]).unwrap_err();
        assert!(
            matches!(
                error,
                WebhookConfigError::PreviousSecret {
                    index: 1,
                    error: SecretError::TooShort(5)
                }
            ),
            "{error:?}"
        );
        assert_eq!(
            error.to_string(),
            "channels.webhook.previous_secrets[1] key is 5 bytes; at least 24 are required"
        );
        assert!(matches!(
            previous(&[""]),
            Err(WebhookConfigError::PreviousSecret {
                index: 0,
                error: SecretError::Prefix
            })
        ));
        assert!(previous(&[OTHER_SECRET]).is_ok());
        let config = WebhookConfig {
            secret: SECRET.into(),
            previous_secrets: vec![OTHER_SECRET.into()],
            ..WebhookConfig::default()
        };
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("MfKQ") && !shown.contains("c2hvcC1h"),
            "{shown}"
        );
    }

    /// The signatures in a `webhook-signature` header, and for each the secrets among `secrets`
    /// that verify it alone.
    fn signed_by<'a>(
        signatures: &str,
        id: &str,
        timestamp: i64,
        body: &[u8],
        secrets: &[&'a str],
    ) -> Vec<Vec<&'a str>> {
        signatures
            .split(' ')
            .map(|signature| {
                secrets
                    .iter()
                    .copied()
                    .filter(|secret| {
                        let key = decode_secret(secret).unwrap();
                        verify(&key, id, timestamp, body, signature)
                    })
                    .collect()
            })
            .collect()
    }

    #[tokio::test]
    async fn previous_secrets_sign_after_the_current_one() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let provider = WebhookProvider::new(
            "webhook".into(),
            WebhookConfig {
                secret: SECRET.into(),
                previous_secrets: vec![OTHER_SECRET.into()],
                allow_private_targets: true,
                ..WebhookConfig::default()
            },
        )
        .unwrap();
        let (server, msg) = reply_with(ResponseTemplate::new(204)).await;
        provider.send_now(&msg).await.unwrap();
        let requests = server.received_requests().await.unwrap();
        let get = |name: &str| requests[0].headers.get(name).unwrap().to_str().unwrap();
        let signed = signed_by(
            get("webhook-signature"),
            get("webhook-id"),
            get("webhook-timestamp").parse().unwrap(),
            &requests[0].body,
            &[SECRET, OTHER_SECRET],
        );
        assert_eq!(signed, [vec![SECRET], vec![OTHER_SECRET]]);
    }

    /// A customer's replaced secret signs after its new one until `rotation_grace_secs` have
    /// passed since the replacement (a replacement dated ahead of the clock, by another
    /// replica's, is within it); then the new one signs alone.
    #[test]
    fn a_customers_replaced_secret_signs_during_the_grace_only() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let provider = WebhookProvider::new(
            "webhook".into(),
            WebhookConfig {
                secret: SECRET.into(),
                previous_secrets: vec![SECRET.into()],
                rotation_grace_secs: 60,
                ..WebhookConfig::default()
            },
        )
        .unwrap();
        let replaced_at = Utc::now();
        let mut msg = message(None);
        msg.webhook_secret = Some(
            WebhookSecret::new(OTHER_SECRET.into()).replacing(THIRD_SECRET.into(), replaced_at),
        );
        let keys = |seconds_later: i64| {
            let now = replaced_at + chrono::TimeDelta::seconds(seconds_later);
            provider.keys_for(&msg, now).unwrap().into_owned()
        };
        let (other, third) = (
            decode_secret(OTHER_SECRET).unwrap(),
            decode_secret(THIRD_SECRET).unwrap(),
        );
        assert_eq!(keys(-5), [other.clone(), third.clone()]);
        assert_eq!(keys(59), [other.clone(), third]);
        assert_eq!(keys(60), std::slice::from_ref(&other));
        assert_eq!(keys(86_400), [other]);
        assert_eq!(rotation_grace(u64::MAX), chrono::TimeDelta::MAX);
    }

    #[tokio::test]
    async fn posts_a_signed_standard_webhook() {
        let server = MockServer::start().await;
        let msg = message(Some(format!("{}/hooks/herald", server.uri())));
        let id = msg.notification_id.to_string();
        Mock::given(method("POST"))
            .and(path("/hooks/herald"))
            .and(header("content-type", "application/json"))
            .and(header("webhook-id", id.as_str()))
            .and(header_exists("webhook-timestamp"))
            .and(header_exists("webhook-signature"))
            .respond_with(ResponseTemplate::new(204))
            .expect(1)
            .mount(&server)
            .await;
        let before = Utc::now().timestamp();
        let receipt = provider(2_000).send_now(&msg).await.unwrap();
        let after = Utc::now().timestamp();
        assert_eq!(receipt.provider_message_id, None);

        let requests = server.received_requests().await.unwrap();
        let request = &requests[0];
        let get = |name: &str| request.headers.get(name).unwrap().to_str().unwrap();
        let timestamp: i64 = get("webhook-timestamp").parse().unwrap();
        assert!((before..=after).contains(&timestamp));
        let key = decode_secret(SECRET).unwrap();
        assert!(verify(
            &key,
            &id,
            timestamp,
            &request.body,
            get("webhook-signature")
        ));
        assert!(!verify(
            &key,
            &id,
            timestamp + 1,
            &request.body,
            get("webhook-signature")
        ));

        let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
        assert_eq!(body["type"], "notification.transactional");
        assert_eq!(body["data"]["notification_id"], id);
        assert_eq!(body["data"]["subject"], "Order shipped");
        assert_eq!(body["data"]["text"], "Your order #1001 is on its way.");
        let sent_at = DateTime::parse_from_rfc3339(body["timestamp"].as_str().unwrap()).unwrap();
        assert_eq!(sent_at.timestamp(), timestamp);
    }

    #[tokio::test]
    async fn gone_is_permanent_and_declares_the_url_dead() {
        let (_server, msg) = reply_with(ResponseTemplate::new(410)).await;
        let error = provider(2_000).send_now(&msg).await.unwrap_err();
        assert_eq!(
            error,
            ProviderError::Permanent {
                reason: "webhook receiver answered HTTP 410 Gone".into(),
                dead_contacts: msg.contacts.webhook_url.clone().into_iter().collect(),
            }
        );
    }

    #[tokio::test]
    async fn other_client_errors_and_redirects_are_permanent_without_dead_contact() {
        for template in [
            ResponseTemplate::new(400),
            ResponseTemplate::new(401),
            ResponseTemplate::new(302).insert_header("location", "http://127.0.0.1:9/elsewhere"),
        ] {
            let (_server, msg) = reply_with(template).await;
            let error = provider(2_000).send_now(&msg).await.unwrap_err();
            assert!(
                matches!(
                    &error,
                    ProviderError::Permanent { dead_contacts, .. } if dead_contacts.is_empty()
                ),
                "{error:?}"
            );
        }
    }

    #[tokio::test]
    async fn throttling_is_transient_and_honours_retry_after() {
        let (_server, msg) =
            reply_with(ResponseTemplate::new(429).insert_header("retry-after", "90")).await;
        let error = provider(2_000).send_now(&msg).await.unwrap_err();
        assert!(
            matches!(error, ProviderError::Transient { retry_after: Some(d), .. } if d == Duration::from_secs(90)),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn server_errors_are_transient() {
        let (_server, msg) = reply_with(ResponseTemplate::new(500)).await;
        let error = provider(2_000).send_now(&msg).await.unwrap_err();
        assert!(
            matches!(&error, ProviderError::Transient { reason, retry_after: None, .. } if reason.contains("500")),
            "{error:?}"
        );
    }

    /// The receiver's body is never read, so one cut off midway changes nothing: a 2xx is
    /// delivered (a failure would fail over and send it twice), an error is judged by its status.
    #[tokio::test]
    async fn a_reply_whose_body_is_cut_off_is_judged_by_its_status() {
        let provider = provider(2_000);
        let delivered = http::tests::cut_off_reply("HTTP/1.1 200 OK").await;
        let receipt = provider
            .send_now(&message(Some(format!("{delivered}/hooks/herald"))))
            .await;
        assert_eq!(receipt.map(|r| r.provider_message_id), Ok(None));
        let refused = http::tests::cut_off_reply("HTTP/1.1 400 Bad Request").await;
        let error = provider
            .send_now(&message(Some(format!("{refused}/hooks/herald"))))
            .await
            .unwrap_err();
        assert!(
            matches!(&error, ProviderError::Permanent { reason, .. } if reason.contains("400")),
            "{error:?}"
        );
        let busy =
            http::tests::cut_off_reply("HTTP/1.1 503 Service Unavailable\r\nRetry-After: 30").await;
        let error = provider
            .send_now(&message(Some(format!("{busy}/hooks/herald"))))
            .await
            .unwrap_err();
        assert!(
            matches!(error, ProviderError::Transient { retry_after: Some(d), .. } if d == Duration::from_secs(30)),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn timeouts_are_transient() {
        let (_server, msg) =
            reply_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(5))).await;
        let error = provider(100).send_now(&msg).await.unwrap_err();
        assert!(
            matches!(&error, ProviderError::Transient { reason, .. } if reason.contains("timed out")),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn missing_and_malformed_urls_are_classified() {
        let provider = provider(2_000);
        assert_eq!(
            provider.send_now(&message(None)).await,
            Err(ProviderError::MissingContact(Channel::Webhook))
        );
        for url in ["not a url", "ftp://example.com/hook"] {
            assert!(matches!(
                provider.send_now(&message(Some(url.into()))).await,
                Err(ProviderError::Unsendable { .. })
            ));
        }
    }

    #[test]
    fn internal_addresses_are_recognised() {
        for internal in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b::a00:5",
            "64:ff9b:1::a00:5",
            "198.18.0.1",
            "240.0.0.1",
        ] {
            assert!(is_internal(internal.parse().unwrap()), "{internal}");
        }
        for public in [
            "93.184.216.34",
            "8.8.8.8",
            "172.32.0.1",
            "2606:4700::1111",
            "64:ff9b::5db8:d822",
        ] {
            assert!(!is_internal(public.parse().unwrap()), "{public}");
        }
    }

    #[tokio::test]
    async fn internal_targets_are_refused_for_good_without_a_request() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let guarded = WebhookProvider::new(
            "webhook".into(),
            WebhookConfig {
                secret: SECRET.into(),
                ..WebhookConfig::default()
            },
        )
        .unwrap();
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(204))
            .expect(0)
            .mount(&server)
            .await;
        let port = server.address().port();
        for url in [
            format!("{}/hooks/herald", server.uri()),
            format!("http://localhost:{port}/hooks/herald"),
            "http://169.254.169.254/latest/meta-data/".to_string(),
            "http://[::1]/hooks".to_string(),
        ] {
            match guarded.send_now(&message(Some(url.clone()))).await {
                Err(ProviderError::Unsendable { reason }) => {
                    assert!(reason.contains("internal address"), "{url}: {reason}")
                }
                other => panic!("{url}: expected a permanent refusal, got {other:?}"),
            }
        }
    }

    /// A resolver that does not answer (a DNS server that drops the queries) cuts the check of
    /// the URL's host off at the send's timeout, with an error saying so, instead of holding the
    /// send until the channel gives up on it. Transient: the name may resolve on a retry.
    #[tokio::test]
    async fn a_host_lookup_that_does_not_answer_fails_at_the_timeout() {
        let url = url::Url::parse("https://hooks.example.com/herald").expect("URL");
        let by = Instant::now() + Duration::from_millis(200);
        let silent = |_host: String| std::future::pending::<std::io::Result<Vec<IpAddr>>>();
        let checked = tokio::time::timeout(
            Duration::from_secs(10),
            refuse_internal_with(&url, by, silent),
        )
        .await
        .expect("the check of the host returns within its timeout; it waited 10 s");
        match checked {
            Err(ProviderError::Transient { reason, .. }) => {
                assert!(reason.contains("hooks.example.com"), "{reason}");
                assert!(reason.contains("timed out after 2"), "{reason}");
            }
            other => panic!("a lookup that does not answer is transient, got {other:?}"),
        }
        // A lookup that answers within the timeout decides as before.
        let internal = |_host: String| async { Ok(vec![IpAddr::from([10, 0, 0, 7])]) };
        assert!(matches!(
            refuse_internal_with(&url, Instant::now() + Duration::from_secs(1), internal).await,
            Err(ProviderError::Unsendable { .. })
        ));
        let public = |_host: String| async { Ok(vec![IpAddr::from([93, 184, 216, 34])]) };
        assert_eq!(
            refuse_internal_with(&url, Instant::now() + Duration::from_secs(1), public).await,
            Ok(())
        );
    }

    #[tokio::test]
    async fn allowed_private_targets_are_delivered() {
        let (_server, msg) = reply_with(ResponseTemplate::new(204)).await;
        assert!(provider(1_000).send_now(&msg).await.is_ok());
    }
}
