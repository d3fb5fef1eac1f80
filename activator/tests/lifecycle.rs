//! The activator's command line, config errors, and drain.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use http::StatusCode;
use thaw_benches::harness::*;

fn activator(args: &[&str]) -> std::process::Output {
    Command::new(bin("activator"))
        .args(args)
        .env_remove("THAW_CONFIG")
        .output()
        .unwrap()
}

#[test]
fn help_documents_every_flag() {
    let out = activator(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--platform",
        "--config",
        "--http-port",
        "--h2c-port",
        "--metrics-port",
        "--autoscaler-url",
        "--pod-name",
        "--pod-ip",
        "--max-waiting",
        "--buffer-budget",
        "--drain-period",
        "--max-local-pods",
        "THAW_MAX_LOCAL_PODS",
        "--max-scale-up-rate",
        "THAW_MAX_SCALE_UP_RATE",
        "[default: 1000]",
        "POD_NAME",
        "POD_IP",
        "[default: 8012]",
        "[default: 8013]",
        "[default: 9090]",
        "[default: local]",
        "--tracing-endpoint",
        "THAW_TRACING_ENDPOINT",
        "--tracing-protocol",
        "--tracing-sampling-rate",
        "THAW_TRACING_SAMPLING_RATE",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
}

#[test]
fn bad_flags_and_config_give_one_line_and_exit_64() {
    let dir = std::env::temp_dir().join(format!("thaw-lifecycle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad_yaml = dir.join("bad.yaml");
    std::fs::write(
        &bad_yaml,
        "revisions:\n  - name: a\n    command: [x]\n  - name: b\n    command: [x]\n    containerConcurrency: many\n",
    )
    .unwrap();
    let bad_yaml = bad_yaml.to_str().unwrap().to_owned();
    // Values at the top of their type: refused where parsed, never a panic later.
    let huge_yaml = dir.join("huge.yaml");
    std::fs::write(
        &huge_yaml,
        "revisions:\n  - name: a\n    command: [x]\n    timeoutSeconds: 18446744073709551615\n",
    )
    .unwrap();
    let huge_yaml = huge_yaml.to_str().unwrap().to_owned();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--http-port", "eighty"], "--http-port"),
        (vec!["--platform", "mesos"], "mesos"),
        (vec!["--bogus"], "--bogus"),
        (vec![], "--config"),
        (
            vec!["--config", "/nonexistent/thaw.yaml"],
            "/nonexistent/thaw.yaml",
        ),
        (
            vec!["--config", &bad_yaml],
            "revisions[1].containerConcurrency",
        ),
        (
            vec!["--config", &huge_yaml],
            "revisions[0].timeoutSeconds: expected a whole number from 0 to 31536000",
        ),
        (vec!["--worker-threads", "100000"], "from 1 to 1024"),
        (
            vec!["--drain-period", "18446744073709551615"],
            "longer than",
        ),
        (
            vec!["--max-waiting", "18446744073709551616"],
            "--max-waiting",
        ),
    ];
    for (args, needle) in cases {
        let out = activator(&args);
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?} printed to stdout");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn drain_fails_readiness_keeps_serving_then_finishes_buffered_requests() {
    let port = free_port();
    let yaml = format!(
        "revisions:\n  - name: hello\n    hosts: [hello.local]\n    containerConcurrency: 1\n    timeoutSeconds: 60\n    endpoints: [\"127.0.0.1:{port}\"]\n"
    );
    let mut act = Activator::start(&yaml, &["--drain-period", "2s"]).await;
    // A request parked before the signal.
    let url = act.url("/");
    let parked = tokio::spawn(async move { get_with(&url, &[("Host", "hello.local")]).await });
    eventually("parked", || async {
        act.metric("activator_requests_waiting", "").await == 1.0
    })
    .await;

    act.signal("TERM");
    let signalled = Instant::now();
    eventually("readiness fails", || async {
        get_with(&act.url("/"), &[("User-Agent", "kube-probe/1.30")])
            .await
            .0
            == StatusCode::INTERNAL_SERVER_ERROR
    })
    .await;
    let (_, _, b) = get_with(&act.url("/"), &[("User-Agent", "kube-probe/1.30")]).await;
    assert_eq!(&b[..], b"activator is draining");

    // The pod shows up during the drain: both the parked request and new ones are served.
    let _pod = Pod::start(port, 1, &[]).await;
    let (s, _, _) = get_with(&act.url("/"), &[("Host", "hello.local")]).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(parked.await.unwrap().0, StatusCode::OK);

    // A slow request in flight when the drain period ends still completes.
    let url = act.url("/delay?ms=2500");
    let slow = tokio::spawn(async move { get_with(&url, &[("Host", "hello.local")]).await });
    let status = act.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "{status:?}");
    assert!(
        signalled.elapsed() >= Duration::from_secs(2),
        "exited before the drain period"
    );
    assert_eq!(slow.await.unwrap().0, StatusCode::OK);
}

#[tokio::test]
async fn readiness_follows_the_autoscaler_connection() {
    let port = free_port();
    let yaml = "revisions:\n  - name: hello\n    endpoints: []\n";
    let url = format!("ws://127.0.0.1:{port}/");
    let act = Activator::start(yaml, &["--autoscaler-url", &url]).await;
    let probe = || async { get_with(&act.url("/"), &[("User-Agent", "kube-probe/1.30")]).await };
    let (s, _, b) = probe().await;
    assert_eq!(
        (s, &b[..]),
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            &b"not connected to the autoscaler"[..]
        )
    );

    // An autoscaler appears: the activator connects and becomes ready.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
        use futures_util::StreamExt;
        while let Some(Ok(_)) = ws.next().await {}
    });
    eventually("ready once connected", || async {
        probe().await.0 == StatusCode::OK
    })
    .await;
    server.abort();
}
