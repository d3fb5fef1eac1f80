//! Builders for end-to-end tests and benches: the real `queue-proxy`, `activator` and test
//! app binaries as child processes on 127.0.0.1 with ephemeral ports.
//!
//! This is test support: it panics with a clear message when something it starts
//! misbehaves, which is what a test wants.
//!
//! Every child is started through [`child`]: `kill_on_drop` covers a test that ends or
//! panics, and `PR_SET_PDEATHSIG` (`thaw_shared::lifeline`) a test binary killed outright,
//! so nothing a test starts outlives it. The signal follows the spawning thread: a test's
//! own thread, or its runtime's workers, both of which last as long as the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// A command for `program` that dies with the test (see the module doc).
pub fn child(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = thaw_shared::lifeline::command(program);
    command.kill_on_drop(true);
    command
}

/// Generous bound for anything that should happen "soon" on a busy 2-core machine.
pub const EVENTUALLY: Duration = Duration::from_secs(15);

/// Polls `check` until it returns true or [`EVENTUALLY`] passes.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + EVENTUALLY;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The directory cargo put the workspace's binaries in (`target/debug` for tests, or
/// wherever the running bench binary lives).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current executable");
    let dir = exe.parent().expect("executable has a directory");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("deps has a parent").to_owned()
    } else {
        dir.to_owned()
    }
}

/// A workspace binary by name, which must have been built.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace` so every binary is built",
        path.display()
    );
    path
}

fn testapp_path() -> PathBuf {
    bin("thaw-testapp")
}

/// The test app as a child process.
pub struct App {
    pub addr: SocketAddr,
    child: Child,
}

