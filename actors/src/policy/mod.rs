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
        /// Channels of the chain opted out of.
        opted_out: Vec<OptOut>,
    },
    /// Do not send: status `skipped` with the reason.
    Skip {
        /// Why, in words (starts with `opted_out` or `rate_limited`).
        reason: String,
        /// Channels opted out of (recorded as attempts).
        opted_out: Vec<OptOut>,
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

/// A channel of the chain opted out of, and by whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptOut {
    /// The channel.
    pub channel: Channel,
    /// Who opted out of it.
    pub by: OptedOutBy,
}

/// Who opted out of a channel, as the reasons say it. A send naming only contacts belongs to none
/// of the customers holding them, so its record never names one: that would tell whoever reads
/// the notification (any sender, with a bare address) which customer holds the address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptedOutBy {
    /// The customer the send names.
    TheCustomer,
    /// The only customer holding the send's contact on the channel.
    TheHolder,
    /// One of the several customers holding the send's contact on the channel.
    AHolder,
}

impl OptOut {
    /// Who opted out, in words: "the customer", "the customer holding this email address",
    /// "a customer holding this phone number".
    pub fn who(&self) -> String {
        let contact = contact_kind(self.channel);
        match self.by {
            OptedOutBy::TheCustomer => "the customer".into(),
            OptedOutBy::TheHolder => format!("the customer holding this {contact}"),
            OptedOutBy::AHolder => format!("a customer holding this {contact}"),
        }
    }

    /// The opt-out in words, as its attempt records it: "… opted out of `category` on `channel`".
    pub fn words(&self, category: Category) -> String {
        format!(
            "{} opted out of {} on {}",
            self.who(),
            category.as_str(),
            self.channel
        )
    }
}

/// What a send's contact on `channel` is, in words.
fn contact_kind(channel: Channel) -> &'static str {
    match channel {
        Channel::Email => "email address",
        Channel::Sms => "phone number",
        Channel::Telegram => "Telegram chat",
        Channel::Push => "push token",
        Channel::Webhook => "webhook URL",
    }
}

/// Why a send opted out of on every channel of its chain is skipped.
fn opted_out_everywhere(category: Category, opted_out: &[OptOut]) -> String {
    let names: Vec<&str> = opted_out.iter().map(|o| o.channel.as_str()).collect();
    if opted_out.iter().all(|o| o.by == OptedOutBy::TheCustomer) {
        return format!(
            "opted_out: the customer opted out of {} on every channel of the chain ({})",
            category.as_str(),
            names.join(", ")
        );
    }
    let whose: Vec<String> = opted_out
        .iter()
        .map(|o| format!("{} by {}", o.channel, o.who()))
        .collect();
    format!(
        "opted_out: {} is opted out of on every channel of the chain: {}",
        category.as_str(),
        whose.join(", ")
    )
}

/// Applies preferences, quiet hours and the rate limit, in that order (so a notification held
/// by quiet hours does not spend a token), given what is stored about the recipient and about
/// the customers with stored wishes holding the contacts the send gives beyond the recipient's
/// own (`holders`): a channel is opted out of when the recipient opted out of it or, as in
/// [`gate_contacts`], a customer holding the send's other contact there did. Quiet hours are the
/// recipient's and, as in [`gate_contacts`], those of the holders of its other contacts on the
/// channels not opted out (`quiet_ones`): the send waits until the latest of those nights on
/// now is over.
///
/// `passed_before`: a round of the notification's chain was walked since it was queued (or
/// replayed), so the gate let it through then, rate limit included. The rate limiter then allows
/// it again without asking for a new token, even after the limiter that allowed it is gone
/// ([`Acquire::allowed_before`]).
pub async fn gate(
    ctx: &PolicyContext,
    recipient: &Recipient,
    holders: &[ContactHolder],
    command: &SendCommand,
    passed_before: bool,
) -> Gate {
    let opted_out = customer_opt_outs(recipient, holders, command);
    let quiet = quiet_ones(Some(recipient), holders, command, &opted_out);
    decide(ctx, opted_out, &quiet, command, passed_before).await
}

/// The channels of `command`'s chain opted out of, in chain order: by the customer it names
/// ([`OptedOutBy::TheCustomer`]), else by a customer holding its other contact there
/// ([`contact_opt_outs`]).
fn customer_opt_outs(
    recipient: &Recipient,
    holders: &[ContactHolder],
    command: &SendCommand,
) -> Vec<OptOut> {
    let own = PreferenceSet::from_rows(&recipient.wishes.preferences)
        .opted_out(command.category, &command.channels);
    let theirs = contact_opt_outs(holders, command);
    command
        .channels
        .iter()
        .filter_map(|&channel| {
            let by_the_customer = own.contains(&channel).then_some(OptOut {
                channel,
                by: OptedOutBy::TheCustomer,
            });
            by_the_customer.or_else(|| theirs.iter().find(|o| o.channel == channel).copied())
        })
        .collect()
}

