//! Whole-object checks: the pod Knative's controller would build, idempotence on every
//! input, streams with lists and Services, and bad input.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{json, Value};

use super::*;

fn settings() -> InjectSettings {
    InjectSettings::with_image("thaw.local/queue-proxy")
}

/// Read as the injector (and Kubernetes) reads YAML.
fn docs(yaml: &str) -> Vec<Value> {
    stream::read(yaml).unwrap()
}

fn inject(yaml: &str) -> String {
    inject_stream(yaml, &settings()).unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

fn deployment(name: &str, extra_annotations: Value, containers: Value) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": "foo", "annotations": extra_annotations},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name, "thaw.dev/inject": "enabled"}},
                "spec": {"containers": containers}
            }
        }
    })
}

fn yaml(values: &[Value]) -> String {
    serde_saphyr::to_string_multiple(values).unwrap()
}

/// deploy_test.go's `defaultServingContainer` and `defaultQueueContainer` for revision
/// `bar` in namespace `foo`, after Knative's webhook defaults (timeout 300, a TCP
/// readiness probe with `successThreshold: 1`), mapped onto a Deployment as the module
/// documentation says.
#[test]
fn a_deployment_gets_the_pod_knatives_controller_builds() {
    let input = yaml(&[deployment(
        "bar",
        json!({}),
        json!([{"name": "serving-container", "image": "busybox", "ports": [{"containerPort": 8080}]}]),
    )]);
    let out = docs(&inject(&input));
    let template = &out[0]["spec"]["template"];
    assert_eq!(
        template["metadata"]["annotations"],
        json!({"kubectl.kubernetes.io/default-container": "serving-container"})
    );
    let probe = r#"{"tcpSocket":{"port":8080,"host":"127.0.0.1"},"successThreshold":1}"#;
    assert_eq!(
        template["spec"],
        json!({
            "terminationGracePeriodSeconds": 300,
            "containers": [
                {
                    "name": "serving-container",
                    "image": "busybox",
                    "ports": [{"name": "user-port", "containerPort": 8080}],
                    "env": [
                        {"name": "PORT", "value": "8080"},
                        {"name": "K_REVISION", "value": "bar"},
                        {"name": "K_CONFIGURATION", "value": "bar"},
                        {"name": "K_SERVICE", "value": "bar"},
                    ],
                    "lifecycle": {"preStop": {"httpGet": {"port": 8022, "path": "/wait-for-drain"}}},
                    "terminationMessagePolicy": "FallbackToLogsOnError",
                },
                {
                    "name": "queue-proxy",
                    "image": "thaw.local/queue-proxy",
                    "resources": {"requests": {"cpu": "25m"}},
                    "ports": [
                        {"name": "http-autometric", "containerPort": 9090},
                        {"name": "http-usermetric", "containerPort": 9091},
                        {"name": "queue-port", "containerPort": 8012},
                        {"name": "https-port", "containerPort": 8112},
                    ],
                    "readinessProbe": {
                        "httpGet": {"port": 8012, "httpHeaders": [{"name": "K-Network-Probe", "value": "queue"}]},
                        "successThreshold": 1,
                    },
                    "securityContext": {
                        "allowPrivilegeEscalation": false,
                        "readOnlyRootFilesystem": true,
                        "runAsNonRoot": true,
                        "capabilities": {"drop": ["ALL"]},
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "env": [
                        {"name": "SERVING_NAMESPACE", "value": "foo"},
                        {"name": "SERVING_SERVICE", "value": "bar"},
                        {"name": "SERVING_CONFIGURATION", "value": "bar"},
                        {"name": "SERVING_REVISION", "value": "bar"},
                        {"name": "QUEUE_SERVING_PORT", "value": "8012"},
                        {"name": "QUEUE_SERVING_TLS_PORT", "value": "8112"},
                        {"name": "CONTAINER_CONCURRENCY", "value": "0"},
                        {"name": "REVISION_TIMEOUT_SECONDS", "value": "300"},
                        {"name": "REVISION_RESPONSE_START_TIMEOUT_SECONDS", "value": "0"},
                        {"name": "REVISION_IDLE_TIMEOUT_SECONDS", "value": "0"},
                        {"name": "SERVING_POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "SERVING_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                        {"name": "SERVING_LOGGING_CONFIG"},
                        {"name": "SERVING_LOGGING_LEVEL"},
                        {"name": "USER_PORT", "value": "8080"},
                        {"name": "SYSTEM_NAMESPACE", "value": "thaw-system"},
                        {"name": "SERVING_READINESS_PROBE", "value": probe},
                        {"name": "HOST_IP", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.hostIP"}}},
                        {"name": "ENABLE_HTTP2_AUTO_DETECTION", "value": "false"},
                        {"name": "ENABLE_HTTP_FULL_DUPLEX", "value": "false"},
                        {"name": "ROOT_CA"},
                        {"name": "QUEUE_PROXY_TLS_MIN_VERSION"},
                        {"name": "QUEUE_PROXY_TLS_MAX_VERSION"},
                        {"name": "QUEUE_PROXY_TLS_CIPHER_SUITES"},
                        {"name": "QUEUE_PROXY_TLS_CURVE_PREFERENCES"},
                        {"name": "ENABLE_MULTI_CONTAINER_PROBES", "value": "false"},
                        {"name": "OBSERVABILITY_CONFIG", "value": DEFAULT_OBSERVABILITY_CONFIG},
                    ],
                },
            ],
        })
    );
    // Everything outside the pod template is as it was.
    let mut before = docs(&input).remove(0);
    let mut after = out[0].clone();
    before["spec"]["template"] = Value::Null;
    after["spec"]["template"] = Value::Null;
    assert_eq!(before, after);
}

#[test]
fn annotations_set_the_sidecars_figures() {
    let input = yaml(&[deployment(
        "web",
        json!({
            "thaw.dev/container-concurrency": "10",
            "thaw.dev/timeout-seconds": "600",
            "thaw.dev/response-start-timeout-seconds": "5",
            "thaw.dev/idle-timeout-seconds": "9",
            "thaw.dev/service": "web-svc",
        }),
        json!([{"name": "app", "image": "app",
                "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 1}}]),
    )]);
    let out = docs(&inject(&input));
    let spec = &out[0]["spec"]["template"]["spec"];
    let env = |name: &str| {
        spec["containers"][1]["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .map(|e| e.get("value").cloned().unwrap_or(json!("")))
            .unwrap()
    };
    assert_eq!(env("CONTAINER_CONCURRENCY"), "10");
    assert_eq!(env("REVISION_TIMEOUT_SECONDS"), "600");
    assert_eq!(env("REVISION_RESPONSE_START_TIMEOUT_SECONDS"), "5");
    assert_eq!(env("REVISION_IDLE_TIMEOUT_SECONDS"), "9");
    assert_eq!(env("SERVING_SERVICE"), "web-svc");
    assert_eq!(
        env("SERVING_READINESS_PROBE"),
        r#"{"httpGet":{"path":"/healthz","port":8080,"host":"127.0.0.1","scheme":"HTTP"},"timeoutSeconds":1,"periodSeconds":1,"successThreshold":1,"failureThreshold":3}"#
    );
    assert_eq!(spec["terminationGracePeriodSeconds"], 600);
    // The probe moved: the kubelet now asks the sidecar, with the user's timing.
    assert!(spec["containers"][0].get("readinessProbe").is_none());
    assert_eq!(
        spec["containers"][1]["readinessProbe"],
        json!({"httpGet": {"port": 8012, "httpHeaders": [{"name": "K-Network-Probe", "value": "queue"}]},
               "timeoutSeconds": 1, "periodSeconds": 1, "successThreshold": 1, "failureThreshold": 3})
    );
}

#[test]
fn the_grace_period_covers_the_drain() {
    let grace = |annotations: Value, template_grace: Option<u64>| {
        let mut d = deployment("web", annotations, json!([{"name": "app", "image": "app"}]));
        if let Some(g) = template_grace {
            d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = g.into();
        }
        docs(&inject(&yaml(&[d])))[0]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            .clone()
    };
    assert_eq!(grace(json!({}), None), 300, "Knative: the revision timeout");
    assert_eq!(
        grace(json!({"thaw.dev/timeout-seconds": "10"}), None),
        30,
        "the drain quiet period"
    );
    assert_eq!(
        grace(json!({"thaw.dev/timeout-seconds": "10"}), Some(3600)),
        3600,
        "never shortened"
    );
    assert_eq!(grace(json!({}), Some(30)), 300);
}

/// Inputs every stream test uses; injecting their output again changes nothing.
fn inputs() -> Vec<String> {
    let app = |extra: Value| {
        let mut c = json!({"name": "app", "image": "thaw.local/testapp"});
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        c
    };
    vec![
        yaml(&[deployment("a", json!({}), json!([app(json!({}))]))]),
        yaml(&[
            deployment(
                "web",
                json!({"thaw.dev/container-concurrency": "2"}),
                json!([app(json!({
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 1},
                    "livenessProbe": {"tcpSocket": {"port": "http"}},
                }))]),
            ),
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "foo"},
                   "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]}}),
        ]),
        // h2c, an exec probe, several ports, and a sidecar of another kind.
        yaml(&[deployment(
            "grpc",
            json!({}),
            json!([
                app(json!({
                    "ports": [{"name": "h2c", "containerPort": 9000}, {"name": "metrics", "containerPort": 9100}],
                    "readinessProbe": {"exec": {"command": ["true"]}},
                })),
                {"name": "logger", "image": "logger"},
            ]),
        )]),
        // A list holding a workload of each kind, a Service and a ConfigMap.
        yaml(&[json!({"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "db"},
             "spec": {"template": {"metadata": {"labels": {"thaw.dev/inject": "enabled"}},
                                   "spec": {"containers": [app(json!({"env": [{"name": "PORT", "value": "5000"}]}))]}}}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "db"}, "spec": {"ports": [{"port": 5000}]}},
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"k": "v"}},
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "solo", "labels": {"thaw.dev/inject": "enabled"}},
             "spec": {"containers": [app(json!({}))]}},
        ]})]),
        // Not opted in: passes through.
        yaml(&[
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "plain"},
                   "spec": {"template": {"metadata": {"labels": {"thaw.dev/inject": "disabled"}},
                                         "spec": {"containers": [app(json!({}))]}}}}),
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "plain"},
                   "spec": {"ports": [{"port": 80, "targetPort": 8080}]}}),
        ]),
        String::new(),
    ]
}

