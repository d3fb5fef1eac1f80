//! Tracing end to end: a real OpenTelemetry Collector (built from its Go modules by
//! `benches/testbed/build-otelcol.sh`) receives the spans of a traced request through
//! the activator and the local platform's queue-proxy, over OTLP/HTTP and OTLP/gRPC,
//! plaintext and TLS (a CA made here, trusted through `SSL_CERT_FILE`), and its file
//! exporter's JSON shows them parented correctly, with the revision; with the `stdout`
//! protocol the same spans are JSON lines on the activator's stdout. Also: trace headers
//! pass untouched with tracing off, bad settings are one line and exit 64, and an
//! unreachable collector or one answering a gRPC error never slows a request and is
//! logged once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use thaw_benches::harness::*;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn traceparent(trace: &str) -> String {
    format!("00-{trace}-{CLIENT_SPAN}-01")
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

/// A running collector: OTLP/HTTP and OTLP/gRPC on free loopback ports, spans to a
/// JSON-lines file.
struct Collector {
    http_port: u16,
    grpc_port: u16,
    tls: bool,
    output: PathBuf,
    dir: PathBuf,
    _process: tokio::process::Child,
}

/// A scratch directory of this test binary's own (tests run in parallel in one process).
fn scratch(what: &str) -> PathBuf {
    static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("thaw-{what}-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A CA and a serving certificate for 127.0.0.1 and localhost signed by it (the
/// activator's webhook makes its certificates the same way, with rcgen), as PEM files in
/// a directory removed with it.
struct TestCa {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    dir: PathBuf,
}

impl TestCa {
    fn new() -> TestCa {
        let dir = scratch("tracing-ca");
        let names = ["localhost".to_owned(), "127.0.0.1".to_owned()];
        let bundle =
            thaw_activator::webhook::certs::Bundle::generate(&names, SystemTime::now()).unwrap();
        let ca = TestCa {
            ca: dir.join("ca.pem"),
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
            dir,
        };
        std::fs::write(&ca.ca, bundle.ca_pem.unwrap()).unwrap();
        std::fs::write(&ca.cert, bundle.cert_pem).unwrap();
        std::fs::write(&ca.key, bundle.key_pem).unwrap();
        ca
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Collector {
    /// Both OTLP receivers, over TLS with `tls`'s certificate when given.
    async fn start(tls: Option<&TestCa>) -> Collector {
        let bin = otelcol();
        let dir = scratch("otelcol");
        let (http_port, grpc_port) = (free_port(), free_port());
        let output = dir.join("spans.json");
        let config = dir.join("config.yaml");
        let tls_block = tls.map_or(String::new(), |t| {
            format!(
                "        tls:\n          cert_file: {}\n          key_file: {}\n",
                t.cert.display(),
                t.key.display()
            )
        });
        // The collector's own metrics are off: their default :8888 would collide with
        // anything else on the machine.
        std::fs::write(
            &config,
            format!(
                "receivers:\n  otlp:\n    protocols:\n      \
                 http:\n        endpoint: 127.0.0.1:{http_port}\n{tls_block}      \
                 grpc:\n        endpoint: 127.0.0.1:{grpc_port}\n{tls_block}\
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
        for port in [http_port, grpc_port] {
            let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            eventually("the collector listens", || async move {
                tokio::net::TcpStream::connect(addr).await.is_ok()
            })
            .await;
        }
        Collector {
            http_port,
            grpc_port,
            tls: tls.is_some(),
            output,
            dir,
            _process: process,
        }
    }

    /// The OTLP/HTTP receiver's URL.
    fn http_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.http_port)
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

/// The span lines (`{"span": {…}}`) among a process's stdout lines, as [`Span`]s.
fn stdout_spans(lines: &[String]) -> Vec<Span> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.as_object().is_some_and(|o| o.len() == 1) && v["span"].is_object())
        .map(|v| {
            let s = &v["span"];
            let text = |v: &Value| v.as_str().unwrap_or("").to_owned();
            let flat = |v: &Value| -> HashMap<String, String> {
                v.as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.as_str().map_or(v.to_string(), str::to_owned)))
                    .collect()
            };
            Span {
                service: text(&s["resource"]["service.name"]),
                name: text(&s["name"]),
                // As OTLP numbers them.
                kind: match s["kind"].as_str() {
                    Some("internal") => 1,
                    Some("server") => 2,
                    Some("client") => 3,
                    _ => 0,
                },
                trace_id: text(&s["traceId"]),
                span_id: text(&s["spanId"]),
                parent: text(&s["parentSpanId"]),
                attrs: flat(&s["attributes"]),
            }
        })
        .collect()
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

async fn traced_get(act: &Activator, trace: &str) -> (StatusCode, Value) {
    let tp = traceparent(trace);
    let headers = [
        ("Host", "traced.local"),
        ("traceparent", tp.as_str()),
        ("tracestate", "vendor=opaque"),
    ];
    let (status, _, body) = get_with(&act.url("/headers"), &headers).await;
    let seen = serde_json::from_slice(&body).unwrap_or(Value::Null);
    (status, seen)
}

/// A header as the test app's `/headers` saw it.
fn header(seen: &Value, name: &str) -> String {
    seen["headers"][name][0].as_str().unwrap_or("").to_owned()
}

/// The spans of one traced request through the activator and its queue-proxy.
const PATH_SPANS: [&str; 4] = ["activator", "throttler_try", "queue", "kn.queueproxy.wait"];

/// Whether `spans` hold all four spans of the request in `trace`.
fn complete(spans: &[Span], trace: &str) -> bool {
    PATH_SPANS
        .iter()
        .all(|n| spans.iter().any(|s| s.name == *n && s.trace_id == trace))
}

/// Starts the activator on the local platform with `flags` and `env` (spans exported
/// every 100 ms instead of 5 s, by the activator and its queue-proxies), and sends one
/// cold request in `trace`: the app's view of its headers.
async fn traced_activator(flags: &[&str], env: &[(&str, &str)], trace: &str) -> (Activator, Value) {
    let mut all_flags = FLAGS.to_vec();
    all_flags.extend_from_slice(flags);
    let mut all_env = vec![("OTEL_BSP_SCHEDULE_DELAY", "100")];
    all_env.extend_from_slice(env);
    let act = Activator::start_with_env(&config(), &all_flags, &all_env).await;
    let (status, seen) = traced_get(&act, trace).await;
    assert_eq!(status, StatusCode::OK, "{seen}");
    (act, seen)
}

/// The spans of one request in `trace`, as the app (`seen`) and the exporter saw them:
/// the client's traceparent is the activator span's parent, which parents the wait for a
/// pod and the queue-proxy's span (so the `traceparent` crossed the wire), which parents
/// its breaker wait and is the app's parent; both server spans carry the revision.
fn check_path(spans: &[Span], trace: &str, seen: &Value) {
    // The app's parent is the queue-proxy's span, in the client's trace.
    let app_tp = header(seen, "traceparent");
    let parts: Vec<&str> = app_tp.split('-').collect();
    assert_eq!(parts.len(), 4, "traceparent at the app: {app_tp:?}");
    assert_eq!(parts[1], trace, "the client's trace goes on: {app_tp}");
    assert_ne!(
        parts[2], CLIENT_SPAN,
        "a proxy's span is the app's parent: {app_tp}"
    );
    assert_eq!(parts[3], "01", "sampled");
    assert_eq!(header(seen, "tracestate"), "vendor=opaque");

    let one = |name: &str| {
        let found: Vec<&Span> = spans
            .iter()
            .filter(|s| s.name == name && s.trace_id == trace)
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
}

/// One traced request through the activator started with `flags` and `env`; its spans
/// reach `collector`, parented across both proxies.
async fn check_collector_path(
    collector: &Collector,
    flags: &[&str],
    env: &[(&str, &str)],
    trace: &str,
) {
    let started = Instant::now();
    let (act, seen) = traced_activator(flags, env, trace).await;
    eventually("all four spans are exported", || {
        let done = complete(&collector.spans(), trace);
        async move { done }
    })
    .await;
    check_path(&collector.spans(), trace, &seen);
    // Every export succeeded: nothing was logged as failing.
    assert_eq!(failed_exports(&act, false), 0, "{:#?}", act.logs());
    assert_eq!(failed_exports(&act, true), 0, "{:#?}", act.logs());
    eprintln!(
        "{flags:?}: traced cold request and its spans in {:?}",
        started.elapsed()
    );
}

/// The warnings about failed exports in the activator's log: its own, or its pod's
/// queue-proxy's (relayed with the pod's name).
fn export_warnings(act: &Activator, from_pod: bool) -> Vec<Value> {
    act.logs()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.contains("cannot export spans to the tracing collector"))
                && v.get("pod").is_some() == from_pod
        })
        .collect()
}

fn failed_exports(act: &Activator, from_pod: bool) -> usize {
    export_warnings(act, from_pod).len()
}

#[tokio::test]
async fn spans_reach_a_real_collector_parented_across_both_proxies() {
    let collector = Collector::start(None).await;
    let endpoint = collector.http_url();
    check_collector_path(
        &collector,
        &["--tracing-endpoint", &endpoint],
        &[],
        TRACE_ID,
    )
    .await;
}

#[tokio::test]
async fn spans_reach_a_real_collector_over_grpc() {
    let collector = Collector::start(None).await;
    let endpoint = format!("http://127.0.0.1:{}", collector.grpc_port);
    check_collector_path(
        &collector,
        &[
            "--tracing-protocol",
            "grpc",
            "--tracing-endpoint",
            &endpoint,
        ],
        &[],
        TRACE_ID,
    )
    .await;
}

#[tokio::test]
async fn spans_reach_a_tls_collector_trusted_through_ssl_cert_file() {
    let ca = TestCa::new();
    let collector = Collector::start(Some(&ca)).await;
    let trust = ca.ca.to_str().unwrap();
    // http/protobuf to https://.
    let endpoint = collector.http_url();
    assert!(endpoint.starts_with("https://"), "{endpoint}");
    check_collector_path(
        &collector,
        &["--tracing-endpoint", &endpoint],
        &[("SSL_CERT_FILE", trust)],
        TRACE_ID,
    )
    .await;
    // grpc to a scheme-less endpoint, which Knative reads as https://: HTTP/2 over TLS.
    let endpoint = format!("localhost:{}", collector.grpc_port);
    check_collector_path(
        &collector,
        &[
            "--tracing-protocol",
            "grpc",
            "--tracing-endpoint",
            &endpoint,
        ],
        &[("SSL_CERT_FILE", trust)],
        "5bf92f3577b34da6a3ce929d0e0e4737",
    )
    .await;
}

#[tokio::test]
async fn an_untrusted_tls_collector_is_logged_once_with_the_certificate_error() {
    let ca = TestCa::new();
    let collector = Collector::start(Some(&ca)).await;
    let endpoint = collector.http_url();
    // No SSL_CERT_FILE: the system's roots, which do not hold the test's CA.
    let (act, _) = traced_activator(&["--tracing-endpoint", &endpoint], &[], TRACE_ID).await;
    eventually("both failed exports are logged", || async {
        failed_exports(&act, false) >= 1 && failed_exports(&act, true) >= 1
    })
    .await;
    let warning = &export_warnings(&act, false)[0];
    let error = warning["error"].as_str().unwrap_or("");
    assert!(error.contains("certificate"), "{warning}");
    assert!(collector.spans().is_empty(), "{:#?}", collector.spans());
}

#[tokio::test]
async fn stdout_spans_are_json_lines_parented_across_both_proxies() {
    let (act, seen) = traced_activator(&["--tracing-protocol", "stdout"], &[], TRACE_ID).await;
    // The queue-proxy's span lines reach the activator's stdout as they are.
    eventually("all four span lines are written", || {
        let done = complete(&stdout_spans(&act.logs()), TRACE_ID);
        async move { done }
    })
    .await;
    let lines = act.logs();
    check_path(&stdout_spans(&lines), TRACE_ID, &seen);
    // A span line is one top-level "span" object; a log line never has that key.
    let parsed: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let (spans, logs): (Vec<&Value>, Vec<&Value>) =
        parsed.iter().partition(|v| v.get("span").is_some());
    assert!(spans.len() >= 4, "{lines:#?}");
    assert!(!logs.is_empty(), "{lines:#?}");
    for s in &spans {
        assert_eq!(s.as_object().unwrap().len(), 1, "{s}");
        assert!(
            s.get("level").is_none() && s.get("message").is_none(),
            "{s}"
        );
        for time in ["startTime", "endTime"] {
            let t = s["span"][time].as_str().unwrap_or("");
            assert!(t.len() == 30 && t.ends_with('Z'), "{time} {t:?}");
        }
    }
    for l in &logs {
        assert!(
            l.get("level").is_some() && l.get("message").is_some(),
            "{l}"
        );
    }
}

#[tokio::test]
async fn with_tracing_off_trace_headers_pass_untouched() {
    let act = Activator::start(&config(), FLAGS).await;
    let (status, seen) = traced_get(&act, TRACE_ID).await;
    assert_eq!(status, StatusCode::OK, "{seen}");
    assert_eq!(
        header(&seen, "traceparent"),
        traceparent(TRACE_ID),
        "{seen}"
    );
    assert_eq!(header(&seen, "tracestate"), "vendor=opaque");
}

/// Warm requests for a second through an activator whose exports fail: every one
/// answered, none slowed.
async fn requests_stay_fast(act: &Activator) {
    let until = Instant::now() + Duration::from_secs(1);
    let mut slowest = Duration::ZERO;
    let mut n = 0;
    while Instant::now() < until {
        let t = Instant::now();
        let (status, _) = traced_get(act, TRACE_ID).await;
        assert_eq!(status, StatusCode::OK);
        slowest = slowest.max(t.elapsed());
        n += 1;
    }
    assert!(n >= 20, "only {n} requests in a second");
    assert!(
        slowest < Duration::from_millis(500),
        "a request took {slowest:?}"
    );
}

/// Many failed exports make one episode: once by the activator, and once by the pod's
/// queue-proxy.
async fn logged_once_each(act: &Activator) {
    eventually("both failed exports are logged", || async {
        failed_exports(act, false) >= 1 && failed_exports(act, true) >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(failed_exports(act, false), 1, "{:#?}", act.logs());
    assert_eq!(failed_exports(act, true), 1, "{:#?}", act.logs());
}

#[tokio::test]
async fn an_unreachable_collector_slows_nothing_and_is_logged_once() {
    let mut flags = FLAGS.to_vec();
    let endpoint = format!("http://127.0.0.1:{}", closed_port());
    flags.extend(["--tracing-endpoint", &endpoint]);
    let act =
        Activator::start_with_env(&config(), &flags, &[("OTEL_BSP_SCHEDULE_DELAY", "20")]).await;
    let (status, _) = traced_get(&act, TRACE_ID).await;
    assert_eq!(status, StatusCode::OK);
    requests_stay_fast(&act).await;
    logged_once_each(&act).await;
}

/// One call as a fake gRPC collector received it.
#[derive(Debug, Clone)]
struct Call {
    version: http::Version,
    path: String,
    content_type: String,
    te: String,
    body: Bytes,
}

/// An h2c server on a free loopback port that answers every call as a busy collector
/// does: trailers-only, `grpc-status: 14` (UNAVAILABLE) with a percent-encoded message.
async fn busy_grpc_collector() -> (u16, Arc<Mutex<Vec<Call>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
    let seen = Arc::clone(&calls);
    // Ends with the test's runtime.
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen = Arc::clone(&seen);
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let seen = Arc::clone(&seen);
                async move {
                    let (parts, body) = req.into_parts();
                    let body = body
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let header = |name: &str| {
                        parts
                            .headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned()
                    };
                    seen.lock().unwrap().push(Call {
                        version: parts.version,
                        path: parts.uri.path().to_owned(),
                        content_type: header("content-type"),
                        te: header("te"),
                        body,
                    });
                    let answer = Response::builder()
                        .header("content-type", "application/grpc")
                        .header("grpc-status", "14")
                        .header("grpc-message", "the%20collector%20is%20busy")
                        .body(Empty::<Bytes>::new())
                        .unwrap();
                    Ok::<_, Infallible>(answer)
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (port, calls)
}

#[tokio::test]
async fn a_grpc_error_status_slows_nothing_and_is_logged_once_with_its_message() {
    let (port, calls) = busy_grpc_collector().await;
    let mut flags = FLAGS.to_vec();
    let endpoint = format!("http://127.0.0.1:{port}");
    flags.extend([
        "--tracing-protocol",
        "grpc",
        "--tracing-endpoint",
        &endpoint,
    ]);
    let act =
        Activator::start_with_env(&config(), &flags, &[("OTEL_BSP_SCHEDULE_DELAY", "20")]).await;
    let (status, _) = traced_get(&act, TRACE_ID).await;
    assert_eq!(status, StatusCode::OK);
    requests_stay_fast(&act).await;
    logged_once_each(&act).await;
    for from_pod in [false, true] {
        let warning = &export_warnings(&act, from_pod)[0];
        let text = warning.to_string();
        assert!(
            text.contains("grpc-status 14 (UNAVAILABLE): the collector is busy"),
            "{warning}"
        );
    }
    // The calls were gRPC: HTTP/2, the export method, a length-prefixed message.
    let calls = calls.lock().unwrap().clone();
    assert!(calls.len() >= 2, "{calls:#?}");
    for call in &calls {
        assert_eq!(call.version, http::Version::HTTP_2, "{call:?}");
        assert_eq!(
            call.path,
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
        );
        assert_eq!(call.content_type, "application/grpc");
        assert_eq!(call.te, "trailers");
        let b = &call.body;
        assert!(b.len() > 5, "{call:?}");
        assert_eq!(b[0], 0, "not compressed");
        let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        assert_eq!(len, b.len() - 5, "one whole message");
    }
}

#[tokio::test]
async fn bad_tracing_flags_are_one_line_and_exit_64() {
    for (args, env, expected) in [
        (
            vec!["--tracing-endpoint", "http://[::1"],
            vec![],
            "activator: --tracing-endpoint: \"http://[::1\" is not a URL",
        ),
        (
            vec![
                "--tracing-endpoint",
                "http://127.0.0.1:4318",
                "--tracing-sampling-rate",
                "1.5",
            ],
            vec![],
            "activator: --tracing-sampling-rate: expected a number from 0 to 1, got \"1.5\"",
        ),
        (
            vec!["--tracing-protocol", "zipkin"],
            vec![],
            "activator: --tracing-protocol: unknown protocol \"zipkin\"",
        ),
        (
            vec!["--tracing-protocol", "grpc"],
            vec![],
            "activator: --tracing-endpoint: must be set when the protocol is grpc",
        ),
        (
            vec![
                "--tracing-protocol",
                "stdout",
                "--tracing-endpoint",
                "http://127.0.0.1:4318",
            ],
            vec![],
            "activator: --tracing-endpoint: must be empty when the protocol is stdout",
        ),
        (
            vec!["--tracing-endpoint", "10.0.0.1:4318"],
            vec![],
            "activator: --tracing-endpoint: \"10.0.0.1:4318\" is not a URL: first path segment in URL cannot contain colon",
        ),
        (
            vec!["--tracing-endpoint", "http://127.0.0.1:4318"],
            vec![("OTEL_TRACES_SAMPLER_ARG", "often")],
            "activator: OTEL_TRACES_SAMPLER_ARG: expected a number, got \"often\"",
        ),
        (
            vec!["--tracing-protocol", "grpc", "--tracing-endpoint", "c:4317"],
            vec![("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "ftp://c")],
            "activator: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: \"ftp://c\" is not a URL: scheme \"ftp\" is not http or https",
        ),
    ] {
        let out = child(bin("activator"))
            .args(["--platform", "local"])
            .args(&args)
            .envs(env.iter().copied())
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
    for (json, env, expected) in [
        (
            r#"{"tracing": {"protocol": "http/protobuf", "endpoint": "http://c:4318", "samplingRate": 2}}"#,
            None,
            "queue-proxy: OBSERVABILITY_CONFIG: tracing.samplingRate: expected a number from 0 to 1, got \"2\"",
        ),
        (
            r#"{"tracing": {"protocol": "jaeger"}}"#,
            None,
            "queue-proxy: OBSERVABILITY_CONFIG: tracing.protocol: unknown protocol \"jaeger\"",
        ),
        (
            r#"{"tracing": {"protocol": "http/protobuf", "endpoint": "ftp://c"}}"#,
            None,
            "queue-proxy: OBSERVABILITY_CONFIG: tracing.endpoint: \"ftp://c\" is not a URL: scheme \"ftp\" is not http or https",
        ),
        (
            r#"{"tracing": {"protocol": "none", "endpoint": "http://c:4318"}}"#,
            None,
            "queue-proxy: OBSERVABILITY_CONFIG: tracing.endpoint: must be empty when the protocol is none",
        ),
        (
            r#"{"tracing": {"protocol": "grpc", "endpoint": "collector:4317"}}"#,
            Some(("OTEL_EXPORTER_OTLP_ENDPOINT", "http://[::1")),
            "queue-proxy: OTEL_EXPORTER_OTLP_ENDPOINT: \"http://[::1\" is not a URL",
        ),
    ] {
        let mut env_map = knative_env(closed_port());
        env_map.insert("OBSERVABILITY_CONFIG".to_owned(), json.to_owned());
        if let Some((k, v)) = env {
            env_map.insert(k.to_owned(), v.to_owned());
        }
        let out = child(bin("queue-proxy"))
            .env_clear()
            .envs(&env_map)
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{json}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{json}: {stderr}");
        assert!(stderr.starts_with(expected), "{json}: {stderr}");
    }
}
