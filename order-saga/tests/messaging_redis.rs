//! The Redis Streams bus against real servers: the outbox drained to a
//! stream, consumer groups, takeover of a dead consumer's entries, dead
//! letters, and a Redis outage (on a throwaway `redis-server`).
#![cfg(all(feature = "postgres", feature = "redis"))]

mod messaging_support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use fred::prelude::{Client, StreamsInterface};
use messaging_support::{Probe, assert_per_order_order, eventually, new_order, order_events};
use order_saga::events::EventEnvelope;
use order_saga::messaging::outbox::{self, OUTBOX_MIGRATION, PgOutboxSource};
use order_saga::messaging::{
    ConsumerPolicy, EventHandler, GroupStart, OrderTimeline, OutboxRelay, RedisStreamPublisher,
    RelayConfig, StreamConsumer, StreamConsumerConfig, StreamPublisherConfig, Timeline,
};
use order_saga::pg::{self, PgPool, PoolConfig};
use redis_kit::RedisSetup;
use testkit::{RedisServer, TestDatabase, TestRedis};

async fn database() -> Option<(TestDatabase, PgPool)> {
    let db = TestDatabase::create().await?;
    let pool = pg::pool(db.url(), &PoolConfig::default()).unwrap();
    pg::migrate(&pool, "orders", &[OUTBOX_MIGRATION])
        .await
        .unwrap();
    Some((db, pool))
}

fn relay_config() -> RelayConfig {
    RelayConfig {
        batch_size: 16,
        poll_interval: Duration::from_millis(100),
        retry_initial: Duration::from_millis(20),
        retry_max: Duration::from_millis(200),
        publish_timeout: Duration::from_secs(1),
        lag_interval: Duration::from_millis(50),
        ..RelayConfig::default()
    }
}

fn consumer_config(prefix: &str, group: &str, name: &str) -> StreamConsumerConfig {
    let mut config = StreamConsumerConfig::new(prefix, group).unwrap();
    config.consumer = name.to_owned();
    config.batch_size = 5;
    config.block = Duration::from_millis(100);
    config.min_idle = Duration::from_millis(300);
    config.claim_interval = Duration::from_millis(50);
    config.policy = ConsumerPolicy {
        retry_initial: Duration::from_millis(5),
        retry_max: Duration::from_millis(20),
        ..ConsumerPolicy::default()
    };
    config
}

async fn append_tx(pool: &PgPool, events: &[EventEnvelope]) {
    let mut conn = pool.get().await.unwrap();
    let tx = conn.begin().await.unwrap();
    outbox::append(&tx, events).await.unwrap();
    tx.commit().await.unwrap();
}

async fn unpublished(pool: &PgPool) -> i64 {
    let conn = pool.get().await.unwrap();
    outbox::unpublished_count(&**conn).await.unwrap()
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    let conn = pool.get().await.unwrap();
    conn.query_one(sql, &[]).await.unwrap().get(0)
}

/// The envelopes in a stream, in stream order.
async fn stream_events(client: &Client, key: &str) -> Vec<EventEnvelope> {
    let entries: Vec<(String, HashMap<String, String>)> =
        client.xrange_values(key, "-", "+", None).await.unwrap();
    entries
        .into_iter()
        .map(|(_, fields)| serde_json::from_str(&fields["event"]).unwrap())
        .collect()
}

async fn dead_letters(client: &Client, key: &str) -> Vec<(String, HashMap<String, String>)> {
    client.xrange_values(key, "-", "+", None).await.unwrap()
}

