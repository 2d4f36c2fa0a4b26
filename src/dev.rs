//! `credbroker dev`: the whole broker with no external service. Secrets and
//! metadata live in memory behind the same ports as Vault and PostgreSQL; a
//! throw-away CA, server and operator client certificates are written to the
//! dev directory, and grpcurl commands that work as printed are shown.

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use tokio::net::TcpListener;

use crate::app::{self, Backends, EventSource, Settings};

use crate::broker::ports::CredentialValidator;

use crate::rotation::mint::KeyManager;

use crate::broker::types::ExchangeId;

use crate::broker::validate::FormatCheckValidator;

use crate::clock::SystemClock;

use crate::config::{CacheConfig, RotationConfig, ValidationConfig};

use crate::exchange::{ExchangeValidator, WithdrawPolicy};

use crate::exchange::sim::{SimKey, Simulators, native_permissions};

use crate::memstore::{MemoryMetadataStore, MemorySecretStore};

use crate::tls::pki::{DevPki, write_private};

/// Trust domain of the dev PKI.
pub const DEV_TRUST_DOMAIN: &str = "credbroker.local";

/// Writes `ca.pem`, `server.pem`/`server.key`, the operator's
/// `client.pem`/`client.key` and, given a tenant, a pod's
/// `pod.pem`/`pod.key` into `dir`, and returns the server TLS config.
///
/// # Errors
/// On I/O or key generation failure.
pub fn write_dev_pki(
    dir: &Path,
    pod_tenant: Option<uuid::Uuid>,
) -> anyhow::Result<crate::config::TlsConfig> {
    std::fs::create_dir_all(dir)?;
    let pki = DevPki::new("credbroker dev CA")?;
    let server = pki.server(&[])?;
    let client = pki.client(&format!("spiffe://{DEV_TRUST_DOMAIN}/operator/dev"))?;
    std::fs::write(dir.join("ca.pem"), pki.ca_pem())?;
    std::fs::write(dir.join("server.pem"), &server.cert)?;
    write_private(&dir.join("server.key"), &server.key)?;
    std::fs::write(dir.join("client.pem"), &client.cert)?;
    write_private(&dir.join("client.key"), &client.key)?;
    if let Some(t) = pod_tenant {
        let pod = pki.client(&format!("spiffe://{DEV_TRUST_DOMAIN}/tenant/{t}/pod/dev"))?;
        std::fs::write(dir.join("pod.pem"), &pod.cert)?;
        write_private(&dir.join("pod.key"), &pod.key)?;
    }
    Ok(crate::config::TlsConfig {
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
        client_ca: dir.join("ca.pem"),
        trust_domain: DEV_TRUST_DOMAIN.into(),
        allow_tls12: false,
        reload_secs: 0,
    })
}

/// The grpcurl commands printed at start-up.
pub fn grpcurl_examples(dir: &Path, addr: SocketAddr, validation: &str) -> String {
    let d = dir.display().to_string();
    EXAMPLES
        .replace(
            "{G}",
            &format!("grpcurl -cacert {d}/ca.pem -cert {d}/client.pem -key {d}/client.key"),
        )
        .replace("{TARGET}", &format!("localhost:{}", addr.port()))
        .replace("{TENANT}", "00000000-0000-0000-0000-000000000001")
        .replace("{ADDR}", &addr.to_string())
        .replace("{DIR}", &d)
        .replace("{VALIDATION}", validation)
}

/// The commands `credbroker dev` prints, with `{G}` (grpcurl and the
/// certificates), `{TARGET}`, `{TENANT}`, `{ADDR}`, `{DIR}` and
/// `{VALIDATION}` to fill in.
const EXAMPLES: &str = include_str!("dev_examples.txt");

/// How `credbroker dev` validates keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DevValidation {
    /// Against the bundled exchange simulators, seeded with the demo keys the
    /// README uses (no network).
    Simulated,
    /// Format checks only.
    Format,
    /// Against the real exchanges' mainnet APIs.
    Live,
}

