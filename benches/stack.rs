//! The real stack, side by side, in one run: what a user gets.
//!
//! Each target is its own process, driven by a load client in another
//! process (this bench re-executed with `STACK_ROLE=load`), over the same
//! mTLS certificates, 4 connections:
//! - **echo**: a bare tonic server answering GetCredentials with a fixed
//!   set of the same shape (this bench re-executed with `STACK_ROLE=echo`),
//!   the ceiling;
//! - **bare**: the release `credbroker server` on real OpenBao and
//!   PostgreSQL, warm cache, no optional layer (no token, no limits, audit
//!   off);
//! - **access**: + an HS256 bearer token required, roles, GCRA limits (a
//!   budget the run never reaches);
//! - **all**: + the audit trail with its default settings (spool, group
//!   fsync, shipping to PostgreSQL);
//! - **openbao**: direct KV v2 reads of the same secret from OpenBao.
//!
//! For each: a closed loop at fixed concurrency, then an open loop at a
//! fixed offered rate (latency counted from each call's intended start, so
//! coordinated omission cannot hide the tail), with warm-up first; HDR
//! histograms; the CPU per call of the target process and of every
//! `postgres` process, from /proc over the measured window. Before each
//! window the audited brokers' spools are shipped to the end and
//! PostgreSQL checkpoints, so no window pays for the one before. Prints a table
//! and writes JSON (`STACK_JSON`, default `$CARGO_TARGET_DIR/stack-bench.json`).
//!
//! `cargo bench --bench stack` (`STACK_SECS` measured seconds, default 10;
//! `STACK_CONC` callers, default 64; `STACK_RATE` the open loop's offered
//! rate, default half of the all-layers broker's closed-loop throughput;
//! `STACK_ONLY=echo,bare,...` a subset; `STACK_CLOSED=0` the open loop
//! alone, at `STACK_RATE` or 1,000/s). `cargo test --benches` runs it as a
//! smoke run of about a second per target.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/backends.rs"]
mod backends;
#[path = "common/cpu.rs"]
mod cpu;
#[path = "common/server.rs"]
mod server;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use backends::{Bao, Pki, TD, TestDb};
use credbroker::api::pb::{self, credential_broker_client::CredentialBrokerClient};
use hdrhistogram::Histogram;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const SECRET: &str = "stack-bench-secret-at-least-32-bytes!";
const API_KEY: &str = "benchKey00000000";
const API_SECRET: &str = "benchSecret00000000";

fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k).ok().map_or(d, |v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{k}: cannot parse {v:?}"))
    })
}

fn main() {
    match std::env::var("STACK_ROLE").as_deref() {
        Ok("load") => load::main(),
        Ok("echo") => echo::main(),
        _ => orchestrate(),
    }
}

/// A child process's runtime (the load client's or the echo server's),
/// with the TLS provider the broker uses.
fn child_runtime() -> tokio::runtime::Runtime {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A PEM file of the test PKI the orchestrator shares with its children.
fn tls_file(name: &str) -> String {
    let dir = PathBuf::from(env_or("STACK_TLS_DIR", String::new()));
    std::fs::read_to_string(dir.join(name)).unwrap()
}

// ---------------------------------------------------------------- results

/// One measured window, as the load client reports it.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct Window {
    calls: u64,
    errors: u64,
    secs: f64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    max_us: u64,
}

impl Window {
    fn rate(&self) -> f64 {
        self.calls as f64 / self.secs
    }
}

/// A window with the CPU the target and PostgreSQL spent in it.
#[derive(Debug, Clone, serde::Serialize)]
struct Row {
    target: String,
    mode: String,
    offered_rate: Option<f64>,
    rate: f64,
    errors: u64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    target_cpu_us_per_call: f64,
    postgres_cpu_us_per_call: f64,
}

// ------------------------------------------------------------ orchestrator

struct Setup {
    bao: Bao,
    db: TestDb,
    pki: Pki,
    tenant: String,
    token: String,
    dir: tempfile::TempDir,
}

