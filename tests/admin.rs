//! The admin endpoint: metrics that move exactly with traffic (parsed with a
//! real Prometheus text parser), readiness during drain, status JSON, and
//! drain/enable for rolling deploys.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tcplb::config::{AdminConfig, Config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_exactly_with_the_traffic() {
    let (echo, _) = echo_backend().await;
    let dead = dead_addr().await;
    let lb = start(with_admin(listener(&[echo, dead]))).await;
    let admin = lb.admin.unwrap();
    let (e, d) = (echo.to_string(), dead.to_string());

    // Four echoes of 1000 bytes: round-robin tries the dead one twice (refused, then retried).
    for i in 0..4 {
        let got = echo_through(lb.addr, random_bytes(1000, i)).await;
        assert_eq!(got.len(), 1000);
    }
    let svc = lb.handle.service("test").unwrap();
    let b = svc.backend(echo).unwrap();
    assert!(eventually(T, || b.active() == 0).await);

    // A connection leaves its backend's active count just before its
    // duration is recorded: scrape until the last one is in.
    let ended = |m: &Samples| {
        let count = sample(m, "tcplb_connection_duration_seconds_count", &[("listener", "test")]);
        count.unwrap_or(0.0) >= 4.0
    };
    let deadline = tokio::time::Instant::now() + T;
    let mut m = scrape(admin).await;
    while !ended(&m) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
        m = scrape(admin).await;
    }
    let eb = [("listener", "test"), ("backend", e.as_str())];
    assert_eq!(get(&m, "tcplb_connections_total", &eb), 4.0);
    assert_eq!(get(&m, "tcplb_connections_active", &eb), 0.0);
    assert_eq!(get(&m, "tcplb_bytes_total", &[eb[0], eb[1], ("direction", "up")]), 4000.0);
    assert_eq!(get(&m, "tcplb_bytes_total", &[eb[0], eb[1], ("direction", "down")]), 4000.0);
    let db = [("listener", "test"), ("backend", d.as_str())];
    let refused = get(&m, "tcplb_connect_errors_total", &[db[0], db[1], ("reason", "refused")]);
    assert!(refused >= 1.0, "{refused}");
    assert_eq!(get(&m, "tcplb_connect_errors_total", &[db[0], db[1], ("reason", "timeout")]), 0.0);
    assert_eq!(get(&m, "tcplb_backend_up", &eb), 1.0);
    assert_eq!(get(&m, "tcplb_connect_duration_seconds_count", &[("listener", "test")]), 4.0);
    assert_eq!(get(&m, "tcplb_connection_duration_seconds_count", &[("listener", "test")]), 4.0);
    assert_eq!(
        get(&m, "tcplb_synthesized_responses_total", &[("listener", "test"), ("status", "502")]),
        0.0
    );
    assert!(m.contains_key(&("tcplb_accept_errors_total".to_string(), vec![])));

    // A held connection shows as active; an HTTP client with every backend dead gets a counted 502.
    let mut held = TcpStream::connect(lb.addr).await.unwrap();
    held.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    held.read_exact(&mut one).await.unwrap();
    let m = scrape(admin).await;
    assert_eq!(get(&m, "tcplb_connections_active", &eb), 1.0);
    drop(held);

    b.set_draining(true);
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut out)).await.unwrap().unwrap();
    assert!(out.starts_with(b"HTTP/1.1 502"), "{}", String::from_utf8_lossy(&out));
    let m = scrape(admin).await;
    assert_eq!(
        get(&m, "tcplb_synthesized_responses_total", &[("listener", "test"), ("status", "502")]),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_flips_to_503_on_shutdown_while_a_connection_drains() {
    let (echo, _) = echo_backend().await;
    let mut config = with_admin(listener(&[echo]));
    config.drain_timeout = Duration::from_secs(20);
    let mut lb = start(config).await;
    let admin = lb.admin.unwrap();
    assert_eq!(http_request(admin, "GET", "/healthz", "").await.0, 200);
    assert_eq!(http_request(admin, "GET", "/readyz", "").await, (200, "ready\n".into()));

    let mut s = established(lb.addr).await;
    let mut b = [0u8; 1];
    lb.shutdown();
    let admin_ok = async {
        loop {
            if http_request(admin, "GET", "/readyz", "").await == (503, "draining\n".into()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(T, admin_ok).await.expect("/readyz must answer 503 while draining");
    assert_eq!(http_request(admin, "GET", "/healthz", "").await.0, 200, "still alive");
    s.write_all(b"b").await.unwrap();
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"b", "the draining connection still works");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_when_a_listener_has_no_backend_up() {
    let (a, _) = tag_backend("A").await;
    let lb = start(with_admin(listener(&[a]))).await;
    lb.backends[0].health.set_up(false);
    let (code, body) = http_request(lb.admin.unwrap(), "GET", "/readyz", "").await;
    assert_eq!(code, 503);
    assert!(body.contains("no backend up"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_waits_for_a_passing_health_check() {
    use tcplb::config::{HealthCheck, HealthConfig};
    let checked = |l: &mut tcplb::config::ListenerConfig| {
        l.health = HealthConfig {
            check: HealthCheck::Connect,
            interval: Duration::from_millis(200),
            timeout: Duration::from_millis(200),
            rise: 1,
            fall: 3,
            send_proxy: false,
            ..HealthConfig::default()
        };
    };
    // Every backend dead: never ready, not even before the first checks.
    let mut l = listener(&[dead_addr().await]);
    checked(&mut l);
    let dead = start(with_admin(l)).await;
    let readyz = |admin| async move { http_request(admin, "GET", "/readyz", "").await };
    let (code, body) = readyz(dead.admin.unwrap()).await;
    assert_eq!(code, 503, "ready with every backend dead: {body}");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (code, body) = readyz(dead.admin.unwrap()).await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("no backend up"), "{body}");

    // A live backend: ready once its first check has passed.
    let (a, _) = tag_backend("A").await;
    let mut l = listener(&[a]);
    checked(&mut l);
    let live = start(with_admin(l)).await;
    let admin = live.admin.unwrap();
    let (code, body) = readyz(admin).await;
    assert!(code == 200 || body.contains("waiting for the first health checks"), "{code} {body}");
    let mut ready = false;
    for _ in 0..50 {
        if readyz(admin).await.0 == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "a backend passing its checks must make the listener ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_and_enable_change_where_new_connections_go_and_keep_established_ones() {
    let (echo, _) = echo_backend().await;
    let (b, _) = tag_backend("B").await;
    let lb = start(with_admin(listener(&[echo, b]))).await;
    let admin = lb.admin.unwrap();
    let mut long = TcpStream::connect(lb.addr).await.unwrap();
    long.write_all(b"1").await.unwrap();
    let mut one = [0u8; 1];
    long.read_exact(&mut one).await.unwrap();

    let q = format!("/backends/drain?listener=test&backend={echo}");
    let (code, body) = http_request(admin, "POST", &q, "").await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["state"], "draining");
    assert_eq!(v["active"], 1);
    for _ in 0..4 {
        assert_eq!(read_all_from(lb.addr).await, b"B", "a drained backend gets no new connection");
    }
    long.write_all(b"2").await.unwrap();
    long.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"2", "its established connection is intact");

    let q = format!("/backends/enable?listener=test&backend={echo}");
    assert_eq!(http_request(admin, "POST", &q, "").await.0, 200);
    let mut saw_echo = false;
    for _ in 0..4 {
        let mut s = TcpStream::connect(lb.addr).await.unwrap();
        s.write_all(b"e").await.unwrap();
        s.shutdown().await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        saw_echo |= out == b"e";
    }
    assert!(saw_echo, "enabled again");

    // Errors name the problem.
    assert_eq!(
        http_request(admin, "POST", "/backends/drain?listener=nope&backend=127.0.0.1:1", "")
            .await
            .0,
        404
    );
    assert_eq!(
        http_request(admin, "POST", "/backends/drain?listener=test&backend=bad", "").await.0,
        400
    );
    assert_eq!(http_request(admin, "GET", "/backends/drain", "").await.0, 405);
    assert_eq!(http_request(admin, "GET", "/nothing", "").await.0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_json_with_listeners_and_backends() {
    let (a, _) = tag_backend("A").await;
    let mut l = listener(&[a]);
    l.health = tcplb::config::HealthConfig {
        check: tcplb::config::HealthCheck::Connect,
        interval: Duration::from_millis(50),
        ..Default::default()
    };
    let lb = start(with_admin(l)).await;
    read_all_from(lb.addr).await;
    let b = lb.backends[0].clone();
    // The client has the backend's FIN when read_all_from returns; the
    // connection ends when tcplb then reads the client's own.
    assert!(eventually(T, || b.active() == 0).await);
    assert!(eventually(T, || b.last_probe().is_some()).await);
    let (code, body) = http_request(lb.admin.unwrap(), "GET", "/status", "").await;
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).expect("valid JSON");
    let l = &v["listeners"][0];
    assert_eq!(l["name"], "test");
    assert_eq!(l["strategy"], "round-robin");
    assert_eq!(l["listen"][0], lb.addr.to_string());
    let be = &l["backends"][0];
    assert_eq!(be["address"], a.to_string());
    assert_eq!(be["state"], "up");
    assert_eq!(be["total"], 1);
    assert_eq!(be["active"], 0);
    assert_eq!(be["last_check"]["ok"], true);
    assert!(be["last_check"]["at_unix_ms"].as_u64().unwrap() > 0);
    assert_eq!(v["draining"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_is_required_off_loopback() {
    let (a, _) = tag_backend("A").await;
    let lb = start_one(listener(&[a])).await;
    let query = format!("listener=test&backend={a}");
    let registry = || tcplb::metrics::registry(NoServices);
    let post = hyper::Method::POST;
    // Routing only: nothing is bound off loopback in tests.
    let exposed: SocketAddr = "0.0.0.0:9901".parse().unwrap();
    let open = tcplb::Admin::new(lb.handle.clone(), registry(), None, exposed);
    assert_eq!(open.route(&post, "/backends/drain", Some(&query), None, None).0, 403);
    assert_eq!(
        open.route(&hyper::Method::GET, "/healthz", None, None, None).0,
        200,
        "reads stay open"
    );

    let guarded = tcplb::Admin::new(lb.handle.clone(), registry(), Some("s3cret".into()), exposed);
    assert_eq!(guarded.route(&post, "/backends/drain", Some(&query), None, None).0, 401);
    assert_eq!(
        guarded.route(&post, "/backends/drain", Some(&query), Some("Bearer wrong"), None).0,
        401
    );
    assert_eq!(
        guarded.route(&post, "/backends/drain", Some(&query), Some("Bearer s3cret"), None).0,
        200
    );
    assert!(lb.backends[0].is_draining());

    // On loopback without a token, POSTs are allowed.
    let local =
        tcplb::Admin::new(lb.handle.clone(), registry(), None, "127.0.0.1:9901".parse().unwrap());
    assert_eq!(local.route(&post, "/backends/enable", Some(&query), None, None).0, 200);
    assert!(!lb.backends[0].is_draining());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_probes_and_the_bearer_scheme_in_any_case() {
    let (a, _) = tag_backend("A").await;
    let lb = start_one(listener(&[a])).await;
    let query = format!("listener=test&backend={a}");
    let registry = || tcplb::metrics::registry(NoServices);
    let (head, post) = (hyper::Method::HEAD, hyper::Method::POST);
    let loopback: SocketAddr = "127.0.0.1:9901".parse().unwrap();
    let admin = tcplb::Admin::new(lb.handle.clone(), registry(), Some("s3cret".into()), loopback);
    // Load balancers and kubelets probe with HEAD.
    assert_eq!(admin.route(&head, "/healthz", None, None, None).0, 200);
    assert_eq!(admin.route(&head, "/readyz", None, None, None).0, 200);
    // RFC 7235: the scheme is case-insensitive; the token is not.
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let auth = format!("{scheme} s3cret");
        assert_eq!(admin.route(&post, "/backends/enable", Some(&query), Some(&auth), None).0, 200);
    }
    assert_eq!(
        admin.route(&post, "/backends/enable", Some(&query), Some("Bearer S3CRET"), None).0,
        401
    );
    // With a token set, it is required on loopback too.
    assert_eq!(admin.route(&post, "/backends/enable", Some(&query), None, None).0, 401);
}

#[derive(Debug)]
struct NoServices;

impl tcplb::metrics::Source for NoServices {
    fn services(&self) -> std::sync::Arc<Vec<std::sync::Arc<tcplb::Service>>> {
        std::sync::Arc::new(Vec::new())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_file_over_http() {
    let (a, _) = tag_backend("A").await;
    let dir = tempdir("admin");
    let token = dir.path().join("token");
    std::fs::write(&token, "tok-123\n").unwrap();
    let mut c = Config::single(listener(&[a]));
    c.admin = Some(AdminConfig { listen: "127.0.0.1:0".parse().unwrap(), token_file: Some(token) });
    let lb = start(c).await;
    let q = format!("/backends/drain?listener=test&backend={a}");
    assert_eq!(http_request(lb.admin.unwrap(), "POST", &q, "").await.0, 401);
    let auth = "Authorization: Bearer tok-123\r\n";
    assert_eq!(http_request(lb.admin.unwrap(), "POST", &q, auth).await.0, 200);
}

/// Checks a scrape as Prometheus would: every family has HELP and TYPE, and
/// every histogram's buckets never decrease and end at `_count`.
fn check_exposition(text: &str) -> Result<(), String> {
    use std::collections::HashMap;
    let mut typed: HashMap<&str, &str> = HashMap::new();
    let mut helped = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("#"), Some("TYPE"), Some(name)) => {
                typed.insert(name, words.next().unwrap_or(""));
            }
            (Some("#"), Some("HELP"), Some(name)) => helped.push(name),
            _ => {}
        }
    }
    for name in typed.keys() {
        if !helped.contains(name) {
            return Err(format!("{name} has no HELP"));
        }
    }
    // Per histogram series (its labels but `le`): the bucket values in order, and _count.
    let mut buckets: HashMap<String, Vec<f64>> = HashMap::new();
    let mut counts: HashMap<String, f64> = HashMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let value: f64 = value.parse().map_err(|_| format!("bad value in {line}"))?;
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        if let Some(base) = name.strip_suffix("_bucket") {
            let rest: Vec<&str> =
                labels.trim_end_matches('}').split(',').filter(|l| !l.starts_with("le=")).collect();
            buckets.entry(format!("{base}{{{}}}", rest.join(","))).or_default().push(value);
        } else if let Some(base) = name.strip_suffix("_count") {
            counts.insert(format!("{base}{{{}}}", labels.trim_end_matches('}')), value);
        }
    }
    for (series, values) in &buckets {
        if values.windows(2).any(|w| w[1] < w[0]) {
            return Err(format!("{series}: buckets decrease: {values:?}"));
        }
        let count = counts.get(series).ok_or(format!("{series}: no _count"))?;
        if values.last() != Some(count) {
            return Err(format!("{series}: +Inf {:?} but _count {count}", values.last()));
        }
    }
    if buckets.is_empty() {
        return Err("no histogram in the scrape".into());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn histograms_in_the_scrape_are_valid() {
    let (a, _) = tag_backend("A").await;
    let lb = start(with_admin(listener(&[a]))).await;
    for _ in 0..9 {
        read_all_from(lb.addr).await;
    }
    let admin = lb.admin.unwrap();
    // The last connection's duration is observed just after its close.
    assert!(
        eventually(Duration::from_secs(5), || lb.backends[0].active() == 0).await,
        "connections still open"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (code, text) = http_request(admin, "GET", "/metrics", "").await;
    assert_eq!(code, 200);
    check_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert!(text.contains("tcplb_connect_duration_seconds_count{listener=\"test\"} 9"), "{text}");
}

/// Prometheus's own checker accepts the classic format, and a scraper that
/// asks for OpenMetrics gets it. promtool comes from Debian's `prometheus`
/// (scripts/install-test-deps.sh); skipped loudly without it, except in CI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_the_scrape_and_openmetrics_is_negotiated() {
    let (a, _) = tag_backend("A").await;
    let lb = start(with_admin(listener(&[a]))).await;
    read_all_from(lb.addr).await;
    let admin = lb.admin.unwrap();
    let open = "Accept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n";
    let (_, openmetrics) = http_request(admin, "GET", "/metrics", open).await;
    assert!(openmetrics.ends_with("# EOF\n"), "OpenMetrics asked for: {openmetrics}");
    let (_, classic) = http_request(admin, "GET", "/metrics", "").await;
    assert!(!classic.contains("# EOF"));
    assert!(classic.contains("# TYPE tcplb_connections_total counter"), "{classic}");

    let Ok(mut promtool) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        assert!(std::env::var_os("CI").is_none(), "promtool missing in CI");
        eprintln!("SKIPPED: promtool not installed (scripts/install-test-deps.sh installs it)");
        return;
    };
    use std::io::Write;
    promtool.stdin.take().unwrap().write_all(classic.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    let said =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "promtool: {said}\n{classic}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_build_and_reload_metrics() {
    let (a, _) = tag_backend("A").await;
    let config = with_admin(listener(&[a]));
    let lb = start(config.clone()).await;
    let admin = lb.admin.unwrap();
    let m = scrape(admin).await;
    assert!(get(&m, "process_cpu_seconds_total", &[]) >= 0.0);
    assert!(get(&m, "process_resident_memory_bytes", &[]) > 1e6);
    let fds = get(&m, "process_open_fds", &[]);
    assert!(fds > 3.0 && fds <= get(&m, "process_max_fds", &[]), "{fds}");
    let started = get(&m, "process_start_time_seconds", &[]);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    assert!((now.as_secs_f64() - started).abs() < 600.0, "started at {started}");
    assert_eq!(get(&m, "tcplb_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);
    assert!(get(&m, "tcplb_last_reload_success_timestamp_seconds", &[]) >= started.floor());

    // One reload that applies (the same listener, on its bound address) and
    // one that cannot. (The counters are the process's: compare, not equal.)
    let reloads = |m: &Samples, result| get(m, "tcplb_reloads_total", &[("result", result)]);
    let (ok, failed) = (reloads(&m, "success"), reloads(&m, "failure"));
    let mut same = config.clone();
    same.listeners[0].listen = vec![lb.addr];
    same.admin.as_mut().unwrap().listen = admin;
    lb.handle.reload(same.clone()).await.unwrap();
    let mut unsafe_proxy = same;
    unsafe_proxy.listeners[0].accept_proxy = true;
    unsafe_proxy.listeners[0].deny = vec![tcplb::config::parse_cidr("10.0.0.0/8").unwrap()];
    assert!(lb.handle.reload(unsafe_proxy).await.is_err());
    let m = scrape(admin).await;
    assert_eq!(reloads(&m, "success"), ok + 1.0);
    assert_eq!(reloads(&m, "failure"), failed + 1.0);
}
