//! Running one pod of the local platform as processes: the app, and a real queue-proxy in
//! front of it, on loopback ports no other pod can take ([`super::ports`]): the
//! queue-proxy's sockets are bound here and inherited, the app's port is reserved.
//!
//! A [`Pod`] is supervised the way a kubelet looks after a pod: when either process exits
//! on its own, the platform hears of it at once ([`PodEvent::Exited`]) and the process is
//! restarted on the same ports with exponential backoff. Stopping a pod follows Kubernetes'
//! order: the queue-proxy gets SIGTERM first and drains (its probes fail, it waits for a
//! quiet period and finishes in-flight requests, which still need the app), then the app.
//!
//! Each process runs in its own process group, so a Ctrl-C in the activator's terminal
//! does not reach the pods behind its back (the activator stops them in order), and so
//! whatever an app forks (a shell wrapper's child, worker processes) is signalled and
//! cleaned up with it.
//!
//! An activator killed outright (SIGKILL, the OOM killer) runs no cleanup, so both
//! processes are also started to die with it (`PR_SET_PDEATHSIG`, through `setpriv`: see
//! `thaw_shared::lifeline`), and the queue-proxy sets it again itself (`THAW_PARENT_PID`).
//! The kernel ties that signal to the spawning *thread*: pods are spawned from the
//! runtime's worker threads (or the main thread of a current-thread runtime), which live
//! as long as the runtime, and never from `spawn_blocking`. What an app forks in turn is
//! not covered: it is killed with the app's group when the activator stops normally, but
//! survives an activator killed outright unless it watches its own parent.

use std::collections::VecDeque;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use thaw_queue_proxy::listen_fds::{self, Listener};
use thaw_shared::lifeline;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Child;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::ports::{AppPort, PodListeners};

/// The first restart waits this long; each further one twice as long as the last.
const BACKOFF_INITIAL: Duration = Duration::from_millis(200);
/// Restarts never wait longer than this.
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A process that ran at least this long before exiting restarts after the initial wait.
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(30);
/// How long the queue-proxy may take beyond its quiet period to finish in-flight requests
/// before it is killed.
const QUEUE_PROXY_GRACE: Duration = Duration::from_secs(35);
/// How long the app may take to exit after SIGTERM before it is killed.
const APP_GRACE: Duration = Duration::from_secs(5);
/// Lines of stderr kept per process, for the report when it exits.
const STDERR_TAIL: usize = 20;
/// Longer output lines are cut to this many bytes, so a process cannot make us buffer
/// without bound.
const MAX_LINE: usize = 4096;
/// After a process exits, how long to wait for the rest of its stderr.
const STDERR_DRAIN: Duration = Duration::from_millis(250);

/// How to run the queue-proxy: a program and the arguments before any of ours.
///
/// In production this is the activator's own executable with `["queue-proxy"]`, or a
/// `queue-proxy` binary next to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueProxyCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
}

/// Everything needed to run one pod of a revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodTemplate {
    pub namespace: String,
    pub revision: String,
    pub configuration: String,
    /// The app's argv. `argv[0]` is looked up in `PATH` unless it contains a `/`; a
    /// relative path resolves against `working_dir`.
    pub command: Vec<String>,
    /// Extra environment for the app, on top of the activator's own.
    pub env: Vec<(String, String)>,
    /// The app's working directory, and where relative paths in `command` resolve (the
    /// directory of the YAML file that declared it).
    pub working_dir: Option<PathBuf>,
    pub container_concurrency: usize,
    pub timeout_seconds: u64,
    pub response_start_timeout_seconds: u64,
    pub idle_timeout_seconds: u64,
    /// A Kubernetes `Probe` as JSON (or a JSON array of them) for
    /// `SERVING_READINESS_PROBE`; `None` means a `tcpSocket` probe on the app's port.
    pub readiness_probe: Option<String>,
    pub queue_proxy: QueueProxyCommand,
    /// The queue-proxy's `THAW_DRAIN_QUIET_PERIOD` (Knative's is 30 s; locally about 1 s).
    pub drain_quiet_period: Duration,
    /// The queue-proxy's `OBSERVABILITY_CONFIG` (JSON; empty for Knative's defaults).
    pub observability_config: String,
}

/// The loopback ports of one pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodPorts {
    /// The app's `PORT`.
    pub app: u16,
    /// The queue-proxy's serving port: where the activator sends requests.
    pub serving: SocketAddr,
    /// The queue-proxy's admin port (`/wait-for-drain`).
    pub admin: u16,
    /// The queue-proxy's autoscaler metrics (Knative's `:9090`), for scraping `Stat`s.
    pub metrics: SocketAddr,
    /// The queue-proxy's Prometheus user metrics (Knative's `:9091`).
    pub user_metrics: u16,
}

/// Something that happened to a running pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodEvent {
    /// The app or the queue-proxy exited on its own (never sent during [`Pod::stop`]).
    Exited {
        pod: u64,
        /// `"app"` or `"queue-proxy"`.
        process: &'static str,
        /// How it ended, e.g. `exit status: 3` or `signal: 9 (SIGKILL)`.
        status: String,
        /// Its last lines of stderr, at most 20, oldest first.
        stderr_tail: Vec<String>,
    },
    /// A process was restarted after an exit and is running again (not necessarily
    /// ready).
    Restarted { pod: u64 },
}

/// A pod could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot start {program}: {source}")]
    Spawn { program: String, source: io::Error },
    #[error("no free loopback port: {0}")]
    NoFreePort(io::Error),
    #[error("the app's command is empty")]
    EmptyCommand,
}

/// One running pod: its app and queue-proxy processes and the task supervising them.
///
/// Stop it with [`Pod::stop`]; dropping it instead kills both processes at once.
#[derive(Debug)]
pub struct Pod {
    pub id: u64,
    pub ports: PodPorts,
    name: Arc<str>,
    pids: Arc<Mutex<Pids>>,
    stop: Option<oneshot::Sender<()>>,
    supervisor: Option<JoinHandle<()>>,
}

