//! Binary upgrade without a refused connection, as HAProxy's `-x`, Envoy's
//! hot restart and pingora's `--upgrade` do it: the running process starts
//! the new binary (its own argv\[0\] and arguments, so a package upgrade
//! that replaced the file is picked up) and hands it every listening socket
//! over a Unix socket with SCM_RIGHTS. No listening socket is ever closed:
//! both processes hold it while the new one starts, connections waiting in
//! its accept queue are accepted by one or the other, and once the new
//! process accepts on all of them and says so, the old one stops accepting,
//! drains its established connections for up to `drain_timeout`, and exits.
//!
//! If the new process fails (a bad configuration, a crash), it never says
//! it is ready, and the old one goes on serving as if nothing happened.
//!
//! The exchange, on a Unix stream socket the old process binds for it (its
//! path in `TCPLB_UPGRADE_FROM` for the new one): the old process writes
//! `tcplb-upgrade 1`, then a line per group of sockets, `listen CONFIGURED
//! LOCAL COUNT` (COUNT descriptors go with the line) or `admin LOCAL` (one),
//! then `end`; the new one answers `ready` once it accepts on all of them.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use rustix::process::{kill_process, waitid, Pid, Signal, WaitId, WaitIdOptions};
use tokio::sync::oneshot;

/// The environment variable that names the old process's socket.
pub const FROM_ENV: &str = "TCPLB_UPGRADE_FROM";

/// Descriptors sent with one line (the kernel takes at most 253 a message).
const FDS_PER_MESSAGE: usize = 128;

/// How long the old process waits for the new one to connect, and then to
/// say it is ready (resolving upstreams and starting its workers included).
const CONNECT_WITHIN: Duration = Duration::from_secs(10);
const READY_WITHIN: Duration = Duration::from_secs(60);

/// Listening sockets taken over from the process being upgraded.
#[derive(Debug)]
pub struct Inherited {
    /// Each group: the address as configured, as bound, and its sockets.
    groups: Vec<(SocketAddr, SocketAddr, Vec<TcpListener>)>,
    /// The admin endpoint's socket.
    admin: Option<(SocketAddr, TcpListener)>,
    /// To the old process: `ready` goes here.
    channel: UnixStream,
}

impl Inherited {
    /// The sockets of the process named by `TCPLB_UPGRADE_FROM`, when this
    /// process was started to take over from one. The variable is removed,
    /// so that it does not leak into processes this one starts.
    pub fn from_env() -> Result<Option<Inherited>, String> {
        let Some(path) = std::env::var_os(FROM_ENV) else { return Ok(None) };
        // Single-threaded here: nothing reads the environment concurrently.
        std::env::remove_var(FROM_ENV);
        Self::receive(Path::new(&path)).map(Some).map_err(|e| {
            format!("cannot take the sockets over from {}: {e}", Path::new(&path).display())
        })
    }

    fn receive(path: &Path) -> std::io::Result<Inherited> {
        let channel = UnixStream::connect(path)?;
        channel.set_read_timeout(Some(CONNECT_WITHIN))?;
        let (mut text, mut fds) = (Vec::new(), VecDeque::new());
        let mut chunk = vec![0u8; 4096];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(253))];
        while !text.ends_with(b"end\n") {
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let msg = rustix::net::recvmsg(
                &channel,
                &mut [IoSliceMut::new(&mut chunk)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            )?;
            for message in control.drain() {
                if let RecvAncillaryMessage::ScmRights(received) = message {
                    fds.extend(received);
                }
            }
            if msg.bytes == 0 {
                return Err(bad("the old process closed the exchange early"));
            }
            text.extend_from_slice(&chunk[..msg.bytes]);
        }
        let text = String::from_utf8(text).map_err(|_| bad("the exchange is not text"))?;
        let mut lines = text.lines();
        if lines.next() != Some("tcplb-upgrade 1") {
            return Err(bad("not a tcplb upgrade exchange (another version?)"));
        }
        let mut take = |n: usize| -> std::io::Result<Vec<OwnedFd>> {
            (0..n)
                .map(|_| fds.pop_front().ok_or_else(|| bad("fewer sockets than announced")))
                .collect()
        };
        let (mut groups, mut admin) =
            (Vec::<(SocketAddr, SocketAddr, Vec<TcpListener>)>::new(), None);
        for line in lines {
            let words: Vec<&str> = line.split(' ').collect();
            match words[..] {
                ["listen", configured, local, count] => {
                    let (configured, local) = (addr(configured)?, addr(local)?);
                    let count: usize = count.parse().map_err(|_| bad("bad socket count"))?;
                    let sockets = take(count)?.into_iter().map(TcpListener::from);
                    match groups.iter_mut().find(|g| g.0 == configured && g.1 == local) {
                        Some(group) => group.2.extend(sockets),
                        None => groups.push((configured, local, sockets.collect())),
                    }
                }
                ["admin", local] => {
                    let local = addr(local)?;
                    admin = take(1)?.pop().map(|fd| (local, TcpListener::from(fd)));
                }
                ["end"] => break,
                _ => return Err(bad("an unknown line in the exchange")),
            }
        }
        Ok(Inherited { groups, admin, channel })
    }

    /// The sockets bound to `addr` (as configured, or as bound), if the old
    /// process had them. Each group is taken once.
    pub(crate) fn take(&mut self, addr: SocketAddr) -> Option<Vec<TcpListener>> {
        let i = self.groups.iter().position(|(configured, local, _)| {
            *configured == addr || (*local == addr && addr.port() != 0)
        })?;
        Some(self.groups.remove(i).2)
    }

    /// The admin socket, if the old process had one on `addr`.
    pub(crate) fn take_admin(&mut self, addr: SocketAddr) -> Option<TcpListener> {
        match &self.admin {
            Some((local, _)) if *local == addr || addr.port() == 0 => {
                self.admin.take().map(|(_, s)| s)
            }
            _ => None,
        }
    }

    /// Addresses the old process listened on that this configuration no
    /// longer names: their sockets close when this is dropped.
    pub(crate) fn unclaimed(&self) -> Vec<SocketAddr> {
        self.groups.iter().map(|(_, local, _)| *local).collect()
    }

    /// Tells the old process that every socket is accepting here: it stops
    /// accepting and drains.
    pub(crate) fn ready(mut self) -> std::io::Result<()> {
        self.channel.write_all(b"ready\n")
    }
}

