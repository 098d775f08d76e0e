//! The embedded, in-process store: fine for one node and for tests; it
//! forgets everything on restart.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;

use super::{Append, Appended, Audience, BoxFuture, Recipient, Store, StoreError};
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
    /// Members in order (a broadcast hands out seqs in user order, as
    /// the PostgreSQL store does), so a send does not sort them.
    groups: HashMap<String, BTreeSet<String>, Hasher>,
    /// Ids of the most recent sends, for duplicate detection (bounded).
    ids: HashSet<uuid::Uuid>,
    id_order: VecDeque<uuid::Uuid>,
}

/// How many recent notification ids the memory store remembers to refuse
/// duplicates.
const ID_WINDOW: usize = 100_000;

#[derive(Debug, Default)]
struct UserLog {
    last_seq: u64,
    /// Ascending by seq.
    deliveries: VecDeque<(u64, Arc<Notification>)>,
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
            } = &mut *state;
            let mut out = Vec::with_capacity(batch.len());
            for append in batch {
                if let Audience::Group(group) = &append.audience
                    && groups
                        .get(group)
                        .is_some_and(|m| m.len() > append.max_recipients)
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
                let members: Vec<String> = match &append.audience {
                    Audience::Users(list) => list.clone(),
                    Audience::Group(group) => groups
                        .get(group)
                        .map(|s| s.iter().cloned().collect())
                        .unwrap_or_default(),
                };
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
                    log.deliveries
                        .push_back((log.last_seq, Arc::clone(&append.notification)));
                    if log.deliveries.len() > self.retention {
                        log.deliveries.pop_front();
                    }
                    recipients.push(Recipient {
                        user_id,
                        seq: log.last_seq,
                    });
                }
                out.push(Appended::Stored(recipients));
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
                    .map(|(seq, n)| Delivery::new(*seq, Arc::clone(n)))
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
                let first = log.deliveries.front().map_or(0, |(s, _)| *s);
                let skip = after.saturating_add(1).saturating_sub(first);
                log.deliveries
                    .iter()
                    .skip(usize::try_from(skip).unwrap_or(usize::MAX))
                    .take(limit)
                    .map(|(seq, n)| Delivery::new(*seq, Arc::clone(n)))
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
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            Ok(self
                .state
                .lock()
                .groups
                .entry(group.to_owned())
                .or_default()
                .insert(user.to_owned()))
        })
    }

    fn leave_group<'a>(
        &'a self,
        group: &'a str,
        user: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let mut state = self.state.lock();
            let Some(members) = state.groups.get_mut(group) else {
                return Ok(false);
            };
            let removed = members.remove(user);
            if members.is_empty() {
                state.groups.remove(group);
            }
            Ok(removed)
        })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async { Ok(()) })
    }
}
