//! The local append-only spool: JSON lines in numbered segment files, each
//! line one record with its place in this replica's hash chain.
//!
//! Writing: a call serializes its record and queues it; one writer thread
//! per spool takes whatever is queued, chains it (seq, hash), and writes
//! the batch with one `write(2)` (group commit); the call is answered only
//! once its record's batch is written, so killing the process (even with
//! SIGKILL) loses no record a client saw answered. The async workers never
//! block in the file system (an ext4 append waits for the journal now and
//! then), and under load many records share one system call. The file is
//! fsynced in groups, every `fsync_interval` (50 ms by default), so a power
//! cut loses at most that much. A torn last line (a power cut mid-write) is
//! cut off when the spool is opened again.

use std::{
    collections::VecDeque,
    fs::{File, OpenOptions},
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    sync::{
        Arc, Condvar, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Appended, AuditError, AuditRecord, AuditSink};
use crate::broker::types::TenantId;

/// A segment is closed and a new one started beyond this size.
const SEGMENT_BYTES: u64 = 16 * 1024 * 1024;

/// The first record's `prev_hash`.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One spool line: a record's canonical JSON and its chain link. The body
/// is embedded as raw JSON (not an escaped string), and read back byte for
/// byte, so what is hashed is exactly what is stored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainedRecord {
    /// The replica's chain.
    pub chain_id: Uuid,
    /// Place in the chain, from 1, without gaps.
    pub seq: u64,
    /// Hash of the record before (GENESIS for the first).
    pub prev_hash: String,
    /// `sha256(chain_id:seq:prev_hash:body)`, hex.
    pub hash: String,
    /// The record's canonical JSON (exactly the bytes hashed).
    #[serde(with = "raw_json")]
    pub body: String,
    /// The record's id, repeated outside the body so shipping need not
    /// parse the body (not covered by the hash: the body is).
    #[serde(default)]
    pub id: Option<Uuid>,
    /// The record's time in Unix nanoseconds, likewise.
    #[serde(default)]
    pub at_nanos: Option<i64>,
    /// The record's tenant, likewise.
    #[serde(default)]
    pub tenant_id: Option<crate::broker::types::TenantId>,
}

/// (De)serializes a string holding JSON as that JSON, verbatim.
mod raw_json {
    use serde::{
        Deserialize as _, Deserializer, Serialize as _, Serializer, de::Error as _, ser::Error as _,
    };
    use serde_json::value::RawValue;

    pub fn serialize<S: Serializer>(body: &str, s: S) -> Result<S::Ok, S::Error> {
        RawValue::from_string(body.to_owned())
            .map_err(S::Error::custom)?
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        let raw = Box::<RawValue>::deserialize(d).map_err(D::Error::custom)?;
        Ok(raw.get().to_owned())
    }
}

/// The chain hash of a record.
pub fn link_hash(chain_id: Uuid, seq: u64, prev_hash: &str, body: &str) -> String {
    let mut buf = Uuid::encode_buffer();
    link_hash_of(
        chain_id.as_hyphenated().encode_lower(&mut buf),
        seq,
        prev_hash,
        body,
    )
}

/// [`link_hash`] with the chain id already formatted (the writer's hot
/// path formats it once).
fn link_hash_of(chain_id: &str, seq: u64, prev_hash: &str, body: &str) -> String {
    let mut h = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    h.update(chain_id.as_bytes());
    h.update(b":");
    let mut digits = [0u8; 20];
    h.update(decimal(seq, &mut digits));
    h.update(b":");
    h.update(prev_hash.as_bytes());
    h.update(b":");
    h.update(body.as_bytes());
    hex::encode(h.finish().as_ref())
}

/// `n` in decimal, in `buf`.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

struct Writer {
    file: File,
    segment: u64,
    len: u64,
    seq: u64,
    prev_hash: String,
}

/// `{"body":`, the start of every line.
const BODY_AT: usize = 8;