impl Pod {
    /// Binds the queue-proxy's ports, reserves the app's, and starts both. Returns once
    /// both are spawned (neither is ready yet). If either cannot be spawned, whatever did
    /// start is killed. `events` hears what later happens to the pod.
    pub async fn start(
        id: u64,
        template: &PodTemplate,
        events: mpsc::UnboundedSender<PodEvent>,
    ) -> Result<Pod, StartError> {
        if template.command.is_empty() {
            return Err(StartError::EmptyCommand);
        }
        // Bound here and held for the pod's life (see `ports`): the queue-proxy inherits
        // them, and no other pod can take them in between.
        let listeners = PodListeners::bind().map_err(StartError::NoFreePort)?;
        let app_port = AppPort::reserve().map_err(StartError::NoFreePort)?;
        let port =
            |l: &std::net::TcpListener| PodListeners::port(l).map_err(StartError::NoFreePort);
        let ports = PodPorts {
            app: app_port.port(),
            serving: SocketAddr::from((Ipv4Addr::LOCALHOST, port(&listeners.serving)?)),
            admin: port(&listeners.admin)?,
            metrics: SocketAddr::from((Ipv4Addr::LOCALHOST, port(&listeners.metrics)?)),
            user_metrics: port(&listeners.user_metrics)?,
        };
        let tls = port(&listeners.tls)?;
        let name: Arc<str> = format!("{}-{id}", template.revision).into();
        let spawner = Spawner::new(template, &name, &ports, tls, listeners, app_port)?;
        let pids = Arc::new(Mutex::new(Pids::default()));

        let mut app = Proc::new(Which::App, Arc::clone(&name), Arc::clone(&pids));
        app.launch(&spawner)?;
        let mut queue_proxy = Proc::new(Which::QueueProxy, Arc::clone(&name), Arc::clone(&pids));
        if let Err(e) = queue_proxy.launch(&spawner) {
            app.kill().await;
            return Err(e);
        }
        tracing::info!(
            pod = %name,
            serving = %ports.serving,
            // Where to scrape the pod: its queue-proxy's stat and user metrics ports.
            metrics = %ports.metrics,
            user_metrics = ports.user_metrics,
            app_port = ports.app,
            app_pid = app.pid().unwrap_or_default(),
            queue_proxy_pid = queue_proxy.pid().unwrap_or_default(),
            "pod started"
        );

        let (stop, stop_rx) = oneshot::channel();
        let supervisor = Supervisor {
            id,
            name: Arc::clone(&name),
            spawner,
            app,
            queue_proxy,
            events,
            drain_quiet_period: template.drain_quiet_period,
        };
        Ok(Pod {
            id,
            ports,
            name,
            pids,
            stop: Some(stop),
            supervisor: Some(tokio::spawn(supervisor.run(stop_rx))),
        })
    }

    /// The pod's name, as the queue-proxy reports it (`<revision>-<id>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Scales the pod down: supervision stops (no more restarts or events), the
    /// queue-proxy gets SIGTERM and drains, finishing in-flight requests (killed if it
    /// takes longer than the quiet period + 35 s), then the app gets SIGTERM (killed after
    /// 5 s). Returns when both are gone.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            // An error means the supervisor is gone already; waiting on it below is enough.
            let _ = stop.send(());
        }
        if let Some(supervisor) = self.supervisor.as_mut() {
            if let Err(e) = supervisor.await {
                tracing::error!(pod = %self.name, error = %e, "pod supervisor failed");
            }
        }
        // Anything the supervisor left running is killed by `drop`.
        self.supervisor = None;
        tracing::info!(pod = %self.name, "pod stopped");
    }

    /// The process ids of the app and the queue-proxy, while they run.
    pub fn pids(&self) -> (Option<u32>, Option<u32>) {
        let pids = lock(&self.pids);
        (pids.app, pids.queue_proxy)
    }
}

impl Drop for Pod {
    /// Kills whatever still runs, so the activator never leaves processes behind.
    fn drop(&mut self) {
        if let Some(supervisor) = self.supervisor.take() {
            // Dropping the task drops its `Child`ren, which kills them too
            // (`kill_on_drop`); the signals below make that immediate.
            supervisor.abort();
        }
        let (app, queue_proxy) = {
            let mut pids = lock(&self.pids);
            (pids.app.take(), pids.queue_proxy.take())
        };
        for pid in [app, queue_proxy].into_iter().flatten() {
            signal_group(pid, Signal::SIGKILL);
        }
    }
}

/// The two processes of a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    App,
    QueueProxy,
}

impl Which {
    fn name(self) -> &'static str {
        match self {
            Which::App => "app",
            Which::QueueProxy => "queue-proxy",
        }
    }
}

/// Pids of the running processes, shared with [`Pod`] so `drop` can kill them without
/// waiting for the supervisor. Each is also its process group's id.
#[derive(Debug, Default)]
struct Pids {
    app: Option<u32>,
    queue_proxy: Option<u32>,
}

/// Builds the commands of a pod's two processes.
struct Spawner {
    app_program: PathBuf,
    /// `argv[0]` as the user wrote it, for error messages.
    app_shown: String,
    app_args: Vec<String>,
    app_env: Vec<(String, String)>,
    app_dir: Option<PathBuf>,
    queue_proxy_program: PathBuf,
    queue_proxy_args: Vec<String>,
    queue_proxy_env: Vec<(String, String)>,
    /// The queue-proxy's sockets; every incarnation inherits them.
    listeners: PodListeners,
    /// Keeps the app's port from being handed to another pod while this one lives.
    _app_port: AppPort,
}

