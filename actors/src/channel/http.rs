//! What the HTTP providers share: a client with a timeout, and the classification of transport
//! errors, status codes and `Retry-After` into [`ProviderError`] classes.

use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, RETRY_AFTER};

use super::ProviderError;

/// Why a provider's `base_url` cannot be used, if it cannot: it must be an `http` or `https` URL
/// with a host. Checked when the configuration is loaded, so that a typo (`api.telegram.org`
/// without its scheme) stops the start instead of failing every send.
pub fn base_url_problem(url: &str) -> Option<String> {
    match reqwest::Url::parse(url.trim()) {
        Err(err) => Some(err.to_string()),
        Ok(url) if !matches!(url.scheme(), "http" | "https") => Some(format!(
            "the scheme {:?} is not http or https",
            url.scheme()
        )),
        Ok(url) if url.host_str().is_none_or(str::is_empty) => Some("it names no host".into()),
        Ok(_) => None,
    }
}

/// The `User-Agent` every provider sends.
const USER_AGENT: &str = concat!("herald/", env!("CARGO_PKG_VERSION"));

/// A client builder with Herald's user agent and a whole-request timeout.
///
/// Building the client needs a process-wide rustls crypto provider (the engine installs ring at
/// start-up): reqwest is compiled without one.
pub(crate) fn client_builder(timeout_ms: u64) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .user_agent(USER_AGENT)
        .timeout(Duration::from_millis(timeout_ms))
}

/// Builds a provider's client; the error gives the causes too (reqwest's own message is only
/// "builder error"), such as "No CA certificates were loaded from the system" where the machine
/// has no certificate bundle. Every HTTP provider's `new` builds its client with this, so the
/// configuration check, which builds the providers, refuses what a start would.
pub(crate) fn build_client(builder: reqwest::ClientBuilder) -> Result<reqwest::Client, String> {
    builder.build().map_err(|e| describe(&e.without_url()))
}

/// The most of a provider's reply body that is read: the replies Herald reads (a message's id,
/// an error's description, an OAuth token) are well under 8 KiB. A longer body is no reply of the
/// provider's API (a proxy's error page, a misconfigured `base_url`), and reading it whole would
/// let one reply take as much memory as it likes.
pub(crate) const MAX_REPLY_BODY: usize = 64 * 1024;

/// A provider's reply, read whole (up to [`MAX_REPLY_BODY`]).
pub(crate) struct Reply {
    /// Its status.
    pub status: StatusCode,
    /// The wait its `Retry-After` header asks for, if any.
    pub retry_after: Option<Duration>,
    /// Its body; empty when it could not be read to the end, its first [`MAX_REPLY_BODY`] bytes
    /// when it is longer.
    pub bytes: bytes::Bytes,
    /// Whether its body could not be read to the end (a reset or a timeout midway), so that
    /// `bytes` is empty whatever the provider said.
    pub body_lost: bool,
}

/// Reads `response`'s body chunk by chunk, and no more than [`MAX_REPLY_BODY`] bytes of it: a
/// longer body is cut there (`true` with it), the rest left unread (the connection is closed).
/// A body that comes in one chunk, as most replies do, is kept as it came, without a copy.
async fn read_body(mut response: reqwest::Response) -> reqwest::Result<(bytes::Bytes, bool)> {
    let first = match response.chunk().await? {
        None => return Ok((bytes::Bytes::new(), false)),
        Some(first) if first.len() > MAX_REPLY_BODY => {
            return Ok((first.slice(..MAX_REPLY_BODY), true));
        }
        Some(first) => first,
    };
    let Some(mut chunk) = response.chunk().await? else {
        return Ok((first, false));
    };
    let mut body = bytes::BytesMut::from(first.as_ref());
    loop {
        let room = MAX_REPLY_BODY - body.len();
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            return Ok((body.freeze(), true));
        }
        body.extend_from_slice(&chunk);
        match response.chunk().await? {
            Some(next) => chunk = next,
            None => return Ok((body.freeze(), false)),
        }
    }
}

