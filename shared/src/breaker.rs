//! The queue-proxy's breaker (CONTRACT §1.4): at most `CC` requests run at once and at most
//! `10 × CC` more wait, in arrival order; anything beyond is refused at once.
//!
//! Waiting is tokio's FIFO semaphore, so release order is arrival order ([beyond]: Knative
//! does not promise it). Both the admission and the slot are RAII guards: a request that is
//! cancelled while waiting or while running gives its place back when its future is dropped.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The breaker is full: `11 × CC` requests are already admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("pending request queue full")]
pub struct BreakerFull;

#[derive(Debug)]
pub struct Breaker {
    slots: Arc<Semaphore>,
    concurrency: usize,
    /// Requests admitted: waiting plus running.
    admitted: AtomicUsize,
    /// `concurrency + queue depth`.
    capacity: usize,
}

impl Breaker {
    /// Knative's queue depth is ten times the concurrency.
    pub const QUEUE_DEPTH_FACTOR: usize = 10;

    /// A breaker for `concurrency` (> 0) parallel requests with Knative's queue depth.
    pub fn new(concurrency: usize) -> Self {
        // Saturating: configuration bounds CC, but a breaker must never be what panics.
        Self::with_queue_depth(
            concurrency,
            concurrency.saturating_mul(Self::QUEUE_DEPTH_FACTOR),
        )
    }

    pub fn with_queue_depth(concurrency: usize, queue_depth: usize) -> Self {
        // tokio's semaphore panics above MAX_PERMITS; configuration stays far below it.
        let concurrency = concurrency.min(Semaphore::MAX_PERMITS);
        Self {
            slots: Arc::new(Semaphore::new(concurrency)),
            concurrency,
            admitted: AtomicUsize::new(0),
            capacity: concurrency.saturating_add(queue_depth),
        }
    }

    /// Admits the request, then waits for a slot in arrival order.
    pub async fn acquire(self: &Arc<Self>) -> Result<BreakerPermit, BreakerFull> {
        let admission = self.admit()?;
        // tokio hands released permits straight to queued waiters, so a permit is free only
        // when nobody waits: taking it without queueing keeps FIFO order and skips the
        // waiter list's lock.
        let slot = match Arc::clone(&self.slots).try_acquire_owned() {
            Ok(slot) => slot,
            // The semaphore is never closed, so an error cannot happen; treat it as "full"
            // rather than panic if that ever changes.
            Err(_) => Arc::clone(&self.slots)
                .acquire_owned()
                .await
                .map_err(|_| BreakerFull)?,
        };
        Ok(BreakerPermit {
            _slot: slot,
            _admission: admission,
        })
    }

    fn admit(self: &Arc<Self>) -> Result<Admission, BreakerFull> {
        self.admitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.capacity).then_some(n + 1)
            })
            .map_err(|_| BreakerFull)?;
        Ok(Admission {
            breaker: Arc::clone(self),
        })
    }

    /// Requests holding a slot.
    pub fn in_flight(&self) -> usize {
        self.concurrency
            .saturating_sub(self.slots.available_permits())
    }

    /// Requests admitted but still waiting for a slot.
    pub fn waiting(&self) -> usize {
        self.admitted
            .load(Ordering::Acquire)
            .saturating_sub(self.in_flight())
    }

    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

#[derive(Debug)]
struct Admission {
    breaker: Arc<Breaker>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.breaker.admitted.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A running request's slot; dropping it lets the next waiter in.
#[derive(Debug)]
pub struct BreakerPermit {
    // Field order matters: the slot is released before the admission, so `waiting()`
    // never counts a request that is already gone.
    _slot: OwnedSemaphorePermit,
    _admission: Admission,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn admits_eleven_times_cc_then_refuses() {
        let b = Arc::new(Breaker::new(2));
        let mut running = vec![b.acquire().await.unwrap(), b.acquire().await.unwrap()];
        assert_eq!(b.in_flight(), 2);
        let mut waiters = Vec::new();
        for _ in 0..20 {
            let b = Arc::clone(&b);
            waiters.push(tokio::spawn(async move { b.acquire().await.map(drop) }));
        }
        tokio::time::timeout(Duration::from_secs(5), async {
            while b.waiting() < 20 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        assert_eq!(b.acquire().await.unwrap_err(), BreakerFull);
        running.clear();
        for w in waiters {
            w.await.unwrap().unwrap();
        }
        assert_eq!(b.in_flight(), 0);
        assert_eq!(b.waiting(), 0);
    }

    #[tokio::test]
    async fn waiters_are_released_in_arrival_order() {
        let b = Arc::new(Breaker::new(1));
        let first = b.acquire().await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..8 {
            let b2 = Arc::clone(&b);
            let tx = tx.clone();
            tokio::spawn(async move {
                let p = b2.acquire().await.unwrap();
                tx.send(i).unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
                drop(p);
            });
            // Let each waiter enqueue before the next is spawned.
            while b.waiting() < i + 1 {
                tokio::task::yield_now().await;
            }
        }
        drop(first);
        let mut order = Vec::new();
        for _ in 0..8 {
            order.push(rx.recv().await.unwrap());
        }
        assert_eq!(order, (0..8).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn cancelled_waiters_and_holders_give_their_place_back() {
        let b = Arc::new(Breaker::new(3));
        let mut tasks = Vec::new();
        for i in 0..33 {
            let b = Arc::clone(&b);
            tasks.push(tokio::spawn(async move {
                let _p = b.acquire().await;
                // Holders sleep long; all of them are cancelled below.
                tokio::time::sleep(Duration::from_secs(60 + i)).await;
            }));
        }
        tokio::time::timeout(Duration::from_secs(5), async {
            while b.in_flight() + b.waiting() < 33 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        assert_eq!(b.acquire().await.unwrap_err(), BreakerFull);
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        assert_eq!(b.in_flight(), 0);
        assert_eq!(b.waiting(), 0);
        // Full capacity is usable again.
        let again: Vec<_> = futures_util::future::join_all((0..3).map(|_| b.acquire())).await;
        assert!(again.iter().all(Result::is_ok));
    }
}
