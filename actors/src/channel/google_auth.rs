//! OAuth 2.0 access tokens for Google APIs, reused until shortly before they expire (Google's
//! last an hour, so a static token in the configuration stops working within one). Two grants:
//! - a service account key, the JSON file Google Cloud hands out: a JWT signed with the account's
//!   private key (RS256) is exchanged at the key's `token_uri` (RFC 7523);
//! - the metadata server of the machine Herald runs on (Compute Engine, GKE with Workload
//!   Identity, Cloud Run), which hands out tokens of the service account attached to it, so no
//!   key file exists to leak.

use std::path::Path;
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::ProviderError;
use super::http;

/// The grant type of a signed-JWT token request (RFC 7523 section 2.1).
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// How long a signed assertion is valid (Google's maximum).
const ASSERTION_LIFETIME_SECS: i64 = 3600;

/// A token is fetched again when it has less than this left, so that no request carries a token
/// that expires on its way. Below 4 minutes: the metadata server hands out the token it holds
/// until 4 minutes before it expires (5 on Compute Engine), so with a longer margin every request
/// in those minutes would fetch the same token again. 3 minutes 45 seconds, as Google's client
/// libraries take, leaves the server 15 seconds to have its next token.
const REFRESH_MARGIN: Duration = Duration::from_secs(225);

/// The kind of a Google credentials file (`service_account`, `authorized_user`, …).
#[derive(Deserialize)]
struct FileKind {
    #[serde(rename = "type")]
    kind: Option<String>,
}

/// The fields of a service account key file that the token exchange needs.
#[derive(Deserialize)]
struct KeyFile {
    client_email: String,
    private_key: String,
    token_uri: String,
}

/// Why a service account key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ServiceAccountError {
    /// The file cannot be read.
    #[error("cannot read service account key {path}: {reason}")]
    Read {
        /// The configured path.
        path: String,
        /// The OS's reason.
        reason: String,
    },
    /// The file is not a service account key.
    #[error(
        "{path} is not a service account key (JSON with client_email, private_key, token_uri): \
         {reason}"
    )]
    Format {
        /// The configured path.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// The claims of the assertion Google's token endpoint expects.
#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: i64,
    exp: i64,
}

/// The metadata server's token path for the attached service account.
pub(crate) const METADATA_TOKEN_PATH: &str =
    "/computeMetadata/v1/instance/service-accounts/default/token";

/// The address of the token for `scope` on the metadata server at `base_url`
/// (`http://metadata.google.internal` on Google Cloud); an error if that is not a URL.
pub fn metadata_token_url(base_url: &str, scope: &str) -> Result<reqwest::Url, url::ParseError> {
    reqwest::Url::parse_with_params(
        &format!("{}{METADATA_TOKEN_PATH}", base_url.trim_end_matches('/')),
        &[("scopes", scope)],
    )
}

/// How a token is obtained.
enum Grant {
    /// A JWT signed with a service account key, exchanged at the key's `token_uri`.
    ServiceAccount {
        client_email: String,
        key: EncodingKey,
        token_uri: String,
    },
    /// Asked of the metadata server at this URL (the scope in its query).
    MetadataServer { token_url: reqwest::Url },
}

/// The token endpoint's answer (the same shape from both grants).
struct TokenReply {
    access_token: String,
    expires_in: u64,
}

/// Reads a token endpoint's 2xx reply. What is wrong with one that does not fit is said without
/// quoting it: it may hold the access token, and the error ends up in attempts, the channels'
/// state and logs.
fn token_reply(body: &[u8]) -> Result<TokenReply, &'static str> {
    let Ok(serde_json::Value::Object(fields)) = serde_json::from_slice(body) else {
        return Err("not a JSON object");
    };
    let access_token = fields
        .get("access_token")
        .and_then(serde_json::Value::as_str)
        .ok_or("no access_token string")?;
    let expires_in = fields
        .get("expires_in")
        .and_then(serde_json::Value::as_u64)
        .ok_or("no expires_in number of seconds")?;
    Ok(TokenReply {
        access_token: access_token.to_string(),
        expires_in,
    })
}

