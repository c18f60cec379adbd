//! The access log: one event per finished connection, at info on the
//! `tcplb::access` target (debug, untargeted, with `access_log = false`).
//!
//! At tens of thousands of connections a second, tracing's formatter is a
//! visible share of the proxy's CPU (a dynamic visitor per field, its own
//! date arithmetic, a line buffer). So when the binary allows it
//! ([`logbuf::direct`]), the line is formatted here, byte for byte as
//! tracing would (a test holds the two to it), and appended to the same
//! buffer; filters still apply, through `tracing::enabled!`.

use std::cell::{Cell, RefCell};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::Level;

use crate::logbuf::{self, Style};

/// The access log's tracing target.
const TARGET: &str = "tcplb::access";

/// One finished connection, as its access-log line shows it.
#[derive(Debug)]
pub struct Entry<'a> {
    /// The listener's name.
    pub listener: &'a str,
    /// The route taken, on a listener with routes.
    pub route: Option<&'a str>,
    /// The TLS server name the client asked for.
    pub sni: Option<&'a str>,
    /// The TLS ALPN protocols the client offered.
    pub alpn: Option<&'a str>,
    /// The client (as a trusted PROXY header names it).
    pub client: SocketAddr,
    /// The connection's own peer, when a PROXY header named another client.
    pub peer: Option<SocketAddr>,
    /// The backend it was (last) connected to.
    pub backend: Option<SocketAddr>,
    /// Client → backend bytes.
    pub sent: u64,
    /// Backend → client bytes.
    pub received: u64,
    /// From accept to close.
    pub duration: Duration,
    /// Why it ended.
    pub end: &'static str,
    /// The socket error it ended on.
    pub error: Option<&'a io::Error>,
}

thread_local! {
    /// The line being formatted, kept between connections of a worker.
    static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
    /// The date and time to the second of this worker's last line: most
    /// lines share their second with the one before, and the calendar
    /// arithmetic is then done once a second, not once a line.
    static SECOND: Cell<Option<(u64, [u8; 19])>> = const { Cell::new(None) };
}

impl Entry<'_> {
    /// Logs the entry: at info on the access target when `on`, else at
    /// debug.
    pub fn log(&self, on: bool) {
        if !on {
            self.event(false);
            return;
        }
        if !tracing::enabled!(target: TARGET, Level::INFO) {
            return;
        }
        match logbuf::direct() {
            Some((style, lines)) => LINE.with_borrow_mut(|line| {
                line.clear();
                self.format(style, SystemTime::now(), line);
                lines.append_lazy(line);
            }),
            None => self.event(true),
        }
    }

    /// The same entry as a tracing event.
    fn event(&self, on: bool) {
        let peer = self.peer.map(tracing::field::display);
        let backend = OrDash(self.backend);
        let error = self.error.map(tracing::field::display);
        macro_rules! connection_event {
            ($level:ident, $($target:tt)*) => {
                tracing::$level!(
                    $($target)*
                    listener = self.listener,
                    route = self.route,
                    sni = self.sni,
                    alpn = self.alpn,
                    client = %self.client,
                    peer,
                    %backend,
                    sent = self.sent,
                    received = self.received,
                    duration_ms = self.duration.as_millis() as u64,
                    end = self.end,
                    error,
                    "connection"
                )
            };
        }
        if on {
            connection_event!(info, target: TARGET,);
        } else {
            connection_event!(debug,);
        }
    }

    /// Writes the line, newline included, as tracing's fmt layer would
    /// write [`event`](Self::event) at `now` in `style`.
    fn format(&self, style: Style, now: SystemTime, out: &mut Vec<u8>) {
        let mut f = Fields { out, style, first: true };
        match style {
            Style::Text => {
                timestamp(f.out, now);
                f.out.extend_from_slice(b"  INFO ");
                f.out.extend_from_slice(TARGET.as_bytes());
                f.out.extend_from_slice(b": connection");
                f.first = false;
            }
            Style::Json => {
                f.out.extend_from_slice(b"{\"timestamp\":\"");
                timestamp(f.out, now);
                f.out.extend_from_slice(b"\",\"level\":\"INFO\"");
                f.first = false;
                f.quoted("message", "connection");
            }
        }
        f.quoted("listener", self.listener);
        f.optional("route", self.route);
        f.optional("sni", self.sni);
        f.optional("alpn", self.alpn);
        f.addr("client", Some(self.client));
        if let Some(peer) = self.peer {
            f.addr("peer", Some(peer));
        }
        f.addr("backend", self.backend);
        f.number("sent", self.sent);
        f.number("received", self.received);
        f.number("duration_ms", self.duration.as_millis() as u64);
        f.quoted("end", self.end);
        if let Some(error) = self.error {
            f.error("error", error);
        }
        if style == Style::Json {
            let _ = write!(f.out, ",\"target\":\"{TARGET}\"}}");
        }
        f.out.push(b'\n');
    }
}

