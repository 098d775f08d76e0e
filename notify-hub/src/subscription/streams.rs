//! One live connection's view of a user's streams (ADR 0026): the inbox
//! (direct sends, in the user's sequence) and one stream per group the
//! user is a member of, each numbered on its own, each replayed from the
//! store and then live with no gap and no duplicate.
//!
//! Per stream the argument is v1's (DESIGN.md, "Gap-free recovery"): the
//! store hands out a stream's numbers in commit order under one row lock
//! (the user's seq row, the group's head row), so an item numbered `k + 1`
//! seen live means `k` is committed and can be read. A group's items are
//! handed out strictly in offset order, the member's own leave record
//! included, so nothing after a leave reaches the leaver, whatever order
//! the nodes' messages arrive in.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use crate::live::{LiveWriter, Writer};
use crate::notification::{Delivery, Notification, SharedRender};
use crate::registry::{Registry, Slot, StreamPush};
use crate::store::{GroupEntry, GroupItem, Store};

use super::Closed;

/// Where a client is in each of its streams: the last inbox seq and the
/// last offset of each group it has read. A new subscription given one
/// continues after it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Position {
    /// The last inbox seq read (direct sends; a group's copies in the same
    /// sequence are skipped, so it is increasing, not contiguous).
    pub inbox: u64,
    /// The last offset read per group.
    pub groups: BTreeMap<String, u64>,
}

/// What a [`StreamSubscription`] hands out.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum StreamEvent {
    /// A direct send, at its inbox seq.
    Inbox(Delivery),
    /// A group send, at its offset in the group's stream.
    Group {
        /// The group.
        group: Arc<str>,
        /// Its offset in the group's stream.
        offset: u64,
        /// The notification.
        notification: Arc<Notification>,
        /// Its JSON, when it came live (serialized once for every member).
        json: Option<Arc<str>>,
        /// When it came live: one rendering of the item shared by every
        /// subscription it reached on this node (see [`SharedRender`]).
        rendered: Option<SharedRender>,
    },
    /// The user joined `group`: its items after `joined_after` follow.
    Joined {
        /// The group.
        group: Arc<str>,
        /// The group's offset at the join.
        joined_after: u64,
    },
    /// The user left `group`: nothing after `left_after` follows.
    Left {
        /// The group.
        group: Arc<str>,
        /// The offset of the leave record.
        left_after: u64,
    },
}

/// One stream's reading position: what was handed out, and what waits
/// behind a gap until the store fills it.
#[derive(Debug)]
struct Cursor<T> {
    last: u64,
    /// Read from the store, in order, not yet handed out.
    replay: VecDeque<T>,
    /// More may be in the store after `last`: read before going live.
    need_replay: bool,
    /// A live item that came ahead of a gap.
    ahead: Option<(u64, T)>,
}

impl<T> Cursor<T> {
    fn new(last: u64, need_replay: bool) -> Cursor<T> {
        Cursor {
            last,
            replay: VecDeque::new(),
            need_replay,
            ahead: None,
        }
    }

    /// Takes a live item numbered `at`: the next one is returned to hand
    /// out; one already handed out is dropped; one past a gap waits in
    /// `ahead` while the gap is read from the store.
    fn offer(&mut self, at: u64, item: T) -> Option<T> {
        if at <= self.last {
            return None;
        }
        if at == self.last + 1 && !self.need_replay && self.replay.is_empty() {
            self.last = at;
            return Some(item);
        }
        self.ahead = Some((at, item));
        self.need_replay = true;
        None
    }

    /// The next item to hand out from what was read, with its number.
    fn next_buffered(&mut self, number: impl Fn(&T) -> u64) -> Option<T> {
        while let Some(item) = self.replay.pop_front() {
            let at = number(&item);
            if at > self.last {
                self.last = at;
                return Some(item);
            }
        }
        if self.need_replay {
            return None;
        }
        match self.ahead.take() {
            // The store had nothing before it (trimmed by retention): hand
            // it out rather than lose it.
            Some((at, item)) if at > self.last => {
                self.last = at;
                Some(item)
            }
            _ => None,
        }
    }
}

