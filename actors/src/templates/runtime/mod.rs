//! Runtime templates: stored in the `templates` table, created and edited through the API, and
//! rendered in a [`sandbox`] (minijinja) at delivery, in the recipient's locale with fallback to
//! the default locale, then to any variant ([`locale::pick`]).
//!
//! Several Herald instances share the database, so the variants read for a code are cached
//! (compiled) only for [`RuntimeSettings::cache_ttl`]: an edit reaches every instance within that
//! time.

pub mod locale;
pub mod sandbox;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use herald_entities::{repo, template};
use herald_nats::{Content, TemplateRef};
use sea_orm::DatabaseConnection;
use serde_json::{Map, Value};

pub use sandbox::{Compiled, Limits, Part, SandboxError, Sources};

/// Codes cached at most; past it, expired entries are dropped.
const CACHE_CAPACITY: usize = 1024;

/// How runtime templates are chosen and rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeSettings {
    /// Locale used when a template has no variant for the recipient's.
    pub default_locale: String,
    /// How long the variants of a code are reused before they are read again.
    pub cache_ttl: Duration,
    /// The sandbox's limits.
    pub limits: Limits,
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        Self {
            default_locale: "en".into(),
            cache_ttl: Duration::from_secs(5),
            limits: Limits::default(),
        }
    }
}

/// Why a notification's template could not be rendered.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TemplateError {
    /// The database could not be read; worth retrying.
    #[error("cannot read template {code:?}: {reason}")]
    Unavailable {
        /// The template.
        code: String,
        /// The database's reason.
        reason: String,
    },
    /// No compiled or runtime template has this code (it was deleted after the send was accepted,
    /// or a routing rule names one not created yet).
    #[error("unknown template {0:?}")]
    Unknown(String),
    /// The template did not render with the notification's variables.
    #[error("template {code:?} ({locale}): {reason}")]
    Render {
        /// The template.
        code: String,
        /// The locale variant used.
        locale: String,
        /// Why (names the variable, the part, the limit).
        reason: String,
    },
}

impl TemplateError {
    /// Whether a later attempt may succeed (only a database failure).
    pub fn is_transient(&self) -> bool {
        matches!(self, TemplateError::Unavailable { .. })
    }
}

/// The variant of `variants` for `requested` (see [`locale::pick`]) rendered with `vars`; returns
/// the content and the locale used. `None` when there is no variant at all.
pub fn render_variants(
    variants: &[template::Model],
    requested: &str,
    vars: &Map<String, Value>,
    settings: &RuntimeSettings,
) -> Option<Result<(Content, String), SandboxError>> {
    let locales: Vec<&str> = variants.iter().map(|v| v.locale.as_str()).collect();
    let variant = &variants[locale::pick(&locales, requested, &settings.default_locale)?];
    Some(
        sandbox::render(&sources_of(variant), vars, settings.limits)
            .map(|content| (content, variant.locale.clone())),
    )
}

fn sources_of(variant: &template::Model) -> Sources<'_> {
    Sources {
        subject: variant.subject.as_deref(),
        text: &variant.text,
        html: variant.html.as_deref(),
        short: variant.short.as_deref(),
    }
}

/// A stored variant, compiled (or why it does not compile: it did when it was saved, but the
/// limits may have changed since).
struct CompiledVariant {
    locale: String,
    compiled: Result<Compiled, SandboxError>,
}

/// The compiled variants of a code.
type Variants = Arc<Vec<CompiledVariant>>;

/// A read of a code's variants under way, awaited by every caller that wants them meanwhile.
type Load = Shared<BoxFuture<'static, Result<Variants, TemplateError>>>;

/// The runtime templates as the dispatcher sees them: read from the database, cached briefly.
pub struct RuntimeTemplates {
    db: DatabaseConnection,
    settings: RuntimeSettings,
    cache: Mutex<HashMap<String, Cached>>,
    /// The reads under way, by code (locked before `cache` when both are).
    loading: Mutex<HashMap<String, Load>>,
}

struct Cached {
    read_at: Instant,
    variants: Variants,
}

