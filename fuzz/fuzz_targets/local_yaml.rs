//! The local platform's YAML file (`thaw_activator::platform::local::config::LocalConfig::parse`),
//! then what the activator does with an accepted one: the queue-proxy environment each pod
//! gets, and the registry requests are routed with.
//!
//! Invariants for an accepted file:
//! - revision names are DNS-1035 labels, namespaces DNS-1123 labels, each id declared
//!   once, each host routed to one revision (case-insensitively);
//! - `containerConcurrency` <= `MAX_CONTAINER_CONCURRENCY`; every timeout, window and
//!   period at most `MAX_DURATION`; the stable window at least 1 s; `maxScale` 0 or not
//!   below `minScale`; the target finite and > 0; a command is never empty;
//! - a readiness probe parses as the queue-proxy parses it, with its port left to the
//!   queue-proxy (the pod's user port);
//! - the queue-proxy accepts the settings the platform hands it (its env);
//! - once in the activator's registry, a request for each declared host, and for each
//!   revision's `<name>.<namespace>.svc.cluster.local`, is identified as that revision.
#![no_main]

use std::path::Path;

use http::{HeaderMap, HeaderValue, Uri};
use libfuzzer_sys::fuzz_target;
use thaw_activator::platform::local::config::{LocalConfig, PodSource};
use thaw_activator::platform::PlatformUpdate;
use thaw_queue_proxy::config::{self as qp, Config};
use thaw_shared::headers::Carried;
use thaw_shared::limits::{MAX_CONTAINER_CONCURRENCY, MAX_DURATION};
use thaw_shared::names::{is_dns1035_label, is_dns1123_label};
use thaw_shared::probe::{parse_probes, ProbeHandler};

const USER_PORT: u16 = 8080;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = LocalConfig::parse(text, Path::new("/base")) else {
        return;
    };
    let mut ids = std::collections::HashSet::new();
    let mut hosts = std::collections::HashSet::new();
    for r in &config.revisions {
        let s = &r.spec;
        assert!(is_dns1035_label(&s.id.name), "name {:?}", s.id.name);
        assert!(
            is_dns1123_label(&s.id.namespace),
            "namespace {:?}",
            s.id.namespace
        );
        assert!(ids.insert(s.id.clone()), "{} twice", s.id);
        for h in &s.hosts {
            assert!(hosts.insert(h.to_ascii_lowercase()), "host {h:?} twice");
        }
        assert!(s.container_concurrency as u64 <= MAX_CONTAINER_CONCURRENCY);
        let t = s.timeouts;
        for d in [t.total, t.response_start, t.idle].into_iter().flatten() {
            assert!(d <= MAX_DURATION);
        }
        assert!(r.max_scale == 0 || r.min_scale <= r.max_scale);
        assert!(
            r.target.is_finite() && r.target > 0.0,
            "target {}",
            r.target
        );
        assert!(r.stable_window >= std::time::Duration::from_secs(1));
        assert!(r.stable_window <= MAX_DURATION && r.scale_to_zero_grace_period <= MAX_DURATION);
        if let PodSource::Command { command, .. } = &r.source {
            assert!(!command.is_empty());
        }
        if let Some(probe) = &r.readiness_probe {
            let probes = parse_probes(probe, probe.trim_start().starts_with('['), USER_PORT)
                .unwrap_or_else(|e| panic!("accepted probe {probe} fails in the queue-proxy: {e}"));
            for p in &probes {
                thaw_fuzz::check_probe(p);
                let port = match &p.handler {
                    ProbeHandler::Tcp(t) => t.port,
                    ProbeHandler::Http(h) => h.port,
                    ProbeHandler::Grpc(g) => g.port,
                };
                assert_eq!(port, USER_PORT, "probe port not left to the pod: {probe}");
            }
        }
        // What the platform's pods are started with (platform/process.rs queue_proxy_env).
        let mut env = thaw_fuzz::knative_env();
        let secs = |d: Option<std::time::Duration>| d.map_or(0, |d| d.as_secs()).to_string();
        for (k, v) in [
            (
                qp::CONTAINER_CONCURRENCY,
                s.container_concurrency.to_string(),
            ),
            (qp::REVISION_TIMEOUT_SECONDS, secs(t.total)),
            (
                qp::REVISION_RESPONSE_START_TIMEOUT_SECONDS,
                secs(t.response_start),
            ),
            (qp::REVISION_IDLE_TIMEOUT_SECONDS, secs(t.idle)),
            (qp::SERVING_NAMESPACE, s.id.namespace.to_string()),
            (qp::SERVING_REVISION, s.id.name.to_string()),
            (qp::SERVING_CONFIGURATION, s.id.name.to_string()),
        ] {
            env.insert(k.to_owned(), v);
        }
        if let Some(probe) = &r.readiness_probe {
            env.insert(qp::SERVING_READINESS_PROBE.to_owned(), probe.clone());
            let multi = probe.trim_start().starts_with('[');
            env.insert(
                qp::ENABLE_MULTI_CONTAINER_PROBES.to_owned(),
                multi.to_string(),
            );
        }
        if let Err(e) = Config::from_env(&env) {
            panic!("the queue-proxy refuses what the local platform gives it: {e}");
        }
    }

    let registry = thaw_fuzz::small_registry();
    for r in &config.revisions {
        registry.apply(PlatformUpdate::Revision(r.spec.clone()));
    }
    let identify = |host: &str| {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::HOST, HeaderValue::from_str(host).ok()?);
        registry.identify(
            &headers,
            Carried::scan(&headers),
            &Uri::from_static("/"),
            "cluster.local",
        )
    };
    for r in &config.revisions {
        let id = &r.spec.id;
        let service = format!("{}.{}.svc.cluster.local", id.name, id.namespace);
        let got = identify(&service).map(|g| g.spec.id.clone());
        assert_eq!(got.as_ref(), Some(id), "{service}");
        for h in &r.spec.hosts {
            let got = identify(h).map(|g| g.spec.id.clone());
            // A declared host that is another revision's service name goes to that one.
            let theirs = config.revisions.iter().find(|o| {
                h.eq(&format!(
                    "{}.{}.svc.cluster.local",
                    o.spec.id.name, o.spec.id.namespace
                ))
            });
            let want = theirs.map_or(id, |o| &o.spec.id);
            assert_eq!(got.as_ref(), Some(want), "declared host {h:?} of {id}");
        }
    }
});
