//! Queries on `customers`.

use std::collections::{BTreeSet, HashMap};

use sea_orm::{
    ActiveModelTrait,
    ActiveValue::Set,
    ColumnTrait, Condition, ConnectionTrait, DbBackend, EntityTrait, QueryFilter, SqlErr,
    sea_query::{Alias, BinOper, Expr, ExprTrait, Func, Query, SimpleExpr},
};

use crate::{RepoError, customer, preference, quiet_hours};

/// The customer with this external id, if any.
pub async fn find_by_external_id(
    db: &impl ConnectionTrait,
    external_id: &str,
) -> Result<Option<customer::Model>, RepoError> {
    Ok(customer::Entity::find()
        .filter(customer::Column::ExternalId.eq(external_id))
        .one(db)
        .await?)
}

/// The customers with these external ids, by external id (unknown ids are absent).
pub async fn find_many_by_external_id(
    db: &impl ConnectionTrait,
    external_ids: &[String],
) -> Result<HashMap<String, customer::Model>, RepoError> {
    Ok(customer::Entity::find()
        .filter(customer::Column::ExternalId.is_in(external_ids.iter().cloned()))
        .all(db)
        .await?
        .into_iter()
        .map(|customer| (customer.external_id.clone(), customer))
        .collect())
}

/// The contacts a send goes to on the channels that reach stored customers (email, SMS,
/// Telegram, push, webhook), beyond those of the customer it names, if any: what
/// [`with_wishes_holding`] looks customers up by.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ContactSet {
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
}

/// Which contacts of a [`ContactSet`] a customer holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    /// The email address.
    pub email: bool,
    /// The phone number.
    pub phone: bool,
    /// The Telegram chat id.
    pub telegram_chat_id: bool,
    /// One of the push tokens at least.
    pub push_token: bool,
    /// The webhook URL.
    pub webhook_url: bool,
}

impl Held {
    /// Whether the customer holds any of them.
    pub fn any(self) -> bool {
        self.email || self.phone || self.telegram_chat_id || self.push_token || self.webhook_url
    }
}

/// An email address as it is compared: ASCII letters lowercased, every other character as it
/// is, as both databases compare it (`lower(email)` on SQLite, which folds ASCII only, and
/// `lower(email COLLATE "C")` on PostgreSQL, likewise): `Ada@Example.COM` is `ada@example.com`,
/// `Émile@example.com` is not `émile@example.com`.
pub fn folded_email(email: &str) -> String {
    email.to_ascii_lowercase()
}

impl ContactSet {
    /// Whether it holds no contact.
    pub fn is_empty(&self) -> bool {
        self.email.is_none()
            && self.phone.is_none()
            && self.telegram_chat_id.is_none()
            && self.push_tokens.is_empty()
            && self.webhook_url.is_none()
    }

    /// Which of these contacts `customer` holds: the email address regardless of the case of
    /// its ASCII letters (one mailbox, however a producer capitalised it; see [`folded_email`]),
    /// the others exactly (a webhook URL as written, character for character).
    pub fn held_by(&self, customer: &customer::Model) -> Held {
        let same =
            |mine: &Option<String>, theirs: &Option<String>| mine.is_some() && mine == theirs;
        let email = match (&self.email, &customer.email) {
            (Some(mine), Some(theirs)) => mine.eq_ignore_ascii_case(theirs),
            _ => false,
        };
        let push_token = !self.push_tokens.is_empty() && {
            let theirs = push_tokens(customer);
            self.push_tokens.iter().any(|token| theirs.contains(token))
        };
        Held {
            email,
            phone: same(&self.phone, &customer.phone),
            telegram_chat_id: same(&self.telegram_chat_id, &customer.telegram_chat_id),
            push_token,
            webhook_url: same(&self.webhook_url, &customer.webhook_url),
        }
    }

    /// These contacts without those `customer` holds (see [`ContactSet::held_by`]): the ones a
    /// send naming `customer` gives beyond the customer's own.
    pub fn not_held_by(mut self, customer: &customer::Model) -> ContactSet {
        // Taken out first, so that `held_by` does not read the customer's push tokens: they are
        // read once, below.
        let tokens = std::mem::take(&mut self.push_tokens);
        let held = self.held_by(customer);
        let drop = |contact: &mut Option<String>, held: bool| {
            if held {
                *contact = None;
            }
        };
        drop(&mut self.email, held.email);
        drop(&mut self.phone, held.phone);
        drop(&mut self.telegram_chat_id, held.telegram_chat_id);
        drop(&mut self.webhook_url, held.webhook_url);
        if !tokens.is_empty() {
            let theirs = push_tokens(customer);
            self.push_tokens = tokens
                .into_iter()
                .filter(|token| !theirs.contains(token))
                .collect();
        }
        self
    }
}

