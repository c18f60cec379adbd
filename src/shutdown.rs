//! Process signals: the first SIGTERM or SIGINT starts a drain; a second
//! SIGINT exits at once.

use tracing::{info, warn};

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
