//! `/api/v1/notifications/bulk` and `/api/v1/batches/{id}`: one message to many recipients.
//!
//! The API only validates and stores the batch (202 with its id); the Scheduler fans it out page
//! by page, so a 100k-recipient batch neither blocks the request nor sits in memory. Each
//! recipient's notification id is derived from the batch id and the recipient, so a fan-out
//! redone after a restart sends nobody anything twice; and a request repeated with its
//! `request_id` answers the batch stored first, so a retried request sends nothing twice either.

use chrono::{DateTime, SubsecRound, Utc};
use herald_entities::repo::{
    self,
    batches::{Created, CustomerFilter, NewBatch},
    cancel_events::cancel_batch_announced,
};
use herald_nats::{
    Category, Channel, CommandRoom, Contacts, Content, SCHEMA_VERSION, SendCommand,
    batch::{BatchRecipient, BatchSpec, BatchTarget},
};
use poem_openapi::{
    ApiResponse, Object, OpenApi, Tags,
    param::{Header, Path},
    payload::Json,
};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use crate::{
    ApiError, AppState,
    auth::{ReadKey, SendKey},
    idempotency,
    notifications::{
        self, ApiCategory, ApiChannel, MessageContent, Recipient, TemplateUse, ValidRecipient,
        message, validate_recipient,
    },
    validate,
};

/// Most recipients listed in one request (use a filter beyond).
const MAX_LISTED: usize = 10_000;

#[derive(Tags)]
enum BulkTags {
    /// Bulk sends and their progress.
    Bulk,
}

/// Customers to send to: every stored customer matching all the given conditions. At least one
/// condition, or `all_customers: true`: a filter without any is refused rather than taken to
/// mean everyone, and so is a blank condition (`400` naming it).
#[derive(Debug, Clone, Object)]
#[oai(deny_unknown_fields)]
pub struct CustomerFilterBody {
    /// Only customers whose locale is this language tag or one under it, in any case: `de`
    /// selects `de`, `de-DE` and `de-AT`; `de-DE` selects `de-DE` only.
    pub locale: Option<String>,
    /// Only customers whose external id starts with this (case and every character count).
    pub external_id_prefix: Option<String>,
    /// `true`: every stored customer, on purpose. Not with `locale` or `external_id_prefix`.
    pub all_customers: Option<bool>,
}

/// One recipient of a bulk send: a `Recipient`'s fields and `variables`, in one object.
// An unknown field is refused, as in every request object. `deny_unknown_fields` cannot go with
// `flatten`, so the check is `Recipient`'s own: the derived parser reads the fields in the order
// declared here, each taking its key out of the object, and gives a flattened field what is left.
// So `variables` comes first and `recipient` gets exactly the keys no other field took, which
// `Recipient` refuses unless they are its own (pinned by the test
// `a_recipient_takes_variables_and_refuses_an_unknown_field`).
#[derive(Debug, Clone, Object)]
pub struct BulkRecipient {
    /// This recipient's template variables (a JSON object), over `template.variables`: a variable
    /// given in both takes this value. Only with `template`.
    pub variables: Option<Value>,
    /// Who.
    #[oai(flatten)]
    pub recipient: Recipient,
}

/// One message to many recipients: give `recipients` or `filter`, not both.
#[derive(Debug, Clone, Object)]
#[oai(deny_unknown_fields)]
pub struct BulkRequest {
    /// Your idempotency key: repeating a request with the same id answers the batch stored first
    /// and sends nothing more, also when what it was checked against has changed since (its
    /// template deleted or its variables changed, its channels' providers removed). The repeat
    /// must be the same request (key order, whitespace between fields and surrounding spaces of
    /// contacts, customer ids and filter values aside; spaces inside texts count): another
    /// request with a used id is refused with 422 `idempotency_key_reused`, whose `field` names
    /// where the id came from (`request_id`, or `Idempotency-Key` for the header). Bulk sends'
    /// request ids are their own: a single send's does not answer a bulk send.
    pub request_id: Option<String>,
    /// The recipients (at most 10 000). Each gets one notification, by its key: its
    /// `customer_id`, else its first contact (`email`, `phone`, `telegram_chat_id`, a push token,
    /// `webhook_url`). A recipient repeated exactly (the same customer id, contacts and
    /// `variables`) gets one; two with one key that differ otherwise are refused with `400`,
    /// `field` naming the second (`recipients[3]`) and the message both.
    pub recipients: Option<Vec<BulkRecipient>>,
    /// Or: the stored customers matching this filter.
    pub filter: Option<CustomerFilterBody>,
    /// What it is about.
    pub category: ApiCategory,
    /// Channels to try in order; the category's default chain when absent. `400` when no
    /// provider is configured for any of them (see `GET /api/v1/channels`).
    pub channels: Option<Vec<ApiChannel>>,
    /// The message; give either this or `template`.
    pub content: Option<MessageContent>,
    /// A template, rendered for each recipient at delivery in their locale (a customer's stored
    /// locale, unless `template.locale` is given); give either this or `content`.
    pub template: Option<TemplateUse>,
}

