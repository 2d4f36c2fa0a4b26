//! The audit trail: every call recorded once with its fields (real
//! PostgreSQL), tampering named by `credbroker audit verify`, no answered
//! call lost to SIGKILL, fail closed when the spool cannot take a record,
//! and ListAuditEvents per tenant.

use std::{collections::BTreeMap, time::Duration};

use credbroker::{
    api::pb,
    audit::AuditRecord,
    auth::TokenMode,
    config::{AuthConfig, LimitsConfig},
};
use tonic::{Code, Request};

use crate::support::{
    Env, TD, get_req,
    memory::{Memory, MemoryOptions},
    new_tenant, next_sent, rotate_n, store_n,
};

/// Every audit record of the database.
pub(crate) async fn all_records(env: &Env) -> Vec<AuditRecord> {
    let c = env.db.connect().await;
    c.query("SELECT body FROM audit_log", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| serde_json::from_str(r.get::<_, &str>(0)).unwrap())
        .collect()
}

/// The outcome record of each call, by request id (a state-changing call
/// also has a request record, `result: requested`, with the same request
/// id).
async fn records(env: &Env) -> BTreeMap<String, AuditRecord> {
    all_records(env)
        .await
        .into_iter()
        .filter(|r| r.result != "requested")
        .map(|r| (r.request_id.to_string(), r))
        .collect()
}

/// Waits until every id in `ids` has its record in PostgreSQL.
async fn shipped(env: &Env, ids: &[String]) -> BTreeMap<String, AuditRecord> {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let all = records(env).await;
            if ids.iter().all(|id| all.contains_key(id)) {
                return all;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("every answered call's record reached PostgreSQL")
}

/// `credbroker audit export --tenant` on the env's database.
async fn export(env: &Env, tenant: &str) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_credbroker"))
        .args([
            "audit",
            "export",
            "--database-url",
            &env.db.url(),
            "--tenant",
            tenant,
        ])
        .output()
        .await
        .unwrap()
}

