//! The in-memory event bus, the embedded default: the same consumer-group
//! semantics as the Redis Streams bus, inside one process.
//!
//! - Each **group** sees every event published after it was created (plus
//!   those still retained when it was created); groups are independent.
//! - Within a group each event goes to **one consumer** at a time.
//! - A delivery stays **pending** until acknowledged. It is delivered again
//!   (to any consumer of the group) when its consumer is dropped, or when it
//!   stayed unacknowledged longer than [`MemoryBusConfig::ack_timeout`]
//!   (measured on the injected clock).
//! - An event whose handler keeps failing goes to the group's **dead
//!   letters** after [`ConsumerPolicy::max_deliveries`] deliveries, as does
//!   one with an unknown schema version.
//!
//! Events are forgotten once every group has acknowledged them; at most
//! [`MemoryBusConfig::max_len`] are retained (like Redis' `MAXLEN`), and
//! events trimmed before a group read them are counted in
//! [`MemoryBus::trimmed_unread`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use time_kit::SharedClock;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use super::handler::{
    ConsumerPolicy, ConsumerStats, EventHandler, HandlerError, sleep_or_stop, stopped,
};
use super::{BusError, EventPublisher};
use crate::BoxFuture;
use crate::events::EventEnvelope;

/// How the in-memory bus retains and redelivers.
#[derive(Debug, Clone)]
pub struct MemoryBusConfig {
    /// Most events retained (unacknowledged by some group, or published
    /// while no group exists); the oldest beyond are dropped. Default
    /// 100,000.
    pub max_len: usize,
    /// A delivery not acknowledged within this is given to the group
    /// again. Default 30 s.
    pub ack_timeout: Duration,
    /// Most dead letters kept per group (the oldest are dropped beyond).
    /// Default 10,000.
    pub max_dead_letters: usize,
    /// The clock `ack_timeout` is measured on.
    pub clock: SharedClock,
}

impl Default for MemoryBusConfig {
    fn default() -> MemoryBusConfig {
        MemoryBusConfig {
            max_len: 100_000,
            ack_timeout: Duration::from_secs(30),
            max_dead_letters: 10_000,
            clock: time_kit::system(),
        }
    }
}

/// An event given to a consumer.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// Its position on the bus (publication order, from 0).
    pub position: u64,
    /// The event.
    pub event: EventEnvelope,
    /// How many times it has been delivered in this group, this one
    /// included.
    pub deliveries: u32,
}

/// An event a group gave up on.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryDeadLetter {
    /// Its position on the bus.
    pub position: u64,
    /// The event.
    pub event: EventEnvelope,
    /// The last error.
    pub error: String,
    /// How many times it was delivered.
    pub deliveries: u32,
    /// The consumer that gave up.
    pub consumer: String,
    /// When.
    pub at: SystemTime,
}

/// The in-memory bus. Clones share one bus.
#[derive(Clone)]
pub struct MemoryBus {
    inner: Arc<BusInner>,
}

struct BusInner {
    state: Mutex<BusState>,
    published: Notify,
    config: MemoryBusConfig,
    next_consumer: AtomicU64,
}

struct BusState {
    /// Position of `entries[0]`.
    first: u64,
    entries: VecDeque<EventEnvelope>,
    groups: HashMap<String, Group>,
    trimmed_unread: u64,
}

struct Group {
    /// The next position never delivered in this group.
    next: u64,
    pending: BTreeMap<u64, Pending>,
    dead: VecDeque<MemoryDeadLetter>,
}

struct Pending {
    /// `None` once its consumer was dropped: deliverable again at once.
    consumer: Option<u64>,
    delivered_at: SystemTime,
    deliveries: u32,
}

impl std::fmt::Debug for MemoryBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.inner.state.lock();
        f.debug_struct("MemoryBus")
            .field("retained", &state.entries.len())
            .field("groups", &state.groups.len())
            .finish_non_exhaustive()
    }
}

