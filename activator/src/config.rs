//! The activator's command line: flags with environment fallbacks. Every flag is
//! documented in `--help`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use thaw_shared::duration::parse_duration;
use thaw_shared::trace::{self, TracingConfig};

/// Which platform revisions and pods come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PlatformKind {
    /// One machine, no cluster: revisions from a YAML file (`--config`).
    Local,
    /// Plain Kubernetes, no Knative: Deployments annotated `thaw.dev/*`, their Services'
    /// EndpointSlices, and the built-in autoscaler writing their scale.
    Kubernetes,
    /// Knative Serving's activator: Revisions, their private and public Endpoints, and
    /// Knative's autoscaler over its stat websocket. Chosen by default when started with
    /// the env of Knative's own `activator` Deployment.
    Knative,
}

/// Parses the command line and the environment, then fills the defaults that depend on
/// where the activator runs: see [`Config::resolve`].
pub fn parse() -> Result<Config, clap::Error> {
    parse_from(std::env::args_os())
}

/// [`parse`] from given arguments (the environment is still read).
pub fn parse_from<I, T>(args: I) -> Result<Config, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::{CommandFactory, FromArgMatches};
    let matches = Config::command().try_get_matches_from(args)?;
    let mut config = Config::from_arg_matches(&matches)?;
    let given = |id: &str| {
        matches
            .value_source(id)
            .is_some_and(|s| s != clap::parser::ValueSource::DefaultValue)
    };
    let platform_given = given("platform");
    let domain_given = given("cluster_domain");
    let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    config.resolve(platform_given, domain_given, &resolv);
    Ok(config)
}

fn duration(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

/// The most `--max-local-pods` accepts: far beyond what a machine runs, small enough for
/// a semaphore.
pub const MAX_LOCAL_PODS: usize = 100_000;

/// Knative's `max-scale-up-rate` rule: a finite number greater than 1 (a rate of 1 would
/// pin the scale where it is).
fn scale_up_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if r.is_finite() && r > 1.0 => Ok(r),
        _ => Err(format!("expected a number greater than 1, got {s:?}")),
    }
}

fn max_local_pods(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_LOCAL_PODS).contains(&n) => Ok(n),
        _ => Err(format!(
            "expected a whole number from 1 to {MAX_LOCAL_PODS}, got {s:?}"
        )),
    }
}

fn worker_threads(s: &str) -> Result<usize, String> {
    let max = thaw_shared::limits::MAX_WORKER_THREADS;
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!(
            "expected a whole number from 1 to {max}, got {s:?}"
        )),
    }
}

/// `64MiB`, `512KiB`, `1GiB`, `1000000` (bytes).
pub(crate) fn bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("expected a size like 64MiB, got {s:?}"))?;
    let factor = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "KB" => 1 << 10,
        "MiB" | "M" | "MB" => 1 << 20,
        "GiB" | "G" | "GB" => 1 << 30,
        _ => return Err(format!("expected a size like 64MiB, got {s:?}")),
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Thaw's activator: buffers requests for revisions scaled to zero, asks for capacity, and
/// balances requests onto ready pods.
#[derive(Debug, Clone, Parser)]
#[command(name = "activator", version, about, long_about = None)]
pub struct Config {
    /// Where revisions and pods come from.
    #[arg(long, env = "THAW_PLATFORM", value_enum, default_value_t = PlatformKind::Local)]
    pub platform: PlatformKind,

    /// The local platform's YAML file of revisions (see deploy/local/).
    #[arg(long, env = "THAW_CONFIG")]
    pub config: Option<PathBuf>,

    /// The queue-proxy the local platform runs in front of each app. Default: a
    /// `queue-proxy` binary beside this one, else this binary as `activator queue-proxy`.
    #[arg(long, env = "THAW_QUEUE_PROXY_BIN")]
    pub queue_proxy_bin: Option<PathBuf>,

    /// Local platform: a pod being scaled down drains until it has had no request for
    /// this long (its queue-proxy's quiet period; Knative's is 30s).
    #[arg(long, env = "THAW_POD_QUIET_PERIOD", default_value = "2s", value_parser = duration)]
    pub pod_quiet_period: Duration,

    /// Local platform: the most pods it runs at once, over all revisions (each pod is an
    /// app and a queue-proxy). Default: 8 per CPU available, at least 8.
    #[arg(long, env = "THAW_MAX_LOCAL_PODS", value_parser = max_local_pods)]
    pub max_local_pods: Option<usize>,

