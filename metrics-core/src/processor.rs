//! The processor: validation, ingestion, queries and shutdown.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::config::Config;
use crate::durable;
use crate::error::{Error, Field, SnapshotError};
use crate::event::{Event, EventRef};
use crate::hll::{SlidingHll, hash_user};
use crate::registry::Registry;
use crate::sketch::{Bins, key_of};
use crate::snapshot::{self, CellRecord, MinuteRecord, SnapshotData, TypeRecord};
use crate::stats::{Counters, Stats};
use crate::summary::{TypeSummary, WindowSummary};
use crate::window::{Cell, Exact, WindowAccumulator};
use time_kit::unix_nanos as to_unix_nanos;

/// The name reserved for cross-type aggregates.
pub const TOTAL: &str = "total";

const NANOS_PER_SEC: i64 = 1_000_000_000;

/// Aggregates events from many threads into sliding windows.
///
/// `MetricsProcessor` is `Send + Sync` and every method takes `&self`: share
/// one through an [`Arc`](std::sync::Arc), and call
/// [`shutdown`](MetricsProcessor::shutdown) from any thread while others are
/// still ingesting.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use metrics_core::{Config, Event, MetricsProcessor};
///
/// let processor = Arc::new(MetricsProcessor::new(Config::default()));
/// let workers: Vec<_> = (0..4)
///     .map(|t| {
///         let p = Arc::clone(&processor);
///         std::thread::spawn(move || {
///             for i in 0..1_000 {
///                 let event = Event {
///                     timestamp: chrono::Utc::now(),
///                     user_id: format!("user-{}", i % 50),
///                     event_type: if t % 2 == 0 { "click" } else { "view" }.into(),
///                     value: f64::from(i),
///                 };
///                 p.process_event(event).unwrap();
///             }
///         })
///     })
///     .collect();
/// for w in workers {
///     w.join().unwrap();
/// }
/// let m = processor.aggregates(5).unwrap();
/// assert_eq!(m["total.count"], 4_000.0);
/// assert_eq!(m["click.count"], 2_000.0);
/// assert_eq!(m["click.max"], 999.0);
/// processor.shutdown(Duration::from_secs(5)).unwrap();
/// assert!(processor.process_event(metrics_core::Event {
///     timestamp: chrono::Utc::now(),
///     user_id: "u".into(),
///     event_type: "click".into(),
///     value: 1.0,
/// }).is_err());
/// ```
#[derive(Debug)]
pub struct MetricsProcessor {
    config: Config,
    retention_secs: u64,
    skew_nanos: i64,
    registry: Registry,
    users: SlidingHll,
    counters: Counters,
    /// Set first by `shutdown`; new calls see it and return `ShutDown`.
    closing: AtomicBool,
    /// Set once `shutdown` has drained and written its snapshot.
    closed: AtomicBool,
    shutdown_lock: Mutex<()>,
}

/// Heap memory held by a processor, by component.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryUsage {
    /// Registered event types.
    pub event_types: usize,
    /// Bytes of the per-type windows (blocks, cells and sketch bins).
    pub windows_bytes: usize,
    /// Bytes of the unique-users sketch (fixed).
    pub unique_users_bytes: usize,
}

impl MemoryUsage {
    /// All components together.
    pub fn total_bytes(&self) -> usize {
        self.windows_bytes + self.unique_users_bytes
    }
}

impl MetricsProcessor {
    /// A processor with empty state. Never fails; see
    /// [`restore`](MetricsProcessor::restore) to start from a snapshot.
    pub fn new(config: Config) -> MetricsProcessor {
        let skew_nanos = i64::try_from(config.max_future_skew.as_nanos()).unwrap_or(i64::MAX);
        MetricsProcessor {
            retention_secs: config.retention_secs(),
            skew_nanos,
            registry: Registry::new(config.max_event_types, config.ring_minutes()),
            users: SlidingHll::default(),
            counters: Counters::default(),
            closing: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            shutdown_lock: Mutex::new(()),
            config,
        }
    }

