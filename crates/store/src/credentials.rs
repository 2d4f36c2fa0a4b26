//! Credential rows (`tenant_credentials`) and the [`MetadataStore`] port:
//! reads under the tenant's role, writes that append their event in the
//! same transaction (see [`super::events`]), acknowledgements. The audit
//! methods of the port are [`super::audit`]'s; the replica registry's are
//! [`super::fleet`]'s.

use std::str::FromStr;
use tracing::Instrument as _;

use async_trait::async_trait;
use deadpool_postgres::{GenericClient, Transaction};
use time::OffsetDateTime;
use tokio_postgres::Row;

use credbroker_core::broker::{
    error::MetadataStoreError,
    ports::{ChangedBy, HealthUpdate, MetadataStore, NewCredential, RotationCommit},
    types::{
        Adoption, CredentialEvent, CredentialRecord, CredentialStatus, EventKind, ExchangeId,
        HealthStatus, Permissions, TenantId,
    },
};

use super::{
    PgMetadataStore, Scope,
    events::{EVENT_COLS, append_event, retire_job, row_to_event},
    pg_err, to_i64, to_u64,
};

const RECORD_COLS: &str = "tenant_id, exchange, vault_path, current_version, previous_version, \
    previous_valid_until, status, permissions, api_key_hint, last_validated_at, health_check_status, \
    health_check_detail, health_checked_at, created_at, updated_at, event_seq";

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

fn permissions_json(p: &Permissions) -> Result<serde_json::Value, MetadataStoreError> {
    serde_json::to_value(p).map_err(|e| MetadataStoreError::Other(e.to_string()))
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
        async {
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
        .instrument(crate::pg_span("get"))
        .await
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
                    super::webhooks::queue_notice(tx, u.tenant, n).await?;
                }
                Ok((record, event))
            })
        })
        .await
    }

    async fn end_overlap_at(
        &self,
        tenant: TenantId,
        exchange: ExchangeId,
        previous_version: u64,
        at: OffsetDateTime,
    ) -> Result<bool, MetadataStoreError> {
        self.in_tx("end_overlap_at", Scope::System, |tx| {
            Box::pin(async move {
                let n = tx
                    .execute(
                        "UPDATE tenant_credentials SET previous_valid_until = $4 \
                         WHERE tenant_id = $1 AND exchange = $2 AND previous_version = $3 \
                           AND previous_valid_until > $4",
                        &[
                            &tenant.as_uuid(),
                            &exchange.as_str(),
                            &to_i64(previous_version),
                            &at,
                        ],
                    )
                    .await
                    .map_err(pg_err)?;
                Ok(n == 1)
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
        self.acknowledge_grouped(tenant, exchange, subscriber, version, at)
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
