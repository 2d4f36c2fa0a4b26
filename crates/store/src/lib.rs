//! PostgreSQL as the [`MetadataStore`]: credential rows and the event log,
//! with tenant row-level security.
//!
//! Every transaction first switches to a non-superuser role
//! (`credbroker_tenant` with the tenant in `credbroker.tenant_id`, or
//! `credbroker_system` for cross-tenant jobs) so RLS holds even when the
//! login role owns the tables.

#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod audit;
pub mod migrate;

pub use audit::{LostOutcome, Pruned};

use std::str::FromStr;

use async_trait::async_trait;
use deadpool_postgres::{
    GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod, Transaction,
};
use secrecy::ExposeSecret;
use time::OffsetDateTime;
use tokio_postgres::{NoTls, Row, error::SqlState};
use tracing::Instrument as _;

use credbroker_core::broker::error::MetadataStoreError;

use credbroker_core::broker::ports::{
    AuditRow, ChangedBy, FleetStore, HealthUpdate, MetadataStore, NewCredential, OutboxMessage,
    RotationCommit, WebhookEndpoint, WebhookStore,
};

use credbroker_core::broker::types::{
    Adoption, CredentialEvent, CredentialRecord, CredentialStatus, EventKind, ExchangeId,
    HealthStatus, Permissions, TenantId,
};

const RECORD_COLS: &str = "tenant_id, exchange, vault_path, current_version, previous_version, \
    previous_valid_until, status, permissions, api_key_hint, last_validated_at, health_check_status, \
    health_check_detail, health_checked_at, created_at, updated_at, event_seq";
