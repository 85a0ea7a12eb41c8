//! SMS through a Twilio-compatible API: `POST {base}/2010-04-01/Accounts/{sid}/Messages.json`
//! with a form body and HTTP basic auth. With `status_callback_url` set, each message asks Twilio
//! to report its delivery there (`StatusCallback`, with the notification's id added to the
//! query: see [`herald_nats::providers::twilio_status_callback_url`]): Herald's `POST
//! /api/v1/providers/twilio/status`, which checks Twilio's signature against that same URL.

use futures::future::BoxFuture;
use herald_nats::Channel;
use serde::{Deserialize, Serialize};

use super::{OutboundMessage, Provider, ProviderError, Receipt};
use super::{http, text};

/// Longest message body Twilio takes, in characters (it refuses longer ones, error 21617).
const MAX_BODY_CHARS: usize = 1_600;

/// SMS provider configuration.
#[derive(Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct SmsConfig {
    /// API root; a Twilio-compatible service or a test fake can stand in.
    pub base_url: String,
    /// Account SID (`AC…`), also the basic-auth user.
    pub account_sid: String,
    /// Auth token, the basic-auth password.
    /// Not serialised: `herald config` omits it.
    #[serde(skip_serializing)]
    pub auth_token: String,
    /// Sender: a phone number in E.164 form, or an alphanumeric sender id where allowed.
    pub from: String,
    /// Per-request timeout in milliseconds.
    pub timeout_ms: u64,
    /// The URL Twilio posts each message's status changes to (`StatusCallback`): Herald's
    /// `/api/v1/providers/twilio/status` as Twilio reaches it. Twilio signs its callbacks over
    /// this exact URL, and Herald checks the signature against it. None: no status callbacks.
    pub status_callback_url: Option<String>,
}

impl Default for SmsConfig {
    fn default() -> Self {
        Self {
            base_url: "https://api.twilio.com".into(),
            account_sid: String::new(),
            auth_token: String::new(),
            from: String::new(),
            timeout_ms: 10_000,
            status_callback_url: None,
        }
    }
}

impl std::fmt::Debug for SmsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmsConfig")
            .field("base_url", &self.base_url)
            .field("account_sid", &self.account_sid)
            .field("auth_token", &"<redacted>")
            .field("from", &self.from)
            .field("timeout_ms", &self.timeout_ms)
            .field("status_callback_url", &self.status_callback_url)
            .finish()
    }
}

impl SmsConfig {
    /// Refuses what [`SmsProvider::new`] refuses (a missing account, token or sender, a client
    /// that cannot be built), by building the provider and dropping it, so that a start refuses
    /// them before it connects to anything. Needs a process-wide rustls crypto provider
    /// installed.
    pub fn check(&self) -> Result<(), SmsConfigError> {
        SmsProvider::new(String::new(), self.clone()).map(drop)
    }

    /// Checks the settings themselves: the account, token and sender are set, the base URL and
    /// the status callback URL are usable.
    fn check_settings(&self) -> Result<(), SmsConfigError> {
        for (setting, value) in [
            ("account_sid", &self.account_sid),
            ("auth_token", &self.auth_token),
            ("from", &self.from),
        ] {
            if value.trim().is_empty() {
                return Err(SmsConfigError::Missing(setting));
            }
        }
        let callback = self.status_callback_url.as_ref();
        let urls = std::iter::once(("base_url", &self.base_url))
            .chain(callback.map(|url| ("status_callback_url", url)));
        for (setting, url) in urls {
            if let Some(reason) = http::base_url_problem(url) {
                return Err(SmsConfigError::Url {
                    setting,
                    url: url.clone(),
                    reason,
                });
            }
        }
        Ok(())
    }
}

