//! Maglev consistent hashing of the client IP (Eisenbud et al., "Maglev: A
//! Fast and Reliable Software Network Load Balancer", NSDI 2016).
//!
//! Each backend gets a permutation of the table's slots from two hashes of
//! its address; backends take turns (weight turns per round) claiming their
//! next free preferred slot until the table is full. A client IP hashes to a
//! slot. The table depends only on the set of addresses and weights (the
//! backends are sorted by address first, and the hash is fixed), so two tcplb
//! processes with the same backend list agree on every client's placement.
//! When a backend is unavailable its clients walk on to the next slots;
//! clients of other backends do not move.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use super::{scan_from, Strategy};
use crate::upstream::backend::Backend;

/// Prime table sizes; the first at least 100 × backends is used.
const SIZES: [u64; 3] = [65_537, 131_071, 524_287];

/// Most backends a table can index (slots are 16-bit, to halve the table
/// and keep lookups in cache); further backends are left out of the table.
pub const MAX_BACKENDS: usize = u16::MAX as usize;

/// A Maglev lookup table over one backend list.
#[derive(Debug)]
pub struct Maglev {
    /// Slot → backend index.
    table: Vec<u16>,
}

impl Maglev {
    /// Builds the table for `backends` with their current weights.
    pub fn new(backends: &[Arc<Backend>]) -> Self {
        let keys: Vec<(String, u32)> =
            backends.iter().take(MAX_BACKENDS).map(|b| (b.addr.to_string(), b.weight())).collect();
        Maglev { table: build_table(&keys) }
    }

    /// The table (for comparing two instances).
    #[cfg(test)]
    fn table(&self) -> &[u16] {
        &self.table
    }

    fn slot(&self, ip: IpAddr) -> usize {
        let h = match ip {
            IpAddr::V4(v4) => stable_hash(&v4.octets(), 2),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => stable_hash(&v4.octets(), 2),
                None => stable_hash(&v6.octets(), 2),
            },
        };
        (h % self.table.len() as u64) as usize
    }
}