/// Sends `request` and reads the whole reply; failing to send it or to get the reply's head is
/// classified by [`request_error`]. A body longer than [`MAX_REPLY_BODY`] is read no further: its
/// first bytes are no complete reply of the provider's, and are judged as a body that is not the
/// provider's (a proxy's page) is. A reply whose body cannot be read (a reset or a timeout
/// midway) comes back with an empty body and [`Reply::body_lost`], as one that says nothing: its
/// status decides. A 2xx is then an acceptance without an id (the provider took the request, and
/// a failure would send the message again); an error status is classified as it would be with an
/// empty body, so a 400 or 404 stays a refusal instead of being retried, and a 429 or 5xx stays
/// transient with its `Retry-After` (a provider may know more of its statuses: Telegram's 429 is
/// flood control of one chat, FCM's 404 a token no longer registered).
pub(crate) async fn exchange(request: reqwest::RequestBuilder) -> Result<Reply, ProviderError> {
    let response = request.send().await.map_err(request_error)?;
    let status = response.status();
    let retry_after = retry_after(response.headers());
    let (bytes, body_lost) = match read_body(response).await {
        Ok((bytes, cut)) => {
            if cut {
                tracing::warn!(
                    %status,
                    limit = MAX_REPLY_BODY,
                    "a provider's reply body is longer than Herald reads; read no further, it is \
                     taken for no reply of the provider's"
                );
            }
            (bytes, false)
        }
        Err(error) => {
            let error = describe(&error.without_url());
            tracing::warn!(%status, %error, "a provider's reply lost its body; judged by its status");
            (bytes::Bytes::new(), true)
        }
    };
    Ok(Reply {
        status,
        retry_after,
        bytes,
        body_lost,
    })
}

/// Classifies an error from sending a request, before any reply came (a reply that did come is
/// judged by its status: see [`exchange`]).
///
/// The URL is stripped first: some providers (Telegram) carry credentials in it. A request that
/// could not even be built is unsendable (it never left); everything else is worth retrying:
/// timeouts, refused connections and resets are the provider's or the network's passing trouble.
pub(crate) fn request_error(error: reqwest::Error) -> ProviderError {
    let error = error.without_url();
    let reason = describe(&error);
    if error.is_builder() {
        ProviderError::unsendable(reason)
    } else if error.is_timeout() {
        ProviderError::transient(format!("timed out: {reason}"))
    } else {
        ProviderError::transient(reason)
    }
}

/// reqwest's own message is terse ("error sending request"); the cause chain says what happened.
fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut reason = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !reason.ends_with(&text) {
            reason.push_str(": ");
            reason.push_str(&text);
        }
        source = cause.source();
    }
    reason
}

/// Whether a failed status is worth retrying: 408, 429 and every 5xx.
pub(crate) fn is_transient(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
        || status.is_server_error()
}

/// Whether a failed status is worth retrying for a request made with the provider account's
/// credentials (a bot token, an API key, an OAuth token): [`is_transient`], and 401. A 401 refuses
/// the account, not the message, so every send fails alike until the credentials are fixed:
/// transient, it counts against the circuit, and the message is retried, then dead-lettered (and
/// can be replayed), rather than ending `failed` as if its address were wrong.
pub(crate) fn is_transient_for_account(status: StatusCode) -> bool {
    is_transient(status) || status == StatusCode::UNAUTHORIZED
}

/// Classifies a non-success status of a request made with the provider account's credentials:
/// transient per [`is_transient_for_account`], otherwise permanent.
pub(crate) fn account_status_error(
    status: StatusCode,
    reason: String,
    retry_after: Option<Duration>,
) -> ProviderError {
    failure(is_transient_for_account(status), reason, retry_after)
}

/// Classifies a non-success status: transient per [`is_transient`], otherwise permanent.
pub(crate) fn status_error(
    status: StatusCode,
    reason: String,
    retry_after: Option<Duration>,
) -> ProviderError {
    failure(is_transient(status), reason, retry_after)
}

/// A transient failure (with the provider's `retry_after`) or a permanent one.
pub(crate) fn failure(
    transient: bool,
    reason: String,
    retry_after: Option<Duration>,
) -> ProviderError {
    if transient {
        ProviderError::transient_after(reason, retry_after)
    } else {
        ProviderError::permanent(reason)
    }
}

/// The `Retry-After` of a reply, as a delay from now.
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?;
    parse_retry_after(value, Utc::now())
}

/// Parses a `Retry-After` value: delta-seconds (`120`) or an HTTP-date
/// (`Wed, 21 Oct 2015 07:28:00 GMT`), which counts from `now`. A date in the past means "now".
pub(crate) fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let date = DateTime::parse_from_rfc2822(value).ok()?;
    Some(
        date.with_timezone(&Utc)
            .signed_duration_since(now)
            .to_std()
            .unwrap_or(Duration::ZERO),
    )
}