#[test]
fn injecting_twice_changes_nothing() {
    for input in inputs() {
        let once = inject(&input);
        let (twice, report) = inject_stream_with_report(&once, &settings()).unwrap();
        assert_eq!(once, twice, "input:\n{input}");
        assert!(
            report
                .lines
                .iter()
                .all(|l| l.ends_with("unchanged (already injected)")),
            "{report:?}"
        );
        // Each pod template, injected again on its own, reports no change.
        for doc in docs(&once) {
            let items = doc
                .get("items")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_else(|| vec![doc.clone()]);
            for item in items {
                let pod = if item["kind"] == "Pod" {
                    item.clone()
                } else {
                    item["spec"]["template"].clone()
                };
                if !inject_requested(&pod["metadata"]) {
                    continue;
                }
                let name = item["metadata"]["name"].as_str().unwrap();
                let ns = item["metadata"]["namespace"].as_str();
                let annotations = item["metadata"]["annotations"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                            .collect()
                    })
                    .unwrap_or_default();
                let config = SidecarConfig::from_annotations(ns, name, &annotations).unwrap();
                let mut again = pod.clone();
                assert!(
                    !inject_pod(&mut again, &config, &settings()).unwrap(),
                    "{name}"
                );
                assert_eq!(again, pod);
            }
        }
    }
}

