//! Writing the audit chain off the request path: a bounded queue, a writer
//! thread that seals and writes in batches, and counters for what was
//! written and what was dropped.
//!
//! A batch is committed when the writer returns `Ok` (a [`FileWriter`] has
//! then fsynced it). The chain continues only from committed records: after
//! a failed batch the writer thread asks the writer where the committed log
//! ends ([`AuditWriter::recover`]; a [`FileWriter`] truncates the partial
//! batch away and reads its last record back) and seals the next records
//! after that, so a full disk costs the records it dropped (counted) and
//! never the verifiability of the file.
//!
//! Shutting down is explicit and async ([`AuditLog::close`]); dropping an
//! [`AuditLog`] only tells the writer to finish and never waits.

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;

use super::{AuditChain, AuditEntry, AuditRecord};

/// Why the audit log could not be opened, started or closed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// The file could not be opened, read, repaired or created.
    #[error("audit log {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file's last complete record is not an audit record.
    #[error("audit log {path}: the last record is unreadable: {source}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The writer thread could not be started.
    #[error("cannot start the audit writer thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// The writer thread panicked; queued records may be lost.
    #[error("the audit writer thread panicked")]
    WriterPanicked,
}

/// What kind of failure an [`AuditError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuditErrorKind {
    /// [`AuditError::Io`].
    Io,
    /// [`AuditError::Corrupt`].
    Corrupt,
    /// [`AuditError::Spawn`].
    Spawn,
    /// [`AuditError::WriterPanicked`].
    WriterPanicked,
}

impl AuditError {
    /// What kind of failure this is.
    pub fn kind(&self) -> AuditErrorKind {
        match self {
            AuditError::Io { .. } => AuditErrorKind::Io,
            AuditError::Corrupt { .. } => AuditErrorKind::Corrupt,
            AuditError::Spawn(_) => AuditErrorKind::Spawn,
            AuditError::WriterPanicked => AuditErrorKind::WriterPanicked,
        }
    }
}

/// Where the audit log is handed entries. Implementations must not block
/// the request path.
pub trait AuditSink: Send + Sync + 'static {
    /// Records `entry`.
    fn record(&self, entry: AuditEntry);
}

/// An [`AuditSink`] that drops everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoAudit;

impl AuditSink for NoAudit {
    fn record(&self, _entry: AuditEntry) {}
}

/// Where sealed records are written, a batch at a time.
pub trait AuditWriter: Send + 'static {
    /// Writes `records` durably (a file writer fsyncs once per batch). `Ok`
    /// means the batch is committed; after an `Err` none of it counts.
    fn write_batch(&mut self, records: &[AuditRecord]) -> std::io::Result<()>;

    /// Called after a failed batch: removes whatever part of it reached the
    /// medium and returns the chain position after the last committed
    /// record, read back from the medium. `Ok(None)` (the default) means
    /// the writer cannot tell, and the log continues after the last batch
    /// this process committed.
    fn recover(&mut self) -> std::io::Result<Option<AuditChain>> {
        Ok(None)
    }
}

/// Appends JSON lines to a file and fsyncs after each batch. A failed
/// batch is truncated away, back to the last committed length.
#[derive(Debug)]
pub struct FileWriter {
    file: File,
    path: PathBuf,
    /// The file's length after the last committed batch.
    committed_len: u64,
    /// A failed batch may have left bytes after `committed_len`.
    dirty: bool,
}

/// How far back [`last_line`] looks at first (a record is a few hundred bytes).
const TAIL_WINDOW: u64 = 16 * 1024;

