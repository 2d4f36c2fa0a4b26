//! Test harness: a real OpenBao dev server and a fresh PostgreSQL database
//! per test, the broker started in-process on a real mTLS socket, and real
//! tonic clients with certificates from a test CA.

#![allow(dead_code)]

#[path = "../../common/memory.rs"]
pub mod memory;
pub mod probe;

use std::{process::Stdio, sync::Arc, time::Duration};

use credbroker::{
    api::pb::credential_broker_client::CredentialBrokerClient,
    app::{self, Running},
    clock::Clock,
    config::{CacheConfig, Config, RotationConfig, ValidationConfig},
};
use tokio::net::TcpListener;
use tonic::transport::Channel;
use uuid::Uuid;

#[path = "../../common/backends.rs"]
mod backends;
pub use backends::{Bao, Pki, PrivatePg, TD, TestDb, config_for, free_port_pair, init};

/// One broker process-equivalent on real OpenBao and PostgreSQL: a fresh
/// database, and the test binary's shared OpenBao under a path prefix of
/// its own (or an OpenBao of its own: `EnvOptions::own_vault`).
pub struct Env {
    pub bao: Arc<Bao>,
    pub db: TestDb,
    pub pki: Pki,
    pub config: Config,
    pub running: Option<Running>,
    pub addr: std::net::SocketAddr,
}

#[derive(Default)]
pub struct EnvOptions {
    /// Validation; default: the format check (tests store made-up keys).
    pub validation: Option<ValidationConfig>,
    pub clock: Option<Arc<dyn Clock>>,
    pub rotation: RotationConfig,
    pub cache: CacheConfig,
    /// Rate limits; default: none (tests call far faster than a tenant).
    pub limits: Option<credbroker::config::LimitsConfig>,
    /// An OpenBao of its own, for a test that seals, kills or reconfigures
    /// Vault (policies, auth methods); default: the shared one.
    pub own_vault: bool,
}

impl Env {
    pub async fn start() -> Env {
        Self::start_with(EnvOptions::default()).await
    }

    /// An environment whose OpenBao is its own.
    pub async fn start_own_vault() -> Env {
        Self::start_with(EnvOptions {
            own_vault: true,
            ..EnvOptions::default()
        })
        .await
    }

    pub async fn start_with(opts: EnvOptions) -> Env {
        init();
        let bao = async {
            if opts.own_vault {
                Arc::new(Bao::start().await)
            } else {
                Bao::shared().await
            }
        };
        let (bao, db) = tokio::join!(bao, TestDb::create());
        let pki = Pki::new();
        let mut config = backends::config_for(&bao, &db.url(), pki.dir.path(), TD);
        if !opts.own_vault {
            // Every path this environment writes is under its prefix: the
            // retire job's orphan sweep lists the prefix, and must never
            // see another test's secrets.
            config.vault.prefix = format!("t-{}", Uuid::new_v4().simple());
        }
        config.cache = opts.cache;
        config.rotation = opts.rotation;
        if let Some(v) = opts.validation {
            config.validation = v;
        }
        if let Some(l) = opts.limits {
            config.limits = l;
        }
        config.check().unwrap();
        let mut env = Env {
            bao,
            db,
            pki,
            config,
            running: None,
            addr: "127.0.0.1:0".parse().unwrap(),
        };
        env.start_broker(opts.clock).await;
        env
    }

    /// Starts (or restarts) the broker on the current config.
    pub async fn start_broker(&mut self, clock: Option<Arc<dyn Clock>>) {
        let running = self.replica(clock).await;
        self.addr = running.addr;
        self.running = Some(running);
    }

    /// Another broker replica on the same OpenBao and PostgreSQL. Its
    /// retire job runs only when a test calls its passes (no timer races an
    /// assertion).
    pub async fn replica(&self, clock: Option<Arc<dyn Clock>>) -> Running {
        let mut backends = app::real_backends(&self.config).await.unwrap();
        backends.webhook_net = loopback_net();
        self.replica_with(backends, clock).await
    }

