//! The domain core: store, fetch, rotate, delete and re-validate credentials.
//!
//! No tonic, SQL or vaultrs type appears here; the broker drives the ports in
//! [`ports`] and publishes committed events to the hub. Write order is always
//! Vault first (check-and-set), then one PostgreSQL transaction that points
//! at the new version and appends the event, then cache invalidation, then
//! publication: a crash in between leaves at worst an unreferenced Vault
//! version, never metadata that points at a missing secret.

pub mod context;
pub mod error;
pub mod ports;
pub mod types;
pub mod validate;
pub mod webhook;

mod health;
mod read;
mod write;

pub use health::{CheckOutcome, Finding};
pub use read::CredentialView;
pub use write::RotateOutcome;

use std::sync::Arc;

use secrecy::{ExposeSecret as _, SecretString};

use time::{Duration, OffsetDateTime};

use crate::cache::{CacheStats, CachedCredential, CredentialCache};

use crate::clock::Clock;

use crate::rotation::hub::Hub;
use context::RequestContext;
use error::{BrokerError, SecretStoreError, ValidationError};
use ports::{
    CredentialValidator, HealthUpdate, MetadataStore, NewCredential, Notice, RotationCommit,
    SecretStore, WebhookStore,
};
use types::{
    Adoption, CredentialEvent, CredentialRecord, CredentialSet, CredentialStatus, ExchangeId,
    HealthStatus, Permissions, TenantId,
};

/// Tunables of the broker core.
#[derive(Clone, Debug)]
pub struct BrokerSettings {
    /// KV v2 path prefix under the mount, e.g. `tenants`.
    pub path_prefix: String,
    /// Overlap when a Rotate does not name one.
    pub default_overlap: Duration,
    /// Longest overlap a Rotate may ask for.
    pub max_overlap: Duration,
    /// An expiry the exchange reports closer than this is reported by a
    /// health check.
    pub expiry_warning: Duration,
    /// A key whose current version is older than this is reported by a
    /// health check (the reminder to rotate, where the exchange has no
    /// key-management API or none is stored); None: never.
    pub max_key_age: Option<Duration>,
    /// Keep a replaced key's set when its overlap ends, so the health
    /// checks can tell whether the exchange still accepts it (a key left
    /// live there: the reminder to delete it), until it no longer does.
    pub watch_replaced_keys: bool,
}

impl Default for BrokerSettings {
    fn default() -> Self {
        Self {
            path_prefix: "tenants".into(),
            default_overlap: Duration::hours(1),
            max_overlap: Duration::days(7),
            expiry_warning: Duration::days(7),
            max_key_age: None,
            watch_replaced_keys: false,
        }
    }
}

/// The broker core. Cheap to share behind an `Arc`.
pub struct Broker {
    audit: Arc<dyn crate::audit::AuditSink>,
    audit_log: Option<Arc<dyn ports::AuditLog>>,
    webhooks: Option<(Arc<dyn WebhookStore>, Arc<dyn ports::WebhookTargets>)>,
    secrets: Arc<dyn SecretStore>,
    meta: Arc<dyn MetadataStore>,
    validator: Arc<dyn CredentialValidator>,
    cache: CredentialCache,
    hub: Hub,
    /// The reads stream opens share.
    opens: crate::rotation::opens::StreamOpens,
    clock: Arc<dyn Clock>,
    settings: BrokerSettings,
}

impl Broker {
    /// Assembles the core from its ports.
    pub fn new(
        secrets: Arc<dyn SecretStore>,
        meta: Arc<dyn MetadataStore>,
        validator: Arc<dyn CredentialValidator>,
        cache: CredentialCache,
        hub: Hub,
        clock: Arc<dyn Clock>,
        settings: BrokerSettings,
    ) -> Self {
        Self {
            audit: Arc::new(crate::audit::Discard),
            audit_log: None,
            webhooks: None,
            secrets,
            meta,
            validator,
            cache,
            hub,
            opens: crate::rotation::opens::StreamOpens::default(),
            clock,
            settings,
        }
    }

    /// Keeps webhook endpoints in `store`, allowing the URLs `targets`
    /// allows (without a store, SetWebhook is UNAVAILABLE).
    #[must_use]
    pub fn with_webhooks(
        mut self,
        store: Arc<dyn WebhookStore>,
        targets: Arc<dyn ports::WebhookTargets>,
    ) -> Self {
        self.webhooks = Some((store, targets));
        self
    }

