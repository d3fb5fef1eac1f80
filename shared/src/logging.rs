//! Log lines on stdout: JSON for machines (the default, and what Knative's tooling
//! expects), or plain text for a person at a terminal. `RUST_LOG` overrides the level.

use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing_subscriber::EnvFilter;

/// Changes the installed subscriber's level; set once by [`init_with`].
type SetLevel = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;
static SET_LEVEL: OnceLock<SetLevel> = OnceLock::new();

/// Why the level could not be changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LevelError {
    #[error("RUST_LOG is set, and it wins over configured levels")]
    Overridden,
    #[error("no subscriber installed by this module")]
    NotInstalled,
    #[error("invalid log level {0:?}")]
    Invalid(String),
    #[error("{0}")]
    Reload(String),
}

/// Sets the level of every log line from now on (`debug`, `info`, `warn`, `error`),
/// as a config map watcher does when it changes. `RUST_LOG`, when set, keeps winning.
pub fn set_level(level: &str) -> Result<(), LevelError> {
    if std::env::var_os("RUST_LOG").is_some() {
        return Err(LevelError::Overridden);
    }
    let filter = EnvFilter::try_new(level).map_err(|_| LevelError::Invalid(level.to_owned()))?;
    let filter = without_spans(filter);
    let set = SET_LEVEL.get().ok_or(LevelError::NotInstalled)?;
    set(filter).map_err(LevelError::Reload)
}

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

/// Log lines never show the request spans kept for tracing: they are for the exporter.
fn without_spans(filter: EnvFilter) -> EnvFilter {
    match format!("{}=off", crate::trace::TARGET).parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    }
}

/// As [`init_with`], and when `tracer` is given, the request spans (target
/// [`crate::trace::TARGET`], and only those) also go to it. Without a tracer the
/// subscriber is exactly [`init_with`]'s, so tracing off costs the log path nothing.
pub fn init_traced(default_level: &str, format: LogFormat, tracer: Option<crate::trace::Tracer>) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let Some(tracer) = tracer else {
        return init_with(default_level, format);
    };
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    // Per-layer filters: the log level must not decide which spans are exported.
    let (filter, handle) = tracing_subscriber::reload::Layer::new(without_spans(filter));
    let _ = SET_LEVEL.set(Box::new(move |f| {
        handle.reload(f).map_err(|e| e.to_string())
    }));
    let spans = tracing_subscriber::filter::Targets::new()
        .with_target(crate::trace::TARGET, tracing::Level::TRACE);
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_level(false)
        .with_target(false)
        // `busy_ns`/`idle_ns` on every span: two clock reads per poll of a request, and
        // attributes no Knative span has.
        .with_tracked_inactivity(false)
        .with_filter(spans);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stdout);
    let text = match format {
        LogFormat::Json => false,
        LogFormat::Text => true,
        LogFormat::Auto => std::io::stdout().is_terminal(),
    };
    let registry = tracing_subscriber::registry().with(otel);
    if text {
        registry
            .with(fmt.with_target(false).with_filter(filter))
            .init();
    } else {
        let fmt = fmt
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false);
        registry.with(fmt.with_filter(filter)).init();
    }
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
    // The two formats are different types; what the reload handle needs is the same.
    if text {
        let builder = builder.with_target(false).with_filter_reloading();
        let handle = builder.reload_handle();
        let _ = SET_LEVEL.set(Box::new(move |f| {
            handle.reload(f).map_err(|e| e.to_string())
        }));
        builder.init();
    } else {
        let builder = builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_filter_reloading();
        let handle = builder.reload_handle();
        let _ = SET_LEVEL.set(Box::new(move |f| {
            handle.reload(f).map_err(|e| e.to_string())
        }));
        builder.init();
    }
}
