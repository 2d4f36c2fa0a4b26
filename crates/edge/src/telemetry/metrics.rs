//! The broker's Prometheus metrics: the seed's four series under their exact
//! names and labels, plus the broker's own (`credbroker_*`).
//!
//! Label values are never secrets and never unbounded, except the seed's
//! `tenant_id` (one value per tenant). Counters on the hot path are resolved
//! once per (method, code) and then bumped without a lock; values that
//! already exist elsewhere (cache counters, open streams, the audit spool)
//! are read at scrape time by [`Sources`], so they cost the call path
//! nothing.

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tonic::Code;

use crate::audit::spool::Spool;

use crate::auth::model::Action;

use crate::broker::types::{CredentialStatus, ExchangeId, TenantId};

use crate::cache::CacheStats;

/// `tenant_id`, `exchange`, `status`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CredentialLabels {
    /// Tenant UUID.
    pub tenant_id: String,
    /// Exchange name.
    pub exchange: &'static str,
    /// Lifecycle status.
    pub status: &'static str,
}

/// `tenant_id`, `exchange`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantExchange {
    /// Tenant UUID.
    pub tenant_id: String,
    /// Exchange name.
    pub exchange: &'static str,
}

/// `tenant_id`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabel {
    /// Tenant UUID.
    pub tenant_id: String,
}

/// `exchange`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExchangeLabel {
    /// Exchange name.
    pub exchange: &'static str,
}

/// `exchange`, `result`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExchangeResult {
    /// Exchange name.
    pub exchange: &'static str,
    /// accepted, rejected, unavailable, invalid_argument.
    pub result: &'static str,
}

/// `exchange`, `step`, `result`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyRotationStep {
    /// Exchange name.
    pub exchange: &'static str,
    /// minting, rotating, waiting, deleting.
    pub step: &'static str,
    /// ok, failed.
    pub result: &'static str,
}

/// `step`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabel {
    /// minting, rotating, waiting, deleting.
    pub step: &'static str,
}

/// `operation`, `status`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VaultOp {
    /// read, write, destroy, purge, list, versions, latest_version, ping.
    pub operation: &'static str,
    /// success, not_found, conflict, denied, unavailable, error.
    pub status: &'static str,
}

/// `operation`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabel {
    /// The operation.
    pub operation: &'static str,
}

/// `method`, `code`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrpcLabels {
    /// RPC name (`GetCredentials`), or `other` for health and reflection.
    pub method: &'static str,
    /// gRPC code name (`OK`, `NOT_FOUND`...).
    pub code: &'static str,
}

/// `result`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// The outcome.
    pub result: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Latency buckets from 100 µs to about 26 s.
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 19))
}

/// Buckets for slower work (exchange round trips, event lag): 1 ms … 65 s.
fn slow() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// Methods the gRPC table knows, plus one slot for everything else.
const METHODS: usize = Action::ALL.len() + 1;
/// gRPC codes 0..=16.
const CODES: usize = 17;

/// Every metric the broker updates as it works. Cheap to clone (handles
/// share their values).
#[derive(Clone, Debug)]
pub struct Metrics(Arc<Families>);

