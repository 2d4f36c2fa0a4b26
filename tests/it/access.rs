//! Who may do what, over real mTLS on an in-process broker with the memory
//! stores (no OpenBao or PostgreSQL needed: only the layers are under
//! test). Every RPC is called under every identity case, and a refused call
//! must neither answer nor change anything.

use std::time::Duration;

use credbroker::{
    api::pb::{self, credential_broker_client::CredentialBrokerClient},
    auth::{Action, TokenMode},
    config::{AuthConfig, LimitsConfig, TenantLimits},
};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::json;
use tonic::{Code, Request, Status, transport::Channel};
use tonic_types::StatusExt as _;

use crate::support::{TD, memory::Memory, set, store_req};

const SECRET: &str = "matrix-test-secret-at-least-32-bytes-long";

fn hs256(claims: &serde_json::Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn token(sub: &str, tenant: Option<&str>, role: &str, exp_in: i64) -> String {
    let exp = time::OffsetDateTime::now_utc().unix_timestamp() + exp_in;
    let mut c = json!({"sub": sub, "role": role, "exp": exp});
    if let Some(t) = tenant {
        c["tenant_id"] = json!(t);
    }
    hs256(&c)
}

fn with_token<T>(msg: T, token: Option<&str>) -> Request<T> {
    let mut r = Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

/// Calls `action` on `tenant` as the client with `token`.
async fn call(
    c: &mut CredentialBrokerClient<Channel>,
    action: Action,
    tenant: &str,
    token: Option<&str>,
) -> Result<(), Status> {
    let t = tenant.to_owned();
    let target = || (t.clone(), "binance".to_owned());
    match action {
        Action::GetCredentials => {
            let (tenant_id, exchange) = target();
            c.get_credentials(with_token(
                pb::GetCredentialsRequest {
                    tenant_id,
                    exchange,
                    min_version: 0,
                },
                token,
            ))
            .await
            .map(drop)
        }
        Action::WatchRotations => c
            .watch_rotations(with_token(
                pb::WatchRotationsRequest {
                    tenant_id: t.clone(),
                    exchanges: vec![],
                    after_seq: 0,
                    include_credentials: false,
                },
                token,
            ))
            .await
            .map(drop),
        Action::AcknowledgeVersion => {
            let (tenant_id, exchange) = target();
            c.acknowledge_version(with_token(
                pb::AcknowledgeVersionRequest {
                    tenant_id,
                    exchange,
                    version: 1,
                    instance: String::new(),
                },
                token,
            ))
            .await
            .map(drop)
        }
        Action::ListCredentials => c
            .list_credentials(with_token(
                pb::ListCredentialsRequest {
                    tenant_id: t.clone(),
                },
                token,
            ))
            .await
            .map(drop),
        Action::DescribeCredential => {
            let (tenant_id, exchange) = target();
            c.describe_credential(with_token(
                pb::DescribeCredentialRequest {
                    tenant_id,
                    exchange,
                },
                token,
            ))
            .await
            .map(drop)
        }
        Action::GetCredentialHealth => {
            let (tenant_id, exchange) = target();
            c.get_credential_health(with_token(
                pb::GetCredentialHealthRequest {
                    tenant_id,
                    exchange,
                },
                token,
            ))
            .await
            .map(drop)
        }
        Action::ValidateAndStore => c
            .validate_and_store(with_token(
                store_req(&t, "okx", "okxKey0123456789", "okxSecret0123456789"),
                token,
            ))
            .await
            .map(drop),
        Action::Rotate => c
            .rotate(with_token(
                pb::RotateRequest {
                    tenant_id: t.clone(),
                    exchange: "binance".into(),
                    credentials: Some(set("binanceKeyMatrix01", "binanceSecretMatrix01")),
                    overlap_seconds: None,
                    mint: false,
                },
                token,
            ))
            .await
            .map(drop),
        Action::DeleteCredentials => c
            .delete_credentials(with_token(
                pb::DeleteCredentialsRequest {
                    tenant_id: t.clone(),
                    exchange: "kraken".into(),
                },
                token,
            ))
            .await
            .map(drop),
        Action::SetWebhook => c
            .set_webhook(with_token(
                pb::SetWebhookRequest {
                    tenant_id: t.clone(),
                    url: "https://hooks.example/credbroker".into(),
                    secret: String::new(),
                },
                token,
            ))
            .await
            .map(drop),
        Action::SetManagementKey => c
            .set_management_key(with_token(
                pb::SetManagementKeyRequest {
                    tenant_id: t.clone(),
                    exchange: "bybit".into(),
                    credentials: Some(set("bybitMasterMatrix01", "bybitMasterSecretMatrix01")),
                    sub_account: "100200300".into(),
                    rotate_every_days: 0,
                    overlap_seconds: None,
                },
                token,
            ))
            .await
            .map(drop),
        Action::ListAuditEvents => c
            .list_audit_events(with_token(
                pb::ListAuditEventsRequest {
                    tenant_id: t.clone(),
                    page_size: 10,
                    page_token: String::new(),
                    since: None,
                },
                token,
            ))
            .await
            .map(drop),
        Action::ValidateCredentials => {
            let (tenant_id, exchange) = target();
            c.validate_credentials(with_token(
                pb::ValidateCredentialsRequest {
                    tenant_id,
                    exchange,
                },
                token,
            ))
            .await
            .map(drop)
        }
    }
}

fn matrix_auth() -> AuthConfig {
    AuthConfig {
        token: Some(TokenMode::Required),
        hs256_secret: Some(SECRET.into()),
        ..AuthConfig::default()
    }
}

fn unlimited() -> LimitsConfig {
    LimitsConfig::unlimited()
}

/// Every RPC × {no token, expired, bad signature, foreign tenant,
/// certificate/token mismatch, viewer, trader, admin, operator}.
/// The least role for each RPC, copied from the role table in
/// docs/identity.md (not computed from `Action::needs`, the code under
/// test).
const ROLE_TABLE: [(&str, &str); 13] = [
    ("ListCredentials", "viewer"),
    ("DescribeCredential", "viewer"),
    ("GetCredentialHealth", "viewer"),
    ("GetCredentials", "trader"),
    ("WatchRotations", "trader"),
    ("AcknowledgeVersion", "trader"),
    ("ValidateAndStore", "admin"),
    ("Rotate", "admin"),
    ("DeleteCredentials", "admin"),
    ("ValidateCredentials", "admin"),
    ("ListAuditEvents", "admin"),
    ("SetWebhook", "admin"),
    ("SetManagementKey", "admin"),
];

/// Whether `role` may call `action` by the documented table.
fn documented(role: &str, action: &str) -> (bool, &'static str) {
    let least = ROLE_TABLE
        .iter()
        .find(|(a, _)| *a == action)
        .unwrap_or_else(|| panic!("{action} is missing from the documented table"))
        .1;
    let rank = |r: &str| {
        ["viewer", "trader", "admin"]
            .iter()
            .position(|x| *x == r)
            .unwrap()
    };
    (rank(role) >= rank(least), least)
}

#[tokio::test]
async fn every_rpc_under_every_identity() {
    let m = Memory::start(matrix_auth(), unlimited()).await;
    let a = uuid::Uuid::new_v4().to_string();
    let b = uuid::Uuid::new_v4().to_string();
    let pod_a = |t: &str| format!("spiffe://{TD}/tenant/{t}/pod/p");
    let mut cert_a = m.client(&[&pod_a(&a)]).await;
    let cert_b = m.client(&[&pod_a(&b)]).await;
    let mut cert_op = m.client(&[&format!("spiffe://{TD}/operator/ops")]).await;
    // A stored key for tenant A (as its admin).
    let admin_a = token("alice", Some(&a), "admin", 600);
    cert_a
        .validate_and_store(with_token(
            store_req(&a, "binance", "binanceKey000000", "binanceSecret000000"),
            Some(&admin_a),
        ))
        .await
        .unwrap();

    let forged = encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub":"x","tenant_id":a,"role":"admin","exp":time::OffsetDateTime::now_utc().unix_timestamp()+600}),
        &EncodingKey::from_secret(b"not-the-secret-not-the-secret-not-the"),
    )
    .unwrap();
    let refused: Vec<(&str, CredentialBrokerClient<Channel>, Option<String>, Code)> = vec![
        ("no token", cert_a.clone(), None, Code::Unauthenticated),
        (
            "expired",
            cert_a.clone(),
            Some(token("alice", Some(&a), "admin", -600)),
            Code::Unauthenticated,
        ),
        (
            "bad signature",
            cert_a.clone(),
            Some(forged),
            Code::Unauthenticated,
        ),
        (
            "foreign tenant",
            cert_b.clone(),
            Some(token("bob", Some(&b), "admin", 600)),
            Code::PermissionDenied,
        ),
        (
            "cert/token mismatch",
            cert_b.clone(),
            Some(token("alice", Some(&a), "admin", 600)),
            Code::Unauthenticated,
        ),
    ];
    for (case, mut client, tok, want) in refused {
        for action in Action::ALL {
            let before = m.state(&a).await;
            let e = call(&mut client, action, &a, tok.as_deref())
                .await
                .unwrap_err();
            assert_eq!(e.code(), want, "{case} / {action:?}: {e:?}");
            assert_eq!(
                m.state(&a).await,
                before,
                "{case} / {action:?} changed state"
            );
        }
    }
    for role in ["viewer", "trader", "admin"] {
        let tok = token("someone", Some(&a), role, 600);
        for action in Action::ALL {
            let before = m.state(&a).await;
            let got = call(&mut cert_a, action, &a, Some(&tok)).await;
            let (allowed, least) = documented(role, action.name());
            match got {
                Err(e) if !allowed => {
                    assert_eq!(e.code(), Code::PermissionDenied, "{role} / {action:?}");
                    assert!(
                        e.message().contains(&format!("needs role {least}")),
                        "{}",
                        e.message()
                    );
                    assert_eq!(
                        m.state(&a).await,
                        before,
                        "{role} / {action:?} changed state"
                    );
                }
                Err(e) => assert!(
                    !matches!(e.code(), Code::PermissionDenied | Code::Unauthenticated),
                    "{role} / {action:?} refused: {e:?}"
                ),
                Ok(()) => assert!(allowed, "{role} / {action:?} was allowed"),
            }
        }
    }
    let op = token("ops", None, "operator", 600);
    for action in Action::ALL {
        if let Err(e) = call(&mut cert_op, action, &a, Some(&op)).await {
            assert!(
                !matches!(e.code(), Code::PermissionDenied | Code::Unauthenticated),
                "operator / {action:?}: {e:?}"
            );
        }
    }
    // An operator token over a pod certificate is a mismatch, not a promotion.
    let e = call(&mut cert_a, Action::Rotate, &a, Some(&op))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    m.running.stop().await.unwrap();
}

/// Without a token (optional mode), a pod certificate is a trader of its
/// tenant: it reads but cannot replace or delete keys.
#[tokio::test]
async fn a_pod_certificate_alone_can_read_but_not_write() {
    let auth = AuthConfig {
        token: Some(TokenMode::Optional),
        hs256_secret: Some(SECRET.into()),
        ..AuthConfig::default()
    };
    let m = Memory::start(auth, unlimited()).await;
    let a = uuid::Uuid::new_v4().to_string();
    let mut op = m.client(&[&format!("spiffe://{TD}/operator/ops")]).await;
    op.validate_and_store(store_req(
        &a,
        "binance",
        "binanceKey000000",
        "binanceSecret000000",
    ))
    .await
    .unwrap();
    let mut pod = m
        .client(&[&format!("spiffe://{TD}/tenant/{a}/pod/p")])
        .await;
    call(&mut pod, Action::GetCredentials, &a, None)
        .await
        .unwrap();
    for action in [
        Action::Rotate,
        Action::DeleteCredentials,
        Action::ValidateAndStore,
    ] {
        let e = call(&mut pod, action, &a, None).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
        assert!(
            e.message().contains("trader of tenant") && e.message().contains("needs role admin"),
            "{}",
            e.message()
        );
    }
    m.running.stop().await.unwrap();
}

/// Certificates a careless CA might issue are refused, whatever the token.
#[tokio::test]
async fn certificates_must_carry_exactly_one_strict_spiffe_id() {
    let m = Memory::start(AuthConfig::default(), unlimited()).await;
    let a = uuid::Uuid::new_v4().to_string();
    let op_id = format!("spiffe://{TD}/operator/ops");
    let pod_id = format!("spiffe://{TD}/tenant/{a}/pod/p");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec![op_id.clone(), pod_id.clone()], "exactly one URI SAN"),
        (
            vec![format!("spiffe://{TD}/tenant/{{{a}}}/pod/p")],
            "character",
        ),
        (
            vec![format!("spiffe://{TD}/tenant/urn:uuid:{a}")],
            "character",
        ),
        (
            vec![format!("spiffe://{TD}/tenant/{a}/pod/..")],
            "'.' or '..'",
        ),
        (
            vec![format!("spiffe://{TD}/tenant/{}/pod/p", a.to_uppercase())],
            "lowercase hyphenated UUID",
        ),
        (
            vec![format!("spiffe://{TD}:8443/operator/ops")],
            "trust domain",
        ),
    ];
    for (uris, want) in cases {
        let refs: Vec<&str> = uris.iter().map(String::as_str).collect();
        let mut c = m.client(&refs).await;
        let e = call(&mut c, Action::ListCredentials, &a, None)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{uris:?}");
        assert!(e.message().contains(want), "{uris:?}: {}", e.message());
    }
    m.running.stop().await.unwrap();
}

