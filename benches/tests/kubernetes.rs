//! Thaw on plain Kubernetes, end to end on the testbed's real control plane: the
//! manifests in `deploy/kubernetes/testbed` applied as a user would, the example function
//! injected by the webhook, scaled from zero by the activators' built-in autoscaler and
//! back, with the leader killed and the API server stopped under load.
//!
//! One test, in phases: the phases share the activators, and running them in parallel
//! would make each one's load the other's noise.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;
use thaw_benches::harness::{http1_client, metric_value, HttpClient};
use thaw_benches::testbed::{repo_root, until, Testbed};
use tokio::time::Instant;

const SYSTEM: &str = "thaw-system";
const HOST: &str = "hello.example.com";
/// The function's container concurrency and max scale in this test.
const CC: u64 = 2;
const MAX_SCALE: usize = 4;
/// Pod start-ups and controller round trips on a busy 2-core machine.
const WITHIN: Duration = Duration::from_secs(120);

fn phase(what: &str) {
    eprintln!("== {what}");
}

fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_ip(pod: &Pod) -> Option<IpAddr> {
    pod.status.as_ref()?.pod_ip.as_ref()?.parse().ok()
}

async fn pods(client: &Client, ns: &str, selector: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(selector))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
}

async fn ready_pods(client: &Client, ns: &str, selector: &str) -> Vec<Pod> {
    pods(client, ns, selector)
        .await
        .into_iter()
        .filter(is_ready)
        .collect()
}

/// Sends one request for the function to an activator; `None` if it never answered.
async fn call(
    client: &HttpClient,
    activator: IpAddr,
    path: &str,
) -> Option<(http::StatusCode, http::HeaderMap, Bytes)> {
    let req = http::Request::get(format!("http://{activator}:8012{path}"))
        .header(http::header::HOST, HOST)
        .body(Full::<Bytes>::default())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(60), client.request(req))
        .await
        .ok()?
        .ok()?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.ok()?.to_bytes();
    Some((parts.status, parts.headers, body))
}

