//! The user container the queue-proxy serves, and what Knative's controller changes on it
//! (`deploy.go` `makeServingContainer`, `makeContainer`): one named port, `PORT` and the
//! `K_*` variables, the drain hook, the readiness probe moved to the sidecar.

use serde_json::{json, Map, Value};

use super::config::SidecarConfig;
use super::field::{self, Path};
use super::probe::Probe;
use super::sidecar::{self, CONTAINER_NAME, RESERVED_PORTS};
use super::InjectError;

/// `kubectl logs` and `kubectl exec` pick this container; Knative sets it to the serving
/// container, and Thaw also reads it to tell which container serves.
pub const DEFAULT_CONTAINER_ANNOTATION: &str = "kubectl.kubernetes.io/default-container";
/// The port Knative assumes when the container declares none (`DefaultUserPort`).
pub const DEFAULT_USER_PORT: u16 = 8080;
/// The name Knative gives the serving container's port (`UserPortName`).
pub const USER_PORT_NAME: &str = "user-port";

/// What the rest of the injection needs to know about the serving container.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Serving {
    pub name: String,
    pub user_port: u16,
    /// The port is named `h2c`: the sidecar serves on 8013 (Knative's protocol rule).
    pub h2c: bool,
    /// The container's port names before injection, with their numbers, so that a
    /// Service's `targetPort: http` can be pointed at the sidecar.
    pub named_ports: Vec<(String, u16)>,
    /// The user's readiness probe after Knative's webhook defaults.
    pub probe: Probe,
}

/// What an earlier injection moved into the sidecar, read back so that injecting again
/// gives the same pod.
#[derive(Debug, Clone, Default)]
pub(crate) struct Earlier {
    pub probe: Option<Probe>,
    pub h2c: bool,
}

impl Earlier {
    pub fn read(sidecar: &Map<String, Value>, at: &Path) -> Result<Self, InjectError> {
        let mut earlier = Self::default();
        for (i, e) in field::list(sidecar, "env", at)?.iter().enumerate() {
            let at = at.key("env").index(i);
            let Some(e) = e.as_object() else { continue };
            let value = field::string(e, "value", &at)?.unwrap_or("");
            match field::string(e, "name", &at)?.unwrap_or("") {
                crate::config::QUEUE_SERVING_PORT => {
                    earlier.h2c = value.trim() == sidecar::H2C_SERVING_PORT.to_string();
                }
                crate::config::SERVING_READINESS_PROBE if !value.trim().is_empty() => {
                    let at = at.key("value");
                    let json: Value = serde_json::from_str(value)
                        .map_err(|e| at.error(format!("not a probe as JSON: {e}")))?;
                    // With Knative's multi-container probing it is a list, the serving
                    // container's probe first.
                    let first = match &json {
                        Value::Array(items) => items.first().cloned().unwrap_or(Value::Null),
                        other => other.clone(),
                    };
                    if !first.is_null() {
                        earlier.probe = Some(Probe::from_value(&first, &at)?);
                    }
                }
                _ => {}
            }
        }
        Ok(earlier)
    }
}

fn name_of(c: &Value) -> Option<&str> {
    c.get("name").and_then(Value::as_str)
}

fn has_ports(c: &Value) -> bool {
    c.get("ports")
        .and_then(Value::as_array)
        .is_some_and(|p| !p.is_empty())
}

/// Which container serves. Knative serves the only container, or among several the one
/// with a port; Thaw first honours `kubectl.kubernetes.io/default-container` when it
/// names one (Knative sets it so; it also settles pods where a mesh sidecar declares
/// ports too).
pub(crate) fn choose(
    containers: &[Value],
    default_container: Option<&str>,
    at: &Path,
) -> Result<usize, InjectError> {
    let candidates: Vec<usize> = (0..containers.len())
        .filter(|&i| name_of(&containers[i]) != Some(CONTAINER_NAME))
        .collect();
    if let Some(wanted) = default_container {
        if let Some(&i) = candidates
            .iter()
            .find(|&&i| name_of(&containers[i]) == Some(wanted))
        {
            return Ok(i);
        }
    }
    match candidates.as_slice() {
        [] => Err(at.error(format!(
            "no container to serve besides the {CONTAINER_NAME} sidecar"
        ))),
        [only] => Ok(*only),
        several => {
            let with_ports: Vec<usize> = several
                .iter()
                .copied()
                .filter(|&i| has_ports(&containers[i]))
                .collect();
            match with_ports.as_slice() {
                [one] => Ok(*one),
                none_or_many => Err(at.error(format!(
                    "{} containers and {} of them declare ports; the queue-proxy serves the one \
                     container with a port (as Knative): declare ports on exactly one, or name it \
                     in the annotation {DEFAULT_CONTAINER_ANNOTATION}",
                    several.len(),
                    if none_or_many.is_empty() {
                        "none".to_owned()
                    } else {
                        none_or_many.len().to_string()
                    },
                ))),
            }
        }
    }
}

