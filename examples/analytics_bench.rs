//! The pg-analytics benchmark: every figure of the crate with its floor
//! or baseline, measured in one run on a fresh database.
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1/postgres REDIS_URL=redis://127.0.0.1:6379 \
//!   cargo run --release --example analytics_bench -- --rows 20000000
//! ```
//!
//! 1. **Ingest**, on a sample of `--sample-rows` rows (default the smaller
//!    of `--rows` and 1,000,000; 95 % in the last hour, 5 % late over 60
//!    days), in the same batches and with the same connections, into the
//!    production schema and indexes with `synchronous_commit = on`, each
//!    way twice in the order A B C D D C B A from a truncated table after a
//!    checkpoint: bare binary `COPY FROM STDIN` (the floor), multi-row
//!    `INSERT … VALUES` (1,000 rows a statement), `INSERT … SELECT FROM
//!    unnest(…)`, and `EventWriter` (COPY, rollup, batch id).
//! 2. **Queries**: `--rows` rows spread over the last `--days` days (default
//!    730) loaded with `EventWriter` in time order by batch (as a live feed
//!    would have written them), and the same rows in the seed's own
//!    schema (one plain table with an index on `tenant_id` and one on
//!    `created_at`); then the seed's query as written (the baseline),
//!    `dashboard_raw`, `dashboard` (p50/p99 of `--calls` calls) and its
//!    floor (the same result rows read from a table that holds exactly
//!    them), each plan's `EXPLAIN (ANALYZE, BUFFERS)` on stderr.
//! 3. **Cache** (when `REDIS_URL` is set): `DashboardCache` hits (p99 of
//!    `--calls`) against a plain Redis `GET` of a value of the same size.
//! 4. **Archival**: the oldest month archived to Parquet in a local
//!    directory (export, verify, drop): rows/s, and the Parquet size
//!    against the partition's heap size.
//!
//! The last line is JSON: `rows`, `ingest_rows_per_sec`,
//! `copy_rows_per_sec`, `insert_rows_per_sec`, `ingest_to_copy`,
//! `ingest_to_insert`, `insert_unnest_rows_per_sec`, `load_rows_per_sec`,
//! `original_query_ms`, `dashboard_raw_ms`, `dashboard_p50_ms`,
//! `dashboard_p99_ms`, `dashboard_floor_p99_ms`, `dashboard_rows_p99_ms`
//! (the same scans answered a row per day), `dashboard_rows`,
//! `original_to_dashboard_p99`, `dashboard_cached_p99_ms`,
//! `redis_get_p99_ms`, `cached_to_redis_get`, `archive_rows`,
//! `archive_rows_per_sec`, `parquet_bytes`, `heap_bytes`, `parquet_to_heap`
//! (cache figures are null without `REDIS_URL`). `--mode ingest` or
//! `--mode queries` runs one part (`ANALYTICS_BENCH_KEEP_DB=1` keeps the
//! database for a look afterwards). `--plain-rollup-key` gives the rollup its
//! primary key without the covering columns (as before migration 0003), to
//! measure what the covering key costs ingest and gains the dashboard. The scratch database and directory are
//! dropped at the end.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Datelike, TimeDelta, Utc};
use pg_analytics::archive::{ArchiveConfig, ArchiveReport, Archiver, local_store};
use pg_analytics::cache::{CacheConfig, DashboardCache};
use pg_analytics::{Analytics, Event, Plan, Tenant, TenantId, WriterConfig};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;

struct Args {
    database_url: String,
    redis_url: String,
    rows: usize,
    sample_rows: usize,
    batch: usize,
    connections: usize,
    tenants: i64,
    late_fraction: f64,
    days: i64,
    calls: usize,
    mode: String,
    plain_rollup_key: bool,
}

