//! One client connection, from accept to its access-log event, in the order
//! it travels: [admit](Connection::admit) (PROXY header, allow/deny),
//! [connect](Connection::connect) (candidates and retry), the
//! [first exchange](Connection::first_exchange) (and a replay when a backend
//! hangs up before answering), [splice](Connection::splice), and
//! [the access log](Connection::log). Each phase either hands the next one
//! what it needs or ends the connection with an [`Ending`]; the bytes and
//! the backend are tallied on the [`Connection`] itself.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::Protocol;
use crate::conn::access;
use crate::conn::connect::{connect, BackendConn, Endpoints, NotConnected};
use crate::conn::duplex::{self, End, Ended, Opening};
use crate::conn::http::{self, Peek, Status};
use crate::conn::proxy_protocol;
use crate::conn::replay::{self, FirstOutcome, Held};
use crate::conn::route;
use crate::conn::watch::Watch;
use crate::io::{describe_io, reset_on_close, write_all};
use crate::stats::Throttle;
use crate::upstream::clients::{Admission, Refusal};
use crate::upstream::{Candidates, Service, Snapshot};

/// Bad PROXY headers: anyone who can connect can send them.
static BAD_PROXY_HEADER: Throttle = Throttle::new();
/// Peers not trusted to send a PROXY header.
static UNTRUSTED_PEER: Throttle = Throttle::new();
/// Clients over a share limit: one client may open thousands a second.
static OVER_LIMIT: Throttle = Throttle::new();

/// Serves one client connection to its end, then writes its access-log event.
pub async fn serve(
    svc: Arc<Service>,
    client: TcpStream,
    peer: SocketAddr,
    cancel: CancellationToken,
) {
    let started = Instant::now();
    let snap = svc.snapshot();
    let destination =
        if snap.needs_destination { client.local_addr().unwrap_or(peer) } else { peer };
    let mut conn = Connection {
        svc: &svc,
        snap: &snap,
        client,
        peer,
        ends: Endpoints { client: peer, destination },
        cancel: &cancel,
        started,
        backend: None,
        sent: 0,
        received: 0,
        routed: None,
        admission: None,
    };
    if let Err(ending) = conn.admit().await {
        return conn.log(ending);
    }
    let mut watch = std::pin::pin!(Watch::new(&cancel));
    if !snap.config.routes.is_empty() {
        // Boxed: a connection without routes carries none of this state.
        return Box::pin(serve_routed(conn, watch)).await;
    }
    let ending = conn.run(watch.as_mut()).await;
    conn.log(ending);
}

/// The rest of [`serve`] on a listener with routes.
async fn serve_routed(mut conn: Connection<'_>, mut watch: Pin<&mut Watch<'_>>) {
    let routes = conn.svc.routes();
    match conn.route(&routes, watch.as_mut()).await {
        Err(ending) => conn.log(ending),
        Ok(None) => {
            let ending = conn.run(watch).await;
            conn.log(ending);
        }
        Ok(Some(route)) => {
            let route_snap = route.snapshot();
            let mut conn = conn.rebind(route, &route_snap);
            let ending = conn.run(watch).await;
            conn.log(ending);
        }
    }
}

/// A client connection on its way through the proxy, and its tally so far.
struct Connection<'a> {
    /// The listener, or the route it was sent to.
    svc: &'a Arc<Service>,
    /// Its settings and pool when the connection arrived (or was routed);
    /// kept to its end, so that a reload never changes a connection midway.
    snap: &'a Snapshot,
    /// The client's socket.
    client: TcpStream,
    /// The address the connection came from (a proxy in front, with
    /// `accept_proxy`).
    peer: SocketAddr,
    /// Who it is from and to (after a PROXY header, as the header says).
    ends: Endpoints,
    /// Cancelled at the drain deadline.
    cancel: &'a CancellationToken,
    /// When it was accepted.
    started: Instant,
    /// The backend it is (or was last) connected to.
    backend: Option<SocketAddr>,
    /// Client → backend bytes.
    sent: u64,
    /// Backend → client bytes.
    received: u64,
    /// On a listener with routes: where the route phase sent it, and what
    /// it read there (boxed: one pointer for connections without routes).
    routed: Option<Box<Routed>>,
    /// Its place under the listener's share limits, given back at its end.
    admission: Option<Box<Admission>>,
}

