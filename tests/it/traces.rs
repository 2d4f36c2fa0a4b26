//! Traces: `credbroker server` (the real binary, on real OpenBao and
//! PostgreSQL) exports its spans over OTLP/gRPC to a receiver this test
//! serves (the opentelemetry-proto service definitions). A call sent with a
//! W3C `traceparent` becomes a child of the caller's span, and the Vault
//! and PostgreSQL spans hang below it; no attribute holds a secret.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use credbroker::api::pb;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value::Value,
    trace::v1::Span,
};
use tonic::{Request, Response, Status};

use crate::support::{Env, TD, free_port_pair, new_tenant};

#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        req: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.0.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            for ss in rs.scope_spans {
                spans.extend(ss.spans);
            }
        }
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        .map(|v| match v {
            Value::StringValue(s) => s.clone(),
            other => format!("{other:?}"),
        })
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn calls_are_traced_below_the_callers_span_with_vault_and_postgres_spans() {
    let env = Env::start().await;
    let receiver = Receiver::default();
    let otlp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp_addr = otlp.local_addr().unwrap();
    let server = TraceServiceServer::new(receiver.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(server)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(otlp))
            .await
    });

    let port = free_port_pair();
    let hport = port + 1;
    let dir = env.pki.dir.path();
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
health_listen = "127.0.0.1:{hport}"
[tls]
cert = "{dir}/server.pem"
key = "{dir}/server.key"
client_ca = "{dir}/ca.pem"
trust_domain = "{TD}"
[vault]
addr = "{vault}"
prefix = "{prefix}"
[vault.auth]
method = "token"
token = "{token}"
[postgres]
url = "{pg}"
[audit]
spool_dir = "{dir}/audit-traced"
[telemetry]
metrics_listen = "127.0.0.1:0"
otlp_endpoint = "http://{otlp_addr}"
otlp_flush_ms = 200
[checks]
enabled = false
[validation]
mode = "format"
"#,
        dir = dir.display(),
        vault = env.bao.addr,
        token = env.bao.token,
        prefix = env.config.vault.prefix,
        pg = env.db.url(),
    );
    let path = dir.join("traced.toml");
    std::fs::write(&path, config).unwrap();
    let _child = Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_credbroker"))
            .args(["server", "--config"])
            .arg(&path)
            .env("CREDBROKER_LOG", "warn,credbroker_edge::api=debug")
            .env("CREDBROKER_LOG_FORMAT", "json")
            .stdout(std::fs::File::create(dir.join("traced.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut op = None;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            op = Some(
                env.client_at(addr, &format!("spiffe://{TD}/operator/traced"))
                    .await,
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut op = op.expect("credbroker server listening");
    // The kubelet's view: plaintext grpc.health.v1 on the health port.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{hport}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut serving = false;
    for _ in 0..50 {
        let s = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "credbroker.v1.CredentialBroker".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        if s == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 {
            serving = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        serving,
        "the plaintext health port says SERVING once the backends answer"
    );

    let tenant = new_tenant();
    let secret = "tracedSecret00000000";
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    fn traced<T>(msg: T, trace_id: &str, caller_span: &str) -> Request<T> {
        let mut r = Request::new(msg);
        r.metadata_mut().insert(
            "traceparent",
            format!("00-{trace_id}-{caller_span}-01").parse().unwrap(),
        );
        r
    }
    op.validate_and_store(traced(
        pb::ValidateAndStoreRequest {
            tenant_id: tenant.clone(),
            exchange: "binance".into(),
            credentials: Some(crate::support::set("tracedKey000000000", secret)),
        },
        trace_id,
        caller_span,
    ))
    .await
    .unwrap();
    op.get_credentials(traced(
        pb::GetCredentialsRequest {
            tenant_id: tenant.clone(),
            exchange: "binance".into(),
            min_version: 0,
        },
        trace_id,
        caller_span,
    ))
    .await
    .unwrap();

    let want = hex::decode(trace_id).unwrap();
    let mut spans = Vec::new();
    for _ in 0..100 {
        spans = receiver
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == want)
            .cloned()
            .collect();
        let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
        if names
            .iter()
            .filter(|n| n.ends_with("/GetCredentials"))
            .count()
            == 1
            && names.contains(&"write")
            && names.contains(&"insert")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for s in &spans {
        eprintln!(
            "span {} {} parent {}",
            s.name,
            hex::encode(&s.span_id),
            hex::encode(&s.parent_span_id)
        );
    }
    let by_id: HashMap<Vec<u8>, &Span> = spans.iter().map(|s| (s.span_id.clone(), s)).collect();
    let roots: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name.starts_with("/credbroker.v1.CredentialBroker/"))
        .collect();
    assert_eq!(
        roots.len(),
        2,
        "one server span per call: {:?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    for r in &roots {
        assert_eq!(
            hex::encode(&r.parent_span_id),
            caller_span,
            "{} is the caller's child",
            r.name
        );
    }
    // Every other span of the trace descends from one of the server spans.
    let root_of = |s: &Span| {
        let mut cur = s;
        for _ in 0..32 {
            match by_id.get(&cur.parent_span_id) {
                Some(p) => cur = p,
                None => break,
            }
        }
        cur.span_id.clone()
    };
    for s in &spans {
        let root = root_of(s);
        assert!(
            roots.iter().any(|r| r.span_id == root),
            "span {} is not below a server span",
            s.name
        );
    }
    // ValidateAndStore wrote to Vault, then committed in PostgreSQL (the
    // GetCredentials after it is served from the committing replica's cache).
    let vault = spans
        .iter()
        .find(|s| s.name == "write")
        .expect("a Vault write span");
    assert_eq!(attr(vault, "operation").as_deref(), Some("write"));
    let pg = spans
        .iter()
        .find(|s| s.name == "insert")
        .expect("a PostgreSQL span");
    assert_eq!(attr(pg, "db.system").as_deref(), Some("postgresql"));
    // JSON log lines written inside a call carry its request and trace ids.
    let logs = std::fs::read_to_string(dir.join("traced.log")).unwrap();
    let admitted: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "call admitted")
        .collect();
    assert_eq!(admitted.len(), 2, "{logs}");
    for line in &admitted {
        let span = &line["span"];
        assert_eq!(span["trace_id"], trace_id, "{line}");
        assert_eq!(
            span["request_id"].as_str().map(str::len),
            Some(36),
            "{line}"
        );
    }
    // A cache miss (a version floor above the cached set) shows both of its
    // backend round trips: the PostgreSQL read and the Vault read.
    let miss_trace = "5cf92f3577b34da6a3ce929d0e0e4737";
    op.get_credentials(traced(
        pb::GetCredentialsRequest {
            tenant_id: tenant.clone(),
            exchange: "binance".into(),
            min_version: 2,
        },
        miss_trace,
        caller_span,
    ))
    .await
    .unwrap();
    let want = hex::decode(miss_trace).unwrap();
    let mut seen = Vec::new();
    let both = |seen: &[(String, Option<String>)]| {
        seen.iter()
            .any(|(n, db)| n == "get" && db.as_deref() == Some("postgresql"))
            && seen.iter().any(|(n, _)| n == "read")
    };
    for _ in 0..100 {
        seen = receiver
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == want)
            .map(|s| (s.name.clone(), attr(s, "db.system")))
            .collect();
        if both(&seen) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(both(&seen), "a miss's PostgreSQL and Vault spans: {seen:?}");
    assert!(!logs.contains(secret), "no secret in the logs");
    // No attribute, of any span exported, holds the secret.
    for s in receiver.0.lock().unwrap().iter() {
        for kv in &s.attributes {
            assert!(
                !format!("{:?}", kv.value).contains(secret),
                "secret in {}",
                s.name
            );
        }
    }
}
