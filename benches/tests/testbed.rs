//! The testbed, proven against its real control plane: kube-apiserver and
//! kube-controller-manager built from k8s.io/kubernetes, with the node running pods as
//! processes in network namespaces. The Deployment, ReplicaSet and EndpointSlice
//! controllers here are Kubernetes' own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Event, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
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

async fn create<K>(client: &Client, ns: &str, value: serde_json::Value) -> K
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let object: K = serde_json::from_value(value).unwrap();
    Api::<K>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &object)
        .await
        .unwrap()
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_ip(pod: &Pod) -> Option<String> {
    pod.status.as_ref()?.pod_ip.clone()
}

async fn pods(client: &Client, ns: &str, selector: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(selector))
        .await
        .unwrap()
        .items
}

async fn ready_ips(client: &Client, ns: &str, selector: &str) -> BTreeSet<String> {
    pods(client, ns, selector)
        .await
        .iter()
        .filter(|p| is_ready(p) && p.metadata.deletion_timestamp.is_none())
        .filter_map(pod_ip)
        .collect()
}

/// The ready addresses the EndpointSlice controller lists for a Service.
async fn slice_ips(client: &Client, ns: &str, service: &str) -> BTreeSet<String> {
    Api::<EndpointSlice>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={service}")))
        .await
        .unwrap()
        .items
        .into_iter()
        .flat_map(|s| s.endpoints.unwrap_or_default())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(false))
        .flat_map(|e| e.addresses)
        .collect()
}

async fn events_of(client: &Client, ns: &str, object: &str) -> Vec<String> {
    Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default().fields(&format!("involvedObject.name={object}")))
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|e| {
            format!(
                "{} {}",
                e.reason.unwrap_or_default(),
                e.message.unwrap_or_default()
            )
        })
        .collect()
}

fn testapp_deployment(name: &str, replicas: i32) -> serde_json::Value {
    json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "terminationGracePeriodSeconds": 5,
                    "containers": [{
                        "name": "app",
                        "image": "thaw.local/testapp:v1",
                        "args": ["--host", "0.0.0.0"],
                        "env": [{"name": "PORT", "value": "8080"}],
                        "ports": [{"name": "http", "containerPort": 8080}],
                        "readinessProbe": {
                            "httpGet": {"path": "/healthz", "port": "http"},
                            "periodSeconds": 1, "failureThreshold": 1
                        }
                    }]
                }
            }
        }
    })
}

fn testapp_service(name: &str) -> serde_json::Value {
    json!({
        "metadata": {"name": name},
        "spec": {"selector": {"app": name}, "ports": [{"port": 80, "targetPort": "http"}]}
    })
}

async fn scale(client: &Client, ns: &str, name: &str, replicas: i32) {
    Api::<Deployment>::namespaced(client.clone(), ns)
        .patch_scale(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": replicas}})),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn a_deployment_scales_0_to_3_to_0_and_its_endpointslices_follow() {
    let Some(testbed) = Testbed::shared() else {
        return;
    };
    let client = testbed.client().await;
    let ns = testbed.namespace(&client, "scale").await;
    create::<Deployment>(&client, &ns, testapp_deployment("web", 0)).await;
    create::<Service>(&client, &ns, testapp_service("web")).await;

    scale(&client, &ns, "web", 3).await;
    until("3 ready pods", || async {
        ready_ips(&client, &ns, "app=web").await.len() == 3
    })
    .await;
    // The real EndpointSlice controller lists exactly the ready pods.
    until(
        "the EndpointSlice to list exactly the ready pods",
        || async {
            let ready = ready_ips(&client, &ns, "app=web").await;
            ready.len() == 3 && slice_ips(&client, &ns, "web").await == ready
        },
    )
    .await;
    let ips = ready_ips(&client, &ns, "app=web").await;
    for ip in &ips {
        assert!(
            ip.starts_with("10.244."),
            "pod IP {ip} from the node's pod CIDR"
        );
        let (status, _, body) = get(&format!("http://{ip}:8080/hello")).await;
        assert_eq!(status, 200, "pod {ip}");
        assert_eq!(&body[..], b"hello world\n");
    }
    // Each pod has port 8080 to itself: three processes bound it, one per namespace.
    let processes: BTreeSet<String> = pods(&client, &ns, "app=web")
        .await
        .iter()
        .filter_map(|p| {
            p.status.as_ref()?.container_statuses.as_ref()?[0]
                .container_id
                .clone()
        })
        .collect();
    assert_eq!(processes.len(), 3, "{processes:?}");

    scale(&client, &ns, "web", 0).await;
    until("no pod left", || async {
        pods(&client, &ns, "app=web").await.is_empty()
    })
    .await;
    until("an empty EndpointSlice", || async {
        slice_ips(&client, &ns, "web").await.is_empty()
    })
    .await;
    for ip in &ips {
        let connect = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect(format!("{ip}:8080")),
        )
        .await;
        assert!(
            !matches!(connect, Ok(Ok(_))),
            "{ip} still answers after scale to 0"
        );
    }
}

