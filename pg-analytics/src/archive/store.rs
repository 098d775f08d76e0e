//! The object store side: where a month's object lives, opening a store
//! from a URL, and moving a file in and out of it with bounded memory.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use chrono::NaiveDate;
use futures_util::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use sha2::{Digest, Sha256};

use super::error::ArchiveError;

/// The size of the parts a file is uploaded in (S3 wants at least 5 MiB
/// for every part but the last).
const PART_BYTES: usize = 16 << 20;

/// The object holding `month`'s archive:
/// `events/month=2024-01/events-2024-01.parquet`. The `month=` directory is
/// a Hive-style partition, so DuckDB and pyarrow read the whole `events/`
/// directory as one table with a `month` column.
pub fn object_path(month: NaiveDate) -> ObjectPath {
    let month = month.format("%Y-%m");
    ObjectPath::from(format!("events/month={month}/events-{month}.parquet"))
}

/// A store on the local directory `dir` (created if missing), writing with
/// `fsync` so that an object is on disk before the partition it archives
/// may be dropped.
pub fn local_store(dir: impl AsRef<Path>) -> Result<Arc<dyn ObjectStore>, ArchiveError> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).map_err(|e| ArchiveError::scratch(dir, e))?;
    let store = object_store::local::LocalFileSystem::new_with_prefix(dir)
        .map_err(|e| ArchiveError::store(&ObjectPath::default(), e))?
        .with_fsync(true);
    Ok(Arc::new(store))
}

/// Opens the store a URL names:
///
/// - `file:///absolute/dir` (or a plain path): [`local_store`];
/// - `s3://bucket/prefix` (feature `s3`): an S3-compatible store configured
///   from the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
///   `AWS_REGION`, `AWS_ENDPOINT` for MinIO and others, …; see
///   `object_store::aws::AmazonS3Builder::from_env`), objects under `prefix`.
pub fn store_from_url(url: &str) -> Result<Arc<dyn ObjectStore>, ArchiveError> {
    if let Some(path) = url.strip_prefix("file://") {
        return local_store(path);
    }
    if let Some(rest) = url.strip_prefix("s3://") {
        return s3_store(url, rest);
    }
    if url.contains("://") {
        return Err(ArchiveError::InvalidStore {
            url: url.to_owned(),
            reason: "expected file:///dir or s3://bucket/prefix",
        });
    }
    local_store(url)
}

#[cfg(feature = "s3")]
fn s3_store(url: &str, rest: &str) -> Result<Arc<dyn ObjectStore>, ArchiveError> {
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(ArchiveError::InvalidStore {
            url: url.to_owned(),
            reason: "no bucket",
        });
    }
    let s3 = object_store::aws::AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .build()
        .map_err(|e| ArchiveError::store(&ObjectPath::default(), e))?;
    let prefix = prefix.trim_matches('/');
    if prefix.is_empty() {
        Ok(Arc::new(s3))
    } else {
        Ok(Arc::new(object_store::prefix::PrefixStore::new(
            s3,
            ObjectPath::from(prefix),
        )))
    }
}

#[cfg(not(feature = "s3"))]
fn s3_store(url: &str, _rest: &str) -> Result<Arc<dyn ObjectStore>, ArchiveError> {
    Err(ArchiveError::InvalidStore {
        url: url.to_owned(),
        reason: "built without the `s3` feature of ferrokeel-pg-analytics",
    })
}

/// A local scratch file, removed when dropped.
pub(crate) struct Scratch {
    path: PathBuf,
}

impl Scratch {
    /// A fresh name in `dir` for `month`'s `purpose`.
    pub(crate) fn new(dir: &Path, month: NaiveDate, purpose: &str) -> Scratch {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        Scratch {
            path: dir.join(format!(
                "ferrokeel-archive-{}-{purpose}-{}-{nanos}.parquet",
                month.format("%Y-%m"),
                std::process::id()
            )),
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // Absent when the step failed before creating it.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Runs blocking file I/O off the async threads.
async fn blocking<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, ArchiveError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ArchiveError::scratch(path, std::io::Error::other(e)))?
        .map_err(|e| ArchiveError::scratch(path, e))
}

/// Uploads the file at `file` to `path`, part by part. The object appears
/// whole or not at all (a multipart upload is only visible once complete;
/// the local store renames its staging file), so a crash mid-upload leaves
/// the previous object, if any, and the next export overwrites it.
pub(crate) async fn upload(
    objects: &dyn ObjectStore,
    path: &ObjectPath,
    file: &Path,
) -> Result<(), ArchiveError> {
    let owned = file.to_owned();
    let mut reader = blocking(file, move || File::open(owned)).await?;
    let mut upload = objects
        .put_multipart(path)
        .await
        .map_err(|e| ArchiveError::store(path, e))?;
    loop {
        let (back, part) = blocking(file, move || {
            let mut part = Vec::with_capacity(PART_BYTES);
            (&mut reader)
                .take(PART_BYTES as u64)
                .read_to_end(&mut part)?;
            Ok((reader, part))
        })
        .await?;
        reader = back;
        if part.is_empty() {
            break;
        }
        if let Err(e) = upload.put_part(PutPayload::from(Bytes::from(part))).await {
            let _ = upload.abort().await;
            return Err(ArchiveError::store(path, e));
        }
    }
    upload
        .complete()
        .await
        .map_err(|e| ArchiveError::store(path, e))?;
    Ok(())
}

/// The size and SHA-256 (hex) of the object at `path`, streamed through
/// the hash (nothing is written locally).
pub(crate) async fn digest(
    objects: &dyn ObjectStore,
    path: &ObjectPath,
) -> Result<(u64, String), ArchiveError> {
    let got = objects
        .get(path)
        .await
        .map_err(|e| ArchiveError::store(path, e))?;
    let mut stream = got.into_stream();
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ArchiveError::store(path, e))?;
        hasher.update(&chunk);
        bytes += chunk.len() as u64;
    }
    Ok((bytes, hex::encode(hasher.finalize())))
}

/// Downloads `path` into the file `file`, hashing as it goes; returns its
/// size and SHA-256 (hex).
pub(crate) async fn download(
    objects: &dyn ObjectStore,
    path: &ObjectPath,
    file: &Path,
) -> Result<(u64, String), ArchiveError> {
    let got = objects
        .get(path)
        .await
        .map_err(|e| ArchiveError::store(path, e))?;
    let mut stream = got.into_stream();
    let owned = file.to_owned();
    let mut writer = blocking(file, move || File::create(owned)).await?;
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    let mut pending: Vec<Bytes> = Vec::new();
    let mut pending_len = 0usize;
    loop {
        let next = stream.next().await;
        let done = next.is_none();
        if let Some(chunk) = next {
            let chunk = chunk.map_err(|e| ArchiveError::store(path, e))?;
            hasher.update(&chunk);
            bytes += chunk.len() as u64;
            pending_len += chunk.len();
            pending.push(chunk);
        }
        if pending_len >= PART_BYTES || (done && !pending.is_empty()) {
            let chunks = std::mem::take(&mut pending);
            pending_len = 0;
            writer = blocking(file, move || {
                for chunk in &chunks {
                    writer.write_all(chunk)?;
                }
                Ok(writer)
            })
            .await?;
        }
        if done {
            break;
        }
    }
    drop(writer);
    Ok((bytes, hex::encode(hasher.finalize())))
}
