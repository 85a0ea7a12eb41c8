//! Notification statuses and the transitions allowed between them.

use sea_orm::{DeriveActiveEnum, EnumIter, sea_query::StringLen};
use serde::{Deserialize, Serialize};

/// Where a notification stands. `queued → processing → sent → delivered`, or one of the other
/// terminal states.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, EnumIter, DeriveActiveEnum, Serialize, Deserialize,
)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::N(16))")]
#[serde(rename_all = "lowercase")]
pub enum NotificationStatus {
    /// Accepted and published, not yet picked up.
    #[sea_orm(string_value = "queued")]
    Queued,
    /// Waiting for its `scheduled_at`.
    #[sea_orm(string_value = "scheduled")]
    Scheduled,
    /// Picked up by a dispatcher; retries keep it here.
    #[sea_orm(string_value = "processing")]
    Processing,
    /// A provider accepted it.
    #[sea_orm(string_value = "sent")]
    Sent,
    /// The provider confirmed delivery (receipt).
    #[sea_orm(string_value = "delivered")]
    Delivered,
    /// Permanently failed on every channel, or bounced.
    #[sea_orm(string_value = "failed")]
    Failed,
    /// Not sent on purpose (opt-out, rate limit); the reason is recorded.
    #[sea_orm(string_value = "skipped")]
    Skipped,
    /// Cancelled before it went out.
    #[sea_orm(string_value = "cancelled")]
    Cancelled,
    /// Gave up after the last retry; a copy is in the dead-letter stream.
    #[sea_orm(string_value = "dead")]
    Dead,
}

impl NotificationStatus {
    /// The lowercase name, as stored and published.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Scheduled => "scheduled",
            Self::Processing => "processing",
            Self::Sent => "sent",
            Self::Delivered => "delivered",
            Self::Failed => "failed",
            Self::Skipped => "skipped",
            Self::Cancelled => "cancelled",
            Self::Dead => "dead",
        }
    }

    /// Whether a provider took the notification: `sent`, or `delivered` by a receipt.
    pub fn is_sent(self) -> bool {
        matches!(self, Self::Sent | Self::Delivered)
    }

    /// Whether nothing more will happen to the notification (a receipt may still move `sent`).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Sent
                | Self::Delivered
                | Self::Failed
                | Self::Skipped
                | Self::Cancelled
                | Self::Dead
        )
    }

    /// The statuses that are not final ([`Self::is_final`]): the notification may still be sent.
    pub const NOT_FINAL: [NotificationStatus; 3] =
        [Self::Queued, Self::Scheduled, Self::Processing];

    /// The statuses a notification may move to `self` from. Writes are conditional on these, so a
    /// late or repeated update (after a redelivery) never moves a notification backwards.
    pub fn allowed_from(self) -> &'static [NotificationStatus] {
        use NotificationStatus::*;
        match self {
            Queued => &[],
            // A long deferral (quiet hours, a rate limit) waits as a scheduled notification.
            Scheduled => &[Processing],
            Processing => &Self::NOT_FINAL,
            Sent => &Self::NOT_FINAL,
            Delivered => &[Sent],
            // Not from `sent`: a dispatcher's failure on a redelivered command would undo a
            // delivery. A receipt's bounce moves `sent` to `failed` by its own UPDATE
            // (`repo::receipts::apply`).
            Failed | Skipped | Dead => &Self::NOT_FINAL,
            Cancelled => &[Queued, Scheduled],
        }
    }
}

#[cfg(test)]
mod tests {
    use sea_orm::Iterable as _;

    use super::NotificationStatus;

    #[test]
    fn not_final_is_every_status_that_is_not_final() {
        let not_final: Vec<_> = NotificationStatus::iter()
            .filter(|status| !status.is_final())
            .collect();
        assert_eq!(not_final, NotificationStatus::NOT_FINAL);
    }

    use super::NotificationStatus::*;

    #[test]
    fn transitions_only_move_forward() {
        assert!(Sent.allowed_from().contains(&Processing));
        assert!(!Processing.allowed_from().contains(&Sent));
        assert!(!Sent.allowed_from().contains(&Dead));
        assert!(Delivered.allowed_from() == [Sent]);
        assert!(!Cancelled.allowed_from().contains(&Processing));
        assert!(
            Scheduled.allowed_from() == [Processing],
            "only a long hold schedules again"
        );
    }

    #[test]
    fn a_dispatcher_result_never_turns_sent_into_failed() {
        // A receipt's bounce moves `sent` to `failed` with its own conditional UPDATE.
        assert!(!Failed.allowed_from().contains(&Sent));
        assert!(Failed.allowed_from().contains(&Processing));
    }

    #[test]
    fn final_statuses() {
        assert!(Sent.is_final() && Dead.is_final() && Skipped.is_final());
        assert!(!Queued.is_final() && !Processing.is_final() && !Scheduled.is_final());
    }
}
