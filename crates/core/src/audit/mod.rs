//! The audit trail: every call (allowed or denied, authentication failures
//! included) and every background action becomes one [`AuditRecord`],
//! appended to a local append-only [`spool`] before the response is sent
//! (fail closed: no record, no answer), hash-chained per replica, and
//! shipped to PostgreSQL (`audit_log`) in idempotent batches by [`ship`].
//! [`layer`] is the tower layer that records calls; [`chain`] checks a
//! chain for broken links (`credbroker audit verify`).
//!
//! One chain per replica, not one global chain: a global chain would need a
//! PostgreSQL round trip (or a cross-replica lock) per record, putting the
//! database on the GetCredentials hot path and making every read fail while
//! PostgreSQL is down. A replica's chain is appended at memory speed, keeps
//! working through an outage, and periodic anchors in PostgreSQL pin each
//! chain's head.

pub mod chain;

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::broker::types::{ExchangeId, TenantId};

/// One audited action: the seed's fields (timestamp, event_type, user,
/// resource, action, result, ip_address, user_agent) plus what an auditor
/// needs to tie it to a request. Never holds a secret: at most a masked key
/// hint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Unique id (UUIDv7: time-ordered); shipping is idempotent on it.
    pub id: Uuid,
    /// When it happened.
    #[serde(with = "time::serde::rfc3339")]
    pub timestamp: OffsetDateTime,
    /// secret_access, secret_write, metadata_access, auth_failure,
    /// permission_denied, rate_limited, system.
    pub event_type: Cow<'static, str>,
    /// Who acted.
    pub user: String,
    /// Their role (or "system").
    pub role: Cow<'static, str>,
    /// What was touched, e.g. `binance_api_key`.
    pub resource: Cow<'static, str>,
    /// The RPC or job.
    pub action: Cow<'static, str>,
    /// success, failure or denied.
    pub result: Cow<'static, str>,
    /// Peer address.
    pub ip_address: Option<String>,
    /// Client's user agent.
    pub user_agent: Option<String>,
    /// Tenant acted on.
    pub tenant_id: Option<TenantId>,
    /// Exchange acted on.
    pub exchange: Option<ExchangeId>,
    /// Credential versions involved.
    pub versions: Vec<u64>,
    /// Request id (also returned to the caller as `x-request-id`).
    pub request_id: Uuid,
    /// W3C trace id, when the caller sent `traceparent`.
    pub trace_id: Option<String>,
    /// gRPC status code name.
    pub grpc_code: Cow<'static, str>,
    /// Time to the response.
    pub duration_ms: f64,
    /// Masked key of the set written, if any.
    pub key_hint: Option<String>,
    /// For a record standing for many refused calls (overload, rate
    /// limits: see [`refusals`]), how many; absent for a single call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
}

impl AuditRecord {
    /// A background action of the system actor `job`.
    pub fn system(
        job: &str,
        action: &str,
        tenant: TenantId,
        exchange: impl Into<Option<ExchangeId>>,
        versions: Vec<u64>,
    ) -> Self {
        let exchange = exchange.into();
        let now = OffsetDateTime::now_utc();
        let id = Uuid::now_v7();
        Self {
            id,
            timestamp: now,
            event_type: Cow::Borrowed("system"),
            user: format!("system:{job}"),
            role: Cow::Borrowed("system"),
            resource: Cow::Borrowed(exchange.map_or("tenant_credentials", |e| e.audit_resource())),
            action: Cow::Owned(action.to_owned()),
            result: Cow::Borrowed("success"),
            ip_address: None,
            user_agent: None,
            tenant_id: Some(tenant),
            exchange,
            versions,
            // One record per action: its id is its request id too.
            request_id: id,
            trace_id: None,
            grpc_code: Cow::Borrowed("OK"),
            duration_ms: 0.0,
            key_hint: None,
            count: None,
        }
    }

