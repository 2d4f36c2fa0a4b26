//! Ships the spool to the audit log ([`AuditLog`]): reads complete lines
//! from the shipped offset on, hands them over in batches (the store skips
//! what it already holds, so a batch re-sent after a crash adds nothing
//! twice), then records the new offset. Fully shipped segments are removed. While PostgreSQL is away the
//! spool grows (bounded: see [`super::spool`]) and drains when it returns.
//! The shipping task anchors the chain's newest shipped record once it
//! moved, at most every [`ANCHOR_EVERY`] (and on its last pass).

use std::{
    collections::VecDeque,
    io::{Read as _, Seek as _, SeekFrom},
    path::Path,
    sync::Arc,
    time::Duration,
};

use tokio_util::sync::CancellationToken;

use super::spool::{
    ChainedRecord, Fresh, Spool, read_offset, segment_path, segments, write_head, write_offset,
};
use crate::broker::ports::{AuditLog, AuditRow};

/// Lines shipped per batch at most.
const BATCH: usize = 2_000;
/// Records shipped per batch at most when they come from memory (the
/// steady state). PostgreSQL's cost per record falls with the batch (one
/// page per tenant per batch: measured 5.7 µs per record at 500, 3.75 µs
/// at 2,000); the store builds the pages off the async workers, and the
/// pass yields between batches.
const MEMORY_BATCH: usize = 2_000;
/// Bytes read from a segment per batch at most.
const READ_BYTES: usize = 1024 * 1024;

/// The shipping task anchors the chain's head at most this often. An
/// anchor is what catches a rewrite of the chain's tail (the broker's roles
/// can add anchors, never change one), so this is how much of the newest
/// shipped trail such a rewrite could reach unseen. One per pass (every
/// `ship_ms`) added a row and a transaction to every pass under load, in a
/// table only retention prunes.
pub const ANCHOR_EVERY: Duration = Duration::from_secs(1);

/// What one pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Shipped {
    /// Records inserted (or found already there).
    pub records: usize,
    /// The newest record shipped (seq, hash), if any.
    pub head: Option<(u64, String)>,
}

/// Ships what the spool holds now (what is appended meanwhile waits for
/// the next pass), then anchors the newest record shipped.
///
/// # Errors
/// When PostgreSQL or the spool cannot be used; nothing is marked shipped
/// that was not inserted.
pub async fn ship_once(spool: &Spool, meta: &dyn AuditLog) -> anyhow::Result<Shipped> {
    let shipped = ship_pass(spool, meta).await?;
    if let Some((seq, hash)) = &shipped.head {
        meta.anchor_audit(spool.chain_id(), *seq, hash).await?;
    }
    Ok(shipped)
}

/// [`ship_once`] without the anchor (the shipping task anchors on its own
/// schedule: [`Anchoring`]).
///
/// # Errors
/// As [`ship_once`].
async fn ship_pass(spool: &Spool, meta: &dyn AuditLog) -> anyhow::Result<Shipped> {
    let dir = spool.dir().to_owned();
    let from = read_offset(&dir)?;
    let mut at = from;
    // Lines the spool kept in memory as it appended them; their buffer
    // goes back to the spool at the end of the pass.
    let mut fresh = VecDeque::new();
    let result = ship_from(spool, meta, &dir, &mut at, &mut fresh).await;
    spool.recycle(fresh.into());
    // The position is recorded once per pass (and when a segment is left
    // behind), not per batch, also when the pass failed part way: a crash
    // before this re-sends the pass, which adds nothing twice.
    if at != from {
        tokio::task::spawn_blocking(move || write_offset(&dir, at.0, at.1)).await??;
    }
    result
}

