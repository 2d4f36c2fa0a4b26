//! Validation overhead: what checking a key costs on the broker's side.
//!
//! 1. `ExchangeValidator::validate` against the in-process simulator of each
//!    exchange (two signed loopback HTTP round trips, response parsing,
//!    permission mapping); the simulator's own work is included, so this is
//!    an upper bound on our overhead.
//! 2. Signing alone, per exchange.
//!
//! `cargo bench --bench validation` (`VALIDATION_ITERS` to change the count).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use credbroker::{
    broker::{
        ports::CredentialValidator,
        types::{CredentialSet, ExchangeId, TenantId},
    },
    clock::SystemClock,
    exchange::{
        ExchangeValidator, WithdrawPolicy, signing,
        sim::{CdpPublicKey, SimKey, Simulators, native_permissions},
    },
};
use secrecy::SecretString;

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

fn main() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let quick = !std::env::args().any(|a| a == "--bench");
    let iters: usize = std::env::var("VALIDATION_ITERS")
        .ok()
        .map(|v| v.parse().unwrap())
        .unwrap_or(if quick { 20 } else { 1000 });
    // One thread: client and simulator do not bounce across cores, so the
    // figure is the work, not the scheduler.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!(
        "validation against the simulators ({iters} validations per exchange, {profile} build)"
    );
    println!(
        "{:>10} {:>10} {:>10} {:>10}",
        "exchange", "p50", "p99", "max"
    );
    rt.block_on(async {
        let sims = Simulators::start().await.unwrap();
        let endpoints = sims.endpoints(5000, 1_000_000);
        let v =
            ExchangeValidator::new(&endpoints, WithdrawPolicy::default(), Arc::new(SystemClock))
                .unwrap();
        let tenant: TenantId = "00000000-0000-0000-0000-0000000000be".parse().unwrap();
        for ex in ExchangeId::ALL {
            let (secret, cdp) = match ex {
                ExchangeId::Kraken => (B64.encode("bench-kraken-secret-0123456789"), None),
                ExchangeId::Coinbase => {
                    use aws_lc_rs::{
                        encoding::AsDer as _,
                        signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _},
                    };
                    let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
                    let der = pair.private_key().as_der().unwrap();
                    let pem = format!(
                        "-----BEGIN EC PRIVATE KEY-----\n{}\n-----END EC PRIVATE KEY-----\n",
                        B64.encode(der.as_ref())
                    );
                    (
                        pem,
                        Some(CdpPublicKey::Es256(pair.public_key().as_ref().to_vec())),
                    )
                }
                _ => ("benchSecret0123456789".into(), None),
            };
            let pass =
                matches!(ex, ExchangeId::Okx | ExchangeId::Kucoin).then(|| "bench-pass".to_owned());
            let mut k = SimKey::hmac(&secret, native_permissions(ex, false, true));
            k.passphrase = pass.clone();
            k.cdp_public_key = cdp;
            sims.add_key(ex, "benchKey0123456789", k);
            let set = CredentialSet {
                api_key: "benchKey0123456789".into(),
                api_secret: SecretString::from(secret),
                passphrase: pass.map(SecretString::from),
            };
            // Warm the connection pool.
            v.validate(tenant, ex, &set).await.unwrap();
            let mut lat = Vec::with_capacity(iters);
            for _ in 0..iters {
                let t = Instant::now();
                v.validate(tenant, ex, &set).await.unwrap();
                lat.push(t.elapsed());
            }
            lat.sort();
            println!(
                "{:>10} {:>8.3}ms {:>8.3}ms {:>8.3}ms",
                ex.as_str(),
                pct(&lat, 0.5).as_secs_f64() * 1e3,
                pct(&lat, 0.99).as_secs_f64() * 1e3,
                lat.last().unwrap().as_secs_f64() * 1e3
            );
        }
    });
    let n = if quick { 1_000 } else { 100_000 };
    let per = |f: &dyn Fn()| {
        let t = Instant::now();
        for _ in 0..n {
            f();
        }
        t.elapsed().as_secs_f64() * 1e6 / f64::from(n)
    };
    let kr = B64.encode("bench-kraken-secret-0123456789");
    println!("signing alone (µs per signature, {n} runs)");
    println!(
        "  binance {:.2}",
        per(&|| drop(signing::binance(
            "s3cr3t",
            "timestamp=1700000000000&recvWindow=5000",
            ""
        )))
    );
    println!(
        "  bybit   {:.2}",
        per(&|| drop(signing::bybit(
            "s3cr3t",
            1_700_000_000_000,
            "k",
            5000,
            "accountType=UNIFIED"
        )))
    );
    println!(
        "  okx     {:.2}",
        per(&|| drop(signing::okx(
            "s3cr3t",
            "2023-11-14T22:13:20.000Z",
            "GET",
            "/api/v5/account/balance",
            ""
        )))
    );
    println!(
        "  kraken  {:.2}",
        per(&|| drop(signing::kraken(&kr, "/0/private/Balance", "1", "nonce=1")))
    );
    println!(
        "  kucoin  {:.2}",
        per(&|| drop(signing::kucoin(
            "s3cr3t",
            1_700_000_000_000,
            "GET",
            "/api/v1/accounts",
            ""
        )))
    );
}
