//! Schema migrations from `migrations/`, embedded at build time and applied
//! by refinery (at start-up and by `credbroker migrate`).

use deadpool_postgres::Pool;

mod embedded {
    // The schema lives at the repository's top level (`migrations/`).
    refinery::embed_migrations!("../../migrations");
}

/// Applies pending migrations; returns how many ran.
///
/// # Errors
/// When the database cannot be reached or a migration fails.
pub async fn run(pool: &Pool) -> anyhow::Result<usize> {
    let mut client = pool.get().await?;
    let report = embedded::migrations::runner()
        .set_migration_table_name("credbroker_schema_history")
        .run_async(&mut **client)
        .await?;
    Ok(report.applied_migrations().len())
}