/// Taken by every transaction right before it appends an event, and held to
/// commit: events become visible in `seq` order, so a reader that has seen
/// seq N has seen every event below N.
const EVENT_ORDER_LOCK: i64 = 0x6372_6564_6272_6b72; // "credbrkr"
const EVENT_COLS: &str =
    "seq, tenant_id, exchange, kind, version, previous_version, previous_valid_until, occurred_at";

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
        }
    }

    /// Runs `f` in one transaction under `scope`'s role and commits.
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
        let span = tracing::info_span!(
            "postgres",
            otel.name = op,
            otel.kind = "client",
            db.system = "postgresql",
            db.operation = op,
        );
        async move {
        let mut client = self
            .pool
            .get()
            .await
            .map_err(|e| MetadataStoreError::Unavailable(e.to_string()))?;
        let tx = client.transaction().await.map_err(pg_err)?;
        match scope {
            Scope::Tenant(t) => {
                tx.execute(
                    "SELECT set_config('role', 'credbroker_tenant', true), set_config('credbroker.tenant_id', $1, true)",
                    &[&t.to_string()],
                )
                .await
            }
            Scope::System => tx.execute("SELECT set_config('role', 'credbroker_system', true)", &[]).await,
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

fn row_to_record(row: &Row) -> Result<CredentialRecord, MetadataStoreError> {
    let exchange: String = row.get("exchange");
    let status: String = row.get("status");
    let permissions: Option<serde_json::Value> = row.get("permissions");
    Ok(CredentialRecord {
        tenant: TenantId::new(row.get("tenant_id")),
        exchange: ExchangeId::from_str(&exchange).map_err(MetadataStoreError::Other)?,
        vault_path: row.get("vault_path"),
        current_version: to_u64(row.get("current_version")),
        previous_version: row.get::<_, Option<i64>>("previous_version").map(to_u64),
        previous_valid_until: row.get("previous_valid_until"),
        status: CredentialStatus::parse(&status)
            .ok_or_else(|| MetadataStoreError::Other(format!("bad status {status}")))?,
        permissions: permissions
            .map(serde_json::from_value::<Permissions>)
            .transpose()
            .map_err(|e| MetadataStoreError::Other(format!("bad permissions json: {e}")))?,
        api_key_hint: row.get("api_key_hint"),
        last_validated_at: row.get("last_validated_at"),
        health: HealthStatus::parse(row.get::<_, &str>("health_check_status")),
        health_detail: row.get("health_check_detail"),
        health_checked_at: row.get("health_checked_at"),
        created_at: row.get("created_at"),
        updated_at: row.get("updated_at"),
        event_seq: to_u64(row.get("event_seq")),
    })
}

/// Maps an event row.
///
/// # Errors
/// `Other` for a row with an unknown exchange or kind.
pub fn row_to_event(row: &Row) -> Result<CredentialEvent, MetadataStoreError> {
    let exchange: String = row.get("exchange");
    let kind: String = row.get("kind");
    Ok(CredentialEvent {
        seq: to_u64(row.get("seq")),
        tenant: TenantId::new(row.get("tenant_id")),
        exchange: ExchangeId::from_str(&exchange).map_err(MetadataStoreError::Other)?,
        kind: EventKind::parse(&kind)
            .ok_or_else(|| MetadataStoreError::Other(format!("bad event kind {kind}")))?,
        version: to_u64(row.get("version")),
        previous_version: row.get::<_, Option<i64>>("previous_version").map(to_u64),
        previous_valid_until: row.get("previous_valid_until"),
        occurred_at: row.get("occurred_at"),
    })
}

#[async_trait]
impl FleetStore for PgMetadataStore {
    async fn credential_counts(
        &self,
    ) -> Result<Vec<(TenantId, ExchangeId, CredentialStatus, u64)>, MetadataStoreError> {
        self.in_tx("credential_counts", Scope::System, |tx| {
            Box::pin(async move {
                let rows = tx
                    .query(
                        "SELECT tenant_id, exchange, status, count(*) AS n FROM tenant_credentials \
                         GROUP BY tenant_id, exchange, status ORDER BY tenant_id, exchange, status",
                        &[],
                    )
                    .await
                    .map_err(pg_err)?;
                rows.iter()
                    .map(|r| {
                        let exchange: String = r.get("exchange");
                        let status: String = r.get("status");
                        Ok((
                            TenantId::new(r.get("tenant_id")),
                            ExchangeId::from_str(&exchange).map_err(MetadataStoreError::Other)?,
                            CredentialStatus::parse(&status).ok_or_else(|| {
                                MetadataStoreError::Other(format!("unknown status {status:?}"))
                            })?,
                            to_u64(r.get("n")),
                        ))
                    })
                    .collect()
            })
        })
        .await
    }

    async fn due_for_check(
        &self,
        since: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<(TenantId, ExchangeId)>, MetadataStoreError> {
        self.in_tx("due_for_check", Scope::System, |tx| {
            Box::pin(async move {
                let rows = tx
                    .query(
                        "SELECT tenant_id, exchange FROM tenant_credentials \
                         WHERE status = 'active' AND (health_checked_at IS NULL OR health_checked_at < $1) \
                         ORDER BY health_checked_at NULLS FIRST, tenant_id, exchange LIMIT $2",
                        &[&since, &i64::from(limit)],
                    )
                    .await
                    .map_err(pg_err)?;
                rows.iter()
                    .map(|r| {
                        let exchange: String = r.get("exchange");
                        Ok((
                            TenantId::new(r.get("tenant_id")),
                            ExchangeId::from_str(&exchange).map_err(MetadataStoreError::Other)?,
                        ))
                    })
                    .collect()
            })
        })
        .await
    }

    async fn take_lease(
        &self,
        name: &str,
        holder: uuid::Uuid,
        now: OffsetDateTime,
        ttl: time::Duration,
    ) -> Result<bool, MetadataStoreError> {
        let name = name.to_owned();
        self.in_tx("take_lease", Scope::System, |tx| {
            Box::pin(async move {
                let until = now + ttl;
                let n = tx
                    .execute(
                        "INSERT INTO job_leases (name, holder, expires_at) VALUES ($1, $2, $3) \
                         ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at \
                         WHERE job_leases.holder = EXCLUDED.holder OR job_leases.expires_at < $4",
                        &[&name, &holder, &until, &now],
                    )
                    .await
                    .map_err(pg_err)?;
                Ok(n == 1)
            })
        })
        .await
    }
}

#[async_trait]
impl WebhookStore for PgMetadataStore {
    async fn set_webhook(
        &self,
        tenant: TenantId,
        endpoint: Option<WebhookEndpoint>,
    ) -> Result<(), MetadataStoreError> {
        self.in_tx("set_webhook", Scope::Tenant(tenant), |tx| {
            Box::pin(async move {
                match endpoint {
                    Some(e) => tx
                        .execute(
                            "INSERT INTO tenant_webhooks (tenant_id, host, secret_version, updated_at) VALUES ($1, $2, $3, now()) \
                             ON CONFLICT (tenant_id) DO UPDATE SET host = EXCLUDED.host, secret_version = EXCLUDED.secret_version, updated_at = now()",
                            &[&tenant.as_uuid(), &e.host, &to_i64(e.secret_version)],
                        )
                        .await,
                    None => tx
                        .execute("DELETE FROM tenant_webhooks WHERE tenant_id = $1", &[&tenant.as_uuid()])
                        .await,
                }
                .map_err(pg_err)?;
                Ok(())
            })
        })
        .await
    }

    async fn webhook(
        &self,
        tenant: TenantId,
    ) -> Result<Option<WebhookEndpoint>, MetadataStoreError> {
        self.in_tx("webhook", Scope::Tenant(tenant), |tx| {
            Box::pin(async move {
                let row = tx
                    .query_opt(
                        "SELECT host, secret_version FROM tenant_webhooks WHERE tenant_id = $1",
                        &[&tenant.as_uuid()],
                    )
                    .await
                    .map_err(pg_err)?;
                Ok(row.map(|r| WebhookEndpoint {
                    tenant,
                    host: r.get("host"),
                    secret_version: to_u64(r.get("secret_version")),
                }))
            })
        })
        .await
    }

    async fn claim_due(
        &self,
        now: OffsetDateTime,
        lease: time::Duration,
        limit: u32,
    ) -> Result<Vec<OutboxMessage>, MetadataStoreError> {
        self.in_tx("claim_due", Scope::System, |tx| {
            Box::pin(async move {
                // SKIP LOCKED: replicas claim disjoint messages; the lease
                // (next_attempt_at moved forward) keeps a claimed message
                // from being handed out again while it is being delivered.
                let rows = tx
                    .query(
                        "UPDATE webhook_outbox o SET next_attempt_at = $2 \
                         FROM (SELECT id FROM webhook_outbox WHERE delivered_at IS NULL AND next_attempt_at <= $1 \
                               ORDER BY next_attempt_at LIMIT $3 FOR UPDATE SKIP LOCKED) due \
                         WHERE o.id = due.id \
                         RETURNING o.id, o.tenant_id, o.event_type, o.payload, o.attempts, \
                           (SELECT host FROM tenant_webhooks w WHERE w.tenant_id = o.tenant_id) AS host, \
                           (SELECT secret_version FROM tenant_webhooks w WHERE w.tenant_id = o.tenant_id) AS secret_version",
                        &[&now, &(now + lease), &i64::from(limit)],
                    )
                    .await
                    .map_err(pg_err)?;
                Ok(rows
                    .iter()
                    .map(|r| {
                        let tenant = TenantId::new(r.get("tenant_id"));
                        let host: Option<String> = r.get("host");
                        let version: Option<i64> = r.get("secret_version");
                        OutboxMessage {
                            id: r.get("id"),
                            tenant,
                            event_type: r.get("event_type"),
                            payload: r.get("payload"),
                            attempts: u32::try_from(r.get::<_, i32>("attempts")).unwrap_or(0),
                            endpoint: host.zip(version).map(|(host, v)| WebhookEndpoint {
                                tenant,
                                host,
                                secret_version: to_u64(v),
                            }),
                        }
                    })
                    .collect())
            })
        })
        .await
    }

    async fn finish_attempt(
        &self,
        id: uuid::Uuid,
        delivered: bool,
        result: &str,
        now: OffsetDateTime,
        retry_at: Option<OffsetDateTime>,
    ) -> Result<(), MetadataStoreError> {
        let result = result.to_owned();
        self.in_tx("finish_attempt", Scope::System, |tx| {
            Box::pin(async move {
                // Given up: kept (for operators) but never due again.
                tx.execute(
                    "UPDATE webhook_outbox SET attempts = attempts + 1, last_result = $2, \
                     delivered_at = CASE WHEN $3::boolean THEN $4::timestamptz ELSE NULL END, \
                     next_attempt_at = COALESCE($5, 'infinity'::timestamptz) WHERE id = $1",
                    &[&id, &result, &delivered, &now, &retry_at],
                )
                .await
                .map_err(pg_err)?;
                Ok(())
            })
        })
        .await
    }

    async fn outbox_backlog(&self) -> Result<Vec<(TenantId, u64)>, MetadataStoreError> {
        self.in_tx("outbox_backlog", Scope::System, |tx| {
            Box::pin(async move {
                let rows = tx
                    .query(
                        "SELECT tenant_id, count(*) FROM webhook_outbox \
                         WHERE delivered_at IS NULL AND next_attempt_at < 'infinity' GROUP BY tenant_id",
                        &[],
                    )
                    .await
                    .map_err(pg_err)?;
                Ok(rows
                    .iter()
                    .map(|r| (TenantId::new(r.get(0)), to_u64(r.get(1))))
                    .collect())
            })
        })
        .await
    }
}

fn permissions_json(p: &Permissions) -> Result<serde_json::Value, MetadataStoreError> {
    serde_json::to_value(p).map_err(|e| MetadataStoreError::Other(e.to_string()))
}

/// The retire job's pass, as its PREVIOUS_EXPIRED events name it (each
/// retirement's audit record carries its own request id).
fn retire_job() -> ChangedBy {
    ChangedBy {
        actor: "system:retire (system)".into(),
        request_id: None,
    }
}

/// Appends the event describing `record`'s new state and stamps its seq on
/// the row (`event_seq`, what the cache orders loads by); returns the event
/// and sets `record.event_seq`.
async fn append_event(
    tx: &Transaction<'_>,
    record: &mut CredentialRecord,
    kind: EventKind,
    by: &ChangedBy,
) -> Result<CredentialEvent, MetadataStoreError> {
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&EVENT_ORDER_LOCK])
        .await
        .map_err(pg_err)?;
    let version = if kind == EventKind::Deleted {
        0
    } else {
        to_i64(record.current_version)
    };
    let row = tx
        .query_one(
            &format!(
                "WITH ev AS (INSERT INTO credential_events (tenant_id, exchange, kind, version, previous_version, previous_valid_until, actor, request_id) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {EVENT_COLS}), \
                 stamped AS (UPDATE tenant_credentials SET event_seq = (SELECT seq FROM ev) \
                 WHERE tenant_id = $1 AND exchange = $2) \
                 SELECT * FROM ev"
            ),
            &[
                &record.tenant.as_uuid(),
                &record.exchange.as_str(),
                &kind.as_str(),
                &version,
                &record.previous_version.map(to_i64),
                &record.previous_valid_until,
                &by.actor,
                &by.request_id,
            ],
        )
        .await
        .map_err(pg_err)?;
    let event = row_to_event(&row)?;
    record.event_seq = event.seq;
    Ok(event)
}

async fn select_record(
    tx: &impl GenericClient,
    tenant: TenantId,
    exchange: ExchangeId,
    lock: bool,
) -> Result<Option<CredentialRecord>, MetadataStoreError> {
    let sql = format!(
        "SELECT {RECORD_COLS} FROM tenant_credentials WHERE tenant_id = $1 AND exchange = $2{}",
        if lock { " FOR UPDATE" } else { "" }
    );
    tx.query_opt(&sql, &[&tenant.as_uuid(), &exchange.as_str()])
        .await
        .map_err(pg_err)?
        .as_ref()
        .map(row_to_record)
        .transpose()
}

async fn select_all(
    tx: &Transaction<'_>,
    tenant: TenantId,
) -> Result<Vec<CredentialRecord>, MetadataStoreError> {
    let rows = tx
        .query(
            &format!("SELECT {RECORD_COLS} FROM tenant_credentials WHERE tenant_id = $1 ORDER BY exchange"),
            &[&tenant.as_uuid()],
        )
        .await
        .map_err(pg_err)?;
    rows.iter().map(row_to_record).collect()
}

#[async_trait]
impl MetadataStore for PgMetadataStore {
    fn event_delivery(&self) -> credbroker_core::broker::ports::EventDelivery {
        credbroker_core::broker::ports::EventDelivery::Listener
    }

    async fn get(
        &self,
        tenant: TenantId,
        exchange: ExchangeId,
    ) -> Result<Option<CredentialRecord>, MetadataStoreError> {
        // The hot miss: one prepared statement, one round trip (the
        // function switches role and tenant itself; see migration V3).
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| MetadataStoreError::Unavailable(e.to_string()))?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {RECORD_COLS} FROM credbroker_read_credential($1, $2)"
            ))
            .await
            .map_err(pg_err)?;
        client
            .query_opt(&stmt, &[&tenant.as_uuid(), &exchange.as_str()])
            .await
            .map_err(pg_err)?
            .as_ref()
            .map(row_to_record)
            .transpose()
    }

    async fn list(&self, tenant: TenantId) -> Result<Vec<CredentialRecord>, MetadataStoreError> {
        self.in_tx("list", Scope::Tenant(tenant), |tx| {
            Box::pin(select_all(tx, tenant))
        })
        .await
    }

    async fn snapshot(
        &self,
        tenant: TenantId,
    ) -> Result<(Vec<CredentialRecord>, u64), MetadataStoreError> {
        self.in_tx("snapshot", Scope::Tenant(tenant), |tx| {
            Box::pin(async move {
                // The cursor first: rows read after it can only be newer, so
                // events above the cursor may repeat what the rows show but
                // none can be missing from both.
                let seq: i64 = tx
                    .query_one(
                        "SELECT coalesce(max(seq), 0) FROM credential_events WHERE tenant_id = $1",
                        &[&tenant.as_uuid()],
                    )
                    .await
                    .map_err(pg_err)?
                    .get(0);
                Ok((select_all(tx, tenant).await?, to_u64(seq)))
            })
        })
        .await
    }

    async fn insert(
        &self,
        new: NewCredential,
    ) -> Result<(CredentialRecord, CredentialEvent), MetadataStoreError> {
        self.in_tx("insert", Scope::Tenant(new.tenant), |tx| {
            Box::pin(async move {
                let row = tx
                    .query_opt(
                        &format!(
                            "INSERT INTO tenant_credentials (tenant_id, exchange, vault_path, current_version, permissions, \
                             api_key_hint, last_validated_at, created_at, updated_at) \
                             VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $7) \
                             ON CONFLICT (tenant_id, exchange) DO NOTHING RETURNING {RECORD_COLS}"
                        ),
                        &[
                            &new.tenant.as_uuid(),
                            &new.exchange.as_str(),
                            &new.vault_path,
                            &to_i64(new.version),
                            &permissions_json(&new.permissions)?,
                            &new.api_key_hint,
                            &new.validated_at,
                        ],
                    )
                    .await
                    .map_err(pg_err)?
                    .ok_or(MetadataStoreError::AlreadyExists)?;
                let mut record = row_to_record(&row)?;
                let event = append_event(tx, &mut record, EventKind::Stored, &new.by).await?;
                Ok((record, event))
            })
        })
        .await
    }

    async fn rotate(
        &self,
        c: RotationCommit,
    ) -> Result<(CredentialRecord, CredentialEvent), MetadataStoreError> {
        self.in_tx("rotate", Scope::Tenant(c.tenant), |tx| {
            Box::pin(async move {
                let row = tx
                    .query_opt(
                        &format!(
                            "UPDATE tenant_credentials SET current_version = $3, previous_version = $4, \
                             previous_valid_until = $5, status = 'active', permissions = $6, api_key_hint = $7, \
                             last_validated_at = $8, updated_at = $8 \
                             WHERE tenant_id = $1 AND exchange = $2 AND current_version = $9 RETURNING {RECORD_COLS}"
                        ),
                        &[
                            &c.tenant.as_uuid(),
                            &c.exchange.as_str(),
                            &to_i64(c.new_version),
                            &c.previous_version.map(to_i64),
                            &c.previous_valid_until,
                            &permissions_json(&c.permissions)?,
                            &c.api_key_hint,
                            &c.validated_at,
                            &to_i64(c.expected_version),
                        ],
                    )
                    .await
                    .map_err(pg_err)?;
                let Some(row) = row else {
                    return Err(match select_record(tx, c.tenant, c.exchange, false).await? {
                        Some(_) => MetadataStoreError::Conflict,
                        None => MetadataStoreError::NotFound,
                    });
                };
                let mut record = row_to_record(&row)?;
                let event = append_event(tx, &mut record, EventKind::Rotated, &c.by).await?;
                Ok((record, event))
            })
        })
        .await
    }

    async fn delete(
        &self,
        tenant: TenantId,
        exchange: ExchangeId,
        by: &ChangedBy,
    ) -> Result<Option<CredentialEvent>, MetadataStoreError> {
        let by = by.clone();
        self.in_tx("delete", Scope::Tenant(tenant), |tx| {
            Box::pin(async move {
                let row = tx
                    .query_opt(
                        &format!("DELETE FROM tenant_credentials WHERE tenant_id = $1 AND exchange = $2 RETURNING {RECORD_COLS}"),
                        &[&tenant.as_uuid(), &exchange.as_str()],
                    )
                    .await
                    .map_err(pg_err)?;
                match row {
                    Some(row) => Ok(Some(append_event(tx, &mut row_to_record(&row)?, EventKind::Deleted, &by).await?)),
                    None => Ok(None),
                }
            })
        })
        .await
    }

    async fn record_health(
        &self,
        u: HealthUpdate,
    ) -> Result<(CredentialRecord, Option<CredentialEvent>), MetadataStoreError> {
        self.in_tx("record_health", Scope::Tenant(u.tenant), |tx| {
            Box::pin(async move {
                let before = select_record(tx, u.tenant, u.exchange, true)
                    .await?
                    .ok_or(MetadataStoreError::NotFound)?;
                let permissions = u.permissions.as_ref().map(permissions_json).transpose()?;
                let row = tx
                    .query_one(
                        &format!(
                            "UPDATE tenant_credentials SET health_check_status = $3, status = $4, health_check_detail = $5, \
                             health_checked_at = $7, \
                             permissions = COALESCE($6, permissions), \
                             last_validated_at = CASE WHEN $6::jsonb IS NULL THEN last_validated_at ELSE $7 END, \
                             updated_at = $7 WHERE tenant_id = $1 AND exchange = $2 RETURNING {RECORD_COLS}"
                        ),
                        &[
                            &u.tenant.as_uuid(),
                            &u.exchange.as_str(),
                            &u.health.as_str(),
                            &u.status.as_str(),
                            &u.detail,
                            &permissions,
                            &u.checked_at,
                        ],
                    )
                    .await
                    .map_err(pg_err)?;
                let mut record = row_to_record(&row)?;
                let event = if record.status.is_invalidated() && before.status != record.status {
                    Some(append_event(tx, &mut record, EventKind::Invalidated, &u.by).await?)
                } else {
                    None
                };
                if let Some(n) = &u.notice {
                    // Queued with the change, only for a tenant with a webhook;
                    // due at once by the database's clock (the deliverers'
                    // time), whatever the broker's domain clock says.
                    tx.execute(
                        "INSERT INTO webhook_outbox (id, tenant_id, event_type, payload, created_at, next_attempt_at) \
                         SELECT $1, $2, $3, $4, $5, now() FROM tenant_webhooks WHERE tenant_id = $2",
                        &[&n.id, &u.tenant.as_uuid(), &n.event_type, &n.payload, &n.at],
                    )
                    .await
                    .map_err(pg_err)?;
                }
                Ok((record, event))
            })
        })
        .await
    }

    async fn expire_overlaps(
        &self,
        now: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<(String, u64, CredentialEvent)>, MetadataStoreError> {
        self.in_tx("expire_overlaps", Scope::System, |tx| {
            Box::pin(async move {
                // SKIP LOCKED: two replicas running the job never retire the
                // same version twice, and neither waits for the other.
                let due = tx
                    .query(
                        &format!(
                            "SELECT {RECORD_COLS} FROM tenant_credentials WHERE previous_valid_until <= $1 \
                             ORDER BY previous_valid_until LIMIT $2 FOR UPDATE SKIP LOCKED"
                        ),
                        &[&now, &i64::from(limit)],
                    )
                    .await
                    .map_err(pg_err)?;
                let mut out = Vec::with_capacity(due.len());
                for row in &due {
                    let before = row_to_record(row)?;
                    let Some(version) = before.previous_version else { continue };
                    let row = tx
                        .query_one(
                            &format!(
                                "UPDATE tenant_credentials SET previous_version = NULL, previous_valid_until = NULL, \
                                 updated_at = $3 WHERE tenant_id = $1 AND exchange = $2 RETURNING {RECORD_COLS}"
                            ),
                            &[&before.tenant.as_uuid(), &before.exchange.as_str(), &now],
                        )
                        .await
                        .map_err(pg_err)?;
                    let mut record = row_to_record(&row)?;
                    let event = append_event(tx, &mut record, EventKind::PreviousExpired, &retire_job()).await?;
                    out.push((record.vault_path, version, event));
                }
                Ok(out)
            })
        })
        .await
    }

    async fn events_after(
        &self,
        tenant: TenantId,
        after: u64,
        limit: u32,
    ) -> Result<Vec<CredentialEvent>, MetadataStoreError> {
        self.in_tx("events_after", Scope::Tenant(tenant), |tx| {
            Box::pin(async move {
                let rows = tx
                    .query(
                        &format!(
                            "SELECT {EVENT_COLS} FROM credential_events WHERE tenant_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
                        ),
                        &[&tenant.as_uuid(), &to_i64(after), &i64::from(limit)],
                    )
                    .await
                    .map_err(pg_err)?;
                rows.iter().map(row_to_event).collect()
            })
        })
        .await
    }

    async fn acknowledge(
        &self,
        tenant: TenantId,
        exchange: ExchangeId,
        subscriber: &str,
        version: u64,
        at: OffsetDateTime,
    ) -> Result<(), MetadataStoreError> {
        let subscriber = subscriber.to_owned();
        self.in_tx("acknowledge", Scope::Tenant(tenant), |tx| {
            Box::pin(async move {
                let n = tx
                    .execute(
                        "INSERT INTO rotation_acks (tenant_id, exchange, subscriber, version, acked_at) \
                         SELECT tenant_id, exchange, $3, $4, $5 FROM tenant_credentials \
                         WHERE tenant_id = $1 AND exchange = $2 \
                         ON CONFLICT (tenant_id, exchange, subscriber) \
                         DO UPDATE SET version = EXCLUDED.version, acked_at = EXCLUDED.acked_at",
                        &[&tenant.as_uuid(), &exchange.as_str(), &subscriber, &to_i64(version), &at],
                    )
                    .await
                    .map_err(pg_err)?;
                if n == 0 {
                    return Err(MetadataStoreError::NotFound);
                }
                Ok(())
            })
        })
        .await
    }

    async fn adoption(
        &self,
        tenant: TenantId,
        exchange: ExchangeId,
    ) -> Result<Vec<Adoption>, MetadataStoreError> {
        self.in_tx("adoption", Scope::Tenant(tenant), |tx| {
            Box::pin(async move {
                let rows = tx
                    .query(
                        "SELECT subscriber, version, acked_at FROM rotation_acks \
                         WHERE tenant_id = $1 AND exchange = $2 ORDER BY acked_at DESC, subscriber",
                        &[&tenant.as_uuid(), &exchange.as_str()],
                    )
                    .await
                    .map_err(pg_err)?;
                Ok(rows
                    .iter()
                    .map(|r| Adoption {
                        subscriber: r.get(0),
                        version: to_u64(r.get(1)),
                        acked_at: r.get(2),
                    })
                    .collect())
            })
        })
        .await
    }

    async fn prune_events(&self, before: OffsetDateTime) -> Result<u64, MetadataStoreError> {
        self.in_tx("prune_events", Scope::System, |tx| {
            Box::pin(async move {
                let row = tx
                    .query_one(
                        "WITH gone AS (DELETE FROM credential_events WHERE occurred_at < $1 RETURNING seq), \
                         marked AS (UPDATE credential_event_retention \
                             SET pruned_through = GREATEST(pruned_through, (SELECT coalesce(max(seq), 0) FROM gone)) \
                             RETURNING pruned_through) \
                         SELECT (SELECT count(*) FROM gone), (SELECT pruned_through FROM marked)",
                        &[&before],
                    )
                    .await
                    .map_err(pg_err)?;
                Ok(to_u64(row.get(0)))
            })
        })
        .await
    }

    async fn pruned_through(&self) -> Result<u64, MetadataStoreError> {
        self.in_tx("pruned_through", Scope::System, |tx| {
            Box::pin(async move {
                let row = tx
                    .query_one("SELECT pruned_through FROM credential_event_retention", &[])
                    .await
                    .map_err(pg_err)?;
                Ok(to_u64(row.get(0)))
            })
        })
        .await
    }

    async fn ship_audit(&self, rows: Vec<AuditRow>) -> Result<(), MetadataStoreError> {
        self.ship_audit_rows(rows).await
    }

    async fn anchor_audit(
        &self,
        chain_id: uuid::Uuid,
        seq: u64,
        hash: &str,
    ) -> Result<(), MetadataStoreError> {
        self.anchor_audit_head(chain_id, seq, hash).await
    }

    async fn list_audit(
        &self,
        tenant: TenantId,
        before: Option<(OffsetDateTime, uuid::Uuid)>,
        since: Option<OffsetDateTime>,
        limit: u32,
    ) -> Result<Vec<AuditRow>, MetadataStoreError> {
        self.list_tenant_audit(tenant, before, since, limit).await
    }

    async fn replica_heartbeat(
        &self,
        id: uuid::Uuid,
        now: OffsetDateTime,
        live_for: time::Duration,
    ) -> Result<u32, MetadataStoreError> {
        self.in_tx("replica_heartbeat", Scope::System, |tx| {
            Box::pin(async move {
                let since = now - live_for;
                tx.execute(
                    "INSERT INTO broker_replicas (replica_id, heartbeat_at) VALUES ($1, $2) \
                     ON CONFLICT (replica_id) DO UPDATE SET heartbeat_at = EXCLUDED.heartbeat_at",
                    &[&id, &now],
                )
                .await
                .map_err(pg_err)?;
                tx.execute(
                    "DELETE FROM broker_replicas WHERE heartbeat_at < $1",
                    &[&(since - live_for)],
                )
                .await
                .map_err(pg_err)?;
                let n: i64 = tx
                    .query_one(
                        "SELECT count(*) FROM broker_replicas WHERE heartbeat_at > $1",
                        &[&since],
                    )
                    .await
                    .map_err(pg_err)?
                    .get(0);
                Ok(u32::try_from(n).unwrap_or(u32::MAX).max(1))
            })
        })
        .await
    }

    async fn ping(&self) -> Result<(), MetadataStoreError> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| MetadataStoreError::Unavailable(e.to_string()))?;
        client.simple_query("SELECT 1").await.map_err(pg_err)?;
        Ok(())
    }
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
