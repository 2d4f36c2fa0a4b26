//! The read path under races: a cache load that raced a rotation never puts
//! the replaced set back (in-memory and real stores), concurrent misses
//! share one load, Vault answers are classified by status and body shape,
//! orphaned versions are swept, and a burst of rotations across two
//! replicas leaves no reader behind.

use std::{
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use credbroker::{
    api::pb::{self, EventKind, watch_rotations_response::Message},
    app,
    broker::{
        Broker, BrokerSettings,
        context::RequestContext,
        error::BrokerError,
        ports::{MetadataStore, SecretStore},
        types::{CredentialSet, EventKind as DomainKind, ExchangeId, TenantId},
        validate::FormatCheckValidator,
    },
    cache::CredentialCache,
    clock::SystemClock,
    memstore::{MemoryMetadataStore, MemorySecretStore},
    rotation::{hub::Hub, retire},
};
use secrecy::{ExposeSecret as _, SecretString};
use tonic::Code;

use crate::support::{
    Env, TD, get_req, new_tenant, next_non_heartbeat, probe::ProbeMeta, probe::ProbeSecrets,
    rotate_n, store_n, watch_past_state, watch_req,
};

fn set(n: u32) -> CredentialSet {
    CredentialSet {
        api_key: format!("binanceKey{n:06}"),
        api_secret: SecretString::from(format!("binanceSecret{n:06}")),
        passphrase: None,
    }
}

fn mem_broker(secrets: Arc<dyn SecretStore>, meta: Arc<dyn MetadataStore>) -> Broker {
    Broker::new(
        secrets,
        meta,
        Arc::new(FormatCheckValidator),
        CredentialCache::new(64, time::Duration::minutes(5), time::Duration::hours(1)),
        Hub::new(64),
        Arc::new(SystemClock),
        BrokerSettings::default(),
    )
}

/// Two brokers on the same memory stores, version 1 stored through `a`;
/// `b` reads Vault through a probe that can hold a read.
struct Pair {
    meta: Arc<dyn MetadataStore>,
    a: Broker,
    b: Arc<Broker>,
    probe: Arc<ProbeSecrets>,
    tenant: TenantId,
}

impl Pair {
    /// `replicas`: the two brokers stand for two replicas (events reach
    /// `b` only as the listener would deliver them); else one process.
    async fn new(replicas: bool) -> Pair {
        let meta: Arc<dyn MetadataStore> = Arc::new(if replicas {
            MemoryMetadataStore::shared_by_replicas()
        } else {
            MemoryMetadataStore::default()
        });
        let inner: Arc<dyn SecretStore> = Arc::new(MemorySecretStore::default());
        let probe = ProbeSecrets::new(inner.clone());
        let a = mem_broker(inner, meta.clone());
        let b = Arc::new(mem_broker(probe.clone(), meta.clone()));
        let tenant = TenantId::new(uuid::Uuid::new_v4());
        a.validate_and_store(
            &RequestContext::system("test"),
            tenant,
            ExchangeId::Binance,
            set(1),
        )
        .await
        .unwrap();
        Pair {
            meta,
            a,
            b,
            probe,
            tenant,
        }
    }

    /// A GetCredentials on `b`, held between its row read and its Vault
    /// read until the returned sender fires.
    async fn held_get(
        &self,
    ) -> (
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<Result<credbroker::broker::CredentialView, BrokerError>>,
    ) {
        let paused = self.probe.pause_next_read();
        let (b, tenant) = (self.b.clone(), self.tenant);
        let early =
            tokio::spawn(async move { b.get_credentials(tenant, ExchangeId::Binance, 0).await });
        paused.reached.await.unwrap();
        (paused.release, early)
    }

    async fn get_on_b(&self) -> credbroker::broker::CredentialView {
        tokio::time::timeout(
            Duration::from_secs(5),
            self.b.get_credentials(self.tenant, ExchangeId::Binance, 0),
        )
        .await
        .expect("not joined to a held load")
        .unwrap()
    }

    /// Rotates to set 2 through `broker`.
    async fn rotate_to_v2(broker: &Broker, tenant: TenantId, overlap: Option<time::Duration>) {
        broker
            .rotate(
                &RequestContext::system("test"),
                tenant,
                ExchangeId::Binance,
                set(2),
                overlap,
            )
            .await
            .unwrap();
    }

    async fn last_event(&self) -> credbroker::broker::types::CredentialEvent {
        self.meta
            .events_after(self.tenant, 0, 100)
            .await
            .unwrap()
            .pop()
            .unwrap()
    }
}

/// The committing replica: a load holds v1 between its row read and its
/// Vault read while the same broker rotates to v2; the load ends after the
/// rotation and must not be cached.
#[tokio::test]
async fn a_load_that_raced_a_rotation_is_not_cached_in_memory() {
    let p = Pair::new(false).await;
    let (release, early) = p.held_get().await;
    Pair::rotate_to_v2(&p.b, p.tenant, None).await;
    release.send(()).unwrap();
    let early = early.await.unwrap().unwrap();
    assert_eq!(
        early.record().current_version,
        1,
        "issued before the rotation"
    );
    let next = p.get_on_b().await;
    assert_eq!(next.record().current_version, 2);
    assert_eq!(
        next.current().api_secret.expose_secret(),
        "binanceSecret000002"
    );
    assert!(!next.stale);
    assert_eq!(p.b.cache_stats().discarded, 1);
}

/// Another replica: the event reaches it (as the listener delivers it)
/// while its load is held, and nothing else touches the key: only the
/// floor keeps the held load out of the cache.
#[tokio::test]
async fn a_load_older_than_a_delivered_event_is_not_cached_in_memory() {
    let p = Pair::new(true).await;
    let (release, early) = p.held_get().await;
    Pair::rotate_to_v2(&p.a, p.tenant, None).await;
    p.b.deliver(p.last_event().await);
    release.send(()).unwrap();
    assert_eq!(early.await.unwrap().unwrap().record().current_version, 1);
    assert_eq!(p.get_on_b().await.record().current_version, 2);
    assert_eq!(p.b.cache_stats().discarded, 1);
}

/// Another replica, overlap 0: a caller after the event does not join the
/// held load, and the held load, whose version was destroyed meanwhile,
/// reads the row again rather than fail.
#[tokio::test]
async fn a_caller_after_an_event_starts_its_own_load_in_memory() {
    let p = Pair::new(true).await;
    let (release, early) = p.held_get().await;
    Pair::rotate_to_v2(&p.a, p.tenant, Some(time::Duration::ZERO)).await;
    let event = p.last_event().await;
    assert_eq!(event.kind, DomainKind::Rotated);
    p.b.deliver(event);
    // A caller after the event does not join the held load.
    assert_eq!(p.get_on_b().await.record().current_version, 2);
    release.send(()).unwrap();
    // The held load read a row whose version was destroyed meanwhile (an
    // overlap-0 revoke): it reads the row again rather than fail.
    let early = early.await.unwrap().unwrap();
    assert_eq!(early.record().current_version, 2);
    assert_eq!(p.get_on_b().await.record().current_version, 2);
}

/// The same race on real OpenBao and PostgreSQL, across two replicas with
/// the real event listener.
#[tokio::test]
async fn a_load_that_raced_a_rotation_is_not_cached_on_real_stores() {
    let env = Env::start().await;
    let mut backends = app::real_backends(&env.config).await.unwrap();
    // PostgreSQL's events reach every replica through its listener: no
    // broker on it may publish on commit too (which would deliver twice).
    assert_eq!(
        backends.meta.event_delivery(),
        credbroker::broker::ports::EventDelivery::Listener
    );
    let probe = ProbeSecrets::new(backends.secrets.clone());
    backends.secrets = probe.clone();
    let b = env.replica_with(backends, None).await;
    let tenant_s = new_tenant();
    let tenant: TenantId = tenant_s.parse().unwrap();
    let mut op = env.operator().await;
    op.validate_and_store(store_n(&tenant_s, "binance"))
        .await
        .unwrap();

    let mut delivered = b.broker.hub().subscribe();
    let paused = probe.pause_next_read();
    let early = {
        let broker = b.broker.clone();
        tokio::spawn(async move { broker.get_credentials(tenant, ExchangeId::Binance, 0).await })
    };
    paused.reached.await.unwrap();
    op.rotate(rotate_n(&tenant_s, "binance", 1)).await.unwrap();
    // Wait until replica B's listener applied the event.
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let ev = delivered.recv().await.unwrap();
            if ev.kind == DomainKind::Rotated {
                assert_eq!(ev.version, 2);
                return;
            }
        }
    })
    .await
    .expect("replica B applied the rotation");
    paused.release.send(()).unwrap();
    assert_eq!(early.await.unwrap().unwrap().record().current_version, 1);

    let mut on_b = env
        .client_at(b.addr, &format!("spiffe://{TD}/tenant/{tenant_s}/pod/b"))
        .await;
    let g = on_b
        .get_credentials(get_req(&tenant_s, "binance"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((g.version, g.stale), (2, false));
    assert_eq!(g.current.unwrap().api_secret, "binanceSecret000001");
    assert_eq!(b.broker.cache_stats().discarded, 1);
    b.stop().await.unwrap();
}

/// 1,000 concurrent GetCredentials on a cold key: one PostgreSQL read and
/// two Vault reads (current and previous, read together).
#[tokio::test]
async fn concurrent_misses_of_a_cold_key_share_one_load() {
    let env = Env::start().await;
    let (tenant_s, mut op) = env.stored_tenant().await;
    let tenant: TenantId = tenant_s.parse().unwrap();
    op.rotate(rotate_n(&tenant_s, "binance", 1)).await.unwrap();

    let mut backends = app::real_backends(&env.config).await.unwrap();
    let secrets = ProbeSecrets::new(backends.secrets.clone());
    let meta = ProbeMeta::new(backends.meta.clone());
    backends.secrets = secrets.clone();
    backends.meta = meta.clone();
    let b = env.replica_with(backends, None).await;

    let start = Arc::new(tokio::sync::Barrier::new(1000));
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let (broker, start) = (b.broker.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let v = broker
                .get_credentials(tenant, ExchangeId::Binance, 0)
                .await
                .unwrap();
            (
                v.record().current_version,
                v.previous().map(|(_, version, _)| version),
            )
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), (2, Some(1)));
    }
    let stats = b.broker.cache_stats();
    eprintln!(
        "single flight: {stats:?}, postgres reads {}, vault reads {}",
        meta.gets(),
        secrets.reads()
    );
    assert_eq!(meta.gets(), 1, "one PostgreSQL read");
    assert_eq!(secrets.reads(), 2, "current and previous, once each");
    assert_eq!(stats.loads, 1);
    assert_eq!(stats.coalesced + stats.hits, 999);
    b.stop().await.unwrap();
}

