//! `activator webhook` as a real child process: real AdmissionReviews over real TLS,
//! trusting the CA it made (written out with `--ca-file-out`). No cluster: the
//! certificate stays in memory and no caBundle is written (the testbed test,
//! `benches/tests/webhook.rs`, covers those).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde_json::{json, Value};
use thaw_benches::harness::bin;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_rustls::TlsConnector;

const WITHIN: Duration = Duration::from_secs(20);
const SERVICE_NAME: &str = "thaw-webhook.thaw-system.svc";

/// A running webhook and what it told us.
struct Webhook {
    child: Child,
    port: u16,
    ca_file: PathBuf,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir(name: &str) -> TempDir {
    static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("thaw-webhook-{}-{name}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

/// The webhook binary with no cluster anywhere in its environment.
fn command(args: &[&str]) -> Command {
    let mut cmd = thaw_benches::harness::child(bin("activator"));
    cmd.arg("webhook")
        .args(args)
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env("HOME", "/nonexistent")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env_remove("POD_NAMESPACE")
        .env_remove("THAW_QUEUE_PROXY_IMAGE")
        .env_remove("RUST_LOG")
        .kill_on_drop(true);
    cmd
}

impl Webhook {
    async fn start(extra: &[&str]) -> Webhook {
        let dir = temp_dir("ca");
        let ca_file = dir.0.join("ca.crt");
        let mut args = vec![
            "--listen-address",
            "127.0.0.1",
            "--port",
            "0",
            "--cert-store",
            "",
            "--webhook-config",
            "",
            "--queue-proxy-image",
            "thaw.local/queue-proxy",
            "--ca-file-out",
            ca_file.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let mut child = command(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let port = tokio::time::timeout(WITHIN, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                let v: Value = serde_json::from_str(&line).expect("log lines are JSON");
                if v["message"] == "listening" && v["listener"] == "https" {
                    let addr: std::net::SocketAddr =
                        v["address"].as_str().unwrap().parse().unwrap();
                    return addr.port();
                }
            }
            panic!("the webhook exited before listening");
        })
        .await
        .expect("the webhook did not listen in time");
        // Keep reading so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Webhook {
            child,
            port,
            ca_file,
            _dir: dir,
        }
    }

    /// A TLS connector trusting only the CA the webhook wrote out.
    fn connector(&self) -> TlsConnector {
        let pem = std::fs::read(&self.ca_file).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        TlsConnector::from(Arc::new(config))
    }

    async fn tls(&self, name: &str) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(("127.0.0.1", self.port)).await?;
        self.connector()
            .connect(ServerName::try_from(name.to_owned()).unwrap(), tcp)
            .await
    }

    /// One request over a fresh TLS connection, HTTP/1.1.
    async fn send<B>(&self, req: Request<B>) -> (StatusCode, Bytes)
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let tls = self.tls(SERVICE_NAME).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status();
        (status, resp.into_body().collect().await.unwrap().to_bytes())
    }

    async fn post(&self, body: Vec<u8>) -> (StatusCode, Bytes) {
        let req = Request::post("/inject")
            .header("host", SERVICE_NAME)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        self.send(req).await
    }

    async fn healthz(&self) -> StatusCode {
        let req = Request::get("/healthz")
            .header("host", SERVICE_NAME)
            .body(Full::new(Bytes::new()))
            .unwrap();
        self.send(req).await.0
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.id().unwrap().to_string();
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

/// A POST whose body sends `bytes` bytes of JSON-ish filler and then never ends.
fn stalling(
    content_length: Option<usize>,
    bytes: usize,
) -> Request<StreamBody<impl futures_util::Stream<Item = Result<Frame<Bytes>, std::io::Error>>>> {
    use futures_util::StreamExt;
    let chunks: Vec<Result<Frame<Bytes>, std::io::Error>> = (0..bytes.div_ceil(1024))
        .map(|_| Ok(Frame::data(Bytes::from(vec![b' '; 1024]))))
        .collect();
    let body = futures_util::stream::iter(chunks).chain(futures_util::stream::pending());
    let mut req = Request::post("/inject").header("host", SERVICE_NAME);
    if let Some(n) = content_length {
        req = req.header("content-length", n);
    }
    req.body(StreamBody::new(body)).unwrap()
}

fn pod(labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "hello-1", "namespace": "apps", "labels": labels,
            "annotations": {"thaw.dev/container-concurrency": "4"}},
        "spec": {"containers": [{
            "name": "app", "image": "thaw.local/testapp",
            "ports": [{"containerPort": 8080}],
            "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}}
        }]}
    })
}

