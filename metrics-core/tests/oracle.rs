//! Property test: the processor against a brute-force oracle that keeps
//! every accepted event and computes each window by scanning them.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use metrics_core::{Config, Error, EventRef, ManualClock, MetricsProcessor};
use proptest::prelude::*;

const RETENTION_MINUTES: u32 = 10;
const SKEW_SECS: i64 = 5;
const TYPES: [&str; 3] = ["click", "view", "buy"];

#[derive(Debug, Clone)]
enum Op {
    /// Move the clock forward by this many milliseconds.
    Advance(u64),
    /// An event `offset_ms` from now (negative = late).
    Event {
        offset_ms: i64,
        event_type: usize,
        user: u32,
        /// Value in quarters, so every sum is exact in f64 in any order.
        quarters: i32,
    },
    /// Query a window (0 and RETENTION + 1 are invalid on purpose).
    Query(u32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0u64..120_000).prop_map(Op::Advance),
        12 => (
            prop_oneof![
                8 => -(i64::from(RETENTION_MINUTES) * 60_000)..1_000i64,
                1 => -(i64::from(RETENTION_MINUTES) * 60_000 + 5_000)..-(i64::from(RETENTION_MINUTES) * 60_000 - 5_000),
                1 => 0..(SKEW_SECS * 1_000 + 3_000),
            ],
            0..TYPES.len(),
            0u32..150,
            -400_000i32..400_000,
        )
            .prop_map(|(offset_ms, event_type, user, quarters)| Op::Event { offset_ms, event_type, user, quarters }),
        2 => (0..=RETENTION_MINUTES + 1).prop_map(Op::Query),
    ]
}

struct Accepted {
    second: i64,
    event_type: usize,
    user: u32,
    value: f64,
    /// The second the unique-users sketch files it under: min(second, now at ingest).
    user_second: i64,
}

fn nanos(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_nanos() as i64
}

/// The oracle's answer for `(now - minutes*60, now]`.
fn check_window(
    p: &MetricsProcessor,
    events: &[Accepted],
    now_sec: i64,
    minutes: u32,
) -> Result<(), TestCaseError> {
    let after = now_sec - i64::from(minutes) * 60;
    let got = p.summary(minutes).unwrap();
    let mut by_type: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut users = HashSet::new();
    for e in events {
        if e.second > after && e.second <= now_sec {
            by_type
                .entry(TYPES[e.event_type])
                .or_default()
                .push(e.value);
        }
        if e.user_second > after && e.user_second <= now_sec {
            users.insert(e.user);
        }
    }
    let got_types: Vec<&str> = got.types.keys().map(String::as_str).collect();
    let want_types: Vec<&str> = by_type.keys().copied().collect();
    prop_assert_eq!(got_types, want_types);
    let mut total = 0u64;
    let mut total_sum = 0.0;
    for (name, mut values) in by_type {
        let s = &got.types[name];
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let sum: f64 = values.iter().sum();
        total += n as u64;
        total_sum += sum;
        prop_assert_eq!(s.count, n as u64);
        prop_assert_eq!(s.sum, sum);
        prop_assert_eq!(s.avg, sum / n as f64);
        prop_assert_eq!(s.min, values[0]);
        prop_assert_eq!(s.max, values[n - 1]);
        prop_assert_eq!(s.rate_per_sec, n as f64 / (f64::from(minutes) * 60.0));
        for (q, estimate) in [(0.5, s.p50), (0.9, s.p90), (0.99, s.p99)] {
            let exact = values[((q * (n - 1) as f64).floor() as usize).min(n - 1)];
            prop_assert!(
                (estimate - exact).abs() <= 0.01 * exact.abs(),
                "{name} p{}: exact {exact}, got {estimate}",
                q * 100.0
            );
        }
    }
    prop_assert_eq!(got.total_count, total);
    prop_assert_eq!(got.total_sum, total_sum);
    let exact_users = users.len() as f64;
    prop_assert!(
        (got.unique_users - exact_users).abs() <= (0.02 * exact_users).max(2.0),
        "unique users: exact {exact_users}, got {}",
        got.unique_users
    );
    // The flat map carries the same numbers under the documented keys.
    let map = p.aggregates(minutes).unwrap();
    prop_assert_eq!(map["total.count"], total as f64);
    prop_assert_eq!(map.len(), got.types.len() * 9 + 4);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn matches_the_brute_force_oracle(
        start_ms in 0u64..1_000,
        ops in prop::collection::vec(op(), 1..400),
    ) {
        let start = UNIX_EPOCH + Duration::from_secs(1_800_000_000) + Duration::from_millis(start_ms);
        let clock = ManualClock::new(start);
        let p = MetricsProcessor::new(
            Config::default()
                .with_clock(clock.clone())
                .with_retention_minutes(RETENTION_MINUTES)
                .with_max_future_skew(Duration::from_secs(SKEW_SECS as u64)),
        );
        let mut accepted: Vec<Accepted> = Vec::new();
        let mut rejected = 0u64;
        for op in ops {
            let now = clock.now();
            let now_nanos = nanos(now);
            let now_sec = now_nanos.div_euclid(1_000_000_000);
            match op {
                Op::Advance(ms) => clock.advance(Duration::from_millis(ms)),
                Op::Event { offset_ms, event_type, user, quarters } => {
                    let ts_nanos = now_nanos + offset_ms * 1_000_000;
                    let timestamp: DateTime<Utc> = DateTime::from_timestamp_nanos(ts_nanos);
                    let second = ts_nanos.div_euclid(1_000_000_000);
                    let value = f64::from(quarters) / 4.0;
                    let user_id = format!("user-{user}");
                    let result = p.process(EventRef { timestamp, user_id: &user_id, event_type: TYPES[event_type], value });
                    let expect_future = ts_nanos - now_nanos > SKEW_SECS * 1_000_000_000;
                    let expect_old = second <= now_sec - i64::from(RETENTION_MINUTES) * 60;
                    match result {
                        Ok(()) => {
                            prop_assert!(!expect_future && !expect_old, "accepted an event {offset_ms} ms from now");
                            accepted.push(Accepted { second, event_type, user, value, user_second: second.min(now_sec) });
                        }
                        Err(Error::TimestampInFuture { .. }) => { prop_assert!(expect_future); rejected += 1; }
                        Err(Error::TimestampTooOld { .. }) => { prop_assert!(expect_old); rejected += 1; }
                        Err(e) => prop_assert!(false, "unexpected error {e}"),
                    }
                }
                Op::Query(minutes) => {
                    if minutes == 0 || minutes > RETENTION_MINUTES {
                        let invalid = matches!(p.aggregates(minutes), Err(Error::InvalidWindow { .. }));
                        prop_assert!(invalid);
                    } else {
                        check_window(&p, &accepted, now_sec, minutes)?;
                    }
                }
            }
        }
        let stats = p.stats();
        prop_assert_eq!(stats.accepted, accepted.len() as u64);
        prop_assert_eq!(stats.rejected_total(), rejected);
        // Finally every window size against the oracle at the final time.
        let now_sec = nanos(clock.now()).div_euclid(1_000_000_000);
        for minutes in 1..=RETENTION_MINUTES {
            check_window(&p, &accepted, now_sec, minutes)?;
        }
    }
}