/// A record waiting for the writer: `{"body":` and its canonical JSON.
struct Queued {
    ticket: u64,
    line: Vec<u8>,
    id: Uuid,
    at_nanos: i64,
    tenant: Option<TenantId>,
}

#[derive(Default)]
struct Queue {
    items: Vec<Queued>,
    /// The last ticket handed out (tickets start at 1, never reused).
    last_ticket: u64,
    closed: bool,
}

/// What the writer has done, watched by the calls waiting for their
/// records.
#[derive(Debug, Default)]
pub struct Progress {
    /// Every ticket up to this one is written or failed.
    pub(super) done: u64,
    /// Recent failed batches: (first ticket, last ticket, error).
    failed: VecDeque<(u64, u64, String)>,
}

impl Progress {
    /// How the record with `ticket` (at most `done`) fared.
    pub(super) fn outcome(&self, ticket: u64) -> Result<(), AuditError> {
        match self
            .failed
            .iter()
            .find(|(first, last, _)| (*first..=*last).contains(&ticket))
        {
            Some((_, _, e)) => Err(AuditError::Io(e.clone())),
            None => Ok(()),
        }
    }
}

/// What the callers and the writer thread share.
struct Shared {
    dir: PathBuf,
    /// `chain_id`, formatted once.
    chain_str: String,
    writer: Mutex<Writer>,
    queue: Mutex<Queue>,
    wake: Condvar,
    progress: tokio::sync::watch::Sender<Progress>,
    dirty: AtomicBool,
    /// Bytes written and not yet shipped.
    unshipped: AtomicU64,
    /// Bytes queued and not yet written.
    queued: AtomicU64,
    /// The last write failed (cleared by the next one that succeeds).
    broken: AtomicBool,
}

/// The spool of one replica.
pub struct Spool {
    shared: Arc<Shared>,
    chain_id: Uuid,
    max_bytes: u64,
    warned: AtomicBool,
    /// The chain's seq when this process opened the spool (records
    /// appended since are the head's seq minus this).
    opened_seq: u64,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
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
        let len = file.metadata()?.len();
        let shipped = super::ship::read_offset(dir)?;
        let mut unshipped = 0;
        for n in &segs {
            let l = std::fs::metadata(segment_path(dir, *n))?.len();
            if *n > shipped.0 {
                unshipped += l;
            } else if *n == shipped.0 {
                unshipped += l.saturating_sub(shipped.1);
            }
        }
        let shared = Arc::new(Shared {
            dir: dir.to_owned(),
            chain_str: chain_id.to_string(),
            writer: Mutex::new(Writer {
                file,
                segment,
                len,
                seq,
                prev_hash,
            }),
            queue: Mutex::default(),
            wake: Condvar::new(),
            progress: tokio::sync::watch::Sender::new(Progress::default()),
            dirty: AtomicBool::new(false),
            unshipped: AtomicU64::new(unshipped),
            queued: AtomicU64::new(0),
            broken: AtomicBool::new(false),
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("audit-writer".into())
                .spawn(move || shared.writer_main())?
        };
        Ok(Arc::new(Self {
            shared,
            chain_id,
            max_bytes,
            warned: AtomicBool::new(false),
            opened_seq: seq,
            thread: Mutex::new(Some(thread)),
        }))
    }

