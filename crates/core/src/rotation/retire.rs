//! The retire job: when a previous version's deadline passes, stop serving
//! it, destroy it in Vault, and emit PREVIOUS_EXPIRED; prune events past
//! retention; and sweep Vault for versions no row references.
//!
//! The deadline lives in the database, so the job survives restarts and any
//! replica can run it (row locks keep two replicas from retiring the same
//! version twice). Orphaned versions come from the loser of concurrent
//! Rotates (KV v2 adds a version per write; check-and-set only stops the
//! second *commit*), a crash between the Vault write and the PostgreSQL
//! commit, and a destroy that failed while Vault was down.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::audit::AuditRecord;

use crate::broker::Broker;

use crate::broker::error::BrokerError;

use crate::broker::types::{ExchangeId, TenantId};

/// Rows retired per pass.
const BATCH: u32 = 100;

/// When the job runs. Tests use `Manual` and call the passes themselves, so
/// no timer can race their assertions.
#[derive(Clone, Copy, Debug)]
pub enum Schedule {
    /// On timers.
    Every {
        /// Overlap retirement and event pruning.
        retire: Duration,
        /// The orphan sweep (one Vault LIST per tenant and one metadata read
        /// per credential, so much rarer).
        sweep: Duration,
    },
    /// Never by itself.
    Manual,
}

/// Runs one pass; returns how many versions were retired.
///
/// # Errors
/// When the metadata store is unavailable.
pub async fn retire_once(broker: &Broker) -> Result<usize, BrokerError> {
    // Which overlaps end is learned only as they are ended (one statement):
    // the pass runs only while the trail takes records, and each retirement
    // is recorded as it happens.
    broker.audit_ready()?;
    let now = broker.clock().now();
    let retired = broker.metadata().expire_overlaps(now, BATCH).await?;
    let n = retired.len();
    for (path, version, event) in retired {
        // Kept for the health checks, which ask the exchange whether the
        // replaced key still works there.
        if let Err(e) = broker
            .keep_replaced(event.tenant, event.exchange, &path, version)
            .await
        {
            tracing::warn!(tenant = %event.tenant, exchange = %event.exchange, version, "could not keep the replaced key's set to check it at the exchange: {e}");
        }
        // The row no longer references the version, so it is never served
        // again even if the destroy fails; the orphan sweep removes it later.
        if let Err(e) = broker.secrets().destroy_versions(&path, &[version]).await {
            tracing::warn!(tenant = %event.tenant, exchange = %event.exchange, version, "could not destroy retired version: {e}");
        }
        tracing::info!(tenant = %event.tenant, exchange = %event.exchange, version, "previous version retired");
        broker.audit_system(&AuditRecord::system(
            "retire",
            "RetirePreviousVersion",
            event.tenant,
            event.exchange,
            vec![version],
        ));
        broker.apply_event(event);
    }
    Ok(n)
}

/// Destroys every Vault version under the broker's prefix that no row
/// references and that was written more than `grace` ago (a Rotate in
/// progress has written its version but not committed its row yet; `grace`
/// must exceed any request's lifetime). The current and previous versions of
/// a row are never touched. A path with no row whose every version is gone
/// is removed. Returns how many versions were destroyed.
///
/// # Errors
/// When Vault or PostgreSQL is unavailable (the next sweep starts over).
pub async fn sweep_orphans(broker: &Broker, grace: time::Duration) -> Result<usize, BrokerError> {
    let secrets = broker.secrets();
    let cutoff = broker.clock().now() - grace;
    let prefix = broker.vault_path_prefix();
    let mut destroyed = 0;
    for tenant_dir in secrets.list(prefix).await? {
        let Ok(tenant) = tenant_dir.trim_end_matches('/').parse::<TenantId>() else {
            continue;
        };
        let exchanges = secrets
            .list(&format!("{prefix}/{tenant}/exchanges"))
            .await?;
        for exchange_dir in exchanges {
            let Ok(exchange) = exchange_dir.trim_end_matches('/').parse::<ExchangeId>() else {
                continue;
            };
            destroyed += sweep_one(broker, tenant, exchange, cutoff).await?;
        }
    }
    Ok(destroyed)
}

async fn sweep_one(
    broker: &Broker,
    tenant: TenantId,
    exchange: ExchangeId,
    cutoff: time::OffsetDateTime,
) -> Result<usize, BrokerError> {
    let path = broker.vault_path(tenant, exchange);
    // Versions first, then the row: a version not referenced now is never
    // referenced later (rotations only ever point at new versions).
    let versions = broker.secrets().versions(&path).await?;
    if versions.is_empty() {
        return Ok(0);
    }
    let row = broker.metadata().get(tenant, exchange).await?;
    let keep: BTreeSet<u64> = row
        .iter()
        .flat_map(|r| std::iter::once(r.current_version).chain(r.previous_version))
        .collect();
    let due: Vec<u64> = versions
        .iter()
        .filter(|v| !v.destroyed && !keep.contains(&v.version) && v.created_at < cutoff)
        .map(|v| v.version)
        .collect();
    if !due.is_empty() {
        broker.audit_before(AuditRecord::system(
            "orphan-sweep",
            "DestroyUnreferencedVersions",
            tenant,
            exchange,
            due.clone(),
        ))?;
        broker.secrets().destroy_versions(&path, &due).await?;
        tracing::info!(%tenant, %exchange, versions = ?due, "destroyed Vault versions no credential references");
        broker.audit_system(&AuditRecord::system(
            "orphan-sweep",
            "DestroyUnreferencedVersions",
            tenant,
            exchange,
            due.clone(),
        ));
    }
    let all_gone = versions
        .iter()
        .all(|v| v.destroyed || due.contains(&v.version));
    if row.is_none() && all_gone {
        broker.secrets().purge(&path).await?;
        tracing::info!(%tenant, %exchange, "removed a Vault path no credential references");
    }
    Ok(due.len())
}

/// Runs the job on `schedule` until cancelled: retires due overlaps, prunes
/// events older than `retention`, and sweeps orphans older than `grace`.
pub async fn task_main(
    broker: Arc<Broker>,
    schedule: Schedule,
    retention: time::Duration,
    grace: time::Duration,
    cancel: CancellationToken,
) {
    let Schedule::Every { retire, sweep } = schedule else {
        return cancel.cancelled().await;
    };
    let mut retire_tick = tokio::time::interval(retire);
    let mut sweep_tick = tokio::time::interval(sweep);
    retire_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    sweep_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first sweep waits a full period: a replica that restarts often
    // does not sweep on every start.
    sweep_tick.tick().await;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = retire_tick.tick() => retire_and_prune(&broker, retention).await,
            _ = sweep_tick.tick() => match sweep_orphans(&broker, grace).await {
                Ok(n) => tracing::debug!(destroyed = n, "orphan sweep done"),
                Err(e) => tracing::warn!("orphan sweep failed, retrying next period: {e}"),
            },
        }
    }
}

async fn retire_and_prune(broker: &Broker, retention: time::Duration) {
    loop {
        match retire_once(broker).await {
            Ok(n) if n == BATCH as usize => continue,
            Ok(_) => break,
            Err(e) => {
                tracing::warn!("overlap retire pass failed, retrying next period: {e}");
                break;
            }
        }
    }
    let before = broker.clock().now() - retention;
    match broker.metadata().prune_events(before).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(pruned = n, "pruned events past retention"),
        Err(e) => tracing::warn!("event pruning failed, retrying next period: {e}"),
    }
}
