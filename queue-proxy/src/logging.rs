//! JSON log lines on stdout, at the level Knative configures (`RUST_LOG` overrides it).

use tracing_subscriber::EnvFilter;

/// Maps Knative's zap level names onto tracing's.
fn level_from_knative(level: &str) -> &'static str {
    match level {
        "debug" => "debug",
        "warn" | "warning" => "warn",
        "error" | "dpanic" | "panic" | "fatal" => "error",
        _ => "info",
    }
}

pub fn init(knative_level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(level_from_knative(knative_level)));
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .init();
}
