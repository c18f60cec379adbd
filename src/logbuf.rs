//! The bounded, lossy, batching buffer between the threads that log and
//! stderr. A worker thread only appends a formatted line to it; a thread of
//! its own writes it out in one write(2) per batch. A worker never waits
//! for stderr: when whoever reads it stalls (a log collector that hangs, a
//! container log driver that blocks, a full journald) the buffer fills and
//! lines are dropped and counted in `tcplb_log_lines_dropped_total`,
//! instead of every connection on the worker freezing in write(2).
//!
//! Batching is the point: a line costs a copy under a short lock, not a
//! message on a channel, a wake-up of the writer thread and a write(2) of
//! its own (docs/benchmarks.md measures the difference at ~10k connections
//! per second, each with its access line). Access lines batch longer than
//! the rest (up to a second, or 1 MiB), and while they keep coming the
//! writer wakes on its own timer, once a batch, as each wake-up of the
//! writer costs the workers on a busy machine.
//!
//! A leaf, so that the access log (in `conn`) can append its lines here
//! directly, without going through tracing's formatter: see [`direct`].
//! The JSON line format ([`JsonLines`]) and the [`List`] field that it
//! writes as a JSON array live here too, for the same reason.

use std::cell::Cell;
use std::fmt;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::registry::LookupSpan;

use crate::stats::LOG_LINES_DROPPED;

/// Bytes held for stderr at most: about 10,000 access lines, twice a
/// [`FLUSH_AT`] batch; more would only delay the moment a stalled reader
/// is noticed.
const BUFFERED_BYTES: usize = 2 << 20;

/// How long the writer lets a batch gather after a line that should be
/// seen soon (anything logged through tracing: start, warnings, errors):
/// short enough that `tail -f` looks live.
const URGENT_WINDOW: Duration = Duration::from_millis(20);

/// How long access lines may wait for the writer at most. Each time the
/// writer thread wakes costs the workers far more than its own work, on a
/// busy machine (docs/benchmarks.md: per TLS connection, about 20 µs with a
/// batch every 20 ms, 10 µs with a wake-up to start each batch and one to
/// end it, 3 µs with one a second). So while access lines keep coming the
/// writer wakes once a window, on its own timer; a line wakes it only when
/// it had gone idle, or when [`FLUSH_AT`] bytes wait.
const LAZY_WINDOW: Duration = Duration::from_secs(1);

/// Bytes that wake the writer before [`LAZY_WINDOW`] is over, half way to
/// a full buffer: at 25 000 access lines a second, about five wake-ups a
/// second; below about 5 000, none.
const FLUSH_AT: usize = BUFFERED_BYTES / 2;

/// A writer's batch buffer larger than this is given back after a write.
const KEEP_CAPACITY: usize = FLUSH_AT * 2;

/// The lines waiting for stderr and what wakes the thread that writes them.
#[derive(Debug, Default)]
pub struct Lines {
    /// Formatted lines, whole, in the order they were logged.
    lines: Mutex<Vec<u8>>,
    /// Signalled when a line arrives while the writer is idle, when `lines`
    /// passes [`FLUSH_AT`], when an urgent line arrives, and on shutdown.
    ready: Condvar,
    /// The writer waits with no deadline (a window ended with nothing to
    /// write): the next line must wake it. Read and written under the lock
    /// of `lines`.
    idle: AtomicBool,
    /// An urgent line waits: the batch goes out after [`URGENT_WINDOW`].
    urgent: AtomicBool,
    /// Set by [`stop`](Self::stop): write out what is left, then return.
    stopping: AtomicBool,
}

impl Lines {
    /// The buffer, even if a thread panicked while holding it: what it
    /// holds is whole lines or nothing, as `append` never panics midway.
    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        self.lines.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues one formatted line (or several, whole) to be written within
    /// [`URGENT_WINDOW`], or drops and counts it when the buffer is full.
    /// Never blocks on stderr.
    pub fn append(&self, line: &[u8]) {
        self.queue(line, true);
    }

