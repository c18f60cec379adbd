//! The first exchange of a connection in `auto` and `http` mode.
//!
//! Until the backend sends its first byte, the client's bytes are forwarded
//! at once *and* held (up to 64 KiB) while they still look like HTTP. If the
//! backend then closes or resets without answering, and the held bytes are a
//! complete idempotent request (GET, HEAD, OPTIONS, PUT, DELETE, TRACE with
//! its whole body), the proxy may replay them to another backend. As soon as
//! one byte comes back, the exchange is over and nothing is ever replayed.
//! Server-speaks-first protocols see no delay: the greeting ends the phase.
//! So does a client whose bytes can no longer be replayed (not HTTP, or more
//! than 64 KiB): holding them is then useless, and the byte pump, which may
//! splice, takes over at once. An upload whose server answers only at the
//! end never waits in this phase.

use std::io;
use std::pin::Pin;

use tokio::net::TcpStream;
use tokio::time::Instant;

use tokio::io::AsyncWriteExt;

use crate::config::Timeouts;
use crate::conn::duplex::{forward, Step};
use crate::conn::http::{self, Sniff};
use crate::conn::watch::{Alarm, Watch};
use crate::io::read_by;

/// Most client bytes held for a replay.
pub const REPLAY_LIMIT: usize = 64 * 1024;

/// The client's bytes so far, while a replay is still possible.
#[derive(Debug, Default)]
pub struct Held {
    /// Everything the client sent, while `tracking`.
    bytes: Vec<u8>,
    /// False once the bytes are known not to be a replayable request.
    tracking: bool,
    /// The client's first bytes were seen to be an HTTP request line.
    http: bool,
    /// The client finished sending (FIN).
    pub client_done: bool,
}

impl Held {
    /// Nothing held yet; tracking.
    pub fn new() -> Self {
        Held { bytes: Vec::new(), tracking: true, http: false, client_done: false }
    }

    /// The bytes to replay.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Whether the client's first bytes are an HTTP request line.
    pub fn is_http(&self) -> bool {
        self.http
    }

    /// Whether the bytes so far could still be replayed: they look like
    /// HTTP (or might) and fit in [`REPLAY_LIMIT`].
    pub fn may_replay(&self) -> bool {
        self.tracking
    }

    /// Bytes the client sent before the exchange began (read to choose a
    /// route, and already sent), and whether its FIN came with them.
    pub fn preload(&mut self, bytes: &[u8], client_done: bool) {
        self.record(bytes);
        self.client_done = client_done;
    }

    fn record(&mut self, chunk: &[u8]) {
        if !self.tracking {
            return;
        }
        if self.bytes.len() + chunk.len() > REPLAY_LIMIT {
            self.stop_tracking();
            return;
        }
        // A first chunk is judged before it is copied: bytes that are
        // certainly not a request (a ClientHello, a Redis command) are
        // never held at all.
        let first = self.bytes.is_empty();
        if !first {
            self.bytes.extend_from_slice(chunk);
        }
        if !self.http {
            match http::sniff(if first { chunk } else { &self.bytes }) {
                Sniff::Http { .. } => self.http = true,
                Sniff::NotHttp => return self.stop_tracking(),
                Sniff::NeedMore => {}
            }
        }
        if first {
            self.bytes.extend_from_slice(chunk);
        }
    }

    fn stop_tracking(&mut self) {
        self.tracking = false;
        self.bytes = Vec::new();
    }

    /// Whether the held bytes are a complete idempotent request, body
    /// included, so that sending them again is safe.
    pub fn replayable(&self) -> bool {
        self.tracking && self.http && verdict(&self.bytes) == Verdict::Replay
    }

