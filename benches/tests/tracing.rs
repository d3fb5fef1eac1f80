//! Tracing end to end: a real OpenTelemetry Collector (built from its Go modules by
//! `benches/testbed/build-otelcol.sh`) receives the spans of a traced request through
//! the activator and the local platform's queue-proxy, and its file exporter's JSON shows
//! them parented correctly, with the revision. Also: trace headers pass untouched with
//! tracing off, bad settings are one line and exit 64, and an unreachable collector never
//! slows a request and is logged once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::Value;
use thaw_benches::harness::*;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn traceparent() -> String {
    format!("00-{TRACE_ID}-{CLIENT_SPAN}-01")
}

/// The collector build-otelcol.sh makes, or a clear failure saying how to get it.
fn otelcol() -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let go_mod = std::fs::read_to_string(repo.join("benches/testbed/otelcol/go.mod")).unwrap();
    let version = go_mod
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("go.opentelemetry.io/collector/otelcol ")
        })
        .next()
        .expect("otelcol version in go.mod")
        .trim()
        .to_owned();
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or(repo.join("target"), PathBuf::from);
    let bin = target.join(format!("testbed/otelcol-{version}/otelcol"));
    assert!(
        bin.exists(),
        "the OpenTelemetry Collector is not built ({} is missing): run benches/testbed/build-otelcol.sh",
        bin.display()
    );
    bin
}

/// A running collector: OTLP/HTTP on a free loopback port, spans to a JSON-lines file.
struct Collector {
    endpoint: String,
    output: PathBuf,
    dir: PathBuf,
    _process: tokio::process::Child,
}

