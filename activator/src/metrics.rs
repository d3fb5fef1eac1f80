//! The activator's Prometheus metrics, per namespace and revision, in the text format.
//!
//! Each revision records into one block of plain atomic counters that it owns
//! ([`RevisionMetrics`]): a response is two relaxed adds and one release add on two cache
//! lines (its class, the latency count and sum; its latency bucket). With thousands of
//! revisions the per-request cost is cache misses, and prometheus' label children spread
//! one revision's series over many allocations: under cachegrind they cost a request
//! eight last-level misses at 10 000 revisions (`benches/scripts/count-revision-cost.sh`).
//! The scrape writes the text itself ([`render`]), walking the revisions the registry
//! holds, so a removed revision's series are gone with it and a request that ends after
//! the removal cannot bring them back.
//!
//! A revision's counters and histograms are exported only once it has seen a request, as
//! in Knative's activator, whose views record nothing for a revision without traffic: with
//! them made up front, 10 000 mostly idle revisions exported 43 MB per scrape from every
//! activator. The gauges (waiting, in flight, ready pods, capacity) are a few lines per
//! revision and are there for every revision, so that a dashboard sees the pods of a
//! revision that had no request yet.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::revision::RevisionId;

/// `response_code_class` label values, in the order they are exported.
const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "other"];

/// Request latency bucket bounds in µs; exported in milliseconds (Knative's unit).
const LATENCY_BOUNDS_US: [u64; 15] = [
    1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000, 10_000_000, 30_000_000, 60_000_000,
];

/// Cold-start waits are longer: from a few ms (warm process) to minutes (image pulls).
/// Bounds in µs, exported in seconds, Prometheus's base unit: this histogram is Thaw's
/// own, so it follows the conventions, while the request latencies keep the milliseconds
/// of Knative's names.
const COLD_START_BOUNDS_US: [u64; 14] = [
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    30_000_000,
    60_000_000,
    120_000_000,
];

/// One revision's metrics: shared by every version of its settings, dropped with it.
#[derive(Debug, Clone)]
pub struct RevisionMetrics {
    inner: Arc<Series>,
}

/// One revision's counters. `repr(C)` keeps what every response touches (the class
/// counters, the latency count and sum) in the first cache line.
#[derive(Debug)]
#[repr(C, align(64))]
struct Series {
    by_class: [AtomicU64; 6],
    latency: Histogram<15>,
    rejected: AtomicU64,
    cold_start: Histogram<14>,
    id: RevisionId,
}

/// A histogram of durations: per-bucket (not cumulative) counts, then an overflow count
/// implied by `count`.
#[derive(Debug)]
#[repr(C)]
struct Histogram<const N: usize> {
    /// Observations, added last (`Release`), so that a scrape that reads it first
    /// (`Acquire`) sees every bucket add it counts.
    count: AtomicU64,
    /// The sum of the observations in µs (`u64` µs overflow after 580 000 years).
    sum_us: AtomicU64,
    buckets: [AtomicU64; N],
}