    /// A replica on the given backends (a test may wrap the real stores).
    pub async fn replica_with(
        &self,
        backends: app::Backends,
        clock: Option<Arc<dyn Clock>>,
    ) -> Running {
        let mut settings = app::settings(&self.config).unwrap();
        settings.retire = credbroker::rotation::retire::Schedule::Manual;
        // One spool (one chain) per replica.
        settings.audit.spool_dir = self.pki.path(&format!("audit-{}", Uuid::new_v4()));
        if let Some(c) = clock {
            settings.clock = c;
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        app::start(backends, settings, listener).await.unwrap()
    }

    pub fn broker(&self) -> &Arc<credbroker::broker::Broker> {
        &self.running.as_ref().unwrap().broker
    }

    pub async fn stop_broker(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await.unwrap();
        }
    }

    pub fn endpoint(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    /// A client presenting a certificate for `spiffe_id` from the test CA.
    pub async fn client_for(&self, spiffe_id: &str) -> CredentialBrokerClient<Channel> {
        self.client_at(self.addr, spiffe_id).await
    }

    /// A client of the broker at `addr`, presenting a certificate for
    /// `spiffe_id` from the test CA.
    pub async fn client_at(
        &self,
        addr: std::net::SocketAddr,
        spiffe_id: &str,
    ) -> CredentialBrokerClient<Channel> {
        CredentialBrokerClient::new(self.pki.channel(addr, &[spiffe_id]).await)
    }

    pub async fn operator(&self) -> CredentialBrokerClient<Channel> {
        self.client_for(&format!("spiffe://{TD}/operator/test"))
            .await
    }

    /// A new tenant with one Binance key stored (`store_n`): the tenant and
    /// the operator's client that stored it.
    pub async fn stored_tenant(&self) -> (String, CredentialBrokerClient<Channel>) {
        let tenant = new_tenant();
        let mut op = self.operator().await;
        op.validate_and_store(store_n(&tenant, "binance"))
            .await
            .unwrap();
        (tenant, op)
    }

    pub async fn tenant_client(&self, tenant: &str) -> CredentialBrokerClient<Channel> {
        self.client_for(&format!("spiffe://{TD}/tenant/{tenant}/pod/test"))
            .await
    }

    /// Rows in a table, read as the superuser (bypassing RLS).
    pub async fn count(&self, sql: &str) -> i64 {
        let c = self.db.connect().await;
        c.query_one(sql, &[]).await.unwrap().get(0)
    }

    /// The seqs of every committed ROTATED event, in order.
    pub async fn rotated_seqs(&self) -> Vec<u64> {
        let c = self.db.connect().await;
        c.query(
            "SELECT seq FROM credential_events WHERE kind = 'rotated' ORDER BY seq",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| u64::try_from(r.get::<_, i64>(0)).unwrap())
        .collect()
    }

    /// Where a credential's versions live in Vault (under this
    /// environment's prefix).
    pub fn credential_path(&self, tenant: &str, exchange: &str) -> String {
        format!(
            "{}/{tenant}/exchanges/{exchange}/credentials",
            self.config.vault.prefix
        )
    }

    /// KV v2 metadata of a path, as OpenBao reports it.
    pub async fn kv_metadata(&self, path: &str) -> (u16, serde_json::Value) {
        let (code, body) = self
            .bao
            .http("GET", &format!("/v1/secret/metadata/{path}"), None)
            .await
            .unwrap();
        (
            code,
            serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
        )
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown_token().cancel();
        }
    }
}

pub fn set(key: &str, secret: &str) -> credbroker::api::pb::CredentialSet {
    credbroker::api::pb::CredentialSet {
        api_key: key.into(),
        api_secret: secret.into(),
        passphrase: None,
    }
}

/// DescribeCredential's answer for `tenant`'s `exchange`.
pub async fn describe(
    op: &mut CredentialBrokerClient<Channel>,
    tenant: &str,
    exchange: &str,
) -> credbroker::api::pb::CredentialMetadata {
    op.describe_credential(credbroker::api::pb::DescribeCredentialRequest {
        tenant_id: tenant.into(),
        exchange: exchange.into(),
    })
    .await
    .unwrap()
    .into_inner()
}

