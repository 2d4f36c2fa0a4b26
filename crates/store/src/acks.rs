//! Acknowledgements written in groups: when a rotation reaches a fleet,
//! every pod acknowledges within the same second, and one transaction per
//! acknowledgement (four round trips) would queue thousands of calls on
//! the pool, holding call slots the pods' GetCredentials need. Each call
//! queues its row; whoever holds the flush writes every queued row (one
//! multi-row upsert per tenant), answers each, and lets the next holder
//! take what queued meanwhile (a group commit).

use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
};

use time::OffsetDateTime;
use tokio::sync::oneshot;

use credbroker_core::broker::{
    error::MetadataStoreError,
    types::{ExchangeId, TenantId},
};

use super::{PgMetadataStore, Scope, pg_err, to_i64};

/// One acknowledgement waiting to be written.
struct Queued {
    tenant: TenantId,
    exchange: ExchangeId,
    subscriber: String,
    version: u64,
    at: OffsetDateTime,
    done: oneshot::Sender<Result<(), MetadataStoreError>>,
}

/// The queue and the flush of one store.
#[derive(Default)]
pub(crate) struct Acks {
    queued: Mutex<Vec<Queued>>,
    flush: tokio::sync::Mutex<()>,
}

impl PgMetadataStore {
    /// Records (upserts) `subscriber`'s acknowledgement, written with every
    /// other acknowledgement queued meanwhile.
    pub(crate) async fn acknowledge_grouped(
        &self,
        tenant: TenantId,
        exchange: ExchangeId,
        subscriber: &str,
        version: u64,
        at: OffsetDateTime,
    ) -> Result<(), MetadataStoreError> {
        let (done, mut rx) = oneshot::channel();
        self.acks
            .queued
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Queued {
                tenant,
                exchange,
                subscriber: subscriber.to_owned(),
                version,
                at,
                done,
            });
        {
            let _flush = self.acks.flush.lock().await;
            // Written by the holder before us?
            if let Ok(r) = rx.try_recv() {
                return r;
            }
            let group = std::mem::take(
                &mut *self
                    .acks
                    .queued
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner),
            );
            self.write_acks(group).await;
        }
        rx.await.unwrap_or_else(|_| {
            Err(MetadataStoreError::Unavailable(
                "the acknowledgement's write was abandoned".into(),
            ))
        })
    }

    /// Writes a group, one transaction per tenant (its rows under its
    /// role), and answers every row.
    async fn write_acks(&self, group: Vec<Queued>) {
        let mut by_tenant: HashMap<TenantId, Vec<Queued>> = HashMap::new();
        for q in group {
            by_tenant.entry(q.tenant).or_default().push(q);
        }
        for (tenant, rows) in by_tenant {
            // One row per key (an upsert may not touch a row twice): the
            // latest queued wins, as it would one call after another.
            let mut latest: HashMap<(ExchangeId, &str), usize> = HashMap::new();
            for (i, q) in rows.iter().enumerate() {
                latest.insert((q.exchange, q.subscriber.as_str()), i);
            }
            let mut keep: Vec<usize> = latest.into_values().collect();
            keep.sort_unstable();
            let exchanges: Vec<String> = keep
                .iter()
                .map(|&i| rows[i].exchange.as_str().to_owned())
                .collect();
            let subscribers: Vec<String> =
                keep.iter().map(|&i| rows[i].subscriber.clone()).collect();
            let versions: Vec<i64> = keep.iter().map(|&i| to_i64(rows[i].version)).collect();
            let ats: Vec<OffsetDateTime> = keep.iter().map(|&i| rows[i].at).collect();
            let written = self
                .in_tx("acknowledge", Scope::Tenant(tenant), |tx| {
                    Box::pin(async move {
                        let upsert = tx
                            .prepare_cached(
                                "INSERT INTO rotation_acks (tenant_id, exchange, subscriber, version, acked_at) \
                                 SELECT c.tenant_id, c.exchange, a.subscriber, a.version, a.acked_at \
                                 FROM unnest($2::text[], $3::text[], $4::bigint[], $5::timestamptz[]) \
                                   AS a(exchange, subscriber, version, acked_at) \
                                 JOIN tenant_credentials c ON c.tenant_id = $1 AND c.exchange = a.exchange \
                                 ON CONFLICT (tenant_id, exchange, subscriber) \
                                 DO UPDATE SET version = EXCLUDED.version, acked_at = EXCLUDED.acked_at \
                                 RETURNING exchange, subscriber",
                            )
                            .await
                            .map_err(pg_err)?;
                        let rows = tx
                            .query(
                                &upsert,
                                &[&tenant.as_uuid(), &exchanges, &subscribers, &versions, &ats],
                            )
                            .await
                            .map_err(pg_err)?;
                        Ok(rows
                            .iter()
                            .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
                            .collect::<std::collections::HashSet<_>>())
                    })
                })
                .await;
            for q in rows {
                let result = match &written {
                    Ok(found) => {
                        let key = (q.exchange.as_str().to_owned(), q.subscriber.clone());
                        if found.contains(&key) {
                            Ok(())
                        } else {
                            Err(MetadataStoreError::NotFound)
                        }
                    }
                    Err(e) => Err(e.clone()),
                };
                let _ = q.done.send(result);
            }
        }
    }
}