/// [`ship_once`] from `at` (segment, offset), which it moves along, with
/// the records taken from memory in `fresh`.
async fn ship_from(
    spool: &Spool,
    meta: &dyn AuditLog,
    dir: &Path,
    at: &mut (u64, u64),
    fresh: &mut VecDeque<Fresh>,
) -> anyhow::Result<Shipped> {
    let mut total = Shipped::default();
    // A pass ships what was appended before it began, then ends: under
    // load, going on with what arrives meanwhile turned a pass into an
    // endless run of tiny batches (measured: ~47 records per transaction
    // at 8,000 calls/s, PostgreSQL 20 µs per record in BEGIN, set_config,
    // COPY and COMMIT round trips) instead of one batch every `ship_ms`.
    // (The segment being written then: a later one waits too.)
    let end = spool.end();
    while *at < end {
        let (seg, off) = *at;
        if fresh.is_empty() {
            // Swapped, not copied: the empty buffer goes back to the spool.
            spool.recycle(std::mem::take(fresh).into());
            *fresh = spool.take_fresh().into();
        }
        let (rows, consumed) = if let Some(run) = from_memory(fresh, (seg, off)) {
            run
        } else {
            // Not in memory (a restart, a gap, a batch that failed): read
            // and parse off the async workers, so a big batch does not
            // delay the calls queued behind it.
            let dir = dir.to_owned();
            tokio::task::spawn_blocking(move || -> anyhow::Result<(Vec<AuditRow>, u64)> {
                let (lines, consumed) = read_lines(&dir, seg, off)?;
                let rows = lines
                    .into_iter()
                    .map(to_row)
                    .collect::<anyhow::Result<Vec<AuditRow>>>()?;
                Ok((rows, consumed))
            })
            .await??
        };
        if rows.is_empty() {
            // Nothing more here: move past a finished segment (keeping the
            // chain head first, in case no segment is left to read it from).
            if seg < end.0 {
                let dir = dir.to_owned();
                let (seq, hash) = spool.head();
                *at = tokio::task::spawn_blocking(move || -> std::io::Result<(u64, u64)> {
                    write_head(&dir, seq, &hash)?;
                    let next = segments(&dir)?
                        .into_iter()
                        .find(|n| *n > seg)
                        .unwrap_or(end.0);
                    write_offset(&dir, next, 0)?;
                    let _ = std::fs::remove_file(segment_path(&dir, seg));
                    Ok((next, 0))
                })
                .await??;
                continue;
            }
            break;
        }
        let head = rows.last().map(|l| (l.seq, l.hash.clone()));
        let shipped = rows.len();
        meta.ship_audit(rows).await?;
        *at = (seg, off + consumed);
        spool.shipped(consumed);
        total.records += shipped;
        total.head = head;
        tokio::task::yield_now().await;
    }
    Ok(total)
}

/// When the shipping task anchors: the newest record shipped and not yet
/// anchored, once [`ANCHOR_EVERY`] has passed since the last anchor (at
/// once for the first, and on the task's last pass whatever the time).
#[derive(Debug, Default)]
struct Anchoring {
    pending: Option<(u64, String)>,
    last: Option<std::time::Instant>,
}

impl Anchoring {
    /// A pass shipped up to `head` (`None`: nothing) at `now`; returns
    /// the head to anchor now, if one is due. Until [`Anchoring::anchored`]
    /// says it was written, it stays pending.
    fn after_pass(
        &mut self,
        head: Option<(u64, String)>,
        now: std::time::Instant,
        last_pass: bool,
    ) -> Option<(u64, String)> {
        if head.is_some() {
            self.pending = head;
        }
        let due = last_pass
            || self
                .last
                .is_none_or(|t| now.duration_since(t) >= ANCHOR_EVERY);
        if due { self.pending.clone() } else { None }
    }

    /// `head` was anchored at `now`.
    fn anchored(&mut self, head: &(u64, String), now: std::time::Instant) {
        self.last = Some(now);
        if self.pending.as_ref().is_some_and(|p| p.0 <= head.0) {
            self.pending = None;
        }
    }
}

/// The next batch from memory, when the records kept in memory continue
/// exactly where shipping stands (`at`: segment, offset): up to
/// [`MEMORY_BATCH`] contiguous lines of that segment, and the bytes they span. Records
/// already shipped (read from the file meanwhile) are dropped first.
fn from_memory(fresh: &mut VecDeque<Fresh>, at: (u64, u64)) -> Option<(Vec<AuditRow>, u64)> {
    while fresh.front().is_some_and(|f| (f.segment, f.offset) < at) {
        fresh.pop_front();
    }
    let (seg, off) = at;
    let mut rows = Vec::new();
    let mut consumed = 0;
    while rows.len() < MEMORY_BATCH
        && fresh
            .front()
            .is_some_and(|f| f.segment == seg && f.offset == off + consumed)
    {
        let Some(f) = fresh.pop_front() else { break };
        consumed += f.len;
        rows.push(f.row);
    }
    (!rows.is_empty()).then_some((rows, consumed))
}