    /// The built-in autoscaler (local and kubernetes platforms): one decision asks for at
    /// most this many times the ready pods, counting at least one (Knative's
    /// config-autoscaler `max-scale-up-rate`). Must be greater than 1.
    #[arg(long, env = "THAW_MAX_SCALE_UP_RATE", default_value_t = 1000.0, value_parser = scale_up_rate)]
    pub max_scale_up_rate: f64,

    /// Address every listener binds.
    #[arg(long, env = "THAW_LISTEN_ADDRESS", default_value = "0.0.0.0")]
    pub listen_address: IpAddr,

    /// Port for user traffic: HTTP/1.1 and h2c.
    #[arg(long, env = "THAW_HTTP_PORT", default_value_t = 8012)]
    pub http_port: u16,

    /// Port for h2c traffic (HTTP/1.1 is accepted there too).
    #[arg(long, env = "THAW_H2C_PORT", default_value_t = 8013)]
    pub h2c_port: u16,

    /// Port for Prometheus metrics (`GET /metrics`).
    #[arg(long, env = "THAW_METRICS_PORT", default_value_t = 9090)]
    pub metrics_port: u16,

    /// Knative autoscaler's websocket, e.g. ws://autoscaler.knative-serving.svc.cluster.local:8080/.
    /// When set, load is reported there every second and readiness fails while it is
    /// not connected.
    #[arg(long, env = "THAW_AUTOSCALER_URL")]
    pub autoscaler_url: Option<String>,

    /// This activator's name, sent as the Stat's pod_name.
    #[arg(long, env = "POD_NAME", default_value = "activator")]
    pub pod_name: String,

    /// This activator's IP, which places it among the activators for subsetting.
    #[arg(long, env = "POD_IP")]
    pub pod_ip: Option<IpAddr>,

    /// Kubernetes: the activators' namespace, where their Service and the Lease live.
    #[arg(long, env = "POD_NAMESPACE", default_value = "thaw-system")]
    pub system_namespace: String,

    /// Kubernetes: the activators' own Service; its EndpointSlices list every activator,
    /// for subsetting pods between them.
    #[arg(long, env = "THAW_ACTIVATOR_SERVICE", default_value = "thaw-activator")]
    pub activator_service: String,

    /// Kubernetes: the coordination.k8s.io Lease that elects the one activator running
    /// the autoscaler.
    #[arg(long, env = "THAW_LEASE_NAME", default_value = "thaw-autoscaler")]
    pub lease_name: String,

    /// Kubernetes: the port of the stat websocket the leading activator serves and the
    /// others report their load to (Knative's autoscaler port).
    #[arg(long, env = "THAW_STAT_PORT", default_value_t = 8080)]
    pub stat_port: u16,

    /// Kubernetes: watch functions in this namespace only (default: every namespace;
    /// RBAC may then be a Role instead of a ClusterRole).
    #[arg(long, env = "THAW_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,

    /// Cluster domain for `<revision>.<namespace>.svc.<domain>` hosts. On Kubernetes and
    /// Knative the default is the `svc.<domain>` entry of /etc/resolv.conf's search list,
    /// as Knative finds it, else cluster.local.
    #[arg(long, env = "CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,

    /// Knative: the namespace Knative Serving runs in (its autoscaler and config maps).
    #[arg(long, env = "SYSTEM_NAMESPACE", default_value = "knative-serving")]
    pub knative_namespace: String,

    /// Knative: the config map with the log level (`loglevel.activator`), watched.
    #[arg(long, env = "CONFIG_LOGGING_NAME", default_value = "config-logging")]
    pub config_logging_name: String,

