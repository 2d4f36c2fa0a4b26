//! Where webhooks may go (SSRF), and how they are delivered: refused
//! targets in every spelling, at SetWebhook and again at every delivery
//! after a fresh resolution; connections only to the addresses checked; no
//! redirect followed; one hanging receiver delays only its own tenant.
//!
//! No test here sends a packet off loopback, even if the code under test
//! were wrong: names resolve through a map the test owns, and dials go
//! through a connector that records every address it is asked for and
//! connects only to loopback (the receivers), refusing everything else
//! without touching the network.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use credbroker::{
    broker::{
        Broker, BrokerSettings,
        context::RequestContext,
        error::BrokerError,
        ports::{HealthUpdate, MetadataStore, Notice, SecretStore, WebhookStore},
        types::{CredentialSet, CredentialStatus, ExchangeId, HealthStatus, TenantId},
        validate::FormatCheckValidator,
    },
    cache::CredentialCache,
    clock::SystemClock,
    memstore::{MemoryMetadataStore, MemorySecretStore},
    rotation::hub::Hub,
    telemetry::metrics::{Metrics, ResultLabel, TenantLabel},
    webhook::{
        Connect, Deliverer, DeliveryLimits, Resolve, TargetPolicy, Targets, target::internal_range,
    },
};
use secrecy::SecretString;

/// Names the test resolves, changeable mid-test (a rebinding DNS).
#[derive(Default)]
struct MapResolver(Mutex<HashMap<String, Vec<IpAddr>>>);

impl MapResolver {
    fn set(&self, name: &str, ips: &[&str]) {
        self.0.lock().unwrap().insert(
            name.to_owned(),
            ips.iter().map(|ip| ip.parse().unwrap()).collect(),
        );
    }
}

#[async_trait::async_trait]
impl Resolve for MapResolver {
    async fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
        self.0
            .lock()
            .unwrap()
            .get(host)
            .map(|ips| ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect())
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no such name"))
    }
}

/// Records every address it is asked to dial; dials loopback only.
#[derive(Default)]
struct RecordingConnect(Mutex<Vec<SocketAddr>>);