/// The ports a container declares, as (name, number); a bad one is an error.
pub(crate) fn declared_ports(
    c: &Map<String, Value>,
    at: &Path,
) -> Result<Vec<(Option<String>, u16)>, InjectError> {
    field::list(c, "ports", at)?
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let at = at.key("ports").index(i);
            let p = field::object(p, &at)?;
            let number = field::present(p, "containerPort")
                .ok_or_else(|| at.key("containerPort").error("missing"))?;
            let number = field::port_number(number, &at.key("containerPort"))?;
            let name = field::string(p, "name", &at)?.map(str::to_owned);
            Ok((name, number))
        })
        .collect()
}

/// Fails when a container declares a port the sidecar listens on: they share the pod's
/// network namespace, so one of them could not bind it.
pub(crate) fn check_reserved(c: &Map<String, Value>, at: &Path) -> Result<(), InjectError> {
    for (i, (_, number)) in declared_ports(c, at)?.iter().enumerate() {
        if RESERVED_PORTS.contains(number) {
            return Err(at.key("ports").index(i).key("containerPort").error(format!(
                "{number} is reserved for the {CONTAINER_NAME} sidecar (reserved: {RESERVED_PORTS:?})"
            )));
        }
    }
    Ok(())
}

/// The index and value of the env entry `name`.
fn find_env<'a>(env: &'a [Value], name: &str) -> Option<(usize, &'a Value)> {
    env.iter()
        .enumerate()
        .find(|(_, e)| name_of(e) == Some(name))
}

/// `PORT` as a literal number, if the container sets it so.
fn port_env(c: &Map<String, Value>, at: &Path) -> Result<Option<(usize, u16)>, InjectError> {
    let env = field::list(c, "env", at)?;
    let Some((i, entry)) = find_env(env, "PORT") else {
        return Ok(None);
    };
    let at = at.key("env").index(i).key("value");
    match entry.get("value") {
        Some(Value::String(s)) => s
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .map(|p| Some((i, p)))
            .ok_or_else(|| at.error(format!("PORT: expected a port number 1-65535, got {s:?}"))),
        None | Some(Value::Null) => Ok(None),
        Some(other) => Err(at.wrong_type("a string", other)),
    }
}

/// Sets an env entry, in place if it exists, else at the end: injecting twice leaves one.
fn set_env(env: &mut Vec<Value>, name: &str, value: &str) {
    let entry = sidecar::var(name, value);
    match env.iter_mut().find(|e| name_of(e) == Some(name)) {
        Some(slot) => *slot = entry,
        None => env.push(entry),
    }
}

/// Points a probe handler's port at a number when it names a port the rewrite removed.
fn renumber(probe: &mut Value, names: &[(String, u16)], always: Option<u16>) {
    for handler in ["httpGet", "tcpSocket"] {
        let Some(h) = probe.get_mut(handler).and_then(Value::as_object_mut) else {
            continue;
        };
        let port = h.get("port").cloned().unwrap_or(Value::Null);
        let number = match (&port, always) {
            (_, Some(n)) => Some(n),
            (Value::String(name), None) => names.iter().find(|(n, _)| n == name).map(|(_, p)| *p),
            _ => None,
        };
        if let Some(n) = number {
            h.insert("port".into(), n.into());
        }
    }
}