/// The answer to an accepted bulk send.
#[derive(Debug, Clone, Object)]
pub struct BatchAccepted {
    /// The batch's id, for `GET /api/v1/batches/{id}`.
    pub batch_id: Uuid,
    /// Its status now: `pending` when new; the current one for a repeated request.
    pub status: String,
    /// Recipients in the batch (for a filter: the customers matching when it was accepted; those
    /// created later are not sent to).
    pub total: i64,
}

/// How many of a batch's notifications are in a status.
#[derive(Debug, Clone, Object)]
pub struct BatchStatusCount {
    /// The status.
    pub status: String,
    /// How many.
    pub count: i64,
}

/// A batch's progress.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct BatchView {
    /// Id.
    pub id: Uuid,
    /// `pending`, `running` (fanning out), `done` (every notification created and queued),
    /// `failed`, or `cancelled` (by `POST /api/v1/batches/{id}/cancel`: its fan-out stopped and
    /// its notifications not yet picked up cancelled).
    pub status: String,
    /// Recipients in the batch.
    pub total: i64,
    /// Notifications created and queued so far.
    pub published: i64,
    /// The notifications by status.
    pub counts: Vec<BatchStatusCount>,
    /// Why the batch failed, when `failed`. While it is `running`: how many of its pages failed in
    /// a row and why the last one did (`2 failed pages in a row; the last: …`); each is tried again
    /// after a rest, and the first that goes through clears this. Absent otherwise.
    pub error: Option<String>,
    /// When it was accepted.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// In the answer to a cancel only: how many of its notifications that cancel cancelled.
    pub cancelled: Option<u64>,
}

/// Bulk endpoints.
pub struct BulkApi {
    state: AppState,
}