/// Entries delivered to the group and not acknowledged.
async fn pending_count(client: &Client, stream: &str, group: &str) -> u64 {
    order_saga::messaging::redis::pending_count(client, stream, group)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_down_events_wait_in_the_outbox_and_drain_when_it_is_back() {
    let Some((db, pool)) = database().await else {
        return;
    };
    let mut server = RedisServer::start();
    let setup = RedisSetup::new(server.url());
    let publisher = RedisStreamPublisher::connect(&setup, StreamPublisherConfig::new("").unwrap())
        .await
        .unwrap();
    let stream = publisher.stream().to_owned();
    let relay = OutboxRelay::new(
        PgOutboxSource::new(db.config().clone()),
        Arc::new(publisher),
        relay_config(),
    )
    .spawn();
    let probe = setup.connect().await.unwrap();
    let handled = Probe::new(None);
    let mut config = consumer_config("", "g", "c");
    config.policy.retry_max = Duration::from_millis(100);
    let consumer = StreamConsumer::connect(&setup, config, handled.clone())
        .await
        .unwrap()
        .spawn();

    let first = order_events(new_order(), 5);
    append_tx(&pool, &first).await;
    eventually(
        "published while Redis is up",
        Duration::from_secs(10),
        || async { unpublished(&pool).await == 0 },
    )
    .await;
    assert_eq!(stream_events(&probe, &stream).await, first);
    // Handled before the outage: the restarted server keeps nothing, so
    // entries still unread in it when it stops are gone for the consumer
    // (the relay marked them published). Stopping it sooner raced the
    // consumer's read, and the count below then waited for 25 forever.
    eventually(
        "the first events handled while Redis is up",
        Duration::from_secs(10),
        || async { consumer.stats().snapshot().handled == 5 },
    )
    .await;

    server.stop();
    // Orders keep being written while Redis is down.
    let mut during = Vec::new();
    for _ in 0..4 {
        let events = order_events(new_order(), 5);
        append_tx(&pool, &events).await;
        during.extend(events);
    }
    eventually(
        "the relay's failures are counted",
        Duration::from_secs(10),
        || async {
            let s = relay.stats().snapshot();
            s.publish_failures >= 3 && s.lag > Duration::ZERO
        },
    )
    .await;
    assert_eq!(unpublished(&pool).await, 20, "nothing lost, nothing marked");
    assert_eq!(relay.stats().snapshot().published, 5);

    // A fresh, empty server at the same address.
    server.restart();
    eventually(
        "the outbox drains once Redis is back",
        Duration::from_secs(30),
        || async { unpublished(&pool).await == 0 },
    )
    .await;
    let published = stream_events(&probe, &stream).await;
    assert_eq!(
        assert_per_order_order(&published, &during),
        0,
        "each once, in order"
    );
    let stats = relay.stats().snapshot();
    assert_eq!(stats.published, 25);
    relay.shutdown().await;

    // The consumer rode the outage out: it rejoined its group (the new
    // server had none) and handled everything.
    eventually(
        "the consumer caught up",
        Duration::from_secs(20),
        || async { consumer.stats().snapshot().handled == 25 },
    )
    .await;
    for e in first.iter().chain(&during) {
        assert_eq!(handled.calls_for(e.id), 1);
    }
    assert!(consumer.stats().snapshot().bus_failures > 0);
    consumer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outbox_to_two_consumers_of_a_group_each_event_handled_once() {
    let Some((db, pool)) = database().await else {
        return;
    };
    let Some(redis) = TestRedis::create().await else {
        return;
    };
    let setup = RedisSetup::new(redis.url());
    let publisher = Arc::new(
        RedisStreamPublisher::connect(&setup, StreamPublisherConfig::new(redis.prefix()).unwrap())
            .await
            .unwrap(),
    );
    let timeline = Arc::new(OrderTimeline::new(pool.clone()));
    let probes = [
        Probe::new(Some(timeline.clone() as Arc<dyn EventHandler>)),
        Probe::new(Some(timeline.clone() as Arc<dyn EventHandler>)),
    ];
    let mut consumers = Vec::new();
    for (i, probe) in probes.iter().enumerate() {
        let config = consumer_config(redis.prefix(), "timeline", &format!("c{i}"));
        consumers.push(
            StreamConsumer::connect(&setup, config, probe.clone())
                .await
                .unwrap()
                .spawn(),
        );
    }
    let relay = OutboxRelay::new(
        PgOutboxSource::new(db.config().clone()),
        publisher.clone(),
        relay_config(),
    )
    .spawn();

    let mut appended = Vec::new();
    let mut writers = Vec::new();
    for _ in 0..4 {
        let pool = pool.clone();
        writers.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for _ in 0..10 {
                let events = order_events(new_order(), 6);
                for chunk in events.chunks(3) {
                    append_tx(&pool, chunk).await;
                }
                mine.extend(events);
            }
            mine
        }));
    }
    for w in writers {
        appended.extend(w.await.unwrap());
    }
    let n = appended.len();
    // The relay publishing some again (as after a crash) changes nothing.
    publisher.publish_batch(&appended[..10]).await.unwrap();

    eventually("every event recorded", Duration::from_secs(30), || async {
        count(&pool, "SELECT count(*) FROM orders.order_timeline").await == n as i64
            && probes.iter().map(|p| p.total()).sum::<usize>() == n + 10
    })
    .await;
    for probe in &probes {
        assert!(probe.total() > 0, "both consumers got a share");
    }
    for event in &appended {
        let calls: usize = probes.iter().map(|p| p.calls_for(event.id)).sum();
        let published_twice = appended[..10].iter().any(|e| e.id == event.id);
        assert_eq!(calls, if published_twice { 2 } else { 1 });
    }
    assert_eq!(
        count(&pool, "SELECT count(*) FROM orders.inbox").await,
        n as i64
    );
    for order in appended.iter().map(|e| e.order_id) {
        let want: Vec<_> = appended
            .iter()
            .filter(|e| e.order_id == order)
            .map(|e| e.id)
            .collect();
        let got: Vec<_> = timeline
            .timeline(order)
            .await
            .unwrap()
            .iter()
            .map(|e| e.event_id)
            .collect();
        assert_eq!(got, want);
    }
    let stream = StreamPublisherConfig::new(redis.prefix()).unwrap().stream;
    eventually("all acknowledged", Duration::from_secs(10), || async {
        pending_count(redis.client(), &stream, "timeline").await == 0
    })
    .await;
    relay.shutdown().await;
    for c in consumers {
        c.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_consumers_pending_entries_are_taken_over() {
    let Some((_db, pool)) = database().await else {
        return;
    };
    let Some(redis) = TestRedis::create().await else {
        return;
    };
    let setup = RedisSetup::new(redis.url());
    let publisher =
        RedisStreamPublisher::connect(&setup, StreamPublisherConfig::new(redis.prefix()).unwrap())
            .await
            .unwrap();
    let stream = publisher.stream().to_owned();

    // A consumer that reads a batch and hangs on its first entry, then dies.
    let hanging = Probe::new(None);
    hanging
        .hang
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let mut doomed_config = consumer_config(redis.prefix(), "g", "doomed");
    doomed_config.batch_size = 10;
    let doomed = StreamConsumer::connect(&setup, doomed_config, hanging.clone())
        .await
        .unwrap()
        .spawn();
    let events: Vec<_> = (0..2).flat_map(|_| order_events(new_order(), 5)).collect();
    publisher.publish_batch(&events).await.unwrap();
    eventually(
        "the doomed consumer read them",
        Duration::from_secs(10),
        || async { hanging.total() == 1 },
    )
    .await;
    doomed.abort().await;
    assert_eq!(pending_count(redis.client(), &stream, "g").await, 10);

    let timeline = Arc::new(OrderTimeline::new(pool.clone()));
    let survivor_probe = Probe::new(Some(timeline.clone() as Arc<dyn EventHandler>));
    let survivor = StreamConsumer::connect(
        &setup,
        consumer_config(redis.prefix(), "g", "survivor"),
        survivor_probe.clone(),
    )
    .await
    .unwrap()
    .spawn();
    eventually(
        "the survivor took them over",
        Duration::from_secs(20),
        || async { survivor.stats().snapshot().handled == 10 },
    )
    .await;
    assert_eq!(survivor.stats().snapshot().reclaimed, 10);
    assert_eq!(pending_count(redis.client(), &stream, "g").await, 0);
    for e in &events {
        assert_eq!(survivor_probe.calls_for(e.id), 1);
    }
    assert_eq!(
        count(&pool, "SELECT count(*) FROM orders.order_timeline").await,
        10
    );
    survivor.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poison_entry_is_dead_lettered_after_max_deliveries_and_acknowledged() {
    let Some(redis) = TestRedis::create().await else {
        return;
    };
    let setup = RedisSetup::new(redis.url());
    let publisher =
        RedisStreamPublisher::connect(&setup, StreamPublisherConfig::new(redis.prefix()).unwrap())
            .await
            .unwrap();
    let events = order_events(new_order(), 5);
    let poison = events[2].id;
    let probe = Probe::new(None);
    probe.fail.lock().insert(poison);
    let config = consumer_config(redis.prefix(), "g", "c");
    let dead_stream = config.dead_letter_stream.clone();
    let stream = config.stream.clone();
    let consumer = StreamConsumer::connect(&setup, config, probe.clone())
        .await
        .unwrap()
        .spawn();
    publisher.publish_batch(&events).await.unwrap();
    eventually("handled or dead", Duration::from_secs(20), || async {
        let s = consumer.stats().snapshot();
        s.handled == 4 && s.dead_lettered == 1
    })
    .await;
    assert_eq!(probe.calls_for(poison), 5, "the default max_deliveries");
    let dead = dead_letters(redis.client(), &dead_stream).await;
    assert_eq!(dead.len(), 1);
    let (_, fields) = &dead[0];
    let original: Vec<(String, HashMap<String, String>)> = redis
        .client()
        .xrange_values(&stream, "-", "+", None)
        .await
        .unwrap();
    assert_eq!(fields["original_id"], original[2].0);
    assert_eq!(fields["deliveries"], "5");
    assert!(fields["error"].contains("cannot handle"), "{fields:?}");
    assert_eq!(fields["group"], "g");
    assert_eq!(fields["type"], events[2].event.type_name());
    let back: EventEnvelope = serde_json::from_str(&fields["event"]).unwrap();
    assert_eq!(back.id, poison);
    assert_eq!(pending_count(redis.client(), &stream, "g").await, 0);
    consumer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_versions_and_malformed_entries_are_dead_lettered_unhandled() {
    let Some(redis) = TestRedis::create().await else {
        return;
    };
    let setup = RedisSetup::new(redis.url());
    let mut config = consumer_config(redis.prefix(), "g", "c");
    config.policy.max_deliveries = 2;
    let stream = config.stream.clone();
    let dead_stream = config.dead_letter_stream.clone();
    let probe = Probe::new(None);
    let consumer = StreamConsumer::connect(&setup, config, probe.clone())
        .await
        .unwrap()
        .spawn();

    let good = order_events(new_order(), 1).remove(0);
    let mut future = serde_json::to_value(&good).unwrap();
    future["schema_version"] = 99.into();
    future["id"] = uuid::Uuid::now_v7().to_string().into();
    let entries: [Vec<(&str, String)>; 3] = [
        vec![
            ("event", future.to_string()),
            ("type", "OrderCreated".into()),
            ("schema_version", "99".into()),
        ],
        vec![
            ("event", "{not json".into()),
            ("type", "OrderCreated".into()),
            ("schema_version", "1".into()),
        ],
        vec![
            ("event", serde_json::to_string(&good).unwrap()),
            ("type", good.event.type_name().into()),
            ("schema_version", "1".into()),
        ],
    ];
    for fields in entries {
        let _: String = redis
            .client()
            .xadd(&stream, false, None::<()>, "*", fields)
            .await
            .unwrap();
    }
    eventually("sorted out", Duration::from_secs(20), || async {
        let s = consumer.stats().snapshot();
        s.handled == 1 && s.dead_lettered == 2
    })
    .await;
    assert_eq!(probe.total(), 1, "only the good entry reached the handler");
    let dead = dead_letters(redis.client(), &dead_stream).await;
    let errors: Vec<_> = dead.iter().map(|(_, f)| f["error"].clone()).collect();
    assert!(
        errors[0].contains("unknown schema version 99"),
        "{errors:?}"
    );
    assert!(errors[1].contains("malformed event"), "{errors:?}");
    assert!(dead.iter().all(|(_, f)| f["deliveries"] == "2"));
    assert_eq!(pending_count(redis.client(), &stream, "g").await, 0);
    consumer.shutdown().await;
}

#[tokio::test]
async fn joining_a_group_is_idempotent_and_a_new_group_can_skip_history() {
    let Some(redis) = TestRedis::create().await else {
        return;
    };
    let setup = RedisSetup::new(redis.url());
    let publisher =
        RedisStreamPublisher::connect(&setup, StreamPublisherConfig::new(redis.prefix()).unwrap())
            .await
            .unwrap();
    let old = order_events(new_order(), 3);
    publisher.publish_batch(&old).await.unwrap();

    let probe = Probe::new(None);
    let mut configs = Vec::new();
    for name in ["a", "b"] {
        let mut config = consumer_config(redis.prefix(), "late", name);
        config.start = GroupStart::New;
        configs.push(config);
    }
    let mut handles = Vec::new();
    for config in configs {
        handles.push(
            StreamConsumer::connect(&setup, config, probe.clone())
                .await
                .unwrap()
                .spawn(),
        );
    }
    let new = order_events(new_order(), 2);
    publisher.publish_batch(&new).await.unwrap();
    eventually(
        "the new events handled",
        Duration::from_secs(10),
        || async { probe.total() == 2 },
    )
    .await;
    for e in &old {
        assert_eq!(probe.calls_for(e.id), 0, "history skipped");
    }
    for h in handles {
        h.shutdown().await;
    }
    let bad = StreamConsumerConfig::new(redis.prefix(), "").unwrap();
    assert!(
        StreamConsumer::connect(&setup, bad, probe.clone())
            .await
            .is_err()
    );
}
