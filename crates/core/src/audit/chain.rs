//! Checking a chain: every record's hash matches its content, every link
//! names the record before it, seqs run from 1 without a gap, and every
//! anchor stored in PostgreSQL still matches. The first broken link is
//! reported, saying what it means (an edit, a deletion, a reorder, a cut).

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

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
pub fn link_hash_of(chain_id: &str, seq: u64, prev_hash: &str, body: &str) -> String {
    let mut h = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    h.update(chain_id.as_bytes());
    h.update(b":");
    h.update(itoa::Buffer::new().format(seq).as_bytes());
    h.update(b":");
    h.update(prev_hash.as_bytes());
    h.update(b":");
    h.update(body.as_bytes());
    lower_hex(h.finish().as_ref())
}

/// Lower-case hex by table (the hex crate's encoder goes through a char
/// iterator: as much CPU as the SHA-256 itself on the spool's hot path).
fn lower_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// The first thing wrong with a chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Break {
    /// The chain does not start at seq 1: the records before were deleted.
    MissingStart {
        /// The first seq present.
        first: u64,
    },
    /// A record's content no longer matches its hash: it was edited.
    Edited {
        /// Its seq.
        seq: u64,
    },
    /// Seqs jump: records in between were deleted.
    Gap {
        /// The last seq before the gap.
        after: u64,
        /// The next seq present.
        next: u64,
    },
    /// A record does not link to the one before it: records were
    /// reordered, replaced or re-chained.
    Relinked {
        /// Its seq.
        seq: u64,
    },
    /// An anchor names a hash the chain no longer has at that seq, or a seq
    /// the chain no longer reaches (its tail was cut).
    Anchor {
        /// The anchored seq.
        seq: u64,
    },
    /// A stored column the hash does not cover directly (id, time, tenant)
    /// disagrees with the hashed body: the row was edited outside the chain
    /// (moved to another tenant, or out of a time window).
    Column {
        /// Its seq.
        seq: u64,
        /// The column that disagrees.
        column: &'static str,
    },
    /// A stored page's column (its seq range, count or time span) disagrees
    /// with the records it holds: the page was edited outside the chain
    /// (to hide it from a time window, say).
    Page {
        /// The seq of the page's first record.
        seq: u64,
        /// The column that disagrees.
        column: &'static str,
    },
}

impl fmt::Display for Break {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Break::MissingStart { first } => write!(
                f,
                "records 1..{} are missing (deleted); the chain starts at seq {first}",
                first - 1
            ),
            Break::Edited { seq } => write!(
                f,
                "record seq {seq} was edited (its hash no longer matches)"
            ),
            Break::Gap { after, next } => write!(
                f,
                "records after seq {after} up to {next} are missing (deleted)"
            ),
            Break::Relinked { seq } => write!(
                f,
                "record seq {seq} does not link to the record before it (reordered or replaced)"
            ),
            Break::Anchor { seq } => write!(
                f,
                "the anchor at seq {seq} no longer matches the chain (records rewritten or the tail cut)"
            ),
            Break::Column { seq, column } => write!(
                f,
                "record seq {seq}'s stored `{column}` disagrees with its hashed body (the row was edited)"
            ),
            Break::Page { seq, column } => write!(
                f,
                "the page from record seq {seq}: its stored `{column}` disagrees with its records (the page was edited)"
            ),
        }
    }
}

/// One record's place in its chain, as a spool line or a stored row has it.
#[derive(Clone, Copy)]
pub struct LinkRef<'a> {
    chain_id: uuid::Uuid,
    seq: u64,
    prev_hash: &'a str,
    hash: &'a str,
    body: &'a str,
}

/// Anything that holds a chain link (a spool line, a stored row).
pub trait Link {
    /// Its link.
    fn link(&self) -> LinkRef<'_>;
}

impl Link for ChainedRecord {
    fn link(&self) -> LinkRef<'_> {
        LinkRef {
            chain_id: self.chain_id,
            seq: self.seq,
            prev_hash: &self.prev_hash,
            hash: &self.hash,
            body: &self.body,
        }
    }
}

impl Link for crate::broker::ports::AuditRow {
    fn link(&self) -> LinkRef<'_> {
        LinkRef {
            chain_id: self.chain_id,
            seq: self.seq,
            prev_hash: &self.prev_hash,
            hash: &self.hash,
            body: &self.body,
        }
    }
}