    /// This replica's chain.
    pub fn chain_id(&self) -> Uuid {
        self.chain_id
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// The segment being written.
    pub fn current_segment(&self) -> u64 {
        self.shared
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .segment
    }

    /// The chain's head now: the last seq written and its hash.
    pub fn head(&self) -> (u64, String) {
        let w = self
            .shared
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        (w.seq, w.prev_hash.clone())
    }

    /// The bound on unshipped bytes.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Records appended since the spool was opened.
    pub fn appended(&self) -> u64 {
        let seq = self
            .shared
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .seq;
        seq - self.opened_seq
    }

    /// Bytes not yet shipped.
    pub fn unshipped(&self) -> u64 {
        self.shared.unshipped.load(Ordering::Relaxed)
    }

    /// Bytes not yet shipped, counting what is queued for the writer.
    fn pending(&self) -> u64 {
        self.unshipped() + self.shared.queued.load(Ordering::Relaxed)
    }

    /// The shipper shipped `bytes`.
    pub fn shipped(&self, bytes: u64) {
        let _ = self
            .shared
            .unshipped
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(bytes))
            });
        if self.unshipped() < self.max_bytes / 2 {
            self.warned.store(false, Ordering::Relaxed);
        }
    }

    fn append_line(&self, record: &AuditRecord) -> Result<Appended, AuditError> {
        let pending = self.pending();
        if pending >= self.max_bytes {
            return Err(AuditError::Full(pending));
        }
        if pending >= self.max_bytes / 10 * 8 && !self.warned.swap(true, Ordering::Relaxed) {
            tracing::error!(
                unshipped = pending,
                max = self.max_bytes,
                "audit spool is over 80 % full: PostgreSQL has not taken records for a while; calls will be refused when it is full"
            );
        }
        // The body first, serialized straight into the line (canonical
        // JSON, embedded verbatim, exactly as `ChainedRecord` reads it
        // back); the writer adds the chain fields once the hash is known.
        let mut line = Vec::with_capacity(1024);
        line.extend_from_slice(b"{\"body\":");
        serde_json::to_writer(&mut line, record).map_err(|e| AuditError::Io(e.to_string()))?;
        let len = line.len() as u64;
        let sh = &self.shared;
        let ticket = {
            let mut q = sh.queue.lock().unwrap_or_else(PoisonError::into_inner);
            if q.closed {
                return Err(AuditError::Io("the spool is closed".into()));
            }
            q.last_ticket += 1;
            let ticket = q.last_ticket;
            q.items.push(Queued {
                ticket,
                line,
                id: record.id,
                at_nanos: i64::try_from(record.timestamp.unix_timestamp_nanos())
                    .unwrap_or(i64::MAX),
                tenant: record.tenant_id,
            });
            ticket
        };
        sh.queued.fetch_add(len, Ordering::Relaxed);
        sh.wake.notify_one();
        Ok(Appended(Some((sh.progress.subscribe(), ticket))))
    }

    /// Flushes the segment to disk now if anything was appended.
    ///
    /// # Errors
    /// When fsync fails.
    pub fn sync(&self) -> std::io::Result<()> {
        if self.shared.dirty.swap(false, Ordering::AcqRel) {
            let file = self
                .shared
                .writer
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .file
                .try_clone()?;
            file.sync_data()?;
        }
        Ok(())
    }

    /// Group fsync every `every` until cancelled (then once more).
    pub async fn flusher(self: Arc<Self>, every: Duration, cancel: CancellationToken) {
        loop {
            let stop = tokio::select! {
                () = cancel.cancelled() => true,
                () = tokio::time::sleep(every) => false,
            };
            let me = self.clone();
            match tokio::task::spawn_blocking(move || me.sync()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!("audit spool fsync failed: {e}"),
                Err(e) => tracing::error!("audit spool fsync task failed: {e}"),
            }
            if stop {
                return;
            }
        }
    }
}

impl Shared {
    /// The writer thread: takes what is queued, writes it, tells the
    /// waiting calls; returns once the spool is closed and drained.
    fn writer_main(&self) {
        loop {
            let batch = {
                let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
                while q.items.is_empty() && !q.closed {
                    q = self.wake.wait(q).unwrap_or_else(PoisonError::into_inner);
                }
                if q.items.is_empty() {
                    return;
                }
                std::mem::take(&mut q.items)
            };
            let (first, last) = (batch[0].ticket, batch[batch.len() - 1].ticket);
            let queued: u64 = batch.iter().map(|q| q.line.len() as u64).sum();
            let result = self.write_batch(batch);
            self.queued.fetch_sub(queued, Ordering::Relaxed);
            if let Err(e) = &result {
                tracing::error!(records = last - first + 1, "audit spool write failed: {e}");
            }
            self.progress.send_modify(|p| {
                p.done = last;
                if let Err(e) = result {
                    p.failed.push_back((first, last, e));
                    if p.failed.len() > 64 {
                        p.failed.pop_front();
                    }
                }
            });
        }
    }

