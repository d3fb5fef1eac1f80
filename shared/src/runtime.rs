//! The tokio runtime both binaries run on.

use std::io;

use tokio::runtime::{Builder, Runtime};

/// A runtime with `threads` workers, or one per CPU this process may use (the standard
/// library reads the cgroup quota). One thread means a current-thread runtime, which does
/// better than a one-worker pool for a sidecar sized to a single core.
pub fn build(threads: Option<usize>) -> io::Result<Runtime> {
    let threads = threads
        .filter(|n| *n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if threads == 1 {
        Builder::new_current_thread().enable_all().build()
    } else {
        Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}
