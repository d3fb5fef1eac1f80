//! Every header name, probe value and user agent of the Knative contract, written once.
//!
//! Names are lowercase because `http::HeaderName::from_static` requires it; HTTP header
//! names are case-insensitive on the wire.

use http::{HeaderMap, HeaderName};

/// Set by ingress and by the activator's own probes; its value says which component is asked.
pub const K_NETWORK_PROBE: HeaderName = HeaderName::from_static("k-network-probe");
/// Hash that the ingress prober expects echoed back.
pub const K_NETWORK_HASH: HeaderName = HeaderName::from_static("k-network-hash");
/// Marks a kubelet probe that was rewritten to go through the queue-proxy.
pub const K_KUBELET_PROBE: HeaderName = HeaderName::from_static("k-kubelet-probe");
/// The activator moves the client's `Host` here so the queue-proxy can restore it.
pub const K_ORIGINAL_HOST: HeaderName = HeaderName::from_static("k-original-host");
/// Set by the activator so the autoscaler can subtract load it already counted.
pub const K_PROXY_REQUEST: HeaderName = HeaderName::from_static("k-proxy-request");
/// Names the revision a request is for (set by ingress, stripped before the app).
pub const KNATIVE_SERVING_REVISION: HeaderName =
    HeaderName::from_static("knative-serving-revision");
/// Names the namespace of that revision.
pub const KNATIVE_SERVING_NAMESPACE: HeaderName =
    HeaderName::from_static("knative-serving-namespace");
/// Thaw's own: milliseconds a response waited for a cold start. [beyond]
pub const THAW_COLD_START: HeaderName = HeaderName::from_static("thaw-cold-start");
/// Thaw's own: the queue-proxy's answer to a health check names its revision as
/// `<namespace>/<name>`, so that the activator never takes another revision's pod for
/// this one's (a pod address reused, a port answered by a stranger). Nothing in
/// Knative's probe carries the revision. [beyond]
pub const THAW_REVISION: HeaderName = HeaderName::from_static("thaw-revision");

