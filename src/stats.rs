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

    /// (sum in seconds, count, cumulative buckets) as Prometheus wants them.
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut cumulative = 0;
        let mut out = Vec::with_capacity(BUCKETS.len() + 1);
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Ordering::Relaxed);
            out.push((BUCKETS.get(i).copied().unwrap_or(f64::INFINITY), cumulative));
        }
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        (sum, cumulative.max(self.count.load(Ordering::Relaxed)), out)
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// The HTTP statuses tcplb writes itself when no backend can be reached.
pub const SYNTHESIZED: [u16; 3] = [502, 503, 504];

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
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(7200));
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 3);
        assert!((sum - 7200.00305).abs() < 1e-6, "{sum}");
        assert_eq!(buckets[0], (0.0001, 1));
        assert_eq!(buckets.iter().find(|(b, _)| *b == 0.005).unwrap().1, 2);
        assert_eq!(buckets.last().unwrap(), &(f64::INFINITY, 3));
    }
}