#[tokio::test]
async fn a_pod_failing_readiness_leaves_the_endpointslice_and_rejoins() {
    let Some(testbed) = Testbed::shared() else {
        return;
    };
    let client = testbed.client().await;
    let ns = testbed.namespace(&client, "ready").await;
    create::<Deployment>(&client, &ns, testapp_deployment("web", 2)).await;
    create::<Service>(&client, &ns, testapp_service("web")).await;
    until("2 pods in the EndpointSlice", || async {
        slice_ips(&client, &ns, "web").await.len() == 2
    })
    .await;
    let ips: Vec<String> = slice_ips(&client, &ns, "web").await.into_iter().collect();
    let (sick, healthy) = (&ips[0], &ips[1]);

    let (status, _, _) = get(&format!("http://{sick}:8080/ready?state=off")).await;
    assert_eq!(status, 200);
    until("the failing pod to leave the EndpointSlice", || async {
        slice_ips(&client, &ns, "web").await == BTreeSet::from([healthy.clone()])
    })
    .await;
    let events = pods(&client, &ns, "app=web").await;
    let sick_pod = events
        .iter()
        .find(|p| pod_ip(p).as_ref() == Some(sick))
        .unwrap();
    assert!(!is_ready(sick_pod));
    let name = sick_pod.metadata.name.clone().unwrap();
    let events = events_of(&client, &ns, &name).await;
    assert!(
        events
            .iter()
            .any(|e| e.starts_with("Unhealthy Readiness probe failed")),
        "{events:?}"
    );

    get(&format!("http://{sick}:8080/ready?state=on")).await;
    until("the pod to rejoin", || async {
        slice_ips(&client, &ns, "web").await.len() == 2
    })
    .await;
}

#[tokio::test]
async fn deleting_a_pod_runs_its_prestop_hook_before_sigterm() {
    let Some(testbed) = Testbed::shared() else {
        return;
    };
    let client = testbed.client().await;
    let ns = testbed.namespace(&client, "prestop").await;
    create::<Pod>(
        &client,
        &ns,
        json!({
            "metadata": {"name": "app"},
            "spec": {
                "terminationGracePeriodSeconds": 20,
                "containers": [{
                    "name": "app",
                    "image": "thaw.local/testapp",
                    "args": ["--host", "0.0.0.0", "--port", "8080"],
                    // The hook turns readiness off; the app prints its readiness when
                    // SIGTERM arrives, so the log shows which came first.
                    "lifecycle": {"preStop": {"httpGet": {"path": "/ready?state=off", "port": 8080}}},
                    "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}
                }]
            }
        }),
    )
    .await;
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    until("the pod to be ready", || async {
        api.get("app").await.is_ok_and(|p| is_ready(&p))
    })
    .await;
    api.delete("app", &DeleteParams::default()).await.unwrap();
    until("the pod to be gone", || async {
        matches!(api.get_opt("app").await, Ok(None))
    })
    .await;
    let log = testbed.container_log(&ns, "app", "app");
    assert!(log.contains("listening on 0.0.0.0:8080"), "{log}");
    assert!(
        log.contains("stopping on signal (ready: false)"),
        "SIGTERM must come after the preStop hook: {log}"
    );
}