/// Demo keys the simulators know in dev mode: (exchange, key, secret,
/// passphrase).
pub const DEMO_KEYS: &[(ExchangeId, &str, &str, Option<&str>)] = &[
    (
        ExchangeId::Binance,
        "demoKey0123456789",
        "demoSecret0123456789",
        None,
    ),
    (
        ExchangeId::Binance,
        "demoKey9876543210",
        "demoSecret9876543210",
        None,
    ),
    (
        ExchangeId::Binance,
        "demoKeyLeakFix0001",
        "demoSecretLeakFix01",
        None,
    ),
    (
        ExchangeId::Bybit,
        "demoBybitKey0001",
        "demoBybitSecret0001",
        None,
    ),
    (
        ExchangeId::Okx,
        "okxKey0123456789",
        "okxSecret0123456789",
        Some("p4ss"),
    ),
    (
        ExchangeId::Kraken,
        "demoKrakenKey0001",
        "ZGVtby1rcmFrZW4tc2VjcmV0LTAwMDE=",
        None,
    ),
    (
        ExchangeId::Kucoin,
        "demoKucoinKey0001",
        "demoKucoinSecret0001",
        Some("p4ss"),
    ),
];

/// The Bybit sub-account the demo keys belong to, and the master key that
/// manages it (for `SetManagementKey` and `Rotate` with `mint`).
pub const DEMO_SUB_ACCOUNT: &str = "100200300";
/// The demo management key: (key, secret).
pub const DEMO_BYBIT_MASTER: (&str, &str) = ("demoBybitMaster0001", "demoBybitMasterSecret0001");

/// The validator, the exchanges' key management (when keys are validated
/// against exchanges), the simulators and how validation is described.
type DevValidator = (
    Arc<dyn CredentialValidator>,
    Option<Arc<dyn KeyManager>>,
    Option<Simulators>,
    &'static str,
);

async fn dev_validator(mode: DevValidation) -> anyhow::Result<DevValidator> {
    Ok(match mode {
        DevValidation::Format => (
            Arc::new(FormatCheckValidator),
            None,
            None,
            "the format check only (no exchange is asked)",
        ),
        DevValidation::Live => {
            let v = app::exchange_validator(&ValidationConfig::default(), Arc::new(SystemClock))?
                .ok_or_else(|| {
                anyhow::anyhow!("live validation needs the exchange validator")
            })?;
            (
                v.clone(),
                Some(v),
                None,
                "the real exchanges (mainnet APIs)",
            )
        }
        DevValidation::Simulated => {
            let sims = Simulators::start().await?;
            for (ex, key, secret, pass) in DEMO_KEYS {
                let mut k = SimKey::hmac(secret, native_permissions(*ex, false, true));
                k.passphrase = pass.map(str::to_owned);
                if *ex == ExchangeId::Bybit {
                    k.sub_account = Some(DEMO_SUB_ACCOUNT.into());
                }
                sims.add_key(*ex, key, k);
            }
            let mut master_perms = native_permissions(ExchangeId::Bybit, false, true);
            master_perms["permissions"]["Wallet"] = serde_json::json!(["AccountTransfer"]);
            sims.add_key(
                ExchangeId::Bybit,
                DEMO_BYBIT_MASTER.0,
                SimKey::master(DEMO_BYBIT_MASTER.1, master_perms, &[DEMO_SUB_ACCOUNT]),
            );
            let endpoints = sims.endpoints(5000, 600);
            let v = ExchangeValidator::new(
                &endpoints,
                WithdrawPolicy::default(),
                Arc::new(SystemClock),
            )
            .map_err(anyhow::Error::msg)?;
            let v = Arc::new(v);
            (
                v.clone(),
                Some(v),
                Some(sims),
                "the bundled exchange SIMULATORS (demo keys only; no real exchange is asked)",
            )
        }
    })
}

