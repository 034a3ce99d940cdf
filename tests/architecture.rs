//! The architecture invariants of ARCHITECTURE.md that a program can check, held here so that CI
//! fails when one is broken (rust-analyzer keeps such rules in its `tidy` tests):
//!
//! - **Layers**: a module of the library imports only modules of a lower layer, as the table
//!   in ARCHITECTURE.md ("Layers") lists them. The table is read from ARCHITECTURE.md itself, so
//!   the document and the rule cannot drift apart.
//! - **No import circles** among the files of the library or of the binary. A file inside a
//!   directory module may use its parent (`server/io.rs` is a part of `server`); any other chain
//!   of imports that comes back to where it started is a circle.
//! - **The binary uses the public API only**, and not even the hidden part of it (`wheel`).
//! - **One close path**: slab entries are removed in one place (`server/close.rs`).
//! - **Rooms a reader can hold**: no file in `src/` has more than 700 lines.
//! - **The layout table of `lib.rs` names every file of the library.**
//!
//! Imports are read from the source text with comments and string literals taken out: every
//! path that starts with `crate::`, `super::` or (in a directory module) a child module's name,
//! with `use` groups (`crate::{a, b::c}`) expanded. An item the crate root re-exports
//! (`crate::ConnId`) counts as an import of the module that defines it.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// The longest a file in `src/` may be.
const MAX_LINES: usize = 700;

/// A module path inside one crate: `[]` is the root, `["server", "io"]` is `server/io.rs`.
type ModPath = Vec<String>;

/// One crate's files, as module paths.
struct Crate {
    /// Where the crate root's directory is (`src/` or `src/bin/sockman/`).
    dir: PathBuf,
    /// Module path → file, relative to the repository root (for messages).
    files: BTreeMap<ModPath, String>,
    /// Source text of each module, comments and string literals removed.
    code: BTreeMap<ModPath, String>,
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Reads every `.rs` file under `dir` (not under `skip`) as a module of one crate rooted at
/// `root_file`.
fn read_crate(dir: &Path, root_file: &str, skip: Option<&Path>) -> Crate {
    let mut files = BTreeMap::new();
    let mut code = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).unwrap_or_else(|e| panic!("read {}: {e}", d.display())) {
            let path = entry.unwrap().path();
            if skip.is_some_and(|s| path.starts_with(s)) {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(dir).unwrap();
            let mut parts: Vec<String> = rel
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            let last = parts.pop().unwrap();
            let stem = last.trim_end_matches(".rs").to_string();
            if parts.is_empty() && last == root_file {
                // The crate root.
            } else if stem != "mod" {
                parts.push(stem);
            }
            let text = fs::read_to_string(&path).unwrap();
            let shown = path.strip_prefix(repo()).unwrap().display().to_string();
            code.insert(parts.clone(), strip(&text));
            files.insert(parts, shown);
        }
    }
    Crate {
        dir: dir.to_path_buf(),
        files,
        code,
    }
}

