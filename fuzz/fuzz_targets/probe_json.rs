//! `SERVING_READINESS_PROBE` parsing (`thaw_shared::probe::parse_probes`) and building a
//! `Prober` from what it accepts.
//!
//! Input: one flag byte (bit 0: `ENABLE_MULTI_CONTAINER_PROBES`, bit 1:
//! `ENABLE_HTTP2_AUTO_DETECTION`), the user port as two big-endian bytes, then the JSON.
//!
//! Invariants:
//! - no panic, in parsing or in `Prober::new`;
//! - every accepted probe keeps `ProbeSpec`'s documented bounds (`check_probe`);
//! - without the multi flag at most one probe comes back; empty JSON means none;
//! - errors are messages that name a field (never empty);
//! - parsing is deterministic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use thaw_fuzz::check_probe;
use thaw_shared::probe::{parse_probes, Prober, ProberOptions};

fuzz_target!(|data: &[u8]| {
    let [flags, hi, lo, json @ ..] = data else {
        return;
    };
    let Ok(json) = std::str::from_utf8(json) else {
        return;
    };
    let multi = flags & 1 != 0;
    let user_port = u16::from_be_bytes([*hi, *lo]);
    if user_port == 0 {
        // The queue-proxy refuses USER_PORT=0 before it reads the probe.
        return;
    }
    let parsed = parse_probes(json, multi, user_port);
    assert_eq!(
        parsed,
        parse_probes(json, multi, user_port),
        "not deterministic"
    );
    match parsed {
        Ok(probes) => {
            if json.trim().is_empty() {
                assert!(probes.is_empty());
            }
            if !multi {
                assert!(probes.len() <= 1, "{} probes without multi", probes.len());
            }
            probes.iter().for_each(check_probe);
            let prober = Prober::new(
                probes.clone(),
                ProberOptions {
                    http2_auto_detect: flags & 2 != 0,
                    ..ProberOptions::default()
                },
            );
            assert_eq!(prober.is_empty(), probes.is_empty());
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