    /// Queues a line that may wait up to [`LAZY_WINDOW`] (an access line).
    pub fn append_lazy(&self, line: &[u8]) {
        self.queue(line, false);
    }

    fn queue(&self, line: &[u8], urgent: bool) {
        let wake = {
            let mut lines = self.lock();
            let before = lines.len();
            if before + line.len() > BUFFERED_BYTES {
                LOG_LINES_DROPPED.fetch_add(1, Ordering::Relaxed);
                return;
            }
            lines.extend_from_slice(line);
            // A wake-up for an idle writer (no timer of its own runs), one
            // when the batch grows large, one for its first urgent line.
            // Each is evaluated: an urgent line that wakes an idle writer
            // must still shorten its window.
            let idle = self.idle.swap(false, Ordering::Relaxed);
            let large = before < FLUSH_AT && lines.len() >= FLUSH_AT;
            let first_urgent = urgent && !self.urgent.swap(true, Ordering::Relaxed);
            idle || large || first_urgent
        };
        if wake {
            self.ready.notify_one();
        }
    }

    /// Makes [`write_out`](Self::write_out) write what is left and return.
    pub fn stop(&self) {
        {
            // Under the lock, or the writer could check the flag, miss the
            // store and the notification, and wait for ever.
            let _lines = self.lock();
            self.stopping.store(true, Ordering::Release);
        }
        self.ready.notify_one();
    }

    /// The writer thread: writes a batch at the end of each window
    /// ([`LAZY_WINDOW`], or [`URGENT_WINDOW`] once an urgent line waits),
    /// or as soon as [`FLUSH_AT`] bytes wait, with the lock released, so a
    /// stalled stderr blocks only this thread. A window starts when the
    /// last batch went out; one that ends with nothing to write leaves the
    /// writer idle until the next line, so an idle tcplb's writer sleeps.
    pub fn write_out(&self, out: &mut impl Write) {
        let mut spare = Vec::new();
        // A window starts with the first line, as nothing waits yet.
        let mut started: Option<std::time::Instant> = None;
        loop {
            {
                let mut lines = self.lock();
                loop {
                    if self.stopping.load(Ordering::Acquire) || lines.len() >= FLUSH_AT {
                        break;
                    }
                    let Some(since) = started else {
                        // Idle: the next line wakes the writer and starts a window.
                        if lines.is_empty() {
                            self.idle.store(true, Ordering::Relaxed);
                            lines = self.ready.wait(lines).unwrap_or_else(|p| p.into_inner());
                            continue;
                        }
                        started = Some(std::time::Instant::now());
                        continue;
                    };
                    let urgent = self.urgent.load(Ordering::Relaxed);
                    let window = if urgent { URGENT_WINDOW } else { LAZY_WINDOW };
                    let left = window.saturating_sub(since.elapsed());
                    if left.is_zero() {
                        if !lines.is_empty() {
                            break;
                        }
                        started = None;
                        continue;
                    }
                    lines =
                        self.ready.wait_timeout(lines, left).unwrap_or_else(|p| p.into_inner()).0;
                }
                self.idle.store(false, Ordering::Relaxed);
                if lines.is_empty() {
                    // Stopping, and nothing is left.
                    return;
                }
                self.urgent.store(false, Ordering::Relaxed);
                std::mem::swap(&mut *lines, &mut spare);
                // The next window starts now, while lines keep coming: the
                // writer wakes at its end on its own timer, not for a line.
                started = Some(std::time::Instant::now());
            }
            // A write error (stderr closed) loses this batch; the next one
            // is tried all the same, as a reader may come back.
            let _ = out.write_all(&spare).and_then(|()| out.flush());
            spare.clear();
            // Kept between batches (no allocation and page faults each
            // time), unless it grew past what busy batches need.
            if spare.capacity() > KEEP_CAPACITY {
                spare.shrink_to(FLUSH_AT);
            }
        }
    }
}

/// How lines that skip tracing's formatter must look to match the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// tracing-subscriber's plain text lines, without colours.
    Text,
    /// One flat JSON object per line, as `--log-format json` writes.
    Json,
}

