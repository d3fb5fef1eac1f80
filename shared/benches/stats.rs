//! Micro-benchmarks of the time-weighted concurrency recorder: arrive + depart alone and
//! from two OS threads at once, and cutting a window with `report()`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use thaw_shared::stats::ConcurrencyRecorder;

const THREADS: usize = 2;

fn uncontended(c: &mut Criterion) {
    let rec = Arc::new(ConcurrencyRecorder::new());
    c.bench_function("stats/arrive_drop_uncontended", |b| {
        b.iter(|| drop(black_box(rec.arrive(black_box(false)))));
    });
    c.bench_function("stats/arrive_drop_proxied_uncontended", |b| {
        b.iter(|| drop(black_box(rec.arrive(black_box(true)))));
    });
    assert_eq!(rec.in_flight(), 0);
}

/// Each of two threads does `iters` arrive/drop pairs on one recorder; the clock runs from
/// the moment both are released until both are done, so a figure is the time one
/// arrive/drop takes on a thread while the other thread does the same.
fn contended(c: &mut Criterion) {
    let rec = Arc::new(ConcurrencyRecorder::new());
    c.bench_function("stats/arrive_drop_contended_2threads", |b| {
        b.iter_custom(|iters| {
            let start_line = Barrier::new(THREADS + 1);
            std::thread::scope(|s| {
                let workers: Vec<_> = (0..THREADS)
                    .map(|i| {
                        let rec = &rec;
                        let start_line = &start_line;
                        s.spawn(move || {
                            start_line.wait();
                            for _ in 0..iters {
                                drop(black_box(rec.arrive(i == 1)));
                            }
                        })
                    })
                    .collect();
                start_line.wait();
                let start = Instant::now();
                for w in workers {
                    w.join().unwrap();
                }
                start.elapsed()
            })
        });
    });
    assert_eq!(rec.in_flight(), 0);
}

fn report(c: &mut Criterion) {
    let rec = Arc::new(ConcurrencyRecorder::new());
    // Something in flight, so the window carries a non-zero weighted sum.
    let _held = rec.arrive(true);
    c.bench_function("stats/report", |b| {
        b.iter(|| black_box(rec.report()));
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    targets = uncontended, contended, report
}
criterion_main!(benches);
