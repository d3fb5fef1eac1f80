//! A real Prometheus (Debian's) scrapes the activator and the local platform's pods on
//! every port they serve metrics on, while the test puts counted load through them; PromQL
//! over its HTTP API must agree with what the load generator counted, and `promtool check
//! metrics` must find nothing unexplained on any endpoint.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use thaw_benches::harness::*;
use thaw_benches::promtools::{self, Prometheus};

/// What the load generator saw, per target: responses by code class, client-side
/// latencies, and the `Thaw-Cold-Start` values.
#[derive(Default, Debug)]
struct Tally {
    classes: BTreeMap<(&'static str, &'static str), u64>,
    latencies_ms: BTreeMap<&'static str, Vec<f64>>,
    cold_start_ms: Vec<u64>,
    statuses: BTreeMap<(&'static str, u16), u64>,
}

impl Tally {
    fn class(&self, target: &'static str, class: &'static str) -> u64 {
        self.classes.get(&(target, class)).copied().unwrap_or(0)
    }
    fn total(&self, target: &'static str) -> u64 {
        self.classes
            .iter()
            .filter(|((t, _), _)| *t == target)
            .map(|(_, n)| n)
            .sum()
    }
    fn status(&self, target: &'static str, code: u16) -> u64 {
        self.statuses.get(&(target, code)).copied().unwrap_or(0)
    }
}

fn class_of(status: StatusCode) -> &'static str {
    ["1xx", "2xx", "3xx", "4xx", "5xx"]
        .get(usize::from(status.as_u16() / 100).wrapping_sub(1))
        .copied()
        .unwrap_or("other")
}

/// Sends one request and counts its answer under `target`.
async fn call(
    tally: &Arc<Mutex<Tally>>,
    client: &HttpClient,
    target: &'static str,
    url: &str,
    host: &str,
) -> StatusCode {
    let req = Request::get(url)
        .header("host", host)
        .body(Full::<Bytes>::default())
        .unwrap();
    let started = Instant::now();
    let (status, headers, _) = send(client, req).await;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    let mut t = tally.lock().unwrap();
    *t.classes.entry((target, class_of(status))).or_default() += 1;
    *t.statuses.entry((target, status.as_u16())).or_default() += 1;
    t.latencies_ms.entry(target).or_default().push(ms);
    if let Some(v) = headers.get("thaw-cold-start") {
        t.cold_start_ms.push(v.to_str().unwrap().parse().unwrap());
    }
    status
}

/// A pod's ports from the activator's "pod started" line.
#[derive(Debug, Clone, Copy)]
struct PodPorts {
    serving: SocketAddr,
    metrics: SocketAddr,
    user_metrics: SocketAddr,
}

fn pod_ports(act: &Activator, pod: &str) -> Option<PodPorts> {
    act.logs()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "pod started" && v["pod"] == pod)
        .map(|v| {
            let serving: SocketAddr = v["serving"].as_str().unwrap().parse().unwrap();
            let user_port = v["user_metrics"].as_u64().unwrap();
            PodPorts {
                serving,
                metrics: v["metrics"].as_str().unwrap().parse().unwrap(),
                user_metrics: SocketAddr::new(serving.ip(), u16::try_from(user_port).unwrap()),
            }
        })
}

/// The upper bound of the histogram bucket holding `v`, given the bucket bounds.
fn bucket_upper(bounds: &[f64], v: f64) -> f64 {
    bounds
        .iter()
        .copied()
        .find(|b| v <= *b)
        .unwrap_or(f64::INFINITY)
}

/// The lower bound of the histogram bucket holding `v`.
fn bucket_lower(bounds: &[f64], v: f64) -> f64 {
    bounds.iter().copied().rfind(|b| *b < v).unwrap_or(0.0)
}

