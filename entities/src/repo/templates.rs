//! Queries on `templates`.

use chrono::Utc;
use sea_orm::{
    ActiveValue::Set,
    ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, SqlErr,
    sea_query::{Expr, ExprTrait},
};

use crate::{RepoError, template};

/// A locale variant to create or replace.
#[derive(Debug, Clone)]
pub struct TemplateVariant {
    /// Template code.
    pub code: String,
    /// Locale.
    pub locale: String,
    /// What it is for.
    pub description: String,
    /// Informative category.
    pub category: Option<String>,
    /// Subject source.
    pub subject: Option<String>,
    /// Plain-text source.
    pub text: String,
    /// HTML source.
    pub html: Option<String>,
    /// Short-text source.
    pub short: Option<String>,
    /// Variable names the sources use.
    pub variables: Vec<String>,
}

/// Whether [`save`] created the variant or replaced an existing one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Saved {
    /// A new variant (version 1).
    Created(template::Model),
    /// An existing variant, replaced (version incremented).
    Updated(template::Model),
}

/// Creates the variant, or replaces the stored one with the same code and locale.
///
/// A replacement increments the stored version in its own UPDATE (`version = version + 1`), so
/// concurrent saves of one variant each get a version of their own, the last written the highest.
pub async fn save(db: &impl ConnectionTrait, variant: TemplateVariant) -> Result<Saved, RepoError> {
    if let Some(updated) = update(db, &variant).await? {
        return Ok(Saved::Updated(updated));
    }
    let now = Utc::now();
    let row = template::ActiveModel {
        code: Set(variant.code.clone()),
        locale: Set(variant.locale.clone()),
        version: Set(1),
        created_at: Set(now),
        ..active(&variant)
    };
    match template::Entity::insert(row).exec_with_returning(db).await {
        Ok(model) => Ok(Saved::Created(model)),
        // Created concurrently by another request: replace that one.
        Err(err) if matches!(err.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => {
            match update(db, &variant).await? {
                Some(updated) => Ok(Saved::Updated(updated)),
                None => Err(err.into()),
            }
        }
        Err(err) => Err(err.into()),
    }
}

/// Replaces the stored variant, if there is one, with the next version.
async fn update(
    db: &impl ConnectionTrait,
    variant: &TemplateVariant,
) -> Result<Option<template::Model>, RepoError> {
    let version = template::Column::Version;
    Ok(template::Entity::update_many()
        .set(active(variant))
        .col_expr(version, Expr::col(version).add(1))
        .filter(template::Column::Code.eq(&variant.code))
        .filter(template::Column::Locale.eq(&variant.locale))
        .exec_with_returning(db)
        .await?
        .pop())
}

/// The columns every save sets.
fn active(variant: &TemplateVariant) -> template::ActiveModel {
    template::ActiveModel {
        description: Set(variant.description.clone()),
        category: Set(variant.category.clone()),
        subject: Set(variant.subject.clone()),
        text: Set(variant.text.clone()),
        html: Set(variant.html.clone()),
        short: Set(variant.short.clone()),
        variables: Set(serde_json::json!(variant.variables)),
        updated_at: Set(Utc::now()),
        ..Default::default()
    }
}

/// One variant.
pub async fn find(
    db: &impl ConnectionTrait,
    code: &str,
    locale: &str,
) -> Result<Option<template::Model>, RepoError> {
    Ok(
        template::Entity::find_by_id((code.to_string(), locale.to_string()))
            .one(db)
            .await?,
    )
}

/// Every variant of a template, by locale.
pub async fn variants(
    db: &impl ConnectionTrait,
    code: &str,
) -> Result<Vec<template::Model>, RepoError> {
    Ok(template::Entity::find()
        .filter(template::Column::Code.eq(code))
        .order_by_asc(template::Column::Locale)
        .all(db)
        .await?)
}

/// Every variant of every runtime template, by code and locale.
pub async fn list(db: &impl ConnectionTrait) -> Result<Vec<template::Model>, RepoError> {
    Ok(template::Entity::find()
        .order_by_asc(template::Column::Code)
        .order_by_asc(template::Column::Locale)
        .all(db)
        .await?)
}

/// Deletes one variant, or every variant of `code` when `locale` is `None`; returns how many.
pub async fn delete(
    db: &impl ConnectionTrait,
    code: &str,
    locale: Option<&str>,
) -> Result<u64, RepoError> {
    let mut query = template::Entity::delete_many().filter(template::Column::Code.eq(code));
    if let Some(locale) = locale {
        query = query.filter(template::Column::Locale.eq(locale));
    }
    Ok(query.exec(db).await?.rows_affected)
}

/// The variable names stored with a variant.
pub fn variables_of(row: &template::Model) -> Vec<String> {
    serde_json::from_value(row.variables.clone()).unwrap_or_default()
}
