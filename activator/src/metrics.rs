//! The activator's Prometheus metrics, per namespace and revision. Each revision resolves
//! its label children once, so recording a request is a few atomic operations; gauges are
//! sampled from the throttlers at scrape time.
//!
//! A revision's counters and histograms exist only once it has seen a request, as in
//! Knative's activator, whose views record nothing for a revision without traffic: with
//! them made up front, 10 000 mostly idle revisions exported 43 MB per scrape from every
//! activator and held 55 MiB more for it. The gauges (waiting, in flight, ready pods,
//! capacity) are a few lines per revision and stay for every revision, so that a
//! dashboard sees the pods of a revision that had no request yet.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::revision::RevisionId;

const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "other"];

/// Latency buckets in milliseconds.
const LATENCY_BUCKETS_MS: &[f64] = &[
    1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0,
];

/// Cold-start waits are longer: from a few ms (warm process) to minutes (image pulls). In
/// seconds, Prometheus's base unit: this histogram is Thaw's own, so it follows the
/// conventions, while the request latencies keep the milliseconds of Knative's names.
const COLD_START_BUCKETS_SECONDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    cold_start: HistogramVec,
    rejected: IntCounterVec,
    waiting: IntGaugeVec,
    in_flight: IntGaugeVec,
    ready_pods: IntGaugeVec,
    capacity: IntGaugeVec,
}

/// One revision's metrics. Its label children are resolved at its first request, then
/// kept: recording is an atomic load and a few atomic adds.
#[derive(Debug, Clone)]
pub struct RevisionMetrics {
    inner: Arc<Lazy>,
}

#[derive(Debug)]
struct Lazy {
    metrics: Metrics,
    id: RevisionId,
    children: OnceLock<Children>,
}

/// The label children of one revision.
#[derive(Debug)]
struct Children {
    by_class: [prometheus::IntCounter; 6],
    latency: prometheus::Histogram,
    cold_start: prometheus::Histogram,
    rejected: prometheus::IntCounter,
}

impl Children {
    fn registered(m: &Metrics, id: &RevisionId) -> Children {
        let (ns, name) = (&*id.namespace, &*id.name);
        Children {
            by_class: CLASSES.map(|c| m.requests.with_label_values(&[ns, name, c])),
            latency: m.latency.with_label_values(&[ns, name]),
            cold_start: m.cold_start.with_label_values(&[ns, name]),
            rejected: m.rejected.with_label_values(&[ns, name]),
        }
    }

    /// Children no registry knows: what a request finishing after its revision was
    /// removed records into, so that it cannot bring the series back.
    fn detached() -> Option<Children> {
        let counter = prometheus::IntCounter::new("detached", "detached").ok()?;
        let histogram =
            || prometheus::Histogram::with_opts(HistogramOpts::new("detached", "detached")).ok();
        Some(Children {
            by_class: std::array::from_fn(|_| counter.clone()),
            latency: histogram()?,
            cold_start: histogram()?,
            rejected: counter,
        })
    }
}

impl RevisionMetrics {
    fn children(&self) -> &Children {
        self.inner
            .children
            .get_or_init(|| Children::registered(&self.inner.metrics, &self.inner.id))
    }

    pub fn response(&self, status: http::StatusCode, elapsed: Duration) {
        let class = (status.as_u16() / 100) as usize;
        let index = if (1..=5).contains(&class) {
            class - 1
        } else {
            5
        };
        let c = self.children();
        c.by_class[index].inc();
        c.latency.observe(elapsed.as_secs_f64() * 1000.0);
    }

    pub fn cold_start(&self, waited: Duration) {
        self.children().cold_start.observe(waited.as_secs_f64());
    }

    pub fn rejected(&self) {
        self.children().rejected.inc();
    }
}

