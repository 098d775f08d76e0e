//! The PostgreSQL order store's group-committed transitions: concurrent
//! transitions of one shard go out in one statement, and each row is still
//! fenced by its own lease, with its log and stored answer written only
//! when its fence holds.
#![cfg(feature = "postgres")]

mod support;

use std::time::Duration;

use chrono::Utc;
use order_saga::order::StoreError;
use order_saga::order::store::postgres::PgOrderStore;
use order_saga::order::store::{
    Created, IdempotencyClaim, Lease, NewOrder, SagaUpdate, StoredResponse,
};
use order_saga::pg::{PoolConfig, pool};
use order_saga::saga::{Saga, Step};
use order_saga::{Order, OrderId, OrderState, OrderStore};
use support::*;
use testkit::TestDatabase;

fn new_order(i: usize) -> (Order, Saga, NewOrder) {
    let now = Utc::now();
    let request = cart(&[("SKU-1", 1)]);
    let order = Order {
        id: OrderId::new_at(now.timestamp_millis()),
        customer: customer("alice"),
        state: OrderState::Pending,
        items: request.items,
        lines: Vec::new(),
        total_cents: 0,
        currency: "EUR".into(),
        ship_to: request.ship_to,
        cancel_reason: None,
        payment_id: None,
        shipment_id: None,
        attention: None,
        created_at: now,
        updated_at: now,
    };
    let mut saga = Saga::new();
    saga.begin(Step::ReserveStock).unwrap();
    let new = NewOrder {
        order: order.clone(),
        saga,
        idempotency: Some(IdempotencyClaim {
            customer: customer("alice"),
            key: format!("key-{i}"),
            request_hash: [i as u8; 32],
            ttl: Duration::from_secs(3600),
        }),
        owner: "instance-a".into(),
        lease_for: Duration::from_secs(60),
        log: vec!["begin reserve_stock".into()],
    };
    (order, saga, new)
}

#[tokio::test]
async fn a_group_of_transitions_fences_each_row_by_its_own_lease() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let pool = pool(db.url(), &PoolConfig::default()).unwrap();
    // One shard: while the first transition is written, all the others
    // queue and go out together in the next statement.
    let store = PgOrderStore::with_batching(pool.clone(), 1, 64);
    store.migrate().await.unwrap();
    let mut orders = Vec::new();
    for i in 0..24 {
        let (order, saga, new) = new_order(i);
        let Created::New(lease) = store.create(new).await.unwrap() else {
            panic!("not created")
        };
        orders.push((order, saga, lease));
    }
    // Every fourth transition carries a stale token: it must lose its
    // lease, and only it.
    let updates: Vec<(Lease, SagaUpdate)> = orders
        .iter()
        .enumerate()
        .map(|(i, (order, saga, lease))| {
            let mut saga = *saga;
            saga.succeeded(Step::ReserveStock).unwrap();
            let mut order = order.clone();
            order.state = saga.state();
            order.total_cents = 100 + i as i64;
            let lease = if i % 4 == 0 {
                Lease {
                    owner: lease.owner.clone(),
                    token: lease.token + 1_000,
                }
            } else {
                lease.clone()
            };
            let update = SagaUpdate {
                order,
                saga,
                attempts: 0,
                events: Vec::new(),
                log: vec![format!("done reserve_stock {i}"), format!("note {i}")],
                response: Some(StoredResponse {
                    status: 201,
                    body: serde_json::json!({ "i": i }),
                }),
                release_after: None,
                cancel_applied: false,
            };
            (lease, update)
        })
        .collect();
    // A current-thread runtime polls the tasks in spawn order: the first
    // takes the shard and waits on the database, the rest queue behind it.
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (lease, update)) in updates.into_iter().enumerate() {
        let store = store.clone();
        tasks.spawn(async move { (i, store.update(&lease, update).await) });
    }
    let mut results: Vec<Option<Result<bool, StoreError>>> = (0..24).map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        let (i, result) = joined.unwrap();
        results[i] = Some(result);
    }
    let results: Vec<Result<bool, StoreError>> = results.into_iter().map(Option::unwrap).collect();
    for (i, result) in results.iter().enumerate() {
        let (order, _, _) = &orders[i];
        let record = store.load(order.id).await.unwrap().unwrap();
        let log = store.saga_log(order.id).await.unwrap();
        if i % 4 == 0 {
            assert!(
                matches!(result, Err(StoreError::LeaseLost(id)) if *id == order.id),
                "transition {i}: {result:?}"
            );
            assert_eq!(record.order.state, OrderState::Pending, "transition {i}");
            assert_eq!(log, vec!["begin reserve_stock".to_owned()]);
        } else {
            assert!(matches!(result, Ok(false)), "transition {i}: {result:?}");
            assert_eq!(record.order.state, OrderState::StockReserved);
            assert_eq!(record.order.total_cents, 100 + i as i64);
            assert_eq!(
                log,
                vec![
                    "begin reserve_stock".to_owned(),
                    format!("done reserve_stock {i}"),
                    format!("note {i}"),
                ],
                "transition {i}: its entries, in order"
            );
        }
    }
    // The stored answers: only the fenced-in transitions wrote theirs.
    let conn = pool.get().await.unwrap();
    let answered: Vec<String> = conn
        .query(
            "SELECT key FROM orders.idempotency_keys WHERE status = 201 ORDER BY key",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let mut expected: Vec<String> = (0..24)
        .filter(|i| i % 4 != 0)
        .map(|i| format!("key-{i}"))
        .collect();
    expected.sort();
    assert_eq!(answered, expected);
}

