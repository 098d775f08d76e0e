//! Modules point one way (notification → store → broker → registry →
//! subscription → hub → server): no two of the crate's top-level modules
//! refer to each other. When two do, a type lives in the wrong one.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The top-level module a source file belongs to: `src/hub.rs` → `hub`,
/// `src/store/postgres.rs` → `store`.
fn module_of(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).unwrap();
    let first = relative.components().next().unwrap();
    let name = first.as_os_str().to_str().unwrap();
    name.trim_end_matches(".rs").to_owned()
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every `crate::<module>` a file's code (not its comments) names.
fn references(source: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for line in source.lines() {
        let code = line.trim_start();
        if code.starts_with("//") {
            continue;
        }
        for (at, _) in code.match_indices("crate::") {
            let rest = &code[at + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if modules.contains(&name) {
                found.insert(name);
            }
        }
        // `use crate::{a::X, b::Y}`
        if let Some(list) = code.strip_prefix("use crate::{") {
            for item in list.split(',') {
                let name = item.trim().split("::").next().unwrap_or("");
                if modules.contains(name) {
                    found.insert(name.to_owned());
                }
            }
        }
    }
    found
}

#[test]
fn no_two_modules_refer_to_each_other() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files
        .iter()
        .map(|f| module_of(&src, f))
        .filter(|m| m != "lib")
        .collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let from = module_of(&src, file);
        if from == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(file).unwrap();
        for to in references(&text, &modules) {
            if to != from {
                edges.entry(from.clone()).or_default().insert(to);
            }
        }
    }
    let mut cycles = Vec::new();
    for (from, tos) in &edges {
        for to in tos {
            if from < to && edges.get(to).is_some_and(|back| back.contains(from)) {
                cycles.push(format!("{from} <-> {to}"));
            }
        }
    }
    assert!(
        cycles.is_empty(),
        "modules importing each other: {cycles:?}; graph: {edges:?}"
    );
    assert!(
        !edges.get("subscription").is_some_and(|t| t.contains("hub")),
        "the subscription must not know the hub: {edges:?}"
    );
}
