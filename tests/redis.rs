//! Real software no one here wrote: redis-benchmark through tcplb to two
//! redis-server processes. Needs the Debian packages redis-server and
//! redis-tools (scripts/install-test-deps.sh installs them); skips loudly without them,
//! except in CI where their absence is a failure.

mod common;

use std::net::SocketAddr;
use std::process::Command;

use common::*;

fn dbsize(addr: SocketAddr) -> u64 {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &addr.port().to_string(), "dbsize"])
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_benchmark_through_tcplb() {
    if !(have("redis-server") && have("redis-benchmark") && have("redis-cli")) {
        assert!(
            std::env::var_os("CI").is_none(),
            "redis-server/redis-tools missing in CI: scripts/install-test-deps.sh must install them"
        );
        eprintln!("\n*** SKIPPED redis_benchmark_through_tcplb: install redis-server and redis-tools (scripts/install-test-deps.sh does) ***\n");
        return;
    }
    let (_r1, a) = start_redis(&[]);
    let (_r2, b) = start_redis(&[]);
    let lb = start_one(listener(&[a, b])).await;
    let port = lb.addr.port().to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("redis-benchmark")
            .args(["-h", "127.0.0.1", "-p", &port, "-n", "20000", "-c", "20", "-r", "1000"])
            .args(["-t", "set,get,incr,lpush,lpop", "-q"])
            .output()
            .expect("run redis-benchmark")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "redis-benchmark failed: {stdout} {stderr}");
    assert!(
        !stdout.to_lowercase().contains("error") && !stderr.to_lowercase().contains("error"),
        "{stdout} {stderr}"
    );
    for cmd in ["SET", "GET", "INCR", "LPUSH", "LPOP"] {
        assert!(stdout.contains(&format!("{cmd}:")), "no {cmd} result in {stdout}");
    }
    // Both servers took traffic.
    assert!(dbsize(a) > 0 && dbsize(b) > 0, "keys on a: {}, on b: {}", dbsize(a), dbsize(b));
}
