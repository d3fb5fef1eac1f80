//! The queue-proxy's configuration, read from the environment Knative's controller sets
//! (CONTRACT §1.2) plus a few `THAW_*` overrides for running many queue-proxies on one
//! machine.
//!
//! Every variable is named once in [`VARS`], which also drives `--help`. Parsing takes a
//! map rather than reading the process environment, so tests never mutate global state.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use thaw_shared::duration::parse_duration;
use thaw_shared::limits::{MAX_CONTAINER_CONCURRENCY, MAX_SECONDS, MAX_WORKER_THREADS};
use thaw_shared::probe::{parse_probes, ProbeSpec};
use thaw_shared::timeout::Timeouts;
use thaw_shared::trace::TracingConfig;

use thaw_shared::tls::{TlsVersion, DEFAULT_CERT_PATH, DEFAULT_KEY_PATH};

/// One environment variable: name, whether Knative always sets it, default, meaning.
pub struct Var {
    pub name: &'static str,
    pub required: bool,
    pub default: &'static str,
    pub meaning: &'static str,
}

const fn req(name: &'static str, meaning: &'static str) -> Var {
    Var {
        name,
        required: true,
        default: "",
        meaning,
    }
}

const fn opt(name: &'static str, default: &'static str, meaning: &'static str) -> Var {
    Var {
        name,
        required: false,
        default,
        meaning,
    }
}

pub const CONTAINER_CONCURRENCY: &str = "CONTAINER_CONCURRENCY";
pub const QUEUE_SERVING_PORT: &str = "QUEUE_SERVING_PORT";
pub const QUEUE_SERVING_TLS_PORT: &str = "QUEUE_SERVING_TLS_PORT";
pub const USER_PORT: &str = "USER_PORT";
pub const REVISION_TIMEOUT_SECONDS: &str = "REVISION_TIMEOUT_SECONDS";
pub const SERVING_LOGGING_CONFIG: &str = "SERVING_LOGGING_CONFIG";
pub const SERVING_LOGGING_LEVEL: &str = "SERVING_LOGGING_LEVEL";
pub const SERVING_NAMESPACE: &str = "SERVING_NAMESPACE";
pub const SERVING_CONFIGURATION: &str = "SERVING_CONFIGURATION";
pub const SERVING_REVISION: &str = "SERVING_REVISION";
pub const SERVING_POD: &str = "SERVING_POD";
pub const SERVING_POD_IP: &str = "SERVING_POD_IP";
pub const REVISION_RESPONSE_START_TIMEOUT_SECONDS: &str = "REVISION_RESPONSE_START_TIMEOUT_SECONDS";
pub const REVISION_IDLE_TIMEOUT_SECONDS: &str = "REVISION_IDLE_TIMEOUT_SECONDS";
pub const SERVING_READINESS_PROBE: &str = "SERVING_READINESS_PROBE";
pub const ENABLE_MULTI_CONTAINER_PROBES: &str = "ENABLE_MULTI_CONTAINER_PROBES";
pub const ENABLE_HTTP2_AUTO_DETECTION: &str = "ENABLE_HTTP2_AUTO_DETECTION";
pub const ENABLE_HTTP_FULL_DUPLEX: &str = "ENABLE_HTTP_FULL_DUPLEX";
pub const SERVING_SERVICE: &str = "SERVING_SERVICE";
pub const OBSERVABILITY_CONFIG: &str = "OBSERVABILITY_CONFIG";
pub const QUEUE_PROXY_TLS_MIN_VERSION: &str = "QUEUE_PROXY_TLS_MIN_VERSION";
pub const QUEUE_PROXY_TLS_MAX_VERSION: &str = "QUEUE_PROXY_TLS_MAX_VERSION";
pub const THAW_LISTEN_ADDRESS: &str = "THAW_LISTEN_ADDRESS";
pub const THAW_ADMIN_PORT: &str = "THAW_ADMIN_PORT";
pub const THAW_METRICS_PORT: &str = "THAW_METRICS_PORT";
pub const THAW_USER_METRICS_PORT: &str = "THAW_USER_METRICS_PORT";
pub const THAW_DRAIN_QUIET_PERIOD: &str = "THAW_DRAIN_QUIET_PERIOD";
pub const THAW_READ_HEADER_TIMEOUT: &str = "THAW_READ_HEADER_TIMEOUT";
pub const THAW_TLS_CERT_FILE: &str = "THAW_TLS_CERT_FILE";
pub const THAW_TLS_KEY_FILE: &str = "THAW_TLS_KEY_FILE";
pub const THAW_WORKER_THREADS: &str = "THAW_WORKER_THREADS";
pub const THAW_AGGRESSIVE_PROBE_INTERVAL: &str = "THAW_AGGRESSIVE_PROBE_INTERVAL";
pub const THAW_UPSTREAM_QUICK_ACK: &str = "THAW_UPSTREAM_QUICK_ACK";
pub use crate::listen_fds::THAW_LISTEN_FDS;
pub use thaw_shared::lifeline::THAW_PARENT_PID;

