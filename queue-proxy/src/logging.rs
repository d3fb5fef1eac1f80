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

pub fn init(knative_level: &str) {
    thaw_shared::logging::init(level_from_knative(knative_level));
}
