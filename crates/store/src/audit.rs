//! The audit log's tables: shipping (each batch one page per tenant, by
//! binary COPY into day partitions), anchors, the tenant's view, export,
//! `verify`'s read, retention (whole days dropped, the cut remembered per
//! chain) and the lost-outcome query.
//!
//! A page is one row holding the records of one chain, one tenant, one
//! batch and one UTC day, one per line: `<seq> <hash> <body>` (the body
//! holds the record's id and time; a record's `prev_hash` is the hash of
//! the one before it in its chain). Its columns (chain, first and last
//! seq, count, time span, tenant) serve the indexes and partitions;
//! `verify` checks each against the records it holds.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::Write as _,
    sync::{Arc, Mutex},
};

use deadpool_postgres::GenericClient as _;
use time::{Date, OffsetDateTime, Time};
use tokio_postgres::{Row, binary_copy::BinaryCopyInWriter, error::SqlState, types::Type};
use tracing::Instrument as _;

use credbroker_core::broker::{
    error::MetadataStoreError,
    ports::{AuditChain, AuditLog, AuditRow, ChangedBy},
    types::{CredentialEvent, TenantId},
};

use super::{
    PgMetadataStore, Scope,
    events::{EVENT_COLS, row_to_event},
    pg_err, to_i64, to_u64,
};

const PAGE_COLS: &str = "chain_id, first_seq, last_seq, records, at_min, at_max, tenant_id, lines";
/// Taken (per transaction) by whoever creates or drops partitions, so two
/// replicas never race on the same DDL.
const PARTITION_LOCK: i64 = 0x6372_6564_6175_6474; // "credaudt"
/// Days ahead whose partitions exist before their first record.
const DAYS_AHEAD: i64 = 2;
/// Pages read per round trip when paging a tenant's records.
const PAGES_PER_READ: i64 = 32;

/// State the store's clones share (behind one lock, taken briefly).
#[derive(Default)]
pub(crate) struct Shared<T>(Arc<Mutex<T>>);

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T> Shared<T> {
    fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        f(&mut self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }
}

/// The UTC days the store knows have a partition (so a batch checks the
/// catalog only on a day it has not shipped to yet).
pub(crate) type KnownDays = Shared<BTreeSet<Date>>;

/// The highest seq of each chain already in PostgreSQL, as this store
/// last saw it (so a batch re-sent after a crash adds nothing twice: its
/// records up to there are skipped).
pub(crate) type ShippedThrough = Shared<HashMap<uuid::Uuid, u64>>;

fn day_of(at: OffsetDateTime) -> Date {
    at.to_offset(time::UtcOffset::UTC).date()
}

fn partition_name(day: Date) -> String {
    format!(
        "audit_pages_p{:04}{:02}{:02}",
        day.year(),
        u8::from(day.month()),
        day.day()
    )
}

fn start_of(day: Date) -> OffsetDateTime {
    day.with_time(Time::MIDNIGHT).assume_utc()
}

/// One page: the records of one chain, one tenant, one batch, one day.
struct Page {
    chain_id: uuid::Uuid,
    first_seq: u64,
    last_seq: u64,
    records: i32,
    at_min: OffsetDateTime,
    at_max: OffsetDateTime,
    tenant: Option<uuid::Uuid>,
    lines: String,
}

impl Page {
    fn new(r: &AuditRow) -> Self {
        Self {
            chain_id: r.chain_id,
            first_seq: r.seq,
            last_seq: r.seq,
            records: 0,
            at_min: r.at,
            at_max: r.at,
            tenant: r.tenant.map(|t| t.as_uuid()),
            lines: String::with_capacity(64 * 1024),
        }
    }

    fn push(&mut self, r: &AuditRow) {
        self.first_seq = self.first_seq.min(r.seq);
        self.last_seq = self.last_seq.max(r.seq);
        self.at_min = self.at_min.min(r.at);
        self.at_max = self.at_max.max(r.at);
        self.records += 1;
        if !self.lines.is_empty() {
            self.lines.push('\n');
        }
        let _ = write!(self.lines, "{} {} ", r.seq, r.hash);
        self.lines.push_str(&r.body);
    }
}