/// Why an SMS provider could not be built from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum SmsConfigError {
    /// A required setting is empty.
    #[error("channels.sms.{0} is required")]
    Missing(&'static str),
    /// `base_url` or `status_callback_url` is not an `http(s)` URL with a host.
    #[error("channels.sms.{setting} {url:?} is not an http(s) URL: {reason}")]
    Url {
        /// The setting.
        setting: &'static str,
        /// The configured value.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The HTTP client could not be built.
    #[error("channels.sms: cannot build the HTTP client: {0}")]
    Client(String),
}

/// Sends SMS through a Twilio-compatible API.
pub struct SmsProvider {
    name: String,
    client: reqwest::Client,
    messages_url: String,
    account_sid: String,
    auth_token: String,
    from: String,
    status_callback_url: Option<String>,
}

impl std::fmt::Debug for SmsProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmsProvider")
            .field("name", &self.name)
            .field("messages_url", &self.messages_url)
            .finish_non_exhaustive()
    }
}

/// The created message (HTTP 201).
#[derive(Deserialize)]
struct CreatedMessage {
    sid: String,
}

/// Twilio error codes that refuse the account or its sender, not this message or this recipient:
/// every SMS fails alike until someone mends the account (credentials, funds, the From number),
/// so they are transient (retried, counted against the circuit so that it opens, dead-lettered
/// for a replay), not a recipient's failure for good. Decided by the code whatever HTTP status
/// comes with it. 10001 and 20005: the account is not active (out of funds, suspended, a trial
/// not activated); 20003: permission denied (wrong or revoked credentials, test credentials for
/// the live account, a suspended or closed account); 20008: test credentials; 20403: the account
/// may not use the API (suspended or closed); 21611: the From number's queue is full; 21212: the
/// From number is invalid; 21660: the From number is not the account's; 21661: the From number
/// cannot send SMS.
const ACCOUNT_PROBLEMS: [u32; 9] = [
    10001, 20003, 20005, 20008, 20403, 21611, 21212, 21660, 21661,
];

/// Twilio error codes for a From number that cannot send this message: 21606 (not a
/// message-capable Twilio number for this destination or account), 21659 (not a Twilio number,
/// or a short code's country mismatch). From a phone number (`+…`) every SMS fails alike: they
/// are the account's, as [`ACCOUNT_PROBLEMS`]. From a short code or an alphanumeric sender id
/// they also mean the destination's country cannot be reached from it: that recipient's failure,
/// permanent.
const FROM_PROBLEMS: [u32; 2] = [21606, 21659];

/// Twilio's error body: `{"code":21211,"message":"…","more_info":"…","status":400}`.
#[derive(Deserialize)]
struct ApiError {
    code: Option<u32>,
    message: Option<String>,
}

impl SmsProvider {
    /// Builds the provider. Needs a process-wide rustls crypto provider installed.
    pub fn new(name: String, config: SmsConfig) -> Result<Self, SmsConfigError> {
        config.check_settings()?;
        let client = http::build_client(http::client_builder(config.timeout_ms))
            .map_err(SmsConfigError::Client)?;
        let messages_url = format!(
            "{}/2010-04-01/Accounts/{}/Messages.json",
            config.base_url.trim_end_matches('/'),
            config.account_sid
        );
        Ok(Self {
            name,
            client,
            messages_url,
            account_sid: config.account_sid,
            auth_token: config.auth_token,
            from: config.from,
            status_callback_url: config.status_callback_url,
        })
    }

