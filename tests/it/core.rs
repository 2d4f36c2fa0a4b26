//! The contract end to end: store, get, describe, list, delete, bad input,
//! tenant isolation.

use credbroker::api::pb::{self, CredentialStatus};
use tonic::Code;
use tonic_types::StatusExt as _;

use crate::support::{Env, get_req, new_tenant, set, store_req};

#[tokio::test]
async fn store_then_get_round_trips_through_vault_and_postgres() {
    let env = Env::start().await;
    let tenant = new_tenant();
    let mut c = env.operator().await;
    let stored = c
        .validate_and_store(store_req(
            &tenant,
            "binance",
            "binanceKey0001abcd",
            "binanceSecret0001",
        ))
        .await
        .unwrap()
        .into_inner()
        .credential
        .unwrap();
    assert_eq!(stored.version, 1);
    assert_eq!(stored.status, CredentialStatus::Active as i32);
    assert_eq!(stored.api_key_hint, "****abcd");
    let path = env.credential_path(&tenant, "binance");
    assert_eq!(stored.vault_path, path);

    let got = c
        .get_credentials(get_req(&tenant, "binance"))
        .await
        .unwrap()
        .into_inner();
    let cur = got.current.unwrap();
    assert_eq!(
        (cur.api_key.as_str(), cur.api_secret.as_str()),
        ("binanceKey0001abcd", "binanceSecret0001")
    );
    assert_eq!(got.version, 1);
    assert!(got.previous.is_none() && !got.stale);

    // The secret really is in OpenBao at the documented path, as version 1.
    let (code, body) = env
        .bao
        .http("GET", &format!("/v1/secret/data/{path}"), None)
        .await
        .unwrap();
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["data"]["data"]["api_secret"], "binanceSecret0001");
    assert_eq!(v["data"]["metadata"]["version"], 1);
    // And PostgreSQL holds only metadata: no secret byte in any column.
    let c2 = env.db.connect().await;
    let row = c2
        .query_one("SELECT row_to_json(t)::text FROM tenant_credentials t WHERE tenant_id = $1::text::uuid", &[&tenant])
        .await
        .unwrap();
    let json: String = row.get(0);
    assert!(
        !json.contains("binanceSecret0001") && !json.contains("binanceKey0001abcd"),
        "{json}"
    );
    assert!(json.contains("\"current_version\":1"), "{json}");
    assert_eq!(
        env.count("SELECT count(*) FROM credential_events WHERE kind = 'stored'")
            .await,
        1
    );

    // Describe and List never carry secrets.
    let d = crate::support::describe(&mut c, &tenant, "binance").await;
    assert_eq!(d.version, 1);
    assert!(!format!("{d:?}").contains("binanceSecret0001"));
    let l = c
        .list_credentials(pb::ListCredentialsRequest {
            tenant_id: tenant.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(l.credentials.len(), 1);

    // A second store for the same exchange must go through Rotate.
    let again = c
        .validate_and_store(store_req(
            &tenant,
            "binance",
            "binanceKey0002abcd",
            "binanceSecret0002",
        ))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists, "{again:?}");
    assert!(again.message().contains("Rotate"));
}

