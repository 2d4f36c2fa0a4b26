//! `credbroker dev` as a child process, shared by the integration tests and
//! the benchmarks: started on port 0 (the broker picks a free port and names
//! it in its banner), its output drained so the pipe never closes under it.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::PathBuf,
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use credbroker::api::pb::credential_broker_client::CredentialBrokerClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// `credbroker dev` as a child process (the binary the README starts).
pub struct DevBroker {
    pub child: tokio::process::Child,
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub banner: String,
    /// Everything the process printed after its banner (kept draining so
    /// the pipe never closes under it).
    pub output: Arc<Mutex<String>>,
}

impl DevBroker {
    /// `credbroker dev --validation format` (tests store made-up keys).
    pub async fn spawn() -> DevBroker {
        Self::spawn_with(&["--validation", "format"]).await
    }

    pub async fn spawn_with(extra: &[&str]) -> DevBroker {
        Self::spawn_logging(extra, "warn,rustify=off,vaultrs=off").await
    }

    /// `credbroker dev` logging at `filter`; everything it prints after its
    /// banner, on stdout and stderr, is kept in `output`.
    pub async fn spawn_logging(extra: &[&str], filter: &str) -> DevBroker {
        use tokio::io::AsyncBufReadExt as _;
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        // Port 0: the broker binds a free port itself and names it in its
        // banner.
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_credbroker"))
            .args(["dev", "--listen", "127.0.0.1:0", "--dir"])
            .arg(dir.path())
            .args(extra)
            .env("CREDBROKER_LOG", filter)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        // Drain stderr from the start (a full pipe would stall the child).
        let early = Arc::new(Mutex::new(String::new()));
        let stderr_sink: Arc<Mutex<Option<Arc<Mutex<String>>>>> = Arc::new(Mutex::new(None));
        {
            let mut stderr = tokio::io::BufReader::new(child.stderr.take().unwrap());
            let (early, sink) = (early.clone(), stderr_sink.clone());
            tokio::spawn(async move {
                let mut line = String::new();
                while stderr.read_line(&mut line).await.unwrap_or(0) > 0 {
                    match sink.lock().unwrap().as_ref() {
                        Some(out) => out.lock().unwrap().push_str(&line),
                        None => early.lock().unwrap().push_str(&line),
                    }
                    line.clear();
                }
            });
        }
        let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap());
        let mut banner = String::new();
        tokio::time::timeout(Duration::from_secs(20), async {
            while !banner.contains("Watch changes") {
                if stdout.read_line(&mut banner).await.unwrap() == 0 {
                    break;
                }
            }
        })
        .await
        .expect("dev broker did not print its banner");
        assert!(
            banner.contains("Watch changes"),
            "dev broker exited early:\n{banner}"
        );
        let port = banner
            .split("listening on 127.0.0.1:")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in the banner:\n{banner}"));
        let output = Arc::new(Mutex::new(String::new()));
        let sink = output.clone();
        tokio::spawn(async move {
            let mut line = String::new();
            while stdout.read_line(&mut line).await.unwrap_or(0) > 0 {
                sink.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        {
            // Switch the drain over first, then take what it kept before.
            let mut sink = stderr_sink.lock().unwrap();
            *sink = Some(output.clone());
            output.lock().unwrap().push_str(&early.lock().unwrap());
        }
        DevBroker {
            child,
            dir,
            port,
            banner,
            output,
        }
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A channel using the operator certificate `dev` wrote.
    pub async fn channel(&self) -> Channel {
        self.channel_as("client").await
    }

    /// A channel using the pod certificate `dev --pod-tenant` wrote.
    pub async fn pod_channel(&self) -> Channel {
        self.channel_as("pod").await
    }

    /// A channel presenting `{name}.pem` / `{name}.key`.
    async fn channel_as(&self, name: &str) -> Channel {
        let read = |f: &str| std::fs::read(self.file(f)).unwrap();
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("ca.pem")))
            .identity(Identity::from_pem(
                read(&format!("{name}.pem")),
                read(&format!("{name}.key")),
            ))
            .domain_name("localhost");
        Channel::from_shared(format!("https://localhost:{}", self.port))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "cannot reach the dev broker: {e:?}\nbanner:\n{}\nlater output:\n{}",
                    self.banner,
                    self.output.lock().unwrap()
                )
            })
    }

    /// A client using the operator certificate `dev` wrote.
    pub async fn operator(&self) -> CredentialBrokerClient<Channel> {
        CredentialBrokerClient::new(self.channel().await)
    }

    /// Stores a credential set as the operator.
    pub async fn store(&self, tenant: &str, exchange: &str, key: &str, secret: &str) {
        self.operator()
            .await
            .validate_and_store(credbroker::api::pb::ValidateAndStoreRequest {
                tenant_id: tenant.into(),
                exchange: exchange.into(),
                credentials: Some(credbroker::api::pb::CredentialSet {
                    api_key: key.into(),
                    api_secret: secret.into(),
                    passphrase: None,
                }),
            })
            .await
            .unwrap();
    }
}
