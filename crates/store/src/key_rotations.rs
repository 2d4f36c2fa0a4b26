//! Rotations at the exchange and the management keys' sub-accounts
//! ([`KeyRotationStore`]); the job works on them as the system.

use std::str::FromStr as _;

use async_trait::async_trait;
use time::OffsetDateTime;
use tokio_postgres::Row;

use credbroker_core::{
    broker::{
        error::MetadataStoreError,
        ports::Notice,
        types::{ExchangeId, TenantId},
    },
    rotation::mint::{KeyRotation, KeyRotationStore, RotationSchedule, Scheduled, Step},
};

use super::{PgMetadataStore, Scope, pg_err, to_i64, to_u64};

const COLUMNS: &str = "id, tenant_id, exchange, sub_account, step, old_api_key, minted_api_key, \
     new_version, overlap_secs, delete_after, attempts, next_attempt_at, last_error, created_at";

fn row_to_rotation(r: &Row) -> Result<KeyRotation, MetadataStoreError> {
    let step: String = r.get("step");
    let exchange: String = r.get("exchange");
    Ok(KeyRotation {
        id: r.get("id"),
        tenant: TenantId::new(r.get("tenant_id")),
        exchange: ExchangeId::from_str(&exchange).map_err(MetadataStoreError::Other)?,
        sub_account: r.get("sub_account"),
        step: Step::parse(&step)
            .ok_or_else(|| MetadataStoreError::Other(format!("unknown rotation step {step}")))?,
        old_api_key: r.get("old_api_key"),
        minted_api_key: r.get("minted_api_key"),
        new_version: r.get::<_, Option<i64>>("new_version").map(to_u64),
        overlap_secs: u32::try_from(r.get::<_, i32>("overlap_secs")).unwrap_or(0),
        delete_after: r.get("delete_after"),
        attempts: u32::try_from(r.get::<_, i32>("attempts")).unwrap_or(0),
        next_attempt_at: r.get("next_attempt_at"),
        last_error: r.get("last_error"),
        created_at: r.get("created_at"),
    })
}

