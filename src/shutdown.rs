//! Process signals: the first SIGTERM or SIGINT starts a drain; a second
//! SIGINT exits at once; SIGHUP reloads the configuration file.

use std::path::PathBuf;

use tracing::{error, info, warn};

use crate::server::Handle;

/// Exit code after a second SIGINT (128 + SIGINT, as shells report it).
const FORCED_EXIT: i32 = 130;

/// Resolves on the first SIGTERM or SIGINT, and arms the second-SIGINT exit.
pub async fn signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) =
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(t), Ok(i)) => (t, i),
            (Err(e), _) | (_, Err(e)) => {
                warn!(error = %e, "cannot install signal handlers; only Ctrl-C will stop tcplb");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    info!(signal = name, "shutting down: listeners closed, draining connections");
    tokio::spawn(async move {
        int.recv().await;
        warn!("second SIGINT: exiting now");
        std::process::exit(FORCED_EXIT);
    });
}

/// On every SIGHUP, re-reads and validates `path` and applies it; an invalid
/// file is logged problem by problem and the running configuration stays.
pub async fn reload_on_hangup(path: Option<PathBuf>, handle: Handle) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot install the SIGHUP handler; reload is unavailable");
            return;
        }
    };
    while hup.recv().await.is_some() {
        let Some(path) = &path else {
            info!("SIGHUP: no --config file, nothing to reload");
            continue;
        };
        info!(file = %path.display(), "SIGHUP: reloading");
        match crate::config::file::load(path) {
            Err(problems) => {
                for p in &problems.0 {
                    error!("{p}");
                }
                warn!(
                    problems = problems.0.len(),
                    "reload rejected: keeping the running configuration"
                );
            }
            Ok(config) => {
                // The control loop logs the summary or the failure.
                let _ = handle.reload(config).await;
            }
        }
    }
}