/// Every variable the queue-proxy reads, in `--help` order.
pub const VARS: &[Var] = &[
    req(CONTAINER_CONCURRENCY, "requests the app may run at once; 0 = unlimited (no breaker)"),
    req(QUEUE_SERVING_PORT, "port for user traffic, HTTP/1.1 and h2c (Knative: 8012, 8013 for h2c revisions)"),
    req(QUEUE_SERVING_TLS_PORT, "port for user traffic over TLS, opened only when the certificate files exist (Knative: 8112)"),
    req(USER_PORT, "the app's port; requests go to 127.0.0.1:USER_PORT"),
    req(REVISION_TIMEOUT_SECONDS, "total time a request may take, in seconds; 0 = none"),
    req(SERVING_LOGGING_CONFIG, "Knative's zap logging config (JSON); may be empty"),
    req(SERVING_LOGGING_LEVEL, "log level: debug, info, warn or error; empty = info (RUST_LOG overrides)"),
    req(SERVING_NAMESPACE, "namespace of the revision (metric label)"),
    req(SERVING_CONFIGURATION, "configuration of the revision (metric label)"),
    req(SERVING_REVISION, "revision name (metric label)"),
    req(SERVING_POD, "pod name; sent to the autoscaler as Stat.pod_name"),
    req(SERVING_POD_IP, "pod IP"),
    opt(REVISION_RESPONSE_START_TIMEOUT_SECONDS, "0", "seconds until the response must start; 0 = off"),
    opt(REVISION_IDLE_TIMEOUT_SECONDS, "0", "seconds a response may go without writing a byte; 0 = off"),
    opt(SERVING_READINESS_PROBE, "", "readiness probe of the app: a Kubernetes Probe as JSON (an array with multi-container probes); empty = always ready"),
    opt(ENABLE_MULTI_CONTAINER_PROBES, "false", "SERVING_READINESS_PROBE holds a JSON array of probes; all must pass"),
    opt(ENABLE_HTTP2_AUTO_DETECTION, "false", "the HTTP readiness probe tries h2c before HTTP/1.1"),
    opt(ENABLE_HTTP_FULL_DUPLEX, "false", "accepted for compatibility; bodies always stream both ways at once"),
    opt(SERVING_SERVICE, "", "service name (informational)"),
    opt(OBSERVABILITY_CONFIG, "", "JSON; {\"enableRequestLog\": true} logs one line per request"),
    opt(QUEUE_PROXY_TLS_MIN_VERSION, "1.3", "minimum TLS version on the TLS port: 1.2 or 1.3"),
    opt(QUEUE_PROXY_TLS_MAX_VERSION, "", "maximum TLS version on the TLS port: 1.2 or 1.3; empty = newest"),
    opt(THAW_LISTEN_ADDRESS, "0.0.0.0", "[thaw] address every listener binds (127.0.0.1 when many run on one machine)"),
    opt(THAW_ADMIN_PORT, "8022", "[thaw] admin port (/wait-for-drain); 0 = any free port"),
    opt(THAW_METRICS_PORT, "9090", "[thaw] autoscaler metrics port; 0 = any free port"),
    opt(THAW_USER_METRICS_PORT, "9091", "[thaw] Prometheus user metrics port; 0 = any free port"),
    opt(THAW_DRAIN_QUIET_PERIOD, "30s", "[thaw] after SIGTERM, stop once no request came for this long"),
    opt(THAW_READ_HEADER_TIMEOUT, "30s", "[thaw] a client must send its request headers within this time"),
    opt(THAW_TLS_CERT_FILE, DEFAULT_CERT_PATH, "[thaw] TLS certificate (PEM); re-read when it changes"),
    opt(THAW_TLS_KEY_FILE, DEFAULT_KEY_PATH, "[thaw] TLS private key (PEM); re-read when it changes"),
    opt(THAW_WORKER_THREADS, "1", "[thaw] runtime threads; 1 = a single-threaded runtime, the best fit for a sidecar"),
    opt(THAW_AGGRESSIVE_PROBE_INTERVAL, "50ms", "[thaw] pace of readiness probes with periodSeconds 0 (Knative: 50ms); shorter picks up a starting app sooner"),
    opt(THAW_UPSTREAM_QUICK_ACK, "true", "[thaw] acknowledge the app's bytes at once (TCP_QUICKACK), so an app that writes head and body apart with Nagle on is not held 40 ms by a delayed ACK"),
    opt(THAW_LISTEN_FDS, "", "[thaw] listening sockets inherited from the parent as listener=fd pairs (serving, tls, admin, metrics, user-metrics), used instead of binding those ports"),
    opt(THAW_PARENT_PID, "", "[thaw] pid of the process that started this one (the local platform's activator): the queue-proxy is killed when it dies, and does not start if it is gone"),
];

