//! Storage guarantees: nothing half-written, check-and-set, outages,
//! AppRole, and graceful shutdown of the real binary.

use std::{sync::Arc, time::Duration};

use credbroker::{
    api::pb::{self, watch_rotations_response::Message},
    broker::{
        error::{MetadataStoreError, SecretStoreError},
        ports::RotationCommit,
        types::{CredentialSet, ExchangeId, Permissions, TenantId},
    },
    clock::ManualClock,
    config::VaultAuthConfig,
};
use secrecy::SecretString;
use time::OffsetDateTime;
use tonic::Code;

use crate::support::{Env, EnvOptions, get_req, new_tenant, store_req};

fn domain_set(key: &str, secret: &str) -> CredentialSet {
    CredentialSet {
        api_key: key.into(),
        api_secret: SecretString::from(secret.to_owned()),
        passphrase: None,
    }
}

#[tokio::test]
async fn a_crash_between_vault_and_postgres_converges_on_retry() {
    let env = Env::start().await;
    let tenant = new_tenant();
    let t: TenantId = tenant.parse().unwrap();
    let broker = env.broker();
    let path = broker.vault_path(t, ExchangeId::Binance);
    // What a crash after the Vault write leaves: a version and no row.
    let orphan = broker
        .secrets()
        .write(&path, &domain_set("orphanKey001", "orphanSecret1"), 0)
        .await
        .unwrap();
    assert_eq!(orphan, 1);
    assert_eq!(
        env.count("SELECT count(*) FROM tenant_credentials").await,
        0
    );
    // Nothing serves it.
    let mut c = env.operator().await;
    let e = c
        .get_credentials(get_req(&tenant, "binance"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // The client's retry writes over the orphan and commits.
    let stored = c
        .validate_and_store(store_req(
            &tenant,
            "binance",
            "binanceKey001",
            "binanceSecret1",
        ))
        .await
        .unwrap()
        .into_inner()
        .credential
        .unwrap();
    assert_eq!(stored.version, 2);
    let g = c
        .get_credentials(get_req(&tenant, "binance"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(g.current.unwrap().api_secret, "binanceSecret1");
}

/// A standby serves reads from its own copy, which trails a write: a
/// version the preferred node lacks is read from another node instead of
/// being reported missing. Two dev servers stand in for a lagging standby
/// (which never has the version) and the active node (which has it).
#[tokio::test]
async fn a_version_the_preferred_node_lacks_is_read_from_another_node() {
    let env = Env::start().await;
    let lagging = crate::support::Bao::start_as(&env.bao.token).await;
    let mut cfg = env.config.vault.clone();
    cfg.addr = lagging.addr.clone();
    cfg.nodes = vec![env.bao.addr.clone()];
    let store = credbroker::vault::VaultSecretStore::connect(&cfg)
        .await
        .unwrap();
    let path = format!("tenants/{}/binance", new_tenant());
    let written = env
        .broker()
        .secrets()
        .write(&path, &domain_set("laggingKey01", "laggingSecret1"), 0)
        .await
        .unwrap();
    use credbroker::broker::ports::SecretStore as _;
    let got = store.read(&path, written).await.unwrap();
    assert_eq!(got.api_key, "laggingKey01");
    // A version no node has is missing, not an error of another kind.
    match store.read(&path, written + 1).await {
        Err(SecretStoreError::NotFound { version, .. }) => assert_eq!(version, written + 1),
        other => panic!("expected NotFound, got {:?}", other.map(|s| s.api_key)),
    }
}

#[tokio::test]
async fn check_and_set_guards_both_stores() {
    let env = Env::start().await;
    let t: TenantId = new_tenant().parse().unwrap();
    let broker = env.broker();
    let path = broker.vault_path(t, ExchangeId::Kraken);
    broker
        .secrets()
        .write(&path, &domain_set("k0000001", "s0000001"), 0)
        .await
        .unwrap();
    // A second writer that read "nothing there" loses.
    let lost = broker
        .secrets()
        .write(&path, &domain_set("k0000002", "s0000002"), 0)
        .await
        .unwrap_err();
    assert!(
        matches!(lost, SecretStoreError::CasConflict { .. }),
        "{lost:?}"
    );
    // PostgreSQL: a rotation commit built on a stale version loses.
    broker
        .validate_and_store(
            &credbroker::broker::context::RequestContext::system("test"),
            t,
            ExchangeId::Bybit,
            domain_set("bybitKey0001", "bybitSecret01"),
        )
        .await
        .unwrap();
    let commit = |expected| RotationCommit {
        tenant: t,
        exchange: ExchangeId::Bybit,
        expected_version: expected,
        new_version: 7,
        previous_version: None,
        previous_valid_until: None,
        permissions: Permissions::default(),
        api_key_hint: "****".into(),
        validated_at: OffsetDateTime::now_utc(),
        by: credbroker::broker::ports::ChangedBy {
            actor: "test".into(),
            request_id: Some(uuid::Uuid::now_v7()),
        },
    };
    let stale = broker.metadata().rotate(commit(5)).await.unwrap_err();
    assert!(matches!(stale, MetadataStoreError::Conflict), "{stale:?}");
    assert_eq!(
        env.count("SELECT count(*) FROM credential_events WHERE kind = 'rotated'")
            .await,
        0
    );
}

#[tokio::test]
async fn vault_outage_refuses_writes_serves_cached_reads_and_flips_health() {
    let clock = ManualClock::new(OffsetDateTime::now_utc());
    let mut env = Env::start_with(EnvOptions {
        clock: Some(Arc::new(clock.clone())),
        // It kills its OpenBao.
        own_vault: true,
        ..EnvOptions::default()
    })
    .await;
    let tenant = new_tenant();
    let mut c = env.operator().await;
    c.validate_and_store(store_req(
        &tenant,
        "binance",
        "binanceKey001",
        "binanceSecret1",
    ))
    .await
    .unwrap();
    let get = get_req(&tenant, "binance");
    c.get_credentials(get.clone()).await.unwrap();
    let mut health = health_client(&env).await;
    assert_eq!(
        health_status(&mut health).await,
        1,
        "SERVING while both stores answer"
    );

    Arc::get_mut(&mut env.bao).expect("its own OpenBao").kill();

    // Writes are refused with UNAVAILABLE and nothing reaches PostgreSQL.
    let e = c
        .validate_and_store(store_req(
            &tenant,
            "kraken",
            "krakenKey001",
            "krakenSecret1",
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("Vault"), "{e:?}");
    assert_eq!(
        env.count("SELECT count(*) FROM tenant_credentials WHERE exchange = 'kraken'")
            .await,
        0
    );

    // Past the 5-minute TTL the cached set is still served, marked stale...
    clock.advance(time::Duration::minutes(30));
    let g = c.get_credentials(get.clone()).await.unwrap().into_inner();
    assert!(g.stale);
    assert_eq!(g.current.unwrap().api_secret, "binanceSecret1");
    // ...until the one-hour outage grace ends.
    clock.advance(time::Duration::minutes(40));
    let e = c.get_credentials(get).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);

    // Health reports NOT_SERVING within a few probe periods.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while health_status(&mut health).await != 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "health never went NOT_SERVING"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    env.stop_broker().await;
}

pub(crate) async fn health_client(
    env: &Env,
) -> tonic_health::pb::health_client::HealthClient<tonic::transport::Channel> {
    let pair = env
        .pki
        .ca
        .client(&format!("spiffe://{}/operator/probe", crate::support::TD))
        .unwrap();
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(env.pki.ca.ca_pem()))
        .identity(tonic::transport::Identity::from_pem(pair.cert, pair.key))
        .domain_name("localhost");
    let ch = tonic::transport::Channel::from_shared(env.endpoint())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    tonic_health::pb::health_client::HealthClient::new(ch)
}

pub(crate) async fn health_status(
    h: &mut tonic_health::pb::health_client::HealthClient<tonic::transport::Channel>,
) -> i32 {
    h.check(tonic_health::pb::HealthCheckRequest {
        service: "credbroker.v1.CredentialBroker".into(),
    })
    .await
    .unwrap()
    .into_inner()
    .status
}

#[tokio::test]
async fn approle_login_works_end_to_end() {
    // It enables an auth method and writes a policy.
    let mut env = Env::start_own_vault().await;
    let b = &env.bao;
    let ok = |r: (u16, String)| assert!((200..300).contains(&r.0), "{r:?}");
    ok(b.http(
        "POST",
        "/v1/sys/auth/approle",
        Some(r#"{"type":"approle"}"#),
    )
    .await
    .unwrap());
    let policy = r#"{"policy":"path \"secret/data/tenants/*\" { capabilities = [\"create\",\"read\",\"update\"] }\npath \"secret/metadata/tenants/*\" { capabilities = [\"read\",\"delete\",\"list\"] }\npath \"secret/destroy/tenants/*\" { capabilities = [\"update\"] }"}"#;
    ok(
        b.http("PUT", "/v1/sys/policies/acl/credbroker", Some(policy))
            .await
            .unwrap(),
    );
    ok(b.http(
        "POST",
        "/v1/auth/approle/role/credbroker",
        Some(r#"{"token_policies":["credbroker"],"token_ttl":"1h"}"#),
    )
    .await
    .unwrap());
    let (_, body) = b
        .http("GET", "/v1/auth/approle/role/credbroker/role-id", None)
        .await
        .unwrap();
    let role_id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["data"]["role_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, body) = b
        .http(
            "POST",
            "/v1/auth/approle/role/credbroker/secret-id",
            Some("{}"),
        )
        .await
        .unwrap();
    let secret_id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["data"]["secret_id"]
        .as_str()
        .unwrap()
        .to_owned();

    env.stop_broker().await;
    env.config.vault.auth = VaultAuthConfig::Approle {
        mount: "approle".into(),
        role_id,
        secret_id: secret_id.into(),
    };
    env.start_broker(None).await;
    let tenant = new_tenant();
    let mut c = env.operator().await;
    c.validate_and_store(store_req(&tenant, "bybit", "bybitKey0001", "bybitSecret01"))
        .await
        .unwrap();
    let g = c
        .get_credentials(get_req(&tenant, "bybit"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(g.current.unwrap().api_secret, "bybitSecret01");
}

#[tokio::test]
async fn sigterm_ends_streams_with_a_resumable_status_and_exits_cleanly() {
    let mut dev = crate::support::DevBroker::spawn().await;
    let port = dev.port;
    assert!(
        dev.banner.contains(&format!("localhost:{port}")) && dev.banner.contains("client.key"),
        "{}",
        dev.banner
    );
    let mut c = dev.operator().await;
    let tenant = new_tenant();
    c.validate_and_store(store_req(
        &tenant,
        "binance",
        "binanceKey001",
        "binanceSecret1",
    ))
    .await
    .unwrap();
    let mut stream = c
        .watch_rotations(pb::WatchRotationsRequest {
            tenant_id: tenant,
            exchanges: vec![],
            after_seq: 0,
            include_credentials: false,
        })
        .await
        .unwrap()
        .into_inner();
    let first = crate::support::next_non_heartbeat(&mut stream).await;
    assert!(matches!(first, Message::State(_)));

    let pid = dev.child.id().unwrap();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .unwrap();
    let status = end.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let exit = tokio::time::timeout(Duration::from_secs(10), dev.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test]
async fn the_migrate_command_applies_the_schema_once() {
    crate::support::init();
    let db = crate::support::TestDb::create().await;
    let run = || async {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_credbroker"))
            .args(["migrate", "--database-url", &db.url()])
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let shipped = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .unwrap()
        .count();
    assert!(
        run()
            .await
            .contains(&format!("applied {shipped} migration(s)"))
    );
    assert!(run().await.contains("applied 0 migration(s)"));
    let tables: i64 = db
        .connect()
        .await
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE tablename IN ('tenant_credentials', 'credential_events', 'rotation_acks') AND rowsecurity",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        tables, 3,
        "all three tables exist with row-level security on"
    );
}

/// A database error says what failed (SQLSTATE, and the names PostgreSQL
/// gives) and never quotes a value; a maximal subscriber name fits.
#[tokio::test]
async fn database_errors_name_what_failed_without_values() {
    let env = Env::start().await;
    let tenant = new_tenant();
    let mut op = env.operator().await;
    op.validate_and_store(crate::support::store_n(&tenant, "binance"))
        .await
        .unwrap();
    let meta = env.broker().metadata();
    let t = tenant.parse().unwrap();
    let now = OffsetDateTime::now_utc();
    // The longest subscriber a caller can produce: a 2,048-byte SPIFFE ID,
    // '#', a 128-character instance.
    let longest = format!("{}#{}", "s".repeat(2048), "i".repeat(128));
    meta.acknowledge(t, ExchangeId::Binance, &longest, 1, now)
        .await
        .unwrap();
    let secret_looking = "SECRETVALUE".repeat(300);
    let e = meta
        .acknowledge(t, ExchangeId::Binance, &secret_looking, 1, now)
        .await
        .unwrap_err();
    let MetadataStoreError::Other(m) = e else {
        panic!("{e:?}")
    };
    assert!(m.contains("SQLSTATE 22001"), "{m}");
    assert!(!m.contains("SECRETVALUE"), "{m}");
}

/// A fleet acknowledging at once: the acknowledgements queued while one
/// group is written go out together, every one lands, a repeated one is
/// harmless, and one naming a credential that does not exist is NOT_FOUND
/// without failing the rest of its group.
#[tokio::test]
async fn a_fleets_acknowledgements_land_together_and_each_gets_its_own_answer() {
    let env = Env::start().await;
    let tenant = new_tenant();
    let mut op = env.operator().await;
    op.validate_and_store(crate::support::store_n(&tenant, "binance"))
        .await
        .unwrap();
    let meta = env.broker().metadata();
    let t: TenantId = tenant.parse().unwrap();
    let now = OffsetDateTime::now_utc();
    let acks = (0..500).map(|i| {
        let meta = meta.clone();
        async move {
            meta.acknowledge(t, ExchangeId::Binance, &format!("pod-{i}"), 1, now)
                .await
        }
    });
    let again = meta.acknowledge(t, ExchangeId::Binance, "pod-7", 1, now);
    let missing = meta.acknowledge(t, ExchangeId::Okx, "pod-0", 1, now);
    let (results, again, missing) = tokio::join!(futures::future::join_all(acks), again, missing);
    for r in &results {
        assert!(r.is_ok(), "{r:?}");
    }
    again.unwrap();
    assert!(
        matches!(missing, Err(MetadataStoreError::NotFound)),
        "{missing:?}"
    );
    let adoption = meta.adoption(t, ExchangeId::Binance).await.unwrap();
    assert_eq!(adoption.len(), 500);
    assert!(adoption.iter().all(|a| a.version == 1));
}