/// A target process: its PID (for its CPU time) and its address.
struct Target {
    name: &'static str,
    child: Option<Child>,
    _server: Option<server::Server>,
    pid: u32,
    addr: String,
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn orchestrate() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let secs: f64 = env_or("STACK_SECS", if quick { 1.0 } else { 10.0 });
    let warm: f64 = if quick { 0.3 } else { 2.0 };
    let conc: usize = env_or("STACK_CONC", 64);
    let only: Option<Vec<String>> = std::env::var("STACK_ONLY")
        .ok()
        .map(|v| v.split(',').map(str::to_owned).collect());
    let wanted = |n: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == n));
    // `STACK_CLOSED=0`: the open loop alone, on targets that ran nothing
    // before it (no closed loop's records still being shipped meanwhile).
    let closed_loop = env_or("STACK_CLOSED", 1u8) != 0;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let setup = rt.block_on(setup());
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!(
        "The real stack ({profile} build): closed loop {conc} callers over 4 connections, {secs} s after {warm} s warm-up; then an open loop"
    );
    let mut rows = Vec::new();
    let mut targets: Vec<Target> = Vec::new();
    for name in ["echo", "bare", "access", "all", "openbao"] {
        if !wanted(name) {
            continue;
        }
        let t = rt.block_on(start_target(&setup, name));
        if closed_loop {
            rt.block_on(settle(&setup, targets.iter().chain([&t])));
            let w = drive(&setup, &t, "closed", conc, None, secs, warm);
            print_row(&w);
            rows.push(w);
        }
        targets.push(t);
    }
    // The open loop, at one offered rate for every gRPC target (half of what
    // the all-layers broker sustains), and at half its own for OpenBao.
    let closed_rows = rows.clone();
    let closed = |n: &str| closed_rows.iter().find(|r| r.target == n).map(|r| r.rate);
    let rate: f64 = env_or(
        "STACK_RATE",
        closed("all")
            .or(closed("bare"))
            .or(closed("echo"))
            .unwrap_or(1000.0)
            / 2.0,
    );
    for t in &targets {
        let r = if t.name == "openbao" {
            closed("openbao").unwrap_or(rate) / 2.0
        } else {
            rate
        };
        rt.block_on(settle(&setup, targets.iter()));
        let w = drive(&setup, t, "open", conc, Some(r), secs, warm);
        print_row(&w);
        rows.push(w);
    }
    drop(targets);
    if let Some(echo) = closed("echo") {
        println!();
        for r in rows.iter().filter(|r| r.mode == "closed") {
            println!("{:<8} {:.2}x echo", r.target, r.rate / echo);
        }
    }
    let json = std::env::var("STACK_JSON").map_or_else(
        |_| {
            PathBuf::from(std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into()))
                .join("stack-bench.json")
        },
        PathBuf::from,
    );
    let doc = serde_json::json!({
        "build": profile,
        "concurrency": conc,
        "connections": 4,
        "seconds": secs,
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "rows": rows,
    });
    std::fs::write(&json, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
    println!("JSON: {}", json.display());
    // A target that refused or mis-answered calls measured something else.
    let failed: Vec<_> = rows.iter().filter(|r| r.errors > 0).collect();
    assert!(failed.is_empty(), "calls failed: {failed:?}");
    drop(setup);
}

fn print_row(r: &Row) {
    println!(
        "{:<8} {:<6} {:>8} {:>9.0} req/s  p50 {:>7.3} ms  p99 {:>7.3} ms  p99.9 {:>7.3} ms  target CPU {:>6.1} µs/call  PostgreSQL CPU {:>5.1} µs/call{}",
        r.target,
        r.mode,
        r.offered_rate
            .map_or(String::new(), |o| format!("@{o:.0}/s")),
        r.rate,
        r.p50_ms,
        r.p99_ms,
        r.p999_ms,
        r.target_cpu_us_per_call,
        r.postgres_cpu_us_per_call,
        if r.errors > 0 {
            format!("  ERRORS {}", r.errors)
        } else {
            String::new()
        }
    );
}

async fn setup() -> Setup {
    backends::init();
    let (bao, db) = tokio::join!(Bao::start(), TestDb::create());
    let pki = Pki::new();
    let tenant = uuid::Uuid::new_v4().to_string();
    let pod = format!("spiffe://{TD}/tenant/{tenant}/pod/bench");
    let pair = pki.ca.client_with_uris(&[&pod]).unwrap();
    std::fs::write(pki.path("client.pem"), &pair.cert).unwrap();
    std::fs::write(pki.path("client.key"), &pair.key).unwrap();
    let exp = time::OffsetDateTime::now_utc().unix_timestamp() + 3 * 3600;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"sub":"bench","tenant_id":tenant,"role":"trader","exp":exp}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let s = Setup {
        bao,
        db,
        pki,
        tenant,
        token,
        dir: tempfile::tempdir().unwrap(),
    };
    // The credential every target serves, stored through a broker.
    let b = start_broker(&s, "bare");
    let ch = s
        .pki
        .channel(
            b.addr.parse().unwrap(),
            &[&format!("spiffe://{TD}/operator/bench")],
        )
        .await;
    CredentialBrokerClient::new(ch)
        .validate_and_store(pb::ValidateAndStoreRequest {
            tenant_id: s.tenant.clone(),
            exchange: "binance".into(),
            credentials: Some(pb::CredentialSet {
                api_key: API_KEY.into(),
                api_secret: API_SECRET.into(),
                passphrase: None,
            }),
        })
        .await
        .unwrap();
    drop(b);
    s
}

