//! Outlier ejection: a backend that passes its probes but fails real
//! connections (it accepts, then hangs up on every request) is taken out by
//! the failures and kept out for `ejection_time`, doubled the next time,
//! while its passing probes wait; and no more than `max_ejection_percent`
//! of a pool is out at once.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tcplb::config::{HealthCheck, HealthConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A backend that passes a tcp probe (it keeps a silent connection open)
/// and hangs up on a client as soon as it sends anything.
async fn hangs_up_on_requests() -> SocketAddr {
    serve(|mut s| async move {
        let mut b = [0u8; 1];
        let _ = s.read(&mut b).await;
    })
    .await
    .0
}

fn ejecting(ejection: Option<Duration>) -> HealthConfig {
    HealthConfig {
        check: HealthCheck::Connect,
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(500),
        rise: 1,
        fall: 2,
        ejection_time: ejection,
        max_ejection_time: Duration::from_secs(10),
        max_ejection_percent: 50,
        ..HealthConfig::default()
    }
}

/// One GET through `lb` (replayed to a good backend when a bad one hangs up).
async fn get(lb: SocketAddr) {
    let mut s = TcpStream::connect(lb).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
}

/// Sends GETs until `bad` is down; returns when that happened.
async fn until_down(lb: &Lb, bad: usize) -> Instant {
    for _ in 0..200 {
        get(lb.addr).await;
        if !lb.backends[bad].health.is_up() {
            return Instant::now();
        }
    }
    panic!("the failing backend never went down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_failing_real_traffic_stays_out_for_its_ejection_time_doubling() {
    let (good, _g) = tag_backend("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
    let bad = hangs_up_on_requests().await;
    let mut l = listener(&[good, bad]);
    l.health = ejecting(Some(Duration::from_secs(1)));
    let lb = start_one(l).await;

    let down = until_down(&lb, 1).await;
    // Its probes pass every 100 ms (rise = 1), yet it stays out.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!lb.backends[1].health.is_up(), "back after {:?}, inside its ejection", down.elapsed());
    while !lb.backends[1].health.is_up() {
        assert!(down.elapsed() < Duration::from_secs(3), "not back after its ejection");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first = down.elapsed();
    assert!(first >= Duration::from_millis(950), "{first:?}");
    let line = lb.backends[1].transitions();
    assert!(line.iter().any(|t| !t.up && t.reason.contains("ejected for 1s")), "{line:?}");

    // Failing again at once: out twice as long.
    let down = until_down(&lb, 1).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!lb.backends[1].health.is_up(), "the second ejection lasts 2 s");
    let t = lb.backends[1].transitions();
    assert!(t.iter().any(|t| !t.up && t.reason.contains("ejected for 2s")), "{t:?}");
    let _ = down;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_ejection_passing_probes_bring_it_back_at_once() {
    let (good, _g) = tag_backend("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
    let bad = hangs_up_on_requests().await;
    let mut l = listener(&[good, bad]);
    l.health = ejecting(None);
    let lb = start_one(l).await;
    let down = until_down(&lb, 1).await;
    while !lb.backends[1].health.is_up() {
        assert!(down.elapsed() < Duration::from_secs(2));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(down.elapsed() < Duration::from_millis(700), "{:?}", down.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_more_than_max_ejection_percent_of_a_pool_is_out() {
    let (good, _g) = tag_backend("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
    let (bad1, bad2) = (hangs_up_on_requests().await, hangs_up_on_requests().await);
    let mut l = listener(&[good, bad1, bad2]);
    l.health = ejecting(Some(Duration::from_secs(5)));
    l.health.max_ejection_percent = 34; // one of three
    let lb = start_one(l).await;
    for _ in 0..60 {
        get(lb.addr).await;
    }
    let out = lb.backends.iter().filter(|b| !b.health.is_up()).count();
    assert_eq!(out, 1, "one of the two failing backends is ejected, the other kept in");
}

#[test]
fn the_file_keys_for_ejection_and_slow_start() {
    let file =
        "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\nupstreams = [\"127.0.0.1:1\"]\n\
                slow_start = \"30s\"\n[listener.health]\nejection_time = \"10s\"\n\
                max_ejection_time = \"2m\"\nmax_ejection_percent = 25\n";
    let c = tcplb::config::file::parse(file, "t.toml").unwrap();
    let l = &c.listeners[0];
    assert_eq!(l.slow_start, Duration::from_secs(30));
    assert_eq!(l.health.ejection_time, Some(Duration::from_secs(10)));
    assert_eq!(l.health.max_ejection_time, Duration::from_secs(120));
    assert_eq!(l.health.max_ejection_percent, 25);
    let bad = file.replace("= 25", "= 0").replace("\"30s\"", "\"soon\"");
    let err = tcplb::config::file::parse(&bad, "t.toml").unwrap_err().0.join("\n");
    assert!(err.contains("max_ejection_percent must be a whole number from 1 to 100"), "{err}");
    assert!(err.contains("slow_start"), "{err}");
    let typo = file.replace("ejection_time = \"10s\"", "ejection_tme = \"10s\"");
    let err = tcplb::config::file::parse(&typo, "t.toml").unwrap_err().0.join("\n");
    assert!(err.contains("ejection_tme") && err.contains("ejection_time"), "did-you-mean: {err}");
}
