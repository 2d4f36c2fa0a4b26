//! The fleet drill: a rotation under load, with a replica lost mid-rotation.
//!
//! Starts `DRILL_REPLICAS` release `credbroker server` replicas (default 2,
//! default limits, the audit trail on) on one PostgreSQL and one OpenBao,
//! and a simulated Binance that accepts a key only while it exists there.
//! `DRILL_PODS` pods (default 1,000), each a [`CredentialHandle`] (the Rust
//! handle, its own mTLS connection, every replica in its endpoint list),
//! sign requests to the simulator with the key they hold, `DRILL_RATE` a
//! second each (default 10 below 5,000 pods, else 1; over one HTTP/2
//! connection, every answer read). Then: the operator
//! creates the next key at the exchange and calls Rotate with an overlap of
//! `DRILL_OVERLAP_SECS` (default 10); at `DRILL_KILL_AT` of the overlap
//! (default 0.5) the first replica is killed with SIGKILL; when the overlap
//! ends the exchange deletes the old key; the load runs `DRILL_AFTER_SECS`
//! more (default 3).
//!
//! `DRILL_MINT=1` runs the rotation at the exchange instead (zero-touch,
//! on the Bybit simulator): the tenant's management key is stored, the
//! operator calls Rotate with `"mint": true`, and the broker itself creates
//! the next key and deletes the old one after the overlap; the drill
//! reports the time from Rotate to the old key's deletion and the
//! key-management calls the exchange answered.
//!
//! It reports requests signed with the deleted key (must be 0), pods still
//! on the old key when the overlap ends (must be 0), the swap time (Rotate
//! sent → the pod holds the new version) p50/p99/max, the killed
//! replica's pods' time to resubscribe (SIGKILL → a stream on another
//! replica admitted) p50/p99/max, Vault operations and read-path misses
//! (each one PostgreSQL read) per rotation per replica, and broker RSS per
//! subscriber; prints a table and writes JSON (`DRILL_JSON`, default
//! `$CARGO_TARGET_DIR/drill.json`). `cargo test --benches` runs a small
//! drill (60 pods, a 4 s overlap) and asserts the zeros (a request the
//! exchange never answered included).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/backends.rs"]
mod backends;
#[path = "common/server.rs"]
mod server;

/// The pods, the load and the exchange share this process: the broker's
/// allocator, so the harness takes less of the cores the replicas need.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use backends::{Bao, Pki, TD, TestDb};
use credbroker::api::pb::{self, credential_broker_client::CredentialBrokerClient};
use credbroker_client::{ClientConfig, CredentialHandle};
use credbroker_core::broker::types::{ExchangeId, TenantId};
use credbroker_sim::{SimKey, Simulators, native_permissions};
use hdrhistogram::Histogram;
use secrecy::{ExposeSecret as _, SecretString};

const OLD_KEY: &str = "drillKeyOld0000000000";
const OLD_SECRET: &str = "drillSecretOld000000000";
const NEW_KEY: &str = "drillKeyNew0000000000";
const NEW_SECRET: &str = "drillSecretNew000000000";
/// `DRILL_MINT`: the master account's key and the sub-account it manages.
const MASTER_KEY: &str = "drillMasterKey0000000";
const MASTER_SECRET: &str = "drillMasterSecret000000";
const SUB_ACCOUNT: &str = "100200300";
/// The Bybit key-management paths (and the permission query a minted key's
/// validation makes), counted per rotation.
const MANAGEMENT_PATHS: [&str; 4] = [
    "/v5/user/create-sub-api",
    "/v5/user/sub-apikeys",
    "/v5/user/delete-sub-api",
    "/v5/user/query-api",
];

fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k).ok().map_or(d, |v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{k}: cannot parse {v:?}"))
    })
}

struct Plan {
    pods: usize,
    rate: f64,
    replicas: usize,
    overlap: u32,
    kill_at: f64,
    after: f64,
    /// The pods ask for their sets on the stream (`include_credentials`).
    push: bool,
    /// The pods' acknowledgement spread (`ClientConfig::ack_jitter`).
    ack_jitter: f64,
    /// Rotation at the exchange (Bybit): the broker mints and deletes.
    mint: bool,
}

