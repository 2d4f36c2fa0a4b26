//! The local append-only spool: JSON lines in numbered segment files, each
//! line one record with its place in this replica's hash chain.
//!
//! Durability: every append is one `write(2)` of the whole line to the
//! segment (no user-space buffer) before the call is answered, so killing
//! the process (even with SIGKILL) loses no record a client saw answered;
//! the file is fsynced in groups, every `fsync_interval` (50 ms by default),
//! so a power cut loses at most that much. A torn last line (a power cut
//! mid-write) is cut off when the spool is opened again.

use std::{
    fs::{File, OpenOptions},
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError, TryLockError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use super::chain::{ChainedRecord, GENESIS};
use super::{AuditError, AuditRecord, AuditSink, Ticket, chain::link_hash_of};
use crate::broker::ports::AuditRow;

/// A segment is closed and a new one started beyond this size.
const SEGMENT_BYTES: u64 = 16 * 1024 * 1024;

/// How a spool line starts: the body comes first.
const BODY_KEY: &[u8] = b"{\"body\":";

/// Outcome records kept in memory while the spool fails, at most.
const MAX_DEFERRED: usize = 10_000;

/// First pause between recovery probes of a spool that cannot be written.
pub const PROBE_MIN: Duration = Duration::from_millis(50);
/// Longest pause between them: calls flow again within this (plus the
/// flusher's period) of the cause going away.
pub const PROBE_MAX: Duration = Duration::from_millis(500);

/// Records kept in memory for the shipper at most (about 1 KiB each); past
/// this, appends stop keeping them and the shipper reads the gap back from
/// the file (as it does after a restart).
const FRESH_MAX: usize = 20_000;

/// A record appended and not yet taken by the shipper, with where its line
/// lies in the spool, so the shipper can ship it without reading it back
/// (and knows whether it follows what was shipped last).
#[derive(Debug)]
pub struct Fresh {
    /// Segment of the line.
    pub segment: u64,
    /// Byte offset of the line in it.
    pub offset: u64,
    /// Length of the line, newline included.
    pub len: u64,
    /// The row, exactly as parsing the line gives it.
    pub row: AuditRow,
}

struct Writer {
    file: File,
    /// Segments rolled away from and not yet synced (the flusher syncs
    /// them, outside this lock).
    retired: Vec<File>,
    segment: u64,
    len: u64,
    seq: u64,
    prev_hash: String,
    /// Appended since the shipper last took them, in file order.
    fresh: Vec<Fresh>,
    /// The group being written, kept to be written into again.
    batch: Vec<u8>,
    /// An empty queue to swap with [`Spool::queue`].
    spare_queue: Vec<Queued>,
}

/// A record submitted and not yet written.
struct Queued {
    /// Its JSON body.
    body: String,
    id: Uuid,
    at: time::OffsetDateTime,
    tenant: Option<crate::broker::types::TenantId>,
    ticket: Ticket,
}

/// The spool of one replica.
pub struct Spool {
    dir: PathBuf,
    chain_id: Uuid,
    /// `chain_id`, formatted once.
    chain_str: String,
    max_bytes: u64,
    writer: Mutex<Writer>,
    /// Records submitted and not yet written, in submission order (a
    /// group append: whoever takes the writer next writes them all).
    queue: Mutex<Vec<Queued>>,
    /// An empty buffer for [`Writer::fresh`], kept from the shipper.
    spare: Mutex<Vec<Fresh>>,
    dirty: AtomicBool,
    /// Bytes appended and not yet shipped.
    unshipped: AtomicU64,
    warned: AtomicBool,
    /// The last write failed (cleared by the next one that succeeds: the
    /// flusher's recovery probe, since calls are refused meanwhile).
    broken: AtomicBool,
    /// When the next recovery probe is due, and the backoff between them.
    probe: Mutex<(std::time::Instant, crate::backoff::Backoff)>,
    /// Outcome records of calls that ran but could not be recorded when
    /// they ended; appended once the spool takes records again.
    deferred: Mutex<Vec<AuditRecord>>,
    /// Records dropped since the deferred list was last written out.
    dropped: AtomicU64,
    /// The chain's seq when this process opened the spool (records
    /// appended since are the head's seq minus this).
    opened_seq: u64,
    /// A segment was created: the directory must be synced before its
    /// records count as durable.
    dir_dirty: AtomicBool,
    /// Bytes a segment grows to before the next one starts.
    segment_bytes: u64,
    /// The durability operations in order (tests).
    #[cfg(test)]
    ops: Mutex<Vec<String>>,
}

/// Segment file name of number `n`.
pub fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("seg-{n:010}.jsonl"))
}

