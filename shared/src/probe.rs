//! Readiness probing of the user container, the way Knative's queue-proxy does it
//! (CONTRACT §1.5).
//!
//! The queue-proxy receives the user container's readiness probe as JSON in
//! `SERVING_READINESS_PROBE` (a Kubernetes `core/v1 Probe`, or a list of them when
//! `ENABLE_MULTI_CONTAINER_PROBES` is on). [`parse_probes`] turns that into
//! [`ProbeSpec`]s with errors that name the offending field, and a [`Prober`] runs
//! them when a health check asks [`Prober::is_ready`].
//!
//! Knative replaces the kubelet's own readiness probe of the user container with a
//! probe of the queue-proxy, so the queue-proxy probes on demand rather than on a
//! timer: with `periodSeconds: 0` (Knative's default) it retries quickly for a
//! while so that a cold pod turns ready as soon as the app listens, and with
//! `periodSeconds > 0` it makes exactly one attempt, leaving retries to the kubelet.
//! `failureThreshold` and `initialDelaySeconds` are parsed but act on the kubelet's
//! side, not here.

use std::{
    fmt, io,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicBool, AtomicU8, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::Duration,
};

use bytes::Bytes;
use futures_util::future::{try_join_all, BoxFuture, FutureExt, Shared};
use http::{
    header, uri::PathAndQuery, HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode,
    Uri, Version,
};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message as _;
use serde_json::{Map, Value};
use tokio::net::TcpStream;
use tokio_rustls::{
    rustls::{self, pki_types::ServerName},
    TlsConnector,
};

use crate::headers::READINESS_PROBE_UA;

/// A gRPC health response larger than this is not a health response.
const MAX_GRPC_RESPONSE: usize = 64 * 1024;
const GRPC_HEALTH_PATH: &str = "/grpc.health.v1.Health/Check";
/// `grpc.health.v1.HealthCheckResponse.ServingStatus.SERVING`.
const GRPC_SERVING: i32 = 1;

/// Kubernetes defaults for fields the JSON leaves out (or sets to 0).
const DEFAULT_TIMEOUT_SECONDS: u32 = 1;
const DEFAULT_SUCCESS_THRESHOLD: u32 = 1;
const DEFAULT_FAILURE_THRESHOLD: u32 = 3;
const DEFAULT_HOST: &str = "127.0.0.1";

// ---------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------

/// One readiness probe, with Kubernetes defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSpec {
    pub handler: ProbeHandler,
    /// 0 means "probe aggressively" (see [`ProbeTiming`]).
    pub period_seconds: u32,
    /// At least 1.
    pub timeout_seconds: u32,
    /// At least 1.
    pub success_threshold: u32,
    /// At least 1. Acted on by the kubelet, not by the queue-proxy.
    pub failure_threshold: u32,
    /// Acted on by the kubelet, not by the queue-proxy.
    pub initial_delay_seconds: u32,
}

impl ProbeSpec {
    /// True when a health check should retry quickly instead of making one attempt.
    pub fn is_aggressive(&self) -> bool {
        self.period_seconds == 0
    }

    /// The time one non-aggressive attempt may take.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(u64::from(self.timeout_seconds.max(1)))
    }
}

/// What a probe checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeHandler {
    Tcp(TcpProbe),
    Http(HttpProbe),
    Grpc(GrpcProbe),
}

/// `tcpSocket`: a connection is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpProbe {
    /// An IP address or a DNS name, without brackets.
    pub host: String,
    pub port: u16,
}

/// `httpGet`: a `GET` answers 200–399.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpProbe {
    /// An IP address or a DNS name, without brackets.
    pub host: String,
    pub port: u16,
    /// Always starts with `/`.
    pub path: PathAndQuery,
    pub scheme: HttpScheme,
    /// `httpHeaders`, in order; a `User-Agent` or `Host` here replaces ours.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpScheme {
    Http,
    /// TLS without certificate verification, as the kubelet does.
    Https,
}

/// `grpc`: `grpc.health.v1.Health/Check` answers `SERVING`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcProbe {
    /// An IP address or a DNS name, without brackets.
    pub host: String,
    pub port: u16,
    /// The `service` asked about; empty means the server as a whole.
    pub service: String,
}

/// Why `SERVING_READINESS_PROBE` cannot be used. Each message starts with the path
/// of the offending field (`httpGet.port`, `[1].tcpSocket.port`; `probe` for a
/// single probe as a whole).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProbeConfigError {
    #[error("invalid JSON at line {line} column {column}: {message}")]
    Json {
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: expected {expected}, got {got}")]
    WrongType {
        path: String,
        expected: &'static str,
        got: &'static str,
    },
    #[error("{path}: expected a port number 1-65535, got {got}")]
    BadPort { path: String, got: String },
    #[error("{path}: must not be negative, got {value}")]
    Negative { path: String, value: i64 },
    #[error("{path}: {value} is too large (at most {max})")]
    TooLarge {
        path: String,
        value: String,
        max: i64,
    },
    #[error(
        "{path}: exec probes are not supported by the queue-proxy; use tcpSocket, httpGet or grpc"
    )]
    ExecUnsupported { path: String },
    #[error("{path}: a probe needs exactly one of tcpSocket, httpGet or grpc; found none")]
    NoHandler { path: String },
    #[error("{path}: a probe needs exactly one of tcpSocket, httpGet or grpc; found {found}")]
    SeveralHandlers { path: String, found: String },
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
}

/// Parses `SERVING_READINESS_PROBE`.
///
/// `multi` is `ENABLE_MULTI_CONTAINER_PROBES`: the value is then a JSON array of
/// probes (a lone object is accepted too). An empty value means no probes, so the
/// container counts as ready. A port of 0 or none means `user_port`.
pub fn parse_probes(
    json: &str,
    multi: bool,
    user_port: u16,
) -> Result<Vec<ProbeSpec>, ProbeConfigError> {
    if json.trim().is_empty() {
        return Ok(Vec::new());
    }
    let value: Value = serde_json::from_str(json).map_err(json_error)?;
    match &value {
        Value::Array(items) if multi => items
            .iter()
            .enumerate()
            .map(|(i, item)| parse_probe(item, &FieldPath::index(i), user_port))
            .collect(),
        Value::Array(_) => Err(ProbeConfigError::WrongType {
            path: FieldPath::root().shown(),
            expected: "an object (a list of probes needs ENABLE_MULTI_CONTAINER_PROBES=true)",
            got: "an array",
        }),
        single => parse_probe(single, &FieldPath::root(), user_port).map(|p| vec![p]),
    }
}

fn json_error(e: serde_json::Error) -> ProbeConfigError {
    // serde_json appends the position to its message; we put it first instead.
    let full = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let message = full.strip_suffix(&suffix).unwrap_or(&full).to_owned();
    ProbeConfigError::Json {
        line: e.line(),
        column: e.column(),
        message,
    }
}

/// Where a value sits in the probe JSON; errors carry it so that a user can find the
/// field at fault in a long, generated manifest.
#[derive(Debug, Clone)]
struct FieldPath(String);

impl FieldPath {
    fn root() -> Self {
        Self(String::new())
    }

    fn index(i: usize) -> Self {
        Self(format!("[{i}]"))
    }

    fn field(&self, name: &str) -> String {
        if self.0.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.0)
        }
    }

    fn child(&self, name: &str) -> Self {
        Self(self.field(name))
    }

    fn elem(&self, i: usize) -> Self {
        Self(format!("{}[{i}]", self.0))
    }

    /// The path for errors about this value as a whole.
    fn shown(&self) -> String {
        if self.0.is_empty() {
            "probe".to_owned()
        } else {
            self.0.clone()
        }
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Kubernetes omits empty fields but may also send `null`; both mean "not set".
fn present<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

fn object<'a>(v: &'a Value, at: &FieldPath) -> Result<&'a Map<String, Value>, ProbeConfigError> {
    v.as_object().ok_or_else(|| ProbeConfigError::WrongType {
        path: at.shown(),
        expected: "an object",
        got: kind_of(v),
    })
}

fn string<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    at: &FieldPath,
) -> Result<Option<&'a str>, ProbeConfigError> {
    match present(obj, key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(ProbeConfigError::WrongType {
            path: at.field(key),
            expected: "a string",
            got: kind_of(other),
        }),
    }
}

