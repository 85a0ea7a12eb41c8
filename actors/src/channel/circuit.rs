//! The circuit breaker of one provider: pure state, driven by the caller's clock.
//!
//! Closed → open after `failure_threshold` failures within `window` → after `cool_down` one
//! half-open probe is let through → closed on its success, open again on its failure.
//!
//! A failure is counted by its [source](FailureSource): the notification that failed, or the one
//! event of a connection that failed many sends at once ([`Incident`]). Each source counts once
//! in the window, its latest failure replacing an earlier one, so that one notification's own
//! retries (a content scanner's `451` for that message, a `5xx` for one chat) or one connection
//! that hung under a group of messages do not open the circuit for everyone. And then either
//! `failure_threshold` of them came in with no send answered since the first of them (a provider
//! that stopped answering, however many sends it answered before: those stay in the window while
//! the failures of a provider that hangs come in only as each send times out), or they are at
//! least `failure_percent` of the window's outcomes (the sends they failed, an incident weighing
//! as many as it failed, and the sends the provider answered): at a high send rate, a small share
//! of failing messages is not an outage, while a relay that resets one connection of many
//! messages in two is. While open
//! (or while the probe is out) sends are refused at once, so a provider that is down is not
//! hammered and the dispatcher fails over without waiting for timeouts. (The channel actor holds
//! some of the sends refused while the probe is out for its result instead, see
//! [`super::actor`].) A send refused while open is told to wait for the rest of the cool-down; one
//! refused while the probe is out, only until the probe's result is due (the rest of its send
//! timeout, at most the cool-down), so that it is not held back a whole cool-down after a probe
//! that closes the circuit a moment later.
//!
//! A provider that says when to come back (an HTTP `Retry-After` on a failure that counts against
//! the circuit; a throttle of one recipient, such as Telegram's `retry_after`, does not count) is
//! taken at its word: a circuit opened by such a failure (or by such a failed probe) stays open
//! until then if that is longer than the cool-down, though never longer than `max_cool_down`, so
//! that a wrong or hostile header cannot park a provider for a day.
//!
//! A provider that throttles the whole account (a bot's global message rate, a project's quota:
//! [`ProviderError::AccountThrottled`](super::ProviderError::AccountThrottled)) is up, but would
//! refuse every send until its wait passes: the circuit is *held* open
//! ([`CircuitBreaker::on_throttle`]) for exactly that wait (the cool-down if it gave none; never
//! longer than `max_cool_down_ms`), without counting a failure, and then lets one probe through as
//! after any opening.
//!
//! Every opening (a hold too) and every closing starts a new *period* ([`CircuitBreaker::period`]). A send is
//! admitted in a period, and its result counts only in that period: a send admitted before the
//! circuit opened (or before a probe closed it) that reports afterwards says nothing of the
//! provider since, and does not count toward the new window. The caller also asks again
//! ([`CircuitBreaker::admit`]) for a send whose period ended before it went out.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::Incident;

/// When a circuit opens and how long it stays open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct CircuitSettings {
    /// Failures within `window_ms` that open the circuit, each notification (or connection
    /// event) counted once however often it failed: this many with no send answered since the
    /// first of them, or this many that are `failure_percent` of the window's outcomes.
    pub failure_threshold: u32,
    /// Window over which failures are counted, in milliseconds.
    pub window_ms: u64,
    /// The least share, in percent, the window's failures must be of its outcomes (the sends
    /// they failed, a connection event weighing as many as it failed, and the sends the provider
    /// answered) for them to open the circuit among answered sends; 0 counts the failures alone,
    /// 100 or more opens on the share only when nothing in the window was answered.
    pub failure_percent: u32,
    /// How long the circuit stays open before a probe, in milliseconds.
    pub cool_down_ms: u64,
    /// The longest the circuit stays open before a probe when the provider asked for a longer
    /// wait than `cool_down_ms` (Retry-After), in milliseconds.
    pub max_cool_down_ms: u64,
}

impl Default for CircuitSettings {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            window_ms: 30_000,
            failure_percent: 50,
            cool_down_ms: 15_000,
            max_cool_down_ms: 300_000,
        }
    }
}

impl CircuitSettings {
    /// How long a circuit opening now stays open, given the wait the provider asked for: the
    /// cool-down, or the provider's wait if longer, up to `max_cool_down_ms` (a cap below the
    /// cool-down is the cool-down).
    pub fn open_for(&self, asked: Option<Duration>) -> Duration {
        let cool_down = Duration::from_millis(self.cool_down_ms);
        asked.map_or(cool_down, |asked| asked.min(self.longest()).max(cool_down))
    }

    /// The longest a circuit stays open.
    fn longest(&self) -> Duration {
        Duration::from_millis(self.max_cool_down_ms.max(self.cool_down_ms))
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
    /// One probe is out; other sends are refused (or held by the channel actor) until it
    /// reports.
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
    /// The outcomes in the window.
    window: Window,
    /// While open: when the probe may go out (`None`: never, for a cool-down longer than the
    /// clock can count).
    open_until: Option<Instant>,
    times_opened: u64,
    /// Whether the circuit was last opened by a throttle of the whole account rather than by
    /// failures (or another instance).
    held: bool,
    /// Counts the openings and closings.
    period: u64,
    /// How long the probe may take before its result is due: the channel's send timeout.
    probe_timeout: Duration,
    /// While half-open: when the probe was let through.
    probe_since: Option<Instant>,
}

impl CircuitBreaker {
    /// A closed circuit.
    pub fn new(settings: CircuitSettings) -> Self {
        Self {
            settings,
            state: CircuitState::Closed,
            window: Window::default(),
            open_until: None,
            times_opened: 0,
            held: false,
            period: 0,
            probe_timeout: Duration::from_millis(settings.cool_down_ms),
            probe_since: None,
        }
    }

