//! A Redis that stops answering (CLIENT PAUSE) while a hub publishes: the
//! send is still stored and acknowledged, the publish fails within its
//! timeout, and the other hub's connection recovers the missed notification
//! from the store. In its own test binary: the pause affects every client.
#![cfg(feature = "redis")]

mod common;

use common::two_hubs;

use std::time::{Duration, Instant};

use fred::prelude::ClientLike;
use notify_hub::Notification;
use testkit::TestRedis;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_redis_delays_nothing_and_loses_nothing() {
    let Some(redis) = TestRedis::create().await else {
        return;
    };
    let (a, b) = two_hubs(&redis).await;
    let mut on_b = b.subscribe("u", None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let _: () = redis
        .client()
        .custom(fred::cmd!("CLIENT"), vec!["PAUSE", "2000", "ALL"])
        .await
        .unwrap();
    let started = Instant::now();
    let receipt = a
        .send_to_users(&["u"], Notification::new("t", "during", "m"))
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(receipt.recipients, 1);
    assert!(
        took < Duration::from_millis(1500),
        "the send waited {took:?} on Redis"
    );
    assert_eq!(a.stats().broker_errors(), 1);
    assert!(a.ready().await.is_err(), "readiness reports the broker");

    // After the pause: the next notification reveals the gap, which is
    // filled from the store.
    tokio::time::sleep(Duration::from_millis(2200).saturating_sub(started.elapsed())).await;
    let mut ok = false;
    for _ in 0..50 {
        if a.ready().await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "broker came back");
    a.send_to_users(&["u"], Notification::new("t", "after", "m"))
        .await
        .unwrap();
    for (seq, title) in [(1, "during"), (2, "after")] {
        let d = tokio::time::timeout(Duration::from_secs(5), on_b.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((d.seq, d.notification.title.as_str()), (seq, title));
    }
}