/// A non-negative int32, as Kubernetes counts seconds and thresholds.
fn count(
    obj: &Map<String, Value>,
    key: &str,
    at: &FieldPath,
) -> Result<Option<u32>, ProbeConfigError> {
    let Some(v) = present(obj, key) else {
        return Ok(None);
    };
    let path = || at.field(key);
    let Value::Number(n) = v else {
        return Err(ProbeConfigError::WrongType {
            path: path(),
            expected: "an integer",
            got: kind_of(v),
        });
    };
    let max = i64::from(i32::MAX);
    match n.as_i64() {
        Some(i) if i < 0 => Err(ProbeConfigError::Negative {
            path: path(),
            value: i,
        }),
        Some(i) if i > max => Err(ProbeConfigError::TooLarge {
            path: path(),
            value: i.to_string(),
            max,
        }),
        Some(i) => u32::try_from(i)
            .map(Some)
            .map_err(|_| ProbeConfigError::TooLarge {
                path: path(),
                value: i.to_string(),
                max,
            }),
        None if n.is_u64() => Err(ProbeConfigError::TooLarge {
            path: path(),
            value: n.to_string(),
            max,
        }),
        None => Err(ProbeConfigError::WrongType {
            path: path(),
            expected: "an integer",
            got: "a fractional number",
        }),
    }
}

/// An IntOrString port. Named ports would need the pod spec, which the queue-proxy
/// does not have, so only numbers (or numeric strings, as the kubelet also accepts)
/// are allowed.
fn port(obj: &Map<String, Value>, at: &FieldPath, user_port: u16) -> Result<u16, ProbeConfigError> {
    let path = || at.field("port");
    let (raw, shown) = match present(obj, "port") {
        None => (Some(0), String::new()),
        Some(Value::Number(n)) => (n.as_i64(), n.to_string()),
        Some(Value::String(s)) => (s.parse::<i64>().ok(), format!("{s:?}")),
        Some(other) => {
            return Err(ProbeConfigError::WrongType {
                path: path(),
                expected: "a port number or a numeric string",
                got: kind_of(other),
            })
        }
    };
    match raw {
        Some(0) if user_port == 0 => Err(ProbeConfigError::Invalid {
            path: path(),
            reason: "no port given and the user port is 0".to_owned(),
        }),
        Some(0) => Ok(user_port),
        Some(p) => u16::try_from(p).map_err(|_| ProbeConfigError::BadPort {
            path: path(),
            got: shown,
        }),
        None => Err(ProbeConfigError::BadPort {
            path: path(),
            got: shown,
        }),
    }
}

fn host(obj: &Map<String, Value>, at: &FieldPath) -> Result<String, ProbeConfigError> {
    let Some(given) = string(obj, "host", at)?.filter(|h| !h.is_empty()) else {
        return Ok(DEFAULT_HOST.to_owned());
    };
    let bare = given
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(given);
    let is_name = bare.len() <= 253
        && bare
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if bare.parse::<IpAddr>().is_ok() || (!bare.is_empty() && is_name) {
        Ok(bare.to_owned())
    } else {
        Err(ProbeConfigError::Invalid {
            path: at.field("host"),
            reason: format!("expected an IP address or a host name, got {given:?}"),
        })
    }
}

const HANDLERS: [&str; 4] = ["exec", "tcpSocket", "httpGet", "grpc"];

fn parse_probe(v: &Value, at: &FieldPath, user_port: u16) -> Result<ProbeSpec, ProbeConfigError> {
    let obj = object(v, at)?;
    let found: Vec<&str> = HANDLERS
        .into_iter()
        .filter(|key| present(obj, key).is_some())
        .collect();
    let handler = match found.as_slice() {
        [] => return Err(ProbeConfigError::NoHandler { path: at.shown() }),
        ["exec"] => {
            return Err(ProbeConfigError::ExecUnsupported {
                path: at.field("exec"),
            })
        }
        [key] => {
            let sub_at = at.child(key);
            let sub = present(obj, key).unwrap_or(&Value::Null);
            let sub = object(sub, &sub_at)?;
            match *key {
                "tcpSocket" => ProbeHandler::Tcp(TcpProbe {
                    host: host(sub, &sub_at)?,
                    port: port(sub, &sub_at, user_port)?,
                }),
                "httpGet" => ProbeHandler::Http(parse_http(sub, &sub_at, user_port)?),
                _ => ProbeHandler::Grpc(GrpcProbe {
                    host: host(sub, &sub_at)?,
                    port: port(sub, &sub_at, user_port)?,
                    service: string(sub, "service", &sub_at)?
                        .unwrap_or_default()
                        .to_owned(),
                }),
            }
        }
        several => {
            return Err(ProbeConfigError::SeveralHandlers {
                path: at.shown(),
                found: several.join(" and "),
            })
        }
    };
    let or_default = |v: Option<u32>, default: u32| v.filter(|&n| n > 0).unwrap_or(default);
    Ok(ProbeSpec {
        handler,
        period_seconds: count(obj, "periodSeconds", at)?.unwrap_or(0),
        timeout_seconds: or_default(count(obj, "timeoutSeconds", at)?, DEFAULT_TIMEOUT_SECONDS),
        success_threshold: or_default(
            count(obj, "successThreshold", at)?,
            DEFAULT_SUCCESS_THRESHOLD,
        ),
        failure_threshold: or_default(
            count(obj, "failureThreshold", at)?,
            DEFAULT_FAILURE_THRESHOLD,
        ),
        initial_delay_seconds: count(obj, "initialDelaySeconds", at)?.unwrap_or(0),
    })
}

fn parse_http(
    obj: &Map<String, Value>,
    at: &FieldPath,
    user_port: u16,
) -> Result<HttpProbe, ProbeConfigError> {
    let scheme = match string(obj, "scheme", at)? {
        None | Some("") => HttpScheme::Http,
        // The kubelet lowercases the scheme, so any case works there and here.
        Some(s) if s.eq_ignore_ascii_case("http") => HttpScheme::Http,
        Some(s) if s.eq_ignore_ascii_case("https") => HttpScheme::Https,
        Some(s) => {
            return Err(ProbeConfigError::Invalid {
                path: at.field("scheme"),
                reason: format!("expected HTTP or HTTPS, got {s:?}"),
            })
        }
    };
    let path = match string(obj, "path", at)? {
        None | Some("") => PathAndQuery::from_static("/"),
        Some(p) => {
            let rooted = if p.starts_with('/') {
                p.to_owned()
            } else {
                format!("/{p}")
            };
            PathAndQuery::try_from(rooted).map_err(|e| ProbeConfigError::Invalid {
                path: at.field("path"),
                reason: format!("invalid path {p:?}: {e}"),
            })?
        }
    };
    let headers = match present(obj, "httpHeaders") {
        None => Vec::new(),
        Some(Value::Array(items)) => {
            let list_at = at.child("httpHeaders");
            items
                .iter()
                .enumerate()
                .map(|(i, item)| parse_header(item, &list_at.elem(i)))
                .collect::<Result<_, _>>()?
        }
        Some(other) => {
            return Err(ProbeConfigError::WrongType {
                path: at.field("httpHeaders"),
                expected: "an array",
                got: kind_of(other),
            })
        }
    };
    Ok(HttpProbe {
        host: host(obj, at)?,
        port: port(obj, at, user_port)?,
        path,
        scheme,
        headers,
    })
}

fn parse_header(v: &Value, at: &FieldPath) -> Result<(HeaderName, HeaderValue), ProbeConfigError> {
    let obj = object(v, at)?;
    let name = string(obj, "name", at)?.ok_or_else(|| ProbeConfigError::Invalid {
        path: at.field("name"),
        reason: "required".to_owned(),
    })?;
    let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| ProbeConfigError::Invalid {
        path: at.field("name"),
        reason: format!("invalid header name {name:?}"),
    })?;
    let value = string(obj, "value", at)?.unwrap_or_default();
    let value = HeaderValue::from_str(value).map_err(|_| ProbeConfigError::Invalid {
        path: at.field("value"),
        reason: format!("invalid header value {value:?}"),
    })?;
    Ok((name, value))
}

