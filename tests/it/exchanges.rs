//! Validation against the exchange simulators: full ValidateAndStore over
//! mTLS, real OpenBao and PostgreSQL, for every exchange and every outcome
//! of the error taxonomy.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use credbroker::{
    api::pb::{self, CredentialStatus},
    broker::{
        error::ValidationError,
        ports::CredentialValidator,
        types::{CredentialSet, ExchangeId, TenantId},
    },
    clock::ManualClock,
    config::{ValidationConfig, ValidationMode},
    exchange::{
        ExchangeEndpoint, ExchangeValidator, WithdrawPolicy,
        sim::{CdpPublicKey, Fault, SimKey, Simulators, native_permissions},
    },
};
use secrecy::SecretString;
use tonic::Code;

use crate::support::{Env, EnvOptions, new_tenant};

pub(crate) fn endpoints(sims: &Simulators) -> BTreeMap<ExchangeId, ExchangeEndpoint> {
    sims.endpoints(1000, 10_000)
}

async fn env_with(sims: &Simulators, allow_withdraw: Vec<uuid::Uuid>) -> Env {
    Env::start_with(EnvOptions {
        validation: Some(ValidationConfig {
            mode: ValidationMode::Exchange,
            allow_withdraw_tenants: allow_withdraw,
            exchanges: endpoints(sims),
            ..ValidationConfig::default()
        }),
        ..EnvOptions::default()
    })
    .await
}

/// A key per exchange in the exchange's own shape, registered in the
/// simulator: (api_key, api_secret, passphrase).
pub(crate) fn register(
    sims: &Simulators,
    ex: ExchangeId,
    tag: &str,
    withdraw: bool,
) -> (String, String, Option<String>) {
    let perms = native_permissions(ex, withdraw, true);
    let (key, secret, pass, cdp) = match ex {
        ExchangeId::Binance => (
            format!("bnKey{tag}0000000000"),
            format!("bnSecret{tag}000000000"),
            None,
            None,
        ),
        ExchangeId::Bybit => (
            format!("byKey{tag}000000"),
            format!("bySecret{tag}00000000"),
            None,
            None,
        ),
        ExchangeId::Okx => (
            format!("okx-key-{tag}"),
            format!("okx-secret-{tag}"),
            Some(format!("pass-{tag}")),
            None,
        ),
        ExchangeId::Kraken => (
            format!("krKey{tag}000000"),
            B64.encode(format!("kraken-secret-{tag}-0123456789abcdef")),
            None,
            None,
        ),
        ExchangeId::Kucoin => (
            format!("kcKey{tag}000000"),
            format!("kc-secret-{tag}"),
            Some(format!("kc-pass-{tag}")),
            None,
        ),
        ExchangeId::Coinbase => {
            let (pem, public) = ec_key();
            (
                format!("organizations/org/apiKeys/{tag}"),
                pem,
                None,
                Some(CdpPublicKey::Es256(public)),
            )
        }
    };
    let mut k = SimKey::hmac(&secret, perms);
    k.passphrase = pass.clone();
    k.cdp_public_key = cdp;
    sims.add_key(ex, &key, k);
    (key, secret, pass)
}

/// A fresh P-256 key as Coinbase hands it out (SEC1 PEM), and its public point.
fn ec_key() -> (String, Vec<u8>) {
    use aws_lc_rs::{
        encoding::AsDer as _,
        signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _},
    };
    let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
    let sec1 = pair.private_key().as_der().unwrap();
    let b64 = B64.encode(sec1.as_ref());
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    let pem = format!(
        "-----BEGIN EC PRIVATE KEY-----\n{}\n-----END EC PRIVATE KEY-----\n",
        lines.join("\n")
    );
    (pem, pair.public_key().as_ref().to_vec())
}

