//! [`Archiver`]: the steps of archival and restore, each recorded in the
//! manifest before the next starts.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Datelike, Months, NaiveDate, NaiveTime, Utc};
use futures_util::StreamExt;
use object_store::ObjectStore;
use object_store::path::Path as ObjectPath;
use pg_kit::Prepared;
use time_kit::SharedClock;
use tokio::sync::mpsc;
use tokio_postgres::binary_copy::{BinaryCopyInWriter, BinaryCopyOutRow, BinaryCopyOutStream};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;

use super::error::{ArchiveError, Mismatch, NotEligible, StateName};
use super::format::{self, ArchiveWriter, ArchivedRow, CHUNK_ROWS, Totals, Written};
use super::store::{self, Scratch};
use super::{
    AbortReport, ArchiveConfig, ArchiveRecord, ArchiveReport, ArchiveState, DueReport,
    MonthFailure, RestoreReport, Step, VerifyReport, manifest,
};
use crate::postgres::{Analytics, AnalyticsError, HORIZON_LOCK_KEY, partition_name};

/// The first key of the advisory locks archivers take, one per month (the
/// second key is `yyyymm`): "Arch".
const LOCK_CLASS: i32 = 0x4172_6368;

/// The columns of `analytics.events`, as binary `COPY` sends them.
const COPY_TYPES: [Type; 4] = [Type::INT8, Type::TIMESTAMPTZ, Type::TEXT, Type::INT8];

/// Archives old months of an [`Analytics`] store into an object store,
/// verifies them, drops their partitions, and restores them (see the
/// [module docs](super)). Runs on the same month serialize on an advisory
/// lock (a second one gets [`ArchiveError::Busy`]); different months may be
/// archived at once. A run holds one pooled connection for that lock and
/// takes one or two more for its steps: give the pool at least 3. Cheap to
/// clone.
#[derive(Clone)]
pub struct Archiver {
    store: Analytics,
    objects: Arc<dyn ObjectStore>,
    config: ArchiveConfig,
    clock: SharedClock,
}

impl std::fmt::Debug for Archiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Archiver")
            .field("objects", &self.objects.to_string())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// What a verification read: the object's rows, size and hash.
struct Checked {
    rows: u64,
    bytes: u64,
    sha256: String,
}

/// The first day of `day`'s month.
fn first_of_month(day: NaiveDate) -> NaiveDate {
    day.with_day(1).unwrap_or(day)
}

/// The first day of the month after `month`.
fn next_month(month: NaiveDate) -> NaiveDate {
    month
        .checked_add_months(Months::new(1))
        .unwrap_or(NaiveDate::MAX)
}

/// Midnight UTC starting `day`.
fn start_of(day: NaiveDate) -> DateTime<Utc> {
    day.and_time(NaiveTime::MIN).and_utc()
}

/// The `COPY` that streams a partition out in archive order (`event_type`
/// in byte order, whatever the database's collation, so the order is the
/// same on every server).
fn copy_out_sql(qualified: &str) -> String {
    format!(
        "COPY (SELECT tenant_id, created_at, event_type, processing_time_us FROM {qualified}
               ORDER BY tenant_id, created_at, event_type COLLATE \"C\", processing_time_us)
         TO STDOUT (FORMAT binary)"
    )
}

fn decode(row: &BinaryCopyOutRow) -> Result<ArchivedRow, tokio_postgres::Error> {
    Ok(ArchivedRow {
        tenant_id: row.try_get(0)?,
        created_at: row.try_get(1)?,
        event_type: row.try_get(2)?,
        processing_time_us: row.try_get(3)?,
    })
}

fn db(e: tokio_postgres::Error) -> ArchiveError {
    ArchiveError::Database(AnalyticsError::from_query(e))
}

/// A store error saying the object is not there, as the mismatch it is (the
/// object is at fault, not the store); any other error as is.
fn missing_as_mismatch(month: NaiveDate, e: ArchiveError) -> ArchiveError {
    match e {
        ArchiveError::Store {
            path,
            source: object_store::Error::NotFound { .. },
        } => ArchiveError::Verification {
            month,
            mismatch: Mismatch::Missing { path },
        },
        other => other,
    }
}

/// Whether `error` stops [`Archiver::archive_due_report`]: the services are
/// down (the next months would fail alike), or a fault was injected (it
/// stands for a crash). Anything about the month alone does not.
fn stops_the_run(error: &ArchiveError) -> bool {
    match error {
        ArchiveError::Database(e) => e.is_transient(),
        ArchiveError::Store { .. } => error.is_transient(),
        ArchiveError::Injected { .. } => true,
        _ => false,
    }
}

/// Takes the fence's lock exclusive (see [`HORIZON_LOCK_KEY`]) in `tx`:
/// waits for the ingest batches in flight, and holds later ones off until
/// `tx` ends. Taken before any lock an ingest batch may hold or wait for
/// (on `analytics.events`, its partitions, the horizon's row), so that a
/// batch never holds the fence while waiting for this transaction.
async fn lock_fence(tx: &impl Prepared) -> Result<(), ArchiveError> {
    tx.execute_prepared(
        "SELECT pg_advisory_xact_lock($1)",
        &[(&HORIZON_LOCK_KEY, Type::INT8)],
    )
    .await
    .map_err(db)?;
    Ok(())
}

/// Lowers the horizon to the end of the newest month still out of the
/// database or on its way out (none: NULL), in `tx`, which holds the fence's
/// lock; returns it.
async fn lower_horizon(tx: &impl Prepared) -> Result<Option<DateTime<Utc>>, ArchiveError> {
    tx.query_prepared_one(
        "UPDATE analytics.archive_horizon
            SET archived_before = (SELECT max((month + interval '1 month') AT TIME ZONE 'UTC')
                                     FROM analytics.archives
                                    WHERE state NOT IN ('restored', 'aborted')),
                updated_at = now()
         RETURNING archived_before",
        &[],
    )
    .await
    .map_err(db)?
    .try_get(0)
    .map_err(db)
}

fn joined(e: tokio::task::JoinError, path: &std::path::Path) -> ArchiveError {
    ArchiveError::scratch(path, std::io::Error::other(e))
}

