//! Logging: tracing's fmt subscriber (text or JSON) on stderr, through a
//! bounded, lossy, batching writer. A worker thread only formats a line and
//! appends it to a shared buffer; a thread of its own writes the buffer out
//! in one write(2) per batch. A worker never waits for stderr: when whoever
//! reads it stalls (a log collector that hangs, a container log driver that
//! blocks, a full journald) the buffer fills and lines are dropped and
//! counted, instead of every connection on the worker freezing in write(2).
//! Once the writer catches up, one warning says how many lines were lost,
//! and `tcplb_log_lines_dropped_total` counts them all.
//!
//! Batching is the point: a line costs a copy under a short lock, not a
//! message on a channel, a wake-up of the writer thread and a write(2) of
//! its own (docs/benchmarks.md measures the difference at ~10k connections
//! per second, each with its access line).

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::stats::LOG_LINES_DROPPED;

/// Bytes held for stderr at most: about 7,000 lines, half a second of
/// access log at the connection rates measured here, and 50 batches'
/// worth; more would only delay the moment a stalled reader is noticed.
const BUFFERED_BYTES: usize = 1 << 20;

/// How long the writer waits after the first line of a batch for more to
/// join it: short enough that `tail -f` looks live, long enough that a busy
/// server writes a few hundred lines per write(2).
const BATCH_WINDOW: Duration = Duration::from_millis(20);

/// How often the number of dropped lines is looked at.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// Keeps the log writer running; dropping it writes out what is buffered.
#[derive(Debug)]
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    /// The buffer shared with the writer thread.
    shared: Arc<Shared>,
    /// The writer thread, joined on drop.
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        {
            // Under the lock, or the writer could check the flag, miss the
            // store and the notification, and wait for ever.
            let _lines = self.shared.lock();
            self.shared.stopping.store(true, Ordering::Release);
        }
        self.shared.ready.notify_one();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// The lines waiting for stderr and what wakes the thread that writes them.
#[derive(Debug, Default)]
struct Shared {
    /// Formatted lines, whole, in the order they were logged.
    lines: Mutex<Vec<u8>>,
    /// Signalled when `lines` stops being empty, and on shutdown.
    ready: Condvar,
    /// Set when the guard is dropped: write out what is left, then stop.
    stopping: AtomicBool,
}

impl Shared {
    /// The buffer, even if a thread panicked while holding it: what it
    /// holds is whole lines or nothing, as `append` never panics midway.
    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        self.lines.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues one formatted line, or drops and counts it when the buffer is
    /// full. Never blocks on stderr.
    fn append(&self, line: &[u8]) {
        let was_empty = {
            let mut lines = self.lock();
            if lines.len() + line.len() > BUFFERED_BYTES {
                LOG_LINES_DROPPED.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let was_empty = lines.is_empty();
            lines.extend_from_slice(line);
            was_empty
        };
        // One wake-up per batch, not per line.
        if was_empty {
            self.ready.notify_one();
        }
    }

    /// The writer thread: waits for a first line, lets a batch gather, and
    /// writes it out with the lock released, so a stalled stderr blocks
    /// only this thread.
    fn write_out(&self, out: &mut impl Write) {
        let mut spare = Vec::with_capacity(64 << 10);
        loop {
            {
                let mut lines = self.lock();
                while lines.is_empty() && !self.stopping.load(Ordering::Acquire) {
                    lines = self.ready.wait(lines).unwrap_or_else(|p| p.into_inner());
                }
                if lines.is_empty() {
                    return;
                }
            }
            if !self.stopping.load(Ordering::Acquire) {
                std::thread::sleep(BATCH_WINDOW);
            }
            std::mem::swap(&mut *self.lock(), &mut spare);
            // A write error (stderr closed) loses this batch; the next one
            // is tried all the same, as a reader may come back.
            let _ = out.write_all(&spare).and_then(|()| out.flush());
            spare.clear();
            spare.shrink_to(64 << 10);
        }
    }
}

/// What the fmt layer writes each event through: one `write_all` per
/// formatted line.
#[derive(Clone, Debug)]
struct BatchWriter(Arc<Shared>);

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
    let shared = Arc::new(Shared::default());
    let writer = {
        let shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("tcplb-log".into())
            // Not `stderr().lock()`: held between batches it would block the
            // eprintln! of an error on the way out.
            .spawn(move || shared.write_out(&mut std::io::stderr()))
            .ok()
    };
    watch_drops();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(BatchWriter(Arc::clone(&shared)))
        .with_ansi(std::io::stderr().is_terminal());
    if json {
        builder.json().flatten_event(true).with_current_span(false).init();
    } else {
        builder.init();
    }
    LogGuard { shared, writer }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_come_out_whole_in_order_and_the_rest_on_drop() {
        let shared = Arc::new(Shared::default());
        let out = Arc::new(Mutex::new(Vec::new()));
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let writer = {
            let (shared, out) = (Arc::clone(&shared), Arc::clone(&out));
            std::thread::spawn(move || shared.write_out(&mut Sink(out)))
        };
        let guard = LogGuard { shared: Arc::clone(&shared), writer: Some(writer) };
        let mut w = BatchWriter(Arc::clone(&shared));
        for i in 0..1000 {
            w.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        drop(guard);
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        let expected: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(text, expected);
    }
}
