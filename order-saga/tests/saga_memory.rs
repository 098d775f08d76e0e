//! The order saga end to end, every service in memory: the happy path,
//! each rollback, idempotency, cancellation, NeedsAttention, and no
//! oversell under concurrency.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use order_saga::inventory::Inventory;
use order_saga::inventory::memory::MemoryInventory;
use order_saga::order::store::memory::MemoryOrderStore;
use order_saga::payment::resilient::{ResilientConfig, ResilientPayments};
use order_saga::payment::sim::{SimConfig, Simulator};
use order_saga::shipping::memory::MemoryShipping;
use order_saga::shipping::{ScheduleShipment, Shipment, Shipping, ShippingError};
use order_saga::{
    BoxFuture, CancelReason, CreateOutcome, OrderConfig, OrderError, OrderId, OrderService,
    OrderState, Services,
};
use support::*;

struct World {
    service: OrderService,
    store: Arc<MemoryOrderStore>,
    inventory: Arc<dyn Inventory>,
    sim: Arc<Simulator>,
    shipping: Arc<dyn Shipping>,
}

fn world_with(sim: SimConfig, shipping: Arc<dyn Shipping>, config: OrderConfig) -> World {
    world_clocked(sim, shipping, config, time_kit::system())
}

/// `inventory_clock` drives the reservations' expiry.
fn world_clocked(
    sim: SimConfig,
    shipping: Arc<dyn Shipping>,
    config: OrderConfig,
    inventory_clock: time_kit::SharedClock,
) -> World {
    let clock = time_kit::system();
    let sim = Arc::new(Simulator::with_seed(sim, 7).unwrap());
    let payments = ResilientPayments::new(sim.clone(), ResilientConfig::default()).unwrap();
    let inventory: Arc<dyn Inventory> = Arc::new(MemoryInventory::new(inventory_clock));
    let services = Services {
        inventory: inventory.clone(),
        payments: Arc::new(payments),
        shipping: shipping.clone(),
    };
    let store = Arc::new(MemoryOrderStore::new(clock.clone()));
    let service = OrderService::new(store.clone(), services, config, clock);
    World {
        service,
        store,
        inventory,
        sim,
        shipping,
    }
}

fn world(sim: SimConfig) -> World {
    world_with(sim, Arc::new(MemoryShipping::default()), fast_config())
}

fn fast_config() -> OrderConfig {
    OrderConfig {
        poll_interval: Duration::from_millis(10),
        retry_base: Duration::from_millis(1),
        retry_max: Duration::from_millis(20),
        ..OrderConfig::default()
    }
}

const WAIT: Duration = Duration::from_secs(10);

