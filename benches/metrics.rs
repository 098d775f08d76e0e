//! Criterion benches of `metrics_core`'s hot paths, each against a naive
//! baseline measured in the same run: a `Mutex<HashMap>` of raw events that
//! answers queries by scanning and sorting (what a first implementation does).
//!
//! ```text
//! cargo bench --bench metrics
//! ```

use std::collections::{HashMap, HashSet};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use metrics_core::{Config, EventRef, ManualClock, MetricsProcessor};
use parking_lot::Mutex;

const TYPES: usize = 100;
const USERS: usize = 100_000;

/// Pre-generated events spread over the last hour before `now`.
struct Events {
    timestamps: Vec<DateTime<Utc>>,
    users: Vec<String>,
    types: Vec<String>,
    picks: Vec<(usize, usize, f64)>,
}

impl Events {
    fn new(now: SystemTime, count: usize, seed: u64) -> Events {
        let mut rng = fastrand::Rng::with_seed(seed);
        let timestamps = (0..count)
            .map(|_| (now - Duration::from_millis(rng.u64(..3_590_000))).into())
            .collect();
        let picks = (0..count)
            .map(|_| (rng.usize(..USERS), rng.usize(..TYPES), rng.f64() * 1_000.0))
            .collect();
        Events {
            timestamps,
            users: (0..USERS).map(|i| format!("user-{i}")).collect(),
            types: (0..TYPES).map(|i| format!("type-{i}")).collect(),
            picks,
        }
    }

    fn get(&self, i: usize) -> EventRef<'_> {
        let i = i % self.picks.len();
        let (user, ty, value) = self.picks[i];
        EventRef {
            timestamp: self.timestamps[i],
            user_id: &self.users[user],
            event_type: &self.types[ty],
            value,
        }
    }
}

/// (second, user id, value) of one raw event.
type RawEvent = (i64, String, f64);

/// The naive baseline: every event kept, queries scan and sort.
#[derive(Default)]
struct Naive {
    by_type: Mutex<HashMap<String, Vec<RawEvent>>>,
}

impl Naive {
    fn process(&self, e: EventRef<'_>) {
        let mut map = self.by_type.lock();
        map.entry(e.event_type.to_owned()).or_default().push((
            e.timestamp.timestamp(),
            e.user_id.to_owned(),
            e.value,
        ));
    }

    fn aggregates(&self, now_sec: i64, minutes: i64) -> HashMap<String, f64> {
        let after = now_sec - minutes * 60;
        let map = self.by_type.lock();
        let mut out = HashMap::new();
        let mut users = HashSet::new();
        let (mut total, mut total_sum) = (0usize, 0.0);
        for (ty, events) in map.iter() {
            let mut values: Vec<f64> = Vec::new();
            for (ts, user, value) in events {
                if *ts > after && *ts <= now_sec {
                    values.push(*value);
                    users.insert(user.as_str());
                }
            }
            if values.is_empty() {
                continue;
            }
            values.sort_by(f64::total_cmp);
            let n = values.len();
            let sum: f64 = values.iter().sum();
            total += n;
            total_sum += sum;
            for (stat, v) in [
                ("count", n as f64),
                ("sum", sum),
                ("avg", sum / n as f64),
                ("min", values[0]),
                ("max", values[n - 1]),
                ("p50", values[(n - 1) / 2]),
                ("p90", values[(n - 1) * 9 / 10]),
                ("p99", values[(n - 1) * 99 / 100]),
            ] {
                out.insert(format!("{ty}.{stat}"), v);
            }
        }
        out.insert("total.count".into(), total as f64);
        out.insert("total.sum".into(), total_sum);
        out.insert("total.unique_users".into(), users.len() as f64);
        out
    }
}

fn start() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn processor(clock: &ManualClock) -> MetricsProcessor {
    MetricsProcessor::new(Config::default().with_clock(clock.clone()))
}

fn bench_process(c: &mut Criterion) {
    let clock = ManualClock::new(start());
    let events = Events::new(start(), 1 << 16, 1);
    let mut group = c.benchmark_group("process");
    // The naive baseline keeps every event it sees; short runs bound its memory.
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));

    let p = processor(&clock);
    for i in 0..events.picks.len() {
        p.process(events.get(i)).unwrap();
    }
    let mut i = 0;
    group.bench_function("single_thread/metrics_core", |b| {
        b.iter(|| {
            i += 1;
            p.process(black_box(events.get(i))).unwrap()
        })
    });
    let naive = Naive::default();
    let mut i = 0;
    group.bench_function("single_thread/naive_mutex_hashmap", |b| {
        b.iter(|| {
            i += 1;
            naive.process(black_box(events.get(i)))
        })
    });

    // Two threads share one processor; the time is the wall time for both to
    // process `iters` events each.
    let p = Arc::new(processor(&clock));
    let events = Arc::new(events);
    group.bench_function("two_threads/metrics_core", |b| {
        b.iter_custom(|iters| {
            contended(iters, &events, {
                let p = Arc::clone(&p);
                move |e| p.process(e).unwrap()
            })
        })
    });
    let naive = Arc::new(Naive::default());
    group.bench_function("two_threads/naive_mutex_hashmap", |b| {
        b.iter_custom(|iters| {
            contended(iters, &events, {
                let naive = Arc::clone(&naive);
                move |e| naive.process(e)
            })
        })
    });
    group.finish();
}

fn contended(
    iters: u64,
    events: &Arc<Events>,
    process: impl Fn(EventRef<'_>) + Send + Sync + Clone + 'static,
) -> Duration {
    let started = Instant::now();
    let handles: Vec<_> = (0..2)
        .map(|t| {
            let (events, process) = (Arc::clone(events), process.clone());
            std::thread::spawn(move || {
                for i in 0..iters as usize {
                    process(black_box(events.get(i * 2 + t)));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    started.elapsed()
}

fn bench_aggregates(c: &mut Criterion) {
    const EVENTS: usize = 200_000;
    let clock = ManualClock::new(start());
    let events = Events::new(start(), EVENTS, 2);
    let p = processor(&clock);
    let naive = Naive::default();
    for i in 0..EVENTS {
        p.process(events.get(i)).unwrap();
        naive.process(events.get(i));
    }
    let now_sec = start().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let mut group = c.benchmark_group("aggregates");
    group.sample_size(20);
    for minutes in [1u32, 5, 60] {
        group.bench_with_input(
            BenchmarkId::new("metrics_core", minutes),
            &minutes,
            |b, &m| b.iter(|| black_box(p.aggregates(m).unwrap())),
        );
        group.bench_with_input(
            BenchmarkId::new("naive_mutex_hashmap", minutes),
            &minutes,
            |b, &m| b.iter(|| black_box(naive.aggregates(now_sec, i64::from(m)))),
        );
    }
    group.finish();
}

criterion_group!(benches, bench_process, bench_aggregates);
criterion_main!(benches);
