//! The processor: validation, ingestion, queries and shutdown.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::config::Config;
use crate::error::{Error, Field};
use crate::event::{Event, EventRef};
use crate::hll::{SlidingHll, hash_user};
use crate::registry::Registry;
use crate::sketch::key_of;
use crate::snapshot;
use crate::stats::{Counters, Stats};
use crate::summary::{TypeSummary, WindowSummary};
use crate::window::WindowAccumulator;
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
        let loaded =
            snapshot::decode_into(&bytes, &mut processor).map_err(|source| Error::Snapshot {
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
        let (mut total_count, mut total_sum) = (0u64, 0.0f64);
        for entry in self.registry.entries() {
            let mut acc = WindowAccumulator::default();
            entry.series.accumulate(after, until, &mut acc);
            let Some([p50, p90, p99]) =
                acc.keys
                    .quantiles([0.5, 0.9, 0.99], acc.exact.min, acc.exact.max)
            else {
                continue;
            };
            total_count += acc.exact.count;
            total_sum += acc.exact.sum;
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
    pub fn save_snapshot(&self, path: &std::path::Path) -> Result<(), Error> {
        let bytes = snapshot::encode(self);
        snapshot::write_atomically(path, &bytes).map_err(|source| Error::Snapshot {
            path: path.to_owned(),
            source,
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
            let bytes = snapshot::encode(self);
            // The write runs on its own thread so a slow disk cannot hold
            // `shutdown` past its deadline; the rename keeps the file whole.
            let (done, result) = std::sync::mpsc::channel();
            let writer_path = path.clone();
            std::thread::spawn(move || {
                let _ = done.send(snapshot::write_atomically(&writer_path, &bytes));
            });
            let remaining = deadline.saturating_duration_since(Instant::now());
            match result.recv_timeout(remaining) {
                Ok(Ok(())) => {}
                Ok(Err(source)) => return Err(Error::Snapshot { path, source }),
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

    // --- crate-internal access for snapshots ---

    pub(crate) fn registry(&self) -> &Registry {
        &self.registry
    }

    pub(crate) fn users(&self) -> &SlidingHll {
        &self.users
    }

    pub(crate) fn set_users(&mut self, users: SlidingHll) {
        self.users = users;
    }

    pub(crate) fn now_sec(&self) -> i64 {
        to_unix_nanos(self.config.clock.now()).div_euclid(NANOS_PER_SEC)
    }

    pub(crate) fn retention_secs(&self) -> u64 {
        self.retention_secs
    }
}