    /// This record as the *request* record of an action about to change
    /// state: written before it has any effect, no result yet (`requested`,
    /// `PENDING`), linked to its outcome by `request_id`.
    #[must_use]
    pub fn into_request(self) -> Self {
        Self {
            result: Cow::Borrowed("requested"),
            grpc_code: Cow::Borrowed("PENDING"),
            duration_ms: 0.0,
            ..self
        }
    }

    /// The record a spool that could not be written appends to prove it can
    /// again (the trail shows where the refusals ended).
    pub fn audit_probe() -> Self {
        let id = Uuid::now_v7();
        Self {
            id,
            timestamp: OffsetDateTime::now_utc(),
            event_type: Cow::Borrowed("system"),
            user: "system:audit".into(),
            role: Cow::Borrowed("system"),
            resource: Cow::Borrowed("audit_log"),
            action: Cow::Borrowed("AuditSpoolRecovered"),
            result: Cow::Borrowed("success"),
            ip_address: None,
            user_agent: None,
            tenant_id: None,
            exchange: None,
            versions: Vec::new(),
            request_id: id,
            trace_id: None,
            grpc_code: Cow::Borrowed("OK"),
            duration_ms: 0.0,
            key_hint: None,
            count: None,
        }
    }

    /// The seed's log format (for SIEM export): its eight fields first, then
    /// ours.
    pub fn to_export_json(&self) -> serde_json::Value {
        serde_json::json!({
            "timestamp": self.timestamp.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
            "event_type": self.event_type,
            "user": self.user,
            "resource": self.resource,
            "action": self.action,
            "result": self.result,
            "ip_address": self.ip_address,
            "user_agent": self.user_agent,
            "role": self.role,
            "tenant_id": self.tenant_id.map(|t| t.to_string()),
            "exchange": self.exchange.map(|e| e.as_str()),
            "versions": self.versions,
            "request_id": self.request_id,
            "trace_id": self.trace_id,
            "grpc_code": self.grpc_code,
            "duration_ms": self.duration_ms,
            "key_hint": self.key_hint,
            "id": self.id,
        })
    }
}

impl AuditRecord {
    /// Appends the record's canonical JSON to `out`: byte for byte what
    /// `serde_json::to_writer(out, self)` writes (a test holds the two
    /// equal), without serde's per-field dispatch and with escaping only
    /// where a field can hold text from outside (this runs once per call).
    ///
    /// # Errors
    /// When the timestamp cannot be formatted (a year beyond 9999).
    pub fn write_json(&self, out: &mut Vec<u8>) -> Result<(), AuditError> {
        let mut id = Uuid::encode_buffer();
        let mut uuid = |out: &mut Vec<u8>, u: Uuid| {
            out.push(b'"');
            out.extend_from_slice(u.as_hyphenated().encode_lower(&mut id).as_bytes());
            out.push(b'"');
        };
        out.extend_from_slice(b"{\"id\":");
        uuid(out, self.id);
        out.extend_from_slice(b",\"timestamp\":\"");
        self.timestamp
            .format_into(out, &time::format_description::well_known::Rfc3339)
            .map_err(|e| AuditError::Io(format!("audit record timestamp: {e}")))?;
        out.push(b'"');
        for (key, value) in [
            (&b",\"event_type\":"[..], &*self.event_type),
            (b",\"user\":", &self.user),
            (b",\"role\":", &self.role),
            (b",\"resource\":", &self.resource),
            (b",\"action\":", &self.action),
            (b",\"result\":", &self.result),
        ] {
            out.extend_from_slice(key);
            json_str(out, value);
        }
        out.extend_from_slice(b",\"ip_address\":");
        json_opt_str(out, self.ip_address.as_deref());
        out.extend_from_slice(b",\"user_agent\":");
        json_opt_str(out, self.user_agent.as_deref());
        out.extend_from_slice(b",\"tenant_id\":");
        match self.tenant_id {
            Some(t) => uuid(out, t.as_uuid()),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"exchange\":");
        json_opt_str(out, self.exchange.map(|e| e.as_str()));
        out.extend_from_slice(b",\"versions\":[");
        let mut digits = itoa::Buffer::new();
        for (i, v) in self.versions.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(digits.format(*v).as_bytes());
        }
        out.extend_from_slice(b"],\"request_id\":");
        uuid(out, self.request_id);
        out.extend_from_slice(b",\"trace_id\":");
        json_opt_str(out, self.trace_id.as_deref());
        out.extend_from_slice(b",\"grpc_code\":");
        json_str(out, &self.grpc_code);
        out.extend_from_slice(b",\"duration_ms\":");
        // serde_json's own float format (and `null` for a non-finite one).
        serde_json::to_writer(&mut *out, &self.duration_ms)
            .map_err(|e| AuditError::Io(e.to_string()))?;
        out.extend_from_slice(b",\"key_hint\":");
        json_opt_str(out, self.key_hint.as_deref());
        if let Some(n) = self.count {
            out.extend_from_slice(b",\"count\":");
            out.extend_from_slice(digits.format(n).as_bytes());
        }
        out.push(b'}');
        Ok(())
    }
}

