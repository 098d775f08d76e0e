//! The node's connection registry: which users have open subscriptions on
//! this node, each subscription's bounded queue ([`Slot`]), and the node's
//! counters ([`HubStats`]).
//!
//! The hub's dispatcher hands every committed send to the slots of its
//! recipients here; a [`Subscription`](crate::Subscription) registers its
//! slot here and reads its queue. Neither the hub nor the subscription
//! needs the other: both point at this module.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use dashmap::DashMap;
use tokio::sync::Notify;
use tokio::sync::mpsc::{self, error::TrySendError};

use crate::broker::Published;
use crate::notification::Delivery;

/// Counters of a hub, for metrics.
#[derive(Debug, Default)]
pub struct HubStats {
    pub(crate) sends: AtomicU64,
    pub(crate) send_errors: AtomicU64,
    pub(crate) delivered: AtomicU64,
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

/// The open subscriptions of this node, by user, and the node's counters.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    slots: DashMap<String, Vec<Arc<Slot>>>,
    pub(crate) stats: HubStats,
    next_id: AtomicU64,
}

/// The registry's handle on one subscription: its bounded queue and the
/// flags that wake it.
#[derive(Debug)]
pub(crate) struct Slot {
    id: u64,
    tx: mpsc::Sender<Delivery>,
    overflowed: AtomicBool,
    /// Set when broker messages may have been lost: re-read from the store.
    resync: AtomicBool,
    /// Wakes the subscription for an overflow or a resync.
    wake: Notify,
}

impl Slot {
    /// Queues `delivery` without waiting; a full queue marks a slow consumer.
    fn push(&self, delivery: Delivery, stats: &HubStats) {
        match self.tx.try_send(delivery) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                if !self.overflowed.swap(true, Ordering::AcqRel) {
                    stats.overflowed.fetch_add(1, Ordering::Relaxed);
                    self.wake.notify_one();
                }
            }
            Err(TrySendError::Closed(_)) => {}
        }
    }

    /// Asks the subscription to re-read its stream from the store.
    fn resync(&self) {
        self.resync.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Whether the queue overflowed (the subscription must end).
    pub(crate) fn overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Acquire)
    }

    /// Takes a pending resync request.
    pub(crate) fn take_resync(&self) -> bool {
        self.resync.swap(false, Ordering::AcqRel)
    }

    /// Resolves on the next overflow or resync request.
    pub(crate) async fn woken(&self) {
        self.wake.notified().await;
    }
}

impl Registry {
    /// Adds a slot with a queue of `capacity` for `user`; returns the slot
    /// and the receiving end of its queue.
    pub(crate) fn register(
        &self,
        user: &str,
        capacity: usize,
    ) -> (Arc<Slot>, mpsc::Receiver<Delivery>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let slot = Arc::new(Slot {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            tx,
            overflowed: AtomicBool::new(false),
            resync: AtomicBool::new(false),
            wake: Notify::new(),
        });
        self.slots
            .entry(user.to_owned())
            .or_default()
            .push(Arc::clone(&slot));
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        (slot, rx)
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
    pub(crate) fn dispatch(&self, message: &Published) {
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
                    ),
                    &self.stats,
                );
            }
        }
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