fn request_id<T>(r: &Result<tonic::Response<T>, tonic::Status>) -> String {
    let md = match r {
        Ok(resp) => resp.metadata(),
        Err(s) => s.metadata(),
    };
    md.get("x-request-id")
        .expect("every answer carries x-request-id")
        .to_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn every_call_is_recorded_once_with_its_fields() {
    let env = Env::start().await;
    let tenant = new_tenant();
    let other = new_tenant();
    let mut op = env.operator().await;
    let mut pod_other = env.tenant_client(&other).await;
    let mut ids = BTreeMap::new();
    let r = op.validate_and_store(store_n(&tenant, "binance")).await;
    ids.insert("store", request_id(&r));
    r.unwrap();
    for i in 0..3 {
        let mut req = Request::new(get_req(&tenant, "binance"));
        req.metadata_mut().insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        let r = op.get_credentials(req).await;
        ids.insert(["get0", "get1", "get2"][i], request_id(&r));
        r.unwrap();
    }
    let r = op.rotate(rotate_n(&tenant, "binance", 1)).await;
    ids.insert("rotate", request_id(&r));
    r.unwrap();
    let r = pod_other.get_credentials(get_req(&tenant, "binance")).await;
    ids.insert("denied", request_id(&r));
    assert_eq!(r.unwrap_err().code(), Code::PermissionDenied);
    let mut bad_cert = env
        .client_for(&format!("spiffe://{TD}/tenant/{}/x", tenant.to_uppercase()))
        .await;
    let r = bad_cert.get_credentials(get_req(&tenant, "binance")).await;
    ids.insert("unauthenticated", request_id(&r));
    assert_eq!(r.unwrap_err().code(), Code::Unauthenticated);

    let wanted: Vec<String> = ids.values().cloned().collect();
    let all = shipped(&env, &wanted).await;
    // Exactly one record per call, and nothing else.
    let distinct: std::collections::BTreeSet<_> = wanted.iter().collect();
    assert_eq!(distinct.len(), wanted.len());
    assert_eq!(all.len(), wanted.len(), "one record per call, no more");
    let rec = |k: &str| &all[&ids[k]];

    let store = rec("store");
    assert_eq!(
        (
            store.event_type.as_ref(),
            store.action.as_ref(),
            store.result.as_ref(),
            store.grpc_code.as_ref()
        ),
        ("secret_write", "ValidateAndStore", "success", "OK")
    );
    assert_eq!(store.user, format!("spiffe://{TD}/operator/test"));
    assert_eq!(store.role, "operator");
    assert_eq!(store.resource, "binance_api_key");
    assert_eq!(store.versions, vec![1]);
    assert_eq!(store.key_hint.as_deref(), Some("****0000"));
    assert_eq!(store.tenant_id.unwrap().to_string(), tenant);
    assert_eq!(store.ip_address.as_deref(), Some("127.0.0.1"));
    assert!(
        store
            .user_agent
            .as_deref()
            .is_some_and(|u| u.contains("tonic"))
    );

    let get = rec("get1");
    assert_eq!(
        (get.event_type.as_ref(), get.action.as_ref()),
        ("secret_access", "GetCredentials")
    );
    assert_eq!(get.versions, vec![1]);
    assert_eq!(
        get.trace_id.as_deref(),
        Some("4bf92f3577b34da6a3ce929d0e0e4736")
    );

    let rot = rec("rotate");
    assert_eq!(rot.versions, vec![2, 1], "new version and the previous one");

    // The two writes were on record before they ran: a request record
    // each, same request id, written before the outcome, naming who and
    // what but no result yet.
    let every = all_records(&env).await;
    for (k, action) in [("store", "ValidateAndStore"), ("rotate", "Rotate")] {
        let both: Vec<&AuditRecord> = every
            .iter()
            .filter(|r| r.request_id.to_string() == ids[k])
            .collect();
        assert_eq!(both.len(), 2, "{k}: a request and an outcome record");
        let req = both.iter().find(|r| r.result == "requested").expect(k);
        let out = both.iter().find(|r| r.result == "success").expect(k);
        assert_eq!(
            (req.action.as_ref(), req.grpc_code.as_ref()),
            (action, "PENDING")
        );
        assert_eq!(req.user, out.user);
        assert_eq!(req.tenant_id, out.tenant_id);
        assert_ne!(req.id, out.id);
        assert!(
            req.timestamp >= out.timestamp,
            "the request record follows admission"
        );
    }
    // Reads have one record each.
    assert_eq!(
        every
            .iter()
            .filter(|r| r.request_id.to_string() == ids["get1"])
            .count(),
        1
    );

    let denied = rec("denied");
    assert_eq!(
        (
            denied.event_type.as_ref(),
            denied.result.as_ref(),
            denied.grpc_code.as_ref()
        ),
        ("permission_denied", "denied", "PERMISSION_DENIED")
    );
    assert_eq!(denied.role, "trader");
    assert!(denied.versions.is_empty(), "nothing was read");

    let unauth = rec("unauthenticated");
    assert_eq!(
        (
            unauth.event_type.as_ref(),
            unauth.result.as_ref(),
            unauth.user.as_str()
        ),
        ("auth_failure", "denied", "unauthenticated")
    );

    // No secret anywhere in the trail.
    let c = env.db.connect().await;
    for row in c.query("SELECT body FROM audit_log", &[]).await.unwrap() {
        let body: &str = row.get(0);
        assert!(!body.contains("binanceSecret"), "{body}");
        assert!(
            !body.contains("binanceKey0"),
            "only the masked hint: {body}"
        );
    }

    // Export in the seed's format, filtered by tenant.
    let out = export(&env, &tenant).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let exported: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // The unauthenticated call named no tenant the broker could trust; the
    // two writes have a request record each besides their outcome.
    assert_eq!(exported.len(), wanted.len() - 1 + 2);
    for e in &exported {
        for field in [
            "timestamp",
            "event_type",
            "user",
            "resource",
            "action",
            "result",
            "ip_address",
            "user_agent",
        ] {
            assert!(e.get(field).is_some(), "{field} in {e}");
        }
        assert_eq!(e["tenant_id"], tenant.as_str());
    }

    // The chain verifies, and every kind of tampering is named.
    let verify = || async {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_credbroker"))
            .args(["audit", "verify", "--database-url", &env.db.url()])
            .output()
            .await
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let (ok, out) = verify().await;
    assert!(ok, "{out}");
    assert!(out.contains(": ok,"), "{out}");
    let target = &ids["get1"];
    // The target record as the `audit_log` view shows it, and the page
    // that holds it.
    let (seq, id): (i64, uuid::Uuid) = {
        let row = c
            .query_one(
                "SELECT seq, id FROM audit_log WHERE body LIKE '%' || $1 || '%'",
                &[target],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    let page = Page::holding(&c, target).await;
    let first: (i64, uuid::Uuid) = {
        let row = c
            .query_one(
                "SELECT seq, id FROM audit_log WHERE chain_id = $1 AND seq = $2",
                &[&page.chain_id, &page.first_seq],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    // Its body edited.
    page.with_line(&c, target, |l| {
        l.replacen("secret_access", "metadata_access", 1)
    })
    .await;
    let (ok, out) = verify().await;
    assert!(
        !ok && out.contains(&format!("record seq {seq} was edited"))
            && out.contains(&id.to_string()),
        "{out}"
    );
    page.restore(&c).await;
    assert!(verify().await.0, "restored");
    // It deleted.
    page.with_lines(&c, |lines| {
        lines.retain(|l| !l.contains(target.as_str()));
    })
    .await;
    let (ok, out) = verify().await;
    assert!(
        !ok && out.contains(&format!("after seq {} ", seq - 1)),
        "{out}"
    );
    page.restore(&c).await;
    assert!(verify().await.0, "restored");
    // Its page moved to another tenant: named (the page's first record),
    // and never exported as the other tenant's.
    page.set_tenant(&c, &other).await;
    let (ok, out) = verify().await;
    assert!(
        !ok && out.contains(&format!("record seq {}'s stored `tenant_id`", first.0))
            && out.contains(&first.1.to_string()),
        "{out}"
    );
    let moved = export(&env, &other).await;
    assert!(moved.status.success());
    assert!(
        !String::from_utf8_lossy(&moved.stdout).contains(target.as_str()),
        "a moved page is not exported as the other tenant's"
    );
    page.set_tenant(&c, &tenant).await;
    assert!(verify().await.0, "restored");
    // The page's time span moved (to hide it from an export window): named.
    c.execute(
        "UPDATE audit_pages SET at_max = at_max + interval '1 day' WHERE chain_id = $1 AND last_seq = $2",
        &[&page.chain_id, &page.last_seq],
    )
    .await
    .unwrap();
    let (ok, out) = verify().await;
    assert!(
        !ok && out.contains(&format!(
            "the page from record seq {}: its stored `at_max`",
            page.first_seq
        )),
        "{out}"
    );
    c.execute(
        "UPDATE audit_pages SET at_max = at_max - interval '1 day' WHERE chain_id = $1 AND last_seq = $2",
        &[&page.chain_id, &page.last_seq],
    )
    .await
    .unwrap();
    assert!(verify().await.0, "restored");
    // Two records swap places.
    page.with_lines(&c, |lines| {
        if lines.len() > 1 {
            lines.swap(0, 1);
            for l in lines.iter_mut().take(2) {
                let mut f: Vec<String> = l.splitn(3, ' ').map(str::to_owned).collect();
                f[0] = if f[0] == page.first_seq.to_string() {
                    (page.first_seq + 1).to_string()
                } else {
                    page.first_seq.to_string()
                };
                *l = f.join(" ");
            }
        }
    })
    .await;
    let (ok, out) = verify().await;
    assert!(!ok && out.contains("BROKEN"), "{out}");
    page.restore(&c).await;
    assert!(verify().await.0, "restored");
}

/// SIGKILL mid-load: every call a client saw answered has its record after
/// the broker restarts on the same spool.
#[tokio::test]
async fn sigkill_loses_no_answered_record() {
    let env = Env::start().await;
    let tenant = new_tenant();
    let mut server = env.spawn_server_process().await;
    let mut c = env
        .client_at(server.addr, &format!("spiffe://{TD}/operator/load"))
        .await;
    c.validate_and_store(store_n(&tenant, "binance"))
        .await
        .unwrap();
    let answered = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (mut c, answered, tenant) = (c.clone(), answered.clone(), tenant.clone());
        load.push(tokio::spawn(async move {
            loop {
                let r = c.get_credentials(get_req(&tenant, "binance")).await;
                match r {
                    Ok(resp) => answered.lock().unwrap().push(
                        resp.metadata()
                            .get("x-request-id")
                            .unwrap()
                            .to_str()
                            .unwrap()
                            .to_owned(),
                    ),
                    Err(_) => return,
                }
            }
        }));
    }
    // Killed mid-load: once the clients have had a few hundred answers.
    tokio::time::timeout(Duration::from_secs(30), async {
        while answered.lock().unwrap().len() < 300 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the load got answers");
    server.child.start_kill().unwrap();
    server.child.wait().await.unwrap();
    for l in load {
        l.await.unwrap();
    }
    let ids = answered.lock().unwrap().clone();
    assert!(ids.len() > 20, "the load ran ({} answered)", ids.len());
    // Restart on the same spool: it ships what the killed one had not.
    let restarted = env.spawn_server_process().await;
    shipped(&env, &ids).await;
    drop(restarted);
}

/// A call that cannot be audited changes nothing and is UNAVAILABLE.
#[tokio::test]
async fn calls_fail_closed_when_the_spool_cannot_take_a_record() {
    let m = Memory::start_with(MemoryOptions {
        audit_max_bytes: Some(1),
        ..MemoryOptions::default()
    })
    .await;
    let t = uuid::Uuid::new_v4().to_string();
    let mut op = m.client(&[&format!("spiffe://{TD}/operator/ops")]).await;
    op.validate_and_store(store_n(&t, "binance")).await.unwrap();
    let before = m.state(&t).await;
    let e = op.rotate(rotate_n(&t, "binance", 1)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains("audit spool is full"),
        "{}",
        e.message()
    );
    assert_eq!(m.state(&t).await, before, "nothing changed");
}

/// A tenant's admin pages through that tenant's records, never another's.
#[tokio::test]
async fn list_audit_events_pages_through_one_tenant() {
    const SECRET: &str = "audit-list-secret-at-least-32-bytes-long";
    let m = Memory::start_with(MemoryOptions {
        auth: AuthConfig {
            token: Some(TokenMode::Optional),
            hs256_secret: Some(SECRET.into()),
            ..AuthConfig::default()
        },
        limits: LimitsConfig::unlimited(),
        ..MemoryOptions::default()
    })
    .await;
    let (a, b) = (
        uuid::Uuid::new_v4().to_string(),
        uuid::Uuid::new_v4().to_string(),
    );
    let mut op = m.client(&[&format!("spiffe://{TD}/operator/ops")]).await;
    op.validate_and_store(store_n(&a, "binance")).await.unwrap();
    op.validate_and_store(store_n(&b, "binance")).await.unwrap();
    for _ in 0..4 {
        op.get_credentials(get_req(&a, "binance")).await.unwrap();
    }
    let token = {
        let exp = time::OffsetDateTime::now_utc().unix_timestamp() + 600;
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &serde_json::json!({"sub":"alice","tenant_id":a,"role":"admin","exp":exp}),
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    let mut admin = m
        .client(&[&format!("spiffe://{TD}/tenant/{a}/pod/admin")])
        .await;
    let list = |tenant: &str, page_token: String| {
        let mut r = Request::new(pb::ListAuditEventsRequest {
            tenant_id: tenant.to_owned(),
            page_size: 2,
            page_token,
            since: None,
        });
        r.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        r
    };
    // Wait for A's five records (one store, four reads) to be shipped.
    let mut seen = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            seen.clear();
            let mut page = String::new();
            loop {
                let r = admin
                    .list_audit_events(list(&a, page))
                    .await
                    .unwrap()
                    .into_inner();
                seen.extend(r.events);
                if r.next_page_token.is_empty() {
                    break;
                }
                page = r.next_page_token;
            }
            if seen.len() >= 5 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("A's records were listed");
    assert!(
        seen.iter().all(|e| e.tenant_id == a),
        "only tenant A's records"
    );
    let ids: std::collections::BTreeSet<_> = seen.iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids.len(), seen.len(), "pages do not overlap");
    assert!(
        seen.windows(2)
            .all(|w| w[0].timestamp.as_ref().unwrap().seconds
                >= w[1].timestamp.as_ref().unwrap().seconds),
        "newest first"
    );
    assert_eq!(
        seen.iter().filter(|e| e.action == "GetCredentials").count(),
        4
    );
    let e = admin
        .list_audit_events(list(&b, String::new()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
}

/// PostgreSQL (a private instance) stops during load: reads go on from the
/// cache, no call is refused for want of the database, the spool holds the
/// records, and when PostgreSQL returns every answered call's record is
/// shipped.
#[tokio::test]
async fn a_postgres_outage_blocks_no_read_and_loses_no_record() {
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
    let mut ids = Vec::new();
    let read =
        |c: &pb::credential_broker_client::CredentialBrokerClient<tonic::transport::Channel>| {
            let mut c = c.clone();
            let tenant = tenant.clone();
            async move {
                let r = c.get_credentials(get_req(&tenant, "binance")).await;
                let id = request_id(&r);
                r.unwrap();
                id
            }
        };
    for _ in 0..20 {
        ids.push(read(&c).await);
    }
    pg.stop();
    for _ in 0..50 {
        ids.push(read(&c).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    pg.pg_ctl_start();
    let admin = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(admin.1);
    tokio::time::timeout(Duration::from_secs(40), async {
        loop {
            let n = admin
                .0
                .query("SELECT body FROM audit_log", &[])
                .await
                .map(|rows| {
                    let bodies: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
                    ids.iter()
                        .filter(|id| bodies.iter().any(|b| b.contains(id.as_str())))
                        .count()
                })
                .unwrap_or(0);
            if n == ids.len() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("every record answered during the outage reached PostgreSQL");
    running.stop().await.unwrap();
}

/// The spool's file cannot be written (a file-size limit put on the running
/// `credbroker server` with prlimit, as a full or failing disk would): a
/// Rotate is refused before it runs and changes nothing, a read returns no
/// secret, health turns NOT_SERVING; once the limit is lifted the broker
/// serves again by itself (no restart), within a second, and both refused
/// calls are in the trail, after the spool's own recovery record.
#[tokio::test]
async fn a_spool_that_cannot_be_written_refuses_recovers_by_itself_and_records_the_refusals() {
    let env = Env::start().await;
    let server = env.spawn_server_process().await;
    let pid = server.child.id().unwrap().to_string();
    let mut op = env
        .client_at(server.addr, &format!("spiffe://{TD}/operator/ops"))
        .await;
    let tenant = new_tenant();
    op.validate_and_store(store_n(&tenant, "binance"))
        .await
        .unwrap();
    let count_sql = format!("SELECT count(*) FROM credential_events WHERE tenant_id = '{tenant}'");
    let events = || env.count(&count_sql);
    let before = events().await;
    let spool = env.pki.path("audit-process");
    let segment = credbroker::audit::spool::segments(&spool)
        .unwrap()
        .last()
        .copied()
        .unwrap();
    let size = std::fs::metadata(credbroker::audit::spool::segment_path(&spool, segment))
        .unwrap()
        .len();
    let prlimit = |limit: &str| {
        let out = std::process::Command::new("prlimit")
            .args(["--pid", &pid, &format!("--fsize={limit}")])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // The soft limit only: lifting it again needs no privilege.
    prlimit(&format!("{size}:unlimited"));

    let read = op.get_credentials(get_req(&tenant, "binance")).await;
    let read_id = request_id(&read);
    let e = read.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("withheld"), "{}", e.message());
    let rotate = op.rotate(rotate_n(&tenant, "binance", 1)).await;
    let e = rotate.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("nothing was done"), "{}", e.message());
    assert_eq!(events().await, before, "the refused Rotate changed nothing");
    // The health probe notices on its next round (every second here).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while server.health_status().await.unwrap()
        != tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
    {
        assert!(
            std::time::Instant::now() < deadline,
            "health stayed SERVING"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    prlimit("unlimited:unlimited");
    let lifted = std::time::Instant::now();
    let served = loop {
        match op.rotate(rotate_n(&tenant, "binance", 2)).await {
            Ok(_) => break lifted.elapsed(),
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                assert!(
                    lifted.elapsed() < Duration::from_secs(20),
                    "never recovered"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    eprintln!("audit spool unwritable, then writable again: serving {served:?} later");
    assert_eq!(
        events().await,
        before + 1,
        "only the Rotate after recovery ran"
    );

    // The trail: the recovery record, the withheld read (by its request
    // id) and the Rotate refused at the door.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let all = all_records(&env).await;
        let recovered = all.iter().any(|r| r.action == "AuditSpoolRecovered");
        let withheld = all.iter().any(|r| {
            r.request_id.to_string() == read_id
                && r.grpc_code == "UNAVAILABLE"
                && r.result == "failure"
        });
        let refused = all
            .iter()
            .any(|r| r.action == "Rotate" && r.event_type == "audit_unavailable");
        if recovered && withheld && refused {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "recovered {recovered}, withheld read {withheld}, refused rotate {refused}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A Rotate that commits, then outlasts its client's deadline (a slow step
/// after the commit): the client gives up, and the trail
/// still has the call's request record and its true outcome, the committed
/// version included. Before, the deadline dropped the audit layer's
/// future and with it the record.
#[tokio::test]
async fn a_deadline_after_the_commit_loses_no_record() {
    use crate::support::probe::ProbeMeta;

    let env = Env::start().await;
    let mut backends = credbroker::app::real_backends(&env.config).await.unwrap();
    let meta = ProbeMeta::new(backends.meta.clone());
    backends.meta = meta.clone();
    let b = env.replica_with(backends, None).await;
    let mut op = env
        .client_at(b.addr, &format!("spiffe://{TD}/operator/ops"))
        .await;
    let tenant = new_tenant();
    op.validate_and_store(store_n(&tenant, "binance"))
        .await
        .unwrap();
    meta.hold_after_rotate(Duration::from_millis(1500));
    let mut req = Request::new(rotate_n(&tenant, "binance", 1));
    req.set_timeout(Duration::from_millis(300));
    let e = op.rotate(req).await.unwrap_err();
    // tonic's client gives up on its own clock (CANCELLED) or hears the
    // server's DEADLINE_EXCEEDED, whichever comes first.
    assert!(
        matches!(e.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{e:?}"
    );
    // The commit happened.
    let committed = env
        .count(&format!(
            "SELECT count(*) FROM credential_events WHERE tenant_id = '{tenant}' AND kind = 'rotated' AND version = 2"
        ))
        .await;
    assert_eq!(committed, 1);
    // Its records: the request, and the outcome with version 2, once the
    // held step ends.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let rotates: Vec<AuditRecord> = all_records(&env)
            .await
            .into_iter()
            .filter(|r| {
                r.action == "Rotate" && r.tenant_id.is_some_and(|t| t.to_string() == tenant)
            })
            .collect();
        let requested = rotates.iter().any(|r| r.result == "requested");
        let outcome = rotates
            .iter()
            .find(|r| r.result == "success" && r.versions.first() == Some(&2));
        if requested && outcome.is_some() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "records of the Rotate: {rotates:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.stop().await.unwrap();
}

/// Refused calls are counted, not recorded one by one: a burst beyond
/// `max_concurrent_calls` and a tenant's flood past its rate limit each
/// leave one record per caller, method and interval, whose `count` is
/// exactly the number of calls the clients saw refused.
#[tokio::test]
async fn refusals_are_aggregated_per_caller_with_exact_counts() {
    use credbroker::{config::TenantLimits, server::FrontDoor};

    let limited = uuid::Uuid::new_v4();
    let mut limits = LimitsConfig::unlimited();
    limits.tenants.insert(
        limited,
        TenantLimits {
            reads_per_minute: Some(5),
            ..TenantLimits::default()
        },
    );
    let m = Memory::start_with(MemoryOptions {
        limits,
        front: FrontDoor {
            max_concurrent_calls: 2,
            ..FrontDoor::default()
        },
        ..MemoryOptions::default()
    })
    .await;
    let (a, b) = (limited.to_string(), uuid::Uuid::new_v4().to_string());
    let mut op = m.client(&[&format!("spiffe://{TD}/operator/ops")]).await;
    op.validate_and_store(store_n(&a, "binance")).await.unwrap();
    op.validate_and_store(store_n(&b, "binance")).await.unwrap();

    // Tenant A's pod, one call at a time, past its limit.
    let mut pod = m
        .client(&[&format!("spiffe://{TD}/tenant/{a}/pod/p")])
        .await;
    let mut rate_refused = 0;
    for _ in 0..40 {
        match pod.get_credentials(get_req(&a, "binance")).await {
            Ok(_) => {}
            Err(e) if e.code() == Code::ResourceExhausted => rate_refused += 1,
            Err(e) => panic!("{e:?}"),
        }
    }
    assert!(rate_refused >= 30, "{rate_refused}");

    // A burst on tenant B from another pod: most shed for overload.
    let pod_b = m
        .client(&[&format!("spiffe://{TD}/tenant/{b}/pod/q")])
        .await;
    let calls = (0..160).map(|_| {
        let mut c = pod_b.clone();
        let b = b.clone();
        async move { c.get_credentials(get_req(&b, "binance")).await }
    });
    let shed = futures::future::join_all(calls)
        .await
        .into_iter()
        .filter(|r| {
            r.as_ref()
                .err()
                .is_some_and(|e| e.code() == Code::ResourceExhausted)
        })
        .count() as u64;
    assert!(shed > 0, "the burst must exceed two calls in flight");

    // Stopping flushes the tallies; read the spool.
    let spool = m.pki.path("audit");
    m.running.stop().await.unwrap();
    let records = spool_records(&spool);
    let rate: Vec<&AuditRecord> = records
        .iter()
        .filter(|r| r.event_type == "rate_limited")
        .collect();
    assert_eq!(rate.len(), 1, "one record for the flood: {rate:?}");
    assert_eq!(rate[0].count, Some(rate_refused));
    assert_eq!(rate[0].tenant_id.map(|t| t.to_string()), Some(a.clone()));
    assert_eq!(rate[0].user, format!("spiffe://{TD}/tenant/{a}/pod/p"));
    let overload: Vec<&AuditRecord> = records
        .iter()
        .filter(|r| r.event_type == "overloaded")
        .collect();
    assert_eq!(overload.len(), 1, "one record for the burst: {overload:?}");
    assert_eq!(overload[0].count, Some(shed));
    assert_eq!(overload[0].user, format!("spiffe://{TD}/tenant/{b}/pod/q"));
    // No refused call left a record of its own.
    assert!(
        records
            .iter()
            .filter(|r| r.grpc_code == "RESOURCE_EXHAUSTED")
            .all(|r| r.count.is_some())
    );
}

/// Every record in a spool directory, in chain order.
fn spool_records(spool: &std::path::Path) -> Vec<AuditRecord> {
    use credbroker::audit::spool::{ChainedRecord, segment_path, segments};
    segments(spool)
        .unwrap()
        .into_iter()
        .flat_map(|n| {
            std::fs::read_to_string(segment_path(spool, n))
                .unwrap()
                .lines()
                .map(|l| {
                    let c: ChainedRecord = serde_json::from_str(l).unwrap();
                    serde_json::from_str(&c.body).unwrap()
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A call whose token is wrongly signed (or expired) but names tenant A is
/// recorded under A, marked unverified, so A's admin sees attempts on A.
#[tokio::test]
async fn authentication_failures_are_recorded_under_the_claimed_tenant() {
    let m = Memory::start_with(MemoryOptions {
        auth: AuthConfig {
            token: Some(TokenMode::Required),
            hs256_secret: Some("the-right-secret-at-least-32-bytes-long".into()),
            ..AuthConfig::default()
        },
        limits: LimitsConfig::unlimited(),
        ..MemoryOptions::default()
    })
    .await;
    let a = uuid::Uuid::new_v4().to_string();
    let forged = {
        let exp = time::OffsetDateTime::now_utc().unix_timestamp() + 600;
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &serde_json::json!({"sub":"mallory","tenant_id":a,"role":"admin","exp":exp}),
            &jsonwebtoken::EncodingKey::from_secret(b"a-wrong-secret-also-at-least-32-bytes"),
        )
        .unwrap()
    };
    let mut op = m.client(&[&format!("spiffe://{TD}/operator/ops")]).await;
    let mut req = Request::new(get_req(&a, "binance"));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {forged}").parse().unwrap());
    let r = op.get_credentials(req).await;
    let id = request_id(&r);
    assert_eq!(r.unwrap_err().code(), Code::Unauthenticated);
    let spool = m.pki.path("audit");
    m.running.stop().await.unwrap();
    let rec = spool_records(&spool)
        .into_iter()
        .find(|r| r.request_id.to_string() == id)
        .expect("the refused call's record");
    assert_eq!(rec.event_type, "auth_failure");
    assert_eq!(rec.role, "unverified");
    assert_eq!(rec.tenant_id.map(|t| t.to_string()), Some(a));
    assert!(rec.user.contains("mallory"), "{}", rec.user);
}

/// Background jobs follow the same rule: while the trail takes no records,
/// the retire job ends no overlap and the orphan sweep destroys nothing.
#[tokio::test]
async fn background_jobs_do_nothing_the_trail_cannot_show() {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };

    use credbroker::{
        audit::{AuditError, AuditSink},
        broker::{
            Broker, BrokerSettings,
            context::RequestContext,
            ports::{MetadataStore, SecretStore},
            types::{CredentialSet, ExchangeId, TenantId},
            validate::FormatCheckValidator,
        },
        cache::CredentialCache,
        clock::ManualClock,
        memstore::{MemoryMetadataStore, MemorySecretStore},
        rotation::{
            hub::Hub,
            retire::{retire_once, sweep_orphans},
        },
    };
    use secrecy::SecretString;

    /// A trail that can be switched off.
    #[derive(Default)]
    struct Switch(AtomicBool);
    impl AuditSink for Switch {
        fn append(&self, _: &AuditRecord) -> Result<(), AuditError> {
            self.check()
        }
        fn check(&self) -> Result<(), AuditError> {
            if self.0.load(Ordering::SeqCst) {
                Err(AuditError::Io("switched off".into()))
            } else {
                Ok(())
            }
        }
    }

    let clock = Arc::new(ManualClock::new(time::OffsetDateTime::now_utc()));
    let meta = Arc::new(MemoryMetadataStore::default());
    let secrets = Arc::new(MemorySecretStore::default());
    let trail = Arc::new(Switch::default());
    let broker = Broker::new(
        secrets.clone(),
        meta.clone(),
        Arc::new(FormatCheckValidator),
        CredentialCache::new(16, time::Duration::minutes(5), time::Duration::hours(1)),
        Hub::new(16),
        clock.clone(),
        BrokerSettings::default(),
    )
    .with_audit(trail.clone());
    let t = TenantId::new(uuid::Uuid::new_v4());
    let set = |n: u32| CredentialSet {
        api_key: format!("jobKey{n:06}"),
        api_secret: SecretString::from(format!("jobSecret{n:06}")),
        passphrase: None,
    };
    let ctx = RequestContext::system("test");
    broker
        .validate_and_store(&ctx, t, ExchangeId::Binance, set(1))
        .await
        .unwrap();
    broker
        .rotate(
            &ctx,
            t,
            ExchangeId::Binance,
            set(2),
            Some(time::Duration::minutes(1)),
        )
        .await
        .unwrap();
    // An orphan: a version no row references.
    let path = broker.vault_path(t, ExchangeId::Binance);
    secrets.write(&path, &set(3), 2).await.unwrap();
    clock.advance(time::Duration::hours(2));

    trail.0.store(true, Ordering::SeqCst);
    assert!(retire_once(&broker).await.is_err());
    assert!(sweep_orphans(&broker, time::Duration::ZERO).await.is_err());
    let row = meta.get(t, ExchangeId::Binance).await.unwrap().unwrap();
    assert_eq!(row.previous_version, Some(1), "the overlap was not ended");
    assert!(
        secrets
            .versions(&path)
            .await
            .unwrap()
            .iter()
            .all(|v| !v.destroyed),
        "nothing destroyed"
    );

    // The trail is back: both jobs act.
    trail.0.store(false, Ordering::SeqCst);
    assert_eq!(retire_once(&broker).await.unwrap(), 1);
    assert!(sweep_orphans(&broker, time::Duration::ZERO).await.unwrap() >= 1);
}

/// A stored audit page (`audit_pages`), as a test edits it by hand.
struct Page {
    chain_id: uuid::Uuid,
    first_seq: i64,
    last_seq: i64,
    lines: String,
}

impl Page {
    /// The page holding the record whose body contains `needle`.
    async fn holding(c: &tokio_postgres::Client, needle: &str) -> Page {
        Self::one(c, "strpos(lines, $1) > 0", needle).await
    }

    /// The page holding the record of seq `seq` (of the only chain).
    async fn holding_seq(c: &tokio_postgres::Client, seq: i64) -> Page {
        Self::one(c, "lines ~ ('(^|\n)' || $1 || ' ')", &seq.to_string()).await
    }

    /// The one page matching `condition` on `$1`.
    async fn one(c: &tokio_postgres::Client, condition: &str, arg: &str) -> Page {
        let row = c
            .query_one(
                &format!(
                    "SELECT chain_id, first_seq, last_seq, lines FROM audit_pages WHERE {condition}"
                ),
                &[&arg],
            )
            .await
            .unwrap();
        Page {
            chain_id: row.get(0),
            first_seq: row.get(1),
            last_seq: row.get(2),
            lines: row.get(3),
        }
    }

    async fn set(&self, c: &tokio_postgres::Client, lines: &str) {
        c.execute(
            "UPDATE audit_pages SET lines = $3 WHERE chain_id = $1 AND last_seq = $2",
            &[&self.chain_id, &self.last_seq, &lines],
        )
        .await
        .unwrap();
    }

    /// Rewrites its lines.
    async fn with_lines(&self, c: &tokio_postgres::Client, f: impl FnOnce(&mut Vec<String>)) {
        let mut lines: Vec<String> = self.lines.split('\n').map(str::to_owned).collect();
        f(&mut lines);
        self.set(c, &lines.join("\n")).await;
    }

    /// Rewrites the line that contains `needle`.
    async fn with_line(
        &self,
        c: &tokio_postgres::Client,
        needle: &str,
        f: impl Fn(&str) -> String,
    ) {
        self.with_lines(c, |lines| {
            for l in lines.iter_mut().filter(|l| l.contains(needle)) {
                *l = f(l);
            }
        })
        .await;
    }

    /// Moves it to `tenant` (its column only).
    async fn set_tenant(&self, c: &tokio_postgres::Client, tenant: &str) {
        c.execute(
            "UPDATE audit_pages SET tenant_id = $3 WHERE chain_id = $1 AND last_seq = $2",
            &[
                &self.chain_id,
                &self.last_seq,
                &uuid::Uuid::parse_str(tenant).unwrap(),
            ],
        )
        .await
        .unwrap();
    }

    /// Puts its lines back as they were.
    async fn restore(&self, c: &tokio_postgres::Client) {
        self.set(c, &self.lines).await;
    }
}

/// A throw-away database with the schema, and the store on it.
async fn migrated_store() -> (crate::support::TestDb, credbroker::store::PgMetadataStore) {
    crate::support::init();
    let db = crate::support::TestDb::create().await;
    let store = db.migrated_store(2).await;
    (db, store)
}

/// A record as the layer writes it, at `at`, for `tenant`.
fn record_at(at: time::OffsetDateTime, tenant: credbroker::broker::types::TenantId) -> AuditRecord {
    let id = uuid::Uuid::now_v7();
    AuditRecord {
        id,
        timestamp: at,
        event_type: "secret_access".into(),
        user: "spiffe://test/pod".into(),
        role: "trader".into(),
        resource: "binance_api_key".into(),
        action: "GetCredentials".into(),
        result: "success".into(),
        ip_address: None,
        user_agent: None,
        tenant_id: Some(tenant),
        exchange: None,
        versions: vec![1],
        request_id: id,
        trace_id: None,
        grpc_code: "OK".into(),
        duration_ms: 0.1,
        key_hint: None,
        count: None,
    }
}

/// The sink: batches go in by binary COPY into day partitions (a batch
/// re-sent after a crash adds nothing twice); retention drops whole days
/// older than `audit.retention_days` and `verify` then checks the chain
/// from its oldest retained record, which must link to the recorded cut;
/// a record removed past the cut is still caught. A tenant reads only its
/// own records, through its view, and nothing of the table itself.
#[tokio::test]
async fn the_sink_copies_into_days_and_retention_drops_whole_days() {
    use credbroker::{
        audit::{AuditSink as _, retention, ship, spool::Spool},
        broker::{ports::AuditLog as _, types::TenantId},
        store::PgMetadataStore,
    };
    let (db, store) = migrated_store().await;
    let (a, b) = (
        TenantId::new(uuid::Uuid::new_v4()),
        TenantId::new(uuid::Uuid::new_v4()),
    );
    // Five days of records, 20 a day, ending today.
    let now = time::OffsetDateTime::now_utc();
    let today = now.date().midnight().assume_utc();
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), 1 << 30).unwrap();
    for day in (0..5).rev() {
        for i in 0..20 {
            let at = today - time::Duration::days(day) + time::Duration::minutes(i);
            spool
                .append(&record_at(at, if i % 2 == 0 { a } else { b }))
                .unwrap();
        }
    }
    spool.sync().unwrap();
    let shipped = ship::ship_once(&spool, &store).await.unwrap();
    assert_eq!(shipped.records, 100);
    let c = db.connect().await;
    let count = |sql: &'static str| {
        let c = &c;
        async move { c.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    assert_eq!(count("SELECT count(*) FROM audit_log").await, 100);
    // Five day partitions hold them (and the days ahead exist, empty).
    assert_eq!(
        count("SELECT count(DISTINCT tableoid) FROM audit_pages").await,
        5
    );
    // One page per tenant and day.
    assert_eq!(count("SELECT count(*) FROM audit_pages").await, 10);
    // The same batch again (a crash before the shipped offset was saved):
    // nothing twice.
    let mut rows = store.audit_chains().await.unwrap().remove(0).rows;
    rows.truncate(30);
    store.ship_audit(rows).await.unwrap();
    assert_eq!(count("SELECT count(*) FROM audit_log").await, 100);

    let verify = |store: &PgMetadataStore| {
        let store = store.clone();
        async move { credbroker::audit::chain::verify_all(&store.audit_chains().await.unwrap()) }
    };
    assert_eq!(verify(&store).await.broken, 0);

    // Keep two days: a day goes once all of it is older than that, so the
    // two oldest go whole, the day that ended less than two days ago stays.
    let pruned = retention::run_once(&store, 2, now).await.unwrap();
    assert_eq!(pruned.days, 2);
    assert_eq!(pruned.chains, 1);
    assert_eq!(count("SELECT count(*) FROM audit_log").await, 60);
    assert_eq!(
        count("SELECT min(seq) FROM audit_log").await,
        41,
        "the chain now starts after the last removed record"
    );
    let report = verify(&store).await;
    assert_eq!(report.broken, 0, "{:?}", report.lines);
    assert!(
        report.lines[0].contains("from seq 41"),
        "{:?}",
        report.lines
    );
    // Idempotent: nothing more to drop.
    assert_eq!(retention::run_once(&store, 2, now).await.unwrap().days, 0);
    // A record removed past the cut is a deletion, not retention.
    Page::holding_seq(&c, 41)
        .await
        .with_lines(&c, |lines| {
            lines.retain(|l| l.split(' ').next() != Some("41"));
        })
        .await;
    let report = verify(&store).await;
    assert_eq!(report.broken, 1, "{:?}", report.lines);
    assert!(report.lines[0].contains("BROKEN"), "{:?}", report.lines);

    // The tenant role: no privilege on the pages nor on the records' view,
    // its own pages in its view.
    let as_a =
        format!("BEGIN; SET LOCAL ROLE credbroker_tenant; SET LOCAL credbroker.tenant_id = '{a}'");
    for table in ["audit_pages", "audit_log"] {
        c.batch_execute(&as_a).await.unwrap();
        let denied = c
            .query(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap_err();
        assert_eq!(
            denied.code(),
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{table}"
        );
        c.batch_execute("ROLLBACK").await.unwrap();
    }
    c.batch_execute(&as_a).await.unwrap();
    let seen: Vec<(Option<uuid::Uuid>, i32)> = c
        .query(
            "SELECT tenant_id, array_length(string_to_array(lines, E'\\n'), 1) FROM tenant_audit_pages",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    c.batch_execute("ROLLBACK").await.unwrap();
    assert!(seen.iter().all(|(t, _)| *t == Some(a.as_uuid())));
    assert_eq!(
        seen.iter().map(|(_, n)| n).sum::<i32>(),
        29,
        "a's records of the three days kept, less the one deleted"
    );
    let listed = store.list_audit(b, None, None, 100).await.unwrap();
    assert_eq!(listed.len(), 30);
    assert!(listed.iter().all(|r| r.tenant == Some(b)));
}

/// Retention as a deployment runs it: the login role owns the schema and
/// is no superuser, so row-level security applies to it too. Anchors
/// naming records a retention cut removed go with them (the table grew for
/// ever before), what is left verifies, and the broker's own role still
/// cannot remove an anchor.
#[tokio::test]
async fn retention_removes_the_anchors_below_its_cut_as_a_plain_owner() {
    use credbroker::{
        audit::{AuditSink as _, retention, ship, spool::Spool},
        broker::types::TenantId,
    };
    crate::support::init();
    let db = crate::support::TestDb::create_owned().await;
    let store = db.migrated_store(2).await;
    let tenant = TenantId::new(uuid::Uuid::new_v4());
    let now = time::OffsetDateTime::now_utc();
    let today = now.date().midnight().assume_utc();
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), 1 << 30).unwrap();
    // Three days of ten records, each day shipped (and anchored) on its own.
    for day in (0..3).rev() {
        for i in 0..10 {
            let at = today - time::Duration::days(day) + time::Duration::minutes(i);
            spool.append(&record_at(at, tenant)).unwrap();
        }
        assert_eq!(ship::ship_once(&spool, &store).await.unwrap().records, 10);
    }
    let c = db.connect().await;
    let anchors = || {
        let c = &c;
        async move {
            c.query("SELECT seq FROM audit_anchors ORDER BY seq", &[])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<_, i64>(0))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(anchors().await, [10, 20, 30]);
    // Keep one day: the oldest day goes, and with it the anchor naming its
    // last record.
    let pruned = retention::run_once(&store, 1, now).await.unwrap();
    assert_eq!((pruned.days, pruned.chains, pruned.anchors), (1, 1, 1));
    assert_eq!(anchors().await, [20, 30]);
    let report = credbroker::audit::chain::verify_all(&store.audit_chains().await.unwrap());
    assert_eq!(report.broken, 0, "{:?}", report.lines);
    assert!(report.lines[0].contains("2 anchors"), "{:?}", report.lines);
    // The broker's role may read and add anchors, never remove one.
    c.batch_execute("BEGIN; SET LOCAL ROLE credbroker_system")
        .await
        .unwrap();
    let denied = c.execute("DELETE FROM audit_anchors", &[]).await;
    assert_eq!(
        denied.as_ref().err().and_then(|e| e.code()),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
        "{denied:?}"
    );
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(anchors().await, [20, 30]);
}

/// A change committed by a call whose outcome record a crash lost (it
/// waited in memory for a spool that could not be written): the replica
/// whose chain holds the call's request record writes the outcome from the
/// event log (the event names the request id), once; a call with both
/// records, and a call of another replica's chain, are left alone.
#[tokio::test]
async fn an_outcome_a_crash_lost_is_written_from_the_event_log() {
    use credbroker::{
        audit::{AuditSink as _, reconcile, ship, spool::Spool},
        broker::{
            ports::{ChangedBy, MetadataStore as _, NewCredential},
            types::{ExchangeId, Permissions, TenantId},
        },
    };
    let (_db, store) = migrated_store().await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (mine, other) = (
        Spool::open(dir_a.path(), 1 << 30).unwrap(),
        Spool::open(dir_b.path(), 1 << 30).unwrap(),
    );
    let now = time::OffsetDateTime::now_utc();
    // A call: its request record in `spool`, its change committed, and its
    // outcome record only when `outcome`.
    let call = |spool: std::sync::Arc<Spool>, outcome: bool| {
        let store = store.clone();
        async move {
            let tenant = TenantId::new(uuid::Uuid::new_v4());
            let mut r = record_at(time::OffsetDateTime::now_utc(), tenant);
            r.action = "ValidateAndStore".into();
            r.user = "spiffe://test/operator/ops".into();
            r.role = "operator".into();
            let request_id = r.request_id;
            spool.append(&r.clone().into_request()).unwrap();
            store
                .insert(NewCredential {
                    tenant,
                    exchange: ExchangeId::Okx,
                    vault_path: format!("t/{tenant}/okx"),
                    version: 1,
                    permissions: Permissions::default(),
                    api_key_hint: "****".into(),
                    validated_at: time::OffsetDateTime::now_utc(),
                    by: ChangedBy {
                        actor: "spiffe://test/operator/ops (operator)".into(),
                        request_id: Some(request_id),
                    },
                })
                .await
                .unwrap();
            if outcome {
                spool.append(&r).unwrap();
            }
            request_id
        }
    };
    let lost = call(mine.clone(), false).await;
    let whole = call(mine.clone(), true).await;
    let elsewhere = call(other.clone(), false).await;
    for s in [&mine, &other] {
        s.sync().unwrap();
        ship::ship_once(s, &store).await.unwrap();
    }
    // The chain has looked before, an hour ago.
    reconcile::write_horizon(dir_a.path(), now - time::Duration::hours(1)).unwrap();
    // Nothing younger than the window is looked at: the calls may still run.
    assert_eq!(
        reconcile::reconcile_once(&mine, &store, now).await.unwrap(),
        0
    );
    let later = now + reconcile::WINDOW + time::Duration::minutes(1);
    assert_eq!(
        reconcile::reconcile_once(&mine, &store, later)
            .await
            .unwrap(),
        1
    );
    ship::ship_once(&mine, &store).await.unwrap();
    let outcomes = |id: uuid::Uuid| {
        let store = store.clone();
        async move {
            store
                .audit_export(None, None, None)
                .await
                .unwrap()
                .into_iter()
                .map(|r| serde_json::from_str::<AuditRecord>(&r.body).unwrap())
                .filter(|r| r.request_id == id && r.result != "requested")
                .collect::<Vec<_>>()
        }
    };
    let written = outcomes(lost).await;
    assert_eq!(written.len(), 1, "{written:?}");
    let w = &written[0];
    assert_eq!(
        (w.action.as_ref(), w.result.as_ref(), w.grpc_code.as_ref()),
        ("ValidateAndStore", "success", "UNKNOWN")
    );
    assert_eq!(w.versions, vec![1]);
    assert_eq!(
        (w.user.as_str(), w.role.as_ref()),
        ("spiffe://test/operator/ops", "operator")
    );
    assert_eq!(w.exchange, Some(ExchangeId::Okx));
    assert_eq!(
        outcomes(whole).await.len(),
        1,
        "the whole call is left alone"
    );
    assert!(
        outcomes(elsewhere).await.is_empty(),
        "another chain's call is its own"
    );
    // Looked once: the next look starts where this one ended.
    let again = later + time::Duration::minutes(2);
    assert_eq!(
        reconcile::reconcile_once(&mine, &store, again)
            .await
            .unwrap(),
        0
    );
    assert_eq!(outcomes(lost).await.len(), 1);
    // The chains still verify.
    let report = credbroker::audit::chain::verify_all(&store.audit_chains().await.unwrap());
    assert_eq!(report.broken, 0, "{:?}", report.lines);
}

#[tokio::test]
async fn a_stream_with_include_credentials_sends_each_set_and_records_each_as_a_read() {
    use pb::watch_rotations_response::Message;
    let env = Env::start().await;
    let (tenant, mut op) = env.stored_tenant().await;
    let mut pod = env.tenant_client(&tenant).await;
    let watch = |include_credentials| pb::WatchRotationsRequest {
        tenant_id: tenant.clone(),
        exchanges: vec![],
        after_seq: 0,
        include_credentials,
    };

    // Without the flag, no set travels on the stream.
    let mut plain = pod
        .watch_rotations(watch(false))
        .await
        .unwrap()
        .into_inner();
    let m = next_sent(&mut plain).await;
    assert!(matches!(m.message, Some(Message::State(_))));
    assert!(m.credentials.is_none(), "no set unless asked for");
    drop(plain);

    let r = pod.watch_rotations(watch(true)).await;
    let stream_id = request_id(&r);
    let mut stream = r.unwrap().into_inner();
    // The state carries the set itself.
    let m = next_sent(&mut stream).await;
    let Some(Message::State(state)) = &m.message else {
        panic!("state first, got {m:?}")
    };
    let set = m.credentials.expect("the state's set");
    assert_eq!((state.version, set.version), (1, 1));
    let cur = set.current.unwrap();
    assert_eq!(
        (cur.api_key.as_str(), cur.api_secret.as_str()),
        ("binanceKey000000", "binanceSecret000000")
    );
    assert!(set.previous.is_none());

    // A rotation's event carries the new set and the previous one with its
    // deadline: what GetCredentials would answer, without asking.
    op.rotate(rotate_n(&tenant, "binance", 1)).await.unwrap();
    let m = next_sent(&mut stream).await;
    let Some(Message::Event(e)) = &m.message else {
        panic!("the rotation's event, got {m:?}")
    };
    let set = m.credentials.expect("the event's set");
    assert_eq!(
        (e.kind, e.version, set.version, set.previous_version),
        (pb::EventKind::Rotated as i32, 2, 2, Some(1))
    );
    assert_eq!(set.current.unwrap().api_key, "binanceKey000001");
    assert_eq!(set.previous.unwrap().api_key, "binanceKey000000");
    assert!(set.previous_valid_until.is_some());
    let got = pod
        .get_credentials(get_req(&tenant, "binance"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.version, 2);
    // A stream resumed after that event starts with the state, without
    // the set the client already holds; one resumed before it gets it.
    for (after_seq, sent) in [(e.seq, false), (e.seq - 1, true)] {
        let mut resumed = pod
            .watch_rotations(pb::WatchRotationsRequest {
                after_seq,
                ..watch(true)
            })
            .await
            .unwrap()
            .into_inner();
        let m = next_sent(&mut resumed).await;
        assert!(matches!(m.message, Some(Message::State(_))), "{m:?}");
        assert_eq!(m.credentials.is_some(), sent, "after seq {after_seq}");
    }

    // Each set sent is a read on the trail: secret_access, the stream's
    // request id, who read, which versions; a record of its own each.
    let sent = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let sent: Vec<AuditRecord> = all_records(&env)
                .await
                .into_iter()
                .filter(|r| {
                    r.request_id.to_string() == stream_id && r.event_type == "secret_access"
                })
                .collect();
            if sent.len() >= 2 {
                return sent;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("both sets' records reached PostgreSQL");
    let mut versions: Vec<Vec<u64>> = sent.iter().map(|r| r.versions.clone()).collect();
    versions.sort();
    assert_eq!(versions, vec![vec![1], vec![2, 1]]);
    for r in &sent {
        assert_eq!(
            (r.action.as_ref(), r.result.as_ref(), r.resource.as_ref()),
            ("WatchRotations", "success", "binance_api_key")
        );
        assert_eq!(r.user, format!("spiffe://{TD}/tenant/{tenant}/pod/test"));
        assert_eq!(r.role, "trader");
        assert_eq!(r.tenant_id.unwrap().to_string(), tenant);
        assert_ne!(r.id.to_string(), stream_id, "a record of its own");
    }
}
