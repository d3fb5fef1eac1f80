//! The queue-proxy's command-line entry point, as a library function so that another
//! binary (the activator, running the local platform) can act as a queue-proxy too.

use std::process::ExitCode;

use crate::config::{self, Config};

/// Exit status for a configuration error (sysexits' EX_USAGE, as linkerd2-proxy uses).
pub const EXIT_CONFIG: u8 = 64;

/// Reads the environment, sets up logging and the runtime, and runs until drained.
/// `args` excludes the program name.
pub fn main(args: &[String]) -> ExitCode {
    match args.first().map(String::as_str) {
        None => {}
        Some("--help" | "-h" | "help") => {
            print!("{}", config::help());
            return ExitCode::SUCCESS;
        }
        Some("--version" | "-V") => {
            println!("queue-proxy {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!(
                "queue-proxy: unexpected argument {other:?}; configuration comes from the environment (see --help)"
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    }
    let config = match Config::from_process_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("queue-proxy: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    crate::logging::init(&config.logging_level);

    // A sidecar is sized for about one core: a current-thread runtime beats a pool there
    // (measured in benches/), so more threads are opt-in.
    let runtime = thaw_shared::runtime::build(Some(config.worker_threads.unwrap_or(1)));
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("queue-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(crate::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "queue-proxy failed");
            eprintln!("queue-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}