/// A batch as pages: one per tenant and UTC day (a page never straddles
/// a partition), records in seq order.
fn pages_of(rows: &[AuditRow]) -> Vec<Page> {
    let mut pages: BTreeMap<(uuid::Uuid, Option<uuid::Uuid>, Date), Page> = BTreeMap::new();
    for r in rows {
        pages
            .entry((r.chain_id, r.tenant.map(|t| t.as_uuid()), day_of(r.at)))
            .or_insert_with(|| Page::new(r))
            .push(r);
    }
    pages.into_values().collect()
}

/// The records of a stored page, and the first of its columns that
/// disagrees with them (`None` when all agree). Each record's tenant is the
/// page's `tenant_id` column, so a page moved to another tenant shows as
/// records whose tenant disagrees with their hashed body.
fn unpack(row: &Row) -> (Vec<AuditRow>, Option<&'static str>) {
    let chain_id: uuid::Uuid = row.get("chain_id");
    let tenant = row
        .get::<_, Option<uuid::Uuid>>("tenant_id")
        .map(TenantId::new);
    let lines: &str = row.get("lines");
    let mut out = Vec::new();
    let mut unreadable = false;
    for line in lines.split('\n') {
        match parse_line(chain_id, tenant, line) {
            Some(r) => out.push(r),
            None => unreadable = true,
        }
    }
    let fault = if unreadable {
        Some("lines")
    } else {
        page_fault(row, &out)
    };
    (out, fault)
}

/// Whether a record's time (nanoseconds) is what PostgreSQL stored of it
/// (microseconds).
fn same_micro(record: Option<OffsetDateTime>, stored: OffsetDateTime) -> bool {
    record.is_some_and(|r| (r - stored).abs() < time::Duration::microseconds(1))
}

fn page_fault(row: &Row, records: &[AuditRow]) -> Option<&'static str> {
    let seqs = records.iter().map(|r| r.seq);
    let ats = records.iter().map(|r| r.at);
    let checks: [(&'static str, bool); 5] = [
        (
            "first_seq",
            seqs.clone().min() == Some(to_u64(row.get("first_seq"))),
        ),
        ("last_seq", seqs.max() == Some(to_u64(row.get("last_seq")))),
        (
            "records",
            usize::try_from(row.get::<_, i32>("records")).ok() == Some(records.len()),
        ),
        ("at_min", same_micro(ats.clone().min(), row.get("at_min"))),
        ("at_max", same_micro(ats.max(), row.get("at_max"))),
    ];
    checks.into_iter().find(|(_, ok)| !ok).map(|(c, _)| c)
}

/// A page's line as a record: its id and time read from its body, its
/// `prev_hash` left empty (the chain's reader fills it in, from the record
/// before).
fn parse_line(chain_id: uuid::Uuid, tenant: Option<TenantId>, line: &str) -> Option<AuditRow> {
    /// The two fields of a body a reader needs.
    #[derive(serde::Deserialize)]
    struct Head {
        id: uuid::Uuid,
        #[serde(with = "time::serde::rfc3339")]
        timestamp: OffsetDateTime,
    }
    let mut f = line.splitn(3, ' ');
    let seq = f.next()?.parse().ok()?;
    let hash = f.next()?.to_owned();
    let body = f.next()?.to_owned();
    let head: Head = serde_json::from_str(&body).ok()?;
    Some(AuditRow {
        id: head.id,
        at: head.timestamp,
        tenant,
        chain_id,
        seq,
        prev_hash: String::new(),
        hash,
        body,
    })
}

