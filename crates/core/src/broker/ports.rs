//! The traits the broker drives: where secrets live, where metadata and
//! events live, and who decides whether a key works. Vault/PostgreSQL and the
//! in-memory dev stores implement the first two; exchange adapters the third.

use async_trait::async_trait;
use time::OffsetDateTime;

use super::{
    error::{MetadataStoreError, SecretStoreError, ValidationError},
    types::{
        Adoption, CredentialEvent, CredentialRecord, CredentialSet, CredentialStatus, ExchangeId,
        HealthStatus, Permissions, TenantId,
    },
};

/// Versioned secret storage (Vault KV v2 semantics).
#[async_trait]
pub trait SecretStore: Send + Sync + 'static {
    /// Latest version at `path` (soft-deleted or destroyed versions count),
    /// `None` when nothing was ever written there.
    ///
    /// # Errors
    /// Unavailable when the store cannot be reached.
    async fn latest_version(&self, path: &str) -> Result<Option<u64>, SecretStoreError>;

    /// Writes a new version if the latest version equals `cas` (0: only if
    /// nothing exists) and returns the new version number.
    ///
    /// # Errors
    /// `CasConflict` when another writer got there first.
    async fn write(
        &self,
        path: &str,
        set: &CredentialSet,
        cas: u64,
    ) -> Result<u64, SecretStoreError>;

    /// Reads one version.
    ///
    /// # Errors
    /// `NotFound` when that version does not exist or was destroyed.
    async fn read(&self, path: &str, version: u64) -> Result<CredentialSet, SecretStoreError>;

    /// Destroys versions permanently (idempotent).
    ///
    /// # Errors
    /// Unavailable when the store cannot be reached.
    async fn destroy_versions(&self, path: &str, versions: &[u64]) -> Result<(), SecretStoreError>;

    /// Removes every version and the metadata at `path` (idempotent).
    ///
    /// # Errors
    /// Unavailable when the store cannot be reached.
    async fn purge(&self, path: &str) -> Result<(), SecretStoreError>;

    /// Names directly under the folder `prefix` (folders end with `/`);
    /// empty when there is nothing there.
    ///
    /// # Errors
    /// Unavailable when the store cannot be reached.
    async fn list(&self, prefix: &str) -> Result<Vec<String>, SecretStoreError>;

    /// Every version kept at `path`, oldest first; empty when nothing was
    /// ever written there.
    ///
    /// # Errors
    /// Unavailable when the store cannot be reached.
    async fn versions(&self, path: &str) -> Result<Vec<VersionInfo>, SecretStoreError>;

    /// Checks that the store is reachable, unsealed and accepts our token.
    ///
    /// # Errors
    /// Unavailable otherwise.
    async fn ping(&self) -> Result<(), SecretStoreError>;

    /// Whether the store says it is sealed (`None`: it cannot say, or
    /// could not be asked). Asked only after a failed [`Self::ping`], for
    /// the `credbroker_vault_sealed` gauge and the sealed alert.
    async fn sealed(&self) -> Option<bool> {
        None
    }
}

/// One audit record as stored: its columns and the exact body its chain
/// hash covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRow {
    /// Record id.
    pub id: uuid::Uuid,
    /// Record time.
    pub at: OffsetDateTime,
    /// Tenant acted on.
    pub tenant: Option<TenantId>,
    /// Chain (replica).
    pub chain_id: uuid::Uuid,
    /// Place in the chain.
    pub seq: u64,
    /// Hash of the record before.
    pub prev_hash: String,
    /// This record's hash.
    pub hash: String,
    /// Canonical JSON of the record.
    pub body: String,
}

/// One replica's audit chain as stored: its records in seq order, its
/// anchors (seq, hash), and where retention cut it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditChain {
    /// The chain.
    pub chain_id: uuid::Uuid,
    /// Its records, by seq.
    pub rows: Vec<AuditRow>,
    /// Its anchors, by seq.
    pub anchors: Vec<(u64, String)>,
    /// The last record retention removed (seq, hash): the oldest retained
    /// record must follow it. `None` while the chain is whole.
    pub cut: Option<(u64, String)>,
    /// Stored pages whose columns disagree with the records they hold: the
    /// first record's seq and the column.
    pub misfiled: Vec<(u64, &'static str)>,
}

