//! The testbed: a real Kubernetes control plane on one machine (started by
//! `benches/testbed/up.sh`), and the node that runs its pods as processes in network
//! namespaces. Tests use [`Testbed`] to get one per test binary.

pub mod dns;
pub mod env;
pub mod images;
pub mod knative;
pub mod network;
pub mod node;
pub mod podexec;
pub mod pods;
pub mod probes;
pub mod quantity;
pub mod services;
pub mod status;
pub mod volumes;
pub mod whoami;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, PostParams};
use kube::Client;

/// A running testbed, started by `benches/testbed/up.sh`.
#[derive(Debug)]
pub struct Testbed {
    pub state_dir: PathBuf,
    pub kubeconfig: PathBuf,
    /// The kubectl built with the control plane (same release).
    pub kubectl: PathBuf,
}

/// Why the testbed cannot run here. Test support: a missing prerequisite is a panic
/// with this text, except [`Unavailable::NotRoot`], which skips.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error("the testbed needs root (network namespaces, a bridge, veth pairs); run the tests as root, or set THAW_TESTBED_REQUIRED=1 to make this a failure")]
    NotRoot,
    #[error("benches/testbed/up.sh failed ({status}); its output:\n{output}")]
    UpFailed { status: String, output: String },
}

impl Testbed {
    /// The testbed of this test binary: started on first use (building the control plane
    /// the first time, which takes a while), torn down by its watchdog as soon as this
    /// process exits, however it exits. `None` when not running as root: the test then
    /// returns early, after saying so on stderr.
    pub fn shared() -> Option<&'static Testbed> {
        static TESTBED: OnceLock<Result<Testbed, String>> = OnceLock::new();
        let result = TESTBED.get_or_init(|| Testbed::start().map_err(|e| e.to_string()));
        match result {
            Ok(t) => Some(t),
            Err(e)
                if e.starts_with("the testbed needs root")
                    && std::env::var("THAW_TESTBED_REQUIRED").as_deref() != Ok("1") =>
            {
                eprintln!("skipping: {e}");
                None
            }
            Err(e) => panic!("{e}"),
        }
    }

    fn start() -> Result<Testbed, Unavailable> {
        if !nix::unistd::geteuid().is_root() {
            return Err(Unavailable::NotRoot);
        }
        let bin_dir = crate::harness::bin_dir();
        let target = bin_dir
            .parent()
            .map(Path::to_owned)
            .unwrap_or_else(|| bin_dir.clone());
        let binary = std::env::current_exe()
            .ok()
            .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "tests".to_owned());
        // `testbed-0a1b2c…` → `testbed`: one state folder per test binary, reused.
        let name = binary.rsplit_once('-').map_or(binary.as_str(), |(n, _)| n);
        let state_dir = target.join("testbed").join("tests").join(name);
        let up = repo_root().join("benches/testbed/up.sh");
        let output = Command::new(&up)
            .arg(&state_dir)
            .env("CARGO_TARGET_DIR", &target)
            .env("THAW_TESTBED_BIN_DIR", &bin_dir)
            .env("THAW_TESTBED_WATCH_PID", std::process::id().to_string())
            .output()
            .map_err(|e| Unavailable::UpFailed {
                status: format!("cannot run {}: {e}", up.display()),
                output: String::new(),
            })?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let kubeconfig = stdout
            .lines()
            .last()
            .and_then(|l| l.strip_prefix("KUBECONFIG="))
            .map(PathBuf::from);
        match kubeconfig {
            Some(kubeconfig) if output.status.success() => {
                let kubectl = std::fs::read_dir(target.join("testbed"))
                    .ok()
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path().join("bin/kubectl"))
                    .find(|p| p.exists())
                    .unwrap_or_else(|| PathBuf::from("kubectl"));
                Ok(Testbed {
                    state_dir,
                    kubeconfig,
                    kubectl,
                })
            }
            _ => Err(Unavailable::UpFailed {
                status: output.status.to_string(),
                output: format!("{stdout}{stderr}"),
            }),
        }
    }

    /// A client for the admin user, bound to the calling test's runtime.
    pub async fn client(&self) -> Client {
        let kubeconfig = kube::config::Kubeconfig::read_from(&self.kubeconfig)
            .unwrap_or_else(|e| panic!("kubeconfig {}: {e}", self.kubeconfig.display()));
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .unwrap_or_else(|e| panic!("kubeconfig {}: {e}", self.kubeconfig.display()));
        Client::try_from(config).unwrap_or_else(|e| panic!("kube client: {e}"))
    }

    /// A fresh namespace for one test, once its `default` service account exists (pods
    /// are refused before that).
    pub async fn namespace(&self, client: &Client, prefix: &str) -> String {
        let name = format!("{prefix}-{:08x}", fastrand::u32(..));
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name}
        }))
        .unwrap_or_default();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &name);
        for _ in 0..300 {
            if matches!(accounts.get_opt("default").await, Ok(Some(_))) {
                return name;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("namespace {name} got no default service account within 30 s");
    }

    /// What a container of a pod wrote to stdout and stderr (all its runs).
    pub fn container_log(&self, namespace: &str, pod: &str, container: &str) -> String {
        let prefix = format!("{namespace}_{pod}_");
        std::fs::read_dir(self.state_dir.join("pods"))
            .ok()
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .filter_map(|e| std::fs::read_to_string(e.path().join(format!("{container}.log"))).ok())
            .collect()
    }

    /// Runs the testbed's kubectl; returns (success, stdout + stderr).
    pub fn kubectl(&self, args: &[&str]) -> (bool, String) {
        match Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
        {
            Ok(out) => (
                out.status.success(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            ),
            Err(e) => (false, format!("cannot run {}: {e}", self.kubectl.display())),
        }
    }
}

impl Testbed {
    /// Stops the API server (SIGTERM, then SIGKILL after 10 s) for an outage test, and
    /// returns what restarts it with the same command line. Pods, etcd and the node keep
    /// running; everything that talks to the API server sees connections refused.
    pub fn stop_apiserver(&self) -> StoppedApiserver {
        let pid_file = self.state_dir.join("pids/kube-apiserver.pid");
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| panic!("no API server pid in {}", pid_file.display()));
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .unwrap_or_else(|e| panic!("API server {pid} is not running: {e}"));
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let target = nix::unistd::Pid::from_raw(pid);
        let _ = nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGTERM);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        // Gone once /proc no longer shows it running (a zombie counts as gone: PID 1
        // here reaps slowly).
        let running = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                !s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
        };
        while running() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if running() {
            let _ = nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGKILL);
        }
        StoppedApiserver {
            args,
            pid_file,
            log: self.state_dir.join("logs/kube-apiserver.log"),
            kubeconfig: self.kubeconfig.clone(),
            kubectl: self.kubectl.clone(),
        }
    }
}

