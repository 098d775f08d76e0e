//! [`EventWriter`]: ingest with binary `COPY`, the rollup maintained in the
//! same transaction, each batch committed once.

use std::collections::HashSet;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use pg_kit::Prepared;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;
use uuid::Uuid;

use super::{Analytics, AnalyticsError};
use crate::model::{Event, Plan, RejectReason, TenantId, ValidEvent};
use crate::rollup::aggregate;

/// How an [`EventWriter`] runs.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct WriterConfig {
    /// Batches in flight at once, each on its own pooled connection; a
    /// caller beyond that waits (backpressure). Default 4.
    pub max_in_flight: usize,
    /// The most rows one batch may hold. Default 50,000.
    pub max_batch_rows: usize,
}

impl Default for WriterConfig {
    fn default() -> WriterConfig {
        WriterConfig {
            max_in_flight: 4,
            max_batch_rows: 50_000,
        }
    }
}

impl WriterConfig {
    /// Sets [`WriterConfig::max_in_flight`] (at least 1).
    pub fn with_max_in_flight(mut self, n: usize) -> WriterConfig {
        self.max_in_flight = n.max(1);
        self
    }

    /// Sets [`WriterConfig::max_batch_rows`] (at least 1).
    pub fn with_max_batch_rows(mut self, n: usize) -> WriterConfig {
        self.max_batch_rows = n.max(1);
        self
    }
}

/// A row of a batch that was not written, and why.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Rejected {
    /// Its position in the batch (from 0).
    pub index: usize,
    /// The reason's stable code.
    pub code: &'static str,
    /// The reason, for people.
    pub reason: String,
}

impl Rejected {
    /// Row `index` rejected for `reason`.
    pub fn new(index: usize, reason: &RejectReason) -> Rejected {
        Rejected {
            index,
            code: reason.code(),
            reason: reason.to_string(),
        }
    }
}

/// What a batch came to. Returned only after its commit.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct IngestReport {
    /// The batch's id.
    pub batch_id: Uuid,
    /// Rows written (on a replay: the rows the first commit wrote).
    pub accepted: usize,
    /// Rows refused, with their reasons; nothing of them was written.
    pub rejected: Vec<Rejected>,
    /// The batch id had been committed before: nothing was written now.
    pub replayed: bool,
    /// The tenants whose rows this call committed, in id order (empty on a
    /// replay).
    pub tenants: Vec<TenantId>,
    /// Their plans at commit, in order (empty on a replay). The tenants'
    /// rows are locked `FOR SHARE` in the batch's transaction, so a plan
    /// change waits for the batch and is seen by whoever invalidates after
    /// it (the dashboard cache).
    pub plans: Vec<Plan>,
}

/// Writes batches of events: validates each row, then in one transaction
/// records the batch id, `COPY`s the valid rows in binary and adds their
/// totals to the rollup. A batch is all or nothing, and a batch id is
/// committed once, so a retry after an unknown outcome neither loses nor
/// double-counts rows. Cheap to clone; clones share the in-flight limit.
///
/// Rows created before the archived horizon ([`Analytics::archive_horizon`],
/// raised by the archiver before it detaches a month) are refused with
/// [`RejectReason::BeforeArchivedHorizon`]: the horizon is read `FOR SHARE`
/// in the batch's transaction, so the archiver's raise waits for batches in
/// flight and no batch that commits after it writes into an archived month.
#[derive(Clone, Debug)]
pub struct EventWriter {
    store: Analytics,
    config: WriterConfig,
    in_flight: Arc<Semaphore>,
}

impl EventWriter {
    pub(super) fn new(store: Analytics, config: WriterConfig) -> EventWriter {
        EventWriter {
            in_flight: Arc::new(Semaphore::new(config.max_in_flight.max(1))),
            store,
            config,
        }
    }

