//! API keys: their format, how they are stored and verified, their scopes, and the OpenAPI
//! security scheme every `/api/v1` operation declares.
//!
//! A key reads `hk_<prefix>_<secret>`: 16 hex characters of public lookup prefix and 64 hex
//! characters (256 random bits) of secret. Only the SHA-256 of the secret is stored. A fast hash is
//! enough because the secret is high-entropy random, not a password: nobody can guess 2^256
//! inputs, so a slow hash (argon2) would only add latency to every cache miss without adding
//! safety. Verified keys are cached in memory for a short time (bounded), so a request costs one
//! SHA-256 and no database round trip; a revoked key stops working within that time.
//!
//! An operation requires a scope by taking one of [`SendKey`], [`ReadKey`], [`CallbackKey`] or
//! [`AdminKey`] as its first parameter. A missing, malformed, unknown or revoked key answers 401; a
//! valid key without the scope answers 403; both in the JSON error shape.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chrono::Utc;
use herald_entities::repo::api_keys;
use poem::{Endpoint, Request};
use poem_openapi::{SecurityScheme, auth::Bearer};
use rand::TryRngCore;
use sea_orm::DatabaseConnection;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::ApiError;

/// What every token starts with.
pub const TOKEN_START: &str = "hk_";
/// Bytes of the public lookup prefix (hex-encoded: twice as many characters).
const PREFIX_BYTES: usize = 8;
/// Bytes of the secret (hex-encoded: twice as many characters).
const SECRET_BYTES: usize = 32;

/// What a key may do. `admin` includes every other scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Send notifications.
    Send,
    /// Read notifications, history, stats, channels and dead letters.
    Read,
    /// Post provider delivery receipts (give this one to providers' webhook configurations).
    Callbacks,
    /// Everything, including replaying dead letters.
    Admin,
}

impl Scope {
    /// Every scope.
    pub const ALL: [Scope; 4] = [Scope::Send, Scope::Read, Scope::Callbacks, Scope::Admin];

    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Send => "send",
            Scope::Read => "read",
            Scope::Callbacks => "callbacks",
            Scope::Admin => "admin",
        }
    }

    /// Parses the lowercase name.
    pub fn parse(name: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

/// Parses a comma-separated scope list (`send,read`): at least one, all known; sorted, no repeats.
pub fn parse_scopes(list: &str) -> Result<Vec<Scope>, String> {
    let mut scopes = Vec::new();
    for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let scope = Scope::parse(name).ok_or_else(|| {
            format!("unknown scope {name:?}; known: send, read, callbacks, admin")
        })?;
        scopes.push(scope);
    }
    scopes.sort();
    scopes.dedup();
    if scopes.is_empty() {
        return Err("give at least one scope: send, read, callbacks, admin".into());
    }
    Ok(scopes)
}

