//! `splice = "auto"` (the default) splices bulk data and copies small
//! messages, also on one long-lived connection that goes from one to the
//! other and back. Its own test binary: it reads the process-wide splice
//! metrics (`tcplb_spliced_bytes`, `tcplb_splice_pipes`), which other tests
//! splicing alongside would move.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tcplb::config::{Protocol, SpliceMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(20);

/// Round trips of `size` bytes, one message in flight at a time, as a
/// database or Redis client sends them; each answer is checked.
async fn chat(s: &mut TcpStream, rounds: usize, size: usize, seed: u64) {
    let work = async {
        let mut back = vec![0u8; size];
        for i in 0..rounds {
            let msg = random_bytes(size, seed + i as u64);
            s.write_all(&msg).await.expect("write");
            s.read_exact(&mut back).await.expect("read back");
            assert_eq!(back, msg, "round trip {i} came back changed");
        }
    };
    tokio::time::timeout(T, work).await.expect("chat timed out");
}

/// Scrapes `admin` until its backend `backend` shows `moved` bytes each way
/// in `tcplb_bytes_total`: the client may read the last bytes before tcplb
/// has counted them.
async fn counted(admin: SocketAddr, backend: SocketAddr, moved: usize) -> Samples {
    let backend = backend.to_string();
    let done = |m: &Samples| {
        ["up", "down"].map(|d| {
            let labels = [("listener", "test"), ("backend", backend.as_str()), ("direction", d)];
            get(m, "tcplb_bytes_total", &labels)
        }) == [moved as f64; 2]
    };
    let mut m = scrape(admin).await;
    for _ in 0..500 {
        if done(&m) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        m = scrape(admin).await;
    }
    assert!(done(&m), "{moved} bytes each way not counted in tcplb_bytes_total");
    m
}

/// A keep-alive connection with small messages passes 1 MiB sooner or
/// later; it must keep copying them (two syscalls a message) rather than
/// splice each one (four). Bulk data on the same connection is spliced, and
/// when the messages turn small again it goes back to copying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_splices_bulk_data_and_copies_small_messages() {
    const SMALL: usize = 700;
    const ROUNDS: usize = 2000; // 1.4 MB each way: past 1 MiB
    let (echo, _) = echo_backend().await;
    let mut l = listener(&[echo]);
    l.protocol = Protocol::Tcp;
    let lb = start(with_admin(l)).await;
    let admin = lb.admin.expect("admin endpoint");
    let spliced = |m: &Samples| get(m, "tcplb_spliced_bytes_total", &[]);
    // Pipes the test harness holds (output capture).
    let others = pipe_fds();
    let mut s = TcpStream::connect(lb.addr).await.expect("connect to tcplb");

    chat(&mut s, ROUNDS, SMALL, 0).await;
    let m = scrape(admin).await;
    assert_eq!(spliced(&m), 0.0, "small messages were spliced");
    assert_eq!(get(&m, "tcplb_splice_pipes", &[]), 0.0);
    assert_eq!(pipe_fds(), others);

    const BULK: usize = 8 << 20;
    echo_on(&mut s, &random_bytes(BULK, 7)).await;
    let after_bulk = spliced(&counted(admin, echo, ROUNDS * SMALL + BULK).await);
    assert!(after_bulk >= BULK as f64, "only {after_bulk} of 2 × {BULK} bulk bytes were spliced");

    chat(&mut s, ROUNDS, SMALL, 100_000).await;
    let m = scrape(admin).await;
    // Small messages again: spliced only until `auto` has closed a window
    // of 64 small reads per direction (two windows at most, when the bulk
    // transfer left one nearly full of bytes).
    let more = spliced(&m) - after_bulk;
    assert!(
        more <= (2 * 2 * 64 * SMALL) as f64,
        "{more} bytes of small messages spliced after the bulk transfer"
    );
    // Every pipe the gauge counts is a real one, and what stays open is the
    // pool: at most 8, and one per worker.
    let pipes = get(&m, "tcplb_splice_pipes", &[]);
    assert_eq!(pipes as usize * 2, pipe_fds() - others, "the gauge disagrees with /proc/self/fd");
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(pipes >= 1.0 && pipes as usize <= 8 + workers, "{pipes} pipes open");

    // `splice = "on"` splices small messages too: whoever asked for it gets
    // it, from the first byte, every byte.
    let (echo_on, _) = echo_backend().await;
    let mut l = listener(&[echo_on]);
    l.protocol = Protocol::Tcp;
    l.splice = SpliceMode::On;
    let lb_on = start(with_admin(l)).await;
    let admin_on = lb_on.admin.expect("admin endpoint");
    let before = spliced(&scrape(admin_on).await);
    let mut s = TcpStream::connect(lb_on.addr).await.expect("connect to tcplb");
    chat(&mut s, 300, SMALL, 200_000).await;
    let m = counted(admin_on, echo_on, 300 * SMALL).await;
    assert_eq!(spliced(&m) - before, (2 * 300 * SMALL) as f64, "with splice on, bytes were copied");
}