/// `text` without comments, string literals and char literals (each replaced by a space), so
/// that a path in a doc link or a message is not taken for an import.
fn strip(text: &str) -> String {
    let c: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < c.len() {
        match c[i] {
            '/' if c.get(i + 1) == Some(&'/') => {
                while i < c.len() && c[i] != '\n' {
                    i += 1;
                }
            }
            '/' if c.get(i + 1) == Some(&'*') => {
                let mut depth = 0;
                while i < c.len() {
                    if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                        depth += 1;
                        i += 2;
                    } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
                out.push(' ');
            }
            'r' if (c.get(i + 1) == Some(&'"') || c.get(i + 1) == Some(&'#'))
                && (i == 0 || !(c[i - 1].is_alphanumeric() || c[i - 1] == '_')) =>
            {
                // A raw string: r"..." or r#"..."#.
                let mut j = i + 1;
                let mut hashes = 0;
                while c.get(j) == Some(&'#') {
                    hashes += 1;
                    j += 1;
                }
                if c.get(j) != Some(&'"') {
                    out.push(c[i]);
                    i += 1;
                    continue;
                }
                j += 1;
                loop {
                    if j >= c.len() {
                        break;
                    }
                    if c[j] == '"' && (0..hashes).all(|h| c.get(j + 1 + h) == Some(&'#')) {
                        j += 1 + hashes;
                        break;
                    }
                    j += 1;
                }
                out.push(' ');
                i = j;
            }
            '"' => {
                i += 1;
                while i < c.len() && c[i] != '"' {
                    if c[i] == '\\' {
                        i += 1;
                    }
                    i += 1;
                }
                i += 1;
                out.push(' ');
            }
            '\'' => {
                // A char literal ('x', '\n', '\u{..}') or a lifetime ('a).
                if c.get(i + 1) == Some(&'\\') {
                    i += 2;
                    while i < c.len() && c[i] != '\'' {
                        i += 1;
                    }
                    i += 1;
                    out.push(' ');
                } else if c.get(i + 2) == Some(&'\'') {
                    i += 3;
                    out.push(' ');
                } else {
                    out.push('\'');
                    i += 1;
                }
            }
            ch => {
                out.push(ch);
                i += 1;
            }
        }
    }
    out
}

fn is_ident(ch: char) -> bool {
    ch.is_alphanumeric() || ch == '_'
}

/// Parses a path (with `use` groups) starting at `at` in `c`; returns every full path it
/// names, each as its segments.
fn parse_tree(c: &[char], mut at: usize) -> Vec<Vec<String>> {
    let skip_ws = |c: &[char], mut i: usize| {
        while i < c.len() && c[i].is_whitespace() {
            i += 1;
        }
        i
    };
    fn tree(c: &[char], at: &mut usize, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
        let ws = |at: &mut usize| {
            while *at < c.len() && c[*at].is_whitespace() {
                *at += 1;
            }
        };
        let mut segs = prefix;
        loop {
            ws(at);
            if *at < c.len() && c[*at] == '{' {
                *at += 1;
                loop {
                    ws(at);
                    if *at >= c.len() || c[*at] == '}' {
                        *at += 1;
                        break;
                    }
                    tree(c, at, segs.clone(), out);
                    ws(at);
                    if *at < c.len() && c[*at] == ',' {
                        *at += 1;
                    }
                }
                return;
            }
            let start = *at;
            while *at < c.len() && (is_ident(c[*at]) || c[*at] == '*') {
                *at += 1;
            }
            if *at == start {
                break;
            }
            let seg: String = c[start..*at].iter().collect();
            segs.push(seg);
            ws(at);
            if *at + 1 < c.len() && c[*at] == ':' && c[*at + 1] == ':' {
                *at += 2;
                continue;
            }
            // `as alias`, then the end of this path.
            break;
        }
        // Skip an `as name` part.
        ws(at);
        if c[*at..].starts_with(&['a', 's', ' ']) {
            *at += 3;
            ws(at);
            while *at < c.len() && is_ident(c[*at]) {
                *at += 1;
            }
        }
        out.push(segs);
    }
    let mut out = Vec::new();
    at = skip_ws(c, at);
    tree(c, &mut at, Vec::new(), &mut out);
    out
}

/// One import: from which module, naming which path (as written), resolved to which module.
#[derive(Debug, Clone)]
struct Import {
    from: ModPath,
    written: String,
    to: ModPath,
}

impl Crate {
    /// The child modules that `m`'s file declares (`mod name;`).
    fn children(&self, m: &ModPath) -> BTreeSet<String> {
        self.files
            .keys()
            .filter(|k| k.len() == m.len() + 1 && k.starts_with(m))
            .map(|k| k.last().unwrap().clone())
            .collect()
    }

