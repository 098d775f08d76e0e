//! The header-read timeout, kept outside hyper.
//!
//! hyper's own `header_read_timeout` arms a boxed timer every time it starts
//! reading a request head (once per request on a keep-alive connection),
//! reads the clock, drops the timer once the head is in, and forces an
//! extra read attempt after every response so that the next timer starts.
//! Over a proxied request that was about 4 % of the bare proxy's CPU
//! (docs/PERFORMANCE.md), for a deadline tens of seconds away that almost
//! never fires.
//!
//! Here hyper runs without it, and each connection keeps one
//! [`HeadDeadline`] instead: a count of requests in flight and the time the
//! last one ended. A request is in flight from the moment hyper hands its
//! head to the service until hyper drops its response body (after taking
//! the body's last frame, or when the connection ends), or until the
//! service's future fails or is dropped. While none is, the connection is
//! waiting for a request head (on a keep-alive connection, the next one),
//! and once it has waited longer than the timeout, [`HeadDeadline::expired`]
//! resolves and the connection's task closes it. Per request that costs two
//! uncontended atomic updates and one clock read; the connection's one
//! tokio timer is only moved when it fires, at most once per timeout.
//!
//! The bound is hyper's: from the connection's start, or from the end of
//! the previous response, the whole next head must arrive within the
//! timeout. Two differences, both at the end of a response: the time counts
//! from when hyper took the response body's last frame, not from when the
//! bytes left (a client that stops reading only the last buffered part of a
//! response is cut off once the timeout passes; one that stops reading a
//! large or streaming response holds it in flight, as under hyper's timer);
//! and a request body still arriving after its response has ended (a
//! handler that answers early and keeps reading the upload) counts as idle
//! time, where hyper's timer waited for the upload to end.
//!
//! The counters are atomics only because the service's futures must be
//! `Send`: every update happens on the connection's own task (HTTP/1 serves
//! one request at a time), so a zero count always sees the idle time stored
//! before it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Response;
use tokio::time::Instant;

/// One connection's in-flight count and idle clock (see the module docs).
#[derive(Debug, Clone)]
pub(crate) struct HeadDeadline {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// When the connection started; times below are nanoseconds after it.
    origin: Instant,
    /// Requests whose response body has not been dropped yet.
    in_flight: AtomicU32,
    /// When the last request in flight ended (or the connection started).
    idle_since_nanos: AtomicU64,
}

impl HeadDeadline {
    /// A connection starting now, on tokio's clock (so that a paused test
    /// clock is followed), waiting for its first request head.
    pub(crate) fn new() -> HeadDeadline {
        HeadDeadline {
            shared: Arc::new(Shared {
                origin: Instant::now(),
                in_flight: AtomicU32::new(0),
                idle_since_nanos: AtomicU64::new(0),
            }),
        }
    }

    /// Marks a request in flight until the returned guard is dropped.
    pub(crate) fn begin(&self) -> InFlight {
        self.shared.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            shared: Arc::clone(&self.shared),
        }
    }

    /// When the connection, idle now, must have its next head: `None`
    /// while a request is in flight.
    fn idle_deadline(&self, timeout: Duration) -> Option<Instant> {
        // Acquire pairs with the guard's release: a zero count sees the
        // idle time stored before it.
        if self.shared.in_flight.load(Ordering::Acquire) != 0 {
            return None;
        }
        let idle_since = Duration::from_nanos(self.shared.idle_since_nanos.load(Ordering::Relaxed));
        Some(self.shared.origin + idle_since + timeout)
    }

    /// Resolves once the connection has waited longer than `timeout` for a
    /// request head; pending forever while requests keep coming in time.
    pub(crate) async fn expired(&self, timeout: Duration) {
        let sleep = tokio::time::sleep_until(self.shared.origin + timeout);
        tokio::pin!(sleep);
        loop {
            sleep.as_mut().await;
            let now = Instant::now();
            match self.idle_deadline(timeout) {
                Some(deadline) if deadline <= now => return,
                Some(deadline) => sleep.as_mut().reset(deadline),
                // The request in flight's end moves the deadline to at
                // least a timeout from now.
                None => sleep.as_mut().reset(now + timeout),
            }
        }
    }
}

/// A request in flight on its connection; its drop starts the wait for the
/// next head.
#[derive(Debug)]
pub(crate) struct InFlight {
    shared: Arc<Shared>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let since = Instant::now().saturating_duration_since(self.shared.origin);
        let nanos = u64::try_from(since.as_nanos()).unwrap_or(u64::MAX);
        self.shared.idle_since_nanos.store(nanos, Ordering::Relaxed);
        self.shared.in_flight.fetch_sub(1, Ordering::Release);
    }
}

pin_project_lite::pin_project! {
    /// A service's response future whose response body carries the
    /// request's [`InFlight`] guard; the guard drops with the future when
    /// it fails or is abandoned.
    pub(crate) struct Tracked<F> {
        #[pin]
        future: F,
        in_flight: Option<InFlight>,
    }
}

impl<F> Tracked<F> {
    pub(crate) fn new(future: F, in_flight: InFlight) -> Tracked<F> {
        Tracked {
            future,
            in_flight: Some(in_flight),
        }
    }
}

impl<F, B, E> Future for Tracked<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<TrackedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.future.poll(cx));
        let in_flight = this.in_flight.take();
        Poll::Ready(result.map(|response| {
            response.map(|body| TrackedBody {
                body,
                _in_flight: in_flight,
            })
        }))
    }
}

pin_project_lite::pin_project! {
    /// A response body holding its request's [`InFlight`] guard.
    pub(crate) struct TrackedBody<B> {
        #[pin]
        body: B,
        _in_flight: Option<InFlight>,
    }
}

impl<B: http_body::Body> http_body::Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        self.project().body.poll_frame(cx)
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    #[inline]
    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_expires_a_timeout_after_it_started() {
        let deadline = HeadDeadline::new();
        let start = Instant::now();
        deadline.expired(Duration::from_secs(30)).await;
        assert!(start.elapsed() >= Duration::from_secs(30));
        assert!(start.elapsed() < Duration::from_secs(31));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_holds_the_deadline_and_its_end_restarts_it() {
        let deadline = HeadDeadline::new();
        let timeout = Duration::from_secs(30);
        let request = deadline.begin();
        let watch = deadline.clone();
        let expired = tokio::spawn(async move { watch.expired(timeout).await });
        tokio::time::sleep(Duration::from_secs(100)).await;
        assert!(!expired.is_finished(), "expired with a request in flight");
        drop(request);
        let ended = Instant::now();
        expired.await.unwrap();
        let waited = ended.elapsed();
        assert!(waited >= timeout, "expired {waited:?} after the response");
        assert!(
            waited < timeout + Duration::from_millis(1),
            "expired {waited:?} after the response: the timer is moved to the exact deadline"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn requests_that_keep_coming_in_time_never_expire() {
        let deadline = HeadDeadline::new();
        let watch = deadline.clone();
        let expired = tokio::spawn(async move { watch.expired(Duration::from_secs(30)).await });
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_secs(20)).await;
            drop(deadline.begin());
        }
        assert!(
            !expired.is_finished(),
            "expired though requests came every 20 s"
        );
    }
}
