//! The autoscaler's stat messages (proto3 package `metrics`, CONTRACT §3), declared with
//! prost derives so no `protoc` is needed at build time.
//!
//! prost writes fields in tag order and omits proto3 zero scalars; `-0.0 == 0.0`, so a
//! negative zero is omitted too, exactly as the Go reference does.

/// One pod's (or one activator's) load figures for a reporting window.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Stat {
    #[prost(string, tag = "1")]
    pub pod_name: String,
    #[prost(double, tag = "2")]
    pub average_concurrent_requests: f64,
    #[prost(double, tag = "3")]
    pub average_proxied_concurrent_requests: f64,
    #[prost(double, tag = "4")]
    pub request_count: f64,
    #[prost(double, tag = "5")]
    pub proxied_request_count: f64,
    #[prost(double, tag = "6")]
    pub process_uptime: f64,
    #[prost(int64, tag = "7")]
    pub timestamp: i64,
}

/// A `Stat` addressed to one revision, as the activator sends it over the websocket.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WireStatMessage {
    #[prost(string, tag = "1")]
    pub namespace: String,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(message, optional, tag = "3")]
    pub stat: Option<Stat>,
}

/// The batch the activator sends every second.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WireStatMessages {
    #[prost(message, repeated, tag = "1")]
    pub messages: Vec<WireStatMessage>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    const VECTORS: &str = include_str!("../tests/knative-wire-vectors.txt");

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn vector(name: &str) -> Vec<u8> {
        let line = VECTORS
            .lines()
            .find(|l| l.split(' ').next() == Some(name))
            .unwrap_or_else(|| panic!("vector {name} missing"));
        hex(line.split_once(' ').map(|(_, h)| h.trim()).unwrap_or(""))
    }

    fn expected_stat(name: &str) -> Stat {
        match name {
            "stat-empty" => Stat::default(),
            "stat-podname" => Stat {
                pod_name: "hello-pod".into(),
                ..Default::default()
            },
            "stat-full" => Stat {
                pod_name: "hello-00001-deployment-7d9c6b5f4-x2x9k".into(),
                average_concurrent_requests: 3.5,
                average_proxied_concurrent_requests: 1.25,
                request_count: 42.0,
                proxied_request_count: 7.0,
                process_uptime: 123.456,
                timestamp: 1_764_171_234,
            },
            "stat-negzero" => Stat {
                pod_name: "p".into(),
                average_concurrent_requests: -0.0,
                request_count: 1.0,
                ..Default::default()
            },
            "stat-tiny" => Stat {
                pod_name: "p".into(),
                average_concurrent_requests: 1e-9,
                process_uptime: 0.001,
                ..Default::default()
            },
            other => panic!("unknown stat vector {other}"),
        }
    }

    fn activator_stat(avg: f64, count: f64) -> Option<Stat> {
        Some(Stat {
            pod_name: "activator-7d9c".into(),
            average_concurrent_requests: avg,
            request_count: count,
            ..Default::default()
        })
    }

    fn expected_wire(name: &str) -> WireStatMessages {
        let msg = |ns: &str, n: &str, stat| WireStatMessage {
            namespace: ns.into(),
            name: n.into(),
            stat,
        };
        match name {
            "wire-poke" => WireStatMessages {
                messages: vec![msg("default", "hello-00001", activator_stat(1.0, 1.0))],
            },
            "wire-batch" => WireStatMessages {
                messages: vec![
                    msg("default", "hello-00001", activator_stat(2.75, 11.0)),
                    msg("team-a", "api-00042", activator_stat(0.0, 0.0)),
                    msg("ns", "nostat", None),
                ],
            },
            other => panic!("unknown wire vector {other}"),
        }
    }

    /// The vectors are copied into the crate so it builds on its own; when the project's
    /// shared folder sits beside the checkout (as in CI), the copy must match it.
    #[test]
    fn vector_copy_matches_the_shared_testdata() {
        let original = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/testdata/knative-wire/vectors.txt");
        match std::fs::read_to_string(&original) {
            Ok(text) => assert_eq!(
                text, VECTORS,
                "shared/tests/knative-wire-vectors.txt is stale"
            ),
            Err(e) => eprintln!("skipping: {} not readable: {e}", original.display()),
        }
    }

    #[test]
    fn every_vector_encodes_and_decodes_byte_for_byte() {
        let mut seen = 0;
        for line in VECTORS.lines().filter(|l| !l.trim().is_empty()) {
            let name = line.split(' ').next().unwrap();
            let bytes = vector(name);
            if name.starts_with("stat-") {
                let want = expected_stat(name);
                assert_eq!(want.encode_to_vec(), bytes, "encode {name}");
                let got = Stat::decode(bytes.as_slice()).unwrap();
                assert_eq!(got.encode_to_vec(), bytes, "re-encode {name}");
                assert_eq!(got.pod_name, want.pod_name);
                assert_eq!(
                    got.average_concurrent_requests,
                    want.average_concurrent_requests
                );
                assert_eq!(got.process_uptime, want.process_uptime);
                assert_eq!(got.timestamp, want.timestamp);
            } else {
                let want = expected_wire(name);
                assert_eq!(want.encode_to_vec(), bytes, "encode {name}");
                let got = WireStatMessages::decode(bytes.as_slice()).unwrap();
                assert_eq!(got, want, "decode {name}");
                assert_eq!(got.encode_to_vec(), bytes, "re-encode {name}");
            }
            seen += 1;
        }
        assert_eq!(seen, 7, "all golden vectors were checked");
    }
}
