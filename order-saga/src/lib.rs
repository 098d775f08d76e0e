//! # order_saga: an order service that never oversells
//!
//! An order service that orchestrates inventory, payment (an unreliable
//! external API) and shipping as a saga. It never oversells, rolls failed
//! orders back completely and survives crashes, using a transactional outbox
//! and a message queue.
//!
//! ## Status
//!
//! This crate is reserved in the workspace and holds no public API yet: its
//! tracking issue (the order-saga issue) builds it. Nothing here is a placeholder; what lands
//! is what works and is tested.
#![forbid(unsafe_code)]
