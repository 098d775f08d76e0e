//! Many threads, concurrent queries, shutdown under load, snapshot/restore.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use metrics_core::{Config, Error, EventRef, ManualClock, MetricsProcessor, RejectReason};

fn start() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn ts(clock: &ManualClock, back_secs: u64) -> DateTime<Utc> {
    (clock.now() - Duration::from_secs(back_secs)).into()
}

#[test]
fn eight_threads_of_100k_events_with_concurrent_queries_count_exactly() {
    const THREADS: u64 = 8;
    const PER_THREAD: u64 = 100_000;
    let clock = ManualClock::new(start());
    let p = Arc::new(MetricsProcessor::new(
        Config::default().with_clock(clock.clone()),
    ));
    let done = Arc::new(AtomicBool::new(false));

    // A reader queries all the time and checks monotonic, consistent totals.
    let reader = {
        let (p, done) = (Arc::clone(&p), Arc::clone(&done));
        std::thread::spawn(move || {
            let mut last = 0.0;
            let mut queries = 0u64;
            while !done.load(Ordering::Acquire) {
                let m = p.aggregates(60).unwrap();
                let total = m["total.count"];
                assert!(total >= last, "total went backwards: {last} -> {total}");
                let per_type: f64 = m
                    .iter()
                    .filter(|(k, _)| k.ends_with(".count") && *k != "total.count")
                    .map(|(_, v)| v)
                    .sum();
                assert_eq!(per_type, total, "per-type counts must add up to the total");
                last = total;
                queries += 1;
            }
            queries
        })
    };

    let writers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (p, clock) = (Arc::clone(&p), clock.clone());
            std::thread::spawn(move || {
                let types = ["a", "b", "c", "d"];
                let mut user = String::new();
                for i in 0..PER_THREAD {
                    use std::fmt::Write;
                    user.clear();
                    let _ = write!(user, "user-{}", (t * PER_THREAD + i) % 5_000);
                    p.process(EventRef {
                        timestamp: ts(&clock, i % 3_000),
                        user_id: &user,
                        event_type: types[(i % 4) as usize],
                        value: (i % 100) as f64,
                    })
                    .unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    done.store(true, Ordering::Release);
    let queries = reader.join().unwrap();
    assert!(queries > 0);

    let m = p.aggregates(60).unwrap();
    assert_eq!(m["total.count"], (THREADS * PER_THREAD) as f64);
    for t in ["a", "b", "c", "d"] {
        assert_eq!(m[&format!("{t}.count")], (THREADS * PER_THREAD / 4) as f64);
    }
    // Each thread contributes sum over i of (i % 100) = 1000 cycles * 4950.
    assert_eq!(m["total.sum"], (THREADS * 1_000 * 4_950) as f64);
    assert_eq!(m["a.min"], 0.0);
    assert_eq!(m["d.max"], 99.0);
    let users = m["total.unique_users"];
    assert!((users - 5_000.0).abs() <= 100.0, "unique users {users}");
    assert_eq!(p.stats().accepted, THREADS * PER_THREAD);
    assert_eq!(p.stats().rejected_total(), 0);
}

#[test]
fn shutdown_under_load_returns_in_time_and_loses_nothing_accepted() {
    let dir = tempdir();
    let path = dir.join("metrics.snapshot");
    let clock = ManualClock::new(start());
    let config = Config::default()
        .with_clock(clock.clone())
        .with_snapshot_path(&path);
    let p = Arc::new(MetricsProcessor::new(config.clone()));
    let accepted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));

    let producers: Vec<_> = (0..6)
        .map(|t| {
            let (p, clock, accepted, refused) = (
                Arc::clone(&p),
                clock.clone(),
                Arc::clone(&accepted),
                Arc::clone(&refused),
            );
            std::thread::spawn(move || {
                let user = format!("producer-{t}");
                let mut i = 0u64;
                // Keep calling well after shutdown began.
                while refused.load(Ordering::Relaxed) < 10_000 {
                    match p.process(EventRef {
                        timestamp: ts(&clock, i % 600),
                        user_id: &user,
                        event_type: "load",
                        value: 1.0,
                    }) {
                        Ok(()) => {
                            accepted.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(Error::ShutDown) => {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => panic!("unexpected {e}"),
                    }
                    i += 1;
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let timeout = Duration::from_secs(5);
    let began = Instant::now();
    p.shutdown(timeout).unwrap();
    assert!(
        began.elapsed() <= timeout,
        "shutdown took {:?}",
        began.elapsed()
    );
    let at_shutdown = p.aggregates(60).unwrap()["total.count"];
    for producer in producers {
        producer.join().unwrap();
    }
    let accepted = accepted.load(Ordering::Relaxed);
    assert!(accepted > 0);
    // Everything accepted is in the state, and nothing was added after.
    assert_eq!(at_shutdown, accepted as f64);
    assert_eq!(p.aggregates(60).unwrap()["total.count"], accepted as f64);
    assert_eq!(p.stats().accepted, accepted);
    assert!(p.stats().rejected(RejectReason::ShutDown) >= 10_000);
    assert!(matches!(
        p.process(EventRef {
            timestamp: ts(&clock, 0),
            user_id: "u",
            event_type: "x",
            value: 1.0
        }),
        Err(Error::ShutDown)
    ));
    // A second shutdown is a no-op.
    p.shutdown(Duration::from_millis(1)).unwrap();

    // Restart from the snapshot: every window answers the same.
    let restored = MetricsProcessor::restore(config).unwrap();
    for minutes in [1, 5, 10, 60] {
        assert_eq!(
            restored.summary(minutes).unwrap(),
            p.summary(minutes).unwrap(),
            "window {minutes}"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn snapshot_then_restore_gives_the_same_aggregates_with_many_types() {
    let dir = tempdir();
    let path = dir.join("m.snapshot");
    let clock = ManualClock::new(start());
    let config = Config::default()
        .with_clock(clock.clone())
        .with_snapshot_path(&path);
    let p = MetricsProcessor::new(config.clone());
    for i in 0..50_000u64 {
        let ty = format!("type-{}", i % 37);
        let user = format!("u{}", i % 7_919);
        let value = ((i * 7_919) % 10_007) as f64 / 8.0 - 300.0;
        p.process(EventRef {
            timestamp: ts(&clock, i % 3_599),
            user_id: &user,
            event_type: &ty,
            value,
        })
        .unwrap();
    }
    p.shutdown(Duration::from_secs(10)).unwrap();
    let restored = MetricsProcessor::restore(config.clone()).unwrap();
    for minutes in 1..=60 {
        assert_eq!(
            restored.summary(minutes).unwrap(),
            p.summary(minutes).unwrap()
        );
    }
    // The restored processor keeps working and accumulates on top.
    restored
        .process(EventRef {
            timestamp: ts(&clock, 0),
            user_id: "new",
            event_type: "type-0",
            value: 1.0,
        })
        .unwrap();
    assert_eq!(restored.aggregates(60).unwrap()["total.count"], 50_001.0);

    // Time passes while the process is down: restore drops what aged out.
    clock.advance(Duration::from_secs(30 * 60));
    let later = MetricsProcessor::restore(config).unwrap();
    let expected: f64 = (0..50_000u64).filter(|i| i % 3_599 < 30 * 60).count() as f64;
    assert_eq!(later.aggregates(60).unwrap()["total.count"], expected);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn restore_refuses_corrupt_or_foreign_files() {
    let dir = tempdir();
    let path = dir.join("m.snapshot");
    let clock = ManualClock::new(start());
    let config = Config::default()
        .with_clock(clock.clone())
        .with_snapshot_path(&path);

    // Missing file: a first start, empty.
    let fresh = MetricsProcessor::restore(config.clone()).unwrap();
    assert_eq!(fresh.aggregates(60).unwrap()["total.count"], 0.0);

    let p = MetricsProcessor::new(config.clone());
    for i in 0..1_000u64 {
        p.process(EventRef {
            timestamp: ts(&clock, i),
            user_id: "u",
            event_type: "t",
            value: i as f64,
        })
        .unwrap();
    }
    p.shutdown(Duration::from_secs(5)).unwrap();
    let good = std::fs::read(&path).unwrap();

    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("foreign", b"{\"not\":\"a snapshot\"}".to_vec()),
        ("empty", Vec::new()),
        ("truncated", good[..good.len() / 2].to_vec()),
        ("flipped byte", {
            let mut b = good.clone();
            let at = b.len() - 10;
            b[at] ^= 0x40;
            b
        }),
        ("future version", {
            let mut b = good.clone();
            b[8] = 99;
            b
        }),
    ];
    for (name, bytes) in cases {
        std::fs::write(&path, &bytes).unwrap();
        match MetricsProcessor::restore(config.clone()) {
            Err(Error::Snapshot { source, .. }) => {
                let msg = source.to_string();
                assert!(!msg.is_empty(), "{name}");
            }
            Ok(_) => panic!("{name}: corrupt snapshot was accepted"),
            Err(e) => panic!("{name}: unexpected error {e}"),
        }
    }
    std::fs::write(&path, &good).unwrap();
    assert_eq!(
        MetricsProcessor::restore(config)
            .unwrap()
            .aggregates(60)
            .unwrap()["total.count"],
        1_000.0
    );
    std::fs::remove_dir_all(dir).unwrap();
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "metrics-core-test-{}-{}",
        std::process::id(),
        fastrand_u64()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn fastrand_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now())
}
