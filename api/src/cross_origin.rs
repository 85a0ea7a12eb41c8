//! Cross-origin request protection (CSRF) from the request's headers alone, as Go's
//! `http.CrossOriginProtection` does it: a browser says where a request comes from, so an unsafe
//! request (any method but GET, HEAD and OPTIONS) that a page of another site made it send is
//! refused with 403, before any handler runs.
//!
//! - `Sec-Fetch-Site` present (every current browser sends it): only `same-origin` and `none`
//!   (typed in the address bar, a bookmark) pass; `same-site` and `cross-site` are refused.
//! - Otherwise `Origin` present (older browsers): it passes when its `host[:port]` is the
//!   request's `Host`, or when it is the origin of Herald's public URL (`http.public_url`, by
//!   default the listen address; for a proxy that does not pass `Host` on).
//! - Neither header: not a browser (curl, SDKs, other servers), or a browser's same-origin
//!   request of old; it passes.
//!
//! Safe methods always pass: they change nothing, and a page of another site cannot read their
//! answers without CORS, which Herald does not serve.

use poem::{
    Endpoint, Middleware, Request,
    http::{HeaderValue, Method, Uri, header},
};

use crate::ApiError;

/// The fetch metadata header that names the relation of the request's initiator to its target.
const SEC_FETCH_SITE: &str = "sec-fetch-site";

/// Refuses unsafe requests a browser sends on behalf of another site's page.
#[derive(Clone)]
pub(crate) struct CrossOriginProtection {
    /// The origin of Herald's public URL, accepted in `Origin` besides the request's own host.
    public_origin: Option<String>,
    /// Makes the refusal: the JSON error for the API, an HTML page for the dashboard.
    refuse: fn(ApiError) -> poem::Error,
}

impl CrossOriginProtection {
    /// Protection for a server reached at `server_url`, refusing with `refuse`.
    pub(crate) fn new(server_url: &str, refuse: fn(ApiError) -> poem::Error) -> Self {
        Self {
            public_origin: server_url.parse::<Uri>().ok().as_ref().and_then(origin_of),
            refuse,
        }
    }
}

impl<E: Endpoint> Middleware<E> for CrossOriginProtection {
    type Output = Protected<E>;

    fn transform(&self, inner: E) -> Self::Output {
        Protected {
            inner,
            protection: self.clone(),
        }
    }
}

/// An endpoint behind [`CrossOriginProtection`].
pub(crate) struct Protected<E> {
    inner: E,
    protection: CrossOriginProtection,
}

impl<E: Endpoint> Endpoint for Protected<E> {
    type Output = E::Output;

    async fn call(&self, req: Request) -> poem::Result<Self::Output> {
        if let Err(refusal) = check(&req, self.protection.public_origin.as_deref()) {
            tracing::info!(
                method = %req.method(),
                path = req.uri().path(),
                %refusal,
                "cross-origin request refused"
            );
            return Err((self.protection.refuse)(ApiError::forbidden(
                refusal.to_string(),
            )));
        }
        self.inner.call(req).await
    }
}

/// Why a request was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refusal {
    /// The browser said the request comes from another origin.
    #[error(
        "cross-origin request refused: the browser sent it from another origin \
         (Sec-Fetch-Site: {0})"
    )]
    FetchSite(String),
    /// The request's `Origin` is neither this server's nor its public URL's.
    #[error("cross-origin request refused: Origin {0} is not this server's")]
    Origin(String),
}

/// Whether `req` may go on: a safe method, a browser's same-origin (or user-initiated) request,
/// or a request without fetch metadata and `Origin` (not from a browser).
pub(crate) fn check(req: &Request, public_origin: Option<&str>) -> Result<(), Refusal> {
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return Ok(());
    }
    let text = |value: &HeaderValue| String::from_utf8_lossy(value.as_bytes()).into_owned();
    if let Some(site) = req.headers().get(SEC_FETCH_SITE) {
        return match site.as_bytes() {
            b"same-origin" | b"none" => Ok(()),
            _ => Err(Refusal::FetchSite(text(site))),
        };
    }
    match req.headers().get(header::ORIGIN) {
        Some(origin) if !is_own_origin(req, origin, public_origin) => {
            Err(Refusal::Origin(text(origin)))
        }
        _ => Ok(()),
    }
}

