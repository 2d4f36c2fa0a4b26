//! Several replicas on one PostgreSQL: events and cache invalidation cross
//! replicas, a stream resumes on another replica with no gap and no
//! duplicate, the listener survives losing its connection, retention and
//! stream limits answer with clear statuses.

use std::{collections::BTreeSet, time::Duration};

use credbroker::api::pb::{EventKind, watch_rotations_response::Message};
use tonic::Code;

use crate::support::{
    Env, TD, get_req, new_tenant, next_non_heartbeat, rotate_n, store_n, watch_past_state,
    watch_req,
};

#[tokio::test]
async fn a_rotation_on_one_replica_reaches_subscribers_and_caches_of_another() {
    let env = Env::start().await;
    let b = env.replica(None).await;
    let tenant = new_tenant();
    let mut on_a = env.operator().await;
    let mut on_b = env
        .client_at(b.addr, &format!("spiffe://{TD}/tenant/{tenant}/pod/b"))
        .await;
    on_a.validate_and_store(store_n(&tenant, "binance"))
        .await
        .unwrap();
    // B caches version 1.
    let get = get_req(&tenant, "binance");
    assert_eq!(
        on_b.get_credentials(get.clone())
            .await
            .unwrap()
            .into_inner()
            .version,
        1
    );
    let mut stream = watch_past_state(&mut on_b, &tenant).await;

    on_a.rotate(rotate_n(&tenant, "binance", 1)).await.unwrap();
    let Message::Event(e) = next_non_heartbeat(&mut stream).await else {
        panic!()
    };
    assert_eq!((e.kind, e.version), (EventKind::Rotated as i32, 2));
    // B invalidated its cache before publishing: the next read is version 2.
    let g = on_b.get_credentials(get).await.unwrap().into_inner();
    assert_eq!(g.version, 2);
    assert_eq!(g.current.unwrap().api_secret, "binanceSecret000001");
    b.stop().await.unwrap();
}

#[tokio::test]
async fn a_client_resumes_on_another_replica_without_gaps_or_duplicates() {
    let mut env = Env::start().await;
    let b = env.replica(None).await;
    let tenant = new_tenant();
    let mut admin = env
        .client_at(b.addr, &format!("spiffe://{TD}/operator/admin"))
        .await;
    admin
        .validate_and_store(store_n(&tenant, "kraken"))
        .await
        .unwrap();
    admin
        .validate_and_store(store_n(&tenant, "bybit"))
        .await
        .unwrap();
    let exchange = |n: u32| {
        if n.is_multiple_of(2) {
            "kraken"
        } else {
            "bybit"
        }
    };

    // The pod watches replica A; every write goes through replica B.
    let mut on_a = env.tenant_client(&tenant).await;
    let mut stream = on_a
        .watch_rotations(watch_req(&tenant, 0))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..2 {
        assert!(matches!(
            next_non_heartbeat(&mut stream).await,
            Message::State(_)
        ));
    }
    let mut seqs = Vec::new();
    for n in 1..=5 {
        admin
            .rotate(rotate_n(&tenant, exchange(n), n))
            .await
            .unwrap();
    }
    while seqs.len() < 5 {
        let Message::Event(e) = next_non_heartbeat(&mut stream).await else {
            panic!("event expected")
        };
        seqs.push(e.seq);
    }
    // Replica A goes away: the stream ends with a status naming the resume point.
    env.stop_broker().await;
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .unwrap()
        {
            Ok(Some(m)) => assert!(matches!(m.message, Some(Message::Heartbeat(_))), "{m:?}"),
            Ok(None) => panic!("stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    let last = *seqs.last().unwrap();
    assert!(
        end.message().contains(&format!("after_seq={last}")),
        "{end:?}"
    );

    // More rotations while the pod is disconnected.
    for n in 6..=10 {
        admin
            .rotate(rotate_n(&tenant, exchange(n), n))
            .await
            .unwrap();
    }
    let mut on_b = env
        .client_at(b.addr, &format!("spiffe://{TD}/tenant/{tenant}/pod/a"))
        .await;
    let mut resumed = on_b
        .watch_rotations(watch_req(&tenant, last))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..2 {
        assert!(matches!(
            next_non_heartbeat(&mut resumed).await,
            Message::State(_)
        ));
    }
    while seqs.len() < 10 {
        let Message::Event(e) = next_non_heartbeat(&mut resumed).await else {
            panic!("event expected")
        };
        seqs.push(e.seq);
    }
    // Exactly the committed rotations, in order, each once.
    let committed = env.rotated_seqs().await;
    assert_eq!(seqs, committed);
    assert_eq!(seqs.iter().collect::<BTreeSet<_>>().len(), 10);
    // Nothing more is pending.
    let extra = tokio::time::timeout(
        Duration::from_millis(1500),
        next_non_heartbeat(&mut resumed),
    )
    .await;
    assert!(extra.is_err(), "unexpected extra message: {extra:?}");
    b.stop().await.unwrap();
}

#[tokio::test]
async fn the_listener_recovers_after_losing_its_connection() {
    let env = Env::start().await;
    let (tenant, mut c) = env.stored_tenant().await;
    let mut stream = env
        .tenant_client(&tenant)
        .await
        .watch_rotations(watch_req(&tenant, 0))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        next_non_heartbeat(&mut stream).await,
        Message::State(_)
    ));
    // Cut the listener's connection, as a PostgreSQL restart or a network
    // blip would, and commit while it is away.
    let killed: i64 = env
        .db
        .connect()
        .await
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'credbroker-listener' AND datname = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, 1);
    c.rotate(rotate_n(&tenant, "binance", 1)).await.unwrap();
    let Message::Event(e) = next_non_heartbeat(&mut stream).await else {
        panic!()
    };
    assert_eq!((e.kind, e.version), (EventKind::Rotated as i32, 2));
}