/// The last complete (`\n`-terminated) line of `file`, and the length of
/// the file up to the end of that line (the partial line after it, if any,
/// is a torn write).
fn last_line(file: &mut File) -> std::io::Result<(Option<String>, u64)> {
    let len = file.metadata()?.len();
    let mut window = TAIL_WINDOW;
    loop {
        let start = len.saturating_sub(window);
        file.seek(SeekFrom::Start(start))?;
        let mut tail = Vec::with_capacity((len - start) as usize);
        file.read_to_end(&mut tail)?;
        let Some(end) = tail.iter().rposition(|&b| b == b'\n') else {
            if start == 0 {
                return Ok((None, 0));
            }
            window = window.saturating_mul(4);
            continue;
        };
        let committed = start + end as u64 + 1;
        // Skip blank lines back to the last non-empty one.
        let body = &tail[..end];
        let trimmed_end = body
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map(|i| i + 1);
        let Some(trimmed_end) = trimmed_end else {
            if start == 0 {
                return Ok((None, committed));
            }
            window = window.saturating_mul(4);
            continue;
        };
        match body[..trimmed_end].iter().rposition(|&b| b == b'\n') {
            Some(begin) => {
                let line = String::from_utf8_lossy(&body[begin + 1..trimmed_end]).into_owned();
                return Ok((Some(line), committed));
            }
            None if start == 0 => {
                let line = String::from_utf8_lossy(&body[..trimmed_end]).into_owned();
                return Ok((Some(line), committed));
            }
            None => window = window.saturating_mul(4),
        }
    }
}

impl FileWriter {
    /// Opens (or creates, mode 0600) `path` for appending and returns the
    /// chain to continue: after the last record already in the file, if
    /// any. A torn last line (a crash in the middle of a batch) is cut off.
    pub fn open(path: &Path) -> Result<(FileWriter, AuditChain), AuditError> {
        let io = |source| AuditError::Io {
            path: path.to_owned(),
            source,
        };
        let mut options = OpenOptions::new();
        options.create(true).read(true).append(true);
        // Who did what and from where is personal data: owner-only, from the
        // moment the file exists (a later chmod would leave a window).
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options.open(path).map_err(io)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = file.metadata().map_err(io)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    mode = format!("{mode:o}"),
                    "the audit log is readable or writable by others; chmod 600 it"
                );
            }
        }
        let mut writer = FileWriter {
            file,
            path: path.to_owned(),
            committed_len: 0,
            dirty: true,
        };
        let chain = writer.read_committed()?;
        Ok((writer, chain))
    }

    /// Cuts the file back to its last complete line and returns the chain
    /// after the last record.
    fn read_committed(&mut self) -> Result<AuditChain, AuditError> {
        let io = |source| AuditError::Io {
            path: self.path.clone(),
            source,
        };
        let (line, committed) = last_line(&mut self.file).map_err(io)?;
        let len = self.file.metadata().map_err(io)?.len();
        if len != committed {
            tracing::warn!(
                path = %self.path.display(),
                bytes = len - committed,
                "cutting a partly written audit record off the end of the log"
            );
            self.file.set_len(committed).map_err(io)?;
            self.file.sync_data().map_err(io)?;
        }
        self.committed_len = committed;
        self.dirty = false;
        let Some(line) = line else {
            return Ok(AuditChain::new());
        };
        let record: AuditRecord =
            serde_json::from_str(&line).map_err(|source| AuditError::Corrupt {
                path: self.path.clone(),
                source,
            })?;
        Ok(AuditChain::resume(record.seq + 1, record.hash))
    }

    /// Writes `bytes` at the end of the committed log, and fsyncs.
    fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if self.dirty {
            // A failed batch is still there (its truncation failed too):
            // never append after it.
            self.file.set_len(self.committed_len)?;
            self.dirty = false;
        }
        self.dirty = true;
        self.file.write_all(bytes)?;
        self.file.sync_data()?;
        self.dirty = false;
        self.committed_len += bytes.len() as u64;
        Ok(())
    }
}

/// `records` as JSON lines, one buffer (one `write` for the whole batch).
fn encode(records: &[AuditRecord]) -> Vec<u8> {
    let mut buffer = Vec::with_capacity(records.len() * 320);
    for record in records {
        buffer.extend_from_slice(record.to_json_line().as_bytes());
        buffer.push(b'\n');
    }
    buffer
}

