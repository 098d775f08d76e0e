//! The PostgreSQL store against a real server, each test in its own
//! database: migrations and partitions, bad rows, replayed batches, and the
//! rollup against the raw events under concurrent writers with late rows.
#![cfg(feature = "postgres")]

mod support;

use std::sync::Arc;

use chrono::{Datelike, NaiveDate, TimeDelta, Utc};
use pg_analytics::postgres::partition_name;
use pg_analytics::{
    Analytics, AnalyticsError, Event, EventRules, Plan, Tenant, TenantId, WriterConfig,
};
use testkit::TestDatabase;
use uuid::Uuid;

async fn store(db: &TestDatabase, rules: EventRules) -> Analytics {
    support::migrated(db, rules).await
}

async fn tenants(store: &Analytics, n: i64) {
    let plans: Vec<(i64, Plan)> = (1..=n)
        .map(|id| {
            let plan = match id % 3 {
                0 => Plan::Enterprise,
                1 => Plan::Pro,
                _ => Plan::Free,
            };
            (id, plan)
        })
        .collect();
    support::register(store, &plans).await;
}

fn event(tenant: i64, at: chrono::DateTime<Utc>, ms: f64) -> Event {
    Event {
        tenant_id: TenantId(tenant),
        created_at: at,
        event_type: "page_view".into(),
        processing_time_ms: ms,
    }
}

async fn count(store: &Analytics, sql: &str) -> i64 {
    let conn = store.pool().get().await.unwrap();
    conn.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test]
async fn migrations_run_once_and_partitions_are_made_ahead() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = store(&db, EventRules::default()).await;
    assert_eq!(store.migrate().await.unwrap(), 0, "applied once");
    let today = Utc::now().date_naive();
    let report = store.ensure_partitions(today, today, 3).await.unwrap();
    assert_eq!(report.created.len(), 4, "{report:?}");
    assert_eq!(
        report.created[0],
        partition_name(today.with_day(1).unwrap())
    );
    let again = store.ensure_partitions(today, today, 3).await.unwrap();
    assert_eq!((again.created.len(), again.existing), (0, 4));
    // A row of a month with no partition lands in the default partition,
    // which then blocks creating that month's partition.
    tenants(&store, 1).await;
    let old = Utc::now() - TimeDelta::days(3 * 365);
    let writer = store.writer(WriterConfig::default());
    let written = writer
        .write(Uuid::now_v7(), &[event(1, old, 1.0)])
        .await
        .unwrap();
    assert_eq!(written.accepted, 1);
    assert_eq!(store.default_partition_rows().await.unwrap(), 1);
    // The maintenance job's pass finds the months made and counts the stray.
    let pass = store.maintain(3).await.unwrap();
    assert_eq!(
        (pass.partitions.created.len(), pass.partitions.existing),
        (0, 4)
    );
    assert_eq!(pass.default_partition_rows, 1);
    let blocked = store
        .ensure_partitions(old.date_naive(), old.date_naive(), 0)
        .await
        .unwrap_err();
    assert!(
        matches!(blocked, AnalyticsError::PartitionBlocked { month } if month == old.date_naive().with_day(1).unwrap()),
        "{blocked:?}"
    );
}

