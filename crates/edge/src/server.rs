//! The tonic server: mutual TLS, the ordered tower stack, health and
//! reflection, and graceful shutdown.

use std::time::Duration;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic_health::server::HealthReporter;

use crate::api::{BrokerService, pb};

use crate::api::pb::credential_broker_server::CredentialBrokerServer;

use crate::audit::layer::AuditLayer;

use crate::auth::AuthLayer;

use crate::limits::admission::AdmissionLayer;

use crate::tls::acceptor::{self, ConnLimits, ReloadingTls};

/// Largest accepted request; credential sets are a few KiB at most.
const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// gRPC service name reported by grpc.health.v1.
pub const SERVICE_NAME: &str = "credbroker.v1.CredentialBroker";

/// Admission at the front door: connections, handshakes, calls, streams.
#[derive(Clone, Copy, Debug)]
pub struct FrontDoor {
    /// Connections and handshake deadline.
    pub conns: ConnLimits,
    /// Broker calls in flight at most.
    pub max_concurrent_calls: usize,
    /// HTTP/2 streams per connection.
    pub max_streams_per_connection: u32,
}

impl FrontDoor {
    /// From `[server]`.
    pub fn from_config(c: &ServerConfig) -> Self {
        Self {
            conns: ConnLimits {
                max_connections: c.max_connections,
                handshake_timeout: Duration::from_secs(c.handshake_timeout_secs.max(1)),
            },
            max_concurrent_calls: c.max_concurrent_calls,
            max_streams_per_connection: c.max_streams_per_connection,
        }
    }
}

impl Default for FrontDoor {
    fn default() -> Self {
        Self::from_config(&ServerConfig::default())
    }
}

/// Everything [`serve`] needs.
pub struct ServeParams<H> {
    /// Bound listener.
    pub listener: TcpListener,
    /// mTLS configuration (re-read when its files change).
    pub tls: Arc<ReloadingTls>,
    /// Connection and call admission.
    pub front: FrontDoor,
    /// Caller identity (certificate, token).
    pub auth: AuthLayer,
    /// Where every call's audit record goes.
    pub audit: Arc<dyn crate::audit::AuditSink>,
    /// The tallies of refused calls (one record per caller and interval).
    pub refusals: Arc<crate::audit::refusals::Refusals>,
    /// gRPC call metrics.
    pub metrics: crate::telemetry::metrics::Metrics,
    /// The broker service.
    pub service: BrokerService,
    /// grpc.health.v1 service.
    pub health: tonic_health::pb::health_server::HealthServer<H>,
    /// Fires on SIGTERM / shutdown.
    pub shutdown: CancellationToken,
    /// How long in-flight calls may finish after shutdown.
    pub grace: Duration,
    /// Per-call deadline for unary calls.
    pub request_timeout: Duration,
}

