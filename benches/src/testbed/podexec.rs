//! `thaw-testbed-node pod-exec`: the last step before a container's process runs, in
//! place of a container runtime's shim. The node starts it with the container's
//! environment already set; it enters the pod's network namespace, takes a mount and a
//! UTS namespace of its own (so the pod's volumes, `resolv.conf` and hostname are seen by
//! this container only), and then becomes the container's program through `exec`, so the
//! node's child *is* the container's process and signals reach it directly.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::signal::Signal;

/// One bind mount: a host path shown at `target` inside the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub source: PathBuf,
    pub target: PathBuf,
    pub read_only: bool,
}

impl Bind {
    /// The `--bind` argument form: `SOURCE=TARGET` or `SOURCE=TARGET:ro`.
    pub fn to_arg(&self) -> String {
        format!(
            "{}={}{}",
            self.source.display(),
            self.target.display(),
            if self.read_only { ":ro" } else { "" }
        )
    }

    pub fn from_arg(arg: &str) -> Result<Self, String> {
        let (source, rest) = arg
            .split_once('=')
            .ok_or_else(|| format!("--bind {arg:?}: expected SOURCE=TARGET[:ro]"))?;
        let (target, read_only) = match rest.strip_suffix(":ro") {
            Some(t) => (t, true),
            None => (rest, false),
        };
        if !target.starts_with('/') || source.is_empty() {
            return Err(format!(
                "--bind {arg:?}: both paths must be given, the target absolute"
            ));
        }
        Ok(Self {
            source: source.into(),
            target: target.into(),
            read_only,
        })
    }
}

/// What to set up before `exec`.
#[derive(Debug, Clone)]
pub struct PodExec {
    /// `/run/netns/<name>`; none for a `hostNetwork` pod.
    pub netns: Option<PathBuf>,
    pub hostname: String,
    pub binds: Vec<Bind>,
    pub workdir: Option<PathBuf>,
    /// The node's pid: if it is already gone, do not start at all.
    pub parent: i32,
    pub program: PathBuf,
    /// argv\[1..\].
    pub args: Vec<String>,
}

/// Sets everything up and execs; returns only on failure, with the reason. The caller
/// prints it (it lands in the container's log) and exits 127/126 as a runtime would.
pub fn exec(spec: &PodExec) -> String {
    match try_exec(spec) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn try_exec(spec: &PodExec) -> Result<std::convert::Infallible, String> {
    // Die with the node, whatever kills it: a container must not outlive its kubelet here.
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(|e| format!("prctl: {e}"))?;
    if nix::unistd::getppid().as_raw() != spec.parent {
        return Err("the node exited before the container started".to_owned());
    }
    if let Some(path) = &spec.netns {
        let netns = File::open(path)
            .map_err(|e| format!("cannot open network namespace {}: {e}", path.display()))?;
        setns(&netns, CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("cannot enter {}: {e}", path.display()))?;
    }
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS)
        .map_err(|e| format!("cannot unshare mount and UTS namespaces: {e}"))?;
    // Private, so this container's mounts never show on the host or in other pods.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| format!("cannot make / private: {e}"))?;
    nix::unistd::sethostname(&spec.hostname)
        .map_err(|e| format!("cannot set hostname {:?}: {e}", spec.hostname))?;
    for bind in &spec.binds {
        bind_mount(bind)?;
    }
    if let Some(dir) = &spec.workdir {
        nix::unistd::chdir(dir)
            .map_err(|e| format!("cannot chdir to working directory {}: {e}", dir.display()))?;
    }
    // Its own session and process group, so that the node can kill whatever the
    // container started along with it.
    nix::unistd::setsid().map_err(|e| format!("setsid: {e}"))?;
    let program = c_string(spec.program.as_os_str())?;
    let mut argv = vec![program.clone()];
    for a in &spec.args {
        argv.push(c_string(OsStr::new(a))?);
    }
    nix::unistd::execv(&program, &argv)
        .map_err(|e| format!("cannot execute {}: {e}", spec.program.display()))
}

fn bind_mount(bind: &Bind) -> Result<(), String> {
    let source_is_dir = bind.source.is_dir();
    ensure_target(&bind.target, source_is_dir)
        .map_err(|e| format!("cannot create mount point {}: {e}", bind.target.display()))?;
    mount(
        Some(&bind.source),
        &bind.target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| {
        format!(
            "cannot mount {} at {}: {e}",
            bind.source.display(),
            bind.target.display()
        )
    })?;
    if bind.read_only {
        mount(
            None::<&str>,
            &bind.target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| format!("cannot make {} read-only: {e}", bind.target.display()))?;
    }
    Ok(())
}

/// A mount point must exist. Directories made here are made on the host's filesystem
/// (there is no image root to make them in); they stay empty there.
fn ensure_target(target: &Path, dir: bool) -> std::io::Result<()> {
    if dir {
        return std::fs::create_dir_all(target);
    }
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if !target.exists() {
        File::create(target)?;
    }
    Ok(())
}

fn c_string(s: &OsStr) -> Result<CString, String> {
    CString::new(s.as_bytes()).map_err(|_| format!("{s:?} contains a NUL byte"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn bind_arguments_round_trip() {
        let b = Bind {
            source: "/state/pods/x/volumes/config".into(),
            target: "/etc/config".into(),
            read_only: true,
        };
        assert_eq!(Bind::from_arg(&b.to_arg()).unwrap(), b);
        let rw = Bind::from_arg("/a=/b").unwrap();
        assert!(!rw.read_only);
        assert!(Bind::from_arg("/a").is_err());
        assert!(Bind::from_arg("/a=relative").is_err());
        assert!(Bind::from_arg("=/b").is_err());
    }
}