    /// The deepest module a path names, starting from module `base`: `base` itself if the
    /// first segment is not a module (an item of `base`).
    fn resolve(
        &self,
        base: &ModPath,
        segs: &[String],
        reexports: &BTreeMap<String, ModPath>,
    ) -> ModPath {
        let mut m = base.clone();
        for (i, s) in segs.iter().enumerate() {
            let mut next = m.clone();
            next.push(s.clone());
            if self.files.contains_key(&next) {
                m = next;
            } else {
                if i == 0 && m.is_empty() {
                    if let Some(target) = reexports.get(s) {
                        return target.clone();
                    }
                }
                break;
            }
        }
        m
    }

    /// Every import of every module.
    fn imports(&self, reexports: &BTreeMap<String, ModPath>) -> Vec<Import> {
        let mut all = Vec::new();
        for (m, code) in &self.code {
            let c: Vec<char> = code.chars().collect();
            let children = self.children(m);
            let mut i = 0;
            while i < c.len() {
                let boundary = i == 0 || !(is_ident(c[i - 1]) || c[i - 1] == ':');
                if !boundary || !is_ident(c[i]) {
                    i += 1;
                    continue;
                }
                let start = i;
                while i < c.len() && is_ident(c[i]) {
                    i += 1;
                }
                let word: String = c[start..i].iter().collect();
                let mut j = i;
                while j < c.len() && c[j].is_whitespace() {
                    j += 1;
                }
                if !(j + 1 < c.len() && c[j] == ':' && c[j + 1] == ':') {
                    continue;
                }
                let base = match word.as_str() {
                    "crate" => Vec::new(),
                    "super" => {
                        let mut p = m.clone();
                        p.pop();
                        p
                    }
                    // `use accept::X` in `server/mod.rs`: a child module, by its name.
                    w if children.contains(w) => m.clone(),
                    _ => continue,
                };
                let rest_at = j + 2;
                let mut paths = parse_tree(&c, rest_at);
                if children.contains(&word) {
                    for p in &mut paths {
                        p.insert(0, word.clone());
                    }
                }
                for mut segs in paths {
                    let mut base = base.clone();
                    // `super::super::x`, `super::self::x`
                    while let Some(first) = segs.first().cloned() {
                        match first.as_str() {
                            "super" => drop(base.pop()),
                            "self" => {}
                            _ => break,
                        }
                        segs.remove(0);
                    }
                    let to = self.resolve(&base, &segs, reexports);
                    all.push(Import {
                        from: m.clone(),
                        written: format!("{word}::{}", segs.join("::")),
                        to,
                    });
                }
                i = rest_at;
            }
        }
        all
    }

    fn file(&self, m: &ModPath) -> &str {
        &self.files[m]
    }
}

/// Items the crate root re-exports, by name → the module that defines them (`pub use a::{B, C}`).
fn reexports(krate: &Crate) -> BTreeMap<String, ModPath> {
    let root = &krate.code[&Vec::new()];
    let c: Vec<char> = root.chars().collect();
    let mut map = BTreeMap::new();
    let text: String = c.iter().collect();
    let mut from = 0;
    while let Some(pos) = text[from..].find("pub use ") {
        let at = from + pos + "pub use ".len();
        let char_at = text[..at].chars().count();
        for segs in parse_tree(&c, char_at) {
            if let Some(item) = segs.last() {
                let module = krate.resolve(&Vec::new(), &segs[..segs.len() - 1], &BTreeMap::new());
                map.insert(item.clone(), module);
            }
        }
        from = at;
    }
    map
}

/// The layer table of ARCHITECTURE.md: module → layer number. Rows look like
/// `| 3 | `table` | ... |`.
fn layers() -> BTreeMap<String, u32> {
    let doc = fs::read_to_string(repo().join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let section = doc
        .split("\n## ")
        .find(|s| s.starts_with("Layers"))
        .expect("ARCHITECTURE.md has a '## Layers' section");
    let mut map = BTreeMap::new();
    for line in section.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 4 {
            continue;
        }
        let Ok(layer) = cells[1].parse::<u32>() else {
            continue;
        };
        for name in cells[2].split(',') {
            let name = name.trim().trim_matches('`');
            if !name.is_empty() {
                map.insert(name.to_string(), layer);
            }
        }
    }
    assert!(map.len() > 5, "no layer table found in ARCHITECTURE.md");
    map
}

