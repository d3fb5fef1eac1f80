//! The local platform's YAML file. It is walked by hand rather than derived so that every
//! error names the exact field (`revisions[1].containerConcurrency: expected a whole number
//! from 0 to 1000000`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use thaw_shared::duration::parse_duration;
use thaw_shared::limits::{MAX_CONTAINER_CONCURRENCY, MAX_SECONDS};
use thaw_shared::timeout::Timeouts;

use crate::revision::{RevisionId, RevisionSpec};

/// Where a revision's pods come from.
#[derive(Debug, Clone, PartialEq)]
pub enum PodSource {
    /// The platform runs the app (`command`, `env`) behind a queue-proxy, per pod.
    Command {
        command: Vec<String>,
        env: Vec<(String, String)>,
    },
    /// Queue-proxies someone else runs, used as they are (no scaling).
    Endpoints(Vec<SocketAddr>),
}

/// One revision of the file.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalRevision {
    pub spec: RevisionSpec,
    pub source: PodSource,
    pub min_scale: u32,
    /// 0 = unbounded.
    pub max_scale: u32,
    /// Concurrency per pod the autoscaler aims for.
    pub target: f64,
    pub stable_window: Duration,
    pub scale_to_zero_grace_period: Duration,
    /// `SERVING_READINESS_PROBE` for the pods' queue-proxies (JSON), if one was given.
    pub readiness_probe: Option<String>,
}

/// The whole file.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalConfig {
    pub revisions: Vec<LocalRevision>,
    /// The file's directory: relative paths in `command` resolve from here.
    pub base_dir: PathBuf,
}

/// Every field a revision may have, for the unknown-field message.
const FIELDS: &[&str] = &[
    "name",
    "namespace",
    "hosts",
    "command",
    "env",
    "endpoints",
    "containerConcurrency",
    "minScale",
    "maxScale",
    "target",
    "stableWindow",
    "scaleToZeroGracePeriod",
    "timeoutSeconds",
    "responseStartTimeoutSeconds",
    "idleTimeoutSeconds",
    "readinessProbe",
];

/// Knative's defaults.
const DEFAULT_TIMEOUT_SECONDS: u64 = 300;
const DEFAULT_STABLE_WINDOW: Duration = Duration::from_secs(60);
const DEFAULT_GRACE: Duration = Duration::from_secs(30);
/// Knative's `container-concurrency-target-default` for CC = 0.
const DEFAULT_TARGET: f64 = 100.0;
/// Knative's `container-concurrency-target-percentage`.
const TARGET_UTILIZATION: f64 = 0.7;

type Result<T> = std::result::Result<T, String>;

fn describe(v: &Value) -> String {
    match v {
        Value::Null => "nothing".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "a mapping".into(),
    }
}

fn string(path: &str, v: &Value) -> Result<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        other => Err(format!(
            "{path}: expected a string, got {}",
            describe(other)
        )),
    }
}

fn count(path: &str, v: &Value) -> Result<u64> {
    v.as_u64()
        .ok_or_else(|| format!("{path}: expected a number ≥ 0, got {}", describe(v)))
}

/// A whole number from 0 to `max`.
fn at_most(path: &str, v: &Value, max: u64) -> Result<u64> {
    match v.as_u64() {
        Some(n) if n <= max => Ok(n),
        _ => Err(format!(
            "{path}: expected a whole number from 0 to {max}, got {}",
            describe(v)
        )),
    }
}

fn positive(path: &str, v: &Value) -> Result<f64> {
    match v.as_f64() {
        Some(f) if f > 0.0 && f.is_finite() => Ok(f),
        _ => Err(format!(
            "{path}: expected a number > 0, got {}",
            describe(v)
        )),
    }
}

fn duration(path: &str, v: &Value) -> Result<Duration> {
    match v {
        Value::String(s) => parse_duration(s).map_err(|e| format!("{path}: {e}")),
        Value::Number(_) => v
            .as_u64()
            .filter(|s| *s <= MAX_SECONDS)
            .map(Duration::from_secs)
            .ok_or_else(|| {
                format!(
                    "{path}: expected a duration like 30s, at most {MAX_SECONDS} seconds, got {}",
                    describe(v)
                )
            }),
        other => Err(format!(
            "{path}: expected a duration like 30s, got {}",
            describe(other)
        )),
    }
}

