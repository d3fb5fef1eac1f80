//! What the queue-proxy reports: the autoscaler's `Stat` on :9090 (CONTRACT §1.6) and the
//! user-facing Prometheus metrics on :9091.

use std::sync::{Arc, RwLock};

use bytes::Bytes;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};
use prost::Message;
use thaw_shared::proto::Stat;
use tokio::time::Instant;

use crate::config::Config;

/// The latest `Stat`, kept both as a struct (for the text form) and pre-encoded (for the
/// autoscaler's scrape, which happens every second per pod).
#[derive(Debug)]
pub struct AutoscalerStats {
    latest: RwLock<(Stat, Bytes)>,
    labels: String,
}

impl AutoscalerStats {
    pub fn new(config: &Config) -> Self {
        // Before the first report only the pod name is set, as in Knative.
        let stat = Stat {
            pod_name: config.pod.clone(),
            ..Default::default()
        };
        let bytes = Bytes::from(stat.encode_to_vec());
        let labels = format!(
            "destination_namespace=\"{}\",destination_configuration=\"{}\",destination_revision=\"{}\",destination_pod=\"{}\"",
            escape_label(&config.namespace),
            escape_label(&config.configuration),
            escape_label(&config.revision),
            escape_label(&config.pod),
        );
        Self {
            latest: RwLock::new((stat, bytes)),
            labels,
        }
    }

    pub fn set(&self, stat: Stat) {
        let bytes = Bytes::from(stat.encode_to_vec());
        *self.latest.write().unwrap_or_else(|p| p.into_inner()) = (stat, bytes);
    }

    /// The encoded `Stat` the autoscaler reads.
    pub fn protobuf(&self) -> Bytes {
        self.latest
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone()
    }

    pub fn latest(&self) -> Stat {
        self.latest
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }

    /// The same figures as Prometheus text, for Prometheus, the HPA adapter and KEDA.
    pub fn prometheus_text(&self) -> String {
        let s = self.latest();
        let l = &self.labels;
        let mut out = String::with_capacity(1024);
        for (name, help, value) in [
            (
                "queue_average_concurrent_requests",
                "Average concurrent requests over the last second",
                s.average_concurrent_requests,
            ),
            (
                "queue_average_proxied_concurrent_requests",
                "Average concurrent requests from the activator over the last second",
                s.average_proxied_concurrent_requests,
            ),
            (
                "queue_requests_per_second",
                "Requests per second over the last second",
                s.request_count,
            ),
            (
                "queue_proxied_operations_per_second",
                "Requests per second from the activator over the last second",
                s.proxied_request_count,
            ),
            (
                "process_uptime",
                "Seconds since the queue-proxy started",
                s.process_uptime,
            ),
        ] {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{{l}}} {value}\n"
            ));
        }
        out
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The Prometheus metrics on the user metrics port. Label children are resolved once, so
/// recording a request is a few atomic operations.
#[derive(Debug)]
pub struct UserMetrics {
    registry: Registry,
    by_class: [IntCounter; 6],
    latency: Histogram,
    in_flight: IntGauge,
    queue_depth: IntGauge,
    breaker_rejections: IntCounter,
    upstream_errors: IntCounter,
}

/// Latency buckets in milliseconds, as Knative's request latency distribution.
const LATENCY_BUCKETS_MS: &[f64] = &[
    5.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0, 150.0, 200.0, 250.0, 300.0, 350.0, 400.0, 450.0,
    500.0, 600.0, 700.0, 800.0, 900.0, 1000.0, 2000.0, 5000.0, 10000.0, 20000.0, 50000.0, 100000.0,
];