    /// A processor that starts from the snapshot at
    /// [`Config::snapshot_path`], so a restart loses nothing.
    ///
    /// A missing file (first start) or an unset path gives an empty
    /// processor. A file that is not a snapshot, is corrupt, or comes from an
    /// incompatible build is an [`Error::Snapshot`], never a silent reset.
    /// Data older than the retention at restore time is dropped.
    pub fn restore(config: Config) -> Result<MetricsProcessor, Error> {
        let Some(path) = config.snapshot_path.clone() else {
            tracing::warn!("restore called without Config::snapshot_path; starting empty");
            return Ok(MetricsProcessor::new(config));
        };
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::info!(path = %path.display(), "no snapshot found; starting empty");
                return Ok(MetricsProcessor::new(config));
            }
            Err(e) => {
                return Err(Error::Snapshot {
                    path,
                    source: e.into(),
                });
            }
        };
        let mut processor = MetricsProcessor::new(config);
        let loaded = snapshot::decode(&bytes)
            .and_then(|data| processor.apply_snapshot(data))
            .map_err(|source| Error::Snapshot {
                path: path.clone(),
                source,
            })?;
        tracing::info!(path = %path.display(), cells = loaded, "restored metrics snapshot");
        Ok(processor)
    }

    /// Processes an owned event. Equivalent to `process(event.as_ref())`.
    pub fn process_event(&self, event: Event) -> Result<(), Error> {
        self.process(event.as_ref())
    }

    /// Processes a borrowed event; allocation-free once the event's type is
    /// registered and its cells are warm.
    ///
    /// On error nothing is recorded and the rejection is counted in
    /// [`stats`](MetricsProcessor::stats) under the error's
    /// [`reject_reason`](Error::reject_reason).
    pub fn process(&self, event: EventRef<'_>) -> Result<(), Error> {
        let stripe = self.counters.stripe();
        // Announce the call before checking `closing` (both SeqCst): either
        // this call sees `closing`, or `shutdown` sees it in flight and waits.
        stripe.started.fetch_add(1, Ordering::SeqCst);
        let result = if self.closing.load(Ordering::SeqCst) {
            Err(Error::ShutDown)
        } else {
            self.ingest(event)
        };
        if let Err(e) = &result
            && let Some(reason) = e.reject_reason()
        {
            self.counters.reject(reason);
        }
        stripe.finished.fetch_add(1, Ordering::Release);
        result
    }

    #[inline]
    fn ingest(&self, event: EventRef<'_>) -> Result<(), Error> {
        if !event.value.is_finite() {
            return Err(Error::NonFiniteValue { value: event.value });
        }
        self.check_field(Field::EventType, event.event_type)?;
        self.check_field(Field::UserId, event.user_id)?;
        if event.event_type == TOTAL {
            return Err(Error::ReservedEventType);
        }
        let now_nanos = to_unix_nanos(self.config.clock.now());
        let now_sec = now_nanos.div_euclid(NANOS_PER_SEC);
        let second = self.check_timestamp(&event, now_nanos, now_sec)?;
        let key = key_of(event.value);
        let recorded = self
            .registry
            .with_entry(event.event_type, |entry| {
                entry.series.record(second, key, event.value)
            })
            .map_err(|_| Error::TooManyEventTypes {
                max: self.config.max_event_types,
            })?;
        if !recorded {
            return Err(Error::TimestampTooOld {
                age_secs: (now_sec as u64).saturating_sub(second),
                retention_secs: self.retention_secs,
            });
        }
        // Unique users: an event from the (skewed) future counts from now, so
        // the sketch never holds a second later than the clock (see docs).
        let user_second = second.min(now_sec.max(0) as u64);
        self.users
            .observe(hash_user(event.user_id), user_second as u32);
        Ok(())
    }

    #[inline]
    fn check_field(&self, field: Field, value: &str) -> Result<(), Error> {
        if value.is_empty() {
            return Err(Error::EmptyField { field });
        }
        if value.len() > self.config.max_field_bytes {
            return Err(Error::FieldTooLong {
                field,
                len: value.len(),
                max: self.config.max_field_bytes,
            });
        }
        Ok(())
    }

    /// Returns the event's Unix second if it is within skew and retention.
    #[inline]
    fn check_timestamp(
        &self,
        event: &EventRef<'_>,
        now_nanos: i64,
        now_sec: i64,
    ) -> Result<u64, Error> {
        let ts_sec = event.timestamp.timestamp();
        let max_skew_ms = (self.skew_nanos / 1_000_000) as u64;
        let future = |ahead_nanos: i64| Error::TimestampInFuture {
            ahead_ms: (ahead_nanos / 1_000_000) as u64,
            max_skew_ms,
        };
        let ts_nanos = ts_sec
            .checked_mul(NANOS_PER_SEC)
            .and_then(|n| n.checked_add(i64::from(event.timestamp.timestamp_subsec_nanos())));
        match ts_nanos {
            Some(ts_nanos) => {
                let ahead = ts_nanos.saturating_sub(now_nanos);
                if ahead > self.skew_nanos {
                    return Err(future(ahead));
                }
            }
            // Beyond ±292 years from 1970: far future or far past.
            None if ts_sec > now_sec => return Err(future(i64::MAX)),
            None => {}
        }
        let oldest_retained = now_sec - self.retention_secs as i64 + 1;
        // Seconds must also fit the u32 unique-users clock (until 2106).
        if ts_sec < oldest_retained.max(1) {
            return Err(Error::TimestampTooOld {
                age_secs: now_sec.saturating_sub(ts_sec).max(0) as u64,
                retention_secs: self.retention_secs,
            });
        }
        if ts_sec > i64::from(u32::MAX) {
            return Err(future(
                ts_sec.saturating_sub(now_sec).saturating_mul(1_000_000_000),
            ));
        }
        Ok(ts_sec as u64)
    }

    /// The flat aggregate map over the last `minutes` minutes: events whose
    /// timestamp lies in `(now − minutes·60 s, now]` at one-second resolution.
    ///
    /// Keys: `T.count`, `T.sum`, `T.avg`, `T.min`, `T.max`, `T.p50`, `T.p90`,
    /// `T.p99`, `T.rate_per_sec` for each type `T` with events in the window,
    /// and `total.count`, `total.sum`, `total.rate_per_sec`,
    /// `total.unique_users`. `minutes` must be in `1..=retention_minutes`.
    pub fn aggregates(&self, minutes: u32) -> Result<HashMap<String, f64>, Error> {
        Ok(self.summary(minutes)?.to_map())
    }

    /// The same results as [`aggregates`](MetricsProcessor::aggregates), typed.
    pub fn summary(&self, minutes: u32) -> Result<WindowSummary, Error> {
        let max = self.config.retention_minutes;
        if minutes == 0 || minutes > max {
            return Err(Error::InvalidWindow { minutes, max });
        }
        let now_sec = to_unix_nanos(self.config.clock.now()).div_euclid(NANOS_PER_SEC);
        let window_secs = u64::from(minutes) * 60;
        let until = now_sec.max(0) as u64;
        let after = until.saturating_sub(window_secs);
        let mut types = BTreeMap::new();
        for entry in self.registry.entries() {
            let mut acc = WindowAccumulator::default();
            entry.series.accumulate(after, until, &mut acc);
            let Some([p50, p90, p99]) =
                acc.keys
                    .quantiles([0.5, 0.9, 0.99], acc.exact.min, acc.exact.max)
            else {
                continue;
            };
            types.insert(
                entry.name.to_string(),
                TypeSummary {
                    count: acc.exact.count,
                    sum: acc.exact.sum,
                    avg: acc.exact.sum / acc.exact.count as f64,
                    min: acc.exact.min,
                    max: acc.exact.max,
                    p50,
                    p90,
                    p99,
                    rate_per_sec: acc.exact.count as f64 / window_secs as f64,
                },
            );
        }
        // Summed in name order, not registry (hash) order: the hash seed is
        // random per process, and floating-point addition is not
        // associative, so hash order would make `total_sum`'s last bits
        // differ between two processes holding the same data.
        let total_count = types.values().map(|t: &TypeSummary| t.count).sum();
        // `reduce`, not a fold from 0.0: `0.0 + -0.0` would lose the sign.
        let total_sum = types
            .values()
            .map(|t| t.sum)
            .reduce(|a, b| a + b)
            .unwrap_or(0.0);
        let unique_users = self
            .users
            .estimate(u32::try_from(after).unwrap_or(u32::MAX))
            .round();
        Ok(WindowSummary {
            minutes,
            types,
            total_count,
            total_sum,
            total_rate_per_sec: total_count as f64 / window_secs as f64,
            unique_users,
        })
    }

    /// Counters of accepted and rejected events since this processor started.
    pub fn stats(&self) -> Stats {
        self.counters.snapshot()
    }

    /// Heap memory held, by component (an accounting of capacities; the
    /// process RSS also includes allocator overhead).
    pub fn memory_usage(&self) -> MemoryUsage {
        let entries = self.registry.entries();
        MemoryUsage {
            event_types: entries.len(),
            windows_bytes: entries.iter().map(|e| e.series.heap_bytes()).sum(),
            unique_users_bytes: self.users.heap_bytes(),
        }
    }

    /// Number of registered event types.
    pub fn event_types(&self) -> usize {
        self.registry.len()
    }

    /// The configuration in use.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Whether `shutdown` has begun; `process` then returns `ShutDown`.
    pub fn is_shutting_down(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// Writes a snapshot of the current state to `path` (atomically: a
    /// temporary file renamed into place). Use it for periodic checkpoints;
    /// `shutdown` writes the final one.
    ///
    /// Safe to call concurrently with itself and with `shutdown`, on the same
    /// path: each write uses its own temporary file, and the file at `path`
    /// is always one complete snapshot.
    pub fn save_snapshot(&self, path: &std::path::Path) -> Result<(), Error> {
        let bytes = snapshot::encode(&self.snapshot_data());
        durable::replace_file(path, &bytes).map_err(|e| Error::Snapshot {
            path: path.to_owned(),
            source: SnapshotError::Io(e),
        })
    }

    /// Stops accepting events, waits for calls in flight, and writes the
    /// snapshot if [`Config::snapshot_path`] is set, all within `timeout`.
    ///
    /// Producers may keep calling: from the moment this starts they get
    /// [`Error::ShutDown`]. Every event accepted (`Ok`) before that is in the
    /// final state and the snapshot. Queries keep working afterwards.
    /// Calling it again after success returns `Ok` at once; after a timeout
    /// it retries.
    pub fn shutdown(&self, timeout: Duration) -> Result<(), Error> {
        let started = Instant::now();
        let deadline = started + timeout;
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let _one_at_a_time = self.shutdown_lock.lock();
        if self.closed.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.closing.store(true, Ordering::SeqCst);
        while self.counters.in_flight() != 0 {
            if Instant::now() >= deadline {
                return Err(Error::ShutdownTimedOut {
                    timeout_ms,
                    stage: "draining in-flight events",
                });
            }
            std::thread::yield_now();
        }
        if let Some(path) = self.config.snapshot_path.clone() {
            let bytes = snapshot::encode(&self.snapshot_data());
            // The write runs on its own thread so a slow disk cannot hold
            // `shutdown` past its deadline; the rename keeps the file whole.
            let (done, result) = std::sync::mpsc::channel();
            let writer_path = path.clone();
            std::thread::spawn(move || {
                let _ = done.send(durable::replace_file(&writer_path, &bytes));
            });
            let remaining = deadline.saturating_duration_since(Instant::now());
            match result.recv_timeout(remaining) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    return Err(Error::Snapshot {
                        path,
                        source: SnapshotError::Io(e),
                    });
                }
                Err(_) => {
                    return Err(Error::ShutdownTimedOut {
                        timeout_ms,
                        stage: "writing the snapshot",
                    });
                }
            }
        }
        self.closed.store(true, Ordering::SeqCst);
        let stats = self.stats();
        tracing::info!(
            accepted = stats.accepted,
            rejected = stats.rejected_total(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "metrics processor shut down"
        );
        Ok(())
    }

    fn now_sec(&self) -> i64 {
        to_unix_nanos(self.config.clock.now()).div_euclid(NANOS_PER_SEC)
    }

    /// The first second still inside the retention.
    fn oldest_retained_sec(&self) -> i64 {
        self.now_sec() - self.retention_secs as i64 + 1
    }

    // --- snapshots: the processor's state as plain records and back ---

    /// Everything held within the retention: the non-empty seconds, the
    /// totals of minutes wholly inside the retention (the only ones a query
    /// reads whole), and the unique-users slots. Sorted, so equal states
    /// encode to equal bytes.
    fn snapshot_data(&self) -> SnapshotData {
        let oldest = self.oldest_retained_sec();
        let mut types = Vec::new();
        for entry in self.registry.entries() {
            let (mut cells, mut minutes) = (Vec::new(), Vec::new());
            entry.series.for_each_block(|minute, total, seconds| {
                let start = minute * 60;
                for (offset, cell) in seconds.iter().enumerate() {
                    let second = start + offset as u64;
                    if cell.exact.count > 0 && second as i64 >= oldest {
                        let Exact {
                            count,
                            sum,
                            min,
                            max,
                        } = cell.exact;
                        cells.push(CellRecord {
                            second,
                            count,
                            sum,
                            min,
                            max,
                            bins: cell.bins.raw().to_vec(),
                        });
                    }
                }
                if total.exact.count > 0 && start as i64 >= oldest {
                    let Exact {
                        count,
                        sum,
                        min,
                        max,
                    } = total.exact;
                    minutes.push(MinuteRecord {
                        minute,
                        count,
                        sum,
                        min,
                        max,
                    });
                }
            });
            if cells.is_empty() {
                continue;
            }
            cells.sort_unstable_by_key(|c| c.second);
            minutes.sort_unstable_by_key(|m| m.minute);
            types.push(TypeRecord {
                name: entry.name.to_string(),
                cells,
                minutes,
            });
        }
        types.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        SnapshotData {
            taken_at_unix_secs: self.now_sec(),
            types,
            users: self.users.nonzero_slots(),
        }
    }

    /// Validates decoded records against this build and configuration, then
    /// loads them into this fresh processor. Nothing is loaded unless all
    /// of it is valid. Data older than the retention now is dropped. Returns
    /// the number of one-second cells loaded.
    fn apply_snapshot(&mut self, data: SnapshotData) -> Result<usize, SnapshotError> {
        if data.types.len() > self.config.max_event_types {
            return Err(SnapshotError::incompatible(format!(
                "{} event types exceed max_event_types = {}",
                data.types.len(),
                self.config.max_event_types
            )));
        }
        let oldest = self.oldest_retained_sec();
        let mut validated = Vec::with_capacity(data.types.len());
        let mut names = std::collections::HashSet::with_capacity(data.types.len());
        for t in data.types {
            // A repeated name would load two records into one series.
            if !names.insert(t.name.clone()) {
                return Err(SnapshotError::corrupt(format!(
                    "event type {:?} appears twice",
                    t.name
                )));
            }
            if t.name.is_empty() || t.name.len() > self.config.max_field_bytes || t.name == TOTAL {
                return Err(SnapshotError::corrupt(format!(
                    "invalid event type name {:?}",
                    t.name
                )));
            }
            let minutes = restored_minutes(&t, oldest)?;
            validated.push((t.name, minutes));
        }
        let users = SlidingHll::from_slots(&data.users).map_err(SnapshotError::corrupt)?;

        let mut loaded = 0;
        for (name, minutes) in validated {
            if minutes.is_empty() {
                continue;
            }
            loaded += minutes.iter().map(|m| m.2.len()).sum::<usize>();
            self.registry
                .with_entry(&name, |entry| {
                    for (minute, total, seconds) in minutes {
                        entry.series.load_minute(minute, total, seconds);
                    }
                })
                .map_err(|_| SnapshotError::incompatible("too many event types"))?;
        }
        self.users = users;
        tracing::debug!(
            taken_at = data.taken_at_unix_secs,
            loaded,
            "snapshot applied"
        );
        Ok(loaded)
    }
}

