//! `queue-proxy inject`'s YAML transform (`thaw_queue_proxy::inject::inject_stream_with_report`)
//! on arbitrary text.
//!
//! Invariants:
//! - no panic (and no runaway memory or time, which libFuzzer's limits catch);
//! - accepted output reads back as YAML the way Kubernetes reads it;
//! - injecting twice changes nothing (the module's promise), and reports as many objects,
//!   all of them carrying the sidecar that did the first time;
//! - every injected pod's sidecar env, the part the injector owns, is a configuration the
//!   queue-proxy accepts (so an injected pod never crash-loops on its own env).
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use thaw_queue_proxy::config::{Config, THAW_DRAIN_QUIET_PERIOD, VARS};
use thaw_queue_proxy::inject::{
    inject_requested, inject_stream_with_report, InjectSettings, CONTAINER_NAME, WORKLOAD_KINDS,
};

fn settings() -> InjectSettings {
    InjectSettings::with_image("thaw.local/queue-proxy")
}

/// The pods (or templates) of a document the stream injects: Pods, the templates of
/// `WORKLOAD_KINDS`, and the same inside `*List` items.
fn pods<'a>(doc: &'a Value, out: &mut Vec<&'a Value>) {
    let kind = doc.get("kind").and_then(Value::as_str).unwrap_or("");
    if kind.ends_with("List") {
        if let Some(items) = doc.get("items").and_then(Value::as_array) {
            items.iter().for_each(|i| pods(i, out));
        }
    } else if kind == "Pod" {
        out.push(doc);
    } else if WORKLOAD_KINDS.contains(&kind) {
        if let Some(t) = doc.get("spec").and_then(|s| s.get("template")) {
            out.push(t);
        }
    }
}

/// The sidecar's env as the kubelet would set it, limited to the variables the injector
/// owns (everything the queue-proxy reads except an operator's `THAW_*` overrides).
fn sidecar_env(pod: &Value) -> Option<HashMap<String, String>> {
    let containers = pod.get("spec")?.get("containers")?.as_array()?;
    let sidecar = containers
        .iter()
        .find(|c| c.get("name").and_then(Value::as_str) == Some(CONTAINER_NAME))?;
    let owned = |name: &str| {
        VARS.iter().any(|v| v.name == name)
            && (!name.starts_with("THAW_") || name == THAW_DRAIN_QUIET_PERIOD)
    };
    let mut env = HashMap::new();
    for e in sidecar.get("env")?.as_array()? {
        let Some(name) = e.get("name").and_then(Value::as_str) else {
            continue;
        };
        if !owned(name) {
            continue;
        }
        let value = if e.get("valueFrom").is_some() {
            // The downward API: the pod's name, IP or namespace.
            "placeholder".to_owned()
        } else {
            match e.get("value") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(other) => panic!("{name}: non-string env value {other}"),
            }
        };
        env.insert(name.to_owned(), value);
    }
    Some(env)
}

fuzz_target!(|data: &[u8]| {
    let Ok(yaml) = std::str::from_utf8(data) else {
        return;
    };
    let Ok((once, report)) = inject_stream_with_report(yaml, &settings()) else {
        return;
    };
    assert!(report.injected <= report.objects, "{report:?}");
    let options = serde_saphyr::options! { legacy_octal_numbers: true };
    let docs: Vec<Value> = serde_saphyr::from_multiple_with_options(&once, options)
        .unwrap_or_else(|e| panic!("output does not read back: {e}\n{once}"));
    let (twice, again) = inject_stream_with_report(&once, &settings())
        .unwrap_or_else(|e| panic!("re-injecting fails: {e}\ninput:\n{yaml}\nonce:\n{once}"));
    assert_eq!(
        once, twice,
        "injecting twice changed the output; input:\n{yaml}"
    );
    assert_eq!(again.objects, report.objects);
    assert_eq!(again.injected, report.injected);

    let mut all = Vec::new();
    docs.iter().for_each(|d| pods(d, &mut all));
    for pod in all {
        if !pod.get("metadata").is_some_and(inject_requested) {
            continue;
        }
        let env = sidecar_env(pod)
            .unwrap_or_else(|| panic!("an opted-in pod has no sidecar env:\n{once}"));
        if let Err(e) = Config::from_env(&env) {
            panic!("the queue-proxy refuses its injected env: {e}\ninput:\n{yaml}\nonce:\n{once}");
        }
    }
});
