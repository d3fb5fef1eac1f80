//! The Knative drop-in, end to end on the testbed: Knative Serving's real controller,
//! autoscaler and webhook (built from the `knative.dev/serving` Go module and installed
//! from its own `config/` by `benches/testbed/knative.sh`) drive a Knative Service with
//! `containerConcurrency: 2` from zero, out under load, through a pod deletion, and back
//! to zero. The same test runs twice: with Thaw's activator and queue-proxy, and with
//! Knative's own Go ones as the control group, which shows the test checks Knative's
//! behaviour and not Thaw's.
//!
//! There is no networking layer (Kourier, Istio): requests go to an activator's pod IP
//! with the `Knative-Serving-*` headers, so the Route and the ksvc stay not Ready; only
//! the Revision must be.
//!
//! The two runs share one testbed and one Knative install, so they take turns.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, Event, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, DynamicObject, ListParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use thaw_benches::harness::{bin, http1_client, HttpClient};
use thaw_benches::testbed::images::repository;
use thaw_benches::testbed::knative::{self, Images};
use thaw_benches::testbed::{until, Testbed};
use tokio::time::Instant;

/// The Revision's container concurrency, checked by the test app itself.
const CC: u64 = 2;
const MAX_SCALE: usize = 4;
const CLIENTS: usize = 30;
/// Each load request's time in the app.
const SLOW_MS: u64 = 400;
/// Knative's minimum windows, so that scaling to zero takes seconds, not minutes.
const AUTOSCALER: &[(&str, &str)] = &[
    ("stable-window", "6s"),
    ("scale-to-zero-grace-period", "6s"),
];
/// Controller round trips and pod start-ups on a busy 2-core machine.
const WITHIN: Duration = Duration::from_secs(180);

/// One Knative install serves one image set at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn phase(images: Images, what: &str) {
    eprintln!("== [{images}] {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn knative_data_plane_end_to_end() {
    end_to_end(Images::Knative).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thaw_data_plane_end_to_end() {
    end_to_end(Images::Thaw).await;
}

/// A request for the revision through an activator; `None` if it never answered.
async fn call(
    http: &HttpClient,
    activator: IpAddr,
    ns: &str,
    revision: &str,
    path: &str,
) -> Option<(http::StatusCode, http::HeaderMap, Bytes)> {
    let req = http::Request::get(format!("http://{activator}:8012{path}"))
        .header("Knative-Serving-Namespace", ns)
        .header("Knative-Serving-Revision", revision)
        .body(Full::<Bytes>::default())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(90), http.request(req))
        .await
        .ok()?
        .ok()?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.ok()?.to_bytes();
    Some((parts.status, parts.headers, body))
}

