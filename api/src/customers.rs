//! `/api/v1/customers`: the recipients Herald knows — create, read and replace one, by the
//! producer's own id.

use chrono::{DateTime, Utc};
use herald_entities::{
    customer,
    repo::customers::{self as repo, CustomerFields},
};
use poem_openapi::{ApiResponse, Object, OpenApi, Tags, param::Path, payload::Json};

use crate::{
    ApiError, AppState,
    auth::{ReadKey, SendKey},
    validate::{self, RawContacts},
};

/// Time zone when none is given.
const DEFAULT_TIMEZONE: &str = "UTC";
/// Longest display name.
const MAX_NAME: usize = 200;

#[derive(Tags)]
enum CustomerTags {
    /// Recipients: contacts, locale and time zone.
    Customers,
}

/// A new customer. No `Debug`: it may hold a webhook secret.
#[derive(Clone, Object)]
#[oai(deny_unknown_fields)]
pub struct CreateCustomer {
    /// Your id for the customer (1 to 200 characters, no `/`); events and notifications name the
    /// customer by it.
    pub id: String,
    /// Display name, used in greetings.
    pub name: Option<String>,
    /// Email address.
    pub email: Option<String>,
    /// Phone number in E.164 form (`+4915112345678`).
    pub phone: Option<String>,
    /// Telegram chat id.
    pub telegram_chat_id: Option<String>,
    /// Push device tokens.
    #[oai(default)]
    pub push_tokens: Vec<String>,
    /// URL for signed webhooks (http or https with a host, at most 2,048 characters; not an
    /// internal IP address unless `channels.webhook.allow_private_targets`).
    pub webhook_url: Option<String>,
    /// Your own secret for signing this customer's webhooks (`whsec_` followed by the base64 of
    /// a key of at least 24 bytes), used instead of `channels.webhook.secret` for webhooks to the
    /// stored `webhook_url`. Write-only: responses say `webhook_secret_set` instead.
    pub webhook_secret: Option<String>,
    /// Language tag for templates (`en`, `de-DE`); `templates.default_locale` (`en` unless
    /// configured) when absent.
    pub locale: Option<String>,
    /// IANA time zone for quiet hours (`Europe/Berlin`); `UTC` when absent.
    pub timezone: Option<String>,
}

/// A customer's record as a whole; `PUT` replaces the stored one (absent contacts are removed,
/// an absent `webhook_secret` is kept as its doc says). No `Debug`: it may hold a webhook secret.
#[derive(Clone, Object)]
#[oai(deny_unknown_fields)]
pub struct UpdateCustomer {
    /// Display name.
    pub name: Option<String>,
    /// Email address.
    pub email: Option<String>,
    /// Phone number in E.164 form.
    pub phone: Option<String>,
    /// Telegram chat id.
    pub telegram_chat_id: Option<String>,
    /// Push device tokens.
    #[oai(default)]
    pub push_tokens: Vec<String>,
    /// URL for signed webhooks (http or https with a host, at most 2,048 characters; not an
    /// internal IP address unless `channels.webhook.allow_private_targets`).
    pub webhook_url: Option<String>,
    /// Your own secret for signing this customer's webhooks (`whsec_` followed by the base64 of
    /// a key of at least 24 bytes), used instead of `channels.webhook.secret` for webhooks to the
    /// stored `webhook_url`. Write-only: responses say `webhook_secret_set` instead.
    /// Absent keeps the stored secret while `webhook_url` stays the same (a new URL drops it);
    /// `""` removes it. A new secret for the same `webhook_url` rotates: the replaced one signs
    /// alongside it for `channels.webhook.rotation_grace_secs`.
    pub webhook_secret: Option<String>,
    /// Language tag; `templates.default_locale` (`en` unless configured) when absent.
    pub locale: Option<String>,
    /// IANA time zone; `UTC` when absent.
    pub timezone: Option<String>,
}

/// A stored customer.
#[derive(Debug, Clone, Object)]
// Absent values are left out, as the spec (no `nullable`) says.
#[oai(skip_serializing_if_is_none)]
pub struct CustomerView {
    /// Your id for the customer.
    pub id: String,
    /// Display name.
    pub name: Option<String>,
    /// Email address.
    pub email: Option<String>,
    /// Phone number.
    pub phone: Option<String>,
    /// Telegram chat id.
    pub telegram_chat_id: Option<String>,
    /// Push device tokens.
    pub push_tokens: Vec<String>,
    /// Webhook URL.
    pub webhook_url: Option<String>,
    /// Whether the customer has a webhook signing secret of its own (the secret itself is never
    /// returned).
    pub webhook_secret_set: bool,
    /// Language tag.
    pub locale: String,
    /// IANA time zone.
    pub timezone: String,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
}

/// Responses of `POST /api/v1/customers`.
#[derive(ApiResponse)]
pub enum CreatedCustomer {
    /// Created.
    #[oai(status = 201)]
    Created(Json<CustomerView>),
}

/// Customer endpoints.
pub struct CustomersApi {
    state: AppState,
}

impl CustomersApi {
    /// The endpoints over the shared state.
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

#[OpenApi(prefix_path = "/api/v1", tag = "CustomerTags::Customers")]
impl CustomersApi {
    /// Create a customer (scope `send`).
    ///
    /// 409 `conflict` when a customer with this id exists already; use `PUT` to change it.
    #[oai(path = "/customers", method = "post")]
    async fn create(
        &self,
        _auth: SendKey,
        body: Json<CreateCustomer>,
    ) -> Result<CreatedCustomer, ApiError> {
        let body = body.0;
        let id = validate::external_id("id", &body.id)?;
        let default_locale = self.state.templates.default_locale();
        let fields = fields(
            &UpdateCustomer {
                name: body.name,
                email: body.email,
                phone: body.phone,
                telegram_chat_id: body.telegram_chat_id,
                push_tokens: body.push_tokens,
                webhook_url: body.webhook_url,
                webhook_secret: body.webhook_secret,
                locale: body.locale,
                timezone: body.timezone,
            },
            default_locale,
            self.state.allow_private_webhook_targets,
        )?;
        match repo::create(&self.state.db, &id, fields).await? {
            Some(row) => Ok(CreatedCustomer::Created(Json(view(row)))),
            None => Err(ApiError::conflict(format!(
                "customer {id:?} exists already; use PUT /api/v1/customers/{id} to change it"
            ))),
        }
    }

