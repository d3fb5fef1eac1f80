//! `activator webhook` on the testbed, against the real API server's admission chain:
//! two replicas in a namespace of their own, with their ServiceAccount, RBAC and Service,
//! and a MutatingWebhookConfiguration (named after that namespace, cluster-scoped,
//! removed at the end) whose namespaceSelector limits it to this test's namespaces and
//! whose caBundle starts empty. The webhook writes the caBundle; the API server then
//! sends it the pods created from an opted-in Deployment, which come up with the
//! queue-proxy sidecar, Ready, and serving through it on :8012. Pods that do not opt
//! in, and pods in the webhook's own namespace, are left alone; with the webhook scaled
//! to zero, pods are still created (`failurePolicy: Ignore`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{json, Value};
use thaw_benches::harness::get;
use thaw_benches::testbed::Testbed;

/// Pod start-up and controller round trips on a busy 2-core machine.
const WITHIN: Duration = Duration::from_secs(90);
/// Marks the cluster-scoped objects this test makes, with the namespace they serve.
const TEST_LABEL: &str = "thaw.dev/test-webhook-namespace";

/// Waits up to [`WITHIN`] for `check`.
async fn until<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    thaw_benches::testbed::until(what, WITHIN, check).await
}

/// Applies one object of any kind with kubectl (server-side apply), panicking with
/// kubectl's output on failure.
fn apply(testbed: &Testbed, object: &Value) {
    let path = std::env::temp_dir().join(format!(
        "thaw-webhook-test-{}-{:08x}.json",
        std::process::id(),
        fastrand::u32(..)
    ));
    std::fs::write(&path, serde_json::to_vec(object).unwrap()).unwrap();
    let (ok, out) = testbed.kubectl(&[
        "apply",
        "--server-side",
        "--field-manager=thaw-test",
        "-f",
        path.to_str().unwrap(),
    ]);
    let _ = std::fs::remove_file(&path);
    assert!(ok, "kubectl apply {object}: {out}");
}

/// Removes the cluster-scoped objects when the test ends, however it ends.
struct ClusterScoped<'a> {
    testbed: &'a Testbed,
    namespace: String,
}

impl Drop for ClusterScoped<'_> {
    fn drop(&mut self) {
        let selector = format!("{TEST_LABEL}={}", self.namespace);
        let (ok, out) = self.testbed.kubectl(&[
            "delete",
            "mutatingwebhookconfigurations,clusterroles,clusterrolebindings",
            "-l",
            &selector,
            "--ignore-not-found",
            "--wait=false",
        ]);
        if !ok {
            eprintln!("cleaning up {selector}: {out}");
        }
    }
}

/// Objects a previous run left behind (it was killed before its cleanup): those
/// labelled for a namespace that is gone or going.
async fn remove_leftovers(testbed: &Testbed, client: &Client) {
    let configs = Api::<MutatingWebhookConfiguration>::all(client.clone())
        .list(&ListParams::default().labels(TEST_LABEL))
        .await
        .unwrap();
    let namespaces = Api::<Namespace>::all(client.clone());
    for c in configs {
        let Some(ns) = c.metadata.labels.as_ref().and_then(|l| l.get(TEST_LABEL)) else {
            continue;
        };
        let alive = namespaces
            .get_opt(ns)
            .await
            .unwrap()
            .is_some_and(|n| n.metadata.deletion_timestamp.is_none());
        if !alive {
            drop(ClusterScoped {
                testbed,
                namespace: ns.clone(),
            });
        }
    }
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn containers(pod: &Pod) -> Vec<String> {
    pod.spec
        .as_ref()
        .map(|s| s.containers.iter().map(|c| c.name.clone()).collect())
        .unwrap_or_default()
}

async fn pods(client: &Client, ns: &str, selector: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(selector))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect()
}