    /// The same circuit, whose probe has `timeout` to answer (the channel's send timeout); unless
    /// told, a probe is given a cool-down. Sends refused while the probe is out wait no longer
    /// than what is left of it ([`Self::cool_down_left`]).
    pub fn with_probe_timeout(mut self, timeout: Duration) -> Self {
        self.probe_timeout = timeout;
        self
    }

    /// The current state.
    pub fn state(&self) -> CircuitState {
        self.state
    }

    /// Whether the circuit is open because the provider throttles the whole account (held by
    /// [`on_throttle`](Self::on_throttle)), not because it failed.
    pub fn throttled(&self) -> bool {
        self.held && self.state == CircuitState::Open
    }

    /// How many times the circuit has opened since start (held open by a throttle not counted).
    pub fn times_opened(&self) -> u64 {
        self.times_opened
    }

    /// The current period: it changes whenever the circuit opens or closes (not when the probe
    /// goes out, nor when an abandoned probe hands over to the next send). A send is admitted in
    /// the period current at its admission, and reports its result with it.
    pub fn period(&self) -> u64 {
        self.period
    }

    /// Failures counted in the current window (each notification or connection event once).
    pub fn recent_failures(&self) -> usize {
        self.window.failures()
    }

    /// Asks whether a send may go out now.
    pub fn admit(&mut self, now: Instant) -> Admission {
        match self.state {
            CircuitState::Closed => Admission::Allowed,
            CircuitState::HalfOpen => Admission::Refused,
            CircuitState::Open => match self.open_until {
                Some(until) if now >= until => {
                    self.state = CircuitState::HalfOpen;
                    self.probe_since = Some(now);
                    Admission::Probe
                }
                _ => Admission::Refused,
            },
        }
    }

    /// How long a send refused now should wait before it is tried again: while open, until the
    /// circuit lets its probe through (past a provider's longer Retry-After too); while
    /// half-open, until the probe's result is due (the rest of its send timeout): a probe that
    /// succeeds closes the circuit, and the sends it held back go out soon after rather than a
    /// whole cool-down later; zero while closed.
    pub fn cool_down_left(&self, now: Instant) -> Duration {
        match self.state {
            CircuitState::Open => self.probe_in(now).unwrap_or(Duration::MAX),
            CircuitState::HalfOpen => self.probe_result_in(now),
            CircuitState::Closed => Duration::ZERO,
        }
    }

    /// While half-open, how long from `now` until the probe's result is due: the rest of its
    /// timeout since it was let through, or a whole timeout again once that has passed (it
    /// waited for a concurrency permit, and may have only just gone out). Never more than the
    /// cool-down, the longest a send refused while half-open ever waited: a probe that fails
    /// opens the circuit for that long at least, and a send that comes back sooner is told so.
    fn probe_result_in(&self, now: Instant) -> Duration {
        let left = self
            .probe_since
            .and_then(|since| since.checked_add(self.probe_timeout))
            .map(|due| due.saturating_duration_since(now))
            .filter(|left| !left.is_zero())
            .unwrap_or(self.probe_timeout);
        left.min(Duration::from_millis(self.settings.cool_down_ms))
    }

    /// While open, how long from `now` until the circuit lets its probe through (zero once that
    /// is due: the next send is the probe); `None` while closed or half-open, and for a wait
    /// longer than the clock can count.
    pub fn probe_in(&self, now: Instant) -> Option<Duration> {
        match self.state {
            CircuitState::Open => self
                .open_until
                .map(|until| until.saturating_duration_since(now)),
            CircuitState::Closed | CircuitState::HalfOpen => None,
        }
    }

    /// Reports a send admitted as `admission` in `period` that succeeded at `now` (or failed in a
    /// way that is not the provider's fault, but only after reaching it). While closed, it counts
    /// among the window's outcomes, against which the failures' share is judged.
    pub fn on_success(&mut self, admission: Admission, period: u64, now: Instant) {
        if period != self.period {
            return;
        }
        match (self.state, admission) {
            (CircuitState::HalfOpen, Admission::Probe) => {
                self.state = CircuitState::Closed;
                self.held = false;
                self.window.clear();
                self.open_until = None;
                self.period += 1;
            }
            (CircuitState::Closed, _) => self.window.answered(now, self.window_length()),
            _ => {}
        }
    }

    /// The window's length.
    fn window_length(&self) -> Duration {
        Duration::from_millis(self.settings.window_ms)
    }

    /// Reports a send admitted as `admission` in `period` that failed through the provider's
    /// fault (the failure of `source`) at `now`, with the wait the provider asked for, if it did
    /// (Retry-After): a circuit that opens on it stays open that long, if longer than the
    /// cool-down (up to `max_cool_down_ms`). A failure of a source already in the window replaces
    /// it there. The failure of a send admitted in an earlier period changes nothing.
    pub fn on_failure(
        &mut self,
        admission: Admission,
        period: u64,
        source: FailureSource,
        now: Instant,
        retry_after: Option<Duration>,
    ) {
        if period != self.period {
            // Admitted before the circuit last opened or closed: its failure is old news, already
            // judged by the opening or overruled by the probe that closed the circuit.
            return;
        }
        match (self.state, admission) {
            (CircuitState::HalfOpen, Admission::Probe) => self.open(now, retry_after),
            (CircuitState::Closed, _) => {
                let asked =
                    retry_after.and_then(|wait| now.checked_add(wait.min(self.settings.longest())));
                self.window.failed(source, now, asked, self.window_length());
                if self.window.opens(&self.settings) {
                    // Any of the failures that open the circuit may have asked for a wait.
                    let asked = self.window.longest_wait();
                    self.open(now, asked.map(|until| until.saturating_duration_since(now)));
                }
            }
            // Nothing else is reported in the current period: an ordinary send's period ended
            // when the circuit opened.
            _ => {}
        }
    }

