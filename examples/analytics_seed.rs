//! Loads N tenants × M events into pg-analytics through the `EventWriter`,
//! with a realistic skew: a few large tenants and a long tail (Zipf, s =
//! 1.1), 30 % of tenants on the enterprise plan, and events spread over the
//! last `--days` days. Shows a progress bar; the last line is JSON.
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1/postgres \
//!   cargo run --release --example analytics_seed -- --tenants 1000 --events 20000000
//! ```
//!
//! The schema `analytics` is migrated and the partitions for the whole span
//! are created first. Tenants are `1..=N` (upserted); the run is not
//! idempotent: running it twice loads the events twice (each batch has a
//! fresh id).
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::sync::Arc;
use std::time::Instant;

use chrono::{TimeDelta, Utc};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use pg_analytics::{Analytics, Event, Plan, Tenant, TenantId, WriterConfig};

#[derive(Parser, Debug)]
#[command(about = "Load skewed multi-tenant events into pg-analytics")]
struct Args {
    /// PostgreSQL URL.
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// Tenants (ids 1..=N).
    #[arg(long, default_value_t = 1_000)]
    tenants: u32,
    /// Events in all.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Spread the events over the last this many days.
    #[arg(long, default_value_t = 730)]
    days: i64,
    /// Share of tenants on the enterprise plan (the rest split between pro
    /// and free).
    #[arg(long, default_value_t = 0.3)]
    enterprise_share: f64,
    /// Zipf exponent of the tenants' sizes (0 = uniform).
    #[arg(long, default_value_t = 1.1)]
    skew: f64,
    /// Rows per batch.
    #[arg(long, default_value_t = 10_000)]
    batch: usize,
    /// Batches in flight.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Random seed.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

/// The plan of tenant `id`: a deterministic `share` of tenants on
/// enterprise, spread over the id range, the rest alternating pro and free.
fn plan_of(id: u32, share: f64) -> Plan {
    let slot =
        (u64::from(id).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64 / (1u64 << 53) as f64;
    if slot < share {
        Plan::Enterprise
    } else if id.is_multiple_of(2) {
        Plan::Pro
    } else {
        Plan::Free
    }
}

/// Cumulative Zipf weights of `n` tenants: tenant k (from 1) weighs
/// 1 / k^s.
fn zipf(n: u32, s: f64) -> Vec<f64> {
    let mut total = 0.0;
    (1..=n)
        .map(|k| {
            total += 1.0 / f64::from(k).powf(s);
            total
        })
        .collect()
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if args.tenants == 0 || args.batch == 0 || args.connections == 0 {
        eprintln!("analytics_seed: --tenants, --batch and --connections must be at least 1");
        std::process::exit(2);
    }
    let pool = pg_kit::pool(
        &args.database_url,
        &pg_kit::PoolConfig {
            max_size: args.connections as u32 + 2,
            ..pg_kit::PoolConfig::default()
        },
    )
    .unwrap_or_else(|e| {
        eprintln!("analytics_seed: DATABASE_URL: {e}");
        std::process::exit(2)
    });
    let store = Analytics::new(pool, time_kit::system());
    if let Err(e) = store.migrate().await {
        eprintln!("analytics_seed: migrating schema analytics failed: {e}");
        std::process::exit(1);
    }
    let now = Utc::now();
    let today = now.date_naive();
    store
        .ensure_partitions(today - TimeDelta::days(args.days), today, 3)
        .await
        .unwrap_or_else(|e| {
            eprintln!("analytics_seed: creating partitions failed: {e}");
            std::process::exit(1)
        });
    for id in 1..=args.tenants {
        store
            .upsert_tenant(&Tenant {
                id: TenantId(i64::from(id)),
                name: format!("tenant {id}"),
                plan: plan_of(id, args.enterprise_share),
            })
            .await
            .unwrap_or_else(|e| {
                eprintln!("analytics_seed: registering tenants failed: {e}");
                std::process::exit(1)
            });
    }

    let weights = Arc::new(zipf(args.tenants, args.skew));
    let bar = ProgressBar::new(args.events);
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {human_pos}/{human_len} events ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let writer = store.writer(WriterConfig::default().with_max_in_flight(args.connections));
    let batches = args.events.div_ceil(args.batch as u64);
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.connections {
        let (writer, next, weights, bar) = (
            writer.clone(),
            Arc::clone(&next),
            Arc::clone(&weights),
            bar.clone(),
        );
        let (events, batch, days, seed) = (args.events, args.batch as u64, args.days, args.seed);
        tasks.push(tokio::spawn(async move {
            loop {
                let b = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if b >= batches {
                    return Ok::<(), pg_analytics::AnalyticsError>(());
                }
                let mut rng =
                    fastrand::Rng::with_seed(seed ^ b.wrapping_mul(0x2545_F491_4F6C_DD1D));
                let rows = batch.min(events - b * batch);
                let total = weights.last().copied().unwrap_or(1.0);
                let chunk: Vec<Event> = (0..rows)
                    .map(|_| {
                        let draw = rng.f64() * total;
                        let tenant = weights.partition_point(|w| *w < draw) as i64 + 1;
                        Event {
                            tenant_id: TenantId(tenant),
                            created_at: now - TimeDelta::seconds(rng.i64(0..days.max(1) * 86_400)),
                            event_type: ["page_view", "login", "export", "api_call"]
                                [rng.usize(..4)]
                            .into(),
                            processing_time_ms: (rng.f64() * rng.f64() * 3_000_000.0).round()
                                / 1000.0,
                        }
                    })
                    .collect();
                let report = writer.write(uuid::Uuid::now_v7(), &chunk).await?;
                if let Some(r) = report.rejected.first() {
                    tracing::warn!(index = r.index, code = r.code, "a seeded row was refused");
                }
                bar.inc(rows);
            }
        }));
    }
    for task in tasks {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                bar.abandon();
                eprintln!("analytics_seed: writing failed: {e}");
                std::process::exit(1);
            }
            Err(e) => {
                bar.abandon();
                eprintln!("analytics_seed: a writer task failed: {e}");
                std::process::exit(1);
            }
        }
    }
    bar.finish();
    let secs = started.elapsed().as_secs_f64();
    let enterprise = (1..=args.tenants)
        .filter(|id| plan_of(*id, args.enterprise_share) == Plan::Enterprise)
        .count();
    println!(
        "{}",
        serde_json::json!({
            "tenants": args.tenants,
            "enterprise_tenants": enterprise,
            "events": args.events,
            "days": args.days,
            "seconds": secs,
            "rows_per_sec": args.events as f64 / secs,
            "largest_tenant_share": weights.first().copied().unwrap_or(0.0) / weights.last().copied().unwrap_or(1.0),
        })
    );
}
