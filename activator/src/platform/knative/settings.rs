//! Knative's config maps, as its activator follows them:
//! - `config-logging`: `loglevel.activator`, else the `level` of `zap-logger-config`,
//!   else `info`. A level zap does not know is an error, and the level stays.
//! - `config-observability`: `logging.enable-request-log` turns the request log on; a
//!   `logging.request-log-template` set to empty with it on is refused, as Knative's
//!   validation refuses it. Thaw writes the fields of Knative's default template as a
//!   JSON line whatever the template says (see the README). Its `tracing-*` keys are read
//!   once, at start, as Knative's activator reads them ([`super::tracing_at_start`]); a
//!   later change is reported as needing a restart, and a bad value as an error.
//!
//! Plain data: the watchers call [`Observed::apply`], [`Observed::delete`] and
//! [`Observed::reset`], which return what changed.

use k8s_openapi::api::core::v1::ConfigMap;
use thaw_shared::trace::TracingConfig;

/// The component name Knative keys the activator's level with.
const LEVEL_KEY: &str = "loglevel.activator";

/// What changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigChange {
    /// A tracing level: `debug`, `info`, `warn` or `error`.
    LogLevel(&'static str),
    RequestLog(bool),
    /// config-observability's tracing settings differ from the ones the activator
    /// started with; they apply at the next start.
    TracingNeedsRestart,
    Invalid {
        config_map: String,
        error: String,
    },
}

/// The settings seen so far, and which config map carries which.
#[derive(Debug)]
pub struct Observed {
    logging: String,
    observability: String,
    level: Option<&'static str>,
    request_log: Option<bool>,
    /// The tracing settings read from config-observability at start; `None` when the
    /// flags decided them, and the config map's keys are not followed.
    tracing_at_start: Option<TracingConfig>,
    /// The last tracing settings seen that differ from those, reported once each.
    tracing_reported: Option<TracingConfig>,
}

/// zap's level names onto tracing's; `dpanic`, `panic` and `fatal` log errors only.
fn level(name: &str) -> Option<&'static str> {
    match name.trim() {
        "debug" => Some("debug"),
        "info" | "" => Some("info"),
        "warn" => Some("warn"),
        "error" | "dpanic" | "panic" | "fatal" => Some("error"),
        _ => None,
    }
}

/// Go's `strconv.ParseBool`, which Knative's config maps use.
fn go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

impl Observed {
    pub fn new(logging: &str, observability: &str) -> Self {
        Self {
            logging: logging.to_owned(),
            observability: observability.to_owned(),
            level: None,
            request_log: None,
            tracing_at_start: None,
            tracing_reported: None,
        }
    }

    /// Follows config-observability's tracing keys against what the activator started with.
    pub fn with_tracing_at_start(mut self, tracing: Option<TracingConfig>) -> Self {
        self.tracing_at_start = tracing;
        self
    }

    fn tracing(
        &mut self,
        data: &std::collections::BTreeMap<String, String>,
    ) -> Option<Result<(), String>> {
        let start = self.tracing_at_start.as_ref()?;
        let now = match TracingConfig::from_keys(|k| data.get(k).cloned()) {
            Ok(now) => now,
            Err(e) => return Some(Err(e.to_string())),
        };
        if &now == start {
            self.tracing_reported = None;
            return None;
        }
        if self.tracing_reported.as_ref() == Some(&now) {
            return None;
        }
        self.tracing_reported = Some(now);
        Some(Ok(()))
    }

