//! The credential health-check job: every active credential is re-validated
//! against its exchange once per interval (6 h by default, jittered), through
//! the same path as ValidateCredentials (`Broker::check`).
//!
//! - **One replica at a time**: the job holds a PostgreSQL lease
//!   (`job_leases`), renewed while it works; when its holder dies the lease
//!   expires and another replica takes over.
//! - **Never twice in one round**: a round checks the credentials not
//!   checked in the last half interval, least recently checked first, and
//!   each check stamps `health_checked_at`; a replica that takes over
//!   mid-round continues with the rest.
//! - **Bounded**: at most `concurrency` checks in flight, and a per-exchange
//!   budget of the job's own (below the exchange's), so checks never starve
//!   a tenant's store or rotate and never get the broker's address banned.
//! - An exchange outage changes nothing but the health detail.

use std::{
    collections::{HashMap, HashSet},
    num::NonZeroU32,
    sync::Arc,
    time::Duration,
};

use std::borrow::Cow;

use futures::StreamExt as _;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::audit::AuditRecord;

use crate::rotation::mint::KeyRotator;

use crate::broker::Broker;

use crate::broker::context::RequestContext;

use crate::broker::error::BrokerError;

use crate::broker::ports::FleetStore;

use crate::broker::types::{ExchangeId, TenantId};

use crate::telemetry::metrics::{Metrics, ResultLabel};

/// The lease's name in `job_leases`.
const LEASE: &str = "credential-health-checks";
/// Credentials fetched per page of a round.
const PAGE: u32 = 200;

/// When rounds run.
#[derive(Clone, Copy, Debug)]
pub enum Schedule {
    /// Only when a test calls [`HealthChecks::round`].
    Manual,
    /// Every `interval`, plus up to `jitter_percent` of it.
    Every {
        /// The check interval.
        interval: Duration,
        /// Jitter, in percent of the interval.
        jitter_percent: u8,
    },
}

/// The job's settings.
#[derive(Clone, Copy, Debug)]
pub struct CheckSettings {
    /// A credential is re-checked once per interval.
    pub interval: Duration,
    /// Checks in flight at most.
    pub concurrency: usize,
    /// Checks per minute per exchange at most.
    pub requests_per_minute: u32,
    /// The lease's length.
    pub lease: Duration,
}

impl Schedule {
    /// From `[checks]`: `Manual` when the job is disabled.
    pub fn from_config(c: &ChecksConfig) -> Self {
        if c.enabled {
            Schedule::Every {
                interval: Duration::from_secs(c.interval_secs),
                jitter_percent: c.jitter_percent,
            }
        } else {
            Schedule::Manual
        }
    }
}

impl CheckSettings {
    /// From `[checks]`.
    pub fn from_config(c: &ChecksConfig) -> Self {
        Self {
            interval: Duration::from_secs(c.interval_secs),
            concurrency: c.concurrency,
            requests_per_minute: c.requests_per_minute,
            lease: Duration::from_secs(c.lease_secs),
        }
    }
}

/// What one round did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoundReport {
    /// False when another replica holds the lease (nothing was checked).
    pub held_lease: bool,
    /// Checks made, by finding (`healthy`, `refused`, `expired`, `drift`,
    /// `unreachable`, `error`).
    pub checked: Vec<(String, &'static str)>,
}

impl RoundReport {
    /// How many checks found `finding`.
    pub fn count(&self, finding: &str) -> usize {
        self.checked.iter().filter(|(_, f)| *f == finding).count()
    }
}

/// The job. Cheap to share.
pub struct HealthChecks {
    broker: Arc<Broker>,
    fleet: Arc<dyn FleetStore>,
    metrics: Metrics,
    settings: CheckSettings,
    holder: uuid::Uuid,
    budgets: HashMap<ExchangeId, DefaultDirectRateLimiter>,
    /// Rotations at the exchange: a key found expired or about to expire is
    /// replaced by a minted one when its tenant stored a management key.
    keys: std::sync::OnceLock<Arc<KeyRotator>>,
}

impl HealthChecks {
    /// Lets a check that finds a key expired or expiring start a rotation
    /// at the exchange (where a management key is stored).
    pub fn rotate_expiring_with(&self, keys: Arc<KeyRotator>) {
        let _ = self.keys.set(keys);
    }

