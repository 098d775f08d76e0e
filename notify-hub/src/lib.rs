//! # notify_hub: real-time WebSocket notifications
//!
//! Real-time notifications over WebSocket: per-user and per-group delivery,
//! PostgreSQL history, JWT-authenticated connections, recovery after
//! reconnect and horizontal scaling over Redis.
//!
//! ## Status
//!
//! This crate is reserved in the workspace and holds no public API yet: its
//! tracking issue (issue #5) builds it. Nothing here is a placeholder; what lands
//! is what works and is tested.
#![forbid(unsafe_code)]
