//! The manifests in `deploy/`, checked with the real tools: the kustomize base, its
//! overlays and the example function built by the testbed's kubectl (kustomize inside) and
//! accepted by the testbed's real API server (`kubectl apply --dry-run=server`, with its
//! Pod Security admission warning on anything short of "restricted"); the Helm chart linted
//! and rendered by Helm and accepted the same way; the chart and the base rendering the same
//! objects; the RBAC granting exactly what it should, asked of the API server itself
//! (`kubectl auth can-i`); the Dockerfiles passing hadolint.
//!
//! The tools come from `benches/testbed/`: kubectl from `build.sh` (with the control
//! plane), Helm from `build-helm.sh`, hadolint from `fetch-hadolint.sh`, each cached in
//! `target/testbed/`. As root (or with `THAW_TESTBED_REQUIRED=1`, as CI runs) a missing
//! tool is built; otherwise a test whose tool is not built yet skips, saying how to get it.
//! With `THAW_TESTBED_REQUIRED=1` nothing skips: a tool that cannot be had is a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::{json, Value};
use thaw_benches::testbed::{repo_root, Testbed};
use thaw_shared::annotations::{self, FunctionSettings};

const SYSTEM: &str = "thaw-system";
/// The labels Helm adds to every object's metadata beside the base's own.
const HELM_LABELS: [&str; 3] = [
    "app.kubernetes.io/instance",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
];

fn required() -> bool {
    std::env::var("THAW_TESTBED_REQUIRED").as_deref() == Ok("1")
}

fn may_build() -> bool {
    required() || nix::unistd::geteuid().is_root()
}

/// Where cargo puts its output (`target/`), as the testbed finds it.
fn target_dir() -> PathBuf {
    let bin = thaw_benches::harness::bin_dir();
    bin.parent().map(Path::to_owned).unwrap_or(bin)
}

/// A tool from one of `benches/testbed/`'s scripts. `cheap` tools (a download of
/// seconds) are always fetched; the others are built only when [`may_build`], and
/// otherwise found already built or skipped with a message.
fn tool(script: &str, name: &str, cheap: bool) -> Option<PathBuf> {
    if !cheap && !may_build() {
        let built = std::fs::read_dir(target_dir().join("testbed"))
            .ok()
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("bin").join(name))
            .find(|p| p.exists());
        if built.is_none() {
            eprintln!(
                "skipping: {name} is not built; run benches/testbed/{script} (or the tests as \
                 root, or with THAW_TESTBED_REQUIRED=1 to make this a failure)"
            );
        }
        return built;
    }
    let path = repo_root().join("benches/testbed").join(script);
    let output = Command::new(&path)
        .env("CARGO_TARGET_DIR", target_dir())
        .output();
    let failure = match output {
        Ok(out) if out.status.success() => {
            let stdout = String::from_utf8_lossy(&out.stdout);
            let bin = stdout.lines().last().map(|l| PathBuf::from(l.trim()));
            match bin.map(|b| b.join(name)) {
                Some(p) if p.exists() => return Some(p),
                _ => format!("{script} printed no bin directory holding {name}: {stdout}"),
            }
        }
        Ok(out) => format!(
            "{script} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => format!("cannot run {}: {e}", path.display()),
    };
    if required() {
        panic!("{failure}");
    }
    eprintln!("skipping: {failure}");
    None
}

fn kubectl_bin() -> Option<PathBuf> {
    tool("build.sh", "kubectl", false)
}

fn helm_bin() -> Option<PathBuf> {
    tool("build-helm.sh", "helm", false)
}

fn hadolint_bin() -> Option<PathBuf> {
    tool("fetch-hadolint.sh", "hadolint", true)
}

/// Runs a command; returns (success, stdout, stderr).
fn run(program: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A repository path as a string argument.
fn at(path: &str) -> String {
    repo_root().join(path).to_string_lossy().into_owned()
}

/// `kubectl kustomize DIR`, which must succeed.
fn kustomize(kubectl: &Path, dir: &str) -> String {
    let (ok, out, err) = run(kubectl, &["kustomize", dir]);
    assert!(ok, "kubectl kustomize {dir}: {err}");
    out
}

/// Helm with its config, cache and data kept under target/, so that a test run reads no
/// user settings and leaves nothing in $HOME.
fn helm(helm: &Path, args: &[&str]) -> (bool, String, String) {
    let home = target_dir().join("deploy-tests/helm-home");
    let out = Command::new(helm)
        .args(args)
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_DATA_HOME", home.join("data"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", helm.display()));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `helm template thaw deploy/helm/thaw -n thaw-system` with extra flags; must succeed.
fn render_chart(helm_path: &Path, extra: &[&str]) -> String {
    let chart = at("deploy/helm/thaw");
    let mut args = vec!["template", "thaw", chart.as_str(), "--namespace", SYSTEM];
    args.extend_from_slice(extra);
    let (ok, out, err) = helm(helm_path, &args);
    assert!(ok, "helm {}: {err}", args.join(" "));
    out
}