    /// After a backend closed early: reads more of the client's request (until
    /// `deadline`) when that could still make it replayable. Returns the bytes
    /// read, so that a caller that does not replay can still forward them.
    pub async fn complete_from(&mut self, client: &TcpStream, deadline: Instant) -> Vec<u8> {
        let mut extra = Vec::new();
        let mut chunk = vec![0u8; 16 * 1024];
        while self.tracking && !self.client_done && verdict(&self.bytes) == Verdict::NeedMore {
            match read_by(client, &mut chunk, deadline).await {
                Some(0) => self.client_done = true,
                Some(n) => {
                    extra.extend_from_slice(&chunk[..n]);
                    self.record(&chunk[..n]);
                }
                None => break,
            }
        }
        extra
    }
}

/// Whether held bytes may be sent again to another backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A complete idempotent request, body included (by Content-Length).
    Replay,
    /// Never: not HTTP, not idempotent, a chunked body, or a bad length.
    Never,
    /// The request is not complete yet.
    NeedMore,
}

/// Judges whether `buf` starts with a complete idempotent request whose body
/// is wholly in `buf`. Chunked bodies are never replayed.
pub fn verdict(buf: &[u8]) -> Verdict {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < REPLAY_LIMIT => return Verdict::NeedMore,
        _ => return Verdict::Never,
    };
    if !matches!(req.method, Some("GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE" | "TRACE")) {
        return Verdict::Never;
    }
    let mut body = 0usize;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Verdict::Never;
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            match std::str::from_utf8(h.value).ok().and_then(|v| v.trim().parse().ok()) {
                Some(n) => body = n,
                None => return Verdict::Never,
            }
        }
    }
    match head_len.checked_add(body) {
        Some(end) if end <= buf.len() => Verdict::Replay,
        Some(end) if end <= REPLAY_LIMIT => Verdict::NeedMore,
        _ => Verdict::Never,
    }
}

/// How the first exchange ended.
#[derive(Debug)]
pub enum FirstOutcome {
    /// The backend sent its first bytes; they were written to the client.
    /// `ended`: its FIN came with them (see [`Step::Moved`]), and is still
    /// to be passed on.
    Answered {
        /// The backend is at end of stream.
        ended: bool,
    },
    /// The backend closed or reset before sending a byte, while the client
    /// was still sending or waiting.
    ClosedEarly(Option<io::Error>),
    /// The backend closed or reset without a byte after the client had ended
    /// (its FIN was passed on). Closing is how many servers answer that (an
    /// aborted request, or a TCP probe that connects and hangs up): it says
    /// nothing about the backend, and a replay would be closed the same way.
    AfterClientEnd(Option<io::Error>),
    /// The client socket failed.
    ClientError(io::Error),
    /// Writing to the backend failed.
    BackendError(io::Error),
    /// The client's bytes can no longer be replayed (not HTTP, or past
    /// [`REPLAY_LIMIT`]); all of them were passed on, and the backend has
    /// not answered yet.
    NoReplay,
    /// Nothing moved for the idle timeout.
    IdleTimeout,
    /// The drain deadline passed.
    Shutdown,
}

impl FirstOutcome {
    /// The backend closed (`error`: reset) without answering.
    fn closed(held: &Held, error: Option<io::Error>) -> FirstOutcome {
        if held.client_done {
            FirstOutcome::AfterClientEnd(error)
        } else {
            FirstOutcome::ClosedEarly(error)
        }
    }
}

/// Bytes moved by the first exchange, and how it ended.
#[derive(Debug)]
pub struct Exchange {
    /// Client → backend bytes.
    pub sent: u64,
    /// Backend → client bytes.
    pub received: u64,
    /// How it ended.
    pub result: FirstOutcome,
}

