//! Connecting to a backend: the candidates in turn, each with its own
//! connect timeout and the PROXY header it wants, until one accepts. A
//! failure counts against that backend's health; running out of local
//! resources counts against nobody and stops at once.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::warn;

use crate::config::Protocol;
use crate::conn::http::Status;
use crate::conn::proxy_protocol;
use crate::conn::watch::{Alarm, Watch};
use crate::io::{describe_io, is_resource_exhaustion, write_all};
use crate::stats::Throttle;
use crate::upstream::{ActiveGuard, Backend, Candidates, ConnectFailure, Service, Snapshot};

/// Why a connect attempt failed.
#[derive(Debug)]
enum ConnectError {
    /// This process is out of descriptors or buffers: not the backend's fault.
    Local(io::Error),
    /// No answer within the connect timeout.
    Timeout,
    /// The socket call failed (refused, unreachable, reset).
    Io(io::Error),
    /// The drain deadline passed: nobody's fault, and nothing more is tried.
    Drained,
}

impl ConnectError {
    fn reason(&self) -> ConnectFailure {
        match self {
            ConnectError::Timeout => ConnectFailure::Timeout,
            ConnectError::Local(_) | ConnectError::Drained => ConnectFailure::Other,
            ConnectError::Io(e) => match e.kind() {
                io::ErrorKind::ConnectionRefused => ConnectFailure::Refused,
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => ConnectFailure::Reset,
                _ => ConnectFailure::Other,
            },
        }
    }

    fn describe(&self, timeout: Duration) -> String {
        match self {
            ConnectError::Timeout => {
                format!("timeout after {}", humantime::format_duration(timeout))
            }
            ConnectError::Io(e) => describe_io(e),
            ConnectError::Local(e) => format!("local resources exhausted: {e}"),
            ConnectError::Drained => "shutdown".to_string(),
        }
    }
}

/// Who the connection is from and to, as far as backends should know.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Endpoints {
    /// The client: the peer address, or the source of its PROXY header.
    pub client: SocketAddr,
    /// What the client connected to.
    pub destination: SocketAddr,
}

/// An established connection to a backend, holding one of its slots.
pub(crate) struct BackendConn {
    /// The backend.
    pub backend: Arc<Backend>,
    /// The socket.
    pub stream: TcpStream,
    /// How many of the bytes [`connect`] was given to send first went
    /// with the connect.
    pub sent_first: usize,
    /// Holds the backend's connection slot until the connection ends.
    _slot: ActiveGuard,
}

/// Why [`connect`] returned without a backend connection.
#[derive(Debug)]
pub(crate) enum NotConnected {
    /// No candidate accepted: the status an HTTP client should see.
    Failed(Status),
    /// The drain deadline passed while connecting.
    Drained,
}

/// Out of local resources: every connection would say so at once.
static LOCAL_EXHAUSTION: Throttle = Throttle::new();
/// Backend connect failures: a dead backend under load fails every connect.
static CONNECT_FAILED: Throttle = Throttle::new();

/// Tries the next candidates until one accepts (and takes its PROXY header),
/// each within the connect timeout, which `watch` keeps. `first` are bytes
/// the client sent already (what choosing a route read, or a request to
/// replay): they go as soon as the connect returns, or the PROXY header
/// does instead when the backend wants one ([`BackendConn::sent_first`]
/// says how many of `first` went), and the rest is the caller's.
pub(crate) async fn connect(
    svc: &Service,
    snap: &Snapshot,
    candidates: &mut Candidates<'_>,
    ends: Endpoints,
    first: &[u8],
    mut watch: Pin<&mut Watch<'_>>,
) -> Result<BackendConn, NotConnected> {
    let mut status = Status::ServiceUnavailable;
    let timeout = snap.config.connect_timeout;
    for backend in candidates {
        // A backend that filled up since it was picked is skipped like a down one.
        let Some(slot) = backend.try_claim() else { continue };
        let keepalive = snap.backend_keepalive;
        // The PROXY header goes before anything of the client's.
        let header =
            backend.send_proxy().map(|v| proxy_protocol::encode(v, ends.client, ends.destination));
        let first = header.as_deref().unwrap_or(first);
        let result =
            match connect_one(backend.addr, timeout, keepalive, first, watch.as_mut()).await {
                Ok((stream, sent)) => match &header {
                    Some(header) => {
                        let rest = header.get(sent..).unwrap_or_default();
                        let written = tokio::select! {
                            w = write_all(&stream, rest) => w.map_err(ConnectError::Io),
                            alarm = watch.as_mut() => Err(alarm.into()),
                        };
                        written.map(|()| (stream, 0))
                    }
                    None => Ok((stream, sent)),
                },
                Err(e) => Err(e),
            };
        match result {
            Ok((stream, sent_first)) => {
                backend.record_connected();
                // Resets a failure streak (only probes bring a down backend
                // up). Outside `tcp` mode the first answer does, not the
                // connect: a backend that accepts and hangs up is failing.
                if snap.passive_health() && snap.config.protocol == Protocol::Tcp {
                    backend.health.observe_success_streak_reset();
                }
                let backend = Arc::clone(backend);
                return Ok(BackendConn { backend, stream, sent_first, _slot: slot });
            }
            Err(ConnectError::Local(e)) => {
                // Every other backend would fail the same way; the backend is not to blame.
                if let Some(suppressed) = LOCAL_EXHAUSTION.allow() {
                    warn!(listener = %svc.name, client = %ends.client, error = %e, suppressed, "cannot open a backend connection: out of local resources");
                }
                return Err(NotConnected::Failed(Status::ServiceUnavailable));
            }
            Err(ConnectError::Drained) => return Err(NotConnected::Drained),
            Err(e) => {
                let reason = e.describe(timeout);
                if let Some(suppressed) = CONNECT_FAILED.allow() {
                    warn!(listener = %svc.name, client = %ends.client, backend = %backend.addr, %reason, suppressed, "backend connect failed");
                }
                backend.record_connect_failure(e.reason());
                if snap.passive_health() {
                    snap.record_passive_failure(backend, &svc.name, &reason);
                }
                status = match e {
                    ConnectError::Timeout => Status::GatewayTimeout,
                    _ => Status::BadGateway,
                };
            }
        }
    }
    Err(NotConnected::Failed(status))
}

