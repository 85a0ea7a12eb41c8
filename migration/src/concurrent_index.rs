//! Index changes that keep a live table readable and writable: on PostgreSQL each index is built
//! and dropped `CONCURRENTLY` (outside a transaction); SQLite has no such option and locks the
//! table for the moment the statement takes.

use sea_orm_migration::prelude::*;

/// Drops what an interrupted run left of `names` on PostgreSQL: a `CREATE INDEX CONCURRENTLY`
/// that did not finish leaves its index marked invalid, which `IF NOT EXISTS` would keep, and the
/// lookup it serves would have no usable index once the index it replaces is dropped.
pub(crate) async fn drop_invalid(
    manager: &SchemaManager<'_>,
    table: impl IntoTableRef + Clone,
    names: &[&str],
) -> Result<(), DbErr> {
    let db = manager.get_connection();
    if db.get_database_backend() != sea_orm::DbBackend::Postgres || names.is_empty() {
        return Ok(());
    }
    let quoted: Vec<String> = names.iter().map(|name| format!("'{name}'")).collect();
    let invalid = db
        .query_all_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            format!(
                "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
                 WHERE NOT i.indisvalid AND c.relname IN ({})",
                quoted.join(", ")
            ),
        ))
        .await?;
    for row in invalid {
        let name: String = row.try_get("", "relname")?;
        manager.drop_index(drop_index(&name, table.clone())).await?;
    }
    Ok(())
}

/// Builds `index` (named, on its table) if it does not exist, concurrently on PostgreSQL, after
/// dropping what an interrupted run left of it; the migration must run outside a transaction.
pub(crate) async fn create(
    manager: &SchemaManager<'_>,
    table: impl IntoTableRef + Clone,
    name: &str,
    mut index: IndexCreateStatement,
) -> Result<(), DbErr> {
    drop_invalid(manager, table.clone(), &[name]).await?;
    manager
        .create_index(
            index
                .name(name)
                .table(table)
                .if_not_exists()
                .concurrently()
                .to_owned(),
        )
        .await
}

/// Like [`create`], for an index sea-query cannot write for both databases (on an expression,
/// or of another type): `definition` follows `ON table`, e.g. `(lower(email))` or
/// `USING gin (...)`.
pub(crate) async fn create_sql(
    manager: &SchemaManager<'_>,
    table: impl IntoTableRef + Iden + Clone,
    name: &str,
    definition: &str,
) -> Result<(), DbErr> {
    drop_invalid(manager, table.clone(), &[name]).await?;
    let concurrently = match manager.get_database_backend() {
        sea_orm::DbBackend::Postgres => "CONCURRENTLY ",
        _ => "",
    };
    let table = table.to_string();
    manager
        .get_connection()
        .execute_unprepared(&format!(
            r#"CREATE INDEX {concurrently}IF NOT EXISTS "{name}" ON "{table}" {definition}"#
        ))
        .await
        .map(|_| ())
}

/// `DROP INDEX IF EXISTS name`, concurrently on PostgreSQL.
pub(crate) fn drop_index(name: &str, table: impl IntoTableRef) -> IndexDropStatement {
    Index::drop()
        .name(name)
        .table(table)
        .if_exists()
        .concurrently()
        .to_owned()
}