/// The customers holding any contact of `sets` who have stored wishes (preferences or quiet
/// hours): those whose opt-outs and quiet hours a send to the contacts must follow. One query,
/// on the contact indexes of `m20261207_002101` and `m20261207_003090` (emails compared as
/// [`folded_email`] says); none when `sets` hold no contact.
pub async fn with_wishes_holding(
    db: &impl ConnectionTrait,
    sets: &[ContactSet],
) -> Result<Vec<customer::Model>, RepoError> {
    let Some(query) = with_wishes_holding_query(db.get_database_backend(), sets) else {
        return Ok(Vec::new());
    };
    Ok(query.all(db).await?)
}

/// The query of [`with_wishes_holding`] (for the query-plan tests); `None` without contacts.
pub fn with_wishes_holding_query(
    backend: DbBackend,
    sets: &[ContactSet],
) -> Option<sea_orm::Select<customer::Entity>> {
    let holding = holding_any(backend, sets)?;
    Some(
        customer::Entity::find()
            .filter(holding)
            .filter(has_wishes()),
    )
}

/// Customers holding any contact of `sets`; `None` when they hold none.
fn holding_any(backend: DbBackend, sets: &[ContactSet]) -> Option<Condition> {
    let distinct = |pick: fn(&ContactSet) -> Option<&String>| -> BTreeSet<&str> {
        sets.iter().filter_map(pick).map(String::as_str).collect()
    };
    let emails: BTreeSet<String> = sets
        .iter()
        .filter_map(|set| set.email.as_deref())
        .map(folded_email)
        .collect();
    let phones = distinct(|set| set.phone.as_ref());
    let chats = distinct(|set| set.telegram_chat_id.as_ref());
    let hooks = distinct(|set| set.webhook_url.as_ref());
    let tokens: BTreeSet<&str> = sets
        .iter()
        .flat_map(|set| set.push_tokens.iter().map(String::as_str))
        .collect();
    let mut any = Condition::any();
    if !emails.is_empty() {
        any = any.add(Expr::expr(folded_email_column(backend)).is_in(emails));
    }
    if !phones.is_empty() {
        any = any.add(customer::Column::Phone.is_in(phones));
    }
    if !chats.is_empty() {
        any = any.add(customer::Column::TelegramChatId.is_in(chats));
    }
    if !hooks.is_empty() {
        any = any.add(customer::Column::WebhookUrl.is_in(hooks));
    }
    if !tokens.is_empty() {
        any = any.add(holding_push_token(backend, &tokens));
    }
    (!any.is_empty()).then_some(any)
}

/// The stored email address folded as [`folded_email`] folds it, as the email index of each
/// database holds it: `lower(email)` on SQLite (whose `lower` folds ASCII only),
/// `lower(email COLLATE "C")` on PostgreSQL (whose `lower` under the `C` collation does).
fn folded_email_column(backend: DbBackend) -> SimpleExpr {
    match backend {
        DbBackend::Postgres => Expr::cust_with_expr(
            r#"lower($1 COLLATE "C")"#,
            Expr::col((customer::Entity, customer::Column::Email)),
        ),
        _ => Func::lower(Expr::col(customer::Column::Email)).into(),
    }
}

/// Customers whose push tokens include one of `tokens`: on PostgreSQL by the GIN index of the
/// tokens as `jsonb`; on SQLite, which cannot index the values inside a JSON list, by the index
/// of `customer_push_tokens`, the tokens one a row, kept by triggers (`m20261207_003090`).
fn holding_push_token(backend: DbBackend, tokens: &BTreeSet<&str>) -> Condition {
    let tokens_column = (customer::Entity, customer::Column::PushTokens);
    if backend == DbBackend::Postgres {
        return tokens.iter().fold(Condition::any(), |any, token| {
            let one = serde_json::json!([token]).to_string();
            any.add(
                Expr::col(tokens_column)
                    .cast_as("jsonb")
                    .binary(BinOper::Custom("@>"), Expr::val(one).cast_as("jsonb")),
            )
        });
    }
    let holding = Query::select()
        .column(Alias::new("customer_id"))
        .from(Alias::new("customer_push_tokens"))
        .and_where(Expr::col(Alias::new("token")).is_in(tokens.iter().copied()))
        .to_owned();
    Condition::all().add(Expr::col((customer::Entity, customer::Column::Id)).in_subquery(holding))
}

