//! Knative's tracing settings (knative.dev/pkg `observability/tracing`): the protocol,
//! the endpoint and the sampling rate, validated as Knative validates them, and the
//! endpoint read as Knative's exporters read it. Then, per process, what OpenTelemetry's
//! environment variables change (a [`Plan`]), as knative.dev/pkg's provider lets them.

use opentelemetry_sdk::trace::Sampler;

/// Knative's config-map keys (`config-observability`, knative.dev/pkg
/// `observability/tracing`), also the activator's flag names.
pub const KEY_PROTOCOL: &str = "tracing-protocol";
pub const KEY_ENDPOINT: &str = "tracing-endpoint";
pub const KEY_SAMPLING_RATE: &str = "tracing-sampling-rate";

/// OpenTelemetry's variables that knative.dev/pkg lets win over its settings. Either
/// endpoint variable replaces the configured endpoint (the per-signal one wins when both
/// are set); a sampler variable replaces the rate, or the whole sampler.
pub const OTEL_EXPORTER_OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
pub const OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
pub const OTEL_TRACES_SAMPLER: &str = "OTEL_TRACES_SAMPLER";
pub const OTEL_TRACES_SAMPLER_ARG: &str = "OTEL_TRACES_SAMPLER_ARG";

/// The OTLP/HTTP path for traces, which an endpoint without a path gets.
const TRACES_PATH: &str = "/v1/traces";
/// The OTLP/gRPC method spans are sent to; a gRPC endpoint's own path is ignored.
pub(super) const GRPC_EXPORT_PATH: &str =
    "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// Knative's `tracing-protocol` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// The default: no tracing.
    None,
    /// OTLP over HTTP with protobuf bodies.
    HttpProtobuf,
    /// OTLP over gRPC (HTTP/2).
    Grpc,
    /// One JSON line per span on stdout, every span sampled.
    Stdout,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::None => "none",
            Protocol::HttpProtobuf => "http/protobuf",
            Protocol::Grpc => "grpc",
            Protocol::Stdout => "stdout",
        }
    }
}

/// A bad tracing setting, naming the key (or variable) as the user wrote it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("{key}: unknown protocol {value:?} (expected none, http/protobuf, grpc or stdout)")]
    Protocol { key: String, value: String },
    #[error("{key}: {value:?} is not a URL: {reason}")]
    Endpoint {
        key: String,
        value: String,
        reason: String,
    },
    #[error("{key}: must be set when the protocol is {protocol}")]
    MissingEndpoint { key: String, protocol: &'static str },
    #[error("{key}: must be empty when the protocol is {protocol}, got {value:?}")]
    UnexpectedEndpoint {
        key: String,
        protocol: &'static str,
        value: String,
    },
    #[error("{key}: expected a number from 0 to 1, got {value:?}")]
    SamplingRate { key: String, value: String },
    #[error("{key}: expected a number, got {value:?}")]
    NotANumber { key: String, value: String },
    #[error("{key}: expected an object, got {value}")]
    NotAnObject { key: String, value: String },
}

/// Where the settings came from, for error messages: Knative's config-map keys (and the
/// activator's flags), or the JSON fields of `OBSERVABILITY_CONFIG` (whose errors the
/// queue-proxy prefixes with the variable's name).
#[derive(Debug, Clone, Copy)]
enum Keys {
    ConfigMap,
    Json,
}

impl Keys {
    fn protocol(self) -> String {
        match self {
            Keys::ConfigMap => KEY_PROTOCOL.to_owned(),
            Keys::Json => "tracing.protocol".to_owned(),
        }
    }
    fn endpoint(self) -> String {
        match self {
            Keys::ConfigMap => KEY_ENDPOINT.to_owned(),
            Keys::Json => "tracing.endpoint".to_owned(),
        }
    }
    fn sampling_rate(self) -> String {
        match self {
            Keys::ConfigMap => KEY_SAMPLING_RATE.to_owned(),
            Keys::Json => "tracing.samplingRate".to_owned(),
        }
    }
}

