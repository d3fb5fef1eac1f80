//! The autoscaler's stat protobufs (`thaw_shared::proto`) from arbitrary bytes, and what
//! the leader's stat server does with a decoded batch (`ReportedStats::record`).
//!
//! Invariants:
//! - decoding never panics, for each of the three messages;
//! - what decodes re-encodes canonically: `encode(decode(encode(m))) == encode(m)`, and
//!   `encoded_len` is the length written (compared as bytes, since NaN != NaN);
//! - a decoded batch fed to `ReportedStats` never panics, and the load it then reports
//!   for any revision is a finite number >= 0 (it feeds the scaler's arithmetic).
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use thaw_activator::revision::RevisionId;
use thaw_activator::stat_server::{ReportedStats, StatServerSettings};
use thaw_shared::proto::{Stat, WireStatMessage, WireStatMessages};
use tokio::time::{Duration, Instant};

fn round_trip<M: Message + Default>(data: &[u8]) -> Option<M> {
    let m = M::decode(data).ok()?;
    let bytes = m.encode_to_vec();
    assert_eq!(m.encoded_len(), bytes.len(), "encoded_len disagrees");
    let again = M::decode(bytes.as_slice()).expect("our own encoding must decode");
    assert_eq!(again.encode_to_vec(), bytes, "encoding is not canonical");
    Some(m)
}

fuzz_target!(|data: &[u8]| {
    if let Some(stat) = round_trip::<Stat>(data) {
        // A Stat on its own is what the queue-proxy serves and the scraper reads.
        let stats = ReportedStats::new(StatServerSettings::default());
        let id = RevisionId::new("default", "hello");
        let _ = stats.record(id.clone(), &stat, true, Instant::now());
        let load = stats.load(&id, Instant::now());
        assert!(load.is_finite() && load >= 0.0, "load {load} from {stat:?}");
    }
    let _ = round_trip::<WireStatMessage>(data);
    let Some(batch) = round_trip::<WireStatMessages>(data) else {
        return;
    };
    let stats = ReportedStats::new(StatServerSettings {
        max_revisions: 4,
        max_senders_per_revision: 4,
        ..StatServerSettings::default()
    });
    let now = Instant::now();
    let alone = batch.messages.len() == 1;
    for (i, m) in batch.messages.iter().enumerate() {
        let Some(stat) = &m.stat else { continue };
        // Later entries arrive a little later, so staleness and sweeps are reached too.
        let at = now + Duration::from_millis(500 * i as u64 % 10_000);
        let _ = stats.record(RevisionId::new(&m.namespace, &m.name), stat, alone, at);
    }
    for m in &batch.messages {
        let id = RevisionId::new(&m.namespace, &m.name);
        for at in [
            now,
            now + Duration::from_secs(2),
            now + Duration::from_secs(10),
        ] {
            let load = stats.load(&id, at);
            assert!(load.is_finite() && load >= 0.0, "load {load} for {id}");
        }
    }
    stats.sweep(now + Duration::from_secs(60));
    assert_eq!(stats.revisions(), 0, "a sweep long after leaves nothing");
});
