//! The `credbroker` binary: parses the command line, starts logging and
//! runs a subcommand. No logic lives here.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand};

/// mimalloc: the broker allocates small, short-lived buffers on every call
/// from several threads at once; glibc's arena locks showed up as the top
/// cost in profiles of the hot path.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use tracing_subscriber::EnvFilter;

/// Multi-tenant gRPC credential broker for exchange API keys.
#[derive(Parser)]
#[command(name = "credbroker", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the broker against Vault and PostgreSQL.
    Server {
        /// TOML configuration file; CREDBROKER__* variables override it.
        #[arg(long, short, env = "CREDBROKER_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Apply pending database migrations and exit.
    Migrate {
        /// PostgreSQL connection string.
        #[arg(long, env = "CREDBROKER__POSTGRES__URL", hide_env_values = true)]
        database_url: String,
    },
    /// Check or export the audit trail in PostgreSQL.
    Audit {
        #[command(subcommand)]
        cmd: AuditCmd,
    },
    /// Sidecar: keep one file per exchange up to date in a directory.
    Agent {
        #[command(flatten)]
        conn: BrokerConn,
        /// Tenant UUID.
        #[arg(long)]
        tenant: String,
        /// Exchange to watch (repeat; default: all of the tenant's).
        #[arg(long = "exchange")]
        exchanges: Vec<String>,
        /// Directory to write {exchange}.json files into.
        #[arg(long)]
        dir: PathBuf,
        /// Shell command to run after each change.
        #[arg(long)]
        on_change: Option<String>,
        /// Instance name sent with acknowledgements.
        #[arg(long, env = "HOSTNAME")]
        instance: Option<String>,
    },
    /// Import legacy credential files (*.json, .env) from a directory through
    /// ValidateAndStore; prints what was stored, rejected and why.
    Import {
        /// Directory holding the files.
        dir: PathBuf,
        /// Tenant UUID the credentials belong to.
        #[arg(long)]
        tenant: String,
        #[command(flatten)]
        conn: BrokerConn,
    },
    /// Run the whole broker in memory with generated certificates.
    Dev {
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
        /// Directory for the generated CA and certificates.
        #[arg(long, default_value = "./.credbroker-dev")]
        dir: PathBuf,
        /// Concurrent WatchRotations streams per tenant.
        #[arg(long, default_value_t = 10_000)]
        max_streams_per_tenant: usize,
        /// WatchRotations opens per tenant and minute (0: no limit; the
        /// memory bench opens 100,000 streams at once).
        #[arg(long, default_value_t = credbroker::config::LimitsConfig::default().watches_per_minute)]
        watches_per_minute: u32,
        /// Serve Prometheus metrics here (`/metrics`); off unless given.
        #[arg(long)]
        metrics_listen: Option<SocketAddr>,
        /// How keys are validated: against bundled exchange simulators
        /// (demo keys), by format only, or against the live exchanges.
        #[arg(long, value_enum, default_value = "simulated")]
        validation: credbroker::dev::DevValidation,
        /// Also write a workload certificate (`pod.pem`, `pod.key`) for a
        /// pod of this tenant, to call as a trading pod does.
        #[arg(long)]
        pod_tenant: Option<uuid::Uuid>,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Check every chain (edited, deleted or reordered records, cut tails);
    /// exits 1 naming the first broken link of each broken chain.
    Verify {
        /// PostgreSQL connection string.
        #[arg(long, env = "CREDBROKER__POSTGRES__URL", hide_env_values = true)]
        database_url: String,
    },
    /// Write records as JSON lines in the seed's format (for a SIEM).
    Export {
        /// PostgreSQL connection string.
        #[arg(long, env = "CREDBROKER__POSTGRES__URL", hide_env_values = true)]
        database_url: String,
        /// Only this tenant's records.
        #[arg(long)]
        tenant: Option<String>,
        /// Only records at or after this time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Only records before this time (RFC 3339).
        #[arg(long)]
        until: Option<String>,
    },
}

/// How a client command reaches the broker.
#[derive(clap::Args)]
struct BrokerConn {
    /// Broker endpoint, e.g. https://credbroker:50051 (repeat for failover).
    #[arg(long = "endpoint", required = true)]
    endpoints: Vec<String>,
    /// CA bundle of the broker's certificate (PEM).
    #[arg(long)]
    ca: PathBuf,
    /// Our client certificate (PEM, SPIFFE ID in its URI SAN).
    #[arg(long)]
    cert: PathBuf,
    /// Our private key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// Name to verify in the broker's certificate (default: endpoint host).
    #[arg(long)]
    server_name: Option<String>,
    /// File holding a bearer token (JWT), re-read when it changes.
    #[arg(long)]
    token_file: Option<PathBuf>,
}

impl BrokerConn {
    /// The token file, if one was given.
    fn token(&self) -> anyhow::Result<Option<credbroker::client::token::TokenFile>> {
        self.token_file
            .clone()
            .map(credbroker::client::token::TokenFile::open)
            .transpose()
            .map_err(|e| anyhow::anyhow!("--token-file: {e}"))
    }

    /// (CA, certificate, key) read from their files.
    fn material(&self) -> anyhow::Result<(Vec<u8>, Vec<u8>, String)> {
        let read = |flag: &str, p: &PathBuf| {
            std::fs::read(p).map_err(|e| anyhow::anyhow!("--{flag} {}: {e}", p.display()))
        };
        let key = String::from_utf8(read("key", &self.key)?)
            .map_err(|_| anyhow::anyhow!("--key: not PEM text"))?;
        Ok((read("ca", &self.ca)?, read("cert", &self.cert)?, key))
    }

    /// A channel to the first endpoint.
    async fn channel(&self) -> anyhow::Result<tonic::transport::Channel> {
        let (ca, cert, key) = self.material()?;
        let mut tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca))
            .identity(tonic::transport::Identity::from_pem(cert, key));
        if let Some(n) = &self.server_name {
            tls = tls.domain_name(n.clone());
        }
        let endpoint = self
            .endpoints
            .first()
            .ok_or_else(|| anyhow::anyhow!("--endpoint is required"))?;
        tonic::transport::Channel::from_shared(endpoint.clone())
            .map_err(|e| anyhow::anyhow!("--endpoint {endpoint}: {e}"))?
            .tls_config(tls)?
            .connect()
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach {endpoint}: {e}"))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let filter = EnvFilter::try_from_env("CREDBROKER_LOG").unwrap_or_else(|_| {
        // vaultrs/rustify log every non-2xx answer as an error, including
        // the 404 of a first write; the broker logs what matters itself.
        EnvFilter::new("info,rustify=off,vaultrs=off")
    });
    let json = std::env::var("CREDBROKER_LOG_FORMAT").is_ok_and(|v| v == "json");
    let cli = Cli::parse();
    // The server's configuration names where traces go; other commands
    // only log.
    let server_cfg = match &cli.cmd {
        Cmd::Server { config } => Some(credbroker::config::Config::load(config.as_deref())?),
        _ => None,
    };
    let otlp = server_cfg.as_ref().and_then(|c| {
        c.telemetry.otlp_endpoint.clone().map(|endpoint| {
            credbroker::telemetry::traces::OtlpSettings {
                endpoint,
                flush: std::time::Duration::from_millis(c.telemetry.otlp_flush_ms.max(1)),
            }
        })
    });
    let _traces = credbroker::telemetry::traces::init(filter, json, otlp.as_ref())?;
    match cli.cmd {
        Cmd::Server { .. } => {
            let cfg = server_cfg.ok_or_else(|| anyhow::anyhow!("server configuration missing"))?;
            let backends = credbroker::app::real_backends(&cfg).await?;
            let settings = credbroker::app::settings(&cfg)?;
            let listener = tokio::net::TcpListener::bind(cfg.server.listen)
                .await
                .map_err(|e| {
                    anyhow::anyhow!("server.listen {}: cannot bind ({e})", cfg.server.listen)
                })?;
            let running = credbroker::app::start(backends, settings, listener).await?;
            let token = running.shutdown_token();
            tokio::spawn(async move {
                credbroker::app::shutdown_signal().await;
                token.cancel();
            });
            running.wait().await
        }
        Cmd::Migrate { database_url } => {
            let pg = credbroker::store::connect_config(&credbroker::config::PostgresConfig {
                url: database_url.into(),
                pool_size: 1,
                migrate_on_start: true,
            })
            .map_err(|e| anyhow::anyhow!("--database-url: {e}"))?;
            let pool = credbroker::store::pool(pg, 1).map_err(anyhow::Error::msg)?;
            let n = credbroker::store::migrate::run(&pool).await?;
            println!("applied {n} migration(s)");
            Ok(())
        }
        Cmd::Audit { cmd } => audit(cmd).await,
        Cmd::Dev {
            listen,
            dir,
            max_streams_per_tenant,
            watches_per_minute,
            metrics_listen,
            validation,
            pod_tenant,
        } => {
            credbroker::dev::run(
                listen,
                &dir,
                (max_streams_per_tenant, watches_per_minute),
                metrics_listen,
                validation,
                pod_tenant,
            )
            .await
        }
        Cmd::Import { dir, tenant, conn } => {
            let tenant = tenant
                .parse()
                .map_err(|e| anyhow::anyhow!("--tenant: {e}"))?;
            let mut client = credbroker::client::token::broker_client(
                conn.channel().await?,
                credbroker::client::token::Bearer(conn.token()?),
            );
            let report = credbroker::import::run(&dir, tenant, &mut client).await?;
            for line in &report {
                println!("{line}");
            }
            let stored = report
                .iter()
                .filter(|l| l.outcome == credbroker::import::Outcome::Stored)
                .count();
            println!("{stored} stored, {} not stored", report.len() - stored);
            Ok(())
        }
        Cmd::Agent {
            conn,
            tenant,
            exchanges,
            dir,
            on_change,
            instance,
        } => {
            let tenant = tenant
                .parse()
                .map_err(|e| anyhow::anyhow!("--tenant: {e}"))?;
            let exchanges = exchanges
                .iter()
                .map(|e| e.parse())
                .collect::<Result<Vec<_>, String>>()
                .map_err(|e| anyhow::anyhow!("--exchange: {e}"))?;
            let (ca, cert, key) = conn.material()?;
            let mut client = credbroker::client::ClientConfig::new(
                conn.endpoints.clone(),
                ca,
                cert,
                key.into(),
                tenant,
            );
            client.domain = conn.server_name.clone();
            client.token = conn.token()?;
            client.exchanges = exchanges;
            client.instance = instance;
            let cancel = tokio_util::sync::CancellationToken::new();
            let stop = cancel.clone();
            tokio::spawn(async move {
                credbroker::app::shutdown_signal().await;
                stop.cancel();
            });
            credbroker::agent::run(
                credbroker::agent::AgentConfig {
                    client,
                    dir,
                    on_change,
                },
                cancel,
            )
            .await
        }
    }
}

