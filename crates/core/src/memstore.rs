//! In-memory implementations of the storage ports, for `credbroker dev` and
//! unit tests. They keep the same semantics as Vault KV v2 (versions,
//! check-and-set, destroy) and PostgreSQL (one atomic step per write, a
//! growing event sequence), but nothing survives the process.

use std::{collections::BTreeMap, sync::Mutex};

use async_trait::async_trait;
use time::OffsetDateTime;

use crate::broker::error::{MetadataStoreError, SecretStoreError};

use crate::broker::ports::{
    AuditLog, AuditRow, ChangedBy, FleetStore, HealthUpdate, MetadataStore, NewCredential, Notice,
    OutboxMessage, RotationCommit, SecretStore, VersionInfo, WebhookEndpoint, WebhookStore,
};

use crate::rotation::mint::{KeyRotation, KeyRotationStore, RotationSchedule, Scheduled};

use crate::broker::types::{
    Adoption, CredentialEvent, CredentialRecord, CredentialSet, CredentialStatus, EventKind,
    ExchangeId, HealthStatus, TenantId,
};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Versioned secrets in memory. Index `i` holds version `i + 1` with its
/// write time; `None` is a destroyed version.
#[derive(Default)]
pub struct MemorySecretStore {
    paths: Mutex<BTreeMap<String, Vec<StoredVersion>>>,
}

/// One version: when it was written, and its set (`None`: destroyed).
type StoredVersion = (OffsetDateTime, Option<CredentialSet>);

#[async_trait]
impl SecretStore for MemorySecretStore {
    async fn latest_version(&self, path: &str) -> Result<Option<u64>, SecretStoreError> {
        Ok(lock(&self.paths).get(path).map(|v| v.len() as u64))
    }

    async fn write(
        &self,
        path: &str,
        set: &CredentialSet,
        cas: u64,
    ) -> Result<u64, SecretStoreError> {
        let mut paths = lock(&self.paths);
        let versions = paths.entry(path.to_owned()).or_default();
        if versions.len() as u64 != cas {
            return Err(SecretStoreError::CasConflict {
                path: path.to_owned(),
            });
        }
        versions.push((OffsetDateTime::now_utc(), Some(set.clone())));
        Ok(versions.len() as u64)
    }

    async fn read(&self, path: &str, version: u64) -> Result<CredentialSet, SecretStoreError> {
        let paths = lock(&self.paths);
        let idx = usize::try_from(version).ok().and_then(|v| v.checked_sub(1));
        paths
            .get(path)
            .and_then(|v| idx.and_then(|i| v.get(i)))
            .and_then(|(_, set)| set.clone())
            .ok_or_else(|| SecretStoreError::NotFound {
                path: path.to_owned(),
                version,
            })
    }

    async fn destroy_versions(&self, path: &str, versions: &[u64]) -> Result<(), SecretStoreError> {
        if let Some(stored) = lock(&self.paths).get_mut(path) {
            for v in versions {
                if let Some(slot) = usize::try_from(*v)
                    .ok()
                    .and_then(|v| v.checked_sub(1))
                    .and_then(|i| stored.get_mut(i))
                {
                    slot.1 = None;
                }
            }
        }
        Ok(())
    }

