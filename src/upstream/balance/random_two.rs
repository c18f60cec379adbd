//! Power of two random choices on active connections (as Envoy and Finagle
//! use at scale): two distinct random backends, the lighter one wins.

use std::net::SocketAddr;
use std::sync::Arc;

use super::{fast_random, lighter, scan_from, Strategy};
use crate::upstream::backend::Backend;

/// Picks the less loaded (per weight) of two random available backends.
#[derive(Debug, Default)]
pub struct RandomTwo;

impl RandomTwo {
    /// The strategy; it keeps no state.
    pub fn new() -> Self {
        RandomTwo
    }
}

impl Strategy for RandomTwo {
    fn pick(&self, backends: &[Arc<Backend>], _client: SocketAddr) -> Option<usize> {
        let n = backends.len();
        if n == 0 {
            return None;
        }
        let r = fast_random();
        let a = (r % n as u64) as usize;
        let b = if n > 1 { (a + 1 + ((r >> 32) % (n as u64 - 1)) as usize) % n } else { a };
        match (backends[a].is_available(), backends[b].is_available()) {
            (true, true) => Some(if lighter(&backends[b], &backends[a]) { b } else { a }),
            (true, false) => Some(a),
            (false, true) => Some(b),
            (false, false) => scan_from(backends, a),
        }
    }

    fn pick_any(&self, n: usize, _client: SocketAddr) -> usize {
        if n == 0 {
            return 0;
        }
        (fast_random() % n as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;

    #[test]
    fn avoids_the_loaded_backend() {
        let b = weighted(&[1, 1]);
        let _held: Vec<_> = (0..5).map(|_| b[0].try_claim()).collect();
        let s = RandomTwo::new();
        for _ in 0..50 {
            assert_eq!(s.pick(&b, client(0)), Some(1));
        }
    }

    #[test]
    fn spreads_equal_load() {
        let b = weighted(&[1, 1, 1, 1]);
        let s = RandomTwo::new();
        let mut counts = [0usize; 4];
        for _ in 0..4000 {
            counts[s.pick(&b, client(0)).unwrap()] += 1;
        }
        assert!(counts.iter().all(|&c| c > 700), "{counts:?}");
    }

    #[test]
    fn finds_the_only_available_backend() {
        let b = weighted(&[1, 1, 1, 1, 1]);
        for x in &b[..4] {
            x.health.set_up(false);
        }
        let s = RandomTwo::new();
        for _ in 0..50 {
            assert_eq!(s.pick(&b, client(0)), Some(4));
        }
    }
}
