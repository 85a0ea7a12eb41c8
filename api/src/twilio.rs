//! `/api/v1/providers/twilio/status`: Twilio's message status callbacks.
//!
//! With `channels.sms.status_callback_url` set, every SMS asks Twilio to post the message's
//! status changes there (`StatusCallback`). Twilio posts a form
//! (`application/x-www-form-urlencoded`: `MessageSid`, `MessageStatus`, `ErrorCode`,
//! `AccountSid` and more, a set Twilio extends without notice), signed in `X-Twilio-Signature`:
//! the base64 HMAC-SHA1, keyed by the account's auth token, of the URL it posted to followed by
//! every POST parameter sorted by name, each name then its value, without separators. Herald
//! checks the signature against the configured URL, which is what Twilio signed whatever a
//! reverse proxy makes of the request, and refuses a request it does not sign with 403.
//!
//! `delivered` is a `delivered` receipt, `undelivered` and `failed` a `failed` one with Twilio's
//! error code; every other status (`queued`, `sending`, `sent`, …) is acknowledged and ignored.
//! Herald gives Twilio each message's callback URL with the notification's id in its query
//! (`?notification_id=…`, see [`herald_nats::providers::twilio_status_callback_url`]), which
//! Twilio's signature covers: a receipt names the notification by it, and applies as a receipt
//! on `/api/v1/providers/twilio/callbacks` naming it by `notification_id` does (see
//! [`crate::receipts`]): the same transition rules, status event, repeats, holds and refusals.
//! That is what lets a callback that beats Herald's record of the send be held rather than
//! refused: `MessageSid`, the id Twilio returned, is stored only with that record. A callback
//! without it (for a message sent before Herald named the notification there) names the message
//! by `MessageSid`, as `provider_message_id`.

use std::borrow::Cow;

use base64::{Engine as _, engine::general_purpose::STANDARD};
use chrono::Utc;
use herald_nats::providers::twilio_status_callback_url;
use hmac::{Hmac, Mac};
use poem_openapi::{
    ApiResponse, Object, OpenApi,
    param::{Header, Query},
    payload::{Form, Json},
    registry::{MetaSchemaRef, Registry},
    types::Type,
};
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use sha1::Sha1;
use uuid::Uuid;

use crate::receipts::{self, Outcome, ReceiptEvent, ReceiptResult, ReceiptTags};
use crate::{ApiError, AppState, validate::plain_text};

/// The SMS provider's name, which recorded the attempts.
const PROVIDER: &str = herald_nats::providers::TWILIO;

/// What checks Twilio's status callbacks: the URL they are posted to and the auth token that
/// signs them.
pub struct StatusCallbacks {
    url: String,
    auth_token: String,
}

impl std::fmt::Debug for StatusCallbacks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusCallbacks")
            .field("url", &self.url)
            .field("auth_token", &"<redacted>")
            .finish()
    }
}

impl StatusCallbacks {
    /// Callbacks posted to `url` (`channels.sms.status_callback_url`, exactly as Twilio was
    /// given it) signed with `auth_token` (`channels.sms.auth_token`).
    pub fn new(url: String, auth_token: String) -> Self {
        Self { url, auth_token }
    }

    /// The URL Twilio posts the callbacks to.
    pub fn url(&self) -> &str {
        &self.url
    }
}

/// Whether `signature` (an `X-Twilio-Signature`) is Twilio's signature, keyed by `auth_token`, of
/// `params` posted to `url`. The digests are compared in constant time.
fn signed(auth_token: &str, url: &str, params: &[(String, String)], signature: &str) -> bool {
    match STANDARD.decode(signature.trim()) {
        Ok(given) => mac(auth_token, url, params).verify_slice(&given).is_ok(),
        Err(_) => false,
    }
}

/// The HMAC-SHA1 over `url` followed by `params` sorted by name (then value, for a repeated
/// name), each name then its value, without separators.
fn mac(auth_token: &str, url: &str, params: &[(String, String)]) -> Hmac<Sha1> {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    let mut mac =
        Hmac::<Sha1>::new_from_slice(auth_token.as_bytes()).expect("HMAC accepts any key length");
    mac.update(url.as_bytes());
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    for (name, value) in sorted {
        mac.update(name.as_bytes());
        mac.update(value.as_bytes());
    }
    mac
}