async fn audit(cmd: AuditCmd) -> anyhow::Result<()> {
    let url = match &cmd {
        AuditCmd::Verify { database_url } | AuditCmd::Export { database_url, .. } => database_url,
    };
    let pg = credbroker::store::connect_config(&credbroker::config::PostgresConfig {
        url: url.clone().into(),
        pool_size: 1,
        migrate_on_start: false,
    })
    .map_err(|e| anyhow::anyhow!("--database-url: {e}"))?;
    let store = credbroker::store::PgMetadataStore::new(
        credbroker::store::pool(pg, 1).map_err(anyhow::Error::msg)?,
    );
    match cmd {
        AuditCmd::Verify { .. } => {
            let report = credbroker::audit::chain::verify_all(&store.audit_chains().await?);
            for line in &report.lines {
                println!("{line}");
            }
            if report.broken > 0 {
                anyhow::bail!(
                    "{} of {} audit chains are broken",
                    report.broken,
                    report.chains
                );
            }
            Ok(())
        }
        AuditCmd::Export {
            tenant,
            since,
            until,
            ..
        } => {
            let time = |flag: &str, v: Option<String>| {
                v.map(|t| {
                    time::OffsetDateTime::parse(&t, &time::format_description::well_known::Rfc3339)
                        .map_err(|e| anyhow::anyhow!("--{flag} {t}: not an RFC 3339 time ({e})"))
                })
                .transpose()
            };
            let tenant = tenant
                .map(|t| t.parse().map_err(|e| anyhow::anyhow!("--tenant: {e}")))
                .transpose()?;
            let rows = store
                .audit_export(tenant, time("since", since)?, time("until", until)?)
                .await?;
            let mut out = std::io::stdout().lock();
            let mut skipped = 0;
            for row in rows {
                // Only what the chain covers is exported: a row whose stored
                // tenant or time disagrees with its hashed body is skipped
                // (and counted; `audit verify` names it).
                if credbroker::audit::chain::column_mismatch(&row).is_some() {
                    skipped += 1;
                    continue;
                }
                let rec: credbroker::audit::AuditRecord = serde_json::from_str(&row.body)?;
                use std::io::Write as _;
                writeln!(out, "{}", rec.to_export_json())?;
            }
            if skipped > 0 {
                eprintln!(
                    "{skipped} record(s) skipped: their stored tenant or time disagrees with their hashed body; run `credbroker audit verify`"
                );
            }
            Ok(())
        }
    }
}
