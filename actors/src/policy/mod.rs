//! The recipient's wishes and limits, applied by the Dispatcher before it walks the chain:
//! preferences (opt-outs), quiet hours, and the per-user rate limit.
//!
//! The decisions themselves are pure ([`preferences`], [`quiet_hours`], [`token_bucket`]); this
//! module combines them, over the recipient's stored wishes, into a [`Gate`].

pub mod preferences;
pub mod quiet_hours;
pub mod token_bucket;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use herald_nats::{Category, Channel, SendCommand};

use crate::lookup::{ContactHolder, Recipient};
use crate::rate_limit::{CategoryLimit, Verdict, actor::Acquire, supervisor};
use crate::slot::ActorSlot;
use preferences::{PreferenceSet, is_critical};
use quiet_hours::QuietHours;

/// How long [`gate`] holds a notification back when the rate limiter did not answer in time.
/// Its other holds last until quiet hours or a rate limit end, 50 ms at least.
pub const UNANSWERED_LIMITER_HOLD: Duration = Duration::from_secs(1);

/// The wall clock; injectable so tests can stand anywhere in time.
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(Utc::now)
}

/// What the policy needs.
pub struct PolicyContext {
    /// The rate limiter registry.
    pub rate_limiter: ActorSlot<supervisor::RateLimiterSupervisorMsg>,
    /// Limits by category (to word the reasons).
    pub limits: Arc<HashMap<Category, CategoryLimit>>,
    /// How long to wait for the rate limiter.
    pub ask_timeout: Duration,
    /// Wall clock (quiet hours).
    pub clock: Clock,
}

/// What to do with a notification before walking its chain.
#[derive(Debug, Clone, PartialEq)]
pub enum Gate {
    /// Walk the chain, skipping the channels opted out of.
    Go {
        /// Channels of the chain the customer opted out of.
        opted_out: Vec<Channel>,
    },
    /// Do not send: status `skipped` with the reason.
    Skip {
        /// Why, in words (starts with `opted_out` or `rate_limited`).
        reason: String,
        /// Channels opted out of (recorded as attempts).
        opted_out: Vec<Channel>,
    },
    /// Not now: held back this long, the notification `processing` (its command NAKed with the
    /// delay) or, for a long hold, `scheduled` until it ends; with the reason.
    Defer {
        /// How long to hold it.
        delay: Duration,
        /// Why, in words (starts with `deferred:`).
        reason: String,
    },
}

/// Applies preferences, quiet hours and the rate limit, in that order (so a notification held
/// by quiet hours does not spend a token), given what is stored about the recipient.
///
/// `passed_before`: a round of the notification's chain was walked since it was queued (or
/// replayed), so the gate let it through then, rate limit included. The rate limiter then allows
/// it again without asking for a new token, even after the limiter that allowed it is gone
/// ([`Acquire::allowed_before`]).
pub async fn gate(
    ctx: &PolicyContext,
    recipient: &Recipient,
    command: &SendCommand,
    passed_before: bool,
) -> Gate {
    let opted_out = PreferenceSet::from_rows(&recipient.wishes.preferences)
        .opted_out(command.category, &command.channels);
    decide(ctx, opted_out, Some(recipient), command, passed_before).await
}

/// [`gate`] for a send that names no customer, only contacts: given the customers with stored
/// wishes who hold those contacts. A channel is opted out of when any customer holding the
/// send's contact on it opted out of it; quiet hours are applied when exactly one of the
/// customers set them (with several, whose night it is cannot be told, and none are).
pub async fn gate_contacts(
    ctx: &PolicyContext,
    holders: &[ContactHolder],
    command: &SendCommand,
    passed_before: bool,
) -> Gate {
    let opted_out = command
        .channels
        .iter()
        .copied()
        .filter(|&channel| {
            holders.iter().any(|holder| {
                holder.holds(channel)
                    && !PreferenceSet::from_rows(&holder.recipient.wishes.preferences)
                        .allows(command.category, channel)
            })
        })
        .collect();
    let mut quiet = holders
        .iter()
        .filter(|holder| holder.recipient.wishes.quiet_hours.is_some());
    let quiet = match (quiet.next(), quiet.next()) {
        (Some(only), None) => Some(&only.recipient),
        _ => None,
    };
    decide(ctx, opted_out, quiet, command, passed_before).await
}

