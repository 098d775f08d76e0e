//! The node's connection registry: which users have open subscriptions on
//! this node, each subscription's bounded queue ([`Slot`]), and the node's
//! counters ([`HubStats`]).
//!
//! The hub's dispatcher hands every committed send to the slots of its
//! recipients here; a [`Subscription`](crate::Subscription) registers its
//! slot here and reads its queue. Neither the hub nor the subscription
//! needs the other: both point at this module.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Poll, Waker};

use dashmap::DashMap;
use parking_lot::Mutex;

use crate::broker::{ChangeKind, Published};
use crate::live::{LiveItem, Writer};
use crate::notification::{Delivery, Notification, SharedRender};

/// Counters of a hub, for metrics.
#[derive(Debug, Default)]
pub struct HubStats {
    pub(crate) sends: AtomicU64,
    pub(crate) send_errors: AtomicU64,
    pub(crate) delivered: AtomicU64,
    pub(crate) written_through: AtomicU64,
    pub(crate) overflowed: AtomicU64,
    pub(crate) broker_errors: AtomicU64,
    pub(crate) batches: AtomicU64,
    pub(crate) connections: AtomicUsize,
}

impl HubStats {
    /// Sends stored successfully.
    pub fn sends(&self) -> u64 {
        self.sends.load(Ordering::Relaxed)
    }
    /// Sends that failed in the store.
    pub fn send_errors(&self) -> u64 {
        self.send_errors.load(Ordering::Relaxed)
    }
    /// Deliveries handed to local connections.
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }
    /// Of [`delivered`](Self::delivered), the live group items written
    /// straight to a connection by the dispatcher (ADR 0027).
    pub fn written_through(&self) -> u64 {
        self.written_through.load(Ordering::Relaxed)
    }
    /// Connections closed because their queue overflowed (slow consumers).
    pub fn overflowed(&self) -> u64 {
        self.overflowed.load(Ordering::Relaxed)
    }
    /// Publishes that failed (the notification was stored and delivered to
    /// this node's connections; other nodes' connections recover it from
    /// the store).
    pub fn broker_errors(&self) -> u64 {
        self.broker_errors.load(Ordering::Relaxed)
    }
    /// Store transactions written by the group-commit writer.
    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }
    /// Open subscriptions on this node.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }
}

/// The stream subscriptions indexed under one group, by slot id.
type GroupSlots = indexmap::IndexMap<u64, Arc<Slot>, foldhash::fast::RandomState>;

/// The open subscriptions of this node, by user, and the node's counters.
///
/// Keyed with foldhash rather than the standard SipHash: a broadcast looks
/// up every recipient, and SipHash was most of that lookup's cost. The keys
/// are user ids from verified tokens and from the service API, and
/// foldhash's per-process random seed keeps them from being chosen to
/// collide.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    slots: DashMap<String, Vec<Arc<Slot>>, foldhash::fast::RandomState>,
    /// Stream subscriptions (ADR 0026) by group they are a member of: a
    /// group send reaches them through here, whoever its v1 recipients.
    /// Keyed by slot id, so that a connection entering or leaving a group of
    /// 10,000 is one hash operation, not a scan of the group (a Vec made a
    /// reconnect storm or a mass disconnect quadratic, under the shard's
    /// write lock that every send to the group waits for); iterated in a
    /// dense array like a Vec.
    groups: DashMap<String, GroupSlots, foldhash::fast::RandomState>,
    pub(crate) stats: HubStats,
    next_id: AtomicU64,
    /// Set once the hub has handed out everything (or is gone): every
    /// subscription ends after flushing its queue. A flag here, looked at
    /// with one atomic load, rather than a `watch` channel each
    /// subscription waits on: registering and dropping a waiter on the
    /// channel's shared list, twice per delivery, showed in the fan-out's
    /// profile.
    ended: AtomicBool,
}

/// A queue that grew past this many deliveries (a burst, a replay) is
/// given back to the allocator once it drains, so that an idle connection
/// does not keep its high-water mark.
const KEEP_QUEUE: usize = 16;