/// What the running process hands over: duplicates of its sockets.
#[derive(Debug, Default)]
pub(crate) struct Handover {
    /// Each group: the address as configured, as bound, and its sockets.
    pub(crate) groups: Vec<(SocketAddr, SocketAddr, Vec<OwnedFd>)>,
    /// The admin endpoint's socket.
    pub(crate) admin: Option<(SocketAddr, OwnedFd)>,
}

/// Starts the new binary, hands it `handover` and waits until it is ready.
/// Returns its pid. The running process goes on serving meanwhile, and
/// also when this fails.
pub(crate) async fn start_successor(handover: Handover) -> Result<u32, String> {
    let path = socket_path();
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)
        .map_err(|e| format!("cannot bind {}: {e}", path.display()))?;
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.is_empty() {
        return Err("no argv[0] to start".into());
    }
    let program = args.remove(0);
    let mut command = std::process::Command::new(&program);
    command.args(args).env(FROM_ENV, &path).stdin(std::process::Stdio::null());
    let mut child = Successor::spawn(command)
        .map_err(|e| format!("cannot start {}: {e}", Path::new(&program).display()))?;
    let pid = Pid::as_raw(Some(child.pid)).unsigned_abs();
    let accepted = tokio::select! {
        a = tokio::time::timeout(CONNECT_WITHIN, listener.accept()) => a,
        status = &mut child.status => {
            let _ = std::fs::remove_file(&path);
            return Err(format!("the new process exited before taking over ({})", describe(status)));
        }
    };
    let _ = std::fs::remove_file(&path);
    let stream = match accepted {
        Ok(Ok((stream, _))) => stream,
        Ok(Err(e)) => return Err(format!("the new process could not connect: {e}")),
        Err(_) => {
            child.kill();
            return Err("the new process did not connect within 10s; stopped it".into());
        }
    };
    let stream = stream.into_std().and_then(|s| s.set_nonblocking(false).map(|()| s));
    let stream = stream.map_err(|e| e.to_string())?;
    let exchange = tokio::task::spawn_blocking(move || exchange(stream, &handover));
    tokio::select! {
        r = exchange => match r {
            // Its watcher reaps it when it exits.
            Ok(Ok(())) => Ok(pid),
            Ok(Err(e)) => {
                child.kill();
                Err(format!("the new process did not take over: {e}"))
            }
            Err(e) => Err(e.to_string()),
        },
        status = &mut child.status => Err(format!("the new process exited before it was ready ({})", describe(status))),
    }
}

/// The new process, watched by a thread of its own until it exits.
///
/// Not `tokio::process`: its reaper takes two locks shared by every runtime
/// each time a runtime's driver turns, which the workers' do many times a
/// second on the data path, for the one child tcplb ever starts.
struct Successor {
    /// Its pid.
    pid: Pid,
    /// Set once it exited, before it is reaped: until then its pid cannot
    /// name another process, and [`Successor::kill`] may signal it.
    exited: Arc<Mutex<bool>>,
    /// Its exit status, when it exits.
    status: oneshot::Receiver<std::io::Result<ExitStatus>>,
}

