//! The order service: the order lifecycle, its durable saga, and the
//! orchestrator that drives each saga against the inventory, payment and
//! shipping services.
//!
//! - [`OrderService`]: `create_order` (idempotent, Stripe semantics),
//!   `get_order`, `cancel_order`, `list_orders` (keyset pages), and
//!   [`OrderService::start`], which resumes every unfinished saga and keeps
//!   claiming due ones.
//! - [`store`]: where orders, sagas, idempotency keys and the outbox live
//!   ([`OrderStore`]: in memory or PostgreSQL).

mod config;
mod driver;
mod service;
mod stats;
pub mod store;

pub use config::OrderConfig;
#[cfg(feature = "http")]
pub(crate) use driver::error_chain;
pub use service::{
    CreateOutcome, FaultHook, OrderError, OrderPage, OrderService, Running, Services,
};
pub use stats::{OrderStats, StatsSnapshot};
pub use store::{OrderStore, StoreError};
