//! Measures the local rate limiter's heap for N distinct keys with dhat's
//! counting allocator.
//!
//! ```text
//! cargo run --release --features gateway --example gateway_limiter_memory -- --keys 1000000
//! ```
#![allow(clippy::print_stdout)]

use gateway_mw::ratelimit::{KeyedLimiter, LimiterConfig, Quota};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

fn main() {
    let keys: usize = std::env::args()
        .skip_while(|a| a != "--keys")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let _profiler = dhat::Profiler::builder().testing().build();
    let names: Vec<String> = (0..keys).map(|i| format!("user-{i:07}")).collect();
    let before = dhat::HeapStats::get().curr_bytes;
    let limiter: KeyedLimiter =
        KeyedLimiter::new(LimiterConfig::new(Quota::per_minute(1_000)).with_max_keys(keys));
    let now = limiter.now_nanos();
    for name in &names {
        limiter.check_at(name.as_str(), now);
    }
    let held = dhat::HeapStats::get().curr_bytes - before;
    let summary = serde_json::json!({
        "keys": limiter.len(),
        "evictions": limiter.evictions(),
        "heap_bytes": held,
        "heap_mib": (held as f64 / 1048576.0 * 10.0).round() / 10.0,
        "bytes_per_key": (held as f64 / limiter.len().max(1) as f64).round(),
    });
    println!("{summary}");
}