impl UserMetrics {
    pub fn new(config: &Config) -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let opts = |name: &str, help: &str| {
            Opts::new(name, help)
                .const_label("namespace_name", &config.namespace)
                .const_label("configuration_name", &config.configuration)
                .const_label("revision_name", &config.revision)
                .const_label("pod_name", &config.pod)
        };
        let requests = IntCounterVec::new(
            opts(
                "revision_request_count",
                "Requests answered, by response code class",
            ),
            &["response_code_class"],
        )?;
        let by_class = ["1xx", "2xx", "3xx", "4xx", "5xx", "other"]
            .map(|class| requests.with_label_values(&[class]));
        let latency = Histogram::with_opts(
            HistogramOpts::from(opts(
                "revision_request_latencies",
                "Time from arrival to the end of the response, in milliseconds",
            ))
            .buckets(LATENCY_BUCKETS_MS.to_vec()),
        )?;
        let in_flight = IntGauge::with_opts(opts(
            "revision_requests_in_flight",
            "Requests inside the queue-proxy: queued in the breaker or at the app",
        ))?;
        let queue_depth = IntGauge::with_opts(opts(
            "revision_queue_depth",
            "Requests waiting in the breaker for a slot",
        ))?;
        let breaker_rejections = IntCounter::with_opts(opts(
            "revision_breaker_rejected_total",
            "Requests refused with 503 because the breaker queue was full",
        ))?;
        let upstream_errors = IntCounter::with_opts(opts(
            "revision_upstream_errors_total",
            "Requests that failed with 502 because the app could not be reached or broke the response",
        ))?;
        registry.register(Box::new(requests))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(queue_depth.clone()))?;
        registry.register(Box::new(breaker_rejections.clone()))?;
        registry.register(Box::new(upstream_errors.clone()))?;
        Ok(Self {
            registry,
            by_class,
            latency,
            in_flight,
            queue_depth,
            breaker_rejections,
            upstream_errors,
        })
    }

    /// Starts recording a request; the record finishes when dropped.
    pub fn start(self: &Arc<Self>, started: Instant) -> RequestRecord {
        self.in_flight.inc();
        RequestRecord {
            metrics: Arc::clone(self),
            started,
            class: 5,
            log: None,
        }
    }

    pub fn breaker_rejected(&self) {
        self.breaker_rejections.inc();
    }

    pub fn upstream_error(&self) {
        self.upstream_errors.inc();
    }

    /// Text exposition; `queue_depth` is sampled at scrape time.
    pub fn render(&self, queue_depth: usize) -> Vec<u8> {
        self.queue_depth
            .set(i64::try_from(queue_depth).unwrap_or(i64::MAX));
        let mut buf = Vec::with_capacity(4096);
        // Encoding into a Vec cannot fail for I/O reasons; an error would mean a metric
        // family the registry itself built is malformed.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "encoding user metrics");
        }
        buf
    }
}

/// What the request log prints, captured only when the log is on.
#[derive(Debug)]
pub struct LogInfo {
    pub method: http::Method,
    pub uri: http::Uri,
    pub version: http::Version,
}

/// One request being recorded: latency and in-flight are settled when it drops, which is
/// when the response body has been fully sent or the client went away.
#[derive(Debug)]
pub struct RequestRecord {
    metrics: Arc<UserMetrics>,
    started: Instant,
    class: usize,
    log: Option<Box<LogInfo>>,
}

impl RequestRecord {
    pub fn status(&mut self, status: http::StatusCode) {
        let class = (status.as_u16() / 100) as usize;
        self.class = if (1..=5).contains(&class) {
            class - 1
        } else {
            5
        };
        self.metrics.by_class[self.class].inc();
    }

    pub fn log_with(&mut self, info: LogInfo) {
        self.log = Some(Box::new(info));
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        let elapsed = self.started.elapsed();
        self.metrics.latency.observe(elapsed.as_secs_f64() * 1000.0);
        self.metrics.in_flight.dec();
        if let Some(info) = self.log.take() {
            tracing::info!(
                method = %info.method,
                uri = %info.uri,
                protocol = ?info.version,
                status_class = ["1xx", "2xx", "3xx", "4xx", "5xx", "other"][self.class],
                latency_ms = elapsed.as_secs_f64() * 1000.0,
                "request"
            );
        }
    }
}
