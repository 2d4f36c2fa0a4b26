//! PostgreSQL restarts under load, on a private PostgreSQL the test starts
//! (never the shared one): stopped fast, then immediately (a crash), each
//! time kept down for a while and started again. Prints failed calls by
//! code and recovery times.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use credbroker::api::pb::watch_rotations_response::Message;

use crate::support::{
    PrivateEnv, TD, get_req, new_tenant, next_non_heartbeat, rotate_n, store_n, watch_past_state,
};

#[tokio::test]
async fn postgres_restarts_keep_cached_reads_refuse_writes_and_lose_no_event_or_record() {
    let PrivateEnv {
        pg,
        bao: _bao,
        pki,
        running,
        operator: mut op,
    } = PrivateEnv::start().await;
    let tenant = new_tenant();
    for ex in ["binance", "bybit"] {
        op.validate_and_store(store_n(&tenant, ex)).await.unwrap();
    }
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
            while !stop.load(Ordering::Relaxed) {
                reads.fetch_add(1, Ordering::Relaxed);
                // bybit is never rotated: always a cache hit.
                if pod.get_credentials(get_req(&t, "bybit")).await.is_err() {
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

    let mut report = Vec::new();
    for mode in ["fast", "immediate"] {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let down = Instant::now();
        pg.stop_mode(mode);
        tokio::time::sleep(Duration::from_secs(5)).await;
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

    // Every committed rotation reached the subscriber exactly once.
    let client = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(client.1);
    let committed: Vec<i64> = client
        .0
        .query(
            "SELECT seq FROM credential_events WHERE kind = 'rotated' ORDER BY seq",
            &[],
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
    for _ in 0..100 {
        shipped = client
            .0
            .query_one("SELECT count(*) FROM audit_log", &[])
            .await
            .unwrap()
            .get::<_, i64>(0);
        if shipped == appended {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "postgres restarts: {} cached reads, {} failed; {}; {} events delivered once each; {shipped} of {appended} audit records shipped",
        reads.load(Ordering::Relaxed),
        failed_reads.load(Ordering::Relaxed),
        report.join("; "),
        seen.len()
    );
    assert_eq!(
        failed_reads.load(Ordering::Relaxed),
        0,
        "cached reads never fail"
    );
    assert_eq!(shipped, appended, "no audit record lost");
    running.stop().await.unwrap();
}
