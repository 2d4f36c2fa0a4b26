//! Wiring: builds the stores, the broker and the service from configuration,
//! and owns every spawned task (health probe, retire job, Vault login).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::api::{BrokerService, Gate};

use crate::audit::spool::Spool;

use crate::auth::{AuthLayer, AuthSettings};

use crate::auth::token::{TokenSettings, TokenVerifier};

use crate::broker::types::TenantId;

use crate::broker::{Broker, BrokerSettings};

use crate::broker::ports::{
    AuditLog, CredentialValidator, FleetStore, MetadataStore, SecretStore, WebhookStore,
};

use crate::broker::validate::FormatCheckValidator;

use crate::cache::CredentialCache;

use crate::checks::{CheckSettings, HealthChecks};

use crate::clock::{Clock, SystemClock};

use crate::config::{CacheConfig, Config, RotationConfig, ValidationConfig, ValidationMode};

use crate::exchange::{ExchangeValidator, WithdrawPolicy};

use crate::limits::Limits;

use crate::rotation::retire;

use crate::rotation::mint::{
    KeyManager, KeyRotation, KeyRotationObserver, KeyRotationStore, KeyRotator, MintSettings, Step,
};

use crate::rotation::hub::Hub;

use crate::rotation::listener::EventListener;

use crate::rotation::watch::StreamTiming;

use crate::server::{self, ServeParams};

use crate::store::{self, PgMetadataStore};

use crate::telemetry::instrument::{MeteredSecretStore, MeteredValidator};

use crate::telemetry::metrics::{Metrics, Sources};

use crate::vault::VaultSecretStore;

/// The storage and validation ports a broker runs on.
pub struct Backends {
    /// Secret store.
    pub secrets: Arc<dyn SecretStore>,
    /// Metadata store.
    pub meta: Arc<dyn MetadataStore>,
    /// Validator.
    pub validator: Arc<dyn CredentialValidator>,
    /// Cross-tenant queries of the background jobs.
    pub fleet: Arc<dyn FleetStore>,
    /// Webhook endpoints and the outbox.
    pub webhooks: Arc<dyn WebhookStore>,
    /// Set when secrets live in Vault with AppRole: its login loop.
    pub vault: Option<Arc<VaultSecretStore>>,
    /// Where committed events come from.
    pub events: EventSource,
    /// How webhooks resolve names and dial (tests record instead).
    pub webhook_net: crate::webhook::WebhookNet,
    /// Where the audit trail is shipped and read.
    pub audit_log: Arc<dyn AuditLog>,
    /// The audit log's day partitions, retention and lost-outcome
    /// reconciliation, when it lives in PostgreSQL.
    pub audit_days: Option<Arc<PgMetadataStore>>,
    /// Key management at the exchange (zero-touch rotation), when keys are
    /// validated against the exchanges.
    pub keys: Option<KeyBackends>,
}

/// How often each replica looks for rotations at the exchange that are due
/// (a retry, an overlap that ended).
const KEY_ROTATION_ROUND: std::time::Duration = std::time::Duration::from_secs(2);

/// Rotations at the exchange, as metrics.
struct KeyRotationMetrics(Metrics);

impl KeyRotationObserver for KeyRotationMetrics {
    fn step(&self, r: &KeyRotation, step: Step, ok: bool) {
        self.0
            .families()
            .key_rotation_steps
            .get_or_create(&crate::telemetry::metrics::KeyRotationStep {
                exchange: r.exchange.as_str(),
                step: step.as_str(),
                result: if ok { "ok" } else { "failed" },
            })
            .inc();
    }