/// The provider's id for a message it accepted, read from its 2xx reply `bytes` as a `T` by
/// `id`. Without one (a body that is no such reply, or lost midway) the message went out all the
/// same: sending it again would duplicate it, so it is an acceptance without an id, logged.
pub(crate) fn accepted_id<T: serde::de::DeserializeOwned>(
    provider: &str,
    status: StatusCode,
    bytes: &[u8],
    id: impl FnOnce(T) -> String,
) -> Option<String> {
    match serde_json::from_slice::<T>(bytes) {
        Ok(reply) => Some(id(reply)),
        Err(_) => {
            tracing::warn!(provider, %status, "message accepted without an id in the provider's reply");
            None
        }
    }
}

/// What a reply's body said, for error reasons: its first `max` characters, or, when there are
/// none, that its body was lost midway (`lost`, see [`Reply::body_lost`]) or empty, so that an
/// attempt's recorded error does not trail off.
pub(crate) fn body_snippet(body: &[u8], lost: bool, max: usize) -> String {
    let text = snippet(body, max);
    match (lost, text.is_empty()) {
        (true, _) => "(the reply's body was lost midway)".into(),
        (false, true) => "(the reply's body was empty)".into(),
        (false, false) => text,
    }
}

/// The first `max` characters of a reply body, for error reasons.
pub(crate) fn snippet(body: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(max) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_string(),
    }
}

#[cfg(test)]
pub(crate) mod tests {

    #[test]
    fn a_base_url_needs_an_http_scheme_and_a_host() {
        assert_eq!(base_url_problem("https://api.telegram.org"), None);
        assert_eq!(base_url_problem("http://127.0.0.1:8081/"), None);
        for bad in [
            "api.telegram.org",
            "",
            "ftp://api.twilio.com",
            "https://",
            "mailto:a@b.c",
        ] {
            assert!(base_url_problem(bad).is_some(), "{bad:?} accepted");
        }
    }

    use super::*;
    use chrono::TimeZone;

    #[test]
    fn retry_after_accepts_seconds_and_http_dates() {
        let now = Utc.with_ymd_and_hms(2015, 10, 21, 7, 27, 0).unwrap();
        assert_eq!(
            parse_retry_after(" 120 ", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }

    #[test]
    fn statuses_are_classified() {
        for code in [429, 408, 500, 502, 503] {
            let status = StatusCode::from_u16(code).unwrap();
            assert!(matches!(
                status_error(status, "x".into(), Some(Duration::from_secs(3))),
                ProviderError::Transient {
                    retry_after: Some(d),
                    ..
                } if d == Duration::from_secs(3)
            ));
        }
        for code in [400, 401, 403, 404, 410, 422] {
            let status = StatusCode::from_u16(code).unwrap();
            assert!(matches!(
                status_error(status, "x".into(), None),
                ProviderError::Permanent { .. }
            ));
        }
    }

    /// A server that answers one request with `head` (a status line, and any headers) and the
    /// first 7 bytes of a 100-byte body, then closes the connection: the body is cut off, as by a
    /// reset or a timeout, whatever the path asked. Gives the server's base URL.
    pub(crate) async fn cut_off_reply(head: &'static str) -> String {
        serve_once(format!("{head}\r\nContent-Length: 100\r\n\r\n{{\"sid\":").into_bytes()).await
    }

    /// A server that reads one request ([`read_request`]), answers it with `reply` and closes the
    /// connection (the client may stop reading, and close, before the end). Gives its base URL.
    async fn serve_once(reply: Vec<u8>) -> String {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            read_request(&mut stream).await;
            let _ = stream.write_all(&reply).await;
            let _ = stream.shutdown().await;
        });
        format!("http://{address}")
    }