/// What choosing a route read and found.
struct Routed {
    /// The listener's name (the service is the route's), for the log.
    listener: Arc<str>,
    /// Client bytes read to choose, not yet sent to a backend.
    early: Vec<u8>,
    /// The client half-closed while being read.
    client_ended: bool,
    /// The route's name, or `default`.
    route: String,
    /// The TLS server name.
    sni: Option<String>,
    /// The TLS ALPN protocols offered.
    alpn: Option<String>,
    /// It opened with a whole TLS ClientHello.
    tls: bool,
}

/// Why a connection ended, for the access log.
struct Ending {
    /// A short name (`client closed`, `denied`, `answered 503` ...).
    end: &'static str,
    /// The socket error, if any.
    error: Option<io::Error>,
}

impl Ending {
    fn new(end: &'static str) -> Self {
        Ending { end, error: None }
    }

    fn with_error(end: &'static str, error: Option<io::Error>) -> Self {
        Ending { end, error }
    }
}

/// What the first exchange hands on to the splice.
struct Established {
    /// The backend the bytes go to.
    up: BackendConn,
    /// Which ends finished during the first exchange.
    ended: Ended,
    /// The backend has not answered yet, and its hanging up before it does
    /// counts against its health (the first exchange ended early because
    /// the client's bytes could not be replayed anyway).
    awaiting_answer: bool,
}

impl<'a> Connection<'a> {
    /// The phases after admission (and the route), until one ends the
    /// connection.
    async fn run(&mut self, mut watch: Pin<&mut Watch<'_>>) -> Ending {
        let snap = self.snap;
        let mut candidates = snap.pool.candidates(self.ends.client, snap.config.connect_attempts);
        self.svc.note_panic(candidates.is_panic());
        let up = match self.connect(&mut candidates, watch.as_mut()).await {
            Ok(up) => up,
            Err(ending) => return ending,
        };
        if self.routed.is_some() {
            // Boxed: a connection without routes carries none of its state.
            if let Err(ending) = Box::pin(self.send_early(&up)).await {
                return ending;
            }
        }
        let established = if snap.config.protocol == Protocol::Tcp {
            let client = self.routed.as_ref().is_some_and(|r| r.client_ended);
            Established { up, ended: Ended { client, backend: false }, awaiting_answer: false }
        } else {
            match self.first_exchange(up, &mut candidates, watch.as_mut()).await {
                Ok(established) => established,
                Err(ending) => return ending,
            }
        };
        self.splice(established, watch).await
    }

    /// Reads the PROXY header when the listener expects one, then applies
    /// allow/deny to the client it names.
    async fn admit(&mut self) -> Result<(), Ending> {
        let (svc, cfg) = (self.svc, &self.snap.config);
        if cfg.accept_proxy && !cfg.trusts_proxy_header_from(self.peer.ip()) {
            svc.stats.denied.fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = UNTRUSTED_PEER.allow() {
                warn!(listener = %svc.name, peer = %self.peer, suppressed, "closing connection: peer not trusted to send a PROXY header (accept_proxy_from)");
            }
            return Err(Ending::new("untrusted PROXY peer"));
        }
        if cfg.accept_proxy {
            let deadline = Instant::now() + cfg.proxy_header_timeout;
            let header = tokio::select! {
                h = proxy_protocol::read_header(&self.client, deadline) => h,
                _ = self.cancel.cancelled() => return Err(Ending::new("shutdown")),
            };
            match header {
                Ok(h) => {
                    self.ends.client = h.source.unwrap_or(self.ends.client);
                    self.ends.destination = h.destination.unwrap_or(self.ends.destination);
                }
                Err(e) => {
                    if let Some(suppressed) = BAD_PROXY_HEADER.allow() {
                        warn!(listener = %svc.name, client = %self.ends.client, error = %e, suppressed, "closing connection: bad PROXY header");
                    }
                    return Err(Ending::with_error("bad PROXY header", Some(e)));
                }
            }
        }
        if !cfg.admits(self.ends.client.ip()) {
            svc.stats.denied.fetch_add(1, Ordering::Relaxed);
            debug!(listener = %svc.name, client = %self.ends.client, "client denied by allow/deny rules");
            return Err(Ending::new("denied"));
        }
        let limits = cfg.client_limits();
        if limits.any() {
            let now = std::time::Instant::now();
            match svc.clients.admit(self.ends.client.ip(), &limits, now) {
                Ok(admission) => self.admission = Some(Box::new(admission)),
                Err(why) => {
                    if let Some(suppressed) = OVER_LIMIT.allow() {
                        warn!(listener = %svc.name, client = %self.ends.client, limit = why.as_str(), suppressed, "closing connection: over its share limit");
                    }
                    return Err(Ending::new(match why {
                        Refusal::Listener => "listener full",
                        Refusal::ClientConnections => "client connection limit",
                        Refusal::ClientRate => "client rate limit",
                    }));
                }
            }
        }
        Ok(())
    }