impl App {
    pub async fn start(args: &[&str]) -> App {
        let mut child = child(testapp_path())
            .args(["--port", "0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start thaw-testapp");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(EVENTUALLY, lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let addr = line.strip_prefix("listening on ").unwrap().parse().unwrap();
        // Keep draining stdout so the app never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        App { addr, child }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The app's own view of its concurrency.
    pub async fn stats(&self) -> serde_json::Value {
        let (_, _, body) = get(&self.url("/stats")).await;
        serde_json::from_slice(&body).unwrap()
    }

    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
}

/// A free port that nothing listens on (for "app refuses connections").
pub fn closed_port() -> u16 {
    unclaimed_port()
}

/// The lowest port [`unclaimed_port`] hands out: above the well-known and registered
/// services a test machine may run.
const UNCLAIMED_FROM: u32 = 10_000;

/// A port no one listens on, taken from below the kernel's ephemeral range.
///
/// A port found by binding `:0` and closing goes back into the pool that every `bind(0)`
/// and outgoing connection draws from, so a child started a moment later (or the very
/// process about to be told the port) can be handed it first: CI once failed with a
/// queue-proxy's "cannot listen on serving port …: Address already in use". Ports below
/// the ephemeral range are only ever taken by name. Within this process a counter keeps
/// them distinct; the start is spread by pid so test binaries running at once (and a
/// bench next to a test) draw from different places; a bind check skips any in use.
fn unclaimed_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let span = ephemeral_low.saturating_sub(UNCLAIMED_FROM);
    if span < 1_000 {
        // A machine whose ephemeral range starts low leaves no room: fall back to `:0`.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        return l.local_addr().unwrap().port();
    }
    let start = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(UNCLAIMED_FROM + (start + n) % span).unwrap();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("every port from {UNCLAIMED_FROM} to {ephemeral_low} is in use");
}

/// The environment Knative's controller gives a queue-proxy, pointed at `user_port`, with
/// every port ephemeral and bound to loopback.
pub fn knative_env(user_port: u16) -> HashMap<String, String> {
    [
        ("CONTAINER_CONCURRENCY", "0".to_owned()),
        ("QUEUE_SERVING_PORT", "0".to_owned()),
        ("QUEUE_SERVING_TLS_PORT", "0".to_owned()),
        ("USER_PORT", user_port.to_string()),
        ("REVISION_TIMEOUT_SECONDS", "300".to_owned()),
        ("SERVING_LOGGING_CONFIG", String::new()),
        ("SERVING_LOGGING_LEVEL", "info".to_owned()),
        ("SERVING_NAMESPACE", "default".to_owned()),
        ("SERVING_CONFIGURATION", "hello".to_owned()),
        ("SERVING_REVISION", "hello-00001".to_owned()),
        ("SERVING_POD", "hello-00001-deployment-abc".to_owned()),
        ("SERVING_POD_IP", "127.0.0.1".to_owned()),
        ("THAW_LISTEN_ADDRESS", "127.0.0.1".to_owned()),
        ("THAW_ADMIN_PORT", "0".to_owned()),
        ("THAW_METRICS_PORT", "0".to_owned()),
        ("THAW_USER_METRICS_PORT", "0".to_owned()),
        ("THAW_TLS_CERT_FILE", "/nonexistent/tls.crt".to_owned()),
        ("THAW_TLS_KEY_FILE", "/nonexistent/tls.key".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// A child process whose JSON log lines on stdout are kept, and which reported the
/// addresses of its listeners in `listening` lines.
struct Logged {
    what: String,
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
    listeners: HashMap<String, SocketAddr>,
}

/// How many of a child's last log lines a failing test shows.
const LOG_TAIL_ON_FAILURE: usize = 60;

impl Drop for Logged {
    /// A test that fails shows what its processes said last: the logs are otherwise lost
    /// with the process, and a failure seen only in CI could not be told apart.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        let skip = logs.len().saturating_sub(LOG_TAIL_ON_FAILURE);
        eprintln!(
            "--- last {} of {} log lines of {} (pid {:?})",
            logs.len() - skip,
            logs.len(),
            self.what,
            self.child.id()
        );
        for line in &logs[skip..] {
            eprintln!("{line}");
        }
    }
}

impl Logged {
    /// Spawns `cmd` and waits until it has logged a `listening` line for each of `wanted`.
    async fn spawn(cmd: &mut Command, what: &str, wanted: &[&str]) -> Logged {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("start {what}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let sink = Arc::clone(&logs);
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = tx.send(line.clone());
                sink.lock().unwrap().push(line);
            }
        });
        let mut listeners: HashMap<String, SocketAddr> = HashMap::new();
        while !wanted.iter().all(|w| listeners.contains_key(*w)) {
            let line = tokio::time::timeout(EVENTUALLY, rx.recv())
                .await
                .unwrap_or_else(|_| panic!("{what} did not report its listeners in time"))
                .unwrap_or_else(|| panic!("{what} exited before listening"));
            let v: serde_json::Value = serde_json::from_str(&line).expect("log lines are JSON");
            if v["message"] == "listening" {
                let name = v["listener"].as_str().unwrap().to_owned();
                listeners.insert(name, v["address"].as_str().unwrap().parse().unwrap());
            }
        }
        Logged {
            what: what.to_owned(),
            child,
            logs,
            listeners,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id().expect("process still running")
    }

    fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .expect("process did not exit")
            .unwrap()
    }

    fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }
}

/// A running queue-proxy child process and the addresses it bound.
pub struct QueueProxy {
    pub serving: SocketAddr,
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    pub user_metrics: SocketAddr,
    pub tls: Option<SocketAddr>,
    process: Logged,
}

impl QueueProxy {
    /// Starts a queue-proxy in front of `user_port` with `overrides` on top of
    /// [`knative_env`].
    pub async fn start(user_port: u16, overrides: &[(&str, &str)]) -> QueueProxy {
        let mut env = knative_env(user_port);
        for (k, v) in overrides {
            env.insert((*k).to_owned(), (*v).to_owned());
        }
        Self::start_with_env(env).await
    }

