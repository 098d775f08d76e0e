//! Orders in memory: the embedded default, and the reference the
//! PostgreSQL store is tested against. One lock makes every call a
//! transaction.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use time_kit::SharedClock;

use super::{
    Created, Lease, NewOrder, OrderStore, SagaRecord, SagaUpdate, StoreError, StoredResponse,
    expiry,
};
use crate::BoxFuture;
use crate::messaging::outbox::MemoryOutbox;
use crate::model::{CustomerId, Order, OrderId, OrderState};

#[derive(Debug)]
struct Row {
    record: SagaRecord,
    next_attempt_at: DateTime<Utc>,
    lease: Option<(Lease, DateTime<Utc>, Duration)>,
    log: Vec<String>,
}

#[derive(Debug)]
struct KeyRow {
    request_hash: [u8; 32],
    order_id: OrderId,
    response: Option<StoredResponse>,
    expires_at: DateTime<Utc>,
}

#[derive(Debug, Default)]
struct State {
    orders: HashMap<OrderId, Row>,
    by_customer: BTreeSet<(CustomerId, OrderId)>,
    keys: HashMap<(CustomerId, String), KeyRow>,
    next_token: i64,
}

/// Orders, sagas, idempotency keys and the outbox in one process's memory.
#[derive(Debug, Clone)]
pub struct MemoryOrderStore {
    state: Arc<Mutex<State>>,
    outbox: MemoryOutbox,
    clock: SharedClock,
}

impl Default for MemoryOrderStore {
    fn default() -> MemoryOrderStore {
        MemoryOrderStore::new(time_kit::system())
    }
}

impl MemoryOrderStore {
    /// An empty store reading `clock` for leases, retries and key expiry.
    pub fn new(clock: SharedClock) -> MemoryOrderStore {
        MemoryOrderStore {
            state: Arc::new(Mutex::new(State::default())),
            outbox: MemoryOutbox::new(clock.clone()),
            clock,
        }
    }

    fn now(&self) -> DateTime<Utc> {
        DateTime::<Utc>::from(self.clock.now())
    }

    /// The outbox each change's events are appended to (under the store's
    /// lock, so they commit together); an
    /// [`OutboxRelay`](crate::messaging::relay::OutboxRelay) over its
    /// [`source`](MemoryOutbox::source) publishes them.
    pub fn outbox(&self) -> &MemoryOutbox {
        &self.outbox
    }

    /// The saga log of one order (for tests and operators).
    pub fn saga_log(&self, id: OrderId) -> Vec<String> {
        self.state
            .lock()
            .orders
            .get(&id)
            .map(|row| row.log.clone())
            .unwrap_or_default()
    }
}

fn fence(state: &State, id: OrderId, lease: &Lease) -> Result<(), StoreError> {
    let row = state.orders.get(&id).ok_or(StoreError::NotFound(id))?;
    match &row.lease {
        Some((held, _, _)) if held == lease => Ok(()),
        _ => Err(StoreError::LeaseLost(id)),
    }
}

