//! The user container's readiness probe, moved into the queue-proxy as Knative moves it.
//!
//! Knative's webhook first defaults the probe (`revision_defaults.go`: a TCP probe when
//! there is none, `successThreshold` 1, and with a `periodSeconds` the kubelet's
//! `failureThreshold` 3 and `timeoutSeconds` 1). Its controller then (`queue.go`):
//! - encodes a copy aimed at `127.0.0.1` and the user port into `SERVING_READINESS_PROBE`,
//!   an exec probe becoming a TCP probe there, and the queue-proxy runs it;
//! - gives the queue-proxy a kubelet probe with the same timing whose handler is an
//!   `httpGet` on the serving port with `K-Network-Probe: queue`;
//! - removes HTTP, TCP and gRPC probes from the user container (`deploy.go`); an exec probe
//!   stays there, the kubelet runs it.
//!
//! The types mirror `k8s.io/api/core/v1.Probe` field for field, in Go's order, with Go's
//! `omitempty` rules, so that the JSON is byte for byte what Knative's controller writes.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use super::field::Path;
use super::InjectError;

/// Where the queue-proxy's copy of the probe connects (`queue.go` `localAddress`).
const LOCAL_ADDRESS: &str = "127.0.0.1";
/// The header the queue-proxy's own probe carries, so it answers as a health check.
const PROBE_HEADER: &str = "K-Network-Probe";
const PROBE_HEADER_VALUE: &str = "queue";

/// `corev1.Probe`: a handler and its timing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Probe {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_get: Option<HttpGet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_socket: Option<TcpSocket>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<Grpc>,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_zero"
    )]
    pub initial_delay_seconds: i32,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_zero"
    )]
    pub timeout_seconds: i32,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_zero"
    )]
    pub period_seconds: i32,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_zero"
    )]
    pub success_threshold: i32,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "is_zero"
    )]
    pub failure_threshold: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub termination_grace_period_seconds: Option<i64>,
}

/// `corev1.HTTPGetAction`; `port` is an IntOrString and always written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct HttpGet {
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub path: String,
    #[serde(default = "zero_port", deserialize_with = "nullable_port")]
    pub port: Value,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub host: String,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub scheme: String,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub http_headers: Vec<HttpHeader>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct HttpHeader {
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub value: String,
}

/// `corev1.TCPSocketAction`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct TcpSocket {
    #[serde(default = "zero_port", deserialize_with = "nullable_port")]
    pub port: Value,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub host: String,
}

/// `corev1.GRPCAction`; Go writes `service` even when unset (as `null`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Grpc {
    #[serde(default, deserialize_with = "nullable")]
    pub port: i32,
    #[serde(default)]
    pub service: Option<String>,
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

fn zero_port() -> Value {
    Value::from(0)
}

/// Kubernetes sends `null` for unset fields as readily as it omits them.
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Option::unwrap_or_default)
}

/// An IntOrString: a number or a port name; null is the zero port.
fn nullable_port<'de, D: Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
    use serde::de::Error;
    match Option::<Value>::deserialize(d)? {
        None => Ok(zero_port()),
        Some(v @ (Value::Number(_) | Value::String(_))) => Ok(v),
        Some(other) => Err(D::Error::custom(format!(
            "port: expected a number or a port name, got {}",
            super::field::kind_of(&other)
        ))),
    }
}

/// Go's `IntOrString.IntValue()`: a number, or a string read as one (0 if it is a name).
fn int_value(port: &Value) -> i64 {
    match port {
        Value::Number(n) => n.as_i64().unwrap_or(0),
        Value::String(s) => s.parse().unwrap_or(0),
        _ => 0,
    }
}

impl Probe {
    /// Reads a container's `readinessProbe`.
    pub fn from_value(v: &Value, at: &Path) -> Result<Self, InjectError> {
        Probe::deserialize(v).map_err(|e| at.error(e.to_string()))
    }

    fn has_handler(&self) -> bool {
        self.exec.is_some()
            || self.http_get.is_some()
            || self.tcp_socket.is_some()
            || self.grpc.is_some()
    }

    /// Whether the queue-proxy runs this probe in the kubelet's place, so that the user
    /// container loses it (`deploy.go` `makeContainer`): HTTP, TCP and gRPC; not exec.
    pub fn runs_in_queue_proxy(&self) -> bool {
        self.http_get.is_some() || self.tcp_socket.is_some() || self.grpc.is_some()
    }