/// Writes `simulators.json` into the dev directory: each simulated exchange's
/// base URL, for pods and tests that point an exchange client at it.
fn write_simulator_urls(dir: &Path, sims: &Simulators) -> anyhow::Result<()> {
    let urls: serde_json::Map<String, serde_json::Value> = sims
        .urls
        .iter()
        .map(|(ex, url)| {
            (
                ex.as_str().to_owned(),
                serde_json::Value::from(url.as_str()),
            )
        })
        .collect();
    std::fs::write(
        dir.join("simulators.json"),
        serde_json::to_vec_pretty(&urls)?,
    )?;
    Ok(())
}

/// Runs the dev broker until SIGINT/SIGTERM.
///
/// # Errors
/// When the address cannot be bound or the server fails.
pub async fn run(
    listen: SocketAddr,
    dir: &Path,
    (max_streams_per_tenant, watches_per_minute): (usize, u32),
    metrics_listen: Option<SocketAddr>,
    validation: DevValidation,
    pod_tenant: Option<uuid::Uuid>,
) -> anyhow::Result<()> {
    let tls = crate::tls::server_config(&write_dev_pki(dir, pod_tenant)?)?;
    let (validator, key_manager, simulators, validation_label) = dev_validator(validation).await?;
    if let Some(sims) = &simulators {
        write_simulator_urls(dir, sims)?;
    }
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("--listen {listen}: cannot bind ({e})"))?;
    let addr = listener.local_addr()?;
    let meta = Arc::new(MemoryMetadataStore::default());
    let key_store = meta.clone();
    let backends = Backends {
        secrets: Arc::new(MemorySecretStore::default()),
        meta: meta.clone(),
        fleet: meta.clone(),
        webhooks: meta.clone(),
        audit_log: meta,
        validator,
        vault: None,
        events: EventSource::Local,
        webhook_net: crate::webhook::WebhookNet::default(),
        audit_days: None,
        keys: key_manager.map(|manager| app::KeyBackends {
            manager,
            store: key_store,
        }),
    };
    let settings = Settings {
        tls,
        trust_domain: DEV_TRUST_DOMAIN.into(),
        auth: crate::config::AuthConfig::default(),
        limits: crate::config::LimitsConfig {
            watches_per_minute,
            ..crate::config::LimitsConfig::default()
        },
        audit: crate::config::AuditConfig {
            spool_dir: dir.join("audit"),
            ..crate::config::AuditConfig::default()
        },
        telemetry: crate::config::TelemetryConfig {
            metrics_listen,
            ..crate::config::TelemetryConfig::default()
        },
        checks: crate::config::ChecksConfig::default(),
        webhooks: crate::config::WebhookConfig::default(),
        cache: CacheConfig::default(),
        rotation: RotationConfig::default(),
        path_prefix: "tenants".into(),
        streams: crate::rotation::watch::StreamTiming {
            heartbeat: Duration::from_secs(5),
            max_age: Some(Duration::from_secs(3600)),
        },
        health_probe: Duration::from_secs(5),
        health_listen: None,
        retire: crate::rotation::retire::Schedule::Every {
            retire: Duration::from_secs(15),
            sweep: Duration::from_secs(3600),
        },
        streams_admitted: crate::rotation::watch::StreamLimits {
            max: crate::server::DEFAULT_MAX_STREAMS.max(max_streams_per_tenant),
            per_tenant: max_streams_per_tenant.max(1),
        },
        front: crate::server::FrontDoor::default(),
        tls_reload: None,
        grace: Duration::from_secs(5),
        clock: Arc::new(SystemClock),
    };
    let running = app::start(backends, settings, listener).await?;
    if simulators.is_some() {
        println!(
            "Exchange simulators: {}/simulators.json names their base URLs (point an \
             exchange client there); PUT or DELETE <url>{}<api_key> creates or deletes a key.",
            dir.display(),
            crate::exchange::sim::CONTROL_KEYS
        );
    }
    println!("{}", grpcurl_examples(dir, addr, validation_label));
    let token = running.shutdown_token();
    tokio::spawn(async move {
        crate::app::shutdown_signal().await;
        token.cancel();
    });
    running.wait().await
}
