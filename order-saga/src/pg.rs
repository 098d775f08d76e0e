//! PostgreSQL plumbing shared by the services' stores: the connection pool
//! (whose connections cache their prepared statements) and the per-schema
//! migrator. They live in the suite's shared crate `ferrokeel-pg`
//! ([`pg_kit`]) and are re-exported here.
//!
//! Each service owns one schema (`orders`, `inventory`, `shipping`) and
//! migrates only its own, from plain SQL files in `migrations/<schema>/`.

pub use pg_kit::*;
