//! DNS rebinding protection while authentication is disabled.
//!
//! With `auth.enabled = false` every request acts as admin. A page on `evil.example` whose name
//! its owner makes resolve to `127.0.0.1` is, to the browser, same-origin with a local Herald: no
//! cross-origin check stops it reading and driving the API. Such a request still names the page's
//! host in `Host`, so requests are served only when `Host` is a loopback name or address
//! (`localhost`, `127.0.0.0/8`, `::1`, any port) or the host of Herald's own URL
//! (`http.public_url`, by default the listen address); others get 403. A request without `Host`
//! (not from a browser) is served. Readiness, liveness and metrics need no key anyway, so a probe
//! or a scrape naming the machine's address passes.

use std::net::IpAddr;

use poem::{
    Endpoint, Request,
    http::{Uri, header, uri::Authority},
};

use crate::ApiError;

/// Paths served whatever `Host` says: they need no key even with authentication on.
const OPEN_PATHS: [&str; 3] = ["/health", "/health/ready", "/metrics"];

/// The hosts requests may name besides loopback ones.
#[derive(Debug, Clone)]
pub(crate) struct AllowedHosts {
    /// The hosts of Herald's own URLs, lowercase, without brackets.
    own: Vec<String>,
}

impl AllowedHosts {
    /// The hosts of a Herald reached at `urls`: its server URL, and the URL Twilio posts its
    /// status callbacks to if they are on (a tunnel's name in development, say).
    pub(crate) fn new<'a>(urls: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            own: urls
                .into_iter()
                .filter_map(|url| url.parse::<Uri>().ok()?.host().map(normalise))
                .collect(),
        }
    }

    /// Whether `req` may go on: an open path, no `Host`, or a `Host` that is loopback or ours.
    fn check(&self, req: &Request) -> Result<(), String> {
        if OPEN_PATHS.contains(&req.uri().path()) {
            return Ok(());
        }
        let Some(host) = req.headers().get(header::HOST) else {
            return Ok(());
        };
        let text = String::from_utf8_lossy(host.as_bytes());
        let allowed = text
            .parse::<Authority>()
            .ok()
            .is_some_and(|authority| self.allows(authority.host()));
        if allowed {
            Ok(())
        } else {
            Err(format!(
                "request for host {text:?} refused: with authentication disabled, Herald serves \
                 only requests for localhost, a loopback address or the host of http.public_url \
                 (DNS rebinding protection)"
            ))
        }
    }

    /// Whether `host` (a `Host` header's host part) is loopback or Herald's own.
    fn allows(&self, host: &str) -> bool {
        let host = normalise(host);
        host == "localhost"
            || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
            || self.own.contains(&host)
    }
}

/// `host` lowercase, without IPv6 brackets or a trailing dot.
fn normalise(host: &str) -> String {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

/// Refuses, with 403, a request whose `Host` [`AllowedHosts`] does not allow.
pub(crate) async fn refuse_other_hosts<E: Endpoint>(
    next: E,
    req: Request,
    allowed: &AllowedHosts,
) -> poem::Result<E::Output> {
    if let Err(refusal) = allowed.check(&req) {
        tracing::info!(
            method = %req.method(),
            path = req.uri().path(),
            %refusal,
            "request for another host refused"
        );
        return Err(ApiError::forbidden(refusal).into());
    }
    next.call(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(server_url: &str, path: &str, host: Option<&str>) -> Result<(), String> {
        let mut req = Request::builder().uri_str(path);
        if let Some(host) = host {
            req = req.header(header::HOST, host);
        }
        AllowedHosts::new([server_url]).check(&req.finish())
    }

    #[test]
    fn loopback_hosts_pass_with_any_port() {
        for host in [
            "localhost",
            "LOCALHOST:8080",
            "localhost.:3000",
            "127.0.0.1:8080",
            "127.1.2.3",
            "[::1]:8080",
            "[::1]",
        ] {
            assert!(
                verdict("http://127.0.0.1:8080", "/api/v1/channels", Some(host)).is_ok(),
                "{host}"
            );
        }
    }

    #[test]
    fn other_hosts_are_refused_but_herald_s_own() {
        for host in [
            "evil.example:8080",
            "evil.example",
            "localhost.evil.example",
            "127.0.0.1.evil.example:8080",
            "10.0.0.5:8080",
            "not a host",
        ] {
            let refused = verdict("http://127.0.0.1:8080", "/", Some(host));
            let message = refused.expect_err(host);
            assert!(message.contains("DNS rebinding"), "{message}");
        }
        let public = "https://Herald.example.com";
        assert!(verdict(public, "/api/v1/channels", Some("herald.example.com")).is_ok());
        assert!(verdict(public, "/api/v1/channels", Some("herald.example.com:443")).is_ok());
        assert!(verdict("http://10.0.0.5:8080", "/", Some("10.0.0.5:8080")).is_ok());
        assert!(verdict("http://[fd00::5]:8080", "/", Some("[FD00::5]:8080")).is_ok());
    }

    /// Twilio posts status callbacks to the URL it was given, a tunnel's name in development:
    /// its host is Herald's own too.
    #[test]
    fn the_twilio_status_callback_url_s_host_passes() {
        let twilio = "https://abc.ngrok.io/api/v1/providers/twilio/status";
        let allowed = AllowedHosts::new(["http://127.0.0.1:8080", twilio]);
        let request = |host: &str| {
            Request::builder()
                .uri_str("/api/v1/providers/twilio/status")
                .header(header::HOST, host)
                .finish()
        };
        assert!(allowed.check(&request("abc.ngrok.io")).is_ok());
        assert!(allowed.check(&request("evil.example")).is_err());
        assert!(
            AllowedHosts::new(["http://127.0.0.1:8080"])
                .check(&request("abc.ngrok.io"))
                .is_err(),
            "not without the callbacks"
        );
    }

    #[test]
    fn probes_and_requests_without_a_host_pass() {
        for path in OPEN_PATHS {
            assert!(verdict("http://127.0.0.1:8080", path, Some("10.0.0.5:8080")).is_ok());
        }
        assert!(verdict("http://127.0.0.1:8080", "/api/v1/channels", None).is_ok());
    }
}
