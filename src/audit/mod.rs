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
pub mod layer;
pub mod ship;
pub mod spool;

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

    /// Whether a record could be appended now; checked before a call runs,
    /// so a call that could not be audited changes nothing.
    ///
    /// # Errors
    /// The reason it could not.
    fn check(&self) -> Result<(), AuditError> {
        Ok(())
    }
}

/// A sink that drops every record.
pub struct Discard;

impl AuditSink for Discard {
    fn append(&self, _: &AuditRecord) -> Result<(), AuditError> {
        Ok(())
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
