//! Group streams in the store (ADR 0026, schema 0003): every broadcast gets
//! the next offset of its group, joins start at the head, leaves are
//! recorded in the stream and kept as intervals. The same checks run on the
//! memory store and on PostgreSQL (a fresh database per test, skipped
//! without a server unless REQUIRE_SERVICES=1).

use std::sync::Arc;

use notify_hub::store::{Append, Audience, GroupEntry, GroupItem, HistoryItem, Membership};
use notify_hub::{Appended, MemoryStore, Notification, Store};
use uuid::Uuid;

fn broadcast(group: &str, title: &str) -> Append {
    let mut n = Notification::new("test.event", title, "body");
    n.id = Some(Uuid::now_v7());
    n.timestamp = Some(chrono::Utc::now());
    Append {
        audience: Audience::Group(group.to_owned()),
        notification: Arc::new(n),
        max_recipients: 10_000,
        fan_out: true,
    }
}

/// What a stream holds, readably: the broadcast's title or `-user` for a
/// leave record, with its offset.
fn shown(items: &[GroupItem]) -> Vec<(u64, String)> {
    items
        .iter()
        .map(|i| {
            let what = match &i.entry {
                GroupEntry::Notification(n) => n.title.clone(),
                GroupEntry::Left { user_id } => format!("-{user_id}"),
                other => panic!("unexpected {other:?}"),
            };
            (i.offset, what)
        })
        .collect()
}

fn membership(group: &str, joined_after: u64, left_after: Option<u64>, head: u64) -> Membership {
    Membership {
        group: group.to_owned(),
        joined_after,
        left_after,
        head,
    }
}