/// A variable is missing or its value cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("missing required environment variable {0}")]
    Missing(&'static str),
    #[error("{var}: {problem}")]
    Invalid { var: &'static str, problem: String },
}

/// What `OBSERVABILITY_CONFIG` switches on.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observability {
    pub request_log: bool,
    pub probe_request_log: bool,
    /// Its `tracing` object (knative.dev/pkg `observability.Config`).
    pub tracing: TracingConfig,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub container_concurrency: usize,
    pub serving_port: u16,
    pub tls_port: u16,
    pub user_port: u16,
    pub timeouts: Timeouts,
    pub logging_level: String,
    pub namespace: String,
    pub configuration: String,
    pub revision: String,
    pub pod: String,
    pub pod_ip: String,
    pub readiness_probes: Vec<ProbeSpec>,
    pub http2_auto_detect: bool,
    pub observability: Observability,
    pub tls_min_version: TlsVersion,
    pub tls_max_version: Option<TlsVersion>,
    pub listen_address: IpAddr,
    pub admin_port: u16,
    pub metrics_port: u16,
    pub user_metrics_port: u16,
    pub drain_quiet_period: Duration,
    pub read_header_timeout: Duration,
    pub tls_cert_file: PathBuf,
    pub tls_key_file: PathBuf,
    pub worker_threads: Option<usize>,
    pub aggressive_probe_interval: Duration,
    /// `TCP_QUICKACK` on the connections to the app (`thaw_shared::quickack`).
    pub upstream_quick_ack: bool,
    /// Listeners inherited from the parent process, by descriptor number.
    pub listen_fds: Vec<(crate::listen_fds::Listener, std::os::fd::RawFd)>,
    /// The process this one must not outlive.
    pub parent_pid: Option<i32>,
}

/// Reads variables from a map, naming the variable in every error.
struct Env<'a>(&'a HashMap<String, String>);