impl Successor {
    /// Starts `command` and its watcher.
    fn spawn(mut command: std::process::Command) -> std::io::Result<Successor> {
        let mut child = command.spawn()?;
        let pid = Pid::from_child(&child);
        let exited = Arc::new(Mutex::new(false));
        let (tell, status) = oneshot::channel();
        let flag = Arc::clone(&exited);
        let watcher = std::thread::Builder::new().name("tcplb-successor".into()).spawn(move || {
            // Waits for the exit without reaping it (WNOWAIT), so that a
            // kill cannot reach another process that took the pid over.
            let exit = WaitIdOptions::EXITED | WaitIdOptions::NOWAIT;
            while let Err(rustix::io::Errno::INTR) = waitid(WaitId::Pid(pid), exit) {}
            let mut exited = flag.lock().unwrap_or_else(PoisonError::into_inner);
            *exited = true;
            let status = child.wait();
            drop(exited);
            let _ = tell.send(status);
        });
        if let Err(e) = watcher {
            // Not reaped: the pid is still the child's.
            let _ = kill_process(pid, Signal::KILL);
            return Err(e);
        }
        Ok(Successor { pid, exited, status })
    }

    /// Stops it (SIGKILL), unless it exited already.
    fn kill(&self) {
        let exited = self.exited.lock().unwrap_or_else(PoisonError::into_inner);
        if !*exited {
            let _ = kill_process(self.pid, Signal::KILL);
        }
    }
}

/// Sends the sockets and waits for `ready`.
fn exchange(stream: UnixStream, handover: &Handover) -> std::io::Result<()> {
    send(&stream, b"tcplb-upgrade 1\n", &[])?;
    for (configured, local, fds) in &handover.groups {
        for part in fds.chunks(FDS_PER_MESSAGE) {
            let line = format!("listen {configured} {local} {}\n", part.len());
            send(&stream, line.as_bytes(), part)?;
        }
    }
    if let Some((local, fd)) = &handover.admin {
        send(&stream, format!("admin {local}\n").as_bytes(), std::slice::from_ref(fd))?;
    }
    send(&stream, b"end\n", &[])?;
    stream.set_read_timeout(Some(READY_WITHIN))?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    if line.trim() == "ready" {
        Ok(())
    } else {
        Err(bad("it closed the exchange without saying it was ready"))
    }
}

fn send(stream: &UnixStream, text: &[u8], fds: &[OwnedFd]) -> std::io::Result<()> {
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_MESSAGE))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !borrowed.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&borrowed)) {
        return Err(bad("too many sockets for one message"));
    }
    let sent =
        rustix::net::sendmsg(stream, &[IoSlice::new(text)], &mut control, SendFlags::empty())?;
    // Unix stream sockets take a short line whole; the rest goes plainly.
    (&*stream).write_all(&text[sent..])
}

/// Where the old process listens for its successor: the runtime directory
/// systemd gives the service, else the temporary directory.
fn socket_path() -> PathBuf {
    let dir = std::env::var_os("RUNTIME_DIRECTORY")
        .and_then(|d| std::env::split_paths(&d).next())
        .unwrap_or_else(std::env::temp_dir);
    dir.join(format!("tcplb-upgrade-{}.sock", std::process::id()))
}

fn addr(s: &str) -> std::io::Result<SocketAddr> {
    s.parse().map_err(|_| bad("a bad address in the exchange"))
}

fn bad(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what)
}

fn describe(status: Result<std::io::Result<ExitStatus>, oneshot::error::RecvError>) -> String {
    match status {
        Ok(Ok(s)) => s.to_string(),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "its watcher ended".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::time::Duration;

    use super::Successor;

    fn sh(script: &str) -> std::process::Command {
        let mut command = std::process::Command::new("sh");
        command.args(["-c", script]);
        command
    }

    #[tokio::test]
    async fn its_exit_status_arrives_when_it_exits() {
        let mut child = Successor::spawn(sh("exit 3")).unwrap();
        let status = tokio::time::timeout(Duration::from_secs(10), &mut child.status).await;
        assert_eq!(status.unwrap().unwrap().unwrap().code(), Some(3));
        // Exited and reaped: no signal goes to a pid that may be another's now.
        assert!(*child.exited.lock().unwrap());
        child.kill();
    }

    #[tokio::test]
    async fn kill_stops_one_that_still_runs() {
        let mut child = Successor::spawn(sh("sleep 30")).unwrap();
        child.kill();
        let status = tokio::time::timeout(Duration::from_secs(10), &mut child.status).await;
        assert_eq!(status.unwrap().unwrap().unwrap().signal(), Some(9));
    }
}