// ---------------------------------------------------------------------------------------
// Prober
// ---------------------------------------------------------------------------------------

/// The pace of aggressive probing (`periodSeconds: 0`). The defaults are Knative's, but
/// for `refused_interval`; tests shorten them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeTiming {
    /// Time between the starts of two attempts.
    pub aggressive_interval: Duration,
    /// Time between the starts of two attempts when the last one's connection was
    /// refused ([beyond]): nothing listens on the port yet, so asking again costs the app
    /// nothing and the kernel a few microseconds, and the first attempt after the app
    /// starts listening comes within about this long instead of `aggressive_interval`
    /// (Knative's 50 ms). Never longer than `aggressive_interval`. Tokio's timer rounds a
    /// deadline up to its next whole millisecond, so anything under 1 ms means "at the
    /// next tick": attempts a millisecond apart, the app seen 0.5 ms after it listens on
    /// average. A pause of exactly 1 ms rounds to the tick after next, twice as slow.
    pub refused_interval: Duration,
    /// Time one attempt may take.
    pub aggressive_attempt_timeout: Duration,
    /// Time after which a health check gives up and answers "not ready".
    pub aggressive_total: Duration,
}

impl Default for ProbeTiming {
    fn default() -> Self {
        Self {
            aggressive_interval: Duration::from_millis(50),
            refused_interval: Duration::from_micros(100),
            aggressive_attempt_timeout: Duration::from_millis(100),
            aggressive_total: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProberOptions {
    pub timing: ProbeTiming,
    /// `ENABLE_HTTP2_AUTO_DETECTION`: HTTP probes try h2c prior knowledge first and
    /// keep to whichever protocol answered.
    pub http2_auto_detect: bool,
}

/// Runs the readiness probes for health checks. Clones share the probes and the run in
/// flight.
#[derive(Clone)]
pub struct Prober {
    inner: Arc<Inner>,
}

type Run = Shared<BoxFuture<'static, bool>>;

/// A probe run that health checks can join.
struct InFlight {
    run: Run,
    /// Set by the run's task when it ends. `Shared::peek` is not enough: when every
    /// waiter has given up, nobody polls the finished run, and a caller arriving much
    /// later would be handed its stale answer.
    done: Arc<AtomicBool>,
}

/// Marks a run done however its task ends: result, panic or cancellation.
struct MarkDone(Arc<AtomicBool>);

impl Drop for MarkDone {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

struct Inner {
    runners: Box<[Runner]>,
    timing: ProbeTiming,
    /// The run that concurrent health checks join. A std mutex suffices: it is only
    /// held to clone or replace the handle, never across an `.await`.
    in_flight: Mutex<Option<InFlight>>,
}

impl fmt::Debug for Prober {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Prober")
            .field(
                "probes",
                &self
                    .inner
                    .runners
                    .iter()
                    .map(|r| &*r.label)
                    .collect::<Vec<_>>(),
            )
            .field("timing", &self.inner.timing)
            .finish()
    }
}

impl Prober {
    pub fn new(probes: Vec<ProbeSpec>, options: ProberOptions) -> Self {
        let needs_tls = probes
            .iter()
            .any(|p| matches!(&p.handler, ProbeHandler::Http(h) if h.scheme == HttpScheme::Https));
        let tls = if needs_tls {
            match insecure_tls_connector(options.http2_auto_detect) {
                Ok(connector) => Some(connector),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot set up TLS for HTTPS readiness probes; they will fail");
                    None
                }
            }
        } else {
            None
        };
        let runners = probes
            .into_iter()
            .map(|spec| Runner::new(spec, &options, tls.as_ref()))
            .collect();
        Self {
            inner: Arc::new(Inner {
                runners,
                timing: options.timing,
                in_flight: Mutex::new(None),
            }),
        }
    }

    /// True when there is nothing to probe, so the container always counts as ready.
    pub fn is_empty(&self) -> bool {
        self.inner.runners.is_empty()
    }

    /// Probes the user container and tells whether it is ready.
    ///
    /// Callers that arrive while a run is in flight wait for that run instead of
    /// starting their own, so a burst of health checks costs one probe. The run is a
    /// task of its own: a health check that gives up does not stall it for the others.
    /// Must be called inside a Tokio runtime.
    pub async fn is_ready(&self) -> bool {
        if self.is_empty() {
            return true;
        }
        let run = {
            let mut slot = self
                .inner
                .in_flight
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match slot.as_ref() {
                Some(flight) if !flight.done.load(Ordering::Acquire) => flight.run.clone(),
                _ => {
                    let flight = self.start_run();
                    let run = flight.run.clone();
                    *slot = Some(flight);
                    run
                }
            }
        };
        run.await
    }

    fn start_run(&self) -> InFlight {
        let inner = Arc::clone(&self.inner);
        let done = Arc::new(AtomicBool::new(false));
        let mark = MarkDone(Arc::clone(&done));
        let task = tokio::spawn(async move {
            let _mark = mark;
            inner.probe_all().await
        });
        // A panicking probe is a bug, but it must read as "not ready", not poison
        // every later health check.
        let run = task.map(|joined| joined.unwrap_or(false)).boxed().shared();
        InFlight { run, done }
    }
}

impl Inner {
    async fn probe_all(&self) -> bool {
        let timing = &self.timing;
        if let [only] = &*self.runners {
            return only.run(timing).await;
        }
        // The first failure settles the answer, so the other probes are dropped then.
        try_join_all(self.runners.iter().map(|r| async move {
            if r.run(timing).await {
                Ok(())
            } else {
                Err(())
            }
        }))
        .await
        .is_ok()
    }
}

/// One probe, with everything an attempt needs prepared once.
struct Runner {
    spec: ProbeSpec,
    /// What the logs call this probe.
    label: Box<str>,
    check: Check,
}

impl Runner {
    fn new(spec: ProbeSpec, options: &ProberOptions, tls: Option<&TlsConnector>) -> Self {
        let (label, check) = match &spec.handler {
            ProbeHandler::Tcp(p) => {
                let target = Target::new(&p.host, p.port);
                (
                    format!("tcpSocket {}", target.authority()),
                    Check::Tcp(target),
                )
            }
            ProbeHandler::Http(p) => {
                let label = format!(
                    "httpGet {}://{}{}",
                    if p.scheme == HttpScheme::Https {
                        "https"
                    } else {
                        "http"
                    },
                    Target::new(&p.host, p.port).authority(),
                    p.path
                );
                let check = HttpCheck::new(p, options.http2_auto_detect, tls)
                    .map_or_else(|e| Check::Broken(e.into()), |c| Check::Http(Box::new(c)));
                (label, check)
            }
            ProbeHandler::Grpc(p) => {
                let target = Target::new(&p.host, p.port);
                let label = format!("grpc {} service {:?}", target.authority(), p.service);
                let check = GrpcCheck::new(p)
                    .map_or_else(|e| Check::Broken(e.into()), |c| Check::Grpc(Box::new(c)));
                (label, check)
            }
        };
        if let Check::Broken(reason) = &check {
            tracing::warn!(probe = %label, %reason, "readiness probe cannot run; it will always fail");
        }
        Self {
            spec,
            label: label.into(),
            check,
        }
    }

    async fn run(&self, timing: &ProbeTiming) -> bool {
        let result = if self.spec.is_aggressive() {
            self.run_aggressive(timing).await
        } else {
            self.check.attempt(self.spec.timeout()).await
        };
        match result {
            Ok(()) => true,
            Err(error) => {
                tracing::debug!(probe = %self.label, %error, "readiness probe failed");
                false
            }
        }
    }

    /// Retries until `successThreshold` attempts in a row succeed or time runs out;
    /// fails with the last attempt's error so the log says why.
    async fn run_aggressive(&self, timing: &ProbeTiming) -> Result<(), CheckError> {
        let needed = self.spec.success_threshold.max(1);
        let mut last_error = None;
        let retries = async {
            let mut streak = 0;
            loop {
                let started = tokio::time::Instant::now();
                let pause = match self.check.attempt(timing.aggressive_attempt_timeout).await {
                    Ok(()) => {
                        streak += 1;
                        if streak >= needed {
                            return;
                        }
                        timing.aggressive_interval
                    }
                    Err(e) => {
                        streak = 0;
                        let pause = if e.is_refused() {
                            timing.refused_interval.min(timing.aggressive_interval)
                        } else {
                            timing.aggressive_interval
                        };
                        last_error = Some(e);
                        pause
                    }
                };
                // Paced from the attempt's start, as a ticker would; a zero pause from
                // hand-built options must still yield to the runtime.
                tokio::time::sleep_until(started + pause.max(Duration::from_micros(100))).await;
            }
        };
        match tokio::time::timeout(timing.aggressive_total, retries).await {
            Ok(()) => Ok(()),
            Err(_) => Err(CheckError::GaveUp {
                after: timing.aggressive_total,
                last: last_error.map(Box::new),
            }),
        }
    }
}

/// Why one attempt failed; only ever logged at debug level.
#[derive(Debug, thiserror::Error)]
enum CheckError {
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("not ready after {after:?}{}", last.as_ref().map(|e| format!("; last attempt: {e}")).unwrap_or_default())]
    GaveUp {
        after: Duration,
        last: Option<Box<CheckError>>,
    },
    #[error("connect: {0}")]
    Connect(#[source] io::Error),
    #[error("TLS: {0}")]
    Tls(#[source] io::Error),
    #[error("HTTP: {0}")]
    Http(#[source] hyper::Error),
    #[error("HTTP status {0}")]
    Status(StatusCode),
    #[error("grpc-status {code}: {message}")]
    GrpcStatus { code: u32, message: String },
    #[error("bad gRPC response: {0}")]
    GrpcResponse(String),
    #[error("health status {0} is not SERVING")]
    NotServing(i32),
    #[error("misconfigured: {0}")]
    Broken(Arc<str>),
}

impl CheckError {
    /// True when the attempt's connection was refused: nothing listens on the port.
    fn is_refused(&self) -> bool {
        matches!(self, CheckError::Connect(e) if e.kind() == io::ErrorKind::ConnectionRefused)
    }
}

enum Check {
    Tcp(Target),
    Http(Box<HttpCheck>),
    Grpc(Box<GrpcCheck>),
    /// A hand-built spec that cannot be turned into a request; it fails every attempt
    /// rather than panicking or failing `Prober::new`.
    Broken(Arc<str>),
}

impl Check {
    async fn attempt(&self, timeout: Duration) -> Result<(), CheckError> {
        let attempt = async {
            match self {
                Self::Tcp(target) => target.connect().await.map(drop),
                Self::Http(check) => check.attempt().await,
                Self::Grpc(check) => check.attempt().await,
                Self::Broken(reason) => Err(CheckError::Broken(Arc::clone(reason))),
            }
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(CheckError::Timeout(timeout)),
        }
    }
}

/// Where a probe connects; an IP address skips the resolver on every attempt.
enum Target {
    Addr(SocketAddr),
    Name { host: String, port: u16 },
}

impl Target {
    fn new(host: &str, port: u16) -> Self {
        match host.parse::<IpAddr>() {
            Ok(ip) => Self::Addr(SocketAddr::new(ip, port)),
            Err(_) => Self::Name {
                host: host.to_owned(),
                port,
            },
        }
    }

    /// `host:port`, IPv6 in brackets.
    fn authority(&self) -> String {
        match self {
            Self::Addr(addr) => addr.to_string(),
            Self::Name { host, port } => format!("{host}:{port}"),
        }
    }

    async fn connect(&self) -> Result<TcpStream, CheckError> {
        let stream = match self {
            Self::Addr(addr) => TcpStream::connect(addr).await,
            Self::Name { host, port } => TcpStream::connect((host.as_str(), *port)).await,
        }
        .map_err(CheckError::Connect)?;
        // HTTP/2 writes several small frames before the server answers; Nagle's
        // algorithm would hold them back for longer than an aggressive attempt lasts.
        stream.set_nodelay(true).map_err(CheckError::Connect)?;
        Ok(stream)
    }
}

const PROTO_UNKNOWN: u8 = 0;
const PROTO_H1: u8 = 1;
const PROTO_H2: u8 = 2;

struct HttpCheck {
    target: Target,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    /// Origin-form path and headers including `Host` and `Connection: close`.
    h1_uri: Uri,
    h1_headers: HeaderMap,
    /// Absolute URI (its authority is the `Host` header, if one was given) and
    /// headers without the connection-specific ones HTTP/2 forbids.
    h2_uri: Uri,
    h2_headers: HeaderMap,
    /// Cleartext only: which protocol the app spoke last (TLS lets ALPN decide).
    proto: AtomicU8,
}

impl HttpCheck {
    fn new(p: &HttpProbe, auto_detect: bool, tls: Option<&TlsConnector>) -> Result<Self, String> {
        let target = Target::new(&p.host, p.port);
        let authority = target.authority();
        let mut headers = HeaderMap::with_capacity(p.headers.len() + 3);
        for (name, value) in &p.headers {
            headers.append(name.clone(), value.clone());
        }
        // As in the kubelet: the probe's own User-Agent or Host replaces ours.
        if !headers.contains_key(header::USER_AGENT) {
            headers.insert(
                header::USER_AGENT,
                HeaderValue::from_static(READINESS_PROBE_UA),
            );
        }
        let h2_authority = match headers.get(header::HOST) {
            Some(host) => host
                .to_str()
                .map_err(|_| "the Host header is not visible ASCII".to_owned())?
                .to_owned(),
            None => authority.clone(),
        };
        let scheme = match p.scheme {
            HttpScheme::Http => "http",
            HttpScheme::Https => "https",
        };
        let h2_uri: Uri = format!("{scheme}://{h2_authority}{}", p.path)
            .parse()
            .map_err(|e| format!("cannot build the probe URL: {e}"))?;
        let mut h2_headers = headers.clone();
        h2_headers.remove(header::HOST);

        let mut h1_headers = headers;
        if !h1_headers.contains_key(header::HOST) {
            let host = HeaderValue::from_str(&authority)
                .map_err(|_| format!("cannot use {authority:?} as a Host header"))?;
            h1_headers.insert(header::HOST, host);
        }
        // A fresh connection per attempt, as the kubelet does; tell the app so.
        h1_headers.insert(header::CONNECTION, HeaderValue::from_static("close"));

        let tls = match p.scheme {
            HttpScheme::Http => None,
            HttpScheme::Https => {
                let connector = tls.ok_or("TLS could not be set up")?.clone();
                let name = ServerName::try_from(p.host.clone())
                    .map_err(|e| format!("cannot use {:?} as a TLS server name: {e}", p.host))?;
                Some((connector, name))
            }
        };
        let proto = if auto_detect && tls.is_none() {
            PROTO_UNKNOWN
        } else {
            PROTO_H1
        };
        Ok(Self {
            target,
            tls,
            h1_uri: Uri::from(p.path.clone()),
            h1_headers,
            h2_uri,
            h2_headers,
            proto: AtomicU8::new(proto),
        })
    }

    async fn attempt(&self) -> Result<(), CheckError> {
        let stream = self.target.connect().await?;
        let status = if let Some((connector, name)) = &self.tls {
            let stream = connector
                .connect(name.clone(), stream)
                .await
                .map_err(CheckError::Tls)?;
            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
            if h2 {
                self.get_h2(TokioIo::new(stream)).await?
            } else {
                self.get_h1(TokioIo::new(stream)).await?
            }
        } else {
            match self.proto.load(Ordering::Relaxed) {
                PROTO_H1 => self.get_h1(TokioIo::new(stream)).await?,
                PROTO_H2 => self.get_h2(TokioIo::new(stream)).await?,
                _ => match self.get_h2(TokioIo::new(stream)).await {
                    Ok(status) => {
                        self.proto.store(PROTO_H2, Ordering::Relaxed);
                        status
                    }
                    // The app listens but does not speak h2c. Only an answer over
                    // HTTP/1.1 proves that it is HTTP/1.1, so only that is remembered.
                    Err(CheckError::Http(e)) => {
                        tracing::debug!(error = %e, "no h2c from the app; trying HTTP/1.1");
                        let stream = self.target.connect().await?;
                        let status = self.get_h1(TokioIo::new(stream)).await?;
                        self.proto.store(PROTO_H1, Ordering::Relaxed);
                        status
                    }
                    Err(e) => return Err(e),
                },
            }
        };
        // Redirects are not followed: a 3xx already says the app is serving.
        if status.is_success() || status.is_redirection() {
            Ok(())
        } else {
            Err(CheckError::Status(status))
        }
    }

    async fn get_h1<T>(&self, io: T) -> Result<StatusCode, CheckError>
    where
        T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let mut req = Request::new(Empty::<Bytes>::new());
        *req.uri_mut() = self.h1_uri.clone();
        *req.headers_mut() = self.h1_headers.clone();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(CheckError::Http)?;
        drive(conn, async move {
            let resp = sender.send_request(req).await.map_err(CheckError::Http)?;
            // The body is not read: the connection is dropped right after.
            Ok(resp.status())
        })
        .await
    }

    async fn get_h2<T>(&self, io: T) -> Result<StatusCode, CheckError>
    where
        T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let mut req = Request::new(Empty::<Bytes>::new());
        *req.version_mut() = Version::HTTP_2;
        *req.uri_mut() = self.h2_uri.clone();
        *req.headers_mut() = self.h2_headers.clone();
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(CheckError::Http)?;
        drive(conn, async move {
            let resp = sender.send_request(req).await.map_err(CheckError::Http)?;
            Ok(resp.status())
        })
        .await
    }
}

/// Runs a request on a connection without spawning the connection as a task, so
/// that a timed-out attempt leaves nothing behind.
async fn drive<C, W, T>(conn: C, work: W) -> Result<T, CheckError>
where
    C: std::future::Future<Output = Result<(), hyper::Error>>,
    W: std::future::Future<Output = Result<T, CheckError>>,
{
    tokio::pin!(conn, work);
    tokio::select! {
        biased;
        out = &mut work => out,
        closed = &mut conn => {
            // With the connection gone the request resolves at once, either with the
            // response the connection delivered before it closed or with an error.
            match (work.await, closed) {
                (Err(_), Err(e)) => Err(CheckError::Http(e)),
                (out, _) => out,
            }
        }
    }
}

/// `grpc.health.v1.HealthCheckRequest`.
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    service: String,
}

/// `grpc.health.v1.HealthCheckResponse`; the enum travels as its number.
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckResponse {
    #[prost(int32, tag = "1")]
    status: i32,
}

struct GrpcCheck {
    target: Target,
    uri: Uri,
    headers: HeaderMap,
    /// The whole request body, one length-prefixed message.
    frame: Bytes,
}

impl GrpcCheck {
    fn new(p: &GrpcProbe) -> Result<Self, String> {
        let target = Target::new(&p.host, p.port);
        let uri: Uri = format!("http://{}{GRPC_HEALTH_PATH}", target.authority())
            .parse()
            .map_err(|e| format!("cannot build the probe URL: {e}"))?;
        let mut headers = HeaderMap::with_capacity(3);
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert(
            header::USER_AGENT,
            HeaderValue::from_static(READINESS_PROBE_UA),
        );
        let message = HealthCheckRequest {
            service: p.service.clone(),
        }
        .encode_to_vec();
        let len =
            u32::try_from(message.len()).map_err(|_| "the service name is too long".to_owned())?;
        let mut frame = Vec::with_capacity(5 + message.len());
        frame.push(0);
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(&message);
        Ok(Self {
            target,
            uri,
            headers,
            frame: frame.into(),
        })
    }

