//! The outbox relay: drains the outbox to the event bus, in order.
//!
//! One relay leads at a time (see [`OutboxSource`]); it reads the oldest
//! unpublished events in batches, hands each batch to the
//! [`EventPublisher`], and marks the batch published only once the
//! publisher confirmed it. A publisher that fails (the bus is down) or does
//! not answer within [`RelayConfig::publish_timeout`] leaves the batch in
//! the outbox; the relay retries the same batch with exponential backoff,
//! so nothing is lost and nothing overtakes it.
//!
//! Delivery is at least once: a relay that dies (or loses its database)
//! between the publisher's confirmation and the mark publishes that batch
//! again when it, or a standby, resumes. Consumers de-duplicate by event
//! id.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::handler::{backoff, sleep_or_stop, stopped};
use super::outbox::{OutboxError, OutboxSource};
use super::{EventPublisher, OutboxRecord};

/// How the relay batches, waits and retries.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Most events published per batch. Default 256.
    pub batch_size: usize,
    /// How often the outbox is read when no append woke the relay (the
    /// fallback for lost or disabled notifications). Default 1 s.
    pub poll_interval: Duration,
    /// How often a standby relay tries to take the lead. Default 1 s.
    pub standby_interval: Duration,
    /// A publish that has not answered within this counts as failed and is
    /// retried. Default 5 s.
    pub publish_timeout: Duration,
    /// First retry delay after a failure (doubling, with jitter).
    /// Default 50 ms.
    pub retry_initial: Duration,
    /// Longest retry delay. Default 5 s.
    pub retry_max: Duration,
    /// How often the lag gauge is refreshed while the relay is busy.
    /// Default 1 s.
    pub lag_interval: Duration,
    /// Published events older than this are deleted from the outbox
    /// (`None`: kept forever). Default 24 h.
    pub retain_published: Option<Duration>,
    /// How often the leader purges. Default 10 min.
    pub purge_interval: Duration,
}

impl Default for RelayConfig {
    fn default() -> RelayConfig {
        RelayConfig {
            batch_size: 256,
            poll_interval: Duration::from_secs(1),
            standby_interval: Duration::from_secs(1),
            publish_timeout: Duration::from_secs(5),
            retry_initial: Duration::from_millis(50),
            retry_max: Duration::from_secs(5),
            lag_interval: Duration::from_secs(1),
            retain_published: Some(Duration::from_secs(24 * 3600)),
            purge_interval: Duration::from_secs(600),
        }
    }
}

/// The relay's counters and gauges, for metrics. Shared with the relay's
/// task; read them at any time.
#[derive(Debug, Default)]
pub struct RelayStats {
    published: AtomicU64,
    batches: AtomicU64,
    publish_failures: AtomicU64,
    source_failures: AtomicU64,
    lag_millis: AtomicU64,
    leader: AtomicBool,
}

/// A copy of [`RelayStats`] at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RelaySnapshot {
    /// Events published and marked (counter).
    pub published: u64,
    /// Batches published and marked (counter).
    pub batches: u64,
    /// Publishes that failed or timed out (counter); the batch stayed in
    /// the outbox.
    pub publish_failures: u64,
    /// Outbox reads or writes that failed (counter).
    pub source_failures: u64,
    /// How long the oldest unpublished event has waited (gauge, zero when
    /// none waits), as of the last refresh.
    pub lag: Duration,
    /// Whether this relay leads (gauge).
    pub leader: bool,
}

impl RelayStats {
    /// The current values.
    pub fn snapshot(&self) -> RelaySnapshot {
        RelaySnapshot {
            published: self.published.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            publish_failures: self.publish_failures.load(Ordering::Relaxed),
            source_failures: self.source_failures.load(Ordering::Relaxed),
            lag: Duration::from_millis(self.lag_millis.load(Ordering::Relaxed)),
            leader: self.leader.load(Ordering::Relaxed),
        }
    }

    fn set_lag(&self, lag: Option<Duration>) {
        let millis = lag.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.lag_millis.store(millis, Ordering::Relaxed);
    }

    fn set_leader(&self, leader: bool) {
        self.leader.store(leader, Ordering::Relaxed);
    }
}

/// Drains an outbox to a publisher. See the [module docs](self).
pub struct OutboxRelay {
    source: Box<dyn OutboxSource>,
    publisher: Arc<dyn EventPublisher>,
    config: RelayConfig,
    stats: Arc<RelayStats>,
}

impl std::fmt::Debug for OutboxRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxRelay")
            .field("config", &self.config)
            .field("stats", &self.stats.snapshot())
            .finish_non_exhaustive()
    }
}

/// A running relay (from [`OutboxRelay::spawn`]). Dropping the handle stops
/// the relay as [`RelayHandle::shutdown`] does, without waiting for it.
#[derive(Debug)]
pub struct RelayHandle {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    stats: Arc<RelayStats>,
}

