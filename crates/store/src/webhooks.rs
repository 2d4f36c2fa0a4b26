//! Webhook endpoints and the delivery outbox ([`WebhookStore`]).

use async_trait::async_trait;
use time::OffsetDateTime;

use credbroker_core::broker::{
    error::MetadataStoreError,
    ports::{Notice, OutboxMessage, WebhookEndpoint, WebhookStore},
    types::TenantId,
};

use super::{PgMetadataStore, Scope, pg_err, to_i64, to_u64};

/// Queues `notice` for `tenant`'s webhook in the transaction of the change
/// it reports; nothing for a tenant without one. Due at once by the
/// database's clock (the deliverers' time), whatever the broker's domain
/// clock says.
pub(super) async fn queue_notice(
    tx: &deadpool_postgres::Transaction<'_>,
    tenant: TenantId,
    notice: &Notice,
) -> Result<(), MetadataStoreError> {
    tx.execute(
        "INSERT INTO webhook_outbox (id, tenant_id, event_type, payload, created_at, next_attempt_at) \
         SELECT $1, $2, $3, $4, $5, now() FROM tenant_webhooks WHERE tenant_id = $2",
        &[&notice.id, &tenant.as_uuid(), &notice.event_type, &notice.payload, &notice.at],
    )
    .await
    .map_err(pg_err)?;
    Ok(())
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
