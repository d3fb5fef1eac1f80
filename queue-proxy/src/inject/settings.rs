//! What a cluster operator sets for every injected sidecar: the image, its resources, and
//! the cluster-wide values Knative takes from its ConfigMaps (`config-deployment`,
//! `config-observability`, `config-logging`, `config-features`).

use std::time::Duration;

use serde_json::{json, Value};

/// The sidecar image when nothing else is said.
pub const DEFAULT_IMAGE: &str = "ghcr.io/thaw-dev/queue-proxy:0.1.0";
/// The environment variable that names the sidecar image (the CLI and the webhook).
pub const IMAGE_ENV: &str = "THAW_QUEUE_PROXY_IMAGE";
/// The queue-proxy's drain quiet period unless told otherwise (Knative's
/// `drainSleepDuration`); the sidecar gets `THAW_DRAIN_QUIET_PERIOD` only for another.
pub const DEFAULT_DRAIN_QUIET_PERIOD: Duration = Duration::from_secs(30);
/// Knative's `config-observability` as its controller encodes it with the shipped
/// defaults, without `requestLogTemplate`: Knative only logs requests when
/// `enableRequestLog` is also set, and Thaw's queue-proxy takes a template alone as
/// "log requests".
pub const DEFAULT_OBSERVABILITY_CONFIG: &str = r#"{"tracing":{"protocol":"none"},"metrics":{"protocol":"none"},"runtime":{"profiling":"disabled","exportInterval":15000000000},"requestMetrics":{"protocol":"none"}}"#;

/// Settings for every injected sidecar.
#[derive(Debug, Clone, PartialEq)]
pub struct InjectSettings {
    /// The sidecar's image (Knative: `queue-sidecar-image`).
    pub image: String,
    /// The sidecar's `resources` (a `ResourceRequirements`). Knative's default asks for
    /// 25m of CPU and sets no limits (`queue-sidecar-cpu-request`).
    pub resources: Value,
    /// The sidecar's drain quiet period after SIGTERM; the pod's
    /// `terminationGracePeriodSeconds` is made to cover it.
    pub drain_quiet_period: Duration,
    /// `SYSTEM_NAMESPACE`: where Thaw runs.
    pub system_namespace: String,
    /// `SERVING_LOGGING_LEVEL` (Knative: `loglevel.queueproxy`); empty = info.
    pub logging_level: String,
    /// `OBSERVABILITY_CONFIG` (JSON).
    pub observability_config: String,
    /// `ENABLE_HTTP2_AUTO_DETECTION` (Knative: the `autodetect-http2` feature).
    pub http2_auto_detection: bool,
}

impl Default for InjectSettings {
    fn default() -> Self {
        Self {
            image: DEFAULT_IMAGE.to_owned(),
            resources: json!({"requests": {"cpu": "25m"}}),
            drain_quiet_period: DEFAULT_DRAIN_QUIET_PERIOD,
            system_namespace: "thaw-system".to_owned(),
            logging_level: String::new(),
            observability_config: DEFAULT_OBSERVABILITY_CONFIG.to_owned(),
            http2_auto_detection: false,
        }
    }
}

impl InjectSettings {
    /// The defaults with another image.
    pub fn with_image(image: impl Into<String>) -> Self {
        Self {
            image: image.into(),
            ..Self::default()
        }
    }
}
