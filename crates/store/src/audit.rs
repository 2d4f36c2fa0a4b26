//! The audit log's tables: shipping (binary COPY into day partitions),
//! anchors, the tenant's view, export, `verify`'s read, and retention
//! (whole days dropped, the cut remembered per chain).

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
};

use deadpool_postgres::GenericClient as _;
use time::{Date, OffsetDateTime, Time};
use tokio_postgres::{Row, binary_copy::BinaryCopyInWriter, error::SqlState, types::Type};
use tracing::Instrument as _;

use credbroker_core::broker::{
    error::MetadataStoreError,
    ports::{AuditChain, AuditRow, ChangedBy},
    types::{CredentialEvent, TenantId},
};

use super::{EVENT_COLS, PgMetadataStore, Scope, pg_err, row_to_event, to_i64, to_u64};

const AUDIT_COLS: &str = "id, chain_id, seq, prev_hash, hash, at, tenant_id, body";
/// Taken (per transaction) by whoever creates or drops partitions, so two
/// replicas never race on the same DDL.
const PARTITION_LOCK: i64 = 0x6372_6564_6175_6474; // "credaudt"
/// Days ahead whose partitions exist before their first record.
const DAYS_AHEAD: i64 = 2;

/// The UTC days the store knows have a partition (so a batch checks the
/// catalog only on a day it has not shipped to yet).
#[derive(Clone, Default)]
pub(crate) struct KnownDays(Arc<Mutex<BTreeSet<Date>>>);

impl KnownDays {
    fn missing(&self, days: &BTreeSet<Date>) -> BTreeSet<Date> {
        let known = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        days.difference(&known).copied().collect()
    }

    fn add(&self, days: &BTreeSet<Date>) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(days);
    }

    fn forget(&self) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }
}

fn day_of(at: OffsetDateTime) -> Date {
    at.to_offset(time::UtcOffset::UTC).date()
}

fn partition_name(day: Date) -> String {
    format!(
        "audit_log_p{:04}{:02}{:02}",
        day.year(),
        u8::from(day.month()),
        day.day()
    )
}

fn start_of(day: Date) -> OffsetDateTime {
    day.with_time(Time::MIDNIGHT).assume_utc()
}

pub(crate) fn row_to_audit(row: &Row) -> AuditRow {
    AuditRow {
        id: row.get("id"),
        chain_id: row.get("chain_id"),
        seq: to_u64(row.get("seq")),
        prev_hash: row.get("prev_hash"),
        hash: row.get("hash"),
        at: row.get("at"),
        tenant: row
            .get::<_, Option<uuid::Uuid>>("tenant_id")
            .map(TenantId::new),
        body: row.get("body"),
    }
}

/// A committed change whose call's outcome record is not in the trail
/// (its request record is).
#[derive(Clone, Debug, PartialEq)]
pub struct LostOutcome {
    /// The change, as the event log has it.
    pub event: CredentialEvent,
    /// Who made it, in which call.
    pub by: ChangedBy,
}

/// Why a COPY failed: no connection, or PostgreSQL's answer.
enum CopyError {
    Pool(MetadataStoreError),
    Pg(tokio_postgres::Error),
}

impl CopyError {
    fn is(&self, code: &SqlState) -> bool {
        matches!(self, Self::Pg(e) if e.code() == Some(code))
    }
}

impl From<tokio_postgres::Error> for CopyError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Pg(e)
    }
}

/// What retention removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Day partitions dropped.
    pub days: usize,
    /// Chains whose start moved (one cut recorded each).
    pub chains: usize,
}

