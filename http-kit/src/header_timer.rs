//! The timer behind hyper's header-read timeout, one per connection.
//!
//! hyper arms the timeout each time it starts reading a request head, which
//! on a keep-alive connection is once per request, and drops it once the
//! head is read. With hyper-util's `TokioTimer` each of those is a new
//! tokio timer: a boxed `Sleep`, an insertion into the runtime's timer wheel
//! under its lock, and a removal, for a deadline tens of seconds away that
//! almost never fires. That was about 4 % of the bare proxy's CPU
//! (docs/PERFORMANCE.md).
//!
//! Here each connection keeps **one** tokio timer. The deadlines hyper asks
//! for are rounded up to the next [`GRANULARITY`] step, so the requests of
//! one connection within a step share the same deadline and the timer is
//! only moved when the step changes: a few times a second per connection at
//! most, instead of once per request. A header-read timeout therefore fires
//! up to [`GRANULARITY`] late, never early.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// The step deadlines are rounded up to.
pub(crate) const GRANULARITY: Duration = Duration::from_millis(250);

/// A `hyper::rt::Timer` for one connection (see the module docs).
#[derive(Clone)]
pub(crate) struct HeaderTimer {
    /// Where this connection's grid of steps starts.
    origin: Instant,
    shared: Arc<Mutex<Shared>>,
}

impl HeaderTimer {
    /// A timer whose steps start now, on tokio's clock (so that a paused
    /// test clock is followed).
    pub(crate) fn new() -> HeaderTimer {
        HeaderTimer {
            origin: tokio::time::Instant::now().into_std(),
            shared: Arc::default(),
        }
    }
}

/// The connection's one tokio timer and the deadline it is set to; created
/// on first use, inside the runtime.
#[derive(Default)]
struct Shared {
    timer: Option<(Instant, Pin<Box<tokio::time::Sleep>>)>,
}

/// `deadline` rounded up to the next [`GRANULARITY`] step after `origin`.
fn round_up(origin: Instant, deadline: Instant) -> Instant {
    let since = deadline.saturating_duration_since(origin).as_nanos();
    let step = GRANULARITY.as_nanos();
    let steps = since.div_ceil(step);
    let rounded = u64::try_from(steps.saturating_mul(step)).unwrap_or(u64::MAX);
    origin
        .checked_add(Duration::from_nanos(rounded))
        .unwrap_or(deadline)
}

impl hyper::rt::Timer for HeaderTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        let now = self.now();
        let deadline = now
            .checked_add(duration)
            .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365));
        self.sleep_until(deadline)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(HeaderSleep {
            deadline: round_up(self.origin, deadline),
            shared: Arc::clone(&self.shared),
        })
    }

    /// tokio's clock, which the deadlines are compared with.
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }
}

/// One armed timeout: resolves once its (rounded) deadline has passed.
struct HeaderSleep {
    deadline: Instant,
    shared: Arc<Mutex<Shared>>,
}

impl Future for HeaderSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let deadline = self.deadline;
        let mut shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        let (set_for, timer) = shared.timer.get_or_insert_with(|| {
            (
                deadline,
                Box::pin(tokio::time::sleep_until(deadline.into())),
            )
        });
        if *set_for != deadline {
            // Another request's deadline (an earlier step): move the timer.
            timer.as_mut().reset(deadline.into());
            *set_for = deadline;
        }
        timer.as_mut().poll(cx)
    }
}

impl hyper::rt::Sleep for HeaderSleep {}

#[cfg(test)]
mod tests {
    use hyper::rt::Timer;

    use super::*;

    #[test]
    fn deadlines_round_up_to_the_next_step_and_never_down() {
        let origin = Instant::now();
        for offset_ms in [0u64, 1, 249, 250, 251, 30_000, 30_001] {
            let deadline = origin + Duration::from_millis(offset_ms);
            let rounded = round_up(origin, deadline);
            assert!(rounded >= deadline, "{offset_ms} ms");
            assert!(rounded - deadline < GRANULARITY, "{offset_ms} ms");
            assert_eq!(
                round_up(origin, rounded),
                rounded,
                "a step is its own rounding"
            );
        }
        let before = origin - Duration::from_millis(5);
        assert_eq!(
            round_up(origin, before),
            origin,
            "a past deadline is due at once"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_sleep_fires_at_its_step_and_not_before() {
        let timer = HeaderTimer::new();
        let start = timer.now();
        let sleep = timer.sleep(Duration::from_millis(1_000));
        let fired = tokio::time::timeout(Duration::from_millis(900), sleep).await;
        assert!(fired.is_err(), "not before its deadline");
        let sleep = timer.sleep_until(start + Duration::from_millis(1_000));
        tokio::time::timeout(Duration::from_millis(400), sleep)
            .await
            .expect("fires within one step after its deadline");
    }

    /// The requests of a connection arm one timeout after another: each
    /// fires at its own deadline, whether the one before had fired or not.
    #[tokio::test(start_paused = true)]
    async fn successive_sleeps_of_one_connection_each_keep_their_own_deadline() {
        let timer = HeaderTimer::new();
        for wait_ms in [2_000u64, 500, 3_000, 500] {
            let armed_at = tokio::time::Instant::now();
            timer.sleep(Duration::from_millis(wait_ms)).await;
            let waited = armed_at.elapsed();
            assert!(waited >= Duration::from_millis(wait_ms), "{waited:?}");
            assert!(
                waited < Duration::from_millis(wait_ms) + GRANULARITY,
                "{waited:?}"
            );
        }
        // One dropped before its deadline, then a shorter one.
        drop(timer.sleep(Duration::from_secs(30)));
        let armed_at = tokio::time::Instant::now();
        timer.sleep(Duration::from_millis(300)).await;
        assert!(armed_at.elapsed() < Duration::from_millis(300) + GRANULARITY);
    }
}