/// A minute ready to load: `(minute, total, [(second of minute, cell)])`.
type RestoredMinute = (u64, Cell, Vec<(usize, Cell)>);

/// Checks one type's records and groups its retained seconds by minute.
///
/// A second cell must be what ingest can produce: a positive count that its
/// sketch agrees with, finite `min <= max` (accepted values are finite) and
/// a sum that is not NaN (a sum of finite values may overflow to ±infinity,
/// but from then on it stays there). A stored minute total must agree with
/// its seconds on count, min and max; its sum is taken as stored, because
/// the seconds summed in another order may differ in the last bits.
fn restored_minutes(t: &TypeRecord, oldest: i64) -> Result<Vec<RestoredMinute>, SnapshotError> {
    let inconsistent =
        |what: &str, at: u64| SnapshotError::corrupt(format!("{what} for {:?} at {at}", t.name));
    let mut minutes: Vec<RestoredMinute> = Vec::new();
    let mut previous = None;
    for c in &t.cells {
        if previous.is_some_and(|p| p >= c.second) {
            return Err(inconsistent("cells out of order", c.second));
        }
        previous = Some(c.second);
        let bins = Bins::from_raw(c.bins.clone()).map_err(SnapshotError::corrupt)?;
        if c.count == 0
            || bins.total() != c.count
            || !c.min.is_finite()
            || !c.max.is_finite()
            || c.min > c.max
            || c.sum.is_nan()
        {
            return Err(inconsistent("inconsistent cell", c.second));
        }
        if (c.second as i64) < oldest {
            continue;
        }
        let cell = Cell {
            exact: Exact {
                count: c.count,
                sum: c.sum,
                min: c.min,
                max: c.max,
            },
            bins,
        };
        let (minute, offset) = (c.second / 60, (c.second % 60) as usize);
        match minutes.last_mut() {
            Some((m, total, seconds)) if *m == minute => {
                total.merge_from(&cell);
                seconds.push((offset, cell));
            }
            _ => minutes.push((minute, cell.clone(), vec![(offset, cell)])),
        }
    }
    let mut previous = None;
    for record in &t.minutes {
        if previous.is_some_and(|p| p >= record.minute) {
            return Err(inconsistent("minute totals out of order", record.minute));
        }
        previous = Some(record.minute);
        if record.minute.saturating_mul(60) as i64 >= oldest {
            let rebuilt = minutes
                .iter_mut()
                .find(|(m, _, _)| *m == record.minute)
                .map(|(_, total, _)| total);
            let Some(total) = rebuilt else {
                return Err(inconsistent("minute total without seconds", record.minute));
            };
            if total.exact.count != record.count
                || total.exact.min != record.min
                || total.exact.max != record.max
                || record.sum.is_nan()
            {
                return Err(inconsistent("inconsistent minute total", record.minute));
            }
            // The stored values, bit for bit (a zero's sign included).
            total.exact = Exact {
                count: record.count,
                sum: record.sum,
                min: record.min,
                max: record.max,
            };
        }
    }
    Ok(minutes)
}