fn to_row(l: ChainedRecord) -> anyhow::Result<AuditRow> {
    // The spool repeats the indexed columns outside the body, so shipping
    // never parses a body.
    let (Some(id), Some(at)) = (
        l.id,
        l.at_nanos
            .and_then(|n| time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(n)).ok()),
    ) else {
        anyhow::bail!("audit spool line {} lacks its id or time", l.seq);
    };
    let tenant = l.tenant_id;
    Ok(AuditRow {
        id,
        at,
        tenant,
        chain_id: l.chain_id,
        seq: l.seq,
        prev_hash: l.prev_hash,
        hash: l.hash,
        body: l.body,
    })
}

/// Reads a spool line as the spool writes it (`{"body":…,"chain_id":"…",
/// "seq":…,"prev_hash":"…","hash":"…","id":"…","at_nanos":…[,"tenant_id":
/// "…"]}`) without scanning the body: the chain fields follow it in a fixed
/// order, and `,"chain_id":"` cannot occur unescaped inside the body (a
/// record has no such field, and quotes inside its strings are escaped).
/// `None` for anything else (the caller falls back to a full JSON parse).
fn fast_parse(line: &[u8]) -> Option<ChainedRecord> {
    const HEAD: &[u8] = b"{\"body\":";
    const CHAIN: &[u8] = b",\"chain_id\":\"";
    let line = std::str::from_utf8(line).ok()?.trim_end();
    let rest = line.strip_prefix(std::str::from_utf8(HEAD).ok()?)?;
    let at = rest.rfind(std::str::from_utf8(CHAIN).ok()?)?;
    let (body, tail) = rest.split_at(at);
    let tail = tail.strip_prefix(",\"chain_id\":\"")?.strip_suffix('}')?;
    let (chain_id, tail) = tail.split_once("\",\"seq\":")?;
    let (seq, tail) = tail.split_once(",\"prev_hash\":\"")?;
    let (prev_hash, tail) = tail.split_once("\",\"hash\":\"")?;
    let (hash, tail) = tail.split_once("\",\"id\":\"")?;
    let (id, tail) = tail.split_once("\",\"at_nanos\":")?;
    let (at_nanos, tenant) = match tail.split_once(",\"tenant_id\":\"") {
        Some((n, t)) => (n, Some(t.strip_suffix('"')?.parse().ok()?)),
        None => (tail, None),
    };
    Some(ChainedRecord {
        chain_id: chain_id.parse().ok()?,
        seq: seq.parse().ok()?,
        prev_hash: prev_hash.to_owned(),
        hash: hash.to_owned(),
        body: body.to_owned(),
        id: Some(id.parse().ok()?),
        at_nanos: Some(at_nanos.parse().ok()?),
        tenant_id: tenant,
    })
}

/// Complete lines of segment `seg` from `off`, and the bytes they span.
fn read_lines(dir: &Path, seg: u64, off: u64) -> std::io::Result<(Vec<ChainedRecord>, u64)> {
    let mut f = match std::fs::File::open(segment_path(dir, seg)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(e),
    };
    f.seek(SeekFrom::Start(off))?;
    let mut buf = Vec::with_capacity(64 * 1024);
    f.take(READ_BYTES as u64).read_to_end(&mut buf)?;
    let mut out = Vec::new();
    let mut consumed = 0u64;
    for chunk in buf.split_inclusive(|b| *b == b'\n') {
        if !chunk.ends_with(b"\n") || out.len() == BATCH {
            break;
        }
        let rec = match fast_parse(chunk) {
            Some(r) => r,
            None => serde_json::from_slice(chunk)
                .map_err(|e| std::io::Error::other(format!("audit spool: unreadable line: {e}")))?,
        };
        consumed += chunk.len() as u64;
        out.push(rec);
    }
    Ok((out, consumed))
}