/// What the pods' requests met at the exchange.
#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    accepted: AtomicU64,
    /// Answered with an error status by the exchange.
    refused: AtomicU64,
    /// Never answered: the connection to the exchange failed or timed out
    /// (the load generator's own trouble on a saturated machine, not a
    /// refusal).
    failed_connect: AtomicU64,
    failed_timeout: AtomicU64,
    failed_other: AtomicU64,
    /// Refusals by the exchange's error code (`-1021` timestamp outside
    /// the window, `-2014`/`-2015` unknown key or bad signature ...).
    refusal_codes: std::sync::Mutex<BTreeMap<String, u64>>,
    /// Signed with the old key after the exchange deleted it.
    with_deleted_key: AtomicU64,
    /// Signed with the old key at all after the rotation (fine within the
    /// overlap).
    with_old_key_after_rotate: AtomicU64,
}

fn main() {
    // 10,000 pods losing a replica warn 5,000 times: only errors, unless
    // CREDBROKER_LOG says otherwise.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CREDBROKER_LOG")
                .unwrap_or_else(|_| "error".into()),
        )
        .try_init();
    backends::init();
    let quick = !std::env::args().any(|a| a == "--bench");
    let pods = env_or("DRILL_PODS", if quick { 60 } else { 1_000 });
    let plan = Plan {
        pods,
        rate: env_or("DRILL_RATE", if pods < 5_000 { 10.0 } else { 1.0 }),
        replicas: env_or("DRILL_REPLICAS", 2usize).max(2),
        overlap: env_or("DRILL_OVERLAP_SECS", if quick { 4 } else { 10 }),
        kill_at: env_or("DRILL_KILL_AT", 0.5f64).clamp(0.0, 0.95),
        after: env_or("DRILL_AFTER_SECS", if quick { 1.5 } else { 3.0 }),
        push: env_or("DRILL_PUSH", 1u8) != 0,
        ack_jitter: env_or("DRILL_ACK_JITTER_SECS", 5.0f64),
        mint: env_or("DRILL_MINT", 0u8) != 0,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let report = rt.block_on(drill(&plan));
    println!("{}", report.table());
    let path = std::env::var("DRILL_JSON").unwrap_or_else(|_| {
        let dir = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
        format!("{dir}/drill.json")
    });
    std::fs::write(&path, serde_json::to_string_pretty(&report.json).unwrap()).unwrap();
    println!("JSON: {path}");
    // The drill's promises, checked on every run.
    assert_eq!(
        report.json["requests_with_deleted_key"], 0,
        "a request was signed with a deleted key"
    );
    assert_eq!(
        report.json["pods_on_old_key_at_overlap_end"], 0,
        "pods were left on the old key"
    );
    assert_eq!(
        report.json["old_key_deleted"], true,
        "the old key is still live at the exchange"
    );
    assert_eq!(
        report.json["requests_refused"], 0,
        "the exchange refused requests"
    );
    // A request the exchange never answered is the load generator's
    // failure (connections, HTTP/2 limits), and would hide a refusal.
    for k in [
        "requests_failed_connect",
        "requests_failed_timeout",
        "requests_failed_other",
    ] {
        assert_eq!(report.json[k], 0, "{k}: requests never answered");
    }
    assert_eq!(
        report.json["pods_swapped"], plan.pods,
        "not every pod swapped"
    );
    assert_eq!(
        report.json["killed_replica_pods_resubscribed"], report.json["killed_replica_pods"],
        "not every pod of the killed replica resubscribed"
    );
}

struct Report {
    json: serde_json::Value,
}

