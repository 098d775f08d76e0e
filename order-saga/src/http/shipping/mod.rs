//! The shipping service over HTTP (feature `http`): [`ShippingService`],
//! its adapter, and [`HttpShipping`], its client.
//!
//! | route | role | answers |
//! | --- | --- | --- |
//! | `POST /v1/shipments` | `service` | 201 booked, 200 already booked, 409 `shipment_cancelled`, 422 `shipping_rejected` |
//! | `GET /v1/shipments/{order_id}` | `service` | 200, 404 `shipment_not_found` |
//! | `POST /v1/shipments/{order_id}/cancel` | `service` | 200 (the shipment, cancelled, or a tombstone) |
//! | `GET /healthz` | none | 200 while the process runs |
//! | `GET /readyz` | none | 200, or 503 `not_ready` when the store is unreachable |
//! | `GET /metrics` | none | OpenMetrics text |
//!
//! Every error is the suite's one body, `{"error": "<code>", "message":
//! "<text>"}`. The full contract (fields, every status and code, limits,
//! metrics) is `docs/order-saga/shipping.md`, with the OpenAPI 3.1 document
//! `docs/order-saga/shipping.openapi.json` beside it.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use jwt_kit::{JwtConfig, JwtVerifier, KeySet, VerifyingKey};
//! use order_saga::http::shipping::{ShippingService, ShippingServiceConfig};
//! use order_saga::shipping::MemoryShipping;
//!
//! let keys = KeySet::new()
//!     .with_key(VerifyingKey::hs256("k1", b"a-32-byte-or-longer-shared-secret!"))?
//!     .with_default_kid("k1");
//! let service = ShippingService::new(
//!     Arc::new(MemoryShipping::default()),
//!     JwtVerifier::new(keys, JwtConfig::default()),
//!     ShippingServiceConfig::default(),
//! );
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8083").await?;
//! let shutdown = http_kit::Shutdown::new();
//! shutdown.trigger_on(async { let _ = tokio::signal::ctrl_c().await; });
//! http_kit::serve(listener, service, http_kit::ServeConfig::default(), shutdown).await;
//! # Ok(())
//! # }
//! ```

mod client;
mod service;

pub use client::HttpShipping;
pub use service::{ShippingService, ShippingServiceConfig};

/// Every route [`ShippingService`] serves, as `(method, path template)`;
/// a test checks it against `docs/order-saga/shipping.openapi.json` both
/// ways.
pub const ROUTES: &[(&str, &str)] = &[
    ("POST", "/v1/shipments"),
    ("GET", "/v1/shipments/{order_id}"),
    ("POST", "/v1/shipments/{order_id}/cancel"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
];
