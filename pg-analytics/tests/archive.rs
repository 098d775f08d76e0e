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
use pg_analytics::postgres::partition_name;
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
    // An ingest batch holds the horizon FOR SHARE until its commit, as
    // EventWriter::write does.
    let mut conn = f.store.pool().get().await.unwrap();
    let batch = conn.begin().await.unwrap();
    batch
        .query(
            "SELECT archived_before FROM analytics.archive_horizon FOR SHARE",
            &[],
        )
        .await
        .unwrap();
    let archiver = f.archiver(Some(Step::Fence));
    let month = f.month;
    let fence = tokio::spawn(async move { archiver.archive(month).await });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!fence.is_finished(), "the raise waits for the batch");
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