/// Knative's tracing settings, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct TracingConfig {
    pub protocol: Protocol,
    /// The endpoint as Knative's exporters read it: always with its scheme (a bare
    /// `host:port` gets `https://`); for `http/protobuf` the full URL spans are POSTed to
    /// (`…/v1/traces` when no path was given), for `grpc` just `scheme://host:port`.
    /// Empty for `none` and `stdout`.
    pub endpoint: String,
    /// The share of new traces recorded (Knative's rule: ≥ 1 all, ≤ 0 none, else
    /// that ratio of trace ids, following the caller's decision when there is one).
    pub sampling_rate: f64,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            protocol: Protocol::None,
            endpoint: String::new(),
            sampling_rate: 0.0,
        }
    }
}

impl TracingConfig {
    /// Whether spans are recorded and exported.
    pub fn is_on(&self) -> bool {
        self.protocol != Protocol::None
    }

    /// From Knative's config-map keys (absent keys take Knative's defaults: protocol
    /// `none`, rate 0).
    pub fn from_keys(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        Self::build(
            Keys::ConfigMap,
            get(KEY_PROTOCOL).as_deref(),
            get(KEY_ENDPOINT).as_deref(),
            get(KEY_SAMPLING_RATE).as_deref(),
        )
    }

    /// From the `tracing` object of `OBSERVABILITY_CONFIG` (knative.dev/pkg's
    /// `{"protocol", "endpoint", "samplingRate"}`); `None` is the absent object.
    pub fn from_observability_json(
        tracing: Option<&serde_json::Value>,
    ) -> Result<Self, ConfigError> {
        let Some(tracing) = tracing else {
            return Ok(Self::default());
        };
        let Some(obj) = tracing.as_object() else {
            return Err(ConfigError::NotAnObject {
                key: "tracing".to_owned(),
                value: tracing.to_string(),
            });
        };
        let text = |name: &str| {
            obj.get(name).map(|v| match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            })
        };
        Self::build(
            Keys::Json,
            text("protocol").as_deref(),
            text("endpoint").as_deref(),
            text("samplingRate").as_deref(),
        )
    }

    /// The `tracing` object of `OBSERVABILITY_CONFIG` for these settings, as Knative's
    /// controller writes it into a queue-proxy's environment: Go's `omitempty` leaves out
    /// an empty endpoint and a zero rate, which read back as the same settings.
    pub fn to_observability_json(&self) -> serde_json::Value {
        let mut obj = serde_json::Map::new();
        obj.insert("protocol".to_owned(), self.protocol.as_str().into());
        if !self.endpoint.is_empty() {
            obj.insert("endpoint".to_owned(), self.endpoint.clone().into());
        }
        if self.sampling_rate != 0.0 {
            obj.insert("samplingRate".to_owned(), self.sampling_rate.into());
        }
        serde_json::Value::Object(obj)
    }

    fn build(
        keys: Keys,
        protocol: Option<&str>,
        endpoint: Option<&str>,
        rate: Option<&str>,
    ) -> Result<Self, ConfigError> {
        let protocol = match protocol.map(str::trim).unwrap_or("none") {
            "" | "none" => Protocol::None,
            "http/protobuf" => Protocol::HttpProtobuf,
            "grpc" => Protocol::Grpc,
            "stdout" => Protocol::Stdout,
            other => {
                return Err(ConfigError::Protocol {
                    key: keys.protocol(),
                    value: other.to_owned(),
                })
            }
        };
        let sampling_rate = match rate.map(str::trim) {
            None | Some("") => 0.0,
            Some(text) => match text.parse::<f64>() {
                Ok(r) if (0.0..=1.0).contains(&r) => r,
                _ => {
                    return Err(ConfigError::SamplingRate {
                        key: keys.sampling_rate(),
                        value: text.to_owned(),
                    })
                }
            },
        };
        let endpoint = endpoint.map(str::trim).unwrap_or("");
        // knative.dev/pkg's Validate: the OTLP protocols need an endpoint, and the others
        // must not have one (it would be silently unused).
        let endpoint = match protocol {
            Protocol::HttpProtobuf | Protocol::Grpc if endpoint.is_empty() => {
                return Err(ConfigError::MissingEndpoint {
                    key: keys.endpoint(),
                    protocol: protocol.as_str(),
                })
            }
            Protocol::HttpProtobuf | Protocol::Grpc => {
                let url = Url::knative(endpoint).map_err(|reason| ConfigError::Endpoint {
                    key: keys.endpoint(),
                    value: endpoint.to_owned(),
                    reason,
                })?;
                match protocol {
                    Protocol::Grpc => url.origin(),
                    _ => url.with_default_path(TRACES_PATH),
                }
            }
            Protocol::None | Protocol::Stdout if !endpoint.is_empty() => {
                return Err(ConfigError::UnexpectedEndpoint {
                    key: keys.endpoint(),
                    protocol: protocol.as_str(),
                    value: endpoint.to_owned(),
                })
            }
            Protocol::None | Protocol::Stdout => String::new(),
        };
        Ok(TracingConfig {
            protocol,
            endpoint,
            sampling_rate,
        })
    }

    /// What this process does with these settings, given its environment (`env`):
    /// knative.dev/pkg's `exporterFor`, `endpointFor` and `sampleFor`. Call only when
    /// tracing is on.
    pub(super) fn plan(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<Plan, ConfigError> {
        // Go's exporters trim the variables, and an empty one counts as unset.
        let var = |name: &str| {
            env(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let export = match self.protocol {
            Protocol::Stdout => Export::Stdout,
            Protocol::HttpProtobuf | Protocol::Grpc | Protocol::None => {
                let grpc = self.protocol == Protocol::Grpc;
                Export::Otlp {
                    url: self.export_url(grpc, &var)?,
                    grpc,
                }
            }
        };
        let sampler = if var(OTEL_TRACES_SAMPLER).is_some() {
            // knative.dev/pkg steps aside, and the SDK reads both variables itself.
            None
        } else if self.protocol == Protocol::Stdout {
            Some(Sampler::AlwaysOn)
        } else {
            let rate = match var(OTEL_TRACES_SAMPLER_ARG) {
                None => self.sampling_rate,
                Some(text) => match text.parse::<f64>() {
                    // Any number, as Go's ParseFloat takes it; the rule below bounds it.
                    Ok(r) if !r.is_nan() => r,
                    _ => {
                        return Err(ConfigError::NotANumber {
                            key: OTEL_TRACES_SAMPLER_ARG.to_owned(),
                            value: text,
                        })
                    }
                },
            };
            Some(sampler_for(rate))
        };
        Ok(Plan { export, sampler })
    }

    /// The URL an OTLP export goes to: the configured endpoint, unless an endpoint
    /// variable is set, read as Go's exporters read them (OTLP's rules: the per-signal
    /// variable is used as it is, `/` when it has no path; the general one gets
    /// `/v1/traces` after its path).
    fn export_url(
        &self,
        grpc: bool,
        var: &dyn Fn(&str) -> Option<String>,
    ) -> Result<String, ConfigError> {
        let from_env = |name: &str, text: &str| {
            Url::knative(text).map_err(|reason| ConfigError::Endpoint {
                key: name.to_owned(),
                value: text.to_owned(),
                reason,
            })
        };
        let url = if let Some(text) = var(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) {
            let url = from_env(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, &text)?;
            if grpc {
                url.origin()
            } else {
                url.with_default_path("/")
            }
        } else if let Some(text) = var(OTEL_EXPORTER_OTLP_ENDPOINT) {
            let url = from_env(OTEL_EXPORTER_OTLP_ENDPOINT, &text)?;
            if grpc {
                url.origin()
            } else {
                url.joined(TRACES_PATH)
            }
        } else {
            self.endpoint.clone()
        };
        Ok(if grpc {
            format!("{url}{GRPC_EXPORT_PATH}")
        } else {
            url
        })
    }
}

/// knative.dev/pkg's `sampleFor`: always, never, or the ratio under the parent's say.
fn sampler_for(rate: f64) -> Sampler {
    if rate >= 1.0 {
        Sampler::AlwaysOn
    } else if rate <= 0.0 {
        Sampler::AlwaysOff
    } else {
        Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(rate)))
    }
}