/// Clients that loop requests over the given activators until stopped, counting what
/// came back.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(clients: usize, activators: Vec<IpAddr>, path: &'static str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let tasks = (0..clients)
            .map(|i| {
                let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
                let activators = activators.clone();
                tokio::spawn(async move {
                    let client = http1_client();
                    let mut n = i;
                    while !stop.load(Ordering::Relaxed) {
                        let activator = activators[n % activators.len()];
                        n += 1;
                        match call(&client, activator, path).await {
                            Some((status, _, _)) if status.is_success() => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            other => {
                                if failed.fetch_add(1, Ordering::Relaxed) < 5 {
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

async fn replicas(client: &Client, ns: &str, name: &str) -> i32 {
    Api::<Deployment>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .ok()
        .and_then(|d| d.spec.replicas)
        .unwrap_or(-1)
}

async fn leader(client: &Client) -> Option<String> {
    Api::<Lease>::namespaced(client.clone(), SYSTEM)
        .get_opt("thaw-autoscaler")
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec?.holder_identity)
        .filter(|h| !h.is_empty())
}

/// The test app's `/stats` on every function pod, through its queue-proxy.
async fn app_stats(client: &Client, ns: &str) -> Vec<serde_json::Value> {
    let http = http1_client();
    let mut out = Vec::new();
    for pod in ready_pods(client, ns, "app=hello").await {
        let Some(ip) = pod_ip(&pod) else { continue };
        let req = http::Request::get(format!("http://{ip}:8012/stats"))
            .body(Full::<Bytes>::default())
            .unwrap();
        if let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(5), http.request(req)).await
        {
            if let Ok(body) = resp.into_body().collect().await {
                if let Ok(v) = serde_json::from_slice(&body.to_bytes()) {
                    out.push(v);
                }
            }
        }
    }
    out
}

/// The deepest breaker queue over the function's pods' queue-proxies right now
/// (`revision_queue_depth` on the user metrics port). The activators together never send
/// a pod more than CC, so a queue-proxy never has to queue anything.
async fn deepest_queue(client: &Client, ns: &str) -> f64 {
    let http = http1_client();
    let mut deepest = 0.0f64;
    for pod in ready_pods(client, ns, "app=hello").await {
        let Some(ip) = pod_ip(&pod) else { continue };
        let req = http::Request::get(format!("http://{ip}:9091/metrics"))
            .body(Full::<Bytes>::default())
            .unwrap();
        let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(5), http.request(req)).await
        else {
            continue;
        };
        let Ok(body) = resp.into_body().collect().await else {
            continue;
        };
        let text = String::from_utf8_lossy(&body.to_bytes()).into_owned();
        deepest = deepest.max(metric_value(&text, "revision_queue_depth", ""));
    }
    deepest
}

/// The sum over activators of the permits each may hold for the function
/// (`activator_capacity`): with subsetting it is CC × the pods, not activators × that.
async fn activators_capacity(activators: &[IpAddr], ns: &str) -> f64 {
    let http = http1_client();
    let mut sum = 0.0;
    for ip in activators {
        let req = http::Request::get(format!("http://{ip}:9090/metrics"))
            .body(Full::<Bytes>::default())
            .unwrap();
        let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(5), http.request(req)).await
        else {
            continue;
        };
        let Ok(body) = resp.into_body().collect().await else {
            continue;
        };
        let text = String::from_utf8_lossy(&body.to_bytes()).into_owned();
        let fragment = format!("namespace_name=\"{ns}\"");
        if text
            .lines()
            .any(|l| l.starts_with("activator_capacity{") && l.contains(&fragment))
        {
            sum += metric_value(&text, "activator_capacity", &fragment);
        }
    }
    sum
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_platform_end_to_end() {
    let Some(testbed) = Testbed::shared() else {
        return;
    };
    let client = testbed.client().await;
    let root = repo_root();

    phase("apply deploy/kubernetes/testbed as a user would");
    let overlay = root.join("deploy/kubernetes/testbed");
    let (ok, out) = testbed.kubectl(&["apply", "-k", overlay.to_str().unwrap()]);
    assert!(ok, "kubectl apply -k {}: {out}", overlay.display());
    let selector = "app.kubernetes.io/name=thaw-activator";
    until("2 ready activators", WITHIN, || async {
        ready_pods(&client, SYSTEM, selector).await.len() == 2
    })
    .await;
    until("the webhook to write its caBundle", WITHIN, || async {
        Api::<MutatingWebhookConfiguration>::all(client.clone())
            .get("thaw-sidecar-injector")
            .await
            .ok()
            .and_then(|c| c.webhooks)
            .is_some_and(|w| {
                w.iter().all(|w| {
                    w.client_config
                        .ca_bundle
                        .as_ref()
                        .is_some_and(|b| !b.0.is_empty())
                })
            })
    })
    .await;
    until("a leader", WITHIN, || async {
        leader(&client).await.is_some()
    })
    .await;

    phase("apply the example function; the webhook injects the sidecar");
    let ns = testbed.namespace(&client, "hello").await;
    let example = root.join("deploy/kubernetes/examples/hello/testbed");
    let (ok, out) = testbed.kubectl(&["apply", "-n", &ns, "-k", example.to_str().unwrap()]);
    assert!(ok, "kubectl apply -k {}: {out}", example.display());
    // Tighter settings than the example's, so the test does not wait minutes: a 6 s
    // window, no grace, CC 2 checked by the app itself.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let patch = json!({
        "metadata": {"annotations": {
            "thaw.dev/hosts": HOST,
            "thaw.dev/container-concurrency": CC.to_string(),
            "thaw.dev/max-scale": MAX_SCALE.to_string(),
            "thaw.dev/stable-window": "6s",
            "thaw.dev/scale-to-zero-grace-period": "0s",
        }},
        "spec": {"replicas": 1, "template": {"spec": {"containers": [
            {"name": "app", "env": [{"name": "MAX_CONCURRENCY", "value": CC.to_string()}]}
        ]}}},
    });
    deployments
        .patch("hello", &PatchParams::default(), &Patch::Strategic(&patch))
        .await
        .unwrap();
    until(
        "a hello pod with the queue-proxy sidecar",
        WITHIN,
        || async {
            pods(&client, &ns, "app=hello").await.iter().any(|p| {
                p.spec
                    .as_ref()
                    .is_some_and(|s| s.containers.iter().any(|c| c.name == "queue-proxy"))
            })
        },
    )
    .await;

    phase("idle, it scales to zero");
    until("hello at zero with no pod left", WITHIN, || async {
        replicas(&client, &ns, "hello").await == 0
            && pods(&client, &ns, "app=hello").await.is_empty()
    })
    .await;

    phase("a request to an activator is served after a cold start");
    let activators: Vec<IpAddr> = ready_pods(&client, SYSTEM, selector)
        .await
        .iter()
        .filter_map(pod_ip)
        .collect();
    assert_eq!(activators.len(), 2);
    let http = http1_client();
    let started = Instant::now();
    let (status, headers, body) = call(&http, activators[1], "/hello")
        .await
        .expect("the cold request was not answered");
    assert_eq!(status, 200, "{body:?}");
    assert_eq!(body, "hello world\n");
    assert!(
        headers.contains_key("thaw-cold-start"),
        "no Thaw-Cold-Start header: {headers:?}"
    );
    eprintln!("cold start through the activator: {:?}", started.elapsed());

    phase("50 concurrent clients scale it out within max scale, CC never exceeded");
    let load = Load::start(50, activators.clone(), "/delay?ms=200");
    until("more than one pod", WITHIN, || async {
        ready_pods(&client, &ns, "app=hello").await.len() > 1
    })
    .await;
    let mut peak = 0;
    let mut queued = 0.0f64;
    for _ in 0..40 {
        let n = pods(&client, &ns, "app=hello").await.len();
        peak = peak.max(n);
        queued = queued.max(deepest_queue(&client, &ns).await);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Subsetting: together the activators may hold CC per ready pod, no more.
    until(
        "the activators' capacity to add up to CC × pods",
        WITHIN,
        || async {
            let pods = ready_pods(&client, &ns, "app=hello").await.len();
            let sum = activators_capacity(&activators, &ns).await;
            eprintln!("{pods} ready pods; the activators' capacity adds up to {sum}");
            pods > 0 && sum == (CC as usize * pods) as f64
        },
    )
    .await;
    let stats = app_stats(&client, &ns).await;
    let (ok, failed) = load.finish().await;
    eprintln!("load: {ok} ok, {failed} failed, peak {peak} pods; app stats: {stats:?}");
    assert!(peak <= MAX_SCALE, "{peak} pods, max scale {MAX_SCALE}");
    // Reassignments (pods coming and going, seen by the activators a moment apart) can
    // briefly overlap two activators' slices; the queue-proxy's breaker absorbs that,
    // so the app itself never sees more than CC (checked below).
    eprintln!("deepest queue-proxy queue sampled: {queued}");
    assert_eq!(failed, 0, "requests failed under load");
    assert!(!stats.is_empty());
    for s in &stats {
        assert!(
            s["max_in_flight"].as_u64().unwrap() <= CC,
            "a pod saw more than CC: {s}"
        );
        assert_eq!(s["violations"].as_u64(), Some(0), "{s}");
    }

    phase("idle again, back to zero with no pod left");
    until("hello at zero again", WITHIN, || async {
        replicas(&client, &ns, "hello").await == 0
            && pods(&client, &ns, "app=hello").await.is_empty()
    })
    .await;

    phase("a bad annotation: an Event on the Deployment, the last good settings kept");
    deployments
        .patch(
            "hello",
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"annotations": {"thaw.dev/max-scale": "lots"}}})),
        )
        .await
        .unwrap();
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &ns);
    until(
        "an InvalidAnnotation Event naming thaw.dev/max-scale",
        WITHIN,
        || async {
            events.list(&ListParams::default()).await.is_ok_and(|l| {
                l.items.iter().any(|e| {
                    e.reason.as_deref() == Some("InvalidAnnotation")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("hello")
                        && e.note
                            .as_deref()
                            .is_some_and(|n| n.contains("thaw.dev/max-scale"))
                })
            })
        },
    )
    .await;
    let (status, _, _) = call(&http, activators[0], "/hello")
        .await
        .expect("the function stopped serving after a bad annotation");
    assert_eq!(status, 200);
    deployments
        .patch(
            "hello",
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"annotations": {"thaw.dev/max-scale": MAX_SCALE.to_string()}}})),
        )
        .await
        .unwrap();

    phase("kill the leader under load: the other takes over scaling");
    let load = Load::start(10, activators.clone(), "/delay?ms=100");
    until("hello serving again", WITHIN, || async {
        !ready_pods(&client, &ns, "app=hello").await.is_empty()
    })
    .await;
    let old_leader = leader(&client).await.expect("a leader");
    let activator_pods: Api<Pod> = Api::namespaced(client.clone(), SYSTEM);
    let killed_ip = activator_pods
        .get(&old_leader)
        .await
        .ok()
        .as_ref()
        .and_then(pod_ip)
        .expect("the leader's pod");
    let survivor = *activators.iter().find(|ip| **ip != killed_ip).unwrap();
    // Clients move to the survivor, as an ingress does once the killed pod leaves the
    // endpoints; what was in flight on the killed pod is lost.
    let before = (
        load.ok.load(Ordering::Relaxed),
        load.failed.load(Ordering::Relaxed),
    );
    activator_pods
        .delete(&old_leader, &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    let killed_at = Instant::now();
    let survivor_load = Load::start(10, vec![survivor], "/delay?ms=100");
    let (ok_old, failed_old) = load.finish().await;
    until(
        "another activator leads",
        Duration::from_secs(30),
        || async { leader(&client).await.is_some_and(|l| l != old_leader) },
    )
    .await;
    let failover = killed_at.elapsed();
    eprintln!(
        "failover: {failover:?}; requests lost on the killed activator's clients: {} (of {} sent after the kill)",
        failed_old - before.1,
        (ok_old + failed_old) - (before.0 + before.1)
    );
    assert!(
        failover < Duration::from_secs(15),
        "failover took {failover:?}"
    );
    // The new leader scales: more load through the survivor grows the function.
    let more = Load::start(30, vec![survivor], "/delay?ms=200");
    until("the new leader scales out", WITHIN, || async {
        ready_pods(&client, &ns, "app=hello").await.len() > 1
    })
    .await;
    let (ok_more, failed_more) = more.finish().await;
    let (ok_survivor, failed_survivor) = survivor_load.finish().await;
    eprintln!(
        "through the survivor: {} ok, {} failed",
        ok_more + ok_survivor,
        failed_more + failed_survivor
    );
    assert_eq!(
        failed_more + failed_survivor,
        0,
        "requests through the surviving activator failed"
    );

    phase("stop the API server for 10 s under load: serving goes on, scaling resumes");
    until("2 ready activators again", WITHIN, || async {
        ready_pods(&client, SYSTEM, selector).await.len() == 2
    })
    .await;
    let activators: Vec<IpAddr> = ready_pods(&client, SYSTEM, selector)
        .await
        .iter()
        .filter_map(pod_ip)
        .collect();
    let load = Load::start(10, activators.clone(), "/delay?ms=100");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stopped = testbed.stop_apiserver();
    let outage = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    // Readiness stays up and says what is wrong.
    let probe = http::Request::get(format!("http://{}:8012/", activators[0]))
        .header("K-Kubelet-Probe", "activator")
        .body(Full::<Bytes>::default())
        .unwrap();
    let resp = http.request(probe).await.expect("readiness probe");
    let ready_status = resp.status();
    let ready_body = resp.into_body().collect().await.unwrap().to_bytes();
    eprintln!("readiness during the outage: {ready_status} {ready_body:?}");
    assert_eq!(ready_status, 200);
    assert!(
        String::from_utf8_lossy(&ready_body).contains("serving on the last-known state"),
        "{ready_body:?}"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let during = load.ok.load(Ordering::Relaxed);
    stopped.restart();
    eprintln!("API server back after {:?}", outage.elapsed());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (ok, failed) = load.finish().await;
    eprintln!("under the outage: {ok} ok, {failed} failed ({during} ok by the restart)");
    assert_eq!(failed, 0, "requests failed while the API server was away");
    assert!(during > 0);
    until(
        "scaling resumes: back to zero after the load",
        WITHIN,
        || async {
            replicas(&client, &ns, "hello").await == 0
                && pods(&client, &ns, "app=hello").await.is_empty()
        },
    )
    .await;
}

/// An activator whose service account may not read Deployments says so in one log line
/// naming the verb and resource, and its readiness says what it waits for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_permission_is_named_in_the_log_and_readiness() {
    let Some(testbed) = Testbed::shared() else {
        return;
    };
    let client = testbed.client().await;
    let ns = testbed.namespace(&client, "norbac").await;
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "lonely"},
        "spec": {
            "selector": {"matchLabels": {"app": "lonely"}},
            "template": {
                "metadata": {"labels": {"app": "lonely"}},
                "spec": {"containers": [{
                    "name": "activator",
                    "image": "thaw.local/activator",
                    "env": [
                        {"name": "THAW_PLATFORM", "value": "kubernetes"},
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    ],
                }]},
            },
        },
    }))
    .unwrap();
    Api::<Deployment>::namespaced(client.clone(), &ns)
        .create(&Default::default(), &deployment)
        .await
        .unwrap();
    until("the activator pod running", WITHIN, || async {
        pods(&client, &ns, "app=lonely")
            .await
            .iter()
            .any(|p| pod_ip(p).is_some())
    })
    .await;
    let pod = pods(&client, &ns, "app=lonely")
        .await
        .into_iter()
        .find(|p| pod_ip(p).is_some())
        .unwrap();
    let name = pod.metadata.name.clone().unwrap();
    let wanted = "forbidden: RBAC must allow list deployments.apps in all namespaces";
    until("the forbidden line in its log", WITHIN, || async {
        testbed
            .container_log(&ns, &name, "activator")
            .contains(wanted)
    })
    .await;
    let log = testbed.container_log(&ns, &name, "activator");
    assert_eq!(
        log.matches(wanted).count(),
        1,
        "one line, not one per retry:\n{log}"
    );
    let ip = pod_ip(&pod).unwrap();
    until("readiness to say what it waits for", WITHIN, || async {
        let http = http1_client();
        let probe = http::Request::get(format!("http://{ip}:8012/"))
            .header("K-Kubelet-Probe", "activator")
            .body(Full::<Bytes>::default())
            .unwrap();
        let Ok(resp) = http.request(probe).await else {
            return false;
        };
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let body = String::from_utf8_lossy(&body);
        eprintln!("readiness: {status} {body}");
        status == 503 && body.contains("waiting for the first list") && body.contains(wanted)
    })
    .await;
}