impl RecordingConnect {
    fn asked(&self) -> Vec<SocketAddr> {
        self.0.lock().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl Connect for RecordingConnect {
    async fn connect(&self, addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        self.0.lock().unwrap().push(addr);
        if addr.ip().is_loopback() {
            tokio::net::TcpStream::connect(addr).await
        } else {
            Err(std::io::Error::other("not dialed: outside loopback (test)"))
        }
    }
}

struct World {
    broker: Broker,
    meta: Arc<MemoryMetadataStore>,
    secrets: Arc<MemorySecretStore>,
    targets: Arc<Targets>,
    resolver: Arc<MapResolver>,
}

fn world(policy: TargetPolicy) -> World {
    let meta = Arc::new(MemoryMetadataStore::default());
    let secrets = Arc::new(MemorySecretStore::default());
    let resolver = Arc::new(MapResolver::default());
    let targets = Arc::new(Targets {
        policy,
        resolver: resolver.clone(),
    });
    let broker = Broker::new(
        secrets.clone(),
        meta.clone(),
        Arc::new(FormatCheckValidator),
        CredentialCache::new(16, time::Duration::minutes(5), time::Duration::hours(1)),
        Hub::new(16),
        Arc::new(SystemClock),
        BrokerSettings::default(),
    )
    .with_webhooks(meta.clone(), targets.clone());
    World {
        broker,
        meta,
        secrets,
        targets,
        resolver,
    }
}

fn ctx() -> RequestContext {
    RequestContext::system("test")
}

/// Every refused spelling the review tried, and names resolving inward.
#[tokio::test]
async fn set_webhook_refuses_internal_targets_in_every_spelling() {
    let w = world(TargetPolicy::default());
    w.resolver.set("inward.test", &["10.0.0.5"]);
    w.resolver
        .set("mixed.test", &["93.184.216.34", "169.254.169.254"]);
    w.resolver.set("mapped.test", &["::ffff:192.168.0.1"]);
    w.resolver.set("public.test", &["93.184.216.34"]);
    let refused = [
        "http://127.0.0.1:9/x",
        "https://127.0.0.1:9/x",
        "https://localhost/x",
        "https://169.254.169.254/latest/meta-data/",
        "https://10.0.0.1/x",
        "https://172.16.0.1/x",
        "https://192.168.1.1/x",
        "https://100.64.0.1/x",
        "https://0.0.0.0/x",
        "https://[::1]/x",
        "https://[fc00::1]/x",
        "https://[fe80::1]/x",
        "https://[::ffff:127.0.0.1]/x",
        "https://2130706433/x",
        "https://0177.0.0.1/x",
        "https://0x7f.0.0.1/x",
        "https://224.0.0.1/x",
        "http://public.test/x",
        "https://inward.test/x",
        "https://mixed.test/x",
        "https://mapped.test/x",
        "https://unknown.test/x",
        "https://user:pw@public.test/x",
        "ftp://public.test/x",
    ];
    for url in refused {
        let tenant = TenantId::new(uuid::Uuid::new_v4());
        match w.broker.set_webhook(&ctx(), tenant, url, None).await {
            Err(BrokerError::InvalidArgument {
                field: "url",
                reason,
            }) => {
                // The reason names the host at most, never the path.
                assert!(!reason.contains("/x"), "{url}: {reason}");
            }
            other => panic!("{url} must be refused, got {other:?}"),
        }
        assert_eq!(w.meta.webhook(tenant).await.unwrap(), None, "{url}");
        let path = credbroker::webhook::secret_path("tenants", tenant);
        assert_eq!(
            w.secrets.latest_version(&path).await.unwrap(),
            None,
            "{url}"
        );
    }
    // A public receiver is accepted; what is shown of it is the host.
    let tenant = TenantId::new(uuid::Uuid::new_v4());
    let (shown, secret) = w
        .broker
        .set_webhook(&ctx(), tenant, "https://public.test/T000/B000/s3cr3t", None)
        .await
        .unwrap();
    assert_eq!(shown, "https://public.test/…");
    assert!(secret.is_some());
    let stored = w.meta.webhook(tenant).await.unwrap().unwrap();
    assert_eq!(stored.host, "public.test");
    // The full URL lives with the signing secret in the secret store.
    let path = credbroker::webhook::secret_path("tenants", tenant);
    let set = w.secrets.read(&path, stored.secret_version).await.unwrap();
    assert_eq!(
        secrecy::ExposeSecret::expose_secret(set.passphrase.as_ref().unwrap()),
        "https://public.test/T000/B000/s3cr3t"
    );
}

/// The operator's allow-list opens internal receivers, and only those.
#[tokio::test]
async fn operators_allow_internal_receivers_by_network_or_host() {
    let w = world(TargetPolicy {
        allow_http: true,
        allow_networks: vec!["10.20.0.0/16".parse().unwrap()],
        allow_hosts: ["hooks.internal".to_owned()].into(),
    });
    w.resolver.set("hooks.internal", &["192.168.5.5"]);
    w.resolver.set("other.internal", &["192.168.5.6"]);
    for ok in ["http://10.20.1.1/x", "https://hooks.internal/x"] {
        let t = TenantId::new(uuid::Uuid::new_v4());
        w.broker.set_webhook(&ctx(), t, ok, None).await.unwrap();
    }
    for refused in ["http://10.21.1.1/x", "https://other.internal/x"] {
        let t = TenantId::new(uuid::Uuid::new_v4());
        assert!(
            w.broker
                .set_webhook(&ctx(), t, refused, None)
                .await
                .is_err(),
            "{refused}"
        );
    }
    assert!(internal_range("10.20.1.1".parse().unwrap()).is_some());
}

/// Set when a request's handler ends (answered, or dropped because the
/// client gave up and closed the connection).
struct Ended(Arc<std::sync::atomic::AtomicBool>);

impl Drop for Ended {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

type Received = (
    u16,
    Arc<Mutex<Vec<String>>>,
    Arc<tokio::sync::Notify>,
    Arc<std::sync::atomic::AtomicBool>,
);

/// A receiver on loopback: answers each POST with `status` (and a
/// `Location` inward), or holds it until released while `hang` is set.
/// Returns its port, the bodies it received, the release and whether a
/// request's handler has ended.
async fn receiver(status: u16, hang: bool) -> Received {
    let got = Arc::new(Mutex::new(Vec::new()));
    let release = Arc::new(tokio::sync::Notify::new());
    let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (g, r, e) = (got.clone(), release.clone(), ended.clone());
    let app = axum::Router::new().fallback(move |body: String| {
        let (g, r, e) = (g.clone(), r.clone(), e.clone());
        async move {
            let _ended = Ended(e);
            g.lock().unwrap().push(body);
            if hang {
                r.notified().await;
            }
            (
                axum::http::StatusCode::from_u16(status).unwrap(),
                [("location", "http://169.254.169.254/latest/meta-data/")],
                "",
            )
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (port, got, release, ended)
}

/// A stored credential and a queued webhook message for `tenant`.
async fn queue_message(w: &World, tenant: TenantId) {
    w.broker
        .validate_and_store(
            &ctx(),
            tenant,
            ExchangeId::Binance,
            CredentialSet {
                api_key: "hookKey000001".into(),
                api_secret: SecretString::from("hookSecret00001".to_owned()),
                passphrase: None,
            },
        )
        .await
        .unwrap();
    let now = time::OffsetDateTime::now_utc();
    w.meta
        .record_health(HealthUpdate {
            tenant,
            exchange: ExchangeId::Binance,
            health: HealthStatus::Unhealthy,
            status: CredentialStatus::Invalid,
            detail: None,
            permissions: None,
            checked_at: now,
            by: credbroker::broker::ports::ChangedBy {
                actor: "test".into(),
                request_id: Some(uuid::Uuid::now_v7()),
            },
            notice: Some(Notice {
                id: uuid::Uuid::new_v4(),
                event_type: "credential.invalidated",
                payload: format!("{{\"tenant\":\"{tenant}\"}}"),
                at: now,
            }),
        })
        .await
        .unwrap();
}

fn deliverer(w: &World, connect: Arc<RecordingConnect>, metrics: &Metrics) -> Arc<Deliverer> {
    Arc::new(
        Deliverer::new(
            Arc::new(credbroker::audit::Discard),
            w.meta.clone(),
            w.secrets.clone(),
            "tenants",
            metrics.clone(),
            w.targets.clone(),
            connect,
            DeliveryLimits::default(),
        )
        .unwrap(),
    )
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The name is resolved again at delivery: a DNS answer that turned inward
/// since SetWebhook is refused without a dial; a redirect inward is not
/// followed (the only address dialed is the receiver's).
#[tokio::test]
async fn deliveries_check_again_dial_only_checked_addresses_and_follow_no_redirect() {
    let w = world(TargetPolicy {
        allow_http: true,
        allow_networks: vec!["127.0.0.0/8".parse().unwrap()],
        ..TargetPolicy::default()
    });
    let (port, got, _, _) = receiver(307, false).await;
    w.resolver.set("rebind.test", &["127.0.0.1"]);
    let tenant = TenantId::new(uuid::Uuid::new_v4());
    w.broker
        .set_webhook(
            &ctx(),
            tenant,
            &format!("http://rebind.test:{port}/hook"),
            None,
        )
        .await
        .unwrap();
    queue_message(&w, tenant).await;
    // Now the name points at the cloud metadata service.
    w.resolver.set("rebind.test", &["169.254.169.254"]);
    let connect = Arc::new(RecordingConnect::default());
    let metrics = Metrics::new();
    let d = deliverer(&w, connect.clone(), &metrics);
    let cancel = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(
        d.clone()
            .task_main(Duration::from_millis(20), cancel.clone()),
    );
    let retries = metrics
        .families()
        .webhook_deliveries
        .get_or_create(&ResultLabel { result: "retry" })
        .clone();
    until("the first attempt", || retries.get() >= 1).await;
    assert_eq!(connect.asked(), vec![], "a refused target is never dialed");
    assert!(got.lock().unwrap().is_empty());
    let backlog = metrics
        .families()
        .webhook_backlog
        .get_or_create(&TenantLabel {
            tenant_id: tenant.to_string(),
        })
        .clone();
    until("the backlog gauge", || backlog.get() == 1).await;
    cancel.cancel();
    task.await.unwrap();

    // Back to loopback: the receiver answers 307 towards the metadata
    // service; the deliverer records a retry and dials nothing else.
    w.resolver.set("rebind.test", &["127.0.0.1"]);
    let cancel = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(
        d.clone()
            .task_main(Duration::from_millis(20), cancel.clone()),
    );
    until("the second attempt", || retries.get() >= 2).await;
    cancel.cancel();
    task.await.unwrap();
    assert_eq!(
        got.lock().unwrap().len(),
        1,
        "the receiver got the message once"
    );
    let asked = connect.asked();
    assert!(!asked.is_empty());
    assert!(
        asked
            .iter()
            .all(|a| *a == SocketAddr::from(([127, 0, 0, 1], port))),
        "only the checked receiver was dialed: {asked:?}"
    );
}

/// Tenant A's receiver hangs; tenant B's message is delivered meanwhile.
#[tokio::test]
async fn a_hanging_receiver_delays_only_its_own_tenant() {
    let w = world(TargetPolicy {
        allow_http: true,
        allow_networks: vec!["127.0.0.0/8".parse().unwrap()],
        ..TargetPolicy::default()
    });
    let (slow_port, slow_got, release, slow_ended) = receiver(204, true).await;
    let (fast_port, fast_got, _, _) = receiver(204, false).await;
    let (a, b) = (
        TenantId::new(uuid::Uuid::new_v4()),
        TenantId::new(uuid::Uuid::new_v4()),
    );
    // A's message is queued first, so it is claimed first.
    for (t, port) in [(a, slow_port), (b, fast_port)] {
        w.broker
            .set_webhook(&ctx(), t, &format!("http://127.0.0.1:{port}/hook"), None)
            .await
            .unwrap();
        queue_message(&w, t).await;
    }
    let metrics = Metrics::new();
    let d = deliverer(&w, Arc::new(RecordingConnect::default()), &metrics);
    let cancel = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(d.task_main(Duration::from_millis(20), cancel.clone()));
    until("B delivered", || fast_got.lock().unwrap().len() == 1).await;
    // A's receiver has the request and is still holding it: A's attempt
    // has not ended (no timeout, no give-up) and B did not wait for it.
    assert_eq!(slow_got.lock().unwrap().len(), 1);
    assert!(
        !slow_ended.load(std::sync::atomic::Ordering::SeqCst),
        "B was delivered only after A's attempt ended"
    );
    release.notify_waiters();
    cancel.cancel();
    task.await.unwrap();
}
