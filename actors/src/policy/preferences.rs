//! Preference resolution: may a notification of a category go out on a channel?
//!
//! A customer's row for (category, channel) wins over their row for the whole category, which
//! wins over the default (enabled). Critical categories always go out.

use herald_entities::preference;
use herald_nats::{Category, Channel};

/// Whether a category is critical: never opted out of, never held by quiet hours.
pub fn is_critical(category: Category) -> bool {
    category == Category::Security
}

/// A customer's preferences, read from their rows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PreferenceSet {
    /// (category, channel or `None` for the whole category, enabled).
    entries: Vec<(Category, Option<Channel>, bool)>,
}

impl PreferenceSet {
    /// From stored rows; rows naming an unknown category or channel are ignored.
    pub fn from_rows(rows: &[preference::Model]) -> Self {
        let entries = rows
            .iter()
            .filter_map(|row| {
                let category = Category::parse(&row.category)?;
                let channel = if row.channel == preference::ALL_CHANNELS {
                    None
                } else {
                    Some(Channel::parse(&row.channel)?)
                };
                Some((category, channel, row.enabled))
            })
            .collect();
        Self { entries }
    }

    /// From explicit entries (tests, API previews).
    pub fn new(entries: Vec<(Category, Option<Channel>, bool)>) -> Self {
        Self { entries }
    }

    /// Whether the customer accepts `category` on `channel`.
    pub fn allows(&self, category: Category, channel: Channel) -> bool {
        if is_critical(category) {
            return true;
        }
        let find = |wanted: Option<Channel>| {
            self.entries
                .iter()
                .find(|(c, ch, _)| *c == category && *ch == wanted)
                .map(|(_, _, enabled)| *enabled)
        };
        find(Some(channel)).or_else(|| find(None)).unwrap_or(true)
    }

    /// The channels of `chain` the customer opted out of, in chain order.
    pub fn opted_out(&self, category: Category, chain: &[Channel]) -> Vec<Channel> {
        chain
            .iter()
            .copied()
            .filter(|&channel| !self.allows(category, channel))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Category::*;
    use Channel::*;

    #[test]
    fn defaults_allow_everything() {
        let none = PreferenceSet::default();
        assert!(none.allows(Marketing, Email));
        assert!(none.opted_out(Marketing, &[Email, Sms]).is_empty());
    }

    #[test]
    fn a_channel_row_beats_the_category_row() {
        let prefs = PreferenceSet::new(vec![
            (Marketing, None, false),
            (Marketing, Some(Push), true),
            (Transactional, Some(Email), false),
        ]);
        assert!(!prefs.allows(Marketing, Email));
        assert!(prefs.allows(Marketing, Push));
        assert!(!prefs.allows(Transactional, Email));
        assert!(
            prefs.allows(Transactional, Sms),
            "other channels keep the default"
        );
        assert!(
            prefs.allows(Account, Email),
            "other categories keep the default"
        );
        assert_eq!(
            prefs.opted_out(Marketing, &[Sms, Push, Email]),
            vec![Sms, Email]
        );
    }

    #[test]
    fn security_cannot_be_opted_out_of() {
        let prefs = PreferenceSet::new(vec![
            (Security, None, false),
            (Security, Some(Email), false),
        ]);
        assert!(prefs.allows(Security, Email));
        assert!(prefs.opted_out(Security, &[Email]).is_empty());
    }

    #[test]
    fn rows_with_unknown_names_are_ignored() {
        let row = |category: &str, channel: &str, enabled| preference::Model {
            customer_id: "c".into(),
            category: category.into(),
            channel: channel.into(),
            enabled,
            updated_at: chrono::Utc::now(),
        };
        let prefs = PreferenceSet::from_rows(&[
            row("marketing", "*", false),
            row("marketing", "pigeon", true),
            row("gossip", "*", false),
            row("marketing", "email", true),
        ]);
        assert!(prefs.allows(Marketing, Email));
        assert!(!prefs.allows(Marketing, Sms));
    }
}
