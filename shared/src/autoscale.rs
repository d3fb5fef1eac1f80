//! The built-in autoscaler's decision (DESIGN "The built-in autoscaler"): Knative's KPA
//! rule as a pure function of (observed concurrency samples, ready pods, clock).
//!
//! The caller owns the clock and the I/O: once per tick it records the revision's total
//! observed concurrency (the activator's own plus the queue-proxies', without counting a
//! request twice) and asks for a decision given the pods that are ready. Nothing here
//! reads a clock or sleeps, so every decision is testable by adding `Duration`s to an
//! `Instant`.
//!
//! Where this departs from Knative, on purpose:
//! - A window average is the mean of the samples inside it, not of 1 s buckets; with one
//!   sample per second (how the platforms drive it) the two are the same.
//! - From zero ready pods there is no panic mode: the decision is simply the larger of the
//!   stable and panic demands, so a burst wakes the revision at the size it needs without
//!   then pinning that size for a whole stable window.
//! - The scale-to-zero grace period counts from the last sample with traffic, not from
//!   when Knative's reconciler put the activator back in the path; there is no activator
//!   hand-over to wait for here.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// How a revision scales; the defaults are Knative's (`config-autoscaler`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScalingSettings {
    /// Concurrency per pod to aim for; the caller picks it (Knative's default 100, or
    /// `containerConcurrency × target utilisation`).
    pub target: f64,
    /// Pods kept even with no traffic; 0 lets the revision scale to zero.
    pub min_scale: u32,
    /// Upper bound on pods; 0 means unbounded, as in Knative.
    pub max_scale: u32,
    /// The window whose average drives normal scaling.
    pub stable_window: Duration,
    /// The panic window as a share of the stable window (Knative's
    /// `panic-window-percentage`), so both move together when the stable window changes.
    pub panic_window_percentage: f64,
    /// Panic when panic-window demand reaches this multiple of current capacity.
    pub panic_threshold: f64,
    /// How long a revision that has had traffic keeps its last pod once demand is zero.
    pub scale_to_zero_grace_period: Duration,
    /// Largest multiple of the ready pods one decision may ask for.
    pub max_scale_up_rate: f64,
    /// Largest divisor of the ready pods one decision may shrink to.
    pub max_scale_down_rate: f64,
}

impl Default for ScalingSettings {
    fn default() -> Self {
        Self {
            target: 100.0,
            min_scale: 0,
            max_scale: 0,
            stable_window: Duration::from_secs(60),
            panic_window_percentage: 10.0,
            panic_threshold: 2.0,
            scale_to_zero_grace_period: Duration::from_secs(30),
            max_scale_up_rate: 1000.0,
            max_scale_down_rate: 2.0,
        }
    }
}

impl ScalingSettings {
    pub fn with_target(self, target: f64) -> Self {
        Self { target, ..self }
    }

    pub fn with_min_scale(self, min_scale: u32) -> Self {
        Self { min_scale, ..self }
    }

    pub fn with_max_scale(self, max_scale: u32) -> Self {
        Self { max_scale, ..self }
    }

    pub fn with_stable_window(self, stable_window: Duration) -> Self {
        Self {
            stable_window,
            ..self
        }
    }

    pub fn with_panic_window_percentage(self, panic_window_percentage: f64) -> Self {
        Self {
            panic_window_percentage,
            ..self
        }
    }

    pub fn with_scale_to_zero_grace_period(self, scale_to_zero_grace_period: Duration) -> Self {
        Self {
            scale_to_zero_grace_period,
            ..self
        }
    }

    /// The panic window, derived from the stable window (10 % by default: 6 s of 60 s).
    pub fn panic_window(&self) -> Duration {
        let share = if self.panic_window_percentage > 0.0 {
            self.panic_window_percentage.min(100.0) / 100.0
        } else {
            Self::default().panic_window_percentage / 100.0
        };
        // `share` is in (0, 1], so the product can neither overflow nor go negative.
        self.stable_window.mul_f64(share)
    }