/// Held while spawning. The queue-proxy inherits its listeners through descriptors whose
/// close-on-exec flag is cleared just for the spawn; any process this one spawned at the
/// same moment would inherit them too (an app holding another pod's listener would keep
/// its port bound). Every spawn of the local platform takes this lock, and the activator
/// spawns nothing else.
static SPAWNING: Mutex<()> = Mutex::new(());

impl Spawner {
    fn new(
        template: &PodTemplate,
        pod_name: &str,
        ports: &PodPorts,
        tls_port: u16,
        listeners: PodListeners,
        app_port: AppPort,
    ) -> Result<Self, StartError> {
        let (argv0, args) = template
            .command
            .split_first()
            .ok_or(StartError::EmptyCommand)?;

        let mut app_env = vec![
            ("K_REVISION".to_owned(), template.revision.clone()),
            ("K_CONFIGURATION".to_owned(), template.configuration.clone()),
        ];
        app_env.extend(template.env.iter().cloned());
        // Knative owns PORT: the app must listen where the queue-proxy forwards.
        app_env.push(("PORT".to_owned(), ports.app.to_string()));

        Ok(Spawner {
            app_program: resolve_program(argv0, template.working_dir.as_deref()),
            app_shown: argv0.clone(),
            app_args: args.to_vec(),
            app_env,
            app_dir: template.working_dir.clone(),
            queue_proxy_program: template.queue_proxy.program.clone(),
            queue_proxy_args: template.queue_proxy.args.clone(),
            queue_proxy_env: queue_proxy_env(template, pod_name, ports, tls_port),
            listeners,
            _app_port: app_port,
        })
    }

    /// The program to run, looked up as `execvp` would (a name in `PATH`, a path as it
    /// is). Spawning through `setpriv` (`lifeline`) would otherwise turn a missing
    /// program into a child that exits 127, restarted forever, instead of the clear
    /// start error that fails the waiting requests at once.
    fn executable(
        &self,
        program: &Path,
        shown: &str,
        path: Option<&std::ffi::OsStr>,
    ) -> Result<PathBuf, StartError> {
        if program.to_string_lossy().contains('/') {
            return check_executable(program).map_err(|source| StartError::Spawn {
                program: shown.to_owned(),
                source,
            });
        }
        let inherited = std::env::var_os("PATH");
        let path = path.or(inherited.as_deref()).unwrap_or_default();
        let mut last = io::Error::from(nix::errno::Errno::ENOENT);
        for dir in std::env::split_paths(path) {
            let candidate = dir.join(program);
            match check_executable(&candidate) {
                Ok(found) => return Ok(found),
                // Like execvp: a match that cannot run is remembered, the search goes on.
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => last = e,
                Err(_) => {}
            }
        }
        Err(StartError::Spawn {
            program: shown.to_owned(),
            source: last,
        })
    }

    /// Copies of the queue-proxy's listeners that a child inherits, and the
    /// `THAW_LISTEN_FDS` value naming them. The copies are made without close-on-exec by
    /// clearing the flag with `fcntl`, which needs no `unsafe` (unlike `dup2` in the child
    /// between fork and exec, through `pre_exec`). The caller drops them after the spawn.
    fn inheritable_listeners(&self) -> io::Result<(Vec<OwnedFd>, String)> {
        let l = &self.listeners;
        let mut fds = Vec::new();
        let mut named = Vec::new();
        for (which, listener) in [
            (Listener::Serving, &l.serving),
            (Listener::Tls, &l.tls),
            (Listener::Admin, &l.admin),
            (Listener::Metrics, &l.metrics),
            (Listener::UserMetrics, &l.user_metrics),
        ] {
            let fd = listener.as_fd().try_clone_to_owned()?;
            fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty())).map_err(io::Error::from)?;
            named.push((which, fd.as_raw_fd()));
            fds.push(fd);
        }
        Ok((fds, listen_fds::format(&named)))
    }

    fn spawn(&self, which: Which) -> Result<Child, StartError> {
        let _spawning = lock(&SPAWNING);
        let mut inherited = Vec::new();
        let (mut command, shown) = match which {
            Which::App => {
                let program = self.executable(
                    &self.app_program,
                    &self.app_shown,
                    self.app_env
                        .iter()
                        .rev()
                        .find(|(k, _)| k == "PATH")
                        .map(|(_, v)| std::ffi::OsStr::new(v)),
                )?;
                let mut command = lifeline::command(program);
                command
                    .args(&self.app_args)
                    .envs(self.app_env.iter().cloned());
                if let Some(dir) = &self.app_dir {
                    command.current_dir(dir);
                }
                (command, self.app_shown.clone())
            }
            Which::QueueProxy => {
                let shown = self.queue_proxy_program.display().to_string();
                let (fds, listen_fds) =
                    self.inheritable_listeners()
                        .map_err(|source| StartError::Spawn {
                            program: shown.clone(),
                            source,
                        })?;
                inherited = fds;
                let path = self
                    .queue_proxy_env
                    .iter()
                    .find(|(k, _)| k == "PATH")
                    .map(|(_, v)| std::ffi::OsStr::new(v));
                let program = self.executable(&self.queue_proxy_program, &shown, path)?;
                let mut command = lifeline::command(program);
                command
                    .args(&self.queue_proxy_args)
                    .env_clear()
                    .envs(self.queue_proxy_env.iter().cloned())
                    .env(listen_fds::THAW_LISTEN_FDS, listen_fds)
                    // Our queue-proxy also asks for the signal itself, which covers a
                    // machine without setpriv and an activator that died mid-spawn.
                    .env(lifeline::THAW_PARENT_PID, std::process::id().to_string());
                (command, shown)
            }
        };
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let child = command.spawn().map_err(|source| StartError::Spawn {
            program: shown,
            source,
        });
        // The child has its copies now; ours close before the lock is released.
        drop(inherited);
        child
    }
}

