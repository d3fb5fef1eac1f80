//! A container's environment as the kubelet builds it: the `kubernetes` Service's
//! variables first, then `envFrom`, then `env` (which wins), with `$(VAR)` references
//! expanded against what came before, and the downward API (`fieldRef`,
//! `resourceFieldRef`) filled in from the pod and the node.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{Container, Pod, ResourceRequirements};

use super::quantity;

/// Why a container cannot be given its environment: the kubelet's
/// `CreateContainerConfigError`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    #[error("configmap {0:?} not found")]
    ConfigMapMissing(String),
    #[error("secret {0:?} not found")]
    SecretMissing(String),
    #[error("couldn't find key {key} in {kind} {namespace}/{name}")]
    KeyMissing {
        kind: &'static str,
        namespace: String,
        name: String,
        key: String,
    },
    #[error("env {var}: unsupported fieldRef {path:?}")]
    FieldPath { var: String, path: String },
    #[error("env {var}: {reason}")]
    ResourceField { var: String, reason: String },
    #[error("env {var}: secret key {key} is not UTF-8")]
    NotText { var: String, key: String },
}

/// Everything the environment is computed from, fetched beforehand.
#[derive(Debug, Clone)]
pub struct EnvContext<'a> {
    pub pod: &'a Pod,
    pub pod_ip: Ipv4Addr,
    pub host_ip: Ipv4Addr,
    /// Node allocatable, in cores and bytes: the value of a limit that is not set.
    pub node_cpu: f64,
    pub node_memory: f64,
    /// Where the `kubernetes` Service is (its ClusterIP and port).
    pub kubernetes: (Ipv4Addr, u16),
    pub config_maps: &'a HashMap<String, BTreeMap<String, String>>,
    pub secrets: &'a HashMap<String, BTreeMap<String, Vec<u8>>>,
}

/// The names of the ConfigMaps and Secrets a container's environment refers to.
pub fn references(container: &Container) -> (Vec<String>, Vec<String>) {
    let mut config_maps = Vec::new();
    let mut secrets = Vec::new();
    for from in container.env_from.iter().flatten() {
        if let Some(c) = &from.config_map_ref {
            config_maps.push(c.name.clone());
        }
        if let Some(s) = &from.secret_ref {
            secrets.push(s.name.clone());
        }
    }
    for var in container.env.iter().flatten() {
        let Some(from) = &var.value_from else {
            continue;
        };
        if let Some(c) = &from.config_map_key_ref {
            config_maps.push(c.name.clone());
        }
        if let Some(s) = &from.secret_key_ref {
            secrets.push(s.name.clone());
        }
    }
    (config_maps, secrets)
}

