//! Protobuf ↔ domain conversions. Requests are destructured field by field,
//! so a new proto field is a compile error here until it is handled.

use prost_types::Timestamp;
use secrecy::SecretString;
use time::OffsetDateTime;
use tonic::Status;

use super::{pb, status::bad_field};
use crate::broker::CredentialView;
use crate::broker::types::{
    Adoption, CredentialEvent, CredentialRecord, CredentialSet, CredentialStatus, EventKind,
    ExchangeId, MAX_FIELD_LEN, Permissions, TenantId,
};

/// Parses the (tenant_id, exchange) pair every request carries.
///
/// # Errors
/// INVALID_ARGUMENT naming the field.
pub fn target(tenant_id: &str, exchange: &str) -> Result<(TenantId, ExchangeId), Status> {
    Ok((tenant(tenant_id)?, exchange_id("exchange", exchange)?))
}

/// Parses a tenant id.
///
/// # Errors
/// INVALID_ARGUMENT naming `tenant_id`.
pub fn tenant(tenant_id: &str) -> Result<TenantId, Status> {
    if tenant_id.is_empty() {
        return Err(bad_field("tenant_id", "is required"));
    }
    tenant_id
        .parse()
        .map_err(|e: String| bad_field("tenant_id", &e))
}

/// Parses an exchange name.
///
/// # Errors
/// INVALID_ARGUMENT naming `field`.
pub fn exchange_id(field: &str, exchange: &str) -> Result<ExchangeId, Status> {
    if exchange.is_empty() {
        return Err(bad_field(
            field,
            "is required (binance, bybit, okx, coinbase, kraken, kucoin)",
        ));
    }
    exchange.parse().map_err(|e: String| bad_field(field, &e))
}

/// Converts a request's credential set; size limits are checked here so an
/// oversized value never reaches a validator or a log.
///
/// # Errors
/// INVALID_ARGUMENT naming the field.
pub fn credential_set(set: Option<pb::CredentialSet>) -> Result<CredentialSet, Status> {
    let pb::CredentialSet {
        api_key,
        api_secret,
        passphrase,
    } = set.ok_or_else(|| bad_field("credentials", "is required"))?;
    for (field, len) in [
        ("credentials.api_key", api_key.len()),
        ("credentials.api_secret", api_secret.len()),
        (
            "credentials.passphrase",
            passphrase.as_ref().map_or(0, String::len),
        ),
    ] {
        if len > MAX_FIELD_LEN {
            return Err(bad_field(
                field,
                &format!("is {len} bytes; at most {MAX_FIELD_LEN} allowed"),
            ));
        }
    }
    Ok(CredentialSet {
        api_key,
        api_secret: SecretString::from(api_secret),
        passphrase: passphrase.map(SecretString::from),
    })
}

/// Builds the wire form of a set. The strings are copies the response owns;
/// tonic drops them after encoding.
pub fn set_to_pb(set: &CredentialSet) -> pb::CredentialSet {
    use secrecy::ExposeSecret as _;
    pb::CredentialSet {
        api_key: set.api_key.clone(),
        api_secret: set.api_secret.expose_secret().to_owned(),
        passphrase: set
            .passphrase
            .as_ref()
            .map(|p| p.expose_secret().to_owned()),
    }
}

/// A timestamp on the wire.
pub fn ts(t: OffsetDateTime) -> Timestamp {
    Timestamp {
        seconds: t.unix_timestamp(),
        nanos: i32::try_from(t.nanosecond()).unwrap_or(0),
    }
}

/// A timestamp from the wire.
///
/// # Errors
/// INVALID_ARGUMENT for a time out of range.
pub fn from_ts(t: &Timestamp) -> Result<OffsetDateTime, Status> {
    OffsetDateTime::from_unix_timestamp(t.seconds)
        .ok()
        .and_then(|d| d.replace_nanosecond(u32::try_from(t.nanos).ok()?).ok())
        .ok_or_else(|| bad_field("since", "is not a valid time"))
}