/// The first broken link of one chain (`records` sorted by seq), checking
/// `anchors` (seq, hash) too when given.
pub fn first_break<L: Link>(records: &[L], anchors: Option<&[(u64, String)]>) -> Option<Break> {
    first_break_after(records, None, anchors.unwrap_or_default())
}

/// [`first_break`] of a chain whose start retention removed: `cut` is the
/// last removed record (seq, hash), which the oldest retained record must
/// follow; anchors at or before it name removed records and are skipped.
pub fn first_break_after<L: Link>(
    records: &[L],
    cut: Option<&(u64, String)>,
    anchors: &[(u64, String)],
) -> Option<Break> {
    let (start, genesis) = cut.map_or((1, GENESIS), |(seq, hash)| (seq + 1, hash.as_str()));
    let anchors = anchors.iter().filter(|(seq, _)| *seq >= start);
    let Some(first) = records.first() else {
        // Every record gone: only anchors past the cut are wrong.
        return anchors.map(|(seq, _)| Break::Anchor { seq: *seq }).next();
    };
    if first.link().seq != start {
        return Some(Break::MissingStart {
            first: first.link().seq,
        });
    }
    let mut prev: Option<LinkRef<'_>> = None;
    for r in records.iter().map(Link::link) {
        // A gap first: where the store derives each `prev_hash` from the
        // record before, the record after a deletion has none.
        if let Some(p) = prev.filter(|p| r.seq != p.seq + 1) {
            return Some(Break::Gap {
                after: p.seq,
                next: r.seq,
            });
        }
        if r.hash != link_hash(r.chain_id, r.seq, r.prev_hash, r.body) {
            return Some(Break::Edited { seq: r.seq });
        }
        match prev {
            None if r.prev_hash != genesis => return Some(Break::Relinked { seq: r.seq }),
            Some(p) if r.prev_hash != p.hash => return Some(Break::Relinked { seq: r.seq }),
            _ => {}
        }
        prev = Some(r);
    }
    for (seq, hash) in anchors {
        let found = usize::try_from(seq - start)
            .ok()
            .and_then(|i| records.get(i));
        if found.is_none_or(|r| r.link().hash != hash) {
            return Some(Break::Anchor { seq: *seq });
        }
    }
    None
}

/// The first stored column of `row` that disagrees with its hashed body
/// (`chain_id` and `seq` are inputs of the hash itself; `id`, `at` and
/// `tenant_id` are checked here), or `None` when they all agree.
pub fn column_mismatch(row: &crate::broker::ports::AuditRow) -> Option<&'static str> {
    let Ok(body) = serde_json::from_str::<super::AuditRecord>(&row.body) else {
        return Some("body");
    };
    if body.id != row.id {
        return Some("id");
    }
    if body.tenant_id != row.tenant {
        return Some("tenant_id");
    }
    // PostgreSQL keeps microseconds.
    if (body.timestamp - row.at).abs() >= time::Duration::microseconds(1) {
        return Some("at");
    }
    None
}

/// What `credbroker audit verify` found.
#[derive(Debug, Default)]
pub struct Report {
    /// Chains checked.
    pub chains: usize,
    /// Chains with a broken link.
    pub broken: usize,
    /// One line per chain.
    pub lines: Vec<String>,
}