impl OrderStore for MemoryOrderStore {
    fn create(&self, new: NewOrder) -> BoxFuture<'_, Result<Created, StoreError>> {
        Box::pin(async move {
            let now = self.now();
            let mut state = self.state.lock();
            let id = new.order.id;
            if let Some(claim) = &new.idempotency {
                let slot = (claim.customer.clone(), claim.key.clone());
                if let Some(existing) = state.keys.get(&slot)
                    && existing.expires_at > now
                {
                    if existing.request_hash != claim.request_hash {
                        return Ok(Created::KeyReused);
                    }
                    return Ok(match &existing.response {
                        Some(response) => Created::Replay(response.clone()),
                        None => Created::InFlight,
                    });
                }
                state.keys.insert(
                    slot,
                    KeyRow {
                        request_hash: claim.request_hash,
                        order_id: id,
                        response: None,
                        expires_at: expiry(now, claim.ttl),
                    },
                );
            }
            state.next_token += 1;
            let lease = Lease {
                owner: new.owner.clone(),
                token: state.next_token,
            };
            state.by_customer.insert((new.order.customer.clone(), id));
            state.orders.insert(
                id,
                Row {
                    record: SagaRecord {
                        order: new.order,
                        saga: new.saga,
                        attempts: 0,
                        cancel_requested: false,
                        idempotency_key: new.idempotency.map(|claim| claim.key),
                    },
                    next_attempt_at: now,
                    lease: Some((lease.clone(), expiry(now, new.lease_for), new.lease_for)),
                    log: new.log,
                },
            );
            Ok(Created::New(lease))
        })
    }

    fn abandon<'a>(
        &'a self,
        id: OrderId,
        lease: &'a Lease,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut state = self.state.lock();
            fence(&state, id, lease)?;
            if let Some(row) = state.orders.remove(&id) {
                let customer = row.record.order.customer;
                state.by_customer.remove(&(customer.clone(), id));
                if let Some(key) = row.record.idempotency_key {
                    state.keys.remove(&(customer, key));
                }
            }
            Ok(())
        })
    }

    fn update<'a>(
        &'a self,
        lease: &'a Lease,
        update: SagaUpdate,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let now = self.now();
            let mut guard = self.state.lock();
            let state = &mut *guard;
            let id = update.order.id;
            fence(state, id, lease)?;
            let row = state.orders.get_mut(&id).ok_or(StoreError::NotFound(id))?;
            row.record.order = update.order;
            row.record.saga = update.saga;
            row.record.attempts = update.attempts;
            if update.cancel_applied {
                row.record.cancel_requested = false;
            }
            row.log.extend(update.log);
            match update.release_after {
                Some(delay) => {
                    row.lease = None;
                    row.next_attempt_at = expiry(now, delay);
                }
                None => {
                    if let Some((_, until, lease_for)) = &mut row.lease {
                        // Each write renews the lease for as long as it was taken.
                        *until = expiry(now, *lease_for);
                    }
                }
            }
            let cancel_requested = row.record.cancel_requested;
            if let (Some(response), Some(key)) = (update.response, &row.record.idempotency_key) {
                let slot = (row.record.order.customer.clone(), key.clone());
                if let Some(key_row) = state.keys.get_mut(&slot)
                    && key_row.order_id == id
                {
                    key_row.response = Some(response);
                }
            }
            // Under the store's lock: the change and its events commit together.
            self.outbox.append(&update.events);
            Ok(cancel_requested)
        })
    }

    fn claim<'a>(
        &'a self,
        owner: &'a str,
        instance_id: &'a str,
        lease_for: Duration,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<(SagaRecord, Lease)>, StoreError>> {
        Box::pin(async move {
            let now = self.now();
            let mut guard = self.state.lock();
            let state = &mut *guard;
            let mut due: Vec<(DateTime<Utc>, OrderId)> = state
                .orders
                .iter()
                .filter(|(_, row)| {
                    claimable(row, owner, instance_id, now) && row.next_attempt_at <= now
                })
                .map(|(id, row)| (row.next_attempt_at, *id))
                .collect();
            due.sort();
            due.truncate(limit);
            let mut claimed = Vec::with_capacity(due.len());
            for (_, id) in due {
                state.next_token += 1;
                let lease = Lease {
                    owner: owner.to_owned(),
                    token: state.next_token,
                };
                if let Some(row) = state.orders.get_mut(&id) {
                    row.lease = Some((lease.clone(), expiry(now, lease_for), lease_for));
                    claimed.push((row.record.clone(), lease));
                }
            }
            Ok(claimed)
        })
    }

    fn claim_one<'a>(
        &'a self,
        id: OrderId,
        owner: &'a str,
        lease_for: Duration,
    ) -> BoxFuture<'a, Result<Option<(SagaRecord, Lease)>, StoreError>> {
        Box::pin(async move {
            let now = self.now();
            let mut guard = self.state.lock();
            let state = &mut *guard;
            let Some(row) = state.orders.get_mut(&id) else {
                return Ok(None);
            };
            if let Some((_, until, _)) = &row.lease
                && *until > now
            {
                return Ok(None);
            }
            state.next_token += 1;
            let lease = Lease {
                owner: owner.to_owned(),
                token: state.next_token,
            };
            row.lease = Some((lease.clone(), expiry(now, lease_for), lease_for));
            Ok(Some((row.record.clone(), lease)))
        })
    }

    fn request_cancel(&self, id: OrderId) -> BoxFuture<'_, Result<Option<SagaRecord>, StoreError>> {
        Box::pin(async move {
            let now = self.now();
            let mut state = self.state.lock();
            let Some(row) = state.orders.get_mut(&id) else {
                return Ok(None);
            };
            if !row.record.saga.state().is_terminal() {
                row.record.cancel_requested = true;
                row.next_attempt_at = now;
            }
            Ok(Some(row.record.clone()))
        })
    }

    fn load(&self, id: OrderId) -> BoxFuture<'_, Result<Option<SagaRecord>, StoreError>> {
        Box::pin(async move {
            Ok(self
                .state
                .lock()
                .orders
                .get(&id)
                .map(|row| row.record.clone()))
        })
    }

    fn list<'a>(
        &'a self,
        customer: &'a CustomerId,
        before: Option<OrderId>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Order>, StoreError>> {
        Box::pin(async move {
            let state = self.state.lock();
            let low = (customer.clone(), OrderId::from_uuid(uuid::Uuid::nil()));
            let high = (
                customer.clone(),
                before.unwrap_or(OrderId::from_uuid(uuid::Uuid::max())),
            );
            Ok(state
                .by_customer
                .range(low..high)
                .rev()
                .take(limit)
                .filter_map(|(_, id)| state.orders.get(id).map(|row| row.record.order.clone()))
                .collect())
        })
    }

    fn count_by_state(&self) -> BoxFuture<'_, Result<Vec<(OrderState, u64)>, StoreError>> {
        Box::pin(async move {
            let state = self.state.lock();
            let mut counts: HashMap<OrderState, u64> = HashMap::new();
            for row in state.orders.values() {
                *counts.entry(row.record.saga.state()).or_default() += 1;
            }
            Ok(OrderState::ALL
                .into_iter()
                .map(|s| (s, counts.get(&s).copied().unwrap_or(0)))
                .collect())
        })
    }

    fn purge_expired_keys(&self, limit: usize) -> BoxFuture<'_, Result<usize, StoreError>> {
        Box::pin(async move {
            let now = self.now();
            let mut state = self.state.lock();
            let expired: Vec<_> = state
                .keys
                .iter()
                .filter(|(_, row)| row.expires_at <= now)
                .map(|(slot, _)| slot.clone())
                .take(limit)
                .collect();
            for slot in &expired {
                state.keys.remove(slot);
            }
            Ok(expired.len())
        })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async { Ok(()) })
    }
}

/// Unfinished, and not leased (or the lease expired, or an earlier
/// incarnation of `instance_id` holds it).
fn claimable(row: &Row, owner: &str, instance_id: &str, now: DateTime<Utc>) -> bool {
    if row.record.saga.state().is_terminal() {
        return false;
    }
    match &row.lease {
        None => true,
        Some((lease, until, _)) => {
            *until <= now || earlier_incarnation(&lease.owner, owner, instance_id)
        }
    }
}

/// Whether `held` is an owner `{instance_id}#…` other than `owner`: the
/// lease of a process of this instance that is no longer running.
pub(crate) fn earlier_incarnation(held: &str, owner: &str, instance_id: &str) -> bool {
    held != owner
        && held
            .strip_prefix(instance_id)
            .is_some_and(|rest| rest.starts_with('#'))
}
