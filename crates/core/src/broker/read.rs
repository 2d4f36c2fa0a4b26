//! The read side: a credential as the cache holds it (loaded on a miss,
//! one shared load per key), its metadata, the audit trail's pages.

use super::*;

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

impl Broker {
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
        let Some(log) = &self.audit_log else {
            return Err(BrokerError::FailedPrecondition(
                "this broker keeps no audit trail (audit.enabled = false)".into(),
            ));
        };
        let rows = log.list_audit(tenant, before, since, limit).await?;
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
