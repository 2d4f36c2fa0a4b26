//! Health checks: re-validating a stored key against its exchange, the one
//! path (`Broker::check`) the job, ValidateCredentials and
//! GetCredentialHealth share, and what a finding tells the tenant.

use super::*;

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
    /// the safe-to-show reason. A drift that includes a replaced key the
    /// exchange still accepts (`old_key_live`) is its own type.
    fn new(finding: &Finding, update: &HealthUpdate, version: u64, old_key_live: bool) -> Self {
        let event_type = match finding {
            Finding::Refused(_) => "credential.invalidated",
            Finding::Expired => "credential.expired",
            Finding::Drift(_) if old_key_live => "credential.old_key_live",
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
                "actor": update.by.actor,
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
    /// Replaced keys (kept since their overlap ended) that the exchange
    /// still accepts: each is in the finding's reminder.
    pub replaced_live: usize,
    /// The current key is older than the rotation policy
    /// (`max_key_age`): where a management key is stored, the health-check
    /// job replaces it at the exchange.
    pub past_policy: bool,
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

impl Broker {
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

    /// The reminder for a key older than the rotation policy
    /// (`max_key_age`), in words; None when it is younger, when no policy
    /// is set, or when Vault cannot say when the version was written.
    async fn past_rotation_policy(
        &self,
        record: &CredentialRecord,
        now: OffsetDateTime,
    ) -> Option<String> {
        let max = self.settings.max_key_age?;
        let versions = self.secrets.versions(&record.vault_path).await.ok()?;
        let written = versions
            .iter()
            .find(|v| v.version == record.current_version)?
            .created_at;
        (now - written > max).then(|| {
            format!(
                "is older than the rotation policy ({} days): rotate it",
                max.whole_days()
            )
        })
    }

    /// Vault path where the retire pass keeps a replaced key's set when its
    /// overlap ends, so the health checks can ask the exchange whether the
    /// key still works there (one KV version per replaced key).
    pub fn replaced_path(&self, tenant: TenantId, exchange: ExchangeId) -> String {
        format!(
            "{}/{tenant}/exchanges/{exchange}/replaced",
            self.settings.path_prefix
        )
    }

    /// Writes `set` as the newest version at `path` (check-and-set against
    /// the latest).
    ///
    /// # Errors
    /// Vault errors.
    pub async fn write_latest(&self, path: &str, set: &CredentialSet) -> Result<u64, BrokerError> {
        let cas = self.secrets.latest_version(path).await?.unwrap_or(0);
        Ok(self.secrets.write(path, set, cas).await?)
    }

    /// At the end of an overlap (the retire pass), before `version` of the
    /// credential at `path` is destroyed: keeps its set at
    /// [`Self::replaced_path`] for the health checks (when
    /// `watch_replaced_keys` is on).
    ///
    /// # Errors
    /// Vault errors; the caller retires the version anyway.
    pub(crate) async fn keep_replaced(
        &self,
        tenant: TenantId,
        exchange: ExchangeId,
        path: &str,
        version: u64,
    ) -> Result<(), BrokerError> {
        if !self.settings.watch_replaced_keys {
            return Ok(());
        }
        let set = self.secrets.read(path, version).await?;
        self.audit_before(crate::audit::AuditRecord::system(
            "retire",
            "KeepReplacedKey",
            tenant,
            exchange,
            vec![version],
        ))?;
        self.write_latest(&self.replaced_path(tenant, exchange), &set)
            .await?;
        Ok(())
    }

    /// Destroys the kept copies of `api_key` (deleted at the exchange by a
    /// rotation there), and the path when none is left.
    ///
    /// # Errors
    /// Vault errors.
    pub async fn forget_replaced(
        &self,
        tenant: TenantId,
        exchange: ExchangeId,
        api_key: &str,
    ) -> Result<(), BrokerError> {
        let path = self.replaced_path(tenant, exchange);
        let kept: Vec<u64> = self
            .secrets
            .versions(&path)
            .await?
            .into_iter()
            .filter(|v| !v.destroyed)
            .map(|v| v.version)
            .collect();
        let mut gone = Vec::new();
        for v in &kept {
            match self.secrets.read(&path, *v).await {
                Ok(set) if set.api_key == api_key => gone.push(*v),
                Ok(_) | Err(SecretStoreError::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if gone.is_empty() {
            return Ok(());
        }
        self.destroy_kept(tenant, exchange, &gone, kept.len(), "key-rotation")
            .await
    }

    /// Destroys the kept copies `gone` (of `kept` at the path: when that is
    /// all of them, the path goes too), on record as `actor`'s.
    async fn destroy_kept(
        &self,
        tenant: TenantId,
        exchange: ExchangeId,
        gone: &[u64],
        kept: usize,
        actor: &'static str,
    ) -> Result<(), BrokerError> {
        let path = self.replaced_path(tenant, exchange);
        let record = crate::audit::AuditRecord::system(
            actor,
            "DestroyReplacedKey",
            tenant,
            exchange,
            gone.to_vec(),
        );
        self.audit_before(record.clone())?;
        if gone.len() == kept {
            self.secrets.purge(&path).await?;
        } else {
            self.secrets.destroy_versions(&path, gone).await?;
        }
        self.audit_system(&record);
        Ok(())
    }

    /// The replaced keys kept since their overlap ended that the exchange
    /// still accepts, as reminders in words (one per key, naming its hint
    /// and the day its overlap ended, so the detail does not change from
    /// round to round). A kept key the exchange refuses (deleted there) has
    /// its copy destroyed, and the path is removed once none is left; one
    /// the exchange cannot be asked about now is asked again next time. A
    /// kept key that is served again (rotated back in as `record`'s current
    /// or previous version) is no longer a replaced key: its copy goes, as
    /// does a second copy of one key.
    async fn replaced_still_live(&self, record: &CredentialRecord, current: &str) -> Vec<String> {
        let (tenant, exchange) = (record.tenant, record.exchange);
        let path = self.replaced_path(tenant, exchange);
        let Ok(versions) = self.secrets.versions(&path).await else {
            return Vec::new();
        };
        let kept: Vec<_> = versions.iter().filter(|v| !v.destroyed).collect();
        if kept.is_empty() {
            return Vec::new();
        }
        let mut served = vec![current.to_owned()];
        if let Some(previous) = record.previous_version
            && let Ok(set) = self.secrets.read(&record.vault_path, previous).await
        {
            served.push(set.api_key.clone());
        }
        let mut live = Vec::new();
        let mut gone = Vec::new();
        let mut seen = std::collections::HashSet::new();
        // Newest first: a key kept twice keeps its latest copy.
        for v in kept.iter().rev() {
            let Ok(set) = self.secrets.read(&path, v.version).await else {
                continue;
            };
            if served.contains(&set.api_key) || !seen.insert(set.api_key.clone()) {
                gone.push(v.version);
                continue;
            }
            match self.validator.validate(tenant, exchange, &set).await {
                Ok(_) => live.push(format!(
                    "the replaced key {} still works at {exchange} after its overlap ended on {}: delete it at the exchange",
                    set.key_hint(),
                    v.created_at.date()
                )),
                Err(ValidationError::Unavailable { .. }) => {}
                Err(_) => gone.push(v.version),
            }
        }
        if !gone.is_empty() {
            match self
                .destroy_kept(tenant, exchange, &gone, kept.len(), "health-check")
                .await
            {
                Ok(()) => {
                    tracing::info!(%tenant, %exchange, versions = ?gone, "the exchange no longer accepts the replaced key, or it is served again: its copy is destroyed");
                }
                Err(e) => {
                    tracing::warn!(%tenant, %exchange, "could not destroy the copy of a replaced key: {e}");
                }
            }
        }
        live
    }

    /// The one health-check path (the background job and
    /// ValidateCredentials): validates the current set against the
    /// exchange and records what it found. A refusal marks the credential
    /// invalid (expired when the exchange reports it expired) with an
    /// INVALIDATED event; drift (a lost permission or IP allow-list, an
    /// expiry within the warning window, a key older than the rotation
    /// policy) is recorded in the health detail;
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
            by: ctx.changed_by(),
            notice: None,
        };
        let mut replaced_live = 0;
        let mut past_policy = false;
        let (mut update, finding, notify) =
            match self.validator.validate(tenant, exchange, &set).await {
                Ok(permissions) => {
                    let expired = permissions.expires_at.is_some_and(|t| t <= now);
                    let mut drifted = drift(
                        record.permissions.as_ref(),
                        &permissions,
                        now,
                        self.settings.expiry_warning,
                    );
                    if let Some(reminder) = self.past_rotation_policy(&record, now).await {
                        past_policy = true;
                        drifted.push(reminder);
                    }
                    let live = self.replaced_still_live(&record, &set.api_key).await;
                    replaced_live = live.len();
                    drifted.extend(live);
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
            update.notice = Some(Notice::new(
                &finding,
                &update,
                record.current_version,
                replaced_live > 0,
            ));
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
            replaced_live,
            past_policy,
        })
    }
}