/// Knative's queue-proxy environment and probe, as its controller writes them, pointed at
/// the Thaw binary.
#[tokio::test]
async fn a_queue_proxy_sidecar_serves_on_the_pod_ip() {
    let Some(testbed) = Testbed::shared() else {
        return;
    };
    let client = testbed.client().await;
    let ns = testbed.namespace(&client, "sidecar").await;
    let field = |path: &str| json!({"fieldRef": {"fieldPath": path}});
    create::<Pod>(
        &client,
        &ns,
        json!({
            "metadata": {"name": "hello-00001-deployment-abc", "labels": {"app": "hello"}},
            "spec": {
                "terminationGracePeriodSeconds": 5,
                "containers": [
                    {
                        "name": "user-container",
                        "image": "thaw.local/testapp",
                        "env": [{"name": "PORT", "value": "8080"}],
                        "ports": [{"name": "user-port", "containerPort": 8080}]
                    },
                    {
                        "name": "queue-proxy",
                        "image": "thaw.local/queue-proxy:latest",
                        "ports": [
                            {"name": "http-queueadm", "containerPort": 8022},
                            {"name": "http-autometric", "containerPort": 9090},
                            {"name": "http-usermetric", "containerPort": 9091},
                            {"name": "queue-port", "containerPort": 8012}
                        ],
                        "env": [
                            {"name": "SERVING_NAMESPACE", "value": ns},
                            {"name": "SERVING_SERVICE", "value": "hello"},
                            {"name": "SERVING_CONFIGURATION", "value": "hello"},
                            {"name": "SERVING_REVISION", "value": "hello-00001"},
                            {"name": "QUEUE_SERVING_PORT", "value": "8012"},
                            {"name": "QUEUE_SERVING_TLS_PORT", "value": "8112"},
                            {"name": "CONTAINER_CONCURRENCY", "value": "2"},
                            {"name": "REVISION_TIMEOUT_SECONDS", "value": "300"},
                            {"name": "REVISION_RESPONSE_START_TIMEOUT_SECONDS", "value": "0"},
                            {"name": "REVISION_IDLE_TIMEOUT_SECONDS", "value": "0"},
                            {"name": "SERVING_POD", "valueFrom": field("metadata.name")},
                            {"name": "SERVING_POD_IP", "valueFrom": field("status.podIP")},
                            {"name": "SERVING_LOGGING_CONFIG", "value": ""},
                            {"name": "SERVING_LOGGING_LEVEL", "value": ""},
                            {"name": "USER_PORT", "value": "8080"},
                            {"name": "SYSTEM_NAMESPACE", "value": "knative-serving"},
                            {"name": "SERVING_READINESS_PROBE",
                             "value": "{\"tcpSocket\":{\"port\":8080,\"host\":\"127.0.0.1\"},\"successThreshold\":1}"},
                            {"name": "ENABLE_HTTP2_AUTO_DETECTION", "value": "false"},
                            {"name": "ENABLE_MULTI_CONTAINER_PROBES", "value": "false"}
                        ],
                        "readinessProbe": {
                            "httpGet": {"port": 8012, "httpHeaders": [{"name": "K-Network-Probe", "value": "queue"}]},
                            "periodSeconds": 1, "successThreshold": 1
                        }
                    }
                ]
            }
        }),
    )
    .await;
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    until(
        "the pod to be ready through the queue-proxy's probe",
        || async {
            api.get("hello-00001-deployment-abc")
                .await
                .is_ok_and(|p| is_ready(&p))
        },
    )
    .await;
    let pod = api.get("hello-00001-deployment-abc").await.unwrap();
    let ip = pod_ip(&pod).unwrap();
    let (status, _, body) = get(&format!("http://{ip}:8012/hello")).await;
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"hello world\n");
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
    // The downward API gave the queue-proxy its pod's name, which it reports.
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("hello-00001-deployment-abc"), "{text}");
    let (status, _, _) = get(&format!("http://{ip}:9091/metrics")).await;
    assert_eq!(status, 200);
}

