//! Health checks that speak the backend's protocol, against real servers:
//! redis-server, PostgreSQL and `openssl s_server` from Debian
//! (scripts/install-test-deps.sh installs them), and scripted MySQL and
//! SMTP servers. Each test puts good backends next to ones that accept and
//! close at once or answer the wrong thing, and checks that the good ones
//! come up and the others go down and stay down.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tcplb::config::{HealthCheck, HealthConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const INTERVAL: Duration = Duration::from_millis(100);

fn checked(check: HealthCheck) -> HealthConfig {
    HealthConfig {
        check,
        interval: INTERVAL,
        timeout: Duration::from_secs(1),
        rise: 2,
        fall: 2,
        send_proxy: false,
        ..HealthConfig::default()
    }
}

/// Skips (loudly) without `what`, or fails in CI, where the dependency
/// script must have installed it.
fn skip_without(available: bool, what: &str, test: &str) -> bool {
    if !available {
        assert!(
            std::env::var_os("CI").is_none(),
            "{what} missing in CI: scripts/install-test-deps.sh must install it"
        );
        eprintln!("\n*** SKIPPED {test}: install {what} (scripts/install-test-deps.sh does) ***\n");
    }
    !available
}

/// A backend that accepts and closes at once.
async fn closer() -> SocketAddr {
    serve(|s| async move { drop(s) }).await.0
}

/// A backend that answers any bytes with an HTTP 400, as a web server would.
async fn web() -> SocketAddr {
    serve(|mut s| async move {
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf).await;
        let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n").await;
    })
    .await
    .0
}

/// Asserts that backend `i`'s last probe result mentions `needle`: the
/// reason an operator reads on the status page.
fn probe_says(lb: &Lb, i: usize, needle: &str) {
    let last = lb.backends[i].last_probe();
    assert!(last.as_ref().is_some_and(|p| p.detail.contains(needle)), "{needle:?} not in {last:?}");
}