/// Access tokens for one service account and scope, fetched when needed and shared by every
/// request until shortly before they expire.
pub struct TokenSource {
    grant: Grant,
    scope: &'static str,
    client: reqwest::Client,
    /// The current token and when to stop using it; the lock also makes concurrent requests
    /// wait for one exchange instead of each starting their own.
    cached: Mutex<Option<(String, Instant)>>,
}

impl TokenSource {
    /// Reads the key file at `path`; tokens are for `scope` and fetched with `client`.
    pub fn from_file(
        path: &Path,
        scope: &'static str,
        client: reqwest::Client,
    ) -> Result<Self, ServiceAccountError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ServiceAccountError::Read {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
        let format = |reason: String| ServiceAccountError::Format {
            path: shown.clone(),
            reason,
        };
        let kind: FileKind = serde_json::from_str(&text).map_err(|e| format(e.to_string()))?;
        if let Some(kind) = kind.kind.filter(|kind| kind != "service_account") {
            return Err(format(format!(
                "its type is {kind:?} (such as gcloud's user credentials); create a key of a \
                 service account instead"
            )));
        }
        let file: KeyFile = serde_json::from_str(&text).map_err(|e| format(e.to_string()))?;
        let key = EncodingKey::from_rsa_pem(file.private_key.as_bytes())
            .map_err(|e| format(format!("private_key: {e}")))?;
        let grant = Grant::ServiceAccount {
            client_email: file.client_email,
            key,
            token_uri: file.token_uri,
        };
        Ok(Self::new(grant, scope, client))
    }

    /// Tokens of the service account attached to the machine, from its metadata server's
    /// `token_url` (see [`metadata_token_url`]).
    pub fn from_metadata_server(
        token_url: reqwest::Url,
        scope: &'static str,
        client: reqwest::Client,
    ) -> Self {
        Self::new(Grant::MetadataServer { token_url }, scope, client)
    }

    fn new(grant: Grant, scope: &'static str, client: reqwest::Client) -> Self {
        Self {
            grant,
            scope,
            client,
            cached: Mutex::new(None),
        }
    }

    /// A valid access token: the cached one, or a new one from the token endpoint. A refused
    /// exchange is a transient [`ProviderError`], with the endpoint's `Retry-After`, whatever
    /// its status: an endpoint that is unavailable, and one that refuses the account (a key
    /// deleted or rotated away, a service account deleted or disabled, an assertion outside its
    /// time window because the clock is off, no account attached to the machine), both fail
    /// every send alike until they are mended, which no message can do; so, as with a provider's
    /// 401, the failure counts against the circuit and the message is retried, then
    /// dead-lettered (and can be replayed), rather than ending `failed` as if its device were
    /// wrong.
    pub async fn token(&self) -> Result<String, ProviderError> {
        let mut cached = self.cached.lock().await;
        if let Some((token, until)) = cached.as_ref()
            && Instant::now() < *until
        {
            return Ok(token.clone());
        }
        let fetched = Instant::now();
        let reply = self.exchange().await?;
        let lifetime = Duration::from_secs(reply.expires_in).saturating_sub(REFRESH_MARGIN);
        *cached = Some((reply.access_token.clone(), fetched + lifetime));
        Ok(reply.access_token)
    }

    /// Forgets `refused`, a token the API refused, so the next request fetches another; a newer
    /// token cached since (the refusal answered a send made with an older one) is kept.
    pub async fn forget(&self, refused: &str) {
        let mut cached = self.cached.lock().await;
        if cached.as_ref().is_some_and(|(token, _)| token == refused) {
            *cached = None;
        }
    }

    async fn exchange(&self) -> Result<TokenReply, ProviderError> {
        let (request, endpoint) = match &self.grant {
            Grant::ServiceAccount {
                client_email,
                key,
                token_uri,
            } => (
                self.assertion_request(client_email, key, token_uri)?,
                "OAuth token endpoint refused the service account",
            ),
            Grant::MetadataServer { token_url } => (
                self.client
                    .get(token_url.clone())
                    .header("Metadata-Flavor", "Google"),
                "metadata server refused a token",
            ),
        };
        let http::Reply {
            status,
            retry_after,
            bytes,
            body_lost,
        } = http::exchange(request).await?;
        if !status.is_success() {
            let body = http::body_snippet(&bytes, body_lost, 200);
            let reason = format!("{endpoint}, HTTP {status}: {body}");
            return Err(ProviderError::transient_after(reason, retry_after));
        }
        token_reply(&bytes).map_err(|problem| {
            ProviderError::transient(format!(
                "unexpected OAuth token reply, HTTP {status}: {problem}"
            ))
        })
    }