/// The comma-separated form of `scopes`, as stored.
pub fn format_scopes(scopes: &[Scope]) -> String {
    scopes
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// Whether holding `held` allows an operation that needs `needed`.
pub fn grants(held: &[Scope], needed: Scope) -> bool {
    held.contains(&Scope::Admin) || held.contains(&needed)
}

/// A freshly generated key: the token to hand out once, and what to store.
pub struct GeneratedKey {
    /// The whole key, `hk_<prefix>_<secret>`; shown once, never stored.
    pub token: String,
    /// The lookup prefix.
    pub prefix: String,
    /// Hex SHA-256 of the secret.
    pub secret_hash: String,
}

/// The operating system's random source failed.
#[derive(Debug, thiserror::Error)]
#[error("no randomness available for a new key: {0}")]
pub struct RandomnessError(String);

/// Generates a new key from the operating system's random source.
pub fn generate_key() -> Result<GeneratedKey, RandomnessError> {
    let mut prefix = [0u8; PREFIX_BYTES];
    let mut secret = [0u8; SECRET_BYTES];
    let mut rng = rand::rngs::OsRng;
    rng.try_fill_bytes(&mut prefix)
        .and_then(|()| rng.try_fill_bytes(&mut secret))
        .map_err(|e| RandomnessError(e.to_string()))?;
    let prefix = hex::encode(prefix);
    let secret = hex::encode(secret);
    Ok(GeneratedKey {
        token: format!("{TOKEN_START}{prefix}_{secret}"),
        secret_hash: hash_secret(&secret),
        prefix,
    })
}

/// Hex SHA-256 of a secret.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Splits a token into its prefix and secret; `None` when it does not have the key shape.
pub fn split_token(token: &str) -> Option<(&str, &str)> {
    let (prefix, secret) = token.strip_prefix(TOKEN_START)?.split_once('_')?;
    let hex_of = |s: &str, bytes: usize| {
        s.len() == bytes * 2 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    (hex_of(prefix, PREFIX_BYTES) && hex_of(secret, SECRET_BYTES)).then_some((prefix, secret))
}

/// Compares without an early exit, so the time taken does not tell how much of a guess matched.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The key a request was authenticated with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The key's id (`nil` when authentication is disabled).
    pub key_id: Uuid,
    /// The key's name.
    pub name: String,
    /// Its scopes.
    pub scopes: Vec<Scope>,
    /// The one provider it posts delivery receipts for; `None`: every provider.
    pub provider: Option<String>,
}

/// Authentication settings.
#[derive(Debug, Clone, Copy)]
pub struct AuthSettings {
    /// Whether keys are required. When off, every request acts with every scope (for local
    /// development only).
    pub enabled: bool,
    /// How long a verified (or unknown) key is remembered; also how long a revoked key may still
    /// work on an instance that verified it recently.
    pub cache_ttl: Duration,
    /// Most keys remembered at once.
    pub cache_capacity: usize,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            cache_ttl: Duration::from_secs(10),
            cache_capacity: 10_000,
        }
    }
}

/// A stored key as the cache keeps it.
#[derive(Debug, Clone)]
struct StoredKey {
    id: Uuid,
    name: String,
    secret_hash: String,
    scopes: Vec<Scope>,
    provider: Option<String>,
}

struct CacheEntry {
    /// `None`: no usable key with this prefix (unknown or revoked).
    key: Option<StoredKey>,
    fetched: Instant,
    /// Whether the key's use was recorded (`last_used_at`) since it was fetched.
    use_recorded: bool,
}

/// Verifies keys against the database, with a bounded in-memory cache.
pub struct KeyVerifier {
    db: DatabaseConnection,
    settings: AuthSettings,
    cache: Mutex<HashMap<String, CacheEntry>>,
}

