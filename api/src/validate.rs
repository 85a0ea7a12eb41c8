//! Field checks shared by the endpoints: contacts (email, phone, Telegram, push tokens, webhook
//! URL), external ids, locales and time zones. Each failure is a 400 naming the field.

use herald_entities::repo::customers::WebhookSecretChange;
use herald_nats::Contacts;

use crate::ApiError;

/// Longest external id (customer id, order number) accepted: the events' limit, so that every id
/// the API stores can be named by an event.
pub use herald_nats::events::MAX_EXTERNAL_ID;
/// Most push tokens per recipient.
const MAX_PUSH_TOKENS: usize = 20;
/// Longest push token, webhook URL or Telegram chat id. A recipient without a customer id is
/// keyed by its first contact, and PostgreSQL must fit the key in an index entry (2,704 bytes).
const MAX_CONTACT: usize = 2048;

/// Contacts as they arrive in a request, before trimming and checking.
#[derive(Debug, Clone, Copy)]
pub struct RawContacts<'a> {
    /// Email address.
    pub email: &'a Option<String>,
    /// Phone number.
    pub phone: &'a Option<String>,
    /// Telegram chat id.
    pub telegram_chat_id: &'a Option<String>,
    /// Push device tokens.
    pub push_tokens: &'a [String],
    /// Webhook URL.
    pub webhook_url: &'a Option<String>,
}

/// Trims and checks contacts; blank values count as absent, and none may hold a control character.
/// `prefix` is prepended to the field names in errors (`recipient.` gives `recipient.email`).
pub fn contacts(prefix: &str, raw: RawContacts<'_>) -> Result<Contacts, ApiError> {
    let field = |name: &str| format!("{prefix}{name}");
    let email = trimmed(raw.email);
    if let Some(email) = &email
        && (email.len() > 254 || !looks_like_email(email))
    {
        return Err(ApiError::invalid(&field("email"), "not an email address"));
    }
    let phone = trimmed(raw.phone);
    if let Some(phone) = &phone
        && !is_e164(phone)
    {
        return Err(ApiError::invalid(
            &field("phone"),
            "phone must be in E.164 form, e.g. +4915112345678",
        ));
    }
    let webhook_url = trimmed(raw.webhook_url);
    if let Some(url) = &webhook_url {
        plain_text(&field("webhook_url"), url)?;
        webhook_url_shape(&field("webhook_url"), url)?;
    }
    let telegram_chat_id = trimmed(raw.telegram_chat_id);
    if telegram_chat_id
        .as_ref()
        .is_some_and(|id| id.len() > MAX_CONTACT)
    {
        return Err(ApiError::invalid(
            &field("telegram_chat_id"),
            format!("telegram_chat_id must be at most {MAX_CONTACT} characters"),
        ));
    }
    if let Some(id) = &telegram_chat_id {
        plain_text(&field("telegram_chat_id"), id)?;
    }
    let push_tokens: Vec<String> = raw
        .push_tokens
        .iter()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect();
    if push_tokens.len() > MAX_PUSH_TOKENS || push_tokens.iter().any(|t| t.len() > MAX_CONTACT) {
        return Err(ApiError::invalid(
            &field("push_tokens"),
            format!("at most {MAX_PUSH_TOKENS} push tokens of at most {MAX_CONTACT} characters"),
        ));
    }
    for token in &push_tokens {
        plain_text(&field("push_tokens"), token)?;
    }
    Ok(Contacts {
        email,
        phone,
        telegram_chat_id,
        push_tokens,
        webhook_url,
    })
}

/// Checks a customer's own webhook signing secret as the webhook provider checks
/// `channels.webhook.secret` ([`herald_nats::webhook_secret`]): `whsec_` followed by the base64
/// of a key of at least 24 bytes. An absent one keeps the stored secret
/// ([`WebhookSecretChange::Keep`]), a blank one removes it. The message never repeats the value
/// (nor the base64 decoder's account of it).
pub fn webhook_secret(field: &str, raw: &Option<String>) -> Result<WebhookSecretChange, ApiError> {
    use herald_nats::webhook_secret::{self, SecretError};
    let Some(raw) = raw else {
        return Ok(WebhookSecretChange::Keep);
    };
    let secret = raw.trim();
    if secret.is_empty() {
        return Ok(WebhookSecretChange::Remove);
    }
    match webhook_secret::decode(secret) {
        Ok(_) => Ok(WebhookSecretChange::Set(secret.to_string())),
        Err(err @ SecretError::TooShort(_)) => {
            Err(ApiError::invalid(field, format!("{field} {err}")))
        }
        Err(SecretError::Prefix | SecretError::Encoding(_)) => Err(ApiError::invalid(
            field,
            format!("{field} must be \"whsec_\" followed by a base64 key"),
        )),
    }
}