    /// Reads the client's first bytes (a TLS ClientHello, an HTTP request
    /// head) and picks one of `routes` by them; None: the listener's own
    /// upstreams, the default pool. With no route matched and no default
    /// pool, an HTTP client is answered 503 and anything else closed.
    async fn route<'r>(
        &mut self,
        routes: &'r [Arc<Service>],
        mut watch: Pin<&mut Watch<'_>>,
    ) -> Result<Option<&'r Arc<Service>>, Ending> {
        let (svc, cfg) = (self.svc, &self.snap.config);
        watch.as_mut().set(Some(Instant::now() + cfg.peek_timeout));
        let mut early = Vec::new();
        let choice = route::choose(&self.client, &cfg.routes, &mut early, watch).await;
        let Some(choice) = choice else { return Err(Ending::new("shutdown")) };
        let target = choice.route.and_then(|i| Some((&cfg.routes.get(i)?.name, routes.get(i)?)));
        self.routed = Some(Box::new(Routed {
            listener: Arc::clone(&svc.name),
            early,
            client_ended: choice.ended,
            route: target.map_or_else(|| "default".to_string(), |(name, _)| name.clone()),
            sni: choice.sni,
            alpn: choice.alpn,
            tls: choice.tls,
        }));
        match target {
            Some((_, route)) => {
                route.stats.routed.fetch_add(1, Ordering::Relaxed);
                Ok(Some(route))
            }
            None if cfg.upstreams.is_empty() => {
                svc.stats.unrouted.fetch_add(1, Ordering::Relaxed);
                debug!(listener = %svc.name, client = %self.ends.client, host = ?choice.host, "no route matched and no default pool");
                let answered = self.answer_failure(Status::ServiceUnavailable).await;
                Err(Ending::new(answered.map_or("no route", Status::end)))
            }
            None => {
                svc.stats.routed.fetch_add(1, Ordering::Relaxed);
                Ok(None)
            }
        }
    }

    /// The same connection, handed to the service of the route it takes.
    fn rebind<'b>(self, svc: &'b Arc<Service>, snap: &'b Snapshot) -> Connection<'b>
    where
        'a: 'b,
    {
        Connection { svc, snap, ..self }
    }

    /// Sends the bytes read to choose a route to the backend it chose, those
    /// that did not go with the connect (and the client's FIN, if it came).
    async fn send_early(&mut self, up: &BackendConn) -> Result<(), Ending> {
        let Some(routed) = &self.routed else { return Ok(()) };
        if !routed.early.is_empty() {
            let rest = routed.early.get(up.sent_first..).unwrap_or_default();
            if let Err(e) = write_all(&up.stream, rest).await {
                reset_on_close(&self.client, true);
                return Err(Ending::with_error("backend error", Some(e)));
            }
            let n = routed.early.len() as u64;
            up.backend.byte_counters().0.fetch_add(n, Ordering::Relaxed);
            self.sent += n;
        }
        if routed.client_ended {
            let _ = socket2::SockRef::from(&up.stream).shutdown(std::net::Shutdown::Write);
        }
        Ok(())
    }

    /// Connects to the first candidate that accepts; when none does, answers
    /// an HTTP client with 502/503/504 and closes anything else.
    async fn connect(
        &mut self,
        candidates: &mut Candidates<'_>,
        watch: Pin<&mut Watch<'_>>,
    ) -> Result<BackendConn, Ending> {
        let first = self.routed.as_ref().map_or(&[][..], |r| &r.early[..]);
        match connect(self.svc, self.snap, candidates, self.ends, first, watch).await {
            Ok(up) => {
                self.svc.stats.connect_duration.observe(self.started.elapsed());
                self.backend = Some(up.backend.addr);
                Ok(up)
            }
            Err(NotConnected::Failed(status)) => {
                let answered = self.answer_failure(status).await;
                Err(Ending::new(answered.map_or("no backend", Status::end)))
            }
            Err(NotConnected::Drained) => Err(Ending::new("shutdown")),
        }
    }

    /// `auto` and `http` mode: forwards the client's bytes until the backend
    /// answers, holding them while they could still be replayed. A backend
    /// that hangs up first gets the request replayed to the next candidate,
    /// when it is a complete idempotent one.
    async fn first_exchange(
        &mut self,
        mut up: BackendConn,
        candidates: &mut Candidates<'_>,
        mut watch: Pin<&mut Watch<'_>>,
    ) -> Result<Established, Ending> {
        let timeouts = self.snap.config.timeouts();
        let mut held = Held::new();
        if let Some(routed) = &mut self.routed {
            // What choosing the route read was sent already: held for a
            // replay, unless it cannot be one (a ClientHello).
            held.preload(&std::mem::take(&mut routed.early), routed.client_ended);
            if !held.may_replay() {
                let ended = Ended { client: held.client_done, backend: false };
                return Ok(Established { up, ended, awaiting_answer: true });
            }
        }
        loop {
            let exchange = replay::first_exchange(
                &mut self.client,
                &mut up.stream,
                &mut held,
                timeouts,
                watch.as_mut(),
            )
            .await;
            let (bs, br) = up.backend.byte_counters();
            bs.fetch_add(exchange.sent, Ordering::Relaxed);
            br.fetch_add(exchange.received, Ordering::Relaxed);
            self.sent += exchange.sent;
            self.received += exchange.received;
            match exchange.result {
                FirstOutcome::Answered { ended } => {
                    if self.snap.passive_health() {
                        up.backend.health.observe_success_streak_reset();
                    }
                    return Ok(Established {
                        up,
                        ended: Ended { client: held.client_done, backend: ended },
                        awaiting_answer: false,
                    });
                }
                FirstOutcome::NoReplay => {
                    return Ok(Established {
                        up,
                        ended: Ended { client: held.client_done, backend: false },
                        awaiting_answer: true,
                    })
                }
                FirstOutcome::ClosedEarly(error) => {
                    let next =
                        self.after_early_close(&up, &mut held, candidates, error, watch.as_mut());
                    match next.await? {
                        AfterClose::SpliceOn => {
                            let ended = Ended { client: held.client_done, backend: false };
                            return Ok(Established { up, ended, awaiting_answer: false });
                        }
                        AfterClose::Replayed(next) => {
                            self.backend = Some(next.backend.addr);
                            up = next;
                        }
                        // The replay could not be written: the old backend's
                        // next exchange ends at once and the next candidate
                        // is tried.
                        AfterClose::Retry => {}
                    }
                }
                FirstOutcome::AfterClientEnd(error) => {
                    return Err(Ending::with_error("client closed", error))
                }
                FirstOutcome::BackendError(e) => {
                    reset_on_close(&self.client, true);
                    return Err(Ending::with_error("backend error", Some(e)));
                }
                FirstOutcome::ClientError(e) => {
                    reset_on_close(&up.stream, true);
                    return Err(Ending::with_error("client error", Some(e)));
                }
                FirstOutcome::IdleTimeout => return Err(Ending::new("idle timeout")),
                FirstOutcome::Shutdown => return Err(Ending::new("shutdown")),
            }
        }
    }

    /// The backend `up` closed before answering: counts it against its
    /// health, then replays the request to the next candidate, answers 502,
    /// or (for bytes that are not HTTP) splices on so the close reaches the client.
    async fn after_early_close(
        &mut self,
        up: &BackendConn,
        held: &mut Held,
        candidates: &mut Candidates<'_>,
        error: Option<io::Error>,
        watch: Pin<&mut Watch<'_>>,
    ) -> Result<AfterClose, Ending> {
        let (svc, snap) = (self.svc, self.snap);
        let reason = error.as_ref().map_or_else(|| "closed before answering".into(), describe_io);
        debug!(listener = %svc.name, client = %self.ends.client, backend = %up.backend.addr, %reason, "backend closed early");
        if snap.passive_health() {
            snap.record_passive_failure(&up.backend, &svc.name, &reason);
        }
        // The backend may have closed before the client said anything:
        // read enough of the request to judge it.
        let extra =
            held.complete_from(&self.client, Instant::now() + snap.config.peek_timeout).await;
        if !held.is_http() {
            if error.is_some() {
                // Reset: the client must see a reset too, never a clean end
                // of stream that reads as a complete, empty answer.
                reset_on_close(&self.client, true);
                return Err(Ending::with_error("backend error", error));
            }
            // Not ours to judge: forward what was read, splice on, and the
            // end of stream propagates.
            let _ = write_all(&up.stream, &extra).await;
            if held.client_done {
                let _ = socket2::SockRef::from(&up.stream).shutdown(std::net::Shutdown::Write);
            }
            return Ok(AfterClose::SpliceOn);
        }
        if !held.replayable() {
            self.respond(Status::BadGateway).await;
            return Err(Ending::with_error("502 after early close", error));
        }
        let next = match connect(svc, snap, candidates, self.ends, held.bytes(), watch).await {
            Ok(next) => next,
            Err(NotConnected::Failed(status)) => {
                self.respond(status).await;
                return Err(Ending::new(status.end()));
            }
            Err(NotConnected::Drained) => return Err(Ending::new("shutdown")),
        };
        debug!(listener = %svc.name, client = %self.ends.client, backend = %next.backend.addr, bytes = held.bytes().len(), "replaying request");
        let rest = held.bytes().get(next.sent_first..).unwrap_or_default();
        if write_all(&next.stream, rest).await.is_err() {
            return Ok(AfterClose::Retry);
        }
        if held.client_done {
            let _ = socket2::SockRef::from(&next.stream).shutdown(std::net::Shutdown::Write);
        }
        Ok(AfterClose::Replayed(next))
    }

    /// Copies bytes both ways until both directions end.
    async fn splice(&mut self, established: Established, watch: Pin<&mut Watch<'_>>) -> Ending {
        let Established { mut up, ended, awaiting_answer } = established;
        let cfg = &self.snap.config;
        let outcome = duplex::splice(
            &mut self.client,
            &mut up.stream,
            cfg.timeouts(),
            watch,
            up.backend.byte_counters(),
            Opening { ended, tls: self.routed.as_ref().is_some_and(|r| r.tls) },
            cfg.splice,
        )
        .await;
        self.backend = Some(up.backend.addr);
        self.sent += outcome.sent;
        self.received += outcome.received;
        // Hung up (or reset) while the client was still sending, without a
        // byte back: what the first exchange calls closing early.
        let hung_up = matches!(outcome.end, End::BackendClosed | End::BackendError);
        if awaiting_answer && hung_up && self.received == 0 && self.snap.passive_health() {
            let reason = outcome
                .error
                .as_ref()
                .map_or_else(|| "closed before answering".into(), describe_io);
            self.snap.record_passive_failure(&up.backend, &self.svc.name, &reason);
        }
        Ending::with_error(outcome.end.as_str(), outcome.error)
    }

    /// No backend could be reached: answers an HTTP client, closes anything
    /// else. Returns the status that went out, if one did.
    async fn answer_failure(&self, status: Status) -> Option<Status> {
        let (svc, peer) = (self.svc, self.ends.client);
        debug!(listener = %svc.name, client = %peer, status = status.code(), "no backend reachable");
        let protocol = self.snap.config.protocol;
        if protocol == Protocol::Tcp {
            return None;
        }
        let deadline = Instant::now() + self.snap.config.peek_timeout;
        let answer = async {
            // In http mode the service is known to speak HTTP: a partial
            // request line gets the answer too, a client that sent nothing a
            // 408, and only bytes that are certainly something else a plain
            // close. In auto mode only a whole request line proves HTTP.
            let (status, head) =
                match http::sniff_client(&self.client, self.early(), deadline).await {
                    Peek::Http { head } => (status, head),
                    Peek::Partial if protocol == Protocol::Http => (status, false),
                    Peek::Silent if protocol == Protocol::Http => (Status::RequestTimeout, false),
                    _ => return None,
                };
            svc.stats.record_synthesized(status.code());
            if let Err(e) = http::respond(&self.client, status, head).await {
                debug!(listener = %svc.name, client = %peer, error = %e, "could not send HTTP error");
            }
            Some(status)
        };
        tokio::select! {
            answered = answer => answered,
            _ = self.cancel.cancelled() => None,
        }
    }

    /// The bytes read to choose a route and not sent on yet.
    fn early(&self) -> &[u8] {
        self.routed.as_ref().map_or(&[], |r| &r.early)
    }

    /// Sends a synthesized response and counts it.
    async fn respond(&self, status: Status) {
        self.svc.stats.record_synthesized(status.code());
        let _ = http::respond(&self.client, status, false).await;
    }

    /// Closes the client and writes the connection's one access-log event.
    fn log(self, ending: Ending) {
        let Connection {
            svc,
            snap,
            client,
            peer,
            ends,
            started,
            backend,
            sent,
            received,
            routed,
            ..
        } = self;
        let (listener, route, sni, alpn) = match &routed {
            Some(r) => (&*r.listener, Some(r.route.as_str()), r.sni.as_deref(), r.alpn.as_deref()),
            None => (&*svc.name, None, None, None),
        };
        // Close before logging: the last direction to end leaves its FIN to close().
        drop(client);
        let duration = started.elapsed();
        svc.stats.connection_duration.observe(duration);
        let entry = access::Entry {
            listener,
            route,
            sni,
            alpn,
            client: ends.client,
            // The address the connection came from, when a PROXY header
            // named another client.
            peer: (peer != ends.client).then_some(peer),
            backend,
            sent,
            received,
            duration,
            end: ending.end,
            error: ending.error.as_ref(),
        };
        entry.log(snap.config.access_log);
    }
}

/// What follows a backend's early close, when the connection goes on.
enum AfterClose {
    /// The bytes are not HTTP: splice on with the same backend.
    SpliceOn,
    /// The request went to this backend instead.
    Replayed(BackendConn),
    /// The replay could not be written: try again.
    Retry,
}

#[cfg(test)]
mod size_tests {
    /// An idle connection costs its task's future plus two sockets: keep the
    /// future small (stack arrays or doubled futures here cost every connection).
    #[test]
    fn connection_future_stays_small() {
        fn size<F: std::future::Future>(_: &F) -> usize {
            std::mem::size_of::<F>()
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let c = tokio::net::TcpStream::connect(addr).await.unwrap();
            let cfg = crate::config::ListenerConfig::new("t", vec![], vec![]);
            let pool = crate::upstream::Pool::new(vec![], crate::config::StrategyKind::RoundRobin);
            let svc = std::sync::Arc::new(crate::upstream::Service::new(cfg, pool));
            let f = super::serve(svc, c, addr, tokio_util::sync::CancellationToken::new());
            let n = size(&f);
            eprintln!("serve future: {n} bytes");
            assert!(n <= 2 * 1024, "the per-connection future grew to {n} bytes");
        });
    }
}
