//! The dashboard cache against real PostgreSQL and Redis: invalidation on
//! write, a stampede of 1,000 readers, early refresh, and a Redis outage
//! (on a throwaway `redis-server`).
#![cfg(feature = "redis")]

mod support;

use std::sync::Arc;
use std::time::Duration;

use chrono::{NaiveDate, TimeDelta, Utc};
use pg_analytics::cache::{CacheConfig, DashboardCache};
use pg_analytics::{Analytics, Event, Plan, Tenant, TenantId, WriterConfig};
use redis_kit::RedisSetup;
use testkit::{RedisServer, TestDatabase, TestRedis};
use uuid::Uuid;

const SINCE: NaiveDate = NaiveDate::from_ymd_opt(2020, 1, 1).unwrap();

async fn store(db: &TestDatabase) -> Analytics {
    support::with_tenants(
        db,
        &[
            (1, Plan::Enterprise),
            (2, Plan::Enterprise),
            (3, Plan::Free),
        ],
    )
    .await
}

fn events(tenant: i64, n: usize, days_ago: i64) -> Vec<Event> {
    (0..n)
        .map(|i| Event {
            tenant_id: TenantId(tenant),
            created_at: Utc::now() - TimeDelta::days(days_ago) - TimeDelta::seconds(i as i64),
            event_type: "api_call".into(),
            processing_time_ms: 1.0 + i as f64,
        })
        .collect()
}

fn config(redis: &TestRedis) -> CacheConfig {
    CacheConfig::default()
        .with_key_prefix(redis.prefix())
        .with_redis_timeout(Duration::from_millis(500))
}