/// Checks every chain (records in seq order, with its anchors).
pub fn verify_all(chains: &[crate::broker::ports::AuditChain]) -> Report {
    let mut report = Report::default();
    for crate::broker::ports::AuditChain {
        chain_id,
        rows,
        anchors,
        cut,
        misfiled,
    } in chains
    {
        report.chains += 1;
        let found = first_break_after(rows, cut.as_ref(), anchors)
            .or_else(|| {
                rows.iter().find_map(|r| {
                    column_mismatch(r).map(|column| Break::Column { seq: r.seq, column })
                })
            })
            .or_else(|| {
                misfiled
                    .first()
                    .map(|(seq, column)| Break::Page { seq: *seq, column })
            });
        match found {
            Some(b) => {
                report.broken += 1;
                let id = match &b {
                    Break::Edited { seq }
                    | Break::Relinked { seq }
                    | Break::Column { seq, .. }
                    | Break::Page { seq, .. } => rows
                        .iter()
                        .find(|r| r.seq == *seq)
                        .map(|r| format!(" (record id {})", r.id))
                        .unwrap_or_default(),
                    _ => String::new(),
                };
                report
                    .lines
                    .push(format!("chain {chain_id}: BROKEN: {b}{id}"));
            }
            None => report.lines.push(format!(
                "chain {chain_id}: ok, {} records, {} anchors{}",
                rows.len(),
                anchors.len(),
                cut.as_ref()
                    .map(|(seq, _)| format!(
                        ", from seq {} (retention removed the ones before)",
                        seq + 1
                    ))
                    .unwrap_or_default()
            )),
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;

    #[test]
    fn link_hashes_are_sha256_in_lower_hex() {
        // An independent computation: the digest of the same input, hex by
        // the hex crate.
        let id = "0b2c7a4e-5f1d-4c2a-9e3b-7d6f8a9b0c1d";
        let want = hex::encode(
            aws_lc_rs::digest::digest(
                &aws_lc_rs::digest::SHA256,
                format!("{id}:7:{GENESIS}:{{\"n\":7}}").as_bytes(),
            )
            .as_ref(),
        );
        assert_eq!(link_hash_of(id, 7, GENESIS, "{\"n\":7}"), want);
        assert_eq!(lower_hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
    }

    fn chain(n: u64) -> Vec<ChainedRecord> {
        let id = Uuid::new_v4();
        let mut prev = GENESIS.to_owned();
        (1..=n)
            .map(|seq| {
                let body = format!("{{\"n\":{seq}}}");
                let hash = link_hash(id, seq, &prev, &body);
                let r = ChainedRecord {
                    chain_id: id,
                    seq,
                    prev_hash: prev.clone(),
                    hash: hash.clone(),
                    body,
                    ..ChainedRecord::default()
                };
                prev = hash;
                r
            })
            .collect()
    }

    #[test]
    fn every_kind_of_tampering_is_named() {
        let c = chain(5);
        let anchors = vec![(5, c[4].hash.clone())];
        assert_eq!(first_break(&c, Some(&anchors)), None);

        let mut edited = c.clone();
        edited[2].body = "{\"n\":99}".into();
        assert_eq!(first_break(&edited, None), Some(Break::Edited { seq: 3 }));

        let mut deleted = c.clone();
        deleted.remove(2);
        assert_eq!(
            first_break(&deleted, None),
            Some(Break::Gap { after: 2, next: 4 })
        );

        let mut swapped = c.clone();
        swapped.swap(1, 2);
        let (a, b) = (swapped[1].seq, swapped[2].seq);
        swapped[1].seq = b;
        swapped[2].seq = a;
        // Swapping seqs edits the hashed content.
        assert!(matches!(
            first_break(&swapped, None),
            Some(Break::Edited { .. })
        ));

        let head_cut = c[1..].to_vec();
        assert_eq!(
            first_break(&head_cut, None),
            Some(Break::MissingStart { first: 2 })
        );

        let tail_cut = c[..3].to_vec();
        assert_eq!(
            first_break(&tail_cut, Some(&anchors)),
            Some(Break::Anchor { seq: 5 })
        );

        // A record re-hashed after an edit still breaks the next link.
        let mut rehashed = c.clone();
        rehashed[2].body = "{\"n\":99}".into();
        rehashed[2].hash = link_hash(
            rehashed[2].chain_id,
            3,
            &rehashed[2].prev_hash,
            &rehashed[2].body,
        );
        assert_eq!(
            first_break(&rehashed, None),
            Some(Break::Relinked { seq: 4 })
        );
    }

    #[test]
    fn a_chain_cut_by_retention_starts_after_its_cut() {
        let c = chain(6);
        let cut = (2, c[1].hash.clone());
        let anchors = vec![(2, c[1].hash.clone()), (6, c[5].hash.clone())];
        let kept = &c[2..];
        assert_eq!(first_break_after(kept, Some(&cut), &anchors), None);
        // Without the cut the same records are a deleted start.
        assert_eq!(
            first_break_after(kept, None, &[]),
            Some(Break::MissingStart { first: 3 })
        );
        // Records removed past the cut are still a deleted start.
        assert_eq!(
            first_break_after(&c[3..], Some(&cut), &[]),
            Some(Break::MissingStart { first: 4 })
        );
        // A cut that names another hash than the oldest record links to.
        let forged = (2, c[0].hash.clone());
        assert_eq!(
            first_break_after(kept, Some(&forged), &[]),
            Some(Break::Relinked { seq: 3 })
        );
        // Everything removed: anchors before the cut are fine, after it not.
        let none: &[ChainedRecord] = &[];
        let all = (6, c[5].hash.clone());
        assert_eq!(first_break_after(none, Some(&all), &anchors), None);
        assert_eq!(
            first_break_after(none, Some(&cut), &anchors),
            Some(Break::Anchor { seq: 6 })
        );
    }
}