impl From<Alarm> for ConnectError {
    fn from(alarm: Alarm) -> Self {
        match alarm {
            Alarm::Deadline => ConnectError::Timeout,
            Alarm::Drain => ConnectError::Drained,
        }
    }
}

/// Connects to `addr` within `timeout` (kept by `watch`, which also ends it
/// at the drain deadline), with SO_KEEPALIVE when `keepalive` (client
/// sockets inherit theirs from the listener), and sends what it can of
/// `first` at once; returns how much of it went.
///
/// On loopback the handshake is over by the time connect() returns (the
/// SYN and SYN-ACK are handled inside the call), so `first` is sent right
/// away: that spares a trip through the reactor to learn that the socket
/// is writable, and the backend finds the bytes with the connection it
/// accepts (a sidecar's backend, or one on the same host). A send while
/// the handshake still runs would fail with EAGAIN, as it always would to
/// a backend elsewhere, which is not tried; a connect that failed (refused,
/// say) returns its error.
async fn connect_one(
    addr: SocketAddr,
    timeout: Duration,
    keepalive: bool,
    first: &[u8],
    mut watch: Pin<&mut Watch<'_>>,
) -> Result<(TcpStream, usize), ConnectError> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(socket2::Protocol::TCP),
    )
    .map_err(|e| {
        if is_resource_exhaustion(&e) {
            ConnectError::Local(e)
        } else {
            ConnectError::Io(e)
        }
    })?;
    socket.set_nodelay(true).map_err(ConnectError::Io)?;
    if keepalive {
        socket.set_keepalive(true).map_err(ConnectError::Io)?;
    }
    // A non-blocking connect returns EINPROGRESS while the handshake runs.
    match socket.connect(&addr.into()) {
        Err(e) if e.raw_os_error() != Some(rustix::io::Errno::INPROGRESS.raw_os_error()) => {
            return Err(ConnectError::Io(e))
        }
        _ => {}
    }
    let sent = if first.is_empty() || !addr.ip().is_loopback() {
        None
    } else {
        send_first(&socket, first)?
    };
    let stream = TcpStream::from_std(socket.into()).map_err(ConnectError::Io)?;
    watch.as_mut().set(Some(Instant::now() + timeout));
    if let Some(sent) = sent {
        return Ok((stream, sent));
    }
    tokio::select! {
        biased;
        r = established(&stream) => r.map(|()| (stream, 0)).map_err(ConnectError::Io),
        alarm = watch.as_mut() => Err(alarm.into()),
    }
}

/// Sends `first` on a socket whose connect was just started: Some(bytes
/// sent) when the handshake is over, None while it runs, or the error it
/// ended with.
fn send_first(socket: &Socket, first: &[u8]) -> Result<Option<usize>, ConnectError> {
    use rustix::net::{send, SendFlags};
    match send(socket, first, SendFlags::NOSIGNAL) {
        Ok(n) => Ok(Some(n)),
        Err(rustix::io::Errno::AGAIN) => Ok(None),
        Err(e) => Err(ConnectError::Io(e.into())),
    }
}

/// Waits until a non-blocking connect has finished. A handshake that failed
/// (refused, reset, unreachable) raises EPOLLERR or EPOLLHUP, and only then
/// is the socket's error read: writable without either means established,
/// so a connection costs no `getsockopt(SO_ERROR)`, which tokio's own
/// connect makes every time (HAProxy reads it only on an error event, too).
async fn established(stream: &TcpStream) -> io::Result<()> {
    let ready = stream.ready(Interest::WRITABLE).await?;
    if !ready.is_write_closed() {
        return Ok(());
    }
    Err(stream.take_error()?.unwrap_or_else(|| {
        io::Error::new(io::ErrorKind::ConnectionReset, "closed while connecting")
    }))
}

#[cfg(test)]
mod connect_tests {
    use super::*;