/// The container's environment, in order.
pub fn container_env(
    ctx: &EnvContext<'_>,
    container: &Container,
) -> Result<Vec<(String, String)>, EnvError> {
    let namespace = ctx.pod.metadata.namespace.clone().unwrap_or_default();
    let mut env = Env::default();
    let (host, port) = ctx.kubernetes;
    // The kubelet gives these to every container, service links or not.
    for (name, value) in [
        ("KUBERNETES_SERVICE_HOST", host.to_string()),
        ("KUBERNETES_SERVICE_PORT", port.to_string()),
        ("KUBERNETES_SERVICE_PORT_HTTPS", port.to_string()),
        ("KUBERNETES_PORT", format!("tcp://{host}:{port}")),
        (
            &format!("KUBERNETES_PORT_{port}_TCP") as &str,
            format!("tcp://{host}:{port}"),
        ),
        (
            &format!("KUBERNETES_PORT_{port}_TCP_PROTO"),
            "tcp".to_owned(),
        ),
        (
            &format!("KUBERNETES_PORT_{port}_TCP_PORT"),
            port.to_string(),
        ),
        (
            &format!("KUBERNETES_PORT_{port}_TCP_ADDR"),
            host.to_string(),
        ),
    ] {
        env.set(name, value);
    }
    if let Some(name) = &ctx.pod.metadata.name {
        env.set("HOSTNAME", name.clone());
    }

    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.as_deref().unwrap_or("");
        if let Some(c) = &from.config_map_ref {
            match ctx.config_maps.get(&c.name) {
                Some(data) => {
                    for (k, v) in data {
                        env.set(&format!("{prefix}{k}"), v.clone());
                    }
                }
                None if c.optional == Some(true) => {}
                None => return Err(EnvError::ConfigMapMissing(c.name.clone())),
            }
        }
        if let Some(s) = &from.secret_ref {
            match ctx.secrets.get(&s.name) {
                Some(data) => {
                    for (k, v) in data {
                        let v = String::from_utf8(v.clone()).map_err(|_| EnvError::NotText {
                            var: format!("{prefix}{k}"),
                            key: k.clone(),
                        })?;
                        env.set(&format!("{prefix}{k}"), v);
                    }
                }
                None if s.optional == Some(true) => {}
                None => return Err(EnvError::SecretMissing(s.name.clone())),
            }
        }
    }

    for var in container.env.iter().flatten() {
        if let Some(value) = &var.value {
            let expanded = expand(value, &env.lookup());
            env.set(&var.name, expanded);
            continue;
        }
        let Some(from) = &var.value_from else {
            env.set(&var.name, String::new());
            continue;
        };
        let value = if let Some(field) = &from.field_ref {
            Some(field_value(ctx, &var.name, &field.field_path)?)
        } else if let Some(r) = &from.resource_field_ref {
            let target = match r.container_name.as_deref() {
                Some(name) if !name.is_empty() => ctx
                    .pod
                    .spec
                    .iter()
                    .flat_map(|s| {
                        s.containers
                            .iter()
                            .chain(s.init_containers.iter().flatten())
                    })
                    .find(|c| c.name == name)
                    .ok_or_else(|| EnvError::ResourceField {
                        var: var.name.clone(),
                        reason: format!("no container named {name:?}"),
                    })?,
                _ => container,
            };
            let divisor = r.divisor.as_ref().map_or("1", |q| q.0.as_str());
            Some(
                resource_value(ctx, target.resources.as_ref(), &r.resource, divisor).map_err(
                    |reason| EnvError::ResourceField {
                        var: var.name.clone(),
                        reason,
                    },
                )?,
            )
        } else if let Some(key) = &from.config_map_key_ref {
            match ctx.config_maps.get(&key.name).map(|d| d.get(&key.key)) {
                Some(Some(v)) => Some(v.clone()),
                _ if key.optional == Some(true) => None,
                None => return Err(EnvError::ConfigMapMissing(key.name.clone())),
                Some(None) => {
                    return Err(EnvError::KeyMissing {
                        kind: "ConfigMap",
                        namespace: namespace.clone(),
                        name: key.name.clone(),
                        key: key.key.clone(),
                    })
                }
            }
        } else if let Some(key) = &from.secret_key_ref {
            match ctx.secrets.get(&key.name).map(|d| d.get(&key.key)) {
                Some(Some(v)) => {
                    Some(String::from_utf8(v.clone()).map_err(|_| EnvError::NotText {
                        var: var.name.clone(),
                        key: key.key.clone(),
                    })?)
                }
                _ if key.optional == Some(true) => None,
                None => return Err(EnvError::SecretMissing(key.name.clone())),
                Some(None) => {
                    return Err(EnvError::KeyMissing {
                        kind: "Secret",
                        namespace: namespace.clone(),
                        name: key.name.clone(),
                        key: key.key.clone(),
                    })
                }
            }
        } else {
            Some(String::new())
        };
        if let Some(value) = value {
            env.set(&var.name, value);
        }
    }
    Ok(env.vars)
}

/// An ordered environment where a later value replaces an earlier one in place.
#[derive(Default)]
struct Env {
    vars: Vec<(String, String)>,
}

impl Env {
    fn set(&mut self, name: &str, value: String) {
        match self.vars.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = value,
            None => self.vars.push((name.to_owned(), value)),
        }
    }

    fn lookup(&self) -> HashMap<&str, &str> {
        self.vars
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect()
    }
}

