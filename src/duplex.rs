//! The bidirectional byte pump between a client and a backend.
//!
//! Each direction runs until its own EOF, then shuts down the write half of
//! the other socket (half-close), while the reverse direction keeps flowing;
//! the direction that ends last leaves its FIN to close().
//! Bytes are read into a per-thread 64 KiB scratch buffer and written on at
//! once; only what the destination cannot take right away is copied into a
//! per-connection buffer, which is freed as soon as it is flushed. So a
//! connection holds no buffer at all unless its destination is slow, and a
//! read never outruns the write before it (backpressure). An error on either
//! socket ends both, and the surviving peer is reset so that it sees the
//! failure instead of a clean end of stream.

use std::io;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

use socket2::SockRef;
use std::pin::Pin;
use std::task::Poll;

use tokio::io::Interest;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use crate::config::SpliceMode;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

/// Timeouts that bound a spliced connection.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Close after this long with no bytes either way (None: never).
    pub idle: Option<Duration>,
    /// Once one direction has ended, close after this long with no bytes (None: idle only).
    pub half_close: Option<Duration>,
}

impl Timeouts {
    /// The inactivity limit once one side has finished sending.
    pub fn after_half_close(&self) -> Option<Duration> {
        match (self.idle, self.half_close) {
            (Some(i), Some(h)) => Some(i.min(h)),
            (i, h) => i.or(h),
        }
    }
}

/// How a spliced connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The client finished sending first, then the backend.
    ClientClosed,
    /// The backend finished sending first, then the client.
    BackendClosed,
    /// No bytes either way for the idle timeout.
    IdleTimeout,
    /// One side finished and the other stayed silent for the half-close timeout.
    HalfCloseTimeout,
    /// The client socket failed (reset, broken pipe).
    ClientError,
    /// The backend socket failed (reset, broken pipe).
    BackendError,
    /// The drain deadline passed during shutdown.
    Shutdown,
}

impl End {
    /// A short name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            End::ClientClosed => "client closed",
            End::BackendClosed => "backend closed",
            End::IdleTimeout => "idle timeout",
            End::HalfCloseTimeout => "half-close timeout",
            End::ClientError => "client error",
            End::BackendError => "backend error",
            End::Shutdown => "shutdown",
        }
    }
}

/// What happened on a spliced connection.
#[derive(Debug)]
pub struct Outcome {
    /// Bytes from client to backend.
    pub sent: u64,
    /// Bytes from backend to client.
    pub received: u64,
    /// Why it ended.
    pub end: End,
    /// The socket error, when it ended on one.
    pub error: Option<io::Error>,
}

/// Which socket an error belongs to.
enum Fault {
    /// Reading from the source failed.
    Read(io::Error),
    /// Writing or shutting down the destination failed.
    Write(io::Error),
}

/// What both directions share: the last time a byte moved (for the idle
/// watch) and how many directions have reached their EOF.
struct Activity {
    /// Reference point for `last_ms`.
    start: Instant,
    /// Milliseconds after `start` of the last byte moved.
    last_ms: AtomicU64,
    /// Directions that have seen EOF.
    ended: AtomicU8,
}

impl Activity {
    fn new(ended: u8) -> Self {
        Activity { start: Instant::now(), last_ms: AtomicU64::new(0), ended: AtomicU8::new(ended) }
    }