    /// Writes `events` as the batch `batch_id` (give a retry the same id).
    /// Returns once the valid rows are committed; the invalid ones are
    /// listed in the report. A batch over
    /// [`WriterConfig::max_batch_rows`] is refused whole.
    pub async fn write(
        &self,
        batch_id: Uuid,
        events: &[Event],
    ) -> Result<IngestReport, AnalyticsError> {
        if events.len() > self.config.max_batch_rows {
            let reason = RejectReason::Malformed(format!(
                "the batch has {} rows; at most {} are accepted",
                events.len(),
                self.config.max_batch_rows
            ));
            return Ok(IngestReport {
                batch_id,
                accepted: 0,
                rejected: (0..events.len())
                    .map(|i| Rejected::new(i, &reason))
                    .collect(),
                replayed: false,
                tenants: Vec::new(),
                plans: Vec::new(),
            });
        }
        let (mut indices, mut valid, mut rejected) = self.check(events).await?;
        let _permit = self
            .in_flight
            .acquire()
            .await
            .map_err(|e| AnalyticsError::Unavailable(Box::new(e)))?;
        let mut conn = self
            .store
            .pool
            .get()
            .await
            .map_err(AnalyticsError::from_pool)?;
        let tx = conn.begin().await.map_err(AnalyticsError::from_query)?;
        // The archive fence, read in this transaction and held `FOR SHARE`
        // until its commit (see the type's docs). Rows the rules let through
        // but the horizon refuses are reported like any other refusal.
        let fenced = if valid.is_empty() {
            Vec::new()
        } else {
            let row = tx
                .query_prepared_one(
                    "SELECT archived_before FROM analytics.archive_horizon FOR SHARE",
                    &[],
                )
                .await
                .map_err(AnalyticsError::from_query)?;
            let horizon: Option<DateTime<Utc>> =
                row.try_get(0).map_err(AnalyticsError::from_query)?;
            match horizon {
                Some(horizon) => fence(&mut indices, &mut valid, horizon),
                None => Vec::new(),
            }
        };
        let rows = i32::try_from(valid.len()).unwrap_or(i32::MAX);
        let first = tx
            .query_prepared_opt(
                "INSERT INTO analytics.ingest_batches (batch_id, rows) VALUES ($1, $2)
                 ON CONFLICT (batch_id) DO NOTHING RETURNING 1",
                &[(&batch_id, Type::UUID), (&rows, Type::INT4)],
            )
            .await
            .map_err(AnalyticsError::from_query)?;
        if first.is_none() {
            let stored = tx
                .query_prepared_one(
                    "SELECT rows FROM analytics.ingest_batches WHERE batch_id = $1",
                    &[(&batch_id, Type::UUID)],
                )
                .await
                .map_err(AnalyticsError::from_query)?;
            let accepted: i32 = stored.get(0);
            let _ = tx.rollback().await;
            // The rows refused now are the rows refused then (the rules
            // and the tenants only ever widen). The fence is left out: the
            // horizon may have risen over rows the first commit wrote.
            return Ok(IngestReport {
                batch_id,
                accepted: usize::try_from(accepted).unwrap_or(0),
                rejected,
                replayed: true,
                tenants: Vec::new(),
                plans: Vec::new(),
            });
        }
        if !fenced.is_empty() {
            rejected.extend(fenced);
            rejected.sort_by_key(|r| r.index);
        }
        let mut tenants: Vec<i64> = valid.iter().map(|v| v.tenant_id.0).collect();
        tenants.sort_unstable();
        tenants.dedup();
        let mut plans = Vec::new();
        if !valid.is_empty() {
            // The tenants' plans as of this commit; in id order, so that
            // batches lock shared tenant rows in one order.
            for row in tx
                .query_prepared(
                    "SELECT plan FROM analytics.tenants WHERE id = ANY($1) ORDER BY id FOR SHARE",
                    &[(&tenants, Type::INT8_ARRAY)],
                )
                .await
                .map_err(AnalyticsError::from_query)?
            {
                let name: &str = row.try_get(0).map_err(AnalyticsError::from_query)?;
                let plan: Plan = name.parse().map_err(|e: crate::model::UnknownPlan| {
                    AnalyticsError::Corrupt(e.to_string())
                })?;
                plans.push(plan);
            }
            plans.sort_unstable();
            plans.dedup();
            let sink = tx
                .copy_in(
                    "COPY analytics.events (tenant_id, created_at, event_type, processing_time_us)
                     FROM STDIN (FORMAT binary)",
                )
                .await
                .map_err(|e| noted(&tx, e))?;
            let writer = BinaryCopyInWriter::new(
                sink,
                &[Type::INT8, Type::TIMESTAMPTZ, Type::TEXT, Type::INT8],
            );
            let mut writer = std::pin::pin!(writer);
            for event in &valid {
                writer
                    .as_mut()
                    .write(&[
                        &event.tenant_id.0,
                        &event.created_at,
                        &event.event_type,
                        &event.processing_time_us,
                    ])
                    .await
                    .map_err(|e| noted(&tx, e))?;
            }
            writer.finish().await.map_err(|e| noted(&tx, e))?;
            // The batch's totals, in key order: concurrent batches lock the
            // rollup rows they share in the same order.
            let totals = aggregate(&valid);
            let mut tenants = Vec::with_capacity(totals.len());
            let mut days = Vec::with_capacity(totals.len());
            let mut counts = Vec::with_capacity(totals.len());
            let mut sums = Vec::with_capacity(totals.len());
            for ((tenant, day), t) in &totals {
                tenants.push(tenant.0);
                days.push(*day);
                counts.push(t.events);
                sums.push(t.sum_processing_time_us);
            }
            tx.execute_prepared(
                "INSERT INTO analytics.events_daily AS d (tenant_id, day, events, sum_processing_time_us)
                 SELECT * FROM unnest($1::int8[], $2::date[], $3::int8[], $4::int8[])
                 ORDER BY 1, 2
                 ON CONFLICT (tenant_id, day) DO UPDATE
                    SET events = d.events + EXCLUDED.events,
                        sum_processing_time_us = d.sum_processing_time_us + EXCLUDED.sum_processing_time_us",
                &[
                    (&tenants, Type::INT8_ARRAY),
                    (&days, Type::DATE_ARRAY),
                    (&counts, Type::INT8_ARRAY),
                    (&sums, Type::INT8_ARRAY),
                ],
            )
            .await
            .map_err(AnalyticsError::from_query)?;
        }
        // A commit whose answer is lost leaves the outcome unknown: the
        // caller retries under the same batch id, which tells.
        tx.commit().await.map_err(AnalyticsError::from_query)?;
        Ok(IngestReport {
            batch_id,
            accepted: valid.len(),
            rejected,
            replayed: false,
            tenants: tenants.into_iter().map(TenantId).collect(),
            plans,
        })
    }

