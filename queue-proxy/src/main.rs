//! `queue-proxy`: everything happens in [`thaw_queue_proxy::cli::main`].

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    thaw_queue_proxy::cli::main(&args)
}

/// jemalloc with a purging background thread (configured at build time in
/// `.cargo/config.toml`): glibc kept 304 MiB of a 10 000-connection burst 10 s after it
/// ended, jemalloc gives all but 24 MiB back, at no cost per request (README "Performance").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