/// Segment numbers present in `dir`, ascending.
///
/// # Errors
/// When the directory cannot be read.
pub fn segments(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut out: Vec<u64> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_prefix("seg-")?
                .strip_suffix(".jsonl")?
                .parse()
                .ok()
        })
        .collect();
    out.sort_unstable();
    Ok(out)
}

/// Cuts a torn last line off `path`; returns the last complete record.
fn recover_tail(path: &Path) -> std::io::Result<Option<ChainedRecord>> {
    let file = File::open(path)?;
    let mut good_len = 0u64;
    let mut last = None;
    let mut reader = BufReader::new(file);
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line)?;
        if n == 0 {
            break;
        }
        match serde_json::from_str::<ChainedRecord>(line.trim_end()) {
            Ok(r) if line.ends_with('\n') => {
                good_len += n as u64;
                last = Some(r);
            }
            _ => break,
        }
    }
    let f = OpenOptions::new().write(true).open(path)?;
    if f.metadata()?.len() != good_len {
        tracing::warn!(path = %path.display(), "audit spool: cutting a torn last line (power loss?)");
        f.set_len(good_len)?;
        f.sync_all()?;
    }
    Ok(last)
}

impl Spool {
    /// Opens (or creates) the spool in `dir`: the chain id is kept in
    /// `dir/chain_id`, and the chain continues from the last record on disk
    /// (or, when every segment was shipped and removed, from `resume`, the
    /// chain head the shipper last recorded).
    ///
    /// # Errors
    /// When the directory or its files cannot be used.
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<Arc<Self>> {
        Self::open_sized(dir, max_bytes, SEGMENT_BYTES)
    }

