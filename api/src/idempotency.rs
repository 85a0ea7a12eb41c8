//! Request ids (idempotency keys) of single and bulk sends: where a request's id comes from
//! (the body's `request_id`, else the `Idempotency-Key` header), which ids are accepted, and how
//! a repeat of the request that used the id first is told from another request reusing it (by
//! its [fingerprint]).

use herald_nats::events::ROUTER_REQUEST_ID_PREFIX;
use serde::Serialize;

use herald_entities::RepoError;
use uuid::Uuid;

use crate::{ApiError, fingerprint};

/// Longest request id accepted.
const MAX_REQUEST_ID: usize = 200;

/// The header a send's request id may come in instead of the body's `request_id`.
const IDEMPOTENCY_KEY: &str = "Idempotency-Key";

/// A send's request id (idempotency key), checked, and the field that carried it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId {
    /// The id.
    pub value: String,
    /// Where it came from: `request_id` (the body) or `Idempotency-Key` (the header), as errors
    /// about it name it.
    pub field: &'static str,
}

/// Checks the request id (idempotency key) of a single or bulk send, the body's `request_id` or
/// else the `Idempotency-Key` header: 1 to [`MAX_REQUEST_ID`] characters, not all blank, without
/// control characters, not beginning as the Router's do. A refusal names the field that carried it.
pub(crate) fn request_id(
    body: Option<String>,
    header: Option<String>,
) -> Result<Option<RequestId>, ApiError> {
    let (value, field) = match (body, header) {
        (Some(value), _) => (value, "request_id"),
        (None, Some(value)) => (value, IDEMPOTENCY_KEY),
        (None, None) => return Ok(None),
    };
    if value.trim().is_empty() || value.chars().count() > MAX_REQUEST_ID {
        return Err(ApiError::invalid(
            field,
            format!("{field} must be 1 to {MAX_REQUEST_ID} characters"),
        ));
    }
    crate::validate::plain_text(field, &value)?;
    if value.starts_with(ROUTER_REQUEST_ID_PREFIX) {
        return Err(ApiError::invalid(
            field,
            format!(
                "request ids starting with {ROUTER_REQUEST_ID_PREFIX:?} are the Router's (one per \
                 event and rule); choose another"
            ),
        ));
    }
    Ok(Some(RequestId { value, field }))
}

/// A request with a request id: the id, checked, and its fingerprint, which a stored row's is
/// compared with when the id comes again.
pub struct Keyed {
    /// The request id and the field that carried it.
    pub request_id: RequestId,
    /// The request's fingerprint ([`fingerprint::of`] its meaning).
    pub fingerprint: String,
}

impl Keyed {
    /// `request_id` with the fingerprint of `request` (the fields that make its meaning).
    pub fn new(request_id: RequestId, request: &impl Serialize) -> Result<Self, ApiError> {
        Ok(Self {
            fingerprint: fingerprint::of(request)?,
            request_id,
        })
    }

    /// Refuses this request if it is not a repeat of the one that stored `earlier`
    /// (`notification`, `batch`) with fingerprint `stored` under its request id: 422
    /// `idempotency_key_reused`, naming the field that carried the id.
    pub fn check_repeat(&self, stored: Option<&str>, earlier: &str) -> Result<(), ApiError> {
        if fingerprint::is_repeat(stored, &self.fingerprint) {
            return Ok(());
        }
        metrics::counter!("herald_api_request_id_reused_total", "stored" => earlier.to_string())
            .increment(1);
        Err(ApiError::request_id_reused(
            self.request_id.field,
            &self.request_id.value,
            earlier,
        ))
    }
}

/// The row a keyed request that a check against the state refused (`400`: its template is
/// unknown now, say, or none of its channels has a provider any more) is to be answered with: the
/// one stored under its request id, read by `find`, as the request may be the retry of one
/// accepted before the state changed (a repeat of it, or `422` if it is another request). The
/// refusal stands for a request without a key, a refusal other than a `400`, or an id nothing was
/// stored under. Looked up only after a refusal: the repeat of an accepted request is found by
/// its insert.
pub async fn stored_before<T>(
    key: Option<Keyed>,
    refusal: ApiError,
    find: impl AsyncFnOnce(&str) -> Result<Option<T>, RepoError>,
) -> Result<(Keyed, T), ApiError> {
    let Some(key) = key.filter(|_| matches!(refusal, ApiError::BadRequest(_))) else {
        return Err(refusal);
    };
    match find(&key.request_id.value).await? {
        Some(stored) => Ok((key, stored)),
        None => Err(refusal),
    }
}

/// The key of a request whose insert found the row `id` stored under its request id: only a
/// request id makes a duplicate, so a request without one here is a bug (`500`).
pub fn of_duplicate(key: Option<&Keyed>, id: Uuid) -> Result<&Keyed, ApiError> {
    key.ok_or_else(|| {
        ApiError::internal(&format!(
            "{id} was read back as a repeat of a request without a request id"
        ))
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_request_id_comes_from_the_body_else_the_header_and_its_refusal_names_which() {
        let given = |body: Option<&str>, header: Option<&str>| {
            request_id(body.map(str::to_string), header.map(str::to_string))
        };
        let from_body = given(Some("a-1"), Some("b-1")).expect("valid");
        assert_eq!(
            from_body.map(|id| (id.value, id.field)),
            Some(("a-1".into(), "request_id"))
        );
        let from_header = given(None, Some("b-1")).expect("valid");
        assert_eq!(
            from_header.map(|id| (id.value, id.field)),
            Some(("b-1".into(), "Idempotency-Key"))
        );
        assert_eq!(given(None, None).expect("none is valid"), None);
        let long = "x".repeat(MAX_REQUEST_ID + 1);
        for (body, header, field) in [
            (Some(" "), None, "request_id"),
            (None, Some(long.as_str()), "Idempotency-Key"),
            (None, Some("event:1:rule"), "Idempotency-Key"),
            (Some("retry\0-1"), None, "request_id"),
            (None, Some("retry\t1"), "Idempotency-Key"),
        ] {
            let err = given(body, header).err();
            assert!(
                matches!(&err, Some(ApiError::BadRequest(body)) if body.0.field.as_deref() == Some(field)),
                "{body:?} {header:?}: {err:?}"
            );
        }
    }

    #[test]
    fn another_request_under_a_used_id_is_refused_naming_the_field_that_carried_it() {
        let stored = fingerprint::of(&json!({ "text": "one" })).unwrap();
        for field in ["request_id", "Idempotency-Key"] {
            let request_id = RequestId {
                value: "k-1".into(),
                field,
            };
            let key = Keyed::new(request_id.clone(), &json!({ "text": "two" })).unwrap();
            let refused = key.check_repeat(Some(&stored), "batch").unwrap_err();
            let (status, body) = refused.status_and_body();
            assert_eq!(status.as_u16(), 422, "{body:?}");
            assert_eq!(body.code, "idempotency_key_reused", "{body:?}");
            assert_eq!(body.field.as_deref(), Some(field), "{body:?}");
            assert!(
                body.message.starts_with(&format!("{field} \"k-1\"")),
                "{body:?}"
            );
            let repeat = Keyed::new(request_id, &json!({ "text": "one" })).unwrap();
            assert!(repeat.check_repeat(Some(&stored), "batch").is_ok());
        }
    }
}