impl KeyVerifier {
    /// A verifier over the `api_keys` table.
    pub fn new(db: DatabaseConnection, settings: AuthSettings) -> Self {
        Self {
            db,
            settings,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Whether keys are required.
    pub fn enabled(&self) -> bool {
        self.settings.enabled
    }

    /// Authenticates `token` and checks it grants `needed`: 401 or 403 as [`ApiError`]s.
    pub async fn authorize(&self, token: &str, needed: Scope) -> Result<Principal, ApiError> {
        let principal = self.verify(token).await?;
        if grants(&principal.scopes, needed) {
            Ok(principal)
        } else {
            Err(ApiError::forbidden(format!(
                "this API key lacks the `{}` scope",
                needed.as_str()
            )))
        }
    }

    /// Authenticates `token`; 401 when it is not a valid, unrevoked key.
    pub async fn verify(&self, token: &str) -> Result<Principal, ApiError> {
        if !self.settings.enabled {
            return Ok(Principal {
                key_id: Uuid::nil(),
                name: "auth disabled".into(),
                scopes: vec![Scope::Admin],
                provider: None,
            });
        }
        let unauthorized = || ApiError::unauthorized("unknown or revoked API key");
        let (prefix, secret) = split_token(token).ok_or_else(unauthorized)?;
        let stored = match self.cached(prefix) {
            Some(hit) => hit,
            None => self.load(prefix).await?,
        };
        let key = stored.ok_or_else(unauthorized)?;
        if !constant_time_eq(hash_secret(secret).as_bytes(), key.secret_hash.as_bytes()) {
            return Err(unauthorized());
        }
        self.record_use(prefix, key.id);
        Ok(Principal {
            key_id: key.id,
            name: key.name,
            scopes: key.scopes,
            provider: key.provider,
        })
    }

    /// Whether the key with this prefix and id is still usable (not revoked) and grants `needed`,
    /// without its secret: for sessions begun with a verified key (the dashboard). Answers from
    /// the cache like [`KeyVerifier::verify`], so a revocation shows within the cache period.
    pub async fn still_grants(
        &self,
        prefix: &str,
        key_id: Uuid,
        needed: Scope,
    ) -> Result<bool, ApiError> {
        if !self.settings.enabled {
            return Ok(true);
        }
        let stored = match self.cached(prefix) {
            Some(hit) => hit,
            None => self.load(prefix).await?,
        };
        let granted = stored.is_some_and(|key| key.id == key_id && grants(&key.scopes, needed));
        if granted {
            self.record_use(prefix, key_id);
        }
        Ok(granted)
    }

    /// Records that the key with `prefix` authenticated (`last_used_at`): once per cache period
    /// (cheap, and close enough for "last used"), and only once it proved itself, so a request
    /// with a key's public prefix and a wrong secret does not make an unused key look used. The
    /// write runs beside the request, not in its way: while the database is slow or its write
    /// lock is taken, a stamp nobody waits for would otherwise add its whole wait (up to the pool's
    /// or the lock's timeout) to the request before the request's own queries wait theirs.
    fn record_use(&self, prefix: &str, key_id: Uuid) {
        let first_since_fetch = {
            let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
            cache
                .get_mut(prefix)
                .is_some_and(|entry| !std::mem::replace(&mut entry.use_recorded, true))
        };
        if !first_since_fetch {
            return;
        }
        let db = self.db.clone();
        tokio::spawn(async move {
            if let Err(err) = api_keys::touch(&db, key_id, Utc::now()).await {
                tracing::warn!(%key_id, error = %err, "cannot record API key use");
            }
        });
    }

    fn cached(&self, prefix: &str) -> Option<Option<StoredKey>> {
        let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        cache
            .get(prefix)
            .filter(|entry| entry.fetched.elapsed() < self.settings.cache_ttl)
            .map(|entry| entry.key.clone())
    }

    async fn load(&self, prefix: &str) -> Result<Option<StoredKey>, ApiError> {
        let row = api_keys::find_by_prefix(&self.db, prefix).await?;
        let key = row.filter(|r| r.revoked_at.is_none()).and_then(|r| {
            match parse_scopes(&r.scopes) {
                Ok(scopes) => Some(StoredKey {
                    id: r.id,
                    name: r.name,
                    secret_hash: r.secret_hash,
                    scopes,
                    provider: r.provider,
                }),
                Err(reason) => {
                    tracing::warn!(key_id = %r.id, %reason, "API key with unreadable scopes; refused");
                    None
                }
            }
        });
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        make_room(
            &mut cache,
            self.settings.cache_capacity,
            self.settings.cache_ttl,
        );
        cache.insert(
            prefix.to_string(),
            CacheEntry {
                key: key.clone(),
                fetched: Instant::now(),
                use_recorded: false,
            },
        );
        Ok(key)
    }
}

/// Frees a place in a full `cache`: drops expired entries, then the prefixes that name no key
/// (a flood of made-up keys must not evict the real ones, whose next use would reach the
/// database again), then, if it is still full, everything.
fn make_room(cache: &mut HashMap<String, CacheEntry>, capacity: usize, ttl: Duration) {
    if cache.len() < capacity {
        return;
    }
    cache.retain(|_, entry| entry.fetched.elapsed() < ttl);
    if cache.len() >= capacity {
        cache.retain(|_, entry| entry.key.is_some());
    }
    if cache.len() >= capacity {
        cache.clear();
    }
}

async fn check(req: &Request, bearer: Bearer, needed: Scope) -> poem::Result<Principal> {
    let Some(verifier) = req.data::<Arc<KeyVerifier>>() else {
        return Err(ApiError::internal(&"no key verifier attached to the route").into());
    };
    Ok(verifier.authorize(&bearer.token, needed).await?)
}

async fn check_send(req: &Request, bearer: Bearer) -> poem::Result<Principal> {
    check(req, bearer, Scope::Send).await
}

async fn check_read(req: &Request, bearer: Bearer) -> poem::Result<Principal> {
    check(req, bearer, Scope::Read).await
}

async fn check_callbacks(req: &Request, bearer: Bearer) -> poem::Result<Principal> {
    check(req, bearer, Scope::Callbacks).await
}

async fn check_admin(req: &Request, bearer: Bearer) -> poem::Result<Principal> {
    check(req, bearer, Scope::Admin).await
}

/// An API key with the `send` scope (or `admin`): `Authorization: Bearer hk_<prefix>_<secret>`.
/// Keys are created with `herald apikey create --name N --scopes send,read,callbacks,admin`.
/// Scopes: `send` sends notifications and writes what they go to (customers and their contacts,
/// preferences and quiet hours, orders, which publish events); `read` reads notifications,
/// history, stats, channels and dead letters; `callbacks` posts provider delivery receipts, for
/// every provider or, created with `--provider P`, for `P` only; `admin` does all of that and replays dead letters. 401 means a missing, unknown or revoked key; 403 a key without the
/// operation's scope, or a receipt for another provider than a bound `callbacks` key's.
#[derive(SecurityScheme)]
#[oai(
    rename = "ApiKey",
    ty = "bearer",
    bearer_format = "hk_<prefix>_<secret>",
    checker = "check_send"
)]
pub struct SendKey(pub Principal);

