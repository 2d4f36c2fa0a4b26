//! Vault high availability with a real 3-node OpenBao raft cluster on
//! loopback (static-seal auto-unseal, so a restarted node unseals itself):
//! the leader is killed during a steady load of GetCredentials (cached and
//! cold) and Rotates. Prints failed calls, recovery time and event counts.

use std::{
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use credbroker::config::{CacheConfig, VaultAuthConfig};

use crate::support::{Env, EnvOptions, TD, free_port_pair, get_req, new_tenant, rotate_n, store_n};

struct Node {
    api: u16,
    config: std::path::PathBuf,
    child: Option<Child>,
}

struct Cluster {
    dir: tempfile::TempDir,
    nodes: Vec<Node>,
    token: String,
    http: reqwest::Client,
}

impl Cluster {
    fn spawn(&mut self, i: usize) {
        let bin = std::env::var("BAO_BIN").unwrap_or_else(|_| "bao".into());
        let log = std::fs::File::create(self.dir.path().join(format!("n{i}.log"))).unwrap();
        let child = Command::new(bin)
            .args(["server", "-config"])
            .arg(&self.nodes[i].config)
            .env("HOME", self.dir.path())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        self.nodes[i].child = Some(child);
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self, i: usize, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.nodes[i].api)
    }

    async fn get(&self, i: usize, path: &str) -> Option<serde_json::Value> {
        let r = self
            .http
            .get(self.url(i, path))
            .header("X-Vault-Token", &self.token)
            .send()
            .await
            .ok()?;
        r.json().await.ok()
    }

    async fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("unseal.key"), rand::random::<[u8; 32]>()).unwrap();
        let ports: Vec<u16> = (0..3).map(|_| free_port_pair()).collect();
        let joins: String = ports
            .iter()
            .map(|p| format!("  retry_join {{ leader_api_addr = \"http://127.0.0.1:{p}\" }}\n"))
            .collect();
        let mut nodes = Vec::new();
        for (i, p) in ports.iter().enumerate() {
            let data = dir.path().join(format!("n{i}"));
            std::fs::create_dir_all(&data).unwrap();
            let config = dir.path().join(format!("n{i}.hcl"));
            std::fs::write(
                &config,
                format!(
                    r#"storage "raft" {{
  path = "{data}"
  node_id = "n{i}"
  # Production raft timing (the default, 5, is for slow development boxes).
  performance_multiplier = 1
{joins}}}
listener "tcp" {{
  address = "127.0.0.1:{p}"
  cluster_address = "127.0.0.1:{c}"
  tls_disable = true
}}
seal "static" {{
  current_key_id = "k1"
  current_key = "file://{key}"
}}
api_addr = "http://127.0.0.1:{p}"
cluster_addr = "http://127.0.0.1:{c}"
disable_mlock = true
"#,
                    data = data.display(),
                    c = p + 1,
                    key = dir.path().join("unseal.key").display(),
                ),
            )
            .unwrap();
            nodes.push(Node {
                api: *p,
                config,
                child: None,
            });
        }
        let mut cluster = Cluster {
            dir,
            nodes,
            token: String::new(),
            http: reqwest::Client::new(),
        };
        for i in 0..3 {
            cluster.spawn(i);
        }
        // Initialise node 0 (auto-unseal: recovery keys only).
        let init = loop {
            let r = cluster
                .http
                .post(cluster.url(0, "/v1/sys/init"))
                .json(&serde_json::json!({"recovery_shares": 1, "recovery_threshold": 1}))
                .send()
                .await;
            if let Ok(r) = r
                && r.status().is_success()
            {
                break r.json::<serde_json::Value>().await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        cluster.token = init["root_token"].as_str().unwrap().to_owned();
        // Promote joined nodes quickly, then wait for three voters.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ok = cluster
                .http
                .post(cluster.url(0, "/v1/sys/storage/raft/autopilot/configuration"))
                .header("X-Vault-Token", &cluster.token)
                .json(&serde_json::json!({"server_stabilization_time": "1s", "cleanup_dead_servers": false}))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "autopilot not configurable");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        loop {
            let voters = cluster
                .get(0, "/v1/sys/storage/raft/configuration")
                .await
                .and_then(|v| {
                    v["data"]["config"]["servers"]
                        .as_array()
                        .map(|s| s.iter().filter(|s| s["voter"] == true).count())
                })
                .unwrap_or(0);
            if voters == 3 {
                break;
            }
            assert!(Instant::now() < deadline, "three voters not reached");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let r = cluster
            .http
            .post(cluster.url(0, "/v1/sys/mounts/secret"))
            .header("X-Vault-Token", &cluster.token)
            .json(&serde_json::json!({"type": "kv", "options": {"version": "2"}}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{:?}", r.text().await);
        cluster
    }

    async fn leader(&self) -> usize {
        for _ in 0..100 {
            for i in 0..3 {
                if self.nodes[i].child.is_none() {
                    continue;
                }
                if let Some(v) = self.get(i, "/v1/sys/leader").await
                    && v["is_self"] == true
                {
                    return i;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no leader");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

#[tokio::test]
async fn killing_the_vault_leader_fails_no_read_and_writes_recover_within_seconds() {
    let mut cluster = Cluster::start().await;
    // A small cache: most reads below are cold (PostgreSQL, then Vault).
    let mut env = Env::start_with(EnvOptions {
        cache: CacheConfig {
            capacity: 4,
            ..CacheConfig::default()
        },
        ..EnvOptions::default()
    })
    .await;
    env.stop_broker().await;
    let leader = cluster.leader().await;
    env.config.vault.addr = cluster.url(leader, "");
    env.config.vault.nodes = (0..3)
        .filter(|i| *i != leader)
        .map(|i| cluster.url(i, ""))
        .collect();
    env.config.vault.failover_budget_ms = 3000;
    env.config.vault.auth = VaultAuthConfig::Token {
        token: cluster.token.clone().into(),
    };
    env.start_broker(None).await;
    let mut op = env.operator().await;
    let tenants: Vec<String> = (0..12).map(|_| new_tenant()).collect();
    for t in &tenants {
        op.validate_and_store(store_n(t, "binance")).await.unwrap();
    }
    // Read-after-write through a standby: a replica on one standby reads
    // (cold) what the first one has just written through the leader.
    let standby = (0..3).find(|i| *i != leader).unwrap();
    let mut on_standby = env.config.clone();
    on_standby.vault.addr = cluster.url(standby, "");
    on_standby.vault.nodes = vec![];
    let b = env
        .replica_with(
            credbroker::app::real_backends(&on_standby).await.unwrap(),
            None,
        )
        .await;
    let mut op_b = env
        .client_at(b.addr, &format!("spiffe://{TD}/operator/b"))
        .await;
    let mut raw_failed = Vec::new();
    for t in &tenants {
        op.validate_and_store(store_n(t, "bybit")).await.unwrap();
        let got = op_b.get_credentials(get_req(t, "bybit")).await;
        if let Err(e) = got {
            raw_failed.push(e.code());
        }
    }
    eprintln!(
        "read right after write through a standby: {} of {} failed {raw_failed:?}",
        raw_failed.len(),
        tenants.len()
    );
    assert!(raw_failed.is_empty(), "{raw_failed:?}");
    b.stop().await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let (reads, failed_reads) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut readers = Vec::new();
    for r in 0..4 {
        let mut pod = env.operator().await;
        let (stop, reads, failed, tenants) = (
            stop.clone(),
            reads.clone(),
            failed_reads.clone(),
            tenants.clone(),
        );
        readers.push(tokio::spawn(async move {
            let mut i = r;
            while !stop.load(Ordering::Relaxed) {
                // Two hot keys (cached) and ten cold ones.
                let t = if i % 3 == 0 {
                    &tenants[i % 2]
                } else {
                    &tenants[2 + i % 10]
                };
                reads.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = pod.get_credentials(get_req(t, "binance")).await {
                    failed.fetch_add(1, Ordering::Relaxed);
                    eprintln!("read failed: {:?} {}", e.code(), e.message());
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    let writer = {
        let (stop, mut op, t) = (stop.clone(), env.operator().await, tenants[11].clone());
        tokio::spawn(async move {
            let mut log = Vec::new();
            let mut n = 2;
            while !stop.load(Ordering::Relaxed) {
                let at = Instant::now();
                let ok = op.rotate(rotate_n(&t, "binance", n)).await;
                if let Err(e) = &ok {
                    eprintln!(
                        "rotate failed after {:?}: {:?} {}",
                        at.elapsed(),
                        e.code(),
                        e.message()
                    );
                }
                log.push((
                    at,
                    ok.as_ref()
                        .map(|r| r.get_ref().rotated)
                        .map_err(|e| e.code()),
                ));
                if ok.is_ok() {
                    n += 1;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            log
        })
    };
    // grpc.health.v1 as a load balancer sees it, sampled every 100 ms.
    let not_serving = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, not_serving) = (stop.clone(), not_serving.clone());
        let channel = env
            .pki
            .channel(env.addr, &[&format!("spiffe://{TD}/operator/lb")])
            .await;
        tokio::spawn(async move {
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            while !stop.load(Ordering::Relaxed) {
                let s = health
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: "credbroker.v1.CredentialBroker".into(),
                    })
                    .await
                    .map(|r| r.into_inner().status)
                    .ok();
                if s != Some(tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
                {
                    not_serving.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let killed_at = Instant::now();
    cluster.kill(leader);
    tokio::time::sleep(Duration::from_secs(8)).await;
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }
    let log = writer.await.unwrap();
    sampler.await.unwrap();
    let failed_writes = log.iter().filter(|(_, r)| r.is_err()).count();
    let recovered = log
        .iter()
        .find(|(at, r)| *at > killed_at && r.is_ok())
        .map(|(at, _)| at.duration_since(killed_at));
    let last_failure = log
        .iter()
        .filter(|(at, r)| *at > killed_at && r.is_err())
        .map(|(at, _)| at.duration_since(killed_at))
        .max();
    let rotated = log.iter().filter(|(_, r)| matches!(r, Ok(true))).count() as i64;
    let events = env
        .count("SELECT count(*) FROM credential_events WHERE kind = 'rotated'")
        .await;
    eprintln!(
        "vault leader killed: health NOT_SERVING in {} samples; {} reads, {} failed; {} rotates, {} failed ({:?}), last failure {:?} and first success {:?} after the kill; {} ROTATED events for {} successful rotates",
        not_serving.load(Ordering::Relaxed),
        reads.load(Ordering::Relaxed),
        failed_reads.load(Ordering::Relaxed),
        log.len(),
        failed_writes,
        log.iter().filter_map(|(_, r)| r.err()).collect::<Vec<_>>(),
        last_failure,
        recovered,
        events,
        rotated
    );
    assert_eq!(failed_reads.load(Ordering::Relaxed), 0, "no read may fail");
    assert_eq!(
        not_serving.load(Ordering::Relaxed),
        0,
        "health stays SERVING while a node can serve"
    );
    assert!(
        last_failure.is_none_or(|d| d < Duration::from_secs(5)),
        "writes work again within 5 s of the kill"
    );
    assert_eq!(
        events, rotated,
        "every committed rotation has exactly one event"
    );

    // The killed node comes back, unseals itself and rejoins; the broker
    // does not notice.
    cluster.spawn(leader);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let healthy = cluster
            .get(leader, "/v1/sys/health")
            .await
            .is_some_and(|v| v["sealed"] == false && v["initialized"] == true);
        if healthy {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted node did not unseal and rejoin"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut pod = env
        .client_for(&format!("spiffe://{TD}/tenant/{}/pod/p", tenants[5]))
        .await;
    pod.get_credentials(get_req(&tenants[5], "binance"))
        .await
        .unwrap();
}

/// A node's "no such version" is proof only from the active node. With two
/// of three nodes gone the survivor is a standby with no leader to elect:
/// whatever it answers for a version PostgreSQL names (here, one Vault never
/// had, as a standby behind the write would answer), the store says
/// UNAVAILABLE, never "missing". Once a leader is back, the active node's
/// not-found is the answer again.
#[tokio::test]
async fn only_the_active_vault_node_can_call_a_version_missing() {
    use credbroker::{
        broker::{error::SecretStoreError, ports::SecretStore, types::CredentialSet},
        config::VaultConfig,
        vault::VaultSecretStore,
    };
    use secrecy::SecretString;

    let mut cluster = Cluster::start().await;
    let leader = cluster.leader().await;
    let survivor = (0..3).find(|i| *i != leader).unwrap();
    let third = (0..3).find(|i| *i != leader && *i != survivor).unwrap();
    let cfg = |addr: String, nodes: Vec<String>| VaultConfig {
        addr,
        nodes,
        failover_budget_ms: 1500,
        mount: "secret".into(),
        prefix: "tenants".into(),
        timeout_ms: 2000,
        ca_cert: None,
        namespace: None,
        auth: VaultAuthConfig::Token {
            token: cluster.token.clone().into(),
        },
    };
    let all = VaultSecretStore::connect(&cfg(
        cluster.url(leader, ""),
        vec![cluster.url(survivor, ""), cluster.url(third, "")],
    ))
    .await
    .unwrap();
    let path = "ha-confirm/credentials";
    let set = CredentialSet {
        api_key: "k".into(),
        api_secret: SecretString::from("s".to_owned()),
        passphrase: None,
    };
    assert_eq!(all.write(path, &set, 0).await.unwrap(), 1);
    // The survivor has replicated version 1 before the cut.
    let on_survivor = VaultSecretStore::connect(&cfg(cluster.url(survivor, ""), vec![]))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while on_survivor.read(path, 1).await.is_err() {
        assert!(Instant::now() < deadline, "the standby never saw version 1");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    cluster.kill(leader);
    cluster.kill(third);
    // No quorum: no node is active. Ask for a version no node holds.
    for _ in 0..3 {
        match on_survivor.read(path, 2).await {
            Err(SecretStoreError::Unavailable(why)) => {
                assert!(why.contains("no active Vault node"), "{why}")
            }
            other => panic!(
                "a standby's not-found taken as proof: {:?}",
                other.map(|_| ())
            ),
        }
    }

    // A leader again: the active node (whichever it is) settles it.
    cluster.spawn(third);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match all.read(path, 2).await {
            Err(SecretStoreError::NotFound { version: 2, .. }) => break,
            Err(SecretStoreError::Unavailable(_)) => {}
            other => panic!("{:?}", other.map(|_| ())),
        }
        assert!(Instant::now() < deadline, "no leader elected again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(all.read(path, 1).await.is_ok());
}
