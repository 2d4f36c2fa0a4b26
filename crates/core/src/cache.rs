//! The L1 cache of decrypted credential sets, per (tenant, exchange), with
//! one load per key at a time and an ordering rule that keeps a replaced set
//! out of it.
//!
//! # The invariant
//! Every credential row carries `event_seq`, the seq of the newest event
//! that describes it, and the cache keeps, per key, a *floor*: the highest
//! event seq it has applied (from this replica's commits or from the event
//! listener). An entry is inserted only if its row's `event_seq` is at least
//! the floor, and only while holding the key's shard lock, the same lock
//! under which events raise the floor. So a load that read the row before
//! a rotation committed and finishes after that rotation's event was applied
//! can never put the replaced set back: it is handed to the callers that
//! were already waiting for it and then dropped.
//!
//! # Single flight
//! Concurrent misses of one key share one load (one PostgreSQL read, at most
//! two Vault reads). A caller joins a load in flight only if no event for
//! the key was applied since that load started; otherwise it starts a new
//! one. The shared future is driven by whichever waiter polls it, so a
//! caller that goes away (a cancelled RPC) does not strand the others.
//!
//! # Freshness and outages
//! quick_cache has no TTL of its own, so each entry carries the time it was
//! fetched: fresh for `ttl` (5 minutes), then usable for `grace` (1 hour)
//! while Vault or PostgreSQL cannot be reached, marked stale. An event that
//! replaces an entry's current set keeps the entry only as such an outage
//! fallback, and only while the set it shows is still valid: the replaced
//! current set during the new overlap, never after a revoke or a delete.

use std::{
    collections::HashMap,
    future::Future,
    hash::{BuildHasher, RandomState},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use futures::{
    FutureExt as _,
    future::{BoxFuture, Shared},
};
use quick_cache::sync::Cache;
use time::{Duration, OffsetDateTime};

use crate::broker::error::BrokerError;

use crate::broker::types::{
    CredentialEvent, CredentialRecord, CredentialSet, EventKind, ExchangeId, TenantId,
};

/// A fetched credential: its metadata and the secret sets it references.
#[derive(Debug)]
pub struct CachedCredential {
    /// Metadata as read with the secrets (`record.event_seq` orders it).
    pub record: CredentialRecord,
    /// The current set.
    pub current: CredentialSet,
    /// The previous set, when the record had an open overlap at fetch time.
    pub previous: Option<CredentialSet>,
    /// When this entry was read from the stores.
    pub fetched_at: OffsetDateTime,
}

/// Cache key.
pub type CacheKey = (TenantId, ExchangeId);

/// What a shared load resolves to.
type LoadResult = Result<Arc<CachedCredential>, BrokerError>;
type SharedLoad = Shared<BoxFuture<'static, LoadResult>>;

/// Shards of the per-key state; a miss or an event locks one of them for a
/// few instructions (never across an await).
const SHARDS: usize = 16;

/// How an entry may be served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Standing {
    /// Current truth as far as this replica knows.
    Fresh,
    /// An event replaced it: served only while a backend is down, and only
    /// before `until` (the end of the overlap that keeps its set valid).
    Fallback { until: Option<OffsetDateTime> },
}

#[derive(Clone)]
struct Slot {
    entry: Arc<CachedCredential>,
    standing: Standing,
}

struct Loading {
    /// Distinguishes this load from a later one for the same key.
    id: u64,
    /// The key's floor when the load started; joinable only while unchanged.
    floor: u64,
    fut: SharedLoad,
}

#[derive(Default)]
struct KeyState {
    /// Highest event seq applied for this key.
    floor: u64,
    loading: Option<Loading>,
}

/// Counters of the read path since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Answers served from a fresh entry.
    pub hits: u64,
    /// Loads started (each one PostgreSQL read plus one or two Vault reads).
    pub loads: u64,
    /// Misses that joined a load already in flight instead of starting one.
    pub coalesced: u64,
    /// Loads finished but not cached, because an event newer than the row
    /// they read had been applied meanwhile.
    pub discarded: u64,
    /// Answers served from an entry past its freshness because a backend
    /// was down (marked stale).
    pub stale: u64,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    loads: AtomicU64,
    coalesced: AtomicU64,
    discarded: AtomicU64,
    stale: AtomicU64,
}

