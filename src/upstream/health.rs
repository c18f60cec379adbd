//! Health state: rise/fall tracking of one backend.
//!
//! A backend's state changes only after `fall` consecutive failures (probes or
//! real connects) or `rise` consecutive successful probes, as in HAProxy. The
//! hot path reads one atomic ([`Health::is_up`]); the counters behind it sit in
//! a mutex that only probes and failed connects take. The probes themselves
//! are a control task (`control::probe`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use crate::upstream::backend::Backend;

/// The up/down state of one backend.
#[derive(Debug)]
pub struct Health {
    /// What selection reads: may new clients go here.
    up: AtomicBool,
    /// Set while a failure streak is being counted, so that the success path
    /// of every connection only takes the lock when there is a streak to reset.
    failing: AtomicBool,
    /// Rise/fall counters; taken by probes and failed connects only.
    counter: Mutex<Counter>,
}

/// A change of state, with how long the backend was in the old one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Down → up.
    Up {
        /// Time spent down.
        after: Duration,
    },
    /// Up → down.
    Down {
        /// Time spent up.
        after: Duration,
    },
}

impl Health {
    /// Starts up, with the given thresholds.
    pub fn new(rise: u32, fall: u32) -> Self {
        Health {
            up: AtomicBool::new(true),
            failing: AtomicBool::new(false),
            counter: Mutex::new(Counter::new(rise, fall, Instant::now())),
        }
    }

    /// Whether the backend is up.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Forces the state (tests, admin).
    pub fn set_up(&self, up: bool) {
        let mut c = self.lock();
        c.up = up;
        c.ok = 0;
        c.fail = 0;
        c.since = Instant::now();
        self.up.store(up, Ordering::Relaxed);
    }

    /// Changes the rise/fall thresholds (reload), keeping the state.
    pub fn set_thresholds(&self, rise: u32, fall: u32) {
        let mut c = self.lock();
        c.rise = rise.max(1);
        c.fall = fall.max(1);
    }

    /// A real connection succeeded: ends a failure streak. Unlike a probe
    /// success it never counts toward rise (only probes bring a backend up).
    pub fn observe_success_streak_reset(&self) {
        if self.failing.load(Ordering::Relaxed) {
            let mut c = self.lock();
            c.fail = 0;
            self.failing.store(false, Ordering::Relaxed);
        }
    }

    /// A real connection failed, under outlier ejection: the fall-th
    /// failure in a row ejects the backend for `ejection`'s time (doubled
    /// for each ejection in a row, capped), during which probes cannot bring
    /// it back; with `may_eject` false (the pool has ejected enough) the
    /// failure is counted but the backend stays up. Returns the transition
    /// and how long the ejection lasts.
    pub fn observe_passive_failure(
        &self,
        ejection: Ejection,
        may_eject: bool,
    ) -> Option<(Transition, Duration)> {
        let mut c = self.lock();
        let t = c.eject_on_failure(ejection, may_eject, Instant::now());
        self.up.store(c.up, Ordering::Relaxed);
        self.failing.store(c.fail > 0, Ordering::Relaxed);
        t
    }

    /// Whether the backend is down and its ejection has not run out.
    pub fn is_ejected(&self) -> bool {
        let c = self.lock();
        !c.up && c.ejected_until.is_some_and(|until| Instant::now() < until)
    }

    /// Records one result (probe or real connect) and returns the transition it caused.
    pub fn observe(&self, ok: bool) -> Option<Transition> {
        if ok && !self.failing.load(Ordering::Relaxed) && self.is_up() {
            return None;
        }
        let mut c = self.lock();
        let t = c.observe(ok, Instant::now());
        self.up.store(c.up, Ordering::Relaxed);
        self.failing.store(c.fail > 0, Ordering::Relaxed);
        t
    }