/// The life of one group: joins at the head, broadcasts numbered 1, 2, …
/// with no hole, a leave recorded at its own offset, a second interval
/// after re-joining, v1's fan-out unchanged beside it.
async fn one_group_over_its_life(store: &dyn Store) {
    let g = "team".to_owned();
    assert_eq!(
        store.group_heads(std::slice::from_ref(&g)).await.unwrap(),
        vec![0]
    );
    assert_eq!(store.join_group("team", "ann").await.unwrap(), Some(0));
    assert!(
        store.join_group("team", "ann").await.unwrap().is_none(),
        "joined once"
    );
    assert_eq!(store.join_group("team", "bob").await.unwrap(), Some(0));

    let out = store
        .append(&[broadcast("team", "b1"), broadcast("team", "b2")])
        .await
        .unwrap();
    // Each broadcast gets its offset, and v1's per-member delivery rows are
    // still written.
    for (appended, expected) in out.iter().zip([1, 2]) {
        let Appended::Broadcast {
            recipients, offset, ..
        } = appended
        else {
            panic!("{appended:?}");
        };
        assert_eq!(*offset, expected);
        assert_eq!(recipients.len(), 2);
    }
    assert_eq!(store.leave_group("team", "bob").await.unwrap(), Some(3));
    assert!(
        store.leave_group("team", "bob").await.unwrap().is_none(),
        "left once"
    );
    store.append(&[broadcast("team", "b4")]).await.unwrap();
    assert_eq!(store.join_group("team", "bob").await.unwrap(), Some(4));
    store.append(&[broadcast("team", "b5")]).await.unwrap();

    assert_eq!(
        store.group_heads(std::slice::from_ref(&g)).await.unwrap(),
        vec![5]
    );
    let all = store.group_since("team", 0, 100).await.unwrap();
    assert_eq!(
        shown(&all),
        vec![
            (1, "b1".to_owned()),
            (2, "b2".to_owned()),
            (3, "-bob".to_owned()),
            (4, "b4".to_owned()),
            (5, "b5".to_owned()),
        ]
    );
    // Paging: after an offset, at most `limit`, oldest first.
    assert_eq!(
        shown(&store.group_since("team", 1, 2).await.unwrap()),
        vec![(2, "b2".to_owned()), (3, "-bob".to_owned())]
    );
    assert!(store.group_since("team", 5, 10).await.unwrap().is_empty());
    assert!(store.group_since("nobody", 0, 10).await.unwrap().is_empty());

    // Bob: (0, 3] and then after 4; Ann: after 0; the head read with them.
    assert_eq!(
        store.memberships("bob").await.unwrap(),
        vec![
            membership("team", 0, Some(3), 5),
            membership("team", 4, None, 5)
        ]
    );
    assert_eq!(
        store.memberships("ann").await.unwrap(),
        vec![membership("team", 0, None, 5)]
    );
    assert!(store.memberships("zed").await.unwrap().is_empty());

    // v1: bob's deliveries are b1, b2 and b5 (not b4, sent while out),
    // each marked as a group's copy; a direct send is not.
    let mut direct = Notification::new("test.event", "d1", "body");
    direct.id = Some(Uuid::now_v7());
    store
        .append(&[Append {
            audience: Audience::Users(vec!["bob".to_owned()]),
            notification: Arc::new(direct),
            max_recipients: 10_000,
            fan_out: true,
        }])
        .await
        .unwrap();
    let bob: Vec<(String, bool)> = store
        .since("bob", 0, 100)
        .await
        .unwrap()
        .iter()
        .map(|d| (d.notification.title.clone(), d.is_via_group()))
        .collect();
    let expected = [("b1", true), ("b2", true), ("b5", true), ("d1", false)];
    assert_eq!(bob, expected.map(|(t, v)| (t.to_owned(), v)));
    let newest = store.history("bob", 1).await.unwrap();
    assert!(!newest[0].is_via_group(), "history reads the mark too");

    // Bob's history across his streams: his direct send and the group's
    // sends inside his two intervals (not b4, nor the leave record), newest
    // first; a limit keeps the newest.
    let history: Vec<String> = store
        .stream_history("bob", 10)
        .await
        .unwrap()
        .iter()
        .map(|item| match item {
            HistoryItem::Inbox(d) => format!("inbox:{}:{}", d.seq, d.notification.title),
            HistoryItem::Group {
                group,
                offset,
                notification,
            } => format!("{group}:{offset}:{}", notification.title),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        history,
        ["inbox:4:d1", "team:5:b5", "team:2:b2", "team:1:b1"]
    );
    // The page keeps the newest across the streams, whichever they are in.
    let newest_two: Vec<String> = store
        .stream_history("bob", 2)
        .await
        .unwrap()
        .iter()
        .map(|item| item.notification().title.clone())
        .collect();
    assert_eq!(newest_two, ["d1", "b5"]);
    assert!(store.stream_history("zed", 10).await.unwrap().is_empty());

    // Heads of several groups, in the order asked; unknown ones at 0.
    store.append(&[broadcast("other", "o1")]).await.unwrap();
    let asked = ["other".to_owned(), "none".to_owned(), "team".to_owned()];
    assert_eq!(store.group_heads(&asked).await.unwrap(), vec![1, 0, 5]);
}

/// A duplicate send takes no offset: the stream stays without holes.
async fn a_duplicate_takes_no_offset(store: &dyn Store) {
    store.join_group("dup", "ann").await.unwrap();
    let first = broadcast("dup", "d1");
    let again = first.clone();
    let out = store.append(&[first, again]).await.unwrap();
    assert!(matches!(out[1], Appended::DuplicateId), "{out:?}");
    store.append(&[broadcast("dup", "d2")]).await.unwrap();
    assert_eq!(
        shown(&store.group_since("dup", 0, 10).await.unwrap()),
        vec![(1, "d1".to_owned()), (2, "d2".to_owned())]
    );
}

/// One batch with broadcasts to several groups, interleaved: each group
/// numbers its own in batch order. A group too big for its send stores
/// nothing and takes no offset.
async fn mixed_batches_and_refused_sends(store: &dyn Store) {
    store.join_group("g1", "ann").await.unwrap();
    store.join_group("g2", "ann").await.unwrap();
    let out = store
        .append(&[
            broadcast("g1", "x1"),
            broadcast("g2", "y1"),
            broadcast("g1", "x2"),
        ])
        .await
        .unwrap();
    let offsets: Vec<u64> = out
        .iter()
        .map(|a| match a {
            Appended::Broadcast { offset, .. } => *offset,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(offsets, [1, 1, 2]);
    let mut too_big = broadcast("g1", "big");
    too_big.max_recipients = 0;
    let out = store
        .append(&[too_big, broadcast("g1", "x3")])
        .await
        .unwrap();
    assert!(matches!(out[0], Appended::TooManyRecipients), "{out:?}");
    assert!(
        matches!(out[1], Appended::Broadcast { offset: 3, .. }),
        "{out:?}"
    );
    assert_eq!(
        shown(&store.group_since("g1", 0, 10).await.unwrap()),
        vec![
            (1, "x1".to_owned()),
            (2, "x2".to_owned()),
            (3, "x3".to_owned())
        ]
    );
}

/// A group send without v1's copies: one stream item, no seq and no
/// delivery row for anyone, the member count still answered, and the size
/// limit (a v1 fan-out's) not applied.
async fn a_send_without_fan_out_writes_only_its_item(store: &dyn Store) {
    for u in ["qa", "qb", "qc"] {
        store.join_group("quiet", u).await.unwrap();
    }
    let mut send = broadcast("quiet", "q1");
    send.fan_out = false;
    send.max_recipients = 1;
    let out = store.append(&[send]).await.unwrap();
    let Appended::Broadcast {
        recipients,
        offset,
        members,
    } = &out[0]
    else {
        panic!("{out:?}");
    };
    assert!(recipients.is_empty());
    assert_eq!((*offset, *members), (1, 3));
    assert_eq!(store.last_seq("qa").await.unwrap(), 0, "no seq taken");
    assert!(store.since("qa", 0, 10).await.unwrap().is_empty());
    assert_eq!(
        shown(&store.group_since("quiet", 0, 10).await.unwrap()),
        vec![(1, "q1".to_owned())]
    );
}

#[tokio::test]
async fn memory_store_group_streams() {
    let store = MemoryStore::new();
    one_group_over_its_life(&store).await;
    a_duplicate_takes_no_offset(&store).await;
    mixed_batches_and_refused_sends(&store).await;
    a_send_without_fan_out_writes_only_its_item(&store).await;
}

/// The memory store keeps its retention per group: older items are gone,
/// and a read after a trimmed offset starts at the oldest kept.
#[tokio::test]
async fn the_memory_store_trims_a_stream_to_its_retention() {
    let store = MemoryStore::with_retention(2);
    store.join_group("g", "ann").await.unwrap();
    for i in 1..=4 {
        store
            .append(&[broadcast("g", &format!("t{i}"))])
            .await
            .unwrap();
    }
    assert_eq!(
        shown(&store.group_since("g", 0, 10).await.unwrap()),
        vec![(3, "t3".to_owned()), (4, "t4".to_owned())]
    );
    assert_eq!(
        shown(&store.group_since("g", 3, 10).await.unwrap()),
        vec![(4, "t4".to_owned())]
    );
    assert_eq!(store.group_heads(&["g".to_owned()]).await.unwrap(), vec![4]);
}

#[cfg(feature = "postgres")]
mod postgres {
    use std::collections::BTreeSet;

    use notify_hub::store::PgStore;
    use testkit::TestDatabase;

    use super::*;

    async fn store(db: &TestDatabase) -> PgStore {
        let store = PgStore::connect(db.url(), 8).await.unwrap();
        assert_eq!(store.migrate().await.unwrap(), 4);
        store
    }

    #[tokio::test]
    async fn postgres_group_streams() {
        let Some(db) = TestDatabase::create().await else {
            return;
        };
        let store = store(&db).await;
        one_group_over_its_life(&store).await;
        a_duplicate_takes_no_offset(&store).await;
        mixed_batches_and_refused_sends(&store).await;
        a_send_without_fan_out_writes_only_its_item(&store).await;
    }

    /// Two nodes (two stores, each with its own membership writer) join
    /// and leave overlapping users of one group at once: no batch deadlocks
    /// on the group's head, and the member count a broadcast reports is
    /// the number of members left.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_nodes_changing_one_group_keep_its_member_count() {
        let Some(db) = TestDatabase::create().await else {
            return;
        };
        let first = Arc::new(store(&db).await);
        let second = Arc::new(PgStore::connect(db.url(), 8).await.unwrap());
        let mut tasks = Vec::new();
        for (node, store) in [(0, &first), (1, &second)] {
            for part in 0..4 {
                let store = Arc::clone(store);
                tasks.push(tokio::spawn(async move {
                    // Users 0..300 from both nodes (half of them twice),
                    // then every tenth left again by its node.
                    for i in (part * 75 + node * 40)..(part * 75 + node * 40 + 75) {
                        store.join_group("crowd", &format!("u{i}")).await.unwrap();
                    }
                    for i in (part * 75 + node * 40)..(part * 75 + node * 40 + 75) {
                        if i % 10 == 0 {
                            store.leave_group("crowd", &format!("u{i}")).await.unwrap();
                        }
                    }
                }));
            }
        }
        for t in tasks {
            t.await.unwrap();
        }
        let joined: BTreeSet<usize> = (0..2)
            .flat_map(|node| {
                (0..4).flat_map(move |part| (part * 75 + node * 40)..(part * 75 + node * 40 + 75))
            })
            .collect();
        let expected = joined.iter().filter(|i| *i % 10 != 0).count();
        let mut send = broadcast("crowd", "count");
        send.fan_out = false;
        let out = first.append(&[send]).await.unwrap();
        let Appended::Broadcast { members, .. } = &out[0] else {
            panic!("{out:?}");
        };
        assert_eq!(*members, expected);
        // And the fan-out's own read agrees.
        let out = second
            .append(&[broadcast("crowd", "fanned")])
            .await
            .unwrap();
        let Appended::Broadcast {
            recipients,
            members,
            ..
        } = &out[0]
        else {
            panic!("{out:?}");
        };
        assert_eq!((recipients.len(), *members), (expected, expected));
    }

    /// Many writers at once on one group (broadcasts in batches, joins and
    /// leaves of other users): the offsets are exactly 1..=n with no hole
    /// and no duplicate, each broadcast has one, and every interval is
    /// consistent with the leave records.
    #[tokio::test]
    async fn concurrent_writers_keep_a_groups_offsets_contiguous() {
        let Some(db) = TestDatabase::create().await else {
            return;
        };
        let store = Arc::new(store(&db).await);
        store.join_group("busy", "anchor").await.unwrap();
        let mut tasks = Vec::new();
        for w in 0..8 {
            let store = Arc::clone(&store);
            tasks.push(tokio::spawn(async move {
                let mut sends = Vec::new();
                for i in 0..15 {
                    let batch: Vec<Append> = (0..3)
                        .map(|j| broadcast("busy", &format!("w{w}-{i}-{j}")))
                        .collect();
                    let titles: Vec<String> =
                        batch.iter().map(|a| a.notification.title.clone()).collect();
                    let out = store.append(&batch).await.unwrap();
                    for (title, appended) in titles.into_iter().zip(out) {
                        let Appended::Broadcast {
                            recipients,
                            offset,
                            members,
                        } = appended
                        else {
                            panic!("{appended:?}");
                        };
                        let users: BTreeSet<String> =
                            recipients.into_iter().map(|r| r.user_id).collect();
                        // The count kept by schema 4's triggers, read under
                        // the head lock, is the fan-out's size.
                        assert_eq!(members, users.len(), "{title} at {offset}");
                        sends.push((title, offset, users));
                    }
                    // Its own user, and one shared by every writer: a join
                    // and a leave of the same pair race each other.
                    for user in [format!("u{w}"), "shared".to_owned()] {
                        if (i + w) % 2 == 0 {
                            store.join_group("busy", &user).await.unwrap();
                        } else {
                            store.leave_group("busy", &user).await.unwrap();
                        }
                    }
                }
                sends
            }));
        }
        let mut sends = Vec::new();
        for t in tasks {
            sends.extend(t.await.unwrap());
        }
        // v1's fan-out and the intervals agree: each broadcast went to
        // exactly the users whose interval covers its offset.
        let mut users: Vec<String> = (0..8).map(|w| format!("u{w}")).collect();
        users.extend(["shared".to_owned(), "anchor".to_owned()]);
        let mut intervals = Vec::new();
        for user in &users {
            for m in store.memberships(user).await.unwrap() {
                intervals.push((user.clone(), m));
            }
        }
        for (title, offset, recipients) in &sends {
            let covering: BTreeSet<String> = intervals
                .iter()
                .filter(|(_, m)| {
                    m.joined_after < *offset && m.left_after.is_none_or(|l| *offset <= l)
                })
                .map(|(u, _)| u.clone())
                .collect();
            assert_eq!(recipients, &covering, "{title} at {offset}");
        }
        let sent: BTreeSet<String> = sends.iter().map(|(t, _, _)| t.clone()).collect();
        let items = store.group_since("busy", 0, 10_000).await.unwrap();
        let offsets: Vec<u64> = items.iter().map(|i| i.offset).collect();
        let n = items.len() as u64;
        assert_eq!(offsets, (1..=n).collect::<Vec<_>>(), "contiguous");
        let heads = store.group_heads(&["busy".to_owned()]).await.unwrap();
        assert_eq!(heads, vec![n]);
        let mut broadcasts = BTreeSet::new();
        let mut leaves = Vec::new();
        for item in &items {
            match &item.entry {
                GroupEntry::Notification(note) => {
                    assert!(broadcasts.insert(note.title.clone()), "once");
                }
                GroupEntry::Left { user_id } => leaves.push((user_id.clone(), item.offset)),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(broadcasts, sent, "every broadcast, once");
        // Every leave that found a member is a record.
        for user in &users {
            let user = user.clone();
            let intervals = store.memberships(&user).await.unwrap();
            let closed: Vec<&Membership> = intervals
                .iter()
                .filter(|m| m.left_after.is_some())
                .collect();
            let recorded: Vec<u64> = leaves
                .iter()
                .filter(|(u, _)| *u == user)
                .map(|(_, o)| *o)
                .collect();
            assert_eq!(
                closed
                    .iter()
                    .filter_map(|m| m.left_after)
                    .collect::<Vec<_>>(),
                recorded,
                "{user}: each closed interval ends at its leave record"
            );
            // Intervals do not overlap, and each starts before its end.
            let mut end = 0;
            for m in &intervals {
                assert!(m.joined_after >= end, "{user}: {intervals:?}");
                if let Some(left) = m.left_after {
                    assert!(left > m.joined_after);
                    end = left;
                }
            }
        }
    }
}

/// The broker message of a group send carries its stream position; a
/// direct send's does not; and a message from a node that does not know
/// the key (no `"g"`) still reads, as a send with no group.
#[tokio::test]
async fn a_hub_publishes_each_group_sends_offset() {
    use notify_hub::store::BoxFuture;
    use notify_hub::{Broker, BrokerError, BrokerEvent, GroupOffset, Hub, HubConfig, Published};

    #[derive(Default)]
    struct Capture(parking_lot::Mutex<Vec<Arc<Published>>>);
    impl Broker for Capture {
        fn publish(&self, message: Arc<Published>) -> BoxFuture<'_, Result<(), BrokerError>> {
            self.0.lock().push(message);
            Box::pin(async { Ok(()) })
        }
        fn subscribe(
            &self,
            _sink: tokio::sync::mpsc::Sender<BrokerEvent>,
        ) -> BoxFuture<'_, Result<(), BrokerError>> {
            Box::pin(async { Ok(()) })
        }
        fn ping(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
            Box::pin(async { Ok(()) })
        }
    }

    let capture = Arc::new(Capture::default());
    let hub = Hub::start(
        HubConfig::default(),
        MemoryStore::new(),
        Arc::clone(&capture),
    )
    .await
    .unwrap();
    hub.join_group("team", "ann").await.unwrap();
    for i in 0..3 {
        hub.broadcast_to_group("team", Notification::new("t", format!("b{i}"), "m"))
            .await
            .unwrap();
    }
    hub.send_to_users(&["ann"], Notification::new("t", "direct", "m"))
        .await
        .unwrap();
    let published = capture.0.lock().clone();
    let groups: Vec<Option<GroupOffset>> = published.iter().map(|p| p.group.clone()).collect();
    let at = |offset| {
        Some(GroupOffset {
            group: "team".to_owned(),
            offset,
        })
    };
    assert_eq!(groups, vec![at(1), at(2), at(3), None]);

    let json = serde_json::to_value(&*published[0]).unwrap();
    assert_eq!(json["g"], serde_json::json!({"g": "team", "k": 1}));
    assert!(
        serde_json::to_value(&*published[3])
            .unwrap()
            .get("g")
            .is_none()
    );
    let mut old = json.clone();
    old.as_object_mut().unwrap().remove("g");
    let read: Published = serde_json::from_value(old).unwrap();
    assert_eq!(read.group, None);
    assert_eq!(read.recipients, published[0].recipients);
}
