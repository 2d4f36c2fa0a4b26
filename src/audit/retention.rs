//! The audit log's days in PostgreSQL: each day's partition created ahead
//! of its first record, and, with `audit.retention_days` set, the days
//! older than that dropped whole (the cut remembered per chain, so
//! `credbroker audit verify` checks what is left from its oldest record).

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::{clock::Clock, store::PgMetadataStore};

/// How often the job looks.
pub const EVERY: Duration = Duration::from_secs(3600);

/// One pass: today's partition and the next ones exist; with `keep_days`,
/// every day that ended more than `keep_days` days before `now` (all of
/// whose records are older than that) is dropped.
///
/// # Errors
/// When PostgreSQL cannot be reached or refuses the DDL.
pub async fn run_once(
    store: &PgMetadataStore,
    keep_days: u32,
    now: time::OffsetDateTime,
) -> Result<crate::store::Pruned, crate::broker::error::MetadataStoreError> {
    let today = now.to_offset(time::UtcOffset::UTC).date();
    store.ensure_partitions(&BTreeSet::from([today])).await?;
    if keep_days == 0 {
        return Ok(crate::store::Pruned::default());
    }
    store
        .prune_audit(now - time::Duration::days(i64::from(keep_days)))
        .await
}

/// Runs [`run_once`] at start and every [`EVERY`] until cancelled; a pass
/// that fails is logged and tried again at the next.
pub async fn task_main(
    store: Arc<PgMetadataStore>,
    keep_days: u32,
    clock: Arc<dyn Clock>,
    cancel: CancellationToken,
) {
    loop {
        match run_once(&store, keep_days, clock.now()).await {
            Ok(p) if p.days > 0 => tracing::info!(
                days = p.days,
                chains = p.chains,
                anchors = p.anchors,
                keep_days,
                "audit retention dropped the oldest days"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "audit partitions or retention: will retry"),
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(EVERY) => {}
        }
    }
}