/// A group the subscription reads: one membership of it at a time. Its
/// slot is in the group's index for as long as the cursor exists.
#[derive(Debug)]
struct GroupCursor {
    name: Arc<str>,
    /// Later memberships of the same group, `(joined_after, left_after)`,
    /// learned before this one's leave record was met: read one after the
    /// other once it ends.
    later: VecDeque<(u64, Option<u64>)>,
    cursor: Cursor<GroupItem>,
    /// Set once the user's leave record is known: nothing after it is
    /// handed out, and the stream ends when it is reached.
    left_after: Option<u64>,
}

impl GroupCursor {
    /// Read live, with nothing buffered and no end known: its next item may
    /// be written through (ADR 0027).
    fn is_live(&self) -> bool {
        self.left_after.is_none()
            && self.later.is_empty()
            && !self.cursor.need_replay
            && self.cursor.replay.is_empty()
            && self.cursor.ahead.is_none()
    }

    /// A cursor for the membership `(joined_after, left_after)`, starting
    /// after `start`, with a read of the store first when `replay`.
    fn new(name: Arc<str>, start: u64, left_after: Option<u64>, replay: bool) -> GroupCursor {
        GroupCursor {
            name,
            later: VecDeque::new(),
            cursor: Cursor::new(start, replay),
            left_after,
        }
    }
}

/// The groups a subscription reads, by name. A list: a user is in a few
/// groups, and a map's node (a B-tree leaf holds eleven entries inline)
/// was most of an idle v2 connection's memory.
#[derive(Debug, Default)]
struct Groups(Vec<GroupCursor>);

impl Groups {
    fn get_mut(&mut self, name: &str) -> Option<&mut GroupCursor> {
        self.0.iter_mut().find(|g| &*g.name == name)
    }

    /// Adds or replaces the cursor of `name`.
    fn insert(&mut self, name: Arc<str>, cursor: GroupCursor) {
        self.remove(&name);
        self.0.push(cursor);
    }

    fn remove(&mut self, name: &str) {
        self.0.retain(|g| &*g.name != name);
    }

    fn values(&self) -> impl Iterator<Item = &GroupCursor> {
        self.0.iter()
    }

    fn values_mut(&mut self) -> impl Iterator<Item = &mut GroupCursor> {
        self.0.iter_mut()
    }
}

/// A live subscription to a user's inbox and group streams, from
/// [`Hub::subscribe_streams`](crate::Hub::subscribe_streams). Dropping it
/// unregisters it.
pub struct StreamSubscription {
    registry: Arc<Registry>,
    store: Arc<dyn Store>,
    user: String,
    slot: Arc<Slot>,
    page: usize,
    inbox: Cursor<Delivery>,
    groups: Groups,
    /// Events decided but not handed out yet (a re-join announced right
    /// after the leave it follows).
    pending: VecDeque<StreamEvent>,
    /// Memberships `(group, joined_after)` read or deliberately skipped:
    /// any other one is newer than the subscription and must be read.
    seen: Vec<(Arc<str>, u64)>,
    /// A membership may be unknown to the subscription (a join or a leave
    /// it has not read, a broker resync): read the memberships again.
    reread_memberships: bool,
    /// A [`LiveWriter`] was given: live group items may be written through
    /// while the subscription waits (ADR 0027).
    writes_through: bool,
}

impl std::fmt::Debug for StreamSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSubscription")
            .field("user", &self.user)
            .field("position", &self.position())
            .finish_non_exhaustive()
    }
}

