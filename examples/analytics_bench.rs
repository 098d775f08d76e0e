//! Ingest benchmark of pg-analytics, with its floor and peer in the same
//! run: the same N rows, in the same batches and with the same number of
//! connections, written three ways into a fresh database with the
//! production schema and indexes (`synchronous_commit = on`):
//!
//! - `EventWriter` (binary `COPY`, the rollup maintained and the batch id
//!   recorded in the same transaction);
//! - bare binary `COPY FROM STDIN` of the same rows (the floor);
//! - multi-row `INSERT … VALUES (…), (…)` with 1,000 rows per statement
//!   (the usual alternative), and `INSERT … SELECT FROM unnest(…)` of the
//!   whole batch (a faster one).
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1/postgres \
//!   cargo run --release --example analytics_bench -- --rows 1000000
//! ```
//!
//! The last line is JSON: `rows`, `ingest_rows_per_sec`,
//! `copy_rows_per_sec`, `insert_rows_per_sec`, `ingest_to_copy`,
//! `ingest_to_insert`, and `insert_unnest_rows_per_sec`,
//! `ingest_to_insert_unnest`, `late_fraction` (the query, cache and archival
//! figures of the issue are not measured yet). A fresh database is created
//! and dropped. `--late-fraction F` (default 0.05) is the share of rows
//! spread over the last 60 days; the rest fall in the last hour.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, TimeDelta, Utc};
use pg_analytics::{Analytics, Event, Plan, Tenant, TenantId, WriterConfig};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;

struct Args {
    database_url: String,
    rows: usize,
    batch: usize,
    connections: usize,
    tenants: i64,
    late_fraction: f64,
}

fn parse_args() -> Args {
    let mut a = Args {
        database_url: std::env::var("DATABASE_URL").unwrap_or_default(),
        rows: 1_000_000,
        batch: 10_000,
        connections: 4,
        tenants: 1_000,
        late_fraction: 0.05,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let value = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--rows" => a.rows = value.parse().expect("--rows N"),
            "--batch" => a.batch = value.parse().expect("--batch N"),
            "--connections" => a.connections = value.parse().expect("--connections N"),
            "--tenants" => a.tenants = value.parse().expect("--tenants N"),
            "--late-fraction" => a.late_fraction = value.parse().expect("--late-fraction F"),
            "--database-url" => a.database_url = value,
            other => {
                eprintln!("unknown flag {other}");
                std::process::exit(2);
            }
        }
        i += 2;
    }
    if a.database_url.is_empty() {
        eprintln!(
            "analytics_bench: set DATABASE_URL (a PostgreSQL server to create a scratch database on)"
        );
        std::process::exit(2);
    }
    a
}

/// The sample: tenants skewed (a few large, a long tail); times within the
/// last hour, except `late_fraction` of the rows, anywhere in the last 60
/// days (late and out-of-order writes); processing times of a few ms to a
/// few s.
fn sample(args: &Args, now: DateTime<Utc>) -> Vec<Event> {
    let mut rng = fastrand::Rng::with_seed(42);
    (0..args.rows)
        .map(|_| {
            // The square of a uniform draw favours small ids: tenant 1 gets
            // far more rows than tenant 1,000.
            let u = rng.f64();
            let tenant = 1 + ((u * u) * args.tenants as f64) as i64;
            Event {
                tenant_id: TenantId(tenant.min(args.tenants)),
                created_at: if rng.f64() < args.late_fraction {
                    now - TimeDelta::seconds(rng.i64(0..60 * 86_400))
                } else {
                    now - TimeDelta::seconds(rng.i64(0..3_600))
                },
                event_type: ["page_view", "login", "export", "api_call"][rng.usize(..4)].into(),
                processing_time_ms: (rng.f64() * rng.f64() * 3_000.0 * 1000.0).round() / 1000.0,
            }
        })
        .collect()
}

