//! The `thaw.dev/*` annotations a Deployment opts in with on plain Kubernetes, parsed
//! into typed settings. Both the activator (routing, timeouts, scaling) and the injector
//! (the sidecar's env) read them, so their names, defaults and errors live here once.
//!
//! Defaults are Knative's (`config-autoscaler`, `config-defaults`), so a function behaves
//! the same whether Knative or Thaw's standalone platform runs it.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::duration::parse_duration;
use crate::timeout::Timeouts;

/// The prefix every Thaw annotation and label shares.
pub const PREFIX: &str = "thaw.dev/";
/// Comma-separated `Host` values routed to the function.
pub const HOSTS: &str = "thaw.dev/hosts";
/// The Service whose EndpointSlices list the function's pods (default: the Deployment's name).
pub const SERVICE: &str = "thaw.dev/service";
/// Requests one pod may run at once; 0 = unlimited.
pub const CONTAINER_CONCURRENCY: &str = "thaw.dev/container-concurrency";
/// Pods kept with no traffic.
pub const MIN_SCALE: &str = "thaw.dev/min-scale";
/// Upper bound on pods; 0 = unbounded.
pub const MAX_SCALE: &str = "thaw.dev/max-scale";
/// Concurrency per pod to aim for.
pub const TARGET: &str = "thaw.dev/target";
/// The window whose average drives scaling, as a duration (`60s`).
pub const STABLE_WINDOW: &str = "thaw.dev/stable-window";
/// How long the last pod stays once demand is zero, as a duration (`30s`).
pub const SCALE_TO_ZERO_GRACE_PERIOD: &str = "thaw.dev/scale-to-zero-grace-period";
/// Revision timeout in seconds.
pub const TIMEOUT_SECONDS: &str = "thaw.dev/timeout-seconds";
/// Time to the first response byte, in seconds; 0 = none.
pub const RESPONSE_START_TIMEOUT_SECONDS: &str = "thaw.dev/response-start-timeout-seconds";
/// Longest silence on a response, in seconds; 0 = none.
pub const IDLE_TIMEOUT_SECONDS: &str = "thaw.dev/idle-timeout-seconds";
/// The pod-template label that asks for the sidecar.
pub const INJECT_LABEL: &str = "thaw.dev/inject";
/// The value of [`INJECT_LABEL`] that opts in.
pub const INJECT_ENABLED: &str = "enabled";

/// Every annotation above, for documentation and for spotting typos.
pub const ALL: [&str; 11] = [
    HOSTS,
    SERVICE,
    CONTAINER_CONCURRENCY,
    MIN_SCALE,
    MAX_SCALE,
    TARGET,
    STABLE_WINDOW,
    SCALE_TO_ZERO_GRACE_PERIOD,
    TIMEOUT_SECONDS,
    RESPONSE_START_TIMEOUT_SECONDS,
    IDLE_TIMEOUT_SECONDS,
];

/// Knative's `revision-timeout-seconds` default.
pub const DEFAULT_TIMEOUT_SECONDS: u64 = 300;
/// Knative's `container-concurrency-target-default`, used when CC = 0.
pub const DEFAULT_TARGET: f64 = 100.0;
/// Knative's `container-concurrency-target-percentage`: with CC > 0 the target is CC × this.
pub const TARGET_UTILIZATION: f64 = 0.7;
/// Knative's `stable-window`.
pub const DEFAULT_STABLE_WINDOW: Duration = Duration::from_secs(60);
/// Knative's `scale-to-zero-grace-period`.
pub const DEFAULT_SCALE_TO_ZERO_GRACE_PERIOD: Duration = Duration::from_secs(30);
use crate::limits::MAX_SECONDS;

/// One annotation could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("annotation {name}: {reason} (got {value:?})")]
pub struct AnnotationError {
    pub name: &'static str,
    pub value: String,
    pub reason: String,
}

/// A function's settings, from its annotations.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionSettings {
    pub hosts: Vec<String>,
    /// `None`: the Deployment's own name.
    pub service: Option<String>,
    pub container_concurrency: usize,
    pub min_scale: u32,
    pub max_scale: u32,
    pub target: f64,
    pub stable_window: Duration,
    pub scale_to_zero_grace_period: Duration,
    pub timeouts: Timeouts,
    /// The same timeouts in whole seconds, as the queue-proxy's env carries them.
    pub timeout_seconds: u64,
    pub response_start_timeout_seconds: u64,
    pub idle_timeout_seconds: u64,
}