    async fn purge(&self, path: &str) -> Result<(), SecretStoreError> {
        lock(&self.paths).remove(path);
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, SecretStoreError> {
        let prefix = format!("{}/", prefix.trim_end_matches('/'));
        let mut out: Vec<String> = lock(&self.paths)
            .keys()
            .filter_map(|p| p.strip_prefix(&prefix))
            .map(|rest| match rest.find('/') {
                Some(i) => rest[..=i].to_owned(),
                None => rest.to_owned(),
            })
            .collect();
        out.dedup();
        Ok(out)
    }

    async fn versions(&self, path: &str) -> Result<Vec<VersionInfo>, SecretStoreError> {
        Ok(lock(&self.paths)
            .get(path)
            .map(|v| {
                v.iter()
                    .zip(1..)
                    .map(|((at, set), version)| VersionInfo {
                        version,
                        created_at: *at,
                        destroyed: set.is_none(),
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn ping(&self) -> Result<(), SecretStoreError> {
        Ok(())
    }
}

#[derive(Default)]
struct MetaState {
    records: BTreeMap<(TenantId, ExchangeId), CredentialRecord>,
    events: Vec<CredentialEvent>,
    next_seq: u64,
    pruned_through: u64,
    acks: BTreeMap<(TenantId, ExchangeId, String), Adoption>,
    replicas: BTreeMap<uuid::Uuid, OffsetDateTime>,
    audit: BTreeMap<uuid::Uuid, AuditRow>,
    anchors: BTreeMap<(uuid::Uuid, u64), String>,
    leases: BTreeMap<String, (uuid::Uuid, OffsetDateTime)>,
    webhooks: BTreeMap<TenantId, WebhookEndpoint>,
    outbox: Vec<OutboxRow>,
    management: BTreeMap<(TenantId, ExchangeId), (String, RotationSchedule, OffsetDateTime)>,
    key_rotations: BTreeMap<uuid::Uuid, KeyRotation>,
}

/// A queued webhook message in memory.
struct OutboxRow {
    msg: OutboxMessage,
    next_attempt_at: Option<OffsetDateTime>,
}

impl OutboxRow {
    fn new(tenant: TenantId, n: Notice) -> Self {
        Self {
            msg: OutboxMessage {
                id: n.id,
                tenant,
                event_type: n.event_type.to_owned(),
                payload: n.payload,
                attempts: 0,
                endpoint: None,
            },
            next_attempt_at: Some(OffsetDateTime::now_utc()),
        }
    }
}

impl MetaState {
    /// Appends the event describing `record` and stamps its seq on the
    /// record (and on the stored row, if it still exists).
    fn append(
        &mut self,
        record: &mut CredentialRecord,
        kind: EventKind,
        now: OffsetDateTime,
    ) -> CredentialEvent {
        self.next_seq += 1;
        record.event_seq = self.next_seq;
        if let Some(row) = self.records.get_mut(&(record.tenant, record.exchange)) {
            row.event_seq = self.next_seq;
        }
        let event = CredentialEvent {
            seq: self.next_seq,
            tenant: record.tenant,
            exchange: record.exchange,
            kind,
            version: if kind == EventKind::Deleted {
                0
            } else {
                record.current_version
            },
            previous_version: record.previous_version,
            previous_valid_until: record.previous_valid_until,
            occurred_at: now,
        };
        self.events.push(event.clone());
        event
    }
}

#[async_trait]
impl AuditLog for MemoryMetadataStore {
    async fn ship_audit(&self, rows: Vec<AuditRow>) -> Result<(), MetadataStoreError> {
        let mut st = lock(&self.state);
        for r in rows {
            st.audit.entry(r.id).or_insert(r);
        }
        // Dev mode keeps the newest records only (ids are time-ordered).
        while st.audit.len() > MAX_AUDIT_ROWS {
            st.audit.pop_first();
        }
        Ok(())
    }

    async fn anchor_audit(
        &self,
        chain_id: uuid::Uuid,
        seq: u64,
        hash: &str,
    ) -> Result<(), MetadataStoreError> {
        lock(&self.state)
            .anchors
            .insert((chain_id, seq), hash.to_owned());
        Ok(())
    }

    async fn list_audit(
        &self,
        tenant: TenantId,
        before: Option<(OffsetDateTime, uuid::Uuid)>,
        since: Option<OffsetDateTime>,
        limit: u32,
    ) -> Result<Vec<AuditRow>, MetadataStoreError> {
        let st = lock(&self.state);
        let mut rows: Vec<AuditRow> = st
            .audit
            .values()
            .filter(|r| r.tenant == Some(tenant))
            .filter(|r| since.is_none_or(|s| r.at >= s))
            .filter(|r| before.is_none_or(|b| (r.at, r.id) < b))
            .cloned()
            .collect();
        rows.sort_by_key(|r| std::cmp::Reverse((r.at, r.id)));
        rows.truncate(limit as usize);
        Ok(rows)
    }
}

#[async_trait]
impl FleetStore for MemoryMetadataStore {
    async fn replica_heartbeat(
        &self,
        id: uuid::Uuid,
        now: OffsetDateTime,
        live_for: time::Duration,
    ) -> Result<u32, MetadataStoreError> {
        let mut st = lock(&self.state);
        st.replicas.insert(id, now);
        st.replicas.retain(|_, at| *at > now - live_for);
        Ok(u32::try_from(st.replicas.len()).unwrap_or(u32::MAX))
    }

    async fn credential_counts(
        &self,
    ) -> Result<Vec<(TenantId, ExchangeId, CredentialStatus, u64)>, MetadataStoreError> {
        let mut counts: BTreeMap<(TenantId, ExchangeId, &'static str), (CredentialStatus, u64)> =
            BTreeMap::new();
        for r in lock(&self.state).records.values() {
            counts
                .entry((r.tenant, r.exchange, r.status.as_str()))
                .or_insert((r.status, 0))
                .1 += 1;
        }
        Ok(counts
            .into_iter()
            .map(|((t, e, _), (s, n))| (t, e, s, n))
            .collect())
    }

    async fn due_for_check(
        &self,
        since: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<(TenantId, ExchangeId)>, MetadataStoreError> {
        let st = lock(&self.state);
        let mut due: Vec<_> = st
            .records
            .values()
            .filter(|r| {
                r.status == CredentialStatus::Active
                    && r.health_checked_at.is_none_or(|t| t < since)
            })
            .map(|r| (r.health_checked_at, r.tenant, r.exchange))
            .collect();
        due.sort();
        Ok(due
            .into_iter()
            .take(limit as usize)
            .map(|(_, t, e)| (t, e))
            .collect())
    }

    async fn take_lease(
        &self,
        name: &str,
        holder: uuid::Uuid,
        now: OffsetDateTime,
        ttl: time::Duration,
    ) -> Result<bool, MetadataStoreError> {
        let mut st = lock(&self.state);
        match st.leases.get(name) {
            Some((h, until)) if *h != holder && *until >= now => Ok(false),
            _ => {
                st.leases.insert(name.to_owned(), (holder, now + ttl));
                Ok(true)
            }
        }
    }
}

#[async_trait]
impl WebhookStore for MemoryMetadataStore {
    async fn set_webhook(
        &self,
        tenant: TenantId,
        endpoint: Option<WebhookEndpoint>,
    ) -> Result<(), MetadataStoreError> {
        let mut st = lock(&self.state);
        match endpoint {
            Some(e) => st.webhooks.insert(tenant, e),
            None => st.webhooks.remove(&tenant),
        };
        Ok(())
    }

    async fn webhook(
        &self,
        tenant: TenantId,
    ) -> Result<Option<WebhookEndpoint>, MetadataStoreError> {
        Ok(lock(&self.state).webhooks.get(&tenant).cloned())
    }

    async fn claim_due(
        &self,
        now: OffsetDateTime,
        lease: time::Duration,
        limit: u32,
    ) -> Result<Vec<OutboxMessage>, MetadataStoreError> {
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        let mut out = Vec::new();
        for row in &mut st.outbox {
            if out.len() >= limit as usize {
                break;
            }
            if row.next_attempt_at.is_some_and(|t| t <= now) {
                row.next_attempt_at = Some(now + lease);
                let mut msg = row.msg.clone();
                msg.endpoint = st.webhooks.get(&msg.tenant).cloned();
                out.push(msg);
            }
        }
        Ok(out)
    }

    async fn finish_attempt(
        &self,
        id: uuid::Uuid,
        delivered: bool,
        _result: &str,
        _now: OffsetDateTime,
        retry_at: Option<OffsetDateTime>,
    ) -> Result<(), MetadataStoreError> {
        let mut st = lock(&self.state);
        if delivered {
            st.outbox.retain(|r| r.msg.id != id);
        } else if let Some(row) = st.outbox.iter_mut().find(|r| r.msg.id == id) {
            row.msg.attempts += 1;
            row.next_attempt_at = retry_at;
        }
        Ok(())
    }

    async fn outbox_backlog(&self) -> Result<Vec<(TenantId, u64)>, MetadataStoreError> {
        let mut by_tenant = BTreeMap::<TenantId, u64>::new();
        for r in lock(&self.state)
            .outbox
            .iter()
            .filter(|r| r.next_attempt_at.is_some())
        {
            *by_tenant.entry(r.msg.tenant).or_default() += 1;
        }
        Ok(by_tenant.into_iter().collect())
    }
}

/// Audit records kept in memory at most (the oldest go first).
pub const MAX_AUDIT_ROWS: usize = 100_000;

/// Metadata and events in memory.
#[derive(Default)]
pub struct MemoryMetadataStore {
    state: Mutex<MetaState>,
    /// Set for tests that share one store between brokers standing in for
    /// replicas and deliver events by hand, as a listener would.
    by_listener: bool,
}

impl MemoryMetadataStore {
    /// A store shared by several brokers standing in for replicas: none
    /// publishes on commit; events are delivered as a listener would
    /// (`Broker::deliver`).
    pub fn shared_by_replicas() -> Self {
        Self {
            by_listener: true,
            ..Self::default()
        }
    }
}

#[async_trait]
impl MetadataStore for MemoryMetadataStore {
    fn event_delivery(&self) -> crate::broker::ports::EventDelivery {
        if self.by_listener {
            crate::broker::ports::EventDelivery::Listener
        } else {
            crate::broker::ports::EventDelivery::OnCommit
        }
    }

    async fn get(
        &self,
        tenant: TenantId,
        exchange: ExchangeId,
    ) -> Result<Option<CredentialRecord>, MetadataStoreError> {
        Ok(lock(&self.state).records.get(&(tenant, exchange)).cloned())
    }

    async fn list(&self, tenant: TenantId) -> Result<Vec<CredentialRecord>, MetadataStoreError> {
        Ok(self.snapshot(tenant).await?.0)
    }

    async fn snapshot(
        &self,
        tenant: TenantId,
    ) -> Result<(Vec<CredentialRecord>, u64), MetadataStoreError> {
        let st = lock(&self.state);
        let seq = st
            .events
            .iter()
            .filter(|e| e.tenant == tenant)
            .map(|e| e.seq)
            .max()
            .unwrap_or(0);
        let records = st
            .records
            .range((tenant, ExchangeId::Binance)..=(tenant, ExchangeId::Kucoin))
            .map(|(_, r)| r.clone())
            .collect();
        Ok((records, seq))
    }

    async fn insert(
        &self,
        new: NewCredential,
    ) -> Result<(CredentialRecord, CredentialEvent), MetadataStoreError> {
        let mut st = lock(&self.state);
        let key = (new.tenant, new.exchange);
        if st.records.contains_key(&key) {
            return Err(MetadataStoreError::AlreadyExists);
        }
        let now = new.validated_at;
        let record = CredentialRecord {
            tenant: new.tenant,
            exchange: new.exchange,
            vault_path: new.vault_path,
            current_version: new.version,
            previous_version: None,
            previous_valid_until: None,
            status: CredentialStatus::Active,
            permissions: Some(new.permissions),
            api_key_hint: new.api_key_hint,
            last_validated_at: Some(now),
            health: HealthStatus::Unknown,
            health_detail: None,
            health_checked_at: None,
            created_at: now,
            updated_at: now,
            event_seq: 0,
        };
        let mut record = record;
        st.records.insert(key, record.clone());
        let event = st.append(&mut record, EventKind::Stored, now);
        Ok((record, event))
    }

    async fn rotate(
        &self,
        c: RotationCommit,
    ) -> Result<(CredentialRecord, CredentialEvent), MetadataStoreError> {
        let mut st = lock(&self.state);
        let record = st
            .records
            .get_mut(&(c.tenant, c.exchange))
            .ok_or(MetadataStoreError::NotFound)?;
        if record.current_version != c.expected_version {
            return Err(MetadataStoreError::Conflict);
        }
        record.current_version = c.new_version;
        record.previous_version = c.previous_version;
        record.previous_valid_until = c.previous_valid_until;
        record.status = CredentialStatus::Active;
        record.permissions = Some(c.permissions);
        record.api_key_hint = c.api_key_hint;
        record.last_validated_at = Some(c.validated_at);
        record.updated_at = c.validated_at;
        let mut record = record.clone();
        let event = st.append(&mut record, EventKind::Rotated, c.validated_at);
        Ok((record, event))
    }

    async fn delete(
        &self,
        tenant: TenantId,
        exchange: ExchangeId,
        _by: &ChangedBy,
    ) -> Result<Option<CredentialEvent>, MetadataStoreError> {
        let mut st = lock(&self.state);
        let Some(mut record) = st.records.remove(&(tenant, exchange)) else {
            return Ok(None);
        };
        st.acks
            .retain(|(t, e, _), _| (*t, *e) != (tenant, exchange));
        Ok(Some(st.append(
            &mut record,
            EventKind::Deleted,
            OffsetDateTime::now_utc(),
        )))
    }

    async fn record_health(
        &self,
        u: HealthUpdate,
    ) -> Result<(CredentialRecord, Option<CredentialEvent>), MetadataStoreError> {
        let mut st = lock(&self.state);
        let record = st
            .records
            .get_mut(&(u.tenant, u.exchange))
            .ok_or(MetadataStoreError::NotFound)?;
        let invalidated = u.status.is_invalidated() && record.status != u.status;
        record.health = u.health;
        record.status = u.status;
        record.health_detail = u.detail;
        record.health_checked_at = Some(u.checked_at);
        if let Some(p) = u.permissions {
            record.permissions = Some(p);
            record.last_validated_at = Some(u.checked_at);
        }
        record.updated_at = u.checked_at;
        let mut record = record.clone();
        let event =
            invalidated.then(|| st.append(&mut record, EventKind::Invalidated, u.checked_at));
        if let Some(n) = u.notice
            && st.webhooks.contains_key(&u.tenant)
        {
            st.outbox.push(OutboxRow::new(u.tenant, n));
        }
        Ok((record, event))
    }

    async fn end_overlap_at(
        &self,
        tenant: TenantId,
        exchange: ExchangeId,
        previous_version: u64,
        at: OffsetDateTime,
    ) -> Result<bool, MetadataStoreError> {
        let mut st = lock(&self.state);
        let Some(r) = st.records.get_mut(&(tenant, exchange)) else {
            return Ok(false);
        };
        let moves = r.previous_version == Some(previous_version)
            && r.previous_valid_until.is_some_and(|t| t > at);
        if moves {
            r.previous_valid_until = Some(at);
        }
        Ok(moves)
    }

    async fn expire_overlaps(
        &self,
        now: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<(String, u64, CredentialEvent)>, MetadataStoreError> {
        let mut st = lock(&self.state);
        let due: Vec<_> = st
            .records
            .iter()
            .filter(|(_, r)| r.previous_valid_until.is_some_and(|t| t <= now))
            .map(|(k, _)| *k)
            .take(limit as usize)
            .collect();
        let mut out = Vec::with_capacity(due.len());
        for key in due {
            let Some(record) = st.records.get_mut(&key) else {
                continue;
            };
            let Some(version) = record.previous_version.take() else {
                continue;
            };
            record.previous_valid_until = None;
            record.updated_at = now;
            let mut record = record.clone();
            let event = st.append(&mut record, EventKind::PreviousExpired, now);
            out.push((record.vault_path, version, event));
        }
        Ok(out)
    }

    async fn events_after(
        &self,
        tenant: TenantId,
        after: u64,
        limit: u32,
    ) -> Result<Vec<CredentialEvent>, MetadataStoreError> {
        Ok(lock(&self.state)
            .events
            .iter()
            .filter(|e| e.tenant == tenant && e.seq > after)
            .take(limit as usize)
            .cloned()
            .collect())
    }

    async fn acknowledge(
        &self,
        tenant: TenantId,
        exchange: ExchangeId,
        subscriber: &str,
        version: u64,
        at: OffsetDateTime,
    ) -> Result<(), MetadataStoreError> {
        let mut st = lock(&self.state);
        if !st.records.contains_key(&(tenant, exchange)) {
            return Err(MetadataStoreError::NotFound);
        }
        let ack = Adoption {
            subscriber: subscriber.to_owned(),
            version,
            acked_at: at,
        };
        st.acks
            .insert((tenant, exchange, subscriber.to_owned()), ack);
        Ok(())
    }

    async fn adoption(
        &self,
        tenant: TenantId,
        exchange: ExchangeId,
    ) -> Result<Vec<Adoption>, MetadataStoreError> {
        let st = lock(&self.state);
        let mut out: Vec<Adoption> = st
            .acks
            .iter()
            .filter(|((t, e, _), _)| (*t, *e) == (tenant, exchange))
            .map(|(_, a)| a.clone())
            .collect();
        out.sort_by(|a, b| {
            b.acked_at
                .cmp(&a.acked_at)
                .then_with(|| a.subscriber.cmp(&b.subscriber))
        });
        Ok(out)
    }

    async fn prune_events(&self, before: OffsetDateTime) -> Result<u64, MetadataStoreError> {
        let mut st = lock(&self.state);
        let n = st
            .events
            .iter()
            .take_while(|e| e.occurred_at < before)
            .count();
        let last = st.events.drain(..n).next_back().map_or(0, |e| e.seq);
        st.pruned_through = st.pruned_through.max(last);
        Ok(n as u64)
    }

    async fn pruned_through(&self) -> Result<u64, MetadataStoreError> {
        Ok(lock(&self.state).pruned_through)
    }

    async fn ping(&self) -> Result<(), MetadataStoreError> {
        Ok(())
    }
}

#[async_trait]
impl KeyRotationStore for MemoryMetadataStore {
    async fn management(
        &self,
        tenant: TenantId,
        exchange: ExchangeId,
    ) -> Result<Option<String>, MetadataStoreError> {
        Ok(lock(&self.state)
            .management
            .get(&(tenant, exchange))
            .map(|(sub, _, _)| sub.clone()))
    }

    async fn set_management(
        &self,
        tenant: TenantId,
        exchange: ExchangeId,
        sub_account: &str,
        _api_key_hint: &str,
        schedule: RotationSchedule,
    ) -> Result<(), MetadataStoreError> {
        lock(&self.state).management.insert(
            (tenant, exchange),
            (sub_account.to_owned(), schedule, OffsetDateTime::now_utc()),
        );
        Ok(())
    }

    async fn scheduled(&self) -> Result<Vec<Scheduled>, MetadataStoreError> {
        let st = lock(&self.state);
        Ok(st
            .management
            .iter()
            .filter(|(_, (_, s, _))| s.every_days > 0)
            .filter_map(|((tenant, exchange), (_, schedule, stored))| {
                let mine: Vec<&KeyRotation> = st
                    .key_rotations
                    .values()
                    .filter(|r| r.tenant == *tenant && r.exchange == *exchange)
                    .collect();
                if mine.iter().any(|r| !r.step.finished()) {
                    return None;
                }
                let last = mine.iter().max_by_key(|r| r.created_at);
                Some(Scheduled {
                    tenant: *tenant,
                    exchange: *exchange,
                    schedule: *schedule,
                    since: last.map_or(*stored, |r| r.created_at.max(*stored)),
                    last_failed: last
                        .is_some_and(|r| r.step == crate::rotation::mint::Step::Failed),
                })
            })
            .collect())
    }

    async fn begin(
        &self,
        rotation: &KeyRotation,
    ) -> Result<Option<KeyRotation>, MetadataStoreError> {
        let mut st = lock(&self.state);
        let active = st.key_rotations.values().find(|r| {
            r.tenant == rotation.tenant && r.exchange == rotation.exchange && !r.step.finished()
        });
        if let Some(a) = active {
            return Ok(Some(a.clone()));
        }
        st.key_rotations.insert(rotation.id, rotation.clone());
        Ok(None)
    }

    async fn save(
        &self,
        rotation: &KeyRotation,
        notice: Option<&Notice>,
    ) -> Result<(), MetadataStoreError> {
        let mut st = lock(&self.state);
        st.key_rotations.insert(rotation.id, rotation.clone());
        if let Some(n) = notice
            && st.webhooks.contains_key(&rotation.tenant)
        {
            st.outbox.push(OutboxRow::new(rotation.tenant, n.clone()));
        }
        Ok(())
    }

    async fn get(&self, id: uuid::Uuid) -> Result<Option<KeyRotation>, MetadataStoreError> {
        Ok(lock(&self.state).key_rotations.get(&id).cloned())
    }

    async fn active(
        &self,
        tenant: TenantId,
        exchange: ExchangeId,
    ) -> Result<Option<KeyRotation>, MetadataStoreError> {
        Ok(lock(&self.state)
            .key_rotations
            .values()
            .find(|r| r.tenant == tenant && r.exchange == exchange && !r.step.finished())
            .cloned())
    }

    async fn unfinished(&self) -> Result<Vec<KeyRotation>, MetadataStoreError> {
        Ok(lock(&self.state)
            .key_rotations
            .values()
            .filter(|r| !r.step.finished())
            .cloned()
            .collect())
    }

    async fn due(
        &self,
        now: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<KeyRotation>, MetadataStoreError> {
        let st = lock(&self.state);
        let mut due: Vec<KeyRotation> = st
            .key_rotations
            .values()
            .filter(|r| !r.step.finished() && r.due_at() <= now)
            .cloned()
            .collect();
        due.sort_by_key(KeyRotation::due_at);
        due.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        Ok(due)
    }
}