/// The [`THAW_REVISION`] value for a revision.
pub fn revision_identity(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// Which of the contract's request headers a request carries, found in one pass over its
/// names. A `HeaderMap` lookup hashes the name even when it is absent (a removal cost
/// about 200 instructions), and most requests carry none of these: the request path asks
/// here before it looks one up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Carried(u8);

impl Carried {
    pub const NETWORK_PROBE: Self = Self(1);
    pub const KUBELET_PROBE: Self = Self(1 << 1);
    pub const PROXY_REQUEST: Self = Self(1 << 2);
    pub const ORIGINAL_HOST: Self = Self(1 << 3);
    /// A `Knative-Serving-*` header: `-Revision` and `-Namespace` route a request, and the
    /// activator strips them all before a pod.
    pub const ROUTING: Self = Self(1 << 4);
    pub const FORWARDED_FOR: Self = Self(1 << 5);

    pub fn scan(headers: &HeaderMap) -> Self {
        let mut found = 0;
        for name in headers.keys() {
            // Names are stored lowercase, as the constants above spell them.
            found |= match name.as_str() {
                "k-network-probe" => Self::NETWORK_PROBE.0,
                "k-kubelet-probe" => Self::KUBELET_PROBE.0,
                "k-proxy-request" => Self::PROXY_REQUEST.0,
                "k-original-host" => Self::ORIGINAL_HOST.0,
                "x-forwarded-for" => Self::FORWARDED_FOR.0,
                other if other.starts_with("knative-serving-") => Self::ROUTING.0,
                _ => 0,
            };
        }
        Self(found)
    }

    pub fn has(self, which: Self) -> bool {
        self.0 & which.0 != 0
    }
}

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub const FORWARDED: HeaderName = HeaderName::from_static("forwarded");
pub const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
pub const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// `K-Network-Probe` value for a health check aimed at the queue-proxy.
pub const PROBE_QUEUE: &str = "queue";
/// `K-Network-Probe` value the ingress prober sends.
pub const PROBE_INGRESS: &str = "probe";
/// `K-Network-Probe` value the autoscaler sends to the activator.
pub const PROBE_ACTIVATOR: &str = "activator";
/// `K-Proxy-Request` value the activator sets.
pub const PROXY_REQUEST_ACTIVATOR: &str = "activator";

/// User agents that mark a request as a health check rather than traffic.
pub const KUBE_PROBE_UA_PREFIX: &str = "kube-probe/";
pub const ACTIVATOR_PROBE_UA: &str = "Knative-Activator-Probe";
pub const AUTOSCALING_PROBE_UA: &str = "Knative-Autoscaling-Probe";
/// What Knative's readiness prober sends to the user container (no kube version known).
pub const READINESS_PROBE_UA: &str = "kube-probe//";

/// True when the `User-Agent` marks a kubelet, activator or autoscaler health check.
pub fn is_health_check_user_agent(ua: &[u8]) -> bool {
    ua.starts_with(KUBE_PROBE_UA_PREFIX.as_bytes())
        || ua.starts_with(ACTIVATOR_PROBE_UA.as_bytes())
        || ua.starts_with(AUTOSCALING_PROBE_UA.as_bytes())
}

/// Hop-by-hop headers a proxy must not forward (RFC 9110 §7.6.1, plus legacy ones).
/// `Trailer` is not one: it announces the trailer fields end to end, and hyper sends an
/// HTTP/1.1 trailer only when the response's `Trailer` names it.
pub const HOP_BY_HOP: [HeaderName; 7] = [
    http::header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    http::header::PROXY_AUTHENTICATE,
    http::header::PROXY_AUTHORIZATION,
    http::header::TE,
    http::header::TRANSFER_ENCODING,
];

/// Whether `name` is one of [`HOP_BY_HOP`]. Each comparison is against a `const`, which
/// the compiler reduces to a tag check for the standard names; `HOP_BY_HOP.contains`
/// built and dropped the seven names for every header line it was asked about.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    *name == http::header::CONNECTION
        || *name == http::header::TE
        || *name == http::header::TRANSFER_ENCODING
        || *name == http::header::PROXY_AUTHENTICATE
        || *name == http::header::PROXY_AUTHORIZATION
        || *name == KEEP_ALIVE
        || *name == PROXY_CONNECTION
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carried_names_each_header_it_stands_for() {
        for (name, flag) in [
            (K_NETWORK_PROBE, Carried::NETWORK_PROBE),
            (K_KUBELET_PROBE, Carried::KUBELET_PROBE),
            (K_PROXY_REQUEST, Carried::PROXY_REQUEST),
            (K_ORIGINAL_HOST, Carried::ORIGINAL_HOST),
            (KNATIVE_SERVING_REVISION, Carried::ROUTING),
            (KNATIVE_SERVING_NAMESPACE, Carried::ROUTING),
            (
                HeaderName::from_static("knative-serving-anything"),
                Carried::ROUTING,
            ),
            (X_FORWARDED_FOR, Carried::FORWARDED_FOR),
            (
                HeaderName::from_static("knative-serving"),
                Carried::default(),
            ),
        ] {
            let mut headers = HeaderMap::new();
            headers.insert(http::header::HOST, http::HeaderValue::from_static("a"));
            assert_eq!(Carried::scan(&headers), Carried::default(), "{name}");
            headers.insert(name.clone(), http::HeaderValue::from_static("1"));
            // Its own flag, and only that.
            assert_eq!(Carried::scan(&headers), flag, "{name}");
        }
    }

    #[test]
    fn is_hop_by_hop_says_yes_for_exactly_the_listed_names() {
        for name in &HOP_BY_HOP {
            assert!(is_hop_by_hop(name), "{name}");
        }
        for name in [
            http::header::UPGRADE,
            http::header::TRAILER,
            http::header::HOST,
            http::header::CONTENT_LENGTH,
            HeaderName::from_static("keep-alive-x"),
            HeaderName::from_static("x-connection"),
        ] {
            assert!(!is_hop_by_hop(&name), "{name}");
        }
    }

    #[test]
    fn health_check_user_agents() {
        assert!(is_health_check_user_agent(b"kube-probe/1.29"));
        assert!(is_health_check_user_agent(b"Knative-Activator-Probe"));
        assert!(is_health_check_user_agent(b"Knative-Autoscaling-Probe/x"));
        assert!(!is_health_check_user_agent(b"curl/8.0"));
        assert!(!is_health_check_user_agent(b"kube-probe"));
    }
}
