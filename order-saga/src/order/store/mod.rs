//! Where orders and their sagas live: the durable saga log, the
//! idempotency keys, and (through the outbox) the events of each change.
//!
//! Every write is a transaction that changes the order, its saga and its
//! events together, and is fenced by a lease: only the instance holding an
//! order's lease (and the lease's current token) can advance its saga, so
//! several order-service instances can share the work, and an instance that
//! lost its lease (it stalled, another took over) cannot write over the
//! new owner.
//!
//! Implementations: [`MemoryOrderStore`](memory::MemoryOrderStore) (the
//! embedded default) and `PgOrderStore` (feature `postgres`, schema
//! `orders`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::BoxFuture;
use crate::events::EventEnvelope;
use crate::model::{CustomerId, Order, OrderId};
use crate::saga::Saga;

pub mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;

/// The right to advance one order's saga, held by one instance until it
/// expires. `token` grows with every claim: a write carrying an older token
/// is refused ([`StoreError::LeaseLost`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The instance holding it.
    pub owner: String,
    /// The fencing token.
    pub token: i64,
}

/// An order with its saga, as the orchestrator loads it.
#[derive(Clone, Debug, PartialEq)]
pub struct SagaRecord {
    /// The order.
    pub order: Order,
    /// Its saga (the order's `state` mirrors `saga.state()`).
    pub saga: Saga,
    /// Consecutive failed attempts of the saga's current action.
    pub attempts: u32,
    /// Someone asked to cancel; the driver applies it before its next action.
    pub cancel_requested: bool,
    /// The idempotency key the order was created with.
    pub idempotency_key: Option<String>,
}

/// A stored answer to a create request, replayed for the same key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredResponse {
    /// The HTTP status of the first answer (201, or 409 for out of stock).
    pub status: u16,
    /// Its JSON body.
    pub body: serde_json::Value,
}

/// An idempotency key claimed by a create request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdempotencyClaim {
    /// Keys are scoped per customer.
    pub customer: CustomerId,
    /// The client's key.
    pub key: String,
    /// SHA-256 of the request body (its canonical JSON).
    pub request_hash: [u8; 32],
    /// How long the key (and its stored answer) is kept. 24 h by default.
    pub ttl: Duration,
}

/// A new order to write.
#[derive(Clone, Debug)]
pub struct NewOrder {
    /// The order (`Pending`).
    pub order: Order,
    /// Its saga, with the reservation begun.
    pub saga: Saga,
    /// The request's idempotency key.
    pub idempotency: Option<IdempotencyClaim>,
    /// The creating instance, which holds the lease for `lease_for`.
    pub owner: String,
    /// The lease's length.
    pub lease_for: Duration,
    /// Saga log entries.
    pub log: Vec<String>,
}

/// What writing a new order found.
#[derive(Clone, Debug, PartialEq)]
pub enum Created {
    /// Written; the caller holds the lease.
    New(Lease),
    /// The key was used before with the same body and has an answer.
    Replay(StoredResponse),
    /// The key was used before with the same body, and that request is
    /// still being processed.
    InFlight,
    /// The key was used before with a different body.
    KeyReused,
}

/// A change to an order's saga.
#[derive(Clone, Debug)]
pub struct SagaUpdate {
    /// The order as it now is (its `state` is `saga.state()`).
    pub order: Order,
    /// The saga.
    pub saga: Saga,
    /// Consecutive failed attempts of the current action.
    pub attempts: u32,
    /// Events of this change, appended to the outbox in the same transaction.
    pub events: Vec<EventEnvelope>,
    /// Saga log entries.
    pub log: Vec<String>,
    /// The answer to store for the order's idempotency key.
    pub response: Option<StoredResponse>,
    /// `None`: keep the lease (the caller goes on driving). `Some(delay)`:
    /// release it; the saga may be claimed again after `delay`.
    pub release_after: Option<Duration>,
    /// The cancel request was applied to `saga`: clear the flag.
    pub cancel_applied: bool,
}

/// What a store call fails with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Another instance holds the order's lease now; stop driving it.
    #[error("lease on order {0} lost")]
    LeaseLost(OrderId),
    /// No such order.
    #[error("no order {0}")]
    NotFound(OrderId),
    /// A stored row could not be read back (a name this version does not
    /// know, malformed JSON).
    #[error("corrupt order row: {0}")]
    Corrupt(String),
    /// The database could not be reached or failed; nothing was written.
    #[error("order store unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Storage of orders and their sagas.
pub trait OrderStore: Send + Sync + 'static {
    /// Writes a new order (and claims its idempotency key) in one
    /// transaction, unless the key says otherwise.
    fn create(&self, new: NewOrder) -> BoxFuture<'_, Result<Created, StoreError>>;

    /// Deletes an order written by [`OrderStore::create`] whose request
    /// turned out invalid (an unknown SKU), with its idempotency key, so
    /// nothing of it remains. Fenced by the lease.
    fn abandon<'a>(
        &'a self,
        id: OrderId,
        lease: &'a Lease,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Applies `update` in one transaction if `lease` is still current;
    /// returns whether a cancel has been requested meanwhile.
    fn update<'a>(
        &'a self,
        lease: &'a Lease,
        update: SagaUpdate,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Claims up to `limit` unfinished sagas that are due (their retry time
    /// has come) and not leased, or whose lease has expired, or whose lease
    /// is held by an earlier incarnation of this instance (an owner
    /// `{instance_id}#…` other than `owner`): a restarted instance resumes
    /// its own sagas at once instead of waiting for their leases to expire.
    fn claim<'a>(
        &'a self,
        owner: &'a str,
        instance_id: &'a str,
        lease_for: Duration,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<(SagaRecord, Lease)>, StoreError>>;

    /// Claims one order's saga, whatever its state, if it is not leased (or
    /// its lease expired): for a cancel request or an operator's retry.
    fn claim_one<'a>(
        &'a self,
        id: OrderId,
        owner: &'a str,
        lease_for: Duration,
    ) -> BoxFuture<'a, Result<Option<(SagaRecord, Lease)>, StoreError>>;

    /// Marks a cancel request on the order and makes its saga due now.
    /// Returns the record (its saga as it was), or `None` when there is no
    /// such order.
    fn request_cancel(&self, id: OrderId) -> BoxFuture<'_, Result<Option<SagaRecord>, StoreError>>;

    /// One order.
    fn load(&self, id: OrderId) -> BoxFuture<'_, Result<Option<SagaRecord>, StoreError>>;

    /// A customer's orders, newest first, after `before` (keyset
    /// pagination on the time-ordered id).
    fn list<'a>(
        &'a self,
        customer: &'a CustomerId,
        before: Option<OrderId>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Order>, StoreError>>;

    /// How many orders are in each state (for metrics).
    fn count_by_state(
        &self,
    ) -> BoxFuture<'_, Result<Vec<(crate::model::OrderState, u64)>, StoreError>>;

    /// Deletes up to `limit` idempotency keys past their expiry; returns how many.
    fn purge_expired_keys(&self, limit: usize) -> BoxFuture<'_, Result<usize, StoreError>>;

    /// Whether the store answers (readiness).
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>>;
}

/// When `now + ttl` is.
pub(crate) fn expiry(now: DateTime<Utc>, ttl: Duration) -> DateTime<Utc> {
    now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX)
}