    /// Reads tenants' audit records (ListAuditEvents) from `log` (without
    /// one, ListAuditEvents is FAILED_PRECONDITION).
    #[must_use]
    pub fn with_audit_log(mut self, log: Arc<dyn ports::AuditLog>) -> Self {
        self.audit_log = Some(log);
        self
    }

    /// Records background actions into `sink` (default: nowhere).
    #[must_use]
    pub fn with_audit(mut self, sink: Arc<dyn crate::audit::AuditSink>) -> Self {
        self.audit = sink;
        self
    }

    /// Records a background action as the system actor; a failure is
    /// logged loudly and the record kept for the audit spool's recovery
    /// (the action already happened in the stores; its request record, see
    /// [`Self::audit_before`], shows it meanwhile).
    pub fn audit_system(&self, record: &crate::audit::AuditRecord) {
        if let Err(e) = self.audit.append(record) {
            tracing::error!(action = %record.action, "a system action's outcome could not be audited yet (kept): {e}");
            self.audit.defer(record.clone());
        }
    }

    /// Vault's rule for background jobs: the request record of an action
    /// about to change state (`record`, with `result: requested`), written
    /// before it; when it cannot be written the job must not act.
    ///
    /// # Errors
    /// `Unavailable` naming the audit spool.
    pub fn audit_before(&self, record: crate::audit::AuditRecord) -> Result<(), BrokerError> {
        let record = record.into_request();
        self.audit.append(&record).map_err(|e| {
            tracing::warn!(action = %record.action, "a background action was skipped: its request record cannot be written ({e})");
            BrokerError::Unavailable {
                what: "the audit spool",
            }
        })
    }

    /// Whether the audit trail takes records now (a batch job checks before
    /// a pass whose subjects it learns only as it acts).
    ///
    /// # Errors
    /// `Unavailable` naming the audit spool.
    pub fn audit_ready(&self) -> Result<(), BrokerError> {
        self.audit.check().map_err(|_| BrokerError::Unavailable {
            what: "the audit spool",
        })
    }

    /// The metadata store (watch streams read events from it).
    pub fn metadata(&self) -> &Arc<dyn MetadataStore> {
        &self.meta
    }

    /// The secret store.
    pub fn secrets(&self) -> &Arc<dyn SecretStore> {
        &self.secrets
    }

    /// The event hub of this replica.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// The reads stream opens share (see [`crate::rotation::opens`]).
    pub fn opens(&self) -> &crate::rotation::opens::StreamOpens {
        &self.opens
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The overlap a rotation gets when it names none.
    pub fn default_overlap(&self) -> Duration {
        self.settings.default_overlap
    }

    /// How soon before a key's expiry the health check calls it drift.
    pub fn expiry_warning(&self) -> Duration {
        self.settings.expiry_warning
    }

    /// The longest overlap a rotation may ask for.
    pub fn max_overlap(&self) -> Duration {
        self.settings.max_overlap
    }

    /// The KV v2 folder (relative to the mount) that holds every tenant.
    pub fn vault_path_prefix(&self) -> &str {
        &self.settings.path_prefix
    }

    /// KV v2 path of a credential, relative to the mount.
    pub fn vault_path(&self, tenant: TenantId, exchange: ExchangeId) -> String {
        format!(
            "{}/{tenant}/exchanges/{exchange}/credentials",
            self.settings.path_prefix
        )
    }

    /// After a commit on this replica: the cache applies the event at once
    /// (our next read is fresh), and the event is published here unless the
    /// event listener does it.
    pub fn apply_event(&self, event: CredentialEvent) {
        if self.meta.event_delivery() == ports::EventDelivery::OnCommit {
            self.deliver(event);
        } else {
            self.cache.apply(&event);
        }
    }

    /// Delivers a committed event (from any replica): the cache applies it
    /// first, then it is published, so a subscriber that refetches on the
    /// event never reads the old set from this replica's cache.
    pub fn deliver(&self, event: CredentialEvent) {
        self.cache.apply(&event);
        self.hub.publish(event);
    }

    /// Read-path counters (cache hits, loads, coalesced misses, discarded
    /// stale loads).
    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }
}

fn not_found(tenant: TenantId, exchange: ExchangeId) -> BrokerError {
    BrokerError::NotFound {
        tenant: tenant.to_string(),
        exchange: exchange.as_str(),
    }
}

fn already_exists(tenant: TenantId, exchange: ExchangeId) -> BrokerError {
    BrokerError::AlreadyExists {
        tenant: tenant.to_string(),
        exchange: exchange.as_str(),
    }
}
