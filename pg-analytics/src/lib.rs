//! # pg_analytics: multi-tenant PostgreSQL analytics
//!
//! Multi-tenant PostgreSQL analytics: a partitioned schema, exact rollups,
//! COPY ingest, sub-second dashboards over 100M+ rows, a Redis cache, and
//! archival of data older than two years to cold storage.
//!
//! ## Status
//!
//! This crate is reserved in the workspace and holds no public API yet: its
//! tracking issue (the pg-analytics issue) builds it. Nothing here is a placeholder; what lands
//! is what works and is tested.
#![forbid(unsafe_code)]