impl Report {
    fn table(&self) -> String {
        let j = &self.json;
        let ms = |v: &serde_json::Value| format!("{:.1} ms", v.as_f64().unwrap_or(f64::NAN));
        let mut out = format!(
            "fleet drill: {} pods at {}/s each over {} replicas, overlap {} s, replica 0 killed at {} s, sets on the stream: {}\n",
            j["pods"],
            j["rate_per_pod"],
            j["replicas"],
            j["overlap_secs"],
            j["kill_after_secs"],
            j["sets_on_the_stream"]
        );
        out += &format!(
            "requests: {} sent, {} accepted, {} refused by the exchange, {} never answered (connect {}, timeout {}, other {}); signed with the deleted key: {}; with the old key after Rotate (within the overlap): {}\n",
            j["requests_sent"],
            j["requests_accepted"],
            j["requests_refused"],
            j["requests_failed_connect"].as_u64().unwrap_or(0)
                + j["requests_failed_timeout"].as_u64().unwrap_or(0)
                + j["requests_failed_other"].as_u64().unwrap_or(0),
            j["requests_failed_connect"],
            j["requests_failed_timeout"],
            j["requests_failed_other"],
            j["requests_with_deleted_key"],
            j["requests_with_old_key_after_rotate"]
        );
        if j["requests_refused"].as_u64().unwrap_or(0) > 0 {
            out += &format!("exchange refusals by code: {}\n", j["refusal_codes"]);
        }
        out += &format!(
            "pods on the old key when the overlap ended: {}; swapped {} of {}: p50 {} p99 {} max {}\n",
            j["pods_on_old_key_at_overlap_end"],
            j["pods_swapped"],
            j["pods"],
            ms(&j["swap_ms"]["p50"]),
            ms(&j["swap_ms"]["p99"]),
            ms(&j["swap_ms"]["max"])
        );
        out += &format!(
            "the operator's Rotate call (validation at the exchange, Vault, commit): {}\n",
            ms(&j["rotate_call_ms"])
        );
        if j["mint"] == true {
            out += &format!(
                "at the exchange: Rotate sent → old key deleted {}; exchange calls for the rotation: {}\n",
                ms(&j["rotate_to_old_key_deleted_ms"]),
                j["exchange_calls"]
            );
        }
        out += &format!(
            "killed replica's pods: {}, resubscribed {}: p50 {} p99 {} max {}\n",
            j["killed_replica_pods"],
            j["killed_replica_pods_resubscribed"],
            ms(&j["resubscribe_ms"]["p50"]),
            ms(&j["resubscribe_ms"]["p99"]),
            ms(&j["resubscribe_ms"]["max"])
        );
        for r in j["per_replica"].as_array().into_iter().flatten() {
            out += &format!(
                "replica {}: {} subscribers at start, swap p50 {} p99 {}, RSS per subscriber {} B; during the rotation: {} Vault operations, {} read-path misses (PostgreSQL reads){}\n",
                r["replica"],
                r["subscribers"],
                ms(&r["swap_ms"]["p50"]),
                ms(&r["swap_ms"]["p99"]),
                r["rss_per_subscriber_bytes"],
                r["vault_ops"],
                r["cache_misses"],
                if r["killed"] == true {
                    " (until killed)"
                } else {
                    ""
                }
            );
        }
        out
    }
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Sums the samples of the named metric families.
async fn scrape(http: &reqwest::Client, addr: &str) -> BTreeMap<String, f64> {
    let text = server::metrics_text(http, addr).await;
    let mut out = BTreeMap::new();
    for (key, prefix, filter) in [
        ("vault_ops", "alphapulse_vault_operations_total", ""),
        ("cache_misses", "credbroker_cache_misses_total", ""),
        (
            "refused_calls",
            "credbroker_grpc_server_handled_total",
            "RESOURCE_EXHAUSTED",
        ),
        (
            "unavailable_calls",
            "credbroker_grpc_server_handled_total",
            "UNAVAILABLE",
        ),
    ] {
        let sum: f64 = text
            .lines()
            .filter(|l| l.starts_with(prefix) && l.contains(filter))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        out.insert(key.to_owned(), sum);
    }
    // Refusals by method: (`refused:<method>`).
    for l in text.lines().filter(|l| {
        l.starts_with("credbroker_grpc_server_handled_total") && l.contains("RESOURCE_EXHAUSTED")
    }) {
        let method = l
            .split("method=\"")
            .nth(1)
            .and_then(|m| m.split('"').next());
        let n = l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
        if let (Some(m), Some(n)) = (method, n) {
            *out.entry(format!("refused:{m}")).or_default() += n;
        }
    }
    out
}

fn summary(h: &Histogram<u64>) -> serde_json::Value {
    let q = |p: f64| h.value_at_quantile(p) as f64 / 1000.0;
    serde_json::json!({"p50": q(0.5), "p99": q(0.99), "max": h.max() as f64 / 1000.0, "count": h.len()})
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).unwrap()
}

