//! One JSON error shape for every error the API returns, and its mapping to HTTP statuses.

use poem::{Response, http::StatusCode};
use poem_openapi::{ApiResponse, Object, payload::Json};

/// The body of every error response.
#[derive(Debug, Clone, Object, serde::Serialize)]
pub struct ErrorBody {
    /// Stable machine-readable code, e.g. `invalid_request`, `not_found`,
    /// `idempotency_key_reused`, `unavailable`.
    pub code: String,
    /// What went wrong, for humans.
    pub message: String,
    /// The request field (or header, such as `Idempotency-Key`) at fault, when there is one.
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// The errors of the API.
#[derive(Debug, ApiResponse)]
pub enum ApiError {
    /// The request is invalid; `field` names the culprit when there is one.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// No valid API key: missing, malformed, unknown or revoked (code `unauthorized`).
    #[oai(status = 401)]
    Unauthorized(Json<ErrorBody>),
    /// The API key is valid but lacks the scope the operation needs; or, with authentication
    /// disabled, a browser sent this POST, PUT, PATCH or DELETE from another site's page (its
    /// `Sec-Fetch-Site` is neither `same-origin` nor `none`, or without one its `Origin` is not
    /// this server's) (code `forbidden`).
    #[oai(status = 403)]
    Forbidden(Json<ErrorBody>),
    /// No such resource.
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    /// The resource is not in a state that allows the operation (code `conflict`).
    #[oai(status = 409)]
    Conflict(Json<ErrorBody>),
    /// The request body is larger than 1 MiB; or a send's notification (immediate or scheduled,
    /// or any recipient's of a bulk send) would be larger, as the send command Herald publishes,
    /// than the NATS server's `max_payload` takes, which no retry mends: the message names
    /// `max_payload` and the sizes (code `payload_too_large`). Nothing was accepted.
    #[oai(status = 413)]
    PayloadTooLarge(Json<ErrorBody>),
    /// The operation takes a JSON body and the request's `Content-Type` is missing or not
    /// `application/json` (code `unsupported_media_type`).
    #[oai(status = 415)]
    UnsupportedMediaType(Json<ErrorBody>),
    /// A send's `request_id` (or `Idempotency-Key`) was used before for a different request
    /// (code `idempotency_key_reused`; `field` names the one that carried it, `request_id` or
    /// `Idempotency-Key`): nothing of this request was stored or sent, and the earlier request's
    /// notification or batch is left as it is. A repeat must carry the same request; a new
    /// request needs a new request id.
    #[oai(status = 422)]
    UnprocessableContent(Json<ErrorBody>),
    /// A dependency (NATS, database) is unavailable (code `unavailable`). Usually nothing was
    /// accepted; but a send whose publish failed while the database could not withdraw its stored
    /// notification either may still be sent (the Scheduler publishes it later; the message says
    /// so). Retry later, and only with the same `request_id`.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
    /// An unexpected error; details are in the server log.
    #[oai(status = 500)]
    Internal(Json<ErrorBody>),
}

impl ApiError {
    /// 400 naming the field at fault.
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self::BadRequest(Json(ErrorBody {
            code: "invalid_request".into(),
            message: message.into(),
            field: Some(field.into()),
        }))
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::NotFound(Json(body("not_found", message)))
    }

