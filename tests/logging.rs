//! A log reader that stops must not stop the proxy: tcplb's stderr is a
//! pipe that nobody reads (a stalled log collector), and connections must
//! keep flowing while log lines are dropped and counted.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Connections in all, and at once.
const CONNECTIONS: usize = 10_000;
const AT_ONCE: usize = 100;

/// One echo round trip through tcplb.
async fn round_trip(lb: SocketAddr, i: usize) -> Result<(), String> {
    let work = async {
        let mut s = TcpStream::connect(lb).await.map_err(|e| e.to_string())?;
        let msg = format!("hello {i}");
        s.write_all(msg.as_bytes()).await.map_err(|e| e.to_string())?;
        s.shutdown().await.map_err(|e| e.to_string())?;
        let mut back = Vec::new();
        s.read_to_end(&mut back).await.map_err(|e| e.to_string())?;
        if back == msg.as_bytes() {
            Ok(())
        } else {
            Err(format!("connection {i} came back as {back:?}"))
        }
    };
    tokio::time::timeout(Duration::from_secs(5), work)
        .await
        .unwrap_or_else(|_| Err(format!("connection {i} hung")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_log_reader_never_stops_a_connection() {
    let echo = thread_echo_server();
    let mut child = Proc(
        Command::new(BIN)
            .args(["--listen", "127.0.0.1:0", "--upstream", &echo.to_string()])
            .args(["--health-check", "none", "--admin", "127.0.0.1:0", "--log-level", "debug"])
            .env_remove("RUST_LOG")
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tcplb"),
    );
    // Read stderr up to the two start lines, then never again: the pipe
    // fills (64 KiB) and stays full.
    let mut stderr = BufReader::new(child.0.stderr.take().expect("piped stderr"));
    let (mut listen, mut admin) = (None, None);
    let mut line = String::new();
    while listen.is_none() || admin.is_none() {
        line.clear();
        assert!(stderr.read_line(&mut line).expect("read stderr") > 0, "tcplb exited");
        if let Some(rest) = line.split("listen=[").nth(1) {
            listen = rest.split(']').next().and_then(|a| a.parse::<SocketAddr>().ok());
        }
        if line.contains("admin endpoint listening") {
            admin = line.split("addr=").nth(1).and_then(|a| a.trim().parse::<SocketAddr>().ok());
        }
    }
    let (lb, admin) = (listen.unwrap(), admin.unwrap());

    for batch in 0..CONNECTIONS / AT_ONCE {
        let clients: Vec<_> =
            (0..AT_ONCE).map(|k| tokio::spawn(round_trip(lb, batch * AT_ONCE + k))).collect();
        for c in clients {
            if let Err(e) = c.await.unwrap() {
                panic!("with stderr unread, after {} connections: {e}", batch * AT_ONCE);
            }
        }
    }

    // The writer's queue overflowed: the lines were dropped and counted.
    let mut dropped = 0.0;
    for _ in 0..50 {
        dropped = get(&scrape(admin).await, "tcplb_log_lines_dropped_total", &[]);
        if dropped > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(dropped > 0.0, "no dropped log line counted");
    drop(stderr);
}

/// The nice value of each of `pid`'s threads named `name` (procfs reads
/// /proc/PID/task/TID/stat, as tcplb's own metrics read /proc/self).
fn nice_of_threads(pid: u32, name: &str) -> Vec<i64> {
    let process = procfs::process::Process::new(pid as i32).expect("tcplb's /proc entry");
    let tasks = process.tasks().expect("list threads").map_while(Result::ok);
    let stats = tasks.filter_map(|task| task.stat().ok());
    stats.filter(|stat| stat.comm == name).map(|stat| stat.nice).collect()
}

#[test]
fn the_log_writer_yields_to_the_workers() {
    let echo = thread_echo_server();
    let (child, rx) = spawn_logged(
        Command::new(BIN)
            .args(["--listen", "127.0.0.1:0", "--upstream", &echo.to_string()])
            .args(["--health-check", "none", "--threads", "2"])
            .env_remove("RUST_LOG"),
    );
    wait_listening(&rx);
    let pid = child.0.id();
    // The writer runs at the lowest priority ...
    assert_eq!(nice_of_threads(pid, "tcplb-log"), vec![19], "the log writer's nice value");
    // ... and only the writer: the workers keep the priority tcplb was
    // started with.
    let process = procfs::process::Process::new(pid as i32).expect("tcplb's /proc entry");
    let started = process.stat().expect("tcplb's stat").nice;
    assert!(started < 19, "tcplb was started at the lowest priority: nothing to compare");
    for worker in ["tcplb-worker-0", "tcplb-worker-1"] {
        assert_eq!(nice_of_threads(pid, worker), vec![started], "{worker}'s nice value");
    }
}