    /// After a check: when the key expired, expires within the warning
    /// window or is older than the rotation policy (`max_key_age_days`),
    /// and a management key is stored, a minted rotation replaces it (one
    /// at a time: an unfinished rotation, or no management key, is a quiet
    /// no). Other drift (a lost permission or IP allow-list) is not
    /// rotated away: the minted key would copy it.
    async fn rotate_if_expiring(&self, out: &crate::broker::CheckOutcome) {
        let Some(keys) = self.keys.get() else {
            return;
        };
        let now = self.broker.clock().now();
        let expiring = matches!(out.finding, crate::broker::Finding::Expired)
            || out
                .record
                .permissions
                .as_ref()
                .and_then(|p| p.expires_at)
                .is_some_and(|t| t - now <= self.broker.expiry_warning());
        if !expiring && !out.past_policy {
            return;
        }
        let why = if expiring {
            "the key is expiring"
        } else {
            "the key is older than the rotation policy"
        };
        let (tenant, exchange) = (out.record.tenant, out.record.exchange);
        let overlap = u32::try_from(self.broker.default_overlap().whole_seconds()).unwrap_or(3600);
        match keys.start(tenant, exchange, overlap).await {
            Ok(r) => {
                tracing::info!(%tenant, %exchange, step = r.step.as_str(), "{why}: a rotation at the exchange started")
            }
            Err(BrokerError::FailedPrecondition(_)) => {}
            Err(e) => {
                tracing::warn!(%tenant, %exchange, "{why} and a rotation at the exchange could not start: {e}")
            }
        }
    }
    /// The job for this replica.
    pub fn new(
        broker: Arc<Broker>,
        fleet: Arc<dyn FleetStore>,
        metrics: Metrics,
        settings: CheckSettings,
    ) -> Arc<Self> {
        let per_minute = NonZeroU32::new(settings.requests_per_minute).unwrap_or(NonZeroU32::MIN);
        let budgets = ExchangeId::ALL
            .into_iter()
            .map(|e| (e, RateLimiter::direct(Quota::per_minute(per_minute))))
            .collect();
        Arc::new(Self {
            broker,
            fleet,
            metrics,
            settings,
            holder: uuid::Uuid::new_v4(),
            budgets,
            keys: std::sync::OnceLock::new(),
        })
    }

    fn lease_ttl(&self) -> time::Duration {
        time::Duration::try_from(self.settings.lease).unwrap_or(time::Duration::minutes(1))
    }

    async fn take_lease(&self) -> Result<bool, BrokerError> {
        Ok(self
            .fleet
            .take_lease(
                LEASE,
                self.holder,
                time::OffsetDateTime::now_utc(),
                self.lease_ttl(),
            )
            .await?)
    }

    /// One round: takes the lease (or returns at once if another replica
    /// holds it) and checks every credential that is due.
    ///
    /// # Errors
    /// When PostgreSQL cannot be read; checks already made are kept.
    pub async fn round(&self) -> Result<RoundReport, BrokerError> {
        let out = self.round_inner().await;
        let result = match &out {
            Ok(r) if r.held_lease => "done",
            Ok(_) => "not_leader",
            Err(_) => "error",
        };
        let f = self.metrics.families();
        f.health_check_rounds
            .get_or_create(&ResultLabel { result })
            .inc();
        if result == "done" {
            f.health_check_last_round
                .set(time::OffsetDateTime::now_utc().unix_timestamp_nanos() as f64 / 1e9);
        }
        out
    }