    /// 401.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::Unauthorized(Json(body("unauthorized", message)))
    }

    /// 403.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::Forbidden(Json(body("forbidden", message)))
    }

    /// 409.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::Conflict(Json(body("conflict", message)))
    }

    /// 413, for a body larger than `max` bytes.
    pub fn payload_too_large(max: usize) -> Self {
        Self::PayloadTooLarge(Json(body(
            "payload_too_large",
            format!("request body is larger than {max} bytes"),
        )))
    }

    /// 413, for a send whose command the NATS server refuses, or would refuse, as larger than its
    /// `max_payload` (`reason` gives the sizes): however often it is tried, it is refused.
    pub fn larger_than_nats_takes(reason: &str) -> Self {
        Self::too_large_for_nats("the notification", reason)
    }

    /// 413, for `what` (`the notification`, `the order's event`) that the NATS server would refuse
    /// as larger than its `max_payload` (`reason` gives the sizes).
    pub fn too_large_for_nats(what: &str, reason: &str) -> Self {
        Self::PayloadTooLarge(Json(body(
            "payload_too_large",
            format!(
                "{what} is larger than the NATS server takes ({reason}); nothing was accepted: \
                 send less, or raise the server's max_payload"
            ),
        )))
    }

    /// 422: the request id `request_id`, given as `field` (`request_id` or `Idempotency-Key`), was
    /// used before for a different request; `earlier` names what it stored (`notification`,
    /// `batch`).
    pub fn request_id_reused(field: &str, request_id: &str, earlier: &str) -> Self {
        Self::UnprocessableContent(Json(ErrorBody {
            field: Some(field.into()),
            ..body(
                "idempotency_key_reused",
                format!(
                    "{field} {request_id:?} was used before for a different request, which \
                     stored a {earlier}; a repeat must carry the same request (the {earlier} \
                     stored first is unchanged and this request was not accepted): use a new \
                     {field} for a new request"
                ),
            )
        }))
    }

    /// 503.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::Unavailable(Json(body("unavailable", message)))
    }

    /// The HTTP status and the body of this error.
    pub fn status_and_body(&self) -> (StatusCode, &ErrorBody) {
        match self {
            Self::BadRequest(body) => (StatusCode::BAD_REQUEST, &body.0),
            Self::Unauthorized(body) => (StatusCode::UNAUTHORIZED, &body.0),
            Self::Forbidden(body) => (StatusCode::FORBIDDEN, &body.0),
            Self::NotFound(body) => (StatusCode::NOT_FOUND, &body.0),
            Self::Conflict(body) => (StatusCode::CONFLICT, &body.0),
            Self::PayloadTooLarge(body) => (StatusCode::PAYLOAD_TOO_LARGE, &body.0),
            Self::UnsupportedMediaType(body) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, &body.0),
            Self::UnprocessableContent(body) => (StatusCode::UNPROCESSABLE_ENTITY, &body.0),
            Self::Unavailable(body) => (StatusCode::SERVICE_UNAVAILABLE, &body.0),
            Self::Internal(body) => (StatusCode::INTERNAL_SERVER_ERROR, &body.0),
        }
    }

    /// 500; the cause is logged, not returned.
    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::Internal(Json(body("internal", "internal error; see the server log")))
    }
}

impl From<herald_entities::RepoError> for ApiError {
    /// 503 when the database is unavailable (unreachable, restarting, read-only, out of room:
    /// the same request may succeed later); 400 `invalid_request` when it refused a text of the
    /// request as one it cannot hold (a NUL character, or one outside its encoding), for a field
    /// no check before the query caught; else 500.
    fn from(err: herald_entities::RepoError) -> Self {
        if err.is_outage() {
            tracing::warn!(error = %err, "database unavailable");
            Self::unavailable("database unavailable")
        } else if err.is_unstorable_text() {
            tracing::warn!(error = %err, "database refused a text of the request");
            Self::BadRequest(Json(body(
                "invalid_request",
                "the request holds a character the database cannot store (a NUL character, or \
                 one outside the database's encoding)",
            )))
        } else {
            Self::internal(&err)
        }
    }
}

fn body(code: &str, message: impl Into<String>) -> ErrorBody {
    ErrorBody {
        code: code.into(),
        message: message.into(),
        field: None,
    }
}

/// Renders any error that escaped the typed responses (unparsable JSON, unknown route, body too
/// large, ...) in the same JSON shape.
pub async fn render_error(err: poem::Error) -> Response {
    if err.is_from_response() {
        // A typed ApiError: its response already has the documented shape.
        return err.into_response();
    }
    let status = err.status();
    let code = match status {
        StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => "invalid_request",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        s if s.is_server_error() => "internal",
        _ => "error",
    };
    let unknown = err
        .downcast_ref::<poem_openapi::error::ParseRequestPayloadError>()
        .and_then(|e| UnknownField::of(&e.reason));
    let message = if status.is_server_error() {
        tracing::error!(error = %err, "unhandled server error");
        "internal error; see the server log".to_string()
    } else if let Some(unknown) = &unknown {
        unknown.message()
    } else {
        err.to_string()
    };
    // A parameter that failed to parse or validate is named, like the typed 400s do, and so is a
    // body field the API does not know.
    let field = err
        .downcast_ref::<poem_openapi::error::ParseParamError>()
        .map(|e| e.name.to_string())
        .or_else(|| unknown.map(|unknown| unknown.field));
    let body = ErrorBody {
        field,
        ..body(code, message)
    };
    let json = serde_json::to_string(&body).unwrap_or_default();
    Response::builder()
        .status(status)
        .content_type("application/json; charset=utf-8")
        .body(json)
}