/// Whether an object's annotations ask Thaw to serve it.
pub fn opted_in(annotations: &BTreeMap<String, String>) -> bool {
    annotations.keys().any(|k| k.starts_with(PREFIX))
}

impl FunctionSettings {
    /// Parses every `thaw.dev/*` annotation; absent ones take Knative's defaults. The first
    /// bad one is the error, named with its value.
    pub fn from_annotations(
        annotations: &BTreeMap<String, String>,
    ) -> Result<Self, AnnotationError> {
        let get = |name: &'static str| annotations.get(name).map(|v| (name, v.trim()));
        let hosts = get(HOSTS).map_or_else(Vec::new, |(_, v)| {
            v.split(',')
                .map(|h| h.trim().to_ascii_lowercase())
                .filter(|h| !h.is_empty())
                .collect()
        });
        if let Some(bad) = hosts.iter().find(|h| !crate::names::is_host(h)) {
            return Err(error(HOSTS, bad, "not a host name"));
        }
        let service = match get(SERVICE) {
            Some((_, "")) => None,
            Some((name, v)) if !is_dns_label(v) => {
                return Err(error(name, v, "not a Service name (a DNS label)"))
            }
            other => other.map(|(_, v)| v.to_owned()),
        };
        let cc = get(CONTAINER_CONCURRENCY)
            .map(|(n, v)| count(n, v, crate::limits::MAX_CONTAINER_CONCURRENCY))
            .transpose()?
            .unwrap_or(0);
        let scale = |name| {
            get(name)
                .map(|(n, v)| count(n, v, u64::from(u32::MAX)))
                .transpose()
                .map(|v| v.unwrap_or(0) as u32)
        };
        let (min_scale, max_scale) = (scale(MIN_SCALE)?, scale(MAX_SCALE)?);
        if max_scale > 0 && min_scale > max_scale {
            return Err(error(
                MAX_SCALE,
                &max_scale.to_string(),
                &format!("below {MIN_SCALE} {min_scale}"),
            ));
        }
        let target = match get(TARGET) {
            Some((n, v)) => match v.parse::<f64>() {
                Ok(t) if (0.01..=1e9).contains(&t) => t,
                _ => return Err(error(n, v, "expected a number between 0.01 and 1e9")),
            },
            None if cc > 0 => (cc as f64 * TARGET_UTILIZATION).max(1.0),
            None => DEFAULT_TARGET,
        };
        let window = |name, default, min: Duration| {
            get(name)
                .map(|(n, v)| {
                    let d = parse_duration(v).map_err(|e| error(n, v, &e.to_string()))?;
                    if d < min || d > Duration::from_secs(MAX_SECONDS) {
                        return Err(error(
                            n,
                            v,
                            &format!("must be between {min:?} and {MAX_SECONDS}s"),
                        ));
                    }
                    Ok(d)
                })
                .transpose()
                .map(|d| d.unwrap_or(default))
        };
        // Knative requires at least 6 s; a shorter window cannot average anything. The
        // grace period may be zero.
        let stable_window = window(STABLE_WINDOW, DEFAULT_STABLE_WINDOW, Duration::from_secs(1))?;
        let scale_to_zero_grace_period = window(
            SCALE_TO_ZERO_GRACE_PERIOD,
            DEFAULT_SCALE_TO_ZERO_GRACE_PERIOD,
            Duration::ZERO,
        )?;
        let seconds = |name, default| {
            get(name)
                .map(|(n, v)| count(n, v, MAX_SECONDS))
                .transpose()
                .map(|v| v.unwrap_or(default))
        };
        let timeout_seconds = seconds(TIMEOUT_SECONDS, DEFAULT_TIMEOUT_SECONDS)?;
        let response_start_timeout_seconds = seconds(RESPONSE_START_TIMEOUT_SECONDS, 0)?;
        let idle_timeout_seconds = seconds(IDLE_TIMEOUT_SECONDS, 0)?;
        Ok(Self {
            hosts,
            service,
            container_concurrency: cc as usize,
            min_scale,
            max_scale,
            target,
            stable_window,
            scale_to_zero_grace_period,
            timeouts: Timeouts::from_secs(
                timeout_seconds,
                response_start_timeout_seconds,
                idle_timeout_seconds,
            ),
            timeout_seconds,
            response_start_timeout_seconds,
            idle_timeout_seconds,
        })
    }
}

