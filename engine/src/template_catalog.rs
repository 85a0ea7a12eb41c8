//! The engine's side of [`herald_api::templates::TemplateCatalog`]: the compiled templates of the
//! actors crate, for the API's list and preview.

use herald_actors::templates::{self, RenderError};
use herald_api::templates::{
    PreviewError, RenderedTemplate, TemplateCatalog, TemplateInfo, VariableInfo,
};
use serde_json::{Map, Value};

/// The compiled templates.
pub struct CompiledTemplates;

impl TemplateCatalog for CompiledTemplates {
    fn list(&self) -> Vec<TemplateInfo> {
        templates::catalog()
            .iter()
            .map(|t| TemplateInfo {
                code: t.code.into(),
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

    fn preview(
        &self,
        code: &str,
        locale: &str,
        variables: &Map<String, Value>,
    ) -> Result<RenderedTemplate, PreviewError> {
        match templates::render(code, locale, variables) {
            Ok((content, used)) => Ok(RenderedTemplate {
                code: code.into(),
                locale: used.into(),
                subject: content.subject,
                text: content.text,
                html: content.html,
                short: content.short,
            }),
            Err(RenderError::UnknownTemplate(_)) => Err(PreviewError::UnknownTemplate),
            Err(RenderError::MissingVariable { name, .. }) => {
                Err(PreviewError::MissingVariable(name.into()))
            }
            Err(other) => Err(PreviewError::Invalid(other.to_string())),
        }
    }
}
