//! The binary's start: configuration errors, `--help`, port clashes, TLS, and what the
//! metrics ports report once it runs (CONTRACT §1.2, §1.6).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use prost::Message;
use thaw_shared::proto::Stat;

const REQUIRED: [&str; 12] = [
    "CONTAINER_CONCURRENCY",
    "QUEUE_SERVING_PORT",
    "QUEUE_SERVING_TLS_PORT",
    "USER_PORT",
    "REVISION_TIMEOUT_SECONDS",
    "SERVING_LOGGING_CONFIG",
    "SERVING_LOGGING_LEVEL",
    "SERVING_NAMESPACE",
    "SERVING_CONFIGURATION",
    "SERVING_REVISION",
    "SERVING_POD",
    "SERVING_POD_IP",
];

const OPTIONAL: [&str; 10] = [
    "REVISION_RESPONSE_START_TIMEOUT_SECONDS",
    "REVISION_IDLE_TIMEOUT_SECONDS",
    "SERVING_READINESS_PROBE",
    "ENABLE_MULTI_CONTAINER_PROBES",
    "ENABLE_HTTP2_AUTO_DETECTION",
    "ENABLE_HTTP_FULL_DUPLEX",
    "SERVING_SERVICE",
    "OBSERVABILITY_CONFIG",
    "QUEUE_PROXY_TLS_MIN_VERSION",
    "QUEUE_PROXY_TLS_MAX_VERSION",
];

/// Runs the binary with exactly `env` (nothing inherited) and waits for it to exit.
async fn run_to_exit(env: &HashMap<String, String>, args: &[&str]) -> (Output, Duration) {
    let started = Instant::now();
    let child = child(env!("CARGO_BIN_EXE_queue-proxy"))
        .env_clear()
        .envs(env)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let output = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("queue-proxy kept running")
        .unwrap();
    (output, started.elapsed())
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// A configuration error: status 64, nothing on stdout (so no listener was opened: the
/// "listening" lines come before anything serves), exactly one line on stderr, returned
/// without the program name.
fn config_error(output: &Output, elapsed: Duration, what: &str) -> String {
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{what}: {stderr}");
    assert!(
        output.stdout.is_empty(),
        "{what}: printed on stdout: {}",
        text(&output.stdout)
    );
    assert!(
        elapsed < Duration::from_secs(5),
        "{what}: took {elapsed:?} to fail"
    );
    assert!(stderr.ends_with('\n'), "{what}: {stderr:?}");
    assert_eq!(stderr.lines().count(), 1, "{what}: {stderr:?}");
    let line = stderr.trim_end();
    line.strip_prefix("queue-proxy: ")
        .unwrap_or_else(|| panic!("{what}: {line:?} lacks the program name"))
        .to_owned()
}

/// Knative's environment with the serving ports fixed to free ports, pointed at a closed
/// user port.
fn env_with(overrides: &[(&str, &str)]) -> HashMap<String, String> {
    let mut env = knative_env(closed_port());
    env.insert("QUEUE_SERVING_PORT".into(), closed_port().to_string());
    env.insert("THAW_METRICS_PORT".into(), closed_port().to_string());
    for (k, v) in overrides {
        env.insert((*k).to_owned(), (*v).to_owned());
    }
    env
}

#[tokio::test]
async fn each_missing_required_variable_is_named_and_exits_64() {
    for var in REQUIRED {
        let mut env = env_with(&[]);
        assert!(env.remove(var).is_some());
        let (output, elapsed) = run_to_exit(&env, &[]).await;
        let message = config_error(&output, elapsed, var);
        assert_eq!(
            message,
            format!("missing required environment variable {var}")
        );
    }
    // Present but empty is allowed where Knative leaves a variable empty.
    let env = env_with(&[
        ("SERVING_LOGGING_CONFIG", ""),
        ("SERVING_LOGGING_LEVEL", ""),
    ]);
    let mut child = child(env!("CARGO_BIN_EXE_queue-proxy"))
        .env_clear()
        .envs(&env)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "empty logging variables were refused"
    );
    child.kill().await.unwrap();
}

