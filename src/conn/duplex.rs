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
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::config::{SpliceMode, Timeouts};
use crate::conn::pipe::{Pipe, PIPE_SIZE};
use crate::conn::watch::{Alarm, Watch};
use crate::io::{read_some, reset_on_close, with_scratch, SCRATCH};

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
}

/// Which ends of a connection finished before the byte pump took it over.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ended {
    /// The client's FIN was already passed on to the backend.
    pub client: bool,
    /// The backend's FIN came in with the last bytes already passed on to
    /// the client, and is still to be passed on.
    pub backend: bool,
}

/// How the connection stands when the byte pump takes it over.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Opening {
    /// Which ends finished already.
    pub ended: Ended,
    /// The client opened with a TLS ClientHello, so the backend's first
    /// bytes are its handshake: a few KiB, never a bulk response.
    pub tls: bool,
}

/// Copies bytes both ways until both directions end, one fails, nothing
/// moves for the idle (or half-close) timeout, or the drain deadline passes
/// (both kept by `watch`).
///
/// `totals` (client→backend, backend→client) are bumped as bytes move, so
/// long-lived connections show up in metrics before they end.
/// `opening` says which ends the first exchange already saw finish.
pub async fn splice(
    client: &mut TcpStream,
    backend: &mut TcpStream,
    timeouts: Timeouts,
    mut watch: Pin<&mut Watch<'_>>,
    totals: (&AtomicU64, &AtomicU64),
    opening: Opening,
    mode: SpliceMode,
) -> Outcome {
    let Opening { ended, tls } = opening;
    let activity = Activity::new(u8::from(ended.client));
    let sent = AtomicU64::new(0);
    let received = AtomicU64::new(0);
    // Whether a direction sent bytes with MSG_MORE (its last, with the FIN
    // to follow) to the client, or to the backend: only then may a reset
    // of that socket have bytes to push out first. The first exchange's
    // did so to the client when the backend's FIN came with its bytes.
    let corked = (AtomicBool::new(ended.backend), AtomicBool::new(false));
    let (mut cr, mut cw) = client.split();
    let (mut br, mut bw) = backend.split();
    let (end, error) = {
        let to_backend = Dest { counters: [&sent, totals.0], corked: &corked.1 };
        let up = pump(&mut cr, &mut bw, to_backend, &activity, mode, Start::Request);
        let down_start = match (ended.backend, tls) {
            (true, _) => Start::AtEof,
            (false, true) => Start::Handshake,
            (false, false) => Start::Response,
        };
        let to_client = Dest { counters: [&received, totals.1], corked: &corked.0 };
        let down = pump(&mut br, &mut cw, to_client, &activity, mode, down_start);
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (ended.client, false);
        loop {
            let half_closed = up_done || down_done;
            let limit = if half_closed { timeouts.after_half_close() } else { timeouts.idle };
            // The pumps move bytes without coming back here, so the
            // deadline is set from the last byte moved, and checked again
            // when it passes.
            watch.as_mut().set(limit.map(|limit| activity.last() + limit));
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
                alarm = watch.as_mut() => match alarm {
                    Alarm::Drain => break (End::Shutdown, None),
                    Alarm::Deadline if limit.is_some_and(|l| Instant::now() >= activity.last() + l) => {
                        break (if half_closed { End::HalfCloseTimeout } else { End::IdleTimeout }, None)
                    }
                    // Bytes moved since: wait for the deadline they set.
                    Alarm::Deadline => {}
                },
            }
        }
    };
    match end {
        // Tell the surviving side that its peer failed rather than finished.
        End::ClientError => reset_on_close(bw.as_ref(), corked.1.load(Ordering::Relaxed)),
        End::BackendError => reset_on_close(cw.as_ref(), corked.0.load(Ordering::Relaxed)),
        _ => {}
    }
    Outcome {
        sent: sent.load(Ordering::Relaxed),
        received: received.load(Ordering::Relaxed),
        end,
        error,
    }
}

