//! Compiled templates (askama): for each template code a typed set of variables and, per locale,
//! an email subject, a plain text, a responsive HTML email (extending `email/base.html`) and a
//! short text for SMS, Telegram and push.
//!
//! Variables arrive as a JSON map (from an event, or from the preview API). Required variables are
//! checked by name before anything renders, so a missing one is [`RenderError::MissingVariable`]
//! naming it — never an empty string in a sent message. HTML output is escaped by askama; text
//! output is not (it is not HTML).
//!
//! Locales fall back from the most specific to the configured default (`templates.default_locale`),
//! then to the template's first: `de-DE` → `de` → default → `en`.
//!
//! Templates created at run time through the API live in the database and render in a sandbox:
//! see [`runtime`].

mod marketing;
mod orders;
pub mod runtime;
mod security;
pub mod variables;

use herald_nats::Content;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use serde_path_to_error::Segment;

/// One variable a template takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variable {
    /// Its name in the variables map.
    pub name: &'static str,
    /// Whether rendering fails without it.
    pub required: bool,
    /// What it holds.
    pub description: &'static str,
}

/// A template: its code, what it is for, its variables and locales.
pub struct TemplateDef {
    /// The code rules and the API name it by, e.g. `order_shipped`.
    pub code: &'static str,
    /// What it is for.
    pub description: &'static str,
    /// Its variables.
    pub variables: &'static [Variable],
    /// Locales it has; the first is the default.
    pub locales: &'static [&'static str],
    render: fn(&str, &Map<String, Value>) -> Result<Content, RenderError>,
}

impl TemplateDef {
    /// The best locale this template has for `requested`: the whole tag, then its language, then
    /// `default` (the configured `templates.default_locale`) and its language, then the
    /// template's own first locale (see [`runtime::locale::pick`]).
    pub fn resolve_locale(&self, requested: &str, default: &str) -> &'static str {
        let at = runtime::locale::pick(self.locales, requested, default).unwrap_or(0);
        self.locales[at]
    }

    /// Renders in the best locale for `locale` (falling back to `default`, see
    /// [`TemplateDef::resolve_locale`]); returns the content and the locale used.
    pub fn render(
        &self,
        locale: &str,
        default: &str,
        vars: &Map<String, Value>,
    ) -> Result<(Content, &'static str), RenderError> {
        self.check_required(vars)?;
        let locale = self.resolve_locale(locale, default);
        Ok(((self.render)(locale, vars)?, locale))
    }

    fn check_required(&self, vars: &Map<String, Value>) -> Result<(), RenderError> {
        match self
            .variables
            .iter()
            .find(|v| v.required && vars.get(v.name).is_none_or(Value::is_null))
        {
            Some(missing) => Err(RenderError::MissingVariable {
                template: self.code,
                name: missing.name,
            }),
            None => Ok(()),
        }
    }
}

/// Why a template did not render.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// No template has this code.
    #[error("unknown template {0:?}")]
    UnknownTemplate(String),
    /// A required variable is absent or null.
    #[error("template {template}: missing variable `{name}`")]
    MissingVariable {
        /// The template.
        template: &'static str,
        /// The variable.
        name: &'static str,
    },
    /// A variable has the wrong type or an unacceptable value.
    #[error("template {template}: invalid variables: {reason}")]
    InvalidVariable {
        /// The template.
        template: &'static str,
        /// The variable at fault (`order_number`, `items[0].quantity`), when one is.
        name: Option<String>,
        /// What is wrong (names the variable).
        reason: String,
    },
    /// The template engine failed.
    #[error("template {template}: {reason}")]
    Engine {
        /// The template.
        template: &'static str,
        /// The engine's reason.
        reason: String,
    },
}

/// Every compiled template.
pub fn catalog() -> &'static [TemplateDef] {
    static CATALOG: [TemplateDef; 5] = [
        orders::ORDER_PLACED,
        orders::ORDER_SHIPPED,
        orders::ORDER_DELIVERED,
        security::SECURITY_ALERT,
        marketing::MARKETING,
    ];
    &CATALOG
}

