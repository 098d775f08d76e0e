//! Proves the isolation testkit promises, against the real servers.

use std::sync::Arc;

use fred::prelude::KeysInterface;
use testkit::{TestDatabase, TestRedis};
use tokio::sync::Barrier;

const TABLE: &str = "CREATE TABLE items (owner text NOT NULL, n int NOT NULL)";

/// Writes `rows` rows tagged `owner` into `items`, waiting at `barrier` so the
/// two writers are guaranteed to overlap, then returns the owners it can see.
async fn write_and_read(
    db: &TestDatabase,
    owner: &str,
    rows: i32,
    barrier: &Barrier,
) -> Vec<(String, i64)> {
    let client = db.connect().await;
    client.batch_execute(TABLE).await.unwrap();
    barrier.wait().await;
    for n in 0..rows {
        client
            .execute(
                "INSERT INTO items (owner, n) VALUES ($1, $2)",
                &[&owner, &n],
            )
            .await
            .unwrap();
    }
    barrier.wait().await;
    client
        .query(
            "SELECT owner, count(*) FROM items GROUP BY owner ORDER BY owner",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_databases_writing_the_same_table_in_parallel_are_isolated() {
    let Some(a) = TestDatabase::create().await else {
        return;
    };
    let Some(b) = TestDatabase::create().await else {
        return;
    };
    assert_ne!(a.name(), b.name());
    let barrier = Arc::new(Barrier::new(2));
    let (seen_a, seen_b) = tokio::join!(
        write_and_read(&a, "a", 25, &barrier),
        write_and_read(&b, "b", 40, &barrier)
    );
    assert_eq!(seen_a, vec![("a".to_owned(), 25)]);
    assert_eq!(seen_b, vec![("b".to_owned(), 40)]);
}

// The next two are separate #[tokio::test]s writing the same table name; the
// test harness runs them on parallel threads. Each sees only its own rows.
async fn lone_writer(owner: &str, rows: i32) {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let seen = write_and_read(&db, owner, rows, &Barrier::new(1)).await;
    assert_eq!(seen, vec![(owner.to_owned(), i64::from(rows))]);
}

#[tokio::test]
async fn parallel_test_one_sees_only_its_rows() {
    lone_writer("one", 30).await;
}

#[tokio::test]
async fn parallel_test_two_sees_only_its_rows() {
    lone_writer("two", 17).await;
}

#[tokio::test]
async fn dropping_the_database_removes_it_from_the_server() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let name = db.name().to_owned();
    let Some(probe) = TestDatabase::create().await else {
        return;
    };
    let client = probe.connect().await;
    let exists = "SELECT count(*) FROM pg_database WHERE datname = $1";
    let before: i64 = client.query_one(exists, &[&name]).await.unwrap().get(0);
    assert_eq!(before, 1);
    // A leaked connection must not keep the database alive.
    let _leaked = db.connect().await;
    drop(db);
    let after: i64 = client.query_one(exists, &[&name]).await.unwrap().get(0);
    assert_eq!(after, 0);
}

#[tokio::test]
async fn url_and_config_point_at_the_test_database() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let (client, conn) = tokio_postgres::connect(db.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let current: String = client
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(current, db.name());
}

#[tokio::test]
async fn redis_prefixes_are_isolated_and_cleaned_up() {
    let Some(a) = TestRedis::create().await else {
        return;
    };
    let Some(b) = TestRedis::create().await else {
        return;
    };
    assert_ne!(a.prefix(), b.prefix());
    let _: () = a
        .client()
        .set(a.key("counter"), 1, None, None, false)
        .await
        .unwrap();
    let _: () = b
        .client()
        .set(b.key("counter"), 2, None, None, false)
        .await
        .unwrap();
    let _: () = b
        .client()
        .set(b.key("other"), 3, None, None, false)
        .await
        .unwrap();
    let a_val: i64 = a.client().get(a.key("counter")).await.unwrap();
    let b_val: i64 = b.client().get(b.key("counter")).await.unwrap();
    assert_eq!((a_val, b_val), (1, 2));
    assert_eq!(a.count_keys().await, 1);
    assert_eq!(b.count_keys().await, 2);

    let b_prefix_probe = b.client().clone();
    let b_key = b.key("other");
    drop(b);
    let gone: Option<i64> = b_prefix_probe.get(&b_key).await.unwrap();
    assert_eq!(gone, None, "dropping TestRedis deletes its keys");
    // a is untouched by b's cleanup.
    assert_eq!(a.count_keys().await, 1);
}
