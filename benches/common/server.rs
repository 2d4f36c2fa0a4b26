#![allow(dead_code)] // each bench uses a part
//! The release `credbroker server` as its own process, on the benches'
//! OpenBao, PostgreSQL and certificates (`stack` and `drill`).

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
};

use super::backends::{Bao, Pki, TD, TestDb};

/// A running server; killed (and reaped) when dropped.
pub struct Server {
    pub child: Option<Child>,
    pub pid: u32,
    /// The gRPC address (`host:port`).
    pub addr: String,
    /// The metrics address (`host:port`).
    pub metrics: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Server {
    /// SIGKILL, as a lost node: no shutdown runs.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `credbroker server` with its state in `dir` and `extra` (TOML
/// sections: limits, audit, auth, validation...) after the common
/// configuration (whose `[validation]` is format checks only, unless
/// `extra` has its own); returns once it listens.
pub fn start(dir: &Path, pki: &Pki, bao: &Bao, db: &TestDb, extra: &str) -> Server {
    std::fs::create_dir_all(dir).unwrap();
    let toml = format!(
        r#"
[server]
listen = "127.0.0.1:0"

[tls]
cert = "{cert}"
key = "{key}"
client_ca = "{ca}"
trust_domain = "{TD}"

[vault]
addr = "{vault}"
[vault.auth]
method = "token"

[postgres]
url = "{pg}"

{validation}
[telemetry]
metrics_listen = "127.0.0.1:0"

[checks]
enabled = false

{extra}
"#,
        cert = pki.path("server.pem").display(),
        key = pki.path("server.key").display(),
        ca = pki.path("ca.pem").display(),
        vault = bao.addr,
        pg = db.url(),
        // Format checks only, unless `extra` validates at the exchanges.
        validation = if extra.contains("[validation]") {
            ""
        } else {
            "[validation]\nmode = \"format\"\n"
        },
    );
    let cfg = dir.join("credbroker.toml");
    std::fs::write(&cfg, toml).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_credbroker"))
        .args(["server", "--config"])
        .arg(&cfg)
        .env("CREDBROKER__VAULT__AUTH__TOKEN", &bao.token)
        .env("CREDBROKER__AUDIT__SPOOL_DIR", dir.join("audit"))
        .env("CREDBROKER_LOG_FORMAT", "json")
        .env("CREDBROKER_LOG", "info,rustify=off,vaultrs=off")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut addr, mut metrics) = (None, None);
    while addr.is_none() || metrics.is_none() {
        let line = lines
            .next()
            .expect("credbroker server exited before listening")
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        let at = v["fields"]["addr"].as_str().map(str::to_owned);
        match v["fields"]["message"].as_str() {
            Some("credbroker listening (mTLS)") => addr = at,
            Some(m) if m.contains("metrics") && at.is_some() => metrics = at,
            _ => {}
        }
    }
    // Keep draining its log so the pipe never fills.
    std::thread::spawn(move || for _ in lines {});
    Server {
        pid: child.id(),
        child: Some(child),
        addr: addr.unwrap(),
        metrics: metrics.unwrap(),
    }
}

/// The text of a server's `/metrics` page (`addr`: [`Server::metrics`]).
pub async fn metrics_text(http: &reqwest::Client, addr: &str) -> String {
    http.get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}
