//! Hot SKU load generator: how many single-unit reservations per second
//! the PostgreSQL inventory takes when every buyer wants the same SKU,
//! against the same load spread over 100 SKUs, at 1, 8 and 32 concurrent
//! clients, with the reservations of a SKU grouped into one transaction
//! (`batched`, the default) and one transaction each (`one_by_one`, the
//! plain conditional update). Prints one line per run and a JSON summary
//! as its last line.
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!   cargo run --release --example inventory_hot_sku -- 5
//! ```
//!
//! The argument is the seconds per run (default 5). Each run is `clients`
//! tasks, each with its own pooled connection, looping on one operation
//! for that long against `skus` SKUs (1: the hot SKU; 100: spread), with
//! stock so large that nothing runs out:
//!
//! - `reserve`: `PgInventory::reserve` of one unit (the conditional update
//!   `… SET available = available - 1 WHERE sku = $1 AND available >= 1`);
//! - `order`: a reserve then its commit, the two transactions the saga
//!   runs for every confirmed order (only the reserve locks the SKU row).
//!
//! Before them, a `floor` run times a bare one-row `INSERT` + `COMMIT` on
//! the same server: what one durable commit costs here, the ceiling of any
//! transaction that must wait for the previous one's commit on a hot row.
//! After each run the SKUs' counts are checked (`available + reserved +
//! committed` = the stock; nothing negative).
//!
//! The runs use a database of their own, created on the server named by
//! `DATABASE_URL` (the role needs `CREATEDB`) and dropped at the end.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use order_saga::inventory::postgres::BatchConfig;
use order_saga::inventory::{Inventory, PgInventory, ReserveRequest, Restock};
use order_saga::model::{LineItem, Sku};
use order_saga::pg::{PgPool, PoolConfig, pool};
use uuid::Uuid;

const STOCK: u32 = 1_000_000_000;

#[derive(Clone, Copy, PartialEq)]
enum Op {
    Floor,
    Reserve,
    Order,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Floor => "floor",
            Op::Reserve => "reserve",
            Op::Order => "order",
        }
    }
}

struct RunResult {
    op: Op,
    batched: bool,
    clients: usize,
    skus: usize,
    ops: u64,
    errors: u64,
    per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    consistent: bool,
}

fn fail(message: impl std::fmt::Display) -> ! {
    eprintln!("inventory_hot_sku: {message}");
    std::process::exit(2)
}

