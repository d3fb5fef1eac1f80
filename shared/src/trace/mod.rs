//! Distributed tracing: Knative's tracing settings, W3C trace-context propagation, and
//! export of the request spans with Knative's protocols: OTLP over HTTP (protobuf) or
//! gRPC, plaintext or TLS, or JSON lines on stdout.
//!
//! Spans are ordinary `tracing` spans with the target [`TARGET`]; a
//! `tracing-opentelemetry` layer, installed only when tracing is on, turns them into
//! OpenTelemetry spans. When tracing is off no layer exists and the request path creates
//! no span and reads no trace header, so it pays one branch on a `bool`.
//!
//! The exporter runs on the batch span processor's own thread, with a small runtime of
//! its own: an unreachable collector costs that thread its timeouts, never a request.
//! Spans wait in a bounded queue (2048, `OTEL_BSP_MAX_QUEUE_SIZE`) and are dropped when
//! it is full.
//!
//! - `config`: the settings and their validation, and what OpenTelemetry's variables
//!   change;
//! - `client`: the OTLP transport (HTTP/1.1 or gRPC's HTTP/2, TLS);
//! - `grpc`: OTLP/gRPC's framing and status;
//! - `stdout`: the span lines.

mod client;
mod config;
mod grpc;
mod stdout;

use std::time::Duration;

use http::{HeaderMap, Request};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub use config::{
    ConfigError, Protocol, TracingConfig, KEY_ENDPOINT, KEY_PROTOCOL, KEY_SAMPLING_RATE,
    OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_TRACES_SAMPLER,
    OTEL_TRACES_SAMPLER_ARG,
};

use client::{ExportClient, Wire};
use config::Export;

/// What [`Tracing::start`] hands the subscriber (see `logging::init_traced`).
pub type Tracer = SdkTracer;

/// The `tracing` target of every span exported; nothing else reaches the exporter, and
/// log lines never show these spans.
pub const TARGET: &str = "thaw_trace";

/// How long one export may take; the OpenTelemetry default.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the exit may wait for the last spans to leave.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

/// Why tracing could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// An OpenTelemetry variable that changes the settings is bad (exit 64, like a bad
    /// setting).
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(String),
    #[error("cannot set up TLS for the exporter: {0}")]
    Tls(String),
    #[error("cannot start the exporter's runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

impl StartError {
    /// Whether this is a configuration error, which stops the process with exit 64.
    pub fn is_config(&self) -> bool {
        matches!(self, StartError::Config(_))
    }
}

/// The running exporter; [`Tracing::shutdown`] sends what is left.
pub struct Tracing {
    provider: SdkTracerProvider,
}

impl std::fmt::Debug for Tracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracing").finish_non_exhaustive()
    }
}

impl Tracing {
    /// Starts the exporter for `config` (which must be on); `resource` names the
    /// process (`service.name` and the like). OpenTelemetry's endpoint and sampler
    /// variables in the process's environment win over `config`, as in Knative.
    pub fn start(
        config: &TracingConfig,
        resource: &[(&'static str, &str)],
    ) -> Result<(Self, SdkTracer), StartError> {
        let plan = config.plan(&|name| std::env::var(name).ok())?;
        let resource: Vec<KeyValue> = resource
            .iter()
            .map(|(k, v)| KeyValue::new(*k, (*v).to_owned()))
            .collect();
        let builder = SdkTracerProvider::builder()
            .with_resource(Resource::builder_empty().with_attributes(resource).build());
        // Both go through the batch processor's thread, so a slow collector or a
        // blocked stdout never holds a request.
        let builder = match plan.export {
            Export::Otlp { url, grpc } => {
                let wire = if grpc { Wire::Grpc } else { Wire::Http };
                let client = ExportClient::new(&url, wire)?;
                let exporter = opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_http_client(client)
                    .with_endpoint(url)
                    .with_timeout(EXPORT_TIMEOUT)
                    .build()
                    .map_err(|e| StartError::Exporter(e.to_string()))?;
                builder.with_batch_exporter(exporter)
            }
            Export::Stdout => builder.with_batch_exporter(stdout::StdoutExporter::default()),
        };
        let builder = match plan.sampler {
            Some(sampler) => builder.with_sampler(sampler),
            None => builder,
        };
        let provider = builder.build();
        let tracer = provider.tracer("thaw");
        Ok((Tracing { provider }, tracer))
    }

    /// Sends the spans still queued, waiting at most a couple of seconds.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
            tracing::debug!(error = %e, "tracing exporter did not shut down cleanly");
        }
    }
}

/// What a request span says of the revision: Knative's attribute names.
#[derive(Debug, Clone)]
pub struct RevisionAttrs<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
}

/// The server span of one request, child of the caller's `traceparent` when it sent a
/// valid one. Call only when tracing is on.
pub fn server_span<B>(
    name: &'static str,
    req: &Request<B>,
    revision: RevisionAttrs<'_>,
) -> tracing::Span {
    let span = tracing::info_span!(
        target: TARGET,
        "request",
        otel.name = name,
        otel.kind = "server",
        http.request.method = %req.method(),
        url.path = req.uri().path(),
        network.protocol.version = ?req.version(),
        kn.revision.name = revision.name,
        k8s.namespace.name = revision.namespace,
        http.response.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(req.headers()));
    // Fails only without the OpenTelemetry layer, where there is nothing to parent.
    let _ = span.set_parent(parent);
    span
}

/// Records the response status on a server span; 5xx marks it an error, as the HTTP
/// semantic conventions say for servers.
pub fn record_status(span: &tracing::Span, status: http::StatusCode) {
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
}

/// Writes `span`'s context as `traceparent` (and `tracestate`) into the headers going
/// upstream, replacing the caller's: this proxy's span is the upstream's parent.
pub fn inject(span: &tracing::Span, headers: &mut HeaderMap) {
    TraceContextPropagator::new().inject_context(&span.context(), &mut HeaderInjector(headers));
}
