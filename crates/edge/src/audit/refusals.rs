//! Refused calls, counted rather than recorded one by one: a call refused
//! for overload (before anything about it is known), for a rate limit, or
//! because the audit spool could not take records, is tallied per caller, method, code and tenant, and every [`INTERVAL`] each
//! tally becomes one record with its `count`, first time and span. A flood
//! of refusals is visible in the trail without the trail amplifying it (one
//! record per caller and ten seconds, not one per call; the refusal itself
//! costs a map update, no write).
//!
//! Ten seconds: short enough that an attack shows in ListAuditEvents while
//! it happens, long enough that a client hammering at 10,000 calls/s costs
//! one record per interval.

use std::{
    borrow::Cow,
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{AuditRecord, AuditSink};
use crate::broker::types::TenantId;

/// How often tallies become records.
pub const INTERVAL: Duration = Duration::from_secs(10);
/// Distinct tallies kept per interval; beyond, refusals are tallied under
/// one "many callers" entry per method and code.
const MAX_KEYS: usize = 10_000;

/// Why a call was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// Shed at the door: too many calls in flight.
    Overloaded,
    /// Over its tenant's (or operator's) rate limit.
    RateLimited,
    /// The audit spool could not take records (the tally is written once
    /// it can again).
    AuditUnavailable,
}

impl Refusal {
    fn event_type(self) -> &'static str {
        match self {
            Refusal::Overloaded => "overloaded",
            Refusal::RateLimited => "rate_limited",
            Refusal::AuditUnavailable => "audit_unavailable",
        }
    }

    fn code(self) -> &'static str {
        match self {
            Refusal::Overloaded | Refusal::RateLimited => "RESOURCE_EXHAUSTED",
            Refusal::AuditUnavailable => "UNAVAILABLE",
        }
    }
}

/// Who a refused call came from.
#[derive(Clone, Debug)]
pub enum Who {
    /// Known (the call got past authentication): subject and role.
    Known(Arc<str>, &'static str),
    /// Refused before authentication: its connection's certificate chain
    /// (read at flush time, once per tally).
    Connection(Option<Arc<Vec<CertificateDer<'static>>>>),
    /// Past `MAX_KEYS` distinct callers in one interval.
    Many,
}

impl PartialEq for Who {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Who::Known(a, r), Who::Known(b, s)) => a == b && r == s,
            (Who::Connection(a), Who::Connection(b)) => match (a, b) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            },
            (Who::Many, Who::Many) => true,
            _ => false,
        }
    }
}

impl Eq for Who {}

impl std::hash::Hash for Who {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        match self {
            Who::Known(s, r) => (0u8, s, r).hash(h),
            Who::Connection(c) => (1u8, c.as_ref().map(|c| Arc::as_ptr(c) as usize)).hash(h),
            Who::Many => 2u8.hash(h),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    who: Who,
    ip: Option<IpAddr>,
    action: Cow<'static, str>,
    why: Refusal,
    tenant: Option<TenantId>,
}

#[derive(Debug)]
struct Tally {
    count: u64,
    first: OffsetDateTime,
    last: OffsetDateTime,
}

/// The tallies of one replica.
pub struct Refusals {
    sink: Arc<dyn AuditSink>,
    tallies: Mutex<HashMap<Key, Tally>>,
}

impl Refusals {
    /// Tallies written into `sink`.
    pub fn new(sink: Arc<dyn AuditSink>) -> Arc<Self> {
        Arc::new(Self {
            sink,
            tallies: Mutex::default(),
        })
    }

    /// Counts one refused call.
    pub fn note(
        &self,
        who: Who,
        ip: Option<IpAddr>,
        action: Cow<'static, str>,
        why: Refusal,
        tenant: Option<TenantId>,
    ) {
        let now = OffsetDateTime::now_utc();
        let mut t = self.tallies.lock().unwrap_or_else(PoisonError::into_inner);
        let mut key = Key {
            who,
            ip,
            action,
            why,
            tenant,
        };
        if t.len() >= MAX_KEYS && !t.contains_key(&key) {
            key = Key {
                who: Who::Many,
                ip: None,
                tenant: None,
                ..key
            };
        }
        let e = t.entry(key).or_insert(Tally {
            count: 0,
            first: now,
            last: now,
        });
        e.count += 1;
        e.last = now;
    }

