//! Debian's `prometheus` and `promtool` for tests: a real Prometheus server scraping the
//! binaries, queried over its HTTP API, and `promtool`'s checks of what they serve.
//!
//! Test support, like the harness: it panics with a clear message when something is
//! missing or misbehaves. The server is started through [`crate::harness::child`], so it
//! dies with the test, and it keeps its data in a directory of its own, removed after.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::process::Child;

use crate::harness::{child, eventually, free_port, http1_client};

/// The path of a tool from Debian's `prometheus` package. CI installs the package
/// (`.ci/run`); elsewhere a missing tool fails the test with what to install, since a
/// silent skip would leave the dashboards and rules unchecked.
pub fn tool(name: &str) -> PathBuf {
    let dirs = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&dirs)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not installed: these tests need Debian's prometheus package \
                 (`apt-get install -y prometheus`, which has both prometheus and promtool; \
                 .ci/run installs it)"
            )
        })
}

/// Runs `promtool` with `args` and `stdin`, returning its exit code and its combined
/// output.
pub fn promtool(args: &[&str], stdin: &[u8]) -> (i32, String) {
    use std::io::Write;
    let mut child = std::process::Command::new(tool("promtool"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start promtool");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// `promtool check metrics` on one exposition: the lint problems it reports, as
/// (metric name, problem). A body promtool cannot parse fails the test.
pub fn check_metrics(exposition: &str) -> Vec<(String, String)> {
    let (code, out) = promtool(&["check", "metrics"], exposition.as_bytes());
    // promtool exits 0 when clean, 3 when it found lint problems, 1 on a parse error.
    assert!(
        code == 0 || code == 3,
        "promtool check metrics failed (exit {code}):\n{out}\non:\n{exposition}"
    );
    let problems: Vec<(String, String)> = out
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (name, problem) = l.split_once(' ').unwrap_or((l, ""));
            (name.to_owned(), problem.trim().to_owned())
        })
        .collect();
    assert_eq!(
        code == 3,
        !problems.is_empty(),
        "exit {code} disagrees with the output:\n{out}"
    );
    problems
}

/// The metric families of an exposition and their types, from its `# TYPE` lines. Every
/// sample line must belong to a declared family (histogram samples by their suffixes).
pub fn families(exposition: &str) -> BTreeMap<String, String> {
    let mut families = BTreeMap::new();
    for line in exposition.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            families.insert(name.to_owned(), kind.to_owned());
        }
    }
    for line in exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name = line.split(['{', ' ']).next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| families.get(*f).is_some_and(|k| k == "histogram"))
            })
            .unwrap_or(name);
        assert!(
            families.contains_key(family),
            "sample {name} has no # TYPE line in:\n{exposition}"
        );
    }
    families
}

/// The names a family's samples carry: a histogram's `_bucket`, `_sum` and `_count`, else
/// the family's own name. These are the names PromQL can select.
pub fn sample_names(families: &BTreeMap<String, String>) -> Vec<String> {
    families
        .iter()
        .flat_map(|(name, kind)| {
            if kind == "histogram" {
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .map(|s| format!("{name}{s}"))
                    .collect()
            } else {
                vec![name.clone()]
            }
        })
        .collect()
}

/// A GET that reports a refused connection instead of panicking (for readiness polls).
pub async fn try_get(url: &str) -> Option<(StatusCode, Bytes)> {
    let req = Request::get(url).body(Full::<Bytes>::default()).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), http1_client().request(req))
        .await
        .ok()?
        .ok()?;
    let status = resp.status();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, body))
}

/// One element of an instant vector.
#[derive(Debug, Clone)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A Prometheus server scraping every second, with its data in a directory of its own.
pub struct Prometheus {
    pub addr: SocketAddr,
    dir: PathBuf,
    child: Child,
}