impl RuntimeTemplates {
    /// Runtime templates read from `db`.
    pub fn new(db: DatabaseConnection, settings: RuntimeSettings) -> Self {
        Self {
            db,
            settings,
            cache: Mutex::new(HashMap::new()),
            loading: Mutex::new(HashMap::new()),
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> &RuntimeSettings {
        &self.settings
    }

    /// Renders the template a notification names: a compiled template when one has the code,
    /// else the runtime template. The locale is the reference's own, else `recipient_locale`,
    /// else the default locale.
    pub async fn render(
        &self,
        reference: &TemplateRef,
        recipient_locale: Option<&str>,
    ) -> Result<Content, TemplateError> {
        let locale = reference
            .locale
            .as_deref()
            .or(recipient_locale)
            .unwrap_or(&self.settings.default_locale);
        let code = &reference.code;
        if let Some(compiled) = super::find(code) {
            return compiled
                .render(locale, &self.settings.default_locale, &reference.variables)
                .map(|(content, _)| content)
                .map_err(|e| TemplateError::Render {
                    code: code.clone(),
                    locale: compiled
                        .resolve_locale(locale, &self.settings.default_locale)
                        .to_string(),
                    reason: e.to_string(),
                });
        }
        let variants = self.variants(code).await?;
        let locales: Vec<&str> = variants.iter().map(|v| v.locale.as_str()).collect();
        let chosen = locale::pick(&locales, locale, &self.settings.default_locale)
            .map(|at| &variants[at])
            .ok_or_else(|| TemplateError::Unknown(code.clone()))?;
        chosen
            .compiled
            .as_ref()
            .map_err(Clone::clone)
            .and_then(|compiled| compiled.render(&reference.variables))
            .map_err(|err| TemplateError::Render {
                code: code.clone(),
                locale: chosen.locale.clone(),
                reason: err.to_string(),
            })
    }

    /// The compiled variants of `code`, from the cache while fresh. A code without variants is not
    /// cached, so a template created after a miss (say, for a routing rule whose events were
    /// dead-lettered meanwhile) is found at once.
    ///
    /// Reads are single-flight per code: callers that miss while a read of the code is under way
    /// wait for its answer instead of each reading and compiling the variants (when a popular
    /// template's entry expires, every concurrent sender of it misses at once).
    async fn variants(&self, code: &str) -> Result<Variants, TemplateError> {
        let ttl = self.settings.cache_ttl;
        if let Some(hit) = lock(&self.cache).get(code)
            && hit.read_at.elapsed() < ttl
        {
            return Ok(hit.variants.clone());
        }
        let load = lock(&self.loading)
            .entry(code.to_string())
            .or_insert_with(|| self.load(code))
            .clone();
        let loaded = load.clone().await;
        self.finish(code, &load, &loaded);
        loaded
    }

    /// A shared read of `code`'s variants from the database, compiled.
    fn load(&self, code: &str) -> Load {
        let (db, limits, code) = (self.db.clone(), self.settings.limits, code.to_string());
        async move {
            let rows = repo::templates::variants(&db, &code).await.map_err(|e| {
                TemplateError::Unavailable {
                    code: code.clone(),
                    reason: e.to_string(),
                }
            })?;
            Ok(Arc::new(
                rows.iter()
                    .map(|row| CompiledVariant {
                        locale: row.locale.clone(),
                        compiled: Compiled::new(&sources_of(row), limits),
                    })
                    .collect(),
            ))
        }
        .boxed()
        .shared()
    }

    /// Ends the read `load` of `code`, answered `loaded`: the first of its callers to get here
    /// removes it and caches what it read (unless caching is off, or the code has no variants).
    fn finish(&self, code: &str, load: &Load, loaded: &Result<Variants, TemplateError>) {
        let mut loading = lock(&self.loading);
        if !loading
            .get(code)
            .is_some_and(|current| current.ptr_eq(load))
        {
            return;
        }
        loading.remove(code);
        let ttl = self.settings.cache_ttl;
        let Ok(variants) = loaded else {
            return;
        };
        if ttl.is_zero() || variants.is_empty() {
            return;
        }
        let mut cache = lock(&self.cache);
        if cache.len() >= CACHE_CAPACITY {
            cache.retain(|_, c| c.read_at.elapsed() < ttl);
        }
        cache.insert(
            code.to_string(),
            Cached {
                read_at: Instant::now(),
                variants: variants.clone(),
            },
        );
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn variant(locale: &str, text: &str) -> template::Model {
        template::Model {
            code: "welcome".into(),
            locale: locale.into(),
            description: String::new(),
            category: None,
            subject: Some(format!("{locale}: {{{{ name }}}}")),
            text: text.into(),
            html: None,
            short: None,
            variables: json!(["name"]),
            version: 1,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
        }
    }

    /// A one-connection in-memory SQLite database holding `variants`.
    async fn database_with(variants: Vec<template::Model>) -> DatabaseConnection {
        use sea_orm::{ActiveModelTrait, ConnectOptions, ConnectionTrait, Database, Schema};
        let mut options = ConnectOptions::new("sqlite::memory:");
        options.max_connections(1).min_connections(1);
        let db = Database::connect(options).await.expect("in-memory SQLite");
        let schema = Schema::new(db.get_database_backend());
        db.execute(&schema.create_table_from_entity(template::Entity))
            .await
            .expect("templates table");
        for variant in variants {
            template::ActiveModel::from(variant)
                .insert(&db)
                .await
                .expect("variant stored");
        }
        db
    }

    /// Callers that miss the same code together (an entry expired under load) share one read of
    /// it: each used to read and compile every variant itself.
    #[tokio::test]
    async fn concurrent_misses_of_a_code_share_one_read() {
        let db = database_with(vec![variant("en", "Hello {{ name }}")]).await;
        // Nothing is cached: every miss that does not join a read under way reads anew.
        let settings = RuntimeSettings {
            cache_ttl: Duration::ZERO,
            ..RuntimeSettings::default()
        };
        let templates = RuntimeTemplates::new(db, settings);
        let reads = futures::future::join_all((0..8).map(|_| templates.variants("welcome"))).await;
        let first = reads[0].as_ref().expect("read");
        assert_eq!(first.len(), 1);
        for read in &reads {
            assert!(Arc::ptr_eq(read.as_ref().expect("read"), first), "one read");
        }
        assert!(lock(&templates.loading).is_empty(), "the read is over");
        let later = templates.variants("welcome").await.expect("read");
        assert!(!Arc::ptr_eq(&later, first), "a later miss reads again");
    }

    #[tokio::test]
    async fn a_compiled_template_error_names_the_locale_it_rendered() {
        // A compiled template never reads the database.
        let templates = RuntimeTemplates::new(DatabaseConnection::default(), Default::default());
        let reference = TemplateRef {
            code: "order_delivered".into(),
            variables: json!({"order_number": 1001}).as_object().cloned().unwrap(),
            locale: Some("de-DE".into()),
        };
        let err = templates.render(&reference, None).await.unwrap_err();
        assert!(
            matches!(&err, TemplateError::Render { locale, .. } if locale == "en"),
            "{err}"
        );
    }

    #[test]
    fn locale_variants_fall_back_to_the_default_locale() {
        let variants = [
            variant("de", "Hallo {{ name }}"),
            variant("en", "Hello {{ name }}"),
            variant("fr", "Bonjour {{ name }}"),
        ];
        let vars = json!({"name": "Ada"}).as_object().cloned().unwrap();
        let settings = RuntimeSettings::default();
        let render = |locale: &str| {
            render_variants(&variants, locale, &vars, &settings)
                .unwrap()
                .unwrap()
        };
        let (content, used) = render("de-AT");
        assert_eq!((content.text.as_str(), used.as_str()), ("Hallo Ada", "de"));
        assert_eq!(content.subject.as_deref(), Some("de: Ada"));
        assert_eq!(render("it-IT").1, "en");
        let french_default = RuntimeSettings {
            default_locale: "fr".into(),
            ..RuntimeSettings::default()
        };
        let (_, used) = render_variants(&variants, "it", &vars, &french_default)
            .unwrap()
            .unwrap();
        assert_eq!(used, "fr");
        assert!(render_variants(&[], "en", &vars, &settings).is_none());
    }
}