/// What one process does with the settings and its environment.
#[derive(Debug)]
pub(super) struct Plan {
    pub export: Export,
    /// `None`: `OTEL_TRACES_SAMPLER` is set, and the SDK's own reading of it applies.
    pub sampler: Option<Sampler>,
}

/// Where spans go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Export {
    /// OTLP to this URL: for gRPC, the export method's full URL.
    Otlp {
        url: String,
        grpc: bool,
    },
    Stdout,
}

/// An endpoint URL with what Thaw needs of it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Url {
    tls: bool,
    authority: String,
    /// The path and query as written; empty when there was none.
    path_and_query: String,
}

impl Url {
    /// Reads an endpoint as knative.dev/pkg's `endpointFor` does, then Go's
    /// `WithEndpointURL`: Go's `url.Parse` first, and a URL with an opaque part (a
    /// scheme-less `host:port`, which Go reads as scheme `host`) gets `https://` in front.
    /// The errors are Go's where Go has one (`10.0.0.1:4317` is one: a colon in the
    /// first path segment). Only http and https: Go would send any other scheme as
    /// plaintext, which is more likely a typo than a wish.
    fn knative(endpoint: &str) -> Result<Url, String> {
        let with_scheme = match go_scheme(endpoint)? {
            Some((_, rest)) if is_opaque(rest) => format!("https://{endpoint}"),
            Some(_) => endpoint.to_owned(),
            None => {
                let first = endpoint.split(['/', '?', '#']).next().unwrap_or("");
                return Err(if first.contains(':') {
                    "first path segment in URL cannot contain colon (write https:// or http:// before it)"
                        .to_owned()
                } else {
                    "no scheme and no port (expected host:port, http://host:port or https://host:port)"
                        .to_owned()
                });
            }
        };
        let uri: http::Uri = with_scheme.parse().map_err(|e| format!("{e}"))?;
        let tls = match uri.scheme_str().map(str::to_ascii_lowercase).as_deref() {
            Some("http") => false,
            Some("https") => true,
            Some(other) => return Err(format!("scheme {other:?} is not http or https")),
            None => return Err("no scheme".to_owned()),
        };
        let Some(authority) = uri.authority() else {
            return Err("no host".to_owned());
        };
        if authority.host().is_empty() {
            return Err("no host".to_owned());
        }
        let path_and_query = match uri.path_and_query() {
            Some(pq) if !(pq.path().is_empty() || pq.path() == "/") || pq.query().is_some() => {
                pq.as_str().to_owned()
            }
            _ => String::new(),
        };
        Ok(Url {
            tls,
            authority: authority.as_str().to_owned(),
            path_and_query,
        })
    }

