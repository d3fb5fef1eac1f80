//! Which revision a request is for (`thaw_activator::revision::Registry::identify`, CONTRACT
//! §2.1), with an independent oracle: a request must never be identified as a revision it
//! does not name.
//!
//! Input, one command per line:
//! ```text
//! domain cluster.local                      the cluster domain (default cluster.local)
//! rev default/hello hello.local,Hello.Test  a revision: namespace/name, declared hosts
//! uri http://hello.local:8080/path          the request target
//! h host: hello.local                       a header (the value may be any bytes)
//! ```
//!
//! Invariants:
//! - no panic;
//! - with non-empty `Knative-Serving-Revision` and `-Namespace`, the answer is exactly the
//!   revision they name, or none;
//! - otherwise the answer is a revision whose `<name>.<namespace>.svc.<domain>` or one of
//!   whose declared hosts (any case) is the `Host` (else the target's authority), with at
//!   most a `:port` or IPv6 brackets removed; without either, there is no answer;
//! - a `Host` that is exactly one revision's service name, or exactly a host only one
//!   revision declares, finds that revision.
#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use libfuzzer_sys::fuzz_target;
use thaw_activator::platform::PlatformUpdate;
use thaw_activator::revision::{RevisionId, RevisionSpec};
use thaw_shared::headers::{Carried, KNATIVE_SERVING_NAMESPACE, KNATIVE_SERVING_REVISION};
use thaw_shared::timeout::Timeouts;

struct Input {
    domain: String,
    revisions: Vec<(RevisionId, Vec<String>)>,
    uri: Uri,
    headers: HeaderMap,
}

fn parse(data: &[u8]) -> Option<Input> {
    let mut input = Input {
        domain: "cluster.local".into(),
        revisions: Vec::new(),
        uri: Uri::from_static("/"),
        headers: HeaderMap::new(),
    };
    for line in data.split(|&b| b == b'\n') {
        let (cmd, rest) = match line.iter().position(|&b| b == b' ') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => (line, &[][..]),
        };
        match cmd {
            b"domain" => input.domain = String::from_utf8(rest.to_vec()).ok()?,
            b"rev" if input.revisions.len() < 8 => {
                let rest = std::str::from_utf8(rest).ok()?;
                let (id, hosts) = rest.split_once(' ').unwrap_or((rest, ""));
                let (ns, name) = id.split_once('/')?;
                let hosts = hosts
                    .split(',')
                    .filter(|h| !h.is_empty())
                    .map(str::to_owned);
                input
                    .revisions
                    .push((RevisionId::new(ns, name), hosts.collect()));
            }
            b"uri" => input.uri = Uri::try_from(rest).ok()?,
            b"h" => {
                let i = rest.iter().position(|&b| b == b':')?;
                let name = HeaderName::from_bytes(&rest[..i]).ok()?;
                let value = rest[i + 1..].strip_prefix(b" ").unwrap_or(&rest[i + 1..]);
                input
                    .headers
                    .append(name, HeaderValue::from_bytes(value).ok()?);
            }
            _ => {}
        }
    }
    Some(input)
}

/// The strings a `Host` may stand for: itself, without a `:digits` port, or the inside
/// of IPv6 brackets.
fn candidates(raw: &str) -> Vec<&str> {
    let mut out = vec![raw];
    if let Some((h, port)) = raw.rsplit_once(':') {
        if port.bytes().all(|b| b.is_ascii_digit()) {
            out.push(h);
        }
    }
    if let Some(inner) = raw.strip_prefix('[').and_then(|r| r.split(']').next()) {
        out.push(inner);
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = parse(data) else {
        return;
    };
    let registry = thaw_fuzz::small_registry();
    for (id, hosts) in &input.revisions {
        registry.apply(PlatformUpdate::Revision(RevisionSpec {
            id: id.clone(),
            container_concurrency: 1,
            timeouts: Timeouts::default(),
            hosts: hosts.clone(),
            verify_pod_identity: false,
        }));
    }
    let got = registry
        .identify(
            &input.headers,
            Carried::scan(&input.headers),
            &input.uri,
            &input.domain,
        )
        .map(|r| r.spec.clone());

    let header = |name| {
        input
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
    };
    if let (Some(name), Some(ns)) = (
        header(KNATIVE_SERVING_REVISION),
        header(KNATIVE_SERVING_NAMESPACE),
    ) {
        let want = registry.get(ns, name).map(|r| r.spec.id.clone());
        assert_eq!(got.map(|s| s.id), want, "named by headers {ns}/{name}");
        return;
    }
    let raw = input
        .headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| input.uri.authority().map(|a| a.as_str()));
    let Some(raw) = raw else {
        assert!(got.is_none(), "no host, yet {:?}", got.map(|s| s.id));
        return;
    };
    let service = |id: &RevisionId| format!("{}.{}.svc.{}", id.name, id.namespace, input.domain);
    if let Some(spec) = &got {
        let names_it = candidates(raw).into_iter().any(|c| {
            c == service(&spec.id) || spec.hosts.iter().any(|h| h.eq_ignore_ascii_case(c))
        });
        assert!(
            names_it,
            "Host {raw:?} identified as {}, which it does not name",
            spec.id
        );
    }
    // Exact matches must be found. (Registry keeps the last spec per id.)
    let specs: Vec<RevisionSpec> = registry.all().iter().map(|r| r.spec.clone()).collect();
    if let Some(s) = specs.iter().find(|s| service(&s.id) == raw) {
        assert_eq!(
            got.map(|g| g.id),
            Some(s.id.clone()),
            "service host {raw:?}"
        );
        return;
    }
    let declaring: Vec<&RevisionSpec> = specs
        .iter()
        .filter(|s| s.hosts.iter().any(|h| h.eq_ignore_ascii_case(raw)))
        .collect();
    let port_like = raw.contains(':') || raw.starts_with('[');
    let service_like = specs
        .iter()
        .any(|s| candidates(raw).into_iter().any(|c| c == service(&s.id)));
    if let [only] = declaring.as_slice() {
        if !port_like && !service_like {
            assert_eq!(
                got.map(|g| g.id),
                Some(only.id.clone()),
                "declared host {raw:?}"
            );
        }
    }
});
