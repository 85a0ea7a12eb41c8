//! The circuit breaker of one provider: pure state, driven by the caller's clock.
//!
//! Closed → open after `failure_threshold` failures within `window` → after `cool_down` one
//! half-open probe is let through → closed on its success, open again on its failure. While open
//! (or while the probe is out) sends are refused at once, so a provider that is down is not
//! hammered and the dispatcher fails over without waiting for timeouts.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// When a circuit opens and how long it stays open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct CircuitSettings {
    /// Failures within `window_ms` that open the circuit.
    pub failure_threshold: u32,
    /// Window over which failures are counted, in milliseconds.
    pub window_ms: u64,
    /// How long the circuit stays open before a probe, in milliseconds.
    pub cool_down_ms: u64,
}

impl Default for CircuitSettings {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            window_ms: 30_000,
            cool_down_ms: 15_000,
        }
    }
}

/// The three states of a circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CircuitState {
    /// Sends go through.
    Closed,
    /// Sends are refused until the cool-down ends.
    Open,
    /// One probe is out; other sends are refused until it reports.
    HalfOpen,
}

impl CircuitState {
    /// The snake_case name, for APIs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

/// Whether a send may go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// An ordinary send while closed.
    Allowed,
    /// The single half-open probe; its result decides the circuit.
    Probe,
    /// Refused: the circuit is open.
    Refused,
}

/// A circuit breaker's state and counters.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    settings: CircuitSettings,
    state: CircuitState,
    recent_failures: VecDeque<Instant>,
    opened_at: Option<Instant>,
    times_opened: u64,
}

impl CircuitBreaker {
    /// A closed circuit.
    pub fn new(settings: CircuitSettings) -> Self {
        Self {
            settings,
            state: CircuitState::Closed,
            recent_failures: VecDeque::new(),
            opened_at: None,
            times_opened: 0,
        }
    }

    /// The current state.
    pub fn state(&self) -> CircuitState {
        self.state
    }

    /// How many times the circuit has opened since start.
    pub fn times_opened(&self) -> u64 {
        self.times_opened
    }

    /// Failures counted in the current window.
    pub fn recent_failures(&self) -> usize {
        self.recent_failures.len()
    }

    /// Asks whether a send may go out now.
    pub fn admit(&mut self, now: Instant) -> Admission {
        match self.state {
            CircuitState::Closed => Admission::Allowed,
            CircuitState::HalfOpen => Admission::Refused,
            CircuitState::Open => {
                let cool_down = Duration::from_millis(self.settings.cool_down_ms);
                match self.opened_at {
                    Some(at) if now.saturating_duration_since(at) >= cool_down => {
                        self.state = CircuitState::HalfOpen;
                        Admission::Probe
                    }
                    _ => Admission::Refused,
                }
            }
        }
    }

    /// How long a send refused now should wait before it is tried again: while open, until the
    /// circuit lets its probe through; while half-open, a whole cool-down (the probe is out, and
    /// if it fails the circuit opens for that long: waiting less would only be refused again);
    /// zero while closed.
    pub fn cool_down_left(&self, now: Instant) -> Duration {
        let cool_down = Duration::from_millis(self.settings.cool_down_ms);
        match (self.state, self.opened_at) {
            (CircuitState::Open, Some(at)) => {
                cool_down.saturating_sub(now.saturating_duration_since(at))
            }
            (CircuitState::HalfOpen, _) => cool_down,
            _ => Duration::ZERO,
        }
    }

    /// Reports a send that succeeded (or failed in a way that is not the provider's fault).
    pub fn on_success(&mut self, admission: Admission) {
        if admission == Admission::Probe && self.state == CircuitState::HalfOpen {
            self.state = CircuitState::Closed;
            self.recent_failures.clear();
            self.opened_at = None;
        }
    }

    /// Reports a send that failed through the provider's fault.
    pub fn on_failure(&mut self, admission: Admission, now: Instant) {
        match (self.state, admission) {
            (CircuitState::HalfOpen, Admission::Probe) => self.open(now),
            (CircuitState::Closed, _) => {
                let window = Duration::from_millis(self.settings.window_ms);
                self.recent_failures.push_back(now);
                while let Some(&oldest) = self.recent_failures.front() {
                    if now.saturating_duration_since(oldest) > window {
                        self.recent_failures.pop_front();
                    } else {
                        break;
                    }
                }
                if self.recent_failures.len() >= self.settings.failure_threshold.max(1) as usize {
                    self.open(now);
                }
            }
            // Late results of sends admitted before the circuit opened change nothing.
            _ => {}
        }
    }

    /// Reports a send that was admitted but never reached the provider (its caller stopped
    /// waiting): an abandoned probe tested nothing, so the circuit goes back to open with its
    /// cool-down already over, and the next send is the probe.
    pub fn on_abandoned(&mut self, admission: Admission) {
        if admission == Admission::Probe && self.state == CircuitState::HalfOpen {
            self.state = CircuitState::Open;
        }
    }