/// Writes `name=value` (text) or `"name":value` (JSON) pairs.
struct Fields<'o> {
    out: &'o mut Vec<u8>,
    style: Style,
    first: bool,
}

impl Fields<'_> {
    fn name(&mut self, name: &str) {
        let sep = if self.first { "" } else { self.sep() };
        self.first = false;
        self.out.extend_from_slice(sep.as_bytes());
        match self.style {
            Style::Text => {
                self.out.extend_from_slice(name.as_bytes());
                self.out.push(b'=');
            }
            Style::Json => {
                self.out.push(b'"');
                self.out.extend_from_slice(name.as_bytes());
                self.out.extend_from_slice(b"\":");
            }
        }
    }

    fn sep(&self) -> &'static str {
        match self.style {
            Style::Text => " ",
            Style::Json => ",",
        }
    }

    /// A string field (tracing shows it quoted, with Rust's escapes, in
    /// text).
    fn quoted(&mut self, name: &str, value: &str) {
        self.name(name);
        if plain(value) {
            // Nothing to escape in either style: the bytes as they are.
            self.out.push(b'"');
            self.out.extend_from_slice(value.as_bytes());
            self.out.push(b'"');
            return;
        }
        match self.style {
            Style::Text => {
                let _ = write!(self.out, "{value:?}");
            }
            Style::Json => json_string(self.out, value),
        }
    }

    fn optional(&mut self, name: &str, value: Option<&str>) {
        if let Some(value) = value {
            self.quoted(name, value);
        }
    }

    /// A field recorded with `%` (Display): bare in text, a string in
    /// JSON.
    fn shown(&mut self, name: &str, value: impl std::fmt::Display) {
        self.name(name);
        let _ = match self.style {
            Style::Text => write!(self.out, "{value}"),
            Style::Json => write!(self.out, "\"{value}\""),
        };
    }

    /// An address as `shown` writes it (`-` for none), with IPv4 written
    /// digit by digit rather than through `Display`'s machinery.
    fn addr(&mut self, name: &str, addr: Option<SocketAddr>) {
        let Some(SocketAddr::V4(v4)) = addr else {
            return self.shown(name, OrDash(addr));
        };
        self.name(name);
        let json = self.style == Style::Json;
        if json {
            self.out.push(b'"');
        }
        let mut digits = itoa::Buffer::new();
        for (i, octet) in v4.ip().octets().into_iter().enumerate() {
            if i > 0 {
                self.out.push(b'.');
            }
            self.out.extend_from_slice(digits.format(octet).as_bytes());
        }
        self.out.push(b':');
        self.out.extend_from_slice(digits.format(v4.port()).as_bytes());
        if json {
            self.out.push(b'"');
        }
    }

    /// An error's text, escaped in JSON.
    fn error(&mut self, name: &str, error: &io::Error) {
        let Some(code) = error.raw_os_error() else {
            return match self.style {
                Style::Text => self.shown(name, error),
                Style::Json => {
                    self.name(name);
                    json_string(self.out, &error.to_string());
                }
            };
        };
        self.name(name);
        os_error_text(code, |text| match self.style {
            Style::Text => self.out.extend_from_slice(text.as_bytes()),
            Style::Json => json_string(self.out, text),
        });
    }

    fn number(&mut self, name: &str, value: u64) {
        self.name(name);
        self.out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
    }
}

