//! Load generator for `metrics_core`: drives one `MetricsProcessor` from T
//! threads with pre-generated events while a query thread calls
//! `aggregates(60)` every 100 ms, then prints a JSON summary as its last line.
//!
//! ```text
//! cargo run --release --example metrics_load -- --threads 2 --seconds 10 --event-types 100 --users 1000000
//! cargo run --release --example metrics_load -- --threads 1 --seconds 10 --rate 100000
//! ```
//!
//! Flags: `--threads T` (2), `--seconds S` (10), `--event-types K` (100),
//! `--users U` (1,000,000), `--rate R` total offered events/s (unpaced if
//! absent), `--spread-minutes M` (60): timestamps spread over the last M
//! minutes so a short run fills the whole window. `--order time` (default)
//! replays each thread's events in timestamp order, as live traffic arrives;
//! `--order random` shuffles them over the spread, the cache-hostile worst case.
//!
//! `--warmup-passes N` (1) first replays every thread's events N times
//! unmeasured, so the measured phase sees a warm processor (cells and sketch
//! bins allocated), as a long-running service does; `--warmup-passes 0`
//! measures from cold. The warm-up's events count in the window and
//! `window_events`, but not in `events` or `events_per_sec`.
//!
//! Latency is per `process` call. Paced runs (`--rate`) time every call from
//! its *intended* start, so a stall is charged to every event it delays (no
//! coordinated omission), and also report the call alone (`service_*`) and,
//! as a baseline measured first in the same run, the pacing loop's own latency
//! with no call at all (`floor_*`): on a shared VM the scheduler alone puts
//! tens of microseconds under the p99 of any CO-free measurement. Unpaced
//! runs time every 8th call, to keep the timer out of the throughput figure.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use hdrhistogram::Histogram;
use metrics_core::{Config, EventRef, MetricsProcessor};

struct Args {
    threads: usize,
    seconds: f64,
    event_types: usize,
    users: usize,
    rate: Option<f64>,
    spread_minutes: u32,
    order: Order,
    warmup_passes: usize,
}

/// The order in which a thread replays its pre-generated events.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Order {
    /// Timestamp order, as live traffic arrives (each thread replays the
    /// spread as a timeline).
    Time,
    /// Shuffled across the whole spread: every event lands in a random
    /// (type, second) cell, the cache-hostile worst case.
    Random,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        threads: 2,
        seconds: 10.0,
        event_types: 100,
        users: 1_000_000,
        rate: None,
        spread_minutes: 60,
        order: Order::Time,
        warmup_passes: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            return Err("usage: metrics_load [--threads T] [--seconds S] [--event-types K] [--users U] [--rate R] [--spread-minutes M] [--order time|random] [--warmup-passes N]".into());
        }
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--threads" => args.threads = value.parse().map_err(|e| bad(&e))?,
            "--seconds" => args.seconds = value.parse().map_err(|e| bad(&e))?,
            "--event-types" => args.event_types = value.parse().map_err(|e| bad(&e))?,
            "--users" => args.users = value.parse().map_err(|e| bad(&e))?,
            "--rate" => args.rate = Some(value.parse().map_err(|e| bad(&e))?),
            "--spread-minutes" => args.spread_minutes = value.parse().map_err(|e| bad(&e))?,
            "--warmup-passes" => args.warmup_passes = value.parse().map_err(|e| bad(&e))?,
            "--order" => {
                args.order = match value.as_str() {
                    "time" => Order::Time,
                    "random" => Order::Random,
                    _ => return Err(format!("--order must be time or random, got {value}")),
                }
            }
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if args.threads == 0
        || args.event_types == 0
        || args.users == 0
        || args.seconds.is_nan()
        || args.seconds <= 0.0
    {
        return Err("threads, event types, users and seconds must be positive".into());
    }
    if args.spread_minutes == 0 || args.spread_minutes > 60 {
        return Err("--spread-minutes must be 1..=60".into());
    }
    Ok(args)
}

