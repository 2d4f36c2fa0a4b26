//! The GetCredentials miss, next to what it is made of: a direct OpenBao
//! KV v2 read of the same secret, and the broker's cold read (one PostgreSQL
//! round trip, then Vault) in-process and over mTLS. The cache holds one
//! entry and the callers read `CREDENTIALS` distinct credentials at random,
//! so every broker call is a miss. Target: a miss costs no more than a
//! direct Vault read plus 1 ms.
//!
//! Needs OpenBao (`BAO_BIN`) and the local PostgreSQL, as the tests do.
//! `cargo bench --bench cold` (`COLD_CALLS`, `COLD_CONCURRENCY`,
//! `COLD_CREDENTIALS` to change).

#![allow(clippy::unwrap_used, clippy::expect_used)]

/// The broker binary's allocator, so in-process figures match it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "../tests/common/backends.rs"]
mod backends;

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use backends::{Bao, Pki, TD, TestDb, config_for};
use credbroker::{
    api::pb::{self, credential_broker_client::CredentialBrokerClient},
    app,
    broker::{
        context::RequestContext,
        ports::SecretStore as _,
        types::{CredentialSet, ExchangeId, TenantId},
    },
    vault::VaultSecretStore,
};
use secrecy::SecretString;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

/// Runs `calls` calls of `f(i)` from `concurrency` tasks and prints p50,
/// p99 and throughput under `label`.
async fn measure<F, Fut>(label: &str, calls: usize, concurrency: usize, f: F)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let f = Arc::new(f);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let f = f.clone();
        let n = calls / concurrency;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(n);
            for i in 0..n {
                let at = Instant::now();
                f(t * n + i).await;
                lat.push(at.elapsed());
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed();
    lat.sort();
    println!(
        "{label:<34} p50 {:>7.3} ms  p99 {:>7.3} ms  {:>6.0} reads/s",
        pct(&lat, 0.5).as_secs_f64() * 1e3,
        pct(&lat, 0.99).as_secs_f64() * 1e3,
        lat.len() as f64 / elapsed.as_secs_f64()
    );
}

fn main() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let quick = !std::env::args().any(|a| a == "--bench");
    let env = |k: &str, d: usize| std::env::var(k).ok().map_or(d, |v| v.parse().unwrap());
    let calls = env("COLD_CALLS", if quick { 64 } else { 8_000 });
    let concurrency = env("COLD_CONCURRENCY", if quick { 4 } else { 16 });
    let credentials = env("COLD_CREDENTIALS", if quick { 64 } else { 1_000 });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (bao, db) = tokio::join!(Bao::start(), TestDb::create());
        let pki = Pki::new();
        let mut config = config_for(&bao, &db.url(), pki.dir.path(), TD);
        // One entry: every read of another credential is a miss.
        config.cache.capacity = 1;
        config.postgres.pool_size = concurrency.max(4);
        let backends = app::real_backends(&config).await.unwrap();
        let settings = app::settings(&config).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let running = app::start(backends, settings, listener).await.unwrap();
        let broker = running.broker.clone();

        let tenants: Arc<Vec<TenantId>> =
            Arc::new((0..credentials).map(|_| TenantId::new(uuid::Uuid::new_v4())).collect());
        for (i, t) in tenants.iter().enumerate() {
            let set = CredentialSet {
                api_key: format!("benchKey{i:010}"),
                api_secret: SecretString::from(format!("benchSecret{i:010}")),
                passphrase: None,
            };
            broker.validate_and_store(&RequestContext::system("test"), *t, ExchangeId::Binance, set).await.unwrap();
        }
        // Uniformly random: concurrent callers rarely ask for the same key,
        // so single flight does not flatter the broker's figures.
        let pick = {
            let tenants = tenants.clone();
            move |_: usize| tenants[rand::random_range(0..tenants.len())]
        };
        let profile = if cfg!(debug_assertions) { "debug" } else { "release" };
        println!(
            "GetCredentials miss vs direct Vault read ({calls} calls, {concurrency} concurrent, {credentials} credentials, {profile} build)"
        );

        let vault = Arc::new(VaultSecretStore::connect(&config.vault).await.unwrap());
        {
            let (vault, broker, pick) = (vault.clone(), broker.clone(), pick.clone());
            measure("direct OpenBao KV v2 read", calls, concurrency, move |i| {
                let (vault, path) = (vault.clone(), broker.vault_path(pick(i), ExchangeId::Binance));
                async move {
                    vault.read(&path, 1).await.unwrap();
                }
            })
            .await;
        }
        {
            let (broker, pick) = (broker.clone(), pick.clone());
            measure("broker miss, in-process", calls, concurrency, move |i| {
                let (broker, t) = (broker.clone(), pick(i));
                async move {
                    broker.get_credentials(t, ExchangeId::Binance, 0).await.unwrap();
                }
            })
            .await;
        }
        let pair = pki.ca.client(&format!("spiffe://{TD}/operator/bench")).unwrap();
        let ch = Channel::from_shared(format!("https://localhost:{}", running.addr.port()))
            .unwrap()
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(pki.ca.ca_pem()))
                    .identity(Identity::from_pem(pair.cert, pair.key))
                    .domain_name("localhost"),
            )
            .unwrap()
            .connect()
            .await
            .unwrap();
        {
            let pick = pick.clone();
            measure("broker miss, GetCredentials/mTLS", calls, concurrency, move |i| {
                let mut c = CredentialBrokerClient::new(ch.clone());
                let req = pb::GetCredentialsRequest {
                    tenant_id: pick(i).to_string(),
                    exchange: "binance".into(),
                    min_version: 0,
                };
                async move {
                    c.get_credentials(req).await.unwrap();
                }
            })
            .await;
        }
        let stats = broker.cache_stats();
        println!("cache: {stats:?}");
        // 2 x calls broker calls; concurrent picks of one key coalesce.
        assert!(stats.loads as usize > calls, "most broker calls were misses: {stats:?}");
        running.stop().await.unwrap();
        drop((bao, db));
    });
}