/// Whether `value` reads the same quoted as escaped, in text (Rust's
/// `Debug`) and in JSON: printable ASCII without quotes or backslashes.
fn plain(value: &str) -> bool {
    value.bytes().all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
}

/// `now` as RFC 3339 in UTC with microseconds, as
/// `humantime::format_rfc3339_micros` writes it.
fn timestamp(out: &mut Vec<u8>, now: SystemTime) {
    let Ok(since) = now.duration_since(UNIX_EPOCH) else {
        let _ = write!(out, "{}", humantime::format_rfc3339_micros(now));
        return;
    };
    let second = since.as_secs();
    let date = match SECOND.get() {
        Some((cached, date)) if cached == second => date,
        _ => {
            let mut date = [0u8; 19];
            let whole = UNIX_EPOCH + Duration::from_secs(second);
            // "YYYY-MM-DDTHH:MM:SSZ": the date and time are its first 19 bytes.
            let mut text = Vec::with_capacity(20);
            let _ = write!(text, "{}", humantime::format_rfc3339_seconds(whole));
            let Some(head) = text.get(..19) else {
                // Past what humantime writes (year 9999): as it writes it.
                let _ = write!(out, "{}", humantime::format_rfc3339_micros(now));
                return;
            };
            date.copy_from_slice(head);
            SECOND.set(Some((second, date)));
            date
        }
    };
    out.extend_from_slice(&date);
    out.push(b'.');
    let micros = since.subsec_micros();
    let mut digits = itoa::Buffer::new();
    let text = digits.format(micros);
    out.extend(std::iter::repeat_n(b'0', 6 - text.len()));
    out.extend_from_slice(text.as_bytes());
    out.push(b'Z');
}

/// How many OS errors' texts a thread keeps: a connection ends with one of
/// a handful (reset, broken pipe, refused, timed out).
const OS_ERROR_TEXTS: usize = 16;

thread_local! {
    /// The text of the OS errors this thread wrote lately, by code.
    static OS_ERRORS: RefCell<Vec<(i32, Box<str>)>> = const { RefCell::new(Vec::new()) };
}

/// Calls `write` with `io::Error`'s text for the OS error `code`, as its
/// `Display` writes it. `Display` looks the text up each time (strerror_r,
/// which goes through gettext and its lock, and an allocation), and
/// connections that end in a reset carry one in every access line.
fn os_error_text(code: i32, write: impl FnOnce(&str)) {
    OS_ERRORS.with_borrow_mut(|texts| {
        let at = match texts.iter().position(|(c, _)| *c == code) {
            Some(at) => at,
            None => {
                if texts.len() == OS_ERROR_TEXTS {
                    texts.remove(0);
                }
                let text = io::Error::from_raw_os_error(code).to_string();
                texts.push((code, text.into_boxed_str()));
                texts.len() - 1
            }
        };
        write(&texts[at].1);
    });
}

/// `value` as a JSON string, escaped as serde_json escapes it.
fn json_string(out: &mut Vec<u8>, value: &str) {
    let _ = serde_json::to_writer(&mut *out, value);
}

/// An address, or `-` when there is none.
struct OrDash(Option<SocketAddr>);

