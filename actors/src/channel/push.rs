//! Mobile push through the FCM HTTP v1 API: `POST {base}/v1/projects/{project}/messages:send`,
//! one request per device token.
//!
//! A recipient may have several devices. The send succeeds when at least one token is accepted
//! (the receipt carries the first accepted message name). When every token fails, the "worst"
//! outcome wins: a transient failure on any token makes the whole send transient so it is
//! retried; otherwise the send is permanent. Every outcome names every token FCM declared dead,
//! to be removed from the customer.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;

use futures::future::BoxFuture;
use herald_nats::Channel;
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::google_auth::{self, ServiceAccountError, TokenSource};
use super::{OutboundMessage, Provider, ProviderError, Receipt};
use super::{http, text};

/// The OAuth scope FCM's send API needs.
const FCM_SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";

/// FCM's error code for an APNs certificate or key, or a web push key, stored in Firebase that
/// is invalid or missing: answered with 401 like a refused OAuth token, but it is about one
/// platform's configuration, not Herald's token nor the device.
const THIRD_PARTY_AUTH_ERROR: &str = "THIRD_PARTY_AUTH_ERROR";

/// FCM's error code for a token registered with another sender (another Firebase project), with
/// HTTP 403: the one 403 that speaks of the token rather than of Herald's project (see
/// [`is_transient_for_fcm`]).
const SENDER_ID_MISMATCH: &str = "SENDER_ID_MISMATCH";

/// How long the whole project's sends are held after FCM refuses one for the project's quota
/// without a `Retry-After` or a `google.rpc.RetryInfo`: FCM refills its per-project quota "in the
/// following minute", and its error code reference asks for a first retry no sooner than a minute
/// after a `QUOTA_EXCEEDED`.
const PROJECT_QUOTA_WAIT: Duration = Duration::from_secs(60);

/// What Herald lets a message's `notification` and `data` take, serialised (keys and values):
/// FCM refuses a message over 4,096 bytes for good, and counts some of it in its own way (its
/// wrapping of the notification per platform), so 512 bytes are left to spare.
const PAYLOAD_BUDGET: usize = 4_096 - 512;

/// The most a title takes of [`PAYLOAD_BUDGET`] (a phone shows a line of it), so that a long
/// subject leaves the body its room.
const TITLE_BUDGET: usize = 512;

/// Push provider configuration.
#[derive(Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct PushConfig {
    /// API root; an FCM-compatible service or a test fake can stand in.
    pub base_url: String,
    /// Firebase project id.
    pub project_id: String,
    /// A service account key file (JSON, from Google Cloud): access tokens are fetched with it
    /// and renewed before they expire. The way to run in production. When none of this,
    /// `metadata_server` and `access_token` is set, the file `GOOGLE_APPLICATION_CREDENTIALS`
    /// names is used, as Google's client libraries do.
    pub service_account_file: Option<PathBuf>,
    /// The metadata server of the machine Herald runs on (`http://metadata.google.internal` on
    /// Compute Engine, GKE with Workload Identity and Cloud Run): access tokens of the service
    /// account attached to it, renewed before they expire, with no key file.
    pub metadata_server: Option<String>,
    /// A fixed OAuth 2.0 access token instead (Google's expire within an hour: for tests and
    /// FCM-compatible services with long-lived tokens).
    /// Not serialised: `herald config` omits it.
    #[serde(skip_serializing)]
    pub access_token: String,
    /// Per-request timeout in milliseconds (the token endpoint's and each device's request to
    /// FCM); a send's token fetch and requests together keep to the send's deadline.
    pub timeout_ms: u64,
}

impl Default for PushConfig {
    fn default() -> Self {
        Self {
            base_url: "https://fcm.googleapis.com".into(),
            project_id: String::new(),
            service_account_file: None,
            metadata_server: None,
            access_token: String::new(),
            timeout_ms: 10_000,
        }
    }
}

impl std::fmt::Debug for PushConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushConfig")
            .field("base_url", &self.base_url)
            .field("project_id", &self.project_id)
            .field("service_account_file", &self.service_account_file)
            .field("metadata_server", &self.metadata_server)
            .field("access_token", &"<redacted>")
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

/// Why a push provider could not be built from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum PushConfigError {
    /// A required setting is empty.
    #[error("channels.push.{0} is required")]
    Missing(&'static str),
    /// `base_url` is not an `http(s)` URL with a host.
    #[error("channels.push.base_url {url:?} is not an http(s) URL: {reason}")]
    BaseUrl {
        /// The configured value.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No way of authenticating is configured, and the environment names no key file.
    #[error(
        "channels.push.service_account_file (or channels.push.metadata_server, or \
         channels.push.access_token, or a key file named by {ADC_VARIABLE}) is required"
    )]
    NoCredentials,
    /// More than one way of authenticating is configured.
    #[error("{0} are set; set one of them")]
    ConflictingCredentials(String),
    /// The metadata server's address is not a URL.
    #[error("channels.push.metadata_server {url:?} is not a URL: {reason}")]
    MetadataServer {
        /// The configured address.
        url: String,
        /// Why it is not one.
        reason: url::ParseError,
    },
    /// The service account key cannot be used.
    #[error("channels.push.service_account_file: {0}")]
    ServiceAccount(#[from] ServiceAccountError),
    /// The key file `GOOGLE_APPLICATION_CREDENTIALS` names cannot be used.
    #[error("{ADC_VARIABLE}: {0}")]
    FromEnvironment(ServiceAccountError),
    /// The HTTP client could not be built.
    #[error("channels.push: cannot build the HTTP client: {0}")]
    Client(String),
}

/// Sends push notifications through FCM.
pub struct PushProvider {
    name: String,
    client: reqwest::Client,
    send_url: String,
    credentials: Credentials,
}

/// Where the bearer token of a send comes from.
enum Credentials {
    /// Configured as it is.
    Fixed(String),
    /// Fetched with a service account key or from the metadata server.
    Fetched(TokenSource),
}

impl Credentials {
    async fn bearer(&self) -> Result<String, ProviderError> {
        match self {
            Credentials::Fixed(token) => Ok(token.clone()),
            Credentials::Fetched(source) => source.token().await,
        }
    }

    /// FCM refused `bearer` (revoked, or expired early): the next send fetches another.
    async fn refused(&self, bearer: &str) {
        if let Credentials::Fetched(source) = self {
            source.forget(bearer).await;
        }
    }
}

impl std::fmt::Debug for PushProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushProvider")
            .field("name", &self.name)
            .field("send_url", &self.send_url)
            .finish_non_exhaustive()
    }
}

/// A successful send: `{"name": "projects/p/messages/ID"}`.
#[derive(Deserialize)]
struct SentMessage {
    name: String,
}

/// Google's error envelope: `{"error": {"code", "message", "status", "details": [...]}}`.
#[derive(Deserialize)]
struct ErrorReply {
    error: ErrorBody,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    message: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    details: Vec<ErrorDetail>,
}

impl ErrorBody {
    /// FCM's error code (an `FcmError` detail's `errorCode`), else the status.
    fn fcm_code(&self) -> &str {
        self.details
            .iter()
            .find_map(|d| d.error_code.as_deref())
            .unwrap_or(self.status.as_str())
    }

    /// The wait a `google.rpc.RetryInfo` detail asks for (its `retryDelay`), if one does in the
    /// form [`parse_retry_delay`] reads.
    fn retry_delay(&self) -> Option<Duration> {
        self.details
            .iter()
            .find_map(|d| d.retry_delay.as_ref()?.as_str().and_then(parse_retry_delay))
    }
}

/// One entry of `details`: an `FcmError` carries `errorCode`, a `BadRequest` carries
/// `fieldViolations`, a `google.rpc.QuotaFailure` carries `violations`, a `google.rpc.ErrorInfo`
/// carries `reason`, a `google.rpc.RetryInfo` carries `retryDelay`.
#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(rename = "errorCode")]
    error_code: Option<String>,
    #[serde(rename = "fieldViolations", default)]
    field_violations: Vec<FieldViolation>,
    #[serde(default)]
    violations: Vec<QuotaViolation>,
    reason: Option<String>,
    /// Kept as any JSON value: one in another form than the expected string is ignored, rather
    /// than failing the reading of the whole reply (and with it its error code).
    #[serde(rename = "retryDelay")]
    retry_delay: Option<serde_json::Value>,
}

/// Reads a `google.rpc.RetryInfo`'s `retryDelay`, a `google.protobuf.Duration` in protobuf's JSON
/// form: decimal seconds, with at most nine digits after the point, and the suffix `s` (`"30s"`,
/// `"1.5s"`, `"0.000000001s"`). A negative or malformed value, or one past `u64` seconds, is
/// `None`. Read only where no `Retry-After` is given; the wait is then bounded as a
/// `Retry-After` is (the circuit's `max_cool_down_ms`, the retry's `max_delay_ms`).
fn parse_retry_delay(text: &str) -> Option<Duration> {
    let number = text.strip_suffix('s')?;
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && fraction.is_empty())
        || !digits(whole)
        || !digits(fraction)
        || fraction.len() > 9
    {
        return None;
    }
    let seconds = if whole.is_empty() {
        0
    } else {
        whole.parse::<u64>().ok()?
    };
    // Nanoseconds: the fraction's digits padded to nine.
    let nanos = format!("{fraction:0<9}").parse::<u32>().ok()?;
    Some(Duration::new(seconds, nanos))
}

