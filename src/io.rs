//! Socket helpers every layer may use: waiting reads and writes on a shared
//! `&TcpStream`, turning a close into a reset, and naming socket errors.
//! They take sockets and deadlines only, never the configuration.

use std::io;
use std::time::Duration;

use socket2::SockRef;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Makes the coming close of `stream` send RST instead of FIN. Bytes held
/// back by MSG_MORE go out first: setting TCP_NODELAY pushes them (tcp(7)),
/// and a RST would otherwise discard them.
pub fn reset_on_close(stream: &TcpStream) {
    let sock = SockRef::from(stream);
    let _ = sock.set_nodelay(true);
    let _ = sock.set_linger(Some(Duration::ZERO));
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
                Ok(n) if n > 0 && n < buf.len() => {
                    drained(stream);
                    return Ok(n);
                }
                r => return r,
            }
        }
    });
    read.await.ok()?.ok()
}

/// Tells tokio that a short read just emptied `stream`'s receive queue, as
/// its own `poll_read` does (a stream socket returns less than asked only
/// when nothing more is queued): the next wait for bytes then waits for
/// the reactor instead of finding stale readiness and costing a read that
/// fails with EAGAIN (and, in the byte pump, a FIONREAD before it).
fn drained(stream: &TcpStream) {
    let _ = stream
        .try_io(tokio::io::Interest::READABLE, || Err::<(), _>(io::ErrorKind::WouldBlock.into()));
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

/// A short, operator-friendly description of a socket error.
pub fn describe_io(e: &io::Error) -> String {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => "connection refused".into(),
        ConnectionReset => "connection reset".into(),
        TimedOut => "timeout".into(),
        _ => e.to_string(),
    }
}

/// Errors after which trying again at once would fail again (out of
/// descriptors, buffers or memory): this process's limit, not a peer's fault.
pub fn is_resource_exhaustion(e: &io::Error) -> bool {
    const EMFILE: i32 = 24;
    const ENFILE: i32 = 23;
    const ENOBUFS: i32 = 105;
    const ENOMEM: i32 = 12;
    matches!(e.raw_os_error(), Some(EMFILE | ENFILE | ENOBUFS | ENOMEM))
}
