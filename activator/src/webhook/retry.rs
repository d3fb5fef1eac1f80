//! Waiting out an API server that is away: capped exponential backoff, and one log line
//! when a failure starts or changes (not one per retry), one when it ends.

use std::time::Duration;

/// 250 ms doubling to 10 s, ±25 % so that replicas do not knock on a recovering API
/// server in step.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

const MIN: Duration = Duration::from_millis(250);
const MAX: Duration = Duration::from_secs(10);

impl Default for Backoff {
    fn default() -> Self {
        Self { next: MIN }
    }
}

impl Backoff {
    /// The next wait.
    pub fn next_delay(&mut self) -> Duration {
        let current = self.next;
        self.next = (self.next * 2).min(MAX);
        current.mul_f64(0.75 + fastrand::f64() * 0.5)
    }

    pub fn reset(&mut self) {
        self.next = MIN;
    }
}

impl kube::runtime::utils::Backoff for Backoff {
    fn reset(&mut self) {
        Backoff::reset(self);
    }
}

impl Iterator for Backoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(self.next_delay())
    }
}

/// The failure of one ongoing task, logged once per distinct message.
#[derive(Debug)]
pub struct Complaint {
    task: &'static str,
    last: Option<String>,
}

impl Complaint {
    pub fn new(task: &'static str) -> Self {
        Self { task, last: None }
    }

    /// Logs `message` at warn unless it is the one logged last. Returns whether it did.
    pub fn report(&mut self, message: String) -> bool {
        if self.last.as_deref() == Some(message.as_str()) {
            return false;
        }
        tracing::warn!(error = %message, "{}", self.task);
        self.last = Some(message);
        true
    }

    /// The task works again; says so if it had failed.
    pub fn clear(&mut self) {
        if self.last.take().is_some() {
            tracing::info!("{}: working again", self.task);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_cap_and_resets() {
        let mut b = Backoff::default();
        let waits: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert!(waits[0] <= MIN.mul_f64(1.25) && waits[0] >= MIN.mul_f64(0.75));
        assert!(waits.iter().all(|w| *w <= MAX.mul_f64(1.25)));
        assert!(waits[7] >= MAX.mul_f64(0.75));
        b.reset();
        assert!(b.next_delay() <= MIN.mul_f64(1.25));
    }

    #[test]
    fn a_complaint_is_logged_once_until_it_changes() {
        let mut c = Complaint::new("test");
        assert!(c.report("down".into()));
        assert!(!c.report("down".into()));
        assert!(c.report("forbidden".into()));
        c.clear();
        assert!(c.report("forbidden".into()));
    }
}