    fn open_sized(dir: &Path, max_bytes: u64, segment_bytes: u64) -> std::io::Result<Arc<Self>> {
        std::fs::create_dir_all(dir)?;
        let id_path = dir.join("chain_id");
        let chain_id = match std::fs::read_to_string(&id_path) {
            Ok(s) => s
                .trim()
                .parse()
                .map_err(|_| std::io::Error::other("audit spool: chain_id file is corrupt"))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = Uuid::new_v4();
                write_atomic(&id_path, id.to_string().as_bytes())?;
                id
            }
            Err(e) => return Err(e),
        };
        let segs = segments(dir)?;
        let mut tail = None;
        for n in segs.iter().rev() {
            if let Some(r) = recover_tail(&segment_path(dir, *n))? {
                tail = Some(r);
                break;
            }
        }
        let (seq, prev_hash) = match tail {
            Some(r) => (r.seq, r.hash),
            None => match read_head(dir)? {
                Some((seq, hash)) => (seq, hash),
                None => (0, GENESIS.to_owned()),
            },
        };
        let segment = segs.last().copied().unwrap_or(1);
        let path = segment_path(dir, segment);
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        if segs.is_empty() {
            // The new segment's directory entry is durable before any
            // record in it is.
            sync_dir(dir)?;
        }
        let len = file.metadata()?.len();
        let shipped = read_offset(dir)?;
        let mut unshipped = 0;
        for n in &segs {
            let l = std::fs::metadata(segment_path(dir, *n))?.len();
            if *n > shipped.0 {
                unshipped += l;
            } else if *n == shipped.0 {
                unshipped += l.saturating_sub(shipped.1);
            }
        }
        Ok(Arc::new(Self {
            dir: dir.to_owned(),
            chain_id,
            chain_str: chain_id.to_string(),
            max_bytes,
            writer: Mutex::new(Writer {
                file,
                retired: Vec::new(),
                segment,
                len,
                seq,
                prev_hash,
                fresh: Vec::new(),
                batch: Vec::new(),
                spare_queue: Vec::new(),
            }),
            queue: Mutex::default(),
            spare: Mutex::default(),
            dirty: AtomicBool::new(false),
            unshipped: AtomicU64::new(unshipped),
            warned: AtomicBool::new(false),
            broken: AtomicBool::new(false),
            probe: Mutex::new((
                std::time::Instant::now(),
                crate::backoff::Backoff::new(PROBE_MIN, PROBE_MAX),
            )),
            deferred: Mutex::default(),
            dropped: AtomicU64::new(0),
            opened_seq: seq,
            dir_dirty: AtomicBool::new(false),
            segment_bytes,
            #[cfg(test)]
            ops: Mutex::default(),
        }))
    }

    /// This replica's chain.
    pub fn chain_id(&self) -> Uuid {
        self.chain_id
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The segment being written.
    pub fn current_segment(&self) -> u64 {
        self.writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .segment
    }

    /// Where the next line will be written: (segment, byte offset). A
    /// shipping pass ships up to here and no further (what is appended
    /// meanwhile waits for the next pass).
    pub fn end(&self) -> (u64, u64) {
        let w = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        (w.segment, w.len)
    }

    /// The chain's head now: the last seq written and its hash.
    pub fn head(&self) -> (u64, String) {
        let w = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        (w.seq, w.prev_hash.clone())
    }

    /// The records appended since the last call, in file order (the
    /// shipper's in-memory feed; anything it misses it reads from the file).
    /// The spool keeps appending into the buffer last handed back with
    /// [`Spool::recycle`], so in the steady state no append grows (and
    /// copies) a buffer while it holds the writer's lock.
    pub fn take_fresh(&self) -> Vec<Fresh> {
        let spare = std::mem::take(&mut *self.spare.lock().unwrap_or_else(PoisonError::into_inner));
        std::mem::replace(
            &mut self
                .writer
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .fresh,
            spare,
        )
    }

    /// Hands a buffer from [`Spool::take_fresh`] back (what is left in it
    /// is dropped), to be appended into again.
    pub fn recycle(&self, mut taken: Vec<Fresh>) {
        taken.clear();
        let mut spare = self.spare.lock().unwrap_or_else(PoisonError::into_inner);
        if taken.capacity() > spare.capacity() {
            *spare = taken;
        }
    }

    /// The bound on unshipped bytes.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Records appended since the spool was opened.
    pub fn appended(&self) -> u64 {
        let seq = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .seq;
        seq - self.opened_seq
    }

    /// Bytes not yet shipped.
    pub fn unshipped(&self) -> u64 {
        self.unshipped.load(Ordering::Relaxed)
    }

    /// The shipper shipped `bytes`.
    pub fn shipped(&self, bytes: u64) {
        let _ = self
            .unshipped
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(bytes))
            });
        if self.unshipped() < self.max_bytes / 2 {
            self.warned.store(false, Ordering::Relaxed);
        }
    }

    /// The record's JSON body, built outside the writer's lock and before
    /// anything waits; refused when the spool is full.
    fn prepare(&self, record: &AuditRecord) -> Result<Queued, AuditError> {
        let unshipped = self.unshipped();
        if unshipped >= self.max_bytes {
            return Err(AuditError::Full(unshipped));
        }
        if unshipped >= self.max_bytes / 10 * 8 && !self.warned.swap(true, Ordering::Relaxed) {
            tracing::error!(
                unshipped,
                max = self.max_bytes,
                "audit spool is over 80 % full: PostgreSQL has not taken records for a while; calls will be refused when it is full"
            );
        }
        // Canonical JSON, embedded verbatim in the line, exactly as
        // `ChainedRecord` reads it back; the chain fields follow once the
        // hash is known.
        let mut body = Vec::with_capacity(1024);
        record.write_json(&mut body)?;
        Ok(Queued {
            body: String::from_utf8(body).map_err(|e| AuditError::Io(e.to_string()))?,
            id: record.id,
            at: record.timestamp,
            tenant: record.tenant_id,
            ticket: Ticket::default(),
        })
    }

    /// Chains every submitted record and writes their lines in one
    /// `write(2)`, under the writer's lock; settles their tickets.
    fn write_queue(&self, w: &mut Writer) {
        let mut queue = {
            let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
            if q.is_empty() {
                return;
            }
            std::mem::replace(&mut *q, std::mem::take(&mut w.spare_queue))
        };
        if let Err(e) = self.roll_if_full(w) {
            self.fail(w, &mut queue, &e);
            return;
        }
        let seq0 = w.seq;
        let mut batch = std::mem::take(&mut w.batch);
        batch.clear();
        // Each line's (length, seq, prev_hash, hash), for the shipper's rows.
        let mut links = Vec::with_capacity(queue.len());
        for q in &queue {
            let seq = w.seq + 1;
            let hash = link_hash_of(&self.chain_str, seq, &w.prev_hash, &q.body);
            let prev_hash = std::mem::replace(&mut w.prev_hash, hash.clone());
            let start = batch.len();
            batch.extend_from_slice(BODY_KEY);
            batch.extend_from_slice(q.body.as_bytes());
            self.chain_fields(&mut batch, seq, &prev_hash, &hash, q);
            links.push(((batch.len() - start) as u64, seq, prev_hash, hash));
            w.seq = seq;
        }
        // One write for the group: the OS has every line when it returns.
        self.note("write");
        let written = w.file.write_all(&batch);
        w.batch = batch;
        if let Err(e) = written {
            // A part written (a full disk) is cut off again, so the next
            // line starts where the chain and the offsets expect it.
            let _ = w.file.set_len(w.len);
            // Back to the head before the group: the first line's link.
            w.seq = seq0;
            if let Some((_, _, prev, _)) = links.into_iter().next() {
                w.prev_hash = prev;
            }
            // Said once per outage, not once per refused call.
            if !self.broken.swap(true, Ordering::Relaxed) {
                tracing::error!(
                    "the audit spool cannot be written ({e}): calls are refused (health NOT_SERVING) until a probe write succeeds"
                );
            }
            self.fail(w, &mut queue, &AuditError::Io(e.to_string()));
            return;
        }
        if self.broken.swap(false, Ordering::Relaxed) {
            tracing::warn!("the audit spool can be written again: calls are served");
        }
        let mut total = 0;
        for (q, (len, seq, prev_hash, hash)) in queue.drain(..).zip(links) {
            // The shipper's row (the body moved, not copied), only while
            // rows are being kept.
            if w.fresh.len() < FRESH_MAX {
                let (segment, offset) = (w.segment, w.len);
                w.fresh.push(Fresh {
                    segment,
                    offset,
                    len,
                    row: AuditRow {
                        id: q.id,
                        at: q.at,
                        tenant: q.tenant,
                        chain_id: self.chain_id,
                        seq,
                        prev_hash,
                        hash,
                        body: q.body,
                    },
                });
            }
            w.len += len;
            total += len;
            q.ticket.settle(Ok(()));
        }
        w.spare_queue = queue;
        self.unshipped.fetch_add(total, Ordering::Relaxed);
        self.dirty.store(true, Ordering::Release);
    }

    /// Settles every ticket of `queue` with `e`.
    fn fail(&self, w: &mut Writer, queue: &mut Vec<Queued>, e: &AuditError) {
        for q in queue.drain(..) {
            q.ticket.settle(Err(e.clone()));
        }
        w.spare_queue = std::mem::take(queue);
    }

    /// Starts the next segment once this one is full.
    fn roll_if_full(&self, w: &mut Writer) -> Result<(), AuditError> {
        if w.len < self.segment_bytes {
            return Ok(());
        }
        let next = w.segment + 1;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(segment_path(&self.dir, next))
            .map_err(|e| AuditError::Io(e.to_string()))?;
        // No fsync under this lock (every call would wait behind it): the
        // flusher syncs the old segment, then the directory, then the new
        // segment, in that order (see `sync`).
        let old = std::mem::replace(&mut w.file, file);
        w.retired.push(old);
        w.segment = next;
        w.len = 0;
        self.dir_dirty.store(true, Ordering::Release);
        self.dirty.store(true, Ordering::Release);
        Ok(())
    }

    /// The chain fields after the body, without the formatting machinery
    /// (this runs once per record, under the lock).
    fn chain_fields(&self, bytes: &mut Vec<u8>, seq: u64, prev_hash: &str, hash: &str, q: &Queued) {
        let (mut digits, mut id) = (itoa::Buffer::new(), Uuid::encode_buffer());
        for part in [
            &b",\"chain_id\":\""[..],
            self.chain_str.as_bytes(),
            b"\",\"seq\":",
            digits.format(seq).as_bytes(),
            b",\"prev_hash\":\"",
            prev_hash.as_bytes(),
            b"\",\"hash\":\"",
            hash.as_bytes(),
            b"\",\"id\":\"",
            q.id.as_hyphenated().encode_lower(&mut id).as_bytes(),
            b"\",\"at_nanos\":",
        ] {
            bytes.extend_from_slice(part);
        }
        let at_nanos = i64::try_from(q.at.unix_timestamp_nanos()).unwrap_or(i64::MAX);
        bytes.extend_from_slice(digits.format(at_nanos).as_bytes());
        match q.tenant {
            Some(t) => {
                bytes.extend_from_slice(b",\"tenant_id\":\"");
                bytes.extend_from_slice(
                    t.as_uuid().as_hyphenated().encode_lower(&mut id).as_bytes(),
                );
                bytes.extend_from_slice(b"\"}\n");
            }
            None => bytes.extend_from_slice(b"}\n"),
        }
    }

    /// Flushes the segment to disk now if anything was appended.
    ///
    /// # Errors
    /// When fsync fails.
    pub fn sync(&self) -> std::io::Result<()> {
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        // Only the handles are taken under the writer's lock; the syncs run
        // outside it. Order: segments rolled away from, then the directory
        // (the new segment's entry), then the segment being written.
        let (mut retired, file) = {
            let mut w = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
            (std::mem::take(&mut w.retired), w.file.try_clone())
        };
        let done = (|| {
            while let Some(f) = retired.first() {
                f.sync_data()?;
                self.note("sync a rolled segment");
                retired.remove(0);
            }
            if self.dir_dirty.swap(false, Ordering::AcqRel) {
                if let Err(e) = sync_dir(&self.dir) {
                    self.dir_dirty.store(true, Ordering::Release);
                    return Err(e);
                }
                self.note("sync the directory");
            }
            file?.sync_data()?;
            self.note("sync the current segment");
            Ok(())
        })();
        if done.is_err() {
            // Tried again next time, nothing forgotten.
            self.writer
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .retired
                .splice(0..0, retired);
            self.dirty.store(true, Ordering::Release);
        }
        done
    }

    #[cfg(test)]
    fn note(&self, op: &str) {
        self.ops
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(op.to_owned());
    }

    #[cfg(not(test))]
    fn note(&self, _: &str) {}

    /// Whether records wait in memory for the spool to take them.
    pub fn has_deferred(&self) -> bool {
        !self
            .deferred
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
    }

    /// Whether the last write failed (calls are refused until a write
    /// succeeds again).
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
    }

    /// While writes fail, tries one: a record saying the spool recovered
    /// (so the trail itself shows the gap's end), at most every
    /// [`PROBE_MIN`]…[`PROBE_MAX`] (backoff). Its success is what lets calls
    /// through again; nothing else writes meanwhile.
    pub fn probe(&self) {
        if !self.is_broken() {
            self.append_deferred();
            return;
        }
        let mut p = self.probe.lock().unwrap_or_else(PoisonError::into_inner);
        let now = std::time::Instant::now();
        if now < p.0 {
            return;
        }
        let record = AuditRecord::audit_probe();
        match self.append(&record) {
            Ok(()) => {
                p.1.reset();
                drop(p);
                self.append_deferred();
            }
            Err(_) => p.0 = now + p.1.next_delay(),
        }
    }

    /// Appends the outcome records kept while the spool failed, in order;
    /// stops at the first that fails (kept for the next try).
    fn append_deferred(&self) {
        let mut deferred = self.deferred.lock().unwrap_or_else(PoisonError::into_inner);
        if deferred.is_empty() || self.check().is_err() {
            return;
        }
        let mut written = 0;
        for r in deferred.iter() {
            if self.append(r).is_err() {
                break;
            }
            written += 1;
        }
        deferred.drain(..written);
        if written > 0 {
            let dropped = self.dropped.swap(0, Ordering::Relaxed);
            tracing::warn!(
                written,
                dropped,
                "audit records kept during the spool's failure written"
            );
        }
    }

    /// Group fsync every `every` until cancelled (then once more); while
    /// the spool cannot be written, the recovery probe on the same tick.
    pub async fn flusher(self: Arc<Self>, every: Duration, cancel: CancellationToken) {
        loop {
            let stop = tokio::select! {
                () = cancel.cancelled() => true,
                () = tokio::time::sleep(every) => false,
            };
            if self.is_broken() || self.has_deferred() {
                let me = self.clone();
                let _ = tokio::task::spawn_blocking(move || me.probe()).await;
            }
            // Nothing appended: no thread to wake.
            if self.dirty.load(Ordering::Acquire) {
                let me = self.clone();
                match tokio::task::spawn_blocking(move || me.sync()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::error!("audit spool fsync failed: {e}"),
                    Err(e) => tracing::error!("audit spool fsync task failed: {e}"),
                }
            }
            if stop {
                return;
            }
        }
    }
}