/// In-cluster software finds what it expects: the `kubernetes` Service, a token from the
/// TokenRequest API, volumes at their mount paths, Service names in DNS.
#[tokio::test]
async fn pods_get_in_cluster_credentials_volumes_and_dns() {
    let Some(testbed) = Testbed::shared() else {
        return;
    };
    let client = testbed.client().await;
    let ns = testbed.namespace(&client, "incluster").await;
    create::<Deployment>(&client, &ns, testapp_deployment("web", 1)).await;
    create::<Service>(&client, &ns, testapp_service("web")).await;
    create::<k8s_openapi::api::core::v1::ConfigMap>(
        &client,
        &ns,
        json!({"metadata": {"name": "settings"}, "data": {"level": "debug", "greeting.txt": "hi"}}),
    )
    .await;
    create::<k8s_openapi::api::core::v1::Secret>(
        &client,
        &ns,
        json!({"metadata": {"name": "creds"}, "stringData": {"password": "hunter2"}}),
    )
    .await;
    until("the Service to have an endpoint", || async {
        slice_ips(&client, &ns, "web").await.len() == 1
    })
    .await;
    // A shell script stands in for an image with a shell: it reports what it finds.
    let script = r#"
        set -u
        echo "whoami: $($WHOAMI whoami)"
        echo "namespace-file: $(cat /var/run/secrets/kubernetes.io/serviceaccount/namespace)"
        echo "config: $(cat /etc/settings/level) $(cat /etc/settings/greeting.txt)"
        echo "secret: $(cat /etc/creds/password)"
        echo "env-level: $LEVEL"
        echo "scratch: $(echo ok > /scratch/f && cat /scratch/f)"
        echo "dns-web: $(getent hosts web | awk '{print $1}')"
        echo "dns-api: $(getent hosts kubernetes.default | awk '{print $1}')"
        echo "via-service: $(curl -s http://web/hello)"
        echo "hostname: $(hostname)"
    "#;
    let whoami = thaw_benches::harness::bin("thaw-testbed-node");
    create::<Pod>(
        &client,
        &ns,
        json!({
            "metadata": {"name": "probe"},
            "spec": {
                "restartPolicy": "Never",
                "containers": [{
                    "name": "sh",
                    "image": "thaw.local/testbed-node",
                    "command": ["/bin/sh", "-c", script],
                    "env": [
                        {"name": "WHOAMI", "value": whoami.display().to_string()},
                        {"name": "LEVEL", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "level"}}}
                    ],
                    "volumeMounts": [
                        {"name": "settings", "mountPath": "/etc/settings"},
                        {"name": "creds", "mountPath": "/etc/creds", "readOnly": true},
                        {"name": "scratch", "mountPath": "/scratch"}
                    ]
                }],
                "volumes": [
                    {"name": "settings", "configMap": {"name": "settings"}},
                    {"name": "creds", "secret": {"secretName": "creds"}},
                    {"name": "scratch", "emptyDir": {}}
                ]
            }
        }),
    )
    .await;
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    until("the pod to finish", || async {
        api.get("probe").await.is_ok_and(|p| {
            matches!(
                p.status.and_then(|s| s.phase).as_deref(),
                Some("Succeeded" | "Failed")
            )
        })
    })
    .await;
    let phase = api
        .get("probe")
        .await
        .unwrap()
        .status
        .unwrap()
        .phase
        .unwrap();
    let log = testbed.container_log(&ns, "probe", "sh");
    assert_eq!(phase, "Succeeded", "{log}");
    let web_ip = Api::<Service>::namespaced(client.clone(), &ns)
        .get("web")
        .await
        .unwrap()
        .spec
        .unwrap()
        .cluster_ip
        .unwrap();
    for expected in [
        format!("whoami: system:serviceaccount:{ns}:default"),
        format!("namespace-file: {ns}"),
        "config: debug hi".to_owned(),
        "secret: hunter2".to_owned(),
        "env-level: debug".to_owned(),
        "scratch: ok".to_owned(),
        format!("dns-web: {web_ip}"),
        "via-service: hello world".to_owned(),
        "hostname: probe".to_owned(),
    ] {
        assert!(log.contains(&expected), "missing {expected:?} in:\n{log}");
    }
    assert!(log.contains("dns-api: 10.96."), "{log}");
}

