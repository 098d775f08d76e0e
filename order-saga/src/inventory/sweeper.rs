//! [`Sweeper`]: the background task that gives back the stock of expired
//! reservations.
//!
//! Every [`SweeperConfig::interval`] (250 ms by default) it calls
//! [`Inventory::sweep_expired`] in batches of [`SweeperConfig::batch`] until
//! a batch comes back short, so a reservation is given back at most one
//! interval plus one pass after its expiry: well within the 1 s the order
//! saga is promised. The PostgreSQL store claims expired reservations with
//! `FOR UPDATE SKIP LOCKED`, so every instance of the service can run its
//! own sweeper without two of them giving the same stock back.
//!
//! ```no_run
//! # async fn demo() {
//! use std::sync::Arc;
//! use order_saga::inventory::{Inventory, MemoryInventory, Sweeper, SweeperConfig};
//!
//! let inventory: Arc<dyn Inventory> = Arc::new(MemoryInventory::default());
//! let sweeper = Sweeper::spawn(Arc::clone(&inventory), SweeperConfig::default());
//! // ... serve ...
//! let swept = sweeper.stats().swept();
//! sweeper.stop().await;
//! # let _ = swept;
//! # }
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use super::Inventory;

/// How often and how much the sweeper sweeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SweeperConfig {
    /// Time between passes. Default 250 ms.
    pub interval: Duration,
    /// Reservations given back per call (one transaction on PostgreSQL).
    /// Default 500.
    pub batch: usize,
}

impl Default for SweeperConfig {
    fn default() -> SweeperConfig {
        SweeperConfig {
            interval: Duration::from_millis(250),
            batch: 500,
        }
    }
}

impl SweeperConfig {
    /// Sets [`SweeperConfig::interval`] (at least 1 ms).
    pub fn with_interval(mut self, interval: Duration) -> SweeperConfig {
        self.interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Sets [`SweeperConfig::batch`] (at least 1).
    pub fn with_batch(mut self, batch: usize) -> SweeperConfig {
        self.batch = batch.max(1);
        self
    }
}

/// What a sweeper has done; clones share the counts.
#[derive(Clone, Debug)]
pub struct SweeperStats {
    inner: Arc<StatsInner>,
}

#[derive(Debug)]
struct StatsInner {
    swept: AtomicU64,
    passes: AtomicU64,
    errors: AtomicU64,
    /// The swept total, published after each pass that swept something.
    swept_watch: watch::Sender<u64>,
}

impl Default for SweeperStats {
    fn default() -> SweeperStats {
        SweeperStats {
            inner: Arc::new(StatsInner {
                swept: AtomicU64::new(0),
                passes: AtomicU64::new(0),
                errors: AtomicU64::new(0),
                swept_watch: watch::Sender::new(0),
            }),
        }
    }
}

impl SweeperStats {
    /// Reservations given back (state `Expired`) so far.
    pub fn swept(&self) -> u64 {
        self.inner.swept.load(Ordering::Relaxed)
    }

    /// Passes run so far.
    pub fn passes(&self) -> u64 {
        self.inner.passes.load(Ordering::Relaxed)
    }

    /// Calls to [`Inventory::sweep_expired`] that failed (logged; the next
    /// pass tries again).
    pub fn errors(&self) -> u64 {
        self.inner.errors.load(Ordering::Relaxed)
    }

    /// The swept total, updated after every pass that swept something: wait
    /// on it (`wait_for`) instead of polling.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.swept_watch.subscribe()
    }
}