fn testbed_values() -> String {
    at("deploy/helm/thaw/values-testbed.yaml")
}

/// A kustomization under target/ (kustomize takes no absolute paths) with the base and
/// the Secret-certificate component, as an operator's overlay would use them.
fn cert_secret_overlay(name: &str) -> String {
    let dir = repo_root()
        .join("target/deploy-tests")
        .join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("kustomization.yaml"),
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n\
         resources: [../../../deploy/kubernetes/base]\n\
         components: [../../../deploy/kubernetes/components/webhook-cert-secret]\n",
    )
    .unwrap();
    dir.to_string_lossy().into_owned()
}

/// The objects of a YAML stream, by (kind, name).
fn objects(yaml: &str) -> BTreeMap<(String, String), Value> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let mut out = BTreeMap::new();
    for doc in docs.into_iter().filter(|d| !d.is_null()) {
        let kind = doc["kind"].as_str().expect("kind").to_owned();
        let name = doc["metadata"]["name"].as_str().expect("name").to_owned();
        assert!(
            out.insert((kind.clone(), name.clone()), doc).is_none(),
            "{kind}/{name} twice"
        );
    }
    out
}

fn keys(objects: &BTreeMap<(String, String), Value>) -> BTreeSet<String> {
    objects.keys().map(|(k, n)| format!("{k}/{n}")).collect()
}

/// An object as the comparisons see it: without Helm's own labels, and with each
/// container's env sorted by name (an overlay's patch may reorder it; nothing here refers
/// to another variable, so order carries no meaning).
fn normalized(mut v: Value) -> Value {
    if let Some(labels) = v
        .pointer_mut("/metadata/labels")
        .and_then(Value::as_object_mut)
    {
        for l in HELM_LABELS {
            labels.remove(l);
        }
    }
    sort_env(&mut v);
    v
}

fn sort_env(v: &mut Value) {
    match v {
        Value::Object(map) => {
            if let Some(Value::Array(env)) = map.get_mut("env") {
                env.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
            }
            map.values_mut().for_each(sort_env);
        }
        Value::Array(items) => items.iter_mut().for_each(sort_env),
        _ => {}
    }
}

/// Every string in `v` that starts with `from`, with that prefix replaced by `to`.
fn rename_images(v: &mut Value, from: &str, to: &str) {
    match v {
        Value::String(s) => {
            if let Some(rest) = s.strip_prefix(from) {
                *s = format!("{to}{rest}");
            }
        }
        Value::Object(map) => map.values_mut().for_each(|v| rename_images(v, from, to)),
        Value::Array(items) => items.iter_mut().for_each(|v| rename_images(v, from, to)),
        _ => {}
    }
}

/// Every container image and THAW_QUEUE_PROXY_IMAGE value in a stream.
fn images(objects: &BTreeMap<(String, String), Value>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for o in objects.values() {
        let containers = o
            .pointer("/spec/template/spec/containers")
            .and_then(Value::as_array);
        for c in containers.into_iter().flatten() {
            out.insert(c["image"].as_str().unwrap().to_owned());
            for e in c["env"].as_array().into_iter().flatten() {
                if e["name"] == "THAW_QUEUE_PROXY_IMAGE" {
                    out.insert(e["value"].as_str().unwrap().to_owned());
                }
            }
        }
    }
    out
}

fn assert_same_objects(
    what: &str,
    left: &BTreeMap<(String, String), Value>,
    right: &BTreeMap<(String, String), Value>,
) {
    assert_eq!(keys(left), keys(right), "{what}: different objects");
    for (key, l) in left {
        let (l, r) = (normalized(l.clone()), normalized(right[key].clone()));
        assert_eq!(
            l,
            r,
            "{what}: {}/{} differs:\n{}\nvs\n{}",
            key.0,
            key.1,
            serde_json::to_string_pretty(&l).unwrap(),
            serde_json::to_string_pretty(&r).unwrap()
        );
    }
}