/// One quota a `google.rpc.QuotaFailure` says was exceeded: what it limits (`subject`, such as
/// `project:…`) and which quota (`quotaId` such as `SendsPerMinutePerProject`, `quotaMetric`).
#[derive(Deserialize)]
struct QuotaViolation {
    #[serde(default)]
    subject: String,
    #[serde(rename = "quotaId", default)]
    quota_id: String,
    #[serde(rename = "quotaMetric", default)]
    quota_metric: String,
}

impl QuotaViolation {
    /// Whether the quota is the whole project's, not one device's or topic's.
    fn is_the_projects(&self) -> bool {
        [&self.subject, &self.quota_id, &self.quota_metric]
            .iter()
            .any(|text| text.to_ascii_lowercase().contains("project"))
    }
}

impl ErrorBody {
    /// Whether a 429 refuses the whole project (its sending quota) rather than one device or
    /// topic: a `google.rpc.QuotaFailure` naming the project's quota, or the
    /// `google.rpc.ErrorInfo` reason `RATE_LIMIT_EXCEEDED` Google's API front answers when a
    /// project's request quota is out ("Quota exceeded for quota metric 'Send requests' ... for
    /// consumer 'project_number:…'"), which comes without FCM's own error code.
    fn refuses_the_project(&self) -> bool {
        self.details.iter().any(|detail| {
            detail.reason.as_deref() == Some("RATE_LIMIT_EXCEEDED")
                || detail
                    .violations
                    .iter()
                    .any(QuotaViolation::is_the_projects)
        })
    }
}

#[derive(Deserialize)]
struct FieldViolation {
    #[serde(default)]
    field: String,
}

/// The variable naming a service account key file, as Google's client libraries read it
/// (application default credentials).
const ADC_VARIABLE: &str = "GOOGLE_APPLICATION_CREDENTIALS";

/// The way of authenticating a [`PushConfig`] names.
enum CredentialSetting<'a> {
    /// `service_account_file`.
    KeyFile(&'a Path),
    /// `metadata_server`: the token's address on it.
    MetadataServer(reqwest::Url),
    /// `access_token`.
    Fixed(&'a str),
    /// None: the key file [`ADC_VARIABLE`] names, if it names one.
    Unset,
}

impl PushConfig {
    /// Refuses what [`PushProvider::new`] refuses (a missing project, more than one way of
    /// authenticating or none, a metadata server address that is not a URL, a service account
    /// key file that cannot be read or is not a key, a client that cannot be built), by building
    /// the provider and dropping it, so that a start refuses them before it connects to
    /// anything. Reads the key file, as the provider does; fetches no token. Needs a
    /// process-wide rustls crypto provider installed.
    pub fn check(&self) -> Result<(), PushConfigError> {
        PushProvider::new(String::new(), self.clone()).map(drop)
    }

    /// Checks the settings themselves: the project is set, the base URL is usable, at most one
    /// way of authenticating is set and the metadata server's address is a URL.
    fn check_settings(&self) -> Result<(), PushConfigError> {
        if self.project_id.trim().is_empty() {
            return Err(PushConfigError::Missing("project_id"));
        }
        if let Some(reason) = http::base_url_problem(&self.base_url) {
            return Err(PushConfigError::BaseUrl {
                url: self.base_url.clone(),
                reason,
            });
        }
        self.credential_setting().map(|_| ())
    }

    /// The one way of authenticating this configuration names.
    fn credential_setting(&self) -> Result<CredentialSetting<'_>, PushConfigError> {
        let fixed = Some(self.access_token.trim()).filter(|t| !t.is_empty());
        let metadata = self
            .metadata_server
            .as_deref()
            .map(str::trim)
            .filter(|url| !url.is_empty());
        let set: Vec<&str> = [
            self.service_account_file
                .is_some()
                .then_some("channels.push.service_account_file"),
            metadata
                .is_some()
                .then_some("channels.push.metadata_server"),
            fixed.is_some().then_some("channels.push.access_token"),
        ]
        .into_iter()
        .flatten()
        .collect();
        if set.len() > 1 {
            return Err(PushConfigError::ConflictingCredentials(set.join(" and ")));
        }
        if let Some(file) = &self.service_account_file {
            return Ok(CredentialSetting::KeyFile(file));
        }
        if let Some(url) = metadata {
            let token_url = google_auth::metadata_token_url(url, FCM_SCOPE).map_err(|reason| {
                PushConfigError::MetadataServer {
                    url: url.to_string(),
                    reason,
                }
            })?;
            return Ok(CredentialSetting::MetadataServer(token_url));
        }
        Ok(fixed.map_or(CredentialSetting::Unset, CredentialSetting::Fixed))
    }
}

/// The one way of authenticating `config` names; without any, the key file `from_environment`
/// names (the value of [`ADC_VARIABLE`]).
fn credentials(
    config: &PushConfig,
    client: &reqwest::Client,
    from_environment: Option<PathBuf>,
) -> Result<Credentials, PushConfigError> {
    match config.credential_setting()? {
        CredentialSetting::KeyFile(file) => {
            let source = TokenSource::from_file(file, FCM_SCOPE, client.clone())?;
            Ok(Credentials::Fetched(source))
        }
        CredentialSetting::MetadataServer(token_url) => Ok(Credentials::Fetched(
            TokenSource::from_metadata_server(token_url, FCM_SCOPE, client.clone()),
        )),
        CredentialSetting::Fixed(token) => Ok(Credentials::Fixed(token.to_string())),
        CredentialSetting::Unset => {
            let file = from_environment
                .filter(|file| !file.as_os_str().is_empty())
                .ok_or(PushConfigError::NoCredentials)?;
            tracing::info!(file = %file.display(), "push: service account key from {ADC_VARIABLE}");
            let source = TokenSource::from_file(&file, FCM_SCOPE, client.clone())
                .map_err(PushConfigError::FromEnvironment)?;
            Ok(Credentials::Fetched(source))
        }
    }
}

impl PushProvider {
    /// Builds the provider. Needs a process-wide rustls crypto provider installed.
    pub fn new(name: String, config: PushConfig) -> Result<Self, PushConfigError> {
        config.check_settings()?;
        let client = http::build_client(http::client_builder(config.timeout_ms))
            .map_err(PushConfigError::Client)?;
        let from_environment = std::env::var_os(ADC_VARIABLE).map(PathBuf::from);
        let credentials = credentials(&config, &client, from_environment)?;
        let send_url = format!(
            "{}/v1/projects/{}/messages:send",
            config.base_url.trim_end_matches('/'),
            config.project_id
        );
        Ok(Self {
            name,
            client,
            send_url,
            credentials,
        })
    }

    /// Sends `message` to every device by `deadline`: the Google OAuth token, when one must be
    /// fetched (or another send's fetch waited for), comes out of the same time as the requests
    /// to FCM.
    async fn deliver(
        &self,
        message: &OutboundMessage,
        deadline: Instant,
    ) -> Result<Receipt, ProviderError> {
        let tokens = &message.contacts.push_tokens;
        if tokens.is_empty() {
            return Err(ProviderError::MissingContact(Channel::Push));
        }
        let asked = Instant::now();
        let bearer = tokio::time::timeout_at(deadline, self.credentials.bearer())
            .await
            .map_err(|_| {
                ProviderError::transient(format!(
                    "no Google OAuth token within the send's timeout (waited {} ms for it); \
                     nothing was sent to FCM",
                    asked.elapsed().as_millis()
                ))
            })??;
        let token_took = asked.elapsed();
        let payload = Payload::of(message);
        let outcomes = futures::future::join_all(tokens.iter().map(|token| {
            let sent = self.send_one(&bearer, token, &payload);
            async move {
                tokio::time::timeout_at(deadline, sent)
                    .await
                    .unwrap_or_else(|_| Err(out_of_time(token_took)))
            }
        }))
        .await;
        combine(outcomes)
    }

    async fn send_one(
        &self,
        bearer: &str,
        token: &str,
        payload: &Payload,
    ) -> Result<Option<String>, ProviderError> {
        let body = json!({
            "message": {
                "token": token,
                "notification": payload.notification,
                "data": payload.data,
            }
        });
        let request = self
            .client
            .post(&self.send_url)
            .bearer_auth(bearer)
            .json(&body);
        let reply = http::exchange(request).await?;
        if refuses_the_bearer(reply.status, &reply.bytes) {
            self.credentials.refused(bearer).await;
        }
        if reply.status.is_success() {
            return Ok(http::accepted_id(
                &self.name,
                reply.status,
                &reply.bytes,
                |sent: SentMessage| sent.name,
            ));
        }
        Err(classify(token, &reply))
    }
}

/// The failure of a device's request to FCM that was not answered by the send's deadline, after
/// `token_took` getting the Google OAuth token. FCM may have taken the message all the same.
fn out_of_time(token_took: Duration) -> ProviderError {
    ProviderError::transient(format!(
        "no FCM reply within the send's timeout (the Google OAuth token took {} ms of it)",
        token_took.as_millis()
    ))
}

/// What every device of a message is sent: the `notification` FCM shows and the `data` handed
/// to the app.
struct Payload {
    notification: serde_json::Map<String, serde_json::Value>,
    data: serde_json::Value,
}

