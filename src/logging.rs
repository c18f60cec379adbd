//! Logging: tracing's fmt subscriber (text or JSON) on stderr, through a
//! bounded, lossy, non-blocking writer. A worker thread only formats a line
//! and queues it; a thread of its own writes the queue out. When whoever
//! reads stderr stalls (a log collector that hangs, a container log driver
//! that blocks, a full journald) the queue fills and lines are dropped and
//! counted, instead of every connection on the worker freezing in write(2).
//! Once the writer catches up, one warning says how many lines were lost,
//! and `tcplb_log_lines_dropped_total` counts them all.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

use crate::stats::LOG_LINES_DROPPED;

/// Lines queued for stderr at most: about 2 MiB of text, and about half a
/// second of access log at the connection rates measured here.
const QUEUED_LINES: usize = 8 * 1024;

/// How often the number of dropped lines is looked at.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// Keeps the log writer running; dropping it flushes what is queued.
#[derive(Debug)]
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    /// Flushes and stops the writer thread when dropped.
    _writer: WorkerGuard,
}

/// Installs the global subscriber: `filter`, JSON or text lines, colours
/// when stderr is a terminal.
pub fn init(filter: EnvFilter, json: bool) -> LogGuard {
    use std::io::IsTerminal;
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("tcplb-log")
        .finish(std::io::stderr());
    watch_drops(writer.error_counter());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::stderr().is_terminal());
    if json {
        builder.json().flatten_event(true).with_current_span(false).init();
    } else {
        builder.init();
    }
    LogGuard { _writer: guard }
}

/// Publishes the writer's drop count for the metrics, and once the drops
/// stop (the reader caught up) logs how many lines were lost.
fn watch_drops(counter: ErrorCounter) {
    let watch = move || {
        let (mut reported, mut last) = (0u64, 0u64);
        loop {
            std::thread::sleep(WATCH_EVERY);
            let dropped = counter.dropped_lines() as u64;
            LOG_LINES_DROPPED.store(dropped, Ordering::Relaxed);
            if dropped == last && dropped > reported {
                tracing::warn!(
                    dropped = dropped - reported,
                    total = dropped,
                    "log lines were dropped: the reader of stderr fell behind"
                );
                reported = dropped;
            }
            last = dropped;
        }
    };
    // Without the thread only the warning and the metric are lost.
    let _ = std::thread::Builder::new().name("tcplb-log-watch".into()).spawn(watch);
}