struct Inner {
    entries: Cache<CacheKey, Slot>,
    keys: [Mutex<HashMap<CacheKey, KeyState>>; SHARDS],
    hasher: RandomState,
    next_load: AtomicU64,
    counters: Counters,
    ttl: Duration,
    grace: Duration,
}

/// The cache with its freshness and ordering rules. Cheap to clone.
#[derive(Clone)]
pub struct CredentialCache {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Inner {
    fn shard(&self, key: &CacheKey) -> MutexGuard<'_, HashMap<CacheKey, KeyState>> {
        // SHARDS is a power of two; the cast keeps the low bits.
        #[allow(clippy::cast_possible_truncation)]
        let i = (self.hasher.hash_one(key) as usize) % SHARDS;
        lock(&self.keys[i])
    }

    /// Inserts `entry` unless an event newer than its row was applied, or a
    /// newer entry is already cached. Call with the key's shard locked.
    fn insert_if_current(
        &self,
        state: &KeyState,
        key: CacheKey,
        entry: &Arc<CachedCredential>,
    ) -> bool {
        if entry.record.event_seq < state.floor {
            return false;
        }
        if let Some(held) = self.entries.get(&key)
            && held.standing == Standing::Fresh
            && held.entry.record.event_seq > entry.record.event_seq
        {
            return false;
        }
        self.entries.insert(
            key,
            Slot {
                entry: entry.clone(),
                standing: Standing::Fresh,
            },
        );
        true
    }

    /// The end of a load: cache it if it is still current, and free the
    /// key's loading slot if it is still ours.
    fn finish(&self, key: CacheKey, id: u64, result: &LoadResult) {
        let mut keys = self.shard(&key);
        let state = keys.entry(key).or_default();
        if state.loading.as_ref().is_some_and(|l| l.id == id) {
            state.loading = None;
        }
        if let Ok(entry) = result
            && !self.insert_if_current(state, key, entry)
        {
            self.counters.discarded.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(tenant = %key.0, exchange = %key.1, seq = entry.record.event_seq, floor = state.floor,
                "a load raced a newer event; served to its waiters, not cached");
        }
    }
}