/// Rewrites the serving container as Knative's controller does.
pub(crate) fn rewrite(
    c: &mut Map<String, Value>,
    earlier: &Earlier,
    config: &SidecarConfig,
    at: &Path,
) -> Result<Serving, InjectError> {
    let name = field::string(c, "name", at)?
        .ok_or_else(|| at.key("name").error("missing"))?
        .to_owned();
    let ports = declared_ports(c, at)?;
    let port_env = port_env(c, at)?;
    // Knative: the first port, else 8080. Thaw also takes a literal PORT when no port is
    // declared ([beyond]: Knative reserves PORT), since that is where the app listens.
    let user_port = match (ports.first(), port_env) {
        (Some((_, p)), _) => *p,
        (None, Some((_, p))) => p,
        (None, None) => DEFAULT_USER_PORT,
    };
    if let Some((i, p)) = port_env {
        if p != user_port {
            return Err(at.key("env").index(i).key("value").error(format!(
                "PORT is {p} but the container's port is {user_port}: the app must listen on \
                 the port the queue-proxy forwards to (USER_PORT)"
            )));
        }
    }
    let h2c = earlier.h2c || ports.first().and_then(|(n, _)| n.as_deref()) == Some("h2c");
    let named_ports: Vec<(String, u16)> = ports
        .iter()
        .filter_map(|(n, p)| Some((n.clone()?, *p)))
        .collect();

    let user_probe = match field::present(c, "readinessProbe") {
        Some(p) => Some(Probe::from_value(p, &at.key("readinessProbe"))?),
        None => earlier.probe.clone(),
    };
    let probe = Probe::with_revision_defaults(user_probe);

    // Knative allows one port and replaces it by `user-port`. Several ports (which
    // Knative refuses) are kept as they are ([beyond]): a Service may name the others.
    let single = ports.len() <= 1;
    if single {
        c.insert(
            "ports".into(),
            json!([{"name": USER_PORT_NAME, "containerPort": user_port}]),
        );
    }

    let env = field::list_mut(c, "env", at)?;
    if find_env(env, "PORT").is_none() {
        set_env(env, "PORT", &user_port.to_string());
    }
    set_env(env, "K_REVISION", &config.revision);
    set_env(env, "K_CONFIGURATION", &config.revision);
    set_env(env, "K_SERVICE", &config.service);

    // Knative replaces the whole lifecycle (it allows none); Thaw keeps a postStart hook
    // and replaces only preStop, whose job the drain now does.
    field::child_object_mut(c, "lifecycle", at)?.insert("preStop".into(), sidecar::drain_hook());

    if probe.runs_in_queue_proxy() {
        c.remove("readinessProbe");
    }
    // Knative points a liveness probe at the user port. With several ports kept, only an
    // unset one is (the others still exist).
    if let Some(live) = c.get_mut("livenessProbe").filter(|p| p.is_object()) {
        if single {
            renumber(live, &[], Some(user_port));
        } else {
            fill_unset_port(live, user_port);
        }
    }
    if single {
        if let Some(startup) = c.get_mut("startupProbe").filter(|p| p.is_object()) {
            renumber(startup, &named_ports, None);
        }
    }
    // Knative switches stdin and tty off (Go omits false) and keeps logs on failure.
    c.remove("stdin");
    c.remove("tty");
    c.entry("terminationMessagePolicy")
        .or_insert_with(|| "FallbackToLogsOnError".into());

    Ok(Serving {
        name,
        user_port,
        h2c,
        named_ports,
        probe,
    })
}