/// An API key with the `read` scope (or `admin`): `Authorization: Bearer hk_<prefix>_<secret>`.
/// Keys are created with `herald apikey create --name N --scopes send,read,callbacks,admin`.
/// Scopes: `send` sends notifications and writes what they go to (customers and their contacts,
/// preferences and quiet hours, orders, which publish events); `read` reads notifications,
/// history, stats, channels and dead letters; `callbacks` posts provider delivery receipts, for
/// every provider or, created with `--provider P`, for `P` only; `admin` does all of that and replays dead letters. 401 means a missing, unknown or revoked key; 403 a key without the
/// operation's scope, or a receipt for another provider than a bound `callbacks` key's.
#[derive(SecurityScheme)]
#[oai(
    rename = "ApiKey",
    ty = "bearer",
    bearer_format = "hk_<prefix>_<secret>",
    checker = "check_read"
)]
pub struct ReadKey(pub Principal);

/// An API key with the `callbacks` scope (or `admin`): `Authorization: Bearer hk_<prefix>_<secret>`.
/// Keys are created with `herald apikey create --name N --scopes send,read,callbacks,admin`.
/// Scopes: `send` sends notifications and writes what they go to (customers and their contacts,
/// preferences and quiet hours, orders, which publish events); `read` reads notifications,
/// history, stats, channels and dead letters; `callbacks` posts provider delivery receipts, for
/// every provider or, created with `--provider P`, for `P` only; `admin` does all of that and replays dead letters. 401 means a missing, unknown or revoked key; 403 a key without the
/// operation's scope, or a receipt for another provider than a bound `callbacks` key's.
#[derive(SecurityScheme)]
#[oai(
    rename = "ApiKey",
    ty = "bearer",
    bearer_format = "hk_<prefix>_<secret>",
    checker = "check_callbacks"
)]
pub struct CallbackKey(pub Principal);

/// An API key with the `admin` scope: `Authorization: Bearer hk_<prefix>_<secret>`.
/// Keys are created with `herald apikey create --name N --scopes send,read,callbacks,admin`.
/// Scopes: `send` sends notifications and writes what they go to (customers and their contacts,
/// preferences and quiet hours, orders, which publish events); `read` reads notifications,
/// history, stats, channels and dead letters; `callbacks` posts provider delivery receipts, for
/// every provider or, created with `--provider P`, for `P` only; `admin` does all of that and replays dead letters. 401 means a missing, unknown or revoked key; 403 a key without the
/// operation's scope, or a receipt for another provider than a bound `callbacks` key's.
#[derive(SecurityScheme)]
#[oai(
    rename = "ApiKey",
    ty = "bearer",
    bearer_format = "hk_<prefix>_<secret>",
    checker = "check_admin"
)]
pub struct AdminKey(pub Principal);

