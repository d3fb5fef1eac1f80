//! Logging at the level Knative configures (`RUST_LOG` overrides it).

/// Maps Knative's zap level names onto tracing's.
fn level_from_knative(level: &str) -> &'static str {
    match level {
        "debug" => "debug",
        "warn" | "warning" => "warn",
        "error" | "dpanic" | "panic" | "fatal" => "error",
        _ => "info",
    }
}

/// Installs the subscriber; with a tracer, request spans are exported too.
pub fn init(knative_level: &str, tracer: Option<thaw_shared::trace::Tracer>) {
    thaw_shared::logging::init_traced(
        level_from_knative(knative_level),
        thaw_shared::logging::LogFormat::Json,
        tracer,
    );
}