/// Forwards client bytes to `backend` (holding them in `held`) until the
/// backend answers, closes, or something fails; `watch` keeps the idle (or
/// half-close) deadline and the drain.
pub async fn first_exchange(
    client: &mut TcpStream,
    backend: &mut TcpStream,
    held: &mut Held,
    timeouts: Timeouts,
    mut watch: Pin<&mut Watch<'_>>,
) -> Exchange {
    // From now: the idle timeout, or the half-close one once the client ended.
    let deadline = |held: &Held| {
        let limit = if held.client_done { timeouts.after_half_close() } else { timeouts.idle };
        limit.map(|d| Instant::now() + d)
    };
    let mut sent = 0u64;
    let (mut cr, mut cw) = client.split();
    let (mut br, mut bw) = backend.split();
    // Bytes a destination could not take at once (backpressure only).
    let (mut pending_up, mut pending_down) = (Vec::new(), Vec::new());
    watch.as_mut().set(deadline(held));
    let result = loop {
        tokio::select! {
            // The backend first: its answer ends the phase.
            biased;
            step = forward(&mut br, &mut cw, &mut pending_down, |_| {}) => match step {
                Step::Eof => break FirstOutcome::closed(held, None),
                Step::ReadError(e) => break FirstOutcome::closed(held, Some(e)),
                Step::WriteError(e) => break FirstOutcome::ClientError(e),
                Step::Moved { read, last, .. } => {
                    if let Err(e) = cw.write_all(&pending_down).await {
                        break FirstOutcome::ClientError(e);
                    }
                    let result = FirstOutcome::Answered { ended: last };
                    return Exchange { sent, received: read as u64, result };
                }
            },
            step = forward(&mut cr, &mut bw, &mut pending_up, |data| held.record(data)), if !held.client_done => match step {
                Step::Eof => {
                    held.client_done = true;
                    let _ = bw.shutdown().await;
                    watch.as_mut().set(deadline(held));
                }
                Step::ReadError(e) => break FirstOutcome::ClientError(e),
                Step::WriteError(e) => break FirstOutcome::BackendError(e),
                Step::Moved { read, last, .. } => {
                    if !pending_up.is_empty() {
                        if let Err(e) = bw.write_all(&pending_up).await {
                            break FirstOutcome::BackendError(e);
                        }
                        pending_up = Vec::new();
                    }
                    sent += read as u64;
                    if last {
                        held.client_done = true;
                        let _ = bw.shutdown().await;
                    }
                    if !held.may_replay() {
                        return Exchange { sent, received: 0, result: FirstOutcome::NoReplay };
                    }
                    watch.as_mut().set(deadline(held));
                }
            },
            alarm = watch.as_mut() => break match alarm {
                Alarm::Deadline => FirstOutcome::IdleTimeout,
                Alarm::Drain => FirstOutcome::Shutdown,
            },
        }
    };
    Exchange { sent, received: 0, result }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn idempotent_requests_with_whole_bodies_are_replayable() {
        use Verdict::*;
        assert_eq!(verdict(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"), Replay);
        assert_eq!(verdict(b"PUT /k HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"), Replay);
        assert_eq!(verdict(b"PUT /k HTTP/1.1\r\nContent-Length: 3\r\n\r\nab"), NeedMore);
        assert_eq!(verdict(b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n"), Never);
        assert_eq!(verdict(b"GET / HTTP/1.1\r\nHost: a\r\n"), NeedMore);
        let chunked = b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert_eq!(verdict(chunked), Never);
        assert_eq!(verdict(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n"), Never);
        assert_eq!(verdict(b"PUT / HTTP/1.1\r\nContent-Length: 999999\r\n\r\n"), Never);
        assert_eq!(verdict(b"\x16\x03\x01"), Never);
    }

    #[test]
    fn held_stops_tracking_non_http_and_oversized() {
        let mut h = Held::new();
        h.record(b"*1\r\n$4\r\nPING\r\n");
        assert!(!h.replayable() && h.bytes().is_empty());

        let mut h = Held::new();
        h.record(b"GET / HTTP/1.1\r\n");
        h.record(b"Host: a\r\n\r\n");
        assert!(h.is_http() && h.replayable());

        let mut h = Held::new();
        h.record(b"PUT / HTTP/1.1\r\nContent-Length: 70000\r\n\r\n");
        h.record(&vec![b'x'; 70000]);
        assert!(!h.replayable());
    }

    proptest! {
        #[test]
        fn replay_check_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = verdict(&bytes);
            let mut h = Held::new();
            h.record(&bytes);
            let _ = h.replayable();
        }
    }
}