    /// Writes one record per tally; tallies that cannot be written are kept
    /// for the next flush. Returns how many records were written.
    pub fn flush(&self) -> usize {
        let taken =
            std::mem::take(&mut *self.tallies.lock().unwrap_or_else(PoisonError::into_inner));
        let mut written = 0;
        let mut kept = HashMap::new();
        for (key, tally) in taken {
            let record = record_of(&key, &tally);
            if self.sink.append(&record).is_ok() {
                written += 1;
            } else {
                kept.insert(key, tally);
            }
        }
        if !kept.is_empty() {
            let mut t = self.tallies.lock().unwrap_or_else(PoisonError::into_inner);
            for (key, tally) in kept {
                let e = t.entry(key).or_insert(Tally {
                    count: 0,
                    first: tally.first,
                    last: tally.last,
                });
                e.count += tally.count;
                e.first = e.first.min(tally.first);
                e.last = e.last.max(tally.last);
            }
        }
        written
    }

    /// Flushes every `every` until cancelled, then once more.
    pub async fn task_main(self: Arc<Self>, every: Duration, cancel: CancellationToken) {
        loop {
            let stop = tokio::select! {
                () = cancel.cancelled() => true,
                () = tokio::time::sleep(every) => false,
            };
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || me.flush()).await;
            if stop {
                return;
            }
        }
    }
}

fn record_of(key: &Key, tally: &Tally) -> AuditRecord {
    let (user, role) = match &key.who {
        Who::Known(s, r) => (s.to_string(), *r),
        Who::Connection(chain) => (
            chain
                .as_ref()
                .and_then(|c| c.first())
                .map(|leaf| crate::tls::uri_sans(leaf.as_ref()))
                .and_then(|sans| sans.into_iter().next())
                // A SPIFFE ID is at most 2,048 bytes; anything longer is cut.
                .map_or_else(
                    || "unauthenticated".to_owned(),
                    |id| id.chars().take(2048).collect(),
                ),
            "unverified",
        ),
        Who::Many => ("many callers".to_owned(), "none"),
    };
    let id = Uuid::now_v7();
    AuditRecord {
        id,
        timestamp: tally.first,
        event_type: Cow::Borrowed(key.why.event_type()),
        user,
        role: Cow::Borrowed(role),
        resource: Cow::Borrowed("tenant_credentials"),
        action: key.action.clone(),
        result: Cow::Borrowed("denied"),
        ip_address: key.ip.map(|ip| ip.to_string()),
        user_agent: None,
        tenant_id: key.tenant,
        exchange: None,
        versions: Vec::new(),
        request_id: id,
        trace_id: None,
        grpc_code: Cow::Borrowed(key.why.code()),
        duration_ms: (tally.last - tally.first).as_seconds_f64() * 1e3,
        key_hint: None,
        count: Some(tally.count),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Kept(Mutex<Vec<AuditRecord>>);

    impl AuditSink for Kept {
        fn append(&self, record: &AuditRecord) -> Result<(), super::super::AuditError> {
            self.0.lock().unwrap().push(record.clone());
            Ok(())
        }
    }

    #[test]
    fn a_flood_becomes_one_record_per_caller_method_and_code() {
        let sink = Arc::new(Kept::default());
        let r = Refusals::new(sink.clone());
        let t = TenantId::new(Uuid::new_v4());
        let alice: Arc<str> = Arc::from("alice");
        for _ in 0..500 {
            r.note(
                Who::Known(alice.clone(), "trader"),
                None,
                Cow::Borrowed("GetCredentials"),
                Refusal::RateLimited,
                Some(t),
            );
        }
        for _ in 0..7 {
            r.note(
                Who::Connection(None),
                Some("127.0.0.1".parse().unwrap()),
                Cow::Borrowed("Rotate"),
                Refusal::Overloaded,
                None,
            );
        }
        assert_eq!(r.flush(), 2);
        let got = sink.0.lock().unwrap();
        let limited = got.iter().find(|x| x.event_type == "rate_limited").unwrap();
        assert_eq!((limited.count, limited.tenant_id), (Some(500), Some(t)));
        let shed = got.iter().find(|x| x.event_type == "overloaded").unwrap();
        assert_eq!((shed.count, shed.action.as_ref()), (Some(7), "Rotate"));
        drop(got);
        assert_eq!(r.flush(), 0, "tallies start again after a flush");
    }
}