fn library() -> Crate {
    let src = repo().join("src");
    read_crate(&src, "lib.rs", Some(&src.join("bin")))
}

fn binary() -> Crate {
    read_crate(&repo().join("src/bin/sockman"), "main.rs", None)
}

/// The import circles among `krate`'s files (a file using its own ancestors does not count).
fn circles(krate: &Crate, imports: &[Import]) -> Vec<String> {
    let mut edges: BTreeMap<ModPath, BTreeMap<ModPath, String>> = BTreeMap::new();
    for imp in imports {
        if imp.to == imp.from || imp.from.starts_with(&imp.to) {
            continue; // itself, or an ancestor: a part of its parent module
        }
        edges
            .entry(imp.from.clone())
            .or_default()
            .entry(imp.to.clone())
            .or_insert_with(|| imp.written.clone());
    }
    // Depth-first search for back edges; each circle reported once by its smallest member.
    let mut found = BTreeSet::new();
    let nodes: Vec<ModPath> = krate.files.keys().cloned().collect();
    for start in &nodes {
        let mut stack: Vec<(ModPath, Vec<(ModPath, String)>)> = vec![(start.clone(), Vec::new())];
        let mut seen = BTreeSet::new();
        while let Some((node, path)) = stack.pop() {
            for (next, written) in edges.get(&node).into_iter().flatten() {
                let mut p = path.clone();
                p.push((node.clone(), written.clone()));
                if next == start {
                    if p.iter().all(|(n, _)| n >= start) {
                        let text: Vec<String> = p
                            .iter()
                            .map(|(n, w)| format!("{} (`{w}`)", krate.file(n)))
                            .collect();
                        found.insert(format!(
                            "{} -> back to {}",
                            text.join(" -> "),
                            krate.file(start)
                        ));
                    }
                } else if seen.insert(next.clone()) {
                    stack.push((next.clone(), p));
                }
            }
        }
    }
    found.into_iter().collect()
}

#[test]
fn every_module_imports_only_modules_of_lower_layers() {
    let lib = library();
    let re = reexports(&lib);
    let layers = layers();
    let mut wrong = Vec::new();
    for m in lib.files.keys().filter(|m| !m.is_empty()) {
        if !layers.contains_key(&m[0]) {
            wrong.push(format!(
                "{}: module `{}` has no row in ARCHITECTURE.md's layer table",
                lib.file(m),
                m[0]
            ));
        }
    }
    for imp in lib.imports(&re) {
        let (Some(from), Some(to)) = (imp.from.first(), imp.to.first()) else {
            continue; // the crate root re-exports; a path to the root names nothing
        };
        if from == to {
            continue;
        }
        let (Some(&lf), Some(&lt)) = (layers.get(from), layers.get(to)) else {
            continue; // reported above
        };
        if lt >= lf {
            wrong.push(format!(
                "{} imports `{}`: module `{from}` (layer {lf}) may import only modules of lower layers, and `{to}` is layer {lt}",
                lib.file(&imp.from),
                imp.written
            ));
        }
    }
    wrong.sort();
    wrong.dedup();
    assert!(wrong.is_empty(), "layer rule broken:\n{}", wrong.join("\n"));
}

#[test]
fn no_import_circle_among_the_files_of_the_library_or_the_binary() {
    let lib = library();
    let re = reexports(&lib);
    let mut all = circles(&lib, &lib.imports(&re));
    let bin = binary();
    all.extend(circles(&bin, &bin.imports(&BTreeMap::new())));
    assert!(all.is_empty(), "import circles:\n{}", all.join("\n"));
}

