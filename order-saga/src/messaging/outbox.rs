//! The transactional outbox: events written in the same transaction as the
//! state change they describe, read back in order by the
//! [`OutboxRelay`](super::OutboxRelay).
//!
//! Two implementations:
//!
//! - PostgreSQL (feature `postgres`): [`append`] inserts into
//!   `orders.outbox` inside the order store's own transaction, so the
//!   change and its events commit together or not at all;
//!   [`PgOutboxSource`] is what the relay drains.
//! - In memory: [`MemoryOutbox`], appended to by the in-memory order store
//!   under the same lock as its state change (the embedded default).
//!
//! Both keep an event until the relay marks it published, which it does
//! only after the bus confirmed it: a bus outage leaves the events waiting
//! here, nothing is lost.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use time_kit::SharedClock;
use tokio::sync::Notify;

use crate::BoxFuture;
use crate::events::EventEnvelope;

#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "postgres")]
pub(crate) use postgres::columns;
#[cfg(feature = "postgres")]
pub use postgres::{
    NOTIFY_CHANNEL, OUTBOX_MIGRATION, PgOutboxSource, RELAY_LOCK_KEY, append,
    append_without_notify, unpublished_count,
};

/// The error type the outbox wraps.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What reading the outbox fails with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutboxError {
    /// The outbox's store could not be reached (database down, connection
    /// lost): the relay backs off and tries again.
    #[error("outbox store unavailable")]
    Unavailable(#[source] BoxError),
    /// A statement failed.
    #[error("outbox query failed")]
    Query(#[source] BoxError),
    /// A stored event does not decode (written by a newer version of this
    /// crate): the relay stands down so that a relay that understands it
    /// can publish it.
    #[error("outbox entry {seq} does not decode as an event")]
    Malformed {
        /// The entry's position.
        seq: i64,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

/// One unpublished event and its position in the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRecord {
    /// Its position: the order it was appended in (per order, the order of
    /// the order's state changes).
    pub seq: i64,
    /// The event.
    pub event: EventEnvelope,
}

/// What the relay drains: an outbox, seen by one relay.
///
/// Each relay owns its source. Only one source of an outbox is the
/// *leader* at a time (a PostgreSQL advisory lock, or a token in memory),
/// and only the leader publishes: that keeps the events of an order in
/// order across processes. A leader that dies loses the lead with its
/// connection (or when its source is dropped), and a standby takes over.
pub trait OutboxSource: Send + 'static {
    /// Becomes the leader if no one is, or confirms this source still is.
    /// `Ok(false)` means another relay leads: stand by.
    fn acquire_leadership(&mut self) -> BoxFuture<'_, Result<bool, OutboxError>>;

    /// Gives the lead up (on shutdown), so a standby takes over at once.
    fn release_leadership(&mut self) -> BoxFuture<'_, Result<(), OutboxError>>;

    /// The oldest `limit` unpublished events, in `seq` order.
    fn fetch_unpublished(
        &mut self,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<OutboxRecord>, OutboxError>>;

    /// Marks these entries published (the bus confirmed them).
    fn mark_published<'a>(&'a mut self, seqs: &'a [i64]) -> BoxFuture<'a, Result<(), OutboxError>>;

    /// How long the oldest unpublished event has waited (`None`: nothing
    /// waits).
    fn lag(&mut self) -> BoxFuture<'_, Result<Option<Duration>, OutboxError>>;

    /// Deletes events published more than `older_than` ago; returns how
    /// many. Stores that forget events as they are marked (memory) keep
    /// the default, which does nothing.
    fn purge_published(&mut self, older_than: Duration) -> BoxFuture<'_, Result<u64, OutboxError>> {
        let _ = older_than;
        Box::pin(std::future::ready(Ok(0)))
    }

    /// Waits until something was appended or `timeout` passed, whichever
    /// comes first. A wakeup may be spurious; one that came while the
    /// relay was busy is not lost.
    fn wait_for_append(&mut self, timeout: Duration) -> BoxFuture<'_, ()>;
}

/// An in-memory outbox, the embedded default.
///
/// The in-memory order store calls [`MemoryOutbox::append`] while holding
/// the lock of the state change the events describe. `append` cannot fail,
/// so the change and its events are both visible or neither is, which is
/// what the PostgreSQL outbox gets from its transaction. Clones share one
/// outbox; [`MemoryOutbox::source`] gives a relay its view of it.
#[derive(Clone)]
pub struct MemoryOutbox {
    inner: Arc<MemoryInner>,
}

struct MemoryInner {
    state: Mutex<MemoryState>,
    appended: Notify,
    clock: SharedClock,
    next_source: AtomicU64,
}

struct MemoryState {
    next_seq: i64,
    unpublished: BTreeMap<i64, (SystemTime, EventEnvelope)>,
    /// The source id that leads, if any.
    leader: Option<u64>,
}

impl std::fmt::Debug for MemoryOutbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryOutbox")
            .field("unpublished", &self.len())
            .finish_non_exhaustive()
    }
}

