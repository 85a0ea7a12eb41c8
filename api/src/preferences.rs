//! `/api/v1/customers/{id}/preferences`: what a customer wants to receive, where, and when not.
//!
//! Preferences are per category, optionally per channel (a channel entry overrides the category
//! entry; without entries everything is enabled). `security` is critical: it cannot be opted out
//! of, and is never held by quiet hours. Quiet hours are a daily window of local time in an IANA
//! time zone; `22:00`–`08:00` crosses midnight.

use chrono::NaiveTime;
use herald_entities::{
    preference::ALL_CHANNELS,
    repo::{
        self,
        preferences::{NewPreference, NewQuietHours},
    },
};
use herald_nats::{Category, Channel};
use poem_openapi::{Object, OpenApi, Tags, param::Path, payload::Json};

use crate::{
    ApiError, AppState,
    auth::{ReadKey, SendKey},
    notifications::{ApiCategory, ApiChannel},
    validate,
};

/// Categories that cannot be opted out of.
const CRITICAL: [Category; 1] = [Category::Security];

#[derive(Tags)]
enum PreferenceTags {
    /// Recipients' wishes: opt-outs per category and channel, quiet hours.
    Preferences,
}

/// Whether a category of notifications is wanted, on one channel or on all.
#[derive(Debug, Clone, PartialEq, Eq, Object)]
#[oai(deny_unknown_fields)]
pub struct PreferenceEntry {
    /// The category.
    pub category: ApiCategory,
    /// The channel; absent for every channel of the category (a channel entry wins over it).
    #[oai(skip_serializing_if_is_none)]
    pub channel: Option<ApiChannel>,
    /// Whether the customer wants it.
    pub enabled: bool,
}

/// A daily quiet window: no non-critical notification between `start` and `end` local time
/// (deferred to `end`, not dropped).
#[derive(Debug, Clone, PartialEq, Eq, Object)]
#[oai(deny_unknown_fields)]
pub struct QuietHoursBody {
    /// Local start, `HH:MM` or `HH:MM:SS`.
    pub start: String,
    /// Local end, `HH:MM` or `HH:MM:SS`; before `start` when the window crosses midnight.
    pub end: String,
    /// IANA time zone, e.g. `Europe/Berlin`. When absent, the customer's own time zone at the
    /// time of each delivery: the window moves with the customer.
    #[oai(skip_serializing_if_is_none)]
    pub timezone: Option<String>,
}

/// A customer's wishes, as stored (`PUT` replaces them all).
#[derive(Debug, Clone, Object)]
#[oai(deny_unknown_fields)]
pub struct PreferencesBody {
    /// Preference entries; one per (category, channel).
    #[oai(default)]
    pub preferences: Vec<PreferenceEntry>,
    /// Quiet hours; none when absent.
    #[oai(skip_serializing_if_is_none)]
    pub quiet_hours: Option<QuietHoursBody>,
}

/// A customer's wishes.
#[derive(Debug, Clone, Object)]
pub struct PreferencesView {
    /// The customer's external id.
    pub customer_id: String,
    /// Stored entries; everything not named is enabled.
    pub preferences: Vec<PreferenceEntry>,
    /// Quiet hours, if set.
    #[oai(skip_serializing_if_is_none)]
    pub quiet_hours: Option<QuietHoursBody>,
    /// Categories that are always delivered, whatever the entries say.
    pub critical_categories: Vec<ApiCategory>,
}

/// Preference endpoints.
pub struct PreferencesApi {
    state: AppState,
}

impl PreferencesApi {
    /// The endpoints over the shared state.
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

#[OpenApi(prefix_path = "/api/v1", tag = "PreferenceTags::Preferences")]
impl PreferencesApi {
    /// Read a customer's preferences and quiet hours (scope `read`).
    #[oai(path = "/customers/:id/preferences", method = "get")]
    async fn get(
        &self,
        _auth: ReadKey,
        id: Path<String>,
    ) -> Result<Json<PreferencesView>, ApiError> {
        self.require_customer(&id.0).await?;
        self.view(&id.0).await.map(Json)
    }

