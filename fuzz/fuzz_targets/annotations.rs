//! The `thaw.dev/*` annotations (`thaw_shared::annotations::FunctionSettings`), as the
//! Kubernetes platform and the injector (`SidecarConfig::from_annotations`) read them.
//!
//! Input: lines (see `thaw_fuzz::lines`) setting annotations on an empty map; a key
//! `@N` stands for the N-th of `annotations::ALL`, so mutations reach every name.
//!
//! Invariants for accepted annotations:
//! - container concurrency <= `MAX_CONTAINER_CONCURRENCY`; `max-scale` 0 or not below
//!   `min-scale`; the target finite, within 0.01..=1e9; the stable window 1 s..=
//!   `MAX_SECONDS`, the grace period at most that; the three timeouts at most
//!   `MAX_SECONDS` and equal to `Timeouts::from_secs` of the whole seconds kept beside;
//! - hosts are non-empty lowercase host names; a service is a DNS-1035 label;
//! - the injector agrees (accepts exactly the same maps, same numbers), and the
//!   queue-proxy accepts the env the injector writes from them;
//! - in the activator's registry, each host is identified as the function's revision.
//!
//! A refusal names an annotation of `ALL`.
#![no_main]

use std::collections::BTreeMap;

use http::{HeaderMap, HeaderValue, Uri};
use libfuzzer_sys::fuzz_target;
use thaw_activator::platform::PlatformUpdate;
use thaw_activator::revision::{RevisionId, RevisionSpec};
use thaw_queue_proxy::config::{self as qp, Config};
use thaw_queue_proxy::inject::SidecarConfig;
use thaw_shared::annotations::{FunctionSettings, ALL};
use thaw_shared::headers::Carried;
use thaw_shared::limits::{MAX_CONTAINER_CONCURRENCY, MAX_SECONDS};
use thaw_shared::names::is_dns1035_label;
use thaw_shared::timeout::Timeouts;

fuzz_target!(|data: &[u8]| {
    let Some(lines) = thaw_fuzz::lines(data) else {
        return;
    };
    let mut map = std::collections::HashMap::new();
    thaw_fuzz::apply(&mut map, lines);
    let annotations: BTreeMap<String, String> = map
        .into_iter()
        .map(|(k, v)| {
            let key = k
                .strip_prefix('@')
                .and_then(|n| n.parse::<usize>().ok())
                .and_then(|n| ALL.get(n))
                .map_or(k, |name| (*name).to_owned());
            (key, v)
        })
        .collect();
    let parsed = FunctionSettings::from_annotations(&annotations);
    let sidecar = SidecarConfig::from_annotations(Some("default"), "hello", &annotations);
    let s = match parsed {
        Ok(s) => s,
        Err(e) => {
            assert!(ALL.contains(&e.name), "error names {}", e.name);
            assert_eq!(sidecar.err(), Some(e), "the injector disagrees");
            return;
        }
    };
    let sidecar = sidecar.unwrap_or_else(|e| panic!("the injector refuses: {e}"));
    assert!(s.container_concurrency as u64 <= MAX_CONTAINER_CONCURRENCY);
    assert!(s.max_scale == 0 || s.min_scale <= s.max_scale);
    assert!(
        s.target.is_finite() && (0.01..=1e9).contains(&s.target),
        "target {}",
        s.target
    );
    let max = std::time::Duration::from_secs(MAX_SECONDS);
    assert!(s.stable_window >= std::time::Duration::from_secs(1) && s.stable_window <= max);
    assert!(s.scale_to_zero_grace_period <= max);
    for secs in [
        s.timeout_seconds,
        s.response_start_timeout_seconds,
        s.idle_timeout_seconds,
    ] {
        assert!(secs <= MAX_SECONDS);
    }
    assert_eq!(
        s.timeouts,
        Timeouts::from_secs(
            s.timeout_seconds,
            s.response_start_timeout_seconds,
            s.idle_timeout_seconds
        )
    );
    for h in &s.hosts {
        assert!(
            !h.is_empty() && !h.bytes().any(|b| b.is_ascii_uppercase()),
            "host {h:?}"
        );
        assert!(
            h.split('.').all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')),
            "host {h:?}"
        );
    }
    if let Some(svc) = &s.service {
        assert!(is_dns1035_label(svc), "service {svc:?}");
    }
    assert_eq!(sidecar.container_concurrency, s.container_concurrency);
    assert_eq!(
        (
            sidecar.timeout_seconds,
            sidecar.response_start_timeout_seconds,
            sidecar.idle_timeout_seconds
        ),
        (
            s.timeout_seconds,
            s.response_start_timeout_seconds,
            s.idle_timeout_seconds
        )
    );
    assert_eq!(
        sidecar.service,
        s.service.clone().unwrap_or_else(|| "hello".into())
    );

    // The sidecar's env carries these numbers (inject/sidecar.rs); the queue-proxy reads them.
    let mut env = thaw_fuzz::knative_env();
    for (k, v) in [
        (qp::CONTAINER_CONCURRENCY, sidecar.container_concurrency),
        (
            qp::REVISION_TIMEOUT_SECONDS,
            sidecar.timeout_seconds as usize,
        ),
        (
            qp::REVISION_RESPONSE_START_TIMEOUT_SECONDS,
            sidecar.response_start_timeout_seconds as usize,
        ),
        (
            qp::REVISION_IDLE_TIMEOUT_SECONDS,
            sidecar.idle_timeout_seconds as usize,
        ),
    ] {
        env.insert(k.to_owned(), v.to_string());
    }
    if let Err(e) = Config::from_env(&env) {
        panic!("the queue-proxy refuses the injected env: {e}");
    }

    if s.hosts.is_empty() {
        return;
    }
    let registry = thaw_fuzz::small_registry();
    let id = RevisionId::new("default", "hello");
    registry.apply(PlatformUpdate::Revision(RevisionSpec {
        id: id.clone(),
        container_concurrency: s.container_concurrency,
        timeouts: s.timeouts,
        hosts: s.hosts.clone(),
        verify_pod_identity: false,
    }));
    for h in &s.hosts {
        let mut headers = HeaderMap::new();
        let value =
            HeaderValue::from_str(h).unwrap_or_else(|_| panic!("host {h:?} is no Host value"));
        headers.insert(http::header::HOST, value);
        let got = registry.identify(
            &headers,
            Carried::scan(&headers),
            &Uri::from_static("/"),
            "cluster.local",
        );
        assert_eq!(
            got.map(|r| r.spec.id.clone()),
            Some(id.clone()),
            "host {h:?}"
        );
    }
});