impl StreamSubscription {
    /// Registers the subscription's slot (before anything is read, so that
    /// whatever commits afterwards arrives live) and reads where every
    /// stream starts: after `from` where it names the stream, else at the
    /// stream's head.
    pub(crate) async fn start(
        registry: Arc<Registry>,
        store: Arc<dyn Store>,
        user: &str,
        capacity: usize,
        page: usize,
        from: Option<&Position>,
    ) -> Result<StreamSubscription, Closed> {
        let slot = registry.register_streams(user, capacity);
        let mut subscription = StreamSubscription {
            registry,
            store,
            user: user.to_owned(),
            slot,
            page: page.max(1),
            inbox: Cursor::new(0, false),
            groups: Groups::default(),
            pending: VecDeque::new(),
            seen: Vec::new(),
            reread_memberships: false,
            writes_through: false,
        };
        // Memberships and their heads in one snapshot: a leave after it
        // has a higher offset than the head read here, so the cursor meets
        // its record.
        let memberships = subscription.store.memberships(user).await?;
        let current: Vec<String> = memberships
            .iter()
            .filter(|m| m.left_after.is_none())
            .map(|m| m.group.clone())
            .collect();
        // By group, then by `joined_after`: a past membership of a group
        // comes before its current one.
        for m in &memberships {
            let name: Arc<str> = Arc::from(m.group.as_str());
            subscription.seen.push((Arc::clone(&name), m.joined_after));
            let given = from.and_then(|p| p.groups.get(&m.group)).copied();
            let start = match (m.left_after, given) {
                (None, Some(at)) => at.clamp(m.joined_after, m.head),
                // A position that does not name a current group (joined
                // while the client was away): from the join on, announced.
                (None, None) if from.is_some() => {
                    subscription.pending.push_back(StreamEvent::Joined {
                        group: Arc::clone(&name),
                        joined_after: m.joined_after,
                    });
                    m.joined_after
                }
                (None, None) => m.head,
                // A past membership the client had not read to its end:
                // the rest of it, up to the leave record.
                (Some(left), Some(at)) if at >= m.joined_after && at < left => at,
                (Some(_), _) => continue,
            };
            if let Some(earlier) = subscription.groups.get_mut(&name) {
                // Follows the past membership being read.
                earlier.later.push_back((m.joined_after, m.left_after));
                continue;
            }
            subscription.registry.index_group(&name, &subscription.slot);
            subscription.groups.insert(
                Arc::clone(&name),
                GroupCursor::new(name, start, m.left_after, start < m.head),
            );
        }
        // Kept for the connection's life: no spare room (a `Vec` starts at
        // four entries, and an idle connection's every byte counts).
        subscription.groups.0.shrink_to_fit();
        subscription.seen.shrink_to_fit();
        // Read after the index holds the slot: an item committed between
        // the snapshot and the indexing is in the store by now.
        let heads = subscription.store.group_heads(&current).await?;
        for (group, head) in current.iter().zip(heads) {
            if let Some(g) = subscription.groups.get_mut(group.as_str())
                && head > g.cursor.last
            {
                g.cursor.need_replay = true;
            }
        }
        let latest = subscription.store.last_seq(user).await?;
        subscription.inbox = match from {
            Some(p) => Cursor::new(p.inbox.min(latest), p.inbox < latest),
            None => Cursor::new(latest, false),
        };
        Ok(subscription)
    }

    /// Has the hub write live group items straight to `writer` while this
    /// subscription waits with nothing queued (ADR 0027), instead of
    /// queueing them for [`next`](Self::next). Items written through are
    /// handed out: [`position`](Self::position) moves past them, and `next`
    /// never returns them.
    ///
    /// The transport must then write what `next` returns only after the
    /// frames the writer took (which holds while the writer is called with
    /// the subscription parked: between `next`'s wait and its return or
    /// cancellation, and nowhere else).
    pub fn write_live_through(&mut self, writer: Arc<dyn LiveWriter>) {
        // What an earlier writer wrote is handed out before it is replaced.
        self.take_written();
        self.slot.set_writer(Some(Writer(writer)));
        self.writes_through = true;
    }

    /// The user this subscription belongs to.
    pub fn user_id(&self) -> &str {
        &self.user
    }

    /// Where the subscription is in each stream: what a client stores to
    /// continue later. Groups the user has left and read to the end are
    /// not in it.
    pub fn position(&self) -> Position {
        Position {
            inbox: self.inbox.last,
            groups: self
                .groups
                .values()
                .map(|g| {
                    // Items written through since the subscription last
                    // looked (ADR 0027) are handed out too.
                    let written = if self.writes_through {
                        self.slot.written_last(&g.name).unwrap_or(0)
                    } else {
                        0
                    };
                    (g.name.to_string(), g.cursor.last.max(written))
                })
                .collect(),
        }
    }