    fn lock(&self) -> MutexGuard<'_, Counter> {
        // The counter holds plain integers: a panic elsewhere cannot leave it torn.
        self.counter.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Pure rise/fall logic, kept apart so it is unit-testable with any clock.
#[derive(Debug, Clone)]
struct Counter {
    /// Successes needed to go up.
    rise: u32,
    /// Failures needed to go down.
    fall: u32,
    /// Current state.
    up: bool,
    /// Consecutive successes while down.
    ok: u32,
    /// Consecutive failures while up.
    fail: u32,
    /// When the current state began.
    since: Instant,
    /// Until when probes may not bring it back (outlier ejection).
    ejected_until: Option<Instant>,
    /// Ejections in a row: each doubles the next one's time.
    ejections: u32,
}

/// Outlier ejection's times (`ejection_time`, `max_ejection_time`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ejection {
    /// The first ejection's time.
    pub base: Duration,
    /// The longest an ejection lasts.
    pub max: Duration,
}

impl Counter {
    fn new(rise: u32, fall: u32, now: Instant) -> Self {
        Counter {
            rise: rise.max(1),
            fall: fall.max(1),
            up: true,
            ok: 0,
            fail: 0,
            since: now,
            ejected_until: None,
            ejections: 0,
        }
    }

    fn eject_on_failure(
        &mut self,
        ejection: Ejection,
        may_eject: bool,
        now: Instant,
    ) -> Option<(Transition, Duration)> {
        if self.up && !may_eject && self.fail + 1 >= self.fall {
            // Enough of the pool is out already: count, but keep it in.
            self.fail = self.fall - 1;
            self.ok = 0;
            return None;
        }
        let t = self.observe(false, now)?;
        // A backend that stayed up for longer than the longest ejection
        // since it came back starts again from the first ejection's time.
        if matches!(t, Transition::Down { after } if after > ejection.max) {
            self.ejections = 0;
        }
        let factor = 1u32 << self.ejections.min(16);
        let time = ejection.base.saturating_mul(factor).min(ejection.max);
        self.ejections += 1;
        self.ejected_until = Some(now + time);
        Some((t, time))
    }

    fn observe(&mut self, ok: bool, now: Instant) -> Option<Transition> {
        let after = now.saturating_duration_since(self.since);
        if ok {
            self.fail = 0;
            if self.up {
                return None;
            }
            if self.ejected_until.is_some_and(|until| now < until) {
                return None; // still ejected: probes wait it out
            }
            self.ok += 1;
            if self.ok >= self.rise {
                self.up = true;
                self.ok = 0;
                self.since = now;
                return Some(Transition::Up { after });
            }
        } else {
            self.ok = 0;
            if !self.up {
                return None;
            }
            self.fail += 1;
            if self.fail >= self.fall {
                self.up = false;
                self.fail = 0;
                self.since = now;
                return Some(Transition::Down { after });
            }
        }
        None
    }
}

/// Logs a transition once, at warn for down and info for up, and keeps it
/// in the backend's recent history for the status page.
pub fn log_transition(listener: &str, backend: &Backend, t: Transition, reason: &str) {
    backend.record_transition(matches!(t, Transition::Up { .. }), reason);
    if matches!(t, Transition::Up { .. }) {
        backend.start_ramp();
    }
    match t {
        Transition::Down { after } => warn!(
            listener,
            backend = %backend.addr,
            upstream = %backend.upstream,
            reason,
            was_up_for = %humantime::format_duration(round(after)),
            "backend is DOWN"
        ),
        Transition::Up { after } => info!(
            listener,
            backend = %backend.addr,
            upstream = %backend.upstream,
            reason,
            was_down_for = %humantime::format_duration(round(after)),
            "backend is UP"
        ),
    }
}

