//! The embedded, in-process store: fine for one node and for tests; it
//! forgets everything on restart.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;

use super::{
    Append, Appended, Audience, BoxFuture, GroupEntry, GroupItem, HistoryItem, Membership,
    Recipient, Store, StoreError,
};
use crate::notification::{Delivery, Notification};

/// An in-memory [`Store`] that keeps the newest `retention` deliveries per
/// user (default 10,000), so memory stays bounded. It refuses a send whose
/// `id` is among the last 100,000 stored.
#[derive(Debug)]
pub struct MemoryStore {
    retention: usize,
    state: Mutex<State>,
}

/// Keyed with foldhash, as the registry is (see there): a broadcast looks
/// up every member's log, and SipHash showed in the fan-out's profile.
type Hasher = foldhash::fast::RandomState;

#[derive(Debug, Default)]
struct State {
    users: HashMap<String, UserLog, Hasher>,
    /// Kept once created, even with no members left: a stream's offsets
    /// never restart.
    groups: HashMap<String, GroupState, Hasher>,
    /// Past memberships, by user.
    closed: HashMap<String, Vec<Membership>, Hasher>,
    /// Ids of the most recent sends, for duplicate detection (bounded).
    ids: HashSet<uuid::Uuid>,
    id_order: VecDeque<uuid::Uuid>,
}

/// How many recent notification ids the memory store remembers to refuse
/// duplicates.
const ID_WINDOW: usize = 100_000;

impl State {
    /// Every membership of `user`, past and current, each with its group's
    /// head, in no particular order.
    fn memberships_of(&self, user: &str) -> Vec<Membership> {
        let mut all: Vec<Membership> = self.closed.get(user).cloned().unwrap_or_default();
        for m in &mut all {
            m.head = self.groups.get(&m.group).map_or(0, |g| g.last_offset);
        }
        all.extend(self.groups.iter().filter_map(|(group, s)| {
            s.members.get(user).map(|&joined_after| Membership {
                group: group.clone(),
                joined_after,
                left_after: None,
                head: s.last_offset,
            })
        }));
        all
    }
}

/// A group's stream and its current members.
#[derive(Debug, Default)]
struct GroupState {
    last_offset: u64,
    /// Current members and the offset each joined after, in user order (a
    /// broadcast hands out seqs in user order, as the PostgreSQL store
    /// does), so a send does not sort them.
    members: BTreeMap<String, u64>,
    /// The newest `retention` items, ascending by offset.
    items: VecDeque<GroupItem>,
}

impl GroupState {
    fn push(&mut self, entry: GroupEntry, retention: usize) -> u64 {
        self.last_offset += 1;
        self.items.push_back(GroupItem {
            offset: self.last_offset,
            entry,
        });
        if self.items.len() > retention {
            self.items.pop_front();
        }
        self.last_offset
    }
}

#[derive(Debug, Default)]
struct UserLog {
    last_seq: u64,
    /// Ascending by seq; `true` for a member's copy of a group broadcast.
    deliveries: VecDeque<(u64, Arc<Notification>, bool)>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

impl MemoryStore {
    /// A store keeping 10,000 deliveries per user.
    pub fn new() -> MemoryStore {
        MemoryStore::with_retention(10_000)
    }