/// Serves until `shutdown` fires, then lets in-flight calls finish for at
/// most `grace` (streams end at once with a resumable status).
///
/// # Errors
/// When TLS or reflection cannot be set up, or the server fails.
pub async fn serve<H: tonic_health::pb::health_server::Health>(
    p: ServeParams<H>,
) -> anyhow::Result<()> {
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    // grpcurl 1.8.6, the operators' tool, speaks only v1alpha reflection.
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        // google.rpc.BadRequest, so grpcurl can print error details.
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let broker =
        CredentialBrokerServer::new(p.service).max_decoding_message_size(MAX_REQUEST_BYTES);

    // Our own TLS front door: TLS 1.3, certificate reload, a connection cap
    // and a handshake deadline (see tls::acceptor). It also sets
    // TCP_NODELAY (without it Nagle and delayed ACKs add ~40 ms to the tail)
    // and TCP keepalive.
    let incoming = acceptor::incoming(p.listener, p.tls, p.front.conns, p.shutdown.clone());
    let shutdown = p.shutdown.clone();
    // State-changing calls run as tasks of their own (see audit::layer):
    // shutdown waits for them, within the grace period.
    let calls = tokio_util::task::TaskTracker::new();
    let server = Server::builder()
        // Unary deadline; streams are bounded by their own heartbeat logic.
        .timeout(p.request_timeout)
        // Advertised as SETTINGS_MAX_CONCURRENT_STREAMS: a client learns the
        // limit instead of having streams reset.
        .max_concurrent_streams(Some(p.front.max_streams_per_connection))
        // Find dead peers (a pod that vanished without closing its
        // connection) so their streams and slots are released.
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        // Shed first: when the replica is saturated, refusing a call must
        // cost nothing (no certificate or token work). Outermost, it also
        // counts and times every call (shed ones included), and gives each
        // admitted call its ids and its span (named after the method, a
        // child of the caller's trace when it sent `traceparent`; never the
        // body).
        .layer(AdmissionLayer::new(
            p.front.max_concurrent_calls,
            p.metrics,
            p.refusals.clone(),
        ))
        // Audit next: every call that is not shed is recorded, including
        // the ones the auth layer refuses, with its outcome and duration;
        // no answer leaves without its record in the spool. Inside tonic's
        // deadline, so a state-changing call it gives up on still runs to
        // its end and records its true outcome (the call is its own task).
        .layer(AuditLayer::new(p.audit, p.refusals, calls.clone()))
        // Identity next: every later layer and handler knows the caller.
        // (Authorization and rate limits need the tenant named in the
        // request body, so they run in one place at the top of each
        // handler: `api::Gate::admit`.)
        .layer(p.auth)
        .add_service(p.health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(broker)
        .serve_with_incoming_shutdown(incoming, async move { shutdown.cancelled().await });

    tokio::pin!(server);
    let served = tokio::select! {
        r = &mut server => r.map_err(Into::into),
        () = p.shutdown.cancelled() => {
            match tokio::time::timeout(p.grace, server).await {
                Ok(r) => r.map_err(Into::into),
                Err(_) => {
                    tracing::warn!(
                        grace_secs = p.grace.as_secs(),
                        "in-flight calls did not finish within the grace period"
                    );
                    Ok(())
                }
            }
        }
    };
    // Calls whose caller left still finish and record their outcome.
    calls.close();
    if tokio::time::timeout(p.grace.max(Duration::from_secs(1)), calls.wait())
        .await
        .is_err()
    {
        tracing::error!(
            open = calls.len(),
            "state-changing calls still running at shutdown; their request records show them"
        );
    }
    served
}

/// Marks the broker (and the whole server) serving or not.
pub async fn set_serving(reporter: &HealthReporter, serving: bool) {
    let status = if serving {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    };
    reporter.set_service_status(SERVICE_NAME, status).await;
    reporter.set_service_status("", status).await;
}

// ---- configuration: the [server] section, owned here (`config` re-exports it).

/// WatchRotations streams one replica admits by default (`server.max_streams`).
pub const DEFAULT_MAX_STREAMS: usize = 20_000;

/// gRPC server settings.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Listen address.
    pub listen: std::net::SocketAddr,
    /// How long in-flight calls may run after SIGTERM.
    pub shutdown_grace_secs: u64,
    /// Heartbeat period of idle WatchRotations streams.
    pub heartbeat_secs: u64,
    /// Period of the Vault/PostgreSQL reachability probe behind grpc.health.v1.
    pub health_probe_secs: u64,
    /// Concurrent WatchRotations streams this replica holds at most, every
    /// tenant's and the operators' (size it by memory: see docs/streams.md).
    pub max_streams: usize,
    /// Concurrent WatchRotations streams one tenant's workloads may hold on
    /// a replica.
    pub max_streams_per_tenant: usize,
    /// Streams end (resumably) after 75–100 % of this, spreading clients
    /// across replicas again; 0 disables.
    pub max_stream_age_secs: u64,
    /// Open connections at most; beyond, new ones are closed at once.
    pub max_connections: usize,
    /// Time a client has to finish the TLS handshake.
    pub handshake_timeout_secs: u64,
    /// Broker calls in flight at most; beyond, RESOURCE_EXHAUSTED at once.
    pub max_concurrent_calls: usize,
    /// HTTP/2 streams per connection (advertised as
    /// SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_streams_per_connection: u32,
    /// A plaintext listener serving grpc.health.v1 only (the kubelet's
    /// native gRPC probes cannot present a client certificate); unset: none.
    pub health_listen: Option<std::net::SocketAddr>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: std::net::SocketAddr::from(([0, 0, 0, 0], 50051)),
            shutdown_grace_secs: 30,
            heartbeat_secs: 5,
            health_probe_secs: 5,
            max_streams: DEFAULT_MAX_STREAMS,
            max_streams_per_tenant: 10_000,
            max_stream_age_secs: 3600,
            max_connections: 20_000,
            handshake_timeout_secs: 10,
            max_concurrent_calls: 2_048,
            max_streams_per_connection: 1_000,
            health_listen: None,
        }
    }
}