async fn start_target(s: &Setup, name: &'static str) -> Target {
    match name {
        "echo" => {
            let mut child = Command::new(std::env::current_exe().unwrap())
                .env("STACK_ROLE", "echo")
                .env("STACK_TLS_DIR", s.pki.dir.path())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap();
            let mut line = String::new();
            BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            let addr = line.trim().strip_prefix("listening ").unwrap().to_owned();
            Target {
                name,
                pid: child.id(),
                child: Some(child),
                _server: None,
                addr,
            }
        }
        "openbao" => Target {
            name,
            pid: s.bao.pid(),
            child: None,
            _server: None,
            addr: s.bao.addr.clone(),
        },
        broker => start_broker(s, broker),
    }
}

/// The release `credbroker server` with the named layers on.
fn start_broker(s: &Setup, name: &'static str) -> Target {
    let layers = match name {
        "bare" => "[limits]\nwrites_per_minute = 0\nreads_per_minute = 0\nwatches_per_minute = 0\noperator_per_minute = 0\n[audit]\nenabled = false\n".to_owned(),
        "access" | "all" => format!(
            "[auth]\ntoken = \"required\"\nhs256_secret = \"{SECRET}\"\n[limits]\nreads_per_minute = 1000000000\n[audit]\nenabled = {}\n",
            name == "all"
        ),
        other => panic!("no broker profile {other}"),
    };
    let server = server::start(&s.dir.path().join(name), &s.pki, &s.bao, &s.db, &layers);
    Target {
        name,
        pid: server.pid,
        addr: server.addr.clone(),
        child: None,
        _server: Some(server),
    }
}

