//! The activator's Knative platform against the testbed's real API server, with Knative's
//! Revision CRD installed from its Go module and no Knative controller: the test writes
//! the objects Knative's controller would (a Revision, its private and public Endpoints,
//! the config maps) and checks what the activator does with each. The whole Knative
//! control plane drives the activator in `tests/knative.rs`; this covers what that
//! flow cannot reach: a bad spec, config maps changing, subsetting from public
//! Endpoints, a deleted revision.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Endpoints};
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use kube::{Api, Client};
use serde_json::json;
use thaw_benches::harness::{closed_port, get_with, metric_value, Activator, App, QueueProxy};
use thaw_benches::testbed::{until, Testbed};

const REVISION: &str = "hello-00001";
const WITHIN: Duration = Duration::from_secs(60);
/// This activator's pod IP as the test declares it; never dialled.
const OWN_IP: &str = "10.250.0.2";
const OTHER_IP: &str = "10.250.0.3";

/// The knative.dev/serving module (v1.23) in the Go module cache, downloaded if missing.
fn knative_module() -> PathBuf {
    let out = Command::new("go")
        .args(["mod", "download", "-json", "knative.dev/serving@v0.50.0"])
        .output()
        .expect("run go (the testbed needs it)");
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "go mod download: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    PathBuf::from(
        info["Dir"]
            .as_str()
            .unwrap_or_else(|| panic!("go mod download: {info}")),
    )
}

/// The testbed's bridge address, which pods and the host share: the API server's.
fn gateway(tb: &Testbed) -> String {
    let text = std::fs::read_to_string(&tb.kubeconfig).unwrap();
    let server = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: https://"))
        .unwrap();
    server.rsplit_once(':').unwrap().0.to_owned()
}

fn revisions(client: &Client, ns: &str) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("serving.knative.dev", "v1", "Revision"),
        "revisions",
    );
    Api::namespaced_with(client.clone(), ns, &ar)
}

fn endpoints(name: &str, kind: &str, ip: &[&str], ports: &[u16]) -> Endpoints {
    // One subset per port: the pods here share the host's address.
    let subsets: Vec<_> = ports
        .iter()
        .map(|p| {
            json!({"addresses": ip.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>(),
                       "ports": [{"name": "http", "port": p}]})
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {
            "serving.knative.dev/revision": REVISION,
            "serving.knative.dev/revisionUID": "0d6b1b4e",
            "networking.internal.knative.dev/serviceType": kind}},
        "subsets": subsets,
    }))
    .unwrap()
}

fn config_map(name: &str, data: serde_json::Value) -> ConfigMap {
    serde_json::from_value(json!({"metadata": {"name": name}, "data": data})).unwrap()
}

async fn call(activator: &Activator, ns: &str) -> (u16, String) {
    let (status, _, body) = get_with(
        &activator.url("/"),
        &[
            ("Knative-Serving-Namespace", ns),
            ("Knative-Serving-Revision", REVISION),
        ],
    )
    .await;
    (status.as_u16(), String::from_utf8_lossy(&body).into_owned())
}

