//! The embedded default: memory outbox → relay → memory bus → consumers.

mod messaging_support;

use std::sync::Arc;
use std::time::Duration;

use messaging_support::{
    Probe, Recorder, assert_per_order_order, eventually, new_order, order_events,
};
use order_saga::events::EventEnvelope;
use order_saga::messaging::{
    ConsumerPolicy, EventHandler, MemoryBus, MemoryOutbox, MemoryTimeline, OutboxRelay, RelayConfig,
};

fn relay_config() -> RelayConfig {
    RelayConfig {
        batch_size: 16,
        standby_interval: Duration::from_millis(5),
        retry_initial: Duration::from_millis(1),
        retry_max: Duration::from_millis(10),
        ..RelayConfig::default()
    }
}

fn policy() -> ConsumerPolicy {
    ConsumerPolicy {
        max_deliveries: 4,
        retry_initial: Duration::from_millis(1),
        retry_max: Duration::from_millis(5),
        ..ConsumerPolicy::default()
    }
}

/// Appends events of `orders` orders from `tasks` concurrent tasks, each
/// order's events in several appends, as an order store would.
async fn append_concurrently(
    outbox: &MemoryOutbox,
    tasks: usize,
    orders: usize,
) -> Vec<EventEnvelope> {
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let outbox = outbox.clone();
        handles.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for _ in 0..orders {
                let events = order_events(new_order(), 6);
                for chunk in events.chunks(2) {
                    outbox.append(chunk);
                    tokio::task::yield_now().await;
                }
                mine.extend(events);
            }
            mine
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.unwrap());
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_appended_event_is_published_once_in_order() {
    let outbox = MemoryOutbox::new(time_kit::system());
    let recorder = Arc::new(Recorder::default());
    let relay = OutboxRelay::new(outbox.source(), recorder.clone(), relay_config()).spawn();
    let appended = append_concurrently(&outbox, 8, 25).await;
    eventually(
        "the relay drains the outbox",
        Duration::from_secs(20),
        || async { outbox.is_empty() },
    )
    .await;
    let stats = relay.stats().snapshot();
    relay.shutdown().await;
    let published = recorder.published.lock().clone();
    assert_eq!(published.len(), appended.len());
    assert_eq!(assert_per_order_order(&published, &appended), 0);
    assert_eq!(stats.published, appended.len() as u64);
    assert_eq!(stats.publish_failures, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_relays_on_one_outbox_publish_each_event_once_in_order() {
    let outbox = MemoryOutbox::new(time_kit::system());
    let recorder = Arc::new(Recorder::default());
    let a = OutboxRelay::new(outbox.source(), recorder.clone(), relay_config()).spawn();
    let b = OutboxRelay::new(outbox.source(), recorder.clone(), relay_config()).spawn();
    let appended = append_concurrently(&outbox, 8, 25).await;
    eventually(
        "the relays drain the outbox",
        Duration::from_secs(20),
        || async { outbox.is_empty() },
    )
    .await;
    let (sa, sb) = (a.stats().snapshot(), b.stats().snapshot());
    assert!(sa.leader != sb.leader, "exactly one leads: {sa:?} {sb:?}");
    a.shutdown().await;
    b.shutdown().await;
    let published = recorder.published.lock().clone();
    assert_eq!(assert_per_order_order(&published, &appended), 0);
    assert_eq!(sa.published + sb.published, appended.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_consumers_of_a_group_split_the_events_and_handle_each_once() {
    let outbox = MemoryOutbox::new(time_kit::system());
    let bus = MemoryBus::default();
    let timeline = Arc::new(MemoryTimeline::new());
    let probes = [
        Probe::new(Some(timeline.clone() as Arc<dyn EventHandler>)),
        Probe::new(Some(timeline.clone() as Arc<dyn EventHandler>)),
    ];
    let consumers: Vec<_> = probes
        .iter()
        .enumerate()
        .map(|(i, p)| {
            bus.consumer("timeline", &format!("c{i}"))
                .spawn(p.clone(), policy())
        })
        .collect();
    // Another group sees everything too.
    let audit = Probe::new(None);
    let audit_consumer = bus.consumer("audit", "a").spawn(audit.clone(), policy());

    let relay = OutboxRelay::new(outbox.source(), Arc::new(bus.clone()), relay_config()).spawn();
    let appended = append_concurrently(&outbox, 4, 25).await;
    let n = appended.len();
    eventually(
        "both groups handle everything",
        Duration::from_secs(20),
        || async {
            consumers
                .iter()
                .map(|c| c.stats().snapshot().handled)
                .sum::<u64>()
                == n as u64
                && audit_consumer.stats().snapshot().handled == n as u64
        },
    )
    .await;
    for probe in &probes {
        assert!(probe.total() > 0, "the group's consumers share the work");
    }
    for event in &appended {
        let calls: usize = probes.iter().map(|p| p.calls_for(event.id)).sum();
        assert_eq!(calls, 1, "each event handled once within the group");
        assert_eq!(audit.calls_for(event.id), 1);
    }
    let orders: std::collections::HashSet<_> = appended.iter().map(|e| e.order_id).collect();
    for order in orders {
        let want: Vec<_> = appended
            .iter()
            .filter(|e| e.order_id == order)
            .map(|e| e.id)
            .collect();
        let got: Vec<_> = timeline.entries(order).iter().map(|e| e.event_id).collect();
        assert_eq!(got, want, "the timeline has each event once, in time order");
    }
    relay.shutdown().await;
    for c in consumers {
        c.shutdown().await;
    }
    audit_consumer.shutdown().await;
    assert_eq!(bus.pending("timeline"), 0);
    assert!(bus.is_empty(), "acknowledged by both groups, forgotten");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dropped_consumers_deliveries_go_to_another() {
    let bus = MemoryBus::default();
    let doomed = bus.consumer("g", "doomed");
    let events = order_events(new_order(), 10);
    bus.publish_now(&events);
    let taken: Vec<_> = std::iter::from_fn(|| doomed.try_recv()).collect();
    assert_eq!(taken.len(), 10);
    let probe = Probe::new(None);
    let survivor = bus.consumer("g", "survivor").spawn(probe.clone(), policy());
    drop(doomed);
    eventually(
        "the survivor handles them",
        Duration::from_secs(10),
        || async { survivor.stats().snapshot().handled == 10 },
    )
    .await;
    assert_eq!(survivor.stats().snapshot().reclaimed, 10);
    for e in &events {
        assert_eq!(probe.calls_for(e.id), 1);
    }
    survivor.shutdown().await;
    assert_eq!(bus.pending("g"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poison_event_is_dead_lettered_after_max_deliveries() {
    let bus = MemoryBus::default();
    let events = order_events(new_order(), 5);
    let poison = events[2].id;
    let probe = Probe::new(None);
    probe.fail.lock().insert(poison);
    let consumer = bus.consumer("g", "c").spawn(probe.clone(), policy());
    bus.publish_now(&events);
    eventually(
        "the others handled, the poison dead",
        Duration::from_secs(10),
        || async {
            let s = consumer.stats().snapshot();
            s.handled == 4 && s.dead_lettered == 1
        },
    )
    .await;
    assert_eq!(probe.calls_for(poison), 4, "max_deliveries attempts");
    let dead = bus.dead_letters("g");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].event.id, poison);
    assert_eq!(dead[0].deliveries, 4);
    assert!(dead[0].error.contains("cannot handle"), "{}", dead[0].error);
    consumer.shutdown().await;
    assert_eq!(bus.pending("g"), 0, "acknowledged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unavailable_dependency_is_waited_out_not_dead_lettered() {
    let bus = MemoryBus::default();
    let events = order_events(new_order(), 3);
    let probe = Probe::new(None);
    // The first 10 calls fail as "unavailable": more than max_deliveries.
    probe
        .unavailable_until
        .store(10, std::sync::atomic::Ordering::SeqCst);
    let consumer = bus.consumer("g", "c").spawn(probe.clone(), policy());
    bus.publish_now(&events);
    eventually(
        "handled once the dependency is back",
        Duration::from_secs(10),
        || async { consumer.stats().snapshot().handled == 3 },
    )
    .await;
    assert_eq!(consumer.stats().snapshot().dead_lettered, 0);
    assert!(bus.dead_letters("g").is_empty());
    consumer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unknown_schema_version_is_dead_lettered_unhandled() {
    let bus = MemoryBus::default();
    let mut events = order_events(new_order(), 3);
    events[1].schema_version = 99;
    let probe = Probe::new(None);
    let consumer = bus.consumer("g", "c").spawn(probe.clone(), policy());
    bus.publish_now(&events);
    eventually("sorted out", Duration::from_secs(10), || async {
        let s = consumer.stats().snapshot();
        s.handled == 2 && s.dead_lettered == 1
    })
    .await;
    assert_eq!(probe.calls_for(events[1].id), 0);
    let dead = bus.dead_letters("g");
    assert_eq!(dead[0].event.id, events[1].id);
    assert!(dead[0].error.contains("schema version 99"));
    consumer.shutdown().await;
}