#[tokio::test]
async fn bad_images_crashes_and_exec_probes_get_clear_statuses() {
    let Some(testbed) = Testbed::shared() else {
        return;
    };
    let client = testbed.client().await;
    let ns = testbed.namespace(&client, "failures").await;
    create::<Pod>(
        &client,
        &ns,
        json!({"metadata": {"name": "unknown"},
               "spec": {"containers": [{"name": "app", "image": "docker.io/library/nginx:1.27"}]}}),
    )
    .await;
    create::<Pod>(
        &client,
        &ns,
        json!({"metadata": {"name": "crasher"},
               "spec": {"restartPolicy": "OnFailure", "containers": [{
                   "name": "app", "image": "thaw.local/testapp",
                   "command": ["/bin/sh", "-c", "exit 3"]}]}}),
    )
    .await;
    create::<Pod>(
        &client,
        &ns,
        json!({"metadata": {"name": "once"},
               "spec": {"restartPolicy": "Never", "containers": [{
                   "name": "app", "image": "thaw.local/testapp",
                   "command": ["/bin/sh", "-c", "exit 4"]}]}}),
    )
    .await;
    create::<Pod>(
        &client,
        &ns,
        json!({"metadata": {"name": "exec"},
               "spec": {"containers": [{
                   "name": "app", "image": "thaw.local/testapp",
                   "args": ["--host", "0.0.0.0", "--port", "8080"],
                   "readinessProbe": {"exec": {"command": ["true"]}}}]}}),
    )
    .await;
    create::<Pod>(
        &client,
        &ns,
        json!({"metadata": {"name": "unhealthy"},
               "spec": {"containers": [{
                   "name": "app", "image": "thaw.local/testapp",
                   "args": ["--host", "0.0.0.0", "--port", "8080"],
                   "livenessProbe": {"httpGet": {"path": "/healthz", "port": 8080},
                                     "periodSeconds": 1, "failureThreshold": 2}}]}}),
    )
    .await;
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let status = |name: &'static str| {
        let api = api.clone();
        async move { api.get(name).await.unwrap().status.unwrap_or_default() }
    };

    until("ErrImagePull on the unknown image", || async {
        let s = status("unknown").await;
        let waiting = s
            .container_statuses
            .and_then(|c| c.into_iter().next())
            .and_then(|c| c.state)
            .and_then(|s| s.waiting);
        waiting.is_some_and(|w| {
            w.reason.as_deref() == Some("ErrImagePull")
                && w.message
                    .unwrap_or_default()
                    .contains("\"docker.io/library/nginx:1.27\" is not in the testbed's image map")
        })
    })
    .await;
    assert_eq!(status("unknown").await.phase.as_deref(), Some("Pending"));

    until("restarts of the crashing container", || async {
        let s = status("crasher").await;
        s.container_statuses
            .and_then(|c| c.into_iter().next())
            .is_some_and(|c| {
                c.restart_count >= 2
                    && c.last_state
                        .and_then(|l| l.terminated)
                        .is_some_and(|t| t.exit_code == 3)
            })
    })
    .await;

    until("the Never pod to fail", || async {
        status("once").await.phase.as_deref() == Some("Failed")
    })
    .await;
    let s = status("once").await;
    let c = s.container_statuses.unwrap().into_iter().next().unwrap();
    assert_eq!(c.restart_count, 0);
    assert_eq!(c.state.unwrap().terminated.unwrap().exit_code, 4);

    until("the refused exec probe to be an event", || async {
        events_of(&client, &ns, "exec")
            .await
            .iter()
            .any(|e| e.contains("exec readiness probes are not supported"))
    })
    .await;
    assert!(!is_ready(&api.get("exec").await.unwrap()));

    // A failing liveness probe restarts the container (the new process is healthy).
    until("the unhealthy pod to run", || async {
        status("unhealthy").await.pod_ip.is_some()
            && status("unhealthy").await.phase.as_deref() == Some("Running")
    })
    .await;
    let ip = status("unhealthy").await.pod_ip.unwrap();
    until("the app to answer", || async {
        tokio::net::TcpStream::connect(format!("{ip}:8080"))
            .await
            .is_ok()
    })
    .await;
    get(&format!("http://{ip}:8080/ready?state=off")).await;
    until("a restart after failed liveness probes", || async {
        status("unhealthy")
            .await
            .container_statuses
            .and_then(|c| c.into_iter().next())
            .is_some_and(|c| c.restart_count == 1 && c.state.and_then(|s| s.running).is_some())
    })
    .await;
    let events = events_of(&client, &ns, "unhealthy").await;
    assert!(
        events
            .iter()
            .any(|e| e.contains("failed liveness probe, will be restarted")),
        "{events:?}"
    );
}

