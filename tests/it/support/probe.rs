//! Store wrappers that count calls and can pause a Vault read: how the
//! read-path tests hold a cache load between its PostgreSQL read and its
//! Vault read, and count what a burst of misses really costs.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicUsize, Ordering},
};

use async_trait::async_trait;
use credbroker::broker::{
    error::{MetadataStoreError, SecretStoreError},
    ports::{
        ChangedBy, HealthUpdate, MetadataStore, NewCredential, RotationCommit, SecretStore,
        VersionInfo,
    },
    types::{Adoption, CredentialEvent, CredentialRecord, CredentialSet, ExchangeId, TenantId},
};
use time::OffsetDateTime;
use tokio::sync::oneshot;

struct Gate {
    reached: oneshot::Sender<()>,
    release: oneshot::Receiver<()>,
}

/// A paused read: `reached` resolves when a read is held at the gate;
/// sending on `release` lets it go on.
pub struct Paused {
    pub reached: oneshot::Receiver<()>,
    pub release: oneshot::Sender<()>,
}

/// A [`SecretStore`] that counts reads and can hold the next one.
pub struct ProbeSecrets {
    inner: Arc<dyn SecretStore>,
    reads: AtomicUsize,
    gate: Mutex<Option<Gate>>,
}

impl ProbeSecrets {
    pub fn new(inner: Arc<dyn SecretStore>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            reads: AtomicUsize::new(0),
            gate: Mutex::new(None),
        })
    }

    /// Vault reads so far.
    pub fn reads(&self) -> usize {
        self.reads.load(Ordering::SeqCst)
    }

    /// Holds the next read until released.
    pub fn pause_next_read(&self) -> Paused {
        let (reached_tx, reached) = oneshot::channel();
        let (release, release_rx) = oneshot::channel();
        *self.gate.lock().unwrap() = Some(Gate {
            reached: reached_tx,
            release: release_rx,
        });
        Paused { reached, release }
    }
}

#[async_trait]
impl SecretStore for ProbeSecrets {
    async fn latest_version(&self, path: &str) -> Result<Option<u64>, SecretStoreError> {
        self.inner.latest_version(path).await
    }
    async fn write(
        &self,
        path: &str,
        set: &CredentialSet,
        cas: u64,
    ) -> Result<u64, SecretStoreError> {
        self.inner.write(path, set, cas).await
    }
    async fn read(&self, path: &str, version: u64) -> Result<CredentialSet, SecretStoreError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let gate = self.gate.lock().unwrap().take();
        if let Some(g) = gate {
            let _ = g.reached.send(());
            let _ = g.release.await;
        }
        self.inner.read(path, version).await
    }
    async fn destroy_versions(&self, path: &str, versions: &[u64]) -> Result<(), SecretStoreError> {
        self.inner.destroy_versions(path, versions).await
    }
    async fn purge(&self, path: &str) -> Result<(), SecretStoreError> {
        self.inner.purge(path).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<String>, SecretStoreError> {
        self.inner.list(prefix).await
    }
    async fn versions(&self, path: &str) -> Result<Vec<VersionInfo>, SecretStoreError> {
        self.inner.versions(path).await
    }
    async fn ping(&self) -> Result<(), SecretStoreError> {
        self.inner.ping().await
    }
}

/// A [`MetadataStore`] that counts single-row reads (the cache's loads),
/// and can hold a rotation's answer after it committed (a slow step after
/// the commit).
pub struct ProbeMeta {
    inner: Arc<dyn MetadataStore>,
    gets: AtomicUsize,
    /// The reads a stream open makes: state, events after a point, the
    /// retention mark.
    open_reads: [AtomicUsize; 3],
    after_rotate: std::sync::Mutex<std::time::Duration>,
}

