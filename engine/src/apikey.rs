//! `herald apikey create|list|revoke`: managing API keys. Only a hash of each key's secret is
//! stored; the key itself is printed once, at creation.

use anyhow::Context;
use clap::Subcommand;
use herald_api::auth::{self, Scope};
use herald_entities::{api_key, repo::api_keys};
use sea_orm::ConnectionTrait;

/// `herald apikey ...`.
#[derive(Debug, Subcommand)]
pub enum ApiKeyCommand {
    /// Create a key and print it (once: only its hash is kept).
    Create {
        /// Who or what uses the key.
        #[arg(long)]
        name: String,
        /// Comma-separated scopes: send, read, callbacks, admin.
        #[arg(long, default_value = "send,read")]
        scopes: String,
        /// Bind a `callbacks` key to one provider (smtp, outbox, telegram, twilio, fcm, webhook):
        /// it then posts receipts for that provider only. Needs `--scopes callbacks`.
        #[arg(long)]
        provider: Option<String>,
    },
    /// List keys (never their secrets).
    List,
    /// Revoke a key by id or prefix.
    Revoke {
        /// The key's id or prefix (as `apikey list` shows).
        key: String,
    },
}

/// A key just created.
pub struct CreatedKey {
    /// The full key, `hk_<prefix>_<secret>`; the only time it is available.
    pub token: String,
    /// Its stored row (hash only).
    pub row: api_key::Model,
}

// The providers' names: what a `callbacks` key can be bound to.
use herald_nats::providers::ALL as PROVIDERS;

/// Creates a key named `name` with the comma-separated `scopes`, for every provider.
pub async fn create(
    db: &impl ConnectionTrait,
    name: &str,
    scopes: &str,
) -> anyhow::Result<CreatedKey> {
    create_with_provider(db, name, scopes, None).await
}

/// Creates a key as [`create`] does; with `provider`, a `callbacks` key that posts receipts for
/// that provider only (`scopes` must then be `callbacks` alone).
pub async fn create_with_provider(
    db: &impl ConnectionTrait,
    name: &str,
    scopes: &str,
    provider: Option<&str>,
) -> anyhow::Result<CreatedKey> {
    let name = name.trim();
    anyhow::ensure!(
        !name.is_empty() && name.len() <= 200,
        "--name must be 1 to 200 characters"
    );
    let scopes: Vec<Scope> = auth::parse_scopes(scopes).map_err(anyhow::Error::msg)?;
    let provider = provider.map(|p| bound_provider(p, &scopes)).transpose()?;
    let generated = auth::generate_key()?;
    let row = api_keys::insert(
        db,
        api_keys::NewApiKey {
            name: name.to_string(),
            prefix: generated.prefix,
            secret_hash: generated.secret_hash,
            scopes: auth::format_scopes(&scopes),
            provider,
        },
    )
    .await
    .context("cannot store the key")?;
    Ok(CreatedKey {
        token: generated.token,
        row,
    })
}

/// Checks a `--provider` binding: a known provider's name, on a key whose only scope is
/// `callbacks` (a binding limits receipts only, so on a key that can do more it would promise
/// more than it keeps).
fn bound_provider(provider: &str, scopes: &[Scope]) -> anyhow::Result<String> {
    let provider = provider.trim();
    anyhow::ensure!(
        PROVIDERS.contains(&provider),
        "unknown provider {provider:?}; known: {}",
        PROVIDERS.join(", ")
    );
    anyhow::ensure!(
        scopes == [Scope::Callbacks],
        "--provider binds a key that only posts receipts: give --scopes callbacks"
    );
    Ok(provider.to_string())
}

/// What `apikey list` shows of whose receipts a key posts: its provider, `any` for a key that
/// posts every provider's, `-` for one that posts none.
fn receipts_for(key: &api_key::Model) -> &str {
    match (&key.provider, auth::parse_scopes(&key.scopes)) {
        (Some(provider), _) => provider,
        (None, Ok(scopes)) if auth::grants(&scopes, Scope::Callbacks) => "any",
        (None, _) => "-",
    }
}

/// Revokes the key with this id or prefix; errors when no active key matches.
pub async fn revoke(db: &impl ConnectionTrait, key: &str) -> anyhow::Result<()> {
    let revoked = api_keys::revoke(db, key.trim())
        .await
        .context("cannot revoke the key")?;
    anyhow::ensure!(revoked, "no active key with id or prefix {key:?}");
    Ok(())
}

/// Runs an `apikey` subcommand, printing to stdout.
pub async fn run(db: &impl ConnectionTrait, command: ApiKeyCommand) -> anyhow::Result<()> {
    match command {
        ApiKeyCommand::Create {
            name,
            scopes,
            provider,
        } => {
            let created = create_with_provider(db, &name, &scopes, provider.as_deref()).await?;
            println!("{}", created.token);
            let bound = created
                .row
                .provider
                .as_deref()
                .map(|p| format!(" for provider {p} only"))
                .unwrap_or_default();
            eprintln!(
                "key {} ({}) created with scopes {}{bound}; store it now, it is not shown again",
                created.row.id, created.row.prefix, created.row.scopes
            );
        }
        ApiKeyCommand::List => {
            println!(
                "{:<36}  {:<16}  {:<24}  {:<8}  {:<8}  {:<20}  name",
                "id", "prefix", "scopes", "provider", "state", "last used"
            );
            for key in api_keys::list(db).await? {
                let state = if key.revoked_at.is_some() {
                    "revoked"
                } else {
                    "active"
                };
                let last_used = key
                    .last_used_at
                    .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                    .unwrap_or_else(|| "never".into());
                println!(
                    "{:<36}  {:<16}  {:<24}  {:<8}  {:<8}  {:<20}  {}",
                    key.id,
                    key.prefix,
                    key.scopes,
                    receipts_for(&key),
                    state,
                    last_used,
                    key.name
                );
            }
        }
        ApiKeyCommand::Revoke { key } => {
            revoke(db, &key).await?;
            println!("revoked {key}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_callbacks_key_is_bound_and_only_to_a_known_provider() {
        assert_eq!(
            bound_provider(" twilio ", &[Scope::Callbacks]).expect("bound"),
            "twilio"
        );
        let unknown = bound_provider("pigeon", &[Scope::Callbacks]).unwrap_err();
        assert!(unknown.to_string().contains("twilio"), "{unknown}");
        for scopes in [
            &[Scope::Admin][..],
            &[Scope::Send, Scope::Callbacks],
            &[Scope::Read],
        ] {
            let err = bound_provider("smtp", scopes).unwrap_err();
            assert!(err.to_string().contains("--scopes callbacks"), "{err}");
        }
    }

    #[test]
    fn the_list_shows_whose_receipts_a_key_posts() {
        let key = |scopes: &str, provider: Option<&str>| api_key::Model {
            id: uuid::Uuid::nil(),
            name: "k".into(),
            prefix: "p".into(),
            secret_hash: String::new(),
            scopes: scopes.into(),
            created_at: chrono::Utc::now(),
            revoked_at: None,
            last_used_at: None,
            provider: provider.map(str::to_string),
        };
        assert_eq!(receipts_for(&key("callbacks", Some("smtp"))), "smtp");
        assert_eq!(receipts_for(&key("callbacks", None)), "any");
        assert_eq!(receipts_for(&key("admin", None)), "any");
        assert_eq!(receipts_for(&key("send,read", None)), "-");
    }
}
