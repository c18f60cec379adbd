//! Counters and histograms, without a lock or an allocation per connection.
//!
//! Everything is counted where it happens, in plain atomics: process-wide
//! statics here, per-listener [`ListenerStats`], and per-backend counters on
//! the backend itself. The metrics scrape reads them all; nothing here knows
//! how they are published.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Accept errors of every listener since start.
pub static ACCEPT_ERRORS: AtomicU64 = AtomicU64::new(0);
/// Connection tasks that panicked (a bug), caught and counted.
pub static CONNECTION_PANICS: AtomicU64 = AtomicU64::new(0);
/// Bytes forwarded with splice(2), both directions, every listener.
pub static SPLICED_BYTES: AtomicU64 = AtomicU64::new(0);
/// Connections handed by the worker that accepted them to a less busy one.
pub static WORKER_HANDOFFS: AtomicU64 = AtomicU64::new(0);
/// Splice pipes open now: carrying bytes or pooled.
pub static SPLICE_PIPES: AtomicU64 = AtomicU64::new(0);
/// Accepted connections that had to wait for a slot under `max_connections`.
pub static CONNECTIONS_LIMITED: AtomicU64 = AtomicU64::new(0);
/// Reloads applied since start.
pub static RELOADS_APPLIED: AtomicU64 = AtomicU64::new(0);
/// Reloads rejected since start (an invalid file, a failed resolve or bind).
pub static RELOADS_FAILED: AtomicU64 = AtomicU64::new(0);
/// When the configuration was last applied, start included (Unix seconds).
pub static LAST_RELOAD_SUCCESS: AtomicU64 = AtomicU64::new(0);

/// Records that a configuration was applied now (the first one at start).
pub fn record_reload_success() {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    LAST_RELOAD_SUCCESS.store(now.map_or(0, |d| d.as_secs()), Ordering::Relaxed);
}

/// Log lines dropped because the log writer's buffer was full (its reader
/// stalled); copied from the writer's own counter about once a second.
pub static LOG_LINES_DROPPED: AtomicU64 = AtomicU64::new(0);

/// Lets a warning that a flood could repeat per connection through at most
/// once a second, and counts the ones it holds back, so the next line can
/// say how many there were.
#[derive(Debug, Default)]
pub struct Throttle {
    /// The second (since the process's first throttled warning, plus one)
    /// of the last warning let through; 0 before any.
    last: AtomicU64,
    /// Warnings held back since the last one let through.
    suppressed: AtomicU64,
}

impl Throttle {
    /// A throttle that lets the first warning through.
    pub const fn new() -> Self {
        Throttle { last: AtomicU64::new(0), suppressed: AtomicU64::new(0) }
    }

    /// `Some(n)` when a warning may be logged now, `n` being how many were
    /// held back since the last one; `None` to stay quiet (it is counted).
    pub fn allow(&self) -> Option<u64> {
        static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        let second = EPOCH.get_or_init(std::time::Instant::now).elapsed().as_secs() + 1;
        self.allow_at(second)
    }

    fn allow_at(&self, second: u64) -> Option<u64> {
        let prev = self.last.load(Ordering::Relaxed);
        if second > prev
            && self
                .last
                .compare_exchange(prev, second, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Upper bounds (seconds) of the duration buckets: 100µs to 1h.
const BUCKETS: [f64; 16] = [
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 300.0,
    3600.0,
];

/// A histogram of durations: one atomic per bucket, no lock.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative), plus one for +Inf.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    /// Sum of observations in microseconds.
    sum_us: AtomicU64,
    /// Number of observations.
    count: AtomicU64,
}

impl Histogram {
    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS.iter().position(|&b| secs <= b).unwrap_or(BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(d.as_micros().min(u64::MAX as u128) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// (sum in seconds, count, observations per bucket, not cumulative:
    /// the encoder adds them up). The count is the buckets' total, so that
    /// `+Inf` equals `_count` even while observations land mid-read.
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut count = 0;
        let mut out = Vec::with_capacity(BUCKETS.len() + 1);
        for (i, b) in self.buckets.iter().enumerate() {
            let n = b.load(Ordering::Relaxed);
            count += n;
            out.push((BUCKETS.get(i).copied().unwrap_or(f64::INFINITY), n));
        }
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        (sum, count, out)
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// The HTTP statuses tcplb writes itself when no backend can be reached.
pub const SYNTHESIZED: [u16; 4] = [408, 502, 503, 504];

/// Per-listener counters that are not per backend.
#[derive(Debug, Default)]
pub struct ListenerStats {
    /// Time from accept to an established backend connection.
    pub connect_duration: Histogram,
    /// Time from accept to the end of the connection.
    pub connection_duration: Histogram,
    /// Synthesized HTTP responses, by [`SYNTHESIZED`] status.
    synthesized: [AtomicU64; SYNTHESIZED.len()],
    /// Clients closed by an allow/deny rule.
    pub denied: AtomicU64,
    /// Clients a listener with routes sent here: to this route, or (on
    /// the listener itself) to its default pool.
    pub routed: AtomicU64,
    /// Clients of a listener with routes that matched none, with no
    /// default pool to go to: closed.
    pub unrouted: AtomicU64,
}

impl ListenerStats {
    /// Counts a synthesized response with status `code` (one of [`SYNTHESIZED`]).
    pub fn record_synthesized(&self, code: u16) {
        if let Some(i) = SYNTHESIZED.iter().position(|&c| c == code) {
            self.synthesized[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Synthesized responses with status `code` so far.
    pub fn synthesized(&self, code: u16) -> u64 {
        SYNTHESIZED
            .iter()
            .position(|&c| c == code)
            .map_or(0, |i| self.synthesized[i].load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_lets_one_warning_a_second_through_and_counts_the_rest() {
        let t = Throttle::new();
        assert_eq!(t.allow_at(1), Some(0));
        assert_eq!(t.allow_at(1), None);
        assert_eq!(t.allow_at(1), None);
        assert_eq!(t.allow_at(2), Some(2), "the next line says two were held back");
        assert_eq!(t.allow_at(2), None);
        assert_eq!(t.allow_at(5), Some(1));
        assert_eq!(t.allow_at(9), Some(0));
    }

    #[test]
    fn histogram_buckets_count_each_observation_once() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(7200));
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 3);
        assert!((sum - 7200.00305).abs() < 1e-6, "{sum}");
        assert_eq!(buckets[0], (0.0001, 1));
        assert_eq!(buckets.iter().find(|(b, _)| *b == 0.005).unwrap().1, 1);
        assert_eq!(buckets.last().unwrap(), &(f64::INFINITY, 1));
        assert_eq!(buckets.iter().map(|(_, n)| n).sum::<u64>(), 3);
    }
}