/// The parameters of Twilio's status callback Herald reads. Twilio sends more (`To`, `From`,
/// `SmsSid`, `SmsStatus`, `ApiVersion`, …, and adds some without notice); the signature covers
/// them all, and Herald ignores them otherwise.
#[derive(Object)]
#[oai(rename = "TwilioStatusCallback", rename_all = "PascalCase")]
struct StatusCallbackSchema {
    /// The message's SID, as Twilio returned it when Herald sent it.
    message_sid: String,
    /// The message's status: `delivered`, `undelivered` and `failed` are recorded, every other
    /// (`queued`, `sending`, `sent`, …) is acknowledged and ignored.
    message_status: String,
    /// Twilio's error code, for `undelivered` and `failed`.
    error_code: Option<String>,
    /// The account the message was sent from.
    account_sid: Option<String>,
}

/// Every parameter of a callback's form, in the order sent: the signature covers them all,
/// those Herald does not read too. Documented as `StatusCallbackSchema`.
pub struct StatusForm(Vec<(String, String)>);

impl StatusForm {
    /// The value of parameter `name`; its first, if repeated.
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// The value of required parameter `name`, non-empty. (`str::is_empty` by name: poem-openapi's
    /// `Type::is_empty`, in scope here, is `false` for any `&str`.)
    fn required(&self, name: &str) -> Result<&str, ApiError> {
        self.get(name)
            .filter(|value| !str::is_empty(value))
            .ok_or_else(|| ApiError::invalid(name, format!("{name} is required")))
    }
}

impl<'de> Deserialize<'de> for StatusForm {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Pairs;
        impl<'de> Visitor<'de> for Pairs {
            type Value = StatusForm;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("form parameters")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StatusForm, A::Error> {
                let mut pairs = Vec::new();
                while let Some(pair) = map.next_entry::<String, String>()? {
                    pairs.push(pair);
                }
                Ok(StatusForm(pairs))
            }
        }
        deserializer.deserialize_map(Pairs)
    }
}

impl Type for StatusForm {
    const IS_REQUIRED: bool = true;
    type RawValueType = Self;
    type RawElementValueType = Self;

    fn name() -> Cow<'static, str> {
        StatusCallbackSchema::name()
    }

    fn schema_ref() -> MetaSchemaRef {
        StatusCallbackSchema::schema_ref()
    }

    fn register(registry: &mut Registry) {
        StatusCallbackSchema::register(registry);
    }

    fn as_raw_value(&self) -> Option<&Self> {
        Some(self)
    }

    fn raw_element_iter<'a>(&'a self) -> Box<dyn Iterator<Item = &'a Self> + 'a> {
        Box::new(std::iter::once(self))
    }
}

/// What Herald made of a status callback.
#[derive(Debug, Clone, Object)]
pub struct StatusCallbackResult {
    /// The receipt's result, for a status Herald records (`delivered`, `undelivered`,
    /// `failed`); absent for one it ignores.
    pub receipt: Option<ReceiptResult>,
}

/// The answer to a status callback.
#[derive(ApiResponse)]
pub enum StatusCallbackResponse {
    /// Applied, a repeat, or a status Herald does not record.
    #[oai(status = 200)]
    Done(Json<StatusCallbackResult>),
    /// The receipt is held until Herald records the send, then applied (`held: true`).
    #[oai(status = 202)]
    Held(Json<StatusCallbackResult>),
}

/// The receipt a Twilio message status makes, with its error text; `None` for a status that is
/// not an outcome.
fn receipt_of(status: &str, error_code: Option<&str>) -> Option<(ReceiptEvent, Option<String>)> {
    match status {
        "delivered" => Some((ReceiptEvent::Delivered, None)),
        "undelivered" | "failed" => {
            let error = match error_code.filter(|code| !str::is_empty(code)) {
                Some(code) => format!("{status}: Twilio error {code}"),
                None => status.to_string(),
            };
            Some((ReceiptEvent::Failed, Some(receipts::one_line(&error))))
        }
        _ => None,
    }
}

/// Twilio's status callback endpoint.
pub struct TwilioApi {
    state: AppState,
}

