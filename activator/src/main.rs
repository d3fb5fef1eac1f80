//! `activator`: parses flags, sets up logging and the runtime, and runs.

use std::process::ExitCode;

use thaw_activator::config::PlatformKind;
use thaw_activator::platform::knative::TracingAtStartError;

/// Exit status for a usage or configuration error (sysexits' EX_USAGE).
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    // The local platform runs pods' queue-proxies as `activator queue-proxy`, so a single
    // binary is all a fresh checkout needs.
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("queue-proxy") {
        return thaw_queue_proxy::cli::main(&args[2..]);
    }
    if args.get(1).map(String::as_str) == Some("webhook") {
        return thaw_activator::webhook::main(&args[2..]);
    }
    let config = match thaw_activator::config::parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                print!("{e}");
                return ExitCode::SUCCESS;
            }
            // clap's message spans several lines (usage, hints); the first says what is wrong.
            let rendered = e.to_string();
            let first = rendered.lines().next().unwrap_or("invalid arguments");
            eprintln!(
                "activator: {} (see --help)",
                first.trim_start_matches("error: ")
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = thaw_shared::runtime::build(config.worker_threads);
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("activator: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Knative's activator reads its tracing settings from config-observability at start;
    // so does this one on the Knative platform, unless a flag sets them.
    let mut config = config;
    if config.platform == PlatformKind::Knative && !config.tracing_flags_given() {
        match runtime.block_on(thaw_activator::platform::knative::tracing_at_start(&config)) {
            Ok(t) => config.tracing_from_platform = Some(t),
            Err(e) if e.is_config() => {
                eprintln!("activator: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
            // No client at all: the platform fails on it next, and says so.
            Err(TracingAtStartError::Client(..)) => {}
            Err(e) => eprintln!("activator: {e}; tracing is off"),
        }
    }
    let tracing_config = match config.tracing() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("activator: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let (exporter, tracer) = if tracing_config.is_on() {
        let pod = config.pod_name.clone();
        let resource = [
            ("service.name", "activator"),
            ("k8s.pod.name", pod.as_str()),
        ];
        match thaw_shared::trace::Tracing::start(&tracing_config, &resource) {
            Ok((exporter, tracer)) => (Some(exporter), Some(tracer)),
            // A bad OTEL_* variable is a bad setting, as a bad flag is.
            Err(e) if e.is_config() => {
                eprintln!("activator: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
            Err(e) => {
                eprintln!("activator: tracing: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        (None, None)
    };
    thaw_shared::logging::init_traced(&config.log_level, config.log_format.into(), tracer);
    let result = runtime.block_on(thaw_activator::run(config));
    // Drained: the last spans leave before the process does.
    if let Some(exporter) = exporter {
        exporter.shutdown();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is_config() => {
            eprintln!("activator: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => {
            tracing::error!(error = %e, "activator failed");
            eprintln!("activator: {e}");
            ExitCode::FAILURE
        }
    }
}

/// jemalloc with a purging background thread (configured at build time in
/// `.cargo/config.toml`): glibc kept 304 MiB of a 10 000-connection burst 10 s after it
/// ended, jemalloc gives all but 24 MiB back, at no cost per request (README "Performance").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
