//! The manifest (`analytics.archives`) and the partition catalogue: the
//! SQL the archiver's steps record their effects with.

use chrono::{DateTime, NaiveDate, Utc};
use pg_kit::Prepared;
use tokio_postgres::Row;
use tokio_postgres::types::Type;

use super::error::ArchiveError;
use super::{ArchiveRecord, ArchiveState};
use crate::postgres::AnalyticsError;

const COLUMNS: &str = "month, partition_name, object_path, state, heap_bytes, total_bytes, rows,
    parquet_bytes, sha256, started_at, updated_at, last_error";

fn unsigned(row: &Row, i: usize) -> Result<Option<u64>, ArchiveError> {
    let v: Option<i64> = row.try_get(i).map_err(AnalyticsError::from_query)?;
    Ok(v.map(|v| u64::try_from(v).unwrap_or(0)))
}

fn record(row: &Row) -> Result<ArchiveRecord, ArchiveError> {
    let q = |e| ArchiveError::Database(AnalyticsError::from_query(e));
    let state: &str = row.try_get(3).map_err(q)?;
    let state = ArchiveState::parse(state).ok_or_else(|| {
        ArchiveError::Database(AnalyticsError::Corrupt(format!(
            "unknown archive state {state:?}"
        )))
    })?;
    Ok(ArchiveRecord {
        month: row.try_get(0).map_err(q)?,
        partition: row.try_get(1).map_err(q)?,
        object_path: row.try_get(2).map_err(q)?,
        state,
        heap_bytes: unsigned(row, 4)?,
        total_bytes: unsigned(row, 5)?,
        rows: unsigned(row, 6)?,
        parquet_bytes: unsigned(row, 7)?,
        sha256: row.try_get(8).map_err(q)?,
        started_at: row.try_get(9).map_err(q)?,
        updated_at: row.try_get(10).map_err(q)?,
        last_error: row.try_get(11).map_err(q)?,
    })
}

/// The manifest row of `month`.
pub(crate) async fn get(
    db: &impl Prepared,
    month: NaiveDate,
) -> Result<Option<ArchiveRecord>, ArchiveError> {
    let sql = format!("SELECT {COLUMNS} FROM analytics.archives WHERE month = $1");
    db.query_prepared_opt(&sql, &[(&month, Type::DATE)])
        .await
        .map_err(AnalyticsError::from_query)?
        .as_ref()
        .map(record)
        .transpose()
}

/// Every manifest row, oldest month first.
pub(crate) async fn all(db: &impl Prepared) -> Result<Vec<ArchiveRecord>, ArchiveError> {
    let sql = format!("SELECT {COLUMNS} FROM analytics.archives ORDER BY month");
    db.query_prepared(&sql, &[])
        .await
        .map_err(AnalyticsError::from_query)?
        .iter()
        .map(record)
        .collect()
}

/// Moves `month` from `from` to `to`; `false` if it was not in `from`
/// (another archiver moved it).
pub(crate) async fn advance(
    db: &impl Prepared,
    month: NaiveDate,
    from: ArchiveState,
    to: ArchiveState,
) -> Result<bool, ArchiveError> {
    let stamp = match to {
        ArchiveState::Exported => ", exported_at = now()",
        ArchiveState::Verified => ", verified_at = now()",
        ArchiveState::Dropped => ", dropped_at = now()",
        ArchiveState::Restored => ", restored_at = now()",
        _ => "",
    };
    let sql = format!(
        "UPDATE analytics.archives SET state = $3, updated_at = now(), last_error = NULL{stamp}
          WHERE month = $1 AND state = $2"
    );
    let n = db
        .execute_prepared(
            &sql,
            &[
                (&month, Type::DATE),
                (&from.as_str(), Type::TEXT),
                (&to.as_str(), Type::TEXT),
            ],
        )
        .await
        .map_err(AnalyticsError::from_query)?;
    Ok(n == 1)
}

