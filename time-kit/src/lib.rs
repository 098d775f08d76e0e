//! # time_kit: the one injectable clock of the ferrokeel suite
//!
//! Every crate of the suite that asks "what time is it?" (a metrics window,
//! a token's `exp`, a refresh token's grace period, a rate limit, a
//! reservation's TTL) asks a [`Clock`], never `SystemTime::now()` directly.
//! Production code passes [`SystemClock`]; tests pass a [`ManualClock`] and
//! move it by hand, so expiry is tested without sleeping.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::{Duration, SystemTime};
//! use time_kit::{Clock, ManualClock, SharedClock};
//!
//! let manual = ManualClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000));
//! let clock: SharedClock = Arc::new(manual.clone());
//! assert_eq!(clock.unix_secs(), 1_800_000_000);
//! manual.advance(Duration::from_millis(1_500));
//! assert_eq!(clock.unix_millis(), 1_800_000_001_500);
//! ```
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of wall-clock time.
///
/// Hot paths call [`Clock::now`] on every event or request (metrics-core on
/// every ingested event, the JWT verifier on every token), so
/// implementations must be cheap and thread-safe.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// The current time.
    fn now(&self) -> SystemTime;

    /// The current time in whole seconds since the Unix epoch (negative
    /// before it), as JWT `exp`/`nbf`/`iat` count.
    fn unix_secs(&self) -> i64 {
        unix_nanos(self.now()).div_euclid(1_000_000_000)
    }

    /// The current time in whole milliseconds since the Unix epoch.
    fn unix_millis(&self) -> i64 {
        unix_nanos(self.now()).div_euclid(1_000_000)
    }
}

/// A clock shared by many owners, as the suite's configs hold it.
pub type SharedClock = std::sync::Arc<dyn Clock>;

/// The system clock as a [`SharedClock`].
pub fn system() -> SharedClock {
    std::sync::Arc::new(SystemClock)
}

/// The operating system's real-time clock. The default.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock moved by hand, for tests and simulations.
///
/// Clones share one time: advance any clone and every processor holding
/// another clone sees it.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use time_kit::{Clock, ManualClock};
///
/// let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
/// let clock = ManualClock::new(start);
/// let shared = clock.clone();
/// clock.advance(Duration::from_secs(90));
/// assert_eq!(shared.now(), start + Duration::from_secs(90));
/// ```
#[derive(Debug, Clone)]
pub struct ManualClock {
    /// Nanoseconds since the Unix epoch (negative before it).
    nanos: Arc<AtomicI64>,
}

impl ManualClock {
    /// A clock that reads `start` until moved.
    pub fn new(start: SystemTime) -> ManualClock {
        ManualClock {
            nanos: Arc::new(AtomicI64::new(unix_nanos(start))),
        }
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let by = i64::try_from(by.as_nanos()).unwrap_or(i64::MAX);
        let _ = self
            .nanos
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_add(by))
            });
    }

    /// The time the clock reads (also available through [`Clock::now`]).
    pub fn now(&self) -> SystemTime {
        from_unix_nanos(self.nanos.load(Ordering::Acquire))
    }

    /// Sets the clock to `to` (which may be earlier than the current reading).
    pub fn set(&self, to: SystemTime) {
        self.nanos.store(unix_nanos(to), Ordering::Release);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        ManualClock::now(self)
    }
}

/// `t` in nanoseconds since the Unix epoch (negative before it), saturating
/// at the ends of `i64` (years 1677 and 2262).
pub fn unix_nanos(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_nanos()).map_or(i64::MIN, |n| -n),
    }
}

fn from_unix_nanos(n: i64) -> SystemTime {
    if n >= 0 {
        UNIX_EPOCH + Duration::from_nanos(n.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_nanos(n.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nanos_round_trip_on_both_sides_of_the_epoch() {
        for t in [
            UNIX_EPOCH + Duration::new(1_800_000_000, 123),
            UNIX_EPOCH - Duration::new(5, 7),
            UNIX_EPOCH,
        ] {
            assert_eq!(from_unix_nanos(unix_nanos(t)), t);
        }
    }

    #[test]
    fn set_can_move_backwards() {
        let c = ManualClock::new(UNIX_EPOCH + Duration::from_secs(100));
        c.set(UNIX_EPOCH + Duration::from_secs(10));
        assert_eq!(c.now(), UNIX_EPOCH + Duration::from_secs(10));
    }
}