#[test]
fn without_root_up_sh_says_why_at_once() {
    if !nix::unistd::geteuid().is_root() {
        // Not root already: `cargo test` itself shows the message (the tests skip).
        return;
    }
    // setpriv is util-linux's: drop to `nobody` for one run of up.sh.
    let up = thaw_benches::testbed::repo_root().join("benches/testbed/up.sh");
    let output = std::process::Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(&up)
        .arg("/nonexistent/testbed-state")
        .output();
    let output = output.expect("setpriv (util-linux) runs");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with("up.sh: the testbed needs root"),
        "{stderr}"
    );
    assert!(output.stdout.is_empty());
}

/// A second testbed beside the shared one (another checkout, or CI beside a developer)
/// gets its own slot; when the process it watches dies, as a panicking test binary would,
/// its watchdog takes everything down: processes, pod namespaces, bridge.
#[tokio::test]
async fn a_second_testbed_runs_beside_and_leaves_nothing_when_its_owner_dies() {
    let Some(shared) = Testbed::shared() else {
        return;
    };
    let state = shared.state_dir.with_file_name("second-copy");
    let mut owner = tokio::process::Command::new("sleep")
        .arg("600")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let up = thaw_benches::testbed::repo_root().join("benches/testbed/up.sh");
    let bin_dir = thaw_benches::harness::bin_dir();
    let output = tokio::process::Command::new(&up)
        .arg(&state)
        .env("CARGO_TARGET_DIR", bin_dir.parent().unwrap())
        .env("THAW_TESTBED_BIN_DIR", &bin_dir)
        .env("THAW_TESTBED_WATCH_PID", owner.id().unwrap().to_string())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let kubeconfig = stdout
        .lines()
        .last()
        .unwrap()
        .strip_prefix("KUBECONFIG=")
        .unwrap();
    let slot = |dir: &std::path::Path| std::fs::read_to_string(dir.join("slot")).unwrap();
    let second_slot = slot(&state);
    assert_ne!(
        slot(&shared.state_dir),
        second_slot,
        "two testbeds, two slots"
    );

    // A pod there, so that there is a namespace and processes to clean up.
    let second = Testbed {
        state_dir: state.clone(),
        kubeconfig: kubeconfig.into(),
        kubectl: shared.kubectl.clone(),
    };
    let client = second.client().await;
    let ns = second.namespace(&client, "second").await;
    create::<Pod>(
        &client,
        &ns,
        json!({"metadata": {"name": "app"}, "spec": {"containers": [{
            "name": "app", "image": "thaw.local/testapp",
            "args": ["--host", "0.0.0.0", "--port", "8080"],
            "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}]}}),
    )
    .await;
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    until("the second testbed's pod to be ready", || async {
        api.get("app").await.is_ok_and(|p| is_ready(&p))
    })
    .await;
    let pids: Vec<i32> = std::fs::read_dir(state.join("pids"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok()?.trim().parse().ok())
        .collect();
    assert!(
        pids.len() >= 5,
        "etcd, API server, controller-manager, node, watchdog: {pids:?}"
    );
    let app_pid: i32 = api
        .get("app")
        .await
        .unwrap()
        .status
        .unwrap()
        .container_statuses
        .unwrap()[0]
        .container_id
        .clone()
        .unwrap()
        .trim_start_matches("thaw-testbed://")
        .parse()
        .unwrap();

    owner.kill().await.unwrap();
    // A zombie waiting for PID 1 to reap it is not running.
    let alive = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z'))
        })
    };
    let netns_left = || {
        std::fs::read_dir("/run/netns")
            .map(|d| {
                d.flatten()
                    .filter(|e| {
                        e.file_name()
                            .to_string_lossy()
                            .starts_with(&format!("thawtb{}-", second_slot.trim()))
                    })
                    .count()
            })
            .unwrap_or(0)
    };
    until("the watchdog to take the second testbed down", || async {
        !pids.iter().any(|p| alive(*p)) && !alive(app_pid) && netns_left() == 0
    })
    .await;
    let bridge = format!("/sys/class/net/thawtb{}", second_slot.trim());
    assert!(
        !std::path::Path::new(&bridge).exists(),
        "{bridge} left behind"
    );
    // The shared testbed is untouched.
    let shared_client = shared.client().await;
    Api::<k8s_openapi::api::core::v1::Namespace>::all(shared_client)
        .get("default")
        .await
        .unwrap();
}