/// Kubernetes' `$(VAR)` expansion: a defined variable is replaced, an undefined one is
/// left as written, and `$$` is a literal `$`.
pub fn expand(input: &str, vars: &HashMap<&str, &str>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) => {
                    let name = &inner[..end];
                    match vars.get(name) {
                        Some(v) => out.push_str(v),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push_str("$(");
                    rest = inner;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn field_value(ctx: &EnvContext<'_>, var: &str, path: &str) -> Result<String, EnvError> {
    let meta = &ctx.pod.metadata;
    let spec = ctx.pod.spec.as_ref();
    let map_key = |prefix: &str| -> Option<String> {
        let rest = path.strip_prefix(prefix)?;
        let key = rest.strip_suffix("']")?.strip_prefix("['")?;
        Some(key.to_owned())
    };
    let value = match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".to_owned()),
        "status.hostIP" | "status.hostIPs" => ctx.host_ip.to_string(),
        "status.podIP" | "status.podIPs" => ctx.pod_ip.to_string(),
        _ => {
            if let Some(key) = map_key("metadata.labels") {
                meta.labels
                    .as_ref()
                    .and_then(|l| l.get(&key).cloned())
                    .unwrap_or_default()
            } else if let Some(key) = map_key("metadata.annotations") {
                meta.annotations
                    .as_ref()
                    .and_then(|a| a.get(&key).cloned())
                    .unwrap_or_default()
            } else {
                return Err(EnvError::FieldPath {
                    var: var.to_owned(),
                    path: path.to_owned(),
                });
            }
        }
    };
    Ok(value)
}

/// `resourceFieldRef`: a limit that is not set reads as the node's allocatable, a request
/// that is not set as 0, as the kubelet does.
pub fn resource_value(
    ctx: &EnvContext<'_>,
    resources: Option<&ResourceRequirements>,
    resource: &str,
    divisor: &str,
) -> Result<String, String> {
    let (kind, name) = resource
        .split_once('.')
        .ok_or_else(|| format!("unsupported resource {resource:?}"))?;
    let set = resources.and_then(|r| match kind {
        "limits" => r.limits.as_ref(),
        "requests" => r.requests.as_ref(),
        _ => None,
    });
    let given = set.and_then(|m| m.get(name)).map(|q| q.0.as_str());
    let value = match (kind, name, given) {
        (_, _, Some(q)) => quantity::parse(q).map_err(|e| e.to_string())?,
        ("limits", "cpu", None) => ctx.node_cpu,
        ("limits", "memory", None) | ("limits", "ephemeral-storage", None) => ctx.node_memory,
        ("requests", "cpu" | "memory" | "ephemeral-storage", None) => 0.0,
        _ => return Err(format!("unsupported resource {resource:?}")),
    };
    quantity::divided(value, divisor).map_err(|e| e.to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod() -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "web-1", "namespace": "apps", "uid": "u-1",
                          "labels": {"app": "web"}, "annotations": {"a/b": "c"}},
            "spec": {"nodeName": "testbed-node", "containers": [
                {"name": "app", "resources": {"limits": {"cpu": "500m", "memory": "64Mi"},
                                              "requests": {"cpu": "250m"}},
                 "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
                 "env": [
                    {"name": "A", "value": "one"},
                    {"name": "B", "value": "$(A)-two-$(NOPE)-$$(A)"},
                    {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                    {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                    {"name": "ANN", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['a/b']"}}},
                    {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1m"}}},
                    {"name": "MEM", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
                    {"name": "REQ", "valueFrom": {"resourceFieldRef": {"resource": "requests.cpu"}}},
                    {"name": "KEY", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "level"}}},
                    {"name": "PASS", "valueFrom": {"secretKeyRef": {"name": "s", "key": "pw"}}},
                    {"name": "A", "value": "replaced"}
                 ]},
                {"name": "side"}
            ]}
        }))
        .unwrap()
    }

    fn run(pod: &Pod, container: usize) -> Result<Vec<(String, String)>, EnvError> {
        let config_maps = HashMap::from([(
            "cfg".to_owned(),
            BTreeMap::from([("level".to_owned(), "debug".to_owned())]),
        )]);
        let secrets = HashMap::from([(
            "s".to_owned(),
            BTreeMap::from([("pw".to_owned(), b"hunter2".to_vec())]),
        )]);
        let ctx = EnvContext {
            pod,
            pod_ip: Ipv4Addr::new(10, 244, 1, 5),
            host_ip: Ipv4Addr::new(10, 244, 1, 1),
            node_cpu: 2.0,
            node_memory: 1024.0 * 1024.0 * 1024.0,
            kubernetes: (Ipv4Addr::new(10, 96, 1, 1), 443),
            config_maps: &config_maps,
            secrets: &secrets,
        };
        let c = &pod.spec.as_ref().unwrap().containers[container];
        container_env(&ctx, c)
    }

    #[test]
    fn builds_the_environment_like_the_kubelet() {
        let env: HashMap<_, _> = run(&pod(), 0).unwrap().into_iter().collect();
        assert_eq!(env["KUBERNETES_SERVICE_HOST"], "10.96.1.1");
        assert_eq!(env["KUBERNETES_SERVICE_PORT"], "443");
        assert_eq!(env["KUBERNETES_PORT_443_TCP_ADDR"], "10.96.1.1");
        assert_eq!(env["HOSTNAME"], "web-1");
        assert_eq!(env["CFG_level"], "debug");
        assert_eq!(env["A"], "replaced");
        assert_eq!(env["B"], "one-two-$(NOPE)-$(A)");
        assert_eq!(env["POD"], "web-1");
        assert_eq!(env["NS"], "apps");
        assert_eq!(env["IP"], "10.244.1.5");
        assert_eq!(env["APP"], "web");
        assert_eq!(env["ANN"], "c");
        assert_eq!(env["CPU"], "500");
        assert_eq!(env["MEM"], "64");
        assert_eq!(env["REQ"], "1");
        assert_eq!(env["KEY"], "debug");
        assert_eq!(env["PASS"], "hunter2");
    }

    #[test]
    fn unset_limits_read_as_the_node() {
        let mut p = pod();
        let c = &mut p.spec.as_mut().unwrap().containers[1];
        c.env = Some(vec![serde_json::from_value(json!(
            {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}}
        ))
        .unwrap()]);
        let env = run(&p, 1).unwrap();
        assert!(env.contains(&("CPU".to_owned(), "2".to_owned())), "{env:?}");
    }

    #[test]
    fn missing_references_are_clear_errors() {
        let mut p = pod();
        let c = &mut p.spec.as_mut().unwrap().containers[1];
        c.env = Some(vec![serde_json::from_value(json!(
            {"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "nope"}}}
        ))
        .unwrap()]);
        assert_eq!(
            run(&p, 1).unwrap_err().to_string(),
            "couldn't find key nope in ConfigMap apps/cfg"
        );
        let c = &mut p.spec.as_mut().unwrap().containers[1];
        c.env = Some(vec![serde_json::from_value(json!(
            {"name": "X", "valueFrom": {"secretKeyRef": {"name": "other", "key": "k", "optional": true}}}
        ))
        .unwrap()]);
        assert!(run(&p, 1).unwrap().iter().all(|(n, _)| n != "X"));
        let c = &mut p.spec.as_mut().unwrap().containers[1];
        c.env = Some(vec![serde_json::from_value(json!(
            {"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "spec.bogus"}}}
        ))
        .unwrap()]);
        assert!(run(&p, 1).unwrap_err().to_string().contains("spec.bogus"));
    }

    #[test]
    fn expansion_edge_cases() {
        let vars = HashMap::from([("A", "x")]);
        assert_eq!(expand("$(A)$(A)", &vars), "xx");
        assert_eq!(expand("$(A", &vars), "$(A");
        assert_eq!(expand("a$b", &vars), "a$b");
        assert_eq!(expand("$$", &vars), "$");
        assert_eq!(expand("end$", &vars), "end$");
    }
}