impl AuditWriter for FileWriter {
    fn write_batch(&mut self, records: &[AuditRecord]) -> std::io::Result<()> {
        self.append(&encode(records))
    }

    fn recover(&mut self) -> std::io::Result<Option<AuditChain>> {
        self.file.set_len(self.committed_len)?;
        self.dirty = false;
        match self.read_committed() {
            Ok(chain) => Ok(Some(chain)),
            Err(AuditError::Io { source, .. }) => Err(source),
            Err(e) => Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        }
    }
}

/// Writes JSON lines to standard output (for containers that ship stdout).
#[derive(Debug, Default)]
pub struct StdoutWriter;

impl AuditWriter for StdoutWriter {
    fn write_batch(&mut self, records: &[AuditRecord]) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        out.write_all(&encode(records))?;
        out.flush()
    }
}

/// Counters of an [`AuditLog`], for metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditStats {
    /// Records written.
    pub written: u64,
    /// Entries dropped because the queue was full (or the writer failed).
    pub dropped: u64,
    /// Hash of the last record written: the anchor for [`verify`](super::verify).
    pub last_hash: String,
}

#[derive(Debug)]
struct Shared {
    written: AtomicU64,
    dropped: AtomicU64,
    last_hash: Mutex<String>,
    /// Entries accepted into the queue.
    accepted: AtomicU64,
    /// Accepted entries the writer has finished with (written or dropped).
    settled: AtomicU64,
    /// The writer thread has exited.
    finished: AtomicBool,
    /// Tasks waiting in `flush` or `close`.
    waiters: Mutex<Vec<Waker>>,
}

impl Shared {
    fn wake_waiters(&self) {
        for waker in self.waiters.lock().drain(..) {
            waker.wake();
        }
    }
}

/// A future that completes once `ready(shared)` holds; the writer thread
/// wakes it after every batch and when it exits. Runtime-agnostic.
struct Until<F> {
    shared: Arc<Shared>,
    ready: F,
}

impl<F: Fn(&Shared) -> bool + Unpin> Future for Until<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if (self.ready)(&self.shared) {
            return Poll::Ready(());
        }
        self.shared.waiters.lock().push(cx.waker().clone());
        // Checked again after registering, so a wake in between is not missed.
        if (self.ready)(&self.shared) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// The audit log: an [`AuditSink`] whose `record` never blocks. Entries go
/// through a bounded queue to a writer thread that seals them into the chain
/// and writes them in batches; when the queue is full the entry is dropped
/// and counted (exported as a metric, never silent).
///
/// Call [`close`](AuditLog::close) before the process exits: dropping the
/// log only signals the writer, which then writes what is queued on its own.
#[derive(Debug)]
pub struct AuditLog {
    sender: Mutex<Option<SyncSender<AuditEntry>>>,
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

const BATCH: usize = 512;

impl AuditLog {
    /// Starts the writer thread with a queue of `capacity` entries.
    pub fn spawn(
        writer: impl AuditWriter,
        chain: AuditChain,
        capacity: usize,
    ) -> Result<AuditLog, AuditError> {
        let (sender, receiver) = std::sync::mpsc::sync_channel(capacity.max(1));
        let shared = Arc::new(Shared {
            written: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            last_hash: Mutex::new(chain.last_hash().to_owned()),
            accepted: AtomicU64::new(0),
            settled: AtomicU64::new(0),
            finished: AtomicBool::new(false),
            waiters: Mutex::new(Vec::new()),
        });
        let thread_shared = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || {
                write_loop(receiver, writer, chain, &thread_shared);
                thread_shared.finished.store(true, Ordering::Release);
                thread_shared.wake_waiters();
            })
            .map_err(AuditError::Spawn)?;
        Ok(AuditLog {
            sender: Mutex::new(Some(sender)),
            shared,
            writer: Mutex::new(Some(handle)),
        })
    }

    /// Written and dropped counts and the current anchor hash.
    pub fn stats(&self) -> AuditStats {
        AuditStats {
            written: self.shared.written.load(Ordering::Acquire),
            dropped: self.shared.dropped.load(Ordering::Acquire),
            last_hash: self.shared.last_hash.lock().clone(),
        }
    }

