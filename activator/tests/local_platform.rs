//! The local platform end to end: the activator starts real app + queue-proxy processes,
//! scales them with load and back to zero.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use http::StatusCode;
use thaw_benches::harness::*;

/// A revision running the test app, with short windows so tests see scaling quickly.
fn revision(name: &str, host: &str, extra: &str) -> String {
    format!(
        "  - name: {name}\n    hosts: [{host}]\n    command: [{app:?}]\n    stableWindow: 2s\n    scaleToZeroGracePeriod: 1s\n    timeoutSeconds: 30\n{extra}",
        app = bin("thaw-testapp").display().to_string(),
    )
}

fn config(revisions: &[String]) -> String {
    format!("revisions:\n{}", revisions.concat())
}

async fn start(yaml: &str) -> Activator {
    Activator::start(
        yaml,
        &["--pod-quiet-period", "300ms", "--drain-period", "1s"],
    )
    .await
}

/// Process ids of every pod the activator started so far, from its "pod started" lines.
fn pod_pids(act: &Activator) -> BTreeSet<u32> {
    act.logs()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "pod started")
        .flat_map(|v| {
            ["app_pid", "queue_proxy_pid"].map(|k| {
                v[k].as_u64().or_else(|| {
                    v[k].as_str().and_then(|s| {
                        s.trim_start_matches("Some(")
                            .trim_end_matches(')')
                            .parse()
                            .ok()
                    })
                })
            })
        })
        .flatten()
        .map(|p| p as u32)
        .collect()
}

fn alive(pid: u32) -> bool {
    // A reaped process has no /proc entry; a zombie would show state Z.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.split(") ")
                .nth(1)
                .is_some_and(|rest| rest.starts_with('Z'))
        })
        .unwrap_or(false)
}

fn logged(act: &Activator, needle: &str) -> bool {
    act.logs().iter().any(|l| l.contains(needle))
}

async fn get_host(act: &Activator, path: &str, host: &str) -> (StatusCode, bytes::Bytes) {
    let (s, _, b) = get_with(&act.url(path), &[("Host", host)]).await;
    (s, b)
}

#[tokio::test]
async fn the_quickstart_example_cold_starts_and_scales_to_zero() {
    // Exactly the README's example function, with short windows.
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local/hello.yaml");
    let yaml = std::fs::read_to_string(&example)
        .unwrap()
        .replace(
            "command: [python3, hello.py]",
            &format!(
                "command: [python3, {:?}]",
                example.with_file_name("hello.py").display().to_string()
            ),
        )
        .replace("stableWindow: 60s", "stableWindow: 2s")
        .replace("scaleToZeroGracePeriod: 30s", "scaleToZeroGracePeriod: 1s");
    let act = start(&yaml).await;
    eventually("the curl line is printed", || async {
        logged(&act, "curl -H 'Host: hello.local' http://127.0.0.1:")
    })
    .await;

    let started = Instant::now();
    let (s, h, b) = get_with(&act.url("/"), &[("Host", "hello.local")]).await;
    assert_eq!((s, &b[..]), (StatusCode::OK, &b"Hello from Thaw!\n"[..]));
    assert!(h.contains_key("thaw-cold-start"));
    assert!(started.elapsed() < Duration::from_secs(20));
    for line in [
        "scaling hello from 0 to 1",
        "pod ready after",
        "served after cold start of",
    ] {
        eventually(line, || async { logged(&act, line) }).await;
    }
    let pids = pod_pids(&act);
    assert_eq!(pids.len(), 2, "one app and one queue-proxy");

    eventually("scaled to zero", || async {
        logged(&act, "scaled hello to zero")
    })
    .await;
    eventually("no process left", || async {
        pids.iter().all(|p| !alive(*p))
    })
    .await;
}

#[tokio::test]
async fn load_scales_out_without_exceeding_concurrency_and_back_to_zero() {
    // CC=2 per pod, up to 5 pods; each app fails any request beyond 2 at once.
    let yaml = config(&[revision(
        "hello",
        "hello.local",
        "    containerConcurrency: 2\n    maxScale: 5\n    command: [\"APP\", \"--max-concurrency\", \"2\"]\n",
    )
    .replace(&format!("    command: [{:?}]\n", bin("thaw-testapp").display().to_string()), "")
    .replace("APP", &bin("thaw-testapp").display().to_string())]);
    let act = start(&yaml).await;

    let client = http1_client();
    let mut tasks = Vec::new();
    for worker in 0..50 {
        let client = client.clone();
        let url = act.url("/delay?ms=200");
        tasks.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            let until = Instant::now() + Duration::from_secs(6);
            while Instant::now() < until {
                let req = http::Request::get(&url)
                    .header("host", "hello.local")
                    .body(Default::default())
                    .unwrap();
                statuses.push(send(&client, req).await.0);
            }
            (worker, statuses)
        }));
    }
    let mut total = 0;
    for t in tasks {
        let (worker, statuses) = t.await.unwrap();
        total += statuses.len();
        assert!(
            statuses.iter().all(|s| *s == StatusCode::OK),
            "worker {worker}: {statuses:?}"
        );
    }
    let pods = pod_pids(&act).len() / 2;
    assert!(
        pods > 1,
        "50 concurrent requests at CC=2 must scale out; started {pods} pod(s)"
    );
    assert!(pods <= 5, "maxScale is 5; started {pods}");
    assert!(total > 100);

    let pids = pod_pids(&act);
    eventually("scaled to zero", || async {
        logged(&act, "scaled hello to zero")
    })
    .await;
    eventually("no process left", || async {
        pids.iter().all(|p| !alive(*p))
    })
    .await;
}

