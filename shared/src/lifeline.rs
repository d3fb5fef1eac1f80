//! Child processes that die with their parent, however it dies.
//!
//! `kill_on_drop` and process groups clean up after a parent that exits normally or
//! panics (destructors run). A parent killed by SIGKILL runs nothing, so its children
//! would live on, orphaned: pods of an activator, apps of a test. Linux's
//! `PR_SET_PDEATHSIG` makes the kernel send the child a signal when its parent goes, but it
//! must be set *in the child*, between fork and exec. In Rust that is `pre_exec`, which
//! is `unsafe`, and the workspace forbids `unsafe`. So:
//!
//! - [`command`] runs the program through util-linux's `setpriv --pdeathsig KILL --`,
//!   which sets it and then execs the program in place (same pid, same process group,
//!   same descriptors). Without `setpriv` (not Linux, or util-linux missing) the program
//!   runs directly, without that guarantee, and a warning says so once.
//! - Our own binaries can also set it themselves at start ([`die_with_parent`]), given the
//!   parent's pid in [`THAW_PARENT_PID`], which also catches a parent that died before
//!   the child got that far.
//!
//! The caveat: the kernel's "parent" is the *thread* that forked, not the process. The
//! signal fires when that thread exits, even while the process lives on. So spawn from
//! threads that live as long as the children should: tokio's worker threads and a
//! current-thread runtime's thread do (they end with the runtime); `spawn_blocking`
//! threads do not (they exit after 10 s idle) and must never spawn these children.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use tokio::process::Command;

/// Our binaries' variable: the pid of the parent they must not outlive.
pub const THAW_PARENT_PID: &str = "THAW_PARENT_PID";

/// A command for `program` whose process gets SIGKILL when the spawning thread exits
/// (see the module doc). Add arguments, environment and the rest as usual.
pub fn command(program: impl AsRef<OsStr>) -> Command {
    match setpriv() {
        Some(setpriv) => {
            let mut command = Command::new(setpriv);
            command.args(["--pdeathsig", "KILL", "--"]).arg(program);
            command
        }
        None => Command::new(program),
    }
}

/// Whether [`command`] can promise the parent-death signal on this machine.
pub fn available() -> bool {
    setpriv().is_some()
}

/// `setpriv`, if it is on `PATH` (or in `/usr/bin`) and knows `--pdeathsig` (util-linux
/// 2.33 and later): checked once, by running it.
fn setpriv() -> Option<&'static Path> {
    static FOUND: OnceLock<Option<PathBuf>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            let found = find_setpriv().filter(|path| {
                std::process::Command::new(path)
                    .args(["--pdeathsig", "KILL", "--", "true"])
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            });
            if found.is_none() {
                tracing::warn!(
                    "setpriv (util-linux) with --pdeathsig not found: child processes will \
                     not be killed if this process is killed with SIGKILL"
                );
            }
            found
        })
        .as_deref()
}

fn find_setpriv() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/bin")])
        .map(|dir| dir.join("setpriv"))
        .find(|candidate| candidate.is_file())
}

/// The parent is gone, or the signal could not be set.
#[derive(Debug, thiserror::Error)]
pub enum LifelineError {
    #[error("the parent process {0} is gone already")]
    Orphaned(i32),
    #[error("cannot ask for a signal at the parent's death: {0}")]
    Prctl(std::io::Error),
}

/// Parses a [`THAW_PARENT_PID`] value: a process id above 1 (0 and 1 would mean "no
/// parent" and init).
pub fn parse_parent_pid(value: &str) -> Result<i32, String> {
    value
        .trim()
        .parse()
        .ok()
        .filter(|pid: &i32| *pid > 1)
        .ok_or_else(|| format!("expected a process id above 1, got {value:?}"))
}

/// For our own binaries, at start, given [`THAW_PARENT_PID`]: ask the kernel for SIGKILL
/// when the parent goes, and fail if it has gone already (it died between spawning us and
/// this call, so the signal would never come). In a Kubernetes pod the variable is unset
/// and this is not called: there is no parent to follow.
pub fn die_with_parent(expected: i32) -> Result<(), LifelineError> {
    #[cfg(target_os = "linux")]
    {
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
            .map_err(|e| LifelineError::Prctl(e.into()))?;
        if nix::unistd::getppid().as_raw() != expected {
            return Err(LifelineError::Orphaned(expected));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_pids_are_checked() {
        assert_eq!(parse_parent_pid(" 4242 "), Ok(4242));
        for bad in ["", "abc", "1", "0", "-5", "99999999999"] {
            assert!(parse_parent_pid(bad).is_err(), "{bad}");
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_parent_that_is_not_ours_counts_as_gone() {
        // Our parent is the test runner, not pid 2 (kthreadd).
        assert!(matches!(
            die_with_parent(2),
            Err(LifelineError::Orphaned(2))
        ));
        // Undo it: the test binary must not die with its runner's thread.
        let _ = nix::sys::prctl::set_pdeathsig(None);
    }
}