/// The gate once the channels opted out of are known: all of the chain ⇒ skipped; then the
/// quiet hours of `quiet` (the recipient whose night it is, if any); then the rate limit.
async fn decide(
    ctx: &PolicyContext,
    opted_out: Vec<Channel>,
    quiet: Option<&Recipient>,
    command: &SendCommand,
    passed_before: bool,
) -> Gate {
    let critical = is_critical(command.category);
    if !command.channels.is_empty() && opted_out.len() == command.channels.len() {
        let names: Vec<&str> = opted_out.iter().map(|c| c.as_str()).collect();
        return Gate::Skip {
            reason: format!(
                "opted_out: the customer opted out of {} on every channel of the chain ({})",
                command.category.as_str(),
                names.join(", ")
            ),
            opted_out,
        };
    }
    if !critical
        && let Some(recipient) = quiet
        && let Some(deferral) = quiet_hours_gate(ctx, recipient, command)
    {
        return deferral;
    }
    if critical || !ctx.limits.contains_key(&command.category) {
        return Gate::Go { opted_out };
    }
    // The rate limit is kept under the recipient's key: the customer id, else the first contact.
    let Some(user) = command
        .contacts
        .recipient_key(command.customer_id.as_deref())
    else {
        return Gate::Go { opted_out };
    };
    let request = Acquire {
        category: command.category,
        notification_id: command.notification_id,
        allowed_before: passed_before,
    };
    let verdict = match ctx.rate_limiter.get() {
        Some(limiter) => supervisor::ask(&limiter, &user, request, ctx.ask_timeout).await,
        None => None,
    };
    let limit = ctx.limits.get(&command.category);
    let words = |limit: Option<&CategoryLimit>| {
        limit.map_or_else(String::new, |l| {
            format!(
                "{} limit of {} per {} s",
                command.category.as_str(),
                l.capacity,
                l.per_secs
            )
        })
    };
    match verdict {
        Some(Verdict::Allow) => Gate::Go { opted_out },
        Some(Verdict::Drop) => Gate::Skip {
            reason: format!("rate_limited: {} reached", words(limit)),
            opted_out: Vec::new(),
        },
        Some(Verdict::Defer(delay)) => {
            let until = (ctx.clock)() + chrono::Duration::from_std(delay).unwrap_or_default();
            Gate::Defer {
                delay: delay.max(Duration::from_millis(50)),
                reason: format!(
                    "deferred: rate limited ({} reached) until {}",
                    words(limit),
                    until.to_rfc3339_opts(SecondsFormat::Secs, true)
                ),
            }
        }
        None => Gate::Defer {
            delay: UNANSWERED_LIMITER_HOLD,
            reason: "deferred: the rate limiter did not answer in time".into(),
        },
    }
}

/// A deferral while `recipient`'s quiet hours are on, `None` outside them (or without any).
fn quiet_hours_gate(
    ctx: &PolicyContext,
    recipient: &Recipient,
    command: &SendCommand,
) -> Option<Gate> {
    let quiet = recipient.wishes.quiet_hours.as_ref()?;
    // Quiet hours without a zone of their own follow the customer's, as it is now.
    let timezone = quiet
        .timezone
        .as_deref()
        .or(recipient.customer.as_ref().map(|c| c.timezone.as_str()))
        .unwrap_or("UTC");
    match QuietHours::parse(&quiet.starts, &quiet.ends, timezone) {
        Ok(window) => {
            let now = (ctx.clock)();
            let end = window.ends_after(now)?;
            let delay = (end - now).to_std().unwrap_or_default();
            Some(Gate::Defer {
                delay: delay.max(Duration::from_millis(50)),
                reason: format!(
                    "deferred: quiet hours until {}",
                    end.to_rfc3339_opts(SecondsFormat::Secs, true)
                ),
            })
        }
        Err(err) => {
            let customer = quiet.customer_id.as_str();
            tracing::warn!(customer, notification = %command.notification_id, error = %err, "unreadable quiet hours ignored");
            None
        }
    }
}
