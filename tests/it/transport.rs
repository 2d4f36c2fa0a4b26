//! The front door: TLS versions, certificate reload under open streams,
//! idle pre-handshake connections, the connection cap, load shedding and
//! per-tenant networks. In-process broker on the memory stores, real mTLS.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use credbroker::{
    api::pb::{self, watch_rotations_response::Message},
    broker::ports::SecretStore,
    config::AuthConfig,
    memstore::MemorySecretStore,
    server::FrontDoor,
    tls::{acceptor::ConnLimits, pki::DevPki},
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};
use tonic_types::StatusExt as _;

use crate::support::{
    TD, get_req,
    memory::{Memory, MemoryOptions},
    next_non_heartbeat,
    probe::ProbeSecrets,
    rotate_n, store_n, watch_past_state, watch_req,
};

fn op_id() -> String {
    format!("spiffe://{TD}/operator/ops")
}

/// A raw rustls client limited to `versions`: does the handshake succeed?
async fn handshake_with(
    m: &Memory,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> bool {
    let pair = m.pki.ca.client(&op_id()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(
            rustls_pki_types::CertificateDer::from_pem_slice(m.pki.ca.ca_pem().as_bytes()).unwrap(),
        )
        .unwrap();
    use rustls_pki_types::pem::PemObject as _;
    let certs = rustls_pki_types::CertificateDer::pem_slice_iter(pair.cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(pair.key.as_bytes()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_protocol_versions(versions)
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(m.running.addr)
        .await
        .unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    match connector.connect(name, tcp).await {
        // TLS 1.3 finishes the handshake before the server has checked the
        // client certificate: read once to see whether it hung up.
        Ok(mut s) => {
            let _ = s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
            let mut buf = [0u8; 64];
            matches!(tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await, Ok(Ok(n)) if n > 0)
        }
        Err(_) => false,
    }
}

#[tokio::test]
async fn tls_1_3_only_unless_1_2_is_allowed() {
    use rustls::version::{TLS12, TLS13};
    let m = Memory::start_with(MemoryOptions::default()).await;
    assert!(handshake_with(&m, &[&TLS13]).await, "TLS 1.3 works");
    assert!(
        !handshake_with(&m, &[&TLS12]).await,
        "TLS 1.2 is refused by default"
    );
    let m12 = Memory::start_with(MemoryOptions {
        allow_tls12: true,
        ..MemoryOptions::default()
    })
    .await;
    assert!(
        handshake_with(&m12, &[&TLS12]).await,
        "TLS 1.2 when allowed"
    );
}

/// 200 connections that never send a ClientHello are closed within the
/// handshake timeout, and an authenticated client is served meanwhile.
#[tokio::test]
async fn idle_pre_handshake_connections_are_closed() {
    let m = Memory::start_with(MemoryOptions {
        front: FrontDoor {
            conns: ConnLimits {
                max_connections: 1_000,
                handshake_timeout: Duration::from_millis(500),
            },
            ..FrontDoor::default()
        },
        ..MemoryOptions::default()
    })
    .await;
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(
            tokio::net::TcpStream::connect(m.running.addr)
                .await
                .unwrap(),
        );
    }
    let mut c = m.client(&[&op_id()]).await;
    c.list_credentials(pb::ListCredentialsRequest {
        tenant_id: uuid::Uuid::new_v4().to_string(),
    })
    .await
    .unwrap();
    // Each idle connection is closed by the server (EOF) within the timeout.
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        for mut s in idle {
            let mut buf = [0u8; 1];
            assert!(matches!(s.read(&mut buf).await, Ok(0) | Err(_)));
        }
    })
    .await;
    assert!(closed.is_ok(), "idle connections were closed");
}

/// Beyond `max_connections`, new connections are closed at once (a clear
/// failure, not a timeout); when one ends, the next is accepted.
#[tokio::test]
async fn the_connection_cap_refuses_at_once_and_recovers() {
    let m = Memory::start_with(MemoryOptions {
        front: FrontDoor {
            conns: ConnLimits {
                max_connections: 2,
                handshake_timeout: Duration::from_secs(5),
            },
            ..FrontDoor::default()
        },
        ..MemoryOptions::default()
    })
    .await;
    let t = uuid::Uuid::new_v4().to_string();
    let list = pb::ListCredentialsRequest {
        tenant_id: t.clone(),
    };
    let mut a = m.client(&[&op_id()]).await;
    let mut b = m.client(&[&op_id()]).await;
    a.list_credentials(list.clone()).await.unwrap();
    b.list_credentials(list.clone()).await.unwrap();
    let started = std::time::Instant::now();
    let third = tokio::time::timeout(Duration::from_secs(5), async {
        let pair = m.pki.ca.client(&op_id()).unwrap();
        Channel::from_shared(format!("https://localhost:{}", m.running.addr.port()))
            .unwrap()
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(m.pki.ca.ca_pem()))
                    .identity(Identity::from_pem(pair.cert, pair.key))
                    .domain_name("localhost"),
            )
            .unwrap()
            .connect()
            .await
    })
    .await
    .expect("answered, not hung");
    assert!(third.is_err(), "a third connection is refused");
    assert!(started.elapsed() < Duration::from_secs(2));
    drop(a);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut c = m.client(&[&op_id()]).await;
    c.list_credentials(list).await.unwrap();
    b.list_credentials(pb::ListCredentialsRequest { tenant_id: t })
        .await
        .unwrap();
}