    /// Records one direction's EOF; true when the other had already ended.
    fn end_is_last(&self) -> bool {
        self.ended.fetch_add(1, Ordering::Relaxed) >= 1
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// Resolves once nothing has moved for `timeout`.
    async fn quiet_for(&self, timeout: Option<Duration>) {
        let Some(timeout) = timeout else {
            return std::future::pending().await;
        };
        loop {
            let deadline = self.last() + timeout;
            if Instant::now() >= deadline {
                return;
            }
            sleep_until(deadline).await;
        }
    }
}

/// Copies bytes both ways until both directions end, one fails, a timeout
/// fires or `cancel` is cancelled.
///
/// `totals` (client→backend, backend→client) are bumped as bytes move, so
/// long-lived connections show up in metrics before they end.
/// `client_done` says the client's FIN was already passed on to the backend.
pub async fn splice(
    client: &mut TcpStream,
    backend: &mut TcpStream,
    timeouts: Timeouts,
    cancel: &CancellationToken,
    totals: (&AtomicU64, &AtomicU64),
    client_done: bool,
    mode: SpliceMode,
) -> Outcome {
    let activity = Activity::new(u8::from(client_done));
    let sent = AtomicU64::new(0);
    let received = AtomicU64::new(0);
    let (mut cr, mut cw) = client.split();
    let (mut br, mut bw) = backend.split();
    let (end, error) = {
        let up = pump(&mut cr, &mut bw, [&sent, totals.0], &activity, mode);
        let down = pump(&mut br, &mut cw, [&received, totals.1], &activity, mode);
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (client_done, false);
        loop {
            let half_closed = up_done || down_done;
            let limit = if half_closed { timeouts.after_half_close() } else { timeouts.idle };
            tokio::select! {
                r = &mut up, if !up_done => match r {
                    Ok(()) => {
                        up_done = true;
                        if down_done {
                            break (End::BackendClosed, None);
                        }
                    }
                    Err(Fault::Read(e)) => break (End::ClientError, Some(e)),
                    Err(Fault::Write(e)) => break (End::BackendError, Some(e)),
                },
                r = &mut down, if !down_done => match r {
                    Ok(()) => {
                        down_done = true;
                        if up_done {
                            break (End::ClientClosed, None);
                        }
                    }
                    Err(Fault::Read(e)) => break (End::BackendError, Some(e)),
                    Err(Fault::Write(e)) => break (End::ClientError, Some(e)),
                },
                _ = activity.quiet_for(limit) => {
                    break (if half_closed { End::HalfCloseTimeout } else { End::IdleTimeout }, None)
                }
                _ = cancel.cancelled() => break (End::Shutdown, None),
            }
        }
    };
    match end {
        // Tell the surviving side that its peer failed rather than finished.
        End::ClientError => reset_on_close(bw.as_ref()),
        End::BackendError => reset_on_close(cw.as_ref()),
        _ => {}
    }
    Outcome {
        sent: sent.load(Ordering::Relaxed),
        received: received.load(Ordering::Relaxed),
        end,
        error,
    }
}

/// Makes the coming close of `stream` send RST instead of FIN. Bytes held
/// back by MSG_MORE go out first: setting TCP_NODELAY pushes them (tcp(7)),
/// and a RST would otherwise discard them.
pub fn reset_on_close(stream: &TcpStream) {
    let sock = SockRef::from(stream);
    let _ = sock.set_nodelay(true);
    let _ = sock.set_linger(Some(Duration::ZERO));
}

/// Copies `from` → `to` until EOF, then shuts down `to`'s write half
/// (unless the other direction has ended too: then close() sends the FIN).
/// With splice(2) allowed, a bulk direction moves to a pipe (zero copy).
async fn pump(
    from: &mut ReadHalf<'_>,
    to: &mut WriteHalf<'_>,
    counters: [&AtomicU64; 2],
    activity: &Activity,
    mut mode: SpliceMode,
) -> Result<(), Fault> {
    // Bytes read but not yet written: only ever non-empty under backpressure.
    let mut pending: Vec<u8> = Vec::new();
    // Recent read sizes, for `auto` to tell bulk data from chatter.
    let mut traffic = Traffic::default();
    // Whether this direction forwards with splice(2): `on` from the first
    // byte, `auto` once it turns out to carry bulk data.
    let mut splicing = mode == SpliceMode::On;
    if mode == SpliceMode::Auto && from.as_ref().readable().await.is_ok() {
        // A first message of 64 KiB or more already waiting in full (a
        // response on a new connection, say): splice it from its first byte
        // instead of copying 64 KiB first. One ioctl per direction.
        splicing = burst(from);
    }
    loop {
        if splicing {
            let auto = (mode == SpliceMode::Auto).then_some(&mut traffic);
            let spliced = splice_loop(from.as_ref(), to.as_ref(), counters, activity, auto);
            // Boxed: its state would otherwise sit in every connection's future.
            match Box::pin(spliced).await? {
                Spliced::Eof => break,
                Spliced::NoPipe => {
                    // None to be had: this direction keeps copying, instead
                    // of trying pipe2 and F_SETPIPE_SZ again on every read.
                    mode = SpliceMode::Off;
                }
                // Small messages now: copying them costs fewer syscalls.
                Spliced::Chatty => {}
            }
        }
        let (read, written) = match forward(from, to, &mut pending, |_| {}).await {
            Step::Eof => break,
            Step::ReadError(e) => return Err(Fault::Read(e)),
            Step::WriteError(e) => return Err(Fault::Write(e)),
            Step::Moved { read, written } => (read, written),
        };
        activity.touch();
        let mut moved = written as u64;
        if !pending.is_empty() {
            // The destination is slow: wait for it, then free the buffer, so
            // that a connection going idle again holds no memory.
            to.write_all(&pending).await.map_err(Fault::Write)?;
            moved += pending.len() as u64;
            pending = Vec::new();
            activity.touch();
        }
        for c in counters {
            c.fetch_add(moved, Ordering::Relaxed);
        }
        // A bulk transfer: worth a pipe.
        splicing = mode == SpliceMode::Auto
            && (traffic.record(read) == Some(Pace::Bulk) || (read == SCRATCH && burst(from)));
    }
    if activity.end_is_last() {
        // Both directions are done and both sockets are about to be closed:
        // close() sends the FIN (nothing is left unread, so never a RST),
        // which saves a shutdown(2) per connection.
        return Ok(());
    }
    match to.shutdown().await {
        Ok(()) => Ok(()),
        // The peer is already gone entirely; its own direction reports why.
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        Err(e) => Err(Fault::Write(e)),
    }
}

/// A [`Traffic`] window closes after this many bytes (bulk: at least 16 KiB
/// a read on average) ...
const BULK: u64 = 1 << 20;
/// ... or after this many reads (chatter: less than 16 KiB a read).
const WINDOW_READS: u32 = 64;

/// How a direction's recent reads looked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pace {
    /// 1 MiB in at most 64 reads: splicing it saves copies.
    Bulk,
    /// 64 reads that moved less than 1 MiB: small messages, which splice
    /// moves with more syscalls than copying (in, out, and an in that finds
    /// the socket empty, against one read and one write).
    Chatty,
}