impl TwilioApi {
    /// The endpoint over the shared state.
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

#[OpenApi(prefix_path = "/api/v1", tag = "ReceiptTags::Receipts")]
impl TwilioApi {
    /// Twilio's message status callback (signed by Twilio; no API key).
    ///
    /// Twilio posts here, as a form, each status change of a message sent with
    /// `channels.sms.status_callback_url` set. `X-Twilio-Signature` must sign the request as
    /// posted to that URL with the account's auth token (HMAC-SHA1 over the URL and the sorted
    /// parameters, base64).
    ///
    /// `delivered` moves a `sent` notification to `delivered`; `undelivered` and `failed` move
    /// it to `failed` with Twilio's error code; any other status answers 200 without a receipt.
    /// A receipt applies as one on `/api/v1/providers/twilio/callbacks` naming the notification
    /// by `notification_id` does, given in the query of the URL Herald gave Twilio (or, without
    /// it, naming `MessageSid` as `provider_message_id`): a repeat answers 200 with `applied:
    /// false`; one for a notification whose send is under way or not yet recorded is held and
    /// answered 202 (applied when the send is recorded); the same 404 and 409 refusals apply,
    /// nothing changed.
    ///
    /// 403 `forbidden`: the signature is missing or does not sign the request.
    ///
    /// 404 `not_found`: no SMS provider is configured, status callbacks are off (no
    /// `channels.sms.status_callback_url`), no notification `notification_id`, or (without it)
    /// none was sent as `MessageSid`.
    #[oai(path = "/providers/twilio/status", method = "post")]
    async fn status(
        &self,
        /// Twilio's signature of the request.
        #[oai(name = "X-Twilio-Signature")]
        signature: Header<Option<String>>,
        /// The notification, as Herald named it in the callback URL it gave Twilio.
        notification_id: Query<Option<Uuid>>,
        body: Form<StatusForm>,
    ) -> Result<StatusCallbackResponse, ApiError> {
        let Some(&channel) = self.state.providers.get(PROVIDER) else {
            return Err(ApiError::not_found("no SMS provider is configured"));
        };
        let Some(callbacks) = &self.state.twilio_status else {
            return Err(ApiError::not_found(
                "Twilio status callbacks are off: set channels.sms.status_callback_url",
            ));
        };
        let form = body.0;
        let url = match notification_id.0 {
            Some(id) => Cow::Owned(twilio_status_callback_url(&callbacks.url, id)),
            None => Cow::Borrowed(callbacks.url.as_str()),
        };
        let genuine = signature
            .0
            .as_deref()
            .is_some_and(|signature| signed(&callbacks.auth_token, &url, &form.0, signature));
        if !genuine {
            return Err(ApiError::forbidden(
                "X-Twilio-Signature does not sign this request with the auth token for \
                 channels.sms.status_callback_url",
            ));
        }
        let message_sid = form.required("MessageSid")?;
        plain_text("MessageSid", message_sid)?;
        let status = form.required("MessageStatus")?;
        let Some((event, error)) = receipt_of(status, form.get("ErrorCode")) else {
            return Ok(StatusCallbackResponse::Done(Json(StatusCallbackResult {
                receipt: None,
            })));
        };
        let id = match notification_id.0 {
            Some(id) => id,
            None => receipts::sent_as(&self.state, PROVIDER, message_sid).await?,
        };
        let outcome = Outcome {
            event,
            at: Utc::now(),
            error: error.as_deref(),
        };
        let receipt = receipts::apply(&self.state, PROVIDER, channel, id, outcome).await?;
        let held = receipt.held;
        let result = Json(StatusCallbackResult {
            receipt: Some(receipt),
        });
        Ok(match held {
            true => StatusCallbackResponse::Held(result),
            false => StatusCallbackResponse::Done(result),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(params: &[(&str, &str)]) -> Vec<(String, String)> {
        params
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect()
    }

    /// Twilio's documented example (docs/usage/security, "Validating requests"), whose
    /// parameters are given unsorted here.
    #[test]
    fn twilios_documented_example_is_signed() {
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
        let params = pairs(&[
            ("CallSid", "CA1234567890ABCDE"),
            ("From", "+12349013030"),
            ("To", "+18005551212"),
            ("Caller", "+12349013030"),
            ("Digits", "1234"),
        ]);
        let signature = "0/KCTR6DLpKmkAf8muzZqo1nDgQ=";
        assert!(signed("12345", url, &params, signature));
        assert!(!signed("54321", url, &params, signature), "another token");
        assert!(
            !signed(
                "12345",
                "https://mycompany.com/myapp.php",
                &params,
                signature
            ),
            "another URL"
        );
        let mut changed = params.clone();
        changed[2].1 = "+18005551213".into();
        assert!(!signed("12345", url, &changed, signature), "another value");
        assert!(!signed("12345", url, &params, "not base64!"));
        assert!(!signed("12345", url, &params, ""));
    }

    #[test]
    fn outcomes_are_receipts_and_other_statuses_none() {
        assert_eq!(
            receipt_of("delivered", None),
            Some((ReceiptEvent::Delivered, None))
        );
        assert_eq!(
            receipt_of("undelivered", Some("30003")),
            Some((
                ReceiptEvent::Failed,
                Some("undelivered: Twilio error 30003".into())
            ))
        );
        assert_eq!(
            receipt_of("failed", Some("")),
            Some((ReceiptEvent::Failed, Some("failed".into())))
        );
        for status in ["queued", "sending", "sent", "accepted", "read", "canceled"] {
            assert_eq!(receipt_of(status, None), None, "{status}");
        }
    }
}
