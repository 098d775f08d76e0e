//! The HTTP edge: one tower service per service (`order`, `inventory`,
//! `shipping`, and the payment provider simulator), each a
//! `tower::Service<Request<B>>` answering `Response<http_kit::Body>`,
//! served with [`http_kit::serve()`]; and an HTTP client of each service that
//! implements the service's trait, so the order saga can run with every
//! service in process or each in its own process.
//!
//! Every error is the suite's one body,
//! `{"error": "<code>", "message": "<text>"}` (see `docs/order-saga/API.md`).

// Handlers return `Result<_, ApiError>`: the error is the answer itself
// (176 bytes), built at most once per request, so boxing it would only add
// an allocation on the error path.
#![allow(clippy::result_large_err)]

pub mod client;
pub mod inventory;
pub mod inventory_client;
pub mod order;
pub mod payment_sim;
pub mod shipping;
pub(crate) mod support;

pub use client::{ClientConfig, ClientError, JsonClient};
pub use inventory::{InventoryHttpConfig, InventoryService, ReadyCheck};
pub use inventory_client::HttpInventory;
pub use order::OrderHttp;
pub use payment_sim::PaymentSimService;