impl AuditSink for Spool {
    fn append(&self, record: &AuditRecord) -> Result<(), AuditError> {
        let ticket = self.submit(record);
        if ticket.result().is_none() {
            self.write_submitted(true);
        }
        ticket
            .result()
            .unwrap_or_else(|| Err(AuditError::Io("the record was not written".into())))
    }

    fn submit(&self, record: &AuditRecord) -> Ticket {
        match self.prepare(record) {
            Ok(q) => {
                let ticket = q.ticket.clone();
                self.queue
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(q);
                ticket
            }
            Err(e) => Ticket::settled(Err(e)),
        }
    }

    fn write_submitted(&self, wait: bool) -> bool {
        let mut w = match self.writer.try_lock() {
            Ok(w) => w,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) if wait => {
                self.writer.lock().unwrap_or_else(PoisonError::into_inner)
            }
            Err(TryLockError::WouldBlock) => return false,
        };
        self.write_queue(&mut w);
        true
    }

    fn defer(&self, record: AuditRecord) {
        let mut deferred = self.deferred.lock().unwrap_or_else(PoisonError::into_inner);
        // Bounded: the request records already show these calls.
        if deferred.len() < MAX_DEFERRED {
            deferred.push(record);
        } else if self.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::error!(
                "audit records kept during the spool's failure reached {MAX_DEFERRED}: later ones are dropped (state-changing calls still have their request records)"
            );
        }
    }

    fn check(&self) -> Result<(), AuditError> {
        let unshipped = self.unshipped();
        if unshipped >= self.max_bytes {
            return Err(AuditError::Full(unshipped));
        }
        if self.broken.load(Ordering::Relaxed) {
            return Err(AuditError::Io("the last write failed".into()));
        }
        Ok(())
    }
}