    /// The token request of a service account key: a signed assertion (RFC 7523).
    fn assertion_request(
        &self,
        client_email: &str,
        key: &EncodingKey,
        token_uri: &str,
    ) -> Result<reqwest::RequestBuilder, ProviderError> {
        let now = chrono::Utc::now().timestamp();
        let claims = Claims {
            iss: client_email,
            scope: self.scope,
            aud: token_uri,
            iat: now,
            exp: now + ASSERTION_LIFETIME_SECS,
        };
        let assertion = jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, key)
            .map_err(|e| {
                ProviderError::unsendable(format!("cannot sign the token request: {e}"))
            })?;
        Ok(self.client.post(token_uri).form(&[
            ("grant_type", JWT_BEARER),
            ("assertion", assertion.as_str()),
        ]))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};
    use wiremock::matchers::{header, method, path, query_param};
    use wiremock::{Mock, MockServer, Request, ResponseTemplate};

    const PRIVATE_KEY: &str = include_str!("testdata/service_account_key.pem");
    const PUBLIC_KEY: &str = include_str!("testdata/service_account_key.pub.pem");
    const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";

    /// Writes a service account key file naming `token_uri`.
    pub(crate) fn key_file(dir: &Path, token_uri: &str) -> std::path::PathBuf {
        let file = dir.join("service-account.json");
        let key = serde_json::json!({
            "type": "service_account",
            "project_id": "shop-app",
            "client_email": "herald@shop-app.iam.gserviceaccount.com",
            "private_key": PRIVATE_KEY,
            "token_uri": token_uri,
        });
        std::fs::write(&file, key.to_string()).expect("key file");
        file
    }

    fn source(file: &Path) -> TokenSource {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = http::client_builder(5_000).build().expect("client");
        TokenSource::from_file(file, SCOPE, client).expect("key")
    }

    /// The claims of the assertion a token request carried, checked against the public key.
    fn assertion_claims(request: &Request) -> serde_json::Value {
        let form: Vec<(String, String)> = url::form_urlencoded::parse(&request.body)
            .into_owned()
            .collect();
        let field = |name: &str| {
            form.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("no {name} in the token request"))
        };
        assert_eq!(field("grant_type"), JWT_BEARER);
        let mut validation = Validation::new(Algorithm::RS256);
        validation.validate_aud = false; // checked by the caller
        let key = DecodingKey::from_rsa_pem(PUBLIC_KEY.as_bytes()).expect("public key");
        jsonwebtoken::decode::<serde_json::Value>(&field("assertion"), &key, &validation)
            .expect("a valid RS256 assertion signed by the account's key")
            .claims
    }

    /// A token endpoint's answer granting `access_token` for `expires_in` seconds.
    pub(crate) fn granted(access_token: &str, expires_in: u64) -> ResponseTemplate {
        ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "access_token": access_token,
            "expires_in": expires_in,
            "token_type": "Bearer",
        }))
    }

    /// Makes `server` answer token requests at `at` with `reply`.
    async fn token_endpoint(server: &MockServer, at: &str, reply: ResponseTemplate) {
        Mock::given(method("POST"))
            .and(path(at))
            .respond_with(reply)
            .mount(server)
            .await;
    }

    #[tokio::test]
    async fn a_signed_assertion_buys_a_token_that_is_reused_until_near_its_expiry() {
        let server = MockServer::start().await;
        token_endpoint(&server, "/token", granted("ya29.fresh", 3599)).await;
        let dir = tempfile::tempdir().expect("dir");
        let token_uri = format!("{}/token", server.uri());
        let tokens = source(&key_file(dir.path(), &token_uri));

        assert_eq!(tokens.token().await.expect("token"), "ya29.fresh");
        assert_eq!(tokens.token().await.expect("token"), "ya29.fresh");
        let requests = server.received_requests().await.expect("recorded");
        assert_eq!(requests.len(), 1, "the second call reused the token");
        let claims = assertion_claims(&requests[0]);
        assert_eq!(claims["iss"], "herald@shop-app.iam.gserviceaccount.com");
        assert_eq!(claims["scope"], SCOPE);
        assert_eq!(claims["aud"], token_uri.as_str());
        let lifetime = claims["exp"].as_i64().expect("exp") - claims["iat"].as_i64().expect("iat");
        assert_eq!(lifetime, ASSERTION_LIFETIME_SECS);

        tokens.forget("ya29.older").await;
        assert_eq!(tokens.token().await.expect("token"), "ya29.fresh");
        let requests = server.received_requests().await.expect("recorded");
        assert_eq!(
            requests.len(),
            1,
            "a refusal of an older token keeps the one fetched since"
        );

        tokens.forget("ya29.fresh").await;
        tokens.token().await.expect("token");
        let requests = server.received_requests().await.expect("recorded");
        assert_eq!(requests.len(), 2, "a forgotten token is fetched again");
    }

    #[tokio::test]
    async fn a_token_about_to_expire_is_not_reused() {
        let server = MockServer::start().await;
        token_endpoint(&server, "/token", granted("ya29.short", 60)).await;
        let dir = tempfile::tempdir().expect("dir");
        let tokens = source(&key_file(dir.path(), &format!("{}/token", server.uri())));
        tokens.token().await.expect("token");
        tokens.token().await.expect("token");
        let requests = server.received_requests().await.expect("recorded");
        assert_eq!(requests.len(), 2, "60 s left is inside the refresh margin");
    }

    /// A token endpoint refusing the account (a key deleted or rotated away, a service account
    /// deleted or disabled, a clock too far off for the assertion) refuses every send alike
    /// until the credentials are fixed: transient, as a provider's 401 is, so that it counts
    /// against the circuit and the messages are retried, then dead-lettered for replay, instead
    /// of each ending `failed` as if its device were wrong.
    #[tokio::test]
    async fn a_refused_account_is_transient_like_an_unavailable_endpoint() {
        let server = MockServer::start().await;
        let bad_signature = ResponseTemplate::new(400).set_body_json(serde_json::json!({
            "error": "invalid_grant",
            "error_description": "Invalid JWT Signature.",
        }));
        token_endpoint(&server, "/bad-signature", bad_signature).await;
        let clock_skew = ResponseTemplate::new(400).set_body_json(serde_json::json!({
            "error": "invalid_grant",
            "error_description": "Invalid JWT: Token must be a short-lived token (60 minutes) \
                                  and in a reasonable timeframe.",
        }));
        token_endpoint(&server, "/clock-skew", clock_skew).await;
        let deleted = ResponseTemplate::new(401).set_body_json(serde_json::json!({
            "error": "invalid_client",
            "error_description": "The OAuth client was not found.",
        }));
        token_endpoint(&server, "/deleted", deleted).await;
        let dir = tempfile::tempdir().expect("dir");
        for (at, code, said) in [
            ("/bad-signature", "400", "invalid_grant"),
            ("/clock-skew", "400", "reasonable timeframe"),
            ("/deleted", "401", "invalid_client"),
        ] {
            let refusing = source(&key_file(dir.path(), &format!("{}{at}", server.uri())));
            match refusing.token().await {
                Err(ProviderError::Transient { reason, .. }) => {
                    assert!(reason.contains(code), "{at}: {reason}");
                    assert!(reason.contains(said), "{at}: {reason}");
                    assert!(reason.contains("refused the service account"), "{reason}");
                }
                other => panic!(
                    "{at}: a refused account fails the channel, not the message: \
                                 {other:?}"
                ),
            }
        }
        let down = ResponseTemplate::new(503).insert_header("Retry-After", "7");
        token_endpoint(&server, "/unavailable", down).await;
        let unavailable = source(&key_file(
            dir.path(),
            &format!("{}/unavailable", server.uri()),
        ));
        match unavailable.token().await {
            Err(ProviderError::Transient { retry_after, .. }) => {
                assert_eq!(retry_after, Some(Duration::from_secs(7)))
            }
            other => panic!("an unavailable endpoint is transient, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_token_reply_missing_a_field_names_it_and_never_quotes_the_token() {
        let server = MockServer::start().await;
        let without_expiry = ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "access_token": "ya29.secret-access-token",
            "token_type": "Bearer",
        }));
        token_endpoint(&server, "/token", without_expiry).await;
        let dir = tempfile::tempdir().expect("dir");
        let tokens = source(&key_file(dir.path(), &format!("{}/token", server.uri())));
        match tokens.token().await {
            Err(ProviderError::Transient { reason, .. }) => {
                assert!(!reason.contains("secret"), "the token leaks: {reason}");
                assert!(reason.contains("expires_in"), "which field? {reason}");
            }
            other => panic!("an unreadable token reply is transient, got {other:?}"),
        }
    }

    fn metadata_source(server: &MockServer) -> TokenSource {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = http::client_builder(5_000).build().expect("client");
        let token_url = metadata_token_url(&server.uri(), SCOPE).expect("URL");
        TokenSource::from_metadata_server(token_url, SCOPE, client)
    }

    #[tokio::test]
    async fn the_metadata_server_grants_the_attached_account_s_token_for_the_scope() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path(METADATA_TOKEN_PATH))
            .and(query_param("scopes", SCOPE))
            .and(header("Metadata-Flavor", "Google"))
            .respond_with(granted("ya29.attached", 3599))
            .expect(1)
            .mount(&server)
            .await;
        let tokens = metadata_source(&server);
        assert_eq!(tokens.token().await.expect("token"), "ya29.attached");
        assert_eq!(
            tokens.token().await.expect("token"),
            "ya29.attached",
            "reused (the mock expects one request)"
        );
    }

    #[tokio::test]
    async fn the_metadata_server_s_cached_token_is_reused_in_its_last_minutes() {
        // The metadata server hands out the token it holds until about 4 minutes before it
        // expires (5 on Compute Engine), with what is left of its lifetime; only then a new one.
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path(METADATA_TOKEN_PATH))
            .respond_with(granted("ya29.cached-by-the-server", 280))
            .expect(1)
            .mount(&server)
            .await;
        let tokens = metadata_source(&server);
        for _ in 0..3 {
            assert_eq!(
                tokens.token().await.expect("token"),
                "ya29.cached-by-the-server"
            );
        }
        let requests = server.received_requests().await.expect("recorded");
        assert_eq!(
            requests.len(),
            1,
            "a token with 280 s left is used, not asked for again on every send"
        );
    }

    /// No service account attached to the machine fails every send alike until one is: as a
    /// refused key, transient.
    #[tokio::test]
    async fn a_machine_without_an_attached_account_is_transient() {
        let server = MockServer::start().await;
        let absent = ResponseTemplate::new(404).set_body_string(
            "The service account was not found, or it is not attached to this instance.",
        );
        Mock::given(method("GET"))
            .and(path(METADATA_TOKEN_PATH))
            .respond_with(absent)
            .mount(&server)
            .await;
        let tokens = metadata_source(&server);
        match tokens.token().await {
            Err(ProviderError::Transient { reason, .. }) => {
                assert!(reason.contains("metadata server"), "{reason}");
                assert!(reason.contains("404"), "{reason}");
            }
            other => panic!(
                "no attached account fails every send alike until one is attached: transient, \
                 got {other:?}"
            ),
        }
    }

    #[test]
    fn a_file_that_is_not_a_key_is_a_clear_error() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().expect("dir");
        let missing = dir.path().join("absent.json");
        let err = TokenSource::from_file(&missing, SCOPE, reqwest::Client::new())
            .err()
            .expect("refused");
        assert!(matches!(err, ServiceAccountError::Read { .. }), "{err}");
        let file = dir.path().join("bad.json");
        std::fs::write(
            &file,
            r#"{"client_email":"x","private_key":"nope","token_uri":"u"}"#,
        )
        .expect("write");
        let err = TokenSource::from_file(&file, SCOPE, reqwest::Client::new())
            .err()
            .expect("refused");
        assert!(err.to_string().contains("private_key"), "{err}");
        let user = dir.path().join("application_default_credentials.json");
        std::fs::write(
            &user,
            r#"{"type":"authorized_user","client_id":"c","client_secret":"s","refresh_token":"r"}"#,
        )
        .expect("write");
        let err = TokenSource::from_file(&user, SCOPE, reqwest::Client::new())
            .err()
            .expect("refused");
        assert!(
            err.to_string().contains(r#"its type is "authorized_user""#),
            "{err}"
        );
    }
}