    async fn attempt(&self) -> Result<(), CheckError> {
        let stream = self.target.connect().await?;
        let mut req = Request::new(Full::new(self.frame.clone()));
        *req.method_mut() = Method::POST;
        *req.version_mut() = Version::HTTP_2;
        *req.uri_mut() = self.uri.clone();
        *req.headers_mut() = self.headers.clone();
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .map_err(CheckError::Http)?;
        drive(conn, async move {
            let resp = sender.send_request(req).await.map_err(CheckError::Http)?;
            let (parts, body) = resp.into_parts();
            if parts.status != StatusCode::OK {
                return Err(CheckError::Status(parts.status));
            }
            // A trailers-only answer (an error) carries grpc-status in the headers.
            check_grpc_status(&parts.headers)?;
            let collected = Limited::new(body, MAX_GRPC_RESPONSE)
                .collect()
                .await
                .map_err(|e| CheckError::GrpcResponse(e.to_string()))?;
            if let Some(trailers) = collected.trailers() {
                check_grpc_status(trailers)?;
            }
            match decode_health_status(&collected.to_bytes())? {
                GRPC_SERVING => Ok(()),
                other => Err(CheckError::NotServing(other)),
            }
        })
        .await
    }
}

fn check_grpc_status(headers: &HeaderMap) -> Result<(), CheckError> {
    let Some(raw) = headers.get("grpc-status") else {
        return Ok(());
    };
    let code = raw
        .to_str()
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .ok_or_else(|| CheckError::GrpcResponse(format!("unreadable grpc-status {raw:?}")))?;
    if code == 0 {
        return Ok(());
    }
    let message = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    Err(CheckError::GrpcStatus { code, message })
}

fn decode_health_status(body: &[u8]) -> Result<i32, CheckError> {
    let [compressed, l0, l1, l2, l3, rest @ ..] = body else {
        return Err(CheckError::GrpcResponse("no response message".to_owned()));
    };
    // We never offer an encoding, so a compressed message is a broken server.
    if *compressed != 0 {
        return Err(CheckError::GrpcResponse(
            "compressed response message".to_owned(),
        ));
    }
    let len = u32::from_be_bytes([*l0, *l1, *l2, *l3]);
    let message = usize::try_from(len)
        .ok()
        .and_then(|len| rest.get(..len))
        .ok_or_else(|| CheckError::GrpcResponse("truncated response message".to_owned()))?;
    HealthCheckResponse::decode(message)
        .map(|r| r.status)
        .map_err(|e| CheckError::GrpcResponse(e.to_string()))
}

/// The kubelet probes HTTPS without checking the certificate (the app's certificate
/// is for its clients' names, not for `127.0.0.1`), so we do too. Handshake
/// signatures are still checked, which costs nothing and keeps TLS honest.
fn insecure_tls_connector(offer_h2: bool) -> Result<TlsConnector, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
        .with_no_client_auth();
    config.alpn_protocols = if offer_h2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(TlsConnector::from(Arc::new(config)))
}

