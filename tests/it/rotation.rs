//! Rotation with an overlap window, emergency revoke, idempotence,
//! concurrency, retirement, and the WatchRotations stream.

use std::{sync::Arc, time::Duration};

use credbroker::{
    api::pb::{self, EventKind, watch_rotations_response::Message},
    clock::ManualClock,
    rotation::retire,
};
use time::OffsetDateTime;
use tonic::Code;

use crate::support::{
    Env, EnvOptions, get_req, new_tenant, next_non_heartbeat, rotate_req, set, store_req,
};

async fn store(env: &Env, tenant: &str, exchange: &str, key: &str, secret: &str) {
    env.operator()
        .await
        .validate_and_store(pb::ValidateAndStoreRequest {
            tenant_id: tenant.into(),
            exchange: exchange.into(),
            credentials: Some(set(key, secret)),
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn rotate_serves_previous_until_the_overlap_ends_then_retires_it() {
    let clock = ManualClock::new(OffsetDateTime::now_utc());
    let env = Env::start_with(EnvOptions {
        clock: Some(Arc::new(clock.clone())),
        ..EnvOptions::default()
    })
    .await;
    let tenant = new_tenant();
    store(
        &env,
        &tenant,
        "binance",
        "binanceKeyOld1",
        "binanceSecretOld1",
    )
    .await;
    let mut c = env.operator().await;
    let t0 = clock_now(&clock);
    let out = c
        .rotate(rotate_req(
            &tenant,
            "binance",
            "binanceKeyNew2",
            "binanceSecretNew2",
            None,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(out.rotated);
    let meta = out.credential.unwrap();
    assert_eq!((meta.version, meta.previous_version), (2, Some(1)));
    let until = meta.previous_valid_until.unwrap();
    assert_eq!(
        until.seconds,
        (t0 + time::Duration::hours(1)).unix_timestamp(),
        "default overlap is one hour"
    );

    // During the overlap both sets are served.
    clock.advance(time::Duration::minutes(59));
    let g = c
        .get_credentials(get_req(&tenant, "binance"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(g.current.unwrap().api_secret, "binanceSecretNew2");
    assert_eq!(g.version, 2);
    assert_eq!(g.previous.unwrap().api_secret, "binanceSecretOld1");
    assert_eq!(g.previous_version, Some(1));

    // Past the deadline the previous set is no longer served, even before
    // the retire job has run.
    clock.advance(time::Duration::minutes(2));
    let g = c
        .get_credentials(get_req(&tenant, "binance"))
        .await
        .unwrap()
        .into_inner();
    assert!(
        g.previous.is_none() && g.previous_version.is_none(),
        "{:?}",
        g.previous_version
    );

    // The retire job destroys version 1 in Vault and records the event.
    let n = retire::retire_once(env.broker()).await.unwrap();
    assert_eq!(n, 1);
    let (_, meta) = env
        .kv_metadata(&env.credential_path(&tenant, "binance"))
        .await;
    assert_eq!(meta["data"]["versions"]["1"]["destroyed"], true, "{meta}");
    assert_eq!(meta["data"]["versions"]["2"]["destroyed"], false, "{meta}");
    assert_eq!(
        env.count("SELECT count(*) FROM credential_events WHERE kind = 'previous_expired'")
            .await,
        1
    );
    let d = crate::support::describe(&mut c, &tenant, "binance").await;
    assert!(d.previous_version.is_none() && d.previous_valid_until.is_none());
    // A second pass finds nothing to do.
    assert_eq!(retire::retire_once(env.broker()).await.unwrap(), 0);
}

fn clock_now(c: &ManualClock) -> OffsetDateTime {
    use credbroker::clock::Clock as _;
    c.now()
}

#[tokio::test]
async fn overlap_deadline_survives_a_broker_restart() {
    let clock = ManualClock::new(OffsetDateTime::now_utc());
    let mut env = Env::start_with(EnvOptions {
        clock: Some(Arc::new(clock.clone())),
        ..EnvOptions::default()
    })
    .await;
    let tenant = new_tenant();
    store(&env, &tenant, "bybit", "bybitKeyOld01", "bybitSecretOld1").await;
    env.operator()
        .await
        .rotate(rotate_req(
            &tenant,
            "bybit",
            "bybitKeyNew02",
            "bybitSecretNew2",
            Some(600),
        ))
        .await
        .unwrap();
    env.stop_broker().await;
    clock.advance(time::Duration::minutes(11));
    env.start_broker(Some(Arc::new(clock.clone()))).await;
    assert_eq!(
        retire::retire_once(env.broker()).await.unwrap(),
        1,
        "the new process finds the due deadline"
    );
    let (_, meta) = env
        .kv_metadata(&env.credential_path(&tenant, "bybit"))
        .await;
    assert_eq!(meta["data"]["versions"]["1"]["destroyed"], true, "{meta}");
}

#[tokio::test]
async fn zero_overlap_revokes_the_old_key_at_once() {
    let env = Env::start().await;
    let tenant = new_tenant();
    store(
        &env,
        &tenant,
        "kraken",
        "krakenLeaked1",
        "krakenSecretLeaked",
    )
    .await;
    let mut c = env.operator().await;
    let out = c
        .rotate(rotate_req(
            &tenant,
            "kraken",
            "krakenFresh02",
            "krakenSecretFresh",
            Some(0),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.credential.unwrap().previous_version, None);
    let g = c
        .get_credentials(get_req(&tenant, "kraken"))
        .await
        .unwrap()
        .into_inner();
    assert!(g.previous.is_none());
    assert_eq!(g.current.unwrap().api_secret, "krakenSecretFresh");
    let (_, meta) = env
        .kv_metadata(&env.credential_path(&tenant, "kraken"))
        .await;
    assert_eq!(
        meta["data"]["versions"]["1"]["destroyed"], true,
        "leaked version destroyed: {meta}"
    );
    // Its set is kept for the health checks, which ask the exchange
    // whether the leaked key still works there until it is deleted.
    let kept = env
        .credential_path(&tenant, "kraken")
        .replace("/credentials", "/replaced");
    let (_, meta) = env.kv_metadata(&kept).await;
    assert_eq!(meta["data"]["current_version"], 1, "{meta}");
}

#[tokio::test]
async fn rotate_is_idempotent_and_bounded() {
    let env = Env::start().await;
    let tenant = new_tenant();
    store(
        &env,
        &tenant,
        "coinbase",
        "organizations/o/apiKeys/k1",
        "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n",
    )
    .await;
    let mut c = env.operator().await;
    let r = rotate_req(
        &tenant,
        "coinbase",
        "organizations/o/apiKeys/k2",
        "-----BEGIN EC PRIVATE KEY-----\nBBBB\n-----END EC PRIVATE KEY-----\n",
        None,
    );
    let first = c.rotate(r.clone()).await.unwrap().into_inner();
    let retry = c.rotate(r).await.unwrap().into_inner();
    assert!(first.rotated && !retry.rotated);
    assert_eq!(
        retry.credential.unwrap().version,
        2,
        "a retried Rotate converges on the same version"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM credential_events WHERE kind = 'rotated'")
            .await,
        1
    );

    let too_long = c
        .rotate(rotate_req(
            &tenant,
            "coinbase",
            "organizations/o/apiKeys/k3",
            "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0",
            Some(8 * 24 * 3600),
        ))
        .await
        .unwrap_err();
    assert_eq!(too_long.code(), Code::InvalidArgument, "{too_long:?}");
    let missing = c
        .rotate(rotate_req(
            &new_tenant(),
            "coinbase",
            "organizations/o/apiKeys/k3",
            "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0",
            None,
        ))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
}

#[tokio::test]
async fn concurrent_rotations_never_both_win() {
    let env = Env::start().await;
    let tenant = new_tenant();
    store(&env, &tenant, "bybit", "bybitKey00000", "bybitSecret0").await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let mut c = env.operator().await;
        let r = rotate_req(
            &tenant,
            "bybit",
            &format!("bybitKey0000{i}x"),
            &format!("bybitSecretConcurrent{i}"),
            None,
        );
        tasks.push(tokio::spawn(async move { c.rotate(r).await }));
    }
    let mut ok = 0u64;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(e.code(), Code::Aborted, "a loser is told to retry: {e:?}"),
        }
    }
    assert!(ok >= 1);
    let d = crate::support::describe(&mut env.operator().await, &tenant, "bybit").await;
    let rotated = env
        .count("SELECT count(*) FROM credential_events WHERE kind = 'rotated'")
        .await;
    assert_eq!(
        u64::try_from(rotated).unwrap(),
        ok,
        "one event per winning rotation"
    );
    // The served version is one a winner wrote, and its secret is readable.
    let g = env
        .operator()
        .await
        .get_credentials(get_req(&tenant, "bybit"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(g.version, d.version);
    assert!(
        g.current
            .unwrap()
            .api_secret
            .starts_with("bybitSecretConcurrent")
    );
}

#[tokio::test]
async fn watch_sends_state_then_every_change_and_resumes_from_a_sequence() {
    let env = Env::start().await;
    let tenant = new_tenant();
    store(&env, &tenant, "binance", "binanceKey001", "binanceSecret1").await;
    let mut watcher = env.tenant_client(&tenant).await;
    let mut stream = watcher
        .watch_rotations(pb::WatchRotationsRequest {
            tenant_id: tenant.clone(),
            exchanges: vec![],
            after_seq: 0,
            include_credentials: false,
        })
        .await
        .unwrap()
        .into_inner();
    let first = next_non_heartbeat(&mut stream).await;
    let Message::State(state) = first else {
        panic!("state first, got {first:?}")
    };
    assert_eq!((state.exchange.as_str(), state.version), ("binance", 1));

    // Another tenant's change is not delivered; ours are, in order.
    let other = new_tenant();
    store(&env, &other, "binance", "binanceKey001", "binanceSecret1").await;
    let mut c = env.operator().await;
    c.rotate(rotate_req(
        &tenant,
        "binance",
        "binanceKey002",
        "binanceSecret2",
        None,
    ))
    .await
    .unwrap();
    store(&env, &tenant, "kraken", "krakenKey0001", "krakenSecret1").await;
    let Message::Event(e1) = next_non_heartbeat(&mut stream).await else {
        panic!()
    };
    let Message::Event(e2) = next_non_heartbeat(&mut stream).await else {
        panic!()
    };
    assert_eq!(
        (e1.kind, e1.version, e1.exchange.as_str()),
        (EventKind::Rotated as i32, 2, "binance")
    );
    assert_eq!(
        (e2.kind, e2.exchange.as_str()),
        (EventKind::Stored as i32, "kraken")
    );
    assert!(e2.seq > e1.seq && e1.tenant_id == tenant);
    drop(stream);

    // Changes while disconnected are replayed after the state on resume.
    c.delete_credentials(pb::DeleteCredentialsRequest {
        tenant_id: tenant.clone(),
        exchange: "kraken".into(),
    })
    .await
    .unwrap();
    let mut resumed = watcher
        .watch_rotations(pb::WatchRotationsRequest {
            tenant_id: tenant.clone(),
            exchanges: vec!["kraken".into()],
            after_seq: e1.seq,
            include_credentials: false,
        })
        .await
        .unwrap()
        .into_inner();
    let Message::Event(r1) = next_non_heartbeat(&mut resumed).await else {
        panic!("kraken has no state now")
    };
    let Message::Event(r2) = next_non_heartbeat(&mut resumed).await else {
        panic!()
    };
    assert_eq!((r1.seq, r1.kind), (e2.seq, EventKind::Stored as i32));
    assert_eq!(r2.kind, EventKind::Deleted as i32);

    // Idle streams carry heartbeats (1 s in tests).
    let hb = tokio::time::timeout(Duration::from_secs(5), resumed.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Some(Message::Heartbeat(h)) = hb.message else {
        panic!("{hb:?}")
    };
    assert_eq!(h.seq, r2.seq);

    // Another tenant's workload may not watch this tenant.
    let e = env
        .tenant_client(&other)
        .await
        .watch_rotations(pb::WatchRotationsRequest {
            tenant_id: tenant.clone(),
            exchanges: vec![],
            after_seq: 0,
            include_credentials: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn rotating_inside_an_overlap_retires_the_oldest_version_at_once() {
    let env = Env::start().await;
    let tenant = new_tenant();
    let mut c = env.operator().await;
    c.validate_and_store(store_req(
        &tenant,
        "bybit",
        "bybitKeyV1xxxx",
        "bybitSecretV1",
    ))
    .await
    .unwrap();
    c.rotate(rotate_req(
        &tenant,
        "bybit",
        "bybitKeyV2xxxx",
        "bybitSecretV2",
        None,
    ))
    .await
    .unwrap();
    let third = c
        .rotate(rotate_req(
            &tenant,
            "bybit",
            "bybitKeyV3xxxx",
            "bybitSecretV3",
            None,
        ))
        .await
        .unwrap()
        .into_inner()
        .credential
        .unwrap();
    // Only one previous is ever served: version 2; version 1 is destroyed.
    assert_eq!((third.version, third.previous_version), (3, Some(2)));
    let g = c
        .get_credentials(get_req(&tenant, "bybit"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(g.previous.unwrap().api_secret, "bybitSecretV2");
    let (_, meta) = env
        .kv_metadata(&env.credential_path(&tenant, "bybit"))
        .await;
    assert_eq!(meta["data"]["versions"]["1"]["destroyed"], true, "{meta}");
    assert_eq!(meta["data"]["versions"]["2"]["destroyed"], false, "{meta}");
}