/// Customers with a preference row or quiet hours.
fn has_wishes() -> Condition {
    let external_id = (customer::Entity, customer::Column::ExternalId);
    let preference = Query::select()
        .expr(Expr::val(1))
        .from(preference::Entity)
        .and_where(
            Expr::col((preference::Entity, preference::Column::CustomerId)).equals(external_id),
        )
        .to_owned();
    let quiet = Query::select()
        .expr(Expr::val(1))
        .from(quiet_hours::Entity)
        .and_where(
            Expr::col((quiet_hours::Entity, quiet_hours::Column::CustomerId)).equals(external_id),
        )
        .to_owned();
    Condition::any()
        .add(Expr::exists(preference))
        .add(Expr::exists(quiet))
}

/// Times [`remove_push_token`] reads the customer again after another write changed it first.
const REMOVE_TOKEN_TRIES: usize = 5;

/// Removes a push token a provider declared dead (unregistered app, invalid token). `false` when
/// the customer or the token is gone already.
///
/// The list is read, then written back without the token only if the customer was not changed
/// meanwhile (`updated_at` as read); otherwise it is read again. A token a `PUT /customers/{id}`
/// added in between, or another dead token removed in between, is kept (removed) as it was.
/// After `REMOVE_TOKEN_TRIES` reads each outrun by another write it gives up, keeping the token
/// (`false`): its next failed send reports it dead again.
pub async fn remove_push_token(
    db: &impl ConnectionTrait,
    external_id: &str,
    token: &str,
) -> Result<bool, RepoError> {
    for _ in 0..REMOVE_TOKEN_TRIES {
        let Some(found) = find_by_external_id(db, external_id).await? else {
            return Ok(false);
        };
        let tokens: Vec<String> =
            serde_json::from_value(found.push_tokens.clone()).map_err(|e| RepoError::Json {
                column: "push_tokens",
                reason: e.to_string(),
            })?;
        if !tokens.iter().any(|t| t == token) {
            return Ok(false);
        }
        let kept: Vec<String> = tokens.into_iter().filter(|t| t != token).collect();
        let written = customer::Entity::update_many()
            .col_expr(
                customer::Column::PushTokens,
                Expr::value(serde_json::json!(kept)),
            )
            .col_expr(customer::Column::UpdatedAt, Expr::value(chrono::Utc::now()))
            .filter(customer::Column::Id.eq(found.id))
            .filter(customer::Column::UpdatedAt.eq(found.updated_at))
            .exec(db)
            .await?;
        if written.rows_affected > 0 {
            return Ok(true);
        }
    }
    tracing::warn!(
        customer = external_id,
        "dead push token kept: the customer kept changing while it was removed"
    );
    Ok(false)
}

/// Forgets a webhook URL that answered 410 Gone, and the signing secrets that belonged to it (a
/// secret belongs to its endpoint: a new URL starts without one). `false` when the customer is
/// gone or its URL is another already.
pub async fn clear_webhook_url(
    db: &impl ConnectionTrait,
    external_id: &str,
    url: &str,
) -> Result<bool, RepoError> {
    let result = without_replaced_secret(customer::Entity::update_many())
        .col_expr(customer::Column::WebhookUrl, Expr::value(None::<String>))
        .col_expr(customer::Column::WebhookSecret, Expr::value(None::<String>))
        .col_expr(customer::Column::UpdatedAt, Expr::value(chrono::Utc::now()))
        .filter(customer::Column::ExternalId.eq(external_id))
        .filter(customer::Column::WebhookUrl.eq(url))
        .exec(db)
        .await?;
    Ok(result.rows_affected > 0)
}

/// Forgets the webhook secrets replaced before `cutoff`, whose rotation grace is over: they sign
/// nothing any more, and a secret that signs nothing is better not kept. Answers how many
/// customers had one. Housekeeping, not a change of the customer: `updated_at` stays.
pub async fn forget_replaced_webhook_secrets(
    db: &impl ConnectionTrait,
    cutoff: chrono::DateTime<chrono::Utc>,
) -> Result<u64, RepoError> {
    let result = forget_replaced_webhook_secrets_query(cutoff)
        .exec(db)
        .await?;
    Ok(result.rows_affected)
}