#[test]
fn the_testbed_overlay_changes_only_the_images() {
    let Some(kubectl) = kubectl_bin() else { return };
    let base = objects(&kustomize(&kubectl, &at("deploy/kubernetes")));
    let testbed = objects(&kustomize(&kubectl, &at("deploy/kubernetes/testbed")));

    assert_eq!(
        images(&base),
        BTreeSet::from([
            "ghcr.io/thaw-dev/activator:0.1.0".to_owned(),
            "ghcr.io/thaw-dev/queue-proxy:0.1.0".to_owned()
        ])
    );
    // Every image, the injected sidecar's included, is on the testbed's names.
    assert_eq!(
        images(&testbed),
        BTreeSet::from([
            "thaw.local/activator:0.1.0".to_owned(),
            "thaw.local/queue-proxy:0.1.0".to_owned()
        ])
    );
    let text = serde_json::to_string(&testbed.values().collect::<Vec<_>>()).unwrap();
    assert!(
        !text.contains("ghcr.io"),
        "a base image left in the overlay"
    );

    // And nothing else: with the names mapped back, the overlay is the base.
    let mut back = testbed.clone();
    for v in back.values_mut() {
        rename_images(v, "thaw.local/", "ghcr.io/thaw-dev/");
    }
    assert_same_objects("testbed overlay vs base", &back, &base);
}

