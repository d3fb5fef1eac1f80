//! What users load next to the binaries cannot rot: the alerting rules pass promtool's
//! checks and unit tests, the Grafana dashboard and the rules use only metrics the
//! binaries serve, and the README's metrics tables list exactly what `/metrics` serves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use http::StatusCode;
use thaw_benches::harness::*;
use thaw_benches::promtools::{self, families, sample_names};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The families each endpoint serves, and every label name in them.
struct Served {
    activator: BTreeMap<String, String>,
    user: BTreeMap<String, String>,
    stat: BTreeMap<String, String>,
    labels: BTreeSet<String>,
}

/// A live scrape of an activator and the queue-proxy behind it, after one request went
/// through, so every family has its series (the activator's exist per revision; its
/// capacity gauge only for CC > 0).
async fn scrape() -> (Served, [String; 3]) {
    let app = App::start(&[]).await;
    let qp = QueueProxy::start(app.port(), &[("CONTAINER_CONCURRENCY", "2")]).await;
    let act = Activator::start(
        &format!(
            "revisions:\n  - name: hello\n    hosts: [hello.local]\n    containerConcurrency: 2\n    endpoints: [\"{}\"]\n",
            qp.serving
        ),
        &["--drain-period", "1s"],
    )
    .await;
    let (s, _, _) = get_with(&act.url("/"), &[("Host", "hello.local")]).await;
    assert_eq!(s, StatusCode::OK);
    let activator = act.metrics_text().await;
    let user = qp.user_metrics().await;
    let (_, _, stat) = get(&format!("http://{}/metrics", qp.metrics)).await;
    let stat = String::from_utf8(stat.to_vec()).unwrap();
    let mut labels = BTreeSet::new();
    for text in [&activator, &user, &stat] {
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            if let Some((_, rest)) = line.split_once('{') {
                let inner = rest.rsplit_once('}').unwrap().0;
                for pair in inner.split("\",") {
                    labels.insert(pair.split_once('=').unwrap().0.trim().to_owned());
                }
            }
        }
    }
    let served = Served {
        activator: families(&activator),
        user: families(&user),
        stat: families(&stat),
        labels,
    };
    (served, [activator, user, stat])
}

/// The metric names a PromQL expression selects: identifiers in Thaw's namespaces
/// (`activator_`, `revision_`, `queue_`, `process_`) that are not label names.
fn metric_names(expr: &str, labels: &BTreeSet<String>) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| {
            ["activator_", "revision_", "queue_", "process_"]
                .iter()
                .any(|p| t.starts_with(p))
        })
        .filter(|t| !labels.contains(*t))
        .map(str::to_owned)
        .collect()
}

/// Every PromQL string of the dashboard: panel targets and template variable queries.
fn dashboard_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "definition" | "query", serde_json::Value::String(s)) => {
                        out.push(s.clone())
                    }
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| dashboard_exprs(i, out)),
        _ => {}
    }
}