    fn log_level(
        data: &std::collections::BTreeMap<String, String>,
    ) -> Result<&'static str, String> {
        if let Some(l) = data.get(LEVEL_KEY) {
            return level(l).ok_or_else(|| format!("{LEVEL_KEY}: invalid logging level {l:?}"));
        }
        let Some(zap) = data
            .get("zap-logger-config")
            .filter(|z| !z.trim().is_empty())
        else {
            return Ok("info");
        };
        let json: serde_json::Value =
            serde_json::from_str(zap).map_err(|e| format!("zap-logger-config is not JSON: {e}"))?;
        match json.get("level").and_then(|l| l.as_str()) {
            None => Ok("info"),
            Some(l) => {
                level(l).ok_or_else(|| format!("zap-logger-config: invalid logging level {l:?}"))
            }
        }
    }

    fn request_log(data: &std::collections::BTreeMap<String, String>) -> Result<bool, String> {
        let key = "logging.enable-request-log";
        let on = match data.get(key) {
            None => false,
            Some(v) => go_bool(v.trim()).ok_or_else(|| format!("{key}: {v:?} is not a boolean"))?,
        };
        let template = "logging.request-log-template";
        if on && data.get(template).is_some_and(|t| t.is_empty()) {
            return Err(format!(
                "{key} was set to true, but no {template} was specified"
            ));
        }
        Ok(on)
    }

    fn observe(
        &mut self,
        name: &str,
        data: &std::collections::BTreeMap<String, String>,
    ) -> Vec<ConfigChange> {
        let invalid = |error| ConfigChange::Invalid {
            config_map: name.to_owned(),
            error,
        };
        if name == self.logging {
            return match Self::log_level(data) {
                Err(e) => vec![invalid(e)],
                Ok(l) if self.level == Some(l) => Vec::new(),
                Ok(l) => {
                    self.level = Some(l);
                    vec![ConfigChange::LogLevel(l)]
                }
            };
        }
        if name == self.observability {
            let mut changes = match Self::request_log(data) {
                Err(e) => vec![invalid(e)],
                Ok(on) if self.request_log == Some(on) => Vec::new(),
                Ok(on) => {
                    self.request_log = Some(on);
                    vec![ConfigChange::RequestLog(on)]
                }
            };
            match self.tracing(data) {
                None => {}
                Some(Ok(())) => changes.push(ConfigChange::TracingNeedsRestart),
                Some(Err(e)) => changes.push(invalid(e)),
            }
            return changes;
        }
        Vec::new()
    }

    pub fn apply(&mut self, c: &ConfigMap) -> Vec<ConfigChange> {
        let name = c.metadata.name.clone().unwrap_or_default();
        let data = c.data.clone().unwrap_or_default();
        self.observe(&name, &data)
    }

    /// A deleted config map means Knative's defaults.
    pub fn delete(&mut self, c: &ConfigMap) -> Vec<ConfigChange> {
        let name = c.metadata.name.clone().unwrap_or_default();
        self.observe(&name, &Default::default())
    }

    pub fn reset(&mut self, all: &[ConfigMap]) -> Vec<ConfigChange> {
        match all.first() {
            Some(c) => self.apply(c),
            // The watch selects one name; an empty list means it does not exist.
            None => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn cm(name: &str, data: &[(&str, &str)]) -> ConfigMap {
        ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<BTreeMap<_, _>>(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn the_level_follows_config_logging() {
        let mut o = Observed::new("config-logging", "config-observability");
        assert_eq!(
            o.apply(&cm("config-logging", &[])),
            [ConfigChange::LogLevel("info")]
        );
        assert_eq!(o.apply(&cm("config-logging", &[("_example", "x")])), []);
        let zap = r#"{"level": "debug", "encoding": "json"}"#;
        assert_eq!(
            o.apply(&cm("config-logging", &[("zap-logger-config", zap)])),
            [ConfigChange::LogLevel("debug")]
        );
        // The component's own key wins over zap's level.
        assert_eq!(
            o.apply(&cm(
                "config-logging",
                &[("zap-logger-config", zap), ("loglevel.activator", "warn")]
            )),
            [ConfigChange::LogLevel("warn")]
        );
        for bad in [
            ("loglevel.activator", "loud"),
            ("zap-logger-config", "{not json"),
        ] {
            let c = o.apply(&cm("config-logging", &[bad]));
            assert!(
                matches!(&c[..], [ConfigChange::Invalid { config_map, .. }] if config_map == "config-logging"),
                "{c:?}"
            );
        }
        assert_eq!(
            o.delete(&cm("config-logging", &[])),
            [ConfigChange::LogLevel("info")]
        );
    }

    #[test]
    fn the_request_log_follows_config_observability() {
        let mut o = Observed::new("config-logging", "config-observability");
        assert_eq!(
            o.reset(&[cm("config-observability", &[])]),
            [ConfigChange::RequestLog(false)]
        );
        assert_eq!(
            o.apply(&cm(
                "config-observability",
                &[("logging.enable-request-log", "true")]
            )),
            [ConfigChange::RequestLog(true)]
        );
        let c = o.apply(&cm(
            "config-observability",
            &[
                ("logging.enable-request-log", "true"),
                ("logging.request-log-template", ""),
            ],
        ));
        assert!(
            matches!(&c[..], [ConfigChange::Invalid { error, .. }] if error.contains("no logging.request-log-template")),
            "{c:?}"
        );
        let c = o.apply(&cm(
            "config-observability",
            &[("logging.enable-request-log", "yes")],
        ));
        assert!(matches!(&c[..], [ConfigChange::Invalid { .. }]), "{c:?}");
        assert_eq!(
            o.apply(&cm(
                "config-observability",
                &[("logging.enable-request-log", "False")]
            )),
            [ConfigChange::RequestLog(false)]
        );
        // Other config maps are not read.
        assert_eq!(
            o.apply(&cm(
                "config-network",
                &[("logging.enable-request-log", "true")]
            )),
            []
        );
    }

    #[test]
    fn a_tracing_change_in_config_observability_is_reported_once_as_needing_a_restart() {
        let start = TracingConfig::from_keys(|_| None).unwrap();
        let mut o = Observed::new("config-logging", "config-observability")
            .with_tracing_at_start(Some(start));
        assert_eq!(
            o.apply(&cm("config-observability", &[])),
            [ConfigChange::RequestLog(false)]
        );
        let on = [
            ("tracing-protocol", "http/protobuf"),
            ("tracing-endpoint", "http://otel:4318"),
        ];
        assert_eq!(
            o.apply(&cm("config-observability", &on)),
            [ConfigChange::TracingNeedsRestart]
        );
        assert_eq!(o.apply(&cm("config-observability", &on)), []);
        let c = o.apply(&cm(
            "config-observability",
            &[("tracing-sampling-rate", "2")],
        ));
        assert!(
            matches!(&c[..], [ConfigChange::Invalid { error, .. }] if error.starts_with("tracing-sampling-rate:")),
            "{c:?}"
        );
        // Back to what it started with: nothing to restart for.
        assert_eq!(o.apply(&cm("config-observability", &[])), []);
        // Started from the flags: the config map's tracing keys are not followed.
        let mut flags = Observed::new("config-logging", "config-observability");
        assert_eq!(
            flags.apply(&cm("config-observability", &on)),
            [ConfigChange::RequestLog(false)]
        );
    }
}
