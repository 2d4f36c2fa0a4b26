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
}

impl Default for BrokerSettings {
    fn default() -> Self {
        Self {
            path_prefix: "tenants".into(),
            default_overlap: Duration::hours(1),
            max_overlap: Duration::days(7),
            expiry_warning: Duration::days(7),
        }
    }
}

/// What a health check found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    /// The exchange accepted the key and nothing drifted.
    Healthy,
    /// The exchange (or the policy, on what the exchange reported) refused
    /// the key: marked invalid.
    Refused(String),
    /// The exchange reports the key expired: marked expired.
    Expired,
    /// The key works but changed in a way the tenant should know (lost its
    /// IP restriction, lost a permission, expires soon); still active.
    Drift(String),
    /// No usable answer from the exchange: only the health detail changed.
    Unreachable(String),
}

impl Finding {
    /// The metric and webhook name of the finding.
    pub fn as_str(&self) -> &'static str {
        match self {
            Finding::Healthy => "healthy",
            Finding::Refused(_) => "refused",
            Finding::Expired => "expired",
            Finding::Drift(_) => "drift",
            Finding::Unreachable(_) => "unreachable",
        }
    }

    /// A finding the tenant must hear of (counted as a health-check failure).
    pub fn is_failure(&self) -> bool {
        matches!(
            self,
            Finding::Refused(_) | Finding::Expired | Finding::Drift(_)
        )
    }
}

impl Notice {
    /// The webhook for `finding`, recorded by `update` on `version`. Its
    /// payload follows the Standard Webhooks shape (`type`, `timestamp`,
    /// `data`) and holds no secret: tenant, exchange, version, status and
    /// the safe-to-show reason.
    fn new(finding: &Finding, update: &HealthUpdate, version: u64) -> Self {
        let event_type = match finding {
            Finding::Refused(_) => "credential.invalidated",
            Finding::Expired => "credential.expired",
            _ => "credential.drift",
        };
        let id = uuid::Uuid::now_v7();
        let payload = serde_json::json!({
            "type": event_type,
            "timestamp": update.checked_at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
            "data": {
                "tenant_id": update.tenant.to_string(),
                "exchange": update.exchange.as_str(),
                "version": version,
                "status": update.status.as_str(),
                "health": update.health.as_str(),
                "reason": update.detail,
                "actor": update.actor,
            },
        });
        Self {
            id,
            event_type,
            payload: payload.to_string(),
            at: update.checked_at,
        }
    }
}

/// One health check's result.
#[derive(Clone, Debug)]
pub struct CheckOutcome {
    /// Metadata after the check.
    pub record: CredentialRecord,
    /// What it found.
    pub finding: Finding,
}

/// What changed between the permissions stored and the ones the exchange
/// reports now, in words (empty: nothing worth telling). Keys that lost a
/// required permission, or gained withdraw rights without their tenant
/// being allowed them, never get here: the validator's policy refuses them.
fn drift(
    before: Option<&Permissions>,
    now: &Permissions,
    at: OffsetDateTime,
    warn: Duration,
) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(b) = before {
        for (name, was, is) in [
            ("read", b.read, now.read),
            ("trade", b.trade, now.trade),
            ("transfer", b.transfer, now.transfer),
        ] {
            if was && !is {
                out.push(format!("lost the {name} permission"));
            }
        }
        if !b.withdraw && now.withdraw {
            out.push("gained the withdraw permission".into());
        }
        if b.ip_restricted && !now.ip_restricted {
            out.push("lost its IP allow-list".into());
        }
    }
    if let Some(exp) = now.expires_at
        && exp > at
        && exp - at < warn
    {
        let days = (exp - at).whole_hours() as f64 / 24.0;
        out.push(format!("expires in {days:.1} days"));
    }
    out
}

/// What GetCredentials returns: the cached entry itself (nothing is copied
/// on the hot path) and whether its previous set is still inside its overlap.
#[derive(Debug)]
pub struct CredentialView {
    entry: Arc<CachedCredential>,
    open_previous: Option<(u64, OffsetDateTime)>,
    /// Served from the cache because a backend is down.
    pub stale: bool,
}

