//! [`OrderService`]: the order API and the orchestrator's run loop.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use time_kit::SharedClock;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use super::config::OrderConfig;
use super::driver::{self, Outcome, Settled, Stop};
use super::stats::OrderStats;
use super::store::{
    Created, IdempotencyClaim, Lease, NewOrder, OrderStore, SagaRecord, StoreError, StoredResponse,
};
use crate::inventory::Inventory;
use crate::model::{
    CancelReason, CreateOrder, CustomerId, Order, OrderId, OrderState, ValidationError,
};
use crate::payment::Payments;
use crate::saga::{Saga, Step};
use crate::shipping::Shipping;

/// The services the orchestrator calls.
#[derive(Clone)]
pub struct Services {
    /// Stock.
    pub inventory: Arc<dyn Inventory>,
    /// The payment provider (wrap a raw provider in
    /// [`ResilientPayments`](crate::payment::resilient::ResilientPayments)).
    pub payments: Arc<dyn Payments>,
    /// Shipments.
    pub shipping: Arc<dyn Shipping>,
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services").finish_non_exhaustive()
    }
}

/// The order service.
#[derive(Clone, Debug)]
pub struct OrderService {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) store: Arc<dyn OrderStore>,
    pub(crate) services: Services,
    pub(crate) config: OrderConfig,
    pub(crate) clock: SharedClock,
    pub(crate) stats: OrderStats,
    pub(crate) permits: Arc<Semaphore>,
    pub(crate) create_permits: Semaphore,
    pub(crate) fault_hook: Option<FaultHook>,
    /// This process's lease owner: `{instance_id}#{random}`, so a restarted
    /// instance tells its dead predecessor's leases from its own.
    pub(crate) owner: String,
}

/// Called at named points of the saga (`before:<step>`, `after:<step>`,
/// `before:<compensation>`, …): the crash harness's fault-injection hook.
pub type FaultHook = Arc<dyn Fn(&str) + Send + Sync>;

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrderService")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Inner {
    pub(crate) fn now(&self) -> DateTime<Utc> {
        DateTime::<Utc>::from(self.clock.now())
    }

    pub(crate) fn fault(&self, point: &str) {
        if let Some(hook) = &self.fault_hook {
            hook(point);
        }
    }
}

/// What a create request got.
#[derive(Debug, Clone, PartialEq)]
pub enum CreateOutcome {
    /// 201: the order is durable and its stock reserved; payment and
    /// shipping go on asynchronously.
    Created(Box<Order>),
    /// 409 `out_of_stock`: the order was recorded as cancelled
    /// (`out_of_stock`); this is also the answer stored for the key.
    OutOfStock(StoredResponse),
    /// The key's stored answer (its `status` is 201 or 409; the HTTP adapter
    /// answers a replayed 201 with 200).
    Replayed(StoredResponse),
}

/// A page of a customer's orders.
#[derive(Debug, Clone, PartialEq)]
pub struct OrderPage {
    /// Newest first.
    pub orders: Vec<Order>,
    /// Pass as `before` for the next page; `None` on the last page.
    pub next: Option<OrderId>,
}

/// What the order API refuses or fails with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OrderError {
    /// The request is invalid; nothing was written.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// The idempotency key is empty, longer than 255 bytes, or not visible ASCII.
    #[error("the idempotency key must be 1-255 visible ASCII characters")]
    InvalidIdempotencyKey,
    /// A request with this key is still being processed.
    #[error("a request with this idempotency key is in progress")]
    KeyInFlight,
    /// The key was used with a different body.
    #[error("the idempotency key was used with a different request body")]
    KeyReused,
    /// A SKU the inventory does not carry; nothing was written.
    #[error("unknown SKU: {0}")]
    UnknownSku(String),
    /// No such order (or not the caller's).
    #[error("no such order")]
    NotFound,
    /// The order is confirmed and cannot be cancelled.
    #[error("order {0} is confirmed and cannot be cancelled")]
    NotCancellable(OrderId),
    /// The order store failed; nothing was half-written.
    #[error("order store unavailable")]
    Store(#[source] StoreError),
    /// The inventory is unreachable: the order is recorded and its stock
    /// will be reserved when the inventory is back (retry with the same key
    /// to learn the outcome).
    #[error("inventory unavailable; the order will be retried")]
    InventoryUnavailable(OrderId),
}