fn logged(activator: &Activator, fragment: &str) -> usize {
    activator
        .logs()
        .iter()
        .filter(|l| l.contains(fragment))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn knative_platform_follows_what_knative_publishes() {
    let Some(tb) = Testbed::shared() else { return };
    let client = tb.client().await;
    let crd = knative_module().join("config/core/300-resources/revision.yaml");
    let (ok, out) = tb.kubectl(&["apply", "--server-side", "-f", crd.to_str().unwrap()]);
    assert!(ok, "{out}");
    // Polled rather than `kubectl wait`: that fails at once ("<nil> is of the type <nil>")
    // when it reads the CRD before the API server has given it any condition.
    until("the Revision CRD is established", WITHIN, || async {
        let (ok, out) = tb.kubectl(&[
            "get",
            "crd/revisions.serving.knative.dev",
            "-o",
            r#"jsonpath={.status.conditions[?(@.type=="Established")].status}"#,
        ]);
        ok && out.trim() == "True"
    })
    .await;
    let ns = tb.namespace(&client, "kn-platform").await;
    let post = PostParams::default();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    cms.create(&post, &config_map("config-logging", json!({})))
        .await
        .unwrap();
    cms.create(&post, &config_map("config-observability", json!({})))
        .await
        .unwrap();

    // Two pods of the revision: test apps behind real queue-proxies on the bridge address.
    let gw = gateway(tb);
    let mut pods = Vec::new();
    for _ in 0..2 {
        let app = App::start(&[]).await;
        let qp = QueueProxy::start(
            app.port(),
            &[
                ("THAW_LISTEN_ADDRESS", &gw),
                ("CONTAINER_CONCURRENCY", "1"),
                ("SERVING_NAMESPACE", &ns),
                ("SERVING_REVISION", REVISION),
            ],
        )
        .await;
        pods.push((app, qp));
    }
    let ports: Vec<u16> = pods.iter().map(|(_, qp)| qp.serving.port()).collect();
    let eps: Api<Endpoints> = Api::namespaced(client.clone(), &ns);
    eps.create(
        &post,
        &endpoints(&format!("{REVISION}-private"), "Private", &[&gw], &ports),
    )
    .await
    .unwrap();
    let revs = revisions(&client, &ns);
    let revision: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "serving.knative.dev/v1", "kind": "Revision",
        "metadata": {"name": REVISION},
        "spec": {"containerConcurrency": 1, "timeoutSeconds": 30, "containers": [{"image": "thaw.local/testapp"}]},
    }))
    .unwrap();
    revs.create(&post, &revision).await.unwrap();

    // Started with the env of Knative's activator Deployment and no --platform.
    let kubeconfig = tb.kubeconfig.to_str().unwrap().to_owned();
    let autoscaler = format!("ws://127.0.0.1:{}/", closed_port());
    let activator = Activator::start_with(
        &[],
        &[
            ("SYSTEM_NAMESPACE", ns.as_str()),
            ("CONFIG_LOGGING_NAME", "config-logging"),
            ("CONFIG_OBSERVABILITY_NAME", "config-observability"),
            ("POD_IP", OWN_IP),
            ("POD_NAME", "activator-test"),
            ("KUBECONFIG", &kubeconfig),
            ("THAW_AUTOSCALER_URL", &autoscaler),
            ("THAW_DRAIN_PERIOD", "0s"),
        ],
    )
    .await;
    // "activator started" comes just after the listeners the harness waits for.
    until("the activator says it runs on Knative", WITHIN, || async {
        logged(&activator, r#""platform":"knative""#) > 0
    })
    .await;

    eprintln!("== the revision is served from its private Endpoints");
    // Each new answer is shown, so a timeout says what the activator answered instead.
    let last = std::sync::Mutex::new(None);
    until("a request to the revision is served", WITHIN, || async {
        let answer = call(&activator, &ns).await;
        let served = answer.0 == 200;
        let mut last = last.lock().unwrap();
        if last.as_ref() != Some(&answer) {
            eprintln!("answered {} {:?}", answer.0, answer.1);
            *last = Some(answer);
        }
        served
    })
    .await;
    let host = format!("{REVISION}.{ns}.svc.cluster.local");
    let (status, _, _) = get_with(&activator.url("/"), &[("Host", &host)]).await;
    assert_eq!(status, 200, "by the revision's service host");
    // Cut off from the autoscaler, it says so to the kubelet, as Knative's does.
    let (status, _, body) =
        get_with(&activator.url("/"), &[("User-Agent", "kube-probe/1.37")]).await;
    assert_eq!(status, 500);
    assert!(
        String::from_utf8_lossy(&body).contains("autoscaler"),
        "{body:?}"
    );

    eprintln!("== subsetting follows the public Endpoints listing this activator");
    let fragment = format!("revision_name=\"{REVISION}\"");
    until("this activator alone takes both pods", WITHIN, || async {
        metric_value(
            &activator.metrics_text().await,
            "activator_capacity",
            &fragment,
        ) == 2.0
    })
    .await;
    eps.create(
        &post,
        &endpoints(REVISION, "Public", &[OWN_IP, OTHER_IP], &[8012]),
    )
    .await
    .unwrap();
    until(
        "with two activators in its path, it takes one pod",
        WITHIN,
        || async {
            metric_value(
                &activator.metrics_text().await,
                "activator_capacity",
                &fragment,
            ) == 1.0
        },
    )
    .await;

    eprintln!("== the request log and the level follow the config maps");
    assert_eq!(logged(&activator, r#""message":"request""#), 0);
    let patch = |data: serde_json::Value| Patch::Merge(json!({"data": data}));
    let pp = PatchParams::default();
    cms.patch(
        "config-observability",
        &pp,
        &patch(json!({"logging.enable-request-log": "true"})),
    )
    .await
    .unwrap();
    until("a request is logged", WITHIN, || async {
        call(&activator, &ns).await;
        logged(&activator, r#""message":"request""#) > 0
    })
    .await;
    cms.patch(
        "config-logging",
        &pp,
        &patch(json!({"loglevel.activator": "error"})),
    )
    .await
    .unwrap();
    until("the level is error", WITHIN, || async {
        activator.logs().iter().any(|l| {
            l.contains("log level set from the config map") && l.contains(r#""log_level":"error""#)
        })
    })
    .await;
    let before = logged(&activator, r#""message":"request""#);
    for _ in 0..3 {
        assert_eq!(call(&activator, &ns).await.0, 200);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        logged(&activator, r#""message":"request""#),
        before,
        "info lines are off at level error"
    );
    cms.patch(
        "config-logging",
        &pp,
        &patch(json!({"loglevel.activator": "loud"})),
    )
    .await
    .unwrap();
    cms.patch(
        "config-logging",
        &pp,
        &patch(json!({"loglevel.activator": "info"})),
    )
    .await
    .unwrap();
    until("info lines are back", WITHIN, || async {
        call(&activator, &ns).await;
        logged(&activator, r#""message":"request""#) > before
    })
    .await;
    assert!(
        logged(&activator, "invalid logging level \\\"loud\\\"") > 0,
        "a bad level is named: {:#?}",
        activator.logs()
    );

    eprintln!("== a spec out of range is refused and the last good one stays");
    revs.patch(
        REVISION,
        &pp,
        &Patch::Merge(json!({"spec": {"timeoutSeconds": 99_999_999_999u64}})),
    )
    .await
    .unwrap();
    until("the bad spec is named in the log", WITHIN, || async {
        logged(
            &activator,
            "spec.timeoutSeconds must be a whole number of seconds",
        ) > 0
    })
    .await;
    assert_eq!(call(&activator, &ns).await.0, 200);

    eprintln!("== a deleted revision is unknown");
    revs.delete(REVISION, &DeleteParams::default())
        .await
        .unwrap();
    until("the revision is gone", WITHIN, || async {
        let (status, body) = call(&activator, &ns).await;
        status == 404 && body.contains("unknown revision")
    })
    .await;
    drop(pods);
}
