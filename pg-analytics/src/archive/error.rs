//! What archival fails with.

use chrono::NaiveDate;

use super::{ArchiveState, Step};
use crate::postgres::AnalyticsError;

/// An error of the archiver. Whatever the error, no partition was dropped
/// unless its archive had been verified, and the manifest says where the
/// month stands: run the same call again to resume.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArchiveError {
    /// The database failed (see [`AnalyticsError::is_transient`]).
    #[error("archive: database error")]
    Database(#[from] AnalyticsError),
    /// The object store failed on `path`.
    #[error("archive: object store error on {path}")]
    Store {
        /// The object's path in the store.
        path: String,
        /// The store's error.
        #[source]
        source: object_store::Error,
    },
    /// The store's URL is not one [`store_from_url`](super::store_from_url)
    /// knows.
    #[error("archive store {url:?}: {reason}")]
    InvalidStore {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A partition to restore into already exists and holds rows.
    #[error("cannot restore {month}: its partition exists and holds {rows} rows")]
    RestoreBlocked {
        /// The month (its first day).
        month: NaiveDate,
        /// Rows it holds.
        rows: i64,
    },
    /// Writing or reading Parquet failed (a file that is not Parquet, or
    /// one truncated, ends here too).
    #[error("archive: Parquet error")]
    Parquet(#[source] parquet::errors::ParquetError),
    /// A local scratch file could not be written or read.
    #[error("archive: scratch file {path}")]
    Scratch {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The archive of `month` does not match what it must match; the
    /// partition was not dropped (or, on restore, not attached).
    #[error("archive of {month}: verification failed: {mismatch}")]
    Verification {
        /// The month (its first day).
        month: NaiveDate,
        /// What differed.
        mismatch: Mismatch,
    },
    /// The month is not in a state this operation starts from (restoring a
    /// month that was never archived, for one).
    #[error("{operation} of {month}: the month is {state}")]
    WrongState {
        /// The month (its first day).
        month: NaiveDate,
        /// What was asked.
        operation: &'static str,
        /// Its state in the manifest; `None`: not in the manifest.
        state: StateName,
    },
    /// The month may not be archived.
    #[error("the month {month} cannot be archived: {reason}")]
    NotEligible {
        /// The month (its first day).
        month: NaiveDate,
        /// Why.
        reason: NotEligible,
    },
    /// Another archiver is working on the month now.
    #[error("another archiver is working on {month}")]
    Busy {
        /// The month (its first day).
        month: NaiveDate,
    },
    /// `DETACH PARTITION` could not get its lock on `analytics.events` in
    /// the attempts allowed (long queries or transactions held it).
    #[error("could not detach {month}'s partition: lock timeout {attempts} times")]
    DetachTimedOut {
        /// The month (its first day).
        month: NaiveDate,
        /// Attempts made.
        attempts: u32,
    },
    /// A fault injected by [`ArchiveConfig::fail_after`](super::ArchiveConfig::fail_after),
    /// right after `step`'s effect was recorded.
    #[error("injected failure after step {step:?} of {month}")]
    Injected {
        /// The month (its first day).
        month: NaiveDate,
        /// The step that had completed.
        step: Step,
    },
}

/// A manifest state as named in errors: `Some(state)`, or not archived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateName(pub Option<ArchiveState>);

impl std::fmt::Display for StateName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(state) => write!(f, "{}", state.as_str()),
            None => f.write_str("not in the archive manifest"),
        }
    }
}

/// Why a month may not be archived.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NotEligible {
    /// It is not older than the configured minimum age (the current and
    /// future months never are).
    #[error("it is not older than the cutoff {cutoff}")]
    TooRecent {
        /// The first month that is too recent.
        cutoff: NaiveDate,
    },
    /// It has no partition.
    #[error("it has no partition")]
    NoPartition,
    /// Rows of the month sit in the default partition: they would not be
    /// archived with the partition, and would be left behind the fence.
    #[error("{rows} of its rows are in the default partition")]
    RowsInDefaultPartition {
        /// How many.
        rows: i64,
    },
}

/// What an archive did not match.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Mismatch {
    /// The object is not in the store (deleted since it was exported).
    #[error("the object {path} is not in the store")]
    Missing {
        /// The object's path in the store.
        path: String,
    },
    /// The object's SHA-256 is not the one recorded at export.
    #[error("SHA-256 is {actual}, the manifest says {expected}")]
    Hash {
        /// Recorded.
        expected: String,
        /// Computed from the object read back.
        actual: String,
    },
    /// The object's size is not the one recorded at export.
    #[error("the object has {actual} bytes, the manifest says {expected}")]
    Size {
        /// Recorded.
        expected: u64,
        /// Read back.
        actual: u64,
    },
    /// The file's schema is not the archive schema.
    #[error("the file's schema is not the archive schema: {0}")]
    Schema(String),
    /// The object holds a different number of rows.
    #[error("the object holds {actual} rows, expected {expected} ({against})")]
    RowCount {
        /// Expected.
        expected: u64,
        /// In the object.
        actual: u64,
        /// What the expectation came from (`manifest`, `partition`).
        against: &'static str,
    },
    /// Row `index` (in the archive's order) differs from the partition's.
    #[error("row {index} differs from the partition's: {detail}")]
    Row {
        /// Its position, from 0.
        index: u64,
        /// The two rows.
        detail: String,
    },
    /// A (tenant, day) cell's count or sum differs from the rollup
    /// (`analytics.events_daily`): the first such cell in key order.
    #[error(
        "tenant {tenant_id} on {day}: the archive has {archived_events} events summing {archived_sum_us} us, the rollup {rollup_events} summing {rollup_sum_us} us"
    )]
    Rollup {
        /// The tenant.
        tenant_id: i64,
        /// The UTC day.
        day: NaiveDate,
        /// Events in the archive.
        archived_events: i64,
        /// Their processing time, summed.
        archived_sum_us: i64,
        /// Events in the rollup.
        rollup_events: i64,
        /// Its sum.
        rollup_sum_us: i64,
    },
}

impl Mismatch {
    /// Whether the object itself is at fault (its bytes or content), as
    /// opposed to the rollup: the archiver then exports it again from the
    /// partition, which is still there.
    pub fn is_in_object(&self) -> bool {
        !matches!(self, Mismatch::Rollup { .. })
    }
}

impl ArchiveError {
    pub(crate) fn parquet(e: parquet::errors::ParquetError) -> ArchiveError {
        ArchiveError::Parquet(e)
    }

    pub(crate) fn store(path: &object_store::path::Path, e: object_store::Error) -> ArchiveError {
        ArchiveError::Store {
            path: path.to_string(),
            source: e,
        }
    }

    pub(crate) fn scratch(path: &std::path::Path, e: std::io::Error) -> ArchiveError {
        ArchiveError::Scratch {
            path: path.to_owned(),
            source: e,
        }
    }

    /// Whether a retry may succeed as is (database or store unavailable, a
    /// lock not had, another archiver busy, an injected fault).
    pub fn is_transient(&self) -> bool {
        match self {
            ArchiveError::Database(e) => e.is_transient(),
            ArchiveError::Store { source, .. } => !matches!(
                source,
                object_store::Error::NotFound { .. }
                    | object_store::Error::NotImplemented { .. }
                    | object_store::Error::NotSupported { .. }
                    | object_store::Error::InvalidPath { .. }
            ),
            ArchiveError::Busy { .. }
            | ArchiveError::DetachTimedOut { .. }
            | ArchiveError::Injected { .. } => true,
            _ => false,
        }
    }
}
