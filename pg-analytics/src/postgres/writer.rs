//! [`EventWriter`]: ingest with binary `COPY`, the rollup maintained in the
//! same transaction, each batch committed once.

use std::collections::HashSet;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use pg_kit::Prepared;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;
use uuid::Uuid;

use super::{Analytics, AnalyticsError, HORIZON_LOCK_KEY};
use crate::model::{Event, RejectReason, TenantId, ValidEvent};
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
    /// Rows refused, with their reasons; nothing of them was written. On a
    /// replay: the rows the first commit refused, as it refused them.
    pub rejected: Vec<Rejected>,
    /// The batch id had been committed before: nothing was written now.
    pub replayed: bool,
    /// The tenants whose rows this call committed, in id order (empty on a
    /// replay).
    pub tenants: Vec<TenantId>,
}

/// Writes batches of events: validates each row, then in one transaction
/// records the batch id, `COPY`s the valid rows in binary and adds their
/// totals to the rollup. A batch is all or nothing, and a batch id is
/// committed once, so a retry after an unknown outcome neither loses nor
/// double-counts rows. Cheap to clone; clones share the in-flight limit.
///
/// The batch id is recorded with a SHA-256 of the batch's events and the
/// answer given (the refused rows): a replay with the same events gets that
/// answer back, whatever the rules, the tenants or the horizon say now; a
/// replay with other events is refused
/// ([`AnalyticsError::IdempotencyKeyReused`]). A batch of which no row was
/// accepted writes nothing and records nothing, so a corrected batch sent
/// again under the same id is written.
///
/// Rows created before the archived horizon ([`Analytics::archive_horizon`],
/// raised by the archiver before it detaches a month) are refused with
/// [`RejectReason::BeforeArchivedHorizon`]: the batch's transaction takes
/// the advisory lock [`HORIZON_LOCK_KEY`] shared before it reads the
/// horizon, and the archiver takes it exclusive to raise it, so the raise
/// waits for batches in flight and no batch that commits after it writes
/// into an archived month.
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
            });
        }
        let digest = events_digest(events);
        let (mut indices, mut valid, rejected) = self.check(events).await?;
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
        // The archive fence (see HORIZON_LOCK_KEY): the shared lock is the
        // transaction's first lock, and the horizon is read by a statement
        // of its own, whose snapshot is taken once the lock is granted and
        // so sees a raise committed by an archiver that held it. Rows the
        // rules let through but the horizon refuses are reported like any
        // other refusal.
        let fenced = if valid.is_empty() {
            Vec::new()
        } else {
            tx.execute_prepared(
                "SELECT pg_advisory_xact_lock_shared($1)",
                &[(&HORIZON_LOCK_KEY, Type::INT8)],
            )
            .await
            .map_err(AnalyticsError::from_query)?;
            let row = tx
                .query_prepared_one("SELECT archived_before FROM analytics.archive_horizon", &[])
                .await
                .map_err(AnalyticsError::from_query)?;
            let horizon: Option<DateTime<Utc>> =
                row.try_get(0).map_err(AnalyticsError::from_query)?;
            match horizon {
                Some(horizon) => fence(&mut indices, &mut valid, horizon),
                None => Vec::new(),
            }
        };
        // The answer of this attempt: the rules' refusals and the fence's.
        let mut answer = rejected.clone();
        if !fenced.is_empty() {
            answer.extend(fenced);
            answer.sort_by_key(|r| r.index);
        }
        if valid.is_empty() {
            // Nothing to write, so nothing is recorded: a retry under this
            // id with corrected rows writes them. Unless an earlier attempt
            // committed under this id, whose answer stands.
            let stored = stored_batch(&tx, batch_id).await?;
            let _ = tx.rollback().await;
            return match stored {
                Some(stored) => stored.replay(batch_id, &digest, rejected),
                None => Ok(IngestReport {
                    batch_id,
                    accepted: 0,
                    rejected: answer,
                    replayed: false,
                    tenants: Vec::new(),
                }),
            };
        }
        let rows = i32::try_from(valid.len()).unwrap_or(i32::MAX);
        let digest_bytes: &[u8] = &digest;
        let answer_index: Vec<i32> = answer
            .iter()
            .map(|r| i32::try_from(r.index).unwrap_or(i32::MAX))
            .collect();
        let answer_code: Vec<&str> = answer.iter().map(|r| r.code).collect();
        let answer_reason: Vec<&str> = answer.iter().map(|r| r.reason.as_str()).collect();
        // A concurrent attempt under the same id waits here for the other's
        // outcome (the primary key's insert), then conflicts or inserts.
        let first = tx
            .query_prepared_opt(
                "INSERT INTO analytics.ingest_batches
                        (batch_id, rows, events_sha256, rejected_index, rejected_code, rejected_reason)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (batch_id) DO NOTHING RETURNING 1",
                &[
                    (&batch_id, Type::UUID),
                    (&rows, Type::INT4),
                    (&digest_bytes, Type::BYTEA),
                    (&answer_index, Type::INT4_ARRAY),
                    (&answer_code, Type::TEXT_ARRAY),
                    (&answer_reason, Type::TEXT_ARRAY),
                ],
            )
            .await
            .map_err(AnalyticsError::from_query)?;
        if first.is_none() {
            let stored = stored_batch(&tx, batch_id).await?.ok_or_else(|| {
                AnalyticsError::Corrupt(format!(
                    "the batch {batch_id} conflicted but is not stored"
                ))
            })?;
            let _ = tx.rollback().await;
            return stored.replay(batch_id, &digest, rejected);
        }
        let rejected = answer;
        let mut tenants: Vec<i64> = valid.iter().map(|v| v.tenant_id.0).collect();
        tenants.sort_unstable();
        tenants.dedup();
        if !valid.is_empty() {
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

/// What a batch id's first commit recorded (migration 0004).
struct StoredBatch {
    rows: i32,
    /// `None` on a batch committed before the digest was recorded.
    digest: Option<Vec<u8>>,
    index: Vec<i32>,
    code: Vec<String>,
    reason: Vec<String>,
}

/// The record of `batch_id`, if committed.
async fn stored_batch(
    db: &impl Prepared,
    batch_id: Uuid,
) -> Result<Option<StoredBatch>, AnalyticsError> {
    let Some(row) = db
        .query_prepared_opt(
            "SELECT rows, events_sha256, rejected_index, rejected_code, rejected_reason
               FROM analytics.ingest_batches WHERE batch_id = $1",
            &[(&batch_id, Type::UUID)],
        )
        .await
        .map_err(AnalyticsError::from_query)?
    else {
        return Ok(None);
    };
    let q = AnalyticsError::from_query;
    Ok(Some(StoredBatch {
        rows: row.try_get(0).map_err(q)?,
        digest: row.try_get(1).map_err(q)?,
        index: row.try_get(2).map_err(q)?,
        code: row.try_get(3).map_err(q)?,
        reason: row.try_get(4).map_err(q)?,
    }))
}

impl StoredBatch {
    /// The answer to a replay of this batch with events hashing to
    /// `digest`; `now` are the rows the rules refuse now, answered only for
    /// a batch recorded without its answer (before migration 0004).
    fn replay(
        self,
        batch_id: Uuid,
        digest: &[u8; 32],
        now: Vec<Rejected>,
    ) -> Result<IngestReport, AnalyticsError> {
        let rejected = match self.digest {
            // Recorded before the answers were: the refusals computed now
            // (the fence left out: the horizon may have risen over rows the
            // first commit wrote).
            None => now,
            Some(stored) if stored.as_slice() != digest.as_slice() => {
                return Err(AnalyticsError::IdempotencyKeyReused { batch_id });
            }
            Some(_) => {
                let corrupt = || {
                    AnalyticsError::Corrupt(format!(
                        "the recorded answer of batch {batch_id} is not valid"
                    ))
                };
                if self.index.len() != self.code.len() || self.code.len() != self.reason.len() {
                    return Err(corrupt());
                }
                self.index
                    .into_iter()
                    .zip(self.code)
                    .zip(self.reason)
                    .map(|((index, code), reason)| {
                        Ok(Rejected {
                            index: usize::try_from(index).map_err(|_| corrupt())?,
                            code: RejectReason::code_named(&code).ok_or_else(corrupt)?,
                            reason,
                        })
                    })
                    .collect::<Result<Vec<_>, AnalyticsError>>()?
            }
        };
        Ok(IngestReport {
            batch_id,
            accepted: usize::try_from(self.rows).unwrap_or(0),
            rejected,
            replayed: true,
            tenants: Vec::new(),
        })
    }
}

/// The SHA-256 of a canonical encoding of `events`, which tells a replay
/// from another batch under the same id. Every field goes in, fixed-width
/// and big-endian, the event type length-prefixed (so no two batches
/// encode alike), the timestamp as seconds and nanoseconds (the instant,
/// whatever offset it was sent with), the processing time as its IEEE bits
/// (any NaN as one NaN: they are refused alike).
fn events_digest(events: &[Event]) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(b"ferrokeel-pg-analytics events v1\0");
    hash.update((events.len() as u64).to_be_bytes());
    for event in events {
        hash.update(event.tenant_id.0.to_be_bytes());
        hash.update(event.created_at.timestamp().to_be_bytes());
        hash.update(event.created_at.timestamp_subsec_nanos().to_be_bytes());
        hash.update((event.event_type.len() as u64).to_be_bytes());
        hash.update(event.event_type.as_bytes());
        let ms = if event.processing_time_ms.is_nan() {
            f64::NAN
        } else {
            event.processing_time_ms
        };
        hash.update(ms.to_bits().to_be_bytes());
    }
    hash.finalize().into()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn event(tenant: i64, kind: &str, ms: f64) -> Event {
        Event {
            tenant_id: TenantId(tenant),
            created_at: DateTime::from_timestamp(1_700_000_000, 5).unwrap(),
            event_type: kind.into(),
            processing_time_ms: ms,
        }
    }

    #[test]
    fn the_digest_tells_batches_apart_and_ignores_how_they_were_sent() {
        let batch = vec![event(1, "ab", 1.0), event(2, "c", 2.0)];
        let same = events_digest(&batch);
        assert_eq!(events_digest(&batch.clone()), same);
        // Order, every field, and where one event type ends.
        let mut swapped = batch.clone();
        swapped.swap(0, 1);
        let mut later = batch.clone();
        later[0].created_at += chrono::TimeDelta::nanoseconds(1);
        let others = [
            swapped,
            vec![event(1, "a", 1.0), event(2, "bc", 2.0)],
            vec![event(1, "ab", 1.0), event(3, "c", 2.0)],
            vec![event(1, "ab", 1.0), event(2, "c", 2.5)],
            vec![event(1, "ab", 1.0)],
            later,
        ];
        for other in others {
            assert_ne!(events_digest(&other), same, "{other:?}");
        }
        // The same instant at another offset is the same event.
        let offset = chrono::FixedOffset::east_opt(3600).unwrap();
        let mut shifted = batch.clone();
        shifted[0].created_at = batch[0]
            .created_at
            .with_timezone(&offset)
            .with_timezone(&Utc);
        assert_eq!(events_digest(&shifted), same);
    }
}
