//! [`Shutdown`]: one graceful-drain signal shared by a server and the work
//! its requests start.
//!
//! A server drains in three steps: it stops accepting, it lets each open
//! HTTP connection finish the request in flight, and it waits for work that
//! outlives a request, such as a WebSocket task after the upgrade. That last
//! kind of work holds a [`DrainGuard`], taken from the [`Shutdown`] that
//! [`serve`](crate::serve()) puts into every request's extensions; the drain
//! is complete when every connection and every guard is gone.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};

/// A cloneable drain signal. Clones share one state.
#[derive(Debug, Clone)]
pub struct Shutdown {
    handle: Arc<Handle>,
}

/// What clones of one handle share. `serve` gives each connection a
/// handle of its own ([`Shutdown::for_connection`]), so the clone each of
/// its requests carries counts on that handle, which no other thread
/// touches, rather than on the server's (a reference count moving between
/// cores on every request).
#[derive(Debug)]
struct Handle {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    triggered: watch::Sender<bool>,
    /// Open connections and live [`DrainGuard`]s.
    active: AtomicUsize,
    idle: Notify,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown::new()
    }
}

impl Shutdown {
    /// A signal not yet triggered.
    pub fn new() -> Shutdown {
        Shutdown {
            handle: Arc::new(Handle {
                inner: Arc::new(Inner {
                    triggered: watch::Sender::new(false),
                    active: AtomicUsize::new(0),
                    idle: Notify::new(),
                }),
            }),
        }
    }

    /// The same signal behind a handle of its own, for one connection's
    /// requests (see [`Handle`]).
    pub(crate) fn for_connection(&self) -> Shutdown {
        Shutdown {
            handle: Arc::new(Handle {
                inner: Arc::clone(&self.handle.inner),
            }),
        }
    }

    /// Starts the drain. Idempotent.
    pub fn trigger(&self) {
        self.handle.inner.triggered.send_replace(true);
    }

    /// Triggers the drain when `signal` completes (e.g. SIGTERM), from a
    /// spawned task. Needs a tokio runtime.
    pub fn trigger_on(&self, signal: impl Future<Output = ()> + Send + 'static) {
        let shutdown = self.clone();
        tokio::spawn(async move {
            signal.await;
            shutdown.trigger();
        });
    }

    /// Whether the drain has started.
    pub fn is_triggered(&self) -> bool {
        *self.handle.inner.triggered.borrow()
    }

    /// Completes once the drain has started (at once if it has).
    pub async fn triggered(&self) {
        let mut rx = self.handle.inner.triggered.subscribe();
        // An error means the sender is gone, which cannot happen while
        // `self` holds it; treat it as triggered all the same.
        let _ = rx.wait_for(|t| *t).await;
    }

    /// Keeps the drain waiting until the guard is dropped. Take it before
    /// the request that starts the work returns (for a WebSocket: in the
    /// handler, before answering 101), so the drain cannot miss it.
    pub fn guard(&self) -> DrainGuard {
        self.handle.inner.active.fetch_add(1, Ordering::AcqRel);
        DrainGuard {
            inner: Arc::clone(&self.handle.inner),
        }
    }

    /// Connections and guards still open.
    pub fn active(&self) -> usize {
        self.handle.inner.active.load(Ordering::Acquire)
    }

    /// Waits until nothing is active, for at most `timeout`. True when
    /// everything finished in time.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let idle = self.handle.inner.idle.notified();
            tokio::pin!(idle);
            // Register before checking, so a guard dropped in between
            // still wakes us.
            idle.as_mut().enable();
            if self.active() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.active() == 0;
            }
        }
    }
}

/// Keeps a [`Shutdown`]'s drain waiting while alive; see [`Shutdown::guard`].
#[derive(Debug)]
#[must_use = "the drain only waits while the guard is alive"]
pub struct DrainGuard {
    inner: Arc<Inner>,
}

impl Drop for DrainGuard {
    fn drop(&mut self) {
        if self.inner.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.inner.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wait_idle_returns_when_the_last_guard_drops() {
        let shutdown = Shutdown::new();
        let a = shutdown.guard();
        let b = shutdown.guard();
        assert_eq!(shutdown.active(), 2);
        let waiter = tokio::spawn({
            let s = shutdown.clone();
            async move { s.wait_idle(Duration::from_secs(30)).await }
        });
        drop(a);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(b);
        assert!(waiter.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn wait_idle_gives_up_at_the_timeout() {
        let shutdown = Shutdown::new();
        let _held = shutdown.guard();
        assert!(!shutdown.wait_idle(Duration::from_secs(5)).await);
    }

    #[tokio::test]
    async fn triggered_completes_for_early_and_late_waiters() {
        let shutdown = Shutdown::new();
        let early = tokio::spawn({
            let s = shutdown.clone();
            async move { s.triggered().await }
        });
        assert!(!shutdown.is_triggered());
        shutdown.trigger();
        early.await.unwrap();
        shutdown.triggered().await;
        assert!(shutdown.is_triggered());
    }
}
