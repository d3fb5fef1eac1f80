//! Container probes and lifecycle hooks as the kubelet runs them: from the node, to the
//! pod's IP. The checks themselves are Thaw's own (`thaw_shared::probe`, the same code the
//! queue-proxy probes its app with); this module turns a Pod's `Probe` and `LifecycleHandler`
//! into them, resolving named ports, and refuses `exec`, which needs a container runtime.

use std::net::Ipv4Addr;
use std::time::Duration;

use http::uri::PathAndQuery;
use http::{HeaderName, HeaderValue};
use k8s_openapi::api::core::v1::{
    Container, HTTPGetAction, LifecycleHandler, Probe, TCPSocketAction,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use thaw_shared::probe::{
    GrpcProbe, HttpProbe, HttpScheme, ProbeHandler, ProbeSpec, Prober, ProberOptions, TcpProbe,
};

/// What the kubelet sends as `User-Agent`: `kube-probe/<major>.<minor>`.
pub const KUBE_PROBE_USER_AGENT: &str = "kube-probe/1.37";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error("exec {0} are not supported by the testbed's node (no container runtime); use httpGet, tcpSocket or grpc")]
    Exec(&'static str),
    #[error("{0} has no handler")]
    NoHandler(&'static str),
    #[error("port {port:?} is not a container port of {container:?}")]
    NamedPort { port: String, container: String },
    #[error("port {0} is out of range")]
    BadPort(i32),
    #[error("{0}")]
    Invalid(String),
}

/// One probe, ready to run, with its timing.
pub struct ContainerProbe {
    pub prober: Prober,
    pub initial_delay: Duration,
    pub period: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

impl ContainerProbe {
    pub fn new(
        probe: &Probe,
        container: &Container,
        pod_ip: Ipv4Addr,
        what: &'static str,
    ) -> Result<Self, ProbeError> {
        let handler = if probe.exec.is_some() {
            return Err(ProbeError::Exec(what));
        } else if let Some(http) = &probe.http_get {
            ProbeHandler::Http(http_probe(http, container, pod_ip)?)
        } else if let Some(tcp) = &probe.tcp_socket {
            ProbeHandler::Tcp(tcp_probe(tcp, container, pod_ip)?)
        } else if let Some(grpc) = &probe.grpc {
            ProbeHandler::Grpc(GrpcProbe {
                host: pod_ip.to_string(),
                port: port_number(grpc.port)?,
                service: grpc.service.clone().unwrap_or_default(),
            })
        } else {
            return Err(ProbeError::NoHandler(what));
        };
        // The API server has applied the defaults already; these only guard zeroes.
        let seconds = |v: Option<i32>, default: u32| {
            v.and_then(|v| u32::try_from(v).ok())
                .filter(|v| *v > 0)
                .unwrap_or(default)
        };
        let spec = ProbeSpec {
            handler,
            period_seconds: seconds(probe.period_seconds, 10),
            timeout_seconds: seconds(probe.timeout_seconds, 1),
            success_threshold: seconds(probe.success_threshold, 1),
            failure_threshold: seconds(probe.failure_threshold, 3),
            initial_delay_seconds: probe
                .initial_delay_seconds
                .and_then(|v| u32::try_from(v).ok())
                .unwrap_or(0),
        };
        Ok(Self {
            initial_delay: Duration::from_secs(u64::from(spec.initial_delay_seconds)),
            period: Duration::from_secs(u64::from(spec.period_seconds)),
            success_threshold: spec.success_threshold,
            failure_threshold: spec.failure_threshold,
            prober: Prober::new(vec![spec], ProberOptions::default()),
        })
    }

    /// One attempt, bounded by the probe's timeout.
    pub async fn check(&self) -> bool {
        self.prober.is_ready().await
    }
}

/// A `preStop`/`postStart` hook.
pub enum Hook {
    Http(Prober),
    Sleep(Duration),
}

impl Hook {
    pub fn new(
        handler: &LifecycleHandler,
        container: &Container,
        pod_ip: Ipv4Addr,
        what: &'static str,
    ) -> Result<Self, ProbeError> {
        if handler.exec.is_some() {
            return Err(ProbeError::Exec(what));
        }
        if let Some(sleep) = &handler.sleep {
            return Ok(Hook::Sleep(Duration::from_secs(
                u64::try_from(sleep.seconds).unwrap_or(0),
            )));
        }
        let Some(http) = &handler.http_get else {
            return Err(ProbeError::NoHandler(what));
        };
        let spec = ProbeSpec {
            handler: ProbeHandler::Http(http_probe(http, container, pod_ip)?),
            period_seconds: 1,
            // The caller bounds the hook by the grace period; this is one attempt's cap.
            timeout_seconds: 3600,
            success_threshold: 1,
            failure_threshold: 1,
            initial_delay_seconds: 0,
        };
        Ok(Hook::Http(Prober::new(
            vec![spec],
            ProberOptions::default(),
        )))
    }

    /// Runs the hook once. True when it answered 2xx/3xx (or slept).
    pub async fn run(&self) -> bool {
        match self {
            Hook::Http(prober) => prober.is_ready().await,
            Hook::Sleep(d) => {
                tokio::time::sleep(*d).await;
                true
            }
        }
    }
}

fn http_probe(
    http: &HTTPGetAction,
    container: &Container,
    pod_ip: Ipv4Addr,
) -> Result<HttpProbe, ProbeError> {
    let path = http
        .path
        .clone()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "/".to_owned());
    let path = if path.starts_with('/') {
        path
    } else {
        format!("/{path}")
    };
    let path: PathAndQuery = path
        .parse()
        .map_err(|_| ProbeError::Invalid(format!("httpGet.path {path:?} is not a valid path")))?;
    let scheme = match http.scheme.as_deref() {
        Some(s) if s.eq_ignore_ascii_case("https") => HttpScheme::Https,
        _ => HttpScheme::Http,
    };
    let mut headers = vec![(
        http::header::USER_AGENT,
        HeaderValue::from_static(KUBE_PROBE_USER_AGENT),
    )];
    for h in http.http_headers.iter().flatten() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| ProbeError::Invalid(format!("header name {:?}", h.name)))?;
        let value = HeaderValue::from_str(&h.value)
            .map_err(|_| ProbeError::Invalid(format!("header {:?} value", h.name)))?;
        // A User-Agent given in the probe replaces the kubelet's.
        headers.retain(|(n, _)| n != name);
        headers.push((name, value));
    }
    Ok(HttpProbe {
        host: http
            .host
            .clone()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| pod_ip.to_string()),
        port: resolve_port(&http.port, container)?,
        path,
        scheme,
        headers,
    })
}