/// One version kept at a secret path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VersionInfo {
    /// Version number.
    pub version: u64,
    /// When it was written.
    pub created_at: OffsetDateTime,
    /// Destroyed (its data is gone for good).
    pub destroyed: bool,
}

/// A new credential's metadata, written together with its STORED event.
#[derive(Clone, Debug)]
pub struct NewCredential {
    /// Owner.
    pub tenant: TenantId,
    /// Exchange.
    pub exchange: ExchangeId,
    /// Vault path.
    pub vault_path: String,
    /// Vault version written.
    pub version: u64,
    /// Detected permissions.
    pub permissions: Permissions,
    /// Masked key.
    pub api_key_hint: String,
    /// Validation time.
    pub validated_at: OffsetDateTime,
    /// Who stored it, in which call (recorded with the event).
    pub by: ChangedBy,
}

/// Who made a change and in which call: written with its event, so the
/// event log names the call whose audit records show it (and the audit
/// reconciler can write a lost outcome from the event).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangedBy {
    /// `subject (role)`.
    pub actor: String,
    /// The call's request id (the audit records' `request_id`); `None`
    /// for a background pass whose records each carry their own.
    pub request_id: Option<uuid::Uuid>,
}

/// A rotation to commit, guarded by the version it replaces.
#[derive(Clone, Debug)]
pub struct RotationCommit {
    /// Owner.
    pub tenant: TenantId,
    /// Exchange.
    pub exchange: ExchangeId,
    /// The current version the caller read; the commit fails with
    /// `Conflict` if it changed since.
    pub expected_version: u64,
    /// The new current version.
    pub new_version: u64,
    /// The version kept during the overlap (`None`: revoked at once).
    pub previous_version: Option<u64>,
    /// End of the overlap.
    pub previous_valid_until: Option<OffsetDateTime>,
    /// Permissions of the new set.
    pub permissions: Permissions,
    /// Masked new key.
    pub api_key_hint: String,
    /// Validation time.
    pub validated_at: OffsetDateTime,
    /// Who rotated, in which call (recorded with the event).
    pub by: ChangedBy,
}

/// Result of a health check to record.
#[derive(Clone, Debug)]
pub struct HealthUpdate {
    /// Owner.
    pub tenant: TenantId,
    /// Exchange.
    pub exchange: ExchangeId,
    /// Outcome.
    pub health: HealthStatus,
    /// New lifecycle status (Invalid after a rejection emits INVALIDATED).
    pub status: CredentialStatus,
    /// Safe-to-show detail of a failure.
    pub detail: Option<String>,
    /// Permissions when the check succeeded.
    pub permissions: Option<Permissions>,
    /// Check time.
    pub checked_at: OffsetDateTime,
    /// Who checked, in which call (recorded with an INVALIDATED event).
    pub by: ChangedBy,
    /// A webhook to queue in the same commit (when the tenant has one).
    pub notice: Option<Notice>,
}

/// A webhook message for a tenant, queued in the outbox with the change it
/// reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    /// Stable message id (`webhook-id`): the same on every attempt.
    pub id: uuid::Uuid,
    /// `credential.invalidated`, `credential.expired`, `credential.drift`.
    pub event_type: &'static str,
    /// The exact JSON body that is signed and sent.
    pub payload: String,
    /// When it happened.
    pub at: OffsetDateTime,
}

/// Who hands a committed event to the replica's cache and hub.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventDelivery {
    /// The committing broker itself, at once (one process owns the store).
    OnCommit,
    /// A listener on the store, for every replica and in `seq` order; the
    /// committer must not publish too, or subscribers see it twice.
    Listener,
}