/// Lets the work a window leaves behind end before the next window
/// begins, so it is not counted there: every audited broker ships what its
/// spool still holds, then PostgreSQL writes out what it took (a
/// `CHECKPOINT`). Without this, a target's window could pay for the
/// previous target's backlog (once a 30 ms p99, in an open loop that
/// followed the everything-on closed loop's 400,000 records).
async fn settle(s: &Setup, targets: impl Iterator<Item = &Target>) {
    let http = reqwest::Client::new();
    for t in targets {
        let Some(broker) = &t._server else { continue };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let text = server::metrics_text(&http, &broker.metrics).await;
            // Absent when the broker keeps no spool (audit off).
            let unshipped = text
                .lines()
                .find(|l| l.starts_with("credbroker_audit_spool_unshipped_bytes "))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .unwrap_or(0.0);
            if unshipped == 0.0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: {unshipped} audit bytes still unshipped after 120 s",
                t.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // The bench's login is the database's superuser (or holds
    // pg_checkpoint); without the right it measures without the step.
    if let Err(e) = s.db.connect().await.batch_execute("CHECKPOINT").await {
        eprintln!("no CHECKPOINT between windows: {e}");
    }
}

/// One window on `t` by a load client in its own process.
fn drive(
    s: &Setup,
    t: &Target,
    mode: &str,
    conc: usize,
    rate: Option<f64>,
    secs: f64,
    warm: f64,
) -> Row {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.env("STACK_ROLE", "load")
        .env(
            "STACK_KIND",
            if t.name == "openbao" { "vault" } else { "grpc" },
        )
        .env("STACK_ADDR", &t.addr)
        .env("STACK_TLS_DIR", s.pki.dir.path())
        .env("STACK_TENANT", &s.tenant)
        .env("STACK_CONC", conc.to_string())
        .env("STACK_SECS", secs.to_string())
        .env("STACK_WARM", warm.to_string())
        .env("STACK_VAULT_TOKEN", &s.bao.token)
        .env(
            "STACK_VAULT_PATH",
            format!("tenants/{}/exchanges/binance/credentials", s.tenant),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if matches!(t.name, "access" | "all") {
        cmd.env("STACK_TOKEN", &s.token);
    }
    // The closed loop must not inherit the open loop's rate from the
    // bench's own environment (`STACK_RATE=...`).
    match rate {
        Some(r) => cmd.env("STACK_RATE", r.to_string()),
        None => cmd.env_remove("STACK_RATE"),
    };
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = || lines.next().expect("the load client ended early").unwrap();
    assert_eq!(next(), "START");
    let (cpu0, pg0) = (cpu::pid_cpu_secs(t.pid), cpu::postgres_cpu_secs());
    assert_eq!(next(), "END");
    let (cpu1, pg1) = (cpu::pid_cpu_secs(t.pid), cpu::postgres_cpu_secs());
    let w: Window = serde_json::from_str(&next()).unwrap();
    assert!(child.wait().unwrap().success(), "the load client failed");
    let per = |d: f64| d / w.calls.max(1) as f64 * 1e6;
    let ms = |us: u64| us as f64 / 1e3;
    Row {
        target: t.name.into(),
        mode: mode.into(),
        offered_rate: rate,
        rate: w.rate(),
        errors: w.errors,
        p50_ms: ms(w.p50_us),
        p99_ms: ms(w.p99_us),
        p999_ms: ms(w.p999_us),
        max_ms: ms(w.max_us),
        target_cpu_us_per_call: per(cpu1 - cpu0),
        postgres_cpu_us_per_call: per(pg1 - pg0),
    }
}

// ------------------------------------------------------------- load client

mod load {
    use super::*;

    /// One call of the load, GetCredentials or a direct OpenBao read.
    #[derive(Clone)]
    enum Caller {
        Grpc {
            clients: Arc<Vec<CredentialBrokerClient<Channel>>>,
            header: Option<tonic::metadata::AsciiMetadataValue>,
            tenant: String,
        },
        Vault {
            http: reqwest::Client,
            url: String,
            token: String,
        },
    }

    impl Caller {
        async fn call(&self, i: usize) -> bool {
            match self {
                Caller::Grpc {
                    clients,
                    header,
                    tenant,
                } => {
                    let mut r = tonic::Request::new(pb::GetCredentialsRequest {
                        tenant_id: tenant.clone(),
                        exchange: "binance".into(),
                        min_version: 0,
                    });
                    if let Some(h) = header {
                        r.metadata_mut().insert("authorization", h.clone());
                    }
                    let mut c = clients[i % clients.len()].clone();
                    match c.get_credentials(r).await {
                        Ok(resp) => resp
                            .into_inner()
                            .current
                            .is_some_and(|s| s.api_key == API_KEY),
                        Err(_) => false,
                    }
                }
                Caller::Vault { http, url, token } => {
                    match http.get(url).header("X-Vault-Token", token).send().await {
                        Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                        _ => false,
                    }
                }
            }
        }
    }

    async fn caller() -> Caller {
        let addr: String = env_or("STACK_ADDR", String::new());
        if std::env::var("STACK_KIND").as_deref() == Ok("vault") {
            return Caller::Vault {
                http: reqwest::Client::new(),
                url: format!(
                    "{addr}/v1/secret/data/{}?version=1",
                    env_or("STACK_VAULT_PATH", String::new())
                ),
                token: env_or("STACK_VAULT_TOKEN", String::new()),
            };
        }
        let read = tls_file;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("ca.pem")))
            .identity(Identity::from_pem(read("client.pem"), read("client.key")))
            .domain_name("localhost");
        let port = addr.rsplit(':').next().unwrap();
        let mut clients = Vec::new();
        for _ in 0..4 {
            let ch = Channel::from_shared(format!("https://localhost:{port}"))
                .unwrap()
                .tls_config(tls.clone())
                .unwrap()
                .connect()
                .await
                .unwrap();
            clients.push(CredentialBrokerClient::new(ch));
        }
        Caller::Grpc {
            clients: Arc::new(clients),
            header: std::env::var("STACK_TOKEN")
                .ok()
                .map(|t| format!("Bearer {t}").parse().unwrap()),
            tenant: env_or("STACK_TENANT", String::new()),
        }
    }

    fn histogram() -> Histogram<u64> {
        Histogram::new_with_bounds(1, 60_000_000, 3).unwrap()
    }

    /// `conc` callers, each calling again as soon as its call returns.
    async fn closed(c: &Caller, conc: usize, secs: f64) -> (Histogram<u64>, u64, u64) {
        let until = Instant::now() + Duration::from_secs_f64(secs);
        let mut tasks = Vec::new();
        for i in 0..conc {
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                let (mut h, mut errors) = (histogram(), 0u64);
                while Instant::now() < until {
                    let at = Instant::now();
                    if !c.call(i).await {
                        errors += 1;
                    }
                    h.record(at.elapsed().as_micros().max(1) as u64).unwrap();
                }
                (h, errors)
            }));
        }
        let (mut h, mut errors) = (histogram(), 0);
        for t in tasks {
            let (th, te) = t.await.unwrap();
            h.add(th).unwrap();
            errors += te;
        }
        let calls = h.len();
        (h, calls, errors)
    }

    /// Calls started at `rate` per second whatever the answers do; each
    /// call's latency counts from when it should have started.
    async fn open(c: &Caller, rate: f64, secs: f64) -> (Histogram<u64>, u64, u64) {
        let start = tokio::time::Instant::now();
        let n = (rate * secs) as u64;
        let h = Arc::new(Mutex::new(histogram()));
        let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..n {
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due).await;
            let (c, h, errors) = (c.clone(), h.clone(), errors.clone());
            tasks.spawn(async move {
                if !c.call(i as usize).await {
                    errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                let us = due.elapsed().as_micros().max(1) as u64;
                h.lock().unwrap().record(us).unwrap();
            });
            while tasks.try_join_next().is_some() {}
        }
        while tasks.join_next().await.is_some() {}
        let h = std::mem::replace(&mut *h.lock().unwrap(), histogram());
        let errors = errors.load(std::sync::atomic::Ordering::Relaxed);
        (h, n, errors)
    }

    pub fn main() {
        let conc: usize = env_or("STACK_CONC", 64);
        let secs: f64 = env_or("STACK_SECS", 10.0);
        let warm: f64 = env_or("STACK_WARM", 2.0);
        let rate: Option<f64> = std::env::var("STACK_RATE").ok().map(|r| r.parse().unwrap());
        let rt = child_runtime();
        rt.block_on(async {
            let c = caller().await;
            closed(&c, conc, warm).await;
            let mut out = std::io::stdout().lock();
            writeln!(out, "START").unwrap();
            out.flush().unwrap();
            let started = Instant::now();
            let (h, calls, errors) = match rate {
                None => closed(&c, conc, secs).await,
                Some(r) => open(&c, r, secs).await,
            };
            let took = started.elapsed().as_secs_f64();
            writeln!(out, "END").unwrap();
            out.flush().unwrap();
            let w = Window {
                calls,
                errors,
                secs: took,
                p50_us: h.value_at_quantile(0.5),
                p99_us: h.value_at_quantile(0.99),
                p999_us: h.value_at_quantile(0.999),
                max_us: h.max(),
            };
            writeln!(out, "{}", serde_json::to_string(&w).unwrap()).unwrap();
        });
    }
}

