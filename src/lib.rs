//! # ferrokeel
//!
//! The umbrella crate of the ferrokeel workspace: production Rust backend
//! building blocks, each usable on its own and re-exported here behind a
//! cargo feature so one dependency line can pull in the ones you need.
//!
//! | feature | crate | what it solves |
//! | --- | --- | --- |
//! | `metrics` (default) | [`metrics_core`] | in-process real-time metrics aggregation |
//! | `order-saga` | `order_saga` | an order saga that never oversells |
//! | `pg-analytics` | `pg_analytics` | multi-tenant PostgreSQL analytics |
//! | `gateway` | `gateway_mw` | API gateway middleware for tower and hyper |
//! | `jwt` | `jwt_kit` | strict JWT verification, shared by the gateway and notify-hub |
//! | `http` | `http_kit` | the shared HTTP edge: `serve`, the JSON error body, body/bearer/query helpers |
//! | `redis` | `redis_kit` | the shared Redis setup |
//! | (always) | `time_kit` | the suite's injectable clock |
//! | `notify` | `notify_hub` | real-time WebSocket notifications |
//!
//! `full` enables all of them. The workspace's runnable examples and
//! benchmarks live in this package (`cargo run --release --example NAME`).
#![forbid(unsafe_code)]

#[cfg(feature = "metrics")]
pub use metrics_core;

#[cfg(feature = "order-saga")]
pub use order_saga;

#[cfg(feature = "pg-analytics")]
pub use pg_analytics;

#[cfg(feature = "gateway")]
pub use gateway_mw;

#[cfg(feature = "notify")]
pub use notify_hub;

#[cfg(feature = "jwt")]
pub use jwt_kit;

#[cfg(feature = "http")]
pub use http_kit;

#[cfg(feature = "redis")]
pub use redis_kit;

pub use time_kit;