fn strings(path: &str, v: &Value) -> Result<Vec<String>> {
    let Value::Array(items) = v else {
        return Err(format!("{path}: expected a list, got {}", describe(v)));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| string(&format!("{path}[{i}]"), item))
        .collect()
}

/// `env` as a mapping (`NAME: value`) or as Kubernetes' list of `{name, value}`.
fn env(path: &str, v: &Value) -> Result<Vec<(String, String)>> {
    let scalar = |p: &str, v: &Value| match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        other => Err(format!("{p}: expected a string, got {}", describe(other))),
    };
    match v {
        Value::Object(m) => m
            .iter()
            .map(|(key, val)| Ok((key.clone(), scalar(&format!("{path}.{key}"), val)?)))
            .collect(),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let p = format!("{path}[{i}]");
                let name = item
                    .get("name")
                    .ok_or_else(|| format!("{p}.name: missing"))?;
                let value = item.get("value").unwrap_or(&Value::Null);
                let value = if value.is_null() {
                    String::new()
                } else {
                    scalar(&format!("{p}.value"), value)?
                };
                Ok((string(&format!("{p}.name"), name)?, value))
            })
            .collect(),
        other => Err(format!(
            "{path}: expected a mapping of NAME: value, got {}",
            describe(other)
        )),
    }
}

/// Removes the probe handlers' ports: each pod's app gets its own port, which the
/// queue-proxy fills in (an absent port means the user port).
fn strip_probe_ports(v: &mut serde_json::Value) {
    if let Some(obj) = v.as_object_mut() {
        for handler in ["httpGet", "tcpSocket", "grpc"] {
            if let Some(h) = obj.get_mut(handler).and_then(|h| h.as_object_mut()) {
                h.remove("port");
            }
        }
    }
}

