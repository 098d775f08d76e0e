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
//! Design: `docs/order-saga/ARCHITECTURE.md`; HTTP API: `docs/order-saga/API.md`.
#![forbid(unsafe_code)]

use std::future::Future;
use std::pin::Pin;

// Modules point one way: model → events → the services' cores
// (inventory, payment, shipping) → messaging → order (the saga) → http.
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
