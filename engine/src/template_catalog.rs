//! The engine's side of [`herald_api::templates::TemplateCatalog`]: the compiled templates of the
//! actors crate, and the sandbox runtime templates compile and render in, for the API's list,
//! preview and validation.

use herald_actors::templates::{
    self, RenderError,
    runtime::{self, RuntimeSettings, SandboxError, Sources},
};
use herald_api::templates::{
    PreviewError, RenderedTemplate, SourceError, TemplateCatalog, TemplateInfo, TemplateSource,
    VariableInfo,
};
use herald_entities::template;
use herald_nats::Content;
use serde_json::{Map, Value};

/// The compiled templates and the runtime templates' sandbox.
pub struct EngineTemplates {
    /// Default locale and sandbox limits of runtime templates.
    pub settings: RuntimeSettings,
}

impl TemplateCatalog for EngineTemplates {
    fn list(&self) -> Vec<TemplateInfo> {
        templates::catalog()
            .iter()
            .map(|t| TemplateInfo {
                code: t.code.into(),
                kind: "compiled".into(),
                description: t.description.into(),
                locales: t.locales.iter().map(|l| l.to_string()).collect(),
                variables: t
                    .variables
                    .iter()
                    .map(|v| VariableInfo {
                        name: v.name.into(),
                        required: v.required,
                        description: v.description.into(),
                    })
                    .collect(),
            })
            .collect()
    }

    fn is_compiled(&self, code: &str) -> bool {
        templates::find(code).is_some()
    }

    fn preview(
        &self,
        code: &str,
        locale: &str,
        variables: &Map<String, Value>,
    ) -> Result<RenderedTemplate, PreviewError> {
        let error = match templates::render(code, locale, &self.settings.default_locale, variables)
        {
            Ok((content, used)) => return Ok(rendered(code, used, content)),
            Err(error) => error,
        };
        let reason = error.to_string();
        Err(match error {
            RenderError::UnknownTemplate(_) => PreviewError::UnknownTemplate,
            RenderError::MissingVariable { name, .. } => PreviewError::MissingVariable(name.into()),
            RenderError::InvalidVariable {
                name: Some(name), ..
            } => PreviewError::InvalidVariable { name, reason },
            _ => PreviewError::Invalid(reason),
        })
    }

    fn compile(&self, source: &TemplateSource) -> Result<Vec<String>, SourceError> {
        runtime::sandbox::compile(&Sources {
            subject: source.subject.as_deref(),
            text: &source.text,
            html: source.html.as_deref(),
            short: source.short.as_deref(),
        })
        .map_err(|e| SourceError {
            part: e.part().as_str().into(),
            message: e.to_string(),
        })
    }

    fn preview_runtime(
        &self,
        variants: &[template::Model],
        locale: &str,
        variables: &Map<String, Value>,
    ) -> Result<RenderedTemplate, PreviewError> {
        let code = variants
            .first()
            .map(|v| v.code.as_str())
            .unwrap_or_default();
        match runtime::render_variants(variants, locale, variables, &self.settings) {
            None => Err(PreviewError::UnknownTemplate),
            Some(Ok((content, used))) => Ok(rendered(code, &used, content)),
            Some(Err(SandboxError::MissingVariable { name, .. })) => {
                Err(PreviewError::MissingVariable(name))
            }
            Some(Err(other)) => Err(PreviewError::Invalid(other.to_string())),
        }
    }

    fn default_locale(&self) -> &str {
        &self.settings.default_locale
    }
}

fn rendered(code: &str, locale: &str, content: Content) -> RenderedTemplate {
    RenderedTemplate {
        code: code.into(),
        locale: locale.into(),
        subject: content.subject,
        text: content.text,
        html: content.html,
        short: content.short,
    }
}