    /// Knative: the config map with the request log switch, watched.
    #[arg(
        long,
        env = "CONFIG_OBSERVABILITY_NAME",
        default_value = "config-observability"
    )]
    pub config_observability_name: String,

    /// Requests that may wait per revision; beyond it, 503 with Retry-After.
    #[arg(long, env = "THAW_MAX_WAITING", default_value_t = 10_000)]
    pub max_waiting: usize,

    /// Body bytes that waiting requests of one revision may hold (64MiB, 512KiB, …);
    /// beyond it, 503 with Retry-After. Bodies are streamed, never read whole.
    #[arg(long, env = "THAW_BUFFER_BUDGET", default_value = "64MiB", value_parser = bytes)]
    pub buffer_budget: u64,

    /// After SIGTERM, keep serving this long (readiness failing) before stopping. Ctrl-C
    /// (SIGINT) at a terminal drains for at most 1s.
    #[arg(long, env = "THAW_DRAIN_PERIOD", default_value = "45s", value_parser = duration)]
    pub drain_period: Duration,

    /// A client must send its request headers within this time.
    #[arg(long, env = "THAW_READ_HEADER_TIMEOUT", default_value = "30s", value_parser = duration)]
    pub read_header_timeout: Duration,

    /// How often a not-yet-ready pod is probed while requests wait for its revision.
    #[arg(long, env = "THAW_EAGER_PROBE_INTERVAL", default_value = "2ms", value_parser = duration)]
    pub eager_probe_interval: Duration,

    /// Runtime threads, 1 to 1024; 1 = single-threaded. Default: the CPUs available
    /// (cgroup aware).
    #[arg(long, env = "THAW_WORKER_THREADS", value_parser = worker_threads)]
    pub worker_threads: Option<usize>,

    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, env = "THAW_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Log format: json lines, plain text, or auto (text at a terminal, else json).
    #[arg(long, env = "THAW_LOG_FORMAT", value_enum, default_value_t = LogFormatArg::Auto)]
    pub log_format: LogFormatArg,

    /// Export request spans over OTLP to this collector: http://host:port (plaintext),
    /// https://host:port (TLS, the system's roots), or host:port, which Knative reads as
    /// https://. http/protobuf takes a full URL with its path too (default /v1/traces).
    /// Unset: tracing off, unless the protocol is stdout. On the local platform the pods'
    /// queue-proxies trace to it too.
    #[arg(long, env = "THAW_TRACING_ENDPOINT")]
    pub tracing_endpoint: Option<String>,

    /// Knative's tracing protocol: http/protobuf (the default with an endpoint), grpc,
    /// stdout (one JSON line per span, every span; no endpoint) or none.
    #[arg(long, env = "THAW_TRACING_PROTOCOL")]
    pub tracing_protocol: Option<String>,

    /// The share of new traces recorded, 0 to 1; a caller's sampled `traceparent` is
    /// followed when it is below 1. stdout records every trace, as in Knative.
    #[arg(long, env = "THAW_TRACING_SAMPLING_RATE", default_value = "1")]
    pub tracing_sampling_rate: String,

    /// On the Knative platform with no tracing flag: the settings read from
    /// config-observability at start, which then stand in for the flags.
    #[arg(skip)]
    pub tracing_from_platform: Option<TracingConfig>,
}

impl Config {
    /// The tracing flags as Knative's settings; an error names the flag.
    pub fn tracing(&self) -> Result<TracingConfig, String> {
        if let Some(t) = &self.tracing_from_platform {
            return Ok(t.clone());
        }
        let endpoint = self.tracing_endpoint.clone().filter(|e| !e.is_empty());
        let protocol = self.tracing_protocol.clone().unwrap_or_else(|| {
            if endpoint.is_some() {
                "http/protobuf"
            } else {
                "none"
            }
            .to_owned()
        });
        TracingConfig::from_keys(|key| match key {
            trace::KEY_PROTOCOL => Some(protocol.clone()),
            trace::KEY_ENDPOINT => endpoint.clone(),
            trace::KEY_SAMPLING_RATE => Some(self.tracing_sampling_rate.clone()),
            _ => None,
        })
        // The flags are named as Knative's keys are.
        .map_err(|e| format!("--{e}"))
    }

    /// Whether a tracing flag (or its env) was given; without one, the Knative platform
    /// takes the settings from config-observability.
    pub fn tracing_flags_given(&self) -> bool {
        self.tracing_endpoint.is_some() || self.tracing_protocol.is_some()
    }

    /// Fills the defaults that depend on the surroundings, given which flags were set
    /// explicitly (flag or env) and the text of /etc/resolv.conf:
    /// - no `--platform`, but the env of Knative's `activator` Deployment
    ///   (`SYSTEM_NAMESPACE` and `CONFIG_LOGGING_NAME`): the Knative platform, so that
    ///   swapping the image is all a Knative user does;
    /// - on a cluster, no `CLUSTER_DOMAIN`: the domain from resolv.conf's search list;
    /// - on Knative, no `--autoscaler-url`: Knative's autoscaler Service, derived as
    ///   Knative's activator derives it.
    pub fn resolve(&mut self, platform_given: bool, domain_given: bool, resolv_conf: &str) {
        let knative_env = std::env::var_os("SYSTEM_NAMESPACE").is_some()
            && std::env::var_os("CONFIG_LOGGING_NAME").is_some();
        if !platform_given && knative_env {
            self.platform = PlatformKind::Knative;
        }
        if !domain_given && self.platform != PlatformKind::Local {
            if let Some(domain) = domain_from_resolv_conf(resolv_conf) {
                self.cluster_domain = domain;
            }
        }
        if self.platform == PlatformKind::Knative && self.autoscaler_url.is_none() {
            self.autoscaler_url = Some(crate::reporter::ReporterSettings::autoscaler_url(
                &self.knative_namespace,
                &self.cluster_domain,
            ));
        }
    }
}

