//! PostgreSQL as the metadata store, one module per table family:
//! [`credentials`] (rows and the `MetadataStore` port), [`events`] (the
//! event log), [`audit`] (the audit trail's pages), [`fleet`] (the
//! background jobs' cross-tenant queries), [`webhooks`] (endpoints and the
//! outbox); here the pool and the transaction helper every one of them uses.
//!
//! Every transaction first switches to a non-superuser role
//! (`credbroker_tenant` with the tenant in `credbroker.tenant_id`, or
//! `credbroker_system` for cross-tenant jobs) so RLS holds even when the
//! login role owns the tables.

#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod acks;
mod audit;
mod credentials;
mod events;
mod fleet;
mod key_rotations;
pub mod migrate;
mod webhooks;

pub use audit::{LostOutcome, Pruned};
pub use events::row_to_event;

use std::str::FromStr;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Transaction};
use secrecy::ExposeSecret;
use tokio_postgres::{NoTls, error::SqlState};
use tracing::Instrument as _;

use credbroker_core::broker::{error::MetadataStoreError, types::TenantId};

/// Parses `postgres.url` (shared by the pool and the event listener, which
/// keeps its own connection).
///
/// # Errors
/// A message naming `postgres.url` when the connection string is malformed.
pub fn connect_config(cfg: &PostgresConfig) -> Result<tokio_postgres::Config, String> {
    tokio_postgres::Config::from_str(cfg.url.expose_secret())
        .map_err(|e| format!("postgres.url: not a valid connection string ({e})"))
}

/// Builds a connection pool of `size` connections.
///
/// # Errors
/// When the pool cannot be built.
pub fn pool(pg: tokio_postgres::Config, size: usize) -> Result<Pool, String> {
    let mgr = Manager::from_config(
        pg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(mgr)
        .max_size(size)
        .wait_timeout(Some(std::time::Duration::from_secs(5)))
        .create_timeout(Some(std::time::Duration::from_secs(5)))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| format!("postgres: cannot build pool ({e})"))
}

/// The PostgreSQL metadata store.
#[derive(Clone)]
pub struct PgMetadataStore {
    pool: Pool,
    partitions: audit::KnownDays,
    shipped: audit::ShippedThrough,
    /// Shared by clones: one queue per pool.
    acks: std::sync::Arc<acks::Acks>,
}

/// Whose rows a transaction may see.
#[derive(Clone, Copy)]
enum Scope {
    Tenant(TenantId),
    System,
    /// The login role itself, which owns the schema: DDL (the audit log's
    /// partitions) and retention only.
    Owner,
}

impl PgMetadataStore {
    /// Wraps a pool.
    pub fn new(pool: Pool) -> Self {
        Self {
            pool,
            partitions: audit::KnownDays::default(),
            shipped: audit::ShippedThrough::default(),
            acks: std::sync::Arc::default(),
        }
    }

    /// Runs `f` in one transaction under `scope`'s role and commits, in a
    /// [`pg_span`].
    async fn in_tx<T, F>(
        &self,
        op: &'static str,
        scope: Scope,
        f: F,
    ) -> Result<T, MetadataStoreError>
    where
        F: for<'a> FnOnce(
            &'a Transaction<'a>,
        ) -> futures::future::BoxFuture<'a, Result<T, MetadataStoreError>>,
    {
        let span = pg_span(op);
        async move {
        let mut client = self
            .pool
            .get()
            .await
            .map_err(|e| MetadataStoreError::Unavailable(e.to_string()))?;
        let tx = client.transaction().await.map_err(pg_err)?;
        // Prepared once per connection: every transaction starts with one
        // of these (parsing it each time was PostgreSQL's work, not ours).
        match scope {
            Scope::Tenant(t) => {
                let set = tx
                    .prepare_cached(
                        "SELECT set_config('role', 'credbroker_tenant', true), set_config('credbroker.tenant_id', $1, true)",
                    )
                    .await
                    .map_err(pg_err)?;
                tx.execute(&set, &[&t.to_string()]).await
            }
            Scope::System => {
                let set = tx
                    .prepare_cached("SELECT set_config('role', 'credbroker_system', true)")
                    .await
                    .map_err(pg_err)?;
                tx.execute(&set, &[]).await
            }
            Scope::Owner => Ok(0),
        }
        .map_err(pg_err)?;
        let out = f(&tx).await?;
        tx.commit().await.map_err(pg_err)?;
        Ok(out)
        }
        .instrument(span)
        .await
    }
}

fn pg_err(e: tokio_postgres::Error) -> MetadataStoreError {
    match e.code() {
        Some(c) if *c == SqlState::UNIQUE_VIOLATION => MetadataStoreError::AlreadyExists,
        Some(c)
            if *c == SqlState::T_R_SERIALIZATION_FAILURE
                || *c == SqlState::T_R_DEADLOCK_DETECTED =>
        {
            MetadataStoreError::Conflict
        }
        Some(c) if c.code().starts_with("08") || c.code().starts_with("57") => {
            MetadataStoreError::Unavailable(e.to_string())
        }
        Some(_) => MetadataStoreError::Other(describe_db_error(&e)),
        None if e.is_closed() => MetadataStoreError::Unavailable(e.to_string()),
        None => MetadataStoreError::Unavailable(e.to_string()),
    }
}

/// What failed, for the log: SQLSTATE and the names PostgreSQL reports
/// (table, column, constraint, type), never its message or detail, which
/// can quote the values involved.
fn describe_db_error(e: &tokio_postgres::Error) -> String {
    let Some(db) = e.as_db_error() else {
        return "database error".to_owned();
    };
    let mut out = format!("database error SQLSTATE {}", db.code().code());
    for (what, v) in [
        ("table", db.table()),
        ("column", db.column()),
        ("constraint", db.constraint()),
        ("type", db.datatype()),
        ("routine", db.routine()),
    ] {
        if let Some(v) = v {
            out.push_str(&format!(" {what}={v}"));
        }
    }
    out
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// PostgreSQL settings.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// Connection string (`postgres://user:pass@host/db` or key=value); may
    /// hold a password, so it is a secret.
    pub url: secrecy::SecretString,
    /// Pool size.
    #[serde(default = "default_pool")]
    pub pool_size: usize,
    /// Apply pending migrations at start-up.
    #[serde(default = "default_true")]
    pub migrate_on_start: bool,
}

fn default_pool() -> usize {
    16
}
fn default_true() -> bool {
    true
}

impl PostgresConfig {
    /// Adds what is wrong with this section to `errs` (each naming its key).
    pub fn check(&self, errs: &mut Vec<String>) {
        let mut bad = |key: &str, why: String| errs.push(format!("{key}: {why}"));
        if self.pool_size == 0 {
            bad("postgres.pool_size", "must be at least 1".into());
        }
    }
}

/// The client span of one PostgreSQL operation (every round trip the
/// broker makes is in one: the transactions, and the read path's
/// one-statement miss).
pub(crate) fn pg_span(op: &'static str) -> tracing::Span {
    tracing::info_span!(
        "postgres",
        otel.name = op,
        otel.kind = "client",
        db.system = "postgresql",
        db.operation = op,
    )
}