/// Waits until every backend named in `up` is up and every other one is
/// down, then watches for ten more intervals that none of them changes.
async fn settles(lb: &Lb, up: &[bool]) {
    let states = || lb.backends.iter().map(|b| b.health.is_up()).collect::<Vec<_>>();
    let start = Instant::now();
    while states() != up {
        assert!(start.elapsed() < Duration::from_secs(10), "want {up:?}, have {:?}", states());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..50 {
        tokio::time::sleep(INTERVAL / 5).await;
        assert_eq!(states(), up, "a backend flapped");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_check_fails_a_backend_that_accepts_and_closes_at_once() {
    let (quiet, _q) = serve(|mut s| async move {
        let mut buf = [0u8; 16];
        let _ = s.read(&mut buf).await; // a client-first server: says nothing
    })
    .await;
    let (greeter, _g) = tag_backend("SSH-2.0-x\r\n").await;
    let mut l = listener(&[quiet, greeter, closer().await]);
    l.health = checked(HealthCheck::Connect);
    let lb = start_one(l).await;
    settles(&lb, &[true, true, false]).await;
    probe_says(&lb, 2, "closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_check_against_real_redis_servers() {
    if skip_without(have("redis-server"), "redis-server", "redis_check_against_real_redis_servers")
    {
        return;
    }
    let (_open, open) = start_redis(&[]);
    let (_locked, locked) = start_redis(&["--requirepass", "secret"]);
    // A redis still loading its data set answers -LOADING: up, not serving.
    let (loading, _l) = serve(|mut s| async move {
        let mut buf = [0u8; 64];
        if s.read(&mut buf).await.unwrap_or(0) > 0 {
            let _ = s.write_all(b"-LOADING Redis is loading the dataset in memory\r\n").await;
        }
    })
    .await;
    let mut l = listener(&[open, locked, closer().await, web().await, loading]);
    l.health = checked(HealthCheck::Redis);
    let lb = start_one(l).await;
    settles(&lb, &[true, true, false, false, false]).await;
    probe_says(&lb, 1, "AUTH");
    probe_says(&lb, 4, "LOADING");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_expect_from_a_config_file() {
    if skip_without(have("redis-server"), "redis-server", "send_expect_from_a_config_file") {
        return;
    }
    let (_r, redis) = start_redis(&[]);
    let (ssh, _s) = tag_backend("SSH-2.0-OpenSSH_9.2\r\n").await;
    let (other, _o) = tag_backend("220 not ssh\r\n").await;
    let dead = closer().await;
    let file = format!(
        r#"
[[listener]]
name = "redis"
listen = "127.0.0.1:0"
upstreams = ["{redis}", "{dead}"]
[listener.health]
interval = "100ms"
rise = 2
fall = 2
send = "PING\r\n"
expect = "+PONG"

[[listener]]
name = "ssh"
listen = "127.0.0.1:0"
upstreams = ["{ssh}", "{other}"]
[listener.health]
interval = "100ms"
rise = 2
fall = 2
expect_hex = "5353482d322e30"
"#
    );
    let config = tcplb::config::file::parse(&file, "checks.toml").expect("valid file");
    let lb = start(config).await;
    settles(&lb, &[true, false, true, false]).await;
}

#[test]
fn send_expect_mistakes_are_named() {
    let bad = |health: &str| {
        let file = format!(
            "[[listener]]\nlisten = \"127.0.0.1:0\"\nupstreams = [\"127.0.0.1:1\"]\n[listener.health]\n{health}\n"
        );
        tcplb::config::file::parse(&file, "t.toml").unwrap_err().0.join("\n")
    };
    assert!(bad("send = \"PING\"").contains("send needs an expect"));
    assert!(bad("expect_hex = \"2b5\"").contains("'2b5' has an odd number of hex digits"));
    assert!(bad("expect_hex = \"zz\"").contains("'zz' is not hex"));
    assert!(bad("expect = \"\"").contains("expect is empty"));
    assert!(bad("check = \"redis\"\nexpect = \"+PONG\"").contains("check = \"redis\" is set too"));
    assert!(bad("expect = \"a\"\nexpect_hex = \"61\"").contains("keep one"));
    assert!(bad("check = \"mongo\"").contains("unknown health check 'mongo'"));
    assert!(bad("check = \"tls\"\nsni = \"bad name!\"").contains("bad server name 'bad name!'"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_check_against_a_real_postgresql() {
    let Some(bin) = postgres_bin() else {
        skip_without(false, "postgresql", "postgres_check_against_a_real_postgresql");
        return;
    };
    let (_pg, pg) = start_postgres(&bin);
    let mut l = listener(&[pg, closer().await, web().await]);
    l.health = checked(HealthCheck::Postgres);
    let lb = start_one(l).await;
    settles(&lb, &[true, false, false]).await;
    probe_says(&lb, 0, "PostgreSQL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_check_against_openssl_servers() {
    if skip_without(have_openssl(), "openssl", "tls_check_against_openssl_servers") {
        return;
    }
    let tmp = tempdir("tls-check");
    let dir = tmp.path();
    make_cert(dir, "api.example.com");
    let (_any, any) = s_server(dir, "api.example.com", &[]);
    let (_v13, v13) = s_server(dir, "api.example.com", &["-tls1_3"]);
    let mut l = listener(&[any, v13, closer().await, web().await]);
    l.health = checked(HealthCheck::Tls);
    l.health.sni = Some("api.example.com".into());
    let lb = start_one(l).await;
    settles(&lb, &[true, true, false, false]).await;
    probe_says(&lb, 1, "TLS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_and_smtp_checks_against_scripted_servers() {
    fn packet(payload: &[u8]) -> Vec<u8> {
        let mut p = (payload.len() as u32).to_le_bytes()[..3].to_vec();
        p.push(0);
        p.extend_from_slice(payload);
        p
    }
    let mut greeting = vec![10u8];
    greeting.extend_from_slice(b"8.0.36\0\x08\0\0\0abcdefgh\0");
    let greeting = packet(&greeting);
    let (mysql, _m) = serve(move |mut s| {
        let g = greeting.clone();
        async move {
            let _ = s.write_all(&g).await;
            let _ = s.read(&mut [0u8; 64]).await;
        }
    })
    .await;
    let blocked =
        packet(b"\xff\x69\x04Host '127.0.0.1' is blocked because of many connection errors");
    let (mysql_blocked, _b) = serve(move |mut s| {
        let b = blocked.clone();
        async move {
            let _ = s.write_all(&b).await;
        }
    })
    .await;
    let quits = Arc::new(AtomicUsize::new(0));
    let q = Arc::clone(&quits);
    let (smtp, _s) = serve(move |mut s| {
        let q = Arc::clone(&q);
        async move {
            let _ = s.write_all(b"220-mail.example.com ESMTP\r\n220 ready\r\n").await;
            let mut buf = [0u8; 64];
            if let Ok(n) = s.read(&mut buf).await {
                if &buf[..n] == b"QUIT\r\n" {
                    q.fetch_add(1, Ordering::Relaxed);
                    let _ = s.write_all(b"221 bye\r\n").await;
                }
            }
        }
    })
    .await;
    let (smtp_refusing, _r) = tag_backend("554 no service\r\n").await;

    let mut l = listener(&[mysql, mysql_blocked, closer().await]);
    l.health = checked(HealthCheck::Mysql);
    let lb = start_one(l).await;
    settles(&lb, &[true, false, false]).await;
    probe_says(&lb, 1, "is blocked");

    let mut l = listener(&[smtp, smtp_refusing, closer().await]);
    l.health = checked(HealthCheck::Smtp);
    let lb = start_one(l).await;
    settles(&lb, &[true, false, false]).await;
    assert!(quits.load(Ordering::Relaxed) > 0, "the probe says QUIT after the greeting");
}

/// The directory of Debian's PostgreSQL binaries, if installed.
fn postgres_bin() -> Option<std::path::PathBuf> {
    let mut found: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("postgres").exists())
        .collect();
    found.sort();
    found.pop()
}

/// A running PostgreSQL: stopped first, then its directory removed (fields
/// drop in order).
struct Postgres {
    _server: Proc,
    _dir: tempfile::TempDir,
}

/// A fresh PostgreSQL cluster on a free loopback port. PostgreSQL will not
/// run as root: as root, it runs as the `postgres` user the package made.
fn start_postgres(bin: &std::path::Path) -> (Postgres, SocketAddr) {
    let tmp = tempdir("pg");
    let dir = tmp.path();
    let data = dir.join("data");
    let as_root = running_as_root();
    let run = |program: &str| {
        let mut c;
        if as_root {
            c = Command::new("setpriv");
            c.args(["--reuid=postgres", "--regid=postgres", "--init-groups", "--"]);
            c.arg(bin.join(program));
        } else {
            c = Command::new(bin.join(program));
        }
        c
    };
    if as_root {
        let ok = Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir).status().unwrap();
        assert!(ok.success());
    }
    let ok = run("initdb")
        .args(["-A", "trust", "-U", "postgres", "-D"])
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success(), "initdb failed");
    let port = free_port();
    let child = run("postgres")
        .arg("-D")
        .arg(&data)
        .args(["-p", &port.to_string(), "-h", "127.0.0.1", "-k"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_accepting(addr, "postgres");
    (Postgres { _server: Proc(child), _dir: tmp }, addr)
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}
