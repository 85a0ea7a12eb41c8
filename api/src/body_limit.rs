//! Request body size limit. Unlike poem's `SizeLimit`, bodies without `Content-Length` (GET,
//! chunked uploads) are allowed; a chunked body is read up to the limit and refused beyond it.

use poem::{Body, Endpoint, Error, Request, Result, http::StatusCode};

/// Refuses bodies larger than `max` bytes with 413.
pub async fn limit_body<E: Endpoint>(next: E, mut req: Request, max: usize) -> Result<E::Output> {
    let declared = req
        .headers()
        .get(poem::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(len) if len > max as u64 => return Err(too_large(max)),
        Some(_) => {}
        None => {
            let body = req.take_body();
            if !body.is_empty() {
                let bytes = body
                    .into_bytes_limit(max)
                    .await
                    .map_err(|_| too_large(max))?;
                req.set_body(Body::from_bytes(bytes));
            }
        }
    }
    next.call(req).await
}

fn too_large(max: usize) -> Error {
    Error::from_string(
        format!("request body is larger than {max} bytes"),
        StatusCode::PAYLOAD_TOO_LARGE,
    )
}