/// The metric handles.
#[derive(Debug)]
pub struct Families {
    /// `alphapulse_credentials_total{tenant_id,exchange,status}` (gauge:
    /// credentials by status, refreshed from PostgreSQL).
    pub credentials: Family<CredentialLabels, Gauge>,
    /// `alphapulse_credentials_validation_duration_seconds{exchange}`.
    pub validation_duration: HistogramFamily<ExchangeLabel>,
    /// `credbroker_validations_total{exchange,result}`.
    pub validations: Family<ExchangeResult, Counter>,
    /// `alphapulse_credentials_health_check_failures_total{tenant_id,exchange}`.
    pub health_check_failures: Family<TenantExchange, Counter>,
    /// `credbroker_health_checks_total{result}`: every check the job made.
    pub health_checks: Family<ResultLabel, Counter>,
    /// `credbroker_health_check_rounds_total{result}`.
    pub health_check_rounds: Family<ResultLabel, Counter>,
    /// `credbroker_health_check_last_round_timestamp_seconds`.
    pub health_check_last_round: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// `alphapulse_vault_operations_total{operation,status}`.
    pub vault_ops: Family<VaultOp, Counter>,
    /// `credbroker_vault_operation_duration_seconds{operation}`.
    pub vault_duration: HistogramFamily<OperationLabel>,
    /// `credbroker_vault_up` (1: the last probe got an answer).
    pub vault_up: Gauge,
    /// `credbroker_vault_sealed` (1: the last probe found it sealed).
    pub vault_sealed: Gauge,
    /// `credbroker_postgres_up`.
    pub postgres_up: Gauge,
    /// `credbroker_grpc_server_handled_total{method,code}`.
    pub grpc_handled: Family<GrpcLabels, Counter>,
    /// `credbroker_grpc_server_handling_seconds{method,code}`.
    pub grpc_duration: HistogramFamily<GrpcLabels>,
    grpc_table: Vec<OnceLock<(Counter, Histogram)>>,
    /// `credbroker_event_lag_seconds`: commit to delivery on this replica.
    pub event_lag: Histogram,
    /// `credbroker_webhook_deliveries_total{result}`.
    pub webhook_deliveries: Family<ResultLabel, Counter>,
    /// `credbroker_webhook_outbox_depth`: deliveries not yet done.
    pub webhook_outbox: Gauge,
    /// `credbroker_webhook_backlog{tenant_id}`: the same, per tenant (a
    /// receiver that is down shows as its own tenant's backlog).
    pub webhook_backlog: Family<TenantLabel, Gauge>,
    /// `credbroker_key_rotation_steps_total{exchange,step,result}`: steps
    /// of rotations at the exchange attempted by this replica.
    pub key_rotation_steps: Family<KeyRotationStep, Counter>,
    /// `credbroker_key_rotations{step}`: unfinished rotations at the
    /// exchange, by step.
    pub key_rotations: Family<StepLabel, Gauge>,
    /// `credbroker_key_rotations_overdue`: rotations whose old key is still
    /// live at the exchange more than five minutes after its overlap ended
    /// (two live keys: alert on > 0).
    pub key_rotations_overdue: Gauge,
    /// `credbroker_replaced_keys_live_total{exchange}`: replaced keys a
    /// health check found still accepted by their exchange after their
    /// overlap (one per key per check: alert on any increase).
    pub replaced_keys_live: Family<ExchangeLabel, Counter>,
    /// `credbroker_keys_past_rotation_policy_total{exchange}`: checks that
    /// found the current key older than the rotation policy
    /// (`max_key_age_days`).
    pub keys_past_policy: Family<ExchangeLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Fresh metrics, all zero.
    pub fn new() -> Self {
        let m = Self::empty();
        // The counters the chart's alerts read start at 0 for every exchange
        // (and finding): Prometheus' `increase()` cannot see a series' first
        // sample, so a counter that appeared at 1 would hide that event.
        for exchange in ExchangeId::ALL {
            let label = ExchangeLabel {
                exchange: exchange.as_str(),
            };
            m.0.replaced_keys_live.get_or_create_owned(&label);
            m.0.keys_past_policy.get_or_create_owned(&label);
            for result in ["accepted", "rejected", "unavailable", "invalid_argument"] {
                m.0.validations.get_or_create_owned(&ExchangeResult {
                    exchange: exchange.as_str(),
                    result,
                });
            }
        }
        for result in [
            "healthy",
            "refused",
            "expired",
            "drift",
            "unreachable",
            "error",
        ] {
            m.0.health_checks
                .get_or_create_owned(&ResultLabel { result });
        }
        m
    }