/// Over the limit: RESOURCE_EXHAUSTED with a RetryInfo; another tenant is
/// not affected; a per-tenant override applies.
#[tokio::test]
async fn rate_limits_are_per_tenant_and_say_when_to_retry() {
    let a = uuid::Uuid::new_v4().to_string();
    let b = uuid::Uuid::new_v4().to_string();
    let mut tenants = std::collections::BTreeMap::new();
    tenants.insert(
        b.parse().unwrap(),
        TenantLimits {
            writes_per_minute: Some(5),
            ..TenantLimits::default()
        },
    );
    let limits = LimitsConfig {
        writes_per_minute: 3,
        reads_per_minute: 0,
        watches_per_minute: 0,
        operator_per_minute: 0,
        tenants,
    };
    let m = Memory::start(AuthConfig::default(), limits).await;
    let mut op = m.client(&[&format!("spiffe://{TD}/operator/ops")]).await;
    let writes = |t: String| {
        let mut op = op.clone();
        async move {
            let mut codes = Vec::new();
            for _ in 0..7 {
                let r = op
                    .delete_credentials(pb::DeleteCredentialsRequest {
                        tenant_id: t.clone(),
                        exchange: "kraken".into(),
                    })
                    .await;
                codes.push(r);
            }
            codes
        }
    };
    let on_a = writes(a.clone()).await;
    assert_eq!(on_a.iter().filter(|r| r.is_ok()).count(), 3);
    let e = on_a[3].as_ref().unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(
        e.message().contains(&format!(
            "tenant {a} made more than 3 write calls per minute"
        )),
        "{}",
        e.message()
    );
    let retry = e.get_details_retry_info().expect("a RetryInfo detail");
    let delay = retry.retry_delay.expect("a retry delay");
    assert!(
        delay > Duration::ZERO && delay <= Duration::from_secs(20),
        "{delay:?}"
    );
    // B has its own (larger) budget, untouched by A's flood.
    let on_b = writes(b.clone()).await;
    assert_eq!(on_b.iter().filter(|r| r.is_ok()).count(), 5);
    // Reads are not limited here.
    for _ in 0..20 {
        op.list_credentials(pb::ListCredentialsRequest {
            tenant_id: a.clone(),
        })
        .await
        .unwrap();
    }
    m.running.stop().await.unwrap();
}

