//! The status page in a real browser: headless Chromium (Debian's
//! `chromium`, scripts/install-test-deps.sh installs it) renders GET / from
//! the running binary, scripts included, and the page must show every
//! backend with its state, and follow a backend that dies. Skipped loudly
//! without Chromium, except in CI.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{spawn_logged, wait_line, wait_listening, BIN};

/// The page's DOM once its scripts have run, as Chromium renders it.
fn rendered(url: &str) -> Option<String> {
    let profile = common::tempdir("chromium");
    let out = Command::new("timeout")
        .arg("60")
        .arg("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=3000"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--dump-dom", url])
        .output()
        .ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The state the page shows for `backend`.
fn state_on_page(dom: &str, backend: SocketAddr) -> Option<String> {
    let row = dom.split(&format!("<tr data-backend=\"{backend}\">")).nth(1)?;
    let row = row.split("</tr>").next()?;
    let state = row.split("<span class=\"state ").nth(1)?;
    Some(state.split('"').next()?.to_string())
}

#[test]
fn the_status_page_shows_every_backend_and_follows_a_death() {
    if Command::new("chromium").arg("--version").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "chromium missing in CI");
        eprintln!("SKIPPED: chromium not installed (scripts/install-test-deps.sh installs it)");
        return;
    }
    // Backends for TCP probes: the kernel completes the handshake; dropping
    // the socket makes the next probe fail.
    let (alive, dying) =
        (TcpListener::bind("127.0.0.1:0").unwrap(), TcpListener::bind("127.0.0.1:0").unwrap());
    let (a, d) = (alive.local_addr().unwrap(), dying.local_addr().unwrap());
    let (_tcplb, rx) = spawn_logged(
        Command::new(BIN)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                &a.to_string(),
                "--upstream",
                &d.to_string(),
            ])
            .args([
                "--admin",
                "127.0.0.1:0",
                "--health-interval",
                "200ms",
                "--health-timeout",
                "200ms",
            ])
            .args(["--rise", "1", "--fall", "1"])
            .env_remove("RUST_LOG"),
    );
    wait_listening(&rx);
    let line = wait_line(&rx, "admin endpoint listening");
    let admin = line.split("addr=").nth(1).unwrap().trim().to_string();
    let url = format!("http://{admin}/");
    std::thread::sleep(Duration::from_millis(600));

    let dom = rendered(&url).expect("chromium renders the page");
    assert!(dom.contains("tcplb"), "{dom}");
    assert_eq!(state_on_page(&dom, a).as_deref(), Some("up"), "{dom}");
    assert_eq!(state_on_page(&dom, d).as_deref(), Some("up"), "{dom}");

    drop(dying);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let dom = rendered(&url).expect("chromium renders the page");
        if state_on_page(&dom, d).as_deref() == Some("down") {
            assert_eq!(state_on_page(&dom, a).as_deref(), Some("up"), "{dom}");
            assert!(dom.contains("connection refused"), "the page says why: {dom}");
            break;
        }
        assert!(Instant::now() < deadline, "the page never showed the backend down: {dom}");
        std::thread::sleep(Duration::from_millis(300));
    }
    drop(alive);
}