impl CredentialView {
    fn new(entry: Arc<CachedCredential>, now: OffsetDateTime, stale: bool) -> Self {
        // A previous set is served only while its deadline is ahead, even if
        // the entry was cached before the deadline passed.
        let open_previous = entry
            .record
            .open_previous(now)
            .filter(|_| entry.previous.is_some());
        Self {
            entry,
            open_previous,
            stale,
        }
    }

    /// Metadata.
    pub fn record(&self) -> &CredentialRecord {
        &self.entry.record
    }

    /// The current set.
    pub fn current(&self) -> &CredentialSet {
        &self.entry.current
    }

    /// The previous set with its version and deadline, while its overlap is
    /// open.
    pub fn previous(&self) -> Option<(&CredentialSet, u64, OffsetDateTime)> {
        let (version, until) = self.open_previous?;
        self.entry
            .previous
            .as_ref()
            .map(|set| (set, version, until))
    }
}

/// Result of a Rotate.
#[derive(Debug)]
pub struct RotateOutcome {
    /// Metadata after the call.
    pub record: CredentialRecord,
    /// False when the request repeated the rotation already applied.
    pub rotated: bool,
}

/// The broker core. Cheap to share behind an `Arc`.
pub struct Broker {
    audit: Arc<dyn crate::audit::AuditSink>,
    webhooks: Option<(Arc<dyn WebhookStore>, Arc<dyn ports::WebhookTargets>)>,
    secrets: Arc<dyn SecretStore>,
    meta: Arc<dyn MetadataStore>,
    validator: Arc<dyn CredentialValidator>,
    cache: CredentialCache,
    hub: Hub,
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
            webhooks: None,
            secrets,
            meta,
            validator,
            cache,
            hub,
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