    async fn deliver(&self, message: &OutboundMessage) -> Result<Receipt, ProviderError> {
        let to = message
            .contacts
            .phone
            .as_deref()
            .ok_or(ProviderError::MissingContact(Channel::Sms))?;
        let body = text::cut(message.content.short_text(), MAX_BODY_CHARS, |_| 1);
        let callback = self.status_callback_url.as_deref().map(|url| {
            herald_nats::providers::twilio_status_callback_url(url, message.notification_id)
        });
        let mut form = vec![("To", to), ("From", self.from.as_str()), ("Body", &body)];
        if let Some(url) = &callback {
            form.push(("StatusCallback", url));
        }
        let request = self
            .client
            .post(&self.messages_url)
            .basic_auth(&self.account_sid, Some(&self.auth_token))
            .form(&form);
        let http::Reply {
            status,
            retry_after,
            bytes,
            body_lost,
        } = http::exchange(request).await?;
        if status.is_success() {
            let sid = http::accepted_id(&self.name, status, &bytes, |m: CreatedMessage| m.sid);
            return Ok(Receipt::new(sid));
        }
        let (reason, transient) = self.refusal(status, &bytes, body_lost);
        if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            // Twilio's 429 (error 20429) refuses the account's concurrent API requests, whatever
            // the recipient: every SMS waits out its Retry-After.
            return Err(ProviderError::account_throttled(reason, retry_after));
        }
        Err(http::failure(transient, reason, retry_after))
    }

    /// The reason of a refusal with `status` and `body`, and whether it is transient: a refusal
    /// of the account or its sender, or a status [`account_refused`] retries.
    fn refusal(&self, status: reqwest::StatusCode, body: &[u8], body_lost: bool) -> (String, bool) {
        match serde_json::from_slice::<ApiError>(body) {
            Ok(ApiError {
                code: Some(code),
                message,
            }) => {
                let reason = format!(
                    "SMS API error {code} (HTTP {}): {}",
                    status.as_u16(),
                    message.as_deref().unwrap_or("no message")
                );
                let transient = ACCOUNT_PROBLEMS.contains(&code)
                    || (FROM_PROBLEMS.contains(&code) && self.from.starts_with('+'))
                    || account_refused(status);
                (reason, transient)
            }
            _ => {
                let reason = format!(
                    "HTTP {status}: {}",
                    http::body_snippet(body, body_lost, 200)
                );
                (reason, account_refused(status))
            }
        }
    }
}

/// Whether a failed status is transient for the SMS API: [`http::is_transient_for_account`]
/// (a 401, a 408, 429 or 5xx), and a 403. Twilio answers 403 Forbidden for a request it does not
/// authorise (an account suspended or closed, test credentials, wrong credentials), not for a
/// message or a recipient, which it refuses with a 400: every SMS fails alike until the account
/// is mended.
fn account_refused(status: reqwest::StatusCode) -> bool {
    http::is_transient_for_account(status) || status == reqwest::StatusCode::FORBIDDEN
}

impl Provider for SmsProvider {
    fn channel(&self) -> Channel {
        Channel::Sms
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn send<'a>(
        &'a self,
        message: &'a OutboundMessage,
        _deadline: tokio::time::Instant,
    ) -> BoxFuture<'a, Result<Receipt, ProviderError>> {
        Box::pin(self.deliver(message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::provider::tests::SendNow;
    use crate::channel::provider::tests::outbound;
    use std::collections::HashMap;
    use std::time::Duration;
    use wiremock::matchers::{basic_auth, header, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    const SID: &str = "AC0123456789abcdef";
    const MESSAGES_PATH: &str = "/2010-04-01/Accounts/AC0123456789abcdef/Messages.json";

    fn provider(base_url: &str, timeout_ms: u64) -> SmsProvider {
        let _ = rustls::crypto::ring::default_provider().install_default();
        SmsProvider::new(
            "twilio".into(),
            SmsConfig {
                base_url: base_url.into(),
                account_sid: SID.into(),
                auth_token: "s3cret-auth-token".into(),
                from: "+15005550006".into(),
                timeout_ms,
                status_callback_url: None,
            },
        )
        .unwrap()
    }

    fn message(phone: Option<&str>) -> OutboundMessage {
        let mut message = outbound();
        message.contacts.phone = phone.map(str::to_string);
        message
    }

    async fn reply_with(template: ResponseTemplate) -> (MockServer, SmsProvider) {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path(MESSAGES_PATH))
            .respond_with(template)
            .expect(1)
            .mount(&server)
            .await;
        let provider = provider(&server.uri(), 2_000);
        (server, provider)
    }

    fn twilio_error(code: u32, message: &str, status: u16) -> serde_json::Value {
        serde_json::json!({
            "code": code,
            "message": message,
            "more_info": format!("https://www.twilio.com/docs/errors/{code}"),
            "status": status,
        })
    }

    #[tokio::test]
    async fn posts_a_form_with_basic_auth_and_returns_the_sid() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path(MESSAGES_PATH))
            .and(basic_auth(SID, "s3cret-auth-token"))
            .and(header("content-type", "application/x-www-form-urlencoded"))
            .respond_with(ResponseTemplate::new(201).set_body_json(serde_json::json!({
                "sid": "SM1234567890abcdef",
                "status": "queued",
                "to": "+14155552671",
            })))
            .expect(1)
            .mount(&server)
            .await;
        let receipt = provider(&server.uri(), 2_000)
            .send_now(&message(Some("+14155552671")))
            .await
            .unwrap();
        assert_eq!(
            receipt.provider_message_id.as_deref(),
            Some("SM1234567890abcdef")
        );
        let requests = server.received_requests().await.unwrap();
        let form: HashMap<String, String> = url::form_urlencoded::parse(&requests[0].body)
            .into_owned()
            .collect();
        assert_eq!(form["To"], "+14155552671");
        assert_eq!(form["From"], "+15005550006");
        assert_eq!(form["Body"], "Order #1001 shipped");
        assert_eq!(form.len(), 3);
    }

