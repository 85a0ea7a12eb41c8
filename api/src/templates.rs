//! `/api/v1/templates`: list the templates with their variables, preview one, and create, replace
//! and delete runtime templates.
//!
//! Compiled templates live in the engine (actors crate); runtime templates live in the database
//! and render in the engine's sandbox. The API reaches both through [`TemplateCatalog`], which the
//! engine implements, so the API does not depend on the actors. A runtime template may not take a
//! compiled template's code (409): a code always means one template.

use chrono::{DateTime, Utc};
use herald_entities::{
    repo::templates::{self as repo, Saved, TemplateVariant},
    template,
};
use herald_nats::{Category, TemplateRef};
use poem_openapi::{ApiResponse, Object, OpenApi, Tags, param::Path, payload::Json};
use serde_json::{Map, Value};

use crate::{
    ApiError, AppState,
    auth::{AdminKey, ReadKey},
    validate,
};

/// Longest template code.
const MAX_CODE: usize = 64;
/// Longest description.
const MAX_DESCRIPTION: usize = 1000;

#[derive(Tags)]
enum TemplateTags {
    /// Message templates.
    Templates,
}

/// One variable of a template.
#[derive(Debug, Clone, Object)]
pub struct VariableInfo {
    /// Name in the variables map.
    pub name: String,
    /// Whether rendering fails without it.
    pub required: bool,
    /// What it holds.
    pub description: String,
}

/// A template.
#[derive(Debug, Clone, Object)]
pub struct TemplateInfo {
    /// Code, e.g. `order_shipped`.
    pub code: String,
    /// `compiled` (built into Herald) or `runtime` (created through this API).
    pub kind: String,
    /// What it is for.
    pub description: String,
    /// Locales it has; the first is the default others fall back to.
    pub locales: Vec<String>,
    /// Its variables.
    pub variables: Vec<VariableInfo>,
}

/// A rendered template.
#[derive(Debug, Clone, Object)]
// Absent values are left out, as the spec (no `nullable`) says.
#[oai(skip_serializing_if_is_none)]
pub struct RenderedTemplate {
    /// The template.
    pub code: String,
    /// The locale used (after fallback).
    pub locale: String,
    /// Email subject, push title.
    pub subject: Option<String>,
    /// Plain text.
    pub text: String,
    /// HTML email.
    pub html: Option<String>,
    /// Short text for SMS, Telegram and push.
    pub short: Option<String>,
}

/// A preview request.
#[derive(Debug, Clone, Object)]
#[oai(deny_unknown_fields)]
pub struct PreviewRequest {
    /// Language tag (`de-DE`); falls back to the language, then to the default locale.
    pub locale: Option<String>,
    /// The variables, as a JSON object.
    pub variables: Value,
}

/// The sources of one locale variant of a runtime template (minijinja syntax:
/// `{{ variable }}`, `{% if %}`, `{% for %}`, filters).
#[derive(Debug, Clone, Object)]
#[oai(deny_unknown_fields)]
pub struct TemplateSource {
    /// What the template is for.
    #[oai(default)]
    pub description: String,
    /// The category it is meant for (informative): `transactional`, `security`, `account`,
    /// `marketing`.
    pub category: Option<String>,
    /// Subject (email) and title (push); rendered as one line.
    pub subject: Option<String>,
    /// Plain-text body; every channel can carry it. Not escaped.
    pub text: String,
    /// HTML body for email; variables are HTML-escaped.
    pub html: Option<String>,
    /// Short text for SMS, Telegram and push; rendered as one line.
    pub short: Option<String>,
}

/// A stored locale variant of a runtime template.
#[derive(Debug, Clone, Object)]
// Absent values are left out, as the spec (no `nullable`) says.
#[oai(skip_serializing_if_is_none)]
pub struct TemplateVariantView {
    /// The template's code.
    pub code: String,
    /// This variant's locale.
    pub locale: String,
    /// What the template is for.
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
    /// The variables the sources use.
    pub variables: Vec<String>,
    /// 1 when created, incremented by every replacement.
    pub version: i32,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
}