#[tokio::test]
async fn load_during_scale_down_loses_no_request() {
    let yaml = config(&[revision(
        "hello",
        "hello.local",
        "    containerConcurrency: 1\n    maxScale: 4\n",
    )]);
    let act = start(&yaml).await;
    // A burst scales out...
    let burst: Vec<_> = (0..12)
        .map(|_| {
            let url = act.url("/delay?ms=1500");
            tokio::spawn(async move { get_with(&url, &[("Host", "hello.local")]).await.0 })
        })
        .collect();
    for b in burst {
        assert_eq!(b.await.unwrap(), StatusCode::OK);
    }
    assert!(pod_pids(&act).len() / 2 > 1);
    // ...then a trickle keeps going while the revision scales down to one pod.
    let until = Instant::now() + Duration::from_secs(6);
    let mut n = 0;
    while Instant::now() < until {
        let (s, b) = get_host(&act, "/delay?ms=50", "hello.local").await;
        assert_eq!((s, &b[..]), (StatusCode::OK, &b"ok"[..]), "request {n}");
        n += 1;
    }
    assert!(
        logged(&act, "scaling hello from"),
        "a scale-down happened during the trickle"
    );
}

#[tokio::test]
async fn an_app_that_crashes_mid_load_is_restarted_and_nothing_hangs() {
    let yaml = config(&[revision(
        "hello",
        "hello.local",
        "    containerConcurrency: 4\n    minScale: 1\n    maxScale: 1\n",
    )]);
    let act = start(&yaml).await;
    assert_eq!(get_host(&act, "/", "hello.local").await.0, StatusCode::OK);

    let load: Vec<_> = (0..8)
        .map(|_| {
            let url = act.url("/delay?ms=100");
            tokio::spawn(async move {
                let mut out = Vec::new();
                let until = Instant::now() + Duration::from_secs(4);
                while Instant::now() < until {
                    let started = Instant::now();
                    let s = get_with(&url, &[("Host", "hello.local")]).await.0;
                    out.push((s, started.elapsed()));
                }
                out
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (s, _) = get_host(&act, "/crash", "hello.local").await;
    assert!(
        s.is_server_error(),
        "the crashing request fails cleanly: {s}"
    );
    let mut after_crash_ok = 0;
    for t in load {
        for (status, took) in t.await.unwrap() {
            // Requests caught by the crash fail fast; none waits for the 30 s timeout.
            assert!(
                took < Duration::from_secs(10),
                "a request hung for {took:?} ({status})"
            );
            if status == StatusCode::OK {
                after_crash_ok += 1;
            }
        }
    }
    assert!(after_crash_ok > 0);
    eventually("restart logged", || async {
        logged(&act, "exit status: 3")
    })
    .await;
    eventually("serving again", || async {
        get_host(&act, "/", "hello.local").await.0 == StatusCode::OK
    })
    .await;
}

#[tokio::test]
async fn two_revisions_on_different_hosts_do_not_interfere() {
    let yaml = config(&[
        revision("alpha", "alpha.local", "    containerConcurrency: 1\n"),
        "  - name: broken\n    hosts: [broken.local]\n    command: [/nonexistent/thaw-app]\n    timeoutSeconds: 30\n".to_owned(),
        revision("beta", "beta.local", "    containerConcurrency: 1\n"),
    ]);
    let act = start(&yaml).await;
    // The broken revision answers 502 naming itself and the error, without waiting for its timeout.
    let started = Instant::now();
    let (s, b) = get_host(&act, "/", "broken.local").await;
    let text = String::from_utf8_lossy(&b);
    assert_eq!(s, StatusCode::BAD_GATEWAY, "{text}");
    assert!(
        text.contains("default/broken") && text.contains("/nonexistent/thaw-app"),
        "{text}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));

    // The others are unaffected, each served by its own pods.
    let (sa, ba) = get_host(&act, "/hello", "alpha.local").await;
    let (sb, bb) = get_host(&act, "/hello", "beta.local").await;
    assert_eq!((sa, sb), (StatusCode::OK, StatusCode::OK));
    assert_eq!(
        (&ba[..], &bb[..]),
        (&b"hello world\n"[..], &b"hello world\n"[..])
    );
    assert!(logged(&act, "scaling alpha from 0 to 1") && logged(&act, "scaling beta from 0 to 1"));
    let count = |rev: &str| {
        let rev = rev.to_owned();
        let act = &act;
        async move {
            act.metrics_text()
                .await
                .lines()
                .filter(|l| {
                    l.starts_with("activator_request_count{")
                        && l.contains(&format!("revision_name=\"{rev}\""))
                        && l.contains("2xx")
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>()
        }
    };
    assert_eq!(count("alpha").await, 1.0);
    assert_eq!(count("beta").await, 1.0);
}

#[tokio::test]
async fn stopping_the_activator_leaves_no_process_behind() {
    let yaml = config(&[revision("hello", "hello.local", "    minScale: 2\n")]);
    let mut act = start(&yaml).await;
    eventually("two pods", || async { pod_pids(&act).len() == 4 }).await;
    assert_eq!(get_host(&act, "/", "hello.local").await.0, StatusCode::OK);
    let pids = pod_pids(&act);
    act.signal("INT");
    let status = act.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "{status:?}");
    assert_eq!(
        pod_pids(&act),
        pids,
        "no pod may start once the activator is stopping"
    );
    for pid in pids {
        assert!(!alive(pid), "process {pid} outlived the activator");
    }
}

#[tokio::test]
async fn an_activator_killed_outright_takes_its_pods_with_it() {
    // SIGKILL runs no cleanup in the activator: only the kernel's parent-death signal
    // (setpriv, and the queue-proxy's own THAW_PARENT_PID) can end the pods.
    if !thaw_shared::lifeline::available() {
        eprintln!("skipping: setpriv (util-linux) with --pdeathsig is not installed");
        return;
    }
    let yaml = config(&[revision("hello", "hello.local", "    minScale: 1\n")]);
    let mut act = start(&yaml).await;
    eventually("one pod", || async { pod_pids(&act).len() == 2 }).await;
    assert_eq!(get_host(&act, "/", "hello.local").await.0, StatusCode::OK);
    let pids = pod_pids(&act);
    assert!(pids.iter().all(|p| alive(*p)));
    act.signal("KILL");
    act.wait_exit(Duration::from_secs(10)).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|p| alive(*p)) {
        assert!(
            Instant::now() < deadline,
            "pod processes outlived the activator by 5 s: {:?}",
            pids.iter().filter(|p| alive(**p)).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_app_that_never_listens_gets_bounded_pods_and_its_requests_a_timeout() {
    // The class from issue 11: requests parked on an app that never binds its port. Knative's
    // KPA scales up from *ready* pods only, and the machine holds a limited number, so the
    // pods started stay bounded; ports are never taken twice; and no request is answered by
    // another revision's pod (a healthy one runs beside it).
    let stuck = revision(
        "stuck",
        "stuck.local",
        "    containerConcurrency: 1\n    timeoutSeconds: 4\n",
    )
    .replace(
        &format!(
            "    command: [{:?}]\n",
            bin("thaw-testapp").display().to_string()
        ),
        "    command: [\"sleep\", \"600\"]\n",
    )
    .replace("    timeoutSeconds: 30\n", "");
    let yaml = config(&[stuck, revision("hello", "hello.local", "    minScale: 1\n")]);
    let act = Activator::start(
        &yaml,
        &[
            "--pod-quiet-period",
            "300ms",
            "--drain-period",
            "1s",
            "--max-local-pods",
            "6",
        ],
    )
    .await;
    eventually("hello's pod", || async {
        get_host(&act, "/", "hello.local").await.0 == StatusCode::OK
    })
    .await;

    let client = http1_client();
    let tasks: Vec<_> = (0..300)
        .map(|_| {
            let client = client.clone();
            let url = act.url("/");
            tokio::spawn(async move {
                let req = http::Request::get(&url)
                    .header("host", "stuck.local")
                    .body(Default::default())
                    .unwrap();
                send(&client, req).await.0
            })
        })
        .collect();
    let mut statuses = std::collections::BTreeMap::new();
    for t in tasks {
        *statuses.entry(t.await.unwrap()).or_insert(0) += 1;
    }
    // Every request timed out waiting for a pod: none was lost, none answered by a process
    // that is not its revision's (200 from hello, 404 from a stranger), none a 502 from a
    // pod that lost its port.
    assert_eq!(
        statuses.keys().copied().collect::<Vec<_>>(),
        vec![StatusCode::GATEWAY_TIMEOUT],
        "{statuses:?}"
    );
    // hello's one pod, and at most 5 more for stuck (the machine's limit of 6).
    let pods = pod_pids(&act).len() / 2;
    assert!(pods <= 6, "started {pods} pods with --max-local-pods 6");
    assert!(pods >= 2, "stuck must have been tried: {pods} pods");
    assert!(logged(&act, "--max-local-pods"), "the limit is logged");
    assert!(!logged(&act, "Address already in use"));
    assert_eq!(get_host(&act, "/", "hello.local").await.0, StatusCode::OK);
}
