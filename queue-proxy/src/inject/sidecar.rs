//! The queue-proxy container, as Knative's controller builds it (`queue.go`
//! `makeQueueContainer`): its ports, its environment, its security context.

use std::time::Duration;

use serde_json::{json, Map, Value};

use super::config::SidecarConfig;
use super::settings::{InjectSettings, DEFAULT_DRAIN_QUIET_PERIOD};
use crate::config as env;

/// The sidecar's container name (Knative's `QueueContainerName`).
pub const CONTAINER_NAME: &str = "queue-proxy";
/// Where user traffic enters the pod (Knative's `BackendHTTPPort`).
pub const SERVING_PORT: u16 = 8012;
/// The serving port of a revision whose user port is named `h2c` (`BackendHTTP2Port`).
pub const H2C_SERVING_PORT: u16 = 8013;
/// User traffic over TLS, when the certificates are mounted (`BackendHTTPSPort`).
pub const TLS_PORT: u16 = 8112;
/// `/wait-for-drain` (`QueueAdminPort`). Knative lists no container port for it.
pub const ADMIN_PORT: u16 = 8022;
/// The autoscaler's scrape (`AutoscalingQueueMetricsPort`).
pub const METRICS_PORT: u16 = 9090;
/// Prometheus metrics for users (`UserQueueMetricsPort`).
pub const USER_METRICS_PORT: u16 = 9091;
/// Ports no user container may use: the sidecar shares the pod's network namespace
/// (Knative's `reservedPorts`, which also holds the profiling port 8008).
pub const RESERVED_PORTS: [u16; 6] = [
    SERVING_PORT,
    H2C_SERVING_PORT,
    ADMIN_PORT,
    METRICS_PORT,
    USER_METRICS_PORT,
    8008,
];
/// The path the user container's preStop hook calls (`RequestQueueDrainPath`).
pub const DRAIN_PATH: &str = "/wait-for-drain";

/// Env names the injector owns on the sidecar: an existing sidecar's entries with these
/// names are replaced; others (set by an operator) are kept after them.
const OWNED_ENV: [&str; 28] = [
    env::SERVING_NAMESPACE,
    env::SERVING_SERVICE,
    env::SERVING_CONFIGURATION,
    env::SERVING_REVISION,
    env::QUEUE_SERVING_PORT,
    env::QUEUE_SERVING_TLS_PORT,
    env::CONTAINER_CONCURRENCY,
    env::REVISION_TIMEOUT_SECONDS,
    env::REVISION_RESPONSE_START_TIMEOUT_SECONDS,
    env::REVISION_IDLE_TIMEOUT_SECONDS,
    env::SERVING_POD,
    env::SERVING_POD_IP,
    env::SERVING_LOGGING_CONFIG,
    env::SERVING_LOGGING_LEVEL,
    env::USER_PORT,
    SYSTEM_NAMESPACE,
    env::SERVING_READINESS_PROBE,
    HOST_IP,
    env::ENABLE_HTTP2_AUTO_DETECTION,
    env::ENABLE_HTTP_FULL_DUPLEX,
    ROOT_CA,
    env::QUEUE_PROXY_TLS_MIN_VERSION,
    env::QUEUE_PROXY_TLS_MAX_VERSION,
    QUEUE_PROXY_TLS_CIPHER_SUITES,
    QUEUE_PROXY_TLS_CURVE_PREFERENCES,
    env::ENABLE_MULTI_CONTAINER_PROBES,
    env::OBSERVABILITY_CONFIG,
    env::THAW_DRAIN_QUIET_PERIOD,
];
const SYSTEM_NAMESPACE: &str = "SYSTEM_NAMESPACE";
const HOST_IP: &str = "HOST_IP";
const ROOT_CA: &str = "ROOT_CA";
const QUEUE_PROXY_TLS_CIPHER_SUITES: &str = "QUEUE_PROXY_TLS_CIPHER_SUITES";
const QUEUE_PROXY_TLS_CURVE_PREFERENCES: &str = "QUEUE_PROXY_TLS_CURVE_PREFERENCES";

/// What the sidecar is built from, besides the settings.
pub(crate) struct Sidecar<'a> {
    pub config: &'a SidecarConfig,
    pub settings: &'a InjectSettings,
    pub serving_port: u16,
    pub user_port: u16,
    /// `SERVING_READINESS_PROBE`.
    pub readiness_probe: String,
    /// The sidecar's own kubelet readiness probe.
    pub kubelet_probe: Value,
}

/// An env entry with a literal value. Go's `omitempty` drops an empty `value`, so the
/// entry reads as the API server stores it; the kubelet still sets the variable (empty).
pub(crate) fn var(name: &str, value: impl Into<String>) -> Value {
    let value = value.into();
    if value.is_empty() {
        json!({"name": name})
    } else {
        json!({"name": name, "value": value})
    }
}