#[tokio::test]
async fn unparsable_values_are_named_and_exit_64() {
    for (var, value) in [
        ("CONTAINER_CONCURRENCY", "abc"),
        ("CONTAINER_CONCURRENCY", "-1"),
        ("USER_PORT", "99999"),
        ("QUEUE_SERVING_PORT", "http"),
        ("REVISION_TIMEOUT_SECONDS", "5m"),
        // At the top of their type: refused at start, not a panic on the first request.
        ("CONTAINER_CONCURRENCY", "18446744073709551615"),
        ("REVISION_TIMEOUT_SECONDS", "18446744073709551615"),
        ("REVISION_IDLE_TIMEOUT_SECONDS", "18446744073709551615"),
        ("THAW_WORKER_THREADS", "100000"),
        ("THAW_DRAIN_QUIET_PERIOD", "18446744073709551615s"),
    ] {
        let (output, elapsed) = run_to_exit(&env_with(&[(var, value)]), &[]).await;
        let message = config_error(&output, elapsed, &format!("{var}={value}"));
        assert!(
            message.starts_with(&format!("{var}: ")),
            "{var}={value}: {message:?}"
        );
        assert!(message.contains(value), "{var}={value}: {message:?}");
    }
}

#[tokio::test]
async fn inherited_descriptors_that_are_not_listeners_fail_the_start() {
    // Nothing is open at 900; the parser refuses standard error and unknown names.
    for (value, expect) in [
        ("serving=900", "serving descriptor 900"),
        ("admin=2", "above 2"),
        ("stats=5", "unknown listener"),
    ] {
        let (output, elapsed) = run_to_exit(&env_with(&[("THAW_LISTEN_FDS", value)]), &[]).await;
        let message = config_error(&output, elapsed, value);
        assert!(
            message.starts_with("THAW_LISTEN_FDS: "),
            "{value}: {message:?}"
        );
        assert!(message.contains(expect), "{value}: {message:?}");
    }
}