/// Fills in each record's `prev_hash` (records in seq order): the hash of
/// the record before it in the chain, the cut's for the first after a
/// retention cut, the genesis for the chain's first. Where a record is
/// missing, the next names none (the gap is what `verify` reports).
fn link(rows: &mut [AuditRow], cut: Option<&(u64, String)>) {
    let (mut prev_seq, mut prev_hash) = cut.map_or_else(
        || (0, credbroker_core::audit::chain::GENESIS.to_owned()),
        |(s, h)| (*s, h.clone()),
    );
    for r in rows {
        r.prev_hash = if r.seq == prev_seq + 1 {
            std::mem::take(&mut prev_hash)
        } else {
            String::new()
        };
        prev_seq = r.seq;
        prev_hash.clone_from(&r.hash);
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
    /// Anchors removed: those naming records at or below a new cut.
    pub anchors: u64,
}

impl PgMetadataStore {
    /// Ships a batch: one page per tenant, by one binary `COPY`. Records a
    /// crash made this store send twice (at or below what PostgreSQL
    /// already holds of the chain) are skipped.
    pub(crate) async fn ship_audit_rows(
        &self,
        mut rows: Vec<AuditRow>,
    ) -> Result<(), MetadataStoreError> {
        let Some(chain) = rows.first().map(|r| r.chain_id) else {
            return Ok(());
        };
        let through = match self.shipped.with(|m| m.get(&chain).copied()) {
            Some(s) => s,
            None => self.chain_head(chain).await?,
        };
        rows.retain(|r| r.chain_id != chain || r.seq > through);
        let Some(last) = rows
            .iter()
            .filter(|r| r.chain_id == chain)
            .map(|r| r.seq)
            .max()
        else {
            return Ok(());
        };
        let days: BTreeSet<Date> = rows.iter().map(|r| day_of(r.at)).collect();
        self.ensure_partitions(&days).await?;
        // Building the pages copies every body once: off the async workers.
        let records = rows.len();
        let pages = tokio::task::spawn_blocking(move || pages_of(&rows))
            .await
            .map_err(|e| MetadataStoreError::Other(format!("building audit pages: {e}")))?;
        let span = tracing::info_span!(
            "postgres",
            otel.name = "ship_audit",
            otel.kind = "client",
            db.system = "postgresql",
            db.operation = "ship_audit",
            records,
            pages = pages.len(),
        );
        let mut copied = self.copy_pages(&pages).instrument(span.clone()).await;
        if copied
            .as_ref()
            .is_err_and(|e| e.is(&SqlState::CHECK_VIOLATION))
        {
            // No partition for a day: one was dropped (retention) after
            // this store saw it. Look again and retry once.
            self.partitions.with(BTreeSet::clear);
            self.ensure_partitions(&days).await?;
            copied = self.copy_pages(&pages).instrument(span).await;
        }
        match copied {
            Ok(()) => {
                self.shipped.with(|m| m.insert(chain, last));
                Ok(())
            }
            Err(e) => {
                // Whether it committed is not known: ask next time.
                self.shipped.with(|m| m.remove(&chain));
                Err(match e {
                    CopyError::Pool(e) => e,
                    CopyError::Pg(e) => pg_err(e),
                })
            }
        }
    }

    /// The highest seq PostgreSQL holds of `chain` (0: none).
    async fn chain_head(&self, chain: uuid::Uuid) -> Result<u64, MetadataStoreError> {
        self.in_tx("audit_chain_head", Scope::System, |tx| {
            Box::pin(async move {
                let row = tx
                    .query_one(
                        "SELECT coalesce(max(last_seq), 0) FROM audit_pages WHERE chain_id = $1",
                        &[&chain],
                    )
                    .await
                    .map_err(pg_err)?;
                Ok(to_u64(row.get(0)))
            })
        })
        .await
    }

    async fn copy_pages(&self, pages: &[Page]) -> Result<(), CopyError> {
        let mut client = self
            .pool
            .get()
            .await
            .map_err(|e| CopyError::Pool(MetadataStoreError::Unavailable(e.to_string())))?;
        let tx = client.transaction().await?;
        tx.execute("SELECT set_config('role', 'credbroker_system', true)", &[])
            .await?;
        let sink = tx
            .copy_in(&format!("COPY audit_pages ({PAGE_COLS}) FROM STDIN BINARY"))
            .await?;
        let writer = BinaryCopyInWriter::new(
            sink,
            &[
                Type::UUID,
                Type::INT8,
                Type::INT8,
                Type::INT4,
                Type::TIMESTAMPTZ,
                Type::TIMESTAMPTZ,
                Type::UUID,
                Type::TEXT,
            ],
        );
        futures::pin_mut!(writer);
        for p in pages {
            writer
                .as_mut()
                .write(&[
                    &p.chain_id,
                    &to_i64(p.first_seq),
                    &to_i64(p.last_seq),
                    &p.records,
                    &p.at_min,
                    &p.at_max,
                    &p.tenant,
                    &p.lines,
                ])
                .await?;
        }
        writer.finish().await?;
        tx.commit().await?;
        Ok(())
    }

    /// Creates the partitions of `days` that do not exist yet (and of the
    /// days up to [`DAYS_AHEAD`] after the last), as the schema's owner.
    ///
    /// # Errors
    /// When PostgreSQL cannot be reached or refuses the DDL.
    pub async fn ensure_partitions(&self, days: &BTreeSet<Date>) -> Result<(), MetadataStoreError> {
        let mut missing: BTreeSet<Date> = self
            .partitions
            .with(|known| days.difference(known).copied().collect());
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
                    // ANALYZE skips the pages' text (a partition does not
                    // take that from its parent).
                    tx.batch_execute(&format!(
                        "CREATE TABLE IF NOT EXISTS {p} PARTITION OF audit_pages \
                         FOR VALUES FROM ('{}') TO ('{}'); \
                         ALTER TABLE {p} ALTER COLUMN lines SET STATISTICS 0",
                        iso(from),
                        iso(to),
                        p = partition_name(day),
                    ))
                    .await
                    .map_err(pg_err)?;
                }
                Ok(())
            })
        })
        .await?;
        self.partitions.with(|known| known.extend(&missing));
        Ok(())
    }

    /// Retention: drops every day partition that ends at or before
    /// `before`, after recording, for each chain that loses records, the
    /// last record removed (`audit_retention`), so `verify` checks the
    /// chain from the record after it. A page holds one tenant's records of
    /// one batch, so records of a chain at or below its cut can remain in
    /// a later day's pages (another tenant's page of the same batch, around
    /// midnight); readers skip them like the removed ones.
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
                             WHERE i.inhparent = 'audit_pages'::regclass ORDER BY c.relname",
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
                    // Each chain's newest page among the days dropped holds
                    // its last removed record.
                    let union = old
                        .iter()
                        .map(|p| format!("SELECT {PAGE_COLS} FROM {p}"))
                        .collect::<Vec<_>>()
                        .join(" UNION ALL ");
                    let newest = tx
                        .query(
                            &format!(
                                "SELECT DISTINCT ON (chain_id) * FROM ({union}) d \
                                 ORDER BY chain_id, last_seq DESC"
                            ),
                            &[],
                        )
                        .await
                        .map_err(pg_err)?;
                    let mut anchors = 0;
                    for page in &newest {
                        let (records, _) = unpack(page);
                        let Some(last) = records.iter().max_by_key(|r| r.seq) else {
                            continue;
                        };
                        tx.execute(
                            "INSERT INTO audit_retention (chain_id, seq, hash) VALUES ($1, $2, $3) \
                             ON CONFLICT DO NOTHING",
                            &[&last.chain_id, &to_i64(last.seq), &last.hash],
                        )
                        .await
                        .map_err(pg_err)?;
                        // Anchors naming removed records go with them
                        // (`verify` skips them; kept, the table grew for
                        // ever). The owner may: row-level security lets it
                        // through as a member of the system role (v1); the
                        // system role itself holds no DELETE privilege.
                        anchors += tx
                            .execute(
                                "DELETE FROM audit_anchors WHERE chain_id = $1 AND seq <= $2",
                                &[&last.chain_id, &to_i64(last.seq)],
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
                        chains: newest.len(),
                        anchors,
                    })
                })
            })
            .await?;
        if pruned.days > 0 {
            self.partitions.with(BTreeSet::clear);
        }
        Ok(pruned)
    }

    /// Every audit chain with its records in seq order (those at or below
    /// its retention cut left out), its anchors, its cut, and the pages
    /// whose columns disagree with their records, for `credbroker audit
    /// verify` (all tenants).
    ///
    /// # Errors
    /// When PostgreSQL cannot be read.
    pub async fn audit_chains(&self) -> Result<Vec<AuditChain>, MetadataStoreError> {
        self.in_tx("audit_chains", Scope::System, |tx| {
            Box::pin(async move {
                let pages = tx
                    .query(
                        &format!(
                            "SELECT {PAGE_COLS} FROM audit_pages ORDER BY chain_id, first_seq"
                        ),
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
                for c in &cuts {
                    chain_of(&mut out, c.get(0)).cut =
                        Some((to_u64(c.get(1)), c.get::<_, String>(2)));
                }
                for page in &pages {
                    let (records, fault) = unpack(page);
                    let chain = chain_of(&mut out, page.get("chain_id"));
                    if let Some(column) = fault {
                        chain.misfiled.push((to_u64(page.get("first_seq")), column));
                    }
                    let after = chain.cut.as_ref().map_or(0, |c| c.0);
                    chain
                        .rows
                        .extend(records.into_iter().filter(|r| r.seq > after));
                }
                for a in &anchors {
                    chain_of(&mut out, a.get(0))
                        .anchors
                        .push((to_u64(a.get(1)), a.get::<_, String>(2)));
                }
                for c in &mut out {
                    c.rows.sort_by_key(|r| r.seq);
                    link(&mut c.rows, c.cut.as_ref());
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
                let pages = tx
                    .query(
                        &format!(
                            "SELECT {PAGE_COLS} FROM audit_pages WHERE ($1::uuid IS NULL OR tenant_id = $1) \
                             AND ($2::timestamptz IS NULL OR at_max >= $2) AND ($3::timestamptz IS NULL OR at_min < $3)"
                        ),
                        &[&tenant.map(|t| t.as_uuid()), &since, &until],
                    )
                    .await
                    .map_err(pg_err)?;
                let mut rows: Vec<AuditRow> = pages
                    .iter()
                    .flat_map(|p| unpack(p).0)
                    .filter(|r| since.is_none_or(|s| r.at >= s) && until.is_none_or(|u| r.at < u))
                    .collect();
                rows.sort_by_key(|r| (r.at, r.id));
                Ok(rows)
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
                let events = tx
                    .query(
                        &format!(
                            "SELECT {EVENT_COLS}, actor, request_id FROM credential_events \
                             WHERE request_id IS NOT NULL AND occurred_at >= $1 AND occurred_at < $2 \
                             ORDER BY seq"
                        ),
                        &[&from, &to],
                    )
                    .await
                    .map_err(pg_err)?;
                let mut lost = Vec::new();
                for e in &events {
                    let (request_id, at): (uuid::Uuid, OffsetDateTime) =
                        (e.get("request_id"), e.get("occurred_at"));
                    // The call's records: its tenant's, from `window` before
                    // its event to the event, naming its request id.
                    let pages = tx
                        .query(
                            &format!(
                                "SELECT {PAGE_COLS} FROM audit_pages WHERE tenant_id = $1 \
                                 AND at_max >= $2 AND at_min <= $3 AND strpos(lines, $4) > 0"
                            ),
                            &[
                                &e.get::<_, uuid::Uuid>("tenant_id"),
                                &(at - window),
                                &at,
                                &format!("\"request_id\":\"{request_id}\""),
                            ],
                        )
                        .await
                        .map_err(pg_err)?;
                    let (mut requested_here, mut outcome) = (false, false);
                    for p in &pages {
                        for r in unpack(p).0 {
                            let Ok(rec) =
                                serde_json::from_str::<credbroker_core::audit::AuditRecord>(&r.body)
                            else {
                                continue;
                            };
                            if rec.request_id != request_id {
                                continue;
                            }
                            if rec.result == "requested" {
                                requested_here |= r.chain_id == chain_id;
                            } else {
                                outcome = true;
                            }
                        }
                    }
                    if requested_here && !outcome {
                        lost.push(LostOutcome {
                            event: row_to_event(e)?,
                            by: ChangedBy {
                                actor: e.get::<_, Option<String>>("actor").unwrap_or_default(),
                                request_id: Some(request_id),
                            },
                        });
                    }
                }
                Ok(lost)
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

    /// A tenant's records, newest first, through the tenant's view: pages
    /// are read newest first until no page left can hold a record newer
    /// than the `limit`-th found.
    pub(crate) async fn list_tenant_audit(
        &self,
        tenant: TenantId,
        before: Option<(OffsetDateTime, uuid::Uuid)>,
        since: Option<OffsetDateTime>,
        limit: u32,
    ) -> Result<Vec<AuditRow>, MetadataStoreError> {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.in_tx("list_audit", Scope::Tenant(tenant), |tx| {
            Box::pin(async move {
                let mut found: Vec<AuditRow> = Vec::new();
                let mut offset = 0i64;
                loop {
                    let pages = tx
                        .query(
                            &format!(
                                "SELECT {PAGE_COLS} FROM tenant_audit_pages WHERE tenant_id = $1 \
                                 AND ($2::timestamptz IS NULL OR at_min <= $2) \
                                 AND ($3::timestamptz IS NULL OR at_max >= $3) \
                                 ORDER BY at_max DESC, chain_id, last_seq LIMIT $4 OFFSET $5"
                            ),
                            &[
                                &tenant.as_uuid(),
                                &before.map(|b| b.0),
                                &since,
                                &PAGES_PER_READ,
                                &offset,
                            ],
                        )
                        .await
                        .map_err(pg_err)?;
                    offset += PAGES_PER_READ;
                    let last = pages.len() < usize::try_from(PAGES_PER_READ).unwrap_or(0);
                    // Pages not read yet hold nothing newer than this.
                    let bound: Option<OffsetDateTime> = pages.last().map(|p| p.get("at_max"));
                    found.extend(pages.iter().flat_map(|p| unpack(p).0).filter(|r| {
                        since.is_none_or(|s| r.at >= s) && before.is_none_or(|b| (r.at, r.id) < b)
                    }));
                    found.sort_by_key(|r| std::cmp::Reverse((r.at, r.id)));
                    let settled =
                        found.len() >= limit && bound.is_some_and(|b| found[limit - 1].at > b);
                    if last || settled {
                        break;
                    }
                }
                found.truncate(limit);
                Ok(found)
            })
        })
        .await
    }
}

#[async_trait::async_trait]
impl AuditLog for PgMetadataStore {
    async fn ship_audit(&self, rows: Vec<AuditRow>) -> Result<(), MetadataStoreError> {
        self.ship_audit_rows(rows).await
    }

    async fn anchor_audit(
        &self,
        chain_id: uuid::Uuid,
        seq: u64,
        hash: &str,
    ) -> Result<(), MetadataStoreError> {
        self.anchor_audit_head(chain_id, seq, hash).await
    }

    async fn list_audit(
        &self,
        tenant: TenantId,
        before: Option<(OffsetDateTime, uuid::Uuid)>,
        since: Option<OffsetDateTime>,
        limit: u32,
    ) -> Result<Vec<AuditRow>, MetadataStoreError> {
        self.list_tenant_audit(tenant, before, since, limit).await
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

fn iso(at: OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The day of a partition's name (`audit_pages_pYYYYMMDD`).
fn parse_partition(name: &str) -> Option<Date> {
    let digits = name.strip_prefix("audit_pages_p")?;
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
        assert_eq!(partition_name(day), "audit_pages_p20260309");
        assert_eq!(parse_partition(&partition_name(day)), Some(day));
        assert_eq!(parse_partition("audit_pages_p2026030"), None);
        assert_eq!(parse_partition("audit_log_v8"), None);
        assert_eq!(parse_partition("audit_pages_p20261399"), None);
    }

    fn row(seq: u64, tenant: Option<TenantId>, at: OffsetDateTime) -> AuditRow {
        let id = uuid::Uuid::now_v7();
        AuditRow {
            id,
            at,
            tenant,
            chain_id: uuid::Uuid::nil(),
            seq,
            prev_hash: String::new(),
            hash: format!("h{seq}"),
            body: format!(
                "{{\"id\":\"{id}\",\"timestamp\":\"{}\",\"n\":{seq}}}",
                iso(at)
            ),
        }
    }

    /// A batch becomes one page per tenant and day, and reads back as the
    /// same records, linked in seq order.
    #[test]
    fn pages_hold_one_tenant_and_day_and_read_back() {
        let (a, b) = (
            Some(TenantId::new(uuid::Uuid::new_v4())),
            Some(TenantId::new(uuid::Uuid::new_v4())),
        );
        let day1 = time::macros::datetime!(2026-12-04 23:59:59 UTC);
        let day2 = time::macros::datetime!(2026-12-05 00:00:01 UTC);
        let rows = vec![
            row(1, a, day1),
            row(2, b, day1),
            row(3, a, day1),
            row(4, a, day2),
            row(5, None, day2),
        ];
        let pages = pages_of(&rows);
        let shape: Vec<(u64, u64, i32)> = pages
            .iter()
            .map(|p| (p.first_seq, p.last_seq, p.records))
            .collect();
        assert_eq!(pages.len(), 4, "{shape:?}");
        let mut back: Vec<AuditRow> = pages
            .iter()
            .flat_map(|p| {
                p.lines
                    .split('\n')
                    .map(|l| parse_line(p.chain_id, p.tenant.map(TenantId::new), l).unwrap())
            })
            .collect();
        back.sort_by_key(|r| r.seq);
        link(&mut back, None);
        assert_eq!(back[0].prev_hash, credbroker_core::audit::chain::GENESIS);
        assert_eq!(back[3].prev_hash, "h3");
        for (got, want) in back.iter().zip(&rows) {
            assert_eq!(
                (got.id, got.at, got.tenant, got.seq, &got.hash, &got.body),
                (
                    want.id,
                    want.at,
                    want.tenant,
                    want.seq,
                    &want.hash,
                    &want.body
                )
            );
        }
        // A missing record leaves the next unlinked (the gap shows).
        back.remove(1);
        link(&mut back, None);
        assert_eq!(back[1].prev_hash, "");
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