async fn cache(store: &Analytics, url: &str, config: CacheConfig) -> DashboardCache {
    let client = RedisSetup::new(url).connect().await.unwrap();
    DashboardCache::new(store.clone(), client, config).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_committed_write_is_never_served_stale() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let Some(redis) = TestRedis::create().await else {
        return;
    };
    let store = store(&db).await;
    let cache = cache(&store, redis.url(), config(&redis)).await;
    let writer = cache.writer(store.writer(WriterConfig::default()));
    writer
        .write(Uuid::now_v7(), events(1, 10, 1))
        .await
        .unwrap();

    let first = cache.dashboard_json(Plan::Enterprise, SINCE).await.unwrap();
    assert_eq!(
        first,
        store.dashboard_json(Plan::Enterprise, SINCE).await.unwrap()
    );
    let again = cache.dashboard_json(Plan::Enterprise, SINCE).await.unwrap();
    assert_eq!(again, first);
    let stats = cache.stats();
    assert_eq!((stats.misses, stats.hits, stats.recomputations), (1, 1, 1));

    // Every write, acknowledged, is in the very next read.
    for round in 0..5 {
        let report = writer
            .write(Uuid::now_v7(), events(2, 3, round))
            .await
            .unwrap();
        assert_eq!(report.tenants, vec![TenantId(2)]);
        let cached = cache.dashboard_json(Plan::Enterprise, SINCE).await.unwrap();
        let fresh = store.dashboard_json(Plan::Enterprise, SINCE).await.unwrap();
        assert_eq!(
            cached, fresh,
            "round {round}: the cache served a stale dashboard"
        );
    }
    let stats = cache.stats();
    assert_eq!(stats.invalidations, 6);
    assert_eq!(stats.redis_failures, 0);

    // A replayed batch bumps every plan (its first attempt may have
    // committed without its bump): the next read recomputes.
    let id = Uuid::now_v7();
    let batch = events(3, 2, 0);
    writer.write(id, batch.clone()).await.unwrap();
    let before = cache.stats().recomputations;
    cache.dashboard_json(Plan::Free, SINCE).await.unwrap();
    let report = writer.write(id, batch).await.unwrap();
    assert!(report.replayed);
    cache.dashboard_json(Plan::Free, SINCE).await.unwrap();
    assert_eq!(cache.stats().recomputations, before + 2);

    // A tenant that changes plan moves between the plans' dashboards at
    // once.
    let free = cache.dashboard_json(Plan::Free, SINCE).await.unwrap();
    cache
        .upsert_tenant(&Tenant {
            id: TenantId(3),
            name: "tenant 3".into(),
            plan: Plan::Enterprise,
        })
        .await
        .unwrap();
    for plan in [Plan::Free, Plan::Enterprise] {
        assert_eq!(
            cache.dashboard_json(plan, SINCE).await.unwrap(),
            store.dashboard_json(plan, SINCE).await.unwrap(),
            "{plan:?} after the plan change"
        );
    }
    assert_ne!(cache.dashboard_json(Plan::Free, SINCE).await.unwrap(), free);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stampede_of_1000_readers_computes_once() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let Some(redis) = TestRedis::create().await else {
        return;
    };
    let store = store(&db).await;
    store
        .writer(WriterConfig::default())
        .write(Uuid::now_v7(), &events(1, 500, 3))
        .await
        .unwrap();
    let cache = cache(&store, redis.url(), config(&redis)).await;
    let expected = store.dashboard_json(Plan::Enterprise, SINCE).await.unwrap();
    let start = Arc::new(tokio::sync::Barrier::new(1_000));
    let readers: Vec<_> = (0..1_000)
        .map(|_| {
            let (cache, start) = (cache.clone(), Arc::clone(&start));
            tokio::spawn(async move {
                start.wait().await;
                cache.dashboard_json(Plan::Enterprise, SINCE).await.unwrap()
            })
        })
        .collect();
    for reader in readers {
        assert_eq!(reader.await.unwrap(), expected);
    }
    let stats = cache.stats();
    assert_eq!(stats.recomputations, 1, "{stats:?}");
    assert_eq!(stats.hits + stats.misses, 1_000, "{stats:?}");
    assert_eq!(stats.redis_failures, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xfetch_refreshes_a_value_before_it_expires() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let Some(redis) = TestRedis::create().await else {
        return;
    };
    let store = store(&db).await;
    // β so large that every hit is due: the refresh happens on the first
    // hit, in the background, while the hit is answered from the cache.
    let cache = cache(
        &store,
        redis.url(),
        config(&redis).with_early_refresh_beta(1e12),
    )
    .await;
    let body = cache.dashboard_json(Plan::Pro, SINCE).await.unwrap();
    assert_eq!(cache.dashboard_json(Plan::Pro, SINCE).await.unwrap(), body);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while cache.stats().early_refreshes == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no early refresh");
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stats = cache.stats();
    assert_eq!(stats.recomputations, 2, "{stats:?}");
    assert_eq!(stats.hits, 1, "{stats:?}");

    // β = 0 never refreshes early.
    let calm = self::cache(
        &store,
        redis.url(),
        config(&redis).with_early_refresh_beta(0.0),
    )
    .await;
    for _ in 0..20 {
        calm.dashboard_json(Plan::Pro, SINCE).await.unwrap();
    }
    assert_eq!(calm.stats().early_refreshes, 0);
    assert_eq!(calm.stats().recomputations, 0, "{:?}", calm.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_falls_through_to_postgres_and_is_counted() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = store(&db).await;
    let mut server = RedisServer::start();
    let cache = cache(
        &store,
        &server.url(),
        CacheConfig::default().with_redis_timeout(Duration::from_millis(300)),
    )
    .await;
    let writer = cache.writer(store.writer(WriterConfig::default()));
    writer.write(Uuid::now_v7(), events(1, 5, 2)).await.unwrap();
    cache.dashboard_json(Plan::Enterprise, SINCE).await.unwrap();
    assert_eq!(cache.stats().redis_failures, 0);

    server.stop();
    // Reads are answered from PostgreSQL, and are fresh.
    let during = cache.dashboard_json(Plan::Enterprise, SINCE).await.unwrap();
    assert_eq!(
        during,
        store.dashboard_json(Plan::Enterprise, SINCE).await.unwrap()
    );
    let stats = cache.stats();
    assert!(stats.redis_failures >= 1, "{stats:?}");
    assert_eq!(stats.fallthroughs, 1, "{stats:?}");
    // A write still commits; its lost bump is counted.
    let report = writer.write(Uuid::now_v7(), events(2, 4, 1)).await.unwrap();
    assert_eq!(report.accepted, 4);
    assert_eq!(cache.stats().invalidation_failures, 1);
    let during = cache.dashboard_json(Plan::Enterprise, SINCE).await.unwrap();
    assert_eq!(
        during,
        store.dashboard_json(Plan::Enterprise, SINCE).await.unwrap()
    );

    // Redis back (empty): the cache bumps every plan, then serves again.
    server.restart();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let body = cache.dashboard_json(Plan::Enterprise, SINCE).await.unwrap();
        assert_eq!(
            body,
            store.dashboard_json(Plan::Enterprise, SINCE).await.unwrap()
        );
        if cache.stats().hits > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cache did not recover: {:?}",
            cache.stats()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_gives_up_does_not_strand_the_computation() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let Some(redis) = TestRedis::create().await else {
        return;
    };
    let store = store(&db).await;
    let cache = cache(&store, redis.url(), config(&redis)).await;
    // Hold the rollup so the computation blocks in PostgreSQL.
    let mut blocker = db.connect().await;
    let lock = blocker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE analytics.events_daily IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let gave_up = tokio::time::timeout(
        Duration::from_millis(200),
        cache.dashboard_json(Plan::Enterprise, SINCE),
    )
    .await;
    assert!(gave_up.is_err(), "the read should have been blocked");
    lock.commit().await.unwrap();
    // The computation goes on without its reader: it stores the value and
    // gives its connection back.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while cache.stats().recomputations == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the computation was stranded"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let state = store.pool().state();
    assert_eq!(state.connections, state.idle_connections, "{state:?}");
    // And it was stored: readers get it from Redis, none computes again.
    while cache.stats().hits == 0 {
        assert!(tokio::time::Instant::now() < deadline, "never stored");
        cache.dashboard_json(Plan::Enterprise, SINCE).await.unwrap();
    }
    assert_eq!(cache.stats().recomputations, 1, "{:?}", cache.stats());

    // Generations are never reused: a bump sets at least the server's
    // clock in µs, so an evicted or rolled-back key cannot come back to an
    // old number.
    use fred::interfaces::KeysInterface;
    let writer = cache.writer(store.writer(WriterConfig::default()));
    writer.write(Uuid::now_v7(), events(1, 1, 0)).await.unwrap();
    let generation: i64 = redis
        .client()
        .get(format!("{}gen:plan:enterprise", redis.prefix()))
        .await
        .unwrap();
    assert!(generation > 1_600_000_000_000_000, "{generation}");
}
