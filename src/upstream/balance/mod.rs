//! Selection strategies. A strategy only picks the first backend to try among
//! the available ones (up, not draining, not full); [`crate::upstream::Candidates`]
//! turns that into an ordered list of retries, so strategies never deal with
//! retries or backup tiers. A strategy is built for one fixed backend list and
//! rebuilt when the list changes; picking never takes a lock.

use std::fmt::Debug;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::StrategyKind;
use crate::upstream::backend::Backend;

mod least_connections;
mod maglev;
mod random_two;
mod round_robin;

pub use least_connections::LeastConnections;
pub use maglev::Maglev;
pub use random_two::RandomTwo;
pub use round_robin::RoundRobin;

/// Chooses which backend a new client goes to first.
pub trait Strategy: Send + Sync + Debug {
    /// Index of the first available backend for `client`, or None when no
    /// backend is available. `backends` is the list the strategy was built for.
    fn pick(&self, backends: &[Arc<Backend>], client: SocketAddr) -> Option<usize>;

    /// Index to start from when none is available (panic mode).
    fn pick_any(&self, n: usize, client: SocketAddr) -> usize;
}

/// Builds the strategy `kind` for `backends`.
pub fn build(kind: StrategyKind, backends: &[Arc<Backend>]) -> Box<dyn Strategy> {
    match kind {
        StrategyKind::RoundRobin => Box::new(RoundRobin::new(backends)),
        StrategyKind::LeastConnections => Box::new(LeastConnections::new()),
        StrategyKind::RandomTwo => Box::new(RandomTwo::new()),
        StrategyKind::Maglev => Box::new(Maglev::new(backends)),
    }
}

/// The next position of a rotating `cursor` over `n` backends (0 when empty).
fn rotate(cursor: &std::sync::atomic::AtomicUsize, n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    cursor.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % n
}

/// The first available backend scanning from `start`, wrapping around.
fn scan_from(backends: &[Arc<Backend>], start: usize) -> Option<usize> {
    let n = backends.len();
    (0..n).map(|k| (start + k) % n).find(|&i| backends[i].is_available())
}

/// True when `a` carries less load than `b` relative to their weights (as
/// far as a slow start has brought them).
fn lighter(a: &Backend, b: &Backend) -> bool {
    let (ra, rb) = (a.ramp(), b.ramp());
    if ra < 1.0 || rb < 1.0 {
        // Plus one: a ramping backend with no connection is still lighter
        // than an idle one only in proportion to its share.
        let load = |x: &Backend, r: f64| (x.active() as f64 + 1.0) / (x.weight() as f64 * r);
        return load(a, ra) < load(b, rb);
    }
    (a.active() as u128) * (b.weight() as u128) < (b.active() as u128) * (a.weight() as u128)
}

/// Whether a pick of `b` stands: always outside a slow start, and with the
/// probability of its ramp during one (the rest go to the next in order).
fn takes_pick(b: &Backend) -> bool {
    let r = b.ramp();
    let unit = (fast_random() >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
    r >= 1.0 || unit < r
}

/// A fast per-thread pseudo-random number (xorshift64*), seeded randomly.
fn fast_random() -> u64 {
    use std::cell::Cell;
    use std::hash::{BuildHasher, Hasher};
    thread_local! {
        static STATE: Cell<u64> = Cell::new(
            std::collections::hash_map::RandomState::new().build_hasher().finish() | 1,
        );
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    })
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::*;
    use crate::upstream::backend::Settings;

    /// Backends on 127.0.0.1:1000+i with the given weights.
    pub fn weighted(weights: &[u32]) -> Vec<Arc<Backend>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let addr = SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16));
                let s = Settings { weight: w, ..Settings::default() };
                Arc::new(Backend::with_settings(addr, format!("b{i}").into(), 1, 1, s))
            })
            .collect()
    }

    /// A client address.
    pub fn client(i: u32) -> SocketAddr {
        SocketAddr::from((std::net::Ipv4Addr::from(0x0a00_0000 + i), 40000))
    }
}