    /// Splits `events` into the rows to write (with their positions in the
    /// batch) and the rejected ones.
    async fn check(
        &self,
        events: &[Event],
    ) -> Result<(Vec<usize>, Vec<ValidEvent>, Vec<Rejected>), AnalyticsError> {
        let now = chrono::DateTime::<chrono::Utc>::from(self.store.clock.now());
        let mut indices = Vec::with_capacity(events.len());
        let mut valid = Vec::with_capacity(events.len());
        let mut rejected = Vec::new();
        let mut checked = Vec::with_capacity(events.len());
        for (index, event) in events.iter().enumerate() {
            match self.store.rules.check(event, now) {
                Ok(v) => checked.push((index, v)),
                Err(reason) => rejected.push(Rejected::new(index, &reason)),
            }
        }
        let ids: HashSet<i64> = checked.iter().map(|(_, v)| v.tenant_id.0).collect();
        let unknown = self.store.tenants.unknown(&self.store, &ids).await?;
        for (index, v) in checked {
            if unknown.contains(&v.tenant_id.0) {
                rejected.push(Rejected::new(
                    index,
                    &RejectReason::UnknownTenant(TenantId(v.tenant_id.0)),
                ));
            } else {
                indices.push(index);
                valid.push(v);
            }
        }
        rejected.sort_by_key(|r| r.index);
        Ok((indices, valid, rejected))
    }
}

/// Removes from `valid` (and their positions from `indices`) the rows
/// created before `horizon`, and returns them as refused.
fn fence(
    indices: &mut Vec<usize>,
    valid: &mut Vec<ValidEvent>,
    horizon: DateTime<Utc>,
) -> Vec<Rejected> {
    if valid.iter().all(|v| v.created_at >= horizon) {
        return Vec::new();
    }
    let mut refused = Vec::new();
    let mut kept_indices = Vec::with_capacity(indices.len());
    let mut kept = Vec::with_capacity(valid.len());
    for (index, v) in indices.drain(..).zip(valid.drain(..)) {
        if v.created_at < horizon {
            refused.push(Rejected::new(
                index,
                &RejectReason::BeforeArchivedHorizon(v.created_at, horizon),
            ));
        } else {
            kept_indices.push(index);
            kept.push(v);
        }
    }
    *indices = kept_indices;
    *valid = kept;
    refused
}

impl Analytics {
    /// The archived horizon: events created before it are refused by the
    /// [`EventWriter`] (their months are archived, or being archived).
    /// `None` while nothing is archived. Raised by the archiver (feature
    /// `archive`) before it detaches a month, lowered by a restore.
    pub async fn archive_horizon(&self) -> Result<Option<DateTime<Utc>>, AnalyticsError> {
        let conn = self.pool.get().await.map_err(AnalyticsError::from_pool)?;
        let row = conn
            .query_prepared_one("SELECT archived_before FROM analytics.archive_horizon", &[])
            .await
            .map_err(AnalyticsError::from_query)?;
        row.try_get(0).map_err(AnalyticsError::from_query)
    }
}

/// `e` from the client used directly, noted on the transaction's
/// connection (so a dead session is not pooled again) and classified.
fn noted(tx: &pg_kit::PgTransaction<'_>, e: tokio_postgres::Error) -> AnalyticsError {
    tx.note_error(&e);
    AnalyticsError::from_query(e)
}