/// A fleet resuming on this replica at once (its other replica died)
/// shares the reads its streams start from: 1,000 opens, each resuming
/// after the same point, make a handful of PostgreSQL reads, not 3,000,
/// and every one starts from the current state and sees the next event.
#[tokio::test]
async fn streams_that_open_together_share_their_starting_reads() {
    use credbroker::rotation::watch::{StreamTiming, Subscription, Watch, WatchItem};
    use futures::StreamExt as _;
    let env = Env::start().await;
    let (tenant_s, mut op) = env.stored_tenant().await;
    let tenant: TenantId = tenant_s.parse().unwrap();
    op.rotate(rotate_n(&tenant_s, "binance", 1)).await.unwrap();
    // The pods resume after the last event they saw: the rotation.
    let resume_at = env.broker().metadata().snapshot(tenant).await.unwrap().1;

    let mut backends = app::real_backends(&env.config).await.unwrap();
    let meta = ProbeMeta::new(backends.meta.clone());
    backends.meta = meta.clone();
    let b = env.replica_with(backends, None).await;

    let n = 1000;
    let start = Arc::new(tokio::sync::Barrier::new(n));
    let cancel = tokio_util::sync::CancellationToken::new();
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (broker, start, cancel) = (b.broker.clone(), start.clone(), cancel.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let sub = Subscription {
                tenant,
                exchanges: Default::default(),
                after_seq: resume_at,
            };
            let timing = StreamTiming {
                heartbeat: Duration::from_secs(30),
                max_age: None,
            };
            let mut s = Box::pin(Watch::new(broker, sub, timing, cancel, None).into_stream());
            let first = s.next().await;
            (first, s)
        }));
    }
    let mut streams = Vec::new();
    for t in tasks {
        let (first, s) = t.await.unwrap();
        let Some(WatchItem::State(r)) = first else {
            panic!("the state first, got {first:?}")
        };
        assert_eq!(r.current_version, 2);
        streams.push(s);
    }
    let [state, events, retention] = meta.open_reads();
    eprintln!("{n} opens: {state} state reads, {events} event reads, {retention} retention reads");
    for (what, reads) in [
        ("state", state),
        ("events", events),
        ("retention", retention),
    ] {
        assert!(
            (1..n / 10).contains(&reads),
            "{what}: {reads} reads for {n} opens"
        );
    }
    // Every stream sees the next change.
    op.rotate(rotate_n(&tenant_s, "binance", 2)).await.unwrap();
    for s in &mut streams {
        let e = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match s.next().await {
                    Some(WatchItem::Event(e)) => return e,
                    Some(WatchItem::Heartbeat { .. }) => continue,
                    other => panic!("{other:?}"),
                }
            }
        })
        .await
        .expect("every stream got the rotation");
        assert_eq!(e.version, 3);
    }
    cancel.cancel();
    drop(streams);
    b.stop().await.unwrap();
}