/// Refuses a webhook URL the webhook provider could never send to: longer than
/// [`MAX_CONTACT`] bytes, not parsed by the URL parser the provider uses, not `http`/`https`, or
/// without a host. Whether the host is internal is [`webhook_target`]'s question.
fn webhook_url_shape(field: &str, url: &str) -> Result<(), ApiError> {
    let refuse = |why: String| {
        Err(ApiError::invalid(
            field,
            format!(
                "webhook_url must be an http(s) URL with a host, of at most {MAX_CONTACT} \
                 characters: {why}"
            ),
        ))
    };
    if url.len() > MAX_CONTACT {
        return refuse(format!("it is {} characters long", url.len()));
    }
    let parsed = match url::Url::parse(url) {
        Ok(parsed) => parsed,
        Err(e) => return refuse(e.to_string()),
    };
    if !matches!(parsed.scheme(), "http" | "https") {
        return refuse(format!("the scheme is {:?}", parsed.scheme()));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return refuse("it has no host".into());
    }
    Ok(())
}

/// Refuses a webhook URL (in `contacts`, already shaped by [`contacts`]) whose host is an internal
/// IP address (as [`herald_nats::net::is_internal`] decides, the webhook provider's test), unless
/// `allow_private` (the webhook provider's `allow_private_targets`): the
/// provider would refuse to send to it. A host name (`localhost` too) is not resolved here: the
/// provider refuses one that resolves only to internal addresses when it sends.
pub fn webhook_target(
    field: &str,
    contacts: &Contacts,
    allow_private: bool,
) -> Result<(), ApiError> {
    let Some(url) = contacts.webhook_url.as_deref() else {
        return Ok(());
    };
    if allow_private {
        return Ok(());
    }
    let internal = match url::Url::parse(url)
        .ok()
        .and_then(|u| u.host().map(|h| h.to_owned()))
    {
        Some(url::Host::Ipv4(ip)) => herald_nats::net::is_internal(ip.into()),
        Some(url::Host::Ipv6(ip)) => herald_nats::net::is_internal(ip.into()),
        Some(url::Host::Domain(_)) | None => false,
    };
    if internal {
        return Err(ApiError::invalid(
            field,
            "webhook_url names an internal address (loopback, private, link-local or the like), \
             which the webhook provider refuses to send to; set \
             channels.webhook.allow_private_targets to allow it",
        ));
    }
    Ok(())
}

fn trimmed(value: &Option<String>) -> Option<String> {
    value
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// Whether `s` is an email address the email provider can send to: a bare address
/// (`local@domain.tld`, no spaces, no display name) that lettre, which the provider sends with,
/// reads as one (so `a@@example.com` or `a..b@example.com` are refused here, not failed at
/// delivery).
pub fn looks_like_email(s: &str) -> bool {
    let shaped = match s.rsplit_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !s.chars().any(|c| c.is_whitespace() || c.is_control())
        }
        None => false,
    };
    shaped && s.parse::<lettre::Address>().is_ok()
}

/// Whether `s` is a phone number in E.164 form (`+` and 8 to 15 digits).
pub fn is_e164(s: &str) -> bool {
    let digits = s.strip_prefix('+').unwrap_or("");
    (8..=15).contains(&digits.len()) && digits.chars().all(|c| c.is_ascii_digit())
}

/// An external id (customer id, order number): 1 to [`MAX_EXTERNAL_ID`] visible characters,
/// without `/` (it is a path segment).
pub fn external_id(field: &str, value: &str) -> Result<String, ApiError> {
    let value = value.trim();
    if value.is_empty()
        || value.chars().count() > MAX_EXTERNAL_ID
        || value.chars().any(|c| c.is_control() || c == '/')
    {
        return Err(ApiError::invalid(
            field,
            format!("{field} must be 1 to {MAX_EXTERNAL_ID} characters, without '/'"),
        ));
    }
    Ok(value.to_string())
}