#[tokio::test]
async fn delete_removes_metadata_and_every_vault_version() {
    let env = Env::start().await;
    let tenant = new_tenant();
    let mut c = env.operator().await;
    c.validate_and_store(store_req(
        &tenant,
        "kraken",
        "krakenKey0001",
        "krakenSecret0001",
    ))
    .await
    .unwrap();
    c.rotate(pb::RotateRequest {
        tenant_id: tenant.clone(),
        exchange: "kraken".into(),
        credentials: Some(set("krakenKey0002", "krakenSecret0002")),
        overlap_seconds: None,
        mint: false,
    })
    .await
    .unwrap();
    let req = pb::DeleteCredentialsRequest {
        tenant_id: tenant.clone(),
        exchange: "kraken".into(),
    };
    assert!(
        c.delete_credentials(req.clone())
            .await
            .unwrap()
            .into_inner()
            .deleted
    );
    let err = c
        .get_credentials(get_req(&tenant, "kraken"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let (code, _) = env
        .kv_metadata(&env.credential_path(&tenant, "kraken"))
        .await;
    assert_eq!(code, 404, "every Vault version is gone");
    assert_eq!(
        env.count("SELECT count(*) FROM tenant_credentials").await,
        0
    );
    assert_eq!(
        env.count("SELECT count(*) FROM credential_events WHERE kind = 'deleted'")
            .await,
        1
    );
    // Idempotent.
    assert!(
        !c.delete_credentials(req)
            .await
            .unwrap()
            .into_inner()
            .deleted
    );
    // And the tenant can store again from scratch.
    let again = c
        .validate_and_store(store_req(
            &tenant,
            "kraken",
            "krakenKey0003",
            "krakenSecret0003",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.credential.unwrap().version, 1);
}

#[tokio::test]
async fn malformed_input_is_invalid_argument_and_stores_nothing() {
    let env = Env::start().await;
    let mut c = env.operator().await;
    let t = new_tenant();
    let big = "x".repeat(5000);
    let cases: Vec<(&str, pb::ValidateAndStoreRequest, &str)> = vec![
        (
            "empty tenant",
            req("", "binance", Some(set("key0000001", "secret0001"))),
            "tenant_id",
        ),
        (
            "bad tenant",
            req("tenant-1", "binance", Some(set("key0000001", "secret0001"))),
            "tenant_id",
        ),
        (
            "unknown exchange",
            req(&t, "ftx", Some(set("key0000001", "secret0001"))),
            "exchange",
        ),
        (
            "empty exchange",
            req(&t, "", Some(set("key0000001", "secret0001"))),
            "exchange",
        ),
        ("no credentials", req(&t, "binance", None), "credentials"),
        (
            "empty key",
            req(&t, "binance", Some(set("", "secret0001"))),
            "credentials.api_key",
        ),
        (
            "empty secret",
            req(&t, "binance", Some(set("key0000001", ""))),
            "credentials.api_secret",
        ),
        (
            "oversized secret",
            req(&t, "binance", Some(set("key0000001", &big))),
            "credentials.api_secret",
        ),
        (
            "space in key",
            req(&t, "bybit", Some(set("key 0000001", "secret0001"))),
            "credentials.api_key",
        ),
        (
            "okx without passphrase",
            req(&t, "okx", Some(set("key0000001", "secret0001"))),
            "credentials.passphrase",
        ),
    ];
    for (name, r, field) in cases {
        let err = c.validate_and_store(r).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err:?}");
        let details = err
            .get_details_bad_request()
            .unwrap_or_else(|| panic!("{name}: no BadRequest details"));
        assert_eq!(details.field_violations[0].field, field, "{name}");
        assert!(!err.message().contains(&big[..100]), "{name}: value echoed");
    }
    assert_eq!(
        env.count("SELECT count(*) FROM tenant_credentials").await,
        0
    );
    assert_eq!(env.count("SELECT count(*) FROM credential_events").await, 0);
    let (code, body) = env
        .bao
        .http(
            "LIST",
            &format!("/v1/secret/metadata/{}", env.config.vault.prefix),
            None,
        )
        .await
        .unwrap();
    assert_eq!(code, 404, "nothing written to Vault: {body}");
}

fn req(
    tenant: &str,
    exchange: &str,
    credentials: Option<pb::CredentialSet>,
) -> pb::ValidateAndStoreRequest {
    pb::ValidateAndStoreRequest {
        tenant_id: tenant.into(),
        exchange: exchange.into(),
        credentials,
    }
}

#[tokio::test]
async fn a_tenant_workload_cannot_touch_another_tenant() {
    let env = Env::start().await;
    let (a, b) = (new_tenant(), new_tenant());
    let mut op = env.operator().await;
    for t in [&a, &b] {
        op.validate_and_store(req(
            t,
            "bybit",
            Some(set("bybitKey0001", &format!("secret-of-{t}"))),
        ))
        .await
        .unwrap();
    }
    let mut ca = env.tenant_client(&a).await;
    // Its own tenant: fine.
    let own = ca
        .get_credentials(get_req(&a, "bybit"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(own.current.unwrap().api_secret, format!("secret-of-{a}"));
    // Every RPC naming tenant B is refused.
    let e1 = ca.get_credentials(get_req(&b, "bybit")).await.unwrap_err();
    let e2 = ca
        .list_credentials(pb::ListCredentialsRequest {
            tenant_id: b.clone(),
        })
        .await
        .unwrap_err();
    let e3 = ca
        .delete_credentials(pb::DeleteCredentialsRequest {
            tenant_id: b.clone(),
            exchange: "bybit".into(),
        })
        .await
        .unwrap_err();
    let e4 = ca
        .validate_and_store(req(&b, "okx", Some(set("k0000001", "s0000001"))))
        .await
        .unwrap_err();
    for e in [e1, e2, e3, e4] {
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(!e.message().contains("secret-of"), "{e:?}");
    }
    assert_eq!(
        env.count("SELECT count(*) FROM tenant_credentials").await,
        2
    );
}

#[tokio::test]
async fn row_level_security_hides_other_tenants_rows() {
    let env = Env::start().await;
    let (a, b) = (new_tenant(), new_tenant());
    let mut op = env.operator().await;
    for t in [&a, &b] {
        op.validate_and_store(req(
            t,
            "binance",
            Some(set("binanceKey01", "binanceSecret01")),
        ))
        .await
        .unwrap();
    }
    let mut db = env.db.connect().await;
    // Tenant A's role and setting: B's rows and events are invisible, even
    // when asked for by id; A's are visible.
    for (set_tenant, want_b, want_a) in [(Some(a.clone()), 0i64, 1i64), (None, 0, 0)] {
        let tx = db.transaction().await.unwrap();
        tx.batch_execute("SET LOCAL ROLE credbroker_tenant")
            .await
            .unwrap();
        if let Some(t) = &set_tenant {
            tx.execute("SELECT set_config('credbroker.tenant_id', $1, true)", &[t])
                .await
                .unwrap();
        }
        let nb: i64 = tx
            .query_one(
                "SELECT count(*) FROM tenant_credentials WHERE tenant_id = $1::text::uuid",
                &[&b],
            )
            .await
            .unwrap()
            .get(0);
        let na: i64 = tx
            .query_one(
                "SELECT count(*) FROM tenant_credentials WHERE tenant_id = $1::text::uuid",
                &[&a],
            )
            .await
            .unwrap()
            .get(0);
        let eb: i64 = tx
            .query_one(
                "SELECT count(*) FROM credential_events WHERE tenant_id = $1::text::uuid",
                &[&b],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            (nb, na, eb),
            (want_b, want_a, want_b),
            "tenant setting {set_tenant:?}"
        );
        // Writing a row for another tenant is refused by the policy.
        let ins = tx
            .execute(
                "INSERT INTO tenant_credentials (tenant_id, exchange, vault_path, current_version) VALUES ($1::text::uuid, 'okx', 'p', 1)",
                &[&b],
            )
            .await;
        assert!(ins.is_err(), "insert for another tenant must fail");
        tx.rollback().await.unwrap();
    }
    // The system role (retire job) sees everyone.
    let tx = db.transaction().await.unwrap();
    tx.batch_execute("SET LOCAL ROLE credbroker_system")
        .await
        .unwrap();
    let all: i64 = tx
        .query_one("SELECT count(*) FROM tenant_credentials", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(all, 2);
}