    /// Opens the circuit now (also used when another instance reports the provider down).
    pub fn open(&mut self, now: Instant) {
        if self.state != CircuitState::Open {
            self.times_opened += 1;
        }
        self.state = CircuitState::Open;
        self.opened_at = Some(now);
        self.recent_failures.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> CircuitSettings {
        CircuitSettings {
            failure_threshold: 3,
            window_ms: 1_000,
            cool_down_ms: 5_000,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn opens_after_threshold_failures_within_window() {
        let t0 = Instant::now();
        let mut cb = CircuitBreaker::new(settings());
        for i in 0..2 {
            assert_eq!(cb.admit(t0 + ms(i)), Admission::Allowed);
            cb.on_failure(Admission::Allowed, t0 + ms(i));
        }
        assert_eq!(cb.state(), CircuitState::Closed);
        cb.on_failure(Admission::Allowed, t0 + ms(10));
        assert_eq!(cb.state(), CircuitState::Open);
        assert_eq!(cb.admit(t0 + ms(11)), Admission::Refused);
        assert_eq!(cb.times_opened(), 1);
    }

    #[test]
    fn failures_outside_the_window_do_not_add_up() {
        let t0 = Instant::now();
        let mut cb = CircuitBreaker::new(settings());
        cb.on_failure(Admission::Allowed, t0);
        cb.on_failure(Admission::Allowed, t0 + ms(600));
        cb.on_failure(Admission::Allowed, t0 + ms(1_500));
        assert_eq!(cb.state(), CircuitState::Closed);
        assert_eq!(cb.recent_failures(), 2);
    }

    #[test]
    fn one_probe_after_cool_down_then_closed_on_success() {
        let t0 = Instant::now();
        let mut cb = CircuitBreaker::new(settings());
        cb.open(t0);
        assert_eq!(cb.admit(t0 + ms(4_999)), Admission::Refused);
        assert_eq!(cb.admit(t0 + ms(5_000)), Admission::Probe);
        assert_eq!(cb.state(), CircuitState::HalfOpen);
        assert_eq!(
            cb.admit(t0 + ms(5_001)),
            Admission::Refused,
            "only one probe"
        );
        cb.on_success(Admission::Probe);
        assert_eq!(cb.state(), CircuitState::Closed);
        assert_eq!(cb.admit(t0 + ms(5_002)), Admission::Allowed);
    }

    #[test]
    fn the_cool_down_left_counts_down_while_open_and_is_whole_while_half_open() {
        let t0 = Instant::now();
        let mut cb = CircuitBreaker::new(settings());
        assert_eq!(cb.cool_down_left(t0), Duration::ZERO, "closed");
        cb.open(t0);
        assert_eq!(cb.cool_down_left(t0 + ms(1_000)), ms(4_000));
        assert_eq!(cb.cool_down_left(t0 + ms(6_000)), Duration::ZERO);
        assert_eq!(cb.admit(t0 + ms(6_000)), Admission::Probe);
        assert_eq!(
            cb.cool_down_left(t0 + ms(6_000)),
            ms(5_000),
            "half-open: a refused send waits a whole cool-down, not a spin"
        );
    }

    #[test]
    fn failed_probe_reopens_for_another_cool_down() {
        let t0 = Instant::now();
        let mut cb = CircuitBreaker::new(settings());
        cb.open(t0);
        assert_eq!(cb.admit(t0 + ms(5_000)), Admission::Probe);
        cb.on_failure(Admission::Probe, t0 + ms(5_100));
        assert_eq!(cb.state(), CircuitState::Open);
        assert_eq!(cb.admit(t0 + ms(9_000)), Admission::Refused);
        assert_eq!(cb.admit(t0 + ms(10_100)), Admission::Probe);
        assert_eq!(cb.times_opened(), 2);
    }

    #[test]
    fn an_abandoned_probe_lets_the_next_send_probe() {
        let t0 = Instant::now();
        let mut cb = CircuitBreaker::new(settings());
        cb.open(t0);
        assert_eq!(cb.admit(t0 + ms(5_000)), Admission::Probe);
        cb.on_abandoned(Admission::Allowed);
        assert_eq!(cb.state(), CircuitState::HalfOpen, "not the probe");
        cb.on_abandoned(Admission::Probe);
        assert_eq!(cb.state(), CircuitState::Open);
        assert_eq!(
            cb.admit(t0 + ms(5_001)),
            Admission::Probe,
            "no new cool-down"
        );
        assert_eq!(cb.times_opened(), 1, "it did not open again");
    }

    #[test]
    fn late_results_of_earlier_sends_do_not_close_or_reopen() {
        let t0 = Instant::now();
        let mut cb = CircuitBreaker::new(settings());
        cb.open(t0);
        assert_eq!(cb.admit(t0 + ms(5_000)), Admission::Probe);
        cb.on_success(Admission::Allowed);
        assert_eq!(cb.state(), CircuitState::HalfOpen, "not the probe's result");
        cb.on_failure(Admission::Allowed, t0 + ms(5_001));
        assert_eq!(cb.state(), CircuitState::HalfOpen);
    }
}
