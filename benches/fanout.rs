//! Fan-out benchmark: how fast a rotation reaches N concurrent
//! WatchRotations subscribers on one broker, and what an idle subscriber
//! costs the broker in memory.
//!
//! Runs `credbroker dev` (the release binary when built with `--release`) as
//! a separate process, so its resident memory can be read from /proc and the
//! clients' work is not counted. Subscribers share HTTP/2 connections (100
//! streams each) like sidecars behind a few pods would.
//!
//! `cargo bench --bench fanout` (set `FANOUT_SUBSCRIBERS=1000,10000` and
//! `FANOUT_ROTATIONS=5` to change the defaults).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/dev_broker.rs"]
mod dev_broker;

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use credbroker::api::pb::{
    self, credential_broker_client::CredentialBrokerClient, watch_rotations_response::Message,
};
use dev_broker::DevBroker;
use tokio::sync::mpsc;

const STREAMS_PER_CONNECTION: usize = 100;
const TENANT: &str = "00000000-0000-0000-0000-00000000fa11";

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// CPU time (user + system) the process has used, from /proc.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start at ')'.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

struct Result {
    subscribers: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
    bytes_per_subscriber: u64,
    /// The broker's whole RSS with every subscriber idle.
    rss_idle_mib: u64,
    cpu_per_delivery: Duration,
}

async fn run(n: usize, rotations: usize) -> Result {
    // The stream budgets sized to the fleet (as an operator would for one
    // this large): the default open rate, 20,000 a minute per tenant, is a
    // whole 10,000-pod fleet's reconnect, not 100,000 pods at once.
    let opens = (n + 16).max(20_000).to_string();
    let dev = DevBroker::spawn_with(&[
        "--max-streams-per-tenant",
        &(n + 16).to_string(),
        "--watches-per-minute",
        &opens,
        "--validation",
        "format",
        // The subscribers are the tenant's pods, as in a fleet.
        "--pod-tenant",
        TENANT,
    ])
    .await;
    let pid = dev.child.id().unwrap();
    let mut op = dev.operator().await;
    dev.store(TENANT, "binance", "benchKey00000000", "benchSecret00000000")
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = rss_kib(pid);

    // n subscribers; each reports (rotation version, receipt time).
    let (ready_tx, mut ready_rx) = mpsc::channel::<()>(n);
    let (got_tx, mut got_rx) = mpsc::unbounded_channel::<(u64, Instant)>();
    let mut channels = Vec::new();
    for _ in 0..n.div_ceil(STREAMS_PER_CONNECTION) {
        channels.push(dev.pod_channel().await);
    }
    for i in 0..n {
        let mut c = CredentialBrokerClient::new(channels[i / STREAMS_PER_CONNECTION].clone());
        let (ready, got) = (ready_tx.clone(), got_tx.clone());
        tokio::spawn(async move {
            // As a pod does: a refusal for load (RESOURCE_EXHAUSTED, the
            // replica's calls in flight while 100,000 streams open at once)
            // is retried after a jittered pause.
            let mut pause = Duration::from_millis(50);
            let mut s = loop {
                match c
                    .watch_rotations(pb::WatchRotationsRequest {
                        tenant_id: TENANT.into(),
                        exchanges: vec![],
                        after_seq: 0,
                        include_credentials: false,
                    })
                    .await
                {
                    Ok(r) => break r.into_inner(),
                    Err(e) if e.code() == tonic::Code::ResourceExhausted => {
                        let jitter = Duration::from_millis(u64::from(rand::random::<u8>()) * 4);
                        tokio::time::sleep(pause + jitter).await;
                        pause = (pause * 2).min(Duration::from_secs(2));
                    }
                    Err(e) => panic!("WatchRotations refused: {e}"),
                }
            };
            while let Ok(Some(m)) = s.message().await {
                match m.message {
                    Some(Message::State(_)) => {
                        let _ = ready.send(()).await;
                    }
                    Some(Message::Event(e)) => {
                        let _ = got.send((e.version, Instant::now()));
                    }
                    _ => {}
                }
            }
        });
    }
    drop(ready_tx);
    for _ in 0..n {
        ready_rx.recv().await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_idle = rss_kib(pid);

    if let Ok(out) = std::env::var("FANOUT_PERF") {
        // Profile the broker during the rotations (perf record, 15 s).
        let _ = tokio::process::Command::new("perf")
            .args([
                "record",
                "-g",
                "-o",
                &out,
                "-p",
                &pid.to_string(),
                "--",
                "sleep",
                "15",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let cpu_before = cpu_time(pid);
    let mut latencies = Vec::with_capacity(n * rotations);
    for r in 0..rotations {
        let version = r as u64 + 2;
        let sent = Instant::now();
        op.rotate(pb::RotateRequest {
            tenant_id: TENANT.into(),
            exchange: "binance".into(),
            credentials: Some(pb::CredentialSet {
                api_key: format!("benchKey{version:08}"),
                api_secret: format!("benchSecret{version:08}"),
                passphrase: None,
            }),
            overlap_seconds: None,
            mint: false,
        })
        .await
        .unwrap();
        let mut received = 0;
        while received < n {
            let (v, at) = tokio::time::timeout(Duration::from_secs(60), got_rx.recv())
                .await
                .unwrap()
                .unwrap();
            if v == version {
                latencies.push(at - sent);
                received += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let cpu = cpu_time(pid).saturating_sub(cpu_before);
    drop(dev);
    latencies.sort();
    Result {
        subscribers: n,
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
        max: *latencies.last().unwrap(),
        bytes_per_subscriber: (rss_idle.saturating_sub(rss_before) * 1024) / n as u64,
        rss_idle_mib: rss_idle / 1024,
        cpu_per_delivery: cpu / u32::try_from(n * rotations).unwrap(),
    }
}

fn main() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing
    // and expects a quick smoke run.
    let quick = !std::env::args().any(|a| a == "--bench");
    let counts: Vec<usize> = std::env::var("FANOUT_SUBSCRIBERS")
        .ok()
        .map(|v| v.split(',').map(|x| x.trim().parse().unwrap()).collect())
        .unwrap_or_else(|| if quick { vec![50] } else { vec![1_000, 10_000] });
    let rotations: usize = std::env::var("FANOUT_ROTATIONS")
        .ok()
        .map(|v| v.parse().unwrap())
        .unwrap_or(if quick { 1 } else { 5 });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let results: Vec<Result> = counts
        .iter()
        .map(|&n| rt.block_on(run(n, rotations)))
        .collect();
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!(
        "fan-out, Rotate sent → ROTATED event received ({rotations} rotations, {profile} build)"
    );
    println!(
        "{:>12} {:>10} {:>10} {:>10} {:>18} {:>17} {:>13}",
        "subscribers", "p50", "p99", "max", "RSS/idle stream", "CPU/delivery", "broker RSS"
    );
    for r in &results {
        println!(
            "{:>12} {:>8.1}ms {:>8.1}ms {:>8.1}ms {:>16} B {:>15.1}µs {:>9} MiB",
            r.subscribers,
            r.p50.as_secs_f64() * 1e3,
            r.p99.as_secs_f64() * 1e3,
            r.max.as_secs_f64() * 1e3,
            r.bytes_per_subscriber,
            r.cpu_per_delivery.as_secs_f64() * 1e6,
            r.rss_idle_mib
        );
    }
}