impl From<StoreError> for OrderError {
    fn from(e: StoreError) -> OrderError {
        OrderError::Store(e)
    }
}

impl OrderError {
    /// The stable code the HTTP adapter returns.
    pub fn code(&self) -> &'static str {
        match self {
            OrderError::Invalid(e) => e.code(),
            OrderError::InvalidIdempotencyKey => "invalid_idempotency_key",
            OrderError::KeyInFlight => "request_in_progress",
            OrderError::KeyReused => "idempotency_key_reused",
            OrderError::UnknownSku(_) => "unknown_sku",
            OrderError::NotFound => "order_not_found",
            OrderError::NotCancellable(_) => "order_confirmed",
            OrderError::Store(_) => "database_unavailable",
            OrderError::InventoryUnavailable(_) => "inventory_unavailable",
        }
    }
}

/// The background work of a started [`OrderService`]: the poller that
/// resumes and claims due sagas, and the idempotency-key purge.
#[derive(Debug)]
pub struct Running {
    stop: watch::Sender<bool>,
    poller: JoinHandle<()>,
}

impl Running {
    /// Stops claiming new sagas and waits for the poller to end. Sagas in
    /// progress finish their current step; an interrupted one is resumed by
    /// whichever instance claims it next.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.poller.await;
    }
}

impl OrderService {
    /// An order service over `store` and `services`.
    pub fn new(
        store: Arc<dyn OrderStore>,
        services: Services,
        config: OrderConfig,
        clock: SharedClock,
    ) -> OrderService {
        let permits = Arc::new(Semaphore::new(config.max_concurrent_sagas.max(1)));
        let create_permits = Semaphore::new(config.max_concurrent_creates.max(1));
        OrderService {
            inner: Arc::new(Inner {
                store,
                services,
                owner: format!("{}#{:08x}", config.instance_id, fastrand::u32(..)),
                config,
                clock,
                stats: OrderStats::default(),
                permits,
                create_permits,
                fault_hook: None,
            }),
        }
    }