    /// Reports a send admitted as `admission` in `period` that the provider refused because the
    /// whole account is over its rate limit, asking for `wait` if it did. Not a failure: the
    /// window's count is not added to. But every send would be refused alike, so a closed circuit
    /// (or a half-open one, for its probe) is held open until `wait` has passed, the cool-down if
    /// the provider gave none, never longer than `max_cool_down_ms`; then one probe goes out, as
    /// after any opening. The throttle of a send admitted in an earlier period changes nothing:
    /// the circuit has opened or closed since.
    pub fn on_throttle(
        &mut self,
        admission: Admission,
        period: u64,
        now: Instant,
        wait: Option<Duration>,
    ) {
        if period != self.period {
            return;
        }
        match (self.state, admission) {
            (CircuitState::Closed, _) | (CircuitState::HalfOpen, Admission::Probe) => {
                self.hold(now, wait);
            }
            _ => {}
        }
    }

    /// Holds the circuit open from `now` for `wait` (the cool-down if `None`, never longer than
    /// `max_cool_down_ms`) because the provider throttles the whole account: as
    /// [`on_throttle`](Self::on_throttle) does, or on another instance's word that it was
    /// throttled (the account is the same).
    pub fn hold(&mut self, now: Instant, wait: Option<Duration>) {
        let held = wait.map_or(Duration::from_millis(self.settings.cool_down_ms), |wait| {
            wait.min(self.settings.longest())
        });
        self.open_as(now, held, true);
    }

    /// Reports a send admitted as `admission` in `period` that never reached the provider (its
    /// caller stopped waiting, or it failed before anything was sent): an abandoned probe tested
    /// nothing, so the circuit goes back to open with its cool-down already over, and the next
    /// send is the probe.
    pub fn on_abandoned(&mut self, admission: Admission, period: u64) {
        if admission == Admission::Probe
            && period == self.period
            && self.state == CircuitState::HalfOpen
        {
            self.state = CircuitState::Open;
        }
    }

    /// Opens the circuit now (also used when another instance reports the provider down), for the
    /// cool-down or for `wait` (the provider's Retry-After, or how long another instance's
    /// circuit stays open) if longer, up to `max_cool_down_ms`.
    pub fn open(&mut self, now: Instant, wait: Option<Duration>) {
        if self.state != CircuitState::Open {
            self.times_opened += 1;
        }
        self.open_as(now, self.settings.open_for(wait), false);
    }

    /// Opens the circuit from `now` for `open_for` (`held`: by a throttle of the whole account),
    /// in a new period with an empty window.
    fn open_as(&mut self, now: Instant, open_for: Duration, held: bool) {
        self.state = CircuitState::Open;
        self.held = held;
        self.open_until = now.checked_add(open_for);
        self.window.clear();
        self.period += 1;
    }
}

/// What a failure counted against a circuit is counted as: each source once in the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureSource {
    /// The notification whose send failed: its retries are the same failure again.
    Notification(Uuid),
    /// One event of a connection that failed every send it carried.
    Incident(Incident),
}

/// One failure in the window.
#[derive(Debug, Clone, Copy)]
struct Failure {
    /// When it happened.
    at: Instant,
    /// Until when it asked us to wait (Retry-After), if it did.
    asked: Option<Instant>,
    source: FailureSource,
    /// Its number, to tell it from an earlier failure of its source that it replaced.
    seq: u64,
}

/// A source's latest failure in the window.
#[derive(Debug, Clone, Copy)]
struct Latest {
    /// Its number in the window's `failures`.
    seq: u64,
    /// The sends the source failed in the window: a notification's one, an incident's each.
    sends: u64,
}

/// The outcomes of a closed circuit's window: the failures, the latest of each source, and how
/// many sends the provider answered, counted in slices of a thirty-second of the window.
#[derive(Debug, Clone, Default)]
struct Window {
    /// The failures in the order they happened, the replaced ones among them.
    failures: VecDeque<Failure>,
    /// Each source's latest failure in `failures`.
    latest: HashMap<FailureSource, Latest>,
    next_seq: u64,
    /// The sends the sources in `latest` failed, their sum: the failures' weight in the share.
    failed_sends: u64,
    /// The number of the first failure after the last answered send: the failures numbered from
    /// it on came in with nothing answered since.
    unanswered_from: u64,
    /// How many sends were answered in each slice, by the slice's start (at most [`SLICES`] + 1
    /// slices, summed only when a failure asks for the share).
    answered: VecDeque<(Instant, u64)>,
}

/// The slices of a window the answered sends are counted in.
const SLICES: u32 = 32;

impl Window {
    /// The distinct failures in the window.
    fn failures(&self) -> usize {
        self.latest.len()
    }

    /// Whether the window's failures open the circuit: at least `failure_threshold` of them, and
    /// either that many with no send answered since the first of them (a provider that stopped
    /// answering, however much it answered before), or a share of the outcomes of at least
    /// `failure_percent` (failures among answered sends).
    fn opens(&self, settings: &CircuitSettings) -> bool {
        let threshold = settings.failure_threshold.max(1) as usize;
        self.failures() >= threshold
            && (self.unanswered_failures(threshold) >= threshold
                || self.failure_percent() >= settings.failure_percent.min(100))
    }

    /// The distinct failures in the window with no send answered since, counted up to `enough`.
    fn unanswered_failures(&self, enough: usize) -> usize {
        self.failures
            .iter()
            .rev()
            .take_while(|failure| failure.seq >= self.unanswered_from)
            .filter(|failure| self.is_latest(failure))
            .take(enough)
            .count()
    }

    /// The failures' share of the window's outcomes, in percent: the sends they failed (an
    /// incident weighs as many as it failed) among those and the answered ones.
    fn failure_percent(&self) -> u32 {
        let answered: u64 = self.answered.iter().map(|&(_, count)| count).sum();
        let outcomes = self.failed_sends + answered;
        u32::try_from(self.failed_sends * 100 / outcomes.max(1)).unwrap_or(100)
    }

