//! The hub's contract on the in-memory store and the local broker: delivery,
//! groups, gap-free recovery, slow consumers, cleanup, bad input, shutdown.

use std::time::Duration;

use notify_hub::{Closed, Hub, HubConfig, HubError, Notification};
use tokio::time::timeout;

fn note(i: usize) -> Notification {
    Notification::new("test.event", format!("n{i}"), "body").with_data("i", i)
}

async fn next(sub: &mut notify_hub::Subscription) -> notify_hub::Delivery {
    timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("delivery within 5 s")
        .expect("subscription open")
}

#[tokio::test]
async fn every_connection_of_a_user_gets_every_notification() {
    let hub = Hub::in_memory(HubConfig::default()).await.unwrap();
    let mut a = hub.subscribe("alice", None).await.unwrap();
    let mut b = hub.subscribe("alice", None).await.unwrap();
    let mut other = hub.subscribe("bob", None).await.unwrap();
    for i in 1..=3 {
        let receipt = hub.send_to_users(&["alice"], note(i)).await.unwrap();
        assert_eq!(receipt.recipients, 1);
    }
    for sub in [&mut a, &mut b] {
        for seq in 1..=3 {
            let d = next(sub).await;
            assert_eq!(d.seq, seq);
            assert_eq!(d.notification.title, format!("n{seq}"));
            assert!(d.notification.id.is_some() && d.notification.timestamp.is_some());
        }
    }
    // bob got nothing.
    assert!(
        timeout(Duration::from_millis(100), other.next())
            .await
            .is_err()
    );
    assert_eq!(hub.connection_count(), 3);
}

#[tokio::test]
async fn duplicate_recipients_count_once_and_sequences_are_per_user() {
    let hub = Hub::in_memory(HubConfig::default()).await.unwrap();
    let receipt = hub
        .send_to_users(&["u1", "u2", "u1"], note(1))
        .await
        .unwrap();
    assert_eq!(receipt.recipients, 2);
    hub.send_to_users(&["u2"], note(2)).await.unwrap();
    let u1 = hub.deliveries("u1", 10).await.unwrap();
    let u2 = hub.deliveries("u2", 10).await.unwrap();
    assert_eq!(u1.iter().map(|d| d.seq).collect::<Vec<_>>(), [1]);
    assert_eq!(u2.iter().map(|d| d.seq).collect::<Vec<_>>(), [2, 1]);
}

#[tokio::test]
async fn group_broadcast_reaches_members_only_and_history_keeps_it() {
    let hub = Hub::in_memory(HubConfig::default()).await.unwrap();
    assert!(hub.join_group("g1", "alice").await.unwrap());
    assert!(!hub.join_group("g1", "alice").await.unwrap());
    hub.join_group("g1", "bob").await.unwrap();
    hub.join_group("g2", "carol").await.unwrap();
    let mut alice = hub.subscribe("alice", None).await.unwrap();
    let mut carol = hub.subscribe("carol", None).await.unwrap();
    let receipt = hub.broadcast_to_group("g1", note(1)).await.unwrap();
    assert_eq!(receipt.recipients, 2);
    assert_eq!(next(&mut alice).await.notification.title, "n1");
    assert!(
        timeout(Duration::from_millis(100), carol.next())
            .await
            .is_err()
    );
    assert_eq!(hub.history("bob", 10).await.unwrap()[0].title, "n1");
    assert!(hub.history("carol", 10).await.unwrap().is_empty());

    // Membership is checked when the broadcast is sent.
    assert!(hub.leave_group("g1", "bob").await.unwrap());
    hub.broadcast_to_group("g1", note(2)).await.unwrap();
    assert_eq!(hub.history("bob", 10).await.unwrap().len(), 1);
    assert_eq!(hub.history("alice", 10).await.unwrap().len(), 2);
    // An empty group stores nothing and fails nothing.
    assert_eq!(
        hub.broadcast_to_group("nobody", note(3))
            .await
            .unwrap()
            .recipients,
        0
    );
}