/// The queue-proxy's environment: what Knative's controller sets (CONTRACT §1.2), plus
/// the `THAW_*` overrides that let many queue-proxies share one machine. Nothing else of
/// the activator's environment leaks in, except `PATH`, Rust's logging and backtrace
/// switches, OpenTelemetry's variables (`OTEL_*`: the batch processor's tuning, the
/// endpoint and sampler overrides) and the trusted roots for a TLS collector
/// (`SSL_CERT_FILE`, `SSL_CERT_DIR`).
fn queue_proxy_env(
    template: &PodTemplate,
    pod_name: &str,
    ports: &PodPorts,
    tls_port: u16,
) -> Vec<(String, String)> {
    let probe = match &template.readiness_probe {
        Some(probe) => probe.clone(),
        None => serde_json::json!({
            "tcpSocket": { "port": ports.app, "host": "127.0.0.1" },
            "successThreshold": 1,
        })
        .to_string(),
    };
    let multi_probes = probe.trim_start().starts_with('[');
    let vars: [(&str, String); 25] = [
        (
            "CONTAINER_CONCURRENCY",
            template.container_concurrency.to_string(),
        ),
        ("QUEUE_SERVING_PORT", ports.serving.port().to_string()),
        // No certificates exist locally, so the TLS listener never opens.
        ("QUEUE_SERVING_TLS_PORT", tls_port.to_string()),
        ("USER_PORT", ports.app.to_string()),
        (
            "REVISION_TIMEOUT_SECONDS",
            template.timeout_seconds.to_string(),
        ),
        (
            "REVISION_RESPONSE_START_TIMEOUT_SECONDS",
            template.response_start_timeout_seconds.to_string(),
        ),
        (
            "REVISION_IDLE_TIMEOUT_SECONDS",
            template.idle_timeout_seconds.to_string(),
        ),
        ("SERVING_LOGGING_CONFIG", String::new()),
        ("SERVING_LOGGING_LEVEL", "info".to_owned()),
        ("SERVING_NAMESPACE", template.namespace.clone()),
        ("SERVING_CONFIGURATION", template.configuration.clone()),
        ("SERVING_REVISION", template.revision.clone()),
        ("SERVING_POD", pod_name.to_owned()),
        ("SERVING_POD_IP", "127.0.0.1".to_owned()),
        ("SERVING_READINESS_PROBE", probe),
        ("ENABLE_MULTI_CONTAINER_PROBES", multi_probes.to_string()),
        ("THAW_LISTEN_ADDRESS", "127.0.0.1".to_owned()),
        ("THAW_ADMIN_PORT", ports.admin.to_string()),
        ("THAW_METRICS_PORT", ports.metrics.port().to_string()),
        ("THAW_USER_METRICS_PORT", ports.user_metrics.to_string()),
        (
            "THAW_DRAIN_QUIET_PERIOD",
            format!("{}ms", template.drain_quiet_period.as_millis()),
        ),
        // Many queue-proxies share a laptop: one thread each is plenty and lightest.
        ("THAW_WORKER_THREADS", "1".to_owned()),
        // A starting app is noticed within 2 ms instead of Knative's 50 ms tick: the
        // cold start is the local platform's most visible latency, and a refused
        // loopback connect costs next to nothing.
        ("THAW_AGGRESSIVE_PROBE_INTERVAL", "2ms".to_owned()),
        ("SERVING_SERVICE", String::new()),
        (
            "OBSERVABILITY_CONFIG",
            template.observability_config.clone(),
        ),
    ];
    let mut env: Vec<(String, String)> = vars
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect();
    for inherited in [
        "PATH",
        "RUST_LOG",
        "RUST_BACKTRACE",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
    ] {
        if let Ok(value) = std::env::var(inherited) {
            env.push((inherited.to_owned(), value));
        }
    }
    // OpenTelemetry's own settings (batch delay, queue size, endpoint and sampler
    // overrides) apply to the whole path, as the tracing flags do.
    env.extend(std::env::vars().filter(|(name, _)| name.starts_with("OTEL_")));
    env
}

/// A relative path with a `/` resolves against the working directory; a bare name is
/// looked up in `PATH` when spawned.
fn resolve_program(argv0: &str, working_dir: Option<&Path>) -> PathBuf {
    let path = Path::new(argv0);
    match working_dir {
        Some(dir) if path.is_relative() && argv0.contains('/') => dir.join(path),
        _ => path.to_path_buf(),
    }
}

/// `path` if it is a file someone may execute: else ENOENT or EACCES, as exec reports.
fn check_executable(path: &Path) -> io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(io::Error::from(nix::errno::Errno::EACCES));
    }
    Ok(path.to_path_buf())
}