/// Records `error` as the month's last error (best effort: the database
/// may be what failed).
pub(crate) async fn note_failure(db: &impl Prepared, month: NaiveDate, error: &ArchiveError) {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    let result = db
        .execute_prepared(
            "UPDATE analytics.archives SET last_error = $2, updated_at = now() WHERE month = $1",
            &[(&month, Type::DATE), (&text, Type::TEXT)],
        )
        .await;
    if let Err(e) = result {
        tracing::warn!(%month, error = %e, "could not record the archive error");
    }
}

/// Where a month's partition stands in the catalogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PartitionStatus {
    /// The table exists.
    pub(crate) exists: bool,
    /// It is a partition of `analytics.events`.
    pub(crate) attached: bool,
    /// A `DETACH … CONCURRENTLY` was interrupted: it needs `FINALIZE`.
    pub(crate) detach_pending: bool,
}

/// The status of `analytics.<partition>`.
pub(crate) async fn partition_status(
    db: &impl Prepared,
    partition: &str,
) -> Result<PartitionStatus, ArchiveError> {
    let qualified = format!("analytics.{partition}");
    let row = db
        .query_prepared_one(
            "SELECT to_regclass($1) IS NOT NULL,
                    i.inhrelid IS NOT NULL,
                    coalesce(i.inhdetachpending, false)
               FROM (SELECT 1) AS one
               LEFT JOIN pg_inherits i
                 ON i.inhrelid = to_regclass($1)
                AND i.inhparent = 'analytics.events'::regclass",
            &[(&qualified, Type::TEXT)],
        )
        .await
        .map_err(AnalyticsError::from_query)?;
    let q = |e| ArchiveError::Database(AnalyticsError::from_query(e));
    Ok(PartitionStatus {
        exists: row.try_get(0).map_err(q)?,
        attached: row.try_get(1).map_err(q)?,
        detach_pending: row.try_get(2).map_err(q)?,
    })
}

/// The months with an attached partition, oldest first.
pub(crate) async fn partition_months(db: &impl Prepared) -> Result<Vec<NaiveDate>, ArchiveError> {
    let rows = db
        .query_prepared(
            "SELECT c.relname FROM pg_inherits i
               JOIN pg_class c ON c.oid = i.inhrelid
              WHERE i.inhparent = 'analytics.events'::regclass",
            &[],
        )
        .await
        .map_err(AnalyticsError::from_query)?;
    let mut months: Vec<NaiveDate> = rows
        .iter()
        .filter_map(|row| {
            let name: &str = row.try_get(0).ok()?;
            month_of_partition(name)
        })
        .collect();
    months.sort_unstable();
    Ok(months)
}

/// The month of a partition named by `partition_name` (`events_y2024m01`).
fn month_of_partition(name: &str) -> Option<NaiveDate> {
    let rest = name.strip_prefix("events_y")?;
    let (year, month) = rest.split_once('m')?;
    NaiveDate::from_ymd_opt(year.parse().ok()?, month.parse().ok()?, 1)
}

/// Rows of `[from, to)` in the default partition.
pub(crate) async fn rows_in_default(
    db: &impl Prepared,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<i64, ArchiveError> {
    let row = db
        .query_prepared_one(
            "SELECT count(*) FROM analytics.events_default WHERE created_at >= $1 AND created_at < $2",
            &[(&from, Type::TIMESTAMPTZ), (&to, Type::TIMESTAMPTZ)],
        )
        .await
        .map_err(AnalyticsError::from_query)?;
    row.try_get(0)
        .map_err(|e| ArchiveError::Database(AnalyticsError::from_query(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names_give_their_month_back() {
        let month = NaiveDate::from_ymd_opt(2024, 3, 1).unwrap();
        assert_eq!(
            month_of_partition(&crate::postgres::partition_name(month)),
            Some(month)
        );
        assert_eq!(month_of_partition("events_default"), None);
    }
}