#[tokio::test]
async fn bad_rows_are_refused_with_their_codes_and_only_the_good_ones_commit() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let now = Utc::now();
    let horizon = now - TimeDelta::days(730);
    let store = store(
        &db,
        EventRules::default().with_archived_before(Some(horizon)),
    )
    .await;
    store
        .ensure_partitions(now.date_naive(), now.date_naive(), 3)
        .await
        .unwrap();
    tenants(&store, 3).await;
    let batch = vec![
        event(1, now, 10.0),
        event(99, now, 10.0),
        event(2, now, -1.0),
        event(2, now, f64::NAN),
        event(3, now + TimeDelta::hours(1), 1.0),
        event(3, horizon - TimeDelta::days(1), 1.0),
        event(3, now, 2.5),
    ];
    let report = store
        .writer(WriterConfig::default())
        .write(Uuid::now_v7(), &batch)
        .await
        .unwrap();
    assert_eq!(report.accepted, 2);
    let codes: Vec<(usize, &str)> = report.rejected.iter().map(|r| (r.index, r.code)).collect();
    assert_eq!(
        codes,
        vec![
            (1, "unknown_tenant"),
            (2, "negative_processing_time"),
            (3, "non_finite_processing_time"),
            (4, "too_far_in_future"),
            (5, "before_archived_horizon"),
        ]
    );
    assert_eq!(
        count(&store, "SELECT count(*) FROM analytics.events").await,
        2
    );
    assert_eq!(
        count(
            &store,
            "SELECT sum(events)::bigint FROM analytics.events_daily"
        )
        .await,
        2
    );
    // A batch of nothing but bad rows writes nothing at all.
    let none = store
        .writer(WriterConfig::default())
        .write(Uuid::now_v7(), &[event(42, now, 1.0)])
        .await
        .unwrap();
    assert_eq!((none.accepted, none.rejected.len()), (0, 1));
    assert_eq!(
        count(&store, "SELECT count(*) FROM analytics.events").await,
        2
    );
}

#[tokio::test]
async fn a_retried_batch_is_written_once() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = store(&db, EventRules::default()).await;
    let now = Utc::now();
    store
        .ensure_partitions(now.date_naive(), now.date_naive(), 3)
        .await
        .unwrap();
    tenants(&store, 2).await;
    let writer = store.writer(WriterConfig::default());
    let id = Uuid::now_v7();
    let batch: Vec<Event> = (0..100).map(|i| event(1 + i % 2, now, i as f64)).collect();
    let first = writer.write(id, &batch).await.unwrap();
    let again = writer.write(id, &batch).await.unwrap();
    assert_eq!((first.accepted, first.replayed), (100, false));
    assert_eq!((again.accepted, again.replayed), (100, true));
    assert_eq!(
        count(&store, "SELECT count(*) FROM analytics.events").await,
        100
    );
    assert_eq!(
        count(
            &store,
            "SELECT sum(events)::bigint FROM analytics.events_daily"
        )
        .await,
        100
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_concurrent_writers_with_late_rows_keep_the_rollup_equal_to_raw() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = store(&db, EventRules::default()).await;
    let now = Utc::now();
    let start = now - TimeDelta::days(60);
    store
        .ensure_partitions(start.date_naive(), now.date_naive(), 3)
        .await
        .unwrap();
    tenants(&store, 20).await;
    let writer = store.writer(WriterConfig::default().with_max_in_flight(8));
    let mut tasks = Vec::new();
    for w in 0..8u64 {
        let writer = writer.clone();
        tasks.push(tokio::spawn(async move {
            let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ w;
            let mut next = move || {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed
            };
            let mut written = 0usize;
            for _ in 0..15 {
                // Rows anywhere in the last 60 days, in no order: late and
                // out-of-order writes to every tenant's days.
                let batch: Vec<Event> = (0..200)
                    .map(|_| {
                        let tenant = 1 + (next() % 20) as i64;
                        let at = now - TimeDelta::seconds((next() % (60 * 86_400)) as i64);
                        let ms = (next() % 1_000_000) as f64 / 997.0;
                        event(tenant, at, ms)
                    })
                    .collect();
                written += writer.write(Uuid::now_v7(), &batch).await.unwrap().accepted;
            }
            written
        }));
    }
    let mut written = 0;
    for task in tasks {
        written += task.await.unwrap();
    }
    assert_eq!(written, 8 * 15 * 200);
    let since = start.date_naive() - TimeDelta::days(1);
    let mut mismatches = 0;
    for plan in [Plan::Free, Plan::Pro, Plan::Enterprise] {
        let rollup = store.dashboard(plan, since).await.unwrap();
        let raw = store.dashboard_raw(plan, since).await.unwrap();
        assert!(!raw.is_empty());
        if rollup != raw {
            mismatches += 1;
        }
    }
    assert_eq!(mismatches, 0, "the rollup differs from the raw events");
    assert_eq!(
        count(
            &store,
            "SELECT sum(events)::bigint FROM analytics.events_daily"
        )
        .await,
        written as i64
    );
    // Newest day first.
    let rows = store.dashboard(Plan::Pro, since).await.unwrap();
    assert!(rows.windows(2).all(|w| w[0].day >= w[1].day));
    let _ = NaiveDate::MIN;
}

