//! Process signals: the first SIGTERM or SIGINT starts a drain; a second
//! SIGINT exits at once; SIGHUP reloads the configuration file; SIGUSR2
//! upgrades the binary in place (`upgrade`).

use std::path::PathBuf;

use tracing::{error, info, warn};

use crate::config::Overrides;
use crate::control::handle::Handle;

/// Exit code after a second SIGINT (128 + SIGINT, as shells report it).
const FORCED_EXIT: i32 = 130;

/// The process's signal handlers, installed before anything listens so that
/// no signal can arrive while its default action (terminate) still applies.
#[derive(Debug)]
pub struct Signals {
    /// SIGTERM, SIGINT, SIGHUP and SIGUSR2 streams (None when they could
    /// not be installed).
    streams: Option<(Signal, Signal, Signal, Signal)>,
}

use tokio::signal::unix::Signal;

impl Signals {
    /// Installs the handlers; must be called inside the runtime.
    pub fn install() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        let streams = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
            signal(SignalKind::user_defined2()),
        ) {
            (Ok(t), Ok(i), Ok(h), Ok(u)) => Some((t, i, h, u)),
            (Err(e), _, _, _) | (_, Err(e), _, _) | (_, _, Err(e), _) | (_, _, _, Err(e)) => {
                warn!(error = %e, "cannot install signal handlers; only Ctrl-C will stop tcplb");
                None
            }
        };
        Signals { streams }
    }

    /// Splits into the shutdown future and the task that answers SIGHUP (a
    /// reload, with `overrides`, the command line's, over every reloaded
    /// file) and SIGUSR2 (an upgrade).
    pub fn split(
        self,
        config: Option<PathBuf>,
        overrides: Overrides,
        handle: Handle,
    ) -> (impl std::future::Future<Output = ()>, impl std::future::Future<Output = ()>) {
        let (term_int, hup, usr2) = match self.streams {
            Some((t, i, h, u)) => (Some((t, i)), Some(h), Some(u)),
            None => (None, None, None),
        };
        let upgrade = upgrade_on_usr2(usr2, handle.clone());
        let reload = reload_on_hangup(hup, config, overrides, handle);
        (shutdown(term_int), async move {
            tokio::join!(reload, upgrade);
        })
    }
}

/// Resolves on the first SIGTERM or SIGINT, and arms the second-SIGINT exit.
async fn shutdown(streams: Option<(Signal, Signal)>) {
    let Some((mut term, mut int)) = streams else {
        let _ = tokio::signal::ctrl_c().await;
        return;
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

/// On every SIGUSR2, starts an upgrade; the control loop logs how it went.
async fn upgrade_on_usr2(usr2: Option<Signal>, handle: Handle) {
    let Some(mut usr2) = usr2 else { return };
    while usr2.recv().await.is_some() {
        info!("SIGUSR2: upgrading in place");
        let _ = handle.upgrade().await;
    }
}

/// On every SIGHUP, re-reads and validates `path` and applies it, with the
/// command line's `overrides` over it; an invalid file is logged problem by
/// problem and the running configuration stays.
async fn reload_on_hangup(
    hup: Option<Signal>,
    path: Option<PathBuf>,
    overrides: Overrides,
    handle: Handle,
) {
    let Some(mut hup) = hup else { return };
    while hup.recv().await.is_some() {
        let Some(path) = &path else {
            info!("SIGHUP: no --config file, nothing to reload");
            continue;
        };
        info!(file = %path.display(), "SIGHUP: reloading");
        match crate::config::file::load(path) {
            Err(problems) => {
                crate::stats::RELOADS_FAILED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                for p in &problems.0 {
                    error!("{p}");
                }
                warn!(
                    problems = problems.0.len(),
                    "reload rejected: keeping the running configuration"
                );
            }
            Ok(mut config) => {
                overrides.apply(&mut config);
                // The control loop logs the summary or the failure.
                let _ = handle.reload(config).await;
            }
        }
    }
}
