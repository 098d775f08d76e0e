//! Two order-service processes on one PostgreSQL database and one Redis
//! stream: both create orders and drive sagas, one relay publishes the
//! shared outbox (leader lock), and both consume the stream in one consumer
//! group ("order-timeline"). Every event reaches the timeline exactly once,
//! and both processes handled some.
//!
//! The test re-runs its own binary as the two children.
#![cfg(all(feature = "postgres", feature = "redis"))]
// The child reports to the parent on stdout; the parent reports on stderr.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod support;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use order_saga::inventory::Inventory;
use order_saga::inventory::postgres::PgInventory;
use order_saga::messaging::outbox::PgOutboxSource;
use order_saga::messaging::redis::{
    RedisStreamPublisher, StreamConsumer, StreamConsumerConfig, StreamPublisherConfig,
};
use order_saga::messaging::relay::{OutboxRelay, RelayConfig};
use order_saga::messaging::timeline::OrderTimeline;
use order_saga::order::store::postgres::PgOrderStore;
use order_saga::payment::resilient::{ResilientConfig, ResilientPayments};
use order_saga::payment::sim::{SimConfig, Simulator};
use order_saga::pg::{PoolConfig, pool};
use order_saga::shipping::postgres::PgShipping;
use order_saga::{OrderConfig, OrderService, Services};
use serde::{Deserialize, Serialize};
use support::*;
use testkit::{TestDatabase, TestRedis};

const CHILD_ENV: &str = "ORDER_SAGA_TWO_INSTANCES_CHILD";
const TEST_NAME: &str = "two_processes_share_the_work_and_one_consumer_group";
const ORDERS_EACH: usize = 150;

#[derive(Serialize, Deserialize)]
struct ChildSpec {
    name: String,
    db_url: String,
    redis_url: String,
    prefix: String,
}

#[test]
fn two_processes_share_the_work_and_one_consumer_group() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        child(serde_json::from_str(&spec).expect("child spec"));
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(parent());
}

async fn parent() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let Some(redis) = TestRedis::create().await else {
        return;
    };
    let pg = pool(db.url(), &PoolConfig::default()).unwrap();
    PgOrderStore::new(pg.clone()).migrate().await.unwrap();
    let inventory = PgInventory::new(pg.clone(), time_kit::system());
    inventory.migrate().await.unwrap();
    PgShipping::new(pg.clone(), Default::default(), time_kit::system())
        .migrate()
        .await
        .unwrap();
    let inventory: Arc<dyn Inventory> = Arc::new(inventory);
    for s in 0..4 {
        stock(&inventory, &format!("S{s}"), 10_000, 100).await;
    }
    let children: Vec<_> = ["a", "b"]
        .iter()
        .map(|name| {
            let spec = ChildSpec {
                name: (*name).to_owned(),
                db_url: db.url().to_owned(),
                redis_url: redis.url().to_owned(),
                prefix: redis.prefix().to_owned(),
            };
            Command::new(std::env::current_exe().unwrap())
                .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
                .env(CHILD_ENV, serde_json::to_string(&spec).unwrap())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut handled = Vec::new();
    for child in children {
        let output = tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        assert!(output.status.success(), "a child failed: {}", output.status);
        let stdout = String::from_utf8_lossy(&output.stdout);
        let line = stdout
            .lines()
            .find_map(|l| l.split("HANDLED ").nth(1))
            .unwrap_or_else(|| panic!("the child did not report: {stdout}"));
        handled.push(line.trim().parse::<u64>().unwrap());
    }
    let conn = pg.get().await.unwrap();
    let one = |sql: &'static str| {
        let conn = &conn;
        async move { conn.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    let orders = one("SELECT count(*) FROM orders.orders").await;
    assert_eq!(orders, 2 * ORDERS_EACH as i64);
    assert_eq!(
        one("SELECT count(*) FROM orders.orders WHERE state NOT IN ('confirmed', 'cancelled')")
            .await,
        0
    );
    let events = one("SELECT count(*) FROM orders.outbox").await;
    assert_eq!(
        one("SELECT count(*) FROM orders.outbox WHERE published_at IS NULL").await,
        0
    );
    assert_eq!(
        one("SELECT count(*) FROM orders.order_timeline").await,
        events,
        "every event once in the timeline"
    );
    assert_eq!(
        one("SELECT count(DISTINCT event_id) FROM orders.order_timeline").await,
        events
    );
    assert!(
        handled.iter().all(|n| *n > 0),
        "both processes consumed: {handled:?}"
    );
    assert!(
        handled.iter().sum::<u64>() >= events as u64,
        "{handled:?} of {events}"
    );
}

fn child(spec: ChildSpec) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let clock = time_kit::system();
        let pg = pool(&spec.db_url, &PoolConfig { connection_timeout: Duration::from_secs(30), ..PoolConfig::default() }).unwrap();
        let services = Services {
            inventory: Arc::new(PgInventory::new(pg.clone(), clock.clone())),
            payments: Arc::new(ResilientPayments::new(Simulator::new(SimConfig::default()).unwrap(), ResilientConfig::default()).unwrap()),
            shipping: Arc::new(PgShipping::new(pg.clone(), Default::default(), clock.clone())),
        };
        let config = OrderConfig { instance_id: spec.name.clone(), poll_interval: Duration::from_millis(20), ..OrderConfig::default() };
        let service = OrderService::new(Arc::new(PgOrderStore::new(pg.clone())), services, config, clock);
        let setup = redis_kit::RedisSetup::new(spec.redis_url.clone());
        let publisher = RedisStreamPublisher::connect(&setup, StreamPublisherConfig::new(&spec.prefix).unwrap()).await.unwrap();
        let relay_config = RelayConfig { poll_interval: Duration::from_millis(50), standby_interval: Duration::from_millis(100), ..RelayConfig::default() };
        let relay = OutboxRelay::new(PgOutboxSource::from_url(&spec.db_url).unwrap(), Arc::new(publisher), relay_config).spawn();
        let mut consumer_config = StreamConsumerConfig::new(&spec.prefix, "order-timeline").unwrap();
        consumer_config.consumer = format!("consumer-{}", spec.name);
        consumer_config.block = Duration::from_millis(200);
        let consumer = StreamConsumer::connect(&setup, consumer_config, Arc::new(OrderTimeline::new(pg.clone()))).await.unwrap().spawn();
        let running = service.start();
        let mut tasks = Vec::new();
        for i in 0..ORDERS_EACH {
            let service = service.clone();
            let name = spec.name.clone();
            tasks.push(tokio::spawn(async move {
                let sku = format!("S{}", i % 4);
                service.create_order(&customer(&format!("{name}{}", i % 10)), cart(&[(&sku, 1)]), &format!("{name}-{i}")).await.unwrap();
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        // Stay until both processes' orders are done and every event is in
        // the timeline (so each keeps consuming while the other works).
        let conn = pg.get().await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let row = conn
                .query_one(
                    "SELECT (SELECT count(*) FROM orders.orders WHERE state IN ('confirmed', 'cancelled')),
                            (SELECT count(*) FROM orders.outbox),
                            (SELECT count(*) FROM orders.order_timeline)",
                    &[],
                )
                .await
                .unwrap();
            let (done, events, timeline): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
            if done == 2 * ORDERS_EACH as i64 && timeline == events {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{done} orders done, {timeline} of {events} events in the timeline");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(conn);
        let handled = consumer.stats().snapshot().handled;
        running.shutdown().await;
        consumer.shutdown().await;
        relay.shutdown().await;
        println!("HANDLED {handled}");
    });
}
