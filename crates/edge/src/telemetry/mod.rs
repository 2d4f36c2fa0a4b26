//! Observability: the Prometheus metrics ([`metrics`]), the decorators that
//! measure Vault and the exchanges ([`instrument`]), the JSON logs' span
//! fields ([`json_fields`]), and the `/metrics`
//! endpoint on its own port (so a scrape never competes with the gRPC
//! listener's connection cap and never needs a client certificate).

pub mod instrument;
pub mod json_fields;
pub mod metrics;
pub mod traces;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{Router, http::header, response::IntoResponse, routing::get};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::broker::ports::FleetStore;

/// The OpenMetrics content type Prometheus negotiates.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves `GET /metrics` on `listener` until `cancel` fires.
///
/// # Errors
/// When the listener fails.
pub async fn serve(
    listener: TcpListener,
    registry: prometheus_client::registry::Registry,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let registry = Arc::new(registry);
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move {
                match metrics::encode(&registry) {
                    Ok(body) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response(),
                    Err(_) => axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                }
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await?;
    Ok(())
}

/// Binds the metrics listener.
///
/// # Errors
/// When the address cannot be bound (the message names the key).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("telemetry.metrics_listen {addr}: cannot bind ({e})"))
}

/// Keeps `alphapulse_credentials_total` current: re-counts the credentials
/// every `every` (and at once). While PostgreSQL is down the last counts
/// stay.
pub async fn credentials_task(
    fleet: Arc<dyn FleetStore>,
    metrics: metrics::Metrics,
    every: Duration,
    cancel: CancellationToken,
) {
    loop {
        match fleet.credential_counts().await {
            Ok(counts) => metrics.set_credentials(&counts),
            Err(e) => tracing::debug!("credential counts not refreshed: {e}"),
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}

// ---- configuration: the [telemetry] section, owned here (`config` re-exports it).

/// Metrics endpoint and trace export.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Where `GET /metrics` is served (plain HTTP, its own port); unset: no
    /// metrics endpoint.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// How often the credential counts (`alphapulse_credentials_total`) are
    /// re-read from PostgreSQL.
    pub credentials_refresh_secs: u64,
    /// OTLP/gRPC endpoint traces are exported to (e.g.
    /// `http://otel-collector:4317`); unset: no trace export.
    pub otlp_endpoint: Option<String>,
    /// How long spans are batched before export.
    pub otlp_flush_ms: u64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            metrics_listen: Some(std::net::SocketAddr::from(([0, 0, 0, 0], 9464))),
            credentials_refresh_secs: 30,
            otlp_endpoint: None,
            otlp_flush_ms: 5000,
        }
    }
}
