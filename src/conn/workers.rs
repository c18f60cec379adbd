//! The data-plane threads, and how connections are spread over them.
//!
//! Each worker runs a current-thread runtime with its own SO_REUSEPORT
//! socket per listen address, so a connection's tasks, sockets and timers
//! never leave one thread. The kernel's SO_REUSEPORT hash picks the socket,
//! and so the worker, for every new connection: fair on average, but a few
//! long-lived connections (a database or Redis pool, tunnels, bulk streams)
//! often land two or three on one worker while another has none, and one
//! core then carries them all. With [`WorkerBalance::Fewest`] (the default)
//! a worker that serves more connections than the least busy one, by more
//! than an eighth, hands the connection it just accepted to that worker
//! before reading a byte of it, as HAProxy spreads its accepted connections
//! over its threads. The counts are per-worker atomics on separate cache
//! lines. The accept loop leaves a new socket out of every epoll until its
//! worker is chosen, so the hand-off costs only a wake-up of the other
//! worker (tokio's eventfd), and only connections that move pay it. It
//! balances connections, not bytes: an idle connection (iperf3's control
//! connection, a quiet pool member) counts as much as a busy one. Many
//! short connections move often (small counts differ by one all the time),
//! which costs nothing measurable (docs/benchmarks.md).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use crate::config::WorkerBalance;

/// The data-plane threads: one current-thread runtime each. A connection
/// lives on the worker that serves it (the one that accepted it, or the one
/// it was handed to before its first byte); the control plane (reload, DNS,
/// probes, admin) stays on the caller's runtime.
pub struct Workers {
    /// What the accept loops share: handles, connection counts, policy.
    pub set: Arc<WorkerSet>,
    /// Cancelled (also on drop) to end the worker threads.
    stop: CancellationToken,
}

impl Workers {
    /// Starts `n` worker threads (at least one). Their connections are
    /// closed when `kill` is cancelled.
    pub fn start(
        n: usize,
        balance: WorkerBalance,
        kill: &CancellationToken,
    ) -> Result<Workers, io::Error> {
        let stop = CancellationToken::new();
        let mut slots = Vec::with_capacity(n);
        for i in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            slots.push(Arc::new(Slot {
                handle: rt.handle().clone(),
                active: AtomicUsize::new(0),
                kill: kill.child_token(),
            }));
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("tcplb-worker-{i}"))
                .spawn(move || rt.block_on(work_until(stop)))?;
        }
        let set = Arc::new(WorkerSet {
            slots: slots.into_boxed_slice(),
            fewest: AtomicBool::new(balance == WorkerBalance::Fewest),
        });
        Ok(Workers { set, stop })
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One worker, as the others see it. Aligned to a cache line of its own: its
/// count changes with every connection it starts or ends, and the other
/// workers read it on every accept.
#[derive(Debug)]
#[repr(align(64))]
pub struct Slot {
    /// Spawns tasks on the worker.
    handle: Handle,
    /// Connections the worker serves now (each holds a [`Seat`]).
    active: AtomicUsize,
    /// Closes the worker's connections at the drain deadline: a child of
    /// the global token per worker, so that a worker's connections share one
    /// node (polling a token locks its node) and no node bounces between cores.
    kill: CancellationToken,
}

impl Slot {
    /// The worker's runtime.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// The token that closes the worker's connections.
    pub fn kill(&self) -> &CancellationToken {
        &self.kill
    }
}

/// The workers as every accept loop sees them.
#[derive(Debug)]
pub struct WorkerSet {
    /// One per worker, by index.
    slots: Box<[Arc<Slot>]>,
    /// Whether a busier worker hands new connections to the least busy one.
    fewest: AtomicBool,
}

impl WorkerSet {
    /// How many workers there are (at least one).
    pub fn count(&self) -> usize {
        self.slots.len()
    }

    /// Worker `i` (modulo the number of workers).
    pub fn slot(&self, i: usize) -> &Slot {
        &self.slots[i % self.slots.len()]
    }

    /// Applies a (reloaded) policy to connections accepted from now on.
    pub fn set_balance(&self, balance: WorkerBalance) {
        self.fewest.store(balance == WorkerBalance::Fewest, Ordering::Relaxed);
    }

    /// Connections each worker serves now, by index.
    pub fn active(&self) -> Vec<usize> {
        self.slots.iter().map(|s| s.active.load(Ordering::Relaxed)).collect()
    }