/// The UPDATE of [`forget_replaced_webhook_secrets`], planned on the partial index of
/// replacements (`m20261207_003101`).
pub fn forget_replaced_webhook_secrets_query(
    cutoff: chrono::DateTime<chrono::Utc>,
) -> sea_orm::UpdateMany<customer::Entity> {
    without_replaced_secret(customer::Entity::update_many())
        .filter(customer::Column::WebhookSecretReplacedAt.lt(cutoff))
}

/// `update` clearing the replaced webhook secret and the time of its replacement.
fn without_replaced_secret(
    update: sea_orm::UpdateMany<customer::Entity>,
) -> sea_orm::UpdateMany<customer::Entity> {
    update
        .col_expr(
            customer::Column::PreviousWebhookSecret,
            Expr::value(None::<String>),
        )
        .col_expr(
            customer::Column::WebhookSecretReplacedAt,
            Expr::value(None::<chrono::DateTime<chrono::Utc>>),
        )
}

/// Forgets a Telegram chat id the Bot API declared gone (bot blocked, user deactivated, bot
/// removed from the group, group deleted). `false` when the customer is gone or its chat id is another already.
pub async fn clear_telegram_chat_id(
    db: &impl ConnectionTrait,
    external_id: &str,
    chat_id: &str,
) -> Result<bool, RepoError> {
    set_if_still(
        db,
        external_id,
        customer::Column::TelegramChatId,
        chat_id,
        None,
    )
    .await
}

/// Changes a Telegram chat id from `from` to `to`, the id the Bot API gave for the chat when it
/// moved (a group upgraded to a supergroup). `false` when the customer is gone or its chat id is
/// another already.
pub async fn move_telegram_chat_id(
    db: &impl ConnectionTrait,
    external_id: &str,
    from: &str,
    to: &str,
) -> Result<bool, RepoError> {
    set_if_still(
        db,
        external_id,
        customer::Column::TelegramChatId,
        from,
        Some(to),
    )
    .await
}

/// Sets the customer's contact `column` to `value` (NULL for `None`) if it still holds `old`: a
/// value written in the meantime (a `PUT /customers/{id}` with a new chat id) is kept.
async fn set_if_still(
    db: &impl ConnectionTrait,
    external_id: &str,
    column: customer::Column,
    old: &str,
    value: Option<&str>,
) -> Result<bool, RepoError> {
    let result = customer::Entity::update_many()
        .col_expr(column, Expr::value(value.map(str::to_string)))
        .col_expr(customer::Column::UpdatedAt, Expr::value(chrono::Utc::now()))
        .filter(customer::Column::ExternalId.eq(external_id))
        .filter(column.eq(old))
        .exec(db)
        .await?;
    Ok(result.rows_affected > 0)
}

/// What a customer record says about a recipient: everything but ids and timestamps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CustomerFields {
    /// Display name.
    pub name: Option<String>,
    /// Email address.
    pub email: Option<String>,
    /// Phone number (E.164).
    pub phone: Option<String>,
    /// Telegram chat id.
    pub telegram_chat_id: Option<String>,
    /// Push device tokens.
    pub push_tokens: Vec<String>,
    /// Webhook URL.
    pub webhook_url: Option<String>,
    /// What becomes of the customer's own webhook signing secret.
    pub webhook_secret: WebhookSecretChange,
    /// Locale, e.g. `de-DE`.
    pub locale: String,
    /// IANA time zone.
    pub timezone: String,
}

/// What a write does to a customer's own webhook signing secret, which reads never return (so a
/// client that reads a customer and writes it back cannot send the secret along).
#[derive(Clone, Default, PartialEq, Eq)]
pub enum WebhookSecretChange {
    /// Keeps the stored secrets (the one a rotation replaced included) while the webhook URL
    /// stays the same, and drops them with another URL: a secret belongs to its endpoint. A new
    /// customer gets none.
    #[default]
    Keep,
    /// Removes them: the global `channels.webhook.secret` signs again.
    Remove,
    /// Replaces the secret by this `whsec_…` one (checked by the caller). For the same webhook
    /// URL, the secret it replaces signs alongside it for a while (see
    /// [`customer::Model::previous_webhook_secret`]); with another URL it is dropped.
    Set(String),
}

impl std::fmt::Debug for WebhookSecretChange {
    /// Never shows the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Keep => "Keep",
            Self::Remove => "Remove",
            Self::Set(_) => "Set(<redacted>)",
        })
    }
}

