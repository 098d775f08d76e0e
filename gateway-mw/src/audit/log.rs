//! Writing the audit chain off the request path: a bounded queue, a writer
//! thread that seals and writes in batches, and counters for what was
//! written and what was dropped.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::{AuditChain, AuditEntry, AuditRecord};

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
    /// Writes `records` durably (a file writer fsyncs once per batch).
    fn write_batch(&mut self, records: &[AuditRecord]) -> std::io::Result<()>;
}

/// Appends JSON lines to a file and fsyncs after each batch.
#[derive(Debug)]
pub struct FileWriter {
    file: BufWriter<File>,
}

impl FileWriter {
    /// Opens (or creates) `path` for appending and returns the chain to
    /// continue: after the last record already in the file, if any.
    pub fn open(path: &Path) -> std::io::Result<(FileWriter, AuditChain)> {
        let mut chain = AuditChain::new();
        if let Ok(existing) = File::open(path) {
            let mut last = None;
            for line in BufReader::new(existing).lines() {
                let line = line?;
                if !line.trim().is_empty() {
                    last = Some(line);
                }
            }
            if let Some(line) = last {
                let record: AuditRecord = serde_json::from_str(&line).map_err(|e| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("last audit record unreadable: {e}"),
                    )
                })?;
                chain = AuditChain::resume(record.seq + 1, record.hash);
            }
        }
        let mut options = OpenOptions::new();
        options.create(true).append(true);
        // Who did what and from where is personal data: owner-only, from the
        // moment the file exists (a later chmod would leave a window).
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options.open(path)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = file.metadata()?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    mode = format!("{mode:o}"),
                    "the audit log is readable or writable by others; chmod 600 it"
                );
            }
        }
        Ok((
            FileWriter {
                file: BufWriter::new(file),
            },
            chain,
        ))
    }
}

impl AuditWriter for FileWriter {
    fn write_batch(&mut self, records: &[AuditRecord]) -> std::io::Result<()> {
        for record in records {
            self.file.write_all(record.to_json_line().as_bytes())?;
            self.file.write_all(b"\n")?;
        }
        self.file.flush()?;
        self.file.get_ref().sync_data()
    }
}

/// Writes JSON lines to standard output (for containers that ship stdout).
#[derive(Debug, Default)]
pub struct StdoutWriter;

impl AuditWriter for StdoutWriter {
    fn write_batch(&mut self, records: &[AuditRecord]) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        for record in records {
            out.write_all(record.to_json_line().as_bytes())?;
            out.write_all(b"\n")?;
        }
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
}

/// The audit log: an [`AuditSink`] whose `record` never blocks. Entries go
/// through a bounded queue to a writer thread that seals them into the chain
/// and writes them in batches; when the queue is full the entry is dropped
/// and counted (exported as a metric, never silent).
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
    ) -> std::io::Result<AuditLog> {
        let (sender, receiver) = std::sync::mpsc::sync_channel(capacity.max(1));
        let shared = Arc::new(Shared {
            written: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            last_hash: Mutex::new(chain.last_hash().to_owned()),
        });
        let thread_shared = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || write_loop(receiver, writer, chain, &thread_shared))?;
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

    /// Stops accepting entries, writes everything queued, and waits for the
    /// writer up to `timeout`. Returns whether it finished in time.
    pub fn shutdown(&self, timeout: Duration) -> bool {
        drop(self.sender.lock().take());
        let Some(handle) = self.writer.lock().take() else {
            return true;
        };
        let deadline = Instant::now() + timeout;
        while !handle.is_finished() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        handle.join().is_ok()
    }
}

impl AuditSink for AuditLog {
    fn record(&self, entry: AuditEntry) {
        let sender = self.sender.lock();
        let sent = match sender.as_ref() {
            Some(s) => match s.try_send(entry) {
                Ok(()) => true,
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
    fn drop(&mut self) {
        self.shutdown(Duration::from_secs(5));
    }
}

fn write_loop(
    receiver: Receiver<AuditEntry>,
    mut writer: impl AuditWriter,
    mut chain: AuditChain,
    shared: &Shared,
) {
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
        match writer.write_batch(&batch) {
            Ok(()) => {
                shared
                    .written
                    .fetch_add(batch.len() as u64, Ordering::Release);
                *shared.last_hash.lock() = chain.last_hash().to_owned();
            }
            Err(e) => {
                // The records are lost: count them, and restart the chain
                // from the last record known to be on disk.
                tracing::error!(error = %e, records = batch.len(), "audit write failed; records dropped");
                shared
                    .dropped
                    .fetch_add(batch.len() as u64, Ordering::Release);
                let last = shared.last_hash.lock().clone();
                let next = shared.written.load(Ordering::Acquire);
                chain = AuditChain::resume(next, last);
            }
        }
        batch.clear();
    }
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn entries_reach_the_file_as_a_verifiable_chain_and_resume() {
        let path = temp_path("chain.jsonl");
        let (writer, chain) = FileWriter::open(&path).unwrap();
        let log = AuditLog::spawn(writer, chain, 10_000).unwrap();
        for i in 0..1_000 {
            log.record(entry(i));
        }
        assert!(log.shutdown(Duration::from_secs(5)));
        let stats = log.stats();
        assert_eq!((stats.written, stats.dropped), (1_000, 0));
        let text = std::fs::read_to_string(&path).unwrap();
        let summary = verify(text.lines(), Some(&stats.last_hash)).unwrap();
        assert_eq!(summary.records, 1_000);

        // A restart continues the same chain in the same file.
        let (writer, chain) = FileWriter::open(&path).unwrap();
        assert_eq!(chain.next_seq(), 1_000);
        let log = AuditLog::spawn(writer, chain, 100).unwrap();
        for i in 0..10 {
            log.record(entry(i));
        }
        assert!(log.shutdown(Duration::from_secs(5)));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            verify(text.lines(), Some(&log.stats().last_hash))
                .unwrap()
                .records,
            1_010
        );
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

    /// A writer that is slow, to fill the queue.
    struct Slow(Arc<AtomicU64>);

    impl AuditWriter for Slow {
        fn write_batch(&mut self, records: &[AuditRecord]) -> std::io::Result<()> {
            std::thread::sleep(Duration::from_millis(20));
            self.0.fetch_add(records.len() as u64, Ordering::SeqCst);
            Ok(())
        }
    }

    #[test]
    fn a_full_queue_drops_and_counts_never_blocks() {
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
        assert!(log.shutdown(Duration::from_secs(5)));
        let stats = log.stats();
        assert!(stats.dropped > 0);
        assert_eq!(
            stats.written + stats.dropped,
            5_000,
            "every entry is written or counted"
        );
        assert_eq!(stats.written, seen.load(Ordering::SeqCst));
        // After shutdown, entries are counted as dropped, not lost silently.
        log.record(entry(0));
        assert_eq!(log.stats().dropped, stats.dropped + 1);
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

    #[test]
    fn a_failed_write_is_counted_and_the_chain_stays_valid() {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let log = AuditLog::spawn(Flaky(0, Arc::clone(&lines)), AuditChain::new(), 10).unwrap();
        for i in 0..6 {
            log.record(entry(i));
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(log.shutdown(Duration::from_secs(5)));
        let stats = log.stats();
        assert_eq!(stats.written + stats.dropped, 6);
        assert!(stats.dropped > 0);
        // What did reach the writer still verifies as one unbroken chain.
        let lines = lines.lock();
        let summary = verify(lines.iter().map(String::as_str), Some(&stats.last_hash)).unwrap();
        assert_eq!(summary.records, stats.written);
    }
}