/// An env entry from the downward API.
fn field_ref(name: &str, path: &str) -> Value {
    json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}})
}

impl Sidecar<'_> {
    /// The container (its keys come out sorted, as `kubectl get -o yaml` shows them).
    pub fn container(&self) -> Value {
        let mut c = Map::new();
        c.insert("name".into(), CONTAINER_NAME.into());
        c.insert("image".into(), self.settings.image.clone().into());
        c.insert("ports".into(), self.ports());
        c.insert("readinessProbe".into(), self.kubelet_probe.clone());
        if !is_empty(&self.settings.resources) {
            c.insert("resources".into(), self.settings.resources.clone());
        }
        c.insert("securityContext".into(), security_context());
        c.insert("env".into(), Value::Array(self.env()));
        Value::Object(c)
    }

    /// Updates an existing queue-proxy container in place: the fields Knative's
    /// controller sets are replaced, everything else (an operator's volume mounts, the
    /// API server's defaults) stays.
    pub fn update(&self, existing: &mut Map<String, Value>) {
        let Value::Object(fresh) = self.container() else {
            return;
        };
        let kept_env: Vec<Value> = existing
            .get("env")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|e| {
                let name = e.get("name").and_then(Value::as_str).unwrap_or("");
                !OWNED_ENV.contains(&name)
            })
            .cloned()
            .collect();
        if is_empty(&self.settings.resources) {
            existing.remove("resources");
        }
        // Knative sets no startup probe; an old one would delay readiness.
        existing.remove("startupProbe");
        for (key, value) in fresh {
            existing.insert(key, value);
        }
        if let Some(Value::Array(env)) = existing.get_mut("env") {
            env.extend(kept_env);
        }
    }

    /// Knative's order: the metrics ports, then serving, then TLS. The admin port is not
    /// listed; the preStop hook names it by number.
    fn ports(&self) -> Value {
        json!([
            {"name": "http-autometric", "containerPort": METRICS_PORT},
            {"name": "http-usermetric", "containerPort": USER_METRICS_PORT},
            {"name": "queue-port", "containerPort": self.serving_port},
            {"name": "https-port", "containerPort": TLS_PORT},
        ])
    }

    /// The environment, in `makeQueueContainer`'s order, then Thaw's own settings when
    /// they differ from Knative's behaviour.
    fn env(&self) -> Vec<Value> {
        let c = self.config;
        let s = self.settings;
        let namespace = match &c.namespace {
            Some(ns) => var(env::SERVING_NAMESPACE, ns.as_str()),
            // Same value at run time, for manifests applied with `kubectl -n`.
            None => field_ref(env::SERVING_NAMESPACE, "metadata.namespace"),
        };
        let mut vars = vec![
            namespace,
            var(env::SERVING_SERVICE, c.service.as_str()),
            var(env::SERVING_CONFIGURATION, c.revision.as_str()),
            var(env::SERVING_REVISION, c.revision.as_str()),
            var(env::QUEUE_SERVING_PORT, self.serving_port.to_string()),
            var(env::QUEUE_SERVING_TLS_PORT, TLS_PORT.to_string()),
            var(
                env::CONTAINER_CONCURRENCY,
                c.container_concurrency.to_string(),
            ),
            var(env::REVISION_TIMEOUT_SECONDS, c.timeout_seconds.to_string()),
            var(
                env::REVISION_RESPONSE_START_TIMEOUT_SECONDS,
                c.response_start_timeout_seconds.to_string(),
            ),
            var(
                env::REVISION_IDLE_TIMEOUT_SECONDS,
                c.idle_timeout_seconds.to_string(),
            ),
            field_ref(env::SERVING_POD, "metadata.name"),
            field_ref(env::SERVING_POD_IP, "status.podIP"),
            var(env::SERVING_LOGGING_CONFIG, ""),
            var(env::SERVING_LOGGING_LEVEL, s.logging_level.as_str()),
            var(env::USER_PORT, self.user_port.to_string()),
            var(SYSTEM_NAMESPACE, s.system_namespace.as_str()),
            var(env::SERVING_READINESS_PROBE, self.readiness_probe.as_str()),
            json!({"name": HOST_IP, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.hostIP"}}}),
            var(
                env::ENABLE_HTTP2_AUTO_DETECTION,
                s.http2_auto_detection.to_string(),
            ),
            var(env::ENABLE_HTTP_FULL_DUPLEX, c.http_full_duplex.to_string()),
            var(ROOT_CA, ""),
            var(env::QUEUE_PROXY_TLS_MIN_VERSION, ""),
            var(env::QUEUE_PROXY_TLS_MAX_VERSION, ""),
            var(QUEUE_PROXY_TLS_CIPHER_SUITES, ""),
            var(QUEUE_PROXY_TLS_CURVE_PREFERENCES, ""),
            var(env::ENABLE_MULTI_CONTAINER_PROBES, "false"),
            var(env::OBSERVABILITY_CONFIG, s.observability_config.as_str()),
        ];
        if s.drain_quiet_period != DEFAULT_DRAIN_QUIET_PERIOD {
            vars.push(var(
                env::THAW_DRAIN_QUIET_PERIOD,
                format_duration(s.drain_quiet_period),
            ));
        }
        vars
    }
}

/// A duration the queue-proxy's parser reads back exactly.
fn format_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 && d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Object(m) => m.is_empty(),
        _ => false,
    }
}