    /// Knative's webhook defaults for the serving container's probe
    /// (`applyUserContainerDefaultReadinessProbe`, `applyReadinessProbeDefaults`,
    /// `applyGRPCProbeDefaults`).
    pub fn with_revision_defaults(probe: Option<Probe>) -> Probe {
        let mut p = probe.unwrap_or_default();
        if !p.has_handler() {
            p.tcp_socket = Some(TcpSocket::default());
        }
        if p.success_threshold == 0 {
            p.success_threshold = 1;
        }
        // With a period the kubelet's own defaults apply; without one the queue-proxy
        // probes aggressively and these stay unset.
        if p.period_seconds != 0 {
            if p.failure_threshold == 0 {
                p.failure_threshold = 3;
            }
            if p.timeout_seconds == 0 {
                p.timeout_seconds = 1;
            }
        }
        if let Some(g) = &mut p.grpc {
            g.service.get_or_insert_with(String::new);
        }
        p
    }

    /// The copy the queue-proxy runs (`queue.go` `applyReadinessProbeDefaults`): aimed at
    /// 127.0.0.1, on the probe's own port if it names a number, else the user port. A
    /// port name is looked up in `named` (the container's ports) first: Knative reads a
    /// name as 0, meaning the user port, which is the same thing for the single port it
    /// allows.
    pub fn for_queue_proxy(&self, user_port: u16, named: &[(String, u16)]) -> Probe {
        let resolve = |port: &Value| match port {
            Value::String(name) => named
                .iter()
                .find(|(n, _)| n == name)
                .map_or_else(|| int_value(port), |(_, p)| i64::from(*p)),
            other => int_value(other),
        };
        let mut probe_port = i64::from(user_port);
        if let Some(h) = &self.http_get {
            if resolve(&h.port) != 0 {
                probe_port = resolve(&h.port);
            }
        }
        if let Some(t) = &self.tcp_socket {
            if resolve(&t.port) != 0 {
                probe_port = resolve(&t.port);
            }
        }
        if let Some(g) = &self.grpc {
            if g.port > 0 {
                probe_port = i64::from(g.port);
            }
        }
        let mut p = self.clone();
        let port = Value::from(probe_port);
        if let Some(h) = &mut p.http_get {
            h.host = LOCAL_ADDRESS.to_owned();
            h.port = port;
            if h.scheme.is_empty() {
                h.scheme = "HTTP".to_owned();
            }
        } else if let Some(t) = &mut p.tcp_socket {
            t.host = LOCAL_ADDRESS.to_owned();
            t.port = port;
        } else if p.exec.is_some() {
            // The exec probe still runs on the user container; the queue-proxy checks
            // the port.
            p.tcp_socket = Some(TcpSocket {
                port,
                host: LOCAL_ADDRESS.to_owned(),
            });
            p.exec = None;
        } else if let Some(g) = &mut p.grpc {
            g.port = i32::try_from(probe_port).unwrap_or(0);
        }
        if p.period_seconds > 0 && p.timeout_seconds < 1 {
            p.timeout_seconds = 1;
        }
        p
    }

    /// `SERVING_READINESS_PROBE`: Go's encoding of the probe.
    pub fn encode(&self, at: &Path) -> Result<String, InjectError> {
        serde_json::to_string(self).map_err(|e| at.error(format!("cannot encode: {e}")))
    }

    /// The queue-proxy's own kubelet probe: this probe's timing, asking the queue-proxy's
    /// serving port, which answers a probe carrying `K-Network-Probe: queue` by probing
    /// the user container.
    pub fn for_sidecar(&self, serving_port: u16) -> Probe {
        Probe {
            exec: None,
            http_get: Some(HttpGet {
                port: Value::from(serving_port),
                http_headers: vec![HttpHeader {
                    name: PROBE_HEADER.to_owned(),
                    value: PROBE_HEADER_VALUE.to_owned(),
                }],
                ..HttpGet::default()
            }),
            tcp_socket: None,
            grpc: None,
            ..self.clone()
        }
    }