    /// Whether `failure` is its source's latest (not replaced).
    fn is_latest(&self, failure: &Failure) -> bool {
        self.latest
            .get(&failure.source)
            .is_some_and(|latest| latest.seq == failure.seq)
    }

    /// The longest wait any failure in the window (each source's latest) asked for, until when.
    fn longest_wait(&self) -> Option<Instant> {
        self.failures
            .iter()
            .filter(|failure| self.is_latest(failure))
            .filter_map(|failure| failure.asked)
            .max()
    }

    /// Counts a failure of `source` at `now` (replacing an earlier one of it) in a window `length`
    /// long: one more send failed by an incident, still the one of a notification retried.
    fn failed(
        &mut self,
        source: FailureSource,
        now: Instant,
        asked: Option<Instant>,
        length: Duration,
    ) {
        self.forget_before(now, length);
        let seq = self.next_seq;
        self.next_seq += 1;
        let before = self.latest.get(&source).map_or(0, |latest| latest.sends);
        let sends = match source {
            FailureSource::Incident(_) => before + 1,
            FailureSource::Notification(_) => 1,
        };
        self.failed_sends += sends - before;
        self.latest.insert(source, Latest { seq, sends });
        self.failures.push_back(Failure {
            at: now,
            asked,
            source,
            seq,
        });
    }

    /// Counts a send answered at `now` in a window `length` long.
    fn answered(&mut self, now: Instant, length: Duration) {
        self.forget_before(now, length);
        self.unanswered_from = self.next_seq;
        let slice = (length / SLICES).max(Duration::from_millis(1));
        match self.answered.back_mut() {
            Some((start, count)) if now.saturating_duration_since(*start) < slice => *count += 1,
            _ => self.answered.push_back((now, 1)),
        }
    }

    /// Drops what happened more than `length` before `now`.
    fn forget_before(&mut self, now: Instant, length: Duration) {
        let old = |at: Instant| now.saturating_duration_since(at) > length;
        while let Some(oldest) = self.failures.front().copied() {
            if !old(oldest.at) {
                break;
            }
            self.failures.pop_front();
            if self.is_latest(&oldest)
                && let Some(latest) = self.latest.remove(&oldest.source)
            {
                self.failed_sends -= latest.sends;
            }
        }
        while let Some(&(start, _)) = self.answered.front() {
            if !old(start) {
                break;
            }
            self.answered.pop_front();
        }
    }

