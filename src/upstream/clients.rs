//! One listener's share keeping: its connections in all (`max_connections`
//! per listener), and per client address the connections it holds
//! (`max_connections_per_client`) and a token bucket of new ones
//! (`connection_rate_per_client`), so that one client cannot take everyone's
//! share.
//!
//! Memory is bounded: the per-client table holds at most
//! [`TABLE_CAPACITY`] addresses, in shards behind short locks. When a shard
//! is full, a client with no open connection is forgotten to make room (the
//! least recently seen of a few looked at); if every client there holds
//! connections, the newcomer is let through untracked and counted, rather
//! than refused for the sake of bookkeeping.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::config::{as_ipv4, ClientLimits};

/// Client addresses tracked per listener at most: 56 bytes an entry, in
/// hash tables of power-of-two sizes, 7.5 MiB when full
/// (docs/configuration.md).
pub const TABLE_CAPACITY: usize = 100_000;

/// Shards of the table: connections from different clients rarely wait on
/// the same lock.
const SHARDS: usize = 16;

/// Entries looked at for one to forget when a shard is full.
const EVICTION_SAMPLE: usize = 32;

/// What one client has.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Connections it holds now.
    active: u32,
    /// Tokens in its bucket as of `stamp`.
    tokens: f64,
    /// When it last asked for a connection: when its bucket was last
    /// refilled, and how recent it is for eviction.
    stamp: Instant,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The listener holds `max_connections` already.
    Listener,
    /// The client holds `max_connections_per_client` already.
    ClientConnections,
    /// The client opened connections faster than `connection_rate_per_client`.
    ClientRate,
}

impl Refusal {
    /// The label in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Listener => "listener",
            Refusal::ClientConnections => "client_connections",
            Refusal::ClientRate => "client_rate",
        }
    }
}

/// The listener's counts and its table of clients.
#[derive(Debug)]
pub struct ClientTable {
    /// Connections admitted and still open (only counted while a limit is set).
    active: AtomicUsize,
    /// Per-client entries, by address.
    shards: Box<[Mutex<HashMap<IpAddr, Entry>>]>,
    /// Picks the shard.
    hasher: RandomState,
    /// Refusals, by [`Refusal`] in declaration order.
    refused: [AtomicU64; 3],
    /// Clients let through untracked because their shard was full of
    /// clients holding connections.
    untracked: AtomicU64,
}

impl Default for ClientTable {
    fn default() -> Self {
        ClientTable {
            active: AtomicUsize::new(0),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            refused: Default::default(),
            untracked: AtomicU64::new(0),
        }
    }
}

/// A connection's place in the counts; given back when dropped.
#[derive(Debug)]
pub struct Admission {
    /// The table it counts in.
    table: Arc<ClientTable>,
    /// The client, when it is tracked.
    client: Option<IpAddr>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.table.active.fetch_sub(1, Ordering::Relaxed);
        if let Some(ip) = self.client {
            let mut shard = self.table.shard(ip);
            if let Some(e) = shard.get_mut(&ip) {
                e.active = e.active.saturating_sub(1);
            }
        }
    }
}