    pub fn to_value(&self, at: &Path) -> Result<Value, InjectError> {
        serde_json::to_value(self).map_err(|e| at.error(format!("cannot encode: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn probe(v: Value) -> Probe {
        Probe::from_value(&v, &Path::root()).unwrap()
    }

    fn encoded(user: Option<Value>, user_port: u16) -> String {
        Probe::with_revision_defaults(user.map(probe))
            .for_queue_proxy(user_port, &[("http".into(), 8081)])
            .encode(&Path::root())
            .unwrap()
    }

    /// The strings Knative's controller writes (queue_test.go's `testProbeJSONTemplate`
    /// plus the webhook's `successThreshold` default).
    #[test]
    fn encodings_match_knatives() {
        assert_eq!(
            encoded(None, 8080),
            r#"{"tcpSocket":{"port":8080,"host":"127.0.0.1"},"successThreshold":1}"#
        );
        assert_eq!(
            encoded(
                Some(json!({"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 1})),
                8080
            ),
            r#"{"httpGet":{"path":"/healthz","port":8081,"host":"127.0.0.1","scheme":"HTTP"},"timeoutSeconds":1,"periodSeconds":1,"successThreshold":1,"failureThreshold":3}"#
        );
        // An unknown port name is Knative's 0: the user port.
        assert_eq!(
            encoded(
                Some(
                    json!({"httpGet": {"port": "web", "httpHeaders": [{"name": "X", "value": "y"}]}})
                ),
                3000
            ),
            r#"{"httpGet":{"port":3000,"host":"127.0.0.1","scheme":"HTTP","httpHeaders":[{"name":"X","value":"y"}]},"successThreshold":1}"#
        );
        assert_eq!(
            encoded(
                Some(json!({"tcpSocket": {"port": 9000}, "initialDelaySeconds": 2})),
                8080
            ),
            r#"{"tcpSocket":{"port":9000,"host":"127.0.0.1"},"initialDelaySeconds":2,"successThreshold":1}"#
        );
        assert_eq!(
            encoded(
                Some(json!({"exec": {"command": ["true"]}, "periodSeconds": 5})),
                8080
            ),
            r#"{"tcpSocket":{"port":8080,"host":"127.0.0.1"},"timeoutSeconds":1,"periodSeconds":5,"successThreshold":1,"failureThreshold":3}"#
        );
        assert_eq!(
            encoded(Some(json!({"grpc": {"port": 0}})), 8080),
            r#"{"grpc":{"port":8080,"service":""},"successThreshold":1}"#
        );
    }

    #[test]
    fn the_sidecar_probe_keeps_the_timing_and_asks_the_serving_port() {
        let user = Probe::with_revision_defaults(Some(probe(json!({
            "httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 2, "initialDelaySeconds": 1
        }))));
        let v = user.for_sidecar(8012).to_value(&Path::root()).unwrap();
        assert_eq!(
            v,
            json!({
                "httpGet": {"port": 8012, "httpHeaders": [{"name": "K-Network-Probe", "value": "queue"}]},
                "initialDelaySeconds": 1, "timeoutSeconds": 1, "periodSeconds": 2,
                "successThreshold": 1, "failureThreshold": 3
            })
        );
    }

    #[test]
    fn defaults_and_the_queue_proxy_copy_are_stable() {
        // Re-injection reads the encoded probe back; applying the rules again is a no-op.
        for user in [
            None,
            Some(json!({"httpGet": {"path": "/", "port": "http"}})),
            Some(json!({"tcpSocket": {"port": 81}, "periodSeconds": 3})),
            Some(json!({"grpc": {"port": 9000, "service": "x"}})),
        ] {
            let once = encoded(user, 8080);
            let back = probe(serde_json::from_str(&once).unwrap());
            let twice = Probe::with_revision_defaults(Some(back))
                .for_queue_proxy(8080, &[])
                .encode(&Path::root())
                .unwrap();
            assert_eq!(once, twice);
        }
    }

    #[test]
    fn bad_probes_are_errors() {
        for bad in [
            json!({"periodSeconds": "often"}),
            json!({"httpGet": {"port": [80]}}),
            json!({"tcpSocket": 3}),
            json!("probe"),
        ] {
            assert!(
                Probe::from_value(&bad, &Path::root().key("readinessProbe")).is_err(),
                "{bad}"
            );
        }
        assert!(!probe(json!({"exec": {"command": ["x"]}})).runs_in_queue_proxy());
        assert!(probe(json!({"grpc": {"port": 1}})).runs_in_queue_proxy());
    }
}
