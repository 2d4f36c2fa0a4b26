//! Logs and traces: one `tracing` subscriber with the log format (text or
//! JSON, whose lines carry the span fields: method, request id, trace id)
//! and, when `telemetry.otlp_endpoint` is set, an OpenTelemetry layer that
//! exports every span over OTLP/gRPC. Incoming W3C `traceparent` headers
//! make the call's span a child of the caller's.

use std::time::Duration;

use opentelemetry::{
    propagation::{Extractor, TextMapPropagator as _},
    trace::TracerProvider as _,
};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::{
    propagation::TraceContextPropagator,
    trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider},
};
use tonic::codegen::http;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::{
    EnvFilter, Layer as _, layer::SubscriberExt as _, util::SubscriberInitExt as _,
};

/// Flushes and stops the trace exporter when dropped (the end of `main`).
pub struct TraceGuard(Option<SdkTracerProvider>);

impl Drop for TraceGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("trace exporter shutdown: {e}");
        }
    }
}

/// Where and how traces are exported.
#[derive(Clone, Debug)]
pub struct OtlpSettings {
    /// OTLP/gRPC endpoint, e.g. `http://otel-collector:4317`.
    pub endpoint: String,
    /// How long spans are batched before export.
    pub flush: Duration,
}

/// Installs the global subscriber: `filter`, text or JSON logs, and the
/// OTLP layer when `otlp` is given. Must run inside the Tokio runtime (the
/// gRPC exporter uses it).
///
/// # Errors
/// When the exporter cannot be built (a bad endpoint).
pub fn init(
    filter: EnvFilter,
    json: bool,
    otlp: Option<&OtlpSettings>,
) -> anyhow::Result<TraceGuard> {
    // The log filter governs logs only: spans are exported at info and
    // above whatever the log level is. The call span is always on for the
    // log layer too, so every line logged inside a call carries its
    // request and trace ids (this module logs nothing else).
    let filter = filter.add_directive(
        "credbroker_edge::telemetry::traces=info"
            .parse()
            .map_err(|e| anyhow::anyhow!("log filter: {e}"))?,
    );
    let fmt = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .fmt_fields(super::json_fields::JsonSpanFields)
            .with_filter(filter)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer().with_filter(filter).boxed()
    };
    let (otel, provider) = match otlp {
        Some(o) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(&o.endpoint)
                .build()
                .map_err(|e| anyhow::anyhow!("telemetry.otlp_endpoint {}: {e}", o.endpoint))?;
            let processor = BatchSpanProcessor::builder(exporter)
                .with_batch_config(
                    BatchConfigBuilder::default()
                        .with_scheduled_delay(o.flush)
                        .build(),
                )
                .build();
            let provider = SdkTracerProvider::builder()
                .with_span_processor(processor)
                .with_resource(
                    opentelemetry_sdk::Resource::builder()
                        .with_service_name("credbroker")
                        .build(),
                )
                .build();
            let layer = tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("credbroker"))
                .with_filter(EnvFilter::new(
                    "info,rustify=off,vaultrs=off,h2=off,hyper=off,tower=off",
                ));
            (Some(layer), Some(provider))
        }
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()?;
    Ok(TraceGuard(provider))
}

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The ids of one call: its request id (returned as `x-request-id`, the
/// audit records' id) and the caller's W3C trace id, made once by the
/// outermost layer and kept in the request's extensions.
#[derive(Clone, Debug)]
pub struct CallIds {
    /// A time-ordered (v7) id.
    pub request_id: uuid::Uuid,
    /// From `traceparent`, when the caller sent a valid one.
    pub trace_id: Option<String>,
}

impl CallIds {
    /// The ids of `req`'s call (a fresh request id).
    pub fn of<B>(req: &http::Request<B>) -> Self {
        Self {
            request_id: fast_v7(),
            trace_id: req
                .headers()
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .and_then(credbroker_core::audit::trace_id),
        }
    }
}

/// A time-ordered (v7) id from the thread-local generator (no system call
/// per call, unlike `Uuid::now_v7`).
pub fn fast_v7() -> uuid::Uuid {
    let ms = u64::try_from(time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000)
        .unwrap_or(0);
    uuid::Builder::from_unix_timestamp_millis(ms, &rand::random::<[u8; 10]>()).into_uuid()
}

/// The span of one gRPC call: named after the method, a child of the
/// caller's trace when it sent `traceparent`, with the trace and request
/// ids as fields (so JSON log lines carry them). Every field is set here,
/// as a string: recording one later makes the JSON log layer parse and
/// write its fields again. Never the body.
pub fn call_span<B>(req: &http::Request<B>, ids: &CallIds) -> tracing::Span {
    let path = req.uri().path();
    let mut id = uuid::Uuid::encode_buffer();
    let request_id: &str = ids.request_id.as_hyphenated().encode_lower(&mut id);
    let span = tracing::info_span!(
        "grpc",
        otel.name = path,
        otel.kind = "server",
        rpc.system = "grpc",
        method = path,
        trace_id = ids.trace_id.as_deref(),
        request_id,
    );
    if !span.is_disabled() && ids.trace_id.is_some() {
        let parent = TraceContextPropagator::new().extract(&Headers(req.headers()));
        let _ = span.set_parent(parent);
    }
    span
}
