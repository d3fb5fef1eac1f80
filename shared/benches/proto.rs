//! Micro-benchmarks of the autoscaler's stat messages: encoding one full `Stat` (the
//! "stat-full" golden vector), encoding a 100-revision `WireStatMessages` batch, and
//! decoding a `Stat`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use prost::Message;
use thaw_shared::proto::{Stat, WireStatMessage, WireStatMessages};

/// The "stat-full" vector of shared/tests/knative-wire-vectors.txt: every field set.
fn stat_full() -> Stat {
    Stat {
        pod_name: "hello-00001-deployment-7d9c6b5f4-x2x9k".into(),
        average_concurrent_requests: 3.5,
        average_proxied_concurrent_requests: 1.25,
        request_count: 42.0,
        proxied_request_count: 7.0,
        process_uptime: 123.456,
        timestamp: 1_764_171_234,
    }
}

/// What the activator sends each second with 100 revisions behind it.
fn batch(revisions: usize) -> WireStatMessages {
    WireStatMessages {
        messages: (0..revisions)
            .map(|i| WireStatMessage {
                namespace: format!("team-{}", i % 7),
                name: format!("service-{i}-00001"),
                stat: Some(Stat {
                    pod_name: "activator-7d9c6b5f4-x2x9k".into(),
                    average_concurrent_requests: 1.5 + i as f64,
                    request_count: 10.0 + i as f64,
                    process_uptime: 3_600.25,
                    ..Default::default()
                }),
            })
            .collect(),
    }
}

fn stat(c: &mut Criterion) {
    let stat = stat_full();
    let encoded = stat.encode_to_vec();
    assert_eq!(encoded.len(), stat.encoded_len());
    let mut group = c.benchmark_group("proto/stat_full");
    group.throughput(Throughput::Bytes(encoded.len() as u64));
    let mut buf = Vec::with_capacity(encoded.len());
    group.bench_function("encode_reused_vec", |b| {
        b.iter(|| {
            buf.clear();
            black_box(&stat).encode(&mut buf).unwrap();
            black_box(&buf);
        });
    });
    assert_eq!(buf, encoded);
    group.bench_function("encode_to_vec", |b| {
        b.iter(|| black_box(black_box(&stat).encode_to_vec()));
    });
    group.bench_function("decode", |b| {
        b.iter(|| black_box(Stat::decode(black_box(encoded.as_slice())).unwrap()));
    });
    group.finish();
}

fn wire_batch(c: &mut Criterion) {
    let msgs = batch(100);
    let encoded = msgs.encode_to_vec();
    assert_eq!(WireStatMessages::decode(encoded.as_slice()).unwrap(), msgs);
    let mut group = c.benchmark_group("proto/wire_batch_100");
    group.throughput(Throughput::Bytes(encoded.len() as u64));
    let mut buf = Vec::with_capacity(encoded.len());
    group.bench_function("encode_reused_vec", |b| {
        b.iter(|| {
            buf.clear();
            black_box(&msgs).encode(&mut buf).unwrap();
            black_box(&buf);
        });
    });
    assert_eq!(buf, encoded);
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    targets = stat, wire_batch
}
criterion_main!(benches);