fn revision(path: &str, v: &Value) -> Result<LocalRevision> {
    let Value::Object(m) = v else {
        return Err(format!("{path}: expected a mapping, got {}", describe(v)));
    };
    for key in m.keys() {
        if !FIELDS.contains(&key.as_str()) {
            return Err(format!(
                "{path}.{key}: unknown field (known: {})",
                FIELDS.join(", ")
            ));
        }
    }
    let field = |name: &str| m.get(name).filter(|v| !v.is_null());
    let at = |name: &str| format!("{path}.{name}");

    let name = string(
        &at("name"),
        field("name").ok_or_else(|| format!("{}: missing", at("name")))?,
    )?;
    if name.is_empty() {
        return Err(format!("{}: must not be empty", at("name")));
    }
    if !thaw_shared::names::is_dns1035_label(&name) {
        return Err(format!(
            "{}: {name:?} is not a Kubernetes name (RFC 1035 label: up to 63 of a-z, 0-9 and -, starting with a letter)",
            at("name")
        ));
    }
    let namespace = field("namespace")
        .map(|v| string(&at("namespace"), v))
        .transpose()?
        .unwrap_or_else(|| "default".into());
    if !thaw_shared::names::is_dns1123_label(&namespace) {
        return Err(format!(
            "{}: {namespace:?} is not a Kubernetes namespace (RFC 1123 label: up to 63 of a-z, 0-9 and -)",
            at("namespace")
        ));
    }
    let hosts = field("hosts")
        .map(|v| strings(&at("hosts"), v))
        .transpose()?
        .unwrap_or_default();
    // A request is looked up by its `Host` without the port, so anything but a plain host
    // name (a port, brackets, spaces, non-ASCII) could never be routed.
    if let Some((i, bad)) = hosts
        .iter()
        .enumerate()
        .find(|(_, h)| !thaw_shared::names::is_host(h))
    {
        return Err(format!(
            "{}[{i}]: {bad:?} is not a host name (dot-separated labels of letters, digits and -, without a port)",
            at("hosts")
        ));
    }
    let cc = field("containerConcurrency")
        .map(|v| at_most(&at("containerConcurrency"), v, MAX_CONTAINER_CONCURRENCY))
        .transpose()?
        .unwrap_or(0);
    let cc =
        usize::try_from(cc).map_err(|_| format!("{}: too large", at("containerConcurrency")))?;
    let seconds = |name: &str, default: u64| {
        field(name)
            .map(|v| at_most(&at(name), v, MAX_SECONDS))
            .transpose()
            .map(|v| v.unwrap_or(default))
    };
    let timeouts = Timeouts::from_secs(
        seconds("timeoutSeconds", DEFAULT_TIMEOUT_SECONDS)?,
        seconds("responseStartTimeoutSeconds", 0)?,
        seconds("idleTimeoutSeconds", 0)?,
    );
    let scale = |name: &str| -> Result<u32> {
        field(name)
            .map(|v| {
                count(&at(name), v)
                    .and_then(|n| u32::try_from(n).map_err(|_| format!("{}: too large", at(name))))
            })
            .transpose()
            .map(Option::unwrap_or_default)
    };
    let (min_scale, max_scale) = (scale("minScale")?, scale("maxScale")?);
    if max_scale > 0 && min_scale > max_scale {
        return Err(format!(
            "{}: {max_scale} is below minScale {min_scale}",
            at("maxScale")
        ));
    }
    let default_target = if cc > 0 {
        (cc as f64 * TARGET_UTILIZATION).max(1.0)
    } else {
        DEFAULT_TARGET
    };
    let target = field("target")
        .map(|v| positive(&at("target"), v))
        .transpose()?
        .unwrap_or(default_target);
    let stable_window = field("stableWindow")
        .map(|v| duration(&at("stableWindow"), v))
        .transpose()?
        .unwrap_or(DEFAULT_STABLE_WINDOW);
    if stable_window < Duration::from_secs(1) {
        return Err(format!("{}: must be at least 1s", at("stableWindow")));
    }
    let scale_to_zero_grace_period = field("scaleToZeroGracePeriod")
        .map(|v| duration(&at("scaleToZeroGracePeriod"), v))
        .transpose()?
        .unwrap_or(DEFAULT_GRACE);

    let source = match (field("command"), field("endpoints")) {
        (Some(_), Some(_)) => {
            return Err(format!(
                "{path}: give either command or endpoints, not both"
            ))
        }
        (None, None) => {
            return Err(format!(
                "{path}: missing command (the app to run) or endpoints"
            ))
        }
        (Some(c), None) => {
            let command = match c {
                Value::String(s) => s.split_whitespace().map(str::to_owned).collect(),
                other => strings(&at("command"), other)?,
            };
            if command.is_empty() {
                return Err(format!("{}: must not be empty", at("command")));
            }
            let env = field("env")
                .map(|v| env(&at("env"), v))
                .transpose()?
                .unwrap_or_default();
            PodSource::Command { command, env }
        }
        (None, Some(e)) => {
            let list = strings(&at("endpoints"), e)?;
            let addrs = list
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    s.parse::<SocketAddr>().map_err(|_| {
                        format!("{}[{i}]: expected ip:port, got {s:?}", at("endpoints"))
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            PodSource::Endpoints(addrs)
        }
    };
    let readiness_probe = match field("readinessProbe") {
        None => None,
        Some(p) => {
            let mut json = p.clone();
            strip_probe_ports(&mut json);
            let text = json.to_string();
            // Checked here so a bad probe fails the start, not every pod.
            thaw_shared::probe::parse_probes(&text, false, 1)
                .map_err(|e| format!("{}.{e}", at("readinessProbe")))?;
            Some(text)
        }
    };
    Ok(LocalRevision {
        spec: RevisionSpec {
            id: RevisionId::new(&namespace, &name),
            container_concurrency: cc,
            timeouts,
            hosts,
            // The platform names the queue-proxies it runs; those given as endpoints
            // may be named anything (deploy/local/queue-proxy-demo.sh says hello-00001).
            verify_pod_identity: matches!(source, PodSource::Command { .. }),
        },
        source,
        min_scale,
        max_scale,
        target,
        stable_window,
        scale_to_zero_grace_period,
        readiness_probe,
    })
}

impl LocalConfig {
    /// Parses the YAML text; relative commands resolve from `base_dir`.
    pub fn parse(text: &str, base_dir: &Path) -> Result<Self> {
        let root: Value = serde_saphyr::from_str(text).map_err(|e| format!("invalid YAML: {e}"))?;
        let Value::Object(root) = root else {
            return Err(format!(
                "expected a mapping with a revisions list, got {}",
                describe(&root)
            ));
        };
        if let Some(key) = root.keys().find(|k| k.as_str() != "revisions") {
            return Err(format!("{key}: unknown top-level field (known: revisions)"));
        }
        let Some(list) = root.get("revisions") else {
            return Err("revisions: missing".into());
        };
        let Value::Array(items) = list else {
            return Err(format!(
                "revisions: expected a list, got {}",
                describe(list)
            ));
        };
        let mut revisions = Vec::with_capacity(items.len());
        let mut hosts = std::collections::HashSet::new();
        for (i, item) in items.iter().enumerate() {
            let path = format!("revisions[{i}]");
            let r = revision(&path, item)?;
            if revisions
                .iter()
                .any(|o: &LocalRevision| o.spec.id == r.spec.id)
            {
                return Err(format!("{path}.name: {} is declared twice", r.spec.id));
            }
            for h in &r.spec.hosts {
                if !hosts.insert(h.to_ascii_lowercase()) {
                    return Err(format!("{path}.hosts: {h:?} is routed to two revisions"));
                }
            }
            revisions.push(r);
        }
        Ok(Self {
            revisions,
            base_dir: base_dir.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<LocalConfig> {
        LocalConfig::parse(text, Path::new("/base"))
    }

    #[test]
    fn a_full_revision_with_defaults() {
        let c = parse(
            "revisions:\n  - name: hello\n    hosts: [hello.local]\n    command: [python3, hello.py]\n    env: {GREETING: hi, N: 3}\n    containerConcurrency: 10\n",
        )
        .unwrap();
        let r = &c.revisions[0];
        assert_eq!(r.spec.id, RevisionId::new("default", "hello"));
        assert_eq!(r.spec.timeouts, Timeouts::from_secs(300, 0, 0));
        assert_eq!(r.target, 7.0);
        assert_eq!((r.min_scale, r.max_scale), (0, 0));
        assert_eq!(r.stable_window, Duration::from_secs(60));
        assert_eq!(r.scale_to_zero_grace_period, Duration::from_secs(30));
        assert_eq!(
            r.source,
            PodSource::Command {
                command: vec!["python3".into(), "hello.py".into()],
                env: vec![("GREETING".into(), "hi".into()), ("N".into(), "3".into())]
            }
        );
    }

    #[test]
    fn durations_targets_and_probes() {
        let c = parse(
            "revisions:\n  - name: a\n    command: ./app\n    target: 2.5\n    stableWindow: 6s\n    scaleToZeroGracePeriod: 500ms\n    minScale: 1\n    maxScale: 5\n    readinessProbe:\n      httpGet: {path: /healthz, port: 8080}\n      periodSeconds: 1\n",
        )
        .unwrap();
        let r = &c.revisions[0];
        assert_eq!(
            (r.target, r.stable_window, r.scale_to_zero_grace_period),
            (2.5, Duration::from_secs(6), Duration::from_millis(500))
        );
        let probe: serde_json::Value =
            serde_json::from_str(r.readiness_probe.as_ref().unwrap()).unwrap();
        assert!(
            probe["httpGet"].get("port").is_none(),
            "the port is per pod"
        );
        assert_eq!(probe["httpGet"]["path"], "/healthz");
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("revisions:\n  - name: a\n    command: x\n  - name: b\n    command: x\n    containerConcurrency: -1\n", "revisions[1].containerConcurrency: expected a whole number from 0 to 1000000"),
            ("revisions:\n  - name: a\n    command: x\n    containerConcurrency: lots\n", "revisions[0].containerConcurrency: expected a whole number from 0 to 1000000, got \"lots\""),
            ("revisions:\n  - name: a\n    command: x\n    containerConcurrency: 18446744073709551615\n", "revisions[0].containerConcurrency: expected a whole number from 0 to 1000000"),
            ("revisions:\n  - name: a\n    command: x\n    timeoutSeconds: 18446744073709551615\n", "revisions[0].timeoutSeconds: expected a whole number from 0 to 31536000"),
            ("revisions:\n  - name: a\n    command: x\n    idleTimeoutSeconds: 31536001\n", "revisions[0].idleTimeoutSeconds: expected a whole number from 0 to 31536000"),
            ("revisions:\n  - name: a\n    command: x\n    stableWindow: 99999999999\n", "revisions[0].stableWindow: expected a duration like 30s, at most"),
            ("revisions:\n  - name: a\n    command: x\n    scaleToZeroGracePeriod: 9000h\n", "revisions[0].scaleToZeroGracePeriod: \"9000h\" is longer than the most accepted"),
            ("revisions:\n  - name: a\n    command: x\n    colour: blue\n", "revisions[0].colour: unknown field"),
            ("revisions:\n  - name: a\n", "revisions[0]: missing command"),
            ("revisions:\n  - name: Hello_World\n    command: x\n", "revisions[0].name: \"Hello_World\" is not a Kubernetes name"),
            ("revisions:\n  - name: 1st\n    command: x\n", "revisions[0].name: \"1st\" is not a Kubernetes name"),
            ("revisions:\n  - name: a\n    namespace: a.b\n    command: x\n", "revisions[0].namespace: \"a.b\" is not a Kubernetes namespace"),
            ("revisions:\n  - name: a\n    command: x\n    stableWindow: soon\n", "revisions[0].stableWindow: expected a duration"),
            ("revisions:\n  - name: a\n    command: x\n    target: 0\n", "revisions[0].target: expected a number > 0"),
            ("revisions:\n  - name: a\n    command: x\n    minScale: 3\n    maxScale: 2\n", "revisions[0].maxScale"),
            ("revisions:\n  - name: a\n    endpoints: [nowhere]\n", "revisions[0].endpoints[0]: expected ip:port"),
            ("revisions:\n  - name: a\n    command: x\n    hosts: [h]\n  - name: b\n    command: x\n    hosts: [h]\n", "revisions[1].hosts"),
            ("revisions:\n  - name: a\n    command: x\n    readinessProbe: {exec: {command: [true]}}\n", "revisions[0].readinessProbe."),
            ("revisions:\n  - name: a\n    command: x\n    env: [{value: x}]\n", "revisions[0].env[0].name: missing"),
            ("revision: []\n", "revision: unknown top-level field"),
            ("revisions: {}\n", "revisions: expected a list"),
        ];
        for (text, want) in cases {
            let err = parse(text).unwrap_err();
            assert!(
                err.starts_with(want),
                "{text:?}\n  gave {err:?}\n  want {want:?}"
            );
        }
    }

    /// Found by the `local_yaml` fuzz target: these were accepted, and no request could
    /// ever reach them, since the activator looks a request up by its `Host` without the
    /// port (and a `Host` is ASCII).
    #[test]
    fn hosts_that_could_never_be_routed_are_refused() {
        for bad in ["a.local:80", "héllo", "", "a..b", "[::1]", "hello local"] {
            let text = format!(
                "revisions:\n  - name: a\n    command: x\n    hosts: [ok.local, {bad:?}]\n"
            );
            let err = parse(&text).unwrap_err();
            assert!(
                err.starts_with("revisions[0].hosts[1]: ") && err.contains("is not a host name"),
                "{bad:?} gave {err:?}"
            );
        }
        let ok = parse("revisions:\n  - name: a\n    command: x\n    hosts: [Hello.Local, 10.0.0.1, localhost]\n");
        assert_eq!(ok.unwrap().revisions[0].spec.hosts.len(), 3);
    }
}
