//! Request screening before any endpoint runs:
//! - bodies are limited in size (unlike poem's `SizeLimit`, bodies without `Content-Length` are
//!   allowed: they are read up to the limit and refused beyond it);
//! - NUL characters are refused in bodies (`\u0000` in JSON), paths and queries (`%00`).
//!   No database stores them in text (PostgreSQL refuses them outright), so they could only come
//!   back as a server error; refusing them here gives every endpoint one clear 400, naming the
//!   body field or query parameter that holds one.

use poem::{Body, Endpoint, Error, Request, Result, http::StatusCode};

/// Refuses bodies larger than `max` bytes with 413 and NUL characters with 400.
pub async fn limit_body<E: Endpoint>(next: E, mut req: Request, max: usize) -> Result<E::Output> {
    let declared = req
        .headers()
        .get(poem::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max as u64) {
        return Err(too_large(max));
    }
    if let Some(field) = nul_query_field(req.uri().query().unwrap_or_default()) {
        return Err(crate::ApiError::invalid(&field, nul_message(&field)).into());
    }
    if req.uri().path().to_ascii_lowercase().contains("%00") {
        return Err(nul_refused("the path"));
    }
    let body = req.take_body();
    if !body.is_empty() {
        let bytes = body
            .into_bytes_limit(max)
            .await
            .map_err(|_| too_large(max))?;
        if has_json_nul(&bytes) {
            return Err(match nul_body_field(&bytes) {
                Some(field) => crate::ApiError::invalid(&field, nul_message(&field)).into(),
                None => nul_refused("the body"),
            });
        }
        req.set_body(Body::from_bytes(bytes));
    }
    next.call(req).await
}

/// Whether JSON text holds a NUL character: a raw 0 byte, or a `\u0000` escape (one preceded by an
/// odd number of backslashes would be a literal backslash followed by `u0000`, which is fine).
fn has_json_nul(bytes: &[u8]) -> bool {
    if bytes.contains(&0) {
        return true;
    }
    let needle = b"u0000";
    bytes.windows(needle.len()).enumerate().any(|(i, window)| {
        window == needle && {
            let backslashes = bytes[..i].iter().rev().take_while(|&&b| b == b'\\').count();
            backslashes % 2 == 1
        }
    })
}

/// The field of a JSON body that holds a NUL character, named as the endpoints name fields
/// (`recipient.email`, `items[0].name`; for a NUL in a key, the object that has it); none when
/// the body is not JSON or the NUL is in a key of the body itself.
fn nul_body_field(bytes: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    nul_field(&value, "").filter(|field| !field.is_empty())
}

/// The path below `at` of the first string in `value` that holds a NUL (for a key, the object
/// that has it).
fn nul_field(value: &serde_json::Value, at: &str) -> Option<String> {
    herald_nats::json_strings::first_string(value, at, &mut |_, text| {
        text.contains('\0').then_some(())
    })
    .map(|(path, ())| path)
}

/// The first query parameter whose name or value holds an encoded NUL (`%00`).
fn nul_query_field(query: &str) -> Option<String> {
    query
        .split('&')
        .find(|pair| pair.to_ascii_lowercase().contains("%00"))
        .map(|pair| {
            let name = pair.split('=').next().unwrap_or_default();
            if name.to_ascii_lowercase().contains("%00") {
                "query".to_string()
            } else {
                name.to_string()
            }
        })
}

fn nul_message(place: &str) -> String {
    format!("{place} contains a NUL character (\\u0000), which Herald does not store")
}

fn too_large(max: usize) -> Error {
    crate::ApiError::payload_too_large(max).into()
}

fn nul_refused(place: &str) -> Error {
    Error::from_string(nul_message(place), StatusCode::BAD_REQUEST)
}

#[cfg(test)]
mod tests {
    use super::{has_json_nul, nul_body_field, nul_query_field};

    #[test]
    fn the_query_parameter_holding_a_nul_is_named() {
        assert_eq!(
            nul_query_field("limit=5&customer_id=a%00b"),
            Some("customer_id".into())
        );
        assert_eq!(nul_query_field("a%00=1"), Some("query".into()));
        assert_eq!(nul_query_field("limit=5"), None);
    }

    #[test]
    fn escaped_nul_is_found_but_a_literal_backslash_u_is_not() {
        assert!(has_json_nul(br#"{"name":"a\u0000b"}"#));
        assert!(
            has_json_nul(br#"{"name":"\\\u0000"}"#),
            "escaped backslash, then NUL"
        );
        assert!(
            !has_json_nul(br#"{"name":"\\u0000"}"#),
            "the text backslash-u0000, not a NUL"
        );
        assert!(!has_json_nul(br#"{"name":"u0000"}"#));
        assert!(has_json_nul(b"{\"a\":\"\x00\"}"));
        assert!(!has_json_nul(br#"{"name":"plain"}"#));
    }

    #[test]
    fn the_body_field_holding_a_nul_is_named_as_the_endpoints_name_fields() {
        let field = |body: &str| nul_body_field(body.as_bytes());
        assert_eq!(
            field(r#"{"recipient":{"email":"a@example.com\u0000"}}"#).as_deref(),
            Some("recipient.email")
        );
        assert_eq!(
            field(r#"{"items":[{"name":"Tea"},{"name":"\u0000"}]}"#).as_deref(),
            Some("items[1].name")
        );
        assert_eq!(
            field(r#"{"template":{"variables":{"a\u0000":1}}}"#).as_deref(),
            Some("template.variables"),
            "a key: the object that has it"
        );
        assert_eq!(field(r#"{"a\u0000":1}"#), None, "a key of the body itself");
        assert_eq!(field("{\"name\":\"\x00\"}"), None, "not JSON");
    }
}
