//! Snapshots: whatever the processor holds survives save → restore bit for
//! bit, and concurrent writers never corrupt the file.

mod support;
use support::TempDir;

use std::error::Error as _;
use std::sync::{Arc, Barrier};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics_core::{Config, EventRef, ManualClock, MetricsProcessor, WindowSummary};
use proptest::prelude::*;

fn start() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000) + Duration::from_millis(250)
}

/// Finite values of every class, the extremes weighted so that sums overflow.
fn value() -> impl Strategy<Value = f64> {
    prop_oneof![
        3 => prop::num::f64::NORMAL | prop::num::f64::POSITIVE | prop::num::f64::NEGATIVE,
        2 => prop::num::f64::SUBNORMAL | prop::num::f64::ZERO,
        3 => prop::sample::select(vec![f64::MAX, -f64::MAX, 1e308, -1e308, f64::MIN_POSITIVE, -0.0]),
        2 => -1e6f64..1e6,
    ]
}

/// `(seconds back from now, type, user, value)`: back up to past the
/// retention's start, so partly expired minutes are covered too.
fn events() -> impl Strategy<Value = Vec<(u64, usize, u32, f64)>> {
    prop::collection::vec((0u64..3_660, 0usize..4, 0u32..50, value()), 1..120)
}

/// Equal bit for bit, NaN included (`PartialEq` on `f64` is not).
fn same_bits(a: &WindowSummary, b: &WindowSummary) -> bool {
    format!("{a:?}") == format!("{b:?}")
        && a.types.len() == b.types.len()
        && a.types.iter().zip(&b.types).all(|((na, x), (nb, y))| {
            na == nb
                && x.count == y.count
                && [
                    (x.sum, y.sum),
                    (x.avg, y.avg),
                    (x.min, y.min),
                    (x.max, y.max),
                    (x.p50, y.p50),
                    (x.p90, y.p90),
                    (x.p99, y.p99),
                ]
                .iter()
                .all(|(p, q)| p.to_bits() == q.to_bits())
        })
        && a.total_sum.to_bits() == b.total_sum.to_bits()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Defect: two `1e308` events in one second overflowed the sum to
    /// infinity; the snapshot was written and `restore` refused it as
    /// corrupt, so the server could not restart. Whatever the processor
    /// holds must restore, and re-saving the restored processor must give
    /// the same bytes.
    #[test]
    fn save_then_restore_is_bit_exact(events in events(), same_second in value()) {
        let dir = TempDir::new("roundtrip");
        let path = dir.0.join("m.snapshot");
        let clock = ManualClock::new(start());
        let config = Config::default().with_clock(clock.clone()).with_snapshot_path(&path);
        let p = MetricsProcessor::new(config.clone());
        let types = ["a", "b", "c", "d"];
        for &(back, t, user, value) in &events {
            let ts = clock.now() - Duration::from_secs(back);
            let user = format!("u{user}");
            // Older than the retention is rejected; everything else held.
            let _ = p.process(EventRef { timestamp: ts.into(), user_id: &user, event_type: types[t], value });
        }
        // Always at least one overflow in one second.
        for v in [1e308, 1e308, same_second] {
            p.process(EventRef { timestamp: clock.now().into(), user_id: "x", event_type: "a", value: v }).unwrap();
        }
        p.save_snapshot(&path).unwrap();
        let first = std::fs::read(&path).unwrap();
        let restored = MetricsProcessor::restore(config.clone())
            .unwrap_or_else(|e| panic!("restore failed: {e} ({:?})", e.source()));
        // Windows that cut minutes at both ends, cover whole minutes, and
        // reach the retention's edge (each query costs a unique-users scan).
        for minutes in [1, 2, 7, 30, 59, 60] {
            let (a, b) = (p.summary(minutes).unwrap(), restored.summary(minutes).unwrap());
            prop_assert!(same_bits(&a, &b), "window {minutes}:\n{a:?}\n{b:?}");
        }
        let second = dir.0.join("again.snapshot");
        restored.save_snapshot(&second).unwrap();
        prop_assert!(first == std::fs::read(&second).unwrap(), "re-saved snapshot differs");
    }
}

#[test]
fn an_overflowing_sum_survives_a_restart() {
    let dir = TempDir::new("overflow");
    let path = dir.0.join("m.snapshot");
    let clock = ManualClock::new(start());
    let config = Config::default()
        .with_clock(clock.clone())
        .with_snapshot_path(&path);
    let p = MetricsProcessor::new(config.clone());
    for _ in 0..2 {
        p.process(EventRef {
            timestamp: clock.now().into(),
            user_id: "u",
            event_type: "big",
            value: 1e308,
        })
        .unwrap();
    }
    assert_eq!(p.summary(1).unwrap().types["big"].sum, f64::INFINITY);
    p.shutdown(Duration::from_secs(5)).unwrap();
    let restored = MetricsProcessor::restore(config).unwrap();
    let big = restored.summary(1).unwrap().types["big"];
    assert_eq!((big.count, big.sum, big.max), (2, f64::INFINITY, 1e308));
}

/// Defect: the temporary file had a fixed name, so two writers (a
/// checkpoint and the shutdown writer) could rename each other's file away.
#[test]
fn concurrent_saves_to_one_path_never_fail_or_corrupt() {
    const WRITERS: usize = 4;
    const SAVES: usize = 40;
    let dir = TempDir::new("concurrent");
    let path = dir.0.join("m.snapshot");
    let clock = ManualClock::new(start());
    let config = Config::default()
        .with_clock(clock.clone())
        .with_snapshot_path(&path);
    let p = Arc::new(MetricsProcessor::new(config.clone()));
    for i in 0..2_000u32 {
        p.process(EventRef {
            timestamp: (clock.now() - Duration::from_secs(u64::from(i % 600))).into(),
            user_id: "u",
            event_type: ["a", "b", "c"][i as usize % 3],
            value: f64::from(i),
        })
        .unwrap();
    }
    let barrier = Arc::new(Barrier::new(WRITERS + 1));
    let writers: Vec<_> = (0..WRITERS)
        .map(|_| {
            let (p, barrier, path) = (Arc::clone(&p), Arc::clone(&barrier), path.clone());
            std::thread::spawn(move || {
                barrier.wait();
                for _ in 0..SAVES {
                    p.save_snapshot(&path).unwrap();
                }
            })
        })
        .collect();
    barrier.wait();
    // The shutdown writer races the checkpoints on the same file.
    p.shutdown(Duration::from_secs(30)).unwrap();
    for w in writers {
        w.join().unwrap();
    }
    let restored = MetricsProcessor::restore(config).unwrap();
    assert_eq!(restored.aggregates(60).unwrap()["total.count"], 2_000.0);
    let leftovers: Vec<_> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|name| name != "m.snapshot")
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}