    /// Replaces values that would make the arithmetic meaningless, so odd input degrades
    /// to sane behaviour instead of panicking or freezing the scale. Knative's webhook
    /// rejects these; here nothing stands in front of us.
    fn sanitized(self) -> Self {
        let defaults = Self::default();
        Self {
            // Brief and Knative agree a target must be positive; 1 is the most cautious.
            target: if self.target.is_finite() && self.target > 0.0 {
                self.target
            } else {
                1.0
            },
            // A zero window would forget every sample as it arrives.
            stable_window: if self.stable_window.is_zero() {
                defaults.stable_window
            } else {
                self.stable_window
            },
            panic_threshold: if self.panic_threshold.is_finite() && self.panic_threshold > 0.0 {
                self.panic_threshold
            } else {
                defaults.panic_threshold
            },
            // A rate of 1 (or less) would pin the scale where it is forever.
            max_scale_up_rate: if self.max_scale_up_rate > 1.0 {
                self.max_scale_up_rate
            } else {
                defaults.max_scale_up_rate
            },
            max_scale_down_rate: if self.max_scale_down_rate > 1.0 {
                self.max_scale_down_rate
            } else {
                defaults.max_scale_down_rate
            },
            ..self
        }
    }
}

/// One decision: how many pods the revision should have now, and why.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    pub desired: u32,
    pub panicking: bool,
    pub stable_average: f64,
    pub panic_average: f64,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    concurrency: f64,
}

#[derive(Debug, Clone, Copy)]
struct Panic {
    /// The last decision that met the panic threshold; panic lasts a stable window past it.
    last_triggered: Instant,
    /// The most pods asked for during this panic; panic never asks for fewer.
    highest: u32,
}

/// Knative's KPA for one revision.
#[derive(Debug)]
pub struct Autoscaler {
    settings: ScalingSettings,
    /// Oldest first; nothing older than the stable window.
    samples: VecDeque<Sample>,
    /// The last sample with traffic, kept past the window: the grace period runs from it.
    last_active: Option<Instant>,
    panic: Option<Panic>,
    /// What the last decision asked for, repeated when there is no data to decide on.
    last_desired: Option<u32>,
}

/// A safety net for a caller that records far more often than once a second: one sample a
/// second for Knative's longest stable window (1 h). The window bounds memory otherwise.
const MAX_SAMPLES: usize = 3600;

impl Autoscaler {
    pub fn new(settings: ScalingSettings) -> Self {
        Self {
            settings: settings.sanitized(),
            samples: VecDeque::new(),
            last_active: None,
            panic: None,
            last_desired: None,
        }
    }

    /// The settings in force, after odd values were replaced (see `ScalingSettings`).
    pub fn settings(&self) -> &ScalingSettings {
        &self.settings
    }

    /// Takes effect at the next decision; samples and panic state carry over, as when
    /// Knative updates a revision's autoscaling annotations.
    pub fn set_settings(&mut self, settings: ScalingSettings) {
        self.settings = settings.sanitized();
    }

    /// Records the revision's total observed concurrency at `now`. NaN, infinite and
    /// negative values count as no traffic: a broken scrape must not wake or grow the
    /// revision.
    pub fn record(&mut self, now: Instant, observed_concurrency: f64) {
        let concurrency = if observed_concurrency.is_finite() && observed_concurrency > 0.0 {
            observed_concurrency
        } else {
            0.0
        };
        // Window arithmetic assumes samples in time order; a caller's clock going
        // backwards is filed at the newest instant rather than reordering history.
        let at = match self.samples.back() {
            Some(newest) if newest.at > now => newest.at,
            _ => now,
        };
        if concurrency > 0.0 {
            self.last_active = Some(at);
        }
        self.samples.push_back(Sample { at, concurrency });
        if self.samples.len() > MAX_SAMPLES {
            self.samples.pop_front();
        }
        self.forget_outside_stable_window(now);
    }

