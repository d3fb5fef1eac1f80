//! Distributed tracing: Knative's tracing settings, W3C trace-context propagation, and
//! export of the request spans over OTLP (HTTP + protobuf).
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

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_http::{HeaderExtractor, HeaderInjector, HttpClient, HttpError};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// What [`Tracing::start`] hands the subscriber (see `logging::init_traced`).
pub type Tracer = SdkTracer;

/// The `tracing` target of every span exported; nothing else reaches the exporter, and
/// log lines never show these spans.
pub const TARGET: &str = "thaw_trace";

/// Knative's config-map keys (`config-observability`, knative.dev/pkg
/// `observability/tracing`), also the activator's flag names.
pub const KEY_PROTOCOL: &str = "tracing-protocol";
pub const KEY_ENDPOINT: &str = "tracing-endpoint";
pub const KEY_SAMPLING_RATE: &str = "tracing-sampling-rate";

/// How long one export may take; the OpenTelemetry default.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the exit may wait for the last spans to leave.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);
/// A collector's answer is a few bytes; anything this big is not one.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// Knative's `tracing-protocol` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// The default: no tracing.
    None,
    /// OTLP over HTTP with protobuf bodies: what Thaw exports.
    HttpProtobuf,
    /// OTLP over gRPC: Knative supports it, Thaw does not (it would need a gRPC stack).
    Grpc,
    /// Spans printed on stdout: Knative supports it, Thaw does not.
    Stdout,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::None => "none",
            Protocol::HttpProtobuf => "http/protobuf",
            Protocol::Grpc => "grpc",
            Protocol::Stdout => "stdout",
        }
    }
}

/// A bad tracing setting, naming the key as the user wrote it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("{key}: unknown protocol {value:?} (expected none, http/protobuf, grpc or stdout)")]
    Protocol { key: String, value: String },
    #[error("{key}: {value:?} is not an http:// URL: {reason}")]
    Endpoint {
        key: String,
        value: String,
        reason: String,
    },
    #[error("{key}: must be set when the protocol is {protocol}")]
    MissingEndpoint { key: String, protocol: &'static str },
    #[error("{key}: expected a number from 0 to 1, got {value:?}")]
    SamplingRate { key: String, value: String },
    #[error("{key}: expected an object, got {value}")]
    NotAnObject { key: String, value: String },
}

/// Where the settings came from, for error messages: Knative's config-map keys (and the
/// activator's flags), or the JSON fields of `OBSERVABILITY_CONFIG` (whose errors the
/// queue-proxy prefixes with the variable's name).
#[derive(Debug, Clone, Copy)]
enum Keys {
    ConfigMap,
    Json,
}

impl Keys {
    fn protocol(self) -> String {
        match self {
            Keys::ConfigMap => KEY_PROTOCOL.to_owned(),
            Keys::Json => "tracing.protocol".to_owned(),
        }
    }
    fn endpoint(self) -> String {
        match self {
            Keys::ConfigMap => KEY_ENDPOINT.to_owned(),
            Keys::Json => "tracing.endpoint".to_owned(),
        }
    }
    fn sampling_rate(self) -> String {
        match self {
            Keys::ConfigMap => KEY_SAMPLING_RATE.to_owned(),
            Keys::Json => "tracing.samplingRate".to_owned(),
        }
    }
}

/// Knative's tracing settings, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct TracingConfig {
    pub protocol: Protocol,
    /// The full URL spans are POSTed to (`…/v1/traces`); empty when off.
    pub endpoint: String,
    /// The share of new traces recorded (Knative's rule: ≥ 1 all, ≤ 0 none, else
    /// that ratio of trace ids, following the caller's decision when there is one).
    pub sampling_rate: f64,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            protocol: Protocol::None,
            endpoint: String::new(),
            sampling_rate: 0.0,
        }
    }
}

impl TracingConfig {
    /// Whether spans are exported.
    pub fn is_on(&self) -> bool {
        self.protocol == Protocol::HttpProtobuf
    }