/// A JSON string: verbatim when nothing in it needs escaping (the usual
/// case), else through serde_json, which escapes exactly the bytes below
/// 0x20, `"` and `\`.
fn json_str(out: &mut Vec<u8>, s: &str) {
    // Without a short cut, so the compiler can check many bytes at once.
    let plain = !s.bytes().fold(false, |esc, b| {
        esc | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if plain {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // Writing into a Vec cannot fail, and a str is always valid JSON.
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

fn json_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => json_str(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

/// Why a record could not be written. The call that needed it fails.
#[derive(Clone, Debug, Error)]
pub enum AuditError {
    /// The spool file cannot be written.
    #[error("the audit spool cannot be written ({0}); calls are refused until it can")]
    Io(String),
    /// The spool reached its bound (PostgreSQL has been away too long).
    #[error(
        "the audit spool is full ({0} bytes not yet shipped to PostgreSQL); calls are refused until it drains"
    )]
    Full(u64),
}

/// Where records go. The spool implements it; [`Discard`] keeps nothing
/// (unit tests of other parts).
pub trait AuditSink: Send + Sync + 'static {
    /// Appends `record` durably enough that a crash of this process loses
    /// it never (the OS has it before this returns).
    ///
    /// # Errors
    /// When the record cannot be kept: the caller must fail.
    fn append(&self, record: &AuditRecord) -> Result<(), AuditError>;

    /// Whether records are kept at all (`false` for [`Discard`], the sink
    /// of a broker with auditing off: callers skip building them).
    fn keeps(&self) -> bool {
        true
    }

    /// Hands `record` over to be written with whatever else is waiting
    /// (a group append: one write for every record the worker's other
    /// calls handed over meanwhile); the [`Ticket`] says when it is
    /// written and how that went. Nothing is written until some caller
    /// runs [`AuditSink::write_submitted`], which every submitter does
    /// itself until its ticket is settled, so no record waits on a thread
    /// the scheduler may wake late. The default writes at once.
    fn submit(&self, record: &AuditRecord) -> Ticket {
        Ticket::settled(self.append(record))
    }

    /// Writes every submitted record not yet written, in submission order,
    /// unless another caller is writing (then `false`, and the caller
    /// yields and tries again: the other writer may be taking its record
    /// too). With `wait`, waits for that writer instead; every record
    /// submitted before the call is written (or failed) when it returns.
    fn write_submitted(&self, wait: bool) -> bool {
        let _ = wait;
        true
    }

    /// Keeps `record`, which could not be appended after its call had an
    /// effect, to append once the sink can again. The default keeps nothing
    /// (and says so).
    fn defer(&self, record: AuditRecord) {
        tracing::error!(request_id = %record.request_id, "an audit record was lost");
    }

    /// Whether a record could be appended now; checked before a call runs,
    /// so a call that could not be audited changes nothing.
    ///
    /// # Errors
    /// The reason it could not.
    fn check(&self) -> Result<(), AuditError> {
        Ok(())
    }
}

/// A record handed to [`AuditSink::submit`]: settled once the record is
/// written or could not be. Clones share the outcome.
#[derive(Clone, Debug, Default)]
pub struct Ticket(std::sync::Arc<std::sync::OnceLock<Result<(), AuditError>>>);

impl Ticket {
    /// A ticket whose record is already written, or already failed.
    pub fn settled(result: Result<(), AuditError>) -> Self {
        let t = Self::default();
        t.settle(result);
        t
    }

    /// Records the outcome (the first one counts).
    pub fn settle(&self, result: Result<(), AuditError>) {
        let _ = self.0.set(result);
    }

    /// The outcome, once there is one.
    pub fn result(&self) -> Option<Result<(), AuditError>> {
        self.0.get().cloned()
    }
}

/// A sink that drops every record.
pub struct Discard;

impl AuditSink for Discard {
    fn append(&self, _: &AuditRecord) -> Result<(), AuditError> {
        Ok(())
    }

    fn keeps(&self) -> bool {
        false
    }
}

/// Parses the trace id out of a W3C `traceparent` header.
pub fn trace_id(traceparent: &str) -> Option<String> {
    let mut parts = traceparent.split('-');
    let (_version, trace) = (parts.next()?, parts.next()?);
    (trace.len() == 32
        && trace.bytes().all(|b| b.is_ascii_hexdigit())
        && trace.bytes().any(|b| b != b'0'))
    .then(|| trace.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record(text: &str, nanos: i128, versions: Vec<u64>, some: bool) -> AuditRecord {
        let mut r = AuditRecord::system(
            "retire",
            "Retire",
            TenantId::new(Uuid::new_v4()),
            ExchangeId::Kucoin,
            versions,
        );
        r.timestamp = OffsetDateTime::from_unix_timestamp_nanos(nanos).unwrap();
        r.user = text.to_owned();
        r.action = Cow::Owned(text.to_owned());
        r.user_agent = some.then(|| text.to_owned());
        r.ip_address = some.then(|| "::ffff:10.0.0.1".to_owned());
        r.trace_id = some.then(|| "4bf92f3577b34da6a3ce929d0e0e4736".to_owned());
        r.key_hint = some.then(|| format!("{text}****"));
        r.tenant_id = r.tenant_id.filter(|_| some);
        r.exchange = r.exchange.filter(|_| some);
        r.duration_ms = nanos as f64 / 7e9;
        r.count = some.then_some(nanos as u64);
        r
    }

    fn both(r: &AuditRecord) -> (String, String) {
        let mut ours = Vec::new();
        r.write_json(&mut ours).unwrap();
        (
            String::from_utf8(ours).unwrap(),
            serde_json::to_string(r).unwrap(),
        )
    }

    #[test]
    fn the_hand_written_json_is_serdes_for_edge_cases() {
        for text in [
            "",
            "plain",
            "q\"uote",
            "back\\slash",
            "nl\n\t\u{1}\u{1f}",
            "ünï ☃ \u{7f}",
        ] {
            for nanos in [0, 1, 1_764_000_000_123_456_789, 1_764_000_000_100_000_000] {
                for some in [true, false] {
                    let (ours, serde) = both(&record(
                        text,
                        nanos,
                        vec![3, 18_446_744_073_709_551_615],
                        some,
                    ));
                    assert_eq!(ours, serde);
                }
            }
        }
        // It reads back as the record.
        let mut r = record("q\"\n", 5, vec![1, 2], true);
        r.duration_ms = 0.25;
        let back: AuditRecord = serde_json::from_str(&both(&r).0).unwrap();
        assert_eq!(back, r);
        let mut r = record("x", 5, Vec::new(), true);
        r.duration_ms = f64::NAN;
        let (ours, serde) = both(&r);
        assert_eq!(ours, serde);
    }

    proptest! {
        #[test]
        fn the_hand_written_json_is_serdes(
            text in any::<String>(),
            nanos in 0i128..4_000_000_000_000_000_000,
            versions in proptest::collection::vec(any::<u64>(), 0..4),
            some in any::<bool>(),
        ) {
            let (ours, serde) = both(&record(&text, nanos, versions, some));
            prop_assert_eq!(ours, serde);
        }
    }
}