/// What `auto` knows of a direction's recent reads (copied or spliced): a
/// window that closes after [`BULK`] bytes or [`WINDOW_READS`] reads,
/// whichever comes first, and says which came first. A long-lived
/// connection's total alone would not do: a keep-alive connection with small
/// messages (a database or Redis client, say) passes 1 MiB sooner or later,
/// and then spliced every message with twice the syscalls.
#[derive(Debug, Default)]
struct Traffic {
    /// Reads in the open window.
    reads: u32,
    /// Bytes in the open window (u32: no more than a read past 1 MiB, and
    /// this struct sits in every connection's future, twice).
    bytes: u32,
}

impl Traffic {
    /// Counts one read of `n` bytes; the window's verdict when it closes.
    fn record(&mut self, n: usize) -> Option<Pace> {
        self.reads += 1;
        self.bytes = self.bytes.saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
        let pace = if u64::from(self.bytes) >= BULK {
            Pace::Bulk
        } else if self.reads >= WINDOW_READS {
            Pace::Chatty
        } else {
            return None;
        };
        *self = Traffic::default();
        Some(pace)
    }
}

/// Before a direction's first read, or after a read that filled the whole
/// scratch buffer: whether at least 64 KiB (more) are already waiting in the
/// socket, so splicing them pays for a pipe. (A response a little over
/// 64 KiB leaves a short tail after its first full read, which is cheaper to
/// copy.) After full reads, with a new connection per request: 256 KiB
/// responses 1.146× req/s at 0.885× CPU, 64 KiB 1.047×; keep-alive 64 KiB
/// 0.996×. Before the first read: 64 KiB responses on new connections
/// 1.042× req/s at 0.909× CPU, 256 KiB 1.060× at 0.829×, 19 B 0.992-1.006×
/// at 1.008-1.012× (docs/benchmarks.md).
fn burst(from: &ReadHalf<'_>) -> bool {
    rustix::io::ioctl_fionread(from.as_ref()).is_ok_and(|queued| queued >= SCRATCH as u64)
}