/// The first (tenant, day) cell where `archive` and `rollup` differ.
fn first_difference(archive: &Totals, rollup: &Totals) -> Option<Mismatch> {
    let keys: BTreeSet<&(i64, NaiveDate)> = archive.keys().chain(rollup.keys()).collect();
    keys.into_iter().find_map(|key| {
        let a = archive.get(key).copied().unwrap_or((0, 0));
        let r = rollup.get(key).copied().unwrap_or((0, 0));
        (a != r).then_some(Mismatch::Rollup {
            tenant_id: key.0,
            day: key.1,
            archived_events: a.0,
            archived_sum_us: a.1,
            rollup_events: r.0,
            rollup_sum_us: r.1,
        })
    })
}

/// The rollup's cells of `month`.
async fn rollup(db_: &impl Prepared, month: NaiveDate) -> Result<Totals, ArchiveError> {
    let end = next_month(month);
    let rows = db_
        .query_prepared(
            "SELECT tenant_id, day, events, sum_processing_time_us FROM analytics.events_daily
              WHERE day >= $1 AND day < $2",
            &[(&month, Type::DATE), (&end, Type::DATE)],
        )
        .await
        .map_err(db)?;
    let mut totals = BTreeMap::new();
    for row in rows {
        totals.insert(
            (row.try_get(0).map_err(db)?, row.try_get(1).map_err(db)?),
            (row.try_get(2).map_err(db)?, row.try_get(3).map_err(db)?),
        );
    }
    Ok(totals)
}

/// Reads the archive file at `path` on a blocking thread, handing its rows
/// over in chunks through a bounded channel. Dropping the receiver stops
/// the reader.
fn spawn_reader(
    path: &std::path::Path,
    month: NaiveDate,
) -> (
    mpsc::Receiver<Vec<ArchivedRow>>,
    tokio::task::JoinHandle<Result<u64, ArchiveError>>,
) {
    let (tx, rx) = mpsc::channel(2);
    let path = path.to_owned();
    let handle = tokio::task::spawn_blocking(move || {
        format::read_archive(&path, month, CHUNK_ROWS, |chunk| {
            tx.blocking_send(chunk).is_ok()
        })
    });
    (rx, handle)
}

impl Archiver {
    /// An archiver of `store`'s old months into `objects` (for instance
    /// [`local_store`](super::local_store) or
    /// [`store_from_url`](super::store_from_url)). Run
    /// [`Analytics::migrate`] first: the manifest and the horizon come with
    /// the migrations.
    pub fn new(store: Analytics, objects: Arc<dyn ObjectStore>, config: ArchiveConfig) -> Archiver {
        Archiver {
            store,
            objects,
            config,
            clock: time_kit::system(),
        }
    }

    /// Reads "now" (for which months are old enough) from `clock`.
    pub fn with_clock(mut self, clock: SharedClock) -> Archiver {
        self.clock = clock;
        self
    }

    /// The configuration.
    pub fn config(&self) -> &ArchiveConfig {
        &self.config
    }

    /// The first month that is too recent to archive: months starting
    /// before it are eligible.
    pub fn cutoff(&self) -> NaiveDate {
        let today = DateTime::<Utc>::from(self.clock.now()).date_naive();
        let this_month = first_of_month(today);
        this_month
            .checked_sub_months(Months::new(self.config.min_age_months))
            .unwrap_or(NaiveDate::MIN)
    }

    /// The archived horizon (see [`Analytics::archive_horizon`]).
    pub async fn horizon(&self) -> Result<Option<DateTime<Utc>>, ArchiveError> {
        Ok(self.store.archive_horizon().await?)
    }

    /// Every month in the manifest, oldest first.
    pub async fn manifest(&self) -> Result<Vec<ArchiveRecord>, ArchiveError> {
        let conn = self.conn().await?;
        manifest::all(&*conn).await
    }

    /// The manifest row of the month holding `month`.
    pub async fn record(&self, month: NaiveDate) -> Result<Option<ArchiveRecord>, ArchiveError> {
        let conn = self.conn().await?;
        manifest::get(&*conn, first_of_month(month)).await
    }

    /// Finishes every archival a crash left unfinished, then archives every
    /// month older than the cutoff that has a partition, oldest first.
    /// Restored and aborted months are left alone (archive them again with
    /// [`Archiver::archive`]). A month that fails does not stop the others
    /// (see [`DueReport::failed`]); the first failure is returned once every
    /// month was tried, and the months archived meanwhile are recorded in
    /// the manifest. [`Archiver::archive_due_report`] tells both.
    pub async fn archive_due(&self) -> Result<Vec<ArchiveReport>, ArchiveError> {
        let report = self.archive_due_report().await?;
        match report.failed.into_iter().next() {
            Some(failure) => Err(failure.error),
            None => Ok(report.archived),
        }
    }

    /// As [`Archiver::archive_due`], reporting every month: the archived
    /// ones and the failed ones with their errors. Failures of one month
    /// (its verification, rows of it in the default partition, …) are
    /// logged, recorded on its manifest row, and the run goes on to the
    /// next month: a month that keeps failing does not hold the later ones
    /// back. The database or the store being unavailable stops the run.
    /// `Err` only when the due months cannot even be listed.
    pub async fn archive_due_report(&self) -> Result<DueReport, ArchiveError> {
        let cutoff = self.cutoff();
        let (records, partitions) = {
            let conn = self.conn().await?;
            (
                manifest::all(&*conn).await?,
                manifest::partition_months(&*conn).await?,
            )
        };
        let known: BTreeMap<NaiveDate, ArchiveState> =
            records.iter().map(|r| (r.month, r.state)).collect();
        let mut due: BTreeSet<NaiveDate> = records
            .iter()
            .filter(|r| {
                matches!(
                    r.state,
                    ArchiveState::Fenced
                        | ArchiveState::Detached
                        | ArchiveState::Exported
                        | ArchiveState::Verified
                )
            })
            .map(|r| r.month)
            .collect();
        due.extend(
            partitions
                .into_iter()
                .filter(|m| *m < cutoff && !known.contains_key(m)),
        );
        let mut report = DueReport::default();
        let mut months = due.into_iter();
        for month in months.by_ref() {
            match self.archive(month).await {
                Ok(archived) => report.archived.push(archived),
                Err(error) => {
                    let stop = stops_the_run(&error);
                    tracing::warn!(%month, error = %error, stop, "month not archived");
                    report.failed.push(MonthFailure { month, error });
                    if stop {
                        break;
                    }
                }
            }
        }
        report.not_attempted = months.collect();
        Ok(report)
    }

    /// Archives the month holding `month` (any day of it), or resumes its
    /// archival from the state the manifest records, through to the
    /// partition's drop. A month already dropped is reported as is. A month
    /// that is not older than [`Archiver::cutoff`], has no partition, or
    /// has rows in the default partition is refused
    /// ([`ArchiveError::NotEligible`]).
    pub async fn archive(&self, month: NaiveDate) -> Result<ArchiveReport, ArchiveError> {
        let month = first_of_month(month);
        self.locked(month, self.run_archive(month)).await
    }

