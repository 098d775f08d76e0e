//! Property: whatever order the broker hands another node's messages over
//! in, and whichever it loses, a subscription yields the user's
//! notifications exactly once and in sequence, up to the highest one it was
//! told about.
//!
//! Two hubs share one store: the test sends through hub A, whose broker
//! holds every message, and hands them to hub B (where the subscription is)
//! in its own order. A node's own sends never go through the broker, so the
//! reordering can only come from another node.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::ChaosBroker;

use notify_hub::{BrokerEvent, Hub, HubConfig, MemoryStore, Notification, Published};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Fate {
    Deliver,
    Drop,
}

fn fates() -> impl Strategy<Value = (Vec<(u32, Fate)>, u64)> {
    (1usize..60).prop_flat_map(|n| {
        (
            proptest::collection::vec(
                (
                    any::<u32>(),
                    prop_oneof![3 => Just(Fate::Deliver), 1 => Just(Fate::Drop)],
                ),
                n,
            ),
            0..=n as u64,
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn reordered_and_lost_messages_still_yield_an_exact_sequence((plan, since) in fates()) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let store = Arc::new(MemoryStore::new());
            let broker = Arc::new(ChaosBroker::default());
            let sender = Hub::start(HubConfig::default(), Arc::clone(&store), Arc::clone(&broker))
                .await
                .unwrap();
            let receiver_broker = Arc::new(ChaosBroker::default());
            let hub = Hub::start(HubConfig::default().with_replay_page(7), store, Arc::clone(&receiver_broker))
                .await
                .unwrap();
            let n = plan.len() as u64;
            // Part of the stream exists before the client connects with `since`.
            let before = since.min(n);
            for i in 0..before {
                sender.send_to_users(&["u"], Notification::new("t", format!("n{}", i + 1), "m")).await.unwrap();
            }
            let start = before / 2;
            let mut sub = hub.subscribe("u", Some(start)).await.unwrap();
            // What was stored before never goes through the broker here.
            broker.held.lock().clear();
            let sink = receiver_broker.sink.lock().clone().unwrap();
            let mut got: Vec<u64> = Vec::new();
            let mut waiting: Vec<(u64, Arc<Published>)> = Vec::new();
            let mut highest_live = 0;
            for step in before..n + 4 {
                if step < n {
                    sender.send_to_users(&["u"], Notification::new("t", format!("n{}", step + 1), "m")).await.unwrap();
                    let (key, fate) = plan[step as usize].clone();
                    let message = broker.pop_published().unwrap();
                    if matches!(fate, Fate::Deliver) {
                        // Delayed by 0..3 steps: later sends may overtake it.
                        waiting.push((step + u64::from(key % 4), message));
                    }
                }
                let (due, later): (Vec<_>, Vec<_>) = waiting.drain(..).partition(|(at, _)| *at <= step);
                waiting = later;
                for (_, message) in due.into_iter().rev() {
                    highest_live = highest_live.max(message.recipients[0].seq);
                    sink.send(BrokerEvent::Published(message)).await.unwrap();
                }
                // Read whatever is available now.
                while let Ok(d) = tokio::time::timeout(Duration::from_millis(2), sub.next()).await {
                    got.push(d.unwrap().seq);
                }
            }
            // Everything up to at least the highest seq it heard of (or
            // everything stored before it connected), exactly once, in
            // order. A gap replay may bring later stored ones too.
            let expect_until = highest_live.max(before);
            loop {
                let wait = if (got.len() as u64) < expect_until.saturating_sub(start) { 5_000 } else { 20 };
                match tokio::time::timeout(Duration::from_millis(wait), sub.next()).await {
                    Ok(d) => got.push(d.unwrap().seq),
                    Err(_) => break,
                }
            }
            let last = got.last().copied().unwrap_or(start);
            assert!(last >= expect_until && last <= n, "last {last}, expected ≥ {expect_until}, ≤ {n}");
            assert_eq!(got, (start + 1..=last).collect::<Vec<_>>());
        });
    }
}

#[tokio::test]
async fn a_resync_recovers_what_the_broker_lost_with_nothing_after_it() {
    let store = Arc::new(MemoryStore::new());
    let broker = Arc::new(ChaosBroker::default());
    let sender = Hub::start(
        HubConfig::default(),
        Arc::clone(&store),
        Arc::clone(&broker),
    )
    .await
    .unwrap();
    let receiver_broker = Arc::new(ChaosBroker::default());
    let hub = Hub::start(HubConfig::default(), store, Arc::clone(&receiver_broker))
        .await
        .unwrap();
    let mut sub = hub.subscribe("u", None).await.unwrap();
    for i in 1..=3 {
        sender
            .send_to_users(&["u"], Notification::new("t", format!("n{i}"), "m"))
            .await
            .unwrap();
    }
    // The broker lost all three, and nothing follows to reveal the gap.
    broker.held.lock().clear();
    assert!(
        tokio::time::timeout(Duration::from_millis(50), sub.next())
            .await
            .is_err()
    );
    let sink = receiver_broker.sink.lock().clone().unwrap();
    sink.send(BrokerEvent::Resync).await.unwrap();
    for seq in 1..=3 {
        let d = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(d.seq, seq);
    }
}

#[tokio::test]
async fn a_node_skips_its_own_sends_when_the_broker_brings_them_back() {
    let broker = Arc::new(ChaosBroker::default());
    let hub = Hub::start(
        HubConfig::default().with_queue_capacity(2),
        MemoryStore::new(),
        Arc::clone(&broker),
    )
    .await
    .unwrap();
    let mut sub = hub.subscribe("u", None).await.unwrap();
    hub.send_to_users(&["u"], Notification::new("t", "n1", "m"))
        .await
        .unwrap();
    // Delivered from the writer, not from the broker.
    assert_eq!(sub.next().await.unwrap().seq, 1);
    let echo = broker.pop_published().unwrap();
    assert_eq!(echo.origin, hub.node_id());
    // Echoed many times: none of it lands in the 2-deep queue (it would
    // overflow), and nothing is handed out twice.
    let sink = broker.sink.lock().clone().unwrap();
    for _ in 0..5 {
        sink.send(BrokerEvent::Published(Arc::clone(&echo)))
            .await
            .unwrap();
    }
    hub.send_to_users(&["u"], Notification::new("t", "n2", "m"))
        .await
        .unwrap();
    assert_eq!(sub.next().await.unwrap().seq, 2);
    assert_eq!(hub.stats().overflowed(), 0);
}
