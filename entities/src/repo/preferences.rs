//! Queries on `preferences` and `quiet_hours`.

use std::collections::HashMap;

use chrono::Utc;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait,
    QueryFilter, QuerySelect, TransactionTrait,
};

use crate::{RepoError, customer, preference, quiet_hours};

/// One preference to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPreference {
    /// Category name.
    pub category: String,
    /// Channel name, or [`preference::ALL_CHANNELS`].
    pub channel: String,
    /// Whether wanted.
    pub enabled: bool,
}

/// Quiet hours to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewQuietHours {
    /// `HH:MM[:SS]`.
    pub starts: String,
    /// `HH:MM[:SS]`.
    pub ends: String,
    /// IANA time zone; `None` to follow the customer's.
    pub timezone: Option<String>,
}

/// A customer's stored wishes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Wishes {
    /// Preference rows.
    pub preferences: Vec<preference::Model>,
    /// Quiet hours, if set.
    pub quiet_hours: Option<quiet_hours::Model>,
}

/// The customer's preferences and quiet hours (empty when none are stored).
pub async fn load(db: &impl ConnectionTrait, customer_id: &str) -> Result<Wishes, RepoError> {
    let id = customer_id.to_string();
    let mut wishes = load_many(db, std::slice::from_ref(&id)).await?;
    Ok(wishes.remove(&id).unwrap_or_default())
}

/// The wishes of each of `customer_ids`, in two queries; every id asked for has an entry.
pub async fn load_many(
    db: &impl ConnectionTrait,
    customer_ids: &[String],
) -> Result<HashMap<String, Wishes>, RepoError> {
    let mut wishes: HashMap<String, Wishes> = customer_ids
        .iter()
        .map(|id| (id.clone(), Wishes::default()))
        .collect();
    let preferences = preference::Entity::find()
        .filter(preference::Column::CustomerId.is_in(customer_ids.iter().cloned()))
        .all(db)
        .await?;
    for row in preferences {
        if let Some(entry) = wishes.get_mut(&row.customer_id) {
            entry.preferences.push(row);
        }
    }
    let quiet = quiet_hours::Entity::find()
        .filter(quiet_hours::Column::CustomerId.is_in(customer_ids.iter().cloned()))
        .all(db)
        .await?;
    for row in quiet {
        if let Some(entry) = wishes.get_mut(&row.customer_id) {
            entry.quiet_hours = Some(row);
        }
    }
    Ok(wishes)
}

/// Replaces the customer's preferences and quiet hours with the given ones, atomically. Two
/// replacements at once take turns, so the last one wins whole: on PostgreSQL each first locks
/// the customer's row (`FOR UPDATE`; under `READ COMMITTED` both would otherwise delete the old
/// rows and the second's insert collide with the first's). SQLite runs one writer at a time, and
/// its transaction begins with the delete, a write, so it waits for its turn there (a read first
/// would make the transaction fail when it then tries to write after another has).
pub async fn replace(
    db: &DatabaseConnection,
    customer_id: &str,
    preferences: Vec<NewPreference>,
    quiet: Option<NewQuietHours>,
) -> Result<(), RepoError> {
    let now = Utc::now();
    let txn = db.begin().await?;
    if txn.get_database_backend() == DbBackend::Postgres {
        customer::Entity::find()
            .select_only()
            .column(customer::Column::ExternalId)
            .filter(customer::Column::ExternalId.eq(customer_id))
            .lock_exclusive()
            .into_tuple::<String>()
            .one(&txn)
            .await?;
    }
    preference::Entity::delete_many()
        .filter(preference::Column::CustomerId.eq(customer_id))
        .exec(&txn)
        .await?;
    quiet_hours::Entity::delete_many()
        .filter(quiet_hours::Column::CustomerId.eq(customer_id))
        .exec(&txn)
        .await?;
    if !preferences.is_empty() {
        let rows = preferences.into_iter().map(|p| preference::ActiveModel {
            customer_id: Set(customer_id.to_string()),
            category: Set(p.category),
            channel: Set(p.channel),
            enabled: Set(p.enabled),
            updated_at: Set(now),
        });
        preference::Entity::insert_many(rows)
            .exec_without_returning(&txn)
            .await?;
    }
    if let Some(quiet) = quiet {
        quiet_hours::Entity::insert(quiet_hours::ActiveModel {
            customer_id: Set(customer_id.to_string()),
            starts: Set(quiet.starts),
            ends: Set(quiet.ends),
            timezone: Set(quiet.timezone),
            updated_at: Set(now),
        })
        .exec_without_returning(&txn)
        .await?;
    }
    txn.commit().await?;
    Ok(())
}
