//! The reads a WatchRotations stream starts from (retention's low-water
//! mark, the tenant's state, the events after a resume point), shared by
//! the streams that open together: when a replica dies, its whole fleet
//! resumes on the others within seconds, and 5,000 opens of one tenant
//! would otherwise be 15,000 PostgreSQL transactions competing with the
//! reconnects' handshakes for the same cores.
//!
//! The rule that keeps a shared read correct: a stream subscribes to the
//! hub first, then reads; whatever the read misses arrives through the hub.
//! So an open may only take the result of a read that *started after it
//! asked* (a read already running may have missed an event broadcast
//! before this stream subscribed). Each key has at most one read running
//! and one waiting to start: an open joins the waiting one; when the
//! running read ends, one of the waiters runs the next read for all of
//! them (a group commit, for reads).

use std::{
    collections::HashMap,
    future::Future,
    hash::Hash,
    sync::{Arc, Mutex, OnceLock, PoisonError},
};

use crate::broker::error::MetadataStoreError;
use crate::broker::ports::MetadataStore;
use crate::broker::types::{CredentialEvent, CredentialRecord, TenantId};

/// Reads of `V` by key, shared as described in the module docs.
pub struct Shared<K, V> {
    slots: Mutex<HashMap<K, Arc<Slot<V>>>>,
}

struct Slot<V> {
    /// The read that has not started yet, which new askers join.
    next: Mutex<Option<Arc<OnceLock<V>>>>,
    /// Held while a read runs: one at a time per key.
    turn: tokio::sync::Mutex<()>,
}

impl<K, V> Default for Shared<K, V> {
    fn default() -> Self {
        Self {
            slots: Mutex::default(),
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Shared<K, V> {
    /// The result of a `read` of `key` that started after this call did:
    /// this caller's own, or one another caller ran for both.
    pub async fn get<F, Fut>(&self, key: K, read: F) -> V
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        let slot = Arc::clone(
            self.slots
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(key.clone())
                .or_insert_with(|| {
                    Arc::new(Slot {
                        next: Mutex::default(),
                        turn: tokio::sync::Mutex::new(()),
                    })
                }),
        );
        let mine = Arc::clone(
            slot.next
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get_or_insert_with(Arc::default),
        );
        let _turn = slot.turn.lock().await;
        if let Some(v) = mine.get() {
            // Read for us by the caller before us in line.
            return v.clone();
        }
        // Ours to run: from here on, new askers wait for the read after it.
        {
            let mut next = slot.next.lock().unwrap_or_else(PoisonError::into_inner);
            if next.as_ref().is_some_and(|n| Arc::ptr_eq(n, &mine)) {
                *next = None;
            }
        }
        let v = read().await;
        let _ = mine.set(v.clone());
        // Forget the key once nobody waits on it (a later asker makes a new
        // slot; its reads still start after it asked).
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        if slot
            .next
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none()
            && slots.get(&key).is_some_and(|s| Arc::ptr_eq(s, &slot))
        {
            slots.remove(&key);
        }
        v
    }
}

/// What a state read returns: the tenant's rows and the event seq they
/// are current at.
pub type State = Arc<(Vec<CredentialRecord>, u64)>;

/// A page of events after a resume point, each shared as the hub shares
/// a live one (the streams that read the page hand out the same events).
pub type Events = Arc<[Arc<CredentialEvent>]>;

/// The shared reads of a broker's stream opens.
#[derive(Default)]
pub struct StreamOpens {
    pruned: Shared<(), Result<u64, MetadataStoreError>>,
    state: Shared<TenantId, Result<State, MetadataStoreError>>,
    events: Shared<(TenantId, u64, u32), Result<Events, MetadataStoreError>>,
}

impl StreamOpens {
    /// [`MetadataStore::pruned_through`], shared.
    ///
    /// # Errors
    /// The store's.
    pub async fn pruned_through(
        &self,
        meta: &Arc<dyn MetadataStore>,
    ) -> Result<u64, MetadataStoreError> {
        self.pruned.get((), || meta.pruned_through()).await
    }

    /// [`MetadataStore::snapshot`], shared by the tenant's opens.
    ///
    /// # Errors
    /// The store's.
    pub async fn snapshot(
        &self,
        meta: &Arc<dyn MetadataStore>,
        tenant: TenantId,
    ) -> Result<State, MetadataStoreError> {
        self.state
            .get(tenant, || async move {
                meta.snapshot(tenant).await.map(Arc::new)
            })
            .await
    }

    /// [`MetadataStore::events_after`], shared by the opens resuming from
    /// the same point.
    ///
    /// # Errors
    /// The store's.
    pub async fn events_after(
        &self,
        meta: &Arc<dyn MetadataStore>,
        tenant: TenantId,
        after: u64,
        limit: u32,
    ) -> Result<Events, MetadataStoreError> {
        self.events
            .get((tenant, after, limit), || async move {
                meta.events_after(tenant, after, limit)
                    .await
                    .map(|page| page.into_iter().map(Arc::new).collect())
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::{AtomicU32, Ordering},
        time::Duration,
    };

    use super::*;

    #[tokio::test]
    async fn callers_that_ask_together_share_one_read_started_after_they_asked() {
        let shared: Arc<Shared<u8, u32>> = Arc::default();
        let reads = Arc::new(AtomicU32::new(0));
        // The value a read returns is the number of reads started before it
        // ended: callers can tell which read they got.
        let read = |reads: Arc<AtomicU32>| async move {
            let n = reads.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
            n
        };
        // One caller's read is running...
        let first = {
            let (s, r) = (shared.clone(), reads.clone());
            tokio::spawn(async move { s.get(1, || read(r)).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        // ...when 100 more ask: they may not take it (it started before
        // they asked), and they share the one read after it.
        let mut later = Vec::new();
        for _ in 0..100 {
            let (s, r) = (shared.clone(), reads.clone());
            later.push(tokio::spawn(async move { s.get(1, || read(r)).await }));
        }
        assert_eq!(first.await.unwrap(), 1);
        for h in later {
            assert_eq!(
                h.await.unwrap(),
                2,
                "the read that started after they asked"
            );
        }
        assert_eq!(reads.load(Ordering::SeqCst), 2);
        // Another key is read on its own; a caller alone reads at once.
        assert_eq!(shared.get(2, || read(reads.clone())).await, 3);
        assert_eq!(shared.get(1, || read(reads.clone())).await, 4);
        assert!(shared.slots.lock().unwrap().is_empty(), "keys forgotten");
    }
}
