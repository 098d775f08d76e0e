//! # metrics_core: in-process real-time metrics aggregation
//!
//! Many threads ingest events; queries return count, sum, average, minimum,
//! maximum, quantiles and unique users over the last N minutes, with bounded
//! memory and a lossless graceful shutdown.
//!
//! ## Status
//!
//! This crate is reserved in the workspace and holds no public API yet: its
//! tracking issue (issue #3) builds it.
#![forbid(unsafe_code)]