async fn created(outcome: Result<CreateOutcome, OrderError>) -> order_saga::Order {
    match outcome {
        Ok(CreateOutcome::Created(order)) => *order,
        other => panic!("expected 201, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_is_confirmed_with_stock_sold_and_payment_captured() {
    let w = world(SimConfig::default());
    let running = w.service.start();
    stock(&w.inventory, "SKU-1", 10, 1250).await;
    let alice = customer("alice");
    let order = created(
        w.service
            .create_order(&alice, cart(&[("SKU-1", 2)]), "k1")
            .await,
    )
    .await;
    assert_eq!(
        order.state,
        OrderState::StockReserved,
        "201 means the stock is reserved"
    );
    assert_eq!(order.total_cents, 2500);
    let order = settled(&w.service, order.id, WAIT).await;
    assert_eq!(order.state, OrderState::Confirmed);
    assert!(order.payment_id.is_some() && order.shipment_id.is_some());
    let level = w.inventory.stock(&sku("SKU-1")).await.unwrap();
    assert_eq!(
        (level.available, level.reserved, level.committed),
        (8, 0, 2)
    );
    let ledger = w.sim.ledger();
    assert_eq!(w.sim.authorizations_for_order(order.id), 1);
    assert_eq!(ledger.net_charged_cents(), 2500);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_payment_rolls_back_completely() {
    let w = world(SimConfig::default().with_decline_rate(1.0));
    let running = w.service.start();
    stock(&w.inventory, "SKU-1", 5, 100).await;
    let order = created(
        w.service
            .create_order(&customer("bob"), cart(&[("SKU-1", 3)]), "k")
            .await,
    )
    .await;
    let order = settled(&w.service, order.id, WAIT).await;
    assert_eq!(order.state, OrderState::Cancelled);
    assert_eq!(order.cancel_reason, Some(CancelReason::PaymentDeclined));
    let level = w.inventory.stock(&sku("SKU-1")).await.unwrap();
    assert_eq!(
        (level.available, level.reserved, level.committed),
        (5, 0, 0),
        "stock released"
    );
    assert_eq!(w.sim.ledger().net_charged_cents(), 0);
    assert!(
        w.shipping
            .shipment(order.id)
            .await
            .unwrap()
            .is_none_or(|s| s.state == order_saga::shipping::ShipmentState::Cancelled)
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_stock_is_answered_409_and_recorded_cancelled() {
    let w = world(SimConfig::default());
    stock(&w.inventory, "SKU-1", 1, 100).await;
    let outcome = w
        .service
        .create_order(&customer("c"), cart(&[("SKU-1", 2)]), "k")
        .await
        .unwrap();
    let CreateOutcome::OutOfStock(stored) = outcome else {
        panic!("expected out of stock, got {outcome:?}")
    };
    assert_eq!(stored.status, 409);
    assert_eq!(stored.body["error"], "out_of_stock");
    let id: OrderId = stored.body["order_id"].as_str().unwrap().parse().unwrap();
    let running = w.service.start();
    let order = settled(&w.service, id, WAIT).await;
    assert_eq!(
        (order.state, order.cancel_reason),
        (OrderState::Cancelled, Some(CancelReason::OutOfStock))
    );
    running.shutdown().await;
    // The same key replays the same answer.
    let again = w
        .service
        .create_order(&customer("c"), cart(&[("SKU-1", 2)]), "k")
        .await
        .unwrap();
    assert_eq!(again, CreateOutcome::Replayed(stored));
    assert_eq!(w.inventory.stock(&sku("SKU-1")).await.unwrap().available, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_writes_nothing() {
    let w = world(SimConfig::default());
    stock(&w.inventory, "SKU-1", 1, 100).await;
    let dana = customer("dana");
    let unknown = w
        .service
        .create_order(&dana, cart(&[("SKU-1", 1), ("NOPE", 1)]), "k")
        .await;
    assert!(
        matches!(unknown, Err(OrderError::UnknownSku(ref s)) if s == "NOPE"),
        "{unknown:?}"
    );
    let empty = w.service.create_order(&dana, cart(&[]), "k2").await;
    assert!(matches!(empty, Err(OrderError::Invalid(_))));
    let zero = w
        .service
        .create_order(&dana, cart(&[("SKU-1", 0)]), "k3")
        .await;
    assert_eq!(zero.unwrap_err().code(), "invalid_quantity");
    let bad_key = w
        .service
        .create_order(&dana, cart(&[("SKU-1", 1)]), "")
        .await;
    assert!(matches!(bad_key, Err(OrderError::InvalidIdempotencyKey)));
    assert!(
        w.service
            .list_orders(&dana, None, 10)
            .await
            .unwrap()
            .orders
            .is_empty(),
        "nothing written"
    );
    assert_eq!(
        w.inventory.stock(&sku("SKU-1")).await.unwrap().available,
        1,
        "nothing reserved"
    );
    // The key of the refused request is free again.
    created(
        w.service
            .create_order(&dana, cart(&[("SKU-1", 1)]), "k")
            .await,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_have_stripe_semantics() {
    let w = world(SimConfig::default());
    stock(&w.inventory, "SKU-1", 100, 100).await;
    let erin = customer("erin");
    let first = created(
        w.service
            .create_order(&erin, cart(&[("SKU-1", 1)]), "same")
            .await,
    )
    .await;
    match w
        .service
        .create_order(&erin, cart(&[("SKU-1", 1)]), "same")
        .await
        .unwrap()
    {
        CreateOutcome::Replayed(stored) => {
            assert_eq!(stored.status, 201);
            assert_eq!(stored.body["id"], first.id.to_string());
        }
        other => panic!("expected a replay, got {other:?}"),
    }
    let reused = w
        .service
        .create_order(&erin, cart(&[("SKU-1", 2)]), "same")
        .await;
    assert!(matches!(reused, Err(OrderError::KeyReused)));
    // Keys are per customer.
    created(
        w.service
            .create_order(&customer("frank"), cart(&[("SKU-1", 1)]), "same")
            .await,
    )
    .await;
    // Concurrent requests with one key create one order.
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let service = w.service.clone();
        tasks.push(tokio::spawn(async move {
            service
                .create_order(&customer("gina"), cart(&[("SKU-1", 1)]), "race")
                .await
        }));
    }
    let mut ids = std::collections::HashSet::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(CreateOutcome::Created(order)) => {
                ids.insert(order.id.to_string());
            }
            Ok(CreateOutcome::Replayed(stored)) => {
                ids.insert(stored.body["id"].as_str().unwrap().to_owned());
            }
            Err(OrderError::KeyInFlight) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(ids.len(), 1, "one order for one key: {ids:?}");
    assert_eq!(
        w.service
            .list_orders(&customer("gina"), None, 100)
            .await
            .unwrap()
            .orders
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_compensates_what_has_run() {
    // Payment is slow, so the cancel lands while the saga is mid-way.
    let w = world(
        SimConfig::default().with_latency(Duration::from_millis(200), Duration::from_millis(200)),
    );
    let running = w.service.start();
    stock(&w.inventory, "SKU-1", 10, 100).await;
    let hana = customer("hana");
    let order = created(
        w.service
            .create_order(&hana, cart(&[("SKU-1", 4)]), "k")
            .await,
    )
    .await;
    let cancelled = w.service.cancel_order(&hana, order.id).await.unwrap();
    assert!(
        matches!(
            cancelled.state,
            OrderState::Compensating | OrderState::Cancelled
        ),
        "{:?}",
        cancelled.state
    );
    let order = settled(&w.service, order.id, WAIT).await;
    assert_eq!(
        (order.state, order.cancel_reason),
        (OrderState::Cancelled, Some(CancelReason::CustomerRequested))
    );
    let level = w.inventory.stock(&sku("SKU-1")).await.unwrap();
    assert_eq!(
        (level.available, level.reserved, level.committed),
        (10, 0, 0)
    );
    assert_eq!(w.sim.ledger().net_charged_cents(), 0);
    for payment in w.sim.payments_for_order(order.id) {
        assert_ne!(
            payment.state,
            order_saga::payment::PaymentState::Authorized,
            "authorization left held: {:?}",
            w.store.saga_log(order.id)
        );
    }
    // Another customer cannot cancel (or see) it; a confirmed order cannot be cancelled.
    assert!(matches!(
        w.service.cancel_order(&customer("ivan"), order.id).await,
        Err(OrderError::NotFound)
    ));
    let other = created(
        w.service
            .create_order(&hana, cart(&[("SKU-1", 1)]), "k2")
            .await,
    )
    .await;
    settled(&w.service, other.id, WAIT).await;
    assert!(matches!(
        w.service.cancel_order(&hana, other.id).await,
        Err(OrderError::NotCancellable(_))
    ));
    running.shutdown().await;
}

/// Shipping whose cancel fails while `broken` is set.
struct FlakyShipping {
    inner: MemoryShipping,
    broken: AtomicBool,
}

impl Shipping for FlakyShipping {
    fn schedule(
        &self,
        request: ScheduleShipment,
    ) -> BoxFuture<'_, Result<Shipment, ShippingError>> {
        self.inner.schedule(request)
    }
    fn cancel(&self, order_id: OrderId) -> BoxFuture<'_, Result<Shipment, ShippingError>> {
        if self.broken.load(Ordering::SeqCst) {
            return Box::pin(async { Err(ShippingError::Unavailable("carrier API down".into())) });
        }
        self.inner.cancel(order_id)
    }
    fn shipment(
        &self,
        order_id: OrderId,
    ) -> BoxFuture<'_, Result<Option<Shipment>, ShippingError>> {
        self.inner.shipment(order_id)
    }
}

/// A world whose payments take 100 ms and whose inventory runs on a manual
/// clock: a test moves the reservations past their expiry while the
/// payment is in flight.
fn expiring_world(shipping: Arc<dyn Shipping>) -> (World, Arc<time_kit::ManualClock>) {
    let clock = Arc::new(time_kit::ManualClock::new(std::time::SystemTime::now()));
    let config = OrderConfig {
        reservation_ttl: Duration::from_secs(60),
        ..fast_config()
    };
    let slow =
        SimConfig::default().with_latency(Duration::from_millis(100), Duration::from_millis(100));
    (world_clocked(slow, shipping, config, clock.clone()), clock)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_that_completes_after_the_reservation_expired_is_voided() {
    let (w, clock) = expiring_world(Arc::new(MemoryShipping::default()));
    let running = w.service.start();
    stock(&w.inventory, "SKU-1", 3, 100).await;
    let order = created(
        w.service
            .create_order(&customer("pia"), cart(&[("SKU-1", 2)]), "k")
            .await,
    )
    .await;
    // The authorization is in flight (100 ms): the reservation lapses.
    clock.advance(Duration::from_secs(61));
    let order = settled(&w.service, order.id, WAIT).await;
    assert_eq!(
        (order.state, order.cancel_reason),
        (
            OrderState::Cancelled,
            Some(CancelReason::ReservationExpired)
        )
    );
    let payments = w.sim.payments_for_order(order.id);
    assert_eq!(payments.len(), 1, "authorized once");
    assert_eq!(
        payments[0].state,
        order_saga::payment::PaymentState::Voided,
        "and voided"
    );
    let level = w.inventory.stock(&sku("SKU-1")).await.unwrap();
    assert_eq!(
        (level.available, level.reserved, level.committed),
        (3, 0, 0)
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compensation_that_keeps_failing_needs_attention_until_retried() {
    let flaky = Arc::new(FlakyShipping {
        inner: MemoryShipping::default(),
        broken: AtomicBool::new(true),
    });
    let (w, clock) = expiring_world(flaky.clone());
    let running = w.service.start();
    stock(&w.inventory, "SKU-1", 3, 100).await;
    let order = created(
        w.service
            .create_order(&customer("ola"), cart(&[("SKU-1", 1)]), "k")
            .await,
    )
    .await;
    // The reservation lapses during the payment: the commit fails after the
    // shipment is booked, and the shipment's cancel keeps failing.
    clock.advance(Duration::from_secs(61));
    let order = settled(&w.service, order.id, WAIT).await;
    assert_eq!(order.state, OrderState::NeedsAttention);
    assert!(
        order
            .attention
            .as_deref()
            .unwrap()
            .contains("cancel_shipment"),
        "{:?}",
        order.attention
    );
    assert_eq!(w.service.stats().snapshot().needs_attention, 1);
    let counts = w.service.count_by_state().await.unwrap();
    assert!(
        counts.contains(&(OrderState::NeedsAttention, 1)),
        "{counts:?}"
    );
    flaky.broken.store(false, Ordering::SeqCst);
    let order = w.service.retry_compensation(order.id).await.unwrap();
    assert_eq!(
        (order.state, order.cancel_reason),
        (
            OrderState::Cancelled,
            Some(CancelReason::ReservationExpired)
        )
    );
    let level = w.inventory.stock(&sku("SKU-1")).await.unwrap();
    assert_eq!(
        (level.available, level.reserved, level.committed),
        (3, 0, 0)
    );
    assert_eq!(w.sim.ledger().net_charged_cents(), 0);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_orders_never_oversell_a_hundred_units() {
    let w = world(SimConfig::default());
    let running = w.service.start();
    stock(&w.inventory, "HOT", 100, 999).await;
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let service = w.service.clone();
        tasks.push(tokio::spawn(async move {
            service
                .create_order(&customer(&format!("buyer{i}")), cart(&[("HOT", 1)]), "k")
                .await
        }));
    }
    let mut ids = Vec::new();
    let mut refused = 0;
    for task in tasks {
        match task.await.unwrap().unwrap() {
            CreateOutcome::Created(order) => ids.push(order.id),
            CreateOutcome::OutOfStock(_) => refused += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((ids.len(), refused), (100, 900));
    let orders = all_settled(&w.service, &ids, WAIT).await;
    assert!(orders.iter().all(|o| o.state == OrderState::Confirmed));
    let level = w.inventory.stock(&sku("HOT")).await.unwrap();
    assert_eq!(
        (level.available, level.reserved, level.committed),
        (0, 0, 100)
    );
    running.shutdown().await;
}