/// A template with its locale variants (none for a compiled template).
#[derive(Debug, Clone, Object)]
pub struct TemplateDetail {
    /// Code, locales and variables.
    pub template: TemplateInfo,
    /// The runtime template's locale variants, by locale.
    pub variants: Vec<TemplateVariantView>,
}

/// Responses of `PUT /api/v1/templates/{code}/locales/{locale}`.
#[derive(ApiResponse)]
pub enum SavedVariant {
    /// Created (version 1).
    #[oai(status = 201)]
    Created(Json<TemplateVariantView>),
    /// Replaced (version incremented).
    #[oai(status = 200)]
    Replaced(Json<TemplateVariantView>),
}

/// Responses of the deletes.
#[derive(ApiResponse)]
pub enum Deleted {
    /// Deleted.
    #[oai(status = 204)]
    Deleted,
}

/// Why a preview failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PreviewError {
    /// No template has this code.
    UnknownTemplate,
    /// A required variable is absent.
    MissingVariable(String),
    /// A variable has a wrong type or value.
    InvalidVariable {
        /// The variable (`order_number`, `items[0].quantity`).
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A variable has a wrong type or value, or the engine failed; the message says which.
    Invalid(String),
}

/// A runtime template source that does not compile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceError {
    /// The part at fault: `subject`, `text`, `html` or `short`.
    pub part: String,
    /// What is wrong, with the line.
    pub message: String,
}

/// The engine's templates, as the API sees them.
pub trait TemplateCatalog: Send + Sync + 'static {
    /// Every compiled template.
    fn list(&self) -> Vec<TemplateInfo>;
    /// Whether a compiled template has this code.
    fn is_compiled(&self, code: &str) -> bool;
    /// Renders compiled template `code` in the best locale for `locale` (empty: the default).
    fn preview(
        &self,
        code: &str,
        locale: &str,
        variables: &Map<String, Value>,
    ) -> Result<RenderedTemplate, PreviewError>;
    /// Compiles a runtime template's sources; returns the variables they use.
    fn compile(&self, source: &TemplateSource) -> Result<Vec<String>, SourceError>;
    /// Renders the best of a runtime template's `variants` for `locale` (empty: the default).
    fn preview_runtime(
        &self,
        variants: &[template::Model],
        locale: &str,
        variables: &Map<String, Value>,
    ) -> Result<RenderedTemplate, PreviewError>;
    /// The locale templates fall back to (`templates.default_locale`).
    fn default_locale(&self) -> &str;
}

/// Template endpoints.
pub struct TemplatesApi {
    state: AppState,
}

impl TemplatesApi {
    /// The endpoints over the shared state.
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

#[OpenApi(prefix_path = "/api/v1", tag = "TemplateTags::Templates")]
impl TemplatesApi {
    /// List the templates, compiled and runtime, with their locales and variables (scope `read`).
    #[oai(path = "/templates", method = "get")]
    async fn list(&self, _auth: ReadKey) -> Result<Json<Vec<TemplateInfo>>, ApiError> {
        let mut all = self.state.templates.list();
        let rows = repo::list(&self.state.db).await?;
        let default = self.state.templates.default_locale();
        all.extend(
            rows.chunk_by(|a, b| a.code == b.code)
                .map(|variants| runtime_info(variants, default)),
        );
        Ok(Json(all))
    }

    /// A template with its locale variants and their sources (scope `read`); 404 when unknown.
    #[oai(path = "/templates/:code", method = "get")]
    async fn get(
        &self,
        _auth: ReadKey,
        code: Path<String>,
    ) -> Result<Json<TemplateDetail>, ApiError> {
        if let Some(info) = self.compiled_info(&code.0) {
            return Ok(Json(TemplateDetail {
                template: info,
                variants: vec![],
            }));
        }
        let variants = repo::variants(&self.state.db, &code.0).await?;
        if variants.is_empty() {
            return Err(unknown(&code.0));
        }
        Ok(Json(TemplateDetail {
            template: runtime_info(&variants, self.state.templates.default_locale()),
            variants: variants.into_iter().map(variant_view).collect(),
        }))
    }

