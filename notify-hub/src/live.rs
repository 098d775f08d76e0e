//! Write-through delivery of live group items (ADR 0027): a transport
//! gives a stream subscription a [`LiveWriter`], and while the subscription
//! waits with nothing buffered, the task that dispatches a group send
//! writes the item's frame straight to the connection instead of queueing
//! it and waking the connection's task.
//!
//! A broadcast to N members otherwise costs N task wake-ups, N polls of
//! each connection's loop and N trips through the transport's framing,
//! spread over every worker thread; written through, it is N non-blocking
//! socket writes from a few tasks, the shape of the bare TCP fan-out it is
//! measured against.
//!
//! The core stays transport-agnostic: it decides *whether* an item may be
//! written through (the subscription is parked, its queue is empty, the item
//! is the next offset of a group it reads live) and keeps the stream's
//! position; the transport decides *how* (its framing, its socket) and says
//! whether the connection took the frame.

use std::sync::Arc;

use crate::notification::{Notification, SharedRender};

/// A connection that can take a live group item's frame from the task that
/// dispatches it, without waiting.
///
/// Set with [`StreamSubscription::write_live_through`]. Called with the
/// subscription's queue lock held, from the hub's dispatch tasks: it must not
/// block, wait or call back into the hub.
///
/// [`StreamSubscription::write_live_through`]: crate::StreamSubscription::write_live_through
pub trait LiveWriter: Send + Sync + 'static {
    /// Writes `item`'s frame now, or not at all.
    ///
    /// `true`: the connection has the whole frame, in order after everything
    /// written before it (the transport may hold the tail of a short write
    /// and send it before anything else). The item counts as handed out:
    /// the subscription's position moves past it.
    ///
    /// `false`: nothing was written; the item is queued for the
    /// subscription as usual, and every later item of its streams follows it
    /// through the queue until the subscription waits again.
    fn try_write(&self, item: &LiveItem<'_>) -> bool;
}

/// A live group item offered to a [`LiveWriter`].
#[derive(Debug)]
#[non_exhaustive]
pub struct LiveItem<'a> {
    /// The group.
    pub group: &'a str,
    /// Its offset in the group's stream.
    pub offset: u64,
    /// The notification.
    pub notification: &'a Arc<Notification>,
    /// The notification's JSON, serialized once for every member.
    pub json: &'a Arc<str>,
    /// One rendering of the item shared by every connection it reaches on
    /// this node (see [`SharedRender`]).
    pub rendered: &'a SharedRender,
}

/// A [`LiveWriter`] behind a name that `Debug` can print.
#[derive(Clone)]
pub(crate) struct Writer(pub(crate) Arc<dyn LiveWriter>);

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LiveWriter")
    }
}