/// A customer's webhook signing secrets as a write leaves them.
#[derive(Default, PartialEq, Eq)]
struct WebhookSecrets {
    /// The secret that signs.
    current: Option<String>,
    /// The secret `current` replaced, and when.
    previous: Option<(String, chrono::DateTime<chrono::Utc>)>,
}

impl WebhookSecrets {
    /// What `stored` holds.
    fn of(stored: &customer::Model) -> Self {
        Self {
            current: stored.webhook_secret.clone(),
            previous: stored
                .previous_webhook_secret
                .clone()
                .zip(stored.webhook_secret_replaced_at),
        }
    }

    /// Writes them to `row`.
    fn set(self, row: &mut customer::ActiveModel) {
        let (previous, replaced_at) = self.previous.unzip();
        row.webhook_secret = Set(self.current);
        row.previous_webhook_secret = Set(previous);
        row.webhook_secret_replaced_at = Set(replaced_at);
    }
}

impl WebhookSecretChange {
    /// The secrets to store at `now`, given the stored row (none for a new customer) and the new
    /// URL. Only a secret kept for its own URL survives, as the current or the previous one.
    fn apply(
        self,
        stored: Option<&customer::Model>,
        new_url: Option<&str>,
        now: chrono::DateTime<chrono::Utc>,
    ) -> WebhookSecrets {
        let kept = stored
            .filter(|stored| stored.webhook_url.as_deref() == new_url)
            .map(WebhookSecrets::of)
            .unwrap_or_default();
        match self {
            Self::Keep => kept,
            Self::Remove => WebhookSecrets::default(),
            // The same secret again changes nothing.
            Self::Set(secret) if kept.current.as_ref() == Some(&secret) => kept,
            Self::Set(secret) => WebhookSecrets {
                previous: kept.current.map(|replaced| (replaced, now)),
                current: Some(secret),
            },
        }
    }
}

/// A new customer row with a fresh id, created and updated at `now`.
pub fn new_row(
    external_id: &str,
    fields: CustomerFields,
    now: chrono::DateTime<chrono::Utc>,
) -> customer::ActiveModel {
    let mut row = customer::ActiveModel {
        id: Set(uuid::Uuid::now_v7()),
        external_id: Set(external_id.to_string()),
        name: Set(fields.name),
        email: Set(fields.email),
        phone: Set(fields.phone),
        telegram_chat_id: Set(fields.telegram_chat_id),
        push_tokens: Set(serde_json::json!(fields.push_tokens)),
        webhook_url: Set(fields.webhook_url),
        locale: Set(fields.locale),
        timezone: Set(fields.timezone),
        created_at: Set(now),
        updated_at: Set(now),
        ..Default::default()
    };
    fields.webhook_secret.apply(None, None, now).set(&mut row);
    row
}