impl ClientTable {
    /// Admits a connection from `ip` under `limits`, or says why not.
    pub fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        limits: &ClientLimits,
        now: Instant,
    ) -> Result<Admission, Refusal> {
        let held = self.active.fetch_add(1, Ordering::Relaxed);
        // From here on, dropping `admission` gives the listener slot back.
        let mut admission = Admission { table: Arc::clone(self), client: None };
        if limits.listener.is_some_and(|max| held >= max) {
            return Err(self.refuse(Refusal::Listener));
        }
        if limits.per_client.is_none() && limits.rate.is_none() {
            return Ok(admission);
        }
        let ip = as_ipv4(ip);
        let mut shard = self.shard(ip);
        let capacity = TABLE_CAPACITY.div_ceil(SHARDS);
        if shard.len() >= capacity && !shard.contains_key(&ip) && !evict_one(&mut shard) {
            self.untracked.fetch_add(1, Ordering::Relaxed);
            return Ok(admission);
        }
        let burst = limits.rate.map_or(0.0, |r| r.burst());
        let e = shard.entry(ip).or_insert(Entry { active: 0, tokens: burst, stamp: now });
        if let Some(rate) = limits.rate {
            let elapsed = now.saturating_duration_since(e.stamp).as_secs_f64();
            e.tokens = (e.tokens + elapsed * rate.per_second()).min(burst);
            e.stamp = now;
            if e.tokens < 1.0 {
                drop(shard);
                return Err(self.refuse(Refusal::ClientRate));
            }
            e.tokens -= 1.0;
        }
        e.stamp = now;
        if limits.per_client.is_some_and(|max| e.active >= max) {
            drop(shard);
            return Err(self.refuse(Refusal::ClientConnections));
        }
        e.active += 1;
        admission.client = Some(ip);
        Ok(admission)
    }

    fn refuse(&self, why: Refusal) -> Refusal {
        self.refused[why as usize].fetch_add(1, Ordering::Relaxed);
        why
    }

    fn shard(&self, ip: IpAddr) -> MutexGuard<'_, HashMap<IpAddr, Entry>> {
        let i = (self.hasher.hash_one(ip) as usize) % SHARDS;
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Connections refused so far for `why`.
    pub fn refused(&self, why: Refusal) -> u64 {
        self.refused[why as usize].load(Ordering::Relaxed)
    }

    /// Clients let through untracked because the table was full.
    pub fn untracked(&self) -> u64 {
        self.untracked.load(Ordering::Relaxed)
    }

    /// Client addresses tracked now.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len()).sum()
    }
}

/// Forgets the least recently seen of a few clients that hold no
/// connection; false when all of those hold some.
fn evict_one(shard: &mut HashMap<IpAddr, Entry>) -> bool {
    let victim = shard
        .iter()
        .take(EVICTION_SAMPLE)
        .filter(|(_, e)| e.active == 0)
        .min_by_key(|(_, e)| e.stamp)
        .map(|(ip, _)| *ip);
    victim.is_some_and(|ip| shard.remove(&ip).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Rate;
    use std::time::Duration;

    fn ip(n: u32) -> IpAddr {
        IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n))
    }

    #[test]
    fn connections_per_client_and_per_listener() {
        let t = Arc::new(ClientTable::default());
        let limits = ClientLimits { listener: Some(3), per_client: Some(2), rate: None };
        let now = Instant::now();
        let a1 = t.admit(ip(1), &limits, now).unwrap();
        let a2 = t.admit(ip(1), &limits, now).unwrap();
        assert_eq!(t.admit(ip(1), &limits, now).unwrap_err(), Refusal::ClientConnections);
        let b1 = t.admit(ip(2), &limits, now).unwrap();
        assert_eq!(t.admit(ip(3), &limits, now).unwrap_err(), Refusal::Listener);
        drop(a1);
        let _a3 = t.admit(ip(1), &limits, now).unwrap();
        drop((a2, b1));
        assert_eq!(t.refused(Refusal::ClientConnections), 1);
        assert_eq!(t.refused(Refusal::Listener), 1);
        assert_eq!(t.active.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn the_rate_refills_with_time() {
        let t = Arc::new(ClientTable::default());
        let rate: Rate = "10/s".parse().unwrap();
        let limits = ClientLimits { listener: None, per_client: None, rate: Some(rate) };
        let now = Instant::now();
        let admitted = (0..15).filter(|_| t.admit(ip(1), &limits, now).is_ok()).count();
        assert_eq!(admitted, 10, "a burst of one second's worth");
        assert!(t.admit(ip(2), &limits, now).is_ok(), "another client has its own bucket");
        let later = now + Duration::from_millis(500);
        let admitted = (0..15).filter(|_| t.admit(ip(1), &limits, later).is_ok()).count();
        assert_eq!(admitted, 5, "half a second refills half the bucket");
    }

    #[test]
    fn an_entry_stays_small() {
        // What docs/configuration.md says 100,000 clients cost.
        assert!(std::mem::size_of::<(IpAddr, Entry)>() <= 56);
    }

    #[test]
    fn a_full_table_forgets_idle_clients_and_never_grows() {
        let t = Arc::new(ClientTable::default());
        let limits = ClientLimits { listener: None, per_client: Some(1), rate: None };
        let now = Instant::now();
        for n in 0..(TABLE_CAPACITY as u32 + 5_000) {
            drop(t.admit(ip(n), &limits, now).unwrap());
        }
        assert!(t.tracked() <= TABLE_CAPACITY, "{}", t.tracked());
        assert_eq!(t.untracked(), 0);
    }
}
