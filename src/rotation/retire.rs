//! The overlap retire job: when a previous version's deadline passes, stop
//! serving it, destroy it in Vault, and emit PREVIOUS_EXPIRED. The deadline
//! lives in the database, so the job survives restarts and any replica can
//! run it (row locks keep two replicas from retiring the same version).

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::broker::Broker;

/// Rows retired per pass.
const BATCH: u32 = 100;

/// Runs one pass; returns how many versions were retired.
///
/// # Errors
/// When the metadata store is unavailable.
pub async fn retire_once(broker: &Broker) -> Result<usize, crate::broker::error::BrokerError> {
    let now = broker.clock().now();
    let retired = broker.metadata().expire_overlaps(now, BATCH).await?;
    let n = retired.len();
    for (path, version, event) in retired {
        // The row no longer references the version, so it is never served
        // again even if the destroy fails; Vault's own version limit then
        // removes it eventually.
        if let Err(e) = broker.secrets().destroy_versions(&path, &[version]).await {
            tracing::warn!(tenant = %event.tenant, exchange = %event.exchange, version, "could not destroy retired version: {e}");
        }
        tracing::info!(tenant = %event.tenant, exchange = %event.exchange, version, "previous version retired");
        broker.apply_event(event);
    }
    Ok(n)
}

/// Retires due overlaps every `every`, and prunes events older than
/// `retention`, until cancelled.
pub async fn task_main(
    broker: Arc<Broker>,
    every: Duration,
    retention: time::Duration,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        loop {
            match retire_once(&broker).await {
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
}