/// The shipped position: (segment, byte offset in it).
///
/// # Errors
/// When the offset file cannot be read.
pub fn read_offset(dir: &Path) -> std::io::Result<(u64, u64)> {
    match std::fs::read_to_string(dir.join("shipped")) {
        Ok(s) => {
            let mut it = s.split_whitespace().map(str::parse::<u64>);
            match (it.next(), it.next()) {
                (Some(Ok(seg)), Some(Ok(off))) => Ok((seg, off)),
                _ => Err(std::io::Error::other(
                    "audit spool: the shipped offset file is corrupt",
                )),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((1, 0)),
        Err(e) => Err(e),
    }
}

/// Records the shipped position (the shipper's). Not fsynced: shipping is idempotent, so a
/// position lost to a power cut only means a batch is sent again.
pub fn write_offset(dir: &Path, seg: u64, off: u64) -> std::io::Result<()> {
    let path = dir.join("shipped");
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{seg} {off}\n"))?;
    std::fs::rename(&tmp, &path)
}

/// Writes `bytes` to `path` atomically (temp file, fsync, rename).
///
/// # Errors
/// On I/O failure.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    // The rename itself is durable only once the directory is.
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// fsync of a directory: what makes a file's creation, rename or removal
/// in it survive a power cut.
///
/// # Errors
/// On I/O failure.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The chain head (seq, hash) the shipper recorded when it removed the last
/// segment, so a restart continues the chain.
fn read_head(dir: &Path) -> std::io::Result<Option<(u64, String)>> {
    match std::fs::read_to_string(dir.join("head")) {
        Ok(s) => {
            let mut it = s.split_whitespace();
            Ok(match (it.next().and_then(|x| x.parse().ok()), it.next()) {
                (Some(seq), Some(hash)) => Some((seq, hash.to_owned())),
                _ => None,
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Records the chain head (see `read_head`).
///
/// # Errors
/// On I/O failure.
pub fn write_head(dir: &Path, seq: u64, hash: &str) -> std::io::Result<()> {
    write_atomic(&dir.join("head"), format!("{seq} {hash}\n").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::chain::link_hash;
    use crate::broker::types::{ExchangeId, TenantId};

    fn record(n: u64) -> AuditRecord {
        AuditRecord::system(
            "test",
            "Test",
            TenantId::new(Uuid::nil()),
            ExchangeId::Binance,
            vec![n],
        )
    }

    fn lines(dir: &Path) -> Vec<ChainedRecord> {
        segments(dir)
            .unwrap()
            .into_iter()
            .flat_map(|n| {
                std::fs::read_to_string(segment_path(dir, n))
                    .unwrap()
                    .lines()
                    .map(|l| serde_json::from_str(l).unwrap())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn appends_chain_and_survive_a_reopen_and_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), 1 << 30).unwrap();
        for n in 0..3 {
            s.append(&record(n)).unwrap();
        }
        let chain = s.chain_id();
        drop(s);
        // A torn line, as a power cut mid-write leaves.
        let seg = segment_path(dir.path(), 1);
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(b"{\"chain_id\":\"tor").unwrap();
        drop(f);
        let s = Spool::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(s.chain_id(), chain);
        s.append(&record(3)).unwrap();
        let all = lines(dir.path());
        assert_eq!(
            all.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        assert_eq!(all[0].prev_hash, GENESIS);
        for w in all.windows(2) {
            assert_eq!(w[1].prev_hash, w[0].hash);
        }
        for r in &all {
            assert_eq!(r.hash, link_hash(r.chain_id, r.seq, &r.prev_hash, &r.body));
        }
    }

    #[test]
    fn submitted_records_are_written_as_one_group_in_order_by_whoever_takes_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), 1 << 30).unwrap();
        s.append(&record(0)).unwrap();
        s.ops.lock().unwrap().clear();
        let tickets: Vec<Ticket> = {
            // Another call's write holds the writer.
            let _busy = s.writer.lock().unwrap();
            let t = (1..4).map(|n| s.submit(&record(n))).collect();
            assert!(!s.write_submitted(false), "busy: the caller yields");
            t
        };
        assert!(tickets.iter().all(|t| t.result().is_none()));
        assert!(s.write_submitted(false));
        assert!(tickets.iter().all(|t| matches!(t.result(), Some(Ok(())))));
        assert_eq!(*s.ops.lock().unwrap(), ["write"], "one write for the group");
        // Nothing left: nothing written.
        assert!(s.write_submitted(false));
        assert_eq!(s.ops.lock().unwrap().len(), 1);
        let all = lines(dir.path());
        assert_eq!(all.iter().map(|l| l.seq).collect::<Vec<_>>(), [1, 2, 3, 4]);
        for (n, l) in all.iter().enumerate() {
            let r: AuditRecord = serde_json::from_str(&l.body).unwrap();
            assert_eq!(r.versions, [n as u64], "in submission order");
            assert_eq!(l.hash, link_hash(l.chain_id, l.seq, &l.prev_hash, &l.body));
        }
        for w in all.windows(2) {
            assert_eq!(w[1].prev_hash, w[0].hash);
        }
        // What the shipper is handed is what the file holds.
        let fresh = s.take_fresh();
        assert_eq!(fresh.len(), 4);
        let mut offset = 0;
        for (f, l) in fresh.iter().zip(&all) {
            assert_eq!(
                (f.offset, f.row.seq, &f.row.hash, &f.row.body),
                (offset, l.seq, &l.hash, &l.body)
            );
            offset += f.len;
        }
        assert_eq!(
            offset,
            std::fs::metadata(segment_path(dir.path(), 1))
                .unwrap()
                .len()
        );
        // A full spool refuses at once, before anything waits.
        let small = tempfile::tempdir().unwrap();
        let s = Spool::open(small.path(), 10).unwrap();
        s.append(&record(0)).unwrap();
        let _busy = s.writer.lock().unwrap();
        assert!(matches!(
            s.submit(&record(1)).result(),
            Some(Err(AuditError::Full(_)))
        ));
    }

    #[test]
    fn a_full_spool_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), 600).unwrap();
        let mut refused = false;
        for n in 0..10 {
            if let Err(e) = s.append(&record(n)) {
                assert!(matches!(e, AuditError::Full(_)), "{e}");
                refused = true;
                break;
            }
        }
        assert!(refused);
        s.shipped(s.unshipped());
        s.append(&record(99)).unwrap();
    }

    /// A roll creates the next segment without an fsync under the writer's
    /// lock; the flusher then syncs, in order, the segment rolled away
    /// from, the directory (the new segment's entry) and the new segment.
    #[test]
    fn a_roll_syncs_outside_the_lock_old_segment_then_directory_then_new() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open_sized(dir.path(), 1 << 30, 2048).unwrap();
        s.sync().unwrap();
        s.ops.lock().unwrap().clear();
        let mut n = 0;
        while s.current_segment() == 1 {
            n += 1;
            s.append(&record(n)).unwrap();
        }
        assert!(
            s.ops.lock().unwrap().iter().all(|op| op == "write"),
            "no sync while appending (under the lock)"
        );
        s.ops.lock().unwrap().clear();
        s.sync().unwrap();
        assert_eq!(
            *s.ops.lock().unwrap(),
            [
                "sync a rolled segment",
                "sync the directory",
                "sync the current segment"
            ]
        );
        // Nothing new: nothing synced again.
        s.sync().unwrap();
        assert_eq!(s.ops.lock().unwrap().len(), 3);
        // The chain continues across the roll.
        let lines = lines(dir.path());
        assert_eq!(lines.len() as u64, n);
        for w in lines.windows(2) {
            assert_eq!((w[1].seq, &w[1].prev_hash), (w[0].seq + 1, &w[0].hash));
        }
    }
}
