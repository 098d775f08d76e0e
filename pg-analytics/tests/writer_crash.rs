//! A writer process killed with SIGKILL mid-ingest, then run again with the
//! same batches: no acknowledged row is lost and no row is counted twice.
//! The test binary runs itself as the writer (the child), chosen by an
//! environment variable.
#![cfg(feature = "postgres")]

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use chrono::{DateTime, TimeDelta, Utc};
use pg_analytics::{Analytics, Event, EventRules, Plan, Tenant, TenantId, WriterConfig};
use testkit::TestDatabase;
use uuid::Uuid;

const CHILD_ENV: &str = "PG_ANALYTICS_WRITER_CHILD";
const TEST_NAME: &str =
    "a_writer_killed_mid_ingest_loses_no_acknowledged_row_and_counts_none_twice";
const BATCHES: u128 = 30;
const ROWS: usize = 5_000;
const TENANTS: i64 = 8;

/// Batch `i` of the run that started at `base`: the same ids and rows in
/// every process.
fn batch(base: DateTime<Utc>, i: u128) -> (Uuid, Vec<Event>) {
    let rows = (0..ROWS)
        .map(|r| Event {
            tenant_id: TenantId(1 + (r as i64 + i as i64) % TENANTS),
            created_at: base
                - TimeDelta::seconds(((r * 7919 + i as usize * 104_729) % 86_400) as i64),
            event_type: "api_call".into(),
            processing_time_ms: ((r * 31 + i as usize) % 5_000) as f64 / 10.0,
        })
        .collect();
    (
        Uuid::from_u128(0x5eed_0000_0000_0000_0000_0000_0000_0000 + i),
        rows,
    )
}

fn store(url: &str) -> Analytics {
    let pool = pg_kit::pool(url, &pg_kit::PoolConfig::default()).unwrap();
    Analytics::new(pool, time_kit::system()).with_rules(EventRules::default())
}

/// The writer: every batch in order, `ACKED i` on stdout after each commit.
async fn child(spec: String) {
    let (url, base) = spec.split_once(' ').expect("url and base");
    let base = DateTime::from_timestamp(base.parse().expect("base"), 0).expect("base time");
    let writer = store(url).writer(WriterConfig::default());
    let mut out = std::io::stdout();
    for i in 0..BATCHES {
        let (id, rows) = batch(base, i);
        let report = writer.write(id, &rows).await.expect("write");
        assert!(report.rejected.is_empty());
        writeln!(out, "ACKED {i}").unwrap();
        out.flush().unwrap();
    }
}

fn spawn_child(url: &str, base: DateTime<Utc>) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, format!("{url} {}", base.timestamp()))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

async fn parent() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = store(db.url());
    store.migrate().await.unwrap();
    let now = Utc::now();
    let base = now - TimeDelta::hours(1);
    store
        .ensure_partitions((now - TimeDelta::days(3)).date_naive(), now.date_naive(), 3)
        .await
        .unwrap();
    for id in 1..=TENANTS {
        store
            .upsert_tenant(&Tenant {
                id: TenantId(id),
                name: format!("t{id}"),
                plan: Plan::Pro,
            })
            .await
            .unwrap();
    }
    // First run: killed once a third of the batches are acknowledged,
    // while it is writing the next.
    let url = db.url().to_owned();
    let acked = tokio::task::spawn_blocking(move || {
        let mut child = spawn_child(&url, base);
        let stdout = child.stdout.take().unwrap();
        let mut acked = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if let Some(i) = line.strip_prefix("ACKED ") {
                acked.push(i.trim().parse::<u128>().unwrap());
                if acked.len() as u128 == BATCHES / 3 {
                    child.kill().unwrap();
                    break;
                }
            }
        }
        let status = child.wait().unwrap();
        assert!(!status.success(), "the writer was killed, not finished");
        acked
    })
    .await
    .unwrap();
    assert_eq!(acked.len() as u128, BATCHES / 3);
    let conn = store.pool().get().await.unwrap();
    let committed: Vec<Uuid> = conn
        .query("SELECT batch_id FROM analytics.ingest_batches", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // Every acknowledged batch is committed (and at most the one in flight
    // besides).
    for i in &acked {
        assert!(
            committed.contains(&batch(base, *i).0),
            "acknowledged batch {i} lost"
        );
    }
    assert!(committed.len() <= acked.len() + 1);
    // Second run: the same batches again, to the end.
    let url = db.url().to_owned();
    let finished = tokio::task::spawn_blocking(move || spawn_child(&url, base).wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(finished.status.success());
    let one = |sql: &'static str| {
        let conn = &conn;
        async move { conn.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    let expected = (BATCHES as usize * ROWS) as i64;
    assert_eq!(one("SELECT count(*) FROM analytics.events").await, expected);
    assert_eq!(
        one("SELECT sum(events)::bigint FROM analytics.events_daily").await,
        expected
    );
    assert_eq!(
        one("SELECT count(*) FROM analytics.ingest_batches").await,
        BATCHES as i64
    );
    // The rollup equals the raw events.
    let since = (now - TimeDelta::days(3)).date_naive();
    assert_eq!(
        store.dashboard(Plan::Pro, since).await.unwrap(),
        store.dashboard_raw(Plan::Pro, since).await.unwrap()
    );
}

#[test]
fn a_writer_killed_mid_ingest_loses_no_acknowledged_row_and_counts_none_twice() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if let Ok(url) = std::env::var(CHILD_ENV) {
        runtime.block_on(child(url));
        return;
    }
    runtime.block_on(parent());
}
