//! Archival of old partitions to Parquet in an object store (feature
//! `archive`), verified before anything is dropped, with restore.
//!
//! A month of `analytics.events` older than [`ArchiveConfig::min_age_months`]
//! (24 by default) goes through these steps, each recorded in the manifest
//! (`analytics.archives`) before the next starts:
//!
//! 1. **fenced**: the archived horizon (`analytics.archive_horizon`) is
//!    raised to the month's end and committed; the
//!    [`EventWriter`](crate::EventWriter) refuses later rows of the month
//!    (`before_archived_horizon`). The raise takes the fence's advisory
//!    lock ([`HORIZON_LOCK_KEY`](crate::postgres::HORIZON_LOCK_KEY))
//!    exclusive, so it waits for the batches in flight.
//! 2. **detached**: `ALTER TABLE … DETACH PARTITION` (not `CONCURRENTLY`:
//!    PostgreSQL refuses it while a default partition exists; see ADR 0022)
//!    with a short `lock_timeout`, retried; the partition's heap size is
//!    measured and recorded in the same transaction.
//! 3. **exported**: the rows are streamed out with binary `COPY` in
//!    `(tenant_id, created_at, event_type, processing_time_us)` order,
//!    written to a local scratch file as Parquet (zstd) while hashed
//!    (SHA-256), uploaded to the object store, and the rows, size and hash
//!    recorded.
//! 4. **verified**: the object is read back *from the store*; its size and
//!    hash must match the manifest, its rows must equal the partition's,
//!    row for row, and its count and processing-time sum per (tenant, UTC
//!    day) must equal the rollup (`analytics.events_daily`, which is kept).
//! 5. **dropped**: the partition is dropped, only from **verified**; a run
//!    that resumes a month from **verified** first reads the object back
//!    and checks its size and SHA-256 against the manifest again.
//!
//! [`Archiver::archive`] resumes a month from its recorded state, so a
//! crash at any point is recovered by running it again; every step is
//! idempotent, and no partition is dropped unless its archive verified. An
//! object that fails verification sends the month back to **detached**: the
//! next run exports it again from the partition, which is still there.
//! [`Archiver::restore`] loads a dropped month back into a partition
//! (**restoring** → **restored**) in one transaction. [`Archiver::abort`]
//! calls off a month's archival before the drop (**aborted**: the
//! partition attached again), for a month that keeps failing.
//!
//! ```no_run
//! # async fn demo(store: pg_analytics::Analytics) -> Result<(), Box<dyn std::error::Error>> {
//! use pg_analytics::archive::{ArchiveConfig, Archiver, local_store};
//!
//! let objects = local_store("/var/lib/analytics-archive")?;
//! let archiver = Archiver::new(store, objects, ArchiveConfig::default());
//! for report in archiver.archive_due().await? {
//!     tracing::info!(month = %report.month, rows = report.rows, "archived");
//! }
//! # Ok(())
//! # }
//! ```
//!
//! The files are plain Parquet: see `docs/pg-analytics/archival.md` for
//! reading them with DuckDB or pyarrow.

mod archiver;
mod error;
mod format;
mod manifest;
mod store;

use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};

pub use archiver::Archiver;
pub use error::{ArchiveError, Mismatch, NotEligible, StateName};
pub use format::{ArchivedRow, PARQUET_SCHEMA};
pub use store::{local_store, object_path, store_from_url};

/// Where a month stands in the manifest: the last step whose effect is
/// recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ArchiveState {
    /// The horizon covers the month; its partition is still attached.
    Fenced,
    /// The partition is detached (and its size measured).
    Detached,
    /// The object is in the store; rows, size and hash are recorded.
    Exported,
    /// The object read back from the store matched the partition and the
    /// rollup.
    Verified,
    /// The partition is dropped; the month lives in the store.
    Dropped,
    /// A restore started.
    Restoring,
    /// The month is back in a partition.
    Restored,
    /// The archival was called off ([`Archiver::abort`]) before the drop:
    /// the partition is attached again. [`Archiver::archive_due`] leaves the
    /// month alone; [`Archiver::archive`] starts it over.
    Aborted,
}

