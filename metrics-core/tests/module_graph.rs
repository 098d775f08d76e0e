//! The crate's modules point one way: no two of them import each other.
//!
//! A module's imports are the `crate::x` paths in its code (comments
//! excluded); a name imported from the crate root counts as an import of the
//! module the root re-exports it from.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

fn code_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(str::trim_start)
        .filter(|l| !l.starts_with("//"))
}

/// `pub use module::{A, B}` lines of lib.rs: name → module.
fn root_reexports(lib: &str) -> BTreeMap<String, String> {
    let mut names = BTreeMap::new();
    for line in code_lines(lib) {
        let Some(rest) = line.strip_prefix("pub use ") else {
            continue;
        };
        let Some((module, items)) = rest.split_once("::") else {
            continue;
        };
        for item in items
            .trim_end_matches(';')
            .trim_matches(['{', '}'])
            .split(',')
        {
            let item = item.trim();
            if !item.is_empty() {
                names.insert(item.to_owned(), module.to_owned());
            }
        }
    }
    names
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Modules `text` refers to through `crate::`.
fn imports(
    text: &str,
    modules: &BTreeSet<String>,
    root: &BTreeMap<String, String>,
) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for line in code_lines(text) {
        for (at, _) in line.match_indices("crate::") {
            let rest = &line[at + "crate::".len()..];
            // `crate::{A, b::C}` or `crate::x::…` or `crate::Name`.
            let group = if let Some(inner) = rest.strip_prefix('{') {
                inner.split('}').next().unwrap_or("").to_owned()
            } else {
                rest.split(|c: char| !is_ident(c) && c != ':')
                    .next()
                    .unwrap_or("")
                    .to_owned()
            };
            for path in group.split(',') {
                let head: String = path.trim().chars().take_while(|&c| is_ident(c)).collect();
                if modules.contains(&head) {
                    found.insert(head);
                } else if let Some(module) = root.get(&head) {
                    found.insert(module.clone());
                }
            }
        }
    }
    found
}

#[test]
fn no_two_modules_import_each_other() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let root = root_reexports(&lib);
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if path.extension().is_some_and(|e| e == "rs") && stem != "lib" {
            files.insert(stem.to_owned(), std::fs::read_to_string(&path).unwrap());
        }
    }
    // A module's own test files are part of it.
    for (module, text) in files.iter_mut() {
        let dir = src.join(module.as_str());
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries {
                text.push_str(&std::fs::read_to_string(entry.unwrap().path()).unwrap());
            }
        }
    }
    let modules: BTreeSet<String> = files.keys().cloned().collect();
    assert!(modules.contains("processor") && modules.contains("snapshot"));
    let graph: BTreeMap<&String, BTreeSet<String>> = files
        .iter()
        .map(|(m, text)| {
            let mut deps = imports(text, &modules, &root);
            deps.remove(m);
            (m, deps)
        })
        .collect();
    let mut cycles = Vec::new();
    for (a, deps) in &graph {
        for b in deps {
            if a.as_str() < b.as_str() && graph[b].contains(a.as_str()) {
                cycles.push(format!("{a} <-> {b}"));
            }
        }
    }
    assert!(
        cycles.is_empty(),
        "modules importing each other: {cycles:?}\n{graph:#?}"
    );
}
