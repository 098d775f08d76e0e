//! Archival against a real server, each test in its own database and its
//! own local store: archive, verify and drop; a crash after each step,
//! then resume; a corrupted object; a rollup that disagrees; the fence
//! against late rows; the file read back with the parquet crate; and the
//! restore round trip.
#![cfg(feature = "archive")]

use std::path::PathBuf;

use chrono::{DateTime, Datelike, Months, NaiveDate, TimeDelta, Utc};
use parquet::file::reader::FileReader;
use parquet::file::serialized_reader::SerializedFileReader;
use pg_analytics::archive::{
    ArchiveConfig, ArchiveError, ArchiveState, Archiver, Mismatch, NotEligible, Step, local_store,
    object_path,
};
use pg_analytics::postgres::IngestReport;
use pg_analytics::postgres::{HORIZON_LOCK_KEY, partition_name};
use pg_analytics::{Analytics, Event, EventRules, Plan, Tenant, TenantId, WriterConfig};
use sha2::{Digest, Sha256};
use testkit::TestDatabase;
use uuid::Uuid;

const ROWS: i64 = 3_000;

type Row = (i64, DateTime<Utc>, String, i64);

/// A database with a month 30 months ago holding [`ROWS`] rows of two
/// tenants over ten days, a few rows this month, and a local store.
struct Fixture {
    _db: TestDatabase,
    store: Analytics,
    month: NaiveDate,
    objects: tempfile::TempDir,
    scratch: tempfile::TempDir,
}

fn first_of_month(day: NaiveDate) -> NaiveDate {
    day.with_day(1).unwrap()
}

fn start(day: NaiveDate) -> DateTime<Utc> {
    day.and_hms_opt(0, 0, 0).unwrap().and_utc()
}

async fn fixture() -> Option<Fixture> {
    let db = TestDatabase::create().await?;
    let pool = pg_kit::pool(db.url(), &pg_kit::PoolConfig::default()).unwrap();
    let store = Analytics::new(pool, time_kit::system()).with_rules(EventRules::default());
    store.migrate().await.unwrap();
    let today = Utc::now().date_naive();
    let month = first_of_month(today)
        .checked_sub_months(Months::new(30))
        .unwrap();
    store.ensure_partitions(month, month, 0).await.unwrap();
    store.ensure_partitions(today, today, 1).await.unwrap();
    for id in 1..=2 {
        store
            .upsert_tenant(&Tenant {
                id: TenantId(id),
                name: format!("tenant {id}"),
                plan: Plan::Pro,
            })
            .await
            .unwrap();
    }
    let kinds = ["login", "page_view", "api_call", "épreuve"];
    let events: Vec<Event> = (0..ROWS)
        .map(|i| Event {
            tenant_id: TenantId(1 + i % 2),
            created_at: start(month)
                + TimeDelta::days(i % 10)
                + TimeDelta::seconds(i * 37 % 86_400)
                + TimeDelta::microseconds(i * 13 % 1_000_000),
            event_type: kinds[(i % 4) as usize].into(),
            processing_time_ms: (i % 997) as f64 / 8.0,
        })
        .collect();
    let writer = store.writer(WriterConfig::default());
    for batch in events.chunks(1_000) {
        let report = writer.write(Uuid::now_v7(), batch).await.unwrap();
        assert_eq!(report.accepted, batch.len(), "{:?}", report.rejected);
    }
    let now = Utc::now();
    let recent: Vec<Event> = (0..10)
        .map(|i| Event {
            tenant_id: TenantId(1),
            created_at: now - TimeDelta::seconds(i),
            event_type: "login".into(),
            processing_time_ms: 1.0,
        })
        .collect();
    writer.write(Uuid::now_v7(), &recent).await.unwrap();
    Some(Fixture {
        _db: db,
        store,
        month,
        objects: tempfile::tempdir().unwrap(),
        scratch: tempfile::tempdir().unwrap(),
    })
}

impl Fixture {
    fn archiver(&self, fail_after: Option<Step>) -> Archiver {
        let config = ArchiveConfig::default()
            .with_row_group_rows(1_000)
            .with_scratch_dir(self.scratch.path())
            .fail_after(fail_after);
        Archiver::new(
            self.store.clone(),
            local_store(self.objects.path()).unwrap(),
            config,
        )
    }

    fn object_file(&self) -> PathBuf {
        self.objects
            .path()
            .join(object_path(self.month).to_string())
    }