impl ArchiveState {
    /// Its stored name (`fenced`, `detached`, …).
    pub const fn as_str(self) -> &'static str {
        match self {
            ArchiveState::Fenced => "fenced",
            ArchiveState::Detached => "detached",
            ArchiveState::Exported => "exported",
            ArchiveState::Verified => "verified",
            ArchiveState::Dropped => "dropped",
            ArchiveState::Restoring => "restoring",
            ArchiveState::Restored => "restored",
            ArchiveState::Aborted => "aborted",
        }
    }

    /// The state stored as `name`.
    pub fn parse(name: &str) -> Option<ArchiveState> {
        Some(match name {
            "fenced" => ArchiveState::Fenced,
            "detached" => ArchiveState::Detached,
            "exported" => ArchiveState::Exported,
            "verified" => ArchiveState::Verified,
            "dropped" => ArchiveState::Dropped,
            "restoring" => ArchiveState::Restoring,
            "restored" => ArchiveState::Restored,
            "aborted" => ArchiveState::Aborted,
            _ => return None,
        })
    }
}

impl std::fmt::Display for ArchiveState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A point right after a step's effect is durable, where
/// [`ArchiveConfig::fail_after`] makes a run fail, as a crash there would.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Step {
    /// The month is recorded as fenced and the horizon raised.
    Fence,
    /// The partition is detached and recorded so.
    Detach,
    /// The object is in the store, but not yet recorded as exported.
    Upload,
    /// The export is recorded.
    Export,
    /// The verification is recorded.
    Verify,
    /// The partition is dropped and recorded so.
    Drop,
    /// A restore is recorded as started.
    RestoreStart,
    /// The restore is committed.
    Restore,
}

/// How an [`Archiver`] runs.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ArchiveConfig {
    /// Months starting before the first day of the current month minus this
    /// many months are archived by [`Archiver::archive_due`]. The current
    /// and future months never are, whatever the value. Default 24.
    pub min_age_months: u32,
    /// Rows per Parquet row group; the writer holds one row group in
    /// memory (about 60 bytes a row plus the event types). Default
    /// 1,048,576.
    pub row_group_rows: usize,
    /// The zstd level (1–22). Default 3.
    pub zstd_level: i32,
    /// How long `DETACH PARTITION` waits for its lock on `analytics.events`
    /// before it gives up and retries; queries queue behind a waiting
    /// `DETACH`, so this bounds how long they stall. Default 2 s.
    pub lock_timeout: Duration,
    /// How many times the detach is tried. Default 10.
    pub detach_attempts: u32,
    /// Where scratch files go (the export before upload, the object when
    /// read back); they are removed after use. Default the system's
    /// temporary directory.
    pub scratch_dir: PathBuf,
    /// Fault injection for tests of resumption: the run returns
    /// [`ArchiveError::Injected`] right after this step's effect is
    /// durable. Default none.
    pub fail_after: Option<Step>,
}

impl Default for ArchiveConfig {
    fn default() -> ArchiveConfig {
        ArchiveConfig {
            min_age_months: 24,
            row_group_rows: 1 << 20,
            zstd_level: 3,
            lock_timeout: Duration::from_secs(2),
            detach_attempts: 10,
            scratch_dir: std::env::temp_dir(),
            fail_after: None,
        }
    }
}

impl ArchiveConfig {
    /// Sets [`ArchiveConfig::min_age_months`].
    pub fn with_min_age_months(mut self, months: u32) -> ArchiveConfig {
        self.min_age_months = months;
        self
    }

    /// Sets [`ArchiveConfig::row_group_rows`] (at least 1).
    pub fn with_row_group_rows(mut self, rows: usize) -> ArchiveConfig {
        self.row_group_rows = rows.max(1);
        self
    }

    /// Sets [`ArchiveConfig::zstd_level`].
    pub fn with_zstd_level(mut self, level: i32) -> ArchiveConfig {
        self.zstd_level = level;
        self
    }

    /// Sets [`ArchiveConfig::lock_timeout`].
    pub fn with_lock_timeout(mut self, timeout: Duration) -> ArchiveConfig {
        self.lock_timeout = timeout;
        self
    }

    /// Sets [`ArchiveConfig::detach_attempts`] (at least 1).
    pub fn with_detach_attempts(mut self, attempts: u32) -> ArchiveConfig {
        self.detach_attempts = attempts.max(1);
        self
    }

    /// Sets [`ArchiveConfig::scratch_dir`].
    pub fn with_scratch_dir(mut self, dir: impl Into<PathBuf>) -> ArchiveConfig {
        self.scratch_dir = dir.into();
        self
    }

    /// Sets [`ArchiveConfig::fail_after`].
    pub fn fail_after(mut self, step: Option<Step>) -> ArchiveConfig {
        self.fail_after = step;
        self
    }
}