/// With one call allowed in flight, a second concurrent call is refused at
/// once with RESOURCE_EXHAUSTED and a retry hint.
#[tokio::test]
async fn calls_beyond_the_limit_are_shed_at_once() {
    let probe = ProbeSecrets::new(Arc::new(MemorySecretStore::default()));
    let m = Memory::start_with(MemoryOptions {
        front: FrontDoor {
            max_concurrent_calls: 1,
            ..FrontDoor::default()
        },
        secrets: Some(probe.clone() as Arc<dyn SecretStore>),
        ..MemoryOptions::default()
    })
    .await;
    let t = uuid::Uuid::new_v4().to_string();
    let mut c = m.client(&[&op_id()]).await;
    c.validate_and_store(store_n(&t, "binance")).await.unwrap();
    // A cold read of another replica would be a miss; here the key was just
    // stored (cached), so rotate with overlap 0 and evict by a new store.
    let paused = probe.pause_next_read();
    let held = {
        let mut c = c.clone();
        let t = t.clone();
        tokio::spawn(async move { c.rotate(rotate_n(&t, "binance", 1)).await })
    };
    paused.reached.await.unwrap();
    let started = std::time::Instant::now();
    let e = c.get_credentials(get_req(&t, "binance")).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("calls in flight"), "{}", e.message());
    assert!(e.get_details_retry_info().is_some());
    assert!(started.elapsed() < Duration::from_secs(1));
    paused.release.send(()).unwrap();
    held.await.unwrap().unwrap();
    c.get_credentials(get_req(&t, "binance")).await.unwrap();
}

