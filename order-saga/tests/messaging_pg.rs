//! The PostgreSQL outbox, its relay, the inbox and the order timeline,
//! against a real server (one fresh database per test).
#![cfg(feature = "postgres")]

mod messaging_support;

use std::sync::Arc;
use std::time::Duration;

use messaging_support::{Recorder, assert_per_order_order, eventually, new_order, order_events};
use order_saga::events::EventEnvelope;
use order_saga::messaging::outbox::{self, OUTBOX_MIGRATION, PgOutboxSource};
use order_saga::messaging::{
    EventHandler, OrderTimeline, OutboxRelay, RelayConfig, Timeline, inbox,
};
use order_saga::pg::{self, PgPool, PoolConfig};
use testkit::TestDatabase;

async fn setup() -> Option<(TestDatabase, PgPool)> {
    let db = TestDatabase::create().await?;
    let pool = pg::pool(
        db.url(),
        &PoolConfig {
            max_size: 24,
            ..PoolConfig::default()
        },
    )
    .unwrap();
    assert_eq!(
        pg::migrate(&pool, "orders", &[OUTBOX_MIGRATION])
            .await
            .unwrap(),
        1
    );
    Some((db, pool))
}

fn relay_config() -> RelayConfig {
    RelayConfig {
        batch_size: 32,
        poll_interval: Duration::from_millis(200),
        standby_interval: Duration::from_millis(20),
        retry_initial: Duration::from_millis(5),
        retry_max: Duration::from_millis(50),
        ..RelayConfig::default()
    }
}

async fn append_tx(pool: &PgPool, events: &[EventEnvelope], commit: bool) {
    let mut conn = pool.get().await.unwrap();
    let tx = conn.begin().await.unwrap();
    outbox::append(&tx, events).await.unwrap();
    if commit {
        tx.commit().await.unwrap();
    } else {
        tx.rollback().await.unwrap();
    }
}

/// `tasks` concurrent writers, each writing `orders` orders' events in
/// three transactions per order; the middle one rolls back for every
/// other order. Returns (committed, rolled back).
async fn write_concurrently(
    pool: &PgPool,
    tasks: usize,
    orders: usize,
) -> (Vec<EventEnvelope>, Vec<EventEnvelope>) {
    let mut handles = Vec::new();
    for t in 0..tasks {
        let pool = pool.clone();
        handles.push(tokio::spawn(async move {
            let (mut committed, mut rolled_back) = (Vec::new(), Vec::new());
            for o in 0..orders {
                let events = order_events(new_order(), 6);
                for (i, chunk) in events.chunks(2).enumerate() {
                    let commit = !(i == 1 && (t + o) % 2 == 0);
                    append_tx(&pool, chunk, commit).await;
                    if commit {
                        committed.extend_from_slice(chunk);
                    } else {
                        rolled_back.extend_from_slice(chunk);
                    }
                }
            }
            (committed, rolled_back)
        }));
    }
    let (mut committed, mut rolled_back) = (Vec::new(), Vec::new());
    for h in handles {
        let (c, r) = h.await.unwrap();
        committed.extend(c);
        rolled_back.extend(r);
    }
    (committed, rolled_back)
}

