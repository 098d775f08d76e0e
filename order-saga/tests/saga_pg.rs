//! The order saga on PostgreSQL (every service's store in its own schema of
//! one test database): the happy path, no oversell under 1,000 concurrent
//! orders, a 10,000-order sweep with payment failures and unknown outcomes
//! reconciled against the simulator's ledger, an outage, and the takeover
//! of a crashed instance's sagas.
#![cfg(feature = "postgres")]

mod support;

use std::sync::Arc;
use std::time::Duration;

use order_saga::inventory::Inventory;
use order_saga::inventory::postgres::PgInventory;
use order_saga::order::store::postgres::PgOrderStore;
use order_saga::payment::resilient::{ResilientConfig, ResilientPayments};
use order_saga::payment::sim::{SimConfig, Simulator};
use order_saga::pg::{PoolConfig, pool};
use order_saga::shipping::Shipping;
use order_saga::shipping::postgres::PgShipping;
use order_saga::{
    CancelReason, CreateOutcome, OrderConfig, OrderError, OrderId, OrderService, OrderState,
    Services,
};
use support::*;
use testkit::TestDatabase;

struct World {
    service: OrderService,
    inventory: Arc<PgInventory>,
    shipping: Arc<PgShipping>,
    sim: Arc<Simulator>,
    store: PgOrderStore,
}

async fn world(db_url: &str, sim: Arc<Simulator>, config: OrderConfig) -> World {
    let clock = time_kit::system();
    let pool = pool(
        db_url,
        // A long wait for a connection: the tests push far more concurrent
        // orders than the pool has connections.
        &PoolConfig {
            max_size: 12,
            connection_timeout: Duration::from_secs(60),
            ..PoolConfig::default()
        },
    )
    .unwrap();
    let store = PgOrderStore::new(pool.clone());
    store.migrate().await.unwrap();
    let inventory = Arc::new(PgInventory::new(pool.clone(), clock.clone()));
    inventory.migrate().await.unwrap();
    let shipping = Arc::new(PgShipping::new(
        pool.clone(),
        Default::default(),
        clock.clone(),
    ));
    shipping.migrate().await.unwrap();
    let payments = ResilientPayments::new(sim.clone(), ResilientConfig::default()).unwrap();
    let services = Services {
        inventory: inventory.clone(),
        payments: Arc::new(payments),
        shipping: shipping.clone(),
    };
    let service = OrderService::new(Arc::new(store.clone()), services, config, clock);
    World {
        service,
        inventory,
        shipping,
        sim,
        store,
    }
}