    fn empty() -> Self {
        Self(Arc::new(Families {
            credentials: Family::default(),
            validation_duration: Family::new_with_constructor(slow),
            validations: Family::default(),
            health_check_failures: Family::default(),
            health_checks: Family::default(),
            health_check_rounds: Family::default(),
            health_check_last_round: Gauge::default(),
            vault_ops: Family::default(),
            vault_duration: Family::new_with_constructor(latency),
            vault_up: Gauge::default(),
            vault_sealed: Gauge::default(),
            postgres_up: Gauge::default(),
            grpc_handled: Family::default(),
            grpc_duration: Family::new_with_constructor(latency),
            grpc_table: (0..METHODS * CODES).map(|_| OnceLock::new()).collect(),
            event_lag: slow(),
            webhook_deliveries: Family::default(),
            webhook_outbox: Gauge::default(),
            webhook_backlog: Family::default(),
            key_rotation_steps: Family::default(),
            key_rotations: Family::default(),
            key_rotations_overdue: Gauge::default(),
            replaced_keys_live: Family::default(),
            keys_past_policy: Family::default(),
        }))
    }

    /// The handles.
    pub fn families(&self) -> &Families {
        &self.0
    }

    /// The method slot of a request path (`/credbroker.v1.CredentialBroker/Rotate`),
    /// for [`Self::grpc_call`]; health and reflection share one slot.
    pub fn grpc_method(path: &str) -> usize {
        Action::from_path(path)
            .and_then(|a| Action::ALL.iter().position(|x| *x == a))
            .unwrap_or(Action::ALL.len())
    }

    /// Records one finished gRPC call. After the first call of a (method,
    /// code) pair this takes no lock but the histogram's own.
    pub fn grpc_call(&self, method: usize, code: Code, elapsed: Duration) {
        let idx = method.min(METHODS - 1);
        let code_idx = usize::try_from(code as i32).unwrap_or(2).min(CODES - 1);
        let f = &self.0;
        let (calls, hist) = f.grpc_table[idx * CODES + code_idx].get_or_init(|| {
            let labels = GrpcLabels {
                method: Action::ALL.get(idx).map_or("other", |a| a.name()),
                code: crate::api::status::code_name(code),
            };
            (
                f.grpc_handled.get_or_create_owned(&labels),
                f.grpc_duration.get_or_create_owned(&labels),
            )
        });
        calls.inc();
        hist.observe(elapsed.as_secs_f64());
    }

