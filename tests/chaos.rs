//! Chaos: 200 concurrent clients stream random data through tcplb to 3 echo
//! backends while one backend is killed and restarted every second for 20
//! seconds. Bounded in time; loopback only.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tcplb::config::{HealthCheck, HealthConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

const CLIENTS: u64 = 200;
const RUN: Duration = Duration::from_secs(20);
const PAYLOAD: usize = 32 * 1024;

/// An echo backend that first says its id; aborting its task closes every
/// connection it holds (the JoinSet aborts them on drop).
async fn echo_with_id(addr: SocketAddr, id: u8) -> JoinHandle<()> {
    let l = loop {
        match TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    };
    tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            let Ok((mut s, _)) = l.accept().await else { continue };
            conns.spawn(async move {
                if s.write_all(&[id]).await.is_err() {
                    return;
                }
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
            while conns.try_join_next().is_some() {}
        }
    })
}

/// One client connection's story.
#[derive(Debug)]
struct Record {
    /// Backend id, if the greeting arrived.
    backend: Option<u8>,
    start: Instant,
    end: Instant,
    /// Completed byte-identical.
    ok: bool,
}

async fn one_connection(lb: SocketAddr, seed: u64) -> Record {
    let start = Instant::now();
    let data = random_bytes(PAYLOAD, seed);
    let mut rec = Record { backend: None, start, end: start, ok: false };
    let Ok(s) = TcpStream::connect(lb).await else {
        rec.end = Instant::now();
        return rec;
    };
    let (mut r, mut w) = s.into_split();
    let mut id = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(10), r.read_exact(&mut id)).await {
        Ok(Ok(_)) => rec.backend = Some(id[0]),
        _ => {
            rec.end = Instant::now();
            return rec;
        }
    }
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        for chunk in sent.chunks(4096) {
            if w.write_all(chunk).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = w.shutdown().await;
    });
    let mut got = Vec::with_capacity(PAYLOAD);
    let read = tokio::time::timeout(Duration::from_secs(20), r.read_to_end(&mut got)).await;
    let _ = writer.await;
    rec.end = Instant::now();
    // Whatever arrived must be exactly a prefix of what was sent: never
    // corrupted or reordered, even on a killed backend.
    assert!(
        got.len() <= data.len() && got[..] == data[..got.len()],
        "corrupted stream (seed {seed})"
    );
    rec.ok = matches!(read, Ok(Ok(_))) && got.len() == data.len();
    rec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_killed_every_second_affect_only_their_own_connections() {
    let mut addrs = Vec::new();
    let mut tasks = Vec::new();
    for id in 0..3u8 {
        // Outside the ephemeral range: while a backend is down, neither an
        // outgoing connection nor another listener can take its port.
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        tasks.push(echo_with_id(addr, id).await);
        addrs.push(addr);
    }
    let mut l = listener(&addrs);
    l.health = HealthConfig {
        check: HealthCheck::Connect,
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(200),
        rise: 1,
        fall: 2,
        send_proxy: false,
        ..HealthConfig::default()
    };
    let lb = start_one(l).await;

    let began = Instant::now();
    let records = Arc::new(Mutex::new(Vec::new()));
    let mut clients = JoinSet::new();
    for c in 0..CLIENTS {
        let records = Arc::clone(&records);
        let addr = lb.addr;
        clients.spawn(async move {
            let mut n = 0u64;
            while began.elapsed() < RUN {
                let rec = one_connection(addr, c * 1_000_000 + n).await;
                records.lock().unwrap().push(rec);
                n += 1;
            }
        });
    }

    // Kill one backend every second (in turn) and restart it 200 ms later.
    let mut kills: Vec<(u8, Instant)> = Vec::new();
    let mut round = 0usize;
    while began.elapsed() < RUN - Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(800)).await;
        let id = round % 3;
        tasks[id].abort();
        let _ = (&mut tasks[id]).await;
        kills.push((id as u8, Instant::now()));
        tokio::time::sleep(Duration::from_millis(200)).await;
        tasks[id] = echo_with_id(addrs[id], id as u8).await;
        round += 1;
    }
    while let Some(r) = clients.join_next().await {
        r.expect("a client task failed (corruption or panic)");
    }

    let records = records.lock().unwrap();
    let ok = records.iter().filter(|r| r.ok).count();
    let failed: Vec<&Record> = records.iter().filter(|r| !r.ok).collect();
    eprintln!(
        "chaos: {} connections, {ok} complete, {} cut by {} kills",
        records.len(),
        failed.len(),
        kills.len()
    );
    assert!(kills.len() >= 15, "only {} kills", kills.len());
    assert!(ok >= 1000, "only {ok} complete connections");
    // Every cut connection was on a backend killed while it was open.
    let slack = Duration::from_millis(300);
    for r in &failed {
        let explained = kills.iter().any(|&(id, at)| {
            r.backend.is_none_or(|b| b == id) && at + slack >= r.start && at <= r.end + slack
        });
        assert!(
            explained,
            "connection on backend {:?} failed with no kill of it: {r:?}",
            r.backend
        );
    }
    // New connections kept succeeding throughout: every second has completions.
    for sec in 0..(RUN.as_secs() - 1) {
        let from = began + Duration::from_secs(sec);
        let to = from + Duration::from_secs(1);
        let n = records.iter().filter(|r| r.ok && r.end >= from && r.end < to).count();
        assert!(n > 0, "no connection completed in second {sec}");
    }
    // Every backend served, and took traffic again after its restarts.
    for id in 0..3u8 {
        let late = records
            .iter()
            .filter(|r| r.ok && r.backend == Some(id) && r.start > began + RUN / 2)
            .count();
        assert!(late > 0, "backend {id} never came back");
    }
}