    /// Installs a fault-injection hook (see [`FaultHook`]). Call before
    /// [`OrderService::start`] and before the service is cloned.
    pub fn with_fault_hook(mut self, hook: FaultHook) -> OrderService {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.fault_hook = Some(hook);
        }
        self
    }

    /// The settings.
    pub fn config(&self) -> &OrderConfig {
        &self.inner.config
    }

    /// The services the orchestrator calls.
    pub fn services(&self) -> &Services {
        &self.inner.services
    }

    /// The order store.
    pub fn store(&self) -> &Arc<dyn OrderStore> {
        &self.inner.store
    }

    /// Counters since start.
    pub fn stats(&self) -> &OrderStats {
        &self.inner.stats
    }

    /// Starts the orchestrator: resumes this instance's unfinished sagas at
    /// once, then keeps claiming due ones (retries, expired leases of
    /// crashed instances, cancel requests) every `poll_interval`, and purges
    /// expired idempotency keys.
    pub fn start(&self) -> Running {
        let (stop, mut stopped) = watch::channel(false);
        let inner = self.inner.clone();
        let poller = tokio::spawn(async move {
            let mut purge_at = tokio::time::Instant::now();
            loop {
                let free = inner.permits.available_permits();
                if free > 0 {
                    let limit = free.min(256);
                    match inner
                        .store
                        .claim(
                            &inner.owner,
                            &inner.config.instance_id,
                            inner.config.lease,
                            limit,
                        )
                        .await
                    {
                        Ok(claimed) => {
                            let full = claimed.len() == limit;
                            for (record, lease) in claimed {
                                inner.stats.resumed.fetch_add(1, Relaxed);
                                // Claimed: an earlier run may have begun
                                // and run its current step.
                                spawn_driver(&inner, record, lease, None);
                            }
                            if full {
                                tokio::task::yield_now().await;
                                continue;
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "could not claim sagas"),
                    }
                }
                if tokio::time::Instant::now() >= purge_at {
                    match inner.store.purge_expired_keys(10_000).await {
                        Ok(0) => {}
                        Ok(n) => tracing::debug!(purged = n, "expired idempotency keys deleted"),
                        Err(e) => tracing::warn!(error = %e, "could not purge idempotency keys"),
                    }
                    purge_at = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
                }
                tokio::select! {
                    _ = tokio::time::sleep(inner.config.poll_interval) => {}
                    _ = stopped.changed() => break,
                }
            }
        });
        Running { stop, poller }
    }

    /// Creates an order for `customer`, idempotently under `idempotency_key`
    /// (Stripe's semantics: the same key and body replays the stored answer,
    /// a different body is [`OrderError::KeyReused`], a concurrent request
    /// with the key is [`OrderError::KeyInFlight`]; keys expire after
    /// `idempotency_ttl`).
    ///
    /// `Created` means the order is durable and its stock is reserved;
    /// payment and shipping continue in the background (call
    /// [`OrderService::start`] once per process).
    pub async fn create_order(
        &self,
        customer: &CustomerId,
        request: CreateOrder,
        idempotency_key: &str,
    ) -> Result<CreateOutcome, OrderError> {
        let inner = &self.inner;
        request.validate(&inner.config.cart)?;
        if idempotency_key.is_empty()
            || idempotency_key.len() > 255
            || !idempotency_key.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(OrderError::InvalidIdempotencyKey);
        }
        // Admission: the permit is held from the first write to the answer.
        let _admitted = inner.create_permits.acquire().await;
        let request_hash: [u8; 32] =
            Sha256::digest(serde_json::to_vec(&request).unwrap_or_default()).into();
        let now = inner.now();
        let order = Order {
            id: OrderId::new_at_time(now),
            customer: customer.clone(),
            state: OrderState::Pending,
            items: request.items,
            lines: Vec::new(),
            total_cents: 0,
            currency: inner.config.currency.clone(),
            ship_to: request.ship_to,
            cancel_reason: None,
            payment_id: None,
            shipment_id: None,
            attention: None,
            created_at: now,
            updated_at: now,
        };
        let mut saga = Saga::new();
        // Recorded with the order, before the reservation runs.
        let _ = saga.begin(Step::ReserveStock);
        let new = NewOrder {
            order: order.clone(),
            saga,
            idempotency: Some(IdempotencyClaim {
                customer: customer.clone(),
                key: idempotency_key.to_owned(),
                request_hash,
                ttl: inner.config.idempotency_ttl,
            }),
            owner: inner.owner.clone(),
            lease_for: inner.config.lease,
            log: vec![driver::log_begin(Step::ReserveStock)],
        };
        let lease = match inner.store.create(new).await? {
            Created::New(lease) => lease,
            Created::Replay(response) => {
                inner.stats.replayed.fetch_add(1, Relaxed);
                return Ok(CreateOutcome::Replayed(response));
            }
            Created::InFlight => return Err(OrderError::KeyInFlight),
            Created::KeyReused => return Err(OrderError::KeyReused),
        };
        let record = SagaRecord {
            order,
            saga,
            attempts: 0,
            cancel_requested: false,
            idempotency_key: Some(idempotency_key.to_owned()),
        };
        // Reserve while the client waits: 201 means the stock is held.
        let id = record.order.id;
        let mut record = record;
        let outcome = driver::run_step(inner, &record, Step::ReserveStock).await;
        let shortage = match &outcome {
            Outcome::Failed(_, detail) => detail.clone(),
            _ => String::new(),
        };
        if let Outcome::Invalid(sku) = outcome {
            // Bad input: remove every trace of the order.
            inner.store.abandon(id, &lease).await?;
            return Err(OrderError::UnknownSku(sku));
        }
        let settled = driver::settle_step(
            inner,
            &lease,
            &mut record,
            Step::ReserveStock,
            outcome,
            true,
        )
        .await;
        match settled {
            Ok(Settled::Advanced) if record.saga.reason() == Some(CancelReason::OutOfStock) => {
                inner.stats.rejected_out_of_stock.fetch_add(1, Relaxed);
                let response = driver::out_of_stock_response(&record.order, &shortage);
                // Nothing was reserved (all or nothing), but the release is
                // run anyway, as for every begun step: it is harmless.
                spawn_driver(inner, record, lease, None);
                Ok(CreateOutcome::OutOfStock(response))
            }
            Ok(Settled::Advanced) if record.saga.state() == OrderState::StockReserved => {
                inner.stats.created.fetch_add(1, Relaxed);
                // `order` is the order as written, the very body stored
                // for the key.
                let order = record.order.clone();
                let fresh = driver::begun_next(&record.saga);
                spawn_driver(inner, record, lease, fresh);
                Ok(CreateOutcome::Created(Box::new(order)))
            }
            // Rolled back at once for another reason (the reservation was
            // given up on its first attempt): the key's answer is stored;
            // a retry with the key gets it.
            Ok(Settled::Advanced) => {
                spawn_driver(inner, record, lease, None);
                Err(OrderError::InventoryUnavailable(id))
            }
            // The inventory is down: the saga retries the reservation and
            // answers the key when it has an outcome.
            Ok(Settled::Waiting) => Err(OrderError::InventoryUnavailable(id)),
            Err(Stop::StoreFailed(e)) => Err(OrderError::Store(e)),
            // Another instance took the saga over (this request outlived its
            // lease): it records the answer; a retry with the key gets it.
            Err(_) => Err(OrderError::KeyInFlight),
        }
    }

    /// One order.
    pub async fn get_order(&self, id: OrderId) -> Result<Option<Order>, OrderError> {
        Ok(self.inner.store.load(id).await?.map(|record| record.order))
    }

    /// Cancels `customer`'s order: compensates whatever has run (in the
    /// background; the returned order is `compensating` or already
    /// `cancelled`). A confirmed order is [`OrderError::NotCancellable`];
    /// cancelling a cancelled order returns it unchanged.
    pub async fn cancel_order(
        &self,
        customer: &CustomerId,
        id: OrderId,
    ) -> Result<Order, OrderError> {
        let inner = &self.inner;
        let Some(record) = inner.store.load(id).await? else {
            return Err(OrderError::NotFound);
        };
        if &record.order.customer != customer {
            return Err(OrderError::NotFound);
        }
        match record.saga.state() {
            OrderState::Confirmed => return Err(OrderError::NotCancellable(id)),
            OrderState::Cancelled | OrderState::NeedsAttention | OrderState::Compensating => {
                return Ok(record.order);
            }
            _ => {}
        }
        inner.store.request_cancel(id).await?;
        // Drive it here if no instance is driving it now; otherwise its
        // driver applies the request before its next step.
        if let Some((record, lease)) = inner
            .store
            .claim_one(id, &inner.owner, inner.config.lease)
            .await?
        {
            let mut record = record;
            record.cancel_requested = true;
            let permit = inner.permits.clone().acquire_owned().await;
            let stop = driver::drive(inner.clone(), record, lease, None).await;
            drop(permit);
            if let Stop::StoreFailed(e) = stop {
                return Err(OrderError::Store(e));
            }
        }
        // Another driver (an instance, or this one's own task) may hold the
        // saga: it applies the request before its next step. Its last step
        // has no next one: when that step succeeds the order confirms, and
        // a 200 here would have promised a rollback that never comes. So
        // while the last step runs, wait for the driver's decision (bounded
        // by one lease: a driver that stops answering loses the saga by then,
        // and whoever claims it next applies the request first).
        let deadline = tokio::time::Instant::now() + inner.config.lease;
        let record = loop {
            let record = inner.store.load(id).await?.ok_or(OrderError::NotFound)?;
            if record.saga.state() == OrderState::Confirmed {
                return Err(OrderError::NotCancellable(id));
            }
            let last_step_running = record.cancel_requested
                && record.saga.next()
                    == crate::saga::Action::Run(crate::saga::Step::CapturePayment);
            if !last_step_running || tokio::time::Instant::now() >= deadline {
                break record;
            }
            // A short poll: the step is a payment capture, and the reply
            // waits on it.
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        };
        let mut order = record.order;
        if record.cancel_requested
            && !order.state.is_terminal()
            && order.state != OrderState::Compensating
        {
            // Another instance holds the saga and will apply the request
            // before its next step.
            order.state = OrderState::Compensating;
            order.cancel_reason = Some(CancelReason::CustomerRequested);
        }
        Ok(order)
    }

    /// Operator action: retries the compensations of a `NeedsAttention` order.
    pub async fn retry_compensation(&self, id: OrderId) -> Result<Order, OrderError> {
        let inner = &self.inner;
        let Some(record) = inner.store.load(id).await? else {
            return Err(OrderError::NotFound);
        };
        if record.saga.state() != OrderState::NeedsAttention {
            return Ok(record.order);
        }
        let Some((mut record, lease)) = inner
            .store
            .claim_one(id, &inner.owner, inner.config.lease)
            .await?
        else {
            return Ok(record.order);
        };
        let _ = record.saga.retry_compensation();
        record.attempts = 0;
        record.order.attention = None;
        let stop = driver::drive(inner.clone(), record, lease, None).await;
        if let Stop::StoreFailed(e) = stop {
            return Err(OrderError::Store(e));
        }
        Ok(inner
            .store
            .load(id)
            .await?
            .ok_or(OrderError::NotFound)?
            .order)
    }

    /// `customer`'s orders, newest first, `limit` per page (capped at
    /// `max_page`), after the order `before` (keyset pagination).
    pub async fn list_orders(
        &self,
        customer: &CustomerId,
        before: Option<OrderId>,
        limit: usize,
    ) -> Result<OrderPage, OrderError> {
        let limit = limit.clamp(1, self.inner.config.max_page);
        let mut orders = self.inner.store.list(customer, before, limit + 1).await?;
        let next = if orders.len() > limit {
            orders.truncate(limit);
            orders.last().map(|o| o.id)
        } else {
            None
        };
        Ok(OrderPage { orders, next })
    }

    /// How many orders are in each state (for metrics; `needs_attention`
    /// above 0 wants an operator).
    pub async fn count_by_state(&self) -> Result<Vec<(OrderState, u64)>, OrderError> {
        Ok(self.inner.store.count_by_state().await?)
    }

    /// Whether the order store answers.
    pub async fn ready(&self) -> Result<(), OrderError> {
        Ok(self.inner.store.ping().await?)
    }
}

/// Drives `record` in the background; `fresh` as for [`driver::drive`].
fn spawn_driver(inner: &Arc<Inner>, record: SagaRecord, lease: Lease, fresh: Option<Step>) {
    let inner = inner.clone();
    tokio::spawn(async move {
        let Ok(_permit) = inner.permits.clone().acquire_owned().await else {
            return;
        };
        let id = record.order.id;
        let stop = driver::drive(inner, record, lease, fresh).await;
        tracing::trace!(order = %id, ?stop, "driver stopped");
    });
}