/// The capacity asked for each splice pipe: Linux's default `pipe-max-size`.
/// Measured against the default 64 KiB pipe with one iperf3 stream, 1 MiB
/// moved 18% more (fewer, larger splices); see docs/benchmarks.md.
const PIPE_SIZE: usize = 1 << 20;

/// A pipe for splice(2): both ends non-blocking.
struct Pipe {
    /// Read end.
    r: std::os::fd::OwnedFd,
    /// Write end.
    w: std::os::fd::OwnedFd,
}

/// Empty pipes kept for the next spliced directions, as HAProxy keeps a
/// pool: making one costs four syscalls (pipe2, F_SETPIPE_SZ, and two close()
/// later) and the kernel's 1 MiB pipe setup. Each worker keeps its own (no
/// lock), but all of them together at most this many, apart from the one
/// each worker always keeps ([`Pipe::recycle`]): an empty pooled pipe
/// holds no data pages, yet its 1 MiB still counts against the per-user pipe
/// quota (`pipe-user-pages-soft`, 64 MiB by default), which the live
/// connections' pipes need more. With `splice = "on"` and a new connection
/// per request: 1.019× req/s at 0.961× CPU per connection; 16 per worker
/// without the cap read 1.03-1.07× at 0.89-0.93× (docs/benchmarks.md).
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
struct Pool(Vec<Pipe>);

impl Drop for Pool {
    fn drop(&mut self) {
        POOLED.fetch_sub(self.0.len(), Ordering::Relaxed);
    }
}

thread_local! {
    static PIPES: std::cell::RefCell<Pool> = const { std::cell::RefCell::new(Pool(Vec::new())) };
}