    /// With `status_callback_url` set, every message asks Twilio to report its status there,
    /// naming its notification.
    #[tokio::test]
    async fn a_configured_status_callback_goes_with_each_message() {
        let (server, mut provider) =
            reply_with(ResponseTemplate::new(201).set_body_json(serde_json::json!({"sid": "SM1"})))
                .await;
        let url = "https://herald.example.com/api/v1/providers/twilio/status";
        provider.status_callback_url = Some(url.into());
        let sms = message(Some("+14155552671"));
        provider.send_now(&sms).await.expect("sent");
        let requests = server.received_requests().await.expect("recorded");
        let form: HashMap<String, String> = url::form_urlencoded::parse(&requests[0].body)
            .into_owned()
            .collect();
        assert_eq!(
            form["StatusCallback"],
            format!("{url}?notification_id={}", sms.notification_id),
            "the callback names the notification, as it may come before the send is recorded"
        );
        assert_eq!(form.len(), 4, "{form:?}");
    }

    #[test]
    fn a_status_callback_url_must_be_an_http_url() {
        let config = SmsConfig {
            account_sid: SID.into(),
            auth_token: "s3cret-auth-token".into(),
            from: "+15005550006".into(),
            status_callback_url: Some("/api/v1/providers/twilio/status".into()),
            ..SmsConfig::default()
        };
        let error = config.check_settings().unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("channels.sms.status_callback_url \"/api/v1/providers/twilio/status\" is not an http(s) URL"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_long_text_goes_out_cut_to_twilios_limit() {
        let (server, provider) =
            reply_with(ResponseTemplate::new(201).set_body_json(serde_json::json!({"sid": "SM1"})))
                .await;
        let mut msg = message(Some("+4915112345678"));
        msg.content.short = Some("é".repeat(2_000));
        provider.send_now(&msg).await.expect("sent");
        let requests = server.received_requests().await.expect("recorded");
        let body = url::form_urlencoded::parse(&requests[0].body)
            .find(|(key, _)| key == "Body")
            .map(|(_, value)| value)
            .expect("Body");
        assert_eq!(body.chars().count(), MAX_BODY_CHARS);
        assert!(body.ends_with('…'), "cut");
    }

    #[tokio::test]
    async fn api_errors_are_permanent_with_the_code() {
        let (_server, provider) =
            reply_with(ResponseTemplate::new(400).set_body_json(twilio_error(
                21211,
                "The 'To' number +1555 is not a valid phone number.",
                400,
            )))
            .await;
        let error = provider
            .send_now(&message(Some("+1555")))
            .await
            .unwrap_err();
        assert!(
            matches!(&error, ProviderError::Permanent { reason, dead_contacts }
                if dead_contacts.is_empty() && reason.contains("21211") && reason.contains("not a valid phone number")),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn problems_of_the_sender_number_are_transient() {
        for (code, text) in [
            (
                21611,
                "This 'From' number has exceeded the maximum number of queued messages",
            ),
            (21212, "The 'From' number +1555 is not a valid phone number"),
            (21659, "The 'From' number is not a Twilio phone number"),
        ] {
            let (_server, provider) =
                reply_with(ResponseTemplate::new(400).set_body_json(twilio_error(code, text, 400)))
                    .await;
            let error = provider
                .send_now(&message(Some("+4915112345678")))
                .await
                .unwrap_err();
            assert!(
                matches!(&error, ProviderError::Transient { reason, .. }
                    if reason.contains(&code.to_string())),
                "every SMS fails alike, not this recipient's for good: {error:?}"
            );
        }
    }

    #[tokio::test]
    async fn refused_credentials_are_transient() {
        let (_server, provider) = reply_with(
            ResponseTemplate::new(401).set_body_json(twilio_error(20003, "Authenticate", 401)),
        )
        .await;
        let error = provider
            .send_now(&message(Some("+4915112345678")))
            .await
            .unwrap_err();
        assert!(
            matches!(&error, ProviderError::Transient { reason, .. } if reason.contains("20003")),
            "the account is refused, not the message: {error:?}"
        );
    }

    /// The error of one SMS, from `from`, answered with `status` and Twilio's error `code`.
    async fn refused_with(from: &str, status: u16, code: u32, text: &str) -> ProviderError {
        let (_server, mut provider) = reply_with(
            ResponseTemplate::new(status).set_body_json(twilio_error(code, text, status)),
        )
        .await;
        provider.from = from.into();
        provider
            .send_now(&message(Some("+4915112345678")))
            .await
            .unwrap_err()
    }

    /// Twilio's refusals of the account (its credentials, its standing, its From number) fail every
    /// SMS alike: transient, so that the circuit opens and the messages are retried, then
    /// dead-lettered for a replay, rather than each ending failed as if its number were wrong.
    #[tokio::test]
    async fn refusals_of_the_account_are_transient_whatever_the_status() {
        for (status, code, text) in [
            (403, 20003, "Permission Denied"),
            (
                403,
                20008,
                "Resource not accessible with Test Account Credentials",
            ),
            (403, 20403, "403 Forbidden"),
            (401, 20005, "Account not active"),
            (400, 20005, "Account not active"),
            (400, 10001, "Account is not active"),
            (
                400,
                21606,
                "The 'From' phone number provided is not a valid message-capable Twilio phone number for this destination/account",
            ),
            (
                400,
                21660,
                "Mismatch between the 'From' number and the account",
            ),
            (400, 21661, "'From' number is not SMS-capable"),
        ] {
            let error = refused_with("+15005550006", status, code, text).await;
            assert!(
                matches!(&error, ProviderError::Transient { reason, .. }
                    if reason.contains(&code.to_string()) && reason.contains(text)),
                "HTTP {status}, Twilio {code}: the account is refused, not the message: {error:?}"
            );
        }
    }

    /// A 403 whose body is not Twilio's (a proxy's page) refuses the request all the same.
    #[tokio::test]
    async fn a_forbidden_reply_without_a_twilio_code_is_transient() {
        let (_server, provider) =
            reply_with(ResponseTemplate::new(403).set_body_string("Forbidden")).await;
        let error = provider
            .send_now(&message(Some("+4915112345678")))
            .await
            .unwrap_err();
        assert!(
            matches!(&error, ProviderError::Transient { reason, .. }
                if reason.contains("403") && reason.contains("Forbidden")),
            "{error:?}"
        );
    }

    /// What Twilio refuses for this recipient or this message stays that recipient's failure:
    /// permanent, on to the next channel, not counted against the circuit.
    #[tokio::test]
    async fn refusals_of_the_recipient_stay_permanent() {
        for (from, code, text) in [
            (
                "+15005550006",
                21211,
                "The 'To' number is not a valid phone number",
            ),
            (
                "+15005550006",
                21610,
                "Attempt to send to unsubscribed recipient",
            ),
            (
                "+15005550006",
                21614,
                "'To' number is not a valid mobile number",
            ),
            // From a short code, 21606 and 21659 may mean the destination's country.
            (
                "12345",
                21606,
                "The 'From' phone number provided is not a valid message-capable Twilio phone number for this destination/account",
            ),
            (
                "12345",
                21659,
                "'From' is not a Twilio phone number or Short Code country mismatch",
            ),
            (
                "Herald",
                21659,
                "'From' is not a Twilio phone number or Short Code country mismatch",
            ),
        ] {
            let error = refused_with(from, 400, code, text).await;
            assert!(
                matches!(&error, ProviderError::Permanent { reason, dead_contacts }
                    if dead_contacts.is_empty() && reason.contains(&code.to_string())),
                "From {from}, Twilio {code}: this recipient's failure: {error:?}"
            );
        }
    }

    /// Twilio's 429 (20429) refuses the account's concurrent requests, whatever the recipient,
    /// and so does one whose body is not Twilio's.
    #[tokio::test]
    async fn too_many_requests_throttles_the_account_and_honours_retry_after() {
        for (reply, wait, said) in [
            (
                ResponseTemplate::new(429)
                    .insert_header("retry-after", "30")
                    .set_body_json(twilio_error(20429, "Too Many Requests", 429)),
                Some(Duration::from_secs(30)),
                "20429",
            ),
            (
                ResponseTemplate::new(429).set_body_string("slow down"),
                None,
                "slow down",
            ),
        ] {
            let (_server, provider) = reply_with(reply).await;
            let error = provider
                .send_now(&message(Some("+14155552671")))
                .await
                .unwrap_err();
            assert!(
                matches!(&error, ProviderError::AccountThrottled { reason, retry_after, .. }
                    if *retry_after == wait && reason.contains(said)),
                "{error:?}"
            );
        }
    }

    #[tokio::test]
    async fn server_errors_are_transient() {
        let (_server, provider) =
            reply_with(ResponseTemplate::new(503).set_body_string("upstream unavailable")).await;
        let error = provider
            .send_now(&message(Some("+14155552671")))
            .await
            .unwrap_err();
        assert!(
            matches!(&error, ProviderError::Transient { reason, retry_after: None, .. }
                if reason.contains("503") && reason.contains("upstream unavailable")),
            "{error:?}"
        );
    }

    /// An error reply whose body is lost midway is judged by its status, and its reason says the
    /// body was lost rather than trailing off (a Twilio code in it cannot be recovered).
    #[tokio::test]
    async fn an_error_reply_whose_body_is_lost_says_so() {
        for (head, transient) in [
            ("HTTP/1.1 400 Bad Request", false),
            ("HTTP/1.1 503 Service Unavailable", true),
        ] {
            let url = http::tests::cut_off_reply(head).await;
            let error = provider(&url, 2_000)
                .send_now(&message(Some("+14155552671")))
                .await
                .unwrap_err();
            assert_eq!(
                matches!(error, ProviderError::Transient { .. }),
                transient,
                "{error:?}"
            );
            assert!(
                error
                    .to_string()
                    .ends_with("(the reply's body was lost midway)"),
                "{error}"
            );
        }
    }

    #[tokio::test]
    async fn timeouts_are_transient() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(201).set_delay(Duration::from_secs(5)))
            .mount(&server)
            .await;
        let error = provider(&server.uri(), 100)
            .send_now(&message(Some("+14155552671")))
            .await
            .unwrap_err();
        assert!(
            matches!(&error, ProviderError::Transient { reason, .. } if reason.contains("timed out")),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn missing_phone_is_a_missing_contact() {
        let server = MockServer::start().await;
        let error = provider(&server.uri(), 2_000)
            .send_now(&message(None))
            .await
            .unwrap_err();
        assert_eq!(error, ProviderError::MissingContact(Channel::Sms));
        assert!(server.received_requests().await.unwrap().is_empty());
    }

    #[test]
    fn config_debug_redacts_the_token_and_required_settings_are_checked() {
        let config = SmsConfig {
            account_sid: SID.into(),
            auth_token: "s3cret-auth-token".into(),
            ..SmsConfig::default()
        };
        assert!(!format!("{config:?}").contains("s3cret"));
        assert!(matches!(
            SmsProvider::new("twilio".into(), config),
            Err(SmsConfigError::Missing("from"))
        ));
    }
}
