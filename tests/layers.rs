//! The layering rule, checked: control -> conn -> upstream -> leaves
//! (config, io, stats, sys). A module may import from a room below its own,
//! never from one above, and no two rooms import each other. Reads `src/`
//! as text, so it holds for test modules and doc links too.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every top-level room and its floor; leaves are 0.
const ROOMS: &[(&str, u8)] = &[
    ("config", 0),
    ("io", 0),
    ("logbuf", 0),
    ("stats", 0),
    ("sys", 0),
    ("upstream", 1),
    ("conn", 2),
    ("control", 3),
    ("cli", 4),
    ("logging", 4),
];

fn floor(room: &str) -> Option<u8> {
    ROOMS.iter().find(|(r, _)| *r == room).map(|(_, f)| *f)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The room a file under `src/` belongs to (None: the crate root, main.rs).
fn room_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main")).then(|| name.to_string())
}

/// The top-level modules `text` names after `crate::`, comments left out.
fn imports(text: &str) -> BTreeSet<String> {
    let code: String =
        text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n");
    let mut found = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a::b, c}`: the first name of each item at depth one.
            let (mut depth, mut item_start) = (1, true);
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => item_start = true,
                    c if item_start && depth == 1 && (c.is_alphabetic() || c == '_') => {
                        item_start = false;
                        found.insert(ident_at(&group[i..]));
                    }
                    _ => {}
                }
            }
        } else {
            found.insert(ident_at(rest));
        }
    }
    found.retain(|m| !m.is_empty());
    found
}

fn ident_at(s: &str) -> String {
    s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect()
}

/// Room -> the rooms it imports from, with one file that does it.
fn graph() -> BTreeMap<String, BTreeMap<String, PathBuf>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut g: BTreeMap<String, BTreeMap<String, PathBuf>> = BTreeMap::new();
    for file in files {
        let Some(room) = room_of(&src, &file) else { continue };
        let text = std::fs::read_to_string(&file).unwrap();
        let edges = g.entry(room.clone()).or_default();
        for to in imports(&text) {
            if to != room {
                edges.entry(to).or_insert_with(|| file.clone());
            }
        }
    }
    g
}

/// Every broken rule, one line each.
fn violations(g: &BTreeMap<String, BTreeMap<String, PathBuf>>) -> Vec<String> {
    let mut out = Vec::new();
    for (room, edges) in g {
        let Some(from) = floor(room) else {
            out.push(format!("src/{room}: a room with no place in the layers (add it to ROOMS)"));
            continue;
        };
        for (to, file) in edges {
            let Some(below) = floor(to) else { continue };
            let upward = below > from || (below == from && from > 0);
            let mutual = g.get(to).is_some_and(|e| e.contains_key(room));
            if upward {
                out.push(format!("{}: {room} imports from {to}, a layer above", file.display()));
            } else if mutual {
                out.push(format!("{}: {room} and {to} import each other", file.display()));
            }
        }
    }
    out
}

#[test]
fn imports_only_go_down_and_rooms_never_import_each_other() {
    let g = graph();
    assert!(g.contains_key("conn") && g.contains_key("control"), "src/ not found or empty");
    let bad = violations(&g);
    assert!(bad.is_empty(), "the layering rule is broken:\n{}", bad.join("\n"));
}

#[test]
fn the_checker_sees_grouped_imports_and_skips_comments() {
    let text = "use crate::{config::Config, upstream::{Backend, Pool}};\n\
                // use crate::control::Server;\n\
                let x = crate::stats::ACCEPT_ERRORS;";
    let got: Vec<String> = imports(text).into_iter().collect();
    assert_eq!(got, ["config", "stats", "upstream"]);

    let mut g: BTreeMap<String, BTreeMap<String, PathBuf>> = BTreeMap::new();
    g.entry("stats".into()).or_default().insert("upstream".into(), "src/stats.rs".into());
    g.entry("io".into()).or_default().insert("stats".into(), "src/io.rs".into());
    g.entry("stats".into()).or_default().insert("io".into(), "src/stats.rs".into());
    let bad = violations(&g);
    assert!(
        bad.iter().any(|l| l.contains("stats imports from upstream, a layer above")),
        "{bad:?}"
    );
    assert!(bad.iter().any(|l| l.contains("io and stats import each other")), "{bad:?}");
}