/// `url` (a `postgres://` URL) with its database name replaced by `db`.
fn url_for(url: &str, db: &str) -> String {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let path = url[after_scheme..].find('/').map(|i| after_scheme + i);
    let query = url.find('?');
    match (path, query) {
        (Some(p), Some(q)) if p < q => format!("{}/{db}{}", &url[..p], &url[q..]),
        (Some(p), _) => format!("{}/{db}", &url[..p]),
        (None, Some(q)) => format!("{}/{db}{}", &url[..q], &url[q..]),
        (None, None) => format!("{url}/{db}"),
    }
}

async fn admin(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to DATABASE_URL: {e}"));
    tokio::spawn(connection);
    client
}

async fn reset(pool: &pg_kit::PgPool) {
    let conn = pool.get().await.expect("connection");
    conn.batch_execute(
        "TRUNCATE analytics.events, analytics.events_daily, analytics.ingest_batches;
         TRUNCATE floor.events;
         CHECKPOINT",
    )
    .await
    .expect("truncate");
}

/// Runs `write` over the batches on `connections` tasks; rows per second.
async fn timed<F, Fut>(batches: &Arc<Vec<Vec<Event>>>, connections: usize, write: F) -> f64
where
    F: Fn(Arc<Vec<Vec<Event>>>, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (batches, next, write) = (Arc::clone(batches), Arc::clone(&next), write.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= batches.len() {
                    return;
                }
                write(Arc::clone(&batches), i).await;
            }
        }));
    }
    for task in tasks {
        task.await.expect("writer task");
    }
    let rows: usize = batches.iter().map(Vec::len).sum();
    rows as f64 / start.elapsed().as_secs_f64()
}

fn micros(e: &Event) -> i64 {
    (e.processing_time_ms * 1000.0).round() as i64
}

async fn bare_copy(
    pool: &pg_kit::PgPool,
    batches: &Arc<Vec<Vec<Event>>>,
    connections: usize,
) -> f64 {
    // The floor: bare binary COPY, one transaction per batch.
    timed(batches, connections, {
        let pool = pool.clone();
        move |batches, i| {
            let pool = pool.clone();
            async move {
                let mut conn = pool.get().await.expect("connection");
                let tx = conn.begin().await.expect("begin");
                let sink = tx
                    .copy_in("COPY floor.events (tenant_id, created_at, event_type, processing_time_us) FROM STDIN (FORMAT binary)")
                    .await
                    .expect("copy");
                let writer = BinaryCopyInWriter::new(sink, &[Type::INT8, Type::TIMESTAMPTZ, Type::TEXT, Type::INT8]);
                let mut writer = std::pin::pin!(writer);
                for e in &batches[i] {
                    writer
                        .as_mut()
                        .write(&[&e.tenant_id.0, &e.created_at, &e.event_type, &micros(e)])
                        .await
                        .expect("row");
                }
                writer.finish().await.expect("finish");
                tx.commit().await.expect("commit");
            }
        }
    })
    .await
}

async fn insert_unnest(
    pool: &pg_kit::PgPool,
    batches: &Arc<Vec<Vec<Event>>>,
    connections: usize,
) -> f64 {
    // The peer: multi-row INSERT from arrays, one statement per batch.
    timed(batches, connections, {
        let pool = pool.clone();
        move |batches, i| {
            let pool = pool.clone();
            async move {
                let batch = &batches[i];
                let tenants: Vec<i64> = batch.iter().map(|e| e.tenant_id.0).collect();
                let times: Vec<DateTime<Utc>> = batch.iter().map(|e| e.created_at).collect();
                let kinds: Vec<&str> = batch.iter().map(|e| e.event_type.as_str()).collect();
                let us: Vec<i64> = batch.iter().map(micros).collect();
                let conn = pool.get().await.expect("connection");
                conn.execute(
                    "INSERT INTO floor.events (tenant_id, created_at, event_type, processing_time_us)
                     SELECT * FROM unnest($1::int8[], $2::timestamptz[], $3::text[], $4::int8[])",
                    &[&tenants, &times, &kinds, &us],
                )
                .await
                .expect("insert");
            }
        }
    })
    .await
}

