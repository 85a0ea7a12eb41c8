use sea_orm::DbBackend;
use sea_orm_migration::prelude::*;

use crate::concurrent_index;

/// The lookup of the customers holding a send's contacts (`repo::customers::with_wishes_holding`
/// in `herald-entities`) finds each kind of contact on an index, on both databases, and compares
/// email addresses alike on both:
///
/// - `idx_customers_webhook_url`: webhook URLs are matched too (exactly, as written); a hash
///   index on PostgreSQL, which takes a URL of any length.
/// - `idx_customers_email_folded` (PostgreSQL only) on `lower(email COLLATE "C")`, replacing
///   `idx_customers_email_lower` there: under the `C` collation `lower` folds ASCII letters only,
///   as SQLite's `lower` does (where `idx_customers_email_lower` stays), so an address with
///   non-ASCII letters matches the same customers on both.
/// - `customer_push_tokens` (SQLite only): the push tokens of `customers`, one a row, indexed by
///   token (`idx_customer_push_tokens_token`) and kept by triggers on every insert, update and
///   delete of a customer, since SQLite cannot index the values inside a JSON list (the lookup
///   walked every customer with stored wishes). PostgreSQL has the GIN index of
///   `m20261207_002101`.
///
/// Indexes are built concurrently on PostgreSQL (outside a transaction), as in
/// `m20261207_002101`. `tests/tests/query_plans.rs` checks that both databases plan the lookup on
/// them.
#[derive(DeriveMigrationName)]
pub struct Migration;

/// The index of webhook URLs.
const WEBHOOK_URL: &str = "idx_customers_webhook_url";
/// The index of email addresses with their ASCII letters lowercased (PostgreSQL).
const EMAIL_FOLDED: &str = "idx_customers_email_folded";
/// The index of `m20261207_002101` it replaces on PostgreSQL.
const EMAIL_LOWER: &str = "idx_customers_email_lower";
/// The index of push tokens (SQLite).
const TOKEN: &str = "idx_customer_push_tokens_token";

/// Inserts the push tokens of `row` (`NEW` in a trigger, `"customers"` to fill the table from
/// `from`) into `customer_push_tokens`, one a row: the text values of its JSON list, none when the
/// column holds no JSON list.
fn insert_tokens_of(row: &str, from: &str) -> String {
    let tokens = format!(r#"{row}."push_tokens""#);
    format!(
        r#"INSERT INTO "customer_push_tokens" ("customer_id", "token")
        SELECT {row}."id", "value" FROM {from}json_each(CASE WHEN json_valid({tokens})
            THEN CASE WHEN json_type({tokens}) = 'array' THEN {tokens} ELSE '[]' END
            ELSE '[]' END)
        WHERE "type" = 'text';"#
    )
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        match manager.get_database_backend() {
            DbBackend::Postgres => {
                // A hash index: equality is all the lookup asks, and it takes a URL of any
                // length (a btree refuses a key over about 2,700 bytes, and one such stored URL
                // would leave the concurrent build an invalid index).
                let webhook = r#"USING hash ("webhook_url")"#;
                concurrent_index::create_sql(manager, Customers::Table, WEBHOOK_URL, webhook)
                    .await?;
                let folded = r#"(lower(email COLLATE "C"))"#;
                concurrent_index::create_sql(manager, Customers::Table, EMAIL_FOLDED, folded)
                    .await?;
                manager
                    .drop_index(concurrent_index::drop_index(EMAIL_LOWER, Customers::Table))
                    .await?;
            }
            _ => {
                let webhook = Index::create().col(Customers::WebhookUrl).to_owned();
                concurrent_index::create(manager, Customers::Table, WEBHOOK_URL, webhook).await?;
                push_token_rows(manager).await?
            }
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        match manager.get_database_backend() {
            DbBackend::Postgres => {
                concurrent_index::create_sql(
                    manager,
                    Customers::Table,
                    EMAIL_LOWER,
                    "(lower(email))",
                )
                .await?;
                manager
                    .drop_index(concurrent_index::drop_index(EMAIL_FOLDED, Customers::Table))
                    .await?;
            }
            _ => {
                let db = manager.get_connection();
                for trigger in ["inserted", "updated", "deleted"] {
                    db.execute_unprepared(&format!(
                        r#"DROP TRIGGER IF EXISTS "customer_push_tokens_{trigger}""#
                    ))
                    .await?;
                }
                db.execute_unprepared(r#"DROP TABLE IF EXISTS "customer_push_tokens""#)
                    .await?;
            }
        }
        manager
            .drop_index(concurrent_index::drop_index(WEBHOOK_URL, Customers::Table))
            .await
    }

    /// `CREATE INDEX CONCURRENTLY` cannot run inside a transaction.
    fn use_transaction(&self) -> Option<bool> {
        Some(false)
    }
}

/// Creates `customer_push_tokens` on SQLite with the triggers that keep it, then fills it from
/// the stored customers (anew, if an interrupted run filled some: this migration runs outside a
/// transaction).
async fn push_token_rows(manager: &SchemaManager<'_>) -> Result<(), DbErr> {
    let new_tokens = insert_tokens_of("NEW", "");
    let statements = [
        r#"CREATE TABLE IF NOT EXISTS "customer_push_tokens" (
            "customer_id" NOT NULL, "token" TEXT NOT NULL)"#
            .to_string(),
        format!(r#"CREATE INDEX IF NOT EXISTS "{TOKEN}" ON "customer_push_tokens" ("token")"#),
        r#"CREATE INDEX IF NOT EXISTS "idx_customer_push_tokens_customer"
            ON "customer_push_tokens" ("customer_id")"#
            .to_string(),
        format!(
            r#"CREATE TRIGGER IF NOT EXISTS "customer_push_tokens_inserted"
            AFTER INSERT ON "customers" BEGIN {new_tokens} END"#
        ),
        format!(
            r#"CREATE TRIGGER IF NOT EXISTS "customer_push_tokens_updated"
            AFTER UPDATE OF "id", "push_tokens" ON "customers" BEGIN
            DELETE FROM "customer_push_tokens" WHERE "customer_id" = OLD."id"; {new_tokens} END"#
        ),
        r#"CREATE TRIGGER IF NOT EXISTS "customer_push_tokens_deleted"
            AFTER DELETE ON "customers" BEGIN
            DELETE FROM "customer_push_tokens" WHERE "customer_id" = OLD."id"; END"#
            .to_string(),
        r#"DELETE FROM "customer_push_tokens""#.to_string(),
        insert_tokens_of(r#""customers""#, r#""customers", "#),
    ];
    let db = manager.get_connection();
    for statement in &statements {
        db.execute_unprepared(statement).await?;
    }
    Ok(())
}

#[derive(DeriveIden, Clone, Copy)]
enum Customers {
    Table,
    WebhookUrl,
}
