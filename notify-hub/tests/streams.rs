//! Stream subscriptions (ADR 0026, `Hub::subscribe_streams`) on the memory
//! store: an inbox and a stream per group, each numbered on its own, each
//! gap-free and without duplicates, with joins and leaves at their place.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use notify_hub::{
    Hub, HubConfig, LocalBroker, MemoryStore, Notification, Position, StreamEvent,
    StreamSubscription,
};

fn note(title: &str) -> Notification {
    Notification::new("test.event", title, "body")
}

/// The next event, or a panic after 5 s.
async fn next(sub: &mut StreamSubscription) -> StreamEvent {
    tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("an event within 5 s")
        .expect("the subscription is open")
}

/// An event as a short string: `inbox:7:title`, `team:2:title`,
/// `+team@0`, `-team@3`.
fn show(event: &StreamEvent) -> String {
    match event {
        StreamEvent::Inbox(d) => format!("inbox:{}:{}", d.seq, d.notification.title),
        StreamEvent::Group {
            group,
            offset,
            notification,
            ..
        } => format!("{group}:{offset}:{}", notification.title),
        StreamEvent::Joined {
            group,
            joined_after,
        } => format!("+{group}@{joined_after}"),
        StreamEvent::Left { group, left_after } => format!("-{group}@{left_after}"),
        other => format!("{other:?}"),
    }
}