fn review(object: &Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "0df28fbd-5f5f-11e8-bc74-36e6bb280816",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "apps", "operation": "CREATE",
            "userInfo": {"username": "admin"},
            "object": object, "oldObject": null, "dryRun": false
        }
    }))
    .unwrap()
}

fn response(body: &[u8]) -> Value {
    let v: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(v["apiVersion"], "admission.k8s.io/v1", "{v}");
    assert_eq!(v["kind"], "AdmissionReview", "{v}");
    assert_eq!(v["response"]["allowed"], true, "{v}");
    v["response"].clone()
}

#[tokio::test]
async fn injects_an_opted_in_pod_over_tls() {
    let w = Webhook::start(&[]).await;
    assert_eq!(w.healthz().await, StatusCode::OK);

    let p = pod(json!({"app": "hello", "thaw.dev/inject": "enabled"}));
    let (status, body) = w.post(review(&p)).await;
    assert_eq!(status, StatusCode::OK);
    let r = response(&body);
    assert_eq!(r["uid"], "0df28fbd-5f5f-11e8-bc74-36e6bb280816");
    assert_eq!(r["patchType"], "JSONPatch");
    assert!(r.get("warnings").is_none(), "{r}");
    let ops = base64::engine::general_purpose::STANDARD
        .decode(r["patch"].as_str().unwrap())
        .unwrap();
    let ops: json_patch::Patch = serde_json::from_slice(&ops).unwrap();
    let mut patched = p.clone();
    json_patch::patch(&mut patched, &ops).unwrap();
    let containers = patched["spec"]["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 2);
    let sidecar = &containers[1];
    assert_eq!(sidecar["name"], "queue-proxy");
    assert_eq!(sidecar["image"], "thaw.local/queue-proxy");
    let env = |name: &str| {
        sidecar["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .map(|e| e["value"].clone())
    };
    assert_eq!(env("CONTAINER_CONCURRENCY"), Some(json!("4")));
    assert_eq!(env("SYSTEM_NAMESPACE"), Some(json!("thaw-system")));
    assert!(sidecar["ports"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["containerPort"] == 8012));

    // The injected pod again: nothing to do, so no patch (idempotent).
    let (status, body) = w.post(review(&patched)).await;
    assert_eq!(status, StatusCode::OK);
    let r = response(&body);
    assert!(
        r.get("patch").is_none() && r.get("patchType").is_none(),
        "{r}"
    );

    // Not opted in: allowed, untouched.
    let (_, body) = w.post(review(&pod(json!({"app": "hello"})))).await;
    assert!(response(&body).get("patch").is_none());

    // Another kind of review: allowed, with a warning, never an error.
    let mut raw: Value = serde_json::from_slice(&review(&p)).unwrap();
    raw["apiVersion"] = json!("admission.k8s.io/v1beta1");
    let (status, body) = w.post(serde_json::to_vec(&raw).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["apiVersion"], "admission.k8s.io/v1beta1");
    assert_eq!(v["response"]["allowed"], true);
    assert!(v["response"].get("patch").is_none());
    assert!(
        v["response"]["warnings"][0]
            .as_str()
            .unwrap()
            .contains("expected a admission.k8s.io/v1 AdmissionReview"),
        "{v}"
    );

    // A Deployment's pod with no annotations of its own: no cluster to ask for its
    // Deployment's, so the defaults, with a warning saying so.
    let mut owned = pod(json!({"thaw.dev/inject": "enabled", "pod-template-hash": "7c9"}));
    owned["metadata"] = json!({
        "generateName": "hello-7c9-", "labels": {"thaw.dev/inject": "enabled", "pod-template-hash": "7c9"},
        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "hello-7c9", "uid": "u", "controller": true}]
    });
    let (_, body) = w.post(review(&owned)).await;
    let r = response(&body);
    assert_eq!(r["patchType"], "JSONPatch");
    assert!(
        r["warnings"][0]
            .as_str()
            .unwrap()
            .contains("injected with the defaults"),
        "{r}"
    );
}