fn fast_config() -> OrderConfig {
    OrderConfig {
        // The provider answers at once here, so every saga in flight wants
        // the database: keep them within a few per connection.
        max_concurrent_sagas: 48,
        max_concurrent_creates: 32,
        poll_interval: Duration::from_millis(20),
        retry_base: Duration::from_millis(2),
        retry_max: Duration::from_millis(50),
        ..OrderConfig::default()
    }
}

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_on_postgres_is_confirmed_and_logged() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let w = world(
        db.url(),
        Arc::new(Simulator::new(SimConfig::default()).unwrap()),
        fast_config(),
    )
    .await;
    let running = w.service.start();
    let inventory: Arc<dyn Inventory> = w.inventory.clone();
    stock(&inventory, "SKU-1", 10, 500).await;
    let alice = customer("alice");
    let CreateOutcome::Created(order) = w
        .service
        .create_order(&alice, cart(&[("SKU-1", 3)]), "k")
        .await
        .unwrap()
    else {
        panic!("not created")
    };
    assert_eq!(order.state, OrderState::StockReserved);
    let order = settled(&w.service, order.id, WAIT).await;
    assert_eq!(order.state, OrderState::Confirmed);
    let level = inventory.stock(&sku("SKU-1")).await.unwrap();
    assert_eq!(
        (level.available, level.reserved, level.committed),
        (7, 0, 3)
    );
    let log = w.store.saga_log(order.id).await.unwrap();
    assert_eq!(
        log.first().map(String::as_str),
        Some("begin reserve_stock (compensation: release_stock)")
    );
    assert!(log.iter().any(|e| e == "done capture_payment"), "{log:?}");
    // Every compensation was recorded before its step ran.
    for step in [
        "authorize_payment",
        "schedule_shipment",
        "commit_stock",
        "capture_payment",
    ] {
        let begun = log
            .iter()
            .position(|e| e.starts_with(&format!("begin {step}")))
            .unwrap();
        let done = log
            .iter()
            .position(|e| e == &format!("done {step}"))
            .unwrap();
        assert!(begun < done, "{step}: {log:?}");
    }
    // Replays survive in the database; listing pages by key.
    let replay = w
        .service
        .create_order(&alice, cart(&[("SKU-1", 3)]), "k")
        .await
        .unwrap();
    assert!(
        matches!(replay, CreateOutcome::Replayed(ref s) if s.status == 201 && s.body["id"] == order.id.to_string())
    );
    assert!(matches!(
        w.service
            .create_order(&alice, cart(&[("SKU-1", 1)]), "k")
            .await,
        Err(OrderError::KeyReused)
    ));
    for i in 0..4 {
        let CreateOutcome::Created(_) = w
            .service
            .create_order(&alice, cart(&[("SKU-1", 1)]), &format!("p{i}"))
            .await
            .unwrap()
        else {
            panic!()
        };
    }
    let first = w.service.list_orders(&alice, None, 3).await.unwrap();
    assert_eq!(first.orders.len(), 3);
    let second = w.service.list_orders(&alice, first.next, 3).await.unwrap();
    assert_eq!(second.orders.len(), 2);
    assert!(second.next.is_none());
    let mut all: Vec<OrderId> = first
        .orders
        .iter()
        .chain(&second.orders)
        .map(|o| o.id)
        .collect();
    assert!(all.windows(2).all(|w| w[0] > w[1]), "newest first");
    all.dedup();
    assert_eq!(all.len(), 5);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_orders_confirm_exactly_the_hundred_in_stock() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let w = world(
        db.url(),
        Arc::new(Simulator::new(SimConfig::default()).unwrap()),
        fast_config(),
    )
    .await;
    let running = w.service.start();
    let inventory: Arc<dyn Inventory> = w.inventory.clone();
    stock(&inventory, "HOT", 100, 100).await;
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let service = w.service.clone();
        tasks.push(tokio::spawn(async move {
            service
                .create_order(&customer(&format!("b{i}")), cart(&[("HOT", 1)]), "k")
                .await
        }));
    }
    let mut ids = Vec::new();
    let mut refused = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(CreateOutcome::Created(order)) => ids.push(order.id),
            Ok(CreateOutcome::OutOfStock(_)) => refused += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((ids.len(), refused), (100, 900));
    let orders = all_settled(&w.service, &ids, WAIT).await;
    assert!(orders.iter().all(|o| o.state == OrderState::Confirmed));
    let level = inventory.stock(&sku("HOT")).await.unwrap();
    assert_eq!(
        (level.available, level.reserved, level.committed),
        (0, 0, 100)
    );
    running.shutdown().await;
}