async fn ca_bundles(client: &Client, name: &str) -> Vec<Vec<u8>> {
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .get(name)
        .await
        .unwrap()
        .webhooks
        .unwrap_or_default()
        .into_iter()
        .map(|w| w.client_config.ca_bundle.map(|b| b.0).unwrap_or_default())
        .collect()
}

fn testapp(name: &str, inject: bool) -> Value {
    let mut labels = json!({"app": name});
    if inject {
        labels["thaw.dev/inject"] = json!("enabled");
    }
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "annotations": {
            // Read from the Deployment through the pod's ReplicaSet.
            "thaw.dev/container-concurrency": "5",
        }},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "terminationGracePeriodSeconds": 5,
                    "containers": [{
                        "name": "app",
                        "image": "thaw.local/testapp",
                        "args": ["--host", "0.0.0.0"],
                        "env": [{"name": "PORT", "value": "8080"}],
                        "ports": [{"name": "http", "containerPort": 8080}],
                        "readinessProbe": {
                            "httpGet": {"path": "/healthz", "port": "http"},
                            "periodSeconds": 1
                        }
                    }]
                }
            }
        }
    })
}

/// A TLS handshake with `ip:8443` as the API server makes it: trusting only `ca_pem`,
/// for the name it dials.
async fn handshake(ip: &str, name: &str, ca_pem: &[u8]) -> Result<(), String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &ca_pem[..]) {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect((ip, 8443))
        .await
        .map_err(|e| e.to_string())?;
    let server =
        rustls::pki_types::ServerName::try_from(name.to_owned()).map_err(|e| e.to_string())?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(server, tcp)
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

/// The webhook installed in namespace `sys` for pods of `apps` (and `sys`), as
/// deploy/kubernetes installs it, scoped to one test.
struct Installed<'a> {
    sys: String,
    apps: String,
    config_name: String,
    _cleanup: ClusterScoped<'a>,
}

/// What a test varies in the installation.
struct Variant {
    /// Grant the ClusterRole (caBundle, owner lookups) at all.
    cluster_rbac: bool,
    /// Rules of the Role in the webhook's namespace (Secrets).
    secret_rules: Value,
    /// Env beside the interfaces' own.
    env: Vec<Value>,
    replicas: i32,
}