/// The Rust handle (and so the agent) and the Python example send a token
/// from a file; without one, a broker that requires tokens gives nothing.
#[tokio::test]
async fn clients_send_a_token_from_a_file() {
    use credbroker::{
        broker::types::ExchangeId,
        client::{ClientConfig, CredentialHandle, token::TokenFile},
    };
    let m = Memory::start(matrix_auth(), unlimited()).await;
    let a = uuid::Uuid::new_v4().to_string();
    let pod = format!("spiffe://{TD}/tenant/{a}/pod/p");
    let mut admin = m.client(&[&pod]).await;
    admin
        .validate_and_store(with_token(
            store_req(&a, "binance", "binanceKey000000", "binanceSecret000000"),
            Some(&token("alice", Some(&a), "admin", 600)),
        ))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token_path = dir.path().join("token");
    std::fs::write(&token_path, token("pod", Some(&a), "trader", 600)).unwrap();
    let config = |with_token: bool| {
        let pair = m.pki.ca.client(&pod).unwrap();
        let mut cfg = ClientConfig::new(
            vec![format!("https://localhost:{}", m.running.addr.port())],
            m.pki.ca.ca_pem().into_bytes(),
            pair.cert.into_bytes(),
            pair.key.into(),
            a.parse().unwrap(),
        );
        cfg.domain = Some("localhost".into());
        cfg.backoff_max = Duration::from_millis(200);
        if with_token {
            cfg.token = Some(TokenFile::open(token_path.clone()).unwrap());
        }
        cfg
    };
    let with = CredentialHandle::start(config(true));
    let got = with
        .wait_for(ExchangeId::Binance, 1, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(got.current.api_key, "binanceKey000000");
    let without = CredentialHandle::start(config(false));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(without.get(ExchangeId::Binance).is_none());
    with.stop();
    without.stop();

    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let pair = m.pki.ca.client(&pod).unwrap();
    std::fs::write(dir.path().join("ca.pem"), m.pki.ca.ca_pem()).unwrap();
    std::fs::write(dir.path().join("pod.pem"), &pair.cert).unwrap();
    std::fs::write(dir.path().join("pod.key"), &pair.key).unwrap();
    let f = |n: &str| dir.path().join(n).display().to_string();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(&python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/examples/python/credbroker_example.py"
            ))
            .args(["--target", &format!("localhost:{}", m.running.addr.port())])
            .args([
                "--ca",
                &f("ca.pem"),
                "--cert",
                &f("pod.pem"),
                "--key",
                &f("pod.key"),
            ])
            .args([
                "--tenant",
                &a,
                "--exchange",
                "binance",
                "--max-changes",
                "1",
            ])
            .args(["--token-file", &f("token")])
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "swapped binance to version 1 key ****0000"
    );
    m.running.stop().await.unwrap();
}