impl PgMetadataStore {
    /// Ships a batch: one binary `COPY` into the day partitions. A batch
    /// re-sent after a crash collides on the key; it is then inserted with
    /// `ON CONFLICT DO NOTHING`, which adds only what is missing.
    pub(crate) async fn ship_audit_rows(
        &self,
        rows: Vec<AuditRow>,
    ) -> Result<(), MetadataStoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let days: BTreeSet<Date> = rows.iter().map(|r| day_of(r.at)).collect();
        self.ensure_partitions(&days).await?;
        let span = tracing::info_span!(
            "postgres",
            otel.name = "ship_audit",
            otel.kind = "client",
            db.system = "postgresql",
            db.operation = "ship_audit",
            records = rows.len(),
        );
        let mut copied = self.copy_audit(&rows).instrument(span.clone()).await;
        if copied
            .as_ref()
            .is_err_and(|e| e.is(&SqlState::CHECK_VIOLATION))
        {
            // No partition for a day: one was dropped (retention) after
            // this store saw it. Look again and retry once.
            self.partitions.forget();
            self.ensure_partitions(&days).await?;
            copied = self.copy_audit(&rows).instrument(span.clone()).await;
        }
        match copied {
            Ok(()) => Ok(()),
            Err(e) if e.is(&SqlState::UNIQUE_VIOLATION) => {
                self.insert_audit_missing(rows).instrument(span).await
            }
            Err(CopyError::Pool(e)) => Err(e),
            Err(CopyError::Pg(e)) => Err(pg_err(e)),
        }
    }

    async fn copy_audit(&self, rows: &[AuditRow]) -> Result<(), CopyError> {
        let mut client = self
            .pool
            .get()
            .await
            .map_err(|e| CopyError::Pool(MetadataStoreError::Unavailable(e.to_string())))?;
        let tx = client.transaction().await?;
        tx.execute("SELECT set_config('role', 'credbroker_system', true)", &[])
            .await?;
        let sink = tx
            .copy_in(&format!("COPY audit_log ({AUDIT_COLS}) FROM STDIN BINARY"))
            .await?;
        let writer = BinaryCopyInWriter::new(
            sink,
            &[
                Type::UUID,
                Type::UUID,
                Type::INT8,
                Type::TEXT,
                Type::TEXT,
                Type::TIMESTAMPTZ,
                Type::UUID,
                Type::TEXT,
            ],
        );
        futures::pin_mut!(writer);
        for r in rows {
            let tenant = r.tenant.map(|t| t.as_uuid());
            writer
                .as_mut()
                .write(&[
                    &r.id,
                    &r.chain_id,
                    &to_i64(r.seq),
                    &r.prev_hash,
                    &r.hash,
                    &r.at,
                    &tenant,
                    &r.body,
                ])
                .await?;
        }
        writer.finish().await?;
        tx.commit().await?;
        Ok(())
    }

    /// The slow path for a re-sent batch: only the records not yet there.
    async fn insert_audit_missing(&self, rows: Vec<AuditRow>) -> Result<(), MetadataStoreError> {
        let n = rows.len();
        let mut cols = AuditColumns::with_capacity(n);
        for r in rows {
            cols.push(r);
        }
        let AuditColumns {
            ids,
            chains,
            seqs,
            prevs,
            hashes,
            ats,
            tenants,
            bodies,
        } = cols;
        self.in_tx("ship_audit_resent", Scope::System, |tx| {
            Box::pin(async move {
                tx.execute(
                    "INSERT INTO audit_log (id, chain_id, seq, prev_hash, hash, at, tenant_id, body) \
                     SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::bigint[], $4::text[], $5::text[], \
                                          $6::timestamptz[], $7::uuid[], $8::text[]) \
                     ON CONFLICT (chain_id, seq, at) DO NOTHING",
                    &[&ids, &chains, &seqs, &prevs, &hashes, &ats, &tenants, &bodies],
                )
                .await
                .map_err(pg_err)?;
                Ok(())
            })
        })
        .await
    }

    /// Creates the partitions of `days` that do not exist yet (and of the
    /// days up to [`DAYS_AHEAD`] after the last), as the schema's owner.
    ///
    /// # Errors
    /// When PostgreSQL cannot be reached or refuses the DDL.
    pub async fn ensure_partitions(&self, days: &BTreeSet<Date>) -> Result<(), MetadataStoreError> {
        let mut missing = self.partitions.missing(days);
        if missing.is_empty() {
            return Ok(());
        }
        if let Some(last) = missing.last().copied() {
            missing
                .extend((1..=DAYS_AHEAD).filter_map(|d| last.checked_add(time::Duration::days(d))));
        }
        let wanted = missing.clone();
        self.in_tx("audit_partitions", Scope::Owner, |tx| {
            Box::pin(async move {
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PARTITION_LOCK])
                    .await
                    .map_err(pg_err)?;
                for day in wanted {
                    let (from, to) = (start_of(day), start_of(day.next_day().unwrap_or(day)));
                    // DDL takes no bind parameters: the bounds are formatted
                    // from dates, never from input.
                    tx.batch_execute(&format!(
                        "CREATE TABLE IF NOT EXISTS {} PARTITION OF audit_log \
                         FOR VALUES FROM ('{}') TO ('{}')",
                        partition_name(day),
                        iso(from),
                        iso(to),
                    ))
                    .await
                    .map_err(pg_err)?;
                }
                Ok(())
            })
        })
        .await?;
        self.partitions.add(&missing);
        Ok(())
    }

    /// Retention: drops every day partition that ends at or before
    /// `before`, after recording, for each chain that loses records, the
    /// last record removed (`audit_retention`), so `verify` checks the
    /// chain from the oldest retained record on. A chain's records straddle
    /// a midnight by a few microseconds (a record's time is taken before
    /// its place in the chain), so retained records at or below a cut are
    /// removed with it: every chain stays contiguous.
    ///
    /// # Errors
    /// When PostgreSQL cannot be reached or refuses the DDL.
    pub async fn prune_audit(&self, before: OffsetDateTime) -> Result<Pruned, MetadataStoreError> {
        let pruned = self
            .in_tx("audit_retention", Scope::Owner, |tx| {
                Box::pin(async move {
                    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PARTITION_LOCK])
                        .await
                        .map_err(pg_err)?;
                    let parts = tx
                        .query(
                            "SELECT c.relname FROM pg_inherits i \
                             JOIN pg_class c ON c.oid = i.inhrelid \
                             WHERE i.inhparent = 'audit_log'::regclass ORDER BY c.relname",
                            &[],
                        )
                        .await
                        .map_err(pg_err)?;
                    let old: Vec<String> = parts
                        .iter()
                        .map(|r| r.get::<_, String>(0))
                        .filter(|name| {
                            parse_partition(name)
                                .and_then(Date::next_day)
                                .is_some_and(|end| start_of(end) <= before)
                        })
                        .collect();
                    if old.is_empty() {
                        return Ok(Pruned::default());
                    }
                    let union = old
                        .iter()
                        .map(|p| format!("SELECT chain_id, seq, hash FROM {p}"))
                        .collect::<Vec<_>>()
                        .join(" UNION ALL ");
                    let cuts = tx
                        .query(
                            &format!(
                                "SELECT DISTINCT ON (chain_id) chain_id, seq, hash FROM ({union}) d \
                                 ORDER BY chain_id, seq DESC"
                            ),
                            &[],
                        )
                        .await
                        .map_err(pg_err)?;
                    for cut in &cuts {
                        let (chain, seq, hash): (uuid::Uuid, i64, String) =
                            (cut.get(0), cut.get(1), cut.get(2));
                        tx.execute(
                            "INSERT INTO audit_retention (chain_id, seq, hash) VALUES ($1, $2, $3) \
                             ON CONFLICT DO NOTHING",
                            &[&chain, &seq, &hash],
                        )
                        .await
                        .map_err(pg_err)?;
                        tx.execute(
                            "DELETE FROM audit_log WHERE chain_id = $1 AND seq <= $2",
                            &[&chain, &seq],
                        )
                        .await
                        .map_err(pg_err)?;
                    }
                    for p in &old {
                        tx.batch_execute(&format!("DROP TABLE {p}"))
                            .await
                            .map_err(pg_err)?;
                    }
                    Ok(Pruned {
                        days: old.len(),
                        chains: cuts.len(),
                    })
                })
            })
            .await?;
        if pruned.days > 0 {
            self.partitions.forget();
        }
        Ok(pruned)
    }

    /// Every audit chain with its records in seq order, its anchors and its
    /// retention cut, for `credbroker audit verify` (all tenants).
    ///
    /// # Errors
    /// When PostgreSQL cannot be read.
    pub async fn audit_chains(&self) -> Result<Vec<AuditChain>, MetadataStoreError> {
        self.in_tx("audit_chains", Scope::System, |tx| {
            Box::pin(async move {
                let rows = tx
                    .query(
                        &format!("SELECT {AUDIT_COLS} FROM audit_log ORDER BY chain_id, seq"),
                        &[],
                    )
                    .await
                    .map_err(pg_err)?;
                let anchors = tx
                    .query(
                        "SELECT chain_id, seq, hash FROM audit_anchors ORDER BY chain_id, seq",
                        &[],
                    )
                    .await
                    .map_err(pg_err)?;
                let cuts = tx
                    .query(
                        "SELECT DISTINCT ON (chain_id) chain_id, seq, hash FROM audit_retention \
                         ORDER BY chain_id, seq DESC",
                        &[],
                    )
                    .await
                    .map_err(pg_err)?;
                let mut out: Vec<AuditChain> = Vec::new();
                for r in rows.iter().map(row_to_audit) {
                    match out.last_mut() {
                        Some(c) if c.chain_id == r.chain_id => c.rows.push(r),
                        _ => out.push(AuditChain {
                            chain_id: r.chain_id,
                            rows: vec![r],
                            ..AuditChain::default()
                        }),
                    }
                }
                for a in &anchors {
                    chain_of(&mut out, a.get(0))
                        .anchors
                        .push((to_u64(a.get(1)), a.get::<_, String>(2)));
                }
                for c in &cuts {
                    chain_of(&mut out, c.get(0)).cut =
                        Some((to_u64(c.get(1)), c.get::<_, String>(2)));
                }
                Ok(out)
            })
        })
        .await
    }

    /// Audit records for export, oldest first, optionally of one tenant and
    /// within [since, until).
    ///
    /// # Errors
    /// When PostgreSQL cannot be read.
    pub async fn audit_export(
        &self,
        tenant: Option<TenantId>,
        since: Option<OffsetDateTime>,
        until: Option<OffsetDateTime>,
    ) -> Result<Vec<AuditRow>, MetadataStoreError> {
        self.in_tx("audit_export", Scope::System, |tx| {
            Box::pin(async move {
                let rows = tx
                    .query(
                        &format!(
                            "SELECT {AUDIT_COLS} FROM audit_log WHERE ($1::uuid IS NULL OR tenant_id = $1) \
                             AND ($2::timestamptz IS NULL OR at >= $2) AND ($3::timestamptz IS NULL OR at < $3) \
                             ORDER BY at, id"
                        ),
                        &[&tenant.map(|t| t.as_uuid()), &since, &until],
                    )
                    .await
                    .map_err(pg_err)?;
                Ok(rows.iter().map(row_to_audit).collect())
            })
        })
        .await
    }

    /// The changes committed in [`from`, `to`) by calls whose request
    /// record is in `chain_id` but whose outcome record is in no chain:
    /// what a crash lost while the outcome waited (its spool could not be
    /// written). A call's records are at most `window` older than its
    /// event.
    ///
    /// # Errors
    /// When PostgreSQL cannot be read.
    pub async fn lost_outcomes(
        &self,
        chain_id: uuid::Uuid,
        from: OffsetDateTime,
        to: OffsetDateTime,
        window: time::Duration,
    ) -> Result<Vec<LostOutcome>, MetadataStoreError> {
        self.in_tx("audit_lost_outcomes", Scope::System, |tx| {
            Box::pin(async move {
                // A call's records are the tenant's, from `window` before its
                // event to the event, and name the request id in their body
                // (the body is what the chain covers; no column repeats it).
                let rows = tx
                    .query(
                        &format!(
                            "SELECT {EVENT_COLS}, actor, request_id FROM credential_events e \
                             WHERE e.request_id IS NOT NULL AND e.occurred_at >= $2 AND e.occurred_at < $3 \
                             AND EXISTS (SELECT 1 FROM audit_log q WHERE q.tenant_id = e.tenant_id \
                                 AND q.at >= e.occurred_at - make_interval(secs => $4) AND q.at <= e.occurred_at AND q.chain_id = $1 \
                                 AND q.body LIKE '%\"request_id\":\"' || e.request_id || '\"%' \
                                 AND q.body LIKE '%\"result\":\"requested\"%') \
                             AND NOT EXISTS (SELECT 1 FROM audit_log o WHERE o.tenant_id = e.tenant_id \
                                 AND o.at >= e.occurred_at - make_interval(secs => $4) AND o.at <= e.occurred_at \
                                 AND o.body LIKE '%\"request_id\":\"' || e.request_id || '\"%' \
                                 AND o.body NOT LIKE '%\"result\":\"requested\"%') \
                             ORDER BY e.seq"
                        ),
                        &[&chain_id, &from, &to, &window.as_seconds_f64()],
                    )
                    .await
                    .map_err(pg_err)?;
                rows.iter()
                    .map(|r| {
                        Ok(LostOutcome {
                            event: row_to_event(r)?,
                            by: ChangedBy {
                                actor: r.get::<_, Option<String>>("actor").unwrap_or_default(),
                                request_id: r.get("request_id"),
                            },
                        })
                    })
                    .collect()
            })
        })
        .await
    }

    pub(crate) async fn anchor_audit_head(
        &self,
        chain_id: uuid::Uuid,
        seq: u64,
        hash: &str,
    ) -> Result<(), MetadataStoreError> {
        let hash = hash.to_owned();
        self.in_tx("anchor_audit", Scope::System, |tx| {
            Box::pin(async move {
                tx.execute(
                    "INSERT INTO audit_anchors (chain_id, seq, hash) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                    &[&chain_id, &to_i64(seq), &hash],
                )
                .await
                .map_err(pg_err)?;
                Ok(())
            })
        })
        .await
    }

    /// A tenant's records, newest first, through the tenant's view.
    pub(crate) async fn list_tenant_audit(
        &self,
        tenant: TenantId,
        before: Option<(OffsetDateTime, uuid::Uuid)>,
        since: Option<OffsetDateTime>,
        limit: u32,
    ) -> Result<Vec<AuditRow>, MetadataStoreError> {
        self.in_tx("list_audit", Scope::Tenant(tenant), |tx| {
            Box::pin(async move {
                let rows = tx
                    .query(
                        &format!(
                            "SELECT {AUDIT_COLS} FROM tenant_audit_log WHERE tenant_id = $1 \
                             AND ($2::timestamptz IS NULL OR (at, id) < ($2, $3)) \
                             AND ($4::timestamptz IS NULL OR at >= $4) \
                             ORDER BY at DESC, id DESC LIMIT $5"
                        ),
                        &[
                            &tenant.as_uuid(),
                            &before.map(|b| b.0),
                            &before.map_or(uuid::Uuid::nil(), |b| b.1),
                            &since,
                            &i64::from(limit),
                        ],
                    )
                    .await
                    .map_err(pg_err)?;
                Ok(rows.iter().map(row_to_audit).collect())
            })
        })
        .await
    }
}