impl Env<'_> {
    fn required(&self, var: &'static str) -> Result<&str, ConfigError> {
        self.0
            .get(var)
            .map(String::as_str)
            .ok_or(ConfigError::Missing(var))
    }

    fn optional(&self, var: &'static str) -> Option<&str> {
        self.0
            .get(var)
            .map(String::as_str)
            .filter(|v| !v.trim().is_empty())
    }

    fn parse<T: std::str::FromStr>(
        var: &'static str,
        value: &str,
        expected: &str,
    ) -> Result<T, ConfigError> {
        value.trim().parse().map_err(|_| ConfigError::Invalid {
            var,
            problem: format!("expected {expected}, got {value:?}"),
        })
    }

    fn required_port(&self, var: &'static str) -> Result<u16, ConfigError> {
        Self::parse(var, self.required(var)?, "a port number 0-65535")
    }

    fn optional_port(&self, var: &'static str, default: u16) -> Result<u16, ConfigError> {
        self.optional(var).map_or(Ok(default), |v| {
            Self::parse(var, v, "a port number 0-65535")
        })
    }

    /// A whole number from 0 to `max`; anything else names the variable and the range.
    fn bounded(var: &'static str, value: &str, max: u64, what: &str) -> Result<u64, ConfigError> {
        let expected = || format!("expected {what} from 0 to {max}, got {value:?}");
        let n: u64 = value.trim().parse().map_err(|_| ConfigError::Invalid {
            var,
            problem: expected(),
        })?;
        if n > max {
            return Err(ConfigError::Invalid {
                var,
                problem: expected(),
            });
        }
        Ok(n)
    }

    fn seconds(&self, var: &'static str, value: Option<&str>) -> Result<u64, ConfigError> {
        value.map_or(Ok(0), |v| {
            Self::bounded(var, v, MAX_SECONDS, "a whole number of seconds")
        })
    }

    fn flag(&self, var: &'static str) -> Result<bool, ConfigError> {
        self.flag_or(var, false)
    }

    fn flag_or(&self, var: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.optional(var).map(|v| v.trim().to_ascii_lowercase()) {
            None => Ok(default),
            Some(v) if v == "true" || v == "1" => Ok(true),
            Some(v) if v == "false" || v == "0" => Ok(false),
            Some(v) => Err(ConfigError::Invalid {
                var,
                problem: format!("expected true or false, got {v:?}"),
            }),
        }
    }

    fn duration(&self, var: &'static str, default: Duration) -> Result<Duration, ConfigError> {
        self.optional(var).map_or(Ok(default), |v| {
            parse_duration(v).map_err(|e| ConfigError::Invalid {
                var,
                problem: e.to_string(),
            })
        })
    }

    fn tls_version(&self, var: &'static str) -> Result<Option<TlsVersion>, ConfigError> {
        self.optional(var)
            .map(|v| {
                v.parse()
                    .map_err(|e: thaw_shared::tls::TlsError| ConfigError::Invalid {
                        var,
                        problem: e.to_string(),
                    })
            })
            .transpose()
    }
}

impl Config {
    /// Reads the configuration from the process environment.
    pub fn from_process_env() -> Result<Self, ConfigError> {
        Self::from_env(&std::env::vars().collect())
    }

