//! `activator`: parses flags, sets up logging and the runtime, and runs.

use std::process::ExitCode;

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
    thaw_activator::logging::init_with(&config.log_level, config.log_format.into());
    let runtime = thaw_shared::runtime::build(config.worker_threads);
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("activator: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(thaw_activator::run(config)) {
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