async fn unpublished(pool: &PgPool) -> i64 {
    let conn = pool.get().await.unwrap();
    outbox::unpublished_count(&**conn).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn committed_events_are_published_once_in_order_and_rolled_back_ones_never() {
    let Some((db, pool)) = setup().await else {
        return;
    };
    let recorder = Arc::new(Recorder::default());
    let relay = OutboxRelay::new(
        PgOutboxSource::new(db.config().clone()),
        recorder.clone(),
        relay_config(),
    )
    .spawn();
    let (committed, rolled_back) = write_concurrently(&pool, 8, 10).await;
    assert!(!rolled_back.is_empty());
    eventually(
        "the relay drains the outbox",
        Duration::from_secs(30),
        || async { unpublished(&pool).await == 0 && recorder.len() >= committed.len() },
    )
    .await;
    let stats = relay.stats().snapshot();
    relay.shutdown().await;

    let published = recorder.published.lock().clone();
    assert_eq!(published.len(), committed.len(), "exactly once");
    assert_eq!(assert_per_order_order(&published, &committed), 0);
    let ids = recorder.ids();
    assert!(rolled_back.iter().all(|e| !ids.contains(&e.id)));
    assert_eq!(stats.published, committed.len() as u64);
    assert!(stats.leader);

    let conn = pool.get().await.unwrap();
    let rows: i64 = conn
        .query_one("SELECT count(*) FROM orders.outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        rows,
        committed.len() as i64,
        "rolled-back events left no row"
    );
}

#[tokio::test]
async fn one_append_keeps_its_events_in_order() {
    let Some((_db, pool)) = setup().await else {
        return;
    };
    let events = order_events(new_order(), 50);
    append_tx(&pool, &events, true).await;
    let conn = pool.get().await.unwrap();
    let rows = conn
        .query(
            "SELECT event_id, event_type, order_id, published_at IS NULL
             FROM orders.outbox ORDER BY seq",
            &[],
        )
        .await
        .unwrap();
    let ids: Vec<uuid::Uuid> = rows.iter().map(|r| r.get(0)).collect();
    let want: Vec<_> = events.iter().map(|e| e.id).collect();
    assert_eq!(ids, want);
    for (row, event) in rows.iter().zip(&events) {
        assert_eq!(row.get::<_, &str>(1), event.event.type_name());
        assert_eq!(row.get::<_, uuid::Uuid>(2), event.order_id.as_uuid());
        assert!(row.get::<_, bool>(3));
    }
    // A duplicate event id is refused, and nothing of that append is kept.
    let mut conn = pool.get().await.unwrap();
    let tx = conn.begin().await.unwrap();
    let fresh = order_events(new_order(), 1);
    let again = [fresh[0].clone(), events[0].clone()];
    assert!(outbox::append(&tx, &again).await.is_err());
    drop(tx);
    assert_eq!(unpublished(&pool).await, 50);
}

#[tokio::test]
async fn an_append_wakes_the_relay_through_notify() {
    let Some((db, pool)) = setup().await else {
        return;
    };
    let recorder = Arc::new(Recorder::default());
    let config = RelayConfig {
        poll_interval: Duration::from_secs(3600),
        ..relay_config()
    };
    let relay = OutboxRelay::new(
        PgOutboxSource::new(db.config().clone()),
        recorder.clone(),
        config,
    )
    .spawn();
    eventually("the relay leads", Duration::from_secs(10), || async {
        relay.stats().snapshot().leader
    })
    .await;
    // The relay now sleeps for an hour unless NOTIFY wakes it.
    let events = order_events(new_order(), 3);
    append_tx(&pool, &events, true).await;
    eventually(
        "published without polling",
        Duration::from_secs(10),
        || async { recorder.len() == 3 },
    )
    .await;
    relay.shutdown().await;
}

#[tokio::test]
async fn append_without_notify_is_found_by_polling() {
    let Some((db, pool)) = setup().await else {
        return;
    };
    let recorder = Arc::new(Recorder::default());
    let config = RelayConfig {
        poll_interval: Duration::from_millis(50),
        ..relay_config()
    };
    let relay = OutboxRelay::new(
        PgOutboxSource::new(db.config().clone()),
        recorder.clone(),
        config,
    )
    .spawn();
    let events = order_events(new_order(), 4);
    let mut conn = pool.get().await.unwrap();
    let tx = conn.begin().await.unwrap();
    outbox::append_without_notify(&tx, &events).await.unwrap();
    tx.commit().await.unwrap();
    eventually("published", Duration::from_secs(10), || async {
        recorder.len() == 4
    })
    .await;
    assert_eq!(*recorder.published.lock(), events);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_relays_publish_each_event_once_in_order() {
    let Some((db, pool)) = setup().await else {
        return;
    };
    let recorder = Arc::new(Recorder::default());
    let relays: Vec<_> = (0..2)
        .map(|_| {
            OutboxRelay::new(
                PgOutboxSource::new(db.config().clone()),
                recorder.clone(),
                relay_config(),
            )
            .spawn()
        })
        .collect();
    let (committed, _) = write_concurrently(&pool, 8, 10).await;
    eventually(
        "the relays drain the outbox",
        Duration::from_secs(30),
        || async { unpublished(&pool).await == 0 && recorder.len() >= committed.len() },
    )
    .await;
    let stats: Vec<_> = relays.iter().map(|r| r.stats().snapshot()).collect();
    assert_eq!(
        stats.iter().filter(|s| s.leader).count(),
        1,
        "one leader: {stats:?}"
    );
    for relay in relays {
        relay.shutdown().await;
    }
    let published = recorder.published.lock().clone();
    assert_eq!(published.len(), committed.len(), "exactly once");
    assert_eq!(assert_per_order_order(&published, &committed), 0);
    assert_eq!(
        stats.iter().map(|s| s.published).sum::<u64>(),
        committed.len() as u64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_takes_over_when_the_leader_dies() {
    let Some((db, pool)) = setup().await else {
        return;
    };
    let recorder = Arc::new(Recorder::default());
    let spawn = || {
        OutboxRelay::new(
            PgOutboxSource::new(db.config().clone()),
            recorder.clone(),
            relay_config(),
        )
        .spawn()
    };
    let first = spawn();
    eventually("the first relay leads", Duration::from_secs(10), || async {
        first.stats().snapshot().leader
    })
    .await;
    let second = spawn();
    let before = order_events(new_order(), 6);
    append_tx(&pool, &before, true).await;
    eventually("published", Duration::from_secs(10), || async {
        recorder.len() >= 6
    })
    .await;
    assert!(!second.stats().snapshot().leader, "the second stands by");

    // A crash: its session (and lock) ends with its connection.
    first.abort().await;
    let writer = {
        let pool = pool.clone();
        tokio::spawn(async move { write_concurrently(&pool, 4, 10).await })
    };
    let (after, _) = writer.await.unwrap();
    eventually(
        "the standby drains the outbox",
        Duration::from_secs(30),
        || async { unpublished(&pool).await == 0 },
    )
    .await;
    assert!(second.stats().snapshot().leader);
    second.shutdown().await;
    let published = recorder.published.lock().clone();
    let all: Vec<_> = before.iter().chain(&after).cloned().collect();
    // At least once: a leader killed between publish and mark leaves its
    // last batch to be published again; order per order holds regardless.
    assert_per_order_order(&published, &all);
}

#[tokio::test]
async fn published_rows_are_purged_after_their_retention() {
    let Some((db, pool)) = setup().await else {
        return;
    };
    let recorder = Arc::new(Recorder::default());
    let config = RelayConfig {
        retain_published: Some(Duration::ZERO),
        purge_interval: Duration::from_millis(20),
        poll_interval: Duration::from_millis(20),
        ..relay_config()
    };
    let relay = OutboxRelay::new(
        PgOutboxSource::new(db.config().clone()),
        recorder.clone(),
        config,
    )
    .spawn();
    append_tx(&pool, &order_events(new_order(), 5), true).await;
    let conn = pool.get().await.unwrap();
    eventually("published and purged", Duration::from_secs(10), || async {
        let rows: i64 = conn
            .query_one("SELECT count(*) FROM orders.outbox", &[])
            .await
            .unwrap()
            .get(0);
        recorder.len() == 5 && rows == 0
    })
    .await;
    relay.shutdown().await;
}

#[tokio::test]
async fn an_undecodable_row_stops_the_relay_instead_of_skipping_it() {
    let Some((db, pool)) = setup().await else {
        return;
    };
    let conn = pool.get().await.unwrap();
    conn.execute(
        "INSERT INTO orders.outbox (event_id, order_id, event_type, payload)
         VALUES (gen_random_uuid(), gen_random_uuid(), 'FromTheFuture', '{\"type\": \"FromTheFuture\"}')",
        &[],
    )
    .await
    .unwrap();
    append_tx(&pool, &order_events(new_order(), 2), true).await;
    let recorder = Arc::new(Recorder::default());
    let relay = OutboxRelay::new(
        PgOutboxSource::new(db.config().clone()),
        recorder.clone(),
        relay_config(),
    )
    .spawn();
    eventually("the relay reports it", Duration::from_secs(10), || async {
        relay.stats().snapshot().source_failures > 0
    })
    .await;
    assert_eq!(recorder.len(), 0, "nothing overtakes the undecodable row");
    assert_eq!(unpublished(&pool).await, 3);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_inbox_lets_one_of_many_racing_transactions_through() {
    let Some((_db, pool)) = setup().await else {
        return;
    };
    let event_id = uuid::Uuid::now_v7();
    let barrier = Arc::new(tokio::sync::Barrier::new(16));
    let mut handles = Vec::new();
    for _ in 0..16 {
        let pool = pool.clone();
        let barrier = barrier.clone();
        handles.push(tokio::spawn(async move {
            let mut conn = pool.get().await.unwrap();
            let tx = conn.begin().await.unwrap();
            barrier.wait().await;
            let first = inbox::process_once(&tx, "c", event_id).await.unwrap();
            tx.commit().await.unwrap();
            first
        }));
    }
    let mut winners = 0;
    for h in handles {
        winners += usize::from(h.await.unwrap());
    }
    assert_eq!(winners, 1);
    // Another consumer processes the same event independently.
    let mut conn = pool.get().await.unwrap();
    let tx = conn.begin().await.unwrap();
    assert!(inbox::process_once(&tx, "other", event_id).await.unwrap());
    // A rolled-back transaction did not process it.
    tx.rollback().await.unwrap();
    let tx = conn.begin().await.unwrap();
    assert!(inbox::process_once(&tx, "other", event_id).await.unwrap());
    tx.commit().await.unwrap();
    assert_eq!(
        inbox::purge(&**conn, Duration::from_secs(3600))
            .await
            .unwrap(),
        0
    );
    assert_eq!(inbox::purge(&**conn, Duration::ZERO).await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_timeline_records_each_event_once_under_redelivery() {
    let Some((_db, pool)) = setup().await else {
        return;
    };
    let timeline = Arc::new(OrderTimeline::new(pool.clone()));
    let order = new_order();
    let events = order_events(order, 8);
    // Every event handled by 4 racing "consumers", in scrambled order.
    let mut handles = Vec::new();
    for k in 0..4 {
        let timeline = timeline.clone();
        let mut mine = events.clone();
        mine.rotate_left(k * 2);
        handles.push(tokio::spawn(async move {
            for e in &mine {
                timeline.handle(e).await.unwrap();
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let got = timeline.timeline(order).await.unwrap();
    let ids: Vec<_> = got.iter().map(|e| e.event_id).collect();
    let want: Vec<_> = events.iter().map(|e| e.id).collect();
    assert_eq!(ids, want, "each once, in time order");
    assert_eq!(got[0].event_type, events[0].event.type_name());
    let back: EventEnvelope = serde_json::from_value(got[3].payload.clone()).unwrap();
    assert_eq!(back, events[3]);
    assert!(timeline.timeline(new_order()).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_relay_reconnects_and_leads_again_after_losing_its_session() {
    let Some((db, pool)) = setup().await else {
        return;
    };
    let recorder = Arc::new(Recorder::default());
    let relay = OutboxRelay::new(
        PgOutboxSource::new(db.config().clone()),
        recorder.clone(),
        relay_config(),
    )
    .spawn();
    let before = order_events(new_order(), 3);
    append_tx(&pool, &before, true).await;
    eventually("published", Duration::from_secs(10), || async {
        recorder.len() == 3
    })
    .await;

    // As a server restart or a network cut would: the relay's session,
    // and with it its lock, ends.
    let admin = db.connect().await;
    let holder = "SELECT l.pid FROM pg_locks l
         WHERE l.locktype = 'advisory' AND l.granted
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())";
    let leader_pid: i32 = admin.query_one(holder, &[]).await.unwrap().get(0);
    let killed: bool = admin
        .query_one("SELECT pg_terminate_backend($1)", &[&leader_pid])
        .await
        .unwrap()
        .get(0);
    assert!(killed);

    let after = order_events(new_order(), 3);
    append_tx(&pool, &after, true).await;
    eventually(
        "published after reconnecting",
        Duration::from_secs(20),
        || async { unpublished(&pool).await == 0 },
    )
    .await;
    let new_pid: i32 = admin.query_one(holder, &[]).await.unwrap().get(0);
    assert_ne!(
        new_pid, leader_pid,
        "the lock is held again, by a new session"
    );
    assert!(relay.stats().snapshot().leader);
    relay.shutdown().await;
    assert!(
        admin.query_opt(holder, &[]).await.unwrap().is_none(),
        "released on shutdown"
    );
    let all: Vec<_> = before.iter().chain(&after).cloned().collect();
    assert_eq!(assert_per_order_order(&recorder.published.lock(), &all), 0);
}