    /// Replaces the credential gauge with `counts`. Every credential counted
    /// also gets its health-check failure counter, at 0 until a check
    /// fails: the failure-rate alert's `increase()` cannot see a series'
    /// first sample, so a counter born at 1 would hide the failure.
    pub fn set_credentials(&self, counts: &[(TenantId, ExchangeId, CredentialStatus, u64)]) {
        let f = &self.0.credentials;
        f.clear();
        for (tenant, exchange, status, n) in counts {
            self.0
                .health_check_failures
                .get_or_create_owned(&TenantExchange {
                    tenant_id: tenant.to_string(),
                    exchange: exchange.as_str(),
                });
            f.get_or_create(&CredentialLabels {
                tenant_id: tenant.to_string(),
                exchange: exchange.as_str(),
                status: status.as_str(),
            })
            .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
    }

    /// A health check failed for this credential.
    pub fn health_check_failed(&self, tenant: TenantId, exchange: ExchangeId) {
        self.0
            .health_check_failures
            .get_or_create(&TenantExchange {
                tenant_id: tenant.to_string(),
                exchange: exchange.as_str(),
            })
            .inc();
    }

    /// A health check found `n` replaced keys of a credential on `exchange`
    /// still accepted there after their overlap.
    pub fn replaced_keys_live(&self, exchange: ExchangeId, n: usize) {
        self.0
            .replaced_keys_live
            .get_or_create(&ExchangeLabel {
                exchange: exchange.as_str(),
            })
            .inc_by(u64::try_from(n).unwrap_or(u64::MAX));
    }

    /// A health check found the current key on `exchange` older than the
    /// rotation policy.
    pub fn key_past_policy(&self, exchange: ExchangeId) {
        self.0
            .keys_past_policy
            .get_or_create(&ExchangeLabel {
                exchange: exchange.as_str(),
            })
            .inc();
    }

    /// Every metric, plus what `sources` knows at scrape time.
    pub fn registry(&self, sources: Sources) -> Registry {
        let f = &self.0;
        let mut r = Registry::default();
        r.register(
            "alphapulse_credentials_total",
            "Credentials by tenant, exchange and status",
            f.credentials.clone(),
        );
        r.register(
            "alphapulse_credentials_validation_duration_seconds",
            "Time to validate a key against its exchange (format check, signed requests, policy)",
            f.validation_duration.clone(),
        );
        r.register(
            "credbroker_validations",
            "Validations by exchange and result (accepted, rejected, unavailable, invalid_argument)",
            f.validations.clone(),
        );
        r.register(
            "alphapulse_credentials_health_check_failures",
            "Health checks that found a credential refused, expired or drifted",
            f.health_check_failures.clone(),
        );
        r.register(
            "credbroker_health_checks",
            "Credential health checks made by the background job, by result",
            f.health_checks.clone(),
        );
        r.register(
            "credbroker_health_check_rounds",
            "Health-check rounds run by this replica, by result",
            f.health_check_rounds.clone(),
        );
        r.register(
            "credbroker_health_check_last_round_timestamp_seconds",
            "When this replica last finished a health-check round (Unix time)",
            f.health_check_last_round.clone(),
        );
        r.register(
            "alphapulse_vault_operations",
            "Vault operations by operation and outcome",
            f.vault_ops.clone(),
        );
        r.register(
            "credbroker_vault_operation_duration_seconds",
            "Vault operation latency",
            f.vault_duration.clone(),
        );
        r.register(
            "credbroker_key_rotation_steps",
            "Steps of rotations at the exchange attempted by this replica, by exchange, step and result",
            f.key_rotation_steps.clone(),
        );
        r.register(
            "credbroker_key_rotations",
            "Unfinished rotations at the exchange, by step",
            f.key_rotations.clone(),
        );
        r.register(
            "credbroker_key_rotations_overdue",
            "Rotations whose old key is still live at the exchange more than 5 minutes after the overlap ended",
            f.key_rotations_overdue.clone(),
        );
        r.register(
            "credbroker_replaced_keys_live",
            "Replaced keys a health check found still accepted by their exchange after the overlap ended (delete them at the exchange)",
            f.replaced_keys_live.clone(),
        );
        r.register(
            "credbroker_keys_past_rotation_policy",
            "Health checks that found the current key older than the rotation policy (max_key_age_days): rotate it",
            f.keys_past_policy.clone(),
        );
        r.register(
            "credbroker_vault_up",
            "1 when the last probe reached Vault and it answered",
            f.vault_up.clone(),
        );
        r.register(
            "credbroker_vault_sealed",
            "1 when the last probe found Vault sealed",
            f.vault_sealed.clone(),
        );
        r.register(
            "credbroker_postgres_up",
            "1 when the last probe reached PostgreSQL",
            f.postgres_up.clone(),
        );
        r.register(
            "credbroker_grpc_server_handled",
            "gRPC calls finished, by method and code",
            f.grpc_handled.clone(),
        );
        r.register(
            "credbroker_grpc_server_handling_seconds",
            "gRPC call latency to the response headers, by method and code",
            f.grpc_duration.clone(),
        );
        r.register(
            "credbroker_event_lag_seconds",
            "Time from an event's commit to its delivery on this replica",
            f.event_lag.clone(),
        );
        r.register(
            "credbroker_webhook_deliveries",
            "Webhook delivery attempts by result",
            f.webhook_deliveries.clone(),
        );
        r.register(
            "credbroker_webhook_outbox_depth",
            "Webhook deliveries waiting in the outbox",
            f.webhook_outbox.clone(),
        );
        r.register(
            "credbroker_webhook_backlog",
            "Webhook deliveries waiting in the outbox, per tenant",
            f.webhook_backlog.clone(),
        );
        r.register_collector(Box::new(sources));
        r
    }
}

/// Values read when scraped.
#[derive(Clone)]
pub struct Sources {
    /// The read path's counters.
    pub cache: Arc<dyn Fn() -> CacheStats + Send + Sync>,
    /// Open WatchRotations streams.
    pub streams: Arc<dyn Fn() -> usize + Send + Sync>,
    /// The audit spool, when auditing is on.
    pub spool: Option<Arc<Spool>>,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sources")
    }
}

