//! The PostgreSQL store (feature `postgres`): schema `analytics`, the
//! partition maintenance, the [`EventWriter`], and the dashboard queries.

mod error;
mod maintenance;
mod queries;
mod tenants;
mod writer;

pub use error::AnalyticsError;
pub use maintenance::{MaintenanceReport, PartitionReport, partition_name};
pub use queries::{DashboardRow, render_dashboard};
pub use writer::{EventWriter, IngestReport, Rejected, WriterConfig};

use std::sync::Arc;

use pg_kit::{Migration, PgPool};
use time_kit::SharedClock;

use crate::model::EventRules;
use tenants::TenantCache;

/// The schema the store owns.
pub const SCHEMA: &str = "analytics";

/// The key of the advisory lock that fences ingest against archival:
/// 7380064356294359662, the ASCII bytes of `"fkAnHrzn"` (ferrokeel analytics
/// horizon) read as a big-endian `bigint` (`x'666b416e48727a6e'`).
///
/// Every ingest transaction takes `pg_advisory_xact_lock_shared(K)` before
/// anything else, then reads `analytics.archive_horizon` with a plain
/// `SELECT` in a later statement (under `READ COMMITTED` that statement's
/// snapshot is taken once the lock is granted). Whatever moves the horizon
/// (the archiver's fence, a restore, an abort) takes
/// `pg_advisory_xact_lock(K)` first. So a raise waits for the batches in
/// flight, and a batch that starts after it sees it, without a tuple lock on
/// the horizon's row (which writes the row and creates a MultiXact whenever
/// two batches overlap). Anything else writing `analytics.events` must take
/// the shared lock the same way. See migration `0005_archive_abort.sql`.
pub const HORIZON_LOCK_KEY: i64 = i64::from_be_bytes(*b"fkAnHrzn");

/// The schema's migrations, applied in order by [`Analytics::migrate`].
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_analytics.sql",
        sql: include_str!("../../migrations/analytics/0001_analytics.sql"),
    },
    Migration {
        version: 2,
        name: "0002_archive.sql",
        sql: include_str!("../../migrations/analytics/0002_archive.sql"),
    },
    Migration {
        version: 3,
        name: "0003_dashboard_index.sql",
        sql: include_str!("../../migrations/analytics/0003_dashboard_index.sql"),
    },
    Migration {
        version: 4,
        name: "0004_ingest_batches_answer.sql",
        sql: include_str!("../../migrations/analytics/0004_ingest_batches_answer.sql"),
    },
    Migration {
        version: 5,
        name: "0005_archive_abort.sql",
        sql: include_str!("../../migrations/analytics/0005_archive_abort.sql"),
    },
    Migration {
        version: 6,
        name: "0006_events_brin.sql",
        sql: include_str!("../../migrations/analytics/0006_events_brin.sql"),
    },
];

/// The analytics store on PostgreSQL. Cheap to clone.
#[derive(Clone)]
pub struct Analytics {
    pool: PgPool,
    clock: SharedClock,
    rules: EventRules,
    tenants: Arc<TenantCache>,
}

impl std::fmt::Debug for Analytics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Analytics")
            .field("pool", &self.pool.state())
            .field("rules", &self.rules)
            .finish_non_exhaustive()
    }
}

impl Analytics {
    /// A store on `pool` that reads time from `clock` and checks events
    /// with the default [`EventRules`]. Run [`Analytics::migrate`] first.
    pub fn new(pool: PgPool, clock: SharedClock) -> Analytics {
        Analytics {
            pool,
            clock,
            rules: EventRules::default(),
            tenants: Arc::new(TenantCache::default()),
        }
    }

    /// Checks events with `rules` instead.
    pub fn with_rules(mut self, rules: EventRules) -> Analytics {
        self.rules = rules;
        self
    }

    /// The rules events are checked with.
    pub fn rules(&self) -> &EventRules {
        &self.rules
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Creates or upgrades the schema; returns how many migrations ran.
    pub async fn migrate(&self) -> Result<usize, AnalyticsError> {
        pg_kit::migrate(&self.pool, SCHEMA, MIGRATIONS)
            .await
            .map_err(AnalyticsError::from_pg)
    }

    /// A writer over this store.
    pub fn writer(&self, config: WriterConfig) -> EventWriter {
        EventWriter::new(self.clone(), config)
    }
}