#[tokio::test]
async fn bad_json_is_400_and_a_large_body_413() {
    let w = Webhook::start(&["--max-body", "64KiB"]).await;
    let (status, body) = w.post(b"{\"apiVersion\": ".to_vec()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let message = String::from_utf8_lossy(&body);
    assert!(
        message.starts_with("the body is not an AdmissionReview"),
        "{message}"
    );

    let (status, body) = w.post(b"{\"kind\": \"AdmissionReview\"}".to_vec()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(&body[..], b"the AdmissionReview has no request\n");

    // Announced by Content-Length: refused on the head alone, before any of the body is
    // read. (The bodies below send what they send and then stall, so the client is not
    // caught writing when the server answers and closes.)
    let (status, _) = w.send(stalling(Some(70 * 1024), 0)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

    // Chunked, with no length announced: refused once the limit is crossed.
    let (status, _) = w.send(stalling(None, 65 * 1024)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

    // Under the limit is fine.
    let (status, _) = w
        .post(review(&pod(json!({"thaw.dev/inject": "enabled"}))))
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn the_certificate_names_the_service_and_nothing_else() {
    let w = Webhook::start(&["--service", "inj", "--namespace", "sys"]).await;
    for name in ["inj", "inj.sys", "inj.sys.svc", "inj.sys.svc.cluster.local"] {
        w.tls(name).await.unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    for name in ["localhost", "thaw-webhook.thaw-system.svc", "other.sys.svc"] {
        assert!(w.tls(name).await.is_err(), "{name} was accepted");
    }
    // Its own namespace is never injected.
    let p = pod(json!({"thaw.dev/inject": "enabled"}));
    let mut raw: Value = serde_json::from_slice(&review(&p)).unwrap();
    raw["request"]["namespace"] = json!("sys");
    let tls = w.tls("inj.sys.svc").await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = sender
        .send_request(
            Request::post("/inject")
                .header("host", "inj.sys.svc")
                .body(Full::new(Bytes::from(serde_json::to_vec(&raw).unwrap())))
                .unwrap(),
        )
        .await
        .unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(response(&body).get("patch").is_none());
}

#[tokio::test]
async fn drains_on_sigterm_then_exits() {
    let mut w = Webhook::start(&["--drain-period", "2s"]).await;
    assert_eq!(w.healthz().await, StatusCode::OK);
    w.signal("TERM");
    // Still serving during the drain, with /healthz failing.
    let deadline = tokio::time::Instant::now() + WITHIN;
    loop {
        if w.healthz().await == StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "healthz never failed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _) = w
        .post(review(&pod(json!({"thaw.dev/inject": "enabled"}))))
        .await;
    assert_eq!(status, StatusCode::OK);
    let exit = tokio::time::timeout(WITHIN, w.child.wait())
        .await
        .expect("the webhook did not exit")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test]
async fn bad_config_exits_64_with_one_line() {
    for (args, needle, code) in [
        (vec!["--max-body", "0"], "--max-body", 64),
        (vec!["--port", "https"], "--port", 64),
        (vec!["--bogus"], "--bogus", 64),
        (vec!["--queue-proxy-image", ""], "--queue-proxy-image", 64),
        // Needs the API server, and there is none: a plain failure, said in one line.
        (
            vec!["--cert-secret", "mine", "--port", "0"],
            "THAW_WEBHOOK_CERT_SECRET",
            1,
        ),
    ] {
        let out = command(&args).output().await.unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}