/// Where lines may go directly, and in what style; set once by the binary.
static DIRECT: OnceLock<(Style, Arc<Lines>)> = OnceLock::new();

/// Lets code that logs often (the access log) format its own lines in
/// `style` and append them to `lines`. Only the first call counts.
pub fn allow_direct(style: Style, lines: Arc<Lines>) {
    let _ = DIRECT.set((style, lines));
}

/// The buffer and style for a line formatted without tracing, when the
/// binary allowed it (not in tests, nor with colours on a terminal):
/// otherwise such a line goes through tracing as any other event.
pub fn direct() -> Option<(Style, &'static Lines)> {
    DIRECT.get().map(|(style, lines)| (*style, &**lines))
}

/// `--log-format json`: one flat JSON object per event, `timestamp`,
/// `level`, the message and fields in the order given, `target` last (as
/// tracing-subscriber's JSON format with `flatten_event`), except that a
/// [`List`] field is a JSON array rather than a string.
#[derive(Debug, Default)]
pub struct JsonLines {
    /// A fixed time for every line, for tests; None: the clock.
    pub at: Option<SystemTime>,
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // Events forwarded from the `log` crate carry their real level and
        // target in `log.*` fields.
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        let time = humantime::format_rfc3339_micros(self.at.unwrap_or_else(SystemTime::now));
        let mut line = format!("{{\"timestamp\":\"{time}\",\"level\":\"{}\"", meta.level());
        event.record(&mut JsonFields(&mut line));
        line.push_str(",\"target\":");
        push_json_string(&mut line, meta.target());
        line.push('}');
        writeln!(writer, "{line}")
    }
}

/// Appends `"name":value` for each field of an event.
struct JsonFields<'l>(&'l mut String);

impl JsonFields<'_> {
    fn key(&mut self, field: &Field) {
        let name = field.name();
        self.0.push(',');
        push_json_string(self.0, name.strip_prefix("r#").unwrap_or(name));
    }

    fn raw(&mut self, field: &Field, value: impl fmt::Display) {
        self.key(field);
        self.0.push(':');
        let _ = fmt::Write::write_fmt(self.0, format_args!("{value}"));
    }

    fn string(&mut self, field: &Field, value: &str) {
        self.key(field);
        self.0.push(':');
        push_json_string(self.0, value);
    }
}

impl Visit for JsonFields<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.raw(field, serde_json::Value::from(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.raw(field, value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.raw(field, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.raw(field, value);
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.string(field, value);
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.string(field, &value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name().starts_with("log.") {
            return;
        }
        match render_json(value) {
            (text, true) => self.raw(field, text),
            (text, false) => self.string(field, &text),
        }
    }
}

/// Appends `value` as a JSON string, escaped as serde_json escapes it.
fn push_json_string(out: &mut String, value: &str) {
    match serde_json::to_string(value) {
        Ok(quoted) => out.push_str(&quoted),
        // Not reached: a str always serializes.
        Err(_) => out.push_str("\"\""),
    }
}

thread_local! {
    /// Set while [`JsonLines`] formats a field: a [`List`] then writes
    /// itself as a JSON array ...
    static AS_JSON: Cell<bool> = const { Cell::new(false) };
    /// ... and says so here.
    static WROTE_JSON: Cell<bool> = const { Cell::new(false) };
}

/// A log field that is a list (the addresses a listener bound, the
/// backends DNS added): `[a, b]` in text lines, a JSON array of strings in
/// JSON lines. Log it with `?`: `listen = ?List(addrs)`.
pub struct List<T>(pub Vec<T>);

/// Formats `value` (any field's value) for a JSON line: its text, and
/// whether that text is already JSON (a [`List`]) rather than a string.
fn render_json(value: &dyn fmt::Debug) -> (String, bool) {
    AS_JSON.set(true);
    WROTE_JSON.set(false);
    let text = format!("{value:?}");
    AS_JSON.set(false);
    (text, WROTE_JSON.replace(false))
}

impl<T: fmt::Display> fmt::Debug for List<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let json = AS_JSON.get();
        f.write_str("[")?;
        for (i, item) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(if json { "," } else { ", " })?;
            }
            if json {
                let mut s = String::new();
                push_json_string(&mut s, &item.to_string());
                f.write_str(&s)?;
            } else {
                item.fmt(f)?;
            }
        }
        f.write_str("]")?;
        if json {
            WROTE_JSON.set(true);
        }
        Ok(())
    }
}