    /// The next event: a direct send, a group send, or a change of
    /// membership. Per stream in order, with no gap and no duplicate;
    /// across streams in no particular order.
    ///
    /// Cancel-safe at the await points that wait for live traffic; a
    /// cancelled replay read is simply repeated.
    pub async fn next(&mut self) -> Result<StreamEvent, Closed> {
        // Items written through while an earlier call waited (and was
        // cancelled) come first: the cursors move past them.
        self.take_written();
        loop {
            if self.slot.overflowed() {
                return Err(Closed::Overflow);
            }
            if self.slot.take_resync() {
                self.inbox.need_replay = true;
                for g in self.groups.values_mut() {
                    g.cursor.need_replay = true;
                }
                self.reread_memberships = true;
            }
            if let Some(event) = self.pending.pop_front() {
                return Ok(event);
            }
            if self.reread_memberships {
                self.read_memberships().await?;
                self.reread_memberships = false;
                continue;
            }
            if let Some(event) = self.next_buffered() {
                return Ok(event);
            }
            if self.inbox.need_replay {
                let page = self
                    .store
                    .since(&self.user, self.inbox.last, self.page)
                    .await?;
                self.inbox.need_replay = page.len() >= self.page;
                self.inbox.replay.extend(page);
                continue;
            }
            let replaying = self
                .groups
                .values()
                .find(|g| g.cursor.need_replay)
                .map(|g| Arc::clone(&g.name));
            if let Some(name) = replaying {
                let Some(g) = self.groups.get_mut(&name) else {
                    continue;
                };
                let page = self
                    .store
                    .group_since(&name, g.cursor.last, self.page)
                    .await?;
                g.cursor.need_replay = page.len() >= self.page;
                g.cursor.replay.extend(page);
                continue;
            }
            if let Some(push) = self.slot.pop_stream() {
                if let Some(event) = self.take_push(push) {
                    return Ok(event);
                }
                continue;
            }
            if let Some(delivery) = self.slot.pop() {
                if let Some(event) = self.take_inbox(delivery) {
                    return Ok(event);
                }
                continue;
            }
            if self.registry.ended() {
                return Err(Closed::ShuttingDown);
            }
            self.wait().await;
        }
    }

    /// Waits for the slot's next signal; with a writer, parked: the next
    /// item of each group read live may be written through meanwhile. A
    /// cancelled wait unparks too (the guard), so that the transport's own
    /// writes never race one written through.
    async fn wait(&mut self) {
        if !self.writes_through {
            self.slot.woken().await;
            return;
        }
        let live = self
            .groups
            .values()
            .filter(|g| g.is_live())
            .map(|g| (Arc::clone(&g.name), g.cursor.last));
        let parked = Parked(self.slot.park(live).then_some(&*self.slot));
        self.slot.woken().await;
        drop(parked);
        self.take_written();
    }

    /// Moves each group's cursor past the items written through (ADR 0027).
    fn take_written(&mut self) {
        if !self.writes_through {
            return;
        }
        let groups = &mut self.groups;
        self.slot.take_written(|name, last| {
            if let Some(g) = groups.get_mut(name)
                && g.is_live()
                && last > g.cursor.last
            {
                g.cursor.last = last;
            }
        });
    }

    /// Reads the memberships again and reads every one it had not seen
    /// (their join or leave message lost, or not read yet), each group's in
    /// order: a group not being read starts at that membership's join,
    /// announced; one being read continues with it after its current
    /// membership's leave record.
    async fn read_memberships(&mut self) -> Result<(), Closed> {
        let memberships = self.store.memberships(&self.user).await?;
        for m in memberships {
            if self
                .seen
                .iter()
                .any(|(g, j)| **g == *m.group && *j == m.joined_after)
            {
                continue;
            }
            let name: Arc<str> = Arc::from(m.group.as_str());
            self.seen.push((Arc::clone(&name), m.joined_after));
            if let Some(g) = self.groups.get_mut(&name) {
                g.later.push_back((m.joined_after, m.left_after));
                // Its leave record is in the store: read on to it.
                g.cursor.need_replay = true;
                continue;
            }
            // Indexed first, read second: what was dispatched before the
            // slot was in the index is in the store.
            self.registry.index_group(&name, &self.slot);
            self.groups.insert(
                Arc::clone(&name),
                GroupCursor::new(Arc::clone(&name), m.joined_after, m.left_after, true),
            );
            self.pending.push_back(StreamEvent::Joined {
                group: name,
                joined_after: m.joined_after,
            });
        }
        Ok(())
    }

    /// The next event from what was read from the store or held ahead.
    fn next_buffered(&mut self) -> Option<StreamEvent> {
        while let Some(d) = self.inbox.next_buffered(|d| d.seq) {
            if let Some(event) = self.hand_out_inbox(d) {
                return Some(event);
            }
        }
        let names: Vec<Arc<str>> = self.groups.values().map(|g| Arc::clone(&g.name)).collect();
        for name in names {
            while let Some(g) = self.groups.get_mut(&name) {
                let Some(item) = g.cursor.next_buffered(|i| i.offset) else {
                    break;
                };
                if let Some(event) = self.hand_out_item(&name, item, None) {
                    return Some(event);
                }
            }
        }
        None
    }

