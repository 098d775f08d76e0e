//! Measures `metrics_core`'s heap with dhat's counting allocator and compares
//! it with the computed model in `docs/metrics-core.md`.
//!
//! ```text
//! cargo run --release --example metrics_memory -- --event-types 100 --buckets 32
//! ```
//!
//! It fills every second of a full 60-minute window for each of
//! `--event-types` types with values spread over `--buckets` distinct sketch
//! buckets, and 1M distinct users, then prints the bytes per type, per type
//! per second of retention, and per sketch bucket, measured and computed.
//! The last line is a JSON summary. With `--rss` the allocation counter stays
//! off and the process's peak RSS is reported instead.
#![allow(clippy::print_stdout)]

use std::time::{Duration, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use metrics_core::{Config, EventRef, ManualClock, MetricsProcessor};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.windows(2)
        .find(|w| w[0] == name)
        .and_then(|w| w[1].parse().ok())
        .unwrap_or(default)
}

fn main() {
    let types = arg("--event-types", 100);
    let buckets = arg("--buckets", 32).max(1);
    // `--rss` measures the process's peak RSS instead: dhat's own bookkeeping
    // would inflate it, so the profiler stays off and the heap figures come
    // from the processor's capacity accounting.
    let rss_mode = std::env::args().any(|a| a == "--rss");
    let _profiler = (!rss_mode).then(|| dhat::Profiler::builder().testing().build());
    let heap = || {
        if rss_mode {
            0
        } else {
            dhat::HeapStats::get().curr_bytes
        }
    };

    let start = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let clock = ManualClock::new(start);
    let baseline = heap();
    let processor = MetricsProcessor::new(Config::default().with_clock(clock.clone()));
    let empty = heap() - baseline;

    let names: Vec<String> = (0..types).map(|i| format!("type-{i}")).collect();
    let seconds = 3_600u64;
    // Values 1.05^k land in distinct buckets (a bucket is ~2 % wide).
    let values: Vec<f64> = (0..buckets).map(|k| 1.05f64.powi(k as i32)).collect();
    let mut user = String::new();
    let mut users = 0u64;
    let fill_start = heap();
    for s in 0..seconds {
        let timestamp: DateTime<Utc> = (start - Duration::from_secs(s)).into();
        for name in &names {
            for value in &values {
                use std::fmt::Write;
                user.clear();
                let _ = write!(user, "u{}", users % 1_000_000);
                users += 1;
                processor
                    .process(EventRef {
                        timestamp,
                        user_id: &user,
                        event_type: name,
                        value: *value,
                    })
                    .expect("valid event");
            }
        }
    }
    let filled = heap() - baseline;
    let names_bytes = fill_start - baseline - empty;
    let usage = processor.memory_usage();
    if rss_mode {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let peak_kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0);
        println!("event types: {types}, buckets per cell: {buckets}, events: {users}");
        println!(
            "processor accounting (capacities): {} B; peak RSS {:.1} MiB",
            usage.total_bytes(),
            peak_kb / 1024.0
        );
        let summary = serde_json::json!({
            "event_types": types,
            "buckets": buckets,
            "events": users,
            "processor_heap_mib": (usage.total_bytes() as f64 / 1048576.0 * 10.0).round() / 10.0,
            "rss_mib": (peak_kb / 1024.0 * 10.0).round() / 10.0,
        });
        println!("{summary}");
        return;
    }

    // The model (see docs/metrics-core.md): per type, 63 minute blocks of
    // 60 one-second cells plus a minute total; 4 bytes per occupied bucket
    // per cell and per minute total, Vec capacities rounded up to powers of
    // two; plus the fixed unique-users sketch.
    let ring_minutes = 63u64;
    let block_fixed = 80 + 60 * 56;
    let cap = (buckets as u64).next_power_of_two().max(4) * 4;
    let per_type_fixed = ring_minutes * block_fixed as u64;
    let per_type_bins = seconds * cap + 60 * cap;
    let computed_per_type = per_type_fixed + per_type_bins;
    let sketch_bytes = 65_536 * 49 * 4 + 65_536;
    let measured_windows = filled - empty - names_bytes;
    let measured_per_type = measured_windows as f64 / types as f64;
    println!("event types: {types}, buckets per cell: {buckets}, events: {users}");
    println!(
        "empty processor (unique-users sketch, registry): {empty} B (computed sketch {sketch_bytes} B)"
    );
    println!(
        "per type: measured {measured_per_type:.0} B, computed {computed_per_type} B (fixed {per_type_fixed} B + bins {per_type_bins} B)"
    );
    println!(
        "per type per second of retention: measured {:.1} B, computed {:.1} B",
        measured_per_type / seconds as f64,
        computed_per_type as f64 / seconds as f64
    );
    println!(
        "per sketch (one cell's bins): {cap} B for {buckets} buckets ({} B per bucket used)",
        cap as f64 / buckets as f64
    );
    println!(
        "processor accounting (capacities): {} B",
        usage.total_bytes()
    );
    let summary = serde_json::json!({
        "event_types": types,
        "buckets": buckets,
        "events": users,
        "empty_bytes": empty,
        "total_heap_bytes": filled - names_bytes,
        "total_heap_mib": ((filled - names_bytes) as f64 / 1048576.0 * 10.0).round() / 10.0,
        "measured_bytes_per_type": measured_per_type.round(),
        "computed_bytes_per_type": computed_per_type,
        "measured_bytes_per_type_second": (measured_per_type / seconds as f64 * 10.0).round() / 10.0,
        "computed_bytes_per_type_second": (computed_per_type as f64 / seconds as f64 * 10.0).round() / 10.0,
        "sketch_bytes": cap,
        "unique_users_sketch_bytes": sketch_bytes,
    });
    println!("{summary}");
}
