//! # order_saga: orders that never oversell, never double-charge, and always roll back
//!
//! Four services, each owning its data: **inventory** (stock reserved with a
//! TTL, then committed or released), **payments** (a client of an unreliable
//! card processor), **shipping**, and **orders**, whose orchestrator drives
//! each order through a durable saga:
//!
//! `Pending → StockReserved → PaymentAuthorized → ShipmentScheduled → Confirmed`,
//! or on failure through `Compensating` to `Cancelled` (with a reason), or to
//! `NeedsAttention` when a compensation keeps failing.
//!
//! The orchestrator reaches the other services through traits
//! ([`Inventory`], [`Payments`], [`Shipping`]); each has an in-memory
//! implementation (the embedded default), a PostgreSQL one (feature
//! `postgres`), and an HTTP client (feature `http`), so one process can run
//! everything or four processes can.
//!
//! Every guarantee is a test against real PostgreSQL and Redis: no
//! oversell under 1,000 concurrent orders, complete rollback (no orphaned
//! reservation, no uncaptured authorization, no double charge reconciled
//! against the payment simulator's ledger, no shipment for a cancelled
//! order) over 10,000 orders with payment failures and lost replies, and
//! recovery after `SIGKILL` at random points in 100 runs.
//!
//! | module | what |
//! | --- | --- |
//! | [`model`] | ids, the cart and its validation, order states and cancel reasons |
//! | [`saga`] | the saga as a pure state machine |
//! | [`order`] | [`OrderService`] (create with idempotency keys, get, cancel, list), the orchestrator, the order stores |
//! | [`inventory`], [`payment`], [`shipping`] | the services' cores, stores and the simulator of the payment provider |
//! | [`messaging`] | the transactional outbox, its relay, the event bus (memory, Redis Streams) and idempotent consumers |
//! | `pg` (feature `postgres`) | the pool and the per-schema migrator |
//! | `http` (feature `http`) | each service as a tower service on `http_kit::serve`, and an HTTP client of each |
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use std::sync::Arc;
//! use order_saga::inventory::{Inventory, MemoryInventory, Restock};
//! use order_saga::model::{Address, CreateOrder, CustomerId, LineItem, Sku};
//! use order_saga::order::store::memory::MemoryOrderStore;
//! use order_saga::payment::{ResilientConfig, ResilientPayments, SimConfig, Simulator};
//! use order_saga::shipping::MemoryShipping;
//! use order_saga::{CreateOutcome, OrderConfig, OrderService, OrderState, Services};
//!
//! let clock = time_kit::system();
//! let inventory = Arc::new(MemoryInventory::new(clock.clone()));
//! let sku = Sku::parse("SKU-1").unwrap();
//! inventory.restock(Restock { sku: sku.clone(), quantity: 10, unit_price_cents: Some(1250) }).await.unwrap();
//! let provider = Simulator::new(SimConfig::default()).unwrap();
//! let services = Services {
//!     inventory,
//!     payments: Arc::new(ResilientPayments::new(provider, ResilientConfig::default()).unwrap()),
//!     shipping: Arc::new(MemoryShipping::default()),
//! };
//! let orders = OrderService::new(Arc::new(MemoryOrderStore::new(clock.clone())), services, OrderConfig::default(), clock);
//! let running = orders.start(); // drives sagas in the background
//!
//! let request = CreateOrder {
//!     items: vec![LineItem { sku, quantity: 2 }],
//!     ship_to: Address {
//!         name: "Ada".into(), line1: "1 Loop Road".into(), line2: None,
//!         city: "London".into(), postal_code: "N1".into(), country: "GB".into(),
//!     },
//! };
//! let customer = CustomerId::parse("alice").unwrap();
//! let CreateOutcome::Created(order) = orders.create_order(&customer, request, "key-1").await.unwrap() else {
//!     panic!("out of stock")
//! };
//! assert_eq!(order.state, OrderState::StockReserved); // durable, stock held
//! assert_eq!(order.total_cents, 2500);
//! # running.shutdown().await;
//! # }
//! ```
//!
//! Design: `docs/order-saga/ARCHITECTURE.md`; HTTP API: `docs/order-saga/API.md`.
#![forbid(unsafe_code)]

use std::future::Future;
use std::pin::Pin;

// Modules point one way: model → events → the services' cores
// (inventory, payment, shipping) → messaging → order (the saga) → http.
#[cfg(feature = "postgres")]
mod combiner;
pub mod events;
#[cfg(feature = "http")]
pub mod http;
pub mod inventory;
pub mod messaging;
pub mod model;
pub mod order;
pub mod payment;
#[cfg(feature = "postgres")]
pub mod pg;
pub mod saga;
pub mod shipping;

pub use events::{Event, EventEnvelope};
pub use inventory::{Inventory, InventoryError};
pub use messaging::{BusError, EventPublisher};
pub use model::{
    Address, CancelReason, CartLimits, CreateOrder, CustomerId, LineItem, Order, OrderId,
    OrderLine, OrderState, Sku, ValidationError,
};
pub use order::{CreateOutcome, OrderConfig, OrderError, OrderService, OrderStore, Services};
pub use payment::{PaymentError, Payments};
pub use shipping::{Shipping, ShippingError};

/// A boxed, `Send` future: what the services' traits return, so they can
/// be used as trait objects (`Arc<dyn Inventory>`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
