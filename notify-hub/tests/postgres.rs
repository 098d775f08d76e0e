//! The PostgreSQL store against a real server, one fresh database per test.
#![cfg(feature = "postgres")]

use std::time::Duration;

use notify_hub::store::PgStore;
use notify_hub::{Hub, HubConfig, HubError, LocalBroker, Notification, Store};
use testkit::TestDatabase;

fn note(i: usize) -> Notification {
    Notification::new("test.event", format!("n{i}"), "body").with_data("i", i)
}

/// A hub on a freshly migrated store in `db`, with the local broker.
async fn hub(db: &TestDatabase) -> Hub {
    Hub::start(HubConfig::default(), store(db).await, LocalBroker::new())
        .await
        .unwrap()
}

async fn store(db: &TestDatabase) -> PgStore {
    let store = PgStore::connect(db.url(), 4).await.unwrap();
    assert_eq!(store.migrate().await.unwrap(), 4);
    assert_eq!(store.migrate().await.unwrap(), 0, "migrations run once");
    store
}

#[tokio::test]
async fn history_order_and_limit() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let hub = hub(&db).await;
    for i in 1..=120 {
        hub.send_to_users(&["alice", "bob"], note(i)).await.unwrap();
    }
    let recent = hub.deliveries("alice", 50).await.unwrap();
    assert_eq!(recent.len(), 50);
    assert_eq!(
        recent.iter().map(|d| d.seq).collect::<Vec<_>>(),
        (71..=120).rev().collect::<Vec<_>>()
    );
    assert_eq!(recent[0].notification.title, "n120");
    assert_eq!(recent[0].notification.data["i"], 120);
    let all = hub.history("bob", 1000).await.unwrap();
    assert_eq!(all.len(), 120);
    assert!(
        all.windows(2).all(|w| w[0].id > w[1].id),
        "UUIDv7 ids are time-ordered"
    );
}