impl BulkApi {
    /// The endpoints over the shared state.
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

#[OpenApi(prefix_path = "/api/v1", tag = "BulkTags::Bulk")]
impl BulkApi {
    /// Send one message to many recipients.
    ///
    /// The message is literal `content` or a `template`, as for a single send. Answers 202 with a
    /// batch id at once; the notifications are created and queued in the background. Follow the
    /// batch with `GET /api/v1/batches/{id}`. A repeated `request_id` (or `Idempotency-Key`
    /// header) answers 200 with the batch stored first and stores nothing new, also when the
    /// repeats arrive at once or the request would be refused now (its template deleted since,
    /// say); retry a request whose answer was lost with the same request id. A request id used
    /// before for a different request (other recipients or filter, category, channel list or
    /// message) answers 422 `idempotency_key_reused` and changes nothing. A message that could
    /// make some recipient's send command larger than the NATS server's `max_payload` answers
    /// 413 naming the sizes and stores nothing (a retry would be refused again).
    #[oai(path = "/notifications/bulk", method = "post")]
    async fn bulk(
        &self,
        _auth: SendKey,
        body: Json<BulkRequest>,
        /// Idempotency key; used when the body has no `request_id`.
        #[oai(name = "Idempotency-Key")]
        idempotency_key: Header<Option<String>>,
    ) -> Result<BulkResponse, ApiError> {
        let request = body.0;
        let request_id = idempotency::request_id(request.request_id, idempotency_key.0)?;
        let category: Category = request.category.into();
        let named_channels = notifications::named_chain(request.channels)?;
        let content = message(request.content, request.template)?;
        let target = match (request.recipients, request.filter) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(ApiError::invalid(
                    "recipients",
                    "give either recipients or filter",
                ));
            }
            (Some(list), None) => BatchTarget::Recipients {
                recipients: listed(list, content.template.is_some())?,
            },
            (None, Some(filter)) => {
                let filter = customer_filter(filter)?;
                BatchTarget::Filter {
                    locale: filter.locale,
                    external_id_prefix: filter.external_id_prefix,
                }
            }
        };
        let key = request_id
            .map(|id| {
                let meaning = BulkMeaning {
                    category,
                    channels: named_channels.as_deref(),
                    content: &content,
                    target: &target,
                };
                idempotency::Keyed::new(id, &meaning)
            })
            .transpose()?;
        let checked = accept(&self.state, category, named_channels, &content, &target).await;
        let channels = match checked {
            Ok(channels) => channels,
            Err(refusal) => {
                let db = &self.state.db;
                let find = async |id: &str| repo::batches::find_by_request_id(db, id).await;
                let (key, batch) = idempotency::stored_before(key, refusal, find).await?;
                return repeated(&key, batch);
            }
        };
        // Whole microseconds, as both databases store it: the customers counted are exactly
        // those the fan-out selects by the stored time.
        let accepted_at = Utc::now().trunc_subsecs(6);
        let total = recipients_in(&self.state, &target, accepted_at).await?;
        let spec = BatchSpec {
            v: SCHEMA_VERSION,
            category,
            channels,
            content,
            target,
        };
        let spec = serde_json::to_value(&spec).map_err(|e| ApiError::internal(&e))?;
        let new = NewBatch {
            id: Uuid::now_v7(),
            request_id: key.as_ref().map(|key| key.request_id.value.clone()),
            request_fingerprint: key.as_ref().map(|key| key.fingerprint.clone()),
            spec,
            total,
            accepted_at,
        };
        match repo::batches::create(&self.state.db, new).await? {
            Created::New(batch) => {
                metrics::counter!("herald_batches_accepted_total").increment(1);
                Ok(BulkResponse::Accepted(Json(accepted(batch))))
            }
            Created::Duplicate(batch) => {
                repeated(idempotency::of_duplicate(key.as_ref(), batch.id)?, batch)
            }
        }
    }

    /// A batch's progress: fan-out and the notifications by status.
    #[oai(path = "/batches/:id", method = "get")]
    async fn batch(&self, _auth: ReadKey, id: Path<Uuid>) -> Result<Json<BatchView>, ApiError> {
        let Some(batch) = repo::batches::find(&self.state.db, id.0).await? else {
            return Err(ApiError::not_found(format!("no batch {}", id.0)));
        };
        batch_view(&self.state, batch, None).await.map(Json)
    }

    /// Cancel a bulk send.
    ///
    /// A `pending` or `running` batch becomes `cancelled`: its fan-out stops (no further
    /// notifications are created), and its notifications not yet gone out (`scheduled`, or
    /// `queued` and not yet picked up by a dispatcher: as `POST /api/v1/notifications/{id}/cancel`
    /// decides) are cancelled. A `done` batch (every notification created and queued, not
    /// necessarily sent) is cancelled the same way while some of its notifications are still
    /// cancellable; once none is, it answers 409. So is a `cancelled` one, whose earlier cancel
    /// may have stopped half-way (its instance stopped, say; the Scheduler also finishes such a
    /// cancel once its 15 s lease lapses). A client that goes away before the answer does not stop
    /// the cancel. Answers the batch with `cancelled`: how many notifications this request
    /// cancelled. Those already picked up go out. As for a single cancel, each cancelled
    /// notification's transition is published on `notify.status.cancelled`; the answer comes once
    /// those events are published, so that an instance stopped right after it has published them.
    /// The notifications are cancelled 1,000 at a time, each group in a transaction of its own, so
    /// that sends and deliveries go on meanwhile. 409 naming the status
    /// for a `failed` batch, or a `done` or `cancelled` one with nothing left to cancel; 404 for
    /// an unknown one.
    #[oai(path = "/batches/:id/cancel", method = "post")]
    async fn cancel(&self, _auth: SendKey, id: Path<Uuid>) -> Result<Json<BatchView>, ApiError> {
        use repo::batches::BatchCancel;
        let id = id.0;
        let state = &self.state;
        match cancel_batch_announced(&state.db, state.inserts.gate(), &state.publisher, id).await? {
            BatchCancel::Cancelled {
                batch,
                notifications,
            } => {
                metrics::counter!("herald_batches_cancelled_total").increment(1);
                let view = batch_view(&self.state, *batch, Some(notifications)).await?;
                Ok(Json(view))
            }
            BatchCancel::NotFound => Err(ApiError::not_found(format!("no batch {id}"))),
            BatchCancel::NotCancellable(status) => Err(ApiError::conflict(format!(
                "batch {id} is {status}{}; only pending and running batches, and done or \
                 cancelled ones with notifications not yet picked up, can be cancelled",
                if status == "done" || status == "cancelled" {
                    " and none of its notifications is still cancellable"
                } else {
                    ""
                }
            ))),
        }
    }
}