impl RelayHandle {
    /// The relay's counters.
    pub fn stats(&self) -> &Arc<RelayStats> {
        &self.stats
    }

    /// Stops the relay: it finishes the batch in flight (publish and mark),
    /// gives up the lead, and returns.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "outbox relay task failed");
        }
    }

    /// Kills the relay where it stands, as a crash would (its outbox
    /// connection, and with it the lead, goes with it). For tests and
    /// emergencies; prefer [`RelayHandle::shutdown`].
    pub async fn abort(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

impl OutboxRelay {
    /// A relay draining `source` to `publisher`.
    pub fn new(
        source: impl OutboxSource,
        publisher: Arc<dyn EventPublisher>,
        config: RelayConfig,
    ) -> OutboxRelay {
        OutboxRelay {
            source: Box::new(source),
            publisher,
            config,
            stats: Arc::new(RelayStats::default()),
        }
    }

    /// The relay's counters (shared with the running relay).
    pub fn stats(&self) -> Arc<RelayStats> {
        Arc::clone(&self.stats)
    }

    /// Runs on a new task until [`RelayHandle::shutdown`].
    pub fn spawn(self) -> RelayHandle {
        let (stop, shutdown) = watch::channel(false);
        let stats = self.stats();
        let task = tokio::spawn(self.run(shutdown));
        RelayHandle { stop, task, stats }
    }

    /// Runs until `shutdown` holds `true` (or its sender is dropped): takes
    /// the lead when it is free, drains the outbox, waits for appends.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let config = self.config.clone();
        let mut retry = backoff(config.retry_initial, config.retry_max);
        let mut next_lag = Instant::now();
        let mut next_purge = Instant::now() + config.purge_interval;
        loop {
            if *shutdown.borrow() {
                break;
            }
            match self.source.acquire_leadership().await {
                Ok(true) => self.stats.set_leader(true),
                Ok(false) => {
                    self.stats.set_leader(false);
                    if !sleep_or_stop(config.standby_interval, &mut shutdown).await {
                        break;
                    }
                    continue;
                }
                Err(e) => {
                    self.stats.set_leader(false);
                    self.source_failed(&e);
                    if !sleep_or_stop(next_delay(&mut retry), &mut shutdown).await {
                        break;
                    }
                    continue;
                }
            }

            let now = Instant::now();
            if now >= next_lag {
                next_lag = now + config.lag_interval;
                match self.source.lag().await {
                    Ok(lag) => self.stats.set_lag(lag),
                    Err(e) => self.source_failed(&e),
                }
            }
            if let Some(retain) = config.retain_published
                && now >= next_purge
            {
                next_purge = now + config.purge_interval;
                match self.source.purge_published(retain).await {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(purged = n, "published outbox entries purged"),
                    Err(e) => self.source_failed(&e),
                }
            }

            let batch = match self.source.fetch_unpublished(config.batch_size).await {
                Ok(batch) => batch,
                Err(e) => {
                    self.source_failed(&e);
                    if matches!(e, OutboxError::Malformed { .. }) {
                        // Another relay (a newer version) may read it:
                        // stand down for a while instead of spinning.
                        let _ = self.source.release_leadership().await;
                        self.stats.set_leader(false);
                        if !sleep_or_stop(config.retry_max, &mut shutdown).await {
                            break;
                        }
                    } else if !sleep_or_stop(next_delay(&mut retry), &mut shutdown).await {
                        break;
                    }
                    continue;
                }
            };

            if batch.is_empty() {
                self.stats.set_lag(None);
                retry = backoff(config.retry_initial, config.retry_max);
                tokio::select! {
                    () = self.source.wait_for_append(config.poll_interval) => {}
                    () = stopped(&mut shutdown) => break,
                }
                continue;
            }

            // Not interrupted by shutdown: the batch in flight is finished
            // (both calls are bounded by their timeouts).
            if self.publish(batch).await {
                retry = backoff(config.retry_initial, config.retry_max);
            } else if !sleep_or_stop(next_delay(&mut retry), &mut shutdown).await {
                break;
            }
        }
        if let Err(e) = self.source.release_leadership().await {
            tracing::warn!(error = %e, "outbox relay could not release the lead");
        }
        self.stats.set_leader(false);
    }

    /// Publishes one batch and marks it; returns whether both worked.
    async fn publish(&mut self, batch: Vec<OutboxRecord>) -> bool {
        let (seqs, events): (Vec<i64>, Vec<_>) =
            batch.into_iter().map(|r| (r.seq, r.event)).unzip();
        let outcome =
            tokio::time::timeout(self.config.publish_timeout, self.publisher.publish(&events))
                .await;
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                self.stats.publish_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, events = events.len(), "publishing outbox events failed; will retry");
                return false;
            }
            Err(_) => {
                self.stats.publish_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    timeout = ?self.config.publish_timeout,
                    events = events.len(),
                    "publishing outbox events timed out; will retry"
                );
                return false;
            }
        }
        match self.source.mark_published(&seqs).await {
            Ok(()) => {
                let n = u64::try_from(events.len()).unwrap_or(u64::MAX);
                self.stats.published.fetch_add(n, Ordering::Relaxed);
                self.stats.batches.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(e) => {
                // They are on the bus but still unpublished here: they will
                // be published again (consumers de-duplicate by id).
                self.source_failed(&e);
                false
            }
        }
    }

    fn source_failed(&self, e: &OutboxError) {
        self.stats.source_failures.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(error = %e, source = ?std::error::Error::source(e), "outbox relay: outbox unavailable");
    }
}