    /// From Knative's config-map keys (absent keys take Knative's defaults: protocol
    /// `none`, rate 0).
    pub fn from_keys(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        Self::build(
            Keys::ConfigMap,
            get(KEY_PROTOCOL).as_deref(),
            get(KEY_ENDPOINT).as_deref(),
            get(KEY_SAMPLING_RATE).as_deref(),
        )
    }

    /// From the `tracing` object of `OBSERVABILITY_CONFIG` (knative.dev/pkg's
    /// `{"protocol", "endpoint", "samplingRate"}`); `None` is the absent object.
    pub fn from_observability_json(
        tracing: Option<&serde_json::Value>,
    ) -> Result<Self, ConfigError> {
        let Some(tracing) = tracing else {
            return Ok(Self::default());
        };
        let Some(obj) = tracing.as_object() else {
            return Err(ConfigError::NotAnObject {
                key: "tracing".to_owned(),
                value: tracing.to_string(),
            });
        };
        let text = |name: &str| {
            obj.get(name).map(|v| match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            })
        };
        Self::build(
            Keys::Json,
            text("protocol").as_deref(),
            text("endpoint").as_deref(),
            text("samplingRate").as_deref(),
        )
    }

    /// The `tracing` object of `OBSERVABILITY_CONFIG` for these settings, as Knative's
    /// controller writes it into a queue-proxy's environment.
    pub fn to_observability_json(&self) -> serde_json::Value {
        serde_json::json!({
            "protocol": self.protocol.as_str(),
            "endpoint": self.endpoint,
            "samplingRate": self.sampling_rate,
        })
    }

    fn build(
        keys: Keys,
        protocol: Option<&str>,
        endpoint: Option<&str>,
        rate: Option<&str>,
    ) -> Result<Self, ConfigError> {
        let protocol = match protocol.map(str::trim).unwrap_or("none") {
            "" | "none" => Protocol::None,
            "http/protobuf" => Protocol::HttpProtobuf,
            "grpc" => Protocol::Grpc,
            "stdout" => Protocol::Stdout,
            other => {
                return Err(ConfigError::Protocol {
                    key: keys.protocol(),
                    value: other.to_owned(),
                })
            }
        };
        let sampling_rate = match rate.map(str::trim) {
            None | Some("") => 0.0,
            Some(text) => match text.parse::<f64>() {
                Ok(r) if (0.0..=1.0).contains(&r) => r,
                _ => {
                    return Err(ConfigError::SamplingRate {
                        key: keys.sampling_rate(),
                        value: text.to_owned(),
                    })
                }
            },
        };
        let endpoint = endpoint.map(str::trim).unwrap_or("");
        let endpoint = match protocol {
            Protocol::HttpProtobuf if endpoint.is_empty() => {
                return Err(ConfigError::MissingEndpoint {
                    key: keys.endpoint(),
                    protocol: protocol.as_str(),
                })
            }
            Protocol::HttpProtobuf => {
                traces_url(endpoint).map_err(|reason| ConfigError::Endpoint {
                    key: keys.endpoint(),
                    value: endpoint.to_owned(),
                    reason,
                })?
            }
            // Not exported, so the endpoint is not used: keep it only to report it.
            _ => endpoint.to_owned(),
        };
        Ok(TracingConfig {
            protocol,
            endpoint,
            sampling_rate,
        })
    }

    fn sampler(&self) -> Sampler {
        // knative.dev/pkg's sampleFor: always, never, or the ratio under the parent's say.
        if self.sampling_rate >= 1.0 {
            Sampler::AlwaysOn
        } else if self.sampling_rate <= 0.0 {
            Sampler::AlwaysOff
        } else {
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(self.sampling_rate)))
        }
    }
}