    /// A connect to a closed port must end refused: not timed out, not
    /// blamed on local resources, not connected.
    fn assert_refused(result: Result<(TcpStream, usize), ConnectError>, ip: &str) {
        match result {
            Err(ConnectError::Io(e)) => {
                assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{ip}: {e}")
            }
            Err(ConnectError::Timeout) => panic!("{ip}: a refused connect timed out"),
            Err(ConnectError::Local(e)) => panic!("{ip}: a refused connect blamed on us: {e}"),
            Err(ConnectError::Drained) => panic!("{ip}: drained without a drain"),
            Ok(_) => panic!("{ip}: connected to a closed port"),
        }
    }

    #[tokio::test]
    async fn a_connect_ends_established_or_with_the_kernels_reason() {
        let token = tokio_util::sync::CancellationToken::new();
        let mut watch = std::pin::pin!(Watch::new(&token));
        for ip in ["127.0.0.1", "[::1]"] {
            let listener = tokio::net::TcpListener::bind(format!("{ip}:0")).await.unwrap();
            let open = listener.local_addr().unwrap();
            let (mut stream, _) =
                connect_one(open, Duration::from_secs(3), false, &[], watch.as_mut())
                    .await
                    .unwrap();
            assert!(!socket2::SockRef::from(&stream).keepalive().unwrap(), "{ip}: keepalive set");
            let (mut server, _) = listener.accept().await.unwrap();
            tokio::io::AsyncWriteExt::write_all(&mut stream, b"ping").await.unwrap();
            let mut got = [0u8; 4];
            tokio::io::AsyncReadExt::read_exact(&mut server, &mut got).await.unwrap();
            assert_eq!(&got, b"ping", "{ip}: the established stream carries bytes");

            drop((listener, server));
            let refused =
                connect_one(open, Duration::from_secs(3), false, &[], watch.as_mut()).await;
            assert_refused(refused, ip);
        }
    }

    #[tokio::test]
    async fn first_bytes_go_with_a_connect_that_is_over_when_it_returns() {
        use std::future::Future;
        use std::task::{Context, Poll, Waker};
        let token = tokio_util::sync::CancellationToken::new();
        let mut watch = std::pin::pin!(Watch::new(&token));
        for ip in ["127.0.0.1", "[::1]"] {
            let listener = tokio::net::TcpListener::bind(format!("{ip}:0")).await.unwrap();
            let open = listener.local_addr().unwrap();
            // On loopback the handshake is over inside connect(): the first
            // poll ends with the bytes sent, without a trip through the reactor.
            let timeout = Duration::from_secs(3);
            let (stream, sent) = {
                let mut connecting =
                    std::pin::pin!(connect_one(open, timeout, false, b"hello", watch.as_mut()));
                match connecting.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
                    Poll::Ready(Ok(connected)) => connected,
                    _ => panic!("{ip}: the connect waited for the reactor before sending"),
                }
            };
            assert_eq!(sent, 5, "{ip}");
            let (mut server, _) = listener.accept().await.unwrap();
            write_all(&stream, b", world").await.unwrap();
            let mut got = [0u8; 12];
            tokio::io::AsyncReadExt::read_exact(&mut server, &mut got).await.unwrap();
            assert_eq!(&got, b"hello, world", "{ip}: the first bytes, then the rest, in order");

            // A refused connect with bytes to send reports the refusal.
            drop((listener, server, stream));
            assert_refused(connect_one(open, timeout, false, b"hello", watch.as_mut()).await, ip);
        }
    }

    #[tokio::test]
    async fn first_bytes_wait_for_a_connect_still_under_way() {
        // A listener whose accept queue is full drops SYNs: the connect is
        // still under way when connect() returns, so nothing goes with it,
        // and the connect is waited for until the SYN's retransmission.
        let server = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        server.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
        server.listen(0).unwrap();
        let open = server.local_addr().unwrap().as_socket().unwrap();
        let server = std::net::TcpListener::from(server);
        let filler = std::net::TcpStream::connect(open).unwrap();
        let token = tokio_util::sync::CancellationToken::new();
        let mut watch = std::pin::pin!(Watch::new(&token));
        let freeing = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(server.accept().unwrap());
            server
        });
        let (stream, sent) =
            connect_one(open, Duration::from_secs(10), false, b"hello", watch.as_mut())
                .await
                .unwrap();
        assert_eq!(sent, 0, "bytes went on a connect still under way");
        write_all(&stream, b"hello").await.unwrap();
        let server = freeing.join().unwrap();
        let (mut accepted, _) = server.accept().unwrap();
        let mut got = [0u8; 5];
        std::io::Read::read_exact(&mut accepted, &mut got).unwrap();
        assert_eq!(&got, b"hello");
        drop(filler);
    }

    #[tokio::test]
    async fn backend_sockets_get_keepalive_when_asked() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = listener.local_addr().unwrap();
        let token = tokio_util::sync::CancellationToken::new();
        let watch = std::pin::pin!(Watch::new(&token));
        let (stream, _) =
            connect_one(open, Duration::from_secs(3), true, &[], watch).await.unwrap();
        assert!(socket2::SockRef::from(&stream).keepalive().unwrap());
    }
}