/// Decodes a ListAuditEvents page token: `<unix nanos>.<record id>`.
///
/// # Errors
/// INVALID_ARGUMENT naming `page_token`.
pub fn audit_page_token(token: &str) -> Result<Option<(OffsetDateTime, uuid::Uuid)>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || bad_field("page_token", "is not a token this broker gave out");
    let (nanos, id) = token.split_once('.').ok_or_else(bad)?;
    let at = nanos
        .parse::<i128>()
        .ok()
        .and_then(|n| OffsetDateTime::from_unix_timestamp_nanos(n).ok())
        .ok_or_else(bad)?;
    Ok(Some((at, uuid::Uuid::try_parse(id).map_err(|_| bad())?)))
}

/// The page token that continues after `row`.
pub fn audit_page_token_of(row: &crate::broker::ports::AuditRow) -> String {
    format!("{}.{}", row.at.unix_timestamp_nanos(), row.id)
}

/// An audit row on the wire (`None` for a body this broker cannot read).
pub fn audit_event(row: &crate::broker::ports::AuditRow) -> Option<pb::AuditEvent> {
    let r: crate::audit::AuditRecord = serde_json::from_str(&row.body).ok()?;
    Some(pb::AuditEvent {
        id: r.id.to_string(),
        timestamp: Some(ts(r.timestamp)),
        event_type: r.event_type.into_owned(),
        user: r.user,
        resource: r.resource.into_owned(),
        action: r.action.into_owned(),
        result: r.result.into_owned(),
        ip_address: r.ip_address.unwrap_or_default(),
        user_agent: r.user_agent.unwrap_or_default(),
        tenant_id: r.tenant_id.map(|t| t.to_string()).unwrap_or_default(),
        exchange: r
            .exchange
            .map(|e| e.as_str().to_owned())
            .unwrap_or_default(),
        versions: r.versions,
        request_id: r.request_id.to_string(),
        trace_id: r.trace_id.unwrap_or_default(),
        grpc_code: r.grpc_code.into_owned(),
        duration_ms: r.duration_ms,
        role: r.role.into_owned(),
        chain_id: row.chain_id.to_string(),
        seq: row.seq,
    })
}

/// A status on the wire.
pub fn status(s: CredentialStatus) -> i32 {
    (match s {
        CredentialStatus::Active => pb::CredentialStatus::Active,
        CredentialStatus::Expired => pb::CredentialStatus::Expired,
        CredentialStatus::Invalid => pb::CredentialStatus::Invalid,
        CredentialStatus::Revoked => pb::CredentialStatus::Revoked,
    }) as i32
}

/// Permissions on the wire.
pub fn permissions(p: &Permissions) -> pb::Permissions {
    pb::Permissions {
        read: p.read,
        trade: p.trade,
        withdraw: p.withdraw,
        transfer: p.transfer,
        ip_restricted: p.ip_restricted,
        expires_at: p.expires_at.map(ts),
    }
}

/// Metadata on the wire.
pub fn metadata(r: &CredentialRecord) -> pb::CredentialMetadata {
    pb::CredentialMetadata {
        tenant_id: r.tenant.to_string(),
        exchange: r.exchange.as_str().to_owned(),
        status: status(r.status),
        version: r.current_version,
        previous_version: r.previous_version,
        previous_valid_until: r.previous_valid_until.map(ts),
        permissions: r.permissions.as_ref().map(permissions),
        vault_path: r.vault_path.clone(),
        last_validated_at: r.last_validated_at.map(ts),
        health_check_status: r.health.as_str().to_owned(),
        created_at: Some(ts(r.created_at)),
        updated_at: Some(ts(r.updated_at)),
        api_key_hint: r.api_key_hint.clone(),
        adoption: Vec::new(),
    }
}

