//! Least connections, relative to weight; ties broken round-robin.

use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use super::{lighter, rotate, Strategy};
use crate::upstream::backend::Backend;

/// Picks the available backend with the fewest active connections per unit
/// of weight. The scan starts at a rotating offset, so equal loads share new
/// connections in turn instead of all going to the first backend.
#[derive(Debug, Default)]
pub struct LeastConnections {
    /// Where the next scan starts.
    cursor: AtomicUsize,
}

impl LeastConnections {
    /// A strategy with its scan starting at the first backend.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Strategy for LeastConnections {
    fn pick(&self, backends: &[Arc<Backend>], _client: SocketAddr) -> Option<usize> {
        let n = backends.len();
        if n == 0 {
            return None;
        }
        let start = rotate(&self.cursor, n);
        let mut best: Option<usize> = None;
        for k in 0..n {
            let i = (start + k) % n;
            let b = &backends[i];
            if !b.is_available() {
                continue;
            }
            if best.is_none_or(|j| lighter(b, &backends[j])) {
                best = Some(i);
            }
        }
        best
    }

    fn pick_any(&self, n: usize, _client: SocketAddr) -> usize {
        rotate(&self.cursor, n)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;

    #[test]
    fn a_backend_in_slow_start_gets_load_in_proportion_to_its_ramp() {
        let b = weighted(&[1, 1]);
        b[1].apply(crate::upstream::Settings {
            slow_start: std::time::Duration::from_secs(3600),
            ..Default::default()
        });
        b[1].start_ramp();
        let strategy = LeastConnections::new();
        // Hold every connection: a ramping backend at a tenth of its share
        // takes about one for every ten the other holds.
        let mut held = Vec::new();
        for _ in 0..110 {
            let i = strategy.pick(&b, client(0)).unwrap();
            held.push(b[i].try_claim().unwrap());
        }
        assert!((5..=15).contains(&b[1].active()), "{} of 110", b[1].active());
    }

    #[test]
    fn follows_held_connections() {
        let b = weighted(&[1, 1, 1]);
        let strategy = LeastConnections::new();
        let _g0 = b[0].try_claim();
        let _g1 = b[0].try_claim();
        let _g2 = b[1].try_claim();
        assert_eq!(strategy.pick(&b, client(0)), Some(2));
        let _g3 = b[2].try_claim();
        // b0 holds two, b1 and b2 one each: never b0.
        for _ in 0..6 {
            assert_ne!(strategy.pick(&b, client(0)), Some(0));
        }
        drop(_g0);
        drop(_g1);
        // Now b0 holds none.
        assert_eq!(strategy.pick(&b, client(0)), Some(0));
    }

    #[test]
    fn ties_rotate() {
        let b = weighted(&[1, 1, 1]);
        let strategy = LeastConnections::new();
        let picks: Vec<usize> = (0..6).map(|_| strategy.pick(&b, client(0)).unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn weight_scales_the_load() {
        let b = weighted(&[3, 1]);
        let strategy = LeastConnections::new();
        // b0 holds 2 with weight 3 (0.67/unit), b1 holds 1 with weight 1 (1/unit).
        let _a = (b[0].try_claim(), b[0].try_claim(), b[1].try_claim());
        assert_eq!(strategy.pick(&b, client(0)), Some(0));
    }
}
