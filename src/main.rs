//! The `credbroker` binary: parses the command line, starts logging and
//! runs a subcommand. No logic lives here.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand};
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
    /// Run the whole broker in memory with generated certificates.
    Dev {
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
        /// Directory for the generated CA and certificates.
        #[arg(long, default_value = "./.credbroker-dev")]
        dir: PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let filter =
        EnvFilter::try_from_env("CREDBROKER_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    if std::env::var("CREDBROKER_LOG_FORMAT").is_ok_and(|v| v == "json") {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    match Cli::parse().cmd {
        Cmd::Server { config } => {
            let cfg = credbroker::config::Config::load(config.as_deref())?;
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
            let pool = credbroker::store::pool(&credbroker::config::PostgresConfig {
                url: database_url.into(),
                pool_size: 1,
                migrate_on_start: true,
            })
            .map_err(anyhow::Error::msg)?;
            let n = credbroker::store::migrate::run(&pool).await?;
            println!("applied {n} migration(s)");
            Ok(())
        }
        Cmd::Dev { listen, dir } => credbroker::dev::run(listen, &dir).await,
    }
}
