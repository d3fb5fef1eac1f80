//! Helpers the fuzz targets share: the text format of the map-shaped inputs, the
//! environment Knative's controller gives a queue-proxy, and the invariants of a parsed
//! readiness probe, which three targets check, and the small activator registry three
//! targets route through.

use std::collections::HashMap;

use thaw_activator::backends::ProbeSchedule;
use thaw_activator::revision::{Registry, RegistrySettings};
use thaw_activator::throttler::ThrottlerSettings;
use thaw_shared::probe::{ProbeHandler, ProbeSpec};

/// One line of a map-shaped input: `NAME=value` sets, a bare `NAME` removes, and a line
/// that is only `!` clears everything set so far. `\n` in a value is a newline and `\\`
/// a backslash, so values with line breaks are reachable too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    Set(String, String),
    Remove(String),
    Clear,
}

/// Splits the input into [`Line`]s; invalid UTF-8 ends the input (returns `None`).
pub fn lines(data: &[u8]) -> Option<Vec<Line>> {
    let text = std::str::from_utf8(data).ok()?;
    Some(
        text.split('\n')
            .filter(|l| !l.is_empty())
            .map(|l| match l.split_once('=') {
                _ if l == "!" => Line::Clear,
                Some((k, v)) => Line::Set(k.to_owned(), unescape(v)),
                None => Line::Remove(l.to_owned()),
            })
            .collect(),
    )
}

fn unescape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        match (c, chars.clone().next()) {
            ('\\', Some('n')) => {
                out.push('\n');
                chars.next();
            }
            ('\\', Some('\\')) => {
                out.push('\\');
                chars.next();
            }
            _ => out.push(c),
        }
    }
    out
}

/// Applies the lines to a map.
pub fn apply(map: &mut HashMap<String, String>, lines: Vec<Line>) {
    for line in lines {
        match line {
            Line::Set(k, v) => {
                map.insert(k, v);
            }
            Line::Remove(k) => {
                map.remove(&k);
            }
            Line::Clear => map.clear(),
        }
    }
}

/// The environment Knative's controller gives a queue-proxy (every required variable
/// present), so that mutations explore past the first missing variable.
pub fn knative_env() -> HashMap<String, String> {
    use thaw_queue_proxy::config::*;
    [
        (CONTAINER_CONCURRENCY, "10"),
        (QUEUE_SERVING_PORT, "8012"),
        (QUEUE_SERVING_TLS_PORT, "8112"),
        (USER_PORT, "8080"),
        (REVISION_TIMEOUT_SECONDS, "300"),
        (SERVING_LOGGING_CONFIG, ""),
        (SERVING_LOGGING_LEVEL, "info"),
        (SERVING_NAMESPACE, "default"),
        (SERVING_CONFIGURATION, "hello"),
        (SERVING_REVISION, "hello-00001"),
        (SERVING_POD, "hello-00001-deployment-abc"),
        (SERVING_POD_IP, "10.0.0.5"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// What [`ProbeSpec`]'s documentation promises of a parsed probe.
pub fn check_probe(p: &ProbeSpec) {
    assert!(p.timeout_seconds >= 1, "timeout_seconds < 1: {p:?}");
    assert!(p.success_threshold >= 1, "success_threshold < 1: {p:?}");
    assert!(p.failure_threshold >= 1, "failure_threshold < 1: {p:?}");
    // Kubernetes counts these in int32.
    for n in [
        p.period_seconds,
        p.timeout_seconds,
        p.success_threshold,
        p.failure_threshold,
        p.initial_delay_seconds,
    ] {
        assert!(n <= i32::MAX as u32, "{n} beyond int32: {p:?}");
    }
    assert!(!p.timeout().is_zero());
    let (host, port) = match &p.handler {
        ProbeHandler::Tcp(t) => (&t.host, t.port),
        ProbeHandler::Http(h) => {
            assert!(h.path.as_str().starts_with('/'), "path not rooted: {p:?}");
            (&h.host, h.port)
        }
        ProbeHandler::Grpc(g) => (&g.host, g.port),
    };
    // "A port of 0 or none means user_port", and the user port is never 0.
    assert_ne!(port, 0, "port 0 survived parsing: {p:?}");
    assert!(!host.is_empty(), "empty host: {p:?}");
    assert!(
        !host.contains('[') && !host.contains(']'),
        "host with brackets: {p:?}"
    );
}

/// An activator registry with small wait bounds, for the targets that route requests
/// through the revisions they parsed.
pub fn small_registry() -> Registry {
    Registry::new(RegistrySettings {
        throttler: ThrottlerSettings {
            max_waiting: 100,
            max_waiting_body_bytes: 1 << 20,
        },
        probes: ProbeSchedule::default(),
        own_ip: None,
    })
}