/// 10,000 orders, 30% of authorizations declined and 10% of payment replies
/// lost: every saga ends, and nothing is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_orders_with_payment_failures_roll_back_completely() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let sim = SimConfig::default()
        .with_decline_rate(0.3)
        .with_lost_reply_rate(0.1);
    let sim = Arc::new(Simulator::with_seed(sim, 42).unwrap());
    let w = world(db.url(), sim, fast_config()).await;
    let running = w.service.start();
    let inventory: Arc<dyn Inventory> = w.inventory.clone();
    let skus = 50;
    for s in 0..skus {
        stock(&inventory, &format!("S{s}"), 1_000, 100 + s).await;
    }
    let total = 10_000;
    let concurrency = 64;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let service = w.service.clone();
        let next = next.clone();
        workers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    return ids;
                }
                let a = format!("S{}", i % skus as usize);
                let b = format!("S{}", (i * 7 + 3) % skus as usize);
                let items: Vec<(&str, u32)> = if a == b {
                    vec![(&a, 1)]
                } else {
                    vec![(&a, 1), (&b, 2)]
                };
                // A client retries 409 request_in_progress and 503 (the
                // inventory, or the order store: a pool checkout that timed
                // out on a loaded machine) with the same key, as the API
                // tells it to.
                let who = customer(&format!("c{}", i % 500));
                let key = format!("k{i}");
                let mut outcome = service.create_order(&who, cart(&items), &key).await;
                while matches!(
                    outcome,
                    Err(OrderError::KeyInFlight
                        | OrderError::InventoryUnavailable(_)
                        | OrderError::Store(_))
                ) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    outcome = service.create_order(&who, cart(&items), &key).await;
                }
                let id =
                    |stored: &order_saga::order::store::StoredResponse, field: &str| -> OrderId {
                        stored.body[field].as_str().unwrap().parse().unwrap()
                    };
                match outcome {
                    Ok(CreateOutcome::Created(order)) => ids.push(order.id),
                    Ok(CreateOutcome::Replayed(stored)) if stored.status == 201 => {
                        ids.push(id(&stored, "id"))
                    }
                    Ok(CreateOutcome::OutOfStock(stored) | CreateOutcome::Replayed(stored)) => {
                        ids.push(id(&stored, "order_id"))
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        }));
    }
    let mut ids = Vec::new();
    for worker in workers {
        ids.extend(worker.await.unwrap());
    }
    assert_eq!(ids.len(), total);
    let orders = all_settled(&w.service, &ids, Duration::from_secs(300)).await;
    let confirmed: Vec<_> = orders
        .iter()
        .filter(|o| o.state == OrderState::Confirmed)
        .collect();
    let cancelled: Vec<_> = orders
        .iter()
        .filter(|o| o.state == OrderState::Cancelled)
        .collect();
    assert_eq!(
        confirmed.len() + cancelled.len(),
        total,
        "none needs attention"
    );
    assert!(
        cancelled
            .iter()
            .any(|o| o.cancel_reason == Some(CancelReason::PaymentDeclined))
    );
    // Stock: what confirmed orders bought is committed; nothing is reserved.
    let mut bought = vec![0i64; skus as usize];
    for order in &confirmed {
        for line in &order.lines {
            bought[line.sku.as_str()[1..].parse::<usize>().unwrap()] += i64::from(line.quantity);
        }
    }
    for s in 0..skus {
        let level = inventory.stock(&sku(&format!("S{s}"))).await.unwrap();
        assert_eq!(level.reserved, 0, "orphaned reservation of S{s}");
        assert_eq!(level.committed, bought[s as usize], "S{s}");
        assert_eq!(level.available + level.committed, 1_000, "S{s}");
    }
    // Payments, reconciled against the provider's ledger.
    let mut captured_total = 0;
    let mut by_order: std::collections::HashMap<OrderId, Vec<order_saga::payment::Payment>> =
        std::collections::HashMap::new();
    for entry in w.sim.entries() {
        by_order
            .entry(entry.payment.order_id)
            .or_default()
            .push(entry.payment);
    }
    for order in &orders {
        let payments = by_order.get(&order.id).cloned().unwrap_or_default();
        assert!(
            payments.len() <= 1,
            "double charge for {}: {payments:?}",
            order.id
        );
        let payment = payments.first();
        match order.state {
            OrderState::Confirmed => {
                let payment = payment.expect("a confirmed order was paid");
                assert_eq!(payment.state, order_saga::payment::PaymentState::Captured);
                assert_eq!(payment.amount_cents, order.total_cents);
                captured_total += payment.amount_cents;
                assert!(
                    w.shipping
                        .shipment(order.id)
                        .await
                        .unwrap()
                        .is_some_and(|s| s.state == order_saga::shipping::ShipmentState::Scheduled)
                );
            }
            _ => {
                if let Some(payment) = payment {
                    assert!(
                        !matches!(
                            payment.state,
                            order_saga::payment::PaymentState::Authorized
                                | order_saga::payment::PaymentState::Captured
                        ),
                        "cancelled order {} left its payment {:?}",
                        order.id,
                        payment.state
                    );
                }
                assert!(
                    w.shipping
                        .shipment(order.id)
                        .await
                        .unwrap()
                        .is_none_or(|s| s.state == order_saga::shipping::ShipmentState::Cancelled),
                    "shipment for cancelled order {}",
                    order.id
                );
            }
        }
    }
    assert_eq!(
        w.sim.ledger().net_charged_cents(),
        captured_total,
        "the ledger agrees"
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_postgres_down_creates_fail_with_nothing_half_written() {
    // A pool pointing at a port where nothing listens.
    let sim = Arc::new(Simulator::new(SimConfig::default()).unwrap());
    let url = "postgres://postgres@127.0.0.1:1/none";
    let dead = pool(
        url,
        &PoolConfig {
            connection_timeout: Duration::from_millis(300),
            ..PoolConfig::default()
        },
    )
    .unwrap();
    let clock = time_kit::system();
    let inventory = Arc::new(order_saga::inventory::memory::MemoryInventory::new(
        clock.clone(),
    ));
    let dyn_inventory: Arc<dyn Inventory> = inventory.clone();
    stock(&dyn_inventory, "SKU-1", 5, 100).await;
    let services = Services {
        inventory: inventory.clone(),
        payments: Arc::new(
            ResilientPayments::new(sim.clone(), ResilientConfig::default()).unwrap(),
        ),
        shipping: Arc::new(order_saga::shipping::memory::MemoryShipping::default()),
    };
    let service = OrderService::new(
        Arc::new(PgOrderStore::new(dead)),
        services,
        fast_config(),
        clock,
    );
    let outcome = service
        .create_order(&customer("z"), cart(&[("SKU-1", 1)]), "k")
        .await;
    assert!(matches!(outcome, Err(OrderError::Store(_))), "{outcome:?}");
    assert_eq!(outcome.unwrap_err().code(), "database_unavailable");
    assert!(service.ready().await.is_err());
    let level = inventory.stock_now(&sku("SKU-1")).unwrap();
    assert_eq!(
        (level.available, level.reserved),
        (5, 0),
        "nothing reserved"
    );
    assert!(sim.entries().is_empty(), "nothing charged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_instances_sagas_are_taken_over_after_its_lease() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    // Instance A: payments take 2 s, so its runtime dies mid-authorization.
    let slow = Arc::new(
        Simulator::new(
            SimConfig::default().with_latency(Duration::from_secs(2), Duration::from_secs(2)),
        )
        .unwrap(),
    );
    let a_config = OrderConfig {
        instance_id: "a".into(),
        lease: Duration::from_millis(500),
        ..fast_config()
    };
    let db_url = db.url().to_owned();
    let ids = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let ids = runtime.block_on(async {
            let a = world(&db_url, slow, a_config).await;
            let inventory: Arc<dyn Inventory> = a.inventory.clone();
            stock(&inventory, "SKU-1", 10, 100).await;
            let mut ids = Vec::new();
            for i in 0..5 {
                let CreateOutcome::Created(order) = a
                    .service
                    .create_order(&customer("q"), cart(&[("SKU-1", 1)]), &format!("k{i}"))
                    .await
                    .unwrap()
                else {
                    panic!()
                };
                ids.push(order.id);
            }
            ids
        });
        // The crash: every task of instance A stops where it is.
        runtime.shutdown_timeout(Duration::ZERO);
        ids
    })
    .join()
    .unwrap();
    let sim = Arc::new(Simulator::new(SimConfig::default()).unwrap());
    let b = world(
        db.url(),
        sim,
        OrderConfig {
            instance_id: "b".into(),
            ..fast_config()
        },
    )
    .await;
    let before = b.service.get_order(ids[0]).await.unwrap().unwrap();
    assert!(!before.state.is_terminal(), "A stopped mid-saga");
    let running = b.service.start();
    let orders = all_settled(&b.service, &ids, WAIT).await;
    assert!(
        orders.iter().all(|o| o.state == OrderState::Confirmed),
        "{:?}",
        orders.iter().map(|o| o.state).collect::<Vec<_>>()
    );
    assert!(b.service.stats().snapshot().resumed >= 5);
    running.shutdown().await;
}
