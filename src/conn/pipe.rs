//! Pipes for splice(2), and the per-worker pool that keeps empty ones for
//! the next spliced direction.

use std::sync::atomic::Ordering;

/// The capacity asked for each splice pipe: Linux's default `pipe-max-size`.
/// Larger pipes mean fewer, larger splices for a bulk stream
/// (docs/benchmarks.md, "Profiles and what changed because of them").
pub(crate) const PIPE_SIZE: usize = 1 << 20;

/// A pipe for splice(2): both ends non-blocking.
pub(crate) struct Pipe {
    /// Read end.
    pub r: std::os::fd::OwnedFd,
    /// Write end.
    pub w: std::os::fd::OwnedFd,
}

/// Empty pipes kept for the next spliced directions, as HAProxy keeps a
/// pool: making one costs four syscalls (pipe2, F_SETPIPE_SZ, and two close()
/// later) and the kernel's 1 MiB pipe setup. Each worker keeps its own (no
/// lock), but all of them together at most this many, apart from the one
/// each worker always keeps ([`Pipe::recycle`]): an empty pooled pipe
/// holds no data pages, yet its 1 MiB still counts against the per-user pipe
/// quota (`pipe-user-pages-soft`, 64 MiB by default), which the live
/// connections' pipes need more. The pool pays off most with `splice =
/// "on"` and a new connection per request (docs/benchmarks.md).
const PIPE_POOL: usize = 8;

/// Pipes in all the workers' pools.
static POOLED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The most pipes all the pools may hold together, the one each worker
/// keeps included: a quarter of the per-user pipe quota, read once, so that
/// many workers (one per core on a large machine) cannot fill the quota with
/// idle pipes while live connections fall back to copying.
fn pool_ceiling() -> usize {
    static CEILING: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CEILING.get_or_init(|| {
        let quota = std::fs::read_to_string("/proc/sys/fs/pipe-user-pages-soft")
            .ok()
            .and_then(|s| s.trim().parse().ok());
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        ceiling_for(quota, rustix::param::page_size(), exempt_from_pipe_quota(&status))
    })
}

/// [`pool_ceiling`] for a quota of `quota_pages` pages of `page_size` bytes
/// (None: unknown, taken as Linux's default of 16 384; 0: no quota).
fn ceiling_for(quota_pages: Option<u64>, page_size: usize, exempt: bool) -> usize {
    let quota = quota_pages.unwrap_or(16_384);
    if exempt || quota == 0 {
        return usize::MAX;
    }
    let pages_per_pipe = (PIPE_SIZE / page_size.max(1)).max(1) as u64;
    (quota / pages_per_pipe / 4).max(1) as usize
}

/// Whether `/proc/self/status` (its text) shows CAP_SYS_RESOURCE or
/// CAP_SYS_ADMIN in effect: Linux does not hold such a process to the pipe
/// quota.
fn exempt_from_pipe_quota(status: &str) -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_SYS_RESOURCE: u32 = 24;
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_ADMIN | 1 << CAP_SYS_RESOURCE) != 0)
}

/// One worker's pooled pipes; a worker that ends closes them and gives
/// their places in [`POOLED`] back.
struct PipePool(Vec<Pipe>);

impl Drop for PipePool {
    fn drop(&mut self) {
        POOLED.fetch_sub(self.0.len(), Ordering::Relaxed);
    }
}

thread_local! {
    static PIPES: std::cell::RefCell<PipePool> = const { std::cell::RefCell::new(PipePool(Vec::new())) };
}