async fn install<'a>(testbed: &'a Testbed, client: &Client, variant: Variant) -> Installed<'a> {
    remove_leftovers(testbed, client).await;
    let sys = testbed.namespace(client, "whsys").await;
    let apps = testbed.namespace(client, "whapps").await;
    let cleanup = ClusterScoped {
        testbed,
        namespace: sys.clone(),
    };
    let config_name = format!("thaw-test-{sys}");
    let role_name = format!("thaw-test-webhook-{sys}");
    let mark = json!({TEST_LABEL: sys});

    apply(
        testbed,
        &json!({"apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "thaw-webhook", "namespace": sys}}),
    );
    if variant.cluster_rbac {
        apply(
            testbed,
            &json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                "metadata": {"name": role_name, "labels": mark},
                "rules": [
                    {"apiGroups": ["admissionregistration.k8s.io"], "resources": ["mutatingwebhookconfigurations"],
                     "resourceNames": [config_name], "verbs": ["get", "list", "watch", "patch"]},
                    {"apiGroups": ["apps"], "resources": ["replicasets", "deployments"], "verbs": ["get"]}
                ]
            }),
        );
        apply(
            testbed,
            &json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                "metadata": {"name": role_name, "labels": mark},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role_name},
                "subjects": [{"kind": "ServiceAccount", "name": "thaw-webhook", "namespace": sys}]
            }),
        );
    }
    apply(
        testbed,
        &json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "thaw-webhook", "namespace": sys},
            "rules": variant.secret_rules
        }),
    );
    apply(
        testbed,
        &json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "thaw-webhook", "namespace": sys},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "thaw-webhook"},
            "subjects": [{"kind": "ServiceAccount", "name": "thaw-webhook", "namespace": sys}]
        }),
    );
    apply(
        testbed,
        &json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "thaw-webhook", "namespace": sys},
            "spec": {"selector": {"app": "thaw-webhook"},
                     "ports": [{"name": "https", "port": 443, "targetPort": 8443}]}
        }),
    );
    apply(
        testbed,
        &json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": config_name, "labels": mark},
            "webhooks": [{
                "name": "inject.thaw.dev",
                "admissionReviewVersions": ["v1"],
                "clientConfig": {
                    "caBundle": "",
                    "service": {"name": "thaw-webhook", "namespace": sys, "port": 443, "path": "/inject"}
                },
                "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                           "resources": ["pods"], "scope": "Namespaced"}],
                "objectSelector": {"matchLabels": {"thaw.dev/inject": "enabled"}},
                // Only this test's namespaces; the webhook's own is included to show that it
                // leaves its own namespace alone by itself.
                "namespaceSelector": {"matchExpressions": [{
                    "key": "kubernetes.io/metadata.name", "operator": "In", "values": [apps, sys]
                }]},
                "failurePolicy": "Ignore",
                "sideEffects": "None",
                "timeoutSeconds": 5,
                "reinvocationPolicy": "Never"
            }]
        }),
    );
    assert!(
        ca_bundles(client, &config_name)
            .await
            .iter()
            .all(Vec::is_empty),
        "the caBundle starts empty"
    );
    let mut env = vec![
        json!({"name": "THAW_WEBHOOK_PORT", "value": "8443"}),
        json!({"name": "THAW_WEBHOOK_SERVICE", "value": "thaw-webhook"}),
        json!({"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}),
        json!({"name": "THAW_WEBHOOK_CONFIG", "value": config_name}),
        json!({"name": "THAW_QUEUE_PROXY_IMAGE", "value": "thaw.local/queue-proxy"}),
    ];
    env.extend(variant.env);
    apply(
        testbed,
        &json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "thaw-webhook", "namespace": sys},
            "spec": {
                "replicas": variant.replicas,
                "selector": {"matchLabels": {"app": "thaw-webhook"}},
                "template": {
                    "metadata": {"labels": {"app": "thaw-webhook", "app.kubernetes.io/part-of": "thaw"}},
                    "spec": {
                        "serviceAccountName": "thaw-webhook",
                        "enableServiceLinks": false,
                        "terminationGracePeriodSeconds": 10,
                        "containers": [{
                            "name": "webhook",
                            "image": "thaw.local/activator",
                            "args": ["webhook"],
                            "env": env,
                            "ports": [{"name": "https", "containerPort": 8443}],
                            "readinessProbe": {
                                "httpGet": {"path": "/healthz", "port": "https", "scheme": "HTTPS"},
                                "periodSeconds": 1
                            }
                        }]
                    }
                }
            }
        }),
    );
    Installed {
        sys,
        apps,
        config_name,
        _cleanup: cleanup,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injects_opted_in_pods_and_never_blocks_any() {
    let Some(testbed) = Testbed::shared() else {
        return;
    };
    let client = testbed.client().await;
    let installed = install(
        testbed,
        &client,
        Variant {
            cluster_rbac: true,
            // The shared certificate: read and replaced by name, created once.
            secret_rules: json!([
                {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["thaw-webhook-certs"],
                 "verbs": ["get", "update"]},
                {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]}
            ]),
            env: Vec::new(),
            // Two replicas making their certificate at once: they must agree on one.
            replicas: 2,
        },
    )
    .await;
    let (sys, apps, config_name) = (&installed.sys, &installed.apps, &installed.config_name);

    until("the webhook to write its caBundle", || async {
        ca_bundles(&client, config_name)
            .await
            .iter()
            .all(|b| !b.is_empty())
    })
    .await;
    until("two ready webhook replicas", || async {
        pods(&client, sys, "app=thaw-webhook")
            .await
            .iter()
            .filter(|p| is_ready(p))
            .count()
            == 2
    })
    .await;
    // One CA for both replicas: the one in the shared Secret, trusted for both.
    let bundle = ca_bundles(&client, config_name).await.remove(0);
    let secret = Api::<Secret>::namespaced(client.clone(), sys)
        .get("thaw-webhook-certs")
        .await
        .unwrap();
    let data = secret.data.unwrap();
    assert_eq!(data["ca.crt"].0, bundle, "caBundle is the shared CA");
    let dialled = format!("thaw-webhook.{sys}.svc");
    for p in pods(&client, sys, "app=thaw-webhook").await {
        let ip = p.status.unwrap().pod_ip.unwrap();
        handshake(&ip, &dialled, &bundle)
            .await
            .unwrap_or_else(|e| panic!("webhook pod {ip} is not trusted by the caBundle: {e}"));
    }
    // It does not flap: a while later it is still the same.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(ca_bundles(&client, config_name).await, vec![bundle.clone()]);

    // An opted-in Deployment's pod gets the sidecar, with the Deployment's settings.
    let mut hello = testapp("hello", true);
    hello["metadata"]["namespace"] = json!(apps);
    apply(testbed, &hello);
    until("a ready hello pod", || async {
        pods(&client, apps, "app=hello").await.iter().any(is_ready)
    })
    .await;
    let pod = pods(&client, apps, "app=hello")
        .await
        .into_iter()
        .find(is_ready)
        .unwrap();
    assert_eq!(containers(&pod), ["app", "queue-proxy"]);
    let spec = pod.spec.clone().unwrap();
    let sidecar = spec
        .containers
        .iter()
        .find(|c| c.name == "queue-proxy")
        .unwrap();
    assert_eq!(sidecar.image.as_deref(), Some("thaw.local/queue-proxy"));
    let env = |name: &str| {
        sidecar
            .env
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    };
    assert_eq!(env("CONTAINER_CONCURRENCY").as_deref(), Some("5"));
    assert_eq!(env("SERVING_REVISION").as_deref(), Some("hello"));
    assert_eq!(env("SERVING_NAMESPACE").as_deref(), Some(apps.as_str()));
    let ip = pod.status.as_ref().unwrap().pod_ip.clone().unwrap();
    let (status, _, body) = get(&format!("http://{ip}:8012/hello")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&body[..], b"hello world\n");

    // Not opted in: untouched.
    let mut plain = testapp("plain", false);
    plain["metadata"]["namespace"] = json!(apps);
    apply(testbed, &plain);
    until("a ready plain pod", || async {
        pods(&client, apps, "app=plain").await.iter().any(is_ready)
    })
    .await;
    for p in pods(&client, apps, "app=plain").await {
        assert_eq!(containers(&p), ["app"]);
    }

    // Opted in, but in the webhook's own namespace: untouched.
    let own: Pod = serde_json::from_value(json!({
        "metadata": {"name": "own", "labels": {"thaw.dev/inject": "enabled"}},
        "spec": {"containers": [{"name": "app", "image": "thaw.local/testapp",
                 "ports": [{"containerPort": 8080}]}]}
    }))
    .unwrap();
    let own = Api::<Pod>::namespaced(client.clone(), sys)
        .create(&PostParams::default(), &own)
        .await
        .unwrap();
    assert_eq!(containers(&own), ["app"]);

    // The webhook gone: pods are still created (failurePolicy: Ignore), without it.
    let webhook: Api<Deployment> = Api::namespaced(client.clone(), sys);
    webhook
        .patch(
            "thaw-webhook",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 0}})),
        )
        .await
        .unwrap();
    until("no webhook pod left", || async {
        Api::<Pod>::namespaced(client.clone(), sys)
            .list(&ListParams::default().labels("app=thaw-webhook"))
            .await
            .unwrap()
            .items
            .is_empty()
    })
    .await;
    let mut after = testapp("after", true);
    after["metadata"]["namespace"] = json!(apps);
    apply(testbed, &after);
    until(
        "a pod of the Deployment created with no webhook",
        || async { !pods(&client, apps, "app=after").await.is_empty() },
    )
    .await;
    let created: BTreeSet<Vec<String>> = pods(&client, apps, "app=after")
        .await
        .iter()
        .map(containers)
        .collect();
    assert_eq!(created, BTreeSet::from([vec!["app".to_owned()]]));

    for ns in [apps, sys] {
        let _ = Api::<Namespace>::all(client.clone())
            .delete(ns, &DeleteParams::default())
            .await;
    }
}