#[tokio::test]
async fn invalid_readiness_probes_fail_the_start() {
    let (output, elapsed) = run_to_exit(
        &env_with(&[("SERVING_READINESS_PROBE", r#"{"httpGet":{"port":"http"}}"#)]),
        &[],
    )
    .await;
    let message = config_error(&output, elapsed, "named port");
    assert!(
        message.starts_with("SERVING_READINESS_PROBE: "),
        "{message:?}"
    );
    assert!(message.contains("httpGet.port"), "{message:?}");

    let (output, elapsed) = run_to_exit(
        &env_with(&[("SERVING_READINESS_PROBE", r#"{"tcpSocket":"#)]),
        &[],
    )
    .await;
    let message = config_error(&output, elapsed, "broken JSON");
    assert!(
        message.starts_with("SERVING_READINESS_PROBE: "),
        "{message:?}"
    );
    assert!(
        message.contains("line 1 column 13"),
        "no JSON position: {message:?}"
    );
}

#[tokio::test]
async fn help_lists_every_variable_with_its_meaning_and_default() {
    // --help needs no environment at all.
    let (output, _) = run_to_exit(&HashMap::new(), &["--help"]).await;
    assert!(output.status.success());
    let help = text(&output.stdout);
    let lines: Vec<&str> = help.lines().collect();
    for var in REQUIRED.iter().chain(OPTIONAL.iter()) {
        let at = lines
            .iter()
            .position(|l| l.split_whitespace().next() == Some(*var))
            .unwrap_or_else(|| panic!("{var} missing from --help:\n{help}"));
        let meaning = lines[at].trim_start().strip_prefix(*var).unwrap().trim();
        assert!(!meaning.is_empty(), "{var} has no meaning in --help");
        let detail = lines.get(at + 1).copied().unwrap_or_default();
        if REQUIRED.contains(var) {
            assert!(detail.contains("(required)"), "{var}: {detail:?}");
        } else {
            assert!(detail.contains("(default"), "{var}: {detail:?}");
        }
    }
    for (var, default) in [
        ("REVISION_RESPONSE_START_TIMEOUT_SECONDS", "0"),
        ("QUEUE_PROXY_TLS_MIN_VERSION", "1.3"),
    ] {
        let at = lines
            .iter()
            .position(|l| l.split_whitespace().next() == Some(var))
            .unwrap();
        assert!(
            lines[at + 1].contains(&format!("(default: {default})")),
            "{var}: {:?}",
            lines[at + 1]
        );
    }
    assert!(output.stderr.is_empty());
}

#[tokio::test]
async fn an_occupied_serving_port_fails_the_start_naming_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let (output, _) =
        run_to_exit(&env_with(&[("QUEUE_SERVING_PORT", &port.to_string())]), &[]).await;
    let stderr = text(&output.stderr);
    assert!(!output.status.success());
    assert_ne!(output.status.code(), None, "killed by a signal: {stderr}");
    assert!(
        stderr.contains(&format!("127.0.0.1:{port}")) && stderr.contains("serving"),
        "{stderr:?}"
    );
    assert!(stderr.to_lowercase().contains("in use"), "{stderr:?}");
    drop(taken);
}

/// A scratch directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "thaw-startup-{name}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A TLS connection to `addr` as `localhost`, with `config`'s roots and ALPN offer.
async fn tls_connect(
    addr: std::net::SocketAddr,
    config: &rustls::ClientConfig,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config.clone()))
        .connect(name, tcp)
        .await
        .expect("TLS handshake")
}

#[tokio::test]
async fn tls_listener_serves_the_app_when_the_certificate_exists() {
    let app = App::start(&[]).await;
    let dir = TempDir::new("tls");
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert = dir.0.join("tls.crt");
    let key = dir.0.join("tls.key");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();

    let qp = QueueProxy::start(
        app.port(),
        &[
            ("THAW_TLS_CERT_FILE", cert.to_str().unwrap()),
            ("THAW_TLS_KEY_FILE", key.to_str().unwrap()),
        ],
    )
    .await;
    let tls_addr = qp.tls.expect("no tls listener");
    assert!(qp.logs().iter().any(|l| {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        v["message"] == "listening" && v["listener"] == "tls"
    }));

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ck.cert.der().clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tls = tls_connect(tls_addr, &config).await;
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = sender
        .send_request(
            Request::get("/")
                .header("host", "localhost")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"hello world\n");
    // A client that offers h2 by ALPN is served HTTP/2, as by Go's server.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let tls = tls_connect(tls_addr, &config).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let resp = sender
        .send_request(
            Request::get("https://localhost/")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::OK);
    // The plain port stays open beside it.
    assert_eq!(get(&qp.url("/")).await.0, StatusCode::OK);

    // Without the files there is no TLS listener.
    let plain = QueueProxy::start(
        app.port(),
        &[
            (
                "THAW_TLS_CERT_FILE",
                dir.0.join("absent.crt").to_str().unwrap(),
            ),
            ("THAW_TLS_KEY_FILE", key.to_str().unwrap()),
        ],
    )
    .await;
    assert!(plain.tls.is_none());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!plain.logs().iter().any(|l| l.contains("\"tls\"")));
}

async fn scrape_stat(qp: &QueueProxy) -> Stat {
    let (s, h, body) = get_with(
        &format!("http://{}/metrics", qp.metrics),
        &[("Accept", "application/protobuf")],
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h["content-type"], "application/protobuf");
    assert!(body.len() <= 336, "{} bytes", body.len());
    Stat::decode(body).expect("a Stat")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autoscaler_stats_reflect_arrivals_and_concurrency() {
    let app = App::start(&[]).await;
    let qp = QueueProxy::start(app.port(), &[]).await;
    let pod = "hello-00001-deployment-abc";

    // The report cut before any traffic; all arrivals below land in later windows.
    let before = scrape_stat(&qp).await;
    assert_eq!(before.pod_name, pod);
    assert_eq!(before.request_count, 0.0);

    let delayed = {
        let url = qp.url("/delay?ms=3000");
        tokio::spawn(async move { get(&url).await })
    };
    for i in 0..10 {
        let headers: &[(&str, &str)] = if i < 2 {
            &[("K-Proxy-Request", "activator")]
        } else {
            &[]
        };
        assert_eq!(get_with(&qp.url("/"), headers).await.0, StatusCode::OK);
    }

    // Scrape often for a while, keeping one Stat per window (a window is known by its
    // uptime).
    let mut windows: Vec<Stat> = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(4500) {
        let stat = scrape_stat(&qp).await;
        assert_eq!(stat.pod_name, pod);
        assert_eq!(stat.timestamp, 0);
        if stat.process_uptime > before.process_uptime
            && windows.last().map(|w| w.process_uptime) != Some(stat.process_uptime)
        {
            windows.push(stat);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (s, _, _) = delayed.await.unwrap();
    assert_eq!(s, StatusCode::OK);

    let summary: Vec<_> = windows
        .iter()
        .map(|w| {
            (
                w.process_uptime,
                w.request_count,
                w.proxied_request_count,
                w.average_concurrent_requests,
                w.average_proxied_concurrent_requests,
            )
        })
        .collect();
    assert!(windows.len() >= 3, "{summary:?}");
    assert!(windows.last().unwrap().process_uptime > 1.0, "{summary:?}");
    assert!(
        windows.iter().any(|w| w.request_count >= 1.0),
        "{summary:?}"
    );
    assert!(
        windows.iter().any(|w| w.proxied_request_count >= 1.0),
        "{summary:?}"
    );
    // The delayed request alone keeps the average at about 1 in a window it spans.
    assert!(
        windows.iter().any(|w| w.average_concurrent_requests > 0.5),
        "{summary:?}"
    );
    assert!(
        windows.iter().all(|w| w.average_concurrent_requests < 3.0),
        "{summary:?}"
    );
    // Proxied requests count in both figures.
    for w in &windows {
        assert!(w.proxied_request_count <= w.request_count, "{summary:?}");
        assert!(
            w.average_proxied_concurrent_requests <= w.average_concurrent_requests + 1e-9,
            "{summary:?}"
        );
    }
    // 11 arrivals in all (2 proxied), unless a window was missed on a stalled machine.
    let total: f64 = windows.iter().map(|w| w.request_count).sum();
    let proxied: f64 = windows.iter().map(|w| w.proxied_request_count).sum();
    assert!(total <= 11.0 && proxied <= 2.0, "{summary:?}");
    let mut uptimes = vec![before.process_uptime];
    uptimes.extend(windows.iter().map(|w| w.process_uptime));
    if uptimes.windows(2).all(|u| u[1] - u[0] < 1.5) {
        assert_eq!((total, proxied), (11.0, 2.0), "{summary:?}");
    }
    // The latest window is idle again.
    let idle = scrape_stat(&qp).await;
    assert!(idle.process_uptime > 3.0);

    // Anyone not asking for protobuf gets the same figures as Prometheus text.
    let (s, h, body) = get(&format!("http://{}/metrics", qp.metrics)).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        h["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"),
        "{:?}",
        h["content-type"]
    );
    let body = text(&body);
    let labels = format!(
        "{{destination_namespace=\"default\",destination_configuration=\"hello\",destination_revision=\"hello-00001\",destination_pod=\"{pod}\"}}"
    );
    for name in [
        "queue_average_concurrent_requests",
        "queue_average_proxied_concurrent_requests",
        "queue_requests_per_second",
        "queue_proxied_operations_per_second",
        "process_uptime",
    ] {
        assert!(
            body.lines()
                .any(|l| l.starts_with(&format!("{name}{labels} "))),
            "{name} missing:\n{body}"
        );
        assert!(body.contains(&format!("# TYPE {name} gauge")), "{body}");
    }
    assert!(metric_value(&body, "process_uptime", "") > 3.0);
}

#[tokio::test]
async fn user_metrics_count_by_class_with_the_revision_labels() {
    let app = App::start(&[]).await;
    let qp = QueueProxy::start(app.port(), &[]).await;
    for _ in 0..3 {
        assert_eq!(get(&qp.url("/")).await.0, StatusCode::OK);
    }
    assert_eq!(
        get(&qp.url("/status?code=404")).await.0,
        StatusCode::NOT_FOUND
    );
    // Latency is recorded once the response is over, possibly just after the client has
    // read it.
    eventually("four latencies recorded", || async {
        metric_value(
            &qp.user_metrics().await,
            "revision_request_latencies_count",
            "",
        ) == 4.0
    })
    .await;
    let text = qp.user_metrics().await;
    let count = |class: &str| {
        metric_value(
            &text,
            "revision_request_count",
            &format!("response_code_class=\"{class}\""),
        )
    };
    assert_eq!(count("2xx"), 3.0, "{text}");
    assert_eq!(count("4xx"), 1.0, "{text}");
    assert_eq!(count("5xx"), 0.0, "{text}");
    assert_eq!(
        metric_value(&text, "revision_request_latencies_bucket", "le=\"+Inf\""),
        4.0
    );
    assert_eq!(metric_value(&text, "revision_requests_in_flight", ""), 0.0);

    let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    for name in [
        "revision_request_count",
        "revision_request_latencies",
        "revision_requests_in_flight",
        "revision_queue_depth",
        "revision_breaker_rejected_total",
        "revision_upstream_errors_total",
    ] {
        assert!(
            samples.iter().any(|l| l.starts_with(name)),
            "{name} missing:\n{text}"
        );
    }
    for line in samples {
        for label in [
            "namespace_name=\"default\"",
            "configuration_name=\"hello\"",
            "revision_name=\"hello-00001\"",
            "pod_name=\"hello-00001-deployment-abc\"",
        ] {
            assert!(line.contains(label), "{line:?} lacks {label}");
        }
    }
}