#[tokio::test]
async fn a_database_that_is_down_is_unavailable() {
    let pool = pg_kit::pool(
        "postgres://postgres@127.0.0.1:1/none",
        &pg_kit::PoolConfig {
            connection_timeout: std::time::Duration::from_millis(300),
            ..pg_kit::PoolConfig::default()
        },
    )
    .unwrap();
    let store = Arc::new(Analytics::new(pool, time_kit::system()));
    let error = store.migrate().await.unwrap_err();
    assert!(error.is_transient(), "{error:?}");
    let error = store
        .dashboard(Plan::Pro, NaiveDate::from_ymd_opt(2024, 1, 1).unwrap())
        .await
        .unwrap_err();
    assert!(error.is_transient(), "{error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_dropped_mid_copy_commits_nothing_and_the_retry_writes_once() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = store(&db, EventRules::default()).await;
    let now = Utc::now();
    store
        .ensure_partitions((now - TimeDelta::days(3)).date_naive(), now.date_naive(), 3)
        .await
        .unwrap();
    tenants(&store, 4).await;
    let writer = store.writer(WriterConfig::default().with_max_batch_rows(200_000));
    let batch: Arc<Vec<Event>> = Arc::new(
        (0..150_000)
            .map(|i| event(1 + i % 4, now - TimeDelta::seconds(i), (i % 1000) as f64))
            .collect(),
    );
    let id = Uuid::now_v7();
    let write = {
        let (writer, batch) = (writer.clone(), Arc::clone(&batch));
        tokio::spawn(async move { writer.write(id, &batch).await })
    };
    // Wait until the COPY is streaming, then end its backend, as a crash
    // of the server process or a network cut would.
    let admin = db.connect().await;
    let mut killed = false;
    while !write.is_finished() {
        let rows = admin
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                  WHERE datname = current_database() AND query LIKE 'COPY analytics.events%'
                    AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap();
        if rows.iter().any(|r| r.get::<_, bool>(0)) {
            killed = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    let outcome = write.await.unwrap();
    assert!(
        killed,
        "the COPY ended before it could be interrupted: {outcome:?}"
    );
    let error = outcome.unwrap_err();
    assert!(error.is_transient(), "{error:?}");
    // Nothing of the batch was committed: no rows, no totals, no batch id.
    assert_eq!(
        count(&store, "SELECT count(*) FROM analytics.events").await,
        0
    );
    assert_eq!(
        count(&store, "SELECT count(*) FROM analytics.events_daily").await,
        0
    );
    assert_eq!(
        count(&store, "SELECT count(*) FROM analytics.ingest_batches").await,
        0
    );
    // The retry under the same id writes it once; a second retry replays.
    let retried = writer.write(id, &batch).await.unwrap();
    assert_eq!((retried.accepted, retried.replayed), (150_000, false));
    let again = writer.write(id, &batch).await.unwrap();
    assert!(again.replayed);
    assert_eq!(
        count(&store, "SELECT count(*) FROM analytics.events").await,
        150_000
    );
    assert_eq!(
        count(
            &store,
            "SELECT sum(events)::bigint FROM analytics.events_daily"
        )
        .await,
        150_000
    );
}

#[tokio::test]
async fn a_month_boundary_splits_rows_between_partitions_and_days() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = store(&db, EventRules::default()).await;
    tenants(&store, 1).await;
    let this_month = Utc::now().date_naive().with_day(1).unwrap();
    let last_month = (this_month - TimeDelta::days(1)).with_day(1).unwrap();
    store
        .ensure_partitions(last_month, this_month, 0)
        .await
        .unwrap();
    let midnight = this_month.and_time(chrono::NaiveTime::MIN).and_utc();
    let just_before = midnight - TimeDelta::microseconds(1);
    let report = store
        .writer(WriterConfig::default())
        .write(
            Uuid::now_v7(),
            &[
                event(1, just_before, 1.0),
                event(1, midnight, 2.0),
                event(1, midnight, 4.0),
            ],
        )
        .await
        .unwrap();
    assert_eq!(report.accepted, 3);
    let conn = store.pool().get().await.unwrap();
    let parts: Vec<(String, i64)> = conn
        .query(
            "SELECT tableoid::regclass::text, count(*) FROM analytics.events GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        parts,
        vec![
            (format!("analytics.{}", partition_name(last_month)), 1),
            (format!("analytics.{}", partition_name(this_month)), 2),
        ]
    );
    let days: Vec<(NaiveDate, i64, i64)> = conn
        .query(
            "SELECT day, events, sum_processing_time_us FROM analytics.events_daily ORDER BY day",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        days,
        vec![
            (this_month - TimeDelta::days(1), 1, 1_000),
            (this_month, 2, 6_000),
        ]
    );
    assert_eq!(store.default_partition_rows().await.unwrap(), 0);
}

#[tokio::test]
async fn a_replay_answers_what_the_first_attempt_answered() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = store(&db, EventRules::default()).await;
    let now = Utc::now();
    let old = now - TimeDelta::days(10);
    store
        .ensure_partitions(old.date_naive(), now.date_naive(), 1)
        .await
        .unwrap();
    tenants(&store, 2).await;
    let batch = vec![
        event(1, now, 1.0),
        event(99, now, 1.0),
        event(2, now + TimeDelta::minutes(30), 1.0),
        event(2, old, 2.0),
    ];
    let id = Uuid::now_v7();
    let first = store
        .writer(WriterConfig::default())
        .write(id, &batch)
        .await
        .unwrap();
    assert_eq!((first.accepted, first.replayed), (2, false));
    let codes: Vec<(usize, &str)> = first.rejected.iter().map(|r| (r.index, r.code)).collect();
    assert_eq!(codes, vec![(1, "unknown_tenant"), (2, "too_far_in_future")]);
    // Since then: tenant 99 is registered, the rules allow an hour ahead,
    // and the horizon covers the old row. Every row would be answered
    // differently now; the replay answers as the first attempt did.
    store
        .upsert_tenant(&Tenant {
            id: TenantId(99),
            name: "late".into(),
            plan: Plan::Free,
        })
        .await
        .unwrap();
    let conn = store.pool().get().await.unwrap();
    conn.execute(
        "UPDATE analytics.archive_horizon SET archived_before = $1",
        &[&(now - TimeDelta::days(1))],
    )
    .await
    .unwrap();
    let lenient = Analytics::new(store.pool().clone(), time_kit::system())
        .with_rules(EventRules::default().with_max_future_skew(TimeDelta::hours(1)));
    for replayer in [&store, &lenient] {
        let again = replayer
            .writer(WriterConfig::default())
            .write(id, &batch)
            .await
            .unwrap();
        assert!(again.replayed);
        assert_eq!(again.accepted, first.accepted);
        assert_eq!(
            again.rejected, first.rejected,
            "the same rows, codes, reasons"
        );
        assert_eq!(again.accepted + again.rejected.len(), batch.len());
    }
    assert_eq!(
        count(&store, "SELECT count(*) FROM analytics.events").await,
        2
    );
}

#[tokio::test]
async fn a_batch_id_reused_for_other_events_is_refused() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = store(&db, EventRules::default()).await;
    let now = Utc::now();
    store
        .ensure_partitions(now.date_naive(), now.date_naive(), 1)
        .await
        .unwrap();
    tenants(&store, 2).await;
    let writer = store.writer(WriterConfig::default());
    let id = Uuid::now_v7();
    let first = vec![event(1, now, 1.0), event(2, now, 2.0)];
    writer.write(id, &first).await.unwrap();
    let others = [
        // One field of one row differs.
        vec![event(1, now, 1.0), event(2, now, 2.5)],
        // Fewer rows.
        vec![event(1, now, 1.0)],
        // Nothing of it would be accepted.
        vec![event(42, now, 1.0)],
    ];
    for other in others {
        let error = writer.write(id, &other).await.unwrap_err();
        assert!(
            matches!(error, AnalyticsError::IdempotencyKeyReused { batch_id } if batch_id == id),
            "{other:?}: {error:?}"
        );
        assert!(!error.is_transient());
    }
    assert_eq!(
        count(&store, "SELECT count(*) FROM analytics.events").await,
        2
    );
    // The first batch itself still replays.
    assert!(writer.write(id, &first).await.unwrap().replayed);
}