/// Knative's `queueSecurityContext`: the sidecar needs no privilege, writes nothing to
/// its root filesystem and runs as any non-root user.
fn security_context() -> Value {
    json!({
        "allowPrivilegeEscalation": false,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": true,
        "runAsNonRoot": true,
        "seccompProfile": {"type": "RuntimeDefault"},
    })
}

/// The user container's `lifecycle.preStop` (`deploy.go` `userLifecycle`): the kubelet
/// holds the user container's SIGTERM until the queue-proxy has drained.
pub(crate) fn drain_hook() -> Value {
    json!({"httpGet": {"path": DRAIN_PATH, "port": ADMIN_PORT}})
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn sidecar<'a>(config: &'a SidecarConfig, settings: &'a InjectSettings) -> Sidecar<'a> {
        Sidecar {
            config,
            settings,
            serving_port: SERVING_PORT,
            user_port: 8080,
            readiness_probe:
                r#"{"tcpSocket":{"port":8080,"host":"127.0.0.1"},"successThreshold":1}"#.into(),
            kubelet_probe: json!({"httpGet": {"port": 8012}}),
        }
    }

    fn config() -> SidecarConfig {
        SidecarConfig::from_annotations(Some("foo"), "bar", &Default::default()).unwrap()
    }

    /// Every entry of Knative's `defaultEnv` (queue_test.go), with the revision mapped
    /// onto the Deployment `bar` in namespace `foo`, in `makeQueueContainer`'s order.
    #[test]
    fn the_environment_is_knatives() {
        let (config, settings) = (config(), InjectSettings::default());
        let env = sidecar(&config, &settings).env();
        let names: Vec<&str> = env.iter().map(|e| e["name"].as_str().unwrap()).collect();
        assert_eq!(names, OWNED_ENV[..27]);
        let literal: HashMap<&str, &str> = env
            .iter()
            .filter(|e| e.get("valueFrom").is_none())
            .map(|e| {
                (
                    e["name"].as_str().unwrap(),
                    e.get("value").and_then(Value::as_str).unwrap_or(""),
                )
            })
            .collect();
        for (name, want) in [
            ("CONTAINER_CONCURRENCY", "0"),
            ("ENABLE_HTTP2_AUTO_DETECTION", "false"),
            ("ENABLE_HTTP_FULL_DUPLEX", "false"),
            ("QUEUE_SERVING_PORT", "8012"),
            ("QUEUE_SERVING_TLS_PORT", "8112"),
            ("REVISION_TIMEOUT_SECONDS", "300"),
            ("REVISION_RESPONSE_START_TIMEOUT_SECONDS", "0"),
            ("REVISION_IDLE_TIMEOUT_SECONDS", "0"),
            ("SERVING_CONFIGURATION", "bar"),
            ("SERVING_LOGGING_CONFIG", ""),
            ("SERVING_LOGGING_LEVEL", ""),
            ("SERVING_NAMESPACE", "foo"),
            ("SERVING_REVISION", "bar"),
            ("SERVING_SERVICE", "bar"),
            ("SYSTEM_NAMESPACE", "thaw-system"),
            ("USER_PORT", "8080"),
            ("ROOT_CA", ""),
            ("QUEUE_PROXY_TLS_MIN_VERSION", ""),
            ("QUEUE_PROXY_TLS_MAX_VERSION", ""),
            ("QUEUE_PROXY_TLS_CIPHER_SUITES", ""),
            ("QUEUE_PROXY_TLS_CURVE_PREFERENCES", ""),
            ("ENABLE_MULTI_CONTAINER_PROBES", "false"),
            (
                "SERVING_READINESS_PROBE",
                r#"{"tcpSocket":{"port":8080,"host":"127.0.0.1"},"successThreshold":1}"#,
            ),
        ] {
            assert_eq!(literal.get(name), Some(&want), "{name}");
        }
        let by_name = |n: &str| env.iter().find(|e| e["name"] == n).unwrap().clone();
        assert_eq!(
            by_name("SERVING_POD")["valueFrom"],
            json!({"fieldRef": {"fieldPath": "metadata.name"}})
        );
        assert_eq!(
            by_name("SERVING_POD_IP")["valueFrom"],
            json!({"fieldRef": {"fieldPath": "status.podIP"}})
        );
        assert_eq!(
            by_name("HOST_IP")["valueFrom"],
            json!({"fieldRef": {"apiVersion": "v1", "fieldPath": "status.hostIP"}})
        );
        // Empty values are left out, as Go writes them.
        assert_eq!(by_name("ROOT_CA"), json!({"name": "ROOT_CA"}));
    }

    #[test]
    fn the_queue_proxy_starts_on_what_it_is_given() {
        let (config, settings) = (config(), InjectSettings::default());
        let mut vars: HashMap<String, String> = sidecar(&config, &settings)
            .env()
            .iter()
            .filter_map(|e| {
                Some((
                    e["name"].as_str()?.to_owned(),
                    e.get("value")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_owned(),
                ))
            })
            .collect();
        // What the kubelet resolves from the downward API.
        vars.insert("SERVING_POD".into(), "bar-abc".into());
        vars.insert("SERVING_POD_IP".into(), "10.0.0.1".into());
        let qp = crate::config::Config::from_env(&vars).unwrap();
        assert_eq!(
            (qp.serving_port, qp.user_port, qp.container_concurrency),
            (8012, 8080, 0)
        );
        assert_eq!(qp.readiness_probes.len(), 1);
        assert!(!qp.observability.request_log);
        assert_eq!(qp.drain_quiet_period, Duration::from_secs(30));
    }

    #[test]
    fn a_namespace_unknown_at_injection_comes_from_the_downward_api() {
        let mut config = config();
        config.namespace = None;
        let settings = InjectSettings {
            drain_quiet_period: Duration::from_millis(1500),
            ..InjectSettings::default()
        };
        let env = sidecar(&config, &settings).env();
        assert_eq!(env[0], field_ref("SERVING_NAMESPACE", "metadata.namespace"));
        assert_eq!(
            env.last().unwrap(),
            &var("THAW_DRAIN_QUIET_PERIOD", "1500ms")
        );
    }

    #[test]
    fn ports_and_security_context_are_knatives() {
        let (config, settings) = (config(), InjectSettings::default());
        let c = sidecar(&config, &settings).container();
        assert_eq!(
            c["ports"],
            json!([
                {"name": "http-autometric", "containerPort": 9090},
                {"name": "http-usermetric", "containerPort": 9091},
                {"name": "queue-port", "containerPort": 8012},
                {"name": "https-port", "containerPort": 8112},
            ])
        );
        assert_eq!(
            c["securityContext"]["capabilities"],
            json!({"drop": ["ALL"]})
        );
        assert_eq!(c["securityContext"]["runAsNonRoot"], json!(true));
        assert_eq!(c["resources"], json!({"requests": {"cpu": "25m"}}));
        assert_eq!(c["name"], "queue-proxy");
        assert_eq!(c["image"], "ghcr.io/thaw-dev/queue-proxy:0.1.0");
    }

    #[test]
    fn an_update_keeps_what_the_injector_does_not_own() {
        let (config, settings) = (config(), InjectSettings::default());
        let s = sidecar(&config, &settings);
        let mut existing = json!({
            "name": "queue-proxy", "image": "old", "imagePullPolicy": "IfNotPresent",
            "startupProbe": {"tcpSocket": {"port": 8012}},
            "env": [{"name": "THAW_WORKER_THREADS", "value": "2"}, {"name": "USER_PORT", "value": "1"},
                    {"name": "THAW_DRAIN_QUIET_PERIOD", "value": "5s"}],
        });
        s.update(existing.as_object_mut().unwrap());
        assert_eq!(existing["image"], "ghcr.io/thaw-dev/queue-proxy:0.1.0");
        assert_eq!(existing["imagePullPolicy"], "IfNotPresent");
        assert!(existing.get("startupProbe").is_none());
        let env = existing["env"].as_array().unwrap();
        assert_eq!(env.len(), 28);
        assert_eq!(env[27], var("THAW_WORKER_THREADS", "2"));
        assert_eq!(env.iter().filter(|e| e["name"] == "USER_PORT").count(), 1);
        assert!(!env.iter().any(|e| e["name"] == "THAW_DRAIN_QUIET_PERIOD"));
        let mut again = existing.clone();
        s.update(again.as_object_mut().unwrap());
        assert_eq!(again, existing);
    }
}