/// [`gate`] for a send that names no customer, only contacts: given the customers with stored
/// wishes who hold those contacts. A channel is opted out of when any customer holding the
/// send's contact on it opted out of it. Quiet hours are those of the holders of its contacts on
/// the channels not opted out (`quiet_ones`: per contact, when exactly one of its holders set
/// them); the send waits until the latest of those nights on now is over.
pub async fn gate_contacts(
    ctx: &PolicyContext,
    holders: &[ContactHolder],
    command: &SendCommand,
    passed_before: bool,
) -> Gate {
    let opted_out = contact_opt_outs(holders, command);
    let quiet = quiet_ones(None, holders, command, &opted_out);
    decide(ctx, opted_out, &quiet, command, passed_before).await
}

/// Those whose night it may be where `command` goes: the customer it names (`recipient`), and,
/// for each channel of its chain not `opted_out`, the one customer among those holding its
/// contact there who set quiet hours, if exactly one did (with several, as for an address a
/// family shares, whose night it is cannot be told, and none is taken).
fn quiet_ones<'a>(
    recipient: Option<&'a Recipient>,
    holders: &'a [ContactHolder],
    command: &SendCommand,
    opted_out: &[OptOut],
) -> Vec<&'a Recipient> {
    let reached = command
        .channels
        .iter()
        .filter(|&&channel| !opted_out.iter().any(|o| o.channel == channel));
    let holders = reached.filter_map(|&channel| {
        let mut quiet = holders
            .iter()
            .filter(|h| h.holds(channel) && h.recipient.wishes.quiet_hours.is_some());
        match (quiet.next(), quiet.next()) {
            (Some(only), None) => Some(&only.recipient),
            _ => None,
        }
    });
    // Only those who set quiet hours, each once: most sends then allocate nothing.
    let mut quiet: Vec<&Recipient> = Vec::new();
    let with_quiet_hours = recipient.filter(|r| r.wishes.quiet_hours.is_some());
    for one in with_quiet_hours.into_iter().chain(holders) {
        if !quiet.iter().any(|taken| std::ptr::eq(*taken, one)) {
            quiet.push(one);
        }
    }
    quiet
}

/// The channels of `command`'s chain that a customer holding its contact there opted out of: by
/// [`OptedOutBy::TheHolder`] when that customer is the only one holding it, else by
/// [`OptedOutBy::AHolder`].
fn contact_opt_outs(holders: &[ContactHolder], command: &SendCommand) -> Vec<OptOut> {
    command
        .channels
        .iter()
        .filter_map(|&channel| {
            let holding: Vec<&ContactHolder> =
                holders.iter().filter(|h| h.holds(channel)).collect();
            let opted_out = holding.iter().any(|holder| {
                !PreferenceSet::from_rows(&holder.recipient.wishes.preferences)
                    .allows(command.category, channel)
            });
            let by = match holding.len() {
                1 => OptedOutBy::TheHolder,
                _ => OptedOutBy::AHolder,
            };
            opted_out.then_some(OptOut { channel, by })
        })
        .collect()
}