impl Pipe {
    /// An empty pipe of at least [`PIPE_SIZE`]: from this thread's pool, else
    /// a new one. None to keep copying: out of descriptors, or past the
    /// per-user pipe quota (`pipe-user-pages-soft`), where Linux hands out
    /// two-page pipes that would move less per call than a plain copy does.
    fn new() -> Option<Pipe> {
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
                crate::metrics::SPLICE_PIPES.fetch_add(1, Ordering::Relaxed);
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
    fn recycle(self) {
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
        crate::metrics::SPLICE_PIPES.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How [`splice_loop`] ended.
enum Spliced {
    /// The source is at end of stream, and everything has been passed on.
    Eof,
    /// No pipe could be had (none pooled, and no descriptor or pipe quota
    /// left for a new one); nothing is in flight.
    NoPipe,
    /// `auto` saw a window of small messages ([`Pace::Chatty`]); everything
    /// has been passed on, and the pipe went back to the pool.
    Chatty,
}

/// Moves `from` → `to` with splice(2) through a pipe until EOF. The pipe is
/// always drained completely before more is spliced in, so an EAGAIN when
/// filling it means the socket is empty (never that the pipe is full), and an
/// EAGAIN when draining means the destination is full.
///
/// A pipe is held only while bytes are in flight: when the source runs dry
/// the (empty) pipe goes back to the worker's pool, and the next readable
/// event takes one again, usually the same. So a quiet keep-alive connection
/// holds no pipe, and no pipe quota (`pipe-user-pages-soft`): a worker needs
/// about one pipe per direction that is moving bytes at that moment.
///
/// With `auto` (the direction's [`Traffic`]), it also ends once the messages
/// have turned small, for the caller to copy them.
async fn splice_loop(
    from: &TcpStream,
    to: &TcpStream,
    counters: [&AtomicU64; 2],
    activity: &Activity,
    mut auto: Option<&mut Traffic>,
) -> Result<Spliced, Fault> {
    use rustix::pipe::{splice, SpliceFlags};
    let flags = SpliceFlags::NONBLOCK | SpliceFlags::MOVE;
    let mut held: Option<Pipe> = None;
    loop {
        let (pipe, n) = loop {
            from.readable().await.map_err(Fault::Read)?;
            let Some(pipe) = held.take().or_else(Pipe::new) else {
                return Ok(Spliced::NoPipe);
            };
            let r = from.try_io(Interest::READABLE, || {
                splice(from, None, &pipe.w, None, PIPE_SIZE, flags).map_err(io::Error::from)
            });
            match r {
                Ok(n) => break (pipe, n),
                // The socket is empty, and so is the pipe: give it back
                // while this direction waits.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => pipe.recycle(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => held = Some(pipe),
                // Nothing was spliced in: the pipe is still empty, and
                // recycle() checks that all the same.
                Err(e) => {
                    pipe.recycle();
                    return Err(Fault::Read(e));
                }
            }
        };
        if n == 0 {
            pipe.recycle();
            return Ok(Spliced::Eof);
        }
        activity.touch();
        let mut left = n;
        while left > 0 {
            to.writable().await.map_err(Fault::Write)?;
            let r = to.try_io(Interest::WRITABLE, || {
                splice(&pipe.r, None, to, None, left, flags).map_err(io::Error::from)
            });
            match r {
                Ok(k) => left -= k.min(left),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(Fault::Write(e)),
            }
        }
        activity.touch();
        // Before the byte counters, which publish it (Release; a scrape
        // reads them with Acquire): a scrape that shows these bytes in
        // `tcplb_bytes_total` shows them in `tcplb_spliced_bytes_total` too.
        crate::metrics::SPLICED_BYTES.fetch_add(n as u64, Ordering::Relaxed);
        for c in counters {
            c.fetch_add(n as u64, Ordering::Release);
        }
        if let Some(traffic) = auto.as_deref_mut() {
            if traffic.record(n) == Some(Pace::Chatty) {
                pipe.recycle();
                return Ok(Spliced::Chatty);
            }
        }
        held = Some(pipe);
    }
}

/// What one [`forward`] call did.
#[derive(Debug)]
pub enum Step {
    /// The source is at end of stream.
    Eof,
    /// Reading failed.
    ReadError(io::Error),
    /// Writing failed.
    WriteError(io::Error),
    /// `read` bytes came in; `written` of them went out at once, the rest
    /// were appended to `pending`.
    Moved {
        /// Bytes read.
        read: usize,
        /// Bytes written straight away.
        written: usize,
    },
}

/// Size of each worker thread's scratch buffer.
const SCRATCH: usize = 64 * 1024;

thread_local! {
    /// One read buffer per worker thread, shared by every connection on it:
    /// a connection owns a buffer only while its destination is slow.
    static SCRATCH_BUF: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0u8; SCRATCH].into_boxed_slice());
}

/// Waits until `from` has bytes (or EOF), reads them (up to 64 KiB) into the
/// thread's scratch buffer and writes them to `to` at once; whatever `to`
/// does not take is appended to `pending` for the caller to write. `inspect`
/// sees the bytes read. Reads go through tokio's `poll_read`, which knows a
/// short read drained the socket, saving an `EAGAIN` read per message.
pub async fn forward(
    from: &mut ReadHalf<'_>,
    to: &mut WriteHalf<'_>,
    pending: &mut Vec<u8>,
    mut inspect: impl FnMut(&[u8]),
) -> Step {
    std::future::poll_fn(|cx| {
        SCRATCH_BUF.with(|cell| {
            let mut buf = cell.borrow_mut();
            let capacity = buf.len();
            let mut rb = ReadBuf::new(&mut buf[..]);
            match Pin::new(&mut *from).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Step::ReadError(e)),
                Poll::Ready(Ok(())) => {}
            }
            let data = rb.filled();
            if data.is_empty() {
                return Poll::Ready(Step::Eof);
            }
            inspect(data);
            // A short read drained the socket; if its FIN has already arrived
            // too (tokio keeps "read closed" readiness after clearing
            // "readable"), the next read is the EOF and the shutdown or close
            // follows at once: send with MSG_MORE so the kernel puts these
            // bytes and our FIN into one segment instead of two.
            let written = if !pending.is_empty() {
                0
            } else if data.len() < capacity && from.as_ref().poll_read_ready(cx).is_ready() {
                match send_more(to.as_ref(), data) {
                    Ok(w) => w,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                    Err(e) => return Poll::Ready(Step::WriteError(e)),
                }
            } else {
                match Pin::new(&mut *to).poll_write(cx, data) {
                    Poll::Ready(Ok(w)) => w,
                    Poll::Pending => 0,
                    Poll::Ready(Err(e)) => return Poll::Ready(Step::WriteError(e)),
                }
            };
            pending.extend_from_slice(&data[written..]);
            Poll::Ready(Step::Moved { read: data.len(), written })
        })
    })
    .await
}