/// The view of `batch`: its progress with its notifications counted by status.
async fn batch_view(
    state: &AppState,
    batch: herald_entities::batch::Model,
    cancelled: Option<u64>,
) -> Result<BatchView, ApiError> {
    let mut counts: Vec<BatchStatusCount> = repo::batches::status_counts(&state.db, batch.id)
        .await?
        .into_iter()
        .map(|(status, count)| BatchStatusCount {
            status: status.as_str().to_string(),
            count,
        })
        .collect();
    counts.sort_by(|a, b| a.status.cmp(&b.status));
    Ok(BatchView {
        id: batch.id,
        status: batch.status,
        total: batch.total,
        published: batch.published,
        counts,
        error: batch.error,
        created_at: batch.created_at,
        updated_at: batch.updated_at,
        cancelled,
    })
}

/// Responses of `POST /api/v1/notifications/bulk`.
#[derive(ApiResponse)]
pub enum BulkResponse {
    /// Accepted: the batch is stored and will be fanned out.
    #[oai(status = 202)]
    Accepted(Json<BatchAccepted>),
    /// A repeat of an earlier request (its request id, the same request): the batch stored first,
    /// nothing new stored or sent.
    #[oai(status = 200)]
    Repeated(Json<BatchAccepted>),
}

/// What a bulk send's fingerprint covers: everything that decides what is sent to whom, as
/// checked. The channels as named, not the category's default chain (configuration, which may
/// change between a request and its repeat); a filter's conditions, not how many customers it
/// selected.
#[derive(Serialize)]
struct BulkMeaning<'a> {
    category: Category,
    channels: Option<&'a [Channel]>,
    content: &'a Content,
    target: &'a BatchTarget,
}

/// How many recipients a bulk send has: those listed, or the customers its filter matches among
/// those created by `accepted_at`.
async fn recipients_in(
    state: &AppState,
    target: &BatchTarget,
    accepted_at: DateTime<Utc>,
) -> Result<i64, ApiError> {
    match target {
        BatchTarget::Recipients { recipients } => Ok(recipients.len() as i64),
        BatchTarget::Filter {
            locale,
            external_id_prefix,
        } => {
            let filter = CustomerFilter {
                locale: locale.clone(),
                external_id_prefix: external_id_prefix.clone(),
                created_by: Some(accepted_at),
            };
            Ok(repo::batches::count_customers(&state.db, &filter).await?)
        }
    }
}

/// Checks a bulk send against the state (a provider for one of its channels, listed recipients'
/// webhook URLs and contacts, its template) and the size of its commands: its channel chain.
async fn accept(
    state: &AppState,
    category: Category,
    named_channels: Option<Vec<Channel>>,
    content: &Content,
    target: &BatchTarget,
) -> Result<Vec<Channel>, ApiError> {
    let channels = notifications::chain(state, category, named_channels)?;
    if let BatchTarget::Recipients { recipients } = target {
        for (index, recipient) in recipients.iter().enumerate() {
            notifications::deliverable(
                state,
                &format!("recipients[{index}]"),
                recipient.customer_id.as_deref(),
                &recipient.contacts,
                &channels,
            )?;
        }
    }
    check_template(state, content, target).await?;
    let room = state.publisher.command_room();
    check_command_size(category, &channels, content, target, &room)?;
    Ok(channels)
}