impl std::fmt::Display for OrDash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => a.fmt(f),
            None => f.write_str("-"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logbuf::testing::{at, Captured, Fixed};
    use proptest::prelude::*;

    /// What the fmt layer, set up as `logging::init` sets it up, writes for
    /// the entry's event.
    fn through_tracing(entry: &Entry<'_>, style: Style) -> String {
        let out = Captured::default();
        let builder = tracing_subscriber::fmt()
            .with_writer(out.clone())
            .with_ansi(false)
            .with_timer(Fixed)
            .with_max_level(Level::INFO);
        match style {
            Style::Text => {
                tracing::subscriber::with_default(builder.finish(), || entry.event(true))
            }
            Style::Json => {
                let format = logbuf::JsonLines { at: Some(at()) };
                let sub = builder.event_format(format).finish();
                tracing::subscriber::with_default(sub, || entry.event(true))
            }
        }
        out.text()
    }

    fn direct(entry: &Entry<'_>, style: Style) -> String {
        let mut line = Vec::new();
        entry.format(style, at(), &mut line);
        String::from_utf8(line).unwrap()
    }

    fn entry<'a>(error: Option<&'a io::Error>) -> Entry<'a> {
        Entry {
            listener: "edge",
            route: Some("api"),
            sni: Some("api.example.com"),
            alpn: Some("h2,http/1.1"),
            client: "127.0.0.1:40000".parse().unwrap(),
            peer: Some("[::1]:5000".parse().unwrap()),
            backend: Some("127.0.0.2:443".parse().unwrap()),
            sent: 517,
            received: 1_048_576,
            duration: Duration::from_micros(12_345),
            end: "backend closed",
            error,
        }
    }

    #[test]
    fn the_direct_line_is_the_line_tracing_writes() {
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        let mut bare = entry(None);
        (bare.route, bare.sni, bare.alpn, bare.peer, bare.backend) = (None, None, None, None, None);
        for e in [entry(Some(&reset)), entry(None), bare] {
            for style in [Style::Text, Style::Json] {
                assert_eq!(direct(&e, style), through_tracing(&e, style), "{style:?}");
            }
        }
        let text = direct(&entry(None), Style::Text);
        assert!(text.starts_with("2025-12-02T04:35:23.456789Z  INFO tcplb::access: connection listener=\"edge\" route=\"api\""), "{text}");
        let json: serde_json::Value =
            serde_json::from_str(&direct(&entry(None), Style::Json)).unwrap();
        assert_eq!(json["received"], 1_048_576);
        assert_eq!(json["backend"], "127.0.0.2:443");
    }

    /// An OS error's text comes from the thread's cache after its first
    /// line, and reads as `Display` writes it every time, also when more
    /// codes come than the cache keeps.
    #[test]
    fn os_errors_read_as_display_writes_them() {
        let codes: Vec<i32> =
            (1..=2 * OS_ERROR_TEXTS as i32).chain([104, 32, 104, 1, 110]).collect();
        for code in codes {
            let error = io::Error::from_raw_os_error(code);
            let e = entry(Some(&error));
            for style in [Style::Text, Style::Json] {
                assert_eq!(direct(&e, style), through_tracing(&e, style), "code {code}, {style:?}");
            }
        }
        OS_ERRORS.with_borrow(|texts| assert!(texts.len() <= OS_ERROR_TEXTS));
    }

    proptest! {
        /// The date and time are humantime's, whether this worker's last
        /// line was in the same second or not.
        #[test]
        fn timestamps_are_humantimes(secs in 0u64..253_402_300_800, micros in 0u32..1_000_000, later in 0u32..1_000_000) {
            for (s, us) in [(secs, micros), (secs, later), (secs + 1, micros)] {
                let t = UNIX_EPOCH + Duration::new(s, us * 1000 + 999);
                let mut out = Vec::new();
                timestamp(&mut out, t);
                prop_assert_eq!(String::from_utf8(out).unwrap(), humantime::format_rfc3339_micros(t).to_string());
            }
        }

        /// The server name and ALPN come from the client: any text, quotes
        /// and control characters included, comes out escaped the same way.
        #[test]
        fn client_supplied_text_is_escaped_as_tracing_escapes_it(
            sni in ".*", alpn in any::<String>(), listener in "[a-z\"\\\\ ]{0,8}",
            sent in any::<u64>(), ms in 0u64..10_000_000,
        ) {
            let e = Entry {
                listener: &listener,
                sni: Some(&sni),
                alpn: Some(&alpn),
                sent,
                duration: Duration::from_millis(ms),
                ..entry(None)
            };
            for style in [Style::Text, Style::Json] {
                prop_assert_eq!(direct(&e, style), through_tracing(&e, style));
            }
        }

        /// Any address, IPv4 (written digit by digit) or IPv6, comes out
        /// as `Display` shows it.
        #[test]
        fn addresses_are_written_as_display_shows_them(
            client in any::<SocketAddr>(), backend in any::<Option<SocketAddr>>(),
        ) {
            let e = Entry { client, backend, ..entry(None) };
            for style in [Style::Text, Style::Json] {
                prop_assert_eq!(direct(&e, style), through_tracing(&e, style));
            }
        }
    }
}