impl CredentialCache {
    /// A cache holding at most `capacity` credentials.
    pub fn new(capacity: usize, ttl: Duration, grace: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                entries: Cache::new(capacity.max(1)),
                keys: std::array::from_fn(|_| Mutex::new(HashMap::new())),
                hasher: RandomState::new(),
                next_load: AtomicU64::new(1),
                counters: Counters::default(),
                ttl,
                grace,
            }),
        }
    }

    /// The entry if it is fresh (fetched less than `ttl` ago, not replaced
    /// by an event) and its current version is at least `min_version`. The
    /// hot path: one hash lookup, no lock.
    pub fn fresh(
        &self,
        key: &CacheKey,
        now: OffsetDateTime,
        min_version: u64,
    ) -> Option<Arc<CachedCredential>> {
        let entry = self.fresh_entry(key, now, min_version)?;
        self.inner.counters.hits.fetch_add(1, Ordering::Relaxed);
        Some(entry)
    }

    /// The record of [`Self::fresh`]'s entry, without counting a hit (for
    /// decisions that serve no secret, such as whether an acknowledged
    /// version is served).
    pub fn record(
        &self,
        key: &CacheKey,
        now: OffsetDateTime,
        min_version: u64,
    ) -> Option<CredentialRecord> {
        self.fresh_entry(key, now, min_version)
            .map(|e| e.record.clone())
    }

    /// What [`Self::fresh`] serves, uncounted.
    #[inline]
    fn fresh_entry(
        &self,
        key: &CacheKey,
        now: OffsetDateTime,
        min_version: u64,
    ) -> Option<Arc<CachedCredential>> {
        let slot = self.inner.entries.get(key)?;
        let e = &slot.entry;
        (slot.standing == Standing::Fresh
            && now < e.fetched_at + self.inner.ttl
            && e.record.current_version >= min_version)
            .then_some(slot.entry)
    }

    /// The entry if it may be served while a backend is down: within
    /// `ttl + grace` of its fetch, and, if an event replaced it, before the
    /// end of the overlap that keeps its set valid.
    pub fn within_grace(
        &self,
        key: &CacheKey,
        now: OffsetDateTime,
    ) -> Option<Arc<CachedCredential>> {
        let slot = self.inner.entries.get(key)?;
        let in_grace = now < slot.entry.fetched_at + self.inner.ttl + self.inner.grace;
        let still_valid = match slot.standing {
            Standing::Fresh | Standing::Fallback { until: None } => true,
            Standing::Fallback { until: Some(t) } => now < t,
        };
        (in_grace && still_valid).then(|| {
            self.inner.counters.stale.fetch_add(1, Ordering::Relaxed);
            slot.entry
        })
    }

    /// Joins the load of `key` in flight, or starts `load` (one per key at a
    /// time). The result is cached only if no newer event was applied while
    /// it ran; either way every caller that waited on it receives it.
    ///
    /// # Errors
    /// Whatever the load failed with, shared by every waiter.
    pub async fn load<F, Fut>(&self, key: CacheKey, load: F) -> LoadResult
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<CachedCredential, BrokerError>> + Send + 'static,
    {
        let fut = {
            let mut keys = self.inner.shard(&key);
            let state = keys.entry(key).or_default();
            match &state.loading {
                Some(l) if l.floor == state.floor => {
                    self.inner
                        .counters
                        .coalesced
                        .fetch_add(1, Ordering::Relaxed);
                    l.fut.clone()
                }
                _ => {
                    let id = self.inner.next_load.fetch_add(1, Ordering::Relaxed);
                    self.inner.counters.loads.fetch_add(1, Ordering::Relaxed);
                    let inner = self.inner.clone();
                    let started = load();
                    let fut = async move {
                        let result = started.await.map(Arc::new);
                        inner.finish(key, id, &result);
                        result
                    }
                    .boxed()
                    .shared();
                    state.loading = Some(Loading {
                        id,
                        floor: state.floor,
                        fut: fut.clone(),
                    });
                    fut
                }
            }
        };
        fut.await
    }

    /// Caches a set this replica just committed (it holds the secrets
    /// already), raising the floor to its event. Returns whether it was
    /// inserted (not if a newer event was applied first).
    pub fn install(&self, entry: CachedCredential) -> bool {
        let key = (entry.record.tenant, entry.record.exchange);
        let entry = Arc::new(entry);
        let mut keys = self.inner.shard(&key);
        let state = keys.entry(key).or_default();
        state.floor = state.floor.max(entry.record.event_seq);
        self.inner.insert_if_current(state, key, &entry)
    }

    /// Applies a committed event (from this replica or another): raises the
    /// key's floor, so no load that read an older row is cached and no new
    /// caller joins such a load, and retires the cached entry unless it
    /// already reflects the event. A retired entry stays as an outage
    /// fallback only while the set it shows as current is still served.
    pub fn apply(&self, event: &CredentialEvent) {
        let key = (event.tenant, event.exchange);
        let mut keys = self.inner.shard(&key);
        let state = keys.entry(key).or_default();
        state.floor = state.floor.max(event.seq);
        let Some(slot) = self.inner.entries.get(&key) else {
            return;
        };
        if slot.entry.record.event_seq >= event.seq {
            return;
        }
        let held = slot.entry.record.current_version;
        let fallback = match event.kind {
            // The replaced current set is the new previous one: valid until
            // the overlap ends.
            EventKind::Rotated if event.previous_version == Some(held) => {
                Some(Standing::Fallback {
                    until: event.previous_valid_until,
                })
            }
            // The current set is unchanged; only the previous one ended
            // (which the view never serves past its deadline anyway).
            EventKind::PreviousExpired if event.version == held => {
                Some(Standing::Fallback { until: None })
            }
            _ => None,
        };
        match fallback {
            Some(standing) => self.inner.entries.insert(
                key,
                Slot {
                    entry: slot.entry,
                    standing,
                },
            ),
            None => {
                self.inner.entries.remove(&key);
            }
        }
    }

    /// Drops an entry whose metadata changed without an event (a health
    /// check that found the key working again).
    pub fn forget(&self, key: &CacheKey) {
        let _keys = self.inner.shard(key);
        self.inner.entries.remove(key);
    }

    /// Read-path counters since start.
    pub fn stats(&self) -> CacheStats {
        let c = &self.inner.counters;
        CacheStats {
            hits: c.hits.load(Ordering::Relaxed),
            loads: c.loads.load(Ordering::Relaxed),
            coalesced: c.coalesced.load(Ordering::Relaxed),
            discarded: c.discarded.load(Ordering::Relaxed),
            stale: c.stale.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use secrecy::SecretString;
    use tokio::sync::oneshot;
    use uuid::Uuid;

    use super::*;
    use crate::broker::types::{CredentialStatus, HealthStatus};

    const KEY: CacheKey = (TenantId::new(Uuid::nil()), ExchangeId::Kraken);

    fn entry(at: OffsetDateTime, version: u64, seq: u64) -> CachedCredential {
        CachedCredential {
            record: CredentialRecord {
                tenant: KEY.0,
                exchange: KEY.1,
                vault_path: "p".into(),
                current_version: version,
                previous_version: None,
                previous_valid_until: None,
                status: CredentialStatus::Active,
                permissions: None,
                api_key_hint: "****".into(),
                last_validated_at: None,
                health: HealthStatus::Unknown,
                health_detail: None,
                health_checked_at: None,
                created_at: at,
                updated_at: at,
                event_seq: seq,
            },
            current: CredentialSet {
                api_key: format!("k{version}"),
                api_secret: SecretString::from("s"),
                passphrase: None,
            },
            previous: None,
            fetched_at: at,
        }
    }

    fn event(
        seq: u64,
        kind: EventKind,
        version: u64,
        previous: Option<(u64, OffsetDateTime)>,
    ) -> CredentialEvent {
        CredentialEvent {
            seq,
            tenant: KEY.0,
            exchange: KEY.1,
            kind,
            version,
            previous_version: previous.map(|p| p.0),
            previous_valid_until: previous.map(|p| p.1),
            occurred_at: OffsetDateTime::UNIX_EPOCH,
        }
    }

    fn cache() -> CredentialCache {
        CredentialCache::new(16, Duration::minutes(5), Duration::hours(1))
    }

    #[test]
    fn fresh_for_ttl_then_grace_then_gone() {
        let t0 = OffsetDateTime::now_utc();
        let c = cache();
        assert!(c.install(entry(t0, 1, 1)));
        assert!(c.fresh(&KEY, t0 + Duration::minutes(4), 0).is_some());
        assert!(
            c.fresh(&KEY, t0 + Duration::minutes(4), 2).is_none(),
            "below min_version"
        );
        assert!(c.fresh(&KEY, t0 + Duration::minutes(5), 0).is_none());
        assert!(c.within_grace(&KEY, t0 + Duration::minutes(64)).is_some());
        assert!(c.within_grace(&KEY, t0 + Duration::minutes(65)).is_none());
        c.apply(&event(2, EventKind::Deleted, 0, None));
        assert!(c.within_grace(&KEY, t0).is_none());
    }

    /// The race of the issue: a load reads the row (v1, seq 1), a rotation
    /// commits (v2, seq 2) and its event is applied, then the load ends. Its
    /// callers get what they asked for, but the cache does not keep it, and
    /// a caller arriving after the event does not join it.
    #[tokio::test]
    async fn a_load_older_than_an_applied_event_is_not_cached_or_joined() {
        let t0 = OffsetDateTime::now_utc();
        let c = cache();
        let (release, gate) = oneshot::channel::<()>();
        let early = {
            let c = c.clone();
            tokio::spawn(async move {
                c.load(KEY, move || async move {
                    gate.await.ok();
                    Ok(entry(t0, 1, 1))
                })
                .await
            })
        };
        tokio::task::yield_now().await;
        while c.stats().loads == 0 {
            tokio::task::yield_now().await;
        }
        c.apply(&event(
            2,
            EventKind::Rotated,
            2,
            Some((1, t0 + Duration::hours(1))),
        ));
        // A caller after the event starts its own load instead of joining.
        let late = c
            .load(KEY, move || async move { Ok(entry(t0, 2, 2)) })
            .await
            .unwrap();
        assert_eq!(late.record.current_version, 2);
        release.send(()).unwrap();
        let old = early.await.unwrap().unwrap();
        assert_eq!(
            old.record.current_version, 1,
            "the early caller gets its own read"
        );
        assert_eq!(c.fresh(&KEY, t0, 0).unwrap().record.current_version, 2);
        let s = c.stats();
        assert_eq!((s.loads, s.coalesced, s.discarded), (2, 0, 1));
    }

    #[tokio::test]
    async fn concurrent_misses_share_one_load() {
        let t0 = OffsetDateTime::now_utc();
        let c = cache();
        let (release, gate) = oneshot::channel::<()>();
        let gate = Arc::new(Mutex::new(Some(gate)));
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let (c, gate) = (c.clone(), gate.clone());
            tasks.push(tokio::spawn(async move {
                c.load(KEY, move || async move {
                    let g = lock(&gate).take();
                    if let Some(g) = g {
                        g.await.ok();
                    }
                    Ok(entry(t0, 3, 3))
                })
                .await
            }));
        }
        while c.stats().loads + c.stats().coalesced < 100 {
            tokio::task::yield_now().await;
        }
        release.send(()).unwrap();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap().record.current_version, 3);
        }
        assert_eq!(c.stats().loads, 1);
        assert_eq!(c.stats().coalesced, 99);
    }

    #[test]
    fn a_replaced_entry_is_an_outage_fallback_only_while_its_set_is_served() {
        let t0 = OffsetDateTime::now_utc();
        let until = t0 + Duration::minutes(30);
        let c = cache();
        c.install(entry(t0, 1, 1));
        // Rotated with an overlap: v1 stays valid until the overlap ends.
        c.apply(&event(2, EventKind::Rotated, 2, Some((1, until))));
        assert!(
            c.fresh(&KEY, t0, 0).is_none(),
            "never fresh after the event"
        );
        assert!(c.within_grace(&KEY, t0 + Duration::minutes(29)).is_some());
        assert!(c.within_grace(&KEY, until).is_none());
        // Revoked (overlap 0): nothing to fall back on.
        let c = cache();
        c.install(entry(t0, 1, 1));
        c.apply(&event(2, EventKind::Rotated, 2, None));
        assert!(c.within_grace(&KEY, t0).is_none());
        // The committing replica's own entry is not retired by its event.
        let c = cache();
        c.install(entry(t0, 2, 5));
        c.apply(&event(5, EventKind::Rotated, 2, Some((1, until))));
        assert!(c.fresh(&KEY, t0, 2).is_some());
        // An older install after a newer event is refused.
        assert!(!c.install(entry(t0, 1, 4)));
        assert_eq!(c.fresh(&KEY, t0, 0).unwrap().record.current_version, 2);
    }
}

// ---- configuration: the [cache] section, owned here (the broker's `config` re-exports it).

/// L1 cache settings.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Freshness of a cached set.
    pub ttl_secs: u64,
    /// How long past `ttl_secs` a cached set is served while Vault or
    /// PostgreSQL is down.
    pub outage_grace_secs: u64,
    /// Maximum cached credentials.
    pub capacity: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            ttl_secs: 300,
            outage_grace_secs: 3600,
            capacity: 100_000,
        }
    }
}
