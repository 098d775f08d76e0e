//! The HTTP edge: one tower service per service (`order`, `inventory`,
//! `shipping`, and the payment provider simulator), each a
//! `tower::Service<Request<B>>` answering `Response<http_kit::Body>`,
//! served with [`http_kit::serve()`]; and an HTTP client of each service that
//! implements the service's trait, so the order saga can run with every
//! service in process or each in its own process.
//!
//! Every error is the suite's one body,
//! `{"error": "<code>", "message": "<text>"}` (see `docs/order-saga/API.md`).

pub mod client;
pub mod payment_sim;
pub(crate) mod support;

pub use client::{ClientConfig, ClientError, JsonClient};
pub use payment_sim::PaymentSimService;