/// Sends `signal` to the process group led by `pid`. Errors (mostly "no such process":
/// it is gone already) are of no interest.
fn signal_group(pid: u32, signal: Signal) {
    // Never 0 or 1: those would mean our own group or init's.
    match i32::try_from(pid) {
        Ok(pgid) if pgid > 1 => {
            let _ = killpg(Pid::from_raw(pgid), signal);
        }
        _ => {}
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One of a pod's processes across its restarts.
struct Proc {
    which: Which,
    pod: Arc<str>,
    pids: Arc<Mutex<Pids>>,
    child: Option<Child>,
    /// The process group of the latest incarnation; kept after it exits so that anything
    /// it left behind can be killed.
    group: Option<u32>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    stderr_reader: Option<JoinHandle<()>>,
    started: Instant,
    /// The wait before the next restart.
    backoff: Duration,
    /// When the next restart is due, while the process is down.
    restart_at: Option<Instant>,
}

impl Proc {
    fn new(which: Which, pod: Arc<str>, pids: Arc<Mutex<Pids>>) -> Self {
        Proc {
            which,
            pod,
            pids,
            child: None,
            group: None,
            stderr_tail: Arc::default(),
            stderr_reader: None,
            started: Instant::now(),
            backoff: BACKOFF_INITIAL,
            restart_at: None,
        }
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    fn set_pid(&self, pid: Option<u32>) {
        let mut pids = lock(&self.pids);
        match self.which {
            Which::App => pids.app = pid,
            Which::QueueProxy => pids.queue_proxy = pid,
        }
    }

    /// Spawns a new incarnation and starts reading its output.
    fn launch(&mut self, spawner: &Spawner) -> Result<(), StartError> {
        let mut child = spawner.spawn(self.which)?;
        let stderr_tail = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL)));
        if let Some(stdout) = child.stdout.take() {
            let (which, pod) = (self.which, Arc::clone(&self.pod));
            tokio::spawn(for_each_line(stdout, move |line| match which {
                Which::App => tracing::debug!(pod = %pod, "app: {line}"),
                Which::QueueProxy => relog_queue_proxy(&pod, &line),
            }));
        }
        self.stderr_reader = child.stderr.take().map(|stderr| {
            let (which, pod, tail) = (self.which, Arc::clone(&self.pod), Arc::clone(&stderr_tail));
            tokio::spawn(for_each_line(stderr, move |line| {
                tracing::debug!(pod = %pod, "{} stderr: {line}", which.name());
                let mut tail = lock(&tail);
                if tail.len() == STDERR_TAIL {
                    tail.pop_front();
                }
                tail.push_back(line);
            }))
        });
        self.stderr_tail = stderr_tail;
        self.group = child.id();
        self.set_pid(child.id());
        self.child = Some(child);
        self.started = Instant::now();
        self.restart_at = None;
        Ok(())
    }

    /// The process is gone: forget it, kill whatever it left in its group (it could hold
    /// the ports the next incarnation needs), and collect its last stderr lines.
    async fn reap(&mut self) -> Vec<String> {
        self.child = None;
        self.set_pid(None);
        if let Some(group) = self.group.take() {
            signal_group(group, Signal::SIGKILL);
        }
        if let Some(reader) = self.stderr_reader.take() {
            // Whatever has not arrived by then is not worth holding the report for.
            let _ = tokio::time::timeout(STDERR_DRAIN, reader).await;
        }
        lock(&self.stderr_tail).iter().cloned().collect()
    }

    /// The wait before the next restart. A process that ran long enough starts over
    /// from the initial wait.
    fn next_backoff(&mut self, exited_after_running: bool) -> Duration {
        if exited_after_running && self.started.elapsed() >= BACKOFF_RESET_AFTER {
            self.backoff = BACKOFF_INITIAL;
        }
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        wait
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`. No restart follows.
    async fn terminate(&mut self, grace: Duration) {
        self.restart_at = None;
        if let (Some(child), Some(group)) = (self.child.as_mut(), self.group) {
            signal_group(group, Signal::SIGTERM);
            match tokio::time::timeout(grace, child.wait()).await {
                Ok(Ok(status)) => {
                    tracing::debug!(pod = %self.pod, %status, "{} exited", self.which.name());
                }
                Ok(Err(e)) => {
                    tracing::warn!(pod = %self.pod, error = %e, "cannot wait for the {}; killing it", self.which.name());
                }
                Err(_) => {
                    tracing::warn!(
                        pod = %self.pod,
                        "the {} did not exit within {grace:?} of SIGTERM; killing it",
                        self.which.name()
                    );
                }
            }
        }
        self.kill().await;
    }

    /// SIGKILL to the whole group, and wait for the process to be gone.
    async fn kill(&mut self) {
        if let Some(group) = self.group {
            signal_group(group, Signal::SIGKILL);
        }
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
        self.restart_at = None;
        self.reap().await;
    }
}

/// What woke the supervisor.
enum Wake {
    Stop,
    Exited(Which, io::Result<ExitStatus>),
    RestartDue(Which),
}

/// The task that watches a pod's processes and restarts them.
struct Supervisor {
    id: u64,
    name: Arc<str>,
    spawner: Spawner,
    app: Proc,
    queue_proxy: Proc,
    events: mpsc::UnboundedSender<PodEvent>,
    drain_quiet_period: Duration,
}

impl Supervisor {
    async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        loop {
            let wake = tokio::select! {
                // A dropped sender means the pod was dropped: stop as well.
                _ = &mut stop => Wake::Stop,
                status = wait_exit(&mut self.app.child) => Wake::Exited(Which::App, status),
                status = wait_exit(&mut self.queue_proxy.child) => {
                    Wake::Exited(Which::QueueProxy, status)
                }
                () = sleep_until(self.app.restart_at) => Wake::RestartDue(Which::App),
                () = sleep_until(self.queue_proxy.restart_at) => {
                    Wake::RestartDue(Which::QueueProxy)
                }
            };
            match wake {
                Wake::Stop => break,
                Wake::Exited(which, status) => self.exited(which, status).await,
                Wake::RestartDue(which) => self.restart(which),
            }
        }
        // The queue-proxy first: while it drains, its in-flight requests still need the app.
        self.queue_proxy
            .terminate(self.drain_quiet_period + QUEUE_PROXY_GRACE)
            .await;
        self.app.terminate(APP_GRACE).await;
    }

    async fn exited(&mut self, which: Which, status: io::Result<ExitStatus>) {
        let status = match status {
            Ok(status) => status.to_string(),
            Err(e) => format!("unknown ({e})"),
        };
        let id = self.id;
        let proc = match which {
            Which::App => &mut self.app,
            Which::QueueProxy => &mut self.queue_proxy,
        };
        let stderr_tail = proc.reap().await;
        let wait = proc.next_backoff(true);
        proc.restart_at = Some(Instant::now() + wait);
        tracing::warn!(
            pod = %self.name,
            process = which.name(),
            %status,
            stderr = %stderr_tail.join("\n"),
            "{} exited; restarting in {wait:?}",
            which.name()
        );
        // The platform may have stopped listening; the pod is then about to be stopped.
        let _ = self.events.send(PodEvent::Exited {
            pod: id,
            process: which.name(),
            status,
            stderr_tail,
        });
    }

    fn restart(&mut self, which: Which) {
        let proc = match which {
            Which::App => &mut self.app,
            Which::QueueProxy => &mut self.queue_proxy,
        };
        match proc.launch(&self.spawner) {
            Ok(()) => {
                tracing::info!(pod = %self.name, pid = ?proc.pid(), "{} restarted", which.name());
                let _ = self.events.send(PodEvent::Restarted { pod: self.id });
            }
            Err(e) => {
                let wait = proc.next_backoff(false);
                proc.restart_at = Some(Instant::now() + wait);
                tracing::warn!(pod = %self.name, error = %e, "cannot restart the {}; trying again in {wait:?}", which.name());
            }
        }
    }
}

/// Waits for the child to exit; never returns while there is none.
async fn wait_exit(child: &mut Option<Child>) -> io::Result<ExitStatus> {
    match child {
        Some(child) => child.wait().await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `deadline`; never returns without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Calls `f` with each line of `stream` (without its line ending, cut to [`MAX_LINE`]
/// bytes, invalid UTF-8 replaced) until the stream ends or fails.
async fn for_each_line(stream: impl AsyncRead + Unpin, mut f: impl FnMut(String)) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        let chunk = match reader.fill_buf().await {
            Ok(chunk) if !chunk.is_empty() => chunk,
            _ => break,
        };
        let newline = chunk.iter().position(|&b| b == b'\n');
        let content = newline.unwrap_or(chunk.len());
        let room = MAX_LINE.saturating_sub(line.len());
        line.extend_from_slice(&chunk[..content.min(room)]);
        reader.consume(newline.map_or(content, |i| i + 1));
        if newline.is_some() {
            f(take_line(&mut line));
        }
    }
    if !line.is_empty() {
        f(take_line(&mut line));
    }
}

fn take_line(buf: &mut Vec<u8>) -> String {
    let line = String::from_utf8_lossy(buf)
        .trim_end_matches('\r')
        .to_owned();
    buf.clear();
    line
}

/// The queue-proxy logs JSON lines; only its warnings and errors are worth the
/// activator's log. Its span lines (tracing protocol `stdout`: one top-level `span`
/// object) go to the activator's stdout as they are, beside the activator's own.
fn relog_queue_proxy(pod: &str, line: &str) {
    let Ok(serde_json::Value::Object(fields)) = serde_json::from_str(line) else {
        tracing::debug!(pod, "queue-proxy: {line}");
        return;
    };
    if fields.len() == 1 && fields.get("span").is_some_and(serde_json::Value::is_object) {
        use std::io::Write;
        // One write under stdout's lock, as the log lines are written: never interleaved.
        let _ = std::io::stdout()
            .lock()
            .write_all(format!("{line}\n").as_bytes());
        return;
    }
    let level = fields
        .get("level")
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default();
    let message = fields
        .get("message")
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default();
    if level.eq_ignore_ascii_case("error") {
        tracing::error!(pod, log = line, "queue-proxy: {message}");
    } else if level.eq_ignore_ascii_case("warn") {
        tracing::warn!(pod, log = line, "queue-proxy: {message}");
    } else {
        tracing::trace!(pod, log = line, "queue-proxy: {message}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    const PATIENCE: Duration = Duration::from_secs(20);

    /// A binary the workspace builds, next to the test binary's `deps` directory.
    fn workspace_bin(name: &str) -> Option<PathBuf> {
        let exe = std::env::current_exe().ok()?;
        let path = exe.parent()?.parent()?.join(name);
        path.is_file().then_some(path)
    }

    /// The test app and the queue-proxy, or `None` (with a note) when not built.
    fn binaries() -> Option<(PathBuf, PathBuf)> {
        match (workspace_bin("thaw-testapp"), workspace_bin("queue-proxy")) {
            (Some(app), Some(queue_proxy)) => Some((app, queue_proxy)),
            _ => {
                eprintln!(
                    "skipping: target/debug/thaw-testapp or target/debug/queue-proxy is not \
                     built (cargo build --workspace, or cargo test --workspace)"
                );
                None
            }
        }
    }

    fn template(app: &Path, queue_proxy: &Path) -> PodTemplate {
        PodTemplate {
            namespace: "default".to_owned(),
            revision: "hello-00001".to_owned(),
            configuration: "hello".to_owned(),
            command: vec![app.display().to_string()],
            env: Vec::new(),
            working_dir: None,
            container_concurrency: 0,
            timeout_seconds: 30,
            response_start_timeout_seconds: 0,
            idle_timeout_seconds: 0,
            readiness_probe: None,
            queue_proxy: QueueProxyCommand {
                program: queue_proxy.to_path_buf(),
                args: Vec::new(),
            },
            drain_quiet_period: Duration::from_millis(500),
            observability_config: String::new(),
        }
    }

    /// An HTTP/1.0 GET: the status and the body.
    async fn get(addr: SocketAddr, path: &str, headers: &str) -> io::Result<(u16, String)> {
        let mut stream = TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: hello.default\r\n{headers}\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        let response = String::from_utf8_lossy(&response);
        let (head, body) = response
            .split_once("\r\n\r\n")
            .ok_or_else(|| io::Error::other(format!("no end of headers in {response:?}")))?;
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::other(format!("no status in {head:?}")))?;
        Ok((status, body.to_owned()))
    }

    /// Waits until `/hello` through the queue-proxy answers.
    async fn until_hello(pod: &Pod) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match get(pod.ports.serving, "/hello", "").await {
                Ok((200, body)) => {
                    assert_eq!(body, "hello world\n");
                    return;
                }
                other => assert!(
                    Instant::now() < deadline,
                    "/hello never answered; last: {other:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether the process runs (a zombie does not).
    fn alive(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next())
                .is_some_and(|state| state != 'Z' && state != 'X')
        })
    }

    async fn until_gone(pid: u32) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(pid) {
            assert!(Instant::now() < deadline, "process {pid} still runs");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn next_event(events: &mut mpsc::UnboundedReceiver<PodEvent>) -> PodEvent {
        tokio::time::timeout(PATIENCE, events.recv())
            .await
            .expect("no pod event in time")
            .expect("event channel closed")
    }

    fn running_pids(pod: &Pod) -> (u32, u32) {
        match pod.pids() {
            (Some(app), Some(queue_proxy)) => (app, queue_proxy),
            other => panic!("pod processes not running: {other:?}"),
        }
    }

    #[tokio::test]
    async fn serves_through_the_queue_proxy_and_reports_stats() {
        let Some((app, queue_proxy)) = binaries() else {
            return;
        };
        let (tx, mut events) = mpsc::unbounded_channel();
        let pod = Pod::start(1, &template(&app, &queue_proxy), tx)
            .await
            .expect("pod starts");
        let (app_pid, queue_proxy_pid) = running_pids(&pod);
        assert_eq!(pod.name(), "hello-00001-1");

        until_hello(&pod).await;
        let (status, _) = get(
            pod.ports.metrics,
            "/metrics",
            "Accept: application/protobuf\r\n",
        )
        .await
        .expect("metrics answer");
        assert_eq!(status, 200);

        pod.stop().await;
        assert!(!alive(app_pid), "app still runs after stop");
        assert!(!alive(queue_proxy_pid), "queue-proxy still runs after stop");
        assert!(events.try_recv().is_err(), "no events during a stop");
    }

    #[tokio::test]
    async fn a_crashed_app_is_reported_and_restarted() {
        let Some((app, queue_proxy)) = binaries() else {
            return;
        };
        let (tx, mut events) = mpsc::unbounded_channel();
        let pod = Pod::start(2, &template(&app, &queue_proxy), tx)
            .await
            .expect("pod starts");
        let (first_app, _) = running_pids(&pod);
        until_hello(&pod).await;

        // The queue-proxy answers 502 or the connection breaks; either way the app is gone.
        let _ = get(pod.ports.serving, "/crash", "").await;
        match next_event(&mut events).await {
            PodEvent::Exited {
                pod: 2,
                process: "app",
                status,
                ..
            } => assert!(status.contains('3'), "status {status:?}"),
            other => panic!("expected the app's exit, got {other:?}"),
        }
        assert_eq!(
            next_event(&mut events).await,
            PodEvent::Restarted { pod: 2 }
        );
        until_hello(&pod).await;
        let (second_app, _) = running_pids(&pod);
        assert_ne!(first_app, second_app);
        pod.stop().await;
    }

    #[tokio::test]
    async fn a_crash_loop_reports_stderr_and_keeps_restarting() {
        let (tx, mut events) = mpsc::unbounded_channel();
        let mut crashing = template(Path::new("sh"), Path::new("sleep"));
        crashing.command = [
            "sh",
            "-c",
            "echo starting >&2; echo \"boom on $PORT\" >&2; exit 5",
        ]
        .map(String::from)
        .to_vec();
        crashing.queue_proxy.args = vec!["60".to_owned()];
        let pod = Pod::start(8, &crashing, tx).await.expect("pod starts");
        let boom = format!("boom on {}", pod.ports.app);
        for _ in 0..2 {
            assert_eq!(
                next_event(&mut events).await,
                PodEvent::Exited {
                    pod: 8,
                    process: "app",
                    status: "exit status: 5".to_owned(),
                    stderr_tail: vec!["starting".to_owned(), boom.clone()],
                }
            );
            assert_eq!(
                next_event(&mut events).await,
                PodEvent::Restarted { pod: 8 }
            );
        }
        let (_, queue_proxy) = pod.pids();
        pod.stop().await;
        until_gone(queue_proxy.expect("the stand-in queue-proxy runs")).await;
    }

    #[tokio::test]
    async fn a_killed_queue_proxy_is_reported_and_restarted() {
        let Some((app, queue_proxy)) = binaries() else {
            return;
        };
        let (tx, mut events) = mpsc::unbounded_channel();
        let pod = Pod::start(7, &template(&app, &queue_proxy), tx)
            .await
            .expect("pod starts");
        let (app_pid, first_queue_proxy) = running_pids(&pod);
        until_hello(&pod).await;

        signal_group(first_queue_proxy, Signal::SIGKILL);
        match next_event(&mut events).await {
            PodEvent::Exited {
                pod: 7,
                process: "queue-proxy",
                status,
                ..
            } => assert!(status.contains("SIGKILL"), "status {status:?}"),
            other => panic!("expected the queue-proxy's exit, got {other:?}"),
        }
        assert_eq!(
            next_event(&mut events).await,
            PodEvent::Restarted { pod: 7 }
        );
        until_hello(&pod).await;
        let (same_app, second_queue_proxy) = running_pids(&pod);
        assert_eq!(same_app, app_pid, "the app keeps running");
        assert_ne!(second_queue_proxy, first_queue_proxy);
        pod.stop().await;
    }

    #[tokio::test]
    async fn stop_drains_in_flight_requests_first() {
        let Some((app, queue_proxy)) = binaries() else {
            return;
        };
        let (tx, mut events) = mpsc::unbounded_channel();
        let pod = Pod::start(3, &template(&app, &queue_proxy), tx)
            .await
            .expect("pod starts");
        let (app_pid, queue_proxy_pid) = running_pids(&pod);
        until_hello(&pod).await;

        let serving = pod.ports.serving;
        let slow = tokio::spawn(async move { get(serving, "/delay?ms=1500", "").await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        pod.stop().await;

        let (status, body) = slow
            .await
            .expect("request task")
            .expect("request completes");
        assert_eq!((status, body.as_str()), (200, "ok"));
        assert!(!alive(app_pid), "app still runs after stop");
        assert!(!alive(queue_proxy_pid), "queue-proxy still runs after stop");
        assert!(events.try_recv().is_err(), "no events during a stop");
    }

    #[tokio::test]
    async fn a_bad_command_fails_to_start() {
        let (tx, _events) = mpsc::unbounded_channel();
        let mut bad = template(Path::new("/nonexistent/app"), Path::new("/nonexistent/qp"));
        let err = Pod::start(4, &bad, tx.clone())
            .await
            .expect_err("no such program");
        match &err {
            StartError::Spawn { program, .. } => assert_eq!(program, "/nonexistent/app"),
            other => panic!("expected a spawn error, got {other:?}"),
        }
        assert!(err
            .to_string()
            .starts_with("cannot start /nonexistent/app: "));

        bad.command.clear();
        assert!(matches!(
            Pod::start(4, &bad, tx).await,
            Err(StartError::EmptyCommand)
        ));
    }

    #[tokio::test]
    async fn a_bad_queue_proxy_leaves_no_app_behind() {
        let Some((app, _)) = binaries() else {
            return;
        };
        let (tx, _events) = mpsc::unbounded_channel();
        let marker = format!("process-test-{}-{}", std::process::id(), fastrand::u64(..));
        let mut bad = template(&app, Path::new("/nonexistent/queue-proxy"));
        bad.env
            .push(("THAW_PROCESS_TEST".to_owned(), marker.clone()));
        let err = Pod::start(5, &bad, tx).await.expect_err("no queue-proxy");
        assert!(
            err.to_string()
                .starts_with("cannot start /nonexistent/queue-proxy: "),
            "{err}"
        );

        // No process carries the marker the app was started with.
        let needle = format!("THAW_PROCESS_TEST={marker}");
        let entries = std::fs::read_dir("/proc").expect("/proc");
        for entry in entries.flatten() {
            let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
            let found = environ
                .split(|&b| b == 0)
                .any(|var| var == needle.as_bytes());
            assert!(!found, "the app still runs as {:?}", entry.file_name());
        }
    }

    #[tokio::test]
    async fn dropping_a_pod_kills_its_processes() {
        let Some((app, queue_proxy)) = binaries() else {
            return;
        };
        let (tx, _events) = mpsc::unbounded_channel();
        let pod = Pod::start(6, &template(&app, &queue_proxy), tx)
            .await
            .expect("pod starts");
        let (app_pid, queue_proxy_pid) = running_pids(&pod);
        drop(pod);
        until_gone(app_pid).await;
        until_gone(queue_proxy_pid).await;
    }

    #[tokio::test]
    async fn lines_are_split_and_bounded() {
        let long = "x".repeat(MAX_LINE + 100);
        let input = format!("one\r\ntwo\n{long}\nlast");
        let mut lines = Vec::new();
        for_each_line(input.as_bytes(), |line| lines.push(line)).await;
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0], "one");
        assert_eq!(lines[1], "two");
        assert_eq!(lines[2].len(), MAX_LINE);
        assert_eq!(lines[3], "last");
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let mut proc = Proc::new(
            Which::App,
            Arc::from("pod"),
            Arc::new(Mutex::new(Pids::default())),
        );
        let waits: Vec<u64> = (0..8)
            .map(|_| proc.next_backoff(true).as_millis() as u64)
            .collect();
        assert_eq!(waits, [200, 400, 800, 1600, 3200, 6400, 10_000, 10_000]);
    }

    #[test]
    fn the_queue_proxy_gets_the_knative_environment() {
        let mut template = template(Path::new("app"), Path::new("queue-proxy"));
        template.container_concurrency = 7;
        let ports = PodPorts {
            app: 1001,
            serving: SocketAddr::from((Ipv4Addr::LOCALHOST, 1002)),
            admin: 1003,
            metrics: SocketAddr::from((Ipv4Addr::LOCALHOST, 1004)),
            user_metrics: 1005,
        };
        let env = queue_proxy_env(&template, "hello-00001-9", &ports, 1006);
        let var = |name: &str| env.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
        assert_eq!(var("CONTAINER_CONCURRENCY"), Some("7"));
        assert_eq!(var("QUEUE_SERVING_PORT"), Some("1002"));
        assert_eq!(var("QUEUE_SERVING_TLS_PORT"), Some("1006"));
        assert_eq!(var("USER_PORT"), Some("1001"));
        assert_eq!(var("SERVING_POD"), Some("hello-00001-9"));
        assert_eq!(var("THAW_METRICS_PORT"), Some("1004"));
        assert_eq!(var("THAW_DRAIN_QUIET_PERIOD"), Some("500ms"));
        assert_eq!(var("ENABLE_MULTI_CONTAINER_PROBES"), Some("false"));
        let probe: serde_json::Value =
            serde_json::from_str(var("SERVING_READINESS_PROBE").unwrap_or_default())
                .expect("probe JSON");
        assert_eq!(probe["tcpSocket"]["port"], 1001);
    }

    #[test]
    fn relative_programs_resolve_against_the_working_directory() {
        let dir = Some(Path::new("/srv/app"));
        assert_eq!(
            resolve_program("./app.py", dir),
            Path::new("/srv/app/./app.py")
        );
        assert_eq!(resolve_program("python3", dir), Path::new("python3"));
        assert_eq!(resolve_program("/bin/app", dir), Path::new("/bin/app"));
        assert_eq!(resolve_program("./app.py", None), Path::new("./app.py"));
    }
}