/// Stores a new customer. `Ok(None)` when a customer with this external id exists already (the
/// unique constraint decides, so concurrent creations resolve to one row).
pub async fn create(
    db: &impl ConnectionTrait,
    external_id: &str,
    fields: CustomerFields,
) -> Result<Option<customer::Model>, RepoError> {
    let row = new_row(external_id, fields, chrono::Utc::now());
    match customer::Entity::insert(row).exec_with_returning(db).await {
        Ok(model) => Ok(Some(model)),
        Err(err) if matches!(err.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => Ok(None),
        Err(err) => Err(err.into()),
    }
}

/// Replaces a customer's contacts, name, locale and time zone. `Ok(None)` when there is no such
/// customer.
pub async fn update(
    db: &impl ConnectionTrait,
    external_id: &str,
    fields: CustomerFields,
) -> Result<Option<customer::Model>, RepoError> {
    let Some(found) = find_by_external_id(db, external_id).await? else {
        return Ok(None);
    };
    let now = chrono::Utc::now();
    let secrets = fields
        .webhook_secret
        .apply(Some(&found), fields.webhook_url.as_deref(), now);
    let mut row: customer::ActiveModel = found.into();
    secrets.set(&mut row);
    row.name = Set(fields.name);
    row.email = Set(fields.email);
    row.phone = Set(fields.phone);
    row.telegram_chat_id = Set(fields.telegram_chat_id);
    row.push_tokens = Set(serde_json::json!(fields.push_tokens));
    row.webhook_url = Set(fields.webhook_url);
    row.locale = Set(fields.locale);
    row.timezone = Set(fields.timezone);
    row.updated_at = Set(now);
    Ok(Some(row.update(db).await?))
}

/// A stored customer's push tokens (an unreadable column reads as none).
pub fn push_tokens(customer: &customer::Model) -> Vec<String> {
    serde_json::from_value(customer.push_tokens.clone()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn customer(email: &str, tokens: &[&str]) -> customer::Model {
        let now = chrono::Utc::now();
        customer::Model {
            id: uuid::Uuid::now_v7(),
            external_id: "ada".into(),
            name: None,
            email: Some(email.into()),
            phone: Some("+4915112345678".into()),
            telegram_chat_id: Some("4711".into()),
            push_tokens: serde_json::json!(tokens),
            webhook_url: Some("https://hooks.example.com/ada".into()),
            webhook_secret: None,
            previous_webhook_secret: None,
            webhook_secret_replaced_at: None,
            locale: "en".into(),
            timezone: "UTC".into(),
            created_at: now,
            updated_at: now,
        }
    }

    #[test]
    fn an_email_is_held_whatever_its_case_and_other_contacts_exactly() {
        let ada = customer("Ada@Example.com", &["t1", "t2"]);
        let set = ContactSet {
            email: Some("ada@EXAMPLE.com".into()),
            phone: Some("+4915112345679".into()),
            telegram_chat_id: Some("4711".into()),
            push_tokens: vec!["t0".into(), "t2".into()],
            webhook_url: Some("https://hooks.example.com/ada".into()),
        };
        let held = set.held_by(&ada);
        assert_eq!(
            held,
            Held {
                email: true,
                phone: false,
                telegram_chat_id: true,
                push_token: true,
                webhook_url: true,
            }
        );
        assert!(held.any());
        let other = ContactSet {
            email: Some("grace@example.com".into()),
            push_tokens: vec!["T1".into()],
            ..Default::default()
        };
        assert!(!other.held_by(&ada).any(), "tokens compare exactly");
        assert!(ContactSet::default().is_empty());
        assert!(!ContactSet::default().held_by(&ada).any());
    }

    /// Only ASCII letters are folded, as SQLite's `lower` and PostgreSQL's under `COLLATE "C"`
    /// fold them: `É` and `é` are other letters (before, `to_lowercase` folded them in Rust and
    /// on PostgreSQL, but not on SQLite).
    #[test]
    fn an_emails_non_ascii_letters_compare_exactly() {
        let emile = customer("Émile@Example.com", &[]);
        let held = |email: &str| {
            ContactSet {
                email: Some(email.into()),
                ..Default::default()
            }
            .held_by(&emile)
            .email
        };
        assert!(held("Émile@example.COM"), "ASCII letters fold");
        assert!(!held("émile@example.com"), "É is not é");
        assert_eq!(folded_email("ÉMILE@Example.COM"), "Émile@example.com");
    }

    /// A webhook URL is held when it is the stored one character for character: another case,
    /// a trailing slash or a query make another endpoint.
    #[test]
    fn a_webhook_url_is_held_exactly() {
        let ada = customer("ada@example.com", &[]);
        let held = |url: &str| {
            ContactSet {
                webhook_url: Some(url.into()),
                ..Default::default()
            }
            .held_by(&ada)
            .webhook_url
        };
        assert!(held("https://hooks.example.com/ada"));
        for other in [
            "https://hooks.example.com/ada/",
            "https://hooks.example.com/Ada",
            "https://hooks.example.com/ada?x=1",
        ] {
            assert!(!held(other), "{other}");
        }
    }

    /// What a send gives beyond the named customer's own contacts: the contacts they do not hold.
    #[test]
    fn the_contacts_not_held_by_a_customer_are_the_others() {
        let ada = customer("Ada@Example.com", &["t1", "t2"]);
        let set = ContactSet {
            email: Some("ada@example.com".into()),
            phone: Some("+4915100000000".into()),
            telegram_chat_id: Some("4711".into()),
            push_tokens: vec!["t1".into(), "t9".into()],
            webhook_url: Some("https://hooks.example.com/grace".into()),
        };
        assert_eq!(
            set.clone().not_held_by(&ada),
            ContactSet {
                phone: Some("+4915100000000".into()),
                push_tokens: vec!["t9".into()],
                webhook_url: Some("https://hooks.example.com/grace".into()),
                ..Default::default()
            }
        );
        let own = ContactSet {
            email: Some("ADA@example.com".into()),
            push_tokens: vec!["t2".into()],
            ..Default::default()
        };
        assert!(own.not_held_by(&ada).is_empty());
    }
}
