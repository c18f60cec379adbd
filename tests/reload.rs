//! Reload in place (through the handle SIGHUP uses) and DNS refresh: added and
//! removed backends and listeners, established connections never cut, failed
//! reloads change nothing.

mod common;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tcplb::config::{Config, ListenerConfig};
use tcplb::Resolve;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(5);

async fn tags(addr: SocketAddr, n: usize) -> String {
    let mut s = String::new();
    for _ in 0..n {
        s.push_str(&String::from_utf8(read_all_from(addr).await).unwrap());
    }
    s
}

/// A listener config on a fixed address (to keep the socket across reloads).
fn on(addr: SocketAddr, upstreams: &[SocketAddr]) -> ListenerConfig {
    listener_on(addr, upstreams)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_and_removes_backends_while_a_long_connection_stays_up() {
    let (echo, _) = echo_backend().await;
    let (b, _) = tag_backend("B").await;
    let (c, _) = tag_backend("C").await;
    let lb = start_one(listener(&[echo, b])).await;
    let addr = lb.addr;

    // A long connection on the echo backend (round-robin starts there).
    let mut long = TcpStream::connect(addr).await.unwrap();
    echo_on(&mut long, b"before").await;
    let echo_backend = lb.backends[0].clone();

    // Replace echo and b by b and c, on the same address.
    let summary = lb.handle.reload(Config::single(on(addr, &[b, c]))).await.unwrap();
    assert!(summary.contains("backends +1 -1"), "{summary}");
    let seen = tags(addr, 6).await;
    assert_eq!(seen.matches('B').count(), 3, "{seen}");
    assert_eq!(seen.matches('C').count(), 3, "{seen}");

    // The removed backend's connection still works, and it is draining.
    echo_on(&mut long, b"after").await;
    assert!(echo_backend.is_draining());
    assert_eq!(echo_backend.active(), 1);
    drop(long);
    assert!(eventually(T, || echo_backend.active() == 0).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_backend_can_be_watched_while_it_drains() {
    let (echo, _) = echo_backend().await;
    let (b, _) = tag_backend("B").await;
    let lb = start(with_admin(listener(&[echo, b]))).await;
    let (addr, admin) = (lb.addr, lb.admin.unwrap());
    let mut long = TcpStream::connect(addr).await.unwrap();
    echo_on(&mut long, b"before").await;

    let mut config = with_admin(on(addr, &[b]));
    config.admin.as_mut().unwrap().listen = admin;
    let summary = lb.handle.reload(config).await.unwrap();
    assert!(summary.contains("backends +0 -1"), "{summary}");

    // Still in /status, as removed, with its connection; still in the metrics.
    let status = |body: String| -> Vec<(String, String, u64)> {
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["listeners"][0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                let s = |k: &str| b[k].as_str().unwrap().to_string();
                (s("address"), s("state"), b["active"].as_u64().unwrap())
            })
            .collect()
    };
    let (_, body) = http_request(admin, "GET", "/status", "").await;
    let backends = status(body);
    assert!(backends.contains(&(echo.to_string(), "removed".into(), 1)), "{backends:?}");
    let active = |m: &Samples| {
        sample(
            m,
            "tcplb_connections_active",
            &[("listener", "test"), ("backend", &echo.to_string())],
        )
    };
    assert_eq!(active(&scrape(admin).await), Some(1.0));

    // Its last connection ends: it is gone from both.
    echo_on(&mut long, b"after").await;
    drop(long);
    assert!(eventually(T, || lb.backends[0].active() == 0).await);
    let (_, body) = http_request(admin, "GET", "/status", "").await;
    assert!(status(body).iter().all(|(a, _, _)| *a != echo.to_string()));
    assert_eq!(active(&scrape(admin).await), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_backend_keeps_health_and_counters() {
    let (a, _) = tag_backend("A").await;
    let dead = dead_addr().await;
    let lb = start_one(listener(&[a, dead])).await;
    let addr = lb.addr;
    tags(addr, 4).await;
    let before = lb.handle.service("test").unwrap().backend(a).unwrap();
    let total = before.total();
    assert!(total >= 2);
    lb.handle.reload(Config::single(on(addr, &[a]))).await.unwrap();
    let after = lb.handle.service("test").unwrap().backend(a).unwrap();
    assert!(Arc::ptr_eq(&before, &after), "same backend object kept");
    assert_eq!(after.total(), total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_reload_keeps_the_old_configuration() {
    let (a, _) = tag_backend("A").await;
    let lb = start_one(listener(&[a])).await;
    let addr = lb.addr;
    // A second listener on an address that is taken: binding fails.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut second = listener_on(taken.local_addr().unwrap(), &[a]);
    second.name = "second".into();
    let (b, _) = tag_backend("B").await;
    let config =
        Config { listeners: vec![on(addr, &[b]), second], ..Config::single(on(addr, &[b])) };
    let err = lb.handle.reload(config).await.unwrap_err();
    assert!(err.to_string().contains("already in use"), "{err}");
    assert_eq!(tags(addr, 3).await, "AAA", "old backends still serve");
    assert_eq!(lb.handle.services().len(), 1);

    // An unresolvable upstream also rejects the whole reload.
    let mut bad = on(addr, &[b]);
    bad.upstreams.push(tcplb::config::Upstream::new("no-such-host.invalid", 80));
    assert!(lb.handle.reload(Config::single(bad)).await.is_err());
    assert_eq!(tags(addr, 2).await, "AA");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_and_removes_listeners_and_keeps_sockets() {
    let (a, _) = tag_backend("A").await;
    let (b, _) = tag_backend("B").await;
    let lb = start_one(listener(&[a])).await;
    let addr = lb.addr;
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut second = listener_on(free, &[b]);
    second.name = "second".into();

    // Hammer the first listener during the reload: no connect may be refused.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let hammer = tokio::spawn(async move {
        let mut n = 0;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            assert_eq!(read_all_from(addr).await, b"A");
            n += 1;
        }
        n
    });
    let config = Config {
        listeners: vec![on(addr, &[a]), second.clone()],
        ..Config::single(on(addr, &[a]))
    };
    let summary = lb.handle.reload(config).await.unwrap();
    assert!(summary.contains("listeners +1 -0"), "{summary}");
    assert_eq!(tags(free, 2).await, "BB");

    // Remove the first listener: its socket closes, the second stays.
    lb.handle.reload(Config::single(second)).await.unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = hammer.await;
    assert!(eventually(T, || std::net::TcpStream::connect(addr).is_err()).await);
    assert_eq!(tags(free, 1).await, "B");
}

/// A resolver whose answers the test changes.
#[derive(Default)]
struct Table(Mutex<HashMap<String, Vec<SocketAddr>>>);

impl Resolve for Table {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>> {
        let r = self.0.lock().unwrap().get(host).cloned();
        Box::pin(async move {
            let addrs = r.ok_or_else(|| io::Error::other("NXDOMAIN"))?;
            Ok(addrs.into_iter().map(|a| SocketAddr::new(a.ip(), port)).collect())
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_changes_are_picked_up_and_failures_keep_the_last_good_set() {
    // One name, one port, two addresses: 127.0.0.1 and ::1 on the same port.
    let (a, _) = tag_backend("A").await;
    let v6 = SocketAddr::new("::1".parse().unwrap(), a.port());
    if tokio::net::TcpListener::bind(v6).await.is_err() {
        eprintln!("SKIPPED: [::1]:{} is not available", a.port());
        return;
    }
    let (b, _) = serve_on(v6, |mut s| async move {
        let _ = s.write_all(b"B").await;
    })
    .await;
    let table = Arc::new(Table::default());
    table.0.lock().unwrap().insert("svc.test".into(), vec![a]);
    let mut l = listener(&[]);
    l.upstreams = vec![tcplb::config::Upstream::new("svc.test", a.port())];
    l.dns_refresh = Some(Duration::from_millis(100));
    let lb = start_with(Config::single(l), table.clone()).await;
    assert_eq!(tags(lb.addr, 2).await, "AA");

    table.0.lock().unwrap().insert("svc.test".into(), vec![a, b]);
    let svc = lb.handle.service("test").unwrap();
    assert!(eventually(T, || svc.backends().len() == 2).await, "new address becomes a backend");
    assert_eq!(tags(lb.addr, 4).await.matches('B').count(), 2);

    // Resolution failure: keep what we had.
    table.0.lock().unwrap().clear();
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(svc.backends().len(), 2);

    // The name now points at b only: a leaves the pool.
    table.0.lock().unwrap().insert("svc.test".into(), vec![b]);
    assert!(eventually(T, || svc.backends().len() == 1).await);
    assert_eq!(tags(lb.addr, 3).await, "BBB");
}