    pub async fn start_with_env(env: HashMap<String, String>) -> QueueProxy {
        let mut cmd = child(bin("queue-proxy"));
        cmd.env_clear().envs(env);
        let process = Logged::spawn(
            &mut cmd,
            "queue-proxy",
            &["serving", "admin", "metrics", "user-metrics"],
        )
        .await;
        let found = &process.listeners;
        QueueProxy {
            serving: found["serving"],
            admin: found["admin"],
            metrics: found["metrics"],
            user_metrics: found["user-metrics"],
            tls: found.get("tls").copied(),
            process,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.serving, path)
    }

    pub fn pid(&self) -> i32 {
        self.process.pid() as i32
    }

    pub fn signal(&self, signal: &str) {
        self.process.signal(signal);
    }

    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        self.process.wait_exit(limit).await
    }

    pub fn logs(&self) -> Vec<String> {
        self.process.logs()
    }

    /// The user metrics text.
    pub async fn user_metrics(&self) -> String {
        let (_, _, body) = get(&format!("http://{}/metrics", self.user_metrics)).await;
        String::from_utf8(body.to_vec()).unwrap()
    }

    /// The value of one sample of the user metrics, by metric name (labels ignored except
    /// for an optional `label="value"` fragment to match).
    pub async fn user_metric(&self, name: &str, fragment: &str) -> f64 {
        metric_value(&self.user_metrics().await, name, fragment)
    }
}

pub fn metric_value(text: &str, name: &str, fragment: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            l.starts_with(&format!("{name}{{")) && l.contains(fragment)
                || l.starts_with(&format!("{name} "))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("metric {name} {fragment} not found in:\n{text}"))
}

pub type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

pub fn http1_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2c_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// Sends a request and reads the whole response.
pub async fn send(
    client: &HttpClient,
    req: Request<Full<Bytes>>,
) -> (StatusCode, HeaderMap, Bytes) {
    let resp = client.request(req).await.expect("request failed");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body failed").to_bytes();
    (parts.status, parts.headers, body)
}

pub async fn get(url: &str) -> (StatusCode, HeaderMap, Bytes) {
    send(
        &http1_client(),
        Request::get(url).body(Full::default()).unwrap(),
    )
    .await
}

pub async fn get_with(url: &str, headers: &[(&str, &str)]) -> (StatusCode, HeaderMap, Bytes) {
    let mut req = Request::get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send(&http1_client(), req.body(Full::default()).unwrap()).await
}

/// Opens a raw TCP connection, for malformed and slow requests.
pub async fn raw(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.unwrap()
}

/// An HTTP/1 connection without a pool, for tests that need one connection per request.
pub async fn http1_conn(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    sender
}

/// A free port for configs that must name a port before the process behind it starts.
pub fn free_port() -> u16 {
    unclaimed_port()
}

/// The resident set size of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A running activator child process on the local platform.
pub struct Activator {
    pub http: SocketAddr,
    pub h2c: SocketAddr,
    pub metrics: SocketAddr,
    process: Logged,
    _config: Option<tempfile_path::TempPath>,
}

mod tempfile_path {
    /// A file removed when dropped.
    pub struct TempPath(pub std::path::PathBuf);
    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

impl Activator {
    /// Starts an activator with `yaml` as its local platform config and extra flags.
    pub async fn start(yaml: &str, flags: &[&str]) -> Activator {
        Self::start_with_env(yaml, flags, &[]).await
    }

    /// As [`Activator::start`], with extra environment.
    pub async fn start_with_env(yaml: &str, flags: &[&str], env: &[(&str, &str)]) -> Activator {
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("thaw-activator-{}-{n}.yaml", std::process::id()));
        std::fs::write(&path, yaml).unwrap();
        let config = tempfile_path::TempPath(path);
        let mut args = vec!["--config", config.0.to_str().unwrap()];
        args.extend_from_slice(flags);
        let mut activator = Self::start_with(&args, env).await;
        activator._config = Some(config);
        activator
    }

    /// Starts an activator with these flags and extra environment, on loopback with
    /// ephemeral ports (no platform config file: pass `--platform`).
    pub async fn start_with(flags: &[&str], env: &[(&str, &str)]) -> Activator {
        Self::start_program("activator", &[], flags, env).await
    }