/// The gate once the channels opted out of are known: all of the chain ⇒ skipped; then the
/// quiet hours of `quiet` (those whose night it may be, [`quiet_hours_gate`]); then the rate
/// limit.
async fn decide(
    ctx: &PolicyContext,
    opted_out: Vec<OptOut>,
    quiet: &[&Recipient],
    command: &SendCommand,
    passed_before: bool,
) -> Gate {
    let critical = is_critical(command.category);
    if !command.channels.is_empty() && opted_out.len() == command.channels.len() {
        return Gate::Skip {
            reason: opted_out_everywhere(command.category, &opted_out),
            opted_out,
        };
    }
    if !critical
        && !quiet.is_empty()
        && let Some(deferral) = quiet_hours_gate((ctx.clock)(), quiet, command)
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

/// A deferral until the latest end of the quiet hours of `quiet` that are on at `now`, `None`
/// when none are (or none are set).
fn quiet_hours_gate(
    now: DateTime<Utc>,
    quiet: &[&Recipient],
    command: &SendCommand,
) -> Option<Gate> {
    let end = quiet
        .iter()
        .filter_map(|recipient| quiet_until(now, recipient, command))
        .max()?;
    let delay = (end - now).to_std().unwrap_or_default();
    Some(Gate::Defer {
        delay: delay.max(Duration::from_millis(50)),
        reason: format!(
            "deferred: quiet hours until {}",
            end.to_rfc3339_opts(SecondsFormat::Secs, true)
        ),
    })
}

/// When `recipient`'s quiet hours on at `now` end, `None` outside them (or without any).
fn quiet_until(
    now: DateTime<Utc>,
    recipient: &Recipient,
    command: &SendCommand,
) -> Option<DateTime<Utc>> {
    let quiet = recipient.wishes.quiet_hours.as_ref()?;
    // Quiet hours without a zone of their own follow the customer's, as it is now.
    let timezone = quiet
        .timezone
        .as_deref()
        .or(recipient.customer.as_ref().map(|c| c.timezone.as_str()))
        .unwrap_or("UTC");
    match QuietHours::parse(&quiet.starts, &quiet.ends, timezone) {
        Ok(window) => window.ends_after(now),
        Err(err) => {
            let customer = quiet.customer_id.as_str();
            tracing::warn!(customer, notification = %command.notification_id, error = %err, "unreadable quiet hours ignored");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use herald_entities::{preference, repo::customers::Held, repo::preferences::Wishes};
    use herald_nats::{Contacts, Content, SCHEMA_VERSION};

    use super::*;

    /// A marketing send to an email address and a phone number, naming no customer.
    fn contact_send() -> SendCommand {
        SendCommand {
            v: SCHEMA_VERSION,
            notification_id: uuid::Uuid::now_v7(),
            customer_id: None,
            contacts: Contacts {
                email: Some("ada@example.com".into()),
                phone: Some("+15550100".into()),
                ..Default::default()
            },
            category: Category::Marketing,
            channels: vec![Channel::Email, Channel::Sms],
            content: Content {
                text: "Spring sale".into(),
                ..Default::default()
            },
            created_at: Utc::now(),
        }
    }

    /// A customer holding `held`, opted out of marketing everywhere if `opted_out`.
    fn holder(id: &str, held: Held, opted_out: bool) -> ContactHolder {
        let preferences = opted_out
            .then(|| preference::Model {
                customer_id: id.into(),
                category: "marketing".into(),
                channel: preference::ALL_CHANNELS.into(),
                enabled: false,
                updated_at: Utc::now(),
            })
            .into_iter()
            .collect();
        ContactHolder {
            recipient: Recipient {
                customer: None,
                wishes: Wishes {
                    preferences,
                    quiet_hours: None,
                },
            },
            held,
        }
    }

    /// `id`'s wishes: quiet hours from `starts` to `ends`, UTC.
    fn quiet(id: &str, starts: &str, ends: &str) -> Recipient {
        Recipient {
            customer: None,
            wishes: Wishes {
                preferences: Vec::new(),
                quiet_hours: Some(herald_entities::quiet_hours::Model {
                    customer_id: id.into(),
                    starts: starts.into(),
                    ends: ends.into(),
                    timezone: Some("UTC".into()),
                    updated_at: Utc::now(),
                }),
            },
        }
    }

    const EMAIL: Held = Held {
        email: true,
        phone: false,
        telegram_chat_id: false,
        push_token: false,
        webhook_url: false,
    };
    const PHONE: Held = Held {
        email: false,
        phone: true,
        ..EMAIL
    };

    /// The reasons of a send naming only contacts said "the customer opted out" even when several
    /// customers held the contact; they now say whether one holds it or one of several, and never
    /// which customer (the record is no customer's own).
    #[test]
    fn a_contact_send_says_whether_the_only_holder_or_one_of_several_opted_out() {
        let command = contact_send();
        // Two customers hold the email address, one opted out; only one holds the phone number.
        let holders = [
            holder("cus_opted_out", EMAIL, true),
            holder("cus_other", EMAIL, false),
            holder("cus_phone", PHONE, true),
        ];
        let opted_out = contact_opt_outs(&holders, &command);
        assert_eq!(
            opted_out,
            [
                OptOut {
                    channel: Channel::Email,
                    by: OptedOutBy::AHolder
                },
                OptOut {
                    channel: Channel::Sms,
                    by: OptedOutBy::TheHolder
                },
            ]
        );
        assert_eq!(
            opted_out[0].words(command.category),
            "a customer holding this email address opted out of marketing on email"
        );
        assert_eq!(
            opted_out[1].words(command.category),
            "the customer holding this phone number opted out of marketing on sms"
        );
        let reason = opted_out_everywhere(command.category, &opted_out);
        assert_eq!(
            reason,
            "opted_out: marketing is opted out of on every channel of the chain: email by a \
             customer holding this email address, sms by the customer holding this phone number"
        );
        assert!(
            !reason.contains("cus_"),
            "no customer is named in another's record: {reason}"
        );
    }

    /// A send naming its customer keeps its words.
    #[test]
    fn a_customer_send_says_the_customer_opted_out() {
        let opted_out = [Channel::Email, Channel::Sms].map(|channel| OptOut {
            channel,
            by: OptedOutBy::TheCustomer,
        });
        assert_eq!(
            opted_out[0].words(Category::Marketing),
            "the customer opted out of marketing on email"
        );
        assert_eq!(
            opted_out_everywhere(Category::Marketing, &opted_out),
            "opted_out: the customer opted out of marketing on every channel of the chain \
             (email, sms)"
        );
    }

    /// A send naming a customer and giving another customer's contact is kept from the channels
    /// either opted out of: the named customer's own opt-out is said as theirs.
    #[test]
    fn a_customer_send_follows_the_holders_of_its_other_contacts_too() {
        let mut command = contact_send();
        command.customer_id = Some("cus_named".into());
        let named = holder("cus_named", Held::default(), true).recipient;
        let email_only = Recipient {
            wishes: Wishes {
                preferences: vec![preference::Model {
                    channel: "email".into(),
                    ..named.wishes.preferences[0].clone()
                }],
                quiet_hours: None,
            },
            ..named
        };
        let holders = [holder("cus_phone", PHONE, true)];
        assert_eq!(
            customer_opt_outs(&email_only, &holders, &command),
            [
                OptOut {
                    channel: Channel::Email,
                    by: OptedOutBy::TheCustomer
                },
                OptOut {
                    channel: Channel::Sms,
                    by: OptedOutBy::TheHolder
                },
            ]
        );
        assert_eq!(
            customer_opt_outs(&Recipient::default(), &[], &command),
            [],
            "nobody opted out"
        );
    }

    /// A send naming a customer and giving another customer's contact inline waits for that
    /// holder's night to end too (before, only the named customer's quiet hours held it, so the
    /// holder's phone got a marketing SMS at night), and for the later of two nights on at once;
    /// not for the night of a holder on a channel opted out of, nor of a contact several
    /// customers hold who set quiet hours.
    #[test]
    fn a_customer_send_waits_for_the_night_of_the_holder_of_its_other_contact() {
        let mut command = contact_send();
        command.customer_id = Some("cus_named".into());
        let now = "2026-12-07T02:00:00Z"
            .parse::<DateTime<Utc>>()
            .expect("time");
        let quiet_holder = |id: &str, held: Held, starts: &str, ends: &str| ContactHolder {
            recipient: quiet(id, starts, ends),
            held,
        };
        let until = |gate: Option<Gate>| match gate {
            Some(Gate::Defer { delay, reason }) => (delay, reason),
            other => panic!("not deferred: {other:?}"),
        };
        let phone = [quiet_holder("cus_phone", PHONE, "22:00", "07:00")];

        let named = Recipient::default();
        let quiet_now = quiet_ones(Some(&named), &phone, &command, &[]);
        let (delay, reason) = until(quiet_hours_gate(now, &quiet_now, &command));
        assert_eq!(reason, "deferred: quiet hours until 2026-12-07T07:00:00Z");
        assert_eq!(delay, Duration::from_secs(5 * 3600));

        let named = quiet("cus_named", "01:00", "03:00");
        let both = quiet_ones(Some(&named), &phone, &command, &[]);
        let (_, reason) = until(quiet_hours_gate(now, &both, &command));
        assert_eq!(
            reason, "deferred: quiet hours until 2026-12-07T07:00:00Z",
            "the later end"
        );
        let day = "2026-12-07T12:00:00Z"
            .parse::<DateTime<Utc>>()
            .expect("time");
        assert_eq!(
            quiet_hours_gate(day, &both, &command),
            None,
            "neither is on"
        );

        let sms_opted_out = [OptOut {
            channel: Channel::Sms,
            by: OptedOutBy::TheCustomer,
        }];
        let (_, reason) = until(quiet_hours_gate(
            now,
            &quiet_ones(Some(&named), &phone, &command, &sms_opted_out),
            &command,
        ));
        assert_eq!(
            reason, "deferred: quiet hours until 2026-12-07T03:00:00Z",
            "the phone is not reached: its holder's night does not hold the send"
        );

        // The email address two customers hold who both set quiet hours: whose night it is
        // cannot be told; the phone's only holder still counts.
        let mut holders = phone.to_vec();
        holders.push(quiet_holder("cus_a", EMAIL, "00:00", "23:00"));
        holders.push(quiet_holder("cus_b", EMAIL, "00:00", "23:00"));
        let taken = quiet_ones(None, &holders, &command, &[]);
        assert_eq!(taken, [&holders[0].recipient]);
    }
}