    /// Create or replace a locale variant of a runtime template (scope `admin`).
    ///
    /// The sources are compiled first: a syntax error is a 400 naming the part (`field` =
    /// `subject`, `text`, `html` or `short`) and the line. A code a compiled template has is a
    /// 409. Answers 201 when the variant is new, 200 when it replaced one (version + 1).
    #[oai(path = "/templates/:code/locales/:locale", method = "put")]
    async fn put_variant(
        &self,
        _auth: AdminKey,
        code: Path<String>,
        locale: Path<String>,
        body: Json<TemplateSource>,
    ) -> Result<SavedVariant, ApiError> {
        let code = template_code(&code.0)?;
        if self.state.templates.is_compiled(&code) {
            return Err(ApiError::conflict(format!(
                "{code:?} is a compiled template; choose another code for a runtime template"
            )));
        }
        let locale = canonical_locale(&validate::locale("locale", &locale.0)?);
        let source = checked_source(body.0)?;
        let variables = self
            .state
            .templates
            .compile(&source)
            .map_err(|e| ApiError::invalid(&e.part, e.message))?;
        let variant = TemplateVariant {
            code,
            locale,
            description: source.description,
            category: source.category,
            subject: source.subject,
            text: source.text,
            html: source.html,
            short: source.short,
            variables,
        };
        Ok(match repo::save(&self.state.db, variant).await? {
            Saved::Created(row) => SavedVariant::Created(Json(variant_view(row))),
            Saved::Updated(row) => SavedVariant::Replaced(Json(variant_view(row))),
        })
    }

    /// Delete one locale variant of a runtime template (scope `admin`); 409 for a compiled
    /// template, 404 when there is none.
    #[oai(path = "/templates/:code/locales/:locale", method = "delete")]
    async fn delete_variant(
        &self,
        _auth: AdminKey,
        code: Path<String>,
        locale: Path<String>,
    ) -> Result<Deleted, ApiError> {
        self.refuse_compiled(&code.0)?;
        let locale = canonical_locale(&locale.0);
        match repo::delete(&self.state.db, &code.0, Some(&locale)).await? {
            0 => Err(ApiError::not_found(format!(
                "template {:?} has no locale {:?}",
                code.0, locale
            ))),
            _ => Ok(Deleted::Deleted),
        }
    }

    /// Delete a runtime template with all its locales (scope `admin`); 409 for a compiled
    /// template, 404 when unknown. Notifications already accepted with it fail at delivery.
    #[oai(path = "/templates/:code", method = "delete")]
    async fn delete(&self, _auth: AdminKey, code: Path<String>) -> Result<Deleted, ApiError> {
        self.refuse_compiled(&code.0)?;
        match repo::delete(&self.state.db, &code.0, None).await? {
            0 => Err(unknown(&code.0)),
            _ => Ok(Deleted::Deleted),
        }
    }

    /// Render a template with the given variables (scope `read`).
    ///
    /// 400 with `field` = `variables.<name>` when a variable is missing or of a wrong type or
    /// value; 404 for an unknown template.
    #[oai(path = "/templates/:code/preview", method = "post")]
    async fn preview(
        &self,
        _auth: ReadKey,
        code: Path<String>,
        body: Json<PreviewRequest>,
    ) -> Result<Json<RenderedTemplate>, ApiError> {
        let Value::Object(variables) = body.0.variables else {
            return Err(ApiError::invalid(
                "variables",
                "variables must be a JSON object",
            ));
        };
        let templates = &self.state.templates;
        let locale = body.0.locale.as_deref().unwrap_or_default();
        let rendered = if templates.is_compiled(&code.0) {
            templates.preview(&code.0, locale, &variables)
        } else {
            let variants = repo::variants(&self.state.db, &code.0).await?;
            templates.preview_runtime(&variants, locale, &variables)
        };
        match rendered {
            Ok(rendered) => Ok(Json(rendered)),
            Err(PreviewError::UnknownTemplate) => Err(unknown(&code.0)),
            Err(PreviewError::MissingVariable(name)) => Err(ApiError::invalid(
                &format!("variables.{name}"),
                format!("missing variable `{name}`"),
            )),
            Err(PreviewError::InvalidVariable { name, reason }) => {
                Err(ApiError::invalid(&format!("variables.{name}"), reason))
            }
            Err(PreviewError::Invalid(reason)) => Err(ApiError::invalid("variables", reason)),
        }
    }
}

impl TemplatesApi {
    /// A compiled template (built into the binary) cannot be deleted: `409`.
    fn refuse_compiled(&self, code: &str) -> Result<(), ApiError> {
        if self.state.templates.is_compiled(code) {
            return Err(ApiError::conflict(format!(
                "{code:?} is a compiled template and cannot be deleted"
            )));
        }
        Ok(())
    }