/// The chain `id` of `chains`, added when it has no records left.
fn chain_of(chains: &mut Vec<AuditChain>, id: uuid::Uuid) -> &mut AuditChain {
    let i = chains
        .iter()
        .position(|c| c.chain_id == id)
        .unwrap_or_else(|| {
            chains.push(AuditChain {
                chain_id: id,
                ..AuditChain::default()
            });
            chains.len() - 1
        });
    &mut chains[i]
}

/// A batch as one array per column (the `unnest` insert).
struct AuditColumns {
    ids: Vec<uuid::Uuid>,
    chains: Vec<uuid::Uuid>,
    seqs: Vec<i64>,
    prevs: Vec<String>,
    hashes: Vec<String>,
    ats: Vec<OffsetDateTime>,
    tenants: Vec<Option<uuid::Uuid>>,
    bodies: Vec<String>,
}

impl AuditColumns {
    fn with_capacity(n: usize) -> Self {
        Self {
            ids: Vec::with_capacity(n),
            chains: Vec::with_capacity(n),
            seqs: Vec::with_capacity(n),
            prevs: Vec::with_capacity(n),
            hashes: Vec::with_capacity(n),
            ats: Vec::with_capacity(n),
            tenants: Vec::with_capacity(n),
            bodies: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, r: AuditRow) {
        self.ids.push(r.id);
        self.chains.push(r.chain_id);
        self.seqs.push(to_i64(r.seq));
        self.prevs.push(r.prev_hash);
        self.hashes.push(r.hash);
        self.ats.push(r.at);
        self.tenants.push(r.tenant.map(|t| t.as_uuid()));
        self.bodies.push(r.body);
    }
}

fn iso(at: OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The day of a partition's name (`audit_log_pYYYYMMDD`).
fn parse_partition(name: &str) -> Option<Date> {
    let digits = name.strip_prefix("audit_log_p")?;
    if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (y, m, d) = (
        digits[..4].parse().ok()?,
        digits[4..6].parse::<u8>().ok()?,
        digits[6..].parse().ok()?,
    );
    Date::from_calendar_date(y, time::Month::try_from(m).ok()?, d).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names_round_trip() {
        let day = time::macros::date!(2026 - 03 - 09);
        assert_eq!(partition_name(day), "audit_log_p20260309");
        assert_eq!(parse_partition(&partition_name(day)), Some(day));
        assert_eq!(parse_partition("audit_log_p2026030"), None);
        assert_eq!(parse_partition("audit_log_v8"), None);
        assert_eq!(parse_partition("audit_log_p20261399"), None);
    }

    #[test]
    fn a_day_is_taken_in_utc() {
        let at = time::macros::datetime!(2026-12-04 23:30 -02:00);
        assert_eq!(day_of(at), time::macros::date!(2026 - 12 - 05));
        assert_eq!(
            iso(start_of(time::macros::date!(2026 - 12 - 05))),
            "2026-12-05T00:00:00Z"
        );
    }
}
