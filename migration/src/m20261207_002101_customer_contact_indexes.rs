use sea_orm_migration::prelude::*;

use crate::concurrent_index;

/// A send that names only contacts follows the opt-outs and quiet hours of the customers holding
/// them, found by those contacts at every delivery (`repo::customers::with_wishes_holding` in
/// `herald-entities`): each contact column gets an index, so that the lookup reads the customers
/// holding them, not the whole table.
///
/// - `idx_customers_email_lower` on `lower(email)`: addresses are compared regardless of case.
/// - `idx_customers_phone` and `idx_customers_telegram_chat_id`.
/// - `idx_customers_push_tokens` (PostgreSQL only): a GIN index of the token list as `jsonb`,
///   for `@>`. SQLite cannot index the values inside a JSON list; there the lookup walks the
///   customers with stored wishes only.
///
/// Built concurrently on PostgreSQL (outside a transaction), after dropping what an interrupted
/// run left invalid, as in `m20261207_001501`. `tests/tests/query_plans.rs` checks that both
/// databases plan the lookup on them.
#[derive(DeriveMigrationName)]
pub struct Migration;

/// The index of email addresses, lowercased.
const EMAIL_LOWER: &str = "idx_customers_email_lower";
/// The index of phone numbers.
const PHONE: &str = "idx_customers_phone";
/// The index of Telegram chat ids.
const TELEGRAM: &str = "idx_customers_telegram_chat_id";
/// The GIN index of push tokens (PostgreSQL).
const PUSH_TOKENS: &str = "idx_customers_push_tokens";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        use Customers::*;
        concurrent_index::create_sql(manager, Table, EMAIL_LOWER, "(lower(email))").await?;
        let phone = Index::create().col(Phone).to_owned();
        concurrent_index::create(manager, Table, PHONE, phone).await?;
        let telegram = Index::create().col(TelegramChatId).to_owned();
        concurrent_index::create(manager, Table, TELEGRAM, telegram).await?;
        if manager.get_database_backend() == sea_orm::DbBackend::Postgres {
            let tokens = "USING gin ((push_tokens::jsonb) jsonb_path_ops)";
            concurrent_index::create_sql(manager, Table, PUSH_TOKENS, tokens).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for name in [PUSH_TOKENS, TELEGRAM, PHONE, EMAIL_LOWER] {
            manager
                .drop_index(concurrent_index::drop_index(name, Customers::Table))
                .await?;
        }
        Ok(())
    }

    /// `CREATE INDEX CONCURRENTLY` cannot run inside a transaction.
    fn use_transaction(&self) -> Option<bool> {
        Some(false)
    }
}

#[derive(DeriveIden, Clone, Copy)]
enum Customers {
    Table,
    Phone,
    TelegramChatId,
}
