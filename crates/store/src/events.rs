//! The event log (`credential_events`): every committed change appends
//! one event in its own transaction, in `seq` order; the listener
//! (`rotation::listener`) and `events_after` read it back.

use std::str::FromStr as _;

use deadpool_postgres::Transaction;
use tokio_postgres::Row;

use credbroker_core::broker::{
    error::MetadataStoreError,
    ports::ChangedBy,
    types::{CredentialEvent, CredentialRecord, EventKind, ExchangeId, TenantId},
};

use super::{pg_err, to_i64, to_u64};

/// Taken by every transaction right before it appends an event, and held to
/// commit: events become visible in `seq` order, so a reader that has seen
/// seq N has seen every event below N.
pub(crate) const EVENT_ORDER_LOCK: i64 = 0x6372_6564_6272_6b72; // "credbrkr"
pub(crate) const EVENT_COLS: &str =
    "seq, tenant_id, exchange, kind, version, previous_version, previous_valid_until, occurred_at";

/// Maps an event row.
///
/// # Errors
/// `Other` for a row with an unknown exchange or kind.
pub fn row_to_event(row: &Row) -> Result<CredentialEvent, MetadataStoreError> {
    let exchange: String = row.get("exchange");
    let kind: String = row.get("kind");
    Ok(CredentialEvent {
        seq: to_u64(row.get("seq")),
        tenant: TenantId::new(row.get("tenant_id")),
        exchange: ExchangeId::from_str(&exchange).map_err(MetadataStoreError::Other)?,
        kind: EventKind::parse(&kind)
            .ok_or_else(|| MetadataStoreError::Other(format!("bad event kind {kind}")))?,
        version: to_u64(row.get("version")),
        previous_version: row.get::<_, Option<i64>>("previous_version").map(to_u64),
        previous_valid_until: row.get("previous_valid_until"),
        occurred_at: row.get("occurred_at"),
    })
}

/// The retire job's pass, as its PREVIOUS_EXPIRED events name it (each
/// retirement's audit record carries its own request id).
pub(crate) fn retire_job() -> ChangedBy {
    ChangedBy {
        actor: "system:retire (system)".into(),
        request_id: None,
    }
}

/// Appends the event describing `record`'s new state and stamps its seq on
/// the row (`event_seq`, what the cache orders loads by); returns the event
/// and sets `record.event_seq`.
pub(crate) async fn append_event(
    tx: &Transaction<'_>,
    record: &mut CredentialRecord,
    kind: EventKind,
    by: &ChangedBy,
) -> Result<CredentialEvent, MetadataStoreError> {
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&EVENT_ORDER_LOCK])
        .await
        .map_err(pg_err)?;
    let version = if kind == EventKind::Deleted {
        0
    } else {
        to_i64(record.current_version)
    };
    let row = tx
        .query_one(
            &format!(
                "WITH ev AS (INSERT INTO credential_events (tenant_id, exchange, kind, version, previous_version, previous_valid_until, actor, request_id) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {EVENT_COLS}), \
                 stamped AS (UPDATE tenant_credentials SET event_seq = (SELECT seq FROM ev) \
                 WHERE tenant_id = $1 AND exchange = $2) \
                 SELECT * FROM ev"
            ),
            &[
                &record.tenant.as_uuid(),
                &record.exchange.as_str(),
                &kind.as_str(),
                &version,
                &record.previous_version.map(to_i64),
                &record.previous_valid_until,
                &by.actor,
                &by.request_id,
            ],
        )
        .await
        .map_err(pg_err)?;
    let event = row_to_event(&row)?;
    record.event_seq = event.seq;
    Ok(event)
}