/// Answers a bulk send under the request id that stored `batch`: `200` with it if the send is
/// its repeat, else `422`.
fn repeated(
    key: &idempotency::Keyed,
    batch: herald_entities::batch::Model,
) -> Result<BulkResponse, ApiError> {
    key.check_repeat(batch.request_fingerprint.as_deref(), "batch")?;
    Ok(BulkResponse::Repeated(Json(accepted(batch))))
}

/// The answer for a stored batch.
fn accepted(batch: herald_entities::batch::Model) -> BatchAccepted {
    BatchAccepted {
        batch_id: batch.id,
        status: batch.status,
        total: batch.total,
    }
}

/// Checks a filter: each condition given must say something (a blank one would be left out and
/// widen the audience, up to every customer), and a filter without conditions must say
/// `all_customers: true`, so that a client whose values came out empty mails nobody rather than
/// everyone.
fn customer_filter(body: CustomerFilterBody) -> Result<CustomerFilter, ApiError> {
    let locale = body
        .locale
        .map(|tag| {
            not_blank("filter.locale", &tag).and_then(|tag| validate::locale("filter.locale", tag))
        })
        .transpose()?;
    let field = "filter.external_id_prefix";
    let external_id_prefix = body
        .external_id_prefix
        .map(|prefix| not_blank(field, &prefix).and_then(|_| validate::external_id(field, &prefix)))
        .transpose()?;
    let conditions = locale.is_some() || external_id_prefix.is_some();
    match (body.all_customers.unwrap_or(false), conditions) {
        (true, true) => Err(ApiError::invalid(
            "filter.all_customers",
            "all_customers selects every customer; give it without locale or external_id_prefix",
        )),
        (false, false) => Err(ApiError::invalid(
            "filter",
            "give locale or external_id_prefix, or all_customers: true to send to every customer",
        )),
        _ => Ok(CustomerFilter {
            locale,
            external_id_prefix,
            created_by: None,
        }),
    }
}

/// `value` trimmed, or a 400 naming `field` when nothing is left.
fn not_blank<'a>(field: &str, value: &'a str) -> Result<&'a str, ApiError> {
    match value.trim() {
        "" => Err(ApiError::invalid(
            field,
            format!("{field} is blank; leave it out or give a value"),
        )),
        trimmed => Ok(trimmed),
    }
}

/// Checks a batch's template as a single send's is checked: that it exists and, for a compiled
/// template, that every recipient has its variables (the shared ones with the recipient's over
/// them, as the fan-out renders it).
async fn check_template(
    state: &AppState,
    content: &Content,
    target: &BatchTarget,
) -> Result<(), ApiError> {
    let Some(template) = &content.template else {
        return Ok(());
    };
    let personal = match target {
        BatchTarget::Recipients { recipients }
            if state.templates.is_compiled(&template.code)
                && recipients.iter().any(|r| !r.variables.is_empty()) =>
        {
            recipients
        }
        _ => return crate::templates::check_send(state, template).await,
    };
    for recipient in personal {
        if let Some(theirs) = content.for_recipient(&recipient.variables).template {
            crate::templates::check_send(state, &theirs)
                .await
                .map_err(|err| naming_recipient(err, &recipient.key))?;
        }
    }
    Ok(())
}

/// Adds the recipient a refusal concerns to its message.
fn naming_recipient(err: ApiError, key: &str) -> ApiError {
    match err {
        ApiError::BadRequest(mut body) => {
            body.0.message = format!("{} (recipient {key})", body.0.message);
            ApiError::BadRequest(body)
        }
        other => other,
    }
}