async fn insert_values(
    pool: &pg_kit::PgPool,
    batches: &Arc<Vec<Vec<Event>>>,
    connections: usize,
) -> f64 {
    // The usual multi-row INSERT: `VALUES (…), (…), …`, 1,000 rows (4,000
    // parameters) per statement, one transaction per batch.
    timed(batches, connections, {
        let pool = pool.clone();
        move |batches, i| {
            let pool = pool.clone();
            async move {
                let mut conn = pool.get().await.expect("connection");
                let tx = conn.begin().await.expect("begin");
                for chunk in batches[i].chunks(1_000) {
                    let mut sql = String::from(
                        "INSERT INTO floor.events (tenant_id, created_at, event_type, processing_time_us) VALUES ",
                    );
                    let us: Vec<i64> = chunk.iter().map(micros).collect();
                    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                        Vec::with_capacity(chunk.len() * 4);
                    for (k, e) in chunk.iter().enumerate() {
                        if k > 0 {
                            sql.push(',');
                        }
                        let n = k * 4;
                        sql.push_str(&format!("(${},${},${},${})", n + 1, n + 2, n + 3, n + 4));
                        params.push(&e.tenant_id.0);
                        params.push(&e.created_at);
                        params.push(&e.event_type);
                        params.push(&us[k]);
                    }
                    tx.execute(sql.as_str(), &params).await.expect("insert");
                }
                tx.commit().await.expect("commit");
            }
        }
    })
    .await
}

