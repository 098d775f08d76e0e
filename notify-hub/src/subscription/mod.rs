//! One live connection's view of a user's stream: replay from the store,
//! then live deliveries, in sequence order, with no gap and no duplicate.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::notification::Delivery;
use crate::registry::{Registry, Slot};
use crate::store::{Store, StoreError};

mod streams;

pub use streams::{Position, StreamEvent, StreamSubscription};

/// Why a [`Subscription`] ended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Closed {
    /// The connection fell behind: its bounded queue overflowed. The client
    /// reconnects (or resumes) with `since` = the last seq it received.
    #[error("slow consumer: delivery queue overflowed")]
    Overflow,
    /// The hub is shutting down.
    #[error("hub is shutting down")]
    ShuttingDown,
    /// Reading from the store (a replay, or the position of a `resume`)
    /// failed; the store error is the source.
    #[error("replay failed")]
    Store(#[from] StoreError),
}

/// A live subscription to one user's notifications, from
/// [`Hub::subscribe`](crate::Hub::subscribe). Dropping it unregisters it.
pub struct Subscription {
    registry: Arc<Registry>,
    store: Arc<dyn Store>,
    user: String,
    slot: Arc<Slot>,
    page: usize,
    /// The user's latest stored seq when the subscription started.
    latest_at_start: u64,
    /// The last seq handed out (or the start point before the first).
    last: u64,
    acked: u64,
    replay: VecDeque<Delivery>,
    need_replay: bool,
    /// A live delivery that arrived ahead of a gap; handed out after the
    /// replay that fills the gap.
    ahead: Option<Delivery>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("user", &self.user)
            .field("last", &self.last)
            .field("acked", &self.acked)
            .finish_non_exhaustive()
    }
}

impl Subscription {
    pub(crate) fn register(
        registry: Arc<Registry>,
        store: Arc<dyn Store>,
        user: &str,
        capacity: usize,
        page: usize,
    ) -> Subscription {
        let slot = registry.register(user, capacity);
        Subscription {
            registry,
            store,
            user: user.to_owned(),
            slot,
            page: page.max(1),
            latest_at_start: 0,
            last: 0,
            acked: 0,
            replay: VecDeque::new(),
            need_replay: false,
            ahead: None,
        }
    }

    /// Sets the start: after `since` when the client gave one, else after
    /// `latest`, the user's latest stored seq read after registering.
    pub(crate) fn start(&mut self, latest: u64, since: Option<u64>) {
        self.latest_at_start = latest;
        match since {
            // The same path as a `resume`, with the position already read.
            Some(since) => self.restart(since, latest),
            None => {
                self.last = latest;
                self.acked = latest;
            }
        }
    }

    /// Restarts the stream after `since`, given the user's `latest` stored
    /// seq: the one code path of `since` on subscribe and of
    /// [`resume`](Subscription::resume).
    ///
    /// A `since` above `latest` counts as `latest`: the client cannot have
    /// received a seq that does not exist yet (its store was reset, or it
    /// mixed up users), and taking it at its word would silently skip the
    /// next notifications.
    fn restart(&mut self, since: u64, latest: u64) {
        let since = since.min(latest);
        self.last = since;
        self.acked = self.acked.min(since);
        self.replay.clear();
        self.ahead = None;
        self.need_replay = true;
    }

    /// The user this subscription belongs to.
    pub fn user_id(&self) -> &str {
        &self.user
    }

    /// The user's latest stored seq when the subscription started (the
    /// `last_seq` of the welcome frame).
    pub fn latest_at_start(&self) -> u64 {
        self.latest_at_start
    }

    /// The last seq handed out by [`next`](Subscription::next).
    pub fn last_seq(&self) -> u64 {
        self.last
    }

    /// The highest seq the client acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Records that the client has everything up to `seq`. An ack beyond
    /// what was handed out is refused (`false`) and changes nothing.
    pub fn ack(&mut self, seq: u64) -> bool {
        if seq > self.last {
            return false;
        }
        self.acked = self.acked.max(seq);
        true
    }

    /// Restarts the stream after `since`: replays every stored notification
    /// with `seq > since`, then continues live. Reads the user's latest
    /// stored seq first: a `since` above it counts as it, exactly as `since`
    /// on [`Hub::subscribe`](crate::Hub::subscribe). On a store error the
    /// subscription is unchanged.
    pub async fn resume(&mut self, since: u64) -> Result<(), Closed> {
        let latest = self.store.last_seq(&self.user).await?;
        self.restart(since, latest);
        Ok(())
    }

    /// The next delivery in sequence order.
    ///
    /// Cancel-safe at the await points that wait for live traffic; a
    /// cancelled replay read is simply repeated.
    pub async fn next(&mut self) -> Result<Delivery, Closed> {
        loop {
            if self.slot.overflowed() {
                return Err(Closed::Overflow);
            }
            if self.slot.take_resync() {
                self.need_replay = true;
            }
            if let Some(d) = self.replay.pop_front() {
                if d.seq > self.last {
                    return Ok(self.hand_out(d));
                }
                continue;
            }
            if self.need_replay {
                let page = self.store.since(&self.user, self.last, self.page).await?;
                self.need_replay = page.len() >= self.page;
                self.replay.extend(page);
                continue;
            }
            if let Some(d) = self.ahead.take() {
                if d.seq > self.last {
                    // The store had nothing before it (e.g. trimmed by
                    // retention): hand it out rather than lose it.
                    return Ok(self.hand_out(d));
                }
                continue;
            }
            let live = if let Some(d) = self.slot.pop() {
                d
            } else if self.registry.ended() {
                // Shutting down (or the hub is gone), and everything queued
                // is flushed.
                return Err(Closed::ShuttingDown);
            } else {
                // A delivery, an overflow, a resync or the end: look again.
                self.slot.woken().await;
                continue;
            };
            if live.seq <= self.last {
                continue; // Already replayed.
            }
            if live.seq == self.last + 1 {
                return Ok(self.hand_out(live));
            }
            // A gap: a lower seq committed before this one (stores assign a
            // user's seqs in commit order) but its message has not arrived,
            // e.g. published by another node. Fill it from the store.
            self.ahead = Some(live);
            self.need_replay = true;
        }
    }

    fn hand_out(&mut self, d: Delivery) -> Delivery {
        self.last = d.seq;
        self.registry
            .stats
            .delivered
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        d
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.registry.unregister(&self.user, &self.slot);
    }
}
