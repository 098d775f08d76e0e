//! The archive file: one Parquet file a month, written with the parquet
//! crate's own column writers (no Arrow), zstd-compressed.
//!
//! Schema (`message events`), every column `REQUIRED`:
//!
//! | column | physical | logical |
//! | --- | --- | --- |
//! | `tenant_id` | `INT64` | |
//! | `created_at` | `INT64` | `TIMESTAMP(MICROS, isAdjustedToUTC = true)` |
//! | `event_type` | `BYTE_ARRAY` | `STRING` |
//! | `processing_time_us` | `INT64` | |
//!
//! Rows are in `(tenant_id, created_at, event_type, processing_time_us)`
//! order (`event_type` in byte order), the order verification reads the
//! partition in. Nothing here touches the database or the store: the
//! functions are blocking and run on tokio's blocking threads, fed by or
//! feeding a bounded channel, so memory stays at one row group.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, NaiveDate, Utc};
use parquet::basic::{Compression, ZstdLevel};
use parquet::column::reader::ColumnReader;
use parquet::column::writer::ColumnWriter;
use parquet::data_type::ByteArray;
use parquet::errors::ParquetError;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use parquet::file::reader::FileReader;
use parquet::file::serialized_reader::SerializedFileReader;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use parquet::schema::types::SchemaDescriptor;
use sha2::{Digest, Sha256};

use super::error::{ArchiveError, Mismatch};

/// The archive's Parquet schema, in Parquet's message syntax.
pub const PARQUET_SCHEMA: &str = "message events {
    REQUIRED INT64 tenant_id;
    REQUIRED INT64 created_at (TIMESTAMP(MICROS, true));
    REQUIRED BYTE_ARRAY event_type (STRING);
    REQUIRED INT64 processing_time_us;
}";

/// Rows handed between the database side and the file side at a time.
pub(crate) const CHUNK_ROWS: usize = 8_192;

/// One archived event, as stored. Ordered as the archive is.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ArchivedRow {
    /// Whose event.
    pub tenant_id: i64,
    /// When it happened (microsecond precision, as PostgreSQL keeps it).
    pub created_at: DateTime<Utc>,
    /// What happened.
    pub event_type: String,
    /// Processing time in whole microseconds.
    pub processing_time_us: i64,
}

/// Events and their summed processing time of one (tenant, UTC day).
pub(crate) type Totals = BTreeMap<(i64, NaiveDate), (i64, i64)>;

/// Adds `row` to its (tenant, day) cell. Saturating: an overflow cannot be
/// in a valid archive (the rollup is `bigint` too) and shows as a mismatch.
pub(crate) fn add_to_totals(totals: &mut Totals, row: &ArchivedRow) {
    let cell = totals
        .entry((row.tenant_id, row.created_at.date_naive()))
        .or_insert((0, 0));
    cell.0 = cell.0.saturating_add(1);
    cell.1 = cell.1.saturating_add(row.processing_time_us);
}

/// What [`ArchiveWriter::finish`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Written {
    pub(crate) rows: u64,
    pub(crate) bytes: u64,
    pub(crate) sha256: String,
}

/// A writer that hashes and counts what passes through it, so the file's
/// SHA-256 is known when it is closed, without reading it again.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The columns of the row group being filled.
#[derive(Default)]
struct Columns {
    tenant_id: Vec<i64>,
    created_at_us: Vec<i64>,
    event_type: Vec<ByteArray>,
    processing_time_us: Vec<i64>,
}

impl Columns {
    fn len(&self) -> usize {
        self.tenant_id.len()
    }

    fn split_off(&mut self, at: usize) -> Columns {
        Columns {
            tenant_id: self.tenant_id.split_off(at),
            created_at_us: self.created_at_us.split_off(at),
            event_type: self.event_type.split_off(at),
            processing_time_us: self.processing_time_us.split_off(at),
        }
    }
}

/// Writes one archive file: rows pushed in chunks, a row group written
/// whenever `row_group_rows` are buffered.
pub(crate) struct ArchiveWriter {
    writer: SerializedFileWriter<Hashing<BufWriter<File>>>,
    buffer: Columns,
    row_group_rows: usize,
    rows: u64,
}