    /// Read a customer (scope `read`).
    #[oai(path = "/customers/:id", method = "get")]
    async fn get(&self, _auth: ReadKey, id: Path<String>) -> Result<Json<CustomerView>, ApiError> {
        match repo::find_by_external_id(&self.state.db, &id.0).await? {
            Some(row) => Ok(Json(view(row))),
            None => Err(not_found(&id.0)),
        }
    }

    /// Replace a customer's contacts, name, locale and time zone (scope `send`).
    #[oai(path = "/customers/:id", method = "put")]
    async fn update(
        &self,
        _auth: SendKey,
        id: Path<String>,
        body: Json<UpdateCustomer>,
    ) -> Result<Json<CustomerView>, ApiError> {
        let fields = fields(
            &body.0,
            self.state.templates.default_locale(),
            self.state.allow_private_webhook_targets,
        )?;
        match repo::update(&self.state.db, &id.0, fields).await? {
            Some(row) => Ok(Json(view(row))),
            None => Err(not_found(&id.0)),
        }
    }
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("no customer {id:?}"))
}

/// Checks a request's fields and fills the defaults: `default_locale` (the configured
/// `templates.default_locale`) for an absent locale. A webhook URL naming an internal address is
/// refused unless `allow_private_webhooks` ([`validate::webhook_target`]).
fn fields(
    body: &UpdateCustomer,
    default_locale: &str,
    allow_private_webhooks: bool,
) -> Result<CustomerFields, ApiError> {
    let contacts = validate::contacts(
        "",
        RawContacts {
            email: &body.email,
            phone: &body.phone,
            telegram_chat_id: &body.telegram_chat_id,
            push_tokens: &body.push_tokens,
            webhook_url: &body.webhook_url,
        },
    )?;
    validate::webhook_target("webhook_url", &contacts, allow_private_webhooks)?;
    let webhook_secret = validate::webhook_secret("webhook_secret", &body.webhook_secret)?;
    let name = body
        .name
        .as_deref()
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_string);
    if name
        .as_ref()
        .is_some_and(|n| n.chars().count() > MAX_NAME || n.contains(['\r', '\n']))
    {
        return Err(ApiError::invalid(
            "name",
            format!("name must be one line of at most {MAX_NAME} characters"),
        ));
    }
    if let Some(name) = &name {
        validate::plain_text("name", name)?;
    }
    let locale = validate::locale("locale", body.locale.as_deref().unwrap_or(default_locale))?;
    let timezone = validate::timezone(
        "timezone",
        body.timezone.as_deref().unwrap_or(DEFAULT_TIMEZONE),
    )?;
    Ok(CustomerFields {
        name,
        email: contacts.email,
        phone: contacts.phone,
        telegram_chat_id: contacts.telegram_chat_id,
        push_tokens: contacts.push_tokens,
        webhook_url: contacts.webhook_url,
        webhook_secret,
        locale,
        timezone,
    })
}

fn view(row: customer::Model) -> CustomerView {
    CustomerView {
        push_tokens: repo::push_tokens(&row),
        id: row.external_id,
        name: row.name,
        email: row.email,
        phone: row.phone,
        telegram_chat_id: row.telegram_chat_id,
        webhook_url: row.webhook_url,
        webhook_secret_set: row.webhook_secret.is_some(),
        locale: row.locale,
        timezone: row.timezone,
        created_at: row.created_at,
        updated_at: row.updated_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> UpdateCustomer {
        UpdateCustomer {
            name: Some(" Ada ".into()),
            email: Some("ada@example.com".into()),
            phone: None,
            telegram_chat_id: None,
            push_tokens: vec![],
            webhook_url: None,
            webhook_secret: None,
            locale: None,
            timezone: None,
        }
    }

    #[test]
    fn defaults_and_trimming() {
        let f = fields(&body(), "en", false).unwrap();
        assert_eq!(f.name.as_deref(), Some("Ada"));
        assert_eq!((f.locale.as_str(), f.timezone.as_str()), ("en", "UTC"));
        let f = fields(&body(), "de-AT", false).unwrap();
        assert_eq!(f.locale, "de-AT", "the configured default locale");
    }

    #[test]
    fn bad_time_zone_and_locale_name_their_field() {
        let field = |b: UpdateCustomer| match fields(&b, "en", false) {
            Err(ApiError::BadRequest(e)) => e.0.field,
            _ => None,
        };
        let mut bad = body();
        bad.timezone = Some("Europe/Atlantis".into());
        assert_eq!(field(bad).as_deref(), Some("timezone"));
        let mut bad = body();
        bad.locale = Some("german".into());
        assert_eq!(field(bad).as_deref(), Some("locale"));
        let mut bad = body();
        bad.email = Some("nope".into());
        assert_eq!(field(bad).as_deref(), Some("email"));
        let mut bad = body();
        bad.name = Some("Ada\tLovelace".into());
        assert_eq!(field(bad).as_deref(), Some("name"));
        let mut bad = body();
        bad.telegram_chat_id = Some("42\u{7}".into());
        assert_eq!(field(bad).as_deref(), Some("telegram_chat_id"));
    }
}