impl Payload {
    /// The subject as title and the short text (`content.short`, else `text`) as body, cut so
    /// that the two with the data fit [`PAYLOAD_BUDGET`]: a message FCM refuses as too big
    /// would never go by push.
    fn of(message: &OutboundMessage) -> Self {
        // FCM data values must be strings.
        let data = json!({
            "notification_id": message.notification_id.to_string(),
            "category": message.category,
        });
        let mut notification = serde_json::Map::new();
        if let Some(subject) = &message.content.subject {
            let title = text::cut(subject, TITLE_BUDGET, json_bytes);
            notification.insert("title".into(), json!(title));
        }
        notification.insert("body".into(), json!(""));
        let used = serialised_len(&notification) + serialised_len(&data);
        let room = PAYLOAD_BUDGET.saturating_sub(used);
        let body = text::cut(message.content.short_text(), room, json_bytes);
        notification.insert("body".into(), json!(body));
        Self { notification, data }
    }
}

/// The bytes `c` takes in a JSON string: escaped (`\"`, `\n`, `\u0001`) or UTF-8.
fn json_bytes(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{08}' | '\u{0c}' => 2,
        '\0'..='\u{1f}' => 6,
        c => c.len_utf8(),
    }
}

/// The length of `value` serialised as JSON.
fn serialised_len(value: &impl Serialize) -> usize {
    serde_json::to_vec(value).map_or(0, |bytes| bytes.len())
}

/// Whether an error reply refuses Herald's own OAuth token, so that the next send fetches
/// another: a 401, unless FCM puts it down to a platform's credentials
/// ([`THIRD_PARTY_AUTH_ERROR`]), which a new token does not mend.
fn refuses_the_bearer(status: StatusCode, body: &[u8]) -> bool {
    status == StatusCode::UNAUTHORIZED
        && serde_json::from_slice::<ErrorReply>(body).map_or(true, |reply| {
            reply.error.fcm_code() != THIRD_PARTY_AUTH_ERROR
        })
}

/// Classifies an FCM error reply for `token`: permanent, naming the token dead, when FCM
/// declared it so (see [`unregistered_without_body`] for a 404 whose body was lost).
fn classify(token: &str, reply: &http::Reply) -> ProviderError {
    let (status, retry_after) = (reply.status, reply.retry_after);
    if let Some(dead) = unregistered_without_body(token, reply) {
        return dead;
    }
    let Ok(ErrorReply { error }) = serde_json::from_slice::<ErrorReply>(&reply.bytes) else {
        let body = http::body_snippet(&reply.bytes, reply.body_lost, 200);
        let reason = format!("FCM HTTP {status}: {body}");
        return http::failure(is_transient_for_fcm(status), reason, retry_after);
    };
    // Google's APIs may give their wait in the body only, as a `google.rpc.RetryInfo`; a
    // `Retry-After` header, read for every provider, comes first.
    let retry_after = retry_after.or_else(|| error.retry_delay());
    let fcm_code = error.fcm_code();
    let reason = format!(
        "FCM {} {fcm_code}: {}",
        status.as_u16(),
        if error.message.is_empty() {
            "no message"
        } else {
            &error.message
        }
    );
    // INVALID_ARGUMENT also covers a malformed payload; only a complaint about the token (a
    // BadRequest on `message.token`, or FCM's "registration token" wording) condemns the token.
    let token_rejected = error
        .details
        .iter()
        .flat_map(|d| &d.field_violations)
        .any(|v| v.field == "message.token")
        || error.message.contains("registration token");
    let dead = match fcm_code {
        "UNREGISTERED" => true,
        "INVALID_ARGUMENT" => token_rejected,
        _ => false,
    };
    if dead {
        return ProviderError::Permanent {
            reason,
            dead_contacts: vec![token.to_string()],
        };
    }
    if fcm_code == THIRD_PARTY_AUTH_ERROR {
        // The APNs or web push credentials stored in Firebase: every device of that platform
        // fails alike until they are fixed there, and no retry mends it. Permanent, without a
        // dead token: the chain goes on at once, the device is kept, and as FCM answered, the
        // circuit (which the other platforms' sends go through) is not counted against.
        return ProviderError::permanent(format!(
            "{reason} (the APNs or web push credentials in the Firebase project are invalid or \
             missing)"
        ));
    }
    if status == StatusCode::TOO_MANY_REQUESTS && error.refuses_the_project() {
        // The project's sending quota: every device is refused alike until it refills, so every
        // push waits (not a sign that FCM is down either).
        return ProviderError::account_throttled(
            format!("{reason} (the project's quota)"),
            Some(retry_after.unwrap_or(PROJECT_QUOTA_WAIT)),
        );
    }
    if fcm_code == "QUOTA_EXCEEDED" {
        // The device's (or the target's) message rate: a limit on this recipient, not a sign
        // that FCM is down, so it must not open the circuit for every other device.
        return ProviderError::throttled(reason, retry_after);
    }
    if fcm_code == SENDER_ID_MISMATCH {
        // The token belongs to another sender: this device, not the project. Permanent, and the
        // token is kept (it is not dead: the app that holds it may be moved to this project).
        return ProviderError::permanent(reason);
    }
    let transient = matches!(fcm_code, "UNAVAILABLE" | "INTERNAL") || is_transient_for_fcm(status);
    http::failure(transient, reason, retry_after)
}

/// Whether a failed status from FCM is worth retrying: as for any request made with the account's
/// credentials ([`http::is_transient_for_account`]: 401, 408, 429, 5xx), and a 403. FCM answers
/// 403 `PERMISSION_DENIED` when it refuses Herald's project rather than the device: the Firebase
/// Cloud Messaging API disabled in the project, a service account without the
/// `cloudmessaging.messages.create` permission, a `project_id` the account has no access to.
/// Every send fails alike until that is fixed, so, as a 401, it counts against the circuit and the
/// message is retried, then dead-lettered (and can be replayed), instead of ending `failed`. FCM's
/// one 403 about a token, [`SENDER_ID_MISMATCH`], is told apart by its error code before this; a
/// 403 whose body was lost midway, which cannot be told apart, is taken for the project's.
fn is_transient_for_fcm(status: StatusCode) -> bool {
    http::is_transient_for_account(status) || status == StatusCode::FORBIDDEN
}

/// A 404 from the send endpoint whose body was lost midway: taken for `UNREGISTERED`, the token
/// dead, as with its body. FCM v1's error code reference
/// (<https://firebase.google.com/docs/reference/fcm/rest/v1/ErrorCode>) gives `UNREGISTERED` as
/// the one error FCM answers with HTTP 404 ("App instance was unregistered from FCM. This usually
/// means that the token used is no longer valid and a new one must be used"), and says to remove
/// such a token. Only a body lost midway: a 404 whose body was read and is not FCM's (a proxy's
/// page, an empty reply, a `NOT_FOUND` without FCM's code) may come of a wrong `base_url` or
/// `project_id`, the same for every token, and keeps them all.
fn unregistered_without_body(token: &str, reply: &http::Reply) -> Option<ProviderError> {
    (reply.status == StatusCode::NOT_FOUND && reply.body_lost).then(|| ProviderError::Permanent {
        reason: format!(
            "FCM 404, taken for UNREGISTERED: {}",
            http::body_snippet(&reply.bytes, true, 200)
        ),
        dead_contacts: vec![token.to_string()],
    })
}

/// Combines per-token outcomes (in token order): any success wins, under the first message name
/// FCM gave (none if no reply named one); else a throttle of the whole project (with the longest
/// wait asked for), which holds every push; else any transient failure
/// (with the longest `retry_after` asked for), a throttle only if every such failure was one;
/// else a permanent failure; unsendable only if no token's request could even be sent. Whatever
/// the outcome, it carries every token FCM declared dead (a failure also names them in its
/// reason), so they are forgotten even when this notification fails over to another channel.
fn combine(outcomes: Vec<Result<Option<String>, ProviderError>>) -> Result<Receipt, ProviderError> {
    let tokens = outcomes.len();
    let mut sent = false;
    let mut first_name = None;
    let mut dead = Vec::new();
    // The first reason, the longest wait, and whether every one was a throttle.
    let mut transient: Option<(String, Option<Duration>, bool)> = None;
    // A throttle of the whole project, which holds every push whatever the other tokens said.
    let mut project: Option<(String, Option<Duration>)> = None;
    let mut permanent: Option<String> = None;
    let mut unsendable: Option<String> = None;
    for outcome in outcomes {
        match outcome {
            Ok(name) => {
                sent = true;
                first_name = first_name.or(name);
            }
            Err(error) => {
                dead.extend_from_slice(error.dead_contacts());
                let throttled = matches!(error, ProviderError::Throttled { .. });
                match error {
                    ProviderError::Transient {
                        reason,
                        retry_after,
                        ..
                    }
                    | ProviderError::Throttled {
                        reason,
                        retry_after,
                        ..
                    } => {
                        transient = Some(match transient {
                            None => (reason, retry_after, throttled),
                            Some((first, longest, all_throttled)) => {
                                (first, longest.max(retry_after), all_throttled && throttled)
                            }
                        });
                    }
                    ProviderError::AccountThrottled {
                        reason,
                        retry_after,
                        ..
                    } => {
                        project = Some(match project {
                            None => (reason, retry_after),
                            Some((first, longest)) => (first, longest.max(retry_after)),
                        });
                    }
                    ProviderError::Permanent { reason, .. } => {
                        permanent.get_or_insert(reason);
                    }
                    ProviderError::Unsendable { reason } => {
                        unsendable.get_or_insert(reason);
                    }
                    // Neither comes from a token's send (an HTTP request of its own).
                    ProviderError::MissingContact(_) | ProviderError::NoConnection { .. } => {}
                }
            }
        }
    }
    let dead_note = if dead.is_empty() {
        String::new()
    } else {
        format!(
            "; {} of {} tokens dead: {}",
            dead.len(),
            tokens,
            abbreviate(&dead)
        )
    };
    if let (false, Some((reason, retry_after))) = (sent, project) {
        return Err(ProviderError::AccountThrottled {
            reason: format!("{reason}{dead_note}"),
            retry_after,
            dead_contacts: dead,
        });
    }
    match (sent, transient, permanent, unsendable) {
        (true, ..) => Ok(Receipt {
            dead_contacts: dead,
            ..Receipt::new(first_name)
        }),
        (false, Some((reason, retry_after, true)), ..) => Err(ProviderError::Throttled {
            reason: format!("{reason}{dead_note}"),
            retry_after,
            dead_contacts: dead,
        }),
        (false, Some((reason, retry_after, false)), ..) => Err(ProviderError::Transient {
            reason: format!("{reason}{dead_note}"),
            retry_after,
            dead_contacts: dead,
            incident: None,
        }),
        (false, None, None, Some(reason)) => Err(ProviderError::Unsendable { reason }),
        (false, None, reason, _) => Err(ProviderError::Permanent {
            reason: format!(
                "{}{dead_note}",
                reason.unwrap_or_else(|| "no token accepted".into())
            ),
            dead_contacts: dead,
        }),
    }
}