impl ArchiveWriter {
    /// Creates `path` for `month`'s archive.
    pub(crate) fn create(
        path: &Path,
        month: NaiveDate,
        row_group_rows: usize,
        zstd_level: i32,
    ) -> Result<ArchiveWriter, ArchiveError> {
        let file = File::create(path).map_err(|e| ArchiveError::scratch(path, e))?;
        let schema = Arc::new(parse_message_type(PARQUET_SCHEMA).map_err(ArchiveError::parquet)?);
        let level = ZstdLevel::try_new(zstd_level).map_err(ArchiveError::parquet)?;
        let properties = WriterProperties::builder()
            .set_compression(Compression::ZSTD(level))
            // A fixed creator: the same rows give the same bytes, so a
            // re-export after a crash writes the object it would have.
            .set_created_by(format!(
                "ferrokeel-pg-analytics {}",
                env!("CARGO_PKG_VERSION")
            ))
            .set_key_value_metadata(Some(vec![
                KeyValue::new("ferrokeel.month".into(), month.format("%Y-%m").to_string()),
                KeyValue::new(
                    "ferrokeel.sort".into(),
                    "tenant_id,created_at,event_type,processing_time_us".to_owned(),
                ),
            ]))
            .build();
        let writer = SerializedFileWriter::new(
            Hashing {
                inner: BufWriter::with_capacity(1 << 20, file),
                hasher: Sha256::new(),
                bytes: 0,
            },
            schema,
            Arc::new(properties),
        )
        .map_err(ArchiveError::parquet)?;
        Ok(ArchiveWriter {
            writer,
            buffer: Columns::default(),
            row_group_rows: row_group_rows.max(1),
            rows: 0,
        })
    }

    /// Appends `rows` (in archive order).
    pub(crate) fn push(&mut self, rows: Vec<ArchivedRow>) -> Result<(), ArchiveError> {
        for row in rows {
            self.buffer.tenant_id.push(row.tenant_id);
            self.buffer
                .created_at_us
                .push(row.created_at.timestamp_micros());
            self.buffer
                .event_type
                .push(ByteArray::from(row.event_type.into_bytes()));
            self.buffer.processing_time_us.push(row.processing_time_us);
        }
        while self.buffer.len() >= self.row_group_rows {
            let rest = self.buffer.split_off(self.row_group_rows);
            let full = std::mem::replace(&mut self.buffer, rest);
            self.write_row_group(&full)?;
        }
        Ok(())
    }

    fn write_row_group(&mut self, columns: &Columns) -> Result<(), ArchiveError> {
        let mut group = self
            .writer
            .next_row_group()
            .map_err(ArchiveError::parquet)?;
        let mut index = 0;
        while let Some(mut column) = group.next_column().map_err(ArchiveError::parquet)? {
            let written = match (index, column.untyped()) {
                (0, ColumnWriter::Int64ColumnWriter(w)) => {
                    w.write_batch(&columns.tenant_id, None, None)
                }
                (1, ColumnWriter::Int64ColumnWriter(w)) => {
                    w.write_batch(&columns.created_at_us, None, None)
                }
                (2, ColumnWriter::ByteArrayColumnWriter(w)) => {
                    w.write_batch(&columns.event_type, None, None)
                }
                (3, ColumnWriter::Int64ColumnWriter(w)) => {
                    w.write_batch(&columns.processing_time_us, None, None)
                }
                _ => Err(ParquetError::General(format!(
                    "column {index} of the archive schema has an unexpected type"
                ))),
            };
            written.map_err(ArchiveError::parquet)?;
            column.close().map_err(ArchiveError::parquet)?;
            index += 1;
        }
        group.close().map_err(ArchiveError::parquet)?;
        self.rows += columns.len() as u64;
        Ok(())
    }

    /// Writes the last row group and the footer; returns what was written.
    pub(crate) fn finish(mut self, path: &Path) -> Result<Written, ArchiveError> {
        if self.buffer.len() > 0 {
            let last = std::mem::take(&mut self.buffer);
            self.write_row_group(&last)?;
        }
        let mut hashing = self.writer.into_inner().map_err(ArchiveError::parquet)?;
        hashing
            .inner
            .flush()
            .map_err(|e| ArchiveError::scratch(path, e))?;
        Ok(Written {
            rows: self.rows,
            bytes: hashing.bytes,
            sha256: hex::encode(hashing.hasher.finalize()),
        })
    }
}