    /// The month's rows in PostgreSQL, in a total order.
    async fn rows(&self) -> Vec<Row> {
        let conn = self.store.pool().get().await.unwrap();
        let next = self.month.checked_add_months(Months::new(1)).unwrap();
        conn.query(
            "SELECT tenant_id, created_at, event_type, processing_time_us FROM analytics.events
              WHERE created_at >= $1 AND created_at < $2 ORDER BY 1, 2, 3, 4",
            &[&start(self.month), &start(next)],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
    }

    async fn scalar(&self, sql: &str) -> i64 {
        let conn = self.store.pool().get().await.unwrap();
        conn.query_one(sql, &[]).await.unwrap().get(0)
    }

    async fn partition_exists(&self) -> bool {
        let conn = self.store.pool().get().await.unwrap();
        let name = format!("analytics.{}", partition_name(self.month));
        conn.query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
            .await
            .unwrap()
            .get(0)
    }

    /// The month's cells of the rollup.
    async fn rollup(&self) -> Vec<(i64, NaiveDate, i64, i64)> {
        let conn = self.store.pool().get().await.unwrap();
        conn.query(
            "SELECT tenant_id, day, events, sum_processing_time_us FROM analytics.events_daily
              WHERE day >= $1 AND day < $2 ORDER BY 1, 2",
            &[
                &self.month,
                &self.month.checked_add_months(Months::new(1)).unwrap(),
            ],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
    }

    async fn state(&self) -> Option<ArchiveState> {
        self.archiver(None)
            .record(self.month)
            .await
            .unwrap()
            .map(|r| r.state)
    }
}

/// The archive file's rows, read with the parquet crate's own row reader
/// (not the archiver's), in a total order.
fn parquet_rows(path: &std::path::Path) -> Vec<Row> {
    use parquet::record::Field;
    let reader = SerializedFileReader::new(std::fs::File::open(path).unwrap()).unwrap();
    let mut rows: Vec<Row> = reader
        .get_row_iter(None)
        .unwrap()
        .map(|row| {
            let row = row.unwrap();
            let fields: Vec<&Field> = row.get_column_iter().map(|(_, f)| f).collect();
            let (Field::Long(t), Field::TimestampMicros(at), Field::Str(kind), Field::Long(us)) =
                (fields[0], fields[1], fields[2], fields[3])
            else {
                panic!("unexpected field types: {fields:?}");
            };
            (
                *t,
                DateTime::from_timestamp_micros(*at).unwrap(),
                kind.clone(),
                *us,
            )
        })
        .collect();
    rows.sort();
    rows
}

fn sorted(mut rows: Vec<Row>) -> Vec<Row> {
    rows.sort();
    rows
}

/// The lock types this test database's sessions are waiting for, other
/// than the caller's.
async fn waits(conn: &tokio_postgres::Client) -> Vec<String> {
    // By session, not by the lock's database: a row lock's wait is on a
    // transaction id, which belongs to no database.
    conn.query(
        "SELECT l.locktype FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
          WHERE NOT l.granted AND l.pid <> pg_backend_pid()
            AND a.datname = current_database()",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Whether a session of this database waits for the fence's advisory lock
/// (the key split as PostgreSQL shows a bigint key: high and low halves).
async fn waits_for_fence(conn: &tokio_postgres::Client) -> bool {
    conn.query_one(
        "SELECT EXISTS (SELECT 1 FROM pg_locks
                         WHERE locktype = 'advisory' AND NOT granted AND objsubid = 1
                           AND (classid::int8 << 32 | objid::int8) = $1
                           AND database = (SELECT oid FROM pg_database
                                            WHERE datname = current_database()))",
        &[&HORIZON_LOCK_KEY],
    )
    .await
    .unwrap()
    .get(0)
}

/// Returns once a session of this database queues for the fence's lock.
/// Panics if `finished` says the session expected to wait is done instead,
/// or if a session waits for any other lock (a row, a relation: the wait
/// the fence's lock is there to replace, and a possible deadlock).
async fn until_one_waits_for_the_fence(
    admin: &tokio_postgres::Client,
    finished: impl Fn() -> bool,
) {
    loop {
        let waiting = waits(admin).await;
        assert!(
            waiting.iter().all(|w| w == "advisory"),
            "a session waits for {waiting:?}, not for the fence's lock"
        );
        if waits_for_fence(admin).await {
            return;
        }
        assert!(!finished(), "it finished without waiting for the fence");
        tokio::task::yield_now().await;
    }
}

/// Flips a byte in the middle of `file`: same size, other bytes.
fn flip_a_byte(file: &std::path::Path) {
    let mut bytes = std::fs::read(file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5a;
    std::fs::write(file, &bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_month_is_archived_verified_and_dropped_and_reads_back_with_parquet() {
    let Some(f) = fixture().await else { return };
    let before = f.rows().await;
    let rollup = f.rollup().await;
    assert_eq!(before.len() as i64, ROWS);
    let archiver = f.archiver(None);
    let reports = archiver.archive_due().await.unwrap();
    assert_eq!(reports.len(), 1, "only the old month is due: {reports:?}");
    let report = &reports[0];
    assert_eq!(report.month, f.month);
    assert_eq!(report.rows, ROWS as u64);
    assert!(
        report.parquet_bytes > 0 && report.heap_bytes > 0,
        "{report:?}"
    );
    assert!(report.total_bytes >= report.heap_bytes);
    assert_eq!(report.resumed_from, None);
    assert!(report.export_elapsed.is_some() && report.verify_elapsed.is_some());
    // The partition is gone, the rollup is kept, the rest is untouched.
    assert!(!f.partition_exists().await);
    assert!(f.rows().await.is_empty());
    assert_eq!(f.rollup().await, rollup);
    assert_eq!(
        f.scalar("SELECT count(*) FROM analytics.events").await,
        10,
        "this month's rows stay"
    );
    assert_eq!(f.state().await, Some(ArchiveState::Dropped));
    // The object: its hash and size as reported, zstd, readable by the
    // parquet crate's plain row reader, with every row.
    let file = f.object_file();
    let bytes = std::fs::read(&file).unwrap();
    assert_eq!(bytes.len() as u64, report.parquet_bytes);
    assert_eq!(hex::encode(Sha256::digest(&bytes)), report.sha256);
    let reader = SerializedFileReader::new(std::fs::File::open(&file).unwrap()).unwrap();
    let meta = reader.metadata();
    assert_eq!(meta.file_metadata().num_rows(), ROWS);
    assert_eq!(meta.num_row_groups(), 3, "row groups of 1,000 rows");
    assert!(matches!(
        meta.row_group(0).column(0).compression(),
        parquet::basic::Compression::ZSTD(_)
    ));
    assert_eq!(parquet_rows(&file), sorted(before));
    // Nothing more is due; this month never is.
    assert!(archiver.archive_due().await.unwrap().is_empty());
    let recent = archiver.archive(Utc::now().date_naive()).await.unwrap_err();
    assert!(
        matches!(
            recent,
            ArchiveError::NotEligible {
                reason: NotEligible::TooRecent { .. },
                ..
            }
        ),
        "{recent:?}"
    );
    let missing = f.month.checked_sub_months(Months::new(5)).unwrap();
    let none = archiver.archive(missing).await.unwrap_err();
    assert!(
        matches!(
            none,
            ArchiveError::NotEligible {
                reason: NotEligible::NoPartition,
                ..
            }
        ),
        "{none:?}"
    );
    // Archiving a dropped month again reports it as it is.
    let again = archiver.archive(f.month).await.unwrap();
    assert_eq!(
        (again.resumed_from, again.rows, &again.sha256),
        (Some(ArchiveState::Dropped), ROWS as u64, &report.sha256)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_each_step_resumes_and_keeps_every_row_exactly_once() {
    let cases = [
        (Step::Fence, ArchiveState::Fenced),
        (Step::Detach, ArchiveState::Detached),
        (Step::Upload, ArchiveState::Detached),
        (Step::Export, ArchiveState::Exported),
        (Step::Verify, ArchiveState::Verified),
        (Step::Drop, ArchiveState::Dropped),
    ];
    for (step, recorded) in cases {
        let Some(f) = fixture().await else { return };
        let before = f.rows().await;
        let rollup = f.rollup().await;
        let crashed = f.archiver(Some(step)).archive(f.month).await.unwrap_err();
        assert!(
            matches!(crashed, ArchiveError::Injected { step: s, .. } if s == step),
            "{step:?}: {crashed:?}"
        );
        assert_eq!(f.state().await, Some(recorded), "{step:?}");
        // Never dropped unverified: until the drop, every row is still in
        // its partition (detached or not).
        if recorded != ArchiveState::Dropped {
            assert!(f.partition_exists().await, "{step:?}");
            let table = format!("SELECT count(*) FROM analytics.{}", partition_name(f.month));
            assert_eq!(f.scalar(&table).await, ROWS, "{step:?}");
        }
        if step == Step::Detach {
            // A half-written object from the crashed run is overwritten.
            let file = f.object_file();
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(&file, b"PAR1 half an upload").unwrap();
        }
        // A new archiver (a new process) resumes from the manifest.
        let report = f.archiver(None).archive(f.month).await.unwrap();
        assert_eq!(report.resumed_from, Some(recorded), "{step:?}");
        assert_eq!(report.rows, ROWS as u64, "{step:?}");
        assert_eq!(f.state().await, Some(ArchiveState::Dropped), "{step:?}");
        assert!(!f.partition_exists().await, "{step:?}");
        assert!(f.rows().await.is_empty(), "{step:?}");
        assert_eq!(f.rollup().await, rollup, "{step:?}");
        assert_eq!(
            parquet_rows(&f.object_file()),
            sorted(before),
            "{step:?}: every row archived once"
        );
        let verified = f.archiver(None).verify(f.month).await.unwrap();
        assert_eq!(verified.sha256, report.sha256, "{step:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_object_is_caught_and_the_partition_is_not_dropped() {
    let Some(f) = fixture().await else { return };
    let before = f.rows().await;
    f.archiver(Some(Step::Export))
        .archive(f.month)
        .await
        .unwrap_err();
    // Bytes change in the store after the export.
    let file = f.object_file();
    let mut bytes = std::fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5a;
    std::fs::write(&file, &bytes).unwrap();
    let error = f.archiver(None).archive(f.month).await.unwrap_err();
    assert!(
        matches!(
            &error,
            ArchiveError::Verification {
                mismatch: Mismatch::Hash { .. },
                ..
            }
        ),
        "{error:?}"
    );
    // The partition is still there, whole, and the month goes back to be
    // exported again; the error is on record.
    assert!(f.partition_exists().await);
    let record = f.archiver(None).record(f.month).await.unwrap().unwrap();
    assert_eq!(record.state, ArchiveState::Detached);
    assert!(
        record
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("SHA-256"),
        "{record:?}"
    );
    let table = format!("SELECT count(*) FROM analytics.{}", partition_name(f.month));
    assert_eq!(f.scalar(&table).await, ROWS);
    // The next run exports it again from the partition and finishes.
    let report = f.archiver(None).archive(f.month).await.unwrap();
    assert_eq!(report.resumed_from, Some(ArchiveState::Detached));
    assert_eq!(parquet_rows(&f.object_file()), sorted(before));
    assert!(!f.partition_exists().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollup_that_disagrees_with_the_archive_stops_the_drop() {
    let Some(f) = fixture().await else { return };
    f.archiver(Some(Step::Export))
        .archive(f.month)
        .await
        .unwrap_err();
    let conn = f.store.pool().get().await.unwrap();
    conn.execute(
        "UPDATE analytics.events_daily SET events = events + 1 WHERE tenant_id = 2 AND day = $1",
        &[&(f.month + TimeDelta::days(3))],
    )
    .await
    .unwrap();
    let error = f.archiver(None).archive(f.month).await.unwrap_err();
    let ArchiveError::Verification {
        mismatch:
            Mismatch::Rollup {
                tenant_id,
                day,
                archived_events,
                rollup_events,
                ..
            },
        ..
    } = error
    else {
        panic!("{error:?}");
    };
    assert_eq!((tenant_id, day), (2, f.month + TimeDelta::days(3)));
    assert_eq!(rollup_events, archived_events + 1);
    assert_eq!(f.state().await, Some(ArchiveState::Exported));
    assert!(f.partition_exists().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_row_for_an_archived_month_is_refused_before_and_after_the_detach() {
    let Some(f) = fixture().await else { return };
    assert_eq!(f.store.archive_horizon().await.unwrap(), None);
    let next = f.month.checked_add_months(Months::new(1)).unwrap();
    let writer = f.store.writer(WriterConfig::default());
    let late = |at: DateTime<Utc>| Event {
        tenant_id: TenantId(1),
        created_at: at,
        event_type: "late".into(),
        processing_time_ms: 5.0,
    };
    let batch = vec![
        late(start(f.month) + TimeDelta::days(2)),
        late(Utc::now()),
        late(start(next) - TimeDelta::microseconds(1)),
    ];
    // Fenced, not yet detached: the partition would take the row, the
    // fence refuses it.
    f.archiver(Some(Step::Fence))
        .archive(f.month)
        .await
        .unwrap_err();
    assert_eq!(f.store.archive_horizon().await.unwrap(), Some(start(next)));
    for round in 0..2 {
        let report = writer.write(Uuid::now_v7(), &batch).await.unwrap();
        assert_eq!(report.accepted, 1);
        let codes: Vec<(usize, &str)> = report.rejected.iter().map(|r| (r.index, r.code)).collect();
        assert_eq!(
            codes,
            vec![
                (0, "before_archived_horizon"),
                (2, "before_archived_horizon")
            ]
        );
        let expected = if round == 0 { ROWS } else { 0 };
        assert_eq!(f.rows().await.len() as i64, expected);
        // Archived and dropped: still refused, nothing in the default
        // partition.
        f.archiver(None).archive(f.month).await.unwrap();
        assert!(f.rows().await.is_empty());
        assert_eq!(f.store.default_partition_rows().await.unwrap(), 0);
    }
    assert_eq!(
        f.scalar(
            "SELECT sum(events)::bigint FROM analytics.events_daily WHERE day >= current_date - 1"
        )
        .await,
        12,
        "the recent rows of both batches were written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_brings_back_the_same_rows_and_lowers_the_horizon() {
    let Some(f) = fixture().await else { return };
    let before = f.rows().await;
    let rollup = f.rollup().await;
    let archiver = f.archiver(None);
    archiver.archive(f.month).await.unwrap();
    assert!(f.rows().await.is_empty());
    // A crash right after the restore is recorded as started, then resume.
    let crashed = f
        .archiver(Some(Step::RestoreStart))
        .restore(f.month)
        .await
        .unwrap_err();
    assert!(
        matches!(
            crashed,
            ArchiveError::Injected {
                step: Step::RestoreStart,
                ..
            }
        ),
        "{crashed:?}"
    );
    assert_eq!(f.state().await, Some(ArchiveState::Restoring));
    let restored = archiver.restore(f.month).await.unwrap();
    assert_eq!(restored.rows, ROWS as u64);
    assert_eq!(restored.horizon, None, "nothing else is archived");
    assert_eq!(f.rows().await, before, "the same rows, byte for byte");
    assert_eq!(f.rollup().await, rollup);
    assert_eq!(f.state().await, Some(ArchiveState::Restored));
    assert_eq!(f.store.archive_horizon().await.unwrap(), None);
    // Attached again: queries through the parent see it, and a late row
    // is accepted again.
    let report = f
        .store
        .writer(WriterConfig::default())
        .write(
            Uuid::now_v7(),
            &[Event {
                tenant_id: TenantId(2),
                created_at: start(f.month) + TimeDelta::hours(1),
                event_type: "late".into(),
                processing_time_ms: 1.0,
            }],
        )
        .await
        .unwrap();
    assert_eq!(report.accepted, 1, "{:?}", report.rejected);
    // Restoring twice is a no-op; a restored month is not due again, but
    // can be archived again on purpose.
    assert_eq!(archiver.restore(f.month).await.unwrap().rows, 0);
    assert!(archiver.archive_due().await.unwrap().is_empty());
    let again = archiver.archive(f.month).await.unwrap();
    assert_eq!(again.rows, ROWS as u64 + 1);
    assert_eq!(f.state().await, Some(ArchiveState::Dropped));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_rechecks_an_archived_month_against_the_manifest() {
    let Some(f) = fixture().await else { return };
    let archiver = f.archiver(None);
    let archived = archiver.archive(f.month).await.unwrap();
    let verified = archiver.verify(f.month).await.unwrap();
    assert_eq!(verified.state, ArchiveState::Dropped);
    assert_eq!(
        (verified.rows, verified.parquet_bytes, &verified.sha256),
        (archived.rows, archived.parquet_bytes, &archived.sha256)
    );
    assert!(verified.against_rollup && !verified.against_partition);
    // Damage in cold storage is found, and nothing changes in the manifest.
    let file = f.object_file();
    let mut bytes = std::fs::read(&file).unwrap();
    bytes.truncate(bytes.len() - 10);
    std::fs::write(&file, &bytes).unwrap();
    let error = archiver.verify(f.month).await.unwrap_err();
    assert!(
        matches!(
            error,
            ArchiveError::Verification {
                mismatch: Mismatch::Size { .. },
                ..
            }
        ),
        "{error:?}"
    );
    assert_eq!(f.state().await, Some(ArchiveState::Dropped));
    // And a restore refuses it.
    let error = archiver.restore(f.month).await.unwrap_err();
    assert!(
        matches!(error, ArchiveError::Verification { .. }),
        "{error:?}"
    );
    assert!(!f.partition_exists().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fence_waits_for_an_ingest_transaction_in_flight() {
    let Some(f) = fixture().await else { return };
    // The fixture's batches read the horizon without locking its row (a
    // row lock would have left its locker in xmax: a tuple write per
    // batch, and a MultiXact when batches overlap).
    let xmax: i64 = f
        .scalar("SELECT xmax::text::int8 FROM analytics.archive_horizon")
        .await;
    assert_eq!(xmax, 0, "the horizon's row was locked");
    // An ingest batch holds the fence's lock shared until its commit, as
    // EventWriter::write does.
    let mut conn = f.store.pool().get().await.unwrap();
    let batch = conn.begin().await.unwrap();
    batch
        .query(
            "SELECT pg_advisory_xact_lock_shared($1)",
            &[&HORIZON_LOCK_KEY],
        )
        .await
        .unwrap();
    let archiver = f.archiver(Some(Step::Fence));
    let month = f.month;
    let fence = tokio::spawn(async move { archiver.archive(month).await });
    let admin = f.store.pool().get().await.unwrap();
    until_one_waits_for_the_fence(&admin, || fence.is_finished()).await;
    assert_eq!(f.store.archive_horizon().await.unwrap(), None);
    batch.commit().await.unwrap();
    let fenced = fence.await.unwrap().unwrap_err();
    assert!(
        matches!(
            fenced,
            ArchiveError::Injected {
                step: Step::Fence,
                ..
            }
        ),
        "{fenced:?}"
    );
    let next = f.month.checked_add_months(Months::new(1)).unwrap();
    assert_eq!(f.store.archive_horizon().await.unwrap(), Some(start(next)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_waiting_for_the_fence_sees_the_horizon_raised_meanwhile() {
    let Some(f) = fixture().await else { return };
    let next = f.month.checked_add_months(Months::new(1)).unwrap();
    // An archiver's fence, in flight: the lock held exclusive, the horizon
    // raised, not yet committed.
    let mut conn = f.store.pool().get().await.unwrap();
    let fence = conn.begin().await.unwrap();
    fence
        .query("SELECT pg_advisory_xact_lock($1)", &[&HORIZON_LOCK_KEY])
        .await
        .unwrap();
    fence
        .execute(
            "UPDATE analytics.archive_horizon SET archived_before = $1",
            &[&start(next)],
        )
        .await
        .unwrap();
    let writer = f.store.writer(WriterConfig::default());
    let batch = vec![
        Event {
            tenant_id: TenantId(1),
            created_at: start(f.month) + TimeDelta::days(2),
            event_type: "late".into(),
            processing_time_ms: 1.0,
        },
        Event {
            tenant_id: TenantId(1),
            created_at: Utc::now(),
            event_type: "late".into(),
            processing_time_ms: 1.0,
        },
    ];
    let write = tokio::spawn(async move { writer.write(Uuid::now_v7(), &batch).await });
    let admin = f.store.pool().get().await.unwrap();
    until_one_waits_for_the_fence(&admin, || write.is_finished()).await;
    fence.commit().await.unwrap();
    let report: IngestReport = write.await.unwrap().unwrap();
    assert_eq!(report.accepted, 1);
    let codes: Vec<(usize, &str)> = report.rejected.iter().map(|r| (r.index, r.code)).collect();
    assert_eq!(codes, vec![(0, "before_archived_horizon")]);
    assert_eq!(
        f.rows().await.len() as i64,
        ROWS,
        "nothing written into the fenced month"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_and_a_batch_writing_into_the_default_partition_do_not_deadlock() {
    let Some(f) = fixture().await else { return };
    let before = f.rows().await;
    f.archiver(None).archive(f.month).await.unwrap();
    // A batch in flight: it holds the fence's lock shared and has written a
    // row into the default partition (a month with no partition).
    let stray = start(f.month.checked_sub_months(Months::new(6)).unwrap());
    let mut conn = f.store.pool().get().await.unwrap();
    let batch = conn.begin().await.unwrap();
    batch
        .query(
            "SELECT pg_advisory_xact_lock_shared($1)",
            &[&HORIZON_LOCK_KEY],
        )
        .await
        .unwrap();
    let insert =
        "INSERT INTO analytics.events (tenant_id, created_at, event_type, processing_time_us)
                  VALUES (1, $1, 'stray', 1)";
    batch.execute(insert, &[&stray]).await.unwrap();
    let archiver = f.archiver(None);
    let month = f.month;
    let restore = tokio::spawn(async move { archiver.restore(month).await });
    // The restore queues for the fence's lock before it locks anything the
    // batch needs (before, it waited on the default partition for ATTACH,
    // while the batch would wait for it on the horizon).
    let admin = f.store.pool().get().await.unwrap();
    until_one_waits_for_the_fence(&admin, || restore.is_finished()).await;
    // The batch goes on into the default partition, and commits.
    batch
        .execute(insert, &[&(stray + TimeDelta::seconds(1))])
        .await
        .unwrap();
    batch.commit().await.unwrap();
    let restored = restore.await.unwrap().unwrap();
    assert_eq!(restored.rows, ROWS as u64);
    assert_eq!(f.rows().await, before);
    assert_eq!(f.store.default_partition_rows().await.unwrap(), 2);
    assert_eq!(f.state().await, Some(ArchiveState::Restored));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verified_month_whose_object_changed_is_not_dropped() {
    let Some(f) = fixture().await else { return };
    let before = f.rows().await;
    let table = format!("SELECT count(*) FROM analytics.{}", partition_name(f.month));
    // Overwritten with other bytes of the same size, then deleted: each
    // after a crash right after the verification was recorded.
    for damage in ["overwritten", "deleted"] {
        f.archiver(Some(Step::Verify))
            .archive(f.month)
            .await
            .unwrap_err();
        assert_eq!(f.state().await, Some(ArchiveState::Verified), "{damage}");
        let file = f.object_file();
        if damage == "overwritten" {
            flip_a_byte(&file);
        } else {
            std::fs::remove_file(&file).unwrap();
        }
        let error = f.archiver(None).archive(f.month).await.unwrap_err();
        let expected = match &error {
            ArchiveError::Verification {
                mismatch: Mismatch::Hash { .. },
                ..
            } => "overwritten",
            ArchiveError::Verification {
                mismatch: Mismatch::Missing { .. },
                ..
            } => "deleted",
            other => panic!("{damage}: {other:?}"),
        };
        assert_eq!(expected, damage);
        // Not dropped: whole, and back to be exported again.
        assert!(f.partition_exists().await, "{damage}");
        assert_eq!(f.scalar(&table).await, ROWS, "{damage}");
        let record = f.archiver(None).record(f.month).await.unwrap().unwrap();
        assert_eq!(record.state, ArchiveState::Detached, "{damage}");
        assert!(record.last_error.is_some(), "{damage}: {record:?}");
    }
    let report = f.archiver(None).archive(f.month).await.unwrap();
    assert_eq!(report.resumed_from, Some(ArchiveState::Detached));
    assert!(!f.partition_exists().await);
    assert_eq!(parquet_rows(&f.object_file()), sorted(before));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_sends_a_verified_month_that_no_longer_matches_back() {
    let Some(f) = fixture().await else { return };
    let day = f.month + TimeDelta::days(3);
    let conn = f.store.pool().get().await.unwrap();
    let nudge = |by: i64| {
        let conn = &conn;
        async move {
            conn.execute(
                "UPDATE analytics.events_daily SET events = events + $2
                  WHERE tenant_id = 2 AND day = $1",
                &[&day, &by],
            )
            .await
            .unwrap();
        }
    };
    f.archiver(Some(Step::Verify))
        .archive(f.month)
        .await
        .unwrap_err();
    // The rollup changed since: back to exported, to be verified again.
    nudge(1).await;
    let error = f.archiver(None).verify(f.month).await.unwrap_err();
    assert!(
        matches!(
            error,
            ArchiveError::Verification {
                mismatch: Mismatch::Rollup { .. },
                ..
            }
        ),
        "{error:?}"
    );
    assert_eq!(f.state().await, Some(ArchiveState::Exported));
    nudge(-1).await;
    f.archiver(Some(Step::Verify))
        .archive(f.month)
        .await
        .unwrap_err();
    assert_eq!(f.state().await, Some(ArchiveState::Verified));
    // The object damaged since: back to detached, to be exported again.
    let file = f.object_file();
    let mut bytes = std::fs::read(&file).unwrap();
    bytes.truncate(bytes.len() - 10);
    std::fs::write(&file, &bytes).unwrap();
    let error = f.archiver(None).verify(f.month).await.unwrap_err();
    assert!(
        matches!(
            error,
            ArchiveError::Verification {
                mismatch: Mismatch::Size { .. },
                ..
            }
        ),
        "{error:?}"
    );
    assert_eq!(f.state().await, Some(ArchiveState::Detached));
    assert!(f.partition_exists().await);
    let report = f.archiver(None).archive(f.month).await.unwrap();
    assert_eq!(report.resumed_from, Some(ArchiveState::Detached));
    assert_eq!(f.state().await, Some(ArchiveState::Dropped));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_due_goes_past_a_month_that_keeps_failing() {
    let Some(f) = fixture().await else { return };
    // An older month, whose rollup disagrees with its rows.
    let older = f.month.checked_sub_months(Months::new(1)).unwrap();
    f.store.ensure_partitions(older, older, 0).await.unwrap();
    let events: Vec<Event> = (0..20)
        .map(|i| Event {
            tenant_id: TenantId(1),
            created_at: start(older) + TimeDelta::days(1) + TimeDelta::minutes(i),
            event_type: "old".into(),
            processing_time_ms: 1.0,
        })
        .collect();
    let written = f
        .store
        .writer(WriterConfig::default())
        .write(Uuid::now_v7(), &events)
        .await
        .unwrap();
    assert_eq!(written.accepted, 20);
    let conn = f.store.pool().get().await.unwrap();
    let nudge =
        "UPDATE analytics.events_daily SET events = events + $2 WHERE tenant_id = 1 AND day = $1";
    let day = older + TimeDelta::days(1);
    conn.execute(nudge, &[&day, &1i64]).await.unwrap();
    let archiver = f.archiver(None);
    let report = archiver.archive_due_report().await.unwrap();
    let archived: Vec<NaiveDate> = report.archived.iter().map(|r| r.month).collect();
    assert_eq!(archived, vec![f.month], "the later month is archived");
    assert_eq!(report.failed.len(), 1, "{report:?}");
    assert_eq!(report.failed[0].month, older);
    assert!(
        matches!(
            report.failed[0].error,
            ArchiveError::Verification {
                mismatch: Mismatch::Rollup { .. },
                ..
            }
        ),
        "{report:?}"
    );
    assert!(report.not_attempted.is_empty());
    assert_eq!(f.state().await, Some(ArchiveState::Dropped));
    let stuck = archiver.record(older).await.unwrap().unwrap();
    assert_eq!(stuck.state, ArchiveState::Exported);
    assert!(stuck.last_error.is_some());
    // archive_due tries it again and returns its error.
    let error = archiver.archive_due().await.unwrap_err();
    assert!(
        matches!(error, ArchiveError::Verification { .. }),
        "{error:?}"
    );
    // Called off: the partition is back, with its rows; the horizon stays
    // at the later month's end; archive_due leaves the month alone.
    let aborted = archiver.abort(older).await.unwrap();
    assert_eq!(
        (aborted.from, aborted.reattached),
        (ArchiveState::Exported, true)
    );
    let next = f.month.checked_add_months(Months::new(1)).unwrap();
    assert_eq!(aborted.horizon, Some(start(next)));
    assert_eq!(
        archiver.record(older).await.unwrap().unwrap().state,
        ArchiveState::Aborted
    );
    let visible = conn
        .query_one(
            "SELECT count(*) FROM analytics.events WHERE created_at >= $1 AND created_at < $2",
            &[&start(older), &start(f.month)],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(visible, 20);
    let again = archiver.archive_due_report().await.unwrap();
    assert!(
        again.archived.is_empty() && again.failed.is_empty(),
        "{again:?}"
    );
    // The rollup corrected, an explicit archive starts it over.
    conn.execute(nudge, &[&day, &-1i64]).await.unwrap();
    let report = archiver.archive(older).await.unwrap();
    assert_eq!((report.rows, report.resumed_from), (20, None));
    assert_eq!(
        archiver.record(older).await.unwrap().unwrap().state,
        ArchiveState::Dropped
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_attaches_a_detached_month_again_and_lowers_the_horizon() {
    let Some(f) = fixture().await else { return };
    let before = f.rows().await;
    f.archiver(Some(Step::Export))
        .archive(f.month)
        .await
        .unwrap_err();
    assert!(
        f.rows().await.is_empty(),
        "detached: not seen through the parent"
    );
    let archiver = f.archiver(None);
    let aborted = archiver.abort(f.month).await.unwrap();
    assert_eq!(
        (aborted.from, aborted.reattached, aborted.horizon),
        (ArchiveState::Exported, true, None)
    );
    assert_eq!(f.state().await, Some(ArchiveState::Aborted));
    assert_eq!(f.store.archive_horizon().await.unwrap(), None);
    assert_eq!(f.rows().await, before, "attached again, every row");
    // Late rows are taken again; the month is not due; aborting twice is
    // a no-op.
    let late = Event {
        tenant_id: TenantId(2),
        created_at: start(f.month) + TimeDelta::hours(5),
        event_type: "late".into(),
        processing_time_ms: 1.0,
    };
    let report = f
        .store
        .writer(WriterConfig::default())
        .write(Uuid::now_v7(), &[late])
        .await
        .unwrap();
    assert_eq!(report.accepted, 1, "{:?}", report.rejected);
    assert!(archiver.archive_due().await.unwrap().is_empty());
    assert_eq!(
        archiver.abort(f.month).await.unwrap().from,
        ArchiveState::Aborted
    );
    // Archived on purpose, from the start; a dropped month cannot be
    // aborted.
    let again = archiver.archive(f.month).await.unwrap();
    assert_eq!((again.rows, again.resumed_from), (ROWS as u64 + 1, None));
    let error = archiver.abort(f.month).await.unwrap_err();
    assert!(
        matches!(error, ArchiveError::WrongState { .. }),
        "{error:?}"
    );
}