#[test]
fn a_stream_with_lists_services_and_other_kinds() {
    let input = inputs()[3].clone();
    let (out, report) = inject_stream_with_report(&input, &settings()).unwrap();
    assert_eq!(report.summary(), "injected 2 of 4 objects");
    assert_eq!(
        report.lines,
        [
            "statefulset/db injected",
            "pod/solo injected",
            "service/db targetPort → 8012 (statefulset/db's queue-proxy)",
        ]
    );
    let items = docs(&out)[0]["items"].as_array().unwrap().clone();
    let db = &items[0]["spec"]["template"]["spec"];
    assert_eq!(db["containers"][1]["name"], "queue-proxy");
    // No namespace in the manifest: the downward API supplies it.
    assert_eq!(
        db["containers"][1]["env"][0],
        json!({"name": "SERVING_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}})
    );
    // PORT was set and no port declared: PORT is the user port.
    assert!(db["containers"][1]["env"]
        .as_array()
        .unwrap()
        .contains(&json!({"name": "USER_PORT", "value": "5000"})));
    assert_eq!(
        items[1]["spec"]["ports"],
        json!([{"port": 5000, "targetPort": 8012}])
    );
    assert_eq!(
        items[2],
        docs(&input)[0]["items"][2],
        "the ConfigMap passes through"
    );
    assert_eq!(items[3]["spec"]["containers"][1]["name"], "queue-proxy");
    assert_eq!(
        items[3]["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"],
        "app"
    );
}

#[test]
fn a_typed_list_and_a_service_by_port_name() {
    let input = inputs()[1].clone();
    let out = docs(&inject(&input));
    assert_eq!(
        out[1]["spec"]["ports"],
        json!([{"port": 80, "targetPort": 8012}])
    );
    let app = &out[0]["spec"]["template"]["spec"]["containers"][0];
    // The named liveness port is renumbered, as Knative does.
    assert_eq!(app["livenessProbe"], json!({"tcpSocket": {"port": 8080}}));

    let list = yaml(&[
        json!({"apiVersion": "apps/v1", "kind": "DeploymentList", "items": [docs(&input)[0]]}),
    ]);
    let out = docs(&inject(&list));
    assert_eq!(
        out[0]["items"][0]["spec"]["template"]["spec"]["containers"][1]["name"],
        "queue-proxy"
    );
}

#[test]
fn h2c_exec_probes_and_several_ports() {
    let out = docs(&inject(&inputs()[2]));
    let spec = &out[0]["spec"]["template"]["spec"];
    let app = &spec["containers"][0];
    assert_eq!(
        app["ports"].as_array().unwrap().len(),
        2,
        "several ports are kept"
    );
    assert_eq!(
        app["readinessProbe"],
        json!({"exec": {"command": ["true"]}}),
        "exec stays"
    );
    assert_eq!(
        spec["containers"][1],
        json!({"name": "logger", "image": "logger"}),
        "left alone"
    );
    let qp = &spec["containers"][2];
    assert_eq!(
        qp["ports"][2],
        json!({"name": "queue-port", "containerPort": 8013})
    );
    let env = qp["env"].as_array().unwrap();
    assert!(env.contains(&json!({"name": "QUEUE_SERVING_PORT", "value": "8013"})));
    assert!(env.contains(&json!({"name": "SERVING_READINESS_PROBE",
        "value": r#"{"tcpSocket":{"port":9000,"host":"127.0.0.1"},"successThreshold":1}"#})));
}

#[test]
fn other_documents_pass_through_with_the_same_content() {
    let input = "# a comment, dropped\n\
        apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\ndata:\n  number: \"10\"\n  truth: \"yes\"\n  multi: |\n    a\n    b\n\
        ---\n\
        ---\n\
        apiVersion: v1\nkind: Secret\nmetadata:\n  name: s\nstringData:\n  on: \"off\"\n\
        ---\n\
        apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: odd\n  annotations:\n    thaw.dev/container-concurrency: 3\n\
        ---\n\
        apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: d\nspec:\n  template:\n    spec:\n      volumes:\n      - name: v\n        secret:\n          secretName: s\n          defaultMode: 0644\n      containers:\n      - name: a\n        image: a\n";
    let out = inject(input);
    let (a, b) = (docs(input), docs(&out));
    assert_eq!(a, b);
    assert_eq!(b.len(), 4, "the empty document is dropped");
    assert_eq!(
        b[3]["spec"]["template"]["spec"]["volumes"][0]["secret"]["defaultMode"], 420,
        "0644 is octal, as Kubernetes reads it"
    );
    // Strings Go's YAML would misread stay quoted.
    assert!(out.contains("number: \"10\""), "{out}");
    assert!(out.contains("truth: \"yes\""), "{out}");
    assert!(!out.contains("comment"));
}

#[test]
fn an_existing_queue_proxy_is_updated_in_place() {
    let input = yaml(&[deployment(
        "web",
        json!({}),
        json!([
            {"name": "queue-proxy", "image": "gcr.io/knative-releases/queue:v1.23",
             "volumeMounts": [{"name": "certs", "mountPath": "/certs"}],
             "env": [{"name": "QUEUE_SERVING_PORT", "value": "8012"}, {"name": "SERVING_READINESS_PROBE",
                      "value": r#"{"httpGet":{"path":"/ready","port":8080,"host":"127.0.0.1","scheme":"HTTP"},"successThreshold":1}"#}]},
            {"name": "app", "image": "app", "ports": [{"name": "user-port", "containerPort": 8080}]},
        ]),
    )]);
    let out = docs(&inject(&input));
    let containers = out[0]["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(containers.len(), 2);
    assert_eq!(containers[0]["name"], "queue-proxy", "in its place");
    assert_eq!(containers[0]["image"], "thaw.local/queue-proxy");
    assert_eq!(
        containers[0]["volumeMounts"],
        json!([{"name": "certs", "mountPath": "/certs"}])
    );
    // The probe an earlier injection moved is read back.
    let env = containers[0]["env"].as_array().unwrap();
    assert!(env.contains(&json!({"name": "SERVING_READINESS_PROBE",
        "value": r#"{"httpGet":{"path":"/ready","port":8080,"host":"127.0.0.1","scheme":"HTTP"},"successThreshold":1}"#})));
}

#[test]
fn a_pod_as_the_webhook_sees_it() {
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "generateName": "web-5d4f8b7c9-",
            "labels": {"app": "web", "pod-template-hash": "5d4f8b7c9", "thaw.dev/inject": "enabled"},
            "annotations": {"thaw.dev/container-concurrency": "4"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-5d4f8b7c9",
                                 "uid": "u", "controller": true}],
        },
        "spec": {"containers": [{"name": "app", "image": "app", "ports": [{"containerPort": 8080}]}]},
    });
    assert!(inject_requested(&pod["metadata"]));
    assert!(!has_sidecar(&pod["spec"]));
    let config = SidecarConfig::for_pod(&pod, Some("prod")).unwrap();
    let after = injected_pod(&pod, &config, &settings()).unwrap();
    assert!(has_sidecar(&after["spec"]));
    let env = after["spec"]["containers"][1]["env"].as_array().unwrap();
    for want in [
        json!({"name": "SERVING_NAMESPACE", "value": "prod"}),
        json!({"name": "SERVING_REVISION", "value": "web"}),
        json!({"name": "CONTAINER_CONCURRENCY", "value": "4"}),
    ] {
        assert!(env.contains(&want), "{want}");
    }
    let mut again = after.clone();
    assert!(!inject_pod(&mut again, &config, &settings()).unwrap());

    // A failed injection leaves the pod as it was.
    let mut bad = pod.clone();
    bad["spec"]["containers"][0]["ports"][0]["containerPort"] = json!(9090);
    let before = bad.clone();
    let e = inject_pod(&mut bad, &config, &settings()).unwrap_err();
    assert_eq!(e.field(), Some("spec.containers[0].ports[0].containerPort"));
    assert_eq!(bad, before);
}

/// (input, document, field, words in the message)
#[test]
fn bad_input_is_a_precise_error() {
    let d = |containers: Value| yaml(&[deployment("web", json!({}), containers)]);
    let app = json!({"name": "app", "image": "app"});
    let cases: Vec<(String, Option<usize>, Option<&str>, &str)> = vec![
        ("a: [b\n".into(), None, None, "invalid YAML"),
        (
            format!("{}---\n- a list\n", yaml(&[json!({"kind": "ConfigMap"})])),
            Some(2),
            Some(""),
            "expected a Kubernetes object (a mapping), got a list",
        ),
        (
            d(json!([])),
            Some(1),
            Some("spec.template.spec.containers"),
            "at least one container",
        ),
        (
            d(json!("app")),
            Some(1),
            Some("spec.template.spec.containers"),
            "expected a list",
        ),
        (
            d(json!([{"image": "x"}])),
            Some(1),
            Some("spec.template.spec.containers[0].name"),
            "missing",
        ),
        (
            d(
                json!([{"name": "a", "ports": [{"containerPort": 80}]}, {"name": "b", "ports": [{"containerPort": 81}]}]),
            ),
            Some(1),
            Some("spec.template.spec.containers"),
            "declare ports on exactly one",
        ),
        (
            d(json!([{"name": "a", "ports": [{"containerPort": 8012}]}])),
            Some(1),
            Some("spec.template.spec.containers[0].ports[0].containerPort"),
            "reserved",
        ),
        (
            d(json!([{"name": "a", "readinessProbe": {"periodSeconds": "soon"}}])),
            Some(1),
            Some("spec.template.spec.containers[0].readinessProbe"),
            "invalid type",
        ),
        (
            d(
                json!([{"name": "a", "readinessProbe": {"httpGet": {"port": 80}, "tcpSocket": {"port": 80}}}]),
            ),
            Some(1),
            Some("spec.template.spec.containers[0].readinessProbe"),
            "exactly one of",
        ),
        (
            yaml(&[deployment(
                "web",
                json!({"thaw.dev/container-concurrency": "99999999999999999999"}),
                json!([app]),
            )]),
            Some(1),
            Some("metadata.annotations"),
            "thaw.dev/container-concurrency",
        ),
        (
            yaml(&[deployment(
                "web",
                json!({"thaw.dev/timeout-seconds": 30}),
                json!([app]),
            )]),
            Some(1),
            Some("metadata.annotations[\"thaw.dev/timeout-seconds\"]"),
            "must be quoted",
        ),
        (
            yaml(&[json!({"kind": "Job", "metadata": {"name": "j"},
                          "spec": {"template": {"metadata": {"labels": {"thaw.dev/inject": "enabled"}}, "spec": {}}}})]),
            Some(1),
            Some("spec.template.metadata.labels"),
            "run to completion",
        ),
        (
            yaml(&[json!({"kind": "Deployment", "metadata": {"name": "web"},
                          "spec": {"template": {"metadata": {"labels": {"thaw.dev/inject": "enabled"}}}}})]),
            Some(1),
            Some("spec.template.spec"),
            "missing",
        ),
        (
            yaml(&[
                deployment(
                    "web",
                    json!({}),
                    json!([{"name": "a", "ports": [{"containerPort": 8080}]}]),
                ),
                json!({"kind": "Service", "metadata": {"name": "web", "namespace": "foo"}, "spec": {"ports": [{"port": 9000}]}}),
            ]),
            Some(2),
            Some("spec.ports"),
            "no port targets the user container's port 8080",
        ),
        (
            yaml(&[
                json!({"kind": "List", "items": [{"kind": "Deployment", "metadata": {"name": "x"},
                "spec": {"template": {"metadata": {"labels": {"thaw.dev/inject": "enabled"}}, "spec": {"containers": [{"name": "a", "ports": [{"containerPort": -1}]}]}}}}]}),
            ]),
            Some(1),
            Some("items[0].spec.template.spec.containers[0].ports[0].containerPort"),
            "expected a port number",
        ),
    ];
    for (input, document, field, words) in cases {
        let e = inject_stream(&input, &settings()).unwrap_err();
        let text = e.to_string();
        assert_eq!(e.document(), document, "{text}\n{input}");
        assert_eq!(e.field(), field, "{text}\n{input}");
        assert!(text.contains(words), "{text:?} lacks {words:?}");
    }
}

#[test]
fn the_object_at_fault_is_named() {
    let input = yaml(&[
        json!({"kind": "ConfigMap", "metadata": {"name": "c"}}),
        json!({"kind": "List", "items": [deployment("web", json!({}), json!([]))]}),
    ]);
    let e = inject_stream(&input, &settings()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "document 2 (items[0] (Deployment web)): items[0].spec.template.spec.containers: missing: a pod needs at least one container"
    );
}
