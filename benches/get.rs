//! GetCredentials latency from the L1 cache: what a trading pod waits for on
//! the hot path (target from the epic: under 5 ms p99 from cache).
//!
//! Starts `credbroker dev` (in-memory stores; the cache makes the store
//! irrelevant after the first call) as its own process and calls
//! GetCredentials over one mTLS connection from `CONCURRENCY` tasks.
//!
//! `cargo bench --bench get` (`GET_CALLS`, `GET_CONCURRENCY` to change).

#![allow(clippy::unwrap_used, clippy::expect_used)]

/// The broker binary's allocator, so in-process figures match it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "../tests/common/dev_broker.rs"]
mod dev_broker;

use std::time::{Duration, Instant};

use credbroker::api::pb::{self, credential_broker_client::CredentialBrokerClient};
use dev_broker::DevBroker;

const TENANT: &str = "00000000-0000-0000-0000-00000000cafe";

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

fn main() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let quick = !std::env::args().any(|a| a == "--bench");
    let env = |k: &str, d: usize| std::env::var(k).ok().map_or(d, |v| v.parse().unwrap());
    let calls = env("GET_CALLS", if quick { 200 } else { 50_000 });
    let concurrency = env("GET_CONCURRENCY", if quick { 4 } else { 16 });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let dev = DevBroker::spawn_with(&["--validation", "format"]).await;
        let ch = dev.channel().await;
        dev.store(TENANT, "binance", "benchKey00000000", "benchSecret00000000").await;
        let mut c = CredentialBrokerClient::new(ch.clone());
        let req = pb::GetCredentialsRequest {
            tenant_id: TENANT.into(),
            exchange: "binance".into(),
            min_version: 0,
        };
        c.get_credentials(req.clone()).await.unwrap();
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..concurrency {
            let (mut c, req) = (CredentialBrokerClient::new(ch.clone()), req.clone());
            let n = calls / concurrency;
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::with_capacity(n);
                for _ in 0..n {
                    let t = Instant::now();
                    c.get_credentials(req.clone()).await.unwrap();
                    lat.push(t.elapsed());
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
        let profile = if cfg!(debug_assertions) { "debug" } else { "release" };
        println!("GetCredentials from cache over mTLS ({} calls, {concurrency} concurrent, {profile} build)", lat.len());
        println!(
            "p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms  throughput {:.0} calls/s",
            pct(&lat, 0.5).as_secs_f64() * 1e3,
            pct(&lat, 0.99).as_secs_f64() * 1e3,
            lat.last().unwrap().as_secs_f64() * 1e3,
            lat.len() as f64 / elapsed.as_secs_f64()
        );
        drop(dev);
    });
}