fn next_delay(retry: &mut impl Iterator<Item = Duration>) -> Duration {
    retry.next().unwrap_or(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BoxFuture;
    use crate::events::{Event, EventEnvelope};
    use crate::messaging::{BusError, MemoryOutbox};
    use crate::model::{CancelReason, OrderId};
    use parking_lot::Mutex;
    use std::sync::atomic::AtomicUsize;

    /// Records what it is given; fails while `failing` is set.
    #[derive(Default)]
    struct Recorder {
        published: Mutex<Vec<EventEnvelope>>,
        failing: AtomicBool,
        calls: AtomicUsize,
        changed: tokio::sync::Notify,
    }

    impl EventPublisher for Recorder {
        fn publish<'a>(
            &'a self,
            events: &'a [EventEnvelope],
        ) -> BoxFuture<'a, Result<(), BusError>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let result = if self.failing.load(Ordering::SeqCst) {
                Err(BusError::Unavailable("down".into()))
            } else {
                self.published.lock().extend_from_slice(events);
                Ok(())
            };
            self.changed.notify_waiters();
            Box::pin(std::future::ready(result))
        }
    }

    impl Recorder {
        async fn wait_for(&self, n: usize) {
            loop {
                let changed = self.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if self.published.lock().len() >= n {
                    return;
                }
                changed.await;
            }
        }
    }

    fn events(n: usize) -> Vec<EventEnvelope> {
        let order = OrderId::new_at(1_800_000_000_000);
        (0..n)
            .map(|_| {
                EventEnvelope::new(
                    order,
                    chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
                    Event::OrderCancelled {
                        reason: CancelReason::PaymentDeclined,
                    },
                )
            })
            .collect()
    }

    fn fast() -> RelayConfig {
        RelayConfig {
            batch_size: 7,
            retry_initial: Duration::from_millis(1),
            retry_max: Duration::from_millis(5),
            standby_interval: Duration::from_millis(5),
            ..RelayConfig::default()
        }
    }

    #[tokio::test]
    async fn a_failing_publisher_keeps_the_events_until_it_recovers() {
        let outbox = MemoryOutbox::new(time_kit::system());
        let recorder = Arc::new(Recorder::default());
        recorder.failing.store(true, Ordering::SeqCst);
        let relay = OutboxRelay::new(outbox.source(), recorder.clone(), fast()).spawn();
        let all = events(20);
        outbox.append(&all);
        while recorder.calls.load(Ordering::SeqCst) < 3 {
            let changed = recorder.changed.notified();
            tokio::time::timeout(Duration::from_secs(10), changed)
                .await
                .expect("the relay retries");
        }
        assert_eq!(outbox.len(), 20, "nothing leaves the outbox unconfirmed");
        assert!(relay.stats().snapshot().publish_failures >= 3);
        assert_eq!(relay.stats().snapshot().published, 0);

        recorder.failing.store(false, Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(10), recorder.wait_for(20))
            .await
            .expect("drained after recovery");
        assert_eq!(*recorder.published.lock(), all, "each once, in order");
        let stats = relay.stats().clone();
        relay.shutdown().await;
        assert!(outbox.is_empty());
        assert_eq!(stats.snapshot().published, 20);
        assert!(!stats.snapshot().leader);
    }

    #[tokio::test]
    async fn a_standby_takes_over_when_the_leader_stops() {
        let outbox = MemoryOutbox::new(time_kit::system());
        let recorder = Arc::new(Recorder::default());
        let first = OutboxRelay::new(outbox.source(), recorder.clone(), fast()).spawn();
        let all = events(10);
        outbox.append(&all[..5]);
        recorder.wait_for(5).await;
        let second = OutboxRelay::new(outbox.source(), recorder.clone(), fast()).spawn();
        first.shutdown().await;
        outbox.append(&all[5..]);
        tokio::time::timeout(Duration::from_secs(10), recorder.wait_for(10))
            .await
            .expect("the standby drains");
        assert_eq!(*recorder.published.lock(), all);
        assert!(second.stats().snapshot().leader);
        second.shutdown().await;
    }
}