    /// Completes once every entry recorded before the call has been written
    /// (or dropped and counted, if its batch failed).
    pub async fn flush(&self) {
        let target = self.shared.accepted.load(Ordering::Acquire);
        Until {
            shared: Arc::clone(&self.shared),
            ready: move |s: &Shared| {
                s.settled.load(Ordering::Acquire) >= target || s.finished.load(Ordering::Acquire)
            },
        }
        .await;
    }

    /// Stops accepting entries (later ones are counted as dropped), writes
    /// everything queued, and completes when the writer thread has exited.
    /// Never blocks a thread: bound it with a timeout if needed.
    pub async fn close(&self) -> Result<(), AuditError> {
        drop(self.sender.lock().take());
        Until {
            shared: Arc::clone(&self.shared),
            ready: |s: &Shared| s.finished.load(Ordering::Acquire),
        }
        .await;
        let handle = self.writer.lock().take();
        match handle {
            // The thread has exited: joining only collects its result.
            Some(handle) => handle.join().map_err(|_| AuditError::WriterPanicked),
            None => Ok(()),
        }
    }
}

impl AuditSink for AuditLog {
    fn record(&self, entry: AuditEntry) {
        let sender = self.sender.lock();
        let sent = match sender.as_ref() {
            Some(s) => match s.try_send(entry) {
                Ok(()) => {
                    self.shared.accepted.fetch_add(1, Ordering::AcqRel);
                    true
                }
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
            },
            None => false,
        };
        if !sent {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for AuditLog {
    /// Signals the writer to write what is queued and exit; never waits
    /// (dropping inside an async runtime must not block its thread). Use
    /// [`AuditLog::close`] to wait.
    fn drop(&mut self) {
        drop(self.sender.get_mut().take());
    }
}

fn write_loop(
    receiver: Receiver<AuditEntry>,
    mut writer: impl AuditWriter,
    mut chain: AuditChain,
    shared: &Shared,
) {
    // The chain after the last committed batch: where to continue after a
    // failure when the writer cannot read its own medium back.
    let mut committed = chain.clone();
    let mut batch: Vec<AuditRecord> = Vec::with_capacity(BATCH);
    loop {
        // Block for the first entry, then take whatever else is queued.
        match receiver.recv_timeout(Duration::from_millis(200)) {
            Ok(entry) => batch.push(chain.seal(entry)),
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        }
        while batch.len() < BATCH {
            match receiver.try_recv() {
                Ok(entry) => batch.push(chain.seal(entry)),
                Err(_) => break,
            }
        }
        let count = batch.len() as u64;
        match writer.write_batch(&batch) {
            Ok(()) => {
                committed = chain.clone();
                shared.written.fetch_add(count, Ordering::Release);
                *shared.last_hash.lock() = chain.last_hash().to_owned();
            }
            Err(e) => {
                tracing::error!(error = %e, records = count, "audit write failed; records dropped");
                shared.dropped.fetch_add(count, Ordering::Release);
                // Continue after the last committed record, as the medium
                // holds it (the writer removes the failed batch's remains).
                chain = match writer.recover() {
                    Ok(Some(on_disk)) => on_disk,
                    Ok(None) => committed.clone(),
                    Err(e) => {
                        tracing::error!(error = %e, "audit log recovery failed; continuing after the last committed batch");
                        committed.clone()
                    }
                };
                *shared.last_hash.lock() = chain.last_hash().to_owned();
            }
        }
        shared.settled.fetch_add(count, Ordering::AcqRel);
        shared.wake_waiters();
        batch.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::audit::{Outcome, verify};

    fn temp_path(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("gw-audit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        dir
    }

    fn entry(i: usize) -> AuditEntry {
        AuditEntry::new("auth.login", Outcome::Success)
            .who(format!("user-{i}"))
            .request_id(format!("r{i}"))
    }

    fn verify_file(path: &Path, anchor: Option<&str>) -> u64 {
        let text = std::fs::read_to_string(path).unwrap();
        verify(text.lines(), anchor)
            .unwrap_or_else(|e| panic!("{e}\n{text}"))
            .records
    }

    #[tokio::test]
    async fn entries_reach_the_file_as_a_verifiable_chain_and_resume() {
        let path = temp_path("chain.jsonl");
        let (writer, chain) = FileWriter::open(&path).unwrap();
        let log = AuditLog::spawn(writer, chain, 10_000).unwrap();
        for i in 0..1_000 {
            log.record(entry(i));
        }
        log.close().await.unwrap();
        let stats = log.stats();
        assert_eq!((stats.written, stats.dropped), (1_000, 0));
        assert_eq!(verify_file(&path, Some(&stats.last_hash)), 1_000);

        // A restart continues the same chain in the same file.
        let (writer, chain) = FileWriter::open(&path).unwrap();
        assert_eq!(chain.next_seq(), 1_000);
        let log = AuditLog::spawn(writer, chain, 100).unwrap();
        for i in 0..10 {
            log.record(entry(i));
        }
        log.close().await.unwrap();
        assert_eq!(verify_file(&path, Some(&log.stats().last_hash)), 1_010);
        std::fs::remove_file(path).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn the_audit_file_is_created_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let path = temp_path("mode.jsonl");
        let (writer, _) = FileWriter::open(&path).unwrap();
        drop(writer);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "mode {mode:o}");
        std::fs::remove_file(path).unwrap();
    }

    /// A [`FileWriter`] whose next batch, when armed, writes only its first
    /// `n` bytes to the file and then fails, as a full disk does.
    struct FailsMidBatch {
        inner: FileWriter,
        fail_after: Arc<Mutex<Option<usize>>>,
    }

    impl AuditWriter for FailsMidBatch {
        fn write_batch(&mut self, records: &[AuditRecord]) -> std::io::Result<()> {
            if let Some(n) = self.fail_after.lock().take() {
                let bytes = encode(records);
                self.inner.file.write_all(&bytes[..n.min(bytes.len())])?;
                return Err(std::io::Error::new(
                    std::io::ErrorKind::StorageFull,
                    "no space left on device",
                ));
            }
            self.inner.write_batch(records)
        }

        fn recover(&mut self) -> std::io::Result<Option<AuditChain>> {
            self.inner.recover()
        }
    }

    #[tokio::test]
    async fn a_failed_batch_on_a_file_with_records_leaves_a_verifiable_chain() {
        let path = temp_path("fail-mid-batch.jsonl");
        // A file that already holds records from an earlier run.
        let (writer, chain) = FileWriter::open(&path).unwrap();
        let log = AuditLog::spawn(writer, chain, 100).unwrap();
        for i in 0..5 {
            log.record(entry(i));
        }
        log.close().await.unwrap();

        // This run: one batch fails after writing part of a record.
        let (writer, chain) = FileWriter::open(&path).unwrap();
        assert_eq!(chain.next_seq(), 5);
        let fail_after = Arc::new(Mutex::new(Some(40)));
        let writer = FailsMidBatch {
            inner: writer,
            fail_after: Arc::clone(&fail_after),
        };
        let log = AuditLog::spawn(writer, chain, 100).unwrap();
        log.record(entry(5));
        log.flush().await;
        assert_eq!(log.stats().dropped, 1, "the failed batch is counted");
        for i in 6..9 {
            log.record(entry(i));
        }
        log.close().await.unwrap();
        let stats = log.stats();
        assert_eq!((stats.written, stats.dropped), (3, 1));
        // The whole file verifies: the partial record is gone and the chain
        // continues from the last committed record (seq 4), not from this
        // process's count.
        assert_eq!(verify_file(&path, Some(&stats.last_hash)), 8);

        // A torn last line left by a crash is cut off at the next open.
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(br#"{"seq":8,"time":"#).unwrap();
        drop(file);
        let (writer, chain) = FileWriter::open(&path).unwrap();
        assert_eq!(chain.next_seq(), 8);
        let log = AuditLog::spawn(writer, chain, 100).unwrap();
        log.record(entry(9));
        log.close().await.unwrap();
        assert_eq!(verify_file(&path, Some(&log.stats().last_hash)), 9);
        std::fs::remove_file(path).unwrap();
    }

    /// A writer that is slow, to fill the queue.
    struct Slow(Arc<AtomicU64>);

    impl AuditWriter for Slow {
        fn write_batch(&mut self, records: &[AuditRecord]) -> std::io::Result<()> {
            std::thread::sleep(Duration::from_millis(20));
            self.0.fetch_add(records.len() as u64, Ordering::SeqCst);
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_never_blocks() {
        let seen = Arc::new(AtomicU64::new(0));
        let log = AuditLog::spawn(Slow(Arc::clone(&seen)), AuditChain::new(), 8).unwrap();
        let started = Instant::now();
        for i in 0..5_000 {
            log.record(entry(i));
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "record() must not block"
        );
        log.close().await.unwrap();
        let stats = log.stats();
        assert!(stats.dropped > 0);
        assert_eq!(
            stats.written + stats.dropped,
            5_000,
            "every entry is written or counted"
        );
        assert_eq!(stats.written, seen.load(Ordering::SeqCst));
        // After close, entries are counted as dropped, not lost silently.
        log.record(entry(0));
        assert_eq!(log.stats().dropped, stats.dropped + 1);
    }

    /// A writer that blocks until released, and says when it is done.
    struct Gated {
        release: std::sync::mpsc::Receiver<()>,
        done: Arc<AtomicU64>,
    }

    impl AuditWriter for Gated {
        fn write_batch(&mut self, records: &[AuditRecord]) -> std::io::Result<()> {
            let _ = self.release.recv();
            self.done.fetch_add(records.len() as u64, Ordering::SeqCst);
            Ok(())
        }
    }

    /// Dropping the log inside a runtime returns at once, even while the
    /// writer is stuck; the writer still finishes what was queued.
    #[tokio::test(flavor = "current_thread")]
    async fn dropping_inside_a_runtime_does_not_block() {
        let (release, gate) = std::sync::mpsc::channel();
        let done = Arc::new(AtomicU64::new(0));
        let writer = Gated {
            release: gate,
            done: Arc::clone(&done),
        };
        let log = AuditLog::spawn(writer, AuditChain::new(), 10).unwrap();
        log.record(entry(0));
        // The writer is now (or soon) blocked in write_batch until released.
        let started = Instant::now();
        drop(log);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "drop waited {:?}",
            started.elapsed()
        );
        // Reaching this line proves the drop did not wait for the writer: it
        // cannot finish before `release` below.
        assert_eq!(done.load(Ordering::SeqCst), 0);
        release.send(()).unwrap();
    }

    /// A writer that fails every other batch.
    struct Flaky(u32, Arc<Mutex<Vec<String>>>);

    impl AuditWriter for Flaky {
        fn write_batch(&mut self, records: &[AuditRecord]) -> std::io::Result<()> {
            self.0 += 1;
            if self.0.is_multiple_of(2) {
                return Err(std::io::Error::other("disk full"));
            }
            self.1
                .lock()
                .extend(records.iter().map(AuditRecord::to_json_line));
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_failed_write_is_counted_and_the_chain_stays_valid() {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let log = AuditLog::spawn(Flaky(0, Arc::clone(&lines)), AuditChain::new(), 10).unwrap();
        for i in 0..6 {
            log.record(entry(i));
            log.flush().await;
        }
        log.close().await.unwrap();
        let stats = log.stats();
        assert_eq!((stats.written, stats.dropped), (3, 3));
        // What did reach the writer still verifies as one unbroken chain.
        let lines = lines.lock();
        let summary = verify(lines.iter().map(String::as_str), Some(&stats.last_hash)).unwrap();
        assert_eq!(summary.records, stats.written);
    }
}
