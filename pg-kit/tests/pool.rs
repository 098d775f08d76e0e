//! The pool against a real server: statements are prepared once per
//! connection, and a connection whose session ended is not handed out
//! again.

use pg_kit::{PoolConfig, Prepared, pool};
use testkit::TestDatabase;
use tokio_postgres::types::Type;

#[tokio::test]
async fn a_statement_is_prepared_once_per_connection() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let pool = pool(
        db.url(),
        &PoolConfig {
            max_size: 1,
            ..PoolConfig::default()
        },
    )
    .unwrap();
    for n in 0..5i64 {
        let conn = pool.get().await.unwrap();
        let row = conn
            .query_prepared_one("SELECT $1::int8 * 2", &[(&n, Type::INT8)])
            .await
            .unwrap();
        assert_eq!(row.get::<_, i64>(0), n * 2);
    }
    let conn = pool.get().await.unwrap();
    let prepared: i64 = conn
        .query_one(
            "SELECT count(*) FROM pg_prepared_statements WHERE statement = 'SELECT $1::int8 * 2'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(prepared, 1);
}

#[tokio::test]
async fn a_connection_whose_session_ended_is_not_pooled_again() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let pool = pool(
        db.url(),
        &PoolConfig {
            max_size: 1,
            ..PoolConfig::default()
        },
    )
    .unwrap();
    let pid: i32 = {
        let conn = pool.get().await.unwrap();
        conn.query_prepared_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0)
    };
    let admin = db.connect().await;
    let ended: bool = admin
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap()
        .get(0);
    assert!(ended);
    // The next call on that connection fails (the session is gone)...
    {
        let conn = pool.get().await.unwrap();
        let error = conn
            .query_prepared_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap_err();
        assert!(pg_kit::ends_session(&error), "{error:?}");
    }
    // ...and the pool then opens a new one instead of handing it out again.
    let conn = pool.get().await.unwrap();
    let fresh: i32 = conn
        .query_prepared_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(fresh, pid);
}
