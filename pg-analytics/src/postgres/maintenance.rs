//! Partition maintenance: one partition of `analytics.events` a month,
//! created ahead of time, and the default partition that catches strays.

use chrono::{Datelike, Months, NaiveDate};
use pg_kit::Prepared;
use tokio_postgres::error::SqlState;

use super::{Analytics, AnalyticsError};

/// The name of the partition holding the month that starts on `month`
/// (`events_y2026m12`).
pub fn partition_name(month: NaiveDate) -> String {
    format!("events_y{:04}m{:02}", month.year(), month.month())
}

/// What [`Analytics::ensure_partitions`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PartitionReport {
    /// The partitions it created, by name.
    pub created: Vec<String>,
    /// The months that already had one.
    pub existing: usize,
}

/// What [`Analytics::maintain`] found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MaintenanceReport {
    /// The partitions made (this month and the months ahead).
    pub partitions: PartitionReport,
    /// Rows in the default partition: months without a partition. Should
    /// be 0; each is a row that a partition would refuse to be made over.
    pub default_partition_rows: i64,
}

fn first_of_month(day: NaiveDate) -> NaiveDate {
    day.with_day(1).unwrap_or(day)
}

impl Analytics {
    /// Makes sure every month from the one holding `from` through
    /// `months_ahead` months after the one holding `to` has its partition.
    /// Safe to run repeatedly and from several processes at once: a
    /// partition another run created meanwhile counts as existing. A month
    /// whose rows already sit in the default partition cannot be created;
    /// the other months still are, and then the first such month is
    /// reported as [`AnalyticsError::PartitionBlocked`].
    pub async fn ensure_partitions(
        &self,
        from: NaiveDate,
        to: NaiveDate,
        months_ahead: u32,
    ) -> Result<PartitionReport, AnalyticsError> {
        let conn = self.pool.get().await.map_err(AnalyticsError::from_pool)?;
        let existing: Vec<String> = conn
            .query_prepared(
                "SELECT c.relname FROM pg_inherits i
                   JOIN pg_class c ON c.oid = i.inhrelid
                   JOIN pg_class p ON p.oid = i.inhparent
                   JOIN pg_namespace n ON n.oid = p.relnamespace
                  WHERE n.nspname = 'analytics' AND p.relname = 'events'",
                &[],
            )
            .await
            .map_err(AnalyticsError::from_query)?
            .iter()
            .map(|row| row.get(0))
            .collect();
        let mut report = PartitionReport::default();
        let mut blocked = None;
        let last = first_of_month(to)
            .checked_add_months(Months::new(months_ahead))
            .unwrap_or(to);
        let mut month = first_of_month(from);
        while month <= last {
            let next = month.checked_add_months(Months::new(1)).unwrap_or(month);
            let name = partition_name(month);
            if existing.contains(&name) {
                report.existing += 1;
            } else {
                // DDL takes no parameters; the dates are formatted from
                // NaiveDate values, never from input text.
                let ddl = format!(
                    "CREATE TABLE IF NOT EXISTS analytics.{name} PARTITION OF analytics.events
                     FOR VALUES FROM ('{month}T00:00:00Z') TO ('{next}T00:00:00Z')"
                );
                match conn.batch_execute(&ddl).await {
                    Ok(()) => {
                        tracing::info!(partition = %name, "partition created");
                        report.created.push(name);
                    }
                    Err(e) if e.code() == Some(&SqlState::CHECK_VIOLATION) => {
                        tracing::warn!(partition = %name, "the default partition holds rows of this month");
                        blocked.get_or_insert(month);
                    }
                    // Created by a concurrent run between the listing and now.
                    Err(e)
                        if e.code() == Some(&SqlState::DUPLICATE_TABLE)
                            || e.code() == Some(&SqlState::UNIQUE_VIOLATION) =>
                    {
                        report.existing += 1;
                    }
                    Err(e) => return Err(AnalyticsError::from_query(e)),
                }
            }
            if next == month {
                break;
            }
            month = next;
        }
        match blocked {
            Some(month) => Err(AnalyticsError::PartitionBlocked { month }),
            None => Ok(report),
        }
    }

    /// The maintenance job's pass, to run at start and then periodically
    /// (hourly is plenty): partitions for the current month (by the store's
    /// clock) and the next `months_ahead`, then the default partition's
    /// row count, logged when not 0.
    pub async fn maintain(&self, months_ahead: u32) -> Result<MaintenanceReport, AnalyticsError> {
        let today = chrono::DateTime::<chrono::Utc>::from(self.clock.now()).date_naive();
        let partitions = self.ensure_partitions(today, today, months_ahead).await?;
        let default_partition_rows = self.default_partition_rows().await?;
        if default_partition_rows > 0 {
            tracing::warn!(
                rows = default_partition_rows,
                "rows in the default partition"
            );
        }
        Ok(MaintenanceReport {
            partitions,
            default_partition_rows,
        })
    }

    /// Rows in the default partition: events whose month had no partition
    /// when they were written (exported as a metric; should stay 0).
    pub async fn default_partition_rows(&self) -> Result<i64, AnalyticsError> {
        let conn = self.pool.get().await.map_err(AnalyticsError::from_pool)?;
        conn.query_prepared_one("SELECT count(*) FROM analytics.events_default", &[])
            .await
            .map(|row| row.get(0))
            .map_err(AnalyticsError::from_query)
    }
}