/// The template with this code.
pub fn find(code: &str) -> Option<&'static TemplateDef> {
    catalog().iter().find(|t| t.code == code)
}

/// Renders template `code` in the best locale for `locale`, else for `default`.
pub fn render(
    code: &str,
    locale: &str,
    default: &str,
    vars: &Map<String, Value>,
) -> Result<(Content, &'static str), RenderError> {
    find(code)
        .ok_or_else(|| RenderError::UnknownTemplate(code.to_string()))?
        .render(locale, default, vars)
}

/// Reads a template's typed variables from the map (required ones were checked already); the
/// error names the variable at fault.
fn typed<T: DeserializeOwned>(
    template: &'static str,
    vars: &Map<String, Value>,
) -> Result<T, RenderError> {
    serde_path_to_error::deserialize(Value::Object(vars.clone())).map_err(|e| {
        let known = |s: &Segment| !matches!(s, Segment::Unknown);
        let name = e.path().iter().any(known).then(|| e.path().to_string());
        RenderError::InvalidVariable {
            template,
            name,
            reason: e.to_string(),
        }
    })
}

/// Refuses link variables that are not http(s) (a `javascript:` link in an email).
fn check_link(template: &'static str, name: &str, url: Option<&String>) -> Result<(), RenderError> {
    match url {
        Some(url) if !(url.starts_with("https://") || url.starts_with("http://")) => {
            Err(RenderError::InvalidVariable {
                template,
                name: Some(name.to_string()),
                reason: format!("`{name}` must be an http(s) URL"),
            })
        }
        _ => Ok(()),
    }
}

/// Assembles the four parts; subject and short text are single lines.
fn content(
    template: &'static str,
    subject: Result<String, askama::Error>,
    text: Result<String, askama::Error>,
    html: Result<String, askama::Error>,
    short: Result<String, askama::Error>,
) -> Result<Content, RenderError> {
    let engine = |e: askama::Error| RenderError::Engine {
        template,
        reason: e.to_string(),
    };
    let one_line = |s: String| s.split_whitespace().collect::<Vec<_>>().join(" ");
    Ok(Content {
        subject: Some(one_line(subject.map_err(engine)?)),
        text: text.map_err(engine)?.trim().to_string() + "\n",
        html: Some(html.map_err(engine)?),
        short: Some(one_line(short.map_err(engine)?)),
        template: None,
    })
}

/// Declares, for a variables type and a locale, the askama templates of the four parts: subject
/// and short text inline, text and HTML from files under `actors/templates/`.
macro_rules! localized {
    ($module:ident for $vars:ty {
        subject: $subject:tt,
        short: $short:tt,
        text: $text:tt,
        html: $html:tt $(,)?
    }) => {
        mod $module {
            use askama::Template;

            #[derive(Template)]
            #[template(source = $subject, ext = "txt")]
            struct Subject<'a> {
                // A fixed subject uses no variable.
                #[allow(dead_code)]
                v: &'a $vars,
            }

            #[derive(Template)]
            #[template(source = $short, ext = "txt")]
            struct Short<'a> {
                v: &'a $vars,
            }

            #[derive(Template)]
            #[template(path = $text)]
            struct Text<'a> {
                v: &'a $vars,
            }

            #[derive(Template)]
            #[template(path = $html)]
            struct Html<'a> {
                v: &'a $vars,
            }

            /// Renders the four parts.
            pub(super) fn render(
                template: &'static str,
                v: &$vars,
            ) -> Result<herald_nats::Content, super::super::RenderError> {
                super::super::content(
                    template,
                    Subject { v }.render(),
                    Text { v }.render(),
                    Html { v }.render(),
                    Short { v }.render(),
                )
            }
        }
    };
}
pub(crate) use localized;

#[cfg(test)]
mod tests;
