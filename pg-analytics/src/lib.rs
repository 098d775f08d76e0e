//! # pg_analytics: multi-tenant analytics on PostgreSQL
//!
//! The seed's analytics system: events of many tenants, partitioned by
//! month, ingested with binary `COPY`, and a daily rollup kept exact (counts
//! and sums, never averages) in the same transaction as the rows, so the
//! dashboard query reads a few thousand rollup rows instead of scanning
//! hundreds of millions of events.
//!
//! - [`model`]: tenants, plans, events and the rules an event must pass
//!   ([`EventRules`]), each refusal with a stable code ([`RejectReason`]);
//! - [`rollup`]: the rollup's arithmetic, pure;
//! - `postgres` (feature `postgres`): the store ([`Analytics`]): migrations,
//!   partition maintenance, the [`EventWriter`], and the dashboard queries
//!   (`dashboard` from the rollup, `dashboard_raw` from the events, the
//!   correctness reference);
//! - [`cache`] (feature `redis`): [`DashboardCache`](cache::DashboardCache),
//!   dashboards in Redis under generation-versioned keys, single-flight and
//!   XFetch, falling through to PostgreSQL when Redis is down;
//! - [`archive`] (feature `archive`): [`Archiver`], old
//!   months to verified Parquet in an object store, resumable, with
//!   restore;
//! - [`http`] (feature `server`): [`AnalyticsService`](http::AnalyticsService),
//!   the HTTP adapter, a tower service on the suite's shared edge.
//!
//! ```no_run
//! # #[cfg(feature = "postgres")]
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use chrono::{NaiveDate, Utc};
//! use pg_analytics::{Analytics, Event, Plan, Tenant, TenantId, WriterConfig};
//!
//! let pool = pg_kit::pool("postgres://postgres@127.0.0.1/analytics", &Default::default())?;
//! let store = Analytics::new(pool, time_kit::system());
//! store.migrate().await?;
//! let today = Utc::now().date_naive();
//! store.ensure_partitions(today, today, 3).await?;
//! store
//!     .upsert_tenant(&Tenant { id: TenantId(1), name: "Acme".into(), plan: Plan::Enterprise })
//!     .await?;
//! let writer = store.writer(WriterConfig::default());
//! let report = writer
//!     .write(
//!         uuid::Uuid::now_v7(),
//!         &[Event {
//!             tenant_id: TenantId(1),
//!             created_at: Utc::now(),
//!             event_type: "login".into(),
//!             processing_time_ms: 12.5,
//!         }],
//!     )
//!     .await?;
//! assert_eq!(report.accepted, 1);
//! let rows = store.dashboard(Plan::Enterprise, NaiveDate::from_ymd_opt(2024, 1, 1).unwrap()).await?;
//! # let _ = rows;
//! # Ok(())
//! # }
//! ```
//!
//! Days are UTC. Per-tenant time zones would need the rollup keyed by the
//! tenant's local day (documented as an extension in the crate's README).
#![forbid(unsafe_code)]

#[cfg(feature = "archive")]
pub mod archive;
#[cfg(feature = "redis")]
pub mod cache;
#[cfg(feature = "server")]
pub mod http;
pub mod model;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod rollup;

#[cfg(feature = "archive")]
pub use archive::{
    AbortReport, ArchiveConfig, ArchiveError, ArchiveReport, ArchiveState, Archiver, DueReport,
    RestoreReport, VerifyReport,
};
pub use model::{Event, EventRules, Plan, RejectReason, Tenant, TenantId, ValidEvent};
#[cfg(feature = "postgres")]
pub use postgres::{
    Analytics, AnalyticsError, DashboardRow, EventWriter, IngestReport, Rejected, WriterConfig,
};