/// A body field no request object of the API has, as poem-openapi's parser reports it for an
/// object with `deny_unknown_fields`: `failed to parse "Recipient": unknown field `customerId`.`,
/// followed by `(occurred while parsing "SendRequest")` for each object around it.
#[derive(Debug, PartialEq, Eq)]
struct UnknownField {
    /// The field's name, as the request spelt it.
    field: String,
    /// The object type that does not have it (`Recipient`), when the report names one.
    object: Option<String>,
}

impl UnknownField {
    /// The unknown field a payload parse error reports, if that is what it reports.
    fn of(reason: &str) -> Option<Self> {
        const MARK: &str = "unknown field `";
        let (before, after) = reason.split_once(MARK)?;
        let (field, _) = after.rsplit_once("`.")?;
        let object = before
            .rsplit_once("failed to parse \"")
            .and_then(|(_, rest)| rest.split_once('"'))
            .map(|(object, _)| object.to_string());
        Some(Self {
            field: field.to_string(),
            object,
        })
    }

    /// What the error body says.
    fn message(&self) -> String {
        let field = &self.field;
        let within = self
            .object
            .as_ref()
            .map(|object| format!(" in {object}"))
            .unwrap_or_default();
        format!(
            "unknown field {field:?}{within}: the request takes only the fields the API \
             documents (field names are snake_case); nothing was accepted"
        )
    }
}

#[cfg(test)]
mod tests {
    use std::{borrow::Cow, sync::Arc};

    use herald_entities::RepoError;
    use sea_orm::{DbErr, RuntimeErr, sqlx};

    use super::*;

    /// A database's refusal with a SQLSTATE, as a driver reports one.
    #[derive(Debug)]
    struct Refusal(&'static str);

    impl std::fmt::Display for Refusal {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "refused with SQLSTATE {}", self.0)
        }
    }

    impl std::error::Error for Refusal {}

    impl sqlx::error::DatabaseError for Refusal {
        fn message(&self) -> &str {
            "refused"
        }
        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.0))
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    #[test]
    fn an_unknown_field_is_read_from_the_parsers_report() {
        let reason = "failed to parse \"Recipient\": unknown field `customerId`. (occurred while \
                      parsing \"SendRequest\")";
        let unknown = UnknownField::of(reason).expect("an unknown field");
        assert_eq!(unknown.field, "customerId");
        assert_eq!(unknown.object.as_deref(), Some("Recipient"));
        assert!(
            unknown
                .message()
                .starts_with("unknown field \"customerId\" in Recipient:")
        );
        let odd = UnknownField::of("failed to parse \"X\": unknown field `a`.b`.").expect("odd");
        assert_eq!(odd.field, "a`.b", "a name with a backquote is kept whole");
        assert_eq!(
            UnknownField::of("failed to parse \"X\": expected object, found string"),
            None
        );
    }

    fn status_of(err: sqlx::Error) -> StatusCode {
        let err = RepoError::Db(DbErr::Query(RuntimeErr::SqlxError(Arc::new(err))));
        ApiError::from(err).status_and_body().0
    }

    #[test]
    fn a_database_lost_mid_query_is_unavailable_a_wrong_query_is_internal() {
        let cut = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        assert_eq!(
            status_of(sqlx::Error::Io(cut)),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            status_of(sqlx::Error::PoolTimedOut),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            status_of(sqlx::Error::RowNotFound),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }

    #[test]
    fn text_the_database_cannot_hold_is_a_bad_request_other_refusals_are_internal() {
        let refused = |code| status_of(sqlx::Error::Database(Box::new(Refusal(code))));
        assert_eq!(refused("22021"), StatusCode::BAD_REQUEST, "NUL in text");
        assert_eq!(refused("22P05"), StatusCode::BAD_REQUEST, "untranslatable");
        assert_eq!(
            refused("42P01"),
            StatusCode::INTERNAL_SERVER_ERROR,
            "no such table"
        );
        assert_eq!(
            refused("57P01"),
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down"
        );
    }
}