/// With authentication disabled, requests without an `Authorization` header get a placeholder one,
/// so the security scheme lets them through to [`KeyVerifier::verify`], which grants everything.
pub async fn fill_when_disabled<E: Endpoint>(
    next: E,
    mut req: Request,
    enabled: bool,
) -> poem::Result<E::Output> {
    if !enabled
        && !req
            .headers()
            .contains_key(poem::http::header::AUTHORIZATION)
    {
        req.headers_mut().insert(
            poem::http::header::AUTHORIZATION,
            poem::http::HeaderValue::from_static("Bearer auth-disabled"),
        );
    }
    next.call(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_cache_drops_unknown_prefixes_before_known_keys() {
        let ttl = Duration::from_secs(10);
        let entry = |known: bool| CacheEntry {
            key: known.then(|| StoredKey {
                id: Uuid::nil(),
                name: "ci".into(),
                secret_hash: String::new(),
                scopes: vec![Scope::Send],
                provider: None,
            }),
            fetched: Instant::now(),
            use_recorded: false,
        };
        let mut cache = HashMap::new();
        cache.insert("known".to_string(), entry(true));
        for n in 0..3 {
            cache.insert(format!("made-up-{n}"), entry(false));
        }
        make_room(&mut cache, 4, ttl);
        assert_eq!(cache.keys().collect::<Vec<_>>(), ["known"]);
        make_room(&mut cache, 4, ttl);
        assert_eq!(cache.len(), 1, "room already");
        cache.insert("other".to_string(), entry(true));
        make_room(&mut cache, 2, ttl);
        assert!(cache.is_empty(), "all known and full: cleared");
    }

    #[test]
    fn scopes_parse_and_admin_grants_everything() {
        assert_eq!(
            parse_scopes("read, send,read").unwrap(),
            vec![Scope::Send, Scope::Read]
        );
        assert!(parse_scopes("").is_err());
        assert!(parse_scopes("send,root").unwrap_err().contains("root"));
        assert_eq!(format_scopes(&[Scope::Send, Scope::Admin]), "send,admin");
        assert!(grants(&[Scope::Read], Scope::Read));
        assert!(!grants(&[Scope::Read], Scope::Send));
        assert!(!grants(&[Scope::Send, Scope::Read], Scope::Admin));
        assert!(!grants(&[Scope::Send], Scope::Callbacks));
        for needed in Scope::ALL {
            assert!(grants(&[Scope::Admin], needed));
        }
    }

    #[test]
    fn generated_keys_split_and_hash() {
        let key = generate_key().unwrap();
        let (prefix, secret) = split_token(&key.token).expect("has the key shape");
        assert_eq!(prefix, key.prefix);
        assert_eq!(hash_secret(secret), key.secret_hash);
        assert!(!key.secret_hash.contains(secret));
        let other = generate_key().unwrap();
        assert_ne!(key.token, other.token);
        assert_ne!(key.prefix, other.prefix);
    }

    #[test]
    fn malformed_tokens_are_refused_before_any_lookup() {
        let good = format!("hk_{}_{}", "a".repeat(16), "b".repeat(64));
        assert!(split_token(&good).is_some());
        for bad in [
            "",
            "hk_",
            "Bearer x",
            &format!("hk_{}_{}", "a".repeat(15), "b".repeat(64)),
            &format!("hk_{}_{}", "A".repeat(16), "b".repeat(64)),
            &format!("hk_{}{}", "a".repeat(16), "b".repeat(64)),
            &format!("xx_{}_{}", "a".repeat(16), "b".repeat(64)),
            &format!("hk_{}_{}_", "a".repeat(16), "b".repeat(64)),
        ] {
            assert!(split_token(bad).is_none(), "{bad:?}");
        }
    }

    async fn verifier(settings: AuthSettings) -> KeyVerifier {
        use herald_migration::MigratorTrait;
        let db = herald_entities::connect("sqlite::memory:", 1)
            .await
            .expect("in-memory database");
        herald_migration::Migrator::up(&db, None)
            .await
            .expect("migrations");
        KeyVerifier::new(db, settings)
    }

    async fn store(verifier: &KeyVerifier, scopes: &str) -> String {
        let key = generate_key().expect("key");
        api_keys::insert(
            &verifier.db,
            api_keys::NewApiKey {
                name: "test".into(),
                prefix: key.prefix,
                secret_hash: key.secret_hash,
                scopes: scopes.into(),
                provider: None,
            },
        )
        .await
        .expect("stored");
        key.token
    }

    #[tokio::test]
    async fn verification_checks_secret_scope_and_revocation() {
        let settings = AuthSettings {
            cache_ttl: Duration::ZERO,
            ..AuthSettings::default()
        };
        let verifier = verifier(settings).await;
        let token = store(&verifier, "read").await;
        let principal = verifier
            .authorize(&token, Scope::Read)
            .await
            .expect("valid");
        assert_eq!(principal.scopes, vec![Scope::Read]);
        assert!(matches!(
            verifier.authorize(&token, Scope::Send).await,
            Err(ApiError::Forbidden(_))
        ));
        let mut forged = token.clone();
        let last = if forged.ends_with('0') { "1" } else { "0" };
        forged.replace_range(forged.len() - 1.., last);
        assert!(matches!(
            verifier.verify(&forged).await,
            Err(ApiError::Unauthorized(_))
        ));
        let (prefix, _) = split_token(&token).expect("shape");
        assert!(
            api_keys::revoke(&verifier.db, prefix)
                .await
                .expect("revoke")
        );
        assert!(matches!(
            verifier.verify(&token).await,
            Err(ApiError::Unauthorized(_))
        ));
    }

    #[tokio::test]
    async fn the_cache_answers_without_the_database_until_it_expires() {
        let verifier = verifier(AuthSettings {
            cache_ttl: Duration::from_secs(3600),
            cache_capacity: 2,
            ..AuthSettings::default()
        })
        .await;
        let token = store(&verifier, "send,read").await;
        verifier.verify(&token).await.expect("valid");
        let (prefix, _) = split_token(&token).expect("shape");
        api_keys::revoke(&verifier.db, prefix)
            .await
            .expect("revoke");
        verifier
            .verify(&token)
            .await
            .expect("still cached: no database round trip");
        // Unknown keys fill the bounded cache but do not push the known key out.
        for _ in 0..3 {
            let unknown = generate_key().expect("key").token;
            assert!(verifier.verify(&unknown).await.is_err());
        }
        assert!(verifier.cache.lock().expect("lock").len() <= 2);
        verifier
            .verify(&token)
            .await
            .expect("still cached after a flood of unknown keys");
        // Known keys beyond the capacity do; then the revocation shows.
        for _ in 0..2 {
            let other = store(&verifier, "read").await;
            verifier.verify(&other).await.expect("valid");
        }
        assert!(verifier.cache.lock().expect("lock").len() <= 2);
        assert!(matches!(
            verifier.verify(&token).await,
            Err(ApiError::Unauthorized(_))
        ));
    }

    #[tokio::test]
    async fn disabled_auth_grants_everything() {
        let verifier = verifier(AuthSettings {
            enabled: false,
            ..AuthSettings::default()
        })
        .await;
        let principal = verifier
            .authorize("auth-disabled", Scope::Admin)
            .await
            .expect("granted");
        assert_eq!(principal.scopes, vec![Scope::Admin]);
    }

    #[test]
    fn constant_time_comparison_is_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}

#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn token_and_scope_parsing_never_panic(s in any::<String>()) {
            if let Some((prefix, secret)) = split_token(&s) {
                prop_assert_eq!(format!("{TOKEN_START}{prefix}_{secret}"), s.clone());
            }
            if let Ok(scopes) = parse_scopes(&s) {
                prop_assert!(!scopes.is_empty());
                prop_assert_eq!(parse_scopes(&format_scopes(&scopes)), Ok(scopes));
            }
        }
    }
}
