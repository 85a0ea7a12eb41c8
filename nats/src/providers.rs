//! The providers' names: what the engine calls each configured provider, what its delivery
//! attempts, dead letters (`Herald-Providers`) and receipts (`/api/v1/providers/{provider}/…`)
//! name, and what a `callbacks` key can be bound to.

/// Email over SMTP.
pub const SMTP: &str = "smtp";
/// Email written to the local outbox directory (no relay configured).
pub const OUTBOX: &str = "outbox";
/// The Telegram Bot API.
pub const TELEGRAM: &str = "telegram";
/// SMS over Twilio's Messages API.
pub const TWILIO: &str = "twilio";
/// Push over Firebase Cloud Messaging.
pub const FCM: &str = "fcm";
/// Signed webhooks.
pub const WEBHOOK: &str = "webhook";

/// Every provider's name.
pub const ALL: [&str; 6] = [SMTP, OUTBOX, TELEGRAM, TWILIO, FCM, WEBHOOK];

/// The query parameter of a Twilio status callback URL that names Herald's notification.
pub const TWILIO_NOTIFICATION_PARAM: &str = "notification_id";

/// The status callback URL Herald gives Twilio for notification `id`: `url` (the configured
/// `channels.sms.status_callback_url`) with `notification_id=<id>` added to its query, before
/// any fragment. Twilio posts the message's status changes there and signs them over this URL,
/// so a callback names Herald's notification even when it beats the record of the send, when
/// Twilio's `MessageSid` is not stored yet; Herald rebuilds the URL with this function to check
/// the signature.
pub fn twilio_status_callback_url(url: &str, id: uuid::Uuid) -> String {
    let (base, fragment) = match url.split_once('#') {
        Some((base, fragment)) => (base, Some(fragment)),
        None => (url, None),
    };
    let separator = match base.split_once('?') {
        None => "?",
        Some((_, "")) => "",
        Some((_, query)) if query.ends_with('&') => "",
        Some(_) => "&",
    };
    let mut with_id = format!("{base}{separator}{TWILIO_NOTIFICATION_PARAM}={id}");
    if let Some(fragment) = fragment {
        with_id.push('#');
        with_id.push_str(fragment);
    }
    with_id
}

#[cfg(test)]
mod tests {
    use super::twilio_status_callback_url;

    #[test]
    fn a_twilio_status_callback_url_names_the_notification_in_its_query() {
        let id = uuid::Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0001);
        let named = |url| twilio_status_callback_url(url, id);
        assert_eq!(
            named("https://h.example/api/v1/providers/twilio/status"),
            format!("https://h.example/api/v1/providers/twilio/status?notification_id={id}")
        );
        assert_eq!(
            named("https://h.example/status?tenant=a"),
            format!("https://h.example/status?tenant=a&notification_id={id}")
        );
        assert_eq!(
            named("https://h.example/status?"),
            format!("https://h.example/status?notification_id={id}")
        );
        assert_eq!(
            named("https://h.example/status#rc=3&rp=all"),
            format!("https://h.example/status?notification_id={id}#rc=3&rp=all"),
            "Twilio's connection overrides stay the fragment"
        );
    }
}
