//! Shared pieces of the messaging tests.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use order_saga::BoxFuture;
use order_saga::events::{Event, EventEnvelope};
use order_saga::messaging::{BusError, EventHandler, EventPublisher, HandlerError};
use order_saga::model::{CancelReason, OrderId};
use parking_lot::Mutex;
use uuid::Uuid;

/// `n` events of `order`, one second apart, of varied types.
pub fn order_events(order: OrderId, n: usize) -> Vec<EventEnvelope> {
    let base = DateTime::<Utc>::from_timestamp(1_800_000_000, 0).unwrap();
    (0..n)
        .map(|i| {
            let event = match i % 3 {
                0 => Event::ShipmentScheduled {
                    shipment_id: format!("ship-{i}"),
                },
                1 => Event::CompensationStarted {
                    reason: CancelReason::PaymentDeclined,
                },
                _ => Event::OrderCancelled {
                    reason: CancelReason::PaymentDeclined,
                },
            };
            EventEnvelope::new(order, base + chrono::Duration::seconds(i as i64), event)
        })
        .collect()
}

/// A new order id (distinct per call).
pub fn new_order() -> OrderId {
    OrderId::from_uuid(Uuid::now_v7())
}

/// Waits until `check` holds, polling; panics with `what` after `timeout`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A publisher that records what it is given, and fails while told to.
#[derive(Default)]
pub struct Recorder {
    pub published: Mutex<Vec<EventEnvelope>>,
    pub failing: AtomicBool,
}

impl Recorder {
    pub fn ids(&self) -> Vec<Uuid> {
        self.published.lock().iter().map(|e| e.id).collect()
    }

    pub fn len(&self) -> usize {
        self.published.lock().len()
    }
}

impl EventPublisher for Recorder {
    fn publish<'a>(&'a self, events: &'a [EventEnvelope]) -> BoxFuture<'a, Result<(), BusError>> {
        let result = if self.failing.load(Ordering::SeqCst) {
            Err(BusError::Unavailable("told to fail".into()))
        } else {
            self.published.lock().extend_from_slice(events);
            Ok(())
        };
        Box::pin(std::future::ready(result))
    }
}

/// Checks that `published` holds each of `expected`'s events, and that per
/// order the first occurrences keep `expected`'s order. Returns how many
/// duplicates there were.
pub fn assert_per_order_order(published: &[EventEnvelope], expected: &[EventEnvelope]) -> usize {
    let mut seen = std::collections::HashSet::new();
    let mut per_order: HashMap<OrderId, Vec<Uuid>> = HashMap::new();
    let mut duplicates = 0;
    for event in published {
        if seen.insert(event.id) {
            per_order.entry(event.order_id).or_default().push(event.id);
        } else {
            duplicates += 1;
        }
    }
    let mut want: HashMap<OrderId, Vec<Uuid>> = HashMap::new();
    for event in expected {
        want.entry(event.order_id).or_default().push(event.id);
    }
    assert_eq!(
        per_order.len(),
        want.len(),
        "every order's events are published, and only those"
    );
    for (order, ids) in &want {
        assert_eq!(
            per_order.get(order),
            Some(ids),
            "order {order}: its events, each once, in order"
        );
    }
    duplicates
}

/// Wraps a handler: counts calls per event, and fails (or hangs) on the
/// events it is told to.
pub struct Probe {
    pub inner: Option<Arc<dyn EventHandler>>,
    pub calls: Mutex<HashMap<Uuid, usize>>,
    pub total: AtomicUsize,
    pub fail: Mutex<std::collections::HashSet<Uuid>>,
    pub unavailable_until: AtomicUsize,
    pub hang: AtomicBool,
    pub called: tokio::sync::Notify,
}

impl Probe {
    pub fn new(inner: Option<Arc<dyn EventHandler>>) -> Arc<Probe> {
        Arc::new(Probe {
            inner,
            calls: Mutex::new(HashMap::new()),
            total: AtomicUsize::new(0),
            fail: Mutex::new(Default::default()),
            unavailable_until: AtomicUsize::new(0),
            hang: AtomicBool::new(false),
            called: tokio::sync::Notify::new(),
        })
    }

    pub fn calls_for(&self, id: Uuid) -> usize {
        self.calls.lock().get(&id).copied().unwrap_or(0)
    }

    pub fn total(&self) -> usize {
        self.total.load(Ordering::SeqCst)
    }
}

impl EventHandler for Probe {
    fn handle<'a>(&'a self, event: &'a EventEnvelope) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            *self.calls.lock().entry(event.id).or_default() += 1;
            let n = self.total.fetch_add(1, Ordering::SeqCst) + 1;
            self.called.notify_waiters();
            if self.hang.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            if n <= self.unavailable_until.load(Ordering::SeqCst) {
                return Err(HandlerError::unavailable("dependency down"));
            }
            if self.fail.lock().contains(&event.id) {
                return Err(HandlerError::failed(format!("cannot handle {}", event.id)));
            }
            match &self.inner {
                Some(inner) => inner.handle(event).await,
                None => Ok(()),
            }
        })
    }
}