    /// Starts the workspace binary `program`, which runs the activator (the bench's
    /// `thaw-scale-activator`), with `leading` arguments before the activator's flags.
    pub async fn start_program(
        program: &str,
        leading: &[&str],
        flags: &[&str],
        env: &[(&str, &str)],
    ) -> Activator {
        let mut cmd = child(bin(program));
        cmd.args(leading)
            .args([
                "--listen-address",
                "127.0.0.1",
                "--http-port",
                "0",
                "--h2c-port",
                "0",
                "--metrics-port",
                "0",
            ])
            .args(flags)
            .env_remove("RUST_LOG")
            .envs(env.iter().copied());
        let process = Logged::spawn(&mut cmd, program, &["http", "h2c", "metrics"]).await;
        let found = &process.listeners;
        Activator {
            http: found["http"],
            h2c: found["h2c"],
            metrics: found["metrics"],
            process,
            _config: None,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn signal(&self, signal: &str) {
        self.process.signal(signal);
    }

    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        self.process.wait_exit(limit).await
    }

    /// The exit status if the activator has exited, without waiting.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.process.child.try_wait().ok().flatten()
    }

    pub fn logs(&self) -> Vec<String> {
        self.process.logs()
    }

    pub async fn metrics_text(&self) -> String {
        let (_, _, body) = get(&format!("http://{}/metrics", self.metrics)).await;
        String::from_utf8(body.to_vec()).unwrap()
    }

    pub async fn metric(&self, name: &str, fragment: &str) -> f64 {
        metric_value(&self.metrics_text().await, name, fragment)
    }
}

impl Drop for Activator {
    /// The activator's pods run in their own process groups (so a Ctrl-C at a terminal
    /// reaches the activator alone), and the activator itself is killed with no chance to
    /// stop them: kill every pod process it logged starting or restarting, so no process
    /// outlives the test.
    fn drop(&mut self) {
        for line in self.process.logs() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            let message = v["message"].as_str().unwrap_or("");
            if message != "pod started" && !message.ends_with(" restarted") {
                continue;
            }
            for key in ["app_pid", "queue_proxy_pid", "pid"] {
                let pid = v[key].as_i64().or_else(|| {
                    v[key].as_str().and_then(|s| {
                        s.trim_start_matches("Some(")
                            .trim_end_matches(')')
                            .parse()
                            .ok()
                    })
                });
                let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) else {
                    continue;
                };
                // Only a group this pod still leads: its pid may have been reused.
                let leads = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|s| s.rsplit(") ").next().map(str::to_owned))
                    .and_then(|rest| rest.split(' ').nth(2).map(str::to_owned))
                    .is_some_and(|pgrp| pgrp == pid.to_string());
                if leads {
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
    }
}

/// A pod as the local platform runs it: the test app behind a real queue-proxy.
pub struct Pod {
    pub app: App,
    pub queue_proxy: QueueProxy,
}

impl Pod {
    /// Starts a pod whose queue-proxy serves on `serving_port` with `cc`.
    pub async fn start(serving_port: u16, cc: usize, app_args: &[&str]) -> Pod {
        let app = App::start(app_args).await;
        let port = serving_port.to_string();
        let cc = cc.to_string();
        let queue_proxy = QueueProxy::start(
            app.port(),
            &[
                ("QUEUE_SERVING_PORT", &port),
                ("CONTAINER_CONCURRENCY", &cc),
                ("THAW_DRAIN_QUIET_PERIOD", "1s"),
            ],
        )
        .await;
        Pod { app, queue_proxy }
    }
}

impl App {
    /// The app's process id, for the benches' CPU and memory figures.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("test app still running")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_bindable_and_outside_the_ephemeral_range() {
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
        let low: u16 = range.split_whitespace().next().unwrap().parse().unwrap();
        let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
        let mut distinct = ports.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), ports.len(), "a port was handed out twice");
        for port in ports {
            assert!(port < low, "{port} is in the ephemeral range from {low}");
            std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        }
    }
}