/// The cluster domain in a resolv.conf: the first `svc.<domain>` of its `search` line
/// (what Knative's `network.GetClusterDomainName` reads).
pub fn domain_from_resolv_conf(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|line| line.strip_prefix("search"))
        .flat_map(str::split_whitespace)
        .find_map(|entry| entry.strip_prefix("svc."))
        .map(|d| d.trim_end_matches('.').to_owned())
        .filter(|d| !d.is_empty())
}

/// `--log-format` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormatArg {
    Json,
    Text,
    Auto,
}

impl From<LogFormatArg> for thaw_shared::logging::LogFormat {
    fn from(f: LogFormatArg) -> Self {
        match f {
            LogFormatArg::Json => Self::Json,
            LogFormatArg::Text => Self::Text,
            LogFormatArg::Auto => Self::Auto,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_knative_ports() {
        let c = Config::try_parse_from(["activator", "--config", "x.yaml"]).unwrap();
        assert_eq!(
            (c.http_port, c.h2c_port, c.metrics_port),
            (8012, 8013, 9090)
        );
        assert_eq!(c.platform, PlatformKind::Local);
        assert_eq!(c.max_waiting, 10_000);
        assert_eq!(c.buffer_budget, 64 << 20);
        assert_eq!(c.drain_period, Duration::from_secs(45));
        assert_eq!((c.max_scale_up_rate, c.max_local_pods), (1000.0, None));
    }

    #[test]
    fn cluster_domain_comes_from_the_search_list() {
        let conf = "nameserver 10.96.0.10\nsearch default.svc.corp.example svc.corp.example corp.example\noptions ndots:5\n";
        assert_eq!(
            domain_from_resolv_conf(conf).as_deref(),
            Some("corp.example")
        );
        assert_eq!(domain_from_resolv_conf("nameserver 1.1.1.1\n"), None);
        assert_eq!(domain_from_resolv_conf("search lan\n"), None);
        let mut c = Config::try_parse_from(["activator", "--platform", "knative"]).unwrap();
        c.resolve(true, false, conf);
        assert_eq!(c.cluster_domain, "corp.example");
        assert_eq!(
            c.autoscaler_url.as_deref(),
            Some("ws://autoscaler.knative-serving.svc.corp.example:8080/")
        );
        // An explicit CLUSTER_DOMAIN wins; the local platform never reads resolv.conf.
        let mut c = Config::try_parse_from(["activator", "--platform", "knative"]).unwrap();
        c.cluster_domain = "given.example".into();
        c.resolve(true, true, conf);
        assert_eq!(c.cluster_domain, "given.example");
        let mut c = Config::try_parse_from(["activator", "--config", "x.yaml"]).unwrap();
        c.resolve(true, false, conf);
        assert_eq!(c.cluster_domain, "cluster.local");
        assert_eq!(c.autoscaler_url, None);
    }

    #[test]
    fn bad_flags_are_rejected() {
        assert!(Config::try_parse_from(["activator", "--http-port", "http"]).is_err());
        assert!(Config::try_parse_from(["activator", "--platform", "mesos"]).is_err());
        assert!(Config::try_parse_from(["activator", "--buffer-budget", "lots"]).is_err());
        assert!(Config::try_parse_from(["activator", "--drain-period", "-1s"]).is_err());
        assert!(Config::try_parse_from(["activator", "--drain-period", "9000h"]).is_err());
        for threads in ["0", "100000", "18446744073709551616"] {
            assert!(
                Config::try_parse_from(["activator", "--worker-threads", threads]).is_err(),
                "{threads}"
            );
        }
        assert_eq!(
            Config::try_parse_from(["activator", "--worker-threads", "2"])
                .unwrap()
                .worker_threads,
            Some(2)
        );
        for rate in ["1", "0.5", "-3", "NaN", "inf", "fast"] {
            assert!(
                Config::try_parse_from(["activator", "--max-scale-up-rate", rate]).is_err(),
                "{rate}"
            );
        }
        for pods in ["0", "100001", "-1", "many"] {
            assert!(
                Config::try_parse_from(["activator", "--max-local-pods", pods]).is_err(),
                "{pods}"
            );
        }
        let c = Config::try_parse_from([
            "activator",
            "--max-scale-up-rate",
            "1.5",
            "--max-local-pods",
            "3",
        ])
        .unwrap();
        assert_eq!((c.max_scale_up_rate, c.max_local_pods), (1.5, Some(3)));
        assert_eq!(bytes("512KiB"), Ok(512 << 10));
        assert_eq!(bytes("7"), Ok(7));
    }
}