impl ProbeMeta {
    pub fn new(inner: Arc<dyn MetadataStore>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            gets: AtomicUsize::new(0),
            open_reads: Default::default(),
            after_rotate: std::sync::Mutex::new(std::time::Duration::ZERO),
        })
    }

    /// Holds every rotation's answer this long after its commit.
    pub fn hold_after_rotate(&self, d: std::time::Duration) {
        *self.after_rotate.lock().unwrap() = d;
    }

    /// Row reads so far.
    pub fn gets(&self) -> usize {
        self.gets.load(Ordering::SeqCst)
    }

    /// State reads, event-page reads and retention-mark reads so far.
    pub fn open_reads(&self) -> [usize; 3] {
        self.open_reads.each_ref().map(|n| n.load(Ordering::SeqCst))
    }
}

#[async_trait]
impl MetadataStore for ProbeMeta {
    fn event_delivery(&self) -> credbroker::broker::ports::EventDelivery {
        self.inner.event_delivery()
    }

    async fn get(
        &self,
        t: TenantId,
        e: ExchangeId,
    ) -> Result<Option<CredentialRecord>, MetadataStoreError> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        self.inner.get(t, e).await
    }
    async fn list(&self, t: TenantId) -> Result<Vec<CredentialRecord>, MetadataStoreError> {
        self.inner.list(t).await
    }
    async fn snapshot(
        &self,
        t: TenantId,
    ) -> Result<(Vec<CredentialRecord>, u64), MetadataStoreError> {
        self.open_reads[0].fetch_add(1, Ordering::SeqCst);
        self.inner.snapshot(t).await
    }
    async fn insert(
        &self,
        n: NewCredential,
    ) -> Result<(CredentialRecord, CredentialEvent), MetadataStoreError> {
        self.inner.insert(n).await
    }
    async fn rotate(
        &self,
        c: RotationCommit,
    ) -> Result<(CredentialRecord, CredentialEvent), MetadataStoreError> {
        let done = self.inner.rotate(c).await;
        let hold = *self.after_rotate.lock().unwrap();
        tokio::time::sleep(hold).await;
        done
    }
    async fn delete(
        &self,
        t: TenantId,
        e: ExchangeId,
        by: &ChangedBy,
    ) -> Result<Option<CredentialEvent>, MetadataStoreError> {
        self.inner.delete(t, e, by).await
    }
    async fn record_health(
        &self,
        u: HealthUpdate,
    ) -> Result<(CredentialRecord, Option<CredentialEvent>), MetadataStoreError> {
        self.inner.record_health(u).await
    }
    async fn end_overlap_at(
        &self,
        t: TenantId,
        e: ExchangeId,
        previous_version: u64,
        at: OffsetDateTime,
    ) -> Result<bool, MetadataStoreError> {
        self.inner.end_overlap_at(t, e, previous_version, at).await
    }
    async fn expire_overlaps(
        &self,
        now: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<(String, u64, CredentialEvent)>, MetadataStoreError> {
        self.inner.expire_overlaps(now, limit).await
    }
    async fn events_after(
        &self,
        t: TenantId,
        after: u64,
        limit: u32,
    ) -> Result<Vec<CredentialEvent>, MetadataStoreError> {
        self.open_reads[1].fetch_add(1, Ordering::SeqCst);
        self.inner.events_after(t, after, limit).await
    }
    async fn acknowledge(
        &self,
        t: TenantId,
        e: ExchangeId,
        subscriber: &str,
        version: u64,
        at: OffsetDateTime,
    ) -> Result<(), MetadataStoreError> {
        self.inner.acknowledge(t, e, subscriber, version, at).await
    }
    async fn adoption(
        &self,
        t: TenantId,
        e: ExchangeId,
    ) -> Result<Vec<Adoption>, MetadataStoreError> {
        self.inner.adoption(t, e).await
    }
    async fn prune_events(&self, before: OffsetDateTime) -> Result<u64, MetadataStoreError> {
        self.inner.prune_events(before).await
    }
    async fn pruned_through(&self) -> Result<u64, MetadataStoreError> {
        self.open_reads[2].fetch_add(1, Ordering::SeqCst);
        self.inner.pruned_through().await
    }
    async fn ping(&self) -> Result<(), MetadataStoreError> {
        self.inner.ping().await
    }
}