/// `url` with its database (path) replaced by `db`.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority..].find('/') {
        Some(i) => &base[..authority + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

fn histogram() -> Histogram<u64> {
    // Microseconds, up to a minute, 3 significant figures.
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap_or_else(|e| fail(e))
}

#[tokio::main]
async fn main() {
    let seconds: f64 = match std::env::args().nth(1) {
        Some(arg) => arg
            .parse()
            .ok()
            .filter(|s: &f64| *s > 0.0)
            .unwrap_or_else(|| fail(format!("seconds must be a positive number, got {arg:?}"))),
        None => 5.0,
    };
    let Some(url) = std::env::var("DATABASE_URL").ok().filter(|v| !v.is_empty()) else {
        fail("DATABASE_URL is required (a PostgreSQL server where the role may CREATE DATABASE)");
    };
    let admin = pool(
        &url,
        &PoolConfig {
            max_size: 1,
            ..PoolConfig::default()
        },
    )
    .unwrap_or_else(|e| fail(format!("DATABASE_URL: {e}")));
    let db = format!(
        "inventory_hot_sku_{}_{:08x}",
        std::process::id(),
        fastrand::u32(..)
    );
    exec(&admin, &format!("CREATE DATABASE \"{db}\"")).await;
    let db_url = with_database(&url, &db);
    let settings = server_settings(&admin).await;
    println!(
        "inventory_hot_sku: {seconds} s per run, database {db}, {}",
        settings
    );

    let mut results = Vec::new();
    for (op, batched, clients, skus) in [
        (Op::Floor, false, 1, 1),
        (Op::Floor, false, 8, 1),
        (Op::Floor, false, 32, 1),
        (Op::Reserve, false, 1, 1),
        (Op::Reserve, false, 8, 1),
        (Op::Reserve, false, 32, 1),
        (Op::Reserve, true, 1, 1),
        (Op::Reserve, true, 8, 1),
        (Op::Reserve, true, 32, 1),
        (Op::Reserve, false, 8, 100),
        (Op::Reserve, false, 32, 100),
        (Op::Reserve, true, 32, 100),
        (Op::Order, false, 8, 1),
        (Op::Order, false, 32, 1),
        (Op::Order, true, 8, 1),
        (Op::Order, true, 32, 1),
        (Op::Order, false, 32, 100),
        (Op::Order, true, 32, 100),
    ] {
        let result = run(&db_url, results.len(), op, batched, clients, skus, seconds).await;
        println!(
            "{:>7} {:>10} clients={:>2} skus={:>3}: {:>8.0}/s  p50 {:>6.2} ms  p99 {:>7.2} ms  errors {}  consistent {}",
            op.name(),
            if op == Op::Floor {
                ""
            } else if batched {
                "batched"
            } else {
                "one_by_one"
            },
            clients,
            skus,
            result.per_sec,
            result.p50_ms,
            result.p99_ms,
            result.errors,
            result.consistent
        );
        results.push(result);
    }
    exec(&admin, &format!("DROP DATABASE \"{db}\" WITH (FORCE)")).await;

    let runs: Vec<serde_json::Value> = results
        .iter()
        .map(|r| {
            serde_json::json!({
                "op": r.op.name(),
                "batched": r.batched,
                "clients": r.clients,
                "skus": r.skus,
                "ops": r.ops,
                "errors": r.errors,
                "per_sec": r.per_sec.round(),
                "p50_ms": (r.p50_ms * 100.0).round() / 100.0,
                "p99_ms": (r.p99_ms * 100.0).round() / 100.0,
                "consistent": r.consistent,
            })
        })
        .collect();
    let find = |op: Op, batched: bool, clients: usize, skus: usize| {
        results
            .iter()
            .find(|r| r.op == op && r.batched == batched && r.clients == clients && r.skus == skus)
            .map_or(0.0, |r| r.per_sec.round())
    };
    println!(
        "{}",
        serde_json::json!({
            "seconds_per_run": seconds,
            "server": settings,
            "hot_reserve_per_sec_32_batched": find(Op::Reserve, true, 32, 1),
            "hot_reserve_per_sec_32_one_by_one": find(Op::Reserve, false, 32, 1),
            "spread_reserve_per_sec_32_one_by_one": find(Op::Reserve, false, 32, 100),
            "hot_orders_per_sec_32_batched": find(Op::Order, true, 32, 1),
            "hot_orders_per_sec_32_one_by_one": find(Op::Order, false, 32, 1),
            "spread_orders_per_sec_32_batched": find(Op::Order, true, 32, 100),
            "floor_commits_per_sec_32": find(Op::Floor, false, 32, 1),
            "all_consistent": results.iter().all(|r| r.consistent),
            "runs": runs,
        })
    );
}

async fn exec(pool: &PgPool, sql: &str) {
    let conn = pool
        .get()
        .await
        .unwrap_or_else(|e| fail(format!("connect: {e}")));
    conn.batch_execute(sql)
        .await
        .unwrap_or_else(|e| fail(format!("{sql}: {e}")));
}

async fn server_settings(pool: &PgPool) -> String {
    let conn = pool
        .get()
        .await
        .unwrap_or_else(|e| fail(format!("connect: {e}")));
    let row = conn
        .query_one(
            "SELECT current_setting('server_version'), current_setting('synchronous_commit'),
                    current_setting('fsync'), current_setting('max_connections')",
            &[],
        )
        .await
        .unwrap_or_else(|e| fail(e));
    format!(
        "PostgreSQL {}, synchronous_commit={}, fsync={}, max_connections={}",
        row.get::<_, String>(0),
        row.get::<_, String>(1),
        row.get::<_, String>(2),
        row.get::<_, String>(3)
    )
}

async fn run(
    db_url: &str,
    index: usize,
    op: Op,
    batched: bool,
    clients: usize,
    skus: usize,
    seconds: f64,
) -> RunResult {
    let pool = pool(
        db_url,
        &PoolConfig {
            max_size: u32::try_from(clients).unwrap_or(u32::MAX),
            connection_timeout: Duration::from_secs(30),
            ..PoolConfig::default()
        },
    )
    .unwrap_or_else(|e| fail(e));
    let batching = if batched {
        BatchConfig::default()
    } else {
        BatchConfig::disabled()
    };
    let inventory =
        Arc::new(PgInventory::new(pool.clone(), time_kit::system()).with_batching(batching));
    inventory.migrate().await.unwrap_or_else(|e| fail(e));
    exec(
        &pool,
        "CREATE TABLE IF NOT EXISTS public.floor (id bigserial PRIMARY KEY, at timestamptz NOT NULL)",
    )
    .await;
    // Fresh SKU names per run, so one run's rows do not slow the next.
    let names: Vec<Sku> = (0..skus)
        .map(|n| Sku::parse(format!("run{index}-sku{n}")).unwrap_or_else(|e| fail(e)))
        .collect();
    if op != Op::Floor {
        for sku in &names {
            inventory
                .restock(Restock {
                    sku: sku.clone(),
                    quantity: STOCK,
                    unit_price_cents: Some(100),
                })
                .await
                .unwrap_or_else(|e| fail(e));
        }
    }
    // Warm every connection before the clock starts.
    let warm: Vec<_> = (0..clients)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let conn = pool.get().await.unwrap_or_else(|e| fail(e));
                conn.batch_execute("SELECT 1")
                    .await
                    .unwrap_or_else(|e| fail(e));
                // Hold it until every task has one.
                tokio::time::sleep(Duration::from_millis(200)).await;
            })
        })
        .collect();
    for task in warm {
        task.await.unwrap_or_else(|e| fail(e));
    }

    let names = Arc::new(names);
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let tasks: Vec<_> = (0..clients)
        .map(|client| {
            let inventory = Arc::clone(&inventory);
            let pool = pool.clone();
            let names = Arc::clone(&names);
            tokio::spawn(async move {
                let mut latency = histogram();
                let (mut ops, mut errors) = (0u64, 0u64);
                let mut n = client;
                while Instant::now() < deadline {
                    let sku = &names[n % names.len()];
                    n += clients;
                    let t0 = Instant::now();
                    let ok = match op {
                        Op::Floor => {
                            let conn = pool.get().await.unwrap_or_else(|e| fail(e));
                            conn.execute("INSERT INTO public.floor (at) VALUES (now())", &[])
                                .await
                                .is_ok()
                        }
                        Op::Reserve | Op::Order => {
                            let request = ReserveRequest {
                                reservation_id: Uuid::now_v7(),
                                items: vec![LineItem {
                                    sku: sku.clone(),
                                    quantity: 1,
                                }],
                                ttl: Duration::from_secs(600),
                            };
                            let id = request.reservation_id;
                            let reserved = inventory.reserve(request).await.is_ok();
                            if op == Op::Order && reserved {
                                inventory.commit(id).await.is_ok()
                            } else {
                                reserved
                            }
                        }
                    };
                    let micros = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
                    let _ = latency.record(micros.max(1));
                    if ok {
                        ops += 1;
                    } else {
                        errors += 1;
                    }
                }
                (ops, errors, latency)
            })
        })
        .collect();
    let mut latency = histogram();
    let (mut ops, mut errors) = (0u64, 0u64);
    for task in tasks {
        let (o, e, h) = task.await.unwrap_or_else(|e| fail(e));
        ops += o;
        errors += e;
        latency.add(h).unwrap_or_else(|e| fail(e));
    }
    let elapsed = started.elapsed().as_secs_f64();

    let mut consistent = true;
    if op != Op::Floor {
        for sku in names.iter() {
            let level = inventory.stock(sku).await.unwrap_or_else(|e| fail(e));
            consistent &= level.available >= 0
                && level.reserved >= 0
                && level.committed >= 0
                && level.available + level.reserved + level.committed == i64::from(STOCK);
        }
    }
    RunResult {
        op,
        batched,
        clients,
        skus,
        ops,
        errors,
        per_sec: ops as f64 / elapsed,
        p50_ms: latency.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: latency.value_at_quantile(0.99) as f64 / 1000.0,
        consistent,
    }
}