/// What the log tests share: a sink they can read, and a fixed clock.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use tracing_subscriber::fmt::time::FormatTime;
    use tracing_subscriber::fmt::MakeWriter;

    /// A fixed time, in the format tracing's default timer uses.
    pub const AT: Duration = Duration::from_micros(1_764_650_123_456_789);

    /// [`AT`] as a time.
    pub fn at() -> SystemTime {
        SystemTime::UNIX_EPOCH + AT
    }

    /// tracing's timer, stopped at [`AT`].
    pub struct Fixed;
    impl FormatTime for Fixed {
        fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
            write!(w, "{}", humantime::format_rfc3339_micros(at()))
        }
    }

    /// Bytes written, kept for the test to read.
    #[derive(Clone, Default)]
    pub struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Captured {
        pub fn bytes(&self) -> Vec<u8> {
            self.0.lock().unwrap().clone()
        }

        pub fn text(&self) -> String {
            String::from_utf8(self.bytes()).unwrap()
        }
    }

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::Captured;
    use super::*;

    /// A writer on a sink a test can read.
    fn writer() -> (Arc<Lines>, Captured, std::thread::JoinHandle<()>) {
        let lines = Arc::new(Lines::default());
        let out = Captured::default();
        let writer = {
            let (lines, mut out) = (Arc::clone(&lines), out.clone());
            std::thread::spawn(move || lines.write_out(&mut out))
        };
        (lines, out, writer)
    }

    #[test]
    fn access_lines_wait_for_a_large_batch_or_an_urgent_line() {
        let (lines, out, writer) = writer();
        lines.append_lazy(b"lazy 1\n");
        std::thread::sleep(Duration::from_millis(300));
        assert!(out.bytes().is_empty(), "a lazy line alone waits");
        lines.append(b"urgent\n");
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(out.bytes(), b"lazy 1\nurgent\n", "an urgent line takes it along");
        // Enough lazy bytes go out at once, without waiting for the window.
        let line = vec![b'x'; 1023];
        for _ in 0..FLUSH_AT / 1024 + 1 {
            lines.append_lazy(&[&line[..], b"\n"].concat());
        }
        std::thread::sleep(Duration::from_millis(300));
        assert!(out.bytes().len() > FLUSH_AT, "a large batch goes out at once");
        lines.stop();
        writer.join().unwrap();
    }

    #[test]
    fn a_lone_urgent_line_goes_out_at_once() {
        let (lines, out, writer) = writer();
        std::thread::sleep(Duration::from_millis(50));
        lines.append(b"warning\n");
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(out.text(), "warning\n", "an urgent line into an empty buffer waits");
        lines.stop();
        writer.join().unwrap();
    }

    /// A sink that notes, at each batch, its size and how often the thread
    /// writing it has slept so far (its voluntary context switches).
    #[derive(Clone, Default)]
    struct Sleeps(Arc<Mutex<Vec<(usize, u64)>>>);

    impl Write for Sleeps {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
            let slept = status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|n| n.trim().parse().ok())
                .unwrap();
            self.0.lock().unwrap().push((buf.len(), slept));
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn steady_access_lines_wake_the_writer_once_a_window_and_an_idle_one_not_at_all() {
        let lines = Arc::new(Lines::default());
        let out = Sleeps::default();
        let writer = {
            let (lines, mut out) = (Arc::clone(&lines), out.clone());
            std::thread::spawn(move || lines.write_out(&mut out))
        };
        // About 1 000 access lines a second for 3.3 s: three windows' worth.
        let line = [b'x'; 99];
        let until = std::time::Instant::now() + Duration::from_millis(3300);
        while std::time::Instant::now() < until {
            lines.append_lazy(&[&line[..], b"\n"].concat());
            std::thread::sleep(Duration::from_millis(1));
        }
        // The last lines go out at the end of their window.
        std::thread::sleep(Duration::from_millis(1200));
        let batches = out.0.lock().unwrap().clone();
        assert!((4..=5).contains(&batches.len()), "one batch a window: {batches:?}");
        let (first, last) = (batches[0].1, batches[batches.len() - 1].1);
        let windows = batches.len() as u64 - 1;
        // Each window's end is one sleep; a wake-up to start each batch as
        // well would make it two.
        assert!(
            last - first <= windows + 1,
            "the writer slept {} times in {windows} windows: {batches:?}",
            last - first
        );
        // Idle: the window after the last batch ends empty, then the writer
        // sleeps until a line comes, and that line starts a window.
        std::thread::sleep(Duration::from_millis(2500));
        lines.append_lazy(b"later\n");
        std::thread::sleep(Duration::from_millis(1300));
        let after = out.0.lock().unwrap().clone();
        assert_eq!(after.len(), batches.len() + 1, "a line after a pause goes out: {after:?}");
        let slept = after[after.len() - 1].1 - last;
        assert!(slept <= 3, "the writer slept {slept} times over a 3.8 s pause and one line");
        lines.stop();
        writer.join().unwrap();
    }

    #[test]
    fn lines_come_out_whole_in_order_and_the_rest_on_stop() {
        let (lines, out, writer) = writer();
        for i in 0..1000 {
            lines.append(format!("line {i}\n").as_bytes());
        }
        lines.stop();
        writer.join().unwrap();
        let expected: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(out.text(), expected);
    }
}