impl Pipe {
    /// An empty pipe of at least [`PIPE_SIZE`]: from this thread's pool, else
    /// a new one. None to keep copying: out of descriptors, or past the
    /// per-user pipe quota (`pipe-user-pages-soft`), where Linux hands out
    /// two-page pipes that would move less per call than a plain copy does.
    pub fn new() -> Option<Pipe> {
        // try_with: a thread being torn down has no pool (and must not panic).
        if let Some(pipe) = PIPES.try_with(|p| p.borrow_mut().0.pop()).ok().flatten() {
            POOLED.fetch_sub(1, Ordering::Relaxed);
            return Some(pipe);
        }
        use rustix::pipe::{fcntl_setpipe_size, pipe_with, PipeFlags};
        let made = pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)
            .and_then(|(r, w)| fcntl_setpipe_size(&w, PIPE_SIZE).map(|_| Pipe { r, w }));
        match made {
            Ok(pipe) => {
                crate::stats::SPLICE_PIPES.fetch_add(1, Ordering::Relaxed);
                Some(pipe)
            }
            Err(e) => {
                tracing::debug!(error = %e, "no pipe for splice: copying instead");
                None
            }
        }
    }

    /// Gives the pipe back to this thread's pool, or closes it when the pool
    /// is full. Only an empty pipe is kept: bytes of one connection left in
    /// a pipe must never reach another one. Callers return pipes only after
    /// draining them, and the kernel's count is checked all the same.
    ///
    /// A worker always keeps one pipe, even past [`PIPE_POOL`]: its spliced
    /// directions hand their pipe back whenever their source runs dry and
    /// take one again on the next read, so without one of its own a worker
    /// would make and close a pipe per message while another hoards the pool.
    /// Neither goes past [`pool_ceiling`], a quarter of the pipe quota.
    pub fn recycle(self) {
        // Anything but a count of zero (bytes left, or an error): dropped,
        // which closes it.
        if let Ok(0) = rustix::io::ioctl_fionread(&self.r) {
            let _ = PIPES.try_with(|p| {
                let mut p = p.borrow_mut();
                let cap =
                    if p.0.is_empty() { pool_ceiling() } else { PIPE_POOL.min(pool_ceiling()) };
                let room = POOLED
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                        (n < cap).then_some(n + 1)
                    })
                    .is_ok();
                if room {
                    p.0.push(self);
                }
            });
        }
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        crate::stats::SPLICE_PIPES.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// This thread's pooled pipes.
    fn pooled() -> usize {
        PIPES.with(|p| p.borrow().0.len())
    }

    #[test]
    fn the_pool_holds_at_most_a_quarter_of_the_pipe_quota() {
        // Linux's default: 16 384 pages of 4 KiB, 64 pipes of 1 MiB.
        assert_eq!(ceiling_for(Some(16_384), 4096, false), 16);
        assert_eq!(ceiling_for(None, 4096, false), 16);
        // 64 KiB pages (arm64): 16 pages a pipe.
        assert_eq!(ceiling_for(Some(16_384), 65_536, false), 256);
        // A tiny quota still leaves one; no quota, or a process the kernel
        // does not hold to it, has no ceiling.
        assert_eq!(ceiling_for(Some(100), 4096, false), 1);
        assert_eq!(ceiling_for(Some(0), 4096, false), usize::MAX);
        assert_eq!(ceiling_for(Some(16_384), 4096, true), usize::MAX);

        let status =
            |caps: &str| format!("Name:\ttcplb\nCapInh:\t0\nCapEff:\t{caps}\nCapBnd:\t1\n");
        assert!(exempt_from_pipe_quota(&status("000001ffffffffff")), "root");
        assert!(exempt_from_pipe_quota(&status("0000000001000000")), "CAP_SYS_RESOURCE alone");
        assert!(!exempt_from_pipe_quota(&status("0000000000000000")), "an unprivileged user");
        assert!(!exempt_from_pipe_quota(&status("00000000a80425fb")), "Docker's default set");
        assert!(!exempt_from_pipe_quota("garbage"));
    }

    // One test, not several: the cap is shared by every thread of the process.
    #[test]
    fn pooled_pipes_are_empty_reused_and_bounded() {
        let pipe = Pipe::new().unwrap();
        let fd = pipe.r.as_raw_fd();
        pipe.recycle();
        assert_eq!(pooled(), 1);
        let again = Pipe::new().unwrap();
        assert_eq!(again.r.as_raw_fd(), fd, "the pooled pipe is handed out first");
        assert_eq!(pooled(), 0);

        // A pipe with a byte left in it must not be handed to anyone else.
        rustix::io::write(&again.w, b"x").unwrap();
        again.recycle();
        assert_eq!(pooled(), 0);

        let pipes: Vec<Pipe> = (0..PIPE_POOL + 4).filter_map(|_| Pipe::new()).collect();
        assert_eq!(pipes.len(), PIPE_POOL + 4);
        for p in pipes {
            p.recycle();
        }
        assert_eq!(pooled(), PIPE_POOL);
        assert_eq!(POOLED.load(Ordering::Relaxed), PIPE_POOL);

        // Another worker keeps one pipe of its own past the cap, but no more;
        // a thread that ends gives its places back.
        std::thread::spawn(|| {
            Pipe::new().unwrap().recycle();
            Pipe::new().unwrap().recycle();
            let (a, b) = (Pipe::new().unwrap(), Pipe::new().unwrap());
            a.recycle();
            b.recycle();
            assert_eq!(pooled(), 1);
            assert_eq!(POOLED.load(Ordering::Relaxed), PIPE_POOL + 1);
        })
        .join()
        .unwrap();
        assert_eq!(POOLED.load(Ordering::Relaxed), PIPE_POOL);
        drop(Pipe::new().unwrap());
        assert_eq!(POOLED.load(Ordering::Relaxed), PIPE_POOL - 1);
    }
}