/// The OTLP traces URL for a configured endpoint. An endpoint without a path gets the
/// standard `/v1/traces`, as OTEL_EXPORTER_OTLP_ENDPOINT does; one with a path is used
/// as it is, as Knative's `WithEndpointURL` does. Only `http://`: the exporter has no
/// TLS client.
fn traces_url(endpoint: &str) -> Result<String, String> {
    let uri: http::Uri = endpoint.parse().map_err(|e| format!("{e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => return Err("https is not supported; use http://".to_owned()),
        _ => return Err("expected http://host:port[/path]".to_owned()),
    }
    let Some(authority) = uri.authority() else {
        return Err("no host".to_owned());
    };
    if authority.host().is_empty() {
        return Err("no host".to_owned());
    }
    let path = uri.path();
    if path.is_empty() || path == "/" {
        Ok(format!("http://{authority}/v1/traces"))
    } else {
        Ok(format!(
            "http://{authority}{}",
            uri.path_and_query().map_or(path, |p| p.as_str())
        ))
    }
}

/// Why tracing could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(String),
    #[error("cannot start the exporter's runtime: {0}")]
    Runtime(#[source] std::io::Error),
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
    /// process (`service.name` and the like).
    pub fn start(
        config: &TracingConfig,
        resource: &[(&'static str, &str)],
    ) -> Result<(Self, SdkTracer), StartError> {
        let resource: Vec<KeyValue> = resource
            .iter()
            .map(|(k, v)| KeyValue::new(*k, (*v).to_owned()))
            .collect();
        let client = ExportClient::new(&config.endpoint)?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_endpoint(config.endpoint.clone())
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| StartError::Exporter(e.to_string()))?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(config.sampler())
            .with_resource(Resource::builder_empty().with_attributes(resource).build())
            .build();
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

/// The exporter's HTTP client: hyper-util's, on a current-thread runtime of its own,
/// driven by the batch processor's thread (which is not a runtime thread, so blocking on
/// it is allowed). The request path's runtime never runs an export.
struct ExportClient {
    runtime: tokio::runtime::Runtime,
    client: Client<HttpConnector, Full<Bytes>>,
    endpoint: String,
    /// Whether the last export failed: a failure is logged when an episode starts, and
    /// the recovery when it ends, never once per batch.
    failing: AtomicBool,
}

impl std::fmt::Debug for ExportClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportClient")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl ExportClient {
    fn new(endpoint: &str) -> Result<Self, StartError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(StartError::Runtime)?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(EXPORT_TIMEOUT));
        // Connections are only driven while an export runs; one kept idle in between
        // would be found dead later. A batch every few seconds can afford a connect.
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(connector);
        Ok(ExportClient {
            runtime,
            client,
            endpoint: endpoint.to_owned(),
            failing: AtomicBool::new(false),
        })
    }

    async fn send(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let resp = self.client.request(request.map(Full::new)).await?;
        let (parts, body) = resp.into_parts();
        let body = Limited::new(body, MAX_RESPONSE_BYTES).collect().await?;
        Ok(Response::from_parts(parts, body.to_bytes()))
    }

    fn outcome(&self, failure: Option<String>) {
        match failure {
            Some(error) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(endpoint = %self.endpoint, %error, "cannot export spans to the tracing collector; spans are dropped until it answers");
                }
            }
            None => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(endpoint = %self.endpoint, "the tracing collector answers again");
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl HttpClient for ExportClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let result = self
            .runtime
            .block_on(async { tokio::time::timeout(EXPORT_TIMEOUT, self.send(request)).await });
        let result = match result {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {EXPORT_TIMEOUT:?}").into()),
        };
        let failure = match &result {
            Ok(resp) if resp.status().is_success() => None,
            Ok(resp) => Some(format!("collector answered {}", resp.status())),
            Err(e) => Some(e.to_string()),
        };
        self.outcome(failure);
        result
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

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(pairs: &[(&str, &str)]) -> Result<TracingConfig, ConfigError> {
        let map: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        TracingConfig::from_keys(|k| map.get(k).cloned())
    }

    #[test]
    fn absent_keys_are_knatives_defaults_and_off() {
        let c = keys(&[]).unwrap();
        assert_eq!(c, TracingConfig::default());
        assert!(!c.is_on());
    }

    #[test]
    fn an_endpoint_without_a_path_gets_the_otlp_traces_path() {
        let c = keys(&[
            (KEY_PROTOCOL, "http/protobuf"),
            (KEY_ENDPOINT, "http://collector.observability:4318"),
            (KEY_SAMPLING_RATE, "0.25"),
        ])
        .unwrap();
        assert!(c.is_on());
        assert_eq!(c.endpoint, "http://collector.observability:4318/v1/traces");
        assert_eq!(c.sampling_rate, 0.25);
        let c = keys(&[
            (KEY_PROTOCOL, "http/protobuf"),
            (KEY_ENDPOINT, "http://127.0.0.1:4318/custom/traces"),
        ])
        .unwrap();
        assert_eq!(c.endpoint, "http://127.0.0.1:4318/custom/traces");
    }

    #[test]
    fn bad_values_name_their_key() {
        let err = |pairs: &[(&str, &str)]| keys(pairs).unwrap_err().to_string();
        assert_eq!(
            err(&[(KEY_PROTOCOL, "zipkin")]),
            "tracing-protocol: unknown protocol \"zipkin\" (expected none, http/protobuf, grpc or stdout)"
        );
        assert_eq!(
            err(&[(KEY_SAMPLING_RATE, "1.5")]),
            "tracing-sampling-rate: expected a number from 0 to 1, got \"1.5\""
        );
        assert_eq!(
            err(&[(KEY_SAMPLING_RATE, "-0.1")]),
            "tracing-sampling-rate: expected a number from 0 to 1, got \"-0.1\""
        );
        assert_eq!(
            err(&[(KEY_SAMPLING_RATE, "often")]),
            "tracing-sampling-rate: expected a number from 0 to 1, got \"often\""
        );
        assert_eq!(
            err(&[(KEY_PROTOCOL, "http/protobuf")]),
            "tracing-endpoint: must be set when the protocol is http/protobuf"
        );
        let bad = err(&[
            (KEY_PROTOCOL, "http/protobuf"),
            (KEY_ENDPOINT, "http://[::1"),
        ]);
        assert!(
            bad.starts_with("tracing-endpoint: \"http://[::1\" is not an http:// URL"),
            "{bad}"
        );
        let tls = err(&[
            (KEY_PROTOCOL, "http/protobuf"),
            (KEY_ENDPOINT, "https://c:4318"),
        ]);
        assert!(
            tls.ends_with("https is not supported; use http://"),
            "{tls}"
        );
        let bare = err(&[
            (KEY_PROTOCOL, "http/protobuf"),
            (KEY_ENDPOINT, "collector:4318"),
        ]);
        assert!(
            bare.starts_with("tracing-endpoint: \"collector:4318\""),
            "{bare}"
        );
    }

    #[test]
    fn observability_json_round_trips_and_names_its_fields() {
        let on = TracingConfig {
            protocol: Protocol::HttpProtobuf,
            endpoint: "http://127.0.0.1:4318/v1/traces".to_owned(),
            sampling_rate: 1.0,
        };
        let json = on.to_observability_json();
        assert_eq!(
            json,
            serde_json::json!({"protocol": "http/protobuf", "endpoint": "http://127.0.0.1:4318/v1/traces", "samplingRate": 1.0})
        );
        assert_eq!(
            TracingConfig::from_observability_json(Some(&json)).unwrap(),
            on
        );
        assert_eq!(
            TracingConfig::from_observability_json(None).unwrap(),
            TracingConfig::default()
        );
        let bad = serde_json::json!({"protocol": "http/protobuf", "endpoint": "http://c:4318", "samplingRate": 2});
        assert_eq!(
            TracingConfig::from_observability_json(Some(&bad))
                .unwrap_err()
                .to_string(),
            "tracing.samplingRate: expected a number from 0 to 1, got \"2\""
        );
        let bad = serde_json::json!({"protocol": "jaeger"});
        assert!(TracingConfig::from_observability_json(Some(&bad))
            .unwrap_err()
            .to_string()
            .starts_with("tracing.protocol: unknown protocol \"jaeger\""));
    }

    #[test]
    fn the_sampler_follows_knatives_rule() {
        let with = |r| TracingConfig {
            sampling_rate: r,
            ..TracingConfig::default()
        };
        assert!(matches!(with(1.0).sampler(), Sampler::AlwaysOn));
        assert!(matches!(with(0.0).sampler(), Sampler::AlwaysOff));
        assert!(matches!(with(0.5).sampler(), Sampler::ParentBased(_)));
    }
}