/// Operators' streams do not take the tenant's stream slots.
#[tokio::test]
async fn operator_streams_leave_the_tenants_slots_alone() {
    let m = Memory::start(AuthConfig::default(), unlimited()).await;
    let a = uuid::Uuid::new_v4().to_string();
    let mut op = m.client(&[&format!("spiffe://{TD}/operator/ops")]).await;
    let mut pod = m
        .client(&[&format!("spiffe://{TD}/tenant/{a}/pod/p")])
        .await;
    let watch = || pb::WatchRotationsRequest {
        tenant_id: a.clone(),
        exchanges: vec![],
        after_seq: 0,
        include_credentials: false,
    };
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(op.watch_rotations(watch()).await.unwrap().into_inner());
    }
    // The memory broker allows 8 streams per tenant: all 8 are the pods'.
    for _ in 0..8 {
        held.push(pod.watch_rotations(watch()).await.unwrap().into_inner());
    }
    let e = pod.watch_rotations(watch()).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    held.push(op.watch_rotations(watch()).await.unwrap().into_inner());
    m.running.stop().await.unwrap();
}

/// A tenant that floods past its limit is refused cheaply, and another
/// tenant's calls keep their latency (compared as a ratio, so the machine's
/// speed does not matter).
#[tokio::test]
async fn one_tenants_flood_does_not_slow_another() {
    let limits = LimitsConfig {
        reads_per_minute: 60,
        ..unlimited()
    };
    let m = Memory::start(AuthConfig::default(), limits).await;
    let (a, b) = (
        uuid::Uuid::new_v4().to_string(),
        uuid::Uuid::new_v4().to_string(),
    );
    let mut op = m.client(&[&format!("spiffe://{TD}/operator/ops")]).await;
    op.validate_and_store(store_req(
        &b,
        "binance",
        "binanceKey000000",
        "binanceSecret000000",
    ))
    .await
    .unwrap();
    let mut pod_b = m
        .client(&[&format!("spiffe://{TD}/tenant/{b}/pod/p")])
        .await;
    let get_b = || pb::GetCredentialsRequest {
        tenant_id: b.clone(),
        exchange: "binance".into(),
        min_version: 0,
    };
    // B's calls spend B's budget (60 a minute): measure 20 alone, 20 under
    // the flood.
    let median = |lat: &mut Vec<Duration>| {
        lat.sort();
        lat[lat.len() / 2]
    };
    let mut alone = Vec::new();
    for _ in 0..20 {
        let t = std::time::Instant::now();
        pod_b.get_credentials(get_b()).await.unwrap();
        alone.push(t.elapsed());
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Enough calls that A is past its budget (60 a minute, plus its burst)
    // on a loaded machine too.
    let flooded = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let mut flood = Vec::new();
    for _ in 0..1 {
        let mut c = m
            .client(&[&format!("spiffe://{TD}/tenant/{a}/pod/p")])
            .await;
        let (stop, a, flooded) = (stop.clone(), a.clone(), flooded.clone());
        flood.push(tokio::spawn(async move {
            let (mut refused, mut sent) = (0u32, 0u32);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                sent += 1;
                flooded.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let r = c
                    .list_credentials(pb::ListCredentialsRequest {
                        tenant_id: a.clone(),
                    })
                    .await;
                if matches!(r, Err(ref e) if e.code() == Code::ResourceExhausted) {
                    refused += 1;
                }
            }
            (sent, refused)
        }));
    }
    // Measured once A's flood is under way (and past its budget).
    while flooded.load(std::sync::atomic::Ordering::Relaxed) < 100 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut during = Vec::new();
    for _ in 0..20 {
        let t = std::time::Instant::now();
        pod_b.get_credentials(get_b()).await.unwrap();
        during.push(t.elapsed());
    }
    while flooded.load(std::sync::atomic::Ordering::Relaxed) < 400 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut sent, mut refused) = (0, 0);
    for f in flood {
        let (s, r) = f.await.unwrap();
        sent += s;
        refused += r;
    }
    let (alone, during) = (median(&mut alone), median(&mut during));
    eprintln!(
        "flood: A sent {sent}, {refused} refused; B median alone {alone:?}, during {during:?}"
    );
    assert!(refused > sent / 2, "A's flood was refused");
    assert!(
        during.as_secs_f64() < alone.as_secs_f64() * 5.0,
        "B's median went from {alone:?} to {during:?}"
    );
    m.running.stop().await.unwrap();
}
