//! `queue-proxy inject` proven on the testbed: the injected Deployment and Service are
//! accepted by the real API server with strict field validation, the pod becomes Ready
//! through the sidecar's probe (which runs the user's moved probe), and the sidecar
//! serves the app and its metrics on the pod's IP.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams};
use kube::{Api, Client};
use thaw_benches::harness::{get, get_with};
use thaw_benches::testbed::Testbed;

/// Pod start-up and controller round trips on a busy 2-core machine.
const WITHIN: Duration = Duration::from_secs(90);

/// Waits up to [`WITHIN`] for `check`.
async fn until<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    thaw_benches::testbed::until(what, WITHIN, check).await
}

/// The test app as a user would write it: a named port, a readiness probe on it, and
/// the opt-in label; no PORT (the injector sets it).
fn manifest(ns: &str) -> String {
    format!(
        "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: hello
  namespace: {ns}
  annotations:
    thaw.dev/container-concurrency: \"4\"
    thaw.dev/timeout-seconds: \"30\"
spec:
  replicas: 1
  selector:
    matchLabels: {{app: hello}}
  template:
    metadata:
      labels: {{app: hello, thaw.dev/inject: enabled}}
    spec:
      containers:
      - name: app
        image: thaw.local/testapp
        ports: [{{name: http, containerPort: 8080}}]
        readinessProbe:
          httpGet: {{path: /healthz, port: http}}
          periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata:
  name: hello
  namespace: {ns}
spec:
  selector: {{app: hello}}
  ports: [{{name: http, port: 80, targetPort: http}}]
"
    )
}

/// Runs the real `queue-proxy inject` on `input`.
fn inject(input: &str) -> String {
    let mut child = Command::new(thaw_benches::harness::bin("queue-proxy"))
        .args(["inject", "-", "--image", "thaw.local/queue-proxy"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "queue-proxy inject failed: {stderr}");
    assert!(stderr.ends_with("injected 1 of 2 objects\n"), "{stderr}");
    String::from_utf8(out.stdout).unwrap()
}

/// Server-side apply with strict field validation: an unknown or misplaced field in
/// the injected output is an error, not silently dropped.
async fn apply(client: &Client, ns: &str, doc: serde_json::Value) {
    let resource = match doc["kind"].as_str() {
        Some("Deployment") => ApiResource::erase::<Deployment>(&()),
        Some("Service") => ApiResource::erase::<Service>(&()),
        other => panic!("unexpected kind {other:?}"),
    };
    let name = doc["metadata"]["name"].as_str().unwrap().to_owned();
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &resource);
    let params = PatchParams::apply("thaw-inject-test").validation_strict();
    api.patch(&name, &params, &Patch::Apply(&doc))
        .await
        .unwrap_or_else(|e| panic!("apply {name}: {e}\n{doc:#}"));
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

#[tokio::test]
async fn an_injected_deployment_serves_through_its_sidecar() {
    let Some(testbed) = Testbed::shared() else {
        return;
    };
    let client = testbed.client().await;
    let ns = testbed.namespace(&client, "inject").await;
    let injected = inject(&manifest(&ns));
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&injected).unwrap();
    assert_eq!(docs.len(), 2);
    for doc in docs {
        apply(&client, &ns, doc).await;
    }

    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let list = ListParams::default().labels("app=hello");
    let deadline = tokio::time::Instant::now() + WITHIN;
    while !pods
        .list(&list)
        .await
        .is_ok_and(|l| l.items.iter().any(is_ready))
    {
        if tokio::time::Instant::now() > deadline {
            // Say why: the pod's status and what its containers wrote.
            let items = pods.list(&list).await.unwrap().items;
            let mut why = String::new();
            for p in &items {
                let name = p.metadata.name.clone().unwrap_or_default();
                why += &format!("{name}: {:#?}\n", p.status);
                for c in ["app", "queue-proxy"] {
                    why += &format!("--- {c}:\n{}\n", testbed.container_log(&ns, &name, c));
                }
            }
            panic!("no Ready pod within {WITHIN:?}:\n{why}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let pod = pods
        .list(&list)
        .await
        .unwrap()
        .items
        .into_iter()
        .find(is_ready)
        .unwrap();
    let spec = pod.spec.as_ref().unwrap();
    let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["app", "queue-proxy"]);
    assert!(
        spec.containers[0].readiness_probe.is_none(),
        "the user probe moved into the sidecar"
    );
    assert_eq!(spec.termination_grace_period_seconds, Some(30));
    let ip = pod.status.as_ref().unwrap().pod_ip.clone().unwrap();

    // The sidecar forwards to the app on 127.0.0.1:8080 (the app listens there only).
    let (status, _, body) = get(&format!("http://{ip}:8012/")).await;
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"hello world\n");
    // A kubelet-style health check runs the user's probe (/healthz) through the sidecar.
    let (status, _, body) = get_with(
        &format!("http://{ip}:8012/"),
        &[
            ("User-Agent", "kube-probe/1.37"),
            ("K-Network-Probe", "queue"),
        ],
    )
    .await;
    assert_eq!((status.as_u16(), &body[..]), (200, &b"queue"[..]));
    let (status, _, body) = get(&format!("http://{ip}:9090/metrics")).await;
    assert_eq!(status, 200);
    let pod_name = pod.metadata.name.clone().unwrap();
    assert!(
        String::from_utf8_lossy(&body).contains(&pod_name),
        "the downward API named the pod"
    );

    // The Service now reaches the sidecar: its EndpointSlice lists the pod on 8012.
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
    let by_service = ListParams::default().labels("kubernetes.io/service-name=hello");
    until("the EndpointSlice to list the pod on port 8012", || async {
        slices.list(&by_service).await.is_ok_and(|l| {
            l.items.iter().any(|s| {
                s.ports.iter().flatten().any(|p| p.port == Some(8012))
                    && s.endpoints
                        .iter()
                        .flatten()
                        .any(|e| e.addresses.contains(&ip))
            })
        })
    })
    .await;
}
