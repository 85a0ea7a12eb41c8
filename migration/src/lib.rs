//! Herald's database migrations, for SQLite and PostgreSQL alike.
//!
//! One migration per file (`DeriveMigrationName` names a migration after its file). Run them with
//! `herald migrate`, or let `herald serve` run them at start-up.
//!
//! A migration that changes a live table in place on PostgreSQL calls
//! `lock_wait::wait_briefly_for_locks` first, so that it gives way to the queries queued behind
//! it; one that adds or drops an index on a large table does it concurrently (`concurrent_index`).

pub use sea_orm_migration::prelude::*;

mod concurrent_index;
mod lock_wait;
mod m20261122_000001_create_customers;
mod m20261122_000002_create_notifications;
mod m20261122_000003_create_delivery_attempts;
mod m20261122_000004_create_orders;
mod m20261122_000005_create_outbox_events;
mod m20261122_000101_create_preferences;
mod m20261122_000102_create_batches;
mod m20261122_000201_create_api_keys;
mod m20261122_000202_index_attempts_provider_message;
mod m20261123_000301_create_templates;
mod m20261123_000401_index_notifications_recipient_sent;
mod m20261203_000501_partial_status_indexes;
mod m20261204_000601_partial_recipient_sent_index;
mod m20261204_000701_delivered_index;
mod m20261206_000801_quiet_hours_follow_customer_timezone;
mod m20261206_000901_attempts_created_at_index;
mod m20261206_001001_batches_request_id;
mod m20261206_001101_request_fingerprints;
mod m20261207_001201_outbox_ordering_key;
mod m20261207_001301_history_filter_indexes;
mod m20261207_001401_queued_marked_index;
mod m20261207_001501_listing_indexes;
mod m20261207_001601_dashboard_logouts;
mod m20261207_001701_api_key_provider;
mod m20261207_001801_customer_webhook_secret;
mod m20261207_001901_scheduled_listing_index;
mod m20261207_002001_held_receipts;
mod m20261207_002101_customer_contact_indexes;
mod m20261207_003090_customer_contact_matching;
mod m20261207_003091_customer_previous_webhook_secret;
mod m20261207_003101_replaced_webhook_secret_index;

/// All of Herald's migrations, in order.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261122_000001_create_customers::Migration),
            Box::new(m20261122_000002_create_notifications::Migration),
            Box::new(m20261122_000003_create_delivery_attempts::Migration),
            Box::new(m20261122_000004_create_orders::Migration),
            Box::new(m20261122_000005_create_outbox_events::Migration),
            Box::new(m20261122_000101_create_preferences::Migration),
            Box::new(m20261122_000102_create_batches::Migration),
            Box::new(m20261122_000201_create_api_keys::Migration),
            Box::new(m20261122_000202_index_attempts_provider_message::Migration),
            Box::new(m20261123_000301_create_templates::Migration),
            Box::new(m20261123_000401_index_notifications_recipient_sent::Migration),
            Box::new(m20261203_000501_partial_status_indexes::Migration),
            Box::new(m20261204_000601_partial_recipient_sent_index::Migration),
            Box::new(m20261204_000701_delivered_index::Migration),
            Box::new(m20261206_000801_quiet_hours_follow_customer_timezone::Migration),
            Box::new(m20261206_000901_attempts_created_at_index::Migration),
            Box::new(m20261206_001001_batches_request_id::Migration),
            Box::new(m20261206_001101_request_fingerprints::Migration),
            Box::new(m20261207_001201_outbox_ordering_key::Migration),
            Box::new(m20261207_001301_history_filter_indexes::Migration),
            Box::new(m20261207_001401_queued_marked_index::Migration),
            Box::new(m20261207_001501_listing_indexes::Migration),
            Box::new(m20261207_001601_dashboard_logouts::Migration),
            Box::new(m20261207_001701_api_key_provider::Migration),
            Box::new(m20261207_001801_customer_webhook_secret::Migration),
            Box::new(m20261207_001901_scheduled_listing_index::Migration),
            Box::new(m20261207_002001_held_receipts::Migration),
            Box::new(m20261207_002101_customer_contact_indexes::Migration),
            Box::new(m20261207_003090_customer_contact_matching::Migration),
            Box::new(m20261207_003091_customer_previous_webhook_secret::Migration),
            Box::new(m20261207_003101_replaced_webhook_secret_index::Migration),
        ]
    }
}