    /// Reads the configuration from a map of variables.
    pub fn from_env(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let env = Env(vars);
        let container_concurrency = Env::bounded(
            CONTAINER_CONCURRENCY,
            env.required(CONTAINER_CONCURRENCY)?,
            MAX_CONTAINER_CONCURRENCY,
            "a whole number",
        )?;
        // Bounded above, so it fits any usize this runs on.
        let container_concurrency = usize::try_from(container_concurrency).unwrap_or(usize::MAX);
        let serving_port = env.required_port(QUEUE_SERVING_PORT)?;
        let tls_port = env.required_port(QUEUE_SERVING_TLS_PORT)?;
        let user_port: u16 = env.required_port(USER_PORT)?;
        if user_port == 0 {
            return Err(ConfigError::Invalid {
                var: USER_PORT,
                problem: "expected a port number 1-65535, got \"0\"".into(),
            });
        }
        let total = env.seconds(
            REVISION_TIMEOUT_SECONDS,
            Some(env.required(REVISION_TIMEOUT_SECONDS)?),
        )?;
        // Knative sets these even when unused; they must be present but may be empty.
        env.required(SERVING_LOGGING_CONFIG)?;
        let logging_level = env
            .required(SERVING_LOGGING_LEVEL)?
            .trim()
            .to_ascii_lowercase();
        if !matches!(
            logging_level.as_str(),
            "" | "debug" | "info" | "warn" | "warning" | "error" | "dpanic" | "panic" | "fatal"
        ) {
            return Err(ConfigError::Invalid {
                var: SERVING_LOGGING_LEVEL,
                problem: format!("expected debug, info, warn or error, got {logging_level:?}"),
            });
        }
        let namespace = env.required(SERVING_NAMESPACE)?.to_owned();
        let configuration = env.required(SERVING_CONFIGURATION)?.to_owned();
        let revision = env.required(SERVING_REVISION)?.to_owned();
        let pod = env.required(SERVING_POD)?.to_owned();
        let pod_ip = env.required(SERVING_POD_IP)?.to_owned();

        let response_start = env.seconds(
            REVISION_RESPONSE_START_TIMEOUT_SECONDS,
            env.optional(REVISION_RESPONSE_START_TIMEOUT_SECONDS),
        )?;
        let idle = env.seconds(
            REVISION_IDLE_TIMEOUT_SECONDS,
            env.optional(REVISION_IDLE_TIMEOUT_SECONDS),
        )?;

        let multi = env.flag(ENABLE_MULTI_CONTAINER_PROBES)?;
        let readiness_probes = match env.optional(SERVING_READINESS_PROBE) {
            None => Vec::new(),
            Some(json) => {
                parse_probes(json, multi, user_port).map_err(|e| ConfigError::Invalid {
                    var: SERVING_READINESS_PROBE,
                    problem: e.to_string(),
                })?
            }
        };
        let observability = parse_observability(env.optional(OBSERVABILITY_CONFIG))?;

        let tls_min_version = env
            .tls_version(QUEUE_PROXY_TLS_MIN_VERSION)?
            .unwrap_or(TlsVersion::V1_3);
        let tls_max_version = env.tls_version(QUEUE_PROXY_TLS_MAX_VERSION)?;
        if tls_max_version.is_some_and(|max| max < tls_min_version) {
            return Err(ConfigError::Invalid {
                var: QUEUE_PROXY_TLS_MAX_VERSION,
                problem: format!("below the minimum version {tls_min_version}"),
            });
        }

        let listen_address = match env.optional(THAW_LISTEN_ADDRESS) {
            None => IpAddr::from([0, 0, 0, 0]),
            Some(v) => Env::parse(THAW_LISTEN_ADDRESS, v, "an IP address")?,
        };
        let worker_threads = match env.optional(THAW_WORKER_THREADS) {
            None => None,
            Some(v) => {
                let max = MAX_WORKER_THREADS as u64;
                match Env::bounded(THAW_WORKER_THREADS, v, max, "a whole number")? {
                    0 => {
                        return Err(ConfigError::Invalid {
                            var: THAW_WORKER_THREADS,
                            problem: format!("expected a whole number from 1 to {max}, got \"0\""),
                        })
                    }
                    n => Some(n as usize),
                }
            }
        };

        Ok(Config {
            container_concurrency,
            serving_port,
            tls_port,
            user_port,
            timeouts: Timeouts::from_secs(total, response_start, idle),
            logging_level,
            namespace,
            configuration,
            revision,
            pod,
            pod_ip,
            readiness_probes,
            http2_auto_detect: env.flag(ENABLE_HTTP2_AUTO_DETECTION)?,
            upstream_quick_ack: env.flag_or(THAW_UPSTREAM_QUICK_ACK, true)?,
            observability,
            tls_min_version,
            tls_max_version,
            listen_address,
            admin_port: env.optional_port(THAW_ADMIN_PORT, 8022)?,
            metrics_port: env.optional_port(THAW_METRICS_PORT, 9090)?,
            user_metrics_port: env.optional_port(THAW_USER_METRICS_PORT, 9091)?,
            drain_quiet_period: env.duration(THAW_DRAIN_QUIET_PERIOD, Duration::from_secs(30))?,
            read_header_timeout: env.duration(THAW_READ_HEADER_TIMEOUT, Duration::from_secs(30))?,
            tls_cert_file: env
                .optional(THAW_TLS_CERT_FILE)
                .unwrap_or(DEFAULT_CERT_PATH)
                .into(),
            tls_key_file: env
                .optional(THAW_TLS_KEY_FILE)
                .unwrap_or(DEFAULT_KEY_PATH)
                .into(),
            worker_threads,
            aggressive_probe_interval: {
                let d = env.duration(THAW_AGGRESSIVE_PROBE_INTERVAL, Duration::from_millis(50))?;
                if d.is_zero() {
                    return Err(ConfigError::Invalid {
                        var: THAW_AGGRESSIVE_PROBE_INTERVAL,
                        problem: "must be greater than 0".into(),
                    });
                }
                d
            },
            parent_pid: env
                .optional(THAW_PARENT_PID)
                .map(|v| {
                    thaw_shared::lifeline::parse_parent_pid(v).map_err(|problem| {
                        ConfigError::Invalid {
                            var: THAW_PARENT_PID,
                            problem,
                        }
                    })
                })
                .transpose()?,
            listen_fds: match env.optional(THAW_LISTEN_FDS) {
                None => Vec::new(),
                Some(v) => crate::listen_fds::parse(v).map_err(|problem| ConfigError::Invalid {
                    var: THAW_LISTEN_FDS,
                    problem,
                })?,
            },
        })
    }
}