#[tokio::test]
async fn history_is_newest_first_and_limited() {
    let hub = Hub::in_memory(HubConfig::default()).await.unwrap();
    for i in 1..=30 {
        hub.send_to_users(&["u"], note(i)).await.unwrap();
    }
    let recent = hub.history("u", 5).await.unwrap();
    let titles: Vec<_> = recent.iter().map(|n| n.title.as_str()).collect();
    assert_eq!(titles, ["n30", "n29", "n28", "n27", "n26"]);
    assert!(matches!(
        hub.history("u", 0).await,
        Err(HubError::InvalidLimit { max: 1000 })
    ));
    assert!(matches!(
        hub.history("u", 1001).await,
        Err(HubError::InvalidLimit { .. })
    ));
    assert!(hub.history("nobody", 5).await.unwrap().is_empty());
}

#[tokio::test]
async fn since_replays_then_continues_live_without_gap_or_duplicate() {
    let hub = Hub::in_memory(HubConfig::default()).await.unwrap();
    for i in 1..=10 {
        hub.send_to_users(&["u"], note(i)).await.unwrap();
    }
    let mut sub = hub.subscribe("u", Some(4)).await.unwrap();
    assert_eq!(sub.latest_at_start(), 10);
    for i in 11..=13 {
        hub.send_to_users(&["u"], note(i)).await.unwrap();
    }
    let seqs: Vec<u64> = {
        let mut v = Vec::new();
        for _ in 5..=13 {
            v.push(next(&mut sub).await.seq);
        }
        v
    };
    assert_eq!(seqs, (5..=13).collect::<Vec<_>>());
    // Resume mid-stream goes back without duplicating later live traffic.
    sub.resume(11).await.unwrap();
    hub.send_to_users(&["u"], note(14)).await.unwrap();
    assert_eq!(next(&mut sub).await.seq, 12);
    assert_eq!(next(&mut sub).await.seq, 13);
    assert_eq!(next(&mut sub).await.seq, 14);
    assert!(sub.ack(14) && !sub.ack(15));
    assert_eq!(sub.acked(), 14);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_disconnects_while_5000_stream_end_with_exactly_1_to_5000() {
    const TOTAL: u64 = 5000;
    let hub = Hub::in_memory(HubConfig::default().with_replay_page(97))
        .await
        .unwrap();
    let sender = {
        let hub = hub.clone();
        tokio::spawn(async move {
            for i in 1..=TOTAL as usize {
                hub.send_to_users(&["client"], note(i)).await.unwrap();
                if i % 50 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    let mut received: Vec<u64> = Vec::with_capacity(TOTAL as usize);
    let mut reconnects = 0;
    while received.len() < TOTAL as usize {
        let since = received.last().copied().unwrap_or(0);
        let mut sub = hub.subscribe("client", Some(since)).await.unwrap();
        // Read a random number of deliveries, then drop the connection.
        let burst = fastrand::usize(1..400);
        for _ in 0..burst {
            match timeout(Duration::from_secs(5), sub.next()).await {
                Ok(Ok(d)) => received.push(d.seq),
                Ok(Err(Closed::Overflow)) => break,
                other => panic!("unexpected {other:?}"),
            }
            if received.len() == TOTAL as usize {
                break;
            }
        }
        drop(sub);
        reconnects += 1;
    }
    sender.await.unwrap();
    assert!(reconnects > 5, "only {reconnects} reconnects");
    assert_eq!(received, (1..=TOTAL).collect::<Vec<_>>());
    assert_eq!(hub.connection_count(), 0);
}

#[tokio::test]
async fn slow_consumer_is_closed_then_recovers_by_since() {
    let hub = Hub::in_memory(HubConfig::default().with_queue_capacity(8))
        .await
        .unwrap();
    let mut slow = hub.subscribe("u", None).await.unwrap();
    let mut fast = hub.subscribe("u", None).await.unwrap();
    let reader = tokio::spawn(async move {
        let mut seqs = Vec::new();
        for _ in 0..20 {
            seqs.push(fast.next().await.unwrap().seq);
        }
        seqs
    });
    for i in 1..=20 {
        hub.send_to_users(&["u"], note(i)).await.unwrap();
        tokio::task::yield_now().await;
    }
    assert_eq!(reader.await.unwrap(), (1..=20).collect::<Vec<_>>());
    assert!(matches!(slow.next().await, Err(Closed::Overflow)));
    assert!(hub.stats().overflowed() >= 1);
    drop(slow);
    // Recovery: reconnect with since = the last seq it had (none).
    let mut again = hub.subscribe("u", Some(0)).await.unwrap();
    for seq in 1..=20 {
        assert_eq!(next(&mut again).await.seq, seq);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abrupt_disconnects_leave_no_connection_behind() {
    let hub = Hub::in_memory(HubConfig::default()).await.unwrap();
    let before = hub.connection_count();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let hub = hub.clone();
        tasks.push(tokio::spawn(async move {
            let mut sub = hub.subscribe(&format!("u{}", i % 20), None).await.unwrap();
            let _ = sub.next().await; // parked until aborted
        }));
    }
    while hub.connection_count() < before + 200 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Kill half mid-await (like a dropped socket), let the rest end normally.
    for (i, t) in tasks.iter().enumerate() {
        if i % 2 == 0 {
            t.abort();
        }
    }
    hub.send_to_users(
        &(0..20).map(|i| format!("u{i}")).collect::<Vec<_>>(),
        note(1),
    )
    .await
    .unwrap();
    for t in tasks {
        let _ = t.await;
    }
    assert_eq!(hub.connection_count(), before);
    // Sending to users with no connection still works and is stored.
    hub.send_to_users(&["u1"], note(2)).await.unwrap();
    assert_eq!(hub.history("u1", 10).await.unwrap().len(), 2);
}

#[tokio::test]
async fn bad_input_gets_typed_errors_and_changes_nothing() {
    let hub = Hub::in_memory(HubConfig::default()).await.unwrap();
    let empty: [&str; 0] = [];
    assert!(matches!(
        hub.send_to_users(&empty, note(1)).await,
        Err(HubError::NoRecipients)
    ));
    assert!(matches!(
        hub.send_to_users(&[""], note(1)).await,
        Err(HubError::InvalidId("user"))
    ));
    assert!(matches!(
        hub.send_to_users(&["ok", "bad\u{0}"], note(1)).await,
        Err(HubError::InvalidId("user"))
    ));
    let many: Vec<String> = (0..10_001).map(|i| format!("u{i}")).collect();
    assert!(matches!(
        hub.send_to_users(&many, note(1)).await,
        Err(HubError::TooManyRecipients { max: 10_000 })
    ));
    assert!(matches!(
        hub.send_to_users(&["u"], Notification::new("", "t", "m"))
            .await,
        Err(HubError::InvalidNotification(_))
    ));
    assert!(matches!(
        hub.broadcast_to_group(&"g".repeat(129), note(1)).await,
        Err(HubError::InvalidId("group"))
    ));
    assert!(matches!(
        hub.join_group("g", "").await,
        Err(HubError::InvalidId("user"))
    ));
    assert!(matches!(
        hub.subscribe("", None).await,
        Err(HubError::InvalidId("user"))
    ));
    assert!(hub.history("u", 10).await.unwrap().is_empty());
    assert!(hub.history("ok", 10).await.unwrap().is_empty());
    assert_eq!(hub.stats().sends(), 0);
}

#[tokio::test]
async fn sender_supplied_id_and_timestamp_are_kept() {
    let hub = Hub::in_memory(HubConfig::default()).await.unwrap();
    let mut n = note(1);
    let id = uuid::Uuid::now_v7();
    n.id = Some(id);
    n.timestamp = Some("2026-11-24T22:00:00Z".parse().unwrap());
    let receipt = hub.send_to_users(&["u"], n.clone()).await.unwrap();
    assert_eq!(receipt.id, id);
    assert_eq!(hub.history("u", 1).await.unwrap()[0], n);
}

#[tokio::test]
async fn shutdown_flushes_queued_deliveries_then_refuses_sends() {
    let hub = Hub::in_memory(HubConfig::default()).await.unwrap();
    let mut sub = hub.subscribe("u", None).await.unwrap();
    let sends: Vec<_> = (1..=50)
        .map(|i| {
            let hub = hub.clone();
            tokio::spawn(async move { hub.send_to_users(&["u"], note(i)).await })
        })
        .collect();
    tokio::task::yield_now().await;
    assert!(hub.shutdown(Duration::from_secs(5)).await);
    let mut ok = 0;
    for s in sends {
        match s.await.unwrap() {
            Ok(_) => ok += 1,
            Err(HubError::ShutDown) => {}
            Err(e) => panic!("{e}"),
        }
    }
    // Every acknowledged send is stored and was delivered before the end.
    let mut got = 0;
    loop {
        match timeout(Duration::from_secs(5), sub.next()).await.unwrap() {
            Ok(_) => got += 1,
            Err(Closed::ShuttingDown) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(got, ok);
    assert_eq!(hub.history("u", 100).await.unwrap().len(), ok);
    assert!(matches!(
        hub.send_to_users(&["u"], note(0)).await,
        Err(HubError::ShutDown)
    ));
    assert!(matches!(
        hub.subscribe("u", None).await,
        Err(HubError::ShutDown)
    ));
}

#[tokio::test]
async fn a_since_or_resume_above_the_latest_seq_counts_as_the_latest() {
    let hub = Hub::in_memory(HubConfig::default()).await.unwrap();
    for i in 1..=57 {
        hub.send_to_users(&["u"], note(i)).await.unwrap();
    }
    // On subscribe.
    let mut sub = hub.subscribe("u", Some(1_000)).await.unwrap();
    assert_eq!(sub.last_seq(), 57);
    hub.send_to_users(&["u"], note(58)).await.unwrap();
    assert_eq!(next(&mut sub).await.seq, 58);
    // And by resume, the same way: nothing is skipped.
    sub.resume(1_000).await.unwrap();
    hub.send_to_users(&["u"], note(59)).await.unwrap();
    assert_eq!(next(&mut sub).await.seq, 59);
    assert!(sub.ack(59) && !sub.ack(60));
    // A resume within the stream still replays from there.
    sub.resume(57).await.unwrap();
    assert_eq!(next(&mut sub).await.seq, 58);
    assert_eq!(next(&mut sub).await.seq, 59);
}

#[tokio::test]
async fn stamps_come_from_the_configured_clock() {
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let clock = time_kit::ManualClock::new(start);
    let hub = Hub::in_memory(HubConfig::default().with_clock(Arc::new(clock.clone())))
        .await
        .unwrap();
    let first = hub.send_to_users(&["u"], note(1)).await.unwrap();
    clock.advance(Duration::from_millis(1_500));
    let second = hub.send_to_users(&["u"], note(2)).await.unwrap();
    assert_eq!(first.timestamp.to_rfc3339(), "2027-01-15T08:00:00+00:00");
    assert_eq!(
        second.timestamp.to_rfc3339(),
        "2027-01-15T08:00:01.500+00:00"
    );
    // The UUIDv7 ids carry the same time.
    let (secs, _) = second.id.get_timestamp().unwrap().to_unix();
    assert_eq!(secs, 1_800_000_001);
    assert!(first.id < second.id);
}

#[tokio::test]
async fn errors_say_what_kind_they_are() {
    use notify_hub::ErrorKind;
    let hub = Hub::in_memory(HubConfig::default()).await.unwrap();
    let empty: [&str; 0] = [];
    let e = hub.send_to_users(&empty, note(1)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    let e = hub
        .send_to_users(&["u"], Notification::new("", "t", "m"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    // The size limit that was broken is the source, not flattened into a string.
    let limit = std::error::Error::source(&e).expect("a source");
    assert!(
        limit
            .downcast_ref::<notify_hub::InvalidNotification>()
            .is_some()
    );
    let mut n = note(1);
    n.id = Some(uuid::Uuid::now_v7());
    hub.send_to_users(&["u"], n.clone()).await.unwrap();
    let e = hub.send_to_users(&["u"], n).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Duplicate);
    hub.shutdown(Duration::from_secs(5)).await;
    let e = hub.send_to_users(&["u"], note(2)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ShutDown);
}

#[tokio::test]
async fn a_repeated_id_is_refused_and_stored_once() {
    let hub = Hub::in_memory(HubConfig::default()).await.unwrap();
    let mut n = note(1);
    let id = uuid::Uuid::now_v7();
    n.id = Some(id);
    hub.send_to_users(&["u"], n.clone()).await.unwrap();
    assert!(matches!(hub.send_to_users(&["u"], n).await, Err(HubError::DuplicateId(d)) if d == id));
    hub.send_to_users(&["u"], note(2)).await.unwrap();
    let seqs: Vec<u64> = hub
        .deliveries("u", 10)
        .await
        .unwrap()
        .iter()
        .map(|d| d.seq)
        .collect();
    assert_eq!(seqs, [2, 1], "the duplicate used no seq");
}

#[tokio::test]
async fn deliveries_say_whether_they_came_live_or_from_the_store() {
    let hub = Hub::in_memory(HubConfig::default()).await.unwrap();
    hub.send_to_users(&["u"], note(1)).await.unwrap();
    let mut sub = hub.subscribe("u", Some(0)).await.unwrap();
    let replayed = next(&mut sub).await;
    hub.send_to_users(&["u"], note(2)).await.unwrap();
    let live = next(&mut sub).await;
    assert_eq!((replayed.seq, replayed.is_live()), (1, false));
    assert_eq!((live.seq, live.is_live()), (2, true));
    assert_eq!(
        live.notification_json(),
        serde_json::to_string(&*live.notification).unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_shutdowns_both_wait_for_the_flush() {
    let hub = Hub::in_memory(HubConfig::default()).await.unwrap();
    let mut sub = hub.subscribe("u", None).await.unwrap();
    for i in 1..=20 {
        hub.send_to_users(&["u"], note(i)).await.unwrap();
    }
    let (a, b) = tokio::join!(
        hub.shutdown(Duration::from_secs(5)),
        hub.shutdown(Duration::from_secs(5))
    );
    assert!(a && b);
    let mut got = 0;
    while let Ok(d) = timeout(Duration::from_secs(5), sub.next()).await.unwrap() {
        got += 1;
        assert_eq!(d.seq, got);
    }
    assert_eq!(got, 20);
}

#[tokio::test]
async fn an_oversized_group_broadcast_stores_nothing() {
    let hub = Hub::in_memory(HubConfig::default().with_max_group_recipients(2))
        .await
        .unwrap();
    for u in ["a", "b"] {
        hub.join_group("small", u).await.unwrap();
    }
    for u in ["a", "b", "c"] {
        hub.join_group("big", u).await.unwrap();
    }
    assert!(matches!(
        hub.broadcast_to_group("big", note(1)).await,
        Err(HubError::TooManyRecipients { max: 2 })
    ));
    assert_eq!(
        hub.broadcast_to_group("small", note(2))
            .await
            .unwrap()
            .recipients,
        2
    );
    assert!(hub.history("c", 10).await.unwrap().is_empty());
    assert_eq!(
        hub.deliveries("a", 10).await.unwrap()[0].seq,
        1,
        "the refused send used no seq"
    );
}