/// A month's row of the manifest (`analytics.archives`).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ArchiveRecord {
    /// The month (its first day).
    pub month: NaiveDate,
    /// Its partition's name.
    pub partition: String,
    /// Its object's path in the store.
    pub object_path: String,
    /// The last step recorded.
    pub state: ArchiveState,
    /// The partition's heap size in bytes (`pg_relation_size`, the main
    /// fork), measured once detached; `None` before.
    pub heap_bytes: Option<u64>,
    /// The partition's size with its indexes and TOAST
    /// (`pg_total_relation_size`), measured with `heap_bytes`.
    pub total_bytes: Option<u64>,
    /// Rows in the archive; `None` before the export.
    pub rows: Option<u64>,
    /// The object's size in bytes; `None` before the export.
    pub parquet_bytes: Option<u64>,
    /// The object's SHA-256 (hex); `None` before the export.
    pub sha256: Option<String>,
    /// When this archival (or the last re-archival) started.
    pub started_at: DateTime<Utc>,
    /// When the row last changed.
    pub updated_at: DateTime<Utc>,
    /// The last failure of a step on this month, cleared by the next step
    /// that succeeds.
    pub last_error: Option<String>,
}

/// What [`Archiver::archive`] did for a month.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ArchiveReport {
    /// The month (its first day).
    pub month: NaiveDate,
    /// The object's path in the store.
    pub object_path: String,
    /// Rows archived.
    pub rows: u64,
    /// The Parquet object's size in bytes.
    pub parquet_bytes: u64,
    /// The partition's heap size in bytes before it was dropped:
    /// `pg_relation_size` (the heap's main fork, without indexes, TOAST or
    /// free-space map), measured right after the detach.
    pub heap_bytes: u64,
    /// The partition's size with its indexes and TOAST
    /// (`pg_total_relation_size`), measured with `heap_bytes`.
    pub total_bytes: u64,
    /// The object's SHA-256 (hex).
    pub sha256: String,
    /// The state the month was found in, when this call resumed an earlier
    /// run rather than starting afresh.
    pub resumed_from: Option<ArchiveState>,
    /// The wall-clock time of this call (all steps it ran).
    pub elapsed: Duration,
    /// Of which exporting (stream, write, hash, upload), if this call did.
    pub export_elapsed: Option<Duration>,
    /// Of which verifying (download, hash, compare), if this call did.
    pub verify_elapsed: Option<Duration>,
}

/// What [`Archiver::archive_due_report`] did: the months archived, and
/// the months that failed, each with its error (also recorded as the
/// month's `last_error`).
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct DueReport {
    /// The months archived (or found archived), oldest first.
    pub archived: Vec<ArchiveReport>,
    /// The months that failed, oldest first. A failure that concerns the
    /// month alone (a verification mismatch, rows in the default partition,
    /// another archiver on it, …) does not stop the run; one that concerns
    /// the services (the database or the store unavailable) does, and is
    /// the last entry.
    pub failed: Vec<MonthFailure>,
    /// The months due that were not tried, because a failure stopped the
    /// run.
    pub not_attempted: Vec<NaiveDate>,
}

/// A month [`Archiver::archive_due_report`] could not archive.
#[derive(Debug)]
#[non_exhaustive]
pub struct MonthFailure {
    /// The month (its first day).
    pub month: NaiveDate,
    /// Why; its state in the manifest says where it stands.
    pub error: ArchiveError,
}

/// What [`Archiver::abort`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct AbortReport {
    /// The month (its first day).
    pub month: NaiveDate,
    /// The state the month was called off from (`Aborted` if it already
    /// was).
    pub from: ArchiveState,
    /// The partition had to be attached again (it was detached).
    pub reattached: bool,
    /// The archived horizon after the abort.
    pub horizon: Option<DateTime<Utc>>,
}

/// What [`Archiver::verify`] checked.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifyReport {
    /// The month (its first day).
    pub month: NaiveDate,
    /// Its state after the check.
    pub state: ArchiveState,
    /// Rows in the object.
    pub rows: u64,
    /// The object's size in bytes.
    pub parquet_bytes: u64,
    /// Its SHA-256 (hex), equal to the manifest's.
    pub sha256: String,
    /// The rows were compared, row for row, with the partition's.
    pub against_partition: bool,
    /// The per (tenant, day) counts and sums were compared with the rollup.
    pub against_rollup: bool,
    /// How long it took.
    pub elapsed: Duration,
}

/// What [`Archiver::restore`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RestoreReport {
    /// The month (its first day).
    pub month: NaiveDate,
    /// Its partition, attached again.
    pub partition: String,
    /// Rows loaded (0 if the month was already restored).
    pub rows: u64,
    /// The archived horizon after the restore.
    pub horizon: Option<DateTime<Utc>>,
    /// How long it took.
    pub elapsed: Duration,
}