/// Figures sampled from a revision at scrape time.
pub struct RevisionGauges {
    pub waiting: usize,
    pub in_flight: usize,
    pub ready_pods: usize,
    /// Requests this activator may send the revision's pods at once; `None` for CC = 0
    /// (unlimited).
    pub capacity: Option<usize>,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let labels = ["namespace_name", "revision_name"];
        let requests = IntCounterVec::new(
            Opts::new(
                "activator_request_count",
                "Requests answered, by response code class",
            ),
            &["namespace_name", "revision_name", "response_code_class"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "activator_request_latencies",
                "Time from arrival to the end of the response, in milliseconds",
            )
            .buckets(LATENCY_BUCKETS_MS.to_vec()),
            &labels,
        )?;
        let cold_start = HistogramVec::new(
            HistogramOpts::new(
                "activator_cold_start_wait_seconds",
                "Time a request waited for the revision's first ready pod, in seconds",
            )
            .buckets(COLD_START_BUCKETS_SECONDS.to_vec()),
            &labels,
        )?;
        let rejected = IntCounterVec::new(
            Opts::new(
                "activator_throttler_rejected_total",
                "Requests refused with 503 because the revision's wait queue or byte budget was full",
            ),
            &labels,
        )?;
        let waiting = IntGaugeVec::new(
            Opts::new(
                "activator_requests_waiting",
                "Requests waiting for a pod with a free slot",
            ),
            &labels,
        )?;
        let in_flight = IntGaugeVec::new(
            Opts::new(
                "activator_requests_in_flight",
                "Requests sent to a pod and not finished",
            ),
            &labels,
        )?;
        let ready_pods = IntGaugeVec::new(
            Opts::new(
                "activator_ready_pods",
                "Pods that passed the activator's probe",
            ),
            &labels,
        )?;
        let capacity = IntGaugeVec::new(
            Opts::new(
                "activator_capacity",
                "Requests this activator may send the revision's pods at once: its subset of \
                 the pods times its share of their container concurrency (absent for CC = 0)",
            ),
            &labels,
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(capacity.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(cold_start.clone()))?;
        registry.register(Box::new(rejected.clone()))?;
        registry.register(Box::new(waiting.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(ready_pods.clone()))?;
        Ok(Self {
            registry,
            requests,
            latency,
            cold_start,
            rejected,
            waiting,
            in_flight,
            ready_pods,
            capacity,
        })
    }

    /// A revision's metrics; no series exist until it sees a request.
    pub fn revision(&self, id: &RevisionId) -> RevisionMetrics {
        RevisionMetrics {
            inner: Arc::new(Lazy {
                metrics: self.clone(),
                id: id.clone(),
                children: OnceLock::new(),
            }),
        }
    }

    /// Forgets a removed revision's series. From here on its requests record into
    /// detached children.
    pub fn remove_revision(&self, revision: &RevisionMetrics) {
        // Static names and help always pass prometheus' checks.
        if let Some(detached) = Children::detached() {
            let _ = revision.inner.children.set(detached);
        }
        let id = &revision.inner.id;
        let (ns, name) = (&*id.namespace, &*id.name);
        for c in CLASSES {
            let _ = self.requests.remove_label_values(&[ns, name, c]);
        }
        for vec in [&self.latency, &self.cold_start] {
            let _ = vec.remove_label_values(&[ns, name]);
        }
        let _ = self.rejected.remove_label_values(&[ns, name]);
        for g in [
            &self.waiting,
            &self.in_flight,
            &self.ready_pods,
            &self.capacity,
        ] {
            let _ = g.remove_label_values(&[ns, name]);
        }
    }

    /// Text exposition, after sampling every revision's gauges.
    pub fn render<'a>(
        &self,
        revisions: impl Iterator<Item = (&'a RevisionMetrics, RevisionGauges)>,
    ) -> Vec<u8> {
        for (m, g) in revisions {
            let id = &m.inner.id;
            let labels = [&*id.namespace, &*id.name];
            let as_i64 = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
            self.waiting
                .with_label_values(&labels)
                .set(as_i64(g.waiting));
            self.in_flight
                .with_label_values(&labels)
                .set(as_i64(g.in_flight));
            self.ready_pods
                .with_label_values(&labels)
                .set(as_i64(g.ready_pods));
            match g.capacity {
                Some(c) => self.capacity.with_label_values(&labels).set(as_i64(c)),
                None => {
                    let _ = self.capacity.remove_label_values(&labels);
                }
            }
        }
        let mut buf = Vec::with_capacity(8192);
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauges(ready_pods: usize) -> RevisionGauges {
        RevisionGauges {
            waiting: 0,
            in_flight: 0,
            ready_pods,
            capacity: None,
        }
    }

    fn text(m: &Metrics, revisions: &[(&RevisionMetrics, usize)]) -> String {
        let body = m.render(revisions.iter().map(|(r, ready)| (*r, gauges(*ready))));
        String::from_utf8(body).unwrap()
    }

    #[test]
    fn an_idle_revision_has_only_its_gauges_until_its_first_request() {
        let m = Metrics::new().unwrap();
        let idle = m.revision(&RevisionId::new("ns", "idle"));
        let busy = m.revision(&RevisionId::new("ns", "busy"));
        let t = text(&m, &[(&idle, 2), (&busy, 0)]);
        assert!(
            t.contains(r#"activator_ready_pods{namespace_name="ns",revision_name="idle"} 2"#),
            "{t}"
        );
        assert!(!t.contains("activator_request_count"), "{t}");
        assert!(!t.contains("activator_request_latencies"), "{t}");
        assert!(!t.contains("activator_cold_start_wait_seconds"), "{t}");

        busy.response(http::StatusCode::OK, Duration::from_millis(3));
        let t = text(&m, &[(&idle, 2), (&busy, 0)]);
        assert!(t.contains(r#"activator_request_count{namespace_name="ns",response_code_class="2xx",revision_name="busy"} 1"#), "{t}");
        assert!(
            t.contains(
                r#"activator_request_latencies_count{namespace_name="ns",revision_name="busy"} 1"#
            ),
            "{t}"
        );
        assert!(!t.contains(r#"activator_request_count{namespace_name="ns",response_code_class="2xx",revision_name="idle""#), "{t}");
    }

    #[test]
    fn a_request_ending_after_its_revision_was_removed_brings_no_series_back() {
        let m = Metrics::new().unwrap();
        let gone = m.revision(&RevisionId::new("ns", "gone"));
        gone.response(http::StatusCode::OK, Duration::from_millis(1));
        m.remove_revision(&gone);
        gone.response(http::StatusCode::OK, Duration::from_millis(1));
        gone.rejected();
        let never = m.revision(&RevisionId::new("ns", "never"));
        m.remove_revision(&never);
        never.response(http::StatusCode::OK, Duration::from_millis(1));
        let t = text(&m, &[]);
        assert!(!t.contains("revision_name"), "{t}");
        assert!(t.is_empty(), "{t}");
    }
}
