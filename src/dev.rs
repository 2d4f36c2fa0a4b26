//! `credbroker dev`: the whole broker with no external service. Secrets and
//! metadata live in memory behind the same ports as Vault and PostgreSQL; a
//! throw-away CA, server and operator client certificates are written to the
//! dev directory, and grpcurl commands that work as printed are shown.

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use tokio::net::TcpListener;

use crate::{
    app::{self, Backends, EventSource, Settings},
    broker::validate::FormatCheckValidator,
    clock::SystemClock,
    config::{CacheConfig, RotationConfig},
    memstore::{MemoryMetadataStore, MemorySecretStore},
    tls::pki::{DevPki, write_private},
};

/// Trust domain of the dev PKI.
pub const DEV_TRUST_DOMAIN: &str = "credbroker.local";

/// Writes `ca.pem`, `server.pem`/`server.key` and the operator's
/// `client.pem`/`client.key` into `dir`, and returns the server TLS config.
///
/// # Errors
/// On I/O or key generation failure.
pub fn write_dev_pki(dir: &Path) -> anyhow::Result<tonic::transport::ServerTlsConfig> {
    std::fs::create_dir_all(dir)?;
    let pki = DevPki::new("credbroker dev CA")?;
    let server = pki.server(&[])?;
    let client = pki.client(&format!("spiffe://{DEV_TRUST_DOMAIN}/operator/dev"))?;
    std::fs::write(dir.join("ca.pem"), pki.ca_pem())?;
    std::fs::write(dir.join("server.pem"), &server.cert)?;
    write_private(&dir.join("server.key"), &server.key)?;
    std::fs::write(dir.join("client.pem"), &client.cert)?;
    write_private(&dir.join("client.key"), &client.key)?;
    Ok(tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(
            &server.cert,
            &server.key,
        ))
        .client_ca_root(tonic::transport::Certificate::from_pem(pki.ca_pem())))
}

/// The grpcurl commands printed at start-up.
pub fn grpcurl_examples(dir: &Path, addr: SocketAddr) -> String {
    let d = dir.display();
    let target = format!("localhost:{}", addr.port());
    let g = format!("grpcurl -cacert {d}/ca.pem -cert {d}/client.pem -key {d}/client.key");
    let t = "00000000-0000-0000-0000-000000000001";
    format!(
        "credbroker dev is listening on {addr} (mTLS; certificates in {d})\n\
         Secrets and metadata are in memory; validation is the format check only.\n\n\
         List the services:\n  {g} {target} list\n\n\
         Store a key:\n  {g} -d '{{\"tenant_id\":\"{t}\",\"exchange\":\"binance\",\"credentials\":{{\"api_key\":\"demoKey0123456789\",\"api_secret\":\"demoSecret0123456789\"}}}}' {target} credbroker.v1.CredentialBroker/ValidateAndStore\n\n\
         Fetch it:\n  {g} -d '{{\"tenant_id\":\"{t}\",\"exchange\":\"binance\"}}' {target} credbroker.v1.CredentialBroker/GetCredentials\n\n\
         Rotate it (previous set served for 1 hour):\n  {g} -d '{{\"tenant_id\":\"{t}\",\"exchange\":\"binance\",\"credentials\":{{\"api_key\":\"demoKey9876543210\",\"api_secret\":\"demoSecret9876543210\"}}}}' {target} credbroker.v1.CredentialBroker/Rotate\n\n\
         Watch changes:\n  {g} -d '{{\"tenant_id\":\"{t}\"}}' {target} credbroker.v1.CredentialBroker/WatchRotations\n"
    )
}

/// Runs the dev broker until SIGINT/SIGTERM.
///
/// # Errors
/// When the address cannot be bound or the server fails.
pub async fn run(
    listen: SocketAddr,
    dir: &Path,
    max_streams_per_tenant: usize,
) -> anyhow::Result<()> {
    let tls = write_dev_pki(dir)?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("--listen {listen}: cannot bind ({e})"))?;
    let addr = listener.local_addr()?;
    let backends = Backends {
        secrets: Arc::new(MemorySecretStore::default()),
        meta: Arc::new(MemoryMetadataStore::default()),
        validator: Arc::new(FormatCheckValidator),
        vault: None,
        events: EventSource::Local,
    };
    let settings = Settings {
        tls,
        trust_domain: DEV_TRUST_DOMAIN.into(),
        cache: CacheConfig::default(),
        rotation: RotationConfig::default(),
        path_prefix: "tenants".into(),
        heartbeat: Duration::from_secs(5),
        health_probe: Duration::from_secs(5),
        max_streams_per_tenant: max_streams_per_tenant.max(1),
        grace: Duration::from_secs(5),
        clock: Arc::new(SystemClock),
    };
    let running = app::start(backends, settings, listener).await?;
    println!("{}", grpcurl_examples(dir, addr));
    let token = running.shutdown_token();
    tokio::spawn(async move {
        crate::app::shutdown_signal().await;
        token.cancel();
    });
    running.wait().await
}