/// Knative's observability config is JSON; the request-log switches and the tracing
/// settings matter here, and unknown keys are ignored so newer controllers keep working.
fn parse_observability(json: Option<&str>) -> Result<Observability, ConfigError> {
    let Some(json) = json else {
        return Ok(Observability::default());
    };
    let invalid = |problem: String| ConfigError::Invalid {
        var: OBSERVABILITY_CONFIG,
        problem,
    };
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| invalid(format!("invalid JSON: {e}")))?;
    let obj = value
        .as_object()
        .ok_or_else(|| invalid("expected a JSON object".into()))?;
    let flag = |key: &str| -> Result<bool, ConfigError> {
        match obj.get(key) {
            None | Some(serde_json::Value::Null) => Ok(false),
            Some(serde_json::Value::Bool(b)) => Ok(*b),
            Some(serde_json::Value::String(s)) if s == "true" || s == "false" => Ok(s == "true"),
            Some(other) => Err(invalid(format!(
                "{key}: expected true or false, got {other}"
            ))),
        }
    };
    // Only `enableRequestLog` switches the log on, as in Knative's queue-proxy
    // (`pkg/queue/sharedmain/handlers.go`); a template alone does not.
    let tracing = TracingConfig::from_observability_json(obj.get("tracing"))
        .map_err(|e| invalid(e.to_string()))?;
    Ok(Observability {
        request_log: flag("enableRequestLog")?,
        probe_request_log: flag("enableProbeRequestLog")?,
        tracing,
    })
}

