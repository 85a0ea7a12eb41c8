//! `/api/v1/templates`: list the templates with their variables, and preview one.
//!
//! The templates are compiled into the engine (actors crate); the API reaches them through
//! [`TemplateCatalog`], which the engine implements, so the API does not depend on the actors.

use poem_openapi::{Object, OpenApi, Tags, param::Path, payload::Json};
use serde_json::{Map, Value};

use crate::{ApiError, AppState, auth::ReadKey};

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
pub struct PreviewRequest {
    /// Language tag (`de-DE`); falls back to the language, then to the template's default.
    pub locale: Option<String>,
    /// The variables, as a JSON object.
    pub variables: Value,
}

/// Why a preview failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PreviewError {
    /// No template has this code.
    UnknownTemplate,
    /// A required variable is absent.
    MissingVariable(String),
    /// A variable has a wrong type or value, or the engine failed; the message says which.
    Invalid(String),
}

/// The engine's templates, as the API sees them.
pub trait TemplateCatalog: Send + Sync + 'static {
    /// Every template.
    fn list(&self) -> Vec<TemplateInfo>;
    /// Renders template `code` in the best locale for `locale`.
    fn preview(
        &self,
        code: &str,
        locale: &str,
        variables: &Map<String, Value>,
    ) -> Result<RenderedTemplate, PreviewError>;
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
    /// List the templates with their locales and variables (scope `read`).
    #[oai(path = "/templates", method = "get")]
    async fn list(&self, _auth: ReadKey) -> Result<Json<Vec<TemplateInfo>>, ApiError> {
        Ok(Json(self.state.templates.list()))
    }

    /// Render a template with the given variables (scope `read`).
    ///
    /// 400 with `field` = `variables.<name>` when a required variable is missing; 404 for an
    /// unknown template.
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
        let locale = body.0.locale.as_deref().unwrap_or("en");
        match self.state.templates.preview(&code.0, locale, &variables) {
            Ok(rendered) => Ok(Json(rendered)),
            Err(PreviewError::UnknownTemplate) => {
                Err(ApiError::not_found(format!("no template {:?}", code.0)))
            }
            Err(PreviewError::MissingVariable(name)) => Err(ApiError::invalid(
                &format!("variables.{name}"),
                format!("missing variable `{name}`"),
            )),
            Err(PreviewError::Invalid(reason)) => Err(ApiError::invalid("variables", reason)),
        }
    }
}
