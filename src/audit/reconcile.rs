//! Outcome records a crash lost. A call that changes state writes its
//! request record before any effect and its outcome record after; should
//! the outcome record fail (the spool could not be written), it waits in
//! memory for the spool's recovery, and a crash meanwhile loses it. The
//! event log still has the change, with the call's request id: after each
//! shipping pass (at most every [`EVERY`]) this replica looks for changes
//! committed by calls whose request record is in its own chain and whose
//! outcome record is in no chain, and writes that outcome from the event
//! (`result: success`, the committed version, `grpc_code: UNKNOWN`: what
//! the caller heard is not known).
//!
//! Only changes older than [`WINDOW`] are looked at (a call still running
//! has not written its outcome yet), from where the last look ended (kept
//! in the spool's directory, so a restart resumes there), and only while
//! the spool writes and keeps nothing waiting (a waiting outcome is not
//! lost).

use std::{
    path::Path,
    time::{Duration, Instant},
};

use time::OffsetDateTime;

use super::{AuditRecord, AuditSink as _, spool::Spool};
use crate::{
    broker::types::EventKind,
    clock::Clock,
    store::{LostOutcome, PgMetadataStore},
};

/// How long a call may take, from its records to its event: changes
/// younger than this are not looked at yet.
pub const WINDOW: time::Duration = time::Duration::minutes(10);
/// How often to look at most.
pub const EVERY: Duration = Duration::from_secs(60);
/// Where the last look ended (Unix nanoseconds), in the spool's directory.
const HORIZON: &str = "reconciled";

/// Looks after shipping passes, at most every [`EVERY`].
pub struct Reconciler {
    store: std::sync::Arc<PgMetadataStore>,
    clock: std::sync::Arc<dyn Clock>,
    last: Option<Instant>,
}

impl Reconciler {
    /// A reconciler reading `store` on `clock`'s time.
    pub fn new(store: std::sync::Arc<PgMetadataStore>, clock: std::sync::Arc<dyn Clock>) -> Self {
        Self {
            store,
            clock,
            last: None,
        }
    }
}

#[async_trait::async_trait]
impl super::ship::AfterPass for Reconciler {
    /// After a shipping pass that shipped everything: looks when due.
    async fn after_pass(&mut self, spool: &Spool) {
        if self.last.is_some_and(|t| t.elapsed() < EVERY) {
            return;
        }
        self.last = Some(Instant::now());
        match reconcile_once(spool, &self.store, self.clock.now()).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                records = n,
                "wrote the outcome records of committed changes whose records a crash lost"
            ),
            Err(e) => tracing::warn!("audit reconciliation: will retry: {e:#}"),
        }
    }
}

/// One look at `now`; returns how many outcome records it wrote. The
/// records of every call that ended before this look must be shipped
/// already (call it right after a shipping pass).
///
/// # Errors
/// When PostgreSQL cannot be read or the spool cannot be written.
pub async fn reconcile_once(
    spool: &Spool,
    store: &PgMetadataStore,
    now: OffsetDateTime,
) -> anyhow::Result<usize> {
    if spool.is_broken() || spool.has_deferred() {
        return Ok(0);
    }
    let dir = spool.dir().to_owned();
    let to = now - WINDOW;
    let Some(from) = read_horizon(&dir)? else {
        // A new chain: nothing of it is older.
        write_horizon(&dir, to)?;
        return Ok(0);
    };
    if to <= from {
        return Ok(0);
    }
    let lost = store
        .lost_outcomes(spool.chain_id(), from, to, WINDOW)
        .await?;
    for l in &lost {
        spool.append(&outcome(l, now))?;
    }
    write_horizon(&dir, to)?;
    Ok(lost.len())
}

/// The outcome record of a lost call, from its event.
pub fn outcome(l: &LostOutcome, now: OffsetDateTime) -> AuditRecord {
    let (action, versions) = match l.event.kind {
        EventKind::Stored => ("ValidateAndStore", vec![l.event.version]),
        EventKind::Rotated => ("Rotate", vec![l.event.version]),
        EventKind::Deleted => ("DeleteCredentials", Vec::new()),
        EventKind::Invalidated => ("ValidateCredentials", vec![l.event.version]),
        EventKind::PreviousExpired => ("RetirePreviousVersion", vec![l.event.version]),
    };
    // `subject (role)`, as the event records the actor.
    let (user, role) =
        l.by.actor
            .rsplit_once(" (")
            .and_then(|(s, r)| Some((s.to_owned(), r.strip_suffix(')')?.to_owned())))
            .unwrap_or_else(|| (l.by.actor.clone(), "unknown".to_owned()));
    AuditRecord {
        id: uuid::Uuid::now_v7(),
        timestamp: now,
        event_type: if role == "system" {
            "system"
        } else {
            "secret_write"
        }
        .into(),
        user,
        role: role.into(),
        resource: l.event.exchange.audit_resource().into(),
        action: action.into(),
        result: "success".into(),
        ip_address: None,
        user_agent: None,
        tenant_id: Some(l.event.tenant),
        exchange: Some(l.event.exchange),
        versions,
        request_id: l.by.request_id.unwrap_or_default(),
        trace_id: None,
        grpc_code: "UNKNOWN".into(),
        duration_ms: 0.0,
        key_hint: None,
        count: None,
    }
}

fn read_horizon(dir: &Path) -> std::io::Result<Option<OffsetDateTime>> {
    match std::fs::read_to_string(dir.join(HORIZON)) {
        Ok(s) => {
            let nanos: i128 = s.trim().parse().map_err(std::io::Error::other)?;
            OffsetDateTime::from_unix_timestamp_nanos(nanos)
                .map(Some)
                .map_err(std::io::Error::other)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Records where the last look ended.
///
/// # Errors
/// When the file cannot be written.
pub fn write_horizon(dir: &Path, at: OffsetDateTime) -> std::io::Result<()> {
    super::spool::write_atomic(
        &dir.join(HORIZON),
        at.unix_timestamp_nanos().to_string().as_bytes(),
    )
}