/// The table for `(name, weight)` keys, in the order given.
fn build_table(keys: &[(String, u32)]) -> Vec<u16> {
    let n = keys.len();
    if n == 0 {
        return Vec::new();
    }
    let m = SIZES.iter().copied().find(|&s| s >= 100 * n as u64).unwrap_or(SIZES[SIZES.len() - 1]);
    // Sort by name so the table does not depend on configuration order.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| keys[a].0.cmp(&keys[b].0));
    let perm: Vec<(u64, u64)> = keys
        .iter()
        .map(|(name, _)| {
            let offset = stable_hash(name.as_bytes(), 0) % m;
            let skip = stable_hash(name.as_bytes(), 1) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; n];
    let mut table = vec![u16::MAX; m as usize];
    let mut filled = 0u64;
    while filled < m {
        for &i in &order {
            for _ in 0..keys[i].1.max(1) {
                let (offset, skip) = perm[i];
                let mut slot = ((offset + next[i] * skip) % m) as usize;
                while table[slot] != u16::MAX {
                    next[i] += 1;
                    slot = ((offset + next[i] * skip) % m) as usize;
                }
                table[slot] = i as u16;
                next[i] += 1;
                filled += 1;
                if filled == m {
                    return table;
                }
            }
        }
    }
    table
}

/// A hash that is the same in every process and version: FNV-1a, then the
/// splitmix64 finalizer to spread the bits. `seed` gives independent hashes.
pub fn stable_hash(bytes: &[u8], seed: u8) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ (seed as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

impl Strategy for Maglev {
    fn pick(&self, backends: &[Arc<Backend>], client: SocketAddr) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        let start = self.slot(client.ip());
        let i = self.table[start] as usize;
        if backends[i].is_available() {
            return Some(i);
        }
        // Walk on from the client's slot: a short walk finds an available
        // backend unless most are down, in which case a scan settles it.
        let m = self.table.len();
        for k in 1..64 {
            let j = self.table[(start + k) % m] as usize;
            if backends[j].is_available() {
                return Some(j);
            }
        }
        scan_from(backends, i)
    }

    fn pick_any(&self, n: usize, client: SocketAddr) -> usize {
        if self.table.is_empty() || n == 0 {
            return 0;
        }
        self.table[self.slot(client.ip())] as usize % n
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;

    fn placements(backends: &[Arc<Backend>], m: &Maglev, clients: u32) -> Vec<SocketAddr> {
        (0..clients).map(|c| backends[m.pick(backends, client(c)).unwrap()].addr).collect()
    }

    #[test]
    fn same_client_same_backend() {
        let b = weighted(&[1; 5]);
        let m = Maglev::new(&b);
        for c in 0..100 {
            let first = m.pick(&b, client(c));
            assert_eq!(m.pick(&b, SocketAddr::new(client(c).ip(), 1)), first);
        }
    }

    #[test]
    fn two_instances_build_equal_tables_whatever_the_order() {
        let b = weighted(&[1; 10]);
        let mut reversed = b.clone();
        reversed.reverse();
        let one = Maglev::new(&b);
        let two = Maglev::new(&b);
        assert_eq!(one.table(), two.table());
        let three = Maglev::new(&reversed);
        for c in 0..1000 {
            assert_eq!(
                b[one.pick(&b, client(c)).unwrap()].addr,
                reversed[three.pick(&reversed, client(c)).unwrap()].addr
            );
        }
    }

    #[test]
    fn removing_one_of_ten_moves_only_its_clients() {
        let b = weighted(&[1; 10]);
        let before = placements(&b, &Maglev::new(&b), 20_000);
        let removed = b[3].addr;
        let rest: Vec<_> = b.iter().filter(|x| x.addr != removed).cloned().collect();
        let after = placements(&rest, &Maglev::new(&rest), 20_000);
        let (mut kept, mut others) = (0, 0);
        for (x, y) in before.iter().zip(&after) {
            if *x != removed {
                others += 1;
                kept += (x == y) as usize;
            }
        }
        let ratio = kept as f64 / others as f64;
        assert!(ratio >= 0.95, "only {ratio:.3} of unaffected clients stayed");
    }

    #[test]
    fn a_down_backend_moves_only_its_own_clients() {
        let b = weighted(&[1; 10]);
        let m = Maglev::new(&b);
        let before = placements(&b, &m, 5000);
        b[4].health.set_up(false);
        let after = placements(&b, &m, 5000);
        for (x, y) in before.iter().zip(&after) {
            if *x != b[4].addr {
                assert_eq!(x, y);
            } else {
                assert_ne!(y, &b[4].addr);
            }
        }
    }

    #[test]
    fn spread_is_even_and_follows_weight() {
        let b = weighted(&[1, 1, 2]);
        let m = Maglev::new(&b);
        let mut counts = [0usize; 3];
        for &i in m.table() {
            counts[i as usize] += 1;
        }
        let total = m.table().len() as f64;
        assert!((counts[0] as f64 / total - 0.25).abs() < 0.02, "{counts:?}");
        assert!((counts[2] as f64 / total - 0.5).abs() < 0.02, "{counts:?}");
    }

    #[test]
    fn stable_hash_is_fixed() {
        // Pinned values: a change here would move every client of every fleet.
        assert_eq!(stable_hash(b"10.0.0.1:80", 0), stable_hash(b"10.0.0.1:80", 0));
        assert_ne!(stable_hash(b"10.0.0.1:80", 0), stable_hash(b"10.0.0.1:80", 1));
        assert_eq!(stable_hash(b"", 0), 17_665_956_581_633_026_203);
        assert_eq!(stable_hash(b"10.0.0.1:80", 0), 15_833_689_265_622_162_035);
    }
}
