//! Two hubs sharing one Redis: a notification sent through hub A reaches a
//! user connected to hub B, in order, with no gap.
#![cfg(feature = "redis")]

mod common;

use common::two_hubs;

use std::time::Duration;

use notify_hub::Notification;
use testkit::TestRedis;

fn note(i: usize) -> Notification {
    Notification::new("test.event", format!("n{i}"), "body")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_through_hub_a_reaches_a_user_on_hub_b() {
    let Some(redis) = TestRedis::create().await else {
        return;
    };
    let (a, b) = two_hubs(&redis).await;
    a.ready().await.unwrap();
    let mut on_b = b.subscribe("alice", None).await.unwrap();
    let mut on_a = a.subscribe("alice", None).await.unwrap();
    // Redis SUBSCRIBE is asynchronous to the first publish; wait for it.
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Sends alternate between the hubs; both connections see 1..=200 in order.
    for i in 1..=200 {
        let hub = if i % 2 == 0 { &a } else { &b };
        hub.send_to_users(&["alice"], note(i)).await.unwrap();
    }
    for sub in [&mut on_b, &mut on_a] {
        for seq in 1..=200 {
            let d = tokio::time::timeout(Duration::from_secs(5), sub.next())
                .await
                .expect("delivered")
                .unwrap();
            assert_eq!(d.seq, seq);
            assert_eq!(d.notification.title, format!("n{seq}"));
        }
    }
    // Each hub only counts what it handed to its own connections.
    assert_eq!(a.stats().delivered(), 200);
    assert_eq!(b.stats().delivered(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_broadcast_through_one_hub_reaches_members_on_both() {
    let Some(redis) = TestRedis::create().await else {
        return;
    };
    let (a, b) = two_hubs(&redis).await;
    a.join_group("g", "u1").await.unwrap();
    b.join_group("g", "u2").await.unwrap();
    let mut u1 = a.subscribe("u1", None).await.unwrap();
    let mut u2 = b.subscribe("u2", None).await.unwrap();
    let mut outsider = b.subscribe("u3", None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    a.broadcast_to_group("g", note(1)).await.unwrap();
    for sub in [&mut u1, &mut u2] {
        let d = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((d.seq, d.notification.title.as_str()), (1, "n1"));
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(200), outsider.next())
            .await
            .is_err()
    );
}

/// A group send's stream position (`"g"`) crosses nodes in the broker
/// message unchanged, beside the v1 recipients.
#[tokio::test]
async fn a_group_sends_stream_offset_crosses_the_broker() {
    use notify_hub::broker::RedisBroker;
    use notify_hub::store::Recipient;
    use notify_hub::{Broker, BrokerEvent, GroupOffset, Published};

    let Some(redis) = TestRedis::create().await else {
        return;
    };
    let a = RedisBroker::connect(redis.url(), redis.prefix())
        .await
        .unwrap();
    let b = RedisBroker::connect(redis.url(), redis.prefix())
        .await
        .unwrap();
    let (sink, mut events) = tokio::sync::mpsc::channel(16);
    b.subscribe(sink).await.unwrap();
    let mut n = note(1);
    n.id = Some(uuid::Uuid::now_v7());
    let message = Published {
        notification: std::sync::Arc::new(n),
        recipients: vec![Recipient {
            user_id: "ann".to_owned(),
            seq: 7,
        }],
        origin: uuid::Uuid::now_v7(),
        group: Some(GroupOffset {
            group: "team".to_owned(),
            offset: 42,
        }),
    };
    // `subscribe` returns once Redis has confirmed the subscription.
    a.publish(std::sync::Arc::new(message.clone()))
        .await
        .unwrap();
    let event = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("the message crossed")
        .expect("the subscription is open");
    let BrokerEvent::Published(received) = event else {
        panic!("{event:?}");
    };
    assert_eq!(*received, message);
}

/// A stream subscription on hub B follows what is done through hub A: the
/// join (announced over the broker), the group's sends, and the leave,
/// after which nothing of the group reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_subscriptions_follow_joins_sends_and_leaves_made_on_another_node() {
    use notify_hub::StreamEvent;

    let Some(redis) = TestRedis::create().await else {
        return;
    };
    let (a, b) = two_hubs(&redis).await;
    let mut sub = b.subscribe_streams("ann", None).await.unwrap();
    a.join_group("team", "ann").await.unwrap();
    let StreamEvent::Joined {
        group,
        joined_after,
    } = next_event(&mut sub).await
    else {
        panic!("expected the join first");
    };
    assert_eq!((&*group, joined_after), ("team", 0));
    for i in 1..=3 {
        a.broadcast_to_group("team", note(i)).await.unwrap();
    }
    for i in 1..=3u64 {
        let StreamEvent::Group {
            offset,
            notification,
            ..
        } = next_event(&mut sub).await
        else {
            panic!("expected the group's sends");
        };
        assert_eq!(offset, i);
        assert_eq!(notification.title, format!("n{i}"));
    }
    a.leave_group("team", "ann").await.unwrap();
    let StreamEvent::Left { left_after, .. } = next_event(&mut sub).await else {
        panic!("expected the leave");
    };
    assert_eq!(left_after, 4);
    a.broadcast_to_group("team", note(5)).await.unwrap();
    a.send_to_users(&["ann"], note(6)).await.unwrap();
    let StreamEvent::Inbox(d) = next_event(&mut sub).await else {
        panic!("nothing of the group after the leave");
    };
    assert_eq!(d.notification.title, "n6");
}

/// The next stream event, or a panic after 5 s.
async fn next_event(sub: &mut notify_hub::StreamSubscription) -> notify_hub::StreamEvent {
    tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("an event within 5 s")
        .expect("open")
}