/// Refuses content whose send command would be larger than a dispatcher takes for some
/// recipient (400): the command without a recipient, plus the most a recipient adds to it (as
/// JSON, an upper bound: their variables are counted beside the template's even where they
/// replace them). Within that, one larger with its headers than the NATS server's `max_payload`
/// (`room`) is refused with 413: the fan-out's publish of it would be refused for ever.
fn check_command_size(
    category: Category,
    channels: &[Channel],
    content: &Content,
    target: &BatchTarget,
    room: &CommandRoom,
) -> Result<(), ApiError> {
    let most_added = match target {
        BatchTarget::Recipients { recipients } => recipients
            .iter()
            .map(|r| serde_json::to_vec(r).map_or(0, |json| json.len()))
            .max()
            .unwrap_or(0),
        // A stored customer adds only its id: each character four bytes of UTF-8 at worst (an
        // escaped quote or backslash takes two).
        BatchTarget::Filter { .. } => {
            r#","customer_id":"""#.len() + 4 * validate::MAX_EXTERNAL_ID + 1
        }
    };
    let without_recipient = SendCommand {
        v: SCHEMA_VERSION,
        notification_id: Uuid::nil(),
        customer_id: None,
        contacts: Contacts::default(),
        category,
        channels: channels.to_vec(),
        content: content.clone(),
        created_at: Utc::now(),
    };
    notifications::refuse_command_len(
        without_recipient.encoded_len() + most_added,
        content,
        room,
        "a recipient's notification may take",
    )
}

/// Validates listed recipients. Their own variables need a template (`templated`). A batch sends
/// one notification per recipient key (its id is derived from the key), so two recipients with
/// one key are one recipient: kept once when they are the same (customer id, contacts and
/// variables, as checked), refused when they differ ([`same_key`]), since keeping either would
/// drop the other's contacts or variables unseen.
fn listed(list: Vec<BulkRecipient>, templated: bool) -> Result<Vec<BatchRecipient>, ApiError> {
    if list.is_empty() || list.len() > MAX_LISTED {
        return Err(ApiError::invalid(
            "recipients",
            format!("give 1 to {MAX_LISTED} recipients, or a filter"),
        ));
    }
    // Each key's first place in the request, and its place in `recipients`.
    let mut seen: std::collections::HashMap<String, (usize, usize)> =
        std::collections::HashMap::new();
    let mut recipients: Vec<BatchRecipient> = Vec::with_capacity(list.len());
    for (
        index,
        BulkRecipient {
            recipient,
            variables,
        },
    ) in list.into_iter().enumerate()
    {
        let ValidRecipient {
            customer_id,
            contacts,
            key,
        } = validate_recipient(&recipient).map_err(|err| renamed(err, index))?;
        let field = format!("recipients[{index}].variables");
        if variables.is_some() && !templated {
            return Err(ApiError::invalid(&field, "variables need a template"));
        }
        let variables = notifications::variables(&field, variables)?;
        let recipient = BatchRecipient {
            key,
            customer_id,
            contacts,
            variables,
        };
        match seen.get(&recipient.key) {
            Some(&(first, at)) if recipients[at] != recipient => {
                return Err(same_key(first, index, &recipient.key));
            }
            Some(_) => {}
            None => {
                seen.insert(recipient.key.clone(), (index, recipients.len()));
                recipients.push(recipient);
            }
        }
    }
    Ok(recipients)
}

/// The refusal of `recipients[second]`, which has the key of `recipients[first]` but other
/// contacts or variables.
fn same_key(first: usize, second: usize, key: &str) -> ApiError {
    ApiError::invalid(
        &format!("recipients[{second}]"),
        format!(
            "recipients[{first}] and recipients[{second}] are one recipient (both `{key}`: the \
             customer_id, else the first contact of email, phone, telegram_chat_id, push_tokens, \
             webhook_url) with different contacts or variables, and a recipient gets one \
             notification; merge them, or send them separately"
        ),
    )
}