pub fn new_tenant() -> String {
    Uuid::new_v4().to_string()
}

#[path = "../../common/dev_broker.rs"]
mod dev_broker;
pub use dev_broker::DevBroker;

/// `credbroker server` as a child process on this environment's OpenBao and
/// PostgreSQL, configured by a TOML file plus `CREDBROKER__*` variables.
pub struct ServerProcess {
    pub child: tokio::process::Child,
    pub addr: std::net::SocketAddr,
    /// The plaintext grpc.health.v1 port (`server.health_listen`).
    pub health: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl ServerProcess {
    /// grpc.health.v1's overall status on the plaintext health port (what
    /// the kubelet's probe asks), or the error that stood in for it.
    pub async fn health_status(&self) -> Result<i32, tonic::Status> {
        let channel = Channel::from_shared(format!("http://{}", self.health))
            .unwrap()
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .map(|r| r.into_inner().status)
    }
}

impl Env {
    /// The `credbroker server` binary on this env's Vault and database.
    pub async fn spawn_server_process(&self) -> ServerProcess {
        self.spawn_server_process_on(&self.bao.addr).await
    }

    /// The `credbroker server` binary with Vault at `vault` (a [`Gate`] in
    /// front of this env's OpenBao, say).
    pub async fn spawn_server_process_on(&self, vault: &str) -> ServerProcess {
        use tokio::io::AsyncBufReadExt as _;
        let dir = tempfile::tempdir().unwrap();
        let toml = format!(
            r#"
[server]
listen = "127.0.0.1:0"
health_listen = "127.0.0.1:0"
heartbeat_secs = 1
health_probe_secs = 1

[tls]
cert = "{cert}"
key = "{key}"
client_ca = "{ca}"
trust_domain = "{TD}"

[vault]
addr = "{vault}"
prefix = "{prefix}"
failover_budget_ms = 300
[vault.auth]
method = "token"

[postgres]
url = "{pg}"

[validation]
mode = "format"

[audit]
spool_dir = "{spool}"
ship_ms = 50

# A free loopback port: several server processes may run at once (the
# default, 0.0.0.0:9464, is one per machine).
[telemetry]
metrics_listen = "127.0.0.1:0"
"#,
            cert = self.pki.path("server.pem").display(),
            key = self.pki.path("server.key").display(),
            ca = self.pki.path("ca.pem").display(),
            pg = self.db.url(),
            prefix = self.config.vault.prefix,
            spool = self.pki.path("audit-process").display(),
        );
        let cfg = dir.path().join("credbroker.toml");
        std::fs::write(&cfg, toml).unwrap();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_credbroker"))
            .args(["server", "--config"])
            .arg(&cfg)
            // The secret comes from the environment, not the file.
            .env("CREDBROKER__VAULT__AUTH__TOKEN", &self.bao.token)
            .env("CREDBROKER_LOG_FORMAT", "json")
            .env("CREDBROKER_LOG", "info,rustify=off,vaultrs=off")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let (addr, health) = tokio::time::timeout(Duration::from_secs(30), async {
            let mut health = None;
            while let Some(line) = lines.next_line().await.unwrap() {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                let at = |k: &str| v["fields"][k].as_str().unwrap().parse().unwrap();
                match v["fields"]["message"].as_str() {
                    Some("grpc.health.v1 (plaintext, health only)") => health = Some(at("at")),
                    Some("credbroker listening (mTLS)") => {
                        return (at("addr"), health.expect("health port logged first"));
                    }
                    _ => {}
                }
            }
            panic!("credbroker server exited before listening");
        })
        .await
        .expect("credbroker server did not start within 30 s");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        ServerProcess {
            child,
            addr,
            health,
            _dir: dir,
        }
    }
}

/// A TCP gate on loopback in front of `target`, to take a backend away and
/// give it back: while shut, every connection is accepted and closed at
/// once and the ones open are cut (a backend that is down); while open,
/// bytes flow both ways.
pub struct Gate {
    pub addr: std::net::SocketAddr,
    open: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Gate {
    pub async fn new(target: std::net::SocketAddr, open: bool) -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::watch::channel(open);
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut rx = rx.clone();
                if !*rx.borrow_and_update() {
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut out) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut out) => {}
                        _ = rx.wait_for(|open| !open) => {}
                    }
                });
            }
        });
        Gate {
            addr,
            open: tx,
            task,
        }
    }

    /// A gate in front of an `http://host:port` address.
    pub async fn before(url: &str, open: bool) -> Gate {
        Self::new(url.trim_start_matches("http://").parse().unwrap(), open).await
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn open(&self) {
        self.open.send_replace(true);
    }

    pub fn shut(&self) {
        self.open.send_replace(false);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A webhook receiver on loopback: records every request, answers the
/// first `fail_first` with 503.
#[derive(Clone, Default)]
pub struct Receiver {
    got: Arc<std::sync::Mutex<Vec<(axum::http::HeaderMap, String)>>>,
    fail_first: Arc<std::sync::Mutex<usize>>,
}

impl Receiver {
    /// A receiver set as `tenant`'s webhook endpoint (its first
    /// `fail_first` deliveries refused with 503).
    pub async fn for_tenant(
        op: &mut CredentialBrokerClient<Channel>,
        tenant: &str,
        fail_first: usize,
    ) -> Receiver {
        let (receiver, url) = Receiver::start(fail_first).await;
        op.set_webhook(credbroker::api::pb::SetWebhookRequest {
            tenant_id: tenant.into(),
            url,
            secret: String::new(),
        })
        .await
        .unwrap();
        receiver
    }

    pub async fn start(fail_first: usize) -> (Receiver, String) {
        let r = Receiver::default();
        *r.fail_first.lock().unwrap() = fail_first;
        let state = r.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
                let state = state.clone();
                async move {
                    state.got.lock().unwrap().push((headers, body));
                    let mut f = state.fail_first.lock().unwrap();
                    if *f > 0 {
                        *f -= 1;
                        axum::http::StatusCode::SERVICE_UNAVAILABLE
                    } else {
                        axum::http::StatusCode::NO_CONTENT
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (r, url)
    }

    pub fn requests(&self) -> Vec<(axum::http::HeaderMap, String)> {
        self.got.lock().unwrap().clone()
    }
}

pub fn store_n(tenant: &str, exchange: &str) -> credbroker::api::pb::ValidateAndStoreRequest {
    credbroker::api::pb::ValidateAndStoreRequest {
        tenant_id: tenant.into(),
        exchange: exchange.into(),
        credentials: Some(set(
            &format!("{exchange}Key000000"),
            &format!("{exchange}Secret000000"),
        )),
    }
}

pub fn rotate_n(tenant: &str, exchange: &str, n: u32) -> credbroker::api::pb::RotateRequest {
    rotate_req(
        tenant,
        exchange,
        &format!("{exchange}Key{n:06}"),
        &format!("{exchange}Secret{n:06}"),
        None,
    )
}

pub fn rotate_req(
    tenant: &str,
    exchange: &str,
    key: &str,
    secret: &str,
    overlap: Option<u32>,
) -> credbroker::api::pb::RotateRequest {
    credbroker::api::pb::RotateRequest {
        tenant_id: tenant.into(),
        exchange: exchange.into(),
        credentials: Some(set(key, secret)),
        overlap_seconds: overlap,
        mint: false,
    }
}

pub fn get_req(tenant: &str, exchange: &str) -> credbroker::api::pb::GetCredentialsRequest {
    credbroker::api::pb::GetCredentialsRequest {
        tenant_id: tenant.into(),
        exchange: exchange.into(),
        min_version: 0,
    }
}

pub fn watch_req(tenant: &str, after_seq: u64) -> credbroker::api::pb::WatchRotationsRequest {
    credbroker::api::pb::WatchRotationsRequest {
        tenant_id: tenant.into(),
        exchanges: vec![],
        after_seq,
        include_credentials: false,
    }
}

pub async fn next_non_heartbeat(
    s: &mut tonic::Streaming<credbroker::api::pb::WatchRotationsResponse>,
) -> credbroker::api::pb::watch_rotations_response::Message {
    next_sent(s).await.message.expect("empty message")
}

/// The next message that is not a heartbeat, whole (with the set it
/// carries, if any).
pub async fn next_sent(
    s: &mut tonic::Streaming<credbroker::api::pb::WatchRotationsResponse>,
) -> credbroker::api::pb::WatchRotationsResponse {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), s.message())
            .await
            .expect("no message within 10 s")
            .expect("stream error")
            .expect("stream ended");
        if !matches!(
            m.message,
            Some(credbroker::api::pb::watch_rotations_response::Message::Heartbeat(_))
        ) {
            return m;
        }
    }
}

pub fn store_req(
    tenant: &str,
    exchange: &str,
    key: &str,
    secret: &str,
) -> credbroker::api::pb::ValidateAndStoreRequest {
    credbroker::api::pb::ValidateAndStoreRequest {
        tenant_id: tenant.into(),
        exchange: exchange.into(),
        credentials: Some(set(key, secret)),
    }
}

/// A broker on a private PostgreSQL instance (for tests that stop and
/// start it) and its own OpenBao, with an operator client.
pub struct PrivateEnv {
    pub pg: PrivatePg,
    pub bao: Bao,
    pub pki: Pki,
    pub running: Running,
    pub operator: CredentialBrokerClient<Channel>,
}

impl PrivateEnv {
    pub async fn start() -> PrivateEnv {
        Self::start_with(|_| {}).await
    }

    /// With the configuration changed by `f` first.
    pub async fn start_with(f: impl FnOnce(&mut Config)) -> PrivateEnv {
        init();
        let pg = PrivatePg::start();
        let bao = Bao::start().await;
        let pki = Pki::new();
        let mut config = config_for(&bao, &pg.url(), pki.dir.path(), TD);
        f(&mut config);
        let mut backends = app::real_backends(&config).await.unwrap();
        backends.webhook_net = loopback_net();
        let mut settings = app::settings(&config).unwrap();
        settings.retire = credbroker::rotation::retire::Schedule::Manual;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let running = app::start(backends, settings, listener).await.unwrap();
        let operator = CredentialBrokerClient::new(
            pki.channel(running.addr, &[&format!("spiffe://{TD}/operator/ops")])
                .await,
        );
        PrivateEnv {
            pg,
            bao,
            pki,
            running,
            operator,
        }
    }
}

/// A WatchRotations stream of `tenant` from the start, past its first state
/// message.
pub async fn watch_past_state(
    client: &mut CredentialBrokerClient<Channel>,
    tenant: &str,
) -> tonic::Streaming<credbroker::api::pb::WatchRotationsResponse> {
    let mut s = client
        .watch_rotations(watch_req(tenant, 0))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        next_non_heartbeat(&mut s).await,
        credbroker::api::pb::watch_rotations_response::Message::State(_)
    ));
    s
}

/// Webhook name resolution for tests: every name is 127.0.0.1, so no test
/// sends a DNS query or a packet off loopback (the receivers are there).
pub struct LoopbackResolver;

#[async_trait::async_trait]
impl credbroker::webhook::Resolve for LoopbackResolver {
    async fn resolve(&self, _host: &str, port: u16) -> std::io::Result<Vec<std::net::SocketAddr>> {
        Ok(vec![std::net::SocketAddr::from(([127, 0, 0, 1], port))])
    }
}

/// The tests' webhook network: names resolve to loopback, dials are direct.
pub fn loopback_net() -> credbroker::webhook::WebhookNet {
    credbroker::webhook::WebhookNet {
        resolver: Arc::new(LoopbackResolver),
        connect: Arc::new(credbroker::webhook::DirectConnect),
    }
}
