//! The write side: store, rotate, delete, adoption acks, webhook endpoints.
//! Vault first (check-and-set), then one PostgreSQL transaction, then the
//! cache, then publication.

use super::*;

/// Result of a Rotate.
#[derive(Debug)]
pub struct RotateOutcome {
    /// Metadata after the call.
    pub record: CredentialRecord,
    /// False when the request repeated the rotation already applied.
    pub rotated: bool,
}

impl Broker {
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
            by: ctx.changed_by(),
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
            by: ctx.changed_by(),
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
        // job's sweep of what the database no longer references. Their sets
        // are kept for the health checks first, as at an overlap's end.
        let mut dead: Vec<u64> = Vec::new();
        if !keep_previous {
            dead.push(record.current_version);
        }
        if let Some((v, _)) = record.open_previous(now) {
            dead.push(v);
        }
        for v in &dead {
            if let Err(e) = self
                .keep_replaced(tenant, exchange, &updated.vault_path, *v)
                .await
            {
                tracing::warn!(%tenant, %exchange, version = v, "could not keep the replaced key's set to check it at the exchange: {e}");
            }
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

    /// Deletes metadata (with a DELETED event) and then every Vault version,
    /// the copies of replaced keys kept for the health checks included.
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
            .delete(tenant, exchange, &ctx.changed_by())
            .await?;
        let deleted = event.is_some();
        if let Some(event) = event {
            self.apply_event(event);
        }
        self.secrets
            .purge(&self.vault_path(tenant, exchange))
            .await?;
        self.secrets
            .purge(&self.replaced_path(tenant, exchange))
            .await?;
        if deleted {
            tracing::info!(%tenant, %exchange, "credentials deleted");
        }
        Ok(deleted)
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
        let now = self.clock.now();
        // A fleet acknowledges a rotation within the same second: the
        // cached record decides (events keep it current), and PostgreSQL
        // is asked only when the cache does not hold this version.
        let record = match self.cache.record(&(tenant, exchange), now, version) {
            Some(r) => r,
            None => self.describe(tenant, exchange).await?,
        };
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
}
