//! The shape of a configuration file, checked before its values: every key
//! is one tcplb knows, and every value has the type that key takes. Each
//! problem is reported at its key or value, all of them at once (a typed
//! parse stops at the first), with a did-you-mean for a misspelt key.

use std::ops::Range;

use toml_edit::{ImDocument, Item, Value};

/// What a key holds.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Str,
    Int,
    Bool,
    /// A list of strings.
    Strs,
    /// A string or a list of strings (`listen`).
    StrOrStrs,
    /// A list of strings or inline tables (`upstreams`).
    Upstreams,
    /// A table with these keys.
    Table(&'static [(&'static str, Kind)]),
    /// An array of tables with these keys (`[[listener]]`).
    Tables(&'static [(&'static str, Kind)]),
}

const HEALTH: &[(&str, Kind)] = &[
    ("check", Kind::Str),
    ("interval", Kind::Str),
    ("timeout", Kind::Str),
    ("rise", Kind::Int),
    ("fall", Kind::Int),
    ("send_proxy", Kind::Bool),
    ("send", Kind::Str),
    ("send_hex", Kind::Str),
    ("expect", Kind::Str),
    ("expect_hex", Kind::Str),
    ("sni", Kind::Str),
    ("ejection_time", Kind::Str),
    ("max_ejection_time", Kind::Str),
    ("max_ejection_percent", Kind::Int),
];

const ROUTE: &[(&str, Kind)] = &[
    ("name", Kind::Str),
    ("sni", Kind::Strs),
    ("http_host", Kind::Strs),
    ("upstreams", Kind::Upstreams),
    ("strategy", Kind::Str),
    ("health", Kind::Table(HEALTH)),
];

const LISTENER: &[(&str, Kind)] = &[
    ("name", Kind::Str),
    ("listen", Kind::StrOrStrs),
    ("upstreams", Kind::Upstreams),
    ("protocol", Kind::Str),
    ("strategy", Kind::Str),
    ("connect_timeout", Kind::Str),
    ("connect_attempts", Kind::Int),
    ("idle_timeout", Kind::Str),
    ("half_close_timeout", Kind::Str),
    ("peek_timeout", Kind::Str),
    ("proxy_header_timeout", Kind::Str),
    ("dns_refresh", Kind::Str),
    ("send_proxy", Kind::Str),
    ("accept_proxy", Kind::Bool),
    ("access_log", Kind::Bool),
    ("splice", Kind::Str),
    ("allow", Kind::Strs),
    ("deny", Kind::Strs),
    ("accept_proxy_from", Kind::Strs),
    ("backlog", Kind::Int),
    ("health", Kind::Table(HEALTH)),
    ("route", Kind::Tables(ROUTE)),
    ("max_connections", Kind::Int),
    ("max_connections_per_client", Kind::Int),
    ("connection_rate_per_client", Kind::Str),
    ("slow_start", Kind::Str),
];

const ADMIN: &[(&str, Kind)] = &[("listen", Kind::Str), ("token_file", Kind::Str)];

const UPSTREAM: &[(&str, Kind)] = &[
    ("address", Kind::Str),
    ("weight", Kind::Int),
    ("backup", Kind::Bool),
    ("max_connections", Kind::Int),
    ("send_proxy", Kind::Str),
];

const FILE: &[(&str, Kind)] = &[
    ("drain_timeout", Kind::Str),
    ("max_connections", Kind::Int),
    ("threads", Kind::Int),
    ("worker_balance", Kind::Str),
    ("defaults", Kind::Table(LISTENER)),
    ("admin", Kind::Table(ADMIN)),
    ("listener", Kind::Tables(LISTENER)),
];

/// Reports every unknown key and every value of the wrong type in `text`
/// through `report(span, message)`. A file that is not TOML is left to the
/// typed parse, which says where.
pub(super) fn check(text: &str, report: &mut dyn FnMut(Range<usize>, String)) {
    let Ok(doc) = ImDocument::parse(text) else { return };
    let root = doc.as_table();
    let mut c = Checker { report };
    c.table(root.iter().map(|(k, item)| (k, root.key(k), item)), FILE, "");
}

/// A table's entries: name, key (for its span), item.
type Entry<'a, T> = (&'a str, Option<&'a toml_edit::Key>, &'a T);

/// Walks the document, reporting as it goes.
struct Checker<'r> {
    /// Where problems go.
    report: &'r mut dyn FnMut(Range<usize>, String),
}