#[cfg(test)]
mod json_tests {
    use super::testing::{at, Captured, Fixed};
    use super::*;

    /// The events that `log` emits, as JSON lines: ours, and tracing's own
    /// flattened JSON format.
    fn both(log: impl Fn()) -> (String, String) {
        let ours = Captured::default();
        let sub = tracing_subscriber::fmt()
            .with_writer(ours.clone())
            .event_format(JsonLines { at: Some(at()) })
            .finish();
        tracing::subscriber::with_default(sub, &log);
        let theirs = Captured::default();
        let sub = tracing_subscriber::fmt()
            .with_writer(theirs.clone())
            .with_timer(Fixed)
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .finish();
        tracing::subscriber::with_default(sub, &log);
        (ours.text(), theirs.text())
    }

    #[test]
    fn json_lines_match_tracings_json_format_but_for_lists() {
        let error = std::io::Error::other("bad \"thing\"\n");
        let (ours, theirs) = both(|| {
            tracing::info!(
                listener = "a\"b",
                n = 3u64,
                m = -4i64,
                ok = true,
                x = 1.5,
                "hello \"you\""
            );
            tracing::warn!(addr = %"127.0.0.1:1".parse::<std::net::SocketAddr>().unwrap(), why = ?Some(1), "w");
            tracing::error!(error = &error as &dyn std::error::Error, r#type = "t", "e");
            tracing::debug!("not logged at the default level");
        });
        assert_eq!(ours, theirs);
        assert_eq!(ours.lines().count(), 3, "{ours}");
    }

    #[test]
    fn a_list_is_an_array_in_json_and_bracketed_in_text() {
        let addrs: Vec<std::net::SocketAddr> =
            vec!["127.0.0.1:80".parse().unwrap(), "[::1]:81".parse().unwrap()];
        let (ours, _) = both(
            || tracing::info!(listen = ?List(addrs.clone()), empty = ?List(Vec::<String>::new()), "up"),
        );
        let v: serde_json::Value = serde_json::from_str(&ours).unwrap();
        assert_eq!(v["listen"], serde_json::json!(["127.0.0.1:80", "[::1]:81"]), "{ours}");
        assert_eq!(v["empty"], serde_json::json!([]));
        assert_eq!(format!("{:?}", List(addrs)), "[127.0.0.1:80, [::1]:81]");
        // Outside a JSON line, a list formats as text again.
        assert_eq!(format!("{:?}", List(vec!["a\"b"])), "[a\"b]");
    }
}