    /// Forgets everything.
    fn clear(&mut self) {
        self.failures.clear();
        self.latest.clear();
        self.failed_sends = 0;
        self.answered.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> CircuitSettings {
        CircuitSettings {
            failure_threshold: 3,
            window_ms: 1_000,
            failure_percent: 50,
            cool_down_ms: 5_000,
            max_cool_down_ms: 60_000,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// The source of a failure of a notification of its own.
    fn fresh() -> FailureSource {
        FailureSource::Notification(Uuid::now_v7())
    }

    /// A send admitted (`Allowed`) in the current period and answered at `at`.
    fn succeed(cb: &mut CircuitBreaker, at: Instant) {
        cb.on_success(Admission::Allowed, cb.period(), at);
    }

    /// A send admitted (`Allowed`) in the current period that failed on its own (no Retry-After)
    /// at `at`.
    fn fail(cb: &mut CircuitBreaker, at: Instant) {
        cb.on_failure(Admission::Allowed, cb.period(), fresh(), at, None);
    }

    #[test]
    fn opens_after_threshold_failures_within_window() {
        let t0 = Instant::now();
        let mut cb = CircuitBreaker::new(settings());
        for i in 0..2 {
            assert_eq!(cb.admit(t0 + ms(i)), Admission::Allowed);
            fail(&mut cb, t0 + ms(i));
        }
        assert_eq!(cb.state(), CircuitState::Closed);
        fail(&mut cb, t0 + ms(10));
        assert_eq!(cb.state(), CircuitState::Open);
        assert_eq!(cb.admit(t0 + ms(11)), Admission::Refused);
        assert_eq!(cb.times_opened(), 1);
    }

    #[test]
    fn one_notifications_retries_count_as_one_failure() {
        let t0 = Instant::now();
        let mut cb = CircuitBreaker::new(settings());
        let retried = fresh();
        for round in 0..6 {
            cb.on_failure(
                Admission::Allowed,
                cb.period(),
                retried,
                t0 + ms(round * 100),
                None,
            );
        }
        assert_eq!(
            cb.state(),
            CircuitState::Closed,
            "one notification's retries opened the circuit"
        );
        assert_eq!(cb.recent_failures(), 1);
        fail(&mut cb, t0 + ms(600));
        assert_eq!(cb.state(), CircuitState::Closed);
        fail(&mut cb, t0 + ms(700));
        assert_eq!(
            cb.state(),
            CircuitState::Open,
            "three notifications failing do open it"
        );
    }

    #[test]
    fn a_repeated_failure_replaces_its_earlier_one_in_the_window() {
        let t0 = Instant::now();
        let mut cb = CircuitBreaker::new(settings());
        let retried = fresh();
        cb.on_failure(
            Admission::Allowed,
            cb.period(),
            retried,
            t0,
            Some(ms(30_000)),
        );
        fail(&mut cb, t0 + ms(100));
        cb.on_failure(Admission::Allowed, cb.period(), retried, t0 + ms(900), None);
        assert_eq!(cb.recent_failures(), 2);
        // The first failure of `retried` has left the window; its latest has not.
        fail(&mut cb, t0 + ms(1_050));
        assert_eq!(cb.state(), CircuitState::Open);
        assert_eq!(
            cb.cool_down_left(t0 + ms(1_050)),
            ms(5_000),
            "the wait asked by the replaced failure went with it"
        );
    }

    #[test]
    fn the_sends_of_one_connection_event_count_as_one_failure() {
        let t0 = Instant::now();
        let mut cb = CircuitBreaker::new(settings());
        let hung = FailureSource::Incident(Incident::new());
        for i in 0..64 {
            cb.on_failure(Admission::Allowed, cb.period(), hung, t0 + ms(i), None);
        }
        assert_eq!(cb.state(), CircuitState::Closed);
        assert_eq!(cb.recent_failures(), 1);
        for i in 0..2 {
            let other = FailureSource::Incident(Incident::new());
            cb.on_failure(
                Admission::Allowed,
                cb.period(),
                other,
                t0 + ms(100 + i),
                None,
            );
        }
        assert_eq!(
            cb.state(),
            CircuitState::Open,
            "three connections failing do open it"
        );
    }

    #[test]
    fn failures_open_only_as_a_large_enough_share_of_the_windows_outcomes() {
        // Mixed results: a send is answered between failures, and only the share decides.
        let t0 = Instant::now();
        let mut cb = CircuitBreaker::new(settings());
        succeed(&mut cb, t0);
        for i in 0..3 {
            succeed(&mut cb, t0 + ms(10 * i + 1));
            fail(&mut cb, t0 + ms(10 * i + 5));
        }
        assert_eq!(
            cb.state(),
            CircuitState::Closed,
            "3 failures of 7 outcomes are under half"
        );
        fail(&mut cb, t0 + ms(40));
        assert_eq!(cb.state(), CircuitState::Open, "4 of 8 are half");

        // The successes leave the window too.
        let mut cb = CircuitBreaker::new(settings());
        for i in 0..100 {
            succeed(&mut cb, t0 + ms(i));
        }
        for i in 0..3 {
            fail(&mut cb, t0 + ms(500 + 2 * i));
            succeed(&mut cb, t0 + ms(501 + 2 * i));
        }
        assert_eq!(cb.state(), CircuitState::Closed);
        fail(&mut cb, t0 + ms(1_200));
        assert_eq!(
            cb.state(),
            CircuitState::Open,
            "the successes before the failures were over a second ago: 4 failures of 7 outcomes"
        );
    }

    #[test]
    fn failures_with_no_answered_send_since_open_however_many_succeeded_before() {
        // The defaults: 50 sends a second answered for 20 s, then the provider hangs, and its
        // sends fail only after their 10 s timeout, while the earlier successes are still in the
        // window.
        let t0 = Instant::now();
        let mut cb = CircuitBreaker::new(CircuitSettings::default());
        for i in 0..1_000 {
            succeed(&mut cb, t0 + ms(i * 20));
        }
        for i in 0..4 {
            fail(&mut cb, t0 + ms(30_000 + i * 20));
        }
        assert_eq!(cb.state(), CircuitState::Closed, "4 failures of 5 needed");
        fail(&mut cb, t0 + ms(30_080));
        assert_eq!(
            cb.state(),
            CircuitState::Open,
            "5 failures with nothing answered since the first of them"
        );

        // A send answered among the failures starts the count again.
        let mut cb = CircuitBreaker::new(settings());
        for i in 0..100 {
            succeed(&mut cb, t0 + ms(i));
        }
        fail(&mut cb, t0 + ms(200));
        fail(&mut cb, t0 + ms(201));
        succeed(&mut cb, t0 + ms(202));
        fail(&mut cb, t0 + ms(203));
        fail(&mut cb, t0 + ms(204));
        assert_eq!(
            cb.state(),
            CircuitState::Closed,
            "2 failures since the last answered send, 4 of 105 outcomes"
        );
        fail(&mut cb, t0 + ms(205));
        assert_eq!(cb.state(), CircuitState::Open, "3 since the last answered");
    }

    #[test]
    fn an_incident_weighs_in_the_share_by_the_sends_it_failed() {
        // Groups of 64 messages, one connection each: the server resets two connections in three.
        let t0 = Instant::now();
        let mut cb = CircuitBreaker::new(settings());
        let mut at = 0;
        for round in 0..2 {
            for _ in 0..64 {
                succeed(&mut cb, t0 + ms(at));
                at += 1;
            }
            for _ in 0..2 {
                let reset = FailureSource::Incident(Incident::new());
                for _ in 0..64 {
                    cb.on_failure(Admission::Allowed, cb.period(), reset, t0 + ms(at), None);
                    at += 1;
                }
            }
            if round == 0 {
                assert_eq!(cb.recent_failures(), 2, "each incident once");
                assert_eq!(cb.state(), CircuitState::Closed, "2 incidents of 3 needed");
            }
        }
        assert_eq!(
            cb.state(),
            CircuitState::Open,
            "4 incidents failing 256 sends against 128 answered"
        );
    }

    #[test]
    fn a_failure_percent_of_zero_counts_the_failures_alone() {
        let t0 = Instant::now();
        let mut cb = CircuitBreaker::new(CircuitSettings {
            failure_percent: 0,
            ..settings()
        });
        for i in 0..1_000 {
            succeed(&mut cb, t0 + ms(i / 10));
        }
        for i in 0..3 {
            fail(&mut cb, t0 + ms(100 + i));
        }
        assert_eq!(cb.state(), CircuitState::Open);
    }

    #[test]
    fn failures_outside_the_window_do_not_add_up() {
        let t0 = Instant::now();
        let mut cb = CircuitBreaker::new(settings());
        fail(&mut cb, t0);
        fail(&mut cb, t0 + ms(600));
        fail(&mut cb, t0 + ms(1_500));
        assert_eq!(cb.state(), CircuitState::Closed);
        assert_eq!(cb.recent_failures(), 2);
    }

    #[test]
    fn one_probe_after_cool_down_then_closed_on_success() {
        let t0 = Instant::now();
        let mut cb = CircuitBreaker::new(settings());
        cb.open(t0, None);
        assert_eq!(cb.admit(t0 + ms(4_999)), Admission::Refused);
        assert_eq!(cb.admit(t0 + ms(5_000)), Admission::Probe);
        assert_eq!(cb.state(), CircuitState::HalfOpen);
        assert_eq!(
            cb.admit(t0 + ms(5_001)),
            Admission::Refused,
            "only one probe"
        );
        cb.on_success(Admission::Probe, cb.period(), t0);
        assert_eq!(cb.state(), CircuitState::Closed);
        assert_eq!(cb.admit(t0 + ms(5_002)), Admission::Allowed);
    }

    #[test]
    fn the_cool_down_left_counts_down_while_open_and_is_the_probes_time_left_while_half_open() {
        let t0 = Instant::now();
        let mut cb = CircuitBreaker::new(settings()).with_probe_timeout(ms(2_000));
        assert_eq!(cb.cool_down_left(t0), Duration::ZERO, "closed");
        cb.open(t0, None);
        assert_eq!(cb.cool_down_left(t0 + ms(1_000)), ms(4_000));
        assert_eq!(cb.cool_down_left(t0 + ms(6_000)), Duration::ZERO);
        assert_eq!(cb.admit(t0 + ms(6_000)), Admission::Probe);
        assert_eq!(
            cb.cool_down_left(t0 + ms(6_000)),
            ms(2_000),
            "half-open: a refused send waits for the probe's timeout, not a whole cool-down"
        );
        assert_eq!(
            cb.cool_down_left(t0 + ms(7_500)),
            ms(500),
            "the rest of the probe's timeout"
        );
        assert_eq!(
            cb.cool_down_left(t0 + ms(8_000)),
            ms(2_000),
            "a probe late (queued for a permit) may only just have gone out: not a spin"
        );
        cb.on_failure(Admission::Probe, cb.period(), fresh(), t0 + ms(8_100), None);
        assert_eq!(
            cb.cool_down_left(t0 + ms(8_100)),
            ms(5_000),
            "reopened: the whole cool-down again"
        );
    }

    #[test]
    fn a_refused_send_never_waits_longer_than_the_cool_down_while_half_open() {
        let t0 = Instant::now();
        let mut cb = CircuitBreaker::new(settings()).with_probe_timeout(ms(30_000));
        cb.open(t0, None);
        assert_eq!(cb.admit(t0 + ms(5_000)), Admission::Probe);
        assert_eq!(cb.cool_down_left(t0 + ms(5_000)), ms(5_000));
        assert_eq!(cb.cool_down_left(t0 + ms(31_000)), ms(4_000));
        let mut untold = CircuitBreaker::new(settings());
        untold.open(t0, None);
        assert_eq!(untold.admit(t0 + ms(5_000)), Admission::Probe);
        assert_eq!(
            untold.cool_down_left(t0 + ms(6_000)),
            ms(4_000),
            "a probe's timeout untold is a cool-down"
        );
    }

    #[test]
    fn the_probe_is_due_only_while_open() {
        let t0 = Instant::now();
        let mut cb = CircuitBreaker::new(settings());
        assert_eq!(cb.probe_in(t0), None, "closed");
        fail(&mut cb, t0);
        fail(&mut cb, t0 + ms(10));
        cb.on_failure(
            Admission::Allowed,
            cb.period(),
            fresh(),
            t0 + ms(20),
            Some(ms(20_000)),
        );
        assert_eq!(
            cb.probe_in(t0 + ms(1_020)),
            Some(ms(19_000)),
            "the provider's longer wait, not the cool-down"
        );
        assert_eq!(
            cb.probe_in(t0 + ms(30_000)),
            Some(Duration::ZERO),
            "due: the next send is the probe"
        );
        assert_eq!(cb.admit(t0 + ms(30_000)), Admission::Probe);
        assert_eq!(cb.probe_in(t0 + ms(30_000)), None, "half-open");
        cb.on_failure(
            Admission::Probe,
            cb.period(),
            fresh(),
            t0 + ms(30_100),
            None,
        );
        assert_eq!(cb.probe_in(t0 + ms(30_100)), Some(ms(5_000)), "reopened");
        assert_eq!(cb.admit(t0 + ms(35_100)), Admission::Probe);
        cb.on_success(Admission::Probe, cb.period(), t0);
        assert_eq!(cb.probe_in(t0 + ms(35_100)), None, "closed again");
    }

    #[test]
    fn failed_probe_reopens_for_another_cool_down() {
        let t0 = Instant::now();
        let mut cb = CircuitBreaker::new(settings());
        cb.open(t0, None);
        assert_eq!(cb.admit(t0 + ms(5_000)), Admission::Probe);
        cb.on_failure(Admission::Probe, cb.period(), fresh(), t0 + ms(5_100), None);
        assert_eq!(cb.state(), CircuitState::Open);
        assert_eq!(cb.admit(t0 + ms(9_000)), Admission::Refused);
        assert_eq!(cb.admit(t0 + ms(10_100)), Admission::Probe);
        assert_eq!(cb.times_opened(), 2);
    }

    #[test]
    fn an_abandoned_probe_lets_the_next_send_probe() {
        let t0 = Instant::now();
        let mut cb = CircuitBreaker::new(settings());
        cb.open(t0, None);
        assert_eq!(cb.admit(t0 + ms(5_000)), Admission::Probe);
        cb.on_abandoned(Admission::Allowed, cb.period());
        assert_eq!(cb.state(), CircuitState::HalfOpen, "not the probe");
        cb.on_abandoned(Admission::Probe, cb.period());
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
        let closed = cb.period();
        cb.open(t0, None);
        assert_eq!(cb.admit(t0 + ms(5_000)), Admission::Probe);
        cb.on_success(Admission::Allowed, closed, t0);
        assert_eq!(cb.state(), CircuitState::HalfOpen, "not the probe's result");
        cb.on_failure(Admission::Allowed, closed, fresh(), t0 + ms(5_001), None);
        assert_eq!(cb.state(), CircuitState::HalfOpen);
    }

    #[test]
    fn failures_of_sends_admitted_before_the_circuit_last_opened_or_closed_do_not_count() {
        let t0 = Instant::now();
        let mut cb = CircuitBreaker::new(settings());
        let first = cb.period();
        assert_eq!(cb.admit(t0), Admission::Allowed);
        cb.open(t0, None);
        let open = cb.period();
        assert_ne!(open, first, "opening starts a period");
        assert_eq!(cb.admit(t0 + ms(5_000)), Admission::Probe);
        assert_eq!(cb.period(), open, "the probe is of the period it tests");
        cb.on_success(Admission::Probe, open, t0);
        assert_eq!(cb.state(), CircuitState::Closed);
        let closed = cb.period();
        assert_ne!(closed, open, "closing starts a period");

        // Sends admitted before the circuit opened fail only now, after the good probe.
        for i in 0..3 {
            cb.on_failure(Admission::Allowed, first, fresh(), t0 + ms(5_001 + i), None);
        }
        assert_eq!(
            cb.state(),
            CircuitState::Closed,
            "stale failures reopened it"
        );
        assert_eq!(cb.recent_failures(), 0);

        // Sends admitted since do.
        for i in 0..3 {
            assert_eq!(cb.admit(t0 + ms(5_010 + i)), Admission::Allowed);
            cb.on_failure(
                Admission::Allowed,
                closed,
                fresh(),
                t0 + ms(5_010 + i),
                None,
            );
        }
        assert_eq!(cb.state(), CircuitState::Open);
        assert_eq!(cb.times_opened(), 2);
    }

    #[test]
    fn a_probe_of_an_earlier_period_neither_closes_nor_reopens() {
        let t0 = Instant::now();
        let mut cb = CircuitBreaker::new(settings());
        cb.open(t0, None);
        let open = cb.period();
        assert_eq!(cb.admit(t0 + ms(5_000)), Admission::Probe);
        cb.on_failure(Admission::Probe, open, fresh(), t0 + ms(5_001), None);
        assert_eq!(cb.admit(t0 + ms(10_001)), Admission::Probe);
        let reopened = cb.period();
        assert_ne!(reopened, open);
        cb.on_success(Admission::Probe, open, t0);
        assert_eq!(
            cb.state(),
            CircuitState::HalfOpen,
            "the first probe's result again"
        );
        cb.on_abandoned(Admission::Probe, open);
        assert_eq!(cb.state(), CircuitState::HalfOpen);
        cb.on_success(Admission::Probe, reopened, t0);
        assert_eq!(cb.state(), CircuitState::Closed);
    }

    #[test]
    fn a_longer_retry_after_keeps_the_circuit_open_until_it_passes() {
        let t0 = Instant::now();
        let mut cb = CircuitBreaker::new(settings());
        fail(&mut cb, t0);
        fail(&mut cb, t0 + ms(10));
        cb.on_failure(
            Admission::Allowed,
            cb.period(),
            fresh(),
            t0 + ms(20),
            Some(ms(20_000)),
        );
        assert_eq!(cb.state(), CircuitState::Open);
        assert_eq!(
            cb.cool_down_left(t0 + ms(1_020)),
            ms(19_000),
            "the dispatcher is told the real wait"
        );
        assert_eq!(
            cb.admit(t0 + ms(5_020)),
            Admission::Refused,
            "no probe after the cool-down: the provider asked for 20 s"
        );
        assert_eq!(cb.admit(t0 + ms(20_019)), Admission::Refused);
        assert_eq!(cb.admit(t0 + ms(20_020)), Admission::Probe);
    }

    #[test]
    fn a_shorter_retry_after_still_waits_the_cool_down() {
        let t0 = Instant::now();
        let mut cb = CircuitBreaker::new(CircuitSettings {
            failure_threshold: 1,
            ..settings()
        });
        cb.on_failure(
            Admission::Allowed,
            cb.period(),
            fresh(),
            t0,
            Some(ms(1_000)),
        );
        assert_eq!(cb.cool_down_left(t0), ms(5_000));
        assert_eq!(cb.admit(t0 + ms(4_999)), Admission::Refused);
        assert_eq!(cb.admit(t0 + ms(5_000)), Admission::Probe);
    }

    #[test]
    fn an_earlier_failures_retry_after_holds_when_a_later_one_opens() {
        let t0 = Instant::now();
        let mut cb = CircuitBreaker::new(settings());
        cb.on_failure(
            Admission::Allowed,
            cb.period(),
            fresh(),
            t0,
            Some(ms(30_000)),
        );
        fail(&mut cb, t0 + ms(100));
        fail(&mut cb, t0 + ms(200));
        assert_eq!(cb.state(), CircuitState::Open);
        assert_eq!(cb.cool_down_left(t0 + ms(200)), ms(29_800));
        assert_eq!(cb.admit(t0 + ms(29_999)), Admission::Refused);
        assert_eq!(cb.admit(t0 + ms(30_000)), Admission::Probe);
    }

    #[test]
    fn a_retry_after_beyond_the_cap_waits_only_the_cap() {
        let t0 = Instant::now();
        let mut cb = CircuitBreaker::new(CircuitSettings {
            failure_threshold: 1,
            ..settings()
        });
        cb.on_failure(
            Admission::Allowed,
            cb.period(),
            fresh(),
            t0,
            Some(Duration::from_secs(86_400)),
        );
        assert_eq!(cb.cool_down_left(t0), ms(60_000), "max_cool_down_ms");
        assert_eq!(cb.admit(t0 + ms(59_999)), Admission::Refused);
        assert_eq!(cb.admit(t0 + ms(60_000)), Admission::Probe);

        // Absurd waits do not overflow the clock either.
        cb.on_failure(
            Admission::Probe,
            cb.period(),
            fresh(),
            t0 + ms(60_000),
            Some(Duration::MAX),
        );
        assert_eq!(cb.cool_down_left(t0 + ms(60_000)), ms(60_000));
    }

    #[test]
    fn a_cap_below_the_cool_down_is_the_cool_down() {
        let settings = CircuitSettings {
            max_cool_down_ms: 1_000,
            ..settings()
        };
        assert_eq!(settings.open_for(None), ms(5_000));
        assert_eq!(settings.open_for(Some(ms(30_000))), ms(5_000));
    }

    #[test]
    fn a_failed_probe_with_retry_after_reopens_until_it_passes() {
        let t0 = Instant::now();
        let mut cb = CircuitBreaker::new(settings());
        cb.open(t0, None);
        assert_eq!(cb.admit(t0 + ms(5_000)), Admission::Probe);
        cb.on_failure(
            Admission::Probe,
            cb.period(),
            fresh(),
            t0 + ms(5_100),
            Some(ms(40_000)),
        );
        assert_eq!(cb.state(), CircuitState::Open);
        assert_eq!(cb.cool_down_left(t0 + ms(10_100)), ms(35_000));
        assert_eq!(
            cb.admit(t0 + ms(10_100)),
            Admission::Refused,
            "a cool-down after the probe is not enough"
        );
        assert_eq!(cb.admit(t0 + ms(45_099)), Admission::Refused);
        assert_eq!(cb.admit(t0 + ms(45_100)), Admission::Probe);
        assert_eq!(cb.times_opened(), 2);
    }

    #[test]
    fn a_peers_longer_open_period_is_taken_up_to_the_cap() {
        let t0 = Instant::now();
        let mut cb = CircuitBreaker::new(settings());
        cb.open(t0, Some(ms(12_000)));
        assert_eq!(cb.admit(t0 + ms(11_999)), Admission::Refused);
        assert_eq!(cb.admit(t0 + ms(12_000)), Admission::Probe);
    }

    #[test]
    fn an_account_throttle_holds_the_circuit_for_the_providers_wait_without_a_failure() {
        let t0 = Instant::now();
        let mut cb = CircuitBreaker::new(settings());
        fail(&mut cb, t0);
        cb.on_throttle(
            Admission::Allowed,
            cb.period(),
            t0 + ms(10),
            Some(ms(2_000)),
        );
        assert_eq!(cb.state(), CircuitState::Open);
        assert!(cb.throttled());
        assert_eq!(cb.times_opened(), 0, "not a failure");
        assert_eq!(
            cb.cool_down_left(t0 + ms(10)),
            ms(2_000),
            "the provider's wait, though shorter than the cool-down"
        );
        assert_eq!(cb.admit(t0 + ms(2_009)), Admission::Refused);
        assert_eq!(cb.admit(t0 + ms(2_010)), Admission::Probe);
        assert!(!cb.throttled(), "half-open");
        cb.on_success(Admission::Probe, cb.period(), t0);
        assert_eq!(cb.state(), CircuitState::Closed);
        assert_eq!(cb.recent_failures(), 0);
        for i in 0..2 {
            fail(&mut cb, t0 + ms(2_020 + i));
        }
        assert_eq!(
            cb.state(),
            CircuitState::Closed,
            "the failure before the throttle does not add to the new window"
        );
    }

    #[test]
    fn an_account_throttle_without_a_wait_holds_for_the_cool_down_and_at_most_the_cap() {
        let t0 = Instant::now();
        let mut cb = CircuitBreaker::new(settings());
        cb.on_throttle(Admission::Allowed, cb.period(), t0, None);
        assert_eq!(cb.cool_down_left(t0), ms(5_000));
        assert_eq!(cb.admit(t0 + ms(5_000)), Admission::Probe);
        cb.on_throttle(
            Admission::Probe,
            cb.period(),
            t0 + ms(5_000),
            Some(Duration::MAX),
        );
        assert!(cb.throttled(), "a throttled probe holds it again");
        assert_eq!(cb.cool_down_left(t0 + ms(5_000)), ms(60_000), "the cap");
        assert_eq!(cb.times_opened(), 0);

        // A failed probe after the hold opens the circuit as a failure does.
        assert_eq!(cb.admit(t0 + ms(65_000)), Admission::Probe);
        cb.on_failure(
            Admission::Probe,
            cb.period(),
            fresh(),
            t0 + ms(65_000),
            None,
        );
        assert_eq!(cb.state(), CircuitState::Open);
        assert!(!cb.throttled());
        assert_eq!(cb.times_opened(), 1);
    }

    #[test]
    fn a_throttle_of_an_earlier_period_or_while_open_changes_nothing() {
        let t0 = Instant::now();
        let mut cb = CircuitBreaker::new(settings());
        let closed = cb.period();
        cb.open(t0, None);
        cb.on_throttle(Admission::Allowed, closed, t0 + ms(1), Some(ms(60_000)));
        cb.on_throttle(
            Admission::Allowed,
            cb.period(),
            t0 + ms(1),
            Some(ms(60_000)),
        );
        assert!(!cb.throttled());
        assert_eq!(cb.cool_down_left(t0), ms(5_000));
        assert_eq!(cb.admit(t0 + ms(5_000)), Admission::Probe);
        cb.on_throttle(Admission::Allowed, cb.period(), t0 + ms(5_001), None);
        assert_eq!(cb.state(), CircuitState::HalfOpen, "not the probe");
    }

    #[test]
    fn a_retry_after_of_a_failure_out_of_the_window_does_not_count() {
        let t0 = Instant::now();
        let mut cb = CircuitBreaker::new(settings());
        cb.on_failure(
            Admission::Allowed,
            cb.period(),
            fresh(),
            t0,
            Some(ms(30_000)),
        );
        for i in 0..3 {
            fail(&mut cb, t0 + ms(2_000 + i));
        }
        assert_eq!(cb.state(), CircuitState::Open);
        assert_eq!(
            cb.cool_down_left(t0 + ms(2_002)),
            ms(5_000),
            "the failure that asked for 30 s left the window before the circuit opened"
        );
    }
}
