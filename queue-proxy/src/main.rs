//! `queue-proxy`: everything happens in [`thaw_queue_proxy::cli::main`].

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    thaw_queue_proxy::cli::main(&args)
}