/// The next `n` events, grouped by stream (streams are ordered each on
/// their own, not against each other) and in arrival order within each.
async fn next_n(sub: &mut StreamSubscription, n: usize) -> Vec<String> {
    let mut events = Vec::new();
    for _ in 0..n {
        events.push(show(&next(sub).await));
    }
    let stream = |e: &String| {
        e.trim_start_matches(['+', '-'])
            .split([':', '@'])
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    // A stable sort: arrival order is kept within a stream.
    events.sort_by_key(stream);
    events
}

async fn hub() -> Hub {
    Hub::in_memory(HubConfig::default()).await.unwrap()
}

#[tokio::test]
async fn direct_and_group_sends_arrive_each_on_its_own_stream() {
    let hub = hub().await;
    hub.join_group("team", "ann").await.unwrap();
    let mut sub = hub.subscribe_streams("ann", None).await.unwrap();
    hub.broadcast_to_group("team", note("b1")).await.unwrap();
    hub.broadcast_to_group("team", note("b2")).await.unwrap();
    hub.send_to_users(&["ann"], note("d1")).await.unwrap();
    // The broadcasts' v1 copies took seqs 1 and 2 in ann's sequence: the
    // inbox skips them, so the direct send is inbox seq 3.
    assert_eq!(
        next_n(&mut sub, 3).await,
        ["inbox:3:d1", "team:1:b1", "team:2:b2"]
    );
    assert_eq!(
        sub.position(),
        Position {
            inbox: 3,
            groups: BTreeMap::from([("team".to_owned(), 2)]),
        }
    );
}

#[tokio::test]
async fn a_join_starts_a_group_and_a_leave_ends_it_at_its_record() {
    let hub = hub().await;
    hub.join_group("team", "bob").await.unwrap();
    hub.broadcast_to_group("team", note("before"))
        .await
        .unwrap();
    let mut sub = hub.subscribe_streams("ann", None).await.unwrap();
    assert!(sub.position().groups.is_empty());

    hub.join_group("team", "ann").await.unwrap();
    assert_eq!(show(&next(&mut sub).await), "+team@1");
    hub.broadcast_to_group("team", note("b2")).await.unwrap();
    assert_eq!(show(&next(&mut sub).await), "team:2:b2");
    // Another member's leave is a place in the stream, not an event.
    hub.leave_group("team", "bob").await.unwrap();
    hub.broadcast_to_group("team", note("b4")).await.unwrap();
    assert_eq!(show(&next(&mut sub).await), "team:4:b4");

    hub.leave_group("team", "ann").await.unwrap();
    assert_eq!(show(&next(&mut sub).await), "-team@5");
    hub.broadcast_to_group("team", note("after")).await.unwrap();
    hub.send_to_users(&["ann"], note("d")).await.unwrap();
    // Nothing of the group after the leave: the next event is the inbox's.
    assert_eq!(show(&next(&mut sub).await), "inbox:3:d");
    assert!(sub.position().groups.is_empty());
}

#[tokio::test]
async fn a_position_continues_every_stream_after_it() {
    let hub = hub().await;
    for g in ["g1", "g2"] {
        hub.join_group(g, "ann").await.unwrap();
    }
    let mut sub = hub.subscribe_streams("ann", None).await.unwrap();
    hub.broadcast_to_group("g1", note("a1")).await.unwrap();
    hub.send_to_users(&["ann"], note("d1")).await.unwrap();
    assert_eq!(next_n(&mut sub, 2).await, ["g1:1:a1", "inbox:2:d1"]);
    let position = sub.position();
    drop(sub);

    // While away: one more of each stream, and a group left and one joined.
    hub.broadcast_to_group("g1", note("a2")).await.unwrap();
    hub.broadcast_to_group("g2", note("c1")).await.unwrap();
    hub.send_to_users(&["ann"], note("d2")).await.unwrap();
    hub.leave_group("g2", "ann").await.unwrap();
    hub.join_group("g3", "ann").await.unwrap();
    hub.broadcast_to_group("g3", note("e1")).await.unwrap();

    let mut sub = hub.subscribe_streams("ann", Some(&position)).await.unwrap();
    // g1 and g2 continue after the position (g2 up to the leave); g3, not
    // in the position, is announced and read from the join on; the inbox
    // skips the groups' copies.
    assert_eq!(
        next_n(&mut sub, 6).await,
        [
            "g1:2:a2",
            "g2:1:c1",
            "-g2@2",
            "+g3@0",
            "g3:1:e1",
            "inbox:5:d2"
        ]
    );
    hub.broadcast_to_group("g3", note("e2")).await.unwrap();
    assert_eq!(show(&next(&mut sub).await), "g3:2:e2");
}

/// Two nodes on one store whose brokers do not reach each other: what one
/// node sends is never live on the other. The other node's subscription
/// finds each of its own live items past a gap and reads the gap from the
/// store, in order, including a leave made through the first node, after
/// which nothing of the group reaches it.
#[tokio::test]
async fn gaps_in_a_group_stream_are_read_from_the_store_leave_records_included() {
    let store = Arc::new(MemoryStore::new());
    let a = Hub::start(HubConfig::default(), Arc::clone(&store), LocalBroker::new())
        .await
        .unwrap();
    // Replays one item per read: the pages' ends are exercised too.
    let config = HubConfig::default().with_replay_page(1);
    let b = Hub::start(config, Arc::clone(&store), LocalBroker::new())
        .await
        .unwrap();
    b.join_group("team", "ann").await.unwrap();
    let mut sub = b.subscribe_streams("ann", None).await.unwrap();
    a.broadcast_to_group("team", note("from-a-1"))
        .await
        .unwrap();
    a.broadcast_to_group("team", note("from-a-2"))
        .await
        .unwrap();
    b.broadcast_to_group("team", note("from-b-3"))
        .await
        .unwrap();
    assert_eq!(
        next_n(&mut sub, 3).await,
        ["team:1:from-a-1", "team:2:from-a-2", "team:3:from-b-3"]
    );
    // The leave goes through node a; node b's index still holds ann, and
    // b's next broadcast reaches her subscription live, past the record.
    a.leave_group("team", "ann").await.unwrap();
    b.broadcast_to_group("team", note("from-b-5"))
        .await
        .unwrap();
    assert_eq!(show(&next(&mut sub).await), "-team@4");
    // Her sequence holds the copies of the three broadcasts she was a
    // member for (skipped in the inbox), not the one after her leave.
    b.send_to_users(&["ann"], note("d")).await.unwrap();
    assert_eq!(show(&next(&mut sub).await), "inbox:4:d");
}

/// Many senders at once to one group with several subscribers: each
/// subscriber gets offsets 1..=n exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_broadcasts_reach_every_member_once_in_order() {
    let hub = hub().await;
    let members: Vec<String> = (0..6).map(|i| format!("m{i}")).collect();
    for m in &members {
        hub.join_group("crowd", m).await.unwrap();
    }
    let mut subs = Vec::new();
    for m in &members {
        subs.push(hub.subscribe_streams(m, None).await.unwrap());
    }
    let (senders, each) = (8, 40);
    let mut tasks = Vec::new();
    for s in 0..senders {
        let hub = hub.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..each {
                hub.broadcast_to_group("crowd", note(&format!("s{s}-{i}")))
                    .await
                    .unwrap();
            }
        }));
    }
    let total = (senders * each) as u64;
    let mut readers = Vec::new();
    for mut sub in subs {
        readers.push(tokio::spawn(async move {
            let mut offsets = Vec::new();
            while offsets.len() < total as usize {
                match next(&mut sub).await {
                    StreamEvent::Group { offset, .. } => offsets.push(offset),
                    other => panic!("unexpected {other:?}"),
                }
            }
            offsets
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for r in readers {
        assert_eq!(r.await.unwrap(), (1..=total).collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn a_bad_user_id_is_refused_and_shutdown_ends_subscriptions() {
    let hub = hub().await;
    assert!(hub.subscribe_streams("", None).await.is_err());
    let mut sub = hub.subscribe_streams("ann", None).await.unwrap();
    hub.send_to_users(&["ann"], note("last")).await.unwrap();
    assert!(hub.shutdown(Duration::from_secs(5)).await);
    // What was queued is handed out first, then the end.
    assert_eq!(show(&next(&mut sub).await), "inbox:1:last");
    assert!(matches!(
        sub.next().await,
        Err(notify_hub::Closed::ShuttingDown)
    ));
}

/// A join whose broker message was lost (made through another node, here
/// one whose broker never reaches this one) is found when the broker asks
/// for a resync: the subscription reads the memberships again and starts
/// the group from the join.
#[tokio::test]
async fn a_resync_finds_a_join_whose_message_was_lost() {
    use notify_hub::store::BoxFuture;
    use notify_hub::{Broker, BrokerError, BrokerEvent, Published};
    use tokio::sync::mpsc;

    /// A broker whose subscriber the test holds, to send it a resync.
    #[derive(Default)]
    struct Manual(parking_lot::Mutex<Option<mpsc::Sender<BrokerEvent>>>);
    impl Broker for Manual {
        fn publish(&self, _m: Arc<Published>) -> BoxFuture<'_, Result<(), BrokerError>> {
            Box::pin(async { Ok(()) })
        }
        fn subscribe(
            &self,
            sink: mpsc::Sender<BrokerEvent>,
        ) -> BoxFuture<'_, Result<(), BrokerError>> {
            *self.0.lock() = Some(sink);
            Box::pin(async { Ok(()) })
        }
        fn ping(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
            Box::pin(async { Ok(()) })
        }
    }

    let store = Arc::new(MemoryStore::new());
    let manual = Arc::new(Manual::default());
    let here = Hub::start(
        HubConfig::default(),
        Arc::clone(&store),
        Arc::clone(&manual),
    )
    .await
    .unwrap();
    let elsewhere = Hub::start(HubConfig::default(), Arc::clone(&store), LocalBroker::new())
        .await
        .unwrap();
    let mut sub = here.subscribe_streams("ann", None).await.unwrap();
    elsewhere.join_group("team", "ann").await.unwrap();
    elsewhere
        .broadcast_to_group("team", note("missed"))
        .await
        .unwrap();
    let sink = manual.0.lock().clone().unwrap();
    sink.send(BrokerEvent::Resync).await.unwrap();
    assert_eq!(next_n(&mut sub, 2).await, ["+team@0", "team:1:missed"]);
    // And it is in the group's index now: a send through this node is live.
    here.broadcast_to_group("team", note("live")).await.unwrap();
    assert_eq!(show(&next(&mut sub).await), "team:2:live");
}

/// A leave and a re-join while the subscription has not read either yet:
/// it meets the leave at its place, then reads the new membership from its
/// start, and stays in the group's index (later sends arrive live).
#[tokio::test]
async fn a_leave_and_a_rejoin_read_late_keep_the_new_membership() {
    let hub = hub().await;
    hub.join_group("team", "ann").await.unwrap();
    let mut sub = hub.subscribe_streams("ann", None).await.unwrap();
    hub.broadcast_to_group("team", note("b1")).await.unwrap();
    hub.leave_group("team", "ann").await.unwrap();
    hub.broadcast_to_group("team", note("away")).await.unwrap();
    hub.join_group("team", "ann").await.unwrap();
    hub.broadcast_to_group("team", note("b4")).await.unwrap();
    assert_eq!(
        next_n(&mut sub, 4).await,
        ["team:1:b1", "-team@2", "+team@3", "team:4:b4"]
    );
    hub.broadcast_to_group("team", note("b5")).await.unwrap();
    assert_eq!(show(&next(&mut sub).await), "team:5:b5");
}

/// A position inside a past membership of a group the user is a member of
/// again: the rest of the past membership up to its leave record, then the
/// current one from its start.
#[tokio::test]
async fn a_position_inside_a_past_membership_reads_it_then_the_current_one() {
    let hub = hub().await;
    hub.join_group("team", "ann").await.unwrap();
    let mut sub = hub.subscribe_streams("ann", None).await.unwrap();
    hub.broadcast_to_group("team", note("b1")).await.unwrap();
    assert_eq!(show(&next(&mut sub).await), "team:1:b1");
    let position = sub.position();
    drop(sub);
    hub.broadcast_to_group("team", note("b2")).await.unwrap();
    hub.leave_group("team", "ann").await.unwrap();
    hub.join_group("team", "ann").await.unwrap();
    hub.broadcast_to_group("team", note("b4")).await.unwrap();
    let mut sub = hub.subscribe_streams("ann", Some(&position)).await.unwrap();
    assert_eq!(
        next_n(&mut sub, 4).await,
        ["team:2:b2", "-team@3", "+team@3", "team:4:b4"]
    );
    hub.broadcast_to_group("team", note("b5")).await.unwrap();
    assert_eq!(show(&next(&mut sub).await), "team:5:b5");
}

/// With v1's copies off, a group send reaches stream subscriptions only:
/// the inbox is then gap-free, v1 connections get direct sends only, and
/// the receipt still counts the group's members.
#[tokio::test]
async fn without_v1_copies_group_sends_reach_stream_subscriptions_only() {
    let hub = Hub::in_memory(HubConfig::default().with_v1_group_fanout(false))
        .await
        .unwrap();
    for u in ["ann", "bob"] {
        hub.join_group("team", u).await.unwrap();
    }
    let mut streams = hub.subscribe_streams("ann", None).await.unwrap();
    let mut v1 = hub.subscribe("ann", None).await.unwrap();
    let receipt = hub.broadcast_to_group("team", note("b1")).await.unwrap();
    assert_eq!(receipt.recipients, 2);
    hub.send_to_users(&["ann"], note("d1")).await.unwrap();
    assert_eq!(next_n(&mut streams, 2).await, ["inbox:1:d1", "team:1:b1"]);
    let only = tokio::time::timeout(Duration::from_secs(5), v1.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((only.seq, only.notification.title.as_str()), (1, "d1"));
    assert_eq!(hub.history("ann", 10).await.unwrap().len(), 1);
}
