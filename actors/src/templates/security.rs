//! The security alert template.

use serde::Deserialize;
use serde_json::{Map, Value};

use super::{RenderError, TemplateDef, Variable, localized, typed};
use herald_nats::Content;

/// Variables of `security_alert`.
#[derive(Debug, Clone, Deserialize)]
pub struct SecurityAlert {
    customer_name: Option<String>,
    ip: String,
    location: Option<String>,
    device: Option<String>,
    occurred_at: String,
}

/// `security_alert`: a sign-in from a new device or place.
pub const SECURITY_ALERT: TemplateDef = TemplateDef {
    code: "security_alert",
    description: "Sign-in alert with IP address, location and device.",
    variables: &[
        Variable {
            name: "customer_name",
            required: false,
            description: "The customer's name, for the greeting.",
        },
        Variable {
            name: "ip",
            required: true,
            description: "The IP address of the sign-in.",
        },
        Variable {
            name: "location",
            required: false,
            description: "Rough location of that address.",
        },
        Variable {
            name: "device",
            required: false,
            description: "Device or browser.",
        },
        Variable {
            name: "occurred_at",
            required: true,
            description: "When it happened, formatted in the customer's time zone.",
        },
    ],
    locales: &["en"],
    render: render_alert,
};

localized!(alert_en for super::SecurityAlert {
    subject: "New sign-in to your account",
    short: "New sign-in to your account from {{ v.ip }}{% if let Some(l) = v.location %} ({{ l }}){% endif %} on {{ v.occurred_at }}. Not you? Change your password.",
    text: "email/security_alert.en.txt",
    html: "email/security_alert.en.html",
});

fn render_alert(_locale: &str, vars: &Map<String, Value>) -> Result<Content, RenderError> {
    let code = SECURITY_ALERT.code;
    let v: SecurityAlert = typed(code, vars)?;
    alert_en::render(code, &v)
}
