//! Order templates: placed, shipped, delivered.

use serde::Deserialize;
use serde_json::{Map, Value};

use super::{RenderError, TemplateDef, Variable, check_link, localized, typed};
use herald_nats::Content;

const CUSTOMER_NAME: Variable = Variable {
    name: "customer_name",
    required: false,
    description: "The customer's name, for the greeting.",
};
const ORDER_NUMBER: Variable = Variable {
    name: "order_number",
    required: true,
    description: "The shop's order number.",
};

/// One order line, ready to show.
#[derive(Debug, Clone, Deserialize)]
pub struct ItemLine {
    /// Product name.
    pub name: String,
    /// How many.
    pub quantity: u32,
    /// Line price, formatted (`21.00 EUR`).
    pub price: String,
}

/// Variables of `order_placed`.
#[derive(Debug, Clone, Deserialize)]
pub struct OrderPlaced {
    customer_name: Option<String>,
    order_number: String,
    total: String,
    #[serde(default)]
    items: Vec<ItemLine>,
}

/// `order_placed`: the order confirmation.
pub const ORDER_PLACED: TemplateDef = TemplateDef {
    code: "order_placed",
    description: "Order confirmation with its lines and total.",
    variables: &[
        CUSTOMER_NAME,
        ORDER_NUMBER,
        Variable {
            name: "total",
            required: true,
            description: "The order total, formatted (`42.00 EUR`).",
        },
        Variable {
            name: "items",
            required: false,
            description: "Lines: array of {name, quantity, price}.",
        },
    ],
    locales: &["en", "de"],
    render: render_placed,
};

localized!(placed_en for super::OrderPlaced {
    subject: "Your order {{ v.order_number }} is confirmed",
    short: "Thanks for your order {{ v.order_number }} ({{ v.total }}). We'll tell you when it ships.",
    text: "email/order_placed.en.txt",
    html: "email/order_placed.en.html",
});

localized!(placed_de for super::OrderPlaced {
    subject: "Ihre Bestellung {{ v.order_number }} ist bestätigt",
    short: "Danke für Ihre Bestellung {{ v.order_number }} ({{ v.total }}). Wir melden uns beim Versand.",
    text: "email/order_placed.de.txt",
    html: "email/order_placed.de.html",
});

fn render_placed(locale: &str, vars: &Map<String, Value>) -> Result<Content, RenderError> {
    let code = ORDER_PLACED.code;
    let v: OrderPlaced = typed(code, vars)?;
    match locale {
        "de" => placed_de::render(code, &v),
        _ => placed_en::render(code, &v),
    }
}

/// Variables of `order_shipped`.
#[derive(Debug, Clone, Deserialize)]
pub struct OrderShipped {
    customer_name: Option<String>,
    order_number: String,
    tracking_number: String,
    delivery_estimate: Option<String>,
}

/// `order_shipped`: the parcel is on its way.
pub const ORDER_SHIPPED: TemplateDef = TemplateDef {
    code: "order_shipped",
    description: "Shipping notice with the tracking number and delivery estimate.",
    variables: &[
        CUSTOMER_NAME,
        ORDER_NUMBER,
        Variable {
            name: "tracking_number",
            required: true,
            description: "The carrier's tracking number.",
        },
        Variable {
            name: "delivery_estimate",
            required: false,
            description: "Expected delivery date, formatted.",
        },
    ],
    locales: &["en", "de"],
    render: render_shipped,
};

localized!(shipped_en for super::OrderShipped {
    subject: "Your order {{ v.order_number }} has shipped",
    short: "Your order {{ v.order_number }} has shipped. Tracking: {{ v.tracking_number }}{% if let Some(d) = v.delivery_estimate %}, expected {{ d }}{% endif %}.",
    text: "email/order_shipped.en.txt",
    html: "email/order_shipped.en.html",
});

localized!(shipped_de for super::OrderShipped {
    subject: "Ihre Bestellung {{ v.order_number }} wurde versandt",
    short: "Ihre Bestellung {{ v.order_number }} ist unterwegs. Sendungsnummer: {{ v.tracking_number }}{% if let Some(d) = v.delivery_estimate %}, Zustellung voraussichtlich {{ d }}{% endif %}.",
    text: "email/order_shipped.de.txt",
    html: "email/order_shipped.de.html",
});

fn render_shipped(locale: &str, vars: &Map<String, Value>) -> Result<Content, RenderError> {
    let code = ORDER_SHIPPED.code;
    let v: OrderShipped = typed(code, vars)?;
    match locale {
        "de" => shipped_de::render(code, &v),
        _ => shipped_en::render(code, &v),
    }
}

/// Variables of `order_delivered`.
#[derive(Debug, Clone, Deserialize)]
pub struct OrderDelivered {
    customer_name: Option<String>,
    order_number: String,
    review_url: Option<String>,
}

/// `order_delivered`: delivered, with a review request.
pub const ORDER_DELIVERED: TemplateDef = TemplateDef {
    code: "order_delivered",
    description: "Delivery confirmation asking for a review.",
    variables: &[
        CUSTOMER_NAME,
        ORDER_NUMBER,
        Variable {
            name: "review_url",
            required: false,
            description: "Where to review the order (http or https).",
        },
    ],
    locales: &["en"],
    render: render_delivered,
};

localized!(delivered_en for super::OrderDelivered {
    subject: "Your order {{ v.order_number }} has arrived",
    short: "Your order {{ v.order_number }} was delivered.{% if let Some(url) = v.review_url %} Review it: {{ url }}{% endif %}",
    text: "email/order_delivered.en.txt",
    html: "email/order_delivered.en.html",
});

fn render_delivered(_locale: &str, vars: &Map<String, Value>) -> Result<Content, RenderError> {
    let code = ORDER_DELIVERED.code;
    let v: OrderDelivered = typed(code, vars)?;
    check_link(code, "review_url", v.review_url.as_ref())?;
    delivered_en::render(code, &v)
}
