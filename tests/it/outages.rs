//! Backend outages under load, each test printing failed calls by code,
//! stale serves and recovery times: PostgreSQL restarts on a private
//! PostgreSQL the test starts (never the shared one), stopped fast, then
//! immediately (a crash), each time kept down and started again; and Vault
//! taken away entirely (a gate in front of OpenBao cuts and refuses every
//! connection) and given back.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use credbroker::{
    api::pb::{self, watch_rotations_response::Message},
    broker::types::ExchangeId,
    config::{ValidationConfig, ValidationMode},
    exchange::sim::{SimKey, Simulators, native_permissions},
};

use crate::{
    exchanges::{endpoints, register, store_req},
    support::{
        PrivateEnv, Receiver, TD, get_req, new_tenant, next_non_heartbeat, rotate_n, store_n,
        watch_past_state,
    },
};

/// How long PostgreSQL stays down each time.
const PG_DOWN: Duration = Duration::from_secs(10);

/// PostgreSQL stopped (fast, then immediate) for 10 s each time under
/// cached reads and a Rotate every 100 ms (keys validated against the
/// exchange simulators), with a webhook waiting for its retry: cached reads
/// never fail, writes are refused with UNAVAILABLE only and come back
/// within 5 s, every committed event reaches the subscriber once, in order,
/// and every audit record and the webhook arrive once PostgreSQL is back.
#[tokio::test]
async fn postgres_restarts_keep_cached_reads_refuse_writes_and_lose_no_event_record_or_webhook() {
    let sims = Simulators::start().await.unwrap();
    // Every key the writer will rotate in is live at the exchange.
    for ex in [ExchangeId::Binance, ExchangeId::Bybit] {
        for n in 0..1000 {
            sims.add_key(
                ex,
                &format!("{ex}Key{n:06}"),
                SimKey::hmac(
                    &format!("{ex}Secret{n:06}"),
                    native_permissions(ex, false, true),
                ),
            );
        }
    }
    let PrivateEnv {
        pg,
        bao: _bao,
        pki,
        running,
        operator: mut op,
    } = PrivateEnv::start_with(|c| {
        c.validation = ValidationConfig {
            mode: ValidationMode::Exchange,
            exchanges: endpoints(&sims),
            ..ValidationConfig::default()
        };
    })
    .await;
    let tenant = new_tenant();
    for ex in ["binance", "bybit"] {
        op.validate_and_store(store_n(&tenant, ex)).await.unwrap();
    }
    // A webhook whose first attempt is refused (503): its retry comes due
    // while PostgreSQL is down.
    let receiver = Receiver::for_tenant(&mut op, &tenant, 1).await;
    let (kr_key, kr_secret, _) = register(&sims, ExchangeId::Kraken, "outage", false);
    op.validate_and_store(store_req(
        &tenant,
        ExchangeId::Kraken,
        &kr_key,
        &kr_secret,
        None,
    ))
    .await
    .unwrap();
    let mut pod = credbroker::api::pb::credential_broker_client::CredentialBrokerClient::new(
        pki.channel(
            running.addr,
            &[&format!("spiffe://{TD}/tenant/{tenant}/pod/p")],
        )
        .await,
    );
    // Warm: both sets cached on this replica.
    for ex in ["binance", "bybit"] {
        pod.get_credentials(get_req(&tenant, ex)).await.unwrap();
    }
    let connect = || async {
        let (client, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
    };
    let watched_from: i64 = connect()
        .await
        .query_one("SELECT coalesce(max(seq), 0) FROM credential_events", &[])
        .await
        .unwrap()
        .get(0);
    let mut stream = watch_past_state(&mut op.clone(), &tenant).await;

    let stop = Arc::new(AtomicBool::new(false));
    let (reads, failed_reads) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let reader = {
        let (stop, reads, failed, t, mut pod) = (
            stop.clone(),
            reads.clone(),
            failed_reads.clone(),
            tenant.clone(),
            pod.clone(),
        );
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                reads.fetch_add(1, Ordering::Relaxed);
                // bybit is never rotated: always a cache hit; binance is
                // rotated every 100 ms right up to each outage, by this
                // replica, which holds each set it commits.
                let ex = ["bybit", "binance"][i % 2];
                i += 1;
                if pod.get_credentials(get_req(&t, ex)).await.is_err() {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let log = Arc::new(Mutex::new(Vec::new()));
    let writer = {
        let (stop, log, t, mut op) = (stop.clone(), log.clone(), tenant.clone(), op.clone());
        tokio::spawn(async move {
            let mut n = 2;
            while !stop.load(Ordering::Relaxed) {
                let r = op.rotate(rotate_n(&t, "binance", n)).await;
                if r.is_ok() {
                    n += 1;
                }
                log.lock()
                    .unwrap()
                    .push((Instant::now(), r.map(drop).map_err(|e| e.code())));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    // Revoked at the exchange: the health check invalidates the key and
    // queues the webhook, whose first attempt the receiver refuses.
    sims.update_key(ExchangeId::Kraken, &kr_key, |k| {
        k.secret = "revokedAtTheExchange0000".into();
    });
    let round = running.checks.round().await.unwrap();
    assert_eq!(round.count("refused"), 1, "{round:?}");
    let first_attempt = Instant::now();
    while receiver.requests().is_empty() {
        assert!(first_attempt.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut report = Vec::new();
    for mode in ["fast", "immediate"] {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let down = Instant::now();
        pg.stop_mode(mode);
        tokio::time::sleep(PG_DOWN).await;
        // The webhook's retry came due during the first outage (2.5–5 s
        // after its first attempt) and could not be claimed.
        if mode == "fast" {
            assert_eq!(receiver.requests().len(), 1, "nothing delivered while down");
        }
        pg.pg_ctl_start();
        let back = Instant::now();
        // Writes work again: the first success after PostgreSQL returned.
        let recovered = loop {
            let first = log
                .lock()
                .unwrap()
                .iter()
                .find(|(at, r)| *at > back && r.is_ok())
                .map(|(at, _)| at.duration_since(back));
            if let Some(d) = first {
                break d;
            }
            assert!(
                back.elapsed() < Duration::from_secs(15),
                "writes did not recover"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let mut codes: BTreeMap<String, usize> = BTreeMap::new();
        for (at, r) in log.lock().unwrap().iter() {
            if *at > down
                && let Err(c) = r
            {
                *codes.entry(format!("{c:?}")).or_default() += 1;
            }
        }
        report.push(format!(
            "{mode}: writes back {recovered:?} after PostgreSQL returned, refused {codes:?}"
        ));
        assert!(recovered < Duration::from_secs(5), "{mode}: {recovered:?}");
        assert!(
            codes.keys().all(|c| c == "Unavailable"),
            "{mode}: writes during the outage are UNAVAILABLE only: {codes:?}"
        );
        // Only this outage's refusals count next time.
        log.lock().unwrap().retain(|(at, _)| *at > back);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    reader.await.unwrap();
    writer.await.unwrap();

    // Every committed event (rotations and the invalidation) reached the
    // subscriber exactly once.
    let client = connect().await;
    let committed: Vec<i64> = client
        .query(
            "SELECT seq FROM credential_events WHERE seq > $1 ORDER BY seq",
            &[&watched_from],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut seen = Vec::new();
    while seen.len() < committed.len() {
        if let Message::Event(e) = next_non_heartbeat(&mut stream).await {
            seen.push(i64::try_from(e.seq).unwrap());
        }
    }
    assert_eq!(seen, committed, "each committed event once, in order");

    // Every audited call reached audit_log once PostgreSQL was back.
    let scrape = || async {
        let t = reqwest::get(format!("http://{}/metrics", running.metrics_addr.unwrap()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        t.lines()
            .find_map(|l| l.strip_prefix("credbroker_audit_records_total "))
            .map(|v| v.parse::<f64>().unwrap() as i64)
            .unwrap()
    };
    let appended = scrape().await;
    let mut shipped = 0;
    let draining = Instant::now();
    for _ in 0..100 {
        shipped = client
            .query_one("SELECT count(*) FROM audit_log", &[])
            .await
            .unwrap()
            .get::<_, i64>(0);
        if shipped == appended {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drained = draining.elapsed();
    // The webhook arrived once PostgreSQL was back, with the same id.
    let waited = Instant::now();
    while receiver.requests().len() < 2 {
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "the webhook never arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ids: Vec<String> = receiver
        .requests()
        .iter()
        .map(|(h, _)| h["webhook-id"].to_str().unwrap().to_owned())
        .collect();
    let delivered: i64 = client
        .query_one(
            "SELECT count(*) FROM webhook_outbox WHERE delivered_at IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    eprintln!(
        "postgres restarts ({PG_DOWN:?} down each): {} cached reads, {} failed; {}; {} events delivered once each; {shipped} of {appended} audit records shipped ({drained:?} after the last check of the load); webhook: {} attempts, delivered after the outages",
        reads.load(Ordering::Relaxed),
        failed_reads.load(Ordering::Relaxed),
        report.join("; "),
        seen.len(),
        ids.len()
    );
    assert_eq!(ids.len(), 2, "one refused attempt, one delivery");
    assert_eq!(ids[0], ids[1], "the retry keeps its webhook-id");
    assert_eq!(delivered, 1);
    assert_eq!(
        failed_reads.load(Ordering::Relaxed),
        0,
        "cached reads never fail"
    );
    assert_eq!(shipped, appended, "no audit record lost");
    running.stop().await.unwrap();
}

/// Vault entirely unreachable (every connection to it cut, then refused)
/// for 5 s under load: pods reading two hot credentials (cached, 1 s TTL),
/// a pod asking for credentials this replica never cached, and a Rotate
/// every 100 ms. Cached sets are served marked stale (response field and
/// metric), the rest is UNAVAILABLE naming Vault, nothing is stored, health
/// goes NOT_SERVING, and everything comes back by itself once Vault does.
#[tokio::test]
async fn a_total_vault_outage_serves_cached_sets_stale_refuses_the_rest_and_recovers_by_itself() {
    use credbroker::config::CacheConfig;

    use crate::support::{Env, EnvOptions, Gate};
    let mut env = Env::start_with(EnvOptions {
        cache: CacheConfig {
            ttl_secs: 1,
            ..CacheConfig::default()
        },
        ..EnvOptions::default()
    })
    .await;
    let gate = Gate::before(&env.bao.addr, true).await;
    env.stop_broker().await;
    env.config.vault.addr = gate.url();
    env.start_broker(None).await;
    let tenant = new_tenant();
    let mut op = env.operator().await;
    const HOT: [&str; 2] = ["binance", "bybit"];
    const COLD: [&str; 1] = ["kraken"];
    for ex in HOT {
        op.validate_and_store(store_n(&tenant, ex)).await.unwrap();
    }
    // Stored through another replica: this one never held the cold set.
    let other = env.replica(None).await;
    let mut op_other = env
        .client_at(other.addr, &format!("spiffe://{TD}/operator/ops"))
        .await;
    for ex in COLD {
        op_other
            .validate_and_store(store_n(&tenant, ex))
            .await
            .unwrap();
    }
    // The writes go to another tenant's credential.
    let written = new_tenant();
    op.validate_and_store(store_n(&written, "binance"))
        .await
        .unwrap();
    let pod = env.tenant_client(&tenant).await;
    for ex in HOT {
        pod.clone()
            .get_credentials(get_req(&tenant, ex))
            .await
            .unwrap();
    }
    let mut health = crate::storage::health_client(&env).await;
    // A pod on the other replica holds the hot sets too.
    let mut pod_other = env
        .client_at(
            other.addr,
            &format!("spiffe://{TD}/tenant/{tenant}/pod/other"),
        )
        .await;
    for ex in HOT {
        pod_other
            .get_credentials(get_req(&tenant, ex))
            .await
            .unwrap();
    }
    let mut events_on_other = watch_past_state(&mut pod_other.clone(), &tenant).await;

    let stop = Arc::new(AtomicBool::new(false));
    let down = Arc::new(AtomicBool::new(false));
    // (at, which reader, result: Ok(stale) or Err((code, names Vault)))
    // (started, answered, who, result)
    type Sample = (
        Instant,
        Instant,
        &'static str,
        Result<bool, (tonic::Code, bool)>,
    );
    let log: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let mut tasks = Vec::new();
    for (who, keys) in [("hot", &HOT[..]), ("cold", &COLD[..])] {
        let (stop, down, log, t, mut pod) = (
            stop.clone(),
            down.clone(),
            log.clone(),
            tenant.clone(),
            pod.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                // The cold reader starts with the outage: nothing it asks
                // for was ever cached here.
                if who == "cold" && !down.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                let started = Instant::now();
                let r = pod
                    .get_credentials(get_req(&t, keys[i % keys.len()]))
                    .await
                    .map(|r| r.into_inner().stale)
                    .map_err(|e| (e.code(), e.message().contains("Vault")));
                log.lock().unwrap().push((started, Instant::now(), who, r));
                i += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }
    let writer = {
        let (stop, log, t, mut op) = (stop.clone(), log.clone(), written.clone(), op.clone());
        tokio::spawn(async move {
            let mut n = 2;
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let r = op
                    .rotate(rotate_n(&t, "binance", n))
                    .await
                    .map(|_| false)
                    .map_err(|e| (e.code(), e.message().contains("Vault")));
                n += u32::from(r.is_ok());
                log.lock()
                    .unwrap()
                    .push((started, Instant::now(), "write", r));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    tokio::time::sleep(Duration::from_secs(1)).await;
    // Rotated just before the outage: this replica committed the new sets
    // and holds them; the other one applied the events and keeps the
    // replaced sets, still valid for the overlap, as its outage fallback.
    for ex in HOT {
        op.rotate(rotate_n(&tenant, ex, 1)).await.unwrap();
    }
    let mut applied = 0;
    while applied < HOT.len() {
        // (past the state of each credential)
        if let Message::Event(_) = next_non_heartbeat(&mut events_on_other).await {
            applied += 1;
        }
    }
    let shut = Instant::now();
    down.store(true, Ordering::Relaxed);
    gate.shut();
    let mut not_serving_after = None;
    let mut on_other = Vec::new();
    while shut.elapsed() < Duration::from_secs(5) {
        if not_serving_after.is_none() && crate::storage::health_status(&mut health).await == 2 {
            not_serving_after = Some(shut.elapsed());
        }
        if shut.elapsed() > Duration::from_secs(2) && on_other.len() < 10 {
            for ex in HOT {
                on_other.push(
                    pod_other
                        .get_credentials(get_req(&tenant, ex))
                        .await
                        .map(|r| {
                            let r = r.into_inner();
                            (r.stale, r.version)
                        })
                        .map_err(|e| e.code()),
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gate.open();
    let back = Instant::now();
    // Recovery: the first call started after Vault returned that succeeded.
    let first_ok = |who: &str| {
        log.lock()
            .unwrap()
            .iter()
            .find(|(started, _, w, r)| *started > back && *w == who && r.is_ok())
            .map(|(_, answered, _, _)| answered.duration_since(back))
    };
    let (mut cold_back, mut write_back, mut serving_back) = (None, None, None);
    while cold_back.is_none() || write_back.is_none() || serving_back.is_none() {
        assert!(back.elapsed() < Duration::from_secs(10), "did not recover");
        cold_back = cold_back.or_else(|| first_ok("cold"));
        write_back = write_back.or_else(|| first_ok("write"));
        if serving_back.is_none() && crate::storage::health_status(&mut health).await == 1 {
            serving_back = Some(back.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    writer.await.unwrap();

    // Tally the outage: calls started after the cut and answered before
    // the return.
    let log = std::mem::take(&mut *log.lock().unwrap());
    let during: Vec<_> = log
        .iter()
        .filter(|(started, answered, _, _)| *started > shut && *answered < back)
        .collect();
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    for (_, _, who, r) in &during {
        let k = match r {
            Ok(true) => format!("{who} ok stale"),
            Ok(false) => format!("{who} ok"),
            Err((c, vault)) => format!("{who} {c:?}{}", if *vault { " (names Vault)" } else { "" }),
        };
        *tally.entry(k).or_default() += 1;
    }
    let hot_failed = log
        .iter()
        .filter(|(_, _, w, r)| *w == "hot" && r.is_err())
        .count();
    let rotated = log
        .iter()
        .filter(|(_, _, w, r)| *w == "write" && r.is_ok())
        .count();
    // Counted by the events the rotations committed, not by the version
    // number: a Vault write that landed as the gate closed, but whose
    // answer was lost, leaves a Vault version no row references (the
    // orphan sweep's) and the next rotation's number skips it.
    let stored: i64 = env
        .db
        .connect()
        .await
        .query_one(
            &format!(
                "SELECT count(*) FROM credential_events WHERE tenant_id = '{written}' \
                 AND exchange = 'binance' AND kind IN ('stored', 'rotated')"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let scrape = reqwest::get(format!(
        "http://{}/metrics",
        env.running.as_ref().unwrap().metrics_addr.unwrap()
    ))
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    let stale_metric = scrape
        .lines()
        .find_map(|l| l.strip_prefix("credbroker_cache_stale_serves_total "))
        .map_or(0.0, |v| v.parse::<f64>().unwrap());
    eprintln!(
        "vault outage (5 s): rotated just before it and read on another replica: {on_other:?}"
    );
    assert!(
        on_other.iter().all(|r| *r == Ok((true, 1))),
        "the replaced set (valid for the overlap) is served, marked stale: {on_other:?}"
    );
    eprintln!(
        "vault outage (5 s): {tally:?}; hot reads failed overall: {hot_failed}; \
         NOT_SERVING after {not_serving_after:?}; after Vault returned: cold reads back {cold_back:?}, \
         writes back {write_back:?}, SERVING {serving_back:?}; stale serves (metric) {stale_metric}"
    );
    assert_eq!(hot_failed, 0, "cached sets are served through the outage");
    assert!(
        tally.get("hot ok stale").copied().unwrap_or(0) > 0,
        "past their TTL they are marked stale: {tally:?}"
    );
    assert!(stale_metric >= tally["hot ok stale"] as f64);
    for (k, n) in &tally {
        assert!(
            k.starts_with("hot ok") || k.ends_with("Unavailable (names Vault)"),
            "only UNAVAILABLE naming Vault for what is not cached: {k} ×{n}"
        );
    }
    assert!(
        tally.contains_key("cold Unavailable (names Vault)"),
        "{tally:?}"
    );
    assert_eq!(
        stored,
        1 + rotated as i64,
        "a refused write stores nothing: the row moved only with the rotations that succeeded"
    );
    assert!(not_serving_after.is_some(), "health went NOT_SERVING");
    for d in [cold_back, write_back, serving_back] {
        assert!(d.unwrap() < Duration::from_secs(3), "{d:?}");
    }
    other.stop().await.unwrap();
    env.stop_broker().await;
}

/// A replica started while PostgreSQL is down (migrations still to run)
/// comes up at once instead of exiting or hanging: NOT_SERVING, every call
/// refused with UNAVAILABLE saying why, nothing stored; once PostgreSQL
/// answers it migrates, turns SERVING and serves, with no restart.
#[tokio::test]
async fn a_replica_started_during_a_postgresql_outage_serves_once_it_returns() {
    use credbroker::app;
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };

    use crate::support::{Bao, Pki, PrivatePg, config_for, init};

    init();
    let pg = PrivatePg::start();
    pg.stop();
    let bao = Bao::start().await;
    let pki = Pki::new();
    let config = config_for(&bao, &pg.url(), pki.dir.path(), TD);
    assert!(config.postgres.migrate_on_start);
    let backends = app::real_backends(&config)
        .await
        .expect("start-up does not need PostgreSQL");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running = app::start(backends, app::settings(&config).unwrap(), listener)
        .await
        .expect("the server comes up without PostgreSQL");
    let channel = pki
        .channel(running.addr, &[&format!("spiffe://{TD}/operator/ops")])
        .await;
    let mut op = pb::credential_broker_client::CredentialBrokerClient::new(channel.clone());
    let mut health = HealthClient::new(channel);
    let status = |health: &mut HealthClient<tonic::transport::Channel>| {
        let mut health = health.clone();
        async move {
            health
                .check(HealthCheckRequest {
                    service: "credbroker.v1.CredentialBroker".into(),
                })
                .await
                .unwrap()
                .into_inner()
                .status
        }
    };
    let tenant = new_tenant();
    assert_eq!(status(&mut health).await, ServingStatus::NotServing as i32);
    let refused = op
        .validate_and_store(store_n(&tenant, "binance"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("PostgreSQL"),
        "{}",
        refused.message()
    );

    pg.pg_ctl_start();
    let back = Instant::now();
    let mut served = None;
    while back.elapsed() < Duration::from_secs(30) {
        if status(&mut health).await == ServingStatus::Serving as i32
            && op
                .validate_and_store(store_n(&tenant, "binance"))
                .await
                .is_ok()
        {
            served = Some(back.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let served = served.expect("serving within 30 s of PostgreSQL's return");
    eprintln!("started during a PostgreSQL outage: serving {served:?} after it returned");
    op.get_credentials(get_req(&tenant, "binance"))
        .await
        .unwrap();
    running.stop().await.unwrap();
}
