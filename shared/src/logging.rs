//! JSON log lines on stdout; `RUST_LOG` overrides the configured level.

use tracing_subscriber::EnvFilter;

/// Installs the process-wide subscriber at `default_level` unless `RUST_LOG` is set.
pub fn init(default_level: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .init();
}
