//! The chart's least-privilege Vault policy (`helm/credbroker/files/
//! vault-policy.hcl`) is enough: a broker whose token has exactly that
//! policy (and not even `default`) runs every flow that touches Vault, and a
//! token without it is refused.

use credbroker::{
    config::VaultAuthConfig,
    rotation::retire::{retire_once, sweep_orphans},
};

use crate::support::{Env, get_req, new_tenant, rotate_n, rotate_req, store_n};

/// The policy the chart ships.
fn shipped_policy() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/helm/credbroker/files/vault-policy.hcl"
    ))
    .unwrap()
}

#[tokio::test]
async fn the_broker_works_under_exactly_the_shipped_vault_policy() {
    // It writes the policy and the auth methods of its own OpenBao.
    let mut env = Env::start_own_vault().await;
    let policy = shipped_policy();
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

/// A TokenReview endpoint as the Kubernetes API serves it: `token` belongs
/// to `system:serviceaccount:trading:credbroker`, anything else is not
/// authenticated.
async fn token_review_api(token: String) -> String {
    use axum::{Router, http::header, routing::post};
    let app = Router::new().route(
        "/apis/authentication.k8s.io/v1/tokenreviews",
        post(move |body: String| {
            let token = token.clone();
            async move {
                let review: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();

                let ok = review["spec"]["token"].as_str() == Some(token.as_str());
                let answer = serde_json::json!({
                    "apiVersion": "authentication.k8s.io/v1",
                    "kind": "TokenReview",
                    "status": if ok {
                        serde_json::json!({
                            "authenticated": true,
                            // The audiences asked for, as the API server
                            // answers for a token issued to them.
                            "audiences": review["spec"]["audiences"],
                            "user": {
                                "username": "system:serviceaccount:trading:credbroker",
                                "uid": "5f0f7c3e-0000-4000-8000-000000000001",
                                "groups": ["system:serviceaccounts", "system:serviceaccounts:trading"]
                            }
                        })
                    } else {
                        serde_json::json!({ "authenticated": false })
                    }
                });
                ([(header::CONTENT_TYPE, "application/json")], answer.to_string())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    url
}

/// A service-account token as Kubernetes issues it (ES256 JWT with the
/// service-account claims; OpenBao has no key to check its signature, so it
/// asks the TokenReview API, as it does in a cluster).
fn service_account_jwt() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let claims = serde_json::json!({
        "iss": "https://kubernetes.default.svc.cluster.local",
        "sub": "system:serviceaccount:trading:credbroker",
        "aud": ["https://kubernetes.default.svc.cluster.local"],
        "iat": now, "nbf": now, "exp": now + 3600,
        "kubernetes.io": {
            "namespace": "trading",
            "serviceaccount": { "name": "credbroker", "uid": "5f0f7c3e-0000-4000-8000-000000000001" }
        },
        "kubernetes.io/serviceaccount/namespace": "trading",
        "kubernetes.io/serviceaccount/service-account.name": "credbroker",
        "kubernetes.io/serviceaccount/service-account.uid": "5f0f7c3e-0000-4000-8000-000000000001"
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
        &claims,
        &jsonwebtoken::EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn the_broker_logs_in_with_kubernetes_auth() {
    // It writes the policy and the auth methods of its own OpenBao.
    let mut env = Env::start_own_vault().await;
    let policy = shipped_policy();
    let ca = std::fs::read_to_string(env.pki.path("ca.pem")).unwrap();
    let jwt = service_account_jwt();
    let api = token_review_api(jwt.clone()).await;
    for (method, path, body) in [
        (
            "PUT",
            "/v1/sys/policies/acl/credbroker".to_owned(),
            serde_json::json!({ "policy": policy }),
        ),
        (
            "POST",
            "/v1/sys/auth/kubernetes".to_owned(),
            serde_json::json!({ "type": "kubernetes" }),
        ),
        (
            "POST",
            "/v1/auth/kubernetes/config".to_owned(),
            serde_json::json!({
                "kubernetes_host": api,
                "disable_local_ca_jwt": true,
                // Required with disable_local_ca_jwt; unused over http.
                "kubernetes_ca_cert": ca,
                "token_reviewer_jwt": "reviewer-token",
            }),
        ),
        (
            "POST",
            "/v1/auth/kubernetes/role/credbroker".to_owned(),
            serde_json::json!({
                "bound_service_account_names": ["credbroker"],
                "bound_service_account_namespaces": ["trading"],
                "token_policies": ["credbroker"],
                "token_no_default_policy": true,
                "token_ttl": "1h",
            }),
        ),
    ] {
        let (code, out) = env
            .bao
            .http(method, &path, Some(&body.to_string()))
            .await
            .unwrap();
        assert!((200..300).contains(&code), "{path}: {code} {out}");
    }
    let token_path = env.pki.path("sa-token");
    std::fs::write(&token_path, format!("{jwt}\n")).unwrap();
    env.stop_broker().await;
    env.config.vault.auth = VaultAuthConfig::Kubernetes {
        mount: "kubernetes".into(),
        role: "credbroker".into(),
        token_path: token_path.clone(),
    };
    env.start_broker(None).await;
    let mut op = env.operator().await;
    let tenant = new_tenant();
    op.validate_and_store(store_n(&tenant, "binance"))
        .await
        .expect("store with a Kubernetes-auth token");
    // A token the cluster does not vouch for: start-up fails, naming Vault.
    std::fs::write(&token_path, service_account_jwt()).unwrap();
    let Err(e) = credbroker::app::real_backends(&env.config).await else {
        panic!("a token the TokenReview API refuses must not log in");
    };
    assert!(format!("{e:#}").contains("vault"), "{e:#}");
}
