//! Selection strategies. A strategy only picks the first backend to try among
//! the available ones; [`crate::backend::Candidates`] turns that into an
//! ordered list of retries, so strategies never deal with retry or health
//! beyond skipping unavailable backends.

use std::fmt::Debug;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::backend::Backend;

mod round_robin;

pub use round_robin::RoundRobin;

/// Chooses which backend a new client goes to first.
pub trait Strategy: Send + Sync + Debug {
    /// Index of the first available backend for `client`, or None when no
    /// backend is available. Must not block or take a lock shared by all picks.
    fn pick(&self, backends: &[Arc<Backend>], client: SocketAddr) -> Option<usize>;

    /// Index to start from when none is available (panic mode).
    fn pick_any(&self, n: usize, client: SocketAddr) -> usize;
}