    async fn round_inner(&self) -> Result<RoundReport, BrokerError> {
        let mut report = RoundReport::default();
        if !self.take_lease().await? {
            return Ok(report);
        }
        report.held_lease = true;
        let half = time::Duration::try_from(self.settings.interval / 2)
            .unwrap_or(time::Duration::hours(3));
        let since = self.broker.clock().now() - half;
        let ctx = RequestContext::system("health-check");
        let mut renewed = tokio::time::Instant::now();
        // Checks that could not run leave their rows due; they are not
        // tried again this round (each page asks for that many more rows).
        let mut failed: HashSet<(TenantId, ExchangeId)> = HashSet::new();
        loop {
            let limit = PAGE.saturating_add(u32::try_from(failed.len()).unwrap_or(u32::MAX));
            let due: Vec<_> = self
                .fleet
                .due_for_check(since, limit)
                .await?
                .into_iter()
                .filter(|k| !failed.contains(k))
                .collect();
            if due.is_empty() {
                break;
            }
            let mut results = futures::stream::iter(due)
                .map(|(tenant, exchange)| {
                    let ctx = &ctx;
                    async move {
                        if let Some(budget) = self.budgets.get(&exchange) {
                            budget.until_ready().await;
                        }
                        // On record before the check can change a status.
                        if let Err(e) = self.broker.audit_before(AuditRecord::system(
                            "health-check",
                            "HealthCheck",
                            tenant,
                            exchange,
                            vec![],
                        )) {
                            tracing::warn!(%tenant, %exchange, "health check skipped: {e}");
                            return ((tenant, exchange), "error");
                        }
                        let (finding, versions) = match self.broker.check(ctx, tenant, exchange).await {
                            Ok(out) => {
                                if out.finding.is_failure() {
                                    self.metrics.health_check_failed(tenant, exchange);
                                }
                                if out.past_policy {
                                    self.metrics.key_past_policy(exchange);
                                }
                                if out.replaced_live > 0 {
                                    self.metrics.replaced_keys_live(exchange, out.replaced_live);
                                }
                                self.rotate_if_expiring(&out).await;
                                (out.finding.as_str(), vec![out.record.current_version])
                            }
                            Err(BrokerError::NotFound { .. }) => ("gone", vec![]),
                            Err(e) => {
                                tracing::warn!(%tenant, %exchange, "health check could not run: {e}");
                                ("error", vec![])
                            }
                        };
                        // Every check is an access to the secret, by the
                        // system actor.
                        let mut record = AuditRecord::system(
                            "health-check",
                            "HealthCheck",
                            tenant,
                            exchange,
                            versions,
                        );
                        record.event_type = Cow::Borrowed("secret_access");
                        if finding != "healthy" {
                            record.result = Cow::Borrowed("failure");
                        }
                        self.broker.audit_system(&record);
                        self.metrics
                            .families()
                            .health_checks
                            .get_or_create(&ResultLabel { result: finding })
                            .inc();
                        ((tenant, exchange), finding)
                    }
                })
                .buffer_unordered(self.settings.concurrency.max(1));
            while let Some((key, finding)) = results.next().await {
                if finding == "error" {
                    failed.insert(key);
                }
                report
                    .checked
                    .push((format!("{}/{}", key.0, key.1), finding));
                if renewed.elapsed() > self.settings.lease / 3 {
                    renewed = tokio::time::Instant::now();
                    if !self.take_lease().await? {
                        tracing::warn!("health checks: lost the lease mid-round; stopping");
                        return Ok(report);
                    }
                }
            }
        }
        Ok(report)
    }

    /// Runs rounds on `schedule` until `cancel` fires.
    pub async fn task_main(self: Arc<Self>, schedule: Schedule, cancel: CancellationToken) {
        let Schedule::Every {
            interval,
            jitter_percent,
        } = schedule
        else {
            cancel.cancelled().await;
            return;
        };
        // Rounds start often enough that no credential waits much past its
        // interval (a round only checks what is due), with jitter so
        // replicas and restarts do not line up.
        let period = (interval / 12).max(Duration::from_secs(30));
        loop {
            let jitter = period.mul_f64(f64::from(jitter_percent) / 100.0 * rand::random::<f64>());
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(period + jitter) => {}
            }
            let span = tracing::info_span!("health_check_round");
            match self.round().instrument(span).await {
                Ok(r) if !r.checked.is_empty() => tracing::info!(
                    checked = r.checked.len(),
                    refused = r.count("refused"),
                    expired = r.count("expired"),
                    drift = r.count("drift"),
                    unreachable = r.count("unreachable"),
                    "health-check round done"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!("health-check round failed: {e}"),
            }
        }
    }
}

// ---- configuration: the [checks] section, owned here (`config` re-exports it).

/// The background job that re-validates every active credential.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChecksConfig {
    /// Run the job (one replica at a time holds its lease).
    pub enabled: bool,
    /// A credential is re-checked once per interval (6 h, the seed's).
    pub interval_secs: u64,
    /// Each round starts after the interval's share plus up to this many
    /// percent of jitter, so replicas and restarts do not line up.
    pub jitter_percent: u8,
    /// Checks in flight at most.
    pub concurrency: usize,
    /// Checks per minute per exchange at most: the job's own budget, below
    /// the exchange's, so checks never starve a tenant's store or rotate.
    pub requests_per_minute: u32,
    /// An expiry the exchange reports closer than this is reported.
    pub expiry_warning_days: u32,
    /// A key whose current version is older than this many days is
    /// reported (drift: the tenant's webhook hears it once), as AWS flags
    /// access keys older than 90 days; 0: never.
    pub max_key_age_days: u32,
    /// When an overlap ends, keep the replaced key's set (in Vault, at
    /// `…/replaced`) and ask its exchange at each check whether the key
    /// still works there: a replaced key left live is reported (drift, the
    /// tenant's webhook `credential.old_key_live` once,
    /// `credbroker_replaced_keys_live_total`) until it is deleted at the
    /// exchange, and then its copy is destroyed.
    pub watch_replaced_keys: bool,
    /// The lease's length; the holder renews it at a third of that.
    pub lease_secs: u64,
}

impl Default for ChecksConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_secs: 6 * 3600,
            jitter_percent: 10,
            concurrency: 4,
            requests_per_minute: 20,
            expiry_warning_days: 7,
            max_key_age_days: 90,
            watch_replaced_keys: true,
            lease_secs: 60,
        }
    }
}