    fn compiled_info(&self, code: &str) -> Option<TemplateInfo> {
        self.state
            .templates
            .list()
            .into_iter()
            .find(|t| t.code == code)
    }
}

/// Checks a send's template before it is accepted: the code must exist (`field` =
/// `template.code`); a compiled template's typed variables are checked too (`field` =
/// `template.variables.<name>`). A runtime template's variables are checked at delivery, since its
/// locale variants may use different ones.
pub async fn check_send(state: &AppState, template: &TemplateRef) -> Result<(), ApiError> {
    let code = &template.code;
    if !state.templates.is_compiled(code) {
        if repo::variants(&state.db, code).await?.is_empty() {
            return Err(ApiError::invalid(
                "template.code",
                format!("unknown template {code:?}; GET /api/v1/templates lists them"),
            ));
        }
        return Ok(());
    }
    let locale = template.locale.as_deref().unwrap_or("en");
    match state.templates.preview(code, locale, &template.variables) {
        Ok(_) => Ok(()),
        Err(PreviewError::MissingVariable(name)) => Err(ApiError::invalid(
            &format!("template.variables.{name}"),
            format!("template {code:?} needs variable `{name}`"),
        )),
        Err(PreviewError::InvalidVariable { name, reason }) => Err(ApiError::invalid(
            &format!("template.variables.{name}"),
            reason,
        )),
        Err(PreviewError::Invalid(reason)) => Err(ApiError::invalid("template.variables", reason)),
        Err(PreviewError::UnknownTemplate) => Err(ApiError::invalid(
            "template.code",
            format!("unknown template {code:?}"),
        )),
    }
}

fn unknown(code: &str) -> ApiError {
    ApiError::not_found(format!("no template {code:?}"))
}

/// A runtime template's code: 1 to [`MAX_CODE`] of `a-z`, `0-9`, `_`, `-`, `.`.
fn template_code(code: &str) -> Result<String, ApiError> {
    let ok = !code.is_empty()
        && code.len() <= MAX_CODE
        && code
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-.".contains(c));
    if !ok {
        return Err(ApiError::invalid(
            "code",
            format!("code must be 1 to {MAX_CODE} characters of a-z, 0-9, '_', '-', '.'"),
        ));
    }
    Ok(code.to_string())
}

/// A language tag in its usual case (`de-de` → `de-DE`, `zh-hant-tw` → `zh-Hant-TW`), so one
/// locale has one variant.
fn canonical_locale(tag: &str) -> String {
    tag.split('-')
        .enumerate()
        .map(|(at, part)| match (at, part.len()) {
            (0, _) => part.to_ascii_lowercase(),
            (_, 2) => part.to_ascii_uppercase(),
            (_, 4) => {
                let mut chars = part.chars();
                chars.next().map_or_else(String::new, |first| {
                    first.to_ascii_uppercase().to_string() + &chars.as_str().to_ascii_lowercase()
                })
            }
            _ => part.to_ascii_lowercase(),
        })
        .collect::<Vec<_>>()
        .join("-")
}

/// Checks the fields the sandbox does not: description length, category name, a text.
fn checked_source(source: TemplateSource) -> Result<TemplateSource, ApiError> {
    if source.description.len() > MAX_DESCRIPTION {
        return Err(ApiError::invalid(
            "description",
            format!("description is longer than {MAX_DESCRIPTION} bytes"),
        ));
    }
    if let Some(category) = &source.category
        && Category::parse(category).is_none()
    {
        return Err(ApiError::invalid(
            "category",
            "category must be transactional, security, account or marketing",
        ));
    }
    if source.text.trim().is_empty() {
        return Err(ApiError::invalid("text", "text must not be empty"));
    }
    Ok(source)
}

/// A runtime template as listed: its variants' locales (the default first), the union of their
/// variables, the description of the default variant.
fn runtime_info(variants: &[template::Model], default_locale: &str) -> TemplateInfo {
    let mut locales: Vec<String> = variants.iter().map(|v| v.locale.clone()).collect();
    if let Some(at) = locales
        .iter()
        .position(|l| l.eq_ignore_ascii_case(default_locale))
    {
        locales[..=at].rotate_right(1);
    }
    let mut names: Vec<String> = variants.iter().flat_map(repo::variables_of).collect();
    names.sort();
    names.dedup();
    let described = variants
        .iter()
        .find(|v| v.locale.eq_ignore_ascii_case(default_locale))
        .or(variants.first());
    TemplateInfo {
        code: variants.first().map(|v| v.code.clone()).unwrap_or_default(),
        kind: "runtime".into(),
        description: described.map(|v| v.description.clone()).unwrap_or_default(),
        locales,
        variables: names
            .into_iter()
            .map(|name| VariableInfo {
                name,
                required: true,
                description: "used by the template; rendering fails without it unless the \
                              template tests it with `is defined`"
                    .into(),
            })
            .collect(),
    }
}

fn variant_view(row: template::Model) -> TemplateVariantView {
    TemplateVariantView {
        variables: repo::variables_of(&row),
        code: row.code,
        locale: row.locale,
        description: row.description,
        category: row.category,
        subject: row.subject,
        text: row.text,
        html: row.html,
        short: row.short,
        version: row.version,
        updated_at: row.updated_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(locale: &str, variables: &[&str]) -> template::Model {
        template::Model {
            code: "welcome".into(),
            locale: locale.into(),
            description: format!("welcome in {locale}"),
            category: None,
            subject: None,
            text: "Hi".into(),
            html: None,
            short: None,
            variables: serde_json::json!(variables),
            version: 1,
            created_at: Utc::now(),
            updated_at: Utc::now(),
        }
    }

    #[test]
    fn runtime_templates_list_the_default_locale_first_and_every_variable() {
        let info = runtime_info(
            &[
                row("de", &["name"]),
                row("en", &["name", "coupon"]),
                row("fr", &[]),
            ],
            "en",
        );
        assert_eq!(info.code, "welcome");
        assert_eq!(info.kind, "runtime");
        assert_eq!(info.locales, ["en", "de", "fr"]);
        assert_eq!(info.description, "welcome in en");
        let names: Vec<&str> = info.variables.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["coupon", "name"]);
    }

    #[test]
    fn locales_are_stored_in_their_usual_case() {
        assert_eq!(canonical_locale("de-de"), "de-DE");
        assert_eq!(canonical_locale("EN"), "en");
        assert_eq!(canonical_locale("zh-hant-tw"), "zh-Hant-TW");
        assert_eq!(canonical_locale("es-419"), "es-419");
        // Not a valid tag, but a path may hold anything: no panic on non-ASCII.
        assert_eq!(canonical_locale("x-éé"), "x-éé");
    }

    #[test]
    fn codes_are_short_lowercase_names() {
        assert_eq!(template_code("welcome_v2").unwrap(), "welcome_v2");
        assert!(template_code("").is_err());
        assert!(template_code("Welcome").is_err());
        assert!(template_code("a b").is_err());
        assert!(template_code(&"x".repeat(MAX_CODE + 1)).is_err());
    }
}