    /// Sets (or, with an empty `url`, removes) a tenant's webhook endpoint.
    /// The URL is checked as every delivery will check it (https, a public
    /// address after resolution, or one the operator allowed); it goes to
    /// the secret store with the signing secret (a new version at
    /// `{prefix}/{tenant}/webhook`), since a receiver's URL may carry its
    /// own secret; PostgreSQL keeps the host and that version. Returns the
    /// URL as it may be shown (`scheme://host/…`) and the secret when it was
    /// generated here.
    ///
    /// # Errors
    /// `InvalidArgument` for a refused URL or a bad secret, `Unavailable`.
    pub async fn set_webhook(
        &self,
        ctx: &RequestContext,
        tenant: TenantId,
        url: &str,
        secret: Option<SecretString>,
    ) -> Result<(String, Option<SecretString>), BrokerError> {
        let (store, targets) = self.webhooks.as_ref().ok_or(BrokerError::Unavailable {
            what: "the webhook store",
        })?;
        let path = webhook::secret_path(&self.settings.path_prefix, tenant);
        if url.is_empty() {
            store.set_webhook(tenant, None).await?;
            self.secrets.purge(&path).await?;
            tracing::info!(%tenant, actor = %ctx.actor_label(), "webhook removed");
            return Ok((String::new(), None));
        }
        let checked = targets
            .check(url)
            .await
            .map_err(|reason| BrokerError::InvalidArgument {
                field: "url",
                reason,
            })?;
        let host = checked.host.clone();
        let (secret, generated) = match secret {
            Some(s) => {
                webhook::secret_key(s.expose_secret()).map_err(|e| {
                    BrokerError::InvalidArgument {
                        field: "secret",
                        reason: e.to_string(),
                    }
                })?;
                (s, false)
            }
            None => (webhook::generate_secret(), true),
        };
        let cas = self.secrets.latest_version(&path).await?.unwrap_or(0);
        let set = webhook::stored_endpoint(secret.clone(), url);
        let version = self.secrets.write(&path, &set, cas).await?;
        store
            .set_webhook(
                tenant,
                Some(crate::broker::ports::WebhookEndpoint {
                    tenant,
                    host: host.clone(),
                    secret_version: version,
                }),
            )
            .await?;
        tracing::info!(%tenant, %host, actor = %ctx.actor_label(), "webhook set");
        Ok((checked.shown, generated.then_some(secret)))
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
    pub fn audit_before(&self, mut record: crate::audit::AuditRecord) -> Result<(), BrokerError> {
        record.result = std::borrow::Cow::Borrowed("requested");
        record.grpc_code = std::borrow::Cow::Borrowed("PENDING");
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

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
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

    /// The current (and, during an overlap, previous) set.
    ///
    /// `min_version` is the version a client was told about by an event (0:
    /// none): a cached set older than that is not served from the cache.
    ///
    /// # Errors
    /// `NotFound`; `FailedPrecondition` for a revoked credential;
    /// `SecretMissing` when Vault lost the current version; `Unavailable`
    /// when a backend is down and nothing usable is cached.
    pub async fn get_credentials(
        &self,
        tenant: TenantId,
        exchange: ExchangeId,
        min_version: u64,
    ) -> Result<CredentialView, BrokerError> {
        let key = (tenant, exchange);
        let now = self.clock.now();
        if let Some(hit) = self.cache.fresh(&key, now, min_version) {
            return Ok(CredentialView::new(hit, now, false));
        }
        let loader = Loader {
            secrets: self.secrets.clone(),
            meta: self.meta.clone(),
            tenant,
            exchange,
            now,
        };
        match self.cache.load(key, || loader.run()).await {
            Ok(entry) => Ok(CredentialView::new(entry, now, false)),
            Err(e @ BrokerError::Unavailable { .. }) => match self.cache.within_grace(&key, now) {
                Some(hit) => {
                    tracing::warn!(%tenant, %exchange, "serving a stale cached credential: {e}");
                    Ok(CredentialView::new(hit, now, true))
                }
                None => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// Validates and stores a tenant's first set for an exchange.
    ///
    /// # Errors
    /// `Validation` when the set is refused, `AlreadyExists` when a set is
    /// stored, `Conflict` when a concurrent store won, `Unavailable`.
    pub async fn validate_and_store(
        &self,
        ctx: &RequestContext,
        tenant: TenantId,
        exchange: ExchangeId,
        set: CredentialSet,
    ) -> Result<CredentialRecord, BrokerError> {
        // Cheap checks first: a malformed set or an existing credential
        // never costs an exchange request (or the request budget).
        validate::check_format(exchange, &set)?;
        if self.meta.get(tenant, exchange).await?.is_some() {
            return Err(already_exists(tenant, exchange));
        }
        let permissions = self.validator.validate(tenant, exchange, &set).await?;
        let path = self.vault_path(tenant, exchange);
        // A version without a row is what a crash between the two writes
        // leaves behind; writing on top of it converges the retry.
        let cas = self.secrets.latest_version(&path).await?.unwrap_or(0);
        let version = self.secrets.write(&path, &set, cas).await?;
        let new = NewCredential {
            tenant,
            exchange,
            vault_path: path,
            version,
            permissions,
            api_key_hint: set.key_hint(),
            validated_at: self.clock.now(),
            actor: ctx.actor_label(),
        };
        let (record, event) = self.meta.insert(new).await.map_err(|e| match e {
            error::MetadataStoreError::AlreadyExists => already_exists(tenant, exchange),
            other => other.into(),
        })?;
        tracing::info!(%tenant, %exchange, version, key = %record.api_key_hint, "credentials stored");
        // Cache what we hold before anyone is told, so a subscriber's
        // fetch on the event is a hit.
        self.cache.install(CachedCredential {
            record: record.clone(),
            current: set,
            previous: None,
            fetched_at: self.clock.now(),
        });
        self.apply_event(event);
        Ok(record)
    }

    /// Validates and stores a new version; the replaced one stays served for
    /// the overlap (`None`: the default; zero: revoked at once).
    ///
    /// # Errors
    /// `InvalidArgument` for an overlap beyond the maximum, `Validation`,
    /// `NotFound`, `Conflict` when a concurrent rotation won, `Unavailable`.
    pub async fn rotate(
        &self,
        ctx: &RequestContext,
        tenant: TenantId,
        exchange: ExchangeId,
        set: CredentialSet,
        overlap: Option<Duration>,
    ) -> Result<RotateOutcome, BrokerError> {
        let overlap = overlap.unwrap_or(self.settings.default_overlap);
        if overlap.is_negative() || overlap > self.settings.max_overlap {
            return Err(BrokerError::InvalidArgument {
                field: "overlap_seconds",
                reason: format!(
                    "must be between 0 and {} seconds",
                    self.settings.max_overlap.whole_seconds()
                ),
            });
        }
        validate::check_format(exchange, &set)?;
        let record = self
            .meta
            .get(tenant, exchange)
            .await?
            .ok_or_else(|| not_found(tenant, exchange))?;
        // A retried Rotate (timeout, crash) carries the set already current:
        // converge on it instead of rotating again.
        let current = match self
            .secrets
            .read(&record.vault_path, record.current_version)
            .await
        {
            Ok(set) => Some(set),
            // Destroyed under us by a concurrent rotation (we lost: ABORTED),
            // or outside the broker (rotating in a new set is the repair).
            Err(SecretStoreError::NotFound { .. }) => {
                let now_current = self
                    .meta
                    .get(tenant, exchange)
                    .await?
                    .map(|r| r.current_version);
                if now_current != Some(record.current_version) {
                    return Err(BrokerError::Conflict);
                }
                tracing::warn!(%tenant, %exchange, version = record.current_version,
                    "the current version is missing from Vault; rotating over it");
                None
            }
            Err(e) => return Err(e.into()),
        };
        if current.as_ref().is_some_and(|c| c.same_as(&set)) {
            return Ok(RotateOutcome {
                record,
                rotated: false,
            });
        }
        let permissions = self.validator.validate(tenant, exchange, &set).await?;
        let cas = self
            .secrets
            .latest_version(&record.vault_path)
            .await?
            .unwrap_or(0);
        let new_version = self.secrets.write(&record.vault_path, &set, cas).await?;
        let now = self.clock.now();
        let keep_previous = overlap > Duration::ZERO;
        let commit = RotationCommit {
            tenant,
            exchange,
            expected_version: record.current_version,
            new_version,
            previous_version: keep_previous.then_some(record.current_version),
            previous_valid_until: keep_previous.then_some(now + overlap),
            permissions,
            api_key_hint: set.key_hint(),
            validated_at: now,
            actor: ctx.actor_label(),
        };
        let (updated, event) = self.meta.rotate(commit).await.map_err(|e| match e {
            error::MetadataStoreError::NotFound => not_found(tenant, exchange),
            other => other.into(),
        })?;
        tracing::info!(%tenant, %exchange, version = new_version, overlap_secs = overlap.whole_seconds(), "credentials rotated");
        self.cache.install(CachedCredential {
            record: updated.clone(),
            current: set,
            previous: if keep_previous { current } else { None },
            fetched_at: now,
        });
        self.apply_event(event);
        // Versions no longer served are destroyed now: the replaced current
        // one on an emergency revoke, and a previous one cut short by a
        // rotation inside its overlap. Failure only delays it to the retire
        // job's sweep of what the database no longer references.
        let mut dead: Vec<u64> = Vec::new();
        if !keep_previous {
            dead.push(record.current_version);
        }
        if let Some((v, _)) = record.open_previous(now) {
            dead.push(v);
        }
        if !dead.is_empty()
            && let Err(e) = self
                .secrets
                .destroy_versions(&updated.vault_path, &dead)
                .await
        {
            tracing::warn!(%tenant, %exchange, ?dead, "could not destroy replaced versions yet: {e}");
        }
        Ok(RotateOutcome {
            record: updated,
            rotated: true,
        })
    }

    /// Deletes metadata (with a DELETED event) and then every Vault version.
    /// Returns whether anything was stored. Retrying after a Vault failure
    /// finishes the purge.
    ///
    /// # Errors
    /// `Unavailable`.
    pub async fn delete(
        &self,
        ctx: &RequestContext,
        tenant: TenantId,
        exchange: ExchangeId,
    ) -> Result<bool, BrokerError> {
        let event = self
            .meta
            .delete(tenant, exchange, &ctx.actor_label())
            .await?;
        let deleted = event.is_some();
        if let Some(event) = event {
            self.apply_event(event);
        }
        self.secrets
            .purge(&self.vault_path(tenant, exchange))
            .await?;
        if deleted {
            tracing::info!(%tenant, %exchange, "credentials deleted");
        }
        Ok(deleted)
    }

    /// Metadata of one credential.
    ///
    /// # Errors
    /// `NotFound`, `Unavailable`.
    pub async fn describe(
        &self,
        tenant: TenantId,
        exchange: ExchangeId,
    ) -> Result<CredentialRecord, BrokerError> {
        self.meta
            .get(tenant, exchange)
            .await?
            .ok_or_else(|| not_found(tenant, exchange))
    }

    /// Metadata of one credential with who acknowledged which version.
    ///
    /// # Errors
    /// `NotFound`, `Unavailable`.
    pub async fn describe_with_adoption(
        &self,
        tenant: TenantId,
        exchange: ExchangeId,
    ) -> Result<(CredentialRecord, Vec<Adoption>), BrokerError> {
        let record = self.describe(tenant, exchange).await?;
        let adoption = self.meta.adoption(tenant, exchange).await?;
        Ok((record, adoption))
    }

    /// Records that `subscriber` now signs with `version`, which must be the
    /// current version or the previous one inside its overlap.
    ///
    /// # Errors
    /// `FailedPrecondition` for a version that is not served, `NotFound`.
    pub async fn acknowledge(
        &self,
        ctx: &RequestContext,
        tenant: TenantId,
        exchange: ExchangeId,
        subscriber: &str,
        version: u64,
    ) -> Result<(), BrokerError> {
        tracing::debug!(request_id = %ctx.request_id, %tenant, %exchange, version, "version acknowledged");
        let record = self.describe(tenant, exchange).await?;
        let now = self.clock.now();
        let served = version == record.current_version
            || record.open_previous(now).is_some_and(|(v, _)| v == version);
        if !served {
            return Err(BrokerError::FailedPrecondition(format!(
                "version {version} of {exchange} is not served (current is {}); fetch the current set and acknowledge that",
                record.current_version
            )));
        }
        self.meta
            .acknowledge(tenant, exchange, subscriber, version, now)
            .await
            .map_err(|e| match e {
                error::MetadataStoreError::NotFound => not_found(tenant, exchange),
                other => other.into(),
            })
    }

    /// A page of a tenant's audit trail, newest first.
    ///
    /// # Errors
    /// `Unavailable`.
    pub async fn audit_page(
        &self,
        tenant: TenantId,
        before: Option<(OffsetDateTime, uuid::Uuid)>,
        since: Option<OffsetDateTime>,
        limit: u32,
    ) -> Result<Vec<ports::AuditRow>, BrokerError> {
        let rows = self.meta.list_audit(tenant, before, since, limit).await?;
        // Only what the chain covers is believed: a row whose stored tenant
        // or time disagrees with its hashed body (edited outside the chain;
        // `audit verify` names it) is not shown as this tenant's.
        let (shown, hidden): (Vec<_>, Vec<_>) = rows.into_iter().partition(|r| {
            crate::audit::chain::column_mismatch(r).is_none() && r.tenant == Some(tenant)
        });
        if let Some(r) = hidden.first() {
            tracing::error!(%tenant, chain = %r.chain_id, seq = r.seq, hidden = hidden.len(),
                "audit rows whose columns disagree with their hashed body were not listed (run `credbroker audit verify`)");
        }
        Ok(shown)
    }

    /// Metadata of every credential of a tenant.
    ///
    /// # Errors
    /// `Unavailable`.
    pub async fn list(&self, tenant: TenantId) -> Result<Vec<CredentialRecord>, BrokerError> {
        Ok(self.meta.list(tenant).await?)
    }

    /// Re-validates the current set against the exchange now and records the
    /// outcome (ValidateCredentials): [`Self::check`], with an exchange
    /// outage returned as `Validation` (`Unavailable` kind) after its
    /// detail was recorded.
    ///
    /// # Errors
    /// `NotFound`, `Validation(Unavailable)`, `Unavailable`.
    pub async fn revalidate(
        &self,
        ctx: &RequestContext,
        tenant: TenantId,
        exchange: ExchangeId,
    ) -> Result<CredentialRecord, BrokerError> {
        let out = self.check(ctx, tenant, exchange).await?;
        match out.finding {
            Finding::Unreachable(reason) => Err(ValidationError::Unavailable {
                exchange: exchange.as_str(),
                reason,
            }
            .into()),
            _ => Ok(out.record),
        }
    }

    /// The one health-check path (the background job and
    /// ValidateCredentials): validates the current set against the
    /// exchange and records what it found. A refusal marks the credential
    /// invalid (expired when the exchange reports it expired) with an
    /// INVALIDATED event; drift (a lost permission or IP allow-list, an
    /// expiry within the warning window) is recorded in the health detail;
    /// an exchange outage changes nothing but the health detail. Every
    /// finding the tenant must hear of goes, in the same commit, to the
    /// tenant's webhook outbox.
    ///
    /// # Errors
    /// `NotFound`, `Unavailable` (Vault or PostgreSQL).
    pub async fn check(
        &self,
        ctx: &RequestContext,
        tenant: TenantId,
        exchange: ExchangeId,
    ) -> Result<CheckOutcome, BrokerError> {
        let record = self.describe(tenant, exchange).await?;
        let set = self
            .secrets
            .read(&record.vault_path, record.current_version)
            .await?;
        let now = self.clock.now();
        let base = HealthUpdate {
            tenant,
            exchange,
            health: record.health,
            status: record.status,
            detail: None,
            permissions: None,
            checked_at: now,
            actor: ctx.actor_label(),
            notice: None,
        };
        let (mut update, finding, notify) =
            match self.validator.validate(tenant, exchange, &set).await {
                Ok(permissions) => {
                    let expired = permissions.expires_at.is_some_and(|t| t <= now);
                    let drifted = drift(
                        record.permissions.as_ref(),
                        &permissions,
                        now,
                        self.settings.expiry_warning,
                    );
                    let (status, health, detail, finding) = if expired {
                        let why =
                            "the exchange reports the key expired; rotate in a new one".to_owned();
                        (
                            CredentialStatus::Expired,
                            HealthStatus::Unhealthy,
                            Some(why),
                            Finding::Expired,
                        )
                    } else if drifted.is_empty() {
                        let status = if matches!(
                            record.status,
                            CredentialStatus::Invalid | CredentialStatus::Expired
                        ) {
                            CredentialStatus::Active
                        } else {
                            record.status
                        };
                        (status, HealthStatus::Healthy, None, Finding::Healthy)
                    } else {
                        let what = format!("the key works but {}", drifted.join(", "));
                        (
                            record.status,
                            HealthStatus::Healthy,
                            Some(what.clone()),
                            Finding::Drift(what),
                        )
                    };
                    // Tell the tenant once per change, not every round.
                    let notify = finding.is_failure() && detail != record.health_detail;
                    (
                        HealthUpdate {
                            health,
                            status,
                            detail,
                            permissions: Some(permissions),
                            ..base
                        },
                        finding,
                        notify,
                    )
                }
                Err(ValidationError::Unavailable { reason, .. }) => {
                    let detail =
                        format!("no usable answer from {exchange} at the last check: {reason}");
                    (
                        HealthUpdate {
                            detail: Some(detail),
                            ..base
                        },
                        Finding::Unreachable(reason),
                        false,
                    )
                }
                Err(e) => {
                    let why = e.to_string();
                    (
                        HealthUpdate {
                            health: HealthStatus::Unhealthy,
                            status: CredentialStatus::Invalid,
                            detail: Some(why.clone()),
                            ..base
                        },
                        Finding::Refused(why),
                        record.status != CredentialStatus::Invalid,
                    )
                }
            };
        if notify {
            update.notice = Some(Notice::new(&finding, &update, record.current_version));
        }
        let (updated, event) = self.meta.record_health(update).await.map_err(|e| match e {
            error::MetadataStoreError::NotFound => not_found(tenant, exchange),
            other => other.into(),
        })?;
        if let Some(event) = event {
            tracing::warn!(%tenant, %exchange, finding = finding.as_str(), "credential invalidated by a health check");
            self.apply_event(event);
        } else {
            self.cache.forget(&(tenant, exchange));
        }
        Ok(CheckOutcome {
            record: updated,
            finding,
        })
    }
}

/// One cache miss: the row from PostgreSQL, then the current and previous
/// sets from Vault at once. Owns what it needs, so the cache can share it
/// between callers and finish it when the caller that started it is gone.
struct Loader {
    secrets: Arc<dyn SecretStore>,
    meta: Arc<dyn MetadataStore>,
    tenant: TenantId,
    exchange: ExchangeId,
    now: OffsetDateTime,
}

impl Loader {
    /// Rows read before giving up on a credential that keeps moving under us
    /// (or a Vault standby that has not caught up with a write yet).
    const ATTEMPTS: usize = 4;

    async fn run(self) -> Result<CachedCredential, BrokerError> {
        let (tenant, exchange) = (self.tenant, self.exchange);
        let mut last_missing = 0;
        for attempt in 0..Self::ATTEMPTS {
            let record = self
                .meta
                .get(tenant, exchange)
                .await?
                .ok_or_else(|| not_found(tenant, exchange))?;
            if record.status == CredentialStatus::Revoked {
                return Err(BrokerError::FailedPrecondition(format!(
                    "credentials for tenant {tenant} on {exchange} are revoked; store or rotate in a new set"
                )));
            }
            // The row still names the version Vault just lacked: not a
            // rotation that moved on but a standby behind the write. Give it
            // a moment before reading again.
            if record.current_version == last_missing {
                tokio::time::sleep(std::time::Duration::from_millis(25 << attempt)).await;
            }
            let path = &record.vault_path;
            let open_previous = record.open_previous(self.now);
            let (current, previous) =
                tokio::join!(self.secrets.read(path, record.current_version), async {
                    match open_previous {
                        Some((version, _)) => Some(self.secrets.read(path, version).await),
                        None => None,
                    }
                });
            let current = match current {
                Ok(set) => set,
                // PostgreSQL says the version exists: either a rotation
                // destroyed it since we read the row (the next row read moves
                // on at once), or a Vault standby lags the write (the next
                // round waits for it first). Only a version missing every
                // time is reported lost.
                Err(SecretStoreError::NotFound { version, .. }) => {
                    last_missing = version;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let previous = match previous {
                None => None,
                Some(Ok(set)) => Some(set),
                // Retired concurrently: the overlap is over, serve without it.
                Some(Err(SecretStoreError::NotFound { .. })) => None,
                Some(Err(e)) => return Err(e.into()),
            };
            return Ok(CachedCredential {
                record,
                current,
                previous,
                fetched_at: self.now,
            });
        }
        tracing::error!(%tenant, %exchange, version = last_missing, "the current version is missing from Vault");
        Err(BrokerError::SecretMissing {
            tenant: tenant.to_string(),
            exchange: exchange.as_str(),
            version: last_missing,
        })
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
