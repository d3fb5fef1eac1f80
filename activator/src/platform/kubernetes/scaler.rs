//! The built-in autoscaler on Kubernetes: Knative's KPA rule (`thaw_shared::autoscale`)
//! per function, run by the elected activator only, writing each Deployment's `scale`
//! subresource.
//!
//! Its input is the function's total concurrency: what every activator reports (this one
//! in process, the others over the stat websocket) plus what the pods see from anything
//! but an activator (their queue-proxies' `:9090`, scraped as Knative scrapes them).

use std::collections::HashMap;
use std::net::SocketAddr;

use thaw_shared::autoscale::{Autoscaler, ScalingSettings};
use tokio::time::{Duration, Instant};

use super::index::{Function, QUEUE_PROXY_METRICS_PORT};
use crate::revision::RevisionId;

/// Knative scrapes at most this many pods of a revision and scales the sum up to all.
pub const MAX_SCRAPED_PODS: usize = 16;
/// A scale write the Deployment watcher has not confirmed yet is repeated after this
/// long: the write may have been lost, or someone else set the scale since.
const UNCONFIRMED: Duration = Duration::from_secs(5);

/// One scale write to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub id: RevisionId,
    pub from: u32,
    pub to: u32,
}

struct State {
    autoscaler: Autoscaler,
    /// When this leader started deciding for the function.
    since: Instant,
    /// The last write and when, until the Deployment shows it.
    pending: Option<(u32, Instant)>,
}

/// The per-function autoscalers. Plain data: the caller brings the clock and the
/// observations, so every rule is tested without time passing.
pub struct Scaler {
    states: HashMap<RevisionId, State>,
    /// Knative's cluster-wide `max-scale-up-rate`.
    max_scale_up_rate: f64,
}

impl Default for Scaler {
    fn default() -> Self {
        Self::new(ScalingSettings::default().max_scale_up_rate)
    }
}

impl Scaler {
    pub fn new(max_scale_up_rate: f64) -> Self {
        Self {
            states: HashMap::new(),
            max_scale_up_rate,
        }
    }

    /// Forgets every function's history: on losing the lease, so that a later term starts
    /// from fresh observations instead of a stale window.
    pub fn forget_all(&mut self) {
        self.states.clear();
    }

    /// Records `observed` concurrency per function at `now` and returns the scale writes
    /// the KPA asks for. Functions not in `functions` are forgotten.
    pub fn decide(
        &mut self,
        now: Instant,
        functions: &[Function],
        observed: impl Fn(&RevisionId) -> f64,
    ) -> Vec<Write> {
        self.states
            .retain(|id, _| functions.iter().any(|f| &f.id == id));
        let mut writes = Vec::new();
        for f in functions {
            let settings = ScalingSettings {
                max_scale_up_rate: self.max_scale_up_rate,
                ..f.scaling()
            };
            let state = self.states.entry(f.id.clone()).or_insert_with(|| State {
                autoscaler: Autoscaler::new(settings),
                since: now,
                pending: None,
            });
            state.autoscaler.set_settings(settings);
            state.autoscaler.record(now, observed(&f.id));
            let ready = u32::try_from(f.ready.len()).unwrap_or(u32::MAX);
            let mut desired = state.autoscaler.decide(now, ready).desired;
            // A leader that has watched a function for less than a stable window has not
            // seen enough to take pods away (a new Deployment's first pod, or a new leader
            // with no history): like Knative's initial scale, it only adds.
            if now.duration_since(state.since) < settings.stable_window {
                desired = desired.max(f.replicas);
            }
            if state.pending.is_some_and(|(n, _)| n == f.replicas) {
                state.pending = None;
            }
            let recently_asked = state
                .pending
                .is_some_and(|(n, at)| n == desired && now.duration_since(at) < UNCONFIRMED);
            if desired != f.replicas && !recently_asked {
                state.pending = Some((desired, now));
                writes.push(Write {
                    id: f.id.clone(),
                    from: f.replicas,
                    to: desired,
                });
            }
        }
        writes
    }

    /// A write failed: try again at the next decision.
    pub fn write_failed(&mut self, id: &RevisionId) {
        if let Some(s) = self.states.get_mut(id) {
            s.pending = None;
        }
    }
}