#[test]
fn the_base_is_what_the_interfaces_say() {
    let Some(kubectl) = kubectl_bin() else { return };
    let base = objects(&kustomize(&kubectl, &at("deploy/kubernetes")));
    let get = |kind: &str, name: &str| base[&(kind.to_owned(), name.to_owned())].clone();

    let ns = get("Namespace", SYSTEM);
    assert_eq!(ns["metadata"]["labels"]["thaw.dev/inject"], "disabled");
    assert_eq!(
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "restricted"
    );
    for (key, o) in &base {
        if !matches!(
            key.0.as_str(),
            "Namespace" | "ClusterRole" | "ClusterRoleBinding" | "MutatingWebhookConfiguration"
        ) {
            assert_eq!(o["metadata"]["namespace"], SYSTEM, "{key:?}");
        }
        assert_eq!(
            o["metadata"]["labels"]["app.kubernetes.io/part-of"], "thaw",
            "{key:?}"
        );
    }

    // The activator Deployment: replicas, labels, ports, env, probes, drain vs grace.
    let activator = get("Deployment", "thaw-activator");
    assert_eq!(activator["spec"]["replicas"], 2);
    let pod = &activator["spec"]["template"];
    assert_eq!(
        pod["metadata"]["labels"]["app.kubernetes.io/name"],
        "thaw-activator"
    );
    assert_eq!(
        pod["metadata"]["annotations"]["prometheus.io/scrape"],
        "true"
    );
    assert_eq!(pod["metadata"]["annotations"]["prometheus.io/port"], "9090");
    let c = &pod["spec"]["containers"][0];
    let ports: BTreeMap<&str, i64> = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap(),
                p["containerPort"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ports,
        BTreeMap::from([
            ("http", 8012),
            ("h2c", 8013),
            ("metrics", 9090),
            ("stats", 8080)
        ])
    );
    let env: BTreeMap<&str, &Value> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e))
        .collect();
    for (name, value) in [
        ("THAW_PLATFORM", "kubernetes"),
        ("THAW_ACTIVATOR_SERVICE", "thaw-activator"),
        ("THAW_LEASE_NAME", "thaw-autoscaler"),
        ("THAW_STAT_PORT", "8080"),
        ("THAW_MAX_WAITING", "10000"),
        ("THAW_BUFFER_BUDGET", "64MiB"),
        ("THAW_DRAIN_PERIOD", "15s"),
    ] {
        assert_eq!(env[name]["value"], value, "{name}");
    }
    for (name, field) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
        ("POD_IP", "status.podIP"),
    ] {
        assert_eq!(
            env[name]["valueFrom"]["fieldRef"]["fieldPath"], field,
            "{name}"
        );
    }
    let drain: i64 = env["THAW_DRAIN_PERIOD"]["value"]
        .as_str()
        .unwrap()
        .trim_end_matches('s')
        .parse()
        .unwrap();
    let grace = pod["spec"]["terminationGracePeriodSeconds"]
        .as_i64()
        .unwrap();
    assert!(
        grace > drain,
        "grace {grace} s must exceed the drain {drain} s"
    );
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(c[probe]["httpGet"]["path"], "/", "{probe}");
        assert_eq!(c[probe]["httpGet"]["port"], "http", "{probe}");
    }
    // The liveness probe outlasts the drain, so draining never gets it restarted.
    let live = &c["livenessProbe"];
    let tolerated =
        live["periodSeconds"].as_i64().unwrap() * live["failureThreshold"].as_i64().unwrap();
    assert!(
        tolerated > drain,
        "liveness gives up after {tolerated} s, inside the drain"
    );
    assert!(c["resources"]["requests"].is_object() && c["resources"]["limits"].is_object());
    for c in [
        c,
        &get("Deployment", "thaw-webhook")["spec"]["template"]["spec"]["containers"][0],
    ] {
        let sc = &c["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
        assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    }
    assert_eq!(
        get("PodDisruptionBudget", "thaw-activator")["spec"]["minAvailable"],
        1
    );

    // Its Service: port 80 to http, found by the activators through its EndpointSlices,
    // so it lists ready pods only.
    let svc = get("Service", "thaw-activator");
    assert_eq!(
        svc["spec"]["ports"][0],
        json!({"name": "http", "port": 80, "targetPort": "http"})
    );
    assert!(svc["spec"]["publishNotReadyAddresses"].is_null());

    // The webhook and its configuration.
    let webhook = get("Deployment", "thaw-webhook");
    let w = &webhook["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(w["args"], json!(["webhook"]));
    assert_eq!(w["readinessProbe"]["httpGet"]["scheme"], "HTTPS");
    assert_eq!(
        get("Service", "thaw-webhook")["spec"]["ports"][0],
        json!({"name": "https", "port": 443, "targetPort": "https"})
    );
    let config = get("MutatingWebhookConfiguration", "thaw-sidecar-injector");
    let hook = &config["webhooks"][0];
    assert_eq!(hook["name"], "inject.thaw.dev");
    assert_eq!(hook["failurePolicy"], "Ignore");
    assert_eq!(hook["sideEffects"], "None");
    assert_eq!(hook["timeoutSeconds"], 5);
    assert_eq!(hook["reinvocationPolicy"], "Never");
    assert_eq!(hook["admissionReviewVersions"], json!(["v1"]));
    assert_eq!(
        hook["objectSelector"]["matchLabels"]["thaw.dev/inject"],
        "enabled"
    );
    assert_eq!(
        hook["clientConfig"]["service"],
        json!({"name": "thaw-webhook", "namespace": SYSTEM, "port": 443, "path": "/inject"})
    );
    assert!(
        hook["clientConfig"]["caBundle"].is_null(),
        "the webhook writes the caBundle"
    );
    assert_eq!(
        hook["rules"],
        json!([{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                "resources": ["pods"], "scope": "Namespaced"}])
    );
    assert_eq!(
        hook["namespaceSelector"]["matchExpressions"][0],
        json!({"key": "kubernetes.io/metadata.name", "operator": "NotIn",
               "values": [SYSTEM, "kube-system"]})
    );

    // RBAC: exactly the rules agreed, nothing more.
    let rules = |kind: &str, name: &str| get(kind, name)["rules"].clone();
    assert_eq!(
        rules("ClusterRole", "thaw-activator"),
        json!([
            {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["apps"], "resources": ["deployments/scale"], "verbs": ["get", "update", "patch"]},
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
            {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
        ])
    );
    assert_eq!(
        rules("Role", "thaw-activator"),
        json!([{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                "verbs": ["get", "list", "watch", "create", "update"]}])
    );
    assert_eq!(
        rules("ClusterRole", "thaw-webhook"),
        json!([{"apiGroups": ["admissionregistration.k8s.io"],
                "resources": ["mutatingwebhookconfigurations"],
                "resourceNames": ["thaw-sidecar-injector"],
                "verbs": ["get", "list", "watch", "patch"]},
               {"apiGroups": ["apps"], "resources": ["replicasets", "deployments"], "verbs": ["get"]}])
    );
    assert_eq!(
        rules("Role", "thaw-webhook-certs"),
        json!([{"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
               {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["thaw-webhook-certs"],
                "verbs": ["get", "update"]}])
    );
    assert!(!base.contains_key(&("Role".to_owned(), "thaw-webhook".to_owned())));
}

#[test]
fn the_example_function_opts_in_with_valid_annotations() {
    let Some(kubectl) = kubectl_bin() else { return };
    let example = objects(&kustomize(
        &kubectl,
        &at("deploy/kubernetes/examples/hello"),
    ));
    let testbed = objects(&kustomize(
        &kubectl,
        &at("deploy/kubernetes/examples/hello/testbed"),
    ));
    assert_eq!(
        keys(&example),
        BTreeSet::from(["Deployment/hello".to_owned(), "Service/hello".to_owned()])
    );
    let deployment = &example[&("Deployment".to_owned(), "hello".to_owned())];
    // Applied with `kubectl apply -n`: no namespace of its own. No replicas: the
    // autoscaler owns them (see the file).
    assert!(deployment["metadata"]["namespace"].is_null());
    assert!(deployment["spec"]["replicas"].is_null());

    // Every thaw.dev/* annotation is a known one, and they parse as the platform reads them.
    let notes: BTreeMap<String, String> =
        serde_json::from_value(deployment["metadata"]["annotations"].clone()).unwrap();
    let unknown: Vec<&String> = notes
        .keys()
        .filter(|k| k.starts_with(annotations::PREFIX) && !annotations::ALL.contains(&k.as_str()))
        .collect();
    assert!(unknown.is_empty(), "unknown annotations: {unknown:?}");
    let missing: Vec<&str> = annotations::ALL
        .iter()
        .copied()
        .filter(|a| *a != annotations::TARGET && !notes.contains_key(*a))
        .collect();
    assert!(missing.is_empty(), "the example should show {missing:?}");
    let settings = FunctionSettings::from_annotations(&notes).unwrap();
    assert_eq!(settings.hosts, vec!["hello.example.com".to_owned()]);
    assert_eq!(settings.container_concurrency, 10);

    let template = &deployment["spec"]["template"];
    assert_eq!(
        template["metadata"]["labels"][annotations::INJECT_LABEL],
        "enabled"
    );
    let app = &template["spec"]["containers"][0];
    assert_eq!(app["name"], "app");
    assert_eq!(app["image"], "ghcr.io/thaw-dev/testapp:0.1.0");
    assert!(app["readinessProbe"]["httpGet"].is_object());
    // The test app counts requests beyond the function's container concurrency.
    let max = app["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "MAX_CONCURRENCY")
        .map(|e| e["value"].as_str().unwrap().parse::<usize>().unwrap());
    assert_eq!(max, Some(settings.container_concurrency));
    let service = &example[&("Service".to_owned(), "hello".to_owned())];
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "queue-port");

    // The testbed's copy differs in the image alone.
    assert_eq!(
        images(&testbed),
        BTreeSet::from(["thaw.local/testapp:0.1.0".to_owned()])
    );
    let mut back = testbed.clone();
    for v in back.values_mut() {
        rename_images(v, "thaw.local/", "ghcr.io/thaw-dev/");
    }
    assert_same_objects("example testbed vs example", &back, &example);
}

#[test]
fn the_chart_lints_and_renders_what_the_base_does() {
    let (Some(kubectl), Some(helm_path)) = (kubectl_bin(), helm_bin()) else {
        return;
    };
    let chart = at("deploy/helm/thaw");
    let values = testbed_values();
    for args in [
        vec!["lint", "--strict", chart.as_str()],
        vec!["lint", "--strict", chart.as_str(), "-f", values.as_str()],
        vec![
            "lint",
            "--strict",
            chart.as_str(),
            "--set",
            "webhook.certSecret=thaw-webhook-cert",
        ],
    ] {
        let (ok, out, err) = helm(&helm_path, &args);
        assert!(ok, "helm {}: {out}{err}", args.join(" "));
        assert!(out.contains("0 chart(s) failed"), "{out}");
    }

    // With the Namespace rendered, the chart is the base; without it (`helm install`
    // makes the namespace), the base less its Namespace.
    let base = objects(&kustomize(&kubectl, &at("deploy/kubernetes")));
    let chart_all = objects(&render_chart(
        &helm_path,
        &["--set", "namespace.create=true"],
    ));
    assert_same_objects("chart (namespace.create) vs base", &chart_all, &base);
    let chart_default = objects(&render_chart(&helm_path, &[]));
    let mut base_less_ns = base.clone();
    base_less_ns.remove(&("Namespace".to_owned(), SYSTEM.to_owned()));
    assert_same_objects(
        "chart (defaults) vs base less its Namespace",
        &chart_default,
        &base_less_ns,
    );

    let testbed = objects(&kustomize(&kubectl, &at("deploy/kubernetes/testbed")));
    let chart_testbed = objects(&render_chart(
        &helm_path,
        &["--set", "namespace.create=true", "-f", &values],
    ));
    assert_same_objects(
        "chart (values-testbed) vs testbed overlay",
        &chart_testbed,
        &testbed,
    );

    let with_secret = objects(&kustomize(&kubectl, &cert_secret_overlay("parity")));
    let chart_secret = objects(&render_chart(
        &helm_path,
        &[
            "--set",
            "namespace.create=true",
            "--set",
            "webhook.certSecret=thaw-webhook-cert",
        ],
    ));
    assert_same_objects(
        "chart (certSecret) vs the cert-secret component",
        &chart_secret,
        &with_secret,
    );

    // Values reach the objects.
    let custom = objects(&render_chart(
        &helm_path,
        &[
            "--set",
            "images.activator.repository=registry.example/thaw/activator",
            "--set",
            "images.activator.tag=1.2.3",
            "--set",
            "images.queueProxy.repository=registry.example/thaw/queue-proxy",
            "--set",
            "activator.replicas=3",
            "--set",
            "activator.maxWaiting=500",
            "--set",
            "activator.bufferBudget=16MiB",
            "--set",
            "activator.drainPeriodSeconds=20",
            "--set",
            "activator.resources.limits.memory=1Gi",
        ],
    ));
    assert_eq!(
        images(&custom),
        BTreeSet::from([
            "registry.example/thaw/activator:1.2.3".to_owned(),
            "registry.example/thaw/queue-proxy:0.1.0".to_owned()
        ])
    );
    let activator = &custom[&("Deployment".to_owned(), "thaw-activator".to_owned())];
    assert_eq!(activator["spec"]["replicas"], 3);
    let c = &activator["spec"]["template"]["spec"]["containers"][0];
    let env = |name: &str| {
        c["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap()["value"]
            .clone()
    };
    assert_eq!(env("THAW_MAX_WAITING"), "500");
    assert_eq!(env("THAW_BUFFER_BUDGET"), "16MiB");
    assert_eq!(env("THAW_DRAIN_PERIOD"), "20s");
    assert_eq!(c["resources"]["limits"]["memory"], "1Gi");

    // A grace period inside the drain is refused, naming both values.
    let (ok, _, err) = helm(
        &helm_path,
        &[
            "template",
            "thaw",
            &chart,
            "--set",
            "activator.drainPeriodSeconds=30",
        ],
    );
    assert!(!ok, "a 30 s drain with a 30 s grace period was rendered");
    assert!(
        err.contains("terminationGracePeriodSeconds (30) must be longer"),
        "{err}"
    );
}

/// The thaw-system Namespace, applied for real once per test binary: the API server
/// cannot dry-run objects in a namespace that does not exist, so the namespaced objects'
/// dry runs need it. (Its own dry run then reads as "unchanged".)
fn ensure_system_namespace(testbed: &Testbed) {
    static APPLIED: OnceLock<()> = OnceLock::new();
    APPLIED.get_or_init(|| {
        let (ok, out) =
            testbed.kubectl(&["apply", "-f", &at("deploy/kubernetes/base/namespace.yaml")]);
        assert!(ok, "applying the thaw-system Namespace: {out}");
    });
}

/// `kubectl apply --dry-run=server` of a kustomization (`-k`) or a file (`-f`), which the
/// API server must accept whole, with no Pod Security or other warning. Returns how many
/// objects it accepted.
fn server_accepts(testbed: &Testbed, flag: &str, what: &str, namespace: Option<&str>) -> usize {
    let mut args = vec!["apply", "--dry-run=server", flag, what];
    if let Some(ns) = namespace {
        args.extend_from_slice(&["-n", ns]);
    }
    let (ok, out) = testbed.kubectl(&args);
    assert!(ok, "kubectl {}: {out}", args.join(" "));
    let warnings: Vec<&str> = out.lines().filter(|l| l.starts_with("Warning:")).collect();
    assert!(
        warnings.is_empty(),
        "kubectl {}: {warnings:?}",
        args.join(" ")
    );
    let lines: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
    for l in &lines {
        assert!(
            l.ends_with("(server dry run)"),
            "kubectl {}: {l}",
            args.join(" ")
        );
    }
    lines.len()
}

#[test]
fn the_api_server_accepts_the_base_the_overlays_and_the_example() {
    let (Some(testbed), Some(kubectl)) = (Testbed::shared(), kubectl_bin()) else {
        return;
    };
    ensure_system_namespace(testbed);
    for dir in ["deploy/kubernetes", "deploy/kubernetes/testbed"] {
        let expected = objects(&kustomize(&kubectl, &at(dir))).len();
        assert_eq!(
            server_accepts(testbed, "-k", &at(dir), None),
            expected,
            "{dir}"
        );
    }
    let overlay = cert_secret_overlay("dry-run");
    assert_eq!(
        server_accepts(testbed, "-k", &overlay, None),
        objects(&kustomize(&kubectl, &overlay)).len()
    );

    // The example goes into a user's namespace, here one that warns on anything short of
    // the "restricted" Pod Security Standard.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ns = rt.block_on(async {
        let client = testbed.client().await;
        testbed.namespace(&client, "example").await
    });
    let (ok, out) = testbed.kubectl(&[
        "label",
        "namespace",
        &ns,
        "pod-security.kubernetes.io/warn=restricted",
        "pod-security.kubernetes.io/warn-version=latest",
    ]);
    assert!(ok, "{out}");
    for dir in [
        "deploy/kubernetes/examples/hello",
        "deploy/kubernetes/examples/hello/testbed",
    ] {
        assert_eq!(
            server_accepts(testbed, "-k", &at(dir), Some(&ns)),
            2,
            "{dir}"
        );
    }
}

#[test]
fn the_api_server_accepts_the_rendered_chart() {
    let (Some(testbed), Some(helm_path)) = (Testbed::shared(), helm_bin()) else {
        return;
    };
    ensure_system_namespace(testbed);
    let values = testbed_values();
    let dir = repo_root()
        .join("target/deploy-tests")
        .join(format!("chart-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, extra) in [
        ("defaults", vec![]),
        ("namespace", vec!["--set", "namespace.create=true"]),
        (
            "testbed",
            vec!["--set", "namespace.create=true", "-f", values.as_str()],
        ),
        (
            "cert-secret",
            vec!["--set", "webhook.certSecret=thaw-webhook-cert"],
        ),
    ] {
        let rendered = render_chart(&helm_path, &extra);
        let file = dir.join(format!("{name}.yaml"));
        std::fs::write(&file, &rendered).unwrap();
        let accepted = server_accepts(testbed, "-f", &file.to_string_lossy(), None);
        assert_eq!(accepted, objects(&rendered).len(), "chart with {name}");
    }
}

#[test]
fn the_rbac_grants_what_the_components_need_and_nothing_more() {
    let Some(testbed) = Testbed::shared() else {
        return;
    };
    ensure_system_namespace(testbed);
    // Real objects this time: `auth can-i` asks the API server's RBAC authorizer.
    let (ok, out) = testbed.kubectl(&[
        "apply",
        "-f",
        &at("deploy/kubernetes/base/activator-rbac.yaml"),
        "-f",
        &at("deploy/kubernetes/base/webhook-rbac.yaml"),
    ]);
    assert!(ok, "{out}");
    let can = |who: &str, args: &[&str]| {
        let sa = format!("system:serviceaccount:{SYSTEM}:{who}");
        let mut all = vec!["auth", "can-i", "--as", sa.as_str()];
        all.extend_from_slice(args);
        let (_, out) = testbed.kubectl(&all);
        match out.lines().next().map(str::trim) {
            Some("yes") => true,
            Some("no") => false,
            _ => panic!("kubectl {}: {out}", all.join(" ")),
        }
    };
    let activator = |args: &[&str]| can("thaw-activator", args);
    let webhook = |args: &[&str]| can("thaw-webhook", args);
    for yes in [
        &["watch", "deployments.apps", "-A"][..],
        &[
            "patch",
            "deployments.apps",
            "--subresource",
            "scale",
            "-n",
            "default",
        ],
        &[
            "update",
            "deployments.apps",
            "--subresource",
            "scale",
            "-n",
            "default",
        ],
        &["list", "endpointslices.discovery.k8s.io", "-A"],
        &["create", "events", "-n", "default"],
        &["create", "events.events.k8s.io", "-n", "default"],
        &["update", "leases.coordination.k8s.io", "-n", SYSTEM],
        &["create", "leases.coordination.k8s.io", "-n", SYSTEM],
    ] {
        assert!(activator(yes), "the activator cannot {yes:?}");
    }
    for no in [
        &["update", "deployments.apps", "-n", "default"][..],
        &["patch", "deployments.apps", "-n", "default"],
        &["delete", "deployments.apps", "-n", "default"],
        &["get", "pods", "-n", "default"],
        &["get", "secrets", "-n", SYSTEM],
        &["update", "leases.coordination.k8s.io", "-n", "kube-system"],
        &["delete", "leases.coordination.k8s.io", "-n", SYSTEM],
        &[
            "patch",
            "mutatingwebhookconfigurations/thaw-sidecar-injector",
        ],
    ] {
        assert!(!activator(no), "the activator may {no:?}");
    }
    for yes in [
        &[
            "patch",
            "mutatingwebhookconfigurations/thaw-sidecar-injector",
        ][..],
        &["get", "mutatingwebhookconfigurations/thaw-sidecar-injector"],
        &["get", "secrets/thaw-webhook-certs", "-n", SYSTEM],
        &["update", "secrets/thaw-webhook-certs", "-n", SYSTEM],
        &["get", "replicasets.apps", "-n", "default"],
        &["get", "deployments.apps", "-n", "default"],
        &[
            "watch",
            "mutatingwebhookconfigurations/thaw-sidecar-injector",
        ],
    ] {
        assert!(webhook(yes), "the webhook cannot {yes:?}");
    }
    for no in [
        &["patch", "mutatingwebhookconfigurations/someone-elses"][..],
        &[
            "delete",
            "mutatingwebhookconfigurations/thaw-sidecar-injector",
        ],
        &["create", "mutatingwebhookconfigurations"],
        &["get", "secrets", "-n", SYSTEM],
        &["create", "pods", "-n", "default"],
    ] {
        assert!(!webhook(no), "the webhook may {no:?}");
    }
}

#[test]
fn the_dockerfiles_pass_hadolint() {
    let Some(hadolint) = hadolint_bin() else {
        return;
    };
    let files = [
        at("deploy/docker/activator.Dockerfile"),
        at("deploy/docker/queue-proxy.Dockerfile"),
    ];
    // Strictest threshold: even an "info" finding fails. Only the two registries the
    // images name are trusted (DL3026).
    let lint = |file: &str| {
        run(
            &hadolint,
            &[
                "--no-color",
                "--failure-threshold",
                "info",
                "--trusted-registry",
                "docker.io",
                "--trusted-registry",
                "gcr.io",
                file,
            ],
        )
    };
    for file in &files {
        let (ok, out, err) = lint(file);
        assert!(ok, "hadolint {file}:\n{out}{err}");
    }
    // The same run does fail a Dockerfile with the mistakes it exists to catch.
    let bad = target_dir().join(format!(
        "deploy-tests/bad-{}.Dockerfile",
        std::process::id()
    ));
    std::fs::create_dir_all(bad.parent().unwrap()).unwrap();
    std::fs::write(
        &bad,
        "FROM quay.io/someone/rust\nRUN apt-get install curl\nUSER root\nCMD activator\n",
    )
    .unwrap();
    let (ok, out, _) = lint(&bad.to_string_lossy());
    for rule in ["DL3006", "DL3008", "DL3026", "DL3002", "DL3025"] {
        assert!(out.contains(rule), "hadolint did not report {rule}:\n{out}");
    }
    assert!(!ok);

    // What the linter does not know but the manifests rely on: a numeric non-root user
    // (runAsNonRoot), a locked release build of the one package, two stages.
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let users: Vec<&str> = text.lines().filter(|l| l.starts_with("USER ")).collect();
        assert_eq!(users.last(), Some(&"USER 65532:65532"), "{file}");
        assert!(
            text.contains("cargo build --release --locked -p thaw-"),
            "{file}"
        );
        assert_eq!(
            text.lines().filter(|l| l.starts_with("FROM ")).count(),
            2,
            "{file}"
        );
    }
    let ignore = std::fs::read_to_string(repo_root().join(".dockerignore")).unwrap();
    for entry in ["target", ".git"] {
        assert!(
            ignore.lines().any(|l| l.trim() == entry),
            ".dockerignore lacks {entry}"
        );
    }
}
