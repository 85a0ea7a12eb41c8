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
