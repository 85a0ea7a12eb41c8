//! Queries on `preferences` and `quiet_hours`.

use std::collections::HashMap;

use chrono::Utc;
use sea_orm::{
    AccessMode, ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend,
    EntityTrait, IsolationLevel, QueryFilter, QuerySelect, TransactionTrait,
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
pub async fn load(db: &DatabaseConnection, customer_id: &str) -> Result<Wishes, RepoError> {
    let id = customer_id.to_string();
    let mut wishes = load_many(db, std::slice::from_ref(&id)).await?;
    Ok(wishes.remove(&id).unwrap_or_default())
}

/// The wishes of each of `customer_ids`, in two queries; every id asked for has an entry.
///
/// Both queries read one snapshot, so that a [`replace`] committed meanwhile is seen whole or not
/// at all (not the old preferences with the new quiet hours): a read-only `REPEATABLE READ`
/// transaction on PostgreSQL; on SQLite a deferred transaction, which reads without taking the
/// write lock.
pub async fn load_many(
    db: &DatabaseConnection,
    customer_ids: &[String],
) -> Result<HashMap<String, Wishes>, RepoError> {
    load_many_between(db, customer_ids, async {}).await
}

/// [`load_many`], awaiting `between` after reading the preferences and before reading the quiet
/// hours (a test runs a [`replace`] there).
async fn load_many_between(
    db: &DatabaseConnection,
    customer_ids: &[String],
    between: impl Future<Output = ()>,
) -> Result<HashMap<String, Wishes>, RepoError> {
    let mut wishes: HashMap<String, Wishes> = customer_ids
        .iter()
        .map(|id| (id.clone(), Wishes::default()))
        .collect();
    let txn = match db.get_database_backend() {
        DbBackend::Postgres => {
            db.begin_with_config(
                Some(IsolationLevel::RepeatableRead),
                Some(AccessMode::ReadOnly),
            )
            .await?
        }
        _ => db.begin().await?,
    };
    let preferences = preference::Entity::find()
        .filter(preference::Column::CustomerId.is_in(customer_ids.iter().cloned()))
        .all(&txn)
        .await?;
    for row in preferences {
        if let Some(entry) = wishes.get_mut(&row.customer_id) {
            entry.preferences.push(row);
        }
    }
    between.await;
    let quiet = quiet_hours::Entity::find()
        .filter(quiet_hours::Column::CustomerId.is_in(customer_ids.iter().cloned()))
        .all(&txn)
        .await?;
    txn.commit().await?;
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

#[cfg(test)]
mod tests {
    use herald_migration::MigratorTrait;

    use super::*;

    fn wanted(enabled: bool) -> Vec<NewPreference> {
        vec![NewPreference {
            category: "marketing".into(),
            channel: preference::ALL_CHANNELS.into(),
            enabled,
        }]
    }

    fn night(starts: &str) -> Option<NewQuietHours> {
        Some(NewQuietHours {
            starts: starts.into(),
            ends: "07:00".into(),
            timezone: None,
        })
    }

    /// A replacement committed between the two reads is seen by neither: the wishes read are the
    /// ones stored before it, whole, never the old preferences with the new quiet hours.
    #[tokio::test]
    async fn preferences_and_quiet_hours_are_read_from_one_snapshot() {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("herald.db").display()
        );
        let db = crate::connect(&url, 2).await.expect("pool");
        herald_migration::Migrator::up(&db, None)
            .await
            .expect("migrated");
        replace(&db, "ada", wanted(true), night("22:00"))
            .await
            .expect("first wishes stored");

        let ids = ["ada".to_string()];
        let replaced = async {
            replace(&db, "ada", wanted(false), night("23:00"))
                .await
                .expect("wishes replaced between the reads");
        };
        let read = load_many_between(&db, &ids, replaced)
            .await
            .expect("wishes read");
        let ada = &read["ada"];
        let enabled: Vec<bool> = ada.preferences.iter().map(|p| p.enabled).collect();
        let starts = ada.quiet_hours.as_ref().map(|q| q.starts.as_str());
        assert_eq!(
            (enabled, starts),
            (vec![true], Some("22:00")),
            "the wishes stored before the replacement, whole"
        );
        let after = load(&db, "ada").await.expect("wishes read again");
        let starts = after.quiet_hours.as_ref().map(|q| q.starts.as_str());
        assert_eq!(starts, Some("23:00"), "the replacement is read afterwards");
    }
}