#[derive(Debug)]
struct AcceptAnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{convert::Infallible, sync::atomic::AtomicUsize, time::Instant};

    use http::Response;
    use http_body::Frame;
    use http_body_util::StreamBody;
    use hyper::{body::Incoming, service::service_fn};
    use tokio::net::TcpListener;

    fn one(json: &str) -> ProbeSpec {
        let mut probes = parse_probes(json, false, 8080).unwrap();
        assert_eq!(probes.len(), 1);
        probes.remove(0)
    }

    fn err(json: &str, multi: bool) -> String {
        parse_probes(json, multi, 8080).unwrap_err().to_string()
    }

    // ---- parsing ------------------------------------------------------------------

    #[test]
    fn parses_tcp_with_defaults() {
        let p = one(r#"{"tcpSocket":{"port":0},"successThreshold":1}"#);
        assert_eq!(
            p,
            ProbeSpec {
                handler: ProbeHandler::Tcp(TcpProbe {
                    host: "127.0.0.1".into(),
                    port: 8080,
                }),
                period_seconds: 0,
                timeout_seconds: 1,
                success_threshold: 1,
                failure_threshold: 3,
                initial_delay_seconds: 0,
            }
        );
        assert!(p.is_aggressive());
    }

    #[test]
    fn parses_http_fully_and_ignores_unknown_fields() {
        let p = one(
            r#"{"httpGet":{"path":"healthz?x=1","port":"9000","host":"::1","scheme":"HTTPS",
                "httpHeaders":[{"name":"X-Probe","value":"yes"},{"name":"Host","value":"app.example"}]},
                "periodSeconds":5,"timeoutSeconds":2,"successThreshold":2,"failureThreshold":4,
                "initialDelaySeconds":3,"terminationGracePeriodSeconds":9,"somethingNew":{"a":1}}"#,
        );
        let ProbeHandler::Http(h) = &p.handler else {
            panic!("{p:?}")
        };
        assert_eq!(h.host, "::1");
        assert_eq!(h.port, 9000);
        assert_eq!(h.path.as_str(), "/healthz?x=1");
        assert_eq!(h.scheme, HttpScheme::Https);
        assert_eq!(h.headers.len(), 2);
        assert_eq!(h.headers[0].0, "x-probe");
        assert_eq!(h.headers[0].1, "yes");
        assert_eq!(
            (
                p.period_seconds,
                p.timeout_seconds,
                p.success_threshold,
                p.failure_threshold
            ),
            (5, 2, 2, 4)
        );
        assert_eq!(p.initial_delay_seconds, 3);
        assert_eq!(p.timeout(), Duration::from_secs(2));
        assert!(!p.is_aggressive());
    }

    #[test]
    fn parses_http_defaults_and_grpc() {
        let ProbeHandler::Http(h) = one(r#"{"httpGet":{}}"#).handler else {
            panic!()
        };
        assert_eq!(
            (h.host.as_str(), h.port, h.path.as_str()),
            ("127.0.0.1", 8080, "/")
        );
        assert_eq!(h.scheme, HttpScheme::Http);

        let g = one(r#"{"grpc":{"port":9090,"service":"liveness"},"timeoutSeconds":0}"#);
        assert_eq!(
            g.handler,
            ProbeHandler::Grpc(GrpcProbe {
                host: "127.0.0.1".into(),
                port: 9090,
                service: "liveness".into(),
            })
        );
        assert_eq!(g.timeout_seconds, 1);
    }

    #[test]
    fn empty_means_no_probes() {
        assert!(parse_probes("", false, 8080).unwrap().is_empty());
        assert!(parse_probes("  \n", true, 8080).unwrap().is_empty());
        assert!(parse_probes("[]", true, 8080).unwrap().is_empty());
    }

    #[test]
    fn parses_arrays_in_multi_mode() {
        let probes = parse_probes(
            r#"[{"tcpSocket":{"port":8080}},{"httpGet":{"port":8081,"path":"/ready"}}]"#,
            true,
            8080,
        )
        .unwrap();
        assert_eq!(probes.len(), 2);
        assert!(matches!(probes[1].handler, ProbeHandler::Http(ref h) if h.port == 8081));
        // A lone object is still one probe.
        assert_eq!(
            parse_probes(r#"{"tcpSocket":{}}"#, true, 8080)
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn errors_name_the_field() {
        let cases: &[(&str, bool, &str)] = &[
            (r#"{"tcpSocket": {"port": }"#, false, "invalid JSON at line 1 column 24: expected value"),
            (r#"{"exec":{"command":["true"]}}"#, false, "exec: exec probes are not supported"),
            (r#"{"periodSeconds":1}"#, false, "probe: a probe needs exactly one of tcpSocket, httpGet or grpc; found none"),
            (r#"{"tcpSocket":{},"httpGet":{}}"#, false, "probe: a probe needs exactly one of tcpSocket, httpGet or grpc; found tcpSocket and httpGet"),
            (r#"{"httpGet":{"port":"http"}}"#, false, r#"httpGet.port: expected a port number 1-65535, got "http""#),
            (r#"{"tcpSocket":{"port":70000}}"#, false, "tcpSocket.port: expected a port number 1-65535, got 70000"),
            (r#"{"tcpSocket":{"port":-1}}"#, false, "tcpSocket.port: expected a port number 1-65535, got -1"),
            (r#"{"tcpSocket":{"port":true}}"#, false, "tcpSocket.port: expected a port number or a numeric string, got a boolean"),
            (r#"{"tcpSocket":{},"successThreshold":-1}"#, false, "successThreshold: must not be negative, got -1"),
            (r#"{"tcpSocket":{},"timeoutSeconds":"1"}"#, false, "timeoutSeconds: expected an integer, got a string"),
            (r#"{"tcpSocket":{},"periodSeconds":1.5}"#, false, "periodSeconds: expected an integer, got a fractional number"),
            (r#"{"tcpSocket":{},"periodSeconds":4294967296}"#, false, "periodSeconds: 4294967296 is too large"),
            (r#"{"tcpSocket":"8080"}"#, false, "tcpSocket: expected an object, got a string"),
            (r#"{"httpGet":{"scheme":"FTP"}}"#, false, r#"httpGet.scheme: expected HTTP or HTTPS, got "FTP""#),
            (r#"{"httpGet":{"host":"a b"}}"#, false, r#"httpGet.host: expected an IP address or a host name, got "a b""#),
            (r#"{"httpGet":{"httpHeaders":[{"name":"ok","value":"1"},{"name":"bad name"}]}}"#, false, r#"httpGet.httpHeaders[1].name: invalid header name "bad name""#),
            (r#"{"httpGet":{"httpHeaders":[{"value":"1"}]}}"#, false, "httpGet.httpHeaders[0].name: required"),
            (r#"{"httpGet":{"httpHeaders":{}}}"#, false, "httpGet.httpHeaders: expected an array, got an object"),
            (r#"{"grpc":{"service":7}}"#, false, "grpc.service: expected a string, got a number"),
            (r#"[{"tcpSocket":{}}]"#, false, "probe: expected an object (a list of probes needs ENABLE_MULTI_CONTAINER_PROBES=true), got an array"),
            (r#"[{"tcpSocket":{}},{"tcpSocket":{"port":"web"}}]"#, true, r#"[1].tcpSocket.port: expected a port number 1-65535, got "web""#),
            (r#"[{"tcpSocket":{}},{"exec":{}}]"#, true, "[1].exec: exec probes"),
            (r#"[{"tcpSocket":{}},3]"#, true, "[1]: expected an object, got a number"),
            ("null", false, "probe: expected an object, got null"),
        ];
        for (json, multi, want) in cases {
            let got = err(json, *multi);
            assert!(
                got.starts_with(want),
                "{json}\n  got:  {got}\n  want: {want}"
            );
        }
    }

    #[test]
    fn default_port_needs_a_user_port() {
        let e = parse_probes(r#"{"tcpSocket":{}}"#, false, 0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "tcpSocket.port: no port given and the user port is 0"
        );
    }

    // ---- test servers -------------------------------------------------------------

    const FAST: ProbeTiming = ProbeTiming {
        aggressive_interval: Duration::from_millis(20),
        refused_interval: Duration::from_millis(1),
        aggressive_attempt_timeout: Duration::from_millis(200),
        aggressive_total: Duration::from_secs(3),
    };

    fn prober(json: &str, auto: bool) -> Prober {
        let probes = parse_probes(json, json.trim_start().starts_with('['), 1).unwrap();
        Prober::new(
            probes,
            ProberOptions {
                timing: FAST,
                http2_auto_detect: auto,
            },
        )
    }

    fn runner(json: &str, auto: bool) -> Runner {
        let options = ProberOptions {
            timing: FAST,
            http2_auto_detect: auto,
        };
        let tls = insecure_tls_connector(auto).unwrap();
        Runner::new(one(json), &options, Some(&tls))
    }

    /// A port that refuses connections (bound once, then closed).
    async fn closed_port() -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().port()
    }

    #[derive(Default)]
    struct Seen {
        conns: AtomicUsize,
        requests: Mutex<Vec<(Version, HeaderMap, String)>>,
    }

    impl Seen {
        fn conns(&self) -> usize {
            self.conns.load(Ordering::SeqCst)
        }
        fn last(&self) -> (Version, HeaderMap, String) {
            self.requests.lock().unwrap().last().cloned().unwrap()
        }
    }

    #[derive(Clone, Copy)]
    enum Serve {
        H1,
        Auto,
        H1Tls,
    }

    async fn http_server(serve: Serve, status: u16, delay: Duration) -> (u16, Arc<Seen>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Seen::default());
        let acceptor = matches!(serve, Serve::H1Tls).then(tls_acceptor);
        let seen2 = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                seen2.conns.fetch_add(1, Ordering::SeqCst);
                let seen = Arc::clone(&seen2);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let seen = Arc::clone(&seen);
                        async move {
                            seen.requests.lock().unwrap().push((
                                req.version(),
                                req.headers().clone(),
                                req.uri().path().to_owned(),
                            ));
                            tokio::time::sleep(delay).await;
                            let resp = Response::builder()
                                .status(status)
                                .header("location", "/elsewhere")
                                .body(Full::new(Bytes::from_static(b"body")))
                                .unwrap();
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    match (serve, acceptor) {
                        (Serve::H1Tls, Some(acceptor)) => {
                            let Ok(tls) = acceptor.accept(stream).await else {
                                return;
                            };
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(tls), svc)
                                .await;
                        }
                        (Serve::Auto, _) => {
                            let _ =
                                hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                                    .serve_connection(TokioIo::new(stream), svc)
                                    .await;
                        }
                        _ => {
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), svc)
                                .await;
                        }
                    }
                });
            }
        });
        (port, seen)
    }

    fn tls_acceptor() -> tokio_rustls::TlsAcceptor {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }

    /// Accepts connections and keeps them open without ever answering.
    async fn silent_server() -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        port
    }

    enum GrpcAnswer {
        Status(i32),
        /// Trailers-only error, as a server without the health service answers.
        Unimplemented,
    }

    async fn grpc_server(answer: GrpcAnswer) -> (u16, Arc<Mutex<Vec<(HeaderMap, String)>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = Arc::clone(&seen);
        let answer = Arc::new(answer);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let seen = Arc::clone(&seen2);
                let answer = Arc::clone(&answer);
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let seen = Arc::clone(&seen);
                        let answer = Arc::clone(&answer);
                        async move {
                            assert_eq!(req.uri().path(), GRPC_HEALTH_PATH);
                            let headers = req.headers().clone();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let asked = HealthCheckRequest::decode(&body[5..]).unwrap();
                            seen.lock().unwrap().push((headers, asked.service));
                            let frames = match *answer {
                                GrpcAnswer::Status(status) => {
                                    let msg = HealthCheckResponse { status }.encode_to_vec();
                                    let mut frame = vec![0];
                                    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
                                    frame.extend_from_slice(&msg);
                                    let mut trailers = HeaderMap::new();
                                    trailers.insert("grpc-status", HeaderValue::from_static("0"));
                                    vec![Frame::data(Bytes::from(frame)), Frame::trailers(trailers)]
                                }
                                GrpcAnswer::Unimplemented => Vec::new(),
                            };
                            let mut resp =
                                Response::builder().header("content-type", "application/grpc");
                            if let GrpcAnswer::Unimplemented = *answer {
                                resp = resp.header("grpc-status", "12");
                            }
                            let body = StreamBody::new(futures_util::stream::iter(
                                frames.into_iter().map(Ok::<_, Infallible>),
                            ));
                            Ok::<_, Infallible>(resp.body(body).unwrap())
                        }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        (port, seen)
    }

    // ---- single checks ------------------------------------------------------------

    const ONE_SECOND: Duration = Duration::from_secs(1);

    #[tokio::test]
    async fn tcp_success_and_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = runner(&format!(r#"{{"tcpSocket":{{"port":{port}}}}}"#), false);
        up.check.attempt(ONE_SECOND).await.unwrap();

        let down = runner(
            &format!(r#"{{"tcpSocket":{{"port":{}}}}}"#, closed_port().await),
            false,
        );
        let e = down.check.attempt(ONE_SECOND).await.unwrap_err();
        assert!(matches!(e, CheckError::Connect(_)), "{e}");
    }

    #[tokio::test]
    async fn http_status_decides() {
        for (status, ok) in [
            (200, true),
            (302, true),
            (399, true),
            (500, false),
            (404, false),
        ] {
            let (port, _) = http_server(Serve::H1, status, Duration::ZERO).await;
            let r = runner(&format!(r#"{{"httpGet":{{"port":{port}}}}}"#), false);
            let result = r.check.attempt(ONE_SECOND).await;
            assert_eq!(result.is_ok(), ok, "status {status}: {result:?}");
        }
    }

    #[tokio::test]
    async fn http_sends_user_agent_path_and_headers() {
        let (port, seen) = http_server(Serve::H1, 200, Duration::ZERO).await;
        let r = runner(
            &format!(
                r#"{{"httpGet":{{"port":{port},"path":"/ready","httpHeaders":[{{"name":"X-Custom","value":"abc"}}]}}}}"#
            ),
            false,
        );
        r.check.attempt(ONE_SECOND).await.unwrap();
        let (version, headers, path) = seen.last();
        assert_eq!(version, Version::HTTP_11);
        assert_eq!(path, "/ready");
        assert_eq!(headers["user-agent"], "kube-probe//");
        assert_eq!(headers["x-custom"], "abc");
        assert_eq!(headers["host"], format!("127.0.0.1:{port}").as_str());

        // The probe's own User-Agent and Host win.
        let r = runner(
            &format!(
                r#"{{"httpGet":{{"port":{port},"httpHeaders":[{{"name":"User-Agent","value":"mine"}},{{"name":"Host","value":"app.example"}}]}}}}"#
            ),
            false,
        );
        r.check.attempt(ONE_SECOND).await.unwrap();
        let (_, headers, _) = seen.last();
        assert_eq!(headers.get_all("user-agent").iter().count(), 1);
        assert_eq!(headers["user-agent"], "mine");
        assert_eq!(headers["host"], "app.example");
    }

    #[tokio::test]
    async fn http_times_out_on_a_silent_server() {
        let port = silent_server().await;
        let r = runner(&format!(r#"{{"httpGet":{{"port":{port}}}}}"#), false);
        let started = Instant::now();
        let e = r
            .check
            .attempt(Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(e, CheckError::Timeout(_)), "{e}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn https_without_certificate_verification() {
        let (port, seen) = http_server(Serve::H1Tls, 200, Duration::ZERO).await;
        let r = runner(
            &format!(r#"{{"httpGet":{{"port":{port},"scheme":"HTTPS"}}}}"#),
            false,
        );
        r.check.attempt(ONE_SECOND).await.unwrap();
        assert_eq!(seen.last().1["user-agent"], "kube-probe//");
    }

    #[tokio::test]
    async fn h2_auto_detect_uses_h2c_when_spoken() {
        let (port, seen) = http_server(Serve::Auto, 200, Duration::ZERO).await;
        let r = runner(
            &format!(
                r#"{{"httpGet":{{"port":{port},"path":"/h","httpHeaders":[{{"name":"Host","value":"app.example"}}]}}}}"#
            ),
            true,
        );
        r.check.attempt(ONE_SECOND).await.unwrap();
        let (version, headers, path) = seen.last();
        assert_eq!(version, Version::HTTP_2);
        assert_eq!(path, "/h");
        assert_eq!(headers["user-agent"], "kube-probe//");
        let Check::Http(check) = &r.check else {
            panic!()
        };
        assert_eq!(check.proto.load(Ordering::Relaxed), PROTO_H2);
        assert_eq!(seen.conns(), 1);
    }

    #[tokio::test]
    async fn h2_auto_detect_falls_back_to_http1_and_remembers() {
        let (port, seen) = http_server(Serve::H1, 200, Duration::ZERO).await;
        let r = runner(&format!(r#"{{"httpGet":{{"port":{port}}}}}"#), true);
        r.check.attempt(ONE_SECOND).await.unwrap();
        assert_eq!(seen.last().0, Version::HTTP_11);
        let Check::Http(check) = &r.check else {
            panic!()
        };
        assert_eq!(check.proto.load(Ordering::Relaxed), PROTO_H1);
        let after_first = seen.conns();
        assert_eq!(after_first, 2, "one h2c try, one HTTP/1.1");
        r.check.attempt(ONE_SECOND).await.unwrap();
        assert_eq!(seen.conns(), after_first + 1, "no second h2c try");
    }

    #[tokio::test]
    async fn grpc_serving_and_not_serving() {
        let (port, seen) = grpc_server(GrpcAnswer::Status(GRPC_SERVING)).await;
        let r = runner(
            &format!(r#"{{"grpc":{{"port":{port},"service":"app"}}}}"#),
            false,
        );
        r.check.attempt(ONE_SECOND).await.unwrap();
        let (headers, service) = seen.lock().unwrap().last().cloned().unwrap();
        assert_eq!(service, "app");
        assert_eq!(headers["content-type"], "application/grpc");
        assert_eq!(headers["te"], "trailers");

        let (port, _) = grpc_server(GrpcAnswer::Status(2)).await;
        let r = runner(&format!(r#"{{"grpc":{{"port":{port}}}}}"#), false);
        let e = r.check.attempt(ONE_SECOND).await.unwrap_err();
        assert!(matches!(e, CheckError::NotServing(2)), "{e}");

        let (port, _) = grpc_server(GrpcAnswer::Unimplemented).await;
        let r = runner(&format!(r#"{{"grpc":{{"port":{port}}}}}"#), false);
        let e = r.check.attempt(ONE_SECOND).await.unwrap_err();
        assert!(matches!(e, CheckError::GrpcStatus { code: 12, .. }), "{e}");
    }

    #[test]
    fn grpc_frames_are_checked() {
        assert!(decode_health_status(&[]).is_err());
        assert!(
            decode_health_status(&[1, 0, 0, 0, 0]).is_err(),
            "compressed"
        );
        assert!(
            decode_health_status(&[0, 0, 0, 0, 9, 8]).is_err(),
            "truncated"
        );
        assert_eq!(decode_health_status(&[0, 0, 0, 0, 2, 8, 1]).unwrap(), 1);
        assert_eq!(decode_health_status(&[0, 0, 0, 0, 0]).unwrap(), 0);
    }

    // ---- the prober ---------------------------------------------------------------

    #[tokio::test]
    async fn no_probes_is_ready_at_once() {
        let p = Prober::new(Vec::new(), ProberOptions::default());
        assert!(p.is_empty());
        assert!(p.is_ready().await);
    }

    #[tokio::test]
    async fn aggressive_turns_ready_when_the_app_starts_listening() {
        let port = closed_port().await;
        let p = prober(&format!(r#"{{"tcpSocket":{{"port":{port}}}}}"#), false);
        let opener = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
            // Keep it listening until the probe is done.
            tokio::time::sleep(Duration::from_secs(3)).await;
            drop(listener);
        });
        let started = Instant::now();
        assert!(p.is_ready().await);
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(250), "{took:?}");
        assert!(took < Duration::from_millis(2500), "{took:?}");
        opener.abort();
    }

    #[tokio::test]
    async fn aggressive_gives_up() {
        let port = closed_port().await;
        let probes =
            parse_probes(&format!(r#"{{"tcpSocket":{{"port":{port}}}}}"#), false, 1).unwrap();
        let p = Prober::new(
            probes,
            ProberOptions {
                timing: ProbeTiming {
                    aggressive_total: Duration::from_millis(300),
                    ..FAST
                },
                http2_auto_detect: false,
            },
        );
        let started = Instant::now();
        assert!(!p.is_ready().await);
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(2),
            "{took:?}"
        );
    }

    fn paced(json: &str, interval: Duration, total: Duration) -> Prober {
        let probes = parse_probes(json, false, 1).unwrap();
        Prober::new(
            probes,
            ProberOptions {
                timing: ProbeTiming {
                    aggressive_interval: interval,
                    refused_interval: Duration::from_millis(1),
                    aggressive_attempt_timeout: Duration::from_millis(500),
                    aggressive_total: total,
                },
                http2_auto_detect: false,
            },
        )
    }

    #[test]
    fn by_default_a_refused_port_is_asked_again_at_every_timer_tick() {
        // Tokio rounds a deadline up to its next whole millisecond: a pause of 1 ms would
        // land on the tick after next, and the bench's pickup measured 2.3 ms median
        // with it against 1.8 ms with a pause below one tick.
        let timing = ProbeTiming::default();
        assert!(timing.refused_interval < Duration::from_millis(1));
        assert!(timing.refused_interval >= Duration::from_micros(100));
        assert_eq!(timing.aggressive_interval, Duration::from_millis(50));
    }

    #[tokio::test]
    async fn a_refused_connection_is_asked_again_at_once_not_at_the_interval() {
        // The interval is far longer than the test may take: the probe can only see the
        // app that starts listening 300 ms in by retrying at the refused pace.
        let port = closed_port().await;
        let p = paced(
            &format!(r#"{{"tcpSocket":{{"port":{port}}}}}"#),
            Duration::from_secs(30),
            Duration::from_secs(60),
        );
        let opener = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
            tokio::time::sleep(Duration::from_secs(20)).await;
            drop(listener);
        });
        let ready = tokio::time::timeout(Duration::from_secs(10), p.is_ready()).await;
        assert_eq!(ready, Ok(true), "not seen within 10 s with a 30 s interval");
        opener.abort();
    }

    #[tokio::test]
    async fn an_app_that_answers_not_ready_is_asked_at_the_interval() {
        // Listening but failing: the app is starting and each attempt costs it a request,
        // so the pace stays the interval's.
        let (port, seen) = http_server(Serve::H1, 503, Duration::ZERO).await;
        let p = paced(
            &format!(r#"{{"httpGet":{{"port":{port}}}}}"#),
            Duration::from_millis(200),
            Duration::from_secs(1),
        );
        assert!(!p.is_ready().await);
        let conns = seen.conns();
        assert!(
            (2..=7).contains(&conns),
            "{conns} attempts in 1 s at a 200 ms pace"
        );
    }

    #[tokio::test]
    async fn aggressive_needs_success_threshold_in_a_row() {
        let (port, seen) = http_server(Serve::H1, 200, Duration::ZERO).await;
        let p = prober(
            &format!(r#"{{"httpGet":{{"port":{port}}},"successThreshold":3}}"#),
            false,
        );
        assert!(p.is_ready().await);
        assert_eq!(seen.conns(), 3);
    }

    #[tokio::test]
    async fn periodic_probe_makes_one_attempt() {
        let (port, seen) = http_server(Serve::H1, 500, Duration::ZERO).await;
        let p = prober(
            &format!(r#"{{"httpGet":{{"port":{port}}},"periodSeconds":10}}"#),
            false,
        );
        assert!(!p.is_ready().await);
        assert_eq!(seen.conns(), 1);
    }

    #[tokio::test]
    async fn concurrent_health_checks_share_one_probe() {
        let (port, seen) = http_server(Serve::H1, 200, Duration::from_millis(150)).await;
        let p = prober(
            &format!(r#"{{"httpGet":{{"port":{port}}},"periodSeconds":1}}"#),
            false,
        );
        let checks = (0..20).map(|_| {
            let p = p.clone();
            tokio::spawn(async move { p.is_ready().await })
        });
        for ready in futures_util::future::join_all(checks).await {
            assert!(ready.unwrap());
        }
        assert_eq!(seen.conns(), 1);
        // Once settled, the next health check probes anew.
        assert!(p.is_ready().await);
        assert_eq!(seen.conns(), 2);
    }

    #[tokio::test]
    async fn abandoned_run_is_not_served_stale() {
        let (port, seen) = http_server(Serve::H1, 200, Duration::from_millis(150)).await;
        let p = prober(
            &format!(r#"{{"httpGet":{{"port":{port}}},"periodSeconds":1}}"#),
            false,
        );
        // The only waiter gives up; the run goes on by itself and finishes unobserved.
        assert!(
            tokio::time::timeout(Duration::from_millis(20), p.is_ready())
                .await
                .is_err()
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(seen.conns(), 1);
        assert!(p.is_ready().await);
        assert_eq!(seen.conns(), 2, "a later health check probes anew");
    }

    #[tokio::test]
    async fn every_probe_must_pass() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = listener.local_addr().unwrap().port();
        let down = closed_port().await;
        let both_up = prober(
            &format!(
                r#"[{{"tcpSocket":{{"port":{up}}}}},{{"tcpSocket":{{"port":{up}}},"periodSeconds":1}}]"#
            ),
            false,
        );
        assert!(both_up.is_ready().await);
        let one_down = prober(
            &format!(
                r#"[{{"tcpSocket":{{"port":{up}}},"periodSeconds":1}},{{"tcpSocket":{{"port":{down}}},"periodSeconds":1}}]"#
            ),
            false,
        );
        assert!(!one_down.is_ready().await);
    }
}