/// The `--help` text: every variable with its meaning and default.
pub fn help() -> String {
    let mut out = String::from(
        "queue-proxy: Thaw's Knative-compatible sidecar.\n\n\
         It is configured only by environment variables, as Knative's controller sets them.\n\
         Required variables must be present (they may be empty only where noted).\n\n",
    );
    for v in VARS {
        let default = if v.required {
            "required".to_owned()
        } else if v.default.is_empty() {
            "default: empty".to_owned()
        } else {
            format!("default: {}", v.default)
        };
        out.push_str(&format!(
            "  {:<41} {}\n  {:<41} ({default})\n",
            v.name, v.meaning, ""
        ));
    }
    out.push_str("\nRUST_LOG, when set, overrides SERVING_LOGGING_LEVEL.\n");
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The environment Knative's controller gives a queue-proxy, with test ports.
    pub fn knative_env() -> HashMap<String, String> {
        [
            (CONTAINER_CONCURRENCY, "10"),
            (QUEUE_SERVING_PORT, "8012"),
            (QUEUE_SERVING_TLS_PORT, "8112"),
            (USER_PORT, "8080"),
            (REVISION_TIMEOUT_SECONDS, "300"),
            (SERVING_LOGGING_CONFIG, ""),
            (SERVING_LOGGING_LEVEL, "info"),
            (SERVING_NAMESPACE, "default"),
            (SERVING_CONFIGURATION, "hello"),
            (SERVING_REVISION, "hello-00001"),
            (SERVING_POD, "hello-00001-deployment-abc"),
            (SERVING_POD_IP, "10.0.0.5"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    fn with(extra: &[(&str, &str)]) -> HashMap<String, String> {
        let mut env = knative_env();
        for (k, v) in extra {
            env.insert((*k).to_owned(), (*v).to_owned());
        }
        env
    }

    #[test]
    fn knative_environment_parses_with_knative_defaults() {
        let c = Config::from_env(&knative_env()).unwrap();
        assert_eq!(c.container_concurrency, 10);
        assert_eq!(c.user_port, 8080);
        assert_eq!(c.timeouts, Timeouts::from_secs(300, 0, 0));
        assert_eq!(
            (c.admin_port, c.metrics_port, c.user_metrics_port),
            (8022, 9090, 9091)
        );
        assert_eq!(c.listen_address, IpAddr::from([0, 0, 0, 0]));
        assert_eq!(c.drain_quiet_period, Duration::from_secs(30));
        assert_eq!(c.tls_min_version, TlsVersion::V1_3);
        assert!(c.readiness_probes.is_empty());
        assert!(!c.observability.request_log);
    }

    #[test]
    fn every_required_variable_is_named_when_missing() {
        for var in VARS.iter().filter(|v| v.required) {
            let mut env = knative_env();
            env.remove(var.name);
            let err = Config::from_env(&env).unwrap_err();
            assert_eq!(err, ConfigError::Missing(var.name));
            assert_eq!(
                err.to_string(),
                format!("missing required environment variable {}", var.name)
            );
        }
    }

    #[test]
    fn bad_values_name_the_variable() {
        let cases: &[(&str, &str)] = &[
            (CONTAINER_CONCURRENCY, "-1"),
            (CONTAINER_CONCURRENCY, ""),
            (QUEUE_SERVING_PORT, "70000"),
            (USER_PORT, "0"),
            (REVISION_TIMEOUT_SECONDS, "ten"),
            (SERVING_LOGGING_LEVEL, "loud"),
            (REVISION_IDLE_TIMEOUT_SECONDS, "1.5"),
            (ENABLE_MULTI_CONTAINER_PROBES, "yes please"),
            (OBSERVABILITY_CONFIG, "{not json"),
            (QUEUE_PROXY_TLS_MIN_VERSION, "1.1"),
            (THAW_DRAIN_QUIET_PERIOD, "soon"),
            (THAW_LISTEN_ADDRESS, "localhost"),
            (THAW_WORKER_THREADS, "0"),
            (THAW_WORKER_THREADS, "100000"),
            (CONTAINER_CONCURRENCY, "18446744073709551615"),
            (CONTAINER_CONCURRENCY, "1000001"),
            (REVISION_TIMEOUT_SECONDS, "18446744073709551615"),
            (REVISION_RESPONSE_START_TIMEOUT_SECONDS, "31536001"),
            (REVISION_IDLE_TIMEOUT_SECONDS, "99999999999"),
            (THAW_DRAIN_QUIET_PERIOD, "9000h"),
            (THAW_LISTEN_FDS, "serving=1"),
            (THAW_LISTEN_FDS, "web=7"),
            (THAW_PARENT_PID, "1"),
            (THAW_UPSTREAM_QUICK_ACK, "sometimes"),
            (
                SERVING_READINESS_PROBE,
                "{\"tcpSocket\":{\"port\":\"http\"}}",
            ),
        ];
        for (var, value) in cases {
            let err = Config::from_env(&with(&[(var, value)])).unwrap_err();
            let text = err.to_string();
            assert!(
                text.starts_with(&format!("{var}: ")),
                "{var}={value:?} gave {text:?}"
            );
        }
    }

    #[test]
    fn probe_error_names_the_field() {
        let err = Config::from_env(&with(&[(
            SERVING_READINESS_PROBE,
            "{\"httpGet\":{\"port\":\"http\"}}",
        )]))
        .unwrap_err()
        .to_string();
        assert!(err.contains("httpGet.port"), "{err}");
    }

    #[test]
    fn thaw_overrides_apply() {
        let c = Config::from_env(&with(&[
            (THAW_LISTEN_ADDRESS, "127.0.0.1"),
            (THAW_ADMIN_PORT, "0"),
            (THAW_DRAIN_QUIET_PERIOD, "500ms"),
            (REVISION_RESPONSE_START_TIMEOUT_SECONDS, "5"),
            (
                OBSERVABILITY_CONFIG,
                "{\"enableRequestLog\":true,\"tracing\":{}}",
            ),
            (SERVING_READINESS_PROBE, "{\"tcpSocket\":{\"port\":8080}}"),
        ]))
        .unwrap();
        assert_eq!(c.listen_address, IpAddr::from([127, 0, 0, 1]));
        assert_eq!(c.admin_port, 0);
        assert_eq!(c.drain_quiet_period, Duration::from_millis(500));
        assert_eq!(c.timeouts.response_start, Some(Duration::from_secs(5)));
        assert!(c.observability.request_log);
        assert_eq!(c.readiness_probes.len(), 1);
    }

    #[test]
    fn a_request_log_template_alone_does_not_switch_the_log_on() {
        let observability = |json: &str| {
            Config::from_env(&with(&[(OBSERVABILITY_CONFIG, json)]))
                .unwrap()
                .observability
                .request_log
        };
        let template = r#"{"requestLogTemplate":"{{.Request.Method}}"}"#;
        assert!(!observability(template));
        assert!(observability(
            r#"{"requestLogTemplate":"{{.Request.Method}}","enableRequestLog":true}"#
        ));
    }

    #[test]
    fn help_lists_every_variable() {
        let h = help();
        for v in VARS {
            assert!(h.contains(v.name), "{} missing from --help", v.name);
        }
    }
}