/// A running sweeper. Stop it with [`Sweeper::stop`]; dropping it stops
/// the task too (after the pass in progress), without waiting for it.
#[derive(Debug)]
pub struct Sweeper {
    stats: SweeperStats,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Sweeper {
    /// Starts sweeping `inventory` on the current tokio runtime; the first
    /// pass runs at once.
    pub fn spawn(inventory: Arc<dyn Inventory>, config: SweeperConfig) -> Sweeper {
        let stats = SweeperStats::default();
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(run(inventory, config, stats.clone(), stopped));
        Sweeper { stats, stop, task }
    }

    /// Its counts.
    pub fn stats(&self) -> &SweeperStats {
        &self.stats
    }

    /// Stops the sweeper and waits for the pass in progress to finish.
    pub async fn stop(self) {
        self.stop.send_replace(true);
        if let Err(e) = self.task.await
            && e.is_panic()
        {
            tracing::error!(error = %e, "the inventory sweeper panicked");
        }
    }
}

async fn run(
    inventory: Arc<dyn Inventory>,
    config: SweeperConfig,
    stats: SweeperStats,
    mut stopped: watch::Receiver<bool>,
) {
    let batch = config.batch.max(1);
    let mut ticks = tokio::time::interval(config.interval.max(Duration::from_millis(1)));
    // After a slow pass, wait a whole interval rather than run a burst of
    // passes to catch up: the next pass sweeps everything due anyway.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tracing::debug!(interval = ?config.interval, batch, "inventory sweeper started");
    loop {
        tokio::select! {
            biased;
            changed = stopped.changed() => {
                // A send of `true` or the handle dropped: either way, stop.
                if changed.is_err() || *stopped.borrow() {
                    break;
                }
            }
            _ = ticks.tick() => {
                pass(&*inventory, batch, &stats, &stopped).await;
            }
        }
    }
    tracing::debug!(swept = stats.swept(), "inventory sweeper stopped");
}

/// Sweeps batch after batch until one comes back short, an error, or a stop.
async fn pass(
    inventory: &dyn Inventory,
    batch: usize,
    stats: &SweeperStats,
    stopped: &watch::Receiver<bool>,
) {
    stats.inner.passes.fetch_add(1, Ordering::Relaxed);
    let mut swept_now = 0u64;
    loop {
        match inventory.sweep_expired(batch).await {
            Ok(n) => {
                swept_now += n as u64;
                if n < batch || *stopped.borrow() {
                    break;
                }
            }
            Err(e) => {
                stats.inner.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    error = &e as &dyn std::error::Error,
                    "sweeping expired reservations failed; retrying next pass"
                );
                break;
            }
        }
    }
    if swept_now > 0 {
        let total = stats.inner.swept.fetch_add(swept_now, Ordering::Relaxed) + swept_now;
        stats.inner.swept_watch.send_replace(total);
        tracing::info!(swept = swept_now, total, "expired reservations released");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::BoxFuture;
    use crate::inventory::{
        InventoryError, Reservation, ReservationId, ReserveRequest, Restock, StockLevel,
    };
    use crate::model::Sku;

    /// An inventory whose sweep fails a few times, then reports `batch`
    /// reservations `full` times and a short batch after.
    #[derive(Debug)]
    struct Scripted {
        failures: AtomicUsize,
        full: AtomicUsize,
        calls: AtomicUsize,
    }

    impl Inventory for Scripted {
        fn reserve(&self, _: ReserveRequest) -> BoxFuture<'_, Result<Reservation, InventoryError>> {
            unreachable!("the sweeper only sweeps")
        }
        fn commit(&self, _: ReservationId) -> BoxFuture<'_, Result<Reservation, InventoryError>> {
            unreachable!("the sweeper only sweeps")
        }
        fn release(
            &self,
            _: ReservationId,
        ) -> BoxFuture<'_, Result<Option<Reservation>, InventoryError>> {
            unreachable!("the sweeper only sweeps")
        }
        fn reservation(
            &self,
            _: ReservationId,
        ) -> BoxFuture<'_, Result<Option<Reservation>, InventoryError>> {
            unreachable!("the sweeper only sweeps")
        }
        fn stock<'a>(&'a self, _: &'a Sku) -> BoxFuture<'a, Result<StockLevel, InventoryError>> {
            unreachable!("the sweeper only sweeps")
        }
        fn restock(&self, _: Restock) -> BoxFuture<'_, Result<StockLevel, InventoryError>> {
            unreachable!("the sweeper only sweeps")
        }
        fn sweep_expired(&self, limit: usize) -> BoxFuture<'_, Result<usize, InventoryError>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let result = if self
                .failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                Err(InventoryError::Unavailable("store down".into()))
            } else if self
                .full
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                Ok(limit)
            } else {
                Ok(0)
            };
            Box::pin(std::future::ready(result))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_pass_drains_full_batches_and_errors_wait_for_the_next_pass() {
        let inventory = Arc::new(Scripted {
            failures: AtomicUsize::new(2),
            full: AtomicUsize::new(3),
            calls: AtomicUsize::new(0),
        });
        let config = SweeperConfig::default()
            .with_batch(10)
            .with_interval(Duration::from_millis(100));
        let sweeper = Sweeper::spawn(inventory.clone(), config);
        let mut swept = sweeper.stats().subscribe();
        // Paused time advances only when every task waits, so this drives
        // the interval without sleeping in real time.
        swept.wait_for(|n| *n == 30).await.unwrap();
        let stats = sweeper.stats().clone();
        // Two failing passes, then one pass of three full batches and a
        // short one.
        assert_eq!(stats.errors(), 2);
        assert_eq!(stats.passes(), 3);
        assert_eq!(inventory.calls.load(Ordering::SeqCst), 2 + 4);
        sweeper.stop().await;
        let passes = stats.passes();
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(stats.passes(), passes, "no pass after stop");
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_handle_stops_the_task() {
        let inventory = Arc::new(Scripted {
            failures: AtomicUsize::new(0),
            full: AtomicUsize::new(0),
            calls: AtomicUsize::new(0),
        });
        let sweeper = Sweeper::spawn(inventory.clone(), SweeperConfig::default());
        drop(sweeper);
        // 20 intervals of (virtual) time: a task still running would have
        // swept 20 times; a stopped one at most once (the immediate first
        // tick, if it ran before the drop).
        for _ in 0..20 {
            tokio::time::advance(Duration::from_millis(250)).await;
            tokio::task::yield_now().await;
        }
        let calls = inventory.calls.load(Ordering::SeqCst);
        assert!(calls <= 1, "{calls} passes after the drop");
    }
}