#[tokio::test]
async fn groups_and_live_delivery_with_replay() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let hub = hub(&db).await;
    hub.join_group("g", "alice").await.unwrap();
    hub.join_group("g", "bob").await.unwrap();
    hub.send_to_users(&["alice"], note(0)).await.unwrap();
    let mut alice = hub.subscribe("alice", Some(0)).await.unwrap();
    assert_eq!(alice.latest_at_start(), 1);
    assert_eq!(
        hub.broadcast_to_group("g", note(1))
            .await
            .unwrap()
            .recipients,
        2
    );
    let first = alice.next().await.unwrap();
    let second = alice.next().await.unwrap();
    assert_eq!((first.seq, second.seq), (1, 2));
    assert_eq!(second.notification.title, "n1");
    assert!(hub.leave_group("g", "bob").await.unwrap());
    hub.broadcast_to_group("g", note(2)).await.unwrap();
    assert_eq!(hub.history("bob", 10).await.unwrap().len(), 1);
    assert_eq!(alice.next().await.unwrap().seq, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hubs_on_one_database_keep_per_user_sequences_contiguous() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let a = hub(&db).await;
    let b = Hub::start(
        HubConfig::default(),
        PgStore::connect(db.url(), 4).await.unwrap(),
        LocalBroker::new(),
    )
    .await
    .unwrap();
    let users: Vec<String> = (0..10).map(|i| format!("u{i}")).collect();
    let mut tasks = Vec::new();
    for t in 0..16 {
        let hub = if t % 2 == 0 { a.clone() } else { b.clone() };
        let users = users.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                // Overlapping recipient sets in different orders.
                let start = (t + i) % users.len();
                let mut set: Vec<&String> = users.iter().cycle().skip(start).take(4).collect();
                if t % 3 == 0 {
                    set.reverse();
                }
                hub.send_to_users(&set, note(i)).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut total = 0;
    for u in &users {
        let seqs: Vec<u64> = a
            .deliveries(u, 1000)
            .await
            .unwrap()
            .iter()
            .rev()
            .map(|d| d.seq)
            .collect();
        total += seqs.len();
        assert_eq!(
            seqs,
            (1..=seqs.len() as u64).collect::<Vec<_>>(),
            "user {u}"
        );
    }
    assert_eq!(total, 16 * 25 * 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_outage_fails_sends_and_loses_nothing_acknowledged() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let hub = hub(&db).await;
    let mut acknowledged = Vec::new();
    for i in 0..20 {
        hub.send_to_users(&["u"], note(i)).await.unwrap();
        acknowledged.push(format!("n{i}"));
    }
    // The outage: no new connections, existing ones killed.
    let name = db.name().to_owned();
    let mut config = db.config().clone();
    config.dbname("postgres");
    let (admin, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS false;
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = '{name}' AND pid <> pg_backend_pid();"
        ))
        .await
        .unwrap();
    let failed = tokio::time::timeout(Duration::from_secs(10), hub.send_to_users(&["u"], note(99)))
        .await
        .expect("a send during an outage returns instead of hanging");
    assert!(matches!(failed, Err(HubError::Store(_))), "{failed:?}");
    let join = tokio::time::timeout(Duration::from_secs(10), hub.join_group("g", "u"))
        .await
        .expect("a join during an outage returns instead of hanging");
    assert!(matches!(join, Err(HubError::Store(_))), "{join:?}");
    assert!(hub.ready().await.is_err());
    assert!(hub.stats().send_errors() >= 1);

    // Recovery.
    admin
        .batch_execute(&format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS true"))
        .await
        .unwrap();
    let mut ok = false;
    for _ in 0..50 {
        if hub.ready().await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "store came back");
    hub.send_to_users(&["u"], note(20)).await.unwrap();
    acknowledged.push("n20".into());
    let stored: Vec<String> = hub
        .history("u", 1000)
        .await
        .unwrap()
        .into_iter()
        .rev()
        .map(|n| n.title)
        .collect();
    assert_eq!(
        stored, acknowledged,
        "every acknowledged send, nothing else, in order"
    );
    let seqs: Vec<u64> = hub
        .deliveries("u", 1000)
        .await
        .unwrap()
        .iter()
        .map(|d| d.seq)
        .collect();
    assert_eq!(
        seqs,
        (1..=21).rev().collect::<Vec<_>>(),
        "the failed send used no seq"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_id_fails_only_that_send_even_inside_one_batch() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let hub = hub(&db).await;
    let id = uuid::Uuid::now_v7();
    let with_id = |title: &str| {
        let mut n = Notification::new("t", title, "m");
        n.id = Some(id);
        n
    };
    // Many concurrent sends, two of which carry the same id: they share
    // group-commit batches, and only the second of the pair is refused.
    let mut tasks = Vec::new();
    for i in 0..40 {
        let hub = hub.clone();
        let n = if i == 10 || i == 11 {
            with_id(&format!("dup{i}"))
        } else {
            note(i)
        };
        tasks.push(tokio::spawn(
            async move { hub.send_to_users(&["u"], n).await },
        ));
    }
    let mut ok = 0;
    let mut duplicates = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(HubError::DuplicateId(d)) => {
                assert_eq!(d, id);
                duplicates += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!((ok, duplicates), (39, 1));
    assert!(matches!(
        hub.send_to_users(&["u"], with_id("again")).await,
        Err(HubError::DuplicateId(_))
    ));
    let seqs: Vec<u64> = hub
        .deliveries("u", 100)
        .await
        .unwrap()
        .iter()
        .map(|d| d.seq)
        .collect();
    assert_eq!(seqs, (1..=39).rev().collect::<Vec<_>>());
}

#[tokio::test]
async fn an_oversized_group_broadcast_stores_nothing_and_spares_its_batch() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let config = HubConfig::default().with_max_group_recipients(2);
    let hub = Hub::start(config, store(&db).await, LocalBroker::new())
        .await
        .unwrap();
    for u in ["a", "b", "c"] {
        hub.join_group("big", u).await.unwrap();
    }
    // Concurrent with other sends, so they share a batch.
    let big = {
        let hub = hub.clone();
        tokio::spawn(async move { hub.broadcast_to_group("big", note(0)).await })
    };
    let small = {
        let hub = hub.clone();
        tokio::spawn(async move { hub.send_to_users(&["a", "c"], note(1)).await })
    };
    assert!(matches!(
        big.await.unwrap(),
        Err(HubError::TooManyRecipients { max: 2 })
    ));
    assert_eq!(small.await.unwrap().unwrap().recipients, 2);
    let c: Vec<String> = hub
        .history("c", 10)
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.title)
        .collect();
    assert_eq!(c, ["n1"]);
}

#[tokio::test]
async fn a_version_1_database_is_upgraded_in_place_and_keeps_its_sequences() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    // A deployment at schema version 1, with data.
    let client = db.connect().await;
    client
        .batch_execute(include_str!("../migrations/0001_init.sql"))
        .await
        .unwrap();
    client
        .batch_execute(
            "CREATE TABLE notify_schema_migrations (
                 version integer PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now());
             INSERT INTO notify_schema_migrations (version) VALUES (1);
             INSERT INTO notify_notifications VALUES
                 ('0192f0a0-0000-7000-8000-000000000001',
                  '{\"type\":\"old\",\"title\":\"before\",\"message\":\"m\"}', now());
             INSERT INTO notify_user_seqs VALUES ('alice', 3);
             INSERT INTO notify_deliveries VALUES
                 ('alice', 3, '0192f0a0-0000-7000-8000-000000000001');
             INSERT INTO notify_group_members (group_id, user_id) VALUES ('g', 'alice');",
        )
        .await
        .unwrap();
    let store = PgStore::connect(db.url(), 4).await.unwrap();
    assert_eq!(
        store.migrate().await.unwrap(),
        3,
        "only versions 2, 3 and 4 run"
    );
    // The existing member joined group g's stream at 0, whose head the
    // upgrade created (before any broadcast could).
    assert_eq!(store.group_heads(&["g".to_owned()]).await.unwrap(), vec![0]);
    assert_eq!(
        store.memberships("alice").await.unwrap(),
        vec![notify_hub::store::Membership {
            group: "g".to_owned(),
            joined_after: 0,
            left_after: None,
            head: 0,
        }]
    );
    let collations: Vec<(String, String, Option<String>)> = client
        .query(
            "SELECT table_name::text, column_name::text, collation_name::text
             FROM information_schema.columns
             WHERE table_name LIKE 'notify_%' AND data_type = 'text'
             ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    // 0001's four, and 0003's group streams: heads, items (group and
    // leaver) and past memberships (user and group).
    assert_eq!(collations.len(), 9, "{collations:?}");
    assert!(
        collations.iter().all(|(_, _, c)| c.as_deref() == Some("C")),
        "{collations:?}"
    );
    let hub = Hub::start(HubConfig::default(), store, LocalBroker::new())
        .await
        .unwrap();
    let receipt = hub.broadcast_to_group("g", note(1)).await.unwrap();
    assert_eq!(
        receipt.recipients, 1,
        "the member before the upgrade is in its group's count (schema 4)"
    );
    let seqs: Vec<(u64, String)> = hub
        .deliveries("alice", 10)
        .await
        .unwrap()
        .into_iter()
        .map(|d| (d.seq, d.notification.title.clone()))
        .collect();
    assert_eq!(seqs, vec![(4, "n1".to_owned()), (3, "before".to_owned())]);
    // The broadcast after the upgrade is the stream's offset 1.
    let reopened = PgStore::connect(db.url(), 2).await.unwrap();
    let items = reopened.group_since("g", 0, 10).await.unwrap();
    assert_eq!(items.iter().map(|i| i.offset).collect::<Vec<_>>(), vec![1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_outside_ascii_get_contiguous_sequences_in_mixed_batches() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let hub = hub(&db).await;
    // Byte order and a linguistic collation disagree on these.
    let users = ["émile", "Zoe", "adam", "ß", "Ådne", "zed", "ZZ", "a b"];
    for u in users {
        hub.join_group("g", u).await.unwrap();
    }
    // Direct and group sends at once, so they share batches.
    let mut tasks = Vec::new();
    for i in 0..30 {
        let hub = hub.clone();
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                hub.broadcast_to_group("g", note(i)).await
            } else {
                hub.send_to_users(&users[..1 + i % users.len()], note(i))
                    .await
            }
        }));
    }
    let mut expected = std::collections::HashMap::<&str, u64>::new();
    for (i, t) in tasks.into_iter().enumerate() {
        t.await.unwrap().unwrap();
        let reached: &[&str] = if i % 2 == 0 {
            &users
        } else {
            &users[..1 + i % users.len()]
        };
        for u in reached {
            *expected.entry(u).or_default() += 1;
        }
    }
    for u in users {
        let seqs: Vec<u64> = hub
            .deliveries(u, 100)
            .await
            .unwrap()
            .iter()
            .map(|d| d.seq)
            .collect();
        assert_eq!(seqs, (1..=expected[u]).rev().collect::<Vec<_>>(), "{u}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_joins_share_commits_and_each_pair_is_new_once() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let hub = hub(&db).await;
    hub.join_group("g0", "already").await.unwrap();
    // 100 distinct pairs over 4 groups, each asked for 3 times at once,
    // plus one pair that already exists.
    let mut tasks = Vec::new();
    for round in 0..3 {
        for i in 0..100 {
            let hub = hub.clone();
            tasks.push(tokio::spawn(async move {
                let group = format!("g{}", i % 4);
                let user = format!("u{i}");
                (round, hub.join_group(&group, &user).await.unwrap())
            }));
        }
        let hub = hub.clone();
        tasks.push(tokio::spawn(async move {
            (round, hub.join_group("g0", "already").await.unwrap())
        }));
    }
    let mut new = 0;
    for t in tasks {
        let (_, fresh) = t.await.unwrap();
        new += usize::from(fresh);
    }
    assert_eq!(new, 100, "each new pair reported new exactly once");
    // Every member, and only members, gets the broadcasts.
    let mut reached = 0;
    for g in 0..4 {
        reached += hub
            .broadcast_to_group(&format!("g{g}"), note(g))
            .await
            .unwrap()
            .recipients;
    }
    assert_eq!(reached, 101);
    assert!(
        !hub.join_group("g1", "u1").await.unwrap(),
        "already a member"
    );
    assert!(hub.leave_group("g1", "u1").await.unwrap());
    assert!(
        hub.join_group("g1", "u1").await.unwrap(),
        "new again after leaving"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_joining_the_same_pairs_in_opposite_orders_neither_fail_nor_double_count() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let a = hub(&db).await;
    let second = PgStore::connect(db.url(), 4).await.unwrap();
    assert_eq!(second.migrate().await.unwrap(), 0);
    let b = Hub::start(HubConfig::default(), second, LocalBroker::new())
        .await
        .unwrap();
    // Both nodes get the same 2,000 pairs at once, in opposite orders, so
    // their join batches overlap: no join may fail, and each pair is new on
    // exactly one node.
    let n = 2000;
    let pairs: Vec<(String, String)> = (0..n)
        .map(|i| (format!("g{}", i % 5), format!("u{i}")))
        .collect();
    let mut tasks = Vec::new();
    for i in 0..n {
        for (hub, (g, u)) in [(&a, &pairs[i]), (&b, &pairs[n - 1 - i])] {
            let (hub, g, u) = (hub.clone(), g.clone(), u.clone());
            tasks.push(tokio::spawn(async move { hub.join_group(&g, &u).await }));
        }
    }
    let mut new = 0;
    for t in tasks {
        new += usize::from(t.await.unwrap().expect("no join fails"));
    }
    assert_eq!(new, n, "each pair is new on exactly one node");
    let mut reached = 0;
    for g in 0..5 {
        reached += a
            .broadcast_to_group(&format!("g{g}"), note(g))
            .await
            .unwrap()
            .recipients;
    }
    assert_eq!(reached, n);
}

/// A column of an unexpected type (schema drift, a hand-made migration) is
/// a `Corrupt` store error with the decoding error as its source, never a
/// panic.
#[tokio::test]
async fn a_column_of_the_wrong_type_is_a_corrupt_error_not_a_panic() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let hub = hub(&db).await;
    hub.send_to_users(&["u"], note(1)).await.unwrap();
    let client = db.connect().await;
    let schema_drift = [
        "ALTER TABLE notify_user_seqs ALTER COLUMN last_seq TYPE int4",
        "ALTER TABLE notify_notifications ALTER COLUMN body TYPE text USING body::text",
    ];
    for sql in schema_drift {
        client.batch_execute(sql).await.unwrap();
    }
    for result in [
        // Reads notify_user_seqs.last_seq.
        hub.subscribe("u", None).await.map(drop),
        // Reads notify_notifications.body.
        hub.deliveries("u", 10).await.map(drop),
    ] {
        let e = result.unwrap_err();
        assert_eq!(e.kind(), notify_hub::ErrorKind::Corrupt, "{e:?}");
        let HubError::Store(store) = &e else {
            panic!("a store error: {e:?}");
        };
        let source = std::error::Error::source(store).expect("the decoding error is kept");
        assert!(
            source.downcast_ref::<tokio_postgres::Error>().is_some(),
            "{source:?}"
        );
    }
    // A replay reads the body too: the subscription ends with the store
    // error instead of panicking the connection's task.
    client
        .batch_execute("ALTER TABLE notify_user_seqs ALTER COLUMN last_seq TYPE int8")
        .await
        .unwrap();
    let mut sub = hub.subscribe("u", Some(0)).await.unwrap();
    match sub.next().await {
        Err(notify_hub::Closed::Store(e)) => {
            assert_eq!(e.kind(), notify_hub::ErrorKind::Corrupt)
        }
        other => panic!("expected a store error, got {other:?}"),
    }
}
