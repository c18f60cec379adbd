//! Round-robin with one lock-free atomic cursor.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::Strategy;
use crate::backend::Backend;

/// Hands out backends in turn. Unavailable backends are skipped by advancing
/// the shared cursor again, so the available ones share the load evenly (the
/// backend after a down one does not get twice its share).
#[derive(Debug, Default)]
pub struct RoundRobin {
    /// Next position in the ring; wraps naturally.
    cursor: AtomicUsize,
}

impl RoundRobin {
    /// A cursor starting at the first backend.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Strategy for RoundRobin {
    fn pick(&self, backends: &[Arc<Backend>], _client: SocketAddr) -> Option<usize> {
        let n = backends.len();
        for _ in 0..n {
            let i = self.cursor.fetch_add(1, Ordering::Relaxed) % n;
            if backends[i].is_available() {
                return Some(i);
            }
        }
        None
    }

    fn pick_any(&self, n: usize, _client: SocketAddr) -> usize {
        if n == 0 {
            return 0;
        }
        self.cursor.fetch_add(1, Ordering::Relaxed) % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Pool;

    fn pool(n: usize) -> Pool {
        let backends = (0..n)
            .map(|i| {
                let addr: SocketAddr = format!("127.0.0.1:{}", 1000 + i).parse().unwrap();
                Arc::new(Backend::new(addr, format!("b{i}").into(), 1, 1))
            })
            .collect();
        Pool::new(backends, Box::new(RoundRobin::new()))
    }

    fn client() -> SocketAddr {
        "127.0.0.1:5000".parse().unwrap()
    }

    fn firsts(p: &Pool, k: usize) -> Vec<u16> {
        (0..k).map(|_| p.candidates(client(), 3).next().unwrap().addr.port() - 1000).collect()
    }

    #[test]
    fn plain_order() {
        assert_eq!(firsts(&pool(3), 7), vec![0, 1, 2, 0, 1, 2, 0]);
    }

    #[test]
    fn down_backend_skipped_evenly() {
        let p = pool(3);
        p.backends()[1].health.set_up(false);
        let picks = firsts(&p, 8);
        assert_eq!(picks.iter().filter(|&&i| i == 0).count(), 4);
        assert_eq!(picks.iter().filter(|&&i| i == 2).count(), 4);
    }

    #[test]
    fn retries_are_distinct_and_bounded() {
        let p = pool(4);
        let c: Vec<u16> = p.candidates(client(), 3).map(|b| b.addr.port() - 1000).collect();
        assert_eq!(c, vec![0, 1, 2]);
        let c: Vec<_> = p.candidates(client(), 10).collect();
        assert_eq!(c.len(), 4);
    }

    #[test]
    fn panic_mode_when_all_down() {
        let p = pool(2);
        for b in p.backends() {
            b.health.set_up(false);
        }
        let c = p.candidates(client(), 3);
        assert!(c.is_panic());
        assert_eq!(c.count(), 2);
    }
}