impl Prometheus {
    /// Starts Prometheus with these `scrape_configs` (YAML list items, indented by two
    /// spaces) under a 1 s global scrape interval, and waits until it is ready. `{dir}` in
    /// the text is replaced by the server's own directory, for `file_sd_configs`.
    pub async fn start(scrape_configs: &str) -> Prometheus {
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("thaw-prometheus-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nscrape_configs:\n{}",
            scrape_configs.replace("{dir}", dir.to_str().unwrap())
        );
        std::fs::write(dir.join("prometheus.yml"), &config).unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let port = free_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let child = child(tool("prometheus"))
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let prometheus = Prometheus { addr, dir, child };
        let ready = format!("http://{addr}/-/ready");
        let started = tokio::time::Instant::now();
        loop {
            if try_get(&ready)
                .await
                .is_some_and(|(s, _)| s == StatusCode::OK)
            {
                break;
            }
            assert!(
                started.elapsed() < crate::harness::EVENTUALLY,
                "prometheus did not become ready on {addr}; its log:\n{}\nits config:\n{config}",
                prometheus.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        prometheus
    }

    /// The server's own directory (its config, data and log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What the server logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// Writes a `file_sd_configs` target file in the server's directory, atomically (a
    /// rename), so the server never reads half a file.
    pub fn write_targets(&self, file: &str, targets: &[SocketAddr]) {
        let list: Vec<String> = targets.iter().map(ToString::to_string).collect();
        let body = serde_json::json!([{ "targets": list }]).to_string();
        let tmp = self.dir.join(format!("{file}.tmp"));
        std::fs::write(&tmp, body).unwrap();
        std::fs::rename(&tmp, self.dir.join(file)).unwrap();
    }

    /// Evaluates an instant query now. A scalar result is one sample without labels.
    pub async fn query(&self, promql: &str) -> Vec<Sample> {
        let url = format!(
            "http://{}/api/v1/query?query={}",
            self.addr,
            percent_encode(promql)
        );
        let (status, body) = try_get(&url)
            .await
            .unwrap_or_else(|| panic!("prometheus did not answer {promql}"));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(
            status == StatusCode::OK && v["status"] == "success",
            "query {promql} failed: {status} {v}"
        );
        let value =
            |pair: &serde_json::Value| -> f64 { pair[1].as_str().unwrap().parse().unwrap() };
        match v["data"]["resultType"].as_str().unwrap() {
            "vector" => v["data"]["result"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| Sample {
                    labels: r["metric"]
                        .as_object()
                        .unwrap()
                        .iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                        .collect(),
                    value: value(&r["value"]),
                })
                .collect(),
            "scalar" => vec![Sample {
                labels: BTreeMap::new(),
                value: value(&v["data"]["result"]),
            }],
            other => panic!("query {promql} gave a {other}, not an instant vector"),
        }
    }

    /// The value of a query that yields at most one sample (`None` for an empty result).
    pub async fn value(&self, promql: &str) -> Option<f64> {
        let samples = self.query(promql).await;
        assert!(
            samples.len() <= 1,
            "{promql} gave {} samples: {samples:?}",
            samples.len()
        );
        samples.first().map(|s| s.value)
    }

    /// Waits until `promql` yields `want` (within 1e-9), then returns; panics with
    /// the last value seen otherwise. Counters reach their final value once a scrape after
    /// the load has been ingested, which is what this waits for.
    pub async fn eventually_equals(&self, promql: &str, want: f64) {
        self.eventually_near(promql, want, 1e-9).await;
    }

    /// As [`Self::eventually_equals`], within `tolerance`.
    pub async fn eventually_near(&self, promql: &str, want: f64, tolerance: f64) {
        let deadline = tokio::time::Instant::now() + crate::harness::EVENTUALLY;
        loop {
            let got = self.value(promql).await;
            if got.is_some_and(|g| (g - want).abs() <= tolerance) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{promql}: wanted {want}, Prometheus says {got:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until every target of `job` is up, and there are `n` of them.
    pub async fn targets_up(&self, job: &str, n: usize) {
        eventually(&format!("{n} targets of {job} up"), || async {
            let up = self.query(&format!("up{{job=\"{job}\"}} == 1")).await;
            up.len() == n
        })
        .await;
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // Kill and reap before removing its directory, so it writes nothing after.
        let _ = self.child.start_kill();
        for _ in 0..100 {
            if self.child.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters (for a query string).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