/// Refuses control characters (NUL among them, which PostgreSQL cannot store or compare) in a
/// plain-text value: an id, a code, a name, a contact, a one-line text.
pub fn plain_text(field: &str, value: &str) -> Result<(), ApiError> {
    if value.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            field,
            format!("{field} must not contain control characters"),
        ));
    }
    Ok(())
}

/// A BCP 47 language tag such as `en`, `de-DE` or `zh-Hant-TW` (shape only).
pub fn locale(field: &str, value: &str) -> Result<String, ApiError> {
    let mut parts = value.split('-');
    let language = parts.next().unwrap_or_default();
    let language_ok =
        (2..=3).contains(&language.len()) && language.chars().all(|c| c.is_ascii_alphabetic());
    let rest_ok =
        parts.all(|p| (1..=8).contains(&p.len()) && p.chars().all(|c| c.is_ascii_alphanumeric()));
    if !language_ok || !rest_ok || value.len() > 35 {
        return Err(ApiError::invalid(
            field,
            "locale must be a language tag such as en or de-DE",
        ));
    }
    Ok(value.to_string())
}

/// An IANA time zone name known to this build, e.g. `Europe/Berlin`.
pub fn timezone(field: &str, value: &str) -> Result<String, ApiError> {
    match value.parse::<chrono_tz::Tz>() {
        Ok(tz) => Ok(tz.name().to_string()),
        Err(_) => Err(ApiError::invalid(
            field,
            format!("unknown time zone {value:?}; use an IANA name such as Europe/Berlin"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(err: ApiError) -> Option<String> {
        match err {
            ApiError::BadRequest(body) => body.0.field,
            _ => None,
        }
    }

    #[test]
    fn email_and_phone_checks() {
        assert!(looks_like_email("ada@example.com"));
        assert!(!looks_like_email("ada@example"));
        assert!(!looks_like_email("@example.com"));
        assert!(!looks_like_email("a da@example.com"));
        assert!(!looks_like_email("a@@example.com"));
        assert!(!looks_like_email("a..b@example.com"));
        assert!(!looks_like_email("a@b..com"));
        assert!(looks_like_email("jürgen@bücher.de"));
        assert!(is_e164("+4915112345678"));
        assert!(!is_e164("015112345678"));
        assert!(!is_e164("+49 151 1234"));
    }

    #[test]
    fn contact_errors_name_the_prefixed_field() {
        let bad = Some("+49 nope".to_string());
        let none = None;
        let raw = RawContacts {
            email: &none,
            phone: &bad,
            telegram_chat_id: &none,
            push_tokens: &[],
            webhook_url: &none,
        };
        assert_eq!(
            field_of(contacts("", raw).unwrap_err()).as_deref(),
            Some("phone")
        );
        assert_eq!(
            field_of(contacts("recipient.", raw).unwrap_err()).as_deref(),
            Some("recipient.phone")
        );
    }

    #[test]
    fn control_characters_are_refused() {
        assert!(plain_text("customer_id", "c-1").is_ok());
        assert!(plain_text("customer_id", "c\0").is_err());
        assert!(plain_text("customer_id", "a\nb").is_err());
        assert!(plain_text("name", "Ada\tLovelace").is_err());
    }

    #[test]
    fn locales_time_zones_and_ids() {
        assert!(locale("locale", "de-DE").is_ok());
        assert!(locale("locale", "en").is_ok());
        assert!(locale("locale", "zh-Hant-TW").is_ok());
        assert!(locale("locale", "").is_err());
        assert!(locale("locale", "de_DE").is_err());
        assert!(locale("locale", "deutsch").is_err());
        assert_eq!(timezone("tz", "Europe/Berlin").unwrap(), "Europe/Berlin");
        assert_eq!(
            field_of(timezone("timezone", "Mars/Olympus").unwrap_err()).as_deref(),
            Some("timezone")
        );
        assert_eq!(external_id("id", " c-1 ").unwrap(), "c-1");
        assert!(external_id("id", "a/b").is_err());
        assert!(external_id("id", &"x".repeat(201)).is_err());
        // Characters, not bytes, as the event schemas count them.
        assert!(external_id("id", &"é".repeat(200)).is_ok());
        assert!(external_id("id", &"é".repeat(201)).is_err());
    }
}