    fn round(&self, unfinished: &[KeyRotation], now: time::OffsetDateTime) {
        let f = self.0.families();
        for step in [Step::Minting, Step::Rotating, Step::Waiting, Step::Deleting] {
            let n = unfinished.iter().filter(|r| r.step == step).count();
            f.key_rotations
                .get_or_create(&crate::telemetry::metrics::StepLabel {
                    step: step.as_str(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        let overdue = unfinished.iter().filter(|r| r.overdue(now)).count();
        f.key_rotations_overdue
            .set(i64::try_from(overdue).unwrap_or(i64::MAX));
    }
}

/// What rotations at the exchange need.
pub struct KeyBackends {
    /// The exchanges' key-management APIs.
    pub manager: Arc<dyn KeyManager>,
    /// Where the rotations' state is kept.
    pub store: Arc<dyn KeyRotationStore>,
}

/// How a replica learns of committed events.
pub enum EventSource {
    /// Single process (in-memory stores): the broker publishes on commit.
    Local,
    /// PostgreSQL LISTEN/NOTIFY plus the events table, so every replica
    /// sees every replica's events.
    Postgres {
        /// The listener's own connection.
        config: Box<tokio_postgres::Config>,
        /// Migrations still to run, when PostgreSQL did not answer at
        /// start-up: run before the listener starts.
        migrate: Option<deadpool_postgres::Pool>,
    },
}

/// Server-side settings independent of the backends.
pub struct Settings {
    /// mTLS (re-read when its files change).
    pub tls: Arc<crate::tls::acceptor::ReloadingTls>,
    /// How often the TLS files are checked (`None`: never).
    pub tls_reload: Option<Duration>,
    /// Connection and call admission.
    pub front: server::FrontDoor,
    /// Accepted SPIFFE trust domain.
    pub trust_domain: String,
    /// Tokens and roles.
    pub auth: crate::config::AuthConfig,
    /// Per-tenant rate limits.
    pub limits: crate::config::LimitsConfig,
    /// The audit spool.
    pub audit: crate::config::AuditConfig,
    /// Metrics endpoint.
    pub telemetry: crate::config::TelemetryConfig,
    /// The health-check job (`enabled = false`: rounds only by hand, as
    /// tests run them).
    pub checks: crate::config::ChecksConfig,
    /// Webhook delivery.
    pub webhooks: crate::config::WebhookConfig,
    /// Cache.
    pub cache: CacheConfig,
    /// Rotation.
    pub rotation: RotationConfig,
    /// KV path prefix.
    pub path_prefix: String,
    /// Stream heartbeat and maximum age.
    pub streams: StreamTiming,
    /// Health probe period.
    pub health_probe: Duration,
    /// Plaintext grpc.health.v1 listener for the kubelet's probes.
    pub health_listen: Option<SocketAddr>,
    /// When the retire job (overlaps, event pruning, orphan sweep) runs;
    /// tests set `Manual` and run its passes themselves.
    pub retire: retire::Schedule,
    /// WatchRotations streams this replica admits, in all and per tenant.
    pub streams_admitted: crate::rotation::watch::StreamLimits,
    /// Shutdown grace.
    pub grace: Duration,
    /// Clock (tests inject a manual one).
    pub clock: Arc<dyn Clock>,
}

/// A running broker.
pub struct Running {
    /// Address the server listens on.
    pub addr: SocketAddr,
    /// The broker core (tests drive jobs through it).
    pub broker: Arc<Broker>,
    /// This replica's rate limits (and the live replica count they use).
    pub limits: Arc<Limits>,
    /// This replica's metrics.
    pub metrics: Metrics,
    /// Where `/metrics` is served, if it is.
    pub metrics_addr: Option<SocketAddr>,
    /// The health-check job (tests run its rounds by hand).
    pub checks: Arc<HealthChecks>,
    /// The webhook deliverer (tests may run passes by hand).
    pub webhooks: Arc<crate::webhook::Deliverer>,
    tasks: Tasks,
}

/// Every long-running task of a replica, stopped together by one token.
struct Tasks {
    set: JoinSet<(&'static str, anyhow::Result<()>)>,
    shutdown: CancellationToken,
}

impl Tasks {
    fn new() -> Self {
        Self {
            set: JoinSet::new(),
            shutdown: CancellationToken::new(),
        }
    }

    /// Spawns a task under `name`. A task that returns before shutdown was
    /// requested counts as a failure: every job here is meant to run for
    /// the life of the process.
    fn spawn<F>(&mut self, name: &'static str, fut: F)
    where
        F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let shutdown = self.shutdown.clone();
        self.set.spawn(async move {
            let res = match fut.await {
                Ok(()) if !shutdown.is_cancelled() => Err(anyhow::anyhow!("stopped unexpectedly")),
                other => other,
            };
            (name, res)
        });
    }

    /// Spawns a job's `task_main`, handed the shutdown token.
    fn spawn_job<F, Fut>(&mut self, name: &'static str, job: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let run = job(self.shutdown.clone());
        self.spawn(name, async move {
            run.await;
            Ok(())
        });
    }
}

impl Running {
    /// A token that stops the server when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.tasks.shutdown.clone()
    }

    /// Waits until the server stops (shutdown or failure); a task that fails
    /// stops everything and its error is returned.
    ///
    /// # Errors
    /// The first task failure.
    pub async fn wait(mut self) -> anyhow::Result<()> {
        let mut first_err = None;
        while let Some(done) = self.tasks.set.join_next().await {
            let (name, res) = match done {
                Ok((name, res)) => (name, res),
                Err(e) => ("a task", Err(anyhow::Error::from(e))),
            };
            if let Err(e) = res {
                tracing::error!(task = name, "task failed, shutting down: {e:#}");
                self.tasks.shutdown.cancel();
                first_err.get_or_insert(e.context(name));
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Stops the server and waits for it.
    ///
    /// # Errors
    /// The first task failure.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.tasks.shutdown.cancel();
        self.wait().await
    }
}

/// Connects to Vault and PostgreSQL as configured, migrates if asked.
///
/// # Errors
/// When a backend cannot be reached at start-up or a migration fails.
pub async fn real_backends(cfg: &Config) -> anyhow::Result<Backends> {
    let vault = Arc::new(
        VaultSecretStore::connect(&cfg.vault)
            .await
            .map_err(|e| anyhow::anyhow!("vault ({}): {e}", cfg.vault.addr))?,
    );
    let pg = store::connect_config(&cfg.postgres).map_err(anyhow::Error::msg)?;
    let pool = store::pool(pg.clone(), cfg.postgres.pool_size).map_err(anyhow::Error::msg)?;
    let meta = Arc::new(PgMetadataStore::new(pool.clone()));
    // A replica restarted during a PostgreSQL outage starts anyway (NOT
    // SERVING) and migrates once PostgreSQL answers; a migration that fails
    // on a reachable database stops start-up.
    let migrate = if cfg.postgres.migrate_on_start {
        match pool.get().await {
            Ok(_) => {
                let n = store::migrate::run(&pool)
                    .await
                    .map_err(|e| anyhow::anyhow!("postgres migrations: {e:#}"))?;
                tracing::info!(applied = n, "database schema up to date");
                None
            }
            Err(e) => {
                tracing::warn!(
                    "PostgreSQL does not answer at start-up ({e}); migrations run once it does, NOT_SERVING until then"
                );
                Some(pool.clone())
            }
        }
    } else {
        None
    };
    // One client of the exchanges (its request budgets protect the broker's
    // IP) validates keys and manages them.
    let exchanges = exchange_validator(&cfg.validation, Arc::new(SystemClock))?;
    Ok(Backends {
        secrets: vault.clone(),
        meta: meta.clone(),
        fleet: meta.clone(),
        webhooks: meta.clone(),
        audit_log: meta.clone(),
        audit_days: Some(meta.clone()),
        keys: exchanges.clone().map(|v| KeyBackends {
            manager: v,
            store: meta.clone(),
        }),
        validator: match exchanges {
            Some(v) => v,
            None => Arc::new(FormatCheckValidator),
        },
        vault: Some(vault),
        webhook_net: crate::webhook::WebhookNet::default(),
        events: EventSource::Postgres {
            config: Box::new(pg),
            migrate,
        },
    })
}

/// The exchanges' client (validation and key management), unless the
/// configuration asks for the format check only.
///
/// # Errors
/// A message naming a bad `validation.exchanges` value.
pub fn exchange_validator(
    cfg: &ValidationConfig,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<Option<Arc<ExchangeValidator>>> {
    Ok(match cfg.mode {
        ValidationMode::Format => None,
        ValidationMode::Exchange => {
            let policy = WithdrawPolicy {
                allowed_tenants: cfg
                    .allow_withdraw_tenants
                    .iter()
                    .copied()
                    .map(TenantId::new)
                    .collect(),
                required: cfg.required_permissions.clone(),
                required_by_tenant: cfg
                    .tenant_required_permissions
                    .iter()
                    .map(|(t, r)| (TenantId::new(*t), r.clone()))
                    .collect(),
            };
            Some(Arc::new(
                ExchangeValidator::new(&cfg.exchanges, policy, clock)
                    .map_err(|e| anyhow::anyhow!("validation.{e}"))?,
            ))
        }
    })
}

/// Settings from the configuration file.
///
/// # Errors
/// When TLS files cannot be read.
pub fn settings(cfg: &Config) -> anyhow::Result<Settings> {
    Ok(Settings {
        tls: crate::tls::server_config(&cfg.tls)?,
        tls_reload: (cfg.tls.reload_secs > 0).then(|| Duration::from_secs(cfg.tls.reload_secs)),
        front: server::FrontDoor::from_config(&cfg.server),
        trust_domain: cfg.tls.trust_domain.clone(),
        auth: cfg.auth.clone(),
        limits: cfg.limits.clone(),
        audit: cfg.audit.clone(),
        telemetry: cfg.telemetry.clone(),
        checks: cfg.checks.clone(),
        webhooks: cfg.webhooks.clone(),
        cache: cfg.cache.clone(),
        rotation: cfg.rotation.clone(),
        path_prefix: cfg.vault.prefix.trim_matches('/').to_owned(),
        streams: StreamTiming {
            heartbeat: Duration::from_secs(cfg.server.heartbeat_secs),
            max_age: (cfg.server.max_stream_age_secs > 0)
                .then(|| Duration::from_secs(cfg.server.max_stream_age_secs)),
        },
        health_probe: Duration::from_secs(cfg.server.health_probe_secs),
        health_listen: cfg.server.health_listen,
        retire: retire::Schedule::Every {
            retire: Duration::from_secs(cfg.rotation.retire_interval_secs.max(1)),
            sweep: Duration::from_secs(cfg.rotation.orphan_sweep_interval_secs.max(1)),
        },
        streams_admitted: crate::rotation::watch::StreamLimits {
            max: cfg.server.max_streams,
            per_tenant: cfg.server.max_streams_per_tenant,
        },
        grace: Duration::from_secs(cfg.server.shutdown_grace_secs),
        clock: Arc::new(SystemClock),
    })
}

/// Starts the server on `listener` with its background tasks.
///
/// # Errors
/// When the server cannot be set up.
pub async fn start(
    backends: Backends,
    s: Settings,
    listener: TcpListener,
) -> anyhow::Result<Running> {
    let addr = listener.local_addr()?;
    let mut tasks = Tasks::new();
    watch_sigxfsz(&mut tasks)?;
    // The spool first: no call is answered that could not be audited.
    let (spool, sink) = open_audit(&s.audit)?;
    // Vault and the exchanges are measured where the broker meets them.
    let metrics = Metrics::new();
    let secrets = MeteredSecretStore::wrap(backends.secrets.clone(), metrics.clone());
    // One policy for SetWebhook and every delivery.
    let targets = Arc::new(crate::webhook::Targets {
        policy: crate::webhook::TargetPolicy::from_config(&s.webhooks),
        resolver: backends.webhook_net.resolver.clone(),
    });
    let broker = build_broker(&backends, &s, &secrets, &metrics, &sink, &targets);
    if let Some(spool) = &spool {
        spawn_audit(&mut tasks, spool, &backends, &s);
    }
    spawn_retire(&mut tasks, &broker, &s);
    // Nothing is served before this replica hears every committed event
    // (see `start_event_listener`).
    let ready = start_event_listener(
        &mut tasks,
        backends.events,
        &broker,
        &metrics,
        Duration::from_secs(s.rotation.event_poll_secs.max(1)),
    )
    .await;
    let (reporter, health) = tonic_health::server::health_reporter();
    server::set_serving(&reporter, false).await;
    let probe = HealthProbe {
        secrets: secrets.clone(),
        meta: backends.meta.clone(),
        audit: sink.clone(),
        ready: ready.clone(),
        reporter,
        every: s.health_probe,
        metrics: metrics.clone(),
    };
    tasks.spawn_job("health probe", |cancel| probe.task_main(cancel));
    if let Some(vault) = backends.vault.clone().filter(|v| v.needs_relogin()) {
        tasks.spawn_job("Vault re-login", |cancel| vault.task_main(cancel));
    }
    if let Some(every) = s.tls_reload {
        let tls = s.tls.clone();
        tasks.spawn_job("TLS file watcher", move |cancel| async move {
            tls.task_main(every, cancel).await;
        });
    }
    let limits = Arc::new(Limits::new(&s.limits));
    {
        let (meta, limits) = (backends.fleet.clone(), limits.clone());
        tasks.spawn_job("replica registry", |cancel| {
            replica_registry(meta, limits, cancel)
        });
    }
    let webhooks = start_webhooks(
        &mut tasks,
        &s,
        (&backends.webhooks, &backends.webhook_net),
        &sink,
        &secrets,
        &broker,
        &metrics,
        targets,
    )?;
    let checks = start_checks(&mut tasks, &s, &backends.fleet, &broker, &metrics);
    let key_rotator = backends.keys.as_ref().map(|k| {
        let rotator = Arc::new(
            KeyRotator::new(
                broker.clone(),
                k.manager.clone(),
                k.store.clone(),
                backends.fleet.clone(),
                uuid::Uuid::new_v4(),
                MintSettings {
                    end_on_adoption: s.rotation.delete_on_adoption,
                    ..MintSettings::default()
                },
            )
            .observed_by(Arc::new(KeyRotationMetrics(metrics.clone()))),
        );
        let job = rotator.clone();
        tasks.spawn_job("key rotations at the exchange", move |cancel| {
            job.task_main(KEY_ROTATION_ROUND, cancel)
        });
        checks.rotate_expiring_with(rotator.clone());
        rotator
    });
    let service = BrokerService::new(
        broker.clone(),
        s.streams,
        s.streams_admitted,
        Gate {
            ready,
            limits: limits.clone(),
            networks: s
                .auth
                .tenant_networks
                .iter()
                .map(|(t, n)| (TenantId::new(*t), n.clone()))
                .collect(),
        },
        tasks.shutdown.clone(),
    );
    let service = match key_rotator {
        Some(k) => service.with_key_rotator(k),
        None => service,
    };
    let metrics_addr = serve_metrics(&mut tasks, &s, &metrics, &broker, &service, spool).await?;
    serve_health(&mut tasks, &s, health.clone()).await?;
    serve_grpc(&mut tasks, listener, &s, sink, &metrics, service, health)?;
    tracing::info!(%addr, "credbroker listening (mTLS)");
    Ok(Running {
        addr,
        broker,
        limits,
        metrics,
        metrics_addr,
        checks,
        webhooks,
        tasks,
    })
}

fn secs(n: u64) -> time::Duration {
    time::Duration::seconds(i64::try_from(n).unwrap_or(i64::MAX))
}

/// The broker core: the metered stores and validator, the cache, the hub,
/// the audit sink and the webhook endpoints.
fn build_broker(
    backends: &Backends,
    s: &Settings,
    secrets: &Arc<dyn SecretStore>,
    metrics: &Metrics,
    sink: &Sink,
    targets: &Arc<crate::webhook::Targets>,
) -> Arc<Broker> {
    Arc::new(
        Broker::new(
            secrets.clone(),
            backends.meta.clone(),
            MeteredValidator::wrap(backends.validator.clone(), metrics.clone()),
            CredentialCache::new(
                s.cache.capacity,
                secs(s.cache.ttl_secs),
                secs(s.cache.outage_grace_secs),
            ),
            Hub::new(4096),
            s.clock.clone(),
            BrokerSettings {
                path_prefix: s.path_prefix.clone(),
                default_overlap: secs(s.rotation.default_overlap_secs),
                max_overlap: secs(s.rotation.max_overlap_secs),
                expiry_warning: time::Duration::days(i64::from(s.checks.expiry_warning_days)),
                max_key_age: (s.checks.max_key_age_days > 0)
                    .then(|| time::Duration::days(i64::from(s.checks.max_key_age_days))),
                watch_replaced_keys: s.checks.watch_replaced_keys,
            },
        )
        .with_audit(sink.clone())
        .with_audit_log(backends.audit_log.clone())
        .with_webhooks(backends.webhooks.clone(), targets.clone()),
    )
}

/// The overlap retire job (with event pruning and the orphan sweep).
fn spawn_retire(tasks: &mut Tasks, broker: &Arc<Broker>, s: &Settings) {
    let b = broker.clone();
    let retention = secs(s.rotation.event_retention_secs);
    let grace = secs(s.rotation.orphan_grace_secs);
    let schedule = s.retire;
    tasks.spawn_job("overlap retire job", move |cancel| {
        retire::task_main(b, schedule, retention, grace, cancel)
    });
}

/// Webhook delivery from the outbox.
///
/// # Errors
/// When the deliverer cannot be built (its HTTP client).
#[allow(clippy::too_many_arguments)]
fn start_webhooks(
    tasks: &mut Tasks,
    s: &Settings,
    (store, net): (&Arc<dyn WebhookStore>, &crate::webhook::WebhookNet),
    sink: &Sink,
    secrets: &Arc<dyn SecretStore>,
    broker: &Arc<Broker>,
    metrics: &Metrics,
    targets: Arc<crate::webhook::Targets>,
) -> anyhow::Result<Arc<crate::webhook::Deliverer>> {
    let webhooks = Arc::new(
        crate::webhook::Deliverer::new(
            sink.clone(),
            store.clone(),
            secrets.clone(),
            broker.vault_path_prefix(),
            metrics.clone(),
            targets,
            net.connect.clone(),
            crate::webhook::DeliveryLimits {
                tenants: s.webhooks.concurrent_tenants,
                per_host: s.webhooks.per_host,
            },
        )
        .map_err(anyhow::Error::msg)?,
    );
    let every = Duration::from_millis(s.webhooks.poll_ms.max(10));
    let d = webhooks.clone();
    tasks.spawn_job("webhook delivery", move |cancel| async move {
        d.task_main(every, cancel).await;
    });
    Ok(webhooks)
}

/// The credential health checks, and the credential counts for metrics.
fn start_checks(
    tasks: &mut Tasks,
    s: &Settings,
    fleet: &Arc<dyn FleetStore>,
    broker: &Arc<Broker>,
    metrics: &Metrics,
) -> Arc<HealthChecks> {
    let checks = HealthChecks::new(
        broker.clone(),
        fleet.clone(),
        metrics.clone(),
        CheckSettings::from_config(&s.checks),
    );
    let schedule = crate::checks::Schedule::from_config(&s.checks);
    let c = checks.clone();
    tasks.spawn_job("credential health checks", move |cancel| async move {
        c.task_main(schedule, cancel).await;
    });
    let (fleet, metrics) = (fleet.clone(), metrics.clone());
    let every = Duration::from_secs(s.telemetry.credentials_refresh_secs.max(1));
    tasks.spawn_job("credential counts", move |cancel| {
        crate::telemetry::credentials_task(fleet, metrics, every, cancel)
    });
    checks
}

/// `/metrics`, when `telemetry.metrics_listen` is set; returns its address.
///
/// # Errors
/// When the address cannot be bound.
async fn serve_metrics(
    tasks: &mut Tasks,
    s: &Settings,
    metrics: &Metrics,
    broker: &Arc<Broker>,
    service: &BrokerService,
    spool: Option<Arc<Spool>>,
) -> anyhow::Result<Option<SocketAddr>> {
    let Some(at) = s.telemetry.metrics_listen else {
        return Ok(None);
    };
    let listener = crate::telemetry::bind(at).await?;
    let addr = listener.local_addr()?;
    let (b, slots) = (broker.clone(), service.stream_slots());
    let registry = metrics.registry(Sources {
        cache: Arc::new(move || b.cache_stats()),
        streams: Arc::new(move || slots.open_total()),
        spool,
    });
    let cancel = tasks.shutdown.clone();
    tasks.spawn(
        "metrics endpoint",
        crate::telemetry::serve(listener, registry, cancel),
    );
    tracing::info!(%addr, "metrics on http://{addr}/metrics");
    Ok(Some(addr))
}

/// Plaintext `grpc.health.v1` for the kubelet, when `server.health_listen`
/// is set.
///
/// # Errors
/// When the address cannot be bound.
async fn serve_health(
    tasks: &mut Tasks,
    s: &Settings,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) -> anyhow::Result<()> {
    let Some(at) = s.health_listen else {
        return Ok(());
    };
    let listener = TcpListener::bind(at)
        .await
        .map_err(|e| anyhow::anyhow!("server.health_listen {at}: cannot bind ({e})"))?;
    let at = listener.local_addr()?;
    let cancel = tasks.shutdown.clone();
    tasks.spawn("health listener", async move {
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async move { cancel.cancelled().await },
            )
            .await
            .map_err(anyhow::Error::from)
    });
    tracing::info!(%at, "grpc.health.v1 (plaintext, health only)");
    Ok(())
}

/// The edge: who calls (certificate and token), the refused-call tallies,
/// and the gRPC server with its stack (see `server::serve`).
///
/// # Errors
/// When the token verifier cannot be built (a bad key file).
fn serve_grpc(
    tasks: &mut Tasks,
    listener: TcpListener,
    s: &Settings,
    sink: Sink,
    metrics: &Metrics,
    service: BrokerService,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) -> anyhow::Result<()> {
    let refusals = crate::audit::refusals::Refusals::new(sink.clone());
    let r = refusals.clone();
    tasks.spawn_job("refused-call tallies", move |cancel| async move {
        r.task_main(crate::audit::refusals::INTERVAL, cancel).await;
    });
    let tokens = TokenVerifier::new(&TokenSettings {
        hs256_secret: s.auth.hs256_secret.clone(),
        jwks_file: s.auth.jwks_file.clone(),
        audience: s.auth.audience.clone(),
        issuer: s.auth.issuer.clone(),
        leeway: Duration::from_secs(s.auth.leeway_secs),
        max_lifetime: Duration::from_secs(s.auth.max_token_lifetime_secs),
    })
    .map_err(anyhow::Error::msg)?;
    let mode = s.auth.mode();
    tracing::info!(token = ?mode, workload_role = s.auth.workload_role.as_str(), "caller identity: client certificate, bearer token");
    let auth = AuthLayer::new(AuthSettings {
        trust_domain: s.trust_domain.clone(),
        mode,
        tokens,
        workload_role: s.auth.workload_role,
    });
    let shutdown = tasks.shutdown.clone();
    tasks.spawn(
        "gRPC server",
        server::serve(ServeParams {
            listener,
            tls: s.tls.clone(),
            front: s.front,
            auth,
            audit: sink,
            refusals,
            metrics: metrics.clone(),
            service,
            health,
            shutdown,
            grace: s.grace,
            request_timeout: Duration::from_secs(30),
        }),
    );
    Ok(())
}

/// How often a replica says it is alive, and how long that counts.
const REPLICA_HEARTBEAT: Duration = Duration::from_secs(5);
const REPLICA_LIVE_FOR: time::Duration = time::Duration::seconds(15);

/// Announces this replica every few seconds and shares the rate limits with
/// the live ones. Liveness is wall-clock time, not the broker's (injectable)
/// domain clock. While PostgreSQL is down the last count stays in force.
async fn replica_registry(
    meta: Arc<dyn FleetStore>,
    limits: Arc<Limits>,
    cancel: CancellationToken,
) {
    let id = uuid::Uuid::new_v4();
    let mut tick = tokio::time::interval(REPLICA_HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        match meta
            .replica_heartbeat(id, time::OffsetDateTime::now_utc(), REPLICA_LIVE_FOR)
            .await
        {
            Ok(n) => limits.set_replicas(n),
            Err(e) => {
                tracing::warn!("replica heartbeat failed; keeping the last replica count: {e}")
            }
        }
    }
}

/// What `grpc.health.v1` reports: SERVING while Vault and PostgreSQL
/// answer, the event listener is connected and the audit spool takes
/// records.
struct HealthProbe {
    secrets: Arc<dyn SecretStore>,
    meta: Arc<dyn MetadataStore>,
    audit: Arc<dyn crate::audit::AuditSink>,
    ready: tokio::sync::watch::Receiver<bool>,
    reporter: tonic_health::server::HealthReporter,
    every: Duration,
    metrics: Metrics,
}

impl HealthProbe {
    async fn task_main(mut self, cancel: CancellationToken) {
        let mut last = None;
        loop {
            let (v, p) = tokio::join!(self.secrets.ping(), self.meta.ping());
            let listening = *self.ready.borrow_and_update();
            let audit = self.audit.check();
            let serving = v.is_ok() && p.is_ok() && listening && audit.is_ok();
            let f = self.metrics.families();
            f.vault_up.set(i64::from(v.is_ok()));
            f.postgres_up.set(i64::from(p.is_ok()));
            let sealed = if v.is_ok() {
                false
            } else {
                self.secrets.sealed().await.unwrap_or(false)
            };
            f.vault_sealed.set(i64::from(sealed));
            if last != Some(serving) {
                if let Err(e) = &v {
                    tracing::warn!("health: Vault unreachable: {e}");
                }
                if let Err(e) = &p {
                    tracing::warn!("health: PostgreSQL unreachable: {e}");
                }
                if !listening {
                    tracing::warn!("health: the event listener is not connected yet");
                }
                if let Err(e) = &audit {
                    tracing::warn!("health: {e}");
                }
                server::set_serving(&self.reporter, serving).await;
                last = Some(serving);
            }
            tokio::select! {
                () = cancel.cancelled() => {
                    server::set_serving(&self.reporter, false).await;
                    return;
                }
                // While the spool refuses, look again soon: its recovery
                // probe lets calls through within half a second.
                () = tokio::time::sleep(if audit.is_ok() { self.every } else { self.every.min(Duration::from_millis(100)) }) => {}
                // The listener connecting is news at once, not at the next probe.
                Ok(()) = self.ready.changed(), if !listening => {}
            }
        }
    }
}

/// How long start-up waits for the event listener before it serves
/// NOT_SERVING instead (PostgreSQL that answers takes milliseconds).
const STARTUP_WAIT: Duration = Duration::from_secs(2);

/// Runs the pending migrations once PostgreSQL answers, retrying the
/// connection with backoff (logged once per outage, not per try).
///
/// # Errors
/// When a migration fails on a reachable database.
async fn migrate_when_reachable(
    pool: &deadpool_postgres::Pool,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let mut backoff =
        crate::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
    loop {
        if pool.get().await.is_ok() {
            let n = store::migrate::run(pool)
                .await
                .map_err(|e| anyhow::anyhow!("postgres migrations: {e:#}"))?;
            tracing::info!(
                applied = n,
                "PostgreSQL answers: database schema up to date"
            );
            return Ok(());
        }
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            () = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = term => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
}

/// Where every audit record goes.
type Sink = Arc<dyn crate::audit::AuditSink>;

/// Opens the audit spool (or, with auditing off, a sink that keeps
/// nothing): the spool and the sink every record goes to.
///
/// # Errors
/// When the spool directory cannot be used.
fn open_audit(audit: &crate::config::AuditConfig) -> anyhow::Result<(Option<Arc<Spool>>, Sink)> {
    let spool = if audit.enabled {
        let spool = Spool::open(&audit.spool_dir, audit.max_spool_bytes).map_err(|e| {
            anyhow::anyhow!(
                "audit.spool_dir {}: cannot open the audit spool ({e})",
                audit.spool_dir.display()
            )
        })?;
        tracing::info!(dir = %audit.spool_dir.display(), chain = %spool.chain_id(), "audit spool open");
        Some(spool)
    } else {
        tracing::warn!("audit.enabled = false: calls are NOT audited (not SOC 2 compliant)");
        None
    };
    let sink: Sink = match &spool {
        Some(s) => s.clone(),
        None => Arc::new(crate::audit::Discard),
    };
    Ok((spool, sink))
}

/// A file-size limit (RLIMIT_FSIZE) must fail the audit spool's write
/// (EFBIG: calls refused, recovered by itself once lifted), not kill the
/// process with SIGXFSZ's default action: the signal is taken and logged.
///
/// # Errors
/// When the signal cannot be listened for.
fn watch_sigxfsz(tasks: &mut Tasks) -> anyhow::Result<()> {
    let kind = tokio::signal::unix::SignalKind::from_raw(rustix::process::Signal::XFSZ.as_raw());
    let mut xfsz = tokio::signal::unix::signal(kind)?;
    tasks.spawn_job("SIGXFSZ watch", |cancel| async move {
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                got = xfsz.recv() => {
                    if got.is_none() {
                        return;
                    }
                    tracing::debug!("SIGXFSZ: a write went past the file-size limit");
                }
            }
        }
    });
    Ok(())
}

/// The audit spool's group fsync (with its recovery probe), its shipper to
/// PostgreSQL (which reconciles lost outcomes after its passes), and the
/// audit log's day partitions and retention.
fn spawn_audit(tasks: &mut Tasks, spool: &Arc<Spool>, backends: &Backends, s: &Settings) {
    let audit = &s.audit;
    let (fsync, every) = (spool.clone(), Duration::from_millis(audit.fsync_ms));
    tasks.spawn_job("audit fsync", move |cancel| async move {
        fsync.flusher(every, cancel).await;
    });
    let reconciler = backends.audit_days.clone().map(|store| {
        Box::new(crate::audit::reconcile::Reconciler::new(
            store,
            s.clock.clone(),
        )) as Box<dyn crate::audit::ship::AfterPass>
    });
    let (ship, meta, every) = (
        spool.clone(),
        backends.audit_log.clone(),
        Duration::from_millis(audit.ship_ms),
    );
    tasks.spawn_job("audit shipper", move |cancel| {
        crate::audit::ship::task_main(ship, meta, every, reconciler, cancel)
    });
    if let Some(store) = backends.audit_days.clone() {
        let (keep, clock) = (audit.retention_days, s.clock.clone());
        tasks.spawn_job("audit retention", move |cancel| {
            crate::audit::retention::task_main(store, keep, clock, cancel)
        });
    }
}

/// Starts this replica's event listener (after the migrations PostgreSQL
/// could not take at start-up) and returns whether it listens. Nothing is
/// served before this replica hears every committed event: a call answered
/// before would cache or stream what an event it missed has superseded.
/// With PostgreSQL down the server still comes up, NOT_SERVING and refusing
/// calls with UNAVAILABLE, and opens as soon as the listener connects.
async fn start_event_listener(
    tasks: &mut Tasks,
    events: EventSource,
    broker: &Arc<Broker>,
    metrics: &Metrics,
    poll_every: Duration,
) -> tokio::sync::watch::Receiver<bool> {
    if let EventSource::Postgres { config, migrate } = events {
        let listener = EventListener::new(*config, broker.clone(), poll_every)
            .with_lag(metrics.families().event_lag.clone());
        let (ready_tx, mut ready_rx) = tokio::sync::watch::channel(false);
        let cancel = tasks.shutdown.clone();
        tasks.spawn("event listener", async move {
            if let Some(pool) = migrate {
                migrate_when_reachable(&pool, &cancel).await?;
            }
            listener.task_main(ready_tx, cancel).await
        });
        // PostgreSQL that answers makes the listener ready in milliseconds;
        // one that does not is not waited for.
        if tokio::time::timeout(STARTUP_WAIT, ready_rx.wait_for(|r| *r))
            .await
            .is_err()
        {
            tracing::warn!(
                "the event listener is not connected yet (PostgreSQL unreachable?): serving NOT_SERVING, calls refused until it is"
            );
        }
        ready_rx
    } else {
        tokio::sync::watch::channel(true).1
    }
}