impl Default for MemoryBus {
    fn default() -> MemoryBus {
        MemoryBus::new(MemoryBusConfig::default())
    }
}

impl MemoryBus {
    /// An empty bus.
    pub fn new(config: MemoryBusConfig) -> MemoryBus {
        MemoryBus {
            inner: Arc::new(BusInner {
                state: Mutex::new(BusState {
                    first: 0,
                    entries: VecDeque::new(),
                    groups: HashMap::new(),
                    trimmed_unread: 0,
                }),
                published: Notify::new(),
                config,
                next_consumer: AtomicU64::new(1),
            }),
        }
    }

    /// Appends `events` in order and wakes the consumers.
    pub fn publish_now(&self, events: &[EventEnvelope]) {
        if events.is_empty() {
            return;
        }
        {
            let mut state = self.inner.state.lock();
            state.entries.extend(events.iter().cloned());
            let max_len = self.inner.config.max_len.max(1);
            while state.entries.len() > max_len {
                state.drop_front();
            }
        }
        self.inner.published.notify_waiters();
    }

    /// A consumer named `name` in `group`, creating the group (starting at
    /// the oldest retained event) if it does not exist. Create groups
    /// before publishing: events every existing group has acknowledged are
    /// forgotten.
    pub fn consumer(&self, group: &str, name: &str) -> MemoryConsumer {
        {
            let mut state = self.inner.state.lock();
            let first = state.first;
            state.groups.entry(group.to_owned()).or_insert(Group {
                next: first,
                pending: BTreeMap::new(),
                dead: VecDeque::new(),
            });
        }
        MemoryConsumer {
            bus: self.clone(),
            group: group.to_owned(),
            name: name.to_owned(),
            id: self.inner.next_consumer.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// The dead letters of `group`, oldest first.
    pub fn dead_letters(&self, group: &str) -> Vec<MemoryDeadLetter> {
        self.inner
            .state
            .lock()
            .groups
            .get(group)
            .map(|g| g.dead.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// How many deliveries of `group` are unacknowledged.
    pub fn pending(&self, group: &str) -> usize {
        self.inner
            .state
            .lock()
            .groups
            .get(group)
            .map_or(0, |g| g.pending.len())
    }

    /// How many events are retained.
    pub fn len(&self) -> usize {
        self.inner.state.lock().entries.len()
    }

    /// Whether no event is retained.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Events (per group) dropped by `max_len` before that group had them
    /// acknowledged: lost for that group. Zero unless a consumer stalled.
    pub fn trimmed_unread(&self) -> u64 {
        self.inner.state.lock().trimmed_unread
    }
}

impl BusState {
    fn drop_front(&mut self) {
        if self.entries.pop_front().is_none() {
            return;
        }
        let position = self.first;
        self.first += 1;
        for group in self.groups.values_mut() {
            if group.next <= position {
                group.next = position + 1;
                self.trimmed_unread += 1;
            } else if group.pending.remove(&position).is_some() {
                self.trimmed_unread += 1;
            }
        }
    }

    /// Forgets the events every group is done with.
    fn trim_acknowledged(&mut self) {
        if self.groups.is_empty() {
            return;
        }
        let keep_from = self
            .groups
            .values()
            .map(|g| {
                g.pending
                    .keys()
                    .next()
                    .copied()
                    .unwrap_or(g.next)
                    .min(g.next)
            })
            .min()
            .unwrap_or(self.first);
        while self.first < keep_from && !self.entries.is_empty() {
            self.entries.pop_front();
            self.first += 1;
        }
    }

    fn entry(&self, position: u64) -> Option<&EventEnvelope> {
        let index = usize::try_from(position.checked_sub(self.first)?).ok()?;
        self.entries.get(index)
    }
}

impl EventPublisher for MemoryBus {
    fn publish<'a>(&'a self, events: &'a [EventEnvelope]) -> BoxFuture<'a, Result<(), BusError>> {
        self.publish_now(events);
        Box::pin(std::future::ready(Ok(())))
    }
}

/// One consumer of a group on a [`MemoryBus`]. Dropping it hands its
/// unacknowledged deliveries back to the group.
pub struct MemoryConsumer {
    bus: MemoryBus,
    group: String,
    name: String,
    id: u64,
}

impl std::fmt::Debug for MemoryConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryConsumer")
            .field("group", &self.group)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Drop for MemoryConsumer {
    fn drop(&mut self) {
        let mut state = self.bus.inner.state.lock();
        let mut released = false;
        if let Some(group) = state.groups.get_mut(&self.group) {
            for pending in group.pending.values_mut() {
                if pending.consumer == Some(self.id) {
                    pending.consumer = None;
                    released = true;
                }
            }
        }
        drop(state);
        if released {
            self.bus.inner.published.notify_waiters();
        }
    }
}

/// A running [`MemoryConsumer`] (from [`MemoryConsumer::spawn`]). Dropping
/// the handle stops the consumer without waiting for it.
#[derive(Debug)]
pub struct MemoryConsumerHandle {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    stats: Arc<ConsumerStats>,
}

impl MemoryConsumerHandle {
    /// The consumer's counters.
    pub fn stats(&self) -> &Arc<ConsumerStats> {
        &self.stats
    }

    /// Stops the consumer after the event in hand and waits for it.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

impl MemoryConsumer {
    /// The consumer's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The next delivery if one is ready: first a delivery to redeliver
    /// (its consumer was dropped, or it timed out), else the next new event.
    pub fn try_recv(&self) -> Option<Delivery> {
        let now = self.bus.inner.config.clock.now();
        let ack_timeout = self.bus.inner.config.ack_timeout;
        let mut state = self.bus.inner.state.lock();
        let state = &mut *state;
        let group = state.groups.get_mut(&self.group)?;
        let due = group.pending.iter().find_map(|(position, p)| {
            let expired = now
                .duration_since(p.delivered_at)
                .is_ok_and(|idle| idle >= ack_timeout);
            (p.consumer.is_none() || expired).then_some(*position)
        });
        let (position, deliveries) = match due {
            Some(position) => {
                let pending = group.pending.get_mut(&position)?;
                pending.consumer = Some(self.id);
                pending.delivered_at = now;
                pending.deliveries = pending.deliveries.saturating_add(1);
                (position, pending.deliveries)
            }
            None => {
                let position = group.next;
                if position >= state.first + state.entries.len() as u64 {
                    return None;
                }
                group.next += 1;
                group.pending.insert(
                    position,
                    Pending {
                        consumer: Some(self.id),
                        delivered_at: now,
                        deliveries: 1,
                    },
                );
                (position, 1)
            }
        };
        let event = state.entry(position)?.clone();
        Some(Delivery {
            position,
            event,
            deliveries,
        })
    }

    /// Waits for the next delivery. Timed-out deliveries are looked for at
    /// least every `ack_timeout` (at most every second).
    pub async fn recv(&self) -> Delivery {
        let recheck = self
            .bus
            .inner
            .config
            .ack_timeout
            .clamp(Duration::from_millis(10), Duration::from_secs(1));
        loop {
            let published = self.bus.inner.published.notified();
            tokio::pin!(published);
            published.as_mut().enable();
            if let Some(delivery) = self.try_recv() {
                return delivery;
            }
            let _ = tokio::time::timeout(recheck, published).await;
        }
    }

    /// Acknowledges a delivery; returns whether it was pending.
    pub fn ack(&self, position: u64) -> bool {
        let mut state = self.bus.inner.state.lock();
        let removed = state
            .groups
            .get_mut(&self.group)
            .and_then(|g| g.pending.remove(&position))
            .is_some();
        state.trim_acknowledged();
        removed
    }

    /// Delivers a pending event of this consumer to it again (a retry):
    /// counts the delivery and returns the new count, or `None` if it is
    /// no longer this consumer's (acknowledged, or taken over).
    pub fn redeliver(&self, position: u64) -> Option<u32> {
        self.with_own_pending(position, |p| {
            p.deliveries = p.deliveries.saturating_add(1);
            p.deliveries
        })
    }

    /// Restarts the ack timeout of a pending event of this consumer without
    /// counting a delivery; returns whether it is still this consumer's.
    pub fn touch(&self, position: u64) -> bool {
        self.with_own_pending(position, |_| ()).is_some()
    }

    fn with_own_pending<T>(&self, position: u64, f: impl FnOnce(&mut Pending) -> T) -> Option<T> {
        let now = self.bus.inner.config.clock.now();
        let mut state = self.bus.inner.state.lock();
        let pending = state
            .groups
            .get_mut(&self.group)?
            .pending
            .get_mut(&position)?;
        if pending.consumer != Some(self.id) {
            return None;
        }
        pending.delivered_at = now;
        Some(f(pending))
    }

    /// Moves a delivery to the group's dead letters (and acknowledges it);
    /// returns whether it was still pending.
    pub fn dead_letter(&self, delivery: &Delivery, error: &str) -> bool {
        let at = self.bus.inner.config.clock.now();
        let max = self.bus.inner.config.max_dead_letters;
        let mut state = self.bus.inner.state.lock();
        let Some(group) = state.groups.get_mut(&self.group) else {
            return false;
        };
        let Some(pending) = group.pending.remove(&delivery.position) else {
            return false;
        };
        group.dead.push_back(MemoryDeadLetter {
            position: delivery.position,
            event: delivery.event.clone(),
            error: error.to_owned(),
            deliveries: pending.deliveries,
            consumer: self.name.clone(),
            at,
        });
        while group.dead.len() > max {
            group.dead.pop_front();
        }
        state.trim_acknowledged();
        true
    }

    /// Runs `handler` on every delivery until `shutdown` holds `true` (or
    /// its sender is dropped), with `policy`'s retries and dead letters.
    pub async fn run(
        self,
        handler: Arc<dyn EventHandler>,
        policy: ConsumerPolicy,
        stats: Arc<ConsumerStats>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            let delivery = tokio::select! {
                d = self.recv() => d,
                () = stopped(&mut shutdown) => return,
            };
            if delivery.deliveries > 1 {
                ConsumerStats::inc(&stats.reclaimed);
            }
            if !self
                .process(delivery, handler.as_ref(), &policy, &stats, &mut shutdown)
                .await
            {
                return;
            }
        }
    }

    /// Runs [`MemoryConsumer::run`] on a new task.
    pub fn spawn(
        self,
        handler: Arc<dyn EventHandler>,
        policy: ConsumerPolicy,
    ) -> MemoryConsumerHandle {
        let (stop, shutdown) = watch::channel(false);
        let stats = Arc::new(ConsumerStats::default());
        let task = tokio::spawn(self.run(handler, policy, Arc::clone(&stats), shutdown));
        MemoryConsumerHandle { stop, task, stats }
    }

    /// Handles one delivery to the end (acknowledged, dead-lettered, or no
    /// longer ours); returns `false` if told to stop meanwhile.
    async fn process(
        &self,
        delivery: Delivery,
        handler: &dyn EventHandler,
        policy: &ConsumerPolicy,
        stats: &ConsumerStats,
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
        let version = delivery.event.schema_version;
        if !policy.accepts(version) {
            let error = format!("unknown schema version {version}");
            if self.dead_letter(&delivery, &error) {
                ConsumerStats::inc(&stats.dead_lettered);
            }
            return true;
        }
        if delivery.deliveries > policy.max_deliveries {
            // Delivered that often without an outcome: its consumers died
            // handling it.
            let error = format!(
                "delivered {} times without being acknowledged",
                delivery.deliveries
            );
            if self.dead_letter(&delivery, &error) {
                ConsumerStats::inc(&stats.dead_lettered);
            }
            return true;
        }
        let mut deliveries = delivery.deliveries;
        let mut retry = policy.backoff();
        loop {
            let error = match handler.handle(&delivery.event).await {
                Ok(()) => {
                    self.ack(delivery.position);
                    ConsumerStats::inc(&stats.handled);
                    return true;
                }
                Err(e) => e,
            };
            ConsumerStats::inc(&stats.handler_failures);
            let delay = retry.next().unwrap_or(policy.retry_max);
            match error {
                HandlerError::Unavailable(e) => {
                    tracing::warn!(error = %e, event = %delivery.event.id, "event handler unavailable; retrying");
                    if !sleep_or_stop(delay, shutdown).await {
                        return false;
                    }
                    if !self.touch(delivery.position) {
                        return true;
                    }
                }
                HandlerError::Failed(e) => {
                    if deliveries >= policy.max_deliveries {
                        tracing::error!(error = %e, event = %delivery.event.id, deliveries, "event handler keeps failing; dead-lettered");
                        if self.dead_letter(&delivery, &e.to_string()) {
                            ConsumerStats::inc(&stats.dead_lettered);
                        }
                        return true;
                    }
                    tracing::warn!(error = %e, event = %delivery.event.id, deliveries, "event handler failed; retrying");
                    if !sleep_or_stop(delay, shutdown).await {
                        return false;
                    }
                    match self.redeliver(delivery.position) {
                        Some(n) => deliveries = n,
                        None => return true,
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Event;
    use crate::model::{CancelReason, OrderId};
    use time_kit::ManualClock;

    fn events(n: usize) -> Vec<EventEnvelope> {
        (0..n)
            .map(|i| {
                EventEnvelope::new(
                    OrderId::new_at(1_800_000_000_000 + i as i64),
                    chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
                    Event::OrderCancelled {
                        reason: CancelReason::PaymentDeclined,
                    },
                )
            })
            .collect()
    }

    fn bus_with(clock: &ManualClock, max_len: usize) -> MemoryBus {
        MemoryBus::new(MemoryBusConfig {
            max_len,
            ack_timeout: Duration::from_secs(30),
            max_dead_letters: 3,
            clock: Arc::new(clock.clone()),
        })
    }

    fn clock() -> ManualClock {
        ManualClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000))
    }

    #[test]
    fn groups_each_see_everything_and_consumers_split_a_group() {
        let bus = MemoryBus::default();
        let a1 = bus.consumer("a", "a1");
        let a2 = bus.consumer("a", "a2");
        let b = bus.consumer("b", "b1");
        let all = events(6);
        bus.publish_now(&all);
        let mut seen_a = Vec::new();
        loop {
            let mut progressed = false;
            for c in [&a1, &a2] {
                if let Some(d) = c.try_recv() {
                    assert_eq!(d.deliveries, 1);
                    assert!(c.ack(d.position));
                    seen_a.push(d.event);
                    progressed = true;
                }
            }
            if !progressed {
                break;
            }
        }
        assert_eq!(seen_a, all, "each event once, in order, across the group");
        let seen_b: Vec<_> = std::iter::from_fn(|| {
            let d = b.try_recv()?;
            b.ack(d.position);
            Some(d.event)
        })
        .collect();
        assert_eq!(seen_b, all);
        assert!(bus.is_empty(), "acknowledged by every group, forgotten");
    }

    #[test]
    fn unacknowledged_deliveries_come_back_after_the_timeout_or_a_drop() {
        let clock = clock();
        let bus = bus_with(&clock, 100);
        let a = bus.consumer("g", "a");
        let b = bus.consumer("g", "b");
        bus.publish_now(&events(2));
        let first = a.try_recv().unwrap();
        let second = a.try_recv().unwrap();
        assert!(b.try_recv().is_none(), "both are a's");

        clock.advance(Duration::from_secs(29));
        assert!(b.try_recv().is_none());
        assert!(a.touch(second.position));
        clock.advance(Duration::from_secs(1));
        let again = b.try_recv().expect("timed out: redelivered");
        assert_eq!((again.position, again.deliveries), (first.position, 2));
        assert!(b.try_recv().is_none(), "the touched one is still a's");
        assert!(!a.touch(first.position), "no longer a's");

        drop(a);
        let released = b.try_recv().expect("a's deliveries are released");
        assert_eq!(
            (released.position, released.deliveries),
            (second.position, 2)
        );
        assert!(b.ack(first.position) && b.ack(second.position));
        assert_eq!(bus.pending("g"), 0);
    }

    #[test]
    fn max_len_trims_and_counts_what_a_group_lost() {
        let bus = bus_with(&clock(), 3);
        let c = bus.consumer("g", "c");
        let all = events(5);
        bus.publish_now(&all);
        assert_eq!(bus.len(), 3);
        assert_eq!(bus.trimmed_unread(), 2);
        assert_eq!(c.try_recv().unwrap().event, all[2]);
    }

    #[test]
    fn dead_letters_are_bounded_and_acknowledged() {
        let bus = bus_with(&clock(), 100);
        let c = bus.consumer("g", "c");
        bus.publish_now(&events(5));
        for _ in 0..5 {
            let d = c.try_recv().unwrap();
            assert!(c.dead_letter(&d, "bad"));
            assert!(!c.dead_letter(&d, "bad"), "once");
        }
        let dead = bus.dead_letters("g");
        assert_eq!(dead.len(), 3);
        assert_eq!(dead[0].position, 2);
        assert_eq!(bus.pending("g"), 0);
    }

    proptest::proptest! {
        /// Whatever consumers of a group do (receive, acknowledge, drop and
        /// rejoin, let deliveries time out), every event is delivered until
        /// acknowledged, and once acknowledged never delivered again.
        #[test]
        fn every_event_is_acknowledged_once(ops in proptest::collection::vec(0u8..6, 1..300)) {
            let clock = clock();
            let bus = bus_with(&clock, 1_000);
            let mut consumers = [bus.consumer("g", "c0"), bus.consumer("g", "c1")];
            let all = events(20);
            let mut acked = std::collections::HashSet::new();
            let mut held: Vec<(usize, u64)> = Vec::new();
            let mut published = 0;
            for op in ops {
                match op {
                    0 if published < all.len() => {
                        bus.publish_now(&all[published..published + 1]);
                        published += 1;
                    }
                    1 | 2 => {
                        let i = usize::from(op - 1);
                        if let Some(d) = consumers[i].try_recv() {
                            proptest::prop_assert!(!acked.contains(&d.position), "acknowledged event redelivered");
                            held.push((i, d.position));
                        }
                    }
                    3 => {
                        if let Some((i, position)) = held.pop()
                            && consumers[i].ack(position)
                        {
                            proptest::prop_assert!(acked.insert(position));
                        }
                    }
                    4 => {
                        consumers[0] = bus.consumer("g", "c0");
                        held.retain(|(i, _)| *i != 0);
                    }
                    _ => clock.advance(Duration::from_secs(31)),
                }
            }
            bus.publish_now(&all[published..]);
            // Drain: everything not yet acknowledged is still delivered.
            clock.advance(Duration::from_secs(31));
            while let Some(d) = consumers[1].try_recv() {
                proptest::prop_assert!(!acked.contains(&d.position));
                if consumers[1].ack(d.position) {
                    acked.insert(d.position);
                }
                clock.advance(Duration::from_secs(31));
            }
            proptest::prop_assert_eq!(acked.len(), all.len());
            proptest::prop_assert!(bus.is_empty());
        }
    }
}