async fn drill(plan: &Plan) -> Report {
    let (bao, db) = tokio::join!(Bao::start(), TestDb::create());
    let pki = Pki::new();
    let sims = Arc::new(Simulators::start().await.unwrap());
    let ex = if plan.mint {
        ExchangeId::Bybit
    } else {
        ExchangeId::Binance
    };
    let sim_url = sims.urls[&ex].clone();
    let dir = tempfile::tempdir().unwrap();
    // Rotation at the exchange needs validation there (the simulator).
    let extra = if plan.mint {
        format!(
            "[validation]\nmode = \"exchange\"\n[validation.exchanges.bybit]\nbase_url = \"{sim_url}\"\n"
        )
    } else {
        String::new()
    };
    let mut replicas: Vec<server::Server> = (0..plan.replicas)
        .map(|i| server::start(&dir.path().join(format!("r{i}")), &pki, &bao, &db, &extra))
        .collect();
    let idle_rss: Vec<u64> = replicas.iter().map(|r| rss_bytes(r.pid)).collect();
    let endpoints: Vec<String> = replicas
        .iter()
        .map(|r| format!("https://localhost:{}", r.addr.rsplit(':').next().unwrap()))
        .collect();
    let survivor = replicas.last().unwrap().addr.parse().unwrap();
    let mut op = CredentialBrokerClient::new(
        pki.channel(survivor, &[&format!("spiffe://{TD}/operator/drill")])
            .await,
    );
    let tenant = uuid::Uuid::new_v4();
    let perms = native_permissions(ex, false, false);
    // The key a person created at the exchange (in the managed sub-account
    // when the broker rotates at the exchange), stored.
    let mut old = SimKey::hmac(OLD_SECRET, perms.clone());
    if plan.mint {
        old.sub_account = Some(SUB_ACCOUNT.into());
        sims.add_key(
            ex,
            MASTER_KEY,
            SimKey::master(
                MASTER_SECRET,
                serde_json::json!({"id": "1", "note": "master", "apiKey": MASTER_KEY, "readOnly": 0,
                    "secret": "", "permissions": {"Wallet": ["AccountTransfer"]}, "ips": ["*"]}),
                &[SUB_ACCOUNT],
            ),
        );
    }
    sims.add_key(ex, OLD_KEY, old);
    op.validate_and_store(pb::ValidateAndStoreRequest {
        tenant_id: tenant.to_string(),
        exchange: ex.as_str().into(),
        credentials: Some(pb::CredentialSet {
            api_key: OLD_KEY.into(),
            api_secret: OLD_SECRET.into(),
            passphrase: None,
        }),
    })
    .await
    .unwrap();
    if plan.mint {
        op.set_management_key(pb::SetManagementKeyRequest {
            tenant_id: tenant.to_string(),
            exchange: ex.as_str().into(),
            credentials: Some(pb::CredentialSet {
                api_key: MASTER_KEY.into(),
                api_secret: MASTER_SECRET.into(),
                passphrase: None,
            }),
            sub_account: SUB_ACCOUNT.into(),
            rotate_every_days: 0,
            overlap_seconds: None,
        })
        .await
        .unwrap();
    }

    // The fleet: one handle (one connection) per pod, started in waves so
    // the handshakes do not all land at once.
    let pair = pki
        .ca
        .client_with_uris(&[&format!("spiffe://{TD}/tenant/{tenant}/pod/drill")])
        .unwrap();
    let mut handles = Vec::with_capacity(plan.pods);
    for wave in (0..plan.pods).collect::<Vec<_>>().chunks(250) {
        let mut started = Vec::new();
        for i in wave {
            let mut cfg = ClientConfig::new(
                endpoints.clone(),
                pki.ca.ca_pem().into_bytes(),
                pair.cert.clone().into_bytes(),
                SecretString::from(pair.key.clone()),
                TenantId::new(tenant),
            );
            cfg.domain = Some("localhost".into());
            cfg.exchanges = vec![ex];
            cfg.instance = Some(format!("pod-{i}"));
            cfg.include_credentials = plan.push;
            cfg.ack_jitter = Duration::from_secs_f64(plan.ack_jitter);
            started.push(CredentialHandle::start(cfg));
        }
        for h in &started {
            h.wait_for(ex, 1, Duration::from_secs(120))
                .await
                .expect("a pod never got its first set");
        }
        handles.extend(started);
    }
    let on = |h: &CredentialHandle| h.connection().borrow().clone();
    let mut per_replica = Vec::new();
    for (i, r) in replicas.iter().enumerate() {
        let ep = &endpoints[i];
        let subs = handles
            .iter()
            .filter(|h| on(h).as_deref() == Some(ep.as_str()))
            .count();
        let grown = rss_bytes(r.pid).saturating_sub(idle_rss[i]);
        per_replica.push(serde_json::json!({
            "replica": i,
            "subscribers": subs,
            "rss_per_subscriber_bytes": if subs > 0 { grown / subs as u64 } else { 0 },
        }));
    }

    // The load: every pod signs requests with the key it holds now.
    let tally = Arc::new(Tally::default());
    let rotated = Arc::new(AtomicBool::new(false));
    let deleted = Arc::new(AtomicBool::new(false));
    let stop = tokio_util::sync::CancellationToken::new();
    // Every pod of the drill lives in this one process, which shares the
    // machine's two cores with the replicas: the load goes to the
    // exchange over one HTTP/2 connection (the simulator speaks it without
    // TLS), where HTTP/1.1 took a round of system calls per request on
    // each side and the load held a third of the machine. Requests are
    // still one per pod per period, each signed with the key the pod holds.
    // At most IN_FLIGHT at a time: below the simulator's limit of
    // concurrent streams (hyper's 200), because a client that overshoots
    // it has streams refused, and after 1,024 refusals the server closes
    // the connection (h2's `too_many_internal_resets`).
    const IN_FLIGHT: usize = 128;
    let http = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let in_flight = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut load = tokio::task::JoinSet::new();
    for h in &handles {
        let (h, tally, http, url) = (h.clone(), tally.clone(), http.clone(), sim_url.clone());
        let (rotated, deleted, stop) = (rotated.clone(), deleted.clone(), stop.clone());
        let in_flight = in_flight.clone();
        let period = Duration::from_secs_f64(1.0 / plan.rate);
        load.spawn(async move {
            // A random phase, so the fleet's requests spread over the period.
            tokio::time::sleep(period.mul_f64(rand::random::<f64>())).await;
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                // The key is read and the request signed once it may leave.
                let Ok(_permit) = in_flight.acquire().await else {
                    return;
                };
                let Some(c) = h.get(ex) else {
                    continue;
                };
                let key = c.current.api_key.clone();
                let secret = c.current.api_secret.expose_secret();
                let ts = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
                let request = if ex == ExchangeId::Bybit {
                    let query = "accountType=UNIFIED";
                    let ts = u64::try_from(ts).unwrap_or(0);
                    let sig = credbroker_exchange::signing::bybit(secret, ts, &key, 5000, query);
                    http.get(format!("{url}/v5/account/wallet-balance?{query}"))
                        .header("X-BAPI-API-KEY", key.as_str())
                        .header("X-BAPI-TIMESTAMP", ts.to_string())
                        .header("X-BAPI-SIGN", sig)
                        .header("X-BAPI-RECV-WINDOW", "5000")
                } else {
                    let query = format!("recvWindow=5000&timestamp={ts}");
                    let sig = credbroker_exchange::signing::binance(secret, &query, "");
                    http.get(format!(
                        "{url}/sapi/v1/account/apiRestrictions?{query}&signature={sig}"
                    ))
                    .header("X-MBX-APIKEY", key.as_str())
                };
                let old = key == OLD_KEY;
                // Read before sending: a request that left before the
                // deletion may still arrive after it (the exchange's race,
                // not the broker's), and is not counted against it.
                let deleted_before = deleted.load(Ordering::Acquire);
                if old && rotated.load(Ordering::Acquire) {
                    tally
                        .with_old_key_after_rotate
                        .fetch_add(1, Ordering::Relaxed);
                }
                if old && deleted_before {
                    tally.with_deleted_key.fetch_add(1, Ordering::Relaxed);
                }
                tally.sent.fetch_add(1, Ordering::Relaxed);
                let sent = request.send().await;
                let counter = match sent {
                    // Bybit refuses with HTTP 200 and a retCode.
                    // The answer is read to its end: a response dropped
                    // unread resets its HTTP/2 stream.
                    Ok(r) if r.status().is_success() && ex != ExchangeId::Bybit => {
                        match r.bytes().await {
                            Ok(_) => &tally.accepted,
                            Err(_) => &tally.failed_other,
                        }
                    }
                    Ok(r) => {
                        let status = r.status();
                        let body = r.text().await.unwrap_or_default();
                        let v = serde_json::from_str::<serde_json::Value>(&body).ok();
                        let ret_code = v.as_ref().and_then(|v| v["retCode"].as_i64());
                        if status.is_success() && ret_code.unwrap_or(0) == 0 {
                            &tally.accepted
                        } else {
                            let code = ret_code.map(|c| c.to_string()).or_else(|| {
                                v.as_ref()
                                    .and_then(|v| v.get("code").map(ToString::to_string))
                            });
                            let code = code.unwrap_or_else(|| "?".into());
                            *tally.refusal_codes.lock().unwrap().entry(code).or_default() += 1;
                            &tally.refused
                        }
                    }
                    Err(e) if e.is_connect() => &tally.failed_connect,
                    Err(e) if e.is_timeout() => &tally.failed_timeout,
                    Err(e) => {
                        if tally.failed_other.load(Ordering::Relaxed) < 3 {
                            let mut why = e.to_string();
                            let mut cause = std::error::Error::source(&e);
                            while let Some(c) = cause {
                                why.push_str(&format!(": {c}"));
                                cause = c.source();
                            }
                            eprintln!("drill: a request to the exchange failed: {why}");
                        }
                        &tally.failed_other
                    }
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    // Warm-up: the load runs on the old key.
    eprintln!("drill: load started");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let metrics_http = reqwest::Client::new();
    let mut before = Vec::new();
    for r in &replicas {
        before.push(scrape(&metrics_http, &r.metrics).await);
    }

    // The rotation: the next key exists at the exchange (a person made it,
    // or the broker mints it), then Rotate.
    if !plan.mint {
        sims.add_key(ex, NEW_KEY, SimKey::hmac(NEW_SECRET, perms));
    }
    let calls_before: Vec<u64> = MANAGEMENT_PATHS.iter().map(|p| sims.calls(ex, p)).collect();
    let t_rotate = Instant::now();
    // Phase marks on stderr, in wall-clock time, to line a CPU profile up with.
    let mark = |what: &str| {
        let now = time::OffsetDateTime::now_utc();
        eprintln!(
            "drill: {what} at {:.3}",
            now.unix_timestamp_nanos() as f64 / 1e9
        );
    };
    mark("rotate");
    let mut swaps = tokio::task::JoinSet::new();
    for h in &handles {
        let h = h.clone();
        let replica = on(&h).and_then(|ep| endpoints.iter().position(|e| e.as_str() == &*ep));
        swaps.spawn(async move {
            h.wait_for(ex, 2, Duration::from_secs(60))
                .await
                .ok()
                .map(|_| (replica, t_rotate.elapsed()))
        });
    }
    op.rotate(pb::RotateRequest {
        tenant_id: tenant.to_string(),
        exchange: ex.as_str().into(),
        credentials: (!plan.mint).then(|| pb::CredentialSet {
            api_key: NEW_KEY.into(),
            api_secret: NEW_SECRET.into(),
            passphrase: None,
        }),
        overlap_seconds: Some(plan.overlap),
        mint: plan.mint,
    })
    .await
    .unwrap();
    // The operator's call: validation at the exchange, the Vault write and
    // the commit (the pods may swap before its answer arrives).
    let rotate_call = t_rotate.elapsed();
    rotated.store(true, Ordering::Release);
    let overlap = Duration::from_secs(plan.overlap.into());

    // Mid-rotation, replica 0 is lost.
    tokio::time::sleep_until((t_rotate + overlap.mul_f64(plan.kill_at)).into()).await;
    let killed_ep = endpoints[0].clone();
    let victims: Vec<CredentialHandle> = handles
        .iter()
        .filter(|h| on(h).as_deref() == Some(killed_ep.as_str()))
        .cloned()
        .collect();
    let mut at_kill = scrape(&metrics_http, &replicas[0].metrics).await;
    replicas[0].kill();
    let t_kill = Instant::now();
    mark("kill");
    let mut resubs = tokio::task::JoinSet::new();
    for h in &victims {
        let (mut rx, killed) = (h.connection(), killed_ep.clone());
        resubs.spawn(async move {
            tokio::time::timeout(
                Duration::from_secs(60),
                rx.wait_for(|c| c.as_deref().is_some_and(|c| c != killed)),
            )
            .await
            .ok()
            .map(|_| t_kill.elapsed())
        });
    }

    // The overlap ends: the old key is deleted at the exchange (by its
    // owner, or by the broker's rotation at the exchange).
    tokio::time::sleep_until((t_rotate + overlap).into()).await;
    let on_old = handles
        .iter()
        .filter(|h| h.get(ex).is_none_or(|c| c.version < 2))
        .count();
    if plan.mint {
        let deadline = Instant::now() + Duration::from_secs(60);
        while sims.has_key(ex, OLD_KEY) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    } else {
        sims.remove_key(ex, OLD_KEY);
    }
    let old_key_deleted = t_rotate.elapsed();
    deleted.store(true, Ordering::Release);
    mark("old key deleted");
    tokio::time::sleep(Duration::from_secs_f64(plan.after)).await;
    stop.cancel();
    while load.join_next().await.is_some() {}
    let mut after = Vec::new();
    for r in &replicas[1..] {
        after.push(scrape(&metrics_http, &r.metrics).await);
    }

    let mut swap = histogram();
    // By the replica the pod was on at the rotation: the committing one
    // (the operator's, the last) applies its event at once, the others
    // learn it from PostgreSQL.
    let mut swap_on: Vec<Histogram<u64>> = (0..plan.replicas).map(|_| histogram()).collect();
    while let Some(r) = swaps.join_next().await {
        if let Some((replica, d)) = r.unwrap() {
            let us = d.as_micros().max(1) as u64;
            swap.record(us).unwrap();
            if let Some(i) = replica {
                swap_on[i].record(us).unwrap();
            }
        }
    }
    let mut resub = histogram();
    while let Some(r) = resubs.join_next().await {
        if let Some(d) = r.unwrap() {
            resub.record(d.as_micros().max(1) as u64).unwrap();
        }
    }
    for h in &handles {
        h.stop();
    }
    for (i, r) in per_replica.iter_mut().enumerate() {
        let end = if i == 0 {
            std::mem::take(&mut at_kill)
        } else {
            after[i - 1].clone()
        };
        for (key, v) in &end {
            r[key.as_str()] = serde_json::json!(v - before[i].get(key).copied().unwrap_or(0.0));
        }
        r["killed"] = serde_json::json!(i == 0);
        r["swap_ms"] = summary(&swap_on[i]);
    }
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
    Report {
        json: serde_json::json!({
            "pods": plan.pods,
            "rate_per_pod": plan.rate,
            "replicas": plan.replicas,
            "overlap_secs": plan.overlap,
            "sets_on_the_stream": plan.push,
            "ack_jitter_secs": plan.ack_jitter,
            "kill_after_secs": plan.overlap as f64 * plan.kill_at,
            "requests_sent": n(&tally.sent),
            "requests_accepted": n(&tally.accepted),
            "requests_refused": n(&tally.refused),
            "requests_failed_connect": n(&tally.failed_connect),
            "requests_failed_timeout": n(&tally.failed_timeout),
            "requests_failed_other": n(&tally.failed_other),
            "refusal_codes": serde_json::json!(*tally.refusal_codes.lock().unwrap()),
            "requests_with_deleted_key": n(&tally.with_deleted_key),
            "requests_with_old_key_after_rotate": n(&tally.with_old_key_after_rotate),
            "pods_on_old_key_at_overlap_end": on_old,
            "pods_swapped": swap.len(),
            "rotate_call_ms": rotate_call.as_secs_f64() * 1e3,
            "mint": plan.mint,
            "exchange": ex.as_str(),
            "old_key_deleted": !sims.has_key(ex, OLD_KEY),
            "rotate_to_old_key_deleted_ms": old_key_deleted.as_secs_f64() * 1e3,
            "exchange_calls": serde_json::Value::Object(
                MANAGEMENT_PATHS
                    .iter()
                    .zip(&calls_before)
                    .map(|(p, b)| ((*p).to_owned(), serde_json::json!(sims.calls(ex, p) - b)))
                    .collect(),
            ),
            "swap_ms": summary(&swap),
            "killed_replica_pods": victims.len(),
            "killed_replica_pods_resubscribed": resub.len(),
            "resubscribe_ms": summary(&resub),
            "per_replica": per_replica,
        }),
    }
}