    /// Checks the month's object in the store against the manifest (size,
    /// SHA-256, rows) and, while the partition exists, against its rows,
    /// and against the rollup unless the month was restored (rows may have
    /// been written since). A month recorded as exported becomes verified.
    pub async fn verify(&self, month: NaiveDate) -> Result<VerifyReport, ArchiveError> {
        let month = first_of_month(month);
        self.locked(month, self.run_verify(month)).await
    }

    /// Calls off the archival of a month that is not dropped yet (fenced,
    /// detached, exported or verified), for a month that keeps failing (a
    /// rollup that disagrees, an export that cannot be written): attaches
    /// its partition again (it still holds every row), records the month as
    /// [`ArchiveState::Aborted`], and lowers the horizon to the end of the
    /// newest month still out of the database, in one transaction.
    /// [`Archiver::archive_due`] then leaves the month alone; an explicit
    /// [`Archiver::archive`] starts it over (exporting again). An object
    /// already in the store stays there until that export overwrites it.
    /// A dropped month is refused (restore it instead).
    pub async fn abort(&self, month: NaiveDate) -> Result<AbortReport, ArchiveError> {
        let month = first_of_month(month);
        self.locked(month, self.run_abort(month)).await
    }

    /// Loads the month's archive back into its partition: fetches the
    /// object, checks its hash against the manifest, creates a staging
    /// table, `COPY`s the rows in, checks the count and the per (tenant,
    /// day) totals against the manifest and the rollup, then takes the
    /// fence's lock ([`HORIZON_LOCK_KEY`], exclusive), puts the table in the
    /// partition's place, attaches it, and lowers the horizon to the end of
    /// the newest month still archived. All of it in one transaction, so a
    /// crash leaves the month `restoring` and the next call starts the load
    /// again. Ingest batches wait for the restore only from the lock on,
    /// not during the load.
    pub async fn restore(&self, month: NaiveDate) -> Result<RestoreReport, ArchiveError> {
        let month = first_of_month(month);
        self.locked(month, self.run_restore(month)).await
    }