/// Metadata and event storage (PostgreSQL semantics: every write is one
/// transaction that also appends its event).
#[async_trait]
pub trait MetadataStore: Send + Sync + 'static {
    /// How this store's committed events reach the hub. The store decides,
    /// not a setting, so a store with a listener can never be paired with
    /// publishing on commit.
    fn event_delivery(&self) -> EventDelivery;

    /// One record.
    ///
    /// # Errors
    /// Unavailable when the store cannot be reached.
    async fn get(
        &self,
        tenant: TenantId,
        exchange: ExchangeId,
    ) -> Result<Option<CredentialRecord>, MetadataStoreError>;

    /// Every record of a tenant, ordered by exchange.
    ///
    /// # Errors
    /// Unavailable when the store cannot be reached.
    async fn list(&self, tenant: TenantId) -> Result<Vec<CredentialRecord>, MetadataStoreError>;

    /// Every record of a tenant with the highest event seq they reflect:
    /// the starting point of a watch stream.
    ///
    /// # Errors
    /// Unavailable when the store cannot be reached.
    async fn snapshot(
        &self,
        tenant: TenantId,
    ) -> Result<(Vec<CredentialRecord>, u64), MetadataStoreError>;

    /// Inserts a new record with its STORED event.
    ///
    /// # Errors
    /// `AlreadyExists` when a record exists.
    async fn insert(
        &self,
        new: NewCredential,
    ) -> Result<(CredentialRecord, CredentialEvent), MetadataStoreError>;

    /// Commits a rotation with its ROTATED event.
    ///
    /// # Errors
    /// `Conflict` when the current version is no longer `expected_version`,
    /// `NotFound` when the record is gone.
    async fn rotate(
        &self,
        commit: RotationCommit,
    ) -> Result<(CredentialRecord, CredentialEvent), MetadataStoreError>;

    /// Deletes a record with its DELETED event; `None` when nothing existed.
    ///
    /// # Errors
    /// Unavailable when the store cannot be reached.
    async fn delete(
        &self,
        tenant: TenantId,
        exchange: ExchangeId,
        by: &ChangedBy,
    ) -> Result<Option<CredentialEvent>, MetadataStoreError>;

    /// Records a health check; returns the INVALIDATED event when the status
    /// moved to invalid.
    ///
    /// # Errors
    /// `NotFound` when the record is gone.
    async fn record_health(
        &self,
        update: HealthUpdate,
    ) -> Result<(CredentialRecord, Option<CredentialEvent>), MetadataStoreError>;

    /// Moves the end of `exchange`'s open overlap to `at` (for the retire
    /// job to end it), if `previous_version` is still the previous version
    /// and its overlap ends later; returns whether it moved.
    ///
    /// # Errors
    /// Unavailable when the store cannot be reached.
    async fn end_overlap_at(
        &self,
        tenant: TenantId,
        exchange: ExchangeId,
        previous_version: u64,
        at: OffsetDateTime,
    ) -> Result<bool, MetadataStoreError>;

    /// Ends overlaps whose deadline passed before `now`: clears the previous
    /// version and appends PREVIOUS_EXPIRED, one transaction per record.
    /// Returns each retired (vault path, version) with its event.
    ///
    /// # Errors
    /// Unavailable when the store cannot be reached.
    async fn expire_overlaps(
        &self,
        now: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<(String, u64, CredentialEvent)>, MetadataStoreError>;

    /// A tenant's events with `seq > after`, oldest first, at most `limit`.
    ///
    /// # Errors
    /// Unavailable when the store cannot be reached.
    async fn events_after(
        &self,
        tenant: TenantId,
        after: u64,
        limit: u32,
    ) -> Result<Vec<CredentialEvent>, MetadataStoreError>;

    /// Records that `subscriber` signs with `version`.
    ///
    /// # Errors
    /// `NotFound` when the credential does not exist.
    async fn acknowledge(
        &self,
        tenant: TenantId,
        exchange: ExchangeId,
        subscriber: &str,
        version: u64,
        at: OffsetDateTime,
    ) -> Result<(), MetadataStoreError>;

    /// Every subscriber's acknowledged version, newest first.
    ///
    /// # Errors
    /// Unavailable when the store cannot be reached.
    async fn adoption(
        &self,
        tenant: TenantId,
        exchange: ExchangeId,
    ) -> Result<Vec<Adoption>, MetadataStoreError>;

    /// Deletes events that occurred before `before`, remembering the highest
    /// pruned seq; returns how many were deleted.
    ///
    /// # Errors
    /// Unavailable when the store cannot be reached.
    async fn prune_events(&self, before: OffsetDateTime) -> Result<u64, MetadataStoreError>;

    /// The highest seq ever pruned (0: none). A resume point below it may
    /// have missed events.
    ///
    /// # Errors
    /// Unavailable when the store cannot be reached.
    async fn pruned_through(&self) -> Result<u64, MetadataStoreError>;

    /// Checks that the store is reachable.
    ///
    /// # Errors
    /// Unavailable otherwise.
    async fn ping(&self) -> Result<(), MetadataStoreError>;
}