fn parse_args() -> Args {
    let mut a = Args {
        database_url: std::env::var("DATABASE_URL").unwrap_or_default(),
        redis_url: std::env::var("REDIS_URL").unwrap_or_default(),
        rows: 1_000_000,
        sample_rows: 0,
        batch: 10_000,
        connections: 4,
        tenants: 1_000,
        late_fraction: 0.05,
        days: 730,
        calls: 200,
        mode: "all".into(),
        plain_rollup_key: false,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        if argv[i] == "--plain-rollup-key" {
            a.plain_rollup_key = true;
            i += 1;
            continue;
        }
        let value = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--rows" => a.rows = value.parse().expect("--rows N"),
            "--sample-rows" => a.sample_rows = value.parse().expect("--sample-rows N"),
            "--batch" => a.batch = value.parse().expect("--batch N"),
            "--connections" => a.connections = value.parse().expect("--connections N"),
            "--tenants" => a.tenants = value.parse().expect("--tenants N"),
            "--late-fraction" => a.late_fraction = value.parse().expect("--late-fraction F"),
            "--days" => a.days = value.parse().expect("--days N"),
            "--calls" => a.calls = value.parse().expect("--calls N"),
            "--mode" => a.mode = value,
            "--database-url" => a.database_url = value,
            "--redis-url" => a.redis_url = value,
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
    if !["all", "ingest", "queries"].contains(&a.mode.as_str()) {
        eprintln!("analytics_bench: --mode is all, ingest or queries");
        std::process::exit(2);
    }
    if a.sample_rows == 0 {
        a.sample_rows = a.rows.min(1_000_000);
    }
    a.calls = a.calls.max(1);
    a
}

/// The ingest sample: tenants skewed (a few large, a long tail); times
/// within the last hour, except `late_fraction` of the rows, anywhere in
/// the last 60 days (late and out-of-order writes); processing times of a
/// few ms to a few s.
fn sample(args: &Args, now: DateTime<Utc>) -> Vec<Event> {
    let mut rng = fastrand::Rng::with_seed(42);
    (0..args.sample_rows)
        .map(|_| event(&mut rng, args.tenants, now, args.late_fraction, 60))
        .collect()
}

/// One event: `late_fraction` of them anywhere in the last `days` days,
/// the rest in the last hour.
fn event(
    rng: &mut fastrand::Rng,
    tenants: i64,
    now: DateTime<Utc>,
    late_fraction: f64,
    days: i64,
) -> Event {
    // The square of a uniform draw favours small ids: tenant 1 gets far
    // more rows than tenant 1,000.
    let u = rng.f64();
    let tenant = 1 + ((u * u) * tenants as f64) as i64;
    Event {
        tenant_id: TenantId(tenant.min(tenants)),
        created_at: if rng.f64() < late_fraction {
            now - TimeDelta::seconds(rng.i64(0..days.max(1) * 86_400))
        } else {
            now - TimeDelta::seconds(rng.i64(0..3_600))
        },
        event_type: ["page_view", "login", "export", "api_call"][rng.usize(..4)].into(),
        processing_time_ms: (rng.f64() * rng.f64() * 3_000.0 * 1000.0).round() / 1000.0,
    }
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

/// The dashboard's scans answered a row per (tenant, day), for comparison
/// with `dashboard`'s row of arrays per tenant.
const DASHBOARD_ROWS: &str = "SELECT t.id, d.day, d.events, d.sum_processing_time_us
   FROM analytics.tenants t
  CROSS JOIN LATERAL (
        SELECT d.day, d.events, d.sum_processing_time_us
          FROM analytics.events_daily d
         WHERE d.tenant_id = t.id AND d.day >= $1 AND d.events > 0
        OFFSET 0) d
  WHERE t.plan = 'enterprise'";

/// The seed's query as written, against the seed's schema (one plain
/// table with an index on `tenant_id` and one on `created_at`).
const ORIGINAL_QUERY: &str = "SELECT
    tenant_id,
    DATE(created_at) as date,
    COUNT(*) as events,
    AVG(processing_time) as avg_time
FROM seed.events
WHERE created_at >= '2024-01-01'
    AND tenant_id IN (SELECT id FROM seed.tenants WHERE plan = 'enterprise')
GROUP BY tenant_id, DATE(created_at)
ORDER BY date DESC";

/// Loads `args.rows` rows spread over the last `args.days` days with
/// `EventWriter`, in time order by batch (as a live feed writes history),
/// generated batch by batch (never all in memory); rows/s.
async fn load(args: &Args, store: &Analytics, now: DateTime<Utc>) -> f64 {
    let writer = store.writer(WriterConfig::default().with_max_in_flight(args.connections));
    let batches = args.rows.div_ceil(args.batch.max(1));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.connections {
        let (writer, next) = (writer.clone(), Arc::clone(&next));
        let (rows, batch, tenants, days) = (args.rows, args.batch.max(1), args.tenants, args.days);
        tasks.push(tokio::spawn(async move {
            loop {
                let b = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if b >= batches {
                    return;
                }
                let mut rng = fastrand::Rng::with_seed(1_000 + b as u64);
                // History arrives as a live feed would have written it: batch
                // b holds the b-th slice of the span, oldest first (the
                // slices are written out of order across connections, and
                // rows within a slice are in random order).
                let span = days.max(1) * 86_400;
                let slice = (span / batches as i64).max(1);
                let slice_end = now - TimeDelta::seconds(span - (b as i64 + 1) * slice);
                let events: Vec<Event> = (0..batch.min(rows - b * batch))
                    .map(|_| {
                        let mut e = event(&mut rng, tenants, now, 0.0, days);
                        e.created_at = slice_end - TimeDelta::seconds(rng.i64(0..slice));
                        e
                    })
                    .collect();
                let report = writer
                    .write(uuid::Uuid::now_v7(), &events)
                    .await
                    .expect("write");
                assert!(report.rejected.is_empty(), "{:?}", report.rejected.first());
            }
        }));
    }
    for task in tasks {
        task.await.expect("loader task");
    }
    args.rows as f64 / start.elapsed().as_secs_f64()
}

/// p50 and p99 of `calls` runs of `f` (after 10 unmeasured), in ms.
async fn percentiles<F, Fut, T>(calls: usize, mut f: F) -> (f64, f64, T)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let mut last = None;
    let mut latencies = Vec::with_capacity(calls);
    for n in 0..calls + 10 {
        let start = Instant::now();
        last = Some(f().await);
        if n >= 10 {
            latencies.push(start.elapsed().as_secs_f64() * 1000.0);
        }
    }
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    (at(0.5), at(0.99), last.expect("at least one call"))
}

/// `sql`'s rows of (tenant, day, events, sum), each decoded: the client's
/// share of a dashboard answered a row per day.
async fn day_rows(
    pool: &pg_kit::PgPool,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Vec<(i64, chrono::NaiveDate, i64, i64)> {
    let conn = pool.get().await.expect("connection");
    conn.query(sql, params)
        .await
        .expect("rows of the dashboard")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

/// Parts 2 to 4: queries, cache and archival on `args.rows` rows.
async fn queries(
    args: &Args,
    pool: &pg_kit::PgPool,
    store: &Analytics,
    now: DateTime<Utc>,
) -> serde_json::Value {
    let load_rows_per_sec = load(args, store, now).await;
    eprintln!(
        "loaded {} rows with EventWriter: {load_rows_per_sec:.0} rows/s",
        args.rows
    );
    let conn = pool.get().await.expect("connection");
    let start = Instant::now();
    conn.batch_execute(
        "CREATE SCHEMA seed;
         CREATE TABLE seed.tenants (id bigint PRIMARY KEY, plan text NOT NULL);
         INSERT INTO seed.tenants SELECT id, plan FROM analytics.tenants;
         CREATE TABLE seed.events (id bigserial PRIMARY KEY, tenant_id bigint NOT NULL,
             created_at timestamptz NOT NULL, event_type text NOT NULL,
             processing_time double precision NOT NULL);
         INSERT INTO seed.events (tenant_id, created_at, event_type, processing_time)
             SELECT tenant_id, created_at, event_type, processing_time_us / 1000.0 FROM analytics.events;
         CREATE INDEX ON seed.events (tenant_id);
         CREATE INDEX ON seed.events (created_at);",
    )
    .await
    .expect("the seed's schema");
    // One statement each: VACUUM cannot run inside the implicit transaction
    // of a multi-statement string.
    for table in [
        "seed.events",
        "seed.tenants",
        "analytics.events",
        "analytics.events_daily",
        "analytics.tenants",
    ] {
        conn.batch_execute(&format!("VACUUM ANALYZE {table}"))
            .await
            .expect("vacuum analyze");
    }
    eprintln!(
        "seed schema loaded in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    let explain = |sql: String| {
        let conn = &conn;
        async move {
            let plan = conn
                .query(&format!("EXPLAIN (ANALYZE, BUFFERS) {sql}"), &[])
                .await
                .expect("explain");
            plan.iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
                .join("\n")
        }
    };
    let since = chrono::NaiveDate::from_ymd_opt(2024, 1, 1).expect("date");
    // DATE(created_at) follows the session's time zone; the dashboards'
    // days are UTC.
    conn.batch_execute("SET TimeZone = 'UTC'")
        .await
        .expect("time zone");
    let start = Instant::now();
    let original = conn
        .query(ORIGINAL_QUERY, &[])
        .await
        .expect("original query");
    let original_query_ms = start.elapsed().as_secs_f64() * 1000.0;
    eprintln!(
        "original query: {original_query_ms:.1} ms, {} rows",
        original.len()
    );
    let start = Instant::now();
    let raw = store
        .dashboard_raw(Plan::Enterprise, since)
        .await
        .expect("dashboard_raw");
    let dashboard_raw_ms = start.elapsed().as_secs_f64() * 1000.0;
    eprintln!(
        "dashboard_raw: {dashboard_raw_ms:.1} ms, {} rows",
        raw.len()
    );
    let (dashboard_p50_ms, dashboard_p99_ms, rows) = percentiles(args.calls, || async {
        store
            .dashboard(Plan::Enterprise, since)
            .await
            .expect("dashboard")
    })
    .await;
    assert_eq!(rows, raw, "the rollup answers what the raw events answer");
    assert_eq!(
        original.len(),
        raw.len(),
        "the original query has as many rows"
    );
    eprintln!(
        "dashboard: p50 {dashboard_p50_ms:.2} ms, p99 {dashboard_p99_ms:.2} ms, {} rows",
        rows.len()
    );
    // The same index-only scans, answered a row per (tenant, day) instead
    // of a row of arrays per tenant: what the wire format costs.
    let (_, dashboard_rows_p99_ms, per_day) = percentiles(args.calls, || async {
        day_rows(pool, DASHBOARD_ROWS, &[&since]).await
    })
    .await;
    assert_eq!(per_day.len(), rows.len());
    eprintln!("dashboard, a row per day: p99 {dashboard_rows_p99_ms:.2} ms");
    // The floor: the same result rows, read from a table that holds
    // exactly them (no join, no filter, no ordering), decoded the same way.
    conn.batch_execute(&format!(
        "CREATE TABLE floor.dashboard AS
           SELECT d.tenant_id, d.day, d.events, d.sum_processing_time_us
             FROM analytics.events_daily d JOIN analytics.tenants t ON t.id = d.tenant_id
            WHERE t.plan = 'enterprise' AND d.day >= '{since}'"
    ))
    .await
    .expect("floor table");
    conn.batch_execute("VACUUM ANALYZE floor.dashboard")
        .await
        .expect("vacuum");
    let (_, dashboard_floor_p99_ms, floor_rows) = percentiles(args.calls, || {
        day_rows(
            pool,
            "SELECT tenant_id, day, events, sum_processing_time_us FROM floor.dashboard",
            &[],
        )
    })
    .await;
    assert_eq!(floor_rows.len(), rows.len());
    eprintln!("dashboard floor (the result rows alone): p99 {dashboard_floor_p99_ms:.2} ms");
    eprintln!(
        "--- EXPLAIN original query\n{}",
        explain(ORIGINAL_QUERY.to_owned()).await
    );
    eprintln!(
        "--- EXPLAIN dashboard_raw\n{}",
        explain(format!(
            "SELECT e.tenant_id, (e.created_at AT TIME ZONE 'UTC')::date AS day, count(*), sum(e.processing_time_us)::bigint
               FROM analytics.events e
              WHERE e.created_at >= '{since}T00:00:00Z'
                AND e.tenant_id IN (SELECT id FROM analytics.tenants WHERE plan = 'enterprise')
              GROUP BY 1, 2 ORDER BY day DESC, e.tenant_id"
        ))
        .await
    );
    eprintln!(
        "--- EXPLAIN dashboard\n{}",
        explain(format!(
            "SELECT t.id, x.days, x.events, x.sums
               FROM analytics.tenants t
              CROSS JOIN LATERAL (
                    SELECT array_agg(d.day) AS days, array_agg(d.events) AS events,
                           array_agg(d.sum_processing_time_us) AS sums
                      FROM analytics.events_daily d
                     WHERE d.tenant_id = t.id AND d.day >= '{since}' AND d.events > 0) x
              WHERE t.plan = 'enterprise' AND x.days IS NOT NULL"
        ))
        .await
    );
    drop(conn);

    let (dashboard_cached_p99_ms, redis_get_p99_ms) = cache_figures(args, store, since).await;
    let archive = archive_figures(store, now).await;
    serde_json::json!({
        "rows": args.rows,
        "days": args.days,
        "load_rows_per_sec": load_rows_per_sec,
        "original_query_ms": original_query_ms,
        "dashboard_raw_ms": dashboard_raw_ms,
        "dashboard_p50_ms": dashboard_p50_ms,
        "dashboard_p99_ms": dashboard_p99_ms,
        "dashboard_floor_p99_ms": dashboard_floor_p99_ms,
        "dashboard_rows_p99_ms": dashboard_rows_p99_ms,
        "dashboard_to_floor_p99": dashboard_p99_ms / dashboard_floor_p99_ms,
        "dashboard_rows": rows.len(),
        "original_to_dashboard_p99": original_query_ms / dashboard_p99_ms,
        "dashboard_cached_p99_ms": dashboard_cached_p99_ms,
        "redis_get_p99_ms": redis_get_p99_ms,
        "cached_to_redis_get": dashboard_cached_p99_ms.zip(redis_get_p99_ms).map(|(c, g)| c / g),
        "archive_rows": archive.rows,
        "archive_rows_per_sec": archive.rows as f64 / archive.elapsed.as_secs_f64(),
        "parquet_bytes": archive.parquet_bytes,
        "heap_bytes": archive.heap_bytes,
        "parquet_to_heap": archive.parquet_bytes as f64 / archive.heap_bytes as f64,
    })
}

/// Part 3: p99 of cached dashboard reads, and of a Redis `GET` of a value
/// of the same size; `None` without `REDIS_URL`.
async fn cache_figures(
    args: &Args,
    store: &Analytics,
    since: chrono::NaiveDate,
) -> (Option<f64>, Option<f64>) {
    use fred::interfaces::KeysInterface;
    if args.redis_url.is_empty() {
        eprintln!("REDIS_URL unset: no cache figures");
        return (None, None);
    }
    let client = redis_kit::RedisSetup::new(args.redis_url.clone())
        .connect()
        .await
        .expect("REDIS_URL");
    let prefix = format!("analytics_bench_{}:", std::process::id());
    let cache = DashboardCache::new(
        store.clone(),
        client.clone(),
        CacheConfig::default().with_key_prefix(prefix.clone()),
    )
    .expect("cache");
    let (_, cached_p99, body) = percentiles(args.calls, || async {
        cache
            .dashboard_json(Plan::Enterprise, since)
            .await
            .expect("cached dashboard")
    })
    .await;
    let stats = cache.stats();
    assert_eq!(stats.recomputations, 1, "{stats:?}");
    // The same bytes a hit moves: the value's 24-byte header and its body.
    let key = format!("{prefix}plain");
    let value = bytes::Bytes::from(vec![b'x'; body.len() + 24]);
    client
        .set::<(), _, _>(&key, value, None, None, false)
        .await
        .expect("set");
    let (_, get_p99, got) = percentiles(args.calls, || async {
        client.get::<bytes::Bytes, _>(&key).await.expect("get")
    })
    .await;
    assert_eq!(got.len(), body.len() + 24);
    let _ = client.del::<i64, _>(&key).await;
    let mut cursor_keys = Vec::new();
    for plan in Plan::ALL {
        cursor_keys.push(format!("{prefix}gen:plan:{}", plan.as_str()));
    }
    let _ = client.del::<i64, _>(cursor_keys).await;
    eprintln!(
        "cache: hit p99 {cached_p99:.2} ms, GET of {} bytes p99 {get_p99:.2} ms",
        body.len() + 24
    );
    (Some(cached_p99), Some(get_p99))
}

/// Part 4: the oldest month with rows, archived to a scratch directory.
async fn archive_figures(store: &Analytics, now: DateTime<Utc>) -> ArchiveReport {
    let conn = store.pool().get().await.expect("connection");
    let oldest: DateTime<Utc> = conn
        .query_one("SELECT min(created_at) FROM analytics.events", &[])
        .await
        .expect("oldest")
        .get(0);
    drop(conn);
    let month = oldest.date_naive().with_day(1).expect("first of the month");
    let dir = std::env::temp_dir().join(format!("analytics_bench_{}", std::process::id()));
    let objects = local_store(&dir).expect("local store");
    let months_back = (now.year() - month.year()) * 12 + now.month() as i32 - month.month() as i32;
    let archiver = Archiver::new(
        store.clone(),
        objects,
        ArchiveConfig::default().with_min_age_months((months_back - 1).max(1) as u32),
    );
    let report = archiver.archive(month).await.expect("archive");
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!(
        "archive of {}: {} rows in {:.1} s ({:.0} rows/s), Parquet {} bytes, heap {} bytes ({:.3})",
        report.month,
        report.rows,
        report.elapsed.as_secs_f64(),
        report.rows as f64 / report.elapsed.as_secs_f64(),
        report.parquet_bytes,
        report.heap_bytes,
        report.parquet_bytes as f64 / report.heap_bytes as f64
    );
    report
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
    if args.plain_rollup_key {
        // The rollup's key without the counts and sums (before migration
        // 0003): what the covering key costs ingest, measured.
        pool.get()
            .await
            .expect("connection")
            .batch_execute(
                "ALTER TABLE analytics.events_daily DROP CONSTRAINT events_daily_pkey,
                     ADD CONSTRAINT events_daily_pkey PRIMARY KEY (tenant_id, day)",
            )
            .await
            .expect("plain rollup key");
    }
    let now = Utc::now();
    store
        .ensure_partitions(
            (now - TimeDelta::days(args.days.max(60) + 1)).date_naive(),
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

    let mut summary = serde_json::json!({
        "plain_rollup_key": args.plain_rollup_key,
        "rows": args.rows,
        "batch": args.batch,
        "connections": args.connections,
    });
    if args.mode != "queries" {
        let events = sample(&args, now);
        let batches: Arc<Vec<Vec<Event>>> = Arc::new(
            events
                .chunks(args.batch.max(1))
                .map(<[Event]>::to_vec)
                .collect(),
        );
        eprintln!(
            "ingest sample: {} rows in {} batches of {}, {} connections",
            args.sample_rows,
            batches.len(),
            args.batch,
            args.connections
        );
        // Each way runs twice, in the order A B C D D C B A, from a
        // truncated schema after a checkpoint, so no way gets the cold or
        // the warm start alone; the figure is the mean of its two runs.
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
        reset(&pool).await;
        let part = serde_json::json!({
            "sample_rows": args.sample_rows,
            "late_fraction": args.late_fraction,
            "ingest_rows_per_sec": ingest_rows_per_sec,
            "copy_rows_per_sec": copy_rows_per_sec,
            "insert_rows_per_sec": insert_rows_per_sec,
            "insert_unnest_rows_per_sec": insert_unnest_rows_per_sec,
            "ingest_to_copy": ingest_rows_per_sec / copy_rows_per_sec,
            "ingest_to_insert": ingest_rows_per_sec / insert_rows_per_sec,
            "ingest_to_insert_unnest": ingest_rows_per_sec / insert_unnest_rows_per_sec,
        });
        merge(&mut summary, part);
    }
    if args.mode != "ingest" {
        let part = queries(&args, &pool, &store, now).await;
        merge(&mut summary, part);
    }
    drop(store);
    drop(pool);
    if std::env::var_os("ANALYTICS_BENCH_KEEP_DB").is_some() {
        eprintln!("ANALYTICS_BENCH_KEEP_DB: the database {db} is kept");
    } else {
        let _ = server
            .batch_execute(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
            .await;
    }
    println!("{summary}");
}

fn merge(into: &mut serde_json::Value, from: serde_json::Value) {
    if let (Some(into), serde_json::Value::Object(from)) = (into.as_object_mut(), from) {
        into.extend(from);
    }
}