fn counter(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    v: i64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for Sources {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let c = (self.cache)();
        counter(
            &mut enc,
            "credbroker_cache_hits",
            "GetCredentials answered from a fresh cache entry",
            c.hits,
        )?;
        counter(
            &mut enc,
            "credbroker_cache_misses",
            "Cache misses that started a load (PostgreSQL, then Vault)",
            c.loads,
        )?;
        counter(
            &mut enc,
            "credbroker_cache_singleflight_waits",
            "Cache misses that waited for a load already in flight",
            c.coalesced,
        )?;
        counter(
            &mut enc,
            "credbroker_cache_stale_serves",
            "Answers served stale from the cache while a backend was down",
            c.stale,
        )?;
        counter(
            &mut enc,
            "credbroker_cache_discarded_loads",
            "Loads not cached because an event overtook them",
            c.discarded,
        )?;
        gauge(
            &mut enc,
            "credbroker_watch_streams_active",
            "Open WatchRotations streams on this replica",
            i64::try_from((self.streams)()).unwrap_or(i64::MAX),
        )?;
        if let Some(s) = &self.spool {
            gauge(
                &mut enc,
                "credbroker_audit_spool_unshipped_bytes",
                "Audit spool bytes not yet shipped to PostgreSQL",
                i64::try_from(s.unshipped()).unwrap_or(i64::MAX),
            )?;
            gauge(
                &mut enc,
                "credbroker_audit_spool_max_bytes",
                "The audit spool's bound; calls are refused when it is reached",
                i64::try_from(s.max_bytes()).unwrap_or(i64::MAX),
            )?;
            // Why calls are refused, if they are: 1 while it holds.
            gauge(
                &mut enc,
                "credbroker_audit_spool_write_failing",
                "1 while the audit spool cannot be written (calls refused until a probe write succeeds)",
                i64::from(s.is_broken()),
            )?;
            gauge(
                &mut enc,
                "credbroker_audit_spool_full",
                "1 while the audit spool is full (calls refused until the shipper drains it)",
                i64::from(s.unshipped() >= s.max_bytes()),
            )?;
            counter(
                &mut enc,
                "credbroker_audit_records",
                "Audit records appended to this replica's spool since start",
                s.appended(),
            )?;
        }
        Ok(())
    }
}

/// The scrape in the OpenMetrics text format (which Prometheus reads).
///
/// # Errors
/// Only if encoding fails (never for these metric types).
pub fn encode(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::with_capacity(16 * 1024);
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}

/// The vault operation outcome label of an answer.
pub fn vault_status<T>(r: &Result<T, crate::broker::error::SecretStoreError>) -> &'static str {
    use crate::broker::error::SecretStoreError as E;
    match r {
        Ok(_) => "success",
        Err(E::NotFound { .. }) => "not_found",
        Err(E::CasConflict { .. }) => "conflict",
        Err(E::Denied(_)) => "denied",
        Err(E::Unavailable(_)) => "unavailable",
        Err(E::Other(_)) => "error",
    }
}
