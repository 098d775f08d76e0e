//! The seed's dashboard query: events and average processing time per
//! tenant per UTC day, for a plan's tenants, since a date, newest first.

use chrono::{NaiveDate, NaiveTime};
use pg_kit::Prepared;
use serde::Serialize;
use tokio_postgres::Row;
use tokio_postgres::types::Type;

use super::{Analytics, AnalyticsError};
use crate::model::{Plan, TenantId};
use crate::rollup::DayTotals;

/// One row of the dashboard.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DashboardRow {
    /// The tenant.
    pub tenant_id: TenantId,
    /// The UTC day.
    pub day: NaiveDate,
    /// Events that day.
    pub events: i64,
    /// Their summed processing time, in microseconds (exact).
    pub sum_processing_time_us: i64,
    /// Their mean processing time, in milliseconds.
    pub avg_processing_time_ms: f64,
}

fn row_from(row: &Row) -> Result<DashboardRow, AnalyticsError> {
    let totals = DayTotals {
        events: row.try_get(2).map_err(AnalyticsError::from_query)?,
        sum_processing_time_us: row.try_get(3).map_err(AnalyticsError::from_query)?,
    };
    Ok(DashboardRow {
        tenant_id: TenantId(row.try_get(0).map_err(AnalyticsError::from_query)?),
        day: row.try_get(1).map_err(AnalyticsError::from_query)?,
        events: totals.events,
        sum_processing_time_us: totals.sum_processing_time_us,
        avg_processing_time_ms: totals
            .avg_processing_time_ms()
            .ok_or_else(|| AnalyticsError::Corrupt("a rollup row with no events".into()))?,
    })
}

impl Analytics {
    /// The dashboard from the rollup: one index range per day on
    /// `events_daily`'s primary key, whatever the events' number.
    pub async fn dashboard(
        &self,
        plan: Plan,
        since: NaiveDate,
    ) -> Result<Vec<DashboardRow>, AnalyticsError> {
        let conn = self.pool.get().await.map_err(AnalyticsError::from_pool)?;
        conn.query_prepared(
            "SELECT d.tenant_id, d.day, d.events, d.sum_processing_time_us
               FROM analytics.events_daily d
              WHERE d.day >= $2
                AND d.tenant_id IN (SELECT id FROM analytics.tenants WHERE plan = $1)
                AND d.events > 0
              ORDER BY d.day DESC, d.tenant_id",
            &[(&plan.as_str(), Type::TEXT), (&since, Type::DATE)],
        )
        .await
        .map_err(AnalyticsError::from_query)?
        .iter()
        .map(row_from)
        .collect()
    }

    /// The same answer computed from `events` (the correctness reference):
    /// partitions before `since` are pruned, and the plan's tenants are a
    /// semi-join.
    pub async fn dashboard_raw(
        &self,
        plan: Plan,
        since: NaiveDate,
    ) -> Result<Vec<DashboardRow>, AnalyticsError> {
        let since = since.and_time(NaiveTime::MIN).and_utc();
        let conn = self.pool.get().await.map_err(AnalyticsError::from_pool)?;
        conn.query_prepared(
            "SELECT e.tenant_id, (e.created_at AT TIME ZONE 'UTC')::date AS day,
                    count(*), sum(e.processing_time_us)::bigint
               FROM analytics.events e
              WHERE e.created_at >= $2
                AND e.tenant_id IN (SELECT id FROM analytics.tenants WHERE plan = $1)
              GROUP BY 1, 2
              ORDER BY day DESC, e.tenant_id",
            &[(&plan.as_str(), Type::TEXT), (&since, Type::TIMESTAMPTZ)],
        )
        .await
        .map_err(AnalyticsError::from_query)?
        .iter()
        .map(row_from)
        .collect()
    }
}