/// Whether `origin` (an absolute URL) has the request's `Host` as its `host[:port]`, or is
/// `public_origin`.
fn is_own_origin(req: &Request, origin: &HeaderValue, public_origin: Option<&str>) -> bool {
    let Some(origin) = origin
        .to_str()
        .ok()
        .and_then(|o| o.parse::<Uri>().ok())
        .filter(|uri| uri.scheme().is_some())
    else {
        return false;
    };
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|host| host.to_str().ok())
        .or_else(|| req.uri().authority().map(|authority| authority.as_str()));
    let same_host = origin
        .authority()
        .zip(host)
        .is_some_and(|(authority, host)| authority.as_str().eq_ignore_ascii_case(host));
    same_host || public_origin.is_some_and(|public| origin_of(&origin).as_deref() == Some(public))
}

/// The origin of an absolute URL as browsers write it: `scheme://host[:port]`, lowercase, without
/// a default port.
fn origin_of(url: &Uri) -> Option<String> {
    let scheme = url.scheme_str()?.to_ascii_lowercase();
    let host = url.host()?.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    };
    Some(
        match url.port_u16().filter(|port| Some(*port) != default_port) {
            Some(port) => format!("{scheme}://{host}:{port}"),
            None => format!("{scheme}://{host}"),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "herald.local:8080";
    const PUBLIC: &str = "https://herald.example.com";

    /// The verdict on a request with `method` and these headers (name, value), Host `HOST`.
    fn verdict(method: Method, headers: &[(&str, &str)]) -> Result<(), Refusal> {
        let mut req = Request::builder()
            .method(method)
            .uri_str("/dead-letters/1/replay")
            .header(header::HOST, HOST);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let protection = CrossOriginProtection::new(PUBLIC, Into::into);
        check(&req.finish(), protection.public_origin.as_deref())
    }

    #[test]
    fn safe_methods_always_pass() {
        for method in [Method::GET, Method::HEAD, Method::OPTIONS] {
            let headers = [
                ("sec-fetch-site", "cross-site"),
                ("origin", "https://evil.example"),
            ];
            assert_eq!(verdict(method.clone(), &headers), Ok(()), "{method}");
        }
    }

    #[test]
    fn fetch_metadata_decides_when_present_whatever_the_origin() {
        for method in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
            for site in ["same-origin", "none"] {
                let headers = [("sec-fetch-site", site), ("origin", "https://evil.example")];
                assert_eq!(verdict(method.clone(), &headers), Ok(()), "{method} {site}");
            }
            for site in ["cross-site", "same-site", "", "Same-Origin"] {
                let headers = [
                    ("sec-fetch-site", site),
                    ("origin", "http://herald.local:8080"),
                ];
                assert_eq!(
                    verdict(method.clone(), &headers),
                    Err(Refusal::FetchSite(site.into())),
                    "{method} {site:?}: refused even with this server's Origin"
                );
            }
        }
    }

    #[test]
    fn without_fetch_metadata_the_origin_must_be_this_host_or_the_public_url() {
        let post = |origin: &str| verdict(Method::POST, &[("origin", origin)]);
        assert_eq!(post("http://herald.local:8080"), Ok(()));
        assert_eq!(
            post("https://HERALD.local:8080"),
            Ok(()),
            "host only, any case"
        );
        assert_eq!(post("https://herald.example.com"), Ok(()), "the public URL");
        assert_eq!(
            post("https://herald.example.com:443"),
            Ok(()),
            "its default port"
        );
        for foreign in [
            "https://evil.example",
            "http://herald.local:8081",
            "http://herald.local",
            "http://herald.example.com",
            "https://herald.example.com:8443",
            "null",
            "herald.local:8080",
            "",
        ] {
            assert_eq!(
                post(foreign),
                Err(Refusal::Origin(foreign.into())),
                "{foreign:?}"
            );
        }
    }

    #[test]
    fn requests_without_either_header_pass() {
        assert_eq!(verdict(Method::POST, &[]), Ok(()));
        assert_eq!(verdict(Method::DELETE, &[]), Ok(()));
    }

    #[test]
    fn an_origin_without_a_host_passes_only_as_the_public_url() {
        let req = |origin: &str| {
            Request::builder()
                .method(Method::POST)
                .header(header::ORIGIN, origin)
                .finish()
        };
        assert_eq!(
            check(&req("https://herald.example.com"), Some(PUBLIC)),
            Ok(())
        );
        assert!(check(&req("http://herald.local:8080"), Some(PUBLIC)).is_err());
        assert!(check(&req("http://herald.local:8080"), None).is_err());
    }

    #[test]
    fn the_public_origin_is_read_from_the_server_url() {
        let origin = |url: &str| CrossOriginProtection::new(url, Into::into).public_origin;
        assert_eq!(
            origin("HTTPS://Herald.Example.com:443/base/").as_deref(),
            Some("https://herald.example.com")
        );
        assert_eq!(
            origin("http://127.0.0.1:8080").as_deref(),
            Some("http://127.0.0.1:8080")
        );
        assert_eq!(origin("not a url"), None);
    }
}
