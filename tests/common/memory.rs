//! A broker on the memory stores over real mTLS, in-process: for tests of
//! the layers (identity, roles, limits, the front door), which need neither
//! OpenBao nor PostgreSQL. Shared by the integration tests and the
//! benchmarks.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{sync::Arc, time::Duration};

use credbroker::{
    api::pb::credential_broker_client::CredentialBrokerClient,
    app::{self, Backends, EventSource, Running, Settings},
    broker::{ports::SecretStore, types::TenantId, validate::FormatCheckValidator},
    clock::SystemClock,
    config::{AuthConfig, CacheConfig, LimitsConfig, RotationConfig, TlsConfig},
    memstore::{MemoryMetadataStore, MemorySecretStore},
    rotation::{retire::Schedule, watch::StreamTiming},
    server::FrontDoor,
};
use tonic::transport::Channel;

use super::backends::{Pki, TD, init};

/// What a [`Memory`] broker runs with.
pub struct MemoryOptions {
    pub auth: AuthConfig,
    pub limits: LimitsConfig,
    pub front: FrontDoor,
    pub allow_tls12: bool,
    pub tls_reload: Option<Duration>,
    pub secrets: Option<Arc<dyn SecretStore>>,
    /// A spool bound (and no shipping), to see calls fail closed.
    pub audit_max_bytes: Option<u64>,
    /// Auditing on (the default).
    pub audit: bool,
    /// WatchRotations streams admitted.
    pub streams: credbroker::rotation::watch::StreamLimits,
}

impl Default for MemoryOptions {
    fn default() -> Self {
        Self {
            auth: AuthConfig::default(),
            limits: LimitsConfig::unlimited(),
            front: FrontDoor::default(),
            allow_tls12: false,
            tls_reload: None,
            secrets: None,
            audit_max_bytes: None,
            audit: true,
            streams: credbroker::rotation::watch::StreamLimits {
                max: 16,
                per_tenant: 8,
            },
        }
    }
}

/// A broker on memory stores with `auth` and `limits`, over real mTLS.
pub struct Memory {
    pub running: Running,
    pub pki: Pki,
}

impl Memory {
    pub async fn start(auth: AuthConfig, limits: LimitsConfig) -> Memory {
        Self::start_with(MemoryOptions {
            auth,
            limits,
            ..MemoryOptions::default()
        })
        .await
    }

    pub async fn start_with(o: MemoryOptions) -> Memory {
        init();
        let pki = Pki::new();
        let settings = Settings {
            tls: credbroker::tls::server_config(&TlsConfig {
                cert: pki.path("server.pem"),
                key: pki.path("server.key"),
                client_ca: pki.path("ca.pem"),
                trust_domain: TD.into(),
                allow_tls12: o.allow_tls12,
                reload_secs: 0,
            })
            .unwrap(),
            trust_domain: TD.into(),
            auth: o.auth,
            limits: o.limits,
            audit: credbroker::config::AuditConfig {
                enabled: o.audit,
                spool_dir: pki.path("audit"),
                fsync_ms: 50,
                ship_ms: if o.audit_max_bytes.is_some() {
                    3_600_000
                } else {
                    200
                },
                max_spool_bytes: o.audit_max_bytes.unwrap_or(1 << 30),
                retention_days: 0,
            },
            telemetry: credbroker::config::TelemetryConfig {
                metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
                ..credbroker::config::TelemetryConfig::default()
            },
            // Rounds only by hand.
            checks: credbroker::config::ChecksConfig {
                enabled: false,
                ..credbroker::config::ChecksConfig::default()
            },
            webhooks: credbroker::config::WebhookConfig {
                poll_ms: 100,
                // The tests' receivers listen on loopback over plain HTTP.
                allow_http: true,
                allow_networks: vec!["127.0.0.0/8".parse().unwrap()],
                ..credbroker::config::WebhookConfig::default()
            },
            cache: CacheConfig::default(),
            rotation: RotationConfig::default(),
            path_prefix: "tenants".into(),
            streams: StreamTiming {
                heartbeat: Duration::from_secs(5),
                max_age: None,
            },
            health_probe: Duration::from_secs(5),
            health_listen: None,
            retire: Schedule::Manual,
            tls_reload: o.tls_reload,
            front: o.front,
            streams_admitted: o.streams,
            grace: Duration::from_secs(1),
            clock: Arc::new(SystemClock),
        };
        let meta = Arc::new(MemoryMetadataStore::default());
        let backends = Backends {
            secrets: o
                .secrets
                .unwrap_or_else(|| Arc::new(MemorySecretStore::default())),
            meta: meta.clone(),
            fleet: meta.clone(),
            webhooks: meta.clone(),
            audit_log: meta,
            validator: Arc::new(FormatCheckValidator),
            vault: None,
            events: EventSource::Local,
            webhook_net: credbroker::webhook::WebhookNet::default(),
            audit_days: None,
            keys: None,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let running = app::start(backends, settings, listener).await.unwrap();
        Memory { running, pki }
    }

    pub async fn client(&self, uris: &[&str]) -> CredentialBrokerClient<Channel> {
        CredentialBrokerClient::new(self.pki.channel(self.running.addr, uris).await)
    }

    /// Everything stored for `tenant`: records and event seqs.
    pub async fn state(&self, tenant: &str) -> String {
        let t: TenantId = tenant.parse().unwrap();
        let meta = self.running.broker.metadata();
        let records = meta.list(t).await.unwrap();
        let events = meta.events_after(t, 0, 10_000).await.unwrap();
        format!(
            "{records:?} {:?}",
            events.iter().map(|e| e.seq).collect::<Vec<_>>()
        )
    }
}