/// Writes what `to` takes now with MSG_MORE (the kernel holds the bytes
/// back for what follows: here, the FIN); WouldBlock when it takes nothing.
fn send_more(to: &TcpStream, data: &[u8]) -> io::Result<usize> {
    use rustix::net::{send, SendFlags};
    to.try_io(Interest::WRITABLE, || {
        send(to, data, SendFlags::MORE | SendFlags::NOSIGNAL).map_err(io::Error::from)
    })
}

/// Waits until `deadline` for `stream` to have bytes and reads them into
/// `buf`: `Some(0)` is end of stream, `None` a timeout or an error.
pub async fn read_by(stream: &TcpStream, buf: &mut [u8], deadline: Instant) -> Option<usize> {
    let read = tokio::time::timeout_at(deadline, async {
        loop {
            stream.readable().await?;
            match stream.try_read(buf) {
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                r => return r,
            }
        }
    });
    read.await.ok()?.ok()
}

/// Writes all of `data` to `to`, waiting for writability (backpressure).
pub async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
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
    fn traffic_windows_tell_bulk_from_chatter() {
        let mut t = Traffic::default();
        // 64 small reads close a window as chatter, and a new one opens.
        for _ in 0..63 {
            assert_eq!(t.record(700), None);
        }
        assert_eq!(t.record(700), Some(Pace::Chatty));
        // 1 MiB in 16 full reads is bulk, whatever came before.
        for _ in 0..15 {
            assert_eq!(t.record(SCRATCH), None);
        }
        assert_eq!(t.record(SCRATCH), Some(Pace::Bulk));
        // One splice-in of 1 MiB is bulk on its own.
        assert_eq!(t.record(PIPE_SIZE), Some(Pace::Bulk));
        // 16 KiB a read on average is bulk, just under it chatter.
        for _ in 0..63 {
            assert_eq!(t.record(16 * 1024), None);
        }
        assert_eq!(t.record(16 * 1024), Some(Pace::Bulk));
        for _ in 0..63 {
            assert_eq!(t.record(16 * 1024 - 1), None);
        }
        assert_eq!(t.record(16 * 1024 - 1), Some(Pace::Chatty));
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