/// Clients looping requests over the activators until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(activators: &[IpAddr], ns: &str, revision: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let path: &'static str = Box::leak(format!("/delay?ms={SLOW_MS}").into_boxed_str());
        let tasks = (0..CLIENTS)
            .map(|i| {
                let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
                let (activators, ns, revision) =
                    (activators.to_vec(), ns.to_owned(), revision.to_owned());
                tokio::spawn(async move {
                    let http = http1_client();
                    let mut n = i;
                    while !stop.load(Ordering::Relaxed) {
                        let activator = activators[n % activators.len()];
                        n += 1;
                        match call(&http, activator, &ns, &revision, path).await {
                            Some((status, _, _)) if status.is_success() => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            other => {
                                if failed.fetch_add(1, Ordering::Relaxed) < 10 {
                                    eprintln!(
                                        "request via {activator} failed: {:?}",
                                        other.map(|o| (o.0, o.2))
                                    );
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            tasks,
        }
    }

    fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    async fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// The most requests any pod's app saw at once, and its violations of CC, per pod,
/// read from the app's own `/stats` (it listens on the pod IP too).
#[derive(Default)]
struct Watch {
    max_in_flight: HashMap<String, u64>,
    violations: u64,
    most_ready: usize,
    /// (ready pods, the Deployment's replicas) when last seen, printed when it changes:
    /// the autoscaler's decisions and the pods' start-ups over time.
    last: Option<(usize, Option<i32>)>,
    since: Option<Instant>,
}

impl Watch {
    async fn sample(&mut self, client: &Client, ns: &str, revision: &str) {
        let http = http1_client();
        let pods: Vec<Pod> = knative::revision_pods(client, ns, revision).await;
        let ready: Vec<&Pod> = pods.iter().filter(|p| knative::pod_ready(p)).collect();
        self.most_ready = self.most_ready.max(ready.len());
        let want = replicas(client, ns, &format!("{revision}-deployment")).await;
        let since = *self.since.get_or_insert_with(Instant::now);
        if self.last != Some((ready.len(), want)) {
            self.last = Some((ready.len(), want));
            eprintln!(
                "  {:>5.1?} s: {} ready pods, replicas {want:?}",
                since.elapsed().as_secs_f64(),
                ready.len()
            );
        }
        for pod in pods {
            let Some(ip) = knative::pod_ip(&pod) else {
                continue;
            };
            let req = http::Request::get(format!("http://{ip}:8080/stats"))
                .body(Full::<Bytes>::default())
                .unwrap();
            let Ok(Ok(resp)) =
                tokio::time::timeout(Duration::from_secs(2), http.request(req)).await
            else {
                continue;
            };
            let Ok(body) = resp.into_body().collect().await else {
                continue;
            };
            let Ok(stats) = serde_json::from_slice::<serde_json::Value>(&body.to_bytes()) else {
                continue;
            };
            let name = pod.metadata.name.clone().unwrap_or_default();
            let max = stats["max_in_flight"].as_u64().unwrap_or(0);
            let entry = self.max_in_flight.entry(name.clone()).or_default();
            *entry = (*entry).max(max);
            let violations = stats["violations"].as_u64().unwrap_or(0);
            if violations > 0 {
                eprintln!("pod {name}: {violations} CC violations, stats {stats}");
            }
            self.violations = self.violations.max(violations);
        }
    }

    fn max(&self) -> u64 {
        self.max_in_flight.values().copied().max().unwrap_or(0)
    }
}

/// Polls until `f` gives a value, for [`WITHIN`].
async fn poll<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WITHIN;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {WITHIN:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn replicas(client: &Client, ns: &str, deployment: &str) -> Option<i32> {
    Api::<Deployment>::namespaced(client.clone(), ns)
        .get_opt(deployment)
        .await
        .ok()
        .flatten()
        .and_then(|d| d.spec.replicas)
}

fn env_of(c: &Container) -> HashMap<String, String> {
    c.env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
        .collect()
}

/// What Knative's controller built: its own pod spec with the configured queue-proxy.
fn check_pod_spec(images: Images, deployment: &Deployment, revision: &str) {
    let spec = deployment
        .spec
        .template
        .spec
        .as_ref()
        .expect("the Revision's Deployment has a pod spec");
    let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["user-container", "queue-proxy"], "{spec:?}");
    let user = &spec.containers[0];
    let queue = &spec.containers[1];
    assert_eq!(user.image.as_deref(), Some("thaw.local/testapp"));
    assert_eq!(
        queue.image.as_deref().map(repository),
        Some(images.queue_image()),
        "the queue-proxy sidecar is config-deployment's queue-sidecar-image"
    );
    let env = env_of(queue);
    for (key, want) in [
        ("SERVING_REVISION", revision),
        ("CONTAINER_CONCURRENCY", "2"),
        ("USER_PORT", "8080"),
        ("QUEUE_SERVING_PORT", "8012"),
        ("SERVING_SERVICE", "hello"),
    ] {
        assert_eq!(
            env.get(key).map(String::as_str),
            Some(want),
            "queue-proxy env {key}"
        );
    }
    for key in [
        "SERVING_NAMESPACE",
        "SERVING_POD",
        "SERVING_POD_IP",
        "SERVING_READINESS_PROBE",
        "REVISION_TIMEOUT_SECONDS",
        "SYSTEM_NAMESPACE",
    ] {
        assert!(
            queue
                .env
                .iter()
                .flatten()
                .any(|e| e.name == key && (e.value.is_some() || e.value_from.is_some())),
            "queue-proxy env {key} is missing: {:?}",
            queue.env
        );
    }
    // The user container's readiness probe moves to the queue-proxy, which Knative's
    // kubelet-facing probe reaches with K-Network-Probe on :8012.
    let probe = queue
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .expect("the queue-proxy has an httpGet readiness probe");
    assert_eq!(
        probe.port,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(8012)
    );
    assert!(
        probe
            .http_headers
            .iter()
            .flatten()
            .any(|h| h.name == "K-Network-Probe" && h.value == "queue"),
        "{probe:?}"
    );
    let pre_stop = user
        .lifecycle
        .as_ref()
        .and_then(|l| l.pre_stop.as_ref())
        .and_then(|h| h.http_get.as_ref())
        .expect("the user container drains through the queue-proxy's preStop");
    assert_eq!(pre_stop.path.as_deref(), Some("/wait-for-drain"));
    assert_eq!(
        pre_stop.port,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(8022)
    );
    let ports: Vec<i32> = queue
        .ports
        .iter()
        .flatten()
        .map(|p| p.container_port)
        .collect();
    for port in [8012, 9090, 9091] {
        assert!(ports.contains(&port), "queue-proxy ports {ports:?}");
    }
}

async fn end_to_end(images: Images) {
    let Some(testbed) = Testbed::shared() else {
        return;
    };
    let _turn = SERIAL.lock().await;
    let started = Instant::now();
    if images == Images::Thaw {
        // The images map to the workspace's binaries, which this test binary does not
        // build: `cargo test --workspace` does (or cargo build -p thaw-activator -p
        // thaw-queue-proxy).
        bin("activator");
        bin("queue-proxy");
    }

    phase(images, "knative.sh: Knative Serving's control plane");
    let took = knative::install(testbed, images, AUTOSCALER).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("[{images}] knative.sh --images {images} took {took:.1?}");
    let client = testbed.client().await;
    let activator: Deployment = Api::namespaced(client.clone(), knative::SYSTEM_NAMESPACE)
        .get("activator")
        .await
        .unwrap();
    let activator_image = activator
        .spec
        .template
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .and_then(|c| c.image.clone());
    // By repository: the overlay that swaps Thaw in (deploy/knative/testbed) tags it.
    assert_eq!(
        activator_image.as_deref().map(repository),
        Some(images.activator_image())
    );
    let activators = poll("the activators to be Ready", || async {
        Some(knative::activator_ips(&client).await).filter(|a| !a.is_empty())
    })
    .await;

    phase(images, "a Knative Service with containerConcurrency 2");
    let ns = testbed.namespace(&client, "kn").await;
    let ksvc: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": {"name": "hello", "namespace": ns},
        "spec": {"template": {
            "metadata": {"annotations": {
                "autoscaling.knative.dev/max-scale": MAX_SCALE.to_string(),
            }},
            "spec": {
                "containerConcurrency": CC,
                "timeoutSeconds": 60,
                "containers": [{
                    "image": "thaw.local/testapp",
                    // On the pod IP too, so the test reads /stats beside the queue-proxy.
                    "args": ["--host", "0.0.0.0"],
                    "env": [{"name": "MAX_CONCURRENCY", "value": CC.to_string()}],
                }],
            },
        }},
    }))
    .unwrap();
    let services = knative::services(&client, &ns);
    services
        .create(&PostParams::default(), &ksvc)
        .await
        .unwrap_or_else(|e| panic!("create the Knative Service: {e}"));
    let revision = poll("Knative's controller to create a Revision", || async {
        knative::latest_revision(&client, &ns, "hello").await
    })
    .await;
    let deployment_name = format!("{revision}-deployment");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let deployment = poll("the Revision's Deployment", || async {
        deployments.get_opt(&deployment_name).await.ok().flatten()
    })
    .await;
    check_pod_spec(images, &deployment, &revision);

    phase(images, "its pods go Ready, and the Revision Ready");
    let ready_at = Instant::now();
    let revisions = knative::revisions(&client, &ns);
    while !knative::revision_ready(&client, &ns, &revision).await {
        if ready_at.elapsed() > WITHIN {
            let rev = revisions.get(&revision).await.ok();
            panic!(
                "the Revision {revision} is not Ready after {WITHIN:?}: {:?}; its pods: {:?}",
                rev.map(|r| knative::condition_message(&r, "Ready")),
                knative::revision_pods(&client, &ns, &revision)
                    .await
                    .iter()
                    .map(|p| (p.metadata.name.clone(), p.status.clone()))
                    .collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    eprintln!(
        "[{images}] Revision {revision} Ready after {:.1?}",
        ready_at.elapsed()
    );

    phase(
        images,
        "with no traffic, Knative's autoscaler scales it to zero",
    );
    let zero_at = Instant::now();
    until("the Revision at zero with no pod left", WITHIN, || async {
        replicas(&client, &ns, &deployment_name).await == Some(0)
            && knative::revision_pods(&client, &ns, &revision)
                .await
                .is_empty()
    })
    .await;
    eprintln!("[{images}] at zero after {:.1?}", zero_at.elapsed());

    phase(images, "a request through an activator wakes it");
    let http = http1_client();
    eprintln!("[{images}] cold request sent at {}", Timestamp::now());
    let cold_at = Instant::now();
    let (status, headers, body) = call(&http, activators[0], &ns, &revision, "/hello")
        .await
        .expect("the cold request is answered");
    let cold = cold_at.elapsed();
    assert_eq!(status, 200, "{body:?}");
    assert_eq!(&body[..], b"hello world\n");
    let cold_header = headers
        .get("thaw-cold-start")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    eprintln!("[{images}] cold start served in {cold:.1?} (Thaw-Cold-Start: {cold_header:?})");
    if images == Images::Thaw {
        assert!(cold_header.is_some(), "no Thaw-Cold-Start in {headers:?}");
    }
    // Pod start-up is ~1 s here; tens of seconds meant a broken network (the testbed's
    // bridge once changed its MAC under the pods).
    assert!(
        cold < Duration::from_secs(20),
        "the cold start took {cold:?}"
    );

    phase(
        images,
        "30 concurrent slow requests: scale out, never more than CC",
    );
    let mut watch = Watch::default();
    let load = Load::start(&activators, &ns, &revision);
    let load_at = Instant::now();
    let mut scaled_out = None;
    while load_at.elapsed() < Duration::from_secs(120) {
        watch.sample(&client, &ns, &revision).await;
        if watch.most_ready > 1 && scaled_out.is_none() {
            scaled_out = Some(load_at.elapsed());
        }
        // Past scale-out and a few seconds at full width: on to the pod deletion.
        if scaled_out.is_some_and(|t| load_at.elapsed() > t + Duration::from_secs(10)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    eprintln!(
        "[{images}] scaled out to {} ready pods after {scaled_out:?}; most in flight per pod so far {:?}",
        watch.most_ready, watch.max_in_flight
    );
    assert!(
        watch.most_ready > 1,
        "Knative's autoscaler did not scale out under {CLIENTS} clients"
    );

    phase(images, "delete a pod under load");
    let failed_before = load.failed();
    let victim = knative::revision_pods(&client, &ns, &revision)
        .await
        .into_iter()
        .find(knative::pod_ready)
        .and_then(|p| p.metadata.name)
        .expect("a ready pod to delete");
    Api::<Pod>::namespaced(client.clone(), &ns)
        .delete(&victim, &DeleteParams::default())
        .await
        .unwrap();
    let deleted_at = Instant::now();
    while deleted_at.elapsed() < Duration::from_secs(15) {
        watch.sample(&client, &ns, &revision).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let failed_by_delete = load.failed() - failed_before;
    // The user container's preStop (the queue-proxy's /wait-for-drain) ran and answered.
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let hook_failures: Vec<String> = events
        .list(&ListParams::default().fields(&format!("involvedObject.name={victim}")))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("FailedPreStopHook"))
        .filter_map(|e| e.message)
        .collect();
    assert!(
        hook_failures.is_empty(),
        "preStop failed: {hook_failures:?}"
    );
    let (ok, failed) = load.finish().await;
    eprintln!(
        "[{images}] load: {ok} ok, {failed} failed ({failed_before} before the deletion, \
         {failed_by_delete} after deleting {victim}); most in flight per pod {:?}; violations {}",
        watch.max_in_flight, watch.violations
    );
    assert!(
        watch.max() <= CC,
        "a pod ran more than {CC} at once: {:?}",
        watch.max_in_flight
    );
    assert_eq!(watch.violations, 0, "the app counted CC violations");
    assert_eq!(failed_before, 0, "requests failed before the pod deletion");
    assert!(
        failed_by_delete <= CC,
        "{failed_by_delete} requests failed after deleting a pod that held at most {CC}"
    );
    assert!(ok > 0);

    phase(images, "after the load, back to zero with no pod left");
    let zero_at = Instant::now();
    until(
        "the Revision back at zero with no pod left",
        WITHIN,
        || async {
            replicas(&client, &ns, &deployment_name).await == Some(0)
                && knative::revision_pods(&client, &ns, &revision)
                    .await
                    .is_empty()
        },
    )
    .await;
    eprintln!("[{images}] back at zero after {:.1?}", zero_at.elapsed());

    services
        .delete("hello", &DeleteParams::default())
        .await
        .unwrap();
    eprintln!(
        "[{images}] end to end in {:.1?} (install included)",
        started.elapsed()
    );
}