#[tokio::test]
async fn a_batch_with_nothing_accepted_records_no_key_and_its_correction_is_written() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = store(&db, EventRules::default()).await;
    let now = Utc::now();
    store
        .ensure_partitions(now.date_naive(), now.date_naive(), 1)
        .await
        .unwrap();
    tenants(&store, 1).await;
    let writer = store.writer(WriterConfig::default());
    let id = Uuid::now_v7();
    let wrong = vec![event(7, now, 1.0), event(1, now, -1.0)];
    let refused = writer.write(id, &wrong).await.unwrap();
    assert_eq!(
        (refused.accepted, refused.rejected.len(), refused.replayed),
        (0, 2, false)
    );
    assert_eq!(
        count(&store, "SELECT count(*) FROM analytics.ingest_batches").await,
        0,
        "nothing committed, no key recorded"
    );
    // The client fixes its lines and sends them again under the same key.
    let fixed = vec![event(1, now, 1.0), event(1, now, 1.0)];
    let written = writer.write(id, &fixed).await.unwrap();
    assert_eq!((written.accepted, written.replayed), (2, false));
    assert_eq!(
        count(&store, "SELECT count(*) FROM analytics.events").await,
        2
    );
    let again = writer.write(id, &fixed).await.unwrap();
    assert_eq!((again.accepted, again.replayed), (2, true));
    assert_eq!(
        count(&store, "SELECT count(*) FROM analytics.events").await,
        2
    );
}