/// The metrics addresses to scrape for `f`, at most [`MAX_SCRAPED_PODS`], and the factor
/// that scales their sum up to every ready pod.
pub fn scrape_targets(f: &Function) -> (Vec<SocketAddr>, f64) {
    let n = f.ready.len();
    if n == 0 {
        return (Vec::new(), 0.0);
    }
    let take = n.min(MAX_SCRAPED_PODS);
    // A rotating window, so that over time every pod is looked at.
    let start = if n > take { fastrand::usize(..n) } else { 0 };
    let targets = (0..take)
        .map(|i| SocketAddr::new(f.ready[(start + i) % n], QUEUE_PROXY_METRICS_PORT))
        .collect();
    (targets, n as f64 / take as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::net::IpAddr;
    use thaw_shared::annotations::FunctionSettings;

    fn function(replicas: u32, ready: usize, annotations: &[(&str, &str)]) -> Function {
        let map: BTreeMap<String, String> = annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Function {
            id: RevisionId::new("fn", "hello"),
            settings: FunctionSettings::from_annotations(&map).unwrap(),
            replicas,
            ready: (0..ready)
                .map(|i| IpAddr::from([10, 0, 0, i as u8 + 1]))
                .collect(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_scale_up_rate_bounds_a_function_whose_pods_are_not_ready() {
        let mut scaler = Scaler::new(2.0);
        let cc = [("thaw.dev/container-concurrency", "1")];
        let now = Instant::now();
        let to = |w: Vec<Write>| w.first().map(|w| w.to);
        // 100 waiting at CC 1 wants 143 pods; with none ready, 2 × max(1, 0) = 2.
        let w = scaler.decide(now, &[function(0, 0, &cc)], |_| 100.0);
        assert_eq!(to(w), Some(2));
        // Two replicas asked for, none ready yet: still 2, so nothing is written.
        let w = scaler.decide(now + Duration::from_secs(1), &[function(2, 0, &cc)], |_| {
            100.0
        });
        assert_eq!(to(w), None);
        // Both ready: up to 4.
        let w = scaler.decide(now + Duration::from_secs(2), &[function(2, 2, &cc)], |_| {
            100.0
        });
        assert_eq!(to(w), Some(4));
    }

    #[tokio::test(start_paused = true)]
    async fn scales_from_zero_on_load_and_back_after_the_grace_period() {
        let mut scaler = Scaler::default();
        let cc = [
            ("thaw.dev/container-concurrency", "1"),
            ("thaw.dev/stable-window", "6s"),
            ("thaw.dev/scale-to-zero-grace-period", "2s"),
        ];
        let start = Instant::now();
        // No traffic, at zero: nothing to write.
        assert!(scaler
            .decide(start, &[function(0, 0, &cc)], |_| 0.0)
            .is_empty());
        // A request waits: one pod at once.
        let w = scaler.decide(
            start + Duration::from_secs(1),
            &[function(0, 0, &cc)],
            |_| 1.0,
        );
        assert_eq!(
            w,
            [Write {
                id: RevisionId::new("fn", "hello"),
                from: 0,
                to: 1
            }]
        );
        // Asked already and not confirmed yet: not asked again within 5 s.
        assert!(scaler
            .decide(
                start + Duration::from_secs(2),
                &[function(0, 0, &cc)],
                |_| 1.0
            )
            .is_empty());
        // Confirmed and ready; 5 waiting at CC 1 → more pods.
        let w = scaler.decide(
            start + Duration::from_secs(3),
            &[function(1, 1, &cc)],
            |_| 5.0,
        );
        assert!(w[0].to > 1, "{w:?}");
        let to = w[0].to;
        // Load gone: after the window and the grace period, back to zero.
        let mut t = start + Duration::from_secs(4);
        let mut last = None;
        for _ in 0..30 {
            t += Duration::from_secs(1);
            let current = last.unwrap_or(to);
            if let Some(w) = scaler
                .decide(t, &[function(current, current as usize, &cc)], |_| 0.0)
                .pop()
            {
                last = Some(w.to);
            }
        }
        assert_eq!(last, Some(0));
    }

    #[tokio::test(start_paused = true)]
    async fn respects_max_scale_and_retries_failed_writes() {
        let mut scaler = Scaler::default();
        let a = [
            ("thaw.dev/container-concurrency", "1"),
            ("thaw.dev/max-scale", "3"),
        ];
        let now = Instant::now();
        let w = scaler.decide(now, &[function(1, 1, &a)], |_| 50.0);
        assert_eq!(w[0].to, 3);
        scaler.write_failed(&w[0].id);
        let w = scaler.decide(now + Duration::from_secs(1), &[function(1, 1, &a)], |_| {
            50.0
        });
        assert_eq!(w.len(), 1, "a failed write is retried at once");
        // Someone else sets the scale to 1 again: after the confirmation window, rewritten.
        let later = now + Duration::from_secs(10);
        assert_eq!(
            scaler.decide(later, &[function(1, 1, &a)], |_| 50.0).len(),
            1
        );
    }

    #[tokio::test(start_paused = true)]
    async fn min_scale_holds_with_no_traffic_and_removed_functions_are_forgotten() {
        let mut scaler = Scaler::default();
        let a = [("thaw.dev/min-scale", "2")];
        let now = Instant::now();
        let w = scaler.decide(now, &[function(0, 0, &a)], |_| 0.0);
        assert_eq!(w[0].to, 2);
        assert!(scaler.decide(now, &[], |_| 0.0).is_empty());
        assert!(scaler.states.is_empty());
    }

    #[test]
    fn scrapes_at_most_sixteen_pods_and_scales_up() {
        let (t, factor) = scrape_targets(&function(3, 3, &[]));
        assert_eq!((t.len(), factor), (3, 1.0));
        assert!(t.iter().all(|a| a.port() == 9090));
        let mut f = function(40, 0, &[]);
        f.ready = (0..40).map(|i| IpAddr::from([10, 0, 1, i as u8])).collect();
        let (t, factor) = scrape_targets(&f);
        assert_eq!(t.len(), 16);
        assert_eq!(factor, 2.5);
        assert_eq!(scrape_targets(&function(0, 0, &[])), (Vec::new(), 0.0));
    }
}