    async fn conn(&self) -> Result<pg_kit::PgConnection<'_>, ArchiveError> {
        Ok(self
            .store
            .pool()
            .get()
            .await
            .map_err(AnalyticsError::from_pool)?)
    }

    /// Runs `work` holding the month's advisory lock. The lock is taken in
    /// a transaction kept open for the run, so it is released whatever
    /// happens to this future (dropped, the process killed): the
    /// transaction ends with the session.
    async fn locked<T>(
        &self,
        month: NaiveDate,
        work: impl Future<Output = Result<T, ArchiveError>>,
    ) -> Result<T, ArchiveError> {
        let mut conn = self.conn().await?;
        let tx = conn.begin().await.map_err(db)?;
        let key = month.year() * 100 + month.month() as i32;
        let got: bool = tx
            .query_prepared_one(
                "SELECT pg_try_advisory_xact_lock($1, $2)",
                &[(&LOCK_CLASS, Type::INT4), (&key, Type::INT4)],
            )
            .await
            .map_err(db)?
            .try_get(0)
            .map_err(db)?;
        if !got {
            return Err(ArchiveError::Busy { month });
        }
        let result = work.await;
        let _ = tx.rollback().await;
        result
    }

    fn fail_point(&self, month: NaiveDate, step: Step) -> Result<(), ArchiveError> {
        if self.config.fail_after == Some(step) {
            tracing::warn!(%month, ?step, "injected failure");
            return Err(ArchiveError::Injected { month, step });
        }
        Ok(())
    }

    /// Records `error` on the month's manifest row (an injected fault is
    /// not a failure of the step).
    async fn note(&self, month: NaiveDate, error: &ArchiveError) {
        if matches!(error, ArchiveError::Injected { .. }) {
            return;
        }
        tracing::warn!(%month, error = %error, "archive step failed");
        if let Ok(conn) = self.conn().await {
            manifest::note_failure(&*conn, month, error).await;
        }
    }

    async fn run_archive(&self, month: NaiveDate) -> Result<ArchiveReport, ArchiveError> {
        let started = Instant::now();
        let found = {
            let conn = self.conn().await?;
            manifest::get(&*conn, month).await?.map(|r| r.state)
        };
        let (mut state, resumed_from) = match found {
            None | Some(ArchiveState::Restored) | Some(ArchiveState::Aborted) => {
                self.fence(month).await?;
                (ArchiveState::Fenced, None)
            }
            Some(ArchiveState::Restoring) => {
                return Err(ArchiveError::WrongState {
                    month,
                    operation: "archive",
                    state: StateName(found),
                });
            }
            Some(state) => {
                tracing::info!(%month, %state, "resuming archival");
                (state, Some(state))
            }
        };
        let (mut export_elapsed, mut verify_elapsed) = (None, None);
        // Whether this call verified the object: if not (a month resumed
        // from verified), the object is checked again before the drop.
        let mut verified_here = false;
        while state != ArchiveState::Dropped {
            let step_started = Instant::now();
            let next = match state {
                ArchiveState::Fenced => self.detach(month).await.map(|()| ArchiveState::Detached),
                ArchiveState::Detached => {
                    let done = self.export(month).await;
                    export_elapsed = Some(step_started.elapsed());
                    done.map(|()| ArchiveState::Exported)
                }
                ArchiveState::Exported => {
                    let done = self.verify_exported(month).await;
                    verify_elapsed = Some(step_started.elapsed());
                    verified_here = done.is_ok();
                    done.map(|_| ArchiveState::Verified)
                }
                ArchiveState::Verified => {
                    let still = if verified_here {
                        Ok(())
                    } else {
                        self.recheck_verified(month).await
                    };
                    match still {
                        Ok(()) => self
                            .drop_partition(month)
                            .await
                            .map(|()| ArchiveState::Dropped),
                        Err(e) => Err(e),
                    }
                }
                other => Err(ArchiveError::WrongState {
                    month,
                    operation: "archive",
                    state: StateName(Some(other)),
                }),
            };
            match next {
                Ok(next) => state = next,
                Err(e) => {
                    self.note(month, &e).await;
                    return Err(e);
                }
            }
        }
        let conn = self.conn().await?;
        let record = manifest::get(&*conn, month).await?.ok_or_else(|| {
            ArchiveError::Database(AnalyticsError::Corrupt(format!(
                "the manifest row of {month} vanished"
            )))
        })?;
        let report = ArchiveReport {
            month,
            object_path: record.object_path,
            rows: record.rows.unwrap_or(0),
            parquet_bytes: record.parquet_bytes.unwrap_or(0),
            heap_bytes: record.heap_bytes.unwrap_or(0),
            total_bytes: record.total_bytes.unwrap_or(0),
            sha256: record.sha256.unwrap_or_default(),
            resumed_from,
            elapsed: started.elapsed(),
            export_elapsed,
            verify_elapsed,
        };
        tracing::info!(
            %month,
            rows = report.rows,
            parquet_bytes = report.parquet_bytes,
            heap_bytes = report.heap_bytes,
            elapsed_ms = report.elapsed.as_millis() as u64,
            "month archived"
        );
        Ok(report)
    }

    /// Step 1: checks the month may be archived, records it as fenced and
    /// raises the horizon over it, in one transaction, which first takes
    /// the fence's lock exclusive: it waits for the ingest batches in
    /// flight, and the batches after it see the new horizon.
    async fn fence(&self, month: NaiveDate) -> Result<(), ArchiveError> {
        let cutoff = self.cutoff();
        if month >= cutoff {
            return Err(ArchiveError::NotEligible {
                month,
                reason: NotEligible::TooRecent { cutoff },
            });
        }
        let partition = partition_name(month);
        let (from, to) = (start_of(month), start_of(next_month(month)));
        let mut conn = self.conn().await?;
        let status = manifest::partition_status(&*conn, &partition).await?;
        if !status.exists {
            return Err(ArchiveError::NotEligible {
                month,
                reason: NotEligible::NoPartition,
            });
        }
        // With the partition in place no new row of the month can land in
        // the default partition, so a check before the fence is enough.
        let strays = manifest::rows_in_default(&*conn, from, to).await?;
        if strays > 0 {
            return Err(ArchiveError::NotEligible {
                month,
                reason: NotEligible::RowsInDefaultPartition { rows: strays },
            });
        }
        let object = store::object_path(month).to_string();
        let tx = conn.begin().await.map_err(db)?;
        lock_fence(&tx).await?;
        let inserted = tx
            .execute_prepared(
                "INSERT INTO analytics.archives (month, partition_name, object_path, state)
                 VALUES ($1, $2, $3, 'fenced')
                 ON CONFLICT (month) DO UPDATE
                    SET partition_name = EXCLUDED.partition_name,
                        object_path = EXCLUDED.object_path, state = 'fenced',
                        heap_bytes = NULL, total_bytes = NULL, rows = NULL,
                        parquet_bytes = NULL, sha256 = NULL, started_at = now(),
                        updated_at = now(), exported_at = NULL, verified_at = NULL,
                        dropped_at = NULL, restored_at = NULL, last_error = NULL
                  WHERE analytics.archives.state IN ('restored', 'aborted')",
                &[
                    (&month, Type::DATE),
                    (&partition, Type::TEXT),
                    (&object, Type::TEXT),
                ],
            )
            .await
            .map_err(db)?;
        if inserted != 1 {
            return Err(ArchiveError::Busy { month });
        }
        // GREATEST ignores NULL: the first archive sets it.
        tx.execute_prepared(
            "UPDATE analytics.archive_horizon
                SET archived_before = GREATEST(archived_before, $1), updated_at = now()",
            &[(&to, Type::TIMESTAMPTZ)],
        )
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        tracing::info!(%month, horizon = %to, "month fenced");
        self.fail_point(month, Step::Fence)
    }

    /// Step 2: detaches the partition and records its size, in one
    /// transaction. Plain `DETACH` (PostgreSQL refuses `CONCURRENTLY` while
    /// a default partition exists), under a short `lock_timeout` so queries
    /// queued behind it stall briefly, retried with a growing pause.
    async fn detach(&self, month: NaiveDate) -> Result<(), ArchiveError> {
        let partition = partition_name(month);
        let qualified = format!("analytics.{partition}");
        let mut conn = self.conn().await?;
        let status = manifest::partition_status(&*conn, &partition).await?;
        if !status.exists {
            return Err(ArchiveError::NotEligible {
                month,
                reason: NotEligible::NoPartition,
            });
        }
        let mut attached = status.attached;
        if status.detach_pending {
            // An interrupted `DETACH … CONCURRENTLY` (run by hand): only
            // FINALIZE completes it, outside a transaction block.
            conn.batch_execute(&format!(
                "ALTER TABLE analytics.events DETACH PARTITION {qualified} FINALIZE"
            ))
            .await
            .map_err(|e| {
                conn.note_error(&e);
                db(e)
            })?;
            attached = false;
        }
        let timeout_ms = self.config.lock_timeout.as_millis().max(1);
        let attempts = self.config.detach_attempts.max(1);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let tx = conn.begin().await.map_err(db)?;
            if attached {
                let detached = tx
                    .batch_execute(&format!(
                        "SET LOCAL lock_timeout = '{timeout_ms}ms';
                         ALTER TABLE analytics.events DETACH PARTITION {qualified}"
                    ))
                    .await;
                if let Err(e) = detached {
                    tx.note_error(&e);
                    if e.code() != Some(&SqlState::LOCK_NOT_AVAILABLE) {
                        return Err(db(e));
                    }
                    drop(tx);
                    if attempt >= attempts {
                        return Err(ArchiveError::DetachTimedOut { month, attempts });
                    }
                    tracing::info!(%month, attempt, "detach waited too long for its lock; retrying");
                    let pause = Duration::from_millis(200 * u64::from(attempt));
                    tokio::time::sleep(pause.min(Duration::from_secs(5))).await;
                    continue;
                }
            }
            let recorded = tx
                .execute_prepared(
                    "UPDATE analytics.archives
                        SET state = 'detached', heap_bytes = pg_relation_size(to_regclass($2)),
                            total_bytes = pg_total_relation_size(to_regclass($2)),
                            updated_at = now(), last_error = NULL
                      WHERE month = $1 AND state = 'fenced'",
                    &[(&month, Type::DATE), (&qualified, Type::TEXT)],
                )
                .await
                .map_err(db)?;
            if recorded != 1 {
                return Err(ArchiveError::Busy { month });
            }
            tx.commit().await.map_err(db)?;
            break;
        }
        tracing::info!(%month, partition = %partition, "partition detached");
        self.fail_point(month, Step::Detach)
    }

    /// Step 3: streams the partition into a Parquet scratch file (hashing
    /// it), uploads it, and records rows, size and hash. A crash anywhere
    /// before the record leaves the month detached, and the next run
    /// exports again, overwriting whatever object is there.
    async fn export(&self, month: NaiveDate) -> Result<(), ArchiveError> {
        let qualified = format!("analytics.{}", partition_name(month));
        let scratch = Scratch::new(&self.config.scratch_dir, month, "export");
        let written = {
            let conn = self.conn().await?;
            let out = conn
                .copy_out(copy_out_sql(&qualified).as_str())
                .await
                .map_err(|e| {
                    conn.note_error(&e);
                    db(e)
                })?;
            let rows = BinaryCopyOutStream::new(out, &COPY_TYPES);
            let mut rows = std::pin::pin!(rows);
            let (tx, mut rx) = mpsc::channel::<Vec<ArchivedRow>>(2);
            let path = scratch.path().to_owned();
            let (group_rows, level) = (self.config.row_group_rows, self.config.zstd_level);
            let writer = tokio::task::spawn_blocking(move || -> Result<Written, ArchiveError> {
                let mut file = ArchiveWriter::create(&path, month, group_rows, level)?;
                while let Some(chunk) = rx.blocking_recv() {
                    file.push(chunk)?;
                }
                file.finish(&path)
            });
            let mut streamed = Ok(());
            let mut chunk = Vec::with_capacity(CHUNK_ROWS);
            while let Some(row) = rows.next().await {
                match row.and_then(|r| decode(&r)) {
                    Ok(row) => chunk.push(row),
                    Err(e) => {
                        conn.note_error(&e);
                        streamed = Err(db(e));
                        break;
                    }
                }
                if chunk.len() == CHUNK_ROWS {
                    let full = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK_ROWS));
                    if tx.send(full).await.is_err() {
                        // The writer stopped: its error is collected below.
                        break;
                    }
                }
            }
            if streamed.is_ok() && !chunk.is_empty() {
                let _ = tx.send(chunk).await;
            }
            drop(tx);
            let written = writer.await.map_err(|e| joined(e, scratch.path()));
            streamed?;
            written??
        };
        let object = store::object_path(month);
        store::upload(&*self.objects, &object, scratch.path()).await?;
        drop(scratch);
        self.fail_point(month, Step::Upload)?;
        let rows = i64::try_from(written.rows).unwrap_or(i64::MAX);
        let bytes = i64::try_from(written.bytes).unwrap_or(i64::MAX);
        let conn = self.conn().await?;
        let recorded = conn
            .execute_prepared(
                "UPDATE analytics.archives
                    SET state = 'exported', rows = $2, parquet_bytes = $3, sha256 = $4,
                        exported_at = now(), updated_at = now(), last_error = NULL
                  WHERE month = $1 AND state = 'detached'",
                &[
                    (&month, Type::DATE),
                    (&rows, Type::INT8),
                    (&bytes, Type::INT8),
                    (&written.sha256, Type::TEXT),
                ],
            )
            .await
            .map_err(db)?;
        if recorded != 1 {
            return Err(ArchiveError::Busy { month });
        }
        tracing::info!(%month, rows = written.rows, bytes = written.bytes, object = %object, "month exported");
        self.fail_point(month, Step::Export)
    }

    /// Step 4: verifies an exported month against its partition and the
    /// rollup, and records it verified. An object at fault sends the month
    /// back to detached, to be exported again.
    async fn verify_exported(&self, month: NaiveDate) -> Result<Checked, ArchiveError> {
        let record = self.record_of(month).await?;
        match self.check_object(month, &record, true, true).await {
            Ok(checked) => {
                let conn = self.conn().await?;
                if !manifest::advance(
                    &*conn,
                    month,
                    ArchiveState::Exported,
                    ArchiveState::Verified,
                )
                .await?
                {
                    return Err(ArchiveError::Busy { month });
                }
                tracing::info!(%month, rows = checked.rows, "archive verified");
                self.fail_point(month, Step::Verify)?;
                Ok(checked)
            }
            Err(e @ ArchiveError::Verification { .. }) => {
                if let ArchiveError::Verification { mismatch, .. } = &e
                    && mismatch.is_in_object()
                {
                    let conn = self.conn().await?;
                    manifest::advance(
                        &*conn,
                        month,
                        ArchiveState::Exported,
                        ArchiveState::Detached,
                    )
                    .await?;
                    tracing::warn!(%month, %mismatch, "the archive does not match its partition; it will be exported again");
                }
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    async fn record_of(&self, month: NaiveDate) -> Result<ArchiveRecord, ArchiveError> {
        let conn = self.conn().await?;
        manifest::get(&*conn, month)
            .await?
            .ok_or(ArchiveError::WrongState {
                month,
                operation: "verify",
                state: StateName(None),
            })
    }

    /// Reads the month's object back from the store and checks it: size
    /// and hash against the manifest, then its rows, streamed, against the
    /// partition's (row for row, in archive order) when
    /// `against_partition`, their count against the manifest, and their
    /// per (tenant, day) totals against the rollup when `against_rollup`.
    async fn check_object(
        &self,
        month: NaiveDate,
        record: &ArchiveRecord,
        against_partition: bool,
        against_rollup: bool,
    ) -> Result<Checked, ArchiveError> {
        let fail = |mismatch| ArchiveError::Verification { month, mismatch };
        let (scratch, bytes, sha256) = self.download_recorded(month, record, "verify").await?;
        let (mut chunks, reader) = spawn_reader(scratch.path(), month);
        let mut totals = Totals::new();
        let mut count = 0u64;
        let mut mismatch = None;
        if against_partition {
            let qualified = format!("analytics.{}", record.partition);
            let conn = self.conn().await?;
            let out = conn
                .copy_out(copy_out_sql(&qualified).as_str())
                .await
                .map_err(|e| {
                    conn.note_error(&e);
                    db(e)
                })?;
            let stored = BinaryCopyOutStream::new(out, &COPY_TYPES);
            let mut stored = std::pin::pin!(stored);
            'chunks: while let Some(chunk) = chunks.recv().await {
                for row in chunk {
                    let theirs = match stored.next().await {
                        Some(r) => r.and_then(|r| decode(&r)).map_err(|e| {
                            conn.note_error(&e);
                            db(e)
                        })?,
                        None => {
                            mismatch = Some(Mismatch::Row {
                                index: count,
                                detail: format!(
                                    "the archive has {row:?}, the partition no more rows"
                                ),
                            });
                            break 'chunks;
                        }
                    };
                    if theirs != row {
                        mismatch = Some(Mismatch::Row {
                            index: count,
                            detail: format!("the archive has {row:?}, the partition {theirs:?}"),
                        });
                        break 'chunks;
                    }
                    format::add_to_totals(&mut totals, &row);
                    count += 1;
                }
            }
            if mismatch.is_none() {
                let mut more = 0u64;
                while let Some(r) = stored.next().await {
                    r.map_err(db)?;
                    more += 1;
                }
                if more > 0 {
                    mismatch = Some(Mismatch::RowCount {
                        expected: count + more,
                        actual: count,
                        against: "partition",
                    });
                }
            }
        } else {
            while let Some(chunk) = chunks.recv().await {
                for row in &chunk {
                    format::add_to_totals(&mut totals, row);
                }
                count += chunk.len() as u64;
            }
        }
        drop(chunks);
        let read = reader.await.map_err(|e| joined(e, scratch.path()))?;
        if let Some(mismatch) = mismatch {
            return Err(fail(mismatch));
        }
        read?;
        let expected_rows = record.rows.unwrap_or(0);
        if count != expected_rows {
            return Err(fail(Mismatch::RowCount {
                expected: expected_rows,
                actual: count,
                against: "manifest",
            }));
        }
        if against_rollup {
            let conn = self.conn().await?;
            let cells = rollup(&*conn, month).await?;
            if let Some(mismatch) = first_difference(&totals, &cells) {
                return Err(fail(mismatch));
            }
        }
        Ok(Checked {
            rows: count,
            bytes,
            sha256,
        })
    }

    /// Before the drop of a month verified by an earlier call (resumed from
    /// `verified`): the object must still be the one verified, since once
    /// the partition is dropped it is the only copy, and it may have been
    /// deleted or overwritten since. Its size and SHA-256 are checked
    /// against the manifest by reading it whole: the manifest's hash is the
    /// hash of the bytes that verified, so equal hashes mean the earlier
    /// verification (rows against the partition, totals against the
    /// rollup) still holds, without a second comparison. A size check alone
    /// (a HEAD) would miss an object overwritten with other bytes of the
    /// same length, or bits rotted in place; the read costs one transfer of
    /// the object, small beside the partition it replaces. A mismatch sends
    /// the month back to be exported again.
    async fn recheck_verified(&self, month: NaiveDate) -> Result<(), ArchiveError> {
        let record = self.record_of(month).await?;
        let path = ObjectPath::from(record.object_path.as_str());
        let fail = |mismatch| ArchiveError::Verification { month, mismatch };
        let checked = match store::digest(&*self.objects, &path).await {
            Err(e) => Err(missing_as_mismatch(month, e)),
            Ok((bytes, sha256)) => {
                let expected_bytes = record.parquet_bytes.unwrap_or(0);
                let expected_sha = record.sha256.clone().unwrap_or_default();
                if bytes != expected_bytes {
                    Err(fail(Mismatch::Size {
                        expected: expected_bytes,
                        actual: bytes,
                    }))
                } else if sha256 != expected_sha {
                    Err(fail(Mismatch::Hash {
                        expected: expected_sha,
                        actual: sha256,
                    }))
                } else {
                    Ok(())
                }
            }
        };
        if let Err(e) = &checked {
            self.unverify(month, e).await?;
        }
        checked
    }

    /// After `error` on a verified month: a mismatch sends it back, while
    /// its partition exists, so that the next run does not drop it: to
    /// `detached` (exported again from the partition) when the object is at
    /// fault, to `exported` (verified again) when the rollup is. Other
    /// errors leave it verified.
    async fn unverify(&self, month: NaiveDate, error: &ArchiveError) -> Result<(), ArchiveError> {
        let ArchiveError::Verification { mismatch, .. } = error else {
            return Ok(());
        };
        let conn = self.conn().await?;
        let status = manifest::partition_status(&*conn, &partition_name(month)).await?;
        if !status.exists {
            // Nothing to export again from; the error stands.
            return Ok(());
        }
        let back = if mismatch.is_in_object() {
            ArchiveState::Detached
        } else {
            ArchiveState::Exported
        };
        if manifest::advance(&*conn, month, ArchiveState::Verified, back).await? {
            tracing::warn!(%month, %mismatch, state = %back, "a verified archive no longer matches; the month goes back");
        }
        Ok(())
    }

    /// Step 5: drops the partition of a verified month and records it, in
    /// one transaction holding the manifest row.
    async fn drop_partition(&self, month: NaiveDate) -> Result<(), ArchiveError> {
        let partition = partition_name(month);
        let mut conn = self.conn().await?;
        let tx = conn.begin().await.map_err(db)?;
        let state = tx
            .query_prepared_opt(
                "SELECT state FROM analytics.archives WHERE month = $1 FOR UPDATE",
                &[(&month, Type::DATE)],
            )
            .await
            .map_err(db)?
            .map(|row| row.try_get::<_, String>(0))
            .transpose()
            .map_err(db)?
            .and_then(|s| ArchiveState::parse(&s));
        if state != Some(ArchiveState::Verified) {
            return Err(ArchiveError::WrongState {
                month,
                operation: "drop",
                state: StateName(state),
            });
        }
        let status = manifest::partition_status(&tx, &partition).await?;
        if status.attached {
            // Attached again by hand since it was verified: it may hold
            // rows the archive has not.
            return Err(ArchiveError::WrongState {
                month,
                operation: "drop of a partition attached again",
                state: StateName(state),
            });
        }
        if status.exists {
            tx.batch_execute(&format!("DROP TABLE analytics.{partition}"))
                .await
                .map_err(|e| {
                    tx.note_error(&e);
                    db(e)
                })?;
        }
        if !manifest::advance(&tx, month, ArchiveState::Verified, ArchiveState::Dropped).await? {
            return Err(ArchiveError::Busy { month });
        }
        tx.commit().await.map_err(db)?;
        tracing::info!(%month, partition = %partition, "partition dropped");
        self.fail_point(month, Step::Drop)
    }

    async fn run_verify(&self, month: NaiveDate) -> Result<VerifyReport, ArchiveError> {
        let started = Instant::now();
        let record = self.record_of(month).await?;
        let (checked, state, against_partition, against_rollup) = match record.state {
            ArchiveState::Exported => {
                let checked = self.verify_exported(month).await.inspect_err(|e| {
                    tracing::warn!(%month, error = %e, "verification failed");
                });
                if let Err(e) = &checked {
                    self.note(month, e).await;
                }
                (checked?, ArchiveState::Verified, true, true)
            }
            ArchiveState::Verified => {
                let checked = self.check_object(month, &record, true, true).await;
                if let Err(e) = &checked {
                    tracing::warn!(%month, error = %e, "verification failed");
                    self.unverify(month, e).await?;
                    self.note(month, e).await;
                }
                (checked?, ArchiveState::Verified, true, true)
            }
            state @ (ArchiveState::Dropped | ArchiveState::Restoring) => (
                self.check_object(month, &record, false, true).await?,
                state,
                false,
                true,
            ),
            ArchiveState::Restored => (
                self.check_object(month, &record, false, false).await?,
                ArchiveState::Restored,
                false,
                false,
            ),
            state => {
                return Err(ArchiveError::WrongState {
                    month,
                    operation: "verify",
                    state: StateName(Some(state)),
                });
            }
        };
        Ok(VerifyReport {
            month,
            state,
            rows: checked.rows,
            parquet_bytes: checked.bytes,
            sha256: checked.sha256,
            against_partition,
            against_rollup,
            elapsed: started.elapsed(),
        })
    }

    async fn run_restore(&self, month: NaiveDate) -> Result<RestoreReport, ArchiveError> {
        let started = Instant::now();
        let partition = partition_name(month);
        let record = {
            let conn = self.conn().await?;
            manifest::get(&*conn, month).await?
        };
        let state = record.as_ref().map(|r| r.state);
        let record = match (state, record) {
            (Some(ArchiveState::Dropped), Some(record)) => {
                let conn = self.conn().await?;
                if !manifest::advance(
                    &*conn,
                    month,
                    ArchiveState::Dropped,
                    ArchiveState::Restoring,
                )
                .await?
                {
                    return Err(ArchiveError::Busy { month });
                }
                self.fail_point(month, Step::RestoreStart)?;
                record
            }
            (Some(ArchiveState::Restoring), Some(record)) => {
                tracing::info!(%month, "resuming restore");
                record
            }
            (Some(ArchiveState::Restored), _) => {
                return Ok(RestoreReport {
                    month,
                    partition,
                    rows: 0,
                    horizon: self.horizon().await?,
                    elapsed: started.elapsed(),
                });
            }
            _ => {
                return Err(ArchiveError::WrongState {
                    month,
                    operation: "restore",
                    state: StateName(state),
                });
            }
        };
        let loaded = self.load(month, &record).await;
        let (rows, horizon) = match loaded {
            Ok(done) => done,
            Err(e) => {
                self.note(month, &e).await;
                return Err(e);
            }
        };
        tracing::info!(%month, rows, "month restored");
        self.fail_point(month, Step::Restore)?;
        Ok(RestoreReport {
            month,
            partition,
            rows,
            horizon,
            elapsed: started.elapsed(),
        })
    }

    /// The month's object, downloaded to a scratch file for `purpose`, with
    /// its size and SHA-256, once they match what the manifest recorded at
    /// export (a missing object is a [`Mismatch`] too).
    async fn download_recorded(
        &self,
        month: NaiveDate,
        record: &ArchiveRecord,
        purpose: &str,
    ) -> Result<(Scratch, u64, String), ArchiveError> {
        let fail = |mismatch| ArchiveError::Verification { month, mismatch };
        let path = ObjectPath::from(record.object_path.as_str());
        let scratch = Scratch::new(&self.config.scratch_dir, month, purpose);
        let (bytes, sha256) = store::download(&*self.objects, &path, scratch.path())
            .await
            .map_err(|e| missing_as_mismatch(month, e))?;
        let expected_bytes = record.parquet_bytes.unwrap_or(0);
        if bytes != expected_bytes {
            return Err(fail(Mismatch::Size {
                expected: expected_bytes,
                actual: bytes,
            }));
        }
        let expected_sha = record.sha256.clone().unwrap_or_default();
        if sha256 != expected_sha {
            return Err(fail(Mismatch::Hash {
                expected: expected_sha,
                actual: sha256,
            }));
        }
        Ok((scratch, bytes, sha256))
    }

    /// The restore's load, in one transaction: see [`Archiver::restore`].
    async fn load(
        &self,
        month: NaiveDate,
        record: &ArchiveRecord,
    ) -> Result<(u64, Option<DateTime<Utc>>), ArchiveError> {
        let fail = |mismatch| ArchiveError::Verification { month, mismatch };
        let (scratch, _, _) = self.download_recorded(month, record, "restore").await?;
        let partition = partition_name(month);
        let qualified = format!("analytics.{partition}");
        let next = next_month(month);
        // An early look, so that a partition holding rows fails the restore
        // before the load rather than after; checked again under the lock.
        {
            let conn = self.conn().await?;
            self.restore_target(&*conn, month, &partition).await?;
        }
        // The rows are loaded into a table of their own, unknown to every
        // other transaction, and only then, under the fence's lock, is it
        // put in the partition's place and attached: ingest waits for the
        // lock only as long as the attach, not the whole load.
        let staging = format!("{partition}_restoring");
        let staged = format!("analytics.{staging}");
        let mut conn = self.conn().await?;
        let tx = conn.begin().await.map_err(db)?;
        let noted = |e: tokio_postgres::Error| {
            tx.note_error(&e);
            db(e)
        };
        // The CHECK matches the partition bound, so ATTACH skips its scan
        // of the rows; the COPY checks each row against it instead.
        tx.batch_execute(&format!(
            "CREATE TABLE {staged} (LIKE analytics.events INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
             ALTER TABLE {staged} ADD CONSTRAINT {partition}_month
                 CHECK (created_at >= '{month}T00:00:00Z' AND created_at < '{next}T00:00:00Z')"
        ))
        .await
        .map_err(noted)?;
        let sink = tx
            .copy_in(
                format!(
                    "COPY {staged} (tenant_id, created_at, event_type, processing_time_us)
                     FROM STDIN (FORMAT binary)"
                )
                .as_str(),
            )
            .await
            .map_err(noted)?;
        let writer = BinaryCopyInWriter::new(sink, &COPY_TYPES);
        let mut writer = std::pin::pin!(writer);
        let (mut chunks, reader) = spawn_reader(scratch.path(), month);
        let mut totals = Totals::new();
        let mut count = 0u64;
        while let Some(chunk) = chunks.recv().await {
            for row in &chunk {
                writer
                    .as_mut()
                    .write(&[
                        &row.tenant_id,
                        &row.created_at,
                        &row.event_type,
                        &row.processing_time_us,
                    ])
                    .await
                    .map_err(noted)?;
                format::add_to_totals(&mut totals, row);
            }
            count += chunk.len() as u64;
        }
        reader.await.map_err(|e| joined(e, scratch.path()))??;
        let loaded = writer.finish().await.map_err(noted)?;
        let expected_rows = record.rows.unwrap_or(0);
        if loaded != count || count != expected_rows {
            return Err(fail(Mismatch::RowCount {
                expected: expected_rows,
                actual: loaded,
                against: "manifest",
            }));
        }
        let cells = rollup(&tx, month).await?;
        if let Some(mismatch) = first_difference(&totals, &cells) {
            return Err(fail(mismatch));
        }
        // The partitioned index's counterpart, built now so that ATTACH
        // adopts it instead of building it under the locks below.
        tx.batch_execute(&format!(
            "CREATE INDEX {staging}_tenant_time_idx ON {staged} (tenant_id, created_at)"
        ))
        .await
        .map_err(noted)?;
        // From here on, relations ingest batches write: the fence's lock
        // first (a batch holding it may be waiting for the default
        // partition, which ATTACH locks; see `lock_fence`).
        lock_fence(&tx).await?;
        if self.restore_target(&tx, month, &partition).await? {
            tx.batch_execute(&format!("DROP TABLE {qualified}"))
                .await
                .map_err(noted)?;
        }
        tx.batch_execute(&format!(
            "ALTER TABLE {staged} RENAME TO {partition};
             ALTER INDEX analytics.{staging}_tenant_time_idx RENAME TO {partition}_tenant_id_created_at_idx;
             ALTER TABLE analytics.events ATTACH PARTITION {qualified}
                 FOR VALUES FROM ('{month}T00:00:00Z') TO ('{next}T00:00:00Z')"
        ))
        .await
        .map_err(noted)?;
        if !manifest::advance(&tx, month, ArchiveState::Restoring, ArchiveState::Restored).await? {
            return Err(ArchiveError::Busy { month });
        }
        // The horizon drops to the end of the newest month still out of
        // the database (or none); months archived after this one keep it.
        let horizon = lower_horizon(&tx).await?;
        tx.commit().await.map_err(db)?;
        Ok((count, horizon))
    }

    /// Whether the month's partition exists, to be replaced by the restore:
    /// an empty one made meanwhile (the maintenance job creating months)
    /// is; one with rows is not ours to drop ([`ArchiveError::RestoreBlocked`]).
    async fn restore_target(
        &self,
        db_: &impl Prepared,
        month: NaiveDate,
        partition: &str,
    ) -> Result<bool, ArchiveError> {
        let status = manifest::partition_status(db_, partition).await?;
        if !status.exists {
            return Ok(false);
        }
        let rows: i64 = db_
            .query_prepared_one(&format!("SELECT count(*) FROM analytics.{partition}"), &[])
            .await
            .map_err(db)?
            .try_get(0)
            .map_err(db)?;
        if rows > 0 {
            return Err(ArchiveError::RestoreBlocked { month, rows });
        }
        Ok(true)
    }

    async fn run_abort(&self, month: NaiveDate) -> Result<AbortReport, ArchiveError> {
        let record = {
            let conn = self.conn().await?;
            manifest::get(&*conn, month).await?
        };
        let from = record.map(|r| r.state);
        match from {
            Some(
                ArchiveState::Fenced
                | ArchiveState::Detached
                | ArchiveState::Exported
                | ArchiveState::Verified,
            ) => {}
            Some(ArchiveState::Aborted) => {
                return Ok(AbortReport {
                    month,
                    from: ArchiveState::Aborted,
                    reattached: false,
                    horizon: self.horizon().await?,
                });
            }
            _ => {
                return Err(ArchiveError::WrongState {
                    month,
                    operation: "abort",
                    state: StateName(from),
                });
            }
        }
        let from = from.unwrap_or(ArchiveState::Fenced);
        let partition = partition_name(month);
        let qualified = format!("analytics.{partition}");
        let next = next_month(month);
        let mut conn = self.conn().await?;
        let mut status = manifest::partition_status(&*conn, &partition).await?;
        if !status.exists {
            return Err(ArchiveError::WrongState {
                month,
                operation: "abort (its partition is gone)",
                state: StateName(Some(from)),
            });
        }
        if status.detach_pending {
            // An interrupted `DETACH … CONCURRENTLY` (run by hand): only
            // FINALIZE completes it, outside a transaction block.
            conn.batch_execute(&format!(
                "ALTER TABLE analytics.events DETACH PARTITION {qualified} FINALIZE"
            ))
            .await
            .map_err(|e| {
                conn.note_error(&e);
                db(e)
            })?;
            status.attached = false;
        }
        let tx = conn.begin().await.map_err(db)?;
        let noted = |e: tokio_postgres::Error| {
            tx.note_error(&e);
            db(e)
        };
        let reattach = !status.attached;
        if reattach {
            // A CHECK matching the bound, validated now by a scan of the
            // detached table (which nothing else uses), lets ATTACH skip
            // its own scan under the fence's lock below.
            let constraint = format!("{partition}_month");
            let has_check: bool = tx
                .query_prepared_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_constraint
                                     WHERE conrelid = to_regclass($1) AND conname = $2)",
                    &[(&qualified, Type::TEXT), (&constraint, Type::TEXT)],
                )
                .await
                .map_err(db)?
                .try_get(0)
                .map_err(db)?;
            if !has_check {
                tx.batch_execute(&format!(
                    "ALTER TABLE {qualified} ADD CONSTRAINT {constraint}
                         CHECK (created_at >= '{month}T00:00:00Z' AND created_at < '{next}T00:00:00Z')"
                ))
                .await
                .map_err(noted)?;
            }
        }
        lock_fence(&tx).await?;
        if reattach {
            tx.batch_execute(&format!(
                "ALTER TABLE analytics.events ATTACH PARTITION {qualified}
                     FOR VALUES FROM ('{month}T00:00:00Z') TO ('{next}T00:00:00Z')"
            ))
            .await
            .map_err(noted)?;
        }
        if !manifest::advance(&tx, month, from, ArchiveState::Aborted).await? {
            return Err(ArchiveError::Busy { month });
        }
        let horizon = lower_horizon(&tx).await?;
        tx.commit().await.map_err(db)?;
        tracing::info!(%month, %from, reattached = reattach, "archival aborted");
        Ok(AbortReport {
            month,
            from,
            reattached: reattach,
            horizon,
        })
    }
}