fn error(name: &'static str, value: &str, reason: &str) -> AnnotationError {
    AnnotationError {
        name,
        value: value.to_owned(),
        reason: reason.to_owned(),
    }
}

/// A whole number from 0 to `max`.
fn count(name: &'static str, value: &str, max: u64) -> Result<u64, AnnotationError> {
    match value.parse::<u64>() {
        Ok(n) if n <= max => Ok(n),
        Ok(_) => Err(error(name, value, &format!("must be at most {max}"))),
        Err(_) => Err(error(name, value, "expected a whole number >= 0")),
    }
}

/// RFC 1123 label: what a Service name must be.
fn is_dns_label(s: &str) -> bool {
    crate::names::is_dns1035_label(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<FunctionSettings, AnnotationError> {
        let map = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        FunctionSettings::from_annotations(&map)
    }

    #[test]
    fn defaults_are_knatives() {
        let s = parse(&[(HOSTS, "Hello.Example.com, api.example.com,")]).unwrap();
        assert_eq!(s.hosts, ["hello.example.com", "api.example.com"]);
        assert_eq!(s.service, None);
        assert_eq!(s.container_concurrency, 0);
        assert_eq!((s.min_scale, s.max_scale), (0, 0));
        assert_eq!(s.target, 100.0);
        assert_eq!(s.stable_window, Duration::from_secs(60));
        assert_eq!(s.scale_to_zero_grace_period, Duration::from_secs(30));
        assert_eq!(s.timeouts, Timeouts::from_secs(300, 0, 0));
    }

    #[test]
    fn every_annotation_is_read() {
        let s = parse(&[
            (SERVICE, "hello-svc"),
            (CONTAINER_CONCURRENCY, "4"),
            (MIN_SCALE, "1"),
            (MAX_SCALE, "5"),
            (STABLE_WINDOW, "6s"),
            (SCALE_TO_ZERO_GRACE_PERIOD, "0s"),
            (TIMEOUT_SECONDS, "30"),
            (RESPONSE_START_TIMEOUT_SECONDS, "10"),
            (IDLE_TIMEOUT_SECONDS, "20"),
        ])
        .unwrap();
        assert_eq!(s.service.as_deref(), Some("hello-svc"));
        assert_eq!(s.container_concurrency, 4);
        // CC × 70 %, as Knative.
        assert!((s.target - 2.8).abs() < 1e-9);
        assert_eq!((s.min_scale, s.max_scale), (1, 5));
        assert_eq!(s.stable_window, Duration::from_secs(6));
        assert_eq!(s.scale_to_zero_grace_period, Duration::ZERO);
        assert_eq!(s.timeouts, Timeouts::from_secs(30, 10, 20));
        assert_eq!(parse(&[(TARGET, "2.5")]).unwrap().target, 2.5);
    }

    #[test]
    fn bad_values_name_the_annotation() {
        let cases = [
            (CONTAINER_CONCURRENCY, "-1", "expected a whole number"),
            (
                CONTAINER_CONCURRENCY,
                "99999999999999999999999",
                "expected a whole number",
            ),
            (MAX_SCALE, "4294967296", "at most 4294967295"),
            (TARGET, "0", "between 0.01"),
            (TARGET, "NaN", "between 0.01"),
            (STABLE_WINDOW, "six seconds", "expected a duration"),
            (STABLE_WINDOW, "100ms", "must be between"),
            (
                SCALE_TO_ZERO_GRACE_PERIOD,
                "99999999h",
                "longer than the most accepted, 8760h",
            ),
            (TIMEOUT_SECONDS, "18446744073709551615", "at most"),
            (SERVICE, "Not_A_Name", "not a Service name"),
            (HOSTS, "a..b", "not a host name"),
        ];
        for (name, value, reason) in cases {
            let e = parse(&[(name, value)]).unwrap_err();
            assert_eq!(e.name, name, "{value}");
            assert!(e.to_string().contains(reason), "{e}");
            assert!(e.to_string().contains(name), "{e}");
        }
        let e = parse(&[(MIN_SCALE, "3"), (MAX_SCALE, "2")]).unwrap_err();
        assert_eq!(e.name, MAX_SCALE);
    }

    #[test]
    fn opt_in_is_any_thaw_annotation() {
        let mut m = BTreeMap::new();
        assert!(!opted_in(&m));
        m.insert("deployment.kubernetes.io/revision".into(), "1".into());
        assert!(!opted_in(&m));
        m.insert(MIN_SCALE.into(), "0".into());
        assert!(opted_in(&m));
    }
}
