//! Active and passive health checks, and panic mode, over real sockets.

mod common;

use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tcplb::config::{HealthCheck, HealthConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const INTERVAL: Duration = Duration::from_millis(100);

fn fast_health(check: HealthCheck) -> HealthConfig {
    HealthConfig {
        check,
        interval: INTERVAL,
        timeout: Duration::from_millis(200),
        rise: 2,
        fall: 3,
        send_proxy: false,
        ..HealthConfig::default()
    }
}

/// Probes too rare to matter during a test: only real traffic moves the state.
fn passive_only(fall: u32) -> HealthConfig {
    HealthConfig {
        check: HealthCheck::Connect,
        interval: Duration::from_secs(3600),
        timeout: Duration::from_secs(1),
        rise: 2,
        fall,
        send_proxy: false,
        ..HealthConfig::default()
    }
}

/// Polls `cond` until it holds; returns how long that took, or panics after `limit`.
async fn time_until(limit: Duration, what: &str, cond: impl Fn() -> bool) -> Duration {
    let start = Instant::now();
    assert!(eventually(limit, &cond).await, "{what}: not within {limit:?}");
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_backend_leaves_rotation_and_returns_after_restart() {
    let (a, _a) = tag_backend("A").await;
    let (b, b_task) = tag_backend("B").await;
    let mut l = listener(&[a, b]);
    l.health = fast_health(HealthCheck::Connect);
    let lb = start_one(l).await;

    b_task.abort();
    let _ = b_task.await;
    // interval × fall, plus one interval of jitter and scheduling slack.
    let bound = INTERVAL * 3 + INTERVAL + Duration::from_millis(700);
    let took =
        time_until(Duration::from_secs(5), "B marked down", || !lb.backends[1].health.is_up())
            .await;
    assert!(took <= bound, "took {took:?} > {bound:?}");
    let failures_when_down = lb.backends[1].connect_failures();
    for _ in 0..6 {
        assert_eq!(read_all_from(lb.addr).await, b"A");
    }
    assert_eq!(
        lb.backends[1].connect_failures(),
        failures_when_down,
        "a down backend must not be tried"
    );

    let (_b2, _t) = serve_on(b, |mut s| async move {
        let _ = s.write_all(b"B").await;
    })
    .await;
    let bound = INTERVAL * 2 + INTERVAL + Duration::from_millis(700);
    let took =
        time_until(Duration::from_secs(5), "B back up", || lb.backends[1].health.is_up()).await;
    assert!(took <= bound, "took {took:?} > {bound:?}");
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.extend(read_all_from(lb.addr).await);
    }
    assert!(seen.contains(&b'B') && seen.contains(&b'A'), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_probe_marks_down_on_503_and_up_on_200() {
    let status = Arc::new(AtomicU16::new(200));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let addr = http_backend(Arc::clone(&status), Arc::clone(&seen), "").await;
    let mut l = listener(&[addr]);
    l.health = fast_health("http://svc.test/healthz".parse().unwrap());
    let lb = start_one(l).await;

    assert!(eventually(Duration::from_secs(3), || !seen.lock().unwrap().is_empty()).await);
    let first = seen.lock().unwrap()[0].clone();
    assert!(first.starts_with("GET /healthz HTTP/1.1\r\n"), "{first}");
    assert!(first.contains("Host: svc.test\r\n"), "{first}");
    assert!(lb.backends[0].health.is_up());

    status.store(503, Ordering::Relaxed);
    time_until(Duration::from_secs(3), "down on 503", || !lb.backends[0].health.is_up()).await;
    status.store(200, Ordering::Relaxed);
    time_until(Duration::from_secs(3), "up on 200", || lb.backends[0].health.is_up()).await;
    status.store(302, Ordering::Relaxed);
    tokio::time::sleep(INTERVAL * 5).await;
    assert!(lb.backends[0].health.is_up(), "3xx is healthy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_failures_mark_down_before_any_probe() {
    let dead = dead_addr().await;
    let (live, _) = tag_backend("L").await;
    let mut l = listener(&[dead, live]);
    l.health = passive_only(2);
    let lb = start_one(l).await;
    for _ in 0..8 {
        assert_eq!(read_all_from(lb.addr).await, b"L");
    }
    assert!(!lb.backends[0].health.is_up(), "two real failures must mark it down");
    assert_eq!(lb.backends[0].connect_failures(), 2, "a down backend is no longer tried");
}

/// Reads `c` to its end: tcplb closes it once the backend has, and makes
/// nothing up for the client.
async fn closed_without_a_word(mut c: tokio::net::TcpStream) {
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest))
        .await
        .expect("tcplb closes once the backend has")
        .unwrap();
    assert!(rest.is_empty(), "nothing is made up for the client: {rest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_hang_up_first_are_not_backend_failures() {
    // Closes without a word once its client has ended, as servers do with
    // an aborted request.
    let (addr, _) = serve(|mut s| async move {
        let mut buf = [0u8; 1024];
        while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
    let mut l = listener(&[addr]);
    l.health = passive_only(2);
    let lb = start_one(l).await;
    // Connect-and-hang-up (a TCP liveness probe, a port scan) and a request
    // aborted before its answer, three times each: more than `fall`.
    for i in 0..6 {
        let mut c = tokio::net::TcpStream::connect(lb.addr).await.unwrap();
        if i % 2 == 1 {
            c.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
        }
        c.shutdown().await.unwrap();
        closed_without_a_word(c).await;
    }
    assert!(lb.backends[0].health.is_up(), "the clients hung up, the backend did nothing wrong");

    // Closing while the client still waits is a failure, as before.
    let (slam, _) = serve(|s| async move { drop(s) }).await;
    let mut l = listener(&[slam]);
    l.health = passive_only(2);
    let lb = start_one(l).await;
    for _ in 0..2 {
        let _ = read_all_from(lb.addr).await;
    }
    assert!(!lb.backends[0].health.is_up(), "a backend that hangs up on waiting clients is down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_hangs_up_on_a_non_http_client_is_down() {
    // A Redis client speaks first and waits; the backend closes on it. The
    // bytes are not HTTP, so nothing is held for a replay and the byte pump
    // takes over at once: the hang-up must still count against the backend.
    let (slam, _) = serve(|mut s| async move {
        let mut buf = [0u8; 64];
        let _ = s.read(&mut buf).await;
    })
    .await;
    let mut l = listener(&[slam]);
    l.health = passive_only(2);
    let lb = start_one(l).await;
    for _ in 0..2 {
        let mut c = tokio::net::TcpStream::connect(lb.addr).await.unwrap();
        c.write_all(b"*1\r\n$4\r\nPING\r\n").await.unwrap();
        closed_without_a_word(c).await;
    }
    let down = eventually(Duration::from_secs(5), || !lb.backends[0].health.is_up()).await;
    assert!(down, "a backend that hangs up on its clients is down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_mode_reaches_a_backend_the_probe_calls_down() {
    // The probe expects HTTP; this backend is not HTTP, so the probe fails,
    // but it serves its real clients fine.
    let (a, _) = tag_backend("A").await;
    let mut l = listener(&[a]);
    l.health = fast_health("http:/healthz".parse().unwrap());
    let lb = start_one(l).await;
    time_until(Duration::from_secs(3), "wrongly down", || !lb.backends[0].health.is_up()).await;
    for _ in 0..3 {
        assert_eq!(read_all_from(lb.addr).await, b"A");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_probe_task_per_backend_on_its_own_schedule() {
    let count = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&count);
    let (addr, _) = serve(move |_s| {
        c.fetch_add(1, Ordering::Relaxed);
        async {}
    })
    .await;
    let mut l = listener(&[addr]);
    l.health = fast_health(HealthCheck::Connect);
    let _lb = start_one(l).await;
    tokio::time::sleep(Duration::from_millis(1050)).await;
    let n = count.load(Ordering::Relaxed);
    // About one probe per interval (±10% jitter, random first delay).
    assert!((6..=13).contains(&n), "{n} probes in ~1 s at a 100 ms interval");
}