/// Token prefixes for reasons and logs: enough to recognise a device, short enough to read.
fn abbreviate(tokens: &[String]) -> String {
    tokens
        .iter()
        .map(|t| match t.char_indices().nth(12) {
            Some((end, _)) => format!("{}…", &t[..end]),
            None => t.clone(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl Provider for PushProvider {
    fn channel(&self) -> Channel {
        Channel::Push
    }

    fn name(&self) -> &str {
        &self.name
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
    use crate::channel::google_auth;
    use crate::channel::provider::tests::SendNow;
    use crate::channel::provider::tests::outbound;
    use wiremock::matchers::{bearer_token, body_partial_json, header, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    const SEND_PATH: &str = "/v1/projects/shop-app/messages:send";

    /// A provider for project `shop-app` at `base_url`, authenticated as `config` says.
    fn fcm_at(base_url: &str, config: PushConfig) -> PushProvider {
        let _ = rustls::crypto::ring::default_provider().install_default();
        PushProvider::new(
            "fcm".into(),
            PushConfig {
                base_url: base_url.into(),
                project_id: "shop-app".into(),
                ..config
            },
        )
        .expect("provider")
    }

    fn provider(base_url: &str, timeout_ms: u64) -> PushProvider {
        let config = PushConfig {
            access_token: "ya29.secret-access-token".into(),
            timeout_ms,
            ..PushConfig::default()
        };
        fcm_at(base_url, config)
    }

    fn message(tokens: &[&str]) -> OutboundMessage {
        let mut message = outbound();
        message.contacts.push_tokens = tokens.iter().map(|t| t.to_string()).collect();
        message
    }

    /// Mounts a reply for the request addressed to `token`.
    async fn reply_for(server: &MockServer, token: &str, template: ResponseTemplate) {
        Mock::given(method("POST"))
            .and(path(SEND_PATH))
            .and(body_partial_json(json!({"message": {"token": token}})))
            .respond_with(template)
            .expect(1)
            .mount(server)
            .await;
    }

    fn sent(id: &str) -> ResponseTemplate {
        ResponseTemplate::new(200)
            .set_body_json(json!({"name": format!("projects/shop-app/messages/{id}")}))
    }

    fn fcm_error(http: u16, status: &str, error_code: &str, message: &str) -> ResponseTemplate {
        ResponseTemplate::new(http).set_body_json(fcm_error_body(http, status, error_code, message))
    }

    /// The body of an FCM error reply with an `FcmError` detail.
    fn fcm_error_body(
        http: u16,
        status: &str,
        error_code: &str,
        message: &str,
    ) -> serde_json::Value {
        json!({
            "error": {
                "code": http,
                "message": message,
                "status": status,
                "details": [{
                    "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                    "errorCode": error_code,
                }],
            }
        })
    }

    /// FCM's answer when a device's (or the project's) message rate is exceeded.
    fn quota_exceeded() -> ResponseTemplate {
        fcm_error(
            429,
            "RESOURCE_EXHAUSTED",
            "QUOTA_EXCEEDED",
            "Quota exceeded.",
        )
    }

    fn unregistered() -> ResponseTemplate {
        fcm_error(
            404,
            "NOT_FOUND",
            "UNREGISTERED",
            "Requested entity was not found.",
        )
    }

    fn invalid_token() -> ResponseTemplate {
        ResponseTemplate::new(400).set_body_json(json!({
            "error": {
                "code": 400,
                "message": "The registration token is not a valid FCM registration token",
                "status": "INVALID_ARGUMENT",
                "details": [
                    {
                        "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                        "errorCode": "INVALID_ARGUMENT",
                    },
                    {
                        "@type": "type.googleapis.com/google.rpc.BadRequest",
                        "fieldViolations": [{
                            "field": "message.token",
                            "description": "The registration token is not a valid FCM registration token",
                        }],
                    },
                ],
            }
        }))
    }

    /// Google's answer to a bearer token it does not take (revoked, expired, another
    /// project's): a 401 `UNAUTHENTICATED` with no FCM error code.
    fn unauthenticated() -> ResponseTemplate {
        ResponseTemplate::new(401).set_body_json(json!({
            "error": {
                "code": 401,
                "message": "Request had invalid authentication credentials. Expected OAuth 2 \
                            access token, login cookie or other valid authentication credential.",
                "status": "UNAUTHENTICATED",
            }
        }))
    }

    /// FCM's answer when the APNs certificate or key, or the web push key, stored in Firebase
    /// for the device's platform is invalid or missing: also a 401, with the server's generic
    /// wording, told apart only by its error code.
    fn third_party_auth_error() -> ResponseTemplate {
        fcm_error(
            401,
            "UNAUTHENTICATED",
            "THIRD_PARTY_AUTH_ERROR",
            "Request is missing required authentication credential. Expected OAuth 2 access \
             token, login cookie or other valid authentication credential.",
        )
    }

    #[tokio::test]
    async fn a_2xx_whose_body_is_no_fcm_reply_is_sent_without_an_id() {
        // FCM took the message: a failure would send it again, by retry or the next channel.
        let server = MockServer::start().await;
        let garbled = ResponseTemplate::new(200).set_body_string("<html>bad gateway</html>");
        reply_for(&server, "device-1", garbled).await;
        let provider = provider(&server.uri(), 2_000);
        let outcome = provider.send_now(&message(&["device-1"])).await;
        assert!(
            matches!(&outcome, Ok(receipt) if receipt.provider_message_id.is_none()),
            "{outcome:?}"
        );
        // With another device's id in its reply, the message gets that one.
        let garbled = ResponseTemplate::new(200).set_body_string("");
        reply_for(&server, "device-2", garbled).await;
        reply_for(&server, "device-3", sent("m3")).await;
        let receipt = provider
            .send_now(&message(&["device-2", "device-3"]))
            .await
            .expect("sent");
        assert_eq!(
            receipt.provider_message_id.as_deref(),
            Some("projects/shop-app/messages/m3")
        );
        server.verify().await;
    }

    #[tokio::test]
    async fn sends_the_v1_shape_with_bearer_auth_and_returns_the_message_name() {
        let server = MockServer::start().await;
        let msg = message(&["device-a"]);
        Mock::given(method("POST"))
            .and(path(SEND_PATH))
            .and(bearer_token("ya29.secret-access-token"))
            .and(wiremock::matchers::body_json(json!({
                "message": {
                    "token": "device-a",
                    "notification": {"title": "Order shipped", "body": "Order #1001 shipped"},
                    "data": {
                        "notification_id": msg.notification_id.to_string(),
                        "category": "transactional",
                    },
                }
            })))
            .respond_with(sent("0:1500415314455276%31bd1c96f9fd7ecd"))
            .expect(1)
            .mount(&server)
            .await;
        let receipt = provider(&server.uri(), 2_000).send_now(&msg).await.unwrap();
        assert_eq!(
            receipt.provider_message_id.as_deref(),
            Some("projects/shop-app/messages/0:1500415314455276%31bd1c96f9fd7ecd")
        );
    }

    #[tokio::test]
    async fn an_unregistered_token_is_a_dead_contact() {
        let server = MockServer::start().await;
        reply_for(&server, "stale-device", unregistered()).await;
        let error = provider(&server.uri(), 2_000)
            .send_now(&message(&["stale-device"]))
            .await
            .unwrap_err();
        assert!(
            matches!(&error, ProviderError::Permanent { reason, dead_contacts }
                if dead_contacts == &["stale-device"] && reason.contains("UNREGISTERED")),
            "{error:?}"
        );
    }

    /// FCM answers 404 only for an unregistered token: one whose body is lost midway declares the
    /// token dead as the whole reply would, and says the body was lost.
    #[tokio::test]
    async fn a_404_whose_body_is_lost_is_an_unregistered_token() {
        let url = http::tests::cut_off_reply("HTTP/1.1 404 Not Found").await;
        let error = provider(&url, 2_000)
            .send_now(&message(&["stale-device"]))
            .await
            .unwrap_err();
        assert!(
            matches!(&error, ProviderError::Permanent { reason, dead_contacts }
                if dead_contacts == &["stale-device"]
                    && reason.contains("UNREGISTERED")
                    && reason.contains("body was lost")),
            "{error:?}"
        );
    }

    /// A 404 whose body was read and is not FCM's (a wrong `base_url` or project, the same for
    /// every token) keeps the token.
    #[tokio::test]
    async fn a_404_that_is_not_fcm_s_keeps_the_token() {
        let server = MockServer::start().await;
        reply_for(&server, "device-1", ResponseTemplate::new(404)).await;
        let page = ResponseTemplate::new(404).set_body_string("<html>Not Found</html>");
        reply_for(&server, "device-2", page).await;
        let not_found = ResponseTemplate::new(404).set_body_json(json!({
            "error": {"code": 404, "message": "Requested entity was not found.", "status": "NOT_FOUND"}
        }));
        reply_for(&server, "device-3", not_found).await;
        let error = provider(&server.uri(), 2_000)
            .send_now(&message(&["device-1", "device-2", "device-3"]))
            .await
            .unwrap_err();
        assert!(
            matches!(&error, ProviderError::Permanent { dead_contacts, .. } if dead_contacts.is_empty()),
            "{error:?}"
        );
        server.verify().await;
    }

    /// A 403 refuses the project (the FCM API disabled, a service account without the
    /// `cloudmessaging.messages.create` permission, another project's id): every send fails alike
    /// until that is fixed, so it is transient and counts against the circuit, whatever its body
    /// (FCM's, another, or lost midway). Only `SENDER_ID_MISMATCH` speaks of the token (one
    /// registered with another sender): permanent for that device, and the token is kept.
    #[tokio::test]
    async fn a_403_refusing_the_project_is_transient_but_a_sender_id_mismatch_is_the_token_s() {
        let server = MockServer::start().await;
        let no_permission = ResponseTemplate::new(403).set_body_json(json!({
            "error": {
                "code": 403,
                "message": "Permission 'cloudmessaging.messages.create' denied on resource \
                            '//cloudresourcemanager.googleapis.com/projects/shop-app' (or it may \
                            not exist).",
                "status": "PERMISSION_DENIED",
                "details": [{
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "IAM_PERMISSION_DENIED",
                    "domain": "cloudmessaging.googleapis.com",
                }],
            }
        }));
        let api_disabled = ResponseTemplate::new(403).set_body_json(json!({
            "error": {
                "code": 403,
                "message": "Firebase Cloud Messaging API has not been used in project 1234 \
                            before or it is disabled.",
                "status": "PERMISSION_DENIED",
                "details": [{
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "SERVICE_DISABLED",
                    "domain": "googleapis.com",
                }],
            }
        }));
        let page = ResponseTemplate::new(403).set_body_string("<html>Forbidden</html>");
        for (token, reply, said) in [
            ("device-1", no_permission, "cloudmessaging.messages.create"),
            ("device-2", api_disabled, "has not been used"),
            ("device-3", page, "Forbidden"),
        ] {
            reply_for(&server, token, reply).await;
            let error = provider(&server.uri(), 2_000)
                .send_now(&message(&[token]))
                .await
                .unwrap_err();
            assert!(
                matches!(&error, ProviderError::Transient { reason, dead_contacts, .. }
                    if reason.contains("403") && reason.contains(said) && dead_contacts.is_empty()),
                "{token}: the project is refused, not the device: {error:?}"
            );
        }
        let url = http::tests::cut_off_reply("HTTP/1.1 403 Forbidden").await;
        let error = provider(&url, 2_000)
            .send_now(&message(&["device-4"]))
            .await
            .unwrap_err();
        assert!(
            matches!(&error, ProviderError::Transient { reason, dead_contacts, .. }
                if reason.contains("403") && dead_contacts.is_empty()),
            "a 403 whose body was lost is taken for the project's: {error:?}"
        );
        reply_for(
            &server,
            "other-sender",
            fcm_error(
                403,
                "PERMISSION_DENIED",
                "SENDER_ID_MISMATCH",
                "SenderId mismatch",
            ),
        )
        .await;
        let error = provider(&server.uri(), 2_000)
            .send_now(&message(&["other-sender"]))
            .await
            .unwrap_err();
        assert!(
            matches!(&error, ProviderError::Permanent { reason, dead_contacts }
                if reason.contains("SENDER_ID_MISMATCH") && dead_contacts.is_empty()),
            "{error:?}"
        );
        server.verify().await;
    }

    #[tokio::test]
    async fn an_invalid_token_is_a_dead_contact_but_an_invalid_payload_is_not() {
        let server = MockServer::start().await;
        reply_for(&server, "garbage", invalid_token()).await;
        reply_for(
            &server,
            "fine-device",
            fcm_error(
                400,
                "INVALID_ARGUMENT",
                "INVALID_ARGUMENT",
                "Invalid JSON payload received.",
            ),
        )
        .await;
        let provider = provider(&server.uri(), 2_000);
        let error = provider.send_now(&message(&["garbage"])).await.unwrap_err();
        assert!(
            matches!(&error, ProviderError::Permanent { dead_contacts, .. } if dead_contacts == &["garbage"]),
            "{error:?}"
        );
        let error = provider
            .send_now(&message(&["fine-device"]))
            .await
            .unwrap_err();
        assert!(
            matches!(
                &error,
                ProviderError::Permanent { dead_contacts, .. } if dead_contacts.is_empty()
            ),
            "{error:?}"
        );
    }

    /// Google's answer when the project's send quota is out, as its API front words it: no FCM
    /// error code, a `google.rpc.ErrorInfo` with reason `RATE_LIMIT_EXCEEDED`.
    fn project_rate_limit_exceeded() -> ResponseTemplate {
        ResponseTemplate::new(429).set_body_json(project_rate_limit_exceeded_body())
    }

    /// The body of [`project_rate_limit_exceeded`].
    fn project_rate_limit_exceeded_body() -> serde_json::Value {
        json!({
            "error": {
                "code": 429,
                "message": "Quota exceeded for quota metric 'Send requests' and limit 'Send \
                            requests per minute' of service 'fcm.googleapis.com' for consumer \
                            'project_number:123'.",
                "status": "RESOURCE_EXHAUSTED",
                "details": [{
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "RATE_LIMIT_EXCEEDED",
                    "domain": "googleapis.com",
                    "metadata": {
                        "consumer": "projects/123",
                        "quota_limit": "SendsPerMinutePerProject",
                        "quota_unit": "1/min/{project}",
                        "service": "fcm.googleapis.com",
                    },
                }],
            }
        })
    }

    /// FCM's `QUOTA_EXCEEDED` with a `google.rpc.QuotaFailure` naming the project's quota.
    fn project_quota_exceeded() -> ResponseTemplate {
        ResponseTemplate::new(429).set_body_json(json!({
            "error": {
                "code": 429,
                "message": "Quota exceeded.",
                "status": "RESOURCE_EXHAUSTED",
                "details": [
                    {
                        "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                        "errorCode": "QUOTA_EXCEEDED",
                    },
                    {
                        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                        "violations": [{
                            "subject": "project:123",
                            "quotaId": "SendsPerMinutePerProject",
                            "quotaMetric": "fcm.googleapis.com/send_requests",
                        }],
                    },
                ],
            }
        }))
    }

    #[tokio::test]
    async fn the_project_s_quota_throttles_the_account_with_retry_after_or_a_minute() {
        for (reply, wait) in [
            (project_rate_limit_exceeded(), Duration::from_secs(60)),
            (
                project_quota_exceeded().insert_header("retry-after", "30"),
                Duration::from_secs(30),
            ),
        ] {
            let server = MockServer::start().await;
            reply_for(&server, "device-a", reply).await;
            let error = provider(&server.uri(), 2_000)
                .send_now(&message(&["device-a"]))
                .await
                .unwrap_err();
            assert!(
                matches!(&error, ProviderError::AccountThrottled { reason, retry_after: Some(d), .. }
                    if *d == wait && reason.contains("the project's quota")),
                "{error:?}"
            );
        }
    }

    #[tokio::test]
    async fn the_project_s_quota_beside_another_device_s_failure_throttles_the_account() {
        let server = MockServer::start().await;
        reply_for(&server, "device-a", quota_exceeded()).await;
        reply_for(&server, "device-b", project_rate_limit_exceeded()).await;
        reply_for(&server, "dead-1", unregistered()).await;
        let error = provider(&server.uri(), 2_000)
            .send_now(&message(&["device-a", "device-b", "dead-1"]))
            .await
            .unwrap_err();
        assert!(
            matches!(&error, ProviderError::AccountThrottled { dead_contacts, .. }
                if dead_contacts == &["dead-1"]),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn quota_exceeded_throttles_the_device_and_honours_retry_after() {
        let server = MockServer::start().await;
        reply_for(
            &server,
            "device-a",
            quota_exceeded().insert_header("retry-after", "42"),
        )
        .await;
        let error = provider(&server.uri(), 2_000)
            .send_now(&message(&["device-a"]))
            .await
            .unwrap_err();
        assert!(
            matches!(&error, ProviderError::Throttled { reason, retry_after: Some(d), dead_contacts }
                if *d == Duration::from_secs(42) && reason.contains("QUOTA_EXCEEDED")
                    && dead_contacts.is_empty()),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn a_throttled_device_beside_an_fcm_failure_is_a_transient_failure() {
        let server = MockServer::start().await;
        reply_for(&server, "device-a", quota_exceeded()).await;
        let down = fcm_error(503, "UNAVAILABLE", "UNAVAILABLE", "try later");
        reply_for(&server, "device-b", down).await;
        let error = provider(&server.uri(), 2_000)
            .send_now(&message(&["device-a", "device-b"]))
            .await
            .unwrap_err();
        assert!(
            matches!(&error, ProviderError::Transient { .. }),
            "FCM's own failure counts against the circuit: {error:?}"
        );
    }

    #[tokio::test]
    async fn a_throttled_device_beside_a_dead_one_is_a_throttle_naming_the_dead_token() {
        let server = MockServer::start().await;
        reply_for(&server, "device-a", quota_exceeded()).await;
        reply_for(&server, "dead-1", unregistered()).await;
        let error = provider(&server.uri(), 2_000)
            .send_now(&message(&["device-a", "dead-1"]))
            .await
            .unwrap_err();
        assert!(
            matches!(&error, ProviderError::Throttled { dead_contacts, .. }
                if dead_contacts == &["dead-1"]),
            "{error:?}"
        );
        assert_eq!(error.dead_contacts(), ["dead-1"], "{error:?}");
    }

    #[tokio::test]
    async fn unavailable_is_transient() {
        let server = MockServer::start().await;
        reply_for(
            &server,
            "device-a",
            fcm_error(
                503,
                "UNAVAILABLE",
                "UNAVAILABLE",
                "The service is currently unavailable.",
            ),
        )
        .await;
        let error = provider(&server.uri(), 2_000)
            .send_now(&message(&["device-a"]))
            .await
            .unwrap_err();
        assert!(
            matches!(&error, ProviderError::Transient { reason, retry_after: None, .. } if reason.contains("UNAVAILABLE")),
            "{error:?}"
        );
    }

    /// `reply` with a `google.rpc.RetryInfo` detail asking for `delay` (in protobuf's JSON form of
    /// a duration, a string) added to its `details`.
    fn with_retry_info(mut reply: serde_json::Value, delay: serde_json::Value) -> ResponseTemplate {
        reply["error"]["details"]
            .as_array_mut()
            .expect("details")
            .push(json!({
                "@type": "type.googleapis.com/google.rpc.RetryInfo",
                "retryDelay": delay,
            }));
        ResponseTemplate::new(reply["error"]["code"].as_u64().expect("code") as u16)
            .set_body_json(reply)
    }

    /// A 429 or 503 without `Retry-After` waits as long as its `google.rpc.RetryInfo` asks, for
    /// the project's quota, a device's and FCM's own trouble alike.
    #[tokio::test]
    async fn retry_info_is_the_wait_when_retry_after_is_absent() {
        let project = project_rate_limit_exceeded_body();
        let device = fcm_error_body(
            429,
            "RESOURCE_EXHAUSTED",
            "QUOTA_EXCEEDED",
            "Quota exceeded.",
        );
        let down = fcm_error_body(503, "UNAVAILABLE", "UNAVAILABLE", "Try again later.");
        let cases = [
            (project, "30s", "AccountThrottled", Duration::from_secs(30)),
            (device, "1.5s", "Throttled", Duration::from_millis(1_500)),
            (down, "12.000001s", "Transient", Duration::new(12, 1_000)),
        ];
        for (body, delay, class, wait) in cases {
            let server = MockServer::start().await;
            reply_for(&server, "device-a", with_retry_info(body, json!(delay))).await;
            let error = provider(&server.uri(), 2_000)
                .send_now(&message(&["device-a"]))
                .await
                .unwrap_err();
            let as_asked = match &error {
                ProviderError::AccountThrottled { .. } => class == "AccountThrottled",
                ProviderError::Throttled { .. } => class == "Throttled",
                ProviderError::Transient { .. } => class == "Transient",
                _ => false,
            };
            assert!(
                as_asked && error.retry_after() == Some(wait),
                "retryDelay {delay:?}: wanted {class} waiting {wait:?}, got {error:?}"
            );
        }
    }

    /// A `Retry-After` beside a `google.rpc.RetryInfo` is the wait: the header is what every
    /// provider's reply is read for.
    #[tokio::test]
    async fn retry_after_wins_over_retry_info() {
        let server = MockServer::start().await;
        let body = fcm_error_body(
            429,
            "RESOURCE_EXHAUSTED",
            "QUOTA_EXCEEDED",
            "Quota exceeded.",
        );
        let reply = with_retry_info(body, json!("30s")).insert_header("retry-after", "7");
        reply_for(&server, "device-a", reply).await;
        let error = provider(&server.uri(), 2_000)
            .send_now(&message(&["device-a"]))
            .await
            .unwrap_err();
        assert_eq!(
            error.retry_after(),
            Some(Duration::from_secs(7)),
            "{error:?}"
        );
    }

    /// A `retryDelay` in another form than protobuf's JSON string is no wait, and the reply is
    /// classified as without it.
    #[tokio::test]
    async fn a_retry_delay_in_another_form_is_ignored() {
        let server = MockServer::start().await;
        let odd = json!({"seconds": 30});
        let reply = with_retry_info(project_rate_limit_exceeded_body(), odd);
        reply_for(&server, "device-a", reply).await;
        let error = provider(&server.uri(), 2_000)
            .send_now(&message(&["device-a"]))
            .await
            .unwrap_err();
        assert!(
            matches!(&error, ProviderError::AccountThrottled { retry_after: Some(d), .. }
                if *d == PROJECT_QUOTA_WAIT),
            "{error:?}"
        );
    }

    #[test]
    fn retry_delays_are_read_in_protobuf_s_json_form() {
        for (text, wait) in [
            ("30s", Duration::from_secs(30)),
            ("1.5s", Duration::from_millis(1_500)),
            ("0.000000001s", Duration::from_nanos(1)),
            ("3.000001s", Duration::new(3, 1_000)),
            ("0s", Duration::ZERO),
            (".5s", Duration::from_millis(500)),
            ("2.s", Duration::from_secs(2)),
        ] {
            assert_eq!(parse_retry_delay(text), Some(wait), "{text:?}");
        }
        for text in [
            "30",
            "-1s",
            "-0.5s",
            "1.5.2s",
            "",
            "s",
            ".s",
            "1.0000000001s",
            "1,5s",
            "+1s",
            " 1s",
            "1 s",
            "1e3s",
            "99999999999999999999s",
        ] {
            assert_eq!(parse_retry_delay(text), None, "{text:?}");
        }
    }

    #[tokio::test]
    async fn one_accepted_token_is_enough_and_its_name_is_the_receipt() {
        let server = MockServer::start().await;
        reply_for(&server, "stale-device", unregistered()).await;
        reply_for(&server, "device-b", sent("b")).await;
        reply_for(&server, "device-c", sent("c")).await;
        let receipt = provider(&server.uri(), 2_000)
            .send_now(&message(&["stale-device", "device-b", "device-c"]))
            .await
            .unwrap();
        assert_eq!(
            receipt.provider_message_id.as_deref(),
            Some("projects/shop-app/messages/b")
        );
        assert_eq!(receipt.dead_contacts, vec!["stale-device".to_string()]);
    }

    #[tokio::test]
    async fn an_accepted_send_names_every_dead_token() {
        let server = MockServer::start().await;
        reply_for(&server, "dead-1", unregistered()).await;
        reply_for(&server, "device-b", sent("b")).await;
        reply_for(&server, "dead-2", invalid_token()).await;
        let receipt = provider(&server.uri(), 2_000)
            .send_now(&message(&["dead-1", "device-b", "dead-2"]))
            .await
            .unwrap();
        assert_eq!(
            receipt.provider_message_id.as_deref(),
            Some("projects/shop-app/messages/b")
        );
        assert_eq!(
            receipt.dead_contacts,
            vec!["dead-1".to_string(), "dead-2".to_string()],
            "the good device took the message; both dead ones are reported"
        );
    }

    #[tokio::test]
    async fn a_send_to_only_dead_tokens_names_them_all() {
        let server = MockServer::start().await;
        for token in ["dead-1", "dead-2", "dead-3"] {
            reply_for(&server, token, unregistered()).await;
        }
        let error = provider(&server.uri(), 2_000)
            .send_now(&message(&["dead-1", "dead-2", "dead-3"]))
            .await
            .unwrap_err();
        assert!(
            matches!(&error, ProviderError::Permanent { reason, dead_contacts }
                if dead_contacts == &["dead-1", "dead-2", "dead-3"]
                    && reason.contains("3 of 3 tokens dead")),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn all_failed_with_one_transient_is_transient_and_names_the_dead_tokens() {
        let server = MockServer::start().await;
        reply_for(&server, "stale-device-with-a-long-token", unregistered()).await;
        reply_for(
            &server,
            "device-b",
            fcm_error(503, "UNAVAILABLE", "UNAVAILABLE", "try later")
                .insert_header("retry-after", "7"),
        )
        .await;
        reply_for(
            &server,
            "device-c",
            fcm_error(503, "UNAVAILABLE", "UNAVAILABLE", "try later")
                .insert_header("retry-after", "20"),
        )
        .await;
        let error = provider(&server.uri(), 2_000)
            .send_now(&message(&[
                "stale-device-with-a-long-token",
                "device-b",
                "device-c",
            ]))
            .await
            .unwrap_err();
        assert!(
            matches!(&error, ProviderError::Transient { reason, retry_after: Some(d), dead_contacts, .. }
                if *d == Duration::from_secs(20)
                    && reason.contains("1 of 3 tokens dead: stale-device…")
                    && dead_contacts == &["stale-device-with-a-long-token"]),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn all_permanent_names_every_dead_token_and_only_those() {
        let server = MockServer::start().await;
        reply_for(
            &server,
            "device-a",
            fcm_error(403, "PERMISSION_DENIED", "SENDER_ID_MISMATCH", "mismatch"),
        )
        .await;
        reply_for(&server, "dead-1", unregistered()).await;
        reply_for(&server, "dead-2", invalid_token()).await;
        let error = provider(&server.uri(), 2_000)
            .send_now(&message(&["device-a", "dead-1", "dead-2"]))
            .await
            .unwrap_err();
        assert!(
            matches!(&error, ProviderError::Permanent { reason, dead_contacts }
                if dead_contacts == &["dead-1", "dead-2"] && reason.contains("2 of 3 tokens dead")
                    && reason.contains("SENDER_ID_MISMATCH")),
            "{error:?}"
        );
    }

    #[test]
    fn tokens_none_of_which_could_be_sent_are_unsendable_unless_fcm_answered_one() {
        let unsendable = || Err(ProviderError::unsendable("bad header"));
        assert_eq!(
            combine(vec![unsendable(), unsendable()]),
            Err(ProviderError::unsendable("bad header")),
            "nothing reached FCM"
        );
        let refused = Err(ProviderError::permanent("FCM 403"));
        let combined = combine(vec![unsendable(), refused]);
        assert!(
            matches!(&combined, Err(ProviderError::Permanent { reason, .. }) if reason == "FCM 403"),
            "FCM answered one: {combined:?}"
        );
    }

    #[tokio::test]
    async fn timeouts_are_transient() {
        let server = MockServer::start().await;
        reply_for(
            &server,
            "device-a",
            sent("late").set_delay(Duration::from_secs(5)),
        )
        .await;
        let error = provider(&server.uri(), 100)
            .send_now(&message(&["device-a"]))
            .await
            .unwrap_err();
        assert!(
            matches!(&error, ProviderError::Transient { reason, .. } if reason.contains("timed out")),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn no_tokens_is_a_missing_contact() {
        let server = MockServer::start().await;
        let error = provider(&server.uri(), 2_000)
            .send_now(&message(&[]))
            .await
            .unwrap_err();
        assert_eq!(error, ProviderError::MissingContact(Channel::Push));
        assert!(server.received_requests().await.unwrap().is_empty());
    }

    #[test]
    fn config_debug_redacts_the_access_token() {
        let config = PushConfig {
            access_token: "ya29.secret-access-token".into(),
            ..PushConfig::default()
        };
        assert!(!format!("{config:?}").contains("secret"));
        assert!(matches!(
            PushProvider::new("fcm".into(), config),
            Err(PushConfigError::Missing("project_id"))
        ));
    }

    /// A provider authenticating with a service account key whose token endpoint is `server`'s
    /// `/token`, which answers `token_reply`.
    async fn with_service_account(
        server: &MockServer,
        dir: &std::path::Path,
        token_reply: ResponseTemplate,
    ) -> PushProvider {
        Mock::given(method("POST"))
            .and(path("/token"))
            .respond_with(token_reply)
            .mount(server)
            .await;
        let key = google_auth::tests::key_file(dir, &format!("{}/token", server.uri()));
        let config = PushConfig {
            service_account_file: Some(key),
            ..PushConfig::default()
        };
        fcm_at(&server.uri(), config)
    }

    /// The token endpoint's answer granting `access_token` for an hour.
    fn granted(access_token: &str) -> ResponseTemplate {
        google_auth::tests::granted(access_token, 3599)
    }

    async fn token_requests(server: &MockServer) -> usize {
        let requests = server.received_requests().await.expect("recorded");
        requests.iter().filter(|r| r.url.path() == "/token").count()
    }

    #[tokio::test]
    async fn a_service_account_s_token_authorises_the_sends_and_is_fetched_once() {
        let server = MockServer::start().await;
        let dir = tempfile::tempdir().expect("dir");
        let fcm = with_service_account(&server, dir.path(), granted("ya29.from-the-key")).await;
        Mock::given(method("POST"))
            .and(path(SEND_PATH))
            .and(bearer_token("ya29.from-the-key"))
            .respond_with(sent("1"))
            .expect(3)
            .mount(&server)
            .await;
        fcm.send_now(&message(&["device-a", "device-b"]))
            .await
            .expect("sent");
        fcm.send_now(&message(&["device-c"])).await.expect("sent");
        assert_eq!(token_requests(&server).await, 1, "one token for every send");
    }

    #[tokio::test]
    async fn a_token_fcm_refuses_is_replaced_for_the_next_send() {
        let server = MockServer::start().await;
        let dir = tempfile::tempdir().expect("dir");
        let fcm = with_service_account(&server, dir.path(), granted("ya29.revoked")).await;
        Mock::given(method("POST"))
            .and(path(SEND_PATH))
            .respond_with(unauthenticated())
            .mount(&server)
            .await;
        for _ in 0..2 {
            let refused = fcm.send_now(&message(&["device-a"])).await;
            assert!(
                matches!(refused, Err(ProviderError::Transient { .. })),
                "a refused token fails the account, not the message: {refused:?}"
            );
        }
        assert_eq!(
            token_requests(&server).await,
            2,
            "the refused token was not used again"
        );
    }

    #[tokio::test]
    async fn a_platform_s_credentials_fcm_cannot_use_fail_that_device_for_good_and_keep_the_token()
    {
        let server = MockServer::start().await;
        let dir = tempfile::tempdir().expect("dir");
        let fcm = with_service_account(&server, dir.path(), granted("ya29.good")).await;
        Mock::given(method("POST"))
            .and(path(SEND_PATH))
            .and(body_partial_json(json!({"message": {"token": "iphone"}})))
            .respond_with(third_party_auth_error())
            .expect(3)
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .and(path(SEND_PATH))
            .and(body_partial_json(json!({"message": {"token": "android"}})))
            .and(bearer_token("ya29.good"))
            .respond_with(sent("a"))
            .expect(1)
            .mount(&server)
            .await;
        for _ in 0..2 {
            let refused = fcm.send_now(&message(&["iphone"])).await.unwrap_err();
            assert!(
                matches!(&refused, ProviderError::Permanent { reason, dead_contacts }
                    if reason.contains("THIRD_PARTY_AUTH_ERROR") && dead_contacts.is_empty()),
                "the platform's configuration, not the device: next channel at once, the token \
                 kept: {refused:?}"
            );
            assert!(
                !refused.counts_against_circuit(),
                "FCM answered; the other platforms' sends go on: {refused:?}"
            );
        }
        let receipt = fcm
            .send_now(&message(&["iphone", "android"]))
            .await
            .expect("the Android device takes it");
        assert!(receipt.dead_contacts.is_empty(), "{receipt:?}");
        assert_eq!(
            token_requests(&server).await,
            1,
            "Herald's own Google token was not refused, so not fetched again"
        );
    }

    /// The serialised size of `value`.
    fn json_len(value: &serde_json::Value) -> usize {
        serde_json::to_vec(value).expect("JSON").len()
    }

    #[tokio::test]
    async fn a_long_text_is_cut_so_that_the_message_fits_fcm_s_limit() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path(SEND_PATH))
            .respond_with(sent("long"))
            .expect(1)
            .mount(&server)
            .await;
        // A real FCM token's length; quotes and line breaks take more room in JSON than in the
        // text, and non-ASCII letters more than one byte.
        let token = "d".repeat(163);
        let mut long = message(&[token.as_str()]);
        long.content.subject = Some("Ihre Bestellung \"Größe\" ".repeat(80));
        long.content.text = "Zeile \"eins\"\nÜbermäßig lange Mail. ".repeat(400);
        long.content.short = None;
        provider(&server.uri(), 2_000)
            .send_now(&long)
            .await
            .expect("sent, not refused");

        let requests = server.received_requests().await.expect("recorded");
        let request: serde_json::Value = serde_json::from_slice(&requests[0].body).expect("JSON");
        let sent = &request["message"];
        assert!(
            requests[0].body.len() <= 4_096,
            "the whole request, token included, is within FCM's 4,096 bytes: {}",
            requests[0].body.len()
        );
        let payload = json_len(&sent["notification"]) + json_len(&sent["data"]);
        assert!(
            (3_000..=3_584).contains(&payload),
            "notification and data fill FCM's limit less a margin of 512 bytes: {payload}"
        );
        let title = sent["notification"]["title"].as_str().expect("title");
        let body = sent["notification"]["body"].as_str().expect("body");
        for (cut, whole) in [
            (title, long.content.subject.as_deref().unwrap_or_default()),
            (body, long.content.text.as_str()),
        ] {
            let kept = cut.strip_suffix('…').expect("cut with an ellipsis");
            assert!(
                whole.starts_with(kept),
                "{cut:?} is the beginning of the text"
            );
        }
        assert!(
            body.len() > 2 * title.len(),
            "the body keeps most of the room"
        );
        assert_eq!(
            sent["data"]["notification_id"],
            long.notification_id.to_string(),
            "the data fields go whole"
        );
    }

    #[tokio::test]
    async fn a_token_endpoint_that_is_down_makes_the_send_transient() {
        let server = MockServer::start().await;
        let dir = tempfile::tempdir().expect("dir");
        let fcm = with_service_account(&server, dir.path(), ResponseTemplate::new(503)).await;
        match fcm.send_now(&message(&["device-a"])).await {
            Err(ProviderError::Transient { reason, .. }) => {
                assert!(reason.contains("OAuth token endpoint"), "{reason}")
            }
            other => panic!("a token endpoint that is down is transient, got {other:?}"),
        }
    }

    /// A key Google no longer takes (deleted or rotated away) refuses every send alike: the send
    /// is transient, counted against the circuit, and retried once the key is replaced.
    #[tokio::test]
    async fn a_service_account_the_token_endpoint_refuses_makes_the_send_transient() {
        let server = MockServer::start().await;
        let dir = tempfile::tempdir().expect("dir");
        let refused = ResponseTemplate::new(400).set_body_json(json!({
            "error": "invalid_grant",
            "error_description": "Invalid JWT Signature.",
        }));
        let fcm = with_service_account(&server, dir.path(), refused).await;
        match fcm.send_now(&message(&["device-a"])).await {
            Err(ProviderError::Transient {
                reason,
                dead_contacts,
                ..
            }) => {
                assert!(reason.contains("invalid_grant"), "{reason}");
                assert!(dead_contacts.is_empty(), "{dead_contacts:?}");
            }
            other => panic!("a refused service account is transient, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn the_metadata_server_s_token_authorises_the_sends() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path(google_auth::METADATA_TOKEN_PATH))
            .and(header("Metadata-Flavor", "Google"))
            .respond_with(granted("ya29.from-the-machine"))
            .expect(1)
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .and(path(SEND_PATH))
            .and(bearer_token("ya29.from-the-machine"))
            .respond_with(sent("1"))
            .expect(2)
            .mount(&server)
            .await;
        let config = PushConfig {
            metadata_server: Some(format!("{}/", server.uri())),
            ..PushConfig::default()
        };
        let fcm = fcm_at(&server.uri(), config);
        fcm.send_now(&message(&["device-a"])).await.expect("sent");
        fcm.send_now(&message(&["device-b"])).await.expect("sent");
    }

    #[test]
    fn one_way_of_authenticating_is_required() {
        // The client below needs a TLS provider; installed here, not by whichever test ran first.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = |file: Option<&str>, metadata: Option<&str>, token: &str| PushConfig {
            project_id: "shop-app".into(),
            service_account_file: file.map(PathBuf::from),
            metadata_server: metadata.map(String::from),
            access_token: token.into(),
            ..PushConfig::default()
        };
        let refused = |config| PushProvider::new("fcm".into(), config).unwrap_err();
        let client = reqwest::Client::new();
        let err = credentials(&config(None, Some(" "), " "), &client, None)
            .err()
            .expect("refused");
        assert!(matches!(err, PushConfigError::NoCredentials), "{err}");
        assert!(err.to_string().contains("metadata_server"), "{err}");
        assert!(err.to_string().contains(ADC_VARIABLE), "{err}");
        let err = refused(config(Some("key.json"), None, "ya29"));
        assert_eq!(
            err.to_string(),
            "channels.push.service_account_file and channels.push.access_token are set; set one \
             of them"
        );
        let err = refused(config(
            None,
            Some("http://metadata.google.internal"),
            "ya29",
        ));
        assert!(
            matches!(err, PushConfigError::ConflictingCredentials(_)),
            "{err}"
        );
        let err = refused(config(None, Some("metadata.google.internal"), ""));
        assert!(
            matches!(err, PushConfigError::MetadataServer { .. }),
            "{err}"
        );
        let err = refused(config(Some("/absent/key.json"), None, ""));
        assert!(err.to_string().contains("/absent/key.json"), "{err}");
    }

    #[tokio::test]
    async fn the_key_file_the_environment_names_is_used_when_none_is_configured() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/token"))
            .respond_with(granted("ya29.from-the-environment"))
            .expect(1)
            .mount(&server)
            .await;
        let dir = tempfile::tempdir().expect("dir");
        let key = google_auth::tests::key_file(dir.path(), &format!("{}/token", server.uri()));
        let client = reqwest::Client::new();
        let unconfigured = PushConfig::default();
        let found = credentials(&unconfigured, &client, Some(key.clone())).expect("found");
        assert_eq!(
            found.bearer().await.expect("token"),
            "ya29.from-the-environment"
        );

        let configured = PushConfig {
            access_token: "ya29.configured".into(),
            ..PushConfig::default()
        };
        let chosen = credentials(&configured, &client, Some(key)).expect("configured");
        assert_eq!(chosen.bearer().await.expect("token"), "ya29.configured");

        let absent = dir.path().join("absent.json");
        let err = credentials(&unconfigured, &client, Some(absent))
            .err()
            .expect("refused");
        assert!(
            err.to_string()
                .starts_with("GOOGLE_APPLICATION_CREDENTIALS: cannot read service account key"),
            "{err}"
        );
    }

    /// One send of `message` through a [`ChannelActor`](crate::channel::ChannelActor) whose
    /// `channels.limits.timeout_ms` is `timeout_ms`: its outcome, and how long it took.
    async fn send_through_the_channel(
        fcm: PushProvider,
        timeout_ms: u64,
        message: OutboundMessage,
    ) -> (crate::channel::SendOutcome, Duration) {
        use crate::channel::{ChannelActor, ChannelArgs, ChannelMsg, ChannelSettings};
        use ractor::{Actor, rpc::CallResult};

        let settings = ChannelSettings {
            timeout_ms,
            ..ChannelSettings::default()
        };
        let args = ChannelArgs::new(std::sync::Arc::new(fcm), settings, None);
        let (actor, _) = Actor::spawn(None, ChannelActor, args)
            .await
            .expect("channel actor starts");
        let wait = Duration::from_secs(30);
        let started = std::time::Instant::now();
        let answer = actor
            .call(
                |reply| ChannelMsg::Send {
                    message: Box::new(message),
                    answer_by: started + wait,
                    reply,
                },
                Some(wait),
            )
            .await
            .expect("actor alive");
        let took = started.elapsed();
        actor.stop(None);
        match answer {
            CallResult::Success(report) => (report.outcome, took),
            other => panic!("the send was not answered: {other:?}"),
        }
    }

    /// A token endpoint slower than the send's timeout (`channels.limits.timeout_ms`, shorter
    /// than the provider's own per-request `timeout_ms`) fails the send at that timeout, saying
    /// that the token did not come, rather than as a send that hung.
    #[tokio::test]
    async fn a_token_fetch_longer_than_the_send_s_timeout_fails_it_saying_so() {
        let server = MockServer::start().await;
        let dir = tempfile::tempdir().expect("dir");
        let slow = granted("ya29.late").set_delay(Duration::from_secs(3));
        let fcm = with_service_account(&server, dir.path(), slow).await;
        Mock::given(method("POST"))
            .and(path(SEND_PATH))
            .respond_with(sent("1"))
            .expect(0)
            .mount(&server)
            .await;
        let (outcome, took) = send_through_the_channel(fcm, 500, message(&["device-a"])).await;
        match outcome {
            crate::channel::SendOutcome::Failed(ProviderError::Transient { reason, .. }) => {
                assert!(
                    reason.contains("no Google OAuth token within the send's timeout"),
                    "{reason}"
                );
                assert!(reason.contains("nothing was sent to FCM"), "{reason}");
            }
            other => panic!("a token that does not come in time is transient: {other:?}"),
        }
        assert!(took < Duration::from_millis(1_500), "took {took:?}");
    }

    /// The token and the request to FCM share the send's timeout: a request that gets only what
    /// the token fetch left, and is not answered in it, fails the send at the timeout, saying
    /// how much of it the token took.
    #[tokio::test]
    async fn the_token_fetch_and_the_fcm_request_share_the_send_s_timeout() {
        let server = MockServer::start().await;
        let dir = tempfile::tempdir().expect("dir");
        let slowish = granted("ya29.slowish").set_delay(Duration::from_millis(400));
        let fcm = with_service_account(&server, dir.path(), slowish).await;
        Mock::given(method("POST"))
            .and(path(SEND_PATH))
            .respond_with(sent("1").set_delay(Duration::from_secs(3)))
            .mount(&server)
            .await;
        let (outcome, took) = send_through_the_channel(fcm, 800, message(&["device-a"])).await;
        match outcome {
            crate::channel::SendOutcome::Failed(ProviderError::Transient { reason, .. }) => {
                assert!(
                    reason.contains("no FCM reply within the send's timeout"),
                    "{reason}"
                );
                assert!(reason.contains("the Google OAuth token took "), "{reason}");
            }
            other => panic!("an FCM reply that does not come in time is transient: {other:?}"),
        }
        assert!(took < Duration::from_millis(1_800), "took {took:?}");
    }
}
