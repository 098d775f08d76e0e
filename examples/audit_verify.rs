//! Verifies a gateway audit log: any edit, insertion, reordering or deletion
//! breaks the hash chain, and this reports where.
//!
//! ```text
//! cargo run --features gateway --example audit_verify -- audit.jsonl [--anchor HASH]
//! ```
//!
//! Exits 0 and prints `{"ok":true,...}` for an intact log; exits 1 and prints
//! the first break otherwise.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::BufRead;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(path) = args.first() else {
        eprintln!("usage: audit_verify FILE [--anchor HASH]");
        std::process::exit(2);
    };
    let anchor = args
        .windows(2)
        .find(|w| w[0] == "--anchor")
        .map(|w| w[1].clone());
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("{path}: {e}");
            std::process::exit(2);
        }
    };
    let lines: Vec<String> = std::io::BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .collect();
    match gateway_mw::audit::verify(lines.iter().map(String::as_str), anchor.as_deref()) {
        Ok(summary) => {
            println!(
                "{}",
                serde_json::json!({"ok": true, "records": summary.records, "last_hash": summary.last_hash})
            );
        }
        Err(e) => {
            println!(
                "{}",
                serde_json::json!({"ok": false, "error": e.to_string()})
            );
            std::process::exit(1);
        }
    }
}