    /// Chains `batch` onto the head and writes it with one `write(2)`; on
    /// failure the head stays where it was (none of the batch is in it).
    fn write_batch(&self, batch: Vec<Queued>) -> Result<(), String> {
        let mut w = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        if w.len >= SEGMENT_BYTES {
            let next = w.segment + 1;
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(segment_path(&self.dir, next))
                .map_err(|e| e.to_string())?;
            let _ = w.file.sync_data();
            w.file = file;
            w.segment = next;
            w.len = 0;
        }
        let mut out = Vec::with_capacity(batch.iter().map(|q| q.line.len() + 320).sum());
        let mut seq = w.seq;
        let mut prev_hash = w.prev_hash.clone();
        for mut q in batch {
            seq += 1;
            let body = std::str::from_utf8(&q.line[BODY_AT..]).map_err(|e| e.to_string())?;
            let hash = link_hash_of(&self.chain_str, seq, &prev_hash, body);
            let _ = write!(
                q.line,
                ",\"chain_id\":\"{}\",\"seq\":{seq},\"prev_hash\":\"{prev_hash}\",\"hash\":\"{hash}\",\"id\":\"{}\",\"at_nanos\":{}",
                self.chain_str, q.id, q.at_nanos
            );
            match q.tenant {
                Some(t) => {
                    let _ = writeln!(q.line, ",\"tenant_id\":\"{t}\"}}");
                }
                None => q.line.extend_from_slice(b"}\n"),
            }
            out.extend_from_slice(&q.line);
            prev_hash = hash;
        }
        // One write of the whole batch: the OS has it when this returns.
        if let Err(e) = w.file.write_all(&out) {
            self.broken.store(true, Ordering::Relaxed);
            return Err(e.to_string());
        }
        self.broken.store(false, Ordering::Relaxed);
        w.seq = seq;
        w.prev_hash = prev_hash;
        w.len += out.len() as u64;
        self.unshipped
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        self.dirty.store(true, Ordering::Release);
        Ok(())
    }
}

impl Drop for Spool {
    /// Lets the writer finish what is queued, then stops it.
    fn drop(&mut self) {
        self.shared
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .closed = true;
        self.shared.wake.notify_one();
        if let Some(t) = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            let _ = t.join();
        }
    }
}

impl AuditSink for Spool {
    fn append(&self, record: &AuditRecord) -> Result<Appended, AuditError> {
        self.append_line(record)
    }

    fn check(&self) -> Result<(), AuditError> {
        let pending = self.pending();
        if pending >= self.max_bytes {
            return Err(AuditError::Full(pending));
        }
        if self.shared.broken.load(Ordering::Relaxed) {
            return Err(AuditError::Io("the last write failed".into()));
        }
        Ok(())
    }
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
    std::fs::rename(&tmp, path)
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
pub(crate) mod tests {
    use super::*;
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

    /// Waits for a queued record to be written.
    pub(crate) fn written(a: Appended) {
        futures::executor::block_on(a.written()).unwrap();
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
            written(s.append(&record(n)).unwrap());
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
        written(s.append(&record(3)).unwrap());
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
        assert_eq!(super::super::chain::first_break(&all, None), None);
    }

    #[test]
    fn a_full_spool_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), 600).unwrap();
        let mut refused = false;
        for n in 0..10 {
            match s.append(&record(n)) {
                Ok(a) => written(a),
                Err(e) => {
                    assert!(matches!(e, AuditError::Full(_)), "{e}");
                    refused = true;
                    break;
                }
            }
        }
        assert!(refused);
        s.shipped(s.unshipped());
        written(s.append(&record(99)).unwrap());
    }
}