/// A pre-generated event: indexes into the name pools, so replaying it
/// allocates nothing.
#[derive(Clone, Copy)]
struct Pregen {
    timestamp: DateTime<Utc>,
    user: u32,
    event_type: u16,
    value: f64,
}

/// All user ids in one buffer: `u{index:07}` at `index * WIDTH`.
struct Names {
    buffer: String,
    width: usize,
}

impl Names {
    fn new(prefix: &str, count: usize) -> Names {
        let digits = count.to_string().len().max(1);
        let width = prefix.len() + digits;
        let mut buffer = String::with_capacity(width * count);
        for i in 0..count {
            use std::fmt::Write;
            let _ = write!(buffer, "{prefix}{i:0digits$}");
        }
        Names { buffer, width }
    }

    fn get(&self, i: usize) -> &str {
        &self.buffer[i * self.width..(i + 1) * self.width]
    }
}

/// Formats user `index` as `u{index}` into `buf`, as a server formats or
/// slices the id out of its request buffer: no allocation, no lookup table.
fn user_id(buf: &mut [u8; 24], mut index: usize) -> &str {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (index % 10) as u8;
        index /= 10;
        if index == 0 {
            break;
        }
    }
    at -= 1;
    buf[at] = b'u';
    std::str::from_utf8(&buf[at..]).unwrap_or("u")
}

const PREGEN_PER_THREAD: usize = 1 << 18;

fn pregenerate(args: &Args, seed: u64, now: DateTime<Utc>) -> Vec<Pregen> {
    let mut rng = fastrand::Rng::with_seed(seed);
    // Keep the oldest events inside the retention for the whole run.
    let spread_ms = (u64::from(args.spread_minutes) * 60_000)
        .saturating_sub((args.seconds * 1_000.0) as u64 + 5_000)
        .max(1);
    let mut events: Vec<Pregen> = (0..PREGEN_PER_THREAD)
        .map(|_| {
            let event_type = rng.usize(..args.event_types) as u16;
            // Per-type log-normal-ish latencies: a base per type times a spread.
            let base = 1.0 + f64::from(event_type % 50) * 4.0;
            let value = base * (rng.f64() * 2.0 - 1.0).exp2() * (1.0 + rng.f64());
            Pregen {
                timestamp: now - chrono::Duration::milliseconds(rng.u64(..spread_ms) as i64),
                user: rng.u32(..args.users as u32),
                event_type,
                value,
            }
        })
        .collect();
    if args.order == Order::Time {
        events.sort_by_key(|e| e.timestamp);
    }
    events
}

struct ThreadResult {
    events: u64,
    rejected: u64,
    /// Per call: from intended start when paced (no coordinated omission),
    /// else the call itself (sampled).
    latency_ns: Histogram<u64>,
    /// Per call, the call itself (paced runs only).
    service_ns: Histogram<u64>,
    /// The pacing loop's own latency with no call (paced runs only): the
    /// floor this machine's scheduling puts under `latency_ns`.
    floor_ns: Histogram<u64>,
}

fn histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds")
}

/// Waits until `intended`: sleeps while far ahead, spins when close, so the
/// wake-up is precise.
fn wait_until(intended: Instant) {
    loop {
        let now = Instant::now();
        if now >= intended {
            return;
        }
        if intended - now > Duration::from_millis(2) {
            std::thread::sleep(intended - now - Duration::from_millis(1));
        } else {
            std::hint::spin_loop();
        }
    }
}