/// Points a recipient error at its place in the list (`recipient.email` → `recipients[3].email`).
fn renamed(err: ApiError, index: usize) -> ApiError {
    match err {
        ApiError::BadRequest(mut body) => {
            body.0.field = body
                .0
                .field
                .map(|f| f.replacen("recipient", &format!("recipients[{index}]"), 1));
            ApiError::BadRequest(body)
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fingerprint;

    #[test]
    fn a_recipient_takes_variables_and_refuses_an_unknown_field() {
        use poem_openapi::types::ParseFromJSON;
        let parsed = BulkRecipient::parse_from_json(Some(serde_json::json!({
            "email": "ada@example.com",
            "variables": { "name": "Ada" }
        })))
        .expect("a recipient with variables");
        assert_eq!(parsed.recipient.email.as_deref(), Some("ada@example.com"));
        assert_eq!(parsed.variables, Some(serde_json::json!({ "name": "Ada" })));
        let refused = BulkRecipient::parse_from_json(Some(serde_json::json!({
            "email": "ada@example.com",
            "customerId": "c-1"
        })))
        .expect_err("an unknown field");
        assert!(
            refused.message().contains("unknown field `customerId`"),
            "{}",
            refused.message()
        );
    }

    /// The listed recipients of `json` (an array of recipient objects).
    fn listed_from(
        json: serde_json::Value,
        templated: bool,
    ) -> Result<Vec<BatchRecipient>, ApiError> {
        use poem_openapi::types::ParseFromJSON;
        let list = Vec::<BulkRecipient>::parse_from_json(Some(json)).expect("recipients");
        listed(list, templated)
    }

    /// The `field` and `message` of a 400.
    fn refusal(err: ApiError) -> (String, String) {
        match err {
            ApiError::BadRequest(body) => (body.0.field.unwrap_or_default(), body.0.message),
            other => panic!("a 400, not {other:?}"),
        }
    }

    /// Two listed recipients with one key (the customer id, else the first contact) would be one
    /// notification: the second's other contacts or variables would be dropped unseen, so they
    /// are refused, naming both; one repeated exactly is kept once.
    #[test]
    fn listed_recipients_with_one_key_are_refused_unless_they_are_the_same() {
        let refused = [
            (
                serde_json::json!([
                    { "email": "a@example.com", "phone": "+15550001" },
                    { "email": "b@example.com" },
                    { "email": "a@example.com", "phone": "+15550002" }
                ]),
                "recipients[2]",
                "recipients[0] and recipients[2]",
            ),
            (
                serde_json::json!([
                    { "customer_id": "c-1", "variables": { "name": "Ada" } },
                    { "customer_id": "c-1", "variables": { "name": "Bob" } }
                ]),
                "recipients[1]",
                "recipients[0] and recipients[1]",
            ),
            (
                serde_json::json!([
                    { "customer_id": "a@example.com" },
                    { "email": "a@example.com" }
                ]),
                "recipients[1]",
                "recipients[0] and recipients[1]",
            ),
        ];
        for (json, field, names) in refused {
            let (got, message) = refusal(listed_from(json.clone(), true).expect_err("refused"));
            assert_eq!(got, field, "{json}: {message}");
            assert!(message.contains(names), "{json}: {message}");
        }
        let same = listed_from(
            serde_json::json!([
                { "email": "a@example.com", "phone": "+15550001", "variables": { "n": 1 } },
                { "email": "b@example.com" },
                { "email": " a@example.com ", "phone": "+15550001", "variables": { "n": 1 } }
            ]),
            true,
        )
        .expect("a recipient repeated exactly");
        let keys: Vec<&str> = same.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, ["a@example.com", "b@example.com"]);
    }

    /// Pins what a bulk send's fingerprint is made of (see the single send's test of the same
    /// name): if this fails, bump `fingerprint::VERSION`, do not just update the expected values.
    #[test]
    fn a_bulk_fingerprint_is_stable() {
        let content = Content {
            subject: Some("Flash sale".into()),
            text: "Everything half price until midnight.".into(),
            ..Content::default()
        };
        let listed = BatchTarget::Recipients {
            recipients: vec![BatchRecipient {
                key: "cust-1".into(),
                customer_id: Some("cust-1".into()),
                contacts: Contacts::default(),
                variables: serde_json::Map::new(),
            }],
        };
        let filtered = BatchTarget::Filter {
            locale: Some("de".into()),
            external_id_prefix: None,
        };
        let fingerprint = |target| {
            fingerprint::of(&BulkMeaning {
                category: Category::Marketing,
                channels: Some(&[Channel::Email]),
                content: &content,
                target,
            })
            .expect("a fingerprint")
        };
        assert_eq!(
            fingerprint(&listed),
            "v1:4fe8056983cc9ebe38ec571f4e025c20bba030db6969ce1fb5a917e79c6c181d"
        );
        assert_eq!(
            fingerprint(&filtered),
            "v1:705145f448db9661b6244847b7bf8e7dd40e5413ff03862fb48dc8b2de5bfc72"
        );
    }
}
