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

/// Creates a key named `name` with the comma-separated `scopes`.
pub async fn create(
    db: &impl ConnectionTrait,
    name: &str,
    scopes: &str,
) -> anyhow::Result<CreatedKey> {
    let name = name.trim();
    anyhow::ensure!(
        !name.is_empty() && name.len() <= 200,
        "--name must be 1 to 200 characters"
    );
    let scopes: Vec<Scope> = auth::parse_scopes(scopes).map_err(anyhow::Error::msg)?;
    let generated = auth::generate_key()?;
    let row = api_keys::insert(
        db,
        api_keys::NewApiKey {
            name: name.to_string(),
            prefix: generated.prefix,
            secret_hash: generated.secret_hash,
            scopes: auth::format_scopes(&scopes),
        },
    )
    .await
    .context("cannot store the key")?;
    Ok(CreatedKey {
        token: generated.token,
        row,
    })
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
        ApiKeyCommand::Create { name, scopes } => {
            let created = create(db, &name, &scopes).await?;
            println!("{}", created.token);
            eprintln!(
                "key {} ({}) created with scopes {}; store it now, it is not shown again",
                created.row.id, created.row.prefix, created.row.scopes
            );
        }
        ApiKeyCommand::List => {
            println!(
                "{:<36}  {:<16}  {:<24}  {:<8}  {:<20}  name",
                "id", "prefix", "scopes", "state", "last used"
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
                    "{:<36}  {:<16}  {:<24}  {:<8}  {:<20}  {}",
                    key.id, key.prefix, key.scopes, state, last_used, key.name
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