    /// A store keeping the newest `retention` deliveries per user (at least 1).
    pub fn with_retention(retention: usize) -> MemoryStore {
        MemoryStore {
            retention: retention.max(1),
            state: Mutex::new(State::default()),
        }
    }
}

impl Store for MemoryStore {
    fn append<'a>(
        &'a self,
        batch: &'a [Append],
    ) -> BoxFuture<'a, Result<Vec<Appended>, StoreError>> {
        Box::pin(async move {
            let mut state = self.state.lock();
            let State {
                users,
                groups,
                ids,
                id_order,
                ..
            } = &mut *state;
            let mut out = Vec::with_capacity(batch.len());
            for append in batch {
                if let Audience::Group(group) = &append.audience
                    && append.fan_out
                    && groups
                        .get(group)
                        .is_some_and(|g| g.members.len() > append.max_recipients)
                {
                    out.push(Appended::TooManyRecipients);
                    continue;
                }
                let id = append.notification.id.unwrap_or_default();
                if !ids.insert(id) {
                    out.push(Appended::DuplicateId);
                    continue;
                }
                id_order.push_back(id);
                if id_order.len() > ID_WINDOW
                    && let Some(old) = id_order.pop_front()
                {
                    ids.remove(&old);
                }
                let mut offset = None;
                let mut group_size = 0;
                let members: Vec<String> = match &append.audience {
                    Audience::Users(list) => list.clone(),
                    Audience::Group(group) => {
                        let stream = groups.entry(group.clone()).or_default();
                        offset = Some(stream.push(
                            GroupEntry::Notification(Arc::clone(&append.notification)),
                            self.retention,
                        ));
                        group_size = stream.members.len();
                        if append.fan_out {
                            stream.members.keys().cloned().collect()
                        } else {
                            Vec::new()
                        }
                    }
                };
                let via_group = matches!(append.audience, Audience::Group(_));
                let mut recipients = Vec::with_capacity(members.len());
                for user_id in members {
                    // Looked up by reference: a second copy of the id only
                    // for a user seen for the first time.
                    if !users.contains_key(user_id.as_str()) {
                        users.insert(user_id.clone(), UserLog::default());
                    }
                    let Some(log) = users.get_mut(user_id.as_str()) else {
                        continue; // Inserted just above.
                    };
                    log.last_seq += 1;
                    log.deliveries.push_back((
                        log.last_seq,
                        Arc::clone(&append.notification),
                        via_group,
                    ));
                    if log.deliveries.len() > self.retention {
                        log.deliveries.pop_front();
                    }
                    recipients.push(Recipient {
                        user_id,
                        seq: log.last_seq,
                    });
                }
                out.push(match offset {
                    Some(offset) => Appended::Broadcast {
                        recipients,
                        offset,
                        members: group_size,
                    },
                    None => Appended::Stored(recipients),
                });
            }
            Ok(out)
        })
    }

    fn history<'a>(
        &'a self,
        user: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Delivery>, StoreError>> {
        Box::pin(async move {
            let state = self.state.lock();
            Ok(state.users.get(user).map_or_else(Vec::new, |log| {
                log.deliveries
                    .iter()
                    .rev()
                    .take(limit)
                    .map(|(seq, n, via)| Delivery::new(*seq, Arc::clone(n)).via_group(*via))
                    .collect()
            }))
        })
    }

    fn since<'a>(
        &'a self,
        user: &'a str,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Delivery>, StoreError>> {
        Box::pin(async move {
            let state = self.state.lock();
            Ok(state.users.get(user).map_or_else(Vec::new, |log| {
                // Ascending and contiguous: find the start by position.
                let first = log.deliveries.front().map_or(0, |(s, _, _)| *s);
                let skip = after.saturating_add(1).saturating_sub(first);
                log.deliveries
                    .iter()
                    .skip(usize::try_from(skip).unwrap_or(usize::MAX))
                    .take(limit)
                    .map(|(seq, n, via)| Delivery::new(*seq, Arc::clone(n)).via_group(*via))
                    .collect()
            }))
        })
    }

    fn last_seq<'a>(&'a self, user: &'a str) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move { Ok(self.state.lock().users.get(user).map_or(0, |l| l.last_seq)) })
    }

    fn join_group<'a>(
        &'a self,
        group: &'a str,
        user: &'a str,
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        Box::pin(async move {
            let mut state = self.state.lock();
            let stream = state.groups.entry(group.to_owned()).or_default();
            if stream.members.contains_key(user) {
                return Ok(None);
            }
            let head = stream.last_offset;
            stream.members.insert(user.to_owned(), head);
            Ok(Some(head))
        })
    }

    fn leave_group<'a>(
        &'a self,
        group: &'a str,
        user: &'a str,
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        Box::pin(async move {
            let mut state = self.state.lock();
            let retention = self.retention;
            let Some(stream) = state.groups.get_mut(group) else {
                return Ok(None);
            };
            let Some(joined_after) = stream.members.remove(user) else {
                return Ok(None);
            };
            let left_after = stream.push(
                GroupEntry::Left {
                    user_id: user.to_owned(),
                },
                retention,
            );
            state
                .closed
                .entry(user.to_owned())
                .or_default()
                .push(Membership {
                    group: group.to_owned(),
                    joined_after,
                    left_after: Some(left_after),
                    head: left_after,
                });
            Ok(Some(left_after))
        })
    }

    fn group_heads<'a>(
        &'a self,
        groups: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<u64>, StoreError>> {
        Box::pin(async move {
            let state = self.state.lock();
            Ok(groups
                .iter()
                .map(|g| state.groups.get(g).map_or(0, |s| s.last_offset))
                .collect())
        })
    }

    fn group_since<'a>(
        &'a self,
        group: &'a str,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<GroupItem>, StoreError>> {
        Box::pin(async move {
            let state = self.state.lock();
            let Some(stream) = state.groups.get(group) else {
                return Ok(Vec::new());
            };
            // Offsets are contiguous: the first wanted item's index is
            // known without a search.
            let first = stream.items.front().map_or(0, |i| i.offset);
            let skip = usize::try_from(after.saturating_add(1).saturating_sub(first))
                .unwrap_or(usize::MAX);
            Ok(stream
                .items
                .iter()
                .skip(skip)
                .take(limit)
                .cloned()
                .collect())
        })
    }

    fn memberships<'a>(
        &'a self,
        user: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Membership>, StoreError>> {
        Box::pin(async move {
            let state = self.state.lock();
            let mut all = state.memberships_of(user);
            all.sort_by(|a, b| (&a.group, a.joined_after).cmp(&(&b.group, b.joined_after)));
            Ok(all)
        })
    }

    fn stream_history<'a>(
        &'a self,
        user: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<HistoryItem>, StoreError>> {
        Box::pin(async move {
            let state = self.state.lock();
            let mut items: Vec<HistoryItem> = Vec::new();
            if let Some(log) = state.users.get(user) {
                items.extend(
                    log.deliveries
                        .iter()
                        .rev()
                        .filter(|(_, _, via)| !via)
                        .take(limit)
                        .map(|(seq, n, _)| HistoryItem::Inbox(Delivery::new(*seq, Arc::clone(n)))),
                );
            }
            let intervals = state.memberships_of(user);
            for m in intervals {
                let Some(stream) = state.groups.get(&m.group) else {
                    continue;
                };
                // Items are ascending by offset: the interval's end is found
                // by bisection, and the walk back stops at its start.
                let end = m.left_after.map_or(stream.items.len(), |left| {
                    stream.items.partition_point(|i| i.offset <= left)
                });
                items.extend(
                    stream
                        .items
                        .range(..end)
                        .rev()
                        .take_while(|i| i.offset > m.joined_after)
                        .filter_map(|i| match &i.entry {
                            GroupEntry::Notification(n) => Some(HistoryItem::Group {
                                group: m.group.clone(),
                                offset: i.offset,
                                notification: Arc::clone(n),
                            }),
                            GroupEntry::Left { .. } => None,
                        })
                        .take(limit),
                );
            }
            items.sort_by_key(|item| std::cmp::Reverse(item.notification().id));
            items.truncate(limit);
            Ok(items)
        })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async { Ok(()) })
    }
}
