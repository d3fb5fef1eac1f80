//! The tokio runtime both binaries run on.

use std::io;

use tokio::runtime::{Builder, Runtime};

/// A runtime with `threads` workers, or one per CPU this process may use (the standard
/// library reads the cgroup quota). One thread means a current-thread runtime, which does
/// better than a one-worker pool for a sidecar sized to a single core.
pub fn build(threads: Option<usize>) -> io::Result<Runtime> {
    raise_fd_limit();
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

/// Raises the soft limit on open files to the hard one, as Go's runtime does at start: a
/// proxy holds two descriptors per request, and the usual soft default of 1024 runs out
/// long before memory or CPU do. Failing to raise it only leaves the default.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}