    /// Decides how many pods the revision should have at `now` with `ready_pods` ready.
    /// `ready_pods` must count only pods that serve: the scale-up rate is a multiple of
    /// them, so a caller that counted pods still starting would let a revision whose pods
    /// never become ready grow without bound.
    pub fn decide(&mut self, now: Instant, ready_pods: u32) -> Decision {
        self.forget_outside_stable_window(now);
        let s = self.settings;

        // Knative makes no decision without data in the stable window, so the scale
        // stays; repeating the last decision is our equivalent (the pod count if this is
        // the first), rather than reading "no data" as "no traffic" and halving.
        let Some(stable_average) = self.window_average(now, s.stable_window) else {
            let desired = self.bounded(self.last_desired.unwrap_or(ready_pods));
            self.last_desired = Some(desired);
            return Decision {
                desired,
                panicking: self.panic.is_some(),
                stable_average: 0.0,
                panic_average: 0.0,
            };
        };
        // An empty panic window reads as no burst, as in Knative.
        let panic_average = self.window_average(now, s.panic_window()).unwrap_or(0.0);

        // Rates are relative to at least one pod so that a revision at zero can still
        // grow, and one pod can still go to zero (⌊1 / 2⌋ = 0).
        let ready = f64::from(ready_pods.max(1));
        // The ceiling guarantees growth by at least one pod even for a timid rate.
        let max_up = (s.max_scale_up_rate * ready).ceil();
        let max_down = (ready / s.max_scale_down_rate).floor();
        let stable_pods = (stable_average / s.target).ceil();
        let panic_pods = (panic_average / s.target).ceil();
        // Float-to-int casts saturate, and every operand is finite and non-negative.
        let desired_stable = stable_pods.max(max_down).min(max_up) as u32;
        let desired_panic = panic_pods.max(max_down).min(max_up) as u32;

        // Panic compares the unclamped demand with current capacity: at twice what the
        // ready pods can serve, waiting a stable window for the average would queue
        // requests for a minute. With nothing ready there is no capacity to compare with;
        // that case is handled below as a plain wake-up.
        let over_threshold = ready_pods > 0 && panic_pods / ready >= s.panic_threshold;
        self.update_panic(now, over_threshold, s.stable_window);

        let desired = match &mut self.panic {
            // In panic Knative only ever scales up: the burst may come back, and pods
            // just started are the expensive part. It provisions for the stable demand
            // too, in case that is the larger.
            Some(panic) => {
                panic.highest = panic.highest.max(desired_stable).max(desired_panic);
                panic.highest
            }
            // From zero, size for the burst straight away instead of for its
            // diluted stable average.
            None if ready_pods == 0 => desired_stable.max(desired_panic),
            None => desired_stable,
        };

        // Keep the last pod through the grace period: traffic that pauses briefly should
        // not pay a cold start. A revision with nothing running has nothing to keep.
        let desired = if desired == 0 && ready_pods > 0 && self.within_grace(now) {
            1
        } else {
            desired
        };

        // A request waiting in the activator has nowhere to go until a pod exists.
        let desired = if ready_pods == 0 && (stable_average > 0.0 || panic_average > 0.0) {
            desired.max(1)
        } else {
            desired
        };

        let desired = self.bounded(desired);
        self.last_desired = Some(desired);
        Decision {
            desired,
            panicking: self.panic.is_some(),
            stable_average,
            panic_average,
        }
    }

    /// Panic starts at the first decision over the threshold, is extended by every later
    /// one, and ends once a whole stable window has passed since the last: by then the
    /// surge is in the stable average and stable scaling can take over.
    fn update_panic(&mut self, now: Instant, over_threshold: bool, stable_window: Duration) {
        match (&mut self.panic, over_threshold) {
            (Some(panic), true) => panic.last_triggered = now,
            (None, true) => {
                tracing::info!("autoscaler panicking");
                self.panic = Some(Panic {
                    last_triggered: now,
                    highest: 0,
                });
            }
            (Some(panic), false)
                if now.saturating_duration_since(panic.last_triggered) >= stable_window =>
            {
                tracing::info!("autoscaler leaving panic");
                self.panic = None;
            }
            _ => {}
        }
    }

    fn within_grace(&self, now: Instant) -> bool {
        self.last_active.is_some_and(|active| {
            now.saturating_duration_since(active) < self.settings.scale_to_zero_grace_period
        })
    }

    /// `min_scale` and `max_scale` win over everything else, as Knative applies them
    /// after the decision; if they conflict, `max_scale` wins.
    fn bounded(&self, desired: u32) -> u32 {
        let desired = desired.max(self.settings.min_scale);
        match self.settings.max_scale {
            0 => desired,
            max => desired.min(max),
        }
    }

    /// Mean of the samples younger than `window`; `None` when there are none.
    fn window_average(&self, now: Instant, window: Duration) -> Option<f64> {
        let (sum, count) = self
            .samples
            .iter()
            .rev()
            .take_while(|sample| now.saturating_duration_since(sample.at) < window)
            .fold((0.0, 0u32), |(sum, count), sample| {
                (sum + sample.concurrency, count + 1)
            });
        (count > 0).then(|| sum / f64::from(count))
    }