impl Checker<'_> {
    /// The entries of the table at `path` (`listener.health`; empty: the top).
    fn table<'a>(
        &mut self,
        entries: impl Iterator<Item = Entry<'a, Item>>,
        schema: &[(&str, Kind)],
        path: &str,
    ) {
        for (key, k, item) in entries {
            let span = k.and_then(toml_edit::Key::span).or_else(|| item.span()).unwrap_or(0..0);
            match schema.iter().find(|(name, _)| *name == key) {
                Some((_, kind)) => self.item(key, item, *kind, span, path),
                None => self.unknown(key, span, schema, &place(path)),
            }
        }
    }

    /// The entries of an inline table (`{ address = ..., weight = 2 }`).
    fn inline<'a>(
        &mut self,
        entries: impl Iterator<Item = Entry<'a, Value>>,
        schema: &[(&str, Kind)],
        place: &str,
    ) {
        for (key, k, v) in entries {
            let span = k.and_then(toml_edit::Key::span).or_else(|| v.span()).unwrap_or(0..0);
            match schema.iter().find(|(name, _)| *name == key) {
                Some((_, kind)) => self.value(key, v, *kind, v.span().unwrap_or(span)),
                None => self.unknown(key, span, schema, place),
            }
        }
    }

    fn unknown(&mut self, key: &str, span: Range<usize>, schema: &[(&str, Kind)], place: &str) {
        let known: Vec<&str> = schema.iter().map(|(n, _)| *n).collect();
        let hint =
            closest(key, &known).map_or_else(String::new, |k| format!(" (did you mean '{k}'?)"));
        (self.report)(span, format!("unknown key '{key}' {place}{hint}"));
    }

    fn item(&mut self, key: &str, item: &Item, kind: Kind, key_span: Range<usize>, path: &str) {
        let span = item.span().unwrap_or(key_span);
        let path = if path.is_empty() { key.to_string() } else { format!("{path}.{key}") };
        match (kind, item) {
            (Kind::Table(schema), Item::Table(t)) => {
                self.table(t.iter().map(|(k, i)| (k, t.key(k), i)), schema, &path)
            }
            (Kind::Tables(schema), Item::ArrayOfTables(ts)) => {
                for t in ts.iter() {
                    self.table(t.iter().map(|(k, i)| (k, t.key(k), i)), schema, &path);
                }
            }
            (_, Item::Value(v)) => self.value(key, v, kind, span),
            _ => (self.report)(span, format!("'{key}' must be {}", expected(kind))),
        }
    }

    fn value(&mut self, key: &str, v: &Value, kind: Kind, span: Range<usize>) {
        let fits = match (kind, v) {
            (Kind::Str, Value::String(_))
            | (Kind::Int, Value::Integer(_))
            | (Kind::Bool, Value::Boolean(_))
            | (Kind::StrOrStrs, Value::String(_)) => true,
            (Kind::Strs | Kind::StrOrStrs, Value::Array(a)) => a.iter().all(Value::is_str),
            (Kind::Upstreams, Value::Array(a)) => {
                for u in a.iter() {
                    if let Value::InlineTable(t) = u {
                        let entries = t.iter().map(|(k, i)| (k, t.key(k), i));
                        self.inline(entries, UPSTREAM, "in an upstream table");
                    } else if !u.is_str() {
                        let at = u.span().unwrap_or(span.clone());
                        (self.report)(at, "an upstream must be \"HOST:PORT\" or a table".into());
                    }
                }
                true
            }
            (Kind::Table(schema), Value::InlineTable(t)) => {
                let entries = t.iter().map(|(k, i)| (k, t.key(k), i));
                self.inline(entries, schema, &format!("in {key}"));
                true
            }
            _ => false,
        };
        if !fits {
            let what = v.type_name();
            (self.report)(span, format!("'{key}' must be {}, not {what}", expected(kind)));
        }
    }
}

/// Where a table's keys are, for messages: `in [listener.health]`.
fn place(path: &str) -> String {
    if path.is_empty() {
        "at the top of the file".into()
    } else {
        format!("in [{path}]")
    }
}

/// What a key of `kind` takes, for messages.
fn expected(kind: Kind) -> &'static str {
    match kind {
        Kind::Str => "a string",
        Kind::Int => "an integer",
        Kind::Bool => "true or false",
        Kind::Strs => "a list of strings",
        Kind::StrOrStrs => "a string or a list of strings",
        Kind::Upstreams => "a list of upstreams",
        Kind::Table(_) => "a table",
        Kind::Tables(_) => "an array of tables ([[...]])",
    }
}

/// The known key closest to a misspelt one, if it is close enough to be meant.
fn closest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (strsim::damerau_levenshtein(key, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        let mut out = Vec::new();
        check(text, &mut |span, msg| out.push(format!("{}: {msg}", span.start)));
        out
    }

    #[test]
    fn every_unknown_key_and_wrong_type_at_once() {
        let text = "drain_timout = \"5s\"\n[[listener]]\nname = 1\nlisten = \"127.0.0.1:1\"\n\
                    upstreams = [{ address = \"a:1\", wieght = 2 }]\nstrategy = \"round-robin\"\n\
                    [listener.health]\nfall = \"3\"\nbogus = true\n";
        let got = problems(text);
        assert_eq!(got.len(), 5, "{got:#?}");
        assert!(got[0].contains(
            "unknown key 'drain_timout' at the top of the file (did you mean 'drain_timeout'?)"
        ));
        assert!(got[1].contains("'name' must be a string, not integer"));
        assert!(
            got[2].contains("unknown key 'wieght' in an upstream table (did you mean 'weight'?)")
        );
        assert!(got[3].contains("'fall' must be an integer, not string"));
        assert!(got[4].contains("unknown key 'bogus' in [listener.health]"), "{got:#?}");
        assert!(problems("[[listener]]\nname = \"a\"\n").is_empty());
    }
}
