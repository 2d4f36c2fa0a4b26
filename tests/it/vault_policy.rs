//! The chart's least-privilege Vault policy (`helm/credbroker/files/
//! vault-policy.hcl`) is enough: a broker whose token has exactly that
//! policy (and not even `default`) runs every flow that touches Vault, and a
//! token without it is refused.

use credbroker::{
    config::VaultAuthConfig,
    rotation::retire::{retire_once, sweep_orphans},
};

use crate::support::{Env, get_req, new_tenant, rotate_n, rotate_req, store_n};

#[tokio::test]
async fn the_broker_works_under_exactly_the_shipped_vault_policy() {
    let mut env = Env::start().await;
    let policy = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/helm/credbroker/files/vault-policy.hcl"
    ))
    .unwrap();
    let body = serde_json::json!({ "policy": policy }).to_string();
    let (code, out) = env
        .bao
        .http("PUT", "/v1/sys/policies/acl/credbroker", Some(&body))
        .await
        .unwrap();
    assert!(code == 204 || code == 200, "{code} {out}");
    let (code, out) = env
        .bao
        .http(
            "POST",
            "/v1/auth/token/create",
            Some(r#"{"policies":["credbroker"],"no_default_policy":true,"ttl":"1h"}"#),
        )
        .await
        .unwrap();
    assert_eq!(code, 200, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let token = v["auth"]["client_token"].as_str().unwrap().to_owned();
    assert_eq!(v["auth"]["policies"], serde_json::json!(["credbroker"]));

    env.stop_broker().await;
    env.config.vault.auth = VaultAuthConfig::Token {
        token: token.into(),
    };
    env.start_broker(None).await;
    let mut op = env.operator().await;
    let tenant = new_tenant();
    op.validate_and_store(store_n(&tenant, "binance"))
        .await
        .expect("store");
    op.rotate(rotate_n(&tenant, "binance", 2))
        .await
        .expect("rotate");
    // Emergency revoke: the previous version is destroyed at once.
    op.rotate(rotate_req(
        &tenant,
        "binance",
        "binanceKey000003",
        "binanceSecret000003",
        Some(0),
    ))
    .await
    .expect("revoke-rotate");
    // A cold read on a second replica (current and previous from Vault).
    let b = env.replica(None).await;
    let mut pod = env
        .client_at(
            b.addr,
            &format!("spiffe://{}/tenant/{tenant}/pod/p", crate::support::TD),
        )
        .await;
    let got = pod
        .get_credentials(get_req(&tenant, "binance"))
        .await
        .expect("cold read")
        .into_inner();
    assert_eq!((got.version, got.previous.is_none()), (3, true));
    // The retire job and the orphan sweep (lists tenants, reads versions).
    retire_once(env.broker()).await.expect("retire");
    sweep_orphans(env.broker(), time::Duration::ZERO)
        .await
        .expect("sweep");
    op.set_webhook(credbroker::api::pb::SetWebhookRequest {
        tenant_id: tenant.clone(),
        url: "https://hooks.example/credbroker".into(),
        secret: String::new(),
    })
    .await
    .expect("webhook secret");
    op.delete_credentials(credbroker::api::pb::DeleteCredentialsRequest {
        tenant_id: tenant.clone(),
        exchange: "binance".into(),
    })
    .await
    .expect("delete (purge)");
    b.stop().await.unwrap();

    // The check can fail: without the policy, the same token is refused.
    let body = serde_json::json!({ "policy": "path \"secret/data/other/*\" { capabilities = [\"read\"] }" }).to_string();
    env.bao
        .http("PUT", "/v1/sys/policies/acl/credbroker", Some(&body))
        .await
        .unwrap();
    let e = op
        .validate_and_store(store_n(&new_tenant(), "bybit"))
        .await
        .unwrap_err();
    assert!(
        matches!(e.code(), tonic::Code::Internal | tonic::Code::Unavailable),
        "{e:?}"
    );
}
