//! # gateway_mw: API gateway middleware
//!
//! API gateway middleware: JWT with refresh-token rotation, RBAC, rate limits
//! per user and per API key (local and Redis-backed), Prometheus metrics, CORS,
//! security headers, input validation, a tamper-evident audit log, health
//! checks and graceful shutdown, as tower layers over hyper.
//!
//! ## Status
//!
//! This crate is reserved in the workspace and holds no public API yet: its
//! tracking issue (issue #4) builds it. Nothing here is a placeholder; what lands
//! is what works and is tested.
#![forbid(unsafe_code)]