impl MemoryOutbox {
    /// An empty outbox; `clock` dates the entries for the lag metric.
    pub fn new(clock: SharedClock) -> MemoryOutbox {
        MemoryOutbox {
            inner: Arc::new(MemoryInner {
                state: Mutex::new(MemoryState {
                    next_seq: 1,
                    unpublished: BTreeMap::new(),
                    leader: None,
                }),
                appended: Notify::new(),
                clock,
                next_source: AtomicU64::new(1),
            }),
        }
    }

    /// Appends `events` in order and wakes the relay. Never fails; never
    /// blocks beyond a short lock.
    pub fn append(&self, events: &[EventEnvelope]) {
        if events.is_empty() {
            return;
        }
        let now = self.inner.clock.now();
        {
            let mut state = self.inner.state.lock();
            for event in events {
                let seq = state.next_seq;
                state.next_seq += 1;
                state.unpublished.insert(seq, (now, event.clone()));
            }
        }
        // `notify_one` keeps a permit when the relay is not waiting yet,
        // so an append during a publish is not missed.
        self.inner.appended.notify_one();
    }

    /// How many events wait to be published.
    pub fn len(&self) -> usize {
        self.inner.state.lock().unpublished.len()
    }

    /// Whether no event waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A relay's view of this outbox. Several sources may exist (several
    /// relays); one leads at a time, and a dropped source gives up the lead.
    pub fn source(&self) -> MemoryOutboxSource {
        MemoryOutboxSource {
            outbox: self.clone(),
            id: self.inner.next_source.fetch_add(1, Ordering::Relaxed),
        }
    }
}

/// A relay's view of a [`MemoryOutbox`].
#[derive(Debug)]
pub struct MemoryOutboxSource {
    outbox: MemoryOutbox,
    id: u64,
}

impl MemoryOutboxSource {
    fn is_leader(&self) -> bool {
        self.outbox.inner.state.lock().leader == Some(self.id)
    }

    fn not_leader() -> OutboxError {
        OutboxError::Unavailable("this relay no longer leads the outbox".into())
    }
}

impl Drop for MemoryOutboxSource {
    fn drop(&mut self) {
        let mut state = self.outbox.inner.state.lock();
        if state.leader == Some(self.id) {
            state.leader = None;
        }
    }
}