    /// `scheme://authority`: what a gRPC exporter dials (Go's ignores the path).
    fn origin(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.authority)
    }

    /// The URL, with `path` when it has none.
    fn with_default_path(&self, path: &str) -> String {
        if self.path_and_query.is_empty() {
            format!("{}{path}", self.origin())
        } else {
            format!("{}{}", self.origin(), self.path_and_query)
        }
    }

    /// The URL with `path` after its own path, as Go's `path.Join` puts it.
    fn joined(&self, path: &str) -> String {
        let (own, query) = match self.path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (self.path_and_query.as_str(), None),
        };
        let mut url = format!("{}{}{path}", self.origin(), own.trim_end_matches('/'));
        if let Some(q) = query {
            url.push('?');
            url.push_str(q);
        }
        url
    }
}

/// Go's `getScheme`: a letter, then letters, digits, `+`, `-` or `.`, then `:`. `None`
/// when the text does not start that way (it is then a path to Go).
fn go_scheme(text: &str) -> Result<Option<(&str, &str)>, String> {
    for (i, c) in text.char_indices() {
        match c {
            'a'..='z' | 'A'..='Z' => {}
            '0'..='9' | '+' | '-' | '.' if i > 0 => {}
            ':' if i == 0 => return Err("missing protocol scheme".to_owned()),
            ':' => return Ok(Some((&text[..i], &text[i + 1..]))),
            _ => return Ok(None),
        }
    }
    Ok(None)
}