/// Runs the pacing loop for `run_for` without calling anything: measures the
/// latency floor of the generator and the machine (timer reads, scheduling).
fn pacing_floor(rate: f64, run_for: Duration) -> Histogram<u64> {
    let mut floor = histogram();
    let started = Instant::now();
    for n in 0u64.. {
        let intended = started + Duration::from_secs_f64(n as f64 / rate);
        if intended - started >= run_for {
            break;
        }
        wait_until(intended);
        let _ = floor.record(intended.elapsed().as_nanos().max(1) as u64);
    }
    floor
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let types = Names::new("type-", args.event_types);
    let now = Utc::now();
    let pregen: Vec<Vec<Pregen>> = (0..args.threads)
        .map(|t| pregenerate(&args, 0x5eed + t as u64, now))
        .collect();

    let processor = Arc::new(MetricsProcessor::new(Config::default()));
    let running = Arc::new(AtomicBool::new(true));
    // Workers, the query thread and main start together.
    let barrier = Arc::new(Barrier::new(args.threads + 2));
    let per_thread_rate = args.rate.map(|r| r / args.threads as f64);
    let run_for = Duration::from_secs_f64(args.seconds);
    println!(
        "metrics_load: threads={} seconds={} event_types={} users={} rate={} spread_minutes={} order={:?} warmup_passes={}",
        args.threads,
        args.seconds,
        args.event_types,
        args.users,
        args.rate.map_or("unpaced".to_string(), |r| r.to_string()),
        args.spread_minutes,
        args.order,
        args.warmup_passes
    );

    let results: Vec<ThreadResult> = std::thread::scope(|s| {
        let query = {
            let (processor, running, barrier) = (
                Arc::clone(&processor),
                Arc::clone(&running),
                Arc::clone(&barrier),
            );
            s.spawn(move || {
                let mut h = Histogram::<u64>::new(3).expect("histogram");
                barrier.wait();
                let mut next = Instant::now();
                while running.load(Ordering::Relaxed) {
                    next += Duration::from_millis(100);
                    let started = Instant::now();
                    let m = processor.aggregates(60).expect("aggregates");
                    let _ = h.record(started.elapsed().as_micros() as u64);
                    std::hint::black_box(m);
                    std::thread::sleep(next.saturating_duration_since(Instant::now()));
                }
                h
            })
        };
        let workers: Vec<_> = pregen
            .iter()
            .enumerate()
            .map(|(t, events)| {
                let (processor, barrier, types) =
                    (Arc::clone(&processor), Arc::clone(&barrier), &types);
                let args_users = args.users;
                let warmup_passes = args.warmup_passes;
                s.spawn(move || {
                    let mut latency_ns = histogram();
                    let mut service_ns = histogram();
                    // The floor runs first, in the same process and thread, as the baseline.
                    let floor_ns = per_thread_rate
                        .map_or_else(histogram, |rate| pacing_floor(rate, Duration::from_secs(2)));
                    let (mut count, mut rejected) = (0u64, 0u64);
                    let mut user_buf = [0u8; 24];
                    // Warm-up: replay the events unmeasured so the measured phase
                    // sees the steady state of a long-running service (cells and
                    // sketch bins allocated), not first-touch page faults.
                    let mut buf = [0u8; 24];
                    for _ in 0..warmup_passes {
                        for e in events {
                            let _ = processor.process(EventRef {
                                timestamp: e.timestamp,
                                user_id: user_id(&mut buf, e.user as usize),
                                event_type: types.get(usize::from(e.event_type)),
                                value: e.value,
                            });
                        }
                    }
                    barrier.wait();
                    let started = Instant::now();
                    let deadline = started + run_for;
                    let mut cycle = 0usize;
                    'run: loop {
                        // Each replay of the array shifts users so distinct ids keep coming.
                        let shift = (cycle * 7_919 + t * 104_729) % args_users;
                        for (i, e) in events.iter().enumerate() {
                            let mut user = e.user as usize + shift;
                            if user >= args_users {
                                user -= args_users;
                            }
                            let user = user_id(&mut user_buf, user);
                            let event = EventRef {
                                timestamp: e.timestamp,
                                user_id: user,
                                event_type: types.get(usize::from(e.event_type)),
                                value: e.value,
                            };
                            let outcome;
                            match per_thread_rate {
                                Some(rate) => {
                                    let intended =
                                        started + Duration::from_secs_f64(count as f64 / rate);
                                    wait_until(intended);
                                    let call = Instant::now();
                                    outcome = processor.process(event);
                                    let end = Instant::now();
                                    let _ = latency_ns
                                        .record((end - intended).as_nanos().max(1) as u64);
                                    let _ =
                                        service_ns.record((end - call).as_nanos().max(1) as u64);
                                }
                                None if i % 8 == 0 => {
                                    let t0 = Instant::now();
                                    outcome = processor.process(event);
                                    let _ =
                                        latency_ns.record(t0.elapsed().as_nanos().max(1) as u64);
                                }
                                None => outcome = processor.process(event),
                            }
                            count += 1;
                            rejected += u64::from(outcome.is_err());
                            if count % 1024 == 0 && Instant::now() >= deadline {
                                break 'run;
                            }
                        }
                        cycle += 1;
                    }
                    ThreadResult {
                        events: count,
                        rejected,
                        latency_ns,
                        service_ns,
                        floor_ns,
                    }
                })
            })
            .collect();
        barrier.wait();
        let started = Instant::now();
        let results: Vec<ThreadResult> = workers
            .into_iter()
            .map(|w| w.join().expect("worker"))
            .collect();
        let elapsed = started.elapsed();
        running.store(false, Ordering::Relaxed);
        let queries = query.join().expect("query thread");
        report(&args, &processor, &results, &queries, elapsed);
        results
    });
    drop(results);
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn report(
    args: &Args,
    processor: &MetricsProcessor,
    results: &[ThreadResult],
    queries: &Histogram<u64>,
    elapsed: Duration,
) {
    let (mut latency, mut service, mut floor) = (histogram(), histogram(), histogram());
    let (mut events, mut rejected) = (0u64, 0u64);
    for r in results {
        latency.add(&r.latency_ns).expect("same bounds");
        service.add(&r.service_ns).expect("same bounds");
        floor.add(&r.floor_ns).expect("same bounds");
        events += r.events;
        rejected += r.rejected;
    }
    let seconds = elapsed.as_secs_f64();
    let m = processor.aggregates(60).expect("aggregates");
    let memory = processor.memory_usage();
    println!(
        "processed {events} events in {seconds:.2} s; window holds {} events of {} types, ~{} unique users; processor heap {:.1} MiB",
        m["total.count"],
        memory.event_types,
        m["total.unique_users"],
        memory.total_bytes() as f64 / 1048576.0
    );
    let summary = serde_json::json!({
        "threads": args.threads,
        "event_types": args.event_types,
        "users": args.users,
        "offered_rate": args.rate,
        "spread_minutes": args.spread_minutes,
        "order": format!("{:?}", args.order).to_lowercase(),
        "warmup_passes": args.warmup_passes,
        "events": events,
        "seconds": (seconds * 1000.0).round() / 1000.0,
        "events_per_sec": (events as f64 / seconds).round(),
        "p50_ns": latency.value_at_quantile(0.5),
        "p90_ns": latency.value_at_quantile(0.9),
        "p95_ns": latency.value_at_quantile(0.95),
        "p99_ns": latency.value_at_quantile(0.99),
        "p999_ns": latency.value_at_quantile(0.999),
        "max_ns": latency.max(),
        "latency_samples": latency.len(),
        "service_p50_ns": service.value_at_quantile(0.5),
        "service_p99_ns": service.value_at_quantile(0.99),
        "service_p999_ns": service.value_at_quantile(0.999),
        "floor_p50_ns": floor.value_at_quantile(0.5),
        "floor_p99_ns": floor.value_at_quantile(0.99),
        "floor_p999_ns": floor.value_at_quantile(0.999),
        "queries": queries.len(),
        "query_p50_us": queries.value_at_quantile(0.5),
        "query_p99_us": queries.value_at_quantile(0.99),
        "query_max_us": queries.max(),
        "window_events": m["total.count"],
        "unique_users_estimate": m["total.unique_users"],
        "processor_heap_mib": (memory.total_bytes() as f64 / 1048576.0 * 10.0).round() / 10.0,
        "rss_mib": (peak_rss_mib() * 10.0).round() / 10.0,
        "rejected": rejected,
    });
    println!("{summary}");
}
