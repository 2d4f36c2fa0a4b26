//! Load shedding: at most `max` broker calls in flight on this replica;
//! beyond that a call is refused at once with RESOURCE_EXHAUSTED and a
//! retry hint, instead of queueing until its deadline. A WatchRotations
//! call counts until its stream is set up (the stream itself is bounded by
//! the per-tenant stream slots). Health and reflection are never shed.
//!
//! Being the outermost layer, it makes each admitted call's ids
//! ([`CallIds`]) and its span, and feeds the gRPC call metrics
//! (`credbroker_grpc_server_*{method,code}`): every call is counted with its
//! code and its time to the response headers, shed calls included.

use std::{
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use tokio::sync::Semaphore;
use tonic::codegen::http;
use tower::{Layer, Service};

use crate::telemetry::metrics::Metrics;
use crate::telemetry::traces::{CallIds, call_span};
use tracing::Instrument as _;

/// How long a shed caller is asked to wait.
const RETRY_AFTER: Duration = Duration::from_millis(250);

/// See the module docs.
#[derive(Clone)]
pub struct AdmissionLayer {
    slots: Arc<Semaphore>,
    max: usize,
    metrics: Metrics,
    refusals: Arc<crate::audit::refusals::Refusals>,
}

impl AdmissionLayer {
    /// At most `max` calls in flight; every call recorded in `metrics`, and
    /// every shed one tallied in `refusals` (the audit trail's count of
    /// refused calls).
    pub fn new(
        max: usize,
        metrics: Metrics,
        refusals: Arc<crate::audit::refusals::Refusals>,
    ) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max.max(1))),
            max,
            metrics,
            refusals,
        }
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Admission {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`AdmissionLayer`].
#[derive(Clone)]
pub struct Admission<S> {
    inner: S,
    layer: AdmissionLayer,
}

impl<S, B> Service<http::Request<B>> for Admission<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let started = Instant::now();
        let metrics = self.layer.metrics.clone();
        let method = Metrics::grpc_method(req.uri().path());
        let permit = if req.uri().path().starts_with("/credbroker.") {
            match self.layer.slots.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    let peer = req.extensions().get::<crate::tls::acceptor::PeerInfo>();
                    self.layer.refusals.note(
                        crate::audit::refusals::Who::Connection(peer.and_then(|p| p.certs.clone())),
                        peer.and_then(|p| p.remote).map(|a| a.ip()),
                        std::borrow::Cow::Borrowed(
                            crate::auth::model::Action::from_path(req.uri().path())
                                .map_or("other", |a| a.name()),
                        ),
                        crate::audit::refusals::Refusal::Overloaded,
                        None,
                    );
                    let resp =
                        crate::api::status::overloaded(self.layer.max, RETRY_AFTER).into_http();
                    metrics.grpc_call(method, tonic::Code::ResourceExhausted, started.elapsed());
                    return Box::pin(async move { Ok(resp) });
                }
            }
        } else {
            None
        };
        // The call's ids and span, made once here with every field set:
        // the inner layers and the handler run in it.
        let ids = CallIds::of(&req);
        let span = call_span(&req, &ids);
        req.extensions_mut().insert(ids);
        let mut inner = crate::ready::take_ready(&mut self.inner);
        let call = span.in_scope(|| inner.call(req));
        Box::pin(
            async move {
                let out = call.await;
                drop(permit);
                if let Ok(resp) = &out {
                    metrics.grpc_call(
                        method,
                        crate::api::status::response_code(resp),
                        started.elapsed(),
                    );
                }
                out
            }
            .instrument(span),
        )
    }
}
