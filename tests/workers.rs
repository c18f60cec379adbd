//! How connections are spread over the data-plane workers: a few long-lived
//! connections end up evenly spread whichever worker the kernel's hash
//! chose, every byte of a handed-over connection arrives in order, and the
//! per-worker gauge shows where they are.

mod common;

use std::time::Duration;

use common::*;
use tcplb::config::{Config, Protocol, WorkerBalance};
use tokio::net::TcpStream;

const WORKERS: usize = 4;

/// tcplb with [`WORKERS`] workers, `balance`, and the admin endpoint, in
/// front of one echo backend.
async fn lb(balance: WorkerBalance) -> Lb {
    let (echo, _) = echo_backend().await;
    let mut l = listener(&[echo]);
    l.protocol = Protocol::Tcp;
    let mut c: Config = with_admin(l);
    c.threads = Some(WORKERS);
    c.worker_balance = balance;
    start(c).await
}

/// One echo round trip of `n` bytes: the connection is established and
/// accepted (so its worker has counted it) when this returns.
async fn round_trip(s: &mut TcpStream, n: usize, seed: u64) {
    echo_on(s, &random_bytes(n, seed)).await;
}

/// Opens twice as many connections as there are workers, one at a time as
/// a connection pool does: each is accepted (and placed) before the next
/// one connects.
async fn open_pool(lb: &Lb) -> Vec<TcpStream> {
    let mut conns = Vec::new();
    for i in 0..2 * WORKERS {
        let mut s = TcpStream::connect(lb.addr).await.expect("connect to tcplb");
        round_trip(&mut s, 1000, i as u64).await;
        conns.push(s);
    }
    conns
}

fn per_worker(m: &Samples) -> Vec<f64> {
    (0..WORKERS)
        .map(|i| get(m, "tcplb_worker_connections", &[("worker", &i.to_string())]))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_lived_connections_are_spread_evenly_over_the_workers() {
    let lb = lb(WorkerBalance::Fewest).await;
    let admin = lb.admin.expect("admin endpoint");
    let mut conns = open_pool(&lb).await;
    let m = scrape(admin).await;
    assert_eq!(per_worker(&m), vec![2.0; WORKERS], "8 connections over 4 workers");
    // Every connection, moved or not, still carries bulk both ways intact.
    for (i, s) in conns.iter_mut().enumerate() {
        round_trip(s, 300_000, 100 + i as u64).await;
    }
    // Closing them empties every worker.
    drop(conns);
    let mut m = scrape(admin).await;
    for _ in 0..200 {
        if per_worker(&m) == vec![0.0; WORKERS] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        m = scrape(admin).await;
    }
    assert_eq!(per_worker(&m), vec![0.0; WORKERS], "closed connections still counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_hash_the_kernel_decides_and_nothing_is_handed_over() {
    let lb = lb(WorkerBalance::Hash).await;
    let admin = lb.admin.expect("admin endpoint");
    let before = get(&scrape(admin).await, "tcplb_worker_handoffs_total", &[]);
    let _conns = open_pool(&lb).await;
    let m = scrape(admin).await;
    assert_eq!(per_worker(&m).iter().sum::<f64>(), (2 * WORKERS) as f64);
    assert_eq!(get(&m, "tcplb_worker_handoffs_total", &[]), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_connections_through_handoffs_lose_nothing() {
    // Short connections from many tasks at once, so that workers hand some
    // over while others accept: each one's bytes come back whole.
    let lb = lb(WorkerBalance::Fewest).await;
    let tasks: Vec<_> = (0..64u64)
        .map(|i| {
            let addr = lb.addr;
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.expect("connect to tcplb");
                round_trip(&mut s, 20_000 + i as usize * 997, i).await;
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("a connection failed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_switches_the_policy_for_new_connections() {
    let (echo, _) = echo_backend().await;
    let config = |addr, balance| {
        let mut l = listener_on(addr, &[echo]);
        l.protocol = Protocol::Tcp;
        let mut c: Config = with_admin(l);
        c.threads = Some(WORKERS);
        c.worker_balance = balance;
        c
    };
    let lb = start(config("127.0.0.1:0".parse().unwrap(), WorkerBalance::Hash)).await;
    let admin = lb.admin.expect("admin endpoint");
    // The bound address, so the reload keeps the socket.
    lb.handle.reload(config(lb.addr, WorkerBalance::Fewest)).await.expect("reload");
    let _conns = open_pool(&lb).await;
    assert_eq!(per_worker(&scrape(admin).await), vec![2.0; WORKERS], "after the reload");
}
