//! The systemd unit in contrib/ and the binary's side of `Type=notify`:
//! `systemd-analyze verify` accepts the unit, and tcplb sends READY=1 once it
//! listens, STATUS= after a reload and STOPPING=1 when it drains.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use common::{spawn_logged, wait_listening, BIN};

#[test]
fn systemd_analyze_verifies_the_unit() {
    let unit =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/tcplb.service"))
            .unwrap()
            .replace("/usr/local/bin/tcplb", BIN);
    for must in ["Type=notify", "RestartPreventExitStatus=2", "--check"] {
        assert!(unit.contains(must), "the unit lacks {must}");
    }
    let dir = common::tempdir("unit");
    let path = dir.path().join("tcplb.service");
    std::fs::write(&path, unit).unwrap();
    let Ok(out) = Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&path).output()
    else {
        assert!(std::env::var_os("CI").is_none(), "systemd-analyze missing in CI");
        eprintln!("SKIPPED: systemd-analyze not installed");
        return;
    };
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !said.contains("tcplb.service"), "{said}");
}

#[test]
fn tcplb_tells_systemd_when_it_is_ready_reloaded_and_stopping() {
    let tmp = common::tempdir("notify");
    let dir = tmp.path();
    let socket_path = dir.join("notify.sock");
    let systemd = UnixDatagram::bind(&socket_path).unwrap();
    systemd.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let config = dir.join("tcplb.toml");
    std::fs::write(
        &config,
        "[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\nupstreams = [\"127.0.0.1:1\"]\n\
         [listener.health]\ncheck = \"none\"\n",
    )
    .unwrap();
    let (child, rx) = spawn_logged(
        Command::new(BIN)
            .args(["--config", config.to_str().unwrap()])
            .env("NOTIFY_SOCKET", &socket_path)
            .env_remove("RUST_LOG"),
    );
    wait_listening(&rx);
    let next = || {
        let mut buf = [0u8; 512];
        let n = systemd.recv(&mut buf).expect("a notification from tcplb");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let ready = next();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    let kill = |sig: &str| {
        assert!(Command::new("kill")
            .args([sig, &child.0.id().to_string()])
            .status()
            .unwrap()
            .success())
    };
    kill("-HUP");
    let reloaded = next();
    assert!(reloaded.contains("STATUS=reload applied"), "{reloaded:?}");
    kill("-TERM");
    let stopping = next();
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
}
