//! `queue-proxy inject`, the real binary, on files and on stdin: the stream on stdout,
//! what was done on stderr, exit 64 for bad input and 1 for I/O errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

const MANIFEST: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: hello
  namespace: demo
  annotations:
    thaw.dev/container-concurrency: \"10\"
spec:
  selector:
    matchLabels: {app: hello}
  template:
    metadata:
      labels: {app: hello, thaw.dev/inject: enabled}
    spec:
      containers:
      - name: app
        image: thaw.local/testapp
        ports: [{name: http, containerPort: 8080}]
        readinessProbe:
          httpGet: {path: /healthz, port: http}
          periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata: {name: hello, namespace: demo}
spec:
  selector: {app: hello}
  ports: [{port: 80, targetPort: http}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: other}
data: {a: \"1\"}
";

fn queue_proxy() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_queue-proxy"));
    c.env_remove("THAW_QUEUE_PROXY_IMAGE");
    c
}

/// Runs `queue-proxy <args>` with `stdin` written to its standard input.
fn run(mut cmd: Command, stdin: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start queue-proxy");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn temp_file(name: &str, content: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("thaw-inject-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path
}

#[test]
fn a_file_is_injected_and_stdin_gives_the_same() {
    let file = temp_file("hello.yaml", MANIFEST);
    let mut cmd = queue_proxy();
    cmd.arg("inject").arg(&file);
    let from_file = run(cmd, "");
    assert_eq!(
        from_file.status.code(),
        Some(0),
        "{}",
        text(&from_file.stderr)
    );
    let out = text(&from_file.stdout);
    assert!(out.contains("name: queue-proxy"), "{out}");
    assert!(
        out.contains("image: ghcr.io/thaw-dev/queue-proxy:0.1.0"),
        "the default image: {out}"
    );
    assert!(out.contains("targetPort: 8012"), "{out}");
    assert!(out.contains("kind: ConfigMap"), "{out}");
    assert_eq!(out.matches("\n---\n").count(), 2, "three documents: {out}");
    assert_eq!(
        text(&from_file.stderr),
        "deployment/hello injected\n\
         service/hello targetPort → 8012 (deployment/hello's queue-proxy)\n\
         injected 1 of 3 objects\n"
    );

    for args in [&["inject", "-"][..], &["inject"]] {
        let mut cmd = queue_proxy();
        cmd.args(args);
        let from_stdin = run(cmd, MANIFEST);
        assert_eq!(from_stdin.status.code(), Some(0), "{args:?}");
        assert_eq!(text(&from_stdin.stdout), out, "{args:?}");
    }

    // Injected output, injected again: the same bytes.
    let mut cmd = queue_proxy();
    cmd.args(["inject", "-"]);
    let again = run(cmd, &out);
    assert_eq!(again.status.code(), Some(0));
    assert_eq!(text(&again.stdout), out);
    assert!(text(&again.stderr).contains("deployment/hello unchanged (already injected)"));
}

#[test]
fn the_image_comes_from_the_flag_then_the_environment() {
    let mut cmd = queue_proxy();
    cmd.args(["inject", "-"])
        .env("THAW_QUEUE_PROXY_IMAGE", "registry.example/qp:env");
    let out = text(&run(cmd, MANIFEST).stdout);
    assert!(out.contains("image: registry.example/qp:env"), "{out}");

    for flag in [
        &["--image", "thaw.local/queue-proxy"][..],
        &["--image=thaw.local/queue-proxy"],
    ] {
        let mut cmd = queue_proxy();
        cmd.arg("inject")
            .args(flag)
            .env("THAW_QUEUE_PROXY_IMAGE", "registry.example/qp:env");
        let out = text(&run(cmd, MANIFEST).stdout);
        assert!(
            out.contains("image: thaw.local/queue-proxy\n"),
            "{flag:?}: {out}"
        );
    }
}

#[test]
fn bad_input_exits_64_naming_the_document_and_field() {
    let bad = MANIFEST.replace("containerPort: 8080", "containerPort: 9090");
    let mut cmd = queue_proxy();
    cmd.args(["inject", "-"]);
    let out = run(cmd, &bad);
    assert_eq!(out.status.code(), Some(64));
    assert!(out.stdout.is_empty(), "nothing written on error");
    assert_eq!(
        text(&out.stderr),
        "queue-proxy inject: stdin: document 1 (Deployment hello): \
         spec.template.spec.containers[0].ports[0].containerPort: 9090 is reserved for the \
         queue-proxy sidecar (reserved: [8012, 8013, 8022, 9090, 9091, 8008])\n"
    );

    let huge = MANIFEST.replace("\"10\"", "\"99999999999999999999\"");
    let file = temp_file("huge.yaml", &huge);
    let mut cmd = queue_proxy();
    cmd.arg("inject").arg(&file);
    let out = run(cmd, "");
    assert_eq!(out.status.code(), Some(64));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}: document 1 (Deployment hello)",
            file.display()
        )),
        "{err}"
    );
    assert!(err.contains("thaw.dev/container-concurrency"), "{err}");

    let mut cmd = queue_proxy();
    cmd.args(["inject", "-"]);
    let out = run(cmd, "kind: [unclosed\n");
    assert_eq!(out.status.code(), Some(64));
    assert!(text(&out.stderr).starts_with("queue-proxy inject: stdin: invalid YAML"));

    for args in [
        &["inject", "a.yaml", "b.yaml"][..],
        &["inject", "--image"],
        &["inject", "--bogus"],
    ] {
        let mut cmd = queue_proxy();
        cmd.args(args);
        let out = run(cmd, "");
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        assert!(
            text(&out.stderr).ends_with("(see --help)\n"),
            "{}",
            text(&out.stderr)
        );
    }
}

#[test]
fn io_errors_exit_1() {
    let mut cmd = queue_proxy();
    cmd.args(["inject", "/nonexistent/thaw/manifest.yaml"]);
    let out = run(cmd, "");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr)
            .starts_with("queue-proxy inject: cannot read /nonexistent/thaw/manifest.yaml:"),
        "{}",
        text(&out.stderr)
    );

    // A reader that went away: the output cannot be written.
    let mut child = queue_proxy()
        .args(["inject", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let mut input = child.stdin.take().unwrap();
    input.write_all(MANIFEST.as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("cannot write the output"));
}

#[test]
fn help_describes_the_command() {
    let mut cmd = queue_proxy();
    cmd.args(["inject", "--help"]);
    let out = run(cmd, "");
    assert_eq!(out.status.code(), Some(0));
    let help = text(&out.stdout);
    assert!(help.starts_with("queue-proxy inject:"), "{help}");
    assert!(help.contains("THAW_QUEUE_PROXY_IMAGE"));
    let mut cmd = queue_proxy();
    cmd.arg("--help");
    assert!(text(&run(cmd, "").stdout).contains("queue-proxy inject"));
}
