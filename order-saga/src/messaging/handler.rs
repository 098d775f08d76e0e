//! What a consumer runs for each event, and the retry policy both buses
//! ([`MemoryBus`](super::MemoryBus), Redis Streams) apply around it.
//!
//! A handler is called at least once per event and group: after a crash, a
//! timeout or a takeover it can see an event again, so it must be
//! idempotent (the PostgreSQL consumers de-duplicate through
//! [`inbox`](super::inbox)). Within one consumer events arrive in stream
//! order; two consumers of one group run concurrently, so a handler must not
//! assume it sees every event of an order in order.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use crate::BoxFuture;
use crate::events::{EventEnvelope, SCHEMA_VERSION};

/// The error type handlers wrap.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Handles the events of one consumer group.
pub trait EventHandler: Send + Sync + 'static {
    /// Handles one event. `Ok` acknowledges it; an error keeps it on the
    /// bus to be retried (see [`HandlerError`]).
    fn handle<'a>(&'a self, event: &'a EventEnvelope) -> BoxFuture<'a, Result<(), HandlerError>>;
}

/// Why a handler did not handle an event.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandlerError {
    /// The event could not be handled (bad data, a bug): it is retried with
    /// backoff, each retry a new delivery, and after
    /// [`ConsumerPolicy::max_deliveries`] deliveries it goes to the dead
    /// letters.
    #[error("event handler failed")]
    Failed(#[source] BoxError),
    /// Something the handler depends on is down (its database): the event
    /// is retried with backoff until it works, and these attempts do not
    /// count towards dead-lettering, so an outage does not turn good events
    /// into dead letters.
    #[error("event handler's dependency unavailable")]
    Unavailable(#[source] BoxError),
}

impl HandlerError {
    /// A [`HandlerError::Failed`] from any error.
    pub fn failed(e: impl Into<BoxError>) -> HandlerError {
        HandlerError::Failed(e.into())
    }

    /// A [`HandlerError::Unavailable`] from any error.
    pub fn unavailable(e: impl Into<BoxError>) -> HandlerError {
        HandlerError::Unavailable(e.into())
    }
}

/// How a consumer retries and when it gives up on an event. Both buses
/// take one.
#[derive(Debug, Clone)]
pub struct ConsumerPolicy {
    /// Deliveries after which an event whose handler keeps failing (or
    /// that cannot be decoded) goes to the dead letters. Default 5.
    pub max_deliveries: u32,
    /// First delay before retrying a failed event. Default 100 ms.
    pub retry_initial: Duration,
    /// Longest delay between retries (doubling from `retry_initial`, with
    /// jitter up to twice the delay). Default 5 s.
    pub retry_max: Duration,
    /// The schema versions this consumer understands; an event with
    /// another version goes to the dead letters. Default `1..=`
    /// [`SCHEMA_VERSION`].
    pub schema_versions: std::ops::RangeInclusive<u16>,
}

impl Default for ConsumerPolicy {
    fn default() -> ConsumerPolicy {
        ConsumerPolicy {
            max_deliveries: 5,
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(5),
            schema_versions: 1..=SCHEMA_VERSION,
        }
    }
}

impl ConsumerPolicy {
    /// The delays between retries, from [`ConsumerPolicy::retry_initial`]
    /// doubling to [`ConsumerPolicy::retry_max`], with jitter.
    pub fn backoff(&self) -> impl Iterator<Item = Duration> + Send + use<> {
        backoff(self.retry_initial, self.retry_max)
    }

    /// Whether events of `version` are understood.
    pub fn accepts(&self, version: u16) -> bool {
        self.schema_versions.contains(&version)
    }
}

/// A consumer's counters, for metrics. Shared with its task.
#[derive(Debug, Default)]
pub struct ConsumerStats {
    pub(crate) handled: AtomicU64,
    pub(crate) handler_failures: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) reclaimed: AtomicU64,
    pub(crate) bus_failures: AtomicU64,
}

/// A copy of [`ConsumerStats`] at one instant (all counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConsumerSnapshot {
    /// Events handled and acknowledged.
    pub handled: u64,
    /// Handler calls that returned an error (either kind).
    pub handler_failures: u64,
    /// Events moved to the dead letters.
    pub dead_lettered: u64,
    /// Deliveries taken over from another consumer (or redelivered after
    /// the consumer that had them died or timed out).
    pub reclaimed: u64,
    /// Failed calls to the bus itself (Redis down).
    pub bus_failures: u64,
}

impl ConsumerStats {
    /// The current values.
    pub fn snapshot(&self) -> ConsumerSnapshot {
        ConsumerSnapshot {
            handled: self.handled.load(Ordering::Relaxed),
            handler_failures: self.handler_failures.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            reclaimed: self.reclaimed.load(Ordering::Relaxed),
            bus_failures: self.bus_failures.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Exponential backoff with jitter, never ending.
pub(crate) fn backoff(
    initial: Duration,
    max: Duration,
) -> impl Iterator<Item = Duration> + Send + use<> {
    ExponentialBuilder::new()
        .with_min_delay(initial)
        .with_max_delay(max.max(initial))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Resolves when the watch says "stop" (or its sender is gone).
pub(crate) async fn stopped(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Sleeps for `delay` unless told to stop first; returns whether it slept
/// the whole delay.
pub(crate) async fn sleep_or_stop(
    delay: Duration,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => true,
        _ = stopped(shutdown) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_bounded_jitter() {
        let policy = ConsumerPolicy {
            retry_initial: Duration::from_millis(10),
            retry_max: Duration::from_millis(80),
            ..ConsumerPolicy::default()
        };
        let delays: Vec<Duration> = policy.backoff().take(8).collect();
        let bases = [10u64, 20, 40, 80, 80, 80, 80, 80];
        for (delay, base) in delays.iter().zip(bases) {
            let base = Duration::from_millis(base);
            assert!(
                *delay >= base && *delay <= base * 2,
                "{delay:?} not in [{base:?}, {:?}]",
                base * 2
            );
        }
    }

    #[test]
    fn the_default_accepts_only_known_versions() {
        let policy = ConsumerPolicy::default();
        assert!(policy.accepts(SCHEMA_VERSION));
        assert!(!policy.accepts(SCHEMA_VERSION + 1));
        assert!(!policy.accepts(0));
    }
}