impl OutboxSource for MemoryOutboxSource {
    fn acquire_leadership(&mut self) -> BoxFuture<'_, Result<bool, OutboxError>> {
        let mut state = self.outbox.inner.state.lock();
        let lead = match state.leader {
            None => {
                state.leader = Some(self.id);
                true
            }
            Some(id) => id == self.id,
        };
        Box::pin(std::future::ready(Ok(lead)))
    }

    fn release_leadership(&mut self) -> BoxFuture<'_, Result<(), OutboxError>> {
        let mut state = self.outbox.inner.state.lock();
        if state.leader == Some(self.id) {
            state.leader = None;
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn fetch_unpublished(
        &mut self,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<OutboxRecord>, OutboxError>> {
        let result = if self.is_leader() {
            let state = self.outbox.inner.state.lock();
            Ok(state
                .unpublished
                .iter()
                .take(limit)
                .map(|(seq, (_, event))| OutboxRecord {
                    seq: *seq,
                    event: event.clone(),
                })
                .collect())
        } else {
            Err(Self::not_leader())
        };
        Box::pin(std::future::ready(result))
    }

    fn mark_published<'a>(&'a mut self, seqs: &'a [i64]) -> BoxFuture<'a, Result<(), OutboxError>> {
        let result = if self.is_leader() {
            let mut state = self.outbox.inner.state.lock();
            for seq in seqs {
                state.unpublished.remove(seq);
            }
            Ok(())
        } else {
            Err(Self::not_leader())
        };
        Box::pin(std::future::ready(result))
    }

    fn lag(&mut self) -> BoxFuture<'_, Result<Option<Duration>, OutboxError>> {
        let now = self.outbox.inner.clock.now();
        let oldest = self
            .outbox
            .inner
            .state
            .lock()
            .unpublished
            .values()
            .next()
            .map(|(at, _)| *at);
        let lag = oldest.map(|at| now.duration_since(at).unwrap_or(Duration::ZERO));
        Box::pin(std::future::ready(Ok(lag)))
    }

    fn wait_for_append(&mut self, timeout: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let _ = tokio::time::timeout(timeout, self.outbox.inner.appended.notified()).await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Event;
    use crate::model::{CancelReason, OrderId};
    use time_kit::ManualClock;

    fn event(order: OrderId) -> EventEnvelope {
        EventEnvelope::new(
            order,
            chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
            Event::OrderCancelled {
                reason: CancelReason::PaymentDeclined,
            },
        )
    }

    fn block_on<T>(f: BoxFuture<'_, T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn one_source_leads_and_a_dropped_leader_hands_over() {
        let outbox = MemoryOutbox::new(time_kit::system());
        let mut a = outbox.source();
        let mut b = outbox.source();
        assert!(block_on(a.acquire_leadership()).unwrap());
        assert!(!block_on(b.acquire_leadership()).unwrap());
        assert!(block_on(b.fetch_unpublished(10)).is_err());
        assert!(block_on(a.acquire_leadership()).unwrap());
        drop(a);
        assert!(block_on(b.acquire_leadership()).unwrap());
        block_on(b.release_leadership()).unwrap();
        let mut c = outbox.source();
        assert!(block_on(c.acquire_leadership()).unwrap());
    }

    #[test]
    fn fetch_is_in_append_order_and_marking_removes() {
        let clock = ManualClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000));
        let outbox = MemoryOutbox::new(Arc::new(clock.clone()));
        let order = OrderId::new_at(1_800_000_000_000);
        let events: Vec<EventEnvelope> = (0..5).map(|_| event(order)).collect();
        outbox.append(&events[..3]);
        clock.advance(Duration::from_secs(2));
        outbox.append(&events[3..]);
        clock.advance(Duration::from_secs(1));

        let mut source = outbox.source();
        assert!(block_on(source.acquire_leadership()).unwrap());
        assert_eq!(
            block_on(source.lag()).unwrap(),
            Some(Duration::from_secs(3))
        );
        let batch = block_on(source.fetch_unpublished(4)).unwrap();
        let got: Vec<_> = batch.iter().map(|r| r.event.clone()).collect();
        assert_eq!(got, events[..4]);
        assert!(batch.windows(2).all(|w| w[0].seq < w[1].seq));
        let seqs: Vec<i64> = batch.iter().map(|r| r.seq).collect();
        block_on(source.mark_published(&seqs)).unwrap();
        assert_eq!(outbox.len(), 1);
        assert_eq!(
            block_on(source.lag()).unwrap(),
            Some(Duration::from_secs(1))
        );
        let rest = block_on(source.fetch_unpublished(10)).unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].event, events[4]);
        block_on(source.mark_published(&[rest[0].seq])).unwrap();
        assert!(outbox.is_empty());
        assert_eq!(block_on(source.lag()).unwrap(), None);
    }

    #[tokio::test]
    async fn an_append_while_the_relay_is_busy_still_wakes_it() {
        let outbox = MemoryOutbox::new(time_kit::system());
        let mut source = outbox.source();
        outbox.append(&[event(OrderId::new_at(1))]);
        // The permit is kept: this returns at once, not after an hour.
        tokio::time::timeout(
            Duration::from_secs(5),
            source.wait_for_append(Duration::from_secs(3600)),
        )
        .await
        .expect("woken by the earlier append");
    }
}