#[tokio::test]
async fn resuming_before_retention_asks_for_a_resync() {
    let env = Env::start().await;
    let (tenant, mut c) = env.stored_tenant().await;
    c.rotate(rotate_n(&tenant, "binance", 1)).await.unwrap();
    // Prune everything (retention passed for all events).
    let pruned = env
        .broker()
        .metadata()
        .prune_events(time::OffsetDateTime::now_utc() + time::Duration::seconds(1))
        .await
        .unwrap();
    assert_eq!(pruned, 2);
    let mut w = env.tenant_client(&tenant).await;
    let mut s = w
        .watch_rotations(watch_req(&tenant, 1))
        .await
        .unwrap()
        .into_inner();
    let err = loop {
        match s.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("silent end"),
            Err(e) => break e,
        }
    };
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("resync"), "{err:?}");
    // A fresh subscription (after_seq = 0) still gets the full state.
    let mut s = w
        .watch_rotations(watch_req(&tenant, 0))
        .await
        .unwrap()
        .into_inner();
    let Message::State(st) = next_non_heartbeat(&mut s).await else {
        panic!()
    };
    assert_eq!(st.version, 2);
}

#[tokio::test]
async fn streams_per_tenant_are_limited() {
    let mut env = Env::start().await;
    env.stop_broker().await;
    env.config.server.max_streams_per_tenant = 2;
    env.start_broker(None).await;
    let tenant = new_tenant();
    let mut w = env.tenant_client(&tenant).await;
    let s1 = w.watch_rotations(watch_req(&tenant, 0)).await.unwrap();
    let s2 = w.watch_rotations(watch_req(&tenant, 0)).await.unwrap();
    let e = w.watch_rotations(watch_req(&tenant, 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    // Another tenant is not affected.
    let other = new_tenant();
    env.tenant_client(&other)
        .await
        .watch_rotations(watch_req(&other, 0))
        .await
        .unwrap();
    // Closing a stream frees its slot.
    drop(s1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match w.watch_rotations(watch_req(&tenant, 0)).await {
            Ok(_) => break,
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted);
                assert!(tokio::time::Instant::now() < deadline, "slot never freed");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    drop(s2);
}

/// SIGKILL of a `credbroker server` process under load (pods reading from
/// it and from the in-process replica, a Rotate every 50 ms): the pod's
/// stream resumes on the other replica with `after_seq` and misses nothing;
/// the other replica's readers never fail. Restarted while Vault cannot be
/// reached, the process answers as soon as it listens (UNAVAILABLE naming
/// Vault for what it has not cached) and reports NOT_SERVING on its health
/// port, SERVING only once Vault answers again.
#[tokio::test]
async fn a_replica_killed_under_load_loses_no_event_and_serves_again_only_with_its_backends() {
    use std::sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    };
    let env = Env::start().await;
    let mut proc_a = env.spawn_server_process().await;
    let tenant = new_tenant();
    let mut admin = env.operator().await;
    for ex in ["binance", "bybit"] {
        admin
            .validate_and_store(store_n(&tenant, ex))
            .await
            .unwrap();
    }
    let pod = format!("spiffe://{TD}/tenant/{tenant}/pod/a");
    let mut on_a = env.client_at(proc_a.addr, &pod).await;
    let on_b = env.tenant_client(&tenant).await;
    let mut stream = watch_past_state(&mut on_a, &tenant).await;

    // Load: readers on both replicas, a Rotate every 50 ms through B.
    let stop = Arc::new(AtomicBool::new(false));
    let killed = Arc::new(AtomicBool::new(false));
    let [a_ok, a_failed, b_ok] = [(); 3].map(|()| Arc::new(AtomicU64::new(0)));
    let b_failed = Arc::new(Mutex::new(Vec::new()));
    let mut load = Vec::new();
    // Even readers on B, odd ones on A: each replica reads both keys.
    for (i, ex) in ["binance", "binance", "bybit", "bybit"]
        .into_iter()
        .enumerate()
    {
        let (stop, killed, t) = (stop.clone(), killed.clone(), tenant.clone());
        let (a_ok, a_failed, b_ok, b_failed) = (
            a_ok.clone(),
            a_failed.clone(),
            b_ok.clone(),
            b_failed.clone(),
        );
        let (mut a, mut b) = (on_a.clone(), on_b.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if i % 2 == 0 {
                    match b.get_credentials(get_req(&t, ex)).await {
                        Ok(_) => b_ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            b_failed.lock().unwrap().push(e.code());
                            0
                        }
                    };
                } else if !killed.load(Ordering::Relaxed) {
                    match a.get_credentials(get_req(&t, ex)).await {
                        Ok(_) => a_ok.fetch_add(1, Ordering::Relaxed),
                        Err(_) => a_failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    let writer = {
        let (stop, t, mut admin) = (stop.clone(), tenant.clone(), admin.clone());
        tokio::spawn(async move {
            let mut n = 1;
            while !stop.load(Ordering::Relaxed) {
                admin.rotate(rotate_n(&t, "binance", n)).await.unwrap();
                n += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            n - 1
        })
    };

    let mut seqs = Vec::new();
    while seqs.len() < 5 {
        if let Message::Event(e) = next_non_heartbeat(&mut stream).await {
            seqs.push(e.seq);
        }
    }
    // SIGKILL: no graceful goodbye, the stream just breaks.
    killed.store(true, Ordering::Relaxed);
    proc_a.child.start_kill().unwrap();
    proc_a.child.wait().await.unwrap();
    let broken = loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .unwrap()
        {
            Ok(Some(m)) => {
                if let Some(Message::Event(e)) = m.message {
                    seqs.push(e.seq);
                }
            }
            other => break other,
        }
    };
    assert!(!matches!(broken, Ok(Some(_))));
    // The pod resumes on B from the last seq it saw.
    let mut on_b_watch = on_b.clone();
    let mut resumed = on_b_watch
        .watch_rotations(watch_req(&tenant, *seqs.last().unwrap()))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        next_non_heartbeat(&mut resumed).await,
        Message::State(_)
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Restarted while Vault cannot be reached.
    let gate = crate::support::Gate::before(&env.bao.addr, false).await;
    let started = std::time::Instant::now();
    let restarted = env.spawn_server_process_on(&gate.url()).await;
    let listening = started.elapsed();
    let mut on_restarted = env.client_at(restarted.addr, &pod).await;
    let e = on_restarted
        .get_credentials(get_req(&tenant, "bybit"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("Vault"), "{e:?}");
    // NOT_SERVING (2) over several probe periods (1 s each).
    for _ in 0..6 {
        assert_eq!(
            restarted.health_status().await.unwrap(),
            2,
            "NOT_SERVING while Vault cannot be reached"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    gate.open();
    let opened = std::time::Instant::now();
    while restarted.health_status().await.unwrap() != 1 {
        assert!(opened.elapsed() < Duration::from_secs(5), "never SERVING");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let serving_after = opened.elapsed();
    on_restarted
        .get_credentials(get_req(&tenant, "bybit"))
        .await
        .unwrap();

    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let rotations = writer.await.unwrap();
    let committed = env.rotated_seqs().await;
    while seqs.len() < committed.len() {
        if let Message::Event(e) = next_non_heartbeat(&mut resumed).await {
            seqs.push(e.seq);
        }
    }
    eprintln!(
        "replica SIGKILL: {} reads answered by it before the kill ({} failed in flight); \
         other replica {} reads, failed {:?}; {rotations} rotations, {} events seen once each \
         across the resume; restarted process listening {listening:?} after spawn, \
         NOT_SERVING while Vault was unreachable, SERVING {serving_after:?} after it returned",
        a_ok.load(Ordering::Relaxed),
        a_failed.load(Ordering::Relaxed),
        b_ok.load(Ordering::Relaxed),
        b_failed.lock().unwrap(),
        seqs.len(),
    );
    assert_eq!(seqs, committed, "every rotation exactly once, in order");
    assert_eq!(committed.len() as u32, rotations);
    assert!(
        b_failed.lock().unwrap().is_empty(),
        "the surviving replica's readers never fail"
    );
    assert!(a_ok.load(Ordering::Relaxed) > 0);
    assert!(serving_after < Duration::from_secs(3), "{serving_after:?}");
}

#[tokio::test]
async fn streams_end_resumably_at_their_jittered_maximum_age() {
    let mut env = Env::start().await;
    env.stop_broker().await;
    env.config.server.max_stream_age_secs = 2;
    env.start_broker(None).await;
    let tenant = new_tenant();
    env.operator()
        .await
        .validate_and_store(store_n(&tenant, "kraken"))
        .await
        .unwrap();
    let mut w = env.tenant_client(&tenant).await;
    let started = std::time::Instant::now();
    let mut s = w
        .watch_rotations(watch_req(&tenant, 0))
        .await
        .unwrap()
        .into_inner();
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(10), s.message())
            .await
            .unwrap()
        {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("silent end"),
            Err(status) => break status,
        }
    };
    let age = started.elapsed();
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    assert!(
        end.message().contains("maximum age") && end.message().contains("after_seq="),
        "{end:?}"
    );
    assert!(
        age >= Duration::from_millis(1400) && age < Duration::from_secs(4),
        "{age:?}"
    );
}

/// Two replicas share a tenant's write limit: each enforces half, so the
/// deployment admits the configured number whichever replica is called.
#[tokio::test]
async fn rate_limits_hold_for_the_whole_deployment() {
    use credbroker::config::LimitsConfig;
    let env = Env::start_with(crate::support::EnvOptions {
        limits: Some(LimitsConfig {
            writes_per_minute: 4,
            reads_per_minute: 0,
            watches_per_minute: 0,
            operator_per_minute: 0,
            tenants: Default::default(),
        }),
        ..Default::default()
    })
    .await;
    let b = env.replica(None).await;
    let a_limits = env.running.as_ref().unwrap().limits.clone();
    tokio::time::timeout(Duration::from_secs(20), async {
        while a_limits.replicas() != 2 || b.limits.replicas() != 2 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("both replicas count two live replicas");
    let tenant = new_tenant();
    let mut admitted = 0;
    for addr in [env.addr, b.addr] {
        let mut c = env
            .client_at(addr, &format!("spiffe://{TD}/operator/ops"))
            .await;
        for _ in 0..3 {
            match c
                .delete_credentials(credbroker::api::pb::DeleteCredentialsRequest {
                    tenant_id: tenant.clone(),
                    exchange: "kraken".into(),
                })
                .await
            {
                Ok(_) => admitted += 1,
                Err(e) => assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}"),
            }
        }
    }
    assert_eq!(admitted, 4, "the deployment admits the configured limit");
    b.stop().await.unwrap();
}

/// A private PostgreSQL stopped and started again: the event listener is
/// back within about a second of PostgreSQL accepting connections (its
/// reconnect backoff is capped at 1 s), so a rotation committed right after
/// the restart reaches a subscriber promptly.
#[tokio::test]
async fn events_flow_again_within_a_second_of_postgres_returning() {
    let crate::support::PrivateEnv {
        pg,
        bao: _bao,
        pki: _pki,
        running,
        operator: mut c,
    } = crate::support::PrivateEnv::start().await;
    let tenant = new_tenant();
    c.validate_and_store(store_n(&tenant, "binance"))
        .await
        .unwrap();
    let mut stream = watch_past_state(&mut c, &tenant).await;

    pg.stop();
    // Long enough for the listener to fail and back off to its ceiling.
    tokio::time::sleep(Duration::from_secs(3)).await;
    pg.pg_ctl_start();
    let back = std::time::Instant::now();
    // The first write after the restart (the pool reconnects on demand).
    let committed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if c.rotate(rotate_n(&tenant, "binance", 1)).await.is_ok() {
                return std::time::Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("writes work again after the restart");
    let Message::Event(e) = next_non_heartbeat(&mut stream).await else {
        panic!("expected the rotation event")
    };
    assert_eq!(e.version, 2);
    let delivered = back.elapsed();
    eprintln!(
        "postgres restart: write ok after {:?}, event delivered after {delivered:?}",
        committed - back
    );
    assert!(
        delivered < Duration::from_millis(2500),
        "event {delivered:?} after PostgreSQL returned"
    );
    running.stop().await.unwrap();
}
