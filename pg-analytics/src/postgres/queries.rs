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

/// The dashboard document of `rows`.
pub fn render_dashboard(plan: Plan, since: NaiveDate, rows: &[DashboardRow]) -> Vec<u8> {
    #[derive(Serialize)]
    struct Document<'a> {
        plan: Plan,
        since: NaiveDate,
        rows: &'a [DashboardRow],
    }
    // Serializing plain data into memory cannot fail.
    serde_json::to_vec(&Document { plan, since, rows }).unwrap_or_default()
}

fn row_from(row: &Row) -> Result<DashboardRow, AnalyticsError> {
    let q = AnalyticsError::from_query;
    dashboard_row(
        TenantId(row.try_get(0).map_err(q)?),
        row.try_get(1).map_err(q)?,
        row.try_get(2).map_err(q)?,
        row.try_get(3).map_err(q)?,
    )
}

fn dashboard_row(
    tenant_id: TenantId,
    day: NaiveDate,
    events: i64,
    sum_processing_time_us: i64,
) -> Result<DashboardRow, AnalyticsError> {
    let totals = DayTotals {
        events,
        sum_processing_time_us,
    };
    Ok(DashboardRow {
        tenant_id,
        day,
        events,
        sum_processing_time_us,
        avg_processing_time_ms: totals
            .avg_processing_time_ms()
            .ok_or_else(|| AnalyticsError::Corrupt("a rollup row with no events".into()))?,
    })
}

impl Analytics {
    /// The dashboard from the rollup: for each of the plan's tenants, one
    /// index-only range scan of `events_daily`'s primary key (which
    /// carries the counts and sums), whatever the number of events. Each
    /// tenant's days come back as three arrays in one row, which costs the
    /// database and the client far less than a row per day (the answer of
    /// the seed's question is 219,000 days for 300 tenants); the rows are
    /// put newest first here rather than sorted by the database.
    pub async fn dashboard(
        &self,
        plan: Plan,
        since: NaiveDate,
    ) -> Result<Vec<DashboardRow>, AnalyticsError> {
        let conn = self.pool.get().await.map_err(AnalyticsError::from_pool)?;
        let tenants = conn
            .query_prepared(
                // The aggregate keeps the subquery from being flattened into
                // a join, which the planner may turn into a sequential scan
                // of the whole rollup and a hash join (seen at 20M rows:
                // 250 ms against 45 ms).
                "SELECT t.id, x.days, x.events, x.sums
                   FROM analytics.tenants t
                  CROSS JOIN LATERAL (
                        SELECT array_agg(d.day) AS days,
                               array_agg(d.events) AS events,
                               array_agg(d.sum_processing_time_us) AS sums
                          FROM analytics.events_daily d
                         WHERE d.tenant_id = t.id AND d.day >= $2 AND d.events > 0) x
                  WHERE t.plan = $1 AND x.days IS NOT NULL
                  ORDER BY t.id",
                &[(&plan.as_str(), Type::TEXT), (&since, Type::DATE)],
            )
            .await
            .map_err(AnalyticsError::from_query)?;
        // Newest day first, then by tenant: the tenants come in id order,
        // so placing each row in its day's bucket keeps that order within
        // a day (a counting sort over the days, linear in the rows).
        let mut per_tenant = Vec::with_capacity(tenants.len());
        let (mut first, mut last) = (NaiveDate::MAX, NaiveDate::MIN);
        for tenant in &tenants {
            let q = AnalyticsError::from_query;
            let id = TenantId(tenant.try_get(0).map_err(q)?);
            let days: Vec<NaiveDate> = tenant.try_get(1).map_err(q)?;
            let events: Vec<i64> = tenant.try_get(2).map_err(q)?;
            let sums: Vec<i64> = tenant.try_get(3).map_err(q)?;
            if events.len() != days.len() || sums.len() != days.len() {
                return Err(AnalyticsError::Corrupt(format!(
                    "tenant {id}: {} days, {} counts, {} sums",
                    days.len(),
                    events.len(),
                    sums.len()
                )));
            }
            for day in &days {
                first = first.min(*day);
                last = last.max(*day);
            }
            per_tenant.push((id, days, events, sums));
        }
        let span = usize::try_from((last - first).num_days() + 1).unwrap_or(0);
        let total: usize = per_tenant.iter().map(|(_, days, _, _)| days.len()).sum();
        if span > total.saturating_mul(4).max(1_024) {
            // A few days far apart (a stray old timestamp): buckets would
            // cost more than sorting.
            let mut rows = Vec::with_capacity(total);
            for (id, days, events, sums) in per_tenant {
                for ((day, events), sum) in days.into_iter().zip(events).zip(sums) {
                    rows.push(dashboard_row(id, day, events, sum)?);
                }
            }
            rows.sort_by(|a, b| b.day.cmp(&a.day).then(a.tenant_id.cmp(&b.tenant_id)));
            return Ok(rows);
        }
        let mut by_day: Vec<Vec<DashboardRow>> = vec![Vec::new(); span];
        for (id, days, events, sums) in per_tenant {
            for ((day, events), sum) in days.into_iter().zip(events).zip(sums) {
                let slot = usize::try_from((last - day).num_days()).unwrap_or(0);
                if let Some(bucket) = by_day.get_mut(slot) {
                    bucket.push(dashboard_row(id, day, events, sum)?);
                }
            }
        }
        Ok(by_day.concat())
    }

    /// [`Analytics::dashboard`] as the JSON document the HTTP API serves
    /// and the cache stores:
    /// `{"plan":"enterprise","since":"2024-01-01","rows":[{"tenant_id":7,"day":"2026-12-01","events":120,"sum_processing_time_us":5400000,"avg_processing_time_ms":45.0}]}`.
    pub async fn dashboard_json(
        &self,
        plan: Plan,
        since: NaiveDate,
    ) -> Result<Vec<u8>, AnalyticsError> {
        let rows = self.dashboard(plan, since).await?;
        Ok(render_dashboard(plan, since, &rows))
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