async fn event_writer(
    store: &Analytics,
    batches: &Arc<Vec<Vec<Event>>>,
    connections: usize,
) -> f64 {
    let writer = store.writer(WriterConfig::default().with_max_in_flight(connections));
    let rate = timed(batches, connections, {
        move |batches, i| {
            let writer = writer.clone();
            async move {
                let report = writer
                    .write(uuid::Uuid::now_v7(), &batches[i])
                    .await
                    .expect("write");
                assert!(report.rejected.is_empty(), "{:?}", report.rejected.first());
            }
        }
    })
    .await;
    // The rollup counts every row.
    let conn = store.pool().get().await.expect("connection");
    let counted: i64 = conn
        .query_one(
            "SELECT coalesce(sum(events), 0)::bigint FROM analytics.events_daily",
            &[],
        )
        .await
        .expect("sum")
        .get(0);
    let rows: usize = batches.iter().map(Vec::len).sum();
    assert_eq!(counted, rows as i64, "the rollup counts every row");
    rate
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    let db = format!("analytics_bench_{}", std::process::id());
    let server = admin(&args.database_url).await;
    server
        .batch_execute(&format!("CREATE DATABASE \"{db}\""))
        .await
        .expect("create the scratch database");
    let url = url_for(&args.database_url, &db);
    let pool = pg_kit::pool(
        &url,
        &pg_kit::PoolConfig {
            max_size: args.connections as u32 + 2,
            ..pg_kit::PoolConfig::default()
        },
    )
    .expect("pool");
    let store = Analytics::new(pool.clone(), time_kit::system());
    store.migrate().await.expect("migrate");
    let now = Utc::now();
    store
        .ensure_partitions(
            (now - TimeDelta::days(61)).date_naive(),
            now.date_naive(),
            3,
        )
        .await
        .expect("partitions");
    for id in 1..=args.tenants {
        let plan = if id % 10 < 3 {
            Plan::Enterprise
        } else if id % 10 < 7 {
            Plan::Pro
        } else {
            Plan::Free
        };
        store
            .upsert_tenant(&Tenant {
                id: TenantId(id),
                name: format!("tenant {id}"),
                plan,
            })
            .await
            .expect("tenant");
    }
    // The floor's table: the same partitions and index, nothing else.
    {
        let conn = pool.get().await.expect("connection");
        conn.batch_execute(
            "CREATE SCHEMA floor;
             CREATE TABLE floor.events (LIKE analytics.events INCLUDING ALL) PARTITION BY RANGE (created_at);
             CREATE TABLE floor.events_default PARTITION OF floor.events DEFAULT;",
        )
        .await
        .expect("floor schema");
        let parts = conn
            .query(
                "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i
                   JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent
                  WHERE p.relname = 'events' AND p.relnamespace = 'analytics'::regnamespace
                    AND c.relname <> 'events_default'",
                &[],
            )
            .await
            .expect("partitions");
        for part in parts {
            let (name, bound): (String, String) = (part.get(0), part.get(1));
            conn.batch_execute(&format!(
                "CREATE TABLE floor.{name} PARTITION OF floor.events {bound}"
            ))
            .await
            .expect("floor partition");
        }
        // LIKE … INCLUDING ALL copied the index: the same on both sides.
        let indexes = conn
            .query_one(
                "SELECT (SELECT count(*) FROM pg_indexes WHERE schemaname = 'analytics' AND tablename = 'events'),
                        (SELECT count(*) FROM pg_indexes WHERE schemaname = 'floor' AND tablename = 'events')",
                &[],
            )
            .await
            .expect("indexes");
        assert_eq!(
            indexes.get::<_, i64>(0),
            indexes.get::<_, i64>(1),
            "the floor table must have the same indexes"
        );
    }
    let events = sample(&args, now);
    let batches: Arc<Vec<Vec<Event>>> = Arc::new(
        events
            .chunks(args.batch.max(1))
            .map(<[Event]>::to_vec)
            .collect(),
    );
    eprintln!(
        "{} rows in {} batches of {}, {} connections",
        args.rows,
        batches.len(),
        args.batch,
        args.connections
    );

    // Each way runs twice, in the order A B C D D C B A, from a truncated
    // schema after a checkpoint, so no way gets the cold or the warm start
    // alone; the figure is the mean of its two runs.
    let mut rates = [0.0f64; 4];
    for round in 0..2 {
        for k in 0..4 {
            let way = if round == 0 { k } else { 3 - k };
            reset(&pool).await;
            let rate = match way {
                0 => bare_copy(&pool, &batches, args.connections).await,
                1 => insert_values(&pool, &batches, args.connections).await,
                2 => insert_unnest(&pool, &batches, args.connections).await,
                _ => event_writer(&store, &batches, args.connections).await,
            };
            eprintln!(
                "{}: {rate:.0} rows/s",
                [
                    "bare COPY",
                    "INSERT … VALUES",
                    "INSERT … unnest",
                    "EventWriter"
                ][way]
            );
            rates[way] += rate / 2.0;
        }
    }
    let [
        copy_rows_per_sec,
        insert_rows_per_sec,
        insert_unnest_rows_per_sec,
        ingest_rows_per_sec,
    ] = rates;

    drop(store);
    drop(pool);
    let _ = server
        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
        .await;
    let summary = serde_json::json!({
        "rows": args.rows,
        "batch": args.batch,
        "connections": args.connections,
        "ingest_rows_per_sec": ingest_rows_per_sec,
        "copy_rows_per_sec": copy_rows_per_sec,
        "insert_rows_per_sec": insert_rows_per_sec,
        "insert_unnest_rows_per_sec": insert_unnest_rows_per_sec,
        "ingest_to_insert_unnest": ingest_rows_per_sec / insert_unnest_rows_per_sec,
        "late_fraction": args.late_fraction,
        "ingest_to_copy": ingest_rows_per_sec / copy_rows_per_sec,
        "ingest_to_insert": ingest_rows_per_sec / insert_rows_per_sec,
    });
    println!("{summary}");
}