fn i32_of(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

#[async_trait]
impl KeyRotationStore for PgMetadataStore {
    async fn management(
        &self,
        tenant: TenantId,
        exchange: ExchangeId,
    ) -> Result<Option<String>, MetadataStoreError> {
        self.in_tx("management_key", Scope::System, |tx| {
            Box::pin(async move {
                let row = tx
                    .query_opt(
                        "SELECT sub_account FROM management_keys WHERE tenant_id = $1 AND exchange = $2",
                        &[&tenant.as_uuid(), &exchange.as_str()],
                    )
                    .await
                    .map_err(pg_err)?;
                Ok(row.map(|r| r.get("sub_account")))
            })
        })
        .await
    }

    async fn set_management(
        &self,
        tenant: TenantId,
        exchange: ExchangeId,
        sub_account: &str,
        api_key_hint: &str,
        schedule: RotationSchedule,
    ) -> Result<(), MetadataStoreError> {
        let (sub, hint) = (sub_account.to_owned(), api_key_hint.to_owned());
        self.in_tx("set_management_key", Scope::System, |tx| {
            Box::pin(async move {
                tx.execute(
                    "INSERT INTO management_keys (tenant_id, exchange, sub_account, api_key_hint, rotate_every_days, overlap_secs) \
                     VALUES ($1, $2, $3, $4, $5, $6) \
                     ON CONFLICT (tenant_id, exchange) DO UPDATE SET sub_account = EXCLUDED.sub_account, \
                     api_key_hint = EXCLUDED.api_key_hint, rotate_every_days = EXCLUDED.rotate_every_days, \
                     overlap_secs = EXCLUDED.overlap_secs, updated_at = now()",
                    &[
                        &tenant.as_uuid(),
                        &exchange.as_str(),
                        &sub,
                        &hint,
                        &i32_of(schedule.every_days),
                        &i32_of(schedule.overlap_secs),
                    ],
                )
                .await
                .map_err(pg_err)?;
                Ok(())
            })
        })
        .await
    }

    async fn scheduled(&self) -> Result<Vec<Scheduled>, MetadataStoreError> {
        self.in_tx("scheduled_key_rotations", Scope::System, |tx| {
            Box::pin(async move {
                let rows = tx
                    .query(
                        "SELECT m.tenant_id, m.exchange, m.rotate_every_days, m.overlap_secs, \
                         GREATEST(m.updated_at, last.created_at) AS since, COALESCE(last.step = 'failed', false) AS last_failed \
                         FROM management_keys m \
                         LEFT JOIN LATERAL (SELECT k.created_at, k.step FROM key_rotations k \
                             WHERE k.tenant_id = m.tenant_id AND k.exchange = m.exchange \
                             ORDER BY k.created_at DESC LIMIT 1) last ON true \
                         WHERE m.rotate_every_days > 0 AND NOT EXISTS (SELECT 1 FROM key_rotations u \
                             WHERE u.tenant_id = m.tenant_id AND u.exchange = m.exchange AND u.step NOT IN ('done', 'failed'))",
                        &[],
                    )
                    .await
                    .map_err(pg_err)?;
                rows.iter()
                    .map(|r| {
                        let exchange: String = r.get("exchange");
                        Ok(Scheduled {
                            tenant: TenantId::new(r.get("tenant_id")),
                            exchange: ExchangeId::from_str(&exchange).map_err(MetadataStoreError::Other)?,
                            schedule: RotationSchedule {
                                every_days: u32::try_from(r.get::<_, i32>("rotate_every_days")).unwrap_or(0),
                                overlap_secs: u32::try_from(r.get::<_, i32>("overlap_secs")).unwrap_or(0),
                            },
                            since: r.get("since"),
                            last_failed: r.get("last_failed"),
                        })
                    })
                    .collect()
            })
        })
        .await
    }

    async fn begin(
        &self,
        rotation: &KeyRotation,
    ) -> Result<Option<KeyRotation>, MetadataStoreError> {
        let r = rotation.clone();
        self.in_tx("begin_key_rotation", Scope::System, |tx| {
            Box::pin(async move {
                // The partial unique index allows one unfinished rotation
                // per credential; a second start finds the first.
                let inserted = tx
                    .execute(
                        "INSERT INTO key_rotations (id, tenant_id, exchange, sub_account, step, old_api_key, \
                         minted_api_key, new_version, overlap_secs, delete_after, attempts, next_attempt_at, \
                         last_error, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) \
                         ON CONFLICT (tenant_id, exchange) WHERE step NOT IN ('done', 'failed') DO NOTHING",
                        &[
                            &r.id,
                            &r.tenant.as_uuid(),
                            &r.exchange.as_str(),
                            &r.sub_account,
                            &r.step.as_str(),
                            &r.old_api_key,
                            &r.minted_api_key,
                            &r.new_version.map(to_i64),
                            &i32_of(r.overlap_secs),
                            &r.delete_after,
                            &i32_of(r.attempts),
                            &r.next_attempt_at,
                            &r.last_error,
                            &r.created_at,
                        ],
                    )
                    .await
                    .map_err(pg_err)?;
                if inserted == 1 {
                    return Ok(None);
                }
                let row = tx
                    .query_one(
                        &format!(
                            "SELECT {COLUMNS} FROM key_rotations WHERE tenant_id = $1 AND exchange = $2 \
                             AND step NOT IN ('done', 'failed')"
                        ),
                        &[&r.tenant.as_uuid(), &r.exchange.as_str()],
                    )
                    .await
                    .map_err(pg_err)?;
                row_to_rotation(&row).map(Some)
            })
        })
        .await
    }

    async fn save(
        &self,
        rotation: &KeyRotation,
        notice: Option<&Notice>,
    ) -> Result<(), MetadataStoreError> {
        let r = rotation.clone();
        let notice = notice.cloned();
        self.in_tx("save_key_rotation", Scope::System, |tx| {
            Box::pin(async move {
                tx.execute(
                    "UPDATE key_rotations SET step = $2, minted_api_key = $3, new_version = $4, delete_after = $5, \
                     attempts = $6, next_attempt_at = $7, last_error = $8, updated_at = now() WHERE id = $1",
                    &[
                        &r.id,
                        &r.step.as_str(),
                        &r.minted_api_key,
                        &r.new_version.map(to_i64),
                        &r.delete_after,
                        &i32_of(r.attempts),
                        &r.next_attempt_at,
                        &r.last_error,
                    ],
                )
                .await
                .map_err(pg_err)?;
                if let Some(n) = &notice {
                    super::webhooks::queue_notice(tx, r.tenant, n).await?;
                }
                Ok(())
            })
        })
        .await
    }

    async fn get(&self, id: uuid::Uuid) -> Result<Option<KeyRotation>, MetadataStoreError> {
        self.in_tx("key_rotation", Scope::System, |tx| {
            Box::pin(async move {
                let row = tx
                    .query_opt(
                        &format!("SELECT {COLUMNS} FROM key_rotations WHERE id = $1"),
                        &[&id],
                    )
                    .await
                    .map_err(pg_err)?;
                row.as_ref().map(row_to_rotation).transpose()
            })
        })
        .await
    }

    async fn active(
        &self,
        tenant: TenantId,
        exchange: ExchangeId,
    ) -> Result<Option<KeyRotation>, MetadataStoreError> {
        self.in_tx("active_key_rotation", Scope::System, |tx| {
            Box::pin(async move {
                let row = tx
                    .query_opt(
                        &format!(
                            "SELECT {COLUMNS} FROM key_rotations WHERE tenant_id = $1 AND exchange = $2 \
                             AND step NOT IN ('done', 'failed')"
                        ),
                        &[&tenant.as_uuid(), &exchange.as_str()],
                    )
                    .await
                    .map_err(pg_err)?;
                row.as_ref().map(row_to_rotation).transpose()
            })
        })
        .await
    }

    async fn unfinished(&self) -> Result<Vec<KeyRotation>, MetadataStoreError> {
        self.in_tx("unfinished_key_rotations", Scope::System, |tx| {
            Box::pin(async move {
                let rows = tx
                    .query(
                        &format!(
                            "SELECT {COLUMNS} FROM key_rotations WHERE step NOT IN ('done', 'failed')"
                        ),
                        &[],
                    )
                    .await
                    .map_err(pg_err)?;
                rows.iter().map(row_to_rotation).collect()
            })
        })
        .await
    }

    async fn due(
        &self,
        now: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<KeyRotation>, MetadataStoreError> {
        self.in_tx("due_key_rotations", Scope::System, |tx| {
            Box::pin(async move {
                let rows = tx
                    .query(
                        &format!(
                            "SELECT {COLUMNS} FROM key_rotations WHERE step NOT IN ('done', 'failed') \
                             AND next_attempt_at <= $1 AND (step <> 'waiting' OR delete_after <= $1) \
                             ORDER BY next_attempt_at LIMIT $2"
                        ),
                        &[&now, &i64::from(limit)],
                    )
                    .await
                    .map_err(pg_err)?;
                rows.iter().map(row_to_rotation).collect()
            })
        })
        .await
    }
}