/// New certificate, key and client CA are picked up without a restart; an
/// open stream on the old connection keeps receiving events.
#[tokio::test]
async fn tls_files_are_reloaded_without_dropping_streams() {
    let m = Memory::start_with(MemoryOptions {
        tls_reload: Some(Duration::from_millis(200)),
        ..MemoryOptions::default()
    })
    .await;
    let t = uuid::Uuid::new_v4().to_string();
    let mut old = m.client(&[&op_id()]).await;
    old.validate_and_store(store_n(&t, "binance"))
        .await
        .unwrap();
    let mut stream = watch_past_state(&mut old, &t).await;

    // A new CA issues the server certificate and the clients from now on.
    let ca2 = DevPki::new("rotated CA").unwrap();
    let server2 = ca2.server(&[]).unwrap();
    std::fs::write(m.pki.path("server.pem"), &server2.cert).unwrap();
    std::fs::write(m.pki.path("server.key"), &server2.key).unwrap();
    std::fs::write(m.pki.path("ca.pem"), ca2.ca_pem()).unwrap();
    let pair = ca2.client(&op_id()).unwrap();
    let connect2 = || {
        let pair = (pair.cert.clone(), pair.key.clone());
        let ca = ca2.ca_pem();
        async move {
            Channel::from_shared(format!("https://localhost:{}", m.running.addr.port()))
                .unwrap()
                .tls_config(
                    ClientTlsConfig::new()
                        .ca_certificate(Certificate::from_pem(ca))
                        .identity(Identity::from_pem(pair.0, pair.1))
                        .domain_name("localhost"),
                )
                .unwrap()
                .connect()
                .await
        }
    };
    let ch = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(ch) = connect2().await {
                let mut c = pb::credential_broker_client::CredentialBrokerClient::new(ch);
                if c.list_credentials(pb::ListCredentialsRequest {
                    tenant_id: t.clone(),
                })
                .await
                .is_ok()
                {
                    return c;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the new CA and certificate were picked up");
    let mut new = ch;
    new.rotate(rotate_n(&t, "binance", 1)).await.unwrap();
    let Message::Event(e) = next_non_heartbeat(&mut stream).await else {
        panic!("the old stream is still open")
    };
    assert_eq!(e.version, 2);
}

/// A tenant's allowed networks: callers elsewhere are refused; operators
/// are exempt.
#[tokio::test]
async fn tenant_networks_are_enforced_for_its_callers() {
    let a = uuid::Uuid::new_v4();
    let b = uuid::Uuid::new_v4();
    let mut nets = BTreeMap::new();
    nets.insert(a, vec!["10.0.0.0/8".parse().unwrap()]);
    nets.insert(b, vec!["127.0.0.0/8".parse().unwrap()]);
    let m = Memory::start_with(MemoryOptions {
        auth: AuthConfig {
            tenant_networks: nets,
            ..AuthConfig::default()
        },
        ..MemoryOptions::default()
    })
    .await;
    let mut pod_a = m
        .client(&[&format!("spiffe://{TD}/tenant/{a}/pod/p")])
        .await;
    let e = pod_a
        .list_credentials(pb::ListCredentialsRequest {
            tenant_id: a.to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message().contains("came from 127.0.0.1"),
        "{}",
        e.message()
    );
    let mut pod_b = m
        .client(&[&format!("spiffe://{TD}/tenant/{b}/pod/p")])
        .await;
    pod_b
        .list_credentials(pb::ListCredentialsRequest {
            tenant_id: b.to_string(),
        })
        .await
        .unwrap();
    let mut op = m.client(&[&op_id()]).await;
    op.list_credentials(pb::ListCredentialsRequest {
        tenant_id: a.to_string(),
    })
    .await
    .unwrap();
}

/// Streams are admitted by a budget of their own, per replica and per
/// tenant, each refusal RESOURCE_EXHAUSTED with a RetryInfo; a listening
/// stream holds no unary call slot.
#[tokio::test]
async fn streams_have_a_budget_of_their_own() {
    let m = Memory::start_with(MemoryOptions {
        front: FrontDoor {
            max_concurrent_calls: 2,
            ..FrontDoor::default()
        },
        streams: credbroker::rotation::watch::StreamLimits {
            max: 3,
            per_tenant: 2,
        },
        ..MemoryOptions::default()
    })
    .await;
    let (a, b, c) = (
        uuid::Uuid::new_v4().to_string(),
        uuid::Uuid::new_v4().to_string(),
        uuid::Uuid::new_v4().to_string(),
    );
    let mut op = m.client(&[&op_id()]).await;
    let pod = |t: &str| format!("spiffe://{TD}/tenant/{t}/pod/p");
    let mut on_a = m.client(&[&pod(&a)]).await;
    let mut on_b = m.client(&[&pod(&b)]).await;
    let mut on_c = m.client(&[&pod(&c)]).await;
    let _a1 = on_a.watch_rotations(watch_req(&a, 0)).await.unwrap();
    let _a2 = on_a.watch_rotations(watch_req(&a, 0)).await.unwrap();
    let e = on_a.watch_rotations(watch_req(&a, 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains(&format!("tenant {a}")),
        "{}",
        e.message()
    );
    assert_eq!(
        e.get_details_retry_info().and_then(|r| r.retry_delay),
        Some(Duration::from_secs(5))
    );
    let b1 = on_b.watch_rotations(watch_req(&b, 0)).await.unwrap();
    let e = on_c.watch_rotations(watch_req(&c, 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("this replica"), "{}", e.message());
    assert_eq!(
        e.get_details_retry_info().and_then(|r| r.retry_delay),
        Some(Duration::from_secs(1))
    );
    // Three streams listening, two unary calls allowed in flight: unary
    // calls are still served, two at a time.
    op.validate_and_store(store_n(&a, "binance")).await.unwrap();
    let (mut g1, mut g2) = (on_a.clone(), on_a.clone());
    let (r1, r2) = tokio::join!(
        g1.get_credentials(get_req(&a, "binance")),
        g2.get_credentials(get_req(&a, "binance")),
    );
    r1.unwrap();
    r2.unwrap();
    // A closed stream frees its slot in the replica's budget.
    drop(b1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match on_c.watch_rotations(watch_req(&c, 0)).await {
            Ok(_) => break,
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                assert!(tokio::time::Instant::now() < deadline, "slot never freed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