#[test]
fn the_binary_uses_only_the_public_api() {
    let bin = binary();
    let mut wrong = Vec::new();
    for (m, code) in &bin.code {
        for hidden in ["sockman::wheel"] {
            if code.contains(hidden) {
                wrong.push(format!(
                    "{} uses `{hidden}` (hidden, not the public API)",
                    bin.file(m)
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn slab_entries_are_removed_in_one_place() {
    let lib = library();
    let places: Vec<&str> = lib
        .code
        .iter()
        .filter(|(m, _)| m.last().is_none_or(|l| l != "tests"))
        .filter(|(_, code)| code.contains("slab.remove("))
        .map(|(m, _)| lib.file(m))
        .collect();
    assert_eq!(
        places,
        ["src/server/close.rs"],
        "only the close path (Server::release in src/server/close.rs) removes slab entries"
    );
    let close = &lib.code[&vec!["server".to_string(), "close".to_string()]];
    assert_eq!(
        close.matches("slab.remove(").count(),
        1,
        "src/server/close.rs removes slab entries in one place (release)"
    );
}

#[test]
fn no_file_in_src_is_over_the_line_limit() {
    let mut long = Vec::new();
    for krate in [library(), binary()] {
        for file in krate.files.values() {
            let n = fs::read_to_string(repo().join(file))
                .unwrap()
                .lines()
                .count();
            if n > MAX_LINES {
                long.push(format!(
                    "{file}: {n} lines (at most {MAX_LINES}: split it by job)"
                ));
            }
        }
        assert!(krate.dir.exists());
    }
    assert!(long.is_empty(), "{}", long.join("\n"));
}

#[test]
fn the_layout_table_of_lib_rs_names_every_file() {
    let lib = library();
    let root = fs::read_to_string(repo().join("src/lib.rs")).unwrap();
    let layout = root
        .split("//! # Layout")
        .nth(1)
        .and_then(|s| s.split("//! # ").next())
        .expect("src/lib.rs has a '# Layout' section");
    let mut missing = Vec::new();
    for (m, file) in &lib.files {
        if m.is_empty() || m.last().is_some_and(|l| l == "tests") {
            continue;
        }
        let rel = file.trim_start_matches("src/");
        if !layout.contains(&format!("`{rel}`")) && !layout.contains(&rel.to_string()) {
            missing.push(rel.to_string());
        }
    }
    assert!(
        missing.is_empty(),
        "src/lib.rs's '# Layout' table does not name: {}",
        missing.join(", ")
    );
}

/// The checker itself finds what it must: a layer violation, a circle, a re-exported item.
#[test]
fn the_import_reader_sees_use_groups_reexports_and_comments() {
    let text = r#"
        //! See [`crate::workers`] (a doc link: not an import).
        use crate::{conn::{flag, Conn}, metrics::Metrics};
        use super::io::Readiness;
        fn f() { let _ = crate::time::deadline(1, 2); let s = "crate::admin::x"; let _ = crate::ConnId::NONE; }
    "#;
    let code = strip(text);
    assert!(
        !code.contains("workers") && !code.contains("admin"),
        "{code}"
    );
    let krate = Crate {
        dir: PathBuf::new(),
        files: [
            (vec![], "lib.rs"),
            (vec!["conn"], "conn.rs"),
            (vec!["metrics"], "metrics.rs"),
            (vec!["time"], "time.rs"),
            (vec!["token"], "token.rs"),
            (vec!["server"], "server/mod.rs"),
            (vec!["server", "io"], "server/io.rs"),
            (vec!["server", "turn"], "server/turn.rs"),
        ]
        .into_iter()
        .map(|(m, f)| (m.into_iter().map(String::from).collect(), f.to_string()))
        .collect(),
        code: [(vec!["server".to_string(), "turn".to_string()], code)]
            .into_iter()
            .collect(),
    };
    let re: BTreeMap<String, ModPath> = [("ConnId".to_string(), vec!["token".to_string()])]
        .into_iter()
        .collect();
    let mut to: Vec<String> = krate
        .imports(&re)
        .into_iter()
        .map(|i| i.to.join("::"))
        .collect();
    to.sort();
    to.dedup();
    assert_eq!(to, ["conn", "metrics", "server::io", "time", "token"]);
}