/// Whether what follows a scheme is Go's `Opaque`: not empty (before a query or
/// fragment) and not starting with `/`.
fn is_opaque(rest: &str) -> bool {
    let before = rest.split(['?', '#']).next().unwrap_or("");
    !before.is_empty() && !before.starts_with('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(pairs: &[(&str, &str)]) -> Result<TracingConfig, ConfigError> {
        let map: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        TracingConfig::from_keys(|k| map.get(k).cloned())
    }

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k: &str| map.get(k).cloned()
    }

    fn config(protocol: &str, endpoint: &str) -> TracingConfig {
        keys(&[(KEY_PROTOCOL, protocol), (KEY_ENDPOINT, endpoint)]).unwrap()
    }

    #[test]
    fn absent_keys_are_knatives_defaults_and_off() {
        let c = keys(&[]).unwrap();
        assert_eq!(c, TracingConfig::default());
        assert!(!c.is_on());
    }

    #[test]
    fn every_protocol_but_none_is_on() {
        assert!(config("http/protobuf", "http://c:4318").is_on());
        assert!(config("grpc", "http://c:4317").is_on());
        assert!(keys(&[(KEY_PROTOCOL, "stdout")]).unwrap().is_on());
        assert!(!keys(&[(KEY_PROTOCOL, "none")]).unwrap().is_on());
    }

    #[test]
    fn an_endpoint_without_a_path_gets_the_otlp_traces_path() {
        let c = keys(&[
            (KEY_PROTOCOL, "http/protobuf"),
            (KEY_ENDPOINT, "http://collector.observability:4318"),
            (KEY_SAMPLING_RATE, "0.25"),
        ])
        .unwrap();
        assert!(c.is_on());
        assert_eq!(c.endpoint, "http://collector.observability:4318/v1/traces");
        assert_eq!(c.sampling_rate, 0.25);
        assert_eq!(
            config("http/protobuf", "http://127.0.0.1:4318/custom/traces").endpoint,
            "http://127.0.0.1:4318/custom/traces"
        );
        assert_eq!(
            config("http/protobuf", "https://c:4318/").endpoint,
            "https://c:4318/v1/traces"
        );
    }

    #[test]
    fn a_scheme_less_endpoint_is_https_as_in_knative() {
        // Go's url.Parse reads `collector:4317` as scheme `collector` with an opaque part,
        // and knative.dev/pkg puts https:// in front of such an endpoint.
        assert_eq!(
            config("grpc", "otel-collector.observability:4317").endpoint,
            "https://otel-collector.observability:4317"
        );
        assert_eq!(
            config("http/protobuf", "collector.ns.svc:4318/v1/traces").endpoint,
            "https://collector.ns.svc:4318/v1/traces"
        );
        assert_eq!(
            config("http/protobuf", "localhost:4318").endpoint,
            "https://localhost:4318/v1/traces"
        );
        // A gRPC endpoint is dialled by host and port; Go ignores its path.
        assert_eq!(
            config("grpc", "http://c:4317/ignored").endpoint,
            "http://c:4317"
        );
        assert_eq!(config("grpc", "HTTPS://c:4317").endpoint, "https://c:4317");
    }

    #[test]
    fn bad_values_name_their_key() {
        let err = |pairs: &[(&str, &str)]| keys(pairs).unwrap_err().to_string();
        assert_eq!(
            err(&[(KEY_PROTOCOL, "zipkin")]),
            "tracing-protocol: unknown protocol \"zipkin\" (expected none, http/protobuf, grpc or stdout)"
        );
        assert_eq!(
            err(&[(KEY_SAMPLING_RATE, "1.5")]),
            "tracing-sampling-rate: expected a number from 0 to 1, got \"1.5\""
        );
        assert_eq!(
            err(&[(KEY_SAMPLING_RATE, "-0.1")]),
            "tracing-sampling-rate: expected a number from 0 to 1, got \"-0.1\""
        );
        assert_eq!(
            err(&[(KEY_SAMPLING_RATE, "often")]),
            "tracing-sampling-rate: expected a number from 0 to 1, got \"often\""
        );
        assert_eq!(
            err(&[(KEY_SAMPLING_RATE, "NaN")]),
            "tracing-sampling-rate: expected a number from 0 to 1, got \"NaN\""
        );
        let endpoint = |protocol: &str, endpoint: &str| {
            err(&[(KEY_PROTOCOL, protocol), (KEY_ENDPOINT, endpoint)])
        };
        assert_eq!(
            err(&[(KEY_PROTOCOL, "http/protobuf")]),
            "tracing-endpoint: must be set when the protocol is http/protobuf"
        );
        assert_eq!(
            err(&[(KEY_PROTOCOL, "grpc")]),
            "tracing-endpoint: must be set when the protocol is grpc"
        );
        assert_eq!(
            endpoint("stdout", "http://c:4318"),
            "tracing-endpoint: must be empty when the protocol is stdout, got \"http://c:4318\""
        );
        assert_eq!(
            endpoint("none", "http://c:4318"),
            "tracing-endpoint: must be empty when the protocol is none, got \"http://c:4318\""
        );
        let bad = endpoint("http/protobuf", "http://[::1");
        assert!(
            bad.starts_with("tracing-endpoint: \"http://[::1\" is not a URL: "),
            "{bad}"
        );
        assert_eq!(
            endpoint("grpc", "10.0.0.1:4317"),
            "tracing-endpoint: \"10.0.0.1:4317\" is not a URL: first path segment in URL cannot contain colon (write https:// or http:// before it)"
        );
        assert_eq!(
            endpoint("grpc", ":4317"),
            "tracing-endpoint: \":4317\" is not a URL: missing protocol scheme"
        );
        assert_eq!(
            endpoint("grpc", "collector"),
            "tracing-endpoint: \"collector\" is not a URL: no scheme and no port (expected host:port, http://host:port or https://host:port)"
        );
        assert_eq!(
            endpoint("http/protobuf", "ftp://c"),
            "tracing-endpoint: \"ftp://c\" is not a URL: scheme \"ftp\" is not http or https"
        );
        assert_eq!(
            endpoint("http/protobuf", "http:///v1/traces"),
            "tracing-endpoint: \"http:///v1/traces\" is not a URL: invalid format"
        );
    }

    #[test]
    fn observability_json_round_trips_every_protocol_and_names_its_fields() {
        let http = config("http/protobuf", "http://127.0.0.1:4318");
        assert_eq!(
            http.to_observability_json(),
            serde_json::json!({"protocol": "http/protobuf", "endpoint": "http://127.0.0.1:4318/v1/traces"})
        );
        let mut rated = config("grpc", "collector:4317");
        rated.sampling_rate = 0.5;
        assert_eq!(
            rated.to_observability_json(),
            serde_json::json!({"protocol": "grpc", "endpoint": "https://collector:4317", "samplingRate": 0.5})
        );
        let stdout = keys(&[(KEY_PROTOCOL, "stdout"), (KEY_SAMPLING_RATE, "1")]).unwrap();
        assert_eq!(
            stdout.to_observability_json(),
            serde_json::json!({"protocol": "stdout", "samplingRate": 1.0})
        );
        for c in [
            http,
            rated,
            stdout,
            config("grpc", "http://127.0.0.1:4317"),
            config("http/protobuf", "collector.ns.svc:4318/custom"),
            TracingConfig::default(),
        ] {
            let json = c.to_observability_json();
            assert_eq!(
                TracingConfig::from_observability_json(Some(&json)).unwrap(),
                c,
                "{json}"
            );
        }
        assert_eq!(
            TracingConfig::from_observability_json(None).unwrap(),
            TracingConfig::default()
        );
        let bad = serde_json::json!({"protocol": "http/protobuf", "endpoint": "http://c:4318", "samplingRate": 2});
        assert_eq!(
            TracingConfig::from_observability_json(Some(&bad))
                .unwrap_err()
                .to_string(),
            "tracing.samplingRate: expected a number from 0 to 1, got \"2\""
        );
        let bad = serde_json::json!({"protocol": "jaeger"});
        assert!(TracingConfig::from_observability_json(Some(&bad))
            .unwrap_err()
            .to_string()
            .starts_with("tracing.protocol: unknown protocol \"jaeger\""));
        let bad = serde_json::json!({"protocol": "stdout", "endpoint": "http://c"});
        assert_eq!(
            TracingConfig::from_observability_json(Some(&bad))
                .unwrap_err()
                .to_string(),
            "tracing.endpoint: must be empty when the protocol is stdout, got \"http://c\""
        );
    }

    #[test]
    fn the_export_url_is_the_endpoint_or_the_grpc_method_on_it() {
        let plan = |c: &TracingConfig| c.plan(&env(&[])).unwrap().export;
        assert_eq!(
            plan(&config("http/protobuf", "http://c:4318")),
            Export::Otlp {
                url: "http://c:4318/v1/traces".to_owned(),
                grpc: false
            }
        );
        assert_eq!(
            plan(&config("grpc", "c.ns:4317")),
            Export::Otlp {
                url: "https://c.ns:4317/opentelemetry.proto.collector.trace.v1.TraceService/Export"
                    .to_owned(),
                grpc: true
            }
        );
        assert_eq!(
            plan(&keys(&[(KEY_PROTOCOL, "stdout")]).unwrap()),
            Export::Stdout
        );
    }

    #[test]
    fn the_endpoint_variables_win_as_in_knative() {
        let url =
            |c: &TracingConfig, vars: &[(&str, &str)]| match c.plan(&env(vars)).unwrap().export {
                Export::Otlp { url, .. } => url,
                Export::Stdout => panic!("not OTLP"),
            };
        let http = config("http/protobuf", "http://configured:4318");
        // The general variable is a base URL: OTLP's signal path goes after its path.
        assert_eq!(
            url(&http, &[(OTEL_EXPORTER_OTLP_ENDPOINT, "http://env:4318")]),
            "http://env:4318/v1/traces"
        );
        assert_eq!(
            url(
                &http,
                &[(OTEL_EXPORTER_OTLP_ENDPOINT, "https://env:4318/otlp/")]
            ),
            "https://env:4318/otlp/v1/traces"
        );
        // The per-signal one is used as it is (`/` without a path) and wins over both.
        assert_eq!(
            url(
                &http,
                &[
                    (OTEL_EXPORTER_OTLP_ENDPOINT, "http://general:4318"),
                    (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, "http://traces:4318")
                ]
            ),
            "http://traces:4318/"
        );
        assert_eq!(
            url(
                &http,
                &[(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, " http://t:1/x/y ")]
            ),
            "http://t:1/x/y"
        );
        // Empty counts as unset.
        assert_eq!(
            url(&http, &[(OTEL_EXPORTER_OTLP_ENDPOINT, "")]),
            "http://configured:4318/v1/traces"
        );
        // gRPC dials the variable's host and port.
        let grpc = config("grpc", "http://configured:4317");
        assert_eq!(
            url(
                &grpc,
                &[(OTEL_EXPORTER_OTLP_ENDPOINT, "https://env:4317/p")]
            ),
            "https://env:4317/opentelemetry.proto.collector.trace.v1.TraceService/Export"
        );
        assert_eq!(
            url(&grpc, &[(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, "env:4317")]),
            "https://env:4317/opentelemetry.proto.collector.trace.v1.TraceService/Export"
        );
        // A bad variable is named.
        let err = grpc
            .plan(&env(&[(OTEL_EXPORTER_OTLP_ENDPOINT, "ftp://x")]))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "OTEL_EXPORTER_OTLP_ENDPOINT: \"ftp://x\" is not a URL: scheme \"ftp\" is not http or https"
        );
    }

    #[test]
    fn the_sampler_follows_knatives_rule_and_its_variables() {
        let sampler =
            |c: &TracingConfig, vars: &[(&str, &str)]| c.plan(&env(vars)).unwrap().sampler;
        let with = |rate: &str| {
            keys(&[
                (KEY_PROTOCOL, "http/protobuf"),
                (KEY_ENDPOINT, "http://c:4318"),
                (KEY_SAMPLING_RATE, rate),
            ])
            .unwrap()
        };
        assert!(matches!(sampler(&with("1"), &[]), Some(Sampler::AlwaysOn)));
        assert!(matches!(sampler(&with("0"), &[]), Some(Sampler::AlwaysOff)));
        assert!(matches!(
            sampler(&with("0.5"), &[]),
            Some(Sampler::ParentBased(_))
        ));
        // OTEL_TRACES_SAMPLER_ARG replaces the rate; any number, bounded by the rule.
        assert!(matches!(
            sampler(&with("0"), &[(OTEL_TRACES_SAMPLER_ARG, "1")]),
            Some(Sampler::AlwaysOn)
        ));
        assert!(matches!(
            sampler(&with("1"), &[(OTEL_TRACES_SAMPLER_ARG, "0")]),
            Some(Sampler::AlwaysOff)
        ));
        assert!(matches!(
            sampler(&with("0"), &[(OTEL_TRACES_SAMPLER_ARG, "0.25")]),
            Some(Sampler::ParentBased(_))
        ));
        assert!(matches!(
            sampler(&with("0"), &[(OTEL_TRACES_SAMPLER_ARG, "5")]),
            Some(Sampler::AlwaysOn)
        ));
        assert_eq!(
            with("1")
                .plan(&env(&[(OTEL_TRACES_SAMPLER_ARG, "often")]))
                .unwrap_err()
                .to_string(),
            "OTEL_TRACES_SAMPLER_ARG: expected a number, got \"often\""
        );
        // OTEL_TRACES_SAMPLER hands the choice to the SDK, even for stdout.
        assert!(sampler(&with("1"), &[(OTEL_TRACES_SAMPLER, "always_off")]).is_none());
        let stdout = keys(&[(KEY_PROTOCOL, "stdout")]).unwrap();
        assert!(sampler(&stdout, &[(OTEL_TRACES_SAMPLER, "always_off")]).is_none());
        // stdout samples everything, whatever the rate, as in Knative.
        assert!(matches!(sampler(&stdout, &[]), Some(Sampler::AlwaysOn)));
        assert!(matches!(
            sampler(&stdout, &[(OTEL_TRACES_SAMPLER_ARG, "0")]),
            Some(Sampler::AlwaysOn)
        ));
    }
}