/// Where the audit trail is kept: the shipper's batches and anchors in,
/// a tenant's records (ListAuditEvents) out. Kept apart from
/// [`MetadataStore`]: it is the audit machinery's port, not the broker's.
#[async_trait]
pub trait AuditLog: Send + Sync + 'static {
    /// Inserts shipped audit records (one chain's, in seq order); records
    /// already there are skipped, so a batch may be sent again.
    ///
    /// # Errors
    /// Unavailable when the store cannot be reached.
    async fn ship_audit(&self, rows: Vec<AuditRow>) -> Result<(), MetadataStoreError>;

    /// Records the head of an audit chain (an anchor).
    ///
    /// # Errors
    /// Unavailable when the store cannot be reached.
    async fn anchor_audit(
        &self,
        chain_id: uuid::Uuid,
        seq: u64,
        hash: &str,
    ) -> Result<(), MetadataStoreError>;

    /// A tenant's audit records, newest first: those before `before` (a
    /// previous page's last (time, id)) and not older than `since`.
    ///
    /// # Errors
    /// Unavailable when the store cannot be reached.
    async fn list_audit(
        &self,
        tenant: TenantId,
        before: Option<(OffsetDateTime, uuid::Uuid)>,
        since: Option<OffsetDateTime>,
        limit: u32,
    ) -> Result<Vec<AuditRow>, MetadataStoreError>;
}

/// Cross-tenant queries of the background jobs (system role): what the
/// metrics count, what the health-check job checks, the leases that let
/// one replica at a time run a job, and the live replicas. Kept apart from [`MetadataStore`]
/// so the per-tenant port does not grow with every job.
#[async_trait]
pub trait FleetStore: Send + Sync + 'static {
    /// Credentials by tenant, exchange and status.
    ///
    /// # Errors
    /// Unavailable when the store cannot be reached.
    async fn credential_counts(
        &self,
    ) -> Result<Vec<(TenantId, ExchangeId, CredentialStatus, u64)>, MetadataStoreError>;

    /// Active credentials not health-checked since `since`, least recently
    /// checked first, at most `limit`.
    ///
    /// # Errors
    /// Unavailable when the store cannot be reached.
    async fn due_for_check(
        &self,
        since: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<(TenantId, ExchangeId)>, MetadataStoreError>;

    /// Takes or renews the lease `name` for `holder` until `now + ttl`;
    /// `false` while another holder's lease has not expired.
    ///
    /// # Errors
    /// Unavailable when the store cannot be reached.
    async fn take_lease(
        &self,
        name: &str,
        holder: uuid::Uuid,
        now: OffsetDateTime,
        ttl: time::Duration,
    ) -> Result<bool, MetadataStoreError>;

    /// Records that replica `id` is alive at `now` and returns how many
    /// replicas are (heartbeats within `live_for`), itself included.
    ///
    /// # Errors
    /// Unavailable when the store cannot be reached.
    async fn replica_heartbeat(
        &self,
        id: uuid::Uuid,
        now: OffsetDateTime,
        live_for: time::Duration,
    ) -> Result<u32, MetadataStoreError>;
}