#[tokio::test]
async fn two_drivers_of_one_order_in_one_group_are_fenced_apart() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let pool = pool(db.url(), &PoolConfig::default()).unwrap();
    let store = PgOrderStore::with_batching(pool.clone(), 1, 64);
    store.migrate().await.unwrap();
    let mut orders = Vec::new();
    for i in 0..6 {
        let (order, saga, new) = new_order(100 + i);
        let Created::New(lease) = store.create(new).await.unwrap() else {
            panic!("not created")
        };
        orders.push((order, saga, lease));
    }
    let update = |order: &Order, saga: &Saga, note: &str| {
        let mut saga = *saga;
        saga.succeeded(Step::ReserveStock).unwrap();
        let mut order = order.clone();
        order.state = saga.state();
        SagaUpdate {
            order,
            saga,
            attempts: 0,
            events: Vec::new(),
            log: vec![note.to_owned()],
            response: None,
            release_after: None,
            cancel_applied: false,
        }
    };
    // The first transition takes the shard; behind it queue a stalled
    // driver of order 1 (a token it no longer holds), the current driver of
    // order 1, and the others.
    let (o0, s0, l0) = &orders[0];
    let (o1, s1, l1) = &orders[1];
    let stale = Lease {
        owner: l1.owner.clone(),
        token: l1.token - 1,
    };
    let mut writes: Vec<(Lease, SagaUpdate)> = vec![
        (l0.clone(), update(o0, s0, "first")),
        (stale, update(o1, s1, "stale driver")),
        (l1.clone(), update(o1, s1, "current driver")),
    ];
    for (o, s, l) in &orders[2..] {
        writes.push((l.clone(), update(o, s, "other")));
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (lease, update)) in writes.into_iter().enumerate() {
        let store = store.clone();
        tasks.spawn(async move { (i, store.update(&lease, update).await) });
    }
    let mut results: Vec<Option<Result<bool, StoreError>>> = (0..7).map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        let (i, result) = joined.unwrap();
        results[i] = Some(result);
    }
    assert!(
        matches!(results[1], Some(Err(StoreError::LeaseLost(_)))),
        "{:?}",
        results[1]
    );
    for (i, result) in results.iter().enumerate().filter(|(i, _)| *i != 1) {
        assert!(matches!(result, Some(Ok(false))), "write {i}: {result:?}");
    }
    assert_eq!(
        store.saga_log(o1.id).await.unwrap(),
        vec![
            "begin reserve_stock".to_owned(),
            "current driver".to_owned()
        ],
        "only the current driver's entries are written"
    );
}
