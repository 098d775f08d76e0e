//! The hot path allocates nothing once warm, measured with dhat's counting
//! global allocator (this test binary holds only this test, since the
//! allocator and profiler are process-wide).

use std::time::{Duration, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use metrics_core::{Config, EventRef, ManualClock, MetricsProcessor};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

const TYPES: [&str; 4] = ["click", "view", "buy", "scroll"];

/// One simulated second of traffic: the same mix every second, as a steady
/// workload has, with values from a fixed distribution.
fn one_second(p: &MetricsProcessor, clock: &ManualClock, users: &[String]) {
    let now: DateTime<Utc> = clock.now().into();
    for i in 0..40usize {
        p.process(EventRef {
            timestamp: now,
            user_id: &users[i * 7 % users.len()],
            event_type: TYPES[i % TYPES.len()],
            value: (i * 37 % 200) as f64 * 0.5,
        })
        .unwrap();
    }
    clock.advance(Duration::from_secs(1));
}

#[test]
fn processing_allocates_nothing_after_warm_up() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let clock = ManualClock::new(UNIX_EPOCH + Duration::from_secs(1_800_000_000));
    let p = MetricsProcessor::new(
        Config::default()
            .with_clock(clock.clone())
            .with_retention_minutes(5),
    );
    let users: Vec<String> = (0..1_000).map(|i| format!("user-{i}")).collect();
    // The ring holds 5 + 1 + 2 = 8 minutes; two full turns warm every cell.
    let ring_secs = 8 * 60;
    for _ in 0..2 * ring_secs {
        one_second(&p, &clock, &users);
    }

    let before = dhat::HeapStats::get();
    for _ in 0..ring_secs {
        one_second(&p, &clock, &users);
    }
    let after = dhat::HeapStats::get();

    let events = (ring_secs * 40) as u64;
    assert_eq!(p.stats().accepted, 3 * events);
    dhat::assert_eq!(
        after.total_blocks - before.total_blocks,
        0,
        "allocations while processing {} warm events",
        events
    );

    // Control: the measurement does see allocations (a query allocates its result).
    let before_query = dhat::HeapStats::get();
    let m = p.aggregates(5).unwrap();
    let after_query = dhat::HeapStats::get();
    dhat::assert!(after_query.total_blocks > before_query.total_blocks);
    // The window (now - 300 s, now] holds the 299 complete seconds before now.
    dhat::assert_eq!(m["total.count"], 299.0 * 40.0);
}