fn tcp_probe(
    tcp: &TCPSocketAction,
    container: &Container,
    pod_ip: Ipv4Addr,
) -> Result<TcpProbe, ProbeError> {
    Ok(TcpProbe {
        host: tcp
            .host
            .clone()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| pod_ip.to_string()),
        port: resolve_port(&tcp.port, container)?,
    })
}

/// A number, or the name of one of the container's ports.
pub fn resolve_port(port: &IntOrString, container: &Container) -> Result<u16, ProbeError> {
    match port {
        IntOrString::Int(n) => port_number(*n),
        IntOrString::String(s) => {
            if let Ok(n) = s.parse::<i32>() {
                return port_number(n);
            }
            container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(s.as_str()))
                .map(|p| port_number(p.container_port))
                .unwrap_or_else(|| {
                    Err(ProbeError::NamedPort {
                        port: s.clone(),
                        container: container.name.clone(),
                    })
                })
        }
    }
}

fn port_number(n: i32) -> Result<u16, ProbeError> {
    u16::try_from(n)
        .ok()
        .filter(|p| *p > 0)
        .ok_or(ProbeError::BadPort(n))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn container() -> Container {
        serde_json::from_value(json!({
            "name": "app",
            "ports": [{"name": "http", "containerPort": 8080}]
        }))
        .unwrap()
    }

    #[test]
    fn named_ports_resolve_and_unknown_ones_are_named() {
        let c = container();
        assert_eq!(
            resolve_port(&IntOrString::String("http".into()), &c).unwrap(),
            8080
        );
        assert_eq!(resolve_port(&IntOrString::Int(9090), &c).unwrap(), 9090);
        assert_eq!(
            resolve_port(&IntOrString::String("admin".into()), &c)
                .unwrap_err()
                .to_string(),
            "port \"admin\" is not a container port of \"app\""
        );
        assert!(resolve_port(&IntOrString::Int(70000), &c).is_err());
        assert!(resolve_port(&IntOrString::Int(0), &c).is_err());
    }

    #[test]
    fn exec_is_refused_with_a_clear_reason() {
        let probe: Probe = serde_json::from_value(json!({"exec": {"command": ["true"]}})).unwrap();
        let err = ContainerProbe::new(
            &probe,
            &container(),
            Ipv4Addr::LOCALHOST,
            "readiness probes",
        )
        .err()
        .unwrap();
        assert!(err
            .to_string()
            .starts_with("exec readiness probes are not supported"));
    }

    #[test]
    fn http_probes_carry_the_kubelet_user_agent_unless_overridden() {
        let http: HTTPGetAction = serde_json::from_value(json!({
            "port": "http", "path": "healthz",
            "httpHeaders": [{"name": "K-Network-Probe", "value": "queue"}]
        }))
        .unwrap();
        let p = http_probe(&http, &container(), Ipv4Addr::new(10, 0, 0, 2)).unwrap();
        assert_eq!(p.host, "10.0.0.2");
        assert_eq!(p.port, 8080);
        assert_eq!(p.path.as_str(), "/healthz");
        assert_eq!(p.headers[0].1, KUBE_PROBE_USER_AGENT);
        assert_eq!(p.headers[1].0.as_str(), "k-network-probe");
        let http: HTTPGetAction = serde_json::from_value(json!({
            "port": 80, "httpHeaders": [{"name": "User-Agent", "value": "mine"}]
        }))
        .unwrap();
        let p = http_probe(&http, &container(), Ipv4Addr::LOCALHOST).unwrap();
        assert_eq!(p.headers.len(), 1);
        assert_eq!(p.headers[0].1, "mine");
    }
}
