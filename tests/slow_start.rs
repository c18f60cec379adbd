//! Slow start: a backend that comes back is not flooded. It ramps from a
//! small share to its full one over the window, counted in connections per
//! interval after its health rise.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tcplb::config::HealthCheck;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_backend_ramps_up_over_the_window() {
    let (a, _a) = tag_backend("A").await;
    let (b, b_task) = tag_backend("B").await;
    let mut l = listener(&[a, b]);
    l.protocol = tcplb::config::Protocol::Tcp;
    l.slow_start = Duration::from_secs(2);
    l.health.check = HealthCheck::Connect;
    l.health.interval = Duration::from_millis(100);
    l.health.rise = 1;
    l.health.fall = 1;
    let lb = start_one(l).await;

    b_task.abort();
    let _ = b_task.await;
    assert!(eventually(Duration::from_secs(5), || !lb.backends[1].health.is_up()).await);
    let _b = serve_on(b, |mut s| async move {
        use tokio::io::AsyncWriteExt;
        let _ = s.write_all(b"B").await;
    })
    .await;
    assert!(eventually(Duration::from_secs(5), || lb.backends[1].health.is_up()).await);

    // Connections one after another, for the window and a bit: B's share
    // per 500 ms.
    let start = Instant::now();
    let mut windows = vec![(0u32, 0u32); 5];
    while start.elapsed() < Duration::from_millis(2500) {
        let mut s = TcpStream::connect(lb.addr).await.unwrap();
        let mut tag = Vec::new();
        s.read_to_end(&mut tag).await.unwrap();
        let w = &mut windows[(start.elapsed().as_millis() / 500).min(4) as usize];
        w.0 += 1;
        w.1 += (tag == b"B") as u32;
    }
    let share: Vec<f64> = windows.iter().map(|(n, b)| *b as f64 / (*n).max(1) as f64).collect();
    eprintln!("B's share per 500 ms after it came back: {share:.2?} of {windows:?}");
    assert!(share[0] < 0.25, "flooded at once: {share:.2?}");
    assert!(share[4] > 0.40, "never reached its share: {share:.2?}");
    assert!(share[0] < share[3], "no ramp: {share:.2?}");
}
