//! Write-through (ADR 0027) in the core, without a transport: a stream
//! subscription given a [`LiveWriter`] has live group items written to it
//! while it waits, and whatever the writer takes or refuses, every item is
//! handed out once, in order, by exactly one of the two ways.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use notify_hub::{
    Hub, HubConfig, LiveItem, LiveWriter, Notification, Position, StreamEvent, StreamSubscription,
};
use parking_lot::Mutex;
use tokio::sync::Notify;

/// How an item reached the subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    Written,
    Next,
}

/// A writer that takes an item when `accept` says so, and logs what it
/// took in the log the subscriber's reader appends to as well.
struct Recorder {
    log: Arc<Mutex<Vec<(Way, u64)>>>,
    accept: Box<dyn Fn(u64) -> bool + Send + Sync>,
    wrote: Notify,
}

impl LiveWriter for Recorder {
    fn try_write(&self, item: &LiveItem<'_>) -> bool {
        if !(self.accept)(item.offset) {
            return false;
        }
        // The shared rendering is the transport's to fill; the core passes
        // the item's JSON along.
        assert!(item.json.contains("\"title\""));
        self.log.lock().push((Way::Written, item.offset));
        self.wrote.notify_one();
        true
    }
}

fn note(title: &str) -> Notification {
    Notification::new("test.event", title, "body")
}

/// Reads `sub` until its log holds `total` items. A write through wakes
/// the reader (as a socket would the connection's task), which cancels its
/// wait in `next`, as the WebSocket loop's `select!` does.
async fn read_until(
    mut sub: StreamSubscription,
    writer: Arc<Recorder>,
    total: usize,
) -> StreamSubscription {
    while writer.log.lock().len() < total {
        tokio::select! {
            event = sub.next() => match event.expect("open") {
                StreamEvent::Group { offset, .. } => writer.log.lock().push((Way::Next, offset)),
                other => panic!("unexpected {other:?}"),
            },
            () = writer.wrote.notified() => {}
        }
    }
    sub
}

/// 1,100 subscribers of one group (enough for the hub to split the fan-out
/// among its workers), each with a writer that refuses a pseudo-random
/// third of the items; eight senders at once. Every subscriber gets offsets
/// 1..=n once each, in order, across both ways, and both ways were used.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_item_once_in_order_whatever_the_writer_takes() {
    let hub = Hub::in_memory(HubConfig::default()).await.unwrap();
    let members: Vec<String> = (0..1100).map(|i| format!("m{i}")).collect();
    for m in &members {
        hub.join_group("crowd", m).await.unwrap();
    }
    let (senders, each) = (8u64, 25u64);
    let total = (senders * each) as usize;
    let mut readers = Vec::new();
    for (i, m) in members.iter().enumerate() {
        let mut sub = hub.subscribe_streams(m, None).await.unwrap();
        let seed = i as u64;
        let writer = Arc::new(Recorder {
            log: Arc::default(),
            // Refuses offsets by a per-subscriber pattern: runs of refusals
            // and of acceptances of different lengths.
            accept: Box::new(move |offset| {
                !(offset.wrapping_mul(2_654_435_761) ^ seed).is_multiple_of(3)
            }),
            wrote: Notify::new(),
        });
        sub.write_live_through(writer.clone());
        readers.push(tokio::spawn(async move {
            let sub = read_until(sub, Arc::clone(&writer), total).await;
            let log = writer.log.lock().clone();
            (log, sub.position())
        }));
    }
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
    for t in tasks {
        t.await.unwrap();
    }
    let (mut written, mut next) = (0usize, 0usize);
    for r in readers {
        let (log, position) = tokio::time::timeout(Duration::from_secs(60), r)
            .await
            .expect("every reader done within 60 s")
            .unwrap();
        let offsets: Vec<u64> = log.iter().map(|(_, o)| *o).collect();
        assert_eq!(offsets, (1..=total as u64).collect::<Vec<_>>());
        written += log.iter().filter(|(w, _)| *w == Way::Written).count();
        next += log.iter().filter(|(w, _)| *w == Way::Next).count();
        assert_eq!(position.groups["crowd"], total as u64);
    }
    assert!(written > 0 && next > 0, "written {written}, next {next}");
    assert_eq!(hub.stats().delivered(), (members.len() * total) as u64);
}