/// Adoption on the wire; `on_previous` is judged against `r`.
pub fn adoption(r: &CredentialRecord, a: &[Adoption]) -> Vec<pb::Adoption> {
    a.iter()
        .map(|a| pb::Adoption {
            subscriber: a.subscriber.clone(),
            version: a.version,
            acked_at: Some(ts(a.acked_at)),
            on_previous: a.version < r.current_version,
        })
        .collect()
}

/// Health on the wire.
pub fn health(r: &CredentialRecord) -> pb::CredentialHealth {
    pb::CredentialHealth {
        tenant_id: r.tenant.to_string(),
        exchange: r.exchange.as_str().to_owned(),
        status: r.health.as_str().to_owned(),
        credential_status: status(r.status),
        checked_at: r.health_checked_at.map(ts),
        detail: r.health_detail.clone().unwrap_or_default(),
        permissions: r.permissions.as_ref().map(permissions),
        key_rotation: None,
    }
}

/// An event on the wire.
pub fn event(e: &CredentialEvent) -> pb::RotationEvent {
    let kind = match e.kind {
        EventKind::Stored => pb::EventKind::Stored,
        EventKind::Rotated => pb::EventKind::Rotated,
        EventKind::PreviousExpired => pb::EventKind::PreviousExpired,
        EventKind::Invalidated => pb::EventKind::Invalidated,
        EventKind::Deleted => pb::EventKind::Deleted,
    };
    pb::RotationEvent {
        seq: e.seq,
        tenant_id: e.tenant.to_string(),
        exchange: e.exchange.as_str().to_owned(),
        kind: kind as i32,
        version: e.version,
        previous_version: e.previous_version,
        previous_valid_until: e.previous_valid_until.map(ts),
        occurred_at: Some(ts(e.occurred_at)),
    }
}

/// Versions a read served: current, then the previous still open.
pub fn served_versions(view: &CredentialView) -> Vec<u64> {
    std::iter::once(view.record().current_version)
        .chain(view.previous().map(|(_, v, _)| v))
        .collect()
}

/// What GetCredentials answers for `view` (also sent on WatchRotations
/// streams with `include_credentials`).
pub fn credentials(view: &CredentialView) -> pb::GetCredentialsResponse {
    let (previous, previous_version, previous_valid_until) = match view.previous() {
        Some((set, v, until)) => (Some(set_to_pb(set)), Some(v), Some(ts(until))),
        None => (None, None, None),
    };
    pb::GetCredentialsResponse {
        current: Some(set_to_pb(view.current())),
        version: view.record().current_version,
        status: status(view.record().status),
        previous,
        previous_version,
        previous_valid_until,
        stale: view.stale,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use secrecy::ExposeSecret as _;

    use super::*;

    proptest! {
        /// Arbitrary request fields never panic a converter; whatever is
        /// accepted prints in canonical form and parses back to itself.
        #[test]
        fn converters_never_panic_and_round_trip(
            tenant_id in "\\PC{0,60}",
            exchange in "\\PC{0,20}",
            key in "\\PC{0,40}",
            secret in ".{0,40}",
            pass in proptest::option::of(".{0,20}"),
        ) {
            if let Ok((t, e)) = target(&tenant_id, &exchange) {
                let canonical = t.to_string();
                prop_assert_eq!(canonical.len(), 36);
                prop_assert_eq!(canonical.to_lowercase(), canonical.clone());
                prop_assert_eq!(target(&canonical, e.as_str()).unwrap(), (t, e));
            }
            let set = credential_set(Some(pb::CredentialSet {
                api_key: key.clone(),
                api_secret: secret.clone(),
                passphrase: pass.clone(),
            }))
            .unwrap();
            prop_assert_eq!(&set.api_key, &key);
            prop_assert_eq!(set.api_secret.expose_secret(), secret.as_str());
            prop_assert_eq!(set.passphrase.as_ref().map(|p| p.expose_secret().to_owned()), pass);
        }
    }
}
