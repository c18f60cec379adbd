//! A binary upgrade (SIGUSR2) under load: the running tcplb starts itself
//! anew and hands the new process its listening sockets over a Unix
//! socket, so no socket is ever closed. A client that opens connections
//! all through it sees none refused and none reset, a long transfer on the
//! old process finishes intact, and the old process exits once drained.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// Kills a process this test did not spawn (the new tcplb) when dropped.
struct Pid(u32);

impl Drop for Pid {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(self.0) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.split(' ').nth(2).is_none_or(|state| state != "Z"))
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    refused: AtomicU64,
    reset: AtomicU64,
    other: AtomicU64,
}

/// One short echo exchange; classifies a failure the way a client sees it.
fn one(lb: SocketAddr, i: u64, tally: &Tally) {
    let attempt = || -> std::io::Result<bool> {
        let mut s = TcpStream::connect(lb)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let msg = format!("hello {i}");
        s.write_all(msg.as_bytes())?;
        s.shutdown(Shutdown::Write)?;
        let mut back = Vec::new();
        s.read_to_end(&mut back)?;
        Ok(back == msg.as_bytes())
    };
    let counter = match attempt() {
        Ok(true) => &tally.ok,
        Ok(false) => &tally.other,
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => &tally.refused,
        Err(e) if e.kind() == ErrorKind::ConnectionReset => &tally.reset,
        Err(_) => &tally.other,
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

#[test]
fn an_upgrade_refuses_and_resets_no_connection() {
    let echo = thread_echo_server();
    let lb: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let (old, rx) = spawn_logged(
        Command::new(BIN)
            .args(["--listen", &lb.to_string(), "--upstream", &echo.to_string()])
            .args(["--health-check", "none", "--drain-timeout", "20s", "--admin", "127.0.0.1:0"])
            .args(["--access-log", "off"])
            .env_remove("RUST_LOG"),
    );
    wait_listening(&rx);
    let old_pid = old.0.id();

    // A long transfer that starts on the old process and must end intact.
    let transfer = std::thread::spawn(move || {
        let data = random_bytes(24 << 20, 7);
        let mut s = TcpStream::connect(lb).unwrap();
        let mut r = s.try_clone().unwrap();
        let reader = std::thread::spawn(move || {
            let mut back = Vec::new();
            r.read_to_end(&mut back).map(|_| back)
        });
        for chunk in data.chunks(256 << 10) {
            s.write_all(chunk).unwrap();
            std::thread::sleep(Duration::from_millis(25)); // about 2.5 s in all
        }
        s.shutdown(Shutdown::Write).unwrap();
        let back = reader.join().unwrap().expect("the long transfer was cut");
        digest(&back) == digest(&data)
    });

    // Clients opening connections continuously, two at a time.
    let (stop, tally) = (Arc::new(AtomicBool::new(false)), Arc::new(Tally::default()));
    let load: Vec<_> = (0..2u64)
        .map(|k| {
            let (stop, tally) = (Arc::clone(&stop), Arc::clone(&tally));
            std::thread::spawn(move || {
                let mut i = k;
                while !stop.load(Ordering::Relaxed) {
                    one(lb, i, &tally);
                    i += 2;
                }
            })
        })
        .collect();

    std::thread::sleep(Duration::from_millis(700));
    let before = tally.ok.load(Ordering::Relaxed);
    assert!(Command::new("kill").args(["-USR2", &old_pid.to_string()]).status().unwrap().success());
    // Two processes write to the same stderr: their lines come in either order.
    let (mut took, mut draining) = (None, false);
    while took.is_none() || !draining {
        let line = wait_line(&rx, "upgrade: ");
        draining |= line.contains("this one stops accepting and drains");
        if line.contains("took the listening sockets over") {
            took = Some(line);
        }
    }
    let line = took.unwrap();
    let new_pid: u32 = line
        .split("pid=")
        .nth(1)
        .and_then(|p| p.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line:?}"));
    let _new = Pid(new_pid);
    assert_ne!(new_pid, old_pid);

    // The old process drains (the long transfer is its last connection) and exits.
    let mut old = old;
    let deadline = Instant::now() + Duration::from_secs(25);
    let status = loop {
        if let Some(status) = old.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the old process did not exit after draining");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "the old process exited with {status}");
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.join().unwrap();
    }
    assert!(transfer.join().unwrap(), "the long transfer arrived changed");

    let (ok, refused, reset, other) = (
        tally.ok.load(Ordering::Relaxed),
        tally.refused.load(Ordering::Relaxed),
        tally.reset.load(Ordering::Relaxed),
        tally.other.load(Ordering::Relaxed),
    );
    eprintln!("upgrade under load: {ok} exchanges, {before} before the signal");
    assert_eq!((refused, reset, other), (0, 0, 0), "{ok} good exchanges");
    assert!(ok > before + 500, "too few connections across the upgrade: {ok}");

    // The new process serves on its own.
    let tally = Tally::default();
    one(lb, 1, &tally);
    assert_eq!(tally.ok.load(Ordering::Relaxed), 1);
    assert!(alive(new_pid));
}

#[test]
fn a_failed_upgrade_leaves_the_old_process_serving() {
    let echo = thread_echo_server();
    let tmp = tempdir("upgrade-fail");
    let dir = tmp.path();
    let config = dir.join("tcplb.toml");
    let lb: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let good = format!("[[listener]]\nname = \"l\"\nlisten = \"{lb}\"\nupstreams = [\"{echo}\"]\n");
    std::fs::write(&config, &good).unwrap();
    let (old, rx) = spawn_logged(
        Command::new(BIN).args(["--config", config.to_str().unwrap()]).env_remove("RUST_LOG"),
    );
    wait_listening(&rx);
    // The new process will read a file it rejects, and exit 2.
    std::fs::write(&config, "[[listener]]\nname = \"l\"\n").unwrap();
    let pid = old.0.id().to_string();
    assert!(Command::new("kill").args(["-USR2", &pid]).status().unwrap().success());
    let line = wait_line(&rx, "upgrade failed");
    assert!(line.contains("exited"), "{line}");
    let tally = Tally::default();
    one(lb, 1, &tally);
    assert_eq!(tally.ok.load(Ordering::Relaxed), 1, "the old process still serves");
}