/// A destroyed previous version is served without it (not UNAVAILABLE); a
/// destroyed current version is DATA_LOSS with advice, and a Rotate repairs
/// it; health stays SERVING throughout (Vault is up).
#[tokio::test]
async fn destroyed_versions_are_not_reported_as_an_outage() {
    let env = Env::start().await;
    let (tenant, mut op) = env.stored_tenant().await;
    op.rotate(rotate_n(&tenant, "binance", 1)).await.unwrap();
    let path = env.credential_path(&tenant, "binance");
    let destroy = |v: u32| {
        let (bao, path) = (&env.bao, path.clone());
        async move {
            let (code, _) = bao
                .http(
                    "POST",
                    &format!("/v1/secret/destroy/{path}"),
                    Some(&format!("{{\"versions\":[{v}]}}")),
                )
                .await
                .unwrap();
            assert_eq!(code, 204);
        }
    };
    destroy(1).await;
    // A cold replica reads the row (previous = 1) and finds it destroyed.
    let b = env.replica(None).await;
    let mut on_b = env
        .client_at(b.addr, &format!("spiffe://{TD}/operator/b"))
        .await;
    let g = on_b
        .get_credentials(get_req(&tenant, "binance"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((g.version, g.previous_version), (2, None));

    destroy(2).await;
    let c = env.replica(None).await;
    let mut on_c = env
        .client_at(c.addr, &format!("spiffe://{TD}/operator/c"))
        .await;
    let e = on_c
        .get_credentials(get_req(&tenant, "binance"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");
    assert!(
        e.message().contains("rotate in a new set"),
        "{}",
        e.message()
    );
    // Rotating over the lost version repairs it.
    on_c.rotate(rotate_n(&tenant, "binance", 2)).await.unwrap();
    let g = on_c
        .get_credentials(get_req(&tenant, "binance"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(g.version, 3);
    b.stop().await.unwrap();
    c.stop().await.unwrap();
}

/// Every Vault answer the adapter can meet, from the real OpenBao where it
/// can give it, and from loopback stand-ins for a proxy's 502, a closed
/// port and a server that never answers.
#[tokio::test]
async fn vault_answers_are_classified_by_status_and_shape() {
    use credbroker::{
        broker::error::SecretStoreError as E, config::VaultAuthConfig, vault::VaultSecretStore,
    };
    // It seals its OpenBao.
    let env = Env::start_own_vault().await;
    let store = VaultSecretStore::connect(&env.config.vault).await.unwrap();
    let path = "tenants/classify/exchanges/binance/credentials";
    assert_eq!(store.write(path, &set(1), 0).await.unwrap(), 1);
    assert_eq!(store.write(path, &set(2), 1).await.unwrap(), 2);
    // A lost check-and-set.
    assert!(matches!(
        store.write(path, &set(3), 1).await,
        Err(E::CasConflict { .. })
    ));
    // 404 destroyed.
    store.destroy_versions(path, &[1]).await.unwrap();
    assert!(matches!(
        store.read(path, 1).await,
        Err(E::NotFound { version: 1, .. })
    ));
    // 404 missing: a version never written, and a path never written.
    assert!(matches!(store.read(path, 9).await, Err(E::NotFound { .. })));
    assert!(matches!(
        store.read("tenants/none/x", 1).await,
        Err(E::NotFound { .. })
    ));
    assert_eq!(
        store.read(path, 2).await.unwrap().api_key,
        "binanceKey000002"
    );

    // 403: a token whose policy cannot read the path.
    let (code, _) = env
        .bao
        .http(
            "PUT",
            "/v1/sys/policies/acl/nothing",
            Some(r#"{"policy":"path \"sys/nothing\" { capabilities = [\"read\"] }"}"#),
        )
        .await
        .unwrap();
    assert_eq!(code, 204);
    let (code, body) = env
        .bao
        .http(
            "POST",
            "/v1/auth/token/create",
            Some(r#"{"policies":["nothing"]}"#),
        )
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let token: serde_json::Value = serde_json::from_str(&body).unwrap();
    let mut cfg = env.config.vault.clone();
    cfg.auth = VaultAuthConfig::Token {
        token: token["auth"]["client_token"]
            .as_str()
            .unwrap()
            .to_owned()
            .into(),
    };
    let weak = VaultSecretStore::connect(&cfg).await.unwrap();
    assert!(matches!(weak.read(path, 2).await, Err(E::Denied(_))));

    // A proxy's 502 in front of Vault.
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_addr = proxy.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        while let Ok((mut s, _)) = proxy.accept().await {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/html\r\ncontent-length: 11\r\nconnection: close\r\n\r\n<html></html>")
                .await;
        }
    });
    let mut cfg = env.config.vault.clone();
    cfg.addr = format!("http://{proxy_addr}");
    let behind_proxy = VaultSecretStore::connect(&cfg).await.unwrap();
    assert!(
        matches!(behind_proxy.read(path, 2).await, Err(E::Unavailable(m)) if m.contains("502"))
    );

    // A server that accepts and never answers: a timeout.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut cfg = env.config.vault.clone();
    cfg.addr = format!("http://{}", silent.local_addr().unwrap());
    cfg.timeout_ms = 300;
    let hung = VaultSecretStore::connect(&cfg).await.unwrap();
    assert!(matches!(hung.read(path, 2).await, Err(E::Unavailable(m)) if m.contains("in time")));
    drop(silent);

    // Connection refused.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut cfg = env.config.vault.clone();
    cfg.addr = format!("http://{closed}");
    let refused = VaultSecretStore::connect(&cfg).await.unwrap();
    assert!(
        matches!(refused.read(path, 2).await, Err(E::Unavailable(m)) if m.contains("cannot reach"))
    );

    // Sealed: 503.
    let (code, body) = env.bao.http("PUT", "/v1/sys/seal", None).await.unwrap();
    assert_eq!(code, 204, "{body}");
    assert!(matches!(store.read(path, 2).await, Err(E::Unavailable(m)) if m.contains("sealed")));
}

/// The retire job's sweep destroys versions no row references once they
/// are older than the grace, never the current or previous one, and
/// removes a path that no row references at all.
#[tokio::test]
async fn the_sweep_destroys_orphaned_versions_only() {
    let env = Env::start().await;
    let (tenant, mut op) = env.stored_tenant().await;
    // Two orphans, as the loser of a concurrent Rotate leaves them: written
    // in Vault, never committed.
    let path = env.credential_path(&tenant, "binance");
    let secrets = env.broker().secrets().clone();
    secrets.write(&path, &set(7), 1).await.unwrap();
    secrets.write(&path, &set(8), 2).await.unwrap();
    // Then a committed rotation (v4, previous v1).
    op.rotate(rotate_n(&tenant, "binance", 4)).await.unwrap();
    // A path no row references (a first store that crashed before its row).
    let stray = env.credential_path(&new_tenant(), "kraken");
    secrets.write(&stray, &set(9), 0).await.unwrap();

    // Younger than the grace: untouched.
    assert_eq!(
        retire::sweep_orphans(env.broker(), time::Duration::hours(1))
            .await
            .unwrap(),
        0
    );
    let destroyed = retire::sweep_orphans(env.broker(), time::Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(
        destroyed, 3,
        "versions 2 and 3, and the stray path's version 1"
    );
    let (_, meta) = env.kv_metadata(&path).await;
    let d = |v: &str| meta["data"]["versions"][v]["destroyed"].as_bool().unwrap();
    assert_eq!((d("1"), d("2"), d("3"), d("4")), (false, true, true, false));
    let (code, _) = env.kv_metadata(&stray).await;
    assert_eq!(code, 404, "the stray path is gone");
    // Both served versions still read.
    let g = op
        .get_credentials(get_req(&tenant, "binance"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((g.version, g.previous_version), (4, Some(1)));
    // A second sweep finds nothing.
    assert_eq!(
        retire::sweep_orphans(env.broker(), time::Duration::ZERO)
            .await
            .unwrap(),
        0
    );
}

/// A resume point ahead of the log is answered OUT_OF_RANGE with the head,
/// never a silent stream; heartbeats carry the head.
#[tokio::test]
async fn a_resume_point_ahead_of_the_log_asks_for_a_resync() {
    let env = Env::start().await;
    let (tenant, mut op) = env.stored_tenant().await;
    let mut s = watch_past_state(&mut op, &tenant).await;
    let hb = loop {
        match s.message().await.unwrap().unwrap().message.unwrap() {
            Message::Heartbeat(h) => break h,
            _ => continue,
        }
    };
    assert!(hb.head_seq >= 1 && hb.head_seq == hb.seq, "{hb:?}");
    let ahead = hb.head_seq + 1000;
    let mut s = op
        .watch_rotations(watch_req(&tenant, ahead))
        .await
        .unwrap()
        .into_inner();
    let e = tokio::time::timeout(Duration::from_secs(5), s.message())
        .await
        .expect("answered at once, not silently")
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange);
    assert!(
        e.message().contains(&format!("({})", hb.head_seq)),
        "{}",
        e.message()
    );
    assert!(e.message().contains("after_seq=0"), "{}", e.message());
}

/// Rotations in bursts through replica A while tasks read through replica
/// B. The first read a subscriber issues after an event never returns an
/// older version: on B (whose listener applied the event before publishing
/// it), and on B for a subscriber of A that passes the announced version
/// (`min_version`). Afterwards both replicas serve the last version.
#[tokio::test]
async fn bursts_of_rotations_leave_no_reader_behind() {
    const BURSTS: u32 = 5;
    const PER_BURST: u32 = 8;
    let env = Env::start().await;
    let b = env.replica(None).await;
    let tenant = new_tenant();
    let mut on_a = env.operator().await;
    on_a.validate_and_store(store_n(&tenant, "binance"))
        .await
        .unwrap();
    let pod_b = env
        .client_at(b.addr, &format!("spiffe://{TD}/tenant/{tenant}/pod/b"))
        .await;

    // Background readers on B.
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for _ in 0..4 {
        let (mut c, stop, tenant) = (pod_b.clone(), stop.clone(), tenant.clone());
        readers.push(tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                c.get_credentials(get_req(&tenant, "binance"))
                    .await
                    .unwrap();
                n += 1;
            }
            n
        }));
    }
    // A subscriber on B reading through B, and one on A reading through B
    // with the announced version.
    let subscriber = |mut watch_client: pb::credential_broker_client::CredentialBrokerClient<_>,
                      mut read_client: pb::credential_broker_client::CredentialBrokerClient<_>,
                      pass_version: bool| {
        let tenant = tenant.clone();
        let (ready_tx, ready) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut s = watch_past_state(&mut watch_client, &tenant).await;
            ready_tx.send(()).unwrap();
            let mut seen = BTreeSet::new();
            while seen.len() < (BURSTS * PER_BURST) as usize {
                let Message::Event(e) = next_non_heartbeat(&mut s).await else {
                    continue;
                };
                assert_eq!(e.kind, EventKind::Rotated as i32);
                let mut req = get_req(&tenant, "binance");
                if pass_version {
                    req.min_version = e.version;
                }
                let g = read_client.get_credentials(req).await.unwrap().into_inner();
                assert!(
                    g.version >= e.version,
                    "read after event v{} returned v{}",
                    e.version,
                    g.version
                );
                seen.insert(e.version);
            }
            seen.len()
        });
        (task, ready)
    };
    let (on_b_watch, ready_b) = subscriber(pod_b.clone(), pod_b.clone(), false);
    let (on_a_watch, ready_a) = subscriber(env.operator().await, pod_b.clone(), true);
    ready_b.await.unwrap();
    ready_a.await.unwrap();

    let mut n = 0;
    for _ in 0..BURSTS {
        for _ in 0..PER_BURST {
            n += 1;
            on_a.rotate(rotate_n(&tenant, "binance", n)).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let last = u64::from(n) + 1;
    for w in [on_b_watch, on_a_watch] {
        let seen = tokio::time::timeout(Duration::from_secs(30), w)
            .await
            .expect("subscriber saw every event")
            .unwrap();
        assert_eq!(seen, (BURSTS * PER_BURST) as usize);
    }
    stop.store(true, Ordering::Relaxed);
    let mut reads = 0;
    for r in readers {
        reads += r.await.unwrap();
    }
    assert!(reads > 0);
    for mut c in [on_a.clone(), pod_b.clone()] {
        let g = c
            .get_credentials(get_req(&tenant, "binance"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(g.version, last);
    }
    eprintln!(
        "burst: {reads} background reads on B; B cache {:?}",
        b.broker.cache_stats()
    );
    b.stop().await.unwrap();
}

/// A failed shared load hands every waiter the same clear error.
#[tokio::test]
async fn a_missing_credential_is_not_found_for_every_waiter() {
    let meta: Arc<dyn MetadataStore> = Arc::new(MemoryMetadataStore::default());
    let b = Arc::new(mem_broker(Arc::new(MemorySecretStore::default()), meta));
    let tenant = TenantId::new(uuid::Uuid::new_v4());
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            b.get_credentials(tenant, ExchangeId::Okx, 0).await
        }));
    }
    for t in tasks {
        assert!(matches!(
            t.await.unwrap(),
            Err(BrokerError::NotFound { .. })
        ));
    }
}
