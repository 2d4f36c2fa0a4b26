//! Cross-tenant queries of the background jobs ([`FleetStore`]): counts
//! for the metrics, credentials due for a health check, job leases.

use std::str::FromStr as _;

use async_trait::async_trait;
use time::OffsetDateTime;

use credbroker_core::broker::{
    error::MetadataStoreError,
    ports::FleetStore,
    types::{CredentialStatus, ExchangeId, TenantId},
};

use super::{PgMetadataStore, Scope, pg_err, to_u64};

#[async_trait]
impl FleetStore for PgMetadataStore {
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
