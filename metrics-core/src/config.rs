//! Processor configuration.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use time_kit::{Clock, SystemClock};

/// Configuration of a [`MetricsProcessor`](crate::MetricsProcessor).
///
/// Fields are public and documented; the `with_*` methods are shorthands for
/// building one in an expression.
///
/// ```
/// use std::time::Duration;
/// use metrics_core::Config;
///
/// let config = Config::default()
///     .with_retention_minutes(15)
///     .with_max_event_types(200)
///     .with_snapshot_path("/var/lib/app/metrics.snapshot");
/// assert_eq!(config.max_future_skew, Duration::from_secs(5));
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// How many minutes of history to keep; also the largest window
    /// `aggregates` accepts. Default 60. Memory grows linearly with it.
    pub retention_minutes: u32,
    /// How far in the future an event's timestamp may be (clock skew between
    /// producers and this process). Default 5 s.
    pub max_future_skew: Duration,
    /// The most distinct event types held at once; a new type beyond it is
    /// rejected with `TooManyEventTypes`. Bounds memory. Default 1,000.
    pub max_event_types: usize,
    /// The longest `event_type` and `user_id`, in bytes. Default 128.
    pub max_field_bytes: usize,
    /// Where `shutdown` writes a snapshot and `restore` reads it. Default none.
    pub snapshot_path: Option<PathBuf>,
    pub(crate) clock: Arc<dyn Clock>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            retention_minutes: 60,
            max_future_skew: Duration::from_secs(5),
            max_event_types: 1_000,
            max_field_bytes: 128,
            snapshot_path: None,
            clock: Arc::new(SystemClock),
        }
    }
}

impl Config {
    /// Uses `clock` as the source of "now" (e.g. a [`ManualClock`](crate::ManualClock)).
    pub fn with_clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Sets [`Config::retention_minutes`] (at least 1).
    pub fn with_retention_minutes(mut self, minutes: u32) -> Self {
        self.retention_minutes = minutes.max(1);
        self
    }

    /// Sets [`Config::max_future_skew`].
    pub fn with_max_future_skew(mut self, skew: Duration) -> Self {
        self.max_future_skew = skew;
        self
    }

    /// Sets [`Config::max_event_types`].
    pub fn with_max_event_types(mut self, max: usize) -> Self {
        self.max_event_types = max;
        self
    }

    /// Sets [`Config::max_field_bytes`].
    pub fn with_max_field_bytes(mut self, max: usize) -> Self {
        self.max_field_bytes = max;
        self
    }

    /// Sets [`Config::snapshot_path`].
    pub fn with_snapshot_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.snapshot_path = Some(path.into());
        self
    }

    /// The clock in use.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    pub(crate) fn retention_secs(&self) -> u64 {
        u64::from(self.retention_minutes.max(1)) * 60
    }

    /// Minute blocks per type: the retention, the skew and one spare on each
    /// side, so a block is never reused while any of its seconds is retained.
    pub(crate) fn ring_minutes(&self) -> usize {
        let skew_minutes = self.max_future_skew.as_secs().div_ceil(60) as usize;
        self.retention_minutes.max(1) as usize + skew_minutes + 2
    }
}