    fn take_inbox(&mut self, delivery: Delivery) -> Option<StreamEvent> {
        let seq = delivery.seq;
        let d = self.inbox.offer(seq, delivery)?;
        self.hand_out_inbox(d)
    }

    /// A group's copy in the inbox sequence is skipped (the group's stream
    /// brings it); a direct send is handed out.
    fn hand_out_inbox(&mut self, d: Delivery) -> Option<StreamEvent> {
        if d.is_via_group() {
            return None;
        }
        self.count_delivered();
        Some(StreamEvent::Inbox(d))
    }

    fn take_push(&mut self, push: StreamPush) -> Option<StreamEvent> {
        match push {
            StreamPush::Item {
                group,
                offset,
                notification,
                json,
                rendered,
            } => {
                let item = GroupItem {
                    offset,
                    entry: GroupEntry::Notification(notification),
                };
                let g = self.groups.get_mut(&group)?;
                // Handed out now only when it is next; an item held behind
                // a gap comes out later with the buffered ones, rendered on
                // its own.
                let item = g.cursor.offer(offset, item)?;
                self.hand_out_item(&group, item, json.map(|json| (json, rendered)))
            }
            StreamPush::Left {
                group,
                user,
                offset,
            } => {
                let Some(g) = self.groups.get_mut(&group) else {
                    // The end of a membership of the user's this
                    // subscription did not know of: read it.
                    if *user == *self.user {
                        self.reread_memberships = true;
                    }
                    return None;
                };
                let item = GroupItem {
                    offset,
                    entry: GroupEntry::Left {
                        user_id: user.to_string(),
                    },
                };
                let item = g.cursor.offer(offset, item)?;
                self.hand_out_item(&group, item, None)
            }
            StreamPush::Joined {
                group,
                joined_after,
            } => {
                // A membership not seen yet: read the memberships (earlier
                // ones of the group, whose messages may be lost, come first).
                if !self
                    .seen
                    .iter()
                    .any(|(g, j)| *g == group && *j == joined_after)
                {
                    self.reread_memberships = true;
                }
                None
            }
        }
    }

    /// Hands out the group item that is next in its stream (the cursor has
    /// moved past it): a notification inside the user's interval, or the
    /// end of the interval at the user's own leave record.
    fn hand_out_item(
        &mut self,
        group: &Arc<str>,
        item: GroupItem,
        live: Option<(Arc<str>, SharedRender)>,
    ) -> Option<StreamEvent> {
        let g = self.groups.get_mut(group)?;
        if g.left_after.is_some_and(|left| item.offset > left) {
            return None;
        }
        match item.entry {
            GroupEntry::Notification(notification) => {
                self.count_delivered();
                let (json, rendered) = live.unzip();
                Some(StreamEvent::Group {
                    group: Arc::clone(group),
                    offset: item.offset,
                    notification,
                    json,
                    rendered,
                })
            }
            GroupEntry::Left { user_id } if user_id == self.user => {
                // The interval is complete: the group's stream ends here,
                // unless a later membership of it is known.
                match g.later.pop_front() {
                    Some((joined_after, left_after)) => {
                        let later = std::mem::take(&mut g.later);
                        *g = GroupCursor::new(Arc::clone(group), joined_after, left_after, true);
                        g.later = later;
                        self.pending.push_back(StreamEvent::Joined {
                            group: Arc::clone(group),
                            joined_after,
                        });
                    }
                    None => {
                        self.registry.unindex_group(group, &self.slot);
                        self.groups.remove(group);
                    }
                }
                Some(StreamEvent::Left {
                    group: Arc::clone(group),
                    left_after: item.offset,
                })
            }
            // Another member's leave: only a place in the stream.
            _ => None,
        }
    }

    fn count_delivered(&self) {
        self.registry
            .stats
            .delivered
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Unparks a slot when dropped: nothing is written through once the wait
/// has returned or was cancelled.
struct Parked<'a>(Option<&'a Slot>);

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.0 {
            slot.unpark();
        }
    }
}

impl Drop for StreamSubscription {
    fn drop(&mut self) {
        if self.writes_through {
            self.slot.set_writer(None);
        }
        for g in self.groups.values() {
            self.registry.unindex_group(&g.name, &self.slot);
        }
        self.registry.unregister(&self.user, &self.slot);
    }
}