/// An API server stopped by [`Testbed::stop_apiserver`].
#[derive(Debug)]
pub struct StoppedApiserver {
    args: Vec<String>,
    pid_file: PathBuf,
    log: PathBuf,
    kubeconfig: PathBuf,
    kubectl: PathBuf,
}

impl StoppedApiserver {
    /// Starts it again, as up.sh did (its own session, logging to the same file), records
    /// the new pid for down.sh, and waits until it answers.
    pub fn restart(self) {
        let log = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("{}: {e}", self.log.display()));
        let err = log.try_clone().unwrap_or_else(|e| panic!("{e}"));
        let mut child = Command::new("setsid")
            .args(&self.args)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("restarting the API server: {e}"));
        std::fs::write(&self.pid_file, format!("{}\n", child.id()))
            .unwrap_or_else(|e| panic!("{}: {e}", self.pid_file.display()));
        // Reaped here if it exits while we run; down.sh stops it by its pid otherwise.
        std::thread::spawn(move || child.wait());
        for _ in 0..600 {
            let ok = Command::new(&self.kubectl)
                .arg("--kubeconfig")
                .arg(&self.kubeconfig)
                .args(["get", "--raw", "/readyz"])
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("the API server did not come back within 120 s");
    }
}

/// Polls `check` until it holds, panicking with `what` after `within`. Testbed tests
/// wait on controllers and pod start-ups, which on a busy 2-core machine take tens of
/// seconds, so they pass generous bounds here rather than timing anything.
pub async fn until<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The repository's root (this crate lives in `benches/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_owned)
        .unwrap_or_else(|| PathBuf::from("."))
}
