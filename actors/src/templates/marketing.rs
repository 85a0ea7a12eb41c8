//! The marketing campaign template.

use serde::Deserialize;
use serde_json::{Map, Value};

use super::{RenderError, TemplateDef, Variable, check_link, localized, typed};
use herald_nats::Content;

/// Variables of `marketing`.
#[derive(Debug, Clone, Deserialize)]
pub struct Marketing {
    customer_name: Option<String>,
    headline: String,
    body: String,
    url: Option<String>,
}

/// `marketing`: a campaign message.
pub const MARKETING: TemplateDef = TemplateDef {
    code: "marketing",
    description: "Campaign message with a headline, a body and a call to action.",
    variables: &[
        Variable {
            name: "customer_name",
            required: false,
            description: "The customer's name, for the greeting.",
        },
        Variable {
            name: "headline",
            required: true,
            description: "Headline (subject, push title).",
        },
        Variable {
            name: "body",
            required: true,
            description: "The message.",
        },
        Variable {
            name: "url",
            required: false,
            description: "Call to action link (http or https).",
        },
    ],
    locales: &["en"],
    render: render_marketing,
};

localized!(marketing_en for super::Marketing {
    subject: "{{ v.headline }}",
    short: "{{ v.headline }}{% if let Some(url) = v.url %} {{ url }}{% endif %}",
    text: "email/marketing.en.txt",
    html: "email/marketing.en.html",
});

fn render_marketing(_locale: &str, vars: &Map<String, Value>) -> Result<Content, RenderError> {
    let code = MARKETING.code;
    let v: Marketing = typed(code, vars)?;
    check_link(code, "url", v.url.as_ref())?;
    marketing_en::render(code, &v)
}
