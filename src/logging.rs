//! Logging: tracing's fmt subscriber (text or JSON) on stderr, through the
//! bounded, lossy, batching line buffer (`logbuf`), so that no worker
//! thread ever waits for whoever reads stderr. Once the writer catches up
//! after a stall, one warning says how many lines were lost, and
//! `tcplb_log_lines_dropped_total` counts them all.
//!
//! The access log, one line per connection, is the one event frequent
//! enough for tracing's formatter to show in a profile: it formats its own
//! line in the same style and appends it to the same buffer (except with
//! colours on a terminal, where speed does not matter).

use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::logbuf::{self, Lines, Style};
use crate::stats::LOG_LINES_DROPPED;

/// How often the number of dropped lines is looked at.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// The writer thread's nice value: the lowest priority. Its lines may wait
/// a second anyway, and at the workers' priority its write(2)s on a busy
/// machine cost the workers far more than the writer's own time
/// (docs/benchmarks.md, "seventeenth session"). Still a share of the CPU,
/// not idle-only scheduling, so on a saturated machine it keeps up instead
/// of starving while the buffer fills.
const WRITER_NICE: i32 = 19;

/// Keeps the log writer running; dropping it writes out what is buffered.
#[derive(Debug)]
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    /// The buffer shared with the writer thread.
    lines: Arc<Lines>,
    /// The writer thread, joined on drop.
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.lines.stop();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// What the fmt layer writes each event through: one `write_all` per
/// formatted line.
#[derive(Clone, Debug)]
struct BatchWriter(Arc<Lines>);

impl Write for BatchWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchWriter {
    type Writer = BatchWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Installs the global subscriber: `filter`, JSON or text lines, colours
/// when stderr is a terminal.
pub fn init(filter: EnvFilter, json: bool) -> LogGuard {
    use std::io::IsTerminal;
    let lines = Arc::new(Lines::default());
    let writer = {
        let lines = Arc::clone(&lines);
        std::thread::Builder::new()
            .name("tcplb-log".into())
            // Not `stderr().lock()`: held between batches it would block the
            // eprintln! of an error on the way out.
            .spawn(move || {
                lower_priority();
                lines.write_out(&mut std::io::stderr())
            })
            .ok()
    };
    watch_drops();
    let ansi = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(BatchWriter(Arc::clone(&lines)))
        .with_ansi(ansi);
    if json {
        logbuf::allow_direct(Style::Json, Arc::clone(&lines));
        builder.event_format(logbuf::JsonLines::default()).init();
    } else {
        if !ansi {
            logbuf::allow_direct(Style::Text, Arc::clone(&lines));
        }
        builder.init();
    }
    LogGuard { lines, writer }
}

/// Gives the calling thread the [`WRITER_NICE`] priority. On Linux a nice
/// value belongs to a thread, so the workers keep theirs. If it cannot be
/// set (a sandbox that forbids setpriority) the writer runs as before.
fn lower_priority() {
    let this = rustix::thread::gettid();
    let _ = rustix::process::setpriority_process(Some(this), WRITER_NICE);
}

/// Once the drops stop (the reader caught up) logs how many lines were
/// lost.
fn watch_drops() {
    let watch = move || {
        let (mut reported, mut last) = (0u64, 0u64);
        loop {
            std::thread::sleep(WATCH_EVERY);
            let dropped = LOG_LINES_DROPPED.load(Ordering::Relaxed);
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
    // Without the thread only the warning is lost; the metric still counts.
    let _ = std::thread::Builder::new().name("tcplb-log-watch".into()).spawn(watch);
}