/// A tenant's webhook endpoint. The URL (which may carry the receiver's
/// secret) and the signing secret are in the secret store, at
/// `secret_path`, version `secret_version`; only the host is kept here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookEndpoint {
    /// Owner.
    pub tenant: TenantId,
    /// The URL's host, for display and logs.
    pub host: String,
    /// Secret-store version of the signing secret.
    pub secret_version: u64,
}

/// A queued webhook message, claimed for one delivery attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxMessage {
    /// Stable id (`webhook-id`).
    pub id: uuid::Uuid,
    /// Owner.
    pub tenant: TenantId,
    /// What it reports.
    pub event_type: String,
    /// Exact body.
    pub payload: String,
    /// Attempts made before this one.
    pub attempts: u32,
    /// The tenant's endpoint now (`None`: it was removed).
    pub endpoint: Option<WebhookEndpoint>,
}

/// Webhook endpoints and the durable outbox.
#[async_trait]
pub trait WebhookStore: Send + Sync + 'static {
    /// Sets (or, with `None`, removes) a tenant's endpoint.
    ///
    /// # Errors
    /// Unavailable when the store cannot be reached.
    async fn set_webhook(
        &self,
        tenant: TenantId,
        endpoint: Option<WebhookEndpoint>,
    ) -> Result<(), MetadataStoreError>;

    /// A tenant's endpoint.
    ///
    /// # Errors
    /// Unavailable when the store cannot be reached.
    async fn webhook(
        &self,
        tenant: TenantId,
    ) -> Result<Option<WebhookEndpoint>, MetadataStoreError>;

    /// Claims up to `limit` messages due at `now` for one attempt each: they
    /// are not handed out again before `now + lease` (so a crash mid-attempt
    /// only delays a message).
    ///
    /// # Errors
    /// Unavailable when the store cannot be reached.
    async fn claim_due(
        &self,
        now: OffsetDateTime,
        lease: time::Duration,
        limit: u32,
    ) -> Result<Vec<OutboxMessage>, MetadataStoreError>;

    /// Records an attempt: delivered (`retry_at` None and `delivered`), or
    /// to be retried at `retry_at` (None and not delivered: given up).
    ///
    /// # Errors
    /// Unavailable when the store cannot be reached.
    async fn finish_attempt(
        &self,
        id: uuid::Uuid,
        delivered: bool,
        result: &str,
        now: OffsetDateTime,
        retry_at: Option<OffsetDateTime>,
    ) -> Result<(), MetadataStoreError>;

    /// Messages not yet delivered nor given up, per tenant (tenants with
    /// none are left out).
    ///
    /// # Errors
    /// Unavailable when the store cannot be reached.
    async fn outbox_backlog(&self) -> Result<Vec<(TenantId, u64)>, MetadataStoreError>;
}

/// Decides whether a credential set works on its exchange and what it may do.
#[async_trait]
pub trait CredentialValidator: Send + Sync + 'static {
    /// Validates `set` for `exchange` and returns its permissions.
    ///
    /// # Errors
    /// `InvalidField` for malformed input, `Rejected` when the key does not
    /// work or policy refuses it, `Unavailable` when no answer could be had.
    async fn validate(
        &self,
        tenant: TenantId,
        exchange: ExchangeId,
        set: &CredentialSet,
    ) -> Result<Permissions, ValidationError>;
}

/// A webhook URL as the target policy accepted it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedUrl {
    /// Its host (kept in PostgreSQL, logged).
    pub host: String,
    /// What may be shown of it (`scheme://host/…`).
    pub shown: String,
}

/// Where a tenant's webhook may go: checks a URL as every delivery will
/// (scheme, resolved addresses, the operators' allow-list).
#[async_trait]
pub trait WebhookTargets: Send + Sync + 'static {
    /// The accepted URL, or why it is refused (safe to show: the host at
    /// most, never the path).
    ///
    /// # Errors
    /// The refusal.
    async fn check(&self, url: &str) -> Result<CheckedUrl, String>;
}