impl<const N: usize> Histogram<N> {
    fn new() -> Self {
        Self {
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    fn observe(&self, bounds_us: &[u64; N], value: Duration) {
        // Compared in ns, so that a value a fraction of a µs above a bound is above it.
        let ns = u64::try_from(value.as_nanos()).unwrap_or(u64::MAX);
        if let Some(i) = bounds_us.iter().position(|&b| ns <= b.saturating_mul(1000)) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_us.fetch_add(ns / 1000, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Release);
    }

    /// Cumulative bucket counts, each at most `count`, with `count` and the sum in µs.
    /// Read while requests record, a bucket may already hold an observation `count` does
    /// not yet show; capping keeps the buckets rising and within `+Inf`, as Prometheus
    /// requires, and the next scrape counts it.
    fn snapshot(&self) -> ([u64; N], u64, u64) {
        let count = self.count.load(Ordering::Acquire);
        let mut cumulative = 0u64;
        let buckets = std::array::from_fn(|i| {
            cumulative = cumulative.saturating_add(self.buckets[i].load(Ordering::Relaxed));
            cumulative.min(count)
        });
        (buckets, count, self.sum_us.load(Ordering::Relaxed))
    }
}

impl RevisionMetrics {
    pub fn new(id: &RevisionId) -> Self {
        Self {
            inner: Arc::new(Series {
                by_class: std::array::from_fn(|_| AtomicU64::new(0)),
                latency: Histogram::new(),
                rejected: AtomicU64::new(0),
                cold_start: Histogram::new(),
                id: id.clone(),
            }),
        }
    }

    pub fn response(&self, status: http::StatusCode, elapsed: Duration) {
        let class = (status.as_u16() / 100) as usize;
        let index = if (1..=5).contains(&class) {
            class - 1
        } else {
            5
        };
        let s = &self.inner;
        s.by_class[index].fetch_add(1, Ordering::Relaxed);
        s.latency.observe(&LATENCY_BOUNDS_US, elapsed);
    }

    pub fn cold_start(&self, waited: Duration) {
        self.inner.cold_start.observe(&COLD_START_BOUNDS_US, waited);
    }

    pub fn rejected(&self) {
        self.inner.rejected.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether the revision has seen a request, so that its series are exported.
    fn seen(&self) -> bool {
        let s = &self.inner;
        s.latency.count.load(Ordering::Relaxed) > 0
            || s.rejected.load(Ordering::Relaxed) > 0
            || s.cold_start.count.load(Ordering::Relaxed) > 0
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

/// One scrape: its revisions, sorted so the output is stable between scrapes, and the text.
struct Scrape<'a> {
    revisions: Vec<(&'a RevisionMetrics, RevisionGauges)>,
    out: String,
}

/// Text exposition of the given revisions (the registry's, at scrape time). Families in
/// name order, each with its `HELP` and `TYPE` once and only when it has a sample; in a
/// family, revisions by namespace and name.
pub fn render<'a>(
    revisions: impl Iterator<Item = (&'a RevisionMetrics, RevisionGauges)>,
) -> Vec<u8> {
    let mut revisions: Vec<_> = revisions.collect();
    revisions.sort_unstable_by(|a, b| a.0.inner.id.cmp(&b.0.inner.id));
    let mut scrape = Scrape {
        out: String::with_capacity(256 * revisions.len() + 1024),
        revisions,
    };
    scrape.gauge(
        "activator_capacity",
        "Requests this activator may send the revision's pods at once: its subset of the pods \
         times its share of their container concurrency (absent for CC = 0)",
        |g| g.capacity,
    );
    scrape.histogram(
        "activator_cold_start_wait_seconds",
        "Time a request waited for the revision's first ready pod, in seconds",
        |s| &s.cold_start,
        &COLD_START_BOUNDS_US,
        1_000_000.0,
    );
    scrape.gauge(
        "activator_ready_pods",
        "Pods that passed the activator's probe",
        |g| Some(g.ready_pods),
    );
    scrape.request_count();
    scrape.histogram(
        "activator_request_latencies",
        "Time from arrival to the end of the response, in milliseconds",
        |s| &s.latency,
        &LATENCY_BOUNDS_US,
        1_000.0,
    );
    scrape.gauge(
        "activator_requests_in_flight",
        "Requests sent to a pod and not finished",
        |g| Some(g.in_flight),
    );
    scrape.gauge(
        "activator_requests_waiting",
        "Requests waiting for a pod with a free slot",
        |g| Some(g.waiting),
    );
    scrape.counter(
        "activator_throttler_rejected_total",
        "Requests refused with 503 because the revision's wait queue or byte budget was full",
        |s| s.rejected.load(Ordering::Relaxed),
    );
    scrape.out.into_bytes()
}

impl Scrape<'_> {
    /// A family's `HELP` and `TYPE`, written before its first sample.
    fn header(out: &mut String, name: &str, help: &str, kind: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// `name{namespace_name="…",revision_name="…"` without the closing brace.
    fn open(out: &mut String, name: &str, suffix: &str, id: &RevisionId) {
        out.push_str(name);
        out.push_str(suffix);
        out.push_str("{namespace_name=\"");
        escape_into(out, &id.namespace);
        out.push_str("\",revision_name=\"");
        escape_into(out, &id.name);
        out.push('"');
    }

    /// One family: its `HELP` and `TYPE`, then `write` for each revision; nothing at all
    /// when no revision wrote a sample.
    fn family(
        &mut self,
        name: &str,
        help: &str,
        kind: &str,
        mut write: impl FnMut(&mut String, &RevisionMetrics, &RevisionGauges),
    ) {
        let Scrape { revisions, out } = self;
        let start = out.len();
        Self::header(out, name, help, kind);
        let samples_start = out.len();
        for (m, g) in revisions.iter() {
            write(out, m, g);
        }
        if out.len() == samples_start {
            out.truncate(start);
        }
    }

    fn gauge(&mut self, name: &str, help: &str, value: impl Fn(&RevisionGauges) -> Option<usize>) {
        self.family(name, help, "gauge", |out, m, g| {
            if let Some(v) = value(g) {
                Self::open(out, name, "", &m.inner.id);
                let _ = writeln!(out, "}} {v}");
            }
        });
    }

    fn counter(&mut self, name: &str, help: &str, value: impl Fn(&Series) -> u64) {
        self.family(name, help, "counter", |out, m, _| {
            if m.seen() {
                Self::open(out, name, "", &m.inner.id);
                let _ = writeln!(out, "}} {}", value(&m.inner));
            }
        });
    }

    /// `activator_request_count`: its class label sorts between the namespace and the
    /// revision, where prometheus' encoder put it.
    fn request_count(&mut self) {
        const NAME: &str = "activator_request_count";
        let help = "Requests answered, by response code class";
        self.family(NAME, help, "counter", |out, m, _| {
            if !m.seen() {
                return;
            }
            let id = &m.inner.id;
            for (class, n) in CLASSES.iter().zip(&m.inner.by_class) {
                out.push_str(NAME);
                out.push_str("{namespace_name=\"");
                escape_into(out, &id.namespace);
                let _ = write!(out, "\",response_code_class=\"{class}\",revision_name=\"");
                escape_into(out, &id.name);
                let _ = writeln!(out, "\"}} {}", n.load(Ordering::Relaxed));
            }
        });
    }

    /// A histogram family; `per_unit` converts the µs of the bounds and the sum into the
    /// exported unit.
    fn histogram<const N: usize>(
        &mut self,
        name: &str,
        help: &str,
        which: impl Fn(&Series) -> &Histogram<N>,
        bounds_us: &[u64; N],
        per_unit: f64,
    ) {
        self.family(name, help, "histogram", |out, m, _| {
            if !m.seen() {
                return;
            }
            let (buckets, count, sum_us) = which(&m.inner).snapshot();
            let id = &m.inner.id;
            for (bound, n) in bounds_us.iter().zip(buckets) {
                Self::open(out, name, "_bucket", id);
                let _ = writeln!(out, ",le=\"{}\"}} {n}", *bound as f64 / per_unit);
            }
            Self::open(out, name, "_bucket", id);
            let _ = writeln!(out, ",le=\"+Inf\"}} {count}");
            Self::open(out, name, "_sum", id);
            let _ = writeln!(out, "}} {}", sum_us as f64 / per_unit);
            Self::open(out, name, "_count", id);
            let _ = writeln!(out, "}} {count}");
        });
    }
}

/// A label value as the text format wants it: `\`, `"` and newlines escaped.
fn escape_into(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
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

    fn text(revisions: &[(&RevisionMetrics, usize)]) -> String {
        let body = render(revisions.iter().map(|(r, ready)| (*r, gauges(*ready))));
        String::from_utf8(body).unwrap()
    }

    #[test]
    fn an_idle_revision_has_only_its_gauges_until_its_first_request() {
        let idle = RevisionMetrics::new(&RevisionId::new("ns", "idle"));
        let busy = RevisionMetrics::new(&RevisionId::new("ns", "busy"));
        let t = text(&[(&idle, 2), (&busy, 0)]);
        assert!(
            t.contains(r#"activator_ready_pods{namespace_name="ns",revision_name="idle"} 2"#),
            "{t}"
        );
        assert!(!t.contains("activator_request_count"), "{t}");
        assert!(!t.contains("activator_request_latencies"), "{t}");
        assert!(!t.contains("activator_cold_start_wait_seconds"), "{t}");

        busy.response(http::StatusCode::OK, Duration::from_millis(3));
        let t = text(&[(&idle, 2), (&busy, 0)]);
        assert!(t.contains(r#"activator_request_count{namespace_name="ns",response_code_class="2xx",revision_name="busy"} 1"#), "{t}");
        assert!(
            t.contains(
                r#"activator_request_latencies_count{namespace_name="ns",revision_name="busy"} 1"#
            ),
            "{t}"
        );
        assert!(!t.contains(r#"revision_name="idle",le="#), "{t}");
        assert!(
            !t.contains(r#"response_code_class="2xx",revision_name="idle""#),
            "{t}"
        );
    }

    /// The whole exposition of one revision, line for line as prometheus' text encoder
    /// wrote it before this module wrote its own (the names, label order, bucket bounds
    /// and number formats dashboards and Knative's tooling read).
    #[test]
    fn the_text_is_what_prometheus_wrote() {
        let r = RevisionMetrics::new(&RevisionId::new("default", "hello-00001"));
        r.response(http::StatusCode::OK, Duration::from_micros(1_500));
        r.response(http::StatusCode::OK, Duration::from_millis(1));
        r.response(
            http::StatusCode::SERVICE_UNAVAILABLE,
            Duration::from_secs(90),
        );
        r.rejected();
        r.cold_start(Duration::from_millis(7));
        let body = render(std::iter::once((
            &r,
            RevisionGauges {
                waiting: 3,
                in_flight: 1,
                ready_pods: 2,
                capacity: Some(20),
            },
        )));
        let got = String::from_utf8(body).unwrap();
        let want = include_str!("../tests/data/metrics-one-revision.txt");
        assert_eq!(got, want);
    }

    #[test]
    fn a_scrape_names_only_the_revisions_it_is_given_sorted() {
        let b = RevisionMetrics::new(&RevisionId::new("ns", "b"));
        let a = RevisionMetrics::new(&RevisionId::new("ns", "a"));
        let gone = RevisionMetrics::new(&RevisionId::new("ns", "gone"));
        for r in [&a, &b, &gone] {
            r.response(http::StatusCode::OK, Duration::from_millis(1));
        }
        let t = text(&[(&b, 1), (&a, 1)]);
        assert!(
            !t.contains("gone"),
            "a removed revision is not scraped: {t}"
        );
        let a_at = t.find(r#"revision_name="a""#).unwrap();
        let b_at = t.find(r#"revision_name="b""#).unwrap();
        assert!(a_at < b_at, "{t}");
        assert_eq!(text(&[]), "", "no revisions, no families");
    }

    #[test]
    fn label_values_are_escaped() {
        let odd = RevisionMetrics::new(&RevisionId::new("n\"s", "a\\b\nc"));
        let t = text(&[(&odd, 1)]);
        assert!(
            t.contains(r#"activator_ready_pods{namespace_name="n\"s",revision_name="a\\b\nc"} 1"#),
            "{t}"
        );
    }

    #[test]
    fn buckets_are_cumulative_and_bounds_inclusive() {
        let h = Histogram::<3>::new();
        let bounds = [1_000, 2_000, 3_000];
        h.observe(&bounds, Duration::from_micros(1_000));
        h.observe(&bounds, Duration::from_nanos(1_000_001));
        h.observe(&bounds, Duration::from_micros(2_500));
        h.observe(&bounds, Duration::from_secs(u64::MAX));
        let (buckets, count, _) = h.snapshot();
        assert_eq!(buckets, [1, 2, 3]);
        assert_eq!(count, 4);
    }
}