/// What a direction of the pump keeps about its destination.
struct Dest<'a> {
    /// Bumped by the bytes written: the connection's, then the backend's.
    counters: [&'a AtomicU64; 2],
    /// Set once bytes went out with MSG_MORE (a reset must push them first).
    corked: &'a AtomicBool,
}

/// Copies `from` → `to` until EOF, then shuts down `to`'s write half
/// (unless the other direction has ended too: then close() sends the FIN).
/// With splice(2) allowed, a bulk direction moves to a pipe (zero copy).
async fn pump(
    from: &mut ReadHalf<'_>,
    to: &mut WriteHalf<'_>,
    dest: Dest<'_>,
    activity: &Activity,
    mut mode: SpliceMode,
    start: Start,
) -> Result<(), Fault> {
    // Bytes read but not yet written: only ever non-empty under backpressure.
    let mut pending: Vec<u8> = Vec::new();
    // Recent read sizes, for `auto` to tell bulk data from chatter.
    let mut traffic = Traffic::default();
    // Whether this direction forwards with splice(2): `on` from the first
    // byte, `auto` once it turns out to carry bulk data.
    let mut splicing = mode == SpliceMode::On;
    match start {
        Start::AtEof => {}
        Start::Response if mode == SpliceMode::Auto && from.as_ref().readable().await.is_ok() => {
            // A first response of 64 KiB or more already waiting in full:
            // splice it from its first byte instead of copying 64 KiB
            // first. One ioctl.
            splicing = burst(from);
        }
        Start::Response | Start::Request | Start::Handshake => {}
    }
    // Set once the source's end of stream is known without a read of its own.
    let mut ended = start == Start::AtEof;
    while !ended {
        if splicing {
            let auto = (mode == SpliceMode::Auto).then_some(&mut traffic);
            let spliced = splice_loop(from.as_ref(), to.as_ref(), dest.counters, activity, auto);
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
        let (read, written, last) = match forward(from, to, &mut pending, |_| {}).await {
            Step::Eof => break,
            Step::ReadError(e) => return Err(Fault::Read(e)),
            Step::WriteError(e) => return Err(Fault::Write(e)),
            Step::Moved { read, written, last } => (read, written, last),
        };
        if last {
            // forward() sent them with MSG_MORE.
            dest.corked.store(true, Ordering::Relaxed);
        }
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
        for c in dest.counters {
            c.fetch_add(moved, Ordering::Relaxed);
        }
        ended = last;
        // A bulk transfer: worth a pipe.
        splicing = !last
            && mode == SpliceMode::Auto
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

/// How a direction of the pump begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// Backend to client: a first message of 64 KiB or more (a download, a
    /// large response on a new connection) is common enough to look for
    /// before the first read.
    Response,
    /// Client to backend: requests are small; an upload is recognized after
    /// its first full read instead, which spares every other connection the
    /// ioctl.
    Request,
    /// Backend to client after a TLS ClientHello: its first bytes are the
    /// server's handshake, so the look for a first bulk response would
    /// always find too little; a download is recognized after its first
    /// full read, as an upload is.
    Handshake,
    /// The source's end of stream is known already (it came with the last
    /// bytes the first exchange read): only the FIN is left to pass on.
    AtEof,
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
/// copy.) It costs one ioctl, and pays off for responses of 64 KiB and up on
/// new connections without slowing small ones (docs/benchmarks.md, "Profiles
/// and what changed because of them").
fn burst(from: &ReadHalf<'_>) -> bool {
    rustix::io::ioctl_fionread(from.as_ref()).is_ok_and(|queued| queued >= SCRATCH as u64)
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
        crate::stats::SPLICED_BYTES.fetch_add(n as u64, Ordering::Relaxed);
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
        /// The source's FIN had arrived before these bytes were read, and
        /// they were all it held: the source is at end of stream, and no
        /// read is needed to learn it.
        last: bool,
    },
}

/// Waits until `from` has bytes (or EOF), reads them (up to 64 KiB) into the
/// thread's scratch buffer and writes them to `to` at once; whatever `to`
/// does not take is appended to `pending` for the caller to write. `inspect`
/// sees the bytes read.
///
/// The readiness the reactor reported is taken before the read: when it
/// already said the peer's FIN is in ("read closed", and no error: a reset
/// must still be read as one), a read that leaves the socket empty took
/// the last bytes before that FIN, and [`Step::Moved`] says so (`last`),
/// which saves the read that would only return 0 (HAProxy reads the end of
/// a stream from EPOLLRDHUP the same way). A response and its FIN usually
/// arrive together, on a new connection as on one that closes after a
/// request.
pub async fn forward(
    from: &mut ReadHalf<'_>,
    to: &mut WriteHalf<'_>,
    pending: &mut Vec<u8>,
    mut inspect: impl FnMut(&[u8]),
) -> Step {
    let (src, dst): (&TcpStream, &TcpStream) = (from.as_ref(), to.as_ref());
    loop {
        // ERROR with READABLE: the same wait (a socket with an error is
        // readable anyway, as the read returns the error or, once that was
        // taken, 0), and the answer says whether a reset came with the FIN,
        // which looking separately would cost a waiter registered and
        // removed again. The readiness cannot change between this wait and
        // the read: the reactor turns on this thread, between polls.
        let ready = match src.ready(Interest::READABLE | Interest::ERROR).await {
            Ok(ready) => ready,
            Err(e) => return Step::ReadError(e),
        };
        let step = with_scratch(|buf| {
            let read = match read_some(src, buf) {
                Ok(Some(0)) => return Some(Step::Eof),
                Ok(Some(n)) => n,
                // The error readiness is never cleared: were there nothing
                // to read and no error to take, the wait would return at
                // once forever. A socket that reported an error ends here.
                Ok(None) if ready.is_error() => {
                    let e = src.take_error().ok().flatten();
                    return Some(Step::ReadError(e.unwrap_or_else(|| {
                        io::Error::new(io::ErrorKind::ConnectionReset, "socket error")
                    })));
                }
                Ok(None) => return None,
                Err(e) => return Some(Step::ReadError(e)),
            };
            let data = &buf[..read];
            inspect(data);
            let last = read < buf.len() && ready.is_read_closed() && !ready.is_error();
            // With the FIN to follow at once (the caller's shutdown, or the
            // close), MSG_MORE lets the kernel put these bytes and the FIN
            // into one segment instead of two.
            let sent = if !pending.is_empty() {
                Ok(0)
            } else if last {
                send_more(dst, data)
            } else {
                dst.try_write(data)
            };
            let written = match sent {
                Ok(w) => w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => return Some(Step::WriteError(e)),
            };
            pending.extend_from_slice(&data[written..]);
            Some(Step::Moved { read, written, last })
        });
        if let Some(step) = step {
            return step;
        }
    }
}

/// Writes what `to` takes now with MSG_MORE (the kernel holds the bytes
/// back for what follows: here, the FIN); WouldBlock when it takes nothing.
fn send_more(to: &TcpStream, data: &[u8]) -> io::Result<usize> {
    use rustix::net::{send, SendFlags};
    to.try_io(Interest::WRITABLE, || {
        send(to, data, SendFlags::MORE | SendFlags::NOSIGNAL).map_err(io::Error::from)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// Two connected loopback sockets: (ours, the peer's).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        (l.accept().await.unwrap().0, peer)
    }

    /// Lets the reactor see everything the peers sent (their FIN or reset).
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    #[tokio::test]
    async fn bytes_that_came_with_the_fin_are_the_last_and_reach_the_destination() {
        let (mut src, mut peer) = pair().await;
        let (mut dst, mut sink) = pair().await;
        peer.write_all(b"response").await.unwrap();
        peer.shutdown().await.unwrap();
        settle().await;
        let (mut from, _) = src.split();
        let (_, mut to) = dst.split();
        let mut pending = Vec::new();
        match forward(&mut from, &mut to, &mut pending, |_| {}).await {
            Step::Moved { read: 8, written: 8, last: true } => {}
            other => panic!("expected the last 8 bytes, got {other:?}"),
        }
        let mut got = [0u8; 8];
        sink.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"response");
    }

    #[tokio::test]
    async fn bytes_without_a_fin_behind_them_are_not_the_last() {
        let (mut src, mut peer) = pair().await;
        let (mut dst, _sink) = pair().await;
        peer.write_all(b"request").await.unwrap();
        settle().await;
        let (mut from, _) = src.split();
        let (_, mut to) = dst.split();
        let mut pending = Vec::new();
        let step = forward(&mut from, &mut to, &mut pending, |_| {}).await;
        assert!(matches!(step, Step::Moved { read: 7, last: false, .. }), "{step:?}");
        // The FIN on its own is read as the end of stream.
        peer.shutdown().await.unwrap();
        let step = forward(&mut from, &mut to, &mut pending, |_| {}).await;
        assert!(matches!(step, Step::Eof), "{step:?}");
    }

    #[tokio::test]
    async fn a_reset_after_the_last_bytes_is_still_read_as_a_reset() {
        let (mut src, peer) = pair().await;
        let (mut dst, _sink) = pair().await;
        peer.try_write(b"partial").unwrap();
        settle().await;
        reset_on_close(&peer, true);
        drop(peer);
        settle().await;
        let (mut from, _) = src.split();
        let (_, mut to) = dst.split();
        let mut pending = Vec::new();
        loop {
            match forward(&mut from, &mut to, &mut pending, |_| {}).await {
                Step::Moved { last: false, .. } => {}
                Step::ReadError(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
                    break;
                }
                other => panic!("a reset must stay a reset, got {other:?}"),
            }
        }
    }

    /// Runs the pump over `client` and `backend` (tcplb's sockets) until it ends.
    async fn run(client: &mut TcpStream, backend: &mut TcpStream, ended: Ended) -> Outcome {
        let token = tokio_util::sync::CancellationToken::new();
        let watch = std::pin::pin!(Watch::new(&token));
        let timeouts = Timeouts { idle: Some(Duration::from_secs(5)), half_close: None };
        let totals = (AtomicU64::new(0), AtomicU64::new(0));
        let totals = (&totals.0, &totals.1);
        let opening = Opening { ended, tls: false };
        splice(client, backend, timeouts, watch, totals, opening, SpliceMode::Off).await
    }

    /// Resets `s`: its peer's next read fails.
    fn reset(s: TcpStream) {
        socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
        drop(s);
    }

    #[tokio::test]
    async fn a_reset_is_passed_on_without_a_push_when_nothing_was_held_back() {
        let (mut client, peer) = pair().await;
        let (mut backend, mut server) = pair().await;
        peer.try_write(b"last words").unwrap();
        settle().await;
        reset(peer);
        let out = run(&mut client, &mut backend, Ended::default()).await;
        assert_eq!(out.end, End::ClientError);
        // Nothing went to the backend with MSG_MORE: no TCP_NODELAY to push it.
        assert!(!backend.nodelay().unwrap());
        drop(backend);
        let mut got = Vec::new();
        let err = server.read_to_end(&mut got).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(got, b"last words");
    }

    #[tokio::test]
    async fn a_reset_pushes_out_what_msg_more_may_hold_back() {
        let (mut client, peer) = pair().await;
        let (mut backend, mut server) = pair().await;
        // The backend's last bytes and FIN: the pump sends them to the
        // client with MSG_MORE. Then the backend resets, and the client's
        // next bytes cannot be written to it.
        server.write_all(b"bye").await.unwrap();
        server.shutdown().await.unwrap();
        settle().await;
        let pump = tokio::spawn(async move {
            let out = run(&mut client, &mut backend, Ended::default()).await;
            (out, client.nodelay().unwrap())
        });
        settle().await;
        reset(server);
        settle().await;
        let mut peer = peer;
        let _ = peer.write_all(b"more").await;
        let (out, pushed) = pump.await.unwrap();
        assert_eq!(out.end, End::BackendError);
        assert!(pushed, "bytes sent with MSG_MORE are pushed out before the reset");
        let mut got = Vec::new();
        let _ = peer.read_to_end(&mut got).await;
        assert_eq!(got, b"bye");
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
}