// -------------------------------------------------------------- echo server

mod echo {
    use super::*;
    use std::{convert::Infallible, future::Ready, pin::Pin};
    use tonic::codegen::http;

    /// GetCredentials answered with a fixed set of the broker's shape.
    #[derive(Clone)]
    struct Echo(pb::GetCredentialsResponse);

    impl tonic::server::NamedService for Echo {
        const NAME: &'static str = "credbroker.v1.CredentialBroker";
    }

    impl tonic::server::UnaryService<pb::GetCredentialsRequest> for Echo {
        type Response = pb::GetCredentialsResponse;
        type Future = Ready<Result<tonic::Response<Self::Response>, tonic::Status>>;
        fn call(&mut self, _: tonic::Request<pb::GetCredentialsRequest>) -> Self::Future {
            std::future::ready(Ok(tonic::Response::new(self.0.clone())))
        }
    }

    impl tower::Service<http::Request<tonic::body::Body>> for Echo {
        type Response = http::Response<tonic::body::Body>;
        type Error = Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;
        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Infallible>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
            let me = self.clone();
            Box::pin(async move {
                // The broker's own codec (credbroker.v1's), as the broker uses.
                let mut grpc = tonic::server::Grpc::new(credbroker_proto::codec::Codec::default());
                Ok(grpc.unary(me, req).await)
            })
        }
    }

    pub fn main() {
        let read = tls_file;
        let rt = child_runtime();
        rt.block_on(async {
            let tls = tonic::transport::ServerTlsConfig::new()
                .identity(Identity::from_pem(read("server.pem"), read("server.key")))
                .client_ca_root(Certificate::from_pem(read("ca.pem")));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            println!("listening {}", listener.local_addr().unwrap());
            let answer = pb::GetCredentialsResponse {
                current: Some(pb::CredentialSet {
                    api_key: API_KEY.into(),
                    api_secret: API_SECRET.into(),
                    passphrase: None,
                }),
                version: 1,
                status: 1,
                ..Default::default()
            };
            tonic::transport::Server::builder()
                .tls_config(tls)
                .unwrap()
                .add_service(Echo(answer))
                .serve_with_incoming(
                    // As the broker's acceptor does: no Nagle delay.
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                )
                .await
                .unwrap();
        });
    }
}