    /// Replace a customer's preferences and quiet hours.
    ///
    /// Opting out of `security` (critical) is refused with 400 naming the entry's field (scope
    /// `send`).
    #[oai(path = "/customers/:id/preferences", method = "put")]
    async fn put(
        &self,
        _auth: SendKey,
        id: Path<String>,
        body: Json<PreferencesBody>,
    ) -> Result<Json<PreferencesView>, ApiError> {
        self.require_customer(&id.0).await?;
        let (preferences, quiet) = validate(body.0)?;
        repo::preferences::replace(&self.state.db, &id.0, preferences, quiet).await?;
        self.view(&id.0).await.map(Json)
    }
}

impl PreferencesApi {
    /// 404 for an unknown customer.
    async fn require_customer(&self, id: &str) -> Result<(), ApiError> {
        match repo::customers::find_by_external_id(&self.state.db, id).await? {
            Some(_) => Ok(()),
            None => Err(ApiError::not_found(format!("no customer {id:?}"))),
        }
    }

    async fn view(&self, id: &str) -> Result<PreferencesView, ApiError> {
        let wishes = repo::preferences::load(&self.state.db, id).await?;
        let mut preferences: Vec<PreferenceEntry> = wishes
            .preferences
            .iter()
            .filter_map(|row| {
                let category = api_category(Category::parse(&row.category)?);
                let channel = if row.channel == ALL_CHANNELS {
                    None
                } else {
                    Some(api_channel(Channel::parse(&row.channel)?))
                };
                Some(PreferenceEntry {
                    category,
                    channel,
                    enabled: row.enabled,
                })
            })
            .collect();
        preferences.sort_by_key(|p| {
            (
                format!("{:?}", p.category),
                p.channel.map(|c| format!("{c:?}")),
            )
        });
        Ok(PreferencesView {
            customer_id: id.to_string(),
            preferences,
            quiet_hours: wishes.quiet_hours.map(|q| QuietHoursBody {
                start: q.starts,
                end: q.ends,
                timezone: q.timezone,
            }),
            critical_categories: CRITICAL.into_iter().map(api_category).collect(),
        })
    }
}

fn validate(
    body: PreferencesBody,
) -> Result<(Vec<NewPreference>, Option<NewQuietHours>), ApiError> {
    let mut seen: Vec<(Category, Option<Channel>)> = Vec::new();
    let mut preferences = Vec::with_capacity(body.preferences.len());
    for (index, entry) in body.preferences.into_iter().enumerate() {
        let category: Category = entry.category.into();
        let channel: Option<Channel> = entry.channel.map(Into::into);
        if CRITICAL.contains(&category) && !entry.enabled {
            return Err(ApiError::invalid(
                &format!("preferences[{index}].enabled"),
                format!(
                    "{} notifications are critical and cannot be opted out of",
                    category.as_str()
                ),
            ));
        }
        if seen.contains(&(category, channel)) {
            return Err(ApiError::invalid(
                &format!("preferences[{index}]"),
                "a category and channel may appear only once",
            ));
        }
        seen.push((category, channel));
        preferences.push(NewPreference {
            category: category.as_str().to_string(),
            channel: channel.map_or(ALL_CHANNELS.to_string(), |c| c.as_str().to_string()),
            enabled: entry.enabled,
        });
    }
    let quiet = match body.quiet_hours {
        None => None,
        Some(quiet) => {
            let start = parse_time(&quiet.start).ok_or_else(|| {
                ApiError::invalid("quiet_hours.start", "start must be HH:MM or HH:MM:SS")
            })?;
            let end = parse_time(&quiet.end).ok_or_else(|| {
                ApiError::invalid("quiet_hours.end", "end must be HH:MM or HH:MM:SS")
            })?;
            if start == end {
                return Err(ApiError::invalid(
                    "quiet_hours.end",
                    "end must differ from start (omit quiet_hours for none)",
                ));
            }
            let timezone = quiet
                .timezone
                .map(|zone| validate::timezone("quiet_hours.timezone", &zone))
                .transpose()?;
            Some(NewQuietHours {
                starts: quiet.start,
                ends: quiet.end,
                timezone,
            })
        }
    };
    Ok((preferences, quiet))
}

fn parse_time(text: &str) -> Option<NaiveTime> {
    NaiveTime::parse_from_str(text, "%H:%M:%S")
        .or_else(|_| NaiveTime::parse_from_str(text, "%H:%M"))
        .ok()
}

fn api_category(category: Category) -> ApiCategory {
    match category {
        Category::Transactional => ApiCategory::Transactional,
        Category::Security => ApiCategory::Security,
        Category::Account => ApiCategory::Account,
        Category::Marketing => ApiCategory::Marketing,
    }
}

fn api_channel(channel: Channel) -> ApiChannel {
    match channel {
        Channel::Email => ApiChannel::Email,
        Channel::Telegram => ApiChannel::Telegram,
        Channel::Sms => ApiChannel::Sms,
        Channel::Push => ApiChannel::Push,
        Channel::Webhook => ApiChannel::Webhook,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(category: ApiCategory, channel: Option<ApiChannel>, enabled: bool) -> PreferenceEntry {
        PreferenceEntry {
            category,
            channel,
            enabled,
        }
    }

    fn field(err: ApiError) -> Option<String> {
        match err {
            ApiError::BadRequest(body) => body.0.field,
            _ => None,
        }
    }

    #[test]
    fn security_opt_out_is_refused_naming_the_field() {
        let body = PreferencesBody {
            preferences: vec![
                entry(ApiCategory::Marketing, None, false),
                entry(ApiCategory::Security, Some(ApiChannel::Email), false),
            ],
            quiet_hours: None,
        };
        let err = validate(body).unwrap_err();
        assert_eq!(field(err).as_deref(), Some("preferences[1].enabled"));
        let ok = PreferencesBody {
            preferences: vec![entry(ApiCategory::Security, None, true)],
            quiet_hours: None,
        };
        assert!(validate(ok).is_ok());
    }

    #[test]
    fn duplicates_and_bad_quiet_hours_are_refused() {
        let dup = PreferencesBody {
            preferences: vec![
                entry(ApiCategory::Marketing, Some(ApiChannel::Sms), false),
                entry(ApiCategory::Marketing, Some(ApiChannel::Sms), true),
            ],
            quiet_hours: None,
        };
        assert_eq!(
            field(validate(dup).unwrap_err()).as_deref(),
            Some("preferences[1]")
        );
        let quiet = |start: &str, end: &str, tz: Option<&str>| PreferencesBody {
            preferences: vec![],
            quiet_hours: Some(QuietHoursBody {
                start: start.into(),
                end: end.into(),
                timezone: tz.map(str::to_string),
            }),
        };
        assert_eq!(
            field(validate(quiet("22:00", "8am", None)).unwrap_err()).as_deref(),
            Some("quiet_hours.end")
        );
        assert_eq!(
            field(validate(quiet("22:00", "08:00", Some("Berlin"))).unwrap_err()).as_deref(),
            Some("quiet_hours.timezone")
        );
        let (_, stored) = validate(quiet("22:00", "08:00", None)).unwrap();
        assert_eq!(
            stored.unwrap().timezone,
            None,
            "no zone of their own: the customer's, read at delivery"
        );
        let (_, stored) = validate(quiet("22:00", "08:00", Some("Europe/Berlin"))).unwrap();
        assert_eq!(
            stored.unwrap().timezone.as_deref(),
            Some("Europe/Berlin"),
            "a zone of their own"
        );
    }
}