impl Collector {
    async fn start() -> Collector {
        let bin = otelcol();
        let dir = std::env::temp_dir().join(format!("thaw-otelcol-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let output = dir.join("spans.json");
        let config = dir.join("config.yaml");
        // The collector's own metrics are off: their default :8888 would collide with
        // anything else on the machine.
        std::fs::write(
            &config,
            format!(
                "receivers:\n  otlp:\n    protocols:\n      http:\n        endpoint: 127.0.0.1:{port}\n\
                 exporters:\n  file:\n    path: {}\n    flush_interval: 100ms\n\
                 service:\n  telemetry:\n    metrics:\n      level: none\n  \
                 pipelines:\n    traces:\n      receivers: [otlp]\n      exporters: [file]\n",
                output.display()
            ),
        )
        .unwrap();
        let process = child(&bin)
            .arg("--config")
            .arg(format!("file:{}", config.display()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        eventually("the collector listens", || async move {
            tokio::net::TcpStream::connect(addr).await.is_ok()
        })
        .await;
        Collector {
            endpoint: format!("http://127.0.0.1:{port}"),
            output,
            dir,
            _process: process,
        }
    }

    /// Every span exported so far, flattened with its resource's `service.name`.
    fn spans(&self) -> Vec<Span> {
        let text = std::fs::read_to_string(&self.output).unwrap_or_default();
        let mut out = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            for rs in v["resourceSpans"].as_array().into_iter().flatten() {
                let service = attrs(&rs["resource"]["attributes"])
                    .remove("service.name")
                    .unwrap_or_default();
                for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                    for s in ss["spans"].as_array().into_iter().flatten() {
                        out.push(Span {
                            service: service.clone(),
                            name: s["name"].as_str().unwrap_or("").to_owned(),
                            kind: s["kind"].as_i64().unwrap_or(0),
                            trace_id: s["traceId"].as_str().unwrap_or("").to_owned(),
                            span_id: s["spanId"].as_str().unwrap_or("").to_owned(),
                            parent: s["parentSpanId"].as_str().unwrap_or("").to_owned(),
                            attrs: attrs(&s["attributes"]),
                        });
                    }
                }
            }
        }
        out
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[derive(Debug, Clone)]
struct Span {
    service: String,
    name: String,
    kind: i64,
    trace_id: String,
    span_id: String,
    parent: String,
    attrs: HashMap<String, String>,
}

/// OTLP JSON attributes as strings (ints arrive as strings, bools as JSON booleans).
fn attrs(list: &Value) -> HashMap<String, String> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| {
            let key = a["key"].as_str()?.to_owned();
            let v = &a["value"];
            let value = v["stringValue"]
                .as_str()
                .map(str::to_owned)
                .or_else(|| v["intValue"].as_str().map(str::to_owned))
                .or_else(|| v["intValue"].as_i64().map(|i| i.to_string()))
                .or_else(|| v["boolValue"].as_bool().map(|b| b.to_string()))?;
            Some((key, value))
        })
        .collect()
}

/// A revision of the test app with CC=1, so the queue-proxy has a breaker to wait in.
fn config() -> String {
    format!(
        "revisions:\n  - name: traced\n    hosts: [traced.local]\n    command: [{app:?}]\n    containerConcurrency: 1\n    timeoutSeconds: 30\n",
        app = bin("thaw-testapp").display().to_string(),
    )
}

const FLAGS: &[&str] = &["--pod-quiet-period", "300ms", "--drain-period", "1s"];

async fn traced_get(act: &Activator, extra: &[(&str, &str)]) -> (StatusCode, Value) {
    let tp = traceparent();
    let mut headers = vec![
        ("Host", "traced.local"),
        ("traceparent", tp.as_str()),
        ("tracestate", "vendor=opaque"),
    ];
    headers.extend_from_slice(extra);
    let (status, _, body) = get_with(&act.url("/headers"), &headers).await;
    let seen = serde_json::from_slice(&body).unwrap_or(Value::Null);
    (status, seen)
}

/// A header as the test app's `/headers` saw it.
fn header(seen: &Value, name: &str) -> String {
    seen["headers"][name][0].as_str().unwrap_or("").to_owned()
}

#[tokio::test]
async fn spans_reach_a_real_collector_parented_across_both_proxies() {
    let collector = Collector::start().await;
    let mut flags = FLAGS.to_vec();
    flags.extend(["--tracing-endpoint", &collector.endpoint]);
    let act = Activator::start_with_env(
        &config(),
        &flags,
        // Exports every 100 ms instead of 5 s, for the activator and its queue-proxies.
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    )
    .await;
    let started = Instant::now();
    let (status, seen) = traced_get(&act, &[]).await;
    assert_eq!(status, StatusCode::OK, "{seen}");
    // The app's parent is the queue-proxy's span, in the client's trace.
    let app_tp = header(&seen, "traceparent");
    let parts: Vec<&str> = app_tp.split('-').collect();
    assert_eq!(parts.len(), 4, "traceparent at the app: {app_tp:?}");
    assert_eq!(parts[1], TRACE_ID, "the client's trace goes on: {app_tp}");
    assert_ne!(
        parts[2], CLIENT_SPAN,
        "a proxy's span is the app's parent: {app_tp}"
    );
    assert_eq!(parts[3], "01", "sampled");
    assert_eq!(header(&seen, "tracestate"), "vendor=opaque");

    let names = ["activator", "throttler_try", "queue", "kn.queueproxy.wait"];
    let complete = |spans: &[Span]| {
        names
            .iter()
            .all(|n| spans.iter().any(|s| s.name == *n && s.trace_id == TRACE_ID))
    };
    eventually("all four spans are exported", || {
        let done = complete(&collector.spans());
        async move { done }
    })
    .await;
    let spans = collector.spans();
    let one = |name: &str| {
        let found: Vec<&Span> = spans
            .iter()
            .filter(|s| s.name == name && s.trace_id == TRACE_ID)
            .collect();
        assert_eq!(found.len(), 1, "one {name} span: {spans:#?}");
        found[0].clone()
    };
    let activator = one("activator");
    let wait = one("throttler_try");
    let queue = one("queue");
    let breaker = one("kn.queueproxy.wait");

    // SPAN_KIND_SERVER is 2, SPAN_KIND_INTERNAL 1.
    assert_eq!((activator.kind, queue.kind), (2, 2));
    assert_eq!((wait.kind, breaker.kind), (1, 1));
    assert_eq!(
        activator.parent, CLIENT_SPAN,
        "the client's traceparent is the parent"
    );
    assert_eq!(wait.parent, activator.span_id);
    assert_eq!(
        queue.parent, activator.span_id,
        "the activator's traceparent reached the queue-proxy"
    );
    assert_eq!(breaker.parent, queue.span_id);
    assert_eq!(
        parts[2], queue.span_id,
        "the app's parent is the queue-proxy's span"
    );
    assert_eq!(wait.attrs["thaw.cold_start"], "true", "{wait:?}");

    assert_eq!(activator.service, "activator");
    assert_eq!(
        queue.service, "traced",
        "the queue-proxy is named after the configuration"
    );
    for s in [&activator, &queue] {
        assert_eq!(s.attrs["kn.revision.name"], "traced", "{s:?}");
        assert_eq!(s.attrs["k8s.namespace.name"], "default", "{s:?}");
        assert_eq!(s.attrs["http.request.method"], "GET", "{s:?}");
        assert_eq!(s.attrs["url.path"], "/headers", "{s:?}");
        assert_eq!(s.attrs["http.response.status_code"], "200", "{s:?}");
    }
    eprintln!(
        "traced cold request and its spans in {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn with_tracing_off_trace_headers_pass_untouched() {
    let act = Activator::start(&config(), FLAGS).await;
    let (status, seen) = traced_get(&act, &[]).await;
    assert_eq!(status, StatusCode::OK, "{seen}");
    assert_eq!(header(&seen, "traceparent"), traceparent(), "{seen}");
    assert_eq!(header(&seen, "tracestate"), "vendor=opaque");
}

#[tokio::test]
async fn an_unreachable_collector_slows_nothing_and_is_logged_once() {
    let mut flags = FLAGS.to_vec();
    let endpoint = format!("http://127.0.0.1:{}", closed_port());
    flags.extend(["--tracing-endpoint", &endpoint]);
    let act =
        Activator::start_with_env(&config(), &flags, &[("OTEL_BSP_SCHEDULE_DELAY", "20")]).await;
    let (status, _) = traced_get(&act, &[]).await;
    assert_eq!(status, StatusCode::OK);
    // Warm requests over a second: many failed exports in one episode.
    let until = Instant::now() + Duration::from_secs(1);
    let mut slowest = Duration::ZERO;
    let mut n = 0;
    while Instant::now() < until {
        let t = Instant::now();
        let (status, _) = traced_get(&act, &[]).await;
        assert_eq!(status, StatusCode::OK);
        slowest = slowest.max(t.elapsed());
        n += 1;
    }
    assert!(n >= 20, "only {n} requests in a second");
    assert!(
        slowest < Duration::from_millis(500),
        "a request took {slowest:?}"
    );
    // Once by the activator, and once by the pod's queue-proxy (relayed with its name).
    let warned = |act: &Activator, from_pod: bool| {
        act.logs()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| {
                v["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("cannot export spans to the tracing collector"))
                    && v.get("pod").is_some() == from_pod
            })
            .count()
    };
    eventually("both failed exports are logged", || async {
        warned(&act, false) >= 1 && warned(&act, true) >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(warned(&act, false), 1, "{:#?}", act.logs());
    assert_eq!(warned(&act, true), 1, "{:#?}", act.logs());
}

#[tokio::test]
async fn bad_tracing_flags_are_one_line_and_exit_64() {
    for (args, expected) in [
        (
            vec!["--tracing-endpoint", "http://[::1"],
            "activator: --tracing-endpoint: \"http://[::1\" is not an http:// URL",
        ),
        (
            vec![
                "--tracing-endpoint",
                "http://127.0.0.1:4318",
                "--tracing-sampling-rate",
                "1.5",
            ],
            "activator: --tracing-sampling-rate: expected a number from 0 to 1, got \"1.5\"",
        ),
        (
            vec!["--tracing-protocol", "zipkin"],
            "activator: --tracing-protocol: unknown protocol \"zipkin\"",
        ),
    ] {
        let out = child(bin("activator"))
            .args(["--platform", "local"])
            .args(&args)
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with(expected), "{args:?}: {stderr}");
    }
}

#[tokio::test]
async fn bad_observability_config_stops_the_queue_proxy_with_64() {
    for (json, expected) in [
        (
            r#"{"tracing": {"protocol": "http/protobuf", "endpoint": "http://c:4318", "samplingRate": 2}}"#,
            "queue-proxy: OBSERVABILITY_CONFIG: tracing.samplingRate: expected a number from 0 to 1, got \"2\"",
        ),
        (
            r#"{"tracing": {"protocol": "jaeger"}}"#,
            "queue-proxy: OBSERVABILITY_CONFIG: tracing.protocol: unknown protocol \"jaeger\"",
        ),
        (
            r#"{"tracing": {"protocol": "http/protobuf", "endpoint": "ftp://c"}}"#,
            "queue-proxy: OBSERVABILITY_CONFIG: tracing.endpoint: \"ftp://c\" is not an http:// URL",
        ),
    ] {
        let mut env = knative_env(closed_port());
        env.insert("OBSERVABILITY_CONFIG".to_owned(), json.to_owned());
        let out = child(bin("queue-proxy"))
            .env_clear()
            .envs(&env)
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{json}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{json}: {stderr}");
        assert!(stderr.starts_with(expected), "{json}: {stderr}");
    }
}