/// Work that follows a successful shipping pass (the binary's reconciler,
/// which looks for outcomes a crash lost once their requests are shipped).
#[async_trait::async_trait]
pub trait AfterPass: Send {
    /// Runs after a pass that shipped everything appended before it.
    async fn after_pass(&mut self, spool: &Spool);
}

/// Ships every `every` (with backoff up to 2 s while PostgreSQL is away)
/// until cancelled, then one last time.
pub async fn task_main(
    spool: Arc<Spool>,
    meta: Arc<dyn AuditLog>,
    every: Duration,
    mut after: Option<Box<dyn AfterPass>>,
    cancel: CancellationToken,
) {
    // Capped low: a PostgreSQL that returns is drained within seconds.
    let mut backoff = crate::backoff::Backoff::new(every, Duration::from_secs(2));
    let mut wait = every;
    let mut anchoring = Anchoring::default();
    loop {
        let stop = tokio::select! {
            () = cancel.cancelled() => true,
            () = tokio::time::sleep(wait) => false,
        };
        match ship_pass(&spool, meta.as_ref()).await {
            Ok(shipped) => {
                backoff.reset();
                wait = every;
                let now = std::time::Instant::now();
                if let Some(head) = anchoring.after_pass(shipped.head, now, stop) {
                    match meta.anchor_audit(spool.chain_id(), head.0, &head.1).await {
                        Ok(()) => anchoring.anchored(&head, now),
                        // Still pending: tried again after the next pass.
                        Err(e) => tracing::warn!("audit chain head not anchored yet: {e}"),
                    }
                }
                // Everything appended before the pass is shipped now.
                if let Some(a) = after.as_mut() {
                    a.after_pass(&spool).await;
                }
            }
            Err(e) => {
                wait = backoff.next_delay();
                tracing::warn!(
                    unshipped_bytes = spool.unshipped(),
                    retry_in_ms = wait.as_millis() as u64,
                    "audit records not shipped yet (kept in the spool): {e:#}"
                );
            }
        }
        if stop {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{AuditRecord, AuditSink as _};
    use crate::broker::error::MetadataStoreError;
    use crate::broker::types::{ExchangeId, TenantId};
    use crate::memstore::MemoryMetadataStore;

    /// The fast reader reads exactly what a full JSON parse reads, for
    /// records with and without a tenant and with bodies that try to look
    /// like the chain fields.
    #[test]
    fn the_fast_line_reader_agrees_with_serde() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 30).unwrap();
        let mut r = AuditRecord::system(
            "t",
            "Test",
            TenantId::new(uuid::Uuid::new_v4()),
            ExchangeId::Okx,
            vec![1, 2],
        );
        r.user_agent = Some(r#"evil ","chain_id":"x","seq":1} \" ümlaut"#.into());
        spool.append(&r).unwrap();
        r.tenant_id = None;
        spool.append(&r).unwrap();
        let text = std::fs::read(segment_path(dir.path(), 1)).unwrap();
        let mut n = 0;
        for line in text.split_inclusive(|b| *b == b'\n') {
            let slow: ChainedRecord = serde_json::from_slice(line).unwrap();
            assert_eq!(fast_parse(line), Some(slow));
            n += 1;
        }
        assert_eq!(n, 2);
        assert_eq!(fast_parse(b"{\"body\":{},\"seq\":1}\n"), None);
    }

    fn records(tenant: Option<TenantId>, n: usize) -> Vec<AuditRecord> {
        (0..n)
            .map(|i| {
                let mut r = AuditRecord::system(
                    "t",
                    "Test",
                    TenantId::new(uuid::Uuid::new_v4()),
                    ExchangeId::Bybit,
                    vec![i as u64],
                );
                r.tenant_id = tenant;
                r.user_agent = Some(format!(r#"ua {i} ","chain_id":"x" \" ü"#));
                r
            })
            .collect()
    }

    /// What the spool keeps in memory for the shipper is exactly what
    /// reading its lines back gives, and says where each line lies.
    #[test]
    fn rows_kept_in_memory_are_the_rows_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 30).unwrap();
        let tenant = Some(TenantId::new(uuid::Uuid::new_v4()));
        for r in records(tenant, 3).iter().chain(&records(None, 2)) {
            spool.append(r).unwrap();
        }
        let fresh = spool.take_fresh();
        let (lines, consumed) = read_lines(dir.path(), 1, 0).unwrap();
        let from_file: Vec<AuditRow> = lines.into_iter().map(|l| to_row(l).unwrap()).collect();
        let mut at = 0;
        for f in &fresh {
            assert_eq!((f.segment, f.offset), (1, at));
            at += f.len;
        }
        assert_eq!(at, consumed);
        assert_eq!(
            fresh.into_iter().map(|f| f.row).collect::<Vec<_>>(),
            from_file
        );
        assert!(spool.take_fresh().is_empty(), "taken once");
    }

    async fn shipped_seqs(meta: &MemoryMetadataStore, tenant: TenantId) -> Vec<u64> {
        let mut seqs: Vec<u64> = meta
            .list_audit(tenant, None, None, 1_000)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.seq)
            .collect();
        seqs.sort_unstable();
        seqs
    }

    /// Shipping takes records from memory when they continue where it
    /// stands (the file is not read: here it could not be parsed), and
    /// reads the file for what memory lacks (records taken by a pass that
    /// failed, a restart) without shipping anything twice or skipping it.
    #[tokio::test]
    async fn ships_from_memory_and_reads_the_file_for_what_memory_lacks() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 30).unwrap();
        let t = TenantId::new(uuid::Uuid::new_v4());
        let meta = MemoryMetadataStore::default();
        for r in &records(Some(t), 3) {
            spool.append(r).unwrap();
        }
        // Garble the file in place (same length): only memory can serve.
        let seg = segment_path(dir.path(), 1);
        let good = std::fs::read(&seg).unwrap();
        std::fs::write(&seg, vec![b'x'; good.len()]).unwrap();
        assert_eq!(ship_once(&spool, &meta).await.unwrap().records, 3);
        assert_eq!(shipped_seqs(&meta, t).await, vec![1, 2, 3]);
        std::fs::write(&seg, &good).unwrap();

        // Two records taken by a pass that then failed, two kept: the
        // first two come from the file, the last two from memory.
        for r in &records(Some(t), 2) {
            spool.append(r).unwrap();
        }
        drop(spool.take_fresh());
        for r in &records(Some(t), 2) {
            spool.append(r).unwrap();
        }
        assert_eq!(ship_once(&spool, &meta).await.unwrap().records, 4);
        assert_eq!(shipped_seqs(&meta, t).await, (1..=7).collect::<Vec<_>>());

        // A restart: nothing in memory, the file has it all.
        for r in &records(Some(t), 2) {
            spool.append(r).unwrap();
        }
        drop(spool);
        let spool = Spool::open(dir.path(), 1 << 30).unwrap();
        spool.append(&records(Some(t), 1)[0]).unwrap();
        assert_eq!(ship_once(&spool, &meta).await.unwrap().records, 3);
        assert_eq!(shipped_seqs(&meta, t).await, (1..=10).collect::<Vec<_>>());
        assert_eq!(spool.unshipped(), 0);
    }

    /// An audit log into which calls keep appending while each batch is
    /// being shipped (a broker under load), for its first `busy` batches.
    struct AppendedMeanwhile {
        meta: MemoryMetadataStore,
        spool: Arc<Spool>,
        tenant: TenantId,
        batches: std::sync::atomic::AtomicUsize,
        anchors: std::sync::atomic::AtomicUsize,
        busy: usize,
    }

    #[async_trait::async_trait]
    impl AuditLog for AppendedMeanwhile {
        async fn ship_audit(&self, rows: Vec<AuditRow>) -> Result<(), MetadataStoreError> {
            let n = self
                .batches
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if n < self.busy {
                for r in &records(Some(self.tenant), 5) {
                    self.spool.append(r).unwrap();
                }
            }
            self.meta.ship_audit(rows).await
        }
        async fn anchor_audit(
            &self,
            chain_id: uuid::Uuid,
            seq: u64,
            hash: &str,
        ) -> Result<(), MetadataStoreError> {
            self.anchors
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.meta.anchor_audit(chain_id, seq, hash).await
        }
        async fn list_audit(
            &self,
            tenant: TenantId,
            before: Option<(time::OffsetDateTime, uuid::Uuid)>,
            since: Option<time::OffsetDateTime>,
            limit: u32,
        ) -> Result<Vec<AuditRow>, MetadataStoreError> {
            self.meta.list_audit(tenant, before, since, limit).await
        }
    }

    /// A pass ships what the spool held when it began, in one batch, and
    /// ends: records appended meanwhile wait for the next pass (under
    /// load, a pass that went on with them shipped tiny batches without
    /// end, one PostgreSQL transaction each).
    #[tokio::test]
    async fn a_pass_ships_what_was_there_when_it_began_and_ends() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 30).unwrap();
        let tenant = TenantId::new(uuid::Uuid::new_v4());
        let log = AppendedMeanwhile {
            meta: MemoryMetadataStore::default(),
            spool: spool.clone(),
            tenant,
            batches: Default::default(),
            anchors: Default::default(),
            busy: 3,
        };
        for r in &records(Some(tenant), 10) {
            spool.append(r).unwrap();
        }
        assert_eq!(ship_once(&spool, &log).await.unwrap().records, 10);
        assert_eq!(log.batches.load(std::sync::atomic::Ordering::Relaxed), 1);
        // The pass ended, so the chain's head was anchored (under steady
        // load a pass that never ends never anchors).
        assert_eq!(log.anchors.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert_eq!(
            shipped_seqs(&log.meta, tenant).await,
            (1..=10).collect::<Vec<_>>()
        );
        // The next pass takes what arrived meanwhile (and its own batch
        // adds five more, for the pass after).
        assert_eq!(ship_once(&spool, &log).await.unwrap().records, 5);
        assert_eq!(ship_once(&spool, &log).await.unwrap().records, 5);
        assert_eq!(
            shipped_seqs(&log.meta, tenant).await,
            (1..=20).collect::<Vec<_>>()
        );
        assert_eq!(log.batches.load(std::sync::atomic::Ordering::Relaxed), 3);
        assert_eq!(log.anchors.load(std::sync::atomic::Ordering::Relaxed), 3);
    }

    /// The task anchors the newest shipped head at once, then at most every
    /// `ANCHOR_EVERY` whatever the passes in between shipped (the newest
    /// of them), on its last pass whatever the time, and never a head it
    /// has anchored already; a head whose anchor failed stays pending.
    #[test]
    fn anchors_are_spaced_and_the_newest_head_is_the_one_anchored() {
        let t0 = std::time::Instant::now();
        let head = |n: u64| Some((n, format!("h{n}")));
        let mut a = Anchoring::default();
        // Nothing shipped yet: nothing to anchor.
        assert_eq!(a.after_pass(None, t0, false), None);
        // The first head: at once.
        assert_eq!(a.after_pass(head(10), t0, false), head(10));
        a.anchored(&(10, "h10".into()), t0);
        // Passes within the period: nothing, though they ship.
        let soon = t0 + ANCHOR_EVERY / 4;
        assert_eq!(a.after_pass(head(20), soon, false), None);
        assert_eq!(a.after_pass(head(30), soon + ANCHOR_EVERY / 4, false), None);
        // A pass that ships nothing once the period is over: the newest
        // head shipped meanwhile.
        let later = t0 + ANCHOR_EVERY;
        assert_eq!(a.after_pass(None, later, false), head(30));
        // Its anchor failed: still pending, tried after the next pass.
        assert_eq!(a.after_pass(None, later, false), head(30));
        a.anchored(&(30, "h30".into()), later);
        // Anchored: nothing pending, even once due again.
        assert_eq!(a.after_pass(None, later + ANCHOR_EVERY * 2, false), None);
        // The last pass anchors what it shipped at once.
        assert_eq!(
            a.after_pass(head(31), later + ANCHOR_EVERY / 10, true),
            head(31)
        );
    }
}
