//! The pool a listener selects from: an immutable snapshot of its backends
//! with the strategies that order them, rebuilt and swapped whole when the
//! set changes, and the [`Candidates`] a connection tries in turn.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::StrategyKind;
use crate::upstream::backend::Backend;
use crate::upstream::balance::{self, Strategy};

/// Backends of one kind (primary or backup) and the strategy over them.
#[derive(Debug)]
struct Tier {
    /// The backends, in configuration order.
    backends: Vec<Arc<Backend>>,
    /// Picks the first backend to try.
    strategy: Box<dyn Strategy>,
}

impl Tier {
    fn new(backends: Vec<Arc<Backend>>, kind: StrategyKind) -> Self {
        let strategy = balance::build(kind, &backends);
        Tier { backends, strategy }
    }
}

/// One listener's backends and the strategies that order them.
#[derive(Debug)]
pub struct Pool {
    /// Every backend, primaries and backups, in configuration order.
    all: Vec<Arc<Backend>>,
    /// Backends that take traffic normally.
    primaries: Tier,
    /// Backends that take traffic only when no primary is available.
    backups: Tier,
    /// The strategy kind, for status and rebuilds.
    kind: StrategyKind,
}

impl Pool {
    /// A pool over `backends` using the strategy `kind`.
    pub fn new(backends: Vec<Arc<Backend>>, kind: StrategyKind) -> Self {
        let (backups, primaries): (Vec<_>, Vec<_>) =
            backends.iter().cloned().partition(|b| b.is_backup());
        Pool {
            all: backends,
            primaries: Tier::new(primaries, kind),
            backups: Tier::new(backups, kind),
            kind,
        }
    }

    /// Every backend, up or down.
    pub fn backends(&self) -> &[Arc<Backend>] {
        &self.all
    }

    /// The strategy kind.
    pub fn strategy(&self) -> StrategyKind {
        self.kind
    }

    /// The backends to try for `client`, best first, at most `attempts` of them.
    ///
    /// The strategy picks the first among available primaries; the other
    /// available primaries follow in ring order, then available backups.
    /// Backups lead only when no primary is available. When nothing is
    /// available the pool is in panic mode: every backend is a candidate, so a
    /// wrong health check cannot turn into a full outage.
    pub fn candidates(&self, client: SocketAddr, attempts: usize) -> Candidates<'_> {
        let mut c =
            Candidates { segments: [None, None], seg: 0, step: 0, left: attempts, panic: false };
        let p = &self.primaries;
        let b = &self.backups;
        if let Some(first) = p.strategy.pick(&p.backends, client) {
            c.segments[0] = Some(Segment { tier: p, first, all: false });
            let first = b.strategy.pick(&b.backends, client).unwrap_or(0);
            c.segments[1] =
                (!b.backends.is_empty()).then_some(Segment { tier: b, first, all: false });
        } else if let Some(first) = b.strategy.pick(&b.backends, client) {
            c.segments[0] = Some(Segment { tier: b, first, all: false });
        } else {
            let tier = if p.backends.is_empty() { b } else { p };
            let first = tier.strategy.pick_any(tier.backends.len(), client);
            c.segments[0] =
                (!tier.backends.is_empty()).then_some(Segment { tier, first, all: true });
            c.panic = !tier.backends.is_empty();
        }
        c
    }
}

/// A walk over one tier, starting at `first`.
#[derive(Debug, Clone, Copy)]
struct Segment<'a> {
    /// The tier walked.
    tier: &'a Tier,
    /// Index of the first backend.
    first: usize,
    /// Yield unavailable backends too (panic mode).
    all: bool,
}

/// Backends to try for one client, in order; see [`Pool::candidates`].
#[derive(Debug)]
pub struct Candidates<'a> {
    /// Up to two walks: primaries then backups, or one of them.
    segments: [Option<Segment<'a>>; 2],
    /// The segment being walked.
    seg: usize,
    /// How far around the current segment's ring the walk is.
    step: usize,
    /// How many more candidates may be yielded.
    left: usize,
    /// No backend was available: candidates include unavailable ones.
    panic: bool,
}

impl Candidates<'_> {
    /// True when every backend was unavailable and candidates include them.
    pub fn is_panic(&self) -> bool {
        self.panic
    }
}

impl<'a> Iterator for Candidates<'a> {
    type Item = &'a Arc<Backend>;

    fn next(&mut self) -> Option<Self::Item> {
        while self.left > 0 && self.seg < self.segments.len() {
            let Some(s) = self.segments[self.seg] else {
                self.seg += 1;
                self.step = 0;
                continue;
            };
            let n = s.tier.backends.len();
            if self.step >= n {
                self.seg += 1;
                self.step = 0;
                continue;
            }
            let b = &s.tier.backends[(s.first + self.step) % n];
            // The strategy's own pick is yielded as is: it was available when picked.
            let first = self.step == 0 && !s.all;
            debug_assert!(n > 0);
            self.step += 1;
            // Panic mode ignores health, never an operator's drain.
            if (s.all && !b.is_draining()) || first || b.is_available() {
                self.left -= 1;
                return Some(b);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::backend::Settings;

    fn backend(port: u16, s: Settings) -> Arc<Backend> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        Arc::new(Backend::with_settings(addr, format!("b{port}").into(), 1, 1, s))
    }

    fn client() -> SocketAddr {
        "127.0.0.1:5000".parse().unwrap()
    }

    fn ports(c: Candidates<'_>) -> Vec<u16> {
        c.map(|b| b.addr.port()).collect()
    }

    #[test]
    fn backups_only_when_no_primary_is_available() {
        let backup = Settings { backup: true, ..Settings::default() };
        let pool = Pool::new(
            vec![
                backend(1, Settings::default()),
                backend(2, Settings::default()),
                backend(9, backup),
            ],
            StrategyKind::RoundRobin,
        );
        for _ in 0..10 {
            assert_ne!(pool.candidates(client(), 1).next().unwrap().addr.port(), 9);
        }
        // Retries run through the primaries, then the backup.
        assert_eq!(ports(pool.candidates(client(), 5)).last(), Some(&9));
        pool.backends()[0].health.set_up(false);
        pool.backends()[1].set_draining(true);
        assert_eq!(ports(pool.candidates(client(), 3)), vec![9]);
        pool.backends()[2].health.set_up(false);
        let c = pool.candidates(client(), 3);
        assert!(c.is_panic());
        assert_eq!(ports(c), vec![1], "panic mode walks the primaries, never a drained one");
    }

    #[test]
    fn full_backend_is_skipped_and_claims_are_capped() {
        let capped = Settings { max_connections: 1, ..Settings::default() };
        let pool = Pool::new(
            vec![backend(1, capped), backend(2, Settings::default())],
            StrategyKind::RoundRobin,
        );
        let a = &pool.backends()[0];
        let g = a.try_claim().expect("first slot");
        assert!(a.try_claim().is_none(), "cap of one");
        assert!(a.is_full() && !a.is_available());
        for _ in 0..4 {
            assert_eq!(pool.candidates(client(), 1).next().unwrap().addr.port(), 2);
        }
        drop(g);
        assert!(a.is_available());
        assert_eq!(a.active(), 0);
    }
}
