//! Socket helpers every layer may use: waiting reads and writes on a shared
//! `&TcpStream`, turning a close into a reset, and naming socket errors.
//! They take sockets and deadlines only, never the configuration.

use std::io;
use std::sync::OnceLock;
use std::time::Duration;

use socket2::SockRef;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Makes the coming close of `stream` send RST instead of FIN. When bytes
/// may be held back by MSG_MORE (`corked`), they go out first: setting
/// TCP_NODELAY pushes them (tcp(7)), and a RST would otherwise discard them.
pub fn reset_on_close(stream: &TcpStream, corked: bool) {
    let sock = SockRef::from(stream);
    if corked {
        let _ = sock.set_nodelay(true);
    }
    let _ = sock.set_linger(Some(Duration::ZERO));
}

/// Whether sockets whose connections close after `idle` of silence (None:
/// never) need SO_KEEPALIVE: only when the kernel's first probe
/// (`net.ipv4.tcp_keepalive_time`, two hours unless lowered) comes before
/// that. With the default idle timeout (one hour) it never would, and the
/// option costs a setsockopt on every backend connection; an operator who
/// lowered the sysctl (to keep NAT or conntrack entries alive, or to find
/// dead peers sooner) gets the probes. The sysctl is read once, on the
/// control plane's first call.
pub fn keepalive_needed(idle: Option<Duration>) -> bool {
    static FIRST_PROBE: OnceLock<Option<Duration>> = OnceLock::new();
    let first_probe = *FIRST_PROBE.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_keepalive_time").ok()?;
        text.trim().parse().ok().map(Duration::from_secs)
    });
    probes_before(idle, first_probe)
}

/// Whether a first keepalive probe after `first_probe` (None: unknown)
/// could come before an idle timeout of `idle` (None: none).
fn probes_before(idle: Option<Duration>, first_probe: Option<Duration>) -> bool {
    match (idle, first_probe) {
        (Some(idle), Some(first)) => first < idle,
        _ => true,
    }
}

/// Waits until `deadline` for `stream` to have bytes and reads them into
/// `buf`: `Some(0)` is end of stream, `None` a timeout or an error.
pub async fn read_by(stream: &TcpStream, buf: &mut [u8], deadline: Instant) -> Option<usize> {
    let read = tokio::time::timeout_at(deadline, async {
        loop {
            stream.readable().await?;
            if let Some(n) = read_some(stream, buf)? {
                return Ok::<_, io::Error>(n);
            }
        }
    });
    read.await.ok()?.ok()
}

/// One read from `src` into `buf`: `Some(0)` at end of stream, `None` when
/// there was nothing to read after all (tokio's readiness was stale, and is
/// cleared). A short read clears the readiness too, as tokio's `poll_read`
/// does (a stream socket returns less than asked only when nothing more is
/// queued), and with the tick of the event it read on, so an event that
/// arrives meanwhile is kept: the next wait goes to the reactor instead of
/// costing a read that fails with EAGAIN (and, in the byte pump, a FIONREAD
/// before it).
pub fn read_some(src: &TcpStream, buf: &mut [u8]) -> io::Result<Option<usize>> {
    use rustix::net::{recv, RecvFlags};
    let room = buf.len();
    let mut got = 0;
    let r = src.try_io(tokio::io::Interest::READABLE, || {
        let (n, _) = recv(src, &mut *buf, RecvFlags::empty())?;
        got = n;
        if n > 0 && n < room {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(n)
        }
    });
    match r {
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok((got > 0).then_some(got)),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
        Err(e) => Err(e),
    }
}

/// Size of each worker thread's read buffer.
pub const SCRATCH: usize = 64 * 1024;

thread_local! {
    /// One read buffer per worker thread, shared by every connection on it
    /// (the byte pump, the route phase): a connection owns a buffer only
    /// while its destination is slow.
    static SCRATCH_BUF: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0u8; SCRATCH].into_boxed_slice());
}

/// Runs `f` on this thread's [`SCRATCH`]-byte read buffer, which holds
/// nothing between calls.
pub fn with_scratch<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    SCRATCH_BUF.with_borrow_mut(|buf| f(buf))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keepalive_only_where_a_probe_could_come_before_the_idle_timeout() {
        let (hour, two) = (Duration::from_secs(3600), Duration::from_secs(7200));
        // The defaults: one hour idle, the kernel's first probe at two.
        assert!(!probes_before(Some(hour), Some(two)));
        // The sysctl lowered to ten minutes.
        assert!(probes_before(Some(hour), Some(Duration::from_secs(600))));
        // No idle timeout: keepalive is all that finds a dead peer.
        assert!(probes_before(None, Some(two)));
        // The sysctl could not be read.
        assert!(probes_before(Some(hour), None));
    }
}