    /// Reads a request's head and its `Content-Length` body, so that the connection closes
    /// cleanly after the reply (closing it with the request unread could reset it before the
    /// client reads the reply's head).
    async fn read_request(stream: &mut tokio::net::TcpStream) {
        use tokio::io::AsyncReadExt;
        let mut seen = Vec::new();
        let mut chunk = [0; 4096];
        while let Ok(read @ 1..) = stream.read(&mut chunk).await {
            seen.extend_from_slice(&chunk[..read]);
            let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&seen[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .and_then(|value| value.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if seen.len() >= end + 4 + length {
                return;
            }
        }
    }

    fn client() -> reqwest::Client {
        let _ = rustls::crypto::ring::default_provider().install_default();
        client_builder(2_000).build().expect("client")
    }

    #[tokio::test]
    async fn a_2xx_whose_body_is_cut_off_is_still_a_2xx() {
        let url = cut_off_reply("HTTP/1.1 201 Created").await;
        match exchange(client().post(format!("{url}/send"))).await {
            Ok(reply) => assert_eq!(reply.status, StatusCode::CREATED),
            Err(error) => {
                panic!("the provider took the request; a failure would send it again: {error}")
            }
        }
    }

    /// An error reply whose body is lost is judged by its status, as if its body said nothing:
    /// a 400 is no passing trouble, and a 503 keeps its Retry-After.
    #[tokio::test]
    async fn an_error_reply_whose_body_is_cut_off_keeps_its_status() {
        for (head, status, wait) in [
            ("HTTP/1.1 400 Bad Request", StatusCode::BAD_REQUEST, None),
            (
                "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 30",
                StatusCode::SERVICE_UNAVAILABLE,
                Some(Duration::from_secs(30)),
            ),
        ] {
            let url = cut_off_reply(head).await;
            match exchange(client().post(format!("{url}/send"))).await {
                Ok(reply) => {
                    assert_eq!(reply.status, status);
                    assert_eq!(reply.retry_after, wait, "{status}");
                    assert!(reply.bytes.is_empty(), "{status}: {:?}", reply.bytes);
                    assert!(reply.body_lost, "{status}");
                }
                Err(error) => panic!("{status} lost with its body: {error}"),
            }
        }
    }

    /// A server that answers one request with `head` and a body of `length` bytes, with a
    /// `Content-Length` or, without one, ended by closing the connection. Gives its base URL.
    async fn long_reply(head: &'static str, length: usize, with_length: bool) -> String {
        let framing = if with_length {
            format!("Content-Length: {length}")
        } else {
            "Connection: close".to_string()
        };
        let mut reply = format!("{head}\r\n{framing}\r\n\r\n").into_bytes();
        reply.resize(reply.len() + length, b'x');
        serve_once(reply).await
    }

    /// A reply body longer than [`MAX_REPLY_BODY`] is read no further: its first bytes come back,
    /// no reply of the provider's (no id is read from a 2xx, an error is judged as one whose body
    /// is a proxy's page); one of the limit's length is read whole.
    #[tokio::test]
    async fn a_reply_body_is_read_up_to_the_limit_and_no_further() {
        #[derive(serde::Deserialize)]
        struct Sent {
            id: String,
        }
        for with_length in [true, false] {
            for (head, status) in [
                ("HTTP/1.1 200 OK", StatusCode::OK),
                ("HTTP/1.1 502 Bad Gateway", StatusCode::BAD_GATEWAY),
            ] {
                let url = long_reply(head, 1 << 20, with_length).await;
                let what = format!("{status}, Content-Length given: {with_length}");
                match exchange(client().post(format!("{url}/send"))).await {
                    Ok(reply) => {
                        assert_eq!(reply.status, status, "{what}");
                        assert_eq!(
                            reply.bytes.len(),
                            MAX_REPLY_BODY,
                            "{what}: the body's bytes read, of its 1 MiB"
                        );
                        assert!(!reply.body_lost, "{what}");
                        let id =
                            accepted_id("test", reply.status, &reply.bytes, |sent: Sent| sent.id);
                        assert_eq!(id, None, "{what}");
                    }
                    Err(error) => panic!("{what}: {error}"),
                }
            }
            let url = long_reply("HTTP/1.1 200 OK", MAX_REPLY_BODY, with_length).await;
            let reply = exchange(client().post(format!("{url}/send")))
                .await
                .expect("a reply");
            assert!(!reply.body_lost, "Content-Length given: {with_length}");
            assert_eq!(reply.bytes.len(), MAX_REPLY_BODY);
        }
    }

    #[test]
    fn snippets_are_cut_on_character_boundaries() {
        assert_eq!(snippet(b"  short  ", 10), "short");
        assert_eq!(snippet("ééééé".as_bytes(), 3), "ééé…");
    }

    #[test]
    fn a_body_snippet_says_when_there_is_no_body_to_show() {
        assert_eq!(body_snippet(b" busy ", false, 10), "busy");
        assert_eq!(
            body_snippet(b"", true, 10),
            "(the reply's body was lost midway)"
        );
        assert_eq!(
            body_snippet(b"  ", false, 10),
            "(the reply's body was empty)"
        );
    }
}