/// The registry's handle on one subscription: its bounded queue and the
/// flags that wake it.
///
/// The queue is a `VecDeque` under a lock rather than a tokio channel: a
/// channel allocates its first block of 32 entries up front (about 1.8 KB
/// with its shared state), which every idle connection would carry; an
/// empty `VecDeque` allocates nothing.
///
/// The subscription's waker sits under the same lock as the queue, with a
/// `signalled` flag that a push, an overflow or a resync sets and
/// [`Slot::woken`] takes: a wake between a subscription's empty `pop` and
/// its wait is therefore never lost, and a wake costs the one lock the push
/// already takes (a tokio `Notify` took its own lock two or three times per
/// wake: about 4 % of the server's CPU under a broadcast).
#[derive(Debug)]
pub(crate) struct Slot {
    id: u64,
    /// A stream subscription's (ADR 0026): it also takes group items and
    /// membership changes.
    streams: bool,
    capacity: usize,
    queue: Mutex<Queue>,
    overflowed: AtomicBool,
    /// Set when broker messages may have been lost: re-read from the store.
    resync: AtomicBool,
}

/// What a stream subscription (ADR 0026) gets besides its inbox.
#[derive(Debug, Clone)]
pub(crate) enum StreamPush {
    /// A group send at its offset.
    Item {
        group: Arc<str>,
        offset: u64,
        notification: Arc<Notification>,
        json: Option<Arc<str>>,
        /// Shared by every subscription the send reaches here.
        rendered: SharedRender,
    },
    /// `user` left `group`: the group's record at `offset`.
    Left {
        group: Arc<str>,
        user: Arc<str>,
        offset: u64,
    },
    /// The subscription's user joined `group` after `joined_after`.
    Joined { group: Arc<str>, joined_after: u64 },
}

/// A slot's deliveries and what wakes its subscription.
#[derive(Debug, Default)]
struct Queue {
    deliveries: VecDeque<Delivery>,
    /// Stream subscriptions only: group items and membership changes, in
    /// the order they were dispatched.
    streams: VecDeque<StreamPush>,
    /// Something happened since the subscription last looked.
    signalled: bool,
    /// The subscription's task, while it waits in [`Slot::woken`].
    waker: Option<Waker>,
    /// Write-through (ADR 0027), for a subscription that has a writer.
    live: Live,
}

/// A subscription's write-through state (ADR 0027).
#[derive(Debug, Default)]
struct Live {
    writer: Option<Writer>,
    /// The subscription waits with nothing buffered: items of `groups` may
    /// be written through.
    parked: bool,
    /// Per group read live: the last offset handed out, moved on by every
    /// item written through, until the subscription takes it back.
    groups: Vec<(Arc<str>, u64)>,
}

impl Slot {
    /// Queues `delivery` without waiting; a full queue marks a slow consumer.
    fn push(&self, delivery: Delivery, stats: &HubStats) {
        self.enqueue(stats, |queue| queue.deliveries.push_back(delivery));
    }

    /// Queues a stream push, as [`Slot::push`].
    fn push_stream(&self, push: StreamPush, stats: &HubStats) {
        self.enqueue(stats, |queue| queue.streams.push_back(push));
    }

