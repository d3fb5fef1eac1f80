//! Debian's nginx as a one-worker keep-alive reverse proxy: the mature C reference.
//!
//! Started with its own config in a temp dir, as the current user, in the foreground
//! (`daemon off`), and stopped with SIGTERM (nginx's fast shutdown) so its worker goes
//! with it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use thaw_benches::harness;
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// The nginx binary: `/usr/sbin/nginx`, else the first `nginx` on `PATH`.
pub fn find() -> Option<PathBuf> {
    let sbin = PathBuf::from("/usr/sbin/nginx");
    if sbin.is_file() {
        return Some(sbin);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("nginx"))
        .find(|p| p.is_file())
}

/// `nginx -v`'s version line.
pub fn version(bin: &Path) -> String {
    std::process::Command::new(bin)
        .arg("-v")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stderr)
                .trim()
                .trim_start_matches("nginx version: ")
                .to_owned()
        })
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

/// A running nginx.
pub struct Nginx {
    pub addr: SocketAddr,
    child: Option<Child>,
    dir: PathBuf,
}

/// How clients talk to nginx.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    Http1,
    /// `listen … http2` without TLS: h2c with prior knowledge only, as h2load speaks it.
    H2c,
}

fn config(dir: &Path, listen: u16, upstream: SocketAddr, protocol: Listen) -> String {
    let d = dir.display();
    let http2 = match protocol {
        Listen::Http1 => "",
        Listen::H2c => " http2",
    };
    format!(
        r#"worker_processes 1;
daemon off;
error_log {d}/error.log warn;
pid {d}/nginx.pid;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 75s;
    upstream app {{
        server {upstream};
        keepalive 256;
        keepalive_requests 10000000;
    }}
    server {{
        listen 127.0.0.1:{listen}{http2} backlog=4096;
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_max_temp_file_size 0;
        }}
    }}
}}
"#
    )
}

impl Nginx {
    /// Starts an HTTP/1.1 nginx in front of `upstream` and waits until it accepts
    /// connections.
    pub async fn start(bin: &Path, upstream: SocketAddr) -> Result<Nginx, String> {
        Nginx::start_with(bin, upstream, Listen::Http1).await
    }

    /// Starts nginx speaking `protocol` to clients (always HTTP/1.1 keep-alive to
    /// `upstream`) and waits until it accepts connections.
    pub async fn start_with(
        bin: &Path,
        upstream: SocketAddr,
        protocol: Listen,
    ) -> Result<Nginx, String> {
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("thaw-bench-nginx-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["", "client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
            std::fs::create_dir_all(dir.join(sub))
                .map_err(|e| format!("create {}: {e}", dir.join(sub).display()))?;
        }
        let port = harness::free_port();
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config(&dir, port, upstream, protocol))
            .map_err(|e| format!("write {}: {e}", conf.display()))?;
        let child = Command::new(bin)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("start {}: {e}", bin.display()))?;
        let mut nginx = Nginx {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child: Some(child),
            dir,
        };
        let deadline = tokio::time::Instant::now() + harness::EVENTUALLY;
        loop {
            // The master listens before it forks its worker: on a busy machine the port
            // answers (the connection waits in the backlog) while there is no worker yet
            // whose CPU could be sampled. Ready means both.
            if TcpStream::connect(nginx.addr).await.is_ok() && nginx.worker_pid().is_some() {
                return Ok(nginx);
            }
            let exited = nginx
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                let log = std::fs::read_to_string(nginx.dir.join("error.log")).unwrap_or_default();
                return Err(format!("nginx exited with {status}: {}", log.trim()));
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!(
                    "nginx did not listen on {} with a worker process in time",
                    nginx.addr
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn master_pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// The worker process (the one that serves), a child of the master.
    pub fn worker_pid(&self) -> Option<u32> {
        let master = self.master_pid()?;
        let children =
            std::fs::read_to_string(format!("/proc/{master}/task/{master}/children")).ok();
        if let Some(pid) = children
            .as_deref()
            .and_then(|c| c.split_whitespace().next())
            .and_then(|p| p.parse().ok())
        {
            return Some(pid);
        }
        // Without CONFIG_PROC_CHILDREN: scan for a process whose parent is the master.
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let ppid: u32 = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            (ppid == master).then_some(pid)
        })
    }

    /// Fast shutdown: SIGTERM to the master, which stops its worker, then wait.
    pub async fn stop(mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
            }
            if tokio::time::timeout(Duration::from_secs(5), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(pid) = self.child.as_ref().and_then(Child::id) {
            // Not SIGKILL: the worker would outlive the master.
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