    /// The worker that serves a connection worker `me` just accepted, with
    /// its seat taken (so the next accept, on any worker, sees it).
    pub fn place(&self, me: usize) -> Seat {
        let me = me % self.slots.len();
        let to = if self.fewest.load(Ordering::Relaxed) { self.least_busy(me) } else { me };
        let slot = &self.slots[to];
        slot.active.fetch_add(1, Ordering::Relaxed);
        Seat { slot: Arc::clone(slot), worker: to }
    }

    /// `me`, unless another worker serves fewer connections than `me` does,
    /// by more than an eighth of its own: then the first of those, counting
    /// from `me`, with the fewest. Exact for small counts (3 against 2 moves),
    /// so a handful of long-lived connections is spread evenly; with
    /// hundreds, a gap of an eighth is needed.
    fn least_busy(&self, me: usize) -> usize {
        let n = self.slots.len();
        let mine = self.slots[me].active.load(Ordering::Relaxed);
        let (mut best, mut fewest) = (me, mine);
        for k in 1..n {
            let i = (me + k) % n;
            let a = self.slots[i].active.load(Ordering::Relaxed);
            if a < fewest {
                (best, fewest) = (i, a);
            }
        }
        if mine > fewest + fewest / 8 {
            best
        } else {
            me
        }
    }
}

/// A connection's place on a worker: counted in the worker's load until dropped.
pub struct Seat {
    /// The worker.
    slot: Arc<Slot>,
    /// Its index.
    worker: usize,
}

impl Seat {
    /// The worker's index.
    pub fn worker(&self) -> usize {
        self.worker
    }

    /// The worker.
    pub fn slot(&self) -> &Slot {
        &self.slot
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.slot.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How often a worker's timer floor fires; below the shortest timeout a
/// connection usually sets (3 s connect, 1 s peek).
const TIMER_FLOOR: Duration = Duration::from_millis(500);

/// A worker's main future: runs until `stop`, and keeps one timer of the
/// worker always due within [`TIMER_FLOOR`].
///
/// tokio's timer writes to the driver's eventfd (and so costs one more
/// `epoll_wait`) whenever a new timer is due before all the others, because
/// it cannot tell that the timer was set on the driver's own thread, which
/// is awake anyway. On a worker that happens for nearly every connection's
/// connect timeout. With a timer always due sooner, new timers never come
/// first; the floor costs two wake-ups per second.
async fn work_until(stop: CancellationToken) {
    let floor = async {
        loop {
            tokio::time::sleep(TIMER_FLOOR).await;
        }
    };
    tokio::select! {
        () = stop.cancelled() => {}
        () = floor => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(n: usize, balance: WorkerBalance) -> (Workers, CancellationToken) {
        let kill = CancellationToken::new();
        (Workers::start(n, balance, &kill).unwrap(), kill)
    }

    #[test]
    fn a_few_connections_are_spread_evenly_whichever_worker_accepts_them() {
        let (w, _kill) = share(4, WorkerBalance::Fewest);
        // Every connection hashed to worker 2, the worst case for the kernel.
        let seats: Vec<Seat> = (0..8).map(|_| w.set.place(2)).collect();
        assert_eq!(w.set.active(), vec![2, 2, 2, 2]);
        drop(seats);
        assert_eq!(w.set.active(), vec![0, 0, 0, 0]);
    }

    #[test]
    fn hash_keeps_every_connection_where_the_kernel_put_it() {
        let (w, _kill) = share(3, WorkerBalance::Hash);
        let _seats: Vec<Seat> = (0..5).map(|_| w.set.place(1)).collect();
        assert_eq!(w.set.active(), vec![0, 5, 0]);
        w.set.set_balance(WorkerBalance::Fewest);
        let moved = w.set.place(1);
        assert_eq!(moved.worker(), 2, "the first of the least busy, counting on from the acceptor");
    }

    #[test]
    fn large_counts_move_only_past_an_eighth() {
        let (w, _kill) = share(2, WorkerBalance::Hash);
        let _a: Vec<Seat> = (0..72).map(|_| w.set.place(0)).collect();
        let _b: Vec<Seat> = (0..64).map(|_| w.set.place(1)).collect();
        w.set.set_balance(WorkerBalance::Fewest);
        // 72 against 64 (64 + 64 / 8 = 72): stays, and makes it 73.
        let _held = w.set.place(0);
        assert_eq!(_held.worker(), 0);
        // 73 against 64: moves.
        assert_eq!(w.set.place(0).worker(), 1);
    }
}