    fn enqueue(&self, stats: &HubStats, add: impl FnOnce(&mut Queue)) {
        let mut queue = self.queue.lock();
        if queue.deliveries.len() + queue.streams.len() >= self.capacity {
            drop(queue);
            if !self.overflowed.swap(true, Ordering::AcqRel) {
                stats.overflowed.fetch_add(1, Ordering::Relaxed);
                self.signal();
            }
            return;
        }
        add(&mut queue);
        queue.signalled = true;
        let waker = queue.waker.take();
        drop(queue);
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Wakes the subscription (or has its next wait return at once).
    fn signal(&self) {
        let waker = {
            let mut queue = self.queue.lock();
            queue.signalled = true;
            queue.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// The oldest queued delivery, if any.
    pub(crate) fn pop(&self) -> Option<Delivery> {
        let mut queue = self.queue.lock();
        let delivery = queue.deliveries.pop_front();
        if queue.deliveries.is_empty() && queue.deliveries.capacity() > KEEP_QUEUE {
            queue.deliveries = VecDeque::new();
        }
        delivery
    }

    /// The oldest queued stream push, if any.
    pub(crate) fn pop_stream(&self) -> Option<StreamPush> {
        let mut queue = self.queue.lock();
        let push = queue.streams.pop_front();
        if queue.streams.is_empty() && queue.streams.capacity() > KEEP_QUEUE {
            queue.streams = VecDeque::new();
        }
        push
    }

    /// Gives the subscription a writer for write-through (ADR 0027), or
    /// takes it away.
    pub(crate) fn set_writer(&self, writer: Option<Writer>) {
        let mut queue = self.queue.lock();
        queue.live.writer = writer;
        queue.live.parked = false;
        queue.live.groups.clear();
    }

    /// Lets the next item of each of `groups` (name, last offset handed
    /// out) be written through while the subscription waits. Not parked
    /// (false) without a writer, or with anything queued or signalled: the
    /// wait returns at once then anyway.
    pub(crate) fn park(&self, groups: impl Iterator<Item = (Arc<str>, u64)>) -> bool {
        let mut queue = self.queue.lock();
        if queue.live.writer.is_none()
            || queue.signalled
            || !queue.deliveries.is_empty()
            || !queue.streams.is_empty()
        {
            return false;
        }
        let parked = &mut queue.live.groups;
        parked.clear();
        for group in groups {
            // Grown one entry at a time: a user is in one group or a few,
            // and `extend` would start at four entries, kept for the
            // connection's life.
            parked.reserve_exact(1);
            parked.push(group);
        }
        queue.live.parked = !queue.live.groups.is_empty();
        queue.live.parked
    }

    /// Ends the write-through of [`Slot::park`]: nothing is written through
    /// after this returns (a write in progress holds the lock it takes).
    pub(crate) fn unpark(&self) {
        self.queue.lock().live.parked = false;
    }

    /// Takes what was written through since the last park, per group: the
    /// last offset handed out. Only once unparked.
    pub(crate) fn take_written(&self, mut each: impl FnMut(&str, u64)) {
        let mut queue = self.queue.lock();
        if queue.live.parked {
            return;
        }
        for (group, last) in queue.live.groups.drain(..) {
            each(&group, last);
        }
    }

    /// The last offset of `group` written through and not taken back yet.
    pub(crate) fn written_last(&self, group: &str) -> Option<u64> {
        let queue = self.queue.lock();
        queue
            .live
            .groups
            .iter()
            .find(|(g, _)| &**g == group)
            .map(|(_, last)| *last)
    }

    /// Writes `item` through if the subscription is parked, nothing of its
    /// group streams is queued ahead of it and it is the next item of its
    /// group: `true` when the writer took it.
    ///
    /// The inbox queue does not matter: its deliveries are another stream
    /// (a group send's v1 copy, queued just before, is one the subscription
    /// skips), and streams are ordered each on its own. A signal does not
    /// either: until the subscription's wait returns it stays parked, so
    /// the transport is not writing.
    fn write_through(&self, item: &LiveItem<'_>, stats: &HubStats) -> bool {
        let mut queue = self.queue.lock();
        if !queue.live.parked || !queue.streams.is_empty() {
            return false;
        }
        let Queue { live, .. } = &mut *queue;
        let Some(writer) = &live.writer else {
            return false;
        };
        let Some((_, last)) = live
            .groups
            .iter_mut()
            .find(|(g, last)| **g == *item.group && *last + 1 == item.offset)
        else {
            return false;
        };
        if !writer.0.try_write(item) {
            return false;
        }
        *last = item.offset;
        stats.delivered.fetch_add(1, Ordering::Relaxed);
        stats.written_through.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Asks the subscription to re-read its stream from the store.
    fn resync(&self) {
        self.resync.store(true, Ordering::Release);
        self.signal();
    }

    /// Whether the queue overflowed (the subscription must end).
    pub(crate) fn overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Acquire)
    }

    /// Takes a pending resync request.
    pub(crate) fn take_resync(&self) -> bool {
        self.resync.swap(false, Ordering::AcqRel)
    }

    /// Resolves on the next delivery, overflow or resync request (or at
    /// once, if one came since the last wake). Cancel-safe: a signal it did
    /// not take stays for the next wait.
    pub(crate) async fn woken(&self) {
        std::future::poll_fn(|cx| {
            let mut queue = self.queue.lock();
            if std::mem::take(&mut queue.signalled) {
                return Poll::Ready(());
            }
            match &queue.waker {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                _ => queue.waker = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
        .await;
    }
}

impl Registry {
    /// Adds a slot with a queue of `capacity` for `user`.
    pub(crate) fn register(&self, user: &str, capacity: usize) -> Arc<Slot> {
        self.register_slot(user, capacity, false)
    }

    /// Adds a stream subscription's slot (ADR 0026) for `user`; it enters
    /// the index of each of its groups with [`Registry::index_group`].
    pub(crate) fn register_streams(&self, user: &str, capacity: usize) -> Arc<Slot> {
        self.register_slot(user, capacity, true)
    }

    fn register_slot(&self, user: &str, capacity: usize, streams: bool) -> Arc<Slot> {
        let slot = Arc::new(Slot {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            streams,
            capacity: capacity.max(1),
            queue: Mutex::new(Queue::default()),
            overflowed: AtomicBool::new(false),
            resync: AtomicBool::new(false),
        });
        self.slots
            .entry(user.to_owned())
            .or_default()
            .push(Arc::clone(&slot));
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        slot
    }

    /// Puts `slot` (a stream subscription's) in `group`'s index: the
    /// group's sends reach it from now on.
    pub(crate) fn index_group(&self, group: &str, slot: &Arc<Slot>) {
        self.groups
            .entry(group.to_owned())
            .or_default()
            .entry(slot.id)
            .or_insert_with(|| Arc::clone(slot));
    }

    /// Takes `slot` out of `group`'s index.
    pub(crate) fn unindex_group(&self, group: &str, slot: &Slot) {
        if let dashmap::Entry::Occupied(mut entry) = self.groups.entry(group.to_owned()) {
            entry.get_mut().swap_remove(&slot.id);
            if entry.get().is_empty() {
                entry.remove();
            }
        }
    }

    /// A committed join (`offset` = `joined_after`) or leave (`offset` =
    /// the leave record's), from this node or another.
    pub(crate) fn changed(&self, kind: ChangeKind, group: &str, user: &str, offset: u64) {
        match kind {
            ChangeKind::Join => self.joined(group, user, offset),
            ChangeKind::Leave => self.left(group, user, offset),
        }
    }

    /// `user` joined `group` after `joined_after`: their stream
    /// subscriptions on this node are told. Each enters the group's index
    /// itself when it takes the news (only a subscription changes its own
    /// index entries, in the order of its stream), and reads what was
    /// dispatched before from the store.
    fn joined(&self, group: &str, user: &str, joined_after: u64) {
        let Some(slots) = self.slots.get(user) else {
            return;
        };
        let group_name: Arc<str> = Arc::from(group);
        for slot in slots.iter().filter(|s| s.streams) {
            slot.push_stream(
                StreamPush::Joined {
                    group: Arc::clone(&group_name),
                    joined_after,
                },
                &self.stats,
            );
        }
    }

    /// `user` left `group` at the record `offset`: every stream
    /// subscription in the group's index, and the user's own (which may not
    /// be indexed yet), gets the record in its place in the stream.
    fn left(&self, group: &str, user: &str, offset: u64) {
        let push = StreamPush::Left {
            group: Arc::from(group),
            user: Arc::from(user),
            offset,
        };
        // Pushing takes only each slot's own lock, so the map's read guard
        // may be held meanwhile (no copy of the list per change).
        let mut reached: Vec<u64> = Vec::new();
        if let Some(slots) = self.groups.get(group) {
            for slot in slots.values() {
                reached.push(slot.id);
                slot.push_stream(push.clone(), &self.stats);
            }
        }
        if let Some(slots) = self.slots.get(user) {
            for slot in slots
                .iter()
                .filter(|s| s.streams && !reached.contains(&s.id))
            {
                slot.push_stream(push.clone(), &self.stats);
            }
        }
    }

    /// Removes `slot` of `user` (and the user's entry with its last slot).
    pub(crate) fn unregister(&self, user: &str, slot: &Slot) {
        if let dashmap::Entry::Occupied(mut entry) = self.slots.entry(user.to_owned()) {
            entry.get_mut().retain(|s| s.id != slot.id);
            if entry.get().is_empty() {
                entry.remove();
            }
        }
        self.stats.connections.fetch_sub(1, Ordering::Relaxed);
    }

    /// Hands a committed send to the local subscriptions of its recipients,
    /// without ever waiting on a connection: a full queue marks that
    /// connection as a slow consumer instead.
    ///
    /// A group send's items for the stream subscriptions of the group are
    /// returned, to be handed out with [`GroupFanout::deliver`] before the
    /// next send is dispatched.
    pub(crate) fn dispatch(&self, message: &Published) -> Option<GroupFanout> {
        // Serialized once per send, on the first local recipient.
        let mut json: Option<Option<Arc<str>>> = None;
        for recipient in &message.recipients {
            let Some(slots) = self.slots.get(&recipient.user_id) else {
                continue;
            };
            let json = json
                .get_or_insert_with(|| {
                    serde_json::to_string(&*message.notification)
                        .ok()
                        .map(Arc::from)
                })
                .clone();
            for slot in slots.iter() {
                slot.push(
                    Delivery::live(
                        recipient.seq,
                        Arc::clone(&message.notification),
                        json.clone(),
                    )
                    .via_group(message.group.is_some()),
                    &self.stats,
                );
            }
        }
        // Stream subscriptions get a group send as its group's item.
        let at = message.group.as_ref()?;
        // Copied out of the index (a reference count each): writing through
        // to thousands of sockets must not hold the shard's read guard, which
        // every join and leave of the group waits for.
        let slots: Vec<Arc<Slot>> = self.groups.get(&at.group)?.values().cloned().collect();
        let json = json.unwrap_or_else(|| {
            serde_json::to_string(&*message.notification)
                .ok()
                .map(Arc::from)
        });
        Some(GroupFanout {
            slots,
            group: Arc::from(at.group.as_str()),
            offset: at.offset,
            notification: Arc::clone(&message.notification),
            json,
            rendered: SharedRender::default(),
        })
    }

    /// Ends every subscription once it has handed out what it has queued,
    /// including any registered later.
    pub(crate) fn end_all(&self) {
        // Set before the walk: a slot registered during it either is in the
        // walk or registered after the flag was set (the map's shard locks
        // order the two), and its subscription then sees the flag.
        self.ended.store(true, Ordering::SeqCst);
        for slots in self.slots.iter() {
            for slot in slots.iter() {
                slot.signal();
            }
        }
    }

    /// Whether [`Registry::end_all`] was called.
    pub(crate) fn ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }

    /// Asks every local subscription to re-read its stream from the store.
    pub(crate) fn resync_all(&self) {
        for slots in self.slots.iter() {
            for slot in slots.iter() {
                slot.resync();
            }
        }
    }
}

/// A group send's item for every stream subscription in the group's index
/// on this node, from [`Registry::dispatch`].
#[derive(Debug)]
pub(crate) struct GroupFanout {
    slots: Vec<Arc<Slot>>,
    group: Arc<str>,
    offset: u64,
    notification: Arc<Notification>,
    json: Option<Arc<str>>,
    rendered: SharedRender,
}

/// A fan-out to fewer subscriptions than this is handed out by one task:
/// below it, starting a helper costs more than it saves.
const FANOUT_CHUNK: usize = 512;

impl GroupFanout {
    /// Hands the item to every subscription: written through where the
    /// subscription allows (ADR 0027), queued otherwise. A large group is
    /// split among up to one task per runtime worker, as the bare TCP
    /// fan-out it is measured against writes from one task per core; all of
    /// them finish before this returns, so the next send of the group
    /// cannot overtake this one.
    pub(crate) async fn deliver(self, registry: &Arc<Registry>) {
        let workers = tokio::runtime::Handle::try_current()
            .map(|runtime| runtime.metrics().num_workers())
            .unwrap_or(1);
        let chunks = (self.slots.len() / FANOUT_CHUNK).clamp(1, workers.max(1));
        if chunks == 1 {
            self.deliver_range(0..self.slots.len(), &registry.stats);
            return;
        }
        let size = self.slots.len().div_ceil(chunks);
        let fanout = Arc::new(self);
        // Every chunk on a task of its own, this one only waiting: tokio
        // runs the task last spawned from a worker in that worker's LIFO
        // slot, which no other worker steals from, so a chunk written here
        // with its one helper waiting there would run one after the other.
        let helpers: Vec<_> = (0..chunks)
            .map(|i| {
                let (fanout, registry) = (Arc::clone(&fanout), Arc::clone(registry));
                tokio::spawn(async move {
                    let end = ((i + 1) * size).min(fanout.slots.len());
                    fanout.deliver_range(i * size..end, &registry.stats);
                })
            })
            .collect();
        for (i, helper) in helpers.into_iter().enumerate() {
            // A helper fails if a writer panicked or the runtime is shutting
            // down: its subscriptions may have missed the item, so they
            // read their streams from the store again.
            if helper.await.is_err() {
                let end = ((i + 1) * size).min(fanout.slots.len());
                for slot in &fanout.slots[i * size..end] {
                    slot.resync();
                }
            }
        }
    }

    fn deliver_range(&self, range: std::ops::Range<usize>, stats: &HubStats) {
        for slot in &self.slots[range] {
            if let Some(json) = &self.json {
                let item = LiveItem {
                    group: &self.group,
                    offset: self.offset,
                    notification: &self.notification,
                    json,
                    rendered: &self.rendered,
                };
                if slot.write_through(&item, stats) {
                    continue;
                }
            }
            slot.push_stream(
                StreamPush::Item {
                    group: Arc::clone(&self.group),
                    offset: self.offset,
                    notification: Arc::clone(&self.notification),
                    json: self.json.clone(),
                    rendered: self.rendered.clone(),
                },
                stats,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notification::Notification;

    fn delivery(seq: u64) -> Delivery {
        Delivery::live(seq, Arc::new(Notification::new("t", "a", "b")), None)
    }

    #[test]
    fn a_full_queue_marks_the_slot_overflowed_and_keeps_what_it_holds() {
        let registry = Registry::default();
        let slot = registry.register("u", 3);
        for seq in 1..=5 {
            slot.push(delivery(seq), &registry.stats);
        }
        assert!(slot.overflowed());
        assert_eq!(registry.stats.overflowed.load(Ordering::Relaxed), 1);
        let held: Vec<u64> = std::iter::from_fn(|| slot.pop()).map(|d| d.seq).collect();
        assert_eq!(held, [1, 2, 3]);
    }

    #[test]
    fn a_drained_queue_gives_its_burst_capacity_back() {
        let registry = Registry::default();
        let slot = registry.register("u", 1024);
        for seq in 1..=500 {
            slot.push(delivery(seq), &registry.stats);
        }
        assert!(slot.queue.lock().deliveries.capacity() >= 500);
        let mut next = 1;
        while let Some(d) = slot.pop() {
            assert_eq!(d.seq, next, "first in, first out");
            next += 1;
        }
        assert_eq!(next, 501);
        assert_eq!(slot.queue.lock().deliveries.capacity(), 0);
        assert!(!slot.overflowed());
    }

    /// A group's index holds each slot once however often it is indexed,
    /// and taking slots out, in any order, leaves exactly the others.
    #[test]
    fn a_groups_index_holds_each_slot_once_and_loses_only_what_is_taken_out() {
        let registry = Registry::default();
        let slots: Vec<Arc<Slot>> = (0..2_000)
            .map(|i| registry.register_streams(&format!("u{i}"), 4))
            .collect();
        for slot in slots.iter().chain(&slots) {
            registry.index_group("g", slot);
        }
        let indexed = |registry: &Registry| -> Vec<u64> {
            let mut ids: Vec<u64> = registry
                .groups
                .get("g")
                .map(|slots| slots.keys().copied().collect())
                .unwrap_or_default();
            ids.sort_unstable();
            ids
        };
        let mut all: Vec<u64> = slots.iter().map(|s| s.id).collect();
        all.sort_unstable();
        assert_eq!(indexed(&registry), all, "each slot once");
        // Every third slot out, from the back (a removal moves the last
        // entry into the hole; the rest must stay).
        for slot in slots.iter().rev().step_by(3) {
            registry.unindex_group("g", slot);
        }
        let kept: Vec<u64> = slots
            .iter()
            .rev()
            .enumerate()
            .filter(|(i, _)| i % 3 != 0)
            .map(|(_, s)| s.id)
            .collect::<std::collections::BTreeSet<u64>>()
            .into_iter()
            .collect();
        assert_eq!(indexed(&registry), kept);
        for slot in &slots {
            registry.unindex_group("g", slot);
        }
        assert!(
            registry.groups.get("g").is_none(),
            "an empty group is dropped"
        );
    }

    /// A push from another thread between an empty `pop` and the wait is
    /// not lost: the wait returns, and the delivery is there.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_push_racing_the_wait_always_wakes_the_reader() {
        let registry = Arc::new(Registry::default());
        let total = 20_000u64;
        let slot = registry.register("u", total as usize);
        let writer = {
            let (registry, slot) = (Arc::clone(&registry), Arc::clone(&slot));
            std::thread::spawn(move || {
                for seq in 1..=total {
                    slot.push(delivery(seq), &registry.stats);
                    if seq % 64 == 0 {
                        std::thread::yield_now();
                    }
                }
            })
        };
        let mut next = 1;
        while next <= total {
            match slot.pop() {
                Some(d) => {
                    assert_eq!(d.seq, next);
                    next += 1;
                }
                None => slot.woken().await,
            }
        }
        writer.join().unwrap();
        assert!(!slot.overflowed());
    }
}