/// The finite `le` bounds of a histogram, read from Prometheus.
async fn bounds(prom: &Prometheus, bucket_metric: &str) -> Vec<f64> {
    let mut bounds: Vec<f64> = prom
        .query(&format!("max by (le) ({bucket_metric})"))
        .await
        .iter()
        .filter_map(|s| s.labels["le"].parse::<f64>().ok())
        .filter(|b| b.is_finite())
        .collect();
    bounds.sort_by(f64::total_cmp);
    assert!(bounds.len() > 5, "{bucket_metric}: {bounds:?}");
    bounds
}

/// Knative's own metric names, kept for wire compatibility with dashboards built for
/// Knative's data plane; promtool's suffix lint fires on them and the README explains it.
const KNATIVE_NAMES: [&str; 2] = ["revision_request_count", "activator_request_count"];

/// Every lint problem promtool reports on `exposition` is on one of Knative's names.
fn assert_promtool_clean(what: &str, exposition: &str) {
    let problems = promtools::check_metrics(exposition);
    for (name, problem) in &problems {
        assert!(
            KNATIVE_NAMES.contains(&name.as_str()),
            "promtool check metrics on {what}: {name} {problem}"
        );
    }
}

#[tokio::test]
async fn prometheus_scrapes_both_binaries_and_agrees_with_the_load_generator() {
    let test_started = Instant::now();
    let app = bin("thaw-testapp").display().to_string();
    // Windows long enough that no pod scales away during the test; one pod per revision
    // (maxScale 1), so each revision's requests meet exactly one queue-proxy.
    let yaml = format!(
        "revisions:
  - name: hello
    hosts: [hello.local]
    command: [{app:?}]
    containerConcurrency: 4
    maxScale: 1
    stableWindow: 60s
    scaleToZeroGracePeriod: 60s
    timeoutSeconds: 30
  - name: slow
    hosts: [slow.local]
    command: [{app:?}]
    containerConcurrency: 1
    maxScale: 1
    stableWindow: 60s
    scaleToZeroGracePeriod: 60s
    timeoutSeconds: 30
"
    );
    // At most 4 requests may wait per revision, so a few more than that get the
    // throttler's 503 without needing thousands of requests.
    let act = Activator::start(
        &yaml,
        &[
            "--max-waiting",
            "4",
            "--pod-quiet-period",
            "300ms",
            "--drain-period",
            "1s",
        ],
    )
    .await;

    // Both forms of the queue-proxy's :9090 are scraped: Prometheus asks for text (its
    // Accept has no application/protobuf), so it gets the autoscaler figures as text.
    let prom = Prometheus::start(&format!(
        "  - job_name: activator
    static_configs: [{{targets: ['{}']}}]
  - job_name: queue-proxy
    file_sd_configs: [{{files: ['{{dir}}/user.json'], refresh_interval: 1s}}]
  - job_name: queue-proxy-autoscaler
    file_sd_configs: [{{files: ['{{dir}}/stat.json'], refresh_interval: 1s}}]
",
        act.metrics
    ))
    .await;
    prom.write_targets("user.json", &[]);
    prom.write_targets("stat.json", &[]);
    prom.targets_up("activator", 1).await;

    let tally = Arc::new(Mutex::new(Tally::default()));
    let client = http1_client();

    // Phase 1: cold starts. Three requests wait together for hello's first pod, one for
    // slow's.
    let mut cold = Vec::new();
    for (target, host) in [
        ("hello", "hello.local"),
        ("hello", "hello.local"),
        ("hello", "hello.local"),
        ("slow", "slow.local"),
    ] {
        let (tally, client, url) = (Arc::clone(&tally), client.clone(), act.url("/"));
        cold.push(tokio::spawn(async move {
            call(&tally, &client, target, &url, host).await
        }));
    }
    for c in cold {
        assert_eq!(c.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(
        tally.lock().unwrap().cold_start_ms.len(),
        4,
        "every request that waited for a first pod says so"
    );

    let hello = pod_ports(&act, "hello-1").expect("hello's pod was logged");
    let slow = pod_ports(&act, "slow-1").expect("slow's pod was logged");
    prom.write_targets("user.json", &[hello.user_metrics, slow.user_metrics]);
    prom.write_targets("stat.json", &[hello.metrics, slow.metrics]);
    prom.targets_up("queue-proxy", 2).await;
    prom.targets_up("queue-proxy-autoscaler", 2).await;

    // Phase 2: mixed load on hello through the activator, three workers (under hello's
    // CC of 4, so none waits): successes, slow successes (300 ms, for the p99), the
    // app's 404s and 500s, and connections the app drops (the queue-proxy's 502).
    let mut workers = Vec::new();
    for _ in 0..3 {
        let (tally, client, act_url) = (Arc::clone(&tally), client.clone(), act.url(""));
        workers.push(tokio::spawn(async move {
            for i in 0..50 {
                let path = match i % 25 {
                    3 | 15 => "/delay?ms=300",
                    5 | 11 => "/no-such-path",
                    7 => "/status?code=500",
                    9 => "/status?code=201",
                    20 => "/close",
                    _ => "/",
                };
                call(
                    &tally,
                    &client,
                    "hello",
                    &format!("{act_url}{path}"),
                    "hello.local",
                )
                .await;
            }
        }));
    }
    // Unknown hosts: 404 from the activator, in no revision's series.
    for _ in 0..5 {
        let s = call(&tally, &client, "unknown", &act.url("/"), "nobody.local").await;
        assert_eq!(s, StatusCode::NOT_FOUND);
    }
    for w in workers {
        w.await.unwrap();
    }

    // Phase 3: slow's one slot (CC=1) is held for 10 s; while it is held, 6 requests go
    // through the activator (4 wait, the 2 over --max-waiting get 503) and 12 go straight
    // to the pod's queue-proxy (10 queue in its breaker, 10 × CC; 2 get 503 queue full).
    let hold = {
        let (tally, client, url) = (
            Arc::clone(&tally),
            client.clone(),
            act.url("/delay?ms=10000"),
        );
        tokio::spawn(async move { call(&tally, &client, "slow", &url, "slow.local").await })
    };
    eventually("the holder is in flight", || async {
        metric_value(
            &act.metrics_text().await,
            "activator_requests_in_flight",
            "revision_name=\"slow\"",
        ) == 1.0
    })
    .await;
    let mut parked = Vec::new();
    for _ in 0..6 {
        let (tally, client, url) = (Arc::clone(&tally), client.clone(), act.url("/"));
        parked.push(tokio::spawn(async move {
            call(&tally, &client, "slow", &url, "slow.local").await
        }));
    }
    for _ in 0..12 {
        let (tally, client) = (Arc::clone(&tally), client.clone());
        let url = format!("http://{}/", slow.serving);
        parked.push(tokio::spawn(async move {
            call(&tally, &client, "direct", &url, "slow.local").await
        }));
    }
    // While they are held, the gauges as Prometheus scraped them.
    let slow_rev = "revision_name=\"slow\"";
    for (query, want) in [
        (
            format!("sum(activator_requests_waiting{{{slow_rev}}})"),
            4.0,
        ),
        (
            format!("sum(activator_requests_in_flight{{{slow_rev}}})"),
            1.0,
        ),
        (format!("sum(revision_queue_depth{{{slow_rev}}})"), 10.0),
        // Inside the queue-proxy: the one proxied and the ten queued.
        (
            format!("sum(revision_requests_in_flight{{{slow_rev}}})"),
            11.0,
        ),
        (format!("sum(activator_ready_pods{{{slow_rev}}})"), 1.0),
        (
            "sum(activator_ready_pods{revision_name=\"hello\"})".to_owned(),
            1.0,
        ),
        // The autoscaler endpoint's text form, averaged over a whole second of steady
        // load: 11 concurrent, 1 of them from the activator.
        (
            "sum(queue_average_concurrent_requests{destination_revision=\"slow\"})".to_owned(),
            11.0,
        ),
        (
            "sum(queue_average_proxied_concurrent_requests{destination_revision=\"slow\"})"
                .to_owned(),
            1.0,
        ),
    ] {
        // Time-weighted averages may differ from the whole number in the last digits.
        prom.eventually_near(&query, want, 1e-6).await;
    }
    for p in parked {
        p.await.unwrap();
    }
    assert_eq!(hold.await.unwrap(), StatusCode::OK);

    let t = std::mem::take(&mut *tally.lock().unwrap());
    // What the load itself must have produced, so each comparison below means something.
    assert_eq!(t.status("slow", 503), 2, "{t:?}");
    assert_eq!(t.status("direct", 503), 2, "{t:?}");
    assert_eq!(t.status("hello", 502), 6, "{t:?}");
    assert_eq!(t.status("hello", 404), 12, "{t:?}");
    assert_eq!(t.total("unknown"), 5);

    // Phase 4: the counters, once Prometheus has scraped past the end of the load.
    for (target, selector) in [
        ("hello", "revision_name=\"hello\""),
        ("slow", "revision_name=\"slow\""),
    ] {
        for class in ["1xx", "2xx", "3xx", "4xx", "5xx", "other"] {
            prom.eventually_equals(
                &format!(
                    "sum(activator_request_count{{{selector},response_code_class=\"{class}\"}})"
                ),
                t.class(target, class) as f64,
            )
            .await;
        }
        prom.eventually_equals(
            &format!("sum(activator_request_latencies_count{{{selector}}})"),
            t.total(target) as f64,
        )
        .await;
    }
    // Unknown hosts are counted nowhere: the activator's series hold only the revisions'.
    prom.eventually_equals(
        "sum(activator_request_count)",
        (t.total("hello") + t.total("slow")) as f64,
    )
    .await;
    prom.eventually_equals(
        "sum(activator_throttler_rejected_total{revision_name=\"slow\"})",
        t.status("slow", 503) as f64,
    )
    .await;
    prom.eventually_equals("sum(activator_throttler_rejected_total)", 2.0)
        .await;

    // At the pods: hello's queue-proxy saw every hello request; slow's saw slow's that
    // the activator let through plus the direct ones.
    for class in ["1xx", "2xx", "3xx", "4xx", "5xx", "other"] {
        prom.eventually_equals(
            &format!(
                "sum(revision_request_count{{revision_name=\"hello\",response_code_class=\"{class}\"}})"
            ),
            t.class("hello", class) as f64,
        )
        .await;
        let slow_at_pod = t.class("slow", class) + t.class("direct", class)
            - if class == "5xx" {
                t.status("slow", 503)
            } else {
                0
            };
        prom.eventually_equals(
            &format!(
                "sum(revision_request_count{{revision_name=\"slow\",response_code_class=\"{class}\"}})"
            ),
            slow_at_pod as f64,
        )
        .await;
    }
    prom.eventually_equals(
        "sum(revision_upstream_errors_total{revision_name=\"hello\"})",
        t.status("hello", 502) as f64,
    )
    .await;
    prom.eventually_equals(
        "sum(revision_breaker_rejected_total{revision_name=\"slow\"})",
        t.status("direct", 503) as f64,
    )
    .await;
    prom.eventually_equals(
        "sum(revision_request_latencies_count{revision_name=\"hello\"})",
        t.total("hello") as f64,
    )
    .await;

    // Request rate by code class, as a dashboard asks for it: a class with requests in
    // the last minute has a positive rate, one without has none.
    let rates = prom
        .query("sum by (response_code_class) (rate(activator_request_count{revision_name=\"hello\"}[1m]))")
        .await;
    assert_eq!(rates.len(), 6, "{rates:?}");
    for r in &rates {
        let class = r.labels["response_code_class"].as_str();
        let had = ["2xx", "4xx", "5xx"].contains(&class);
        assert_eq!(r.value > 0.0, had, "rate of {class}: {rates:?}");
    }

    // The p99 latency from the histogram. Twelve of hello's 153 requests took over 300 ms at
    // the app (more than 1 %), so the true p99 is above 300 ms and at most the slowest
    // the client saw; histogram_quantile interpolates inside the bucket holding it.
    let mut hello_ms = t.latencies_ms["hello"].clone();
    hello_ms.sort_by(f64::total_cmp);
    let slowest = *hello_ms.last().unwrap();
    for (histogram, what) in [
        ("revision_request_latencies_bucket", "queue-proxy"),
        ("activator_request_latencies_bucket", "activator"),
    ] {
        let selector = format!("{histogram}{{revision_name=\"hello\"}}");
        let b = bounds(&prom, &selector).await;
        let p99 = prom
            .value(&format!(
                "histogram_quantile(0.99, sum by (le) ({selector}))"
            ))
            .await
            .unwrap();
        let (low, high) = (bucket_lower(&b, 300.0), bucket_upper(&b, slowest));
        assert!(
            (low..=high.min(*b.last().unwrap())).contains(&p99),
            "{what} p99 {p99} ms outside [{low}, {high}] (slowest seen by the client {slowest} ms)"
        );
        let p50 = prom
            .value(&format!(
                "histogram_quantile(0.5, sum by (le) ({selector}))"
            ))
            .await
            .unwrap();
        assert!(p50 < 300.0, "{what} p50 {p50} ms: most requests are fast");
    }

    // The cold-start histogram: one observation per response that carried
    // Thaw-Cold-Start, and the header is the wait in whole milliseconds (truncated).
    let n = t.cold_start_ms.len() as f64;
    prom.eventually_equals("sum(activator_cold_start_wait_seconds_count)", n)
        .await;
    let header_sum: u64 = t.cold_start_ms.iter().sum();
    let sum_ms = prom
        .value("sum(activator_cold_start_wait_seconds_sum)")
        .await
        .unwrap()
        * 1000.0;
    assert!(
        (header_sum as f64..header_sum as f64 + n).contains(&sum_ms),
        "cold-start sum {sum_ms} ms, headers {:?}",
        t.cold_start_ms
    );
    let cold_bounds = bounds(&prom, "activator_cold_start_wait_seconds_bucket").await;
    let (min, max) = (
        *t.cold_start_ms.iter().min().unwrap() as f64 / 1000.0,
        (*t.cold_start_ms.iter().max().unwrap() + 1) as f64 / 1000.0,
    );
    for q in ["0.5", "0.99"] {
        let v = prom
            .value(&format!(
                "histogram_quantile({q}, sum by (le) (activator_cold_start_wait_seconds_bucket))"
            ))
            .await
            .unwrap();
        let (low, high) = (
            bucket_lower(&cold_bounds, min),
            bucket_upper(&cold_bounds, max),
        );
        assert!(
            (low..=high).contains(&v),
            "cold-start p{q} {v} s outside [{low}, {high}]: headers {:?}",
            t.cold_start_ms
        );
    }

    // Nothing waits or runs any more, as scraped.
    for g in [
        "sum(activator_requests_waiting)",
        "sum(activator_requests_in_flight)",
        "sum(revision_queue_depth)",
        "sum(revision_requests_in_flight)",
    ] {
        prom.eventually_equals(g, 0.0).await;
    }

    // promtool on every endpoint's text, after the load, so every series has data.
    assert_promtool_clean("the activator", &act.metrics_text().await);
    for (pod, ports) in [("hello", hello), ("slow", slow)] {
        let (_, _, user) = get(&format!("http://{}/metrics", ports.user_metrics)).await;
        assert_promtool_clean(
            &format!("{pod}'s :9091"),
            std::str::from_utf8(&user).unwrap(),
        );
        let (_, h, stat) = get(&format!("http://{}/metrics", ports.metrics)).await;
        assert!(h["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"));
        let stat = std::str::from_utf8(&stat).unwrap();
        assert!(
            stat.contains("queue_average_concurrent_requests{"),
            "{stat}"
        );
        assert_promtool_clean(&format!("{pod}'s :9090 text"), stat);
    }
    eprintln!("whole test: {:?}", test_started.elapsed());
}
