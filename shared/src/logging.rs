//! Log lines on stdout: JSON for machines (the default, and what Knative's tooling
//! expects), or plain text for a person at a terminal. `RUST_LOG` overrides the level.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
    /// Text when stdout is a terminal, JSON otherwise.
    Auto,
}

/// Installs the process-wide subscriber at `default_level` unless `RUST_LOG` is set.
pub fn init(default_level: &str) {
    init_with(default_level, LogFormat::Json);
}

/// As [`init`], choosing the format.
pub fn init_with(default_level: &str, format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let text = match format {
        LogFormat::Json => false,
        LogFormat::Text => true,
        LogFormat::Auto => std::io::stdout().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout);
    if text {
        builder.with_target(false).init();
    } else {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init();
    }
}