/// Reads the archive file at `path` in chunks of at most `chunk_rows`
/// rows, in file order, handing each to `each`; stops early (without
/// error) when `each` returns `false`. Returns the rows read. A file whose
/// schema is not [`PARQUET_SCHEMA`] is a [`Mismatch::Schema`] of `month`.
pub(crate) fn read_archive(
    path: &Path,
    month: NaiveDate,
    chunk_rows: usize,
    mut each: impl FnMut(Vec<ArchivedRow>) -> bool,
) -> Result<u64, ArchiveError> {
    let file = File::open(path).map_err(|e| ArchiveError::scratch(path, e))?;
    let reader = SerializedFileReader::new(file).map_err(ArchiveError::parquet)?;
    check_schema(reader.metadata().file_metadata().schema_descr()).map_err(|detail| {
        ArchiveError::Verification {
            month,
            mismatch: Mismatch::Schema(detail),
        }
    })?;
    let chunk_rows = chunk_rows.max(1);
    let mut total = 0u64;
    for g in 0..reader.num_row_groups() {
        let group = reader.get_row_group(g).map_err(ArchiveError::parquet)?;
        let column = |i| group.get_column_reader(i).map_err(ArchiveError::parquet);
        let (
            ColumnReader::Int64ColumnReader(mut tenant),
            ColumnReader::Int64ColumnReader(mut at),
            ColumnReader::ByteArrayColumnReader(mut kind),
            ColumnReader::Int64ColumnReader(mut took),
        ) = (column(0)?, column(1)?, column(2)?, column(3)?)
        else {
            return Err(ArchiveError::Verification {
                month,
                mismatch: Mismatch::Schema("a column has an unexpected physical type".into()),
            });
        };
        let (mut t, mut a, mut k, mut p) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        loop {
            t.clear();
            a.clear();
            k.clear();
            p.clear();
            let n = tenant
                .read_records(chunk_rows, None, None, &mut t)
                .map_err(ArchiveError::parquet)?
                .0;
            if n == 0 {
                break;
            }
            let counts = [
                at.read_records(n, None, None, &mut a)
                    .map_err(ArchiveError::parquet)?
                    .0,
                kind.read_records(n, None, None, &mut k)
                    .map_err(ArchiveError::parquet)?
                    .0,
                took.read_records(n, None, None, &mut p)
                    .map_err(ArchiveError::parquet)?
                    .0,
            ];
            if counts.iter().any(|&c| c != n) || [a.len(), k.len(), p.len()] != [n; 3] {
                return Err(ArchiveError::parquet(ParquetError::General(format!(
                    "row group {g}: the columns hold different numbers of rows"
                ))));
            }
            let mut rows = Vec::with_capacity(n);
            for i in 0..n {
                let created_at = DateTime::from_timestamp_micros(a[i]).ok_or_else(|| {
                    ArchiveError::parquet(ParquetError::General(format!(
                        "created_at {} is out of range",
                        a[i]
                    )))
                })?;
                let event_type = std::str::from_utf8(k[i].data())
                    .map_err(|e| ArchiveError::parquet(ParquetError::External(Box::new(e))))?
                    .to_owned();
                rows.push(ArchivedRow {
                    tenant_id: t[i],
                    created_at,
                    event_type,
                    processing_time_us: p[i],
                });
            }
            total += n as u64;
            if !each(rows) {
                return Ok(total);
            }
        }
    }
    Ok(total)
}

/// Whether `schema` is the archive schema; if not, which column differs.
fn check_schema(schema: &SchemaDescriptor) -> Result<(), String> {
    let expected = SchemaDescriptor::new(Arc::new(
        parse_message_type(PARQUET_SCHEMA).map_err(|e| e.to_string())?,
    ));
    if schema.num_columns() != expected.num_columns() {
        return Err(format!(
            "{} columns, expected {}",
            schema.num_columns(),
            expected.num_columns()
        ));
    }
    for (got, want) in schema.columns().iter().zip(expected.columns()) {
        if got.self_type() != want.self_type()
            || got.max_def_level() != 0
            || got.max_rep_level() != 0
        {
            return Err(format!("column {:?} is not `{}`", got.name(), want.name()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(tenant_id: i64, us: i64, kind: &str, took: i64) -> ArchivedRow {
        ArchivedRow {
            tenant_id,
            created_at: DateTime::from_timestamp_micros(us).unwrap(),
            event_type: kind.into(),
            processing_time_us: took,
        }
    }

    #[test]
    fn a_file_reads_back_as_written_across_row_groups_and_hashes_stably() {
        let dir = std::env::temp_dir();
        let month = NaiveDate::from_ymd_opt(2024, 1, 1).unwrap();
        let rows: Vec<ArchivedRow> = (0..2_500)
            .map(|i| row(i % 3, 1_704_067_200_000_000 + i * 1_000_003, "login", i * 7))
            .collect();
        let mut digests = Vec::new();
        for n in 0..2 {
            let path = dir.join(format!(
                "ferrokeel-format-test-{}-{n}.parquet",
                std::process::id()
            ));
            let mut writer = ArchiveWriter::create(&path, month, 1_000, 3).unwrap();
            writer.push(rows[..1_234].to_vec()).unwrap();
            writer.push(rows[1_234..].to_vec()).unwrap();
            let written = writer.finish(&path).unwrap();
            assert_eq!(written.rows, 2_500);
            assert_eq!(written.bytes, std::fs::metadata(&path).unwrap().len());
            let mut back = Vec::new();
            let read = read_archive(&path, month, 700, |chunk| {
                back.extend(chunk);
                true
            })
            .unwrap();
            assert_eq!((read, &back), (2_500, &rows));
            digests.push(written.sha256);
            std::fs::remove_file(&path).unwrap();
        }
        assert_eq!(digests[0], digests[1], "the same rows give the same bytes");
    }
}