/// With `THAW_WEBHOOK_CERT_SECRET`, the webhook serves the Secret's certificate and
/// publishes its `ca.crt`; the API server trusts it and pods are injected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_a_certificate_from_a_secret() {
    use thaw_activator::webhook::certs::{dns_names, Bundle};
    let Some(testbed) = Testbed::shared() else {
        return;
    };
    let client = testbed.client().await;
    let installed = install(
        testbed,
        &client,
        Variant {
            cluster_rbac: true,
            secret_rules: json!([
                {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["operator-cert"],
                 "verbs": ["get"]}
            ]),
            env: vec![json!({"name": "THAW_WEBHOOK_CERT_SECRET", "value": "operator-cert"})],
            replicas: 1,
        },
    )
    .await;
    let (sys, apps, config_name) = (&installed.sys, &installed.apps, &installed.config_name);
    // The operator's certificate, made before the webhook may start: the webhook waits
    // for the Secret, so it is created a little after the Deployment.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let made = Bundle::generate(
        &dns_names("thaw-webhook", sys),
        std::time::SystemTime::now(),
    )
    .unwrap();
    let ca = made.ca_pem.clone().unwrap();
    apply(
        testbed,
        &json!({
            "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": "operator-cert", "namespace": sys},
            "stringData": {"tls.crt": made.cert_pem, "tls.key": made.key_pem, "ca.crt": ca}
        }),
    );
    until("caBundle to be the Secret's ca.crt", || async {
        ca_bundles(&client, config_name).await == vec![ca.clone().into_bytes()]
    })
    .await;
    until("a ready webhook", || async {
        pods(&client, sys, "app=thaw-webhook")
            .await
            .iter()
            .any(is_ready)
    })
    .await;
    // Nothing of its own was made or stored.
    assert!(Api::<Secret>::namespaced(client.clone(), sys)
        .get_opt("thaw-webhook-certs")
        .await
        .unwrap()
        .is_none());
    let mut hello = testapp("hello", true);
    hello["metadata"]["namespace"] = json!(apps);
    apply(testbed, &hello);
    until("a hello pod with the sidecar", || async {
        pods(&client, apps, "app=hello")
            .await
            .iter()
            .any(|p| containers(p) == ["app", "queue-proxy"])
    })
    .await;
}

/// A webhook whose service account may do nothing says what it lacks in one log line
/// naming the verb and the resource, not one per retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_permission_is_one_line_naming_verb_and_resource() {
    let Some(testbed) = Testbed::shared() else {
        return;
    };
    let client = testbed.client().await;
    let installed = install(
        testbed,
        &client,
        Variant {
            cluster_rbac: false,
            secret_rules: json!([]),
            env: Vec::new(),
            replicas: 1,
        },
    )
    .await;
    let sys = &installed.sys;
    let wanted = format!(
        "forbidden: RBAC must allow get secrets in namespace {sys} for this service account"
    );
    let log_of_webhook = || async {
        let mut log = String::new();
        for p in pods(&client, sys, "app=thaw-webhook").await {
            log.push_str(&testbed.container_log(sys, &p.metadata.name.unwrap(), "webhook"));
        }
        log
    };
    until("the forbidden line in its log", || async {
        log_of_webhook().await.contains(&wanted)
    })
    .await;
    // Retries go on (with backoff) without repeating it.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let log = log_of_webhook().await;
    assert_eq!(log.matches(&wanted).count(), 1, "{log}");
}
