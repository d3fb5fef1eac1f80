//! `activator webhook`'s command line: flags with environment fallbacks, named as the
//! manifests set them.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use thaw_queue_proxy::inject::DEFAULT_IMAGE;
use thaw_shared::duration::parse_duration;

use crate::config::LogFormatArg;

fn duration(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

fn body_limit(s: &str) -> Result<usize, String> {
    let n = crate::config::bytes(s)?;
    if n == 0 {
        return Err("must be above 0".into());
    }
    usize::try_from(n).map_err(|_| format!("{s:?} is too large"))
}

/// Thaw's sidecar injector: a mutating admission webhook adding the queue-proxy to pods
/// labelled `thaw.dev/inject: enabled`, served over HTTPS with a certificate it makes
/// itself (or takes from a Secret) and publishes in its MutatingWebhookConfiguration.
#[derive(Debug, Clone, Parser)]
#[command(name = "activator webhook", version, long_about = None)]
pub struct WebhookConfig {
    /// Address the HTTPS listener binds.
    #[arg(long, env = "THAW_WEBHOOK_LISTEN_ADDRESS", default_value = "0.0.0.0")]
    pub listen_address: IpAddr,

    /// HTTPS port: `POST /inject` (AdmissionReview v1), `GET /healthz`.
    #[arg(long, env = "THAW_WEBHOOK_PORT", default_value_t = 8443)]
    pub port: u16,

    /// The webhook's Service: the certificate is made for `<svc>`, `<svc>.<ns>`,
    /// `<svc>.<ns>.svc` and `<svc>.<ns>.svc.cluster.local`.
    #[arg(long, env = "THAW_WEBHOOK_SERVICE", default_value = "thaw-webhook")]
    pub service: String,

    /// The webhook's namespace: its Service's and Secrets', and never injected.
    #[arg(long, env = "POD_NAMESPACE", default_value = "thaw-system")]
    pub namespace: String,

    /// The MutatingWebhookConfiguration whose webhooks' `clientConfig.caBundle` is kept
    /// equal to the CA served. Empty: write no caBundle.
    #[arg(
        long,
        env = "THAW_WEBHOOK_CONFIG",
        default_value = "thaw-sidecar-injector"
    )]
    pub webhook_config: String,

    /// Serve the certificate in this Secret (`tls.crt`, `tls.key`, optional `ca.crt`,
    /// which then goes in caBundle) instead of making one. Reread every minute.
    #[arg(long, env = "THAW_WEBHOOK_CERT_SECRET")]
    pub cert_secret: Option<String>,

    /// The Secret where a certificate made here is kept, so that every replica serves
    /// the same one (the first creates it, the others read it). Empty: keep it in
    /// memory, for a single replica.
    #[arg(
        long,
        env = "THAW_WEBHOOK_CERT_STORE",
        default_value = "thaw-webhook-certs"
    )]
    pub cert_store: String,

    /// Also write the CA served (PEM) to this file, whenever it changes (for tests and
    /// for clients outside the cluster).
    #[arg(long, env = "THAW_WEBHOOK_CA_FILE_OUT")]
    pub ca_file_out: Option<PathBuf>,

    /// The sidecar image injected.
    #[arg(long, env = "THAW_QUEUE_PROXY_IMAGE", default_value = DEFAULT_IMAGE)]
    pub queue_proxy_image: String,

    /// Largest AdmissionReview accepted (3MiB, 512KiB, …); beyond it, 413. The API
    /// server's own request limit is 3 MiB.
    #[arg(long, env = "THAW_WEBHOOK_MAX_BODY", default_value = "3MiB", value_parser = body_limit)]
    pub max_body: usize,

    /// A request (body included) must be answered within this; else 408. The API
    /// server gives up after the webhook's timeoutSeconds anyway.
    #[arg(long, env = "THAW_WEBHOOK_REQUEST_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub request_timeout: Duration,

    /// After SIGTERM, keep serving this long (with /healthz failing) so that the API
    /// server stops calling before the listener closes.
    #[arg(long, env = "THAW_WEBHOOK_DRAIN_PERIOD", default_value = "3s", value_parser = duration)]
    pub drain_period: Duration,

    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, env = "THAW_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Log format: json lines, plain text, or auto (text at a terminal, else json).
    #[arg(long, env = "THAW_LOG_FORMAT", value_enum, default_value_t = LogFormatArg::Auto)]
    pub log_format: LogFormatArg,
}

impl WebhookConfig {
    /// Checks what clap cannot: names that must not be empty.
    pub fn validate(&self) -> Result<(), String> {
        if self.service.trim().is_empty() {
            return Err("--service (THAW_WEBHOOK_SERVICE) must name the webhook's Service".into());
        }
        if self.namespace.trim().is_empty() {
            return Err("--namespace (POD_NAMESPACE) must name the webhook's namespace".into());
        }
        if self.queue_proxy_image.trim().is_empty() {
            return Err("--queue-proxy-image (THAW_QUEUE_PROXY_IMAGE) must name an image".into());
        }
        Ok(())
    }

    /// `THAW_WEBHOOK_CERT_SECRET`, unless set empty.
    pub fn cert_secret(&self) -> Option<&str> {
        self.cert_secret
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<WebhookConfig, clap::Error> {
        WebhookConfig::try_parse_from(
            std::iter::once("activator webhook").chain(args.iter().copied()),
        )
    }

    #[test]
    fn defaults_are_the_manifests() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.port, 8443);
        assert_eq!(c.service, "thaw-webhook");
        assert_eq!(c.webhook_config, "thaw-sidecar-injector");
        assert_eq!(c.cert_store, "thaw-webhook-certs");
        assert_eq!(c.max_body, 3 << 20);
        assert_eq!(c.queue_proxy_image, DEFAULT_IMAGE);
        c.validate().unwrap();
        assert_eq!(c.cert_secret(), None);
        let c = parse(&["--cert-secret", " "]).unwrap();
        assert_eq!(c.cert_secret(), None);
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(parse(&["--port", "https"]).is_err());
        assert!(parse(&["--max-body", "0"]).is_err());
        assert!(parse(&["--max-body", "lots"]).is_err());
        assert!(parse(&["--request-timeout", "soon"]).is_err());
        assert!(parse(&["--service", ""]).unwrap().validate().is_err());
        assert!(parse(&["--queue-proxy-image", " "])
            .unwrap()
            .validate()
            .is_err());
    }
}
