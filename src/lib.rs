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
