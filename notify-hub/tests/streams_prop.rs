//! Property (ADR 0026): whatever order the broker hands another node's
//! messages over in, and whichever it loses, a stream subscription yields
//! each of the user's streams exactly once and in order: the inbox's direct
//! sends, and for each group exactly the sends made while the user was a
//! member, across joins, leaves and re-joins. After a resync (which a
//! broker asks for when it may have lost messages) nothing is missing.
//!
//! Two hubs share one store: the operations go through hub A, whose broker
//! holds every message (sends and membership changes); the test hands them
//! to hub B, where the subscription is, delayed, reordered or dropped.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::ChaosBroker;

use notify_hub::{BrokerEvent, Hub, HubConfig, MemoryStore, Notification, StreamEvent};
use proptest::prelude::*;

/// One operation through hub A.
#[derive(Debug, Clone)]
enum Op {
    Broadcast(u8),
    Direct,
    Join(u8),
    Leave(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..3).prop_map(Op::Broadcast),
        2 => Just(Op::Direct),
        2 => (0u8..3).prop_map(Op::Join),
        1 => (0u8..3).prop_map(Op::Leave),
    ]
}

/// What happens to each message: delivered after 0..3 steps, or lost.
fn fate() -> impl Strategy<Value = Option<u8>> {
    prop_oneof![3 => (0u8..4).prop_map(Some), 1 => Just(None)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn every_stream_is_exact_whatever_the_broker_does(
        ops in proptest::collection::vec(op(), 1..40),
        fates in proptest::collection::vec(fate(), 80),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let store = Arc::new(MemoryStore::new());
            let a_broker = Arc::new(ChaosBroker::default());
            let a = Hub::start(HubConfig::default(), Arc::clone(&store), Arc::clone(&a_broker))
                .await
                .unwrap();
            let b_broker = Arc::new(ChaosBroker::default());
            let b = Hub::start(HubConfig::default().with_replay_page(3), store, Arc::clone(&b_broker))
                .await
                .unwrap();
            let mut sub = b.subscribe_streams("u", None).await.unwrap();
            let sink = b_broker.sink.lock().clone().unwrap();

            // The model: what u must get, per stream, in order.
            let mut member = [false; 3];
            let mut expected: BTreeMap<String, Vec<String>> = BTreeMap::new();
            let mut waiting: Vec<(usize, BrokerEvent)> = Vec::new();
            let mut fates = fates.into_iter().cycle();
            for (step, op) in ops.iter().enumerate() {
                let title = format!("s{step}");
                match op {
                    Op::Broadcast(g) => {
                        a.broadcast_to_group(&format!("g{g}"), Notification::new("t", &title, "m")).await.unwrap();
                        if member[*g as usize] {
                            expected.entry(format!("g{g}")).or_default().push(title);
                        }
                    }
                    Op::Direct => {
                        a.send_to_users(&["u"], Notification::new("t", &title, "m")).await.unwrap();
                        expected.entry("inbox".into()).or_default().push(title);
                    }
                    Op::Join(g) => {
                        a.join_group(&format!("g{g}"), "u").await.unwrap();
                        member[*g as usize] = true;
                    }
                    Op::Leave(g) => {
                        a.leave_group(&format!("g{g}"), "u").await.unwrap();
                        member[*g as usize] = false;
                    }
                }
                for message in a_broker.held.lock().drain(..) {
                    if let Some(delay) = fates.next().flatten() {
                        waiting.push((step + usize::from(delay), message));
                    }
                }
                let (due, later): (Vec<_>, Vec<_>) = waiting.drain(..).partition(|(at, _)| *at <= step);
                waiting = later;
                // Released newest first: later messages overtake earlier ones.
                for (_, message) in due.into_iter().rev() {
                    sink.send(message).await.unwrap();
                }
            }
            for (_, message) in waiting.drain(..) {
                sink.send(message).await.unwrap();
            }
            // What the broker may have lost is found at a resync.
            sink.send(BrokerEvent::Resync).await.unwrap();

            let mut got: BTreeMap<String, Vec<String>> = BTreeMap::new();
            let mut last_offset: BTreeMap<String, u64> = BTreeMap::new();
            let want: usize = expected.values().map(Vec::len).sum();
            let mut have = 0;
            while have < want {
                let event = tokio::time::timeout(Duration::from_secs(5), sub.next())
                    .await
                    .unwrap_or_else(|_| panic!("stalled: got {got:?}, expected {expected:?}"))
                    .unwrap();
                match event {
                    StreamEvent::Inbox(d) => {
                        got.entry("inbox".into()).or_default().push(d.notification.title.clone());
                        have += 1;
                    }
                    StreamEvent::Group { group, offset, notification, .. } => {
                        let last = last_offset.entry(group.to_string()).or_default();
                        assert!(offset > *last, "{group}: offset {offset} after {last}");
                        *last = offset;
                        got.entry(group.to_string()).or_default().push(notification.title.clone());
                        have += 1;
                    }
                    StreamEvent::Joined { .. } | StreamEvent::Left { .. } => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
            assert_eq!(got, expected);
        });
    }
}