#[tokio::test]
async fn the_dashboard_orders_days_far_apart_like_the_raw_events() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = store(&db, EventRules::default()).await;
    tenants(&store, 6).await;
    let now = Utc::now();
    store
        .ensure_partitions(now.date_naive(), now.date_naive(), 0)
        .await
        .unwrap();
    // A stray row decades back (it lands in the default partition) beside
    // today's rows: the dashboard must not make a bucket per day between.
    let old = chrono::DateTime::parse_from_rfc3339("1990-03-04T05:06:07Z")
        .unwrap()
        .with_timezone(&Utc);
    let batch = vec![
        event(3, old, 1.0),
        event(6, now, 2.0),
        event(3, now, 3.0),
        event(6, old, 4.0),
    ];
    store
        .writer(WriterConfig::default())
        .write(Uuid::now_v7(), &batch)
        .await
        .unwrap();
    let since = NaiveDate::from_ymd_opt(1980, 1, 1).unwrap();
    let rows = store.dashboard(Plan::Enterprise, since).await.unwrap();
    assert_eq!(
        rows,
        store.dashboard_raw(Plan::Enterprise, since).await.unwrap()
    );
    let order: Vec<(NaiveDate, i64)> = rows.iter().map(|r| (r.day, r.tenant_id.0)).collect();
    assert_eq!(
        order,
        vec![
            (now.date_naive(), 3),
            (now.date_naive(), 6),
            (old.date_naive(), 3),
            (old.date_naive(), 6),
        ]
    );
}