    fn forget_outside_stable_window(&mut self, now: Instant) {
        while self.samples.front().is_some_and(|oldest| {
            now.saturating_duration_since(oldest.at) >= self.settings.stable_window
        }) {
            self.samples.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    /// Stable 6 s, panic 0.6 s (10 %), target 100: short enough to follow by hand.
    fn short() -> ScalingSettings {
        ScalingSettings::default().with_stable_window(Duration::from_secs(6))
    }

    /// A fake clock ticking once a second, with the platform starting or stopping pods
    /// instantly: the next decision sees the last one's pods as ready.
    struct Sim {
        scaler: Autoscaler,
        now: Instant,
        ready: u32,
    }

    impl Sim {
        fn new(settings: ScalingSettings, ready: u32) -> Self {
            Self {
                scaler: Autoscaler::new(settings),
                now: Instant::now(),
                ready,
            }
        }

        /// Records `concurrency` at the current second, decides, then moves to the next.
        fn tick(&mut self, concurrency: f64) -> Decision {
            self.scaler.record(self.now, concurrency);
            let decision = self.scaler.decide(self.now, self.ready);
            self.ready = decision.desired;
            self.now += SECOND;
            decision
        }
    }

    #[test]
    fn burst_from_zero_scales_straight_to_what_it_needs() {
        let mut sim = Sim::new(ScalingSettings::default(), 0);
        let d = sim.tick(250.0);
        assert_eq!(d.desired, 3);
        assert!(!d.panicking, "no panic from zero");
        // The pods are up; the stable average alone keeps them.
        for _ in 0..10 {
            assert_eq!(sim.tick(250.0).desired, 3);
        }
    }

    #[test]
    fn steady_load_at_three_times_target_settles_at_three() {
        let mut sim = Sim::new(short(), 1);
        // t=0: 3 pods of demand on 1 pod is ≥ 2× capacity: panic.
        let d = sim.tick(300.0);
        assert_eq!((d.desired, d.panicking), (3, true));
        // t=1..5: panic holds, and 3 is what is needed anyway.
        for _ in 1..6 {
            let d = sim.tick(300.0);
            assert_eq!((d.desired, d.panicking), (3, true));
        }
        // t=6: a stable window past the only trigger; stable scaling agrees on 3.
        for t in 6..30 {
            let d = sim.tick(300.0);
            assert_eq!((d.desired, d.panicking), (3, false), "t={t}");
        }
    }

    #[test]
    fn load_drop_waits_for_panic_then_follows_the_stable_average_down() {
        let mut sim = Sim::new(short(), 1);
        // t=0: panic to 3; t=1: 3 pods serving 300.
        assert_eq!(sim.tick(300.0).desired, 3);
        assert_eq!(sim.tick(300.0).desired, 3);
        // t=2..5: demand falls to 1 pod's worth; the stable average is 233, 200, 180,
        // 167 (2–3 pods) but panic, triggered at t=0, holds 3.
        for t in 2..6 {
            let d = sim.tick(100.0);
            assert_eq!((d.desired, d.panicking), (3, true), "t={t}");
        }
        // t=6: panic over; the window (t=1..6) averages 133 → 2.
        let d = sim.tick(100.0);
        assert_eq!((d.desired, d.panicking), (2, false));
        assert!((d.stable_average - 800.0 / 6.0).abs() < 1e-9);
        // t=7: only the drop is left in the window → 1, and 1 it stays.
        for t in 7..20 {
            assert_eq!(sim.tick(100.0).desired, 1, "t={t}");
        }
    }

    #[test]
    fn scale_down_at_most_halves_per_decision() {
        let mut scaler = Autoscaler::new(short());
        let now = Instant::now();
        scaler.record(now, 0.0);
        // Demand is zero, yet 8 pods go 4 → 2 → 1 → 0, never straight to 0.
        assert_eq!(scaler.decide(now, 8).desired, 4);
        assert_eq!(scaler.decide(now, 4).desired, 2);
        assert_eq!(scaler.decide(now, 3).desired, 1);
        assert_eq!(scaler.decide(now, 2).desired, 1);
        // Never had traffic, so no grace period to wait out.
        assert_eq!(scaler.decide(now, 1).desired, 0);
    }

    #[test]
    fn panic_enters_on_a_spike_holds_and_exits_a_stable_window_after_the_last_trigger() {
        let mut sim = Sim::new(short(), 2);
        // t=0..5: 2 pods at their target, calm.
        for _ in 0..6 {
            let d = sim.tick(200.0);
            assert_eq!((d.desired, d.panicking), (2, false));
        }
        // t=6: 5 pods of demand on 2 is 2.5× capacity → panic, sized for the burst.
        let d = sim.tick(500.0);
        assert_eq!((d.desired, d.panicking), (5, true));
        assert_eq!(d.panic_average, 500.0);
        // t=7: the panic window is back to 2 pods of demand: no scale down.
        let d = sim.tick(200.0);
        assert_eq!((d.desired, d.panicking), (5, true));
        // t=8: 10 pods of demand on 5 is exactly the threshold: panic is extended.
        let d = sim.tick(1000.0);
        assert_eq!((d.desired, d.panicking), (10, true));
        // t=9..13: quiet again; 10 is held, including t=12, a stable window past the
        // first trigger, because the last trigger was at t=8.
        for t in 9..14 {
            let d = sim.tick(200.0);
            assert_eq!((d.desired, d.panicking), (10, true), "t={t}");
        }
        // t=14: a stable window past t=8. The stable average (2 pods) takes over, but
        // at most halving: 10 → 5 → 2.
        let d = sim.tick(200.0);
        assert_eq!((d.desired, d.panicking), (5, false));
        assert_eq!(sim.tick(200.0).desired, 2);
        assert_eq!(sim.tick(200.0).desired, 2);
    }

    #[test]
    fn idle_revision_keeps_one_pod_through_the_grace_period_then_goes_to_zero() {
        // Grace 30 s against a 6 s stable window, so the grace period is what decides.
        let mut sim = Sim::new(short(), 1);
        // t=0..4: light traffic on one pod.
        for _ in 0..5 {
            assert_eq!(sim.tick(50.0).desired, 1);
        }
        // t=5..33: silence. The stable average is zero from t=10, but the last traffic
        // was at t=4, so the pod stays until t=34.
        for t in 5..34 {
            assert_eq!(sim.tick(0.0).desired, 1, "t={t}");
        }
        // t=34: 30 s after the last traffic → 0, and 0 it stays.
        for t in 34..40 {
            assert_eq!(sim.tick(0.0).desired, 0, "t={t}");
        }
    }

    #[test]
    fn min_scale_one_never_goes_to_zero() {
        let mut sim = Sim::new(short().with_min_scale(1), 1);
        for _ in 0..5 {
            assert_eq!(sim.tick(50.0).desired, 1);
        }
        for t in 5..200 {
            assert_eq!(sim.tick(0.0).desired, 1, "t={t}");
        }
    }

    #[test]
    fn max_scale_caps_a_burst() {
        let mut sim = Sim::new(ScalingSettings::default().with_max_scale(5), 0);
        assert_eq!(sim.tick(2000.0).desired, 5);
        // Panic from 5 pods (20 needed) still cannot pass the cap.
        let d = sim.tick(2000.0);
        assert_eq!((d.desired, d.panicking), (5, true));
    }

    #[test]
    fn min_scale_holds_a_floor_without_traffic() {
        let mut sim = Sim::new(short().with_min_scale(2), 0);
        // No traffic ever, nothing running: still brought up to the floor.
        assert_eq!(sim.tick(0.0).desired, 2);
        for _ in 1..100 {
            assert_eq!(sim.tick(0.0).desired, 2);
        }
    }

    #[test]
    fn scale_up_is_bounded_by_the_rate_times_the_ready_pods() {
        // Knative's autoscaler.go: maxScaleUp = ⌈max-scale-up-rate × max(1, ready)⌉.
        let settings = ScalingSettings {
            max_scale_up_rate: 3.0,
            ..ScalingSettings::default().with_target(1.0)
        };
        let mut scaler = Autoscaler::new(settings);
        let now = Instant::now();
        scaler.record(now, 500.0);
        // Pods that were asked for but are not ready do not count: still 3 × 1.
        assert_eq!(scaler.decide(now, 0).desired, 3);
        assert_eq!(scaler.decide(now, 0).desired, 3);
        assert_eq!(scaler.decide(now, 2).desired, 6);
        assert_eq!(scaler.decide(now, 100).desired, 300);
        // A timid rate still grows by at least one pod (the ceiling).
        let mut scaler = Autoscaler::new(ScalingSettings {
            max_scale_up_rate: 1.1,
            ..ScalingSettings::default().with_target(1.0)
        });
        scaler.record(now, 3.0);
        assert_eq!(scaler.decide(now, 2).desired, 3);
        // Knative's default, 1000, from zero ready pods.
        let mut scaler = Autoscaler::new(ScalingSettings::default().with_target(0.7));
        scaler.record(now, 5000.0);
        assert_eq!(scaler.decide(now, 0).desired, 1000);
    }

    #[test]
    fn a_single_waiting_request_wakes_a_revision_at_zero() {
        let mut scaler = Autoscaler::new(ScalingSettings::default());
        let now = Instant::now();
        scaler.record(now, 1.0);
        assert_eq!(scaler.decide(now, 0).desired, 1);
    }

    #[test]
    fn a_revision_that_never_had_traffic_stays_at_zero() {
        let mut sim = Sim::new(ScalingSettings::default(), 0);
        for _ in 0..100 {
            assert_eq!(sim.tick(0.0).desired, 0);
        }
    }

    #[test]
    fn samples_older_than_the_stable_window_are_forgotten() {
        let mut scaler = Autoscaler::new(ScalingSettings::default());
        let mut now = Instant::now();
        for i in 0..10_000 {
            scaler.record(now, if i < 9_000 { 500.0 } else { 0.0 });
            now += SECOND;
            assert!(scaler.samples.len() <= 60 + 1);
        }
        // The last 1 000 samples were zero: the 500s are gone from both averages.
        let d = scaler.decide(now - SECOND, 1);
        assert_eq!((d.stable_average, d.panic_average), (0.0, 0.0));
    }

    #[test]
    fn memory_is_bounded_even_when_recording_in_a_hot_loop() {
        let mut scaler = Autoscaler::new(ScalingSettings::default());
        let now = Instant::now();
        for _ in 0..10_000 {
            scaler.record(now, 1.0);
        }
        assert_eq!(scaler.samples.len(), MAX_SAMPLES);
    }

    #[test]
    fn no_data_repeats_the_last_decision() {
        let mut scaler = Autoscaler::new(short());
        let start = Instant::now();
        // Nothing recorded yet: keep what runs rather than halving it.
        assert_eq!(scaler.decide(start, 4).desired, 4);
        scaler.record(start, 700.0);
        assert_eq!(scaler.decide(start, 4).desired, 7);
        // A scrape gap longer than the window: the scale stays.
        assert_eq!(scaler.decide(start + 10 * SECOND, 7).desired, 7);
    }

    #[test]
    fn odd_inputs_do_not_panic_or_scale() {
        let mut scaler = Autoscaler::new(ScalingSettings::default());
        let now = Instant::now();
        for bad in [f64::NAN, -5.0, f64::INFINITY, f64::NEG_INFINITY] {
            scaler.record(now, bad);
        }
        let d = scaler.decide(now, 0);
        assert_eq!((d.desired, d.stable_average), (0, 0.0));

        // Target 0 (or NaN) is treated as 1 concurrent request per pod.
        for target in [0.0, -3.0, f64::NAN] {
            let mut scaler = Autoscaler::new(ScalingSettings::default().with_target(target));
            assert_eq!(scaler.settings().target, 1.0);
            scaler.record(now, 3.0);
            assert_eq!(scaler.decide(now, 0).desired, 3);
        }

        // Rates that would freeze the scale fall back to Knative's defaults.
        let frozen = ScalingSettings {
            max_scale_up_rate: 1.0,
            max_scale_down_rate: 0.0,
            stable_window: Duration::ZERO,
            panic_window_percentage: f64::NAN,
            ..ScalingSettings::default()
        };
        let mut scaler = Autoscaler::new(frozen);
        assert_eq!(scaler.settings().stable_window, Duration::from_secs(60));
        assert_eq!(scaler.settings().panic_window(), Duration::from_secs(6));
        scaler.record(now, 0.0);
        assert_eq!(scaler.decide(now, 4).desired, 2);
    }

    #[test]
    fn clock_going_backwards_is_tolerated() {
        let mut scaler = Autoscaler::new(short());
        let now = Instant::now();
        scaler.record(now + 5 * SECOND, 100.0);
        scaler.record(now, 300.0);
        let d = scaler.decide(now, 0);
        assert_eq!(d.desired, 2);
    }

    #[test]
    fn panic_window_is_a_tenth_of_the_stable_window_by_default() {
        assert_eq!(
            ScalingSettings::default().panic_window(),
            Duration::from_secs(6)
        );
        assert_eq!(short().panic_window(), Duration::from_millis(600));
        assert_eq!(
            short().with_panic_window_percentage(50.0).panic_window(),
            Duration::from_secs(3)
        );
    }
}