fn round(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn falls_after_n_failures_and_rises_after_m_successes() {
        let t0 = Instant::now();
        let mut c = Counter::new(2, 3, t0);
        assert_eq!(c.observe(false, t0), None);
        assert_eq!(c.observe(false, t0), None);
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(c.observe(false, t1), Some(Transition::Down { after: Duration::from_secs(5) }));
        assert!(!c.up);
        assert_eq!(c.observe(false, t1), None);
        assert_eq!(c.observe(true, t1), None);
        let t2 = t1 + Duration::from_secs(2);
        assert_eq!(c.observe(true, t2), Some(Transition::Up { after: Duration::from_secs(2) }));
        assert!(c.up);
    }

    #[test]
    fn a_success_resets_the_failure_streak() {
        let t0 = Instant::now();
        let mut c = Counter::new(2, 3, t0);
        c.observe(false, t0);
        c.observe(false, t0);
        c.observe(true, t0);
        c.observe(false, t0);
        c.observe(false, t0);
        assert!(c.up, "two failures after a success must not reach fall=3");
        assert!(c.observe(false, t0).is_some());
    }

    #[test]
    fn a_failure_resets_the_rise_streak() {
        let t0 = Instant::now();
        let mut c = Counter::new(2, 1, t0);
        c.observe(false, t0);
        c.observe(true, t0);
        c.observe(false, t0);
        assert_eq!(c.observe(true, t0), None);
        assert!(c.observe(true, t0).is_some());
    }

    #[test]
    fn ejections_double_up_to_the_cap_and_hold_off_probes() {
        let e = Ejection { base: Duration::from_secs(10), max: Duration::from_secs(35) };
        let t0 = Instant::now();
        let mut c = Counter::new(1, 2, t0);
        assert_eq!(c.eject_on_failure(e, true, t0), None);
        let (t, time) = c.eject_on_failure(e, true, t0).unwrap();
        assert!(matches!(t, Transition::Down { .. }));
        assert_eq!(time, Duration::from_secs(10));
        // Probes within the ejection do not count; after it, rise applies.
        assert_eq!(c.observe(true, t0 + Duration::from_secs(9)), None);
        assert!(c.observe(true, t0 + Duration::from_secs(10)).is_some());
        // Ejected again soon after: twice as long, then capped.
        let t1 = t0 + Duration::from_secs(11);
        c.eject_on_failure(e, true, t1);
        assert_eq!(c.eject_on_failure(e, true, t1).unwrap().1, Duration::from_secs(20));
        assert!(c.observe(true, t1 + Duration::from_secs(20)).is_some());
        let t2 = t1 + Duration::from_secs(21);
        c.eject_on_failure(e, true, t2);
        assert_eq!(c.eject_on_failure(e, true, t2).unwrap().1, Duration::from_secs(35));
        // Up for longer than the cap: back to the first time.
        assert!(c.observe(true, t2 + Duration::from_secs(35)).is_some());
        let t3 = t2 + Duration::from_secs(100);
        c.eject_on_failure(e, true, t3);
        assert_eq!(c.eject_on_failure(e, true, t3).unwrap().1, Duration::from_secs(10));
    }

    #[test]
    fn a_pool_at_its_ejection_limit_keeps_the_backend_in() {
        let e = Ejection { base: Duration::from_secs(10), max: Duration::from_secs(60) };
        let t0 = Instant::now();
        let mut c = Counter::new(1, 2, t0);
        for _ in 0..5 {
            assert_eq!(c.eject_on_failure(e, false, t0), None);
        }
        assert!(c.up);
        assert!(c.eject_on_failure(e, true, t0).is_some(), "once allowed, the next failure ejects");
    }

    #[test]
    fn health_fast_path_and_flag() {
        let h = Health::new(1, 2);
        assert!(h.is_up());
        assert_eq!(h.observe(true), None);
        assert_eq!(h.observe(false), None);
        assert!(h.failing.load(Ordering::Relaxed));
        h.observe(true);
        assert!(!h.failing.load(Ordering::Relaxed));
        h.observe(false);
        assert!(matches!(h.observe(false), Some(Transition::Down { .. })));
        assert!(!h.is_up());
        assert!(matches!(h.observe(true), Some(Transition::Up { .. })));
    }
}
