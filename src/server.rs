//! The tonic server: mutual TLS, the ordered tower stack, health and
//! reflection, and graceful shutdown.

use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Server, ServerTlsConfig, server::TcpIncoming};
use tonic_health::server::HealthReporter;

use crate::{
    api::{BrokerService, pb, pb::credential_broker_server::CredentialBrokerServer},
    auth::AuthLayer,
};

/// Largest accepted request; credential sets are a few KiB at most.
const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// gRPC service name reported by grpc.health.v1.
pub const SERVICE_NAME: &str = "credbroker.v1.CredentialBroker";

/// Everything [`serve`] needs.
pub struct ServeParams<H> {
    /// Bound listener.
    pub listener: TcpListener,
    /// mTLS configuration.
    pub tls: ServerTlsConfig,
    /// Caller identity (certificate, token).
    pub auth: AuthLayer,
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

    // Small request/response messages: without TCP_NODELAY, Nagle and
    // delayed ACKs add ~40 ms to the tail. Keepalive finds vanished peers.
    let incoming = TcpIncoming::from(p.listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)));
    let shutdown = p.shutdown.clone();
    let server = Server::builder()
        .tls_config(p.tls)?
        // Unary deadline; streams are bounded by their own heartbeat logic.
        .timeout(p.request_timeout)
        // Find dead peers (a pod that vanished without closing its
        // connection) so their streams and slots are released.
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        // One span per call, named after the method; never the body.
        .trace_fn(|req| tracing::info_span!("grpc", method = %req.uri().path()))
        // Identity first: every later layer and handler knows the caller.
        .layer(p.auth)
        .add_service(p.health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(broker)
        .serve_with_incoming_shutdown(incoming, async move { shutdown.cancelled().await });

    tokio::pin!(server);
    tokio::select! {
        r = &mut server => return r.map_err(Into::into),
        () = p.shutdown.cancelled() => {}
    }
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