/// A fresh Ed25519 key as base64(seed‖public), and its public key.
fn ed_key() -> (String, Vec<u8>) {
    use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair as _};
    let seed: [u8; 32] = rand::random();
    let pair = Ed25519KeyPair::from_seed_unchecked(&seed).unwrap();
    let public = pair.public_key().as_ref().to_vec();
    let mut raw = seed.to_vec();
    raw.extend_from_slice(&public);
    (B64.encode(raw), public)
}

pub(crate) fn store_req(
    tenant: &str,
    ex: ExchangeId,
    key: &str,
    secret: &str,
    pass: Option<&str>,
) -> pb::ValidateAndStoreRequest {
    pb::ValidateAndStoreRequest {
        tenant_id: tenant.into(),
        exchange: ex.as_str().into(),
        credentials: Some(pb::CredentialSet {
            api_key: key.into(),
            api_secret: secret.into(),
            passphrase: pass.map(str::to_owned),
        }),
    }
}

async fn assert_nothing_stored(env: &Env, tenant: &str, ex: ExchangeId) {
    let rows = env
        .db
        .connect()
        .await
        .query_one(
            "SELECT count(*) FROM tenant_credentials WHERE tenant_id = $1::text::uuid AND exchange = $2",
            &[&tenant, &ex.as_str()],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(rows, 0, "{ex}: a row was stored");
    let (code, _) = env
        .kv_metadata(&env.credential_path(tenant, ex.as_str()))
        .await;
    assert_eq!(code, 404, "{ex}: a secret reached Vault");
}

#[tokio::test]
async fn every_exchange_accepts_a_good_key_and_reports_its_permissions() {
    let sims = Simulators::start().await.unwrap();
    let env = env_with(&sims, vec![]).await;
    let tenant = new_tenant();
    let mut c = env.operator().await;
    for ex in ExchangeId::ALL {
        let (key, secret, pass) = register(&sims, ex, "good", false);
        let stored = c
            .validate_and_store(store_req(&tenant, ex, &key, &secret, pass.as_deref()))
            .await
            .unwrap_or_else(|e| panic!("{ex}: {e:?}"))
            .into_inner()
            .credential
            .unwrap();
        let p = stored.permissions.unwrap();
        assert!(p.read && p.trade && !p.withdraw, "{ex}: {p:?}");
        // Coinbase does not report IP binding; the others do.
        assert_eq!(p.ip_restricted, ex != ExchangeId::Coinbase, "{ex}: {p:?}");
        assert_eq!(stored.status, CredentialStatus::Active as i32);
    }
    // Coinbase Ed25519 (EdDSA) keys too.
    let (secret, public) = ed_key();
    let mut k = SimKey::hmac("", native_permissions(ExchangeId::Coinbase, false, false));
    k.cdp_public_key = Some(CdpPublicKey::EdDsa(public));
    sims.add_key(ExchangeId::Coinbase, "organizations/org/apiKeys/ed", k);
    let other = new_tenant();
    c.validate_and_store(store_req(
        &other,
        ExchangeId::Coinbase,
        "organizations/org/apiKeys/ed",
        &secret,
        None,
    ))
    .await
    .unwrap();
}

#[tokio::test]
async fn refused_keys_are_rejected_with_the_exchange_code_and_nothing_is_stored() {
    let sims = Simulators::start().await.unwrap();
    let env = env_with(&sims, vec![]).await;
    let mut c = env.operator().await;
    let tenant = new_tenant();
    for ex in ExchangeId::ALL {
        let (key, secret, pass) = register(&sims, ex, "bad", false);
        // Wrong secret (same shape, different value).
        let wrong = match ex {
            ExchangeId::Kraken => B64.encode("a different kraken secret value!!"),
            ExchangeId::Coinbase => ec_key().0,
            _ => format!("{}x", &secret[..secret.len() - 1]),
        };
        let e = c
            .validate_and_store(store_req(&tenant, ex, &key, &wrong, pass.as_deref()))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{ex}: {e:?}");
        assert!(
            !e.message().contains(&wrong) && !e.message().contains(&secret),
            "{ex}: secret echoed"
        );
        if ex != ExchangeId::Coinbase {
            assert!(
                e.message().contains("secret is wrong"),
                "{ex}: {}",
                e.message()
            );
        }
        // Unknown key.
        let e = c
            .validate_and_store(store_req(
                &tenant,
                ex,
                &format!("{key}zz"),
                &secret,
                pass.as_deref(),
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{ex}: {e:?}");
        assert_nothing_stored(&env, &tenant, ex).await;
    }
    // Wrong passphrase.
    for ex in [ExchangeId::Okx, ExchangeId::Kucoin] {
        let (key, secret, _) = register(&sims, ex, "pp", false);
        let e = c
            .validate_and_store(store_req(
                &tenant,
                ex,
                &key,
                &secret,
                Some("not-the-passphrase"),
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{ex}: {e:?}");
        assert!(e.message().contains("passphrase"), "{ex}: {}", e.message());
        assert_nothing_stored(&env, &tenant, ex).await;
    }
    // The broker's IP is not on the key's allow-list.
    for ex in [
        ExchangeId::Binance,
        ExchangeId::Bybit,
        ExchangeId::Okx,
        ExchangeId::Kucoin,
    ] {
        let (key, secret, pass) = register(&sims, ex, "ip", false);
        sims.update_key(ex, &key, |k| k.ip_allowed = false);
        let e = c
            .validate_and_store(store_req(&tenant, ex, &key, &secret, pass.as_deref()))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{ex}: {e:?}");
        assert!(
            e.message().contains("IP") || e.message().contains("permission"),
            "{ex}: {}",
            e.message()
        );
        assert_nothing_stored(&env, &tenant, ex).await;
    }
}

#[tokio::test]
async fn withdrawal_keys_are_refused_unless_the_tenant_is_allowed() {
    let sims = Simulators::start().await.unwrap();
    let allowed = uuid::Uuid::new_v4();
    let env = env_with(&sims, vec![allowed]).await;
    let mut c = env.operator().await;
    let tenant = new_tenant();
    for ex in ExchangeId::ALL {
        let (key, secret, pass) = register(&sims, ex, "wd", true);
        let e = c
            .validate_and_store(store_req(&tenant, ex, &key, &secret, pass.as_deref()))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{ex}: {e:?}");
        assert!(e.message().contains("withdraw"), "{ex}: {}", e.message());
        assert_nothing_stored(&env, &tenant, ex).await;
        let ok = c
            .validate_and_store(store_req(
                &allowed.to_string(),
                ex,
                &key,
                &secret,
                pass.as_deref(),
            ))
            .await
            .unwrap_or_else(|e| panic!("{ex}: {e:?}"))
            .into_inner();
        assert!(ok.credential.unwrap().permissions.unwrap().withdraw, "{ex}");
    }
}

#[tokio::test]
async fn exchange_outages_are_unavailable_and_store_nothing() {
    let sims = Simulators::start().await.unwrap();
    let env = env_with(&sims, vec![]).await;
    let mut c = env.operator().await;
    let tenant = new_tenant();
    for (fault, what) in [
        (Fault::ServerError, "HTTP 503"),
        (Fault::Slow(Duration::from_millis(2500)), "no answer within"),
        (Fault::RateLimited, "rate limited"),
    ] {
        for ex in ExchangeId::ALL {
            let (key, secret, pass) = register(&sims, ex, "down", false);
            sims.update_key(ex, &key, |k| k.fault = fault);
            let e = c
                .validate_and_store(store_req(&tenant, ex, &key, &secret, pass.as_deref()))
                .await
                .unwrap_err();
            assert_eq!(e.code(), Code::Unavailable, "{ex} {fault:?}: {e:?}");
            assert!(
                e.message().contains(what) && e.message().contains("retry"),
                "{ex} {fault:?}: {}",
                e.message()
            );
            assert_nothing_stored(&env, &tenant, ex).await;
        }
    }
}

#[tokio::test]
async fn revalidation_marks_a_revoked_key_invalid_but_never_on_an_outage() {
    let sims = Simulators::start().await.unwrap();
    let env = env_with(&sims, vec![]).await;
    let mut c = env.operator().await;
    let tenant = new_tenant();
    let ex = ExchangeId::Bybit;
    let (key, secret, _) = register(&sims, ex, "rv", false);
    c.validate_and_store(store_req(&tenant, ex, &key, &secret, None))
        .await
        .unwrap();
    let req = pb::ValidateCredentialsRequest {
        tenant_id: tenant.clone(),
        exchange: "bybit".into(),
    };
    let h = c
        .validate_credentials(req.clone())
        .await
        .unwrap()
        .into_inner()
        .health
        .unwrap();
    assert_eq!(
        (h.status.as_str(), h.credential_status),
        ("healthy", CredentialStatus::Active as i32)
    );

    // The exchange is down: UNAVAILABLE, and the key stays active.
    sims.update_key(ex, &key, |k| k.fault = Fault::ServerError);
    let e = c.validate_credentials(req.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    let h = c
        .get_credential_health(pb::GetCredentialHealthRequest {
            tenant_id: tenant.clone(),
            exchange: "bybit".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.credential_status, CredentialStatus::Active as i32);

    // The key was revoked on the exchange: invalid, with an INVALIDATED event.
    sims.update_key(ex, &key, |k| {
        k.fault = Fault::None;
        k.secret = "rotatedElsewhere000000".into();
    });
    let h = c
        .validate_credentials(req)
        .await
        .unwrap()
        .into_inner()
        .health
        .unwrap();
    assert_eq!(
        (h.status.as_str(), h.credential_status),
        ("unhealthy", CredentialStatus::Invalid as i32)
    );
    assert!(h.detail.contains("10004"), "{}", h.detail);
    assert_eq!(
        env.count("SELECT count(*) FROM credential_events WHERE kind = 'invalidated'")
            .await,
        1
    );
}

#[tokio::test]
async fn the_client_side_budget_protects_the_brokers_ip() {
    let sims = Simulators::start().await.unwrap();
    // Two signed requests a minute: exactly one Binance validation.
    let v = ExchangeValidator::new(
        &sims.endpoints(1000, 2),
        WithdrawPolicy::default(),
        Arc::new(credbroker::clock::SystemClock),
    )
    .unwrap();
    let (key, secret, _) = register(&sims, ExchangeId::Binance, "budget", false);
    let set = CredentialSet {
        api_key: key,
        api_secret: SecretString::from(secret),
        passphrase: None,
    };
    let tenant: TenantId = new_tenant().parse().unwrap();
    v.validate(tenant, ExchangeId::Binance, &set).await.unwrap();
    match v.validate(tenant, ExchangeId::Binance, &set).await {
        Err(ValidationError::Unavailable { reason, .. }) => {
            assert!(reason.contains("budget"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // Other exchanges have their own budget.
    let (key, secret, _) = register(&sims, ExchangeId::Bybit, "budget", false);
    let set = CredentialSet {
        api_key: key,
        api_secret: SecretString::from(secret),
        passphrase: None,
    };
    v.validate(tenant, ExchangeId::Bybit, &set).await.unwrap();
}

#[tokio::test]
async fn a_skewed_broker_clock_is_reported_as_such() {
    let sims = Simulators::start().await.unwrap();
    let clock = ManualClock::new(time::OffsetDateTime::now_utc() - time::Duration::seconds(90));
    let v = ExchangeValidator::new(
        &endpoints(&sims),
        WithdrawPolicy::default(),
        Arc::new(clock),
    )
    .unwrap();
    let tenant: TenantId = new_tenant().parse().unwrap();
    for ex in [
        ExchangeId::Binance,
        ExchangeId::Bybit,
        ExchangeId::Okx,
        ExchangeId::Kucoin,
    ] {
        let (key, secret, pass) = register(&sims, ex, "skew", false);
        let set = CredentialSet {
            api_key: key,
            api_secret: SecretString::from(secret),
            passphrase: pass.map(SecretString::from),
        };
        match v.validate(tenant, ex, &set).await {
            Err(ValidationError::Rejected { reason, .. }) => {
                assert!(reason.contains("clock"), "{ex}: {reason}")
            }
            other => panic!("{ex}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn malformed_exchange_keys_fail_before_any_request() {
    let sims = Simulators::start().await.unwrap();
    let env = env_with(&sims, vec![]).await;
    let mut c = env.operator().await;
    let tenant = new_tenant();
    for (ex, key, secret, field) in [
        (
            ExchangeId::Kraken,
            "krKey0000000",
            "not base64 at all!",
            "credentials.api_secret",
        ),
        (
            ExchangeId::Coinbase,
            "organizations/o/apiKeys/k",
            "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n",
            "credentials.api_secret",
        ),
        (
            ExchangeId::Binance,
            "bn-key-with-dashes",
            "secret0000000",
            "credentials.api_key",
        ),
    ] {
        // Make the simulator fail loudly if it is asked at all.
        sims.add_key(ex, key, {
            let mut k = SimKey::hmac(secret, native_permissions(ex, false, true));
            k.fault = Fault::ServerError;
            k
        });
        let e = c
            .validate_and_store(store_req(&tenant, ex, key, secret, None))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{ex}: {e:?}");
        assert!(e.message().starts_with(field), "{ex}: {}", e.message());
    }
}

/// A `MakeWriter` that appends to a shared buffer.
#[derive(Clone, Default)]
struct Capture(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 24, .. proptest::prelude::ProptestConfig::default() })]

    /// Whatever the secret, a rejected key's error and every log line at
    /// TRACE level (ours, reqwest's, hyper's) never contain it.
    #[test]
    fn no_error_or_log_line_contains_the_secret(secret in "[A-Za-z0-9]{16,48}", ex_idx in 0usize..4) {
        let ex = [ExchangeId::Binance, ExchangeId::Bybit, ExchangeId::Okx, ExchangeId::Kucoin][ex_idx];
        let capture = Capture::default();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(capture.clone())
            .finish();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let err = tracing::subscriber::with_default(subscriber, || {
            rt.block_on(async {
                let sims = Simulators::start().await.unwrap();
                let (key, _, pass) = register(&sims, ex, "prop", false);
                let v = ExchangeValidator::new(&endpoints(&sims), WithdrawPolicy::default(), Arc::new(credbroker::clock::SystemClock)).unwrap();
                let set = CredentialSet {
                    api_key: key,
                    api_secret: SecretString::from(secret.clone()),
                    passphrase: pass.map(SecretString::from),
                };
                tracing::debug!(?set, "validating");
                v.validate(new_tenant().parse().unwrap(), ex, &set).await.unwrap_err()
            })
        });
        let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
        proptest::prop_assert!(matches!(err, ValidationError::Rejected { .. }), "{:?}", err);
        proptest::prop_assert!(!err.to_string().contains(&secret));
        let debug = format!("{:?}", err);
        proptest::prop_assert!(!debug.contains(&secret));
        proptest::prop_assert!(!logs.contains(&secret), "secret in logs");
        proptest::prop_assert!(logs.contains("validating"), "the capture saw nothing");
    }
}

/// A loopback stand-in for a proxy or a misrouted request: answers every
/// request with `response` and records the request paths.
async fn impostor(response: &'static str) -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let paths = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = paths.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                if let Some(path) = head.split_whitespace().nth(1) {
                    seen.lock().unwrap().push(path.to_owned());
                }
                let _ = s.write_all(response.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (format!("http://{addr}"), paths)
}

/// Only the exchange itself may refuse a key: a proxy's 404, an HTML 502 or
/// 403, an empty or cut-off 200, a body of the wrong shape, an auth proxy's
/// 401 — on every exchange, each is UNAVAILABLE ("no usable answer"), never
/// a refusal.
#[tokio::test]
async fn only_the_exchange_itself_may_refuse_a_key() {
    let sims = Simulators::start().await.unwrap();
    const NON_ANSWERS: [(&str, &str); 7] = [
        (
            "proxy 404",
            "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 21\r\nconnection: close\r\n\r\n{\"error\":\"not found\"}",
        ),
        (
            "HTML 502",
            "HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/html\r\ncontent-length: 13\r\nconnection: close\r\n\r\n<html></html>",
        ),
        (
            "HTML 403",
            "HTTP/1.1 403 Forbidden\r\ncontent-type: text/html\r\ncontent-length: 13\r\nconnection: close\r\n\r\n<html></html>",
        ),
        (
            "empty 200",
            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        ),
        (
            "truncated JSON",
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 8\r\nconnection: close\r\n\r\n{\"code\":",
        ),
        (
            "wrong shape",
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\nconnection: close\r\n\r\n{\"ok\":true}",
        ),
        (
            "auth proxy 401",
            "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: 26\r\nconnection: close\r\n\r\n{\"message\":\"unauthorized\"}",
        ),
    ];
    let tenant: TenantId = new_tenant().parse().unwrap();
    for (what, response) in NON_ANSWERS {
        let (base, _) = impostor(response).await;
        let endpoints: BTreeMap<ExchangeId, ExchangeEndpoint> = ExchangeId::ALL
            .into_iter()
            .map(|ex| {
                let mut ep = ExchangeEndpoint::mainnet(ex);
                ep.base_url = base.clone();
                ep.timeout_ms = 2000;
                (ex, ep)
            })
            .collect();
        let v = ExchangeValidator::new(
            &endpoints,
            WithdrawPolicy::default(),
            Arc::new(credbroker::clock::SystemClock),
        )
        .unwrap();
        for ex in ExchangeId::ALL {
            let (key, secret, pass) = register(&sims, ex, "impostor", false);
            let set = CredentialSet {
                api_key: key,
                api_secret: SecretString::from(secret),
                passphrase: pass.map(SecretString::from),
            };
            match v.validate(tenant, ex, &set).await {
                Err(ValidationError::Unavailable { .. }) => {}
                other => panic!("{what} on {ex}: {other:?}"),
            }
        }
    }
}

/// A base URL with a path keeps it in front of every request; one that
/// cannot work stops start-up naming the key.
#[tokio::test]
async fn base_url_paths_are_kept_and_bad_base_urls_refused() {
    let (base, paths) =
        impostor("HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            .await;
    let mut endpoints = BTreeMap::new();
    let mut ep = ExchangeEndpoint::mainnet(ExchangeId::Binance);
    ep.base_url = format!("{base}/gateway/binance");
    endpoints.insert(ExchangeId::Binance, ep);
    let v = ExchangeValidator::new(
        &endpoints,
        WithdrawPolicy::default(),
        Arc::new(credbroker::clock::SystemClock),
    )
    .unwrap();
    let set = CredentialSet {
        api_key: "bnKeyPath0000000000".into(),
        api_secret: SecretString::from("bnSecretPath000000000"),
        passphrase: None,
    };
    let tenant: TenantId = new_tenant().parse().unwrap();
    assert!(v.validate(tenant, ExchangeId::Binance, &set).await.is_err());
    let seen = paths.lock().unwrap().clone();
    assert!(
        seen.first()
            .is_some_and(|p| p.starts_with("/gateway/binance/api/v3/account?")),
        "{seen:?}"
    );
    for bad in [
        "ftp://host/x",
        "https://user:pw@host",
        "https://host/?q=1",
        "https://host/#f",
        "not a url",
    ] {
        let mut endpoints = BTreeMap::new();
        let mut ep = ExchangeEndpoint::mainnet(ExchangeId::Kraken);
        ep.base_url = bad.into();
        endpoints.insert(ExchangeId::Kraken, ep);
        let e = ExchangeValidator::new(
            &endpoints,
            WithdrawPolicy::default(),
            Arc::new(credbroker::clock::SystemClock),
        )
        .err()
        .unwrap_or_else(|| panic!("{bad} accepted"));
        assert!(e.contains("exchanges.kraken.base_url"), "{e}");
    }
}

/// Per-tenant required permissions: a read-only key is refused where
/// trading is required, naming the missing permission.
#[tokio::test]
async fn required_permissions_are_enforced_per_tenant() {
    let sims = Simulators::start().await.unwrap();
    let trading: TenantId = new_tenant().parse().unwrap();
    let other: TenantId = new_tenant().parse().unwrap();
    let mut required_by_tenant = BTreeMap::new();
    required_by_tenant.insert(
        trading,
        vec![
            credbroker::exchange::RequiredPermission::Read,
            credbroker::exchange::RequiredPermission::Trade,
        ],
    );
    let policy = WithdrawPolicy {
        required: vec![credbroker::exchange::RequiredPermission::Read],
        required_by_tenant,
        ..WithdrawPolicy::default()
    };
    let v = ExchangeValidator::new(
        &endpoints(&sims),
        policy,
        Arc::new(credbroker::clock::SystemClock),
    )
    .unwrap();
    // A Coinbase key that can view but not trade.
    let (key, secret, _) = register(&sims, ExchangeId::Coinbase, "readonly", false);
    sims.update_key(ExchangeId::Coinbase, &key, |k| {
        k.permissions =
            serde_json::json!({"can_view": true, "can_trade": false, "can_transfer": false});
    });
    let set = CredentialSet {
        api_key: key,
        api_secret: SecretString::from(secret),
        passphrase: None,
    };
    match v.validate(trading, ExchangeId::Coinbase, &set).await {
        Err(ValidationError::Rejected { code, reason, .. }) => {
            assert_eq!(code.as_deref(), Some("missing_permission"));
            assert!(reason.contains("`trade`"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        v.validate(other, ExchangeId::Coinbase, &set).await.is_ok(),
        "read is enough elsewhere"
    );
}

/// Binance's `/api/v3/account` reports the *account's* flags: `canWithdraw`
/// is true for a read-only key on any account that may withdraw. Only
/// `/sapi/v1/account/apiRestrictions` says what the key itself may do.
#[tokio::test]
async fn binance_keys_are_judged_by_their_restrictions_not_the_accounts_flags() {
    let sims = Simulators::start().await.unwrap();
    let v = ExchangeValidator::new(
        &endpoints(&sims),
        WithdrawPolicy::default(),
        Arc::new(credbroker::clock::SystemClock),
    )
    .unwrap();
    let tenant: TenantId = new_tenant().parse().unwrap();
    let restrict = |key: &str, trade: bool, withdraw: bool| {
        sims.update_key(ExchangeId::Binance, key, |k| {
            k.permissions["enableSpotAndMarginTrading"] = serde_json::json!(trade);
            k.permissions["enableWithdrawals"] = serde_json::json!(withdraw);
        });
    };
    let set = |key: String, secret: String| CredentialSet {
        api_key: key,
        api_secret: SecretString::from(secret),
        passphrase: None,
    };

    // The premise, asked of the simulator the way a client would: the
    // account's flags are all true whatever the key may do.
    let (ro_key, ro_secret, _) = register(&sims, ExchangeId::Binance, "readonly", false);
    restrict(&ro_key, false, false);
    let query = format!(
        "timestamp={}&recvWindow=5000",
        time::OffsetDateTime::now_utc().unix_timestamp() * 1000
    );
    let sig = credbroker::exchange::signing::binance(&ro_secret, &query, "");
    let account: serde_json::Value = reqwest::Client::new()
        .get(format!(
            "{}/api/v3/account?{query}&signature={sig}",
            sims.urls[&ExchangeId::Binance]
        ))
        .header("X-MBX-APIKEY", &ro_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for flag in ["canTrade", "canWithdraw", "canDeposit"] {
        assert_eq!(account[flag], serde_json::json!(true), "{flag}: {account}");
    }

    // A read-only key on that account is accepted, and reported read-only.
    let p = v
        .validate(tenant, ExchangeId::Binance, &set(ro_key, ro_secret))
        .await
        .expect("a read-only key is accepted");
    assert!(p.read && !p.trade && !p.withdraw, "{p:?}");

    // A trade-only key is accepted, and reported able to trade.
    let (tr_key, tr_secret, _) = register(&sims, ExchangeId::Binance, "tradeonly", false);
    restrict(&tr_key, true, false);
    let p = v
        .validate(tenant, ExchangeId::Binance, &set(tr_key, tr_secret))
        .await
        .expect("a trade-only key is accepted");
    assert!(p.read && p.trade && !p.withdraw, "{p:?}");

    // A key whose own restrictions enable withdrawals is still refused.
    let (wd_key, wd_secret, _) = register(&sims, ExchangeId::Binance, "withdrawer", false);
    restrict(&wd_key, true, true);
    match v
        .validate(tenant, ExchangeId::Binance, &set(wd_key, wd_secret))
        .await
    {
        Err(ValidationError::Rejected { code, .. }) => {
            assert_eq!(code.as_deref(), Some("withdraw_enabled"))
        }
        other => panic!("{other:?}"),
    }
}

/// Nothing of the exchange's text reaches the client: Kraken's error string
/// is mapped to our own code, and a `Retry-After` header becomes our own
/// bounded number of seconds, whatever the header says.
#[tokio::test]
async fn the_exchanges_text_never_reaches_the_client() {
    let sims = Simulators::start().await.unwrap();
    let tenant: TenantId = new_tenant().parse().unwrap();
    let (key, secret, _) = register(&sims, ExchangeId::Kraken, "texts", false);
    let set = CredentialSet {
        api_key: key,
        api_secret: SecretString::from(secret),
        passphrase: None,
    };
    let validator = |base: &str, ex: ExchangeId| {
        let mut endpoints = endpoints(&sims);
        let ep = endpoints.get_mut(&ex).unwrap();
        ep.base_url = base.to_owned();
        ExchangeValidator::new(
            &endpoints,
            WithdrawPolicy::default(),
            Arc::new(credbroker::clock::SystemClock),
        )
        .unwrap()
    };
    // A Kraken-shaped refusal whose text quotes something of the request.
    const KRAKEN: &str = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 54\r\nconnection: close\r\n\r\n{\"error\":[\"EGeneral:Invalid arguments:ECHOED-TEXT-1\"]}";
    let (base, _) = impostor(KRAKEN).await;
    match validator(&base, ExchangeId::Kraken)
        .validate(tenant, ExchangeId::Kraken, &set)
        .await
    {
        Err(e @ ValidationError::Rejected { .. }) => {
            let ValidationError::Rejected { code, .. } = &e else {
                unreachable!()
            };
            assert_eq!(code.as_deref(), Some("unrecognised_refusal"));
            assert!(!format!("{e}").contains("ECHOED"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    // A rate limit whose Retry-After is not a number, then one that is.
    for (header, expect) in [
        ("soon ECHOED-TEXT-2", "retry in 60 s"),
        ("7", "retry in 7 s"),
    ] {
        let response: &'static str = Box::leak(
            format!(
                "HTTP/1.1 429 Too Many Requests\r\nretry-after: {header}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            )
            .into_boxed_str(),
        );
        let (base, _) = impostor(response).await;
        match validator(&base, ExchangeId::Kraken)
            .validate(tenant, ExchangeId::Kraken, &set)
            .await
        {
            Err(e @ ValidationError::Unavailable { .. }) => {
                let text = e.to_string();
                assert!(text.contains(expect), "{text}");
                assert!(!text.contains("ECHOED"), "{text}");
            }
            other => panic!("{other:?}"),
        }
    }
}