fn rules() -> Vec<serde_json::Value> {
    let doc: serde_json::Value = serde_saphyr::from_str(&read("deploy/prometheus/rules.yaml"))
        .unwrap_or_else(|e| panic!("rules.yaml: {e}"));
    doc["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().clone())
        .collect()
}

#[test]
fn alerting_rules_pass_promtool_and_a_test_proves_each_alert_fires() {
    let rules_path = repo().join("deploy/prometheus/rules.yaml");
    let (code, out) = promtools::promtool(&["check", "rules", rules_path.to_str().unwrap()], b"");
    let alerts: Vec<String> = rules()
        .iter()
        .map(|r| r["alert"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(code, 0, "promtool check rules:\n{out}");
    assert!(
        out.contains(&format!("SUCCESS: {} rules found", alerts.len())),
        "{out}"
    );
    assert!(alerts.len() >= 6, "{alerts:?}");

    let test_path = repo().join("deploy/prometheus/rules_test.yaml");
    let (code, out) = promtools::promtool(&["test", "rules", test_path.to_str().unwrap()], b"");
    assert_eq!(code, 0, "promtool test rules:\n{out}");
    assert!(out.contains("SUCCESS"), "{out}");

    // Each alert has a case where it is expected to fire, and one where it must not.
    let tests: serde_json::Value =
        serde_saphyr::from_str(&read("deploy/prometheus/rules_test.yaml")).unwrap();
    let cases: Vec<&serde_json::Value> = tests["tests"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().unwrap())
        .collect();
    for alert in &alerts {
        let of = |firing: bool| {
            cases.iter().any(|c| {
                c["alertname"] == alert.as_str()
                    && c["exp_alerts"].as_array().unwrap().is_empty() != firing
            })
        };
        assert!(of(true), "no test case expects {alert} to fire");
        assert!(of(false), "no test case expects {alert} to stay quiet");
    }
}

#[tokio::test]
async fn the_dashboard_and_the_rules_use_only_metrics_the_binaries_serve() {
    let (served, _) = scrape().await;
    let names: BTreeSet<String> = [&served.activator, &served.user, &served.stat]
        .into_iter()
        .flat_map(sample_names)
        .collect();

    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/thaw.json")).unwrap();
    assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 36);
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(variables, ["datasource", "namespace", "revision"]);
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard["panels"], &mut exprs);
    dashboard_exprs(&dashboard["templating"], &mut exprs);
    let rule_exprs: Vec<String> = rules()
        .iter()
        .map(|r| r["expr"].as_str().unwrap().to_owned())
        .collect();
    assert!(exprs.len() >= 15, "{exprs:?}");

    let mut used = BTreeSet::new();
    for (file, expr) in exprs
        .iter()
        .map(|e| ("thaw.json", e))
        .chain(rule_exprs.iter().map(|e| ("rules.yaml", e)))
    {
        let in_expr = metric_names(expr, &served.labels);
        // A variable like `datasource`'s "prometheus" names no metric; every query does.
        if expr != "prometheus" {
            assert!(!in_expr.is_empty(), "{file}: no metric in {expr}");
        }
        for name in in_expr {
            assert!(
                names.contains(&name),
                "{file} uses {name}, which neither binary serves: {expr}\nserved: {names:?}"
            );
            used.insert(name);
        }
    }
    // The dashboard's panels cover what the issue asks for.
    for needed in [
        "activator_cold_start_wait_seconds_bucket",
        "activator_cold_start_wait_seconds_count",
        "activator_requests_waiting",
        "revision_request_count",
        "revision_request_latencies_bucket",
        "activator_throttler_rejected_total",
        "revision_breaker_rejected_total",
        "activator_ready_pods",
    ] {
        assert!(used.contains(needed), "nothing uses {needed}");
    }
}

/// The metric names and types (the type column's first word) of the table under README
/// heading `heading`.
fn readme_table(readme: &str, heading: &str) -> BTreeMap<String, String> {
    let start = readme
        .lines()
        .position(|l| l == heading)
        .unwrap_or_else(|| panic!("README has no {heading:?}"));
    let names: BTreeMap<String, String> = readme
        .lines()
        .skip(start + 1)
        .take_while(|l| !l.starts_with('#'))
        .filter_map(|l| l.strip_prefix("| `"))
        .map(|rest| {
            let name = rest.split('`').next().unwrap();
            let kind = rest.split('|').nth(1).unwrap().split_whitespace().next();
            (
                name.split('{').next().unwrap().to_owned(),
                kind.unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert!(!names.is_empty(), "no table under {heading:?}");
    names
}

#[tokio::test]
async fn the_readme_metric_tables_list_exactly_what_is_served() {
    let (served, texts) = scrape().await;
    let readme = read("README.md");
    for (heading, families, text) in [
        (
            "### Metrics on `--metrics-port`",
            &served.activator,
            &texts[0],
        ),
        ("### Metrics on :9091", &served.user, &texts[1]),
        (
            "### Metrics on :9090 (Prometheus text)",
            &served.stat,
            &texts[2],
        ),
    ] {
        let documented = readme_table(&readme, heading);
        assert_eq!(
            &documented, families,
            "README {heading} (left) against /metrics (right):\n{text}"
        );
    }
}
