//! Micro-benchmarks of the queue-proxy's breaker: one acquire + release with nobody else
//! around, and four tasks on two worker threads fighting over two slots.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use thaw_shared::breaker::Breaker;

/// Acquire/release cycles each contending task does per measured batch.
const CYCLES_PER_TASK: u64 = 1_000;
const TASKS: u64 = 4;

fn uncontended(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let breaker = Arc::new(Breaker::new(2));
    // One `block_on` per sample, not per iteration, so the runtime's entry cost stays out
    // of the figure: each iteration is exactly one `acquire().await` plus the permit's drop.
    c.bench_function("breaker/uncontended_acquire_release", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let permit = breaker.acquire().await.unwrap();
                    drop(black_box(permit));
                }
                start.elapsed()
            })
        });
    });
}

/// Four tasks, CC = 2, two workers. `hold` decides whether a task yields while it holds
/// its slot, which is what makes the other tasks actually queue on the semaphore.
fn contended_batch(rt: &tokio::runtime::Runtime, breaker: &Arc<Breaker>, hold: bool) -> Duration {
    rt.block_on(async {
        let start = Instant::now();
        let tasks: Vec<_> = (0..TASKS)
            .map(|_| {
                let breaker = Arc::clone(breaker);
                tokio::spawn(async move {
                    for _ in 0..CYCLES_PER_TASK {
                        let permit = breaker.acquire().await.unwrap();
                        if hold {
                            tokio::task::yield_now().await;
                        }
                        drop(black_box(permit));
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        start.elapsed()
    })
}

fn contended(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let breaker = Arc::new(Breaker::new(2));
    let mut group = c.benchmark_group("breaker/contended_4tasks_cc2");
    // One iteration is a whole batch: 4 tasks × 1000 cycles; the throughput line gives
    // the per-cycle rate.
    group.throughput(Throughput::Elements(TASKS * CYCLES_PER_TASK));
    for (name, hold) in [
        ("batch_4x1000", false),
        ("batch_4x1000_yield_while_held", true),
    ] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| contended_batch(&rt, &breaker, hold))
                    .sum()
            });
        });
    }
    group.finish();
    assert_eq!(breaker.in_flight(), 0);
    assert_eq!(breaker.waiting(), 0);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    targets = uncontended, contended
}
criterion_main!(benches);