/// Items written through are handed out: the position moves past them
/// (while the subscription waits and after), and a subscription started at
/// that position continues after them, with nothing read twice.
#[tokio::test]
async fn items_written_through_move_the_position() {
    // Without v1's copies, which would move the inbox seq too.
    let hub = Hub::in_memory(HubConfig::default().with_v1_group_fanout(false))
        .await
        .unwrap();
    hub.join_group("team", "ann").await.unwrap();
    let mut sub = hub.subscribe_streams("ann", None).await.unwrap();
    let writer = Arc::new(Recorder {
        log: Arc::default(),
        accept: Box::new(|_| true),
        wrote: Notify::new(),
    });
    sub.write_live_through(writer.clone());
    let reader = tokio::spawn(read_until(sub, Arc::clone(&writer), 3));
    // On this one-thread runtime the reader runs now, up to its wait in
    // `next`: parked before the first broadcast.
    tokio::task::yield_now().await;
    for i in 1..=3 {
        hub.broadcast_to_group("team", note(&format!("b{i}")))
            .await
            .unwrap();
    }
    let sub = reader.await.unwrap();
    // The first was written through; the others too, or handed out by
    // `next` if they came before the reader waited again.
    let log = writer.log.lock().clone();
    assert_eq!(log[0], (Way::Written, 1));
    assert_eq!(log.iter().map(|(_, o)| *o).collect::<Vec<_>>(), [1, 2, 3]);
    let position = sub.position();
    assert_eq!(
        position,
        Position {
            inbox: 0,
            groups: BTreeMap::from([("team".to_owned(), 3)]),
        }
    );
    drop(sub);

    // Without a writer now: from the position, the next item only.
    let mut again = hub.subscribe_streams("ann", Some(&position)).await.unwrap();
    hub.broadcast_to_group("team", note("b4")).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(5), again.next())
        .await
        .unwrap()
        .unwrap()
    {
        StreamEvent::Group { offset, .. } => assert_eq!(offset, 4),
        other => panic!("unexpected {other:?}"),
    }
}

/// A writer that takes everything and logs `group:offset`, beside what the
/// reader logs of the events `next` hands out.
struct Tagged {
    log: Arc<Mutex<Vec<String>>>,
    wrote: Notify,
}

impl LiveWriter for Tagged {
    fn try_write(&self, item: &LiveItem<'_>) -> bool {
        self.log
            .lock()
            .push(format!("{}:{}", item.group, item.offset));
        self.wrote.notify_one();
        true
    }
}

/// Membership changes while the subscription waits with a writer: the
/// leave record reaches it in its place, an item sent while the user is
/// out is neither written through nor handed out, and after a re-join the
/// group's items flow again, through the writer.
#[tokio::test]
async fn leaving_and_joining_again_while_parked() {
    let hub = Hub::in_memory(HubConfig::default().with_v1_group_fanout(false))
        .await
        .unwrap();
    hub.join_group("team", "ann").await.unwrap();
    hub.join_group("side", "ann").await.unwrap();
    let mut sub = hub.subscribe_streams("ann", None).await.unwrap();
    let writer = Arc::new(Tagged {
        log: Arc::default(),
        wrote: Notify::new(),
    });
    sub.write_live_through(writer.clone());
    let reader = {
        let writer = Arc::clone(&writer);
        tokio::spawn(async move {
            while writer.log.lock().len() < 5 {
                tokio::select! {
                    event = sub.next() => {
                        let line = match event.expect("open") {
                            StreamEvent::Group { group, offset, .. } => format!("{group}:{offset}"),
                            StreamEvent::Left { group, left_after } => format!("{group}:left@{left_after}"),
                            StreamEvent::Joined { group, joined_after } => format!("{group}:joined@{joined_after}"),
                            other => panic!("unexpected {other:?}"),
                        };
                        writer.log.lock().push(line);
                    }
                    () = writer.wrote.notified() => {}
                }
            }
            sub
        })
    };
    // One thread: the reader runs up to its wait before each change.
    tokio::task::yield_now().await;
    hub.broadcast_to_group("team", note("b1")).await.unwrap(); // team 1
    tokio::task::yield_now().await;
    hub.leave_group("team", "ann").await.unwrap(); // team 2: the record
    tokio::task::yield_now().await;
    hub.broadcast_to_group("team", note("b2")).await.unwrap(); // team 3: ann is out
    hub.broadcast_to_group("side", note("s1")).await.unwrap(); // side 1
    tokio::task::yield_now().await;
    hub.join_group("team", "ann").await.unwrap(); // after team 3
    tokio::task::yield_now().await;
    hub.broadcast_to_group("team", note("b3")).await.unwrap(); // team 4
    let sub = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect("the reader got five events")
        .unwrap();
    let log = writer.log.lock().clone();
    let of = |group: &str| -> Vec<String> {
        log.iter()
            .filter(|l| l.starts_with(&format!("{group}:")))
            .cloned()
            .collect()
    };
    assert_eq!(
        of("team"),
        ["team:1", "team:left@2", "team:joined@3", "team:4"],
        "{log:?}"
    );
    assert_eq!(of("side"), ["side:1"], "{log:?}");
    assert!(hub.stats().written_through() > 0, "{log:?}");
    let position = sub.position();
    assert_eq!(position.groups.get("team"), Some(&4));
    assert_eq!(position.groups.get("side"), Some(&1));
}