fn fill_unset_port(probe: &mut Value, user_port: u16) {
    for handler in ["httpGet", "tcpSocket"] {
        if let Some(h) = probe.get_mut(handler).and_then(Value::as_object_mut) {
            let unset = match h.get("port") {
                None | Some(Value::Null) => true,
                Some(v) => v.as_i64() == Some(0),
            };
            if unset {
                h.insert("port".into(), user_port.into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> SidecarConfig {
        SidecarConfig::from_annotations(Some("foo"), "bar", &Default::default()).unwrap()
    }

    fn rewritten(c: Value) -> (Value, Serving) {
        let mut c = c;
        let s = rewrite(
            c.as_object_mut().unwrap(),
            &Earlier::default(),
            &config(),
            &Path::root(),
        )
        .unwrap();
        (c, s)
    }

    /// deploy_test.go's `defaultServingContainer`, plus Thaw's probe move.
    #[test]
    fn the_serving_container_is_knatives() {
        let (c, s) = rewritten(json!({
            "name": "serving-container", "image": "busybox",
            "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
            "readinessProbe": {"httpGet": {"path": "/", "port": "http"}},
            "livenessProbe": {"httpGet": {"path": "/live", "port": "http"}},
            "stdin": true, "tty": false,
        }));
        assert_eq!(
            c,
            json!({
                "name": "serving-container", "image": "busybox",
                "ports": [{"name": "user-port", "containerPort": 8080}],
                "env": [
                    {"name": "PORT", "value": "8080"},
                    {"name": "K_REVISION", "value": "bar"},
                    {"name": "K_CONFIGURATION", "value": "bar"},
                    {"name": "K_SERVICE", "value": "bar"},
                ],
                "lifecycle": {"preStop": {"httpGet": {"path": "/wait-for-drain", "port": 8022}}},
                "livenessProbe": {"httpGet": {"path": "/live", "port": 8080}},
                "terminationMessagePolicy": "FallbackToLogsOnError",
            })
        );
        assert_eq!((s.user_port, s.h2c), (8080, false));
        assert_eq!(s.named_ports, [("http".to_owned(), 8080)]);
        assert!(s.probe.http_get.is_some());
    }

    #[test]
    fn the_user_port_comes_from_the_port_then_port_env_then_8080() {
        let (_, s) = rewritten(json!({"name": "a", "env": [{"name": "PORT", "value": "3000"}]}));
        assert_eq!(s.user_port, 3000);
        let (c, s) = rewritten(json!({"name": "a"}));
        assert_eq!(s.user_port, 8080);
        assert_eq!(
            c["ports"],
            json!([{"name": "user-port", "containerPort": 8080}])
        );
        let (_, s) =
            rewritten(json!({"name": "a", "ports": [{"name": "h2c", "containerPort": 9000}]}));
        assert_eq!((s.user_port, s.h2c), (9000, true));
        let mut c = json!({"name": "a", "ports": [{"containerPort": 8080}], "env": [{"name": "PORT", "value": "3000"}]});
        let e = rewrite(
            c.as_object_mut().unwrap(),
            &Earlier::default(),
            &config(),
            &Path::root(),
        )
        .unwrap_err();
        assert_eq!(e.field(), Some("env[0].value"));
        assert!(e.to_string().contains("PORT is 3000"), "{e}");
    }

    #[test]
    fn several_ports_are_kept_and_an_exec_probe_stays() {
        let (c, s) = rewritten(json!({
            "name": "a",
            "ports": [{"name": "http", "containerPort": 8080}, {"name": "admin", "containerPort": 8081}],
            "readinessProbe": {"exec": {"command": ["true"]}},
            "livenessProbe": {"tcpSocket": {"port": "admin"}},
            "lifecycle": {"postStart": {"exec": {"command": ["true"]}}, "preStop": {"exec": {"command": ["sleep", "5"]}}},
        }));
        assert_eq!(c["ports"].as_array().unwrap().len(), 2);
        assert_eq!(c["readinessProbe"], json!({"exec": {"command": ["true"]}}));
        assert_eq!(c["livenessProbe"]["tcpSocket"]["port"], "admin");
        assert_eq!(
            c["lifecycle"]["postStart"],
            json!({"exec": {"command": ["true"]}})
        );
        assert_eq!(c["lifecycle"]["preStop"], sidecar::drain_hook());
        assert!(s.probe.exec.is_some());
    }

    #[test]
    fn choosing_the_serving_container() {
        let at = Path::root().key("containers");
        let c = |name: &str, ports: bool| {
            if ports {
                json!({"name": name, "ports": [{"containerPort": 80}]})
            } else {
                json!({"name": name})
            }
        };
        assert_eq!(choose(&[c("app", false)], None, &at).unwrap(), 0);
        assert_eq!(
            choose(&[c("queue-proxy", true), c("app", false)], None, &at).unwrap(),
            1
        );
        assert_eq!(
            choose(&[c("log", false), c("app", true)], None, &at).unwrap(),
            1
        );
        assert_eq!(
            choose(&[c("mesh", true), c("app", true)], Some("app"), &at).unwrap(),
            1
        );
        let e = choose(&[c("a", true), c("b", true)], None, &at).unwrap_err();
        assert!(
            e.to_string()
                .contains("2 containers and 2 of them declare ports"),
            "{e}"
        );
        let e = choose(&[c("a", false), c("b", false)], Some("queue-proxy"), &at).unwrap_err();
        assert!(e.to_string().contains("none of them declare ports"), "{e}");
        assert!(choose(&[c("queue-proxy", true)], None, &at).is_err());
    }

    #[test]
    fn reserved_and_bad_ports_are_errors() {
        let at = Path::root().key("containers").index(0);
        let c = json!({"name": "a", "ports": [{"containerPort": 80}, {"containerPort": 9090}]});
        let e = check_reserved(c.as_object().unwrap(), &at).unwrap_err();
        assert_eq!(e.field(), Some("containers[0].ports[1].containerPort"));
        let c = json!({"name": "a", "ports": [{"containerPort": "80"}]});
        let e = check_reserved(c.as_object().unwrap(), &at).unwrap_err();
        assert!(e.to_string().contains("expected a port number"), "{e}");
        let c = json!({"name": "a", "ports": [{"name": "x"}]});
        let e = check_reserved(c.as_object().unwrap(), &at).unwrap_err();
        assert_eq!(
            e.to_string(),
            "containers[0].ports[0].containerPort: missing"
        );
    }
}
